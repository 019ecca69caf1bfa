"""Anytime-valid quality tests for a grid that adds seeds until its tests are decisive (``until: decisive``).

A grid that looks at its tests after every added cell and stops once they are decisive would, with the
fixed-sample t test, find a difference that is not there far more often than 5% of the time (every look
is another chance; ``null_rejection_rates`` measures it). Its quality tests therefore use a confidence
sequence: a boundary that a null effect crosses with probability at most alpha *at any time*, however
often one looks and whenever one stops.

The boundary is the two-sided normal mixture of Howard, Ramdas, McAuliffe & Sekhon (2021), "Time-uniform,
nonparametric, nonasymptotic confidence sequences", Ann. Statist. 49(2), eq. (14) (Robbins' mixture): with
the effect's estimate d, its standard error se and information I = 1/se², the sum S = d·I behaves as a
Brownian motion in I (adding seeds and rows only adds information; ``Cov(d_j, d_k) = Var(d_k)`` for an
earlier look j), and

    M(I) = sqrt(rho / (I + rho)) · exp(S² / (2 (I + rho)))

is a nonnegative martingale under "effect = 0", so by Ville's inequality P(M ever ≥ 1/alpha) ≤ alpha. The
anytime-valid p-value after k looks is min(1, 1 / max_{j ≤ k} M_j): valid whenever the grid stops, so Holm
over such p-values still controls the family-wise error (Holm needs only each p-value valid). rho sets where
the boundary is tightest; it is chosen (before any data) for the information at which the test would be
decisive at its margin, ``1 / stats.se_needed(margin, alpha / m)²``, with Waudby-Smith et al. (2024,
"Time-uniform central limit theory and asymptotic confidence sequences", Ann. Statist.) rho =
I* / (2 log(1/alpha) + log(1 + 2 log(1/alpha))).

The standard error is estimated (from few seeds, early on), which the Brownian boundary does not allow
for: each look's t statistic is first mapped to the normal deviate with the same tail probability at its
Welch degrees of freedom (``stats.welch_df``), the significance-level approach of group-sequential t tests
(Jennison & Turnbull 2000, *Group Sequential Methods*, §3.8). ``null_rejection_rates`` checks the whole
procedure by simulation (tests/compare/test_sequential.py).

What the report uses (``split_p_values``) spends half of alpha on the fixed-sample t test at the first look
(the planned cells, whose number was fixed before any look) and half on the mixture over every look, a
Bonferroni split: a test the added cells never reach keeps the planned analysis's power (at alpha / 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FIXED = "fixed-sample"
SEQUENTIAL = "sequential"  # anytime-valid: normal-mixture confidence sequence, peeked after every added cell
LOOKS_SUFFIX = ".sequential.json"  # beside the store: every test's looks, in order


@dataclass(frozen=True)
class Look:
    """One interim analysis of one test: the effect, its standard error and the t test's degrees of freedom."""

    effect: float
    se: float
    df: float


def rho_for(target_se: float, alpha: float) -> float:
    """The mixture's rho, tightest at information 1 / target_se² (Waudby-Smith et al. 2024, eq. for rho)."""
    log_inv = -2.0 * np.log(alpha)
    return float((1.0 / target_se ** 2) / (log_inv + np.log(1.0 + log_inv)))


def log_mixture(look: Look, rho: float, null: float = 0.0) -> float:
    """log M at this look for H0: effect = ``null`` (t mapped to the normal scale at the look's df)."""
    from scipy import stats as sps

    if look.se <= 0:
        return 0.0 if look.effect == null else float("inf")
    t = abs(look.effect - null) / look.se
    z = float(sps.norm.isf(sps.t.sf(t, look.df)))  # the normal deviate with the t statistic's tail probability
    information = 1.0 / look.se ** 2
    return float(0.5 * np.log(rho / (information + rho)) + z * z * information / (2.0 * (information + rho)))


def anytime_p(looks: list[Look], rho: float, null: float = 0.0, side: int = 0) -> float:
    """min(1, 1 / max over looks of M): the anytime-valid p-value of H0: effect = ``null``.

    ``side`` = +1 counts only looks whose effect lies above ``null`` (evidence for effect > null), −1 only
    those below, 0 both (two-sided). One-sided use of the two-sided mixture is valid, a little conservative.
    """
    best = 0.0
    for look in looks:
        if side and np.sign(look.effect - null) != side:
            continue
        best = max(best, log_mixture(look, rho, null))
    return float(min(1.0, np.exp(-best)))


def sequential_p_values(looks: list[Look], margin: float, target_se: float, alpha: float) -> tuple[float, float]:
    """(p of effect = 0, TOST p of |effect| ≥ margin), both anytime-valid over ``looks``."""
    rho = rho_for(target_se, alpha)
    p = anytime_p(looks, rho)
    p_tost = max(anytime_p(looks, rho, -margin, side=+1), anytime_p(looks, rho, margin, side=-1))
    return p, p_tost


