"""Inference precision chosen per phase: prefill/scoring and decode (``eval.precision``, ``serve --precision``).

``fp32`` | ``bf16`` | ``auto``. Unlike training (bf16 *autocast*, fp32 master weights), inference in bf16 runs
on a bf16 copy of the model's weights: decode at small batch is bound by reading the weights once per step,
and autocast would re-cast (read fp32, write bf16) every weight in every step. The copy is made once per
model and kept (``weights_in``); it is rebuilt only for parameters that changed since (training in place).

``auto`` decides the two phases separately, from the device and never from a timing of this process, so
every process of a machine makes the same choice:
- prefill / scoring are matrix-multiply-bound: bf16 where the device has bf16 units (CUDA with bf16; a CPU
  with ``avx512_bf16`` / ``amx_bf16``; elsewhere the GEMM probe of ``tunelab.distributed`` decides);
- decode reads every weight once per step: bf16 halves those bytes, so it takes bf16 on the same condition
  (at one row the bf16 GEMV kernel is even with fp32 on a cache-resident matrix, MODELS.md, but a decode
  step streams ~540 MB of fp32 weights from memory, where halving the bytes is what counts), and also on a
  CPU without bf16 units where the native decode step runs (``tunelab.native.streams_bf16_weights``: its
  AVX2 and AVX-512 builds widen bf16 weights to fp32 in registers), so an AVX2-only CPU prefills in fp32
  (torch's bf16 GEMM is several times slower than fp32 there) and decodes in bf16. A model the native step does not cover then
  decodes through torch's bf16 ops.

Batched output equals one-by-one output in fp32 for every method. In bf16 the decode step is batch-invariant
by construction (the native step) and the prefill attention runs per row (``tunelab.rowattention``), so batched
bf16 equals one-by-one wherever the CPU's bf16 GEMM rounds a row the same at every row count
(``bf16_gemm_row_invariant``: AVX512-BF16 CPUs); on AMX CPUs (Sapphire Rapids and later) oneDNN's kernels
round by shape and a greedy near-tie can flip (docs/performance.md, "bf16 and batch invariance"); use fp32
where exact batch invariance matters. Across precisions greedy outputs may differ too
(benchmarks/bench_eval.py measures the share of identical outputs and the metric difference with its CI).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tunelab.choices import PRECISIONS
from tunelab.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PhasePrecision:
    """The resolved precision (``fp32`` | ``bf16``) of each inference phase."""

    prefill: str = "fp32"  # prompt prefill and scoring (teacher-forced log-likelihoods)
    decode: str = "fp32"  # one token per row per step

    @property
    def prefill_dtype(self) -> torch.dtype:
        return DTYPES[self.prefill]

    @property
    def decode_dtype(self) -> torch.dtype:
        return DTYPES[self.decode]


def _fast_bf16(device: torch.device) -> bool:
    from tunelab.distributed import fast_bf16  # the one device decision, shared with training's autocast

    return fast_bf16(device)


@functools.lru_cache(maxsize=16)
def _resolve(name: str, device_type: str) -> PhasePrecision:
    if name != "auto":
        return PhasePrecision(name, name)
    fast = _fast_bf16(torch.device(device_type))
    choice = "bf16" if fast else "fp32"
    return PhasePrecision(prefill=choice, decode="bf16" if fast or _native_bf16_decode(device_type) else "fp32")


def _native_bf16_decode(device_type: str) -> bool:
    """The native decode step reads bf16 weights without bf16 units (``tunelab.native``'s ``Isa`` says which
    builds do), so decode halves its bytes in bf16 even where torch's bf16 GEMM is slow (AVX2: no bf16 units)."""
    from tunelab import native

    return device_type == "cpu" and native.streams_bf16_weights()


def resolve(name: str | PhasePrecision, device: torch.device | str = "cpu", key: str = "eval.precision"
            ) -> PhasePrecision:
    """``fp32`` | ``bf16`` | ``auto`` (or an already resolved value) -> the precision of each phase."""
    if isinstance(name, PhasePrecision):
        return name
    if name not in PRECISIONS:
        raise ConfigError(f"{key}={name!r}; choose one of {', '.join(PRECISIONS)}")
    return _resolve(name, torch.device(device).type)


