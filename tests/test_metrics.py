"""Metrics equal their reference implementations, called directly, on real data-to-text test sets."""

import json
import random
import re

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer
from tests.conftest import shared_path

from tunelab import metrics as M
from tunelab.errors import ConfigError
from tunelab.sql import normalize_sql


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in shared_path(name, "test.jsonl").read_text().splitlines() if line.strip()]


def _predictions(rows: list[dict], seed: int) -> tuple[list[str], list[list[str]]]:
    """Half the rows predict one of their own references, half another row's (a shuffled reference)."""
    rng = random.Random(seed)
    refs = [r["references"] for r in rows]
    preds = [rng.choice(rs) if rng.random() < 0.5 else rng.choice(refs[rng.randrange(len(refs))]) for rs in refs]
    return preds, refs


def _sacrebleu_streams(refs: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu's documented layout for a variable number of references: None where a row has fewer."""
    width = max(len(rs) for rs in refs)
    return [[rs[i] if i < len(rs) else None for rs in refs] for i in range(width)]


@pytest.mark.parametrize("dataset", ["e2e", "dart", "webnlg"])
def test_bleu_chrf_rouge_equal_reference_implementations(dataset):
    preds, refs = _predictions(_rows(dataset), seed=len(dataset))
    ours = M.compute(["bleu", "chrf", "rouge_l"], preds, refs)
    streams = _sacrebleu_streams(refs)
    assert ours["bleu"] == sacrebleu.corpus_bleu(preds, streams).score
    assert ours["chrf"] == sacrebleu.corpus_chrf(preds, streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    best = [max(scorer.score(r, p)["rougeL"].fmeasure for r in rs) for p, rs in zip(preds, refs, strict=True)]
    assert ours["rouge_l"] == pytest.approx(100 * sum(best) / len(best), abs=1e-12)
    assert 5 < ours["bleu"] < 95  # a real mix of right and wrong rows, not a degenerate corpus


@pytest.mark.parametrize("name", ["bleu", "chrf"])
def test_corpus_scores_rebuilt_from_sufficient_statistics_are_exact(name):
    preds, refs = _predictions(_rows("e2e"), seed=3)
    stats = M.sufficient_stats(name, preds, refs)
    assert stats.shape[0] == len(preds)
    rebuilt = M.METRICS[name].reduce(stats.sum(0, keepdims=True), len(preds))[0]
    assert rebuilt == M.compute([name], preds, refs)[name]


def test_bleu_uses_every_reference():
    refs = [["the cat sat on the mat", "a cat was sitting on the mat"]]
    pred = ["a cat was sitting on the mat"]
    assert M.compute(["bleu"], pred, refs)["bleu"] == pytest.approx(100.0)
    assert M.compute(["bleu"], pred, [refs[0][:1]])["bleu"] < 50


def test_exact_match_and_f1_use_squad_normalisation():
    assert M.exact_match_scores(["The  Eiffel tower!"], [["eiffel Tower"]]) == [100.0]
    assert M.exact_match_scores(["Paris"], [["London", "paris."]]) == [100.0]
    assert M.exact_match_scores(["Paris, France"], [["Paris"]]) == [0.0]
    assert M.token_f1_scores(["paris france"], [["paris"]]) == [pytest.approx(100 * 2 / 3)]
    assert M.token_f1_scores(["", ""], [["x"], [""]]) == [0.0, 100.0]


def test_confidence_intervals_bracket_the_score_and_shrink_with_more_data():
    preds, refs = _predictions(_rows("dart"), seed=1)
    names = ["bleu", "chrf", "rouge_l", "exact_match"]
    scores = M.compute(names, preds, refs)
    wide = M.confidence_intervals(names, preds[:60], refs[:60])
    narrow = M.confidence_intervals(names, preds, refs)
    for n in names:
        lo, hi = narrow[n]
        assert lo < scores[n] < hi, n
        assert hi - lo < wide[n][1] - wide[n][0], n
    assert M.confidence_intervals(["bleu"], [], []) == {"bleu": None}


def test_rank_accuracy_reads_the_ranked_options_and_needs_them():
    refs = [["yes"], ["no"], ["no"]]
    assert M.score(["rank_accuracy"], ["", "", ""], refs, ranked=["yes", "yes", "no"])[0] == {
        "rank_accuracy": pytest.approx(200 / 3)}
    with pytest.raises(ConfigError, match="rank_accuracy"):
        M.compute(["rank_accuracy"], ["yes"], [["yes"]])


def test_unknown_metric_is_named():
    with pytest.raises(ConfigError, match="'blue'.*bleu"):
        M.compute(["blue"], ["a"], [["a"]])


SQL_VARIANTS = [
    ("SELECT T1.Name FROM singer AS T1 JOIN song AS T2 ON T1.Singer_ID  =  T2.Singer_ID WHERE T2.Sales  >  300000",
     "select singer.name from singer join song on singer.singer_id = song.singer_id where song.sales > 300000;"),
    ("SELECT count(*) FROM head WHERE age  >  56", "select COUNT ( * ) from HEAD where AGE>56"),
    ('SELECT name FROM people WHERE city = "Paris"', "SELECT people.name FROM people WHERE city = 'Paris'"),
    ("SELECT a FROM t WHERE x <> 1", "select a from t as t9 where t9.x != 1"),
    ("SELECT T1.a FROM emp AS T1 JOIN emp AS T2 ON T1.m = T2.id", "select x.a from emp x join emp y on x.m = y.id"),
]
SQL_DIFFERENT = [
    ("SELECT name FROM people WHERE city = 'Paris'", "SELECT name FROM people WHERE city = 'paris'"),
    ("SELECT a FROM t WHERE x > 1", "SELECT a FROM t WHERE x >= 1"),
    ("SELECT T1.a FROM emp AS T1 JOIN emp AS T2 ON T1.m = T2.id", "select y.a from emp x join emp y on x.m = y.id"),
    ("SELECT a, b FROM t", "SELECT b, a FROM t"),
]


@pytest.mark.parametrize(("a", "b"), SQL_VARIANTS)
def test_sql_normalisation_equates_equivalent_spellings(a, b):
    assert normalize_sql(a) == normalize_sql(b)
    assert M.sql_exact_match_scores([b], [[a]]) == [100.0]


@pytest.mark.parametrize(("a", "b"), SQL_DIFFERENT)
def test_sql_normalisation_keeps_meaningful_differences(a, b):
    assert normalize_sql(a) != normalize_sql(b)


def _shout(sql: str) -> str:
    """Upper-case and single-space everything outside string literals."""
    pieces = re.split(r"""('(?:[^']|'')*'|"(?:[^"]|"")*")""", sql)
    return "".join(p if i % 2 else " ".join(p.upper().split()) + " " for i, p in enumerate(pieces))


def test_sql_normalisation_on_every_spider_query_is_idempotent_and_case_blind():
    rows = [json.loads(line) for split in ("train", "dev", "test")
            for line in shared_path("spider", f"{split}.jsonl").read_text().splitlines() if line.strip()]
    normalized = [normalize_sql(r["output"]) for r in rows]
    assert all(normalize_sql(n) == n for n in normalized)
    # upper-casing everything outside string literals and squeezing spaces must not change the match
    shouted = [_shout(r["output"]) for r in rows]
    scores = M.sql_exact_match_scores(shouted, [[r["output"]] for r in rows])
    assert np.mean(scores) > 99, [s for s, v in zip(shouted, scores, strict=True) if not v][:3]
    # and distinct queries stay distinct
    assert len(set(normalized)) > 0.9 * len({r["output"] for r in rows})


def test_paired_bootstrap_on_corpus_bleu_statistics():
    from tunelab.stats import paired_bootstrap

    rows = _rows("webnlg")
    refs = [r["references"] for r in rows]
    good = [rs[0] if i % 3 else refs[(i + 1) % len(refs)][0] for i, rs in enumerate(refs)]  # 2/3 right
    bad = [rs[0] if i % 3 == 0 else refs[(i + 1) % len(refs)][0] for i, rs in enumerate(refs)]  # 1/3 right
    bleu = M.METRICS["bleu"]
    result = paired_bootstrap(bleu.stats(good, refs), bleu.stats(bad, refs), bleu.reduce, n_resamples=300)
    assert result.a == pytest.approx(M.compute(["bleu"], good, refs)["bleu"])
    assert result.b == pytest.approx(M.compute(["bleu"], bad, refs)["bleu"])
    assert result.ci[0] > 0 and result.p_value < 0.01


def test_sql_answers_default_to_sql_exact_match_first():
    """Text-to-SQL is scored as Sun et al. and Spider do (exact match after normalisation); BLEU second."""
    from tunelab.data import default_metrics
    from tunelab.data.example import Example

    sql = [Example(id=str(i), task="spider", instruction="q", input="x", output=q)
           for i, q in enumerate(["SELECT name FROM singer", "select count(*) from song WHERE sales > 3"])]
    assert default_metrics(sql) == ("sql_exact_match", "bleu")
    prose = [Example(id="0", task="d2t", instruction="q", input="x", output="Select the best of five restaurants in town")]
    assert default_metrics(prose)[0] == "bleu"


def test_every_metric_declares_its_facts_and_ranked_is_read_from_them():
    assert all(m.facts.margin > 0 for m in M.METRICS.values())
    assert M.RANKED == {n for n, m in M.METRICS.items() if m.facts.ranked} == {"rank_accuracy"}
    assert "1 point: " in M.margins_text() and "bleu" in M.margins_text()


def test_a_new_metric_declared_ranked_scores_the_ranked_options(monkeypatch):
    """The facts, not the metric's name, decide: a metric added with ``ranked=True`` needs ranked options."""
    spec = M.METRICS["exact_match"]
    ranked = M.Metric("pick", spec.stats, spec.reduce, M.MetricFacts(margin=3.0, ranked=True), spec.per_example)
    monkeypatch.setitem(M.METRICS, "pick", ranked)
    monkeypatch.setitem(M.PER_EXAMPLE, "pick", spec.per_example)
    assert M.score(["pick"], ["wrong"], [["yes"]], ranked=["yes"])[0] == {"pick": 100.0}
    with pytest.raises(ConfigError, match="top-ranked option"):
        M.compute(["pick"], ["yes"], [["yes"]])
