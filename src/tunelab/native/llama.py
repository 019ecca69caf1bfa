"""The native decode step (``decode.c``) for the Llama models ``inference.llama.supports`` covers (a family
``inference.arch`` declares ``native``; Gemma 3 runs the torch step): weights by pointer, no copy.

``weights(model)`` collects the model's own parameter tensors (fp32, or the bf16 copy ``precision.weights_in``
swaps in) and is rebuilt when ``inference.llama.weights_key`` (every tensor's storage and version, every projection
module's LoRA state) changes. ``step`` runs one decode step over a ``kvcache.PreallocatedLayer`` cache:
the whole step in one call, or phase by phase when per-row deltas (declared layer deltas such as peft LoRA
layers', serve's LoRA rows) must
be added to the projections' outputs, with the same arithmetic for the rows that have none.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tunelab import native
from tunelab.inference import arch, llama
from tunelab.inference.llama import cached, weights_key

_I64 = ctypes.c_int64
_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)


class _Step(ctypes.Structure):  # mirrors ``Step`` in decode.c, field for field
    _fields_ = [(name, _I64) for name in ("batch", "hidden", "heads", "kv_heads", "head_dim", "inter", "vocab",
                                          "layers", "length", "capacity", "bf16", "threads")] + \
        [("eps", ctypes.c_double)] + \
        [(name, _PP) for name in ("wq", "wk", "wv", "wo", "wgate", "wup", "wdown", "norm_in", "norm_post")] + \
        [(name, _P) for name in ("norm", "embed", "head")] + \
        [(name, _PP) for name in ("keys", "values")] + \
        [(name, _P) for name in ("tokens", "cos", "sin", "mask", "x", "h", "qkv", "att", "gate", "up", "y",
                                 "logits")]


_PROJ = ("q", "k", "v", "o", "gate", "up", "down")
_SERIAL = itertools.count()
_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Weights:
    key: tuple  # inference.llama.weights_key(model) when built
    dtype: torch.dtype
    dims: dict[str, int]
    eps: float
    arrays: dict[str, ctypes.Array]  # per-layer pointer arrays (kept alive here)
    norm: int
    embed: int
    head: int
    names: tuple[dict[str, str], ...]  # per layer: projection -> module name (for deltas)
    lora: dict[str, llama.Delta]  # module name -> its declared layer's delta (inference.llama.deltas_of)
    tensors: tuple[torch.Tensor, ...]  # every tensor pointed to (kept alive here)
    serial: int = dataclasses.field(default_factory=lambda: next(_SERIAL))  # unique for the process's life


def _weights_fit(model) -> bool:
    """Every weight a contiguous CPU tensor of one dtype, fp32 or bf16, and no biases (``inference.llama.supports``
    already holds), of a family the kernel computes (``inference.arch``: Llama)."""
    spec = arch.of(model.config)
    if not isinstance(spec, arch.Arch) or not spec.native:
        return False
    body, declared = model.model, llama.layer_deltas(model)
    weights = [body.embed_tokens.weight, body.norm.weight, model.get_output_embeddings().weight]
    for layer in body.layers:
        weights += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        for name in _MODULES:
            lin = llama.base(layer.get_submodule(name), declared)  # a declared layer (LoRA): its base projection
            if lin.bias is not None:
                return False
            weights.append(lin.weight)
    dtype = weights[0].dtype
    if dtype not in (torch.float32, torch.bfloat16) or model.get_output_embeddings().bias is not None:
        return False
    return all(w.dtype == dtype and w.device.type == "cpu" and w.is_contiguous() for w in weights)


@dataclass(frozen=True)
class _NotCovered:  # cached like Weights, so that the check runs once per weight set, not per decode step
    key: tuple


def covers(model) -> bool:
    """Whether ``step`` can run ``model`` (``inference.llama.supports`` already holds): the native kernel is available
    here and its weights fit (``_weights_fit``)."""
    return native.library() is not None and weights(model, weights_key(model)) is not None


def _build(model, key: tuple) -> Weights | _NotCovered:
    if not _weights_fit(model):
        return _NotCovered(key)
    body, cfg = model.model, model.config
    names = {id(module): name for name, module in model.named_modules()}
    declared = llama.layer_deltas(model)
    per: dict[str, list[torch.Tensor]] = {p: [] for p in (*_PROJ, "norm_in", "norm_post")}
    layer_names = []
    for layer in body.layers:
        got = {}
        for p, name in zip(_PROJ, _MODULES, strict=True):
            module = layer.get_submodule(name)
            per[p].append(llama.base(module, declared).weight.detach())
            got[p] = names[id(module)]
        layer_names.append(got)
        per["norm_in"].append(layer.input_layernorm.weight.detach())
        per["norm_post"].append(layer.post_attention_layernorm.weight.detach())
    arrays = {p: (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts]) for p, ts in per.items()}
    embed = body.embed_tokens.weight.detach()
    norm = body.norm.weight.detach()
    head = model.get_output_embeddings().weight.detach()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dims = {"hidden": cfg.hidden_size, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
            "head_dim": head_dim, "inter": per["gate"][0].shape[0], "vocab": head.shape[0],
            "layers": len(body.layers)}
    tensors = tuple(t for ts in per.values() for t in ts) + (embed, norm, head)
    return Weights(key, embed.dtype, dims, float(cfg.rms_norm_eps), arrays, norm.data_ptr(), embed.data_ptr(),
                   head.data_ptr(), tuple(layer_names), llama.deltas_of(model, names), tensors)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {dtype: Weights}


def weights(model, key: tuple) -> Weights | None:
    """The model's native decode weights for its current parameters (``key``: ``inference.llama.weights_key(model)``);
    None when they do not fit the kernel (``_weights_fit``). Checked and built once per weight set."""
    hit = cached(_CACHE, model, key, _build)
    return hit if isinstance(hit, Weights) else None


# (module name, its input (B, in) fp32) -> the delta to add to its output (B, out), or None
Deltas = Callable[[str, torch.Tensor], "torch.Tensor | None"]


_SCRATCH = threading.local()  # per thread: the last (weights, batch)'s activation buffers and Step


def _scratch(w: Weights, batch: int) -> tuple[dict[str, torch.Tensor], _Step]:
    """Activation buffers (fp32, rows of each width) and a ``_Step`` with the model's constant fields, reused
    by the steps of one decode loop (one thread's; a new batch size or weight set replaces them)."""
    key = (w.serial, batch)  # not id(w): a later Weights may reuse a freed one's id
    if getattr(_SCRATCH, "key", None) != key:
        d = w.dims
        qkv = (d["heads"] + 2 * d["kv_heads"]) * d["head_dim"]
        buf = {name: torch.empty(batch, width) for name, width in (
            ("x", d["hidden"]), ("h", d["hidden"]), ("qkv", qkv), ("att", d["heads"] * d["head_dim"]),
            ("gate", d["inter"]), ("up", d["inter"]), ("y", d["hidden"]))}
        s = _Step(batch=batch, bf16=int(w.dtype == torch.bfloat16), eps=w.eps, norm=w.norm, embed=w.embed,
                  head=w.head, **dict(d.items()), **{f"w{p}": w.arrays[p] for p in _PROJ},
                  norm_in=w.arrays["norm_in"], norm_post=w.arrays["norm_post"],
                  **{name: t.data_ptr() for name, t in buf.items()})
        _SCRATCH.key, _SCRATCH.value = key, (buf, s)
    return _SCRATCH.value


@torch.no_grad()
def step(model, w: Weights, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache,
         deltas: Deltas | None = None) -> torch.Tensor | None:
    """One decode step as ``inference.torch_step.step`` (same arguments, cache extended in place) -> fp32 logits (B, V);
    None, with nothing changed, when the cache is not one the kernel reads (another dtype, not contiguous)."""
    lib = native.library()
    layers = cache.layers
    if lib is None or any(layer._keys.dtype != w.dtype or not layer._keys.is_contiguous()
                          or not layer._values.is_contiguous() for layer in layers):
        return None
    length = layers[0].length
    for layer in layers:
        layer.reserve(1)
    batch, d = tokens.shape[0], w.dims
    attend = (mask != 0).to(torch.uint8).contiguous()
    if attend.shape != (batch, length + 1):
        raise ValueError(f"mask {tuple(mask.shape)} for {batch} rows and {length} cached positions + 1")
    cos, sin = model.model.rotary_emb(torch.empty(0), positions.reshape(batch, 1))  # fp32, the model's own RoPE
    cos, sin = cos.reshape(batch, -1).contiguous(), sin.reshape(batch, -1).contiguous()
    tokens = tokens.to(torch.int64).contiguous()
    logits = torch.empty(batch, d["vocab"])  # new each step: the caller keeps it
    buf, s = _scratch(w, batch)
    keys = (ctypes.c_void_p * len(layers))(*[layer._keys.data_ptr() for layer in layers])
    values = (ctypes.c_void_p * len(layers))(*[layer._values.data_ptr() for layer in layers])
    s.length, s.capacity, s.threads = length, layers[0]._keys.shape[2], torch.get_num_threads()
    s.keys, s.values = keys, values
    s.tokens, s.cos, s.sin, s.mask, s.logits = (tokens.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                                attend.data_ptr(), logits.data_ptr())
    phases = 4 * d["layers"] + 1
    spans = [(0, phases)] if deltas is None else [(p, p + 1) for p in range(phases)]  # deltas between phases
    for start, end in spans:
        if lib.tunelab_decode(ctypes.byref(s), start, end) != 0:
            raise MemoryError("the native decode step could not allocate its scratch")
        if deltas is not None and start < phases - 1:
            _add_deltas(w, buf, start // 4, start % 4, deltas, d)
    for layer in layers:
        layer.advance(1)
    return logits


def _add_deltas(w: Weights, buf: dict[str, torch.Tensor], layer: int, part: int, deltas: Deltas,
                d: dict[str, int]) -> None:
    """Add the per-row deltas of the projections that phase ``part`` of ``layer`` just computed."""
    names = w.names[layer]
    q, kv = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    if part == 0:
        targets = [("q", buf["h"], buf["qkv"][:, :q]), ("k", buf["h"], buf["qkv"][:, q:q + kv]),
                   ("v", buf["h"], buf["qkv"][:, q + kv:])]
    elif part == 1:
        targets = [("o", buf["att"], buf["y"])]
    elif part == 2:
        targets = [("gate", buf["h"], buf["gate"]), ("up", buf["h"], buf["up"])]
    else:
        targets = [("down", buf["gate"], buf["y"])]  # gate holds silu(gate) * up after part 3
    for proj, x, out in targets:
        delta = deltas(names[proj], x)
        if delta is not None:
            out.add_(delta)
