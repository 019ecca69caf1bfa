"""The fast generation/scoring path (cached virtual tokens, mixed-adapter batches, shared prefixes)
reproduces the plain per-example path."""

import torch

from tunelab import modeling
from tunelab.generate import GenerationConfig, eos_ids, generate_rows
from tunelab.inference import engine, steps
from tunelab.methods import METHODS
from tunelab.methods.base import MethodConfig, freeze
from tunelab.methods.icl import FrozenAdapter
from tunelab.modeling import mask_for, pad_batch, sequence_logprobs, virtual_kv

TEXTS = ["a short one", "a much longer prompt with many more words in it than the others have",
         "mid length prompt here", "x", "Q: what is two plus two? A:"]


def _adapters(model_tok):
    """Base, prompt tuning and prefix tuning adapters on ONE base model object."""
    model, tok = model_tok
    freeze(model)
    base = FrozenAdapter(model, "base", MethodConfig())
    pt = METHODS["prompt_tuning"]
    soft = pt.build(model, tok, pt.Config(num_virtual_tokens=4, init="random"), [], 0)
    pre = METHODS["prefix_tuning"]
    prefix = pre.build(model, tok, pre.Config(num_virtual_tokens=3), [], 0)
    with torch.no_grad():  # a non-zero prefix, so it changes outputs
        for p in prefix.trainable_parameters():
            p.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    return [base, soft, prefix], tok


def _reference(adapter, tok, prompt, cfg):
    """One row alone, greedy, without the engine: the soft prompt / prefix recomputed in the forward
    (``modeling.hidden_states`` with gradients on, as training runs it: no ``virtual_kv`` cache), then the
    transformers forward step after step over that cache."""
    model = adapter.model
    ids = torch.tensor([prompt])
    with torch.enable_grad():
        hidden, cache, inputs, _ = modeling.hidden_states(adapter, ids, torch.ones_like(ids), use_cache=True)
    eos, step = set(eos_ids(model, tok)), steps.transformers_step(model)
    mask, pos, out = inputs.attention_mask, inputs.position_ids[:, -1] + 1, []
    with torch.no_grad():
        logits = model.get_output_embeddings()(hidden[:, -1])
        while len(out) < cfg.max_new_tokens:
            token = int(logits.argmax(-1))
            if token in eos:
                break
            out.append(token)
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            logits = step(torch.tensor([token]), mask, pos, cache)
            pos = pos + 1
    return tok.decode(out, skip_special_tokens=True)


def test_mixed_adapter_batch_equals_each_row_alone(fresh_tiny):
    adapters, tok = _adapters(fresh_tiny)
    cfg = GenerationConfig(max_new_tokens=8)
    rows = [(adapters[i % 3], tok(t)["input_ids"]) for i, t in enumerate(TEXTS * 2)]
    expected = [_reference(a, tok, p, cfg) for a, p in rows]
    assert generate_rows(rows, tok, cfg, batch_size=16) == expected
    assert generate_rows(rows, tok, cfg, batch_size=4) == expected
    # the adapters matter: the same prompt gives different outputs under different adapters
    same_prompt = [_reference(a, tok, rows[1][1], cfg) for a in adapters]
    assert len(set(same_prompt)) > 1


def test_shared_prefix_is_computed_once_and_changes_nothing(fresh_tiny, monkeypatch):
    adapters, tok = _adapters(fresh_tiny)
    system = tok("You are a helpful assistant. Answer the question below briefly and exactly.")["input_ids"]
    assert len(system) >= 8
    prompts = [system + tok(t)["input_ids"] for t in TEXTS]
    cfg = GenerationConfig(max_new_tokens=8)
    calls = []
    real = engine.extend_kv
    monkeypatch.setattr(engine, "extend_kv", lambda *a, **k: calls.append(1) or real(*a, **k))
    for adapter in adapters:
        rows = [(adapter, p) for p in prompts]
        expected = [_reference(adapter, tok, p, cfg) for p in prompts]
        assert generate_rows(rows, tok, cfg, batch_size=2, shared_prefix_min=8) == expected
    assert len(calls) == 3  # once per adapter, shared by its 3 batches


def test_cached_scores_equal_recomputed_scores(fresh_tiny):
    adapters, tok = _adapters(fresh_tiny)
    ids = [tok(t)["input_ids"] for t in TEXTS]
    labels = [[-100] * (len(x) // 2) + x[len(x) // 2:] for x in ids]
    args = pad_batch(ids, tok.pad_token_id), mask_for(ids), pad_batch(labels, -100)
    for adapter in adapters:
        with torch.no_grad():
            fast = sequence_logprobs(adapter, *args)
            with torch.enable_grad():  # the soft prompt recomputed in the forward, as in training
                slow = sequence_logprobs(adapter, *args).detach()
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_virtual_kv_is_reused_until_the_soft_prompt_changes(fresh_tiny):
    (base, soft, prefix), _ = _adapters(fresh_tiny)
    assert virtual_kv(base) is None
    assert virtual_kv(prefix).length == 3
    first = virtual_kv(soft)
    assert first.length == 4 and virtual_kv(soft) is first
    with torch.no_grad():
        soft.trainable_parameters()[0].add_(0.5)
    second = virtual_kv(soft)
    assert second is not first and not torch.equal(second.keys[0], first.keys[0])


def test_batch_cache_left_pads_prefixes_of_different_lengths(fresh_tiny):
    (_, soft, prefix), _ = _adapters(fresh_tiny)
    cache, mask = modeling.batch_cache(soft.model, [virtual_kv(soft), None, virtual_kv(prefix)])
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 1]]
    assert cache.get_seq_length() == 4
    torch.testing.assert_close(cache.layers[0].keys[2:, :, 1:], virtual_kv(prefix).keys[0])
