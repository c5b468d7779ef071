"""The stage task's own guarantees, on a throwaway DVC project: time limits that stop a hung stage."""

import subprocess
import sys
import time

import psutil
import pytest
import yaml
from prefect import flow

from tasks.dvc import StageTimedOut, stage_runner
from tests.conftest import write_params

HANG = "import os, time; open('pids', 'a').write(f'{os.getpid()}\\n'); time.sleep(600)"


@pytest.fixture
def hanging_project(tmp_path):
    """A DVC project with a stage that never ends and one that writes a file."""
    stages = {"hang": {"cmd": f'{sys.executable} -c "{HANG}"'},
              "write": {"cmd": "echo done > done.txt", "outs": ["done.txt"]}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    write_params(tmp_path / "params.yaml", {"orchestration.stage_retries": 1, "orchestration.stage_retry_delay_s": 0,
                                            "orchestration.stage_timeout_s": 3})
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    return tmp_path


def test_a_hung_stage_is_stopped_at_its_time_limit_retried_and_leaves_nothing_running(prefect_server, hanging_project):
    @flow
    def hang_then_write(workdir: str):
        stage = stage_runner(workdir)
        try:
            stage("hang")
        except StageTimedOut as e:
            stopped = str(e)
        return stopped, stage("write")

    started = time.monotonic()
    stopped, wrote = hang_then_write(str(hanging_project))
    assert time.monotonic() - started < 90  # two tries of 3 s each, not 600 s
    assert "ran past its 3 s limit and was stopped" in stopped
    pids = [int(pid) for pid in (hanging_project / "pids").read_text().split()]
    assert len(pids) == 2  # the first try, then its retry
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    # DVC released its locks when stopped: the next stage in the same project runs.
    assert wrote == {"stage": "write", "ran": True}
    assert (hanging_project / "done.txt").read_text().strip() == "done"
