"""Native CPU kernels (``tunelab.native``; not ``kernels``: Hugging Face's ``kernels`` package owns that name), compiled from their C source on first use and cached.

``decode.c`` runs a whole Llama decode step in one call (``tunelab.fastdecode``'s ``native`` step). It is built
with the system C compiler (``$CC``, else ``cc``/``gcc``) for this CPU (``-march=native``) into
``$TUNELAB_KERNEL_CACHE`` (default ``~/.cache/tunelab/kernels``), keyed by the source, the flags, the compiler
and the CPU's flags, and linked against torch's own OpenMP runtime, so that torch and the kernel share one
thread pool and torch's thread count. Nothing is required: without a compiler, without AVX-512 (F, BW, VL),
off x86-64, or with ``TUNELAB_NATIVE=0``, ``library()`` returns None and the PyTorch decode step runs
(``reason()`` says why).
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
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "fma")

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and (path := shutil.which(name)):
            return path
    return None


def cache_dir() -> Path:
    if env := os.environ.get("TUNELAB_KERNEL_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tunelab" / "kernels"


def _build(cc: str, flags: set[str]) -> Path:
    import torch

    torch_lib = Path(torch.__file__).parent / "lib"
    key = hashlib.sha256(SOURCE.read_bytes() + repr((FLAGS, cc, sorted(flags), torch.__version__)).encode())
    out = cache_dir() / f"decode-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # build aside, then rename: safe across processes
        built = Path(tmp) / out.name
        cmd = [cc, *FLAGS, str(SOURCE), "-o", str(built), f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(built, out)
    return out


def library() -> ctypes.CDLL | None:
    """The compiled decode kernel, or None where it cannot run here (see ``reason``). Builds it once."""
    with _LOCK:
        if "lib" in _STATE:
            return _STATE["lib"]  # type: ignore[return-value]
        lib, why = None, ""
        flags = _cpu_flags()
        if os.environ.get("TUNELAB_NATIVE", "1") == "0":
            why = "TUNELAB_NATIVE=0"
        elif platform.machine() not in ("x86_64", "AMD64"):
            why = f"not x86-64 ({platform.machine()})"
        elif missing := [f for f in CPU_FLAGS if f not in flags]:
            why = f"the CPU lacks {', '.join(missing)}"
        elif (cc := _compiler()) is None:
            why = "no C compiler (set CC, or install gcc)"
        else:
            try:
                lib = ctypes.CDLL(str(_build(cc, flags)))
                lib.tunelab_decode.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
                lib.tunelab_decode.restype = ctypes.c_int
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                why = f"building {SOURCE.name} failed: {err}"
                lib = None
        if lib is None:
            log.info("native decode kernel unavailable (%s); the PyTorch decode step runs", why)
        _STATE["lib"], _STATE["reason"] = lib, why
        return lib


def reason() -> str:
    """Why ``library()`` is None ("" when it is available)."""
    library()
    return str(_STATE.get("reason", ""))


def _reset() -> None:  # tests
    with _LOCK:
        _STATE.clear()
