"""The model loader (tiny profile and a local save_pretrained folder), negatives and SCoFT training."""

import json

import pytest
from diffusers import StableDiffusionPipeline

from scoft.ccub import read_manifest
from scoft.config import ModelParams
from scoft.models import load_pipeline, model_fingerprint, tiny_pipeline
from scoft.negatives import generate, plan_negatives, read_negative_index, sample_negatives
from scoft.paths import LORA_FILE
from scoft.train import train
from tests.conftest import TEST_BASE, unit_params
from tests.helpers import TINY_SAMPLING, ingest_offline

SETTINGS = TINY_SAMPLING


def test_tiny_profile_is_deterministic_and_the_seed_matters():
    assert model_fingerprint(tiny_pipeline(32, seed=0)) == model_fingerprint(tiny_pipeline(32, seed=0))
    assert model_fingerprint(tiny_pipeline(32, seed=0)) != model_fingerprint(tiny_pipeline(32, seed=1))


def test_local_folder_loads_through_the_same_loader_with_the_same_weights(tmp_path):
    tiny = load_pipeline(ModelParams(base=TEST_BASE, resolution=32))
    tiny.save_pretrained(tmp_path / "base")
    loaded = load_pipeline(ModelParams(base=str(tmp_path / "base"), resolution=32))
    assert model_fingerprint(loaded) == model_fingerprint(tiny)
    a = generate(tiny, ["a house"], [3], SETTINGS)[0]
    b = generate(loaded, ["a house"], [3], SETTINGS)[0]
    assert a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def trained(sample_dir, tmp_path_factory):
    base = unit_params()
    train_params = base.train.model_copy(update={"max_steps": 3, "pixel_loss_every": 1, "batch_size": 3})
    params = base.model_copy(update={"train": train_params})
    work = tmp_path_factory.mktemp("train")
    ingest_offline([sample_dir], work / "ccub")
    records = read_manifest(work / "ccub")
    pipe = load_pipeline(params.model)
    plan = plan_negatives(records, model_fingerprint(pipe), SETTINGS, per_image=2, base_seed=1)
    counts = sample_negatives(pipe, plan, work / "negatives", batch_size=16, settings=SETTINGS, progress=lambda m: None)
    lines = []
    summary = train(params, work / "ccub", work / "negatives", work / "lora", work / "log", progress=lines.append)
    return {"work": work, "params": params, "summary": summary, "lines": lines, "counts": counts, "plan": plan}


def test_negatives_k_per_training_record_with_their_settings(trained):
    work = trained["work"]
    train_ids = {r.id for r in read_manifest(work / "ccub") if r.split == "train"}
    index = read_negative_index(work / "negatives")
    assert trained["counts"]["sampled"] == len(index) == 2 * len(train_ids)
    assert {row["record_id"] for row in index} == train_ids
    assert all(row["settings"] == SETTINGS and row["model_fingerprint"] for row in index)
    assert all((work / "negatives" / row["file"]).is_file() for row in index)


def test_negatives_are_reused_when_nothing_changed(trained):
    pipe = load_pipeline(trained["params"].model)
    counts = sample_negatives(pipe, trained["plan"], trained["work"] / "negatives", 16, SETTINGS, lambda m: None)
    assert counts["sampled"] == 0 and counts["reused"] == len(trained["plan"])


def test_training_logs_every_loss_separately(trained):
    first = trained["lines"][0]
    for name in ("ldm=", "memorization=", "perceptual=", "contrastive=", "contrastive_positive=",
                 "contrastive_negative=", "total=", "eta="):
        assert name in first
    assert trained["lines"][-1].startswith("step 3/3")
    logged = json.loads((trained["work"] / "log" / "metrics.json").read_text())["train"]
    assert {"ldm", "memorization", "perceptual", "contrastive", "total"} <= set(logged)


def test_lora_loads_into_plain_diffusers_and_changes_the_output(trained, tmp_path):
    lora = trained["work"] / "lora"
    assert (lora / LORA_FILE).is_file()
    base = load_pipeline(trained["params"].model)
    base.save_pretrained(tmp_path / "base")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    before = generate(pipe, ["a Korean house"], [0], SETTINGS)[0]
    pipe.load_lora_weights(str(lora))
    after = generate(pipe, ["a Korean house"], [0], SETTINGS)[0]
    assert before.tobytes() != after.tobytes()


# Known defects, open (issue 32's eighteenth-session note): save_lora converts PEFT's keys to diffusers' older
# names, which renames attention projections only, so diffusers drops the attention weights of a file that
# also holds other targets; and it saves no adapter config, so lora_alpha other than the rank loads at the
# wrong scale. A fix (PEFT keys with the config as metadata) made the bit-identical resume tests fail on a
# fresh clone for a reason not found in time, and was taken back. strict: these fail the suite once fixed.
KNOWN_DEFECT = pytest.mark.xfail(strict=True, reason="save_lora's key conversion and missing adapter config")


@pytest.mark.parametrize("targets, rank, alpha", [
    (["to_q", "to_k", "to_v", "to_out.0"], 4, 4),  # params.yaml's
    pytest.param(["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"], 4, 4,
                 marks=KNOWN_DEFECT),  # beyond attention
    pytest.param(["to_q", "to_k", "to_v", "to_out.0"], 4, 8, marks=KNOWN_DEFECT),  # alpha apart from the rank
])
def test_a_saved_lora_loads_into_diffusers_as_it_was_trained(targets, rank, alpha, tmp_path):
    """Whatever train.lora_targets, lora_rank and lora_alpha say, plain diffusers' load_lora_weights gives
    the UNet that training ended with. (Today only for attention targets at alpha = rank: see KNOWN_DEFECT.)"""
    import torch

    from scoft.train import add_lora, save_lora

    trained = load_pipeline(ModelParams(base=TEST_BASE, resolution=32))
    lora = add_lora(trained.unet, rank, alpha, targets)
    torch.manual_seed(0)
    for p in lora:  # as if trained: peft starts B at zero, which would make any loader look right
        p.data.normal_(0, 0.1)
    save_lora(trained.unet, tmp_path, {"steps": 0})
    loaded = load_pipeline(ModelParams(base=TEST_BASE, resolution=32))
    loaded.load_lora_weights(str(tmp_path))
    untouched = load_pipeline(ModelParams(base=TEST_BASE, resolution=32)).unet
    latents, t, text = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        want, got, base = (unet(latents, t, text).sample for unet in (trained.unet, loaded.unet, untouched))
    assert not torch.allclose(want, base, atol=1e-3)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
