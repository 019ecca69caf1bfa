"""LoRA rows in the shared batch: per-row slots on the one frozen base model, equal to offline generation."""

from __future__ import annotations

import time

import pytest
import torch

from tunelab.generate import GenerationConfig, generate_rows
from tunelab.inference.engine import prefill
from tunelab.methods.io import load_adapter
from tunelab.models import load_model
from tunelab.serve.examples import write_lora_adapters, write_prefix_adapters, write_prompt_adapters
from tunelab.serve.lora_rows import LoraSlots
from tunelab.serve.registry import AdapterRegistry
from tunelab.serve.scheduler import Request, Scheduler


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory):
    """3 random LoRA adapters (B large enough to change the tiny model's greedy text), 2 soft prompts, 2 prefixes."""
    root = tmp_path_factory.mktemp("lora_rows")
    model, tokenizer = load_model("tiny", seed=0)
    write_lora_adapters(model, tokenizer, "tiny", root, 3, std=2.0)
    write_prompt_adapters(model, tokenizer, "tiny", root, 2, num_virtual_tokens=4)
    write_prefix_adapters(model, tokenizer, "tiny", root, 2, num_virtual_tokens=4)
    return root


def offline_ids(adapter_dir, ids: list[int], cfg: GenerationConfig) -> str:
    """Greedy text of the adapter as `tunelab eval` loads it: peft's LoRA layers patched into a fresh model."""
    model, tokenizer = load_model("tiny", seed=0)
    loaded = load_adapter(adapter_dir, model, tokenizer, base_model="tiny")
    return generate_rows([(loaded.adapter, ids)], tokenizer, cfg)[0]


