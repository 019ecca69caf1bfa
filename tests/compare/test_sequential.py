"""The sequential (anytime-valid) quality tests of an ``until: decisive`` grid."""

from __future__ import annotations

import time

import pytest

from tunelab.compare.sequential import (
    Look,
    anytime_p,
    load_looks,
    null_rejection_rates,
    rho_for,
    save_looks,
    sequential_p_values,
    split_p_values,
    with_look,
)

ALPHA = 0.05


def test_peeking_after_every_seed_keeps_the_sequential_error_at_alpha_and_breaks_the_t_test():
    """2000 null grids, each looked at after every added seed pair from 3 to 40 seeds a side."""
    start = time.process_time()
    rates = null_rejection_rates(sims=2000, first_seeds=3, last_seeds=40, seed=1)
    seq_ci, naive_ci = rates.interval(rates.sequential), rates.interval(rates.naive)
    print(f"false positives: sequential {rates.sequential:.4f} (95% MC {seq_ci[0]:.4f}-{seq_ci[1]:.4f}), "
          f"naive repeated t tests {rates.naive:.4f} ({naive_ci[0]:.4f}-{naive_ci[1]:.4f})")
    assert rates.sequential <= ALPHA and seq_ci[0] < ALPHA  # at or below alpha, beyond Monte Carlo doubt
    assert naive_ci[0] > ALPHA  # peeking with the fixed-sample test finds differences that are not there
    assert time.process_time() - start < 10


@pytest.mark.parametrize("case", [dict(first_seeds=2), dict(example_sd=20.0, seed_sd=(4.0, 1.0)),
                                  dict(example_sd=1.0, seed_sd=(3.0, 3.0), rows=50)])
def test_the_error_stays_at_alpha_with_two_seeds_and_uneven_noise(case):
    rates = null_rejection_rates(sims=2000, seed=2, **case)
    assert rates.interval(rates.sequential)[0] < ALPHA and rates.sequential <= ALPHA


def test_without_the_t_to_normal_step_two_seeds_break_it():
    """The standard error from two seeds is itself noisy: the Brownian boundary alone is not enough."""
    rates = null_rejection_rates(sims=2000, seed=2, first_seeds=2, t_to_normal=False, split=False)
    assert rates.interval(rates.sequential)[0] > ALPHA


def test_anytime_p_is_the_running_best_look_and_never_rises():
    rho = rho_for(0.4, ALPHA)
    looks = [Look(0.5, 1.0, 10), Look(2.0, 0.5, 20), Look(0.1, 0.3, 30)]
    ps = [anytime_p(looks[: k + 1], rho) for k in range(3)]
    assert ps[0] >= ps[1] == ps[2] and ps[1] < 0.05  # the second look crossed; the third cannot undo it
    assert anytime_p([Look(0.0, 1.0, 10)], rho) == 1.0


def test_sequential_p_is_stricter_than_one_fixed_t_test_at_the_same_look():
    from tunelab.stats import t_test

    look = Look(1.0, 0.45, 40)  # t = 2.2: p ~ 0.03 for a single planned test
    p, _ = sequential_p_values([look], margin=1.0, target_se=0.35, alpha=ALPHA)
    assert t_test(1.0, 0.45, 40) < ALPHA < p


def test_the_mixture_alone_also_keeps_alpha():
    rates = null_rejection_rates(sims=2000, first_seeds=3, last_seeds=40, seed=1, split=False)
    assert rates.sequential <= ALPHA and rates.interval(rates.sequential)[0] < ALPHA


def test_the_split_keeps_half_the_planned_t_test_and_half_the_mixture():
    """A clear effect at the planned look (few seeds: the mixture alone would not call it) keeps 2x its t test's
    p; an effect that only later looks show is called by the mixture (at alpha / 2)."""
    from tunelab.stats import t_test

    planned = Look(-11.2, 2.26, 11.7)  # t = 5 from 3 seeds a side: p ~ 3e-4
    p_mix, _ = sequential_p_values([planned], margin=3.0, target_se=0.77, alpha=0.0025)
    p, _ = split_p_values([planned], margin=3.0, target_se=0.77, alpha=0.0025)
    assert p == pytest.approx(2 * t_test(-11.2, 2.26, 11.7)) and p < 0.0025 < p_mix
    looks = [Look(0.4, 1.0, 10), Look(2.0, 0.3, 60)]  # nothing at first; decisive once seeds were added
    p, _ = split_p_values(looks, margin=1.0, target_se=0.35, alpha=ALPHA)
    assert p == pytest.approx(2 * sequential_p_values(looks, 1.0, 0.35, ALPHA)[0]) and p < ALPHA


def test_equivalence_by_confidence_sequence():
    p, p_tost = sequential_p_values([Look(0.02, 0.1, 100)], margin=1.0, target_se=0.1, alpha=ALPHA)
    assert p > 0.5 and p_tost < 0.01
    _, p_tost = sequential_p_values([Look(0.9, 0.1, 100)], margin=1.0, target_se=0.1, alpha=ALPHA)
    assert p_tost > 0.05  # near the margin: not shown inside it


def test_looks_round_trip_beside_the_store(tmp_path):
    store = tmp_path / "results.sqlite"
    assert load_looks(store) == {}
    looks = {"ipt_beats_pt|t": [Look(1.0, 0.5, 4.0)]}
    looks["ipt_beats_pt|t"] = with_look(looks["ipt_beats_pt|t"], Look(1.0, 0.5, 4.0))  # the same look: not added
    save_looks(store, looks)
    assert load_looks(store) == {"ipt_beats_pt|t": [Look(1.0, 0.5, 4.0)]}
