"""The report: Markdown + self-contained HTML from a store built by a tiny grid."""

from __future__ import annotations

import base64
import json
import re

from tests.compare.conftest import TINY_GRID

from tunelab.compare import plots, report_store
from tunelab.compare.report import build_report, to_html
from tunelab.compare.store import Store


def test_report_from_a_tiny_grid(tiny_report):
    md = tiny_report.report_md.read_text()
    for section in ("Quality per method and task", "Quality against cost", "Learning curves", "Prompt-length sweeps",
                    "IPT minus PT by demonstration similarity", "Claims"):
        assert f"## {section}" in md
    # every seed of every setting is listed, with mean ± std (and, per setting, the share of answers cut)
    quality = md.split("## Quality per method and task")[1].split("\n## ")[0]
    assert quality.count("| date_format | pt | ") == 2 and quality.count("| date_format | zero_shot | ") == 2
    termination = md.split("## Termination")[1].split("\n## ")[0]
    assert termination.count("| date_format | pt | ") == 2 and termination.count("| date_format | zero_shot | ") == 2
    assert "0: " in md and "1: " in md and " ± " in md
    assert "![quality vs training-set size](plots/learning_curve.png)" in md
    assert "the grid has one prompt length per task" in md  # the sweep is absent, with the reason
    assert "| IPT improves on prompt tuning (Sun et al. 2023) | IPT > PT (quality, same task/data/length) | not measured |" in md
    assert "PT > random ICL" in md
    for name in ("quality", "pareto_trainable_params", "pareto_train_seconds", "pareto_adapter_bytes",
                 "learning_curve"):
        assert (tiny_report.report_md.parent / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_html_is_self_contained(tiny_report):
    html = tiny_report.report_html.read_text()
    images = re.findall(r"src='data:image/png;base64,([^']+)'", html)
    assert len(images) == 5
    assert all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)
    assert not re.search(r"(src|href)=['\"](?!data:)", html)  # nothing loaded from files or the network


def test_report_command_rebuilds_from_the_store(tiny_report, tmp_path):
    md, html = report_store(tiny_report.store, tmp_path)
    assert md.read_text().split("## Claims")[1] == tiny_report.report_md.read_text().split("## Claims")[1]
    assert html.is_file()


def test_prompt_length_sweep_plot_and_html_escaping(tiny_report):
    with Store(tiny_report.store) as store:
        rows = [r.data for r in store.rows(status="done")]
    swept = [{**r, "prompt_length": 2 + 2 * (r["seed"] % 2)} for r in rows if r["method"] == "pt"]
    assert plots.sweep(swept, "prompt_length", "virtual tokens")[:4] == b"\x89PNG"
    assert plots.sweep([r for r in swept if r["prompt_length"] == 2], "prompt_length", "x") is None
    with Store(tiny_report.store) as store:
        rep = build_report(store)
    rep.facts.append("<script>alert(1)</script>")
    assert "<script>" not in to_html(rep)


def _similarity_rows(tmp_path, with_similarity: bool) -> list[dict]:
    import json

    rows = []
    for method in ("ipt", "prompt_tuning"):
        for seed in (0, 1):
            path = tmp_path / f"{method}-{seed}.jsonl"
            preds = []
            for i in range(50):
                # IPT wins exactly on the examples whose demonstration is similar (i >= 25)
                score = 100.0 if (method == "ipt" and i >= 25) else 0.0
                row = {"id": f"e{i}", "prediction": "x", "references": ["y"], "scores": {"exact_match": score}}
                if method == "ipt" and with_similarity:
                    row["demo_similarity"] = i / 50
                preds.append(row)
            path.write_text("".join(json.dumps(p) + "\n" for p in preds))
            rows.append({"task": "t", "method": method, "method_name": method, "seed": seed,
                         "predictions": str(path)})
    return rows


def test_similarity_quintiles_when_recorded(tmp_path):
    from tunelab.compare.report import _similarity

    figure = _similarity(_similarity_rows(tmp_path, with_similarity=True))
    assert figure.png[:4] == b"\x89PNG" and "standard error" in figure.note
    absent = _similarity(_similarity_rows(tmp_path, with_similarity=False))
    assert absent.png is None and "not measured" in absent.note and "demo_similarity" in absent.note


