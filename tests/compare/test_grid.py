"""Grid loading and validation: typos fail fast with the key's path; expansion covers every axis once."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.conftest import shared_path

from tunelab.compare import expand, list_presets, load_grid, plan, preset_path
from tunelab.errors import ConfigError


@pytest.mark.parametrize(("change", "path"), [
    ({"seedz": [0]}, "seedz"),
    ({"train": {"stpes": 3}}, "train.stpes"),
    ({"methods": [{"name": "prompt_tuning", "num_virtual_tokenz": 4}]}, "methods[0].num_virtual_tokenz"),
    ({"methods": [{"name": "icl", "k": 0}, {"name": "prompt_tuning", "train": {"lrr": 1}}]}, "methods[1].train.lrr"),
    ({"tasks": [{"task": "date_format", "max_evl": 3}]}, "tasks[0].max_evl"),
    ({"methods": [{"name": "icl", "k": "many"}]}, "methods[0].k"),
    ({"tasks": [{"task": "date_format", "tags": 5}]}, "tasks[0].tags"),
])
def test_typo_fails_before_any_model_loads_and_names_the_key(grid_file, change, path, monkeypatch):
    def no_model(*_args, **_kwargs):
        raise AssertionError("validation loaded a model")

    for where in ("tunelab.models.load_model", "tunelab.run.load_model"):  # its time: benchmarks/bench_startup.py
        monkeypatch.setattr(where, no_model)
    with pytest.raises(ConfigError, match=path.replace("[", r"\[").replace("]", r"\]")) as info:
        plan(grid_file(**change))
    assert "grid.yaml" in str(info.value)  # the file is named too


def test_unknown_method_lists_the_registry(grid_file):
    with pytest.raises(ConfigError, match="unknown method 'prompt_tunning'.*prompt_tuning"):
        plan(grid_file(methods=[{"name": "prompt_tunning"}]))


def test_missing_data_fails_before_training(grid_file, tmp_path):
    with pytest.raises(ConfigError, match="cell zero_shot / nowhere"):
        plan(grid_file(tasks=[{"task": str(tmp_path / "nowhere"), "name": "nowhere"}]))


def test_method_option_value_checked_by_the_method(grid_file):
    with pytest.raises(ConfigError, match=r"methods\[\d\]\.num_virtual_tokens: got 0, expected an integer >= 1"):
        plan(grid_file(methods=[{"name": "prompt_tuning", "num_virtual_tokens": 0}]))


def test_expand_crosses_axes_and_sweeps_prompt_length_only_where_it_exists(grid_file):
    grid = load_grid(grid_file(train_sizes=[8, 16], prompt_lengths=[2, 4], seeds=[0, 1, 2],
                               methods=[{"name": "icl", "k": 0}, {"name": "prompt_tuning"},
                                        {"name": "prompt_tuning", "num_virtual_tokens": 3, "label": "pt3"}]))
    cells = expand(grid)
    # icl: 2 sizes x 3 seeds; swept PT: 2 sizes x 2 lengths x 3 seeds; fixed-length PT: 2 sizes x 3 seeds
    assert len(cells) == 6 + 12 + 6
    assert len({c.key for c in cells}) == len(cells)
    swept = [c for c in cells if c.method == "prompt_tuning"]
    assert {c.config.method.num_virtual_tokens for c in swept} == {2, 4}
    assert {c.prompt_length for c in cells if c.method == "pt3"} == {3}
    assert {c.config.data.max_train for c in cells} == {8, 16}
    assert {c.config.train.seed for c in cells} == {0, 1, 2}


def test_task_prompt_lengths_override_the_grid_sweep(grid_file):
    grid = load_grid(grid_file(tasks=["date_format", {"task": "sentiment", "prompt_lengths": [2, 4]}],
                               prompt_lengths=[3], methods=[{"name": "icl", "k": 0}, {"name": "prompt_tuning"}]))
    lengths = {(c.task, c.prompt_length) for c in expand(grid) if c.method_name == "prompt_tuning"}
    assert lengths == {("date_format", 3), ("sentiment", 2), ("sentiment", 4)}
    with pytest.raises(ConfigError, match=r"tasks\[0\].prompt_lengths: 0 is out of range"):
        load_grid(grid_file(tasks=[{"task": "sentiment", "prompt_lengths": [0]}]))


def test_cell_key_ignores_output_place_but_not_settings(grid_file):
    a = expand(load_grid(grid_file()))
    b = expand(load_grid(grid_file(eval={"batch_size": 2, "max_new_tokens": 4})))
    c = expand(load_grid(grid_file(train={"steps": 3, "batch_size": 4})))
    assert [x.key for x in a] == [x.key for x in b]  # eval batch size does not change greedy outputs
    assert not {x.key for x in a} & {x.key for x in c if x.method_name != "icl"}


def test_eval_batch_size_counts_in_the_key_once_eval_is_not_fp32(grid_file):
    """bf16 greedy output may depend on which rows share a batch: such cells are keyed by their batch size."""
    def keys(**eval_section):
        return [x.key for x in expand(load_grid(grid_file(eval={"max_new_tokens": 4, **eval_section})))]

    assert keys(batch_size=2, precision="fp32") == keys(batch_size=8, precision="fp32") == keys(batch_size=8)
    for precision in ("auto", "bf16"):
        assert keys(batch_size=8, precision=precision) != keys(batch_size=2, precision=precision)
        assert set(keys(batch_size=8, precision=precision)).isdisjoint(keys(batch_size=8))


def test_method_tasks_restricts_cells(grid_file):
    grid = load_grid(grid_file(tasks=["date_format", "sentiment"],
                               methods=[{"name": "icl", "k": 0}, {"name": "prompt_tuning", "tasks": ["sentiment"]}]))
    cells = expand(grid)
    assert {(c.method_name, c.task) for c in cells} == {("icl", "date_format"), ("icl", "sentiment"),
                                                      ("prompt_tuning", "sentiment")}
    with pytest.raises(ConfigError, match=r"methods\[0\].tasks: no task named 'nope'"):
        load_grid(grid_file(methods=[{"name": "icl", "tasks": ["nope"]}]))


def test_overrides_apply_to_the_grid(grid_file):
    grid, cells = plan(grid_file(), ["train.steps=7", "seeds=[3]"])
    assert {c.config.train.steps for c in cells} == {7} and {c.seed for c in cells} == {3}


def test_presets_ship_all_three():
    assert {"quick", "paper", "instruction", "paper_v1", "paper_v2", "paper_v3", "instruction_v1"} <= set(list_presets())


def test_quick_preset_validates_offline(tmp_path):
    grid, cells = plan(preset_path("quick"), out=tmp_path)
    assert grid.name == "quick" and len(cells) == 7
    assert {c.method_name for c in cells} == {"icl", "prompt_tuning", "lora"}
    assert {c.config.model.name for c in cells} == {"smollm2-135m"}


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["paper", "paper_v3", "paper_v2", "instruction"])
def test_data_presets_validate_on_shared_data(name, tmp_path, monkeypatch):
    shared_path()
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # presets say ../shared/data: relative to a checkout
    grid, cells = plan(preset_path(name), out=tmp_path)
    assert len(cells) > 10
    if name in ("paper", "paper_v3"):  # v3 and v4: Sun et al. on a base model, SmolLM2 as the second model
        assert {c.method_name for c in cells} == {"icl", "prompt_tuning", "ipt"}
        assert {c.config.model.name for c in cells} == {"gemma3-270m", "smollm2-135m"}
        assert {c.task for c in cells} == {"e2e", "dart", "webnlg"}  # Spider dropped: 0-2% for every method in v2
        gemma = [c for c in cells if c.config.model.name == "gemma3-270m"]
        for method in ("prompt_tuning", "ipt"):  # the variance claim: >= 10 seeds a side on >= 2 tasks
            for task in ("e2e", "dart"):
                assert len({c.seed for c in gemma if c.method_name == method and c.task == task
                            and c.config.train.steps > 0}) >= 10
        assert {c.prompt_length for c in cells if c.method_name == "ipt"} == {20}
        assert all(c.config.eval.stop == ["\n"] for c in gemma)  # a base model rambles past one-line answers
        assert max(grid.margins.values()) <= 3
        trained = [c for c in gemma if c.method in ("pt", "ipt")]
        if name == "paper_v3":  # tuned: every trained Gemma method, the same number of trials, 40 steps
            tuned = {m.display: m.tune for m in grid.methods if m.tune is not None}
            assert set(tuned) == {"pt", "ipt"}
            assert {t.trials or grid.tune.trials for t in tuned.values()} == {grid.tune.trials}
            assert {c.config.train.steps for c in trained} == {40}
        else:  # v4: v3's tuned choices at 120 steps (40 left many answers unended); 10 source prompts to transfer
            assert {c.config.train.steps for c in trained} == {120}
            assert {(c.method, c.config.method.init, c.config.train.lr) for c in trained} == {
                ("pt", "text", 0.3), ("ipt", "random", 0.03)}  # docs/results/paper/v3 "Tuning"
            assert len({c.seed for c in cells if c.method == "pt_e2e_transfer"}) == 10
        transfer = [c for c in cells if c.method == "pt_e2e_transfer"]
        assert {c.task for c in transfer} == {"dart", "webnlg"} and all(c.config.train.steps == 0 for c in transfer)
        from tunelab.compare.grid import depends_on

        assert {depends_on(c)["task"] for c in transfer} == {"e2e"}
    elif name == "paper_v2":
        assert {c.method_name for c in cells} == {"icl", "prompt_tuning", "ipt", "lora"}
        assert {c.task for c in cells} == {"e2e", "dart", "webnlg", "spider"}
        spider = next(c for c in cells if c.task == "spider")
        assert spider.config.eval.metrics[0] == "sql_exact_match"  # Sun et al. score text-to-SQL by exact match
    else:
        assert {c.config.model.name for c in cells} == {"gemma3-270m"}  # a base model: the claim is about those
        assert next(m for m in grid.methods if m.display == "instruction_lora").tune is not None
        unseen = [c for c in cells if c.unseen]
        assert {c.method for c in unseen} == {"base", "instruction_lora"}
        train_rows = (tmp_path / "data" / "sni_unseen" / "train.jsonl").read_text()
        for task in grid.tasks[0].eval_tasks:  # no unseen task leaks into training
            assert f'"task": "{task}"' not in train_rows
        # every unseen task is judged (eval_per_task), not only the first ones in file order
        eval_rows = (tmp_path / "data" / "sni_unseen" / "eval.jsonl").read_text().splitlines()
        counts = {task: sum(f'"task": "{task}"' in row for row in eval_rows) for task in grid.tasks[0].eval_tasks}
        assert set(counts.values()) == {grid.tasks[0].eval_per_task}, counts


@pytest.mark.shared_data
def test_subset_cells_keep_their_keys_under_another_out_dir(tmp_path, monkeypatch):
    """Derived per-task files live under --out; the key follows the subset's recipe, not that path."""
    shared_path()
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    _, first = plan(preset_path("instruction"), out=tmp_path / "a")
    _, second = plan(preset_path("instruction"), out=tmp_path / "b")
    assert [c.key for c in first] == [c.key for c in second]
    fewer_yaml = tmp_path / "fewer.yaml"
    fewer_yaml.write_text(preset_path("instruction").read_text().replace("eval_per_task: 25", "eval_per_task: 5"))
    _, fewer = plan(fewer_yaml, out=tmp_path / "a")
    assert {c.key for c in fewer if c.unseen}.isdisjoint(c.key for c in first)


