"""Had a run's training loss flattened? (tunelab.convergence, and how claims and the report use it)."""

from __future__ import annotations

import json

import numpy as np

from tunelab import convergence


def _noisy(curve: np.ndarray, sd: float = 0.05, seed: int = 0) -> list[float]:
    return list(curve + np.random.default_rng(seed).normal(0, sd, len(curve)))


def test_a_flat_noisy_curve_converged_and_a_falling_one_did_not():
    steps = np.arange(200)
    flat = _noisy(2.0 + np.exp(-steps / 10))  # decays in the first ~50 steps, then noise around 2
    falling = _noisy(4.0 - 0.01 * steps)  # still losing 0.5 per quarter at the end
    assert convergence.assess(flat)["converged"] is True
    result = convergence.assess(falling)
    assert result["converged"] is False and result["relative_change"] < -0.1 and result["steps"] == 200


def test_rising_loss_is_not_converged_either_and_short_runs_are_not_judged():
    assert convergence.assess(list(np.linspace(1.0, 2.0, 64)))["converged"] is False
    assert convergence.assess([3.0, 2.0, 1.0]) is None
    assert convergence.assess([float("nan")] * 40) is None


def test_the_tolerance_is_relative_to_the_loss_level():
    slope = list(100.0 - 0.01 * np.arange(100))  # falls 0.25 of 100 in the last quarter: 0.25%
    assert convergence.assess(slope)["converged"] is True
    assert convergence.assess(slope, tolerance=0.001)["converged"] is False


def test_of_row_prefers_the_recorded_verdict_and_falls_back_to_the_losses():
    recorded = {"result": {"train": {"convergence": {"converged": True}, "losses": list(np.linspace(3, 1, 40))}}}
    assert convergence.of_row(recorded) == {"converged": True}
    old = {"result": {"train": {"losses": list(np.linspace(3, 1, 40))}}}  # a store written before the check
    assert convergence.of_row(old)["converged"] is False
    assert convergence.of_row({"result": None}) is None


def test_a_claim_says_when_one_side_was_unconverged(tmp_path):
    from tunelab.compare.claims import evaluate_claims, summarise

    rows = []
    for method, name in (("ipt", "ipt"), ("pt", "prompt_tuning")):
        for seed in range(2):
            path = tmp_path / f"{method}{seed}.jsonl"
            path.write_text("".join(json.dumps({"id": f"e{i}", "scores": {"exact_match": 100.0 * (i % 2)}}) + "\n"
                                    for i in range(40)))
            losses = list(np.linspace(3, 1, 40)) if method == "pt" and seed == 1 else [1.0] * 40
            rows.append({"method": method, "method_name": name, "task": "t", "seed": seed, "train_size": None,
                         "prompt_length": None, "unseen": 0, "primary_metric": "exact_match", "quality": 50.0,
                         "predictions": str(path), "config": {"method": {"name": name}},
                         "result": {"train": {"losses": losses}}})
    findings = [f for f in evaluate_claims(rows, 200) if f.claim.id == "ipt_beats_pt"]
    assert findings[0].unconverged == ["PT (1 of 2 cells)"]
    assert summarise(findings)["ipt_beats_pt"].endswith("; PT unconverged")
