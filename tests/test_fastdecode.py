"""The torch decode step (tunelab.inference.torch_step) and the step table (inference.steps): same logits as the transformers forward, cached weights that
follow parameter changes, the transformers forward kept for LoRA layers, batch-invariant projections."""

from __future__ import annotations

import logging

import pytest
import torch
from tests.conftest import decode_steps, lora_with_deltas

from tunelab.inference import engine, llama, steps, torch_step
from tunelab.methods import lora_layers
from tunelab.methods.base import MethodConfig, freeze
from tunelab.methods.icl import FrozenAdapter

TEXTS = ["x", "Translate to French: good morning", "A longer prompt with several more words in it, about the sea."]


def _rows(model_tok):
    model, tok = model_tok
    freeze(model)
    adapter = FrozenAdapter(model, "base", MethodConfig())
    return model, [(adapter, tok(t)["input_ids"]) for t in TEXTS]


def _decode(model, rows, mode: str, n: int = 5) -> list[torch.Tensor]:
    """Logits of ``n`` decode steps of the engine (prefill + decode_step), feeding greedy tokens."""
    return decode_steps(model, engine.prefill(rows, pad_id=2), mode, n)


def test_lean_step_matches_the_transformers_forward_on_a_left_padded_batch(fresh_tiny):
    model, rows = _rows(fresh_tiny)
    assert llama.supports(model)  # the tiny model is a LlamaForCausalLM like SmolLM2
    lean, hf = _decode(model, rows, "torch"), _decode(model, rows, "transformers")
    for a, b in zip(lean, hf, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.equal(lean[0], lean[-1])  # the steps really advance


def test_fused_weights_are_cached_and_rebuilt_when_a_parameter_changes(fresh_tiny):
    model, rows = _rows(fresh_tiny)
    first = torch_step.weights(model)
    assert torch_step.weights(model) is first
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # an in-place update, as an optimizer step makes
    assert torch_step.weights(model) is not first
    for a, b in zip(_decode(model, rows, "torch", 2), _decode(model, rows, "transformers", 2), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_peft_lora_layers_decode_in_the_lean_step_with_their_own_deltas(fresh_tiny):
    """`tunelab eval` of a LoRA adapter (peft layers patched in, unmerged): the lean step adds each LoRA layer's
    B(A(x)) * scaling after the fused base projections and matches the transformers forward through peft."""

    model, tok = fresh_tiny
    adapter = lora_with_deltas(model, tok)
    assert llama.supports(adapter.model)
    rows = [(adapter, tok(t)["input_ids"]) for t in TEXTS]
    lean, hf = _decode(adapter.model, rows, "torch"), _decode(adapter.model, rows, "transformers")
    for a, b in zip(lean, hf, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    state = engine.prefill(rows, pad_id=2)
    from tunelab import kvcache

    assert steps.choose(adapter.model, kvcache.preallocate(state.cache, 4))[0] != "transformers"
    adapter.model.get_submodule("model.layers.0.self_attn.q_proj").merge()  # merged: not a plain delta any more
    assert not llama.supports(adapter.model)
    adapter.model.get_submodule("model.layers.0.self_attn.q_proj").unmerge()
    with adapter.peft_model.disable_adapter():
        assert not llama.supports(adapter.model)  # disabled layers: the transformers forward
        off = _decode(adapter.model, rows, "torch")
    assert not torch.allclose(lean[0], off[0])  # the deltas really change the logits


def test_the_lora_layer_map_is_cached_and_follows_set_adapter(fresh_tiny):
    """The decode step finds peft's LoRA layers once per weight set, not by a module walk per step; switching the
    active adapter (no tensor changes) rebuilds it, and the lean step then adds the new adapter's deltas."""
    from tunelab.methods import METHODS

    model, tok = fresh_tiny
    adapter = METHODS["lora"].build(model, tok, METHODS["lora"].Config(r=4, dropout=0.0), [], 0)
    peft_model = adapter.peft_model
    peft_model.add_adapter("other", peft_model.peft_config["default"])
    with torch.no_grad():
        for name, p in adapter.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name) + ("other" in name)))
    first = torch_step.weights(adapter.model)
    walked = {n for n, m in adapter.model.named_modules() if lora_layers.peft_lora(m)}
    assert set(first.lora) == walked and walked  # the LoRA layers the config targets
    assert torch_step.weights(adapter.model) is first  # cached: nothing changed
    rows = [(adapter, tok(t)["input_ids"]) for t in TEXTS]
    default = _decode(adapter.model, rows, "torch")
    peft_model.set_adapter("other")
    assert torch_step.weights(adapter.model) is not first  # same tensors, other active adapter: rebuilt
    other, hf = _decode(adapter.model, rows, "torch"), _decode(adapter.model, rows, "transformers")
    for a, b in zip(other, hf, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(default[0], other[0])


def test_an_unknown_step_is_refused():
    with pytest.raises(ValueError, match="choose one of native, torch, transformers"), steps.prefer("fast"):
        pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_wide_projection_gives_each_row_the_same_bits_in_any_batch(dtype):
    # SmolLM2's down projection (1536 -> 576): split into input chunks of <= MAX_K columns
    weight = torch.randn(576, 1536, generator=torch.Generator().manual_seed(0)).to(dtype)
    linear = torch_step._prepare(weight, None, pack=True)
    assert len(linear.chunks) == 2
    x = torch.randn(16, 1536, generator=torch.Generator().manual_seed(1)).to(dtype)
    batched = linear(x)
    torch.testing.assert_close(batched.float(), (x.float() @ weight.float().T), atol=0.5, rtol=0.02)
    for m in (1, 3, 16):
        for row in range(m):
            assert torch.equal(linear(x[:m])[row], batched[row])


def test_row_slots_without_a_delta_provider_keep_the_transformers_forward(fresh_tiny, caplog):
    """Per-row deltas that live only in module hooks (no inference.rows.row_deltas) would be skipped by the fast
    steps: the table falls back to the transformers forward and logs one line saying why."""
    from tunelab import kvcache
    from tunelab.inference.rows import row_slots

    model, rows = _rows(fresh_tiny)
    state = engine.prefill(rows, pad_id=2)
    cache = kvcache.preallocate(state.cache, 4)
    assert steps.choose(model, cache)[0] != "transformers"
    with row_slots(torch.tensor([1, 0, 0])), caplog.at_level(logging.INFO, logger="tunelab.inference.steps"):
        assert steps.choose(model, cache)[0] == "transformers"
    assert "module hooks" in caplog.text


class _Scaled(torch.nn.Module):
    """A wrapped projection no library's class is known for: ``base(x) + (x @ m.T) * 0.5``."""

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__()
        self.base_layer = base
        gen = torch.Generator().manual_seed(base.weight.shape[0] + base.weight.shape[1])
        self.m = torch.nn.Parameter(torch.randn(base.weight.shape, generator=gen) * 0.05, requires_grad=False)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.m.T) * 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.delta(x)


