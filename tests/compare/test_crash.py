"""`tunelab compare` SIGKILLed at three random points, then rerun: every cell stored exactly once, none partial."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.compare.conftest import stored_form, write_grid

from tunelab.checkpoint import latest_checkpoint

STEPS = 40  # long enough that a kill "a moment into the next cell" never finds the grid done
REQUIRED = ("key", "grid", "method", "task", "seed", "status", "config", "metrics", "primary_metric", "quality",
            "predictions", "out_dir", "n_eval", "trainable_params", "train_seconds", "eval_seconds", "result",
            "finished_at")


def _launch(grid: Path, out: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as f:  # a file, not a pipe nobody reads while waiting (a full pipe blocks the grid)
        return subprocess.Popen([sys.executable, "-m", "tunelab.cli", "compare", "--config", str(grid), "--out",
                                 str(out), "-q"], env=env, stdout=f, stderr=f,
                                start_new_session=True)  # its own process group: the cells and fork server with it


def _rows(store: Path) -> int:
    if not store.is_file():
        return 0
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
    except sqlite3.OperationalError:  # the schema is not created yet
        return 0
    finally:
        conn.close()


def _training_step(out: Path, since: float) -> int:
    """The furthest checkpoint written after ``since`` by any cell (0 if none)."""
    steps = [latest_checkpoint(d) for d in (out / "cells").glob("*/checkpoint")] if (out / "cells").is_dir() else []
    return max((int(p.name.split("-")[1]) for p in steps if p is not None and p.stat().st_mtime > since), default=0)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 240) -> bool:
    """Poll ``condition`` until it holds (True) or the process ends on its own (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, "no progress within the timeout"
        time.sleep(0.01)
    return True


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the grid process only, as the OOM killer would; its cells must then stop on their own."""
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError("cell processes kept running after the grid process was killed")


def test_compare_killed_three_times_stores_every_cell_exactly_once(tmp_path):
    grid = write_grid(tmp_path, model={"name": "tiny", "threads": 1}, data={"max_eval": 2, "max_train": 16},
                      train={"steps": STEPS, "batch_size": 4, "checkpoint_every": 1})
    out, rng = tmp_path / "out", random.Random(2302)
    store = out / "results.sqlite"
    kills = []
    for _ in range(3):
        started, before = time.time(), _rows(store)
        log = tmp_path / f"grid-{len(kills)}.log"
        process = _launch(grid, out, log)
        if rng.random() < 0.5:  # mid-training of a prompt-tuning cell, at a random step
            point, step = "training", rng.randint(2, STEPS - 4)
            reached = _wait_for(lambda s=step, t=started, b=before: _training_step(out, t) >= s or _rows(store) > b + 1, process)
        else:  # just after a cell's row is committed, plus a random moment into the next cell
            point, delay = "after a row", rng.uniform(0.0, 0.5)
            reached = _wait_for(lambda b=before: _rows(store) > b, process)
            time.sleep(delay)
        if not reached or process.poll() is not None:
            raise AssertionError(f"the grid finished before kill {len(kills) + 1} ({point}): {log.read_text()[-3000:]}")
        _kill_group(process)
        kills.append((point, _rows(store)))

    final = _launch(grid, out, tmp_path / "grid-final.log")
    assert final.wait(timeout=600) == 0, (tmp_path / "grid-final.log").read_text()[-3000:]
    assert kills[-1][1] < 4, f"all cells were stored before the last kill: {kills}"

    conn = sqlite3.connect(store)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.row_factory = sqlite3.Row
    rows = conn.execute("SELECT * FROM cells").fetchall()
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 4, kills
    assert {(r["method"], r["seed"]) for r in rows} == {(m, s) for m in ("zero_shot", "pt") for s in (0, 1)}
    for row in rows:
        assert row["status"] == "done", row["error"]
        assert all(row[c] is not None for c in REQUIRED), {c: row[c] for c in REQUIRED if row[c] is None}
        result = json.loads(row["result"])
        assert result["metrics"] == json.loads(row["metrics"]) and Path(row["predictions"]).is_file()
        assert stored_form(json.loads((Path(row["out_dir"]) / "result.json").read_text())) == stored_form(result)
        if row["method"] == "pt":
            assert len(result["train"]["losses"]) == STEPS and not (Path(row["out_dir"]) / "checkpoint").exists()
