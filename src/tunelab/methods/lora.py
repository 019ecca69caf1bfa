"""LoRA (Hu et al. 2021): W x + (alpha / r) B A x on chosen linear layers; A, B trainable, W frozen.

peft patches the layers in place, so the adapter's model is peft's base model with LoRA layers in
it, called through tunelab's forward like every other method. Saved in the PEFT format.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig, TaskType
from peft.utils import load_peft_weights
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.data.example import Example
from tunelab.errors import ConfigError
from tunelab.methods.base import (
    Adapter,
    Capabilities,
    LowRankDelta,
    MethodConfig,
    MethodDefaults,
    PeftAdapter,
    freeze,
    peft_model,
)
from tunelab.methods.transfer import base_model, require_no_prompt, start_from
from tunelab.validation import at_least, between


@dataclass
class LoraMethodConfig(MethodConfig):
    lr: float = 2e-4  # Hu et al. use 2e-4 for GPT-2 on E2E
    r: int = at_least(1, 8)  # rank of the update
    alpha: int = at_least(1, 16)  # scale = alpha / r
    dropout: float = between(0, 1, 0.05, high_open=True)  # on the LoRA input path, training only
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # or ["all-linear"]

    def __post_init__(self) -> None:
        if not self.target_modules:
            raise ConfigError("method.target_modules is empty; e.g. method.target_modules=q_proj,v_proj")


class LoraAdapter(PeftAdapter):
    """The model with LoRA layers patched in; only A and B train."""

    def trainable_parameters(self) -> list:
        return [p for n, p in self.peft_model.named_parameters() if p.requires_grad and "lora_" in n]

    def merged_model(self) -> PreTrainedModel:
        return self.peft_model.merge_and_unload()  # B A folded into W; the LoRA layers are removed

    def save_weights(self, directory: Path) -> None:
        self.peft_model.save_pretrained(str(directory), safe_serialization=True)


def lora_config(config: LoraMethodConfig) -> LoraConfig:
    """peft's LoraConfig for our options."""
    targets = config.target_modules[0] if config.target_modules == ["all-linear"] else list(config.target_modules)
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=config.r, lora_alpha=config.alpha,
                      lora_dropout=config.dropout, target_modules=targets)


def build_lora(name: str, model: PreTrainedModel, config: LoraMethodConfig) -> LoraAdapter:
    """Fresh LoRA layers on ``model`` (with any ``init_from`` weights folded in first)."""
    source = start_from(config.init_from, model)
    require_no_prompt(source, name)
    model = source.model if source else model
    freeze(model)
    try:
        adapter = LoraAdapter(peft_model(model, lora_config(config)), name, config)
    except ValueError as exc:  # peft names the modules it could not find
        raise ConfigError(f"method.target_modules={config.target_modules}: {exc}") from None
    adapter.folded_from = source.folded_from if source else None
    return adapter


def load_lora(name: str, directory: Path, model: PreTrainedModel, config: LoraMethodConfig) -> LoraAdapter:
    """A saved LoRA adapter on the model it was trained on."""
    model = base_model(directory, model)
    freeze(model)
    return LoraAdapter(peft_model(model, directory=directory), name, config)


PEFT_PREFIX = "base_model.model."  # peft's saved keys: PEFT_PREFIX + module name + ".lora_A.weight"


def lora_delta(directory: Path) -> LowRankDelta | None:
    """A saved LoRA adapter's factors per target module, read with peft's own loaders without patching any
    model; None for what plain ``x A^T B^T`` cannot express (DoRA, per-module rank/alpha patterns, trained
    biases, extra saved modules, LoRA on embeddings)."""
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
              train: Sequence[Example], seed: int) -> Adapter:
        return build_lora(self.name, model, config)

    def load(self, directory: Path, model: PreTrainedModel, config: LoraMethodConfig) -> Adapter:
        return load_lora(self.name, directory, model, config)
