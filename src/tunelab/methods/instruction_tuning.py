"""Instruction tuning (Wei et al. 2022, "Finetuned Language Models Are Zero-Shot Learners"; Wang et al.
2022, Super-NaturalInstructions): train on a mixture of many tasks phrased as natural-language
instructions, judge on tasks never seen in training.

The regime, not a new parameterisation: the weights train with LoRA or in full (``method.weights``).
``prepare_data`` guarantees the unseen-task protocol: whole tasks are held out, training keeps only
the other tasks, evaluation only the held-out ones. The mixture can be capped per task
(examples-proportional mixing with a cap, Raffel et al. 2020, Sec. 3.5.2, via ``data.mixtures``); the
training mixture is shuffled and the evaluation rows interleaved task by task, so ``data.max_train``
and ``data.max_eval`` keep every task represented.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.data import TaskData
from tunelab.data.example import Example
from tunelab.data.mixtures import by_task, mix
from tunelab.errors import ConfigError, DataError
from tunelab.methods.base import Capabilities, LowRankDelta, MethodDefaults
from tunelab.methods.full_finetune import build_full, load_full
from tunelab.methods.lora import LoraMethodConfig, build_lora, load_lora, lora_delta
from tunelab.methods.transfer import Source
from tunelab.validation import at_least, choice

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunelab.methods.adapters import Adapter

WEIGHTS = ("lora", "full")
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}
HELD_OUT_SEED = "tunelab:held_out"  # fixed, so every seed and method sees the same unseen tasks


@dataclass
class InstructionTuningConfig(LoraMethodConfig):
    lr: float | None = None  # None = 2e-4 with LoRA, 2e-5 with full weights
    weights: str = choice(WEIGHTS, "lora")  # lora | full
    held_out_tasks: list[str] | None = None  # tasks kept for evaluation; None = n_held_out drawn by a fixed seed
    n_held_out: int = at_least(1, 6)  # tasks held out when held_out_tasks is not given and eval shares tasks with train
    max_per_task: int | None = at_least(1, None)  # cap on training examples per task (None = all)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr is None:
            self.lr = DEFAULT_LR[self.weights]


def interleave(examples: Sequence[Example]) -> list[Example]:
    """Round-robin over tasks (sorted by name), each task's rows in their original order."""
    by_task: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_task[e.task].append(e)
    queues = [by_task[t] for t in sorted(by_task)]
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def held_out(config: InstructionTuningConfig, train_tasks: set[str], eval_tasks: set[str]) -> set[str]:
    """The tasks evaluation keeps and training never sees."""
    if config.held_out_tasks:
        unknown = sorted(set(config.held_out_tasks) - eval_tasks)
        if unknown:
            raise ConfigError(f"method.held_out_tasks: {unknown[0]!r} has no evaluation rows; "
                              f"tasks in the eval split: {', '.join(sorted(eval_tasks))}")
        return set(config.held_out_tasks)
    if eval_tasks.isdisjoint(train_tasks):
        return eval_tasks  # the data already separates seen and unseen tasks
    if config.n_held_out >= len(train_tasks):
        raise ConfigError(f"method.n_held_out={config.n_held_out} leaves no training task "
                          f"(the mixture has {len(train_tasks)})")
    return set(random.Random(HELD_OUT_SEED).sample(sorted(eval_tasks), min(config.n_held_out, len(eval_tasks))))


class InstructionTuning(MethodDefaults):
    name = "instruction_tuning"
    Config = InstructionTuningConfig
    capabilities = Capabilities(trains=True, changes_weights=True, low_rank_delta=True)  # with weights=lora

    def capabilities_for(self, config: InstructionTuningConfig) -> Capabilities:
        """With ``weights=full``, the saved weights are the whole model (``whole_model``), as full fine-tuning's."""
        return replace(self.capabilities, whole_model=config.weights == "full")

    def low_rank_delta(self, directory: Path, config: InstructionTuningConfig) -> LowRankDelta | None:
        return lora_delta(directory) if config.weights == "lora" else None

    def prepare_data(self, config: InstructionTuningConfig, task: TaskData, seed: int) -> TaskData:
        train_tasks = {e.task for e in task.train}
        if len(train_tasks) < 2:
            raise DataError(f"instruction tuning needs a mixture of tasks (rows with a `task` field), but "
                            f"{task.name!r} has {len(train_tasks)}; use e.g. --task ../shared/data/super_ni")
        held = held_out(config, train_tasks, {e.task for e in task.eval})
        config.held_out_tasks = sorted(held)  # recorded in the adapter's metadata
        train = mix(by_task([e for e in task.train if e.task not in held]), cap=config.max_per_task, seed=seed)
        return replace(task, train=train, eval=interleave([e for e in task.eval if e.task in held]))

    def build(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: InstructionTuningConfig,
              train: Sequence[Example], seed: int, source: Source | None = None) -> Adapter:
        if config.weights == "lora":
            return build_lora(self, model, config, source)
        return build_full(self, model, config, source)

    def load(self, directory: Path, model: PreTrainedModel, config: InstructionTuningConfig) -> Adapter:
        if config.weights == "lora":
            return load_lora(self, directory, model, config)
        return load_full(self, directory, model, config)
