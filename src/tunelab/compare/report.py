"""`tunelab report STORE`: report.md (+ plots/*.png) and one self-contained report.html from a results store."""

from __future__ import annotations

import base64
import html
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import numpy as np

from tunelab.compare import plots
from tunelab.compare.claims import CLAIMS, evaluate_claims, summarise
from tunelab.compare.examples import SIMILARITY_KEY, cell_predictions, mean_by_id
from tunelab.compare.sequential import Look, load_looks
from tunelab.compare.store import Store
from tunelab.compare.summary import with_tuning_cost
from tunelab.envinfo import describe_machine
from tunelab.metrics import margins_text
from tunelab.paths import atomic_write_bytes, atomic_write_text
from tunelab.phases import PHASES, overhead
from tunelab.termination import THRESHOLD


@dataclass
class Figure:
    name: str
    title: str
    png: bytes | None
    note: str = ""  # why the figure is absent, or how to read it


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Report:
    title: str
    facts: list[str]
    sections: list[tuple[str, list[Table | Figure | str]]]


def _counted(values: Counter[str]) -> str:
    """``a (3 cells), b (1 cells)``, most first; the value alone where all cells share it."""
    return ", ".join(f"{v} ({n} cells)" if len(values) > 1 else v for v, n in values.most_common())


def build_report(store: Store, keys: list[str] | None = None, n_resamples: int = 1000,
                 sizing: bool = True, coords: Mapping[str, Mapping[str, Any]] | None = None) -> Report:
    """Everything the report shows, from the store's rows (all of them, or only ``keys``). ``coords``: per key,
    the labels a grid gives the cell (``Cell.coords``), over those it was stored with: a cell that another grid
    ran first under the same key (the same configuration) is named as this grid names it."""
    margins = store.margins()
    rows = store.tagged_rows(keys=keys, coords=coords)
    done = with_tuning_cost([r for r in rows if r["status"] == "done"], store)
    failed = [r for r in rows if r["status"] == "failed"]
    grids = sorted({r["grid"] for r in rows})
    facts = [f"store: `{_shown_path(store.path)}`", f"cells: {len(done)} done, {len(failed)} failed",
             f"grid: {', '.join(grids) or '-'}"]
    if done:
        first = done[0]
        models = Counter(r["config"]["model"]["name"] for r in done)  # a grid may compare models
        commits = Counter(r["git_commit"] or "unknown" for r in done)  # a resumed grid can span commits
        facts.append(f"model{'s' if len(models) > 1 else ''}: {_counted(models)}; git commit: {_counted(commits)}")
        from tunelab.models import random_weights  # here: the report needs transformers for nothing else

        if any(random_weights(r["config"]["model"]["name"]) for r in done):
            facts.append("**quality is not meaningful**: random-weight model (tunelab.models); only speed and "
                         "cost figures hold")
        versions = first.get("versions") or {}
        facts.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        machines = Counter(describe_machine(r.get("machine")) for r in done)  # a resumed grid can span machines
        facts.append(f"machine{'s' if len(machines) > 1 else ''}: {_counted(machines)}"
                     + ("; seconds and cells per CPU-hour mix these machines" if len(machines) > 1 else ""))
    sections: list[tuple[str, list[Table | Figure | str]]] = [
        ("Quality per method and task", [quality_table(done),
                                        Figure("quality", "every seed (dots), mean ± std (squares)",
                                               plots.quality_by_method(done))]),
        ("Quality against cost (Pareto)", [_pareto(done, c, label) for c, label in plots.COSTS.items()]),
        ("Cost per cell by phase", _phases(done)),
        ("Learning curves", [_figure_or_note("learning_curve", "quality vs training-set size",
                                             plots.sweep(done, "train_size", "training examples"),
                                             "the grid has one training-set size per task (set `train_sizes`)")]),
        ("Prompt-length sweeps", [_figure_or_note("prompt_length", "quality vs prompt length",
                                                  plots.sweep(done, "prompt_length", "virtual tokens"),
                                                  "the grid has one prompt length per task (set `prompt_lengths`)")]),
        ("IPT minus PT by demonstration similarity", [_similarity(done)]),
        *_claims_and_sizing(done, n_resamples, margins, sizing, load_looks(store.path) or None),
        ("Convergence", [_convergence(done)]),
        ("Termination", [_termination(done)]),
    ]
    tuning = tuning_section(store)
    if tuning:
        sections.insert(1, ("Tuning (equal budget per method, dev split)", tuning))
    if failed:
        sections.append(("Failed cells", [Table(["method", "task", "seed", "error"],
                                                [[r["method"], r["task"], str(r["seed"]),
                                                  (r["error"] or "").splitlines()[0][:300]] for r in failed])]))
    return Report("tunelab comparison report", facts, sections)


