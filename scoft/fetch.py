"""Fetching image bytes from where a CCUB row says they are: http(s), S3 or a local dataset folder.

Every fetch is bounded: connect and read timeouts, retries with exponential backoff on transient
failures only (connection errors, timeouts, 429 and 5xx), a redirect limit, a byte cap, and a total
deadline over all of it (a server dripping a chunk every 10 s never trips a read timeout).
A failure raises FetchError with a reason a data team can act on.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import requests

ALLOWED_SCHEMES = ("http", "https")


class FetchError(ValueError):
    """The bytes could not be fetched; the message says why."""


@dataclass(frozen=True)
class FetchPolicy:
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 20.0
    retries: int = 3
    backoff_s: float = 0.5
    max_redirects: int = 5
    max_bytes: int = 50 * 1024 * 1024
    deadline_s: float = 60.0  # per download, retries and waits included


_local = threading.local()


def _session(policy: FetchPolicy) -> requests.Session:
    """One session per thread and policy (requests sessions are not thread-safe). Retries are ours
    (fetch_http), so that they stop at the download's deadline."""
    cached = getattr(_local, "sessions", {})
    _local.sessions = cached
    if policy not in cached:
        s = requests.Session()
        s.max_redirects = policy.max_redirects
        s.headers["User-Agent"] = "scoft-flows (CCUB ingestion)"
        cached[policy] = s
    return cached[policy]


RETRY_STATUS = (429, 500, 502, 503, 504)


class _Transient(Exception):
    """A failure worth another try: connection refused or reset, a timeout, 429 or 5xx."""


def check_url(url: str) -> None:
    scheme = urlparse(url).scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise FetchError(f"URL scheme {scheme or 'none'!r} is not allowed (only http and https): {url}")


def fetch_http(url: str, policy: FetchPolicy, expect_image: bool = True) -> bytes:
    check_url(url)
    deadline = time.monotonic() + policy.deadline_s
    for attempt in range(policy.retries + 1):
        try:
            return _get(url, policy, expect_image, deadline)
        except _Transient as e:
            wait = policy.backoff_s * 2 ** attempt
            if attempt == policy.retries or time.monotonic() + wait >= deadline:
                tries = f"after {attempt} retries" if attempt == policy.retries else (
                    f"with no time left for another try (deadline {policy.deadline_s:g} s)")
                raise FetchError(f"{url}: {e} {tries}") from e
            time.sleep(wait)
    raise AssertionError("unreachable")


def _get(url: str, policy: FetchPolicy, expect_image: bool, deadline: float) -> bytes:
    """One try, within what is left of the deadline."""
    left = deadline - time.monotonic()
    try:
        with _session(policy).get(url, stream=True, timeout=(min(policy.connect_timeout_s, left),
                                                             min(policy.read_timeout_s, left))) as r:
            if r.status_code in RETRY_STATUS:
                raise _Transient(f"HTTP {r.status_code}")
            if r.status_code != 200:
                raise FetchError(f"HTTP {r.status_code} for {url}")
            declared = r.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                raise FetchError(f"{url}: {declared} bytes exceeds the cap of {policy.max_bytes}")
            kind = r.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if expect_image and (kind.startswith("text/") or kind in ("application/json", "application/xhtml+xml")):
                raise FetchError(f"{url}: served {kind}, not an image")
            return _read_capped(r.iter_content(64 * 1024), policy.max_bytes, url, deadline, policy.deadline_s)
    except (FetchError, _Transient):
        raise
    except requests.TooManyRedirects as e:
        raise FetchError(f"{url}: too many redirects (limit {policy.max_redirects}; a redirect loop?)") from e
    except (requests.ConnectionError, requests.Timeout) as e:
        timed_out = "timed out" in str(e).lower() or isinstance(e, requests.Timeout)
        raise _Transient("timed out" if timed_out else "connection failed") from e
    except requests.RequestException as e:
        raise FetchError(f"{url}: {type(e).__name__}: {e}") from e


def _read_capped(chunks, cap: int, where: str, deadline: float | None = None, deadline_s: float = 0) -> bytes:
    data = bytearray()
    for chunk in chunks:
        data += chunk
        if len(data) > cap:
            raise FetchError(f"{where}: more than {cap} bytes")
        if deadline is not None and time.monotonic() > deadline:
            raise FetchError(f"{where}: not finished within its deadline of {deadline_s:g} s "
                             f"({len(data)} bytes had come)")
    return bytes(data)


def fetch_local(root: Path, name: str, policy: FetchPolicy) -> bytes:
    """A file named by a row, refused unless it stays inside the dataset folder (links included)."""
    if not name:
        raise FetchError("file_name is missing")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise FetchError(f"file_name {name!r} points outside the dataset folder")
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()):
        raise FetchError(f"file_name {name!r} resolves outside the dataset folder")
    if not path.is_file():
        raise FetchError(f"{name}: no such file")
    if path.stat().st_size > policy.max_bytes:
        raise FetchError(f"{name}: more than {policy.max_bytes} bytes")
    return path.read_bytes()


def s3_client(endpoint_url: str | None = None):
    """boto3 S3 client; credentials only from the environment or an AWS profile, never from files here."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=30,
                    request_checksum_calculation="when_required", response_checksum_validation="when_required")
    return boto3.client("s3", endpoint_url=endpoint_url or None, config=config)


def split_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise FetchError(f"not an s3://bucket/prefix URI: {uri}")
    return parsed.netloc, parsed.path.lstrip("/")


def fetch_s3(client, bucket: str, key: str, policy: FetchPolicy) -> bytes:
    try:
        obj = client.get_object(Bucket=bucket, Key=key)
    except client.exceptions.NoSuchKey as e:
        raise FetchError(f"s3://{bucket}/{key}: no such object") from e
    except Exception as e:  # botocore raises many kinds; all mean "could not fetch this one"
        raise FetchError(f"s3://{bucket}/{key}: {type(e).__name__}: {e}") from e
    if obj.get("ContentLength", 0) > policy.max_bytes:
        raise FetchError(f"s3://{bucket}/{key}: {obj['ContentLength']} bytes exceeds the cap of {policy.max_bytes}")
    return _read_capped(obj["Body"].iter_chunks(64 * 1024), policy.max_bytes, f"s3://{bucket}/{key}")
