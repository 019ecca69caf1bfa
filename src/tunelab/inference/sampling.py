"""Decoding settings and what a decode loop needs around the step: the next token (greedy or sampled), stop
strings, EOS ids. Shared by offline generation and the serve scheduler (``inference.engine``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


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
    precision: str = "fp32"  # fp32 | bf16 | auto, per phase (tunelab.precision); eval and serve default to auto


def next_tokens(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    if not cfg.do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / max(cfg.temperature, 1e-5), dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < cfg.top_p
        keep[..., 0] = True  # the most probable token always stays (a top_p below float32's least is 0 here)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    if generator is not None and generator.device != probs.device:
        # a seeded CPU generator (eval, serve) with a model on CUDA: draw where the generator is, so a seed
        # gives the same draws on either device (and multinomial refuses a generator of another device)
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def next_token(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> int:
    """One row's next token from its logits (V,): greedy, or sampled with ``generator``."""
    return int(next_tokens(logits.unsqueeze(0), cfg, generator)[0])


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Text up to the first stop string."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


def stop_checker(tokenizer, stop: Sequence[str]) -> Callable[[int, list[int]], bool]:
    """Whether a row's ids so far contain a stop string (``row`` is unused: one check serves every row)."""
    longest = max(len(s) for s in stop)

    def check(_row: int, ids: list[int]) -> bool:
        tail = tokenizer.decode(ids[-(longest + 8):], skip_special_tokens=True)
        return any(s in tail for s in stop)

    return check


def eos_ids(model, tokenizer) -> list[int]:
    """Token ids that end a completion (the tokenizer's and the model's generation config's)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)
