"""Time per optimizer step of the full SCoFT method (+MPC, pixel losses every 10 steps, amortised)
against LDM-only fine-tuning, in the same process, and peak memory.

    python bench/train_step.py --scale tiny|sd15 [--steps 20] [--resolution 128] \
        [--fast-sampler-steps 2,3 --fast-sampler dpm-solver++]

sd15: Stable Diffusion v1.5's architecture with random weights, 512 px unless --resolution says
otherwise, batch 1; on a GPU with bf16 and gradient checkpointing. LDM-only runs before and after the
full method and the two are averaged (drift of clocks and caches cancels). The last line is the
ratio full / LDM-only. The loop runs without its dvclive log. With --fast-sampler-steps N[,M...] the full
method runs again with an N-step estimate of the clean image for the pixel losses (1: the
one-step x0 prediction of the call L_LDM already made) of --fast-sampler (ddim | dpm-solver++), and
its ratio is printed too.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESOLUTION, build_pipeline, machine, report, training_workspace  # noqa: E402
from scoft.config import load_params  # noqa: E402
from scoft.models import pick_device  # noqa: E402
from scoft.train import train  # noqa: E402


def _params(scale: str, losses: str, steps: int, cuda: bool, resolution: int, sampler_steps: int | None = None,
            sampler: str = "ddim"):
    base = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    train_params = base.train.model_copy(update={
        "losses": losses, "max_steps": steps, "batch_size": 1, "pixel_loss_every": 10, "checkpoint_every": 0,
        "mixed_precision": "bf16" if cuda else "no", "gradient_checkpointing": cuda and scale == "sd15",
        # sd15 without --fast-sampler-steps: the reference's 20 DDIM steps; tiny: params.yaml's own
        "sampler_steps": sampler_steps or (20 if scale == "sd15" else base.train.sampler_steps),
        "sampler": sampler if sampler_steps else ("ddim" if scale == "sd15" else base.train.sampler),
        "lora_rank": 64 if scale == "sd15" else 4,
        "lora_alpha": 64 if scale == "sd15" else 4})
    features = base.features.model_copy(update={"perceptual": "lpips-vgg"})
    model = base.model.model_copy(update={"resolution": resolution})
    return base.model_copy(update={"train": train_params, "features": features, "model": model})


def run(scale: str, losses: str, steps: int, work: Path, device, resolution: int,
        sampler_steps: int | None = None, sampler: str = "ddim") -> dict:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    params = _params(scale, losses, steps, cuda, resolution, sampler_steps, sampler)
    pipe = build_pipeline(scale, device)
    started = time.perf_counter()
    summary = train(params, work / "ccub", work / "negatives", work / f"lora-{losses}", None,
                    progress=lambda m: None, pipe=pipe)
    if cuda:
        torch.cuda.synchronize()
    return {"losses": losses, "steps": steps, "sampler_steps": params.train.sampler_steps,
            "sampler": params.train.sampler,
            "loop_seconds": summary["seconds"],
            "seconds_per_step": summary["seconds"] / steps, "wall_seconds": round(time.perf_counter() - started, 2),
            "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--steps", type=int, default=20, help="a multiple of 10: the pixel-loss interval")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: the scale's own)")
    parser.add_argument("--fast-sampler-steps", default=None,
                        help="also time the full method with this many sampler steps for the pixel losses (2,3: each)")
    parser.add_argument("--fast-sampler", choices=["ddim", "dpm-solver++"], default="ddim")
    args = parser.parse_args()
    resolution = args.resolution or RESOLUTION[args.scale]
    device = pick_device()
    work = training_workspace(args.scale, device, resolution)
    run(args.scale, "ldm", 2, work, device, resolution)  # warm-up: kernels, allocator, lazy imports
    before = run(args.scale, "ldm", args.steps, work, device, resolution)
    memorisation = run(args.scale, "ldm+mem", args.steps, work, device, resolution)  # the floor under +MPC
    full = run(args.scale, "ldm+mem+perceptual+contrastive", args.steps, work, device, resolution)
    fast = [run(args.scale, "ldm+mem+perceptual+contrastive", args.steps, work, device, resolution, int(n),
                args.fast_sampler) for n in (args.fast_sampler_steps or "").split(",") if n]
    after = run(args.scale, "ldm", args.steps, work, device, resolution)
    ldm = (before["seconds_per_step"] + after["seconds_per_step"]) / 2
    report({"benchmark": "train_step", "scale": args.scale, "resolution": resolution, "machine": machine(),
            "ldm_only_before": before, "ldm_mem": memorisation, "full_mpc": full, "full_mpc_fast": fast,
            "ldm_only_after": after,
            "process_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)})
    print(f"ratio +M (no pixel losses)/ldm-only seconds per step: {memorisation['seconds_per_step'] / ldm:.2f}x")
    for r in fast:
        print(f"ratio full ({r['sampler_steps']} {r['sampler']} steps)/ldm-only seconds per step: "
              f"{r['seconds_per_step'] / ldm:.2f}x")
    print(f"ratio full ({full['sampler_steps']} sampler steps)/ldm-only seconds per step: "
          f"{full['seconds_per_step'] / ldm:.2f}x")


if __name__ == "__main__":
    main()
