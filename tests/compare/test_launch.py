"""A grid cell with ``resources: {processes: 2}`` trains data-parallel under `accelerate launch` (gloo here)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from rich.console import Console

from tunelab.compare import compare
from tunelab.compare.launch import CONFIG_FILE, launch_command
from tunelab.compare.store import Store


def test_a_cell_asking_for_two_processes_runs_under_accelerate_launch(grid_file, tmp_path):
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("accelerate's launcher is not installed in this environment")
    grid = grid_file(seeds=[0], methods=[{"name": "prompt_tuning", "num_virtual_tokens": 4}],
                     resources={"cpus": 2, "processes": 2}, data={"max_eval": 2, "max_train": 16},
                     train={"steps": 3, "batch_size": 2, "group_by_length": False})
    outcome = compare(grid, tmp_path / "out", progress=False, console=Console(quiet=True))
    with Store(outcome.store) as store:
        (row,) = store.rows()
    assert row.status == "done", row.error
    assert row.result["train"]["processes"] == 2 and row.result["train"]["parallel"] == "MULTI_CPU"
    assert len(row.result["train"]["losses"]) == 3 and (Path(row.out_dir) / "adapter").is_dir()
    assert (Path(row.out_dir) / CONFIG_FILE).is_file()
    assert row.config["model"]["threads"] == 1  # the cell's 2 cores split between its 2 processes


def test_launch_command_names_the_process_count_and_the_cell_config(tmp_path):
    cmd = launch_command(tmp_path / CONFIG_FILE, 4)
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[-2:] == ["--config", str(tmp_path / CONFIG_FILE)] and "tunelab.cli" in cmd
