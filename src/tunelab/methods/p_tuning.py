"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): input = [MLP(E) ; X], model frozen.

The virtual-token embeddings pass through a small trainable encoder (an MLP or LSTM) before they
are placed in front of the text, which Liu et al. found trains more stably than raw embeddings.
peft's ``PromptEncoder`` holds the parameters; peft saves only the encoder's output, so a saved
P-tuning adapter reloads for inference, with the encoder folded into fixed embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.data.example import Example
from tunelab.methods.base import Capabilities, MethodConfig, MethodDefaults, freeze, peft_model
from tunelab.methods.transfer import Source, require_no_prompt, saved_peft_model, starting_model
from tunelab.validation import at_least, choice

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunelab.methods.adapters import Adapter

ENCODERS = ("MLP", "LSTM")


@dataclass
class PTuningConfig(MethodConfig):
    lr: float = 1e-3  # the encoder is an MLP, trained at weight-like rates (Liu et al. use 1e-5..1e-3)
    num_virtual_tokens: int = at_least(1, 20)
    encoder_type: str = choice(ENCODERS, "MLP")  # MLP | LSTM
    encoder_hidden_size: int | None = at_least(1, None)  # None = the model's hidden size
    encoder_num_layers: int = at_least(1, 2)


class PTuning(MethodDefaults):
    name = "p_tuning"
    Config = PTuningConfig
    capabilities = Capabilities(trains=True, soft_prompt=True)

    def build(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: PTuningConfig,
              train: Sequence[Example], seed: int, source: Source | None = None) -> Adapter:
        from peft import PromptEncoderConfig, TaskType

        from tunelab.methods.adapters import SoftPromptAdapter

        require_no_prompt(source, self.name)
        model = starting_model(model, config, source)
        freeze(model)
        hidden = model.config.get_text_config().hidden_size
        peft_config = PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.num_virtual_tokens,
                                          encoder_reparameterization_type=config.encoder_type,
                                          encoder_hidden_size=config.encoder_hidden_size or hidden,
                                          encoder_num_layers=config.encoder_num_layers)
        return SoftPromptAdapter(peft_model(model, peft_config), self.name, config, self.capabilities_for(config))

    def load(self, directory: Path, model: PreTrainedModel, config: PTuningConfig) -> Adapter:
        from tunelab.methods.adapters import SoftPromptAdapter

        return SoftPromptAdapter(saved_peft_model(directory, model), self.name, config, self.capabilities_for(config))
