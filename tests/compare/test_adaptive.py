"""``until: decisive``: seeds added where they narrow the open tests most, under the sequential procedure.

No cell trains here: ``run`` writes synthetic store rows (per-example scores drawn from the cell's
method and seed), so the loop, the planner, the looks and the report are tested in milliseconds.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from tunelab.compare.adaptive import next_step, parse_budget, reseeded, resumed, until_decisive
from tunelab.compare.claims import evaluate_claims
from tunelab.compare.grid import expand, parse_grid, with_params
from tunelab.compare.sequential import load_looks
from tunelab.compare.store import Store
from tunelab.config import to_dict
from tunelab.errors import ConfigError

ROWS = 150


def _grid(seeds=(0, 1, 2)):
    return parse_grid({"name": "g", "model": {"name": "tiny"}, "data": {"max_eval": ROWS},
                       "methods": [{"name": "ipt", "label": "ipt"}, {"name": "prompt_tuning", "label": "pt"}],
                       "tasks": ["date_format"], "seeds": list(seeds), "until": "decisive", "budget": "1h"})


def _record(store: Store, tmp: Path, cell, gain: float, seed_sd: dict[str, float], seconds: float = 10.0) -> None:
    """A finished cell: exact match per row; the method's mean plus a seed effect, plus shared row difficulty."""
    rng = np.random.default_rng(1000 * (cell.method == "pt") + cell.seed)
    difficulty = np.random.default_rng(7).uniform(0.2, 0.8, ROWS)  # the same rows for every cell
    shift = (gain if cell.method == "ipt" else 0.0) + rng.normal(0, seed_sd[cell.method])
    scores = 100.0 * (rng.random(ROWS) < np.clip(difficulty + shift, 0, 1))
    path = tmp / f"{cell.key}.jsonl"
    path.write_text("".join(json.dumps({"id": f"e{i}", "scores": {"exact_match": s}}) + "\n"
                            for i, s in enumerate(scores)))
    store.record({**cell.coords(), "key": cell.key, "grid": "g", "config": {**to_dict(cell.config), "out": str(tmp / cell.key)}, "status": "done",
        "primary_metric": "exact_match", "quality": float(scores.mean()), "predictions": str(path),
        "metrics": {"exact_match": float(scores.mean())}, "cell_seconds": seconds, "train_seconds": seconds,
        "eval_seconds": 0.0, "out_dir": str(tmp), "unseen": 0})


def _setup(tmp_path, gain, seed_sd, seeds=(0, 1, 2)):
    cells = expand(_grid(seeds))
    store = Store(tmp_path / "results.sqlite")
    for cell in cells:
        _record(store, tmp_path, cell, gain, seed_sd)
    ran: list = []

    def run(more):
        ran.extend(more)
        for cell in more:
            _record(store, tmp_path, cell, gain, seed_sd)

    return cells, store, run, ran


def test_seeds_are_added_until_a_real_gain_is_decided_sequentially(tmp_path):
    cells, store, run, ran = _setup(tmp_path, gain=0.06, seed_sd={"ipt": 0.05, "pt": 0.05})
    rows = [r.data for r in store.rows()]
    (before,) = [f for f in evaluate_claims(rows, 300) if f.claim.id == "ipt_beats_pt"]
    assert before.verdict == "underpowered"
    outcome = until_decisive(store, tmp_path / "results.sqlite", cells, 3600, run, Console(quiet=True), 300)
    assert outcome.stopped == "every quality test is decisive" and ran and outcome.rounds == len(ran)
    assert all(c.seed > 2 for c in ran) and len({c.key for c in outcome.cells}) == len(outcome.cells)
    looks = load_looks(tmp_path / "results.sqlite")["ipt_beats_pt|date_format"]
    assert len(looks) == outcome.rounds + 1  # the planned cells, then one look per addition
    final = evaluate_claims([r.data for r in store.rows()], 300, looks=load_looks(tmp_path / "results.sqlite"))
    (test,) = [f for f in final if f.claim.id == "ipt_beats_pt"]
    assert test.verdict == "supported" and test.procedure == "sequential" and test.n["looks"] == len(looks)
    assert outcome.seconds == pytest.approx(10.0 * len(ran))


