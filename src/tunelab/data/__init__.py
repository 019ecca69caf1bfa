"""Data: every source becomes a list of ``Example``; ``load_task`` gives a task's train/eval splits."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.data.example import Example
from tunelab.data.jsonl import load_jsonl
from tunelab.data.tasks import TASKS, TRAIN_SIZE
from tunelab.errors import DataError

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


def default_metrics(examples: list[Example]) -> tuple[str, ...]:
    """Exact match for short answers; add BLEU and ROUGE-L when answers are sentences."""
    if any(e.options for e in examples):
        return ("accuracy",)
    words = [len(e.output.split()) for e in examples if e.output]
    mean = sum(words) / max(len(words), 1)
    return ("exact_match", "rouge_l") if mean <= 4 else ("bleu", "rouge_l", "exact_match")


def load_examples(path: str | Path) -> list[Example]:
    """Load a data file in any supported format (by extension and content)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return load_jsonl(path)
    try:  # native formats live in tunelab.data.formats (optional until that module lands)
        from tunelab.data.formats import load_any
    except ImportError:
        raise DataError(f"unsupported file type {path.suffix!r}; use .jsonl", path=str(path)) from None
    return load_any(path)


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


def load_task(task: str, train: str | None = None, eval: str | None = None) -> TaskData:
    """Resolve a built-in task name, a data file, or a directory holding train/test files."""
    if task in TASKS and not (train or eval):
        spec = TASKS[task]
        return TaskData(task, spec.examples("train", TRAIN_SIZE), spec.examples("eval", EVAL_SIZE), spec.metrics)
    path = Path(task)
    dev: list[Example] = []
    if train or eval:
        train_ex = load_examples(train) if train else []
        eval_ex = load_examples(eval) if eval else []
        name = Path(train or eval or task).parent.name
    elif path.is_dir():
        train_file, eval_file = _find(path, ("train",)), _find(path, EVAL_NAMES)
        if not train_file or not eval_file:
            raise DataError("a task directory needs train.jsonl and one of test/eval/dev.jsonl", path=str(path))
        train_ex, eval_ex = load_examples(train_file), load_examples(eval_file)
        dev_file = _find(path, ("dev", "validation"))
        dev = load_examples(dev_file) if dev_file and dev_file != eval_file else []
        name = path.name
    elif path.is_file():
        name = path.parent.name if path.stem in EVAL_NAMES + ("train",) else path.stem
        train_ex, eval_ex = _split_file(load_examples(path), name)
    else:
        raise DataError(f"unknown task {task!r}: not a built-in task ({', '.join(TASKS)}), file or directory")
    return TaskData(name, train_ex, eval_ex, default_metrics(eval_ex or train_ex), dev)


__all__ = ["Example", "TaskData", "TASKS", "load_task", "load_examples", "load_jsonl", "default_metrics"]
