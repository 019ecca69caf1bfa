"""Discrete-prompt baseline: the best-scoring candidate on the dev split replaces the instruction."""

import json

from tests.conftest import shared_path

from tunelab.data import load_task
from tunelab.methods import METHODS, method_config


def test_picks_the_best_candidate_and_saves_its_scores(fresh_tiny, tmp_path):
    model, tok = fresh_tiny
    dev = load_task("date_format").train[:6]
    candidates = ["{instruction}", "Convert the date.", "Write the date out in words: {instruction}"]
    method, config = method_config({"name": "discrete_prompt", "candidates": candidates, "n_dev": 6})
    adapter = method.build(model, tok, config, dev, 0)
    assert set(adapter.scores) == set(candidates)
    assert adapter.scores[adapter.choice] == max(adapter.scores.values())
    rewritten = adapter.rewrite(dev[0])
    assert rewritten.input == dev[0].input
    assert rewritten.instruction == adapter.choice.replace("{instruction}", dev[0].instruction)

    adapter.save_weights(tmp_path)
    assert json.loads((tmp_path / "discrete_prompt.json").read_text())["instruction"] == adapter.choice
    assert METHODS["discrete_prompt"].load(tmp_path, model, config).choice == adapter.choice


def test_scores_on_the_dev_split_when_there_is_one():
    task = load_task(str(shared_path("e2e")))
    assert task.dev
    method, config = method_config({"name": "discrete_prompt"})
    assert method.prepare_data(config, task, 0).train == task.dev
