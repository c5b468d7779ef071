"""Great Expectations checks on the CCUB manifest: bad data stops here, before any GPU time.

Two batches are validated: the manifest (one row per record) and a per-culture table of counts.
A failure names each failing record by id and file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import great_expectations as gx  # noqa: E402
import great_expectations.expectations as gxe  # noqa: E402
import pandas as pd  # noqa: E402
from great_expectations.data_context.types.base import ProgressBarsConfig  # noqa: E402

from scoft.ccub import HELDOUT, Record  # noqa: E402
from scoft.config import ValidateParams  # noqa: E402

REQUIRED = ["id", "culture", "category", "caption", "generic_caption", "file", "sha256", "width", "height"]
ROW_KEYS = ["id", "file"]


class ValidationFailed(ValueError):
    """The data failed one or more checks; the message names the records."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def _manifest_suite(p: ValidateParams) -> gx.ExpectationSuite:
    suite = gx.ExpectationSuite(name="ccub_manifest")
    for column in REQUIRED:
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=column))
    for column in ["id", "culture", "category", "generic_caption", "file", "sha256"]:
        suite.add_expectation(gxe.ExpectColumnValueLengthsToBeBetween(column=column, min_value=1))
    suite.add_expectation(gxe.ExpectColumnValueLengthsToBeBetween(
        column="caption", min_value=p.caption_min_chars, max_value=p.caption_max_chars))
    suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column="sha256"))
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="culture", value_set=p.cultures))
    for column in ("width", "height"):
        suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column=column, min_value=p.min_side, max_value=p.max_side))
    return suite


def _counts_suite(p: ValidateParams) -> gx.ExpectationSuite:
    suite = gx.ExpectationSuite(name="ccub_per_culture")
    suite.add_expectation(gxe.ExpectTableRowCountToBeBetween(min_value=1))
    suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="images", min_value=p.min_images_per_culture))
    return suite


def _run(context, name: str, frame: pd.DataFrame, suite, keys: list[str]):
    asset = context.data_sources.add_pandas(name).add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe(name).get_batch(batch_parameters={"dataframe": frame})
    return batch.validate(suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": keys})


def _failures(result, keys: list[str]) -> list[dict]:
    failures = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        column = cfg.kwargs.get("column")
        rows = [{k: row.get(k) for k in keys} for row in (r.result.get("unexpected_index_list") or [])]
        failures.append({"expectation": cfg.type, "column": column, "rows": rows,
                         "exception": (r.exception_info or {}).get("exception_message")})
    return failures


def validate_records(records: list[Record], params: ValidateParams) -> dict:
    """Run both suites; return a summary (success, statistics, failures) and the raw GX results."""
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    manifest = pd.DataFrame([asdict(r) for r in records], columns=list(Record.__dataclass_fields__))
    counts = manifest.groupby("culture").size()
    per_culture = pd.DataFrame({
        "culture": counts.index,
        "images": counts.values,
        "heldout": [int(((manifest.culture == c) & (manifest.split == HELDOUT)).sum()) for c in counts.index],
    })
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    results = {
        "manifest": _run(context, "manifest", manifest, _manifest_suite(params), ROW_KEYS),
        "per_culture": _run(context, "per_culture", per_culture, _counts_suite(params), ["culture"]),
    }
    failures = _failures(results["manifest"], ROW_KEYS) + _failures(results["per_culture"], ["culture"])
    evaluated = sum(r.statistics["evaluated_expectations"] for r in results.values())
    successful = sum(r.statistics["successful_expectations"] for r in results.values())
    summary = {
        "success": all(r.success for r in results.values()),
        "statistics": {"records": len(records), "evaluated_expectations": evaluated,
                       "successful_expectations": successful,
                       "unsuccessful_expectations": evaluated - successful},
        "per_culture": per_culture.to_dict(orient="records"),
        "failures": failures,
    }
    raw = {name: r.to_json_dict() for name, r in results.items()}
    return {"summary": summary, "gx_results": raw}


def failure_message(summary: dict) -> str:
    lines = [f"CCUB validation failed: {summary['statistics']['unsuccessful_expectations']} check(s)"]
    for f in summary["failures"]:
        where = f" on {f['column']}" if f["column"] else ""
        rows = ", ".join(" ".join(f"{k}={v}" for k, v in row.items()) for row in f["rows"][:20])
        more = f" (+{len(f['rows']) - 20} more)" if len(f["rows"]) > 20 else ""
        lines.append(f"  {f['expectation']}{where}: {rows or f['exception'] or 'failed'}{more}")
    return "\n".join(lines)


def write_report(out_dir: str | Path, checked: dict) -> None:
    from scoft.io import atomic_dir, write_json

    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "summary.json", checked["summary"])
        write_json(tmp / "gx_results.json", checked["gx_results"])
