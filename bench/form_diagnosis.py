"""Where does a LoRA's form stop? Its stereotype-form share (by the judge and by the hand-written geometry)
and stereotype-palette share on its own training captions and on the held-out captions, against the base.

A LoRA that leaves the stereotype's form on the held-out captions but not on its training captions cannot
learn the form at all; one that leaves it on both but less on the held-out ones does not carry it over.
Same sample, base, negatives and evaluation sampler as bench/planted_bias.py (whose helpers it uses).

    .venv/bin/python -m bench.form_diagnosis --base B --work DIR [--losses ldm] [--seeds 1] \
        [--set train.lora_targets="[to_q, to_k, to_v, to_out.0]"] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bench.planted_bias import prepare, train_models
from scoft.ccub import HELDOUT
from scoft.config import load_params, with_overrides
from scoft.data import image_transform
from scoft.geometry import stereotype_form_share as geometric_form_share
from scoft.judge import load_judge, stereotype_form_share
from scoft.negatives import generate
from scoft.planted import JUDGE_DIR, WEB_ENCODER_DIR, stereotype_oracle
from scoft.sample import CULTURES

MEASURES = ("judge form", "geometry form", "palette")


def shares(pipe, judge, records, culture: str, settings: dict, seeds: list[int]) -> list[float]:
    """Stereotype shares (judge's form, geometry's form, palette) of the images drawn for `records`."""
    images = generate(pipe, [r.caption for r in records for _ in seeds], seeds * len(records), settings)
    pixels = torch.stack([image_transform(32)(im) for im in images])
    categories = [r.category for r in records for _ in seeds]
    return [float(stereotype_form_share(judge, pixels).mean()), float(geometric_form_share(pixels, categories).mean()),
            float(np.mean([stereotype_oracle(im, culture) for im in images]))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the planted-bias base folder (scoft base)")
    parser.add_argument("--work", required=True, help="sample, negatives and LoRAs; a rerun reuses its LoRAs")
    parser.add_argument("--losses", default="ldm+mem+perceptual+contrastive")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="params override")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    params = with_overrides(load_params(), [f"model.base={args.base}", f"features.judge={args.base}/{JUDGE_DIR}",
                                            f"features.web_encoder={args.base}/{WEB_ENCODER_DIR}", *args.set])
    work, cultures = Path(args.work), list(CULTURES)
    pipe, records = prepare(params, work, 4, 3, cultures, "reporting")
    judge = load_judge(Path(args.base) / JUDGE_DIR)
    e = params.evaluate
    settings, seeds = params.sampling("evaluate"), [e.seed + j for j in range(e.samples_per_prompt)]
    sides = {c: {side: [r for r in records if r.culture == c and (r.split == HELDOUT) == (side == "held-out")]
                 for side in ("training", "held-out")} for c in cultures}
    rows = {f"base {c}": {side: shares(pipe, judge, recs, c, settings, seeds) for side, recs in sides[c].items()}
            for c in cultures}
    for seed in range(args.seeds):
        folders, _ = train_models(params, args.losses, seed, work, False, cultures)
        for culture, folder in folders.items():
            pipe.load_lora_weights(str(folder))
            rows[f"s{seed} {culture}"] = {side: shares(pipe, judge, recs, culture, settings, seeds)
                                          for side, recs in sides[culture].items()}
            pipe.unload_lora_weights()
    print(f"{args.losses}; overrides: {', '.join(args.set) or 'none'}; stereotype shares ({', '.join(MEASURES)})\n")
    print("| model | training captions | held-out captions |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(", ".join(f"{v:.2f}" for v in row[side]) for side in row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"losses": args.losses, "overrides": args.set, "measures": MEASURES,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
