"""Tiny grids for the compare tests: the ~0.8M-parameter model, a few steps, a handful of examples."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

TINY_GRID = {
    "name": "tiny",
    "model": {"name": "tiny"},
    "data": {"max_eval": 6, "max_train": 16},
    "train": {"steps": 2, "batch_size": 4},
    "eval": {"batch_size": 8, "max_new_tokens": 4},
    "methods": [{"name": "icl", "k": 0, "label": "zero_shot"},
                {"name": "prompt_tuning", "num_virtual_tokens": 4, "label": "pt"}],
    "tasks": ["date_format"],
    "seeds": [0, 1],
}


def write_grid(directory: Path, **changes) -> Path:
    """TINY_GRID with top-level ``changes``, written as YAML; returns the file."""
    path = Path(directory) / "grid.yaml"
    path.write_text(yaml.safe_dump({**TINY_GRID, **changes}, sort_keys=False))
    return path


@pytest.fixture
def grid_file(tmp_path: Path):
    """``grid_file(**changes)`` -> path of TINY_GRID with those top-level changes."""
    return lambda **changes: write_grid(tmp_path, **changes)


@pytest.fixture(scope="session")
def tiny_report(tmp_path_factory):
    """A tiny grid with a learning-curve axis, run once per session: (Outcome, out dir)."""
    from rich.console import Console

    from tunelab.compare import compare

    root = tmp_path_factory.mktemp("tiny_report")
    methods = [{**TINY_GRID["methods"][0], "seeds": [0]}, TINY_GRID["methods"][1]]  # zero-shot is deterministic
    grid = write_grid(root, train_sizes=[8, 16], prompt_lengths=[2], methods=methods)
    return compare(grid, root / "out", progress=False, console=Console(quiet=True))
