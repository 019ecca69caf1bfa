"""Did the answers end? (tunelab.termination: recorded by evaluate, shown by the report, named by the claims)."""

from __future__ import annotations

import json

from tunelab import termination
from tunelab.config import EvalConfig
from tunelab.data import load_task
from tunelab.evaluate import evaluate
from tunelab.methods import METHODS


def test_ran_to_limit_counts_only_answers_the_limit_cut():
    assert termination.ran_to_limit(12, "a loop a loop", 12, [])
    assert not termination.ran_to_limit(11, "ended by its end token", 12, [])
    assert not termination.ran_to_limit(12, "one line\nthen more", 12, ["\n"])  # the stop string ended it
    assert termination.record([True, False, False, True], 30) == {"at_limit": 2, "answers": 4, "max_new_tokens": 30}


def test_of_row_and_runaway_read_the_recorded_share():
    row = {"result": {"eval": {"termination": {"at_limit": 3, "answers": 20, "max_new_tokens": 40}}}}
    assert termination.of_row(row)["share"] == 0.15
    assert termination.runaway(row) is True  # 15% > 10%
    row["result"]["eval"]["termination"]["at_limit"] = 2
    assert termination.runaway(row) is False  # exactly 10% is not over it
    assert termination.of_row({"result": {"eval": {}}}) is None and termination.runaway({"result": None}) is None


def test_evaluate_records_how_many_answers_the_token_limit_cut(tiny):
    """The tiny random model never emits its end token within 3 tokens: every answer is cut, and a stop string
    found in the unstopped output ends those answers instead."""
    model, tok = tiny
    adapter = METHODS["icl"].build(model, tok, METHODS["icl"].Config(k=0), [], 0)
    examples = load_task("date_format").eval[:4]
    cut = evaluate(adapter, tok, "chat", examples, ["rouge_l"], EvalConfig(), max_new_tokens=3)
    assert cut.termination == {"at_limit": 4, "answers": 4, "max_new_tokens": 3}
    long = evaluate(adapter, tok, "chat", examples, ["rouge_l"], EvalConfig(), max_new_tokens=12).predictions
    stop = next(p["prediction"] for p in long if len(p["prediction"]) > 4)[2:4]
    stopped = evaluate(adapter, tok, "chat", examples, ["rouge_l"], EvalConfig(stop=[stop]), max_new_tokens=12)
    ended = sum(1 for p in long if stop in p["prediction"])
    assert ended >= 1 and stopped.termination["at_limit"] == 4 - ended


def _rows(tmp_path, cut: dict[tuple[str, int], int]) -> list[dict]:
    rows = []
    for method, name in (("ipt", "ipt"), ("pt", "prompt_tuning")):
        for seed in range(5):
            path = tmp_path / f"{method}{seed}.jsonl"
            path.write_text("".join(json.dumps({"id": f"e{i}", "scores": {"rouge_l": float(i % 7 + seed)}}) + "\n"
                                    for i in range(40)))
            at_limit = cut.get((method, seed), 0)
            rows.append({"key": f"{method}{seed}", "method": method, "method_name": name, "task": "t", "seed": seed,
                         "train_size": None, "prompt_length": None, "unseen": 0, "primary_metric": "rouge_l",
                         "quality": 30.0 - at_limit, "predictions": str(path), "config": {"method": {"name": name}},
                         "result": {"eval": {"termination": {"at_limit": at_limit, "answers": 40,
                                                             "max_new_tokens": 50}}}})
    return rows


def test_a_claim_names_the_side_whose_answers_ran_on(tmp_path):
    from tunelab.compare.claims import evaluate_claims, summarise

    rows = _rows(tmp_path, {("pt", 1): 20, ("pt", 3): 8, ("ipt", 2): 4})  # 50%, 20% over; 10% is not
    findings = [f for f in evaluate_claims(rows, 200) if f.claim.id == "ipt_beats_pt"]
    assert findings[0].runaway == ["PT (2 of 5 cells)"]
    assert "answers ran to the token limit: PT (2 of 5 cells)" in findings[0].caveat
    assert summarise(findings)["ipt_beats_pt"].endswith("; PT answers ran to the token limit")


def test_the_report_tabulates_the_share_and_its_rank_correlation_with_the_score(tmp_path):
    from tunelab.compare.report import _termination

    rows = _rows(tmp_path, {("pt", s): 4 * s for s in range(5)})  # more cut, lower score: rank correlation -1
    table = _termination(rows)
    pt = next(r for r in table.rows if r[1] == "pt")
    assert pt[2:6] == ["all", "-", "5", "20%"] and pt[6].startswith("0: 0%, 1: 10%, 2: 20%")
    assert pt[7] == "3 of 5" and pt[8] == "50" and pt[9].startswith("-1.00")
    ipt = next(r for r in table.rows if r[1] == "ipt")
    assert ipt[5] == "0%" and ipt[9] == "-"  # nothing cut: no correlation to compute
    assert "No cell recorded" in _termination([{**r, "result": {}} for r in rows])


def test_estimate_counts_answers_within_slack_of_the_limit():
    from tunelab.compare.backfill import estimate

    predictions = [{"prediction": "w " * n, "references": ["a b c"]} for n in (10, 9, 8, 3)]
    words = lambda text: len(text.split())  # noqa: E731  (a tokenizer that counts words)
    assert estimate(predictions, words, 10, None) == {"at_limit": 3, "answers": 4, "max_new_tokens": 10,
                                                      "estimated": True}  # 10, 9 and 8: within 2 of the limit
    assert estimate(predictions, words, None, lambda refs: 4)["at_limit"] == 4  # the derived limit when none set

