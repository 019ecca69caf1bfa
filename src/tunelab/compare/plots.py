"""The report's figures (matplotlib, Agg backend), each returned as PNG bytes; None when there is no data."""

from __future__ import annotations

import io
import math
from collections import defaultdict
from statistics import mean, pstdev
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

COSTS = {"trainable_params": "trainable parameters", "train_seconds": "train time (s)",
         "adapter_bytes": "bytes stored per task"}


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _grid(n: int, width: float = 4.2, height: float = 3.2):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _by(rows: list[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def _metric(rows: list[dict[str, Any]]) -> str:
    return rows[0]["primary_metric"] if rows else ""


def quality_by_method(rows: list[dict[str, Any]]) -> bytes | None:
    """Per task: every seed as a dot, mean ± std as a bar, one column per method setting."""
    tasks = sorted({r["task"] for r in rows})
    if not tasks:
        return None
    fig, axes = _grid(len(tasks), width=max(4.2, 0.9 * len({r["method"] for r in rows}) + 1.5))
    for ax, task in zip(axes, tasks, strict=False):
        task_rows = [r for r in rows if r["task"] == task]
        groups = _by(task_rows, "method", "train_size", "prompt_length")
        labels = []
        for x, ((method, size, length), cells) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
            values = [c["quality"] for c in cells]
            ax.errorbar(x, mean(values), yerr=pstdev(values) if len(values) > 1 else 0, fmt="s", color="black",
                        capsize=4, zorder=3)
            ax.scatter([x] * len(values), values, alpha=0.6, zorder=2)
            labels.append(method + (f"\nn={size}" if size is not None else "") + (f"\nlen={length}" if length else ""))
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(task)
        ax.set_ylabel(_metric(task_rows))
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _pareto_points(rows: list[dict[str, Any]], cost: str) -> list[tuple[float, float, str]]:
    """(mean cost, mean quality, method) per method setting that has the cost."""
    points = []
    for (method, _size, _length), cells in _by(rows, "method", "train_size", "prompt_length").items():
        costs = [c[cost] for c in cells if c[cost] is not None]
        if costs:
            points.append((max(mean(costs), 1e-3), mean(c["quality"] for c in cells), method))
    return points


def pareto(rows: list[dict[str, Any]], cost: str) -> bytes | None:
    """Per task: mean quality against a cost (log scale), the non-dominated methods joined by a line.

    A task whose methods all share one cost (e.g. 0 trainable parameters: none of them trains) has nothing to
    trade off and gets no panel; None when no task has one (``pareto_gap`` says why)."""
    points_of = {t: _pareto_points([r for r in rows if r["task"] == t], cost) for t in sorted({r["task"] for r in rows})}
    tasks = [t for t, points in points_of.items() if len({x for x, _, _ in points}) > 1]
    if not tasks:
        return None
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks, strict=False):
        points = points_of[task]
        labels: dict[tuple[float, float], list[str]] = defaultdict(list)
        for x, y, label in points:  # methods at the same spot (e.g. untrained ones at 0 s) share one label
            labels[(x, y)].append(label)
        for (x, y), names in labels.items():
            ax.scatter(x, y, zorder=3)
            ax.annotate(", ".join(sorted(names)), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        frontier, best = [], -math.inf
        for x, y, _ in sorted(points):  # cheapest first: a point is on the frontier if it beats all cheaper ones
            if y > best:
                frontier.append((x, y))
                best = y
        if frontier:
            ax.plot(*zip(*frontier, strict=True), "--", color="grey", zorder=1)
        ax.set_xscale("symlog" if any(x < 1 for x, _, _ in points) else "log")
        ax.set_xlabel(COSTS[cost])
        ax.set_ylabel(_metric([r for r in rows if r["task"] == task]))
        ax.set_title(task)
        ax.grid(alpha=0.3)
    return _png(fig)


def pareto_gap(rows: list[dict[str, Any]], cost: str) -> str:
    """Why ``pareto(rows, cost)`` drew nothing, in words for the report."""
    points = [p for t in {r["task"] for r in rows} for p in _pareto_points([r for r in rows if r["task"] == t], cost)]
    if not points:
        return f"no cell recorded its {COSTS[cost]}"
    values = sorted({x for x, _, _ in points})
    if values == [1e-3] and cost == "trainable_params":
        return "no plot: every method here has 0 trainable parameters (none of them trains), so there is no trade-off"
    return f"no plot: within each task every method has the same {COSTS[cost]}, so there is no trade-off to draw"


def _swept(rows: list[dict[str, Any]], axis: str) -> bool:
    """Whether some method of these rows (one task) was run at two or more values of ``axis``."""
    return any(len({c[axis] for c in cells}) > 1 for cells in _by(rows, "method").values())


def sweep(rows: list[dict[str, Any]], axis: str, label: str) -> bytes | None:
    """Quality against ``axis`` (train_size or prompt_length), mean ± std over seeds, one line per method;
    None when no method of any task was run at two values (a panel would be empty axes)."""
    usable = [r for r in rows if r[axis] is not None]
    tasks = sorted({r["task"] for r in usable if _swept([x for x in usable if x["task"] == r["task"]], axis)})
    if not tasks:
        return None
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks, strict=False):
        task_rows = [r for r in usable if r["task"] == task]
        for method, cells in sorted(_by(task_rows, "method").items()):
            by_x = sorted(_by(cells, axis).items())
            if len(by_x) < 2:
                continue
            xs = [x for (x,), _ in by_x]
            ys = [mean(c["quality"] for c in cs) for _, cs in by_x]
            es = [pstdev([c["quality"] for c in cs]) if len(cs) > 1 else 0 for _, cs in by_x]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method[0])
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(_metric(task_rows))
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def similarity_buckets(buckets: dict[str, list[tuple[str, float, float, int]]]) -> bytes | None:
    """IPT minus PT per demonstration-similarity quintile: {task: [(label, mean diff, sem, n), ...]}."""
    if not buckets:
        return None
    fig, axes = _grid(len(buckets))
    for ax, (task, bars) in zip(axes, sorted(buckets.items()), strict=False):
        xs = range(len(bars))
        ax.bar(xs, [b[1] for b in bars], yerr=[b[2] for b in bars], capsize=3, color="tab:blue")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(list(xs), [f"{b[0]}\n(n={b[3]})" for b in bars], fontsize=7)
        ax.set_xlabel("demonstration similarity quintile (low → high)")
        ax.set_ylabel("IPT − PT per example")
        ax.set_title(task)
    return _png(fig)
