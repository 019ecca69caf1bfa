"""Prefill attention that gives every row of a left-padded batch the bits it gets when prefilled alone.

transformers' SDPA attends each row over the batch's whole key axis, masking the pad columns; the CPU kernel
then blocks its sums over a key axis whose length and offsets depend on the other rows, so a row's bf16 output
changes with the batch (on SmolLM2-135M, 1 of 8 chat prompts flipped a greedy token: docs/performance.md).
Inside ``exact_rows()`` and without gradients, ``attention`` runs SDPA once per row over only that row's
attended keys and real queries, with its own mask: the call a row alone makes, whatever pads the batch adds.
The projections and MLPs around it are already row-count invariant in bf16 (measured), so bf16 generation
prefills every row to the bits of its one-by-one prefill (tests/test_generate.py, real model).

Everywhere else (training, scoring, no ``exact_rows``, a model on CUDA) it is transformers' SDPA unchanged. ``install`` sets it
on full-attention Llama models loaded through ``models.load_model``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "tunelab_rows"
_ACTIVE = contextvars.ContextVar("tunelab_exact_rows", default=False)


@contextlib.contextmanager
def exact_rows() -> Iterator[None]:
    """Per-row attention for the forwards inside the block (generation and serve prefill)."""
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _allowed(mask: torch.Tensor | None, batch: int, q: int, k: int, device: torch.device) -> torch.Tensor:
    """(B, Q, K) bool: which key each query attends (SDPA's mask, or causal where transformers passes none)."""
    if mask is None:
        return torch.ones(q, k, dtype=torch.bool, device=device).tril(k - q).expand(batch, q, k)
    mask = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0
    return mask.expand(batch, q, k)


def attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: ``query`` (B, H, Q, D), ``key``/``value`` (B, KV, K, D) ->
    ((B, Q, H, D), None)."""
    batch, heads, q, dim = query.shape
    k = key.shape[2]
    # CPU only: the batch dependence it removes is the CPU kernel's; on CUDA transformers' SDPA runs (flash /
    # memory-efficient kernels), whose per-row loop here would serialise a batch's prefill
    if not _ACTIVE.get() or torch.is_grad_enabled() or query.device.type != "cpu" or \
            any(kwargs.get(name) is not None for name in ("softcap", "s_aux", "sliding_window")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # a row alone takes this path too (not SDPA's unmasked causal kernel): the same call, batched or not
    allowed = _allowed(attention_mask, batch, q, k, query.device).to(query.device)
    keys_of = allowed[:, -1]  # the last query is a real token (left padding) and sees every key its row attends
    if not bool(keys_of.any(-1).all()):  # not a left-padded causal batch: transformers' SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = query.new_zeros(batch, q, heads, dim)
    gqa = heads != key.shape[1]
    for row in range(batch):
        kept = keys_of[row].nonzero()[:, 0]
        queries = keys_of[row, k - q:].nonzero()[:, 0]  # query i is key column k - q + i
        mask = allowed[row][queries][:, kept]
        got = F.scaled_dot_product_attention(query[row:row + 1, :, queries], key[row:row + 1, :, kept],
                                             value[row:row + 1, :, kept], attn_mask=mask[None, None],
                                             scale=scaling, enable_gqa=gqa)  # (1, H, q_row, D)
        out[row, queries] = got[0].transpose(0, 1)
    return out, None


AttentionInterface.register(NAME, attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def install(model) -> bool:
    """Use ``attention`` in ``model`` where it is exact: a Llama (full attention in every layer) on SDPA."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "llama" or cfg._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return True
