"""Lineage: one record per trained LoRA tying it to the data, checks, negatives, parameters and code.

Records live in lineage/<key>.json. A record holds the sha256 of every file of the chain that made its
LoRA (CCUB manifests and images, the validation result, the negatives index and images, the LoRA, and
the promotion decision once judged) and the params the stages used; `verify` recomputes all of them
from disk and names each link that no longer matches. `diff` compares two records.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import re
import subprocess
from pathlib import Path

import yaml

from scoft.ccub import CULTURES_DIR, HELDOUT_MANIFEST, MANIFEST, TRAINING_DIR, read_heldout, read_manifest
from scoft.io import pixel_hash, sha256_file, sha256_json, write_json
from scoft.paths import LORA_FILE, PROMOTION_DIR, VALIDATION_DIR
from scoft.text import visible

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


def chain_files(root: str | Path, ccub_dir: str | Path, negatives_dir: str | Path,
                culture: str | None) -> dict[str, dict[str, str]]:
    """{link: {path: sha256}} of the files a culture's LoRA came from (every culture's for a joint
    LoRA): the CCUB manifests and the images of its records and of the held-out references the
    evaluation used, the validation result, and the negatives' index and images. Paths are relative
    to the workspace `root`."""
    root, ccub, negatives = Path(root), Path(ccub_dir), Path(negatives_dir)
    manifests = [ccub / MANIFEST, ccub / HELDOUT_MANIFEST]
    if culture:
        manifests += [ccub / CULTURES_DIR / f"{culture}.jsonl", ccub / TRAINING_DIR / f"{culture}.jsonl"]
    records = {r.file: r for r in [*read_manifest(root / ccub, culture), *read_heldout(root / ccub)]}
    validation = [VALIDATION_DIR / "summary.json", VALIDATION_DIR / "gx_results.json"]
    if culture:
        validation += [VALIDATION_DIR / view / f"{culture}.json" for view in (CULTURES_DIR, TRAINING_DIR)]

    def hashed(paths) -> dict[str, str]:
        return {str(p): sha256_file(root / p) for p in sorted(paths, key=str)}

    return {
        "ccub manifest": hashed(manifests),
        "ccub images": hashed(ccub / file for file in records),
        "validation": hashed(validation),
        "negatives": hashed(p.relative_to(root) for p in (root / negatives).rglob("*") if p.is_file()),
    }


def build_record(*, root, ccub_dir, validation_summary: dict, negatives_dir, lora_file, params: dict,
                 metrics: dict, flow_run_id: str | None, culture: str | None = None, joint: bool = False,
                 evaluation: dict[str, list[str]] | None = None, run_version: str | None = None) -> dict:
    """Paths are relative to the workspace `root` (the folder with dvc.yaml). `culture`: the culture a
    per-culture LoRA was trained on (None: a joint LoRA of every culture); with `joint`, the culture the
    joint LoRA serves, whose chain is then every culture's data."""
    root = Path(root)
    outs = dvc_out_hashes(root)
    scope = None if joint else culture
    return {
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "culture": culture,
        **({"joint": True} if joint else {}),
        "git_commit": git_commit(root),
        "ccub": {"path": str(ccub_dir), "dvc_hash": outs.get(str(ccub_dir)),
                 "records": sorted(r.id for r in read_manifest(root / ccub_dir, scope)),
                 # the version the flow run was started for (a pinned run's ccub_version), if any
                 **({"run_version": run_version} if run_version else {})},
        "validation": {"success": validation_summary["success"], "statistics": validation_summary["statistics"]},
        "negatives": {"path": str(negatives_dir), "dvc_hash": outs.get(str(negatives_dir)),
                      # the joint LoRA's: every culture's negatives folder, each a stage output of its own
                      **({"dvc_hashes": {p: h for p, h in outs.items() if p.startswith(f"{negatives_dir}/")}}
                         if joint else {})},
        "params": params,
        "packages": package_versions(),
        "lora": {"path": str(lora_file), "sha256": sha256_file(root / lora_file)},
        "files": {**chain_files(root, ccub_dir, negatives_dir, scope),
                  **{link: _hashed(root, paths) for link, paths in (evaluation or {}).items()}},
        "metrics": metrics,
        "prefect_flow_run_id": flow_run_id,
    }


