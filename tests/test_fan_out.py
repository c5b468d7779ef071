"""Fan-out on a real Prefect server (`prefect server start`, not the in-process harness): the retrain
run starts one `retrain-culture` flow run per culture (deployments/prefect.yaml, `prefect deploy`),
two process workers take one each, in workspaces of their own, and the data moves only through the
shared DVC remote. A culture's training killed mid-run is retried and resumes from its checkpoint."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime

import psutil
import pytest

from scoft.io import sha256_file
from tests.conftest import BIN, ROOT, make_workspace

CULTURES = ["KOR", "NGA"]
FAST = {"train.max_steps": 16, "train.checkpoint_every": 4, "negatives.per_image": 1, "evaluate.bootstrap": 100,
        "evaluate.samples_per_prompt": 2, "orchestration.stage_retry_delay_s": 0, "validate.cultures": CULTURES,
        "orchestration.culture_deployment": "retrain-culture/retrain-culture"}
LORA = "models/lora/{}/pytorch_lora_weights.safetensors"
CHAIN = [f"{stage}@{c}" for c in CULTURES for stage in ("negatives", "train", "evaluate")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, log, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"prefect server exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"prefect server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def _stop_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process started in its own session and everything under it (a worker's flow runs)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for child in children:
        child.kill()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _checkout(path, sample_dir):
    """A workspace that is a checkout, as a worker's SCOFT_WORKSPACE: the flows and tasks as well."""
    ws = make_workspace(path, sample_dir, FAST)
    for package in ("flows", "tasks"):
        shutil.copytree(ROOT / package, ws / package, ignore=shutil.ignore_patterns("__pycache__"))
    return ws


