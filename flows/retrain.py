"""The retrain flow: CCUB in, a SCoFT LoRA, its evaluation and its lineage record out."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from scoft.config import load_params
from tasks.ccub import announce_new_version, use_configured_remote
from tasks.dvc import push, run_stage
from tasks.report import publish_metrics, publish_validation, record_lineage

STAGES = ["ingest", "validate", "negatives", "train", "evaluate"]  # dvc.yaml order


def stage_task(workdir: str):
    """The stage task with the retries and timeout of params.yaml's orchestration section."""
    o = load_params(Path(workdir) / "params.yaml").orchestration
    return run_stage.with_options(retries=o.stage_retries, retry_delay_seconds=o.stage_retry_delay_s,
                                  timeout_seconds=o.stage_timeout_s)


@flow(name="retrain", log_prints=True)
def retrain(workdir: str = ".") -> dict:
    """Run the dvc.yaml stages in order (each skipped when nothing it uses changed), publish the
    checks and the metrics, record lineage, and push everything to the DVC remote."""
    stage = stage_task(workdir)
    use_configured_remote(workdir)
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
    return {"stages_run": ran, "lora": root / "models/lora", "report": root / "reports/eval/report.md",
            "lineage": lineage}


if __name__ == "__main__":
    retrain()
