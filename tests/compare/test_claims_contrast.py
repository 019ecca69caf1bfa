"""The claims that need cells from cells or two models: IT→PT synergy, the scale contrast, PT's cross-task drop."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from tests.compare.test_claims import _cell, _scores

from tunelab.compare.claims import CLAIMS, evaluate_claims, summarise
from tunelab.stats import contrast_bootstrap


def _by_id(findings, cid):
    return [f for f in findings if f.claim.id == cid]


def _on(row: dict, model: str, params: int) -> dict:
    """The row as a cell of ``model`` (``params`` parameters, as result.json records them)."""
    return {**row, "config": {**row["config"], "model": {"name": model}}, "result": {"total_params": params}}


def _scale_rows(tmp_path, gains: dict[str, tuple[float, float]]) -> list[dict]:
    """Instruction-tuned (2 seeds) and base model (1 seed) on one unseen task, per model: {model: (p_it, p_base)}."""
    rows = []
    for k, (model, (p_it, p_base)) in enumerate(gains.items()):
        where = tmp_path / model
        where.mkdir()
        params = {"small": 100, "large": 200}[model]
        rows += [_on(_cell(where, "instruction_tuning", s, _scores(p_it, n=300, seed=10 * k + s), task="u",
                           unseen=True), model, params) for s in range(2)]
        rows.append(_on(_cell(where, "zero", 0, _scores(p_base, n=300, seed=10 * k + 5), task="u", unseen=True),
                        model, params))
    return rows


def test_scale_is_the_larger_models_gain_minus_the_smaller_models(tmp_path):
    rows = _scale_rows(tmp_path, {"small": (0.45, 0.4), "large": (0.8, 0.3)})
    findings = evaluate_claims(rows, n_resamples=500)
    (scale,) = _by_id(findings, "it_scale")
    q = {(r["config"]["model"]["name"], r["method"]): [] for r in rows}
    for r in rows:
        q[(r["config"]["model"]["name"], r["method"])].append(r["quality"])
    gain = {m: np.mean(q[(m, "instruction_tuning")]) - np.mean(q[(m, "zero")]) for m in ("small", "large")}
    assert scale.effect == pytest.approx(gain["large"] - gain["small"])
    assert scale.group == "u on large vs small" and scale.verdict == "supported"
    assert scale.p_adjusted is not None and scale.p_tost_adjusted is not None  # in both Holm families
    assert "instruction-tuned (large) − base model (large)" in scale.detail
    # it_unseen keeps each model's cells apart: one test per model, then the pooled one
    assert {f.group for f in _by_id(findings, "it_unseen")} == {"u on large", "u on small", "all tasks"}

    (tmp_path / "swap").mkdir()
    swapped = _scale_rows(tmp_path / "swap", {"small": (0.8, 0.3), "large": (0.45, 0.4)})
    (reverse,) = _by_id(evaluate_claims(swapped, n_resamples=500), "it_scale")
    assert reverse.verdict == "contradicted" and reverse.group == "u on large vs small"


def test_scale_needs_two_models(tmp_path):
    rows = [r for r in _scale_rows(tmp_path, {"small": (0.5, 0.4), "large": (0.8, 0.3)})
            if r["config"]["model"]["name"] == "small"]
    (scale,) = _by_id(evaluate_claims(rows, n_resamples=100), "it_scale")
    assert scale.verdict == "not measured" and scale.detail.startswith("needs instruction_tuning and the base model")
    assert "two models" in scale.detail


def _hex(name: str) -> str:
    """A grid cell's key (16 hex digits) for a readable test name."""
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def _keyed(row: dict, name: str, init_from: str | None = None, steps: int = 40) -> dict:
    """``row`` as the grid cell ``name`` (kept as ``name``; its key is 16 hex digits, as a grid's are), started from
    the cell named ``init_from``'s folder if given."""
    method = {**row["config"]["method"],
              **({"init_from": f"/runs/out/cells/{_hex(init_from)}"} if init_from else {})}
    return {**row, "key": _hex(name), "name": name,
            "config": {**row["config"], "method": method, "train": {"steps": steps}}}


def _gap_rows(tmp_path, p_pt_moved: float, p_lora_moved: float, with_lora_moved: bool = True,
              seeds: int = 2) -> list[dict]:
    """PT and LoRA trained on task x, the same used as is on task y, and PT and LoRA trained on y."""
    rows = []
    for s in range(seeds):
        rows += [_keyed(_cell(tmp_path, "pt", s, _scores(0.5, seed=s), task="x"), f"ptx{s}"),
                 _keyed(_cell(tmp_path, "lora", s, _scores(0.5, seed=s), task="x"), f"lorax{s}"),
                 _keyed(_cell(tmp_path, "pt", s, _scores(0.7, n=300, seed=20 + s), task="y"), f"pty{s}"),
                 _keyed(_cell(tmp_path, "lora", s, _scores(0.7, n=300, seed=30 + s), task="y"), f"loray{s}")]
        moved = tmp_path / f"moved{s}"
        moved.mkdir()
        rows.append(_keyed(_cell(moved, "pt", s, _scores(p_pt_moved, n=300, seed=40 + s), task="y"), f"ptxy{s}",
                           init_from=f"ptx{s}", steps=0))
        if with_lora_moved:
            rows.append(_keyed(_cell(moved, "lora", s, _scores(p_lora_moved, n=300, seed=50 + s), task="y"),
                               f"loraxy{s}", init_from=f"lorax{s}", steps=0))
    return rows


