"""Metrics that match their reference implementations (sacrebleu, rouge-score, SQuAD normalisation).

Every metric takes predictions and, per prediction, a list of references, and returns a score in
[0, 100]. Each metric is also expressed as per-example *sufficient statistics* plus a reduction
from their sum to the score, so a bootstrap resample is one weighted sum and one reduction
(``tunelab.stats``): a mean metric's statistic is the example's score; BLEU's and chrF's are
sacrebleu's own segment statistics (n-gram matches and lengths), so a corpus score recomputed from
them equals ``sacrebleu.corpus_bleu`` exactly.

>>> compute(["exact_match", "token_f1"], ["The cat."], [["a cat", "dog"]])
{'exact_match': 100.0, 'token_f1': 100.0}
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from tunelab.errors import ConfigError
from tunelab.sql import normalize_sql
from tunelab.stats import bootstrap_ci, mean_reduce

Refs = Sequence[Sequence[str]]
_PUNCT = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation (also Super-NI's): lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_scores(preds: Sequence[str], refs: Refs) -> list[float]:
    """100 when the normalised prediction equals any normalised reference, else 0."""
    return [100.0 * any(normalize_answer(p) == normalize_answer(r) for r in rs) for p, rs in zip(preds, refs, strict=True)]


def _f1(pred: str, ref: str) -> float:
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def token_f1_scores(preds: Sequence[str], refs: Refs) -> list[float]:
    """SQuAD token F1, best over references."""
    return [100.0 * max(_f1(p, r) for r in rs) for p, rs in zip(preds, refs, strict=True)]


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    # Super-NI's evaluation script uses exactly this scorer (default tokenizer, Porter stemming).
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_scores(preds: Sequence[str], refs: Refs) -> list[float]:
    """ROUGE-L F-measure per example, best over references (rouge-score ``score_multi``)."""
    scorer = _rouge_scorer()
    return [100.0 * scorer.score_multi(list(rs), p)["rougeL"].fmeasure for p, rs in zip(preds, refs, strict=True)]


def sql_exact_match_scores(preds: Sequence[str], refs: Refs) -> list[float]:
    """100 when the prediction equals a reference after ``tunelab.sql.normalize_sql`` (string match only)."""
    return [100.0 * any(normalize_sql(p) == normalize_sql(r) for r in rs) for p, rs in zip(preds, refs, strict=True)]


def _transpose(refs: Refs) -> Any:  # list[list[str | None]]; sacrebleu types streams as str only
    """sacrebleu wants one stream per reference position; ``None`` marks a missing reference."""
    width = max((len(rs) for rs in refs), default=1)
    return [[rs[i] if i < len(rs) else None for rs in refs] for i in range(width)]


def _sacrebleu_metric(name: str):
    from sacrebleu.metrics import BLEU, CHRF

    # defaults = sacrebleu's command-line defaults (BLEU: 13a tokenisation, exp smoothing; chrF: n=6, beta=2)
    return BLEU() if name == "bleu" else CHRF()


def _sacrebleu_stats(name: str) -> Callable[[Sequence[str], Refs], np.ndarray]:
    def stats(preds: Sequence[str], refs: Refs) -> np.ndarray:
        if not preds:
            return np.zeros((0, 1))
        # float64 holds these integer counts exactly, so sums over resamples are exact too
        return np.asarray(_sacrebleu_metric(name)._extract_corpus_statistics(list(preds), _transpose(refs)),
                          dtype=np.float64)

    return stats


def _sacrebleu_reduce(name: str) -> Callable[[np.ndarray, int], np.ndarray]:
    def reduce(sums: np.ndarray, n: int) -> np.ndarray:
        metric = _sacrebleu_metric(name)
        # sacrebleu's own reduction (used by its significance tests), one call per summed row
        return np.array([metric._compute_score_from_stats(row).score if n else 0.0 for row in sums])

    return reduce


def bleu(preds: Sequence[str], refs: Refs) -> float:
    """Corpus BLEU with all references (sacrebleu defaults: 13a tokenisation, exp smoothing)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(preds), _transpose(refs)).score) if preds else 0.0


