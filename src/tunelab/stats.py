"""Bootstrap confidence intervals and paired bootstrap tests over examples (and seeds).

A metric is given as per-example sufficient statistics ``stats`` (n, d) and a ``reduce`` from their
sums to the score (see ``tunelab.metrics.Metric``). One bootstrap resample draws n examples with
replacement, i.e. a vector of counts; all resamples at once are a count matrix W (R, n), so the
resampled statistic sums are one matrix product ``W @ stats`` (R, d). This makes 1,000 resamples of
corpus BLEU on thousands of sentences take milliseconds rather than re-running sacrebleu.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Reduce = Callable[[np.ndarray, int], np.ndarray]  # (R, d) summed statistics, n -> (R,) scores


def mean_reduce(sums: np.ndarray, n: int) -> np.ndarray:
    """The reduction of a metric that is a mean of per-example scores (statistic d = 1)."""
    return sums[:, 0] / n


def resample_counts(n: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(R, n) counts: how often each example is drawn in each resample of size n."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples).astype(np.float64)


def _as_stats(stats: np.ndarray) -> np.ndarray:
    stats = np.asarray(stats, dtype=np.float64)
    return stats.reshape(-1, 1) if stats.ndim == 1 else stats


def bootstrap_scores(stats: np.ndarray, reduce: Reduce = mean_reduce, n_resamples: int = 1000,
                     seed: int = 0) -> np.ndarray:
    """Scores of ``n_resamples`` example resamples, shape (R,)."""
    stats = _as_stats(stats)
    counts = resample_counts(len(stats), n_resamples, np.random.default_rng(seed))
    return reduce(counts @ stats, len(stats))


def bootstrap_ci(stats: np.ndarray, reduce: Reduce = mean_reduce, n_resamples: int = 1000, seed: int = 0,
                 confidence: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the score; None when there are no examples.

    >>> lo, hi = bootstrap_ci(np.array([0.0, 100.0] * 50))
    >>> 38 < lo < 50 < hi < 62
    True
    """
    stats = _as_stats(stats)
    if len(stats) == 0:
        return None
    scores = bootstrap_scores(stats, reduce, n_resamples, seed)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(scores, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


@dataclass
class PairedResult:
    """A - B: the observed difference, its percentile interval, and a two-sided bootstrap p-value."""

    delta: float
    ci: tuple[float, float]
    p_value: float
    a: float
    b: float
    n_examples: int
    n_resamples: int
    diffs: np.ndarray | None = None  # (R,) resampled differences (a stratified pooling across tasks averages them)
    example_var: float = 0.0  # n x variance of A − B from resampling examples only (seeds fixed)
    seed_var: float = 0.0  # variance of per-seed scores of A plus that of B (0 for a single seed)
    seed_vars: tuple[float, float] = (0.0, 0.0)  # the two parts of seed_var: A's and B's
    system_vars: tuple[float, ...] = ()  # each system's own seed spread (A, B; a contrast's four: A1, B1, A2, B2)

    @property
    def se(self) -> float:
        """Bootstrap standard error of A − B (examples and seeds resampled)."""
        return float(np.std(self.diffs, ddof=1)) if self.diffs is not None and len(self.diffs) > 1 else 0.0


def _per_seed(stats: np.ndarray) -> np.ndarray:
    """(S, n, d): one statistics matrix per seed."""
    stats = np.asarray(stats, dtype=np.float64)
    if stats.ndim == 1:
        return stats.reshape(1, -1, 1)
    return stats[None] if stats.ndim == 2 else stats


def _system(stats: np.ndarray, counts: np.ndarray, reduce: Reduce, rng: np.random.Generator
            ) -> tuple[float, np.ndarray, np.ndarray, float]:
    """One system under shared example resamples ``counts`` (R, n), its seeds drawn from ``rng``: its score (mean
    over seeds), resampled scores (R,), resampled scores with every seed kept (R,) and the spread of its seeds."""
    n_resamples, n = counts.shape
    seeds = np.array([reduce(s.sum(0, keepdims=True), n)[0] for s in stats])
    per_seed = np.stack([reduce(counts @ s, n) for s in stats], axis=1)  # (R, S)
    picks = rng.integers(0, len(stats), size=(n_resamples, len(stats)))  # seeds drawn per resample
    spread = float(np.var(seeds, ddof=1)) if len(seeds) > 1 else 0.0
    return float(seeds.mean()), np.take_along_axis(per_seed, picks, axis=1).mean(1), per_seed.mean(1), spread


def paired_bootstrap(a: np.ndarray, b: np.ndarray, reduce: Reduce = mean_reduce, n_resamples: int = 1000,
                     seed: int = 0, confidence: float = 0.95) -> PairedResult:
    """Paired bootstrap of system A minus system B on the same examples, over examples and seeds.

    ``a`` and ``b`` are statistics of shape (n,), (n, d) or (S, n, d) with S seeds (training runs)
    per system; the two systems' example axes must align. Each resample draws one set of examples
    shared by both systems (the pairing) and, independently per system, S seeds with replacement;
    a system's score is the mean over its drawn seeds of ``reduce`` on that seed's resampled sums.
    The p-value is two-sided: twice the share of resampled differences on the other side of 0.
    """
    a, b = _per_seed(a), _per_seed(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired bootstrap needs the same examples: {a.shape[1]} vs {b.shape[1]}")
    n = a.shape[1]
    rng = np.random.default_rng(seed)
    counts = resample_counts(n, n_resamples, rng)  # (R, n), shared: the pairing
    score_a, boot_a, examples_a, spread_a = _system(a, counts, reduce, rng)
    score_b, boot_b, examples_b, spread_b = _system(b, counts, reduce, rng)
    diffs = boot_a - boot_b
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(diffs, [alpha, 1.0 - alpha])
    other_side = np.mean(diffs <= 0) if score_a > score_b else np.mean(diffs >= 0)
    p_value = min(1.0, 2.0 * float(other_side)) if score_a != score_b else 1.0
    example_var = float(n * np.var(examples_a - examples_b, ddof=1)) if n_resamples > 1 else 0.0
    return PairedResult(score_a - score_b, (float(lo), float(hi)), p_value, score_a, score_b, n, n_resamples,
                        diffs, example_var, spread_a + spread_b, (spread_a, spread_b), (spread_a, spread_b))


def contrast_bootstrap(first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray],
                       reduce: Reduce = mean_reduce, n_resamples: int = 1000, seed: int = 0,
                       confidence: float = 0.95) -> PairedResult:
    """A difference of differences, (A1 − B1) − (A2 − B2), of four systems scored on the same examples.

    ``first`` = (A1, B1) and ``second`` = (A2, B2), each statistics as in ``paired_bootstrap``. The paired
    bootstrap with four systems: each resample draws one set of examples shared by all four (their rows are the
    same evaluation examples: that pairs them across the two differences too), and each system draws its own
    seeds. The result reads as ``paired_bootstrap``'s with A = A1 − B1 and B = A2 − B2: ``a`` and ``b`` are the
    two differences, ``seed_vars`` the seed spread of each pair (the sum of its two systems').
    """
    systems = [_per_seed(s) for s in (*first, *second)]
    if len({s.shape[1] for s in systems}) != 1:
        raise ValueError(f"contrast bootstrap needs the same examples: {[s.shape[1] for s in systems]}")
    n = systems[0].shape[1]
    rng = np.random.default_rng(seed)
    counts = resample_counts(n, n_resamples, rng)  # (R, n), shared by all four systems
    (s1, b1, e1, v1), (s2, b2, e2, v2), (s3, b3, e3, v3), (s4, b4, e4, v4) = (
        _system(s, counts, reduce, rng) for s in systems)
    score_a, score_b = s1 - s2, s3 - s4
    diffs = (b1 - b2) - (b3 - b4)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(diffs, [alpha, 1.0 - alpha])
    other_side = np.mean(diffs <= 0) if score_a > score_b else np.mean(diffs >= 0)
    p_value = min(1.0, 2.0 * float(other_side)) if score_a != score_b else 1.0
    example_var = float(n * np.var((e1 - e2) - (e3 - e4), ddof=1)) if n_resamples > 1 else 0.0
    return PairedResult(score_a - score_b, (float(lo), float(hi)), p_value, score_a, score_b, n, n_resamples,
                        diffs, example_var, v1 + v2 + v3 + v4, (v1 + v2, v3 + v4), (v1, v2, v3, v4))


# ---------------------------------------------------------------- decisions: Holm, TOST, MDE, sizing
#
# A quality test's effect is A − B with a bootstrap standard error ``se`` (examples and seeds
# resampled). Its tests are t tests on delta / se with ``df`` = examples − 1: for one seed per method
# and a per-example mean metric this is exactly the paired t test (and ``tost`` is exactly
# ``statsmodels.stats.weightstats.ttost_paired``); for corpus metrics and several seeds it is the same
# test with the bootstrap's standard error, which counts the seed-to-seed spread as well.

POWER = 0.8
ALPHA = 0.05


def holm(p_values: list[float]) -> list[float]:
    """Holm step-down adjusted p-values (same order as given); controls the family-wise error rate.

    >>> [round(p, 3) for p in holm([0.01, 0.04, 0.03])]
    [0.03, 0.06, 0.06]
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))  # monotone: never below an earlier step
        adjusted[i] = running
    return adjusted


def t_test(delta: float, se: float, df: float) -> float:
    """Two-sided p-value of delta = 0 given its standard error (t with ``df`` degrees of freedom)."""
    from scipy import stats as sps

    if se <= 0:
        return 1.0 if delta == 0 else 0.0
    return float(2 * sps.t.sf(abs(delta) / se, df))


def tost(delta: float, se: float, df: float, margin: float) -> float:
    """Two one-sided tests of |A − B| < margin: the larger of the two one-sided p-values.

    Small means *equivalent*: the difference is shown to lie within ±margin.
    """
    from scipy import stats as sps

    if se <= 0:
        return 0.0 if abs(delta) < margin else 1.0
    p_lower = sps.t.sf((delta + margin) / se, df)  # H0: delta <= -margin
    p_upper = sps.t.cdf((delta - margin) / se, df)  # H0: delta >= +margin
    return float(max(p_lower, p_upper))


def mde(se: float, df: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimum detectable effect: the true |A − B| a two-sided test at ``alpha`` finds with ``power``.

    Uses statsmodels' power of the t test (noncentral t) with standardised effect d = effect / sd,
    sd = se * sqrt(n), n = df + 1; for large n this is (z_{1-alpha/2} + z_power) * se = 2.80 * se.
    """
    from statsmodels.stats.power import TTestPower

    if se <= 0:
        return 0.0
    n = df + 1
    if n < 2:
        return float("inf")
    d = TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power, alternative="two-sided")
    return float(np.asarray(d).item() * se * np.sqrt(n))


