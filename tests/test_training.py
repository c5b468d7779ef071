"""SCoFT training: loss sets, backbones, any batch size and timestep, resume after SIGKILL, accelerate."""

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from scoft.config import LOSS_SETS, FeatureParams
from scoft.features import BACKBONES, build_distance
from scoft.io import sha256_file
from scoft.paths import LORA_FILE
from scoft.train import Frozen, add_lora, collate, scoft_losses, train
from tests.conftest import BIN, unit_params, write_params
from tests.helpers import TINY_SAMPLING


def _params(**train_overrides):
    base = unit_params()
    return base.model_copy(update={"train": base.train.model_copy(update=train_overrides)})


@pytest.fixture(scope="module")
def model_parts():
    from scoft.models import load_pipeline, training_scheduler

    params = _params()
    pipe = load_pipeline(params.model)
    frozen = Frozen(pipe.vae.requires_grad_(False), pipe.text_encoder.requires_grad_(False), pipe.tokenizer,
                    training_scheduler(pipe), build_distance("lpips-alex", params.features),
                    build_distance("dinov2", params.features))
    add_lora(pipe.unet, 4, 4, params.train.lora_targets)
    return pipe.unet, frozen


@pytest.mark.parametrize("losses", LOSS_SETS)
@pytest.mark.parametrize("batch_size,t", [(1, 0), (3, 999), (3, None)])
def test_every_loss_set_any_batch_size_and_timestep(model_parts, prepared, losses, batch_size, t):
    from scoft.data import CCUBTrainSet

    unet, frozen = model_parts
    unet.zero_grad(set_to_none=True)
    params = _params(losses=losses)
    dataset = CCUBTrainSet(prepared[0], prepared[1], 32, 2)
    batch = collate([dataset[i] for i in range(batch_size)])
    timesteps = None if t is None else torch.full((batch_size,), t)
    out = scoft_losses(unet, frozen, batch, params, True, "cpu", torch.Generator().manual_seed(0), timesteps)
    expected = {"ldm", "total"} | {"memorization" for _ in [1] if "mem" in losses} \
        | {"perceptual" for _ in [1] if "perceptual" in losses} \
        | ({"contrastive", "contrastive_positive", "contrastive_negative"} if "contrastive" in losses else set())
    assert set(out) == expected
    assert all(torch.isfinite(v) for v in out.values())
    w = params.train.loss_weights
    weights = {"ldm": w.ldm, "memorization": w.memorization, "perceptual": w.perceptual, "contrastive": w.contrastive}
    assert out["total"].item() == pytest.approx(sum(weights[k] * out[k].item() for k in weights if k in out), rel=1e-6)
    out["total"].backward()
    grads = {n: p.grad for n, p in unet.named_parameters() if p.grad is not None}
    assert grads and all("lora" in n for n in grads)  # only the adapters learn
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_caption_dropout_replaces_captions_with_the_empty_prompt(model_parts, prepared):
    """train.empty_prompt_share: the LDM loss of a batch with (almost) every caption dropped is the loss
    of the same batch with empty captions, same draws otherwise; without dropout the captions count."""
    from scoft.data import CCUBTrainSet

    unet, frozen = model_parts
    batch = collate([CCUBTrainSet(prepared[0], prepared[1], 32, 2)[i] for i in range(3)])
    empty = {**batch, "caption": [""] * 3}

    def ldm(share: float, b: dict) -> float:
        params = _params(losses="ldm", empty_prompt_share=share)
        with torch.no_grad():
            return scoft_losses(unet, frozen, b, params, False, "cpu", torch.Generator().manual_seed(0))["ldm"].item()

    assert ldm(0.999, batch) == pytest.approx(ldm(0.0, empty), rel=1e-6)
    assert ldm(0.0, batch) != pytest.approx(ldm(0.0, empty), rel=1e-6)


def test_rows_whose_caption_was_dropped_train_through_the_ldm_loss_only(model_parts, prepared):
    """On a caption-dropped row, L_M would pull the unconditional prediction toward the generic
    caption's and the pixel losses would see an unguided estimate with the guidance scale on its
    gradient: every row dropped, only L_LDM is left; none dropped, the others count."""
    from scoft.data import CCUBTrainSet

    unet, frozen = model_parts
    batch = collate([CCUBTrainSet(prepared[0], prepared[1], 32, 2)[i] for i in range(2)])
    full = "ldm+mem+perceptual+contrastive"

    def losses(share: float) -> dict:
        params = _params(losses=full, empty_prompt_share=share)
        with torch.no_grad():
            return scoft_losses(unet, frozen, batch, params, True, "cpu", torch.Generator().manual_seed(0))

    every = losses(0.999)
    assert every["memorization"].item() == every["perceptual"].item() == every["contrastive"].item() == 0.0
    w = _params().train.loss_weights
    assert every["total"].item() == pytest.approx(w.ldm * every["ldm"].item(), rel=1e-6)
    none = losses(0.0)
    assert none["memorization"].item() > 0 and none["perceptual"].item() > 0


