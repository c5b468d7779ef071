"""Does SCoFT move the planted-bias base away from its stereotype and toward CCUB?

The loss sets (LDM, +M, +MP, +MPC), several training seeds each, on a planted-bias base (models/base,
built by `scoft base`) and the built-in CCUB sample; one LoRA per culture (the paper's setting) unless
--joint. Every model draws every held-out caption with the same sampling seeds (scoft.evaluate.compare),
and is scored twice:
- by the evaluation's own metrics (features.evaluation): distance to the held-out image of the same
  caption, culture retrieval accuracy, and for the generic prompts the retrieved cultures' entropy;
- by the oracle that knows the planted rule: the share of images nearer the culture's stereotype
  palette than its truth palette, the distance to the truth palette, and for the generic prompts the
  share drawn in the generic lean's stereotype.
Per prompt, values are averaged over its sampling seeds; intervals are 95% bootstrap resampling the
training seeds, the categories and the prompts within them together, and each model's improvement over
the base (and +MPC's over LDM) is paired by prompt (and by training seed). So the table says whether the
generic metrics agree with the oracle.

    .venv/bin/python -m bench.planted_bias --base models/base --seeds 3 [--steps 300] [--joint] \
        [--set train.lr=3e-4 ...] [--losses ldm,ldm+mem+perceptual+contrastive] [--json out.json] \
        [--work DIR] [--fast train.sampler=dpm-solver++,train.sampler_steps=2]

--fast trains +MPC a second time with those overrides ("+MPC fast"), on the same data and seeds, and the
tables add its paired difference from +MPC and from LDM: whether a cheaper setting keeps the effect.

`--combine A.json B.json ... [--ccub DIR]` prints the metric tables of several runs' --json files as one
(loss sets trained in parallel processes, one thread each, on the same sample and base).

With --work, the sample, negatives and LoRAs stay in DIR and a rerun skips every LoRA already trained
there (the full run takes about 45 minutes on 2 cores: a stopped run loses nothing finished).

Prints markdown tables (BENCHMARKS.md keeps the figures).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from scoft.captions import FallbackCaptioner
from scoft.ccub import ingest, read_manifest
from scoft.config import LOSS_SETS, load_params, with_overrides
from scoft.data import image_transform
from scoft.evaluate import BASE, compare
from scoft.features import build_distance
from scoft.geometry import stereotype_form_share as geometric_form_share
from scoft.judge import load_judge, stereotype_form_share
from scoft.models import load_pipeline
from scoft.negatives import make_negatives
from scoft.paths import LORA_FILE
from scoft.planted import GENERIC_LEAN, JUDGE_DIR, STEREOTYPES, WEB_ENCODER_DIR, palette_distance, stereotype_oracle
from scoft.sample import CULTURES, write_sample
from scoft.stats import hierarchical_bootstrap_ci
from scoft.train import train

NAMES = dict(zip(LOSS_SETS, ["LDM", "+M", "+MP", "+MPC"]))
FAST = "+MPC fast"  # +MPC under --fast's overrides, unless --fast-name names it
# (key, title, whether lower is better)
METRICS = [  # the primary metric, named in advance: distance to the held-out image (the gate's); the rest secondary
    ("distance", "PRIMARY: distance to held-out image (evaluation backbone, the gate's metric)", True),
    ("form_share", "stereotype form share (judge: shape, whatever the colours)", True),
    ("geometry_form_share", "stereotype form share (hand-written geometry, built apart from the judge)", True),
    ("stereotype_share", "stereotype palette share (palette oracle)", True),
    ("truth_distance", "distance to truth palette (oracle)", True),
    ("other_culture_share", "share drawn in another culture's palette (oracle: cross-culture bleed)", True),
    ("retrieval", "culture retrieval accuracy (evaluation backbone)", False),
]


def nearest_palette(image) -> str:
    """Which planted palette an image is drawn in: '<culture> truth' or '<culture> stereotype'."""
    palettes = {f"{c} truth": CULTURES[c][1:] for c in CULTURES} | {
        f"{c} stereotype": STEREOTYPES[c] for c in STEREOTYPES
    }
    return min(palettes, key=lambda name: palette_distance(image, palettes[name]))


def oracle_scores(images: list, held: list, per_prompt: int, judge) -> dict[str, np.ndarray]:
    """Per held-out prompt, over its sampling seeds: stereotype share, distance to the truth palette,
    and the share nearest another culture's truth or stereotype (what a LoRA learned from the others)."""
    cultures = [r.culture for r in held for _ in range(per_prompt)]
    share = [stereotype_oracle(im, c) for im, c in zip(images, cultures)]
    distance = [palette_distance(im, CULTURES[c][1:]) for im, c in zip(images, cultures)]
    other = [not nearest_palette(im).startswith(c) for im, c in zip(images, cultures)]
    pixels = torch.stack([image_transform(32)(im) for im in images])
    form = stereotype_form_share(judge, pixels)
    geometry = geometric_form_share(pixels.numpy(), [r.category for r in held for _ in range(per_prompt)])

    def per_prompt_mean(values):
        return np.array(values, float).reshape(len(held), per_prompt).mean(1)

    return {"form_share": per_prompt_mean(form), "geometry_form_share": per_prompt_mean(geometry),
            "stereotype_share": per_prompt_mean(share),
            "truth_distance": per_prompt_mean(distance),
            "other_culture_share": per_prompt_mean(other)}


