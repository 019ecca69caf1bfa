"""Launch-and-watch data: a job is a `tunelab run` / `tunelab compare` subprocess whose state lives on disk.

``RUNS/.board/jobs/<id>/`` holds ``job.json`` (command, pid, process start time, the grid's cells),
``config.yaml`` (what was launched), ``output.log`` (stdout and stderr) and ``rc`` (exit status,
written when the command ends). Any board process, after a page reload or a restart, finds the job
there, so watching never depends on a browser session. Progress comes from the results store and
each cell's ``train_log.jsonl`` (``tunelab.steplog``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import yaml

from tunelab.board import confine, forms
from tunelab.board.stores import BOARD_DIR
from tunelab.compare import STORE_NAME
from tunelab.errors import TunelabError
from tunelab.paths import atomic_write_json, atomic_write_text
from tunelab.steplog import read_step_log

_CHILDREN: dict[int, subprocess.Popen] = {}  # jobs this process started (reaped on status checks)


@dataclass
class Job:
    id: str
    kind: str  # run | grid
    name: str
    command: list[str]
    config: str  # saved YAML
    out: str
    pid: int
    started: float
    create_time: float  # psutil's process start time: a reused pid is not mistaken for the job
    cells: list[dict[str, Any]] = field(default_factory=list)  # key, method, task, seed, steps (grid)
    stopped: bool = False

    @property
    def home(self) -> Path:
        return Path(self.config).parent

    @property
    def store(self) -> Path | None:
        return Path(self.out) / STORE_NAME if self.kind == "grid" else None


def jobs_dir(runs: str | Path) -> Path:
    return Path(runs) / BOARD_DIR / "jobs"


def start_job(runs: str | Path, raw: dict[str, Any], name: str, workers: int = 1, cwd: str | Path | None = None,
              allow_remote_code: bool = False) -> Job:
    """Save ``raw`` (a resolved run or grid mapping) and start it under ``RUNS/name``; returns the job.

    Refused (``confine.Refused``, nothing saved or started) when ``raw`` names a path outside ``runs`` or,
    unless ``allow_remote_code``, sets a flag that runs a model directory's code."""
    confine.check_launch(runs, raw, allow_remote_code)
    kind = forms.kind_of(raw)
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip(".-") or "job"
    out = confine.child(runs, safe, "name")  # refuses a symlink leading out of the runs folder
    job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}-{uuid.uuid4().hex[:4]}"
    home = confine.inside(runs, jobs_dir(runs), "jobs folder") / job_id
    home.mkdir(parents=True)
    config = home / "config.yaml"
    atomic_write_text(config, yaml.safe_dump(raw, sort_keys=False))
    cells = _cells(config, out) if kind == "grid" else [{"key": "", "method": _method(raw), "task": "",
                                                       "seed": (raw.get("train") or {}).get("seed", 0),
                                                       "steps": (raw.get("train") or {}).get("steps", 100)}]
    cmd = forms.command(kind, config.resolve(), out, workers, python=True)
    log = (home / "output.log").open("w")
    # `sh` records the exit status; a new session lets stop() end the grid and its cell processes together
    process = subprocess.Popen(["sh", "-c", '"$@"; echo $? > "$0"', str(home / "rc"), *cmd], stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd, env=_env(),
                               start_new_session=True)
    log.close()
    _CHILDREN[process.pid] = process
    job = Job(job_id, kind, safe, cmd, str(config.resolve()), str(out), process.pid, time.time(),
              psutil.Process(process.pid).create_time(), cells)
    atomic_write_json(home / "job.json", asdict(job))
    return job


def _method(raw: dict[str, Any]) -> str:
    method = raw.get("method")
    return str(method.get("name") if isinstance(method, dict) else method)


def _env() -> dict[str, str]:
    """This environment, with this tunelab importable and output unbuffered (the log tail is live); the
    working directory is not put on ``sys.path``, so no file there is imported in place of a module."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONSAFEPATH="1")
    source = str(Path(__file__).resolve().parents[2])  # the directory holding the tunelab package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
    return env


def _cells(config: Path, out: Path) -> list[dict[str, Any]]:
    """The grid's cells as `tunelab compare` will expand them (same keys, same out dirs)."""
    from tunelab.compare.grid import expand, load_grid

    cells = expand(load_grid(config), out / "data")
    return [{"key": c.key, "method": c.method, "task": c.task, "seed": c.seed, "train_size": c.train_size,
             "prompt_length": c.prompt_length, "steps": c.config.train.steps} for c in cells]


