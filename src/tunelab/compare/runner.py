"""Run a grid's cells one by one, each in its own process, and record each in the store when it ends.

A cell runs in a child forked from a clean fork server (started once with torch and tunelab
imported, before any torch op): a crash, an out-of-memory kill or a NaN in one cell cannot take the
grid down, peak RSS is the cell's own, and cells are independent (the basis for ``--workers``).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import resource
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from tunelab import envinfo, phases
from tunelab.compare import remote
from tunelab.compare.backends import Backend, Resources, make_backend, pin, resolve, visible_gpus
from tunelab.compare.grid import Cell, GridConfig, cell_key
from tunelab.compare.launch import launch_cell
from tunelab.compare.store import Store
from tunelab.config import RunConfig, from_dict, to_dict
from tunelab.paths import atomic_write_json

if TYPE_CHECKING:
    from tunelab.run import DevMonitor

ERROR_FILE = "error.json"
USAGE_FILE = "usage.json"  # CPU seconds of the cell's process (and its spawn seconds), written beside result.json
# imported once in the fork server, so a cell's process starts with them: the run recipe (torch, transformers)
# and the libraries most cells import on first use (peft: every trained method's adapter and save; sacrebleu:
# BLEU / chrF; optuna: a tuning trial's pruner), each small next to torch. Not rouge-score or
# sentence-transformers (with NLTK, scikit-learn and pandas ~150 MB): that would be every cell's peak RSS.
# A module that is not installed is skipped (multiprocessing's fork server ignores the ImportError).
PRELOAD = ("tunelab.compare.runner", "tunelab.run", "peft", "sacrebleu", "optuna")

# builds, inside the cell's own process, the monitor that watches its dev loss; picklable (it crosses a fork)
MonitorFactory = Callable[[Path], "DevMonitor"]


@dataclass
class GridSummary:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    reused: int = 0  # finished on disk (result.json) but killed before the store row was written
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


def _adapt_seconds(train: dict[str, Any]) -> float:
    """What adapting the model took: training plus building the adapter (a prompt optimizer's search or a
    discrete prompt's selection happens in build; for a trained method build is a blink)."""
    return round(float(train["seconds"]) + float(train.get("build_seconds") or 0.0), 3)


def cell_dir(cell: Cell, out_dir: Path) -> Path:
    """Where a cell's files live: ``OUT/cells/KEY``."""
    return Path(out_dir) / "cells" / cell.key


def cell_config(cell: Cell, out_dir: Path) -> RunConfig:
    """The cell's RunConfig with its output directory, resuming from its own checkpoint if one exists."""
    out = cell_dir(cell, out_dir)
    resume = (out / "checkpoint").is_dir()  # a grid killed mid-cell continues that cell where it stopped
    return dataclasses.replace(cell.config, out=str(out), train=dataclasses.replace(cell.config.train, resume=resume))


def run_grid(grid: GridConfig, cells: list[Cell], store: Store, out_dir: Path, *, progress: bool = True,
             retry_failed: bool = False, console: Console | None = None, workers: int = 1,
             backend: str | Backend = "local", address: str | None = None) -> GridSummary:
    """Run every cell not already in the store; a failed cell is recorded and the grid goes on.

    ``workers`` > 1 runs that many cells at once, each in its own process with an equal share of the
    cores (``model.threads``); ``backend="ray"`` runs each cell as a task on the Ray cluster at
    ``address`` instead (``compare.backends``). Either way rows are written here, by this process
    only, as cells finish, in any order.
    """
    console = console or Console()
    summary = GridSummary()
    start = time.perf_counter()
    todo = []
    for cell in cells:
        status = store.status(cell.key)
        if status == "done" or (status == "failed" and not retry_failed):
            summary.skipped += 1
        else:
            todo.append(cell)
    if summary.skipped:
        console.print(f"{summary.skipped} of {len(cells)} cells already in {store.path}; skipping them"
                      + ("" if retry_failed else " (failed ones too: pass --retry-failed to rerun those)"))
    spent: list[float] = []
    workers = max(1, min(workers, len(todo) or 1))
    # cells run in child processes (or Ray workers); this process only starts them and writes every
    # store row itself, so the store has one writer per grid (several grids on one store are serialised by sqlite)
    if backend == "local" and workers == 1:  # one at a time, in order: the cell bar and the step bars stay together
        visible = visible_gpus()
        asked = resolve(Resources(**grid.resources), Resources(gpus=1 if visible else 0))
        gpus = visible[:int(asked.gpus or 0)] if visible else None  # None: no GPU to pin
        for i, cell in enumerate(todo):
            console.print(_cell_line(i, len(todo), spent, cell), highlight=False)
            cell = _with_threads(cell, _threads(asked)) if asked.cpus else cell
            _record(timed_run(grid, cell, out_dir, progress, gpus), cell, store, summary, spent, console)
    elif todo:
        _run_on_backend(grid, todo, store, out_dir, backend, workers, address, summary, spent, console)
    summary.seconds = time.perf_counter() - start
    return summary


def _run_on_backend(grid: GridConfig, todo: list[Cell], store: Store, out_dir: Path, backend: str | Backend,
                    workers: int, address: str | None, summary: GridSummary, spent: list[float],
                    console: Console) -> None:
    """Submit every cell to the backend, then record each as it finishes."""
    pool = make_backend(backend, workers, address) if isinstance(backend, str) else backend
    try:
        asked = resolve(Resources(**grid.resources), pool.defaults())
        where = f"in {workers} parallel processes" if pool.name == "local" else "as Ray tasks"
        console.print(f"running {len(todo)} cells {where}, {asked.cpus} core(s) and {asked.gpus or 0:g} GPU(s) "
                      "each", highlight=False)
        token = remote.mark_driver(out_dir) if pool.name == "ray" else None
        cells = {cell.key: _with_threads(cell, _threads(asked)) for cell in todo}
        for cell in cells.values():
            if pool.name == "ray":
                pool.submit(cell.key, remote.run_cell, grid, cell, str(out_dir), token, resources=asked,
                            storage=getattr(pool, "storage", "auto"))
            else:
                pool.submit(cell.key, timed_run, grid, cell, out_dir, False, resources=asked)
        for done in pool.results():
            cell = cells[done.tag]
            cfg = dataclasses.replace(cell.config, out=str(cell_dir(cell, out_dir)))  # as the driver sees it
            if done.value is not None:
                row = remote.land(done.value, out_dir, to_dict(cfg))
            else:  # the backend could not run it (e.g. its Ray worker died on every retry): a failed cell
                row = {**_row(grid, cell, cfg, None, done.error), "cell_seconds": None}
            _record(row, cell, store, summary, spent, console)
    finally:
        if isinstance(backend, str):
            pool.close()


def run_cell(grid: GridConfig, cell: Cell, out_dir: Path, progress: bool = False,
             monitor: MonitorFactory | None = None) -> dict[str, Any]:
    """Run one cell (in its own process, resuming its checkpoint) and return its store row, unrecorded.

    The one entry point for work outside the grid loop (tuning trials, compare/tuning.py); a trial
    could equally be submitted to a backend as ``timed_run``. With ``monitor``, the cell's process
    calls ``monitor(out)`` and trains under the ``tunelab.run.DevMonitor`` it returns; a cell it stops
    comes back with status ``stopped`` and ``stopped`` = {step, dev_loss} (never a row of ``cells``).
    """
    return timed_run(grid, cell, out_dir, progress, monitor=monitor)


def timed_run(grid: GridConfig, cell: Cell, out_dir: Path, progress: bool, gpus: list[str] | None = None,
              monitor: MonitorFactory | None = None) -> dict[str, Any]:
    """Run one cell (pinned to ``gpus`` where given) and return its store row, with ``cell_seconds``."""
    cell_start = time.perf_counter()
    row = _run_one(grid, cell, out_dir, progress, gpus, monitor)
    row["cell_seconds"] = round(time.perf_counter() - cell_start, 3)
    if row["status"] == "done" and not row.get("reused"):  # the whole cell's phases (a reused one was not timed)
        spawn = _usage(Path(row["out_dir"])).get("spawn_seconds")
        row["result"] = {**row["result"], "phases": phases.of_cell(row["result"].get("phases"), spawn,
                                                                   row["cell_seconds"], row.get("cpu_seconds"))}
    return row


def _record(row: dict[str, Any], cell: Cell, store: Store, summary: GridSummary, spent: list[float],
            console: Console) -> None:
    if row.pop("reused", False):
        summary.reused += 1
    store.record(row)
    spent.append(row["cell_seconds"] or 0.0)
    if row["status"] == "done":
        summary.done += 1
        console.print(f"  done in {spent[-1]:.0f}s: {row['primary_metric']} = {row['quality']:.2f}"
                      f"  ({_where(cell)})", highlight=False)
    else:
        summary.failed += 1
        summary.failures.append(f"{cell.method} / {cell.task} / seed {cell.seed}: {row['error'].splitlines()[0]}")
        console.print(f"  [red]failed[/red]: {row['error'].splitlines()[0]}  ({_where(cell)})", highlight=False)


def _threads(asked: Resources) -> int:
    """Torch threads per process: the cell's cores, split between its processes when it has several."""
    return max(1, (asked.cpus or 1) // (asked.processes or 1))


def _with_threads(cell: Cell, threads: int) -> Cell:
    """A cell uses the cores it was given (``resources.cpus``) unless the grid set model.threads itself."""
    if cell.config.model.threads:
        return cell
    model = dataclasses.replace(cell.config.model, threads=threads)
    return dataclasses.replace(cell, config=dataclasses.replace(cell.config, model=model))


def _where(cell: Cell) -> str:
    where = f"{cell.method} · {cell.task} · seed {cell.seed}"
    if cell.train_size is not None:
        where += f" · n={cell.train_size}"
    if cell.prompt_length is not None:
        where += f" · len={cell.prompt_length}"
    return where


def _cell_line(i: int, n: int, spent: list[float], cell: Cell) -> str:
    """A one-line bar over cells: the per-step bars of the run itself follow underneath."""
    width = 24
    filled = round(width * i / n) if n else width
    eta = ""
    if spent:
        eta = f"  ~{_clock(sum(spent) / len(spent) * (n - i))} left"
    where = _where(cell)
    return f"[bold]cell {i + 1}/{n}[/bold] {'━' * filled}{'─' * (width - filled)}  {_clock(sum(spent))} elapsed{eta}  {where}"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _run_one(grid: GridConfig, cell: Cell, out_dir: Path, progress: bool, gpus: list[str] | None,
             monitor: MonitorFactory | None = None) -> dict[str, Any]:
    from tunelab.run import STOPPED_FILE

    cfg = cell_config(cell, out_dir)
    out = Path(cfg.out)
    result = _finished_on_disk(out, cell)
    if result is not None:
        return {**_row(grid, cell, cfg, result, None), "reused": True}
    for name in (ERROR_FILE, USAGE_FILE, STOPPED_FILE):  # a stale stop is not this run's: it trains again
        (out / name).unlink(missing_ok=True)
    processes = grid.resources.get("processes") or 1
    if processes > 1:
        if monitor is not None:
            return _row(grid, cell, cfg, None, "a dev-loss monitor (tune.pruner) needs single-process cells; "
                                               "set resources.processes: 1 or tune.pruner: none")
        error = launch_cell(cfg, processes, gpus)
    else:
        error = (_in_child(cfg, progress, gpus, monitor) if _can_fork_server()
                 else _in_process(cfg, progress, monitor(out) if monitor else None))
    if error is None and (out / STOPPED_FILE).is_file():
        return _stopped_row(grid, cell, cfg)
    result = _finished_on_disk(out, cell) if error is None else None
    if error is None and result is None:
        error = f"the cell finished without writing {out / 'result.json'}"
    return _row(grid, cell, cfg, result, error)


def _stopped_row(grid: GridConfig, cell: Cell, cfg: RunConfig) -> dict[str, Any]:
    """A cell its monitor stopped during training: where, its last dev loss and the CPU it took."""
    from tunelab.run import STOPPED_FILE

    return {**cell.coords(), "key": cell.key, "grid": grid.name, "config": to_dict(cfg), "out_dir": cfg.out,
            "status": "stopped", "stopped": json.loads((Path(cfg.out) / STOPPED_FILE).read_text()),
            "cpu_seconds": _usage(Path(cfg.out)).get("cpu_seconds")}


def _usage(out: Path) -> dict[str, Any]:
    """usage.json of the cell's process (cpu_seconds, spawn_seconds); {} where it wrote none."""
    path = out / USAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _finished_on_disk(out: Path, cell: Cell) -> dict[str, Any] | None:
    """result.json of this very cell (written atomically by `run`), if it exists."""
    path = out / "result.json"
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
        return result if cell_key(from_dict(RunConfig, result["config"]), cell.task_spec) == cell.key else None
    except (json.JSONDecodeError, KeyError, Exception):  # a stale or foreign file: run the cell again
        return None


def _row(grid: GridConfig, cell: Cell, cfg: RunConfig, result: dict[str, Any] | None,
         error: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {**cell.coords(), "key": cell.key, "grid": grid.name, "config": to_dict(cfg),
                           "out_dir": cfg.out, "unseen": int(cell.unseen)}
    if result is None:
        return {**row, "status": "failed", "error": error or "unknown error", "versions": envinfo.versions(),
                "git_commit": envinfo.git_commit(), "machine": envinfo.machine()}
    metrics = result["metrics"]
    row["cpu_seconds"] = _usage(Path(cfg.out)).get("cpu_seconds")
    primary = next(iter(metrics), None)
    return {**row, "status": "done", "metrics": metrics, "primary_metric": primary,
            "quality": metrics.get(primary) if primary else None,
            "predictions": str(Path(cfg.out) / "predictions.jsonl"), "n_train": result.get("n_train"),
            "n_eval": result.get("n_eval"), "trainable_params": result.get("trainable_params"),
            "train_seconds": _adapt_seconds(result["train"]), "eval_seconds": result["eval"]["seconds"],
            "peak_rss_mb": result.get("peak_rss_mb"), "adapter_bytes": result.get("adapter_bytes"),
            "forgetting": (result.get("forgetting") or {}).get("delta"),
            "versions": result.get("versions"), "git_commit": result.get("git_commit"),
            "machine": result.get("machine"), "result": result}


_CONTEXT: Any = None


def _can_fork_server() -> bool:
    return "forkserver" in multiprocessing.get_all_start_methods()


def _context() -> Any:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(list(PRELOAD))  # imported once in the server: each cell starts with them
    return _CONTEXT


def _in_child(cfg: RunConfig, progress: bool, gpus: list[str] | None = None,
              monitor: MonitorFactory | None = None) -> str | None:
    """Run the cell in a forked child (seeing only ``gpus`` where given); None on success, else the error text."""
    process = _context().Process(target=_child_main, name="tunelab-cell",
                                 args=(to_dict(cfg), progress, os.getpid(), gpus, monitor, time.time()))
    process.start()
    try:
        process.join()
    except BaseException:  # Ctrl-C: stop the cell too; nothing is recorded for it
        process.terminate()
        process.join(10)
        raise
    error_path = Path(cfg.out) / ERROR_FILE
    if error_path.is_file():
        return json.loads(error_path.read_text())["error"]
    if process.exitcode != 0:
        how = f"was killed by signal {-process.exitcode}" if process.exitcode < 0 else f"exited with code {process.exitcode}"
        hint = " (out of memory?)" if process.exitcode == -9 else ""
        return f"the cell process {how}{hint}"
    return None


def _child_main(cfg_dict: dict[str, Any], progress: bool, grid_pid: int, gpus: list[str] | None = None,
                monitor: MonitorFactory | None = None, started: float | None = None) -> None:
    """Entry point of a cell's process: run it, and leave error.json behind if it fails.

    ``started``: when the grid asked for this process (``time.time()``, a clock both processes share).
    """
    spawn = None if started is None else round(max(0.0, time.time() - started), 3)
    _exit_with_parent(grid_pid)
    pin(gpus, os.environ)  # before torch touches CUDA (the fork server imported torch, not CUDA): pins the cell
    cfg = from_dict(RunConfig, cfg_dict)
    error = None
    try:
        watcher = monitor(Path(cfg.out)) if monitor is not None else None
    except Exception as exc:  # e.g. the study file cannot be opened: this cell fails, with the reason
        error = f"{type(exc).__name__}: {exc}"
    if error is None:
        error = _in_process(cfg, progress, watcher)
    usage = resource.getrusage(resource.RUSAGE_SELF)  # a forked child's counters start at zero
    atomic_write_json(Path(cfg.out) / USAGE_FILE, {"cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
                                                   "spawn_seconds": spawn})
    if error is not None:
        atomic_write_json(Path(cfg.out) / ERROR_FILE, {"error": error})
        os._exit(1)


def _in_process(cfg: RunConfig, progress: bool, monitor: DevMonitor | None = None) -> str | None:
    from tunelab.errors import TunelabError
    from tunelab.run import run

    try:
        run(cfg, progress=progress, monitor=monitor)
    except TunelabError as exc:
        return f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # any bug or library error fails this cell only; the traceback is kept
        return f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
    return None


def _exit_with_parent(grid_pid: int) -> None:
    """If the grid process dies (SIGKILL included), stop this cell instead of running on as an orphan."""
    server_pid = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(grid_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            if os.getppid() != server_pid:  # the fork server exits when the grid process does
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="tunelab-parent-watch").start()
