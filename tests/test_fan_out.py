"""The loop on a real Prefect server (`prefect server start` from `make serve`'s script, not the
in-process harness), tests/fan_out_scenario.py: the ingest deployment's `ccub.updated` event starts
retrain-on-update, which starts one `retrain-culture` flow run per culture; two process workers take one
each, in workspaces of their own, and the data moves only through the shared DVC remote. KOR's worker is
killed with its whole tree mid-training: `scoft recovery`'s automations crash its run and run it again,
and it resumes from its checkpoint. The first round is judged and promoted by hand; a LoRA with no effect
then goes through the same loop and is rejected. The scenario runs in the background from the start of the session."""

import json
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from scoft.io import sha256_file
from tests.fan_out_scenario import CULTURES, FAST, LORA, NO_EFFECT

CHAIN = [f"{stage}@{c}" for c in CULTURES for stage in ("negatives", "train", "evaluate")]

def _workspaces(fanned_out) -> dict[str, Path]:
    return {name: Path(path) for name, path in fanned_out["workspaces"].items()}


def test_each_culture_trains_on_a_worker_of_its_own_at_the_same_time(fanned_out):
    runs = fanned_out["runs"]
    assert set(runs) == set(CULTURES) and all(r["state"] == "COMPLETED" for r in runs.values()), runs
    kor, nga = ({k: datetime.fromisoformat(r[k]) for k in ("start", "end")} for r in (runs["KOR"], runs["NGA"]))
    assert kor["start"] < nga["end"] and nga["start"] < kor["end"]  # they overlapped
    # each in its own worker's workspace: one LoRA per culture per workspace, none in the other, and
    # none trained in the serve workspace, where the retrain run itself ran
    where = fanned_out["trained_in"]
    assert sorted(where["KOR"] + where["NGA"]) == ["w1", "w2"], where


def test_the_parent_records_each_cultures_outputs_and_its_lock_reproduces(fanned_out):
    ws = _workspaces(fanned_out)
    parent = ws["serve"]
    for culture in CULTURES:  # the very files the culture's worker trained, come through the DVC remote
        lora = LORA.format(culture)
        trained = {sha256_file(w / lora) for w in (ws["w1"], ws["w2"]) if (w / lora).is_file()}
        assert sha256_file(parent / LORA.format(culture)) in trained
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
    # the first round's summary, as the parent recorded it in KOR's lineage (the second round retrained KOR)
    summary = fanned_out["kor_first_training"]
    assert summary["steps"] == FAST["train.max_steps"] and summary["resumed_from"] >= 4


def _seconds(a: str, b: str) -> float:
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def test_the_ingest_deployments_event_starts_the_retrain_which_judges(fanned_out):
    """Round 1: ingest (cpu worker) announces a version; retrain-on-update (gpu worker) trains exactly that
    version, evaluates and judges each culture; production is the LoRA the culture's worker trained."""
    loop = fanned_out["promoted"]
    assert loop["ingest_state"] == "COMPLETED" and loop["retrain_state"] == "COMPLETED", loop["retrain_message"]
    assert loop["ccub_version"] == loop["summary"]["version"]  # the event's version, not whatever is current
    created, started = _seconds(loop["event_at"], loop["retrain_created"]), _seconds(loop["event_at"],
                                                                                      loop["retrain_started"])
    print(f"ccub.updated -> retrain-on-update run created in {created:.1f} s, running in {started:.1f} s")
    assert 0 <= created < 60
    for culture in CULTURES:
        decision, entry = loop["decisions"][culture], loop["production"][culture]
        assert decision["lora_sha256"] == fanned_out["first_round_lora_sha256"][culture]  # judged
        assert [r["rule"] for r in decision["rules"]][0] == "distance to held-out images better than the base"
        assert decision["family"] == sorted(CULTURES)  # one test family: the retrain's cultures, Holm
        # promoted by hand after the gate: production is the LoRA the culture's worker trained
        assert entry["production"]["lora_sha256"] == fanned_out["first_round_lora_sha256"][culture]


def test_a_no_effect_lora_goes_through_the_same_loop_and_is_rejected(fanned_out):
    """Round 2: a LoRA that draws exactly what the base draws and one new KOR record; the event starts the
    same loop, both cultures retrain, and the gate keeps production as it was, saying why: no gain over
    the base (p 1), and production, promoted by hand without an evaluation, measured again."""
    first, second = fanned_out["promoted"], fanned_out["rejected"]
    assert second["retrain_state"] == "COMPLETED", second["retrain_message"]
    assert second["summary"]["added"] == 1 and second["ccub_version"] != first["ccub_version"]
    for culture in CULTURES:
        decision = second["decisions"][culture]
        assert decision["lora_sha256"] != first["decisions"][culture]["lora_sha256"]  # it did retrain
        assert not decision["promote"]
        failed = [r["rule"] for r in decision["rules"] if not r["passed"]]
        assert "distance to held-out images better than the base" in failed, decision
        assert decision["distance_gain"] == 0.0 and decision["significance"]["p"] == 1.0
        production_rule = next(r for r in decision["rules"] if r["rule"] == "better than production")
        assert "cannot be judged" not in production_rule["detail"], production_rule  # measured again
        kept = second["production_images"][culture]  # and its images kept for the insiders' pairs against it
        assert kept and {e["culture"] for e in kept} == {culture}
        entry = second["production"][culture]
        assert entry["production"] == first["production"][culture]["production"]  # unchanged
        assert entry["history"][-1]["action"] == "reject"
    assert all(v == 0.0 for v in NO_EFFECT.values())


def test_ctrl_c_stops_make_serve_and_everything_it_started(fanned_out):
    """`make serve` ends on Ctrl-C without leaving its server, workers or flow runs behind."""
    assert fanned_out["left_after_ctrl_c"] == []
