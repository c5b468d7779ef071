"""The review app under load: N reviewers rating at once through the JSON API (GET /api/v1/next, then
POST /api/v1/ratings, until 204), against `scoft review serve` (uvicorn, one process) on an SQLite file
and on a real PostgreSQL server (Debian's packages, started here). Reports ratings per second and the
median and 95th-percentile latency of each call, and checks that every rating was stored once.
With --attacker, a client from another address (127.0.0.2) sends, while they rate, 10,000 requests with
bad tokens and four 100 MB bodies; its answers are counted and the server's peak memory is reported.

    .venv/bin/python -m bench.review_load [--reviewers 50] [--pairs 40] [--attacker]

The client threads share the machine with the server: on the 2-core development machine the numbers
are a floor for a team's deployment, comparable between the two stores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import yaml
from PIL import Image

from scoft.evaluate import write_judged_images

ROOT = Path(__file__).resolve().parents[1]


class _Held:
    def __init__(self, i: int):
        self.id, self.culture = f"k{i}", "KOR"


def workspace(folder: Path, pairs: int, database_url: str) -> Path:
    """A KOR candidate and its evaluation's images (pairs prompts x 1 seed), params naming the store."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["review"]["database_url"] = database_url
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    (folder / "models/lora/KOR").mkdir(parents=True)
    (folder / "models/lora/KOR/pytorch_lora_weights.safetensors").write_bytes(os.urandom(64))
    held = [_Held(i) for i in range(pairs)]
    image = lambda v: Image.fromarray(np.full((64, 64, 3), v, np.uint8))  # noqa: E731
    write_judged_images(folder / "reports/eval/KOR/images", {
        "held": held, "prompts": [f"a photo of {h.id}" for h in held], "seeds": [1] * pairs,
        "images": {"base": [image(10)] * pairs, "scoft": [image(200)] * pairs}})
    # as a retrain leaves it: judged by the rules, awaiting people (review open refuses anything else)
    from scoft import registry
    from scoft.io import sha256_file

    lora = sha256_file(folder / "models/lora/KOR/pytorch_lora_weights.safetensors")
    registry.await_review(folder, "KOR", lora, "bench0", by="bench", reason="every rule passed")
    return folder


def scoft(ws: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "scoft.cli", *args], cwd=ws, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return out.stdout


def serve(ws: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "scoft.cli", "review", "serve", "--port", str(port)], cwd=ws,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(f"{url}/api/v1/next", timeout=1)
            return server, url
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("the review app did not start")


def reviewer(url: str, token: str, timings: dict, errors: list) -> None:
    """One reviewer rating every pair as fast as the app answers."""
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=auth, timeout=60) as client:
        while True:
            t = time.perf_counter()
            shown = client.get("/api/v1/next")
            timings["next"].append(time.perf_counter() - t)
            if shown.status_code == 204:
                return
            if shown.status_code != 200:
                errors.append(f"next: {shown.status_code} {shown.text[:200]}")
                return
            body = {"pair": shown.json()["pair"], "better": 0, "more_stereotyped": None, "offensive": [False, False]}
            t = time.perf_counter()
            sent = client.post("/api/v1/ratings", json=body)
            timings["rate"].append(time.perf_counter() - t)
            if sent.status_code != 201:
                errors.append(f"rate: {sent.status_code} {sent.text[:200]}")
                return


def attacker(url: str, answers: dict, stop: threading.Event, guesses: int = 10_000, bodies: int = 4) -> None:
    """Bad tokens and 100 MB bodies from 127.0.0.2 (another address than the honest reviewers')."""
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=url, transport=transport, timeout=60) as client:
        def chunks():
            for _ in range(100):
                yield b"x" * (1 << 20)

        for _ in range(bodies):
            try:
                status = client.post("/api/v1/ratings", content=chunks(), headers={
                    "Authorization": "Bearer " + "A" * 32, "Content-Type": "application/json"}).status_code
            except httpx.TransportError:  # the server closed the connection once the body passed its limit
                status = "closed"
            answers[f"100 MB body: {status}"] = answers.get(f"100 MB body: {status}", 0) + 1
        for i in range(guesses):
            if stop.is_set():
                break
            status = client.get("/api/v1/next", headers={"Authorization": f"Bearer guess{i:027d}"}).status_code
            answers[f"bad token: {status}"] = answers.get(f"bad token: {status}", 0) + 1


