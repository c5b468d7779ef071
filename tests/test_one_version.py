"""One run, one version, one record: an ingest that lands while a retrain runs in the same workspace
neither changes the retrain's data nor waits for it."""

import json
import threading
import time

import psutil
import pytest

from tests.conftest import make_workspace

CULTURES = ["KOR", "NGA"]
# Two cultures' chains: the ingest starts with the first one and must not land before the second.
FAST = {"train.max_steps": 8, "train.checkpoint_every": 4, "negatives.per_image": 1, "evaluate.bootstrap": 100,
        "evaluate.samples_per_prompt": 2, "orchestration.stage_retry_delay_s": 0, "validate.cultures": CULTURES}


def _ingest_version(ws) -> tuple[str, int]:
    summary = json.loads((ws / "data/ingest/summary.json").read_text())
    return summary["version"], summary["records"]


def _stage_running(ws, name: str) -> bool:
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["cwd"] == str(ws) and f"scoft {name}" in cmd and "dvc" not in cmd:
            return True
    return False


@pytest.fixture(scope="module")
def interleaved(prefect_server, sample_dir, tmp_path_factory):
    """A retrain pinned to version V; as its first culture's chain starts, an ingest flow of V+1 (one
    training record added to each culture) in the same workspace. What each saw, and when each ended.
    Before, the ingest waited for the DVC slot and landed between two of the retrain's stages."""
    from flows.ingest import ingest
    from flows.retrain import retrain
    from scoft.ccub import TRAIN, read_manifest
    from scoft.sample import add_sample_image

    ws = make_workspace(tmp_path_factory.mktemp("one-version") / "ws", sample_dir, FAST)
    first = ingest(workdir=str(ws))
    v, v_records = _ingest_version(ws)
    assert first["version"] == v
    v_ids = {c: sorted(r.id for r in read_manifest(ws / "data/ccub", c)) for c in CULTURES}
    v_train = {c: sum(r.split == TRAIN for r in read_manifest(ws / "data/ccub", c)) for c in CULTURES}

    outcome = {}

    def run_retrain():
        outcome["state"] = retrain(workdir=str(ws), ccub_version=v, return_state=True)
        outcome["ended"] = time.monotonic()

    retraining = threading.Thread(target=run_retrain)
    retraining.start()
    deadline = time.monotonic() + 600
    while not _stage_running(ws, "negatives") and retraining.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert retraining.is_alive(), "the retrain ended before its training could be watched"
    for culture in CULTURES:
        add_sample_image(ws / "data/sample", culture)
    started = time.monotonic()
    announced = ingest(workdir=str(ws))
    announced_after = time.monotonic() - started
    retrain_alive_at_announce = retraining.is_alive()
    retraining.join(900)
    return {"ws": ws, "v": v, "v_records": v_records, "v_ids": v_ids, "v_train": v_train, "announced": announced,
            "announced_after_s": announced_after, "alive_at_announce": retrain_alive_at_announce, **outcome}


def test_the_ingest_announces_its_version_while_the_retrain_still_runs(interleaved):
    announced = interleaved["announced"]
    assert announced is not None and announced["version"] != interleaved["v"]
    assert announced["added"] == 2 and announced["records"] == interleaved["v_records"] + 2
    assert interleaved["alive_at_announce"], "the ingest waited for the retrain to end"


def test_every_record_of_the_retrain_says_the_version_it_started_with(interleaved):
    from scoft.lineage import latest_record

    state, ws, v = interleaved["state"], interleaved["ws"], interleaved["v"]
    assert state.is_completed(), state.message
    for culture in CULTURES:
        _, record = latest_record(ws, culture)
        assert record["ccub"]["dvc_hash"] == v
        assert record["ccub"]["records"] == interleaved["v_ids"][culture]
        assert record["validation"]["statistics"]["records"] == interleaved["v_records"]
        assert record["prefect_flow_run_id"] == str(state.state_details.flow_run_id)
        trained_on = json.loads((ws / f"models/lora/{culture}/training.json").read_text())
        assert trained_on["train_records"] == interleaved["v_train"][culture]  # what it trained on, not only said
    # the workspace still holds V: the retrain's lease kept the ingest from taking V+1 into it
    assert _ingest_version(ws)[0] == v

