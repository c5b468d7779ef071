"""The model registry: which LoRA is in production for each culture, and the history of how it got there.

registry/<CULTURE>.json holds the pointer and its history (small text, for git); the production LoRAs
themselves are copied under registry/loras/<CULTURE>/<sha256 prefix>/, a folder `scoft models` tracks
with `dvc add` (registry/loras.dvc), so `dvc push` puts them on the DVC remote where every worker sees
them and `dvc pull registry/loras.dvc` brings them back. Every write is atomic (temporary file, then
rename): a crash leaves the previous pointer whole. Writers take the registry's lock (registry/.lock,
flock) for each read-modify-write, so concurrent promotions never lose one another's history, and
`transaction` makes a change and what follows it (tracking with DVC) one step: whole or not at all.
Every load of a production LoRA checks it against the registry's sha256 (`production_lora`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
import threading
from pathlib import Path

from scoft.config import is_alpha3
from scoft.io import _as_created, atomic_dir, atomic_write_bytes, sha256_file, sha256_json, write_json
from scoft.paths import LORA_FILE
from scoft.text import checked

REGISTRY_DIR = Path("registry")
LORAS_DIR = REGISTRY_DIR / "loras"


CHAIN = "prev_sha256"  # each event's link: the sha256 of the event before it (None for the first)
MAX_REASON, MAX_BY = 2000, 200  # characters: the history is read in a terminal and sent in Prefect events


class RegistryError(ValueError):
    """A registry operation that cannot be done as asked (no such record, nothing to roll back to, a
    damaged file, a LoRA that does not match its hash)."""


def _file(root: Path, culture: str) -> Path:
    if not (isinstance(culture, str) and is_alpha3(culture)):
        raise RegistryError(f"{culture!r} is not a culture (an ISO 3166-1 alpha-3 code such as KOR)")
    return root / REGISTRY_DIR / f"{culture}.json"


def read(root: str | Path, culture: str) -> dict:
    """The culture's registry entry: {"culture", "production": event or None, "history": [events]}; a
    damaged file is a RegistryError naming it and the problem."""
    path = _file(Path(root), culture)
    if not path.is_file():
        return {"culture": culture, "production": None, "history": []}
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RegistryError(f"{path}: damaged, not JSON ({str(e)[:200]}); restore it from git") from e
    problem = _shape_problem(entry, culture)
    if problem:
        raise RegistryError(f"{path}: damaged, {problem}; restore it from git")
    return entry


def _shape_problem(entry, culture: str) -> str | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("history"), list):
        return "no history list"
    if entry.get("culture") != culture:
        return f"it names culture {str(entry.get('culture'))[:20]!r}"
    events = [*entry["history"], *([entry["production"]] if entry.get("production") is not None else [])]
    for i, event in enumerate(events):
        if not isinstance(event, dict) or not all(isinstance(event.get(k), str) for k in ("action", "at",
                                                                                        "lora_sha256")):
            return f"event {i} lacks its action, time or LoRA hash"
    return None


def cultures(root: str | Path) -> list[str]:
    return sorted(p.stem for p in (Path(root) / REGISTRY_DIR).glob("*.json") if is_alpha3(p.stem))


def production_lora(root: str | Path, culture: str, verify_key: str | None = None) -> Path | None:
    """The folder of the culture's production LoRA (diffusers format), or None when it has none; checked
    first: inside registry/loras/<culture>/, and its file's sha256 the registry's. A LoRA swapped in
    the folder (another culture's, a tampered one) is refused by name, never loaded."""
    root = Path(root)
    current = read(root, culture)["production"]
    if current is None:
        return None
    folder = (root / current["lora_dir"]).resolve()
    if not folder.is_relative_to((root / LORAS_DIR / culture).resolve()):
        raise RegistryError(f"{culture}: production's lora_dir {current['lora_dir']!r} is outside "
                            f"{LORAS_DIR / culture}: refusing to load it")
    if not (folder / LORA_FILE).is_file():
        raise RegistryError(f"{culture}: the production LoRA {current['lora_dir']} is not here: "
                            "run `dvc pull registry/loras.dvc`")
    actual = sha256_file(folder / LORA_FILE)
    if actual != current["lora_sha256"]:
        raise RegistryError(f"{culture}: {current['lora_dir']}/{LORA_FILE} has sha256 {actual[:16]}, the registry "
                            f"says {current['lora_sha256'][:16]}: refusing to load it (replaced or damaged)")
    if verify_key is not None:  # lineage.verify_key: a LoRA rewritten together with its hashes fails here
        from scoft.signing import signature_problem

        if problem := signature_problem(folder, verify_key, root):
            raise RegistryError(f"{culture}: refusing to load the production LoRA: {problem}")
    return folder


_held = threading.local()


@contextlib.contextmanager
def locked(root: str | Path):
    """The registry's write lock (registry/.lock), re-entrant within a thread: two processes promoting
    at once each keep the other's history."""
    if getattr(_held, "depth", 0):
        _held.depth += 1
        try:
            yield
        finally:
            _held.depth -= 1
        return
    path = Path(root) / REGISTRY_DIR / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _held.depth = 1
        yield
    finally:
        _held.depth = 0
        os.close(fd)


@contextlib.contextmanager
def transaction(root: str | Path, culture: str):
    """A registry change and what must follow it (tracking the LoRAs with DVC) as one step: under the
    lock, and when the block fails the culture's registry file is put back as it was."""
    path = _file(Path(root), culture)
    with locked(root):
        before = path.read_bytes() if path.is_file() else None
        try:
            yield
        except BaseException:
            if before is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write_bytes(path, before)
            raise


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _record(root: Path, culture: str, event: dict) -> dict:
    """Append the event to the culture's history, chained to the one before it by hash (an event edited
    or deleted later breaks the chain: `history_problems`)."""
    with locked(root):
        entry = read(root, culture)
        history = entry["history"]
        event = {**event, CHAIN: sha256_json(history[-1]) if history else None}
        history.append(event)
        if event["action"] in ("promote", "rollback"):
            entry["production"] = event
        write_json(_file(root, culture), entry)  # atomic: temporary file, then rename
    return entry


def _checked_event_text(by: str, reason: str) -> None:
    try:
        checked("by", by, MAX_BY)
        checked("reason", reason, MAX_REASON)
    except ValueError as e:
        raise RegistryError(str(e)) from e


def promote(root: str | Path, culture: str, lora_dir: str | Path, lineage_key: str, by: str, reason: str,
            decision: dict | None = None) -> dict:
    """Make the LoRA in lora_dir the culture's production model: copy it into the registry under its
    hash and point to it; returns the new entry. `by`: the rule set or the person; `decision`: the gate's."""
    root = Path(root)
    _file(root, culture)
    _checked_event_text(by, reason)
    if not lineage_key:
        raise RegistryError(f"{culture}: a LoRA without a lineage record never reaches production (judge it "
                            "first: `scoft run`)")
    source = Path(lora_dir) / LORA_FILE
    if not source.is_file():
        raise RegistryError(f"{culture}: no LoRA file in {lora_dir}")
    digest = sha256_file(source)
    target = LORAS_DIR / culture / digest[:16]
    if not (root / target / LORA_FILE).is_file() or sha256_file(root / target / LORA_FILE) != digest:
        with atomic_dir(root / target) as tmp:
            shutil.copyfile(source, tmp / LORA_FILE)  # not copy2: a 0600 source mode must not carry over
            _as_created(tmp / LORA_FILE, 0o666)
    event = {"action": "promote", "at": _now(), "lora_sha256": digest, "lora_dir": str(target),
             "lineage": lineage_key, "by": by, "reason": reason}
    if decision is not None:
        event["decision"] = decision
    return _record(root, culture, event)


def reject(root: str | Path, culture: str, lora_sha256: str, lineage_key: str, by: str, reason: str,
           decision: dict | None = None) -> dict:
    """Record that a candidate was refused; production is unchanged."""
    return _candidate_event("reject", root, culture, lora_sha256, lineage_key, by, reason, decision)


def await_review(root: str | Path, culture: str, lora_sha256: str, lineage_key: str, by: str, reason: str,
                 decision: dict | None = None) -> dict:
    """Record that a candidate passed the rules and waits for people (insiders' review campaign, or one
    person's approval); production is unchanged until they decide."""
    return _candidate_event("await", root, culture, lora_sha256, lineage_key, by, reason, decision)


def awaiting(root: str | Path, culture: str, lora_sha256: str) -> dict | None:
    """The 'await' event of a candidate still waiting for people (insiders or an approval): None when
    it never waited or was promoted or rejected since."""
    about = [e for e in read(root, culture)["history"] if e["lora_sha256"] == lora_sha256]
    return about[-1] if about and about[-1]["action"] == "await" else None


def _candidate_event(action: str, root, culture: str, lora_sha256: str, lineage_key: str, by: str, reason: str,
                     decision: dict | None) -> dict:
    """A history event about a candidate that leaves production as it is."""
    _checked_event_text(by, reason)
    event = {"action": action, "at": _now(), "lora_sha256": lora_sha256, "lineage": lineage_key, "by": by,
             "reason": reason}
    if decision is not None:
        event["decision"] = decision
    return _record(Path(root), culture, event)


def rollback(root: str | Path, culture: str, by: str, reason: str) -> dict:
    """Production goes back to the LoRA that was production before the current one came, walking back
    through production's history: promote A, B, C; rollback gives B, a second rollback A."""
    root = Path(root)
    _checked_event_text(by, reason)
    with locked(root):
        entry = read(root, culture)
        if entry["production"] is None:
            raise RegistryError(f"{culture}: no production LoRA to roll back")
        line = production_line(entry["history"])
        if len(line) < 2:
            raise RegistryError(f"{culture}: production has had no earlier LoRA to roll back to")
        previous = line[-2]
        if not (root / previous["lora_dir"] / LORA_FILE).is_file():
            raise RegistryError(f"{culture}: the previous LoRA {previous['lora_dir']} is not here: "
                                "run `dvc pull registry/loras.dvc` first")
        event = {**{k: previous[k] for k in ("lora_sha256", "lora_dir", "lineage")}, "action": "rollback",
                 "at": _now(), "by": by, "reason": reason, "replaced": entry["production"]["lora_sha256"]}
        return _record(root, culture, event)


def production_line(history: list[dict]) -> list[dict]:
    """Production's line as the history leaves it: each promotion adds to it, each rollback takes the
    latest off (its event names the one under it, which is production again)."""
    line: list[dict] = []
    for event in history:
        if event["action"] == "promote":
            line.append(event)
        elif event["action"] == "rollback" and line:
            line.pop()
    return line


def history_problems(root: str | Path, culture: str) -> list[str]:
    """Whether the culture's history is as it was written: every event chained to the one before it (an
    edited reason or `by`, a deleted or reordered event breaks a link), and production the last event
    that set it. The newest event has no successor to vouch for it: a signed lineage record does."""
    path = f"{REGISTRY_DIR}/{culture}.json"
    try:
        entry = read(root, culture)
    except RegistryError as e:
        return [f"registry: {e}"]
    history, problems = entry["history"], []
    for i, event in enumerate(history):
        if event.get(CHAIN, "missing") != (sha256_json(history[i - 1]) if i else None):
            before = f"event {i - 1} was edited, or one was deleted or inserted there" if i else \
                "the first event is not the first written (earlier events were deleted)"
            problems.append(f"registry: {path}: event {i} ({event['action']} at {event['at']}) does not chain to the "
                            f"one before it: {before}")
    setters = [e for e in history if e["action"] in ("promote", "rollback")]
    if entry["production"] != (setters[-1] if setters else None):
        problems.append(f"registry: {path}: production is not the last promotion or rollback of its history")
    return problems
