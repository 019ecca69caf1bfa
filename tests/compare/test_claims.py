"""Claims: paired bootstrap verdicts follow the data; absent methods are 'not measured'."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from tunelab.compare.claims import evaluate_claims, summarise


def _cell(tmp: Path, method: str, seed: int, scores: list[float], task: str = "t", unseen: bool = False,
          metric: str = "exact_match", **extra) -> dict:
    name = {"pt": "prompt_tuning", "zero": "icl", "icl_random": "icl", "icl_similar": "icl"}.get(method, method)
    options = {"name": name}
    if method == "zero":
        options["k"] = 0
    if method.startswith("icl_"):
        options.update(k=1, selection=method.removeprefix("icl_"))
    path = tmp / f"{method}-{task}-{seed}.jsonl"
    similarity = extra.get("similarity")  # per example, as IPT writes `demo_similarity`
    path.write_text("".join(json.dumps({"id": f"e{i}", "prediction": "x", "references": ["y"], "scores": {metric: s},
                                        **({"demo_similarity": similarity[i]} if similarity else {})}) + "\n"
                            for i, s in enumerate(scores)))
    return {"method": method, "method_name": name, "task": task, "seed": seed, "train_size": None,
            "prompt_length": 20 if name in ("prompt_tuning", "ipt") else None, "unseen": int(unseen),
            "primary_metric": metric, "predictions": str(path), "config": {"method": options},
            "adapter_bytes": extra.get("adapter_bytes", 0), "train_seconds": extra.get("train_seconds", 0.0),
            "quality": sum(scores) / len(scores)}


def _scores(p: float, n: int = 200, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [100.0 * (rng.random() < p) for _ in range(n)]


def _by_id(findings, cid):
    return [f for f in findings if f.claim.id == cid]


def test_clear_win_is_supported_and_clear_loss_contradicted(tmp_path):
    rows = [_cell(tmp_path, "ipt", s, _scores(0.8, seed=s)) for s in range(3)]
    rows += [_cell(tmp_path, "pt", s, _scores(0.3, seed=10 + s)) for s in range(3)]
    rows += [_cell(tmp_path, "icl_similar", 0, _scores(0.2, seed=5))]
    rows += [_cell(tmp_path, "icl_random", 0, _scores(0.6, seed=6))]
    findings = evaluate_claims(rows, n_resamples=500)
    (ipt,) = _by_id(findings, "ipt_beats_pt")
    assert ipt.verdict == "supported" and 40 < ipt.effect < 60 and ipt.ci[0] > 0
    (retrieved,) = _by_id(findings, "retrieved_icl")
    assert retrieved.verdict == "contradicted" and retrieved.ci[1] < 0
    (lora,) = _by_id(findings, "lora_beats_pt")
    assert lora.verdict == "not measured" and "LoRA" in lora.detail
    assert summarise(findings)["it_unseen"] == "not measured"


def test_identical_systems_are_equivalent(tmp_path):
    scores = _scores(0.5, seed=1)
    rows = [_cell(tmp_path, "ipt", s, scores) for s in range(2)] + [_cell(tmp_path, "pt", s, scores) for s in range(2)]
    (ipt,) = _by_id(evaluate_claims(rows, n_resamples=300), "ipt_beats_pt")
    assert ipt.verdict == "equivalent" and ipt.effect == 0 and ipt.ci[0] <= 0 <= ipt.ci[1]


def test_few_noisy_rows_are_underpowered_and_many_close_rows_equivalent(tmp_path):
    few = [_cell(tmp_path, "ipt", 0, _scores(0.5, n=20, seed=1)), _cell(tmp_path, "pt", 0, _scores(0.5, n=20, seed=2))]
    (small,) = _by_id(evaluate_claims(few, n_resamples=400), "ipt_beats_pt")
    assert small.verdict == "underpowered" and small.mde > small.margin == 2.0
    # 4000 rows whose scores differ on 0.5% of them: |A − B| is tiny and well measured
    base = _scores(0.5, n=4000, seed=3)
    other = [100.0 - s if i % 200 == 0 else s for i, s in enumerate(base)]
    (tmp_path / "m").mkdir()
    many = [_cell(tmp_path / "m", "ipt", 0, base), _cell(tmp_path / "m", "pt", 0, other)]
    (big,) = _by_id(evaluate_claims(many, n_resamples=400), "ipt_beats_pt")
    assert big.verdict == "equivalent" and big.p_tost_adjusted < 0.05 and big.mde < 2.0


def test_verdicts_use_holm_adjusted_p_across_all_quality_tests(tmp_path):
    """A gain significant alone (p ~ 0.02) is not once Holm multiplies it across many tests."""
    from statsmodels.stats.multitest import multipletests

    rows = []
    for t in range(6):  # six tasks: the weak gain on t0 plus five tasks with no difference
        a = _scores(0.5, n=300, seed=100 + t)
        wins = [i for i, s in enumerate(a) if s == 100.0][:6] if t == 0 else []  # A better on 6 rows: t ~ 2.4
        b = [0.0 if i in wins else s for i, s in enumerate(a)]
        rows += [_cell(tmp_path, "ipt", 0, a, task=f"t{t}"), _cell(tmp_path, "pt", 0, b, task=f"t{t}")]
    findings = evaluate_claims(rows, n_resamples=1000)
    tested = [f for f in findings if f.tested]
    raw = [f.p_value for f in tested]
    expected = multipletests(raw, method="holm")[1]
    assert [round(f.p_adjusted, 10) for f in tested] == [round(p, 10) for p in expected]
    (t0,) = [f for f in tested if f.claim.id == "ipt_beats_pt" and f.group.startswith("t0 ")]
    assert t0.p_value < 0.05 <= t0.p_adjusted and t0.verdict != "supported"
    pooled = [f for f in findings if f.group == "all tasks"]
    assert len(pooled) == 1 and pooled[0].claim.id == "ipt_beats_pt" and pooled[0].n["groups"] == 6
    assert summarise(findings)["ipt_beats_pt"].endswith("(across tasks)")


def test_across_tasks_pools_a_consistent_gain_no_single_task_shows(tmp_path):
    rows = []
    for t in range(4):
        a = _scores(0.5, n=120, seed=200 + t)
        b = [0.0 if (s == 100.0 and i % 12 == 0) else s for i, s in enumerate(a)]  # ~4 points lower each
        rows += [_cell(tmp_path, "ipt", 0, a, task=f"t{t}"), _cell(tmp_path, "pt", 0, b, task=f"t{t}")]
    findings = [f for f in evaluate_claims(rows, n_resamples=1000) if f.claim.id == "ipt_beats_pt"]
    pooled = next(f for f in findings if f.group == "all tasks")
    per_task = [f for f in findings if f.group != "all tasks"]
    assert pooled.effect == pytest.approx(sum(f.effect for f in per_task) / 4)
    assert pooled.se < min(f.se for f in per_task)  # pooling over strata narrows the interval
    assert pooled.p_value < min(f.p_value for f in per_task)


def test_the_pooled_margin_is_the_mean_of_the_groups_metric_margins(tmp_path):
    """BLEU (±1) on one task and SQL exact match (±2) on another: their mean effect is judged at ±1.5, and a
    grid's own margins count; the pooled test does not fall back to the default ±1."""
    rows = []
    for t, metric in (("text", "bleu"), ("sql", "sql_exact_match")):
        a = _scores(0.5, n=100, seed=300 + len(t))
        rows += [_cell(tmp_path, "ipt", 0, a, task=t, metric=metric), _cell(tmp_path, "pt", 0, a, task=t, metric=metric)]
    pooled = next(f for f in evaluate_claims(rows, n_resamples=200) if f.group == "all tasks")
    assert pooled.margin == pytest.approx(1.5) and "margin ±1.5" in pooled.detail
    pooled = next(f for f in evaluate_claims(rows, 200, margins={"bleu": 3.0}) if f.group == "all tasks")
    assert pooled.margin == pytest.approx(2.5)


