"""Negatives: cached by (model, caption, seed, settings), batched, optionally depth-guided."""

import dataclasses

import pytest
from PIL import Image

from scoft.ccub import read_manifest
from scoft.config import ModelParams
from scoft.models import load_pipeline, model_fingerprint
from scoft.negatives import (
    DepthEstimator,
    depth_control,
    depth_guided_pipeline,
    generate,
    plan_negatives,
    read_negative_index,
    sample_negatives,
    simple_depth,
)
from tests.conftest import TEST_BASE
from tests.helpers import TINY_SAMPLING

SETTINGS = TINY_SAMPLING


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(ModelParams(base=TEST_BASE, resolution=32))


def test_adding_one_record_samples_exactly_k_new_images(pipe, prepared, tmp_path):
    records = [r for r in read_manifest(prepared[0]) if r.split == "train"]
    fingerprint = model_fingerprint(pipe)
    quiet = dict(batch_size=16, settings=SETTINGS, progress=lambda m: None)
    before = sample_negatives(pipe, plan_negatives(records[:-1], fingerprint, SETTINGS, 3, 1), tmp_path, **quiet)
    assert before["sampled"] == 3 * (len(records) - 1)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.png")}
    after = sample_negatives(pipe, plan_negatives(records, fingerprint, SETTINGS, 3, 1), tmp_path, **quiet)
    assert (after["sampled"], after["reused"], after["removed"]) == (3, 3 * (len(records) - 1), 0)
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in tmp_path.glob("*.png") if p.name in stamps)
    assert {row["record_id"] for row in read_negative_index(tmp_path)} == {r.id for r in records}


def test_the_joint_lora_reads_every_cultures_negatives(tmp_path):
    """data/negatives has no index of its own: its rows are every culture folder's, paths below it."""
    from scoft.io import write_jsonl

    for culture, ids in (("KOR", ["k1", "k2"]), ("NGA", ["n1"])):
        write_jsonl(tmp_path / culture / "index.jsonl", [{"record_id": i, "file": f"{i}.png"} for i in ids])
    (tmp_path / "MEX").mkdir()  # a culture folder without an index (skipped) adds nothing
    rows = read_negative_index(tmp_path)
    assert [(r["record_id"], r["file"]) for r in rows] == [("k1", "KOR/k1.png"), ("k2", "KOR/k2.png"),
                                                           ("n1", "NGA/n1.png")]
    assert read_negative_index(tmp_path / "KOR")[0]["file"] == "k1.png"


def test_a_changed_caption_or_setting_makes_new_keys(pipe, prepared):
    record = [r for r in read_manifest(prepared[0]) if r.split == "train"][0]
    fp = model_fingerprint(pipe)
    key = plan_negatives([record], fp, SETTINGS, 1, 1)[0]["key"]
    assert plan_negatives([dataclasses.replace(record, caption="another caption")], fp, SETTINGS, 1, 1)[0]["key"] != key
    assert plan_negatives([record], fp, {**SETTINGS, "steps": 3}, 1, 1)[0]["key"] != key
    assert plan_negatives([record], "other-model", SETTINGS, 1, 1)[0]["key"] != key


def test_an_image_does_not_depend_on_its_batch(pipe):
    together = generate(pipe, ["a house", "a bowl of food"], [5, 6], SETTINGS)
    alone = generate(pipe, ["a bowl of food"], [6], SETTINGS)
    assert together[1].tobytes() == alone[0].tobytes()


def test_depth_guided_negatives_follow_the_control_image(pipe, prepared):
    record = [r for r in read_manifest(prepared[0]) if r.split == "train"][0]
    with Image.open(prepared[0] / record.file) as im:
        depth = simple_depth(im.convert("RGB"), 32)
    assert depth.size == (32, 32) and depth.mode == "RGB"
    guided = depth_guided_pipeline(pipe, "tiny")
    plain = generate(pipe, [record.caption], [1], SETTINGS)[0]
    a = generate(guided, [record.caption], [1], SETTINGS, [depth])[0]
    b = generate(guided, [record.caption], [1], SETTINGS, [depth.transpose(Image.Transpose.FLIP_TOP_BOTTOM)])[0]
    assert a.tobytes() != plain.tobytes() and a.tobytes() != b.tobytes()
    again = generate(guided, [record.caption], [1], SETTINGS, [depth])[0]
    assert again.tobytes() == a.tobytes()


def test_each_negative_is_guided_by_its_own_records_depth(prepared):
    """make_negatives' control: a plan row's control image is the depth map of its own record's image."""
    records = [r for r in read_manifest(prepared[0]) if r.split == "train"][:2]
    control = depth_control(records, prepared[0], DepthEstimator("simple", 32))
    maps = [control({"record_id": r.id}).tobytes() for r in records]
    for r, depth in zip(records, maps):
        with Image.open(prepared[0] / r.file) as im:
            assert depth == simple_depth(im.convert("RGB"), 32).tobytes()
    assert maps[0] != maps[1]
