"""`tunelab export ADAPTER --to TARGET OUT`: an adapter rewritten in a form other servers load.

``TARGETS`` maps each ``--to`` name to the function that writes it; ``lora`` distils a soft prompt into
a PEFT LoRA (``tunelab.distill``), for servers that take LoRA adapters but not soft prompts (llama.cpp);
``vllm`` writes what vLLM needs as it is (``tunelab.export_vllm``: a soft prompt for ``prompt_embeds``, the
LoRA files, or the fine-tuned model directory) with a script that serves it. Options of one target are
ignored by the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tunelab.validation import above, at_least, choice, satisfying


def _non_empty(value: str) -> bool:
    return bool(value.strip())


def _lora(cfg: ExportConfig, progress: bool) -> dict[str, Any]:
    from tunelab.distill import export_lora

    return export_lora(cfg, progress)


def _vllm(cfg: ExportConfig, progress: bool) -> dict[str, Any]:
    from tunelab.export_vllm import export_vllm

    return export_vllm(cfg, progress)


TARGETS: dict[str, Callable[[ExportConfig, bool], dict[str, Any]]] = {"lora": _lora, "vllm": _vllm}
TARGET_NAMES = tuple(TARGETS)


@dataclass
class ExportConfig:
    """What `tunelab export` was asked to do (flags; validated before any model loads)."""

    adapter: str = satisfying(_non_empty, "a run directory or its adapter/")  # the adapter to export
    out: str = satisfying(_non_empty, "an output directory")  # written atomically; an earlier export there is replaced
    to: str = choice(TARGET_NAMES, "lora")  # lora: distil a soft prompt into a LoRA; vllm: files + script for vLLM
    rank: int = at_least(1, 8)  # lora: rank r of the student
    alpha: int | None = at_least(1, None)  # lora: scale alpha / r; None = 2 * rank (LoRA's usual ratio)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])  # lora
    # (attention projections: a soft prompt acts on the text only through attention)
    steps: int = at_least(1, 200)  # lora: distillation optimizer steps
    lr: float = above(0, 1e-3)  # lora: AdamW learning rate of the student
    batch_size: int | None = at_least(1, None)  # lora: None = the teacher run's train.batch_size


def export(cfg: ExportConfig, progress: bool = True) -> dict[str, Any]:
    """Write ``cfg.adapter`` as ``cfg.to`` into ``cfg.out``; returns what the target reports."""
    return TARGETS[cfg.to](cfg, progress)
