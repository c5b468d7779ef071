"""Does SCoFT move the planted-bias base away from its stereotype and toward CCUB?

The loss sets (LDM, +M, +MP, +MPC), several training seeds each, on a planted-bias base (models/base,
built by `scoft base`) and the built-in CCUB sample. For every held-out caption and 4 sampling seeds,
the base and each LoRA are scored by the oracle that knows the planted rule: the share of images
nearer the culture's stereotype palette than its truth palette, and the mean distance to the truth
palette; for the prompts naming no culture, the share drawn in the generic lean's stereotype.
Intervals: 95% bootstrap over prompts (the held-out captions), per culture and overall; a LoRA's
improvement over the base is paired by prompt, its values averaged over the training seeds first.

    .venv/bin/python -m bench.planted_bias --base models/base --seeds 3 --steps 300 \
        [--set train.lr=3e-4 ...] [--losses ldm,ldm+mem+perceptual+contrastive] [--json out.json]

Prints a markdown table (BENCHMARKS.md keeps the figures).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from scoft.captions import FallbackCaptioner
from scoft.ccub import HELDOUT, ingest, read_manifest
from scoft.config import LOSS_SETS, load_params, with_overrides
from scoft.evaluate import bootstrap_ci
from scoft.models import load_pipeline, model_fingerprint
from scoft.negatives import generate, plan_negatives, sample_negatives
from scoft.planted import GENERIC_LEAN, STEREOTYPES, palette_distance, stereotype_oracle
from scoft.sample import CATEGORIES, CULTURES, write_sample
from scoft.train import train

NAMES = dict(zip(LOSS_SETS, ["LDM", "+M", "+MP", "+MPC"]))
SAMPLING_SEEDS = [0, 1, 2, 3]
GENERIC = [generic for _, generic in CATEGORIES.values()]


def nearest_palette(image) -> str:
    """Which planted palette an image is drawn in: '<culture> truth' or '<culture> stereotype'."""
    palettes = {f"{c} truth": CULTURES[c][1:] for c in CULTURES} | {f"{c} stereotype": STEREOTYPES[c] for c in STEREOTYPES}
    return min(palettes, key=lambda name: palette_distance(image, palettes[name]))


def score(pipe, held, settings) -> dict:
    """Per held-out prompt: stereotype share and distance to the truth palette over the sampling seeds;
    over the generic prompts: the share of images in the generic lean's stereotype."""
    share, distance = [], []
    for record in held:
        images = generate(pipe, [record.caption] * len(SAMPLING_SEEDS), SAMPLING_SEEDS, settings)
        truth = CULTURES[record.culture][1:]
        share.append(np.mean([stereotype_oracle(im, record.culture) for im in images]))
        distance.append(np.mean([palette_distance(im, truth) for im in images]))
    generic = generate(pipe, [g for g in GENERIC for _ in SAMPLING_SEEDS], SAMPLING_SEEDS * len(GENERIC), settings)
    lean = np.mean([nearest_palette(im) == f"{GENERIC_LEAN} stereotype" for im in generic])
    return {"stereotype_share": np.array(share), "truth_distance": np.array(distance), "generic_lean_share": float(lean)}


def cell(values: np.ndarray) -> str:
    interval = bootstrap_ci(values, 2000, 0)
    if interval is None:
        return f"{values.mean():.3f} (n<2: no interval)"
    return f"{values.mean():.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def prepare(params, work: Path):
    """The CCUB sample ingested, the base's negatives sampled; returns the base pipe and held-out records."""
    write_sample(work / "sample")
    ingest([str(work / "sample")], work / "ccub", heldout_fraction=params.ingest.heldout_fraction,
           max_pixels=10**8, max_rejected_fraction=0.0, captioner=FallbackCaptioner(), progress=lambda m: None)
    pipe = load_pipeline(params.model)
    n = params.negatives
    settings = {"steps": n.steps, "guidance_scale": n.guidance_scale, "resolution": params.model.resolution}
    plan = plan_negatives(read_manifest(work / "ccub"), model_fingerprint(pipe), settings, n.per_image, n.seed)
    sample_negatives(pipe, plan, work / "negatives", n.batch_size, settings, progress=lambda m: None)
    return pipe, [r for r in read_manifest(work / "ccub") if r.split == HELDOUT]


