"""peft's LoRA layers as the fast decode steps see them (``inference.llama.LayerDeltas``): which patched projections
compute ``base(x) + B(A(dropout(x))) * scaling`` now, and that delta, computed by the layer's own modules.

Declared for a model by the LoRA-family adapters that patch these layers in (``methods.adapters.LoraAdapter``, the
generic peft method's adapter with a LoRA type: ``Capabilities.low_rank_delta``), so the inference code adds the
deltas without knowing peft's classes. Merged, disabled or variant (DoRA, ...) layers are not declared: their
model keeps the transformers forward.
"""

from __future__ import annotations

import functools

import torch


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


class PeftLoraLayers:
    """``inference.llama.LayerDeltas`` for peft's LoRA ``Linear`` layers."""

    def layer(self, module: torch.nn.Module):
        if not peft_lora(module):
            return None
        return module.base_layer, functools.partial(peft_delta, module)

    def state(self, module: torch.nn.Module) -> tuple:
        """Merged, disabled, and the active adapters: ``set_adapter`` and ``merge`` change the delta, not a tensor."""
        return (getattr(module, "merged", None), getattr(module, "disable_adapters", None),
                tuple(getattr(module, "active_adapters", ()) or ()))


PEFT_LORA = PeftLoraLayers()


def declare(model) -> None:
    """Tell the fast decode steps that ``model``'s peft LoRA layers add their deltas after the base projections."""
    from tunelab.inference.llama import register_layer_deltas

    register_layer_deltas(model, PEFT_LORA)
