"""The planted world's judge, built apart from the training path.

A small CNN trained on renders of its own (scoft.sample.draw with its own seeds, both forms, both
layouts, named and random palettes), never on the CCUB sample, the web the base learned from, or any
model's output. Each render is degraded as a model's output is (`degraded`: a Gaussian blur and pixel
noise up to twice the planted VAE's reconstruction error), so that it holds on what models draw; its
form recall per class (truth and stereotype, both layouts) is measured at that error and beyond.
Three heads: the category, the form (the community's truth or the web's stereotype: shape only, since
half the renders are in random colours) and the palette (each culture's truth or stereotype palette,
or another). Its accuracy on renders it never saw is measured at build time and
kept beside its weights (judge.json), so what it claims is checked:
- as the oracle (bench/planted_bias.py, tests): the share of a culture's images drawn in the
  stereotype's *form*, which a palette shift alone cannot change;
- as the offline evaluation backbone: `planted-attributes` (the default) weighs its category, form and
  palette as declared; `planted-judge` takes the cosine distance between its penultimate embeddings,
  which turned out to be mostly colour (scoft/features.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from scoft.built import load_built, save_built
from scoft.checkpoints import BuildCheckpoints, resumable_steps
from scoft.sample import CATEGORIES, CULTURES, HELDOUT_LAYOUT, STEREOTYPE, TRAIN_LAYOUT, TRUTH, draw, hash_str

STEM = "judge"  # judge.pt and judge.json in the judge's folder
RESOLUTION = 32
FORMS = [TRUTH, STEREOTYPE]
EMBEDDING = 128
# Pixel noise (standard deviation on [-1, 1]) and blur (Gaussian radius in pixels) of the training renders,
# drawn uniformly per render: the planted VAE's reconstruction error is about 0.15 (bench/form_measure.py).
TRAIN_NOISE, TRAIN_BLUR = (0.0, 0.3), (0.0, 0.8)
RECALL_NOISE = (0.0, 0.15, 0.25)  # where form recall is validated: clean, at the VAE's error, beyond it
RECALL_BLUR = 0.5
TRAIN_RENDERS, VALIDATION_RENDERS = 6000, 600


def named_palettes() -> dict[str, tuple]:
    """Each culture's truth and stereotype palettes by name ("KOR truth", "KOR stereotype", ...)."""
    from scoft.planted import STEREOTYPES

    return {**{f"{c} truth": v[1:] for c, v in CULTURES.items()},
            **{f"{c} stereotype": v for c, v in STEREOTYPES.items()}}


class JudgeNet(nn.Module):
    def __init__(self, palettes: int):
        super().__init__()
        # where things are matters (a roof's outline, stripes' direction): the last map stays 4 x 4
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * 16, EMBEDDING), nn.ReLU())
        self.category = nn.Linear(EMBEDDING, len(CATEGORIES))
        self.form = nn.Linear(EMBEDDING, len(FORMS))
        self.palette = nn.Linear(EMBEDDING, palettes + 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True))
        return {"embedding": h, "category": self.category(h), "form": self.form(h), "palette": self.palette(h)}


def degraded(image: Image.Image, rng: np.random.Generator, noise: float, blur: float) -> np.ndarray:
    """A render as a model draws it, in [-1, 1]: blurred (Gaussian, radius `blur` pixels), then with
    Gaussian pixel noise of standard deviation `noise`."""
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    x = np.asarray(image, dtype=np.float32) / 127.5 - 1
    return np.clip(x + rng.normal(0, noise, x.shape), -1, 1).astype(np.float32) if noise > 0 else x