def peak_rss(pid: int, stop: threading.Event, peak: list) -> None:
    import psutil

    proc = psutil.Process(pid)
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], proc.memory_info().rss)
        except psutil.NoSuchProcess:
            return
        time.sleep(0.05)


def run(store: str, database_url: str, reviewers: int, pairs: int, with_attacker: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="scoft-review-load-") as tmp:
        ws = workspace(Path(tmp), pairs, database_url)
        scoft(ws, "review", "open", "--culture", "KOR")
        links = json.loads(scoft(ws, "review", "invite", "--culture", "KOR", "--count", str(reviewers), "--json"))
        server, url = serve(ws)
        timings, errors, answers, stop, peak = {"next": [], "rate": []}, [], {}, threading.Event(), [0]
        watcher = threading.Thread(target=peak_rss, args=(server.pid, stop, peak))
        watcher.start()
        try:
            threads = [threading.Thread(target=reviewer, args=(url, link["url"].rsplit("/", 1)[1], timings, errors))
                       for link in links]
            hostile = threading.Thread(target=attacker, args=(url, answers, stop)) if with_attacker else None
            start = time.perf_counter()
            for t in threads + ([hostile] if hostile else []):
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            if hostile:
                hostile.join()
        finally:
            stop.set()
            watcher.join()
            server.terminate()
            server.wait(30)
        results = json.loads(scoft(ws, "review", "results", "--culture", "KOR", "--json"))
        stored = _sql_count(database_url)
    expected = reviewers * (pairs + 1)  # every pair and each reviewer's repeat
    ms = {k: np.array(v) * 1000 for k, v in timings.items()}
    return {"store": store, "reviewers": reviewers, "pairs_each": pairs + 1, "ratings": len(timings["rate"]),
            "expected": expected, "errors": errors[:5], "error_count": len(errors), "wall_s": round(wall, 1),
            "ratings_per_s": round(len(timings["rate"]) / wall, 1),
            **{f"{k}_ms_p50": round(float(np.percentile(v, 50)), 1) for k, v in ms.items()},
            **{f"{k}_ms_p95": round(float(np.percentile(v, 95)), 1) for k, v in ms.items()},
            "stored_ratings_counted": results["candidate_vs_base"]["ratings"], **stored,
            "server_peak_rss_mb": round(peak[0] / 2**20), **({"attacker": answers} if with_attacker else {})}


def _sql_count(database_url: str) -> dict:
    """Ratings stored, and how many pairs have more than one rating from the same reviewer (must be 0)."""
    import sqlalchemy

    with sqlalchemy.create_engine(database_url).connect() as c:
        total = c.execute(sqlalchemy.text("select count(*) from ratings")).scalar()
        twice = c.execute(sqlalchemy.text("select count(*) from (select pair_id, reviewer_id from ratings "
                                          "group by pair_id, reviewer_id having count(*) > 1) t")).scalar()
    return {"ratings_stored": total, "rated_twice": twice}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reviewers", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--attacker", action="store_true", help="also run each store with an attacker beside")
    args = parser.parse_args()
    rows = []
    for hostile in (False, True) if args.attacker else (False,):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run("sqlite", f"sqlite:///{tmp}/review.db", args.reviewers, args.pairs, hostile))
    from tests.postgres import LocalPostgres, PostgresUnavailable

    try:
        with LocalPostgres() as pg:
            for hostile in (False, True) if args.attacker else (False,):
                rows.append(run("postgresql", pg.database(f"review_load_{int(hostile)}"), args.reviewers, args.pairs,
                                hostile))
    except PostgresUnavailable as e:
        print(f"postgresql: skipped ({e})")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
