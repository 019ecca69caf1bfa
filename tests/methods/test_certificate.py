"""The adapter certificate: every registered method, on the tiny model, through the one forward path.

For each method: trainable parameters change and frozen ones do not; the loss falls when
overfitting 8 examples; save then load gives identical greedy outputs; batched and one-by-one
generation agree; the log-probabilities of the forward pass agree with the logits generation chose from.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab import generate as gen
from tunelab.config import TrainConfig
from tunelab.data import load_task
from tunelab.errors import TunelabError
from tunelab.formatting import PromptLayout, build_prompt, encode, encode_prompt
from tunelab.inference import engine, llama, steps
from tunelab.methods import METHODS
from tunelab.modeling import mask_for, pad_batch, token_logprobs
from tunelab.models import count_parameters, load_model, tiny_config
from tunelab.train import train

# Small options so every method runs in seconds on the 16-dim tiny model (no embedding model needed).
OPTIONS = {
    "icl": {"k": 1},
    "discrete_prompt": {"n_dev": 4, "template": "plain"},
    "prompt_tuning": {"num_virtual_tokens": 4, "init": "random"},
    "ipt": {"num_virtual_tokens": 4, "init": "random", "selection": "random"},
    "prefix_tuning": {"num_virtual_tokens": 4},
    "p_tuning": {"num_virtual_tokens": 4},
    "lora": {"r": 4, "dropout": 0.0},
    "full_finetune": {},
    "instruction_tuning": {"r": 4, "dropout": 0.0},
    "peft": {"peft_type": "LORA", "options": {"r": 4, "lora_dropout": 0.0}},  # other types: tests/methods/test_peft_method.py
    "prompt_optimization": {"candidates": 1, "n_dev": 2, "max_demos": 1, "max_new_tokens": 4, "template": "plain"},
}
NEEDS = {"prompt_optimization": "dspy"}  # methods whose optional extra must be installed (else skipped)
# Learning rates for overfitting 8 examples, and the drop (nats over 15 steps) each seeded run clears.
# A random 16-dim model gives prompts and prefixes little leverage (the measured drops are 0.11-0.18
# nats), LoRA ~0.35, full weights ~3; each margin is about half of what the seeded run measured.
OVERFIT = {
    "prompt_tuning": (0.3, 0.08),
    "ipt": (0.3, 0.05),
    "prefix_tuning": (0.1, 0.08),
    "p_tuning": (0.01, 0.05),
    "lora": (0.01, 0.15),
    "full_finetune": (0.01, 1.0),
    "instruction_tuning": (0.01, 0.15),
    "peft": (0.01, 0.15),
}
TEMPLATE = "plain"  # short prompts keep the certificate fast; the layout does not matter for what it checks


def test_every_method_is_certified():
    assert set(OPTIONS) == set(METHODS), "add the new method to OPTIONS (and OVERFIT if it trains)"
    assert {n for n, m in METHODS.items() if m.trains} == set(OVERFIT)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 16-dim model runs ~7x faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def examples():
    return load_task("date_format").train[:8]


_TOKENIZER = []


def _tiny():
    """A fresh tiny model (same seeded weights as load_model("tiny")), reusing one tokenizer."""
    if not _TOKENIZER:
        _TOKENIZER.append(load_model("tiny")[1])
    tok = _TOKENIZER[0]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(len(tok)))
    model.config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


def _build(name, examples):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name], reason=f"{name} needs the optional {NEEDS[name]} extra")
    model, tok = _tiny()
    method = METHODS[name]
    config = method.Config(**OPTIONS[name])
    adapter = method.build(model, tok, config, examples, 0)
    return method, config, adapter, tok, method.demonstrations(config, examples, 0)


def _encoded(adapter, tok, demos, examples):
    return [encode(tok, build_prompt(tok, PromptLayout(TEMPLATE, demos=demos), adapter.rewrite(e)), " " + e.output, 256)
            for e in examples]


def _prompts(adapter, tok, demos, examples):
    return [encode_prompt(tok, build_prompt(tok, PromptLayout(TEMPLATE, demos=demos), adapter.rewrite(e)), 256)
            for e in examples]


@dataclass
class Certified:
    """One method built on the tiny model and (if it trains) overfit on 8 examples for 15 steps."""

    method: object
    config: object
    adapter: object
    tok: object
    demos: object
    trainable: set
    before: dict
    losses: list


_RUNS: dict[str, Certified] = {}


def _run(name, examples) -> Certified:
    """Built and trained once per method for the whole module; later tests only read it."""
    if name not in _RUNS:
        method, config, adapter, tok, demos = _build(name, examples)
        named = dict(adapter.named_parameters())
        before = {n: p.detach().clone() for n, p in named.items()}
        trainable = {n for n, p in named.items() if p.requires_grad}
        losses = []
        if method.trains:
            lr = OVERFIT[name][0]
            losses = train(adapter, _encoded(adapter, tok, demos, examples), TrainConfig(steps=15, batch_size=8),
                           lr, tok.pad_token_id).losses
        adapter.eval()
        _RUNS[name] = Certified(method, config, adapter, tok, demos, trainable, before, losses)
    return _RUNS[name]


@pytest.mark.parametrize("name", list(METHODS))
def test_trainable_parameters_change_and_frozen_ones_do_not(name, examples):
    run = _run(name, examples)
    named = dict(run.adapter.named_parameters())
    assert sum(named[n].numel() for n in run.trainable) == run.adapter.num_trainable()
    if not run.method.trains:
        assert run.adapter.num_trainable() == 0
        with pytest.raises(TunelabError, match="no trainable parameters"):
            train(run.adapter, _encoded(run.adapter, run.tok, run.demos, examples), TrainConfig(steps=1), 1e-3,
                  run.tok.pad_token_id)
        return
    assert run.adapter.num_trainable() > 0
    for n, p in named.items():
        changed = not torch.equal(p.detach(), run.before[n])
        assert changed == (n in run.trainable), f"{n}: {'changed' if changed else 'unchanged'}"


@pytest.mark.parametrize("name", list(OVERFIT))
def test_loss_falls_when_overfitting_8_examples(name, examples):
    losses = _run(name, examples).losses
    assert losses[-1] < losses[0] - OVERFIT[name][1], losses


def test_exact_trainable_counts_on_the_tiny_model(examples):
    """Closed-form counts (hidden 16, 2 layers, 2 KV heads of dim 4, so K/V width 8)."""
    counts = {name: _build(name, examples)[2].num_trainable() for name in METHODS if name not in NEEDS}
    model, _ = load_model("tiny")
    assert counts["icl"] == counts["discrete_prompt"] == 0
    assert counts["prompt_tuning"] == counts["ipt"] == 4 * 16  # n x hidden
    assert counts["prefix_tuning"] == 4 * 2 * 2 * 8  # n x layers x (K, V) x KV width
    assert counts["lora"] == counts["instruction_tuning"] == 2 * 4 * ((16 + 16) + (16 + 8))  # q: 16->16, v: 16->8
    assert counts["full_finetune"] == count_parameters(model)
    # P-tuning: n x hidden embeddings + the 3-linear MLP head peft builds (hidden -> hidden -> hidden -> hidden)
    assert counts["p_tuning"] == 4 * 16 + 3 * (16 * 16 + 16)


@pytest.mark.parametrize("name", list(METHODS))
def test_save_then_load_gives_identical_greedy_outputs(name, examples, tmp_path):
    run = _run(name, examples)
    method, config, adapter, tok, demos = run.method, run.config, run.adapter, run.tok, run.demos
    prompts = _prompts(adapter, tok, demos, examples[:4])
    cfg = gen.GenerationConfig(max_new_tokens=8)
    before = gen.generate(adapter, tok, prompts, cfg)
    adapter.save_weights(tmp_path)
    reloaded = method.load(tmp_path, _tiny()[0], config)  # a fresh base model
    assert _prompts(reloaded, tok, demos, examples[:4]) == prompts
    assert gen.generate(reloaded, tok, prompts, cfg) == before


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(METHODS))
def test_batched_and_one_by_one_generation_agree(name, precision, examples):
    """Within each inference precision (bf16: the weights' bf16 copy), for the default decode step (native or
    torch, ``inference.steps``) and the transformers forward; the fast step == the transformers forward in fp32."""
    run = _run(name, examples)
    adapter, tok, demos = run.adapter, run.tok, run.demos
    prompts = _prompts(adapter, tok, demos, examples[:4]) + [tok("x", add_special_tokens=False)["input_ids"]]
    assert len({len(p) for p in prompts}) > 1  # left padding really happens
    cfg = gen.GenerationConfig(max_new_tokens=8, precision=precision)
    batched = gen.generate(adapter, tok, prompts, cfg, batch_size=len(prompts))
    assert batched == [gen.generate(adapter, tok, [p], cfg, batch_size=1)[0] for p in prompts]
    # the fast decode steps (inference.llama.supports) cover every method, peft LoRA layers included
    assert llama.supports(adapter.model)
    with steps.prefer("transformers"):  # the transformers forward in the same loop
        hf = gen.generate(adapter, tok, prompts, cfg, batch_size=len(prompts))
    if precision == "fp32":  # in bf16 the lean step's fused matmuls and rms_norm round differently from HF's ops
        assert hf == batched
    assert all(p.dtype == torch.float32 for p in adapter.model.parameters())  # bf16 only inside generation


@pytest.mark.parametrize("name", list(METHODS))
def test_forward_logprobs_agree_with_the_scores_behind_generate(name, examples, monkeypatch):
    run = _run(name, examples)
    adapter, tok, demos = run.adapter, run.tok, run.demos
    prompts = sorted(_prompts(adapter, tok, demos, examples[:3]), key=len)  # the engine's batch order
    step_logits = []  # (B, V) per decoding step, as generation saw them
    choose = engine.next_tokens
    monkeypatch.setattr(engine, "next_tokens", lambda logits, *a: step_logits.append(logits.clone()) or choose(logits, *a))
    run = engine.Engine(tok, gen.GenerationConfig(max_new_tokens=6), batch_size=len(prompts))
    new = run.run_ids([(adapter, p) for p in prompts])
    for row, (prompt, tokens) in enumerate(zip(prompts, new, strict=True)):
        assert tokens, "tiny model emitted EOS at once; pick other prompts"
        ids = [prompt + tokens]
        labels = [[-100] * len(prompt) + tokens]
        forward, _ = token_logprobs(adapter, pad_batch(ids, 0), mask_for(ids), pad_batch(labels, -100))
        generated = torch.stack([torch.log_softmax(step_logits[t][row].float(), -1)[tok_id]
                                 for t, tok_id in enumerate(tokens)])
        torch.testing.assert_close(forward, generated, atol=1e-4, rtol=1e-4)
