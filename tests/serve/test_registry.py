"""The adapter registry: lazy loads with an LRU cap; IPT demonstrations and LoRA served like offline."""

from __future__ import annotations

import httpx
import pytest
import torch
from tests.serve.conftest import running
from tests.serve.test_app import offline

from tunelab.config import build_config
from tunelab.data.example import Example
from tunelab.formatting import build_prompt
from tunelab.generate import GenerationConfig, generate
from tunelab.methods.base import MethodConfig
from tunelab.methods.icl import FrozenAdapter
from tunelab.models import load_model
from tunelab.run import run
from tunelab.serve.registry import AdapterNotFound, AdapterRegistry


def test_adapters_load_lazily_and_the_least_recently_used_is_evicted(adapter_root):
    model, tokenizer = load_model("tiny", seed=0)
    registry = AdapterRegistry(adapter_root, model, tokenizer, "tiny", max_loaded=3)
    assert len(registry.names()) == 20 and registry.loaded() == []
    for name in ["task00", "task01", "task02"]:
        registry.get(name)
    registry.get("task00")  # now the most recent
    registry.get("task03")  # evicts task01, the least recently used
    assert registry.loaded() == ["task02", "task00", "task03"]
    assert registry.loads == 4
    registry.get("task00")
    assert registry.loads == 4  # served from memory
    with pytest.raises(AdapterNotFound):
        registry.get("task99")


def test_soft_prompt_adapters_share_the_base_model_and_keep_only_their_prompt(adapter_root):
    model, tokenizer = load_model("tiny", seed=0)
    registry = AdapterRegistry(adapter_root, model, tokenizer, "tiny")
    a, b = registry.get("task00"), registry.get("task01")
    assert a.adapter.model is model and b.adapter.model is model
    assert a.soft.shape == (4, model.config.hidden_size) and not torch.equal(a.soft, b.soft)
    assert a.adapter.model is b.adapter.model  # rows of both can share a forward pass


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    """Real `tunelab run` outputs on the tiny model: an IPT run (demonstrations) and a LoRA run."""
    root = tmp_path_factory.mktemp("runs")
    common = ["data.task=date_format", "model.name=tiny", "train.steps=2", "train.batch_size=2",
              "data.max_train=16", "data.max_eval=2"]
    run(build_config(None, [*common, "method.name=ipt", "method.selection=random", "method.num_virtual_tokens=4",
                            f"out={root / 'ipt'}"]), progress=False)
    run(build_config(None, [*common, "method.name=lora", "train.lr=0.05", f"out={root / 'lora'}"]), progress=False)
    return root


def test_ipt_demonstrations_and_lora_weights_are_served_like_offline_eval(run_root):
    instruction = "Rewrite the date in ISO format."
    with running(run_root) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        assert {"ipt", "lora"} <= {m["id"] for m in client.get("/v1/models").json()["data"]}
        for name in ["ipt", "lora", "tiny"]:
            r = client.post("/v1/completions", json={"model": name, "prompt": "March 5, 2024", "max_tokens": 10,
                                                     "instruction": instruction})
            assert r.status_code == 200, r.text
            if name != "tiny":
                assert r.json()["choices"][0]["text"] == offline(run_root / name / "adapter", instruction,
                                                                 "March 5, 2024", 10), name
        served = {n: live.registry.get(n) for n in ["ipt", "lora"]}
        assert served["ipt"].layout.demos is not None  # the run's training split, as `tunelab eval` uses it
        # LoRA is a row of the shared batch: its factors in a slot, no peft layer patched into the shared model
        assert served["lora"].lora is not None and served["lora"].adapter.model is live.registry.model
        assert not any("lora_" in n for n, _ in live.registry.model.named_modules())
        base_prompt = {"model": "tiny", "prompt": "March 5, 2024", "max_tokens": 10, "instruction": instruction}
        first = client.post("/v1/completions", json=base_prompt).json()["choices"][0]["text"]
        model, tokenizer = load_model("tiny", seed=0)
    prompt = build_prompt(tokenizer, "chat", Example(id="x", task="t", instruction=instruction, input="March 5, 2024"))
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    untouched = generate(FrozenAdapter(model, "base", MethodConfig()), tokenizer, [ids], GenerationConfig(max_new_tokens=10))
    assert first == untouched[0]  # the base model was not changed by loading LoRA


def test_engine_vllm_leaves_out_what_vllm_cannot_run_with_one_warning(tmp_path, caplog):
    """`--engine vllm`: a prefix adapter is refused once, with a reason a client may read; LoRA and soft prompts
    stay (their ranks read for vLLM's LoRA slots). No vLLM needed: the refusal is decided from the files."""
    from tunelab.serve.examples import write_lora_adapters, write_prefix_adapters, write_prompt_adapters
    from tunelab.serve.registry import AdapterUnsupported

    model, tokenizer = load_model("tiny", seed=0)
    write_prompt_adapters(model, tokenizer, "tiny", tmp_path, 1, num_virtual_tokens=4)
    write_prefix_adapters(model, tokenizer, "tiny", tmp_path, 1, num_virtual_tokens=4)
    write_lora_adapters(model, tokenizer, "tiny", tmp_path, 1, r=4)
    assert AdapterRegistry(tmp_path, model, tokenizer, "tiny").names() == ["lora00", "prefix00", "task00"]
    registry = AdapterRegistry(tmp_path, model, tokenizer, "tiny", engine="vllm")
    with caplog.at_level("WARNING", logger="tunelab.serve.registry"):
        assert registry.names() == ["lora00", "task00"] and registry.names() == ["lora00", "task00"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "prefix00" in warnings[0] and "engine vllm" in warnings[0]
    with pytest.raises(AdapterUnsupported, match="not served with engine vllm: method prefix_tuning") as refused:
        registry.get("prefix00")
    assert str(tmp_path) not in str(refused.value)  # goes to clients: no server path
    assert [(name, delta.rank) for name, delta in registry.lora_deltas()] == [("lora00", 4)]
    assert registry.get("lora00").path is not None and registry.get("task00").soft is not None
