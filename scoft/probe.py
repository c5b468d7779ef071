"""Linear probes: how much of the planted world's category, form and palette a feature space makes
linearly readable (bench/feature_probe.py, tests/test_planted_effect.py).

Renders of every (culture, category, form, palette) cell in the held-out layout, with seeds no sample,
web or judge uses; a multinomial logistic regression on standardised features learns on half the seeds
and is scored on the other half.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from scoft.planted import STEREOTYPES, to_tensor
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
