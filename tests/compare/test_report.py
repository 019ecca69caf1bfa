"""The report: Markdown + self-contained HTML from a store built by a tiny grid."""

from __future__ import annotations

import base64
import re

from tunelab.compare import plots, report_store
from tunelab.compare.report import build_report, to_html
from tunelab.compare.store import Store


def test_report_from_a_tiny_grid(tiny_report):
    md = tiny_report.report_md.read_text()
    for section in ("Quality per method and task", "Quality against cost", "Learning curves", "Prompt-length sweeps",
                    "IPT minus PT by demonstration similarity", "Claims"):
        assert f"## {section}" in md
    # every seed of every setting is listed, with mean ± std
    assert md.count("| date_format | pt | ") == 2 and md.count("| date_format | zero_shot | ") == 2
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
