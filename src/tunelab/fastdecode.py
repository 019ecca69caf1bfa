"""A lean decode step for Llama-family models: one token per row straight from the model's own weights.

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

It consumes and produces what ``generate.decode_step`` does (a transformers cache whose rows may start with
virtual-token / prefix key/values and left padding, the attention mask, each row's next position), so
generation, evaluation and the serve scheduler keep one path. ``supports`` decides from the modules themselves
(config ``model_type == "llama"``, every projection a plain ``nn.Linear``, SiLU MLP, RMSNorm, full-attention
cache layers); anything else -- quantised or DoRA layers, other architectures such as Gemma 3 -- keeps the
transformers forward. peft LoRA layers (unmerged, as ``tunelab eval`` loads a LoRA adapter) decode here too:
the base projections fused and packed as for the bare model, each LoRA layer's own ``B(A(x)) * scaling`` added
after them (its modules called as its forward calls them). Serve's LoRA rows (per-row low-rank deltas on the frozen model's plain projections,
``serve.lora_rows``) run in the lean step too: it adds each projection's delta from ``modeling.row_deltas``,
computed by the same function as the module hooks of the transformers forward. Greedy tokens equal the transformers forward's in fp32 (tests/test_fastdecode.py).

``stepper`` prefers the native step (``mode("native")``, the default): the same layers in one compiled call
(``tunelab.native``), batch-invariant by construction and 2x faster at batch 1; this module's PyTorch step
(``mode("lean")``) runs where that kernel cannot (no C compiler, ``TUNELAB_NATIVE=0``, other dtypes).
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    lora: dict[str, torch.nn.Module]  # module name -> its peft LoRA layer (``_peft_lora``): deltas added per step


_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _body(model):
    return getattr(model, "model", None)


def _peft_lora(module) -> bool:
    """A peft LoRA ``Linear`` on a plain ``nn.Linear`` whose forward is ``base(x) + B(A(dropout(x))) * scaling``
    summed over its active adapters (not merged, not disabled, no DoRA or other variant)."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    if type(module) is not LoraLinear or type(module.base_layer) is not torch.nn.Linear:
        return False
    return not module.merged and not module.disable_adapters and \
        not any(name in module.lora_variant for name in module.active_adapters)


def _peft_delta(module, x: torch.Tensor) -> torch.Tensor | None:
    """What a peft LoRA ``Linear`` (``_peft_lora``) adds to its base layer's output for ``x`` (B, in): its own
    modules, in the order of its forward."""
    out = None
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        a = module.lora_A[name]
        d = module.lora_B[name](a(module.lora_dropout[name](module._cast_input_dtype(x, a.weight.dtype))))
        d = d * module.scaling[name]
        out = d if out is None else out + d
    return out


def supports(model) -> bool:
    """Whether ``step`` computes this model's forward: a plain Llama, whose projections may carry peft LoRA
    layers (their deltas are added after the fused base projections); no other wrapped layers."""
    cfg, body = getattr(model, "config", None), _body(model)
    if cfg is None or body is None or getattr(cfg, "model_type", None) != "llama":
        return False
    if getattr(cfg, "hidden_act", None) != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or type(getattr(body, "embed_tokens", None)) is not torch.nn.Embedding:
        return False  # e.g. peft's modules_to_save wrappers: their trained copy is not ``.weight``
    if not hasattr(body, "rotary_emb") or not hasattr(body, "norm"):
        return False
    for layer in getattr(body, "layers", ()):
        if type(getattr(layer, "self_attn", None)).__name__ != "LlamaAttention":
            return False  # e.g. peft's adaption prompt wraps the attention module itself
        for name in _PROJECTIONS:
            module = layer.get_submodule(name)
            if type(module) is not torch.nn.Linear and not _peft_lora(module):  # quantised layers, DoRA, ...
                return False
        if type(layer.input_layernorm).__name__ != "LlamaRMSNorm":
            return False
    return len(getattr(body, "layers", ())) > 0


def _lora_state(module) -> tuple:
    """What decides a projection's decode besides its tensors: the module itself and, for a peft LoRA layer,
    whether it is merged or disabled and which adapters are active (``set_adapter`` touches no tensor)."""
    if type(module) is torch.nn.Linear:
        return (id(module),)
    return (id(module), type(module), getattr(module, "merged", None), getattr(module, "disable_adapters", None),
            tuple(getattr(module, "active_adapters", ()) or ()))


