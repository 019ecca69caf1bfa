"""`tunelab compare` (run a grid, then report) and `tunelab report STORE`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tunelab.errors import ConfigError


def compare_command(
    preset: Annotated[str | None, typer.Option(help="a shipped grid: quick | paper | instruction")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="grid YAML file")] = None,
    out: Annotated[str | None, typer.Option(help="output directory (default: runs/compare-<grid name>)")] = None,
    store: Annotated[str | None, typer.Option(help="results store (default: OUT/results.sqlite)")] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="run cells that failed before again")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and list the cells; train nothing")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no per-step progress bars")] = False,
    workers: Annotated[int, typer.Option(min=1, help="cells run at once, each in its own process")] = 1,
    overrides: Annotated[list[str] | None, typer.Argument(help="grid overrides, e.g. train.steps=5 seeds=[0]")] = None,
) -> None:
    """Run a grid of methods x tasks x seeds x data sizes; finished cells are skipped on a rerun."""
    from tunelab.compare import compare, list_presets, plan, preset_path

    if (preset is None) == (config is None):
        raise ConfigError(f"give exactly one of --preset ({', '.join(list_presets())}) or --config grid.yaml")
    source = preset_path(preset) if preset else config
    console = Console()
    if dry_run:
        grid, cells = plan(source, overrides or [], out or f"runs/compare-{preset or Path(config).stem}")
        for cell in cells:
            console.print(f"{cell.key}  {cell.method:28} {cell.task:20} seed {cell.seed}  n={cell.train_size}  "
                          f"len={cell.prompt_length}", highlight=False)
        console.print(f"grid {grid.name}: {len(cells)} cells, all valid")
        return
    out = out or f"runs/compare-{preset or Path(config).stem}"
    outcome = compare(source, out, store, overrides or [], progress=not quiet, retry_failed=retry_failed,
                      console=console, workers=workers)
    s = outcome.summary
    console.print(f"{s.done} cells run, {s.failed} failed, {s.skipped} skipped (already in the store)"
                  + (f", {s.reused} recovered from disk" if s.reused else "") + f" in {s.seconds:.0f}s")
    for failure in s.failures:
        console.print(f"  [red]failed[/red] {failure}", highlight=False)
    from tunelab.compare.store import open_existing
    from tunelab.compare.summary import print_summary

    with open_existing(outcome.store) as db:  # what was compared and what held, without opening a file
        print_summary(console, db, keys=[c.key for c in outcome.cells])
    console.print(f"store:  {outcome.store}\nreport: {outcome.report_md}\n        {outcome.report_html}")


def report_command(
    store: Annotated[str, typer.Argument(help="results store written by tunelab compare")],
    out: Annotated[str | None, typer.Option(help="directory for report.md / report.html (default: beside STORE)")] = None,
) -> None:
    """Write report.md and a self-contained report.html (plots embedded) from a results store."""
    from tunelab.compare import report_store

    md, html = report_store(store, out or Path(store).parent)
    Console().print(f"report: {md}\n        {html}")
