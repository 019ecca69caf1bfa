"""--init-from: soft-prompt transfer, a source prompt with demonstrations and no training, LoRA then a prompt."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import build_config
from tunelab.errors import ConfigError
from tunelab.generate import GenerationConfig, generate
from tunelab.methods import METHODS, method_config
from tunelab.models import load_model
from tunelab.run import run

BASE = ["model.name=tiny", "data.task=date_format", "data.max_train=16", "data.max_eval=4", "train.batch_size=4",
        "eval.max_new_tokens=4", "data.template=plain"]


def _run(out, *overrides):
    return run(build_config(None, BASE + [f"out={out}", *overrides]), progress=False)


@pytest.fixture(scope="module")
def prompt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pt")
    _run(out, "method.name=prompt_tuning", "method.num_virtual_tokens=4", "train.steps=3")
    return out


def test_source_prompt_with_target_demos_and_no_training(prompt_run, tmp_path):
    result = _run(tmp_path, "method.name=ipt", "method.num_virtual_tokens=4", "method.selection=random",
                  "train.steps=0", f"method.init_from={prompt_run}")
    assert result["train"]["steps"] == 0 and result["trainable_params"] == 4 * 16
    source = load_file(str(prompt_run / "adapter" / "adapter_model.safetensors"))["prompt_embeddings"]
    target = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.equal(source, target)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all("demo_similarity" in r for r in rows)  # with target-task demonstrations
    meta = json.loads((tmp_path / "adapter" / "tunelab_adapter.json").read_text())
    assert meta["folded_from"] is None  # the transferred prompt is saved whole; loading needs no source


def test_soft_prompt_transfer_starts_from_the_source_prompt(prompt_run):
    model, tok = load_model("tiny")
    method, config = method_config({"name": "prompt_tuning", "num_virtual_tokens": 4, "init_from": str(prompt_run)})
    adapter = method.build(model, tok, config, [], 0)
    source = load_file(str(prompt_run / "adapter" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.equal(adapter.prompt_weight.detach(), source)
    with pytest.raises(ConfigError, match="num_virtual_tokens=4"):
        method.build(load_model("tiny")[0], tok, method.Config(num_virtual_tokens=5, init_from=str(prompt_run)),
                     [], 0)


def test_lora_then_prompt_tuning_on_top_reloads_identically(tmp_path):
    lora_dir, pt_dir = tmp_path / "lora", tmp_path / "pt"
    _run(lora_dir, "method.name=lora", "method.r=4", "train.steps=3", "train.lr=0.05")
    _run(pt_dir, "method.name=prompt_tuning", "method.num_virtual_tokens=4", "train.steps=2",
         f"method.init_from={lora_dir}")
    model, tok = load_model("tiny")
    lora = METHODS["lora"].load(lora_dir / "adapter", model, method_config({"name": "lora", "r": 4})[1])
    merged = lora.merged_model()
    base = load_model("tiny")[0]
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)

    meta = json.loads((pt_dir / "adapter" / "tunelab_adapter.json").read_text())
    assert meta["folded_from"] == str((lora_dir / "adapter").resolve())
    method, config = method_config({"name": meta["method"], **meta["config"]})
    reloaded = method.load(pt_dir / "adapter", base, config)  # folds the LoRA source in again
    torch.testing.assert_close(reloaded.model.model.layers[0].self_attn.q_proj.weight,
                               merged.model.layers[0].self_attn.q_proj.weight)
    prompts = [tok("2021-03-04", add_special_tokens=False)["input_ids"]]
    first = generate(reloaded, tok, prompts, GenerationConfig(max_new_tokens=6))
    again = METHODS["prompt_tuning"].load(pt_dir / "adapter", load_model("tiny")[0], config)
    assert generate(again, tok, prompts, GenerationConfig(max_new_tokens=6)) == first


def test_init_from_mistakes_say_what_to_do(prompt_run, tmp_path):
    model, tok = load_model("tiny")
    with pytest.raises(ConfigError, match="not a tunelab run"):
        METHODS["lora"].build(model, tok, METHODS["lora"].Config(init_from=str(tmp_path)), [], 0)
    with pytest.raises(ConfigError, match="cannot start from a prompt_tuning prompt"):
        METHODS["p_tuning"].build(model, tok, METHODS["p_tuning"].Config(init_from=str(prompt_run)), [], 0)
    with pytest.raises(ConfigError, match="drop method.init_from"):
        method_config({"name": "icl", "init_from": str(prompt_run)})
