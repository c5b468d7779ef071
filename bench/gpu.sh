#!/bin/bash
# The prepared GPU check (issues 4 and 11): run from the repository root on a GPU machine whose python3
# has torch; the project's other packages come as wheels in .whl/ when the machine cannot install
# them (see BENCHMARKS.md for how they were carried to the device tool's H200). Prints each benchmark's
# JSON and ratio; about 3 minutes on one H200.
set -u
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
timeout 300 python3 bench/train_step.py --scale sd15 --steps 20   # 512 px, bf16, gradient checkpointing
timeout 200 python3 bench/negatives.py --scale sd15 --images 32 --batch 8
