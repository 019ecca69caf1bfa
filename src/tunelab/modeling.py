"""The one forward path every method, the trainer, the evaluator and the server go through.

A method contributes at most two things besides (possibly patched) weights: a soft prompt of
``n`` learned input embeddings placed before the text, and/or a key/value prefix for every layer.
Here both are placed the same way in training and inference, and position ids are computed from
the attention mask, so a real token has the same position whatever padding surrounds it (peft's
prompt tuning drops position ids under left padding, which changes outputs).

Layouts (V = virtual tokens, P = padding):
  training, right padded:   [V | x y P]      positions 0..n-1 | n.. (P masked)
  generation, left padded:  [V | P x]        positions 0..n-1 | P masked | n..
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from tunelab import precision as inference_precision
from tunelab.formatting import IGNORE_INDEX
from tunelab.precision import cast_cache

if TYPE_CHECKING:
    from tunelab.methods.base import Adapter


@dataclass
class ModelInputs:
    """What is fed to the transformers model for one batch (shapes in comments)."""

    inputs_embeds: torch.Tensor  # (B, n_soft + T, C)
    attention_mask: torch.Tensor  # (B, n_prefix + n_soft + T)
    position_ids: torch.Tensor  # (B, n_soft + T)
    past_key_values: object | None  # cache holding the n_prefix prefix entries, or None
    n_soft: int  # virtual tokens prepended to inputs_embeds


@functools.cache
def _cache_argument(model_class: Any) -> str:
    # transformers 5.24 renamed past_key_values to cache (the old name warns, and goes in 5.40)
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """The key/value cache as the keyword this transformers version's ``model.forward`` takes."""
    return {_cache_argument(type(model)): cache}  # type: ignore[arg-type]


def output_cache(out):
    """The key/value cache of a model output, under either transformers name."""
    if "cache" in getattr(type(out), "__dataclass_fields__", {}):
        return out.cache
    return getattr(out, "past_key_values", None)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """0-based positions counting only attended tokens; pads get 0 (they are masked anyway)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class PrefixKV:
    """Keys/values of tokens that sit before a row's text, one (1, heads, n, head_dim) pair per layer.

    Produced by ``virtual_kv`` (an adapter's virtual tokens) and ``extend_kv`` (a shared text prefix);
    ``batch_cache`` assembles rows with prefixes of different lengths into one transformers cache.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[-2]) if self.keys else 0


_VIRTUAL_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # adapter -> (soft prompt, PrefixKV)


def _kv_of(cache) -> PrefixKV:
    layers = cache.layers
    return PrefixKV([layer.keys for layer in layers], [layer.values for layer in layers])


@torch.no_grad()
def virtual_kv(adapter: Adapter) -> PrefixKV | None:
    """The key/value cache of ``adapter``'s virtual tokens, computed once and reused; None if it has none.

    Soft prompt (prompt tuning, P-tuning, IPT): its n embeddings are run once through the frozen model at
    positions 0..n-1, exactly where the one forward path puts them, so a later forward over the text with
    this cache as ``past_key_values`` gives the same outputs as prepending the soft prompt (up to float
    rounding). Prefix tuning: the prefix keys/values themselves. The result is cached per adapter and
    recomputed when the soft prompt changes (e.g. after more training), so it is shared across batches
    and requests. Shapes: one (1, heads, n, head_dim) tensor per layer; batch-expand with ``batch_cache``.
    """
    prefix = adapter.prefix_cache(1)
    soft = adapter.soft_prompt(1)
    dtype = adapter.model.get_input_embeddings().weight.dtype  # bf16 inside precision.weights_in
    if soft is None:
        return None if prefix is None else _kv_of(cast_cache(prefix, dtype))
    soft = soft.detach()
    hit = _VIRTUAL_CACHE.get(adapter, {}).get(dtype)  # one entry per weight dtype (fp32 / bf16 inference)
    if hit is not None and hit[0].shape == soft.shape and torch.equal(hit[0], soft):
        return hit[1]
    if prefix is not None:
        cast_cache(prefix, dtype)
    body, _ = _decoder_and_head(adapter.model)
    if body is None:
        return None  # unusual architecture: keep the plain path
    n_prefix = 0 if prefix is None else prefix.get_seq_length()  # type: ignore[union-attr]
    n = soft.shape[1]
    mask = torch.ones(1, n_prefix + n, dtype=torch.long, device=soft.device)
    out = body(inputs_embeds=soft.to(dtype), attention_mask=mask,
               position_ids=torch.arange(n_prefix, n_prefix + n, device=soft.device).unsqueeze(0),
               **cache_kwargs(body, prefix), use_cache=True)
    kv = _kv_of(output_cache(out))
    entries = _VIRTUAL_CACHE.get(adapter) or {}
    entries[dtype] = (soft.clone(), kv)
    _VIRTUAL_CACHE[adapter] = entries
    return kv


