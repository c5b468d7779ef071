"""The model registry: which LoRA is in production for each culture, and the history of how it got there.

registry/<CULTURE>.json holds the pointer and its history (small text, for git); the production LoRAs
themselves are copied under registry/loras/<CULTURE>/<sha256 prefix>/, a folder `scoft models` tracks
with `dvc add` (registry/loras.dvc), so `dvc push` puts them on the DVC remote where every worker sees
them and `dvc pull registry/loras.dvc` brings them back. Every write is atomic (temporary file, then
rename): a crash leaves the previous pointer whole.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

from scoft.io import atomic_dir, sha256_file, write_json
from scoft.paths import LORA_FILE

REGISTRY_DIR = Path("registry")
LORAS_DIR = REGISTRY_DIR / "loras"


class RegistryError(ValueError):
    """A registry operation that cannot be done as asked (no such record, nothing to roll back to)."""


def _file(root: Path, culture: str) -> Path:
    return root / REGISTRY_DIR / f"{culture}.json"


def read(root: str | Path, culture: str) -> dict:
    """The culture's registry entry: {"culture", "production": event or None, "history": [events]}."""
    path = _file(Path(root), culture)
    if not path.is_file():
        return {"culture": culture, "production": None, "history": []}
    return json.loads(path.read_text(encoding="utf-8"))


def cultures(root: str | Path) -> list[str]:
    return sorted(p.stem for p in (Path(root) / REGISTRY_DIR).glob("*.json"))


def production_lora(root: str | Path, culture: str) -> Path | None:
    """The folder of the culture's production LoRA (diffusers format), or None when it has none."""
    current = read(root, culture)["production"]
    return None if current is None else Path(root) / current["lora_dir"]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _record(root: Path, culture: str, event: dict) -> dict:
    entry = read(root, culture)
    entry["history"].append(event)
    if event["action"] in ("promote", "rollback"):
        entry["production"] = event
    write_json(_file(root, culture), entry)  # atomic: temporary file, then rename
    return entry


def promote(root: str | Path, culture: str, lora_dir: str | Path, lineage_key: str, by: str, reason: str,
            decision: dict | None = None) -> dict:
    """Make the LoRA in lora_dir the culture's production model: copy it into the registry under its
    hash and point to it; returns the new entry. `by`: the rule set or the person; `decision`: the gate's."""
    root = Path(root)
    source = Path(lora_dir) / LORA_FILE
    if not source.is_file():
        raise RegistryError(f"{culture}: no LoRA file in {lora_dir}")
    digest = sha256_file(source)
    target = LORAS_DIR / culture / digest[:16]
    if not (root / target / LORA_FILE).is_file():
        with atomic_dir(root / target) as tmp:
            shutil.copy2(source, tmp / LORA_FILE)
    event = {"action": "promote", "at": _now(), "lora_sha256": digest, "lora_dir": str(target),
             "lineage": lineage_key, "by": by, "reason": reason}
    if decision is not None:
        event["decision"] = decision
    return _record(root, culture, event)


def reject(root: str | Path, culture: str, lora_sha256: str, lineage_key: str, by: str, reason: str,
           decision: dict | None = None) -> dict:
    """Record that a candidate was refused; production is unchanged."""
    event = {"action": "reject", "at": _now(), "lora_sha256": lora_sha256, "lineage": lineage_key, "by": by,
             "reason": reason}
    if decision is not None:
        event["decision"] = decision
    return _record(Path(root), culture, event)


def rollback(root: str | Path, culture: str, by: str, reason: str) -> dict:
    """Production goes back to the LoRA that was production before the current one."""
    root = Path(root)
    entry = read(root, culture)
    if entry["production"] is None:
        raise RegistryError(f"{culture}: no production LoRA to roll back")
    productions = [e for e in entry["history"] if e["action"] in ("promote", "rollback")]
    current = entry["production"]["lora_sha256"]
    earlier = [e for e in productions if e["lora_sha256"] != current]
    if not earlier:
        raise RegistryError(f"{culture}: production has had no other LoRA to roll back to")
    previous = earlier[-1]
    if not (root / previous["lora_dir"] / LORA_FILE).is_file():
        raise RegistryError(f"{culture}: the previous LoRA {previous['lora_dir']} is not here: "
                            "run `dvc pull registry/loras.dvc` first")
    event = {**{k: previous[k] for k in ("lora_sha256", "lora_dir", "lineage")}, "action": "rollback",
             "at": _now(), "by": by, "reason": reason, "replaced": current}
    return _record(root, culture, event)
