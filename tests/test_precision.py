"""Inference precision per phase (tunelab.precision, applied by inference.engine) and the pre-allocated cache."""

import pytest
import torch
from transformers import DynamicCache

from tunelab import generate as gen
from tunelab import precision
from tunelab.errors import ConfigError
from tunelab.inference import engine, steps
from tunelab.kvcache import PreallocatedLayer, preallocate
from tunelab.methods import METHODS
from tunelab.methods.base import MethodConfig, freeze
from tunelab.methods.icl import FrozenAdapter
from tunelab.modeling import score_sequences

TEXTS = ["a short one", "a much longer prompt with many more words in it than the others have",
         "mid length prompt here", "x", "Q: what is two plus two? A:"]


def test_resolve_names_each_phase_and_rejects_unknown_names():
    assert precision.resolve("fp32") == precision.PhasePrecision("fp32", "fp32")
    assert precision.resolve("bf16") == precision.PhasePrecision("bf16", "bf16")
    auto = precision.resolve("auto", "cpu")
    assert {auto.prefill, auto.decode} <= {"fp32", "bf16"}
    assert precision.resolve("auto", "cpu") is auto  # decided once per process, from the device
    with pytest.raises(ConfigError, match="eval.precision='fp16'; choose one of fp32, bf16, auto"):
        precision.resolve("fp16")


@pytest.mark.parametrize(("bf16_units", "native_bf16", "want"), [
    (False, False, ("fp32", "fp32")),  # no bf16 units, no native step: fp32 throughout
    (False, True, ("fp32", "bf16")),  # AVX2-only: torch's bf16 GEMM is slow, the native GEMV streams bf16 fine
    (True, False, ("bf16", "bf16")),
    (True, True, ("bf16", "bf16")),
])
def test_auto_follows_the_cpu_bf16_units_and_the_native_step(monkeypatch, bf16_units, native_bf16, want):
    from tunelab import distributed, native

    precision._resolve.cache_clear()
    try:
        monkeypatch.setattr(distributed, "cpu_has_fast_bf16", lambda: bf16_units)
        monkeypatch.setattr(native, "streams_bf16_weights", lambda: native_bf16)
        assert precision.resolve("auto", "cpu") == precision.PhasePrecision(*want)
    finally:
        precision._resolve.cache_clear()


def test_weights_in_swaps_to_a_kept_copy_and_restores_the_fp32_tensors_exactly(fresh_tiny):
    model, _ = fresh_tiny
    weight = model.get_input_embeddings().weight
    before = weight.detach().clone()
    with precision.weights_in(model, torch.bfloat16):
        assert weight.dtype == torch.bfloat16
        first = weight.data_ptr()
    with precision.weights_in(model, torch.bfloat16):
        assert weight.data_ptr() == first  # the copy is kept, not re-cast
    assert weight.dtype == torch.float32 and torch.equal(weight, before)
    with torch.no_grad():
        weight.add_(1.0)  # an optimizer step: the next bf16 block must see it
    with precision.weights_in(model, torch.bfloat16):
        assert weight.data_ptr() != first
        torch.testing.assert_close(weight.float(), before + 1.0, atol=0.05, rtol=0.01)


def _adapters(model_tok):
    model, tok = model_tok
    freeze(model)
    base = FrozenAdapter(model, "base", MethodConfig())
    pt = METHODS["prompt_tuning"]
    soft = pt.build(model, tok, pt.Config(num_virtual_tokens=4, init="random"), [], 0)
    pre = METHODS["prefix_tuning"]
    prefix = pre.build(model, tok, pre.Config(num_virtual_tokens=3), [], 0)
    with torch.no_grad():
        for p in prefix.trainable_parameters():
            p.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    return [base, soft, prefix], tok


def _logit_dtypes(monkeypatch) -> list:
    """The dtype of the logits of every step, prefill first (the lean decode step calls no head module)."""
    seen: list = []
    choose = engine.next_tokens
    monkeypatch.setattr(engine, "next_tokens", lambda logits, *a: seen.append(logits.dtype) or choose(logits, *a))
    return seen


def _native_weight_dtypes(monkeypatch) -> list:
    """The weight dtype of every native decode step (it reads bf16 weights and returns fp32 logits)."""
    from tunelab.native import llama

    seen: list = []
    real = llama.step
    monkeypatch.setattr(llama, "step", lambda model, w, *a, **k: seen.append(w.dtype) or real(model, w, *a, **k))
    return seen


def test_bf16_generation_runs_in_bf16_and_mixed_batches_equal_each_row_alone(fresh_tiny, monkeypatch):
    from tunelab import native

    adapters, tok = _adapters(fresh_tiny)
    rows = [(adapters[i % 3], tok(t)["input_ids"]) for i, t in enumerate(TEXTS * 2)]
    cfg = gen.GenerationConfig(max_new_tokens=8, precision="bf16")
    seen, native_steps = _logit_dtypes(monkeypatch), _native_weight_dtypes(monkeypatch)
    alone = [gen.generate_rows([r], tok, cfg, batch_size=1)[0] for r in rows]
    assert len(seen) > len(rows)
    if native.library() is not None:  # the native step: bf16 weights, fp32 residual stream and logits
        assert set(native_steps) == {torch.bfloat16} and len(native_steps) == len(seen) - len(rows)  # every step
        assert set(seen) == {torch.bfloat16, torch.float32}
    else:
        assert set(seen) == {torch.bfloat16}
    assert gen.generate_rows(rows, tok, cfg, batch_size=16) == alone
    with steps.prefer("torch"):  # the PyTorch lean step in bf16: batch-invariant on its own terms
        lean_alone = [gen.generate_rows([r], tok, cfg, batch_size=1)[0] for r in rows]
        assert gen.generate_rows(rows, tok, cfg, batch_size=16) == lean_alone
    with steps.prefer("transformers"):  # the transformers forward in bf16, batches of another size
        hf_alone = [gen.generate_rows([r], tok, cfg, batch_size=1)[0] for r in rows]
        assert gen.generate_rows(rows, tok, cfg, batch_size=4) == hf_alone
    assert len(set(alone)) > 1


