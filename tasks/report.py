"""What an operator sees in the Prefect UI: validation and metrics tables, the lineage record."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from scoft.config import load_params
from scoft.lineage import build_record, save_record


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@task(name="publish-validation")
def publish_validation(workdir: str = ".") -> dict:
    summary = _read(Path(workdir) / "data/validation/summary.json")
    s = summary["statistics"]
    create_table_artifact(
        key="ccub-validation",
        table=summary["per_culture"],
        description=f"CCUB checks: {s['successful_expectations']}/{s['evaluated_expectations']} passed "
                    f"on {s['records']} records (success: {summary['success']})",
    )
    return summary


@task(name="publish-metrics")
def publish_metrics(workdir: str = ".") -> dict:
    metrics = _read(Path(workdir) / "reports/metrics.json")
    rows = [
        {"culture": culture, "n": m["n"], "base": round(m["base"]["mean"], 5), "scoft": round(m["scoft"]["mean"], 5),
         "improvement": round(m["improvement"]["mean"], 5),
         "improvement_ci95": f"[{m['improvement']['ci95_low']:.5f}, {m['improvement']['ci95_high']:.5f}]"}
        for culture, m in [*metrics["per_culture"].items(), ("all", metrics["overall"])]
    ]
    create_table_artifact(key="scoft-metrics", table=rows,
                          description=f"{metrics['metric']} to held-out CCUB images (lower is better)")
    return metrics


@task(name="record-lineage")
def record_lineage(workdir: str, validation: dict, metrics: dict) -> Path:
    root = Path(workdir)
    params = load_params(root / "params.yaml").model_dump(by_alias=True)
    record = build_record(
        root=root,
        ccub_dir="data/ccub",
        validation_summary=validation,
        negatives_dir="data/negatives",
        lora_file="models/lora/pytorch_lora_weights.safetensors",
        params={k: params[k] for k in ("model", "features", "negatives", "train")},
        metrics=metrics,
        flow_run_id=str(flow_run.id) if flow_run.id else None,
    )
    path = save_record(record, root)
    stored = _read(path)
    if stored["lora"]["sha256"] == record["lora"]["sha256"] and stored["created_at"] != record["created_at"]:
        get_run_logger().info("LoRA unchanged since %s: keeping its lineage record %s", stored["created_at"], path)
    create_markdown_artifact(key="scoft-lineage", markdown=f"# Lineage\n\n`{path}`\n\n```json\n"
                             f"{json.dumps(stored, indent=2, sort_keys=True)}\n```\n",
                             description="Data version, checks, negatives, parameters, code and metrics of this LoRA")
    return path