def batch_cache(model, prefixes: Sequence[PrefixKV | None]) -> tuple[DynamicCache | None, torch.Tensor]:
    """One cache for a batch whose rows have prefixes of different lengths (None = no prefix).

    Each row's prefix is left-padded with zeros to the longest and the pads are masked, giving the layout
    ``[pad | prefix_i | text]``; returns (cache, prefix attention mask (B, longest)). With positions taken
    from the whole attention mask (``positions_from_mask``), row i's text starts at position
    ``prefix_i.length``, as in its own one-row forward. The cache is new (a forward extends it in place).
    """
    width = max((p.length for p in prefixes if p is not None), default=0)
    template = next((p for p in prefixes if p is not None and p.length), None)
    device = template.keys[0].device if template is not None else None
    mask = torch.zeros(len(prefixes), width, dtype=torch.long, device=device)
    if width == 0:
        return None, mask
    assert template is not None  # width > 0: some row has a prefix
    cache = DynamicCache(config=model.config)
    for layer in range(len(template.keys)):
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for row, prefix in enumerate(prefixes):
            n = 0 if prefix is None else prefix.length
            mask[row, width - n:] = 1
            for src, dst in ((prefix.keys if prefix is not None and n else None, keys),
                             (prefix.values if prefix is not None and n else None, values)):
                like = (template.keys if dst is keys else template.values)[layer]
                pad = like.new_zeros(1, like.shape[1], width - n, like.shape[3])
                dst.append(pad if src is None else torch.cat([pad, src[layer]], dim=-2) if width > n else src[layer])
        cache.update(torch.cat(keys), torch.cat(values), layer)
    return cache, mask


@torch.no_grad()
def extend_kv(adapter: Adapter, ids: Sequence[int], prefix: PrefixKV | None = None) -> PrefixKV:
    """``prefix`` (default: the adapter's ``virtual_kv``) extended by the keys/values of token ``ids``,
    e.g. a system prompt or in-context demonstrations shared by many prompts; computed once, then used
    as the per-row prefix of every row that starts with ``ids``."""
    prefix = virtual_kv(adapter) if prefix is None else prefix
    cache, pmask = batch_cache(adapter.model, [prefix])
    device = adapter.model.get_input_embeddings().weight.device
    mask = torch.cat([pmask.to(device), torch.ones(1, len(ids), dtype=torch.long, device=device)], dim=1)
    body, _ = _decoder_and_head(adapter.model)
    model = body if body is not None else adapter.model
    out = model(input_ids=torch.tensor([list(ids)], device=device), attention_mask=mask,
                position_ids=positions_from_mask(mask)[:, pmask.shape[1]:], **cache_kwargs(model, cache), use_cache=True)
    return _kv_of(output_cache(out))


def build_inputs(adapter: Adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 prefix: PrefixKV | None = None) -> ModelInputs:
    """Embed tokens, prepend the soft prompt and attach the prefix cache of ``adapter``.

    Without gradients (evaluation, scoring, generation) the virtual tokens come from the cached
    ``virtual_kv`` instead of being recomputed for every row (with gradients, e.g. training or a reference that
    recomputes everything, the soft prompt is prepended to the embeddings).
    ``prefix`` (no-grad only): keys/values of everything before ``input_ids`` -- the adapter's virtual
    tokens and shared text, from ``extend_kv`` -- used for every row instead.
    """
    batch = input_ids.shape[0]
    embeds = adapter.model.get_input_embeddings()(input_ids)  # (B, T, C)
    if prefix is not None:
        cache, pmask = batch_cache(adapter.model, [prefix] * batch)
        mask = torch.cat([pmask, attention_mask], dim=1)
        return ModelInputs(embeds, mask, positions_from_mask(mask)[:, prefix.length:], cache, 0)
    if not torch.is_grad_enabled() and adapter.soft_prompt(1) is not None:
        kv = virtual_kv(adapter)
        if kv is not None:
            cache, pmask = batch_cache(adapter.model, [kv] * batch)
            mask = torch.cat([pmask, attention_mask], dim=1)
            return ModelInputs(embeds, mask, positions_from_mask(mask)[:, kv.length:], cache, 0)
    soft = adapter.soft_prompt(batch)  # (B, n, C) or None
    prefix = adapter.prefix_cache(batch)
    if prefix is not None and not torch.is_grad_enabled():
        cast_cache(prefix, embeds.dtype)  # inference with bf16 weights (precision.weights_in)
    n_soft = 0 if soft is None else soft.shape[1]
    if soft is not None:
        embeds = torch.cat([soft.to(embeds.dtype), embeds], dim=1)
        ones = attention_mask.new_ones(batch, n_soft)
        attention_mask = torch.cat([ones, attention_mask], dim=1)
    n_prefix = 0 if prefix is None else prefix.get_seq_length()  # type: ignore[union-attr]
    if n_prefix:
        attention_mask = torch.cat([attention_mask.new_ones(batch, n_prefix), attention_mask], dim=1)
    positions = positions_from_mask(attention_mask)[:, n_prefix:]
    return ModelInputs(embeds, attention_mask, positions, prefix, n_soft)


