"""The statistics behind every claim and every promotion: intervals and paired tests.

What varies in an evaluation is the prompts (and, in a benchmark, the training seeds); what a gate
decides on is a paired, one-sided question ("is the candidate closer to the community's images than
the base, on the same prompts and seeds?"). So:
- intervals resample the units that vary, clusters first where units cluster (prompts by category),
  and training seeds together with prompts when there are several training runs;
- the gate's test flips the sign of each unit's paired gain (a prompt's, or a whole category's when
  prompts cluster), one-sided, exact up to 2**16 sign patterns;
- a family of such tests (the cultures of one retrain) is held together by Holm's step-down.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

LEVEL = 0.95  # every interval in the reports and the gate: two-sided 95%
EXACT_UP_TO = 16  # units (prompts or clusters) whose 2**n sign patterns are enumerated


def _percentile_interval(means: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_ci(values: np.ndarray, n: int, seed: int, level: float = LEVEL) -> tuple[float, float] | None:
    """Percentile interval of the mean, resampling the given units (prompts); None below 2 units,
    where an interval would be a zero-width lie."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    return _percentile_interval(means, level)


def hierarchical_bootstrap_ci(values: np.ndarray, clusters: np.ndarray | None, n: int, seed: int,
                              level: float = LEVEL) -> tuple[float, float] | None:
    """Percentile interval of the grand mean of a [runs, units] table (training seeds x prompts),
    resampling runs, clusters of units (categories) and units within each drawn cluster, all in one
    draw: the interval covers what varies between training runs and between prompts alike. A 1-D
    `values` is one run. None when there are fewer than 2 units (or 2 clusters, when clustered)."""
    table = np.atleast_2d(np.asarray(values, dtype=np.float64))
    runs, units = table.shape
    groups = [np.arange(units)] if clusters is None else [np.flatnonzero(clusters == c) for c in np.unique(clusters)]
    if units < 2 or (clusters is not None and len(groups) < 2):
        return None
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    for b in range(n):
        rows = table[rng.integers(0, runs, size=runs)] if runs > 1 else table
        drawn = [groups[k] for k in rng.integers(0, len(groups), size=len(groups))] if clusters is not None else groups
        cols = np.concatenate([g[rng.integers(0, len(g), size=len(g))] for g in drawn])
        means[b] = rows[:, cols].mean()
    return _percentile_interval(means, level)


def _cluster_sums(differences: np.ndarray, clusters: np.ndarray | None) -> np.ndarray:
    if clusters is None:
        return differences
    return np.array([differences[clusters == c].sum() for c in np.unique(clusters)])


def sign_flip_units(clusters: np.ndarray | None, n: int) -> int:
    """How many independent units a sign-flip test has: the prompts, or their clusters."""
    return n if clusters is None else len(np.unique(clusters))


@functools.lru_cache(maxsize=EXACT_UP_TO)
def _every_sign_pattern(units: int) -> np.ndarray:
    return np.array(list(itertools.product([1.0, -1.0], repeat=units)))


def sign_flip_p(differences: np.ndarray, clusters: np.ndarray | None = None, alternative: str = "greater",
                rounds: int = 10_000, seed: int = 0) -> float | None:
    """p-value of "the mean paired difference is 0" against `alternative` ("greater": the candidate is
    better; "two-sided"), flipping each unit's sign (a prompt's difference, or a cluster's differences
    together). Exact up to EXACT_UP_TO units, Monte Carlo above; None below 2 units."""
    d = np.asarray(differences, dtype=np.float64)
    sums = _cluster_sums(d, None if clusters is None else np.asarray(clusters))
    if len(sums) < 2:
        return None
    if len(sums) <= EXACT_UP_TO:
        signs = _every_sign_pattern(len(sums))
    else:  # Monte Carlo: a p near 0.0167 (0.05 / 3) is known to about +-0.0013
        signs = 1.0 - 2.0 * np.random.default_rng(seed).integers(0, 2, size=(rounds, len(sums)), dtype=np.int8)
    null = signs @ sums
    observed = sums.sum()
    tol = 1e-12 * max(1.0, np.abs(sums).sum())
    if alternative == "greater":
        hits = np.sum(null >= observed - tol)
    elif alternative == "two-sided":
        hits = np.sum(np.abs(null) >= abs(observed) - tol)
    else:
        raise ValueError(f"alternative must be 'greater' or 'two-sided', not {alternative!r}")
    if len(sums) <= EXACT_UP_TO:
        return float(hits / len(signs))
    return float((hits + 1) / (rounds + 1))


