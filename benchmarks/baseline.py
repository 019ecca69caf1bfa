"""Run a benchmark at another git revision, so that benchmarks compare against old code without keeping it alive.

``run_at(rev, argv)`` checks ``rev`` out once into a detached worktree (``$TMPDIR/tunelab-rev-<sha>``), runs
``python argv...`` there with that tree's ``src`` and ``benchmarks`` first on ``PYTHONPATH`` (this interpreter and
its packages), and returns the JSON the run printed after ``RESULT ``. ``ratios(ours, theirs)`` divides every
numeric leaf the two results share. Benchmarks take ``--baseline-rev REV`` and print both, side by side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worktree(rev: str) -> Path:
    """A detached worktree of ``rev`` (made once, reused)."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    tree = Path(tempfile.gettempdir()) / f"tunelab-rev-{sha[:12]}"
    if not (tree / "src").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=ROOT, check=True,
                       capture_output=True)
    return tree


def run_at(rev: str, argv: list[str]) -> dict:
    """The ``RESULT`` JSON of ``python argv`` run in the worktree of ``rev`` (its output goes to stderr here)."""
    tree = worktree(rev)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree / "src"), str(tree / "benchmarks")]))
    out = subprocess.run([sys.executable, *argv], cwd=tree, env=env, check=True, capture_output=True, text=True)
    sys.stderr.write(out.stdout)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{' '.join(argv)} at {rev} printed no RESULT line")
    return json.loads(lines[-1][len("RESULT "):])


def without(argv: list[str], flag: str) -> list[str]:
    """``argv`` less ``flag`` and its value (``--flag V`` or ``--flag=V``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def ratios(ours, theirs, path: str = "") -> dict[str, float]:
    """ours / theirs for every numeric leaf both results hold (keys joined by '.')."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out: dict[str, float] = {}
        for key in ours.keys() & theirs.keys():
            out.update(ratios(ours[key], theirs[key], f"{path}.{key}" if path else str(key)))
        return out
    numeric = (int, float)
    if isinstance(ours, numeric) and isinstance(theirs, numeric) and not isinstance(ours, bool) and theirs:
        return {path: ours / theirs}
    return {}


def compare(script: str, rev: str, ours: dict) -> dict:
    """Run ``script`` (this one's path under benchmarks/) with this process's arguments at ``rev``; print and return
    ``{"baseline_rev": rev, "baseline": theirs, "ratios": ours / theirs}``."""
    theirs = run_at(rev, [f"benchmarks/{script}", *without(sys.argv[1:], "--baseline-rev")])
    out = {"baseline_rev": rev, "baseline": theirs, "ratios": ratios(ours, theirs)}
    print("BASELINE " + json.dumps(out))
    return out
