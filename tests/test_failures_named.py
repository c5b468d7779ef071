"""Failures an operator reads in one line, naming the key or the path: an unanswering hub, a model
that is not there (not retried), a full disk."""

import os
import socket
import subprocess
import sys
import threading

import pytest
import yaml
from prefect import flow

from tasks.dvc import BadConfiguration, stage_task
from tests.conftest import scoft, write_params


@pytest.fixture
def silent_hub():
    """A loopback 'hub' that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held = []

    def accept():
        while True:
            try:
                held.append(server.accept())
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def test_a_hub_that_never_answers_fails_at_the_stall_limit_naming_the_key(tmp_path, silent_hub, monkeypatch):
    params = write_params(tmp_path / "params.yaml", {"model.base": "org/some-model", "model.hub_stall_timeout_s": 1})
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", silent_hub)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = scoft("negatives", "--ccub", str(tmp_path / "none"), "--params", str(params), cwd=tmp_path)
    # without the limit this hangs for the stage's time limit (an hour); scoft() gives up after 600 s
    assert out.returncode == 1, out.stderr[-2000:]
    assert "error: model.base: 'org/some-model': the hub did not answer" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_missing_model_fails_once_as_a_configuration_error(prefect_server, tmp_path):
    write_params(tmp_path / "params.yaml", {"model.base": "org/not-downloaded", "orchestration.stage_retries": 2,
                                            "orchestration.stage_retry_delay_s": 0})
    bin_dir = os.path.dirname(sys.executable)
    stages = {"negatives": {"cmd": f"echo try >> tries && {bin_dir}/scoft negatives --ccub none"}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)

    @flow
    def negatives_only(workdir: str):
        stage_task(workdir)("negatives", workdir)

    with pytest.raises(BadConfiguration) as err:
        negatives_only(str(tmp_path))
    assert "model.base: cannot load 'org/not-downloaded'" in str(err.value)
    assert (tmp_path / "tries").read_text().split() == ["try"]  # not retried: the model would still be missing


def test_a_full_disk_is_one_line_naming_the_path_and_the_free_space(tmp_path):
    """On a 16 KiB tmpfs, mounted in a private user and mount namespace (no root needed)."""
    disk = tmp_path / "small-disk"
    disk.mkdir()
    scoft_bin = os.path.join(os.path.dirname(sys.executable), "scoft")
    command = f"mount -t tmpfs -o size=16k tmpfs {disk} && {scoft_bin} sample --out {disk}/sample"
    try:
        out = subprocess.run(["unshare", "-Urm", "sh", "-c", command], capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        pytest.skip("no unshare here")
    if "mount:" in out.stderr or "unshare:" in out.stderr:
        pytest.skip(f"cannot mount a small tmpfs here: {out.stderr.strip()}")
    assert out.returncode == 1
    assert out.stderr.strip() == f"error: no space left on device writing {disk}/sample (0.0 MiB free on {disk})"
