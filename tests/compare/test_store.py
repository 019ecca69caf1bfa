"""The sqlite results store: WAL, complete rows only, resumable status, several writer processes."""

from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from tunelab.compare.store import Store, open_existing
from tunelab.errors import TunelabError


def _row(key: str, status: str = "done", **extra) -> dict:
    return {"key": key, "grid": "g", "method": "m", "method_name": "icl", "task": "t", "seed": 0,
            "status": status, "config": {"method": {"name": "icl"}}, "metrics": {"exact_match": 50.0},
            "primary_metric": "exact_match", "quality": 50.0, **extra}


def test_wal_mode_and_roundtrip(tmp_path):
    with Store(tmp_path / "s.sqlite") as store:
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.status("a") is None
        store.record(_row("a"))
        store.record(_row("b", "failed", error="ValueError: boom"))
        assert store.status("a") == "done" and store.status("b") == "failed"
        assert store.count() == {"done": 1, "failed": 1}
        (a,) = store.rows(status="done")
        assert a.metrics == {"exact_match": 50.0} and a.config["method"]["name"] == "icl" and a.attempts == 1


def test_rerecording_a_cell_replaces_it_and_counts_attempts(tmp_path):
    with Store(tmp_path / "s.sqlite") as store:
        store.record(_row("a", "failed", error="x"))
        store.record(_row("a"))
        rows = store.rows()
        assert len(rows) == 1 and rows[0].status == "done" and rows[0].attempts == 2


def test_status_is_constrained(tmp_path):
    with Store(tmp_path / "s.sqlite") as store, pytest.raises(sqlite3.IntegrityError):
        store.record(_row("a", status="running"))
    with Store(tmp_path / "s.sqlite") as store:
        assert store.rows() == []  # the failed insert left nothing behind


def test_report_needs_an_existing_store(tmp_path):
    with pytest.raises(TunelabError, match="no results store"):
        open_existing(tmp_path / "missing.sqlite")


def _writer(path: str, worker: int, n: int) -> None:
    with Store(path) as store:
        for i in range(n):
            store.record(_row(f"w{worker}-{i}", seed=i))


def test_several_writer_processes(tmp_path):
    path = str(tmp_path / "s.sqlite")
    Store(path).close()
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per writer, as separate grid workers are
    procs = [ctx.Process(target=_writer, args=(path, w, 40)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with Store(path) as store:
        keys = [r.key for r in store.rows()]
    assert sorted(keys) == sorted(f"w{w}-{i}" for w in range(3) for i in range(40))


def _older_store(tmp_path, *statements: str):
    """A store file written by an older tunelab: only ``statements`` ran on it."""
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()
    return path


def test_older_store_gains_new_columns(tmp_path):
    path = _older_store(tmp_path, "CREATE TABLE cells (key TEXT PRIMARY KEY, grid TEXT NOT NULL, method TEXT NOT NULL, "
                        "method_name TEXT NOT NULL, task TEXT NOT NULL, seed INTEGER NOT NULL, status TEXT NOT NULL, "
                        "config TEXT NOT NULL, finished_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 1)")
    with Store(path) as store:
        store.record(_row("a", cpu_seconds=1.5))
        assert store.rows()[0].cpu_seconds == 1.5


def test_a_trials_table_without_pruning_columns_gains_them(tmp_path):
    path = _older_store(tmp_path,
                        "CREATE TABLE trials (study TEXT NOT NULL, key TEXT NOT NULL, number INTEGER NOT NULL, "
                        "params TEXT NOT NULL, status TEXT NOT NULL, metric TEXT, dev_score REAL, cpu_seconds REAL, "
                        "out_dir TEXT, finished_at REAL NOT NULL, PRIMARY KEY (study, key))",
                        "INSERT INTO trials VALUES ('s', 'k0', 0, '{\"train.lr\": 0.1}', 'done', 'bleu', 3.0, 1.0, NULL, 0)")
    with Store(path) as store:
        store.record_trial({"study": "s", "key": "k1", "number": 1, "params": {"train.lr": 1.0}, "status": "pruned",
                            "dev_loss": 2.5, "dev_losses": [(1, 2.0), (2, 2.5)], "pruned_step": 2, "cpu_seconds": 0.4})
        old, pruned = store.trials("s")
        assert old["dev_loss"] is None and old["dev_losses"] == [] and old["dev_score"] == 3.0
        assert pruned["status"] == "pruned" and pruned["dev_losses"] == [(1, 2.0), (2, 2.5)]
        assert pruned["pruned_step"] == 2 and store.trial("s", "k1")["dev_loss"] == 2.5


def test_task_tags_merge_across_grids(tmp_path):
    with Store(tmp_path / "results.sqlite") as store:
        assert store.task_tags() == {}
        store.add_task_tags({"spider": ["reasoning"], "e2e": []})
        store.add_task_tags({"e2e": ["data-to-text"]})
    with Store(tmp_path / "results.sqlite") as store:
        assert store.task_tags() == {"spider": ["reasoning"], "e2e": ["data-to-text"]}
