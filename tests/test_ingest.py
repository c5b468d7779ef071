"""Ingestion of a SCoFT imagefolder: manifest, split, per-row rejection, and no damage on failure."""

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from scoft.ccub import HELDOUT, MANIFEST, TRAIN, IngestError, read_manifest, split_for
from scoft.io import pixel_hash, sha256_file
from tests.helpers import ingest_offline

FIELDS = {"id", "culture", "category", "caption", "generic_caption", "generic_caption_source", "file", "sha256",
          "width", "height", "source_url", "location", "etag", "created_at", "split"}


def run(sources, out, **kw):
    return ingest_offline(sources, out, **kw)


def _copy(sample_dir: Path, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(sample_dir, src)
    return src


def _rewrite_rows(src: Path, edit) -> None:
    meta = src / "train" / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    meta.write_text("".join(json.dumps(r) + "\n" for r in edit(rows)))


def test_sample_has_three_cultures_three_categories_and_scoft_columns(sample_dir):
    rows = [json.loads(line) for line in (sample_dir / "train" / "metadata.jsonl").read_text().splitlines()]
    assert {"file_name", "text", "blip_text", "negative_imgpath"} <= set(rows[0])
    cultures = {r["country_code"] for r in rows}
    assert len(cultures) >= 3 and len({r["category_code"] for r in rows}) >= 3
    assert all(sum(r["country_code"] == c for r in rows) >= 8 for c in cultures)


def test_ingest_writes_images_and_one_manifest_with_every_field(sample_dir, tmp_path):
    out = tmp_path / "ccub"
    summary = run([sample_dir], out)
    assert summary["added"] == summary["records"] == 63 and summary["rejected"] == []
    rows = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    assert set(rows[0]) == FIELDS
    records = read_manifest(out)
    for r in records:
        with Image.open(out / r.file) as im:
            assert im.mode == "RGB" and im.size == (r.width, r.height)
            assert pixel_hash(im) == r.sha256
        assert r.split == split_for(r.sha256, 0.25)
        assert r.generic_caption_source == "source" and r.source_url.startswith("https://")
    by_culture = {c: {r.split for r in records if r.culture == c} for c in {r.culture for r in records}}
    assert all(splits == {TRAIN, HELDOUT} for splits in by_culture.values())


def test_rows_without_a_generic_caption_get_the_labelled_fallback(sample_dir, tmp_path):
    src = _copy(sample_dir, tmp_path)
    _rewrite_rows(src, lambda rows: [{k: v for k, v in r.items() if k != "blip_text"} for r in rows])
    run([src], tmp_path / "ccub")
    records = read_manifest(tmp_path / "ccub")
    assert {r.generic_caption_source for r in records} == {"fallback"}
    assert {r.generic_caption for r in records if r.category == "ARCH"} == {"a photo of a building"}


def test_split_depends_only_on_the_record_itself(sample_dir, tmp_path):
    run([sample_dir], tmp_path / "a")
    full = {r.sha256: r.split for r in read_manifest(tmp_path / "a")}
    src = _copy(sample_dir, tmp_path)
    _rewrite_rows(src, lambda rows: rows[::3])
    run([src], tmp_path / "b")
    part = {r.sha256: r.split for r in read_manifest(tmp_path / "b")}
    assert part and all(full[h] == s for h, s in part.items())


def test_second_ingest_of_the_same_source_changes_nothing_on_disk(sample_dir, tmp_path):
    out = tmp_path / "ccub"
    first = run([sample_dir], out)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    second = run([sample_dir], out)
    assert second["version"] == first["version"]
    assert (second["added"], second["changed"], second["removed"], second["unchanged"]) == (0, 0, 0, 63)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps


def _bad_path_outside(src, rows):
    rows[3]["file_name"] = "../../etc/passwd"
    return rows[3]["file_name"], "outside the dataset folder"


def _bad_absolute(src, rows):
    rows[4]["file_name"] = "/etc/hostname"
    return "/etc/hostname", "outside the dataset folder"


def _bad_symlink(src, rows):
    outside = src.parent / "outside.png"
    Image.new("RGB", (40, 40)).save(outside)
    os.symlink(outside, src / "train" / "images" / "link.png")
    rows[5]["file_name"] = "images/link.png"
    return "images/link.png", "resolves outside the dataset folder"


def _bad_missing(src, rows):
    rows[6]["file_name"] = "images/nope.png"
    return "images/nope.png", "no such file"


def _bad_truncated(src, rows):
    path = src / "train" / rows[7]["file_name"]
    Image.new("RGB", (64, 64), "red").save(path.with_suffix(".jpg"), format="JPEG")
    data = path.with_suffix(".jpg").read_bytes()
    path.with_suffix(".jpg").write_bytes(data[: len(data) // 2])
    rows[7]["file_name"] = rows[7]["file_name"][:-4] + ".jpg"
    return rows[7]["file_name"], "cannot decode image"


def _bad_zero_bytes(src, rows):
    (src / "train" / rows[8]["file_name"]).write_bytes(b"")
    return rows[8]["file_name"], "empty file"


def _bad_html(src, rows):
    (src / "train" / rows[9]["file_name"]).write_text("<html><body>Not found</body></html>")
    return rows[9]["file_name"], "cannot decode image"


def _bad_caption(src, rows):
    rows[10]["text"] = "  "
    return rows[10]["file_name"], "caption is empty"


def _bad_nul(src, rows):
    rows[11]["text"] = "a house\x00with a NUL"
    return rows[11]["file_name"], "text holds control character U+0000 at position 7"


def _bad_bidi(src, rows):
    rows[12]["text"] = "a gate \u202eesuoh"  # right-to-left override: displays reversed
    return rows[12]["file_name"], "text holds control character U+202E at position 7"


@pytest.mark.parametrize("make_bad", [_bad_path_outside, _bad_absolute, _bad_symlink, _bad_missing,
                                      _bad_truncated, _bad_zero_bytes, _bad_html, _bad_caption, _bad_nul,
                                      _bad_bidi])
def test_a_bad_row_is_rejected_by_name_and_the_good_rows_are_ingested(sample_dir, tmp_path, make_bad):
    src = _copy(sample_dir, tmp_path)
    named = {}

    def edit(rows):
        named["file"], named["reason"] = make_bad(src, rows)
        return rows

    _rewrite_rows(src, edit)
    summary = run([src], tmp_path / "ccub")
    assert summary["records"] == 62 and len(summary["rejected"]) == 1
    rejected = summary["rejected"][0]
    assert named["reason"] in rejected["reason"] and "metadata.jsonl:" in rejected["row"]
    assert rejected["source_row"]["file_name"] == named["file"]


def test_too_many_bad_rows_fail_and_leave_the_previous_version_intact(sample_dir, tmp_path):
    out = tmp_path / "ccub"
    run([sample_dir], out)
    before = {p.relative_to(out): sha256_file(p) for p in out.rglob("*") if p.is_file()}
    src = _copy(sample_dir, tmp_path)

    def break_many(rows):
        for r in rows[:17]:
            r["file_name"] = "../escape.png"
        return rows

    _rewrite_rows(src, break_many)
    with pytest.raises(IngestError) as err:
        run([src], out)  # 17 of 63 rejected: 27% > 25%
    assert "17 of 63 rows rejected" in str(err.value)
    assert "outside the dataset folder" in str(err.value) and "metadata.jsonl:1" in str(err.value)
    assert {p.relative_to(out): sha256_file(p) for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ccub")] == []
    assert run([src], out, max_rejected_fraction=0.3)["records"] == 46  # under a looser limit it passes


def test_pixel_cap_refuses_a_decompression_bomb(sample_dir, tmp_path):
    summary = run([sample_dir], tmp_path / "ccub", max_pixels=48 * 48 - 1, max_rejected_fraction=1.0)
    assert summary["records"] == 0 and len(summary["rejected"]) == 63
    assert all("exceeds the pixel cap" in r["reason"] for r in summary["rejected"])


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _halves(left, right, size=(40, 20), mode="RGB") -> Image.Image:
    im = Image.new(mode, size, left)
    im.paste(Image.new(mode, (size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return im


def _close(pixel, expected, tolerance=24):
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


def test_a_16_bit_png_is_scaled_not_clipped_to_white():
    import numpy as np

    from scoft.io import decode_rgb

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    stored = np.asarray(decode_rgb(_encoded(Image.fromarray(ramp), "PNG"), 10**6, "ramp.png"))
    assert stored.shape == (16, 64, 3)
    assert stored[0, 0].tolist() == [0, 0, 0] and stored[0, -1].tolist() == [255, 255, 255]
    assert abs(int(stored[0, 32, 0]) - round(ramp[0, 32] / 257)) <= 1  # mid-grey stays mid-grey


def test_a_jpeg_is_stored_in_its_exif_orientation():
    from scoft.io import decode_rgb

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = _encoded(_halves((255, 0, 0), (0, 0, 255)), "JPEG", exif=exif.tobytes(), quality=95)
    stored = decode_rgb(data, 10**6, "camera.jpg")
    assert stored.size == (20, 40)  # portrait, as a viewer shows it
    assert _close(stored.getpixel((10, 2)), (255, 0, 0)) and _close(stored.getpixel((10, 37)), (0, 0, 255))


@pytest.mark.parametrize("name,make", [
    ("cmyk.jpg", lambda: _encoded(_halves((0, 255, 255, 0), (255, 255, 0, 0), mode="CMYK"), "JPEG", quality=95)),
    ("palette-alpha.png", lambda: _encoded(_halves((255, 0, 0), (0, 0, 255)).convert("P"), "PNG", transparency=0)),
    ("animated.gif", lambda: _encoded(_halves((255, 0, 0), (0, 0, 255)), "GIF", save_all=True,
                                      append_images=[Image.new("RGB", (40, 20), "green")])),
    ("image.webp", lambda: _encoded(_halves((255, 0, 0), (0, 0, 255)), "WEBP", lossless=True)),
])
def test_other_formats_are_stored_as_they_look(name, make):
    from scoft.io import decode_rgb

    stored = decode_rgb(make(), 10**6, name)
    assert stored.mode == "RGB" and stored.size == (40, 20)
    assert _close(stored.getpixel((2, 10)), (255, 0, 0)), stored.getpixel((2, 10))  # the first frame, red | blue
    assert _close(stored.getpixel((37, 10)), (0, 0, 255)), stored.getpixel((37, 10))


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_an_ingest_killed_between_its_two_renames_is_recovered_without_refetching(sample_dir, tmp_path):
    out = tmp_path / "ccub"
    run([sample_dir], out)
    before = {p.relative_to(out): sha256_file(p) for p in out.rglob("*") if p.is_file()}
    pid = _dead_pid()
    # What the kill leaves: the previous version moved aside, the new one half written beside it.
    os.replace(out, tmp_path / f".ccub.old-{pid}")
    (tmp_path / f".ccub.tmp-{pid}-x1y2").mkdir()
    (tmp_path / f".ccub.tmp-{pid}-x1y2" / MANIFEST).write_text("{")
    lines = []
    summary = run([sample_dir], out, progress=lines.append)
    assert any(f"restored {out}" in m for m in lines) and any("fetching 0" in m for m in lines), lines
    assert (summary["added"], summary["changed"], summary["unchanged"]) == (0, 0, 63)
    assert {p.relative_to(out): sha256_file(p) for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ccub")] == []


def test_a_live_swap_of_another_process_is_left_alone(tmp_path):
    from scoft.io import recover_swap

    live = tmp_path / f".ccub.tmp-{os.getpid()}-abc"
    live.mkdir()
    assert recover_swap(tmp_path / "ccub") == [] and live.is_dir()


def test_files_and_folders_follow_the_umask(sample_dir, tmp_path):
    from scoft.io import write_json

    old = os.umask(0o022)
    try:
        out = tmp_path / "ccub"
        run([sample_dir], out)
        write_json(tmp_path / "summary.json", {"a": 1})
    finally:
        os.umask(old)
    assert (out / MANIFEST).stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o644
    assert out.stat().st_mode & 0o777 == 0o755


def test_rows_outside_the_validation_bounds_are_rejected_one_by_one(sample_dir, tmp_path, params):
    from scoft.checks import validate_records

    src = _copy(sample_dir, tmp_path)

    def shrink(rows):
        Image.new("RGB", (1, 1), "red").save(src / "train" / rows[0]["file_name"])
        Image.new("RGB", (10000, 10), "blue").save(src / "train" / rows[1]["file_name"])
        rows[2]["text"] = "a house " * 131072  # a 1 MB caption
        return rows

    _rewrite_rows(src, shrink)
    summary = run([src], tmp_path / "ccub", bounds=params.validate_)
    reasons = sorted(r["reason"] for r in summary["rejected"])
    assert summary["records"] == 60 and len(reasons) == 3
    assert reasons[0].startswith("caption of 1048575 characters outside validate.caption_min_chars")
    assert reasons[1:] == ["image 10000x10 outside validate.min_side..max_side (32..8192)",
                           "image 1x1 outside validate.min_side..max_side (32..8192)"]
    checked = validate_records(read_manifest(tmp_path / "ccub"), params.validate_, tmp_path / "ccub")["summary"]
    assert checked["success"]  # what is left passes the set's checks


def test_each_culture_gets_its_own_manifest_and_every_held_out_record_one_more(sample_dir, tmp_path, params):
    """What the per-culture stages depend on: one file per configured culture (empty when CCUB has
    none of it), and the held-out records of every culture for the evaluation's retrieval."""
    from scoft.ccub import read_heldout

    out, src = tmp_path / "ccub", _copy(sample_dir, tmp_path)
    run([src], out, bounds=params.validate_)
    records = read_manifest(out)
    for culture in params.validate_.cultures:  # CHN, IND, KOR, MEX, NGA
        assert read_manifest(out, culture) == [r for r in records if r.culture == culture]
    assert read_manifest(out, "CHN") == [] and (out / "cultures" / "CHN.jsonl").is_file()
    assert read_heldout(out) == [r for r in records if r.split == HELDOUT]
    before = {c: sha256_file(out / "cultures" / f"{c}.jsonl") for c in ("KOR", "MEX", "NGA")}

    def drop_one_mexican_row(rows):
        first = next(i for i, r in enumerate(rows) if r["country_code"] == "MEX")
        return rows[:first] + rows[first + 1:]

    _rewrite_rows(src, drop_one_mexican_row)
    run([src], out, bounds=params.validate_)
    after = {c: sha256_file(out / "cultures" / f"{c}.jsonl") for c in ("KOR", "MEX", "NGA")}
    assert after["MEX"] != before["MEX"] and after["KOR"] == before["KOR"] and after["NGA"] == before["NGA"]


def test_a_culture_nobody_configured_is_skipped_by_name_not_ingested(sample_dir, tmp_path, params):
    src = _copy(sample_dir, tmp_path)

    def to_japan(rows):
        rows[2]["country_code"] = "JPN"  # a real country, not one of validate.cultures
        return rows

    _rewrite_rows(src, to_japan)
    summary = run([src], tmp_path / "ccub", bounds=params.validate_)
    assert summary["records"] == 62 and summary["rejected"] == []
    assert [s["culture"] for s in summary["skipped"]] == ["JPN"]
    assert summary["skipped"][0]["row"].endswith("metadata.jsonl:3")
    assert "not in validate.cultures" in summary["skipped"][0]["reason"]
    assert "JPN" not in {r.culture for r in read_manifest(tmp_path / "ccub")}
    assert not (tmp_path / "ccub" / "cultures" / "JPN.jsonl").exists()
