"""--init-from: soft-prompt transfer, a source prompt with demonstrations and no training, LoRA then a prompt."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import build_config
from tunelab.errors import ConfigError
from tunelab.generate import GenerationConfig, generate
from tunelab.methods import METHODS, method_config
from tunelab.methods.io import build_adapter, load_adapter
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
    adapter = build_adapter(method, model, tok, config, [], 0)
    source = load_file(str(prompt_run / "adapter" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.equal(adapter.prompt_weight.detach(), source)
    with pytest.raises(ConfigError, match="num_virtual_tokens=4"):
        build_adapter(method, load_model("tiny")[0], tok,
                      method.Config(num_virtual_tokens=5, init_from=str(prompt_run)), [], 0)


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
    reloaded = load_adapter(pt_dir / "adapter", base).adapter  # folds the LoRA source in again
    torch.testing.assert_close(reloaded.model.model.layers[0].self_attn.q_proj.weight,
                               merged.model.layers[0].self_attn.q_proj.weight)
    prompts = [tok("2021-03-04", add_special_tokens=False)["input_ids"]]
    first = generate(reloaded, tok, prompts, GenerationConfig(max_new_tokens=6))
    again = load_adapter(pt_dir / "adapter", load_model("tiny")[0]).adapter
    assert generate(again, tok, prompts, GenerationConfig(max_new_tokens=6)) == first


def test_init_from_mistakes_say_what_to_do(prompt_run, tmp_path):
    model, tok = load_model("tiny")
    with pytest.raises(ConfigError, match="not a tunelab run"):
        build_adapter(METHODS["lora"], model, tok, METHODS["lora"].Config(init_from=str(tmp_path)), [], 0)
    with pytest.raises(ConfigError, match="cannot start from a prompt_tuning prompt"):
        build_adapter(METHODS["p_tuning"], model, tok, METHODS["p_tuning"].Config(init_from=str(prompt_run)), [], 0)
    with pytest.raises(TypeError, match="build_adapter"):  # a method never loads its source itself
        METHODS["lora"].build(model, tok, METHODS["lora"].Config(init_from=str(prompt_run)), [], 0)
    with pytest.raises(ConfigError, match="drop method.init_from"):
        method_config({"name": "icl", "init_from": str(prompt_run)})


def test_full_weights_started_from_lora_reload_without_the_source(tmp_path):
    """A full fine-tune saves every weight, the folded LoRA included (``Capabilities.whole_model``): the loader
    does not fold the source in again, so the run reloads after its source is gone."""
    lora_dir, full_dir = tmp_path / "lora", tmp_path / "full"
    _run(lora_dir, "method.name=lora", "method.r=4", "train.steps=2", "train.lr=0.05")
    _run(full_dir, "method.name=full_finetune", "train.steps=1", f"method.init_from={lora_dir}")
    meta = json.loads((full_dir / "adapter" / "tunelab_adapter.json").read_text())
    assert meta["folded_from"] == str((lora_dir / "adapter").resolve())
    first = load_adapter(full_dir / "adapter", load_model("tiny")[0]).adapter
    shutil.rmtree(lora_dir)
    again = load_adapter(full_dir / "adapter", load_model("tiny")[0]).adapter
    assert again.capabilities.whole_model
    for (name, a), b in zip(first.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_an_adapter_carries_the_capabilities_its_method_gave_it():
    """Set by the method when it builds the adapter, not looked up by name: ipt's soft prompt adapter (the class
    prompt tuning builds too) shows demonstrations; instruction tuning with full weights saves the whole model."""
    model, tok = load_model("tiny")
    ipt = METHODS["ipt"]
    adapter = ipt.build(model, tok, ipt.Config(num_virtual_tokens=2, init="random"), [], 0)
    assert adapter.capabilities == ipt.capabilities and adapter.capabilities.demonstrations
    it = METHODS["instruction_tuning"]
    assert it.capabilities_for(it.Config(weights="full")).whole_model
    assert not it.capabilities_for(it.Config()).whole_model
