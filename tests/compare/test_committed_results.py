"""The stores committed under docs/results resume: every stored cell is a cell of the grid its README names, under
this tunelab's cell keys, so `tunelab compare` with that grid and `--out` skips it (a change to the key, the preset
or the tuning winners would otherwise rerun hours of cells without a word)."""

from __future__ import annotations

import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from rich.console import Console
from tests.conftest import shared_path

from tunelab.compare import plan, preset_path
from tunelab.compare.grid import resolve_sources
from tunelab.compare.store import Store
from tunelab.compare.tuning import optuna_path, tune_cells

ROOT = Path(__file__).resolve().parents[2]
# folder under docs/results -> (grid file, whether the store holds every cell of it)
COMMITTED = {
    "methods": (ROOT / "docs" / "results" / "methods" / "grid.yaml", True),
    "claims": (preset_path("claims"), True),
    "paper/v3": (preset_path("paper_v3"), True),  # planned cells, plus the seeds `--until decisive` added
    "paper": (preset_path("paper"), True),  # v4, plus what `--until decisive` added
    "paper/steps_pilot": (ROOT / "docs" / "results" / "paper" / "steps_pilot" / "grid.yaml", True),
    "instruction": (preset_path("instruction"), True),  # its 18 cells, the study finished
}


@pytest.mark.shared_data
@pytest.mark.parametrize("folder", sorted(COMMITTED))
def test_a_committed_store_holds_cells_of_its_grid_under_today_s_keys(folder, tmp_path, monkeypatch):
    shared_path()
    grid_file, complete = COMMITTED[folder]
    committed = ROOT / "docs" / "results" / folder / "results.sqlite"
    if not committed.is_file():
        pytest.skip(f"{committed} is not committed yet")
    monkeypatch.chdir(ROOT)  # the grids say ../shared/data: relative to a checkout
    store_path = tmp_path / "results.sqlite"  # tuning may write: work on a copy
    shutil.copy(committed, store_path)
    if optuna_path(committed).is_file():
        shutil.copy(optuna_path(committed), optuna_path(store_path))
    grid, cells = plan(grid_file, out=tmp_path)
    with Store(store_path) as db:
        trials_before = len(db.trials())
        if any(m.tune is not None for m in grid.methods):  # the stored winners, no trial run (studies finished)
            cells = tune_cells(grid, cells, db, tmp_path, store_path, console=Console(quiet=True))
        cells = resolve_sources(cells, tmp_path)
        done = {r.key for r in db.rows(status="done")}
        added = {r.key: r.data for r in db.rows(keys=sorted(done - {c.key for c in cells}))}
        assert len(db.trials()) == trials_before  # a committed study is finished: nothing ran
    keys = {c.key for c in cells}
    # cells `--until decisive` added: a planned cell under another seed (or on more test rows), today's keys too
    variants = _added_variants(cells, added.values())
    assert done and done <= keys | variants, (f"{len(done - keys - variants)} stored cells are not cells of "
                                              f"{grid_file.name} (or seeds/rows --until decisive added) any more")
    if complete:
        assert done >= keys


def _added_variants(cells, rows) -> set[str]:
    """Keys of the cells ``until: decisive`` may have added to these rows: each planned cell reseeded with a
    stored row's seed and/or evaluated on a stored row's number of test rows."""
    from tunelab.compare.adaptive import reseeded
    from tunelab.compare.grid import with_params

    rows = list(rows)
    seeds = {r["seed"] for r in rows if r.get("seed") is not None}
    evals = {((r.get("config") or {}).get("data") or {}).get("max_eval") for r in rows} - {None}
    found = set()
    for cell in cells:
        for variant in [cell] + [reseeded(cell, s, cells) for s in seeds if s != cell.seed]:
            found.add(variant.key)
            found.update(with_params(variant, {"data.max_eval": n}).key for n in evals)
    return found


@pytest.mark.parametrize("folder", sorted(COMMITTED))
def test_a_committed_store_has_every_column_of_today_s_schema(folder):
    """Opening a store adds the columns a newer tunelab has (``Store._add_new_columns``): a committed store that
    lacks one is rewritten by the first test, board or report that reads it, and the checkout is left dirty.
    Add a column, migrate the committed stores in the same commit (open each with ``Store``)."""
    from tunelab.compare.store import COLUMNS, TRIAL_COLUMNS

    committed = ROOT / "docs" / "results" / folder / "results.sqlite"
    if not committed.is_file():
        pytest.skip(f"{committed} is not committed yet")
    with closing(sqlite3.connect(f"file:{committed}?mode=ro", uri=True)) as conn:
        for table, names in (("cells", COLUMNS), ("trials", TRIAL_COLUMNS)):
            have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            assert set(names) <= have, f"{committed} {table} lacks {sorted(set(names) - have)}"


@pytest.mark.parametrize("folder", sorted(COMMITTED))
def test_the_board_s_examples_view_opens_a_committed_store(folder):
    """Every task of a committed store shows its examples from the store alone (no cells/ folder in a clone): one
    row per test example, each method's prediction and score, and the reference."""
    from tunelab.board.examples import example_frame, load_task_examples
    from tunelab.board.stores import store_rows

    committed = ROOT / "docs" / "results" / folder / "results.sqlite"
    if not committed.is_file():
        pytest.skip(f"{committed} is not committed yet")
    rows = [r for r in store_rows(committed) if r["status"] == "done"]
    with closing(sqlite3.connect(f"file:{committed}?mode=ro", uri=True)) as conn:  # packed: a clone (no cells/) reads them
        packed = {k for (k,) in conn.execute("SELECT key FROM examples")}
    assert rows and {r["key"] for r in rows} <= packed
    for task in sorted({r["task"] for r in rows}):
        data = load_task_examples(rows, task)
        frame = example_frame(data, data.order, data.methods)
        assert len(frame) == len(data.order) > 0 and frame["reference"].str.len().min() > 0
        assert all(any(c.startswith(m) for c in frame.columns) for m in data.methods)
