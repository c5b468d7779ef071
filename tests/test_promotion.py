"""Only a better model ships: the promotion rules on evaluations built by the evaluation's own
statistics, the registry's pointer and history, and `scoft models` on a workspace."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from scoft import registry
from scoft.config import PromotionParams, load_params
from scoft.evaluate import culture_metrics, generic_distribution, retrieval_metrics
from scoft.io import sha256_file, write_json
from scoft.paths import LORA_FILE
from scoft.promotion import decide, gate, hold_family
from scoft.promotion import failed_rules as failed
from tests.conftest import ROOT, scoft, unit_params, write_params
from tests.helpers import ingest_offline

# The rules' mechanics on gains in no particular units, without the practical floor (tested on its own).
RULES = PromotionParams(min_gain=0.0)
PROMPTS = 8
SIGNIFICANCE = "distance to held-out images better than the base"


def evaluation(gain: float | list[float], retrieval_drop: float = 0.0, memorised: float = 0.1, takeover: bool = False,
               prompts: int = PROMPTS, ids: list[str] | None = None, unjudged: tuple[str, ...] = ()) -> dict:
    """A culture's metrics as the evaluate stage writes them, from per-prompt values: the candidate's
    distance to the held-out images `gain` below the base's (with prompt-to-prompt noise), or below it
    by each of the given per-prompt gains."""
    rng = np.random.default_rng(0)
    if isinstance(gain, list):
        prompts = len(gain)
    ids = ids or [f"kor-{i}" for i in range(prompts)]
    prompts = len(ids)
    base = 0.5 + 0.05 * rng.standard_normal(prompts)
    noise = rng.standard_normal(prompts)
    gains = np.array(gain) if isinstance(gain, list) else gain + 0.01 * (noise - noise.mean())  # mean exactly `gain`
    dist = {"base": base, "scoft": base - gains}
    cultures = np.array(["KOR"] * prompts)
    categories = np.array((["ARCH", "CLOTH", "FOOD"] * prompts)[:prompts])
    base_hits = np.clip(0.75 + 0.1 * rng.standard_normal(prompts), 0, 1)
    hits = {"base": base_hits, "scoft": np.clip(base_hits - retrieval_drop + 0.05 * rng.standard_normal(prompts), 0, 1)}
    spread = np.array(["KOR", "MEX", "NGA", "NGA"] * 2)
    generic = {"base": spread, "scoft": np.array(["KOR"] * 6 + ["NGA"] * 2) if takeover else spread}
    return {"per_culture": culture_metrics(dist, cultures, ["KOR"], 500, 0, categories, np.array(ids)),
            "retrieval_accuracy": retrieval_metrics(hits, cultures, 500, 0, candidates=3),
            "memorisation": {"scoft": {"overall": {"mean": memorised}}},
            "generic_prompts": generic_distribution(generic, ["KOR", "MEX", "NGA"], ["a house with a roof"]),
            "coverage": {"KOR": {"trained": ["ARCH", "CLOTH", "FOOD"], "unjudged": list(unjudged)}}}


def test_a_candidate_measurably_better_than_the_base_passes_every_rule():
    decision = decide(evaluation(gain=0.05), "KOR", RULES, production=None, evaluation_key="k")
    assert decision["promote"] and failed(decision) == []
    assert decision["distance_gain"] == pytest.approx(0.05)
    assert decision["significance"]["p"] == pytest.approx(1 / 256)  # every prompt better: the smallest p


@pytest.mark.parametrize("metrics, rule", [
    (evaluation(gain=0.0), SIGNIFICANCE),
    (evaluation(gain=-0.05), SIGNIFICANCE),
    (evaluation(gain=0.05, unjudged=("ARCH",)), "every trained category judged"),
    (evaluation(gain=0.05, retrieval_drop=0.4), "retrieval accuracy not worse than the base"),
    (evaluation(gain=0.05, memorised=0.9), "memorisation under the threshold"),
    (evaluation(gain=0.05, takeover=True), "generic prompts not taken over by the culture"),
])
def test_each_rule_stops_a_candidate_on_its_own(metrics, rule):
    decision = decide(metrics, "KOR", RULES, production=None, evaluation_key="k")
    assert not decision["promote"] and failed(decision) == [rule]


def test_a_gain_below_the_absolute_floor_is_not_enough():
    floor = RULES.model_copy(update={"min_gain": 0.06})
    assert failed(decide(evaluation(gain=0.05), "KOR", floor, None, "k")) == [SIGNIFICANCE]
    assert decide(evaluation(gain=0.08), "KOR", floor, None, "k")["promote"]


def test_a_tiny_gain_on_every_prompt_cannot_ship_under_the_defaults():
    """A 16-step LoRA gained 0.0005 on every prompt: significant, and of no practical use. The defaults'
    floor (params.yaml's promotion.min_gain) stops it and names the floor; a real one-attribute
    correction (about 0.33 on the tuning split) clears it."""
    defaults = load_params(ROOT / "params.yaml").promotion
    assert RULES.model_copy(update={"min_gain": 0.0}) == RULES and defaults.min_gain > 0.0005
    tiny = [0.0005 + 0.0001 * i for i in range(9)]
    assert decide(evaluation(tiny), "KOR", RULES, None, "k")["promote"]  # without a floor it would ship
    decision = decide(evaluation(tiny), "KOR", defaults, None, "k")
    assert failed(decision) == [SIGNIFICANCE] and f"H0: gain <= {defaults.min_gain}" in decision["rules"][0]["detail"]
    assert decide(evaluation([0.3 + 0.01 * i for i in range(9)]), "KOR", defaults, None, "k")["promote"]


def test_too_few_prompts_are_not_judged_as_an_improvement():
    one = decide(evaluation(gain=0.05, prompts=1), "KOR", RULES, production=None, evaluation_key="k")
    assert not one["promote"] and "cannot be judged" in one["rules"][0]["detail"]
    # three prompts all better: p 1/8 can never reach 0.05, and the rule says so
    three = decide(evaluation(gain=0.05, prompts=3), "KOR", RULES, production=None, evaluation_key="k")
    assert failed(three) == [SIGNIFICANCE] and "cannot reach it" in three["rules"][0]["detail"]


def test_the_test_is_one_sided_and_holm_holds_it_over_the_retrains_cultures():
    clear = evaluation(gain=[0.05] * 8)  # p 1/256
    borderline = evaluation(gain=[0.05] * 6 + [-0.03, -0.03])  # one-sided p 10/256 = 0.039; two-sided 0.078
    alone = decide(borderline, "KOR", RULES, None, "k")
    assert alone["significance"]["p"] == pytest.approx(10 / 256) and alone["promote"]
    family = hold_family({c: decide(m, "KOR", RULES, None, "k") for c, m in
                          {"KOR": borderline, "MEX": clear, "NGA": evaluation(gain=0.0)}.items()}, RULES)
    # Holm: 1/256 x 3 passes; 0.039 x 2 = 0.078 does not; the no-effect culture stays out
    assert [c for c, d in family.items() if d["promote"]] == ["MEX"]
    assert family["KOR"]["p_holm"] == pytest.approx(2 * 10 / 256) and failed(family["KOR"]) == [SIGNIFICANCE]
    assert "Holm over 3 culture(s)" in family["KOR"]["rules"][0]["detail"]


def test_clustered_by_category_the_unit_is_the_category():
    by_category = RULES.model_copy(update={"test_unit": "category"})
    decision = decide(evaluation(gain=0.05, prompts=9), "KOR", by_category, None, "k")
    # 9 prompts in 3 categories: 3 units, smallest p 1/8: the rule cannot pass, and says why
    assert decision["significance"]["units"] == 3 and decision["significance"]["p"] == pytest.approx(1 / 8)
    assert failed(decision) == [SIGNIFICANCE] and "3 categorys cannot reach it" in decision["rules"][0]["detail"]


def test_against_production_the_candidate_must_be_measurably_better_prompt_by_prompt():
    production = {"decision": {"evaluation_key": "k"}}
    metrics = evaluation(gain=0.05)
    candidate = metrics["per_culture"]["KOR"]["distances"]["scoft"]
    same = dict(candidate)  # production exactly as good: not better
    assert failed(decide(metrics, "KOR", RULES, production, "k", same)) == ["better than production"]
    # better on average (by 0.002) but not on most prompts: the mean alone would pass, the test does not
    mixed = {k: v + (0.03 if i % 2 else -0.026) for i, (k, v) in enumerate(candidate.items())}
    assert failed(decide(metrics, "KOR", RULES, production, "k", mixed)) == ["better than production"]
    worse = {k: v + 0.02 for k, v in candidate.items()}  # production farther on every prompt
    assert decide(metrics, "KOR", RULES, production, "k", worse)["promote"]
    # production never measured on these held-out records: not judged, not passed
    other = decide(metrics, "KOR", RULES, production, "k", {"elsewhere": 0.1})
    assert failed(other) == ["better than production"] and "cannot be judged" in other["rules"][-1]["detail"]
    # measured on some of them only (older held-out records): refused, not judged on the overlap, where
    # the candidate would pass (6 prompts all better: p 1/64)
    some = dict(list(worse.items())[:6])
    partial = decide(metrics, "KOR", RULES, production, "k", some)
    assert failed(partial) == ["better than production"]
    assert "measured on other held-out records" in partial["rules"][-1]["detail"]
    assert failed(decide(metrics, "KOR", RULES, production, "k", None)) == ["better than production"]


def _lora(folder, payload: bytes):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LORA_FILE).write_bytes(payload)
    return folder


def test_registry_keeps_production_history_and_rolls_back(tmp_path):
    first = registry.promote(tmp_path, "KOR", _lora(tmp_path / "a", b"lora one"), "rec1", by="rules", reason="r1")
    assert registry.production_lora(tmp_path, "KOR").joinpath(LORA_FILE).read_bytes() == b"lora one"
    with pytest.raises(registry.RegistryError, match="no earlier LoRA"):
        registry.rollback(tmp_path, "KOR", by="ops", reason="x")
    registry.reject(tmp_path, "KOR", "feed", "rec2", by="rules", reason="failed: memorisation")
    assert registry.read(tmp_path, "KOR")["production"] == first["production"]  # a rejection changes nothing
    registry.promote(tmp_path, "KOR", _lora(tmp_path / "b", b"lora two"), "rec3", by="alice", reason="r3")
    (tmp_path / "b" / LORA_FILE).write_bytes(b"retrained since")  # the registry holds its own copy
    assert registry.production_lora(tmp_path, "KOR").joinpath(LORA_FILE).read_bytes() == b"lora two"
    entry = registry.rollback(tmp_path, "KOR", by="bob", reason="complaints")
    assert registry.production_lora(tmp_path, "KOR").joinpath(LORA_FILE).read_bytes() == b"lora one"
    assert [e["action"] for e in entry["history"]] == ["promote", "reject", "promote", "rollback"]
    assert entry["production"]["by"] == "bob" and entry["production"]["lineage"] == "rec1"
    assert json.loads((tmp_path / "registry/KOR.json").read_text()) == entry  # what every reader sees


@pytest.fixture
def workspace(tmp_path, sample_dir):
    """A workspace with the sample ingested, a candidate LoRA and its evaluation for KOR."""
    ingest_offline([sample_dir], tmp_path / "data/ccub")
    write_params(tmp_path / "params.yaml", {})
    return tmp_path


def _candidate(ws, payload: bytes, metrics: dict):
    _lora(ws / "models/lora/KOR", payload)
    write_json(ws / "reports/metrics/KOR.json", metrics)


def _kor_heldout(ws) -> list[str]:
    from scoft.ccub import read_heldout

    return [r.id for r in read_heldout(ws / "data/ccub") if r.culture == "KOR"]


def test_the_gate_promotes_then_refuses_a_candidate_no_better_than_production(workspace):
    params = unit_params()
    ids = _kor_heldout(workspace)
    _candidate(workspace, b"good", evaluation(gain=0.08, ids=ids))
    first = gate(workspace, "KOR", params, "rec1")
    assert first["promote"] and json.loads((workspace / "reports/promotion/KOR.json").read_text()) == first
    production = registry.read(workspace, "KOR")["production"]
    assert production["lora_sha256"] == sha256_file(workspace / "models/lora/KOR" / LORA_FILE)
    _candidate(workspace, b"as good", evaluation(gain=0.08, ids=ids))  # better than the base, not than production
    second = gate(workspace, "KOR", params, "rec2")
    assert not second["promote"] and failed(second) == ["better than production"]
    assert registry.read(workspace, "KOR")["production"] == production  # production unchanged
    again = gate(workspace, "KOR", params, "rec2")  # the same candidate: judged once
    assert again["already_judged"] and len(registry.read(workspace, "KOR")["history"]) == 2


def test_models_commands_promote_by_hand_list_and_roll_back(workspace):
    (workspace / "lineage").mkdir()
    keys = []
    for i, payload in enumerate([b"first", b"second"]):
        lora = _lora(workspace / f"models/lora/KOR-{i}", payload)
        key = f"key{i}"
        write_json(workspace / f"lineage/{key}.json", {"culture": "KOR", "lora": {
            "path": str((lora / LORA_FILE).relative_to(workspace)), "sha256": sha256_file(lora / LORA_FILE)}})
        keys.append(key)
        out = scoft("models", "promote", "KOR", key, "--reason", f"reviewed {i}", "--by", "alice", cwd=workspace)
        assert out.returncode == 0, out.stderr
    listed = json.loads(scoft("models", "list", "--json", cwd=workspace).stdout)
    kor = next(row for row in listed if row["culture"] == "KOR")
    assert kor["production"]["lineage"] == "key1" and kor["production"]["by"] == "alice"
    assert {row["culture"] for row in listed if row["production"] is None} == {"CHN", "IND", "MEX", "NGA"}
    assert scoft("models", "rollback", "KOR", "--reason", "bad", cwd=workspace).returncode == 0
    shown = json.loads(scoft("models", "show", "KOR", cwd=workspace).stdout)
    assert shown["production"]["lineage"] == "key0" and shown["history"][-1]["reason"] == "bad"
    wrong = scoft("models", "promote", "NGA", "key0", "--reason", "x", cwd=workspace)
    assert wrong.returncode == 1 and "is of culture 'KOR'" in wrong.stderr
    (workspace / "models/lora/KOR-1" / LORA_FILE).write_bytes(b"retrained")
    stale = scoft("models", "promote", "KOR", "key1", "--reason", "x", cwd=workspace)
    assert stale.returncode == 1 and "not the LoRA of record key1" in stale.stderr


def _review_run(ws, name: str, rules: PromotionParams) -> dict:
    """The retrain flow's promote step for KOR in a flow run of its own, started in a thread."""
    import threading

    from prefect import flow

    from tasks.promote import promote_culture

    lineage = ws / "lineage" / f"{name}.json"
    write_json(lineage, {"culture": "KOR", "files": {}})

    @flow(name="review", flow_run_name=name)
    def review():
        return promote_culture(str(ws), "KOR", lineage, rules)

    outcome = {"lineage": lineage}
    outcome["thread"] = threading.Thread(target=lambda: outcome.update(state=review(return_state=True)))
    outcome["thread"].start()
    return outcome


def _flow_run(run_id, until, timeout: float = 90):
    """The flow run once until(run) holds."""
    import time

    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if until(run):
                return run
            time.sleep(0.3)
    raise AssertionError(f"flow run {run_id}: still {run.state.name}")


@pytest.fixture
def approval_deployment():
    """The approve-candidate flow served (prefect's runner, in a process of its own) against the test
    server, as the cpu pool's worker would run it."""
    import tempfile
    import time

    import psutil
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_RUNNER_POLL_FREQUENCY="1")
    code = "from flows.approval import approve_candidate; approve_candidate.serve(name='test')"
    log = tempfile.TemporaryFile()
    server = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=log, stderr=log,
                              start_new_session=True)
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 180
        while True:
            try:
                client.read_deployment_by_name("approve-candidate/test")
                break
            except ObjectNotFound:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise AssertionError(f"the approval deployment was not served: {log.read()[-2000:]!r}") from None
                time.sleep(0.5)
    yield psutil.Process(server.pid)
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(30)


