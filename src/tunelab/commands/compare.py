"""`tunelab compare` (run a grid, then report) and `tunelab report STORE`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunelab.commands import console as make_console
from tunelab.errors import ConfigError


def compare_command(
    preset: Annotated[str | None, typer.Option(help="a shipped grid: quick | paper | instruction | claims")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="grid YAML file")] = None,
    out: Annotated[str | None, typer.Option(help="output directory (default: runs/compare-<grid name>)")] = None,
    store: Annotated[str | None, typer.Option(help="results store (default: OUT/results.sqlite)")] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="run cells that failed before again")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and list the cells; train nothing")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no per-step progress bars")] = False,
    workers: Annotated[int, typer.Option(min=1, help="cells run at once, each in its own process")] = 1,
    backend: Annotated[str, typer.Option(help="where cells run: local (this machine) | ray (a Ray cluster)")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster: auto | HOST:PORT (default: start a local one)")
                       ] = None,
    until: Annotated[str | None, typer.Option(help="decisive: then add seeds/rows until every quality test "
                                                   "is decided (grid key `until`)")] = None,
    budget: Annotated[str | None, typer.Option(help="cell time --until may add, e.g. 3h, 90m (grid key `budget`)")
                      ] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="grid overrides, e.g. train.steps=5 seeds=[0]")] = None,
) -> None:
    """Run a grid of methods x tasks x seeds x data sizes; finished cells are skipped on a rerun."""
    from tunelab.compare import compare, list_presets, plan, preset_path

    overrides = [*(overrides or []), *([f"until={until}"] if until else []), *([f"budget={budget}"] if budget else [])]

    if (preset is None) == (config is None):
        raise ConfigError(f"give exactly one of --preset ({', '.join(list_presets())}) or --config grid.yaml")
    source = preset_path(preset) if preset else config
    assert source is not None  # exactly one of the two, checked above
    console = make_console()
    if dry_run:
        grid, cells = plan(source, overrides or [], out or f"runs/compare-{preset or Path(source).stem}")
        for cell in cells:
            console.print(f"{cell.key}  {cell.method:28} {cell.task:20} seed {cell.seed}  n={cell.train_size}  "
                          f"len={cell.prompt_length}", highlight=False)
        console.print(f"grid {grid.name}: {len(cells)} cells, all valid")
        return
    out = out or f"runs/compare-{preset or Path(source).stem}"
    outcome = compare(source, out, store, overrides or [], progress=not quiet, retry_failed=retry_failed,
                      console=console, workers=workers, backend=backend, address=address)
    s = outcome.summary
    console.print(f"{s.done} cells run, {s.failed} failed, {s.skipped} skipped (already in the store)"
                  + (f", {s.reused} recovered from disk" if s.reused else "") + f" in {s.seconds:.0f}s")
    for failure in s.failures:
        console.print(f"  [red]failed[/red] {failure}", highlight=False)
    from tunelab.compare.archive import size_line
    from tunelab.compare.grid import coords_of
    from tunelab.compare.store import open_existing
    from tunelab.compare.summary import print_summary

    with open_existing(outcome.store) as db:  # what was compared and what held, without opening a file
        print_summary(console, db, keys=[c.key for c in outcome.cells], coords=coords_of(outcome.cells))
        size = size_line(db.size())
    console.print(f"store:  {outcome.store} ({size})\nreport: {outcome.report_md}\n        {outcome.report_html}",
                  highlight=False)


def report_command(
    store: Annotated[str, typer.Argument(help="the folder `tunelab compare --out` wrote, or its results.sqlite")],
    out: Annotated[str | None, typer.Option(help="directory for report.md / report.html (default: beside STORE)")] = None,
    pack: Annotated[bool, typer.Option("--pack", help="first copy into the store the predictions (and small "
                                       "source adapters) of cells an older tunelab stored as files only, so the "
                                       "store can be committed without cells/")] = False,
) -> None:
    """Write report.md and a self-contained report.html (plots embedded) from a results store."""
    from tunelab.compare import STORE_NAME, report_store
    from tunelab.compare.archive import size_line
    from tunelab.compare.store import open_existing

    path = Path(store) / STORE_NAME if Path(store).is_dir() else Path(store)  # `report runs/demo` as compare --out
    console = make_console()
    if pack:
        with open_existing(path) as db:
            packed = db.pack()
            console.print(f"packed {packed} cells into {path} ({size_line(db.size())})", highlight=False)
    md, html = report_store(path, out or path.parent)
    console.print(f"report: {md}\n        {html}")


def size_command(
    store: Annotated[str, typer.Argument(help="results store of a pilot grid (the folder tunelab compare --out "
                                              "wrote, or its results.sqlite)")],
    margin: Annotated[list[str] | None, typer.Option(help="equivalence margin per metric, e.g. bleu=1.0 (repeat)")] = None,
) -> None:
    """How many test rows and seeds each quality claim needs to become decisive at its margin."""
    from rich.table import Table

    from tunelab.compare import STORE_NAME
    from tunelab.compare.sizing import size_claims, sizing_note, sizing_table
    from tunelab.compare.store import open_existing

    store = str(Path(store) / STORE_NAME) if Path(store).is_dir() else store

    margins = {}
    for item in margin or []:
        name, sep, value = item.partition("=")
        try:
            margins[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or margins.get(name.strip(), 0) <= 0:
            raise ConfigError(f"--margin {item!r}: expected METRIC=POINTS with POINTS > 0, e.g. --margin bleu=1.0")
    with open_existing(store) as db:
        rows = db.tagged_rows(status="done")
        sizings = size_claims(rows, {**db.margins(), **margins})
    console = make_console()
    if not sizings:
        console.print("no quality test in this store (a claim needs cells of both its methods on one task)")
        return
    headers, body = sizing_table(sizings)
    table = Table(*headers)
    for row in body:
        table.add_row(*row)
    console.print(table)
    console.print(sizing_note(sizings), highlight=False)
