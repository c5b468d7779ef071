"""The retrain flow: CCUB in; per culture a SCoFT LoRA, its evaluation and its lineage record out."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from scoft.ccub import read_manifest
from scoft.config import load_params
from scoft.paths import CCUB_DIR, LORA_FILE, culture_paths
from scoft.registry import LORAS_DIR
from scoft.remote import (
    SHARED_STAGES,
    BadLockEntry,
    adopt_lock_entries,
    culture_lock_entries,
    lock_entries,
    shared_lock_entries,
)
from tasks.ccub import announce_new_version, pull_ccub_version, use_configured_remote
from tasks.dvc import dvc, push, stage_task
from tasks.promote import promote_cultures
from tasks.report import publish_lineage, publish_metrics, publish_validation, record_lineage
from tasks.workspaces import retrain_lease

CULTURE_STAGES = ["negatives", "train", "evaluate"]  # after the shared stages: one chain per culture


class CultureRunFailed(RuntimeError):
    """A culture's own flow run (fan-out) ended in a state other than Completed, retries included."""


@flow(name="retrain", log_prints=True)
def retrain(workdir: str = ".", ccub_version: str | None = None) -> dict:
    """Run the dvc.yaml stages in order (each skipped when nothing it uses changed: a CCUB update
    reruns the cultures it changed), publish the checks and the metrics, record each culture's
    lineage, promote each culture's LoRA that passes the rules (params.yaml `promotion`; with
    `insider_review` or `require_approval` it is sent on to people, and this run ends), and push
    everything, the registry's LoRAs included, to the DVC remote.

    With `ccub_version` (a DVC hash, as `ccub.updated` announces), train on exactly that CCUB
    version from the DVC remote instead of ingesting from the sources."""
    stage = stage_task(workdir)
    params = load_params(Path(workdir) / "params.yaml")
    refuse_endless_restarts(params.orchestration.max_attempts)
    # The whole run on one CCUB version: no ingest or other retrain changes this workspace's data until
    # it ends (an ingest flow works in its own workspace meanwhile, tasks/workspaces.py).
    with retrain_lease(workdir):
        cultures = params.validate_.cultures
        use_configured_remote(workdir)
        if ccub_version:
            pull_ccub_version(workdir, ccub_version)
            ran = {"ingest": False}
        else:
            ran = {"ingest": stage("ingest", workdir)["ran"]}
            push(workdir, ["ingest"])
            announce_new_version(workdir, emitter="retrain")
        try:
            ran["validate"] = stage("validate", workdir)["ran"]
        finally:
            validation = publish_validation(workdir)  # the operator sees the failing checks too
        ran["base"] = stage("base", workdir)["ran"]
        deployment = params.orchestration.culture_deployment
        joint = not params.train.lora_per_culture
        if joint:
            outcomes = {}
            ran |= run_joint(workdir, cultures)
        elif deployment:
            outcomes = fan_out(workdir, cultures, deployment, params.orchestration.culture_run_timeout_s)
        else:
            outcomes = {c: run_chain(workdir, c) for c in cultures}
        failed = {c: o for c, o in outcomes.items() if isinstance(o, str)}
        ran |= {s: r for o in outcomes.values() if isinstance(o, dict) for s, r in o.items()}
        cultures = [c for c in cultures if c not in failed]
        mark_other_layout(workdir, cultures, joint)
        metrics = publish_metrics(workdir, cultures, joint)
        root = Path(workdir)
        trained = [c for c in cultures if (root / culture_paths(c, joint)["lora"] / LORA_FILE).is_file()
                   and (not joint or read_manifest(root / CCUB_DIR, c))]  # the joint LoRA serves cultures it saw
        lineage = {c: record_lineage(workdir, validation, metrics[c], c) for c in trained}
        decisions = promote_cultures(workdir, {c: lineage[c] for c in trained}, params.promotion)
        for c in trained:
            publish_lineage(lineage[c])
        if any(d["promote"] and "already_judged" not in d for d in decisions.values()):
            # a new production LoRA: DVC tracks the registry's copies, so the push below sends it
            dvc(["add", "-q", str(LORAS_DIR)], workdir, "track the registry's LoRAs")
        push(workdir)
        if failed:  # the other cultures are trained, judged and pushed: the operator retries these alone
            raise CultureRunFailed("; ".join(f"{c}: {why}" for c, why in failed.items()))
        return {"stages_run": ran, "loras": {c: root / culture_paths(c, joint)["lora"] for c in trained},
                "reports": {c: root / culture_paths(c, joint)["eval"] / "report.html" for c in trained},
                "lineage": lineage,
                "promoted": {c: d["promote"] for c, d in decisions.items()},
                "skipped": {c: m["insufficient"] for c, m in metrics.items() if "insufficient" in m}}


