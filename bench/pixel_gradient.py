"""How strongly do the pixel losses pull, with the default image estimate against the reference's?

The pixel losses (L_P, L_C) reach the LoRA only through the first UNet prediction of the short sampler
that estimates the clean image. Their gradient with respect to that prediction, per loss, is measured
on the planted-bias base for the same (CCUB image, t, noise) under the default estimate (params.yaml
train.sampler, train.sampler_steps) and under the reference's 20-step stochastic DDPM, and reported
as the median ratio over pairs with its spread. With pixel losses every `pixel_loss_every` micro-steps
(the reference: every 10), the effective strength relative to the reference is
  ratio x (10 / pixel_loss_every)
for the same loss weights.

    .venv/bin/python -m bench.pixel_gradient --base models/base [--pairs 24]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import machine, report
from scoft.config import load_params
from scoft.data import load_image_tensor
from scoft.features import build_distance
from scoft.io import read_jsonl
from scoft.losses import estimate_clean_latents
from scoft.models import encode_prompts, load_pipeline, training_scheduler
from scoft.sample import write_sample

REFERENCE = ("ddpm", 20)


def gradient_norms(pipe, image, caption, negative, t, seed, sampler, steps, guidance, perceptual, contrastive):
    """|d loss / d first prediction| for L_P and L_C (its positive minus negative form) at one pair."""
    sched = training_scheduler(pipe)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z0 = pipe.vae.encode(image[None]).latent_dist.mean * pipe.vae.config.scaling_factor
    noise = torch.randn(z0.shape, generator=generator)
    tt = torch.tensor([t])
    z_t = sched.add_noise(z0, noise, tt)
    text = encode_prompts(pipe.tokenizer, pipe.text_encoder, [caption])
    empty = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])
    unet_fn = lambda z, s, emb: pipe.unet(z, s, encoder_hidden_states=emb).sample.float()  # noqa: E731
    out = {}
    for name in ("perceptual", "contrastive"):
        with torch.no_grad():
            first = unet_fn(z_t, tt, text)
        first.requires_grad_(True)
        z0_hat = estimate_clean_latents(unet_fn, z_t, tt, first, text, empty, sched.alphas_cumprod, steps, guidance,
                                        sched.config.prediction_type, sampler, torch.Generator().manual_seed(seed))
        x_hat = pipe.vae.decode(z0_hat / pipe.vae.config.scaling_factor).sample.float()
        if name == "perceptual":
            loss = perceptual(x_hat, image[None]).mean()
        else:
            loss = (contrastive(x_hat, image[None]) - contrastive(x_hat, negative[None])).mean()
        (grad,) = torch.autograd.grad(loss, first)
        out[name] = float(grad.norm())
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="models/base")
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    params = load_params(args.params)
    tp = params.train
    pipe = load_pipeline(params.model.model_copy(update={"base": args.base}))
    pipe.unet.requires_grad_(False)
    perceptual = build_distance(params.features.perceptual, params.features, params.model.seed)
    contrastive = build_distance(params.features.contrastive, params.features, params.model.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_sample(Path(tmp) / "sample", split="tuning") / "train"
        rows = read_jsonl(folder / "metadata.jsonl")
        images = [load_image_tensor(folder / r["file_name"], params.model.resolution) for r in rows]
    rng = np.random.default_rng(0)
    ratios = {"perceptual": [], "contrastive": []}
    for i in range(args.pairs):
        k, other = (int(v) for v in rng.choice(len(rows), 2, replace=False))
        t = int(rng.integers(50, 1000))
        common = (pipe, images[k], rows[k]["text"], images[other], t, i)
        default = gradient_norms(*common, tp.sampler, tp.sampler_steps, tp.sampler_guidance, perceptual, contrastive)
        reference = gradient_norms(*common, *REFERENCE, tp.sampler_guidance, perceptual, contrastive)
        for name in ratios:
            if reference[name] > 0:
                ratios[name].append(default[name] / reference[name])
    result = {"machine": machine(), "base": args.base, "pairs": args.pairs, "split": "tuning",
              "default": f"{tp.sampler} {tp.sampler_steps} steps", "reference": f"{REFERENCE[0]} {REFERENCE[1]} steps",
              "pixel_loss_every": tp.pixel_loss_every}
    for name, values in ratios.items():
        q = np.percentile(values, [25, 50, 75])
        result[name] = {"median_ratio": round(float(q[1]), 3),
                        "quartiles": [round(float(q[0]), 3), round(float(q[2]), 3)],
                        "effective_strength_vs_reference": round(float(q[1]) * 10 / tp.pixel_loss_every, 2)}
    report(result)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
