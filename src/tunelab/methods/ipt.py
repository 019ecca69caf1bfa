"""Instruction prompt tuning (Sun et al. 2023, Sec. 2; Singhal et al. 2022): input = [E ; (X_demo; Y_demo) x k ; X].

A soft prompt E as in prompt tuning, followed by k natural-language demonstrations retrieved from the
train split for each input. The same retriever serves training and evaluation, so the prompt learns
to use demonstrations of the kind it will see. No library offers this: peft's CPT fixes one
demonstration set for every input.

With ``init_from`` naming a prompt run and ``train.steps=0``, this is the paper's "source-task prompt
with target-task demonstrations, no training" condition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.data.example import Example
from tunelab.methods.base import Capabilities, MethodDefaults
from tunelab.methods.prompt_tuning import PromptTuningMethodConfig, build_soft_prompt, load_soft_prompt
from tunelab.methods.transfer import Source
from tunelab.retrieval import SELECTIONS, DemoSelector, select_demos
from tunelab.validation import at_least, choice

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunelab.methods.adapters import Adapter


@dataclass
class IPTConfig(PromptTuningMethodConfig):
    k: int = at_least(1, 1)  # retrieved demonstrations per input (Sun et al. use one); k=0 is prompt_tuning
    selection: str = choice(SELECTIONS, "similar")  # random | similar (MiniLM embeddings) | bm25


class IPT(MethodDefaults):
    name = "ipt"
    Config = IPTConfig
    capabilities = Capabilities(trains=True, demonstrations=True, soft_prompt=True)

    def build(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: IPTConfig,
              train: Sequence[Example], seed: int, source: Source | None = None) -> Adapter:
        return build_soft_prompt(self, model, tokenizer, config, train, seed, source)

    def load(self, directory: Path, model: PreTrainedModel, config: IPTConfig) -> Adapter:
        return load_soft_prompt(self, directory, model, config)

    def demonstrations(self, config: IPTConfig, train: Sequence[Example], seed: int) -> DemoSelector | None:
        return select_demos(train, config.k, config.selection, seed)
