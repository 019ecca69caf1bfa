"""``until: decisive``: after the planned cells, add seeds (or test rows) where they help most, until every
quality test is decisive or the budget is spent.

Each round measures the claims (every quality test's look is recorded, ``compare.sequential``), and among
the tests still *underpowered* prices every possible next addition by its expected reduction of their
standard errors per second of cell time:

- one more seed of a method on a group: its side's seed part of se² = example_var / rows + Σ var_i / S_i
  drops from var / S to var / (S + 1) (for every open test that side belongs to). A quality test has two
  sides (A, B), a contrast (A − B) − (C − D) four, each with its own seed spread (``Finding.seed_vars``);
- twice the test rows for a test's sides, where the row term dominates its se²: the example part
  halves; every cell of every side is run again with ``data.max_eval`` doubled (and replaces the old ones).

A side gains nothing from a seed when its cells cannot vary with one (``reseedable``): a single seed or no
spread over seeds (a deterministic method: greedy ICL, the base model). A cell that starts from another cell's
adapter (a transfer cell, ``init_from: {cell: ...}``) draws its spread over seeds from its sources, so its new
seed starts from its source method's cell of that seed (``reseeded``, the pairing ``grid.resolve_sources``
uses): where that source cell does not exist yet, the step trains it first and its seconds count in the price
(its own use to the source method's tests is not counted: the price errs high).

Reductions are counted relative to the se each test needs (``stats.se_needed``), summed over the tests a
cell serves, and divided by the cells' expected seconds (the mean stored ``cell_seconds`` of that side).
The verdicts of such a grid come from the anytime-valid procedure (``compare.sequential``), so stopping
when the tests turn decisive does not inflate the false-positive rate.

A variance claim (Brown–Forsythe, ``claims._variance``) is never decided below ``stats.SPREAD_MIN_SEEDS``
seeds a side. Once no priced addition helps an open quality test (they are decided, or nothing narrows them),
a variance test *underpowered* for want of seeds gets a seed of its side with fewer seeds per round, until
both have the minimum or the budget is spent. Quality tests come first because they are the claims' verdicts
and a budget rarely covers both: a spread test's seeds on a second model can cost the whole budget (the paper
preset's SmolLM2 PT / IPT, 3 seeds a side: 28 cells). These seeds are chosen by seed counts only, never by the
spread test's p-value, and the spread test never stops the loop, so it stays a fixed-sample test. How many it
gets depends on the budget the quality additions left, i.e. on the quality tests' mean differences; for normal
scores the sample mean and variance are independent, so that choice does not bias the Brown–Forsythe test
(approximately so for other scores).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

from rich.console import Console

from tunelab.compare.claims import ACROSS_TASKS, Finding, evaluate_claims, look_of
from tunelab.compare.grid import Cell, coords_of, started_from, with_params
from tunelab.compare.sequential import load_looks, look_key, save_looks, with_look
from tunelab.compare.store import Store
from tunelab.errors import ConfigError
from tunelab.stats import ALPHA, SPREAD_MIN_SEEDS, se_needed

UNTIL = ("decisive",)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_budget(text: str | float | int) -> float:
    """Seconds from ``3h``, ``90m``, ``1h30m``, ``45s`` or a plain number of seconds.

    >>> parse_budget("1h30m"), parse_budget("45s"), parse_budget(120)
    (5400.0, 45.0, 120.0)
    """
    if (isinstance(text, (int, float)) and not isinstance(text, bool)) or re.fullmatch(r"\d+(\.\d+)?", str(text)):
        seconds = float(text)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd])", str(text).strip().lower())
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smhd])", "", str(text).strip().lower()).strip():
            raise ConfigError(f"budget: {text!r} is not a duration; give e.g. 3h, 90m, 1h30m or 600s")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ConfigError(f"budget: {text!r} must be a positive duration, e.g. 3h")
    return seconds


@dataclass
class Step:
    """The next cells to run, what they are expected to buy and cost, and the cells they replace."""

    add: list[Cell]
    gain: float  # summed over open tests: (se now − se expected) / se needed
    seconds: float  # expected cell time of ``add``
    reason: str
    drop: list[str] = field(default_factory=list)  # keys of cells these replace (more test rows)

    @property
    def value(self) -> float:
        return self.gain / max(self.seconds, 1e-9)


def open_tests(findings: list[Finding]) -> list[Finding]:
    """Tests an added cell can still decide: quality and contrast tests (per group; the pooled ones follow from
    them) that are neither decided nor equivalent, and variance tests underpowered for want of seeds."""
    return [f for f in findings if f.group != ACROSS_TASKS and f.verdict == "underpowered"
            and (f.tested or short_of_seeds(f))]


def short_of_seeds(f: Finding) -> bool:
    """A variance test with fewer than ``SPREAD_MIN_SEEDS`` seeds on a side (never decided so)."""
    return f.spread_p is not None and min(f.n.get("a_seeds", 0), f.n.get("b_seeds", 0)) < SPREAD_MIN_SEEDS


def reseedable(side: list[Cell], var: float) -> bool:
    """Can another seed of this side's cells change its score? Not with one seed or no spread over seeds (a
    deterministic method, or a cell started from a fixed adapter without training)."""
    return len(side) >= 2 and var > 0


def next_step(findings: list[Finding], rows: list[dict[str, Any]], cells: list[Cell],
              alpha: float = ALPHA, planned: Sequence[Cell] = ()) -> Step | None:
    """The next addition: the one with the largest expected reduction in standard error per second of the open
    quality tests, else (none left that helps) a seed a variance test lacks (``short_of_seeds``); None if none.
    ``cells``: the cells measured now; ``planned``: the grid's own (a transfer cell's source may have been
    replaced in ``cells`` by its version on more test rows)."""
    by_key = {c.key: c for c in cells}
    seconds = {r["key"]: _seconds(r) for r in rows}
    tested = [f for f in findings if f.tested]
    level = alpha / max(1, len(tested))
    seeds: dict[tuple, Step] = {}
    candidates: list[Step] = []
    for f in open_tests(findings):
        if not f.tested:
            continue
        assert f.se is not None and f.margin is not None
        target = se_needed(f.margin, level)
        se2, n = f.se ** 2, max(f.n.get("examples", 1), 1)
        for keys, var in zip(f.keys, f.seed_vars, strict=True):  # two sides (A, B), or a contrast's four
            side = [by_key[k] for k in keys if k in by_key]
            if not reseedable(side, var):
                continue
            count = len(side)
            gain = (f.se - max(se2 - var / count + var / (count + 1), 0.0) ** 0.5) / target
            place = _place(side[0])
            if place not in seeds:
                seeds[place] = _seed_step(side, cells, seconds, planned)
            seeds[place].gain += gain
        rows_step = _more_rows(f, cells, by_key, seconds, se2, n, target)
        if rows_step is not None:
            candidates.append(rows_step)
    candidates += list(seeds.values())
    candidates = [c for c in candidates if c.gain > 0]
    if candidates:
        return max(candidates, key=lambda c: c.value)
    return _spread_step(findings, by_key, cells, seconds, planned)


def _spread_step(findings: list[Finding], by_key: dict[str, Cell], cells: list[Cell],
                 seconds: dict[str, float | None], planned: Sequence[Cell] = ()) -> Step | None:
    """One more seed of the side with fewer seeds of the first variance test short of seeds that can gain one."""
    for f in open_tests(findings):
        if not short_of_seeds(f):
            continue
        sides = [([by_key[k] for k in keys if k in by_key], var) for keys, var in zip(f.keys, f.seed_vars, strict=True)]
        short = [side for side, var in sides if len(side) < SPREAD_MIN_SEEDS]
        if not short or not all(reseedable(side, var) for side, var in sides if len(side) < SPREAD_MIN_SEEDS):
            continue  # a side that cannot vary never reaches a verdict
        side = min(short, key=lambda s: (len(s), _mean([seconds.get(c.key) for c in s])))
        step = _seed_step(side, cells, seconds, planned)
        step.reason += f" ({f.claim.id} on {f.group} needs {SPREAD_MIN_SEEDS} seeds a side)"
        return step
    return None


def _place(cell: Cell) -> tuple:
    """Where a seed is added: one method entry on one task, size, prompt length and model."""
    return cell.method, cell.task, cell.train_size, cell.prompt_length, cell.config.model.name


def _seed_step(side: list[Cell], cells: list[Cell], seconds: dict[str, float | None],
               planned: Sequence[Cell] = ()) -> Step:
    """The next seed of ``side``'s method on its group (gain 0: the caller counts what it buys), after that seed
    of its source cell where it starts from another cell's adapter and that seed is not run yet (a transfer to a
    second task then reuses the source seed the first one trained)."""
    template = side[0]
    new, source = _reseeded(template, 1 + max(c.seed for c in cells if _place(c) == _place(template)),
                            [*cells, *planned])
    price, reason = _mean([seconds.get(c.key) for c in side]), f"seed {new.seed} of {template.method} on {_where(template)}"
    if source is None or source.key in {c.key for c in cells}:
        return Step([new], 0.0, price, reason)
    kin = [c for c in cells if _place(c) == _place(source)]
    return Step([source, new], 0.0, price + _mean([seconds.get(c.key) for c in kin]),
                f"{reason}, after seed {source.seed} of its source {source.method} on {_where(source)}")


def _more_rows(f: Finding, cells: list[Cell], by_key: dict[str, Cell], seconds: dict[str, float | None],
               se2: float, n: int, target: float) -> Step | None:
    """Every side again on twice the rows, where the example part of se² is the larger and the file has them."""
    row_part = f.example_var / n
    seed_part = sum(v / max(len(keys), 1) for v, keys in zip(f.seed_vars, f.keys, strict=True))
    side = [by_key[k] for keys in f.keys for k in keys if k in by_key]
    if row_part <= seed_part or not side:
        return None
    limits = {c.config.data.max_eval for c in side}
    if None in limits or any(n < limit for limit in limits if limit is not None):  # every row is used already
        return None
    new = [with_params(c, {"data.max_eval": 2 * n}) for c in side]
    gain = (f.se - max(se2 - row_part / 2, 0.0) ** 0.5) / target
    return Step(new, gain, sum(seconds.get(c.key) or 0.0 for c in side) * 2, f"{2 * n} test rows for "
                f"{f.claim.test} on {f.group}", drop=[c.key for c in side])


def reseeded(cell: Cell, seed: int, cells: Sequence[Cell] = ()) -> Cell:
    """The same cell (tuned parameters and all) trained with another seed. A cell that starts from another cell's
    adapter starts from its source method's cell of that seed (``_source``; ``cells`` must hold its source)."""
    return _reseeded(cell, seed, cells)[0]


