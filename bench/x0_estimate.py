"""How far each short estimate of the clean image (what the pixel losses see) is from the 20-step
estimate of the reference's schedule, over a fixed set of (CCUB image, t) pairs on the planted-bias
base, and what each costs in UNet calls and time.

    python bench/x0_estimate.py --base models/base [--pairs 48] [--steps 1,2,4,8] [--samplers ddim,dpm-solver++]

Distances are between decoded images: pixel RMSE on [-1, 1] and LPIPS (lpips-alex, as L_P's default
offline: seeded backbone with lpips' own linear weights). Each value is the mean over the pairs with
a 95% bootstrap interval over pairs. DDIM at steps 1 is the one-step x0 prediction of the call L_LDM
already made (plus its unconditional half for guidance). A sampler's "steps" are its UNet evaluations,
so the same steps cost the same calls in either sampler.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, report  # noqa: E402
from scoft.config import FeatureParams, ModelParams, load_params  # noqa: E402
from scoft.data import load_image_tensor  # noqa: E402
from scoft.features import build_distance  # noqa: E402
from scoft.io import read_jsonl  # noqa: E402
from scoft.losses import estimate_clean_latents  # noqa: E402
from scoft.models import encode_prompts, load_pipeline, training_scheduler  # noqa: E402
from scoft.sample import write_sample  # noqa: E402

REFERENCE_STEPS = 20
# The sampler's ODE solved nearly exactly (DDIM and DPM-Solver++ at 100 steps agree within RMSE 0.01 here):
# the 20-step reference is itself an approximation, and a DDIM one, so distances to it favour DDIM.
CONVERGED_STEPS = 100


def _interval(values: np.ndarray, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    means = rng.choice(values, (1000, len(values))).mean(axis=1)
    return {"mean": float(values.mean()), "ci95_low": float(np.quantile(means, 0.025)),
            "ci95_high": float(np.quantile(means, 0.975))}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="models/base")
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--steps", default="1,2,4,8")
    parser.add_argument("--samplers", default="ddim,dpm-solver++")
    args = parser.parse_args()
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    resolution = params.model.resolution
    pipe = load_pipeline(ModelParams(base=args.base, resolution=resolution))
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_sample(Path(tmp) / "sample") / "train"
        files = sorted((folder / "images").glob("*.png"))[: args.pairs]
        images = torch.stack([load_image_tensor(f, resolution) for f in files])
        text_of = {row["file_name"]: row["text"] for row in read_jsonl(folder / "metadata.jsonl")}
    captions = [text_of[f"images/{f.name}"] for f in files]  # each image with its own CCUB caption
    scheduler = training_scheduler(pipe)
    generator = torch.Generator().manual_seed(0)
    z0 = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
    t = torch.linspace(50, scheduler.config.num_train_timesteps - 50, len(files)).long()
    z_t = scheduler.add_noise(z0, torch.randn(z0.shape, generator=generator), t)
    text = encode_prompts(pipe.tokenizer, pipe.text_encoder, captions)
    empty = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""]).expand(len(files), -1, -1)
    calls = {"n": 0}

    def unet(z, tt, emb):
        calls["n"] += len(z) // len(files)
        return pipe.unet(z, tt, encoder_hidden_states=emb).sample

    first = unet(z_t, t, text)

    def decoded(steps: int, sampler: str = "ddim") -> tuple[torch.Tensor, float, int]:
        calls["n"] = 0
        started = time.perf_counter()
        estimate = estimate_clean_latents(unet, z_t, t, first, text, empty, scheduler.alphas_cumprod, steps,
                                          params.train.sampler_guidance, scheduler.config.prediction_type, sampler)
        image = pipe.vae.decode(estimate / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
        return image, time.perf_counter() - started, calls["n"]

    reference, ref_seconds, ref_calls = decoded(REFERENCE_STEPS)
    converged, _, _ = decoded(CONVERGED_STEPS)
    lpips = build_distance("lpips-alex", FeatureParams())
    rows = []
    for sampler in args.samplers.split(","):
        for steps in [int(s) for s in args.steps.split(",")]:
            image, seconds, n = decoded(steps, sampler)
            rmse = (image - reference).pow(2).flatten(1).mean(1).sqrt().numpy()
            perceptual = lpips(image, reference).flatten().numpy()
            rmse_converged = (image - converged).pow(2).flatten(1).mean(1).sqrt().numpy()
            rows.append({"sampler": sampler, "steps": steps, "unet_calls_after_the_first": n,
                         "seconds": round(seconds, 3), "rmse_to_20_steps": _interval(rmse),
                         "lpips_to_20_steps": _interval(perceptual),
                         f"rmse_to_{CONVERGED_STEPS}_steps": _interval(rmse_converged)})
    report({"benchmark": "x0_estimate", "base": args.base, "pairs": len(files), "machine": machine(),
            "reference": {"sampler": "ddim", "steps": REFERENCE_STEPS, "unet_calls_after_the_first": ref_calls,
                          "seconds": round(ref_seconds, 3)}, "estimates": rows})
    print("| sampler | steps | UNet calls (after L_LDM's) | RMSE to DDIM 20 steps [95%] | LPIPS to DDIM 20 steps [95%] "
          f"| RMSE to DDIM {CONVERGED_STEPS} steps [95%] | seconds |")
    print("|---|---|---|---|---|---|---|")

    def cell(v: dict) -> str:
        return f"{v['mean']:.3f} [{v['ci95_low']:.3f}, {v['ci95_high']:.3f}]"

    for r in rows:
        print(f"| {r['sampler']} | {r['steps']} | {r['unet_calls_after_the_first']} | {cell(r['rmse_to_20_steps'])} | "
              f"{cell(r['lpips_to_20_steps'])} | {cell(r[f'rmse_to_{CONVERGED_STEPS}_steps'])} | {r['seconds']} |")
    reference_to_converged = (reference - converged).pow(2).flatten(1).mean(1).sqrt().numpy()
    print(f"| ddim (reference) | 20 | {ref_calls} | 0 | 0 | {cell(_interval(reference_to_converged))} | "
          f"{round(ref_seconds, 3)} |")


if __name__ == "__main__":
    main()
