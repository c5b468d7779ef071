"""S3 against moto's server on loopback: an S3 prefix as a CCUB source, and S3 as the DVC remote."""

import shutil
import subprocess
import sys

import boto3
import pytest

from scoft.ccub import read_manifest
from scoft.fetch import FetchPolicy, s3_client
from scoft.io import dvc_dir_hash, sha256_file
from scoft.remote import dvc_environment
from tests.conftest import make_workspace, scoft
from tests.helpers import ingest_offline

SECRET = "test-secret-do-not-log"
LOOPBACK = ("127.0.0.1/32",)  # moto's server, allowed by the outbound-address policy as an internal store would be


def _bucket(endpoint: str, name: str):
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=name)
    return client


def test_s3_prefix_source_is_ingested_and_reused_by_etag(s3_server, sample_dir, tmp_path):
    client = _bucket(s3_server, "ccub-source")
    for path in (sample_dir / "train").rglob("*"):
        if path.is_file():
            client.upload_file(
                str(path), "ccub-source", f"kor-2024/{path.relative_to(sample_dir / 'train').as_posix()}"
            )
    messages = []
    options = dict(s3_endpoint_url=s3_server, progress=messages.append, policy=FetchPolicy(allow_networks=LOOPBACK))
    first = ingest_offline(["s3://ccub-source/kor-2024"], tmp_path / "ccub", **options)
    assert first["added"] == 63 and first["rejected"] == []
    records = read_manifest(tmp_path / "ccub")
    assert all(r.location.startswith("s3://ccub-source/kor-2024/images/") and r.etag for r in records)
    second = ingest_offline(["s3://ccub-source/kor-2024"], tmp_path / "ccub", **options)
    assert second["version"] == first["version"] and second["unchanged"] == 63
    assert messages[-1].endswith("fetching 0")


def test_s3_client_honours_when_required_checksums(s3_server):
    config = s3_client(s3_server, LOOPBACK).meta.config
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"


def _dvc(ws, *args):
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws, capture_output=True, text=True,
                         env=dvc_environment())
    assert out.returncode == 0, out.stderr + out.stdout
    return out.stdout + out.stderr


def test_dvc_remote_on_s3_push_wipe_pull_gives_identical_data(s3_server, sample_dir, tmp_path):
    _bucket(s3_server, "dvc-store")
    ws = make_workspace(tmp_path / "ws", sample_dir)
    _dvc(ws, "repro", "--single-item", "ingest")
    configured = scoft("remote", "--url", "s3://dvc-store/scoft", "--endpoint-url", s3_server, cwd=ws)
    assert configured.returncode == 0, configured.stderr
    assert "s3://dvc-store/scoft" in configured.stdout and SECRET not in configured.stdout
    for name in ("config", "config.local"):
        assert SECRET not in (ws / ".dvc" / name).read_text()
    assert "scoft-s3" in (ws / ".dvc" / "config.local").read_text()  # DVC keeps config.local out of git

    before = {p.relative_to(ws / "data/ccub"): sha256_file(p) for p in (ws / "data/ccub").rglob("*") if p.is_file()}
    version = dvc_dir_hash(ws / "data/ccub")
    pushed = _dvc(ws, "push")
    assert SECRET not in pushed
    listed = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket="dvc-store", Prefix="scoft/")
    assert listed["KeyCount"] >= 37  # every image, the manifest and the .dir listing

    shutil.rmtree(ws / ".dvc" / "cache")
    shutil.rmtree(ws / "data" / "ccub")
    _dvc(ws, "pull", "ingest")
    after = {p.relative_to(ws / "data/ccub"): sha256_file(p) for p in (ws / "data/ccub").rglob("*") if p.is_file()}
    assert after == before and dvc_dir_hash(ws / "data/ccub") == version


@pytest.mark.parametrize("url", ["https://example.org/x", "dvc-store/x"])
def test_remote_url_must_be_s3(tmp_path, url):
    from tests.conftest import ROOT

    out = scoft("remote", "--url", url, "--params", str(ROOT / "params.yaml"), cwd=tmp_path)
    assert out.returncode == 2 and "s3://bucket/prefix" in out.stderr
