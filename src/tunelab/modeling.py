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

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tunelab.formatting import IGNORE_INDEX

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


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """0-based positions counting only attended tokens; pads get 0 (they are masked anyway)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def build_inputs(adapter: Adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ModelInputs:
    """Embed tokens, prepend the soft prompt and attach the prefix cache of ``adapter``."""
    batch = input_ids.shape[0]
    embeds = adapter.model.get_input_embeddings()(input_ids)  # (B, T, C)
    soft = adapter.soft_prompt(batch)  # (B, n, C) or None
    prefix = adapter.prefix_cache(batch)
    n_soft = 0 if soft is None else soft.shape[1]
    if soft is not None:
        embeds = torch.cat([soft.to(embeds.dtype), embeds], dim=1)
        ones = attention_mask.new_ones(batch, n_soft)
        attention_mask = torch.cat([ones, attention_mask], dim=1)
    n_prefix = 0 if prefix is None else prefix.get_seq_length()
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
                  use_cache: bool = False):
    """Final hidden states (B, n_soft + T, C) of the text, plus the cache when ``use_cache``."""
    inputs = build_inputs(adapter, input_ids, attention_mask)
    body, _ = _decoder_and_head(adapter.model)
    kwargs = dict(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                  position_ids=inputs.position_ids, past_key_values=inputs.past_key_values, use_cache=use_cache)
    if body is None:  # unusual architecture: full forward, take logits instead of hidden states
        out = adapter.model(**kwargs, output_hidden_states=False)
        return out.logits, out.past_key_values, inputs, True
    out = body(**kwargs)
    return out.last_hidden_state, getattr(out, "past_key_values", None), inputs, False


def token_logprobs(adapter: Adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every supervised label token, computed on those positions only.

    Returns (logprobs of shape (N,), row index of each (N,)), N = number of supervised tokens.
    Projecting only supervised positions through the LM head skips most of the vocabulary matmul.
    """
    hidden, _, inputs, are_logits = hidden_states(adapter, input_ids, attention_mask)
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
                      labels: torch.Tensor) -> torch.Tensor:
    """Sum of label-token log-probabilities per row (B,), for rank classification and scoring."""
    logprobs, rows = token_logprobs(adapter, input_ids, attention_mask, labels)
    return torch.zeros(input_ids.shape[0], dtype=logprobs.dtype).index_add_(0, rows, logprobs)


def pad_batch(sequences: list[list[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    """Pad a list of id lists to one (B, T) tensor."""
    width = max(len(s) for s in sequences)
    rows = [([pad_value] * (width - len(s)) + s) if side == "left" else (s + [pad_value] * (width - len(s)))
            for s in sequences]
    return torch.tensor(rows, dtype=torch.long)


def mask_for(sequences: list[list[int]], side: str = "right") -> torch.Tensor:
    """Attention mask matching ``pad_batch``."""
    return pad_batch([[1] * len(s) for s in sequences], 0, side)
