"""A grid cell that needs several processes (``resources: {processes: N}``) runs under ``accelerate launch``.

The cell's resolved config is written to ``OUT/cells/KEY/cell.yaml`` and started as
``accelerate launch --num_processes N -m tunelab.cli run --config cell.yaml``: data-parallel training
exactly as a user would launch it by hand (docs/scaling.md), on the GPUs the backend pinned for the cell
(or gloo on CPUs). Process 0 writes ``result.json``; the launcher's output goes to ``launch.log``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from tunelab.compare.backends import pin
from tunelab.config import RunConfig, to_dict

CONFIG_FILE = "cell.yaml"
LOG_FILE = "launch.log"


def launch_command(config: Path, processes: int) -> list[str]:
    """The ``accelerate launch`` command line for one cell with ``processes`` data-parallel processes."""
    # --multi_gpu selects accelerate's torchrun launcher; on a machine without GPUs tunelab asks for gloo
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", "tunelab.cli", "run", "--quiet", "--config", str(config)]


def _free_port() -> int:
    with socket.socket() as s:  # cells launched at once on one node each need their own rendezvous port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cell(cfg: RunConfig, processes: int, gpus: list[str] | None) -> str | None:
    """Run the cell as ``processes`` processes; None on success, else the error text (the log's tail)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    config = out / CONFIG_FILE
    config.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    env = dict(os.environ)
    pin(gpus, env)  # its GPUs, and its share of a card it shares
    if cfg.model.threads:
        env["OMP_NUM_THREADS"] = str(cfg.model.threads)  # per process; torchrun would otherwise pick 1
    with open(out / LOG_FILE, "w") as log:
        code = subprocess.run(launch_command(config, processes), env=env, stdout=log, stderr=subprocess.STDOUT,
                              check=False).returncode
    if code == 0:
        return None
    tail = (out / LOG_FILE).read_text(errors="replace").strip().splitlines()[-1:] or [""]
    return f"accelerate launch ({processes} processes) exited with code {code}: {tail[0]} (log: {out / LOG_FILE})"
