"""Data: every source becomes a list of ``Example``; ``load_task`` gives a task's train/eval splits."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.example import Example
from tunelab.data.formats.base import LoadReport
from tunelab.data.jsonl import load_jsonl
from tunelab.data.mixtures import Source, by_task, mix, parse_source
from tunelab.data.tasks import TASKS, TRAIN_SIZE
from tunelab.errors import DataError, did_you_mean

EVAL_SIZE = 200
EVAL_NAMES = ("test", "eval", "dev", "validation")


@dataclass
class TaskData:
    """A task's splits plus the metrics it is scored with by default."""

    name: str
    train: list[Example]
    eval: list[Example]
    metrics: tuple[str, ...]
    dev: list[Example] = field(default_factory=list)
    skipped: int = 0  # malformed records skipped while loading (data.skip_bad)


_SQL = re.compile(r"\s*\(?\s*(select|with)\b", re.IGNORECASE)  # a query's first keyword
_FROM = re.compile(r"\bfrom\b", re.IGNORECASE)


def default_metrics(examples: list[Example]) -> tuple[str, ...]:
    """Exact match for short answers; add BLEU and ROUGE-L when answers are sentences.

    SQL answers (text-to-SQL, e.g. Spider) are scored as Sun et al. and Spider do: exact match after
    SQL normalisation first, BLEU as a secondary column.
    """
    if any(e.options for e in examples):
        return ("accuracy",)
    if examples and all(_SQL.match(e.output) and _FROM.search(e.output) for e in examples):
        return ("sql_exact_match", "bleu")
    words = [len(e.output.split()) for e in examples if e.output]
    mean = sum(words) / max(len(words), 1)
    return ("exact_match", "rouge_l") if mean <= 4 else ("bleu", "rouge_l", "exact_match")


def load_examples(path: str | Path, *, skip_bad: bool = False, report: LoadReport | None = None,
                  **options: Any) -> list[Example]:
    """Load a data file in any supported format (detected by extension and content).

    ``.jsonl`` files in the uniform schema are validated strictly; other schemas (Dolly, ShareGPT,
    OpenAI messages, Unnatural Instructions, ...) are detected from their keys. ``skip_bad`` skips
    malformed records and counts them in ``report`` (and a warning) instead of raising.
    ``options`` are ``tunelab.data.formats.LoadOptions`` fields (format, mapping, templates, ...).
    """
    from tunelab.data.formats import load_any

    return load_any(path, report=report, skip_bad=skip_bad, **options)


def _split_file(examples: list[Example], name: str) -> tuple[list[Example], list[Example]]:
    """Deterministic 90/10 hold-out when one file is given for both training and evaluation."""
    order = list(range(len(examples)))
    random.Random(f"tunelab:split:{name}").shuffle(order)
    cut = max(1, len(order) // 10)
    return [examples[i] for i in order[cut:]], [examples[i] for i in order[:cut]]


def _find(directory: Path, names: tuple[str, ...]) -> Path | None:
    for stem in names:
        for candidate in sorted(directory.glob(f"{stem}.*")):
            if candidate.is_file() and candidate.suffix in {".jsonl", ".json", ".csv", ".parquet"}:
                return candidate
    return None


def load_task(task: str, train: str | None = None, eval: str | None = None, *, skip_bad: bool = False,
              task_cap: int | None = None, mixture: list[str] | None = None, seed: int = 0,
              sni_encoding: str = "plain") -> TaskData:
    """Resolve a built-in task name, a data file, or a directory holding train/test files.

    ``task_cap`` mixes the train split's tasks examples-proportionally with that cap per task (Flan);
    ``mixture`` adds more training files (``path`` or ``path@weight``), mixed by the same rule.
    ``sni_encoding`` renders Super-NI instructions (e.g. "def+pos2"; see formats.super_ni).
    """
    reports: list[LoadReport] = []

    def load(p: str | Path) -> list[Example]:
        reports.append(LoadReport())
        return load_examples(p, skip_bad=skip_bad, report=reports[-1], sni_encoding=sni_encoding)

    if task in TASKS and not (train or eval):
        spec = TASKS[task]
        data = TaskData(task, spec.examples("train", TRAIN_SIZE), spec.examples("eval", EVAL_SIZE), spec.metrics)
        return _mixed(data, task_cap, mixture, seed, load, reports)
    path = Path(task)
    dev: list[Example] = []
    if train or eval:
        train_ex = load(train) if train else []
        eval_ex = load(eval) if eval else []
        name = Path(train or eval or task).parent.name
    elif path.is_dir():
        train_file, eval_file = _find(path, ("train",)), _find(path, EVAL_NAMES)
        if not train_file or not eval_file:
            raise DataError("a task directory needs train.jsonl and one of test/eval/dev.jsonl", path=str(path))
        train_ex, eval_ex = load(train_file), load(eval_file)
        dev_file = _find(path, ("dev", "validation"))
        dev = load(dev_file) if dev_file and dev_file != eval_file else []
        name = path.name
    elif path.is_file():
        name = path.parent.name if path.stem in EVAL_NAMES + ("train",) else path.stem
        train_ex, eval_ex = _split_file(load(path), name)
    elif path.suffix or len(path.parts) > 1:  # a path, not a task name
        raise DataError(f"file not found: {path}; give a data file or a task directory "
                        f"(or a built-in task: {', '.join(TASKS)})")
    else:
        raise DataError(f"unknown task {task!r}{did_you_mean(task, TASKS)}: not a built-in task "
                        f"({', '.join(TASKS)}), file or directory")
    data = TaskData(name, train_ex, eval_ex, default_metrics(eval_ex or train_ex), dev)
    return _mixed(data, task_cap, mixture, seed, load, reports)


def _mixed(data: TaskData, task_cap: int | None, mixture: list[str] | None, seed: int, load,
           reports: list[LoadReport]) -> TaskData:
    """Apply the mixture options to the train split and record what was skipped while loading."""
    if mixture or task_cap:
        sources = by_task(data.train)
        for spec in mixture or []:
            source, weight = parse_source(spec)
            sources += [Source(s.name, s.examples, weight) for s in by_task(load(source))]
        data.train = mix(sources, cap=task_cap, seed=seed)
    data.skipped = sum(len(r.skipped) for r in reports)
    return data


__all__ = ["Example", "TaskData", "TASKS", "LoadReport", "load_task", "load_examples", "load_jsonl",
           "default_metrics"]
