"""Prompt tuning (Lester et al. 2021): input = [E ; X], E = n trainable embeddings, model frozen.

peft holds the parameters and writes the PEFT format (so ``PeftModel.from_pretrained`` loads our
adapters); the forward pass is tunelab's, which keeps positions right under left padding.
With ``init_from`` naming a prompt run the prompt starts from that prompt (soft-prompt transfer);
naming a LoRA / full-weights run, the prompt is trained on that model (see ``methods.transfer``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.data.example import Example
from tunelab.errors import ConfigError
from tunelab.methods.base import Capabilities, Method, MethodConfig, MethodDefaults, freeze, peft_model
from tunelab.methods.transfer import Source, saved_peft_model, starting_model
from tunelab.validation import at_least, choice

if TYPE_CHECKING:
    import torch
    from peft import PromptTuningConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunelab.methods.adapters import Adapter, SoftPromptAdapter

INITS = ("random", "vocab", "text")


@dataclass
class PromptTuningMethodConfig(MethodConfig):
    lr: float = 3e-2  # soft prompts need far larger steps than weights (Lester et al. use 0.3 w/ Adafactor)
    num_virtual_tokens: int = at_least(1, 20)
    init: str = choice(INITS, "text")  # random | vocab (sampled vocabulary rows) | text (tiled embeddings of init_text)
    init_text: str | None = None  # None = the task instruction of the first training example


def __getattr__(name: str) -> Any:
    if name == "SoftPromptAdapter":  # an nn.Module: imported on first use (tunelab.methods.adapters)
        from tunelab.methods.adapters import SoftPromptAdapter

        return SoftPromptAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def transferred_prompt(source: Source, n: int, width: int) -> torch.Tensor:
    """(n, C) prompt of a source run (soft-prompt transfer), checked against this prompt's shape."""
    prompt = source.prompt()
    if prompt is None or prompt.shape[1] != width:
        got = "no soft prompt" if prompt is None else f"a prompt of width {prompt.shape[1]}"
        raise ConfigError(f"method.init_from: the {source.method} run {source.directory} has {got}, not "
                          f"(n, {width}) input embeddings; start from a prompt_tuning or ipt run")
    if prompt.shape[0] != n:
        raise ConfigError(f"method.init_from: the source prompt has {prompt.shape[0]} virtual tokens; "
                          f"set method.num_virtual_tokens={prompt.shape[0]}")
    return prompt.clone()


def init_text(config: PromptTuningMethodConfig, train: Sequence[Example]) -> str:
    """The text an ``init=text`` prompt starts from: ``init_text``, else the first training instruction."""
    return config.init_text or (train[0].instruction if train else "") or "Answer the question."


def record_init(peft_config: PromptTuningConfig, config: PromptTuningMethodConfig, train: Sequence[Example],
                tokenizer_name: str, transferred: bool) -> None:
    """Make adapter_config.json name the initialisation actually used, in peft's terms (``TEXT`` with its
    text, ``SAMPLE_VOCAB``, ``RANDOM``). A prompt transferred from another run (``init_from``) has no peft
    name; it stays ``RANDOM`` there, and tunelab_adapter.json and the model card name the source run.
    Set after ``get_peft_model`` so peft does not initialise the prompt itself (tunelab already has)."""
    from peft import PromptTuningInit

    if transferred or config.init == "random":
        return
    if config.init == "vocab":
        peft_config.prompt_tuning_init = PromptTuningInit.SAMPLE_VOCAB
        return
    peft_config.prompt_tuning_init = PromptTuningInit.TEXT
    peft_config.prompt_tuning_init_text = init_text(config, train)
    # peft requires a tokenizer with TEXT; run.py rewrites a local path to the portable base-model name
    peft_config.tokenizer_name_or_path = tokenizer_name or "base_model"


def initial_prompt(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: PromptTuningMethodConfig,
                   train: Sequence[Example], seed: int, source: Source | None = None) -> torch.Tensor:
    """(n, C) starting embeddings: a source run's prompt, or Lester et al.'s random, sampled-vocabulary
    or text initialisation."""
    import torch

    table: torch.Tensor = model.get_input_embeddings().weight.detach()  # type: ignore[operator]  # (V, C)
    n = config.num_virtual_tokens
    if source is not None and source.weights:
        return transferred_prompt(source, n, table.shape[1]).to(table.dtype)
    generator = torch.Generator().manual_seed(seed)
    if config.init == "random":
        return torch.randn(n, table.shape[1], generator=generator) * table.std()
    if config.init == "vocab":
        special = set(tokenizer.all_special_ids)
        candidates = torch.tensor([i for i in range(min(table.shape[0], 5000)) if i not in special])
        return table[candidates[torch.randint(len(candidates), (n,), generator=generator)]].clone()
    ids = tokenizer(init_text(config, train), add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    tiled = (ids * (n // len(ids) + 1))[:n]
    return table[torch.tensor(tiled)].clone()


def build_soft_prompt(method: Method, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      config: PromptTuningMethodConfig, train: Sequence[Example], seed: int,
                      source: Source | None = None) -> SoftPromptAdapter:
    """A frozen model (with the ``init_from`` source's weights folded in) and a fresh or transferred soft prompt."""
    import torch
    from peft import PromptTuningConfig, TaskType

    from tunelab.methods.adapters import SoftPromptAdapter

    model = starting_model(model, config, source)
    freeze(model)
    peft_config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.num_virtual_tokens)
    wrapped = peft_model(model, peft_config)
    with torch.no_grad():
        adapter = SoftPromptAdapter(wrapped, method.name, config, method.capabilities_for(config))
        adapter.prompt_weight.copy_(initial_prompt(model, tokenizer, config, train, seed, source))
    record_init(wrapped.peft_config["default"], config, train, getattr(model, "name_or_path", ""),
                transferred=bool(source is not None and source.weights))
    return adapter


def load_soft_prompt(method: Method, directory: Path, model: PreTrainedModel,
                     config: PromptTuningMethodConfig) -> SoftPromptAdapter:
    """A saved soft prompt on the model it was trained on."""
    from tunelab.methods.adapters import SoftPromptAdapter

    return SoftPromptAdapter(saved_peft_model(directory, model), method.name, config, method.capabilities_for(config))


class PromptTuning(MethodDefaults):
    name = "prompt_tuning"
    Config = PromptTuningMethodConfig
    capabilities = Capabilities(trains=True, soft_prompt=True)

    def build(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
              config: PromptTuningMethodConfig, train: Sequence[Example], seed: int,
              source: Source | None = None) -> Adapter:
        return build_soft_prompt(self, model, tokenizer, config, train, seed, source)

    def load(self, directory: Path, model: PreTrainedModel, config: PromptTuningMethodConfig) -> Adapter:
        return load_soft_prompt(self, directory, model, config)