def _key(model) -> tuple:
    """Every source tensor's (data_ptr, version, dtype) and every projection module's ``_lora_state``, in one
    walk over the layers (it runs at every decode step)."""
    body = _body(model)
    tensors = [body.embed_tokens.weight, body.norm.weight, model.get_output_embeddings().weight]
    states = []
    for layer in body.layers:
        tensors += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        for name in _PROJECTIONS:
            lin = layer.get_submodule(name)
            states.append(_lora_state(lin))
            tensors += [lin.weight] + ([lin.bias] if lin.bias is not None else [])
    return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors) + tuple(states)


def _cat_bias(*linears) -> torch.Tensor | None:
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.weight.shape[0])
                      for lin in linears]).detach()


def _fused(linears, pack: bool) -> _Linear:
    return _prepare(torch.cat([lin.weight for lin in linears]), _cat_bias(*linears), pack)


def _group(linears, pack: bool, names: dict[int, str]) -> _Group:
    return _Group(_fused(linears, pack), tuple(names[id(lin)] for lin in linears),
                  tuple(lin.weight.shape[0] for lin in linears))


def _build(model, key: tuple) -> Weights:
    body, cfg = _body(model), model.config
    embed = body.embed_tokens.weight.detach()
    pack = embed.device.type == "cpu" and embed.dtype in (torch.float32, torch.bfloat16) and \
        torch.backends.mkldnn.is_available()
    names = {id(module): name for name, module in model.named_modules()}
    layers = []
    for layer in body.layers:
        att, mlp = layer.self_attn, layer.mlp
        layers.append(_Layer(
            layer.input_layernorm.weight.detach(),
            _group((att.q_proj, att.k_proj, att.v_proj), pack, names), _group((att.o_proj,), pack, names),
            layer.post_attention_layernorm.weight.detach(),
            _group((mlp.gate_proj, mlp.up_proj), pack, names), _group((mlp.down_proj,), pack, names)))
    head = _fused((model.get_output_embeddings(),), pack)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    lora = {names[id(module)]: module for layer in body.layers for name in _PROJECTIONS
            if _peft_lora(module := layer.get_submodule(name))}
    return Weights(key, tuple(layers), embed, body.norm.weight.detach(), head,
                   float(cfg.rms_norm_eps), cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, lora)


# model -> {dtype of its embedding: Weights}; precision.weights_in swaps parameters to a bf16 copy, so fp32 and
# bf16 decode each keep their own fused set
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached(cache: weakref.WeakKeyDictionary, model, key: tuple, build: Callable):
    """``cache[model][dtype of its embedding]``, rebuilt by ``build(model, key)`` when missing or built under
    another ``key`` (``_key``: any tensor, dtype or LoRA state changed since). fp32 and bf16 decode
    (``precision.weights_in`` swaps in a bf16 copy) each keep their own entry."""
    per_dtype = cache.setdefault(model, {})
    dtype = model.get_input_embeddings().weight.dtype
    hit = per_dtype.get(dtype)
    if hit is None or hit.key != key:
        hit = per_dtype[dtype] = build(model, key)
    return hit


@torch.no_grad()
def weights(model, key: tuple | None = None) -> Weights:
    """The model's fused decode weights in its current dtype and its peft LoRA layers, rebuilt if any parameter
    or projection module changed since (no ``named_modules`` walk per decode step); ``key``: ``_key(model)``
    when the caller has it."""
    return cached(_CACHE, model, _key(model) if key is None else key, _build)


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
    cos, sin = _body(model).rotary_emb(x, positions.unsqueeze(-1))  # (B, 1, D) each: the model's own RoPE
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(mask == 0, float("-inf"))
    bias = bias[:, None, None, :]  # (B, 1, 1, L + 1)
    logits = _layers(w, x, cos.unsqueeze(1), sin.unsqueeze(1), bias, [layer._keys for layer in layers],
                 [layer._values for layer in layers], length, deltas)
    for layer in layers:
        layer.advance(1)
    return logits