def render_set(n: int, seed: int, noise=TRAIN_NOISE, blur=TRAIN_BLUR, form: str | None = None,
               layout: str | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """n labelled, degraded renders in [-1, 1]; half in a named palette, half in random colours. noise and
    blur: (low, high) ranges drawn per render; form and layout: fixed, or drawn per render when None."""
    palettes = list(named_palettes().items())
    rng = np.random.default_rng([hash_str("judge"), seed])
    images, labels = [], {"category": [], "form": [], "palette": []}
    for _ in range(n):
        category = int(rng.integers(len(CATEGORIES)))
        f = FORMS.index(form) if form else int(rng.integers(len(FORMS)))
        named = rng.random() < 0.5
        p = int(rng.integers(len(palettes)))
        colours = palettes[p][1] if named else tuple(tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
        where = layout or (HELDOUT_LAYOUT if rng.random() < 0.5 else TRAIN_LAYOUT)
        render = draw(list(CATEGORIES)[category], *colours, rng, RESOLUTION, FORMS[f], where)
        images.append(degraded(render, rng, float(rng.uniform(*noise)), float(rng.uniform(*blur))))
        labels["category"].append(category)
        labels["form"].append(f)
        labels["palette"].append(p if named else len(palettes))
    return (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
            {k: torch.tensor(v) for k, v in labels.items()})


@torch.no_grad()
def form_recall(model: JudgeNet, seed: int, n: int = 200) -> dict[str, dict[str, float]]:
    """Per noise level, the share of renders of each form and layout that the judge calls that form."""
    recall = {}
    for noise in RECALL_NOISE:
        cells = {}
        for i, form in enumerate(FORMS):
            for j, layout in enumerate((TRAIN_LAYOUT, HELDOUT_LAYOUT)):
                images, _ = render_set(n, seed * 100 + 10 * i + j, (noise, noise), (RECALL_BLUR, RECALL_BLUR),
                                       form, layout)
                cells[f"{form}/{layout}"] = round(float((model(images)["form"].argmax(1) == i).float().mean()), 3)
        recall[f"{noise:g}"] = cells
    return recall


@torch.no_grad()
def calibration_error(model: JudgeNet, images: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error of the form head: how far its confidence is from its accuracy."""
    probabilities = F.softmax(model(images)["form"], dim=1)
    confidence, guess = probabilities.max(1)
    correct = (guess == labels).float()
    edges = torch.linspace(0.5, 1.0, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            error += float(inside.float().mean() * (confidence[inside].mean() - correct[inside].mean()).abs())
    return round(error, 4)


@torch.no_grad()
def accuracy(model: JudgeNet, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    out = model(images)
    return {k: float((out[k].argmax(1) == v).float().mean()) for k, v in labels.items()}


def train_judge(steps: int = 1000, batch: int = 64, seed: int = 0, progress=print,
                checkpoints: BuildCheckpoints | None = None) -> tuple[JudgeNet, dict]:
    """Train on 6,000 degraded renders, validate on 600 others (another seed) and measure form recall per
    class; returns the net and its accuracies."""
    torch.manual_seed(seed)
    model = JudgeNet(len(named_palettes()))
    images, labels = render_set(min(TRAIN_RENDERS, steps * batch), seed)  # no more than it will look at
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    saved = checkpoints.load("judge") if checkpoints is not None else None
    model.train()
    for step in resumable_steps(checkpoints, "judge", steps, model, optimizer, schedule, generator, saved):
        pick = torch.randint(0, len(images), (batch,), generator=generator)
        out = model(images[pick])
        loss = sum(F.cross_entropy(out[k], labels[k][pick]) for k in labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step + 1 == steps:
            progress(f"judge: step {step + 1}/{steps} loss {loss.item():.3f}")
    model.eval()
    validation = render_set(VALIDATION_RENDERS, seed + 1)
    return model, {"train": accuracy(model, images, labels), "validation": accuracy(model, *validation),
                   "form_calibration_error": calibration_error(model, validation[0], validation[1]["form"]),
                   "form_recall": form_recall(model, seed + 2)}


def build_judge(out_dir: str | Path, steps: int = 1000, seed: int = 0, progress=print,
                checkpoints: BuildCheckpoints | None = None) -> dict:
    """Train the judge and write its weights and accuracies (whole or not at all)."""
    started = time.monotonic()
    model, accuracies = train_judge(steps=steps, seed=seed, progress=progress, checkpoints=checkpoints)
    info = {"seed": seed, "steps": steps, "accuracy": accuracies, "palettes": list(named_palettes()), "forms": FORMS,
            "categories": list(CATEGORIES), "seconds": round(time.monotonic() - started, 1)}
    save_built(out_dir, STEM, model, info)
    at_vae_error = accuracies["form_recall"][f"{RECALL_NOISE[1]:g}"]
    progress(f"judge: built in {info['seconds']} s; validation accuracy {accuracies['validation']}; form recall "
             f"at noise {RECALL_NOISE[1]:g} (form/layout) {at_vae_error}")
    return info


class JudgeUnavailable(FileNotFoundError):
    pass


def load_judge(folder: str | Path) -> JudgeNet:
    return load_built(folder, STEM, lambda info: JudgeNet(len(info["palettes"])), JudgeUnavailable,
                      "features.judge: no planted judge")


@torch.no_grad()
def stereotype_form_share(model: JudgeNet, images: torch.Tensor) -> np.ndarray:
    """Per image in [-1, 1], whether the judge sees the stereotype's form (shape, whatever the colours)."""
    return (model(images)["form"].argmax(1) == FORMS.index(STEREOTYPE)).numpy()
