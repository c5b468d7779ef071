"""The evaluation's statistics: intervals over prompts (and training seeds, clusters), one-sided paired
sign-flip tests, Holm's correction, and cultures with too little held-out data named rather than shown
with a zero-width interval."""

import numpy as np
import pytest

from scoft.evaluate import NO_INTERVAL, culture_metrics, metrics_markdown
from scoft.stats import bootstrap_ci, hierarchical_bootstrap_ci, holm, sign_flip_p, within_cluster_correlation


def test_no_interval_below_two_prompts():
    assert bootstrap_ci(np.array([0.4]), 100, 0) is None
    lo, hi = bootstrap_ci(np.array([0.1, 0.3, 0.5, 0.7]), 2000, 0)
    assert 0.1 <= lo < 0.4 < hi <= 0.7


def test_the_interval_is_95_percent_wide():
    # the mean of 400 standard normal values: a 95% interval is +-1.96 / 20 wide (a 90% one: +-1.645 / 20)
    values = np.random.default_rng(3).standard_normal(400)
    values = (values - values.mean()) / values.std()
    lo, hi = bootstrap_ci(values, 4000, 0)
    assert (hi - lo) / 2 == pytest.approx(1.96 / 20, rel=0.06)


def test_exact_one_sided_sign_flip_p_by_hand():
    # 8 sign patterns of (1, 2, 3): a sum >= 6 only for all +: one-sided p = 1/8 (two-sided 2/8)
    assert sign_flip_p(np.array([1.0, 2.0, 3.0])) == pytest.approx(0.125)
    assert sign_flip_p(np.array([1.0, 2.0, 3.0]), alternative="two-sided") == pytest.approx(0.25)
    assert sign_flip_p(np.array([-1.0, -2.0, -3.0])) == pytest.approx(1.0)  # worse is not evidence of better
    assert sign_flip_p(np.array([1.0, -1.0])) == pytest.approx(0.75)  # sums >= 0: ++, +- and -+ (ties count)
    assert sign_flip_p(np.array([0.5])) is None
    many = np.full(20, 0.3)  # Monte Carlo above 16 units: only the all-+ pattern reaches it
    assert sign_flip_p(many, rounds=2000) < 0.002


def test_a_monte_carlo_sign_flip_p_is_never_zero_and_holds_its_level():
    """Counted as (hits + 1) / (rounds + 1): the observed pattern is one of the null's, so no p can be 0
    (hits / rounds gave 0 for a strong effect, which no finite number of rounds can show)."""
    assert sign_flip_p(np.full(40, 1.0), rounds=999) == pytest.approx(1 / 1000)
    assert sign_flip_p(np.full(40, 1.0), rounds=99) == pytest.approx(1 / 100)


def test_per_prompt_means_read_the_images_as_with_seeds_lays_them_out():
    """Prompt-major: a prompt's seeds side by side. Read seed-major, each 'prompt' mixed other prompts'
    images, and the prompt-level tests paired the wrong values."""
    from scoft.evaluate import prompt_means, with_seeds

    texts, seeds = with_seeds(["p0", "p1", "p2"], 2, seed=7)
    assert texts == ["p0", "p0", "p1", "p1", "p2", "p2"] and seeds == [7, 8] * 3
    per_image = np.array([float(t[1]) + 0.1 * (s - 7) for t, s in zip(texts, seeds)])
    assert prompt_means(per_image, 2) == pytest.approx([0.05, 1.05, 2.05])


def test_clustered_sign_flip_flips_a_category_together():
    gains = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 2.0])
    assert sign_flip_p(gains) == pytest.approx(1 / 64)
    # two categories of three prompts: 4 patterns, only ++ reaches the observed sum
    assert sign_flip_p(gains, np.array(["A", "A", "A", "B", "B", "B"])) == pytest.approx(1 / 4)


