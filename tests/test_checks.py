"""Great Expectations checks: the sample passes; each kind of bad record fails, named."""

import dataclasses

import pytest

from scoft.ccub import ingest
from scoft.checks import failure_message, validate_records, write_report


@pytest.fixture(scope="module")
def records(sample_dir, tmp_path_factory):
    return ingest(sample_dir, tmp_path_factory.mktemp("ccub") / "ccub", 0.25, 10**7)


def _failed(records, params):
    summary = validate_records(records, params.validate_)["summary"]
    assert not summary["success"]
    return summary, failure_message(summary)


def test_sample_passes_every_check(records, params, tmp_path):
    checked = validate_records(records, params.validate_)
    s = checked["summary"]
    assert s["success"], failure_message(s)
    assert s["statistics"]["records"] == 36 and s["statistics"]["unsuccessful_expectations"] == 0
    write_report(tmp_path / "validation", checked)
    assert (tmp_path / "validation" / "summary.json").is_file()
    assert (tmp_path / "validation" / "gx_results.json").is_file()


def test_empty_caption_is_named(records, params):
    bad = list(records)
    bad[5] = dataclasses.replace(bad[5], caption="")
    summary, message = _failed(bad, params)
    assert f"id={bad[5].id}" in message and bad[5].file in message
    assert "caption" in message


def test_duplicate_image_hash_is_named(records, params):
    bad = list(records) + [dataclasses.replace(records[0], id="copy-of-first", file="images/x.png")]
    _, message = _failed(bad, params)
    assert "expect_column_values_to_be_unique" in message and "id=copy-of-first" in message


def test_unknown_culture_and_small_images_are_named(records, params):
    bad = list(records)
    bad[1] = dataclasses.replace(bad[1], culture="XXX")
    bad[2] = dataclasses.replace(bad[2], width=4)
    _, message = _failed(bad, params)
    assert f"id={bad[1].id}" in message and "culture" in message
    assert f"id={bad[2].id}" in message and "width" in message


def test_too_few_images_for_a_culture_is_named(records, params):
    kor = [r for r in records if r.culture == "KOR"][:3]
    bad = [r for r in records if r.culture != "KOR"] + kor
    _, message = _failed(bad, params)
    assert "culture=KOR" in message and "images" in message
