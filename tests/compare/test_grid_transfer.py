"""Grid cells that start from another cell's adapter: `init_from: {cell: {method, task}}`."""

from __future__ import annotations

import json
import sqlite3

import pytest
from tests.compare.conftest import write_grid

from tunelab.compare.grid import expand, parse_grid, resolve_sources, waves
from tunelab.errors import ConfigError

TRANSFER = {"name": "ipt", "label": "transfer", "num_virtual_tokens": 4, "k": 1, "selection": "similar",
            "init_from": {"cell": {"method": "pt", "task": "date_format"}}, "train": {"steps": 0},
            "tasks": ["entity_extraction"], "seeds": [0]}
METHODS = [{"name": "prompt_tuning", "num_virtual_tokens": 4, "label": "pt", "tasks": ["date_format"]},
           {"name": "icl", "k": 1, "selection": "similar", "label": "icl_retrieved", "tasks": ["entity_extraction"],
            "seeds": [0]}, TRANSFER]
TASKS = ["date_format", "entity_extraction"]


def test_cell_reference_is_checked():
    with pytest.raises(ConfigError, match="no method labelled 'lora'"):
        parse_grid({"methods": [{**TRANSFER, "init_from": {"cell": {"method": "lora", "task": "date_format"}}}],
                    "tasks": TASKS})
    with pytest.raises(ConfigError, match="init_from"):
        parse_grid({"methods": [*METHODS[:2], {**TRANSFER, "init_from": {"cell": "pt"}}], "tasks": TASKS})


def test_reference_resolves_to_the_source_cell_and_runs_after_it(tmp_path):
    grid = parse_grid({"methods": METHODS, "tasks": TASKS, "seeds": [0, 1]})
    cells = resolve_sources(expand(grid), tmp_path)
    (transfer,) = [c for c in cells if c.method == "transfer"]
    source = next(c for c in cells if c.method == "pt" and c.seed == 0)
    assert transfer.source_key == source.key
    assert transfer.config.method.init_from == str(tmp_path.resolve() / "cells" / source.key)
    first, later = waves(cells)
    assert later == [transfer] and source in first
    other = resolve_sources(expand(grid), tmp_path / "elsewhere")
    assert [c.key for c in other] == [c.key for c in cells]  # the key counts the source's key, not the path


def test_transfer_cell_runs_on_the_tiny_model_and_gets_a_verdict(tmp_path):
    from rich.console import Console

    from tunelab.compare import compare

    grid = write_grid(tmp_path, methods=METHODS, tasks=TASKS, seeds=[0])
    outcome = compare(grid, tmp_path / "out", progress=False, console=Console(quiet=True))
    assert outcome.summary.failed == 0 and outcome.summary.done == 3
    conn = sqlite3.connect(outcome.store)
    rows = {m: (json.loads(c), f) for m, c, f in conn.execute("SELECT method, config, finished_at FROM cells")}
    assert rows["transfer"][0]["method"]["init_from"].endswith(next(c.key for c in outcome.cells if c.method == "pt"))
    assert rows["transfer"][1] > rows["pt"][1]  # ran after its source
    report = outcome.report_md.read_text()
    line = next(x for x in report.splitlines() if x.startswith("| source-task prompt"))
    assert "not measured" not in line
