"""Native CPU kernels (``tunelab.native``; not ``kernels``: Hugging Face's ``kernels`` package owns that name), compiled from their C source on first use and cached.

``decode.c`` runs a whole Llama decode step in one call (the ``native`` backend of ``tunelab.inference.steps``). It is built
with the system C compiler (``$CC``, else ``cc``/``gcc``) for this CPU (``-march=native``) into
``$TUNELAB_KERNEL_CACHE`` (default ``~/.cache/tunelab/kernels``), keyed by the source, the flags, the compiler
and the CPU's flags, and linked against torch's own OpenMP runtime, so that torch and the kernel share one
thread pool and torch's thread count.

One build per ISA (``ISAS``): ``avx512`` (AVX-512 F/BW/VL), ``avx2`` (AVX2 + FMA, 256-bit) and ``generic``
(portable C vector code the compiler lowers for any CPU, ARM included). ``$TUNELAB_NATIVE_ISA`` picks one:
``auto`` (default: the first in ``ISAS`` this CPU runs) or a name, e.g. ``avx2`` on an AVX-512 machine to run
the narrower build there; ``isa()`` says which build is loaded. Nothing is required: without a compiler, with a
forced ISA this CPU lacks, or with ``TUNELAB_NATIVE=0``, ``library()`` returns None and the PyTorch decode
step runs (``reason()`` says why).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from tunelab.envinfo import cpu_flags as _cpu_flags  # a module global: tests replace it with another CPU's
from tunelab.errors import ConfigError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode.c")
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
ISA_ENV = "TUNELAB_NATIVE_ISA"
_X86 = ("x86_64", "AMD64")


@dataclass(frozen=True)
class Isa:
    """One build of ``decode.c``: what the CPU must have, how it is compiled, and what it does fast."""

    name: str
    cpu_flags: tuple[str, ...]  # /proc/cpuinfo flags the build needs
    machines: tuple[str, ...] | None  # platform.machine() values it builds for; None: any
    cc_flags: tuple[str, ...]  # on top of FLAGS; the -D selects decode.c's vector layer
    # bf16 weights stream at the pace of memory (half the bytes of fp32) without bf16 units: widened to fp32 in
    # registers (or summed in pairs by vdpbf16ps where the CPU has it). ``precision``'s ``auto`` asks this.
    fast_bf16_weights: bool

    def missing(self, flags: set[str], machine: str) -> list[str]:
        """What this CPU lacks for the build (empty: it runs here)."""
        if self.machines is not None and machine not in self.machines:
            return [f"an {'/'.join(self.machines)} CPU (this is {machine})"]
        return [f for f in self.cpu_flags if f not in flags]


# auto takes the first that runs here
ISAS = {isa.name: isa for isa in (
    Isa("avx512", ("avx512f", "avx512bw", "avx512vl", "fma"), _X86, ("-march=native", "-DTUNELAB_ISA_AVX512"), True),
    Isa("avx2", ("avx2", "fma"), _X86, ("-march=native", "-mno-avx512f", "-DTUNELAB_ISA_AVX2"), True),
    # plain C vectors lowered by the compiler: not measured for bf16, so ``auto`` keeps fp32 decode there
    Isa("generic", (), None, ("-march=native", "-ffp-contract=off", "-Wno-psabi", "-DTUNELAB_ISA_GENERIC"), False),
)}

_LOCK = threading.Lock()
# (TUNELAB_NATIVE, TUNELAB_NATIVE_ISA) -> (the library, why it is None, its Isa)
_STATE: dict[tuple[str, str], tuple[ctypes.CDLL | None, str, Isa | None]] = {}


def compiler() -> str | None:
    """The C compiler the kernels are built with: ``$CC``, else ``cc``, else ``gcc`` (None: none found)."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and (path := shutil.which(name)):
            return path
    return None


