"""The results store: one sqlite row per grid cell, written in one transaction when the cell ends.

WAL mode plus a busy timeout lets several grid processes (``--workers``) write one store; a row is
either absent or complete, so a killed grid never leaves a partial result. The cell key (a hash of
the resolved config) is the primary key: a finished cell is skipped on the next run.

A finished cell's predictions rows (pruned), per-example losses and, for a cell others start from, a
small adapter are kept in the store too (``compare.archive``), so a store committed without its
``cells/`` folder still reports, shows examples and resumes. A row's ``predictions`` and ``out_dir``
name the files while they exist (or ``<store dir>/cells/KEY`` where the store was moved with them);
otherwise ``predictions`` is a reference, ``sqlite:<store>#KEY``, that ``archive.read_reference`` reads.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.compare import archive
from tunelab.errors import TunelabError

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 60_000  # writers wait this long for another process's transaction to finish

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,          -- hash of the resolved cell config
    grid TEXT NOT NULL,            -- grid name
    method TEXT NOT NULL,          -- display label of the method entry
    method_name TEXT NOT NULL,     -- registry name
    task TEXT NOT NULL,
    seed INTEGER NOT NULL,
    train_size INTEGER,            -- data.max_train (NULL = all)
    prompt_length INTEGER,         -- num_virtual_tokens where the method has one
    unseen INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL CHECK (status IN ('done', 'failed')),
    error TEXT,
    config TEXT NOT NULL,          -- resolved RunConfig as JSON
    metrics TEXT,                  -- {"metric": value} as JSON
    primary_metric TEXT,
    quality REAL,                  -- value of primary_metric
    predictions TEXT,              -- path of predictions.jsonl
    out_dir TEXT,
    n_train INTEGER,
    n_eval INTEGER,
    trainable_params INTEGER,
    train_seconds REAL,
    eval_seconds REAL,
    cell_seconds REAL,
    peak_rss_mb REAL,
    cpu_seconds REAL,              -- user + system CPU of the cell's process (wall time lies on a shared machine)
    adapter_bytes INTEGER,
    forgetting REAL,               -- general-text NLL per token with the adapter minus the base model's (nats)
    versions TEXT,
    git_commit TEXT,
    machine TEXT,                  -- envinfo.machine() as JSON: the CPU (and GPU) its seconds were measured on
    result TEXT,                   -- the whole result.json
    finished_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    study TEXT NOT NULL,           -- tuning study: method label, task, size, length
    key TEXT NOT NULL,             -- the trial cell's config hash (one row per configuration)
    number INTEGER NOT NULL,       -- order in the study (0, 1, ...)
    params TEXT NOT NULL,          -- the sampled configuration as JSON
    status TEXT NOT NULL,          -- done | pruned | failed
    metric TEXT,
    dev_score REAL,                -- primary metric on the dev split (drawn from the training data), NULL if pruned
    cpu_seconds REAL,
    out_dir TEXT,
    finished_at REAL NOT NULL,
    dev_loss REAL,                 -- last teacher-forced dev loss measured (tune.pruner), NULL without pruning
    dev_losses TEXT,               -- every [step, dev loss] measured, as JSON
    pruned_step INTEGER,           -- the step a pruned trial stopped at
    PRIMARY KEY (study, key)
);
CREATE TABLE IF NOT EXISTS tuned (
    study TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    task TEXT NOT NULL,
    params TEXT NOT NULL,          -- the chosen configuration (best dev score)
    dev_score REAL,
    trials INTEGER NOT NULL,
    cpu_seconds REAL               -- all trials of the study together
);
CREATE TABLE IF NOT EXISTS examples (
    key TEXT PRIMARY KEY,          -- cell key: its predictions rows and per-example losses (compare.archive)
    data BLOB NOT NULL,            -- lzma JSON {"rows": [...], "references": DIGEST, "nll": {...}}
    refs TEXT NOT NULL             -- DIGEST of its references list in `shared`
);
CREATE TABLE IF NOT EXISTS shared (
    digest TEXT PRIMARY KEY,       -- SHA-256 of a references list, the same for every cell of a task
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS adapters (
    key TEXT PRIMARY KEY,          -- a cell other cells start from (init_from: {cell: ...})
    data BLOB NOT NULL             -- its adapter folder as tar.xz (under archive.ADAPTER_LIMIT)
);
"""

COLUMNS = ("key", "grid", "method", "method_name", "task", "seed", "train_size", "prompt_length", "unseen",
           "status", "error", "config", "metrics", "primary_metric", "quality", "predictions", "out_dir",
           "n_train", "n_eval", "trainable_params", "train_seconds", "eval_seconds", "cell_seconds",
           "peak_rss_mb", "cpu_seconds", "adapter_bytes", "forgetting", "versions", "git_commit", "machine", "result",
           "finished_at", "attempts")