def test_transfer_gap_compares_pt_drop_with_lora_drop_on_the_target_rows(tmp_path):
    rows = _gap_rows(tmp_path, p_pt_moved=0.2, p_lora_moved=0.6)
    findings = evaluate_claims(rows, n_resamples=500)
    (gap,) = _by_id(findings, "pt_transfer_gap")
    mean = lambda name: np.mean([r["quality"] for r in rows if r["name"].startswith(name)  # noqa: E731
                                 and r["name"][len(name):].isdigit()])
    assert gap.effect == pytest.approx((mean("pty") - mean("ptxy")) - (mean("loray") - mean("loraxy")))
    assert gap.group == "y len=20" and gap.verdict == "supported" and gap.n["examples"] == 300
    # the moved cells are no PT or LoRA run of their own
    (lora_pt,) = [f for f in _by_id(findings, "lora_beats_pt") if f.group == "y"]
    assert lora_pt.n["a_seeds"] == 2 and lora_pt.n["b_seeds"] == 2
    assert lora_pt.effect == pytest.approx(mean("loray") - mean("pty"))

    (tmp_path / "even").mkdir()
    # the reverse gap: a t test whose degrees of freedom count the seeds (Welch–Satterthwaite) needs more than 2
    # seeds a side to call it; at 2 the same data is only underpowered
    (two,) = _by_id(evaluate_claims(_gap_rows(tmp_path / "even", 0.6, 0.2), n_resamples=500), "pt_transfer_gap")
    assert two.effect < 0 and two.verdict == "underpowered" and two.df < 10
    (tmp_path / "even4").mkdir()
    (four,) = _by_id(evaluate_claims(_gap_rows(tmp_path / "even4", 0.6, 0.2, seeds=4), n_resamples=500),
                     "pt_transfer_gap")
    assert four.verdict == "contradicted" and four.df > two.df


def test_transfer_gap_without_the_moved_lora_is_not_measured_and_says_what_it_needs(tmp_path):
    rows = _gap_rows(tmp_path, 0.2, 0.6, with_lora_moved=False)
    (gap,) = _by_id(evaluate_claims(rows, n_resamples=100), "pt_transfer_gap")
    assert gap.verdict == "not measured" and gap.detail.startswith("needs prompt_tuning and lora")
    assert "no cells for LoRA from another task" in gap.detail


def test_synergy_pairs_pt_on_the_instruction_tuned_model_with_plain_pt(tmp_path):
    it = _keyed(_cell(tmp_path, "instruction_tuning", 0, [0.0] * 10, task="mix"), "it0")
    plain = [_keyed(_cell(tmp_path, "pt", s, _scores(0.3, seed=s), task="t"), f"pt{s}") for s in range(2)]
    on_it = tmp_path / "on_it"
    on_it.mkdir()
    both = [_keyed(_cell(on_it, "pt", s, _scores(0.7, seed=10 + s), task="t"), f"itpt{s}", init_from="it0")
            for s in range(2)]
    findings = evaluate_claims([it, *plain, *both], n_resamples=500)
    (syn,) = _by_id(findings, "it_pt_synergy")
    assert syn.verdict == "supported" and syn.n == {"a_seeds": 2, "b_seeds": 2, "examples": 200}
    assert syn.effect == pytest.approx(np.mean([r["quality"] for r in both]) - np.mean([r["quality"] for r in plain]))
    # a prompt tuned further from another prompt (SPoT) is not prompt tuning on an instruction-tuned model
    spot = [{**r, "key": f"spot{i}", "config": {**r["config"], "method": {**r["config"]["method"],
                                                                           "init_from": f"/runs/out/cells/{_hex('pt0')}"}}}
            for i, r in enumerate(both)]
    (none,) = _by_id(evaluate_claims([it, *plain, *spot], n_resamples=100), "it_pt_synergy")
    assert none.verdict == "not measured" and "no cells for IT→PT" in none.detail


def test_contrast_bootstrap_is_the_paired_t_test_on_the_per_row_contrast():
    """One seed per system and a mean metric: the difference of differences is the mean of each row's
    a1 − b1 − a2 + b2, and its standard error and p-value are the one-sample t test's on those."""
    from scipy import stats as sps

    rng = np.random.default_rng(3)
    a1, b1, a2, b2 = (rng.normal(mu, 5, 400) for mu in (52, 50, 51, 50.5))
    result = contrast_bootstrap((a1, b1), (a2, b2), n_resamples=4000, seed=1)
    per_row = a1 - b1 - a2 + b2
    assert result.delta == pytest.approx(per_row.mean(), abs=1e-9)
    assert result.a == pytest.approx(a1.mean() - b1.mean()) and result.b == pytest.approx(a2.mean() - b2.mean())
    assert result.se == pytest.approx(per_row.std(ddof=1) / np.sqrt(400), rel=0.06)
    assert result.example_var == pytest.approx(per_row.var(ddof=1), rel=0.1)
    from tunelab.stats import t_test

    assert t_test(result.delta, result.se, 399) == pytest.approx(sps.ttest_1samp(per_row, 0).pvalue, abs=0.02)


def test_every_claim_says_what_it_needs():
    assert all(c.needs for c in CLAIMS)
    assert {"it_pt_synergy", "it_scale", "pt_transfer_gap"} <= {c.id for c in CLAIMS}
    assert summarise(evaluate_claims([], n_resamples=10)) == {c.id: "not measured" for c in CLAIMS}
