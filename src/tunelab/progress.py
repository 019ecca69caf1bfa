"""Progress bars (rich) that stay quiet when asked to."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextmanager
def bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, **fields)``; shows loss or other fields after the bar."""
    if not enabled:
        yield lambda n=1, **fields: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields: float) -> None:
            info = "  ".join(f"{k}={v:.4g}" for k, v in fields.items())
            if info:
                progress.update(task, advance=n, info=info)
            else:
                progress.update(task, advance=n)

        yield advance