def _figure_or_note(name: str, title: str, png: bytes | None, note: str) -> Figure:
    return Figure(name, title, png, "" if png else note)


def _pareto(rows: list[dict[str, Any]], cost: str, label: str) -> Figure:
    """Quality against one cost, or the reason there is no such plot (nothing to trade off)."""
    png = plots.pareto(rows, cost)
    note = "dashed: methods no cheaper method beats" if png else plots.pareto_gap(rows, cost)
    return Figure(f"pareto_{cost}", f"quality vs {label}", png, note)


def _fmt_int(value: Any) -> str:
    return "-" if value is None else f"{int(value):,}"


def _shown_path(path: Path) -> Path:
    """Relative to the working directory when under it (a report in the docs should not name a home dir)."""
    try:
        return Path(path).resolve().relative_to(Path.cwd())
    except ValueError:
        return Path(path)


def _numeric_order(coords: tuple) -> tuple:
    """Sort key for (task, method, size, length): numbers as numbers (5 < 20 < 50), "all" (None) first."""
    return tuple((0, -1) if v is None else (1, v) if isinstance(v, (int, float)) else (2, str(v)) for v in coords)


def by_setting(rows: list[dict[str, Any]]) -> list[tuple[tuple, list[dict[str, Any]]]]:
    """Cells grouped by setting (task, method, train size, prompt length), settings in numeric order, each
    group's cells by seed: the rows of the per-setting tables (quality, termination)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["method"], r["train_size"], r["prompt_length"])].append(r)
    return [(coords, sorted(cells, key=lambda c: c["seed"]))
            for coords, cells in sorted(groups.items(), key=lambda kv: _numeric_order(kv[0]))]


def _setting(size: Any, length: Any) -> list[str]:
    return ["all" if size is None else str(size), "-" if length is None else str(length)]


def quality_table(rows: list[dict[str, Any]]) -> Table:
    out = []
    for (task, method, size, length), cells in by_setting(rows):
        values = [c["quality"] for c in cells]
        spread = f" ± {stdev(values):.2f}" if len(values) > 1 else ""
        out.append([task, method, *_setting(size, length), cells[0]["primary_metric"], f"{mean(values):.2f}{spread}",
                    ", ".join(f"{c['seed']}: {c['quality']:.2f}" for c in cells),
                    _fmt_int(cells[0]["trainable_params"]),
                    f"{mean(c['train_seconds'] for c in cells):.1f}", f"{mean(c['eval_seconds'] for c in cells):.1f}",
                    _cpu(cells), f"{max(c['peak_rss_mb'] or 0 for c in cells):.0f}",
                    _fmt_int(cells[0]["adapter_bytes"]), _forgetting(cells)])
    return Table(["task", "method", "train size", "prompt len", "metric", "mean ± std", "per seed",
                  "trainable params", "train s", "eval s", "cell CPU s", "peak RSS MB", "adapter bytes",
                  "forgetting"], out)


def _phases(rows: list[dict[str, Any]]) -> list[Table | Figure | str]:
    table = phase_table(rows)
    if table is None:
        return ["No cell recorded its phases (cells stored before tunelab.phases existed)."]
    return [table, "Mean wall seconds per cell and phase (tunelab.phases). spawn: the grid starting the cell's process "
                   "(the first cell of a grid also starts the fork server); other: what no phase claims (process "
                   "exit, reading the result back); overhead: every phase but build, train and eval."]


def phase_table(rows: list[dict[str, Any]]) -> Table | None:
    """Mean wall seconds per phase of a cell, per method (``tunelab.phases``), with what is neither adapting nor
    generating (``overhead``); None when no cell recorded its phases (stores written before they were)."""
    timed: dict[str, list[dict[str, float]]] = defaultdict(list)
    for r in rows:
        wall = ((r.get("result") or {}).get("phases") or {}).get("wall")
        if wall and r.get("cell_seconds") is not None:
            timed[r["method"]].append({**wall, "cell": float(r["cell_seconds"])})
    if not timed:
        return None
    shown = [p for p in PHASES if any(p in w for cells in timed.values() for w in cells)]
    out = []
    for method, cells in sorted(timed.items()):
        means = {p: mean(w.get(p, 0.0) for w in cells) for p in (*shown, "cell")}
        spent = mean(overhead({k: v for k, v in w.items() if k != "cell"}) for w in cells)
        out.append([method, str(len(cells)), f"{means['cell']:.1f}", *(f"{means[p]:.1f}" for p in shown),
                    f"{spent:.1f} ({spent / means['cell']:.0%})" if means["cell"] else f"{spent:.1f}"])
    return Table(["method", "cells", "cell s", *shown, "overhead s"], out)


def _forgetting(cells: list[dict[str, Any]]) -> str:
    """Mean general-text loss increase over the base model (nats/token; tunelab.forgetting), '-' if not measured."""
    values = [float(c["forgetting"]) for c in cells if c.get("forgetting") is not None]
    return f"{mean(values):+.3f}" if values else "-"


def _cpu(cells: list[dict[str, Any]]) -> str:
    values = [float(c["cpu_seconds"]) for c in cells if c.get("cpu_seconds") is not None]
    return f"{mean(values):.1f}" if values else "-"


def _similarity(rows: list[dict[str, Any]]) -> Figure:
    """Bucket examples by IPT's demonstration similarity; plot mean (IPT - PT) per quintile and task."""
    buckets = similarity_buckets(rows)
    if not buckets:
        return Figure("similarity", "IPT − PT by demonstration-similarity quintile", None,
                      f"not measured: needs IPT and PT cells on the same task, with per-example `{SIMILARITY_KEY}` "
                      "in the IPT predictions rows")
    return Figure("similarity", "IPT − PT by demonstration-similarity quintile", plots.similarity_buckets(buckets),
                  "per example: IPT score minus PT score (each averaged over seeds); error bars: standard error")