@pytest.mark.shared_data
@pytest.mark.parametrize(("folder", "preset", "command"), [
    ("paper/v2", "paper_v2", "tunelab compare --preset paper --out runs/paper"),  # run while v2 was `paper`
    ("paper/v1", "paper_v1", "tunelab compare --preset paper_v1 --out runs/paper"),
    ("instruction", "instruction", "tunelab compare --preset instruction --out docs/results/instruction"),
    ("instruction/v2", "instruction", "tunelab compare --preset instruction --out runs/instruction2"),
    ("instruction/v1", "instruction_v1", "tunelab compare --preset instruction_v1 --out runs/instruction"),
])
def test_docs_results_are_reports_of_the_whole_preset(folder, preset, command, tmp_path, monkeypatch):
    """docs/results/FOLDER holds the report of `tunelab compare --preset PRESET` (the preset as it was run): every
    cell of it, none failed, and its README gives the command."""
    shared_path()
    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    folder_path = root / "docs" / "results" / folder
    assert command in (folder_path / "README.md").read_text()
    _, cells = plan(preset_path(preset), out=tmp_path)
    report = (folder_path / "report.md").read_text()
    assert f"- cells: {len(cells)} done, 0 failed" in report
    grid_line = next(line for line in report.splitlines() if line.startswith("- grid: "))
    assert preset.removesuffix("_v1").removesuffix("_v2") in grid_line[len("- grid: "):].split(", ")  # resumed cells keep their grid


def test_method_seeds_override(grid_file):
    cells = expand(load_grid(grid_file(methods=[{"name": "icl", "k": 0, "seeds": [0]}, {"name": "prompt_tuning"}])))
    assert sorted((c.method, c.seed) for c in cells) == [("icl(k=0)", 0), ("prompt_tuning", 0), ("prompt_tuning", 1)]
    with pytest.raises(ConfigError, match=r"methods\[0\].seeds"):
        load_grid(grid_file(methods=[{"name": "icl", "seeds": "zero"}]))


def test_cell_key_survives_new_default_fields(grid_file):
    """A config field at its default does not enter the key, so adding one keeps stored cells valid."""
    from tunelab.compare.grid import cell_key

    cell = expand(load_grid(grid_file()))[0]
    cfg = cell.config
    assert cell_key(cfg) == cell.key
    cfg.data.template = "auto"  # explicitly the default
    assert cell_key(cfg) == cell.key
    cfg.data.template = "plain"
    assert cell_key(cfg) != cell.key
