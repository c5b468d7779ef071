"""A form measure built apart from the planted judge: hand-written geometry, no learning.

The planted world (scoft/sample.py `draw`) gives each category a truth form and a stereotype form that
differ in shape: a gabled roof against a flat roof block (ARCH), a round bowl with side dishes against
a square dish on a wide flat plate (FOOD), a flared dress against a straight tunic (CLOTH). This module
finds the object (pixels unlike the background, which the picture's border shows) and reads one
shape ratio per category, whatever the colours, the position, the scale or a mirror:

- ARCH: how wide the object's top band is against its widest row (a gable's apex is narrow);
- FOOD: the object's bounding box, width against height (a wide flat plate lies low);
- CLOTH: the garment's width near its hem against its width below the head (a dress flares).

It shares nothing with the judge (no network, no training data): where both agree on what a model
draws, a claim about form does not rest on one network's leanings.
"""

from __future__ import annotations

import numpy as np

from scoft.sample import STEREOTYPE, TRUTH

# Thresholds on each ratio, halfway (geometrically) between the two forms' values in the unit frame:
# ARCH top band 0.17 (truth) against 1.0; FOOD aspect 1.1 against 2.1; CLOTH flare 5.6 against 1.0.
ARCH_TOP_BAND, ARCH_MAX_TOP = 0.15, 0.5
FOOD_MIN_ASPECT = 1.5
CLOTH_SHOULDER, CLOTH_HEM, CLOTH_MIN_FLARE = 0.35, 0.9, 2.0
FOREGROUND = 0.45  # colour distance from the background, on [-1, 1] per channel, that counts as object
MIN_OBJECT = 0.02  # share of the picture an object covers at least; less: no form can be read


def _box_mean(image: np.ndarray) -> np.ndarray:
    """A 3 x 3 mean of each channel (edges repeated): a model's per-pixel noise falls to a third."""
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return sum(padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9


def foreground(image: np.ndarray) -> np.ndarray:
    """The object's mask of an H x W x 3 picture in [-1, 1]: after a 3 x 3 mean (noise), the pixels
    whose colour differs from the background's (the median of the picture's outermost ring) by more
    than FOREGROUND."""
    smooth = _box_mean(image)
    ring = np.concatenate([smooth[0], smooth[-1], smooth[1:-1, 0], smooth[1:-1, -1]])
    return np.linalg.norm(smooth - np.median(ring, axis=0), axis=-1) > FOREGROUND


def _extent(counts: np.ndarray) -> tuple[int, int]:
    """First and last row (or column) holding a real part of the object: at least 2 pixels and a tenth
    of its widest (noise that passes the threshold comes as specks, not as rows)."""
    at = np.flatnonzero(counts >= max(2.0, 0.1 * counts.max()))
    return int(at[0]), int(at[-1])


def _width_at(mask: np.ndarray, top: int, height: int, at: float, band: float = 0.08) -> float:
    """The object's mean row width (foreground pixels) over a band of rows around `at` of its height."""
    lo = top + int(round((at - band / 2) * height))
    hi = max(lo + 1, top + int(round((at + band / 2) * height)))
    return float(mask[lo:hi].sum(axis=1).mean())


def form_ratio(image: np.ndarray, category: str) -> float | None:
    """The category's shape ratio of one picture (H x W x 3 in [-1, 1]); None when no object is found."""
    mask = foreground(image)
    if mask.mean() < MIN_OBJECT:
        return None
    top, bottom = _extent(mask.sum(axis=1))
    height = bottom - top + 1
    widest = float(mask.sum(axis=1).max())
    if category == "ARCH":
        band = max(1, int(round(ARCH_TOP_BAND * height)))
        return float(mask[top:top + band].sum(axis=1).mean()) / widest
    if category == "FOOD":
        left, right = _extent(mask.sum(axis=0))
        return (right - left + 1) / height
    if category == "CLOTH":
        shoulder = _width_at(mask, top, height, CLOTH_SHOULDER)
        return _width_at(mask, top, height, CLOTH_HEM) / max(shoulder, 1.0)
    raise ValueError(f"no geometric form measure for category {category!r}")


def form_of(image: np.ndarray, category: str) -> str | None:
    """TRUTH or STEREOTYPE as the geometry reads the picture's object; None when it finds none."""
    ratio = form_ratio(image, category)
    if ratio is None:
        return None
    truth = {"ARCH": ratio < ARCH_MAX_TOP, "FOOD": ratio < FOOD_MIN_ASPECT, "CLOTH": ratio >= CLOTH_MIN_FLARE}
    return TRUTH if truth[category] else STEREOTYPE


def stereotype_form_share(images, categories: list[str]) -> np.ndarray:
    """Per picture (N x 3 x H x W tensor or array in [-1, 1]), whether the geometry sees the stereotype's
    form (a picture where it finds no object counts as not the stereotype, and is rare: see the tests)."""
    array = np.asarray(images, dtype=np.float32).transpose(0, 2, 3, 1)
    return np.array([form_of(im, c) == STEREOTYPE for im, c in zip(array, categories)])
