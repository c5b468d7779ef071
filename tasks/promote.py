"""The promote step: each culture's candidate LoRA judged by the rules of params.yaml, the verdict in
the registry, the lineage record, the Prefect UI and the event stream."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from scoft.config import load_params
from scoft.io import write_json
from scoft.promotion import decision_markdown, failed_rules, gate

PROMOTED, REJECTED = "scoft.model.promoted", "scoft.model.rejected"


@task(name="promote")
def promote_culture(workdir: str, culture: str, lineage_path: Path) -> dict:
    """Judge the culture's candidate; a candidate judged before (same LoRA) keeps its verdict."""
    root = Path(workdir)
    decision = gate(root, culture, load_params(root / "params.yaml"), Path(lineage_path).stem)
    logger = get_run_logger()
    if "already_judged" in decision:
        logger.info("%s: LoRA %s was judged on %s (%s): nothing new", culture, decision["lora_sha256"][:12],
                    decision["already_judged"], "promoted" if decision["promote"] else "rejected")
        return decision
    record = json.loads(Path(lineage_path).read_text(encoding="utf-8"))
    record["promotion"] = {k: decision[k] for k in ("promote", "rules", "evaluation_key")}
    write_json(lineage_path, record)
    create_markdown_artifact(key=f"scoft-promotion-{culture.lower()}", markdown=decision_markdown(decision),
                             description=f"{culture}: the candidate LoRA against the promotion rules")
    failed = failed_rules(decision)
    emit_event(event=PROMOTED if decision["promote"] else REJECTED,
               resource={"prefect.resource.id": f"scoft.model.{culture}.{decision['lora_sha256'][:16]}",
                         "prefect.resource.name": f"SCoFT LoRA {culture}", "scoft.culture": culture},
               payload={"culture": culture, "lora_sha256": decision["lora_sha256"], "lineage": decision["lineage"],
                        "failed_rules": failed})
    logger.info("%s: %s%s", culture, "promoted to production" if decision["promote"] else "rejected",
                "" if decision["promote"] else f" ({'; '.join(failed)})")
    return decision
