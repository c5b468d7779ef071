"""One run, one version: a retrain holds its workspace for its whole life, and the ingest flow works in a
workspace of its own, so that neither changes the data under the other.

Before, an hourly ingest landing during a retrain waited for the DVC slot, then ran ingest and
validate in the gap between two of the retrain's stages: the retrain trained its next cultures on the
new version while its record said the old one, and the ingest's push (and its `ccub.updated`) waited
for the whole retrain. Now:
- the retrain flow holds the workspace's retrain lease (a file lock, freed by the kernel however its
  holder ends) from its first stage to its last push; a second retrain in the workspace waits for it;
- the ingest flow runs its stages in the ingest workspace, `.dvc/tmp/scoft-ingest/`: a DVC workspace
  of its own (its dvc.lock, its incremental staging) with the project's dvc.yaml, params.yaml and
  code, sharing the project's DVC cache and remote. It pushes and announces on its own time; the
  project workspace takes the new version right away when no retrain holds it, and otherwise at the
  next retrain, which pulls the announced version.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from prefect import get_run_logger, task

from scoft.config import load_params
from scoft.io import atomic_write_text
from scoft.paths import CCUB_DIR
from scoft.remote import adopt_lock_entries, dvc_command, lock_entries
from tasks.dvc import dvc, held_lock

RETRAIN_LEASE = Path(".dvc/tmp/scoft-retrain.lock")
INGEST_WORKSPACE = Path(".dvc/tmp/scoft-ingest")
INGEST_STAGES = ["ingest", "validate"]
SUMMARY = Path("data/ingest/summary.json")  # the ingest stage's metric: not in the DVC cache, copied
# What the ingest and validate stages read besides the data: dvc.yaml lists scoft/ modules as deps.
PROJECT_FILES = ["dvc.yaml", "params.yaml", ".dvcignore"]
CODE = "scoft"


@contextlib.contextmanager
def retrain_lease(workdir: str, label: str = "retrain", wait: bool = True):
    """The workspace's retrain lease: while a retrain holds it, nothing else changes the workspace's
    CCUB version. Yields whether it is held (False only when `wait` is false and another holds it)."""
    path = Path(workdir).resolve() / RETRAIN_LEASE
    with held_lock(path, label, "the workspace's retrain lease (a retrain runs there)", wait=wait) as fd:
        yield fd is not None


@task(name="prepare-ingest-workspace")
def prepare_ingest_workspace(workdir: str = ".") -> str:
    """The ingest workspace of the project workspace `workdir`, brought up to date with the project's
    dvc.yaml, params.yaml, code and DVC configuration; created (and its last CCUB version checked out
    from the shared cache, the base of an incremental ingest) the first time."""
    root = Path(workdir).resolve()
    twin = root / INGEST_WORKSPACE
    fresh = not (twin / ".dvc").is_dir()
    if fresh:
        twin.mkdir(parents=True, exist_ok=True)
        dvc_command(twin, "init", "--no-scm", "-q", "--force")
    for name in PROJECT_FILES:
        if (root / name).is_file():
            shutil.copy2(root / name, twin / name)
    shutil.copytree(root / CODE, twin / CODE, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    _share_dvc_setup(root, twin)
    _link_local_sources(root, twin)
    if fresh and (root / "dvc.lock").is_file():
        adopt_lock_entries(twin, _existing_entries(root, INGEST_STAGES))
        dvc(["checkout", "--allow-missing", *INGEST_STAGES], str(twin), "ingest workspace: last version")
    get_run_logger().info("ingest workspace %s (%s)", twin, "created" if fresh else "up to date with the project")
    return str(twin)


def _share_dvc_setup(root: Path, twin: Path) -> None:
    """The project's DVC configuration (remote included), with the project's cache as the cache: what
    either workspace adds, the other checks out without copying it over the network."""
    from dvc.repo import Repo

    shutil.copy2(root / ".dvc/config", twin / ".dvc/config")
    local = root / ".dvc/config.local"
    if local.is_file():
        shutil.copy2(local, twin / ".dvc/config.local")
    else:
        (twin / ".dvc/config.local").unlink(missing_ok=True)
    with Repo(str(root)) as repo:
        cache = repo.cache.local_cache_dir
    dvc_command(twin, "config", "--local", "cache.dir", cache)


def _link_local_sources(root: Path, twin: Path) -> None:
    """ingest.sources may name folders and files of the project workspace by relative path
    (data/sample): the ingest workspace sees the same ones (links, never copies)."""
    for source in load_params(root / "params.yaml").ingest.sources:
        text = str(source)
        if "://" in text or Path(text).is_absolute() or not (root / text).exists():
            continue
        link = twin / text
        if link.is_symlink() or link.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(root / text)


def _existing_entries(root: Path, stages: list[str]) -> dict[str, dict]:
    try:
        return lock_entries(root, stages)
    except KeyError:  # a project that never ingested: the ingest workspace starts empty
        return {}


@task(name="update-project-workspace")
def take_new_version(workdir: str, twin: str) -> str | None:
    """Bring the ingest workspace's version into the project workspace (its dvc.lock entries of ingest
    and validate, their outputs from the shared cache, the ingest summary) unless a retrain holds the
    project workspace: that retrain keeps its version, and the next one pulls the announced version.
    Returns the version taken, or None."""
    logger = get_run_logger()
    entries = lock_entries(twin, INGEST_STAGES)
    version = next(o["md5"] for o in entries["ingest"]["outs"] if o["path"] == str(CCUB_DIR))
    with retrain_lease(workdir, "ingest: take the new version", wait=False) as held:
        if not held:
            logger.info("a retrain holds %s: it keeps the CCUB version it started with; the next retrain "
                        "(ccub.updated starts one) takes %s", Path(workdir).resolve(), version)
            return None
        adopt_lock_entries(workdir, entries)
        dvc(["checkout", *INGEST_STAGES], workdir, "take the new CCUB version")
        atomic_write_text(Path(workdir) / SUMMARY, (Path(twin) / SUMMARY).read_text(encoding="utf-8"))
    logger.info("project workspace %s now holds CCUB version %s", Path(workdir).resolve(), version)
    return version