def cell(values: np.ndarray, categories: np.ndarray) -> str:
    """Mean of a [training seeds, prompts] table with its 95% interval resampling training seeds,
    categories and prompts within them together (scoft.stats.hierarchical_bootstrap_ci)."""
    clusters = categories if len(set(categories.tolist())) > 1 else None
    interval = hierarchical_bootstrap_ci(values, clusters, 2000, 0)
    if interval is None:
        return f"{values.mean():.3f} (no interval)"
    return f"{values.mean():.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def prepare(params, work: Path, per_category: int, heldout_per_category: int, cultures: list[str], split: str):
    """The CCUB sample ingested, the base's negatives of `cultures` sampled; returns the base pipe and
    the records."""
    write_sample(work / "sample", per_category=per_category, heldout_per_category=heldout_per_category, split=split)
    ingest([str(work / "sample")], work / "ccub", heldout_fraction=params.ingest.heldout_fraction,
           max_pixels=10**8, max_rejected_fraction=0.0, captioner=FallbackCaptioner(), progress=lambda m: None)
    pipe = load_pipeline(params.model)
    for culture in cultures:  # a folder per culture, as the pipeline: the joint LoRA reads all of them
        make_negatives(params, work / "ccub", work / "negatives" / culture, pipe=pipe, progress=lambda m: None,
                       culture=culture)
    return pipe, read_manifest(work / "ccub")


def train_models(params, losses: str, seed: int, work: Path, joint: bool, cultures: list[str],
                 tag: str = "") -> tuple[Path | dict[str, Path], float]:
    """One loss set at one training seed: a LoRA per culture (or one joint LoRA); the seconds it took.
    `tag` tells apart the folders of the same loss set under other settings."""
    tp = params.train.model_copy(update={"losses": losses, "seed": params.train.seed + seed, "checkpoint_every": 0})
    variant = params.model_copy(update={"train": tp})
    started = time.monotonic()
    name = f"{losses}{tag}-{seed}"
    folders = {None: work / name} if joint else {c: work / f"{name}-{c}" for c in cultures}
    for culture, folder in folders.items():
        if (folder / LORA_FILE).is_file():  # trained by an earlier, stopped run in the same --work
            continue
        negatives = work / "negatives" / culture if culture else work / "negatives"
        train(variant, work / "ccub", negatives, folder, None, progress=lambda m: None,
              pipe=load_pipeline(params.model), culture=culture)
    return (folders[None] if joint else folders), time.monotonic() - started