def _hashed(root: Path, paths) -> dict[str, str]:
    """{path: sha256} of these files, and of every file under these folders (the base model's)."""
    files = []
    for p in map(Path, paths):
        files += sorted(q.relative_to(root) for q in (root / p).rglob("*") if q.is_file()) if (root / p).is_dir() \
            else [p]
    return {str(p): sha256_file(root / p) for p in sorted(files, key=str)}


SELF = "record_sha256"


def _seal_problems(record: dict) -> list[str]:
    """A record whose fields no longer hash to its seal, or without one: every record is written sealed,
    so a missing seal means one was edited and its seal taken off."""
    if SELF not in record:
        return ["record: not sealed (its record_sha256 is missing): edited after it was written"]
    if sealed(record)[SELF] != record[SELF]:
        return ["record: its fields were changed after it was written (record_sha256 differs)"]
    return []


def sealed(record: dict) -> dict:
    """The record with the hash of all its other fields: a field edited afterwards (metrics, decision,
    commit, record ids) no longer matches it."""
    body = {k: v for k, v in record.items() if k != SELF}
    return {**body, SELF: sha256_json(body)}


def rewrite_record(path: str | Path, record: dict, root: str | Path, signing_key: str | None) -> None:
    """Write a lineage record again, resealed and, where lineage.signing_key is set, signed again: a
    record changed after its signing (a verdict, an insiders' review) never keeps a stale signature."""
    write_json(path, sealed(record))
    if signing_key:
        from scoft.signing import sign

        sign(path, signing_key, root)


def add_promotion(record: dict, decision: dict, root: str | Path = ".") -> dict:
    """The record with its promotion verdict, and the decision file's hash as the chain's last link."""
    path = PROMOTION_DIR / f"{record['culture']}.json"
    files = {**record.get("files", {}), "promotion": {str(path): sha256_file(Path(root) / path)}}
    verdict = {k: decision[k] for k in ("promote", "rules", "evaluation_key", "review", "thresholds") if k in decision}
    return sealed({**record, "promotion": verdict, "files": files})


def record_key(record: dict) -> str:
    """What makes a record: the LoRA and the data and negatives it came from (and the culture it serves,
    for the joint LoRA, which serves every culture)."""
    serves = [record["culture"]] if record.get("joint") else []
    return sha256_json([record["lora"]["sha256"], record["ccub"]["dvc_hash"], record["negatives"]["dvc_hash"],
                        *serves])[:16]


def data_scope(record: dict) -> str | None:
    """The culture whose records made the record's LoRA; None: every culture's (a joint LoRA)."""
    return None if record.get("joint") else record.get("culture")


def save_record(record: dict, root: str | Path = ".") -> Path:
    """Write the record under its key; an existing record for the same LoRA and data is kept, so
    a rerun that changed nothing keeps the record of the run that made the LoRA."""
    path = Path(root) / LINEAGE_DIR / f"{record_key(record)}.json"
    if not path.exists():
        write_json(path, sealed(record))
    return path


class BadRecord(ValueError):
    """A lineage record that cannot be read as one (not JSON, missing fields, crafted types)."""


def read_record(key_or_path: str, root: str | Path = ".") -> dict:
    """A record by its key (lineage/KEY.json) or its file path."""
    path = Path(key_or_path)
    if not path.is_file():
        path = Path(root) / LINEAGE_DIR / f"{key_or_path}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no lineage record {visible(key_or_path, 200)!r} (neither a file nor a key in "
                                f"{LINEAGE_DIR}/)")
    return _parsed(path)


