"""CCUB sheet sources over real HTTP on loopback: concurrency limits, hostile rows, incremental updates."""

import csv
import io
import json

import pytest
from PIL import Image

from scoft.ccub import IngestError, read_manifest
from scoft.fetch import FetchPolicy
from tests.helpers import ingest_offline
from tests.loopback import LoopbackServer

LOOPBACK = ("127.0.0.1/32",)  # the tests' own servers, allowed as a data team allows an internal mirror
FAST = FetchPolicy(
    connect_timeout_s=1, read_timeout_s=0.5, retries=1, backoff_s=0.01, max_redirects=3, max_bytes=200_000,
    allow_networks=LOOPBACK,
)
COLUMNS = ["country_code", "category_code", "url", "caption", "created_at"]


def png(seed: int, size=(40, 40), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256) if mode == "RGB" else 1).save(buf, "PNG")
    return buf.getvalue()


def sheet(rows: list[dict], columns=COLUMNS) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def row(server, i: int, culture="KOR", **kw) -> dict:
    r = {"country_code": culture, "category_code": "ARCH", "url": f"{server.url}/img/{i}.png",
         "caption": f"a traditional house number {i} with a tiled roof", "created_at": "2024-01-01T00:00:00Z"}
    r.update(kw)
    return r


def loopback_params(folder):
    """The project's params.yaml, the loopback servers allowed (for `scoft ingest --params`)."""
    from tests.conftest import write_params

    return write_params(folder / "params.yaml", {"ingest.allow_networks": list(LOOPBACK)})


def run(sources, out, **kw):
    return ingest_offline(sources, out, **{"policy": FAST, "workers": 4, **kw})


@pytest.fixture
def server():
    with LoopbackServer() as s:
        for i in range(40):
            s.routes[f"/img/{i}.png"] = (200, "image/png", png(i))
        yield s


def test_sheets_by_url_and_by_path_together(server, tmp_path):
    server.routes["/kor.csv"] = (200, "text/csv", sheet([row(server, i) for i in range(6)]))
    local = tmp_path / "nga.csv"
    local.write_bytes(sheet([row(server, i, culture="NGA") for i in range(6, 12)]))
    summary = run([f"{server.url}/kor.csv", str(local)], tmp_path / "ccub")
    assert summary["added"] == 12 and summary["rejected"] == []
    records = read_manifest(tmp_path / "ccub")
    assert {r.culture for r in records} == {"KOR", "NGA"}
    assert all(r.source_url.startswith(server.url) and r.generic_caption_source == "fallback" for r in records)


def test_incremental_update_fetches_only_new_and_changed_rows(server, tmp_path):
    rows = [row(server, i) for i in range(10)]
    server.routes["/s.csv"] = (200, "text/csv", sheet(rows))
    out = tmp_path / "ccub"
    first = run([f"{server.url}/s.csv"], out)
    assert first["added"] == 10 and sum(server.hits[f"/img/{i}.png"] for i in range(10)) == 10
    splits = {r.location: r.split for r in read_manifest(out)}

    server.hits.clear()
    rows = rows[1:] + [row(server, 10), row(server, 11)]  # row 0 removed, 10 and 11 added
    rows[0] = dict(rows[0], created_at="2025-06-01T00:00:00Z")  # row 1 re-uploaded
    rows[1] = dict(rows[1], caption="a traditional house number 2, caption corrected by the community")
    server.routes["/s.csv"] = (200, "text/csv", sheet(rows))
    second = run([f"{server.url}/s.csv"], out)
    assert (second["added"], second["changed"], second["removed"], second["unchanged"]) == (2, 2, 1, 7)
    assert {p for p, n in server.hits.items() if p.startswith("/img/")} == {"/img/1.png", "/img/10.png", "/img/11.png"}
    assert second["version"] != first["version"]
    after = {r.location: r.split for r in read_manifest(out)}
    assert all(after[loc] == split for loc, split in splits.items() if loc in after)  # nobody moved

    server.hits.clear()
    third = run([f"{server.url}/s.csv"], out)
    assert third["version"] == second["version"] and third["unchanged"] == 11
    assert not any(p.startswith("/img/") for p in server.hits)


