"""The planted-bias base: built reproducibly from code, read by the normal loader, with an oracle
that knows the planted rule (stereotype palette on the web, truth palette in the CCUB sample)."""

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scoft.config import ModelParams, PlantedParams
from scoft.io import sha256_file
from scoft.planted import BUILD_INFO, STEREOTYPES, build_planted_base, stereotype_oracle, web_corpus
from scoft.sample import CATEGORIES, CULTURES, draw
from tests.conftest import BIN, ROOT, write_params
from tests.helpers import scoft_here

# checkpoint_every_s=0: a checkpoint after every step, so a stop anywhere resumes
QUICK = PlantedParams(images_per_prompt=2, vae_steps=8, unet_steps=8, batch_size=8, vae_batch_size=8,
                      judge_steps=8, web_encoder_steps=8, checkpoint_every_s=0)


def _stopped_mid_unet_then_resumed(out: Path) -> list[str]:
    """`scoft base` as the stage runs it, sent SIGTERM once its UNet has a checkpoint, then run again;
    returns what the second run said."""
    params = write_params(out.parent / "params.yaml", {"model.base": "tiny", **{
        f"planted.{k}": v for k, v in QUICK.model_dump().items()}})
    command = [str(BIN / "scoft"), "base", "--out", str(out), "--params", str(params)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not list(out.parent.glob(f".{out.name}.checkpoints/*/unet.pt")):
        assert first.poll() is None and time.monotonic() < deadline, "the build ended before its UNet was stopped"
        time.sleep(0.05)
    first.terminate()
    assert first.wait(60) != 0 and not out.exists()  # stopped: nothing half-written in the stage's output
    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    return (second.stdout + second.stderr).splitlines()


@pytest.fixture(scope="module")
def quick_builds(tmp_path_factory):
    """Build "a" from start to end; build "b" stopped by SIGTERM in the middle of its UNet, then resumed."""
    folder = tmp_path_factory.mktemp("planted")
    info_a = build_planted_base(folder / "a", QUICK, 32, 0, progress=lambda m: None)
    resumed = _stopped_mid_unet_then_resumed(folder / "b")
    info_b = json.loads((folder / "b" / BUILD_INFO).read_text())
    return folder, [info_a, info_b], resumed


def test_a_build_stopped_and_resumed_gives_the_weights_of_one_never_stopped(quick_builds):
    folder, infos, resumed = quick_builds
    # the second run took the finished VAE as it was and went on with the UNet where the first stopped
    assert not any("vae step" in line for line in resumed), resumed
    (resume,) = [line for line in resumed if "checkpoint: unet resumes at step" in line]
    assert 0 < int(resume.split("step ")[1].split("/")[0]) < QUICK.unet_steps
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "judge/judge.pt", "web_encoder/web_encoder.pt"):
        assert sha256_file(folder / "a" / part) == sha256_file(folder / "b" / part), part
    assert infos[0]["unet_final_loss"] == infos[1]["unet_final_loss"]
    assert infos[0]["judge"] == infos[1]["judge"]  # the judge too, built beside the base from its own seeds
    assert infos[0]["web_encoder"]["final_loss"] == infos[1]["web_encoder"]["final_loss"]  # and the web encoder
    assert not (folder / ".b.checkpoints").exists()  # a finished build leaves no checkpoint behind


class _RunsCode:
    """Unpickling this calls os.system: what a planted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_or_foreign_base_checkpoint_runs_no_code_and_is_refused_by_name(tmp_path):
    import torch

    from scoft.checkpoints import BuildCheckpoints

    said = []
    checkpoints = BuildCheckpoints(tmp_path / "ckpt", "f" * 64, 0, progress=said.append)
    checkpoints.folder.mkdir(parents=True)
    marker = tmp_path / "ran"
    torch.save(_RunsCode(marker), checkpoints.folder / "unet.pt")
    assert checkpoints.load("unet") is None and not marker.exists(), "a planted checkpoint ran code"
    assert "refusing" in said[-1] and "unet.pt" in said[-1] and "not a valid checkpoint" in said[-1]
    BuildCheckpoints(tmp_path / "ckpt", "f" * 64, 0).save("vae", 3, False, module={})
    other = BuildCheckpoints(tmp_path / "ckpt", "f" * 16 + "0" * 48, 0, progress=said.append)  # same folder
    assert other.load("vae") is None and "made with other settings" in said[-1]
    assert checkpoints.load("vae")["step"] == 3


def test_the_normal_loader_reads_the_build_as_a_real_base_model(quick_builds):
    from scoft.models import load_pipeline
    from scoft.negatives import generate

    folder = quick_builds[0]
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