def _reseeded(cell: Cell, seed: int, cells: Sequence[Cell]) -> tuple[Cell, Cell | None]:
    """``reseeded`` and the source cell it starts from (None if it starts from none)."""
    new = dataclasses.replace(with_params(cell, {"train.seed": seed}), seed=seed, prompt_length=cell.prompt_length)
    if cell.source_key is None:
        return new, None
    source = _source(cell, seed, cells)
    return started_from(new, source, Path(cell.config.method.init_from).parent), source


def _source(cell: Cell, seed: int, cells: Sequence[Cell]) -> Cell:
    """The cell ``cell`` starts from, with ``seed``: that seed's cell at the source's place in ``cells`` (its version
    on the most test rows, as ``resumed`` keeps), else a new seed of the source on the most rows its place uses.
    The rows a source was scored on do not change its adapter; they only name it."""
    origin = next((c for c in cells if c.key == cell.source_key), None)
    if origin is None:
        raise ConfigError(f"{cell.method} on {cell.task} (seed {cell.seed}) starts from cell {cell.source_key}, which "
                          "is not among the grid's cells: a new seed of it cannot find its source")
    here = [c for c in cells if _place(c) == _place(origin)]
    same = [c for c in here if c.seed == seed]
    if same:
        return max(same, key=_rows)
    new = reseeded(origin, seed, cells)
    most = max(here, key=_rows).config.data.max_eval
    return new if most == new.config.data.max_eval else with_params(new, {"data.max_eval": most})