def _decoder_and_head(model):
    """The transformer body and LM head, so logits are computed only where they are needed."""
    body = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    return (body, head) if body is not None and head is not None and body is not model else (None, None)


def hidden_states(adapter: Adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  use_cache: bool = False, prefix: PrefixKV | None = None):
    """Final hidden states (B, n_soft + T, C) of the text, plus the cache when ``use_cache``."""
    inputs = build_inputs(adapter, input_ids, attention_mask, prefix)
    body, _ = _decoder_and_head(adapter.model)
    target = body if body is not None else adapter.model
    kwargs = dict(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                  position_ids=inputs.position_ids, **cache_kwargs(target, inputs.past_key_values), use_cache=use_cache)
    if body is None:  # unusual architecture: full forward, take logits instead of hidden states
        out = adapter.model(**kwargs, output_hidden_states=False)
        return out.logits, output_cache(out), inputs, True
    out = body(**kwargs)
    return out.last_hidden_state, output_cache(out), inputs, False


def token_logprobs(adapter: Adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor, prefix: PrefixKV | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every supervised label token, computed on those positions only.

    Returns (logprobs of shape (N,), row index of each (N,)), N = number of supervised tokens.
    Projecting only supervised positions through the LM head skips most of the vocabulary matmul.
    """
    hidden, _, inputs, are_logits = hidden_states(adapter, input_ids, attention_mask, prefix=prefix)
    hidden = hidden[:, inputs.n_soft:]  # drop virtual-token positions: (B, T, C)
    targets = labels[:, 1:]  # token t+1 is predicted at position t
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    picked = hidden[:, :-1][rows, cols]  # (N, C) or (N, V)
    logits = picked if are_logits else adapter.model.get_output_embeddings()(picked)
    logprobs = F.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(-1, targets[rows, cols].unsqueeze(-1)).squeeze(-1), rows


def causal_lm_loss(adapter: Adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over supervised tokens, and how many there were."""
    logprobs, _ = token_logprobs(adapter, input_ids, attention_mask, labels)
    if logprobs.numel() == 0:
        return logprobs.sum() * 0.0, 0
    return -logprobs.mean(), int(logprobs.numel())


def sequence_logprobs(adapter: Adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor, prefix: PrefixKV | None = None) -> torch.Tensor:
    """Sum of label-token log-probabilities per row (B,), for rank classification and scoring."""
    logprobs, rows = token_logprobs(adapter, input_ids, attention_mask, labels, prefix)
    return torch.zeros(input_ids.shape[0], dtype=logprobs.dtype, device=logprobs.device).index_add_(0, rows, logprobs)


SHARED_PREFIX_MIN = 8  # shorter common prefixes are not worth a separate forward


@torch.no_grad()
def score_sequences(adapter: Adapter, encoded: Sequence, pad_id: int, batch_size: int = 16,
                    shared_prefix: bool = True, precision: str = "fp32") -> list[float]:
    """Summed label log-probability of each encoded (input_ids, labels) sequence, in input order.

    - Rows are batched longest-first, so a batch pads only to a similar length (E2E inputs in file order:
      ~20% padding in batches of 16).
    - ``shared_prefix``: the tokens every sequence starts with (a template's system prompt and instruction:
      47 of ~127 tokens on E2E) are run once (``extend_kv``, after the adapter's virtual tokens) and every
      batch forwards only its suffixes. Equal to scoring each row alone up to float rounding.
    - ``precision``: fp32 | bf16 | auto, the prefill phase of ``tunelab.precision`` (bf16 weights inside).
    """
    if not encoded:
        return []
    phases = inference_precision.resolve(precision, adapter.model.get_input_embeddings().weight.device)
    with inference_precision.weights_in(adapter.model, phases.prefill_dtype):
        return _score_sequences(adapter, encoded, pad_id, batch_size, shared_prefix)


def _score_sequences(adapter: Adapter, encoded: Sequence, pad_id: int, batch_size: int,
                     shared_prefix: bool) -> list[float]:
    prefix, start = None, 0
    if shared_prefix:
        start = _scoring_prefix_length(encoded)
        if start >= SHARED_PREFIX_MIN:
            prefix = extend_kv(adapter, list(encoded[0].input_ids[:start]))
        else:
            start = 0
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    device = adapter.model.get_input_embeddings().weight.device
    out = [0.0] * len(encoded)
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        # the suffix keeps its first token's label slot: label j is predicted at j - 1 >= start
        ids = [list(encoded[i].input_ids[start:]) for i in rows]
        labels = pad_batch([list(encoded[i].labels[start:]) for i in rows], IGNORE_INDEX).to(device)
        scores = sequence_logprobs(adapter, pad_batch(ids, pad_id).to(device), mask_for(ids).to(device), labels,
                                   prefix)
        for i, value in zip(rows, scores.tolist(), strict=True):
            out[i] = value
    return out


def _scoring_prefix_length(encoded: Sequence) -> int:
    """Tokens shared by every sequence that can be cached: all before the first supervised token's predictor."""
    seqs = [e.input_ids for e in encoded]
    first = seqs[0]
    n = min(len(s) for s in seqs)
    common = next((i for i in range(n) if any(s[i] != first[i] for s in seqs)), n)
    first_label = min((next((j for j, t in enumerate(e.labels) if t != IGNORE_INDEX), len(e.labels))
                       for e in encoded), default=0)
    return max(0, min(common, first_label - 1))


def pad_batch(sequences: list[list[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    """Pad a list of id lists to one (B, T) tensor."""
    width = max(len(s) for s in sequences)
    rows = [([pad_value] * (width - len(s)) + s) if side == "left" else (s + [pad_value] * (width - len(s)))
            for s in sequences]
    return torch.tensor(rows, dtype=torch.long)


def mask_for(sequences: list[list[int]], side: str = "right") -> torch.Tensor:
    """Attention mask matching ``pad_batch``."""
    return pad_batch([[1] * len(s) for s in sequences], 0, side)


# --- row-level cache surgery for the serving scheduler (tunelab.serve.scheduler) -------------------------

def cache_tensors(cache) -> PrefixKV:
    """The per-layer (B, heads, L, head_dim) keys/values of a transformers cache."""
    return _kv_of(cache)


def cache_from(model, kv: PrefixKV) -> DynamicCache:
    """A new transformers cache holding ``kv`` (one (B, heads, L, head_dim) pair per layer)."""
    cache = DynamicCache(config=model.config)
    for layer, (keys, values) in enumerate(zip(kv.keys, kv.values, strict=True)):
        cache.update(keys, values, layer)
    return cache


def merge_rows(model, parts: Sequence[tuple[PrefixKV, torch.Tensor]]) -> tuple[DynamicCache, torch.Tensor]:
    """Stack batches of cached rows whose caches have different lengths into one cache and mask.

    Each part is (keys/values (B_i, heads, L_i, head_dim) per layer, attention mask (B_i, L_i)); the
    shorter ones are left-padded with zero keys/values and mask zeros, as ``batch_cache`` pads prefixes.
    Positions are passed explicitly in every later forward, so a row's outputs do not depend on the pad.
    """
    width = max(int(mask.shape[1]) for _, mask in parts)
    n_layers = len(parts[0][0].keys)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for layer in range(n_layers):
        for store, pick in ((keys, lambda kv: kv.keys), (values, lambda kv: kv.values)):
            chunks = []
            for kv, mask in parts:
                t = pick(kv)[layer]
                short = width - int(mask.shape[1])
                chunks.append(torch.cat([t.new_zeros(t.shape[0], t.shape[1], short, t.shape[3]), t], dim=-2)
                              if short else t)
            store.append(torch.cat(chunks))
    masks = [torch.cat([mask.new_zeros(mask.shape[0], width - mask.shape[1]), mask], dim=1) for _, mask in parts]
    return cache_from(model, PrefixKV(keys, values)), torch.cat(masks)


def select_rows(model, cache, mask: torch.Tensor, keep: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Only rows ``keep`` (indices) of a cache and its mask, with the columns no kept row attends dropped."""
    kv = _kv_of(cache)
    mask = mask.index_select(0, keep)
    attended = mask.any(0).nonzero()
    start = int(attended[0]) if attended.numel() else mask.shape[1]
    kv = PrefixKV([k.index_select(0, keep)[:, :, start:] for k in kv.keys],
                  [v.index_select(0, keep)[:, :, start:] for v in kv.values])
    return cache_from(model, kv), mask[:, start:]
