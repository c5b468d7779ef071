"""The default planted-bias base, built once with params.yaml's own settings (about 4 minutes on the
2-core machine): its VAE can draw the community's truth, the base itself draws the stereotype, and
the default SCoFT fine-tune, one LoRA per culture, moves each culture's images from the stereotype
towards the truth. Without these, the evaluation could not tell whether SCoFT moved anything.
(BENCHMARKS.md has the same measured over 3 training seeds and every loss set.)"""

import numpy as np
import pytest
import torch
from PIL import Image

from scoft.config import ModelParams, load_params
from scoft.data import load_image_tensor
from scoft.planted import build_planted_base, stereotype_oracle
from scoft.sample import CATEGORIES, CULTURES, write_sample
from tests.conftest import ROOT
from tests.helpers import ingest_offline

VAE_RMSE_BOUND = 0.16  # on [-1, 1], the CCUB sample at 32 px (measured in BENCHMARKS.md)
# Per culture, about half of what the same LoRAs (seed 1024, +MPC) measured on 2026-12-01 (BENCHMARKS.md):
# KOR distance to its truth palette 0.256 -> 0.242 (its stereotype share stays 1.0), NGA 0.291 -> 0.252
# with its stereotype share 1.0 -> 0.75.
DISTANCE_DROP = {"KOR": 0.007, "NGA": 0.02}
SHARE_DROP = {"KOR": 0.0, "NGA": 0.12}


@pytest.fixture(scope="module")
def default_base(tmp_path_factory):
    params = load_params(ROOT / "params.yaml")
    folder = tmp_path_factory.mktemp("default-base") / "base"
    info = build_planted_base(
        folder, params.planted, params.model.resolution, params.model.seed, progress=lambda m: None
    )
    return folder, info, params


def _as_image(t: torch.Tensor) -> Image.Image:
    return Image.fromarray(((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


def test_the_vae_reconstructs_the_ccub_truth(default_base, tmp_path):
    from diffusers import AutoencoderKL

    folder, info, params = default_base
    assert info["vae_rmse_ccub_sample"] <= VAE_RMSE_BOUND
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    files = sorted((write_sample(tmp_path / "sample") / "train" / "images").glob("*.png"))
    images = torch.stack([load_image_tensor(f, params.model.resolution) for f in files])
    with torch.no_grad():
        decoded = vae.decode(vae.encode(images).latent_dist.sample()).sample  # a point posterior: sample = mean
    cultures = [f.name[:3].upper() for f in files]
    assert not any(stereotype_oracle(_as_image(d), c) for d, c in zip(decoded, cultures))  # the truth is in reach


def test_the_base_draws_each_cultures_stereotype(default_base):
    from scoft.models import load_pipeline
    from scoft.negatives import generate

    folder, _, params = default_base
    pipe = load_pipeline(ModelParams(base=str(folder), resolution=params.model.resolution))
    settings = params.sampling("evaluate")
    for culture, (adjective, _, _) in CULTURES.items():
        prompts = [
            caption.format(adj=adjective) + f", view {i + 1}" for caption, _ in CATEGORIES.values() for i in range(2)
        ]
        images = generate(pipe, prompts * 2, list(range(2 * len(prompts))), settings)
        assert np.mean([stereotype_oracle(im, culture) for im in images]) >= 0.5, culture


def test_per_culture_fine_tunes_move_each_culture_from_the_stereotype_to_the_truth(default_base, tmp_path):
    """The default fine-tune, one LoRA per culture as the paper trains them, on the sample (6 images per
    culture and category, as the planted-bias bench): KOR's and NGA's held-out prompts come nearer the
    truth palette, and NGA's leave the stereotype (KOR's do not yet: BENCHMARKS.md)."""
    from scoft.ccub import HELDOUT, read_manifest
    from scoft.models import load_pipeline
    from scoft.negatives import generate, make_negatives
    from scoft.planted import palette_distance
    from scoft.train import train

    folder, _, params = default_base
    params = params.model_copy(update={"model": ModelParams(base=str(folder), resolution=params.model.resolution)})
    ingest_offline([write_sample(tmp_path / "sample", per_category=6)], tmp_path / "ccub",
                   heldout_fraction=params.ingest.heldout_fraction)
    pipe = load_pipeline(params.model)
    make_negatives(params, tmp_path / "ccub", tmp_path / "negatives", pipe=pipe, progress=lambda m: None)
    evaluation = params.sampling("evaluate")

    def scores(culture: str) -> tuple[float, float]:
        captions = [r.caption for r in read_manifest(tmp_path / "ccub") if r.split == HELDOUT and r.culture == culture]
        images = generate(pipe, [c for c in captions for _ in range(4)], list(range(4)) * len(captions), evaluation)
        return (np.mean([stereotype_oracle(im, culture) for im in images]),
                np.mean([palette_distance(im, CULTURES[culture][1:]) for im in images]))

    for culture in ("KOR", "NGA"):
        base_share, base_distance = scores(culture)
        train(params, tmp_path / "ccub", tmp_path / "negatives", tmp_path / culture, None, progress=lambda m: None,
              pipe=load_pipeline(params.model), culture=culture)
        pipe.load_lora_weights(str(tmp_path / culture))
        tuned_share, tuned_distance = scores(culture)
        pipe.unload_lora_weights()
        assert tuned_share <= base_share - SHARE_DROP[culture], (culture, base_share, tuned_share)
        assert tuned_distance < base_distance - DISTANCE_DROP[culture], (culture, base_distance, tuned_distance)
