"""Fan-out on a real Prefect server (`prefect server start`, not the in-process harness): the retrain
run starts one `retrain-culture` flow run per culture (deployments/prefect.yaml, `prefect deploy`),
two process workers take one each, in workspaces of their own, and the data moves only through the
shared DVC remote. KOR's worker is killed with its whole tree mid-training: `scoft recovery`'s
automations crash its run and run it again, and it resumes from its checkpoint. The scenario
(tests/fan_out_scenario.py) runs in the background from the start of the session."""

import json
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from scoft.io import sha256_file
from tests.fan_out_scenario import CULTURES, FAST

LORA = "models/lora/{}/pytorch_lora_weights.safetensors"
CHAIN = [f"{stage}@{c}" for c in CULTURES for stage in ("negatives", "train", "evaluate")]

def _workspaces(fanned_out) -> dict[str, Path]:
    return {name: Path(path) for name, path in fanned_out["workspaces"].items()}


def test_each_culture_trains_on_a_worker_of_its_own_at_the_same_time(fanned_out):
    runs, ws = fanned_out["runs"], _workspaces(fanned_out)
    assert set(runs) == set(CULTURES) and all(r["state"] == "COMPLETED" for r in runs.values()), runs
    kor, nga = ({k: datetime.fromisoformat(r[k]) for k in ("start", "end")} for r in (runs["KOR"], runs["NGA"]))
    assert kor["start"] < nga["end"] and nga["start"] < kor["end"]  # they overlapped
    # each in its own worker's workspace: one LoRA per culture per workspace, none in the other
    where = {c: [name for name in ("w1", "w2") if (ws[name] / LORA.format(c)).is_file()] for c in CULTURES}
    assert sorted(where["KOR"] + where["NGA"]) == ["w1", "w2"], where


def test_the_parent_records_each_cultures_outputs_and_its_lock_reproduces(fanned_out):
    ws = _workspaces(fanned_out)
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
    killed, kor = fanned_out["killed"], fanned_out["runs"]["KOR"]
    assert killed["at"], "KOR never reached its first checkpoint"
    names = [name for name, _, _ in kor["history"]]
    crashed = [datetime.fromisoformat(at) for _, kind, at in kor["history"] if kind == "CRASHED"]
    assert crashed, names
    seconds = (crashed[0] - datetime.fromisoformat(killed["at"])).total_seconds()
    print(f"KOR's worker killed -> its run Crashed in {seconds:.0f} s; states {names}")
    assert seconds < 120 and "AwaitingRetry" in names and kor["state"] == "COMPLETED" and kor["run_count"] == 2
    summary = json.loads((_workspaces(fanned_out)["parent"] / "models/lora/KOR/training.json").read_text())
    assert summary["steps"] == FAST["train.max_steps"] and summary["resumed_from"] >= 4
