"""Results tab data: the report's quality table and claims, and the points of its plots, as plain tables.

Nothing is recomputed differently from `tunelab report`: the quality table is
``report.quality_table``, the claims ``claims.evaluate_claims`` / ``summarise``, the similarity
buckets ``report.similarity_buckets``; this module only reshapes them for interactive display.
"""

from __future__ import annotations

from collections import defaultdict
from statistics import mean, pstdev
from typing import Any

import pandas as pd

from tunelab.board.stores import done, setting
from tunelab.compare.claims import evaluate_claims, summarise
from tunelab.compare.plots import COSTS
from tunelab.compare.report import quality_table, similarity_buckets

SWEEPS = {"train_size": "training examples", "prompt_length": "virtual tokens"}


def quality_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The report's quality table (every seed listed) for the finished cells."""
    table = quality_table(done(rows))
    return pd.DataFrame(table.rows, columns=table.headers)


def claims_frames(rows: list[dict[str, Any]], n_resamples: int = 1000, margins: dict[str, float] | None = None,
                  looks: dict[str, Any] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one verdict per claim, every finding with its effect and 95% interval), as in the report (``margins`` and
    ``looks``: ``stores.claim_settings`` of the store the rows came from)."""
    findings = evaluate_claims(done(rows), n_resamples, margins, looks=looks)
    overall = summarise(findings)
    first = {f.claim.id: f for f in findings}
    summary = pd.DataFrame([[overall[f.claim.id], f.claim.source, f.claim.test] for f in first.values()],
                           columns=["verdict", "claim", "tested as"])
    detail = pd.DataFrame([[f.verdict, f.claim.test, f.group, f.effect, None if f.ci is None else f.ci[0],
                            None if f.ci is None else f.ci[1], f.detail] for f in findings],
                          columns=["verdict", "tested as", "group", "effect (A − B)", "CI low", "CI high", "measured"])
    return summary, detail


def failed_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    failed = [r for r in rows if r["status"] == "failed"]
    return pd.DataFrame([[r["method"], r["task"], r["seed"], (r["error"] or "").splitlines()[0][:300]]
                         for r in failed], columns=["method", "task", "seed", "error"])


def _groups(rows: list[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def cost_points(rows: list[dict[str, Any]], cost: str) -> pd.DataFrame:
    """One point per task and method setting: mean quality over seeds against the mean of ``cost``."""
    if cost not in COSTS:
        raise ValueError(f"cost {cost!r}; one of {', '.join(COSTS)}")
    points = []
    for (task, _m, _s, _l), cells in sorted(_groups(done(rows), "task", "method", "train_size", "prompt_length")
                                            .items(), key=lambda kv: str(kv[0])):
        costs = [c[cost] for c in cells if c[cost] is not None]
        if costs:
            points.append({"task": task, "method": setting(cells[0]), "cost": float(mean(costs)),
                           "quality": float(mean(c["quality"] for c in cells)), "seeds": len(cells)})
    return pd.DataFrame(points, columns=["task", "method", "cost", "quality", "seeds"])


def sweep_points(rows: list[dict[str, Any]], axis: str) -> pd.DataFrame:
    """Mean ± std quality over seeds against ``axis`` (train_size or prompt_length), per task and method."""
    if axis not in SWEEPS:
        raise ValueError(f"axis {axis!r}; one of {', '.join(SWEEPS)}")
    points = []
    usable = [r for r in done(rows) if r[axis] is not None]
    for (task, method, x), cells in sorted(_groups(usable, "task", "method", axis).items(), key=lambda kv: str(kv[0])):
        values = [c["quality"] for c in cells]
        points.append({"task": task, "method": method, axis: x, "quality": float(mean(values)),
                       "std": float(pstdev(values)) if len(values) > 1 else 0.0, "seeds": len(values)})
    frame = pd.DataFrame(points, columns=["task", "method", axis, "quality", "std", "seeds"])
    # a line needs two values of the axis for the same task and method
    counts = frame.groupby(["task", "method"])[axis].transform("nunique") if len(frame) else frame[axis]
    return frame[counts > 1].reset_index(drop=True)


def similarity_points(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """IPT − PT per demonstration-similarity quintile (``report.similarity_buckets``), one row per bar."""
    return pd.DataFrame([{"task": task, "quintile": q, "ipt_minus_pt": d, "sem": e, "examples": n}
                         for task, bars in sorted(similarity_buckets(done(rows)).items()) for q, d, e, n in bars],
                        columns=["task", "quintile", "ipt_minus_pt", "sem", "examples"])


def summary_line(rows: list[dict[str, Any]]) -> str:
    finished = done(rows)
    grids = sorted({r["grid"] for r in rows})
    model = finished[0]["config"]["model"]["name"] if finished else "-"
    return (f"{len(finished)} cells done, {len(rows) - len(finished)} failed · grid: {', '.join(grids) or '-'} · "
            f"model: {model} · tasks: {', '.join(sorted({r['task'] for r in rows})) or '-'}")
