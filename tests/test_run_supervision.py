"""`scoft run` (make run's command) under Ctrl-C, SIGTERM and a Prefect API that dies: it ends within
seconds with one line saying what was left, and no process it started survives it."""

import os
import signal
import subprocess
import threading
import time

import psutil
import pytest

from tests.conftest import BIN, make_workspace, write_params
from tests.loopback import LoopbackServer
from tests.test_sources import row, sheet


@pytest.fixture
def hung_ingest(sample_dir, tmp_path):
    """A workspace whose ingest waits on an image server that never answers."""
    with LoopbackServer() as server:
        for i in range(4):
            server.routes[f"/img/{i}.png"] = ("slow", 120)
        server.routes["/s.csv"] = (200, "text/csv", sheet([row(server, i) for i in range(4)]))
        ws = make_workspace(tmp_path / "ws", sample_dir)
        write_params(ws / "params.yaml", {"ingest.sources": [f"{server.url}/s.csv"], "ingest.read_timeout_s": 100,
                                          "ingest.download_deadline_s": 110, "orchestration.api_lost_after_s": 10})
        yield ws


def _start(ws):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PREFECT_API_URL="")
    proc = subprocess.Popen([str(BIN / "scoft"), "run"], cwd=ws, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # as a terminal's job
    lines, fetching = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "ingest: " in line and "fetching" in line:
                fetching.set()

    threading.Thread(target=read, daemon=True).start()
    assert fetching.wait(240), "".join(lines)
    time.sleep(1)
    return proc, lines, psutil.Process(proc.pid).children(recursive=True)


def _nothing_left(tree):
    return [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_run_ends_within_seconds_and_leaves_nothing_running(hung_ingest, how):
    proc, lines, tree = _start(hung_ingest)
    assert any("dvc" in p.cmdline() for p in tree if p.is_running())
    stopped = time.monotonic()
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the whole foreground group
    else:
        proc.terminate()  # SIGTERM to scoft run alone, as `kill` or a service manager sends it
    status = proc.wait(60)
    took = time.monotonic() - stopped
    said = "".join(lines)
    assert status == (130 if how == "ctrl-c" else 143), said
    assert took < 30, said  # DVC's SIGINT grace is 10 s at most; it was forever
    assert "stopped stage ingest" in said and "nothing is left running" in said, said
    assert _nothing_left(tree) == []


def test_a_run_whose_prefect_api_dies_fails_with_one_line(hung_ingest):
    proc, lines, tree = _start(hung_ingest)
    server = next(p for p in tree if "uvicorn" in " ".join(p.cmdline()))
    server.kill()
    status = proc.wait(90)
    said = "".join(lines)
    assert status == 1, said
    assert "the temporary Prefect server" in said and "stopped stage ingest" in said, said
    assert _nothing_left(tree) == []
