"""DVC stages as Prefect tasks: `dvc repro --single-item <stage>` with its output streamed into the run log."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.exceptions import MissingContextError

from scoft.config import load_params
from scoft.paths import CONFIG_ERROR, DATA_REJECTED
from scoft.remote import dvc_environment

SKIPPED = "didn't change, skipping"


class StageFailed(RuntimeError):
    """A stage command failed; a retry may succeed (out of memory, a flaky disk, a preempted GPU)."""


class NotRetryable(StageFailed):
    """A failure that the same stage with the same inputs would repeat."""


class DataRejected(NotRetryable):
    """A stage refused its input data; retrying the same data cannot help."""


class BadConfiguration(NotRetryable):
    """A stage refused its configuration (a bad value, a model location that holds no model)."""


class StageTimedOut(StageFailed):
    """A stage ran past its time limit and was stopped; a retry resumes it (train checkpoints)."""


INTERRUPT_GRACE_S = 10  # after SIGINT, time for DVC to release its locks before SIGKILL


# The DVC commands running now, by label: what `scoft run` stops and names when it is interrupted.
RUNNING: dict[subprocess.Popen, str] = {}


def stop_running_stages() -> list[str]:
    """Stop every DVC command this process started (SIGINT, so that DVC releases its locks, then
    SIGKILL); return their labels."""
    stopping = dict(RUNNING)
    threads = [threading.Thread(target=_stop, args=(proc,)) for proc in stopping]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return list(stopping.values())


def _stop(proc: subprocess.Popen) -> None:
    """Stop dvc and the stage command under it: SIGINT to the whole group, SIGKILL if it lingers."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(INTERRUPT_GRACE_S)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


# What the stages print of their progress: "step i/N" (train; base's "planted: vae step i/N", "planted: unet
# step i/N" and "judge: step i/N"), "negatives: i/N sampled", "evaluate: i/N images sampled".
PROGRESS_LINE = re.compile(r"^(?P<phase>[\w :]*?)\s*"
                           r"(?:step (?P<i>\d+)/(?P<n>\d+)\b|(?P<j>\d+)/(?P<m>\d+) (?:images )?sampled)")
# DVC's advice after each stage, about git and `dvc push`, which the flow does itself: not logged.
DVC_HINTS = ("To track the changes with git, run:", "git add ", "To enable auto staging, run:",
             "dvc config core.autostage true", "Use `dvc push` to send your updates to remote storage.")


class _Progress:
    """Prefect progress artifacts fed by the progress lines a stage prints: one per stage and phase
    (base: the VAE, the UNet, the judge), with the time left estimated from the pace so far."""

    def __init__(self, label: str):
        self.label, self.phases = label, {}

    def see(self, line: str) -> None:
        match = PROGRESS_LINE.match(line)
        if not match:
            return
        done, total = int(match["i"] or match["j"]), int(match["n"] or match["m"])
        phase = match["phase"].strip(" :")
        phase = "" if phase == self.label.split("@")[0] else phase  # "negatives: ..." of negatives@KOR
        if total <= 0:
            return
        percent = min(100.0, round(100 * done / total, 1))
        state = self.phases.setdefault(phase, {"id": None, "shown": -1.0, "started": time.monotonic(), "first": done})
        elapsed, pace = time.monotonic() - state["started"], done - state["first"]
        left = f"; about {elapsed / pace * (total - done):.0f} s left" if pace > 0 and done < total else ""
        what = f"{self.label}{' ' + phase if phase else ''}: {done} of {total}{left}"
        if state["id"] is None:
            # artifact keys allow lowercase letters, digits and dashes: train@KOR -> train-kor-progress
            key = re.sub(r"[^a-z0-9-]+", "-", f"{self.label}-{phase}-progress".lower()).replace("--", "-")
            state["id"] = create_progress_artifact(progress=percent, key=key, description=what)
        elif percent - state["shown"] >= 1 or percent == 100:
            update_progress_artifact(state["id"], progress=percent, description=what)
        else:
            return  # compared with what the UI shows, so that many small steps add up to an update
        state["shown"] = percent


SLOT_FILE = Path(".dvc/tmp/scoft-slot.lock")
SLOT_NOTICE_S = 2  # a wait longer than this is logged, so a silent run page has its reason
SLOT_POLL_S = 0.5


def dvc(args: list[str], workdir: str, label: str, timeout_s: float | None = None) -> list[str]:
    """Run a dvc command, one at a time per workspace, logging each line as it comes; raise with the
    last lines on failure."""
    with workspace_slot(workdir, label) as slot:
        return _run_dvc(args, workdir, label, timeout_s, slot)


def _logger():
    try:
        return get_run_logger()
    except MissingContextError:  # outside a flow run (a bench, a test): the module's own logger
        return logging.getLogger(__name__)


@contextlib.contextmanager
def workspace_slot(workdir: str, label: str):
    """Hold the workspace's DVC slot: an exclusive lock (flock) on .dvc/tmp/scoft-slot.lock, which lets
    one DVC command at a time into the workspace. Without it a second command either fails on DVC's
    locks or runs alongside the first, both rewriting dvc.lock. The kernel releases the lock the
    moment its holders are gone, however they end (SIGKILL, a lost server): the Prefect concurrency
    limit it replaces leaked for good when a holder died under the temporary server, which never
    expires leases, or across a server restart. The file says who holds it, for the waiting message.
    Yields the lock's file descriptor, for the DVC command to inherit and hold with its holder."""
    with held_lock(Path(workdir).resolve() / SLOT_FILE, label, "the workspace's DVC slot") as fd:
        yield fd


