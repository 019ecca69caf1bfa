"""A cell's cost by phase (tunelab.phases): recorded in result.json and the store, shown in the report; the fork
server's preloads; a killed cell fails alone; tuning trials skip the passes nobody reads; the bench's subset."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from rich.console import Console

from tunelab import phases
from tunelab.compare import compare
from tunelab.compare.store import Store

QUIET = Console(quiet=True)
ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    """perf_counter and process_time that move only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_nested_phase_is_taken_out_of_the_outer_one(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(phases.time, "perf_counter", fake)
    monkeypatch.setattr(phases.time, "process_time", fake)
    clock = phases.PhaseClock()
    with clock.phase("train"):
        fake.now += 5
        with clock.phase("dev_loss"):
            fake.now += 2
        fake.now += 3
    with clock.phase("save"):
        fake.now += 1
    with clock.phase("save"):  # a phase entered twice adds up
        fake.now += 1
    assert clock.record() == {"wall": {"train": 8.0, "dev_loss": 2.0, "save": 2.0},
                              "cpu": {"train": 8.0, "dev_loss": 2.0, "save": 2.0}}


def test_a_cells_phases_add_up_to_its_wall_and_cpu():
    run = {"wall": {"data": 1.0, "train": 6.0}, "cpu": {"data": 1.5, "train": 11.0}}
    cell = phases.of_cell(run, spawn=0.5, cell_seconds=10.0, cpu_seconds=14.0)
    assert cell == {"wall": {"spawn": 0.5, "data": 1.0, "train": 6.0, "other": 2.5},
                    "cpu": {"data": 1.5, "train": 11.0, "other": 1.5}}
    assert phases.overhead(cell["wall"]) == 4.0  # all but train (and build, eval)
    assert phases.of_cell(None, None, 3.0, None) == {"wall": {"other": 3.0}, "cpu": {}}


@pytest.fixture(scope="module")
def phased_grid(tmp_path_factory):
    from tests.compare.conftest import TINY_GRID, write_grid

    root = tmp_path_factory.mktemp("phases")
    outcome = compare(write_grid(root, seeds=[0], methods=TINY_GRID["methods"]), root / "out", progress=False,
                      console=QUIET)
    with Store(outcome.store) as store:
        rows = {r.method: r for r in store.rows()}
    return outcome, rows


def test_every_cell_records_its_phases_and_they_sum_to_at_most_its_wall(phased_grid):
    outcome, rows = phased_grid
    assert set(rows) == {"zero_shot", "pt"} and {r.status for r in rows.values()} == {"done"}
    for row in rows.values():
        wall, cpu = row.result["phases"]["wall"], row.result["phases"]["cpu"]
        assert {"spawn", "data", "model_load", "build", "demonstrations", "eval", "save", "other"} <= set(wall)
        assert set(wall) <= set(phases.PHASES) and all(v >= 0 for v in wall.values())
        assert sum(wall.values()) <= row.cell_seconds + 0.01  # rounding of each phase to the millisecond
        assert sum(wall.values()) == pytest.approx(row.cell_seconds, abs=0.01)  # `other` takes the rest
        assert "other" in cpu and sum(cpu.values()) == pytest.approx(row.cpu_seconds, abs=0.01)
        on_disk = json.loads((Path(row.out_dir) / "result.json").read_text())["phases"]
        assert "spawn" not in on_disk["wall"] and on_disk["wall"]["eval"] == wall["eval"]  # the run's own
    assert {"train", "generalization", "forgetting"} <= set(rows["pt"].result["phases"]["wall"])
    assert "train" not in rows["zero_shot"].result["phases"]["wall"]  # a method that does not train


def test_the_report_shows_the_mean_phases_per_method(phased_grid):
    outcome, _ = phased_grid
    report = outcome.report_md.read_text()
    assert "## Cost per cell by phase" in report
    section = report.split("## Cost per cell by phase")[1].split("\n## ")[0]
    assert "| method | cells | cell s | spawn | data | model_load |" in section
    assert "| pt | 1 |" in section and "| zero_shot | 1 |" in section and "overhead" in section


def test_a_report_of_cells_without_phases_says_so():
    from tunelab.compare.report import _phases

    assert "No cell recorded its phases" in _phases([{"method": "pt", "result": {}, "cell_seconds": 3.0}])[0]


def _imported_at_start(path: str) -> None:
    Path(path).write_text(json.dumps(sorted(m for m in ("peft", "sacrebleu", "optuna") if m in sys.modules)))


def test_cells_start_with_the_libraries_most_of_them_import(tmp_path):
    """The fork server imported peft, sacrebleu (and optuna where installed): a cell does not import them again."""
    from tunelab.compare.runner import _context

    process = _context().Process(target=_imported_at_start, args=(str(tmp_path / "modules.json"),))
    process.start()
    process.join(120)
    expected = ["peft", "sacrebleu"] + (["optuna"] if _installed("optuna") else [])
    assert json.loads((tmp_path / "modules.json").read_text()) == sorted(expected)


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_a_killed_cell_is_recorded_failed_and_the_next_cell_still_runs(grid_file, tmp_path):
    """SIGKILL of a cell's process (as the OOM killer would): that cell fails with the reason, the grid goes on."""
    grid = grid_file(seeds=[0], train={"steps": 400, "batch_size": 4},  # long enough to be killed mid-training
                     methods=[{"name": "prompt_tuning", "num_virtual_tokens": 4, "label": "pt"},
                              {"name": "icl", "k": 0, "label": "zero_shot"}])
    me, killed = psutil.Process(), []

    def kill_first_cell() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            for server in me.children():  # the fork server; its children are the cells
                for cell in server.children():
                    if (tmp_path / "out" / "cells").is_dir() and any((tmp_path / "out" / "cells").glob("*/train_log.jsonl")):
                        cell.send_signal(signal.SIGKILL)
                        killed.append(cell.pid)
                        return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_first_cell, daemon=True)
    killer.start()
    outcome = compare(grid, tmp_path / "out", progress=False, console=QUIET)
    killer.join(5)
    assert killed, "the first cell was never seen running"
    assert (outcome.summary.done, outcome.summary.failed) == (1, 1)
    with Store(outcome.store) as store:
        (failed,) = store.rows(status="failed")
        (done,) = store.rows(status="done")
    assert failed.method == "pt" and "killed by signal 9" in failed.error
    assert done.method == "zero_shot" and done.result["phases"]["wall"]["eval"] >= 0


def test_the_bench_cuts_a_preset_to_the_cells_asked_for():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import yaml
    from bench_cells import subset, summarise

    from tunelab.compare.grid import preset_path

    raw = yaml.safe_load(preset_path("paper_v2").read_text())
    grid = subset(raw, ["pt", "lora"], ["e2e"], [0], tune=False, root=ROOT)
    assert [m["label"] for m in grid["methods"]] == ["pt"]  # lora runs on spider only
    assert "tune" not in grid["methods"][0] and grid["seeds"] == [0]
    assert [t["name"] for t in grid["tasks"]] == ["e2e"] and Path(grid["tasks"][0]["task"]).is_absolute()
    rows = [{"status": "done", "method": "pt", "cpu_seconds": 1800.0, "cell_seconds": 900.0,
             "result": {"phases": {"wall": {"train": 800.0, "other": 100.0}, "cpu": {"train": 1700.0}}}},
            {"status": "failed", "method": "pt"}]
    summary = summarise(rows, grid_seconds=1200.0)
    assert summary["cells_per_cpu_hour"] == 2.0 and summary["cells"] == 1 and summary["failed"] == 1
    assert summary["methods"]["pt"]["wall.train"] == 800.0 and summary["cells_per_hour"] == 3.0
