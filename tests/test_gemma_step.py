"""Gemma 3 text models in the torch decode step (inference.torch_step, families declared in inference.arch): the
same greedy tokens as transformers' own ``generate`` and the transformers step, per-step logits within 1e-4, with
sliding-window layers whose window the prompt and the generated tokens outrun, left padding, a soft prompt and
LoRA layers; the step table picks "torch" for Gemma and says why when it cannot."""

from __future__ import annotations

import logging
import types

import pytest
import torch
from tests.conftest import lora_with_deltas

from tunelab import kvcache
from tunelab.inference import engine, llama, steps
from tunelab.inference.sampling import GenerationConfig
from tunelab.methods import METHODS
from tunelab.methods.base import MethodConfig, freeze
from tunelab.methods.icl import FrozenAdapter

WINDOW = 8
LENGTHS = (3, 7, 12)  # left-padded rows; with NEW tokens every row outruns the sliding window
NEW = 14
TOK = types.SimpleNamespace(pad_token_id=0, eos_token_id=None)  # the engine reads only these two


def tiny_gemma(**overrides):
    """A random Gemma3ForCausalLM: 4 layers mixing sliding (window 8) and full attention, GQA 4/2 heads of 16, its
    norm weights random (Gemma's ``1 + w`` is then not 1), no EOS (every row generates ``NEW`` tokens)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    settings = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                    query_pre_attn_scalar=24, max_position_embeddings=256, initializer_range=0.05,
                    pad_token_id=0, bos_token_id=2, eos_token_id=None)
    settings.update(overrides)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**settings)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(len(name)))
    model.generation_config.eos_token_id = None
    freeze(model)
    return model


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in LENGTHS]


def _run(rows, mode: str) -> tuple[list[list[int]], set[str]]:
    with steps.prefer(mode):
        run = engine.Engine(TOK, GenerationConfig(max_new_tokens=NEW), batch_size=len(rows))
        return run.run_ids(rows), run.steps_used


def _generate(model, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' own ``generate`` over the left-padded batch."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    return out[:, width:].tolist()


def test_greedy_generation_equals_transformers_generate_token_for_token():
    model = tiny_gemma()
    prompts = _prompts()
    rows = [(FrozenAdapter(model, "base", MethodConfig()), p) for p in prompts]
    fast, used = _run(rows, "torch")
    assert used == {"torch"}
    reference = _generate(model, prompts)
    assert fast == reference
    assert _run(rows, "transformers")[0] == reference
    assert all(len(set(r)) > 3 for r in fast)  # not one repeated token
    # the window matters here: the same weights with a window no row outruns generate other tokens
    wide = tiny_gemma(sliding_window=256)
    assert _generate(wide, prompts) != reference


def _logits(rows, mode: str, model) -> list[torch.Tensor]:
    """Logits of ``NEW`` decode steps (greedy tokens fed back), each run by the step ``mode`` names."""
    state, out = engine.prefill(rows, pad_id=0), []
    with steps.prefer(mode):
        for _ in range(NEW):
            state = engine.decode_step(model, state.logits.argmax(-1), state)
            assert state.step == mode
            out.append(state.logits)
    return out


def test_per_step_logits_match_the_transformers_step():
    model = tiny_gemma()
    rows = [(FrozenAdapter(model, "base", MethodConfig()), p) for p in _prompts()]
    fast, reference = _logits(rows, "torch", model), _logits(rows, "transformers", model)
    for a, b in zip(fast, reference, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.equal(fast[0], fast[-1])  # the steps really advance


def test_the_step_table_picks_torch_for_gemma_not_native(caplog):
    model = tiny_gemma()
    assert llama.supports(model)
    cache = kvcache.preallocate(engine.prefill([(FrozenAdapter(model, "base", MethodConfig()), p)
                                                for p in _prompts()], pad_id=0).cache, 4)
    assert all(type(layer) is kvcache.PreallocatedLayer for layer in cache.layers)  # sliding layers converted
    assert [layer.window for layer in cache.layers] == [WINDOW, None, WINDOW, None]
    with caplog.at_level(logging.INFO, logger="tunelab.inference.steps"):
        assert steps.choose(model, cache)[0] == "torch"  # the default preference, native, is Llama-only
    assert "native kernel computes Llama layers" in caplog.text


class _Wrapped(torch.nn.Module):
    """A projection wrapper no method declared deltas for (``inference.llama.register_layer_deltas``)."""

    def __init__(self, inner: torch.nn.Linear) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.mark.parametrize("uncover, reason", [
    (lambda m: setattr(m.model.layers[1].self_attn, "q_proj", _Wrapped(m.model.layers[1].self_attn.q_proj)),
     "layer 1's self_attn.q_proj is neither a plain nn.Linear"),
    (lambda m: setattr(m.config, "hidden_activation", "gelu_new"), "hidden_activation 'gelu_new'"),
    (lambda m: setattr(m.config, "layer_types", ["chunked_attention"] * 4), "layer_types"),
])
def test_an_uncovered_gemma_falls_back_to_transformers_with_its_reason(uncover, reason, caplog):
    model = tiny_gemma()
    cache = kvcache.preallocate(engine.prefill([(FrozenAdapter(model, "base", MethodConfig()), [5, 6, 7])],
                                               pad_id=0).cache, 4)
    uncover(model)
    assert reason in str(llama.uncovered(model))
    with caplog.at_level(logging.INFO, logger="tunelab.inference.steps"), steps.prefer("torch"):
        assert steps.choose(model, cache)[0] == "transformers"
    assert reason in caplog.text


def test_a_cache_holding_fewer_keys_than_the_window_falls_back(caplog):
    model = tiny_gemma()
    cache = kvcache.preallocate(engine.prefill([(FrozenAdapter(model, "base", MethodConfig()), [5, 6, 7])],
                                               pad_id=0).cache, 4)
    model.config.sliding_window = WINDOW + 4  # the cache dropped keys this window would attend
    with caplog.at_level(logging.INFO, logger="tunelab.inference.steps"), steps.prefer("torch"):
        assert steps.choose(model, cache)[0] == "transformers"
    assert "fewer past keys than its model layer's attention window" in caplog.text


def test_a_sliding_cache_preallocate_cannot_convert_falls_back(caplog):
    """A sliding-window layer recording its past (assisted decoding) holds a variable number of columns: the cache
    stays as transformers built it and the step table says so."""
    model = tiny_gemma()
    cache = engine.prefill([(FrozenAdapter(model, "base", MethodConfig()), list(range(3, 15)))], pad_id=0).cache
    cache.layers[0].record_past = True
    cache = kvcache.preallocate(cache, 4)
    assert type(cache.layers[0]) is not kvcache.PreallocatedLayer
    with caplog.at_level(logging.INFO, logger="tunelab.inference.steps"), steps.prefer("torch"):
        assert steps.choose(model, cache)[0] == "transformers"
    assert "the cache is not pre-allocated (kvcache.preallocate" in caplog.text


def test_a_soft_prompt_decodes_in_the_torch_step_as_in_the_transformers_step():
    """Prompt tuning over Gemma: rows of the base model and of a soft prompt share a batch ([pad | virtual | pad |
    text] after prefill), and the torch step gives the transformers step's tokens and logits."""
    model = tiny_gemma()
    pt = METHODS["prompt_tuning"]
    soft = pt.build(model, TOK, pt.Config(num_virtual_tokens=4, init="random"), [], 0)
    base = FrozenAdapter(model, "base", MethodConfig())
    prompts = _prompts()
    rows = [(soft, p) for p in prompts] + [(base, prompts[1])]
    fast, used = _run(rows, "torch")
    assert used == {"torch"}
    assert fast == _run(rows, "transformers")[0]
    assert fast[:3] != _run([(base, p) for p in prompts], "torch")[0]  # the soft prompt changes the output
    for a, b in zip(_logits(rows, "torch", model), _logits(rows, "transformers", model), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_peft_lora_layers_on_gemma_decode_in_the_torch_step():
    model = tiny_gemma()
    adapter = lora_with_deltas(model, TOK)
    assert llama.supports(adapter.model)
    rows = [(adapter, p) for p in _prompts()]
    fast, used = _run(rows, "torch")
    assert used == {"torch"}
    assert fast == _run(rows, "transformers")[0]
    for a, b in zip(_logits(rows, "torch", adapter.model), _logits(rows, "transformers", adapter.model),
                    strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