def cache_dir() -> Path:
    if env := os.environ.get("TUNELAB_KERNEL_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tunelab" / "kernels"


def choose(asked: str, flags: set[str], machine: str) -> tuple[Isa | None, str]:
    """The build that ``asked`` (``auto`` or a name in ``ISAS``) means on a CPU with ``flags`` (/proc/cpuinfo) and
    ``machine`` (platform.machine()): (it, "") or (None, why not)."""
    if asked != "auto":
        missing = ISAS[asked].missing(flags, machine)
        return (None, f"{ISA_ENV}={asked}, but the CPU lacks {', '.join(missing)}") if missing else (ISAS[asked], "")
    for isa in ISAS.values():
        if not isa.missing(flags, machine):
            return isa, ""
    return None, f"no build of {SOURCE.name} runs on this CPU"


def runnable() -> tuple[str, ...]:
    """The ISAs whose build runs on this CPU, in ``ISAS`` order (the tests run each)."""
    flags, machine = _cpu_flags(), platform.machine()
    return tuple(name for name, isa in ISAS.items() if not isa.missing(flags, machine))


def _asked() -> str:
    asked = os.environ.get(ISA_ENV, "auto").strip().lower() or "auto"
    if asked != "auto" and asked not in ISAS:
        raise ConfigError(f"{ISA_ENV}={asked!r}; choose one of auto, {', '.join(ISAS)} (or unset it: auto)")
    return asked


def _build(cc: str, isa: Isa, flags: set[str]) -> Path:
    import torch

    torch_lib = Path(torch.__file__).parent / "lib"
    cc_flags = (*FLAGS, *isa.cc_flags)
    key = hashlib.sha256(SOURCE.read_bytes() + repr((cc_flags, cc, sorted(flags), torch.__version__)).encode())
    out = cache_dir() / f"decode-{isa.name}-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # build aside, then rename: safe across processes
        built = Path(tmp) / out.name
        cmd = [cc, *cc_flags, str(SOURCE), "-o", str(built), f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(built, out)
    return out


def _load() -> tuple[ctypes.CDLL | None, str, Isa | None]:
    if os.environ.get("TUNELAB_NATIVE", "1") == "0":
        return None, "TUNELAB_NATIVE=0", None
    isa, why = choose(_asked(), _cpu_flags(), platform.machine())
    if isa is None:
        return None, why, None
    if (cc := compiler()) is None:
        return None, "no C compiler (set CC, or install gcc)", None
    try:
        lib = ctypes.CDLL(str(_build(cc, isa, _cpu_flags())))
        lib.tunelab_decode.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
        lib.tunelab_decode.restype = ctypes.c_int
        lib.tunelab_isa.restype = ctypes.c_char_p
        if (built := lib.tunelab_isa().decode()) != isa.name:
            raise RuntimeError(f"built for {isa.name}, the library says {built}")
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as err:
        return None, f"building {SOURCE.name} ({isa.name}) failed: {err}", None
    return lib, "", isa


def _state() -> tuple[ctypes.CDLL | None, str, Isa | None]:
    key = (os.environ.get("TUNELAB_NATIVE", "1"), os.environ.get(ISA_ENV, "auto"))
    if (hit := _STATE.get(key)) is not None:  # every decode step asks: no lock once loaded
        return hit
    with _LOCK:
        if key not in _STATE:
            _STATE[key] = _load()
            if _STATE[key][0] is None:
                log.info("native decode kernel unavailable (%s); the PyTorch decode step runs", _STATE[key][1])
        return _STATE[key]


def library() -> ctypes.CDLL | None:
    """The compiled decode kernel for this CPU and ``$TUNELAB_NATIVE_ISA``, or None where it cannot run here (see
    ``reason``). Built once per ISA and loaded once per process and setting."""
    return _state()[0]


def isa() -> str | None:
    """The ISA of the build ``library()`` loaded (its own report, ``tunelab_isa()``): ``avx512`` | ``avx2`` |
    ``generic``; None where none is loaded."""
    built = _state()[2]
    return None if built is None else built.name


def reason() -> str:
    """Why ``library()`` is None ("" when it is available)."""
    return _state()[1]


def streams_bf16_weights() -> bool:
    """Whether the native step runs here and reads bf16 weights at memory's pace without bf16 units (the loaded
    build's ``Isa.fast_bf16_weights``): then bf16 halves a decode step's bytes even on a CPU whose torch bf16
    matmuls are slow (``precision``'s ``auto`` decode)."""
    built = _state()[2]
    return built is not None and built.fast_bf16_weights


def _reset() -> None:  # tests
    with _LOCK:
        _STATE.clear()
