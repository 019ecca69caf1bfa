"""Cells per CPU-hour of a preset subset, and where a cell's seconds go (``tunelab.phases``).

Runs N cells of a shipped preset (a subset: ``--methods`` labels, ``--tasks`` names, ``--seeds``) through
``tunelab compare`` into a fresh temporary store, and prints:
- cells per CPU-hour: cells x 3600 / the cells' own CPU seconds (``cpu_seconds``, each cell's process), and per
  wall hour of the whole grid (fork server start, plan and report included);
- the mean wall and CPU seconds of each phase per method (spawn, data, model_load, build, demonstrations,
  train, dev_loss, eval, save, generalization, forgetting, other), and the overhead (all but build, train, eval).

Tuning is left out (the methods' ``tune`` blocks are dropped) unless ``--tune``; ``--set KEY=VALUE`` overrides
the grid (``train.steps=10``, ``data.max_eval=20``, ``model.name=tiny``). Task paths are resolved against
this checkout (``../shared/data`` beside it), so ``--baseline-rev REV`` runs the same subset with the code of
git revision REV (``baseline.py``: this script, that revision's ``src``) and prints both and their ratios.
Caches under ``~/.cache/tunelab`` (converted weights, the forgetting probe's base loss) are shared: run once to
warm them before reading figures. The machine must be otherwise idle.

Run: .venv/bin/python benchmarks/bench_cells.py --preset paper --methods pt,icl_random --tasks e2e --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parents[1]


def subset(raw: dict[str, Any], methods: list[str] | None, tasks: list[str] | None, seeds: list[int] | None,
           tune: bool, root: Path = ROOT) -> dict[str, Any]:
    """The preset's grid cut to ``methods`` (labels, else names), ``tasks`` (names) and ``seeds``; task paths
    made absolute against ``root`` (the checkout: ``../shared`` lies beside it); ``tune`` blocks kept only
    with ``tune``."""
    grid = dict(raw)
    picked_tasks = []
    for task in grid.get("tasks", []):
        spec = dict(task) if isinstance(task, dict) else {"task": task}
        name = spec.get("name") or Path(str(spec["task"])).name
        if tasks and name not in tasks:
            continue
        if str(spec["task"]).startswith("."):
            spec["task"] = str((root / spec["task"]).resolve())
        picked_tasks.append(spec)
    names = {t.get("name") or Path(str(t["task"])).name for t in picked_tasks}
    picked_methods = []
    for method in grid.get("methods", []):
        spec = dict(method)
        if methods and spec.get("label", spec["name"]) not in methods:
            continue
        if not tune:
            spec.pop("tune", None)
        if "tasks" in spec:
            spec["tasks"] = [t for t in spec["tasks"] if t in names]
            if not spec["tasks"]:
                continue
        picked_methods.append(spec)
    grid.update(tasks=picked_tasks, methods=picked_methods)
    if seeds:
        grid["seeds"] = seeds
    return grid


def summarise(rows: list[dict[str, Any]], grid_seconds: float) -> dict[str, Any]:
    """Cells per CPU-hour and per wall hour, and the mean seconds of each phase per method."""
    done = [r for r in rows if r["status"] == "done"]
    cpu = sum(r.get("cpu_seconds") or 0.0 for r in done)
    per_method: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in done:
        phases = (r.get("result") or {}).get("phases") or {}
        for kind in ("wall", "cpu"):
            for name, seconds in (phases.get(kind) or {}).items():
                per_method[r["method"]][f"{kind}.{name}"].append(seconds)
        per_method[r["method"]]["cell_seconds"].append(r.get("cell_seconds") or 0.0)
        per_method[r["method"]]["cpu_seconds"].append(r.get("cpu_seconds") or 0.0)
    return {"cells": len(done), "failed": len(rows) - len(done), "cpu_seconds": round(cpu, 1),
            "grid_seconds": round(grid_seconds, 1),
            "cells_per_cpu_hour": round(len(done) * 3600 / cpu, 2) if cpu else None,
            "cells_per_hour": round(len(done) * 3600 / grid_seconds, 2) if grid_seconds else None,
            "methods": {m: {k: round(mean(v), 3) for k, v in sorted(values.items())}
                        for m, values in sorted(per_method.items())}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import yaml
    from rich.console import Console

    from tunelab.compare import compare
    from tunelab.compare.grid import preset_path
    from tunelab.compare.store import Store

    # a preset name, or a grid file (so --baseline-rev runs the very same grid at a revision that lacks the preset)
    source = Path(args.preset) if args.preset.endswith((".yaml", ".yml")) else preset_path(args.preset)
    raw = yaml.safe_load(Path(source).resolve().read_text())
    grid = subset(raw, _names(args.methods), _names(args.tasks), [int(s) for s in _names(args.seeds) or []],
                  args.tune)
    with tempfile.TemporaryDirectory(prefix="bench-cells-") as tmp:
        path = Path(tmp) / "grid.yaml"
        path.write_text(yaml.safe_dump(grid, sort_keys=False))
        before = _cpu_now()
        start = time.perf_counter()
        outcome = compare(path, Path(tmp) / "out", overrides=args.set, progress=False,
                          console=Console(stderr=True, quiet=not args.verbose))
        seconds = time.perf_counter() - start
        with Store(outcome.store) as store:
            rows = [r.data for r in store.rows()]
            tuning = sum(t["cpu_seconds"] or 0.0 for t in store.tuned())
    out = summarise(rows, seconds)
    if tuning:  # the trials' own processes, pruned ones included
        out["tuning_cpu_seconds"] = round(tuning, 1)
        out["cells_per_cpu_hour_with_tuning"] = round(out["cells"] * 3600 / (out["cpu_seconds"] + tuning), 2)
    out["driver_cpu_seconds"] = round(_cpu_now() - before, 1)  # this process and the children it reaped
    return out


def _cpu_now() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _names(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _print(label: str, result: dict[str, Any]) -> None:
    print(f"{label}: {result['cells']} cells ({result['failed']} failed), {result['cpu_seconds']:.0f} cell CPU s, "
          f"grid {result['grid_seconds']:.0f} s: {result['cells_per_cpu_hour']} cells per CPU-hour, "
          f"{result['cells_per_hour']} per wall hour")
    for method, values in result["methods"].items():
        walls = {k[5:]: v for k, v in values.items() if k.startswith("wall.")}
        shown = ", ".join(f"{k} {v:.2f}" for k, v in walls.items()) or "no phases recorded"
        print(f"  {method}: cell {values['cell_seconds']:.1f} s wall, {values['cpu_seconds']:.1f} s CPU; {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", help="a shipped preset's name or a grid YAML file")
    parser.add_argument("--methods", help="comma-separated method labels (default: all)")
    parser.add_argument("--tasks", help="comma-separated task names (default: all)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the preset's)")
    parser.add_argument("--tune", action="store_true", help="keep the methods' tune blocks (trials run first)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="grid override")
    parser.add_argument("--verbose", action="store_true", help="show the grid's own output (on stderr)")
    parser.add_argument("--baseline-rev", help="also run the subset at this git revision and print the ratios")
    args = parser.parse_args()

    result = {}
    if args.baseline_rev:
        from baseline import ratios, run_at, without

        theirs = run_at(args.baseline_rev, [str(Path(__file__).resolve()), *without(sys.argv[1:], "--baseline-rev")])
        _print(f"baseline {args.baseline_rev}", theirs)
        result["baseline"] = theirs
    ours = run(args)
    _print("this tree", ours)
    result["ours"] = ours
    if args.baseline_rev:
        result["ratios"] = {k: v for k, v in ratios(ours, result["baseline"]).items() if "." not in k}
        print("ratios (this tree / baseline): " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(result["ratios"].items())))
    print("RESULT " + json.dumps(ours))
    if args.baseline_rev:
        print("BASELINE " + json.dumps(result))


if __name__ == "__main__":
    main()
