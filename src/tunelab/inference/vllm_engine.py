"""vLLM as the engine (``eval.engine=vllm``): the same rows as ``inference.engine.Engine`` -- (adapter, prompt ids) --
turned into vLLM requests, run by one in-process ``vllm.LLM`` per base model, and decoded by tunelab's tokenizer.

Per row (which methods can go, decided before any model loads: ``inference.vllm_support.refusal``):

- token ids as ``{"prompt_token_ids": ids}`` (base model, ICL and IPT demonstrations, discrete prompts);
- a soft prompt (prompt tuning, P-tuning, IPT) as ``{"prompt_embeds": cat(soft prompt (n, C), embed(ids))}``:
  the virtual tokens at positions 0..n-1 and the text after them, exactly where tunelab's forward puts them;
- LoRA weights (the adapter's own, or a LoRA folded in by ``init_from``) as a ``LoRARequest`` on the adapter's
  PEFT directory, written once per adapter object; rows of many adapters go in one ``generate`` call.

Greedy, EOS ids and stop strings as in the tunelab engine: the new ids come back from vLLM (EOS dropped) and are
decoded here, so both engines' text goes through the same ``tokenizer.decode``. vLLM runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no engine-core child, no spawn guard needed), eager (``enforce_eager``: no
compile warm-up), with a KV-cache budget of ``VLLM_CPU_KVCACHE_SPACE`` GiB (2 unless set) on CPU.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import ConfigError, ModelError
from tunelab.inference.sampling import GenerationConfig, cut_at_stop, eos_ids
from tunelab.inference.vllm_support import INSTALL, refusal
from tunelab.methods.base import LowRankDelta

log = logging.getLogger(__name__)

Row = tuple[Any, list[int]]  # (adapter, prompt ids), as inference.engine.Row
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values


def import_vllm():
    """The ``vllm`` module, after the settings tunelab runs it with; a one-line error where it is missing."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache on CPU (vLLM's default is larger)
    # vLLM lowers torch to one thread unless OMP_NUM_THREADS is set: keep the threads this process has
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    try:
        import vllm
    except ImportError:
        raise ConfigError(INSTALL) from None
    return vllm


def dtype_for(precision: str) -> str:
    """vLLM's dtype for ``precision`` (fp32 | bf16 | auto)."""
    from tunelab.precision import resolve

    return "bfloat16" if resolve(precision).decode == "bf16" else "float32"  # one dtype for both phases in vLLM


def model_path(model) -> str:
    """The directory (or hub id) the base model was loaded from: what vLLM loads."""
    name = getattr(getattr(model, "config", None), "name_or_path", "") or getattr(model, "name_or_path", "")
    if not name:
        raise ModelError("engine vllm: this model was built in memory and has no directory for vLLM to load; "
                         "use engine tunelab")
    return str(name)


@dataclass
class _Lora:
    path: Path
    rank: int
    request: Any = None
    modules: tuple[str, ...] = ()  # the module names (suffixes) it targets, from its adapter_config.json


_LLMS: dict[tuple, Any] = {}  # (path, dtype, lora rank, max loras, prompt embeds) -> vllm.LLM
_LORAS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # adapter -> _Lora (its PEFT files on disk)
_LORA_IDS: dict[str, int] = {}  # a LoRA directory -> its vLLM int id (stable per process)
_TMP = tempfile.TemporaryDirectory(prefix="tunelab-vllm-")


def llm_for(path: str, dtype: str, lora_rank: int, max_loras: int, prompt_embeds: bool, seed: int = 0,
            lora_modules: tuple[str, ...] = ()):
    """One ``vllm.LLM`` per setting, kept for the process; a new setting replaces the last one (one at a time in
    memory). ``lora_rank`` 0: LoRA disabled. ``lora_modules``: the module names (suffixes) LoRA may touch, () for
    all vLLM supports; naming them keeps LoRA off the input embeddings, which vLLM 0.32 cannot run for a step that
    mixes prompt-embeds rows with token-id rows (its LoRA embedding layer sees only the token-id rows)."""
    vllm = import_vllm()
    key = (path, dtype, lora_rank, max_loras, prompt_embeds, lora_modules)
    if key not in _LLMS:
        for old in list(_LLMS):
            del _LLMS[old]
        lora = dict(enable_lora=True, max_lora_rank=lora_rank, max_loras=max_loras, max_cpu_loras=max(max_loras, 1),
                    lora_target_modules=list(lora_modules) or None) if lora_rank else {}
        log.info("engine vllm: starting vllm %s on %s (%s%s%s)", vllm.__version__, path, dtype,
                 f", LoRA rank <= {lora_rank} x {max_loras}" if lora_rank else "", ", prompt embeds" if prompt_embeds else "")
        _LLMS[key] = vllm.LLM(path, dtype=dtype, enforce_eager=True, seed=seed, enable_prompt_embeds=prompt_embeds,
                              **lora)
    return _LLMS[key]


