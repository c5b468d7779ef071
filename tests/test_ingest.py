"""Ingestion of a SCoFT imagefolder: manifest, split, and refusal of bad rows without damage."""

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from scoft.ccub import HELDOUT, MANIFEST, TRAIN, IngestError, ingest, read_manifest, split_for
from scoft.io import pixel_hash, sha256_file

FIELDS = {"id", "culture", "category", "caption", "generic_caption", "file", "sha256", "width", "height",
          "source_url", "created_at", "split"}


def _copy(sample_dir: Path, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(sample_dir, src)
    return src


def _rewrite_rows(src: Path, edit) -> None:
    meta = src / "train" / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    rows = edit(rows)
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_sample_has_three_cultures_three_categories_and_scoft_columns(sample_dir):
    rows = [json.loads(line) for line in (sample_dir / "train" / "metadata.jsonl").read_text().splitlines()]
    assert {"file_name", "text", "blip_text", "negative_imgpath"} <= set(rows[0])
    cultures = {r["country_code"] for r in rows}
    assert len(cultures) >= 3 and len({r["category_code"] for r in rows}) >= 3
    assert all(sum(r["country_code"] == c for r in rows) >= 8 for c in cultures)


def test_ingest_writes_images_and_one_manifest_with_every_field(sample_dir, tmp_path):
    out = tmp_path / "ccub"
    records = ingest(sample_dir, out, 0.25, 10**7)
    assert len(records) == 36
    rows = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    assert set(rows[0]) == FIELDS
    for r in read_manifest(out):
        with Image.open(out / r.file) as im:
            assert im.mode == "RGB" and im.size == (r.width, r.height)
            assert pixel_hash(im) == r.sha256
        assert r.split == split_for(r.sha256, 0.25)
    by_culture = {c: {r.split for r in records if r.culture == c} for c in {r.culture for r in records}}
    assert all(splits == {TRAIN, HELDOUT} for splits in by_culture.values())


def test_split_depends_only_on_the_record_itself(sample_dir, tmp_path):
    full = {r.sha256: r.split for r in ingest(sample_dir, tmp_path / "a", 0.25, 10**7)}
    src = _copy(sample_dir, tmp_path)
    _rewrite_rows(src, lambda rows: rows[::3])  # a third of the rows, in another context
    part = {r.sha256: r.split for r in ingest(src, tmp_path / "b", 0.25, 10**7)}
    assert part and all(full[h] == s for h, s in part.items())


def test_ingest_is_reproducible(sample_dir, tmp_path):
    ingest(sample_dir, tmp_path / "a", 0.25, 10**7)
    ingest(sample_dir, tmp_path / "b", 0.25, 10**7)
    assert sha256_file(tmp_path / "a" / MANIFEST) == sha256_file(tmp_path / "b" / MANIFEST)


def _bad_path_outside(src, rows):
    rows[3]["file_name"] = "../../etc/passwd"
    return rows, rows[3]["file_name"], "outside the dataset folder"


def _bad_absolute(src, rows):
    rows[4]["file_name"] = "/etc/hostname"
    return rows, "/etc/hostname", "outside the dataset folder"


def _bad_symlink(src, rows):
    outside = src.parent / "outside.png"
    Image.new("RGB", (40, 40)).save(outside)
    os.symlink(outside, src / "train" / "images" / "link.png")
    rows[5]["file_name"] = "images/link.png"
    return rows, "images/link.png", "resolves outside the dataset folder"


def _bad_missing(src, rows):
    rows[6]["file_name"] = "images/nope.png"
    return rows, "images/nope.png", "no such file"


def _bad_truncated(src, rows):
    path = src / "train" / rows[7]["file_name"]
    Image.new("RGB", (64, 64), "red").save(path.with_suffix(".jpg"), format="JPEG")
    data = path.with_suffix(".jpg").read_bytes()
    path.with_suffix(".jpg").write_bytes(data[: len(data) // 2])
    rows[7]["file_name"] = rows[7]["file_name"][:-4] + ".jpg"
    return rows, rows[7]["file_name"], "cannot decode image"


def _bad_zero_bytes(src, rows):
    (src / "train" / rows[8]["file_name"]).write_bytes(b"")
    return rows, rows[8]["file_name"], "empty file"


def _bad_html(src, rows):
    (src / "train" / rows[9]["file_name"]).write_text("<html><body>Not found</body></html>")
    return rows, rows[9]["file_name"], "cannot decode image"


@pytest.mark.parametrize("make_bad", [_bad_path_outside, _bad_absolute, _bad_symlink, _bad_missing,
                                      _bad_truncated, _bad_zero_bytes, _bad_html])
def test_bad_row_fails_ingest_naming_it_and_leaves_the_previous_version_intact(sample_dir, tmp_path, make_bad):
    out = tmp_path / "ccub"
    ingest(sample_dir, out, 0.25, 10**7)
    before = {p.relative_to(out): sha256_file(p) for p in out.rglob("*") if p.is_file()}
    src = _copy(sample_dir, tmp_path)
    named = {}

    def edit(rows):
        rows, named["file"], named["reason"] = make_bad(src, rows)
        return rows

    _rewrite_rows(src, edit)
    with pytest.raises(IngestError) as err:
        ingest(src, out, 0.25, 10**7)
    assert named["file"] in str(err.value) and named["reason"] in str(err.value)
    assert "metadata.jsonl:" in str(err.value)  # the row's line number
    after = {p.relative_to(out): sha256_file(p) for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ccub")] == []


def test_pixel_cap_refuses_a_decompression_bomb(sample_dir, tmp_path):
    src = _copy(sample_dir, tmp_path)
    with pytest.raises(IngestError, match="exceeds the pixel cap"):
        ingest(src, tmp_path / "ccub", 0.25, max_pixels=48 * 48 - 1)
