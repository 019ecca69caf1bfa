"""A toy method, written the way a contributor adds one: this module plus one registry line.

A learned soft prompt of its own (no peft) shown together with one retrieved demonstration per input:
it declares ``soft_prompt`` and ``demonstrations`` and nothing else, so every part of tunelab that
must treat it right (training, saving, the one loader, evaluation, the server's shared batches with
demonstrations, the grid) can only do so by asking its capabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.data.example import Example
from tunelab.methods.base import Adapter, Capabilities, MethodConfig, MethodDefaults, freeze
from tunelab.methods.transfer import Source
from tunelab.retrieval import DemoSelector, select_demos

WEIGHTS = "toy_prompt.safetensors"


@dataclass
class ToyConfig(MethodConfig):
    lr: float = 5e-2
    n: int = 3  # virtual tokens
    k: int = 1  # BM25-retrieved demonstrations per input


class ToyAdapter(Adapter):
    def __init__(self, model, config: ToyConfig, prompt: torch.Tensor) -> None:
        super().__init__(model, "toy", config, Toy.capabilities)
        self.prompt = nn.Parameter(prompt)  # (n, C)

    def soft_prompt(self, batch_size: int) -> torch.Tensor:
        return self.prompt.unsqueeze(0).expand(batch_size, -1, -1)  # (B, n, C)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.prompt]

    def save_weights(self, directory: Path) -> None:
        save_file({"prompt": self.prompt.detach().contiguous()}, str(Path(directory) / WEIGHTS))


class Toy(MethodDefaults):
    name = "toy"
    Config = ToyConfig
    capabilities = Capabilities(trains=True, soft_prompt=True, demonstrations=True)

    def build(self, model, tokenizer, config: ToyConfig, train: Sequence[Example], seed: int,
              source: Source | None = None) -> Adapter:
        freeze(model)
        table = model.get_input_embeddings().weight.detach()
        generator = torch.Generator().manual_seed(seed)
        return ToyAdapter(model, config, table[torch.randint(len(table), (config.n,), generator=generator)].clone())

    def load(self, directory: Path, model, config: ToyConfig) -> Adapter:
        freeze(model)
        return ToyAdapter(model, config, load_file(str(Path(directory) / WEIGHTS))["prompt"])

    def demonstrations(self, config: ToyConfig, train: Sequence[Example], seed: int) -> DemoSelector | None:
        return select_demos(train, config.k, "bm25", seed)  # by content: the same for a served request