def similarity_buckets(rows: list[dict[str, Any]]) -> dict[str, list[tuple[str, float, float, int]]]:
    """{"task (metric)": [(quintile, mean IPT − PT, standard error, n), ...]} over examples bucketed by
    IPT's demonstration similarity (tasks with IPT and PT cells and at least 10 shared examples).

    The two sides are those of the claims table's similarity claim, so the figure and the claim compare
    the same cells."""
    claim = next(c for c in CLAIMS if c.kind == "similarity")
    buckets: dict[str, list[tuple[str, float, float, int]]] = {}
    for task in sorted({r["task"] for r in rows}):
        ipt = [r for r in rows if r["task"] == task and claim.a(r)]
        pt = [r for r in rows if r["task"] == task and claim.b(r)]
        if not ipt or not pt:
            continue
        ipt_rows = [cell_predictions(r) for r in ipt]
        if not all(SIMILARITY_KEY in p for preds in ipt_rows for p in preds):
            continue
        metric = next((m for m in ipt_rows[0][0].get("scores", {})), None)
        if metric is None:
            continue
        diffs, sims = _per_example_diff(ipt_rows, [cell_predictions(r) for r in pt], metric)
        if len(diffs) < 10:
            continue
        edges = np.quantile(sims, [0.2, 0.4, 0.6, 0.8])
        bucket = np.searchsorted(edges, sims, side="right")
        bars = []
        for q in range(5):
            d = diffs[bucket == q]
            if len(d):
                sem = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
                bars.append((f"Q{q + 1}", float(d.mean()), sem, len(d)))
        buckets[f"{task} ({metric})"] = bars
    return buckets


