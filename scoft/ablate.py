"""Ablations: the paper's four loss sets trained on the same data and seed, evaluated side by side."""

from __future__ import annotations

from pathlib import Path

from scoft.config import LOSS_SETS, Params
from scoft.evaluate import evaluate_loras
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
    return evaluate_loras(params, loras, ccub_dir, out_dir / "report", out_dir / "report" / "metrics.json",
                          progress=progress)
