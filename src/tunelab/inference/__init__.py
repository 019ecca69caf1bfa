"""One inference engine for evaluation and serving (``docs/design.md``, "Inference").

- ``engine``: rows (token ids + their adapter's state: soft prompt / prefix key/values via ``modeling.virtual_kv``,
  a LoRA slot, demonstrations already in the ids) are prefilled into a ``BatchState`` that rows join and leave;
  ``decode_step`` runs one step over it. ``Engine.run`` is offline generation (submit rows, run each static batch
  to completion); the serve scheduler drives the same ``prefill`` / ``decode_step`` / ``join`` / ``leave`` online.
  Precision per phase (``tunelab.precision``) is applied in ``engine`` only.
- ``steps``: the decode-step table (native, torch, transformers) and ``choose``; the chosen name is recorded.
- ``torch_step`` / ``native.llama``: the two fast steps; ``llama``: what both read from a Llama model.
- ``rows``: per-row weight deltas (serve's LoRA rows) for the forward running now.
- ``sampling``: ``GenerationConfig``, next-token choice, stop strings, EOS ids.
"""