def _processes_of(runner, run_id) -> list:
    """The runner's processes that run the flow run `run_id` (the runner names it in their environment)."""
    import psutil

    found = []
    for child in runner.children(recursive=True):
        try:
            if child.environ().get("PREFECT__FLOW_RUN_ID") == str(run_id):
                found.append(child)
        except psutil.Error:
            pass  # ended meanwhile
    return found


def test_approval_in_the_prefect_ui_holds_no_worker_while_it_waits(prefect_server, workspace, approval_deployment):
    """promotion.require_approval: the retrain run records the candidate as awaiting approval and ends;
    the approve-candidate run suspends (no process left while it waits) until the Resume form's answer
    (sent through the API, as the UI does) comes, then records it; no answer in time: nothing ships."""
    import time

    from prefect.deployments import run_deployment
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import resume_flow_run

    rules = PromotionParams(require_approval=True)
    _candidate(workspace, b"first", evaluation(gain=0.08))
    asked = _review_run(workspace, "approval-ask", rules)
    asked["thread"].join(120)
    assert asked["state"].is_completed() and asked["state"].result()["awaiting_approval"]  # the run ended
    entry = registry.read(workspace, "KOR")
    assert entry["production"] is None and entry["history"][-1]["action"] == "await"
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        shown = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[
            "scoft-promotion-kor"])), sort=ArtifactSort.CREATED_DESC, limit=1)[0].data
    assert "AWAITING REVIEW" in shown and "approve-candidate" in shown
    sha = entry["history"][-1]["lora_sha256"]
    run = run_deployment("approve-candidate/test", parameters={"culture": "KOR", "lora_sha256": sha,
                                                               "workdir": str(workspace)}, timeout=0)
    _flow_run(run.id, lambda r: r.state.name == "Suspended")
    _flow_run(run.id, lambda r: not _processes_of(approval_deployment, r.id))  # nothing runs while it waits
    resume_flow_run(run.id, run_input={"approve": True, "reviewer": "amara", "comment": "the roofs are right"})
    done = _flow_run(run.id, lambda r: r.state.is_final())
    assert done.state.is_completed(), done.state.message
    production = registry.read(workspace, "KOR")["production"]
    assert production["by"] == "amara" and production["reason"] == "the roofs are right"
    review = json.loads(asked["lineage"].read_text())["promotion"]["review"]
    assert review == {"approve": True, "reviewer": "amara", "comment": "the roofs are right"}

    _candidate(workspace, b"second", evaluation(gain=0.12))  # passes every rule, production included
    _review_run(workspace, "approval-ask-2", rules)["thread"].join(120)
    write_params(workspace / "params.yaml", {"promotion.approval_timeout_s": 2})
    sha = registry.read(workspace, "KOR")["history"][-1]["lora_sha256"]
    run = run_deployment("approve-candidate/test", parameters={"culture": "KOR", "lora_sha256": sha,
                                                               "workdir": str(workspace)}, timeout=0)
    _flow_run(run.id, lambda r: r.state.name == "Suspended")
    time.sleep(3)
    with pytest.raises(FlowPauseTimeout):  # an answer after the time-out is refused
        resume_flow_run(run.id, run_input={"approve": True, "reviewer": "late", "comment": "too late"})
    assert _flow_run(run.id, lambda r: r.state.is_final()).state.is_failed()
    entry = registry.read(workspace, "KOR")
    assert entry["production"] == production and entry["history"][-1]["action"] == "await"  # nothing shipped


