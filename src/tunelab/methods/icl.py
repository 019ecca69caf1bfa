"""In-context learning: input = [(X_demo; Y_demo) x k ; X], no training (Sun et al. 2023, Sec. 2).

k = 0 is plain zero-shot prompting with the task instruction. Demonstrations are drawn from the
train split at random, by embedding similarity, or by BM25 (``tunelab.retrieval``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.data.example import Example
from tunelab.errors import ConfigError
from tunelab.methods.base import Capabilities, MethodConfig, MethodDefaults, freeze
from tunelab.retrieval import SELECTIONS, DemoSelector, select_demos
from tunelab.validation import at_least, choice

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunelab.methods.adapters import Adapter
    from tunelab.methods.adapters import FrozenAdapter as FrozenAdapter
    from tunelab.methods.transfer import Source


@dataclass
class ICLConfig(MethodConfig):
    k: int = at_least(0, 1)  # demonstrations per input; 0 = zero-shot
    selection: str = choice(SELECTIONS, "random")  # random | similar (MiniLM embeddings) | bm25

    def __post_init__(self) -> None:
        if self.init_from:
            raise ConfigError("method.init_from: icl has no weights to start from; drop method.init_from / --init-from")


def __getattr__(name: str) -> Any:
    if name == "FrozenAdapter":  # an nn.Module: imported on first use (tunelab.methods.adapters)
        from tunelab.methods.adapters import FrozenAdapter

        return FrozenAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ICL(MethodDefaults):
    name = "icl"
    Config = ICLConfig
    capabilities = Capabilities(demonstrations=True)

    def build(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ICLConfig,
              train: Sequence[Example], seed: int, source: Source | None = None) -> Adapter:
        from tunelab.methods.adapters import FrozenAdapter

        freeze(model)  # no source: ICLConfig refuses init_from
        return FrozenAdapter(model, self.name, config, self.capabilities)

    def load(self, directory: Path, model: PreTrainedModel, config: ICLConfig) -> Adapter:
        from tunelab.methods.adapters import FrozenAdapter

        freeze(model)
        return FrozenAdapter(model, self.name, config, self.capabilities)

    def demonstrations(self, config: ICLConfig, train: Sequence[Example], seed: int) -> DemoSelector | None:
        return select_demos(train, config.k, config.selection, seed)
