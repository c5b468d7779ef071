"""What do SCoFT's feature spaces see of the planted world? Linear-probe accuracy for category, form and
palette (issue 32, item 3).

Renders of the planted world (scoft.sample.draw: every culture, category, form and palette, in the
held-out layout, seeds no sample uses) are embedded by each backbone as the losses use it offline: L_C's
`dinov2` (a seeded random tiny DINOv2, `features.weights.dinov2: tiny`), L_P's `lpips-alex` (a seeded
random AlexNet under lpips' shipped heads: its five layers' unit-normalised channels, averaged over
space), and for reference the colour histogram (the palette alone) and the raw pixels. A linear probe
(multinomial logistic regression on standardised features, trained on half the seeds, scored on the
other half) then says how much of each attribute the space makes linearly readable.

--ssl-steps N adds a first try at the issue's target: a small CNN pretrained without labels on the
planted world's own unlabeled pictures (the web corpus the base's UNet learns from and the palette corpus
its VAE learns from; never the CCUB sample, the judge's renders or any label) by SimCLR's contrastive
loss between two augmented views (crop, flip, noise; no colour change, so colour stays information).

    .venv/bin/python -m bench.feature_probe [--per-cell 24] [--ssl-steps 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scoft.config import FeatureParams, PlantedParams
from scoft.features import build_distance
from scoft.planted import STEREOTYPES, VAE_CORPUS, palette_corpus, to_tensor, web_corpus
from scoft.sample import CATEGORIES, CULTURES, HELDOUT_LAYOUT, STEREOTYPE, TRUTH, draw, hash_str

ATTRIBUTES = ("category", "form", "palette")


def renders(per_cell: int, size: int = 32) -> tuple[torch.Tensor, dict[str, np.ndarray], np.ndarray]:
    """Every (culture, category, form, palette) cell, `per_cell` seeds each; the labels; each image's seed."""
    images, labels, seeds = [], {a: [] for a in ATTRIBUTES}, []
    for culture, (_, *truth) in CULTURES.items():
        palettes = {TRUTH: truth, STEREOTYPE: STEREOTYPES[culture]}
        for category in CATEGORIES:
            for form in (TRUTH, STEREOTYPE):
                for palette, (primary, secondary) in palettes.items():
                    for i in range(per_cell):
                        rng = np.random.default_rng([hash_str("probe"), hash_str(culture), hash_str(category), i])
                        images.append(draw(category, primary, secondary, rng, size, form, HELDOUT_LAYOUT))
                        for a, v in zip(ATTRIBUTES, (category, form, palette)):
                            labels[a].append(v)
                        seeds.append(i)
    return to_tensor(images), {a: np.array(v) for a, v in labels.items()}, np.array(seeds)


@torch.no_grad()
def embeddings(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each space's features of images in [-1, 1]."""
    params = FeatureParams()
    dino = build_distance("dinov2", params)
    alex = build_distance("lpips-alex", params).lpips
    layers = alex.net(alex.scaling_layer(pixels))
    return {
        "dinov2 (L_C, seeded random tiny)": dino.embed(pixels),
        "lpips-alex (L_P, seeded random AlexNet)": torch.cat(
            [F.normalize(h, dim=1).mean(dim=(2, 3)) for h in layers], dim=1),
        "colour histogram (palette only)": build_distance("colour-histogram", params).embed(pixels),
        "raw pixels (8x8)": F.adaptive_avg_pool2d(pixels, 8).flatten(1),
    }


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A view: a random crop of 60 to 100% of the side resized back, a random mirror, pixel noise."""
    n, _, size, _ = x.shape
    side = (size * (0.6 + 0.4 * torch.rand(n, generator=generator))).long()
    views = []
    for i in range(n):
        top, left = (int(torch.randint(0, size - int(side[i]) + 1, (1,), generator=generator)) for _ in range(2))
        crop = x[i:i + 1, :, top:top + side[i], left:left + side[i]]
        view = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
        views.append(view.flip(-1) if torch.rand(1, generator=generator) < 0.5 else view)
    return torch.cat(views) + 0.1 * torch.randn(x.shape, generator=generator)


def simclr_encoder(steps: int, batch: int = 64, temperature: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """A small CNN trained by SimCLR (NT-Xent between two views of each picture) on the planted world's
    unlabeled pictures: the web corpus and the VAE's palette corpus."""
    pictures = [im for im, _ in web_corpus(PlantedParams(), 32)] + palette_corpus(32, VAE_CORPUS, 0)
    data = to_tensor(pictures)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    encoder = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(32, 64, 3, stride=2, padding=1),
        torch.nn.GELU(), torch.nn.Conv2d(64, 128, 3, stride=2, padding=1), torch.nn.GELU(),
        torch.nn.Conv2d(128, 128, 3, stride=2, padding=1), torch.nn.GELU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten())
    projector = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    optimiser = torch.optim.AdamW([*encoder.parameters(), *projector.parameters()], lr=2e-3)
    for _ in range(steps):
        x = data[torch.randint(0, len(data), (batch,), generator=generator)]
        z = F.normalize(projector(encoder(torch.cat([augment(x, generator), augment(x, generator)]))), dim=1)
        logits = z @ z.T / temperature
        logits.fill_diagonal_(float("-inf"))  # a view is not its own positive
        targets = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)])
        loss = F.cross_entropy(logits, targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return encoder.eval()


def probe_accuracy(features: torch.Tensor, labels: np.ndarray, train: np.ndarray, steps: int = 500) -> float:
    """Held-out accuracy of a multinomial logistic regression (weight decay 1e-3) on standardised features."""
    classes, y = np.unique(labels, return_inverse=True)
    y = torch.from_numpy(y)
    x = features.float()
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], len(classes))
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        optimiser.zero_grad()
        F.cross_entropy(head(x[train]), y[train]).backward()
        optimiser.step()
    with torch.no_grad():
        return float((head(x[~train]).argmax(1) == y[~train]).float().mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-cell", type=int, default=24, help="seeds per culture, category, form and palette")
    parser.add_argument("--ssl-steps", type=int, default=0, help="also pretrain a SimCLR CNN this many steps")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    pixels, labels, seeds = renders(args.per_cell)
    train = seeds < args.per_cell // 2  # the probe learns on half the seeds and is scored on the others
    chance = {a: 1 / len(set(labels[a].tolist())) for a in ATTRIBUTES}
    spaces = embeddings(pixels)
    if args.ssl_steps:
        encoder = simclr_encoder(args.ssl_steps)
        with torch.no_grad():
            spaces[f"SimCLR CNN, {args.ssl_steps} steps on the planted web"] = encoder(pixels)
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
