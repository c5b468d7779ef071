"""The retrain flow: CCUB in; per culture a SCoFT LoRA, its evaluation and its lineage record out."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from scoft.config import load_params
from scoft.paths import EVAL_DIR, LORA_DIR, LORA_FILE
from scoft.registry import LORAS_DIR
from tasks.ccub import announce_new_version, pull_ccub_version, use_configured_remote
from tasks.dvc import dvc, push, stage_task
from tasks.promote import promote_culture
from tasks.report import publish_lineage, publish_metrics, publish_validation, record_lineage

CULTURE_STAGES = ["negatives", "train", "evaluate"]  # after ingest, validate, base: one chain per culture


@flow(name="retrain", log_prints=True)
def retrain(workdir: str = ".", ccub_version: str | None = None) -> dict:
    """Run the dvc.yaml stages in order (each skipped when nothing it uses changed: a CCUB update
    reruns the cultures it changed), publish the checks and the metrics, record each culture's
    lineage, promote each culture's LoRA that passes the rules (params.yaml `promotion`; with
    `require_approval`, once a reviewer approves it in the Prefect UI), and push
    everything, the registry's LoRAs included, to the DVC remote.

    With `ccub_version` (a DVC hash, as `ccub.updated` announces), train on exactly that CCUB
    version from the DVC remote instead of ingesting from the sources."""
    stage = stage_task(workdir)
    params = load_params(Path(workdir) / "params.yaml")
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
    for culture in cultures:
        for name in CULTURE_STAGES:
            ran[f"{name}@{culture}"] = stage(f"{name}@{culture}", workdir)["ran"]
    metrics = publish_metrics(workdir, cultures)
    root = Path(workdir)
    trained = [c for c in cultures if (root / LORA_DIR / c / LORA_FILE).is_file()]
    lineage = {c: record_lineage(workdir, validation, metrics[c], c) for c in trained}
    decisions = {c: promote_culture(workdir, c, lineage[c], params.promotion) for c in trained}
    for c in trained:
        publish_lineage(lineage[c])
    if any(d["promote"] and "already_judged" not in d for d in decisions.values()):
        # a new production LoRA: DVC tracks the registry's copies, so the push below sends it
        dvc(["add", "-q", str(LORAS_DIR)], workdir, "track the registry's LoRAs")
    push(workdir)
    return {"stages_run": ran, "loras": {c: root / LORA_DIR / c for c in trained},
            "reports": {c: root / EVAL_DIR / c / "report.html" for c in trained}, "lineage": lineage,
            "promoted": {c: d["promote"] for c, d in decisions.items()},
            "skipped": {c: m["insufficient"] for c, m in metrics.items() if "insufficient" in m}}


if __name__ == "__main__":
    retrain()
