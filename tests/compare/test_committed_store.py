"""A results store committed without its cells/ folder: it reports, shows examples and resumes from itself."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from rich.console import Console
from tests.compare.conftest import TINY_GRID, write_grid
from tests.compare.test_grid_transfer import METHODS as TRANSFER_METHODS
from tests.compare.test_grid_transfer import TASKS as TRANSFER_TASKS

from tunelab.compare import compare, report_store
from tunelab.compare.examples import cell_predictions, example_stats, generalization, read_predictions
from tunelab.compare.store import Store
from tunelab.errors import TunelabError

IPT = {"name": "ipt", "k": 1, "selection": "similar", "num_virtual_tokens": 4, "label": "ipt"}  # demonstrations


def _clone(run: Path, clone: Path) -> Path:
    """What a fresh clone holds of ``run``: the store file alone (the cell folders are not committed)."""
    clone.mkdir(parents=True)
    for name in ("results.sqlite", "results.sqlite-wal"):
        if (run / name).is_file():
            shutil.copy(run / name, clone / name)
    return clone / "results.sqlite"


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    """A tiny grid run in one folder, its report and examples, then its store alone in another folder."""
    from tunelab.board.examples import load_task_examples
    from tunelab.board.stores import store_rows

    root = tmp_path_factory.mktemp("committed")
    methods = [{**TINY_GRID["methods"][0], "seeds": [0]}, TINY_GRID["methods"][1], IPT]
    grid = write_grid(root, methods=methods)
    run = root / "run"
    compare(grid, run, progress=False, console=Console(quiet=True))
    md, _ = report_store(run / "results.sqlite", root / "report_run")
    examples = load_task_examples(store_rows(run / "results.sqlite"), "date_format")
    store = _clone(run, root / "clone")
    shutil.rmtree(run / "cells")  # the original files are gone: only the store's copy is left to read
    return grid, store, md.read_text(), examples


def test_a_rerun_on_the_clone_runs_nothing(committed):
    grid, store, _, _ = committed
    console = Console(record=True, width=200)
    outcome = compare(grid, store.parent, progress=False, console=console)
    assert (outcome.summary.done, outcome.summary.failed, outcome.summary.skipped) == (0, 0, 5)
    assert f"all 5 cells done in {store}" in console.export_text()
    assert not (store.parent / "cells").exists()


def test_the_report_from_the_store_alone_is_the_same(committed, tmp_path):
    _, store, md, _ = committed
    here = report_store(store, tmp_path)[0].read_text()
    assert here == md.replace(str(store.parent.parent / "run" / store.name), str(store))  # it names its store
    assert "(6 rows x 2 vs 2 seeds)" in here  # the IPT > PT test read every example of every cell


def test_board_examples_from_the_store_alone(committed):
    from tunelab.board.examples import example_frame, load_task_examples
    from tunelab.board.stores import store_rows

    _, store, _, before = committed
    rows = store_rows(store)
    assert all(r["predictions"].startswith("sqlite:") for r in rows)
    after = load_task_examples(rows, "date_format")
    assert after.order == before.order and after.methods == before.methods and after.metric == before.metric
    ids, methods = after.order, after.methods
    assert example_frame(after, ids, methods).equals(example_frame(before, ids, methods))
    assert example_frame(after, ids, methods)["demonstration"].str.len().min() > 0  # IPT's demonstrations


def test_a_transfer_cell_resumes_from_the_stored_source_adapter(tmp_path, monkeypatch):
    import tunelab.compare as compare_module

    grid = write_grid(tmp_path, methods=TRANSFER_METHODS, tasks=TRANSFER_TASKS, seeds=[0])
    first = compare(grid, tmp_path / "run", progress=False, console=Console(quiet=True))
    (source,) = [c for c in first.cells if c.method == "pt"]
    (transfer,) = [c for c in first.cells if c.method == "transfer"]
    with Store(first.store) as db:
        expected = db.rows(keys=[transfer.key])[0].metrics
        # kept while a cell of the grid starts from it: `--until decisive` may run the transfer on more test rows
        assert db.size()["adapters"] > 0

    real = compare_module.run_grid

    def interrupted(grid_config, wave, *args, **kwargs):  # Ctrl-C as the transfer cell's wave starts
        if any(c.key == transfer.key for c in wave):
            raise KeyboardInterrupt
        return real(grid_config, wave, *args, **kwargs)

    monkeypatch.setattr(compare_module, "run_grid", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compare(grid, tmp_path / "second", progress=False, console=Console(quiet=True))
    monkeypatch.undo()
    clone = _clone(tmp_path / "second", tmp_path / "clone")  # what a session that ran out of time commits
    shutil.rmtree(tmp_path / "second" / "cells")
    with Store(clone) as db:
        assert db.status(transfer.key) is None and db.size()["adapters"] > 0

    outcome = compare(grid, clone.parent, progress=False, console=Console(quiet=True))
    assert (outcome.summary.done, outcome.summary.failed, outcome.summary.skipped) == (1, 0, 2)
    assert (clone.parent / "cells" / source.key / "adapter" / "tunelab_adapter.json").is_file()
    with Store(clone) as db:
        assert db.rows(keys=[transfer.key])[0].metrics == expected  # started from the very same prompt
        assert db.size()["adapters"] > 0
    (tmp_path / "other").mkdir()
    other = write_grid(tmp_path / "other", methods=TRANSFER_METHODS[:2], tasks=TRANSFER_TASKS, seeds=[0])
    compare(other, clone.parent, progress=False, console=Console(quiet=True))  # the same cells less the transfer
    with Store(clone) as db:  # another grid on the store keeps it too: the stored transfer cell starts from it
        assert db.size()["adapters"] > 0
        db.conn.execute("DELETE FROM cells WHERE key = ?", (transfer.key,))
    compare(other, clone.parent, progress=False, console=Console(quiet=True))
    with Store(clone) as db:
        assert db.size()["adapters"] == 0  # dropped once no planned or stored cell starts from it

    shutil.rmtree(clone.parent / "cells")  # and a store without that adapter says which cell lacks it
    with pytest.raises(TunelabError, match=f"starts from cell {source.key}.*DELETE FROM cells WHERE key='{source.key}'"):
        compare(grid, clone.parent, progress=False, console=Console(quiet=True))


PREDICTIONS = [{"id": f"e{i}", "task": "t", "prediction": f"p{i}", "references": [f"r{i}", "alt"],
                "scores": {"exact_match": 100.0 * (i % 2)}, "ranked_prediction": "a", "option_logprobs": [-1.0, -2.0],
                "demo_similarity": 0.5, "demonstrations": [{"id": "d", "instruction": "", "input": "x", "output": "y"}]}
               for i in range(4)]
GENERALIZATION = {"train_loss": 1.0, "eval_loss": 2.0, "gap": 1.0, "train_nll": [[3.0, 2]] * 4,
                  "eval_nll": [[4.0, 2]] * 4}


def _row(tmp_path: Path, key: str = "0123456789abcdef") -> dict:
    folder = tmp_path / "cells" / key
    return {"key": key, "grid": "g", "method": "m", "method_name": "icl", "task": "t", "seed": 0, "status": "done",
            "config": {"method": {"name": "icl"}, "model": {"name": "tiny"}}, "metrics": {"exact_match": 50.0},
            "primary_metric": "exact_match",
            "quality": 50.0, "predictions": str(folder / "predictions.jsonl"), "out_dir": str(folder),
            "result": {"metrics": {"exact_match": 50.0}, "generalization": GENERALIZATION}}


def _write_predictions(row: dict) -> None:
    path = Path(row["predictions"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in PREDICTIONS))


def _kept(rows) -> list[dict]:
    """What a store keeps of a predictions row: every field a reader uses, nothing else."""
    return [{k: v for k, v in r.items() if k not in ("task", "option_logprobs")}
            | {"demonstrations": [{"input": "x", "output": "y"}]} for r in rows]


def test_a_recorded_cell_keeps_its_examples_and_losses_in_the_store(tmp_path):
    row = _row(tmp_path)
    _write_predictions(row)
    with Store(tmp_path / "results.sqlite") as db:
        db.record(row)
        (stored,) = db.rows()
        assert stored.predictions == row["predictions"]  # the file while it exists
        assert stored.result["generalization"] == {"train_loss": 1.0, "eval_loss": 2.0, "gap": 1.0}  # means only
        shutil.rmtree(tmp_path / "cells")
        (stored,) = db.rows()
        assert stored.predictions == f"sqlite:{(tmp_path / 'results.sqlite').resolve()}#{row['key']}"
        assert list(read_predictions(stored.predictions)) == _kept(PREDICTIONS)
        assert generalization(stored.data) == GENERALIZATION
        ids, stats, _ = example_stats(stored.data, "exact_match")
        assert ids == ["e0", "e1", "e2", "e3"] and stats[:, 0].tolist() == [0.0, 100.0, 0.0, 100.0]
        db.record({**_row(tmp_path, "fedcba9876543210"), "predictions": None})
        size = db.size()
        assert size["cells"] == 2 and 0 < size["examples"] + size["references"] < size["total"]
        refs = db.conn.execute("SELECT COUNT(*) FROM shared").fetchone()[0]
        assert refs == 1 and size["adapters"] == 0


def test_a_packed_cell_is_read_from_its_store_when_its_folder_holds_another_run(tmp_path):
    """Two grids share a cell key (the same configuration) and a cell folder: the second grid's run rewrote the
    predictions file at the path the first store recorded. The first store still reads what it recorded."""
    row = _row(tmp_path)
    _write_predictions(row)
    with Store(tmp_path / "results.sqlite") as db:
        db.record(row)
    rerun = [{**p, "prediction": "another run", "scores": {"exact_match": 0.0}} for p in PREDICTIONS]
    Path(row["predictions"]).write_text("".join(json.dumps(p) + "\n" for p in rerun))
    with Store(tmp_path / "results.sqlite") as db:
        (stored,) = db.rows()
        assert stored.predictions == row["predictions"]  # the path still names the file (for people and tools)
        assert list(cell_predictions(stored.data)) == _kept(PREDICTIONS)  # what the analyses read
        ids, stats, _ = example_stats(stored.data, "exact_match")
        assert stats[:, 0].tolist() == [0.0, 100.0, 0.0, 100.0]  # not the other run's zeros
    unpacked = {**stored.data, "examples": None}  # a row of an older store, never packed: its file
    assert [p["prediction"] for p in cell_predictions(unpacked)] == ["another run"] * 4


def test_an_old_store_opens_reads_its_files_and_packs_them(tmp_path):
    path = tmp_path / "results.sqlite"
    row = _row(tmp_path)
    with Store(path) as db:
        db.record(row)  # before its predictions exist: nothing to pack, as an older tunelab stored every cell
    _write_predictions(row)
    with sqlite3.connect(path) as conn:  # the schema of an older tunelab
        for table in ("examples", "shared", "adapters"):
            conn.execute(f"DROP TABLE {table}")
    with Store(path) as db:
        (stored,) = db.rows()
        assert stored.examples is None and stored.predictions == row["predictions"]
        assert read_predictions(stored.predictions)[0]["option_logprobs"] == [-1.0, -2.0]  # the file itself
        assert generalization(stored.data) == GENERALIZATION
        assert db.pack() == 1 and db.pack() == 0
    shutil.rmtree(tmp_path / "cells")
    with Store(path) as db:
        (stored,) = db.rows()
        assert list(read_predictions(stored.predictions)) == _kept(PREDICTIONS)
        assert generalization(stored.data) == GENERALIZATION and "eval_nll" not in stored.result["generalization"]


def test_a_store_moved_with_its_cells_reads_them_there(tmp_path):
    row = _row(tmp_path / "elsewhere")  # paths of the machine that ran it
    with Store(tmp_path / "results.sqlite") as db:
        db.record(row)
        _write_predictions({**row, "predictions": str(tmp_path / "cells" / row["key"] / "predictions.jsonl")})
        (stored,) = db.rows()
        assert stored.predictions == str((tmp_path / "cells" / row["key"] / "predictions.jsonl").resolve())
        assert stored.out_dir == str((tmp_path / "cells" / row["key"]).resolve())


def test_a_cell_shipped_back_by_a_ray_worker_is_packed_when_recorded(tmp_path):
    from tunelab.compare import remote

    worker = _row(tmp_path / "worker")  # the worker's scratch paths
    _write_predictions(worker)
    shipped = {**worker, "files": remote.pack(Path(worker["out_dir"]))}
    shutil.rmtree(tmp_path / "worker")
    row = remote.land(shipped, tmp_path / "out", worker["config"])
    with Store(tmp_path / "out" / "results.sqlite") as db:
        db.record(row)
    shutil.rmtree(tmp_path / "out" / "cells")
    with Store(tmp_path / "out" / "results.sqlite") as db:
        (stored,) = db.rows()
        assert list(read_predictions(stored.predictions)) == _kept(PREDICTIONS)


def test_report_pack_packs_an_old_store_then_reports_without_its_files(tmp_path, capsys):
    from tests.compare.test_report import _quality_store

    from tunelab.commands.compare import report_command

    _quality_store(tmp_path).close()
    with sqlite3.connect(tmp_path / "results.sqlite") as conn:  # as an older tunelab wrote it: paths only
        for table in ("examples", "shared", "adapters"):
            conn.execute(f"DROP TABLE {table}")
    report_command(str(tmp_path), out=str(tmp_path / "before"), pack=True)
    assert "packed 8 cells into" in capsys.readouterr().out
    for file in tmp_path.glob("*.jsonl"):  # the predictions files are gone
        file.unlink()
    report_command(str(tmp_path), out=str(tmp_path / "after"))
    before, after = ((tmp_path / d / "report.md").read_text().split("## Claims")[1] for d in ("before", "after"))
    assert after == before and "80 x 2/2" in after
