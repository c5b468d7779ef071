"""CCUB records and incremental ingestion: sources in, `data/ccub/` (images + manifest) out.

Ingestion is incremental: a row whose image location, created_at and change marker match the
previous version reuses its stored image without fetching; rows gone from the sources are dropped.
Bad rows are rejected one by one with a reason; the run fails only when too many are.
The folder is replaced whole or not at all, and not rewritten when nothing changed.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from scoft.fetch import FetchError, FetchPolicy
from scoft.io import BadImage, atomic_dir, decode_rgb, dvc_dir_hash, pixel_hash, read_jsonl, recover_swap, write_jsonl
from scoft.sources import SourceRow, read_sources

MANIFEST = "manifest.jsonl"
# Per-culture views of the manifest, so that a culture's stages depend on its own records only (dvc.yaml):
# cultures/<CULTURE>.jsonl holds one culture's records, heldout.jsonl every culture's held-out records
# (each culture's evaluation retrieves among all cultures' held-out images).
CULTURES_DIR, HELDOUT_MANIFEST = "cultures", "heldout.jsonl"
TRAIN, HELDOUT = "train", "heldout"


@dataclass(frozen=True)
class Record:
    id: str
    culture: str
    category: str
    caption: str
    generic_caption: str
    generic_caption_source: str  # "source", "fallback" or "model:<id>"
    file: str  # relative to the CCUB folder
    sha256: str  # pixel hash (scoft.io.pixel_hash) of the stored RGB image
    width: int
    height: int
    source_url: str  # provenance: licences vary per image
    location: str  # where the image was fetched from; the row's identity across versions
    etag: str | None  # the source's change marker when it has one
    created_at: str
    split: str


class IngestError(ValueError):
    """Ingestion refused its sources (too many bad rows, an unreadable source)."""


def split_for(sha256: str, heldout_fraction: float) -> str:
    """Held-out or train from the content hash alone, so adding records never moves another."""
    return HELDOUT if int(sha256[:8], 16) / 0x1_0000_0000 < heldout_fraction else TRAIN


def read_manifest(ccub_dir: str | Path, culture: str | None = None) -> list[Record]:
    """Every record, or one culture's (none when CCUB has no record of that culture)."""
    if culture is None:
        return [Record(**row) for row in read_jsonl(Path(ccub_dir) / MANIFEST)]
    path = Path(ccub_dir) / CULTURES_DIR / f"{culture}.jsonl"
    return [Record(**row) for row in read_jsonl(path)] if path.is_file() else []


def read_heldout(ccub_dir: str | Path) -> list[Record]:
    """Every culture's held-out records."""
    return [Record(**row) for row in read_jsonl(Path(ccub_dir) / HELDOUT_MANIFEST)]


def _previous(out_dir: Path) -> dict[str, Record]:
    if not (out_dir / MANIFEST).is_file():
        return {}
    try:
        return {r.location: r for r in read_manifest(out_dir) if (out_dir / r.file).is_file()}
    except (TypeError, ValueError, KeyError):
        return {}  # an older or damaged manifest: fetch everything again


def _reusable(row: SourceRow, old: Record | None) -> bool:
    return old is not None and old.created_at == row.created_at and old.etag == row.etag


def _fetch_image(row: SourceRow, max_pixels: int):
    try:
        return decode_rgb(row.fetch(), max_pixels, row.location), None
    except (FetchError, BadImage) as e:
        return None, str(e)


def out_of_bounds(record: Record, bounds) -> str | None:
    """Why one record breaks validate's per-record bounds (a ValidateParams), or None: ingest rejects
    such a row alone, so the validate stage, which checks the set, is not stopped by one row."""
    b, aspect, chars = bounds, record.width / record.height, len(record.caption)
    if not (b.min_side <= min(record.width, record.height) and max(record.width, record.height) <= b.max_side):
        return f"image {record.width}x{record.height} outside validate.min_side..max_side ({b.min_side}..{b.max_side})"
    if not b.min_aspect <= aspect <= b.max_aspect:
        return f"aspect {aspect:.3g} outside validate.min_aspect..max_aspect ({b.min_aspect:g}..{b.max_aspect:g})"
    if not b.caption_min_chars <= chars <= b.caption_max_chars:
        return (f"caption of {chars} characters outside validate.caption_min_chars..caption_max_chars "
                f"({b.caption_min_chars}..{b.caption_max_chars})")
    return None


