"""The stage task's own guarantees, on a throwaway DVC project: time limits that stop a hung stage,
one DVC command at a time per workspace."""

import os
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from prefect import flow, get_client

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
                                           "orchestration.stage_timeout_s": 20})

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
    # two tries of 20 s each, not 600 s (20: DVC and the stage's start-up fit in it on a loaded machine; 3 did not)
    assert time.monotonic() - started < 180
    assert "ran past its 20 s limit and was stopped" in stopped
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


def test_progress_keeps_moving_when_each_step_is_under_one_percent(prefect_server):
    from prefect.artifacts import Artifact

    from tasks.dvc import _Progress

    @flow
    def long_training():
        progress = _Progress("progress-probe")
        for step in range(1, 122):
            progress.see(f"step {step}/400 ldm=0.1 total=0.1 eta=9s")

    long_training()
    shown = Artifact.get("progress-probe-progress").data
    assert 30.2 - 1 < shown <= 30.2  # within 1% of step 121/400; it was frozen at 0.2 (step 1)


def test_every_long_stage_shows_its_progress_and_the_time_left(prefect_server):
    """base (its VAE, UNet and judge), negatives and evaluate, from the lines they print."""
    from prefect.artifacts import Artifact

    from tasks.dvc import _Progress

    @flow
    def stages():
        base, evaluate = _Progress("base"), _Progress("evaluate@KOR")
        for step in (1, 51, 100):
            base.see(f"planted: vae step {step}/100 loss 0.1")
        base.see("planted: unet step 51/100 loss 0.2")
        base.see("judge: step 1/1000 loss 3.7")
        for done in (8, 16):
            time.sleep(0.05)
            evaluate.see(f"evaluate: {done}/32 images sampled")
        _Progress("negatives@KOR").see("negatives: 16/16 sampled")

    stages()
    assert [Artifact.get(f"base-{phase}-progress").data for phase in ("planted-vae", "planted-unet", "judge")] == [
        100.0, 51.0, 0.1]
    evaluating = Artifact.get("evaluate-kor-progress")
    assert evaluating.data == 50.0 and "evaluate@KOR: 16 of 32; about" in evaluating.description
    assert Artifact.get("negatives-kor-progress").data == 100.0


def test_a_run_waiting_for_the_dvc_slot_says_so(prefect_server, project):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    @flow
    def two_at_once(workdir: str):
        stage = stage_task(workdir)
        return [run.result() for run in [stage.submit("slow", workdir), stage.submit("slow", workdir)]]

    state = two_at_once(str(project), return_state=True)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    waiting = [log.message for log in logs if "waiting for the workspace's DVC slot" in log.message]
    assert len(waiting) == 1 and str(project) in waiting[0]


def test_the_deployments_pull_step_names_a_missing_scoft_workspace(tmp_path, monkeypatch):
    import asyncio
    import os

    from prefect.deployments.steps.core import run_steps

    from tests.conftest import ROOT

    pull = yaml.safe_load((ROOT / "deployments/prefect.yaml").read_text())["pull"]
    monkeypatch.delenv("SCOFT_WORKSPACE", raising=False)
    # Prefect wraps a failed step; the run's log shows the traceback with this cause
    with pytest.raises(Exception) as err:
        asyncio.run(run_steps(pull))
    assert "SCOFT_WORKSPACE is not set on this worker" in str(err.value.__cause__)
    monkeypatch.setenv("SCOFT_WORKSPACE", str(tmp_path))
    with pytest.raises(Exception) as err:
        asyncio.run(run_steps(pull))
    assert "no dvc.yaml there" in str(err.value.__cause__)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(ROOT)
    assert asyncio.run(run_steps(pull))["directory"] == str(tmp_path) and os.getcwd() == str(tmp_path)


def test_the_dvc_slot_comes_free_the_moment_its_holder_is_killed(project, caplog):
    """In every mode: no server is involved, so neither the temporary server (which never expired
    Prefect's leases) nor a server restart can leak it."""
    import logging
    import threading

    from tasks.dvc import workspace_slot
    from tests.conftest import ROOT

    hold = "import sys, time\nfrom tasks.dvc import workspace_slot\nwith workspace_slot(sys.argv[1], 'train@KOR'):\n" \
           "    print('held', flush=True)\n    time.sleep(600)\n"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(project)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        acquired = threading.Event()

        def take():
            with workspace_slot(str(project), "ingest"):
                acquired.set()

        with caplog.at_level(logging.INFO, logger="tasks.dvc"):
            threading.Thread(target=take, daemon=True).start()
            assert not acquired.wait(3)
            holder.kill()  # SIGKILL: nothing of the holder runs any more, no clean-up of its own
            holder.wait()
            assert acquired.wait(5)
    finally:
        holder.kill()
    waiting = [r.getMessage() for r in caplog.records if "waiting for the workspace's DVC slot" in r.getMessage()]
    assert len(waiting) == 1 and "train@KOR holds it" in waiting[0] and f"kill {holder.pid}" in waiting[0]


def test_the_waiting_messages_advice_stops_everything_it_names(project, caplog):
    """The DVC command leads a process group with the stage's own command in it (`scoft train` under
    DVC's shell): `kill PID` of the DVC command left the training running. The advice kills the group."""
    import logging
    import re
    import shlex
    import threading

    from tasks.dvc import _claim, workspace_slot

    taken, release = threading.Event(), threading.Event()
    group = subprocess.Popen(["sh", "-c", "sleep 600 & sleep 600"], start_new_session=True)  # DVC and its stage

    def hold():
        with workspace_slot(str(project), "train@KOR") as fd:
            _claim(fd, "train@KOR", group.pid)
            taken.set()
            release.wait(60)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert taken.wait(10)
    time.sleep(0.5)
    members = psutil.Process(group.pid).children(recursive=True) + [psutil.Process(group.pid)]
    assert len(members) >= 2  # the shell and its two sleeps (a shell may exec the last one itself)
    with caplog.at_level(logging.INFO, logger="tasks.dvc"):
        waiter = threading.Thread(target=lambda: workspace_slot(str(project), "ingest").__enter__(), daemon=True)
        waiter.start()
        deadline = time.monotonic() + 10
        while not any("waiting for" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.2)
    message = next(r.getMessage() for r in caplog.records if "waiting for the workspace's DVC slot" in r.getMessage())
    advice = re.search(r"\((kill [^)]*)\)", message)[1]
    assert advice == f"kill -- -{group.pid} {os.getpid()}"
    release.set()
    holder.join(10)
    subprocess.run(shlex.split(advice.replace(f" {os.getpid()}", "")), check=True)  # not this test's own process
    group.wait(10)
    gone, alive = psutil.wait_procs(members, timeout=10)
    assert alive == []
