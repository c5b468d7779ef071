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


def _entry(do: dict, item: str) -> dict:
    """A dvc.lock entry as DVC records a stage of dvc.yaml (for one foreach item), run with ROOT's
    params.yaml."""
    from ruamel.yaml import YAML

    params = YAML(typ="safe").load((ROOT / "params.yaml").read_text())

    def value(dotted):
        node = params
        for part in dotted.split("."):
            node = node[part]
        return node

    paths = lambda xs: [(next(iter(x)) if isinstance(x, dict) else x).replace("${item}", item) for x in xs or []]  # noqa: E731
    entry = {"cmd": " ".join(do["cmd"].replace("${item}", item).split()),
             "deps": [_file(p, not p.endswith((".json", ".jsonl", ".py"))) for p in paths(do.get("deps"))],
             "params": {"params.yaml": {k: value(k) for k in do.get("params") or []}},
             "outs": [_file(p, not p.endswith(".json")) for p in
                      paths([*(do.get("outs") or []), *(do.get("metrics") or []), *(do.get("plots") or [])])]}
    return {k: v for k, v in entry.items() if v or k == "cmd"}


def _spec() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def chain(c: str) -> dict:
    """negatives@C, train@C and evaluate@C as DVC records them (commands, deps, params and outs)."""
    return {f"{stage}@{c}": _entry(_spec()[stage]["do"], c) for stage in ("negatives", "train", "evaluate")}


def shared() -> dict:
    """ingest, validate and base as a parent retrain run hands them to its culture runs."""
    return {stage: _entry(_spec()[stage], "") for stage in ("ingest", "validate", "base")}


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
    ("a params file of its own", lambda e: e["train@KOR"]["params"].update({"/etc/passwd": {"root": 1}}),
     "params from /etc/passwd"),
    ("another learning rate", lambda e: e["train@KOR"]["params"]["params.yaml"]["train"].update(lr=99),
     "param train differs from params.yaml here"),
    ("a 10 MB value", lambda e: e["train@KOR"]["params"]["params.yaml"].update({"negatives.per_image": "x" * 10**7}),
     "param negatives.per_image differs"),
    ("a param dvc.yaml does not declare", lambda e: e["train@KOR"]["params"]["params.yaml"].update(promotion={}),
     "not the ones dvc.yaml declares"),
])
def test_anything_else_a_culture_run_publishes_is_refused(name, change, said):
    with pytest.raises(BadLockEntry, match="KOR: ") as err:
        culture_lock_entries(ROOT, "KOR", _with(change))
    assert said in str(err.value), name


def test_a_culture_run_takes_from_its_parent_only_the_shared_stages_as_declared_here():
    """The worker's side: the shared entries come as flow run parameters, which anyone who can start a
    deployment run writes."""
    from scoft.remote import shared_lock_entries

    assert shared_lock_entries(ROOT, shared()) == shared()
    refused = {  # what the parameters hold: what the refusal says
        "a stage --force": (lambda e: e.update({"--force": {}}), "--force"),
        "an out at ../../evil": (lambda e: e["base"]["outs"][0].update(path="../../evil"), "not exactly the outs"),
        "a command of its own": (lambda e: e["ingest"].update(cmd="rm -rf ~"), "its command is not the one"),
        "other checks": (lambda e: e["validate"]["params"]["params.yaml"].update(validate={"cultures": []}),
                         "param validate differs"),
        "a stage missing": (lambda e: e.pop("base"), "exactly ingest, validate, base"),
    }
    for name, (change, said) in refused.items():
        entries = copy.deepcopy(shared())
        change(entries)
        with pytest.raises(BadLockEntry) as err:
            shared_lock_entries(ROOT, entries)
        assert said in str(err.value), (name, str(err.value))


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
