"""The board's data functions on a hand-written store: what each tab would show, without a browser."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

pytest.importorskip("pandas", reason="the board's tables are pandas frames: pip install 'tunelab[board]'")

from tunelab.board import examples, forms, results  # noqa: E402
from tunelab.board.stores import find_stores, store_path, store_rows  # noqa: E402
from tunelab.compare.grid import SECTIONS  # noqa: E402
from tunelab.errors import ConfigError, TunelabError  # noqa: E402
from tunelab.steplog import StepLog, read_step_log  # noqa: E402


@pytest.fixture(scope="module")
def rows(runs):
    return store_rows(store_path(runs, "hand/results.sqlite"))


def test_stores_are_found_under_runs_but_not_the_boards_own(runs):
    assert find_stores(runs) == ["hand/results.sqlite"]
    with pytest.raises(TunelabError, match="not under the runs folder"):
        store_path(runs, "../elsewhere.sqlite")


def test_quality_table_lists_every_seed_and_failed_cells_apart(rows):
    table = results.quality_frame(rows)
    pt8 = table[(table["method"] == "pt") & (table["prompt len"] == "8")].iloc[0]
    assert pt8["per seed"] == "0: 50.00, 1: 51.00" and pt8["mean ± std"] == "50.50 ± 0.71"
    assert len(table) == 4  # zero-shot, PT x 2 lengths, IPT
    failed = results.failed_frame(rows)
    assert failed.to_dict("records") == [{"method": "pt", "task": "t", "seed": 2, "error": "boom"}]


def test_claims_carry_verdicts_and_intervals(rows):
    summary, detail = results.claims_frames(rows, n_resamples=200)
    verdicts = dict(zip(summary["tested as"], summary["verdict"], strict=True))
    assert verdicts["IPT > PT (quality, same task/data/length)"] in {"supported", "contradicted", "equivalent", "underpowered"}
    assert verdicts["LoRA > PT (same task and data)"] == "not measured"
    ipt = detail[detail["tested as"].str.startswith("IPT > PT")].iloc[0]
    assert ipt["CI low"] <= ipt["effect (A − B)"] <= ipt["CI high"]


def test_plot_points(rows):
    cost = results.cost_points(rows, "trainable_params")
    assert set(cost["method"]) == {"zero_shot", "pt · len=4", "pt · len=8", "ipt · len=4"}
    assert cost.set_index("method").loc["pt · len=8", "quality"] == pytest.approx(50.5)
    sweep = results.sweep_points(rows, "prompt_length")
    assert list(sweep["method"]) == ["pt", "pt"] and list(sweep["prompt_length"]) == [4, 8]  # IPT has one length
    assert results.sweep_points(rows, "train_size").empty
    assert results.similarity_points(rows).empty  # 4 examples: the report needs 10 to bucket
    with pytest.raises(ValueError):
        results.cost_points(rows, "vibes")


def test_examples_side_by_side_with_demonstrations(rows):
    data = examples.load_task_examples(rows, "t", seed=1)
    assert data.methods == ["ipt · len=4", "pt · len=4", "pt · len=8", "zero_shot"]
    assert data.seeds["zero_shot"] == 0 and data.seeds["pt · len=4"] == 1  # lowest seed when the chosen is absent
    assert data.metric == "exact_match"
    frame = examples.example_frame(data, ["e1"], ["pt · len=4", "ipt · len=4"])
    record = frame.iloc[0]
    assert record["pt · len=4"] == "[0] x" and record["ipt · len=4"] == "[100] the y"
    assert record["reference"] == "ref-e1"
    assert record["demonstration"] == "in-e1 → out-e1" and record["demo similarity"] == pytest.approx(0.6)
    for row in data.rows["e1"].values():  # several references (E2E has up to ~10): the first, and a count
        row["references"] = ["first ref", "second", "third"]
    assert examples.example_frame(data, ["e1"], ["pt · len=4"]).iloc[0]["reference"] == "first ref (+2 more)"


def test_filters_and_sorting(rows):
    data = examples.load_task_examples(rows, "t", seed=0)
    pt, ipt = "pt · len=4", "ipt · len=4"
    assert examples.select(data, [pt, ipt], "methods disagree") == ["e1", "e2"]
    assert examples.select(data, [pt, ipt], "A right, B wrong", a=ipt, b=pt) == ["e1"]
    assert examples.select(data, [pt, ipt], "A right, B wrong", a=pt, b=ipt) == ["e2"]
    assert examples.select(data, [pt, ipt], "A better than B", a=pt, b=ipt) == ["e2"]
    ranked = examples.select(data, [pt, ipt], "all", a=ipt, b=pt, sort_by_difference=True)
    assert set(ranked[:2]) == {"e1", "e2"} and set(ranked[2:]) == {"e0", "e3"}
    with pytest.raises(ValueError):
        examples.select(data, [pt], "nonsense")


def test_word_diff():
    assert examples.word_diff("the cat sat", "the dog sat") == [("the", None), ("cat", "-"), ("dog", "+"),
                                                                ("sat", None)]
    assert examples.word_diff("same", "same") == [("same", None)]
    assert examples.spaced([("a", None)]) == [("a ", None)]


def test_form_has_every_config_field_and_turns_edits_into_overrides():
    paths = {f.path for f in forms.form_fields()}
    assert paths == {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    raw = forms.parse_yaml(forms.templates()["grid preset: quick"])
    assert forms.kind_of(raw) == "grid" and forms.default_name(raw) == "quick"
    baseline = forms.shown_values(raw)
    assert baseline["train.steps"] == "40" and baseline["model.threads"] == "" and baseline["eval.loss"] is True
    values = dict(baseline)
    assert forms.overrides(baseline, values) == []
    values.update({"train.steps": "5", "model.name": "tiny", "eval.loss": False})
    extra = forms.overrides(baseline, values)
    assert sorted(extra) == ["eval.loss=false", "model.name=tiny", "train.steps=5"]
    resolved = forms.resolved(raw, extra)
    assert resolved["train"]["steps"] == 5 and resolved["model"]["name"] == "tiny"
    # the YAML is edited: untouched fields follow it, the user's edits stay
    edited = {**raw, "train": {**raw["train"], "steps": 7, "batch_size": 2}}
    kept = forms.refill(edited, baseline, values)
    assert kept["train.steps"] == "5" and kept["train.batch_size"] == "2" and kept["model.name"] == "tiny"
    assert sorted(forms.overrides(forms.shown_values(edited), kept)) == sorted(extra)
    with pytest.raises(ConfigError, match="stpes"):
        forms.resolved(raw, ["train.stpes=5"])


def test_every_template_validates_and_commands_match_the_cli():
    for name, text in forms.templates().items():
        forms.resolved(forms.parse_yaml(text), [])  # raises on a bad preset
        assert forms.default_name(yaml.safe_load(text)), name
    assert forms.preview("grid", "g.yaml", "runs/x", 2) == "tunelab compare --config g.yaml --out runs/x --quiet " \
                                                           "--workers 2"
    assert forms.command("run", "r.yaml", "runs/r")[1:] == ["run", "--config", "r.yaml", "--out", "runs/r", "--quiet"]
    with pytest.raises(ConfigError, match="invalid YAML"):
        forms.parse_yaml("a: [")


def test_step_log_skips_a_half_written_line(tmp_path):
    log = StepLog(tmp_path)
    log.write(1, 2.5)
    log.write(2, 2.0)
    log.close()
    with (tmp_path / "train_log.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')
    assert [r["step"] for r in read_step_log(tmp_path)] == [1, 2]
    StepLog(tmp_path, resume=True).close()
    assert len(read_step_log(tmp_path)) == 2
    resumed = StepLog(tmp_path, resume=True)  # from a checkpoint at step 1: step 2 runs again
    resumed.write(2, 1.5)
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_step_log(tmp_path)] == [(1, 2.5), (2, 1.5)]
    StepLog(tmp_path).close()  # a fresh (not resumed) run starts a new curve
    assert read_step_log(tmp_path) == []


def test_step_log_never_stops_training(tmp_path):
    missing = tmp_path / "gone"  # the directory cannot be opened: logging is off, nothing raises
    log = StepLog(missing)
    log.write(1, 1.0)
    log.close()
    assert read_step_log(missing) == []
