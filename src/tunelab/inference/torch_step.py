"""The "torch" decode step (``inference.steps``) for Llama-family models: one token per row straight from the model's own weights.

The eager transformers forward spends most of a batch-1 decode step in per-op Python and dispatch overhead
(~15 modules, masks, cache bookkeeping per layer over 30 layers), not in reading the weights. ``step`` does the
same arithmetic with fewer, larger ops per layer:

    x = embed[token]                                   # (B, C)
    per layer: h = rms_norm(x); qkv = h @ Wqkv.T       # q, k, v in one matmul (fused once, cached)
               q, k = rope(q, k, cos, sin)             # cos/sin from each row's position (the model's rotary_emb)
               cache.update(k, v)                      # written in place into the pre-allocated cache (kvcache)
               x += softmax(q K^T / sqrt(D) + mask) V @ Wo.T    # grouped-query attention, 2 matmuls
               h = rms_norm(x); g, u = h @ Wgu.T       # gate and up in one matmul (fused once, cached)
               x += (silu(g) * u) @ Wdown.T
    logits = rms_norm(x) @ head.T                      # (B, V): the last (only) position

It consumes and produces what ``inference.engine.decode_step`` does (a transformers cache whose rows may start with
virtual-token / prefix key/values and left padding, the attention mask, each row's next position), so
generation, evaluation and the serve scheduler keep one path. ``supports`` decides from the modules themselves
(config ``model_type == "llama"``, every projection a plain ``nn.Linear``, SiLU MLP, RMSNorm, full-attention
cache layers); anything else -- quantised or DoRA layers, other architectures such as Gemma 3 -- keeps the
transformers forward. Layers with declared deltas (``inference.llama.register_layer_deltas``: peft LoRA layers,
unmerged, as ``tunelab eval`` loads a LoRA adapter, declared by ``methods.lora_layers``) decode here too:
the base projections fused and packed as for the bare model, each layer's delta (LoRA: its own
``B(A(x)) * scaling``, its modules called as its forward calls them) added after them. Serve's LoRA rows
(per-row low-rank deltas on the frozen model's plain projections,
``serve.lora_rows``) run in the lean step too: it adds each projection's delta from ``inference.rows.row_deltas``,
computed by the same function as the module hooks of the transformers forward. Greedy tokens equal the transformers forward's in fp32 (tests/test_fastdecode.py).

``inference.steps`` prefers the native step (the same layers in one compiled call, ``tunelab.native``,
batch-invariant by construction and 2x faster at batch 1); this module's PyTorch step runs where that kernel
cannot (no C compiler, ``TUNELAB_NATIVE=0``, other dtypes, a GPU). What both read from the model (coverage,
weights key, declared layer deltas) is ``inference.llama``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunelab.inference import llama
from tunelab.inference.llama import cached, weights_key

MAX_K = 1024  # oneDNN's bf16/fp32 kernels were batch-invariant up to this input width, not at 1536 (measured)


@dataclass(frozen=True)
class _Linear:
    """``x @ W.T + b`` for a weight (out, in) prepared once: packed for oneDNN where available (a GEMV from
    memory 2-3x faster than ``F.linear``'s: docs/performance.md), and split along the input width into
    chunks of <= ``MAX_K``, whose kernels give every row the same bits whatever the batch size."""

    chunks: tuple[torch.Tensor, ...]  # (out, in_i) each, packed or plain
    widths: tuple[int, ...]  # in_i
    bias: torch.Tensor | None
    packed: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, out)
        parts = x.split(self.widths, dim=-1) if len(self.chunks) > 1 else (x,)
        out = None
        for i, (part, w) in enumerate(zip(parts, self.chunks, strict=True)):
            bias = self.bias if i == 0 else None
            y = (torch.ops.mkldnn._linear_pointwise(part, w, bias, "none", [], "") if self.packed
                 else F.linear(part, w, bias))
            out = y if out is None else out + y
        assert out is not None
        return out


def _prepare(weight: torch.Tensor, bias: torch.Tensor | None, pack: bool) -> _Linear:
    # the split is for oneDNN's CPU kernels; on a GPU it would only add kernel launches (one matmul per weight)
    n = -(-weight.shape[1] // MAX_K) if weight.device.type == "cpu" else 1  # ceil
    width = -(-weight.shape[1] // n)
    chunks = [c.contiguous() for c in weight.detach().split(width, dim=1)]
    if pack:
        try:  # the batch-size hint 16 gave batch-invariant fp32 results (hint 1 did not), and speed at 1-64 rows
            return _Linear(tuple(torch.ops.mkldnn._reorder_linear_weight(c, 16) for c in chunks),
                           tuple(c.shape[1] for c in chunks), bias, True)
        except (RuntimeError, AttributeError):  # a torch build without oneDNN's packed linear
            pass
    return _Linear(tuple(chunks), tuple(c.shape[1] for c in chunks), bias, False)


@dataclass(frozen=True)
class _Group:
    """Projections run as one matmul (q/k/v, gate/up, or a single one): the fused weight, and each member's
    module name (as ``model.named_modules()`` calls it) and output width, for per-row deltas."""

    linear: _Linear
    names: tuple[str, ...]
    widths: tuple[int, ...]

    def __call__(self, x: torch.Tensor, deltas: Deltas | None) -> torch.Tensor:  # (B, in) -> (B, out)
        y = self.linear(x)
        if deltas is None:
            return y
        parts = [deltas(name, x) for name in self.names]
        if all(p is None for p in parts):
            return y
        delta = torch.cat([p if p is not None else y.new_zeros(y.shape[0], width)
                           for p, width in zip(parts, self.widths, strict=True)], dim=-1)
        return (y + delta).to(y.dtype)  # as peft's LoRA layer: result + delta, back in the result's dtype


# (module name, its input (B, in)) -> the per-row delta to add to its output (B, out), or None (no delta there)
Deltas = Callable[[str, torch.Tensor], "torch.Tensor | None"]


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's weights, q/k/v and gate/up fused."""

    norm_in: torch.Tensor  # (C,)
    qkv: _Group  # C -> (H + 2 KV) D
    o: _Group  # H D -> C
    norm_post: torch.Tensor  # (C,)
    gate_up: _Group  # C -> 2 I
    down: _Group  # I -> C


@dataclass(frozen=True)
class Weights:
    """A model's decode weights in one dtype, built once (``weights``) and reused while its parameters stand."""

    key: tuple  # every source tensor's (data_ptr, version, dtype) and every projection module's identity and LoRA
    # state: any change (training, a dtype swap, LoRA layers injected, merged, disabled or switched) rebuilds
    layers: tuple[_Layer, ...]
    embed: torch.Tensor  # (V, C)
    norm: torch.Tensor  # (C,)
    head: _Linear  # C -> V (the tied embedding for SmolLM2)
    eps: float
    heads: int
    kv_heads: int
    head_dim: int
    lora: dict[str, llama.Delta]  # module name -> its declared layer's delta (``llama.deltas_of``): added per step


def _cat_bias(*linears) -> torch.Tensor | None:
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.weight.shape[0])
                      for lin in linears]).detach()


