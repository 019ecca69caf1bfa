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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.errors import ConfigError
from tunelab.methods.base import ADAPTER_META, freeze, peft_model, read_meta

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

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


def start_from(init_from: str | None, model: PreTrainedModel) -> Source | None:
    """Load the adapter ``init_from`` names onto ``model``; None when nothing is named."""
    if not init_from:
        return None
    from safetensors.torch import load_file

    from tunelab.methods.io import adapter_dir, load_adapter

    directory = adapter_dir(init_from)
    loaded = load_adapter(directory, model)  # pickles refused, options validated, as everywhere
    method = loaded.method
    assert method is not None
    if method.capabilities_for(loaded.config).changes_weights:
        merged = loaded.adapter.merged_model()
        if merged is None:
            raise ConfigError(f"{directory}: a {method.name} adapter changes weights but cannot fold them into the "
                              "base model; start from another run")
        return Source(method.name, merged, {}, directory)
    weights = load_file(str(directory / PEFT_WEIGHTS)) if (directory / PEFT_WEIGHTS).is_file() else {}
    if not weights:
        raise ConfigError(f"{directory}: a {method.name} run has no weights to start from; "
                          "use a trained run (prompt_tuning, ipt, prefix_tuning, p_tuning, lora, full_finetune, "
                          "instruction_tuning) as --init-from")
    return Source(method.name, model, weights, directory)


def base_model(directory: Path, model: PreTrainedModel) -> PreTrainedModel:
    """The model the adapter saved in ``directory`` was trained on: ``model`` plus the run folded in, if any."""
    meta_path = Path(directory) / ADAPTER_META
    folded = read_meta(Path(directory)).get("folded_from") if meta_path.is_file() else None
    source = start_from(folded, model) if folded else None
    return source.model if source is not None else model


def saved_peft_model(directory: Path, model: PreTrainedModel):
    """The peft model saved in ``directory`` on the base it was trained on (``base_model``), base weights frozen:
    how every peft-backed method loads its adapter."""
    model = base_model(directory, model)
    freeze(model)
    return peft_model(model, directory=directory)


def require_no_prompt(source: Source | None, target: str) -> None:
    """Methods that cannot reuse a prompt say so, rather than silently ignoring it."""
    if source is not None and source.weights:
        raise ConfigError(f"{target} cannot start from a {source.method} prompt ({source.directory}); "
                          f"start {target} from a lora / full_finetune / instruction_tuning run, or start "
                          "prompt_tuning / ipt from this one")
