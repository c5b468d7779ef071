"""The fan-out scenario of tests/test_fan_out.py, run in the background from collection on (it mostly
waits on its servers and workers; tests/conftest.py): a real `prefect server start`, the gpu pool from
deployments/gpu-process-job-template.json, `prefect deploy` of retrain-culture, `scoft recovery`, two
process workers with workspaces of their own and a third workspace whose retrain run fans out over
them; KOR's worker tree is SIGKILLed after KOR's first checkpoint. Writes DIR/result.json with what
the tests check (the culture runs and their states); stops everything it started.

    python -m tests.fan_out_scenario DIR
"""

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
from pathlib import Path

import psutil

from tests.conftest import BIN, ROOT, make_workspace

CULTURES = ["KOR", "NGA"]
FAST = {"train.max_steps": 16, "train.checkpoint_every": 4, "negatives.per_image": 1, "evaluate.bootstrap": 100,
        "evaluate.samples_per_prompt": 2, "orchestration.stage_retry_delay_s": 0, "validate.cultures": CULTURES,
        "orchestration.culture_deployment": "retrain-culture/retrain-culture"}


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


def run(tmp: Path) -> dict:
    from scoft.sample import write_sample

    sample_dir = write_sample(tmp / "ccub-sample")
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
        return {"workspaces": {k: str(v) for k, v in workspaces.items()}, "runs": _culture_runs(api),
                "killed": {"worker": killed.get("worker"), "at": killed["at"].isoformat() if killed else None}}
    finally:
        for proc in reversed(started):
            _stop_tree(proc)




def _culture_runs(api: str) -> dict:
    """Each retrain-culture run: start, end, final state, starts, and its state history."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with SyncPrefectClient(api) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain-culture"])))
        return {r.parameters["culture"]: {
            "start": r.start_time.isoformat(), "end": r.end_time.isoformat(), "state": r.state.type.value,
            "run_count": r.run_count,
            "history": [(s.name, s.type.value, s.timestamp.isoformat()) for s in client.read_flow_run_states(r.id)],
        } for r in runs}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    result = run(out)
    (out / "result.json").write_text(json.dumps(result, indent=1))
