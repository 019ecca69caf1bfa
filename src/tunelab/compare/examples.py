"""Per-example results of stored cells: the predictions rows, as metric sufficient statistics."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.compare import archive
from tunelab.errors import TunelabError
from tunelab.metrics import METRICS, sufficient_stats
from tunelab.stats import mean_reduce

SIMILARITY_KEY = "demo_similarity"  # per-example mean cosine to its demonstrations, in IPT predictions rows


def read_predictions(path: str) -> tuple[dict[str, Any], ...]:
    """The rows of one cell's predictions.jsonl (cached while the file is unchanged), or of the copy its results
    store keeps (``path`` a ``sqlite:<store>#<key>`` reference: ``compare.archive``)."""
    if path.startswith(archive.REFERENCE):
        return archive.read_reference(path)[0]
    file = Path(path)
    if not file.is_file():
        raise TunelabError(f"{file} is missing: the store points at predictions that were moved or deleted")
    stat = file.stat()
    return _read(str(file), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=1024)
def _read(path: str, mtime_ns: int, size: int) -> tuple[dict[str, Any], ...]:
    return tuple(json.loads(line) for line in Path(path).read_text().splitlines() if line.strip())


def cell_predictions(row: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """A stored cell's predictions rows as its store recorded them: the store's packed copy (``examples``) where it
    has one, else the file ``predictions`` names. Not the file first: it may since hold another run of the same
    configuration (another grid's cell folder under the same key, on another machine), and what the report, claims
    and board compute must be a function of the store alone."""
    return read_predictions(row.get("examples") or row["predictions"])


def generalization(row: dict[str, Any]) -> dict[str, Any] | None:
    """``result.generalization`` of a stored cell with its per-example losses (``train_nll``, ``eval_nll``),
    which a store keeps in the cell's examples rather than in the ``result`` column; None if not measured."""
    found = (row.get("result") or {}).get("generalization")
    if found is None or all(name in found for name in archive.NLL_FIELDS) or not row.get("examples"):
        return found
    return {**found, **archive.read_reference(row["examples"])[1]}


def example_stats(row: dict[str, Any], metric: str) -> tuple[list[str], np.ndarray, Callable]:
    """(example ids, statistics (n, d), reduction) of ``metric`` for one stored cell.

    Mean metrics use the per-example scores evaluation already wrote; corpus metrics (BLEU, chrF)
    are recomputed as sacrebleu segment statistics from the stored predictions and references.
    """
    rows = cell_predictions(row)
    ids = [str(r["id"]) for r in rows]
    spec = METRICS.get(metric)
    if spec is not None and spec.per_example is not None and all(metric in r.get("scores", {}) for r in rows):
        return ids, np.array([[float(r["scores"][metric])] for r in rows]), mean_reduce
    ranked = [r.get("ranked_prediction", "") for r in rows] if spec is not None and spec.facts.ranked else None
    stats = sufficient_stats(metric, [r["prediction"] for r in rows], [r["references"] for r in rows], ranked)
    return ids, stats, METRICS[metric].reduce


def example_scores(row: dict[str, Any], metric: str) -> dict[str, float]:
    """id -> the example's own score for a mean metric (for similarity-bucket plots); {} otherwise."""
    ids, stats, reduce = example_stats(row, metric)
    if reduce is not mean_reduce:
        return {}
    return {i: float(s[0]) for i, s in zip(ids, stats, strict=True)}


def mean_by_id(runs: Iterable[Iterable[dict[str, Any]]], value: Callable[[dict[str, Any]], Any]) -> dict[str, float]:
    """id -> mean over runs (seeds) of ``value(row)`` for each predictions row, skipping rows where it is None."""
    found: dict[str, list[float]] = defaultdict(list)
    for rows in runs:
        for row in rows:
            v = value(row)
            if v is not None:
                found[str(row["id"])].append(float(v))
    return {i: float(np.mean(v)) for i, v in found.items()}