def run_loss_set(params, losses: str, seeds: int, work: Path, pipe, held, eval_settings) -> tuple[dict, list]:
    """Train `seeds` LoRAs of one loss set and score each; per-prompt values averaged over the seeds."""
    scores, seconds = [], []
    for seed in range(seeds):
        tp = params.train.model_copy(update={"losses": losses, "seed": params.train.seed + seed, "checkpoint_every": 0})
        run = work / f"{losses}-{seed}"
        started = time.monotonic()
        train(params.model_copy(update={"train": tp}), work / "ccub", work / "negatives", run, None,
              progress=lambda m: None, pipe=load_pipeline(params.model))
        seconds.append(time.monotonic() - started)
        pipe.load_lora_weights(str(run))
        scores.append(score(pipe, held, eval_settings))
        pipe.unload_lora_weights()
    averaged = {k: np.mean([s[k] for s in scores], axis=0) for k in scores[0]}
    averaged["generic_lean_per_seed"] = [s["generic_lean_share"] for s in scores]
    return averaged, seconds


def table(base: dict, results: dict, cultures: np.ndarray) -> list[str]:
    lines = ["| model | culture | stereotype share (oracle, lower is better) | distance to truth palette | "
             "improvement over base (distance, paired) |", "|---|---|---|---|---|"]
    for name, values in [("base", base), *results.items()]:
        for culture in [*CULTURES, "all"]:
            idx = np.ones(len(cultures), bool) if culture == "all" else cultures == culture
            gain = cell(base["truth_distance"][idx] - values["truth_distance"][idx]) if name != "base" else "-"
            lines.append(f"| {name} | {culture} | {cell(values['stereotype_share'][idx])} | "
                         f"{cell(values['truth_distance'][idx])} | {gain} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="models/base", help="the planted-bias base folder (scoft base)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per loss set")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default train.max_steps)")
    parser.add_argument("--losses", default=",".join(LOSS_SETS), help="comma-separated loss sets")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="params override")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--json", default=None, help="also write the per-prompt results here")
    args = parser.parse_args()
    overrides = [f"model.base={args.base}", *args.set] + ([f"train.max_steps={args.steps}"] if args.steps else [])
    params = with_overrides(load_params(args.params), overrides)
    work = Path(tempfile.mkdtemp(prefix="scoft-planted-bench-"))
    try:
        pipe, held = prepare(params, work)
        e = params.evaluate
        eval_settings = {"steps": e.steps, "guidance_scale": e.guidance_scale, "resolution": params.model.resolution}
        base = score(pipe, held, eval_settings)
        results, seconds = {}, {}
        for losses in args.losses.split(","):
            results[NAMES[losses]], seconds[NAMES[losses]] = run_loss_set(params, losses, args.seeds, work, pipe,
                                                                         held, eval_settings)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cultures = np.array([r.culture for r in held])
    print(f"base {args.base}; held-out prompts: {len(held)} "
          f"({', '.join(f'{c} {int((cultures == c).sum())}' for c in CULTURES)}), {len(SAMPLING_SEEDS)} sampling "
          f"seeds each, {args.seeds} training seed(s) per loss set; overrides: {', '.join(overrides)}")
    print("\n".join(["", *table(base, results, cultures), ""]))
    print("generic prompts drawn in the generic lean's stereotype (oracle): base "
          f"{base['generic_lean_share']:.2f}; " + "; ".join(
              f"{n} {np.mean(v['generic_lean_per_seed']):.2f}" for n, v in results.items()))
    print("training seconds per run: " + ", ".join(f"{n} {np.mean(v):.0f}" for n, v in seconds.items()))
    if args.json:
        as_lists = lambda d: {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in d.items()}  # noqa: E731
        Path(args.json).write_text(json.dumps({"overrides": overrides, "cultures": cultures.tolist(),
                                               "base": as_lists(base), "seconds": seconds,
                                               "models": {n: as_lists(v) for n, v in results.items()}}, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