JSON_COLUMNS = ("config", "metrics", "versions", "machine", "result")
TRIAL_COLUMNS = ("study", "key", "number", "params", "status", "metric", "dev_score", "cpu_seconds", "out_dir",
                 "finished_at", "dev_loss", "dev_losses", "pruned_step")


@dataclass
class Row:
    """One stored cell, JSON columns decoded."""

    data: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None


class Store:
    """A sqlite results store; open one per process (connections are not shared across forks)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            self.conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps it consistent
            with self.transaction():
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
                self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                self._add_new_columns()
        except sqlite3.DatabaseError as exc:
            raise TunelabError(f"cannot open results store {self.path}: {exc}") from None
        except OSError as exc:
            raise TunelabError(f"cannot open results store {self.path}: {exc.strerror or exc}") from None

    def _add_new_columns(self) -> None:
        """A store written by an older tunelab gains the columns added since (all nullable)."""
        for table, names in (("cells", COLUMNS), ("trials", TRIAL_COLUMNS)):
            have = {row[1] for row in self.conn.execute(f"PRAGMA table_info({table})")}
            # the table's own CREATE statement: the tables reuse column names
            definitions = SCHEMA.split(f"CREATE TABLE IF NOT EXISTS {table} (")[1].split(");")[0]
            for line in definitions.splitlines():
                definition = line.split("--")[0].strip().rstrip(",")
                name = definition.split(" ")[0] if definition else ""
                if name in names and name not in have and ("NOT NULL" not in definition or "DEFAULT" in definition):
                    self.conn.execute(f"ALTER TABLE {table} ADD COLUMN {definition}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: takes the write lock up front so concurrent writers queue, not fail."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self, key: str) -> str | None:
        """'done', 'failed' or None (never run, or killed before it finished)."""
        row = self.conn.execute("SELECT status FROM cells WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def record(self, values: dict[str, Any]) -> None:
        """Insert or replace one complete cell row, with its packed examples, in a single transaction."""
        row = {c: values.get(c) for c in COLUMNS}
        packed = None
        if row["status"] == "done" and row["predictions"]:
            packed = archive.pack_examples(Path(row["predictions"]), row["result"] if isinstance(row["result"], dict)
                                           else None)
            if packed is not None and packed.result is not None:
                row["result"] = packed.result  # its per-example losses are in the examples blob now
        for c in JSON_COLUMNS:
            if row[c] is not None and not isinstance(row[c], str):
                row[c] = json.dumps(row[c], default=str)
        row["finished_at"] = row["finished_at"] or time.time()
        missing = [c for c in ("key", "grid", "method", "method_name", "task", "seed", "status", "config")
                   if row[c] is None]
        assert not missing, f"store row lacks {missing}"
        with self.transaction() as conn:
            previous = conn.execute("SELECT attempts FROM cells WHERE key = ?", (row["key"],)).fetchone()
            row["attempts"] = (previous[0] + 1) if previous else 1
            conn.execute(f"INSERT OR REPLACE INTO cells ({', '.join(COLUMNS)}) "
                         f"VALUES ({', '.join('?' for _ in COLUMNS)})", [row[c] for c in COLUMNS])
            conn.execute("DELETE FROM adapters WHERE key = ?", (row["key"],))  # a rerun cell's adapter is new
            archive.write_examples(conn, row["key"], packed)

    def pack(self, adapter_keys: set[str] | None = None) -> int:
        """Pack what a store written by an older tunelab (or killed before it packed) lacks, from the files that
        still exist: finished cells' examples, and the small adapters of ``adapter_keys`` (default: the source
        cells the stored cells start from). Returns how many cells' examples it packed."""
        packed = 0
        # only the rows that lack packed examples are decoded (a wave of a long grid finds none or one)
        missing = [k for (k,) in self.conn.execute(
            "SELECT key FROM cells WHERE status = 'done' AND predictions IS NOT NULL AND predictions != '' "
            "AND key NOT IN (SELECT key FROM examples)")]
        for row in self.rows(keys=missing) if missing else []:
            if row.examples is not None or not row.predictions:
                continue
            found = archive.pack_examples(Path(row.predictions), row.result if isinstance(row.result, dict) else None)
            if found is not None:
                with self.transaction() as conn:
                    if found.result is not None:
                        conn.execute("UPDATE cells SET result = ? WHERE key = ?",
                                     (json.dumps(found.result, default=str), row.key))
                    archive.write_examples(conn, row.key, found)
                packed += 1
        sources = adapter_keys if adapter_keys is not None else self.source_keys()
        folders = {r.key: r.out_dir for r in self.rows(keys=sorted(sources))} if sources else {}
        for key in sorted(sources):
            self.keep_adapter(key, Path(folders[key]) / "adapter" if folders.get(key) else None)
        return packed

    def keep_adapter(self, key: str, directory: Path | None) -> bool:
        """Store a done cell's adapter folder (unless stored already, missing or over archive.ADAPTER_LIMIT)."""
        if self.status(key) != "done" or self.conn.execute("SELECT 1 FROM adapters WHERE key = ?", (key,)).fetchone():
            return False
        blob = archive.pack_adapter(directory) if directory is not None else None
        if blob is None:
            return False
        with self.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO adapters VALUES (?, ?)", (key, blob))
        return True

    def drop_adapters(self, keep: set[str]) -> int:
        """Forget the stored adapters not in ``keep``, so a committed store holds an adapter only while a planned or
        stored cell starts from it (``compare._keep_sources``); returns how many were dropped (then VACUUM shrinks)."""
        stored = [k for (k,) in self.conn.execute("SELECT key FROM adapters")]
        gone = [k for k in stored if k not in keep]
        if gone:
            with self.transaction() as conn:
                conn.executemany("DELETE FROM adapters WHERE key = ?", [(k,) for k in gone])
            self.conn.execute("VACUUM")
        return len(gone)

    def restore_adapter(self, key: str, directory: Path) -> bool:
        """Write a stored adapter back as ``directory``; False when the store does not hold it."""
        found = self.conn.execute("SELECT data FROM adapters WHERE key = ?", (key,)).fetchone()
        if found is None:
            return False
        archive.unpack_adapter(found[0], directory)
        return True

    def size(self) -> dict[str, int]:
        """Bytes of the store (its pages, WAL included) and of what it keeps per cell beyond the rows."""
        page_count = self.conn.execute("PRAGMA page_count").fetchone()[0]
        page_size = self.conn.execute("PRAGMA page_size").fetchone()[0]
        sizes = {"total": page_count * page_size}
        for name, table in (("examples", "examples"), ("references", "shared"), ("adapters", "adapters")):
            sizes[name] = self.conn.execute(f"SELECT COALESCE(SUM(LENGTH(data)), 0) FROM {table}").fetchone()[0]
        sizes["cells"] = self.conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
        return sizes

    def _located(self, key: str, path: str | None, name: str) -> Path | None:
        """``path`` where it exists; else ``name`` in this store's own ``cells/KEY`` (the store was moved with
        its cells) where that exists; else None."""
        for candidate in (Path(path) if path else None, self.path.resolve().parent / "cells" / key / name):
            if candidate is not None and candidate.exists():
                return candidate
        return None

    def rows(self, status: str | None = None, keys: list[str] | None = None) -> list[Row]:
        """Stored cells (optionally only one status, or only some keys), oldest first."""
        sql, args = "SELECT * FROM cells", []
        clauses = []
        if status:
            clauses.append("status = ?")
            args.append(status)
        if keys is not None:
            clauses.append(f"key IN ({', '.join('?' for _ in keys)})")
            args.extend(keys)
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        cursor = self.conn.execute(sql + " ORDER BY finished_at", args)
        names = [d[0] for d in cursor.description]
        archived = {k for (k,) in self.conn.execute("SELECT key FROM examples")}
        here = self.path.resolve()
        out = []
        for values in cursor.fetchall():
            data = dict(zip(names, values, strict=True))
            for c in JSON_COLUMNS:
                if data.get(c):
                    data[c] = json.loads(data[c])
            key = data["key"]
            data["examples"] = f"{archive.REFERENCE}{here}#{key}" if key in archived else None
            if data["status"] == "done":  # the files where they are (or moved with the store), else the store's copy
                # (readers of a cell's rows go through ``examples.cell_predictions``: the store's copy first)
                predictions = self._located(key, data["predictions"], "predictions.jsonl")
                data["predictions"] = str(predictions) if predictions else data["examples"] or data["predictions"]
                out_dir = self._located(key, data["out_dir"], "")
                data["out_dir"] = str(out_dir) if out_dir else data["out_dir"]
            out.append(Row(data))
        return out

    def source_keys(self) -> set[str]:
        """Keys of the cells that stored cells (of any grid) started from."""
        return archive.source_keys(json.loads(c) for (c,) in self.conn.execute("SELECT config FROM cells") if c)

    def tagged_rows(self, status: str | None = None, keys: list[str] | None = None,
                    coords: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Stored cells as the claims and the report read them: per key the labels a grid gives the cell
        (``coords``, from ``Cell.coords``) over those it was stored with - a cell another grid ran first under the
        same key (the same configuration) is named as this grid names it - its task's ``tags``, and for a cell
        started from another cell's adapter ``source_cell`` (that cell's method, label and task), looked up in
        the whole store: the source may be left out of ``keys`` (replaced by its version on more test rows)."""
        tags, coords = self.task_tags(), coords or {}
        rows = [{**r.data, **coords.get(r.key, {})} for r in self.rows(status=status, keys=keys)]
        found = {r["key"]: r for r in rows}
        wanted = {k for r in rows if (k := archive.source_key(r.get("config")))} - found.keys()
        found |= {r.key: {**r.data, **coords.get(r.key, {})} for r in self.rows(keys=sorted(wanted))} if wanted else {}
        for r in rows:
            source = found.get(archive.source_key(r.get("config")) or "")
            if source is not None:
                r["source_cell"] = archive.source_cell(source)
        return [{**r, "tags": tags.get(r["task"], [])} for r in rows]

    def task_tags(self) -> dict[str, list[str]]:
        """Task label -> tags (e.g. ``reasoning``) that grids recorded for the report's claims."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'task_tags'").fetchone()
        return json.loads(row[0]) if row else {}

    def add_task_tags(self, tags: dict[str, list[str]]) -> None:
        """Record a grid's task tags (merged with earlier grids': the latest grid wins per task label)."""
        with self.transaction() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'task_tags'").fetchone()
            merged = {**(json.loads(row[0]) if row else {}), **tags}
            if row is None or json.loads(row[0]) != merged:  # a no-op rerun leaves a committed store's bytes alone
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('task_tags', ?)", (json.dumps(merged, sort_keys=True),))

    def margins(self) -> dict[str, float]:
        """Metric -> equivalence margin the grids set (``margins:``); the claims' defaults fill the rest."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'margins'").fetchone()
        return json.loads(row[0]) if row else {}

    def set_margins(self, margins: dict[str, float]) -> None:
        """Record a grid's equivalence margins (merged: the latest grid wins per metric)."""
        with self.transaction() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'margins'").fetchone()
            merged = {**(json.loads(row[0]) if row else {}), **margins}
            if row is None or json.loads(row[0]) != merged:  # a no-op rerun leaves a committed store's bytes alone
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('margins', ?)", (json.dumps(merged, sort_keys=True),))

    def trial(self, study: str, key: str) -> dict[str, Any] | None:
        """The stored trial of ``study`` with this config key, if any."""
        cursor = self.conn.execute("SELECT * FROM trials WHERE study = ? AND key = ?", (study, key))
        values = cursor.fetchone()
        if values is None:
            return None
        return _decoded(dict(zip([d[0] for d in cursor.description], values, strict=True)))

    def record_trial(self, values: dict[str, Any]) -> None:
        """Insert one finished trial (a rerun of the same configuration replaces it: stored once)."""
        row = {**values, "params": json.dumps(values["params"], sort_keys=True, default=str),
               "dev_losses": json.dumps(values.get("dev_losses") or []),
               "finished_at": values.get("finished_at") or time.time()}
        names = TRIAL_COLUMNS
        with self.transaction() as conn:
            conn.execute(f"INSERT OR REPLACE INTO trials ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})",
                         [row.get(n) for n in names])

    def trials(self, study: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM trials", []
        if study is not None:
            sql, args = sql + " WHERE study = ?", [study]
        return _with_params(self.conn.execute(sql + " ORDER BY study, number", args))

    def record_tuned(self, values: dict[str, Any]) -> None:
        row = {**values, "params": json.dumps(values["params"], sort_keys=True, default=str)}
        names = ("study", "method", "task", "params", "dev_score", "trials", "cpu_seconds")
        stored = self.conn.execute(f"SELECT {', '.join(names)} FROM tuned WHERE study = ?", (row["study"],)).fetchone()
        if stored is not None and list(stored) == [row.get(n) for n in names]:
            return  # a resumed study with nothing new: no write, so a committed store's bytes stay as they are
        with self.transaction() as conn:
            conn.execute(f"INSERT OR REPLACE INTO tuned ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})",
                         [row.get(n) for n in names])

    def tuned(self) -> list[dict[str, Any]]:
        return _with_params(self.conn.execute("SELECT * FROM tuned ORDER BY study"))

    def count(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT status, COUNT(*) FROM cells GROUP BY status").fetchall())


def _with_params(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    """Rows of the trials / tuned tables as dicts, their JSON ``params`` decoded."""
    names = [d[0] for d in cursor.description]
    return [_decoded(dict(zip(names, values, strict=True))) for values in cursor.fetchall()]


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    row["params"] = json.loads(row["params"])
    if "dev_losses" in row:  # trials: [[step, loss], ...] as (step, loss) pairs
        row["dev_losses"] = [tuple(v) for v in json.loads(row["dev_losses"] or "[]")]
    return row


def open_existing(path: str | Path) -> Store:
    """Open a store that must already exist (for `tunelab report`)."""
    if not Path(path).is_file():
        raise TunelabError(f"no results store at {path}; `tunelab compare --preset quick --out DIR` (or --config "
                           "GRID.yaml) writes DIR/results.sqlite: pass DIR or that file")
    return Store(path)