def test_with_insider_review_a_passing_candidate_awaits_insiders_and_the_run_ends(prefect_server, workspace,
                                                                                    key_pair):
    import numpy as np
    from PIL import Image

    from scoft.evaluate import write_judged_images
    from scoft.review.store import Campaign, open_store
    from scoft.signing import signature_problem

    write_params(workspace / "params.yaml", {"lineage.signing_key": str(key_pair[0])})
    ids = _kor_heldout(workspace)
    _candidate(workspace, b"first", evaluation(gain=0.08, ids=ids))
    held = [type("Held", (), {"id": i, "culture": "KOR"})() for i in ids]
    image = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    write_judged_images(workspace / "reports/eval/KOR/images", {
        "held": held, "prompts": [f"p{i}" for i in ids], "seeds": [1] * len(ids),
        "images": {"base": [image] * len(ids), "scoft": [image] * len(ids)}})
    run = _review_run(workspace, "insiders", PromotionParams(insider_review=True))
    run["thread"].join(120)
    assert run["state"].is_completed() and not run["state"].result()["promote"]  # ended, nothing shipped
    entry = registry.read(workspace, "KOR")
    assert entry["production"] is None and entry["history"][-1]["action"] == "await"
    # on record as awaiting people before the campaign opens (a campaign opens on no other candidate)
    assert entry["history"][-1]["reason"] == "every rule passed: awaiting insider review"
    with open_store("sqlite:///data/review/review.db", workspace)() as session:
        campaigns = session.query(Campaign).all()
    assert [c.culture for c in campaigns] == ["KOR"] and campaigns[0].status == "open"
    report = json.loads((workspace / "reports/promotion/KOR.json").read_text())
    assert report["awaiting_insiders"] == campaigns[0].id and campaigns[0].lineage == report["lineage"]
    assert (workspace / "data/review/review.db").is_file()  # in the workspace, not where the test runs
    # the record, changed to say it waits, is signed again: its signature holds
    assert signature_problem(run["lineage"], str(key_pair[1])) is None


