"""The "torch" decode step (``inference.steps``) for the families ``inference.arch`` declares (Llama, Gemma 3 text):
one token per row straight from the model's own weights.

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

Gemma 3 (``inference.arch``: what its layers add, declared once) runs the same loop with its RMSNorm (fp32,
``1 + w``, precomputed once), a norm on each sublayer's output before the residual add and on every q / k head
before RoPE, embeddings times ``embed_scale``, a tanh-GELU MLP, each layer's own RoPE table (``rotary_emb(x, pos,
layer_type)``) and, on sliding-window layers, only the last ``window`` cache columns (transformers' sliding mask
counts columns; ``kvcache.preallocate`` keeps the sliding layers' columns right-aligned in full-length buffers).

It consumes and produces what ``inference.engine.decode_step`` does (a transformers cache whose rows may start with
virtual-token / prefix key/values and left padding, the attention mask, each row's next position), so
generation, evaluation and the serve scheduler keep one path. ``llama.uncovered`` decides from the modules
themselves (a family ``inference.arch`` declares, every projection a plain ``nn.Linear``, the declared norm and
attention classes, a pre-allocated cache); anything else -- quantised or DoRA layers, other architectures --
keeps the transformers forward. Layers with declared deltas (``inference.llama.register_layer_deltas``: peft LoRA layers,
unmerged, as ``tunelab eval`` loads a LoRA adapter, declared by ``methods.lora_layers``) decode here too:
the base projections fused and packed as for the bare model, each layer's delta (LoRA: its own
``B(A(x)) * scaling``, its modules called as its forward calls them) added after them. Serve's LoRA rows
(per-row low-rank deltas on the frozen model's plain projections,
``serve.lora_rows``) run in the lean step too: it adds each projection's delta from ``inference.rows.row_deltas``,
computed by the same function as the module hooks of the transformers forward. Greedy tokens equal the transformers forward's in fp32 (tests/test_fastdecode.py;
Gemma 3: tests/test_gemma_step.py).

``inference.steps`` prefers the native step (the same layers in one compiled call, ``tunelab.native``,
batch-invariant by construction and 2x faster at batch 1); this module's PyTorch step runs where that kernel
cannot (no C compiler, ``TUNELAB_NATIVE=0``, other dtypes, a GPU, a family other than Llama). What both read from the model (coverage,
weights key, declared layer deltas) is ``inference.llama``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunelab.inference import arch, llama
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
    """One decoder layer's weights, q/k/v and gate/up fused; norm weights as ``_norm`` takes them (None: the
    family has no such norm, ``inference.arch``)."""

    norm_in: torch.Tensor  # (C,)
    qkv: _Group  # C -> (H + 2 KV) D
    o: _Group  # H D -> C
    norm_post: torch.Tensor  # (C,) on the MLP's input
    gate_up: _Group  # C -> 2 I
    down: _Group  # I -> C
    q_norm: torch.Tensor | None  # (D,) each query head, before RoPE
    k_norm: torch.Tensor | None  # (D,) each key head, before RoPE
    attn_out: torch.Tensor | None  # (C,) the attention's output, before the residual add
    mlp_out: torch.Tensor | None  # (C,) the MLP's output, before the residual add
    window: int | None  # sliding window (attends the last ``window`` cache columns); None: every column
    rope: str | None  # which ``rotary_emb`` table (its layer_type); None: the only one


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
    spec: arch.Arch  # the family's facts (norms, windows, RoPE tables, activation, scale, soft-caps)
    embed_scale: torch.Tensor | None  # () in the embedding's dtype: what embed_tokens multiplies by


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


def _norm_weight(module, spec: arch.Arch) -> torch.Tensor:
    """What ``_norm`` multiplies by: ``w``, or ``1 + w`` in fp32 (Gemma3RMSNorm's ``x * (1 + w.float())``)."""
    return 1.0 + module.weight.float() if spec.unit_offset else module.weight.detach()


def _build(model, key: tuple) -> Weights:
    body, cfg = llama.decoder(model), model.config
    spec = arch.of(cfg)
    assert isinstance(spec, arch.Arch), spec  # llama.supports(model) holds
    embed = body.embed_tokens.weight.detach()
    pack = embed.device.type == "cpu" and embed.dtype in (torch.float32, torch.bfloat16) and \
        torch.backends.mkldnn.is_available()
    names = {id(module): name for name, module in model.named_modules()}
    declared = llama.layer_deltas(model)

    def norm(layer, name: str | None) -> torch.Tensor | None:
        return None if name is None else _norm_weight(layer.get_submodule(name), spec)

    layers = []
    for layer, window, rope in zip(body.layers, spec.windows, spec.ropes, strict=True):
        att, mlp = layer.self_attn, layer.mlp
        layers.append(_Layer(
            _norm_weight(layer.get_submodule(spec.attn_in), spec),
            _group((att.q_proj, att.k_proj, att.v_proj), pack, names, declared),
            _group((att.o_proj,), pack, names, declared),
            _norm_weight(layer.get_submodule(spec.mlp_in), spec),
            _group((mlp.gate_proj, mlp.up_proj), pack, names, declared),
            _group((mlp.down_proj,), pack, names, declared),
            norm(layer, spec.q_norm), norm(layer, spec.k_norm), norm(layer, spec.attn_out), norm(layer, spec.mlp_out),
            window, rope))
    head = _fused((model.get_output_embeddings(),), pack)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    scale = body.embed_tokens.embed_scale.to(embed.dtype) if spec.embed_scale else None  # as its forward casts it
    return Weights(key, tuple(layers), embed, _norm_weight(body.norm, spec), head, float(cfg.rms_norm_eps),
                   cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, llama.deltas_of(model, names),
                   spec, scale)


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


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fp32: bool) -> torch.Tensor:
    """RMSNorm over the last axis: in ``x``'s dtype (Llama), or in fp32 and cast back (Gemma3RMSNorm; ``weight``
    is then ``1 + w`` in fp32, and this is bit-equal to its forward)."""
    if fp32:
        return F.rms_norm(x.float(), (x.shape[-1],), weight, eps).to(x.dtype)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scale: float,
               softcap: float | None = None) -> torch.Tensor:
    """Grouped-query attention of one query per row as two batched matmuls: ``q`` (B, H, 1, D), ``keys`` /
    ``values`` (B, KV, L, D), ``bias`` (B, 1, 1, L) fp32 (0 attended, -inf masked) -> (B, H, 1, D); the logits
    times ``scale``, then soft-capped (``tanh(s / cap) * cap``, as transformers' eager attention) when ``softcap``.

    Query head h reads key/value head h // (H / KV), as transformers' ``repeat_kv``. Measured against
    ``F.scaled_dot_product_attention(enable_gqa=True)`` on this CPU (one layer, 140 keys): bf16 8x faster at
    16 rows and 12x at 64 (SDPA's CPU kernel was most of a bf16 decode step there), fp32 1.3x; even at 1 row."""
    batch, heads, _, dim = q.shape
    kv = keys.shape[1]
    scores = (q.view(batch, kv, heads // kv, dim) @ keys.transpose(-1, -2)).float() * scale  # (B, KV, G, L)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax(scores + bias, dim=-1).to(q.dtype)
    return (probs @ values).view(batch, heads, 1, dim)


def _layers(w: Weights, x: torch.Tensor, ropes: dict, bias: torch.Tensor,
            keys: list[torch.Tensor], values: list[torch.Tensor], length: int,
            deltas: Deltas | None = None) -> torch.Tensor:
    """The decoder layers and the LM head for one token per row: ``x`` (B, C) embeddings, ``ropes`` each layer's
    RoPE table (``_Layer.rope``) -> ``cos``/``sin`` (B, 1, 1, D), ``bias`` (B, 1, 1, length + 1) fp32 attention
    bias; ``keys``/``values`` per layer (B, KV, capacity, D) buffers whose first ``length`` positions are filled:
    position ``length`` is written here; ``deltas``: per-row additions to the projections' outputs (serve's LoRA
    rows). -> (B, V)."""
    batch, width = x.shape
    h, kv, d = w.heads, w.kv_heads, w.head_dim
    spec = w.spec
    fp32 = spec.unit_offset
    for lw, kbuf, vbuf in zip(w.layers, keys, values, strict=True):
        qkv = lw.qkv(_norm(x, lw.norm_in, w.eps, fp32), deltas)  # (B, (H + 2 KV) D)
        q, k, v = qkv.view(batch, h + 2 * kv, 1, d).split((h, kv, kv), dim=1)  # (B, heads, 1, D)
        if lw.q_norm is not None and lw.k_norm is not None:
            q, k = _norm(q, lw.q_norm, w.eps, fp32), _norm(k, lw.k_norm, w.eps, fp32)
        cos, sin = ropes[lw.rope]
        kbuf[:, :, length:length + 1].copy_(_rope(k, cos, sin))
        vbuf[:, :, length:length + 1].copy_(v)
        start = 0 if lw.window is None else max(0, length + 1 - lw.window)  # the query's column is ``length``
        att = _attention(_rope(q, cos, sin), kbuf[:, :, start:length + 1], vbuf[:, :, start:length + 1],
                         bias[..., start:], spec.scale, spec.attn_softcap)  # (B, H, 1, D)
        out = lw.o(att.reshape(batch, h * d), deltas)
        x = x + (out if lw.attn_out is None else _norm(out, lw.attn_out, w.eps, fp32))
        gate, up = lw.gate_up(_norm(x, lw.norm_post, w.eps, fp32), deltas).chunk(2, -1)  # (B, I) each
        out = lw.down(spec.activation(gate) * up, deltas)
        x = x + (out if lw.mlp_out is None else _norm(out, lw.mlp_out, w.eps, fp32))
    logits = w.head(_norm(x, w.norm, w.eps, fp32))  # (B, V)
    if spec.final_softcap is not None:
        logits = torch.tanh(logits / spec.final_softcap) * spec.final_softcap
    return logits


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
    if w.embed_scale is not None:
        x = x * w.embed_scale
    rotary, pos = llama.decoder(model).rotary_emb, positions.unsqueeze(-1)
    ropes = {}
    for kind in dict.fromkeys(lw.rope for lw in w.layers):  # the model's own RoPE, per table: (B, 1, D) each
        cos, sin = rotary(x, pos) if kind is None else rotary(x, pos, kind)
        ropes[kind] = (cos.unsqueeze(1), sin.unsqueeze(1))
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(mask == 0, float("-inf"))
    bias = bias[:, None, None, :]  # (B, 1, 1, L + 1)
    logits = _layers(w, x, ropes, bias, [layer._keys for layer in layers], [layer._values for layer in layers],
                     length, deltas)
    for layer in layers:
        layer.advance(1)
    return logits
