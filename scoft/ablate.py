"""Ablations: the paper's four loss sets trained on the same data and seed, evaluated side by side."""

from __future__ import annotations

from pathlib import Path

from scoft.ccub import read_manifest
from scoft.config import LOSS_SETS, Params
from scoft.evaluate import compare, write_evaluation
from scoft.features import build_distance
from scoft.models import load_pipeline, pick_device
from scoft.train import train

NAMES = {"ldm": "LDM", "ldm+mem": "+M", "ldm+mem+perceptual": "+MP", "ldm+mem+perceptual+contrastive": "+MPC"}


def ablate(params: Params, ccub_dir, negatives_dir, out_dir, progress=print, max_steps: int | None = None) -> dict:
    """Train one LoRA per loss set into out_dir/<set>/, then evaluate all of them and the base model
    on the same held-out prompts and seeds; the report and metrics go to out_dir/report/."""
    out_dir = Path(out_dir)
    loras = {}
    for losses in LOSS_SETS:
        variant = params.model_copy(update={"train": params.train.model_copy(update={"losses": losses})})
        progress(f"ablate: training {NAMES[losses]} ({losses})")
        train(variant, ccub_dir, negatives_dir, out_dir / losses, out_dir / losses / "log", progress=progress,
              max_steps=max_steps, checkpoint_every=0)
        loras[NAMES[losses]] = out_dir / losses
    device = pick_device()
    pipe = load_pipeline(params.model).to(device)
    distance = build_distance(params.features.evaluation, params.features, params.model.seed).to(device)
    e = params.evaluate
    result = compare(pipe, loras, read_manifest(ccub_dir), ccub_dir, distance,
                     {"steps": e.steps, "guidance_scale": e.guidance_scale, "resolution": params.model.resolution},
                     e.samples_per_prompt, e.seed, e.bootstrap, progress=progress)
    write_evaluation(out_dir / "report", out_dir / "report" / "metrics.json", result, ccub_dir, params.features.evaluation)
    return result["metrics"]