def _posted(receiver, what: str, timeout: float = 90) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, body in receiver.posted:
            alert = json.loads(body)
            if alert["alert"] == what:
                return alert
        time.sleep(0.5)
    raise AssertionError(f"no {what!r} alert reached the webhook; got {receiver.posted}")


def test_a_rejected_model_and_a_failed_retrain_reach_the_webhook(prefect_server, workspace, tmp_path_factory):
    """`scoft alerts` automations on the server: the rejection event and the retrain run's Failed
    state each call the webhook block, here a loopback HTTP receiver."""
    from flows.alerts import install_alerts
    from flows.retrain import retrain
    from tests.loopback import LoopbackServer

    with LoopbackServer() as receiver:
        install_alerts(f"{receiver.url}/hook", allow_private=True)  # a loopback receiver: asked for explicitly
        # installing again replaces, never doubles
        assert len(install_alerts(f"{receiver.url}/hook", allow_private=True)) == 2
        _candidate(workspace, b"no better", evaluation(gain=0.0))
        run = _review_run(workspace, "alerted-rejection", PromotionParams())
        run["thread"].join(120)
        assert not run["state"].result()["promote"]
        rejected = _posted(receiver, "model rejected")
        assert rejected["culture"] == "KOR" and rejected["lora_sha256"] == sha256_file(
            workspace / "models/lora/KOR" / LORA_FILE)
        assert rejected["failed_rules"] == ["distance to held-out images better than the base"]
        failed_state = retrain(workdir=str(tmp_path_factory.mktemp("no-workspace")), return_state=True)
        assert failed_state.is_failed()  # no params.yaml there
        failed = _posted(receiver, "retrain failed")
        assert failed["flow_run_id"] == str(failed_state.state_details.flow_run_id)
        assert all(path == "/hook" for path, _ in receiver.posted)


