"""Do the two form measures agree on what models draw? The planted judge (a network) and the hand-written
geometry (scoft/geometry.py, no learning) on real model outputs: the planted base and each culture's LoRA
drawing that culture's held-out captions with the evaluation's sampler and seeds, as `evaluate@C` does.

For each model and culture: the stereotype-form share by each measure and the share of images on which
they agree (scoft.evaluate.form_shares, what every evaluation report now shows). The base's rows are
its own stereotype-form share on those captions, by both measures.

    .venv/bin/python -m bench.form_agreement --workspace DIR [--json bench/results/form_agreement.json]

DIR: a workspace after `scoft base` and `scoft train --culture C` (`make run`, or the test suite's
planted run): models/base (with its judge), models/lora/<C>, data/ccub, params.yaml.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from scoft.ccub import HELDOUT, read_manifest
from scoft.config import ModelParams, load_params
from scoft.evaluate import as_tensors, form_shares, planted_judge
from scoft.negatives import generate
from scoft.paths import BASE, CANDIDATE


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    from scoft.models import load_pipeline

    ws = args.workspace
    params = load_params(ws / "params.yaml")
    pipe = load_pipeline(ModelParams(base=str(ws / "models/base"), resolution=params.model.resolution))
    judge = planted_judge(ws / "models/base/judge")
    settings, e = params.sampling("evaluate"), params.evaluate
    seeds = [e.seed + j for j in range(e.samples_per_prompt)]
    figures = {}
    for lora in sorted((ws / "models/lora").glob("*/pytorch_lora_weights.safetensors")):
        culture = lora.parent.name
        held = [r for r in read_manifest(ws / "data/ccub", culture) if r.split == HELDOUT]
        prompts = [r.caption for r in held for _ in seeds]
        images = {BASE: generate(pipe, prompts, seeds * len(held), settings)}
        pipe.load_lora_weights(str(lora.parent))
        images[CANDIDATE] = generate(pipe, prompts, seeds * len(held), settings)
        pipe.unload_lora_weights()
        tensors = {name: as_tensors(imgs, params.model.resolution, "cpu") for name, imgs in images.items()}
        categories = np.array([r.category for r in held for _ in seeds])
        shares = form_shares(judge, tensors, categories, np.array([culture] * len(prompts)))
        figures[culture] = {name: block["overall"] for name, block in shares.items()}
        for name, m in figures[culture].items():
            print(f"| {culture} | {name} | {m['judge']:.2f} | {m['geometry']:.2f} | {m['agreement']:.2f} | "
                  f"{m['images']} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"workspace_params": params.model_dump(mode="json")["planted"],
                                               "cultures": figures}, indent=1))


if __name__ == "__main__":
    main()
