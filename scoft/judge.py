"""The planted world's judge, built apart from the training path.

A small CNN trained on renders of its own (scoft.sample.draw with its own seeds, both forms, both
layouts, named and random palettes), never on the CCUB sample, the web the base learned from, or any
model's output. Three heads: the category, the form (the community's truth or the web's stereotype:
shape only, since half the renders are in random colours) and the palette (each culture's truth or
stereotype palette, or another). Its accuracy on renders it never saw is measured at build time and
kept beside its weights (judge.json), so what it claims is checked:
- as the oracle (bench/planted_bias.py, tests): the share of a culture's images drawn in the
  stereotype's *form*, which a palette shift alone cannot change;
- as the offline evaluation backbone (features.evaluation: planted-judge): the cosine distance
  between its penultimate embeddings, which see shape and colour together, where the colour histogram
  saw colour alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scoft.io import atomic_dir, write_json
from scoft.sample import CATEGORIES, CULTURES, HELDOUT_LAYOUT, STEREOTYPE, TRAIN_LAYOUT, TRUTH, draw, hash_str

WEIGHTS, INFO = "judge.pt", "judge.json"
RESOLUTION = 32
FORMS = [TRUTH, STEREOTYPE]
EMBEDDING = 128


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


def render_set(n: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """n labelled renders in [-1, 1]; half in a named palette, half in random colours."""
    palettes = list(named_palettes().items())
    rng = np.random.default_rng([hash_str("judge"), seed])
    images, labels = [], {"category": [], "form": [], "palette": []}
    for _ in range(n):
        category, form = int(rng.integers(len(CATEGORIES))), int(rng.integers(len(FORMS)))
        named = rng.random() < 0.5
        p = int(rng.integers(len(palettes)))
        colours = palettes[p][1] if named else tuple(tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
        layout = HELDOUT_LAYOUT if rng.random() < 0.5 else TRAIN_LAYOUT
        images.append(draw(list(CATEGORIES)[category], *colours, rng, RESOLUTION, FORMS[form], layout))
        labels["category"].append(category)
        labels["form"].append(form)
        labels["palette"].append(p if named else len(palettes))
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return (torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1,
            {k: torch.tensor(v) for k, v in labels.items()})


@torch.no_grad()
def accuracy(model: JudgeNet, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    out = model(images)
    return {k: float((out[k].argmax(1) == v).float().mean()) for k, v in labels.items()}


def train_judge(steps: int = 500, batch: int = 64, seed: int = 0, progress=print) -> tuple[JudgeNet, dict]:
    """Train on 3,000 renders, validate on 600 others (another seed); returns the net and its accuracies."""
    torch.manual_seed(seed)
    model = JudgeNet(len(named_palettes()))
    images, labels = render_set(3000, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        pick = torch.randint(0, len(images), (batch,), generator=generator)
        out = model(images[pick])
        loss = sum(F.cross_entropy(out[k], labels[k][pick]) for k in labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0:
            progress(f"judge: step {step}/{steps} loss {loss.item():.3f}")
    model.eval()
    return model, {"train": accuracy(model, images, labels), "validation": accuracy(model, *render_set(600, seed + 1))}


def build_judge(out_dir: str | Path, steps: int = 500, seed: int = 0, progress=print) -> dict:
    """Train the judge and write its weights and accuracies (whole or not at all)."""
    started = time.monotonic()
    model, accuracies = train_judge(steps=steps, seed=seed, progress=progress)
    info = {"seed": seed, "steps": steps, "accuracy": accuracies, "palettes": list(named_palettes()), "forms": FORMS,
            "categories": list(CATEGORIES), "seconds": round(time.monotonic() - started, 1)}
    with atomic_dir(out_dir) as tmp:
        torch.save(model.state_dict(), tmp / WEIGHTS)
        write_json(tmp / INFO, info)
    progress(f"judge: built in {info['seconds']} s; validation accuracy {accuracies['validation']}")
    return info


class JudgeUnavailable(FileNotFoundError):
    pass


def load_judge(folder: str | Path) -> JudgeNet:
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file():
        raise JudgeUnavailable(f"features.judge: no planted judge in {folder}: the `base` stage builds it beside "
                               "the planted base (model.base: tiny): run `dvc repro base` first")
    info = json.loads((folder / INFO).read_text(encoding="utf-8"))
    model = JudgeNet(len(info["palettes"]))
    model.load_state_dict(torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def stereotype_form_share(model: JudgeNet, images: torch.Tensor) -> np.ndarray:
    """Per image in [-1, 1], whether the judge sees the stereotype's form (shape, whatever the colours)."""
    return (model(images)["form"].argmax(1) == FORMS.index(STEREOTYPE)).numpy()