def test_rollback_walks_back_through_productions_history(tmp_path):
    for name in ("A", "B", "C"):
        registry.promote(tmp_path, "KOR", _lora(tmp_path / name, name.encode()), f"rec{name}", by="rules", reason=name)
    now = lambda: registry.production_lora(tmp_path, "KOR").joinpath(LORA_FILE).read_bytes()  # noqa: E731
    registry.rollback(tmp_path, "KOR", by="ops", reason="one back")
    assert now() == b"B"
    registry.rollback(tmp_path, "KOR", by="ops", reason="two back")
    assert now() == b"A"  # not C again
    with pytest.raises(registry.RegistryError, match="no earlier LoRA"):
        registry.rollback(tmp_path, "KOR", by="ops", reason="three back")


def test_concurrent_promotions_keep_every_history_entry(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    _lora(tmp_path / "a", b"one")
    _lora(tmp_path / "b", b"two")
    loop = ("import sys\nfrom pathlib import Path\nfrom scoft import registry\nfor i in range(40):\n"
            "    registry.promote(Path(sys.argv[1]), 'KOR', Path(sys.argv[2]), f'rec{i}',"
            " by=sys.argv[3], reason='r')\n")
    procs = [subprocess.Popen([sys.executable, "-c", loop, str(tmp_path), str(tmp_path / lora), lora], cwd=ROOT)
             for lora in ("a", "b")]
    assert [p.wait(120) for p in procs] == [0, 0]
    history = registry.read(tmp_path, "KOR")["history"]
    assert len(history) == 80 and sorted({e["by"] for e in history}) == ["a", "b"]


def test_a_production_lora_that_is_not_the_registrys_is_never_loaded(tmp_path):
    registry.promote(tmp_path, "KOR", _lora(tmp_path / "a", b"kor"), "rec1", by="rules", reason="r")
    registry.promote(tmp_path, "NGA", _lora(tmp_path / "b", b"nga"), "rec2", by="rules", reason="r")
    kor = registry.production_lora(tmp_path, "KOR")
    (kor / LORA_FILE).write_bytes(b"nga")  # another culture's LoRA swapped into the folder
    with pytest.raises(registry.RegistryError, match="refusing to load it"):
        registry.production_lora(tmp_path, "KOR")
    entry = json.loads((tmp_path / "registry/NGA.json").read_text())
    entry["production"]["lora_dir"] = "models/lora/NGA"  # pointed outside registry/loras by hand
    (tmp_path / "registry/NGA.json").write_text(json.dumps(entry))
    with pytest.raises(registry.RegistryError, match="outside registry/loras/NGA"):
        registry.production_lora(tmp_path, "NGA")


def test_generate_refuses_a_swapped_production_lora_in_one_line(workspace):
    from tests.helpers import scoft_here

    registry.promote(workspace, "KOR", _lora(workspace / "a", b"kor"), "rec1", by="rules", reason="r")
    (registry.production_lora(workspace, "KOR") / LORA_FILE).write_bytes(b"swapped")
    out = scoft_here("generate", "--prompt", "a house", "--culture", "KOR", "--out", "x.png", cwd=workspace)
    assert out.returncode == 1 and "refusing to load it" in out.stderr and not (workspace / "x.png").exists()


def test_models_promote_takes_only_a_configured_culture_and_a_lineage_record(workspace):
    from tests.helpers import scoft_here

    evil = workspace.parent / "evil"
    (evil / "rec").mkdir(parents=True)
    (evil / "rec.json").write_text(json.dumps({"culture": "KOR", "lora": {"path": "/etc/hostname", "sha256": "0"}}))
    out = scoft_here("models", "promote", "KOR", "../../../evil/rec", "--reason", "x", cwd=workspace)
    assert out.returncode == 1 and "is not a lineage record's key" in out.stderr
    out = scoft_here("models", "promote", "../../../evil/out", "key", "--reason", "x", cwd=workspace)
    assert out.returncode == 1 and "is not a configured culture" in out.stderr
    (workspace / "lineage").mkdir()
    (workspace / "lineage/outside.json").write_text(json.dumps(
        {"culture": "KOR", "lora": {"path": "/etc/hostname", "sha256": sha256_file("/etc/hostname")}}))
    out = scoft_here("models", "promote", "KOR", "outside", "--reason", "x", cwd=workspace)
    assert out.returncode == 1 and "is not under models/lora/" in out.stderr
    assert not (workspace / "registry").exists() and sorted(p.name for p in evil.iterdir()) == ["rec", "rec.json"]


def test_a_damaged_registry_file_is_named_and_the_other_cultures_listed(workspace):
    from tests.helpers import scoft_here

    registry.promote(workspace, "NGA", _lora(workspace / "b", b"nga"), "rec2", by="rules", reason="fine")
    (workspace / "registry/KOR.json").write_text('{"culture": "KOR", "history": [')  # truncated
    out = scoft_here("models", "list", cwd=workspace)
    assert out.returncode == 1
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    assert lines["KOR"].startswith(f"{workspace / 'registry/KOR.json'}: damaged, not JSON") or \
        lines["KOR"].startswith("registry/KOR.json: damaged, not JSON"), out.stdout
    assert lines["NGA"].startswith("production ") and "Traceback" not in out.stderr


def test_reasons_are_bounded_and_terminal_controls_refused_or_shown_escaped(workspace):
    from scoft.promotion import with_review
    from tests.helpers import scoft_here

    lora = _lora(workspace / "a", b"kor")
    for reason, problem in [("x" * 1_600_000, "more than the 2000 allowed"),
                            ("ok\r\x1b[2K\x1b[1AKOR: production promoted", "control character U\\+000D")]:
        with pytest.raises(registry.RegistryError, match=problem):
            registry.promote(workspace, "KOR", lora, "rec1", by="rules", reason=reason)
    assert registry.read(workspace, "KOR")["history"] == []
    review = with_review({"promote": True}, True, "eve\x1b[31m", "fine\r\x1b[1A" + "y" * 5000)["review"]
    assert "\x1b" not in review["reviewer"] + review["comment"] and len(review["comment"]) < 2000
    registry.reject(workspace, "KOR", "feed", "rec2", by="rules", reason="failed")
    entry = json.loads((workspace / "registry/KOR.json").read_text())
    entry["history"][-1]["reason"] = "\r\x1b[2K\x1b[1AKOR: production 0123 promoted"  # hand-edited
    (workspace / "registry/KOR.json").write_text(json.dumps(entry))
    out = scoft_here("models", "list", cwd=workspace)
    assert "\x1b" not in out.stdout and "\r" not in out.stdout and "\\x1b[2K" in out.stdout


def test_a_manual_promote_is_whole_or_not_at_all(workspace):
    from tests.helpers import scoft_here

    lora = _lora(workspace / "models/lora/KOR", b"kor")
    (workspace / "lineage").mkdir()
    write_json(workspace / "lineage/k.json", {"culture": "KOR", "metrics": {"distance": 0.1}, "lora": {
        "path": "models/lora/KOR/" + LORA_FILE, "sha256": sha256_file(lora / LORA_FILE)}})
    (workspace / ".dvc").mkdir()  # a DVC workspace whose `dvc add` fails (no config, no cache)
    (workspace / ".dvc/config").write_text("[core\nbroken")
    out = scoft_here("models", "promote", "KOR", "k", "--reason", "x", cwd=workspace)
    assert out.returncode == 1 and "`dvc add registry/loras` failed" in out.stderr
    assert not (workspace / "registry/KOR.json").exists()  # the pointer did not stay without its tracking
    (workspace / ".dvc/config").unlink()
    import shutil
    import subprocess
    import sys

    shutil.rmtree(workspace / ".dvc")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=workspace, check=True)
    out = scoft_here("models", "promote", "KOR", "k", "--reason", "reviewed", "--by", "alice", cwd=workspace)
    assert out.returncode == 0, out.stderr
    production = registry.read(workspace, "KOR")["production"]
    assert production["decision"]["manual"] and production["decision"]["metrics"] == {"distance": 0.1}
    assert (workspace / "registry/loras.dvc").is_file()


