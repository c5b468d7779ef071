"""The retrain flow: CCUB in, a SCoFT LoRA, its evaluation and its lineage record out."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks.ccub import announce_new_version, pull_ccub_version, use_configured_remote
from tasks.dvc import push, stage_task
from tasks.report import publish_metrics, publish_validation, record_lineage

STAGES = ["ingest", "validate", "base", "negatives", "train", "evaluate"]  # dvc.yaml order


@flow(name="retrain", log_prints=True)
def retrain(workdir: str = ".", ccub_version: str | None = None) -> dict:
    """Run the dvc.yaml stages in order (each skipped when nothing it uses changed), publish the
    checks and the metrics, record lineage, and push everything to the DVC remote.

    With `ccub_version` (a DVC hash, as `ccub.updated` announces), train on exactly that CCUB
    version from the DVC remote instead of ingesting from the sources."""
    stage = stage_task(workdir)
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
    for name in STAGES[2:]:
        ran[name] = stage(name, workdir)["ran"]
    metrics = publish_metrics(workdir)
    lineage = record_lineage(workdir, validation, metrics)
    push(workdir)
    root = Path(workdir)
    return {"stages_run": ran, "lora": root / "models/lora", "report": root / "reports/eval/report.html",
            "lineage": lineage}


if __name__ == "__main__":
    retrain()
