"""A cell's cost by phase: wall and CPU seconds of each step of a run, and of the process around it.

``tunelab.run`` times its own steps with a ``PhaseClock`` (result.json's ``phases``); ``compare/runner.py``
adds what only the grid sees, ``spawn`` (the grid starting the cell's process until the process's first
line; the first cell of a grid also starts the fork server) and ``other`` (the cell's wall or CPU seconds
that no phase claims: process exit, the tracker, reading the result back), so a stored cell's phases
add up to its ``cell_seconds`` and ``cpu_seconds``. Training and generation are ``train`` and ``eval``;
everything else is overhead a grid pays per cell.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# in the order a cell goes through them; ``dev_loss`` (a tuning trial's pruner measuring) runs inside training
PHASES = ("spawn", "data", "model_load", "build", "demonstrations", "train", "dev_loss", "eval", "save",
          "generalization", "forgetting", "other")
WORK = ("build", "train", "eval")  # adapting and generating: what a cell is for (build holds a prompt search)


class PhaseClock:
    """Wall and process-CPU seconds per named phase; a phase nested in another is taken out of the outer one."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._open: list[list[float]] = []  # per open phase: [wall start, cpu start, nested wall, nested cpu]

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._open.append([time.perf_counter(), time.process_time(), 0.0, 0.0])
        try:
            yield
        finally:
            start_wall, start_cpu, nested_wall, nested_cpu = self._open.pop()
            wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
            if self._open:
                self._open[-1][2] += wall
                self._open[-1][3] += cpu
            self.wall[name] = self.wall.get(name, 0.0) + wall - nested_wall
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu - nested_cpu

    def record(self) -> dict[str, dict[str, float]]:
        """``{"wall": {phase: s}, "cpu": {phase: s}}``, as result.json stores it."""
        return {"wall": _rounded(self.wall), "cpu": _rounded(self.cpu)}


def of_cell(run: dict[str, Any] | None, spawn: float | None, cell_seconds: float,
            cpu_seconds: float | None) -> dict[str, dict[str, float]]:
    """A whole cell's phases: the run's own (``run``, result.json's), ``spawn`` where the grid measured it, and
    ``other``: the cell's wall (``cell_seconds``) and CPU (``cpu_seconds``, the cell process's) left unclaimed."""
    wall = dict((run or {}).get("wall") or {})
    cpu = dict((run or {}).get("cpu") or {})
    if spawn is not None:
        wall = {"spawn": spawn, **wall}
    wall["other"] = max(0.0, cell_seconds - sum(wall.values()))
    if cpu_seconds is not None:
        cpu["other"] = max(0.0, cpu_seconds - sum(cpu.values()))
    return {"wall": _rounded(wall), "cpu": _rounded(cpu)}


def overhead(phases: dict[str, float]) -> float:
    """Seconds of the phases that are neither adapting nor generating."""
    return sum(v for k, v in phases.items() if k not in WORK)


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(max(0.0, v), 3) for k, v in values.items()}