def _per_example_diff(ipt: list[tuple[dict, ...]], pt: list[tuple[dict, ...]], metric: str
                      ) -> tuple[np.ndarray, np.ndarray]:
    ipt_score = mean_by_id(ipt, lambda p: p.get("scores", {}).get(metric))
    pt_score = mean_by_id(pt, lambda p: p.get("scores", {}).get(metric))
    sim = mean_by_id(ipt, lambda p: p.get(SIMILARITY_KEY))
    ids = sorted(set(ipt_score) & set(pt_score) & set(sim))
    return np.array([ipt_score[i] - pt_score[i] for i in ids]), np.array([sim[i] for i in ids])


def _claims_and_sizing(rows: list[dict[str, Any]], n_resamples: int, margins: dict[str, float],
                       sizing: bool, looks: dict[str, list[Look]] | None = None
                       ) -> list[tuple[str, list[Table | Figure | str]]]:
    findings = evaluate_claims(rows, n_resamples, margins, looks=looks)
    out: list[tuple[str, list[Table | Figure | str]]] = [("Claims", _claims(findings))]
    if sizing:
        from tunelab.compare.sizing import size_claims, sizing_note, sizing_table

        sizings = size_claims(rows, margins, findings=findings)
        if sizings:
            out.append(("Sizing: rows and seeds for a decisive verdict", [sizing_note(sizings),
                                                                         Table(*sizing_table(sizings))]))
    return out


def _convergence(rows: list[dict[str, Any]]) -> Table | str:
    """Cells whose training loss was still moving at the end (``tunelab.convergence``); a note if none."""
    from tunelab.convergence import TOLERANCE, of_row

    checked = [(r, of_row(r)) for r in rows]
    moving = [(r, c) for r, c in checked if c is not None and not c["converged"]]
    told = sum(1 for _, c in checked if c is not None)
    if not moving:
        return (f"Every trained cell's loss had flattened ({told} checked: the EMA-smoothed loss changed by at most "
                f"{TOLERANCE:.0%} over the last quarter of training; runs under 16 steps are not judged).")
    return Table(["method", "task", "seed", "steps", "loss change over the last quarter"],
                 [[r["method"], r["task"], str(r["seed"]), str(c["steps"]), f"{c['relative_change']:+.1%}"]
                  for r, c in moving])


def _termination(rows: list[dict[str, Any]]) -> Table | str:
    """Per method and task: the share of answers cut at the token limit (``tunelab.termination``), per seed, and
    over five or more seeds its rank correlation with the score (does the spread over seeds follow it?)."""
    from scipy import stats as sps

    from tunelab.termination import of_row, runaway

    recorded = [r for r in rows if of_row(r) is not None]
    if not recorded:
        return "No cell recorded whether its answers ended (cells stored before tunelab recorded it, or scored by ranking only)."
    out = []
    for (task, method, size, length), cells in by_setting(recorded):
        shares = [of_row(r)["share"] for r in cells]
        scores = [r["quality"] for r in cells]
        rho = "-"
        if len(cells) >= 5 and len(set(shares)) > 1 and len(set(scores)) > 1:
            value, p = sps.spearmanr(shares, scores)
            rho = f"{value:+.2f} (p={p:.2g})"
        flagged = sum(1 for r in cells if runaway(r))
        out.append([task, method, *_setting(size, length), str(len(cells)), f"{mean(shares):.0%}",
                    ", ".join(f"{r['seed']}: {s:.0%}" for r, s in zip(cells, shares, strict=True)), f"{flagged} of {len(cells)}",
                    str(of_row(cells[0])["max_new_tokens"]), rho])
    return Table(["task", "method", "train size", "prompt len", "cells", "cut at the limit (mean)", "per seed", f"cells over {THRESHOLD:.0%}",
                  "token limit", "rank corr. with score over seeds"], out)


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def procedure(f: Any) -> str:
    """Which procedure gave this finding its verdict: fixed-sample or sequential (a test: its p-value or interval),
    measured (a cost claim: a measured ratio against a noise band, no test), or - (nothing was measured)."""
    if f.effect is None:
        return "-"
    return "measured" if f.claim.kind == "cost" else f.procedure


