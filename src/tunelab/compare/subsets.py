"""Per-task subsets of a multi-task dataset (Super-NI: train on some tasks, evaluate on unseen ones).

``tunelab run`` reads whole files, so the grid writes the filtered rows as JSONL under the grid's
output directory (derived data beside the results, never in the repository) and points the cell's
``data.train`` / ``data.eval`` at them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.errors import ConfigError
from tunelab.paths import atomic_write_text, safe_child

if TYPE_CHECKING:
    from tunelab.compare.grid import TaskSpec


def first_per_task(rows: list, n: int) -> list:
    """The first ``n`` rows of each task, in file order (so every task is judged, not just the first few)."""
    seen: dict[str | None, int] = {}
    kept = []
    for row in rows:
        seen[row.task] = seen.get(row.task, 0) + 1
        if seen[row.task] <= n:
            kept.append(row)
    return kept


def task_subset(spec: TaskSpec, data_dir: Path | None) -> dict[str, Any]:
    """Write the filtered splits of ``spec`` under ``data_dir/<label>/`` and return the data overrides."""
    from tunelab.data import load_task

    if data_dir is None:
        raise ConfigError(f"task {spec.label}: train_tasks/eval_tasks/eval_per_task need an output directory (--out)")
    data = load_task(spec.task, spec.train, spec.eval)
    target = safe_child(data_dir, spec.label)
    files = {}
    for split, rows, wanted in (("train", data.train, spec.train_tasks), ("eval", data.eval, spec.eval_tasks)):
        if wanted:
            missing = sorted(set(wanted) - {e.task for e in rows})
            if missing:
                raise ConfigError(f"task {spec.label}: {split}_tasks names {missing[0]!r}, which has no "
                                  f"{split} rows in {spec.task}")
            rows = [e for e in rows if e.task in set(wanted)]
        if split == "eval" and spec.eval_per_task:
            rows = first_per_task(rows, spec.eval_per_task)
        text = "".join(json.dumps(e.to_dict(), ensure_ascii=False) + "\n" for e in rows)
        path = target / f"{split}.jsonl"
        if not path.is_file() or path.read_text() != text:  # rewrite only on change: keeps cell keys stable
            atomic_write_text(path, text)
        files[split] = str(path)
    return files