@pytest.fixture(scope="module")
def quick_judge(tmp_path_factory) -> str:
    """A planted judge trained for a few steps: what planted-judge loads (the base stage builds the real one)."""
    from scoft.judge import build_judge

    folder = tmp_path_factory.mktemp("judge") / "judge"
    build_judge(folder, steps=5, progress=lambda m: None)
    return str(folder)


@pytest.fixture(scope="module")
def quick_web_encoder(tmp_path_factory) -> str:
    """A web encoder pretrained for a few steps: what web-ssl loads (the base stage builds the real one)."""
    from scoft.web_encoder import build_web_encoder

    folder = tmp_path_factory.mktemp("web") / "web_encoder"
    build_web_encoder(folder, torch.rand(16, 3, 32, 32) * 2 - 1, steps=3, progress=lambda m: None)
    return str(folder)


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_gives_a_differentiable_per_sample_distance(name, request):
    judge = request.getfixturevalue("quick_judge") if name.startswith("planted-") else "models/base/judge"
    web = request.getfixturevalue("quick_web_encoder") if name.startswith("web-") else "models/base/web_encoder"
    d = build_distance(name, FeatureParams(judge=judge, web_encoder=web))
    a = torch.rand(2, 3, 32, 32, requires_grad=True) * 2 - 1
    b = torch.rand(2, 3, 32, 32) * 2 - 1
    out = d(a, b)
    assert out.shape == (2,) and torch.isfinite(out).all()
    out.sum().backward()
    pairs = d.pairwise(a.detach(), torch.stack([b, b.flip(0)], dim=1))
    assert pairs.shape == (2, 2)
    assert not any(p.requires_grad for p in d.parameters())


@pytest.mark.parametrize("kind", ["dinov2", "clip"])
def test_transformers_backbones_load_from_a_local_folder(kind, tmp_path):
    from scoft.features import vision_model

    vision_model(kind, "tiny", seed=3).save_pretrained(tmp_path / kind)
    params = FeatureParams(weights={kind: str(tmp_path / kind)})
    tiny = build_distance(kind, FeatureParams(), seed=3)
    loaded = build_distance(kind, params)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(tiny.embed(x), loaded.embed(x), atol=1e-6)


def test_gradient_checkpointing_gives_the_same_lora(prepared, tmp_path):
    from safetensors.torch import load_file

    for flag in (False, True):
        train(_params(gradient_checkpointing=flag, max_steps=2, pixel_loss_every=1), *prepared,
              tmp_path / str(flag), tmp_path / f"log{flag}", progress=lambda m: None)
    a, b = load_file(tmp_path / "False" / LORA_FILE), load_file(tmp_path / "True" / LORA_FILE)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_bf16_training_with_pixel_losses_learns(prepared, tmp_path):
    """Mixed precision (autocast) around the pixel step, whose later sampler calls run in inference mode:
    the step's tensors must still be usable by autograd, and the LoRA must move. A process of its own:
    accelerate keeps one mixed-precision setting per process, and this one's earlier trainings set "no"."""
    from safetensors.torch import load_file

    params_file = write_params(tmp_path / "params.yaml", {
        "train.mixed_precision": "bf16", "train.pixel_loss_every": 1, "train.sampler": "dpm-solver++",
        "train.sampler_steps": 3})
    out = subprocess.run(_train_command(params_file, *prepared, tmp_path / "lora", "--max-steps", "2"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "lora" / "training.json").read_text())
    assert math.isfinite(summary["final_losses"]["contrastive"])  # the pixel losses were computed
    assert summary["precision"] == {"mixed": "bf16", "loss_networks": ["bfloat16"]}  # LPIPS and D in bf16 too
    lora = load_file(tmp_path / "lora" / LORA_FILE)
    up = [v for k, v in lora.items() if "lora.up" in k]  # up (B) starts at 0: nonzero, it learned
    assert up and all(v.abs().max() > 0 for v in up)


def _train_command(params_file, ccub, negatives, out, *extra):
    return [str(BIN / "scoft"), "train", "--params", str(params_file), "--ccub", str(ccub), "--negatives",
            str(negatives), "--output", str(out), "--log-dir", str(out.parent / f"{out.name}-log"), *extra]


