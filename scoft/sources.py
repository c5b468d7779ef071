"""CCUB sources: sheet CSV exports (file or URL), SCoFT imagefolders, and S3 prefixes.

Every source becomes a list of `SourceRow`s plus a list of rejected rows, each with the source
row and a reason. Structural problems (missing columns, bad country codes, disallowed URL
schemes, duplicates, text that is not UTF-8) are found here, before anything is fetched.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from scoft.config import is_alpha3, redact_credentials
from scoft.fetch import FetchError, FetchPolicy, check_url, fetch_http, fetch_local, fetch_s3, split_s3_uri
from scoft.text import first_control

# Accepted column names, first the CCUB sheet's, then the SCoFT imagefolder's.
ALIASES = {
    "culture": ("country_code", "culture"),
    "category": ("category_code", "category"),
    "caption": ("caption", "text"),
    "generic_caption": ("blip_text", "generic_caption"),
    "url": ("url",),
    "file_name": ("file_name",),
    "created_at": ("created_at",),
}
REQUIRED = ("culture", "category", "caption")


@dataclass(frozen=True)
class SourceRow:
    ref: str  # where the row is, for messages: "sheet.csv:12"
    location: str  # where the image is; the row's identity across versions
    source_url: str  # provenance (licence): the row's url, else its location
    culture: str
    category: str
    caption: str
    generic_caption: str
    created_at: str
    etag: str | None  # a cheap change marker when the source has one (S3 ETag, local file hash)
    raw: dict = field(compare=False, hash=False)
    fetch: Callable[[], bytes] = field(compare=False, hash=False, repr=False)


EXCERPT_CHARS, EXCERPT_FIELDS = 200, 20


def excerpt(raw: dict) -> dict:
    """A bounded, credential-free copy of a source row for messages and summary.json: a rejected
    200 MB caption was copied whole into a 209 MB summary. Long values keep their start and length."""
    out = {}
    for key, value in list(raw.items())[:EXCERPT_FIELDS]:
        key = redact_credentials(str(key))[:EXCERPT_CHARS]
        if isinstance(value, str):
            text = redact_credentials(value[:EXCERPT_CHARS * 2])[:EXCERPT_CHARS]
            value = text if len(value) <= EXCERPT_CHARS else f"{text}... ({len(value)} characters)"
        elif not isinstance(value, (int, float, bool, type(None))):
            value = f"({type(value).__name__})"
        out[key] = value
    if len(raw) > EXCERPT_FIELDS:
        out["..."] = f"{len(raw) - EXCERPT_FIELDS} more fields"
    return out


def rejection(ref: str, raw: dict, reason: str) -> dict:
    """A rejected row as summary.json and the log show it: where, a bounded excerpt, why."""
    return {"row": redact_credentials(ref), "source_row": excerpt(raw), "reason": redact_credentials(reason)}


@dataclass
class SourceRows:
    rows: list[SourceRow] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # said once per source, e.g. credentials removed

    def reject(self, ref: str, raw: dict, reason: str) -> None:
        self.rejected.append(rejection(ref, raw, reason))

    def extend(self, other: SourceRows) -> None:
        self.rows += other.rows
        self.rejected += other.rejected
        self.notes += other.notes


def _pick(raw: dict, name: str) -> str:
    for key in ALIASES[name]:
        value = raw.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def _has_bad_text(raw: dict) -> bool:
    """Text decoded with surrogateescape keeps undecodable bytes as lone surrogates."""
    return any(isinstance(v, str) and any("\udc80" <= ch <= "\udcff" for ch in v) for v in raw.values())


def _control_character(raw: dict) -> str | None:
    """Rows holding a control character (scoft.text) are rejected, not stripped: the sheet's author
    should see and fix the text."""
    for key, value in raw.items():
        if isinstance(value, str) and (where := first_control(value)):
            return f"{key} holds {where}"
    return None


def _columns_missing(columns: set[str]) -> list[str]:
    missing = [ALIASES[n][0] for n in REQUIRED if not columns & set(ALIASES[n])]
    if not columns & {"url", "file_name"}:
        missing.append("url (or file_name)")
    return missing


class _Builder:
    """Turns raw rows of one source into SourceRows, rejecting bad ones with a reason."""

    def __init__(self, locate: Callable[[str], tuple[str, Callable[[], bytes], str | None]], policy: FetchPolicy):
        self.locate, self.policy = locate, policy
        self.out = SourceRows()
        self.credentials: list[str] = []  # refs of rows whose image URL held user:password@

    def add(self, ref: str, raw: dict) -> None:
        if _has_bad_text(raw):
            return self.out.reject(ref, _printable(raw), "not valid UTF-8 text")
        if reason := _control_character(raw):
            return self.out.reject(ref, raw, reason)
        culture, category, caption = (
            _pick(raw, "culture").upper(),
            _pick(raw, "category").upper(),
            _pick(raw, "caption"),
        )
        url, name = _pick(raw, "url"), _pick(raw, "file_name")
        if not is_alpha3(culture):
            return self.out.reject(ref, raw, f"country code {culture or '(empty)'!r} is not ISO 3166-1 alpha-3")
        if not category:
            return self.out.reject(ref, raw, "category_code is empty")
        if not caption:
            return self.out.reject(ref, raw, "caption is empty")
        try:
            if name:
                location, fetch, etag = self.locate(name)
            elif url:
                check_url(url)
                # the image is fetched as the URL says, but its credentials are never stored or shown
                # (the manifest, which DVC pushes, and the logs): location and source_url go without them
                fetch, clean = (lambda u=url: fetch_http(u, self.policy)), redact_credentials(url)
                if clean != url:
                    self.credentials.append(ref)
                    raw = {k: redact_credentials(v) if isinstance(v, str) else v for k, v in raw.items()}
                    url = clean
                location, etag = url, None
            else:
                return self.out.reject(ref, raw, "neither url nor file_name given")
        except FetchError as e:
            return self.out.reject(ref, raw, str(e))
        self.out.rows.append(SourceRow(
            ref=ref, location=location, source_url=url or location, culture=culture, category=category,
            caption=caption, generic_caption=_pick(raw, "generic_caption"), created_at=_pick(raw, "created_at"),
            etag=etag, raw=raw, fetch=fetch))


    def finish(self, name: str) -> SourceRows:
        if self.credentials:
            self.out.notes.append(
                f"{redact_credentials(name)}: {len(self.credentials)} row(s) gave an image URL with credentials "
                f"(user:password@), first {redact_credentials(self.credentials[0])}: they are used to fetch and "
                "never stored (the manifest keeps the URL without them); give a sheet public or signed URLs")
        return self.out


def _printable(raw: dict) -> dict:
    return {k: v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if isinstance(v, str) else v
            for k, v in raw.items()}


def _parse_table(text: str, name: str, builder: _Builder) -> SourceRows:
    """metadata.jsonl (one JSON object per line) or CSV with a header row. A line that cannot be parsed
    is rejected with its reason like any other bad row, never the whole source."""
    if name.endswith(".jsonl"):
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            ref, shown = f"{name}:{lineno}", {"line": line}
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                builder.out.reject(ref, shown, f"not valid JSON ({e.msg})")
                continue
            except RecursionError:
                builder.out.reject(ref, shown, "JSON nested too deep to read")
                continue
            if not isinstance(raw, dict):
                builder.out.reject(ref, shown, "not a JSON object")
                continue
            builder.add(ref, raw)
        return builder.finish(name)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        missing = _columns_missing(set(reader.fieldnames or []))
    except csv.Error as e:
        raise FetchError(f"{redact_credentials(name)}: cannot read the CSV header ({e})") from e
    while True:
        start = reader.line_num + 1
        try:
            raw = next(reader)
        except StopIteration:
            break
        except csv.Error as e:  # e.g. a field over the csv module's limit of 131,072 characters
            builder.out.reject(f"{name}:{start}", {}, f"cannot read this CSV row ({e})")
            continue
        ref = f"{name}:{reader.line_num}" if reader.line_num == start else f"{name}:{start}-{reader.line_num}"
        if missing:
            builder.out.reject(ref, _printable(raw), f"missing column(s): {', '.join(missing)}")
        elif problem := _misquoted(raw, len(reader.fieldnames)):
            builder.out.reject(ref, _printable({k if k is not None else "(extra)": v for k, v in raw.items()}),
                               problem)
        else:
            builder.add(ref, {k: v for k, v in raw.items() if k is not None})
    return builder.finish(name)


def _misquoted(raw: dict, columns: int) -> str | None:
    """What a stray quote or delimiter did to a CSV row, if anything: a quote left open swallows the line
    break and the next rows' fields into one field, and the row then holds a line break, a URL in its
    caption, or another number of fields than the header. Such a row is rejected by name (its lines),
    never stored half-merged: before, two rows became one, silently."""
    if any(v.strip() for v in raw.get(None) or []):  # empty trailing fields are an export's habit, harmless
        return f"{columns + len(raw[None])} fields where the header has {columns}: a stray quote or delimiter?"
    raw = {k: v for k, v in raw.items() if k is not None}
    if any(v is None for v in raw.values()):
        return f"{sum(v is not None for v in raw.values())} fields where the header has {columns}"
    if broken := [k for k, v in raw.items() if "\n" in v or "\r" in v]:
        return (f"{', '.join(broken)} holds a line break: a quote left open merged this row with the next "
                "line(s); close the quote")
    caption = _pick(raw, "caption")
    if "://" in caption:
        return "caption holds a URL: a stray quote or delimiter may have merged a neighbour's fields"
    return None


def _decode(data: bytes) -> str:
    return data.decode("utf-8-sig", errors="surrogateescape")


def _local_locator(root: Path, label: str, policy: FetchPolicy):
    def locate(name: str):
        data = fetch_local(root, name, policy)  # validates the path; the bytes give a change marker
        return f"{label}/{name}", (lambda d=data: d), hashlib.sha256(data).hexdigest()
    return locate


def _no_files(name: str):
    raise FetchError(f"file_name {name!r} given, but this source has no folder (use url)")


def read_folder(path: Path, policy: FetchPolicy) -> SourceRows:
    """A SCoFT imagefolder: metadata.jsonl (or a CSV) in the folder or its train/ subfolder."""
    for root in (path, path / "train"):
        tables = [root / "metadata.jsonl"] if (root / "metadata.jsonl").is_file() else sorted(root.glob("*.csv"))
        if tables:
            out = SourceRows()
            for table in tables:
                builder = _Builder(_local_locator(root, str(root), policy), policy)
                out.extend(_parse_table(_decode(table.read_bytes()), str(table), builder))
            return out
    raise FetchError(f"{path}: no metadata.jsonl or CSV file (looked in the folder and in train/)")


def read_csv(spec: str, policy: FetchPolicy) -> SourceRows:
    """A CCUB sheet export, by local path or http(s) URL; images come by url (or next to a local file)."""
    if urlparse(spec).scheme in ("http", "https"):
        text = _decode(fetch_http(spec, policy, expect_image=False))
        builder = _Builder(_no_files, policy)
    else:
        path = Path(spec)
        if not path.is_file():
            raise FetchError(f"{spec}: no such file")
        text = _decode(path.read_bytes())
        builder = _Builder(_local_locator(path.parent, str(path.parent), policy), policy)
    out = _parse_table(text, redact_credentials(spec), builder)
    if redact_credentials(spec) != spec:
        out.notes.append(f"{redact_credentials(spec)}: the credentials in this URL fetched the sheet and are "
                         "never shown or stored")
    return out


def read_s3(uri: str, policy: FetchPolicy, client) -> SourceRows:
    """s3://bucket/prefix holding images plus a metadata.jsonl or CSV file at the prefix."""
    bucket, prefix = split_s3_uri(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    etags = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            etags[obj["Key"]] = obj["ETag"].strip('"')
    tables = [k for k in etags if k == f"{prefix}metadata.jsonl"] or sorted(
        k for k in etags if k.startswith(prefix) and "/" not in k[len(prefix):] and k.endswith(".csv"))
    if not tables:
        raise FetchError(f"{uri}: no metadata.jsonl or CSV file at the prefix")

    def locate(name: str):
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise FetchError(f"file_name {name!r} points outside the prefix")
        key = prefix + name
        if key not in etags:
            raise FetchError(f"s3://{bucket}/{key}: no such object")
        return f"s3://{bucket}/{key}", (lambda: fetch_s3(client, bucket, key, policy)), etags[key]

    out = SourceRows()
    for key in tables:
        text = _decode(fetch_s3(client, bucket, key, policy))
        out.extend(_parse_table(text, f"s3://{bucket}/{key}", _Builder(locate, policy)))
    return out


def read_sources(specs: list[str], policy: FetchPolicy, s3_endpoint_url: str | None = None) -> SourceRows:
    """All rows of all sources, duplicates (same image location) rejected after their first row."""
    out = SourceRows()
    client = None
    for spec in specs:
        if spec.startswith("s3://"):
            from scoft.fetch import s3_client

            client = client or s3_client(s3_endpoint_url, policy.allow_networks)
            out.extend(read_s3(spec, policy, client))
        elif spec.startswith(("http://", "https://")) or spec.endswith(".csv"):
            out.extend(read_csv(spec, policy))
        elif Path(spec).is_dir():
            out.extend(read_folder(Path(spec), policy))
        else:
            raise FetchError(f"{spec}: not a folder, a .csv file, an http(s) URL or an s3:// prefix")
    seen: dict[str, str] = {}
    unique = []
    for row in out.rows:
        if row.location in seen:
            out.reject(row.ref, row.raw, f"duplicate of {seen[row.location]} (same image location)")
        else:
            seen[row.location] = row.ref
            unique.append(row)
    out.rows = unique
    return out
