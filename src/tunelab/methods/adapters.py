"""The torch side of the methods: ``Adapter`` (an ``nn.Module``) and the small adapter class each method builds.

The method modules (``tunelab.methods.<name>``) declare a method's facts (its config, its capabilities)
and import torch, transformers and peft only where a model is built or loaded, so the registry, every
config check and ``tunelab ls methods`` run without them. The ``nn.Module`` classes cannot wait that
way (a class statement needs its base), so they live here, each a thin view the shared forward path
(``tunelab.modeling``) calls; the logic that builds and loads them stays in the method's module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import Cache, PreTrainedModel

from tunelab.data.example import Example
from tunelab.formatting import fill_instruction
from tunelab.methods import lora_layers
from tunelab.methods.base import BASE_CAPABILITIES, Capabilities

if TYPE_CHECKING:
    from tunelab.methods.base import MethodConfig

CHOICE_FILE = "discrete_prompt.json"  # a discrete prompt's chosen instruction and every candidate's score


class Adapter(nn.Module):
    """A frozen-or-not base model plus a method's parameters, seen through one small interface."""

    def __init__(self, model: PreTrainedModel, method: str, config: MethodConfig,
                 capabilities: Capabilities = BASE_CAPABILITIES) -> None:
        super().__init__()
        self.model = model  # the transformers model to call (LoRA layers, if any, are patched in)
        self.method = method
        self.config = config
        # what the method that built it declares with these options (``Method.capabilities_for(config)``), given by
        # that method; the default: the bare base model's (nothing added, nothing changed)
        self.capabilities = capabilities
        self.folded_from: str | None = None  # adapter folded into the base weights (init_from); loads fold it again

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Training loss (mean over label tokens) and label count; a forward, so DDP/FSDP can wrap the adapter."""
        from tunelab.modeling import causal_lm_loss

        return causal_lm_loss(self, input_ids, attention_mask, labels)

    def soft_prompt(self, batch_size: int) -> torch.Tensor | None:
        """Learned input embeddings placed before the text, (B, n, C); None if the method has none."""
        return None

    def prefix_cache(self, batch_size: int):
        """A transformers Cache holding per-layer key/value prefixes; None if the method has none."""
        return None

    def rewrite(self, example: Example) -> Example:
        """The example as this adapter presents it to the model (a discrete prompt replaces the instruction)."""
        return example

    def merged_model(self) -> PreTrainedModel | None:
        """The base model with this adapter folded into its weights (LoRA, full weights); None if it cannot be."""
        return None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        """Exact count of trainable parameters."""
        return sum(p.numel() for p in self.trainable_parameters())

    def save_weights(self, directory: Path) -> None:
        """Write this method's weights (safetensors) into ``directory``."""
        raise NotImplementedError


class PeftAdapter(Adapter):
    """An adapter whose trainable part lives in a peft model wrapped around the base model."""

    def __init__(self, peft_model, method: str, config: MethodConfig,
                 capabilities: Capabilities = BASE_CAPABILITIES) -> None:
        super().__init__(peft_model.get_base_model(), method, config, capabilities)
        self.peft_model = peft_model


class FrozenAdapter(Adapter):
    """The base model untouched: nothing to train, nothing to save (ICL)."""

    def save_weights(self, directory: Path) -> None:
        return None


class DiscretePromptAdapter(Adapter):
    """The frozen base model plus one chosen instruction (``methods.discrete_prompt``)."""

    def __init__(self, model: PreTrainedModel, method: str, config: MethodConfig, capabilities: Capabilities,
                 choice: str, scores: dict[str, float]) -> None:
        super().__init__(model, method, config, capabilities)
        self.choice, self.scores = choice, scores

    def rewrite(self, example: Example) -> Example:
        return fill_instruction(self.choice, example)

    def save_weights(self, directory: Path) -> None:
        (Path(directory) / CHOICE_FILE).write_text(json.dumps({"instruction": self.choice, "scores": self.scores},
                                                              indent=2, ensure_ascii=False))


class SoftPromptAdapter(PeftAdapter):
    """Base model + a peft prompt encoder whose output is placed before the text embeddings
    (prompt tuning, IPT, P-tuning)."""

    @property
    def prompt_weight(self) -> torch.Tensor:
        return self.peft_model.prompt_encoder["default"].embedding.weight  # (n, C)

    def soft_prompt(self, batch_size: int) -> torch.Tensor:
        return self.peft_model.get_prompt(batch_size=batch_size)  # (B, n, C)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.peft_model.prompt_encoder.parameters() if p.requires_grad]

    def save_weights(self, directory: Path) -> None:
        self.peft_model.save_pretrained(str(directory), safe_serialization=True)


class PrefixAdapter(PeftAdapter):
    """Base model + peft prefix encoder; the prefix reaches the model as a fresh key/value cache."""

    def prefix_cache(self, batch_size: int) -> Cache:
        return self.peft_model.get_prompt(batch_size=batch_size)  # n_virtual entries in every layer

    def trainable_parameters(self) -> list:
        return [p for p in self.peft_model.prompt_encoder.parameters() if p.requires_grad]

    def save_weights(self, directory: Path) -> None:
        self.peft_model.save_pretrained(str(directory), safe_serialization=True)


class LoraAdapter(PeftAdapter):
    """The model with LoRA layers patched in; only A and B train. Their deltas are declared to the fast decode
    steps (``methods.lora_layers``), which add them after the fused base projections."""

    def __init__(self, peft_model, method: str, config: MethodConfig,
                 capabilities: Capabilities = BASE_CAPABILITIES) -> None:
        super().__init__(peft_model, method, config, capabilities)
        lora_layers.declare(self.model)

    def trainable_parameters(self) -> list:
        return [p for n, p in self.peft_model.named_parameters() if p.requires_grad and "lora_" in n]

    def merged_model(self) -> PreTrainedModel:
        return self.peft_model.merge_and_unload()  # B A folded into W; the LoRA layers are removed

    def save_weights(self, directory: Path) -> None:
        initial = getattr(self, "initial_dir", None)  # PiSSA / OLoRA: converted to a LoRA on the unchanged base
        self.peft_model.save_pretrained(str(directory), safe_serialization=True,
                                        path_initial_model_for_weight_conversion=initial)


class FullAdapter(Adapter):
    """The whole model, all parameters trainable (full fine-tuning)."""

    def merged_model(self) -> PreTrainedModel:
        return self.model

    def save_weights(self, directory: Path) -> None:
        # a plain transformers directory: AutoModelForCausalLM.from_pretrained(directory) loads it too
        self.model.save_pretrained(str(directory), safe_serialization=True)