def _rows(cell: Cell) -> float:
    """Test rows a cell is scored on (None: every row of the file)."""
    rows = cell.config.data.max_eval
    return float("inf") if rows is None else rows


def _seconds(row: dict[str, Any]) -> float | None:
    for name in ("cell_seconds", "cpu_seconds"):
        if row.get(name):
            return float(row[name])
    if row.get("train_seconds") is not None:
        return float(row["train_seconds"]) + float(row.get("eval_seconds") or 0.0)
    return None


def _mean(values: list[float | None]) -> float:
    known = [v for v in values if v is not None]
    return mean(known) if known else 1.0


def _where(cell: Cell) -> str:
    parts = [cell.task] + ([f"n={cell.train_size}"] if cell.train_size is not None else []) + (
        [f"len={cell.prompt_length}"] if cell.prompt_length is not None else [])
    return " ".join(parts)


@dataclass
class Outcome:
    cells: list[Cell]  # the planned cells plus those added (minus those replaced by more rows)
    rounds: int = 0
    seconds: float = 0.0  # cell time spent on additions
    stopped: str = ""  # why it stopped


def until_decisive(store: Store, store_path: Path, cells: list[Cell], budget: float,
                   run: Callable[[list[Cell]], Any], console: Console, n_resamples: int = 1000) -> Outcome:
    """Add cells (``next_step``) and run them (``run``) until no quality test is underpowered or ``budget``
    seconds of cell time are spent; every round's measurement is a look of the sequential tests."""
    looks = load_looks(store_path)
    outcome = Outcome(resumed(store, cells))
    if not looks and {c.key for c in outcome.cells} != {c.key for c in cells}:
        looks = _planned_looks(store, cells, n_resamples)
        console.print("until decisive: no looks file beside the store but cells an earlier run added; the first look "
                      "is taken on the planned cells alone (the sample the split's t test assumes), then the rest",
                      highlight=False)
    while True:
        rows = _done_rows(store, outcome.cells)
        findings = evaluate_claims(rows, n_resamples, store.margins(), looks=looks)
        for f in findings:
            if f.tested:
                key = look_key(f.claim.id, f.group)
                looks[key] = with_look(looks.get(key, []), look_of(f))
        save_looks(store_path, looks)
        waiting = open_tests(findings)
        if not waiting:
            outcome.stopped = "every quality test is decisive"
            break
        step = next_step(findings, rows, outcome.cells, planned=cells)
        if step is None:
            outcome.stopped = f"{len(waiting)} test(s) still underpowered; no seed or row can narrow them"
            break
        if outcome.seconds + step.seconds > budget:
            outcome.stopped = (f"budget: {len(waiting)} test(s) still underpowered; the next addition ({step.reason}, "
                               f"~{step.seconds:.0f}s) would pass the budget")
            break
        cut = f"expected se cut {step.gain:.3f} of the target, " if step.gain > 0 else ""
        console.print(f"until decisive: {len(waiting)} test(s) underpowered; adding {step.reason} "
                      f"({cut}~{step.seconds:.0f}s)", highlight=False)
        run(step.add)
        added = {r["key"]: r for r in _done_rows(store, step.add, status=None)}
        outcome.seconds += sum(_seconds(r) or 0.0 for r in added.values())
        outcome.rounds += 1
        failed = [c for c in step.add if (added.get(c.key) or {}).get("status") != "done"]
        if failed:  # a failed source would leave its transfer cell without a start, a failed cell a side short
            outcome.stopped = f"{len(failed)} of the {len(step.add)} added cells failed ({step.reason}); stopping"
            break
        outcome.cells = [c for c in outcome.cells if c.key not in step.drop] + step.add
    console.print(f"until decisive: {outcome.rounds} round(s), {outcome.seconds:.0f}s of cells; {outcome.stopped}",
                  highlight=False)
    return outcome


