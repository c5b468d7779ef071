"""The ingest flow (CPU, on a schedule): bring CCUB up to date, check it, version it, announce it."""

from __future__ import annotations

from prefect import flow

from tasks.ccub import announce_new_version, use_configured_remote
from tasks.dvc import push, stage_task
from tasks.report import publish_validation


@flow(name="ingest", log_prints=True)
def ingest(workdir: str = ".") -> dict | None:
    """Fetch new or changed CCUB rows, run the checks, push the version, emit `ccub.updated` if it is new."""
    stage = stage_task(workdir)
    use_configured_remote(workdir)
    stage("ingest", workdir)
    try:
        stage("validate", workdir)
    finally:
        publish_validation(workdir)
    push(workdir, ["ingest", "validate"])
    return announce_new_version(workdir, emitter="ingest")

