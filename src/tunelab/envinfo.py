"""Facts recorded with every result: package versions, git commit, peak memory, the machine."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGES = ("tunelab", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "sacrebleu",
            "rouge-score")
# CPU flags that decide how fast training and decoding run, widest first (``machine`` names the first present):
# AMX tiles, AVX-512 bf16 dot products, AVX-512, AVX2 (the AVX2-only kind runs bf16 GEMM ~6x slower than fp32)
SPEED_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2", "asimd")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit() -> str | None:
    """The commit of the tunelab checkout this code runs from, if it is one."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo ``flags``, ARM's ``Features``); empty where there is no such file."""
    for line in _cpuinfo():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def machine() -> dict[str, Any]:
    """The machine a result was measured on: CPU model, logical cores, architecture, its widest ``SPEED_FLAGS``
    flag, and the GPU where torch (already imported: this module imports no torch) sees one."""
    names = [line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")]
    flags = cpu_flags()
    out: dict[str, Any] = {"cpu": names[0] if names else platform.processor() or platform.machine(),
                           "cores": os.cpu_count(), "arch": platform.machine(),
                           "isa": next((f for f in SPEED_FLAGS if f in flags), None)}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def describe_machine(facts: dict[str, Any] | None) -> str:
    """``AMD EPYC, 2 cores, avx512_bf16`` (and the GPU, and its note, if any): one line naming a ``machine()``
    record; ``unknown`` for a result stored before tunelab recorded it."""
    if not facts:
        return "unknown"
    parts = [str(facts.get("cpu") or facts.get("arch") or "unknown CPU"), f"{facts.get('cores', '?')} cores"]
    parts += [str(facts["isa"])] if facts.get("isa") else []
    parts += [f"GPU {facts['gpu']}"] if facts.get("gpu") else []
    # ``note``: how a record not measured by tunelab itself was made (e.g. filled in later from a session's log)
    return ", ".join(parts) + (f" ({facts['note']})" if facts.get("note") else "")
