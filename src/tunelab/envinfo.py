"""Facts recorded with every result: package versions, git commit, peak memory."""

from __future__ import annotations

import importlib.metadata
import platform
import resource
import subprocess
from pathlib import Path

PACKAGES = ("tunelab", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "sacrebleu",
            "rouge-score")


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
