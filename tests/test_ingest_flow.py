"""The ingest flow on a Prefect server: a new CCUB version emits `ccub.updated`, no change emits nothing;
a run pinned to an announced version pulls exactly it; an ingest that lands while a retrain runs in the
same workspace neither changes the retrain's data nor waits for it."""

import json
import threading
import time

import psutil
import pytest
from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

from tests.conftest import make_workspace


def _ccub_events(since, expected: int, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_events(filter=EventFilter(event=EventNameFilter(name=["ccub.updated"]),
                                                         occurred=EventOccurredFilter(since=since)), limit=50)
            events = [e for e in page.events if e.resource.get("scoft.emitter") == "ingest"]
            if len(events) >= expected or time.monotonic() > deadline:
                return events
            time.sleep(0.5)


@pytest.fixture(scope="module")
def ingested(prefect_server, sample_dir, tmp_path_factory):
    """A workspace after its first ingest flow run: (workspace, the flow's result, when it started)."""
    from prefect.types._datetime import now

    from flows.ingest import ingest

    ws = make_workspace(tmp_path_factory.mktemp("ingest") / "ws", sample_dir)
    since = now("UTC")
    return ws, ingest(workdir=str(ws)), since


def test_new_version_emits_one_event_and_an_unchanged_source_none(ingested):
    from flows.ingest import ingest

    ws, first, since = ingested
    assert first["added"] == 63 and first["version"].endswith(".dir")
    events = _ccub_events(since, expected=1)
    assert len(events) == 1
    event = events[0]
    assert (
        event.payload["version"]
        == first["version"]
        == json.loads((ws / "data/ingest/summary.json").read_text())["version"]
    )
    assert (event.payload["added"], event.payload["removed"]) == (63, 0)
    assert event.resource["scoft.emitter"] == "ingest"
    assert (ws.parent / "ws-remote").is_dir()  # the version was pushed

    second = ingest(workdir=str(ws))
    assert second is None
    time.sleep(3)
    assert len(_ccub_events(since, expected=2, timeout=3)) == 1


def test_a_run_pinned_to_a_ccub_version_pulls_exactly_that_version_from_the_remote(ingested, sample_dir, tmp_path):
    """What the `retrain-on-update` deployment does on a GPU worker with the announced version."""
    import shutil
    import subprocess
    import sys

    import yaml
    from prefect import flow

    from scoft.io import dvc_dir_hash
    from tasks.ccub import CCUBVersionUnavailable, pull_ccub_version

    ingest_ws, first, _ = ingested
    announced = first["version"]
    gpu_ws = make_workspace(tmp_path / "gpu-ws", sample_dir)  # a fresh worker checkout: no dvc.lock, no data
    subprocess.run(
        [sys.executable, "-m", "dvc", "remote", "modify", "local", "url", str(ingest_ws.parent / "ws-remote")],
        cwd=gpu_ws,
        check=True,
    )
    shutil.rmtree(gpu_ws / "data/sample")  # nothing to ingest from: the data can only come from the remote

    @flow
    def pull(version: str):
        return pull_ccub_version(str(gpu_ws), version)

    assert pull(announced) == announced
    assert dvc_dir_hash(gpu_ws / "data/ccub") == announced
    lock = yaml.safe_load((gpu_ws / "dvc.lock").read_text())
    assert lock["stages"]["ingest"]["outs"][0]["md5"] == announced  # what lineage records

    lock_before = (gpu_ws / "dvc.lock").read_text()
    missing = "0" * 32 + ".dir"
    with pytest.raises(CCUBVersionUnavailable, match=missing):
        pull(missing)
    assert dvc_dir_hash(gpu_ws / "data/ccub") == announced  # the workspace is as it was
    assert (gpu_ws / "dvc.lock").read_text() == lock_before


def test_pinning_a_version_changes_only_that_output_in_dvc_lock(tmp_path):
    """dvc.lock is YAML 1.2 as DVC reads it: a recorded `mixed_precision: no` must stay the string
    "no" (PyYAML would write false, and DVC would rerun the train stage for changed params)."""
    from scoft.remote import pin_locked_output, restore_lock

    lock = """schema: '2.0'
stages:
  ingest:
    cmd: scoft ingest --out data/ccub --summary data/ingest/summary.json
    outs:
    - path: data/ccub
      hash: md5
      md5: 11111111111111111111111111111111.dir
      size: 10
      nfiles: 2
  train:
    cmd: scoft train --ccub data/ccub --negatives data/negatives --output models/lora
      --log-dir models/train_log
    params:
      params.yaml:
        train:
          mixed_precision: no
          revision:
"""
    (tmp_path / "dvc.lock").write_text(lock)
    previous = pin_locked_output(tmp_path, "ingest", "data/ccub", "2" * 32 + ".dir")
    assert previous == lock
    after = (tmp_path / "dvc.lock").read_text()
    assert "md5: 22222222222222222222222222222222.dir" in after
    from ruamel.yaml import YAML

    before_train, after_train = (YAML(typ="safe").load(text)["stages"]["train"] for text in (lock, after))
    assert after_train == before_train and after_train["params"]["params.yaml"]["train"]["mixed_precision"] == "no"
    with pytest.raises(ValueError, match="not a DVC folder version"):
        pin_locked_output(tmp_path, "ingest", "data/ccub", "../../etc")
    restore_lock(tmp_path, previous)
    assert (tmp_path / "dvc.lock").read_text() == lock


CULTURES = ["KOR"]
# The retrain's training is paused (SIGSTOP) while the ingest runs, so however long the ingest takes here, the
# retrain cannot end before it: a short training suffices. Before, the ingest waited for the workspace's DVC
# slot, which the training held, and landed between two of the retrain's stages; paused, it would wait for good.
FAST = {"train.max_steps": 8, "train.checkpoint_every": 8, "negatives.per_image": 1, "negatives.steps": 2,
        "evaluate.steps": 2, "evaluate.bootstrap": 100, "evaluate.samples_per_prompt": 2,
        "orchestration.stage_retry_delay_s": 0, "validate.cultures": CULTURES}
# How long the paused retrain gives the ingest (about 20 s alone here) before the test calls it waiting.
INGEST_PATIENCE_S = 300


def _ingest_version(ws) -> tuple[str, int]:
    summary = json.loads((ws / "data/ingest/summary.json").read_text())
    return summary["version"], summary["records"]


def _stage_process(ws, name: str) -> psutil.Process | None:
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["cwd"] == str(ws) and f"scoft {name}" in cmd and "dvc" not in cmd:
            return proc
    return None


@pytest.fixture(scope="module")
def interleaved(prefect_server, sample_dir, tmp_path_factory):
    """One run, one version, one record: in a workspace the ingest flow brought to version V, a retrain
    pinned to V; as it starts training, an ingest flow of V+1 (one training record added) in the same
    workspace. What each saw."""
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

    retraining = threading.Thread(target=run_retrain)
    retraining.start()
    deadline = time.monotonic() + 600
    while (training := _stage_process(ws, "train")) is None and retraining.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert training is not None, "the retrain ended before its training could be watched"
    training.suspend()  # a training that lasts as long as the ingest needs, on a machine of any speed
    try:
        for culture in CULTURES:
            add_sample_image(ws / "data/sample", culture)
        started = time.monotonic()
        ingesting = threading.Thread(target=lambda: outcome.update(announced=ingest(workdir=str(ws))))
        ingesting.start()
        ingesting.join(INGEST_PATIENCE_S)
        announced_after = time.monotonic() - started
        still_training_at_announce = training.is_running() and not ingesting.is_alive()
    finally:
        training.resume()
    ingesting.join(600)
    retraining.join(900)
    return {"ws": ws, "v": v, "v_records": v_records, "v_ids": v_ids, "v_train": v_train,
            "announced_after_s": announced_after, "still_training": still_training_at_announce, **outcome}


def test_the_ingest_announces_its_version_while_the_retrain_still_trains(interleaved):
    announced = interleaved.get("announced")
    assert announced is not None and announced["version"] != interleaved["v"]
    assert announced["added"] == 1 and announced["records"] == interleaved["v_records"] + 1
    waited = interleaved["announced_after_s"]
    assert interleaved["still_training"], f"the ingest waited for the retrain's training ({waited:.0f} s)"


def test_every_record_of_the_retrain_says_the_version_it_started_with(interleaved):
    from scoft.lineage import latest_record, sealed, verify

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
        assert record["ccub"]["run_version"] == v and verify(record, ws) == []
        # what the record of a run that trained on another version than it started for looked like: each
        # contradiction is named by verify
        other = "f" * 32 + ".dir"
        counts = {**record["validation"]["statistics"], "records": interleaved["v_records"] + 1}
        said = {"ccub: its flow run": {**record, "ccub": {**record["ccub"], "run_version": other}},
                "validation: the record's checks counted": {
                    **record, "validation": {**record["validation"], "statistics": counts}},
                "ccub: the record lists": {**record, "ccub": {**record["ccub"],
                                                               "records": [*record["ccub"]["records"], "a-new-one"]}}}
        for problem, contradicting in said.items():
            assert any(p.startswith(problem) for p in verify(sealed(contradicting), ws)), problem
    # the workspace still holds V: the retrain's lease kept the ingest from taking V+1 into it
    assert _ingest_version(ws)[0] == v

