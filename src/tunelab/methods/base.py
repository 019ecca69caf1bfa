"""What every method provides: a ``Method`` (build/load an ``Adapter``) and its config dataclass.

An ``Adapter`` is the base model plus one method's trainable pieces. It exposes only what the
shared forward path in ``tunelab.modeling`` needs (a soft prompt and/or a key/value prefix),
so training, evaluation and serving never branch on the method.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.config import MethodConfig  # the base of every method's options; lives with the other configs
from tunelab.data.example import Example
from tunelab.formatting import DemoSelector

if TYPE_CHECKING:
    from tunelab.data import TaskData
from tunelab.errors import TunelabError

ADAPTER_META = "tunelab_adapter.json"


def peft_model(model: PreTrainedModel, peft_config: Any = None, directory: Path | str | None = None) -> Any:
    """``get_peft_model`` (a new adapter) or ``PeftModel.from_pretrained`` (a saved one), without the
    transformers FutureWarning that peft's own constructor triggers (``is_gradient_checkpointing``) on
    every cell: users cannot act on it."""
    from peft import PeftModel, get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if directory is not None:
            return PeftModel.from_pretrained(model, str(directory))
        return get_peft_model(model, peft_config)




@dataclass(frozen=True)
class Capabilities:
    """What the rest of tunelab needs to know about a method, declared once on the method itself.

    Serving, generation, transfer, the report and the claims ask these instead of matching method names,
    so a new method is handled correctly everywhere by declaring them in its own module.
    """

    trains: bool = False  # has parameters to optimise (ICL and discrete prompts do not)
    changes_weights: bool = False  # patches or replaces base weights (LoRA, full FT): a private model copy
    # when served, batches of its own, folds into the base model when another run starts from it
    demonstrations: bool = False  # shows retrieved demonstrations with each input (ICL, IPT)
    soft_prompt: bool = False  # learned input embeddings before the text (prompt tuning, IPT, P-tuning)
    prefix: bool = False  # learned per-layer key/value prefix (prefix tuning)
    rewrites_input: bool = False  # changes the example's text before layout (a discrete prompt)
    low_rank_delta: bool = False  # its weight change can be a low-rank delta on named Linear modules (LoRA):
    # served as rows of the shared batch when ``Method.low_rank_delta`` returns one (serve.lora_rows)

    def describe(self) -> str:
        """The true flags, comma-separated (``tunelab ls methods``)."""
        names = [f.name for f in dataclass_fields(self) if getattr(self, f.name)]
        return ", ".join(names) or "-"


@dataclass
class LowRankDelta:
    """A weight change ``W x + scaling * B (A x)`` on named ``nn.Linear`` modules of the base model (LoRA,
    Hu et al. 2021, Sec. 4.1), as plain tensors: what serving needs to apply it per row of a shared batch."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A (r, in), B (out, r))
    scaling: float  # alpha / r (alpha / sqrt(r) with rsLoRA)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.factors.values())


BASE_CAPABILITIES = Capabilities()  # the bare base model: nothing added, nothing changed


class Adapter(nn.Module):
    """A frozen-or-not base model plus a method's parameters, seen through one small interface."""

    def __init__(self, model: PreTrainedModel, method: str, config: MethodConfig) -> None:
        super().__init__()
        self.model = model  # the transformers model to call (LoRA layers, if any, are patched in)
        self.method = method
        self.config = config
        self.folded_from: str | None = None  # adapter folded into the base weights (init_from); loads fold it again

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Training loss (mean over label tokens) and label count; a forward, so DDP/FSDP can wrap the adapter."""
        from tunelab.modeling import causal_lm_loss

        return causal_lm_loss(self, input_ids, attention_mask, labels)

    @property
    def capabilities(self) -> Capabilities:
        """The capabilities of the method that built this adapter (none for the bare base model)."""
        from tunelab.methods import METHODS

        method = METHODS.get(self.method)
        return method.capabilities if method is not None else BASE_CAPABILITIES

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


class Method(Protocol):
    """One adaptation method. Implementations live one per module in ``tunelab.methods``."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    capabilities: ClassVar[Capabilities]

    @property
    def trains(self) -> bool: ...

    def build(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: MethodConfig,
              train: Sequence[Example], seed: int) -> Adapter: ...

    def load(self, directory: Path, model: PreTrainedModel, config: MethodConfig) -> Adapter: ...

    def demonstrations(self, config: MethodConfig, train: Sequence[Example], seed: int) -> DemoSelector | None: ...

    def prepare_data(self, config: MethodConfig, task: TaskData, seed: int) -> TaskData: ...

    def low_rank_delta(self, directory: Path, config: MethodConfig) -> LowRankDelta | None: ...


class MethodDefaults:
    """Defaults for the optional parts of ``Method``: no demonstrations, data used as loaded."""

    capabilities: ClassVar[Capabilities] = BASE_CAPABILITIES

    @property
    def trains(self) -> bool:
        """Whether the method has parameters to optimise (``capabilities.trains``)."""
        return self.capabilities.trains

    def demonstrations(self, config: MethodConfig, train: Sequence[Example], seed: int) -> DemoSelector | None:
        return None

    def prepare_data(self, config: MethodConfig, task: TaskData, seed: int) -> TaskData:
        """Adjust the task's splits before caps apply (instruction tuning holds out whole tasks)."""
        return task

    def low_rank_delta(self, directory: Path, config: MethodConfig) -> LowRankDelta | None:
        """The saved adapter's weight change as a ``LowRankDelta`` (methods declaring
        ``Capabilities.low_rank_delta``); None: it is not one and must be served on a private model copy."""
        return None


class PeftAdapter(Adapter):
    """An adapter whose trainable part lives in a peft model wrapped around the base model."""

    def __init__(self, peft_model, method: str, config: MethodConfig) -> None:
        super().__init__(peft_model.get_base_model(), method, config)
        self.peft_model = peft_model


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def write_meta(directory: Path, adapter: Adapter, extra: dict[str, Any]) -> None:
    """The JSON beside the weights that says which method and options produced them."""
    from tunelab.paths import atomic_write_json

    atomic_write_json(directory / ADAPTER_META, {"method": adapter.method, "config": asdict(adapter.config),
                                                 "folded_from": adapter.folded_from, **extra})


def read_meta(directory: Path) -> dict[str, Any]:
    path = Path(directory) / ADAPTER_META
    if not path.is_file():
        raise TunelabError(f"{directory} is not a tunelab adapter (no {ADAPTER_META}); "
                           "pass the directory a `tunelab run --out DIR` wrote, i.e. DIR/adapter")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TunelabError(f"{path}: invalid JSON ({exc.msg})") from None