def table(per_model: dict[str, dict[str, np.ndarray]], cultures: np.ndarray, categories: np.ndarray) -> list[str]:
    """One block per metric: per culture, each model's mean and interval, and its paired improvement
    over the base (sign so that positive is better), and +MPC against LDM where both ran."""
    lines = []
    names = list(per_model)
    for key, title, lower_better in METRICS:
        sign = 1 if lower_better else -1
        variants = [n for n in names if n not in (BASE, *NAMES.values())]  # +MPC under --fast's overrides
        pairs = [(n, BASE) for n in names if n != BASE] + [
            (a, b) for a, b in (("+MPC", "LDM"), *((v, m) for v in variants for m in ("+MPC", "LDM")))
            if {a, b} <= set(names)]
        lines += [f"**{title}** ({'lower' if lower_better else 'higher'} is better); improvement: paired, positive "
                  "is better", "", "| culture | " + " | ".join(names) + " | " +
                  " | ".join(f"{a} vs {b}" for a, b in pairs) + " |", "|---" * (1 + len(names) + len(pairs)) + "|"]
        for culture in [*sorted(set(cultures)), "all"]:
            idx = np.ones(len(cultures), bool) if culture == "all" else cultures == culture
            values = [cell(per_model[n][key][:, idx], categories[idx]) for n in names]
            # paired by prompt (and by training seed between two trained models; the base is one run)
            gains = [cell(sign * (per_model[b][key][:, idx] - per_model[a][key][:, idx]), categories[idx])
                     for a, b in pairs]
            lines.append(f"| {culture} | " + " | ".join(values + gains) + " |")
        lines.append("")
    return lines


def generic_lines(result: dict, models: dict[str, list[str]]) -> list[str]:
    """Per loss set: the generic prompts' oracle lean share and the evaluation's retrieval entropy,
    averaged over the training seeds (and, per culture, over the cultures' LoRAs)."""
    generic = result["metrics"]["generic_prompts"]
    lines = [f"**Prompts naming no culture** ({len(generic['prompts'])} prompts x seeds): share drawn in the "
             f"generic lean's ({GENERIC_LEAN}) stereotype (oracle), and the entropy of the cultures the evaluation "
             f"retrieves (bits, even spread {generic['max_entropy_bits']:.2f})", "",
             "| model | lean share (oracle) | retrieval entropy | retrieved shares |", "|---|---|---|---|"]
    for name, runs in models.items():
        rows = [k for k in result["generic_images"] if k.split("[")[0] in runs]  # "+MPC s0[KOR]" -> "+MPC s0"
        lean = np.mean(
            [
                np.mean([nearest_palette(im) == f"{GENERIC_LEAN} stereotype" for im in result["generic_images"][k]])
                for k in rows
            ]
        )
        entropy = np.mean([generic["models"][k]["entropy_bits"] for k in rows])
        shares = {
            c: np.mean([generic["models"][k]["shares"][c] for k in rows]) for c in generic["models"][BASE]["shares"]
        }
        lines.append(
            f"| {name} | {lean:.2f} | {entropy:.2f} | " + ", ".join(f"{c} {v:.2f}" for c, v in shares.items()) + " |"
        )
    return lines


