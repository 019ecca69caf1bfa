"""What the fast decode steps (``inference.torch_step``, ``native.llama``) read from a model, in one place both
import (neither imports the other): whether a model is covered (``uncovered`` / ``supports``: a family declared in
``inference.arch`` -- Llama, Gemma 3 text -- whose modules are all of the declared kinds), the key that says its
weights or layer state changed (``weights_key``), the deltas of the layers a method patched into its projections,
and a per-model, per-dtype build cache.

A projection is a plain ``nn.Linear``, or a layer whose forward is ``base(x) + delta(x)``: which layers are, and
their deltas, are declared for the model by the method that patched them in (``register_layer_deltas``; peft's
LoRA layers: ``methods.lora_layers``, declared by the LoRA-family adapters). Nothing here knows a layer's class:
a wrapped layer nobody declared keeps the transformers forward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Protocol

import torch

from tunelab.inference import arch

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def decoder(model):
    """The decoder stack (``model.model`` of a transformers Llama or Gemma 3), or None."""
    return getattr(model, "model", None)


Delta = Callable[[torch.Tensor], "torch.Tensor | None"]  # a layer's input x (B, in) -> what it adds (B, out), or None


class LayerDeltas(Protocol):
    """The layers a method patched into a model's projections, as the decode steps see them."""

    def layer(self, module: torch.nn.Module) -> tuple[torch.nn.Linear, Delta] | None:
        """``(base, delta)`` when ``module``'s forward is now ``base(x) + delta(x)`` with ``base`` a plain
        ``nn.Linear``; None otherwise (merged, disabled, a variant the delta does not express, not its layer)."""
        ...

    def state(self, module: torch.nn.Module) -> tuple:
        """What decides ``module``'s delta besides its tensors (e.g. which adapters are active), for ``weights_key``."""
        ...


_LAYER_DELTAS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its LayerDeltas


def register_layer_deltas(model, deltas: LayerDeltas) -> None:
    """Declare what the layers patched into ``model``'s projections add (by the method that patched them in), so
    that the fast steps fuse their base projections and add the deltas after them."""
    _LAYER_DELTAS[model] = deltas


def layer_deltas(model) -> LayerDeltas | None:
    """The ``LayerDeltas`` declared for ``model`` (None: its projections must be plain ``nn.Linear``)."""
    return _LAYER_DELTAS.get(model)


def split(module, declared: LayerDeltas | None) -> tuple[torch.nn.Linear, Delta | None] | None:
    """A projection as ``(plain base projection, its declared delta or None)``; None when it is neither a plain
    ``nn.Linear`` nor a layer ``declared`` covers now."""
    if type(module) is torch.nn.Linear:
        return module, None
    found = declared.layer(module) if declared is not None else None
    if found is None or type(found[0]) is not torch.nn.Linear:
        return None
    return found


def base(module, declared: LayerDeltas | None) -> torch.nn.Module:
    """The plain projection under ``module``: the base of its declared layer, else ``module`` itself."""
    found = split(module, declared)
    return found[0] if found is not None else module


def deltas_of(model, names: dict[int, str]) -> dict[str, Delta]:
    """Module name (``names``: id -> name, from ``model.named_modules()``) -> the delta of its declared layer, for
    every projection that has one; built once per weight set (``weights_key``), not per step."""
    declared, out = layer_deltas(model), {}
    for layer in decoder(model).layers:
        for name in PROJECTIONS:
            module = layer.get_submodule(name)
            found = split(module, declared)
            if found is not None and found[1] is not None:
                out[names[id(module)]] = found[1]
    return out


def uncovered(model) -> str | None:
    """Why ``step`` cannot compute this model's forward, in one line (None: it can): a family ``inference.arch``
    declares, every module of the declared class, every projection a plain ``nn.Linear`` or a layer with declared
    deltas (``register_layer_deltas``: added after the fused base projections)."""
    cfg, body, name = getattr(model, "config", None), decoder(model), type(model).__name__
    if cfg is None or body is None or not len(getattr(body, "layers", ())):
        return f"{name} has no decoder stack (model.model.layers)"
    spec = arch.of(cfg)
    if isinstance(spec, str):
        return f"{name}: {spec}"
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or type(getattr(body, "embed_tokens", None)).__name__ != spec.embedding:
        # e.g. peft's modules_to_save wrappers: their trained copy is not ``.weight``
        return f"{name}: the embedding or LM head is not a plain {spec.embedding} / nn.Linear"
    if not hasattr(body, "rotary_emb") or type(getattr(body, "norm", None)).__name__ != spec.norm:
        return f"{name}: no rotary_emb or final {spec.norm}"
    if len(body.layers) != len(spec.windows):
        return f"{name}: {len(body.layers)} layers, the config declares {len(spec.windows)}"
    declared = layer_deltas(model)
    for i, layer in enumerate(body.layers):
        if type(getattr(layer, "self_attn", None)).__name__ != spec.attention:
            return f"{name}: layer {i}'s attention is not a plain {spec.attention}"  # e.g. peft's adaption prompt
        for proj in PROJECTIONS:
            if split(layer.get_submodule(proj), declared) is None:  # quantised layers, DoRA, undeclared wrappers
                return (f"{name}: layer {i}'s {proj} is neither a plain nn.Linear nor a layer with declared deltas "
                        "(inference.llama.register_layer_deltas)")
        for norm in spec.norms:
            if type(layer.get_submodule(norm)).__name__ != spec.norm:
                return f"{name}: layer {i}'s {norm} is not a {spec.norm}"
    return None


def supports(model) -> bool:
    """Whether ``step`` computes this model's forward (``uncovered`` has no reason)."""
    return uncovered(model) is None


def layer_state(module, declared: LayerDeltas | None) -> tuple:
    """What decides a projection's decode besides its tensors: the module itself and, for a layer with declared
    deltas, its ``LayerDeltas.state`` (a peft LoRA layer: merged, disabled, which adapters are active)."""
    if type(module) is torch.nn.Linear:
        return (id(module),)
    return (id(module), type(module)) + (declared.state(module) if declared is not None else ())


def weights_key(model) -> tuple:
    """Every source tensor's (data_ptr, version, dtype) and every projection module's ``layer_state``, in one
    walk over the layers (it runs at every decode step)."""
    body, declared, spec = decoder(model), layer_deltas(model), arch.of(model.config)
    assert isinstance(spec, arch.Arch), spec  # supports(model) holds
    tensors = [body.embed_tokens.weight, body.norm.weight, model.get_output_embeddings().weight]
    if spec.embed_scale:
        tensors.append(body.embed_tokens.embed_scale)
    states = []
    for layer in body.layers:
        tensors += [layer.get_submodule(norm).weight for norm in spec.norms]
        for name in PROJECTIONS:
            module = layer.get_submodule(name)
            states.append(layer_state(module, declared))
            lin = base(module, declared)
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


