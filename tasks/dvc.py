"""DVC stages as Prefect tasks: `dvc repro --single-item <stage>` with its output streamed into the run log."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import deque

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from scoft.cli import DATA_REJECTED
from scoft.remote import dvc_environment

SKIPPED = "didn't change, skipping"


class StageFailed(RuntimeError):
    """A stage command failed; a retry may succeed (out of memory, a flaky disk, a preempted GPU)."""


class DataRejected(StageFailed):
    """A stage refused its input data; retrying the same data cannot help."""


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
            self.artifact_id = create_progress_artifact(progress=percent, key=f"{self.label}-progress",
                                                        description=f"{self.label}: optimizer steps done")
        elif percent - self.shown >= 1 or percent == 100:
            update_progress_artifact(self.artifact_id, progress=percent)
        self.shown = percent


def dvc(args: list[str], workdir: str, label: str) -> list[str]:
    """Run a dvc command, logging each line as it comes; raise with the last lines on failure."""
    logger = get_run_logger()
    progress = _Progress(label)
    tail: deque[str] = deque(maxlen=30)
    env = dvc_environment({"PYTHONUNBUFFERED": "1", "GX_ANALYTICS_ENABLED": "false"})
    with subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=workdir, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                logger.info("%s | %s", label, line)
                progress.see(line)
    if proc.returncode:
        error = DataRejected if f"exited with {DATA_REJECTED}" in "\n".join(tail) else StageFailed
        raise error(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return list(tail)


def _retry_unless_data_rejected(task, task_run, state) -> bool:
    try:
        state.result()
    except DataRejected:
        return False
    except Exception:
        return True
    return False


@task(name="stage", task_run_name="{stage}", retry_condition_fn=_retry_unless_data_rejected)
def run_stage(stage: str, workdir: str = ".") -> dict:
    """Reproduce one dvc.yaml stage if its deps or params changed; report whether it ran."""
    lines = dvc(["repro", "--single-item", stage], workdir, stage)
    ran = not any(SKIPPED in line for line in lines)
    get_run_logger().info("stage %s %s", stage, "ran" if ran else "skipped: nothing it depends on changed")
    return {"stage": stage, "ran": ran}


@task(name="dvc-push", retries=2, retry_delay_seconds=10)
def push(workdir: str = ".", targets: list[str] | None = None) -> None:
    """Send what the stages produced to the configured DVC remote."""
    dvc(["push", *(targets or [])], workdir, "push")
