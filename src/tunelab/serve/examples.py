"""Untrained prompt-tuning adapters, for trying the server and for its benchmark and tests.

Each is a random soft prompt (Lester et al.'s random initialisation, one seed per adapter) written
through the method's own save path, exactly as `tunelab run --out X` writes ``X/adapter``.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.formatting import PromptLayout
from tunelab.methods import METHODS
from tunelab.methods.io import save_adapter
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


def _write_adapters(method: str, config, model, tokenizer, model_name: str, root: str | Path, count: int,
                    prefix: str, first_seed: int) -> list[str]:
    """``count`` untrained adapters of ``method`` (one seed each) through the method's own save path."""
    names = []
    for i in range(count):
        adapter = METHODS[method].build(model, tokenizer, config, [], seed=first_seed + i)
        name = f"{prefix}{i:02d}"
        with atomic_directory(Path(root) / name) as tmp:
            save_adapter(adapter, tmp, model_name, PromptLayout().resolved(tokenizer))
        names.append(name)
    return names
