"""Had training flattened out? A pure test over the per-step training losses (``TrainStats.losses``).

The losses are smoothed with an exponential moving average (bias-corrected, window about an eighth of the
run), a straight line is fitted to the last quarter of the smoothed curve, and the fitted change over that
quarter is taken relative to the loss level there. A run whose loss still fell (or rose) by more than
``TOLERANCE`` of its level over its last quarter was still moving when it stopped: its score says little
about what the method reaches, and a comparison that uses it is flagged (``compare.claims``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

TOLERANCE = 0.05  # |change over the last quarter| / loss level: more than 5% is "still moving"
MIN_STEPS = 16  # fewer steps than this cannot tell a trend from noise: no verdict (None)


def ema(values: np.ndarray, window: int) -> np.ndarray:
    """Bias-corrected exponential moving average with span ``window`` (beta = 1 − 2 / (window + 1))."""
    beta = 1.0 - 2.0 / (window + 1)
    out = np.empty(len(values))
    level = 0.0
    for i, v in enumerate(values):
        level = beta * level + (1 - beta) * v
        out[i] = level / (1 - beta ** (i + 1))
    return out


def assess(losses: list[float] | np.ndarray, tolerance: float = TOLERANCE) -> dict[str, Any] | None:
    """{"converged", "relative_change", "steps"} of a run's per-step losses; None for too few steps.

    ``relative_change`` is the fitted change of the smoothed loss over the last quarter of the steps,
    divided by its mean there (−0.2: it still fell by a fifth).

    >>> assess([1.0] * 40)["converged"]
    True
    >>> assess(list(np.linspace(3.0, 1.0, 40)))["converged"]
    False
    >>> assess([2.0, 1.0]) is None
    True
    """
    values = np.asarray(losses, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < MIN_STEPS:
        return None
    smooth = ema(values, max(2, len(values) // 8))
    tail = smooth[-max(4, len(values) // 4):]
    slope = np.polyfit(np.arange(len(tail), dtype=np.float64), tail, 1)[0]
    level = float(np.mean(np.abs(tail)))
    change = float(slope * (len(tail) - 1) / level) if level > 0 else 0.0
    return {"converged": abs(change) <= tolerance, "relative_change": round(change, 4), "steps": len(values)}


def of_row(row: dict[str, Any]) -> dict[str, Any] | None:
    """A stored cell's convergence: recorded in its result.json, else assessed from the losses it kept."""
    train = (row.get("result") or {}).get("train") or {}
    if "convergence" in train:
        return train["convergence"]
    return assess(train["losses"]) if train.get("losses") else None
