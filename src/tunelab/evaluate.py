"""Evaluate an adapter on examples: prompts -> batched generation -> metrics + per-example rows."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tunelab import metrics as M
from tunelab.config import EvalConfig
from tunelab.data.example import Example
from tunelab.formatting import build_prompt, encode_prompt
from tunelab.generate import GenerationConfig, generate
from tunelab.methods.base import DemoSelector


@dataclass
class EvalResult:
    metrics: dict[str, float]
    predictions: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    generated_tokens: int = 0


def derive_max_new_tokens(tokenizer, examples: Sequence[Example], cap: int = 256) -> int:
    """Enough tokens for the longest reference plus headroom, so generation stops early but never cuts answers."""
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for e in examples for r in e.targets),
                  default=16)
    return min(cap, int(longest * 1.5) + 8)


def prompts_for(examples: Sequence[Example], tokenizer, template: str, demos: DemoSelector | None,
                system_prompt: str | None, max_length: int) -> list[list[int]]:
    """Token ids of each example's prompt, with demonstrations when the method uses them."""
    return [encode_prompt(tokenizer, build_prompt(e, tokenizer, template, demos(e) if demos else (), system_prompt),
                          max_length) for e in examples]


def evaluate(adapter, tokenizer, examples: Sequence[Example], metric_names: Sequence[str], cfg: EvalConfig,
             template: str, demos: DemoSelector | None = None, system_prompt: str | None = None,
             max_length: int = 1024, max_new_tokens: int | None = None,
             progress: Callable[[int], None] | None = None) -> EvalResult:
    """Generate for every example and score against its references."""
    start = time.perf_counter()
    prompts = prompts_for(examples, tokenizer, template, demos, system_prompt, max_length)
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens or cfg.max_new_tokens
                               or derive_max_new_tokens(tokenizer, examples),
                               do_sample=cfg.do_sample, temperature=cfg.temperature, top_p=cfg.top_p)
    preds = [p.strip() for p in generate(adapter, tokenizer, prompts, gen_cfg, cfg.batch_size, progress)]
    refs = [e.targets for e in examples]
    scores, per_example = M.score(metric_names, preds, refs)
    rows = [{n: vals[i] for n, vals in per_example.items()} for i in range(len(preds))]
    predictions = [{"id": e.id, "task": e.task, "prediction": p, "references": e.targets, "scores": s}
                   for e, p, s in zip(examples, preds, rows, strict=True)]
    n_tokens = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in preds)
    return EvalResult(scores, predictions, time.perf_counter() - start, n_tokens)
