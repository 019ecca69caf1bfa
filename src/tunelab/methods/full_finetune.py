"""Full fine-tuning: every weight of the model trains. Saved as a transformers directory (safetensors)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.data.example import Example
from tunelab.errors import TunelabError
from tunelab.methods.base import Capabilities, Method, MethodConfig, MethodDefaults
from tunelab.methods.transfer import Source, require_no_prompt, starting_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunelab.methods.adapters import Adapter, FullAdapter

WEIGHTS = "model.safetensors"


@dataclass
class FullFinetuneConfig(MethodConfig):
    lr: float = 2e-5  # a typical full fine-tuning rate for ~100M-parameter decoders with AdamW


def __getattr__(name: str) -> Any:
    if name == "FullAdapter":  # an nn.Module: imported on first use (tunelab.methods.adapters)
        from tunelab.methods.adapters import FullAdapter

        return FullAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def aliased_names(model: PreTrainedModel) -> set[str]:
    """Parameter names that share storage with an earlier one (tied embeddings), which saving drops."""
    seen: set[int] = set()
    aliases = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.add(name)
        seen.add(id(p))
    return aliases


def load_full_weights(directory: Path, model: PreTrainedModel) -> PreTrainedModel:
    """Copy saved full weights into ``model`` (same architecture), checking every weight was found."""
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise TunelabError(f"{directory}: no {WEIGHTS}; pass the adapter/ directory of a full_finetune run")
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    bad = sorted(set(missing) - aliased_names(model)) + list(unexpected)
    if bad:
        raise TunelabError(f"{path} does not match the base model (e.g. {bad[:3]}); use the same --model "
                           "the run was trained with")
    return model


def build_full(method: Method, model: PreTrainedModel, config: MethodConfig,
               source: Source | None = None) -> FullAdapter:
    """Every weight trainable, starting from the ``init_from`` source's folded weights when given."""
    from tunelab.methods.adapters import FullAdapter

    require_no_prompt(source, method.name)
    model = starting_model(model, config, source)
    for p in model.parameters():
        p.requires_grad_(True)
    return FullAdapter(model, method.name, config, method.capabilities_for(config))


def load_full(method: Method, directory: Path, model: PreTrainedModel, config: MethodConfig) -> FullAdapter:
    """Saved full weights, frozen. They already include whatever ``init_from`` folded in (``whole_model``)."""
    from tunelab.methods.adapters import FullAdapter

    model = load_full_weights(directory, model)
    for p in model.parameters():
        p.requires_grad_(False)
    return FullAdapter(model, method.name, config, method.capabilities_for(config))


class FullFinetune(MethodDefaults):
    name = "full_finetune"
    Config = FullFinetuneConfig
    capabilities = Capabilities(trains=True, changes_weights=True, whole_model=True)

    def build(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: FullFinetuneConfig,
              train: Sequence[Example], seed: int, source: Source | None = None) -> Adapter:
        return build_full(self, model, config, source)

    def load(self, directory: Path, model: PreTrainedModel, config: FullFinetuneConfig) -> Adapter:
        return load_full(self, directory, model, config)
