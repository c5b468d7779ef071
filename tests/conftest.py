import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Before any Prefect or GX import: no telemetry, Prefect state in a throwaway folder, no hub access.
_PREFECT_HOME = tempfile.mkdtemp(prefix="scoft-test-prefect-")
os.environ.update({
    "PREFECT_HOME": _PREFECT_HOME,
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
})

import pytest  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    from scoft.sample import write_sample

    return write_sample(tmp_path_factory.mktemp("sample") / "ccub-sample")


@pytest.fixture
def params():
    from scoft.config import load_params

    return load_params(ROOT / "params.yaml")


def make_workspace(path: Path, sample_dir: Path, overrides: dict | None = None) -> Path:
    """A DVC workspace like the project root: dvc.yaml, params.yaml, a local remote, the sample."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", path / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in (overrides or {}).items():
        *parents, key = dotted.split(".")
        node = params
        for p in parents:
            node = node[p]
        node[key] = value
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(sample_dir, path / "data" / "sample")
    dvc = [sys.executable, "-m", "dvc"]
    for args in (["init", "--no-scm", "-q"], ["config", "core.analytics", "false"],
                 ["remote", "add", "-d", "local", str(path.parent / f"{path.name}-remote")]):
        subprocess.run(dvc + args, cwd=path, check=True, capture_output=True)
    return path


def scoft(*args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run([str(BIN / "scoft"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
