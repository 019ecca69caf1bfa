"""The native decode step (tunelab.native, decode.c): the transformers forward's logits, every row's bits
independent of the batch it decodes in (fp32 and bf16), per-row deltas between its phases, and the PyTorch
step wherever the kernel cannot run. The numerics tests run once per build this CPU runs (``isa``: avx512 where
the CPU has it, avx2 on any x86-64 with AVX2 + FMA, generic everywhere), each forced by TUNELAB_NATIVE_ISA."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from tests.conftest import base_and_soft_prompt, decode_steps, lora_with_deltas

from tunelab import kvcache, native, precision
from tunelab.errors import ConfigError
from tunelab.inference import engine, steps, torch_step
from tunelab.native import llama

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C compiler: the PyTorch decode step runs")


@pytest.fixture(params=native.runnable())
def isa(request, monkeypatch):
    """The build ``request.param``, forced by TUNELAB_NATIVE_ISA; the test must run its decode step."""
    monkeypatch.setenv(native.ISA_ENV, request.param)
    lib = native.library()
    assert lib is not None, native.reason()
    assert native.isa() == request.param
    ran: list = []
    real = lib.tunelab_decode
    monkeypatch.setattr(lib, "tunelab_decode", lambda s, start, end: ran.append(native.isa()) or real(s, start, end))
    yield request.param
    assert set(ran) == {request.param}  # this build's kernel, not a fallback, decoded

TEXTS = ["x", "Translate to French: good morning", "A longer prompt with several more words in it, about the sea."]


def _adapters(model_tok):
    return base_and_soft_prompt(model_tok)


_decode = decode_steps


def test_native_step_matches_the_transformers_forward_on_a_left_padded_batch(isa, fresh_tiny):
    model, tok, (base, soft) = _adapters(fresh_tiny)
    rows = [(base if i % 2 else soft, tok(t)["input_ids"]) for i, t in enumerate(TEXTS)]
    assert llama.covers(model)
    got = _decode(model, engine.prefill(rows, pad_id=2), "native")
    want = _decode(model, engine.prefill(rows, pad_id=2), "transformers")
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.equal(got[0], got[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_decodes_to_the_same_bits_in_any_batch(isa, fresh_tiny, dtype):
    """Rows prefilled alone, then decoded alone or merged into one left-padded batch (as the serve scheduler
    merges them), some with virtual tokens: every step's logits are bitwise those of the row alone."""
    model, tok, (base, soft) = _adapters(fresh_tiny)
    rows = [(base, tok(TEXTS[0])["input_ids"]), (soft, tok(TEXTS[1])["input_ids"]), (base, tok(TEXTS[2])["input_ids"]),
            (soft, tok(TEXTS[2])["input_ids"])]
    with precision.weights_in(model, dtype):
        parts = [engine.prefill([row], pad_id=2) for row in rows]
        alone = [_decode(model, p, "native") for p in parts]
        merged = engine.join(model, [engine.prefill([row], pad_id=2) for row in rows])
        assert merged.mask.eq(0).any()  # really padded
        batched = _decode(model, merged, "native")
    for i in range(len(rows)):
        for step, logits in enumerate(batched):
            assert torch.equal(logits[i], alone[i][step][0]), (i, step)


def test_bf16_weights_decode_close_to_fp32(isa, fresh_tiny):
    model, tok, (base, _) = _adapters(fresh_tiny)
    rows = [(base, tok(t)["input_ids"]) for t in TEXTS]
    fp32 = engine.prefill(rows, pad_id=2)
    with precision.weights_in(model, torch.bfloat16):
        precision.cast_cache(fp32.cache, torch.bfloat16)
        state = engine.decode_step(model, fp32.logits.argmax(-1), fp32)
    reference = engine.decode_step(model, fp32.logits.argmax(-1), engine.prefill(rows, pad_id=2))
    torch.testing.assert_close(state.logits, reference.logits, atol=0.05, rtol=0.05)


def _count_calls(monkeypatch) -> list:
    lib = native.library()
    calls: list = []
    real = lib.tunelab_decode
    monkeypatch.setattr(lib, "tunelab_decode", lambda s, start, end: calls.append((start, end)) or real(s, start, end))
    return calls


def test_peft_lora_deltas_are_added_between_the_phases(isa, fresh_tiny, monkeypatch):
    """A LoRA adapter (peft layers, unmerged): the native step runs phase by phase, adding each LoRA layer's
    delta after its projection, and matches the transformers forward through peft."""
    model, tok = fresh_tiny
    adapter = lora_with_deltas(model, tok)
    assert llama.covers(adapter.model)
    rows = [(adapter, tok(t)["input_ids"]) for t in TEXTS]
    calls = _count_calls(monkeypatch)
    got = _decode(adapter.model, engine.prefill(rows, pad_id=2), "native", steps=3)
    phases = 4 * len(adapter.model.model.layers) + 1
    assert calls == [(p, p + 1) for p in range(phases)] * 3  # phase by phase, every step
    want = _decode(adapter.model, engine.prefill(rows, pad_id=2), "transformers", steps=3)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with adapter.peft_model.disable_adapter():
        off = _decode(adapter.model, engine.prefill(rows, pad_id=2), "transformers", steps=3)
    assert not torch.allclose(got[0], off[0])  # the deltas really changed the logits


