"""The native decode step (tunelab.native, decode.c): the transformers forward's logits, every row's bits
independent of the batch it decodes in (fp32 and bf16), per-row deltas between its phases, and the PyTorch
step wherever the kernel cannot run."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import base_and_soft_prompt, decode_steps, lora_with_deltas

from tunelab import fastdecode, kvcache, native, precision
from tunelab import generate as gen
from tunelab.native import llama

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"native kernel unavailable: {native.reason()}")

TEXTS = ["x", "Translate to French: good morning", "A longer prompt with several more words in it, about the sea."]


def _adapters(model_tok):
    return base_and_soft_prompt(model_tok)


_decode = decode_steps


def test_native_step_matches_the_transformers_forward_on_a_left_padded_batch(fresh_tiny):
    model, tok, (base, soft) = _adapters(fresh_tiny)
    rows = [(base if i % 2 else soft, tok(t)["input_ids"]) for i, t in enumerate(TEXTS)]
    assert llama.covers(model)
    got = _decode(model, gen.prefill_rows(rows, pad_id=2), "native")
    want = _decode(model, gen.prefill_rows(rows, pad_id=2), "hf")
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.equal(got[0], got[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_decodes_to_the_same_bits_in_any_batch(fresh_tiny, dtype):
    """Rows prefilled alone, then decoded alone or merged into one left-padded batch (as the serve scheduler
    merges them), some with virtual tokens: every step's logits are bitwise those of the row alone."""
    model, tok, (base, soft) = _adapters(fresh_tiny)
    rows = [(base, tok(TEXTS[0])["input_ids"]), (soft, tok(TEXTS[1])["input_ids"]), (base, tok(TEXTS[2])["input_ids"]),
            (soft, tok(TEXTS[2])["input_ids"])]
    with precision.weights_in(model, dtype):
        parts = [gen.prefill_rows([row], pad_id=2) for row in rows]
        alone = [_decode(model, p, "native") for p in parts]
        merged = gen.merge_prefilled(model, [gen.prefill_rows([row], pad_id=2) for row in rows])
        assert merged.mask.eq(0).any()  # really padded
        batched = _decode(model, merged, "native")
    for i in range(len(rows)):
        for step, logits in enumerate(batched):
            assert torch.equal(logits[i], alone[i][step][0]), (i, step)


def test_bf16_weights_decode_close_to_fp32(fresh_tiny):
    model, tok, (base, _) = _adapters(fresh_tiny)
    rows = [(base, tok(t)["input_ids"]) for t in TEXTS]
    fp32 = gen.prefill_rows(rows, pad_id=2)
    with precision.weights_in(model, torch.bfloat16):
        precision.cast_cache(fp32.cache, torch.bfloat16)
        state = gen.decode_step(model, fp32.logits.argmax(-1), fp32)
    reference = gen.decode_step(model, fp32.logits.argmax(-1), gen.prefill_rows(rows, pad_id=2))
    torch.testing.assert_close(state.logits, reference.logits, atol=0.05, rtol=0.05)


def _count_calls(monkeypatch) -> list:
    lib = native.library()
    calls: list = []
    real = lib.tunelab_decode
    monkeypatch.setattr(lib, "tunelab_decode", lambda s, start, end: calls.append((start, end)) or real(s, start, end))
    return calls


def test_peft_lora_deltas_are_added_between_the_phases(fresh_tiny, monkeypatch):
    """A LoRA adapter (peft layers, unmerged): the native step runs phase by phase, adding each LoRA layer's
    delta after its projection, and matches the transformers forward through peft."""
    model, tok = fresh_tiny
    adapter = lora_with_deltas(model, tok)
    assert llama.covers(adapter.model)
    rows = [(adapter, tok(t)["input_ids"]) for t in TEXTS]
    calls = _count_calls(monkeypatch)
    got = _decode(adapter.model, gen.prefill_rows(rows, pad_id=2), "native", steps=3)
    phases = 4 * len(adapter.model.model.layers) + 1
    assert calls == [(p, p + 1) for p in range(phases)] * 3  # phase by phase, every step
    want = _decode(adapter.model, gen.prefill_rows(rows, pad_id=2), "hf", steps=3)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with adapter.peft_model.disable_adapter():
        off = _decode(adapter.model, gen.prefill_rows(rows, pad_id=2), "hf", steps=3)
    assert not torch.allclose(got[0], off[0])  # the deltas really changed the logits


def test_rows_without_a_delta_get_the_bits_of_the_one_call_step(fresh_tiny, monkeypatch):
    """Phase by phase (deltas present) and one call (none) are the same arithmetic: deltas of zeros, or none,
    change no bit."""
    model, tok, (base, _) = _adapters(fresh_tiny)
    rows = [(base, tok(t)["input_ids"]) for t in TEXTS]
    calls = _count_calls(monkeypatch)
    results = []
    for deltas in (None, lambda name, x: None,
                   lambda name, x: torch.zeros(x.shape[0], model.get_submodule(name).weight.shape[0])):
        state = gen.prefill_rows(rows, pad_id=2)
        cache = kvcache.preallocate(state.cache, 2)
        mask = torch.cat([state.mask, state.mask.new_ones(len(rows), 1)], dim=1)
        w = llama.weights(model, fastdecode._key(model))
        results.append(llama.step(model, w, state.logits.argmax(-1), mask, state.next_pos, cache, deltas))
    phases = 4 * len(model.model.layers) + 1
    assert calls == [(0, phases)] + [(p, p + 1) for p in range(phases)] * 2
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_the_pytorch_step_runs_where_the_kernel_cannot(fresh_tiny, monkeypatch):
    model, tok, (base, _) = _adapters(fresh_tiny)
    rows = [(base, tok(t)["input_ids"]) for t in TEXTS]
    state = gen.prefill_rows(rows, pad_id=2)
    cache = kvcache.preallocate(state.cache, 2)
    lean_calls: list = []
    real_step = fastdecode.step
    monkeypatch.setattr(fastdecode, "step", lambda *a, **k: lean_calls.append(1) or real_step(*a, **k))
    monkeypatch.setenv("TUNELAB_NATIVE", "0")
    native._reset()
    try:
        assert native.library() is None and native.reason() == "TUNELAB_NATIVE=0"
        assert not llama.covers(model)
        run = fastdecode.stepper(model, cache)
        assert run is not None
        mask = torch.cat([state.mask, state.mask.new_ones(len(rows), 1)], dim=1)
        run(state.logits.argmax(-1), mask, state.next_pos, cache)
        assert lean_calls == [1]
    finally:
        monkeypatch.delenv("TUNELAB_NATIVE")
        native._reset()
    assert native.library() is not None


def test_a_failed_build_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNELAB_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    native._reset()
    try:
        assert native.library() is None
        assert "failed" in native.reason()
    finally:
        monkeypatch.delenv("CC")
        monkeypatch.delenv("TUNELAB_KERNEL_CACHE")
        native._reset()
