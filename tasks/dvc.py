"""DVC stages as Prefect tasks: `dvc repro --single-item <stage>` with its output streamed into the run log."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

from prefect import get_client, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

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


def _stop(proc: subprocess.Popen) -> None:
    """Stop dvc and the stage command under it: SIGINT to the whole group, SIGKILL if it lingers."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(INTERRUPT_GRACE_S)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


STEP_LINE = re.compile(r"^step (\d+)/(\d+) ")


class _Progress:
    """A Prefect progress artifact fed by the `step i/N ...` lines a stage prints."""

    def __init__(self, label: str):
        self.label, self.artifact_id, self.shown = label, None, -1.0

    def see(self, line: str) -> None:
        match = STEP_LINE.match(line)
        if not match:
            return
        percent = round(100 * int(match[1]) / int(match[2]), 1)
        if self.artifact_id is None:
            # artifact keys allow lowercase letters, digits and dashes: train@KOR -> train-kor-progress
            key = re.sub(r"[^a-z0-9-]+", "-", f"{self.label}-progress".lower())
            self.artifact_id = create_progress_artifact(progress=percent, key=key,
                                                        description=f"{self.label}: optimizer steps done")
        elif percent - self.shown >= 1 or percent == 100:
            update_progress_artifact(self.artifact_id, progress=percent)
        else:
            return  # compared with what the UI shows, so that many small steps add up to an update
        self.shown = percent


def workspace_lock(workdir: str) -> str:
    """The Prefect global concurrency limit (one slot) that lets one DVC command at a time into a
    workspace. Without it a second command either fails on DVC's locks or runs alongside the first,
    both rewriting dvc.lock; with it, the second waits (visible in the UI's concurrency page)."""
    place = f"{socket.gethostname()}:{Path(workdir).resolve()}"
    name = "dvc-workspace-" + hashlib.sha256(place.encode()).hexdigest()[:12]
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:  # an operator may later raise or disable it in the UI: create it, never overwrite it
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass
    return name


def dvc(args: list[str], workdir: str, label: str, timeout_s: float | None = None) -> list[str]:
    """Run a dvc command, one at a time per workspace, logging each line as it comes; raise with the
    last lines on failure."""
    with _workspace_slot(workdir, label):
        return _run_dvc(args, workdir, label, timeout_s)


SLOT_NOTICE_S = 2  # a wait longer than this is logged, so a silent run page has its reason
# The slot's lease, renewed while the command runs: a flow process killed outright (SIGKILL, a lost
# machine) frees the workspace within this, not Prefect's default 300 s. The server's minimum.
SLOT_LEASE_S = 60


@contextlib.contextmanager
def _workspace_slot(workdir: str, label: str):
    """Hold the workspace's DVC slot; when another DVC command holds it, say so in the run's log.
    (A watcher thread, not a time-out on the acquisition: Prefect logs every timed-out acquisition
    as an error.)"""
    slot, logger, acquired = workspace_lock(workdir), get_run_logger(), threading.Event()

    def notice():
        if not acquired.wait(SLOT_NOTICE_S):
            logger.info("%s: waiting for the workspace's DVC slot %s (another DVC command is running in %s; "
                        "one at a time, see Concurrency in the UI)", label, slot, Path(workdir).resolve())

    threading.Thread(target=notice, daemon=True).start()
    try:
        with concurrency(slot, occupy=1, strict=True, lease_duration=SLOT_LEASE_S):
            acquired.set()
            yield
    finally:
        acquired.set()


def _run_dvc(args: list[str], workdir: str, label: str, timeout_s: float | None) -> list[str]:
    """The time limit is enforced here, not by Prefect: a Prefect timeout cannot interrupt a task
    thread blocked on a pipe, and would leave a hung GPU stage running."""
    logger = get_run_logger()
    progress = _Progress(label)
    tail: deque[str] = deque(maxlen=30)
    env = dvc_environment({"PYTHONUNBUFFERED": "1", "GX_ANALYTICS_ENABLED": "false"})
    # Its own process group, so that stopping it reaches the stage command under DVC's shell too.
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=workdir, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1, start_new_session=True)
    timed_out = threading.Event()
    watchdog = threading.Timer(timeout_s or 0, lambda: (timed_out.set(), _stop(proc)))
    try:
        if timeout_s:
            watchdog.start()
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                logger.info("%s | %s", label, line)
                progress.see(line)
        proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:  # the flow is going down (cancelled, crashed): take the stage with it
            _stop(proc)
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
