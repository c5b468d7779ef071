"""The DVC remote from params.yaml: a local folder (default) or S3 / any S3-compatible store.

The S3 settings go to `.dvc/config.local`, which DVC keeps out of git. Credentials are never
written anywhere: DVC and boto3 read them from the environment or an AWS profile.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from ruamel.yaml import YAML

from scoft.config import RemoteParams
from scoft.io import atomic_write_text

S3_REMOTE = "scoft-s3"
# S3-compatible stores (MinIO, Ceph, moto...) reject the newer default integrity checksums.
DIR_HASH = re.compile(r"[0-9a-f]{32}\.dir")  # how DVC names a directory version (the `version` of ingest)
CHECKSUM_ENV = {
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}


def dvc_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in CHECKSUM_ENV.items():
        env.setdefault(key, value)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def dvc_command(root: Path, *args: str) -> None:
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=dvc_environment(),
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"`dvc {' '.join(args)}` failed: {out.stderr.strip() or out.stdout.strip()}")


def configure_remote(root: str | Path, remote: RemoteParams) -> str:
    """Make the configured remote DVC's default; return a description without any secret."""
    root = Path(root)
    if remote.url is None:
        local = root / ".dvc" / "config.local"
        if local.is_file() and S3_REMOTE in local.read_text(encoding="utf-8"):
            dvc_command(root, "remote", "remove", "--local", S3_REMOTE)
        return "the default remote of .dvc/config"
    dvc_command(root, "remote", "add", "--local", "--force", "--default", S3_REMOTE, remote.url)
    if remote.endpoint_url:
        dvc_command(root, "remote", "modify", "--local", S3_REMOTE, "endpointurl", remote.endpoint_url)
    if remote.profile:
        dvc_command(root, "remote", "modify", "--local", S3_REMOTE, "profile", remote.profile)
    return f"{remote.url}" + (f" at {remote.endpoint_url}" if remote.endpoint_url else "")