def chrf(preds: Sequence[str], refs: Refs) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2), best reference per segment."""
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(preds), _transpose(refs)).score) if preds else 0.0


@dataclass(frozen=True)
class MetricFacts:
    """What the rest of tunelab needs to know about a metric, declared once on it (as ``Capabilities`` are on a
    method): the claims, sizing, the report and evaluation ask these instead of matching metric names."""

    margin: float  # equivalence margin, in points of the metric: a smaller difference does not matter to a reader
    # (claims' TOST and sizing; a grid's `margins` key overrides it)
    ranked: bool = False  # scored on the option with the highest log-likelihood (evaluate.rank_options),
    # not on generated text: needs examples with `options`


@dataclass(frozen=True)
class Metric:
    """A metric as per-example sufficient statistics (n, d) and a reduction of their sums (R, d) -> (R,)."""

    name: str
    stats: Callable[[Sequence[str], Refs], np.ndarray]
    reduce: Callable[[np.ndarray, int], np.ndarray]
    facts: MetricFacts
    per_example: Callable[[Sequence[str], Refs], list[float]] | None = None  # metrics that are means


def _mean_metric(name: str, fn: Callable[[Sequence[str], Refs], list[float]], facts: MetricFacts) -> Metric:
    return Metric(name, lambda p, r: np.asarray(fn(p, r), dtype=np.float64).reshape(-1, 1), mean_reduce, facts, fn)


# a point of BLEU / chrF / ROUGE-L; two points of a 0/100 per-example score (accuracy-like), whose rows vary more
_ONE_POINT, _TWO_POINTS = MetricFacts(margin=1.0), MetricFacts(margin=2.0)


METRICS: dict[str, Metric] = {
    "exact_match": _mean_metric("exact_match", exact_match_scores, _TWO_POINTS),
    "accuracy": _mean_metric("accuracy", exact_match_scores, _TWO_POINTS),  # by generation: answer == a label
    "rank_accuracy": _mean_metric("rank_accuracy", exact_match_scores, MetricFacts(margin=2.0, ranked=True)),
    "token_f1": _mean_metric("token_f1", token_f1_scores, _TWO_POINTS),
    "rouge_l": _mean_metric("rouge_l", rouge_l_scores, _ONE_POINT),
    "sql_exact_match": _mean_metric("sql_exact_match", sql_exact_match_scores, _TWO_POINTS),
    "bleu": Metric("bleu", _sacrebleu_stats("bleu"), _sacrebleu_reduce("bleu"), _ONE_POINT),
    "chrf": Metric("chrf", _sacrebleu_stats("chrf"), _sacrebleu_reduce("chrf"), _ONE_POINT),
}
RANKED = frozenset(n for n, m in METRICS.items() if m.facts.ranked)  # read from the facts: evaluate, protocols
PER_EXAMPLE = {n: m.per_example for n, m in METRICS.items() if m.per_example is not None}
CORPUS: dict[str, Callable[[Sequence[str], Refs], float]] = {"bleu": bleu, "chrf": chrf}
METRIC_NAMES = tuple(METRICS)


def margins_text() -> str:
    """The metrics' own equivalence margins in words: ``1 point: bleu, chrf, rouge_l; 2 points: ...``."""
    by_margin: dict[float, list[str]] = {}
    for name, metric in METRICS.items():
        by_margin.setdefault(metric.facts.margin, []).append(name)
    return "; ".join(f"{m:g} point{'' if m == 1 else 's'}: {', '.join(names)}" for m, names in sorted(by_margin.items()))


def check_names(names: Sequence[str]) -> None:
    """Raise ConfigError naming the first unknown metric."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRIC_NAMES)}")


def _preds_for(name: str, preds: Sequence[str], ranked: Sequence[str] | None) -> Sequence[str]:
    if not METRICS[name].facts.ranked:
        return preds
    if ranked is None:
        raise ConfigError(f"metric {name} scores the top-ranked option; it needs examples with `options` and "
                          "runs through tunelab.evaluate.evaluate (or pass ranked=...)")
    return ranked


def score(names: Sequence[str], preds: Sequence[str], refs: Refs, ranked: Sequence[str] | None = None,
          ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(corpus score per metric, per-example scores for the metrics that are means).

    ``ranked`` holds the top-ranked option per example, for ``rank_accuracy``.
    """
    check_names(names)
    per_example = {n: PER_EXAMPLE[n](_preds_for(n, preds, ranked), refs) for n in names if n in PER_EXAMPLE}
    corpus = {n: (sum(v) / len(v) if v else 0.0) for n, v in per_example.items()}
    corpus.update({n: CORPUS[n](preds, refs) for n in names if n in CORPUS})
    return {n: corpus[n] for n in names}, per_example


def compute(names: Sequence[str], preds: Sequence[str], refs: Refs) -> dict[str, float]:
    """Corpus scores for each metric name."""
    return score(names, preds, refs)[0]


def sufficient_stats(name: str, preds: Sequence[str], refs: Refs, ranked: Sequence[str] | None = None,
                     ) -> np.ndarray:
    """Per-example statistics (n, d) of one metric, the input of ``tunelab.stats`` bootstraps."""
    check_names([name])
    return METRICS[name].stats(_preds_for(name, preds, ranked), refs)


def confidence_intervals(names: Sequence[str], preds: Sequence[str], refs: Refs,
                         ranked: Sequence[str] | None = None, n_resamples: int = 1000, seed: int = 0,
                         confidence: float = 0.95) -> dict[str, tuple[float, float] | None]:
    """Percentile bootstrap interval of each metric, resampling examples (None when there are none)."""
    return {n: bootstrap_ci(sufficient_stats(n, preds, refs, ranked), METRICS[n].reduce, n_resamples, seed,
                            confidence) for n in names}
