"""The decoder families the fast decode steps cover, each declared once as an ``Arch``: what differs between them.

    llama        (SmolLM2, Llama 3)   RMSNorm x * w; SiLU MLP; one RoPE table; full attention; 1/sqrt(head_dim)
    gemma3_text  (Gemma 3 text)       RMSNorm in fp32, x * (1 + w); norms also on each sublayer's output (before the
                                      residual add) and on every q / k head before RoPE; embeddings times sqrt(hidden);
                                      GELU (tanh) MLP; sliding-window layers with their own RoPE table; logits
                                      scaled by query_pre_attn_scalar ** -0.5; optional logit soft-capping

``of(config)`` reads the facts from a transformers config (``FAMILIES``: model_type -> its builder), or says in one
line why no family covers it; ``inference.llama.uncovered`` checks the model's modules against it, and
``inference.torch_step`` computes whatever it declares. Only ``native`` families run the native C step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# config activation name -> the function transformers' ACT2FN applies for it (the same op: same bits)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
}


@dataclass(frozen=True)
class Arch:
    """One decoder family as the fast steps compute it. Module names are relative to a decoder layer."""

    family: str  # the config's model_type
    attention: str  # class of every layer's self_attn (a wrapper, e.g. peft's adaption prompt: not covered)
    norm: str  # class of every RMSNorm module
    embedding: str  # class of embed_tokens (peft's modules_to_save wrapper: not covered)
    activation: Callable[[torch.Tensor], torch.Tensor]  # the MLP's gate activation
    scale: float  # factor on the attention logits q.k
    windows: tuple[int | None, ...]  # per layer: sliding window w (the query at column c sees columns > c - w)
    ropes: tuple[str | None, ...]  # per layer: the layer_type ``rotary_emb`` takes (None: it takes none)
    attn_in: str = "input_layernorm"  # norm on the attention's input
    mlp_in: str = "post_attention_layernorm"  # norm on the MLP's input (Llama's name for it)
    attn_out: str | None = None  # norm on the attention's output, before the residual add
    mlp_out: str | None = None  # norm on the MLP's output, before the residual add
    q_norm: str | None = None  # norm over each query head before RoPE
    k_norm: str | None = None  # norm over each key head before RoPE
    unit_offset: bool = False  # RMSNorm in fp32 scaled by (1 + w), cast back (Gemma3RMSNorm); else x * w
    embed_scale: bool = False  # embed_tokens multiplies by its ``embed_scale`` buffer, in the weights' dtype
    attn_softcap: float | None = None  # logits -> tanh(logits / cap) * cap, before the mask
    final_softcap: float | None = None  # the LM head's logits, likewise
    native: bool = False  # the native C step (``native.llama``) computes this family too

    @property
    def norms(self) -> tuple[str, ...]:
        """Every per-layer norm module, in the order the layer applies them."""
        return tuple(n for n in (self.attn_in, self.q_norm, self.k_norm, self.attn_out, self.mlp_in, self.mlp_out)
                     if n is not None)


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _llama(cfg) -> Arch | str:
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"Llama hidden_act {getattr(cfg, 'hidden_act', None)!r} (the fast steps compute silu)"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return "Llama pretraining_tp > 1"
    n = cfg.num_hidden_layers
    return Arch("llama", "LlamaAttention", "LlamaRMSNorm", "Embedding", F.silu, _head_dim(cfg) ** -0.5,
                (None,) * n, (None,) * n, native=True)


_GEMMA3_LAYERS = ("sliding_attention", "full_attention")


def _gemma3(cfg) -> Arch | str:
    if getattr(cfg, "use_bidirectional_attention", False):
        return "Gemma 3 with bidirectional attention"
    name = str(getattr(cfg, "hidden_activation", None))
    activation = ACTIVATIONS.get(name)
    if activation is None:
        return f"Gemma 3 hidden_activation {name!r} (covered: {', '.join(ACTIVATIONS)})"
    types = tuple(cfg.layer_types)
    if len(types) != cfg.num_hidden_layers or any(t not in _GEMMA3_LAYERS for t in types):
        return f"Gemma 3 layer_types {sorted(set(types))} (covered: {', '.join(_GEMMA3_LAYERS)})"
    windows = tuple(cfg.sliding_window if t == "sliding_attention" else None for t in types)
    return Arch("gemma3_text", "Gemma3Attention", "Gemma3RMSNorm", "Gemma3TextScaledWordEmbedding", activation,
                cfg.query_pre_attn_scalar ** -0.5, windows, types, mlp_in="pre_feedforward_layernorm",
                attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm",
                q_norm="self_attn.q_norm", k_norm="self_attn.k_norm", unit_offset=True, embed_scale=True,
                attn_softcap=cfg.attn_logit_softcapping, final_softcap=cfg.final_logit_softcapping)


# config.model_type -> the family's facts read from that config (or why they are not covered)
FAMILIES: dict[str, Callable[[object], Arch | str]] = {"llama": _llama, "gemma3_text": _gemma3}


def of(config) -> Arch | str:
    """The family of a transformers ``config``, or one line saying why the fast steps do not cover it."""
    model_type = getattr(config, "model_type", None)
    build = FAMILIES.get(model_type)  # type: ignore[arg-type]
    if build is None:
        return f"model_type {model_type!r} is not a family the fast steps cover ({', '.join(FAMILIES)})"
    return build(config)
