"""SIGKILL `tunelab compare` mid-grid and rerun: finished cells are not redone, every cell is stored once."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

from tests.compare.conftest import write_grid


def _launch(grid, out) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "tunelab.cli", "compare", "--config", str(grid), "--out", str(out),
                             "-q"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _done(store) -> dict[str, tuple[float, int]]:
    if not store.is_file():
        return {}
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    try:
        return {k: (t, a) for k, t, a in conn.execute("SELECT key, finished_at, attempts FROM cells")}
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()


def test_killed_grid_reruns_only_unfinished_cells(tmp_path):
    grid = write_grid(tmp_path, train={"steps": 6, "batch_size": 4})
    out = tmp_path / "out"
    store = out / "results.sqlite"
    process = _launch(grid, out)
    deadline = time.monotonic() + 300
    while len(_done(store)) < 2:  # let two cells finish, then kill during the third
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "no cell finished in time"
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = _done(store)
    assert 2 <= len(before) < 4

    time.sleep(2)  # the killed grid's cell process notices and exits; it must not write a row
    assert _done(store) == before
    rerun = _launch(grid, out)
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output
    assert f"{len(before)} of 4 cells already in" in " ".join(output.split())
    after = _done(store)
    assert len(after) == 4  # every cell exactly once (key is the primary key)
    for key, (finished_at, attempts) in before.items():
        assert after[key] == (finished_at, attempts) and attempts == 1  # untouched: not redone
    conn = sqlite3.connect(store)
    assert conn.execute("SELECT COUNT(*) FROM cells WHERE status = 'done'").fetchone()[0] == 4
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
