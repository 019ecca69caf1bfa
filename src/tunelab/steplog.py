"""``OUT/train_log.jsonl``: one JSON line per optimizer step, flushed as it is written.

A live reader (``tunelab board``'s loss curve) can tail it while the run trains; ``result.json``
keeps the whole curve only once the run has finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import IO

STEP_LOG = "train_log.jsonl"
log = logging.getLogger(__name__)


class StepLog:
    """Append ``{"step", "loss", "time"}`` lines to ``directory/train_log.jsonl`` (a fresh file unless resuming).

    A step whose dev loss was measured (``run``'s monitor) also carries ``"dev_loss"``.
    """

    def __init__(self, directory: Path, resume: bool = False) -> None:
        self.path = Path(directory) / STEP_LOG
        self._file: IO[str] | None = None
        # steps logged after the checkpoint a resumed run starts from are run again: drop them on resume
        self._pending = read_step_log(directory) if resume else []
        try:
            self._file = self.path.open("a" if resume else "w")
        except OSError as exc:  # a progress log must never stop training; checkpoints report disk errors
            log.warning("not logging steps to %s: %s", self.path, exc.strerror or exc)

    def write(self, step: int, loss: float, dev_loss: float | None = None) -> None:
        if self._file is None:
            return
        try:
            if self._pending and self._pending[-1]["step"] >= step:
                self._rewrite([r for r in self._pending if r["step"] < step])
            self._pending = []
            row = {"step": step, "loss": loss, "time": round(time.time(), 3)}
            if dev_loss is not None:
                row["dev_loss"] = dev_loss
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()  # the board reads it while training runs
        except OSError as exc:
            log.warning("stopped logging steps to %s: %s", self.path, exc.strerror or exc)
            self.close()

    def _rewrite(self, rows: list[dict]) -> None:
        assert self._file is not None
        self._file.close()
        self._file = self.path.open("w")
        self._file.write("".join(json.dumps(r) + "\n" for r in rows))

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            with contextlib.suppress(OSError):  # the unflushed tail is lost; the log is advisory
                file.close()


def read_step_log(directory: Path) -> list[dict]:
    """The steps logged so far (a half-written last line is skipped)."""
    path = Path(directory) / STEP_LOG
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
