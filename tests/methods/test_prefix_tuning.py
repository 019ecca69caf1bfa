"""Prefix tuning through the MLP reparameterisation: the MLP trains, and the saved prefix reproduces it."""

import torch

from tunelab.config import TrainConfig
from tunelab.data import load_task
from tunelab.formatting import build_prompt, encode, encode_prompt
from tunelab.generate import GenerationConfig, generate
from tunelab.methods import METHODS, method_config
from tunelab.methods.prefix_tuning import text_ids
from tunelab.modeling import token_logprobs
from tunelab.models import load_model
from tunelab.train import train


def test_prefix_projection_trains_the_mlp_and_reloads_as_the_prefix_it_computes(fresh_tiny, tmp_path):
    torch.set_num_threads(1)
    model, tok = fresh_tiny
    examples = load_task("date_format").train[:8]
    method, config = method_config({"name": "prefix_tuning", "num_virtual_tokens": 3, "prefix_projection": True,
                                    "encoder_hidden_size": 8})
    adapter = method.build(model, tok, config, examples, 0)
    encoder = adapter.peft_model.prompt_encoder["default"]
    # peft's token_dim is the K/V width (2 KV heads x 4 = 8): embedding (3 x 8) + Linear(8 -> 8)
    # + Linear(8 -> 2 layers x (K, V) x 8)
    assert adapter.num_trainable() == 3 * 8 + (8 * 8 + 8) + (8 * 32 + 32)
    cache_a, cache_b = adapter.prefix_cache(2), adapter.prefix_cache(2)
    assert cache_a is not cache_b and cache_a.get_seq_length() == 3  # a fresh cache per call
    mlp_before = encoder.transform[-1].weight.detach().clone()
    data = [encode(tok, build_prompt(tok, "plain", e), " " + e.output, 128) for e in examples]
    train(adapter, data, TrainConfig(steps=3, batch_size=8), 0.05, tok.pad_token_id)
    assert not torch.equal(encoder.transform[-1].weight, mlp_before)

    prompts = [encode_prompt(tok, build_prompt(tok, "plain", e), 128) for e in examples[:3]]
    before = generate(adapter, tok, prompts, GenerationConfig(max_new_tokens=6))
    adapter.save_weights(tmp_path)
    reloaded = METHODS["prefix_tuning"].load(tmp_path, load_model("tiny")[0], config)
    assert generate(reloaded, tok, prompts, GenerationConfig(max_new_tokens=6)) == before


def test_text_init_prefix_equals_the_text_itself(fresh_tiny):
    """init=text: a prefix of the frozen model's keys/values for text T makes [prefix; X] score like [T; X]."""
    torch.set_num_threads(1)
    model, tok = fresh_tiny
    method, config = method_config({"name": "prefix_tuning", "num_virtual_tokens": 5, "init_text": "Rewrite the date"})
    adapter = method.build(model, tok, config, [], 0)
    text = text_ids(tok, "Rewrite the date", 5)
    x = tok(" 2021-03-04 becomes March", add_special_tokens=False)["input_ids"]
    with_prefix, _ = token_logprobs(adapter, torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long),
                                    torch.tensor([[-100] + x[1:]]))
    plain = METHODS["icl"].build(model, tok, METHODS["icl"].Config(), [], 0)
    ids = text + x
    in_text, _ = token_logprobs(plain, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                                torch.tensor([[-100] * (len(text) + 1) + x[1:]]))
    torch.testing.assert_close(with_prefix, in_text, atol=1e-5, rtol=1e-5)