@functools.lru_cache(maxsize=1)
def bf16_gemm_row_invariant() -> bool:
    """Whether this machine's bf16 matmul (``F.linear``) gives a row the same bits at every row count.

    True where oneDNN runs one kernel family for every shape (AVX512-BF16 without AMX: Zen 4/5, Cooper Lake);
    False on CPUs with AMX (Sapphire Rapids and later), where oneDNN switches between AVX-512 and AMX tile
    kernels by row count and blocks the AMX ones by shape (measured 2026-12-06: 4 of the first 33 rows differ
    from the rows alone, and rows of 1000 differ from the same rows among 2048). There, bf16 prefill of a padded batch is close to, not bitwise, each row
    alone, so batched bf16 generation can flip a greedy near-tie; fp32 (the default) is unaffected by this.
    Probed once per process on one projection shape of SmolLM2 (a few ms).
    """
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1536, 576, generator=generator).to(torch.bfloat16)
    x = torch.randn(1100, 576, generator=generator).to(torch.bfloat16)
    alone = torch.cat([torch.nn.functional.linear(x[i:i + 1], weight) for i in range(64)])
    return all(torch.equal(torch.nn.functional.linear(x[:rows], weight)[:64], alone[:rows])
               for rows in (4, 17, 33, 64, 257, 1100))


# model -> {dtype: {parameter/buffer name: (version of the fp32 tensor, its copy in dtype)}}
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _floating_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    # parameters only: buffers such as the rotary inverse frequencies stay fp32 (in bf16 a position's
    # angle would be off by up to ~0.5 rad at position 150)
    for name, tensor in model.named_parameters():
        if tensor.is_floating_point():
            yield name, tensor


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s floating parameters to ``dtype`` for good (``serve``: one weight set, no swaps)."""
    with torch.no_grad():
        for _, tensor in _floating_tensors(model):
            tensor.data = tensor.data.to(dtype)


_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> RLock held while its weights are swapped
_LOCKS_GUARD = threading.Lock()


def weights_lock(model: torch.nn.Module) -> threading.RLock:
    """Held by ``weights_in`` while ``model``'s weights are swapped: whoever reads the weights from another thread
    (serve's registry deep-copying the base model for a full-weights adapter) holds it too, so it never sees the
    swapped copy (the serve scheduler swaps per phase: ``inference.engine.Batch``)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def weights_in(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Run ``model`` with its floating weights in ``dtype`` inside the block; restores them on exit.

    The copies are kept per model and reused by the next block (no cast per call); a tensor changed in place
    since (an optimizer step bumps its version) is copied again. A model already in ``dtype`` is untouched.
    Not for training: gradients would go to the copies. Peak memory: the fp32 weights plus their copy.
    """
    if all(t.dtype == dtype for _, t in _floating_tensors(model)):
        yield
        return
    with weights_lock(model), _swapped(model, dtype):  # the tensors to swap are listed under the lock
        yield


@contextlib.contextmanager
def _swapped(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    tensors = [(n, t) for n, t in _floating_tensors(model) if t.dtype != dtype]
    copies = _COPIES.setdefault(model, {}).setdefault(dtype, {})
    originals = []
    with torch.no_grad():
        for name, tensor in tensors:
            hit = copies.get(name)
            version = (tensor.data_ptr(), tensor._version)
            if hit is None or hit[0] != version:
                hit = copies[name] = (version, tensor.detach().to(dtype))
            originals.append((tensor, tensor.data))
            tensor.data = hit[1]
    try:
        yield
    finally:
        for tensor, data in originals:
            tensor.data = data


def cast_cache(cache, dtype: torch.dtype):
    """A transformers cache with its keys/values in ``dtype`` (in place; between prefill and decode)."""
    for layer in getattr(cache, "layers", ()):
        if getattr(layer, "keys", None) is not None and layer.keys.dtype != dtype:
            layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
            layer.dtype = dtype
    return cache
