"""Batched generation with a KV cache: the one path used by evaluation and serving.

Greedy decoding here gives the same tokens batched as one-by-one, for every method, because
positions come from the attention mask (see ``tunelab.modeling``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tunelab.modeling import hidden_states, mask_for, pad_batch


@dataclass
class GenerationConfig:
    """Decoding settings. Sampling draws from one generator per batch seeded with ``seed``, so sampled
    (unlike greedy) outputs depend on which rows share a batch; fix ``batch_size`` to reproduce them."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # stop strings, cut from the output
    seed: int = 0


def _next_tokens(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    if not cfg.do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / max(cfg.temperature, 1e-5), dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < cfg.top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(adapter, prompts: Sequence[list[int]], cfg: GenerationConfig, eos_ids: Sequence[int],
                 pad_id: int, stop_check: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
    """Decode one left-padded batch; returns the new token ids of each row (EOS excluded)."""
    model = adapter.model
    ids = pad_batch(list(prompts), pad_id, side="left")  # (B, T)
    mask = mask_for(list(prompts), side="left")
    hidden, cache, inputs, are_logits = hidden_states(adapter, ids, mask, use_cache=True)
    logits = hidden[:, -1] if are_logits else model.get_output_embeddings()(hidden[:, -1])  # (B, V)
    attn = inputs.attention_mask
    next_pos = inputs.position_ids[:, -1] + 1  # (B,)
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.do_sample else None
    eos = torch.tensor(list(eos_ids))
    done = torch.zeros(len(prompts), dtype=torch.bool)
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(cfg.max_new_tokens):
        token = _next_tokens(logits, cfg, generator)  # (B,)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        finished_now = torch.isin(token, eos) & ~done
        for row in (~done & ~finished_now).nonzero().flatten().tolist():
            out[row].append(int(token[row]))
            if stop_check is not None and stop_check(row, out[row]):
                finished_now[row] = True
        done |= finished_now
        if bool(done.all()):
            break
        attn = torch.cat([attn, (~done).long().unsqueeze(-1)], dim=-1)
        step = model(input_ids=token.unsqueeze(-1), attention_mask=attn, position_ids=next_pos.unsqueeze(-1),
                     past_key_values=cache, use_cache=True)
        cache, logits = step.past_key_values, step.logits[:, -1]
        next_pos = next_pos + 1
    return out


def generate(adapter, tokenizer, prompts: Sequence[list[int]], cfg: GenerationConfig, batch_size: int = 16,
             progress: Callable[[int], None] | None = None) -> list[str]:
    """Generate text for prompt id lists, batching rows of similar length together."""
    eos_ids = _eos_ids(adapter.model, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        stop_check = _stop_checker(tokenizer, cfg.stop) if cfg.stop else None
        new_ids = generate_ids(adapter, [prompts[i] for i in rows], cfg, eos_ids, tokenizer.pad_token_id,
                               stop_check)
        for row, ids in zip(rows, new_ids, strict=True):
            texts[row] = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), cfg.stop)
        if progress:
            progress(len(rows))
    return texts


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Text up to the first stop string."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


def _stop_checker(tokenizer, stop: Sequence[str]) -> Callable[[int, list[int]], bool]:
    longest = max(len(s) for s in stop)

    def check(_row: int, ids: list[int]) -> bool:
        tail = tokenizer.decode(ids[-(longest + 8):], skip_special_tokens=True)
        return any(s in tail for s in stop)

    return check


def _eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)