def test_seed_variance_claim_with_few_seeds_is_underpowered_whatever_the_spread(tmp_path):
    """Four seeds a side cannot carry a test of spread: the verdict says so and states the power."""
    rows = [_cell(tmp_path, "pt", s, _scores(p, seed=s)) for s, p in enumerate([0.1, 0.5, 0.9, 0.2])]
    rows += [_cell(tmp_path, "ipt", s, _scores(0.5, seed=20 + s)) for s in range(4)]
    (var,) = _by_id(evaluate_claims(rows, n_resamples=500), "pt_unstable")
    assert var.effect > 3 and var.verdict == "underpowered"  # sd ratio PT / IPT
    assert "Brown–Forsythe" in var.detail and "power to find a 2x sd ratio" in var.detail and ">= 10 seeds" in var.detail


def _spread_rows(tmp_path, pt_ps, ipt_ps):
    rows = [_cell(tmp_path, "pt", s, _scores(p, seed=s)) for s, p in enumerate(pt_ps)]
    return rows + [_cell(tmp_path, "ipt", s, _scores(p, seed=50 + s)) for s, p in enumerate(ipt_ps)]


def test_seed_variance_claim_is_brown_forsythe_on_per_seed_scores(tmp_path):
    from scipy import stats as sps

    rng = random.Random(0)
    pt_ps = [rng.uniform(0.1, 0.9) for _ in range(12)]  # PT: the seed decides the score
    rows = _spread_rows(tmp_path, pt_ps, [0.5] * 12)  # IPT: only row noise between seeds
    (var,) = _by_id(evaluate_claims(rows, n_resamples=500), "pt_unstable")
    pt = [r["quality"] for r in rows if r["method"] == "pt"]
    ipt = [r["quality"] for r in rows if r["method"] == "ipt"]
    assert var.spread_p == pytest.approx(sps.levene(pt, ipt, center="median").pvalue)
    assert var.effect == pytest.approx(np.std(pt, ddof=1) / np.std(ipt, ddof=1))
    assert var.verdict == "supported" and var.ci[0] > 1
    (tmp_path / "r").mkdir()
    reverse = _spread_rows(tmp_path / "r", [0.5] * 12, pt_ps)  # now IPT is the unstable one
    (rev,) = _by_id(evaluate_claims(reverse, n_resamples=500), "pt_unstable")
    assert rev.verdict == "contradicted"


