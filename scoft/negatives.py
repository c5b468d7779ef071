"""Negatives: the pretrained model's own samples for each training caption (its biased images).

Each image is keyed by (base model fingerprint, caption, seed, sampler settings): a file already
made under the same key is reused, so a CCUB update samples only new or changed records.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from scoft.ccub import TRAIN, Record
from scoft.io import read_jsonl, sha256_json, write_jsonl
from scoft.sample import hash_str

INDEX = "index.jsonl"


def read_negative_index(negatives_dir: str | Path) -> list[dict]:
    path = Path(negatives_dir) / INDEX
    return read_jsonl(path) if path.is_file() else []


def negative_seed(base_seed: int, record: Record, i: int) -> int:
    """Per (record, i), so adding a record never changes another record's negatives."""
    return (base_seed * 1_000_003 + hash_str(record.sha256[:8]) + i * 7919) % (2**63 - 1)


def plan_negatives(records: list[Record], fingerprint: str, settings: dict, per_image: int, base_seed: int) -> list[dict]:
    rows = []
    for r in records:
        if r.split != TRAIN:
            continue
        for i in range(per_image):
            seed = negative_seed(base_seed, r, i)
            key = sha256_json({"model": fingerprint, "caption": r.caption, "seed": seed, "settings": settings})
            rows.append({"record_id": r.id, "caption": r.caption, "seed": seed, "index": i, "key": key,
                         "file": f"{key[:32]}.png", "model_fingerprint": fingerprint, "settings": settings})
    return rows


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], settings: dict):
    """Batched sampling with one generator per image, so an image does not depend on its batch."""
    device = pipe.device
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    return pipe(
        prompt=prompts,
        generator=generators,
        num_inference_steps=settings["steps"],
        guidance_scale=settings["guidance_scale"],
        height=settings["resolution"],
        width=settings["resolution"],
        output_type="pil",
    ).images


def sample_negatives(pipe, plan: list[dict], out_dir: str | Path, batch_size: int, settings: dict,
                     progress=print) -> dict:
    """Make the planned images that are missing in out_dir, drop the unplanned ones, write the index."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    missing = [row for row in plan if not (out_dir / row["file"]).is_file()]
    for start in range(0, len(missing), batch_size):
        batch = missing[start : start + batch_size]
        images = generate(pipe, [r["caption"] for r in batch], [r["seed"] for r in batch], settings)
        for row, image in zip(batch, images):
            tmp = out_dir / f".{row['file']}.tmp"
            image.save(tmp, format="PNG")
            os.replace(tmp, out_dir / row["file"])
        progress(f"negatives: {min(start + batch_size, len(missing))}/{len(missing)} sampled")
    planned = {row["file"] for row in plan}
    stale = [p for p in out_dir.glob("*.png") if p.name not in planned]
    for p in stale:
        p.unlink()
    write_jsonl(out_dir / INDEX, plan)
    return {"planned": len(plan), "sampled": len(missing), "reused": len(plan) - len(missing), "removed": len(stale)}