def refuse_endless_restarts(max_attempts: int) -> None:
    """Fail a run that has started `max_attempts` times already (retries and restarts after crashes)."""
    if flow_run.run_count > max_attempts:
        raise RuntimeError(f"this flow run has started {flow_run.run_count} times, more than orchestration."
                           f"max_attempts ({max_attempts}): it fails instead; its earlier runs' logs say why")


def run_chain(workdir: str, culture: str) -> dict[str, bool]:
    """One culture's stages in this run, in order; whether each ran."""
    stage = stage_task(workdir)
    return {f"{name}@{culture}": stage(f"{name}@{culture}", workdir)["ran"] for name in CULTURE_STAGES}


def run_joint(workdir: str, cultures: list[str]) -> dict[str, bool]:
    """The joint LoRA's stages (train.lora_per_culture false): every culture's negatives, the one LoRA
    on all of them, then its evaluation on each culture's prompts; whether each ran."""
    stage = stage_task(workdir)
    names = [*(f"negatives@{c}" for c in cultures), "train_joint", *(f"evaluate_joint@{c}" for c in cultures)]
    return {name: stage(name, workdir)["ran"] for name in names}


@task(name="mark-other-layout")
def mark_other_layout(workdir: str, cultures: list[str], joint: bool) -> None:
    """The stages of the layout not configured (train.lora_per_culture) write their markers (skipped.json
    naming the LoRA that serves, a skipped evaluation), so that dvc.lock accounts for every stage and
    `dvc status` stays clean. One DVC call: they take a second each."""
    names = ["train_joint", *(f"evaluate_joint@{c}" for c in cultures)] if not joint else \
        [f"{s}@{c}" for s in ("train", "evaluate") for c in cultures]
    dvc(["repro", "--single-item", *names], workdir, "the other layout's markers")


def fan_out(workdir: str, cultures: list[str], deployment: str, timeout_s: float) -> dict[str, dict | str]:
    """Every culture's chain as a flow run of `deployment` at once (each on a worker of its own, in
    that worker's workspace), handed the shared stages' dvc.lock entries; each finished culture's
    entries come back into this workspace's dvc.lock and its outputs from the DVC remote. Per culture:
    its stages_run, or why it failed (a failed culture does not stop the others)."""
    push(workdir, SHARED_STAGES)  # what the culture runs pull
    shared = lock_entries(workdir, SHARED_STAGES)
    runs = {c: run_culture.submit(deployment, c, shared, timeout_s) for c in cultures}
    outcomes = {}
    for culture, future in runs.items():
        try:
            entries, ran = future.result()
        except CultureRunFailed as e:
            outcomes[culture] = str(e)
            continue
        try:
            entries = culture_lock_entries(workdir, culture, entries)
        except BadLockEntry as e:
            outcomes[culture] = str(e)
            continue
        adopt_lock_entries(workdir, entries)
        dvc(["pull", *entries], workdir, f"pull {culture}")
        outcomes[culture] = ran
    return outcomes


def _lock_artifact_key(culture: str) -> str:
    return f"dvc-lock-{culture.lower()}"