@pytest.mark.parametrize("url,said", [
    ("file:///etc/passwd", "not an http(s) URL"),
    ("not a url", "not an http(s) URL"),
    ("http://127.0.0.1:4200/api/admin", "address not allowed"),
    ("http://169.254.169.254/latest/meta-data", "address not allowed"),
    ("http://10.0.0.8/hook", "address not allowed"),
])
def test_alerts_call_only_public_http_urls_unless_asked(tmp_path, url, said):
    from tests.helpers import scoft_here

    out = scoft_here("alerts", "--webhook", url, cwd=tmp_path)
    assert out.returncode == 2 and said in out.stderr, out.stderr
    if "127.0.0.1" in url:
        from flows.alerts import check_webhook

        assert check_webhook(url, allow_private=True) == url
        assert check_webhook(url, allow_networks=("127.0.0.0/8",)) == url  # ingest.allow_networks: the webhooks' too


def test_the_registrys_copy_of_a_0600_lora_follows_the_umask(tmp_path):
    import os

    lora = _lora(tmp_path / "a", b"kor")
    os.chmod(lora / LORA_FILE, 0o600)  # as safetensors writes it
    old = os.umask(0o022)
    try:
        registry.promote(tmp_path, "KOR", lora, "rec1", by="rules", reason="r")
    finally:
        os.umask(old)
    copy = registry.production_lora(tmp_path, "KOR") / LORA_FILE
    assert copy.stat().st_mode & 0o777 == 0o644 and (tmp_path / "registry/KOR.json").stat().st_mode & 0o777 == 0o644