def test_lora_adapters_share_the_base_model_and_full_weights_do_not(tiny, mixed_root):
    model, tokenizer = tiny
    registry = AdapterRegistry(mixed_root, model, tokenizer, "tiny")
    served = registry.get("lora00")
    assert served.lora is not None and served.adapter is registry.base.adapter
    assert served.shares_base and served.method == "lora"
    assert set(served.lora.factors) == {f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")}
    assert registry.get("task00").lora is None


def test_lora_rows_mixed_with_other_adapters_equal_offline_eval(mixed_root):
    """LoRA rows of 3 adapters, soft-prompt, prefix and base rows arrive while others decode; every row's text
    equals offline generation on the peft-patched model, and the LoRA rows shared decode steps with the rest."""
    model, tokenizer = load_model("tiny", seed=0)
    registry = AdapterRegistry(mixed_root, model, tokenizer, "tiny", max_lora_adapters=2)
    scheduler = Scheduler(tokenizer, max_batch=8, lora=registry.lora)
    names = ["lora00", "task00", "lora01", "prefix00", "tiny", "lora02", "task01", "lora00", "prefix01", "lora01"]
    try:
        jobs = []
        for i, name in enumerate(names):
            ids = tokenizer(f"request {i} " * (1 + i % 3), add_special_tokens=False)["input_ids"]
            jobs.append(Request(registry.get(name), ids, GenerationConfig(max_new_tokens=6 + 2 * i)))
            scheduler.submit(jobs[-1])
            time.sleep(0.002)
        results = [job.future.result(timeout=120) for job in jobs]
    finally:
        scheduler.close()
    assert scheduler.stats.mixed_steps > 0
    assert registry.lora.stats.evictions > 0  # 3 LoRA adapters through 2 slots
    for name, job, result in zip(names, jobs, results, strict=True):
        want = offline_ids(mixed_root / name, job.prompt_ids, job.cfg) if name != "tiny" else \
            generate_rows([(registry.base.adapter, job.prompt_ids)], tokenizer, job.cfg)[0]
        assert result.text == want, name
    base_text = generate_rows([(registry.base.adapter, jobs[0].prompt_ids)], tokenizer, jobs[0].cfg)[0]
    assert results[0].text != base_text  # the LoRA rows really changed the output


def test_a_batch_without_lora_rows_carries_no_slots_and_logits_are_untouched(tiny, mixed_root):
    model, tokenizer = tiny
    registry = AdapterRegistry(mixed_root, model, tokenizer, "tiny")
    lora = registry.get("lora00")
    slot = registry.lora.acquire("lora00", lora.lora)
    base = registry.base.adapter
    try:
        plain = prefill([(base, [5, 6, 7]), (base, [8, 9])], tokenizer.pad_token_id, [0, 0])
        mixed = prefill([(base, [5, 6, 7]), (base, [8, 9])], tokenizer.pad_token_id, [0, slot])
    finally:
        registry.lora.release(slot)
    assert plain.slots is None and mixed.slots is not None
    assert torch.equal(plain.logits[0], mixed.logits[0])  # slot 0 adds exact zeros
    assert not torch.allclose(plain.logits[1], mixed.logits[1])


def test_slots_evict_the_least_recently_used_idle_adapter_and_never_a_busy_one(tiny, mixed_root):
    model, tokenizer = tiny
    registry = AdapterRegistry(mixed_root, model, tokenizer, "tiny")
    deltas = {n: registry.get(n).lora for n in ("lora00", "lora01", "lora02")}
    slots = LoraSlots(model, capacity=2)
    first = slots.acquire("lora00", deltas["lora00"])
    second = slots.acquire("lora01", deltas["lora01"])
    assert {first, second} == {1, 2}
    assert slots.acquire("lora02", deltas["lora02"]) is None  # both busy: the request must wait
    assert slots.stats.waits == 1
    slots.release(first)
    slots.release(second)
    slots.acquire("lora01", deltas["lora01"])  # lora01 used more recently than lora00
    slots.release(second)
    assert slots.acquire("lora02", deltas["lora02"]) == first  # lora00 (least recently used) evicted
    assert slots.loaded() == ["lora01", "lora02"] and slots.stats.evictions == 1


def test_full_weights_and_folded_lora_keep_private_copies(tiny, mixed_root, tmp_path):
    import json
    import shutil

    from tunelab.formatting import PromptLayout
    from tunelab.methods import METHODS
    from tunelab.methods.base import ADAPTER_META
    from tunelab.methods.full_finetune import FullFinetuneConfig
    from tunelab.methods.io import load_low_rank_delta, save_adapter

    model, tokenizer = tiny
    root = tmp_path / "private"
    root.mkdir()
    full = METHODS["full_finetune"].build(load_model("tiny", seed=0)[0], tokenizer, FullFinetuneConfig(), [], seed=0)
    save_adapter(full, root / "full", "tiny", PromptLayout().resolved(tokenizer))
    registry = AdapterRegistry(root, model, tokenizer, "tiny")
    served = registry.get("full")
    assert served.lora is None and not served.shares_base and served.adapter.model is not model
    folded = tmp_path / "folded"
    shutil.copytree(mixed_root / "lora00", folded)
    meta = json.loads((folded / ADAPTER_META).read_text())
    (folded / ADAPTER_META).write_text(json.dumps({**meta, "folded_from": str(mixed_root / "lora01")}))
    assert load_low_rank_delta(folded, tokenizer, "tiny") is None  # W' = W + folded delta is not low rank over W
    assert load_low_rank_delta(mixed_root / "lora00", tokenizer, "tiny") is not None


def test_the_static_batcher_serves_lora_rows_on_the_shared_model_like_offline(mixed_root):
    from tunelab.serve.batcher import HotPrompts, Job, run_group

    model, tokenizer = load_model("tiny", seed=0)
    registry = AdapterRegistry(mixed_root, model, tokenizer, "tiny", max_lora_adapters=1)
    cfg = GenerationConfig(max_new_tokens=8)
    names = ["lora00", "task00", "lora01", "lora00", "prefix00"]
    jobs = [Job(registry.get(n), [5 + i, 6, 7 + i], cfg) for i, n in enumerate(names)]
    texts = run_group(jobs, tokenizer, HotPrompts(4), registry.lora)
    for name, job, text in zip(names, jobs, texts, strict=True):
        assert text == offline_ids(mixed_root / name, job.prompt_ids, cfg), name
    assert registry.lora.stats.evictions == 1  # one slot, two LoRA adapters in turn


def test_instruction_tuning_declares_its_lora_weights_a_low_rank_delta_and_full_weights_not(mixed_root):
    from tunelab.methods import METHODS
    from tunelab.methods.instruction_tuning import InstructionTuningConfig

    method = METHODS["instruction_tuning"]
    assert method.capabilities.low_rank_delta and not METHODS["full_finetune"].capabilities.low_rank_delta
    delta = method.low_rank_delta(mixed_root / "lora00", InstructionTuningConfig(weights="lora"))
    assert delta is not None and delta.scaling == 16 / 8
    assert method.low_rank_delta(mixed_root / "lora00", InstructionTuningConfig(weights="full")) is None


def test_lora_rows_decode_in_the_lean_step_with_the_hooks_deltas(mixed_root, monkeypatch):
    """A batch with LoRA rows takes the lean decode step (not the transformers forward), which adds the same
    per-row deltas as the module hooks: its logits match the hooked transformers forward step after step, and
    the LoRA rows differ from what the lean step gives without their slots."""
    from tunelab.inference import steps, torch_step
    from tunelab.inference.engine import decode_step

    model, tokenizer = load_model("tiny", seed=0)
    registry = AdapterRegistry(mixed_root, model, tokenizer, "tiny", max_lora_adapters=2)
    base = registry.base.adapter
    slots = [registry.lora.acquire(n, registry.get(n).lora) for n in ("lora00", "lora01")]
    rows = [(base, [5, 6, 7]), (base, [8, 9]), (base, [10, 11, 12, 13])]
    row_slots = [slots[0], 0, slots[1]]
    calls = []
    real_step = torch_step.step

    def spy(*args, **kwargs):  # step(model, w, tokens, mask, positions, cache, deltas)
        calls.append(args[6] if len(args) > 6 else kwargs.get("deltas"))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(torch_step, "step", spy)

    def run(mode: str, with_slots: bool) -> list[torch.Tensor]:
        state = prefill(rows, tokenizer.pad_token_id, row_slots if with_slots else None)
        out = []
        with steps.prefer(mode):
            for _ in range(4):
                state = decode_step(model, state.logits.argmax(-1), state)
                out.append(state.logits)
        return out

    try:
        hf = run("transformers", True)
        assert not calls
        lean = run("torch", True)
        assert len(calls) == 4 and all(d is not None for d in calls)  # every step lean, with deltas
        plain = run("torch", False)
    finally:
        for s in slots:
            registry.lora.release(s)
    for a, b in zip(lean, hf, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(lean[0][0], plain[0][0])  # the LoRA rows' deltas were really added
    torch.testing.assert_close(lean[0][1], plain[0][1], atol=1e-5, rtol=1e-5)  # the slot-0 row: no delta
