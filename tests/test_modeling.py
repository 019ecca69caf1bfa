"""The shared forward path: positions are independent of padding, for every layout."""

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