@pytest.fixture(scope="module")
def key_pair(tmp_path_factory):
    """An elliptic-curve key pair kept outside every workspace, as the private key must be."""
    return _new_key_pair(tmp_path_factory.mktemp("keys"))


def _signed_workspace(ws, key_pair):
    lora = _lora(ws / "models/lora/KOR", b"kor")
    (ws / "lineage").mkdir()
    write_json(ws / "lineage/k.json", {"culture": "KOR", "lora": {"path": "models/lora/KOR/" + LORA_FILE,
                                                                  "sha256": sha256_file(lora / LORA_FILE)}})
    write_params(ws / "params.yaml", {"lineage.signing_key": str(key_pair[0]), "lineage.verify_key": str(key_pair[1])})


def test_a_lora_rewritten_with_its_hashes_is_caught_by_its_signature(workspace, key_pair):
    from scoft.signing import signature_problem
    from tests.helpers import scoft_here

    _signed_workspace(workspace, key_pair)
    out = scoft_here("models", "promote", "KOR", "k", "--reason", "reviewed", cwd=workspace)
    assert out.returncode == 0, out.stderr
    folder = registry.production_lora(workspace, "KOR", str(key_pair[1]))  # signed, and it verifies
    assert signature_problem(workspace / "lineage/k.json", str(key_pair[1])) is None
    # Someone with write access but not the key: a new LoRA, and every hash that names it rewritten.
    (folder / LORA_FILE).write_bytes(b"backdoored")
    entry = json.loads((workspace / "registry/KOR.json").read_text())
    for event in (entry["production"], entry["history"][-1]):
        event["lora_sha256"] = sha256_file(folder / LORA_FILE)
    (workspace / "registry/KOR.json").write_text(json.dumps(entry))
    assert registry.production_lora(workspace, "KOR") == folder  # the hashes agree...
    with pytest.raises(registry.RegistryError, match="signature does not verify"):
        registry.production_lora(workspace, "KOR", str(key_pair[1]))  # ... the signature does not
    out = scoft_here("generate", "--prompt", "a house", "--culture", "KOR", "--out", "x.png", cwd=workspace)
    assert out.returncode == 1 and "signature does not verify" in out.stderr
    record = json.loads((workspace / "lineage/k.json").read_text())
    (workspace / "lineage/k.json").write_text(json.dumps({**record, "metrics": {"forged": 1}}))
    assert "signature does not verify" in signature_problem(workspace / "lineage/k.json", str(key_pair[1]))


def test_signing_without_its_key_is_a_clear_error_and_promotes_nothing(workspace, key_pair, tmp_path):
    from tests.helpers import scoft_here

    _signed_workspace(workspace, key_pair)
    write_params(workspace / "params.yaml", {"lineage.signing_key": str(tmp_path / "nowhere.pem")})
    out = scoft_here("models", "promote", "KOR", "k", "--reason", "x", cwd=workspace)
    assert out.returncode == 2 and "lineage.signing_key" in out.stderr and "no such key file" in out.stderr
    inside = workspace / "signing.pem"
    inside.write_bytes(key_pair[0].read_bytes())
    write_params(workspace / "params.yaml", {"lineage.signing_key": "signing.pem"})
    out = scoft_here("models", "promote", "KOR", "k", "--reason", "x", cwd=workspace)
    assert out.returncode == 2 and "outside the repository" in out.stderr
    assert registry.read(workspace, "KOR")["production"] is None


