"""Tasks around CCUB versions: telling the world a new version exists, pointing DVC at its remote."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.events import emit_event

from scoft.config import load_params
from scoft.paths import CCUB_DIR
from scoft.remote import configure_remote, in_cache, pin_locked_output, restore_lock
from tasks.dvc import StageFailed, dvc

EVENT = "ccub.updated"


class CCUBVersionUnavailable(RuntimeError):
    """The DVC remote does not hold the CCUB version a run asked for."""


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


@task(name="pull-ccub-version")
def pull_ccub_version(workdir: str, version: str) -> str:
    """Check out exactly the CCUB `version` (a DVC hash, as in `ccub.updated`) from the DVC remote:
    a GPU worker then trains on the data the ingest flow checked and announced, not on whatever
    the sources hold by the time it starts. A version the remote lacks leaves the workspace as it was."""
    previous = pin_locked_output(workdir, "ingest", str(CCUB_DIR), version)
    # Fetch, check, then check out: `dvc pull` of a missing version would empty data/ccub, and
    # `dvc fetch` only warns about it.
    try:
        dvc(["fetch", "ingest"], workdir, "fetch")
        problem = None if in_cache(workdir, version) else "the DVC remote has no such version"
    except StageFailed as e:
        problem = str(e)
    if problem:
        restore_lock(workdir, previous)
        raise CCUBVersionUnavailable(f"CCUB version {version} could not be pulled from the DVC remote "
                                     f"(was it pushed by the ingest flow?): {problem}")
    dvc(["checkout", "ingest"], workdir, "checkout")
    get_run_logger().info("CCUB version %s checked out from the DVC remote into %s", version, CCUB_DIR)
    return version
