"""Evaluation: the base and the fine-tuned model on the same prompts and seeds, against held-out CCUB.

Metric: per culture, the mean feature distance D(generated, held-out reference) over held-out
records (prompt = the record's caption), for both models, with bootstrap 95% confidence intervals
and the paired difference (lower is closer to the community's images).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scoft.ccub import HELDOUT, Record
from scoft.data import load_image_tensor
from scoft.features import FeatureDistance
from scoft.io import atomic_dir, write_json
from scoft.negatives import generate


def bootstrap_ci(values: np.ndarray, n: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean."""
    if len(values) < 2:
        return float(values.mean()), float(values.mean())
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def _stats(values: np.ndarray, n: int, seed: int) -> dict:
    lo, hi = bootstrap_ci(values, n, seed)
    return {"mean": float(values.mean()), "ci95_low": lo, "ci95_high": hi}


@torch.no_grad()
def _distances(distance: FeatureDistance, images: list[Image.Image], refs: torch.Tensor, resolution: int) -> np.ndarray:
    from scoft.data import image_transform

    gen = torch.stack([image_transform(resolution)(im) for im in images]).to(refs.device)
    return distance(gen, refs).cpu().numpy()


def heldout_records(records: list[Record]) -> list[Record]:
    return [r for r in records if r.split == HELDOUT]


def compare(pipe, lora_dir, records: list[Record], ccub_dir, distance: FeatureDistance, settings: dict,
            samples_per_prompt: int, seed: int, bootstrap: int, progress=print) -> dict:
    """Generate for every held-out caption with the base model, then with the LoRA, same seeds."""
    held = heldout_records(records)
    if not held:
        raise ValueError("no held-out records to evaluate against")
    prompts = [r.caption for r in held for _ in range(samples_per_prompt)]
    seeds = [seed + j for _ in held for j in range(samples_per_prompt)]
    refs = torch.stack([load_image_tensor(Path(ccub_dir) / r.file, settings["resolution"])
                        for r in held for _ in range(samples_per_prompt)])
    device = next(distance.parameters()).device
    refs = refs.to(device)
    images = {}
    for name in ("base", "scoft"):
        if name == "scoft":
            pipe.load_lora_weights(str(lora_dir))
        out = []
        for start in range(0, len(prompts), 8):
            out += generate(pipe, prompts[start : start + 8], seeds[start : start + 8], settings)
        images[name] = out
        progress(f"evaluate: {len(out)} images from the {name} model")
    dist = {name: _distances(distance, imgs, refs, settings["resolution"]) for name, imgs in images.items()}
    cultures = [r.culture for r in held for _ in range(samples_per_prompt)]
    per_culture = {}
    for culture in sorted(set(cultures)):
        idx = np.array([c == culture for c in cultures])
        per_culture[culture] = {
            "n": int(idx.sum()),
            "base": _stats(dist["base"][idx], bootstrap, seed),
            "scoft": _stats(dist["scoft"][idx], bootstrap, seed),
            "improvement": _stats(dist["base"][idx] - dist["scoft"][idx], bootstrap, seed),
        }
    overall = {"n": len(prompts), "base": _stats(dist["base"], bootstrap, seed),
               "scoft": _stats(dist["scoft"], bootstrap, seed),
               "improvement": _stats(dist["base"] - dist["scoft"], bootstrap, seed)}
    return {"metrics": {"metric": "feature_distance", "overall": overall, "per_culture": per_culture},
            "images": images, "held": held, "prompts": prompts}


def image_grid(rows: list[list[Image.Image]], size: int) -> Image.Image:
    grid = Image.new("RGB", (size * len(rows[0]), size * len(rows)), "white")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((size, size)), (j * size, i * size))
    return grid


def _report_markdown(metrics: dict, prompts: list[str], backbone: str) -> str:
    lines = ["# SCoFT evaluation", "",
             f"Feature distance ({backbone}) between generated images and held-out CCUB images for the same "
             "caption (lower is closer). Same prompts and seeds for both models; 95% bootstrap intervals.", "",
             "| culture | n | base | SCoFT | improvement (base - SCoFT) |", "|---|---|---|---|---|"]
    rows = list(metrics["per_culture"].items()) + [("all", metrics["overall"])]
    for culture, m in rows:
        cell = lambda s: f"{s['mean']:.4f} [{s['ci95_low']:.4f}, {s['ci95_high']:.4f}]"  # noqa: E731
        lines.append(f"| {culture} | {m['n']} | {cell(m['base'])} | {cell(m['scoft'])} | {cell(m['improvement'])} |")
    lines += ["", "Columns of the grid: held-out reference, base model, SCoFT. Rows, in order:", ""]
    lines += [f"{i + 1}. {p}" for i, p in enumerate(prompts)]
    lines += ["", "![reference | base | SCoFT](grid.png)", ""]
    return "\n".join(lines)


def write_evaluation(out_dir, metrics_file, result: dict, ccub_dir, backbone: str, size: int = 64) -> None:
    refs = [Image.open(Path(ccub_dir) / r.file) for r in result["held"] for _ in range(len(result["prompts"]) // len(result["held"]))]
    rows = [[ref, b, s] for ref, b, s in zip(refs, result["images"]["base"], result["images"]["scoft"])]
    with atomic_dir(out_dir) as tmp:
        image_grid(rows, size).save(tmp / "grid.png")
        (tmp / "report.md").write_text(_report_markdown(result["metrics"], result["prompts"], backbone), encoding="utf-8")
    write_json(metrics_file, result["metrics"])
