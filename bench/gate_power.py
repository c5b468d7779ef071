"""How often does the gate promote a LoRA that does nothing, and how often one that helps?

Simulates retrains of 3 cultures, each culture's per-prompt paired gains (base distance minus
candidate distance, averaged over sampling seeds) drawn from a known truth, and judges them with the
project's own code: the evaluate stage's statistics (scoft.evaluate.culture_metrics) and the gate's
primary rule held over the retrain's cultures (scoft.promotion.decide, hold_family). Only the primary
rule is counted (the secondary rules are built to fail on other evidence).

Truths: no effect, prompts independent; no effect with a category effect shared by a category's
prompts (a LoRA that moves FOOD one way and ARCH the other by chance: intra-category correlation
`icc`); and small effects (a mean gain of `effect` prompt standard deviations) under both. Layouts:
the built-in sample (9 held-out prompts per culture in 3 categories) and a CCUB-sized one (35 held-out
prompts in 10 categories, a quarter of about 140 records). Each with the prompt and the category as
the sign-flip unit (promotion.test_unit).

With --gains (a planted bench's --json: `bench/planted_bias.py` trains LoRAs over several training seeds
and keeps each one's per-prompt distances), the correlation is measured instead of assumed: each
LoRA's per-prompt gains over the base, their within-category correlation (scoft.stats.
within_cluster_correlation; each LoRA's own mean gain taken out), both of the gains as they are and of
what differs between LoRAs trained alike (a LoRA's gain minus the mean over training seeds: the part a
LoRA with no real effect would still have), and their spread in the evaluation's units. Retrains are
then simulated in those units with params.yaml's rules as they are (promotion.min_gain included): no
effect (the training noise, with and without the floor), effects cancelling over the judged categories,
a mean gain at the floor (H0's boundary), and each culture's measured mean gain (power), for the
sample's 9 held-out prompts per culture and for 15.

    .venv/bin/python -m bench.gate_power [--reps 2000] [--json out.json] \
        [--gains bench/results/planted_gains_tuning.json [--model +MPC] [--measured-only]]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from scoft.config import PromotionParams, load_params
from scoft.evaluate import culture_metrics
from scoft.promotion import SIGNIFICANCE, decide, hold_family
from scoft.stats import within_cluster_correlation

CULTURES = ["KOR", "MEX", "NGA"]
LAYOUTS = {"sample (9 prompts, 3 categories)": (9, 3), "CCUB-sized (35 prompts, 10 categories)": (35, 10)}
TRUTHS = [  # (name, mean gain in prompt SDs, intra-category correlation)
    ("no effect, independent prompts", 0.0, 0.0),
    ("no effect, category ICC 0.3", 0.0, 0.3),
    ("no effect, category ICC 0.6", 0.0, 0.6),
    ("effect 0.5 SD, independent", 0.5, 0.0),
    ("effect 1 SD, independent", 1.0, 0.0),
    ("effect 1 SD, category ICC 0.3", 1.0, 0.3),
]


UNIT = 0.01  # the unitless table's scale: a gain of 0.01 per prompt SD (the rules see distances)


def culture_gains(rng, prompts: int, categories: int, mean: float, icc: float, sd: float,
                  fixed_categories: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One culture's per-prompt gains (mean, standard deviation sd, a share icc of the variance shared by
    a category's prompts) and their categories. The category effects are drawn anew (categories a
    sample of many: the gate would speak for categories it never judged), or with `fixed_categories`
    they are the judged categories' own, summing to 0 (evenly spread, in a random order): the mean over
    the judged categories is exactly `mean`."""
    labels = np.array([f"C{i % categories}" for i in range(prompts)])
    if fixed_categories:
        spread = np.linspace(-1.0, 1.0, categories)
        effects = rng.permutation(spread / spread.std())
    else:
        effects = rng.standard_normal(categories)
    shared = effects[[int(c[1:]) for c in labels]]
    return mean + sd * (np.sqrt(icc) * shared + np.sqrt(1 - icc) * rng.standard_normal(prompts)), labels


