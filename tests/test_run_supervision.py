"""`scoft run` (make run's command) under Ctrl-C, SIGTERM and a Prefect API that dies: it ends within
seconds with one line saying what was left, and no process it started survives it. The three runs go
at once, each in a workspace of its own whose ingest waits on an image server that never answers. A
`scoft run` killed outright (SIGKILL to its group) takes its flow and stages with it too."""

import os
import signal
import sqlite3
import subprocess
import threading
import time

import psutil
import pytest

from tests.conftest import BIN, make_workspace, write_params
from tests.loopback import LoopbackServer
from tests.test_sources import row, sheet

HOW = ("ctrl-c", "sigterm", "api lost", "sigkill")


@pytest.fixture
def hung_ingests(sample_dir, tmp_path):
    with LoopbackServer() as server:
        for i in range(4):
            server.routes[f"/img/{i}.png"] = ("slow", 120)
        server.routes["/s.csv"] = (200, "text/csv", sheet([row(server, i) for i in range(4)]))
        spaces = {}
        for how in HOW:
            ws = make_workspace(tmp_path / how.replace(" ", "-"), sample_dir)
            write_params(ws / "params.yaml", {"ingest.sources": [f"{server.url}/s.csv"],
                                              "ingest.allow_networks": ["127.0.0.1/32"],
                                              "ingest.read_timeout_s": 100, "ingest.download_deadline_s": 110,
                                              "orchestration.api_lost_after_s": 10})
            spaces[how] = ws
        yield spaces


class Run:
    """`scoft run` as a terminal's job (a process group of its own), its output collected."""

    def __init__(self, ws):
        # a Prefect home of its own: three temporary servers on one database would race its migrations
        env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PREFECT_API_URL="",
                   PREFECT_HOME=str(ws / ".prefect"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
        self.proc = subprocess.Popen([str(BIN / "scoft"), "run"], cwd=ws, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines, self.fetching = [], threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if "ingest: " in line and "fetching" in line:
                self.fetching.set()

    @property
    def said(self) -> str:
        return "".join(self.lines)


def _alive(tree):
    return [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _flow_run_states(ws) -> list[str]:
    """The retrain runs' states as the temporary server recorded them (its database, read once it is gone)."""
    with sqlite3.connect(ws / ".prefect/prefect.db") as db:
        return [row[0] for row in db.execute("select state_type from flow_run")]


def test_an_interrupted_or_orphaned_run_ends_within_seconds_and_leaves_nothing_running(hung_ingests):
    runs = {how: Run(ws) for how, ws in hung_ingests.items()}
    try:
        for how, run in runs.items():
            assert run.fetching.wait(300), (how, run.said)
        time.sleep(1)
        trees = {how: psutil.Process(run.proc.pid).children(recursive=True) for how, run in runs.items()}
        assert all(any("dvc" in p.cmdline() for p in _alive(tree)) for tree in trees.values())
        stopped = time.monotonic()
        os.killpg(runs["ctrl-c"].proc.pid, signal.SIGINT)  # what the terminal does: the whole foreground group
        runs["sigterm"].proc.terminate()  # SIGTERM to scoft run alone, as `kill` or a service manager sends it
        os.killpg(runs["sigkill"].proc.pid, signal.SIGKILL)  # nothing of scoft run itself can clean up
        next(p for p in trees["api lost"] if "uvicorn" in " ".join(p.cmdline())).kill()  # its temporary server
        status = {how: run.proc.wait(90) for how, run in runs.items()}
        orphans = trees["sigkill"]
        while _alive(orphans) and time.monotonic() - stopped < 90:
            time.sleep(0.5)
        took = time.monotonic() - stopped
    finally:
        for run in runs.values():
            run.proc.kill()
        for tree in trees.values():
            for proc in _alive(tree):
                proc.kill()
    assert status == {"ctrl-c": 130, "sigterm": 143, "api lost": 1, "sigkill": -9}, \
        {h: r.said[-2000:] for h, r in runs.items()}
    # DVC's SIGINT grace is 10 s at most; before, the first two hung for good, and a killed run's flow
    # went on headless, retraining from scratch
    assert took < 60
    for how, run in runs.items():
        assert _alive(trees[how]) == [], how
        if how != "sigkill":
            assert "stopped stage ingest" in run.said and "nothing is left running" in run.said, run.said
            assert "Beginning flow run" in run.said and "View at" not in run.said  # no link to a server that stops
    assert "the temporary Prefect server" in runs["api lost"].said
    for how in ("ctrl-c", "sigterm", "sigkill"):  # the server outlived the flow: never left Running
        assert _flow_run_states(hung_ingests[how]) in (["CRASHED"], ["CANCELLED"]), how


def test_a_dead_prefect_api_url_is_one_line(sample_dir, tmp_path):
    url = "http://127.0.0.1:9/api"  # nothing listens there
    ws = make_workspace(tmp_path / "ws", sample_dir)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PREFECT_API_URL=url)
    out = subprocess.run([str(BIN / "scoft"), "run"], cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    said = (out.stdout + out.stderr).strip()
    assert out.returncode == 1 and len(said.splitlines()) == 1, said  # before: 136 lines and 3 tracebacks
    assert f"PREFECT_API_URL={url}" in said and "does not answer" in said