def test_sigkill_after_a_checkpoint_then_rerun_gives_a_bit_identical_lora(prepared, tmp_path):
    params_file = write_params(tmp_path / "params.yaml", {"train.pixel_loss_every": 2})
    args = ("--max-steps", "8", "--checkpoint-every", "2")
    # The uninterrupted run goes alongside the one to be killed (each spends most of its time importing).
    straight_log = tmp_path / "straight.log"
    with straight_log.open("w") as log:
        straight = subprocess.Popen(_train_command(params_file, *prepared, tmp_path / "straight", *args),
                                    stdout=log, stderr=subprocess.STDOUT)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_command(params_file, *prepared, out, *args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(out.glob("checkpoints/*/step-000000004.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint at step 4"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / LORA_FILE).exists()
    resumed = subprocess.run(
        _train_command(params_file, *prepared, out, *args), capture_output=True, text=True, timeout=300
    )
    assert straight.wait(300) == 0, straight_log.read_text()
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 4/8" in resumed.stdout or "resumed from step 6/8" in resumed.stdout
    assert sha256_file(out / LORA_FILE) == sha256_file(tmp_path / "straight" / LORA_FILE)
    assert not (out / "checkpoints").exists()  # a finished run keeps only the LoRA
    assert json.loads((out / "training.json").read_text())["resumed_from"] in (4, 6)


class _RunsCode:
    """Unpickling this calls os.system: what a planted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_planted_checkpoint_runs_no_code_and_is_refused_by_name(prepared, tmp_path):
    from scoft.train import checkpoint_folder, run_fingerprint

    params = _params(max_steps=2)
    out, marker = tmp_path / "lora", tmp_path / "code-ran"
    folder = checkpoint_folder(out, run_fingerprint(params, *prepared, 2, 1))
    folder.mkdir(parents=True)
    torch.save({"fingerprint": "x", "payload": _RunsCode(marker)}, folder / "step-000000009.pt")
    torch.save(_RunsCode(marker), out / "checkpoints" / "step-000000001.pt")  # the old layout's place
    lines = []
    summary = train(params, *prepared, out, tmp_path / "log", progress=lines.append)
    assert not marker.exists(), "a planted checkpoint ran code"
    assert summary["resumed_from"] is None
    assert any("refusing" in m and "step-000000009.pt" in m and "not a valid checkpoint" in m for m in lines), lines
    assert any("ignoring" in m and "step-000000001.pt" in m for m in lines), lines


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_valid_one(prepared, tmp_path):
    import shutil

    params = _params(max_steps=8)
    straight = tmp_path / "straight"
    snapshot = tmp_path / "left-by-a-crash"

    def snapshot_at_step_6(line):  # what a crash right after the step-6 checkpoint leaves on disk
        if line.startswith("train: checkpoint at step 6 in "):
            shutil.copytree(line.rsplit(" in ", 1)[1], snapshot / Path(line).name)

    train(params, *prepared, straight, tmp_path / "log0", progress=snapshot_at_step_6, checkpoint_every=2)
    (snapshot,) = snapshot.iterdir()  # named after the settings' fingerprint
    assert sorted(p.name for p in snapshot.iterdir()) == ["step-000000004.pt", "step-000000006.pt"]
    out = tmp_path / "lora"
    folder = out / "checkpoints" / snapshot.name
    shutil.copytree(snapshot, folder)
    latest = folder / "step-000000006.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # truncated by a full disk
    foreign = folder / "step-000000007.pt"  # a checkpoint of other settings in the way
    torch.save({**torch.load(folder / "step-000000004.pt", weights_only=True), "fingerprint": "other"}, foreign)
    other_settings = out / "checkpoints" / "0123456789abcdef"
    shutil.copytree(snapshot, other_settings)

    lines = []
    summary = train(params, *prepared, out, tmp_path / "log1", progress=lines.append, checkpoint_every=2)
    assert summary["resumed_from"] == 4, lines[:5]
    assert any("refusing" in m and "step-000000006.pt" in m and "not a valid checkpoint" in m for m in lines), lines
    assert any("refusing" in m and "step-000000007.pt" in m and "other settings" in m for m in lines), lines
    assert sha256_file(out / LORA_FILE) == sha256_file(straight / LORA_FILE)
    assert not folder.exists() and sorted(p.name for p in other_settings.iterdir()) == [
        "step-000000004.pt", "step-000000006.pt"]  # its own cleaned up, the other settings' kept


def test_two_cpu_processes_through_accelerate_launch(prepared, tmp_path):
    params_file = write_params(tmp_path / "params.yaml", {"train.num_processes": 2, "train.batch_size": 1})
    out = tmp_path / "lora"
    done = subprocess.run(_train_command(params_file, *prepared, out, "--max-steps", "2"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "2 processes through accelerate launch" in done.stdout
    assert json.loads((out / "training.json").read_text())["processes"] == 2
    assert (out / LORA_FILE).is_file()


def test_ablate_trains_the_four_loss_sets_and_reports_them_side_by_side(prepared, tmp_path):
    from scoft.ablate import NAMES, ablate

    params = _params()  # the evaluation at a fraction of its default cost: the test reads its structure
    params = params.model_copy(update={"evaluate": params.evaluate.model_copy(
        update={"samples_per_prompt": 2, "bootstrap": 100, "steps": 4})})
    metrics = ablate(params, *prepared, tmp_path, progress=lambda m: None, max_steps=2)
    assert list(metrics["overall"]["models"]) == ["base", *NAMES.values()]
    for losses in LOSS_SETS:
        summary = json.loads((tmp_path / losses / "training.json").read_text())
        assert summary["steps"] == 2 and set(summary["final_losses"]) >= {"ldm", "total"}
        assert ("memorization" in summary["final_losses"]) == ("mem" in losses)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| base | LDM | +M | +MP | +MPC | improvement LDM |" in report
    assert json.loads((tmp_path / "report" / "metrics.json").read_text()) == metrics


def test_gradient_accumulation_counts_optimizer_steps(prepared, tmp_path):
    lines = []
    summary = train(_params(gradient_accumulation_steps=2, max_steps=2, batch_size=1), *prepared, tmp_path / "lora",
                    tmp_path / "log", progress=lines.append)
    assert (summary["steps"], summary["micro_steps"]) == (2, 4)
    assert [m.split()[1] for m in lines if m.startswith("step ")] == ["1/2", "2/2"]


def test_pixel_losses_are_logged_whenever_computed_under_gradient_accumulation(prepared, tmp_path):
    lines = []
    train(_params(gradient_accumulation_steps=4, pixel_loss_every=10, max_steps=3, batch_size=1), *prepared,
          tmp_path / "lora", tmp_path / "log", progress=lines.append)
    steps = [m for m in lines if m.startswith("step ")]
    # micro-steps 0 and 10 compute the pixel losses: they fall in optimizer steps 1 and 3 (micro 0-3, 8-11)
    assert ["perceptual=" in m and "contrastive=" in m for m in steps] == [True, False, True]
    logged = (tmp_path / "log/plots/metrics/train/perceptual.tsv").read_text().split()
    assert logged[0] == "step" and logged[2::2] == ["0", "2"]  # dvclive's steps count from 0


def test_one_lora_per_culture_trains_on_that_cultures_records_and_evaluates_its_prompts(prepared, tmp_path):
    """The paper's setting: a culture's LoRA sees only its records, and the evaluation draws each
    culture's prompts with that culture's own LoRA (the base where a culture has none, said so)."""
    from scoft.ccub import HELDOUT, TRAIN, read_manifest
    from scoft.evaluate import compare
    from scoft.models import load_pipeline

    ccub, negatives = prepared
    records = read_manifest(ccub)
    summary = train(_params(max_steps=2, lr=1e-2), ccub, negatives, tmp_path / "KOR", None, progress=lambda m: None,
                    culture="KOR")
    assert summary["train_records"] == sum(r.culture == "KOR" and r.split == TRAIN for r in records)
    assert summary["culture"] == "KOR"
    with pytest.raises(ValueError, match="no training records of culture CHN"):
        train(_params(max_steps=1), ccub, negatives, tmp_path / "CHN", None, progress=lambda m: None, culture="CHN")

    params = _params()
    settings = TINY_SAMPLING
    result = compare(load_pipeline(params.model), {"scoft": {"KOR": tmp_path / "KOR"}}, records, ccub,
                     build_distance("colour-histogram", params.features), settings, 1, 0, 20, progress=lambda m: None)
    held = [r.culture for r in records if r.split == HELDOUT]
    as_bytes = [[im.tobytes() for im in result["images"][name]] for name in ("base", "scoft")]
    changed = [a != b for a, b in zip(*as_bytes)]
    assert changed == [c == "KOR" for c in held]  # KOR's LoRA drew KOR's prompts; the others are the base's
    assert [n for n in result["metrics"]["notes"] if "no LoRA" in n] == [
        f"scoft: no LoRA for {c}; its prompts are drawn by the base model" for c in sorted(set(held) - {"KOR"})]
    assert "scoft[KOR]" in result["metrics"]["generic_prompts"]["models"]