@contextlib.contextmanager
def held_lock(path: Path, label: str, what: str, wait: bool = True):
    """An exclusive flock on `path`, which names its holder while held; yields its file descriptor, or
    None at once when `wait` is false and another process holds it. A wait longer than SLOT_NOTICE_S
    is logged once, naming the holder and how to stop it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        waited, noticed = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    yield None
                    return
                if not noticed and time.monotonic() - waited > SLOT_NOTICE_S:
                    noticed = True
                    _logger().info("%s: waiting for %s (in %s: %s)", label, what, path.parent.parent.parent,
                                   _holder(path))
                time.sleep(SLOT_POLL_S)
        _claim(fd, label)
        yield fd
    finally:
        os.close(fd)


def _claim(fd: int, label: str, command_pid: int | None = None) -> None:
    run = os.environ.get("PREFECT__FLOW_RUN_ID")
    with contextlib.suppress(Exception):
        from prefect.runtime import flow_run

        run = flow_run.id or run
    holder = {"label": label, "pid": os.getpid(), "command_pid": command_pid, "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "flow_run": run}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)


def _holder(path: Path) -> str:
    """Who holds the lock, and how to free it by hand. The DVC command leads a process group of its
    own (the stage's command runs in it): `kill -- -PID` stops the whole group, where `kill PID` left
    the stage's command (`scoft train`) running without its DVC."""
    try:
        h = json.loads(path.read_text(encoding="utf-8"))
        pids = " ".join(str(p) for p in (h["command_pid"], h["pid"]) if p)
        stop = f"kill -- -{h['command_pid']} {h['pid']}" if h["command_pid"] else f"kill {h['pid']}"
        run = f", flow run {h['flow_run']}" if h.get("flow_run") else ""
        return (f"{h['label']} holds it, process {pids} on {h['host']} since {h['since']}{run}. It comes free the "
                f"moment those processes end, killed or not; to free it by hand, stop them ({stop})")
    except (OSError, ValueError, KeyError, TypeError):
        return f"see {path}; it comes free the moment its holder's process ends"


def _run_dvc(args: list[str], workdir: str, label: str, timeout_s: float | None, slot: int) -> list[str]:
    """The time limit is enforced here, not by Prefect: a Prefect timeout cannot interrupt a task
    thread blocked on a pipe, and would leave a hung GPU stage running. The command inherits the
    workspace slot's lock, so the slot stays taken while it runs, even if this process is killed."""
    logger = _logger()
    progress = _Progress(label)
    tail: deque[str] = deque(maxlen=30)
    env = dvc_environment({"PYTHONUNBUFFERED": "1", "GX_ANALYTICS_ENABLED": "false"})
    # Its own process group, so that stopping it reaches the stage command under DVC's shell too.
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=workdir, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1, start_new_session=True,
                            pass_fds=(slot,))
    _claim(slot, label, proc.pid)
    RUNNING[proc] = label
    timed_out = threading.Event()
    watchdog = threading.Timer(timeout_s or 0, lambda: (timed_out.set(), _stop(proc)))
    try:
        if timeout_s:
            watchdog.start()
        for line in proc.stdout:
            line = line.rstrip()
            if line and not line.strip().startswith(DVC_HINTS):
                tail.append(line)
                logger.info("%s | %s", label, line)
                progress.see(line)
        proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:  # the flow is going down (cancelled, crashed): take the stage with it
            _stop(proc)
        RUNNING.pop(proc, None)
        proc.stdout.close()
    if timed_out.is_set():
        raise StageTimedOut(f"`dvc {' '.join(args)}` ran past its {timeout_s:g} s limit and was stopped:\n"
                            + "\n".join(tail))
    if proc.returncode:
        said = "\n".join(tail)  # DVC reports the stage command's status as "... exited with N"
        error = {f"exited with {DATA_REJECTED}": DataRejected, f"exited with {CONFIG_ERROR}": BadConfiguration}
        error = next((kind for marker, kind in error.items() if marker in said), StageFailed)
        raise error(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return list(tail)


def _retry_unless_not_retryable(task, task_run, state) -> bool:
    try:
        state.result()
    except NotRetryable:
        return False
    except Exception:
        return True
    return False


@task(name="stage", task_run_name="{stage}", retry_condition_fn=_retry_unless_not_retryable)
def run_stage(stage: str, workdir: str = ".") -> dict:
    """Reproduce one dvc.yaml stage if its deps or params changed, within params.yaml's
    orchestration.stage_timeout_s; report whether it ran."""
    timeout_s = load_params(Path(workdir) / "params.yaml").orchestration.stage_timeout_s
    lines = dvc(["repro", "--single-item", stage], workdir, stage, timeout_s)
    ran = not any(SKIPPED in line for line in lines)
    get_run_logger().info("stage %s %s", stage, "ran" if ran else "skipped: nothing it depends on changed")
    return {"stage": stage, "ran": ran}


def stage_task(workdir: str):
    """`run_stage` with the retries of params.yaml's orchestration section."""
    o = load_params(Path(workdir) / "params.yaml").orchestration
    return run_stage.with_options(retries=o.stage_retries, retry_delay_seconds=o.stage_retry_delay_s)


@task(name="dvc-push", retries=2, retry_delay_seconds=10)
def push(workdir: str = ".", targets: list[str] | None = None) -> None:
    """Send what the stages produced to the configured DVC remote."""
    dvc(["push", *(targets or [])], workdir, "push")
