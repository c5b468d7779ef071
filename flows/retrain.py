"""The retrain flow: CCUB in, a SCoFT LoRA, its evaluation and its lineage record out."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from scoft.config import load_params
from tasks.dvc import push, run_stage
from tasks.report import publish_metrics, publish_validation, record_lineage

STAGES = ["ingest", "validate", "negatives", "train", "evaluate"]  # dvc.yaml order


@flow(name="retrain", log_prints=True)
def retrain(workdir: str = ".") -> dict:
    """Run the dvc.yaml stages in order (each skipped when nothing it uses changed), publish the
    checks and the metrics, record lineage, and push everything to the DVC remote."""
    orchestration = load_params(Path(workdir) / "params.yaml").orchestration
    stage = run_stage.with_options(retries=orchestration.stage_retries,
                                   retry_delay_seconds=orchestration.stage_retry_delay_s,
                                   timeout_seconds=orchestration.stage_timeout_s)
    ran = {}
    for name in STAGES:
        ran[name] = stage(name, workdir)["ran"]
        if name == "ingest":
            push(workdir, ["ingest"])
        if name == "validate":
            validation = publish_validation(workdir)
    metrics = publish_metrics(workdir)
    lineage = record_lineage(workdir, validation, metrics)
    push(workdir)
    root = Path(workdir)
    return {"stages_run": ran, "lora": root / "models/lora", "report": root / "reports/eval/report.md",
            "lineage": lineage}


if __name__ == "__main__":
    retrain()
