"""The DVC remote from params.yaml: a local folder (default) or S3 / any S3-compatible store.

The S3 settings go to `.dvc/config.local`, which DVC keeps out of git. Credentials are never
written anywhere: DVC and boto3 read them from the environment or an AWS profile.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from scoft.config import RemoteParams

S3_REMOTE = "scoft-s3"
# S3-compatible stores (MinIO, Ceph, moto...) reject the newer default integrity checksums.
CHECKSUM_ENV = {"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}


def dvc_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in CHECKSUM_ENV.items():
        env.setdefault(key, value)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def _dvc(root: Path, *args: str) -> None:
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=dvc_environment(),
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"`dvc {' '.join(args)}` failed: {out.stderr.strip() or out.stdout.strip()}")


def configure_remote(root: str | Path, remote: RemoteParams) -> str:
    """Make the configured remote DVC's default; return a description without any secret."""
    root = Path(root)
    if remote.url is None:
        local = root / ".dvc" / "config.local"
        if local.is_file() and S3_REMOTE in local.read_text(encoding="utf-8"):
            _dvc(root, "remote", "remove", "--local", S3_REMOTE)
        return "the default remote of .dvc/config"
    _dvc(root, "remote", "add", "--local", "--force", "--default", S3_REMOTE, remote.url)
    if remote.endpoint_url:
        _dvc(root, "remote", "modify", "--local", S3_REMOTE, "endpointurl", remote.endpoint_url)
    if remote.profile:
        _dvc(root, "remote", "modify", "--local", S3_REMOTE, "profile", remote.profile)
    return f"{remote.url}" + (f" at {remote.endpoint_url}" if remote.endpoint_url else "")
