"""Tiny grids for the compare tests: the ~0.8M-parameter model, a few steps, a handful of examples."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

# Set before anything imports ray (it reads them at import): no usage stats, and a test cluster on loopback.
# Ray swaps 127.0.0.1 for the machine's routable address unless "clusters" are off (its switch for
# macOS/Windows); drivers started by the tests inherit both.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

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


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for every Ray test: 2 CPUs, a 100 MB object store, loopback only, no usage stats.

    Shut down at the end of the session, which stops its raylet, GCS and worker processes.
    """
    import shutil
    import tempfile

    ray = pytest.importorskip("ray", reason="the Ray backend tests need ray: pip install 'tunelab[ray]'")
    temp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must stay under ~107 characters
    ray.init(num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False, log_to_driver=False,
             _temp_dir=temp)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def stored_form(result: dict) -> dict:
    """A cell's result.json as the store keeps it: the per-example losses move to the examples blob
    (``compare.archive.NLL_FIELDS``) and the phases gain the grid's own (``spawn``, ``other``), so compare
    without ``phases`` and with the per-example losses dropped."""
    from tunelab.compare.archive import NLL_FIELDS

    out = {k: v for k, v in result.items() if k != "phases"}
    if isinstance(out.get("generalization"), dict):
        out["generalization"] = {k: v for k, v in out["generalization"].items() if k not in NLL_FIELDS}
    return out
