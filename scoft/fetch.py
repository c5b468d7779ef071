"""Fetching image bytes from where a CCUB row says they are: http(s), S3 or a local dataset folder.

Every fetch is bounded: connect and read timeouts, retries with exponential backoff on transient
failures only (connection errors, timeouts, 429 and 5xx), a redirect limit, a byte cap, and a total
deadline over all of it (a server dripping a chunk every 10 s never trips a read timeout).
A failure raises FetchError with a reason a data team can act on.

Every fetch also keeps to one outbound-address policy (`address_allowed`): a sheet row must not make
ingest reach inside (a cloud's metadata service, an admin port on the worker's own host) and store
what answered. Names are resolved, every address checked, and the connection made to the address that
was checked, so a name that resolves again to somewhere else cannot switch it; each redirect hop is a
new connection, checked the same way. A refused destination is "address not allowed", whether or not
anything listens there. Networks in `ingest.allow_networks` (an internal mirror, the tests' loopback
servers) are allowed by name.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

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
    allow_networks: tuple[str, ...] = ()  # CIDR networks reachable although not public (ingest.allow_networks)


NOT_ALLOWED = "address not allowed"


class AddressNotAllowed(FetchError):
    """A destination outside the outbound-address policy; the message names the host, never whether it answered."""


def address_allowed(address: str, allow_networks: tuple[str, ...] = ()) -> bool:
    """A public unicast address, or one inside an allowed network. Loopback, link-local (169.254.169.254,
    a cloud's metadata service), private, shared, reserved, multicast and unspecified addresses are not,
    nor their IPv4-mapped IPv6 forms."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if any(ip in ipaddress.ip_network(net) for net in allow_networks):
        return True
    return ip.is_global and not ip.is_multicast


def checked_addresses(host: str, port: int, allow_networks: tuple[str, ...] = ()) -> list[tuple]:
    """`getaddrinfo`'s answers for host, all of them allowed; a name with any address refused is refused
    whole (which of its addresses a client would pick is not ours to guess)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos or any(not address_allowed(info[4][0], allow_networks) for info in infos):
        raise AddressNotAllowed(f"{host}: {NOT_ALLOWED}")
    return infos


def _pinned(connection: type[HTTPConnection], allow_networks: tuple[str, ...]) -> type[HTTPConnection]:
    """urllib3's connection class, connecting only to an address it has checked. TLS still verifies the
    certificate against the host's name (urllib3 uses `host` for that, `_dns_host` only to connect)."""

    class Pinned(connection):
        def _new_conn(self):
            name = self._dns_host
            self._dns_host = checked_addresses(name, self.port, allow_networks)[0][4][0]
            try:
                return super()._new_conn()
            finally:
                self._dns_host = name

    return Pinned


class PinnedAdapter(HTTPAdapter):
    """A requests adapter whose every connection (redirect hops included) keeps to the address policy."""

    def __init__(self, allow_networks: tuple[str, ...]):
        self.allow_networks = allow_networks
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        pools = {}
        for scheme, pool, connection in (("http", HTTPConnectionPool, HTTPConnection),
                                         ("https", HTTPSConnectionPool, HTTPSConnection)):
            pools[scheme] = type(f"Pinned{pool.__name__}", (pool,),
                                 {"ConnectionCls": _pinned(connection, self.allow_networks)})
        self.poolmanager.pool_classes_by_scheme = pools


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
        s.trust_env = False  # through a proxy from the environment, the address checked would be the proxy's
        for scheme in ALLOWED_SCHEMES:
            s.mount(f"{scheme}://", PinnedAdapter(policy.allow_networks))
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
    except AddressNotAllowed as e:  # the first hop or a redirect's: which one is not said, nor if it answered
        raise FetchError(f"{url}: {NOT_ALLOWED}") from e
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


def s3_client(endpoint_url: str | None = None, allow_networks: tuple[str, ...] = ()):
    """boto3 S3 client; credentials only from the environment or an AWS profile, never from files here.
    An endpoint other than AWS's (given, or from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) keeps to the
    address policy. boto3's connections are not pinned as fetch_http's are: the endpoint is the data
    team's own configuration, not a sheet's row."""
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        try:
            checked_addresses(parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80),
                              allow_networks)
        except (AddressNotAllowed, OSError, UnicodeError) as e:
            reason = NOT_ALLOWED if isinstance(e, AddressNotAllowed) else f"does not resolve ({e})"
            raise FetchError(f"S3 endpoint {parsed.scheme}://{parsed.hostname}: {reason}") from e

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
