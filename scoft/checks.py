"""Great Expectations checks on CCUB: bad data stops here, before any GPU time is spent.

Three batches are validated: the manifest joined with facts read from the stored images (one row
per record), and tables of counts per culture and per category. A failure names each failing
record by id and file (or the culture or category). Data Docs (HTML) are built for auditors.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import great_expectations as gx  # noqa: E402
import great_expectations.expectations as gxe  # noqa: E402
import pandas as pd  # noqa: E402
from great_expectations.checkpoint import UpdateDataDocsAction  # noqa: E402
from great_expectations.data_context.types.base import ProgressBarsConfig  # noqa: E402
from PIL import Image  # noqa: E402

from scoft.ccub import CULTURES_DIR, HELDOUT, TRAIN, TRAINING_DIR, Record  # noqa: E402
from scoft.config import ValidateParams  # noqa: E402
from scoft.io import atomic_dir, file_md5s, pixel_hash, sha256_json, write_json  # noqa: E402
from scoft.render import html_text  # noqa: E402

REQUIRED = [
    "id",
    "culture",
    "category",
    "caption",
    "generic_caption",
    "file",
    "sha256",
    "width",
    "height",
    "source_url",
]
ROW_KEYS = ["id", "file"]


def _manifest_suite(p: ValidateParams) -> gx.ExpectationSuite:
    e = [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in REQUIRED]
    e += [gxe.ExpectColumnValueLengthsToBeBetween(column=c, min_value=1)
          for c in ("id", "culture", "category", "generic_caption", "file", "sha256")]
    e += [
        gxe.ExpectColumnValuesToBeBetween(
            column="caption_chars", min_value=p.caption_min_chars, max_value=p.caption_max_chars
        ),
        gxe.ExpectColumnValuesToBeUnique(column="sha256"),  # the same picture twice
        gxe.ExpectColumnValuesToBeInSet(column="culture", value_set=p.cultures),
        gxe.ExpectColumnValuesToBeInSet(column="category", value_set=p.categories),
        gxe.ExpectColumnValuesToBeBetween(column="width", min_value=p.min_side, max_value=p.max_side),
        gxe.ExpectColumnValuesToBeBetween(column="height", min_value=p.min_side, max_value=p.max_side),
        gxe.ExpectColumnValuesToBeBetween(column="aspect", min_value=p.min_aspect, max_value=p.max_aspect),
        gxe.ExpectColumnValuesToMatchRegex(column="source_url", regex=r"^https?://[^\s/]+"),
        # facts read back from the stored files, not from the manifest
        gxe.ExpectColumnValuesToBeInSet(column="decodes", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=["RGB"]),
        gxe.ExpectColumnValuesToBeInSet(column="pixels_match_sha256", value_set=[True]),
    ]
    return gx.ExpectationSuite(name="ccub_manifest", expectations=e)


def _counts_suite(name: str, p: ValidateParams, minimum: int, heldout: bool) -> gx.ExpectationSuite:
    e = [gxe.ExpectTableRowCountToBeBetween(min_value=1),
         gxe.ExpectColumnValuesToBeBetween(column="images", min_value=minimum)]
    if heldout:
        e.append(gxe.ExpectColumnValuesToBeBetween(column="heldout", min_value=p.min_heldout_per_culture))
    return gx.ExpectationSuite(name=name, expectations=e)


def _image_facts(ccub_dir: Path, record: Record) -> dict:
    try:
        with Image.open(ccub_dir / record.file) as im:
            im.load()
            return {"decodes": True, "mode": im.mode, "pixels_match_sha256": pixel_hash(im) == record.sha256}
    except (OSError, SyntaxError, ValueError):
        return {"decodes": False, "mode": None, "pixels_match_sha256": False}


def image_facts(records: list[Record], ccub_dir: Path, cache: Path | None = None) -> list[dict]:
    """What each stored image is (decodes, mode, pixels match the record's sha256), read from the file
    for new and changed records only: the facts of a file whose md5 (DVC's, see scoft.io.file_md5s) and
    record sha256 were checked before are taken from `cache`, as those two hashes pin every fact.
    Re-decoding every image was 84% of a one-row update's CPU at 10,000 records."""
    md5s = file_md5s(ccub_dir) if cache is not None else {}
    keys = [f"{md5s[r.file]}:{r.sha256}" if r.file in md5s else i for i, r in enumerate(records)]
    known = _read_facts(cache)
    todo = [i for i, key in enumerate(keys) if key not in known]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # decoding releases the GIL
        for i, facts in zip(todo, pool.map(lambda i: _image_facts(ccub_dir, records[i]), todo)):
            known[keys[i]] = facts
    if cache is not None:
        write_json(cache, {key: known[key] for key in keys if isinstance(key, str)})
    return [known[key] for key in keys]


def _read_facts(cache: Path | None) -> dict:
    try:
        facts = json.loads(cache.read_text(encoding="utf-8")) if cache is not None else {}
        return facts if isinstance(facts, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: every image is read


def _tables(records: list[Record], ccub_dir: Path, facts_cache: Path | None = None) -> dict[str, pd.DataFrame]:
    facts = image_facts(records, ccub_dir, facts_cache)
    rows = [{**asdict(r), "aspect": r.width / max(r.height, 1), "caption_chars": len(r.caption), **f}
            for r, f in zip(records, facts)]
    manifest = pd.DataFrame(rows, columns=[*Record.__dataclass_fields__, "aspect", "caption_chars", "decodes", "mode",
                                           "pixels_match_sha256"])

    def counts(by: str) -> pd.DataFrame:
        g = manifest.groupby(by)
        return pd.DataFrame({by: list(g.groups), "images": g.size().values,
                             "heldout": g["split"].apply(lambda s: int((s == HELDOUT).sum())).values})

    return {"manifest": manifest, "per_culture": counts("culture"), "per_category": counts("category")}


def _inert(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame as Great Expectations may render it: its Data Docs put unexpected values and row keys
    into HTML unescaped, so every text cell (captions, categories: typed by anyone) is escaped first.
    Checks on text length use numeric columns computed before escaping."""
    return frame.apply(lambda column: column.map(lambda v: html_text(v) if isinstance(v, str) else v))


def _validate(context, name: str, frame: pd.DataFrame, suite, keys: list[str], docs: bool):
    frame = _inert(frame)
    asset = context.data_sources.add_pandas(name).add_dataframe_asset(name)
    batch_definition = asset.add_batch_definition_whole_dataframe(name)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=name, data=batch_definition, suite=context.suites.add(suite)))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=name, validation_definitions=[definition],
        actions=[UpdateDataDocsAction(name="data_docs")] if docs else [],
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": keys}))
    return next(iter(checkpoint.run(batch_parameters={"dataframe": frame}).run_results.values()))


def _failures(result, keys: list[str]) -> list[dict]:
    failures = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        rows = [{k: row.get(k) for k in keys} for row in (r.result.get("unexpected_index_list") or [])]
        failures.append({"expectation": cfg.type, "column": cfg.kwargs.get("column"), "rows": rows,
                         "observed": r.result.get("observed_value"),
                         "exception": (r.exception_info or {}).get("exception_message")})
    return failures


def validate_records(records: list[Record], params: ValidateParams, ccub_dir: str | Path,
                     docs_dir: str | Path | None = None, facts_cache: Path | None = None) -> dict:
    """Run the suites; return a summary (success, statistics, counts, failures) and the raw results.

    With docs_dir, Great Expectations writes its Data Docs site (index.html) there; with facts_cache,
    only new and changed images are read (image_facts).
    """
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    tables = _tables(records, Path(ccub_dir), facts_cache)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        context.add_data_docs_site(
            "ccub",
            {
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(Path(docs_dir).resolve()),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    docs = docs_dir is not None
    plan = {
        "manifest": (_manifest_suite(params), ROW_KEYS),
        "per_culture": (_counts_suite("ccub_per_culture", params, params.min_images_per_culture, True), ["culture"]),
        "per_category": (
            _counts_suite("ccub_per_category", params, params.min_images_per_category, False),
            ["category"],
        ),
    }
    results = {name: _validate(context, name, tables[name], suite, keys, docs) for name, (suite, keys) in plan.items()}
    failures = [f for name, (_, keys) in plan.items() for f in _failures(results[name], keys)]
    evaluated = sum(r.statistics["evaluated_expectations"] for r in results.values())
    successful = sum(r.statistics["successful_expectations"] for r in results.values())
    summary = {
        "success": all(r.success for r in results.values()),
        "statistics": {"records": len(records), "evaluated_expectations": evaluated,
                       "successful_expectations": successful, "unsuccessful_expectations": evaluated - successful},
        "per_culture": tables["per_culture"].to_dict(orient="records"),
        "per_category": tables["per_category"].to_dict(orient="records"),
        "failures": failures,
    }
    return {"summary": summary, "gx_results": {name: r.to_json_dict() for name, r in results.items()}}


def failure_message(summary: dict) -> str:
    lines = [f"CCUB validation failed: {summary['statistics']['unsuccessful_expectations']} check(s)"]
    for f in summary["failures"]:
        where = f" on {f['column']}" if f["column"] else ""
        rows = ", ".join(" ".join(f"{k}={v}" for k, v in row.items()) for row in f["rows"][:20])
        more = f" (+{len(f['rows']) - 20} more)" if len(f["rows"]) > 20 else ""
        detail = rows or f["exception"] or (f"observed {f['observed']}" if f["observed"] is not None else "failed")
        lines.append(f"  {f['expectation']}{where}: {detail}{more}")
    return "\n".join(lines)


def check_into(out_dir: str | Path, records: list[Record], params: ValidateParams, ccub_dir: str | Path) -> dict:
    """Validate and write out_dir whole (summary.json, gx_results.json, data_docs/) pass or fail:
    auditors see the report of a failed run too. Returns the summary. The image facts of the checked
    files are kept beside out_dir (`.validation.image-facts.json`, outside the DVC output, which DVC
    removes before the stage runs) for the next run."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        checked = validate_records(records, params, ccub_dir, docs_dir=tmp / "data_docs",
                                   facts_cache=out_dir.parent / f".{out_dir.name}.image-facts.json")
        write_json(tmp / "summary.json", checked["summary"])
        write_json(tmp / "gx_results.json", checked["gx_results"])
        training = [r for r in records if r.split == TRAIN]
        for culture in params.cultures:
            write_json(tmp / CULTURES_DIR / f"{culture}.json", culture_summary(records, culture, checked["summary"]))
            # what the culture's negatives and training depend on: its training records passed the checks
            write_json(tmp / TRAINING_DIR / f"{culture}.json", culture_summary(training, culture, checked["summary"]))
    return checked["summary"]


def culture_summary(records: list[Record], culture: str, summary: dict) -> dict:
    """What one culture's stages depend on (dvc.yaml): its records passed the checks. It changes only
    when that culture's records do, so another culture's update does not rerun this one's stages."""
    own = [r for r in records if r.culture == culture]
    return {"culture": culture, "success": summary["success"], "records": len(own),
            "train": sum(r.split == "train" for r in own), "heldout": sum(r.split == "heldout" for r in own),
            "records_sha256": sha256_json(sorted((asdict(r) for r in own), key=lambda row: row["id"]))}