def quality_lines(metrics: dict, models: dict[str, list[str]]) -> list[str]:
    """KID, within-prompt diversity and memorisation (overall), averaged over the training seeds."""
    def mean_of(block: str, runs: list[str], field: str = "mean") -> str:
        values = [metrics[block][r]["overall"][field] for r in runs if "overall" in metrics[block][r]
                  and field in metrics[block][r]["overall"]]
        return f"{np.mean(values):.4f}" if values else "n/a"

    lines = [
        "**KID, diversity and memorisation** (evaluation backbone, all held-out prompts, mean over training seeds)",
        "",
        "| model | KID | within-prompt diversity | memorisation share |",
        "|---|---|---|---|",
    ]
    for name, runs in models.items():
        lines.append(
            f"| {name} | {mean_of('kid', runs)} | {mean_of('diversity', runs)} | {mean_of('memorisation', runs)} |"
        )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="models/base", help="the planted-bias base folder (scoft base)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per loss set")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default train.max_steps)")
    parser.add_argument("--losses", default=",".join(LOSS_SETS), help="comma-separated loss sets")
    parser.add_argument("--joint", action="store_true", help="one LoRA for all cultures instead of one per culture")
    parser.add_argument("--per-category", type=int, default=4, help="training images per culture and category")
    parser.add_argument("--heldout-per-category", type=int, default=3, help="held-out images per culture and category")
    parser.add_argument("--split", choices=["reporting", "tuning"], default="reporting",
                        help="tune settings on the tuning sample, report on the reporting one (the default)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="params override")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--json", default=None, help="also write the per-prompt results here")
    parser.add_argument("--work", default=None, help="keep the work here; a rerun skips the LoRAs trained there")
    parser.add_argument("--cultures", default=",".join(CULTURES), help="comma-separated: train and judge these")
    parser.add_argument("--fast", default=None, metavar="SECTION.KEY=VALUE,...",
                        help="also train +MPC with these overrides, side by side")
    parser.add_argument("--fast-name", default=FAST, help="what the tables call the model --fast trains")
    args = parser.parse_args()
    overrides = [f"model.base={args.base}", f"features.judge={args.base}/{JUDGE_DIR}",
                 f"features.web_encoder={args.base}/{WEB_ENCODER_DIR}", *args.set]
    overrides += [f"train.max_steps={args.steps}"] if args.steps else []
    params = with_overrides(load_params(args.params), overrides)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="scoft-planted-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    e = params.evaluate
    try:
        chosen = args.cultures.split(",")
        pipe, records = prepare(params, work, args.per_category, args.heldout_per_category, chosen, args.split)
        runs, seconds = {}, {}
        for losses in args.losses.split(","):
            for seed in range(args.seeds):
                runs[f"{NAMES[losses]} s{seed}"], took = train_models(params, losses, seed, work, args.joint, chosen)
                seconds.setdefault(NAMES[losses], []).append(took)
        if args.fast:
            fast = with_overrides(params, args.fast.split(","))
            for seed in range(args.seeds):
                runs[f"{args.fast_name} s{seed}"], took = train_models(fast, LOSS_SETS[-1], seed, work, args.joint,
                                                                       chosen, "-fast")
                seconds.setdefault(args.fast_name, []).append(took)
        distance = build_distance(params.features.evaluation, params.features, params.model.seed)
        judge = load_judge(Path(args.base) / JUDGE_DIR)
        result = compare(
            pipe,
            runs,
            records,
            work / "ccub",
            distance,
            params.sampling("evaluate"),
            e.samples_per_prompt,
            e.seed,
            e.bootstrap,
            progress=lambda m: None,
            cultures=chosen,
        )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    held, per_prompt = result["held"], e.samples_per_prompt
    models = {
        BASE: [BASE],
        **{NAMES[ls]: [f"{NAMES[ls]} s{s}" for s in range(args.seeds)] for ls in args.losses.split(",")},
        **({args.fast_name: [f"{args.fast_name} s{s}" for s in range(args.seeds)]} if args.fast else {}),
    }
    per_run = {
        name: {**oracle_scores(images, held, per_prompt, judge),
               **{k: v[name] for k, v in result["per_prompt"].items()}}
        for name, images in result["images"].items()
    }
    per_model = {  # [training seeds, prompts]: intervals resample both
        name: {k: np.stack([per_run[r][k] for r in rs]) for k in per_run[BASE]} for name, rs in models.items()
    }
    cultures, categories = np.array([r.culture for r in held]), np.array([r.category for r in held])
    print(f"base {args.base}; {'one joint LoRA' if args.joint else 'one LoRA per culture'}; held-out prompts: "
          f"{len(held)} ({', '.join(f'{c} {int((cultures == c).sum())}' for c in chosen)}), {per_prompt} sampling "
          f"seeds each, {args.seeds} training seed(s) per loss set; evaluation backbone {params.features.evaluation}; "
          f"split {args.split}; overrides: {', '.join(overrides)}"
          + (f"; {args.fast_name}: {args.fast}" if args.fast else ""))
    takeover = generic_takeover(result["metrics"]["generic_prompts"])
    print("\n".join(["", *table(per_model, cultures, categories), *generic_lines(result, models),
                      *takeover_lines([{"generic_takeover": takeover}], params.promotion.max_generic_takeover), "",
                     *quality_lines(result["metrics"], models), ""]))
    print("training seconds per loss set and seed: " + ", ".join(f"{n} {np.mean(v):.0f}" for n, v in seconds.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "overrides": overrides, "fast": args.fast, "joint": args.joint, "cultures": cultures.tolist(),
            "categories": categories.tolist(), "seconds": seconds,
            "models": {n: {k: v.tolist() for k, v in m.items()} for n, m in per_model.items()},
            "generic_takeover": takeover}, indent=1))