def test_the_budget_stops_the_additions(tmp_path):
    cells, store, run, ran = _setup(tmp_path, gain=0.06, seed_sd={"ipt": 0.05, "pt": 0.05})
    outcome = until_decisive(store, tmp_path / "results.sqlite", cells, 25, run, Console(quiet=True), 300)
    assert len(ran) == 2 and outcome.stopped.startswith("budget")  # 10 s a cell: a third would pass 25 s


def test_the_noisier_side_gets_the_next_seed(tmp_path):
    cells, store, _, _ = _setup(tmp_path, gain=0.0, seed_sd={"ipt": 0.01, "pt": 0.12})
    rows = [r.data for r in store.rows()]
    step = next_step(evaluate_claims(rows, 300), rows, cells)
    assert step is not None and [c.method for c in step.add] == ["pt"] and step.add[0].seed == 3
    assert step.add[0].key not in {c.key for c in cells}


def test_a_cheaper_side_wins_at_equal_noise(tmp_path):
    cells, store, _, _ = _setup(tmp_path, gain=0.0, seed_sd={"ipt": 0.08, "pt": 0.08})
    rows = [r.data for r in store.rows()]
    for r in rows:  # IPT cells took 50x longer
        r["cell_seconds"] = 500.0 if r["method"] == "ipt" else 10.0
    step = next_step(evaluate_claims(rows, 300), rows, cells)
    assert step is not None and step.add[0].method == "pt"


def test_more_rows_when_the_row_term_dominates(tmp_path):
    """No seed spread at all: only more test rows can narrow the interval; both sides rerun on twice the rows."""
    cells, store, _, _ = _setup(tmp_path, gain=0.0, seed_sd={"ipt": 0.0, "pt": 0.0}, seeds=(0,))
    rows = [r.data for r in store.rows()]
    step = next_step(evaluate_claims(rows, 300), rows, cells)
    assert step is not None and "300 test rows" in step.reason and sorted(step.drop) == sorted(c.key for c in cells)
    assert {c.config.data.max_eval for c in step.add} == {2 * ROWS}


def test_reseeded_cell_is_the_same_config_with_another_seed():
    cell = expand(_grid())[0]
    other = reseeded(cell, 9)
    assert other.seed == 9 and other.config.train.seed == 9 and other.key != cell.key
    assert other.config.method == cell.config.method and other.prompt_length == cell.prompt_length


def test_grid_keys_and_budget_are_checked():
    assert parse_budget("3h") == 10800 and parse_budget("90m") == 5400
    for bad in ("3 hours", "-1", "0"):
        with pytest.raises(ConfigError, match="budget"):
            parse_budget(bad)
    with pytest.raises(ConfigError, match="needs a budget"):
        parse_grid({"methods": ["icl"], "tasks": ["date_format"], "until": "decisive"})
    with pytest.raises(ConfigError, match="until: 'soon'"):
        parse_grid({"methods": ["icl"], "tasks": ["date_format"], "until": "soon", "budget": "1h"})


