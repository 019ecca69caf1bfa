"""Evaluate an adapter on examples: prompts -> batched generation (and/or option ranking) -> metrics.

Generation-scored metrics (exact match, BLEU, ROUGE-L, ...) read the greedy (or sampled) output;
``rank_accuracy`` reads the option with the highest log-likelihood under the same forward path as
training (``tunelab.modeling.sequence_logprobs``), so it works for every method's adapter.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tunelab import metrics as M
from tunelab.data.example import Example
from tunelab.errors import DataError
from tunelab.formatting import (
    PromptLayout,
    as_layout,
    build_prompt,
    encode,
    encode_example,
    encode_prompt,
    target_text,
)
from tunelab.generate import GenerationConfig
from tunelab.inference.engine import Engine
from tunelab.inference.sampling import cut_at_stop
from tunelab.modeling import score_sequences
from tunelab.sections import EvalConfig
from tunelab.termination import ran_to_limit, record


@dataclass
class EvalResult:
    metrics: dict[str, float]
    predictions: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    generated_tokens: int = 0
    ci: dict[str, list[float] | None] = field(default_factory=dict)  # 95% bootstrap interval per metric
    decode_step: str = ""  # the decode step(s) generation ran (inference.steps.BACKENDS, "+"-joined); "" if none
    termination: dict | None = None  # answers cut at the token limit (``termination.record``); None: no generation


def derive_max_new_tokens(tokenizer, examples: Sequence[Example], cap: int = 256) -> int:
    """Enough tokens for the longest reference plus headroom, so generation stops early but never cuts answers."""
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for e in examples for r in e.targets),
                  default=16)
    return min(cap, int(longest * 1.5) + 8)


def prompts_for(tokenizer, layout: PromptLayout, examples: Sequence[Example]) -> list[list[int]]:
    """Token ids of each example's prompt under ``layout`` (with its demonstrations), cut to its budget."""
    return [encode_prompt(tokenizer, build_prompt(tokenizer, layout, e), layout.max_length) for e in examples]


@torch.no_grad()
def rank_options(adapter, tokenizer, layout: PromptLayout, examples: Sequence[Example],
                 batch_size: int = 16, precision: str = "fp32") -> list[list[float]]:
    """Log-likelihood of each option of each example (summed over the option's tokens and EOS).

    The option is scored exactly as a training target is supervised (``formatting.encode``: target
    text + EOS), so an option that is a prefix of another ("yes" vs "yes, ...") is not favoured.
    """
    missing = [e.id for e in examples if not e.options]
    if missing:
        raise DataError(f"rank_accuracy needs `options` on every example; {len(missing)} have none "
                        f"(first: id {missing[0]}); drop rank_accuracy from eval.metrics or add options")
    layout = layout.resolved(tokenizer)
    pairs = []  # (example index, Encoded)
    for i, e in enumerate(examples):
        prompt = build_prompt(tokenizer, layout, e)
        pairs += [(i, encode(tokenizer, prompt, target_text(layout, dataclasses.replace(e, output=o)),
                             layout.max_length)) for o in e.options]
    scores: list[list[float]] = [[] for _ in examples]
    values = score_sequences(adapter, [enc for _, enc in pairs], tokenizer.pad_token_id, batch_size,
                             precision=precision)
    for (i, _), value in zip(pairs, values, strict=True):
        scores[i].append(value)
    return scores


def reference_nll(adapter, tokenizer, layout: PromptLayout, examples: Sequence[Example],
                  batch_size: int = 16, precision: str = "fp32") -> list[tuple[float, int]]:
    """Per example: summed negative log-likelihood of its reference (teacher-forced) and its token count.

    The reference is encoded exactly as a training target (``encode_example``), so the mean over
    tokens is the training loss measured without an update: on training rows and on held-out rows
    it gives the generalisation gap.
    """
    adapter.eval()
    encoded = [encode_example(tokenizer, layout, e) for e in examples]
    values = score_sequences(adapter, encoded, tokenizer.pad_token_id, batch_size, precision=precision)
    return [(-v, sum(label != -100 for label in enc.labels[1:])) for v, enc in zip(values, encoded, strict=True)]


def make_engine(name: str, tokenizer, gen_cfg: GenerationConfig, batch_size: int):
    """The engine ``eval.engine`` names: tunelab's (``inference.engine.Engine``) or vLLM (``inference.vllm_engine``)."""
    if name == "vllm":
        from tunelab.inference.vllm_engine import VllmEngine

        return VllmEngine(tokenizer, gen_cfg, batch_size)
    return Engine(tokenizer, gen_cfg, batch_size)


def evaluate(adapter, tokenizer, layout: PromptLayout | str, examples: Sequence[Example],
             metric_names: Sequence[str], cfg: EvalConfig, max_new_tokens: int | None = None,
             progress: Callable[[int], None] | None = None, n_resamples: int = 1000) -> EvalResult:
    """Generate for every example under ``layout`` (and rank options if asked) and score against its references."""
    layout = as_layout(layout).resolved(tokenizer)
    M.check_names(metric_names)
    adapter.eval()  # no dropout (LoRA's) while scoring or generating
    start = time.perf_counter()
    refs = [e.targets for e in examples]
    preds: list[str] = [""] * len(examples)
    decode_step = ""
    termination = None
    if any(n not in M.RANKED for n in metric_names):
        prompts = prompts_for(tokenizer, layout, examples)
        gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens or cfg.max_new_tokens
                                   or derive_max_new_tokens(tokenizer, examples),
                                   do_sample=cfg.do_sample, temperature=cfg.temperature, top_p=cfg.top_p,
                                   precision=cfg.precision, stop=tuple(cfg.stop))
        engine = make_engine(cfg.engine, tokenizer, gen_cfg, cfg.batch_size)
        generated = engine.run_ids([(adapter, list(p)) for p in prompts], progress)
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
        preds = [cut_at_stop(t, gen_cfg.stop).strip() for t in texts]
        termination = record([ran_to_limit(len(ids), t, gen_cfg.max_new_tokens, gen_cfg.stop)
                              for ids, t in zip(generated, texts, strict=True)], gen_cfg.max_new_tokens)
        decode_step = "+".join(sorted(engine.steps_used))
    option_scores = ranked = None
    if any(n in M.RANKED for n in metric_names):
        option_scores = rank_options(adapter, tokenizer, layout, examples, cfg.batch_size, cfg.precision)
        ranked = [e.options[max(range(len(s)), key=s.__getitem__)] for e, s in zip(examples, option_scores,
                                                                                    strict=True)]
        if progress and all(n in M.RANKED for n in metric_names):
            progress(len(examples))
    scores, per_example = M.score(metric_names, preds, refs, ranked)
    ci = M.confidence_intervals(metric_names, preds, refs, ranked, n_resamples=n_resamples)
    rows = [{n: vals[i] for n, vals in per_example.items()} for i in range(len(examples))]
    predictions = []
    for i, (e, p, s) in enumerate(zip(examples, preds, rows, strict=True)):
        row = {"id": e.id, "task": e.task, "prediction": p, "references": e.targets, "scores": s}
        if ranked is not None and option_scores is not None:
            row.update(ranked_prediction=ranked[i], option_logprobs=option_scores[i])
        predictions.append(row)
    n_tokens = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in preds)
    return EvalResult(scores, predictions, time.perf_counter() - start, n_tokens,
                      {n: (list(v) if v is not None else None) for n, v in ci.items()}, decode_step, termination)
