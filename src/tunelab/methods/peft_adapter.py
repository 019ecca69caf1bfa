"""The torch side of the generic peft method (``tunelab.methods.peft_method``): its ``nn.Module`` adapter.

Kept apart from the method module so that the registry and config checks import neither torch nor peft.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from tunelab.methods import lora_layers
from tunelab.methods.adapters import PeftAdapter
from tunelab.methods.base import BASE_CAPABILITIES, Capabilities, MethodConfig


class GenericPeftAdapter(PeftAdapter):
    """The base model inside a peft model of any type, seen through tunelab's forward: a prompt-learning type
    contributes its soft prompt or prefix, any other type is already patched into the model's modules (a LoRA type's
    deltas declared to the fast decode steps, as ``LoraAdapter``'s)."""

    def __init__(self, peft_model, method: str, config: MethodConfig,
                 capabilities: Capabilities = BASE_CAPABILITIES) -> None:
        super().__init__(peft_model, method, config, capabilities)
        if capabilities.low_rank_delta:
            lora_layers.declare(self.model)

    def _prompt(self, batch_size: int) -> Any:
        cfg = self.peft_model.active_peft_config
        task_ids = None
        if getattr(cfg, "num_tasks", None):  # multitask prompt tuning: tunelab trains and serves task 0
            task_ids = torch.zeros(batch_size, dtype=torch.long, device=self.peft_model.device)
        return self.peft_model.get_prompt(batch_size=batch_size, task_ids=task_ids)

    def soft_prompt(self, batch_size: int) -> torch.Tensor | None:
        return self._prompt(batch_size) if self.capabilities.soft_prompt else None  # (B, n, C)

    def prefix_cache(self, batch_size: int):
        return self._prompt(batch_size) if self.capabilities.prefix else None

    def merged_model(self) -> PreTrainedModel | None:
        """The base model with the adapter folded in, where peft can fold this type; None otherwise."""
        if not self.capabilities.changes_weights:
            return None
        try:
            return self.peft_model.merge_and_unload()
        except (NotImplementedError, ValueError, AttributeError, TypeError):
            return None

    def save_weights(self, directory: Path) -> None:
        self.peft_model.save_pretrained(str(directory), safe_serialization=True)