def _kill_the_kor_worker_mid_training(parent_run, workspaces, workers, start_worker, api) -> dict:
    """After KOR's first checkpoint, SIGKILL its worker's whole tree (worker, flow run, dvc, scoft train)
    and start that worker again, as after a reboot; once NGA's run is done, stop NGA's worker, so the
    restarted KOR run can only land where its checkpoint is."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    killed, deadline = {}, time.monotonic() + 900
    with SyncPrefectClient(api) as client:
        while parent_run.poll() is None and time.monotonic() < deadline:
            if not killed:
                for name in ("w1", "w2"):
                    if list(workspaces[name].glob("models/lora/KOR/checkpoints/*/step-000000004.pt")):
                        _stop_tree(workers[name])
                        killed = {"worker": name, "at": datetime.now(UTC)}
                        workers[name] = start_worker(name)
                        break
            elif "other_stopped" not in killed:
                nga = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["retrain-NGA"])))
                if nga and nga[0].state.is_final():
                    _stop_tree(workers["w2" if killed["worker"] == "w1" else "w1"])
                    killed["other_stopped"] = True
            time.sleep(0.05 if not killed else 1)
    return killed


@pytest.fixture(scope="module")
def fanned_out(sample_dir, tmp_path_factory):
    """The server, the gpu pool, the deployment, `scoft recovery`'s automations, two workers, and one
    retrain run of a third workspace that fans out over them; KOR's worker is killed mid-training."""
    tmp = tmp_path_factory.mktemp("fan-out")
    api = f"http://127.0.0.1:{_free_port()}/api"
    env = dict(os.environ, PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_API_URL=api, PREFECT_UI_ENABLED="false",
               PREFECT_WORKER_QUERY_SECONDS="1", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    started = []
    try:
        log = tmp / "server.log"
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                   "--port", api.split(":")[-1].split("/")[0]], env=env, stdout=log.open("w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        started.append(server)
        _wait_healthy(api, server, log)
        prefect = [str(BIN / "prefect"), "--no-prompt"]
        for args in (["work-pool", "create", "gpu", "--type", "process",
                      "--base-job-template", "deployments/gpu-process-job-template.json"],
                     ["deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "retrain-culture"]):
            out = subprocess.run(prefect + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stdout + out.stderr
        recovery = subprocess.run([str(BIN / "scoft"), "recovery", "--heartbeat-timeout", "45"], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=120)
        assert recovery.returncode == 0, recovery.stdout + recovery.stderr
        remote = tmp / "remote"
        workspaces = {}
        for name in ("parent", "w1", "w2"):
            ws = workspaces[name] = _checkout(tmp / name, sample_dir)
            subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "-f", "local", str(remote)],
                           cwd=ws, check=True, capture_output=True)

        def start_worker(name: str) -> subprocess.Popen:  # one flow run at a time, as one worker per GPU
            worker = subprocess.Popen(
                prefect + ["worker", "start", "--pool", "gpu", "--name", name, "--limit", "1"],
                cwd=workspaces[name], env=dict(env, SCOFT_WORKSPACE=str(workspaces[name])),
                stdout=(tmp / f"{name}.log").open("a"), stderr=subprocess.STDOUT, start_new_session=True)
            started.append(worker)
            return worker

        workers = {name: start_worker(name) for name in ("w1", "w2")}
        parent = workspaces["parent"]
        run = subprocess.Popen(
            [sys.executable, "-c", "import sys; from flows.retrain import retrain; "
             "s = retrain(workdir='.', return_state=True); print('STATE', s.type.value, s.message); "
             "sys.exit(0 if s.is_completed() else 1)"],
            cwd=parent, env=env, stdout=(tmp / "parent.log").open("w"), stderr=subprocess.STDOUT)
        killed = _kill_the_kor_worker_mid_training(run, workspaces, workers, start_worker, api)
        assert run.wait(60) == 0, (tmp / "parent.log").read_text()[-5000:]
        yield {"api": api, "workspaces": workspaces, "killed": killed}
    finally:
        for proc in reversed(started):
            _stop_tree(proc)


def test_each_culture_trains_on_a_worker_of_its_own_at_the_same_time(fanned_out):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    ws = fanned_out["workspaces"]
    with SyncPrefectClient(fanned_out["api"]) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain-culture"])))
    runs = {r.parameters["culture"]: r for r in runs}
    assert set(runs) == set(CULTURES) and all(r.state.is_completed() for r in runs.values())
    kor, nga = runs["KOR"], runs["NGA"]
    assert kor.start_time < nga.end_time and nga.start_time < kor.end_time  # they overlapped
    # each in its own worker's workspace: one LoRA per culture per workspace, none in the other
    where = {c: [name for name in ("w1", "w2") if (ws[name] / LORA.format(c)).is_file()] for c in CULTURES}
    assert sorted(where["KOR"] + where["NGA"]) == ["w1", "w2"], where


def test_the_parent_records_each_cultures_outputs_and_its_lock_reproduces(fanned_out):
    ws = fanned_out["workspaces"]
    parent = ws["parent"]
    for culture in CULTURES:  # the very files the culture's worker trained, come through the DVC remote
        worker = next(w for w in (ws["w1"], ws["w2"]) if (w / LORA.format(culture)).is_file())
        assert sha256_file(parent / LORA.format(culture)) == sha256_file(worker / LORA.format(culture))
        assert (parent / f"reports/metrics/{culture}.json").is_file()
    dvc = [sys.executable, "-m", "dvc"]
    shutil.rmtree(parent / "models/lora")
    shutil.rmtree(parent / "reports")
    out = subprocess.run(dvc + ["pull", *CHAIN], cwd=parent, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    status = subprocess.run(dvc + ["status", "--json", *CHAIN], cwd=parent, capture_output=True, text=True)
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout + status.stderr


def test_a_culture_whose_worker_tree_is_killed_crashes_is_run_again_and_resumes(fanned_out):
    """Without heartbeats and `scoft recovery` the run would stay Running for good (issue 10)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    killed = fanned_out["killed"]
    assert "at" in killed, "KOR never reached its first checkpoint"
    with SyncPrefectClient(fanned_out["api"]) as client:
        kor = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["retrain-KOR"])))[0]
        states = client.read_flow_run_states(kor.id)
    history = [s.name for s in states]
    crashed = [s.timestamp for s in states if s.is_crashed()]
    assert crashed, history
    seconds = (crashed[0] - killed["at"]).total_seconds()
    print(f"KOR's worker killed -> its run Crashed in {seconds:.0f} s; states {history}")
    assert seconds < 120 and "AwaitingRetry" in history and kor.state.is_completed() and kor.run_count == 2
    summary = json.loads((fanned_out["workspaces"]["parent"] / "models/lora/KOR/training.json").read_text())
    assert summary["steps"] == FAST["train.max_steps"] and summary["resumed_from"] >= 4
