"""Tasks around CCUB versions: telling the world a new version exists, pointing DVC at its remote."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.events import emit_event

from scoft.config import load_params
from scoft.remote import configure_remote

EVENT = "ccub.updated"


@task(name="announce-ccub-version")
def announce_new_version(workdir: str = ".", emitter: str = "ingest") -> dict | None:
    """Emit `ccub.updated` (DVC hash and counts in the payload) when ingest changed CCUB."""
    summary = json.loads((Path(workdir) / "data/ingest/summary.json").read_text(encoding="utf-8"))
    logger = get_run_logger()
    if not (summary["added"] or summary["changed"] or summary["removed"]):
        logger.info("CCUB unchanged (version %s): no event", summary["version"])
        return None
    payload = {k: summary[k] for k in ("version", "added", "changed", "removed", "unchanged", "records")}
    payload["rejected"] = len(summary["rejected"])
    emit_event(
        event=EVENT,
        resource={"prefect.resource.id": f"scoft.ccub.{summary['version']}", "prefect.resource.name": "CCUB",
                  "scoft.emitter": emitter},
        payload=payload,
    )
    logger.info("CCUB version %s: %s; emitted %s", summary["version"], payload, EVENT)
    return payload


@task(name="configure-dvc-remote", retries=1)
def use_configured_remote(workdir: str = ".") -> str:
    where = configure_remote(workdir, load_params(Path(workdir) / "params.yaml").remote)
    get_run_logger().info("DVC remote: %s", where)
    return where
