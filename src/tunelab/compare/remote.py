"""A grid cell run away from the driver (a Ray task): on shared storage, or shipped back when there is none.

The driver leaves a random token in ``OUT/.tunelab-driver`` before it submits cells. A task that reads
the same token sees the driver's files: it runs the cell in ``OUT/cells/KEY`` as the local pool does
(and resumes from that cell's checkpoint after a retry). A task that does not (a node without the
shared filesystem) runs the cell in a scratch folder, regenerating any per-task data subset there,
and returns the cell's folder as a tar archive, which the driver unpacks into ``OUT/cells/KEY``.
Either way the task returns the row and the driver alone writes the store.
"""

from __future__ import annotations

import dataclasses
import io
import os
import socket
import tarfile
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tunelab.compare.grid import Cell, GridConfig, _has_subset
from tunelab.paths import atomic_write_json, atomic_write_text

MARKER = ".tunelab-driver"
WORKER_FILE = "worker.json"  # host and pid of the process running the cell (where to look, what to kill)
STORAGE = ("auto", "shared", "return")


def mark_driver(out_dir: Path) -> str:
    """Write a fresh token under the grid's output folder; tasks compare it to tell whether they share it."""
    token = uuid.uuid4().hex
    atomic_write_text(Path(out_dir) / MARKER, token)
    return token


def shares_storage(out_dir: Path, token: str | None) -> bool:
    """True when this process sees the driver's output folder (the same token in the marker file)."""
    try:
        return token is not None and (Path(out_dir) / MARKER).read_text() == token
    except OSError:
        return False


def run_cell(grid: GridConfig, cell: Cell, out_dir: str, token: str | None, *, gpus: list[str] | None,
             storage: str = "auto") -> dict[str, Any]:
    """Run ``cell`` in this (worker) process's view of the filesystem and return its store row.

    ``storage``: ``auto`` (compare the driver's token), ``shared`` or ``return`` (force one way).
    """
    from tunelab.compare.runner import cell_dir, timed_run

    assert storage in STORAGE, storage
    out = Path(out_dir)
    if storage == "shared" or (storage == "auto" and shares_storage(out, token)):
        _note_worker(cell_dir(cell, out))
        return timed_run(grid, cell, out, False, gpus)
    with tempfile.TemporaryDirectory(prefix="tunelab-cell-") as scratch:
        root = Path(scratch)
        _note_worker(cell_dir(cell, root))
        row = timed_run(grid, _with_local_data(cell, root), root, False, gpus)
        row["files"] = pack(cell_dir(cell, root))
    return row


def _note_worker(cell_dir: Path) -> None:
    atomic_write_json(cell_dir / WORKER_FILE, {"host": socket.gethostname(), "pid": os.getpid(),
                                               "started": time.time()})


def _with_local_data(cell: Cell, root: Path) -> Cell:
    """A per-task subset lives under the driver's OUT/data: write it again under this node's scratch folder."""
    if not _has_subset(cell.task_spec):
        return cell
    from tunelab.compare.subsets import task_subset

    data = dataclasses.replace(cell.config.data, **task_subset(cell.task_spec, root / "data"))
    return dataclasses.replace(cell, config=dataclasses.replace(cell.config, data=data))


def pack(directory: Path) -> bytes:
    """The cell folder as a gzipped tar (without ``checkpoint/``: a finished cell has none to keep)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(directory.rglob("*")):
            relative = path.relative_to(directory)
            if relative.parts[0] != "checkpoint" and path.is_file():
                tar.add(path, arcname=str(relative))
    return buffer.getvalue()


def unpack(blob: bytes, directory: Path) -> None:
    """Extract a ``pack`` archive into ``directory`` (plain files only, nothing outside it)."""
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        tar.extractall(directory, filter="data")


def land(row: dict[str, Any], out_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Driver side: unpack a returned cell folder under ``out_dir``; the row then names the driver's paths.

    ``config`` is the cell's resolved config as the driver sees it (its ``out`` and data paths).
    """
    blob = row.pop("files", None)
    if blob is None:
        return row
    target = Path(out_dir) / "cells" / row["key"]
    unpack(blob, target)
    row = {**row, "out_dir": str(target), "config": config}
    if row.get("predictions"):
        row["predictions"] = str(target / Path(row["predictions"]).name)
    return row
