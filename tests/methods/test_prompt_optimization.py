"""prompt_optimization: a DSPy optimizer choosing instruction + demonstrations with the local model in process."""

from __future__ import annotations

import json
import sys

import pytest

from tunelab.config import build_config
from tunelab.data import load_task
from tunelab.errors import ConfigError
from tunelab.formatting import PromptLayout, build_prompt
from tunelab.methods import METHODS
from tunelab.methods.discrete_prompt import fill
from tunelab.methods.prompt_optimization import RESULT_FILE, SELF, Bridge, compose


def test_composed_instruction_is_the_icl_layout(tiny):
    """The saved instruction (demos rendered into it) gives exactly the prompt ICL builds with those demos."""
    _, tok = tiny
    rows = load_task("date_format").train[:3]
    demos = [{"input": d.input, "output": d.output} for d in rows[1:]]
    for template in ("plain", "alpaca", "chat"):
        icl = build_prompt(tok, PromptLayout(template, demos=lambda e: rows[1:]), rows[0])
        assert build_prompt(tok, template, fill(compose(SELF, demos), rows[0])) == icl


def test_dspy_is_an_optional_extra_with_a_one_line_error(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "dspy", None)  # import dspy -> ImportError
    method = METHODS["prompt_optimization"]
    model, tok = tiny
    with pytest.raises(ConfigError, match=r"pip install 'tunelab\[dspy\]'"):
        method.build(model, tok, method.Config(), load_task("date_format").train[:4], 0)


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    pytest.importorskip("dspy", reason="prompt_optimization needs the optional dspy extra (pip install 'tunelab[dspy]')")
    from tunelab.run import run

    out = tmp_path_factory.mktemp("po") / "run"
    cfg = build_config(None, ["model.name=tiny", "data.task=date_format", "data.max_train=10", "data.max_eval=4",
                              "eval.max_new_tokens=4", "eval.loss=false", f"out={out}",
                              "method.name=prompt_optimization", "method.candidates=2", "method.n_dev=3",
                              "method.max_demos=1", "method.max_new_tokens=4", "method.template=auto",
                              "method.n_pool=5"])
    return out, run(cfg, progress=False)


def test_run_saves_the_choice_trials_and_cost(optimized):
    out, result = optimized
    saved = json.loads((out / "adapter" / RESULT_FILE).read_text())
    assert result["trainable_params"] == 0 and set(result["metrics"]) == {"exact_match", "rouge_l"}
    assert saved["optimizer"] == "bootstrap" and saved["metric"] == "exact_match"
    assert saved["n_dev"] == 3 and saved["n_pool"] == 5  # 7 rows left after the dev split, capped by n_pool
    # random search: zero-shot, labelled-only, unshuffled bootstrap, then `candidates` shuffled ones
    assert len(saved["trials"]) == 2 + 3 and all("dev_score" in t and "demos" in t for t in saved["trials"])
    assert any(t["demos"] for t in saved["trials"]) and all(len(t["demos"]) <= 1 for t in saved["trials"])
    best = max(t["dev_score"] for t in saved["trials"])
    assert saved["program"] in [{"instruction": t["instruction"], "demos": t["demos"]} for t in saved["trials"]
                                if t["dev_score"] == best]
    assert saved["instruction"] == compose(saved["program"]["instruction"], saved["program"]["demos"])
    # every candidate was scored on the dev rows (and bootstrapped on pool rows) by the local model
    assert saved["cost"]["lm_calls"] >= 5 * 3 and saved["cost"]["generated_tokens"] > 0
    assert saved["cost"]["cpu_seconds"] > 0
    # the search is this method's adaptation cost: a grid's train_seconds counts it (the cost claims compare it)
    from tunelab.compare.runner import _adapt_seconds

    assert result["train"]["seconds"] == 0 and result["train"]["build_seconds"] >= saved["cost"]["seconds"] > 0
    assert _adapt_seconds(result["train"]) == result["train"]["build_seconds"]


def test_eval_loads_it_and_shows_what_the_optimizer_scored(optimized):
    """Loaded like any adapter; the prompt eval builds is the one the DSPy bridge generated from."""
    from tunelab.methods.io import load_adapter
    from tunelab.models import load_model

    out = optimized[0] / "adapter"
    saved = json.loads((out / RESULT_FILE).read_text())
    model, tok = load_model("tiny")
    loaded = load_adapter(out, model, tok, base_model="tiny")
    assert loaded.method_name == "prompt_optimization" and loaded.adapter.num_trainable() == 0
    example = load_task("date_format").eval[0]
    shown = build_prompt(tok, loaded.layout, loaded.adapter.rewrite(example))
    bridge = Bridge(loaded.adapter, tok, loaded.layout.template, 4)
    program = saved["program"]
    assert bridge.prompt(program["instruction"], program["demos"],
                         {"instruction": example.instruction, "input": example.input}) == shown
    assert example.instruction in shown and all(d["input"] in shown for d in program["demos"])