def test_hostile_rows_are_rejected_with_a_reason_naming_the_row(server, tmp_path):
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(jpeg, "JPEG")
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, "PNG")  # 144 megapixels in a few kilobytes
    server.routes.update({
        "/truncated.jpg": (200, "image/jpeg", jpeg.getvalue()[:300]),
        "/empty.png": (200, "image/png", b""),
        "/page.png": (200, "text/html", b"<html><body>Sign in to view this image</body></html>"),
        "/bomb.png": (200, "image/png", bomb.getvalue()),
        "/slow.png": ("slow", 3),
        "/loop.png": ("redirect", "/loop.png"),
    })
    good = [row(server, i) for i in range(30)]
    bad = [
        row(server, 0, url=f"{server.url}/truncated.jpg"),
        row(server, 0, url=f"{server.url}/empty.png"),
        row(server, 0, url=f"{server.url}/page.png"),
        row(server, 0, url=f"{server.url}/bomb.png"),
        row(server, 0, url=f"{server.url}/slow.png"),
        row(server, 0, url=f"{server.url}/missing.png"),
        row(server, 0, url=f"{server.url}/loop.png"),
        row(server, 0, url="file:///etc/passwd"),
        row(server, 0, url="ftp://example.org/a.png"),
        row(server, 0, culture="ZZZ", url=f"{server.url}/img/31.png"),
        row(server, 0, culture="KR", url=f"{server.url}/img/32.png"),
        dict(good[3]),  # the same row twice
    ]
    expected = ["cannot decode image", "empty file", "served text/html, not an image", "exceeds the pixel cap",
                "timed out", "HTTP 404", "too many redirects", "scheme 'file' is not allowed",
                "scheme 'ftp' is not allowed", "'ZZZ' is not ISO 3166-1 alpha-3", "'KR' is not ISO 3166-1 alpha-3",
                "duplicate of"]
    path = tmp_path / "sheet.csv"
    path.write_bytes(sheet(good + bad))
    summary = run([str(path)], tmp_path / "ccub", max_rejected_fraction=0.5)
    assert summary["records"] == 30
    reasons = {r["row"]: r["reason"] for r in summary["rejected"]}
    assert len(reasons) == len(bad)
    for offset, text in enumerate(expected):
        ref = f"{path}:{len(good) + 2 + offset}"  # header is line 1
        assert text in reasons[ref], (ref, reasons[ref])
    assert server.hits["/slow.png"] == 2  # one retry after the timeout
    by_row = {r["row"]: r["source_row"] for r in summary["rejected"]}
    assert by_row[f"{path}:{len(good) + 2}"]["url"].endswith("/truncated.jpg")


def test_non_utf8_rows_and_missing_columns(server, tmp_path):
    body = sheet([row(server, i) for i in range(8)])
    lines = body.split(b"\n")
    lines[3] = lines[3].replace(b"house", "maison \xe0 Séoul".encode("latin-1"))
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"\n".join(lines))
    summary = run([str(latin)], tmp_path / "a")
    assert summary["records"] == 7
    assert summary["rejected"][0]["row"] == f"{latin}:4" and "not valid UTF-8" in summary["rejected"][0]["reason"]

    no_caption = tmp_path / "no_caption.csv"
    no_caption.write_bytes(sheet([row(server, i) for i in range(4)], columns=["country_code", "category_code", "url"]))
    with pytest.raises(IngestError, match="missing column\\(s\\): caption"):
        run([str(no_caption)], tmp_path / "b")


def test_an_unreachable_sheet_fails_clearly(tmp_path):
    with pytest.raises(IngestError, match="cannot read source"):
        run(["http://127.0.0.1:9/nothing.csv"], tmp_path / "ccub")


