"""Lineage: one record per trained LoRA tying it to the data, checks, negatives, parameters and code.

Records live in lineage/<lora sha256 prefix>.json. `verify` recomputes every hash it can from disk.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import subprocess
from pathlib import Path

import yaml

from scoft.ccub import read_manifest
from scoft.io import pixel_hash, sha256_file, sha256_json, write_json

LINEAGE_DIR = Path("lineage")
PACKAGES = ["scoft-flows", "torch", "diffusers", "transformers", "accelerate", "peft", "lpips", "prefect", "dvc",
            "great_expectations", "boto3"]


def git_commit(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unversioned"
    if out.returncode != 0:
        return "unversioned"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def dvc_out_hashes(root: str | Path = ".") -> dict[str, str]:
    """{path: md5} of every stage output recorded in dvc.lock (DVC's own content hashes)."""
    lock_file = Path(root) / "dvc.lock"
    if not lock_file.is_file():
        return {}
    lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    return {o["path"]: o["md5"] for stage in lock.get("stages", {}).values() for o in stage.get("outs", [])}


def build_record(*, root, ccub_dir, validation_summary: dict, negatives_dir, lora_file, params: dict,
                 metrics: dict, flow_run_id: str | None, culture: str | None = None) -> dict:
    """Paths are relative to the workspace `root` (the folder with dvc.yaml). `culture`: the culture a
    per-culture LoRA was trained on (None: a joint LoRA of every culture)."""
    root = Path(root)
    outs = dvc_out_hashes(root)
    return {
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "culture": culture,
        "git_commit": git_commit(root),
        "ccub": {"path": str(ccub_dir), "dvc_hash": outs.get(str(ccub_dir))},
        "validation": {"success": validation_summary["success"], "statistics": validation_summary["statistics"]},
        "negatives": {"path": str(negatives_dir), "dvc_hash": outs.get(str(negatives_dir))},
        "params": params,
        "packages": package_versions(),
        "lora": {"path": str(lora_file), "sha256": sha256_file(root / lora_file)},
        "metrics": metrics,
        "prefect_flow_run_id": flow_run_id,
    }


def record_key(record: dict) -> str:
    """What makes a record: the LoRA and the data and negatives it came from."""
    return sha256_json([record["lora"]["sha256"], record["ccub"]["dvc_hash"], record["negatives"]["dvc_hash"]])[:16]


def save_record(record: dict, root: str | Path = ".") -> Path:
    """Write the record under its key; an existing record for the same LoRA and data is kept, so
    a rerun that changed nothing keeps the record of the run that made the LoRA."""
    path = Path(root) / LINEAGE_DIR / f"{record_key(record)}.json"
    if not path.exists():
        write_json(path, record)
    return path


def latest_record(root: str | Path = ".", culture: str | None = None) -> tuple[Path, dict]:
    """The newest record (of one culture's LoRA, when given)."""
    folder = Path(root) / LINEAGE_DIR
    records = [(p, json.loads(p.read_text(encoding="utf-8"))) for p in folder.glob("*.json")]
    records = [(p, r) for p, r in records if culture is None or r.get("culture") == culture]
    if not records:
        which = f" of culture {culture}" if culture else ""
        raise FileNotFoundError(f"no lineage record{which} in {folder}/ (run `scoft run` first)")
    return max(records, key=lambda pr: pr[1]["created_at"])


def verify(record: dict, root: str | Path = ".") -> list[str]:
    """Recompute the LoRA hash and every CCUB image hash; return the mismatches (empty when intact)."""
    root = Path(root)
    problems = []
    lora = root / record["lora"]["path"]
    if not lora.is_file():
        problems.append(f"{lora}: missing")
    elif sha256_file(lora) != record["lora"]["sha256"]:
        problems.append(f"{lora}: sha256 differs from the record")
    ccub_dir = root / record["ccub"]["path"]
    from PIL import Image

    for r in read_manifest(ccub_dir):
        path = ccub_dir / r.file
        if not path.is_file():
            problems.append(f"{path}: missing (record {r.id})")
            continue
        with Image.open(path) as im:
            if pixel_hash(im) != r.sha256:
                problems.append(f"{path}: pixels differ from the manifest (record {r.id})")
    current = dvc_out_hashes(root).get(record["ccub"]["path"])
    if current != record["ccub"]["dvc_hash"]:
        problems.append(f"{ccub_dir}: dvc.lock hash {current} differs from the record's {record['ccub']['dvc_hash']}")
    return problems