def ingest(sources: list[str], out_dir: str | Path, *, heldout_fraction: float, max_pixels: int,
           max_rejected_fraction: float, captioner, policy: FetchPolicy = FetchPolicy(), workers: int = 8,
           s3_endpoint_url: str | None = None, bounds=None, progress=print) -> dict:
    """Bring out_dir up to date with the sources; return the summary (version, counts, rejected).

    `bounds` (validate's ValidateParams), when given, rejects each record outside its per-record bounds."""
    out_dir = Path(out_dir)
    try:
        read = read_sources(sources, policy, s3_endpoint_url)
    except FetchError as e:
        raise IngestError(f"cannot read source: {e}") from e
    rejected = list(read.rejected)
    for line in recover_swap(out_dir):  # a killed ingest's previous version is the cache of this one
        progress(f"ingest: {line}")
    previous = _previous(out_dir)
    rows, skipped = _configured_cultures_only(read.rows, bounds)
    for row in skipped:
        progress(f"ingest: skipped {row['row']}: {row['reason']}")
    to_fetch = [row for row in rows if not _reusable(row, previous.get(row.location))]
    progress(f"ingest: {len(rows)} rows, {len(rows) - len(to_fetch)} reused, fetching {len(to_fetch)}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        fetched = dict(zip((r.location for r in to_fetch), pool.map(lambda r: _fetch_image(r, max_pixels), to_fetch)))

    records, images, by_hash = [], {}, {}
    for row in rows:
        image, reason = fetched.get(row.location, (None, None))
        if reason:
            rejected.append({"row": row.ref, "source_row": row.raw, "reason": reason})
            continue
        record = _record(row, image, previous.get(row.location), out_dir, heldout_fraction, captioner)
        if bounds is not None and (reason := out_of_bounds(record, bounds)):
            rejected.append({"row": row.ref, "source_row": row.raw, "reason": reason})
            continue
        if record.sha256 in by_hash:
            rejected.append(
                {"row": row.ref, "source_row": row.raw, "reason": f"same image as {by_hash[record.sha256]}"}
            )
            continue
        by_hash[record.sha256] = row.ref
        records.append(record)
        if image is not None:
            images[record.file] = image

    total = len(records) + len(rejected)
    if total and len(rejected) / total > max_rejected_fraction:
        shown = "\n  ".join(f"{r['row']}: {r['reason']}" for r in rejected[:50])
        raise IngestError(f"{len(rejected)} of {total} rows rejected, over the limit of "
                          f"{max_rejected_fraction:.0%}; {out_dir} unchanged:\n  {shown}")
    records.sort(key=lambda r: (r.culture, r.category, r.id))
    counts = _counts(records, previous)
    cultures = sorted({r.culture for r in records} | set(bounds.cultures if bounds is not None else []))
    views = [out_dir / HELDOUT_MANIFEST, *(out_dir / CULTURES_DIR / f"{c}.jsonl" for c in cultures)]
    if counts["added"] or counts["changed"] or counts["removed"] or not all(v.is_file() for v in views):
        _write(out_dir, records, images, previous, cultures)
    return {"version": dvc_dir_hash(out_dir), **counts, "records": len(records), "rejected": rejected,
            "skipped": skipped}


def _configured_cultures_only(rows: list[SourceRow], bounds) -> tuple[list[SourceRow], list[dict]]:
    """The rows of the configured cultures (validate.cultures), and the others named with the reason:
    a culture nobody configured is never trained, and a new culture's sheet is not bad data either."""
    if bounds is None:
        return rows, []
    keep = [r for r in rows if r.culture in bounds.cultures]
    skipped = [{"row": r.ref, "culture": r.culture, "reason": f"culture {r.culture!r} is not in validate.cultures "
                f"({', '.join(bounds.cultures)}): not ingested, not trained"} for r in rows
               if r.culture not in bounds.cultures]
    return keep, skipped


def _record(row: SourceRow, image, old: Record | None, out_dir: Path, heldout_fraction: float, captioner) -> Record:
    reused = image is None  # same image as the previous version; metadata from the source as it is now
    digest, width, height = (
        (old.sha256, old.width, old.height) if reused else (pixel_hash(image), image.width, image.height)
    )
    if row.generic_caption:
        generic, generic_source = row.generic_caption, "source"
    elif reused and old.generic_caption_source == captioner.source:
        generic, generic_source = old.generic_caption, old.generic_caption_source
    else:
        if reused:
            with Image.open(out_dir / old.file) as stored:
                image = stored.convert("RGB")
        generic, generic_source = captioner(image, row.category), captioner.source
    return Record(
        id=digest[:16], culture=row.culture, category=row.category, caption=row.caption,
        generic_caption=generic, generic_caption_source=generic_source,
        file=f"images/{row.culture}/{digest[:16]}.png", sha256=digest, width=width, height=height,
        source_url=row.source_url, location=row.location, etag=row.etag, created_at=row.created_at,
        split=split_for(digest, heldout_fraction),
    )


def _counts(records: list[Record], previous: dict[str, Record]) -> dict:
    now = {r.location: r for r in records}
    added = sum(1 for loc in now if loc not in previous)
    changed = sum(1 for loc, r in now.items() if loc in previous and previous[loc] != r)
    removed = sum(1 for loc in previous if loc not in now)
    return {"added": added, "changed": changed, "removed": removed, "unchanged": len(now) - added - changed}


def _write(out_dir: Path, records: list[Record], images: dict, previous: dict[str, Record],
           cultures: list[str]) -> None:
    """The folder whole: images, the manifest and its views (one per culture, configured ones without
    records as empty files, so their stages find their input and skip)."""
    old_files = {r.sha256: out_dir / r.file for r in previous.values()}
    with atomic_dir(out_dir) as tmp:
        for record in records:
            dest = tmp / record.file
            dest.parent.mkdir(parents=True, exist_ok=True)
            if record.file in images:
                images[record.file].save(dest, format="PNG")
            else:
                _link_or_copy(old_files[record.sha256], dest)
        write_jsonl(tmp / MANIFEST, (asdict(r) for r in records))
        write_jsonl(tmp / HELDOUT_MANIFEST, (asdict(r) for r in records if r.split == HELDOUT))
        (tmp / CULTURES_DIR).mkdir()
        for culture in cultures:
            write_jsonl(tmp / CULTURES_DIR / f"{culture}.jsonl", (asdict(r) for r in records if r.culture == culture))


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)  # same filesystem: no copy; files are never modified in place
    except OSError:
        shutil.copy2(src, dest)

