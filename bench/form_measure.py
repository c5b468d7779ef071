"""The hand-written form measure (scoft/geometry.py) on renders: recall per class (category x form), in
every named palette (each culture's truth and stereotype), both layouts, blurred (Gaussian, radius 0.5)
and with noise at 0, the planted VAE's reconstruction error (0.15 on [-1, 1]) and beyond (0.25).

    .venv/bin/python -m bench.form_measure [--per-layout 120]
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import ImageFilter

from scoft.geometry import form_of
from scoft.judge import named_palettes
from scoft.sample import CATEGORIES, HELDOUT_LAYOUT, STEREOTYPE, TRAIN_LAYOUT, TRUTH, draw

NOISE = (0.0, 0.15, 0.25)


def recall(category: str, form: str, noise: float, per_layout: int, rng: np.random.Generator) -> float:
    palettes = list(named_palettes().values())
    hits = n = 0
    for layout in (TRAIN_LAYOUT, HELDOUT_LAYOUT):
        for i in range(per_layout):
            image = draw(category, *palettes[i % len(palettes)], rng, 32, form, layout)
            pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(0.5)), np.float32) / 127.5 - 1
            pixels = pixels + noise * rng.standard_normal(pixels.shape).astype(np.float32)
            hits += form_of(pixels, category) == form
            n += 1
    return hits / n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-layout", type=int, default=120, help="renders per class, layout and noise level")
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    classes = [(c, f) for c in CATEGORIES for f in (TRUTH, STEREOTYPE)]
    print("| noise | " + " | ".join(f"{c} {f}" for c, f in classes) + " |")
    print("|---" * (len(classes) + 1) + "|")
    for noise in NOISE:
        cells = (f"{recall(c, f, noise, args.per_layout, rng):.3f}" for c, f in classes)
        print(f"| {noise} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
