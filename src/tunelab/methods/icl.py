"""In-context learning: input = [(X_demo; Y_demo) x k ; X], no training (Sun et al. 2023, Sec. 2).

k = 0 is plain zero-shot prompting with the task instruction.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.data.example import Example
from tunelab.errors import ConfigError
from tunelab.methods.base import Adapter, DemoSelector, MethodConfig, freeze

SELECTIONS = ("random",)


@dataclass
class ICLConfig(MethodConfig):
    k: int = 1  # demonstrations per input; 0 = zero-shot
    selection: str = "random"  # how demonstrations are chosen from the train split

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ConfigError(f"method.k must be >= 0, got {self.k}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"method.selection={self.selection!r}; choose one of {', '.join(SELECTIONS)}")


class FrozenAdapter(Adapter):
    """The base model untouched: nothing to train, nothing to save."""

    def save_weights(self, directory: Path) -> None:
        return None


def random_demos(train: Sequence[Example], k: int, seed: int) -> DemoSelector:
    """k demonstrations drawn per example, seeded by the example id; never the example itself."""

    def select(example: Example) -> list[Example]:
        rng = random.Random(f"{seed}:{example.id}")
        pool = [e for e in rng.sample(list(train), min(len(train), k + 1)) if e.id != example.id]
        return pool[:k]

    return select


class ICL:
    name = "icl"
    Config = ICLConfig
    trains = False

    def build(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ICLConfig,
              train: Sequence[Example], seed: int) -> Adapter:
        freeze(model)
        return FrozenAdapter(model, self.name, config)

    def load(self, directory: Path, model: PreTrainedModel, config: ICLConfig) -> Adapter:
        freeze(model)
        return FrozenAdapter(model, self.name, config)

    def demonstrations(self, config: ICLConfig, train: Sequence[Example], seed: int) -> DemoSelector | None:
        return random_demos(train, config.k, seed) if config.k > 0 else None
