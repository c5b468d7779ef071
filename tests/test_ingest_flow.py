"""The ingest flow on a Prefect server: a new CCUB version emits `ccub.updated`, no change emits nothing;
a run pinned to an announced version pulls exactly it."""

import json
import time

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