def pin_locked_output(root: str | Path, stage: str, path: str, dir_hash: str) -> str | None:
    """Record in dvc.lock that `stage` produced the folder `path` with DVC hash `dir_hash`, so that
    `dvc fetch/checkout <stage>` bring exactly that version. Returns dvc.lock's previous text (None
    if there was no dvc.lock) for `restore_lock`."""
    if not DIR_HASH.fullmatch(dir_hash):
        raise ValueError(f"{dir_hash!r} is not a DVC folder version (32 hex digits then .dir)")
    # Round-trip YAML 1.2, as DVC reads it: PyYAML would turn a recorded `mixed_precision: no` into
    # false, and DVC would then see changed params and rerun stages.
    rt = YAML()
    root = Path(root)
    lock_file = root / "dvc.lock"
    previous = lock_file.read_text(encoding="utf-8") if lock_file.exists() else None
    lock = (rt.load(previous) if previous else None) or {"schema": "2.0"}
    stages = lock.setdefault("stages", {})
    if stage not in stages:  # a fresh workspace: the entry takes the stage's command from dvc.yaml
        stages[stage] = {"cmd": rt.load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"][stage]["cmd"]}
    entry = stages[stage]
    if any(o["path"] == path and o.get("md5") == dir_hash for o in entry.get("outs", [])):
        return previous  # already that version: keep DVC's record as it wrote it
    others = [o for o in entry.get("outs", []) if o["path"] != path]
    entry["outs"] = [{"path": path, "hash": "md5", "md5": dir_hash}, *others]
    _write_lock(lock_file, rt, lock)
    return previous


def lock_entries(root: str | Path, stages: list[str]) -> dict[str, dict]:
    """The dvc.lock entries of `stages`, as plain JSON-ready dicts (what a culture run hands back)."""
    lock = YAML().load((Path(root) / "dvc.lock").read_text(encoding="utf-8"))
    missing = [s for s in stages if s not in lock["stages"]]
    if missing:
        raise KeyError(f"dvc.lock in {root} has no entry for {', '.join(missing)}")
    return {s: json.loads(json.dumps(lock["stages"][s])) for s in stages}


CULTURE_STAGES = ("negatives", "train", "evaluate")  # what one culture's own run (fan-out) reproduces
_MD5 = re.compile(r"[0-9a-f]{32}(\.dir)?")
_FILE_KEYS = {"path", "hash", "md5", "size", "nfiles"}


class BadLockEntry(ValueError):
    """A culture run handed back dvc.lock entries the parent must not write."""


def culture_lock_entries(root: str | Path, culture: str, entries) -> dict[str, dict]:
    """The entries a culture's run published, accepted only as exactly its own chain: negatives@C,
    train@C and evaluate@C, each with the command, deps and outs dvc.yaml declares for C and
    well-formed hashes. Anything else would be written into the parent's dvc.lock and reach DVC: an
    `ingest` entry with another hash made `dvc pull` delete data/ccub, a stage named `--force` became
    a flag, a malformed entry broke every later DVC command."""
    from scoft.text import visible

    if not isinstance(entries, dict):
        raise BadLockEntry(f"{culture}: its run's dvc.lock entries are not a mapping")
    expected = {f"{s}@{culture}" for s in CULTURE_STAGES}
    if set(entries) != expected:
        others = sorted(visible(str(k), 60) for k in set(entries) ^ expected)
        raise BadLockEntry(f"{culture}: its run published entries for {', '.join(others)}; only "
                           f"{', '.join(sorted(expected))} are taken, all three")
    if found := _first_problem(root, entries, lambda spec, stage: (spec[stage.partition("@")[0]]["do"], culture)):
        raise BadLockEntry(f"{culture}: its run's dvc.lock entry for {found[0]}: {found[1]}")
    return entries


SHARED_STAGES = ["ingest", "validate", "base"]  # what a retrain run hands its culture runs (fan-out)


def shared_lock_entries(root: str | Path, entries) -> dict[str, dict]:
    """The entries a culture run takes from its parent retrain run (its flow run's parameters, which
    anyone who can start a deployment run writes), checked as the parent checks what comes back:
    exactly the shared stages, each with the command, deps, outs and params this workspace's dvc.yaml
    and params.yaml declare, and well-formed hashes. Unchecked, `--force`, `../../evil` or a command
    of anyone's choosing reached dvc.lock and the `dvc pull` arguments."""
    from scoft.text import visible

    if not isinstance(entries, dict) or set(entries) != set(SHARED_STAGES):
        given = sorted(visible(str(k), 60) for k in entries) if isinstance(entries, dict) else "not a mapping"
        raise BadLockEntry(f"the parent's dvc.lock entries: {given}; exactly {', '.join(SHARED_STAGES)} are taken")
    if found := _first_problem(root, entries, lambda spec, stage: (spec[stage], "")):
        raise BadLockEntry(f"the parent's dvc.lock entry for {found[0]}: {found[1]}")
    return entries


def _first_problem(root: str | Path, entries: dict, declaration) -> tuple[str, str] | None:
    """The first entry that is not its stage as this workspace's dvc.yaml and params.yaml declare it, and
    why: (stage, problem), or None. `declaration(spec, stage)` gives the stage's dvc.yaml body and its
    foreach item ("" for a plain stage)."""
    spec = YAML(typ="safe").load((Path(root) / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    # params.yaml as DVC reads it (YAML 1.2: `no` stays a string)
    mine = YAML(typ="safe").load((Path(root) / "params.yaml").read_text(encoding="utf-8")) or {}
    for stage, entry in entries.items():
        do, item = declaration(spec, stage)
        if problem := _entry_problem(entry, _declared(do, item)) or _params_problem(entry, do, mine):
            return stage, problem
    return None


_MISSING = object()


def _param(params: dict, dotted: str):
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _params_problem(entry: dict, stage: dict, mine: dict) -> str | None:
    """The params an entry says its stage ran with must be this workspace's params.yaml values of the keys
    dvc.yaml declares, nothing else: another file (/etc/passwd), another value (train.lr: 99) or an extra
    key would make DVC here rerun or skip stages on someone else's word."""
    from scoft.text import visible

    declared = [p for p in stage.get("params") or [] if isinstance(p, str)]
    given = entry.get("params", {})
    if set(given) - {"params.yaml"}:
        return f"params from {', '.join(sorted(visible(str(f), 60) for f in given if f != 'params.yaml'))}: only " \
               "params.yaml is read"
    values = given.get("params.yaml", {})
    if not isinstance(values, dict) or set(values) != set(declared):
        keys = sorted(visible(str(k), 60) for k in values) if isinstance(values, dict) else "not a mapping"
        return f"its params are {keys}, not the ones dvc.yaml declares ({', '.join(declared)})"
    for key in declared:
        if values[key] != _param(mine, key):
            return f"param {key} differs from params.yaml here: it ran with other settings ({visible(values[key], 80)})"
    return None


def _declared(do: dict, item: str) -> dict:
    """A foreach stage's command, deps and outs (outs, metrics and plots) for one item."""
    def paths(entries) -> list[str]:
        return sorted((next(iter(e)) if isinstance(e, dict) else e).replace("${item}", item) for e in entries or [])

    return {"cmd": " ".join(str(do["cmd"]).replace("${item}", item).split()), "deps": paths(do.get("deps")),
            "outs": paths([*(do.get("outs") or []), *(do.get("metrics") or []), *(do.get("plots") or [])])}


def _entry_problem(entry, declared: dict) -> str | None:
    if not isinstance(entry, dict) or not set(entry) <= {"cmd", "deps", "params", "outs"}:
        return "not a dvc.lock stage entry (cmd, deps, params, outs)"
    if " ".join(str(entry.get("cmd", "")).split()) != declared["cmd"]:
        return "its command is not the one dvc.yaml declares"
    if not isinstance(entry.get("params", {}), dict):
        return "its params are not a mapping"
    for kind in ("deps", "outs"):
        files = entry.get(kind, [])  # a stage without deps (ingest) has no such key
        if not isinstance(files, list) or not all(isinstance(f, dict) and set(f) <= _FILE_KEYS for f in files):
            return f"its {kind} are not a list of files"
        if sorted(str(f.get("path")) for f in files) != declared[kind]:
            return f"its {kind} are not exactly the {kind} dvc.yaml declares ({', '.join(declared[kind])})"
        for f in files:
            if f.get("hash") != "md5" or not isinstance(f.get("md5"), str) or not _MD5.fullmatch(f["md5"]) or \
                    not all(isinstance(f.get(k, 0), int) and f.get(k, 0) >= 0 for k in ("size", "nfiles")):
                return f"{kind[:-1]} {f.get('path')}: not a well-formed md5 hash, size and file count"
    return None


def adopt_lock_entries(root: str | Path, entries: dict[str, dict]) -> None:
    """Write these stages' entries into dvc.lock as another workspace recorded them, leaving every
    other entry as it is (round-trip YAML, written whole or not at all): `dvc pull` then brings
    exactly the outputs that workspace pushed."""
    rt = YAML()
    lock_file = Path(root) / "dvc.lock"
    lock = (rt.load(lock_file.read_text(encoding="utf-8")) if lock_file.exists() else None) or {"schema": "2.0"}
    lock.setdefault("stages", {}).update(entries)
    _write_lock(lock_file, rt, lock)


def _write_lock(lock_file: Path, rt: YAML, lock) -> None:
    """dvc.lock whole or not at all, in the round-trip YAML it was read with."""
    text = io.StringIO()
    rt.dump(lock, text)
    atomic_write_text(lock_file, text.getvalue())


def restore_lock(root: str | Path, previous: str | None) -> None:
    lock_file = Path(root) / "dvc.lock"
    if previous is None:
        lock_file.unlink(missing_ok=True)
    else:
        atomic_write_text(lock_file, previous)


def in_cache(root: str | Path, dir_hash: str) -> bool:
    """Whether the workspace's DVC cache holds this folder version (`dvc fetch` only warns when the
    remote lacks it)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.cache.local.exists(dir_hash)
