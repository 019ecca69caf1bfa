"""What the fast decode steps (``inference.torch_step``, ``native.llama``) read from a Llama model, in one place both
import (neither imports the other): whether a model is covered (``supports``), the key that says its weights or LoRA
state changed (``weights_key``), its peft LoRA layers and their deltas, and a per-model, per-dtype build cache.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def decoder(model):
    """The decoder stack (``model.model`` of a transformers Llama), or None."""
    return getattr(model, "model", None)


def peft_lora(module) -> bool:
    """A peft LoRA ``Linear`` on a plain ``nn.Linear`` whose forward is ``base(x) + B(A(dropout(x))) * scaling``
    summed over its active adapters (not merged, not disabled, no DoRA or other variant)."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    if type(module) is not LoraLinear or type(module.base_layer) is not torch.nn.Linear:
        return False
    return not module.merged and not module.disable_adapters and \
        not any(name in module.lora_variant for name in module.active_adapters)


def peft_delta(module, x: torch.Tensor) -> torch.Tensor | None:
    """What a peft LoRA ``Linear`` (``peft_lora``) adds to its base layer's output for ``x`` (B, in): its own
    modules, in the order of its forward."""
    out = None
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        a = module.lora_A[name]
        d = module.lora_B[name](a(module.lora_dropout[name](module._cast_input_dtype(x, a.weight.dtype))))
        d = d * module.scaling[name]
        out = d if out is None else out + d
    return out


def supports(model) -> bool:
    """Whether ``step`` computes this model's forward: a plain Llama, whose projections may carry peft LoRA
    layers (their deltas are added after the fused base projections); no other wrapped layers."""
    cfg, body = getattr(model, "config", None), decoder(model)
    if cfg is None or body is None or getattr(cfg, "model_type", None) != "llama":
        return False
    if getattr(cfg, "hidden_act", None) != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or type(getattr(body, "embed_tokens", None)) is not torch.nn.Embedding:
        return False  # e.g. peft's modules_to_save wrappers: their trained copy is not ``.weight``
    if not hasattr(body, "rotary_emb") or not hasattr(body, "norm"):
        return False
    for layer in getattr(body, "layers", ()):
        if type(getattr(layer, "self_attn", None)).__name__ != "LlamaAttention":
            return False  # e.g. peft's adaption prompt wraps the attention module itself
        for name in PROJECTIONS:
            module = layer.get_submodule(name)
            if type(module) is not torch.nn.Linear and not peft_lora(module):  # quantised layers, DoRA, ...
                return False
        if type(layer.input_layernorm).__name__ != "LlamaRMSNorm":
            return False
    return len(getattr(body, "layers", ())) > 0


def lora_state(module) -> tuple:
    """What decides a projection's decode besides its tensors: the module itself and, for a peft LoRA layer,
    whether it is merged or disabled and which adapters are active (``set_adapter`` touches no tensor)."""
    if type(module) is torch.nn.Linear:
        return (id(module),)
    return (id(module), type(module), getattr(module, "merged", None), getattr(module, "disable_adapters", None),
            tuple(getattr(module, "active_adapters", ()) or ()))


def weights_key(model) -> tuple:
    """Every source tensor's (data_ptr, version, dtype) and every projection module's ``lora_state``, in one
    walk over the layers (it runs at every decode step)."""
    body = decoder(model)
    tensors = [body.embed_tokens.weight, body.norm.weight, model.get_output_embeddings().weight]
    states = []
    for layer in body.layers:
        tensors += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        for name in PROJECTIONS:
            lin = layer.get_submodule(name)
            states.append(lora_state(lin))
            tensors += [lin.weight] + ([lin.bias] if lin.bias is not None else [])
    return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors) + tuple(states)


def cached(cache: weakref.WeakKeyDictionary, model, key: tuple, build: Callable):
    """``cache[model][dtype of its embedding]``, rebuilt by ``build(model, key)`` when missing or built under
    another ``key`` (``weights_key``: any tensor, dtype or LoRA state changed since). fp32 and bf16 decode
    (``precision.weights_in`` swaps in a bf16 copy) each keep their own entry."""
    per_dtype = cache.setdefault(model, {})
    dtype = model.get_input_embeddings().weight.dtype
    hit = per_dtype.get(dtype)
    if hit is None or hit.key != key:
        hit = per_dtype[dtype] = build(model, key)
    return hit


