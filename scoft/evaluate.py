"""Evaluation: the base model and fine-tuned LoRAs on the same prompts and seeds, against held-out CCUB.

Metric: per culture, the mean feature distance D(generated, held-out reference) over held-out
records (prompt = the record's caption), for every model, with bootstrap 95% confidence intervals,
and each LoRA's paired improvement over the base model (positive: closer to the community's images).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scoft.ccub import HELDOUT, Record
from scoft.data import image_transform, load_image_tensor
from scoft.io import atomic_dir, write_json
from scoft.negatives import generate
from scoft.render import markdown_text

BASE = "base"


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


def _summary(dist: dict[str, np.ndarray], idx: np.ndarray, bootstrap: int, seed: int) -> dict:
    return {
        "n": int(idx.sum()),
        "models": {name: _stats(d[idx], bootstrap, seed) for name, d in dist.items()},
        "improvement": {name: _stats(dist[BASE][idx] - d[idx], bootstrap, seed) for name, d in dist.items() if name != BASE},
    }


@torch.no_grad()
def _distances(distance, images: list[Image.Image], refs: torch.Tensor, resolution: int) -> np.ndarray:
    gen = torch.stack([image_transform(resolution)(im) for im in images]).to(refs.device)
    return torch.cat([distance(gen[i:i + 16], refs[i:i + 16]) for i in range(0, len(gen), 16)]).cpu().numpy()


def heldout_records(records: list[Record]) -> list[Record]:
    return [r for r in records if r.split == HELDOUT]


def compare(pipe, loras: dict[str, Path], records: list[Record], ccub_dir, distance, settings: dict,
            samples_per_prompt: int, seed: int, bootstrap: int, progress=print) -> dict:
    """Generate for every held-out caption with the base model, then with each LoRA, same seeds."""
    held = heldout_records(records)
    if not held:
        raise ValueError("no held-out records to evaluate against")
    prompts = [r.caption for r in held for _ in range(samples_per_prompt)]
    seeds = [seed + j for _ in held for j in range(samples_per_prompt)]
    device = next(distance.parameters()).device
    refs = torch.stack([load_image_tensor(Path(ccub_dir) / r.file, settings["resolution"])
                        for r in held for _ in range(samples_per_prompt)]).to(device)

    def sample() -> list[Image.Image]:
        return [im for i in range(0, len(prompts), 8) for im in generate(pipe, prompts[i:i + 8], seeds[i:i + 8], settings)]

    images = {BASE: sample()}
    for name, lora in loras.items():
        pipe.load_lora_weights(str(lora))
        images[name] = sample()
        pipe.unload_lora_weights()
        progress(f"evaluate: {len(prompts)} images from {name}")
    dist = {name: _distances(distance, imgs, refs, settings["resolution"]) for name, imgs in images.items()}
    cultures = np.array([r.culture for r in held for _ in range(samples_per_prompt)])
    metrics = {
        "metric": "feature_distance",
        "overall": _summary(dist, np.ones(len(prompts), dtype=bool), bootstrap, seed),
        "per_culture": {c: _summary(dist, cultures == c, bootstrap, seed) for c in sorted(set(cultures))},
    }
    return {"metrics": metrics, "images": images, "held": held, "prompts": prompts}


def image_grid(rows: list[list[Image.Image]], size: int) -> Image.Image:
    grid = Image.new("RGB", (size * len(rows[0]), size * len(rows)), "white")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((size, size)), (j * size, i * size))
    return grid


def _cell(s: dict) -> str:
    return f"{s['mean']:.4f} [{s['ci95_low']:.4f}, {s['ci95_high']:.4f}]"


def metrics_markdown(metrics: dict, backbone: str) -> list[str]:
    names = list(metrics["overall"]["models"])
    tuned = [n for n in names if n != BASE]
    lines = [f"Feature distance ({backbone}) between generated images and held-out CCUB images for the same "
             "caption (lower is closer); improvement = base - model (higher is better). Same prompts and seeds "
             "for every model; 95% bootstrap intervals.", "",
             "| culture | n | " + " | ".join(names) + " | " + " | ".join(f"improvement {n}" for n in tuned) + " |",
             "|---" * (2 + len(names) + len(tuned)) + "|"]
    for culture, m in [*metrics["per_culture"].items(), ("all", metrics["overall"])]:
        cells = [_cell(m["models"][n]) for n in names] + [_cell(m["improvement"][n]) for n in tuned]
        lines.append(f"| {markdown_text(culture)} | {m['n']} | " + " | ".join(cells) + " |")
    return lines


def write_evaluation(out_dir, metrics_file, result: dict, ccub_dir, backbone: str, size: int = 64) -> None:
    per_prompt = len(result["prompts"]) // len(result["held"])
    refs = [Image.open(Path(ccub_dir) / r.file) for r in result["held"] for _ in range(per_prompt)]
    names = list(result["images"])
    rows = [[ref, *(result["images"][n][i] for n in names)] for i, ref in enumerate(refs)]
    lines = ["# SCoFT evaluation", "", *metrics_markdown(result["metrics"], backbone), "",
             f"Columns of the grid: held-out reference, {', '.join(names)}. Rows, in order:", ""]
    lines += [f"{i + 1}. {markdown_text(p)}" for i, p in enumerate(result["prompts"])]
    lines += ["", f"![reference | {' | '.join(names)}](grid.png)", ""]
    with atomic_dir(out_dir) as tmp:
        image_grid(rows, size).save(tmp / "grid.png")
        (tmp / "report.md").write_text("\n".join(lines), encoding="utf-8")
    write_json(metrics_file, result["metrics"])
