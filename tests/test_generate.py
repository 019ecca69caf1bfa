"""The one generation loop: batched == one at a time, stop strings, token budget, sampling."""

import pytest

from tunelab import native, precision
from tunelab.formatting import build_prompt, encode_prompt
from tunelab.generate import GenerationConfig, cut_at_stop, generate
from tunelab.inference import engine
from tunelab.methods.base import MethodConfig, freeze
from tunelab.methods.icl import FrozenAdapter

TEXTS = [
    "x",
    "Translate to French: good morning",
    "A much longer prompt " + "with many repeated words and clauses, " * 12 + "ending here.",
    "Mid-length prompt about the weather in Paris today",
    "Q: 2+2?",
    "Write a list: " + ", ".join(str(i) for i in range(40)),
    "hello",
]


def generate_ids(adapter, prompts, cfg, eos, pad_id, stop_check=None) -> list[list[int]]:
    """New token ids of one left-padded batch (EOS excluded): the engine's prefill, then its static decode loop."""
    batch = engine.Batch.on(adapter.model, cfg.precision)
    batch.admit([(adapter, list(p)) for p in prompts], pad_id)
    return engine.run_to_completion(batch, cfg, eos, pad_id, stop_check)[0]


def _frozen(model_tok):
    model, tok = model_tok
    freeze(model)
    return FrozenAdapter(model, "base", MethodConfig()), tok


def test_batched_equals_one_at_a_time_for_very_different_lengths(tiny):
    adapter, tok = _frozen(tiny)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    assert max(map(len, prompts)) > 20 * min(map(len, prompts))
    cfg = GenerationConfig(max_new_tokens=10)
    single = [generate(adapter, tok, [p], cfg, batch_size=1)[0] for p in prompts]
    assert generate(adapter, tok, prompts, cfg, batch_size=len(prompts)) == single
    assert generate(adapter, tok, prompts, cfg, batch_size=3) == single
    assert len(set(single)) > 1  # a model that ignores its input would make this test vacuous


def test_token_budget_is_respected(tiny):
    adapter, tok = _frozen(tiny)
    prompts = [tok(t)["input_ids"] for t in TEXTS[:3]]
    out = generate_ids(adapter, prompts, GenerationConfig(max_new_tokens=5), [tok.eos_token_id], tok.pad_token_id)
    assert all(len(ids) <= 5 for ids in out)
    assert generate_ids(adapter, prompts, GenerationConfig(max_new_tokens=0), [tok.eos_token_id],
                        tok.pad_token_id) == [[], [], []]


def test_stop_string_cuts_the_text_and_ends_the_row_early(tiny):
    adapter, tok = _frozen(tiny)
    prompt = tok(TEXTS[1])["input_ids"]
    full_ids = generate_ids(adapter, [prompt], GenerationConfig(max_new_tokens=16), [tok.eos_token_id],
                            tok.pad_token_id)[0]
    full = tok.decode(full_ids, skip_special_tokens=True)
    stop = tok.decode(full_ids[3:5], skip_special_tokens=True).strip()[:3]
    assert stop and stop in full
    cut = generate(adapter, tok, [prompt], GenerationConfig(max_new_tokens=16, stop=(stop,)))[0]
    assert cut == full[: full.find(stop)]
    checker_hits = []

    def stop_check(row, ids):
        checker_hits.append(len(ids))
        return stop in tok.decode(ids, skip_special_tokens=True)

    short = generate_ids(adapter, [prompt], GenerationConfig(max_new_tokens=16), [tok.eos_token_id],
                         tok.pad_token_id, stop_check)[0]
    assert len(short) < len(full_ids) and short == full_ids[: len(short)]


def test_cut_at_stop_uses_the_earliest_stop():
    assert cut_at_stop("answer\n\nQ: next", ["Q:", "\n\n"]) == "answer"
    assert cut_at_stop("no stop here", ["###"]) == "no stop here"


def test_sampling_is_seeded_and_near_zero_temperature_is_greedy(tiny):
    adapter, tok = _frozen(tiny)
    prompts = [tok(t)["input_ids"] for t in TEXTS[:4]]
    sample = GenerationConfig(max_new_tokens=8, do_sample=True, seed=1)
    first = generate(adapter, tok, prompts, sample)
    assert generate(adapter, tok, prompts, sample) == first
    assert generate(adapter, tok, prompts, GenerationConfig(max_new_tokens=8, do_sample=True, seed=2)) != first
    greedy = generate(adapter, tok, prompts, GenerationConfig(max_new_tokens=8))
    cold = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1e-6, top_p=0.9, seed=3)
    assert generate(adapter, tok, prompts, cold) == greedy


@pytest.mark.real_model
@pytest.mark.parametrize("precision", [
    "fp32",
    pytest.param("bf16", marks=pytest.mark.xfail(
        native.library() is None or not precision.bf16_gemm_row_invariant(), strict=False,
        reason="bf16 batch invariance needs the native decode step and a bf16 GEMM that rounds a row alike at "
               "every row count; " + ("no native step" if native.library() is None else
                                      "this CPU's (oneDNN on AMX) does not: precision.bf16_gemm_row_invariant"))),
])
def test_real_model_batched_equals_one_at_a_time(real_model, precision):
    """bf16 too (until 2026-12-05 an xfail: 1 of these 8 rows flipped a near-tie batched): the prefill's
    attention runs per row (``rowattention``) and the native decode step is batch-invariant by construction."""
    adapter, tok = _frozen(real_model)
    from tunelab.data import Example

    questions = ["What is the capital of France?", "Name a colour.", "Write one sentence about the sea.",
                 "2+3=?", "Translate 'thank you' into Spanish.",
                 "Summarise in five words: the committee met on Tuesday and, after a long debate about the "
                 "budget, the roads and the new school, agreed to postpone every decision to next month.",
                 "Say hi.", "List three fruits."]
    prompts = [encode_prompt(tok, build_prompt(tok, "chat", Example(id=str(i), task="t", instruction=q)), 512)
               for i, q in enumerate(questions)]
    cfg = GenerationConfig(max_new_tokens=20, precision=precision)
    batched = generate(adapter, tok, prompts, cfg, batch_size=8)
    single = [generate(adapter, tok, [p], cfg, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert "Paris" in batched[0]
