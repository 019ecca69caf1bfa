"""Untrained prompt-tuning adapters, for trying the server and for its benchmark and tests.

Each is a random soft prompt (Lester et al.'s random initialisation, one seed per adapter), random prefix,
or random LoRA factors, written through the method's own save path, exactly as `tunelab run --out X`
writes ``X/adapter``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from tunelab.formatting import PromptLayout
from tunelab.methods import METHODS
from tunelab.methods.io import save_adapter
from tunelab.methods.lora import LoraMethodConfig
from tunelab.methods.prefix_tuning import PrefixTuningMethodConfig
from tunelab.methods.prompt_tuning import PromptTuningMethodConfig
from tunelab.paths import atomic_directory


def write_prompt_adapters(model, tokenizer, model_name: str, root: str | Path, count: int,
                          num_virtual_tokens: int = 20, prefix: str = "task") -> list[str]:
    """Write ``count`` random soft-prompt adapters as ``root/{prefix}{i:02d}``; returns their names."""
    config = PromptTuningMethodConfig(num_virtual_tokens=num_virtual_tokens, init="random")
    return _write_adapters("prompt_tuning", config, model, tokenizer, model_name, root, count, prefix, 1000)


def write_prefix_adapters(model, tokenizer, model_name: str, root: str | Path, count: int,
                          num_virtual_tokens: int = 20, prefix: str = "prefix") -> list[str]:
    """Write ``count`` random prefix-tuning adapters (peft's N(0, 1) key/values) as ``root/{prefix}{i:02d}``."""
    config = PrefixTuningMethodConfig(num_virtual_tokens=num_virtual_tokens, init="random")
    return _write_adapters("prefix_tuning", config, model, tokenizer, model_name, root, count, prefix, 2000)


def write_lora_adapters(model, tokenizer, model_name: str, root: str | Path, count: int, r: int = 8,
                        std: float = 0.02, prefix: str = "lora") -> list[str]:
    """Write ``count`` random LoRA adapters (q_proj, v_proj, rank ``r``) as ``root/{prefix}{i:02d}``.

    A ~ N(0, 1/in), B ~ N(0, std^2): unlike peft's initialisation (B = 0) the adapters change the model, as
    trained ones do. Built on a copy of ``model`` (peft patches the model it wraps), one seed per adapter."""
    adapter = METHODS["lora"].build(copy.deepcopy(model), tokenizer, LoraMethodConfig(r=r), [], seed=0)
    names = []
    for i in range(count):
        generator = torch.Generator().manual_seed(3000 + i)
        with torch.no_grad():
            for name, param in adapter.peft_model.named_parameters():
                if "lora_A" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[1]))
                elif "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
        name = f"{prefix}{i:02d}"
        with atomic_directory(Path(root) / name) as tmp:
            save_adapter(adapter, tmp, model_name, PromptLayout().resolved(tokenizer))
        names.append(name)
    return names


def _write_adapters(method: str, config, model, tokenizer, model_name: str, root: str | Path, count: int,
                    prefix: str, first_seed: int) -> list[str]:
    """``count`` untrained adapters of ``method`` (one seed each) through the method's own save path."""
    names = []
    for i in range(count):
        with torch.random.fork_rng():  # peft's random inits (prefix tuning) draw from the global generator
            torch.manual_seed(first_seed + i)
            adapter = METHODS[method].build(model, tokenizer, config, [], seed=first_seed + i)
        name = f"{prefix}{i:02d}"
        with atomic_directory(Path(root) / name) as tmp:
            save_adapter(adapter, tmp, model_name, PromptLayout().resolved(tokenizer))
        names.append(name)
    return names
