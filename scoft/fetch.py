"""Fetching image bytes from where a CCUB row says they are: http(s), S3 or a local dataset folder.

Every fetch is bounded: connect and read timeouts, retries with exponential backoff on transient
failures only (connection errors, timeouts, 429 and 5xx), a redirect limit, and a byte cap.
A failure raises FetchError with a reason a data team can act on.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

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


_local = threading.local()


def _session(policy: FetchPolicy) -> requests.Session:
    """One session per thread and policy (requests sessions are not thread-safe)."""
    cached = getattr(_local, "sessions", {})
    _local.sessions = cached
    if policy not in cached:
        s = requests.Session()
        retry = Retry(total=policy.retries, connect=policy.retries, read=policy.retries, status=policy.retries,
                      backoff_factor=policy.backoff_s, status_forcelist=(429, 500, 502, 503, 504),
                      allowed_methods=("GET",), redirect=False, raise_on_status=False)
        s.mount("http://", HTTPAdapter(max_retries=retry))
        s.mount("https://", HTTPAdapter(max_retries=retry))
        s.max_redirects = policy.max_redirects
        s.headers["User-Agent"] = "scoft-flows (CCUB ingestion)"
        cached[policy] = s
    return cached[policy]


def check_url(url: str) -> None:
    scheme = urlparse(url).scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise FetchError(f"URL scheme {scheme or 'none'!r} is not allowed (only http and https): {url}")


def fetch_http(url: str, policy: FetchPolicy, expect_image: bool = True) -> bytes:
    check_url(url)
    try:
        with _session(policy).get(url, stream=True, timeout=(policy.connect_timeout_s, policy.read_timeout_s)) as r:
            if r.status_code != 200:
                raise FetchError(f"HTTP {r.status_code} for {url}")
            declared = r.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                raise FetchError(f"{url}: {declared} bytes exceeds the cap of {policy.max_bytes}")
            kind = r.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if expect_image and (kind.startswith("text/") or kind in ("application/json", "application/xhtml+xml")):
                raise FetchError(f"{url}: served {kind}, not an image")
            return _read_capped(r.iter_content(64 * 1024), policy.max_bytes, url)
    except FetchError:
        raise
    except requests.TooManyRedirects as e:
        raise FetchError(f"{url}: too many redirects (limit {policy.max_redirects}; a redirect loop?)") from e
    except requests.exceptions.RetryError as e:
        raise FetchError(f"{url}: still failing after {policy.retries} retries ({e})") from e
    except (requests.ConnectionError, requests.Timeout) as e:
        kind = "timed out" if "timed out" in str(e).lower() or isinstance(e, requests.Timeout) else "connection failed"
        raise FetchError(f"{url}: {kind} after {policy.retries} retries") from e
    except requests.RequestException as e:
        raise FetchError(f"{url}: {type(e).__name__}: {e}") from e


def _read_capped(chunks, cap: int, where: str) -> bytes:
    data = bytearray()
    for chunk in chunks:
        data += chunk
        if len(data) > cap:
            raise FetchError(f"{where}: more than {cap} bytes")
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