def list_jobs(runs: str | Path) -> list[Job]:
    """Jobs recorded under the runs folder, newest first."""
    root, top = jobs_dir(runs), Path(runs).resolve()
    jobs = []
    for path in sorted(root.glob("*/job.json"), reverse=True) if root.is_dir() else []:
        try:
            job = Job(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError):
            continue
        # a job.json pointing elsewhere (edited by hand) is not followed: its log and outputs stay unread
        if job.home.resolve() == path.parent.resolve() and Path(job.out).resolve().is_relative_to(top):
            jobs.append(job)
    return jobs


def get_job(runs: str | Path, job_id: str) -> Job:
    for job in list_jobs(runs):
        if job.id == job_id:
            return job
    raise TunelabError(f"no job {job_id!r} under {jobs_dir(runs)}")


def is_running(job: Job) -> bool:
    child = _CHILDREN.get(job.pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        process = psutil.Process(job.pid)
        return abs(process.create_time() - job.create_time) < 1 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def exit_code(job: Job) -> int | None:
    path = job.home / "rc"
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def status(job: Job) -> str:
    """running | finished | failed (exit status N) | stopped | ended (killed without an exit status)."""
    if is_running(job):
        return "running"
    if job.stopped:
        return "stopped"
    code = exit_code(job)
    if code is None:
        return "ended"
    return "finished" if code == 0 else f"failed (exit status {code})"


def stop_job(runs: str | Path, job: Job) -> Job:
    """End the job's process group (the grid and its cell processes) and record that it was stopped."""
    if is_running(job):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGTERM)
        child = _CHILDREN.get(job.pid)
        if child is not None:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(job.pid, signal.SIGKILL)
    job.stopped = True
    atomic_write_json(job.home / "job.json", asdict(job))
    return job


def log_tail(job: Job, lines: int = 40) -> str:
    """The last ``lines`` non-empty lines of the job's output (progress-bar carriage returns split lines)."""
    path = job.home / "output.log"
    if not path.is_file():
        return ""
    text = path.read_bytes()[-64_000:].decode(errors="replace").replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def _cell_dir(job: Job, cell: dict[str, Any]) -> Path:
    return Path(job.out) / "cells" / cell["key"] if job.kind == "grid" else Path(job.out)


def _store_status(job: Job) -> dict[str, tuple[str, float | None]]:
    """Cell key -> (status, quality) from the job's store, without creating a store that is not there yet."""
    if job.store is None or not job.store.is_file():
        return {}
    import sqlite3

    try:
        with sqlite3.connect(f"file:{job.store}?mode=ro", uri=True, timeout=5) as conn:
            return {k: (s, q) for k, s, q in conn.execute("SELECT key, status, quality FROM cells")}
    except sqlite3.Error:
        return {}


def progress(job: Job) -> pd.DataFrame:
    """One row per cell: status (done / failed / running / pending), steps logged of steps, last loss, quality."""
    stored = _store_status(job)
    running = is_running(job)
    rows = []
    for cell in job.cells:
        directory = _cell_dir(job, cell)
        log = read_step_log(directory)
        if job.kind == "grid" and cell["key"] in stored:
            state, quality = stored[cell["key"]]
        elif job.kind == "run" and (directory / "result.json").is_file():
            result = json.loads((directory / "result.json").read_text())
            state, quality = "done", next(iter(result["metrics"].values()), None)
        else:
            started = log or (directory.is_dir() and job.kind == "grid")
            state, quality = ("running" if running and started else "pending" if running else "not run"), None
        rows.append({"method": cell["method"], "task": cell["task"], "seed": cell["seed"], "status": state,
                     "step": f"{log[-1]['step'] if log else 0}/{cell['steps']}",
                     "loss": round(log[-1]["loss"], 4) if log else None,
                     "quality": None if quality is None else round(float(quality), 3), "key": cell["key"]})
    return pd.DataFrame(rows, columns=["method", "task", "seed", "status", "step", "loss", "quality", "key"])


def loss_curves(job: Job, only_running: bool = False) -> pd.DataFrame:
    """Every logged step of the job's cells (of the running ones with ``only_running``): cell, step, loss."""
    running = set(progress(job).query("status == 'running'")["key"]) if only_running else None
    rows = []
    for cell in job.cells:
        if running is not None and cell["key"] not in running:
            continue
        label = " · ".join(str(x) for x in (cell["method"], cell["task"], f"seed {cell['seed']}") if x)
        rows += [{"cell": label, "step": r["step"], "loss": r["loss"]} for r in read_step_log(_cell_dir(job, cell))]
    return pd.DataFrame(rows, columns=["cell", "step", "loss"])
