"""Text generation, the public entry point: ``generate(adapter, tokenizer, prompts, cfg, batch_size)``.

Both are "submit rows and run them to completion" on the inference engine (``tunelab.inference.engine``), which
`tunelab serve` runs online too: one prefill, one decode step chosen from one table (``inference.steps``), precision
per phase (``GenerationConfig.precision``: fp32 | bf16 | auto, ``tunelab.precision``) applied in the engine.
Greedy decoding gives the same tokens batched as one-by-one, for every method, because positions come from the
attention mask (``tunelab.modeling``); an adapter's virtual tokens are computed once (``modeling.virtual_kv``),
rows of different adapters on the same base model share a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tunelab.inference.engine import Engine
from tunelab.inference.sampling import GenerationConfig, cut_at_stop, eos_ids, next_token, stop_checker

__all__ = ["GenerationConfig", "cut_at_stop", "eos_ids", "generate", "generate_rows", "next_token", "stop_checker"]


def generate_rows(rows: Sequence[tuple[object, list[int]]], tokenizer, cfg: GenerationConfig, batch_size: int = 16,
                  progress: Callable[[int], None] | None = None, shared_prefix_min: int = 0) -> list[str]:
    """Generate text for (adapter, prompt_ids) rows that may mix adapters; returns one string per row, in order
    (``inference.engine.Engine.run``: batching, shared prefixes (opt-in ``shared_prefix_min``), sampling)."""
    return Engine(tokenizer, cfg, batch_size, shared_prefix_min).run(rows, progress)


def generate(adapter, tokenizer, prompts: Sequence[list[int]], cfg: GenerationConfig, batch_size: int = 16,
             progress: Callable[[int], None] | None = None) -> list[str]:
    """Generate text for prompt id lists of one adapter, batching rows of similar length together."""
    return generate_rows([(adapter, list(p)) for p in prompts], tokenizer, cfg, batch_size, progress)