def allowed_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM allows that holds ``rank``."""
    for allowed in LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ModelError(f"engine vllm: LoRA rank {rank} is above vLLM's largest ({LORA_RANKS[-1]}); use engine tunelab")


def lora_of(adapter) -> _Lora | None:
    """The LoRA vLLM applies to ``adapter``'s rows: its own weights (a method declaring ``low_rank_delta``, saved in
    PEFT's LoRA format) or a LoRA folded in by ``init_from``; None when its weights are the base model's. What vLLM
    cannot load (DoRA, ...) it refuses itself when the request arrives, naming the reason."""
    if adapter in _LORAS:
        return _LORAS[adapter]
    caps = adapter.capabilities
    found: _Lora | None = None
    if caps.changes_weights:
        directory = Path(_TMP.name) / f"{adapter.method}-{id(adapter)}"
        directory.mkdir(parents=True, exist_ok=True)
        adapter.save_weights(directory)
        found = _peft_lora(directory, f"the {adapter.method} adapter") if caps.low_rank_delta else None
        if found is None:
            raise ModelError(f"engine vllm: the {adapter.method} adapter's weights are not a LoRA; use engine tunelab")
    if adapter.folded_from:
        if found is not None:
            raise ModelError(f"engine vllm: {adapter.method} on top of a folded adapter ({adapter.folded_from}) "
                             "would need two LoRAs per request; use engine tunelab")
        found = _peft_lora(Path(adapter.folded_from), f"the adapter it started from ({adapter.folded_from})")
        if found is None:
            raise ModelError(f"engine vllm: {adapter.method} started from {adapter.folded_from}, which is folded "
                             "into the base weights and is not a LoRA vLLM could apply; use engine tunelab")
    _LORAS[adapter] = found
    return found


def _peft_lora(directory: Path, what: str) -> _Lora | None:
    """A PEFT LoRA directory (``adapter_config.json`` with ``peft_type`` LORA, as vLLM's ``LoRARequest`` reads it)
    with its largest rank; None for anything else."""
    path = directory / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA" or not isinstance(cfg.get("r"), int):
        return None
    ranks = [cfg["r"], *(v for v in (cfg.get("rank_pattern") or {}).values() if isinstance(v, int))]
    targets = cfg.get("target_modules") or ()
    modules = tuple(sorted({targets} if isinstance(targets, str) else {str(t) for t in targets}))
    log.debug("engine vllm: %s is a LoRA of rank <= %d on %s", what, max(ranks), modules)
    return _Lora(directory, max(ranks), modules=modules)


def lora_request(directory: Path, rank: int):
    """The ``LoRARequest`` for the LoRA saved in ``directory`` (PEFT files), one id per directory: what
    `tunelab serve --engine vllm` (serve.vllm_scheduler) sends with a LoRA adapter's rows."""
    return _request(_Lora(directory, rank))


def zero_lora_request(like: LowRankDelta):
    """On CPU, a LoRA of zeros shaped like ``like`` for the rows without one while LoRA is on; None elsewhere.

    vLLM 0.32's CPU LoRA ops (``vllm.lora.ops.torch_ops``: ``lora_b_weights[lora_indices]``) take a row's slot by
    its index, and "no LoRA" is -1, which picks the last slot: in a step that mixes LoRA rows with rows without one,
    those get the last slot's LoRA (the base model's greedy text changes). Every row holding a LoRA -- this one
    adds nothing -- keeps every index valid. It takes one more LoRA slot."""
    from safetensors.torch import save_file
    from vllm.platforms import current_platform

    from tunelab.methods.lora import PEFT_PREFIX

    if not current_platform.is_cpu():
        return None
    directory = Path(_TMP.name) / "zero-lora"
    if not (directory / "adapter_model.safetensors").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, (a, b) in like.factors.items():  # (r, in), (out, r)
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.zeros(a.shape, dtype=torch.float32)
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.zeros(b.shape, dtype=torch.float32)
        save_file(tensors, str(directory / "adapter_model.safetensors"))
        (directory / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": like.rank, "lora_alpha": like.rank, "bias": "none",
            "target_modules": sorted({name.rsplit(".", 1)[-1] for name in like.factors})}))
    return lora_request(directory, like.rank)