def test_the_interval_over_training_seeds_and_prompts_widens_with_either():
    rng = np.random.default_rng(0)
    prompts = rng.normal(0, 0.01, 12)
    same_runs = np.tile(prompts, (5, 1))  # 5 training seeds that agree
    spread_runs = same_runs + rng.normal(0, 0.05, (5, 1))  # 5 that disagree by run
    narrow = hierarchical_bootstrap_ci(same_runs, None, 2000, 0)
    wide = hierarchical_bootstrap_ci(spread_runs, None, 2000, 0)
    assert (wide[1] - wide[0]) > 3 * (narrow[1] - narrow[0])
    # prompts that cluster by category: resampling categories widens it too
    clustered = prompts + np.repeat([-0.05, 0.0, 0.05], 4)
    categories = np.repeat(["A", "B", "C"], 4)
    flat = hierarchical_bootstrap_ci(clustered, None, 2000, 0)
    by_category = hierarchical_bootstrap_ci(clustered, categories, 2000, 0)
    assert (by_category[1] - by_category[0]) > 1.5 * (flat[1] - flat[0])
    assert hierarchical_bootstrap_ci(clustered, np.repeat(["A"], 12), 100, 0) is None  # one cluster: none


def test_within_category_correlation_by_hand_and_on_known_truths():
    # two categories of two prompts: means 1 and 3, spreads +-1 around them. MSW = 4/2 = 2; MSB = 2*(1+1)/1 = 4;
    # n0 = 2: ICC = (4 - 2) / (4 + 2) = 1/3
    by_hand = within_cluster_correlation(np.array([0.0, 2.0, 2.0, 4.0]), np.array(["A", "A", "B", "B"]))
    assert by_hand["icc"] == pytest.approx(1 / 3)
    assert by_hand["within_variance"] == pytest.approx(2.0) and by_hand["between_variance"] == pytest.approx(1.0)
    # simulated LoRAs (runs), 3 categories of 3 prompts each, a run's own mean effect added: it is not
    # clustering, and each truth is recovered
    rng = np.random.default_rng(0)
    for truth in (0.0, 0.3, 0.6):
        runs = np.repeat(np.arange(400), 9)
        categories = np.tile(np.repeat(["ARCH", "FOOD", "CLOTH"], 3), 400)
        shared = rng.standard_normal((400, 3)).repeat(3, axis=1).ravel()
        noise = rng.standard_normal(len(runs))
        values = 5 * rng.standard_normal(400)[runs] + np.sqrt(truth) * shared + np.sqrt(1 - truth) * noise
        assert within_cluster_correlation(values, categories, runs)["icc"] == pytest.approx(truth, abs=0.06)
    with pytest.raises(ValueError, match="2\\+ clusters per run"):
        within_cluster_correlation(np.array([1.0, 2.0]), np.array(["A", "A"]))


def test_holm_by_hand():
    adjusted = holm({"KOR": 0.01, "MEX": 0.04, "NGA": 0.03, "CHN": None})
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 = 0.03, 0.06, 0.04, made monotone: 0.03, 0.06, 0.06
    assert adjusted == {"KOR": pytest.approx(0.03), "NGA": pytest.approx(0.06), "MEX": pytest.approx(0.06), "CHN": None}


def test_per_culture_reports_missing_and_thin_cultures_and_tests_the_rest():
    dist = {"base": np.array([0.9, 0.8, 0.85, 0.7]), "scoft": np.array([0.5, 0.4, 0.45, 0.6])}
    cultures = np.array(["KOR", "KOR", "KOR", "MEX"])
    metrics = culture_metrics(dist, cultures, ["CHN", "KOR", "MEX"], 500, 0)
    assert metrics["CHN"] == {"n": 0, "insufficient": "no held-out record for this culture"}
    mex = metrics["MEX"]["improvement"]["scoft"]
    assert mex["insufficient"] == NO_INTERVAL and mex["ci95_low"] is None and mex["p_one_sided"] is None
    kor = metrics["KOR"]["improvement"]["scoft"]
    assert kor["mean"] == pytest.approx(0.4) and kor["p_one_sided"] == pytest.approx(0.125)  # 3 prompts, all +
    assert kor["p_holm"] == pytest.approx(0.125)  # the only tested culture: Holm leaves it
    overall = {"n": 4, "models": {"base": {"mean": 0.8, "ci95_low": 0.7, "ci95_high": 0.9},
                                  "scoft": {"mean": 0.5, "ci95_low": 0.4, "ci95_high": 0.6}},
               "improvement": {"scoft": {"mean": 0.3, "ci95_low": 0.1, "ci95_high": 0.5}}}
    table = "\n".join(metrics_markdown({"per_culture": metrics, "overall": overall}, "clip"))
    assert "| CHN | 0 | no held-out record for this culture |" in table
    assert "fewer than 2 prompts: no interval" in table and "p 0.125 (Holm)" in table