class _ScaledDeltas:
    """The ``inference.llama.LayerDeltas`` a method patching ``_Scaled`` layers in would declare."""

    def layer(self, module):
        return (module.base_layer, module.delta) if isinstance(module, _Scaled) else None

    def state(self, module) -> tuple:
        return ()


def test_a_layer_declared_by_its_method_decodes_in_the_lean_step_and_an_undeclared_one_does_not(fresh_tiny, caplog,
                                                                                               monkeypatch):
    """The step table knows no layer class: a wrapped projection decodes in the fast steps only when its deltas are
    declared for the model (``llama.register_layer_deltas``), and then matches the transformers forward."""
    from tunelab import kvcache

    model, rows = _rows(fresh_tiny)
    for layer in model.model.layers:
        layer.self_attn.v_proj = _Scaled(layer.self_attn.v_proj)
        layer.mlp.down_proj = _Scaled(layer.mlp.down_proj)
    state = engine.prefill(rows, pad_id=2)
    monkeypatch.setattr(steps, "_LOGGED", set())  # each fallback reason logs once per process: not yet, here
    with caplog.at_level(logging.INFO, logger="tunelab.inference.steps"):
        assert not llama.supports(model)
        assert steps.choose(model, kvcache.preallocate(state.cache, 4))[0] == "transformers"
    assert "declared deltas" in caplog.text
    llama.register_layer_deltas(model, _ScaledDeltas())
    assert llama.supports(model)
    assert steps.choose(model, kvcache.preallocate(engine.prefill(rows, pad_id=2).cache, 4))[0] != "transformers"
    assert len(torch_step.weights(model).lora) == 2 * len(model.model.layers)
    lean, hf = _decode(model, rows, "torch"), _decode(model, rows, "transformers")
    for a, b in zip(lean, hf, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for layer in model.model.layers:  # the deltas are really added: without them the logits differ
        layer.self_attn.v_proj.m.data.zero_()
        layer.mlp.down_proj.m.data.zero_()
    assert not torch.allclose(_decode(model, rows, "torch")[0], lean[0])