def test_rows_without_a_delta_get_the_bits_of_the_one_call_step(isa, fresh_tiny, monkeypatch):
    """Phase by phase (deltas present) and one call (none) are the same arithmetic: deltas of zeros, or none,
    change no bit."""
    model, tok, (base, _) = _adapters(fresh_tiny)
    rows = [(base, tok(t)["input_ids"]) for t in TEXTS]
    calls = _count_calls(monkeypatch)
    results = []
    for deltas in (None, lambda name, x: None,
                   lambda name, x: torch.zeros(x.shape[0], model.get_submodule(name).weight.shape[0])):
        state = engine.prefill(rows, pad_id=2)
        cache = kvcache.preallocate(state.cache, 2)
        mask = torch.cat([state.mask, state.mask.new_ones(len(rows), 1)], dim=1)
        w = llama.weights(model, llama.weights_key(model))
        results.append(llama.step(model, w, state.logits.argmax(-1), mask, state.next_pos, cache, deltas))
    phases = 4 * len(model.model.layers) + 1
    assert calls == [(0, phases)] + [(p, p + 1) for p in range(phases)] * 2
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_the_pytorch_step_runs_where_the_kernel_cannot(fresh_tiny, monkeypatch):
    model, tok, (base, _) = _adapters(fresh_tiny)
    rows = [(base, tok(t)["input_ids"]) for t in TEXTS]
    state = engine.prefill(rows, pad_id=2)
    cache = kvcache.preallocate(state.cache, 2)
    lean_calls: list = []
    real_step = torch_step.step
    monkeypatch.setattr(torch_step, "step", lambda *a, **k: lean_calls.append(1) or real_step(*a, **k))
    monkeypatch.setenv("TUNELAB_NATIVE", "0")
    native._reset()
    try:
        assert native.library() is None and native.reason() == "TUNELAB_NATIVE=0"
        assert not llama.covers(model)
        name, run = steps.choose(model, cache)
        assert name == "torch"
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


X86_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx2", "fma"}


@pytest.mark.parametrize(("asked", "flags", "machine", "want"), [
    ("auto", X86_AVX512, "x86_64", "avx512"),  # the widest build the CPU runs
    ("auto", {"avx2", "fma"}, "x86_64", "avx2"),  # AVX2-only (AMD Zen 3)
    ("auto", {"sse4_2"}, "x86_64", "generic"),
    ("auto", set(), "aarch64", "generic"),  # ARM: the portable build
    ("avx2", X86_AVX512, "x86_64", "avx2"),  # forced narrower on an AVX-512 CPU
    ("generic", X86_AVX512, "x86_64", "generic"),
])
def test_the_build_is_chosen_from_the_cpu_flags_or_the_setting(asked, flags, machine, want):
    chosen, why = native.choose(asked, flags, machine)
    assert chosen is not None and chosen.name == want and why == ""


def test_a_forced_build_the_cpu_lacks_is_refused_with_the_reason(monkeypatch):
    assert native.choose("avx512", {"avx2", "fma"}, "x86_64") == (
        None, "TUNELAB_NATIVE_ISA=avx512, but the CPU lacks avx512f, avx512bw, avx512vl")
    assert native.choose("avx2", set(), "aarch64")[1] == \
        "TUNELAB_NATIVE_ISA=avx2, but the CPU lacks an x86_64/AMD64 CPU (this is aarch64)"
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx2", "fma"})  # an AVX2-only CPU, through library()
    monkeypatch.setenv(native.ISA_ENV, "avx512")
    native._reset()
    try:
        assert native.library() is None and native.isa() is None and not native.streams_bf16_weights()
        assert "lacks avx512f" in native.reason()
    finally:
        native._reset()


def test_an_unknown_isa_setting_is_a_config_error(monkeypatch):
    monkeypatch.setenv(native.ISA_ENV, "avx1024")
    with pytest.raises(ConfigError, match="TUNELAB_NATIVE_ISA='avx1024'; choose one of auto, avx512, avx2, generic"):
        native.library()


def test_avx2_and_avx512_run_on_x86_cpus_with_them():
    """No CPU kind of x86-64 with AVX2 + FMA skips the native tests: avx2 runs on each, avx512 where it can."""
    flags = native._cpu_flags()
    if {"avx2", "fma"} <= flags:
        assert "avx2" in native.runnable()
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        assert "avx512" in native.runnable()
    assert "generic" in native.runnable()


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) not installed")
@pytest.mark.parametrize("name", native.runnable())
def test_each_build_uses_only_its_own_vector_width(name, monkeypatch):
    """The avx2 build holds no 512-bit instruction (so it runs on an AVX2-only CPU); the avx512 build does; each
    says so (``isa()``) and whether it streams bf16 weights (``precision``'s auto decode asks)."""
    monkeypatch.setenv(native.ISA_ENV, name)
    lib = native.library()
    assert lib is not None and native.isa() == name, native.reason()
    code = subprocess.run(["objdump", "-d", lib._name], capture_output=True, text=True, check=True).stdout
    if name == "avx2":
        assert "%zmm" not in code and "%ymm" in code
    elif name == "avx512":
        assert "%zmm" in code
    assert native.streams_bf16_weights() == native.ISAS[name].fast_bf16_weights
