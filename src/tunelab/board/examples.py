"""Examples tab data: every method's prediction per example of one task, filters, and a word diff.

Each method setting contributes the predictions of one seed (the chosen seed where it has it, else
its lowest), read through ``compare.examples.cell_predictions``: the copy its results store keeps
(``compare.archive``), else the cell's ``predictions.jsonl``.
The per-example score is the first per-example metric the rows carry (BLEU and chrF are corpus
metrics with no per-example value, so an E2E row shows its ROUGE-L), as the report's similarity plot does.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from tunelab.board.stores import done, setting
from tunelab.compare.examples import SIMILARITY_KEY, cell_predictions

FILTERS = ("all", "methods disagree", "A right, B wrong", "A better than B")


@dataclass
class TaskExamples:
    """The predictions of every method setting on one task, keyed by example id."""

    task: str
    metric: str | None
    methods: list[str]
    seeds: dict[str, int]  # setting -> the seed shown
    rows: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # id -> setting -> predictions row
    order: list[str] = field(default_factory=list)  # example ids in evaluation order

    def score(self, example: str, method: str) -> float | None:
        row = self.rows.get(example, {}).get(method)
        if row is None or self.metric is None:
            return None
        value = row.get("scores", {}).get(self.metric)
        return None if value is None else float(value)


def tasks_of(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({r["task"] for r in done(rows)})


def seeds_of(rows: list[dict[str, Any]], task: str) -> list[int]:
    return sorted({r["seed"] for r in done(rows) if r["task"] == task})


def load_task_examples(rows: list[dict[str, Any]], task: str, seed: int | None = None) -> TaskExamples:
    """Predictions of every finished method setting on ``task`` (one seed each; see the module doc)."""
    cells: dict[str, list[dict[str, Any]]] = {}
    for r in done(rows):
        if r["task"] == task:
            cells.setdefault(setting(r), []).append(r)
    chosen = {}
    for name, group in cells.items():
        group.sort(key=lambda c: c["seed"])
        chosen[name] = next((c for c in group if c["seed"] == seed), group[0])
    out = TaskExamples(task, None, sorted(chosen), {m: c["seed"] for m, c in chosen.items()})
    for name in out.methods:
        for row in cell_predictions(chosen[name]):
            key = str(row["id"])
            if key not in out.rows:
                out.order.append(key)
            out.rows.setdefault(key, {})[name] = row
    out.metric = _per_example_metric(out)
    return out


def _per_example_metric(data: TaskExamples) -> str | None:
    """The first metric with a per-example score in every row (the task's primary one when it has one)."""
    names: list[str] | None = None
    for per_method in data.rows.values():
        for row in per_method.values():
            have = list(row.get("scores", {}))
            names = have if names is None else [n for n in names if n in have]
    return names[0] if names else None


def _binary(data: TaskExamples, methods: list[str]) -> bool:
    """Whether the metric takes only its two extreme values (exact match, accuracy: 0 or 100)."""
    values = {data.score(i, m) for i in data.order for m in methods} - {None}
    return values <= {0.0, 100.0} or values <= {0.0, 1.0}


def disagree(data: TaskExamples, example: str, methods: list[str]) -> bool:
    """The shown methods' predictions are not all the same text."""
    preds = {data.rows[example][m]["prediction"].strip() for m in methods if m in data.rows[example]}
    return len(preds) > 1


def select(data: TaskExamples, methods: list[str], mode: str = "all", a: str | None = None, b: str | None = None,
           sort_by_difference: bool = False) -> list[str]:
    """Example ids shown under a filter: ``methods disagree``; ``A right, B wrong`` (for 0/100 metrics,
    A scores the top value and B does not; otherwise A scores above B, as ``A better than B``)."""
    if mode not in FILTERS:
        raise ValueError(f"filter {mode!r}; one of {', '.join(FILTERS)}")
    ids = [i for i in data.order if all(m in data.rows[i] for m in methods)]
    if mode == "methods disagree":
        ids = [i for i in ids if disagree(data, i, methods)]
    elif mode in ("A right, B wrong", "A better than B"):
        if not a or not b:
            return []
        top = max((s for i in ids if (s := data.score(i, a)) is not None), default=None)
        binary = mode == "A right, B wrong" and _binary(data, [a, b])

        def keep(i: str) -> bool:
            sa, sb = data.score(i, a), data.score(i, b)
            if sa is None or sb is None:
                return False
            return (sa == top and sb < sa) if binary else sa > sb

        ids = [i for i in ids if keep(i)]
    if sort_by_difference and a and b:
        ids.sort(key=lambda i: -abs((data.score(i, a) or 0.0) - (data.score(i, b) or 0.0)))
    return ids


def _demo_text(row: dict[str, Any]) -> str:
    demos = row.get("demonstrations") or []
    return "\n---\n".join(" → ".join(x for x in (d.get("input") or d.get("instruction", ""), d.get("output", "")) if x)
                          for d in demos)


def example_frame(data: TaskExamples, ids: list[str], methods: list[str]) -> pd.DataFrame:
    """One row per example: reference, then per method ``[score] prediction``, then the demonstration
    (the first method that showed one, e.g. IPT's) with its similarity."""
    records = []
    for i in ids:
        per = data.rows[i]
        first = next(iter(per.values()))
        refs = first.get("references", [])
        # the first reference, and how many more: E2E rows carry up to ~10, which would crowd the predictions out
        record: dict[str, Any] = {"id": i, "reference": (refs[0] if refs else "")
                                  + (f" (+{len(refs) - 1} more)" if len(refs) > 1 else "")}
        for m in methods:  # "[score] prediction": one column per method keeps the table readable
            row = per.get(m)
            score = data.score(i, m)
            record[m] = "" if row is None else (f"[{score:g}] " if score is not None else "") + row["prediction"]
        shown = next((per[m] for m in methods if m in per and per[m].get("demonstrations")), None)
        record["demonstration"] = _demo_text(shown) if shown else ""
        record["demo similarity"] = shown.get(SIMILARITY_KEY) if shown else None
        records.append(record)
    return pd.DataFrame(records)


def word_diff(a: str, b: str) -> list[tuple[str, str | None]]:
    """Words of A and B merged: ("word", "-") only in A, ("word", "+") only in B, ("word", None) in both."""
    left, right = a.split(), b.split()
    out: list[tuple[str, str | None]] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=left, b=right, autojunk=False).get_opcodes():
        if op == "equal":
            out += [(w, None) for w in left[i1:i2]]
        else:
            out += [(w, "-") for w in left[i1:i2]]
            out += [(w, "+") for w in right[j1:j2]]
    return out


def spaced(diff: list[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    """``word_diff`` with a space after each word, for display (adjacent words of one kind are merged)."""
    return [(w + " ", kind) for w, kind in diff]
