"""Portable, honest adapter directories: base model named the same on every machine, init recorded, model card."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from tunelab.config import RunConfig, build_config, to_dict
from tunelab.modelcard import equivalent_command
from tunelab.models import portable_name, resolve_base_model
from tunelab.paths import cache_dir

OVERRIDES = ["model.name=tiny", "method.name=prompt_tuning", "method.num_virtual_tokens=3", "train.steps=2",
             "train.batch_size=2", "data.max_train=6", "data.max_eval=4", "eval.max_new_tokens=6"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from tunelab.run import run

    out = tmp_path_factory.mktemp("card") / "run"
    result = run(build_config(None, [*OVERRIDES, f"out={out}"]), progress=False)
    return out, result


def test_adapter_files_name_the_base_model_portably(saved):
    out, _ = saved
    adapter = out / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    assert json.loads((adapter / "tunelab_adapter.json").read_text())["base_model"] == "tiny"
    for path in adapter.glob("*.json"):
        assert str(out.parent) not in path.read_text(), path.name
    for path in adapter.glob("*.*"):
        if path.suffix in (".json", ".md"):  # the card quotes the command, whose out= is the user's own path
            assert str(cache_dir()) not in path.read_text(), path.name


def test_adapter_config_records_the_text_init_actually_used(saved):
    from tunelab.data import load_task

    config = json.loads((saved[0] / "adapter" / "adapter_config.json").read_text())
    assert config["prompt_tuning_init"] == "TEXT"
    assert config["prompt_tuning_init_text"] == load_task("date_format").train[0].instruction
    assert config["tokenizer_name_or_path"] == "tiny"


@pytest.mark.parametrize(("init", "expected"), [("vocab", "SAMPLE_VOCAB"), ("random", "RANDOM")])
def test_other_inits_are_recorded_in_peft_terms(tiny, init, expected):
    import copy

    from tunelab.data import load_task
    from tunelab.methods import method_config

    model, tokenizer = tiny
    method, cfg = method_config({"name": "prompt_tuning", "num_virtual_tokens": 2, "init": init})
    adapter = method.build(copy.deepcopy(model), tokenizer, cfg, load_task("date_format").train[:2], 0)
    assert adapter.peft_model.peft_config["default"].prompt_tuning_init.value == expected


def test_model_card_says_which_weights_task_metrics_and_command(saved):
    out, result = saved
    card = (out / "adapter" / "README.md").read_text()
    meta = card.split("---")[1]
    assert "library_name: peft" in meta and "prompt-tuning" in meta  # peft's own metadata kept
    assert "randomly initialised 2-layer Llama" in card
    assert "date_format" in card and f"Trained on {result['n_train']} examples" in card
    for name, value in result["metrics"].items():
        assert f"| {name} | {value:.4f} |" in card
    assert "tunelab run " in card and "model.name=tiny" in card


def test_equivalent_command_rebuilds_the_same_config(saved):
    import shlex

    cfg = build_config(None, [*OVERRIDES, "data.mixture=[a.jsonl,b.jsonl@2]", "data.system_prompt='Be brief: ok'"])
    command = equivalent_command(to_dict(cfg), to_dict(RunConfig()))
    assert command.startswith("tunelab run ")
    assert build_config(None, shlex.split(command)[2:]) == cfg


def test_registry_model_cards_cite_the_hub_id_and_the_gguf_weights(tmp_path):
    from tunelab.modelcard import CardInfo, model_card

    card = model_card(tmp_path, CardInfo("smollm2-135m", "lora", "e2e", {"rouge_l": 0.5}))
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "de-quantised to float32 from the Q4_1 GGUF" in card and "not bit-identical" in card


def test_names_resolve_back_to_this_machines_copy():
    assert portable_name("smollm2-135m") == "smollm2-135m"
    assert portable_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert portable_name(str(cache_dir() / "models" / "smollm2-135m")) == "smollm2-135m"
    # an adapter written before this fix on another machine recorded that machine's cache path
    assert resolve_base_model("/home/someone/.cache/tunelab/models/smollm2-135m") == "smollm2-135m"
    assert resolve_base_model("org/model") == "org/model"
    assert resolve_base_model(None) is None


def test_adapter_copied_to_a_fresh_cache_location_reproduces_its_predictions(saved, tmp_path, monkeypatch):
    """`tunelab eval --adapter` on a copy of the adapter, with TUNELAB_CACHE somewhere new."""
    from tunelab.cli import app

    out, _ = saved
    copy = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(out / "adapter", copy)
    fresh = tmp_path / "fresh-cache"
    (fresh / "models").mkdir(parents=True)
    # the tokenizer's converted copy, linked rather than converted again (~20 s) under the new cache
    (fresh / "models" / "smollm2-135m").symlink_to(cache_dir() / "models" / "smollm2-135m")
    monkeypatch.setenv("TUNELAB_CACHE", str(fresh))
    result = CliRunner().invoke(app, ["eval", "--adapter", str(copy), "--data", "date_format", "--max-eval", "4",
                                      "--max-new-tokens", "6", "--resamples", "50", "--out", str(tmp_path / "ev"),
                                      "-q"])
    assert result.exit_code == 0, result.output
    expected = [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    got = [json.loads(line)["prediction"] for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert got == expected