def _parsed(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BadRecord(f"{visible(path, 300)}: not a lineage record (not JSON: {visible(e, 200)})") from e
    shapes = {"created_at": str, "ccub": dict, "lora": dict, "params": dict, "metrics": dict}
    wrong = [k for k, kind in shapes.items() if not isinstance(record.get(k) if isinstance(record, dict) else None,
                                                                kind)]
    if wrong:
        raise BadRecord(f"{visible(path, 300)}: not a lineage record (missing or malformed: {', '.join(wrong)})")
    return record


FUTURE_SLACK = dt.timedelta(minutes=5)  # clocks of workers differ a little, never by more


def latest_record(root: str | Path = ".", culture: str | None = None) -> tuple[Path, dict]:
    """The newest record (of one culture's LoRA, when given). A record dated in the future, or one that
    is not a record, never becomes "latest" (verify_all names them)."""
    folder = Path(root) / LINEAGE_DIR
    records = []
    for p in folder.glob("*.json"):
        try:
            records.append((p, _parsed(p)))
        except BadRecord:
            continue
    now = dt.datetime.now(dt.UTC) + FUTURE_SLACK
    records = [(p, r) for p, r in records if (culture is None or r.get("culture") == culture)
               and _when(r) is not None and _when(r) <= now]
    if not records:
        which = f" of culture {culture}" if culture else ""
        raise FileNotFoundError(f"no lineage record{which} in {folder}/ (run `scoft run` first)")
    return max(records, key=lambda pr: _when(pr[1]))


def _when(record: dict) -> dt.datetime | None:
    try:
        when = dt.datetime.fromisoformat(record["created_at"])
    except (KeyError, TypeError, ValueError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def current_records(root: str | Path, cultures: list[str]) -> list[dict]:
    """What an auditor checks by default: each culture's latest record and each production LoRA's
    record (the registry's), once each, with the roles it plays; records dated in the future and files
    that are not records are listed with their problem."""
    from scoft import registry

    root, found = Path(root), {}
    for culture in cultures:
        try:
            path, _ = latest_record(root, culture)
            found.setdefault(path, {"path": path, "culture": culture, "roles": []})["roles"].append("latest")
        except FileNotFoundError:
            pass
        try:
            production = registry.read(root, culture)["production"]
        except registry.RegistryError as e:
            found[Path(f"registry/{culture}.json")] = {"path": None, "culture": culture, "roles": ["production"],
                                                       "problem": str(e)}
            continue
        if production is not None and not is_record_key(production.get("lineage")):
            found[Path(f"registry/{culture}.json")] = {
                "path": None, "culture": culture, "roles": ["production"],
                "problem": f"registry: production LoRA {production['lora_sha256'][:16]} names no lineage record "
                           f"({visible(str(production.get('lineage')), 40)!r}): it reached production unrecorded"}
        elif production is not None:
            path = root / LINEAGE_DIR / f"{production['lineage']}.json"
            found.setdefault(path, {"path": path, "culture": culture, "roles": []})["roles"].append("production")
    now = dt.datetime.now(dt.UTC) + FUTURE_SLACK
    for path in sorted((root / LINEAGE_DIR).glob("*.json")):
        try:
            when = _when(_parsed(path))
        except BadRecord as e:
            found.setdefault(path, {"path": path, "culture": None, "roles": [], "problem": str(e)})
            continue
        if when is None or when > now:
            found.setdefault(path, {"path": path, "culture": None, "roles": [],
                                    "problem": "created_at is missing or in the future: never taken as latest"})
    return list(found.values())


LINEAGE_KEY = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"  # what names a record under lineage/ (no path in it)


def is_record_key(value) -> bool:
    """A name that can be a record's key (record_key makes 16 hex digits): not empty, no path in it."""
    return isinstance(value, str) and re.fullmatch(LINEAGE_KEY, value) is not None


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"train.lr": 0.002, ...}: the leaves of nested dicts by dotted key."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _params_used(root: Path, record: dict) -> dict[str, object]:
    """The params values dvc.lock says the record's stages ran with, by dotted key."""
    if not (root / "dvc.lock").is_file():
        return {}
    # As DVC reads it: YAML 1.2, where `no` (train.mixed_precision) is the string, not false.
    from ruamel.yaml import YAML

    lock = YAML(typ="safe").load((root / "dvc.lock").read_text(encoding="utf-8"))
    used = {}
    own_negatives = f"negatives@{record.get('culture')}"  # a joint LoRA's: its culture's, as recorded
    stages = [s for s in _chain_stages(record)[1:] if not s.startswith("negatives@") or s == own_negatives]
    for stage in stages:
        for name, value in ((lock or {}).get("stages", {}).get(stage, {}).get("params", {}).get("params.yaml", {})
                            .items()):
            used.update(flatten(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return used


def _chain_stages(record: dict) -> list[str]:
    """The dvc.yaml stages whose outputs made the record's LoRA and its verdict (ingest aside: it always
    reruns, and its output is the record's CCUB version, checked on its own)."""
    culture = record.get("culture")
    if record.get("joint"):
        cultures = record.get("params", {}).get("validate", {}).get("cultures") or [culture]
        return ["validate", *(f"negatives@{c}" for c in cultures), "train_joint", f"evaluate_joint@{culture}"]
    return ["validate", *(f"{s}@{culture}" for s in ("negatives", "train", "evaluate"))]


def _stage_problems(record: dict, root: Path) -> list[str]:
    """DVC's own check of the chain's stages: each output in the workspace is the one dvc.lock records,
    and each param in params.yaml the value dvc.lock says the stage ran with (an edited dvc.lock, or an
    output replaced after its stage ran, shows here)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    dvc_yaml = Path(root).resolve() / "dvc.yaml"
    try:  # by the workspace's dvc.yaml path: a bare stage name is looked up in the current folder's
        with Repo(str(root)) as repo:
            status = repo.status(targets=[f"{dvc_yaml}:{stage}" for stage in _chain_stages(record)])
    except DvcException as e:
        return [f"dvc.lock: the record's stages cannot be checked ({visible(e, 200)})"]
    problems = []
    for target, changes in status.items():
        stage = target.rpartition(":")[2]
        for change in changes:
            if not isinstance(change, dict):
                continue
            for path, what in change.get("changed outs", {}).items():
                problems.append(f"dvc.lock: {stage}: output {path} {what} (not what dvc.lock records)")
            params = change.get("changed deps", {}).get("params.yaml", {})
            for key, what in (params.items() if isinstance(params, dict) else []):
                problems.append(f"dvc.lock: {stage}: param {key} {what} (params.yaml differs from what the stage "
                                "ran with)")
    return problems


def _version_problems(record: dict, root: Path) -> list[str]:
    """A record never contradicts itself: its record list and its checks' count are those of its CCUB
    version (the workspace holds it when this runs), and the flow run that made it was started for
    that version. A run that trained on a version an ingest brought in meanwhile said one version and
    counted another."""
    ccub, version, problems = record["ccub"], record["ccub"].get("dvc_hash"), []
    try:
        held = read_manifest(root / ccub["path"])
    except (OSError, ValueError, TypeError):
        return []  # a damaged manifest: its hash check names it
    if "records" in ccub:
        ids = sorted(r.id for r in held if data_scope(record) in (None, r.culture))
        if sorted(ccub["records"]) != ids:
            problems.append(f"ccub: the record lists {len(ccub['records'])} records, version {version} holds "
                            f"{len(ids)} of its culture: not the same records")
    counted = record.get("validation", {}).get("statistics", {}).get("records")
    if counted is not None and counted != len(held):
        problems.append(f"validation: the record's checks counted {counted} records, version {version} has "
                        f"{len(held)}: they checked another version")
    started_for = ccub.get("run_version")
    if started_for and started_for != version:
        problems.append(f"ccub: its flow run {record.get('prefect_flow_run_id')} was started for version "
                        f"{started_for}, the record says {version}")
    return problems


def verify(record: dict, root: str | Path = ".") -> list[str]:
    """Recompute every hash of the record's chain and compare its params with the ones the stages
    used; return one line per mismatch, naming the link and the file or key (empty when intact)."""
    root = Path(root)
    problems = _seal_problems(record)
    lora = root / record["lora"]["path"]
    if not lora.is_file():
        problems.append(f"lora: {record['lora']['path']}: missing")
    elif sha256_file(lora) != record["lora"]["sha256"]:
        problems.append(f"lora: {record['lora']['path']}: sha256 differs from the record")
    for link, files in record.get("files", {}).items():
        for path, digest in files.items():
            if not (root / path).is_file():
                problems.append(f"{link}: {path}: missing")
            elif sha256_file(root / path) != digest:
                problems.append(f"{link}: {path}: sha256 differs from the record")
    negatives = record.get("negatives", {}).get("path")
    listed = set(record.get("files", {}).get("negatives", {}))
    if negatives and (root / negatives).is_dir():
        for extra in sorted(str(p.relative_to(root)) for p in (root / negatives).rglob("*") if p.is_file()):
            if extra not in listed:
                problems.append(f"negatives: {extra}: not in the record (a file added since)")
    problems += _registry_problems(record, root)
    problems += _pixel_problems(record, root)
    current = dvc_out_hashes(root).get(record["ccub"]["path"])
    if current != record["ccub"]["dvc_hash"]:
        problems.append(f"ccub: dvc.lock hash {current} of {record['ccub']['path']} differs from the record's "
                        f"{record['ccub']['dvc_hash']}")
    problems += _stage_problems(record, root)
    problems += _version_problems(record, root)
    recorded = flatten(record["params"])
    for key, value in _params_used(root, record).items():
        if key in recorded and recorded[key] != value:
            problems.append(f"params: {key} is {value!r} in dvc.lock (what the stages used), {recorded[key]!r} in "
                            "the record")
    return problems


def superseded(record: dict, root: str | Path = ".") -> bool:
    """Whether the workspace holds other data than the record's (a later retrain of the culture): its
    chain's files are then those of the later run, and only its LoRA and its own fields are here."""
    return dvc_out_hashes(Path(root)).get(record["ccub"]["path"]) != record["ccub"]["dvc_hash"]


def verify_superseded(record: dict, root: str | Path = ".") -> list[str]:
    """What can be checked of a production LoRA's record once the workspace moved on: its own fields,
    the registry's copy of its LoRA, and the registry's promotion of it."""
    from scoft import registry

    root, problems = Path(root), _seal_problems(record)
    try:
        folder = registry.production_lora(root, record["culture"])
        if folder is None or sha256_file(folder / LORA_FILE) != record["lora"]["sha256"]:
            problems.append(f"lora: production's LoRA is not the record's {record['lora']['sha256'][:16]}")
    except registry.RegistryError as e:
        problems.append(f"lora: {e}")
    return problems + _registry_problems(record, root)


def _registry_problems(record: dict, root: Path) -> list[str]:
    """A record that says its LoRA was promoted has that promotion in the registry's history."""
    from scoft import registry

    promotion = record.get("promotion") or {}
    if not promotion.get("promote") or not record.get("culture"):
        return []
    try:
        history = registry.read(root, record["culture"])["history"]
    except registry.RegistryError as e:
        return [f"registry: {e}"]
    if not any(e["action"] == "promote" and e["lora_sha256"] == record["lora"]["sha256"] for e in history):
        return [f"registry: registry/{record['culture']}.json has no promotion of LoRA {record['lora']['sha256'][:16]}"]
    return []


def _pixel_problems(record: dict, root: Path) -> list[str]:
    """Every CCUB image of the manifest decodes to the pixels the manifest holds (the check that
    needs no record of its own: it also covers records made before files were recorded)."""
    from PIL import Image, UnidentifiedImageError

    ccub_dir = root / record["ccub"]["path"]
    problems = []
    try:
        records = read_manifest(ccub_dir, data_scope(record))
    except (OSError, ValueError, TypeError) as e:  # a damaged manifest: its hash check names it too
        return [f"ccub manifest: {record['ccub']['path']}: unreadable ({type(e).__name__}: {e})"]
    for r in records:
        path = ccub_dir / r.file
        if not path.is_file():
            problems.append(f"ccub images: {path.relative_to(root)}: missing (record {r.id})")
            continue
        try:
            with Image.open(path) as im:
                same = pixel_hash(im) == r.sha256
        except (OSError, UnidentifiedImageError, SyntaxError):
            same = False
        if not same:
            problems.append(f"ccub images: {path.relative_to(root)}: pixels differ from the manifest (record {r.id})")
    return problems


def diff(a: dict, b: dict) -> dict:
    """What changed from record `a` to record `b`: CCUB records added and removed, params changed
    (dotted keys), and every numeric metric mean side by side."""
    records_a, records_b = set(a["ccub"].get("records", [])), set(b["ccub"].get("records", []))
    params_a, params_b = flatten(a["params"]), flatten(b["params"])
    params = {k: [params_a.get(k), params_b.get(k)] for k in sorted(params_a.keys() | params_b.keys())
              if params_a.get(k) != params_b.get(k)}
    means_a, means_b = headline_metrics(a["metrics"]), headline_metrics(b["metrics"])
    metrics = {k: [means_a.get(k), means_b.get(k)] for k in sorted(means_a.keys() | means_b.keys())}
    return {"records_added": sorted(records_b - records_a), "records_removed": sorted(records_a - records_b),
            "params_changed": params, "metrics": metrics,
            "data_version": [a["ccub"]["dvc_hash"], b["ccub"]["dvc_hash"]],
            "lora_sha256": [a["lora"]["sha256"], b["lora"]["sha256"]]}


def headline_metrics(metrics: dict) -> dict[str, float]:
    """The evaluation's numbers an auditor compares: every mean over all prompts (not per culture
    again) and the generic prompts' entropy, by dotted name."""
    return {k.removesuffix(".mean"): v for k, v in flatten(metrics).items()
            if isinstance(v, int | float) and "per_culture" not in k and (k.endswith(".mean") or k.endswith("_bits"))}


def params_changed_from_defaults(params: dict) -> dict[str, tuple]:
    """{dotted key: (value, the code's default)} for every recorded param that differs from the
    default in scoft/config.py (which params.yaml ships with)."""
    from scoft.config import Params

    changed = {}
    for section, values in params.items():
        default = Params.model_fields[section].default.model_dump(by_alias=True)
        flat_default = flatten(default, f"{section}.")
        for key, value in flatten(values, f"{section}.").items():
            if flat_default.get(key) != value:
                changed[key] = (value, flat_default.get(key))
    return changed


def lineage_markdown(record: dict, path: str | Path, full_record_link: str | None = None) -> str:
    """A record as an operator or auditor reads it at a glance: data version, checks, code, params
    changed from the defaults, metrics and the promotion decision (the full JSON linked)."""
    stats, promotion = record["validation"]["statistics"], record.get("promotion")
    if promotion is None:
        decision = "not judged yet"
    elif promotion["promote"]:
        decision = "**promoted** to production (every rule passed)"
    else:
        decision = "**rejected**: " + "; ".join(r["rule"] for r in promotion["rules"] if not r["passed"])
    files = record.get("files", {})
    rows = [("LoRA", f"`{record['lora']['sha256'][:16]}` ({record['lora']['path']})"),
            ("CCUB version", f"`{record['ccub']['dvc_hash']}`, {len(record['ccub'].get('records', []))} records"),
            ("checks", f"{stats['successful_expectations']}/{stats['evaluated_expectations']} passed"),
            ("negatives", f"`{record['negatives']['dvc_hash']}`, {len(files.get('negatives', {}))} files"),
            ("code", f"`{record['git_commit']}`"),
            ("packages", ", ".join(f"{k} {record['packages'][k]}" for k in ("torch", "diffusers", "peft")
                                   if k in record["packages"])),
            ("Prefect flow run", f"`{record['prefect_flow_run_id']}`"), ("decision", decision),
            ("files hashed", f"{sum(len(v) for v in files.values())} (`scoft lineage verify` rechecks them)")]
    title = record.get("culture") or "every culture"
    title += " (joint LoRA of every culture)" if record.get("joint") or not record.get("culture") else ""
    lines = [f"# Lineage: {title}", "", "| | |", "|---|---|",
             *(f"| {k} | {v} |" for k, v in rows), "", "## Params that differ from the defaults", ""]
    changed = params_changed_from_defaults(record["params"])
    lines += (["| key | this run | default |", "|---|---|---|",
               *(f"| {k} | {_cell(v)} | {_cell(d)} |" for k, (v, d) in changed.items())] if changed else ["none"])
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|",
              *(f"| {k} | {v:.4g} |" for k, v in headline_metrics(record["metrics"]).items())]
    where = f"[the full record]({full_record_link})" if full_record_link else "the full record"
    lines += ["", f"{where}: `{path}` (`scoft lineage show --json --culture {record.get('culture')}`)"]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    """A value as a markdown table cell: no character of it can end the cell or the code span."""
    return "`" + str(value).replace("`", "'").replace("|", "/").replace("\n", " ") + "`"