def _planned_looks(store: Store, cells: list[Cell], n_resamples: int) -> dict[str, list]:
    """Every test's look on the planned cells alone: the first look when the looks file is gone but added cells
    remain (``sequential.split_p_values`` spends half of alpha on a t test of that first look, valid only if it is
    the planned sample). The looks in between are lost, which costs the mixture power but not validity."""
    findings = evaluate_claims(_done_rows(store, cells), n_resamples, store.margins())
    return {look_key(f.claim.id, f.group): [look_of(f)] for f in findings if f.tested}


def resumed(store: Store, cells: list[Cell]) -> list[Cell]:
    """The planned cells plus those an earlier ``until: decisive`` run on this store added (a planned cell under
    another seed, and/or on more test rows: the version on the most rows replaces the others), so a rerun builds on
    them even where its own choices would differ (another budget, or a tunelab whose allocation changed)."""
    planned = {c.key for c in cells}
    extra = {r.key: r.data for r in store.rows(status="done") if r.key not in planned}
    if not extra:
        return list(cells)
    seeds = sorted({int(d["seed"]) for d in extra.values() if d.get("seed") is not None})
    evals = sorted({int(n) for d in extra.values()
                    if (n := ((d.get("config") or {}).get("data") or {}).get("max_eval")) is not None})
    out: dict[str, Cell] = {}  # by key: another planned seed's variant under the same seed is the same cell
    for cell in sorted(cells, key=lambda c: c.source_key is not None):  # sources first: a transfer's new seed
        for variant in [cell] + [reseeded(cell, s, [*cells, *out.values()]) for s in seeds if s != cell.seed]:
            rows = variant.config.data.max_eval
            larger = [with_params(variant, {"data.max_eval": n}) for n in evals if rows is not None and n > rows]
            found = [v for v in larger if v.key in extra]
            if found:
                out.setdefault(found[-1].key, found[-1])  # the most rows
            elif variant is cell or variant.key in extra:
                out.setdefault(variant.key, variant)
    return list(out.values())


def superseded(rows: list[dict[str, Any]]) -> set[str]:
    """Keys of done cells that a done cell of the same configuration on more test rows replaced (``until:
    decisive`` doubled their rows): a report of the whole store leaves them out, as the grid's own report does."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for row in rows:
        if row.get("status") != "done":
            continue
        config = json.loads(json.dumps(row.get("config") or {}, default=str))
        config.pop("out", None)  # the cell's own folder
        rows_used = (config.get("data") or {}).pop("max_eval", None)
        size = int(rows_used) if rows_used is not None else 1 << 62
        groups.setdefault(json.dumps(config, sort_keys=True), []).append((size, row["key"]))
    return {key for group in groups.values() for size, key in group if size < max(s for s, _ in group)}


def _done_rows(store: Store, cells: list[Cell], status: str | None = "done") -> list[dict[str, Any]]:
    return store.tagged_rows(status=status, keys=[c.key for c in cells], coords=coords_of(cells))