def _procedures(findings: list) -> str:
    """The procedures behind a claim's verdict over its groups (e.g. sequential where it ran until decisive)."""
    return ", ".join(sorted({procedure(f) for f in findings} - {"-"})) or "-"


def _claims(findings: list) -> list[Table | Figure | str]:
    overall = summarise(findings)
    summary = Table(["claim (as the articles make it)", "tested as", "verdict", "procedure"],
                    [[f.claim.source, f.claim.test, overall[f.claim.id],
                      _procedures([g for g in findings if g.claim.id == f.claim.id])]
                     for f in {f.claim.id: f for f in findings}.values()])
    detail = Table(["tested as", "group", "n (rows x seeds)", "effect (A − B)", "95% CI", "MDE (80%)", "margin",
                    "p (Holm)", "TOST p (Holm)", "verdict", "procedure", "measured"],
                   [[f.claim.test, f.group, _n(f), "-" if f.effect is None else f"{f.effect:+.3g}",
                     "-" if f.ci is None else f"[{f.ci[0]:+.3g}, {f.ci[1]:+.3g}]",
                     "-" if f.mde is None else f"{f.mde:.3g}", "-" if f.margin is None else f"±{f.margin:g}",
                     "-" if f.p_value is None else f"{_p(f.p_value)} ({_p(f.p_adjusted)})",
                     "-" if f.p_tost is None else f"{_p(f.p_tost)} ({_p(f.p_tost_adjusted)})",
                     f.verdict + (f" ({f.caveat})" if f.caveat else ""), procedure(f), f.detail]
                    for f in findings])
    tests = sum(1 for f in findings if f.tested)
    note = (f"Quality claims ({tests} tests): paired bootstrap (1,000 resamples) over evaluation rows (shared by both "
            "methods) and seeds (drawn per method) gives A − B, its 95% interval and its standard error; p from t on "
            "A − B over that standard error, Holm-adjusted across all the report's quality tests (adjusted p in "
            "brackets; verdicts use it). *supported* / *contradicted*: adjusted p < 0.05, by the sign of A − B; "
            f"*equivalent*: adjusted TOST p < 0.05, |A − B| within the margin (each metric's own: {margins_text()}; "
            "grid key `margins`); *underpowered*: neither. MDE: the "
            "difference a test with these rows and seeds finds with 80% power. *all tasks*: one test across the "
            "claim's groups (stratified bootstrap: rows resampled within each, groups weighted equally); it gives "
            "the claim's verdict. Contrast claims: effect = a difference of two differences on the rows all four "
            "sides evaluated (e.g. the larger model's instruction-tuning gain minus the smaller's), the same "
            "bootstrap with rows shared by the four, tested and Holm-adjusted with the quality claims. Cost claims "
            "compare measured means (effect = ratio A / B). *not measured*: the grid lacks the cells the claim "
            "needs (said in its row). A verdict holds for this model, data and budget only. *procedure*, per verdict: "
            "fixed-sample (the t test above, or a variance, similarity or loss-gap claim's own test at the seeds it "
            "has) or sequential (a grid run `until: decisive` added cells while looking at these tests; its p-values "
            "are anytime-valid: alpha split between the t test at the first look, the planned cells, and a normal-mixture "
            "confidence sequence over every look, Howard et al. 2021, p = min(1, 2 min(p_first, p_mixture))); "
            "measured: a cost "
            "claim's ratio, no test. Variance claims: effect = sd over seeds of A / that of B, Brown–Forsythe test on "
            "the per-seed scores (Holm across variance tests); fewer than 10 seeds a side is *underpowered* whatever "
            "the data. "
            "*unconverged*: a side's training loss was still moving at the end (Convergence section). "
            f"*answers ran to the token limit*: a side has cells that cut over {THRESHOLD:.0%} of their answers at "
            "the token limit instead of ending them (Termination section).")
    return [note, summary, detail]


