"""Prefix tuning (Li & Liang 2021): trainable key/value prefixes in every attention layer, model frozen.

peft's ``PrefixEncoder`` holds the parameters, optionally through the paper's MLP reparameterisation
(``prefix_projection``); ``get_prompt(B)`` turns them into a transformers ``DynamicCache``, a new
object on each call, which tunelab's forward extends in place. peft saves the encoder's output, so
a reparameterised prefix reloads for inference as the plain prefix it computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel, PrefixTuningConfig, TaskType, get_peft_model
from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase

from tunelab.data.example import Example
from tunelab.errors import ConfigError
from tunelab.methods.base import Adapter, MethodConfig, MethodDefaults, freeze
from tunelab.methods.transfer import Source, base_model, start_from


@dataclass
class PrefixTuningMethodConfig(MethodConfig):
    lr: float = 1e-2  # like soft prompts, prefixes need larger steps than weights
    num_virtual_tokens: int = 20
    prefix_projection: bool = False  # train the prefix through a 2-layer MLP (Li & Liang 2021, Sec. 4.3)
    encoder_hidden_size: int | None = None  # MLP width; None = the model's hidden size

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"method.num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")


class PrefixAdapter(Adapter):
    """Base model + peft prefix encoder; the prefix reaches the model as a fresh key/value cache."""

    def __init__(self, peft_model: PeftModel, method: str, config: MethodConfig) -> None:
        super().__init__(peft_model.get_base_model(), method, config)
        self.peft_model = peft_model

    def prefix_cache(self, batch_size: int) -> Cache:
        return self.peft_model.get_prompt(batch_size=batch_size)  # n_virtual entries in every layer

    def trainable_parameters(self) -> list:
        return [p for p in self.peft_model.prompt_encoder.parameters() if p.requires_grad]

    def save_weights(self, directory: Path) -> None:
        self.peft_model.save_pretrained(str(directory), safe_serialization=True)


def _transfer(adapter: PrefixAdapter, source: Source, config: PrefixTuningMethodConfig) -> None:
    """Start from a source run's prefix (same model, same number of virtual tokens, no MLP here)."""
    encoder = adapter.peft_model.prompt_encoder["default"]
    prompt = source.prompt()
    if config.prefix_projection or prompt is None or prompt.shape != encoder.embedding.weight.shape:
        raise ConfigError(f"prefix_tuning can start only from a prefix_tuning run with the same "
                          f"num_virtual_tokens, and with method.prefix_projection=false here; "
                          f"{source.directory} is a {source.method} run")
    encoder.load_prompt_embeddings(prompt)


class PrefixTuning(MethodDefaults):
    name = "prefix_tuning"
    Config = PrefixTuningMethodConfig
    trains = True

    def build(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: PrefixTuningMethodConfig,
              train: Sequence[Example], seed: int) -> Adapter:
        source = start_from(config.init_from, model)
        model = source.model if source else model
        freeze(model)
        hidden = model.config.get_text_config().hidden_size
        peft_config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.num_virtual_tokens,
                                         prefix_projection=config.prefix_projection,
                                         encoder_hidden_size=config.encoder_hidden_size or hidden)
        adapter = PrefixAdapter(get_peft_model(model, peft_config), self.name, config)
        if source is not None and source.weights:
            _transfer(adapter, source, config)
        adapter.folded_from = source.folded_from if source else None
        return adapter

    def load(self, directory: Path, model: PreTrainedModel, config: PrefixTuningMethodConfig) -> Adapter:
        model = base_model(directory, model)
        freeze(model)
        return PrefixAdapter(PeftModel.from_pretrained(model, str(directory)), self.name, config)
