"""Metrics that match their reference implementations (sacrebleu, rouge-score, SQuAD normalisation).

Every metric takes predictions and, per prediction, a list of references, and returns a score in
[0, 100]. Per-example scores (where the metric decomposes) feed bootstrap confidence intervals.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from tunelab.errors import ConfigError

Refs = Sequence[Sequence[str]]


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_scores(preds: Sequence[str], refs: Refs) -> list[float]:
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
    return [100.0 * max(_f1(p, r) for r in rs) for p, rs in zip(preds, refs, strict=True)]


def rouge_l_scores(preds: Sequence[str], refs: Refs) -> list[float]:
    """ROUGE-L F-measure per example, best over references (rouge-score, with stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [100.0 * max(scorer.score(r, p)["rougeL"].fmeasure for r in rs) for p, rs in zip(preds, refs, strict=True)]


def _transpose(refs: Refs) -> list[list[str]]:
    """sacrebleu wants one list per reference position; pad short lists with their first reference."""
    width = max(len(rs) for rs in refs)
    return [[rs[i] if i < len(rs) else rs[0] for rs in refs] for i in range(width)]


def bleu(preds: Sequence[str], refs: Refs) -> float:
    """Corpus BLEU with all references (sacrebleu defaults: 13a tokenisation, exp smoothing)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(preds), _transpose(refs)).score)


def chrf(preds: Sequence[str], refs: Refs) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(preds), _transpose(refs)).score)


# name -> (per-example scores, or None) ; corpus-level metrics are in CORPUS
PER_EXAMPLE: dict[str, Callable[[Sequence[str], Refs], list[float]]] = {
    "exact_match": exact_match_scores,
    "accuracy": exact_match_scores,
    "token_f1": token_f1_scores,
    "rouge_l": rouge_l_scores,
}
CORPUS: dict[str, Callable[[Sequence[str], Refs], float]] = {"bleu": bleu, "chrf": chrf}
METRIC_NAMES = (*PER_EXAMPLE, *CORPUS)


def check_names(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in PER_EXAMPLE and n not in CORPUS]
    if unknown:
        raise ConfigError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRIC_NAMES)}")


def score(names: Sequence[str], preds: Sequence[str], refs: Refs) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(corpus score per metric, per-example scores for the metrics that decompose)."""
    check_names(names)
    per_example = {n: PER_EXAMPLE[n](preds, refs) for n in names if n in PER_EXAMPLE}
    corpus = {n: (sum(v) / len(v) if v else 0.0) for n, v in per_example.items()}
    corpus.update({n: CORPUS[n](preds, refs) for n in names if n in CORPUS})
    return {n: corpus[n] for n in names}, per_example


def compute(names: Sequence[str], preds: Sequence[str], refs: Refs) -> dict[str, float]:
    """Corpus scores for each metric name."""
    return score(names, preds, refs)[0]
