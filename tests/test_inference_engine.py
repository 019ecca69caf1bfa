"""The one inference engine (tunelab.inference): the decode step that ran is recorded (eval result, serve's
/metrics), serve applies precision per phase like eval, and rows join and leave a running batch with the
same tokens as a static batch run to completion."""

from __future__ import annotations

import torch

from tunelab import native, precision
from tunelab.formatting import PromptLayout
from tunelab.generate import GenerationConfig, generate_rows
from tunelab.inference import engine, steps
from tunelab.methods.base import MethodConfig, freeze
from tunelab.methods.icl import FrozenAdapter
from tunelab.serve.registry import Served
from tunelab.serve.scheduler import Request, Scheduler

FAST = "native" if native.library() is not None else "torch"


def _base(model_tok):
    model, tok = model_tok
    freeze(model)
    return FrozenAdapter(model, "base", MethodConfig()).eval(), tok


def test_the_engine_records_the_step_that_ran(fresh_tiny):
    adapter, tok = _base(fresh_tiny)
    rows = [(adapter, tok(t)["input_ids"]) for t in ("a b c", "hello there, how are you")]
    run = engine.Engine(tok, GenerationConfig(max_new_tokens=4), batch_size=2)
    run.run(rows)
    assert run.steps_used == {FAST}
    with steps.prefer("transformers"):
        forced = engine.Engine(tok, GenerationConfig(max_new_tokens=4), batch_size=2)
        forced.run(rows)
    assert forced.steps_used == {"transformers"}


def test_the_eval_result_names_the_decode_step(fresh_tiny):
    from tunelab.config import EvalConfig
    from tunelab.data import load_task
    from tunelab.evaluate import evaluate

    adapter, tok = _base(fresh_tiny)
    examples = load_task("date_format").eval[:2]
    result = evaluate(adapter, tok, "plain", examples, ["exact_match"], EvalConfig(max_new_tokens=3), n_resamples=10)
    assert result.decode_step == FAST


def test_serve_decodes_in_the_decode_phase_precision_and_counts_its_steps(fresh_tiny, monkeypatch):
    """A scheduler with precision bf16 prefills and decodes with the weights' bf16 copy (it ran on the weights as
    they were, fp32, before the engine applied precision per phase), and /metrics counts steps by backend."""
    adapter, tok = _base(fresh_tiny)
    model = adapter.model
    seen: list = []
    real = engine.decode_step

    def spy(model_, tokens, state, *a, **k):
        seen.append(model_.get_input_embeddings().weight.dtype)
        return real(model_, tokens, state, *a, **k)

    monkeypatch.setattr(engine, "decode_step", spy)
    served = Served("tiny", adapter, "base", PromptLayout().resolved(tok))
    cfg = GenerationConfig(max_new_tokens=5, precision="bf16")
    scheduler = Scheduler(tok, precision="bf16")
    try:
        got = scheduler.submit(Request(served, [5, 6, 7], cfg)).result(60)
    finally:
        scheduler.close()
    assert seen and set(seen) == {torch.bfloat16}
    assert model.get_input_embeddings().weight.dtype == torch.float32  # restored between steps
    assert got.text == generate_rows([(adapter, [5, 6, 7])], tok, cfg)[0]  # eval's bf16 path, same tokens
    assert scheduler.stats.step == FAST
    assert f'tunelab_decode_steps_total{{step="{FAST}"}}' in scheduler.metrics.render()


def test_rows_leaving_and_joining_keep_their_tokens(fresh_tiny):
    """join / leave between decode steps (serve) give each row the logits of a static batch (eval)."""
    adapter, tok = _base(fresh_tiny)
    model = adapter.model
    rows = [(adapter, tok(t)["input_ids"]) for t in ("x", "a longer prompt with more words", "mid prompt")]
    static = engine.prefill(rows, 2)
    live = engine.join(model, [engine.prefill(rows[:1], 2), engine.prefill(rows[1:], 2)])
    for _ in range(3):
        tokens = static.logits.argmax(-1)
        static = engine.decode_step(model, tokens, static)
        live = engine.decode_step(model, tokens, live)
    torch.testing.assert_close(live.logits, static.logits, atol=1e-5, rtol=1e-5)
    keep = torch.tensor([0, 2])
    left = engine.leave(model, live, keep)
    tokens = left.logits.argmax(-1)
    after = engine.decode_step(model, tokens, left)
    full = engine.decode_step(model, torch.stack([tokens[0], static.logits[1].argmax(), tokens[1]]), static)
    torch.testing.assert_close(after.logits, full.logits[keep], atol=1e-5, rtol=1e-5)
    assert after.step == static.step == FAST


def test_each_phase_runs_in_its_dtype_and_the_cache_is_cast_between(fresh_tiny):
    adapter, tok = _base(fresh_tiny)
    phases = precision.PhasePrecision("fp32", "bf16")
    with engine.prefill_phase(adapter.model, phases):
        state = engine.prefill([(adapter, [5, 6, 7])], 2)
    assert state.cache.layers[0].keys.dtype == torch.float32
    engine.to_decode(state, phases)
    assert state.cache.layers[0].keys.dtype == torch.bfloat16
    with engine.decode_phase(adapter.model, phases):
        assert adapter.model.get_input_embeddings().weight.dtype == torch.bfloat16
        engine.decode_step(adapter.model, state.logits.argmax(-1), state)
    assert adapter.model.get_input_embeddings().weight.dtype == torch.float32