def test_similarity_buckets_follow_the_data(tmp_path, monkeypatch):
    import tunelab.compare.report as report_module

    captured = {}
    monkeypatch.setattr(report_module.plots, "similarity_buckets", lambda b: captured.update(b) or b"png")
    report_module._similarity(_similarity_rows(tmp_path, with_similarity=True))
    (bars,) = captured.values()
    assert [round(b[1]) for b in bars] == [0, 0, 50, 100, 100]  # Q3 straddles the switch at similarity 0.5
    assert sum(b[3] for b in bars) == 50


def test_quality_table_orders_numbers_as_numbers_and_lists_every_commit(tiny_report, tmp_path):
    import shutil

    from tunelab.compare.report import quality_table

    with Store(tiny_report.store) as store:
        rows = [r.data for r in store.rows(status="done")]
        facts = build_report(store).facts
    pt = [r for r in rows if r["method"] == "pt"]
    swept = [{**r, "prompt_length": length, "seed": r["seed"]} for length in (50, 5, 20) for r in pt]
    table_rows = [row for row in quality_table(swept).rows if row[1] == "pt"]
    lengths = [row[3] for row in table_rows]  # per (task, train size): 5, 20, 50, not the string order 20, 5, 50
    assert lengths == ["5", "20", "50"] * (len(lengths) // 3) and lengths
    assert any(f.startswith("model: ") for f in facts) and "(" not in next(f for f in facts if f.startswith("model"))
    copy = shutil.copy(tiny_report.store, tmp_path / "results.sqlite")  # the fixture's store is shared
    with Store(copy) as store:
        store.conn.execute("UPDATE cells SET git_commit = 'abc123' WHERE method = 'pt'")
        facts = build_report(store).facts
    model_fact = next(f for f in facts if f.startswith("model"))
    assert "abc123 (" in model_fact and " cells)" in model_fact
    with Store(copy) as store:  # a grid comparing two models names both, not the first cell's
        store.conn.execute("UPDATE cells SET config = json_set(config, '$.model.name', 'other-model') "
                           "WHERE method = 'pt'")
        n_pt = store.conn.execute("SELECT COUNT(*) FROM cells WHERE method = 'pt' AND status = 'done'").fetchone()[0]
        facts = build_report(store).facts
    model_fact = next(f for f in facts if f.startswith("model"))
    assert model_fact.startswith("models: ") and f"other-model ({n_pt} cells)" in model_fact


def test_report_names_the_machines_its_cells_ran_on(tiny_report, tmp_path):
    import shutil

    from tunelab import envinfo

    here = envinfo.describe_machine(envinfo.machine())
    with Store(tiny_report.store) as store:
        stored = {json.dumps(r.data["machine"], sort_keys=True) for r in store.rows(status="done")}
        facts = build_report(store).facts
    assert stored == {json.dumps(envinfo.machine(), sort_keys=True)}  # each cell recorded where it ran
    assert f"machine: {here}" in facts
    copy = shutil.copy(tiny_report.store, tmp_path / "results.sqlite")  # the fixture's store is shared
    with Store(copy) as store:  # cells stored before tunelab recorded the machine, beside today's
        store.conn.execute("UPDATE cells SET machine = NULL WHERE method = 'pt'")
        n_pt = store.conn.execute("SELECT COUNT(*) FROM cells WHERE method = 'pt' AND status = 'done'").fetchone()[0]
        facts = build_report(store).facts
    (fact,) = [f for f in facts if f.startswith("machine")]
    assert fact.startswith("machines: ") and f"unknown ({n_pt} cells)" in fact and f"{here} (" in fact
    assert fact.endswith("seconds and cells per CPU-hour mix these machines")


def _quality_store(tmp_path):
    """A store with IPT and PT cells on two tasks (per-example exact match), no training needed."""
    import random as _random

    from tests.compare.test_claims import _cell

    db = Store(tmp_path / "results.sqlite")
    for t, (p_ipt, p_pt) in enumerate(((0.7, 0.3), (0.5, 0.5))):
        for method, p in (("ipt", p_ipt), ("pt", p_pt)):
            for seed in range(2):
                rng = _random.Random(f"{t}{method}{seed}")
                row = _cell(tmp_path, method, seed, [100.0 * (rng.random() < p) for _ in range(80)], task=f"t{t}")
                row["config"] = {**row["config"], "model": {"name": "tiny"}}
                db.record({**row, "key": f"{method}{t}{seed}", "grid": "g", "status": "done", "cpu_seconds": 1.0,
                           "train_seconds": 1.0, "eval_seconds": 1.0, "peak_rss_mb": 1.0, "trainable_params": 1})
    return db


def test_claims_section_shows_holm_tost_mde_and_sizing(tmp_path):
    db = _quality_store(tmp_path)
    report = build_report(db, n_resamples=300)
    sections = dict(report.sections)
    detail = next(item for item in sections["Claims"] if hasattr(item, "headers") and "MDE (80%)" in item.headers)
    assert {"n (rows x seeds)", "p (Holm)", "TOST p (Holm)", "margin"} <= set(detail.headers)
    rows = [r for r in detail.rows if r[0].startswith("IPT > PT")]
    assert [r[1].split(" ")[0] for r in rows] == ["t0", "t1", "all"]  # two tasks and the pooled test
    assert rows[0][detail.headers.index("verdict")] == "supported" and rows[0][2] == "80 x 2/2"
    sizing = sections["Sizing: rows and seeds for a decisive verdict"]
    table = next(item for item in sizing if hasattr(item, "headers"))
    assert [r[1].split(" ")[0] for r in table.rows] == ["t0", "t1"] and "rows @ 10 seeds" in table.headers
    verdicts = {r[1]: r[table.headers.index("verdict now")] for r in table.rows}  # the claims table's own verdicts
    assert verdicts == {r[1]: r[detail.headers.index("verdict")] for r in rows if r[1] in verdicts}


def test_size_command_prints_the_rows_each_claim_needs(tmp_path, capsys, monkeypatch):
    from tunelab.commands.compare import size_command

    monkeypatch.setenv("COLUMNS", "300")  # rich would squeeze the table into pytest's 80 columns
    _quality_store(tmp_path).close()
    size_command(str(tmp_path / "results.sqlite"), margin=["exact_match=5"])
    out = capsys.readouterr().out
    assert "IPT > PT" in out and "±5" in out and "rows @ 3 seeds" in " ".join(out.split())


def test_report_accepts_the_folder_compare_wrote(tiny_report, tmp_path):
    """`tunelab report runs/demo` (compare --out's folder) said "no results store" beside its results.sqlite."""
    from tunelab.commands.compare import report_command

    report_command(str(tiny_report.store.parent), out=str(tmp_path))
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.html").is_file()


def test_plots_without_data_are_skipped_with_the_reason(tiny_report):
    """No empty axes: all methods at 0 trainable parameters, or no method run at two sizes, say so in words."""
    from tunelab.compare.report import _pareto

    with Store(tiny_report.store) as store:
        rows = [r.data for r in store.rows(status="done")]
    untrained = [{**r, "trainable_params": 0} for r in rows]
    assert plots.pareto(untrained, "trainable_params") is None
    figure = _pareto(untrained, "trainable_params", "trainable parameters")
    assert figure.png is None and "0 trainable parameters" in figure.note
    assert plots.pareto(rows, "train_seconds")[:4] == b"\x89PNG"
    # two sizes in the task, but each method ran at one of them: no method has a curve to draw
    one_size_each = [{**r, "train_size": 8 if r["method"] == "pt" else 16} for r in rows]
    assert plots.sweep(one_size_each, "train_size", "training examples") is None


def test_a_cell_another_grid_ran_first_is_named_as_this_grid_names_it(grid_file, tmp_path):
    """A cell's key is its configuration only, so a grid finds a cell that another grid stored under another label
    done; its report, its terminal summary and its claims name the cell with this grid's label."""
    from rich.console import Console

    from tunelab.compare import compare
    from tunelab.compare.summary import print_summary

    first = {**TINY_GRID["methods"][0], "seeds": [0]}
    out, quiet = tmp_path / "out", Console(quiet=True)
    compare(grid_file(methods=[first]), out, progress=False, console=quiet)
    again = compare(grid_file(name="again", methods=[{**first, "label": "no_demos"}]), out, progress=False,
                    console=quiet)
    assert again.summary.done == 0 and again.summary.skipped == 1  # the same cell, not run again
    quality = again.report_md.read_text().split("## Quality per method and task")[1].split("\n## ")[0]
    assert "| date_format | no_demos | " in quality and "zero_shot" not in quality
    console = Console(record=True, width=200)
    with Store(again.store) as store:
        print_summary(console, store, keys=[c.key for c in again.cells], coords={c.key: c.coords() for c in again.cells})
        assert [r["method"] for r in store.tagged_rows()] == ["zero_shot"]  # the store keeps what it stored
    assert "no_demos" in console.export_text() and "zero_shot" not in console.export_text()
