"""What a culture's own run (fan-out) may write into the parent's dvc.lock: exactly its chain's entries
as dvc.yaml declares them, read from its one artifact."""

import copy
import json

import pytest
from prefect import flow
from prefect.artifacts import create_table_artifact

from scoft.remote import BadLockEntry, culture_lock_entries
from tests.conftest import ROOT

H = "0123456789abcdef0123456789abcdef"


def _file(path: str, folder: bool = False) -> dict:
    return {"path": path, "hash": "md5", "md5": H + (".dir" if folder else ""), "size": 10,
            **({"nfiles": 2} if folder else {})}


def chain(c: str) -> dict:
    """negatives@C, train@C and evaluate@C as DVC records them (commands, deps and outs of dvc.yaml)."""
    import yaml

    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for stage in ("negatives", "train", "evaluate"):
        do = spec[stage]["do"]
        paths = lambda xs: [(next(iter(x)) if isinstance(x, dict) else x).replace("${item}", c) for x in xs or []]  # noqa: E731
        out[f"{stage}@{c}"] = {
            "cmd": " ".join(do["cmd"].replace("${item}", c).split()),
            "deps": [_file(p, not p.endswith((".json", ".jsonl", ".py"))) for p in paths(do.get("deps"))],
            "params": {"params.yaml": {"model": {"base": "tiny"}}},
            "outs": [_file(p, not p.endswith(".json")) for p in
                     paths([*(do.get("outs") or []), *(do.get("metrics") or []), *(do.get("plots") or [])])]}
    return out


def test_a_cultures_own_chain_is_accepted():
    assert culture_lock_entries(ROOT, "KOR", chain("KOR")) == chain("KOR")


def _with(change):
    entries = copy.deepcopy(chain("KOR"))
    change(entries)
    return entries


@pytest.mark.parametrize("name,change,said", [
    ("an ingest entry with another hash", lambda e: e.update(ingest={"cmd": "scoft ingest", "outs": [
        _file("data/ccub", True)]}), "published entries for ingest"),
    ("a stage named --force", lambda e: e.update({"--force": {}}), "published entries for --force"),
    ("a stage not in dvc.yaml", lambda e: e.update({"lineage@KOR": {}}), "lineage@KOR"),
    ("another culture's stage", lambda e: e.update({"train@NGA": chain("NGA")["train@NGA"]}), "train@NGA"),
    ("one stage missing", lambda e: e.pop("evaluate@KOR"), "all three"),
    ("an entry that breaks DVC's schema", lambda e: e["train@KOR"].update(outs="models/lora/KOR"),
     "are not a list of files"),
    ("an unknown field", lambda e: e["train@KOR"].update(frozen=True), "not a dvc.lock stage entry"),
    ("an out dvc.yaml does not declare", lambda e: e["train@KOR"]["outs"].append(_file("data/ccub", True)),
     "not exactly the outs dvc.yaml declares"),
    ("an out moved elsewhere", lambda e: e["negatives@KOR"]["outs"][0].update(path="../../etc"),
     "not exactly the outs"),
    ("a malformed hash", lambda e: e["evaluate@KOR"]["outs"][0].update(md5="../x"), "not a well-formed md5"),
    ("another command", lambda e: e["train@KOR"].update(cmd="rm -rf data"), "its command is not the one"),
])
def test_anything_else_a_culture_run_publishes_is_refused(name, change, said):
    with pytest.raises(BadLockEntry, match="KOR: ") as err:
        culture_lock_entries(ROOT, "KOR", _with(change))
    assert said in str(err.value), name


def test_a_run_with_two_lock_artifacts_is_refused_not_read_at_random(prefect_server):
    from prefect.client.orchestration import get_client

    from flows.retrain import CultureRunFailed, published_lock_entries

    rows = [{"stage": s, "ran": True, "lock_entry": json.dumps(e)} for s, e in chain("KOR").items()]

    @flow
    def publishes(times: int):
        for _ in range(times):
            create_table_artifact(key="dvc-lock-kor", table=rows)

    for times, ok in ((1, True), (2, False)):
        state = publishes(times, return_state=True)
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(state.state_details.flow_run_id)
        if ok:
            assert published_lock_entries(run, "KOR")[0] == chain("KOR")
        else:
            with pytest.raises(CultureRunFailed, match="published 2 dvc.lock artifacts"):
                published_lock_entries(run, "KOR")
