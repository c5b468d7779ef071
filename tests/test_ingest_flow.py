"""The ingest flow on a Prefect server: a new CCUB version emits `ccub.updated`, no change emits nothing."""

import json
import time

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


def test_new_version_emits_one_event_and_an_unchanged_source_none(prefect_server, sample_dir, tmp_path):
    from prefect.types._datetime import now

    from flows.ingest import ingest

    ws = make_workspace(tmp_path / "ws", sample_dir)
    since = now("UTC")
    first = ingest(workdir=str(ws))
    assert first["added"] == 36 and first["version"].endswith(".dir")
    events = _ccub_events(since, expected=1)
    assert len(events) == 1
    event = events[0]
    assert event.payload["version"] == first["version"] == json.loads((ws / "data/ingest/summary.json").read_text())["version"]
    assert (event.payload["added"], event.payload["removed"]) == (36, 0)
    assert event.resource["scoft.emitter"] == "ingest"
    assert (ws.parent / "ws-remote").is_dir()  # the version was pushed

    second = ingest(workdir=str(ws))
    assert second is None
    time.sleep(3)
    assert len(_ccub_events(since, expected=2, timeout=3)) == 1
