"""Batched generation with a KV cache: the one path used by evaluation and serving.

Greedy decoding here gives the same tokens batched as one-by-one, for every method, because
positions come from the attention mask (see ``tunelab.modeling``).

Fast path (``generate_rows``, which ``generate`` uses): an adapter's virtual tokens are never recomputed
(``modeling.virtual_kv`` caches their keys/values once per adapter), rows of different adapters on the
same base model share a batch, and a token prefix common to the rows of one adapter in a batch (system
prompt, instruction, shared demonstrations) is computed once and only the suffixes are prefilled.
``generate_ids`` is the plain per-batch path, kept as the reference the fast path must reproduce.

Precision (``GenerationConfig.precision``: fp32 | bf16 | auto, ``tunelab.precision``): the prefill runs with the
weights in the prefill phase's dtype, the decode loop in the decode phase's (the cache is cast between them when
they differ). The decode loop (``_decode_fast``) writes into a cache allocated once (``tunelab.kvcache``);
``fast_decode(False)`` selects the 2026-11 loop (``_decode``), which gives the same tokens. Each decode step (here and
in ``decode_step``, the serve scheduler's) runs ``tunelab.fastdecode.step`` where it covers the model (Llama family,
peft LoRA layers and serve's LoRA rows included), else the transformers forward; ``fastdecode.mode("hf")`` forces the latter.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunelab import fastdecode, kvcache, precision
from tunelab.modeling import (
    PrefixKV,
    _decoder_and_head,
    batch_cache,
    cache_kwargs,
    cache_tensors,
    extend_kv,
    hidden_states,
    mask_for,
    merge_rows,
    output_cache,
    pad_batch,
    positions_from_mask,
    row_slots,
    select_rows,
    virtual_kv,
)
from tunelab.rowattention import exact_rows


@dataclass
class GenerationConfig:
    """Decoding settings. Sampling draws from one generator per batch seeded with ``seed``, so sampled
    (unlike greedy) outputs depend on which rows share a batch; fix ``batch_size`` to reproduce them."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # stop strings, cut from the output
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | auto, per phase (tunelab.precision); eval and serve default to auto


