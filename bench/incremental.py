"""What a CCUB update costs: one new record of one culture against a full retrain of every culture.

A DVC workspace (this checkout's dvc.yaml, params.yaml and scoft/, the built-in sample, a local
remote) is reproduced from scratch (`dvc repro`: every culture's negatives, LoRA and evaluation),
then one KOR training image is added to the sample and `dvc repro` runs again: only KOR's chain runs.
Both are wall-clock times of the same commands on this machine, printed with their ratio last;
with N trained cultures the target is about 1/N plus the fixed cost (ingest, validate, DVC).

    .venv/bin/python -m bench.incremental [--base models/base] [--steps 300] [--set train.lr=1e-3 ...]

The base defaults to the planted-bias base already built in models/base (`scoft base`), so the
benchmark times the fine-tuning, not the base's pretraining.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from scoft.sample import add_sample_image, write_sample

ROOT = Path(__file__).resolve().parents[1]


def workspace(folder: Path, overrides: dict) -> Path:
    """A checkout-like DVC workspace with the sample as its only source."""
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", folder / "dvc.yaml")
    shutil.copytree(ROOT / "scoft", folder / "scoft", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in overrides.items():
        section, leaf = key.split(".", 1)
        params[section][leaf] = value
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_sample(folder / "data/sample")
    for args in (["init", "--no-scm", "-q"], ["config", "core.analytics", "false"]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=folder, check=True, capture_output=True)
    return folder


def repro(folder: Path) -> tuple[float, list[str]]:
    """`dvc repro` of the whole graph: its seconds and the stages that ran."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=folder, env=env, capture_output=True, text=True)
    took = time.monotonic() - started
    if out.returncode:
        raise SystemExit(f"dvc repro failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    ran = [line.split("'")[1] for line in out.stdout.splitlines() if line.startswith("Running stage '")]
    return took, ran


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(ROOT / "models/base"), help="base model folder or id")
    parser.add_argument("--steps", type=int, default=None, help="train.max_steps (default params.yaml's)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="params override")
    args = parser.parse_args()
    overrides = {"model.base": str(Path(args.base).resolve()) if Path(args.base).exists() else args.base,
                 **({"train.max_steps": args.steps} if args.steps else {}),
                 **{k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}}
    folder = Path(tempfile.mkdtemp(prefix="scoft-incremental-")) / "ws"
    try:
        ws = workspace(folder, overrides)
        full, full_ran = repro(ws)
        add_sample_image(ws / "data/sample", "KOR")
        update, update_ran = repro(ws)
        trained = sorted(p.parent.name for p in ws.glob("models/lora/*/pytorch_lora_weights.safetensors"))
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)
    print(f"overrides: {overrides}")
    print(f"full retrain: {full:.1f} s, stages run: {', '.join(full_ran)}")
    print(f"one new KOR record: {update:.1f} s, stages run: {', '.join(update_ran)}")
    print(f"cultures with a LoRA: {len(trained)} ({', '.join(trained)}); 1/N = {1 / len(trained):.2f}")
    print(f"update / full retrain: {update / full:.2f}")


if __name__ == "__main__":
    main()
