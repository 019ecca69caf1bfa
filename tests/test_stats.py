"""Bootstrap intervals and the paired bootstrap test."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from tunelab import stats
from tunelab.stats import bootstrap_ci, bootstrap_scores, mean_reduce, paired_bootstrap, resample_counts


def test_resample_counts_draw_n_examples_per_resample():
    counts = resample_counts(50, 200, np.random.default_rng(0))
    assert counts.shape == (200, 50)
    assert (counts.sum(1) == 50).all()
    assert counts.std() > 0.5  # drawn with replacement: some twice or more, some never


def test_mean_interval_agrees_with_scipy_percentile_bootstrap():
    rng = np.random.default_rng(1)
    scores = rng.binomial(1, 0.3, size=400) * 100.0
    lo, hi = bootstrap_ci(scores, n_resamples=4000, seed=2)
    ref = scipy_stats.bootstrap((scores,), np.mean, n_resamples=4000, method="percentile", random_state=3)
    assert lo == pytest.approx(ref.confidence_interval.low, abs=1.0)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=1.0)
    assert lo < scores.mean() < hi


def test_interval_is_seeded_and_degenerate_for_constant_scores():
    scores = np.arange(30.0)
    assert bootstrap_ci(scores, seed=5) == bootstrap_ci(scores, seed=5)
    assert bootstrap_ci(scores, seed=5) != bootstrap_ci(scores, seed=6)
    assert bootstrap_ci(np.full(20, 42.0)) == pytest.approx((42.0, 42.0))
    assert bootstrap_ci(np.zeros(0)) is None


def test_ratio_statistic_is_resampled_on_sums_not_on_per_example_ratios():
    # precision = sum(hits) / sum(predicted): a corpus-level metric like BLEU's n-gram precision
    stats = np.array([[1.0, 1.0], [0.0, 10.0], [5.0, 5.0]] * 20)

    def precision(sums: np.ndarray, n: int) -> np.ndarray:
        return sums[:, 0] / sums[:, 1]

    scores = bootstrap_scores(stats, precision, n_resamples=500)
    assert scores.shape == (500,)
    lo, hi = bootstrap_ci(stats, precision)
    assert lo < 6 / 16 < hi


def test_paired_bootstrap_finds_a_real_difference_and_none_between_equals():
    rng = np.random.default_rng(0)
    base = rng.binomial(1, 0.5, size=300) * 100.0
    better = np.where(rng.random(300) < 0.25, 100.0, base)  # fixes a quarter of the examples
    result = paired_bootstrap(better, base)
    assert result.delta == pytest.approx(better.mean() - base.mean())
    assert result.ci[0] > 0 and result.p_value < 0.01
    same = paired_bootstrap(base, base.copy())
    assert same.delta == 0 and same.p_value == 1.0 and same.ci == (0.0, 0.0)


def test_pairing_makes_a_small_consistent_gain_significant():
    rng = np.random.default_rng(4)
    a = rng.normal(50, 20, size=200)
    b = a - 1.0 + rng.normal(0, 0.5, size=200)  # 1 point worse on every example, examples vary a lot
    assert paired_bootstrap(a, b).p_value < 0.01
    # unpaired intervals of the two systems overlap heavily, which is why the pairing matters
    a_lo, a_hi = bootstrap_ci(a)
    b_lo, b_hi = bootstrap_ci(b)
    assert a_lo < b_hi and b_lo < a_hi


def test_paired_bootstrap_over_seeds_widens_with_seed_variance():
    rng = np.random.default_rng(3)
    examples = rng.binomial(1, 0.6, size=(1, 200, 1)) * 100.0
    stable = np.repeat(examples, 3, axis=0)  # three seeds, identical predictions
    noisy = stable.copy()
    noisy[0, :60] = 0.0  # one bad seed
    b = rng.binomial(1, 0.5, size=(3, 200, 1)) * 100.0
    tight, loose = paired_bootstrap(stable, b), paired_bootstrap(noisy, b)
    assert loose.ci[1] - loose.ci[0] > tight.ci[1] - tight.ci[0]
    assert tight.n_examples == 200


def test_paired_bootstrap_rejects_misaligned_examples():
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap(np.zeros(10), np.zeros(11))


def test_mean_reduce_is_the_mean():
    sums = np.array([[30.0], [60.0]])
    assert mean_reduce(sums, 3).tolist() == [10.0, 20.0]


def test_holm_matches_statsmodels():
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(4)
    for m in (1, 3, 8, 20):
        p = list(rng.uniform(0, 0.2, size=m) ** 2)
        expected = multipletests(p, method="holm")[1]
        np.testing.assert_allclose(stats.holm(p), expected, rtol=1e-12)
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # by hand: 3·0.01, max(2·0.03, ·), 0.04


def test_tost_and_t_test_match_statsmodels_paired_tests():
    from scipy import stats as sps
    from statsmodels.stats.weightstats import ttost_paired

    rng = np.random.default_rng(5)
    for shift, margin in ((0.1, 1.0), (0.8, 1.0), (-0.3, 0.5), (2.0, 1.0)):
        a = rng.normal(10, 2, size=60)
        b = a - shift + rng.normal(0, 1.5, size=60)
        d = a - b
        se, df = d.std(ddof=1) / np.sqrt(len(d)), len(d) - 1
        expected = ttost_paired(a, b, -margin, margin)[0]
        assert stats.tost(float(d.mean()), float(se), df, margin) == pytest.approx(expected, rel=1e-9)
        assert stats.t_test(float(d.mean()), float(se), df) == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-9)


def test_mde_by_hand_and_power_at_it():
    from scipy import stats as sps

    # large n: (z_0.975 + z_0.8) · se = 2.8016 · se
    assert stats.mde(0.5, 100_000 - 1) == pytest.approx((1.959964 + 0.841621) * 0.5, rel=1e-3)
    # small n: the power of a two-sided paired t test at the MDE is 80% (noncentral t, by hand)
    n, se = 12, 1.3
    effect = stats.mde(se, n - 1)
    crit = sps.t.ppf(0.975, n - 1)
    nc = effect / se
    power = sps.nct.sf(crit, n - 1, nc) + sps.nct.cdf(-crit, n - 1, nc)
    assert power == pytest.approx(0.8, abs=1e-4)
    assert effect > 2.8016 * se  # few rows: t is wider than z


def test_sizing_rows_shrink_the_standard_error_to_the_target():
    target = stats.se_needed(1.0)
    assert target == pytest.approx(1.0 / (1.644854 + 1.281552), rel=1e-4)  # TOST at 0 is the stricter
    sizing = stats.size_for_margin(example_var=400.0, seed_var=0.05, rows_now=50, seeds_now=3, margin=1.0)
    rows = sizing.rows_needed[3]
    assert rows is not None and np.sqrt(400.0 / rows + 0.05 / 3) <= target < np.sqrt(400.0 / (rows - 1) + 0.05 / 3)
    assert sizing.rows_needed[10] < rows
    noisy = stats.size_for_margin(example_var=400.0, seed_var=50.0, rows_now=50, seeds_now=3, margin=1.0)
    assert noisy.rows_needed[3] is None and noisy.rows_needed[10] is None  # seed noise alone exceeds the target


def test_paired_bootstrap_splits_example_and_seed_variance():
    rng = np.random.default_rng(6)
    base = rng.normal(50, 10, size=400)
    a = np.stack([base + 2 + rng.normal(0, 3) for _ in range(4)])[..., None]  # seed offsets: spread ~ 3
    b = np.stack([base + rng.normal(0, 5, size=400)])[..., None]
    result = stats.paired_bootstrap(a, b, n_resamples=2000, seed=0)
    assert result.example_var == pytest.approx(25.0, rel=0.25)  # per-example variance of A − B: 5²
    assert 1.0 < result.seed_var < 40.0 and result.se > np.sqrt(25.0 / 400)


def test_welch_df_counts_seeds_not_rows_when_the_seed_spread_dominates():
    assert stats.welch_df(0.0, 500, 4.0, 3, 4.0, 3) == pytest.approx(4.0)
    assert stats.welch_df(1000.0, 500, 0.0, 1, 0.0, 1) == pytest.approx(499.0)
    mixed = stats.welch_df(100.0, 500, 4.0, 5, 1.0, 5)
    assert 4.0 < mixed < 499.0


def test_spread_power_matches_a_simulated_f_test():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 2.0, size=(4000, 10))
    b = rng.normal(0, 1.0, size=(4000, 10))
    f = a.var(1, ddof=1) / b.var(1, ddof=1)
    lo, hi = scipy_stats.f.ppf([0.025, 0.975], 9, 9)
    simulated = np.mean((f > hi) | (f < lo))
    assert stats.spread_power(10, 10, 2.0) == pytest.approx(simulated, abs=0.03)
    assert stats.spread_power(stats.seeds_for_spread(2.0), stats.seeds_for_spread(2.0)) >= 0.8
    assert stats.spread_power(stats.seeds_for_spread(2.0) - 1, stats.seeds_for_spread(2.0) - 1) < 0.8


def test_spread_test_is_brown_forsythe_with_a_ratio_interval():
    rng = np.random.default_rng(3)
    wide, narrow = rng.normal(50, 10, 15), rng.normal(50, 2, 15)
    result = stats.spread_test(wide, narrow)
    assert result.p_value == pytest.approx(scipy_stats.levene(wide, narrow, center="median").pvalue)
    assert result.ratio == pytest.approx(np.std(wide, ddof=1) / np.std(narrow, ddof=1))
    assert result.ci[0] > 1 and result.p_value < 0.05
