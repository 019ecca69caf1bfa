"""The short terminal summary `tunelab compare` ends with: per method its score and costs, then the claims.

The full report (report.md / report.html) has every seed, plot and group; this is what a user should
see without opening a file: what was compared, what it cost, and which claims held.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from statistics import mean, stdev
from typing import Any

from rich.console import Console
from rich.table import Table

from tunelab.compare.claims import evaluate_claims, summarise
from tunelab.compare.sequential import Look, load_looks
from tunelab.compare.store import Store


def finished_rows(store: Store, keys: list[str] | None = None,
                  coords: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The store's finished cells (only ``keys`` if given, labelled by ``coords``: ``Store.tagged_rows``), with
    their task tags and tuning cost (``with_tuning_cost``), as the report reads them."""
    return with_tuning_cost(store.tagged_rows(status="done", keys=keys, coords=coords), store)


def with_tuning_cost(rows: list[dict[str, Any]], store: Store) -> list[dict[str, Any]]:
    """``tuned_cpu_seconds``: a cell's CPU plus an equal share of its method's tuning trials (tuned methods only;
    the cost claim ``pt_cheaper_tuned`` reads it)."""
    tuned = store.tuned()
    if not tuned:
        return rows
    cost: dict[str, float] = defaultdict(float)
    for t in tuned:
        cost[t["method"]] += t["cpu_seconds"] or 0.0
    cells = Counter(r["method"] for r in rows)
    out = []
    for r in rows:
        extra = cost.get(r["method"], 0.0) / cells[r["method"]]
        total = None if r.get("cpu_seconds") is None else r["cpu_seconds"] + extra
        out.append({**r, "tuned_cpu_seconds": total})
    return out


def method_table(rows: list[dict[str, Any]]) -> Table:
    """One line per (task, method): mean score ± std over seeds, trainable parameters, train time, bytes."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["method"])].append(r)
    table = Table(title="methods (mean over seeds)", title_justify="left")
    for name, justify in (("task", "left"), ("method", "left"), ("score", "right"), ("trainable params", "right"),
                          ("train s", "right"), ("bytes", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for (task, method), cells in groups.items():  # grid order: the store keeps the order cells ran in
        values = [c["quality"] for c in cells if c["quality"] is not None]
        spread = f" ± {stdev(values):.1f}" if len(values) > 1 else ""
        score = f"{mean(values):.1f}{spread} {cells[0]['primary_metric']}" if values else "-"
        table.add_row(task, method, score, _int(cells[0]["trainable_params"]),
                      f"{mean(c['train_seconds'] or 0 for c in cells):.1f}", _int(cells[0]["adapter_bytes"]))
    return table


def claims_table(rows: list[dict[str, Any]], n_resamples: int = 1000, looks: dict[str, list[Look]] | None = None,
                 margins: dict[str, float] | None = None) -> tuple[Table, int]:
    """The claims the grid could measure, with their verdicts; and how many it could not (``looks``: the
    sequential tests' earlier looks, ``compare.sequential``; ``margins``: the grid's, as the report uses)."""
    findings = evaluate_claims(rows, n_resamples, margins, looks=looks)
    verdicts = summarise(findings)
    table = Table(title="claims", title_justify="left")
    table.add_column("claim")
    table.add_column("verdict")
    skipped = 0
    for claim_id, finding in {f.claim.id: f for f in findings}.items():
        if verdicts[claim_id] == "not measured":
            skipped += 1
            continue
        table.add_row(finding.claim.test, _coloured(verdicts[claim_id]))
    return table, skipped


def _coloured(verdict: str) -> str:
    colour = "green" if verdict.startswith("supported") else "red" if verdict.startswith("contradicted") else "yellow"
    return f"[{colour}]{verdict}[/{colour}]"


def _int(value: Any) -> str:
    return "-" if value is None else f"{int(value):,}"


def print_summary(console: Console, store: Store, keys: list[str] | None = None,
                  coords: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Print the method table and the measured claims of the cells ``keys`` (all cells without), labelled as
    ``coords`` says (``Store.tagged_rows``)."""
    rows = finished_rows(store, keys, coords)
    if not rows:
        console.print("no finished cells to summarise")
        return
    console.print(method_table(rows))
    claims, skipped = claims_table(rows, looks=load_looks(store.path) or None, margins=store.margins())
    if claims.row_count:
        console.print(claims)
    console.print(f"{skipped} claims not measured by this grid (no cells for one side); see the report"
                  if skipped else "every claim was measured; details in the report", highlight=False)