def split_p_values(looks: list[Look], margin: float, target_se: float, alpha: float) -> tuple[float, float]:
    """(p, TOST p) of the procedure an ``until: decisive`` grid reports: alpha split in two halves (Bonferroni),
    one for the fixed-sample t test (and TOST) at the first look, one for the confidence sequence over all looks:
    p = min(1, 2 · min(p_first, p_anytime)).

    The first look is the planned cells, measured before any cell was added: its sample size was fixed in
    advance, so its t test is valid as a fixed-sample test, and the mixture's p is valid whenever the grid
    stops; P(2 · min(p1, p2) <= a) <= P(p1 <= a/2) + P(p2 <= a/2) <= a. A test that the added cells never
    touch keeps (half) the power of the planned analysis instead of the mixture's, which at an information far
    below the one rho is tuned for, and few seeds' degrees of freedom, is several times weaker; the price is
    a factor 2 on every p. ``null_rejection_rates`` simulates this combination.
    """
    from tunelab.stats import t_test, tost

    first = looks[0]
    p_seq, tost_seq = sequential_p_values(looks, margin, target_se, alpha)
    p_first = t_test(first.effect, first.se, first.df) if first.se > 0 else (0.0 if first.effect else 1.0)
    tost_first = tost(first.effect, first.se, first.df, margin) if first.se > 0 else float(abs(first.effect) >= margin)
    return min(1.0, 2.0 * min(p_first, p_seq)), min(1.0, 2.0 * min(tost_first, tost_seq))


def look_key(claim_id: str, group: str) -> str:
    return f"{claim_id}|{group}"


def looks_path(store_path: str | Path) -> Path:
    return Path(str(store_path) + LOOKS_SUFFIX)


def load_looks(store_path: str | Path) -> dict[str, list[Look]]:
    """Every test's looks recorded by an ``until: decisive`` grid on this store ({} if none ran)."""
    path = looks_path(store_path)
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    return {test: [Look(*values) for values in looks] for test, looks in raw.get("tests", {}).items()}


def save_looks(store_path: str | Path, looks: dict[str, list[Look]]) -> None:
    from tunelab.paths import atomic_write_json

    atomic_write_json(looks_path(store_path), {"procedure": "normal-mixture confidence sequence (Howard et al. 2021)",
                                               "tests": {t: [[x.effect, x.se, x.df] for x in ls]
                                                         for t, ls in sorted(looks.items())}})


def with_look(looks: list[Look], look: Look) -> list[Look]:
    """The looks plus this one, unless it repeats the last (a report rebuilt with no new cell is no new look)."""
    return looks if looks and looks[-1] == look else [*looks, look]


# ---------------------------------------------------------------- simulation of the procedure under the null


@dataclass
class NullRates:
    sequential: float  # share of simulated null grids the confidence sequence ever rejected
    naive: float  # share a fixed-sample t test rejected at some look (peeking after every seed)
    sims: int

    def interval(self, rate: float) -> tuple[float, float]:
        """95% Clopper–Pearson interval of a simulated rate (its Monte Carlo uncertainty)."""
        from scipy import stats as sps

        ci = sps.binomtest(round(rate * self.sims), self.sims).proportion_ci(0.95, method="exact")
        return float(ci.low), float(ci.high)


def null_rejection_rates(sims: int = 2000, first_seeds: int = 3, last_seeds: int = 40, rows: int = 200,
                         example_sd: float = 5.0, seed_sd: tuple[float, float] = (2.0, 2.0), margin: float = 1.0,
                         alpha: float = 0.05, seed: int = 0, t_to_normal: bool = True,
                         split: bool = True) -> NullRates:
    """Simulate a test with no true difference, looked at after every added seed pair, ``sims`` times.

    Each simulated test has ``rows`` fixed evaluation rows (their sampling error, sd ``example_sd`` per
    row, is drawn once and shared by every look) and seeds of A and B added one pair per look, from
    ``first_seeds`` to ``last_seeds`` (per-seed scores with sd ``seed_sd``). Each look estimates the
    standard error as the paired bootstrap does (example part + each side's sample seed variance / S).
    Returns how often each procedure ever called the test significant at ``alpha``. ``split``: the
    procedure the report uses (``split_p_values``: the t test at the first look at alpha / 2, or the mixture
    at any look at alpha / 2); without it, the mixture alone at alpha. Vectorised: every simulation and look
    at once.
    """
    from scipy import stats as sps

    from tunelab.stats import se_needed

    rng = np.random.default_rng(seed)
    seeds = np.arange(1, last_seeds + 1)
    row_error = rng.normal(0.0, example_sd / np.sqrt(rows), size=(sims, 1))
    means, variances = [], []
    for sd in seed_sd:
        scores = rng.normal(0.0, sd, size=(sims, last_seeds))
        total, squares = np.cumsum(scores, 1), np.cumsum(scores ** 2, 1)
        means.append(total / seeds)
        with np.errstate(divide="ignore", invalid="ignore"):
            variances.append((squares - total ** 2 / seeds) / (seeds - 1))
    look = slice(first_seeds - 1, last_seeds)
    s = seeds[look]
    effect = row_error + means[0][:, look] - means[1][:, look]
    example_part = example_sd ** 2 / rows
    seed_parts = [v[:, look] / s for v in variances]
    se2 = example_part + seed_parts[0] + seed_parts[1]
    df = se2 ** 2 / (example_part ** 2 / (rows - 1) + (seed_parts[0] ** 2 + seed_parts[1] ** 2) / (s - 1))
    t = np.abs(effect) / np.sqrt(se2)
    tail = sps.t.sf(t, df)
    naive = (2 * tail < alpha).any(axis=1)
    z = sps.norm.isf(tail) if t_to_normal else t
    information = 1.0 / se2
    rho = rho_for(se_needed(margin, alpha), alpha)
    log_m = 0.5 * np.log(rho / (information + rho)) + z ** 2 * information / (2 * (information + rho))
    if split:  # half of alpha to the planned look's t test, half to the mixture over every look
        sequential = (2 * tail[:, 0] < alpha / 2) | (log_m >= np.log(2 / alpha)).any(axis=1)
    else:
        sequential = (log_m >= np.log(1 / alpha)).any(axis=1)
    return NullRates(float(sequential.mean()), float(naive.mean()), sims)
