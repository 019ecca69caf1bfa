"""`tunelab compare --backend ray` on a local 2-CPU Ray cluster (one per session): same store as one worker,
a SIGKILLed Ray worker's cell is retried and stored exactly once, outputs come back without shared storage."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console
from tests.compare.conftest import stored_form

from tunelab.checkpoint import latest_checkpoint
from tunelab.compare import compare
from tunelab.compare.remote import WORKER_FILE
from tunelab.compare.store import Store

pytestmark = pytest.mark.ray
QUIET = Console(quiet=True)
ONE_THREAD = {"name": "tiny", "threads": 1}  # same thread count both ways: same float rounding


def _rows(store: Path) -> dict:
    with Store(store) as db:
        return {r.key: r for r in db.rows()}


def _predictions(row) -> list[dict]:
    return [json.loads(x) for x in Path(row.predictions).read_text().splitlines()]


def _assert_same(a: dict, b: dict, n: int = 2) -> None:
    assert a.keys() == b.keys() and len(a) >= n
    for key in a:
        assert b[key].status == "done", b[key].error
        assert a[key].metrics == b[key].metrics
        assert a[key].result["train"]["losses"] == b[key].result["train"]["losses"]
        assert _predictions(a[key]) == _predictions(b[key])


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The tiny grid with --workers 1, once for the module: (grid file, rows by key)."""
    from tests.compare.conftest import write_grid

    root = tmp_path_factory.mktemp("serial")
    grid = write_grid(root, model=ONE_THREAD)
    outcome = compare(grid, root / "out", progress=False, console=QUIET, workers=1)
    return grid, _rows(outcome.store)


def test_ray_backend_stores_what_one_worker_stores(ray_cluster, serial, tmp_path):
    grid, expected = serial
    outcome = compare(grid, tmp_path / "out", progress=False, console=QUIET, backend="ray")
    assert (outcome.summary.done, outcome.summary.failed) == (4, 0)
    rows = _rows(outcome.store)
    _assert_same(expected, rows)
    for row in rows.values():  # each cell ran in a Ray worker process, and its files are under the grid's folder
        worker = json.loads((Path(row.out_dir) / WORKER_FILE).read_text())
        assert worker["pid"] != os.getpid() and Path(row.out_dir).parent == tmp_path / "out" / "cells"
        assert row.attempts == 1 and row.cpu_seconds > 0
    rerun = compare(grid, tmp_path / "out", progress=False, console=QUIET, backend="ray")
    assert (rerun.summary.done, rerun.summary.skipped) == (0, 4)


def test_outputs_return_to_the_driver_without_shared_storage(ray_cluster, serial, tmp_path):
    """storage=return (what a node that cannot see OUT gets): the cell runs in a scratch folder on the
    worker and its folder is shipped back and unpacked under OUT/cells; the store names the driver's paths."""
    from tunelab.compare.backends import RayBackend

    grid, expected = serial
    backend = RayBackend(storage="return")
    outcome = compare(grid, tmp_path / "out", overrides=["seeds=[0]"], progress=False, console=QUIET, backend=backend)
    rows = _rows(outcome.store)  # the seed-0 half of the grid: the same cell keys as in the serial run
    _assert_same({k: expected[k] for k in rows}, rows)
    for row in rows.values():
        out = tmp_path / "out" / "cells" / row.key
        assert row.out_dir == str(out) and row.config["out"] == str(out) and Path(row.predictions).parent == out
        assert "tunelab-cell-" in row.result["config"]["out"]  # it really ran elsewhere
        assert stored_form(json.loads((out / "result.json").read_text())) == stored_form(row.result)
    pt = [r for r in rows.values() if r.method == "pt"]
    assert all((Path(r.out_dir) / "adapter").is_dir() for r in pt)


def test_cli_joins_a_running_cluster_by_address(ray_cluster, serial, tmp_path):
    """`tunelab compare --backend ray --address HOST:PORT` from another process: a second driver on the cluster."""
    from tests.compare.conftest import TINY_GRID, write_grid

    _, expected = serial
    grid = write_grid(tmp_path, model=ONE_THREAD, seeds=[0], methods=TINY_GRID["methods"][:1])  # one serial cell
    address = ray_cluster.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:")  # the test cluster stays on loopback
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "tunelab.cli", "compare", "--config", str(grid), "--out",
                           str(tmp_path / "out"), "-q", "--backend", "ray", "--address", address],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 cells run, 0 failed" in " ".join(done.stdout.split())
    rows = _rows(tmp_path / "out" / "results.sqlite")
    _assert_same({k: expected[k] for k in rows}, rows, n=1)