def one_retrain(rng, prompts: int, categories: int, means: dict[str, float], icc: float, rules: PromotionParams,
                sd: float = UNIT, fixed_categories: bool = False) -> list[bool]:
    """Whether each culture's primary rule passes in one simulated retrain (Holm over the three), each
    culture's gains drawn around its own mean."""
    decisions = {}
    for culture in CULTURES:
        gains, labels = culture_gains(rng, prompts, categories, means[culture], icc, sd, fixed_categories)
        base = 0.5 + 0.1 * rng.standard_normal(prompts)
        dist = {"base": base, "scoft": base - gains}
        metrics = {"per_culture": culture_metrics(dist, np.array([culture] * prompts), [culture], 10, 0,
                                                  labels, np.array([f"{culture}-{i}" for i in range(prompts)]))}
        decisions[culture] = decide(metrics, culture, rules, None, "sim")
    judged = hold_family(decisions, rules)
    return [next(r for r in d["rules"] if r["rule"] == SIGNIFICANCE)["passed"] for d in judged.values()]


def measure(reps: int, seed: int = 0) -> list[dict]:
    rows = []
    for layout, (prompts, categories) in LAYOUTS.items():
        for unit in ("prompt", "category"):
            # the test's own level and power: the simulated gains have no units, so no practical floor
            rules = PromotionParams(test_unit=unit, min_gain=0.0)
            for truth, effect, icc in TRUTHS:
                rng = np.random.default_rng([seed, prompts, categories, int(effect * 10), int(icc * 10)])
                means = dict.fromkeys(CULTURES, effect * UNIT)
                passed = np.array([one_retrain(rng, prompts, categories, means, icc, rules) for _ in range(reps)])
                rows.append({"layout": layout, "unit": unit, "truth": truth, "per_culture": float(passed.mean()),
                             "per_retrain_any": float(passed.any(axis=1).mean()), "reps": reps})
    return rows


def measured_correlation(path: str, model: str) -> dict:
    """Per-prompt gains over the base of `model`'s LoRAs (one per training seed and culture) in a planted
    bench's --json, and how they cluster by category: as they are, and what differs between LoRAs
    trained alike (each LoRA's gain minus the mean over its training seeds, per prompt)."""
    run = json.loads(Path(path).read_text())
    base = np.asarray(run["models"]["base"]["distance"])[0]
    gains = base - np.asarray(run["models"][model]["distance"])  # [training seeds, prompts]; positive: better
    cultures, categories = np.asarray(run["cultures"]), np.asarray(run["categories"])
    seeds = np.repeat(np.arange(len(gains)), len(base))
    runs = np.char.add(seeds.astype(str), np.tile(cultures, len(gains)))  # a LoRA: a seed and a culture
    deviations = gains - gains.mean(axis=0)  # the training seed's own part of each prompt's gain

    def clustering(values: np.ndarray) -> dict:
        return within_cluster_correlation(values.ravel(), np.tile(categories, len(gains)), runs)

    per_culture = {}
    for c in sorted(set(cultures.tolist())):
        g = gains[:, cultures == c]
        per_culture[c] = {"mean_gain": float(g.mean()), "prompts": int(g.shape[1]),
                          "gain_sd_within_lora": float(np.sqrt(np.mean(g.var(axis=1, ddof=1))))}
    return {"file": path, "model": model, "training_seeds": len(gains), "gains": clustering(gains),
            "training_noise": clustering(deviations), "per_culture": per_culture}


