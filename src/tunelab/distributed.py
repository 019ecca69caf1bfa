"""Devices, mixed precision and data parallelism, delegated to torch and Hugging Face accelerate.

tunelab has no launcher of its own: ``accelerate launch -m tunelab.cli run ...`` (or ``torchrun``)
starts N processes, and ``train`` sees them through the launcher's ``WORLD_SIZE``. Each process takes
its slice of every optimizer step's global batch, and the adapter is wrapped by
``Accelerator.prepare`` (DDP, or FSDP / DeepSpeed when the accelerate config asks for them), which
averages gradients across processes. A single plain process uses no wrapper at all.

Precision: ``train.precision`` = ``fp32`` | ``bf16`` | ``auto``. bf16 means autocast (weights and
optimizer state stay fp32; matmuls run in bf16). ``auto`` picks bf16 where it is fast: on CUDA when
the device supports it, on a CPU when it has bf16 units (the ``avx512_bf16`` / ``amx_bf16`` flags: ~3.7x
fp32's GEMM speed measured here; CPUs without are up to 40x slower, MODELS.md). The flags make the choice
the same in every process of a machine; where they cannot be read, a short GEMM probe decides.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import TunelabError

PRECISIONS = ("fp32", "bf16", "auto")
BF16_MIN_SPEEDUP = 1.3  # auto takes bf16 on a CPU only if its GEMM is at least this much faster


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup(size: int = 512, repeats: int = 4) -> float:
    """fp32 GEMM time over bf16 GEMM time on this CPU (>1: bf16 is faster); measured once per process."""
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        a @ b  # warm-up (oneDNN kernel selection)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        timings[dtype] = time.perf_counter() - start
    return timings[torch.float32] / max(timings[torch.bfloat16], 1e-9)


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matmul units: /proc/cpuinfo flags, else the GEMM probe."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return cpu_bf16_speedup() >= BF16_MIN_SPEEDUP
    flags = {word for line in text.splitlines() if line.startswith("flags") for word in line.split()}
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def default_device() -> torch.device:
    """cuda (this process's GPU under a launcher), then mps, then cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(name: str = "auto") -> torch.device:
    """``model.device``: ``auto`` = ``default_device()``; anything else as torch spells it."""
    try:
        return default_device() if name == "auto" else torch.device(name)
    except RuntimeError as exc:
        raise TunelabError(f"model.device={name!r}: {exc}") from None


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16`` for ``train.precision`` on ``device`` (see the module docstring)."""
    if precision not in PRECISIONS:
        raise TunelabError(f"train.precision={precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for a resolved precision; a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def is_main_process() -> bool:
    """True outside accelerate launch / torchrun, and in its process 0."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """Processes started by accelerate launch / torchrun (1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Parallel:
    """This process's place in data-parallel training and the wrapped module it trains through."""

    rank: int = 0
    world: int = 1
    accelerator: Any = None  # accelerate.Accelerator when world > 1
    kind: str = "none"  # accelerate's distributed type: MULTI_CPU, MULTI_GPU (DDP), FSDP, DEEPSPEED

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, micro_batch: list, batch_size: int) -> list:
        """This rank's ``batch_size`` examples of a global micro-batch of ``batch_size * world``."""
        return micro_batch[self.rank * batch_size: (self.rank + 1) * batch_size]

    def no_sync(self, module, last: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch of an optimizer step."""
        if self.accelerator is None or last:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(module)

    def step_totals(self, loss: float, tokens: int) -> tuple[float, int]:
        """The step's loss (mean over processes) and tokens (sum), in one all-reduce."""
        if self.world == 1:
            return loss, tokens
        both = torch.tensor([loss, tokens], dtype=torch.float64, device=self.accelerator.device)
        summed = self.accelerator.reduce(both, reduction="sum")
        return float(summed[0]) / self.world, int(summed[1])

    def wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


def setup(module: torch.nn.Module, optimizer: torch.optim.Optimizer
          ) -> tuple[Parallel, torch.nn.Module, torch.optim.Optimizer]:
    """Wrap ``module`` and ``optimizer`` for the processes accelerate launched; unchanged in a plain process."""
    if world_size() == 1:
        return Parallel(), module, optimizer
    from accelerate import Accelerator

    # autocast is applied by train() itself, the same way for one or N processes; cpu=True selects gloo
    # (accelerate only treats a multi-process CPU job as distributed when asked for the CPU)
    accelerator = Accelerator(mixed_precision="no", cpu=default_device().type == "cpu")
    wrapped, optimizer = accelerator.prepare(module, optimizer)
    kind = str(accelerator.distributed_type).split(".")[-1]
    return Parallel(accelerator.process_index, accelerator.num_processes, accelerator, kind), wrapped, optimizer