def test_seed_variance_claim_with_equal_spread_is_inconclusive(tmp_path):
    rows = _spread_rows(tmp_path, [0.5] * 12, [0.5] * 12)
    (var,) = _by_id(evaluate_claims(rows, n_resamples=500), "pt_unstable")
    assert var.verdict == "inconclusive" and var.spread_p > 0.05


def test_unseen_claim_uses_only_unseen_tasks(tmp_path):
    rows = [_cell(tmp_path, "instruction_tuning", 0, _scores(0.7), task="seen"),
            _cell(tmp_path, "zero", 0, _scores(0.1, seed=3), task="seen")]
    assert _by_id(evaluate_claims(rows, 200), "it_unseen")[0].verdict == "not measured"
    rows += [_cell(tmp_path, "instruction_tuning", 0, _scores(0.7), task="new", unseen=True),
             _cell(tmp_path, "zero", 0, _scores(0.1, seed=3), task="new", unseen=True)]
    (finding,) = _by_id(evaluate_claims(rows, 200), "it_unseen")
    assert finding.group == "new" and finding.verdict == "supported"


@pytest.mark.parametrize(("pt_bytes", "verdict"), [(100, "supported"), (10_000, "contradicted")])
def test_bytes_claim_compares_measured_sizes(tmp_path, pt_bytes, verdict):
    rows = [_cell(tmp_path, "pt", 0, _scores(0.5), adapter_bytes=pt_bytes),
            _cell(tmp_path, "lora", 0, _scores(0.5), adapter_bytes=5_000)]
    (finding,) = _by_id(evaluate_claims(rows, 100), "pt_fewer_bytes")
    assert finding.verdict == verdict and finding.effect == pytest.approx(pt_bytes / 5_000)
    assert finding.ci is None


