"""The inference roofline: what the hardware allows for prefill and for one decode step, and what we reach.

- Prefill (and scoring) is matrix-multiply-bound: tokens/s <= GEMM peak / FLOPs per token, with FLOPs per
  token = 2 x (non-embedding parameters) + attention (4 x layers x hidden x mean context); the LM head runs
  at the last position only (a prompt of ~127 tokens: 1/127 of it), so it is left out.
- A decode step of B rows must read every weight once and every row's cached keys/values once, and do
  2 x parameters x B FLOPs: step >= max(bytes / bandwidth, FLOPs / GEMM peak); tokens/s <= B / step.

Used by bench_generate.py --roofline and bench_eval.py; the arithmetic is printed with every limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelFacts:
    params: int  # all parameters, the tied embedding / LM head counted once
    embedding: int  # the embedding matrix (a lookup in prefill, the LM head in decode)
    layers: int
    kv_width: int  # key/value heads x head dim
    hidden: int

    @property
    def body(self) -> int:
        return self.params - self.embedding

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_width * dtype_bytes  # keys and values of every layer


def facts_of(model) -> ModelFacts:
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return ModelFacts(params, model.get_input_embeddings().weight.numel(), cfg.num_hidden_layers,
                      kv_heads * head_dim, cfg.hidden_size)


def prefill_limit(f: ModelFacts, peak_gflops: float, mean_context: float) -> tuple[float, str]:
    """(tokens/s limit, the arithmetic)."""
    flops = 2 * f.body + 4 * f.layers * f.hidden * mean_context
    limit = peak_gflops * 1e9 / flops
    return limit, (f"{peak_gflops:.0f} GFLOP/s / (2 x {f.body / 1e6:.1f}M + 4 x {f.layers} x {f.hidden} x "
                   f"{mean_context:.0f}) = {flops / 1e6:.0f} MFLOP/token -> {limit:.0f} tok/s")


def decode_step_limit(f: ModelFacts, batch: int, context: float, weight_bytes: int, kv_bytes: int,
                      bandwidth_gbs: float, peak_gflops: float) -> tuple[float, str]:
    """(shortest step in seconds, the arithmetic) for ``batch`` rows with ``context`` cached tokens each."""
    read = f.params * weight_bytes + batch * context * f.kv_bytes_per_token(kv_bytes)
    t_mem = read / (bandwidth_gbs * 1e9)
    t_flop = 2 * f.params * batch / (peak_gflops * 1e9)
    bound = "memory" if t_mem >= t_flop else "compute"
    return max(t_mem, t_flop), (f"max({f.params / 1e6:.0f}M x {weight_bytes} B + {batch} x {context:.0f} x "
                                f"{f.kv_bytes_per_token(kv_bytes) / 1024:.0f} KB = {read / 1e6:.0f} MB / "
                                f"{bandwidth_gbs:.1f} GB/s = {t_mem * 1e3:.1f} ms, 2 x {f.params / 1e6:.0f}M x "
                                f"{batch} / {peak_gflops:.0f} GFLOP/s = {t_flop * 1e3:.1f} ms) -> {bound}-bound")


def seconds(fn, repeats: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (after the caller's warm-up)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


LAST_STEP: list[str] = []  # the decode step (inference.steps.BACKENDS) time_ours ran last


@torch.no_grad()
def time_ours(adapter, prompts: list[list[int]], steps: int, precision: str,
                            pad_id: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds per step) of one batch on tunelab's engine; EOS never stops a row.
    The step that ran is left in ``LAST_STEP[0]``."""
    from tunelab.inference import engine
    from tunelab.inference.sampling import GenerationConfig

    model = adapter.model
    cfg = GenerationConfig(max_new_tokens=steps, precision=precision)
    batch = engine.Batch.on(model, precision)
    start = time.perf_counter()
    batch.admit([(adapter, p) for p in prompts], pad_id)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    with engine.decode_phase(model, batch.phases):
        _, name = engine.run_to_completion(batch, cfg, [], pad_id)
    LAST_STEP[:] = [name]
    # no step after the last token (its logits would go unused)
    return prefill, (time.perf_counter() - start) / max(steps - 1, 1)


@torch.no_grad()
def time_peft(model, prompts: list[list[int]], steps: int, pad_id: int) -> tuple[float, float]:
    """The same for transformers/peft ``generate`` (prefill = a 1-token generate; per step from the rest)."""
    from tunelab.modeling import mask_for, pad_batch

    ids, mask = pad_batch(prompts, pad_id, "left"), mask_for(prompts, "left")

    def run(n):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=pad_id)

    one = seconds(lambda: run(1))
    many = seconds(lambda: run(steps))
    # nan, printed as such, when machine noise made the longer run no slower than the 1-token one
    return one, (many - one) / max(steps - 1, 1) if many > one else float("nan")
