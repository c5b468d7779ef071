"""The ingest flow (CPU, on a schedule): bring CCUB up to date, check it, version it, announce it."""

from __future__ import annotations

from prefect import flow

from tasks.ccub import announce_new_version, use_configured_remote
from tasks.dvc import push, stage_task
from tasks.report import publish_validation
from tasks.workspaces import INGEST_STAGES, prepare_ingest_workspace, take_new_version


@flow(name="ingest", log_prints=True)
def ingest(workdir: str = ".") -> dict | None:
    """Fetch new or changed CCUB rows, run the checks, push the version, emit `ccub.updated` if it is new.

    It works in the ingest workspace (tasks/workspaces.py), never waiting for a retrain of `workdir`
    nor changing the data under it; the project workspace takes the new version once no retrain
    holds it."""
    use_configured_remote(workdir)
    twin = prepare_ingest_workspace(workdir)
    stage = stage_task(twin)
    stage("ingest", twin)
    try:
        stage("validate", twin)
    finally:
        publish_validation(twin)
    push(twin, INGEST_STAGES)
    announced = announce_new_version(twin, emitter="ingest")
    take_new_version(workdir, twin)
    return announced