def smallest_p(units: int) -> float:
    """The smallest one-sided p a sign-flip test over `units` units can give: 2**-units."""
    return 2.0 ** -units


def holm(p_values: dict[str, float | None]) -> dict[str, float | None]:
    """Holm-Bonferroni adjusted p-values over a family (the cultures), step-down, monotone."""
    tested = sorted((p, k) for k, p in p_values.items() if p is not None)
    adjusted, running = {k: None for k in p_values}, 0.0
    for i, (p, k) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - i) * p))
        adjusted[k] = running
    return adjusted


def within_cluster_correlation(values: np.ndarray, clusters: np.ndarray, runs: np.ndarray | None = None) -> dict:
    """How much of a value's variance its cluster shares (prompts' gains by category): the one-way ANOVA
    estimate of the intra-class correlation, ICC(1) = (MSB - MSW) / (MSB + (n0 - 1) MSW), for unequal
    cluster sizes (n0: the effective cluster size). `runs` (a LoRA each): clusters are nested in runs and
    each run's own mean is taken out first, so a run's overall effect, what the gate tests, is not counted
    as clustering. Also the variance within clusters and between them (a share of the total, unbiased
    from the mean squares). An estimate below 0 is kept: it says the clusters share nothing."""
    values = np.asarray(values, dtype=np.float64)
    clusters = np.asarray(clusters).astype(str)
    runs = np.zeros(len(values), int) if runs is None else np.asarray(runs)
    run_ids, run_of = np.unique(runs, return_inverse=True)
    cluster_ids, cluster_of = np.unique(clusters, return_inverse=True)
    ids, of = np.unique(run_of * len(cluster_ids) + cluster_of, return_inverse=True)  # a (run, cluster) cell
    run_count = len(run_ids)
    sizes = np.bincount(of)
    if len(ids) - run_count < 1 or len(values) - len(ids) < 1:
        raise ValueError(f"{len(values)} values in {len(ids)} clusters of {run_count} run(s): an intra-class "
                         "correlation needs 2+ clusters per run and a cluster with 2+ values")
    centred = values - (np.bincount(run_of, values) / np.bincount(run_of))[run_of]
    cluster_means = np.bincount(of, centred) / sizes
    msw = np.sum((centred - cluster_means[of]) ** 2) / (len(values) - len(ids))
    msb = np.sum(sizes * cluster_means ** 2) / (len(ids) - run_count)
    # the effective cluster size, per run (each run's clusters compared with that run's own mean)
    run_of_group = ids // len(cluster_ids)  # a cell's code is run * clusters + cluster
    n_total = np.bincount(run_of_group, sizes)
    n0 = (n_total.sum() - np.sum(sizes ** 2 / n_total[run_of_group])) / (len(ids) - run_count)
    between = max(0.0, (msb - msw) / n0)
    return {"icc": float((msb - msw) / (msb + (n0 - 1) * msw)), "within_variance": float(msw),
            "between_variance": float(between), "clusters": int(len(ids)), "runs": int(run_count),
            "values": int(len(values)), "effective_cluster_size": float(n0)}


def two_way_cluster_bootstrap_ci(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, n: int, seed: int,
                                 level: float = LEVEL) -> tuple[float, float] | None:
    """Percentile interval of the mean of `values` when they cluster two ways at once (ratings by reviewer
    and by prompt): each replicate draws reviewers and prompts with replacement, independently, and
    weighs each value by how often its reviewer and its prompt were drawn. None below 2 of either."""
    values = np.asarray(values, dtype=np.float64)
    row_ids, row_of = np.unique(rows, return_inverse=True)
    col_ids, col_of = np.unique(cols, return_inverse=True)
    if len(row_ids) < 2 or len(col_ids) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    for b in range(n):
        weight = (np.bincount(rng.integers(0, len(row_ids), len(row_ids)), minlength=len(row_ids))[row_of]
                  * np.bincount(rng.integers(0, len(col_ids), len(col_ids)), minlength=len(col_ids))[col_of])
        means[b] = (weight * values).sum() / weight.sum() if weight.sum() else np.nan
    return _percentile_interval(means[~np.isnan(means)], level)