def generic_takeover(generic: dict) -> dict[str, float]:
    """Per culture's LoRA ("+MPC s0[KOR]"), what the gate's generic rule weighs: the share of the prompts
    naming no culture that it draws as its own culture, less the base's."""
    base = generic["models"][BASE]["shares"]
    return {name: round(m["shares"][name[-4:-1]] - base[name[-4:-1]], 4)
            for name, m in generic["models"].items() if name.endswith("]")}


def takeover_lines(runs: list[dict], limit: float) -> list[str]:
    """Per loss set and culture, the mean generic takeover of its LoRAs and how many pass the gate's rule."""
    per = {}
    for run in runs:
        for name, rise in run.get("generic_takeover", {}).items():
            per.setdefault((name.split(" s")[0], name[-4:-1]), []).append(rise)
    if not per:
        return []
    lines = ["", f"**Generic takeover** (the gate's rule: prompts naming no culture drawn as the LoRA's culture, "
                 f"less the base's, at most {limit}): mean over training seeds, and LoRAs within the rule", "",
             "| model | culture | mean rise | within the rule |", "|---|---|---|---|"]
    for (model, culture), rises in sorted(per.items()):
        lines.append(f"| {model} | {culture} | {np.mean(rises):.2f} | {sum(r <= limit for r in rises)}/{len(rises)} |")
    return lines


def combine(files: list[str], ccub: Path | None) -> None:
    """The metric tables of several runs' --json files as one (each a loss set trained in a process of
    its own, on the same sample, base, prompts and seeds: the base's values are the same in each)."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    per_model = {}
    for run in runs:
        for name, metrics in run["models"].items():
            per_model.setdefault(name, {k: np.array(v) for k, v in metrics.items()})
    cultures = np.array(runs[0]["cultures"])
    if "categories" in runs[0]:
        categories = np.array(runs[0]["categories"])
    else:  # files written before categories were kept: the held-out records in the evaluation's order
        held = [r for r in read_manifest(ccub) if r.split == "heldout"]
        categories = np.array([r.category for r in held])
        assert [r.culture for r in held] == cultures.tolist(), "the held-out records are not the runs' prompts"
    seeds = {n: len(next(iter(m.values()))) for n, m in per_model.items()}
    print(f"combined from {', '.join(files)}; training seeds per model: {seeds}; held-out prompts: {len(cultures)}")
    limit = load_params().promotion.max_generic_takeover
    print("\n".join(["", *table(per_model, cultures, categories), *takeover_lines(runs, limit)]))


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if len(sys.argv) > 2 and sys.argv[1] == "--combine":  # --combine A.json B.json ... [--ccub DIR]
        names = sys.argv[2:]
        ccub_dir = Path(names[names.index("--ccub") + 1]) if "--ccub" in names else None
        combine([n for i, n in enumerate(names) if n != "--ccub" and (i == 0 or names[i - 1] != "--ccub")], ccub_dir)
    else:
        main()