STEPS = 20
REQUIRED = ("key", "grid", "method", "task", "seed", "status", "config", "metrics", "primary_metric", "quality",
            "predictions", "out_dir", "n_eval", "trainable_params", "train_seconds", "eval_seconds", "result",
            "finished_at")


def _training(out: Path) -> tuple[Path, int] | None:
    """A cell folder whose Ray worker has written a checkpoint past step 2, and that worker's pid."""
    for cell in sorted((out / "cells").glob("*")) if (out / "cells").is_dir() else []:
        step = latest_checkpoint(cell / "checkpoint") if (cell / "checkpoint").is_dir() else None
        if step is not None and int(step.name.split("-")[1]) >= 3 and (cell / WORKER_FILE).is_file():
            return cell, json.loads((cell / WORKER_FILE).read_text())["pid"]
    return None


def test_killed_ray_worker_is_retried_and_its_cell_stored_once(ray_cluster, tmp_path):
    from tests.compare.conftest import write_grid

    grid = write_grid(tmp_path, model=ONE_THREAD, data={"max_eval": 2, "max_train": 16},
                      methods=[{"name": "prompt_tuning", "num_virtual_tokens": 4, "label": "pt"}],
                      train={"steps": STEPS, "batch_size": 4, "checkpoint_every": 1})  # 2 cells, one per worker
    out = tmp_path / "out"
    outcome: dict = {}
    driver = threading.Thread(target=lambda: outcome.update(
        result=compare(grid, out, progress=False, console=QUIET, backend="ray")), daemon=True)
    driver.start()
    deadline = time.monotonic() + 300
    while (found := _training(out)) is None:
        assert driver.is_alive(), "the grid ended before any cell reached step 3"
        assert time.monotonic() < deadline, "no cell reached training step 3 in time"
        time.sleep(0.05)
    cell, pid = found
    os.kill(pid, signal.SIGKILL)  # the Ray worker process itself (its cell's child process follows it)
    driver.join(timeout=600)
    assert not driver.is_alive() and "result" in outcome, "the grid did not finish after the kill"
    summary = outcome["result"].summary
    assert (summary.done, summary.failed) == (2, 0), summary.failures

    retried = json.loads((cell / WORKER_FILE).read_text())
    assert retried["pid"] != pid  # a new worker ran the cell again
    conn = sqlite3.connect(out / "results.sqlite")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.row_factory = sqlite3.Row
    rows = conn.execute("SELECT * FROM cells").fetchall()
    assert len(rows) == 2 and len({r["key"] for r in rows}) == 2  # every cell exactly once
    for row in rows:
        assert row["status"] == "done" and row["attempts"] == 1, row["error"]
        assert all(row[c] is not None for c in REQUIRED), {c: row[c] for c in REQUIRED if row[c] is None}
        result = json.loads(row["result"])
        assert stored_form(json.loads((Path(row["out_dir"]) / "result.json").read_text())) == stored_form(result)
        assert len(result["train"]["losses"]) == STEPS  # one full curve, and no checkpoint left behind
        assert not (Path(row["out_dir"]) / "checkpoint").exists()
    (killed,) = [json.loads(r["result"]) for r in rows if Path(r["out_dir"]) == cell]
    assert killed["train"]["resumed_from"] >= 3  # the retry went on from the killed attempt's checkpoint


def test_resources_no_node_has_are_refused(ray_cluster):
    from tunelab.compare.backends import RayBackend, Resources
    from tunelab.errors import TunelabError

    backend = RayBackend()
    with pytest.raises(TunelabError, match="resources.gpus: a cell asks for 1 GPUs but no node"):
        backend.submit("x", print, resources=Resources(cpus=1, gpus=1))
    with pytest.raises(TunelabError, match="resources.cpus"):
        backend.submit("x", print, resources=Resources(cpus=3, gpus=0))
    assert backend.defaults() == Resources(cpus=1, gpus=0)  # a CPU-only cluster: one core per cell