def test_corpus_bleu_is_bootstrapped_from_predictions(tmp_path):
    """BLEU does not decompose: statistics come from the stored predictions and references."""
    good = [{"id": f"e{i}", "prediction": f"the cat number {i} sat on the mat", "references":
             [f"the cat number {i} sat on the mat"], "scores": {}} for i in range(30)]
    bad = [{**r, "prediction": "dog"} for r in good]
    rows = []
    for name, preds in (("ipt", good), ("pt", bad)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in preds))
        rows.append({**_cell(tmp_path, name, 0, [0.0] * 30, metric="bleu"), "predictions": str(path)})
    (finding,) = _by_id(evaluate_claims(rows, 200), "ipt_beats_pt")
    assert finding.verdict == "supported" and finding.effect > 90


def test_similarity_claim_measures_where_ipt_gains(tmp_path):
    """IPT beats PT exactly on the examples whose demonstration is similar: supported, gap near 100 points."""
    n = 60
    sims = [i / n for i in range(n)]
    helps_when_similar = [100.0 if i >= n // 2 else 0.0 for i in range(n)]
    rows = [_cell(tmp_path, "ipt", s, helps_when_similar, similarity=sims) for s in range(3)]
    rows += [_cell(tmp_path, "pt", s, [0.0] * n) for s in range(3)]
    (found,) = _by_id(evaluate_claims(rows, n_resamples=300), "ipt_needs_similar")
    assert found.verdict == "supported" and found.effect == 100 and found.ci[0] > 50
    assert "+100.00 on the similar half, +0.00 on the other" in found.detail and found.n["examples"] == n

    everywhere = tmp_path / "everywhere"
    everywhere.mkdir()
    rows = [_cell(everywhere, "ipt", s, [100.0] * n, similarity=sims) for s in range(3)]
    rows += [_cell(everywhere, "pt", s, [0.0] * n) for s in range(3)]
    (flat,) = _by_id(evaluate_claims(rows, n_resamples=300), "ipt_needs_similar")
    assert flat.effect == 0 and flat.verdict == "inconclusive"  # IPT helps everywhere, not only when similar


def test_similarity_claim_without_similarity_is_not_measured(tmp_path):
    rows = [_cell(tmp_path, m, s, _scores(0.5, seed=s)) for m in ("ipt", "pt") for s in range(2)]
    (found,) = _by_id(evaluate_claims(rows, n_resamples=100), "ipt_needs_similar")
    assert found.verdict == "not measured" and "demo_similarity" in found.detail


def test_reasoning_claim_only_on_tagged_tasks(tmp_path):
    rows = [_cell(tmp_path, "lora", s, _scores(0.8, seed=s), task="sql") for s in range(2)]
    rows += [_cell(tmp_path, "pt", s, _scores(0.3, seed=10 + s), task="sql") for s in range(2)]
    (untagged,) = _by_id(evaluate_claims(rows, n_resamples=200), "pt_reasoning")
    assert untagged.verdict == "not measured" and "tagged reasoning" in untagged.detail
    tagged = [{**r, "tags": ["reasoning"]} for r in rows]
    (found,) = _by_id(evaluate_claims(tagged, n_resamples=200), "pt_reasoning")
    assert found.verdict == "supported" and found.group == "sql"


def _with_gap(row: dict, eval_loss: float, train_loss: float, n: int = 30, seed: int = 0) -> dict:
    rng = random.Random(seed)
    per_row = [[max(0.0, eval_loss + rng.gauss(0, 0.3)) * 5, 5] for _ in range(n)]
    per_train = [[max(0.0, train_loss + rng.gauss(0, 0.3)) * 5, 5] for _ in range(n)]
    return {**row, "result": {"generalization": {"eval_nll": per_row, "train_nll": per_train}}}


def test_overfitting_claim_compares_loss_gaps(tmp_path):
    ft = [_with_gap(_cell(tmp_path, "full_finetune", s, _scores(0.5, seed=s)), 2.0, 0.5, seed=s) for s in range(2)]
    lora = [_with_gap(_cell(tmp_path, "lora", s, _scores(0.5, seed=s)), 1.5, 1.2, seed=9 + s) for s in range(2)]
    (found,) = _by_id(evaluate_claims(ft + lora, n_resamples=300), "ft_overfits")
    assert found.verdict == "supported" and 1.0 < found.effect < 1.4 and found.ci[0] > 0.8
    assert "eval − train loss: full FT 1.4" in found.detail and "30 eval + 30 train rows" in found.detail
    (swapped,) = _by_id(evaluate_claims([_with_gap(r, 1.5, 1.2) for r in ft] + [_with_gap(r, 2.0, 0.5) for r in lora],
                                        n_resamples=300), "ft_overfits")
    assert swapped.verdict == "contradicted"
    bare = [{k: v for k, v in r.items() if k != "result"} for r in ft + lora]
    (absent,) = _by_id(evaluate_claims(bare, n_resamples=100), "ft_overfits")
    assert absent.verdict == "not measured" and "held-out loss" in absent.detail


def test_instruction_tuning_cost_compares_runs_across_tasks(tmp_path):
    it = [{**_cell(tmp_path, "instruction_tuning", s, [1.0], task="mix", train_seconds=200.0),
           "config": {"method": {"name": "instruction_tuning"}, "train": {"steps": 80, "batch_size": 8}}}
          for s in range(2)]
    pt = [{**_cell(tmp_path, "pt", s, [1.0], task="one", train_seconds=100.0),
           "config": {"method": {"name": "prompt_tuning"}, "train": {"steps": 80, "batch_size": 8}}} for s in range(2)]
    (found,) = _by_id(evaluate_claims(it + pt, n_resamples=50), "it_costly")
    assert found.verdict == "supported" and found.effect == 2.0 and found.group == "mix vs one"
    longer = [{**r, "config": {**r["config"], "train": {"steps": 800, "batch_size": 8}}} for r in pt]
    (unpaired,) = _by_id(evaluate_claims(it + longer, n_resamples=50), "it_costly")
    assert unpaired.verdict == "not measured"  # a different training budget is not a comparison


def test_transfer_claim_pairs_the_transferred_prompt_with_retrieved_icl(tmp_path):
    transfer = _cell(tmp_path, "ipt", 0, _scores(0.7, seed=30), task="target")
    transfer["config"] = {"method": {"name": "ipt", "init_from": "/runs/cells/abc"}, "train": {"steps": 0}}
    trained_ipt = _cell(tmp_path, "ipt", 1, _scores(0.1, seed=31), task="target")
    pt = _cell(tmp_path, "pt", 1, _scores(0.1, seed=32), task="target")
    icl = _cell(tmp_path, "icl_similar", 0, _scores(0.3, seed=33), task="target")
    findings = evaluate_claims([transfer, trained_ipt, pt, icl], n_resamples=500)
    (found,) = _by_id(findings, "prompt_transfer")
    assert found.verdict == "supported" and found.effect == pytest.approx(transfer["quality"] - icl["quality"])
    (ipt,) = _by_id(findings, "ipt_beats_pt")  # the transferred cell is not an IPT run of its own
    assert ipt.n["a_seeds"] == 1 and ipt.effect == pytest.approx(trained_ipt["quality"] - pt["quality"])


def test_a_claims_tost_mde_and_both_holm_families_agree_with_statsmodels(tmp_path):
    """One seed each, a per-example mean metric: each quality test is the paired t test on row differences, so
    its effect, p, TOST p and MDE match statsmodels / scipy computed on the raw rows (up to the bootstrap's
    standard error, within a few %), and both Holm families are statsmodels' Holm of the claim's own p-values."""
    import numpy as np
    from scipy import stats as sps
    from statsmodels.stats.multitest import multipletests
    from statsmodels.stats.weightstats import ttost_paired

    rng = np.random.default_rng(7)
    rows, pairs = [], {}
    for t, shift in enumerate((0.0, 1.5, 4.0)):  # no difference, near and beyond the 2-point exact-match margin
        a = rng.normal(50, 6, 400)
        noise = rng.normal(0, 4, 400)
        b = a - shift + (noise - noise.mean())  # A − B averages exactly `shift`
        rows += [_cell(tmp_path, "ipt", 0, list(a), task=f"t{t}"), _cell(tmp_path, "pt", 0, list(b), task=f"t{t}")]
        pairs[f"t{t}"] = (a, b)
    findings = evaluate_claims(rows, n_resamples=4000)
    tested = [f for f in findings if f.tested]
    per_task = [f for f in tested if f.claim.id == "ipt_beats_pt" and f.group != "all tasks"]
    assert sorted(f.group.split(" ")[0] for f in per_task) == ["t0", "t1", "t2"]
    for f in per_task:
        a, b = pairs[f.group.split(" ")[0]]
        d = a - b
        se = d.std(ddof=1) / np.sqrt(len(d))
        assert f.margin == 2.0 and f.df == len(d) - 1 and f.effect == pytest.approx(d.mean(), abs=1e-9)
        assert f.effect == pytest.approx({"t0": 0.0, "t1": 1.5, "t2": 4.0}[f.group.split(" ")[0]], abs=1e-9)
        assert f.se == pytest.approx(se, rel=0.05)
        assert f.p_value == pytest.approx(sps.ttest_rel(a, b).pvalue, abs=0.01)
        assert f.p_tost == pytest.approx(ttost_paired(a, b, -2.0, 2.0)[0], abs=0.01)
        assert f.mde == pytest.approx((sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) * se, rel=0.06)  # ~2.80 se, n=400
    verdicts = {f.group.split(" ")[0]: f.verdict for f in per_task}
    assert verdicts == {"t0": "equivalent", "t1": "supported", "t2": "supported"}
    np.testing.assert_allclose([f.p_adjusted for f in tested], multipletests([f.p_value for f in tested],
                                                                              method="holm")[1], rtol=1e-12)
    np.testing.assert_allclose([f.p_tost_adjusted for f in tested], multipletests([f.p_tost for f in tested],
                                                                                   method="holm")[1], rtol=1e-12)


def test_a_metrics_margin_comes_from_its_declared_facts_unless_the_grid_sets_one(monkeypatch):
    from tunelab import metrics as M
    from tunelab.compare.claims import FALLBACK_MARGIN, margin_for

    spec = M.METRICS["bleu"]
    monkeypatch.setitem(M.METRICS, "new_metric", M.Metric("new_metric", spec.stats, spec.reduce,
                                                           M.MetricFacts(margin=3.5)))
    assert margin_for("new_metric") == 3.5
    assert margin_for("new_metric", {"new_metric": 0.5}) == 0.5
    assert margin_for("exact_match") == M.METRICS["exact_match"].facts.margin == 2.0
    assert margin_for("not_a_metric") == FALLBACK_MARGIN


def test_a_claim_decided_in_some_groups_names_every_weak_verdict_of_the_others_in_one_order():
    """The summary of a claim decided in one group and both inconclusive and underpowered in others reads the same
    in every process (it picked one of a set of strings, which string hashing orders per process)."""
    from tunelab.compare.claims import CLAIMS, Finding

    claim = CLAIMS[0]
    findings = [Finding(claim, "a", verdict="contradicted"), Finding(claim, "b", verdict="underpowered"),
                Finding(claim, "c", verdict="inconclusive")]
    for order in (findings, findings[::-1]):
        assert summarise(order)[claim.id] == "contradicted (some groups inconclusive or underpowered)"
