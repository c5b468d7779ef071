"""What ingest and validate cost at CCUB's scale: a first ingest and a one-row update of N rows.

A sheet of N synthetic 512x384 JPEG photos (each one distinct) is served over loopback HTTP, and a
DVC workspace with this checkout's dvc.yaml runs `dvc repro validate` (ingest, then validate, then
DVC hashing and caching the outputs) twice: first with every row new, then with one row added. For
each run: wall time, CPU seconds of the whole process tree, and the peak resident memory of its
largest process (ingest's own, in practice), read from wait4.

    .venv/bin/python -m bench.ingest_scale --rows 300 3000 10000 [--workers 8]
    .venv/bin/python -m bench.ingest_scale --large 40 [--max-decoded-bytes 268435456]

`--large N`: N photo-like PNGs of 5000x5000 (25 MP) instead, `scoft ingest` alone with
`ingest.max_decoded_bytes` as given: whether the decode budget bounds the ingest's peak memory.

The photos are written to disk once per size before anything is timed (a cache folder reused across
runs, --images); the server reads them from there, so its own CPU stays small and outside the
measured tree.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CULTURES, CATEGORIES = ("KOR", "MEX", "NGA"), ("ARCH", "FOOD", "CLOTH")


def photo(i: int) -> bytes:
    """A distinct photo-like JPEG: smooth colour gradients with noise, seeded by its index."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:384, 0:512].astype(np.float32)
    base = rng.uniform(0, 255, 3) + np.stack([x / 4, y / 3, (x + y) / 6], -1) * rng.uniform(-1, 1, 3)
    pixels = np.clip(base + rng.normal(0, 12, (384, 512, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=85)
    return out.getvalue()


def _write_photo(folder: Path, i: int) -> None:
    path = folder / f"{i}.jpg"
    if not path.is_file():
        path.write_bytes(photo(i))


LARGE = 5000  # pixels a side: 25 MP


def _write_large(folder: Path, i: int) -> None:
    """A 25 MP PNG: smooth gradients (a few MB compressed, under ingest.max_image_bytes), distinct per i."""
    path = folder / f"{i}.png"
    if not path.is_file():
        rng = np.random.default_rng(i)
        y, x = np.mgrid[0:LARGE, 0:LARGE].astype(np.float32)
        pixels = np.stack([x / 20 + rng.uniform(0, 255), y / 20 + rng.uniform(0, 255), (x + y) / 40], -1)
        Image.fromarray((pixels % 256).astype(np.uint8)).save(path.with_suffix(".tmp"), "PNG", compress_level=9)
        path.with_suffix(".tmp").rename(path)


def photos(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(n) if not (folder / f"{i}.jpg").is_file()]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(partial(_write_photo, folder), missing, chunksize=64))


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(folder: Path) -> tuple[ThreadingHTTPServer, str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(folder)))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def sheet(path: Path, url: str, n: int, suffix: str = ".jpg") -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["country_code", "category_code", "url", "caption", "created_at"])
        for i in range(n):
            writer.writerow([CULTURES[i % 3], CATEGORIES[(i // 3) % 3], f"{url}/{i}{suffix}",
                             f"community photo number {i} of a traditional scene", "2026-01-01T00:00:00Z"])


def workspace(folder: Path, source: Path, workers: int, code: Path, **ingest) -> Path:
    """A DVC workspace whose `scoft` is the one in `code` (this checkout, or a baseline's)."""
    folder.mkdir(parents=True)
    shutil.copy(code / "dvc.yaml", folder / "dvc.yaml")
    shutil.copytree(code / "scoft", folder / "scoft", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((code / "params.yaml").read_text())
    params["ingest"].update(sources=[str(source)], workers=workers, **ingest)
    if "allow_networks" in params["ingest"]:  # the photos' loopback server (a baseline before the policy has no key)
        params["ingest"]["allow_networks"] = ["127.0.0.1/32"]
    params["validate"]["cultures"] = list(CULTURES)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["init", "--no-scm", "-q"], ["config", "core.analytics", "false"]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=folder, check=True, capture_output=True)
    return folder


def measured(cmd: list[str], cwd: Path) -> dict:
    """Wall seconds, CPU seconds (user + system, the process and every child it waited for) and
    peak RSS in MB of the largest process in the tree."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               GX_ANALYTICS_ENABLED="false", PYTHONPATH=str(cwd))  # the workspace's scoft
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as make run: without cached bytecode each process compiles for 10 s
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.decode(errors='replace')[-3000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_mb": usage.ru_maxrss / 1024,
            "log": out.decode(errors="replace")}


def stage_seconds(log: str) -> str:
    ran = [line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage '")]
    return "+".join(ran)


def bench(n: int, images: Path, workers: int, code: Path) -> list[dict]:
    photos(images, n + 1)
    measured([sys.executable, "-c", "import scoft.cli, scoft.checks, dvc.repo"], code)  # bytecode, once
    httpd, url = serve(images)
    folder = Path(tempfile.mkdtemp(prefix="scoft-ingest-scale-"))
    try:
        ws = workspace(folder / "ws", folder / "sheet.csv", workers, code)
        sheet(folder / "sheet.csv", url, n)
        first = measured([sys.executable, "-m", "dvc", "repro", "validate"], ws)
        sheet(folder / "sheet.csv", url, n + 1)
        update = measured([sys.executable, "-m", "dvc", "repro", "validate"], ws)
        alone = measured([sys.executable, "-m", "scoft.cli", "ingest", "--out", "data/ccub", "--summary",
                          str(folder / "again.json")], ws)
    finally:
        httpd.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
    return [dict(rows=n, run="first ingest + validate", **first), dict(rows=n, run="+1 row", **update),
            dict(rows=n, run="unchanged ingest alone", **alone)]


def bench_large(n: int, images: Path, workers: int, code: Path, max_decoded_bytes: int) -> dict:
    images.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(partial(_write_large, images), range(n)))
    measured([sys.executable, "-c", "import scoft.cli"], code)  # bytecode, once
    httpd, url = serve(images)
    folder = Path(tempfile.mkdtemp(prefix="scoft-ingest-large-"))
    try:
        ws = workspace(folder / "ws", folder / "sheet.csv", workers, code, max_decoded_bytes=max_decoded_bytes)
        sheet(folder / "sheet.csv", url, n, ".png")
        return measured([sys.executable, "-m", "scoft.cli", "ingest", "--out", "data/ccub", "--summary",
                         str(folder / "summary.json")], ws)
    finally:
        httpd.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[300, 3000, 10000])
    parser.add_argument("--large", type=int, help="this many 25 MP PNGs instead (scoft ingest alone)")
    parser.add_argument("--max-decoded-bytes", type=int, default=256 << 20)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--code", type=Path, default=ROOT, help="a checkout whose scoft/ runs (a baseline's)")
    parser.add_argument("--images", type=Path, default=Path(tempfile.gettempdir()) / "scoft-bench-photos")
    args = parser.parse_args()
    if args.large:
        r = bench_large(args.large, args.images.with_name(args.images.name + "-large"), args.workers, args.code,
                        args.max_decoded_bytes)
        print(f"{os.cpu_count()} CPUs; ingest.workers {args.workers}; {args.large} PNGs of {LARGE}x{LARGE}; "
              f"max_decoded_bytes {args.max_decoded_bytes >> 20} MiB; code: {args.code}\n"
              f"wall {r['wall_s']:.1f} s, CPU {r['cpu_s']:.1f} s, peak RSS {r['peak_mb']:.0f} MB", flush=True)
        return
    print(f"{os.cpu_count()} CPUs; ingest.workers {args.workers}; 512x384 JPEG photos over loopback; "
          f"code: {args.code}", flush=True)
    print("| rows | run | stages | wall s | CPU s | peak RSS MB |\n|---|---|---|---|---|---|", flush=True)
    for n in args.rows:
        for r in bench(n, args.images, args.workers, args.code):
            print(f"| {r['rows']} | {r['run']} | {stage_seconds(r['log']) or 'scoft ingest'} | {r['wall_s']:.1f} | "
                  f"{r['cpu_s']:.1f} | {r['peak_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