def zero_lora_like(lora: _Lora):
    """``zero_lora_request`` for the offline engine: zeros shaped like the LoRA saved in ``lora.path``; None off CPU."""
    from safetensors.torch import load_file, save_file
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    directory = Path(_TMP.name) / f"zero-lora-r{lora.rank}-{'-'.join(lora.modules)}"
    if not (directory / "adapter_model.safetensors").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        tensors = load_file(str(lora.path / "adapter_model.safetensors"))
        save_file({k: torch.zeros_like(v) for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))
        shutil.copy2(lora.path / "adapter_config.json", directory / "adapter_config.json")
    return _request(_Lora(directory, lora.rank, modules=lora.modules))


def _request(lora: _Lora | None):
    if lora is None:
        return None
    if lora.request is None:
        from vllm.lora.request import LoRARequest

        key = str(lora.path)
        lora_id = _LORA_IDS.setdefault(key, len(_LORA_IDS) + 1)
        lora.request = LoRARequest(f"lora{lora_id}", lora_id, key)
    return lora.request


@torch.no_grad()
def prompt_of(adapter, ids: list[int]) -> dict[str, Any]:
    """The vLLM prompt for one row: token ids, or the soft prompt's embeddings followed by the text's."""
    soft = adapter.soft_prompt(1)
    return row_prompt(adapter.model, None if soft is None else soft[0], ids)


@torch.no_grad()
def row_prompt(model, soft: torch.Tensor | None, ids: list[int]) -> dict[str, Any]:
    """Token ids, or ``soft`` (n, C) followed by the embeddings of ``ids`` under ``model``'s input embeddings."""
    if soft is None:
        return {"prompt_token_ids": list(ids)}
    embed = model.get_input_embeddings()
    text = embed(torch.tensor([list(ids)], device=embed.weight.device))[0]  # (T, C)
    return {"prompt_embeds": torch.cat([soft.to(text.dtype), text]).float().cpu()}  # (n + T, C)


def sampling_params(cfg: GenerationConfig, stops: list[int]):
    """vLLM's ``SamplingParams`` for ``cfg``: greedy (temperature 0) unless ``do_sample``, EOS ids ``stops``; no
    detokenizing (tunelab's tokenizer decodes, and cuts at ``cfg.stop``)."""
    vllm = import_vllm()
    return vllm.SamplingParams(max_tokens=cfg.max_new_tokens, stop_token_ids=stops,
                               temperature=cfg.temperature if cfg.do_sample else 0.0,
                               top_p=cfg.top_p if cfg.do_sample else 1.0,
                               seed=cfg.seed if cfg.do_sample else None, detokenize=False)


@dataclass
class VllmEngine:
    """``inference.engine.Engine``'s interface (``run_ids``, ``run``, ``steps_used``) over vLLM."""

    tokenizer: Any
    cfg: GenerationConfig
    batch_size: int = 16  # vLLM schedules its own batches; kept for the interface
    steps_used: set[str] = field(default_factory=set)

    def run_ids(self, rows: Sequence[Row], progress: Callable[[int], None] | None = None) -> list[list[int]]:
        if not rows:
            return []
        first = rows[0][0]
        for adapter, _ in rows:
            why = refusal(adapter.method, adapter.capabilities, None)
            if why:
                raise ConfigError(why)
        loras = [lora_of(adapter) for adapter, _ in rows]
        distinct = {str(lo.path): lo for lo in loras if lo is not None}
        rank = allowed_rank(max(lo.rank for lo in distinct.values())) if distinct else 0
        prompts = [prompt_of(adapter, ids) for adapter, ids in rows]
        embeds = any("prompt_embeds" in p for p in prompts)
        # LoRA only on the adapters' own modules (never the input embeddings: vLLM 0.32 cannot mix prompt-embeds
        # rows with token-id rows there), one slot more than the LoRAs for the zero LoRA (``zero_lora_request``)
        modules = tuple(sorted({m for lo in distinct.values() for m in lo.modules}))
        llm = llm_for(model_path(first.model), dtype_for(self.cfg.precision), rank, len(distinct) + 1 if rank else 0,
                      embeds, self.cfg.seed, lora_modules=modules)
        stops = eos_ids(first.model, self.tokenizer)
        params = sampling_params(self.cfg, stops)
        none = zero_lora_like(next(iter(distinct.values()))) if distinct else None
        requests = [_request(lo) if lo is not None else none for lo in loras]
        outputs = llm.generate(prompts, params, lora_request=requests if distinct else None, use_tqdm=False)
        self.steps_used.add("vllm")
        if progress:
            progress(len(rows))
        out = []
        for o in outputs:
            ids = list(o.outputs[0].token_ids)
            if ids and ids[-1] in stops:
                ids = ids[:-1]
            out.append(ids)
        return out

    def run(self, rows: Sequence[Row], progress: Callable[[int], None] | None = None) -> list[str]:
        """Text of each row (special tokens skipped, cut at the first stop string), in order."""
        return [cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), self.cfg.stop)
                for ids in self.run_ids(rows, progress)]
