"""Prefix tuning (Li & Liang 2021): trainable key/value prefixes in every attention layer, model frozen.

peft's ``PrefixEncoder`` holds the parameters, optionally through the paper's MLP reparameterisation
(``prefix_projection``); ``get_prompt(B)`` turns them into a transformers ``DynamicCache``, a new
object on each call, which tunelab's forward extends in place. peft saves the encoder's output, so
a reparameterised prefix reloads for inference as the plain prefix it computes.

peft initialises prefixes as N(0, 1) keys and values, which on SmolLM2-135M raises the starting loss
from ~0.7 to ~5 nats; ``init=text`` instead starts from the keys and values the frozen model computes
for real words (the task instruction), as Li & Liang (2021, Sec. 7.2) recommend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.data.example import Example
from tunelab.errors import ConfigError
from tunelab.methods.base import Capabilities, MethodConfig, MethodDefaults, freeze, no_grad, peft_model
from tunelab.methods.transfer import Source, saved_peft_model, starting_model
from tunelab.validation import at_least, choice

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunelab.methods.adapters import Adapter, PrefixAdapter

INITS = ("text", "random")


@dataclass
class PrefixTuningMethodConfig(MethodConfig):
    lr: float = 1e-2  # like soft prompts, prefixes need larger steps than weights
    num_virtual_tokens: int = at_least(1, 20)
    prefix_projection: bool = False  # train the prefix through a 2-layer MLP (Li & Liang 2021, Sec. 4.3)
    encoder_hidden_size: int | None = at_least(1, None)  # MLP width; None = the model's hidden size
    init: str = choice(INITS, "text")  # text (activations of init_text) | random (peft's N(0, 1)); the MLP always starts random
    init_text: str | None = None  # None = the task instruction of the first training example


def __getattr__(name: str) -> Any:
    if name == "PrefixAdapter":  # an nn.Module: imported on first use (tunelab.methods.adapters)
        from tunelab.methods.adapters import PrefixAdapter

        return PrefixAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str, n: int) -> list[int]:
    """Exactly n token ids: ``text``'s, tiled or cut."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    return (ids * (n // len(ids) + 1))[:n]


@no_grad
def prefix_from_text(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    """(n, layers x 2 x KV width): the frozen model's keys and values for ``ids`` at positions 0..n-1,
    laid out as peft's prefix embedding (row i viewed as (layers x 2, heads, head_dim); 2l = K, 2l+1 = V)."""
    import torch

    from tunelab.modeling import output_cache

    cache = output_cache(model(input_ids=torch.tensor([ids]), use_cache=True))
    per_layer = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]  # each (2, H, n, D)
    stacked = torch.stack(per_layer)  # (L, 2, H, n, D)
    layers, _, heads, n, dim = stacked.shape
    return stacked.reshape(layers * 2, heads, n, dim).permute(2, 0, 1, 3).reshape(n, -1)


def _transfer(adapter: PrefixAdapter, source: Source, config: PrefixTuningMethodConfig) -> None:
    """Start from a source run's prefix (same model, same number of virtual tokens, no MLP here)."""
    encoder = adapter.peft_model.prompt_encoder["default"]
    prompt = source.prompt()
    if config.prefix_projection or prompt is None or prompt.shape != encoder.embedding.weight.shape:
        raise ConfigError(f"prefix_tuning can start only from a prefix_tuning run with the same "
                          f"num_virtual_tokens, and with method.prefix_projection=false here; "
                          f"{source.directory} is a {source.method} run")
    encoder.load_prompt_embeddings(prompt)


class PrefixTuning(MethodDefaults):
    name = "prefix_tuning"
    Config = PrefixTuningMethodConfig
    capabilities = Capabilities(trains=True, prefix=True)

    def build(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: PrefixTuningMethodConfig,
              train: Sequence[Example], seed: int, source: Source | None = None) -> Adapter:
        from peft import PrefixTuningConfig, TaskType

        from tunelab.methods.adapters import PrefixAdapter

        model = starting_model(model, config, source)
        freeze(model)
        hidden = model.config.get_text_config().hidden_size
        peft_config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.num_virtual_tokens,
                                         prefix_projection=config.prefix_projection,
                                         encoder_hidden_size=config.encoder_hidden_size or hidden)
        adapter = PrefixAdapter(peft_model(model, peft_config), self.name, config, self.capabilities_for(config))
        if source is not None and source.weights:
            _transfer(adapter, source, config)
        elif config.init == "text" and not config.prefix_projection:
            text = config.init_text or (train[0].instruction if train else "") or "Answer the question."
            prefix = prefix_from_text(model, text_ids(tokenizer, text, config.num_virtual_tokens))
            adapter.peft_model.prompt_encoder["default"].load_prompt_embeddings(prefix)
        return adapter

    def load(self, directory: Path, model: PreTrainedModel, config: PrefixTuningMethodConfig) -> Adapter:
        from tunelab.methods.adapters import PrefixAdapter

        return PrefixAdapter(saved_peft_model(directory, model), self.name, config, self.capabilities_for(config))
