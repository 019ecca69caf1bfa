"""Resumable training state as safetensors + JSON only (no pickle anywhere).

``OUT/checkpoint/step-00000012/`` holds, after optimizer step 12:

- ``state.safetensors``: the trainable parameters, every AdamW state tensor (moments and step
  counters, in their own dtypes) and the torch and numpy RNG states;
- ``state.json``: the step (the data position: batch order is a pure function of (seed, step),
  see ``train.batch_indices``), optimizer hyper-parameters, Python's RNG state, the loss curve so
  far, and the run's identity (the settings that shape training) with its sha256 fingerprint.

The learning rate is a pure function of the step (``train.lr_lambda``), so no scheduler state
exists to save. Each step's directory is written under a temp name and renamed into place, and
older ones are deleted only after that, so a SIGKILL at any instant leaves at least one complete
checkpoint once the first has been written.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import TunelabError
from tunelab.paths import atomic_directory, atomic_write_json

STATE_FILE = "state.safetensors"
META_FILE = "state.json"
STEP_PREFIX = "step-"


class CheckpointMismatch(TunelabError):
    """A checkpoint was made by a run with different settings; resuming would silently mix them."""


def save_checkpoint(directory: Path, step: int, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write trainable params + AdamW state + RNG states at ``step`` as ``directory/step-N``, atomically,
    then delete older checkpoints. Returns the new checkpoint's path."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {f"param.{k}": v.detach().contiguous().cpu() for k, v in params.items()}
    opt_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):  # 0-d step counters too: safetensors keeps shape and dtype exactly
                tensors[f"opt.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_keys.astype(np.int64))  # type: ignore[union-attr,attr-defined]
    py_version, py_state, py_gauss = random.getstate()
    meta = {"step": step, "param_groups": opt_state["param_groups"], "opt_scalars": scalars,
            "rng": {"python": [py_version, list(py_state), py_gauss],
                    "numpy": [np_kind, int(np_pos), int(np_has_gauss), float(np_gauss)]},
            **(extra or {})}
    target = directory / f"{STEP_PREFIX}{step:08d}"
    with atomic_directory(target) as tmp:
        save_file(tensors, str(tmp / STATE_FILE))
        atomic_write_json(tmp / META_FILE, meta)
    _prune(directory, keep=target)
    return target


def _prune(directory: Path, keep: Path) -> None:
    """Delete checkpoints other than ``keep`` and temp directories a killed writer left behind
    (one run owns its checkpoint directory, so no live writer's temp can be here)."""
    for path in directory.iterdir():
        if path != keep and path.is_dir() and (path.name.startswith(STEP_PREFIX) or path.name.endswith((".tmp", ".old"))):
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(directory: Path | None) -> Path | None:
    """The newest complete ``step-N`` checkpoint under ``directory``, or None."""
    if directory is None or not Path(directory).is_dir():
        return None
    done = sorted(p for p in Path(directory).glob(f"{STEP_PREFIX}*") if (p / META_FILE).is_file())
    return done[-1] if done else None


def load_checkpoint(directory: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore the newest checkpoint under ``directory`` into ``params``, ``optimizer`` and the RNGs;
    returns its JSON metadata (with ``step``). With ``identity``, refuses a checkpoint made with
    other settings (``CheckpointMismatch``)."""
    path = latest_checkpoint(directory)
    if path is None:
        raise TunelabError(f"no checkpoint in {directory} (expected {STEP_PREFIX}N/{META_FILE}); "
                           "run without --resume to start over")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise TunelabError(f"{path / META_FILE}: invalid JSON ({exc.msg}); delete {directory} to start over") from None
    if identity is not None:
        check_identity(meta, identity, path)
    tensors = load_file(str(path / STATE_FILE))
    with torch.no_grad():
        for name, param in params.items():
            key = f"param.{name}"
            if key not in tensors:
                raise CheckpointMismatch(f"checkpoint {path} lacks parameter {name}; was it made by another method?")
            param.copy_(tensors[key])
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["opt_scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    _restore_rng(tensors, meta["rng"])
    return meta


def _restore_rng(tensors: dict[str, torch.Tensor], rng: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    kind, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = rng["python"]
    random.setstate((version, tuple(state), gauss_next))


def training_identity(cfg: Any, method_cfg: Any, lr: float, encoded: Sequence[Any]) -> dict[str, Any]:
    """The settings that shape training, flat (``train.lr``: 0.1, ...), plus a sha256 of the tokenized
    training examples, which covers the data file, template, caps and truncation in one value."""
    digest = hashlib.sha256()
    for example in encoded:
        digest.update(json.dumps([list(example.input_ids), list(example.labels)]).encode())
    train = cfg.train
    return {"method.name": cfg.method_name, **{f"method.{k}": v for k, v in asdict(method_cfg).items()},
            "model.name": cfg.model.name, "model.dtype": cfg.model.dtype,
            "train.steps": train.steps, "train.lr": lr, "train.batch_size": train.batch_size,
            "train.grad_accum": train.grad_accum, "train.warmup_steps": train.warmup_steps,
            "train.weight_decay": train.weight_decay, "train.max_grad_norm": train.max_grad_norm,
            "train.seed": train.seed, "train.schedule": getattr(train, "schedule", "linear"),
            "train.group_by_length": getattr(train, "group_by_length", True),
            "train.precision": getattr(train, "precision", "fp32"),
            "training data (sha256 of tokenized examples)": digest.hexdigest()}


def fingerprint(identity: dict[str, Any]) -> str:
    """sha256 of the identity's canonical JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def check_identity(meta: dict[str, Any], identity: dict[str, Any], path: Path) -> None:
    """Raise ``CheckpointMismatch`` naming each setting that differs between the checkpoint and this run."""
    if meta.get("fingerprint") == fingerprint(identity):
        return
    saved = meta.get("identity") or {}
    # JSON turned tuples into lists; compare through the same round trip
    now = json.loads(json.dumps(identity, default=str))
    diffs = [f"{k}: checkpoint {saved.get(k, '(unset)')!r}, now {now.get(k, '(unset)')!r}"
             for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    raise CheckpointMismatch(
        f"cannot resume from {path}: it was made with other settings ({'; '.join(diffs) or 'unknown'}). "
        f"Rerun with the checkpoint's settings, or add --restart (train.restart=true) to throw it away and "
        f"start over, or use a new --out")
