"""Where an optimizer step's time goes, per loss set: torch.profiler's top operators by self CPU time.

    python bench/profile_step.py [--scale sd15] [--resolution 128] [--steps 2] [--top 8] \
        [--sampler dpm-solver++ --sampler-steps 3]

Each loss set trains `--steps` optimizer steps of batch 1 (after a one-step warm-up run), the
profiler on from the end of the first (the networks' set-up left out), with the pixel losses on
every micro-step for +MPC, so its table is the pixel step's; the settings otherwise as
bench/train_step.py's. Prints one markdown table per loss set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESOLUTION, build_pipeline, machine, training_workspace  # noqa: E402
from bench.train_step import _params  # noqa: E402
from scoft.models import pick_device  # noqa: E402
from scoft.train import train  # noqa: E402

LOSS_SETS = ("ldm", "ldm+mem", "ldm+mem+perceptual+contrastive")


def top_operators(scale, losses, steps, work, device, resolution, sampler, sampler_steps, top) -> list[str]:
    params = _params(scale, losses, steps, device.type == "cuda", resolution, sampler_steps, sampler)
    params = params.model_copy(update={"train": params.train.model_copy(update={"pixel_loss_every": 1})})
    warm = params.model_copy(update={"train": params.train.model_copy(update={"max_steps": 1})})
    train(warm, work / "ccub", work / "negatives", work / "warm", None, progress=lambda m: None,
          pipe=build_pipeline(scale, device))
    prof = profile(activities=[ProfilerActivity.CPU])

    def start_after_the_first_step(message: str) -> None:  # so the networks' set-up is left out
        if message.startswith("step 1/"):
            prof.start()

    train(params, work / "ccub", work / "negatives", work / f"lora-{losses}", None,
          progress=start_after_the_first_step, pipe=build_pipeline(scale, device))
    prof.stop()
    steps -= 1
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    lines = [f"**{losses}** ({steps} steps, {total / 1e6 / steps:.2f} s of operator time per step)", "",
             "| operator | self CPU share | calls per step |", "|---|---|---|"]
    lines += [f"| `{e.key}` | {e.self_cpu_time_total / total:.1%} | {e.count / steps:.0f} |" for e in events[:top]]
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", choices=["tiny", "sd15"], default="sd15")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3, help="at least 2: the first is not profiled")
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--sampler", choices=["ddim", "ddpm", "dpm-solver++"], default="dpm-solver++")
    parser.add_argument("--sampler-steps", type=int, default=3)
    args = parser.parse_args()
    resolution = args.resolution or (128 if args.scale == "sd15" else RESOLUTION[args.scale])
    device = pick_device()
    work = training_workspace(args.scale, device, resolution)
    print(f"{args.scale} at {resolution} px on {machine()}; pixel losses: {args.sampler_steps} {args.sampler} steps\n")
    for losses in LOSS_SETS:
        print("\n".join(top_operators(args.scale, losses, args.steps, work, device, resolution, args.sampler,
                                      args.sampler_steps, args.top)))


if __name__ == "__main__":
    main()
