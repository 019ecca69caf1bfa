"""Resumable training state as safetensors + JSON only (no pickle anywhere).

A checkpoint directory holds the trainable parameters, the optimizer moments, the scheduler step
and the RNG state; it is written to a temp directory and renamed, so a crash leaves either the
previous checkpoint or the new one, never half of one. The data order is a pure function of
(seed, step), so no sampler state is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import TunelabError
from tunelab.paths import atomic_directory

STATE_FILE = "state.safetensors"
META_FILE = "state.json"


def save_checkpoint(directory: Path, step: int, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    extra: dict[str, Any] | None = None) -> None:
    """Write trainable params + AdamW state + RNG at ``step`` atomically into ``directory``."""
    tensors: dict[str, torch.Tensor] = {f"param.{k}": v.detach().contiguous().cpu() for k, v in params.items()}
    opt_state = optimizer.state_dict()
    scalars: dict[str, dict[str, float]] = {}
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.numel() > 1:
                tensors[f"opt.{idx}.{key}"] = value.contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = float(value)
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"step": step, "param_groups": opt_state["param_groups"], "opt_scalars": scalars, **(extra or {})}
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / STATE_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))


def load_checkpoint(directory: Path, params: dict[str, torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote; returns its JSON metadata (with ``step``)."""
    state_path, meta_path = directory / STATE_FILE, directory / META_FILE
    if not state_path.is_file() or not meta_path.is_file():
        raise TunelabError(f"no checkpoint in {directory} (expected {STATE_FILE} and {META_FILE})")
    tensors = load_file(str(state_path))
    meta = json.loads(meta_path.read_text())
    with torch.no_grad():
        for name, param in params.items():
            key = f"param.{name}"
            if key not in tensors:
                raise TunelabError(f"checkpoint {directory} lacks parameter {name}; was it made by another method?")
            param.copy_(tensors[key])
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["opt_scalars"].items():
        for name, value in values.items():
            state.setdefault(int(idx), {})[name] = torch.tensor(value)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return meta
