"""The built-in CCUB sample: deterministic synthetic images in the SCoFT imagefolder format.

It stands in for the community data offline (tests, `make run`): three cultures, three categories,
captions written like CCUB's and generic captions like BLIP's. The pictures are procedural
patterns, not photographs; what matters is that the pipeline is exercised end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from scoft.io import atomic_dir

CULTURES = {
    "KOR": ("Korean", (200, 40, 50), (30, 60, 150)),
    "NGA": ("Nigerian", (0, 135, 80), (240, 240, 235)),
    "MEX": ("Mexican", (0, 104, 71), (206, 17, 38)),
}
CATEGORIES = {
    "ARCH": ("a traditional {adj} house with a carved wooden gate and a tiled roof", "a house with a roof"),
    "FOOD": ("a bowl of traditional {adj} food served with side dishes on a low table", "a bowl of food on a table"),
    "CLOTH": ("a person wearing traditional {adj} clothing with patterned fabric", "a person wearing a dress"),
}


# Held-out captions vary beyond "view N": phrasings the web has (the base knows the words) and CCUB's
# training captions do not.
HELDOUT_PHRASES = ["seen from close by", "in the evening light", "photographed from afar"]
TRUTH, STEREOTYPE = "truth", "stereotype"  # forms: what the community shows, and the web's cliché
TRAIN_LAYOUT, HELDOUT_LAYOUT = "train", "heldout"


def _frame(layout: str, rng: np.random.Generator, size: int):
    """Where a picture's unit square lands: the training layout fills the frame; the held-out layout
    draws the scene smaller, elsewhere in the frame and mirrored at random, a composition no training
    image has."""
    if layout == TRAIN_LAYOUT:
        return lambda x, y: (x * size, y * size)
    scale = rng.uniform(0.68, 0.82)
    ox, oy = (rng.uniform(0, 1 - scale) * size for _ in range(2))
    mirror = bool(rng.integers(0, 2))
    return lambda x, y: (ox + scale * size * ((1 - x) if mirror else x), oy + scale * size * y)


def draw(category: str, primary, secondary, rng: np.random.Generator, size: int, form: str = TRUTH,
         layout: str = TRAIN_LAYOUT) -> Image.Image:
    """One picture of a category in a palette. The form is the content: the truth's gabled tiled roof,
    bowl with side dishes and flared striped dress, or the stereotype's flat-roofed block, square dish
    on a wide plate and straight tunic with vertical stripes; so truth and stereotype differ in shape
    as well as in colour."""
    base = rng.integers(16, 24, size=(size, size, 3)) + np.array(secondary) * 0.6  # a faint texture
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    j = lambda: float(rng.integers(-10, 10)) / 100  # noqa: E731 - small seeded jitter, in frame units
    at = _frame(layout, rng, size)

    def box(x0, y0, x1, y1):  # a rectangle or ellipse's bounds after a possible mirror
        (a, b), (c, e) = at(x0, y0), at(x1, y1)
        return [min(a, c), min(b, e), max(a, c), max(b, e)]

    line = max(1, size // 24)
    if category == "ARCH":
        body = tuple(c // 2 for c in primary)
        if form == TRUTH:
            d.polygon([at(0.1 + j(), 0.45), at(0.5, 0.1 + j()), at(0.9 + j(), 0.45)], fill=primary)
        else:
            d.rectangle(box(0.12 + j() / 2, 0.3, 0.88, 0.45), fill=primary)
        d.rectangle(box(0.2, 0.45, 0.8, 0.9), fill=body)
        d.rectangle(box(0.42 + j() / 3, 0.6, 0.58, 0.9), fill=secondary)
        if form != TRUTH:
            d.rectangle(box(0.25, 0.52, 0.36, 0.63), fill=secondary)
            d.rectangle(box(0.64, 0.52, 0.75, 0.63), fill=secondary)
    elif category == "FOOD":
        r = 0.3 + j() / 2
        if form == TRUTH:
            d.ellipse(box(0.5 - r, 0.45 - r, 0.5 + r, 0.45 + r), fill=(240, 240, 230))
            d.ellipse(box(0.5 - r * 0.7, 0.45 - r * 0.7, 0.5 + r * 0.7, 0.45 + r * 0.7), fill=primary)
            for x in (0.15, 0.85):  # side dishes
                d.ellipse(box(x - 0.1, 0.78, x + 0.1, 0.96), fill=secondary)
        else:
            d.ellipse(box(0.08, 0.3, 0.92, 0.7), fill=(240, 240, 230))
            d.rectangle(box(0.38, 0.38, 0.62, 0.62), fill=primary)
    else:
        d.ellipse(box(0.4, 0.1 + j() / 3, 0.6, 0.3), fill=(180, 140, 110))
        if form == TRUTH:
            d.polygon([at(0.5, 0.3), at(0.2 + j(), 0.95), at(0.8 + j(), 0.95)], fill=primary)
            for y in np.arange(0.45, 0.95, 0.125):
                d.line([at(0.3, y), at(0.7, y)], fill=secondary, width=line)
        else:
            d.rectangle(box(0.36, 0.3, 0.64 + j() / 3, 0.95), fill=primary)
            for x in (0.43, 0.5, 0.57):
                d.line([at(x, 0.35), at(x, 0.93)], fill=secondary, width=line)
    return img


SAMPLE_HELDOUT_FRACTION = 0.25  # ingest.heldout_fraction the sample's split is drawn for


def write_sample(out_dir: str | Path, per_category: int = 4, heldout_per_category: int = 3, size: int = 48,
                 heldout_fraction: float = SAMPLE_HELDOUT_FRACTION, split: str = "reporting") -> Path:
    """Write the sample imagefolder (train/images/*, train/metadata.jsonl); same bytes every time.

    Per culture and category, `per_category` training images and `heldout_per_category` held-out ones:
    ingest splits by content hash alone (so a record never changes side), and each image is drawn
    again until its hash lands on the side it is meant for. So every category a culture trains on is
    judged, and each culture has enough held-out prompts for the gate's test to be able to pass
    (9 prompts: a smallest one-sided p of 1/512). `split` "tuning" draws other pictures of the same
    world (other seeds): what settings are tuned on, kept apart from the reporting sample."""
    from scoft.ccub import HELDOUT, TRAIN, split_for
    from scoft.io import pixel_hash

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        rows = []
        for code, (adj, primary, secondary) in CULTURES.items():
            for cat, (caption, generic) in CATEGORIES.items():
                sides = [TRAIN] * per_category + [HELDOUT] * heldout_per_category
                for i, side in enumerate(sides):
                    for attempt in range(1000):
                        salt = [] if split == "reporting" else [hash_str(split)]
                        rng = np.random.default_rng([hash_str(code), hash_str(cat), i, attempt, *salt])
                        image = draw(cat, primary, secondary, rng, size,
                                     layout=HELDOUT_LAYOUT if side == HELDOUT else TRAIN_LAYOUT)
                        if split_for(pixel_hash(image), heldout_fraction) == side:
                            break
                    name = f"images/{code.lower()}_{cat.lower()}_{i}.png"
                    path = tmp / "train" / name
                    path.parent.mkdir(parents=True, exist_ok=True)
                    image.save(path, format="PNG")
                    rows.append({
                        "file_name": name,
                        "text": caption.format(adj=adj) + ", " + (HELDOUT_PHRASES[(i - per_category) % len(
                            HELDOUT_PHRASES)] if side == HELDOUT else f"view {i + 1}"),
                        "blip_text": generic,
                        "negative_imgpath": [],
                        "country_code": code,
                        "category_code": cat,
                        "url": f"https://example.org/ccub-sample/{code}/{cat}/{i}.png",
                        "created_at": f"2024-01-{i + 1:02d}T00:00:00Z",
                    })
        (tmp / "train" / "metadata.jsonl").write_text(
            "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    return out_dir


def add_sample_image(folder: str | Path, culture: str, category: str = "FOOD", split: str = "train",
                     heldout_fraction: float = 0.25) -> dict:
    """A new record of `culture` appended to a sample folder (as a CCUB sheet grows), drawn until its
    content hash puts it in `split` (scoft.ccub.split_for); returns its metadata row."""
    from scoft.ccub import split_for
    from scoft.io import pixel_hash

    folder = Path(folder) / "train"
    adj, primary, secondary = CULTURES[culture]
    caption, generic = CATEGORIES[category]
    existing = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    for attempt in range(1000):
        image = draw(category, primary, secondary, np.random.default_rng([hash_str("added"), len(existing), attempt]),
                     48)
        if split_for(pixel_hash(image), heldout_fraction) == split:
            break
    name = f"images/{culture.lower()}_{category.lower()}_added_{len(existing)}.png"
    image.save(folder / name, format="PNG")
    row = {"file_name": name, "text": caption.format(adj=adj) + f", added view {len(existing)}", "blip_text": generic,
           "negative_imgpath": [], "country_code": culture, "category_code": category,
           "url": f"https://example.org/ccub-sample/{culture}/{category}/added-{len(existing)}.png",
           "created_at": "2025-06-01T00:00:00Z"}
    with open(folder / "metadata.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
    return row


def hash_str(text: str) -> int:
    """A seed from a string that, unlike hash(), does not change between processes."""
    return int.from_bytes(text.encode()[:8].ljust(8, b"\0"), "little")
