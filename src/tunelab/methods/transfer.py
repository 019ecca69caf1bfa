"""Starting a method from another run's adapter (``method.init_from`` / ``tunelab run --init-from DIR``).

Two cases, decided by the source method's ``Capabilities.changes_weights``:
- the source folds into the base weights (LoRA, full fine-tuning, instruction tuning): the new method
  is built on base + source, e.g. instruction-tune with LoRA, then prompt-tune on top;
- the source is a prompt (prompt tuning, IPT, prefix tuning, P-tuning): the model is unchanged and the
  source's saved tensors are handed to the new method, which initialises its own parameters from them
  (soft-prompt transfer, Vu et al. 2022 "SPoT"). With ``train.steps=0`` that is a source-task prompt
  used as is, e.g. by ``ipt`` with target-task demonstrations and no training.

A folded source is recorded (``folded_from`` in the saved adapter's metadata) and loading folds it in
again, so that directory must stay where it was; a transferred prompt is saved whole and needs no source.

The source is loaded by ``tunelab.methods.io`` (``build_adapter`` for ``init_from``, ``load_adapter`` for a
recorded ``folded_from``), the one loader that knows every method, and handed to the new method's ``build``
(``source``) or ``load`` (its ``model``): a method module never loads another method's adapter itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.errors import ConfigError
from tunelab.methods.base import Capabilities, MethodConfig, freeze, peft_model

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from tunelab.methods.adapters import Adapter

PEFT_WEIGHTS = "adapter_model.safetensors"


@dataclass
class Source:
    """What a method starts from: the base to build on, and the source's tensors when it did not fold."""

    method: str
    model: PreTrainedModel
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    directory: Path | None = None

    @property
    def folded_from(self) -> str | None:
        """The source directory when it was folded into the weights (to record in the adapter's metadata)."""
        return None if self.weights else str(self.directory)

    def prompt(self) -> torch.Tensor | None:
        """The source's saved prompt tensor (n, width), peft's ``prompt_embeddings``; None if it has none."""
        return self.weights.get("prompt_embeddings")


def source_of(directory: Path, method: str, capabilities: Capabilities, adapter: Adapter,
              model: PreTrainedModel) -> Source:
    """What a method starts from, given the source adapter in ``directory`` loaded onto ``model``
    (``tunelab.methods.io.start_from`` loads it): its weights folded in, or its saved tensors."""
    from safetensors.torch import load_file

    if capabilities.changes_weights:
        merged = adapter.merged_model()
        if merged is None:
            raise ConfigError(f"{directory}: a {method} adapter changes weights but cannot fold them into the "
                              "base model; start from another run")
        return Source(method, merged, {}, directory)
    weights = load_file(str(directory / PEFT_WEIGHTS)) if (directory / PEFT_WEIGHTS).is_file() else {}
    if not weights:
        raise ConfigError(f"{directory}: a {method} run has no weights to start from; "
                          "use a trained run (prompt_tuning, ipt, prefix_tuning, p_tuning, lora, full_finetune, "
                          "instruction_tuning) as --init-from")
    return Source(method, model, weights, directory)


def starting_model(model: PreTrainedModel, config: MethodConfig, source: Source | None) -> PreTrainedModel:
    """The model a method builds on: ``model``, or the source's (``model`` with the source folded in) when
    ``config.init_from`` was loaded. A method's ``build`` gets the source from ``io.build_adapter``."""
    if config.init_from and source is None:
        raise TypeError(f"{config.name}: method.init_from={config.init_from!r} was not loaded; build through "
                        "tunelab.methods.io.build_adapter, which loads it and passes it to build as `source`")
    return source.model if source is not None else model


def saved_peft_model(directory: Path, model: PreTrainedModel):
    """The peft model saved in ``directory`` on ``model`` (the base it was trained on: ``io.load_adapter`` folds a
    recorded ``init_from`` in first), base weights frozen: how every peft-backed method loads its adapter."""
    freeze(model)
    return peft_model(model, directory=directory)


def require_no_prompt(source: Source | None, target: str) -> None:
    """Methods that cannot reuse a prompt say so, rather than silently ignoring it."""
    if source is not None and source.weights:
        raise ConfigError(f"{target} cannot start from a {source.method} prompt ({source.directory}); "
                          f"start {target} from a lora / full_finetune / instruction_tuning run, or start "
                          "prompt_tuning / ipt from this one")
