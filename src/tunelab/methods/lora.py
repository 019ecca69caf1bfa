"""LoRA (Hu et al. 2021): W x + (alpha / r) B A x on chosen linear layers; A, B trainable, W frozen.

peft patches the layers in place, so the adapter's model is peft's base model with LoRA layers in
it, called through tunelab's forward like every other method. Saved in the PEFT format.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.data.example import Example
from tunelab.errors import ConfigError
from tunelab.methods.base import (
    Capabilities,
    LowRankDelta,
    Method,
    MethodConfig,
    MethodDefaults,
    freeze,
    peft_model,
)
from tunelab.methods.transfer import Source, require_no_prompt, saved_peft_model, starting_model
from tunelab.validation import at_least, between

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunelab.methods.adapters import Adapter, LoraAdapter


@dataclass
class LoraMethodConfig(MethodConfig):
    lr: float = 2e-4  # Hu et al. use 2e-4 for GPT-2 on E2E
    r: int = at_least(1, 8)  # rank of the update
    alpha: int = at_least(1, 16)  # scale = alpha / r
    dropout: float = between(0, 1, 0.05, high_open=True)  # on the LoRA input path, training only
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # or ["all-linear"]
    use_dora: bool = False  # DoRA (Liu et al. 2024): magnitude and direction trained apart; served on a private copy
    use_rslora: bool = False  # rank-stabilised scale alpha / sqrt(r) (Kalajdzievski 2023) instead of alpha / r
    init_lora_weights: bool | str = True  # peft's: true | false | gaussian | orthogonal | pissa | pissa_niter_N | olora ...

    def __post_init__(self) -> None:
        if not self.target_modules:
            raise ConfigError("method.target_modules is empty; e.g. method.target_modules=q_proj,v_proj")
        if isinstance(self.init_lora_weights, str):  # peft is imported only for a named initialisation
            check_init(self.init_lora_weights)


# initialisations that rewrite the base weights (W <- W - B A): saved converted to a plain LoRA on the unchanged base
CHANGES_BASE = ("pissa", "olora")
# initialisations computed from data or a quantisation config, which tunelab does not pass to peft
NEEDS_DATA = ("eva", "corda", "loftq")


def init_choices() -> list[str]:
    """The named initialisations peft's ``LoraConfig.init_lora_weights`` accepts (its ``Literal``)."""
    import typing

    from peft import LoraConfig

    hint = typing.get_type_hints(LoraConfig)["init_lora_weights"]
    return [a for arg in typing.get_args(hint) for a in typing.get_args(arg) if isinstance(a, str)]


def check_init(value: str) -> None:
    """A named initialisation peft accepts and tunelab can run, or a one-line error naming the ones it can."""
    import re

    allowed = init_choices()
    usable = [v for v in allowed if v not in NEEDS_DATA and "[" not in v]
    if value not in allowed and not re.fullmatch(r"pissa_niter_\d+", value):
        raise ConfigError(f"method.init_lora_weights: got {value!r}, expected true, false or one of "
                          f"{', '.join(usable)}, pissa_niter_N")
    if value in NEEDS_DATA:
        raise ConfigError(f"method.init_lora_weights={value}: peft computes it from calibration data or a quantisation "
                          f"config, which tunelab does not pass; use true, false or one of {', '.join(usable)}")


def __getattr__(name: str) -> Any:
    if name == "LoraAdapter":  # an nn.Module: imported on first use (tunelab.methods.adapters)
        from tunelab.methods.adapters import LoraAdapter

        return LoraAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lora_config(config: LoraMethodConfig) -> LoraConfig:
    """peft's LoraConfig for our options."""
    from peft import LoraConfig, TaskType

    targets = config.target_modules[0] if config.target_modules == ["all-linear"] else list(config.target_modules)
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=config.r, lora_alpha=config.alpha,
                      lora_dropout=config.dropout, target_modules=targets, use_dora=config.use_dora,
                      use_rslora=config.use_rslora,
                      init_lora_weights=config.init_lora_weights)  # type: ignore[arg-type]  # checked by check_init