def _fused(linears, pack: bool) -> _Linear:
    return _prepare(torch.cat([lin.weight for lin in linears]), _cat_bias(*linears), pack)


def _group(modules, pack: bool, names: dict[int, str], declared: llama.LayerDeltas | None) -> _Group:
    """The projections ``modules`` fused (their plain base projections), named for their deltas."""
    linears = [llama.base(m, declared) for m in modules]
    return _Group(_fused(linears, pack), tuple(names[id(m)] for m in modules),
                  tuple(lin.weight.shape[0] for lin in linears))


def _build(model, key: tuple) -> Weights:
    body, cfg = llama.decoder(model), model.config
    embed = body.embed_tokens.weight.detach()
    pack = embed.device.type == "cpu" and embed.dtype in (torch.float32, torch.bfloat16) and \
        torch.backends.mkldnn.is_available()
    names = {id(module): name for name, module in model.named_modules()}
    declared = llama.layer_deltas(model)
    layers = []
    for layer in body.layers:
        att, mlp = layer.self_attn, layer.mlp
        layers.append(_Layer(
            layer.input_layernorm.weight.detach(),
            _group((att.q_proj, att.k_proj, att.v_proj), pack, names, declared),
            _group((att.o_proj,), pack, names, declared),
            layer.post_attention_layernorm.weight.detach(),
            _group((mlp.gate_proj, mlp.up_proj), pack, names, declared),
            _group((mlp.down_proj,), pack, names, declared)))
    head = _fused((model.get_output_embeddings(),), pack)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return Weights(key, tuple(layers), embed, body.norm.weight.detach(), head, float(cfg.rms_norm_eps),
                   cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, llama.deltas_of(model, names))