def measure_on_defaults(measured: dict, reps: int, rules: PromotionParams, prompts: int = 9,
                        seed: int = 0) -> list[dict]:
    """Retrains of the built-in sample's layout simulated in the evaluation's units under `rules` with
    each sign-flip unit, from what was measured.

    A LoRA with no effect differs from the base only by what differs between LoRAs trained alike (the
    training noise), with its measured spread and clustering; the same without the floor shows what the
    floor does. A LoRA whose effects differ by category (as trained LoRAs' do, with their spread) but
    average to nothing over the categories it is judged on is the other null; then a mean gain at the
    floor, each culture's measured mean gain (power), and for reference the LoRAs' clustering with
    category effects drawn anew, as if the gate spoke for categories it never judged."""
    seeds = measured["training_seeds"]
    noise = measured["training_noise"]
    noise_icc = float(np.clip(noise["icc"], 0.0, 1.0))
    # deviations from the mean over the training seeds have (seeds - 1) / seeds of the noise's variance
    noise_sd = float(np.sqrt((noise["within_variance"] + noise["between_variance"]) * seeds / (seeds - 1)))
    icc = float(np.clip(measured["gains"]["icc"], 0.0, 1.0))
    sd = float(np.sqrt(np.mean([m["gain_sd_within_lora"] ** 2 for m in measured["per_culture"].values()])))
    zero, floor = dict.fromkeys(CULTURES, 0.0), dict.fromkeys(CULTURES, rules.min_gain)
    gains = {c: measured["per_culture"].get(c, {}).get("mean_gain", 0.0) for c in CULTURES}
    no_floor = rules.model_copy(update={"min_gain": 0.0})
    truths = [  # (name, per-culture mean gains, SD, ICC, category effects fixed to the judged categories, rules)
        (f"no effect: training noise (SD {noise_sd:.3f}, ICC {noise_icc:.2f})", zero, noise_sd, noise_icc, False,
         rules),
        ("the same without the floor (min_gain 0)", zero, noise_sd, noise_icc, False, no_floor),
        (f"no mean effect over the judged categories (SD {sd:.3f}, ICC {icc:.2f})", zero, sd, icc, True, rules),
        (f"mean gain at the floor ({rules.min_gain}), the LoRAs' spread", floor, sd, icc, True, rules),
        ("each culture's measured mean gain, the LoRAs' spread", gains, sd, icc, True, rules),
        (f"reference: no mean effect, category effects drawn anew (SD {sd:.3f}, ICC {icc:.2f})", zero, sd, icc,
         False, rules),
    ]
    categories = LAYOUTS["sample (9 prompts, 3 categories)"][1]
    rows = []
    for unit in ("prompt", "category"):
        for k, (truth, means, truth_sd, truth_icc, fixed, truth_rules) in enumerate(truths):
            unit_rules = truth_rules.model_copy(update={"test_unit": unit})
            rng = np.random.default_rng([seed, k, len(unit), prompts])
            passed = np.array([one_retrain(rng, prompts, categories, means, truth_icc, unit_rules, truth_sd, fixed)
                               for _ in range(reps)])
            rows.append({"layout": f"{prompts} prompts in {categories} categories, measured",
                         "unit": unit, "truth": truth,
                         "per_culture": float(passed.mean()), "per_retrain_any": float(passed.any(axis=1).mean()),
                         "by_culture": dict(zip(CULTURES, passed.mean(axis=0).tolist())), "reps": reps})
    return rows


def interval(share: float, n: int) -> str:
    half = 1.96 * np.sqrt(max(share * (1 - share), 1e-12) / n)  # normal approximation over repetitions
    return f"{share:.3f} [{max(0.0, share - half):.3f}, {min(1.0, share + half):.3f}]"


def markdown(rows: list[dict]) -> str:
    lines = ["| layout | unit | truth | passes per culture | a retrain ships any | per culture (KOR, MEX, NGA) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        by = ", ".join(f"{v:.3f}" for v in r["by_culture"].values()) if "by_culture" in r else ""
        lines.append(f"| {r['layout']} | {r['unit']} | {r['truth']} | {interval(r['per_culture'], 3 * r['reps'])} | "
                     f"{interval(r['per_retrain_any'], r['reps'])} | {by} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2000, help="simulated retrains per row")
    parser.add_argument("--json", default=None)
    parser.add_argument("--gains", default=None, help="a planted bench's --json: measure the correlation there")
    parser.add_argument("--model", default="+MPC", help="whose LoRAs' gains --gains measures")
    parser.add_argument("--params", default="params.yaml", help="the rules --gains simulates under")
    parser.add_argument("--measured-only", action="store_true", help="with --gains: skip the assumed-correlation table")
    args = parser.parse_args()
    rows, measured = [] if args.measured_only and args.gains else measure(args.reps), None
    print(f"alpha {PromotionParams().alpha}, Holm over {len(CULTURES)} cultures, {args.reps} retrains per row; "
          "'no effect' rows are false-promotion rates, the others power")
    if rows:
        print(markdown(rows))
    if args.gains:
        measured = measured_correlation(args.gains, args.model)
        rules = load_params(args.params).promotion
        print(f"\nmeasured on {args.gains} ({args.model}, {measured['training_seeds']} training seeds): "
              + json.dumps({k: measured[k] for k in ("gains", "training_noise", "per_culture")}))
        # the sample's 9 held-out prompts per culture, and what 15 would give
        on_defaults = [row for prompts in (9, 15) for row in measure_on_defaults(measured, args.reps, rules, prompts)]
        print(f"\n{args.params}'s rules (min_gain {rules.min_gain}), in the evaluation's units:")
        print(markdown(on_defaults))
        rows += on_defaults
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "measured": measured}, f, indent=1)


if __name__ == "__main__":
    main()
