"""CCUB records: the manifest schema, the held-out split, and the SCoFT imagefolder source."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from scoft.io import BadImage, atomic_dir, load_rgb, pixel_hash, read_jsonl, write_jsonl

MANIFEST = "manifest.jsonl"
TRAIN, HELDOUT = "train", "heldout"


@dataclass(frozen=True)
class Record:
    id: str
    culture: str
    category: str
    caption: str
    generic_caption: str
    file: str  # relative to the CCUB folder
    sha256: str  # pixel hash (scoft.io.pixel_hash) of the stored RGB image
    width: int
    height: int
    source_url: str
    created_at: str
    split: str


class IngestError(ValueError):
    """One or more source rows cannot be ingested; the message names each of them."""


def split_for(sha256: str, heldout_fraction: float) -> str:
    """Held-out or train from the content hash alone, so adding records never moves another."""
    return HELDOUT if int(sha256[:8], 16) / 0x1_0000_0000 < heldout_fraction else TRAIN


def read_manifest(ccub_dir: str | Path) -> list[Record]:
    return [Record(**row) for row in read_jsonl(Path(ccub_dir) / MANIFEST)]


def _find_metadata(source: Path) -> Path:
    for candidate in (source / "metadata.jsonl", source / "train" / "metadata.jsonl"):
        if candidate.is_file():
            return candidate
    raise IngestError(f"{source}: no metadata.jsonl (looked in the folder and in train/)")


def _row_problem(row: dict, root: Path) -> tuple[Path | None, str | None]:
    """Return (image path, None) for a usable row, or (None, reason)."""
    name = row.get("file_name")
    if not isinstance(name, str) or not name:
        return None, "file_name is missing"
    if Path(name).is_absolute() or ".." in Path(name).parts:
        return None, f"file_name {name!r} points outside the dataset folder"
    path = (root / name).resolve()
    # resolve() follows symlinks: a link that leaves the dataset is refused here too.
    if not path.is_relative_to(root.resolve()):
        return None, f"file_name {name!r} resolves outside the dataset folder"
    for key in ("text", "country_code", "category_code"):
        if not isinstance(row.get(key, ""), str):
            return None, f"{key} is not a string"
    if not row.get("country_code") or not row.get("category_code"):
        return None, "country_code and category_code are required"
    return path, None


def read_imagefolder(source: str | Path, heldout_fraction: float, max_pixels: int):
    """Yield (Record, RGB image) for every row of a SCoFT imagefolder, or raise naming bad rows."""
    source = Path(source)
    meta = _find_metadata(source)
    root = meta.parent
    problems: list[str] = []
    loaded = []
    for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{meta}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not valid JSON ({e.msg})")
            continue
        path, reason = _row_problem(row, root)
        if reason:
            problems.append(f"{where} ({row.get('file_name')!r}): {reason}")
            continue
        try:
            image = load_rgb(path, max_pixels)
        except BadImage as e:
            problems.append(f"{where} ({row['file_name']!r}): {e}")
            continue
        loaded.append((row, image))
    if problems:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise IngestError(f"{len(problems)} bad row(s) in {meta}:\n  {shown}{more}")
    for row, image in loaded:
        digest = pixel_hash(image)
        culture = row["country_code"].strip().upper()
        record = Record(
            id=digest[:16],
            culture=culture,
            category=row["category_code"].strip().upper(),
            caption=(row.get("text") or "").strip(),
            generic_caption=(row.get("blip_text") or "").strip(),
            file=f"images/{culture}/{digest[:16]}.png",
            sha256=digest,
            width=image.width,
            height=image.height,
            source_url=row.get("url") or f"file:{row['file_name']}",
            created_at=row.get("created_at") or "",
            split=split_for(digest, heldout_fraction),
        )
        yield record, image


def ingest(source: str | Path, out_dir: str | Path, heldout_fraction: float, max_pixels: int) -> list[Record]:
    """Normalise a source into out_dir (images + manifest), replacing it whole or not at all."""
    records = []
    # Decode and check every row before anything is written: a bad source changes nothing.
    pairs = list(read_imagefolder(source, heldout_fraction, max_pixels))
    with atomic_dir(out_dir) as tmp:
        seen: set[str] = set()
        for record, image in pairs:
            if record.sha256 in seen:  # the same picture twice is one record (issue: duplicates)
                continue
            seen.add(record.sha256)
            dest = tmp / record.file
            dest.parent.mkdir(parents=True, exist_ok=True)
            image.save(dest, format="PNG")
            records.append(record)
        records.sort(key=lambda r: (r.culture, r.category, r.id))
        write_jsonl(tmp / MANIFEST, (asdict(r) for r in records))
    return records