def test_nearest_culture_by_mean_distance_to_held_out_references():
    from scoft.evaluate import nearest_culture, retrieval_markdown, retrieval_metrics

    refs = np.array(["KOR", "KOR", "MEX"])
    distances = np.array([[0.1, 0.3, 0.25],   # KOR mean 0.2 < MEX 0.25
                          [0.1, 0.5, 0.25],   # KOR mean 0.3 > MEX 0.25
                          [0.9, 0.9, 0.1]])
    assert nearest_culture(distances, refs).tolist() == ["KOR", "MEX", "MEX"]
    hits = {"base": np.array([1.0, 0.0, 0.5]), "scoft": np.array([1.0, 1.0, 1.0])}
    retrieval = retrieval_metrics(hits, np.array(["KOR", "KOR", "MEX"]), 500, 0, candidates=2)
    assert retrieval["chance"] == 0.5
    assert retrieval["per_culture"]["KOR"]["base"]["mean"] == 0.5
    assert retrieval["per_culture"]["MEX"]["scoft"]["insufficient"] == NO_INTERVAL
    assert "| all | 0.5000 [" in "\n".join(retrieval_markdown(retrieval))


def test_generic_prompt_distribution_and_entropy_by_hand():
    from scoft.evaluate import generic_distribution, generic_markdown

    retrieved = {"base": np.array(["NGA", "NGA", "NGA", "NGA"]), "scoft": np.array(["KOR", "MEX", "NGA", "NGA"])}
    generic = generic_distribution(retrieved, ["KOR", "MEX", "NGA"], ["a house with a roof"])
    assert generic["models"]["base"] == {
        "shares": {"KOR": 0.0, "MEX": 0.0, "NGA": 1.0},
        "entropy_bits": 0.0,
        "images": 4,
    }
    assert generic["models"]["scoft"]["entropy_bits"] == pytest.approx(1.5)  # 1/4, 1/4, 1/2
    assert generic["max_entropy_bits"] == pytest.approx(np.log2(3))
    table = "\n".join(generic_markdown(generic))
    assert "| base | 0.00 | 0.00 | 1.00 | 0.00 |" in table and "| scoft | 0.25 | 0.25 | 0.50 | 1.50 |" in table


def test_where_each_cultures_images_land_by_hand():
    """The bleed table: a LoRA that draws half of KOR's images like NGA shows 0.5 off KOR's own culture."""
    from scoft.evaluate import retrieved_as, retrieved_as_markdown

    prompted = np.array(["KOR", "KOR", "KOR", "KOR", "NGA", "NGA"])
    labels = {"base": np.array(["KOR", "KOR", "KOR", "MEX", "NGA", "NGA"]),
              "joint": np.array(["KOR", "NGA", "NGA", "KOR", "NGA", "KOR"])}
    shares = retrieved_as(labels, prompted, ["KOR", "MEX", "NGA"])
    assert shares["base"] == {"KOR": {"KOR": 0.75, "MEX": 0.25, "NGA": 0.0},
                              "NGA": {"KOR": 0.0, "MEX": 0.0, "NGA": 1.0}}
    assert shares["joint"] == {"KOR": {"KOR": 0.5, "MEX": 0.0, "NGA": 0.5},
                               "NGA": {"KOR": 0.5, "MEX": 0.0, "NGA": 0.5}}
    table = "\n".join(retrieved_as_markdown(shares))
    assert "| joint | KOR | 0.50 | 0.00 | 0.50 |" in table and "| base | NGA | 0.00 | 0.00 | 1.00 |" in table


