"""The workspace's shared names: where each stage reads and writes (dvc.yaml names the same paths),
and the exit statuses that tell the orchestrator not to retry. The CLI, tasks/ and flows/ import them
from here, so nothing reaches back up into the CLI."""

from pathlib import Path

BASE_DIR = Path("models/base")  # the planted-bias base model that the `base` stage builds
INGEST_SUMMARY = Path("data/ingest/summary.json")
CCUB_DIR, VALIDATION_DIR, NEGATIVES_DIR = Path("data/ccub"), Path("data/validation"), Path("data/negatives")
LORA_DIR, TRAIN_LOG_DIR = Path("models/lora"), Path("models/train_log")
EVAL_DIR, METRICS_DIR = Path("reports/eval"), Path("reports/metrics")
# The joint LoRA's evaluation per culture (evaluate_joint@C), beside the per-culture LoRAs' (evaluate@C)
JOINT_EVAL_DIR, JOINT_METRICS_DIR = Path("reports/eval_joint"), Path("reports/metrics_joint")
PROMOTION_DIR = Path("reports/promotion")  # each culture's promotion decision, rule by rule
METRICS_FILE = Path("reports/metrics.json")  # a joint LoRA's evaluation (scoft evaluate without --culture)
LORA_FILE = "pytorch_lora_weights.safetensors"
CHECKPOINTS = "checkpoints"  # in a LoRA folder: the resumable training checkpoints (scoft/train.py)


def build_checkpoints_dir(out_dir: Path) -> Path:
    """Where a build writing `out_dir` keeps its checkpoints (scoft/checkpoints.py): beside it, since DVC
    deletes a stage's output before running the stage (models/base -> models/.base.checkpoints)."""
    return Path(out_dir).parent / f".{Path(out_dir).name}.checkpoints"


SKIPPED_FILE = "skipped.json"  # in a culture's LoRA folder when it had nothing to train on: why
# The models an evaluation judges, by the names its outputs use (images/<model>/ in an evaluation folder)
CANDIDATE, BASE, PRODUCTION = "scoft", "base", "production"  # production: where the promote step samples it
IMAGES_DIR = "images"  # every image the evaluation judged, for the insiders' review (scoft/review)


JOINT = "joint"  # the folder name of the one LoRA for every culture (train.lora_per_culture: false)


def culture_paths(culture: str, joint: bool = False) -> dict[str, Path]:
    """One culture's stage outputs (dvc.yaml's foreach stages: negatives@C, train@C, evaluate@C).
    `joint`: the culture is served by the joint LoRA (train_joint), trained on every culture's
    records and negatives."""
    trained_by = JOINT if joint else culture
    return {"negatives": NEGATIVES_DIR if joint else NEGATIVES_DIR / culture, "lora": LORA_DIR / trained_by,
            "train_log": TRAIN_LOG_DIR / trained_by, "eval": (JOINT_EVAL_DIR if joint else EVAL_DIR) / culture,
            "metrics": (JOINT_METRICS_DIR if joint else METRICS_DIR) / f"{culture}.json"}


# Exit statuses that retrying cannot change (tasks/ reads them): a bad configuration (params or a
# model location that holds no model), and input data the stage refused.
CONFIG_ERROR = 2
DATA_REJECTED = 3
