"""Does the gate see form? Renders standing in for a candidate's outputs, fed through the project's own
evaluation (scoft.evaluate.compare, one culture at a time as the evaluate stage runs it) and gate
(scoft.promotion.decide, then hold_family over the three cultures of one retrain).

The base draws each culture's prompts as the planted web's stereotype (its form and palette), as the
planted base does. Three candidates per culture: `palette` (the stereotype's form in the truth's
palette), `form` (the truth's form in the stereotype's palette) and `full` (the truth). Every image
is degraded as a model's output is (scoft.judge.degraded: blur 0.5 px, noise 0.15 on [-1, 1], the
planted VAE's reconstruction error), drawn in either layout (the training images' or the held-out
ones'). For each evaluation distance: the gain over the base, its share of the full correction's gain,
and the gate's verdict with the rules that failed.

    .venv/bin/python -m bench.metric_balance [--judge models/base/judge] [--evaluation planted-attributes planted-judge]
        [--split reporting|tuning] [--json FILE]

It also proposes `promotion.min_gain`, the smallest gain worth shipping: a tenth of the smallest
one-attribute correction's gain (form alone or palette alone, any culture, either layout) of the first
evaluation distance, what a candidate correcting one attribute in one draw of ten would gain. Choose it
on `--split tuning` (other pictures of the same world), never on the reporting split.

Without a judge at --judge, one is built there first (scoft.judge.build_judge, about a minute).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scoft.captions import FallbackCaptioner
from scoft.ccub import ingest, read_heldout, read_manifest
from scoft.config import load_params
from scoft.evaluate import compare
from scoft.features import build_distance
from scoft.judge import build_judge, degraded, load_judge
from scoft.paths import CANDIDATE
from scoft.planted import GENERIC_LEAN, STEREOTYPES
from scoft.promotion import decide, hold_family
from scoft.sample import CATEGORIES, CULTURES, HELDOUT_LAYOUT, STEREOTYPE, TRAIN_LAYOUT, TRUTH, draw, write_sample

NOISE, BLUR = 0.15, 0.5
SCENARIOS = {"palette": (STEREOTYPE, TRUTH), "form": (TRUTH, STEREOTYPE), "full": (TRUTH, TRUTH)}  # (form, palette)


class _Output:
    def __init__(self, images):
        self.images = images


class RenderedModel:
    """A stand-in for the pipeline that compare() drives: 'loading a LoRA' picks a scenario for a culture,
    and each prompt is drawn (with its generator's seed) as the base or that scenario draws it."""

    device = torch.device("cpu")

    def __init__(self, layout: str):
        self.layout, self.scenario = layout, None

    def load_lora_weights(self, path: str):
        self.scenario = Path(path).name  # "<scenario>-<culture>"

    def unload_lora_weights(self):
        self.scenario = None

    def __call__(self, prompt, generator, height, **_) -> _Output:
        return _Output([self.draw(p, g.initial_seed(), height) for p, g in zip(prompt, generator)])

    def draw(self, prompt: str, seed: int, size: int) -> Image.Image:
        culture = next((c for c, (adj, *_) in CULTURES.items() if adj in prompt), None)
        category = next(c for c, (caption, generic) in CATEGORIES.items()
                        if caption.split("{adj}")[1][:12] in prompt or generic in prompt)
        form, palette = STEREOTYPE, STEREOTYPE  # the base, and every model on prompts naming no culture
        if culture and self.scenario and self.scenario.endswith(culture):
            form, palette = SCENARIOS[self.scenario.split("-")[0]]
        who = culture or GENERIC_LEAN
        colours = CULTURES[who][1:] if palette == TRUTH else STEREOTYPES[who]
        rng = np.random.default_rng([seed, sum(map(ord, prompt))])
        pixels = degraded(draw(category, *colours, rng, size, form, self.layout), rng, NOISE, BLUR)
        return Image.fromarray(((pixels + 1) * 127.5).round().clip(0, 255).astype(np.uint8))


def judged(params, distance, ccub: Path, layout: str) -> dict:
    """Per scenario: {culture: (gain, promoted, failed rules)} after the family's Holm step."""
    settings = params.sampling("evaluate")
    e = params.evaluate
    out = {}
    for scenario in SCENARIOS:
        decisions = {}
        for culture in CULTURES:
            records = read_manifest(ccub, culture) + [r for r in read_heldout(ccub) if r.culture != culture]
            result = compare(RenderedModel(layout), {CANDIDATE: Path(f"{scenario}-{culture}")}, records,
                             ccub, distance, settings, e.samples_per_prompt, e.seed, e.bootstrap,
                             progress=lambda m: None, cultures=[culture])
            decisions[culture] = decide(result["metrics"], culture, params.promotion, None, "bench")
        family = hold_family(decisions, params.promotion)
        out[scenario] = {c: (d["distance_gain"], d["promote"], [o["rule"] for o in d["rules"] if not o["passed"]])
                         for c, d in family.items()}
    return out


def table(name: str, layout: str, results: dict) -> list[str]:
    lines = [f"{name}, {layout} layout: gain over the base (share of the full correction's gain), verdict", "",
             "| candidate | " + " | ".join(CULTURES) + " |", "|---" * (len(CULTURES) + 1) + "|"]
    for scenario, per_culture in results.items():
        cells = []
        for culture, (gain, promoted, failed) in per_culture.items():
            share = gain / results["full"][culture][0] if results["full"][culture][0] else float("nan")
            verdict = "promoted" if promoted else "rejected: " + "; ".join(failed)
            cells.append(f"{gain:+.3f} ({share:.0%}), {verdict}")
        lines.append(f"| {scenario} | " + " | ".join(cells) + " |")
    return lines + [""]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge", default="models/base/judge")
    parser.add_argument("--evaluation", nargs="+", default=["planted-attributes", "planted-judge"])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--split", choices=["reporting", "tuning"], default="reporting",
                        help="the sample's pictures: tune on `tuning`, report on `reporting`")
    args = parser.parse_args()
    params = load_params(Path(args.params))
    if not Path(args.judge, "judge.pt").is_file():
        build_judge(args.judge, steps=params.planted.judge_steps)
    load_judge(args.judge)
    work = Path(tempfile.mkdtemp(prefix="metric-balance-"))
    i = params.ingest
    ingest([str(write_sample(work / "sample", split=args.split))], work / "ccub", heldout_fraction=i.heldout_fraction,
           max_pixels=i.max_image_pixels, max_rejected_fraction=0, captioner=FallbackCaptioner(),
           progress=lambda m: None)
    figures, lines = {}, []
    for name in args.evaluation:
        distance = build_distance(name, params.features.model_copy(update={"judge": args.judge}), params.model.seed)
        for layout in (HELDOUT_LAYOUT, TRAIN_LAYOUT):
            figures[f"{name}/{layout}"] = results = judged(params, distance, work / "ccub", layout)
            lines += table(name, layout, results)
    first = args.evaluation[0]
    smallest = min(gain for layout in (HELDOUT_LAYOUT, TRAIN_LAYOUT) for scenario in ("form", "palette")
                   for gain, _, _ in figures[f"{first}/{layout}"][scenario].values())
    figures["min_gain"] = {"evaluation": first, "split": args.split, "smallest_one_attribute_gain": smallest,
                           "proposed": round(smallest / 10, 3)}
    lines.append(f"{first} on the {args.split} split: the smallest one-attribute gain is {smallest:.3f}; "
                 f"promotion.min_gain, a tenth of it: {smallest / 10:.3f}")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