def _n(f: Any) -> str:
    if not f.n or "examples" not in f.n:
        return "-"
    if "groups" in f.n:
        return f"{f.n['examples']} rows, {f.n['groups']} groups"
    return f"{f.n['examples']} x {f.n.get('a_seeds', '?')}/{f.n.get('b_seeds', '?')}"


def tuning_section(store: Store) -> list[Table | Figure | str]:
    """Each tuned method's trials (dev score vs configuration), its winner and the tuning cost."""
    from tunelab.compare.tuning import tuning_tables

    return tuning_tables(store)


# ---------------------------------------------------------------- rendering


def write_report(report: Report, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.md`` (with ``plots/*.png``) and a self-contained ``report.html``; return both paths."""
    out_dir = Path(out_dir)
    for _, items in report.sections:
        for item in items:
            if isinstance(item, Figure) and item.png:
                atomic_write_bytes(out_dir / "plots" / f"{item.name}.png", item.png)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(md_path, to_markdown(report))
    atomic_write_text(html_path, to_html(report))
    return md_path, html_path


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(report: Report) -> str:
    lines = [f"# {report.title}", "", *[f"- {f}" for f in report.facts], ""]
    for title, items in report.sections:
        lines += [f"## {title}", ""]
        for item in items:
            if isinstance(item, Table):
                lines.append("| " + " | ".join(item.headers) + " |")
                lines.append("|" + "---|" * len(item.headers))
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in item.rows]
            elif isinstance(item, Figure):
                lines.append(f"![{item.title}](plots/{item.name}.png)" if item.png else f"*{item.title}: {item.note}*")
                if item.png and item.note:
                    lines.append(f"*{item.note}*")
            else:
                lines.append(item)
            lines.append("")
    return "\n".join(lines)


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.85em}th,td{border:1px solid #ccc;padding:3px 6px;
text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%;display:block;margin:0.5em 0}
.note{color:#555;font-style:italic}.supported{background:#e3f6e3}.contradicted{background:#fbe3e3}
.inconclusive,.mixed,.underpowered{background:#fff7dc}.equivalent{background:#e3ecfb}"""


def _inline(text: str) -> str:
    """Markdown's `code` and *emphasis* in a note, as HTML (everything else escaped)."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", text)


def to_html(report: Report) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(report.title)}</h1><ul>",
             *[f"<li>{_inline(f)}</li>" for f in report.facts], "</ul>"]
    for title, items in report.sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        for item in items:
            if isinstance(item, Table):
                parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in item.headers) + "</tr>")
                for row in item.rows:
                    cells = "".join(f"<td class='{html.escape(c.split(' ')[0])}'>{html.escape(c)}</td>" for c in row)
                    parts.append(f"<tr>{cells}</tr>")
                parts.append("</table>")
            elif isinstance(item, Figure):
                if item.png:
                    data = base64.b64encode(item.png).decode()
                    parts.append(f"<figure><img alt='{html.escape(item.title)}' src='data:image/png;base64,{data}'>"
                                 f"<figcaption class='note'>{html.escape(item.title)}"
                                 f"{'. ' + _inline(item.note) if item.note else ''}</figcaption></figure>")
                else:
                    parts.append(f"<p class='note'>{html.escape(item.title)}: {_inline(item.note)}</p>")
            else:
                parts.append(f"<p class='note'>{_inline(item)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