def _new_key_pair(folder):
    """(private, public) PEM files of a new elliptic-curve key pair in `folder`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key, pem = ec.generate_private_key(ec.SECP256R1()), serialization.Encoding.PEM
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "signing.pem").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    (folder / "verify.pem").write_bytes(key.public_key().public_bytes(pem,
                                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    return folder / "signing.pem", folder / "verify.pem"


def test_a_verify_key_swapped_in_the_workspace_is_named_and_only_a_pinned_or_own_key_is_trusted(key_pair, tmp_path):
    """Someone with their own key pair re-signs a record and replaces the workspace's public key: the
    signatures then hold, so only a fingerprint kept outside the workspace (params.yaml in git, or the
    auditor's own copy) can tell."""
    import shutil

    from scoft.config import LineageParams
    from scoft.signing import sign, signature_problem, trusted_verify_key

    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(key_pair[1], ws / "verify.pem")
    pin = sha256_file(key_pair[1])
    pinned = LineageParams(verify_key="verify.pem", verify_key_sha256=pin)
    assert trusted_verify_key(pinned, ws) == (str(ws / "verify.pem"), None)
    record = ws / "record.json"
    record.write_text('{"forged": true}')
    forger_signing, forger_verify = _new_key_pair(tmp_path / "forger")
    sign(record, str(forger_signing), ws)
    shutil.copy(forger_verify, ws / "verify.pem")  # the swap
    assert signature_problem(record, "verify.pem", ws) is None  # the forged signature holds under the swapped key
    key, problem = trusted_verify_key(pinned, ws)
    assert key is None and "the key was replaced" in problem and pin[:16] in problem
    key, problem = trusted_verify_key(pinned, ws, own_key=str(key_pair[1]))  # the auditor's own copy
    assert problem is None and "does not verify" in signature_problem(record, key, ws)
    key, problem = trusted_verify_key(LineageParams(verify_key="verify.pem"), ws)
    assert key is None and "not pinned" in problem and sha256_file(forger_verify) in problem


def test_no_verify_key_is_a_problem_unless_the_auditor_says_unsigned(tmp_path):
    from scoft.config import LineageParams
    from scoft.signing import trusted_verify_key

    key, problem = trusted_verify_key(LineageParams(), tmp_path)
    assert key is None and "lineage.verify_key is null" in problem and "--unsigned" in problem
    assert trusted_verify_key(LineageParams(), tmp_path, unsigned=True) == (None, None)
    key, problem = trusted_verify_key(LineageParams(signing_key="/keys/signing.pem"), tmp_path, unsigned=True)
    assert key is None and "never checked" in problem  # signing without checking is never accepted
    key, problem = trusted_verify_key(LineageParams(verify_key="gone.pem", verify_key_sha256="0" * 64), tmp_path)
    assert key is None and "no such key file" in problem


def test_the_registry_history_is_chained_so_an_edit_or_a_deletion_is_named(tmp_path):
    promoted = registry.promote(tmp_path, "KOR", _lora(tmp_path / "a", b"one"), "rec1", by="rules", reason="r1")
    registry.reject(tmp_path, "KOR", "f" * 64, "rec2", by="rules", reason="worse")
    registry.promote(tmp_path, "KOR", _lora(tmp_path / "b", b"two"), "rec3", by="alice", reason="r3")
    registry.reject(tmp_path, "KOR", "e" * 64, "rec4", by="rules", reason="worse again")
    assert promoted["history"][0]["prev_sha256"] is None
    assert registry.history_problems(tmp_path, "KOR") == []
    path = tmp_path / "registry/KOR.json"
    original = json.loads(path.read_text())

    def tampered(change) -> list[str]:
        entry = json.loads(json.dumps(original))
        change(entry)
        path.write_text(json.dumps(entry))
        return registry.history_problems(tmp_path, "KOR")

    edited = tampered(lambda e: e["history"][0].update(by="someone else"))
    assert len(edited) == 1 and "event 1 (reject" in edited[0] and "event 0 was edited" in edited[0]
    deleted = tampered(lambda e: e["history"].pop(1))  # the first reject, as if it never happened
    assert len(deleted) == 1 and "event 1 (promote" in deleted[0]
    first_gone = tampered(lambda e: e["history"].pop(0))
    assert any("earlier events were deleted" in p for p in first_gone)
    repointed = tampered(lambda e: e.update(production=e["history"][0]))
    assert repointed == ["registry: registry/KOR.json: production is not the last promotion or rollback of its "
                         "history"]


def test_nothing_reaches_production_without_a_lineage_record(tmp_path):
    with pytest.raises(registry.RegistryError, match="without a lineage record"):
        registry.promote(tmp_path, "KOR", _lora(tmp_path / "a", b"one"), "", by="insiders", reason="preferred")
    assert registry.read(tmp_path, "KOR")["history"] == []