@task(name="culture-run", task_run_name="retrain-culture@{culture}")
def run_culture(deployment: str, culture: str, shared: dict, timeout_s: float) -> tuple[dict, dict]:
    """Start `deployment` for one culture and wait for it (its retries included); return the dvc.lock
    entries it recorded and whether each stage ran, which it publishes as an artifact of its run."""
    started = time.monotonic()
    run = run_deployment(deployment, parameters={"culture": culture, "shared_lock": shared},
                         flow_run_name=f"retrain-{culture}", timeout=timeout_s, poll_interval=2)
    run = follow_restarts(run, deadline=started + timeout_s)
    if not run.state or not run.state.is_completed():
        state = f"{run.state.name}: {run.state.message or 'no message'}" if run.state else "never started"
        raise CultureRunFailed(f"flow run {run.name} ({run.id}) is {state}")
    return published_lock_entries(run, culture)


def published_lock_entries(run, culture: str) -> tuple[dict, dict]:
    """The dvc.lock entries (and whether each stage ran) that the culture's own flow run published, as
    its one `dvc-lock-<c>` artifact: none, several (which would win was random) or an unreadable one
    fail the culture."""
    key = ArtifactFilterKey(any_=[_lock_artifact_key(culture)])
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]), key=key))
    if len(artifacts) != 1:
        raise CultureRunFailed(f"flow run {run.name} ({run.id}) published {len(artifacts)} dvc.lock artifacts "
                               f"({_lock_artifact_key(culture)}), not one: nothing of it is taken")
    try:
        rows = json.loads(artifacts[0].data)
        return {r["stage"]: json.loads(r["lock_entry"]) for r in rows}, {r["stage"]: bool(r["ran"]) for r in rows}
    except (ValueError, TypeError, KeyError) as e:
        raise CultureRunFailed(f"flow run {run.name} ({run.id}): its dvc.lock artifact is unreadable "
                               f"({type(e).__name__})") from e


CRASH_GRACE_S = 180  # how long a crashed culture run is given to be restarted by `scoft recovery` (90 s + margin)


def follow_restarts(run, deadline: float):
    """A culture run that crashed (its worker killed) is restarted by `scoft recovery`'s automation and
    resumes: follow it until it ends other than Crashed, or stays Crashed for CRASH_GRACE_S."""
    crashed_since = None
    with get_client(sync_client=True) as client:
        while run.state and not (run.state.is_final() and not run.state.is_crashed()) and time.monotonic() < deadline:
            if run.state.is_crashed():
                crashed_since = crashed_since or time.monotonic()
                if time.monotonic() - crashed_since > CRASH_GRACE_S:
                    break
            else:
                crashed_since = None
            time.sleep(2)
            run = client.read_flow_run(run.id)
    return run


@flow(name="retrain-culture", log_prints=True, retries=1, retry_delay_seconds=10)
def retrain_culture(culture: str, shared_lock: dict, workdir: str = ".") -> dict:
    """One culture's chain (negatives, train, evaluate) in this worker's workspace, on exactly the
    data the parent retrain run recorded (`shared_lock`: its dvc.lock entries of ingest, validate
    and base): pull them from the DVC remote, reproduce the chain (a retry resumes a killed training
    from its checkpoint), push its outputs, and publish its dvc.lock entries for the parent."""
    refuse_endless_restarts(load_params(Path(workdir) / "params.yaml").orchestration.max_attempts)
    use_configured_remote(workdir)
    adopt_lock_entries(workdir, shared_lock_entries(workdir, shared_lock))  # refused: the run fails, naming it
    dvc(["pull", *shared_lock], workdir, "pull the shared stages")
    ran = run_chain(workdir, culture)
    push(workdir, list(ran))
    entries = lock_entries(workdir, list(ran))
    rows = [{"stage": s, "ran": ran[s], "outs": ", ".join(f"{o['path']} {o['md5']}" for o in e.get("outs", [])),
             "lock_entry": json.dumps(e)} for s, e in entries.items()]
    create_table_artifact(key=_lock_artifact_key(culture), table=rows,
                          description=f"{culture}: the outputs this run pushed to the DVC remote (dvc.lock entries)")
    get_run_logger().info("%s: %s", culture, {s: "ran" if r else "skipped" for s, r in ran.items()})
    return {"culture": culture, "stages_run": ran}


if __name__ == "__main__":
    retrain()
