"""`tunelab ls`: what models, tasks and methods exist."""

from __future__ import annotations

import dataclasses

from rich.console import Console
from rich.table import Table

from tunelab.errors import TunelabError

KINDS = ("models", "tasks", "methods", "all")


def list_things(console: Console, what: str, model: str | None = None) -> None:
    if what not in KINDS:
        raise TunelabError(f"tunelab ls {what}: choose one of {', '.join(KINDS)}")
    if what in ("models", "all"):
        from tunelab.models import MODELS

        table = Table(title="models (or any Hugging Face id / local path)")
        table.add_column("name")
        table.add_column("description")
        for spec in MODELS.values():
            table.add_row(spec.name, spec.description)
        console.print(table)
    if what in ("tasks", "all"):
        from tunelab.data.tasks import TASKS

        table = Table(title="built-in tasks (or a JSONL file / directory)")
        for col in ("name", "metrics", "description"):
            table.add_column(col)
        for task in TASKS.values():
            table.add_row(task.name, ", ".join(task.metrics), task.description)
        console.print(table)
    if what in ("methods", "all"):
        _methods(console, model)


def _methods(console: Console, model_name: str | None) -> None:
    from tunelab.data import load_task
    from tunelab.methods import METHODS

    table = Table(title="methods" + (f" (trainable parameters on {model_name})" if model_name else ""))
    table.add_column("name")
    table.add_column("trains")
    table.add_column("default lr")
    table.add_column("capabilities")
    if model_name:
        table.add_column("trainable params", justify="right")
        train = load_task("date_format").train[:8]
    for name, method in METHODS.items():
        row = [name, "yes" if method.trains else "no", f"{default_lr(method):g}" if method.trains else "-",
               method.capabilities.describe()]
        if model_name:
            row.append(f"{trainable_count(method, model_name, train):,}")
        table.add_row(*row)
    console.print(table)


def default_lr(method) -> float:
    """The learning rate a method trains with when ``train.lr`` is not set: its config's ``lr`` default,
    read from the dataclass without building a config (some configs check their options against a library)."""
    lr = next(f.default for f in dataclasses.fields(method.Config) if f.name == "lr")
    return lr if isinstance(lr, int | float) else method.Config().lr  # computed in __post_init__ (None default)


def trainable_count(method, model_name: str, train) -> int:
    """Exact trainable parameters of ``method`` with default options, on a freshly loaded model.

    A fresh model per method, because LoRA and full fine-tuning change the model they are built on.
    Methods that train nothing are not built (building discrete_prompt would score its candidates).
    """
    from tunelab.models import load_model

    if not method.trains:
        return 0
    model, tokenizer = load_model(model_name)
    return method.build(model, tokenizer, method.Config(), train, 0).num_trainable()
