"""Discrete-prompt baseline: pick the best instruction among candidates on a dev split, train nothing.

Candidates are user-given (``method.candidates``) or paraphrase templates of the task's own
instruction. ``{instruction}`` in a candidate stands for the example's own instruction, so a
candidate can also wrap it. Each candidate is scored on ``n_dev`` dev examples (the task's dev
split when it has one, else the train split, which this method never trains on) by the reference's
mean per-token log-likelihood (``score=loglik``, cheap, no decoding) or by a generation metric
(``score=metric``). The winner replaces every example's instruction in evaluation
(``Adapter.rewrite``); all candidate scores are saved beside it.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.data import TaskData, default_metrics
from tunelab.data.example import Example
from tunelab.errors import ConfigError, TunelabError
from tunelab.formatting import TEMPLATES, fill_instruction
from tunelab.methods.base import Capabilities, MethodConfig, MethodDefaults, freeze, no_grad
from tunelab.sections import EvalConfig
from tunelab.validation import at_least, choice

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunelab.methods.adapters import Adapter
    from tunelab.methods.adapters import DiscretePromptAdapter as DiscretePromptAdapter
    from tunelab.methods.transfer import Source

SCORES = ("loglik", "metric")
PARAPHRASES = (
    "{instruction}",
    "Task: {instruction}",
    "{instruction} Reply with the answer only.",
    "Read the input carefully. {instruction}",
    "You are an expert assistant. {instruction}",
    "Instruction: {instruction}\nBe accurate and concise.",
)


@dataclass
class DiscretePromptConfig(MethodConfig):
    candidates: list[str] | None = None  # instructions to choose from; None = PARAPHRASES of the task's own
    n_dev: int = at_least(1, 32)  # dev examples each candidate is scored on
    score: str = choice(SCORES, "loglik")  # loglik (reference log-likelihood) | metric (generate, then the task's first metric)
    template: str = choice(TEMPLATES, "auto")  # prompt layout while scoring; keep it equal to data.template
    batch_size: int = at_least(1, 8)

    def __post_init__(self) -> None:
        if self.candidates is not None and not self.candidates:
            raise ConfigError("method.candidates is empty; give at least one instruction or drop the key")
        if self.init_from:
            raise ConfigError("method.init_from: discrete_prompt starts from the base model; "
                              "drop method.init_from / --init-from")


fill = fill_instruction  # ``example`` with ``candidate`` as its instruction ({instruction} = the example's own)


def __getattr__(name: str) -> Any:
    if name == "DiscretePromptAdapter":  # an nn.Module: imported on first use (tunelab.methods.adapters)
        from tunelab.methods.adapters import DiscretePromptAdapter

        return DiscretePromptAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@no_grad
def loglik_score(adapter: Adapter, tokenizer: PreTrainedTokenizerBase, dev: Sequence[Example], template: str,
                 max_length: int, batch_size: int) -> float:
    """Mean over dev examples of the reference's mean per-token log-probability (higher is better)."""
    import torch

    from tunelab.formatting import build_prompt, encode, target_text
    from tunelab.modeling import mask_for, pad_batch, token_logprobs

    per_example: list[float] = []
    for start in range(0, len(dev), batch_size):
        chunk = [encode(tokenizer, build_prompt(tokenizer, template, e), target_text(template, e), max_length)
                 for e in dev[start:start + batch_size]]
        ids = [c.input_ids for c in chunk]
        device = adapter.model.get_input_embeddings().weight.device
        logprobs, rows = token_logprobs(adapter, pad_batch(ids, tokenizer.pad_token_id).to(device),
                                        mask_for(ids).to(device), pad_batch([c.labels for c in chunk], -100).to(device))
        sums = logprobs.new_zeros(len(chunk), dtype=torch.float).index_add_(0, rows, logprobs.float())  # on its device
        counts = torch.zeros_like(sums).index_add_(0, rows, torch.ones_like(logprobs, dtype=torch.float))
        per_example += (sums / counts.clamp(min=1)).tolist()
    return sum(per_example) / len(per_example)


def metric_score(adapter: Adapter, tokenizer: PreTrainedTokenizerBase, dev: Sequence[Example],
                 template: str) -> float:
    """The task's first default metric on greedy generations for the dev examples."""
    from tunelab.evaluate import evaluate

    name = default_metrics(list(dev))[0]
    return evaluate(adapter, tokenizer, template, dev, [name], EvalConfig()).metrics[name]


class DiscretePrompt(MethodDefaults):
    name = "discrete_prompt"
    Config = DiscretePromptConfig
    capabilities = Capabilities(rewrites_input=True)

    def prepare_data(self, config: DiscretePromptConfig, task: TaskData, seed: int) -> TaskData:
        """Candidates are scored on the dev split when the task has one (passed to ``build`` as its examples)."""
        return dataclasses.replace(task, train=task.dev) if task.dev else task

    def build(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: DiscretePromptConfig,
              train: Sequence[Example], seed: int, source: Source | None = None) -> Adapter:
        if not train:
            raise TunelabError("discrete_prompt needs dev (or train) examples to score candidates on")
        from tunelab.formatting import resolve_template
        from tunelab.methods.adapters import DiscretePromptAdapter

        freeze(model)
        template = resolve_template(config.template, tokenizer)
        dev = random.Random(f"{seed}:dev").sample(list(train), min(config.n_dev, len(train)))
        candidates = list(dict.fromkeys(config.candidates or PARAPHRASES))
        scores = {}
        for candidate in candidates:
            probe = DiscretePromptAdapter(model, self.name, config, self.capabilities, candidate, {})
            filled = [probe.rewrite(e) for e in dev]
            scores[candidate] = round(metric_score(probe, tokenizer, filled, template) if config.score == "metric"
                                      else loglik_score(probe, tokenizer, filled, template, 1024,
                                                        config.batch_size), 5)
        best = max(candidates, key=lambda c: (scores[c], -candidates.index(c)))  # ties: the earlier candidate
        return DiscretePromptAdapter(model, self.name, config, self.capabilities, best, scores)

    def load(self, directory: Path, model: PreTrainedModel, config: DiscretePromptConfig) -> Adapter:
        from tunelab.methods.adapters import CHOICE_FILE, DiscretePromptAdapter

        path = Path(directory) / CHOICE_FILE
        if not path.is_file():
            raise TunelabError(f"{directory}: no {CHOICE_FILE}; pass the adapter/ directory of a discrete_prompt run")
        saved = json.loads(path.read_text())
        freeze(model)
        return DiscretePromptAdapter(model, self.name, config, self.capabilities, saved["instruction"],
                                     saved["scores"])