def keep_initial(adapter: LoraAdapter, config: LoraMethodConfig) -> None:
    """For an initialisation that rewrote the base weights (PiSSA, OLoRA), save the adapter as it starts, so that
    ``save_weights`` can convert the trained one into a plain LoRA on the unchanged base model (peft's
    ``path_initial_model_for_weight_conversion``); a reload on the original base then computes the same function."""
    import tempfile

    if not str(config.init_lora_weights).startswith(CHANGES_BASE):
        return
    initial = tempfile.mkdtemp(prefix="tunelab-lora-init-")
    peft_cfg = adapter.peft_model.peft_config["default"]
    peft_cfg.init_lora_weights = True  # peft's recipe: the initial adapter is saved as a plain one
    adapter.peft_model.save_pretrained(initial, safe_serialization=True)
    peft_cfg.init_lora_weights = config.init_lora_weights
    adapter.initial_dir = initial


def build_lora(method: Method, model: PreTrainedModel, config: LoraMethodConfig,
               source: Source | None = None) -> LoraAdapter:
    """Fresh LoRA layers on ``model`` (with the ``init_from`` source's weights folded in first)."""
    from tunelab.methods.adapters import LoraAdapter

    require_no_prompt(source, method.name)
    model = starting_model(model, config, source)
    freeze(model)
    try:
        adapter = LoraAdapter(peft_model(model, lora_config(config)), method.name, config,
                              method.capabilities_for(config))
    except ValueError as exc:  # peft names the modules it could not find
        raise ConfigError(f"method.target_modules={config.target_modules}: {exc}") from None
    keep_initial(adapter, config)
    return adapter


def load_lora(method: Method, directory: Path, model: PreTrainedModel, config: LoraMethodConfig) -> LoraAdapter:
    """A saved LoRA adapter on the model it was trained on."""
    from tunelab.methods.adapters import LoraAdapter

    return LoraAdapter(saved_peft_model(directory, model), method.name, config, method.capabilities_for(config))


PEFT_PREFIX = "base_model.model."  # peft's saved keys: PEFT_PREFIX + module name + ".lora_A.weight"


def lora_delta(directory: Path) -> LowRankDelta | None:
    """A saved LoRA adapter's factors per target module, read with peft's own loaders without patching any
    model; None for what plain ``x A^T B^T`` cannot express (DoRA, per-module rank/alpha patterns, trained
    biases, extra saved modules, LoRA on embeddings)."""
    from peft import LoraConfig
    from peft.utils import load_peft_weights

    cfg = LoraConfig.from_pretrained(str(directory))
    if cfg.use_dora or cfg.rank_pattern or cfg.alpha_pattern or cfg.bias != "none" or cfg.modules_to_save:
        return None
    weights = load_peft_weights(str(directory), device="cpu")
    factors = {}
    for key, a in weights.items():
        if key.endswith(".lora_B.weight"):
            continue
        if not (key.startswith(PEFT_PREFIX) and key.endswith(".lora_A.weight")):
            return None
        name = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
        b = weights.get(f"{PEFT_PREFIX}{name}.lora_B.weight")
        if b is None or a.dim() != 2 or b.dim() != 2:
            return None
        factors[name] = (a, b)  # (r, in), (out, r)
    if len(factors) * 2 != len(weights):
        return None
    return LowRankDelta(factors, cfg.lora_alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r))


class Lora(MethodDefaults):
    name = "lora"
    Config = LoraMethodConfig
    capabilities = Capabilities(trains=True, changes_weights=True, low_rank_delta=True)

    def low_rank_delta(self, directory: Path, config: LoraMethodConfig) -> LowRankDelta | None:
        return lora_delta(directory)

    def build(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: LoraMethodConfig,
              train: Sequence[Example], seed: int, source: Source | None = None) -> Adapter:
        return build_lora(self, model, config, source)

    def load(self, directory: Path, model: PreTrainedModel, config: LoraMethodConfig) -> Adapter:
        return load_lora(self, directory, model, config)
