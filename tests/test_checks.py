"""Great Expectations checks: the sample passes; each kind of bad record fails, named; Data Docs."""

import dataclasses
import json

import pytest
from PIL import Image

from scoft.ccub import read_manifest
from scoft.checks import check_into, failure_message, validate_records
from tests.helpers import ingest_offline


@pytest.fixture(scope="module")
def ccub(sample_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ccub") / "ccub"
    ingest_offline([sample_dir], out)
    return out


@pytest.fixture(scope="module")
def records(ccub):
    return read_manifest(ccub)


def _message(records, params, ccub):
    summary = validate_records(records, params.validate_, ccub)["summary"]
    assert not summary["success"]
    return failure_message(summary)


def test_sample_passes_every_check_and_data_docs_are_written(records, params, ccub, tmp_path):
    summary = check_into(tmp_path / "validation", records, params.validate_, ccub)
    assert summary["success"], failure_message(summary)
    assert summary["statistics"]["records"] == 63 and summary["statistics"]["evaluated_expectations"] >= 30
    assert {r["culture"] for r in summary["per_culture"]} == {"KOR", "MEX", "NGA"}
    assert all(r["heldout"] >= 1 for r in summary["per_culture"])
    assert (tmp_path / "validation/data_docs/index.html").is_file()
    assert json.loads((tmp_path / "validation/gx_results.json").read_text())["manifest"]["success"] is True


@pytest.mark.parametrize("change,expected", [
    (dict(caption=""), "expect_column_values_to_be_between on caption_chars"),
    (dict(caption="x" * 500), "expect_column_values_to_be_between on caption_chars"),
    (dict(culture="XXX"), "expect_column_values_to_be_in_set on culture"),
    (dict(category="SPORTS"), "expect_column_values_to_be_in_set on category"),
    (dict(width=4), "expect_column_values_to_be_between on width"),
    (dict(width=4000, height=40), "expect_column_values_to_be_between on aspect"),
    (dict(source_url="ftp://example.org/a.png"), "expect_column_values_to_match_regex on source_url"),
    (dict(sha256="0" * 64), "expect_column_values_to_be_in_set on pixels_match_sha256"),
])
def test_each_bad_record_is_named(records, params, ccub, change, expected):
    bad = list(records)
    bad[5] = dataclasses.replace(bad[5], **change)
    message = _message(bad, params, ccub)
    assert expected in message
    assert f"id={bad[5].id} file={bad[5].file}" in message


def test_duplicate_image_hash_is_named(records, params, ccub):
    bad = list(records) + [dataclasses.replace(records[0], id="copy-of-first")]
    assert "expect_column_values_to_be_unique on sha256" in _message(bad, params, ccub)


def test_an_image_altered_on_disk_is_caught(records, params, ccub, tmp_path):
    import shutil

    copy = tmp_path / "ccub"
    shutil.copytree(ccub, copy)
    Image.new("RGB", (48, 48), "blue").save(copy / records[0].file)
    (copy / records[1].file).write_bytes(b"garbage")
    message = _message(records, params, copy)
    assert f"id={records[0].id}" in message and "pixels_match_sha256" in message
    assert "on decodes" in message and f"id={records[1].id}" in message


def test_too_few_images_for_a_culture_and_no_heldout_are_named(records, params, ccub):
    kor = [r for r in records if r.culture == "KOR"]
    bad = [r for r in records if r.culture != "KOR"] + kor[:3]
    message = _message(bad, params, ccub)
    assert "on images: culture=KOR" in message
    no_heldout = [r for r in records if not (r.culture == "MEX" and r.split == "heldout")]
    assert "on heldout: culture=MEX" in _message(no_heldout, params, ccub)


def test_ccub_text_reaches_the_data_docs_escaped(records, params, ccub, tmp_path):
    hostile = list(records)
    hostile[3] = dataclasses.replace(hostile[3], caption="<script>alert('caption')</script>" + "x" * 500)
    hostile[4] = dataclasses.replace(hostile[4], category='<img src=x onerror="alert(1)">')
    summary = check_into(tmp_path / "validation", hostile, params.validate_, ccub)
    assert not summary["success"]
    pages = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "validation/data_docs").rglob("*.html"))
    assert "&lt;img src=x onerror" in pages  # the bad category is shown to the auditor...
    assert "<script>alert(" not in pages and "<img src=x" not in pages  # ...as text, not as markup
    assert any(r["category"] == hostile[4].category for r in summary["per_category"])  # JSON keeps it as typed


def test_a_second_validation_reads_only_changed_images(records, params, ccub, tmp_path):
    import shutil

    copy = tmp_path / "ccub"
    shutil.copytree(ccub, copy)
    out = tmp_path / "validation"
    assert check_into(out, records, params.validate_, copy)["success"]
    cache = tmp_path / ".validation.image-facts.json"
    facts = json.loads(cache.read_text())
    assert len(facts) == 63 and all(f["pixels_match_sha256"] for f in facts.values())
    # The next run takes unchanged files' facts from the cache (poisoned here to show it is read) ...
    poisoned = next(key for key in facts if key.endswith(records[0].sha256))
    facts[poisoned] = {"decodes": False, "mode": None, "pixels_match_sha256": False}
    cache.write_text(json.dumps(facts))
    summary = check_into(out, records, params.validate_, copy)
    assert not summary["success"] and f"id={records[0].id}" in failure_message(summary)
    # ... and reads a file whose bytes changed, whatever the cache says of its old bytes
    cache.write_text(json.dumps({k: {"decodes": True, "mode": "RGB", "pixels_match_sha256": True} for k in facts}))
    Image.new("RGB", (records[1].width, records[1].height), "white").save(copy / records[1].file)
    summary = check_into(out, records, params.validate_, copy)
    assert not summary["success"] and f"id={records[1].id}" in failure_message(summary)
    assert f"id={records[0].id}" not in failure_message(summary)
