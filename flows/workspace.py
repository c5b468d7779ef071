"""The deployments' pull step: a worker runs each flow in its DVC workspace, named by SCOFT_WORKSPACE."""

from __future__ import annotations

import os
from pathlib import Path

VARIABLE = "SCOFT_WORKSPACE"


def enter_workspace() -> dict[str, str]:
    """Change into the workspace that the worker's SCOFT_WORKSPACE names (a checkout of this repository
    with its DVC set-up), or fail saying what to set: without it every run would start in a
    temporary folder and fail on a missing file."""
    value = os.environ.get(VARIABLE, "").strip()
    if not value:
        raise RuntimeError(f"{VARIABLE} is not set on this worker: start the worker with {VARIABLE}=/path/to/checkout "
                           "(a clone of scoft-flows with `dvc` set up), see deployments/prefect.yaml")
    folder = Path(value).expanduser().resolve()
    if not (folder / "dvc.yaml").is_file():
        raise RuntimeError(f"{VARIABLE}={value}: no dvc.yaml there; it must name a checkout of scoft-flows")
    os.chdir(folder)
    return {"directory": str(folder)}