def test_the_phases_may_differ_in_precision(fresh_tiny, monkeypatch):
    adapters, tok = _adapters(fresh_tiny)
    monkeypatch.setattr(precision, "resolve", lambda name, device="cpu", key="": precision.PhasePrecision("bf16", "fp32"))
    rows = [(adapters[i % 3], tok(t)["input_ids"]) for i, t in enumerate(TEXTS)]
    cfg = gen.GenerationConfig(max_new_tokens=4, precision="auto")
    seen = _logit_dtypes(monkeypatch)
    batched = gen.generate_rows(rows, tok, cfg, batch_size=8)
    assert len(seen) > 1 and seen[0] == torch.bfloat16 and set(seen[1:]) == {torch.float32}  # prefill bf16, decode fp32
    assert batched == [gen.generate_rows([r], tok, cfg, batch_size=1)[0] for r in rows]


def test_bf16_scores_equal_row_by_row_and_stay_near_fp32(fresh_tiny):
    from tunelab.formatting import encode

    adapters, tok = _adapters(fresh_tiny)
    system = "You are a helpful assistant. Answer briefly. "
    encoded = [encode(tok, system + t, " the answer", 64) for t in TEXTS]
    for adapter in adapters:
        fp32 = torch.tensor(score_sequences(adapter, encoded, tok.pad_token_id, 16, precision="fp32"))
        bf16 = torch.tensor(score_sequences(adapter, encoded, tok.pad_token_id, 16, precision="bf16"))
        alone = torch.tensor([score_sequences(adapter, [e], tok.pad_token_id, 1, shared_prefix=False,
                                              precision="bf16")[0] for e in encoded])
        # stated tolerance: batched bf16 vs row-by-row bf16 within 0.05 nats per sequence (bf16 keeps 8 bits
        # of mantissa; the shared-prefix forward and padding change the rounding, not the arithmetic)
        torch.testing.assert_close(bf16, alone, atol=0.05, rtol=0.0)
        torch.testing.assert_close(bf16, fp32, atol=0.2, rtol=0.02)
        assert not torch.equal(bf16, fp32)  # bf16 really ran


def test_preallocated_layer_returns_what_concatenation_returns():
    torch.manual_seed(0)
    keys, values = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    cache = DynamicCache()
    cache.update(keys, values, 0)
    reference = DynamicCache()
    reference.update(keys.clone(), values.clone(), 0)
    cache = preallocate(cache, 2)
    assert isinstance(cache.layers[0], PreallocatedLayer)
    for step in range(4):  # two steps fit, then it grows by concatenation
        k, v = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
        got, ref = cache.update(k, v, 0), reference.update(k, v, 0)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        assert cache.get_seq_length() == reference.get_seq_length() == 6 + step


def test_evaluate_generates_and_scores_in_eval_precision(fresh_tiny):
    from tunelab.config import EvalConfig
    from tunelab.data import load_task
    from tunelab.evaluate import evaluate

    adapters, tok = _adapters(fresh_tiny)
    seen = []
    hook = adapters[0].model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    examples = load_task("date_format").eval[:3]
    evaluate(adapters[1], tok, "plain", examples, ["exact_match"], EvalConfig(precision="bf16", max_new_tokens=3),
             n_resamples=10)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}


def test_cli_rejects_an_unknown_precision_before_loading_anything():
    from typer.testing import CliRunner

    from tunelab.cli import app

    result = CliRunner().invoke(app, ["eval", "--model", "tiny", "--data", "date_format", "--precision", "fp16"])
    assert isinstance(result.exception, ConfigError)
    assert "eval.precision: got 'fp16', expected one of fp32, bf16, auto" in str(result.exception)


def test_a_reader_holding_weights_lock_never_sees_the_swapped_copy(fresh_tiny):
    """serve: the scheduler swaps the base model's weights per phase on its thread while the registry may deep-copy
    that model on a request thread (a full-weights adapter); the copy waits for the swap to end."""
    import copy
    import threading

    model, _ = fresh_tiny
    inside, release, copied = threading.Event(), threading.Event(), []

    def decode():
        with precision.weights_in(model, torch.bfloat16):
            inside.set()
            release.wait(30)

    def load():
        with precision.weights_lock(model):
            copied.append(copy.deepcopy(model))

    swapper = threading.Thread(target=decode)
    swapper.start()
    assert inside.wait(30)
    reader = threading.Thread(target=load)
    reader.start()
    reader.join(0.3)
    assert reader.is_alive()  # waits while the bf16 copy is swapped in
    release.set()
    swapper.join(30)
    reader.join(30)
    assert copied and copied[0].get_input_embeddings().weight.dtype == torch.float32