def _next_tokens(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    if not cfg.do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / max(cfg.temperature, 1e-5), dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < cfg.top_p
        keep[..., 0] = True  # the most probable token always stays (a top_p below float32's least is 0 here)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    if generator is not None and generator.device != probs.device:
        # a seeded CPU generator (eval, serve) with a model on CUDA: draw where the generator is, so a seed
        # gives the same draws on either device (and multinomial refuses a generator of another device)
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


_FAST_DECODE = contextvars.ContextVar("tunelab_fast_decode", default=True)


@contextlib.contextmanager
def fast_decode(enabled: bool) -> Iterator[None]:
    """Turn the lighter decode loop (pre-allocated cache, tokens kept on the tensor side) on/off (on by default);
    off gives the loop of 2026-11 ("before" in benchmarks/bench_generate.py); both give the same tokens."""
    token = _FAST_DECODE.set(enabled)
    try:
        yield
    finally:
        _FAST_DECODE.reset(token)


@torch.no_grad()
def generate_ids(adapter, prompts: Sequence[list[int]], cfg: GenerationConfig, eos_ids: Sequence[int],
                 pad_id: int, stop_check: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
    """Decode one left-padded batch; returns the new token ids of each row (EOS excluded)."""
    model = adapter.model
    device = model.get_input_embeddings().weight.device
    phases = precision.resolve(cfg.precision, device)
    ids = pad_batch(list(prompts), pad_id, side="left").to(device)  # (B, T)
    mask = mask_for(list(prompts), side="left").to(device)
    with precision.weights_in(model, phases.prefill_dtype):
        hidden, cache, inputs, are_logits = hidden_states(adapter, ids, mask, use_cache=True)
        logits = hidden[:, -1] if are_logits else model.get_output_embeddings()(hidden[:, -1])  # (B, V)
    return _decode_in(phases, model, logits, cache, inputs.attention_mask, inputs.position_ids[:, -1] + 1, cfg,
                      eos_ids, pad_id, stop_check)


def _decode_in(phases: precision.PhasePrecision, model, logits: torch.Tensor, cache, attn: torch.Tensor,
               next_pos: torch.Tensor, cfg: GenerationConfig, eos_ids: Sequence[int], pad_id: int,
               stop_check: Callable[[int, list[int]], bool] | None) -> list[list[int]]:
    """Decode with the weights (and the prefilled cache) in the decode phase's precision."""
    if phases.decode != phases.prefill:
        precision.cast_cache(cache, phases.decode_dtype)
    with precision.weights_in(model, phases.decode_dtype):
        if _FAST_DECODE.get():
            return _decode_fast(model, logits, cache, attn, next_pos, cfg, eos_ids, pad_id, stop_check)
        return _decode(model, logits, cache, attn, next_pos, cfg, eos_ids, pad_id, stop_check)


def _decode_fast(model, logits: torch.Tensor, cache, attn: torch.Tensor, next_pos: torch.Tensor,
                 cfg: GenerationConfig, eos_ids: Sequence[int], pad_id: int,
                 stop_check: Callable[[int, list[int]], bool] | None) -> list[list[int]]:
    """``_decode`` with less work per step, same tokens: the cache and the attention mask are allocated once
    for all ``max_new_tokens`` (``kvcache.preallocate``: no per-layer ``torch.cat`` of the whole cache each
    step), and the new tokens stay in one (B, steps) tensor, turned into lists once at the end; the only
    per-row Python work left in a step is the stop-string check, when there are stop strings."""
    batch, width, steps = logits.shape[0], attn.shape[1], cfg.max_new_tokens
    device = logits.device
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.do_sample else None
    eos = torch.tensor(list(eos_ids), device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens = torch.full((batch, steps), pad_id, dtype=torch.long, device=device)
    keep = torch.zeros(batch, steps, dtype=torch.bool, device=device)  # token t of row b is output
    mask = torch.cat([attn, attn.new_zeros(batch, steps)], dim=1)  # (B, T + steps), filled column by column
    cache = kvcache.preallocate(cache, steps)
    lean = fastdecode.stepper(model, cache)  # None: the transformers forward (other architectures, DoRA, ...)
    out: list[list[int]] = [[] for _ in range(batch)]
    taken = 0
    for step in range(steps):
        token = torch.where(done, pad_id, _next_tokens(logits, cfg, generator))  # (B,)
        finished_now = torch.isin(token, eos) & ~done
        tokens[:, step], keep[:, step] = token, ~done & ~finished_now
        taken = step + 1
        if stop_check is not None:
            for row in keep[:, step].nonzero().flatten().tolist():
                out[row].append(int(token[row]))
                if stop_check(row, out[row]):
                    finished_now[row] = True
        done |= finished_now
        if bool(done.all()) or step == steps - 1:  # no step after the last token: its logits would go unused
            break
        mask[:, width + step] = (~done).long()
        if lean is not None:
            logits = lean(token, mask[:, :width + step + 1], next_pos, cache)
        else:
            step_out = model(input_ids=token.unsqueeze(-1), attention_mask=mask[:, :width + step + 1],
                             position_ids=next_pos.unsqueeze(-1), **cache_kwargs(model, cache), use_cache=True)
            cache, logits = output_cache(step_out), step_out.logits[:, -1]
        next_pos = next_pos + 1
    if stop_check is not None:
        return out
    rows, kept = tokens[:, :taken].tolist(), keep[:, :taken].tolist()
    return [[t for t, k in zip(r, m, strict=True) if k] for r, m in zip(rows, kept, strict=True)]


def _decode(model, logits: torch.Tensor, cache, attn: torch.Tensor, next_pos: torch.Tensor, cfg: GenerationConfig,
            eos_ids: Sequence[int], pad_id: int, stop_check: Callable[[int, list[int]], bool] | None) -> list[list[int]]:
    """The decoding loop after prefill: ``logits`` (B, V) of the last prompt token, ``attn`` the mask so far,
    ``next_pos`` (B,) the position of each row's next token. The reference for ``_decode_fast``."""
    batch = logits.shape[0]
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.do_sample else None
    eos = torch.tensor(list(eos_ids), device=logits.device)
    done = torch.zeros(batch, dtype=torch.bool, device=logits.device)
    out: list[list[int]] = [[] for _ in range(batch)]
    for _ in range(cfg.max_new_tokens):
        token = _next_tokens(logits, cfg, generator)  # (B,)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        finished_now = torch.isin(token, eos) & ~done
        for row in (~done & ~finished_now).nonzero().flatten().tolist():
            out[row].append(int(token[row]))
            if stop_check is not None and stop_check(row, out[row]):
                finished_now[row] = True
        done |= finished_now
        if bool(done.all()):
            break
        attn = torch.cat([attn, (~done).long().unsqueeze(-1)], dim=-1)
        step = model(input_ids=token.unsqueeze(-1), attention_mask=attn, position_ids=next_pos.unsqueeze(-1),
                     **cache_kwargs(model, cache), use_cache=True)
        cache, logits = output_cache(step), step.logits[:, -1]
        next_pos = next_pos + 1
    return out


def _batch_key(adapter) -> int:
    """Rows may share a batch when they run on the same weights: adapters whose method leaves the base
    weights alone (``Capabilities.changes_weights`` false: prompt/prefix tuning, P-tuning, IPT, ICL,
    discrete prompts) share their base model object; adapters that change weights batch alone."""
    return id(adapter) if adapter.capabilities.changes_weights else id(adapter.model)


def _common_prefix(seqs: Sequence[list[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


@torch.no_grad()
def generate_rows(rows: Sequence[tuple[object, list[int]]], tokenizer, cfg: GenerationConfig, batch_size: int = 16,
                  progress: Callable[[int], None] | None = None, shared_prefix_min: int = 0) -> list[str]:
    """Generate text for (adapter, prompt_ids) rows that may mix adapters; returns one string per row, in order.

    - All adapters must sit on the same base model object when they are to share a batch. Rows are grouped
      by ``_batch_key``: adapters that add only virtual tokens or text share batches with each other and the
      base model; weight-changing adapters (LoRA, full fine-tuning) get batches of their own rows.
    - Each row's virtual tokens come from ``modeling.virtual_kv(adapter)`` (computed once per adapter, kept
      across calls); a batch cache left-pads the rows' prefixes of different lengths and masks the pads.
    - Opt-in (``shared_prefix_min`` > 0): within a batch, the rows of one adapter whose prompts start with
      the same >= ``shared_prefix_min`` tokens get that prefix's keys/values computed once
      (``modeling.extend_kv``; reused across the batches of this call) and prefill only their suffixes.
      Equal to the plain path up to float rounding (tested on the tiny model); off by default because a
      greedy near-tie can then flip and batched output must equal one-by-one output exactly.
    - Greedy output equals generating each row alone with the plain path (``generate_ids``); sampled
      output depends on which rows share a batch (one generator per batch seeded with ``cfg.seed``).
    """
    texts: list[str] = [""] * len(rows)
    groups: dict[int, list[int]] = {}
    for i, (adapter, _) in enumerate(rows):
        groups.setdefault(_batch_key(adapter), []).append(i)
    shared: dict[tuple[int, tuple[int, ...]], PrefixKV] = {}
    for members in groups.values():
        order = sorted(members, key=lambda i: len(rows[i][1]))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            stop_check = _stop_checker(tokenizer, cfg.stop) if cfg.stop else None
            new_ids = _generate_batch([rows[i] for i in batch], tokenizer, cfg, stop_check, shared, shared_prefix_min)
            for row, ids in zip(batch, new_ids, strict=True):
                texts[row] = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), cfg.stop)
            if progress:
                progress(len(batch))
    return texts


def _generate_batch(batch: Sequence[tuple[Any, list[int]]], tokenizer, cfg: GenerationConfig, stop_check,
                    shared: dict, shared_prefix_min: int) -> list[list[int]]:
    model = batch[0][0].model
    eos_ids, pad_id = _eos_ids(model, tokenizer), tokenizer.pad_token_id
    body, head = _decoder_and_head(model)
    adapters = {id(a): a for a, _ in batch}
    if body is None:  # unusual architecture (no virtual_kv either): the plain path, one adapter at a time
        out: list[list[int]] = [[] for _ in batch]
        for key, adapter in adapters.items():
            idx = [i for i, (a, _) in enumerate(batch) if id(a) == key]
            for i, ids in zip(idx, generate_ids(adapter, [batch[i][1] for i in idx], cfg, eos_ids, pad_id), strict=True):
                out[i] = ids
        return out
    phases = precision.resolve(cfg.precision, model.get_input_embeddings().weight.device)
    # the two phases in sequence, never nested: each swaps the weights to its own dtype and back
    with precision.weights_in(model, phases.prefill_dtype):
        logits, cache, mask, next_pos = _prefill(batch, adapters, body, head, pad_id, shared, shared_prefix_min,
                                                 phases.prefill)
    return _decode_in(phases, model, logits, cache, mask, next_pos, cfg, eos_ids, pad_id, stop_check)


def _prefill(batch: Sequence[tuple[Any, list[int]]], adapters: dict, body, head, pad_id: int, shared: dict,
             shared_prefix_min: int, phase: str) -> tuple[torch.Tensor, object, torch.Tensor, torch.Tensor]:
    """Each row's virtual tokens (and opt-in shared prefix) from the caches, then one forward over the
    suffixes; returns (last logits (B, V), cache, attention mask, next positions (B,))."""
    model = batch[0][0].model
    prefixes: list[PrefixKV | None] = [None] * len(batch)
    suffixes: list[list[int]] = [list(p) for _, p in batch]
    for key, adapter in adapters.items():
        idx = [i for i, (a, _) in enumerate(batch) if id(a) == key]
        # the shared prefix leaves every row at least one token to prefill (its last logits start decoding)
        n = _common_prefix([batch[i][1] for i in idx]) if len(idx) > 1 else 0
        n = min(n, min(len(batch[i][1]) for i in idx) - 1)
        kv = virtual_kv(adapter)
        if shared_prefix_min > 0 and n >= shared_prefix_min:
            head_ids = (key, tuple(batch[idx[0]][1][:n]), phase)
            if head_ids not in shared:
                shared[head_ids] = extend_kv(adapter, head_ids[1], kv)
            kv = shared[head_ids]
            for i in idx:
                suffixes[i] = suffixes[i][n:]
        for i in idx:
            prefixes[i] = kv
    cache, pmask = batch_cache(model, prefixes)
    mask = torch.cat([pmask, mask_for(suffixes, side="left")], dim=1)
    ids = pad_batch(suffixes, pad_id, side="left")
    positions = positions_from_mask(mask)[:, pmask.shape[1]:]
    with exact_rows():  # each row's attention as alone: batched == one-by-one, also in bf16
        out = body(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwargs(body, cache),
                   use_cache=True)
    return head(out.last_hidden_state[:, -1]), output_cache(out), mask, positions[:, -1] + 1


def generate(adapter, tokenizer, prompts: Sequence[list[int]], cfg: GenerationConfig, batch_size: int = 16,
             progress: Callable[[int], None] | None = None) -> list[str]:
    """Generate text for prompt id lists, batching rows of similar length together (``generate_rows``)."""
    return generate_rows([(adapter, list(p)) for p in prompts], tokenizer, cfg, batch_size, progress)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Text up to the first stop string."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


def _stop_checker(tokenizer, stop: Sequence[str]) -> Callable[[int, list[int]], bool]:
    longest = max(len(s) for s in stop)

    def check(_row: int, ids: list[int]) -> bool:
        tail = tokenizer.decode(ids[-(longest + 8):], skip_special_tokens=True)
        return any(s in tail for s in stop)

    return check


def _eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


# --- step-wise generation for the serving scheduler (tunelab.serve.scheduler) ---------------------------
# The same forwards as ``_generate_batch`` (prefill) and ``_decode`` (one step), split so that a scheduler
# can add rows to and remove rows from a running batch between decode steps.


@dataclass
class Prefilled:
    """Rows after prefill: their cache, attention mask (B, L), next positions (B,) and last logits (B, V);
    ``slots`` (B,) the LoRA slot of each row (``serve.lora_rows``), None when no row has one (no LoRA work)."""

    cache: object
    mask: torch.Tensor
    next_pos: torch.Tensor
    logits: torch.Tensor
    slots: torch.Tensor | None = None


def _slot_tensor(slots: Sequence[int] | torch.Tensor | None, device) -> torch.Tensor | None:
    """(B,) long slots on ``device``, or None when no row has a slot (so LoRA hooks do nothing)."""
    if slots is None:
        return None
    t = torch.as_tensor(slots, dtype=torch.long).to(device)
    return t if bool(t.any()) else None


@torch.no_grad()
def prefill_rows(rows: Sequence[tuple[Any, list[int]]], pad_id: int, slots: Sequence[int] | None = None) -> Prefilled:
    """Prefill (adapter, prompt_ids) rows that share one base model object (``_batch_key``), each row after
    its own adapter's virtual-token / prefix key/values (``virtual_kv``), left-padded as in ``_generate_batch``;
    ``slots``: each row's LoRA slot (``serve.lora_rows``; 0 = none), applied in this forward and every
    ``decode_step`` after it."""
    model = rows[0][0].model
    body, head = _decoder_and_head(model)
    device = model.get_input_embeddings().weight.device
    row_slot = _slot_tensor(slots, device)
    if body is None or any(a.soft_prompt(1) is not None and virtual_kv(a) is None for a, _ in rows):
        if len({id(a) for a, _ in rows}) > 1:
            raise ValueError("prefill_rows: on this architecture rows of different adapters cannot share a batch")
        adapter = rows[0][0]
        prompts = [list(p) for _, p in rows]
        ids = pad_batch(prompts, pad_id, side="left").to(device)
        with row_slots(row_slot):
            hidden, cache, inputs, are_logits = hidden_states(adapter, ids, mask_for(prompts, side="left").to(device),
                                                              use_cache=True)
        logits = hidden[:, -1] if are_logits else model.get_output_embeddings()(hidden[:, -1])
        return Prefilled(cache, inputs.attention_mask, inputs.position_ids[:, -1] + 1, logits, row_slot)
    prompts = [list(p) for _, p in rows]
    cache, pmask = batch_cache(model, [virtual_kv(a) for a, _ in rows])  # outside row_slots: one row each
    mask = torch.cat([pmask, mask_for(prompts, side="left").to(pmask.device)], dim=1)
    ids = pad_batch(prompts, pad_id, side="left").to(mask.device)
    positions = positions_from_mask(mask)[:, pmask.shape[1]:]
    with row_slots(row_slot), exact_rows():
        out = body(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwargs(body, cache),
                   use_cache=True)
    return Prefilled(output_cache(out), mask, positions[:, -1] + 1, head(out.last_hidden_state[:, -1]), row_slot)


@torch.no_grad()
def decode_step(model, tokens: torch.Tensor, state: Prefilled) -> Prefilled:
    """Feed one token per row (B,) to the running rows: the forward of one ``_decode_fast`` iteration (the lean
    step where it covers the model). The cache is turned into a pre-allocated one that grows by doubling."""
    mask = torch.cat([state.mask, state.mask.new_ones(state.mask.shape[0], 1)], dim=-1)
    cache = kvcache.preallocate(state.cache, 1)
    with row_slots(state.slots):  # LoRA rows: the module hooks, or the lean step's deltas (modeling.row_deltas)
        lean = fastdecode.stepper(model, cache)
        if lean is not None:
            return Prefilled(cache, mask, state.next_pos + 1, lean(tokens, mask, state.next_pos, cache), state.slots)
        step = model(input_ids=tokens.unsqueeze(-1), attention_mask=mask, position_ids=state.next_pos.unsqueeze(-1),
                     **cache_kwargs(model, cache), use_cache=True)
    return Prefilled(output_cache(step), mask, state.next_pos + 1, step.logits[:, -1], state.slots)


def merge_prefilled(model, parts: Sequence[Prefilled]) -> Prefilled:
    """Running rows and newly prefilled ones as one batch (``modeling.merge_rows``), slots carried along."""
    cache, mask = merge_rows(model, [(cache_tensors(p.cache), p.mask) for p in parts])
    slots = None
    if any(p.slots is not None for p in parts):
        slots = torch.cat([p.slots if p.slots is not None else p.next_pos.new_zeros(p.next_pos.shape[0])
                           for p in parts])
    return Prefilled(cache, mask, torch.cat([p.next_pos for p in parts]), torch.cat([p.logits for p in parts]), slots)


def select_prefilled(model, state: Prefilled, keep: torch.Tensor) -> Prefilled:
    """Only rows ``keep`` (indices) of ``state`` (``modeling.select_rows``), slots carried along."""
    cache, mask = select_rows(model, state.cache, state.mask, keep)
    slots = None if state.slots is None else _slot_tensor(state.slots.index_select(0, keep), keep.device)
    return Prefilled(cache, mask, state.next_pos.index_select(0, keep), state.logits.index_select(0, keep), slots)


def next_token(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> int:
    """One row's next token from its logits (V,): greedy, or sampled with ``generator``."""
    return int(_next_tokens(logits.unsqueeze(0), cfg, generator)[0])


def eos_ids(model, tokenizer) -> list[int]:
    """Token ids that end a completion (the tokenizer's and the model's generation config's)."""
    return _eos_ids(model, tokenizer)


def stop_checker(tokenizer, stop: Sequence[str]) -> Callable[[int, list[int]], bool]:
    """Whether a row's ids so far contain a stop string (the check ``generate_rows`` uses)."""
    return _stop_checker(tokenizer, stop)