def test_compare_with_until_decisive_adds_cells_and_reports_them_as_sequential(tmp_path, monkeypatch):
    """The wiring in ``compare``: run_grid (faked: synthetic rows, no training) for the plan, then the additions."""
    import yaml

    import tunelab.compare as compare_module
    from tunelab.compare.runner import GridSummary

    grid = {"name": "g", "model": {"name": "tiny"}, "data": {"max_eval": ROWS}, "train": {"steps": 2},
            "methods": [{"name": "ipt", "label": "ipt"}, {"name": "prompt_tuning", "label": "pt"}],
            "tasks": ["date_format"], "seeds": [0, 1, 2]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    out = tmp_path / "out"
    batches: list[list] = []

    def fake_run_grid(grid, cells, store, out_dir, **kwargs):
        batches.append(list(cells))
        for cell in cells:
            _record(store, tmp_path, cell, 0.1, {"ipt": 0.05, "pt": 0.05})
        return GridSummary(done=len(cells))

    monkeypatch.setattr(compare_module, "run_grid", fake_run_grid)
    outcome = compare_module.compare(path, out, overrides=["until=decisive", "budget=10m"], progress=False,
                                     console=Console(quiet=True))
    assert len(batches) > 1 and all(len(b) == 1 for b in batches[1:])  # the plan, then one cell at a time
    assert outcome.summary.done == sum(len(b) for b in batches) == len(outcome.cells)
    report = outcome.report_md.read_text()
    assert "| sequential |" in report and "supported" in report


# ---------------------------------------------------------------- contrast and variance claims

TASKS = ["date_format", "entity_extraction"]


def _gap_grid():
    """PT and LoRA on both tasks, and each task-date_format cell used as is on entity_extraction (0 steps):
    the four sides of ``pt_transfer_gap`` on entity_extraction."""
    moved = {"init_from": {"cell": {"task": "date_format"}}, "train": {"steps": 0}, "tasks": ["entity_extraction"]}
    methods = [{"name": "prompt_tuning", "label": "pt", "num_virtual_tokens": 4}, {"name": "lora", "label": "lora"},
               {"name": "prompt_tuning", "label": "pt_moved", "num_virtual_tokens": 4,
                **moved, "init_from": {"cell": {"method": "pt", "task": "date_format"}}},
               {"name": "lora", "label": "lora_moved", **moved,
                "init_from": {"cell": {"method": "lora", "task": "date_format"}}}]
    return parse_grid({"name": "g", "model": {"name": "tiny"}, "data": {"max_eval": ROWS}, "methods": methods,
                       "tasks": TASKS, "seeds": [0, 1, 2]})


def _record_any(store: Store, tmp: Path, cell, mean: float, seed_sd: float, seconds: float = 10.0) -> None:
    """A finished cell whose per-row exact match is ``mean`` + a seed effect (sd ``seed_sd``) + row difficulty;
    with ``seed_sd`` 0 every seed gives the same answers (a deterministic method)."""
    seed = cell.seed if seed_sd else 0
    rng = np.random.default_rng(zlib.crc32(f"{cell.method}|{cell.task}|{seed}".encode()))
    difficulty = np.random.default_rng(7).uniform(-0.3, 0.3, ROWS)
    scores = 100.0 * (rng.random(ROWS) < np.clip(mean + difficulty + rng.normal(0, seed_sd), 0, 1))
    path = tmp / f"{cell.key}.jsonl"
    path.write_text("".join(json.dumps({"id": f"e{i}", "scores": {"exact_match": s}}) + "\n"
                            for i, s in enumerate(scores)))
    store.record({**cell.coords(), "key": cell.key, "grid": "g", "config": {**to_dict(cell.config), "out": str(tmp / cell.key)}, "status": "done",
                  "primary_metric": "exact_match", "quality": float(scores.mean()), "predictions": str(path),
                  "metrics": {"exact_match": float(scores.mean())}, "cell_seconds": seconds,
                  "train_seconds": seconds, "eval_seconds": 0.0, "out_dir": str(tmp), "unseen": 0})


def _gap_findings(tmp_path, seed_sd: dict[str, float]):
    from tunelab.compare.grid import resolve_sources

    cells = resolve_sources(expand(_gap_grid()), tmp_path / "out")
    store = Store(tmp_path / "results.sqlite")
    for cell in cells:
        _record_any(store, tmp_path, cell, 0.5, seed_sd[cell.method])
    rows = [r.data for r in store.rows()]
    findings = evaluate_claims(rows, 300)
    (gap,) = [f for f in findings if f.claim.id == "pt_transfer_gap"]
    return cells, rows, gap


def test_an_open_contrast_gets_a_seed_on_its_side_that_narrows_it_most(tmp_path):
    """The contrast's four sides each carry their cells and seed spread; the side whose seed narrows it most per
    second gets the seed. A moved cell (0 steps from a source cell) costs its source's new seed too."""
    cells, rows, gap = _gap_findings(tmp_path, {"pt": 0.01, "lora": 0.1, "pt_moved": 0.1, "lora_moved": 0.1})
    assert gap.verdict == "underpowered" and gap.group == "entity_extraction len=4"
    assert [len(k) for k in gap.keys] == [3, 3, 3, 3] and len(gap.seed_vars) == 4
    # few seeds: the t test's degrees of freedom count them (fixed-sample and sequential alike), far below rows - 1
    assert gap.welch_df is not None and gap.welch_df == gap.df < gap.n["examples"] - 1
    step = next_step([gap], rows, cells)  # the contrast alone (LoRA > PT's own tests would also want seeds)
    # equal spread, but a moved side's seed costs two cells (its source's seed, then itself): LoRA's is cheaper
    assert step is not None and [(c.method, c.task, c.seed) for c in step.add] == [("lora", "entity_extraction", 3)]
    assert step.gain > 0 and not step.drop


def test_a_moved_side_s_new_seed_starts_from_its_source_s_new_seed(tmp_path):
    """A transfer cell's spread over seeds is its sources': its new seed trains the source method's next seed
    first (both priced), then starts from it, as ``resolve_sources`` pairs a planned transfer cell with the
    source cell of its seed. Without the source's seed, the new cell would repeat seed 0's source."""
    cells, rows, gap = _gap_findings(tmp_path, {"pt": 0.0, "lora": 0.0, "pt_moved": 0.1, "lora_moved": 0.1})
    assert gap.verdict == "underpowered"
    step = next_step([gap], rows, cells)
    assert step is not None and step.gain > 0 and "after seed 3 of its source" in step.reason
    source, moved = step.add
    assert (source.task, source.seed, source.source_key) == ("date_format", 3, None)
    assert moved.task == "entity_extraction" and moved.seed == 3 and moved.method == source.method + "_moved"
    assert moved.source_key == source.key and moved.config.method.init_from == str(tmp_path / "out" / "cells" / source.key)
    assert step.seconds == pytest.approx(20.0)  # 10 s for the source seed, 10 s for the moved cell
    planned_source = next(c for c in cells if c.method == source.method and c.task == "date_format" and c.seed == 1)
    again = reseeded(moved, 1, cells + step.add)  # a seed the source already has: its planned cell, not a new one
    assert again.source_key == planned_source.key
    assert again.key == next(c for c in cells if c.method == moved.method and c.seed == 1).key


def test_until_decisive_runs_a_moved_cell_s_source_first_and_a_rerun_finds_both(tmp_path):
    from tunelab.compare.grid import resolve_sources

    cells = resolve_sources(expand(_gap_grid()), tmp_path / "out")
    sds = {"pt": 0.0, "lora": 0.0, "pt_moved": 0.1, "lora_moved": 0.1}
    store, batches = _stored(tmp_path, cells, sds), []

    def run(more):
        batches.append(list(more))
        for cell in more:
            _record_any(store, tmp_path, cell, 0.5, sds[cell.method])

    outcome = until_decisive(store, tmp_path / "results.sqlite", cells, 45, run, Console(quiet=True), 300)
    planned = {c.key for c in cells}
    for batch in batches:  # a moved cell's source is planned or runs before it in the same addition
        for i, cell in enumerate(batch):
            assert cell.source_key is None or cell.source_key in planned | {c.key for c in batch[:i]}
    assert any(b[1].source_key == b[0].key and b[0].key not in planned for b in batches if len(b) == 2)
    added = {c.key for b in batches for c in b}
    assert added <= {c.key for c in outcome.cells}
    assert {c.key for c in resumed(store, cells)} == {c.key for c in outcome.cells}


def test_an_open_quality_test_gets_its_seed_before_a_variance_test_short_of_seeds(tmp_path):
    """Both open: the priced quality addition (the noisy PT side) runs first, not the spread test's seed (which
    would take the cheaper side, IPT, at equal seed counts)."""
    cells, store, _, _ = _setup(tmp_path, gain=0.0, seed_sd={"ipt": 0.005, "pt": 0.15})
    rows = [r.data for r in store.rows()]
    for r in rows:
        r["cell_seconds"] = 5.0 if r["method"] == "ipt" else 10.0
    findings = evaluate_claims(rows, 300)
    (quality,) = [f for f in findings if f.claim.id == "ipt_beats_pt"]
    (spread,) = [f for f in findings if f.claim.id == "pt_unstable"]
    assert quality.verdict == "underpowered" and spread.verdict == "underpowered"
    step = next_step(findings, rows, cells)
    assert step is not None and step.add[0].method == "pt" and "pt_unstable" not in step.reason


def test_a_variance_claim_short_of_seeds_gets_seeds_on_both_sides_up_to_the_minimum(tmp_path):
    """PT vs IPT spread: with 3 seeds a side no verdict is possible; until decisive adds seeds, one side at a
    time, until both have SPREAD_MIN_SEEDS, although the quality test was decided at once."""
    from tunelab.stats import SPREAD_MIN_SEEDS

    cells, store, run, ran = _setup(tmp_path, gain=0.4, seed_sd={"ipt": 0.03, "pt": 0.03})
    rows = [r.data for r in store.rows()]
    findings = evaluate_claims(rows, 300)
    (quality,) = [f for f in findings if f.claim.id == "ipt_beats_pt"]
    (spread,) = [f for f in findings if f.claim.id == "pt_unstable"]
    assert quality.verdict == "supported" and spread.verdict == "underpowered"
    step = next_step(findings, rows, cells)
    assert step is not None and "pt_unstable" in step.reason and step.add[0].seed == 3
    outcome = until_decisive(store, tmp_path / "results.sqlite", cells, 3600, run, Console(quiet=True), 300)
    assert outcome.stopped == "every quality test is decisive"
    seeds = {m: sorted(c.seed for c in outcome.cells if c.method == m) for m in ("ipt", "pt")}
    assert seeds == {m: list(range(SPREAD_MIN_SEEDS)) for m in ("ipt", "pt")}
    final = evaluate_claims([r.data for r in store.rows()], 300)
    (spread,) = [f for f in final if f.claim.id == "pt_unstable"]
    assert spread.verdict != "underpowered" and spread.n["a_seeds"] == spread.n["b_seeds"] == SPREAD_MIN_SEEDS


def test_the_report_names_the_procedure_of_every_verdict(tmp_path):
    """Per row of both claims tables: sequential for the quality tests a grid looked at while adding cells,
    fixed-sample for the spread test (never looked at to stop), - where nothing was measured."""
    from tunelab.compare.report import _claims

    cells, store, run, _ = _setup(tmp_path, gain=0.06, seed_sd={"ipt": 0.05, "pt": 0.05})
    until_decisive(store, tmp_path / "results.sqlite", cells, 60, run, Console(quiet=True), 300)
    findings = evaluate_claims([r.data for r in store.rows()], 300, looks=load_looks(tmp_path / "results.sqlite"))
    _, summary, detail = _claims(findings)
    assert summary.headers[-1] == "procedure" and detail.headers[-2] == "procedure"
    by_test = {row[1]: row[-1] for row in summary.rows}
    assert by_test["IPT > PT (quality, same task/data/length)"] == "sequential"
    assert by_test["std over seeds: PT > IPT"] == "fixed-sample"
    assert by_test["LoRA > PT (same task and data)"] == "-"  # not measured
    assert {(row[0], row[-2]) for row in detail.rows if row[0].startswith(("IPT >", "std over"))} == {
        ("IPT > PT (quality, same task/data/length)", "sequential"), ("std over seeds: PT > IPT", "fixed-sample")}


def test_a_rerun_builds_on_the_cells_an_earlier_run_added_whatever_it_would_choose(tmp_path):
    """An earlier run added seed 5 of IPT and put PT seed 0 on twice the rows: a rerun (whose own first choice may
    differ) starts from those cells, the larger PT cell in place of the planned one."""
    cells, store, _, ran = _setup(tmp_path, gain=0.06, seed_sd={"ipt": 0.05, "pt": 0.05})
    ipt = next(c for c in cells if c.method == "ipt")
    pt = next(c for c in cells if c.method == "pt" and c.seed == 0)
    added = [reseeded(ipt, 5), with_params(pt, {"data.max_eval": 2 * ROWS})]
    for cell in added:
        _record(store, tmp_path, cell, 0.06, {"ipt": 0.05, "pt": 0.05})
    keys = {c.key for c in resumed(store, cells)}
    assert keys == {c.key for c in cells} - {pt.key} | {c.key for c in added}
    outcome = until_decisive(store, tmp_path / "results.sqlite", cells, 0, lambda more: None, Console(quiet=True), 300)
    assert {c.key for c in outcome.cells} == keys and outcome.stopped.startswith("budget")
    assert resumed(Store(tmp_path / "other.sqlite"), cells) == cells  # nothing added: the planned cells


def test_a_report_of_the_whole_store_leaves_out_the_cells_more_rows_replaced(tmp_path):
    """`tunelab report DIR` reads every stored cell: the 150-row version of a cell that until decisive reran on
    300 rows must not count as a second seed; the plain grid rerun reports the added cells too."""
    from tunelab.compare import report_store
    from tunelab.compare.adaptive import superseded

    cells, store, _, _ = _setup(tmp_path, gain=0.06, seed_sd={"ipt": 0.05, "pt": 0.05})
    pt = next(c for c in cells if c.method == "pt" and c.seed == 0)
    bigger = with_params(pt, {"data.max_eval": 2 * ROWS})
    _record(store, tmp_path, bigger, 0.06, {"ipt": 0.05, "pt": 0.05})
    rows = [r.data for r in store.rows()]
    assert superseded(rows) == {pt.key} and superseded(list(reversed(rows))) == {pt.key}
    md, _ = report_store(tmp_path / "results.sqlite", tmp_path / "report")
    assert f"cells: {len(cells)} done" in md.read_text()  # 6 cells: the 300-row PT seed 0 in place of the old one


def test_a_lost_looks_file_takes_the_first_look_on_the_planned_cells_alone(tmp_path):
    """The split's t test half assumes the first look is the planned sample: with the looks file gone and an added
    seed in the store, the rerun's first look must still be the planned cells', not one that counts the addition."""
    from tunelab.compare.claims import look_of
    from tunelab.compare.sequential import looks_path

    cells, store, _, _ = _setup(tmp_path, gain=0.06, seed_sd={"ipt": 0.05, "pt": 0.05})
    planned = [f for f in evaluate_claims([r.data for r in store.rows()], 300) if f.claim.id == "ipt_beats_pt"]
    added = reseeded(next(c for c in cells if c.method == "pt"), 7)
    _record(store, tmp_path, added, 0.06, {"ipt": 0.05, "pt": 0.05})
    assert not looks_path(tmp_path / "results.sqlite").exists()
    until_decisive(store, tmp_path / "results.sqlite", cells, 0, lambda more: None, Console(quiet=True), 300)
    looks = load_looks(tmp_path / "results.sqlite")["ipt_beats_pt|date_format"]
    assert len(looks) == 2 and looks[0] == look_of(planned[0])  # planned, then with seed 7 of PT
    assert looks[1].df != looks[0].df


def _stored(tmp_path: Path, cells: list, seed_sd: dict[str, float]) -> Store:
    """A store holding ``cells`` done (``_record_any``, mean 0.5, each method's seed spread)."""
    store = Store(tmp_path / "results.sqlite")
    for cell in cells:
        _record_any(store, tmp_path, cell, 0.5, seed_sd[cell.method])
    return store


def _transfer_cells(tmp_path):
    """PT on date_format (3 seeds), its prompts used as is with retrieved demonstrations on entity_extraction
    (``transfer``, 0 steps, 3 seeds: one per source seed) and retrieved ICL there: ``prompt_transfer``'s sides."""
    from tunelab.compare.grid import resolve_sources

    transfer = {"name": "ipt", "label": "transfer", "num_virtual_tokens": 4, "k": 1, "selection": "similar",
                "init_from": {"cell": {"method": "pt", "task": "date_format"}}, "train": {"steps": 0},
                "tasks": ["entity_extraction"]}
    methods = [{"name": "prompt_tuning", "num_virtual_tokens": 4, "label": "pt", "tasks": ["date_format"]},
               {"name": "icl", "k": 1, "selection": "similar", "label": "icl_retrieved",
                "tasks": ["entity_extraction"], "seeds": [0]}, transfer]
    grid = parse_grid({"name": "g", "model": {"name": "tiny"}, "data": {"max_eval": ROWS}, "methods": methods,
                       "tasks": TASKS, "seeds": [0, 1, 2]})
    return resolve_sources(expand(grid), tmp_path / "out")


def test_a_transfer_seed_finds_its_source_after_the_source_s_rows_were_doubled(tmp_path):
    """until decisive reran the source place (PT on date_format) on twice the rows, which replaced the planned
    source cells; a new transfer seed must still find its source (the grid's planned cells name it), train that
    seed on the rows its place now uses, and a rerun (``resumed``) must rebuild the very same keys."""
    cells = _transfer_cells(tmp_path)
    doubled = [with_params(c, {"data.max_eval": 2 * ROWS}) for c in cells if c.method == "pt"]
    current = [c for c in cells if c.method != "pt"] + doubled
    sds = {"pt": 0.0, "icl_retrieved": 0.0, "transfer": 0.15}
    store = _stored(tmp_path, current, sds)
    rows = [r.data for r in store.rows()]
    (test,) = [f for f in evaluate_claims(rows, 300) if f.claim.id == "prompt_transfer" and f.group != "all tasks"]
    assert test.verdict == "underpowered"
    with pytest.raises(ConfigError, match="not among the grid's cells"):  # without the planned cells: no source
        next_step([test], rows, current)
    step = next_step([test], rows, current, planned=cells)
    assert step is not None and [(c.method, c.seed) for c in step.add] == [("pt", 3), ("transfer", 3)]
    source, moved = step.add
    assert source.config.data.max_eval == 2 * ROWS and moved.source_key == source.key
    for cell in step.add:
        _record_any(store, tmp_path, cell, 0.5, sds[cell.method])
    assert {c.key for c in resumed(store, cells)} == {c.key for c in current} | {source.key, moved.key}


def test_an_added_cell_that_fails_stops_the_additions(tmp_path):
    """A transfer seed's source trained, the transfer cell failed: stop, rather than train source after source."""
    cells = _transfer_cells(tmp_path)
    sds = {"pt": 0.0, "icl_retrieved": 0.0, "transfer": 0.15}
    store, batches = _stored(tmp_path, cells, sds), []

    def run(more):
        batches.append(list(more))
        for cell in more:
            if cell.source_key is None:
                _record_any(store, tmp_path, cell, 0.5, sds[cell.method])
            else:
                store.record({**cell.coords(), "key": cell.key, "grid": "g", "config": to_dict(cell.config),
                              "status": "failed", "error": "out of memory"})

    outcome = until_decisive(store, tmp_path / "results.sqlite", cells, 3600, run, Console(quiet=True), 300)
    assert len(batches) == 1 and outcome.stopped.startswith("1 of the 2 added cells failed")


def test_a_contrast_still_pairs_moved_cells_after_their_sources_rows_were_doubled(tmp_path):
    """``pt_transfer_gap`` knows a moved cell's source by key. Once until decisive reran PT and LoRA on date_format
    on twice the rows, the planned sources are no longer among the measured keys; the store still holds them, and
    ``Store.tagged_rows`` names each moved cell's source from there, so the contrast stays measured."""
    from tunelab.compare.grid import resolve_sources

    cells = resolve_sources(expand(_gap_grid()), tmp_path / "out")
    sds = {"pt": 0.05, "lora": 0.05, "pt_moved": 0.1, "lora_moved": 0.1}
    store = _stored(tmp_path, cells, sds)
    sources = [c for c in cells if c.task == "date_format"]
    doubled = [with_params(c, {"data.max_eval": 2 * ROWS}) for c in sources]
    for cell in doubled:
        _record_any(store, tmp_path, cell, 0.5, sds[cell.method])
    current = [c.key for c in cells if c.task != "date_format"] + [c.key for c in doubled]

    def gap(rows):
        (found,) = [f for f in evaluate_claims(rows, 300) if f.claim.id == "pt_transfer_gap"]
        return found

    assert gap([r.data for r in store.rows(keys=current)]).verdict == "not measured"  # the rows alone: no source
    measured = gap(store.tagged_rows(keys=current))
    assert measured.verdict != "not measured" and [len(k) for k in measured.keys] == [3, 3, 3, 3]
