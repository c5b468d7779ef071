"""`scoft run` in the foreground, supervised: Ctrl-C, SIGTERM or a lost Prefect API end the run and
everything it started within seconds, with one line saying what was left.

The retrain flow runs in a child process, in a session of its own; this process only watches. Run in
one process, a Ctrl-C reached Prefect's temporary server first (the terminal signals the whole
foreground group), and the flow then retried the dead API for good, deaf to a second Ctrl-C and to
SIGTERM (Prefect swaps in its own SIGTERM handler while a flow runs). From outside, the flow process
and its DVC commands (each in a session of its own, tasks/dvc.py) can always be stopped: DVC first
gets SIGINT, so that it releases its locks, then everything left gets SIGKILL.

The temporary server runs in a session of its own too, so that a Ctrl-C to the terminal's group
reaches this process only, and the server outlives the flow long enough to record how it ended
(it was stopped first, and the run stayed Running). And the flow process dies with this one: the
kernel sends it SIGTERM the moment its supervisor is gone, even by SIGKILL (a parent-death signal),
so that it stops its stages, records itself Crashed, and stops the orphaned temporary server.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import psutil
import requests

from scoft.paths import BASE_DIR, CHECKPOINTS, JOINT, LORA_DIR, build_checkpoints_dir

GRACE_S = 10  # for DVC to release its locks after SIGINT
FLOW_GRACE_S = 25  # for the flow process to stop its stages (DVC's own grace, tasks/dvc.py) and report its end
HEALTH_POLL_S = 2


def run_supervised(child_args: list[str], workdir: Path, api_lost_after_s: float, say) -> int:
    """Run `scoft <child_args>` (the flow, in this process's place) and return its exit status, or
    130 / 143 after SIGINT / SIGTERM, or 1 when the Prefect API stopped answering."""
    stop_reason: list[tuple[str, int]] = []
    woken = threading.Event()

    def on_signal(signum, frame):
        if stop_reason:  # a second Ctrl-C while stopping: the operator means now
            os._exit(128 + signum)
        stop_reason.append((f"{signal.Signals(signum).name} received", 128 + signum))
        woken.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    server, env = None, dict(os.environ)
    try:
        if not _configured_api_url():
            server = _temporary_server()
            env["PREFECT_API_URL"] = server.api_url
            env["PREFECT_UI_URL"] = ""  # no "View at" links to a server that stops with this run
            env[SERVER_PID] = str(server.server_process.pid)
        api = server.api_url if server is not None else _configured_api_url()
        if server is None and (problem := _unanswered(api)):
            say(f"scoft run: {problem}")
            return 1
        env[SUPERVISOR_PID] = str(os.getpid())
        child = subprocess.Popen([sys.executable, "-m", "scoft.cli", *child_args], env=env, start_new_session=True,
                                 preexec_fn=_die_with_parent)
        health = _Health(api, server, api_lost_after_s)
        while child.poll() is None and not stop_reason:
            woken.wait(HEALTH_POLL_S)
            if (lost := health.lost()) and not stop_reason:
                stop_reason.append((lost, 1))
        if not stop_reason:
            return child.returncode
        reason, status = stop_reason[0]
        # with the API gone the flow cannot record its end: no point in waiting for it
        say(f"scoft run: {reason}; {_stop_tree(child, workdir, FLOW_GRACE_S if status != 1 else GRACE_S)}")
        return status
    finally:
        if server is not None:
            server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _configured_api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or ""


SUPERVISOR_PID = "SCOFT_SUPERVISOR_PID"
SERVER_PID = "SCOFT_TEMPORARY_SERVER_PID"
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the flow process before it starts: SIGTERM when its parent (this supervisor) dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def watch_supervisor() -> None:
    """In the flow process: if its supervisor is killed, the temporary server it started is left behind
    (in a session of its own). A reaper process of its own waits for this process to end (after it
    recorded how its run ended: Prefect then re-raises the SIGTERM, so no exit handler here would run)
    and stops that server when the supervisor is gone too. A parent-death SIGTERM can arrive before
    this process has installed its handlers: then the supervisor is already gone, and it exits at once."""
    supervisor = os.environ.get(SUPERVISOR_PID)
    if not supervisor:
        return
    if os.getppid() != int(supervisor):
        sys.exit(f"scoft run: its supervisor (process {supervisor}) is gone; not starting")
    if server := os.environ.get(SERVER_PID):
        subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid()), supervisor, server], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# flow process, supervisor, server: once the flow process is gone, stop the server unless the supervisor
# lives (it stops the server itself, last)
_REAPER = """
import os, signal, sys, time
flow, supervisor, server = map(int, sys.argv[1:])
def alive(pid):  # a zombie has ended: an init that reaps nothing (some containers') keeps them
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False
while alive(flow):
    time.sleep(0.5)
if not alive(supervisor) and alive(server):
    os.kill(server, signal.SIGTERM)
"""


def _temporary_server():
    """Prefect's temporary server in a session of its own (see above), started here so that this process
    can stop it last."""
    from prefect.server.api import server as module

    class OwnSession(module.SubprocessASGIServer):
        def _run_uvicorn_command(self):
            shared = module.subprocess
            module.subprocess = types.SimpleNamespace(Popen=functools.partial(shared.Popen, start_new_session=True))
            try:
                return super()._run_uvicorn_command()
            finally:
                module.subprocess = shared

    server = OwnSession()
    server.start()
    return server


def _unanswered(api_url: str) -> str | None:
    """Why the configured Prefect API cannot run a flow, in one line (None: it answers)."""
    try:
        response = requests.get(f"{api_url.rstrip('/')}/health", timeout=5)
    except requests.RequestException as e:
        return (f"the Prefect API at PREFECT_API_URL={api_url} does not answer ({type(e).__name__}); start the "
                "server (`make serve`) or unset PREFECT_API_URL for a temporary one")
    if response.status_code != 200:
        return (f"PREFECT_API_URL={api_url} answers /health with HTTP {response.status_code}: not a Prefect API; "
                "it should end in /api")
    return None


class _Health:
    """Whether the Prefect API still answers: the temporary server's process is alive and /health says
    so at least once every `after_s` seconds."""

    def __init__(self, api_url: str, server, after_s: float):
        self.api_url, self.server, self.after_s = api_url.rstrip("/"), server, after_s
        self.last_ok = time.monotonic()

    def lost(self) -> str | None:
        if self.server is not None and self.server.server_process is not None \
                and self.server.server_process.poll() is not None:
            return f"the temporary Prefect server ({self.api_url}) exited with {self.server.server_process.returncode}"
        try:
            ok = requests.get(f"{self.api_url}/health", timeout=HEALTH_POLL_S).status_code == 200
        except requests.RequestException:
            ok = False
        now = time.monotonic()
        if ok:
            self.last_ok = now
        elif now - self.last_ok > self.after_s:
            return (f"the Prefect API at {self.api_url} has not answered for {now - self.last_ok:.0f} s "
                    "(orchestration.api_lost_after_s)")
        return None


def _stop_tree(child: subprocess.Popen, workdir: Path, flow_grace_s: float = FLOW_GRACE_S) -> str:
    """Stop the flow process and every process under it (its DVC commands run in sessions of their
    own); say which stages were stopped and where a retry resumes. The flow process gets SIGTERM first
    and the time to stop its own stages (SIGINT, so that DVC releases its locks) and to record its run
    Crashed while the API still answers; interrupted under it, a stage failed, and the flow was killed
    before it could say so (its run stayed Running). Whatever is left then gets the same, from here."""
    try:
        tree = psutil.Process(child.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    stages = [stage for proc in tree if (stage := _stage_of(proc))]
    _signal(child.pid, signal.SIGTERM)  # Prefect records its run Crashed, if its API still answers
    everything = [*tree, psutil.Process(child.pid)] if psutil.pid_exists(child.pid) else tree
    _, alive = psutil.wait_procs(everything, timeout=flow_grace_s)
    for proc in alive:
        if _stage_of(proc):
            _signal_group(proc.pid, signal.SIGINT)  # DVC releases its locks on SIGINT
    _, alive = psutil.wait_procs(alive, timeout=GRACE_S)
    for proc in alive:
        _signal(proc.pid, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=GRACE_S)
    child.wait()
    if not stages:
        return "no stage was running; nothing is left running"
    return "stopped " + "; ".join(_left(stage, workdir) for stage in stages) + "; nothing is left running"


def _stage_of(proc: psutil.Process) -> str | None:
    """The stage a `dvc repro` process reproduces, or None for any other process."""
    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return None
    return cmdline[-1] if "dvc" in cmdline and "repro" in cmdline else None


def _left(stage: str, workdir: Path) -> str:
    """What a stopped stage leaves to the next `scoft run`."""
    if stage.startswith("train"):
        folder = workdir / LORA_DIR / (stage.partition("@")[2] or JOINT) / CHECKPOINTS
        saved = sorted(folder.rglob("step-*.pt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
        if saved:
            return f"stage {stage}, whose next run resumes from its checkpoint {saved[-1].relative_to(workdir)}"
        return f"stage {stage}, before its first checkpoint: its next run starts it again"
    if stage == "base":
        saved = sorted(build_checkpoints_dir(workdir / BASE_DIR).glob("*/*.pt"), key=lambda p: p.stat().st_mtime)
        if saved:
            return f"stage base, whose next run resumes from its checkpoint {saved[-1].relative_to(workdir)}"
        return "stage base, before its first checkpoint: its next run starts it again"
    if stage == "ingest":
        return "stage ingest: the images it wrote are kept (data/.ccub.staging) and not fetched again"
    return f"stage {stage}: its next run does it again"


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        _signal(pid, sig)