def test_summary_json_from_the_command_line(server, tmp_path):
    import subprocess
    import sys


    server.routes["/s.csv"] = (200, "text/csv", sheet([row(server, i) for i in range(5)] + [row(server, 0, url="ftp://x/y.png")]))
    out = subprocess.run([sys.executable, "-m", "scoft.cli", "ingest", "--source", f"{server.url}/s.csv", "--json",
                          "--out", str(tmp_path / "ccub"), "--summary", str(tmp_path / "summary.json"),
                          "--params", str(loopback_params(tmp_path))],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert set(summary) >= {"version", "added", "changed", "removed", "unchanged", "rejected"}
    assert summary["added"] == 5 and summary["version"].endswith(".dir")
    assert summary["rejected"][0]["source_row"]["url"] == "ftp://x/y.png" and "ftp" in summary["rejected"][0]["reason"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_a_row_the_parser_cannot_read_is_rejected_alone(server, tmp_path):
    huge = "a caption " * 14_000  # 140,000 characters: over the csv module's field limit
    rows = [row(server, i) for i in range(8)]
    rows[3] = row(server, 3, caption=huge)
    (tmp_path / "s.csv").write_bytes(sheet(rows))
    summary = run([str(tmp_path / "s.csv")], tmp_path / "a", max_rejected_fraction=0.5)
    assert summary["records"] == 7 and len(summary["rejected"]) == 1
    assert "cannot read this CSV row" in summary["rejected"][0]["reason"] and "s.csv:5" in summary["rejected"][0]["row"]

    folder = tmp_path / "folder"
    folder.mkdir()
    lines = [json.dumps({"file_name": f"{i}.png", "text": f"a traditional house number {i}", "country_code": "KOR",
                         "category_code": "ARCH"}) for i in range(8)]
    for i in range(8):
        (folder / f"{i}.png").write_bytes(png(i))
    lines[2] = '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    summary = run([str(folder)], tmp_path / "b", max_rejected_fraction=0.5)
    assert summary["records"] == 7 and summary["rejected"][0]["reason"] == "JSON nested too deep to read"
    assert len(json.dumps(summary["rejected"])) < 1000  # a bounded excerpt, not the 200,000-character line


def test_a_download_has_a_total_deadline(server, tmp_path):
    # 640 bytes in 16-byte chunks every 0.1 s: no read ever waits past the 0.5 s read timeout, and the
    # whole download takes 4 s
    server.routes["/img/drip.png"] = ("drip", png(0, size=(200, 200)), 0.1)
    server.routes["/s.csv"] = (200, "text/csv", sheet([row(server, i) for i in range(1, 8)]
                                                      + [row(server, 0, url=f"{server.url}/img/drip.png")]))
    policy = FetchPolicy(**{**FAST.__dict__, "deadline_s": 1.0})
    summary = run([f"{server.url}/s.csv"], tmp_path / "ccub", policy=policy, max_rejected_fraction=0.2)
    assert summary["records"] == 7
    assert "not finished within its deadline of 1 s" in summary["rejected"][0]["reason"]


def test_fetching_stops_once_too_many_rows_are_rejected(server, tmp_path):
    for i in range(30):
        server.routes[f"/img/hung{i}.png"] = ("slow", 2)
    rows = [row(server, i, url=f"{server.url}/img/hung{i}.png") for i in range(30)]
    rows += [row(server, i) for i in range(10)]
    server.routes["/s.csv"] = (200, "text/csv", sheet(rows))
    with pytest.raises(IngestError) as err:
        run([f"{server.url}/s.csv"], tmp_path / "ccub", workers=2)
    assert "stopped fetching, as the run can no longer pass" in str(err.value)
    # 11 rejections of 40 rows pass the limit of 25%: besides those 11, only the row the other worker
    # was fetching then is tried (two attempts each), however slow the main thread is to hear of it
    assert len({path for path in server.hits if "hung" in path}) <= 11 + 1
    assert sum(n for path, n in server.hits.items() if "hung" in path) <= 2 * (11 + 1)


def test_what_a_failed_ingest_fetched_is_not_fetched_again(server, tmp_path):
    good = [row(server, i) for i in range(10)]
    server.routes["/s.csv"] = (200, "text/csv", sheet(good + [row(server, 100 + i) for i in range(10)]))  # 404s
    with pytest.raises(IngestError):
        run([f"{server.url}/s.csv"], tmp_path / "ccub", workers=1)
    assert all(server.hits[f"/img/{i}.png"] == 1 for i in range(10))
    server.routes["/s.csv"] = (200, "text/csv", sheet(good))  # the data team fixed the sheet
    summary = run([f"{server.url}/s.csv"], tmp_path / "ccub")
    assert summary["added"] == 10 and all(server.hits[f"/img/{i}.png"] == 1 for i in range(10))
    assert not (tmp_path / ".ccub.staging").exists()  # in data/ccub now, staging emptied


def test_decoded_images_in_flight_stay_within_the_budget(server, tmp_path):
    import threading

    from scoft.captions import FallbackCaptioner

    class Watching(FallbackCaptioner):
        """Called while a worker holds its decoded image: counts how many are held at once."""
        def __init__(self):
            self.now, self.most, self.lock = 0, 0, threading.Lock()

        def __call__(self, image, category):
            with self.lock:
                self.now += 1
                self.most = max(self.most, self.now)
            threading.Event().wait(0.05)
            with self.lock:
                self.now -= 1
            return super().__call__(image, category)

    server.routes["/s.csv"] = (200, "text/csv", sheet([row(server, i) for i in range(16)]))
    one_image = 40 * 40 * 8
    watching = Watching()
    run([f"{server.url}/s.csv"], tmp_path / "a", workers=8, captioner=watching, max_decoded_bytes=one_image)
    assert watching.most == 1
    watching = Watching()
    run([f"{server.url}/s.csv"], tmp_path / "b", workers=8, captioner=watching, max_decoded_bytes=4 * one_image)
    assert 1 < watching.most <= 4


def test_credentials_in_urls_are_used_never_stored_or_shown(server, tmp_path):
    import subprocess
    import sys


    secret = "pa55@s3cret"  # an "@" in the password: cut at its first "@", "s3cret@127..." was kept
    rows = [row(server, i, url=f"http://reader:{secret}@{server.url[7:]}/img/{i}.png") for i in range(8)]
    rows.append(row(server, 99, url=f"http://reader:{secret}@{server.url[7:]}/img/missing.png"))
    server.routes["/s.csv"] = (200, "text/csv", sheet(rows))
    out = subprocess.run([sys.executable, "-m", "scoft.cli", "ingest", "--source",
                          f"http://sheets:{secret}@{server.url[7:]}/s.csv", "--out", str(tmp_path / "ccub"),
                          "--summary", str(tmp_path / "summary.json"), "--params", str(loopback_params(tmp_path))],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "rejected" in out.stdout and "credentials" in out.stdout
    stored = [(tmp_path / "summary.json").read_text(), (tmp_path / "ccub/manifest.jsonl").read_text()]
    for part in secret.split("@"):
        assert part not in out.stdout + out.stderr and not any(part in text for text in stored), part
    assert len(read_manifest(tmp_path / "ccub")) == 8  # fetched with them all the same


@pytest.mark.parametrize("url,shown", [
    ("http://user:p@ssLEAK@127.0.0.1:8788/auth/g31.png", "http://***@127.0.0.1:8788/auth/g31.png"),
    ("https://u:pa%40ss%3Aword@host/x?y=1#z", "https://***@host/x?y=1#z"),
    ("http://u:p:w@[::1]:8080/i.png", "http://***@[::1]:8080/i.png"),
    ("s3://key:se@cret@bucket/prefix", "s3://***@bucket/prefix"),
    ("http://host/path/with@sign.png", "http://host/path/with@sign.png"),  # no userinfo: nothing to hide
    ("see http://a:b@h/x and http://c:d@e@f/y", "see http://***@h/x and http://***@f/y"),
])
def test_credentials_are_redacted_up_to_the_authoritys_last_at(url, shown):
    from scoft.config import redact_credentials

    assert redact_credentials(url) == shown


def test_a_stray_quote_that_merges_two_rows_is_rejected_by_name_never_stored(server, tmp_path):
    """Row 11's opening quote is never closed: the csv module reads on into row 12, and before, one
    record was stored with a caption holding a line break and the next row's URL, "29 added, 0 rejected"."""
    lines = sheet([row(server, i) for i in range(16)]).decode().splitlines()
    lines[11] = lines[11].replace("a traditional house", '"a traditional house', 1)  # row 11 of the sheet
    server.routes["/s.csv"] = (200, "text/csv", ("\n".join(lines) + "\n").encode())
    summary = run([f"{server.url}/s.csv"], tmp_path / "ccub")
    rejected = {r["row"]: r["reason"] for r in summary["rejected"]}
    merged = [ref for ref in rejected if ref.startswith(f"{server.url}/s.csv:12-")]
    assert len(merged) == 1 and ("line break" in rejected[merged[0]] or "fields" in rejected[merged[0]])
    captions = [r.caption for r in read_manifest(tmp_path / "ccub")]
    assert not any("\n" in c or "://" in c for c in captions)
    assert summary["added"] + len(summary["rejected"]) <= 16 and summary["added"] == len(captions)


@pytest.mark.parametrize("fields,said", [
    (["KOR", "ARCH", "http://x/1.png", "a house", "2024-01-01", "stray"], "6 fields where the header has 5"),
    (["KOR", "ARCH", "http://x/1.png"], "3 fields where the header has 5"),
    (["KOR", "ARCH", "http://x/1.png", "a house http://x/2.png", "2024-01-01"], "caption holds a URL"),
    (["KOR", "ARCH", "http://x/1.png", "a house\nwith a roof", "2024-01-01"], "holds a line break"),
])
def test_rows_whose_fields_do_not_fit_the_header_are_named(fields, said):
    from scoft.sources import _misquoted

    header = ["country_code", "category_code", "url", "caption", "created_at"]
    reader = csv.DictReader(io.StringIO(",".join(header) + "\n" + _csv_line(fields), newline=""))
    assert said in _misquoted(next(reader), len(header))


def _csv_line(fields: list[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerow(fields)
    return buf.getvalue()


INTERNAL = ["http://169.254.169.254/latest/meta-data/iam.png",  # a cloud's metadata service
            "http://10.1.2.3/x.png", "http://192.168.0.1/x.png", "http://[::1]/x.png",
            "http://0.0.0.0/x.png", "http://224.0.0.1/x.png", "http://[::ffff:10.0.0.1]/x.png"]


def test_ingest_never_reaches_an_internal_address_directly_or_by_redirect(server, tmp_path):
    """A sheet row must not make ingest fetch from inside and store what answered: each internal address
    is refused before any connection, in the same words whether or not something listens there."""
    with LoopbackServer() as inside:  # loopback, but on 127.0.0.2's side of the policy: not allowed
        inside.routes["/internal-secret.png"] = (200, "image/png", png(99))
        secret = inside.url.replace("127.0.0.1", "127.0.0.2") + "/internal-secret.png"
        server.routes.update({"/to-secret.png": ("redirect", secret),
                              "/to-metadata.png": ("redirect", INTERNAL[0])})
        good = [row(server, i) for i in range(30)]
        bad = [row(server, 0, url=u) for u in INTERNAL + [secret, f"{server.url}/to-secret.png",
                                                             f"{server.url}/to-metadata.png"]]
        path = tmp_path / "sheet.csv"
        path.write_bytes(sheet(good + bad))
        summary = run([str(path)], tmp_path / "ccub", max_rejected_fraction=0.5)
        assert summary["records"] == 30
        reasons = [r["reason"] for r in summary["rejected"]]
        assert len(reasons) == len(bad), "\n".join(reasons)
        assert all(r.endswith(": address not allowed") for r in reasons), "\n".join(reasons)
        assert inside.hits["/internal-secret.png"] == 0  # reached neither directly nor through the redirect
        assert server.hits["/to-secret.png"] == 1 and server.hits["/to-metadata.png"] == 1


@pytest.mark.parametrize("address,allowed", [
    ("93.184.215.14", True), ("2606:4700::1111", True), ("127.0.0.1", False), ("::ffff:127.0.0.1", False),
    ("100.64.0.1", False), ("fe80::1%eth0", False), ("fd00::1", False), ("ff02::1", False), ("::", False),
    ("192.0.2.1", False)])
def test_the_address_policy_allows_public_unicast_only(address, allowed):
    from scoft.fetch import address_allowed

    assert address_allowed(address) is allowed
    assert address_allowed(address, ("0.0.0.0/0", "::/0"))  # what a data team allows is allowed


def test_a_name_that_resolves_again_elsewhere_cannot_switch_the_connection(server, monkeypatch, tmp_path):
    """DNS rebinding: the name is resolved once, checked, and connected to at that address."""
    import socket

    from scoft.fetch import FetchError, fetch_http

    real = socket.getaddrinfo
    port = int(server.url.rsplit(":", 1)[1])
    answers = []

    def rebinding(host, *args, **kwargs):
        if host != "mirror.test":
            return real(host, *args, **kwargs)
        answers.append(host)  # public at the check, loopback for any second look
        address = "93.184.215.14" if len(answers) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    policy = FetchPolicy(**{**FAST.__dict__, "allow_networks": (), "connect_timeout_s": 0.3, "retries": 0,
                            "deadline_s": 1.0})
    with pytest.raises(FetchError) as refused:
        fetch_http(f"http://mirror.test:{port}/img/1.png", policy)
    assert server.hits["/img/1.png"] == 0 and "address not allowed" not in str(refused.value)  # went to the public one
    answers.clear()
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real("127.0.0.1", *a, **k))
    with pytest.raises(FetchError, match="mirror.test:.*address not allowed"):
        fetch_http(f"http://mirror.test:{port}/img/1.png", policy)
    assert server.hits["/img/1.png"] == 0


def test_an_s3_endpoint_keeps_to_the_address_policy(monkeypatch):
    from scoft.fetch import FetchError, s3_client

    with pytest.raises(FetchError, match="S3 endpoint http://169.254.169.254: address not allowed"):
        s3_client("http://169.254.169.254:80")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://10.0.0.5:9000")
    with pytest.raises(FetchError, match="10.0.0.5: address not allowed"):
        s3_client()
    assert s3_client(None, ("10.0.0.0/8",)).meta.endpoint_url == "http://10.0.0.5:9000"


@pytest.mark.parametrize("network", ["10.0.0.0/33", "10.0.0.1/8", "mirror.internal"])
def test_allow_networks_must_be_cidr_networks(tmp_path, network):
    from scoft.config import ConfigError, load_params
    from tests.conftest import write_params

    with pytest.raises(ConfigError, match="ingest.allow_networks"):
        load_params(write_params(tmp_path / "params.yaml", {"ingest.allow_networks": [network]}))
