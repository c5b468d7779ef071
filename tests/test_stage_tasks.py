"""The stage task's own guarantees, on a throwaway DVC project: time limits that stop a hung stage,
one DVC command at a time per workspace."""

import subprocess
import sys
import time

import psutil
import pytest
import yaml
from prefect import flow

from tasks.dvc import StageTimedOut, stage_task
from tests.conftest import write_params

HANG = "import os, time\nopen('pids', 'a').write(f'{os.getpid()}\\n')\ntime.sleep(600)\n"
SLOW = "import time\nstart = time.time()\ntime.sleep(2)\nopen('spans', 'a').write(f'{start} {time.time()}\\n')\n"


@pytest.fixture
def project(tmp_path):
    """A DVC project with a stage that never ends, one that takes 2 s, and one that writes a file."""
    (tmp_path / "hang.py").write_text(HANG)
    (tmp_path / "slow.py").write_text(SLOW)
    stages = {"hang": {"cmd": f"{sys.executable} hang.py"}, "slow": {"cmd": f"{sys.executable} slow.py"},
              "write": {"cmd": "echo done > done.txt", "outs": ["done.txt"]}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    write_params(tmp_path / "params.yaml", {"orchestration.stage_retries": 1, "orchestration.stage_retry_delay_s": 0})
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    return tmp_path


def test_a_hung_stage_is_stopped_at_its_time_limit_retried_and_leaves_nothing_running(prefect_server, project):
    write_params(project / "params.yaml", {"orchestration.stage_retries": 1, "orchestration.stage_retry_delay_s": 0,
                                           "orchestration.stage_timeout_s": 3})

    @flow
    def hang_then_write(workdir: str):
        stage = stage_task(workdir)
        try:
            stage("hang", workdir)
        except StageTimedOut as e:
            stopped = str(e)
        return stopped, stage("write", workdir)

    started = time.monotonic()
    stopped, wrote = hang_then_write(str(project))
    assert time.monotonic() - started < 90  # two tries of 3 s each, not 600 s
    assert "ran past its 3 s limit and was stopped" in stopped
    pids = [int(pid) for pid in (project / "pids").read_text().split()]
    assert len(pids) == 2  # the first try, then its retry
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    # DVC released its locks when stopped: the next stage in the same project runs.
    assert wrote == {"stage": "write", "ran": True}
    assert (project / "done.txt").read_text().strip() == "done"


def test_two_stage_runs_in_one_workspace_run_one_after_the_other(prefect_server, project):
    @flow
    def two_at_once(workdir: str):
        stage = stage_task(workdir)
        return [run.result() for run in [stage.submit("slow", workdir), stage.submit("slow", workdir)]]

    assert two_at_once(str(project)) == [{"stage": "slow", "ran": True}] * 2
    spans = sorted(tuple(map(float, line.split())) for line in (project / "spans").read_text().splitlines())
    assert len(spans) == 2 and spans[0][1] <= spans[1][0]  # the second started after the first ended
