"""What every method provides: a ``Method`` (build/load an ``Adapter``) and its config dataclass.

An ``Adapter`` is the base model plus one method's trainable pieces. It exposes only what the
shared forward path in ``tunelab.modeling`` needs (a soft prompt and/or a key/value prefix),
so training, evaluation and serving never branch on the method.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from tunelab.data.example import Example
from tunelab.errors import TunelabError
from tunelab.validation import above

if TYPE_CHECKING:  # torch, transformers and peft load where a model is built, not with the registry
    import torch
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunelab.data import TaskData
    from tunelab.formatting import DemoSelector
    from tunelab.methods.adapters import Adapter
    from tunelab.methods.adapters import PeftAdapter as PeftAdapter
    from tunelab.methods.transfer import Source

ADAPTER_META = "tunelab_adapter.json"


@dataclass
class MethodConfig:
    """Options shared by all methods; each method subclasses this with its own fields (``tunelab.methods``).

    An instance built by ``tunelab.methods.method_config`` also knows its method's registry ``name`` and
    the options as they were given (``as_given``): that is what ``to_dict`` writes (result.json) and
    what ``tunelab compare`` hashes, so adding an option with a default changes no stored cell.
    Neither is a dataclass field, so ``asdict`` (adapter metadata, checkpoint identity) is unchanged.
    """

    lr: float = above(0, 1e-3)  # learning rate when train.lr is not set
    init_from: str | None = None  # a run (or its adapter/) to start from; see tunelab.methods.transfer

    method_name: ClassVar[str] = ""  # the method declaring this class as its Config (MethodDefaults sets it)

    def bind(self, name: str, given: dict[str, Any]) -> MethodConfig:
        """Record the registry name and the options as given (done by ``tunelab.methods.method_config``)."""
        self.__dict__["_name"], self.__dict__["_given"] = name, copy.deepcopy(given)
        return self

    @property
    def name(self) -> str:
        """The method's registry name (``icl``, ``lora``, ...)."""
        return self.__dict__.get("_name", self.method_name)  # built directly, not from a spec: its class's method

    def as_given(self) -> dict[str, Any]:
        """``{"name": ..., **options}`` with only the options that were given (or differ from the defaults)."""
        given = self.__dict__.get("_given")
        if given is None:
            defaults = type(self)()
            given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                     if getattr(self, f.name) != getattr(defaults, f.name)}
        return {"name": self.name, **copy.deepcopy(given)}


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
    whole_model: bool = False  # saves every weight of the model (full fine-tuning): a folded ``init_from`` is in
    # them, so loading starts from the bare base model and needs no source (methods.io.load_adapter)

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

    @property
    def rank(self) -> int:
        """The largest rank over its modules (what a LoRA slot must hold)."""
        return max(a.shape[0] for a, _ in self.factors.values())


BASE_CAPABILITIES = Capabilities()  # the bare base model: nothing added, nothing changed


class Method(Protocol):
    """One adaptation method. Implementations live one per module in ``tunelab.methods``."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    capabilities: ClassVar[Capabilities]

    @property
    def trains(self) -> bool: ...

    def build(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: MethodConfig,
              train: Sequence[Example], seed: int, source: Source | None = None) -> Adapter:
        """A fresh adapter on ``model``; ``source``: the run ``config.init_from`` names, already loaded
        (``tunelab.methods.io.build_adapter`` loads it and calls this; see ``tunelab.methods.transfer``)."""
        ...

    def load(self, directory: Path, model: PreTrainedModel, config: MethodConfig) -> Adapter:
        """The adapter saved in ``directory`` on ``model``, the base it was trained on (a folded ``init_from``
        already folded in by ``tunelab.methods.io.load_adapter``, unless ``Capabilities.whole_model``)."""
        ...

    def demonstrations(self, config: MethodConfig, train: Sequence[Example], seed: int) -> DemoSelector | None: ...

    def prepare_data(self, config: MethodConfig, task: TaskData, seed: int) -> TaskData: ...

    def low_rank_delta(self, directory: Path, config: MethodConfig) -> LowRankDelta | None: ...

    def capabilities_for(self, config: MethodConfig) -> Capabilities: ...

    def parse_options(self, options: dict[str, Any]) -> dict[str, Any]: ...


class MethodDefaults:
    """Defaults for the optional parts of ``Method``: no demonstrations, data used as loaded."""

    capabilities: ClassVar[Capabilities] = BASE_CAPABILITIES

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Config" in cls.__dict__:  # a config built directly (``LoraMethodConfig(r=4)``) still knows its method
            cls.Config.method_name = cls.name  # type: ignore[attr-defined]

    @property
    def trains(self) -> bool:
        """Whether the method has parameters to optimise (``capabilities.trains``)."""
        return self.capabilities.trains

    def capabilities_for(self, config: MethodConfig) -> Capabilities:
        """The capabilities with these options: ``capabilities`` for every method whose facts do not depend on
        its options (the generic peft method's depend on ``peft_type``). Ask this wherever a config is at hand."""
        return self.capabilities

    def parse_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The options as given (without ``name``), shaped as ``Config`` takes them (the generic peft method
        nests peft's own fields under ``options``)."""
        return options

    def demonstrations(self, config: MethodConfig, train: Sequence[Example], seed: int) -> DemoSelector | None:
        return None

    def prepare_data(self, config: MethodConfig, task: TaskData, seed: int) -> TaskData:
        """Adjust the task's splits before caps apply (instruction tuning holds out whole tasks)."""
        return task

    def low_rank_delta(self, directory: Path, config: MethodConfig) -> LowRankDelta | None:
        """The saved adapter's weight change as a ``LowRankDelta`` (methods declaring
        ``Capabilities.low_rank_delta``); None: it is not one and must be served on a private model copy."""
        return None


def __getattr__(name: str) -> Any:
    """``Adapter`` and ``PeftAdapter`` are ``nn.Module`` classes (``tunelab.methods.adapters``): imported on first use."""
    if name in ("Adapter", "PeftAdapter"):
        from tunelab.methods import adapters

        return getattr(adapters, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def no_grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``@torch.no_grad()`` for method modules, which import torch at the point of use, not at import."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


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
