"""Negatives per second: scoft's batched sampling against a plain loop over diffusers'
StableDiffusionPipeline, one image per call, with the same model, steps and guidance. With --depth, both
are depth-guided as the paper makes its negatives (a seeded ControlNet of the base's UNet, the offline
depth stand-in of each CCUB image): StableDiffusionControlNetPipeline one image per call against
scoft's batched sampling with the same control.

    python bench/negatives.py --scale tiny|sd15 [--images 32] [--batch 8] [--steps 25] [--resolution 128] [--depth]

The last line is the ratio scoft / plain loop (higher is better).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESOLUTION, build_pipeline, machine, report, sample_workspace  # noqa: E402
from scoft.models import model_fingerprint, pick_device  # noqa: E402
from scoft.negatives import (  # noqa: E402
    DepthEstimator,
    depth_control,
    depth_guided_pipeline,
    plan_negatives,
    sample_negatives,
)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def plain_loop(pipe, plan: list[dict], settings: dict, device, control=None) -> float:
    started = time.perf_counter()
    for row in plan:
        extra = {} if control is None else {"image": control(row)}
        pipe(prompt=row["caption"], generator=torch.Generator(device=device).manual_seed(row["seed"]),
             num_inference_steps=settings["steps"], guidance_scale=settings["guidance_scale"],
             height=settings["resolution"], width=settings["resolution"], **extra).images[0]
    _sync(device)
    return time.perf_counter() - started


def scoft_batched(pipe, plan: list[dict], settings: dict, batch: int, out: Path, device, control=None) -> float:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    sample_negatives(pipe, plan, out, batch, settings, progress=lambda m: None, control=control)
    _sync(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: 4 tiny, 25 sd15)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: the scale's own)")
    parser.add_argument("--depth", action="store_true", help="depth-guided, as the paper's negatives")
    args = parser.parse_args()
    device = pick_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    work, records = sample_workspace(per_category=3)
    pipe = build_pipeline(args.scale, device).to(dtype=dtype)
    settings = {"steps": args.steps or (25 if args.scale == "sd15" else 4), "guidance_scale": 4.5,
                "resolution": args.resolution or RESOLUTION[args.scale]}
    plan = plan_negatives(records, model_fingerprint(pipe), settings, per_image=4, base_seed=0)[: args.images]
    control = None
    if args.depth:
        pipe = depth_guided_pipeline(pipe, "tiny").to(dtype=dtype)
        control = depth_control(records, work / "ccub", DepthEstimator("simple", settings["resolution"]))
    scoft_batched(pipe, plan[: args.batch], settings, args.batch, work / "warm", device, control)  # warm-up
    plain_loop(pipe, plan[:2], settings, device, control)
    plain = plain_loop(pipe, plan, settings, device, control)
    ours = scoft_batched(pipe, plan, settings, args.batch, work / "negatives", device, control)
    report({"benchmark": "negatives", "depth_guided": args.depth, "scale": args.scale, "machine": machine(),
            "images": len(plan),
            "steps": settings["steps"], "batch": args.batch, "dtype": str(dtype), "resolution": settings["resolution"],
            "plain_loop_images_per_s": round(len(plan) / plain, 3), "scoft_images_per_s": round(len(plan) / ours, 3)})
    print(f"ratio scoft/plain-loop negatives per second: {plain / ours:.2f}x")


if __name__ == "__main__":
    main()
