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
the same in every process of a machine; where they cannot be read, a short GEMM probe decides. ``fast_bf16`` is
that one decision, for training's autocast and for inference's bf16 weights (``tunelab.precision``) alike.

GPUs (docs/gpu.md): ``resolve_device`` applies ``TUNELAB_GPU_MEMORY_FRACTION`` (set by ``tunelab compare`` for
a cell sharing its card with others) through ``torch.cuda.set_per_process_memory_fraction``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.choices import PRECISIONS
from tunelab.errors import TunelabError

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
# oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) below its first bf16 ISA (AVX512_CORE_BF16): torch's bf16 GEMMs then run
# without bf16 units, as on an AVX2-only CPU (``ONEDNN_MAX_CPU_ISA=AVX2 TUNELAB_NATIVE_ISA=avx2`` runs the AVX2
# machine's paths, precision choices included, on an AVX-512 one)
NO_BF16_ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matmul units (and oneDNN may use them): /proc/cpuinfo flags, else the GEMM probe."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() in NO_BF16_ONEDNN_ISAS:
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return cpu_bf16_speedup() >= BF16_MIN_SPEEDUP
    flags = {word for line in text.splitlines() if line.startswith("flags") for word in line.split()}
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls fast: the one answer behind ``auto`` for training (autocast) and for
    inference (bf16 weights, ``tunelab.precision``). CUDA with bf16 support (Ampere and later); a CPU with bf16
    units; nothing else."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_has_fast_bf16()
    return False


def default_device() -> torch.device:
    """cuda (this process's GPU under a launcher), then mps, then cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(name: str = "auto") -> torch.device:
    """``model.device``: ``auto`` = ``default_device()``; anything else as torch spells it. On CUDA this
    process's share of the card is applied here (``cap_memory``), before anything is allocated on it."""
    try:
        device = default_device() if name == "auto" else torch.device(name)
    except RuntimeError as exc:
        raise TunelabError(f"model.device={name!r}: {exc}") from None
    cap_memory(device)
    return device


# set by `tunelab compare` for a cell that shares its GPU with others (compare.backends.pin): 1/N of the card
MEMORY_FRACTION_ENV = "TUNELAB_GPU_MEMORY_FRACTION"


def cap_memory(device: torch.device, env: Mapping[str, str] | None = None) -> float | None:
    """Cap this process's CUDA caching allocator at ``TUNELAB_GPU_MEMORY_FRACTION`` of ``device``'s memory
    (``torch.cuda.set_per_process_memory_fraction``: going past it is an out-of-memory error in this cell only,
    not in the others sharing the card); the fraction applied, or None (not CUDA, or no share set)."""
    value = (os.environ if env is None else env).get(MEMORY_FRACTION_ENV)
    if device.type != "cuda" or not value:
        return None
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if not 0 < fraction <= 1:
        raise TunelabError(f"{MEMORY_FRACTION_ENV}={value!r}: give a fraction of the GPU's memory in (0, 1]")
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def describe(device: torch.device) -> dict[str, Any]:
    """What tunelab chose for ``device`` (benchmarks and GPU checks record it): its name, what ``auto`` picks
    for training (autocast) and for inference (weights), and the attention prefill uses."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    auto = "bf16" if fast_bf16(device) else "fp32"
    # rowattention's per-row prefill fixes the CPU SDPA kernel's batch dependence; elsewhere transformers' SDPA
    # (flash / memory-efficient kernels on CUDA, as PyTorch dispatches them)
    attention = "tunelab_rows (per-row SDPA)" if device.type == "cpu" else "sdpa (transformers' choice)"
    return {"device": str(device), "name": name, "train_precision_auto": auto, "inference_precision_auto": auto,
            "attention": attention, "torch": torch.__version__}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16`` for ``train.precision`` on ``device`` (see the module docstring)."""
    if precision not in PRECISIONS:
        raise TunelabError(f"train.precision={precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if fast_bf16(device) else "fp32"


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

