"""Where each stage reads and writes in a workspace (dvc.yaml names the same paths)."""

from pathlib import Path

BASE_DIR = Path("models/base")  # the planted-bias base model that the `base` stage builds