def test_within_prompt_diversity_by_hand():
    import torch

    from scoft.evaluate import within_prompt_diversity

    class Gap:
        """D(a, b) = |a - b| for one-number "images": distances chosen by hand."""

        def pairwise(self, x, targets):
            return (x.flatten(1)[:, None, 0] - targets.flatten(2)[:, :, 0]).abs()

    # 2 prompts x 2 seeds: prompt 0's images are 0.4 apart, prompt 1's 0.1 (9 apart across prompts)
    images = torch.tensor([0.0, 0.4, 9.0, 9.1], dtype=torch.float64).view(4, 1, 1, 1)
    assert within_prompt_diversity(Gap(), images, 2) == pytest.approx([0.4, 0.1])
    assert within_prompt_diversity(Gap(), images, 1) is None  # one seed per prompt: nothing to compare


def test_memorisation_threshold_is_a_low_quantile_of_unseen_community_images():
    from scoft.evaluate import memorised

    # ten unseen community images come 0.20 to 0.38 near a training image; the 10% quantile is 0.218
    held_vs_train = np.linspace(0.20, 0.38, 10)[:, None] + np.array([[0.0, 0.3]])
    gen_vs_train = np.array([[0.10, 0.90], [0.23, 0.40], [0.21, 0.80], [0.5, 0.6]])
    flags, threshold = memorised(gen_vs_train, held_vs_train, 0.1)
    assert threshold == pytest.approx(0.218)
    assert flags.tolist() == [True, False, True, False]
    # copies of training images: all flagged; images like the held-out ones: about 10%
    copies = np.array([[0.0, 0.5]] * 10)
    assert memorised(copies, held_vs_train, 0.1)[0].mean() == 1.0
    assert memorised(held_vs_train, held_vs_train, 0.1)[0].mean() == pytest.approx(0.1)


def test_kid_separates_a_copy_from_other_pictures_and_names_what_it_cannot_measure():
    import torch

    from scoft.config import FeatureParams
    from scoft.evaluate import kid
    from scoft.features import build_distance

    clip = build_distance("clip", FeatureParams(), 0)
    g = torch.Generator().manual_seed(0)
    real = torch.rand(8, 3, 32, 32, generator=g) * 0.2 - 0.9  # dark
    other = torch.rand(8, 3, 32, 32, generator=g) * 0.2 + 0.7  # bright
    same = kid(clip, real, real.flip(0), seed=1)
    different = kid(clip, real, other, seed=1)
    assert same["subset_size"] == 8 and abs(same["mean"]) < different["mean"]
    assert kid(clip, real, other, seed=1) == different  # its subsets are seeded
    assert kid(clip, real[:1], other, seed=1)["insufficient"].startswith("KID needs 2 images")
    assert "embedding backbone" in kid(build_distance("lpips-alex", FeatureParams(), 0), real, other, 1)["insufficient"]


def test_the_reviewer_by_prompt_interval_covers_when_either_clusters():
    """Ratings that cluster by reviewer and by prompt (each has a leaning of its own) around a true share
    of 0.5: the two-way cluster bootstrap's 95% interval covers 0.5 in most campaigns. Resampling one way
    only ignores the other's variance and misses it far more often."""
    from scoft.stats import two_way_cluster_bootstrap_ci

    rng = np.random.default_rng(3)
    covered = {"reviewers": 0, "prompts": 0}
    for cluster in covered:
        for campaign in range(120):
            reviewers, prompts = 10, 8
            leaning = (rng.choice([-0.3, 0.3], reviewers)[:, None] if cluster == "reviewers" else
                       rng.choice([-0.3, 0.3], prompts)[None, :])
            values = (rng.random((reviewers, prompts)) < 0.5 + leaning).astype(float)
            rows, cols = np.meshgrid(np.arange(reviewers), np.arange(prompts), indexing="ij")
            lo, hi = two_way_cluster_bootstrap_ci(values.ravel(), rows.ravel(), cols.ravel(), 400, campaign)
            covered[cluster] += lo <= 0.5 <= hi
    assert covered["reviewers"] / 120 >= 0.85 and covered["prompts"] / 120 >= 0.85, covered
