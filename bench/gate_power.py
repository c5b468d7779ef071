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

    .venv/bin/python -m bench.gate_power [--reps 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from scoft.config import PromotionParams
from scoft.evaluate import culture_metrics
from scoft.promotion import SIGNIFICANCE, decide, hold_family

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


def culture_gains(rng, prompts: int, categories: int, effect: float, icc: float) -> tuple[np.ndarray, np.ndarray]:
    """One culture's per-prompt gains (unit total variance) and their categories."""
    labels = np.array([f"C{i % categories}" for i in range(prompts)])
    shared = rng.standard_normal(categories)[[int(c[1:]) for c in labels]]
    return effect + np.sqrt(icc) * shared + np.sqrt(1 - icc) * rng.standard_normal(prompts), labels


def one_retrain(rng, prompts: int, categories: int, effect: float, icc: float, rules: PromotionParams) -> list[bool]:
    """Whether each culture's primary rule passes in one simulated retrain (Holm over the three)."""
    decisions = {}
    for culture in CULTURES:
        gains, labels = culture_gains(rng, prompts, categories, effect, icc)
        base = 0.5 + 0.1 * rng.standard_normal(prompts)
        dist = {"base": base, "scoft": base - 0.01 * gains}  # the backbone's scale: a gain of 0.01 per SD
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
                passed = np.array([one_retrain(rng, prompts, categories, effect, icc, rules) for _ in range(reps)])
                rows.append({"layout": layout, "unit": unit, "truth": truth, "per_culture": float(passed.mean()),
                             "per_retrain_any": float(passed.any(axis=1).mean()), "reps": reps})
    return rows


def interval(share: float, n: int) -> str:
    half = 1.96 * np.sqrt(max(share * (1 - share), 1e-12) / n)  # normal approximation over repetitions
    return f"{share:.3f} [{max(0.0, share - half):.3f}, {min(1.0, share + half):.3f}]"


def markdown(rows: list[dict]) -> str:
    lines = ["| layout | unit | truth | passes per culture | a retrain ships any |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['unit']} | {r['truth']} | {interval(r['per_culture'], 3 * r['reps'])} | "
                     f"{interval(r['per_retrain_any'], r['reps'])} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2000, help="simulated retrains per row")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = measure(args.reps)
    print(f"alpha {PromotionParams().alpha}, Holm over {len(CULTURES)} cultures, {args.reps} retrains per row; "
          "'no effect' rows are false-promotion rates, the others power")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
