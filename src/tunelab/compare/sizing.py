"""Sizing: how many test rows and seeds each quality claim needs to become decisive at its margin.

From a pilot grid's per-example scores (the store), each quality test's bootstrap splits its variance
into an example part and a seed part (``PairedResult.example_var`` / ``seed_var``); the test is
decisive at the margin once its standard error is at most ``stats.se_needed(margin, alpha)``: a true
difference of one margin is then detected with 80% power and a true difference of 0 is shown
equivalent with 80% power. ``alpha`` is the Bonferroni level 0.05 / m of the report's m quality tests
(the strictest step Holm can ask for), so the numbers are safe for the whole report. Rows needed for
S seeds per method: n = example_var / (se_needed² − seed_var / S).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.compare.claims import Finding, evaluate_claims
from tunelab.stats import ALPHA, Sizing, size_for_margin

SEED_OPTIONS = (3, 5, 10)


@dataclass
class ClaimSizing:
    finding: Finding
    sizing: Sizing
    alpha: float


def size_claims(rows: list[dict[str, Any]], margins: dict[str, float] | None = None, n_resamples: int = 1000,
                findings: list[Finding] | None = None) -> list[ClaimSizing]:
    """One sizing per quality test (per task group; the pooled tests across tasks are left out)."""
    findings = findings if findings is not None else evaluate_claims(rows, n_resamples, margins)
    tested = [f for f in findings if f.tested]
    alpha = ALPHA / max(1, len(tested))
    out = []
    for f in tested:
        if f.group == "all tasks":
            continue
        seeds = max(f.n.get("a_seeds", 1), f.n.get("b_seeds", 1))
        out.append(ClaimSizing(f, size_for_margin(f.example_var, f.seed_var, f.n.get("examples", 0), seeds,
                                                  f.margin, alpha=alpha, seed_options=SEED_OPTIONS), alpha))
    return out


def sizing_table(sizings: list[ClaimSizing]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the sizing table (report section and `tunelab size`)."""
    seeds = sorted({s for c in sizings for s in c.sizing.rows_needed})
    headers = ["tested as", "group", "verdict now", "metric", "margin", "rows x seeds now", "se now", "se needed",
               *[f"rows @ {s} seeds" for s in seeds]]
    body = []
    for c in sizings:
        z = c.sizing
        body.append([c.finding.claim.test, c.finding.group, c.finding.verdict, c.finding.metric or "-", f"±{z.margin:g}",
                     f"{z.rows_now} x {z.seeds_now}", f"{z.se_now:.2f}", f"{z.se_needed:.2f}",
                     *["-" if s not in z.rows_needed else "never" if z.rows_needed[s] is None
                       else f"{z.rows_needed[s]:,}" for s in seeds]])
    return headers, body


def sizing_note(sizings: list[ClaimSizing]) -> str:
    alpha = sizings[0].alpha if sizings else ALPHA
    return ("Rows each quality test needs to be decisive at its margin (80% power to detect a difference of one "
            f"margin, and 80% power to show equivalence when there is none), at alpha = {alpha:.3g} (0.05 over "
            "the report's quality tests: the strictest Holm step). From the pilot's variance split "
            "se² = example variance / rows + seed variance / seeds; *never*: the seed-to-seed spread alone exceeds "
            "the target at that many seeds. A test whose verdict is already supported, contradicted or "
            "equivalent needs no more: its effect is far enough from 0 (or inside the margin) at today's error; "
            "the rows shown are what would make *any* effect of this test decisive.")
