"""Does SCoFT move the planted-bias base away from its stereotype and toward CCUB?

The four loss sets (LDM, +M, +MP, +MPC), several training seeds each, on the planted default
(models/base, built by `scoft base`) and the built-in CCUB sample. For every held-out caption and
4 sampling seeds, the base and each LoRA are scored by the oracle that knows the planted rule:
the share of images nearer the culture's stereotype palette than its truth palette, and the mean
distance to the truth palette. Intervals: 95% bootstrap over prompts (the held-out captions), per
culture and overall; a LoRA's improvement over the base is paired by prompt.

    .venv/bin/python -m bench.planted_bias --base models/base --seeds 3 --steps 300

Prints a markdown table (BENCHMARKS.md keeps the figures).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from scoft.captions import FallbackCaptioner
from scoft.ccub import HELDOUT, ingest, read_manifest
from scoft.config import LOSS_SETS, ModelParams, load_params
from scoft.evaluate import bootstrap_ci
from scoft.models import load_pipeline, model_fingerprint
from scoft.negatives import generate, plan_negatives, sample_negatives
from scoft.planted import palette_distance, stereotype_oracle
from scoft.sample import CULTURES, write_sample
from scoft.train import train

NAMES = dict(zip(LOSS_SETS, ["LDM", "+M", "+MP", "+MPC"]))
SAMPLING_SEEDS = [0, 1, 2, 3]


def score(pipe, held, settings) -> np.ndarray:
    """Per held-out prompt: [stereotype share, distance to the truth palette] over the sampling seeds."""
    rows = []
    for record in held:
        images = generate(pipe, [record.caption] * len(SAMPLING_SEEDS), SAMPLING_SEEDS, settings)
        truth = CULTURES[record.culture][1:]
        rows.append([np.mean([stereotype_oracle(im, record.culture) for im in images]),
                     np.mean([palette_distance(im, truth) for im in images])])
    return np.array(rows)


def cell(values: np.ndarray) -> str:
    if len(values) < 2:
        return f"{values.mean():.3f} (n<2: no interval)"
    lo, hi = bootstrap_ci(values, 2000, 0)
    return f"{values.mean():.3f} [{lo:.3f}, {hi:.3f}]"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="models/base", help="the planted-bias base folder (scoft base)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per loss set")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default train.max_steps)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    params = load_params(args.params)
    params = params.model_copy(update={"model": ModelParams(**{**params.model.model_dump(), "base": args.base})})
    work = Path(tempfile.mkdtemp(prefix="scoft-planted-bench-"))
    try:
        write_sample(work / "sample")
        ingest([str(work / "sample")], work / "ccub", heldout_fraction=params.ingest.heldout_fraction,
               max_pixels=10**8, max_rejected_fraction=0.0, captioner=FallbackCaptioner(), progress=lambda m: None)
        pipe = load_pipeline(params.model)
        n = params.negatives
        settings = {"steps": n.steps, "guidance_scale": n.guidance_scale, "resolution": params.model.resolution}
        plan = plan_negatives(read_manifest(work / "ccub"), model_fingerprint(pipe), settings, n.per_image, n.seed)
        sample_negatives(pipe, plan, work / "negatives", n.batch_size, settings, progress=lambda m: None)
        held = [r for r in read_manifest(work / "ccub") if r.split == HELDOUT]
        e = params.evaluate
        eval_settings = {"steps": e.steps, "guidance_scale": e.guidance_scale, "resolution": params.model.resolution}
        base = score(pipe, held, eval_settings)
        results, seconds = {}, {}
        for losses in LOSS_SETS:
            per_seed = []
            for seed in range(args.seeds):
                tp = params.train.model_copy(update={"losses": losses, "seed": 1024 + seed, "checkpoint_every": 0})
                run = work / f"{losses}-{seed}"
                started = time.monotonic()
                train(params.model_copy(update={"train": tp}), work / "ccub", work / "negatives", run, run / "log",
                      progress=lambda m: None, max_steps=args.steps, pipe=load_pipeline(params.model))
                seconds.setdefault(losses, []).append(time.monotonic() - started)
                pipe.load_lora_weights(str(run))
                per_seed.append(score(pipe, held, eval_settings))
                pipe.unload_lora_weights()
            results[losses] = np.mean(per_seed, axis=0)  # per prompt, averaged over training seeds
        cultures = np.array([r.culture for r in held])
        print(f"held-out prompts: {len(held)} ({', '.join(f'{c} {int((cultures == c).sum())}' for c in CULTURES)}), "
              f"{len(SAMPLING_SEEDS)} sampling seeds each, {args.seeds} training seed(s) per loss set, "
              f"{args.steps or params.train.max_steps} steps, lr {params.train.lr:g}, rank {params.train.lora_rank}")
        print("\n| model | culture | stereotype share (oracle, lower is better) | distance to truth palette | "
              "improvement over base (distance, paired) |\n|---|---|---|---|---|")
        for name, values in [("base", base), *((NAMES[k], v) for k, v in results.items())]:
            for culture in [*CULTURES, "all"]:
                idx = np.ones(len(held), bool) if culture == "all" else cultures == culture
                gain = cell(base[idx, 1] - values[idx, 1]) if name != "base" else "-"
                print(f"| {name} | {culture} | {cell(values[idx, 0])} | {cell(values[idx, 1])} | {gain} |")
        print("\ntraining seconds per run: " + ", ".join(f"{NAMES[k]} {np.mean(v):.0f}" for k, v in seconds.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
