"""`tunelab compare`: run a grid of methods x tasks x seeds x data sizes into a results store, then report.

>>> from tunelab.compare import compare
>>> outcome = compare("grid.yaml", out="runs/grid")          # doctest: +SKIP
>>> outcome.report_html                                        # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from tunelab.compare import archive
from tunelab.compare.backends import Backend, check_backend
from tunelab.compare.grid import (
    Cell,
    GridConfig,
    coords_of,
    expand,
    list_presets,
    load_grid,
    preset_path,
    resolve_sources,
    validate,
    waves,
)
from tunelab.compare.report import build_report, write_report
from tunelab.compare.runner import GridSummary, run_grid
from tunelab.compare.store import Store, open_existing
from tunelab.errors import TunelabError

STORE_NAME = "results.sqlite"


@dataclass
class Outcome:
    grid: GridConfig
    cells: list[Cell]
    summary: GridSummary
    store: Path
    report_md: Path
    report_html: Path


def plan(source: str | Path, overrides: list[str] | None = None, out: str | Path | None = None
         ) -> tuple[GridConfig, list[Cell]]:
    """Load, expand and validate a grid (every cell's config, method options and data) without training."""
    grid = load_grid(source, overrides)
    cells = expand(grid, Path(out) / "data" if out else None)
    validate(cells)
    return grid, cells


def compare(source: str | Path, out: str | Path, store: str | Path | None = None,
            overrides: list[str] | None = None, progress: bool = True, retry_failed: bool = False,
            console: Console | None = None, workers: int = 1, backend: str | Backend = "local",
            address: str | None = None) -> Outcome:
    """Validate the whole grid, run the cells the store lacks, and write the report for this grid's cells.

    ``backend``: ``local`` (``workers`` cells at once on this machine) or ``ray`` (each cell a Ray task on
    the cluster at ``address``; see ``compare.backends``), or a ``Backend`` object to share one.
    """
    console = console or Console()
    check_backend(backend, workers, address)
    out = Path(out).resolve()
    start = time.perf_counter()
    grid, cells = plan(source, overrides, out)  # torch-free: a bad grid fails in a second
    console.print(f"grid {grid.name}: {len(cells)} cells validated in {time.perf_counter() - start:.2f}s")
    import tunelab.run  # noqa: F401  (torch and transformers, once the grid is known to be valid)
    store_path = Path(store) if store else out / STORE_NAME
    with Store(store_path) as db:
        db.add_task_tags({t.label: list(t.tags) for t in grid.tasks if t.tags is not None})
        if grid.margins:
            db.set_margins(dict(grid.margins))
        if any(m.tune is not None for m in grid.methods):  # dev-split trials first; winners replace the defaults
            from tunelab.compare.tuning import tune_cells

            cells = tune_cells(grid, cells, db, out, store_path, progress=progress, console=console)
        cells = resolve_sources(cells, out)  # init_from: {cell: ...} -> that (possibly tuned) cell's directory
        if all(db.status(c.key) == "done" for c in cells):
            console.print(f"all {len(cells)} cells done in {store_path}: nothing to run")
        summary = GridSummary()
        try:
            for wave in waves(cells):  # cells that start from another cell's adapter run after it
                db.pack(_needed_sources(db, cells))  # a source's small adapter (a clone without cells/ needs it)
                _source_adapters(db, wave, out, retry_failed)
                part = run_grid(grid, wave, db, out, progress=progress, retry_failed=retry_failed, console=console,
                                workers=workers, backend=backend, address=address)
                summary = _add(summary, part)
        finally:  # also on Ctrl-C: a store committed after an interrupted session resumes without cells/
            _keep_sources(db, cells)
        if grid.until == "decisive":  # add seeds / rows where they narrow the open tests most (compare/adaptive.py)
            from tunelab.compare.adaptive import parse_budget, until_decisive

            def run_more(more: list[Cell]) -> None:
                nonlocal summary
                for wave in waves(more):  # a transfer cell's new seed after its source's new seed
                    _source_adapters(db, wave, out, retry_failed)
                    summary = _add(summary, run_grid(grid, wave, db, out, progress=progress, retry_failed=retry_failed,
                                                     console=console, workers=workers, backend=backend,
                                                     address=address))
                    db.pack({c.key for c in wave if any(m.source_key == c.key for m in more)})

            assert grid.budget is not None  # parse_grid requires it with until
            cells = until_decisive(db, store_path, cells, parse_budget(grid.budget), run_more, console).cells
        else:  # the seeds / rows an earlier `until: decisive` run added stay in the report
            from tunelab.compare.adaptive import resumed

            cells = resumed(db, cells)
        _keep_sources(db, cells)
        md, html = write_report(build_report(db, keys=[c.key for c in cells],
                                             coords=coords_of(cells)), out)
    return Outcome(grid, cells, summary, store_path, md, html)


def _keep_sources(db: Store, cells: list[Cell]) -> None:
    """Pack into the store the adapters of every cell that a cell of ``cells`` or a stored cell starts from (whichever
    grid stored it), and forget the others: a fresh clone holds the store, not ``cells/``, and ``--until decisive``
    may run a transfer cell again on more test rows (the paper preset's 20-token Gemma prompts: 50 KB each)."""
    sources = {c.source_key for c in cells if c.source_key is not None}
    sources |= db.source_keys()
    db.pack(sources)
    db.drop_adapters(sources)


def _needed_sources(db: Store, cells: list[Cell]) -> set[str]:
    """Keys of the cells whose adapters a cell not yet done starts from (``init_from: {cell: ...}``)."""
    return {c.source_key for c in cells if c.source_key is not None and db.status(c.key) != "done"}


def _source_adapters(db: Store, cells: list[Cell], out: Path, retry_failed: bool) -> None:
    """Put back the adapter of every finished source cell that a cell still to run starts from, from the store
    where its folder is gone (a fresh clone holds the store, not ``cells/``); say which cell lacks one."""
    for cell in cells:
        key, status = cell.source_key, db.status(cell.key)
        if key is None or status == "done" or (status == "failed" and not retry_failed) or db.status(key) != "done":
            continue  # not to run, or its source runs (or failed) first
        adapter = out / "cells" / key / "adapter"
        if not adapter.is_dir() and not db.restore_adapter(key, adapter):
            raise TunelabError(
                f"{cell.method} on {cell.task} (seed {cell.seed}) starts from cell {key}, which {db.path} holds as "
                f"done but without its adapter (over {archive.ADAPTER_LIMIT >> 20} MB, or stored by an older "
                f"tunelab), and {adapter} is missing: copy that cell's folder into {out / 'cells'} from where it ran, "
                f"or run it again: sqlite3 {db.path} \"DELETE FROM cells WHERE key='{key}'\"")


def _add(a: GridSummary, b: GridSummary) -> GridSummary:
    return GridSummary(a.done + b.done, a.failed + b.failed, a.skipped + b.skipped, a.reused + b.reused,
                       a.seconds + b.seconds, a.failures + b.failures)


def report_store(store: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Write report.md and report.html for every cell in ``store`` (less those replaced by the same cell on more
    test rows, ``adaptive.superseded``)."""
    from tunelab.compare.adaptive import superseded

    with open_existing(store) as db:
        rows = [r.data for r in db.rows()]
        dropped = superseded(rows)
        return write_report(build_report(db, keys=[r["key"] for r in rows if r["key"] not in dropped] if dropped
                                         else None), out)


__all__ = ["Cell", "GridConfig", "Outcome", "Store", "compare", "expand", "list_presets", "load_grid", "plan",
           "preset_path", "report_store", "validate"]
