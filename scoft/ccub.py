"""CCUB records and incremental ingestion: sources in, `data/ccub/` (images + manifest) out.

Ingestion is incremental: a row whose image location, created_at and change marker match the
previous version reuses its stored image without fetching; rows gone from the sources are dropped.
Bad rows are rejected one by one with a reason; the run fails only when too many are.
The folder is replaced whole or not at all, and not rewritten when nothing changed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from scoft.config import redact_credentials
from scoft.fetch import FetchError, FetchPolicy
from scoft.io import (
    BadImage,
    DecodeBudget,
    atomic_dir,
    atomic_write_bytes,
    decode_rgb,
    decoded_bytes,
    dvc_dir_hash,
    limit_malloc_arenas,
    pixel_hash,
    read_jsonl,
    recover_swap,
    release_freed_memory,
    write_json,
    write_jsonl,
)
from scoft.sources import SourceRow, read_sources, rejection

MANIFEST = "manifest.jsonl"
# Views of the manifest, so that each stage depends on the records it reads and nothing else (dvc.yaml):
# cultures/<CULTURE>.jsonl holds one culture's records (its evaluation's), training/<CULTURE>.jsonl its
# training records only (its negatives' and training's: a held-out record added re-evaluates, never
# retrains), heldout.jsonl every culture's held-out records (each culture's evaluation retrieves among
# all cultures' held-out images).
CULTURES_DIR, TRAINING_DIR, HELDOUT_MANIFEST = "cultures", "training", "heldout.jsonl"
TRAIN, HELDOUT = "train", "heldout"
DEFAULT_DECODED_BYTES = 1 << 30  # ingest.max_decoded_bytes


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


def read_training(ccub_dir: str | Path, culture: str | None = None) -> list[Record]:
    """One culture's training records (none when CCUB has none), or every culture's, from the training
    views alone: what the negatives and training stages declare they read."""
    folder = Path(ccub_dir) / TRAINING_DIR
    views = [folder / f"{culture}.jsonl"] if culture is not None else sorted(folder.glob("*.jsonl"))
    return [Record(**row) for view in views if view.is_file() for row in read_jsonl(view)]


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
           s3_endpoint_url: str | None = None, bounds=None, progress=print,
           max_decoded_bytes: int = DEFAULT_DECODED_BYTES) -> dict:
    """Bring out_dir up to date with the sources; return the summary (version, counts, rejected).

    Each new image is fetched, decoded, hashed and written as PNG in the worker pool, one at a time per
    worker and at most `max_decoded_bytes` of decoded pixels at once, into a staging folder that
    outlives a killed or timed-out run: peak memory does not grow with the number of rows, and a retry
    fetches only what the last try did not write. Fetching stops as soon as so many rows are rejected
    that the run can no longer pass. `bounds` (validate's ValidateParams), when given, rejects each
    record outside its per-record bounds."""
    out_dir = Path(out_dir)
    try:
        read = read_sources(sources, policy, s3_endpoint_url)
    except FetchError as e:
        raise IngestError(f"cannot read source: {redact_credentials(str(e))}") from e
    for line in read.notes:
        progress(f"ingest: {line}")
    rejected = list(read.rejected)
    for line in recover_swap(out_dir):  # a killed ingest's previous version is the cache of this one
        progress(f"ingest: {line}")
    previous = _previous(out_dir)
    rows, skipped = _configured_cultures_only(read.rows, bounds)
    for row in skipped:
        progress(f"ingest: skipped {row['row']}: {row['reason']}")
    staging = Staging(out_dir)
    to_fetch = [row for row in rows if not _reusable(row, previous.get(row.location))]
    staged = {row.location: facts for row in to_fetch if (facts := staging.lookup(row)) is not None}
    progress(f"ingest: {len(rows)} rows, {len(rows) - len(to_fetch)} reused, {len(staged)} written by an "
             f"earlier try, fetching {len(to_fetch) - len(staged)}")
    limit = _RejectionLimit(len(rows) + len(rejected), max_rejected_fraction, out_dir)
    limit.check(rejected, fetching=True)
    staged |= _stage_all([row for row in to_fetch if row.location not in staged], staging, max_pixels, captioner,
                         workers, DecodeBudget(max_decoded_bytes), limit, rejected)

    records, by_hash = [], {}
    for row in rows:
        facts = staged.get(row.location)
        if facts is None and not _reusable(row, previous.get(row.location)):
            continue  # rejected while fetching
        record = _record(row, facts, previous.get(row.location), out_dir, heldout_fraction, captioner)
        if bounds is not None and (reason := out_of_bounds(record, bounds)):
            rejected.append(rejection(row.ref, row.raw, reason))
            continue
        if record.sha256 in by_hash:
            rejected.append(rejection(row.ref, row.raw, f"same image as {by_hash[record.sha256]}"))
            continue
        by_hash[record.sha256] = row.ref
        records.append(record)
    limit.check(rejected)
    records.sort(key=lambda r: (r.culture, r.category, r.id))
    counts = _counts(records, previous)
    cultures = sorted({r.culture for r in records} | set(bounds.cultures if bounds is not None else []))
    views = [out_dir / HELDOUT_MANIFEST,
             *(out_dir / folder / f"{c}.jsonl" for c in cultures for folder in (CULTURES_DIR, TRAINING_DIR))]
    written = {}
    if counts["added"] or counts["changed"] or counts["removed"] or not all(v.is_file() for v in views):
        written = _write(out_dir, records, staged, previous, cultures)
    staging.clear()
    return {"version": dvc_dir_hash(out_dir, known=written), **counts, "records": len(records),
            "rejected": rejected, "skipped": skipped}


class _RejectionLimit:
    """max_rejected_fraction of all rows, checked as rejections come in: once more rows are rejected
    than the limit allows, the run cannot pass, so fetching the rest would only cost time (a source
    whose server never answers cost 83 s a row)."""

    def __init__(self, total: int, fraction: float, out_dir: Path):
        self.total, self.fraction, self.out_dir = total, fraction, out_dir

    def exceeded(self, rejected: list[dict]) -> bool:
        return bool(self.total and len(rejected) / self.total > self.fraction)

    def check(self, rejected: list[dict], fetching: bool = False) -> None:
        """Raise when `rejected` (every rejection so far) is over the limit; `fetching`: it stops the fetch."""
        if not self.exceeded(rejected):
            return
        shown = "\n  ".join(f"{r['row']}: {r['reason']}" for r in rejected[:50])
        when = "; stopped fetching, as the run can no longer pass" if fetching else ""
        raise IngestError(f"{len(rejected)} of {self.total} rows rejected, over the limit of "
                          f"{self.fraction:.0%}{when}; {self.out_dir} unchanged:\n  {shown}")


def _stage_all(rows: list[SourceRow], staging: Staging, max_pixels: int, captioner, workers: int,
               budget: DecodeBudget, limit: _RejectionLimit, rejected: list[dict]) -> dict[str, dict]:
    """Each row's staged facts by location; a row that fails goes to `rejected` with its reason. The
    workers count rejections themselves, so that once the run cannot pass no worker starts another
    row (a main thread slow to hear of it would let each worker start one more)."""
    staged, lock, hopeless = {}, threading.Lock(), threading.Event()
    # Fetching waits on the network, so `workers` threads fetch; decoding, hashing and encoding are CPU-bound,
    # and more of them at once than there are cores only holds more decoded images in memory.
    cores = threading.BoundedSemaphore(os.cpu_count() or 1)
    limit_malloc_arenas()

    def stage(row: SourceRow) -> None:
        if hopeless.is_set():
            return
        facts, reason = _stage_row(row, staging, max_pixels, captioner, budget, cores)
        with lock:
            if reason:
                rejected.append(rejection(row.ref, row.raw, reason))
                if limit.exceeded(rejected):
                    hopeless.set()
            else:
                staged[row.location] = facts

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for future in as_completed([pool.submit(stage, row) for row in rows]):
            future.result()
            if hopeless.is_set():
                break
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # those running finish within their deadline
    limit.check(rejected, fetching=True)
    return staged


def _stage_row(row: SourceRow, staging: Staging, max_pixels: int, captioner, budget: DecodeBudget,
               cores: threading.BoundedSemaphore):
    """(facts, None) once the row's image is in staging, or (None, reason). The decoded image's whole life
    (decoding, conversion, hashing, encoding) is inside the budget and on one of the cores."""
    try:
        data = row.fetch()
        with cores, budget.hold(decoded_bytes(data)):
            image = decode_rgb(data, max_pixels, row.location)
            del data
            generic = (row.generic_caption, "source") if row.generic_caption else (
                captioner(image, row.category), captioner.source)
            facts = staging.put(row, image, *generic)
            del image
            release_freed_memory()
            return facts, None
    except (FetchError, BadImage) as e:
        return None, str(e)


class Staging:
    """Images this ingest fetched and wrote, kept beside the output (`.ccub.staging/`) until the new
    version is in place: a run killed or stopped at its time limit leaves them to the retry, which
    fetches only the rows it still lacks. Keyed by the row's identity and change markers, so a row
    changed at the source since is fetched again."""

    def __init__(self, out_dir: Path):
        self.dir = out_dir.parent / f".{out_dir.name}.staging"

    def _key(self, row: SourceRow) -> str:
        return hashlib.sha256(json.dumps([row.location, row.created_at, row.etag]).encode()).hexdigest()[:32]

    def lookup(self, row: SourceRow) -> dict | None:
        key = self._key(row)
        try:
            facts = json.loads((self.dir / f"{key}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return {**facts, "png": str(self.dir / f"{key}.png")} if (self.dir / f"{key}.png").is_file() else None

    def put(self, row: SourceRow, image: Image.Image, generic_caption: str, generic_source: str) -> dict:
        """Write the PNG, then its facts (the facts file is what marks it complete)."""
        key = self._key(row)
        buffer = io.BytesIO()
        # compress_level 1: a third less CPU than Pillow's default 6 for a few percent more bytes;
        # encoding was 91% of a 3,000-row ingest's samples
        image.save(buffer, format="PNG", compress_level=1)
        data = buffer.getbuffer()
        facts = {"sha256": pixel_hash(image), "width": image.width, "height": image.height,
                 "md5": hashlib.md5(data).hexdigest(),
                 "generic_caption": generic_caption, "generic_caption_source": generic_source}
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.dir / f"{key}.png", data)
        write_json(self.dir / f"{key}.json", facts)
        return {**facts, "png": str(self.dir / f"{key}.png")}

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


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


def _record(row: SourceRow, facts: dict | None, old: Record | None, out_dir: Path, heldout_fraction: float,
            captioner) -> Record:
    """`facts`: what staging says of a newly fetched image; None: the previous version's image is reused
    (same image; metadata from the source as it is now)."""
    digest, width, height = (facts["sha256"], facts["width"], facts["height"]) if facts else (
        old.sha256, old.width, old.height)
    captioned = (facts["generic_caption"], facts["generic_caption_source"]) if facts else (
        old.generic_caption, old.generic_caption_source)
    if row.generic_caption:
        generic, generic_source = row.generic_caption, "source"
    elif captioned[1] == captioner.source:
        generic, generic_source = captioned
    else:
        with Image.open(Path(facts["png"]) if facts else out_dir / old.file) as stored:
            generic, generic_source = captioner(stored.convert("RGB"), row.category), captioner.source
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


def _write(out_dir: Path, records: list[Record], staged: dict[str, dict], previous: dict[str, Record],
           cultures: list[str]) -> dict[str, str]:
    """The folder whole: images (linked from staging or the previous version: nothing is encoded
    again), the manifest and its views (one per culture, configured ones without records as empty
    files, so their stages find their input and skip). Returns the md5s of the new images by path."""
    old_files = {r.sha256: out_dir / r.file for r in previous.values()}
    new_images = {facts["sha256"]: facts for facts in staged.values()}
    md5s = {}
    with atomic_dir(out_dir) as tmp:
        for record in records:
            dest = tmp / record.file
            dest.parent.mkdir(parents=True, exist_ok=True)
            if record.sha256 in new_images and not dest.exists():
                _link_or_copy(Path(new_images[record.sha256]["png"]), dest)
                md5s[record.file] = new_images[record.sha256]["md5"]
            elif not dest.exists():
                _link_or_copy(old_files[record.sha256], dest)
        write_jsonl(tmp / MANIFEST, (asdict(r) for r in records))
        write_jsonl(tmp / HELDOUT_MANIFEST, (asdict(r) for r in records if r.split == HELDOUT))
        (tmp / CULTURES_DIR).mkdir()
        (tmp / TRAINING_DIR).mkdir()
        for culture in cultures:
            own = [asdict(r) for r in records if r.culture == culture]
            write_jsonl(tmp / CULTURES_DIR / f"{culture}.jsonl", own)
            write_jsonl(tmp / TRAINING_DIR / f"{culture}.jsonl", (r for r in own if r["split"] == TRAIN))
    return md5s


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)  # same filesystem: no copy; files are never modified in place
    except OSError:
        shutil.copy2(src, dest)