# the transformers forward | ``step`` (PyTorch ops) | ``native.llama.step`` (one compiled C call per step).
# torch.compile of ``step`` was tried and not kept (docs/performance.md): inductor cannot lower oneDNN's packed
# linear, and with plain weights a dynamic-shape compile ran > 4 minutes
MODES = ("hf", "lean", "native")
_MODE = contextvars.ContextVar("tunelab_decode_step", default="native")


@contextlib.contextmanager
def mode(name: str) -> Iterator[None]:
    """Select the decode step inside the block: ``native`` (default: the compiled kernel of
    ``tunelab.native``, else ``lean``), ``lean`` (this module's PyTorch step) or ``hf`` (the transformers
    forward, "before" in the benchmarks); models or caches the lean step does not cover always get ``hf``."""
    if name not in MODES:
        raise ValueError(f"decode step {name!r}; choose one of {', '.join(MODES)}")
    token = _MODE.set(name)
    try:
        yield
    finally:
        _MODE.reset(token)


def _deltas(lora: dict[str, torch.nn.Module], provider, slots) -> Deltas | None:
    """The per-row deltas of one step: peft LoRA layers' (offline eval) and serve's LoRA rows' (``slots``)."""
    if slots is None and not lora:
        return None

    def deltas(name: str, x: torch.Tensor) -> torch.Tensor | None:  # x (B, in)
        d = _peft_delta(lora[name], x) if name in lora else None
        if slots is not None and provider is not None:
            r = provider.delta(name, x.unsqueeze(1), slots)  # the hooks see (B, 1, in)
            if r is not None:
                d = r.squeeze(1) if d is None else d + r.squeeze(1)
        return d

    return deltas


def backend(chosen: str, device: torch.device) -> str:
    """The step that runs under mode ``chosen`` for a model on ``device``: the native C step reads CPU memory
    only, so a model anywhere else (CUDA) gets the PyTorch step, whose ops run on any device.

    >>> backend("native", torch.device("cuda", 0)), backend("native", torch.device("cpu"))
    ('lean', 'native')
    """
    return "lean" if chosen == "native" and device.type != "cpu" else chosen


def stepper(model, cache) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object], torch.Tensor] | None:
    """``(tokens, mask, positions, cache) -> logits`` for the selected mode when it covers ``model`` and
    ``cache`` (all ``kvcache.PreallocatedLayer``s), else None: use the transformers forward. Per-row weight
    deltas active at call time (``modeling.row_slots``: serve's LoRA rows) are added from the model's
    ``modeling.row_deltas`` with the formula of its module hooks; a model whose deltas live only in hooks
    gets None. Checks the modules and the weights once, so call it once per decode loop (the weights
    cannot change inside one)."""
    from tunelab.kvcache import PreallocatedLayer
    from tunelab.modeling import current_row_slots, row_deltas

    chosen = backend(_MODE.get(), model.get_input_embeddings().weight.device)
    layers = getattr(cache, "layers", None)
    provider = row_deltas(model)
    if current_row_slots() is not None and provider is None:  # the lean step would skip the hooks' deltas
        return None
    if chosen == "hf" or not layers or any(type(layer) is not PreallocatedLayer for layer in layers):
        return None
    if not supports(model):
        return None

    def slots_now():
        slots = current_row_slots()
        if slots is not None and provider is None:
            raise RuntimeError("per-row weight deltas became active after fastdecode.stepper chose its step for "
                               "a model without modeling.row_deltas; call stepper inside row_slots")
        return slots

    key = _key(model)  # one walk over the weights per call (serve calls this every step)
    if chosen == "native":
        from tunelab import native
        from tunelab.native import llama

        nw = llama.weights(model, key) if native.library() is not None else None
        if nw is not None:

            def run_native(tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
                deltas = _deltas(nw.lora, provider, slots_now())
                out = llama.step(model, nw, tokens, mask, positions, cache, deltas)
                if out is None:  # a cache the kernel does not read (another dtype): the PyTorch step
                    return step(model, weights(model, key), tokens, mask, positions, cache, deltas)
                return out

            return run_native
    w = weights(model, key)

    def run(tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        return step(model, w, tokens, mask, positions, cache, _deltas(w.lora, provider, slots_now()))

    return run
