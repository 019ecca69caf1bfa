"""The shared forward path: positions are independent of padding, for every layout."""

import pytest
import torch

from tunelab.generate import GenerationConfig, generate
from tunelab.methods import METHODS
from tunelab.methods.prompt_tuning import PromptTuningMethodConfig
from tunelab.modeling import build_inputs, mask_for, pad_batch, positions_from_mask, sequence_logprobs


def test_positions_skip_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def _prompt_tuned(model_tok):
    model, tok = model_tok
    method = METHODS["prompt_tuning"]
    adapter = method.build(model, tok, PromptTuningMethodConfig(num_virtual_tokens=4, init="random"), [], 0)
    return adapter, tok


def test_soft_prompt_positions_match_unpadded_layout(fresh_tiny):
    adapter, _ = _prompt_tuned(fresh_tiny)
    ids = [[5, 6, 7], [8, 9]]
    inputs = build_inputs(adapter, pad_batch(ids, 0, "left"), mask_for(ids, "left"))
    # row 2 is left padded by one: its real tokens still sit at positions 4, 5 after 4 virtual tokens
    assert inputs.position_ids[1, -2:].tolist() == [4, 5]
    assert inputs.position_ids[0, -3:].tolist() == [4, 5, 6]
    assert inputs.attention_mask[1].tolist() == [1, 1, 1, 1, 0, 1, 1]


def test_batched_equals_one_by_one_greedy_with_soft_prompt(fresh_tiny):
    adapter, tok = _prompt_tuned(fresh_tiny)
    prompts = [tok(t)["input_ids"] for t in ["a short one", "a much longer prompt with many more words in it",
                                              "mid length prompt here", "x"]]
    cfg = GenerationConfig(max_new_tokens=12)
    batched = generate(adapter, tok, prompts, cfg, batch_size=4)
    single = [generate(adapter, tok, [p], cfg, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_scores_from_forward_match_generation_logits(fresh_tiny):
    """The log-likelihood path and the generation path see the same model (rank classification relies on it)."""
    adapter, tok = _prompt_tuned(fresh_tiny)
    prompt = tok("hello there")["input_ids"]
    greedy = generate(adapter, tok, [prompt], GenerationConfig(max_new_tokens=1))[0]
    first = tok(greedy, add_special_tokens=False)["input_ids"][:1]
    candidates = sorted({first[0], 11, 12, 13})
    ids = [prompt + [c] for c in candidates]
    labels = [[-100] * len(prompt) + [c] for c in candidates]
    scores = sequence_logprobs(adapter, pad_batch(ids, 0), mask_for(ids), pad_batch(labels, -100))
    assert candidates[int(scores.argmax())] == first[0]


def test_length_sorted_scoring_equals_each_row_alone(fresh_tiny):
    """score_sequences reorders rows by length for batching and returns them in input order, same values."""
    from tunelab.formatting import encode
    from tunelab.modeling import score_sequences

    model, tok = fresh_tiny
    adapter = METHODS["prompt_tuning"].build(model, tok, PromptTuningMethodConfig(num_virtual_tokens=3), [], 0)
    prompts = ["a", "a much longer prompt with many more tokens in it", "mid length prompt", "b c"]
    encoded = [encode(tok, p, f"answer {i}", 64) for i, p in enumerate(prompts)]
    batched = score_sequences(adapter, encoded, tok.pad_token_id, batch_size=3)
    alone = [score_sequences(adapter, [e], tok.pad_token_id)[0] for e in encoded]
    assert batched == pytest.approx(alone, abs=1e-4)
    assert len(set(round(v, 3) for v in alone)) == len(alone)  # distinct values: order mix-ups would show


@pytest.mark.parametrize("name", ["prompt_tuning", "prefix_tuning", "lora"])
def test_shared_prefix_scoring_equals_full_sequences(fresh_tiny, name):
    """The common template prefix is run once and only suffixes are batched: same scores as full rows."""
    from tunelab.formatting import encode
    from tunelab.modeling import _scoring_prefix_length, score_sequences

    model, tok = fresh_tiny
    adapter = METHODS[name].build(model, tok, METHODS[name].Config(), [], 0).eval()  # no LoRA dropout
    with torch.no_grad():  # a non-trivial adapter (prefix tuning and LoRA start as near no-ops)
        for p in adapter.trainable_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    system = "You are a careful assistant. Describe the restaurant from its attributes.\nInput: "
    encoded = [encode(tok, system + x, y, 128) for x, y in
               [("name[Aromi] food[Chinese]", "Aromi serves Chinese food."), ("name[Zizzi]", "Zizzi."),
                ("name[The Eagle] area[riverside] near[Burger King]", "The Eagle is by the river.")]]
    assert _scoring_prefix_length(encoded) >= 8  # the path under test is taken
    shared = score_sequences(adapter, encoded, tok.pad_token_id, batch_size=2)
    full = score_sequences(adapter, encoded, tok.pad_token_id, batch_size=2, shared_prefix=False)
    alone = [score_sequences(adapter, [e], tok.pad_token_id, shared_prefix=False)[0] for e in encoded]
    assert shared == pytest.approx(full, abs=1e-4) and shared == pytest.approx(alone, abs=1e-4)
