"""What do SCoFT's feature spaces see of the planted world? Linear-probe accuracy for category, form and
palette (issue 32, item 3).

Renders of the planted world (scoft.sample.draw: every culture, category, form and palette, in the
held-out layout, seeds no sample uses) are embedded by each backbone as the losses use it offline: L_C's
`dinov2` (a seeded random tiny DINOv2, `features.weights.dinov2: tiny`), L_P's `lpips-alex` (a seeded
random AlexNet under lpips' shipped heads: its five layers' unit-normalised channels, averaged over
space), and for reference the colour histogram (the palette alone) and the raw pixels. A linear probe
(multinomial logistic regression on standardised features, trained on half the seeds, scored on the
other half) then says how much of each attribute the space makes linearly readable.

--base B adds the spaces of the web encoder the `base` stage built in B (scoft/web_encoder.py: a small CNN
pretrained by SimCLR without labels on the planted world's own unlabeled pictures, the web corpus the
base's UNet learns from and the palette corpus its VAE learns from; never the CCUB sample, the judge's
renders or any label): `web-ssl` (its pooled embedding, L_C) and `web-ssl-lpips` (its four layers, L_P).
--ssl-steps N,M,... trains that encoder afresh for each number of steps (how much pretraining it needs).

    .venv/bin/python -m bench.feature_probe [--per-cell 24] [--base B] [--ssl-steps 250,500,1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from scoft.config import FeatureParams, PlantedParams
from scoft.features import build_distance
from scoft.planted import WEB_ENCODER_DIR, unlabeled_pictures
from scoft.probe import ATTRIBUTES, probe_accuracy, renders
from scoft.web_encoder import train_web_encoder


def pooled_layers(maps: list[torch.Tensor]) -> torch.Tensor:
    """What a layer-wise (LPIPS-style) distance compares, pooled: each layer's unit-normalised channels,
    averaged over space, concatenated."""
    return torch.cat([F.normalize(h, dim=1).mean(dim=(2, 3)) for h in maps], dim=1)


@torch.no_grad()
def embeddings(pixels: torch.Tensor, base: str | None) -> dict[str, torch.Tensor]:
    """Each space's features of images in [-1, 1]."""
    params = FeatureParams()
    alex = build_distance("lpips-alex", params).lpips
    spaces = {
        "dinov2 (L_C, seeded random tiny)": build_distance("dinov2", params).embed(pixels),
        "lpips-alex (L_P, seeded random AlexNet)": pooled_layers(alex.net(alex.scaling_layer(pixels))),
        "colour histogram (palette only)": build_distance("colour-histogram", params).embed(pixels),
        "raw pixels (8x8)": F.adaptive_avg_pool2d(pixels, 8).flatten(1),
    }
    if base:
        params = FeatureParams(web_encoder=str(Path(base) / WEB_ENCODER_DIR))
        spaces["web-ssl (the base's web encoder, pooled)"] = build_distance("web-ssl", params).embed(pixels)
        encoder = build_distance("web-ssl-lpips", params).model
        spaces["web-ssl-lpips (the base's web encoder, four layers)"] = pooled_layers(encoder.layers(pixels))
    return spaces


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-cell", type=int, default=24, help="seeds per culture, category, form and palette")
    parser.add_argument("--base", default=None, help="a planted base folder: also probe its web encoder")
    parser.add_argument("--ssl-steps", default="", help="comma-separated: also train the web encoder afresh this long")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    pixels, labels, seeds = renders(args.per_cell)
    train = seeds < args.per_cell // 2  # the probe learns on half the seeds and is scored on the others
    chance = {a: 1 / len(set(labels[a].tolist())) for a in ATTRIBUTES}
    spaces = embeddings(pixels, args.base)
    for steps in [int(s) for s in args.ssl_steps.split(",") if s]:
        started = time.monotonic()
        encoder, _ = train_web_encoder(unlabeled_pictures(PlantedParams(), 32, 0), steps, progress=lambda m: None)
        with torch.no_grad():
            spaces[f"web encoder, {steps} SimCLR steps ({time.monotonic() - started:.0f} s), pooled"] = encoder(pixels)
    results = {name: {a: probe_accuracy(f, labels[a], train) for a in ATTRIBUTES} for name, f in spaces.items()}
    print(f"{len(pixels)} renders (held-out layout), probe on {int(train.sum())}, scored on {int((~train).sum())}")
    print("| space | " + " | ".join(f"{a} (chance {chance[a]:.2f})" for a in ATTRIBUTES) + " |")
    print("|---" * (1 + len(ATTRIBUTES)) + "|")
    for name, accuracy in results.items():
        print(f"| {name} | " + " | ".join(f"{accuracy[a]:.3f}" for a in ATTRIBUTES) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"renders": len(pixels), "chance": chance, "accuracy": results},
                                              indent=1))


if __name__ == "__main__":
    main()
