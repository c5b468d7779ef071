"""What an operator sees in the Prefect UI: validation and metrics tables, the lineage record."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.settings import get_current_settings

from scoft.config import load_params
from scoft.lineage import build_record, lineage_markdown, save_record
from scoft.paths import BASE_DIR, LORA_FILE, culture_paths
from scoft.stats import holm


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@task(name="publish-validation")
def publish_validation(workdir: str = ".") -> dict | None:
    """A table of every check (suite, expectation, column, result, failing records) for the UI."""
    folder = Path(workdir) / "data/validation"
    if not (folder / "summary.json").is_file():
        get_run_logger().warning("no validation report in %s to publish", folder)
        return None
    summary = _read(folder / "summary.json")
    failing = {(f["expectation"], f["column"]): f for f in summary["failures"]}
    rows = []
    for suite, result in _read(folder / "gx_results.json").items():
        for r in result["results"]:
            kind, column = r["expectation_config"]["type"], r["expectation_config"]["kwargs"].get("column")
            bad = failing.get((kind, column), {}).get("rows", []) if not r["success"] else []
            rows.append({"suite": suite, "expectation": kind, "column": column or "",
                         "success": r["success"], "failing": "; ".join(" ".join(f"{k}={v}" for k, v in row.items())
                                                                       for row in bad[:10])})
    s = summary["statistics"]
    create_table_artifact(
        key="ccub-validation",
        table=rows,
        description=f"CCUB checks: {s['successful_expectations']}/{s['evaluated_expectations']} passed on "
        f"{s['records']} records (success: {summary['success']}). Data Docs: {folder / 'data_docs/index.html'}",
    )
    return summary


def _metrics_row(culture: str, m: dict, p_holm: float | None) -> dict:
    if "models" not in m:
        return {"culture": culture, "n": 0, "base": None, "scoft": None, "improvement": None,
                "improvement_ci95": m["insufficient"], "p_holm": None, "retrieval_base": None, "retrieval_scoft": None}
    gain = m["improvement"]["scoft"]
    interval = gain.get("insufficient") or f"[{gain['ci95_low']:.5f}, {gain['ci95_high']:.5f}]"
    return {"culture": culture, "n": m["n"], "base": round(m["models"]["base"]["mean"], 5),
            "scoft": round(m["models"]["scoft"]["mean"], 5), "improvement": round(gain["mean"], 5),
            "improvement_ci95": interval, "p_holm": p_holm}


@task(name="publish-metrics")
def publish_metrics(workdir: str, cultures: list[str], joint: bool = False) -> dict[str, dict]:
    """One table row per culture from its evaluation (reports/metrics/<C>.json, or with `joint` the joint
    LoRA's, reports/metrics_joint/<C>.json), the paired tests Holm-corrected across the cultures (each
    culture's evaluation ran alone); returns the metrics."""
    metrics = {c: _read(Path(workdir) / culture_paths(c, joint)["metrics"]) for c in cultures}
    blocks = {c: m["per_culture"][c] if "per_culture" in m else {"n": 0, "insufficient": m["insufficient"]}
              for c, m in metrics.items()}
    p_raw = {c: b["improvement"]["scoft"].get("p_one_sided") for c, b in blocks.items() if "models" in b}
    p_holm = holm(p_raw)
    rows = [_metrics_row(c, b, p_holm.get(c)) for c, b in blocks.items()]
    for row, m in zip(rows, metrics.values()):
        retrieval = m.get("retrieval_accuracy", {}).get("overall", {})
        row["retrieval_base"] = round(retrieval["base"]["mean"], 4) if "base" in retrieval else None
        row["retrieval_scoft"] = round(retrieval["scoft"]["mean"], 4) if "scoft" in retrieval else None
    backbone = next((m["metric"] for m in metrics.values() if "metric" in m), "feature_distance")
    serving = "the joint" if joint else "its own"
    create_table_artifact(key="scoft-metrics", table=rows,
                          description=f"Per culture, {serving} LoRA: {backbone} to held-out CCUB images (lower is "
                          "better), improvement over the base with its 95% interval and Holm-corrected p, and "
                          "culture retrieval accuracy")
    return metrics


@task(name="record-lineage")
def record_lineage(workdir: str, validation: dict, metrics: dict, culture: str) -> Path:
    """The lineage record of one culture's LoRA (its own, or the joint one serving it): its records,
    checks, negatives, params, code, metrics."""
    root = Path(workdir)
    loaded = load_params(root / "params.yaml")
    joint = not loaded.train.lora_per_culture
    paths = culture_paths(culture, joint)
    params = loaded.model_dump(by_alias=True)
    record = build_record(
        root=root,
        ccub_dir="data/ccub",
        validation_summary=validation,
        negatives_dir=str(paths["negatives"]),
        lora_file=str(paths["lora"] / LORA_FILE),
        params={k: params[k] for k in ("model", "features", "negatives", "train", "evaluate", "promotion")},
        metrics=metrics,
        flow_run_id=str(flow_run.id) if flow_run.id else None,
        run_version=(flow_run.parameters or {}).get("ccub_version") if flow_run.id else None,
        culture=culture,
        joint=joint,
        # what the gate read, and the base model when it is a folder here (a hub model: its id and
        # revision are in params.model)
        evaluation={"metrics": [str(paths["metrics"])],
                    "evaluation report": [str(p.relative_to(root)) for p in (root / paths["eval"]).glob("report.*")],
                    **({"base model": [str(BASE_DIR)]} if (root / BASE_DIR).is_dir() else {})},
    )
    path = save_record(record, root)
    stored = _read(path)
    if stored["created_at"] != record["created_at"]:
        get_run_logger().info("%s: LoRA and data unchanged since %s: keeping their lineage record %s", culture,
                              stored["created_at"], path)
    return path


@task(name="publish-lineage")
def publish_lineage(lineage_path: Path) -> None:
    """The record as the UI shows it: a summary an operator reads at a glance, linked to the full JSON
    (an artifact of its own)."""
    record = _read(Path(lineage_path))
    culture = (record.get("culture") or "joint").lower()
    # Backticks (from CCUB categories in the check summary) as JSON escapes: none can close the fence.
    as_json = json.dumps(record, indent=2, sort_keys=True).replace("`", "\\u0060")
    full = create_markdown_artifact(key=f"scoft-lineage-{culture}-record", markdown=f"```json\n{as_json}\n```\n",
                                    description=f"The full lineage record {lineage_path}")
    ui = get_current_settings().ui_url
    link = f"{ui}/artifacts/artifact/{full}" if ui else None
    create_markdown_artifact(key=f"scoft-lineage-{culture}", markdown=lineage_markdown(record, lineage_path, link),
                             description=f"Data version, checks, code, params, metrics and decision of the "
                             f"{record.get('culture') or 'joint'} LoRA")
