"""The insiders' gate under simulated reviewers: how often it promotes a candidate insiders do not prefer
(true preference 0.5: the false-promotion rate, target at most 5%), and how often one they do (0.6, 0.7),
by number of reviewers and pairs. Through the project's own code: the two-way cluster bootstrap
(scoft.stats) and the verdict (scoft.review.results.insiders_verdict) with params.yaml's rules.

Each reviewer has a leaning of their own (logit scale, sd --reviewer-sd) and each prompt one too
(--prompt-sd); a share of lazy reviewers (--lazy) always picks the left image, whatever it shows
(the candidate's position is drawn at random per pair, as in a campaign); a share of answers is
"can't tell" (--cant-tell), counted as half.

    .venv/bin/python -m bench.review_power [--reps 300]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from scoft.config import load_params
from scoft.review.results import insiders_verdict
from scoft.stats import two_way_cluster_bootstrap_ci


def simulate(rng, truth: float, reviewers: int, prompts: int, reviewer_sd: float, prompt_sd: float, lazy: float,
             cant_tell: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every reviewer rates every pair once: (value for the candidate, reviewer, prompt) per rating."""
    logit = np.log(truth / (1 - truth))
    leaning = rng.normal(0, reviewer_sd, reviewers)[:, None] + rng.normal(0, prompt_sd, prompts)[None, :]
    prefers = rng.random((reviewers, prompts)) < 1 / (1 + np.exp(-(logit + leaning)))
    candidate_left = rng.random(prompts) < 0.5  # the pair's drawn order, the same for every reviewer
    lazy_ones = rng.random(reviewers) < lazy
    prefers[lazy_ones] = np.broadcast_to(candidate_left, (lazy_ones.sum(), prompts))  # always the left one
    values = np.where(rng.random((reviewers, prompts)) < cant_tell, 0.5, prefers.astype(float))
    rows, cols = np.meshgrid(np.arange(reviewers), np.arange(prompts), indexing="ij")
    return values.ravel(), rows.ravel(), cols.ravel()


def promotes(values, rows, cols, rules, bootstrap: int, seed: int) -> bool:
    interval = two_way_cluster_bootstrap_ci(values, rows, cols, bootstrap, seed)
    results = {"candidate_vs_base": {"preference": float(values.mean()), "interval": interval,
                                     "reviewers": len(np.unique(rows)), "ratings": len(values)},
               "offensive": {"candidate": 0}}
    return insiders_verdict(results, rules, deadline_passed=True)["promote"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--reviewer-sd", type=float, default=0.5)
    parser.add_argument("--prompt-sd", type=float, default=0.5)
    parser.add_argument("--lazy", type=float, default=0.1)
    parser.add_argument("--cant-tell", type=float, default=0.1)
    args = parser.parse_args()
    rules = load_params().promotion
    print(f"rules: min_insider_preference {rules.min_insider_preference}, min_reviewers {rules.min_reviewers}; "
          f"reviewer sd {args.reviewer_sd}, prompt sd {args.prompt_sd} (logit), lazy {args.lazy}, "
          f"can't tell {args.cant_tell}; {args.reps} campaigns per row, bootstrap {args.bootstrap}")
    print("| true preference | reviewers | pairs | promoted | 95% interval |\n|---|---|---|---|---|")
    started = time.monotonic()
    for truth in (0.5, 0.6, 0.7):
        for reviewers, prompts in ((5, 20), (10, 20), (10, 40), (20, 40)):
            rng = np.random.default_rng(1000 + reviewers * 7 + prompts)
            wins = sum(promotes(*simulate(rng, truth, reviewers, prompts, args.reviewer_sd, args.prompt_sd, args.lazy,
                                          args.cant_tell), rules, args.bootstrap, rep) for rep in range(args.reps))
            share = wins / args.reps
            half = 1.96 * np.sqrt(share * (1 - share) / args.reps)
            print(f"| {truth} | {reviewers} | {prompts} | {share:.3f} | [{max(0, share - half):.3f}, "
                  f"{min(1, share + half):.3f}] |", flush=True)
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