# model -> {dtype of its embedding: Weights}; precision.weights_in swaps parameters to a bf16 copy, so fp32 and
# bf16 decode each keep their own fused set
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def weights(model, key: tuple | None = None) -> Weights:
    """The model's fused decode weights in its current dtype and its layers' deltas, rebuilt if any parameter
    or projection module changed since (no ``named_modules`` walk per decode step); ``key``: ``llama.weights_key(model)``
    when the caller has it."""
    return cached(_CACHE, model, weights_key(model) if key is None else key, _build)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention of one query per row as two batched matmuls: ``q`` (B, H, 1, D), ``keys`` /
    ``values`` (B, KV, L, D), ``bias`` (B, 1, 1, L) fp32 (0 attended, -inf masked) -> (B, H, 1, D).

    Query head h reads key/value head h // (H / KV), as transformers' ``repeat_kv``. Measured against
    ``F.scaled_dot_product_attention(enable_gqa=True)`` on this CPU (one layer, 140 keys): bf16 8x faster at
    16 rows and 12x at 64 (SDPA's CPU kernel was most of a bf16 decode step there), fp32 1.3x; even at 1 row."""
    batch, heads, _, dim = q.shape
    kv = keys.shape[1]
    scores = q.view(batch, kv, heads // kv, dim) @ keys.transpose(-1, -2)  # (B, KV, G, L)
    probs = torch.softmax(scores.float() * dim ** -0.5 + bias, dim=-1).to(q.dtype)
    return (probs @ values).view(batch, heads, 1, dim)


def _layers(w: Weights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
            keys: list[torch.Tensor], values: list[torch.Tensor], length: int,
            deltas: Deltas | None = None) -> torch.Tensor:
    """The decoder layers and the LM head for one token per row: ``x`` (B, C) embeddings, ``cos``/``sin``
    (B, 1, 1, D), ``bias`` (B, 1, 1, length + 1) fp32 attention bias; ``keys``/``values`` per layer (B, KV, capacity, D)
    buffers whose first ``length`` positions are filled: position ``length`` is written here; ``deltas``: per-row
    additions to the projections' outputs (serve's LoRA rows). -> (B, V)."""
    batch, width = x.shape
    h, kv, d = w.heads, w.kv_heads, w.head_dim
    for lw, kbuf, vbuf in zip(w.layers, keys, values, strict=True):
        qkv = lw.qkv(F.rms_norm(x, (width,), lw.norm_in, w.eps), deltas)  # (B, (H + 2 KV) D)
        q, k, v = qkv.view(batch, h + 2 * kv, 1, d).split((h, kv, kv), dim=1)  # (B, heads, 1, D)
        kbuf[:, :, length:length + 1].copy_(_rope(k, cos, sin))
        vbuf[:, :, length:length + 1].copy_(v)
        att = _attention(_rope(q, cos, sin), kbuf[:, :, :length + 1], vbuf[:, :, :length + 1], bias)  # (B, H, 1, D)
        x = x + lw.o(att.reshape(batch, h * d), deltas)
        gate, up = lw.gate_up(F.rms_norm(x, (width,), lw.norm_post, w.eps), deltas).chunk(2, -1)  # (B, I) each
        x = x + lw.down(F.silu(gate) * up, deltas)
    return w.head(F.rms_norm(x, (width,), w.norm, w.eps))  # (B, V)


@torch.no_grad()
def step(model, w: Weights, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache,
         deltas: Deltas | None = None) -> torch.Tensor:
    """One decode step: ``tokens`` (B,) at ``positions`` (B,), ``mask`` (B, L + 1) including the new column,
    ``cache`` (``kvcache.PreallocatedLayer``s holding L entries per row) extended in place, ``deltas`` added to
    the projections. -> logits (B, V)."""
    layers = cache.layers
    length = layers[0].length
    for layer in layers:
        layer.reserve(1)
    x = F.embedding(tokens, w.embed)  # (B, C)
    cos, sin = llama.decoder(model).rotary_emb(x, positions.unsqueeze(-1))  # (B, 1, D) each: the model's own RoPE
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(mask == 0, float("-inf"))
    bias = bias[:, None, None, :]  # (B, 1, 1, L + 1)
    logits = _layers(w, x, cos.unsqueeze(1), sin.unsqueeze(1), bias, [layer._keys for layer in layers],
                 [layer._values for layer in layers], length, deltas)
    for layer in layers:
        layer.advance(1)
    return logits

