"""The planted-bias base: built reproducibly from code, read by the normal loader, with an oracle
that knows the planted rule (stereotype palette on the web, truth palette in the CCUB sample)."""

import numpy as np
import pytest
from PIL import Image

from scoft.config import ModelParams, PlantedParams
from scoft.io import sha256_file
from scoft.planted import STEREOTYPES, build_planted_base, stereotype_oracle, web_corpus
from scoft.sample import CATEGORIES, CULTURES, draw
from tests.conftest import ROOT, write_params
from tests.helpers import scoft_here

QUICK = PlantedParams(images_per_prompt=2, vae_steps=8, unet_steps=8, batch_size=8, vae_batch_size=8, judge_steps=8)


@pytest.fixture(scope="module")
def quick_builds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    infos = [build_planted_base(folder / name, QUICK, 32, 0, progress=lambda m: None) for name in ("a", "b")]
    return folder, infos


def test_two_builds_give_the_same_weights(quick_builds):
    folder, infos = quick_builds
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        assert sha256_file(folder / "a" / part) == sha256_file(folder / "b" / part), part
    assert infos[0]["unet_final_loss"] == infos[1]["unet_final_loss"]
    assert infos[0]["judge"] == infos[1]["judge"]  # the judge too, built beside the base from its own seeds


def test_the_normal_loader_reads_the_build_as_a_real_base_model(quick_builds):
    from scoft.models import load_pipeline
    from scoft.negatives import generate

    folder, _ = quick_builds
    pipe = load_pipeline(ModelParams(base=str(folder / "a"), resolution=32))
    assert pipe.vae.config.scaling_factor != 0.18215  # fitted to the planted VAE's latents
    image = generate(pipe, ["a traditional Korean house"], [0], {"steps": 2, "guidance_scale": 4.5, "resolution": 32})[
        0
    ]
    assert image.size == (32, 32)


def test_the_oracle_sees_the_stereotype_on_the_web_and_the_truth_in_ccub():
    web = web_corpus(QUICK, 32)
    cultures = [c for c in [*CULTURES, None] for _ in CATEGORIES for _ in range(QUICK.images_per_prompt)]
    assert all(stereotype_oracle(im, c) for (im, _), c in zip(web, cultures) if c is not None)
    for culture, (_, primary, secondary) in CULTURES.items():
        for category in CATEGORIES:
            truth = draw(category, primary, secondary, np.random.default_rng(0), 32)
            assert not stereotype_oracle(truth, culture), (culture, category)
    grey = Image.new("RGB", (32, 32), (128, 128, 128))
    assert set(STEREOTYPES) == set(CULTURES) and isinstance(stereotype_oracle(grey, "KOR"), bool)


def test_the_tiny_base_missing_is_a_configuration_error_naming_the_stage(tmp_path):
    params = write_params(tmp_path / "params.yaml", {"model.base": "tiny"})
    out = scoft_here("generate", "--prompt", "a house", "--out", "x.png", "--base", "--params", params, cwd=tmp_path)
    assert out.returncode == 2 and "run `dvc repro base`" in out.stderr and "Traceback" not in out.stderr


def test_the_default_base_is_the_planted_one():
    from scoft.config import load_params

    assert load_params(ROOT / "params.yaml").model.base == "tiny"