@dataclass
class Sizing:
    """Rows and seeds for a test to become decisive at ``margin`` (see ``size_for_margin``)."""

    margin: float
    se_now: float
    se_needed: float
    rows_now: int
    seeds_now: int
    rows_needed: dict[int, int | None]  # seeds per method -> rows (None: more seeds alone cannot get there)


def se_needed(margin: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The standard error at which a test is decisive at ``margin`` with ``power``, whatever the truth:

    a true difference of ``margin`` is detected (two-sided, ``alpha``), and a true difference of 0
    is shown equivalent within ``margin`` by TOST; the stricter of the two (normal approximation).
    """
    from scipy import stats as sps

    detect = margin / (sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power))
    equivalent = margin / (sps.norm.ppf(1 - alpha) + sps.norm.ppf(1 - (1 - power) / 2))
    return float(min(detect, equivalent))


def size_for_margin(example_var: float, seed_var: float, rows_now: int, seeds_now: int, margin: float,
                    alpha: float = ALPHA, power: float = POWER, seed_options: tuple[int, ...] = (3, 5, 10)
                    ) -> Sizing:
    """Rows needed per seed count, from a variance split se² = example_var / n + seed_var / S.

    ``example_var`` is n times the squared standard error from resampling examples only (the
    per-example variance of A − B); ``seed_var`` is S times the seed part (the spread of the
    methods' per-seed scores). ``alpha`` should be the Holm/Bonferroni level the test will face.
    """
    target = se_needed(margin, alpha, power)
    se_now = float(np.sqrt(example_var / max(rows_now, 1) + seed_var / max(seeds_now, 1)))
    needed: dict[int, int | None] = {}
    for seeds in sorted({seeds_now, *seed_options}):
        room = target ** 2 - seed_var / seeds
        needed[seeds] = None if room <= 0 else int(np.ceil(example_var / room))
    return Sizing(margin, se_now, target, rows_now, seeds_now, needed)


def welch_df(example_var: float, rows: int, seed_var_a: float, seeds_a: int, seed_var_b: float, seeds_b: int) -> float:
    """Welch–Satterthwaite degrees of freedom of se² = example_var / rows + var_a / S_a + var_b / S_b.

    Each variance is estimated from its own sample (rows − 1, S_a − 1, S_b − 1 degrees of freedom); a
    side with one seed has no estimated seed variance and adds nothing. With few seeds and a large seed
    spread this is close to S − 1, not rows − 1: what a t test of A − B can claim with that many seeds.

    >>> round(welch_df(0.0, 100, 4.0, 3, 4.0, 3), 6)  # seeds only: 2 + 2
    4.0
    """
    return welch_df_systems(example_var, rows, [(seed_var_a, seeds_a), (seed_var_b, seeds_b)])


def welch_df_systems(example_var: float, rows: int, systems: list[tuple[float, int]]) -> float:
    """``welch_df`` for any number of systems, each (seed variance, seeds): e.g. a contrast's four.

    >>> round(welch_df_systems(0.0, 100, [(4.0, 3), (4.0, 3), (0.0, 1), (4.0, 3)]), 6)  # three seeded systems
    6.0
    """
    parts = [(example_var / max(rows, 1), rows - 1), *((var / max(seeds, 1), seeds - 1) for var, seeds in systems)]
    parts = [(v, df) for v, df in parts if v > 0 and df >= 1]
    if not parts:
        return float(max(rows - 1, 1))
    return float(sum(v for v, _ in parts) ** 2 / sum(v ** 2 / df for v, df in parts))


# ---------------------------------------------------------------- the spread over seeds (variance claims)

SPREAD_MIN_SEEDS = 10  # seeds per side below which a spread test is never more than *underpowered*
SPREAD_RATIO = 2.0  # the SD ratio the power is stated for: one method twice as spread out as the other


@dataclass
class SpreadTest:
    """Is A's spread over seeds larger than B's? Brown–Forsythe test plus a bootstrap interval of the SD ratio."""

    sd_a: float
    sd_b: float
    ratio: float  # sd_a / sd_b
    ci: tuple[float, float]  # percentile bootstrap interval of the ratio (seeds resampled within each side)
    p_value: float  # two-sided Brown–Forsythe (Levene with median centring) p-value
    power: float  # power at these seed counts to detect an SD ratio of SPREAD_RATIO (two-sided F test)
    seeds_needed: int  # seeds per side for 80% power at SPREAD_RATIO


def spread_test(a: np.ndarray, b: np.ndarray, n_resamples: int = 2000, seed: int = 0,
                alpha: float = ALPHA) -> SpreadTest:
    """Compare the spread of per-seed scores ``a`` and ``b`` (one score per training seed).

    ``scipy.stats.levene(center='median')`` is the Brown–Forsythe test (robust to non-normal scores);
    its power is stated with the F test's (normal scores): the chance at these seed counts of finding an
    SD ratio of ``SPREAD_RATIO``. The interval is of sd_a / sd_b, resampling seeds within each side.
    """
    from scipy import stats as sps

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    sd_a, sd_b = float(np.std(a, ddof=1)), float(np.std(b, ddof=1))
    with np.errstate(divide="ignore", invalid="ignore"):  # two seeds a side: equal deviations, 0/0 (p = nan -> 1)
        p = float(sps.levene(a, b, center="median").pvalue) if sd_a + sd_b > 0 else 1.0
    rng = np.random.default_rng(seed)
    boot_a = np.take(a, rng.integers(0, len(a), (n_resamples, len(a)))).std(1, ddof=1)
    boot_b = np.take(b, rng.integers(0, len(b), (n_resamples, len(b)))).std(1, ddof=1)
    ratios = np.where(boot_b > 0, boot_a / np.where(boot_b > 0, boot_b, 1.0), np.inf)  # a resample of equal seeds: sd 0
    lo, hi = np.quantile(ratios, [alpha / 2, 1 - alpha / 2], method="inverted_cdf")  # no interpolation next to inf
    ratio = sd_a / sd_b if sd_b > 0 else float("inf")
    return SpreadTest(sd_a, sd_b, ratio, (float(lo), float(hi)), float(np.nan_to_num(p, nan=1.0)),
                      spread_power(len(a), len(b), SPREAD_RATIO, alpha), seeds_for_spread(SPREAD_RATIO, alpha))


def spread_power(seeds_a: int, seeds_b: int, sd_ratio: float = SPREAD_RATIO, alpha: float = ALPHA) -> float:
    """Power of the two-sided F test of equal variances to detect ``sd_ratio`` (normal per-seed scores).

    Under the alternative var_a / var_b = r², F = s_a² / s_b² is r² times an F(S_a − 1, S_b − 1) variable.

    >>> round(spread_power(3, 3), 2), round(spread_power(10, 10), 2), round(spread_power(20, 20), 2)
    (0.1, 0.5, 0.84)
    """
    from scipy import stats as sps

    if seeds_a < 2 or seeds_b < 2:
        return 0.0
    d1, d2, r2 = seeds_a - 1, seeds_b - 1, sd_ratio ** 2
    upper, lower = sps.f.ppf(1 - alpha / 2, d1, d2), sps.f.ppf(alpha / 2, d1, d2)
    return float(sps.f.sf(upper / r2, d1, d2) + sps.f.cdf(lower / r2, d1, d2))


def seeds_for_spread(sd_ratio: float = SPREAD_RATIO, alpha: float = ALPHA, power: float = POWER) -> int:
    """Seeds per side the F test needs for ``power`` at ``sd_ratio`` (smallest S with enough power)."""
    for seeds in range(2, 1000):
        if spread_power(seeds, seeds, sd_ratio, alpha) >= power:
            return seeds
    return 1000
