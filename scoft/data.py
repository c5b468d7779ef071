"""Training data: CCUB images with their captions and negatives, as tensors in [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from scoft.ccub import Record, read_training
from scoft.negatives import read_negative_index


def image_transform(resolution: int) -> T.Compose:
    """Resize the short side, centre-crop, scale to [-1, 1] (the reference's preprocessing)."""
    return T.Compose([
        T.ToImage(),
        T.Resize(resolution, antialias=True),
        T.CenterCrop(resolution),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize([0.5], [0.5]),
    ])


def load_image_tensor(path: str | Path, resolution: int) -> torch.Tensor:
    with Image.open(path) as im:
        return image_transform(resolution)(im.convert("RGB"))


class CCUBTrainSet(Dataset):
    """Train-split records (of one culture, when given: one LoRA per culture, as the paper); each item
    carries up to k negatives and a mask of which are real."""

    def __init__(self, ccub_dir: str | Path, negatives_dir: str | Path | None, resolution: int, per_image: int,
                 culture: str | None = None):
        self.ccub_dir = Path(ccub_dir)
        self.records: list[Record] = read_training(ccub_dir, culture)
        if not self.records:
            which = f"culture {culture}" if culture else "any culture"
            raise ValueError(f"{ccub_dir}: no training records of {which} (none, or every one held out)")
        self.resolution = resolution
        self.k = per_image
        by_record: dict[str, list[Path]] = {}
        if negatives_dir is not None:
            for row in read_negative_index(negatives_dir):
                by_record.setdefault(row["record_id"], []).append(Path(negatives_dir) / row["file"])
        self.negatives = by_record

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        negatives = torch.zeros(self.k, 3, self.resolution, self.resolution)
        mask = torch.zeros(self.k, dtype=torch.bool)
        for j, path in enumerate(self.negatives.get(r.id, [])[: self.k]):
            negatives[j] = load_image_tensor(path, self.resolution)
            mask[j] = True
        return {
            "image": load_image_tensor(self.ccub_dir / r.file, self.resolution),
            "caption": r.caption,
            "generic_caption": r.generic_caption,
            "negatives": negatives,
            "negative_mask": mask,
        }
