"""Any PEFT method (IA3, LoHa, LoKr, OFT, BOFT, VeRA, FourierFT, ...) through one module: ``method: {name: peft,
peft_type: IA3, **peft's own options}``.

The options other than tunelab's (``lr``, ``init_from``, ``peft_type``) are the fields of peft's config class for
that type (``peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING``), checked against its dataclass fields when the config
loads. The capabilities come from what peft says about the config: a prompt-learning type
(``is_prompt_learning``) adds virtual tokens (a soft prompt, or key/value prefixes for the types whose
``get_prompt`` returns a cache) and leaves the weights alone; every other type patches the model's modules
(``changes_weights``), a ``LoraConfig`` one (LoRA, AdaLoRA) as a low-rank delta. Whether an adapter folds into the
base weights is asked of peft itself (``merge_and_unload``), so ``init_from`` works from every mergeable type.

peft and torch are imported inside functions: listing methods needs neither.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.data.example import Example
from tunelab.errors import ConfigError
from tunelab.methods.base import Capabilities, LowRankDelta, MethodConfig, MethodDefaults, freeze, peft_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunelab.methods.adapters import Adapter
    from tunelab.methods.transfer import Source

# peft's get_prompt returns per-layer key/values (a prefix) for these prompt-learning types, a soft prompt
# (B, n, C) for the others: peft decides it by type (peft_model.PeftModel.get_prompt), so tunelab follows it
PREFIX_TYPES = frozenset({"PREFIX_TUNING", "CARTRIDGE"})
# fields of every peft config that tunelab sets itself (task type, where the base model came from, mode)
VIRTUAL_TOKENS = 20  # a prompt-learning type's virtual tokens when not given (tunelab's prompt tuning default)
RESERVED = frozenset({"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                      "auto_mapping", "peft_version"})


def suggestion(word: str, valid: Sequence[str]) -> str:
    """``; did you mean 'x'?`` for the closest valid name, or nothing."""
    close = difflib.get_close_matches(word, valid, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def peft_types() -> list[str]:
    """Every peft type the installed peft has a config class for (``PEFT_TYPE_TO_CONFIG_MAPPING``)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return sorted(str(t.value) for t in PEFT_TYPE_TO_CONFIG_MAPPING)


def canonical_type(peft_type: str) -> str:
    """peft's spelling of ``peft_type`` (``ia3`` -> ``IA3``), or a one-line error naming the valid types."""
    valid = peft_types()
    key = str(peft_type).upper().replace("-", "_")
    if key not in valid:
        raise ConfigError(f"method.peft_type: unknown peft type {peft_type!r}{suggestion(key, valid)}; "
                          f"valid: {', '.join(valid)}")
    return key


def config_class(peft_type: str) -> type:
    """peft's config class for ``peft_type`` (case-insensitive)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    key = canonical_type(peft_type)
    return next(cls for t, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items() if str(t.value) == key)


def option_names(cls: type) -> list[str]:
    """The fields of peft config class ``cls`` a user may set."""
    return sorted(f.name for f in dataclasses.fields(cls) if f.init and f.name not in RESERVED)


def _admits_list(hint: Any) -> bool:
    return "list" in str(hint).lower()


def checked_options(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` checked against ``cls``'s fields (a typo names the valid keys, with the closest one), a
    comma-separated string split where the field takes a list (``method.target_modules=q_proj,v_proj``)."""
    valid = option_names(cls)
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    out = {}
    for key, value in options.items():
        if key not in valid:
            raise ConfigError(f"method.{key}: not an option of peft's {cls.__name__}{suggestion(str(key), valid)}; "
                              f"valid: {', '.join(valid)}")
        if key.endswith("state_dict_path") and value is not None and not str(value).endswith(".safetensors"):
            # peft would torch.load any other file: tunelab reads no pickles from a config (tunelab.safety)
            raise ConfigError(f"method.{key}={value!r}: only a .safetensors file is read (pickle files can run "
                              "code when loaded); convert it with safetensors.torch.save_file")
        if key == "tokenizer_kwargs" and isinstance(value, dict) and value.get("trust_remote_code"):
            raise ConfigError("method.tokenizer_kwargs.trust_remote_code: not from method options; set "
                              "model.trust_remote_code=true, which every loader honours")
        if isinstance(value, str) and "," in value and _admits_list(hints[key]):
            value = [v.strip() for v in value.split(",") if v.strip()]
        out[key] = value
    return out


def build_peft_config(peft_type: str, options: dict[str, Any]) -> Any:
    """peft's config object for a causal LM; peft's own check of the values becomes a one-line error."""
    from peft import TaskType

    cls = config_class(peft_type)
    try:
        return cls(task_type=TaskType.CAUSAL_LM, **options)
    except (TypeError, ValueError) as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(f"method (peft_type={peft_type}): peft's {cls.__name__} refuses these options: "
                          f"{message}") from None


@functools.lru_cache(maxsize=256)
def _capabilities(peft_type: str, frozen_options: str) -> Capabilities:
    import json

    from peft import LoraConfig

    cfg = build_peft_config(peft_type, json.loads(frozen_options))
    if cfg.is_prompt_learning:
        prefix = peft_type in PREFIX_TYPES
        return Capabilities(trains=True, soft_prompt=not prefix, prefix=prefix)
    # patches modules of the model in place (weights, attention wrappers): never shared with other adapters
    return Capabilities(trains=True, changes_weights=True, low_rank_delta=isinstance(cfg, LoraConfig))


@dataclass
class PeftMethodConfig(MethodConfig):
    lr: float = 1e-3  # between LoRA's 2e-4 and soft prompts' 3e-2; IA3's paper uses 3e-3
    peft_type: str = "LORA"  # any of peft's types (`tunelab ls methods` / docs/methods.md list them)
    options: dict[str, Any] = field(default_factory=dict)  # peft's own config fields (method.<field>=value)

    def __post_init__(self) -> None:
        self.peft_type = canonical_type(self.peft_type)
        cls = config_class(self.peft_type)
        if not isinstance(self.options, dict):
            raise ConfigError(f"method.options: got {self.options!r}, expected a mapping of peft option -> value "
                              "(or flat keys: method.r=8)")
        bad = [k for k in self.options if not isinstance(k, str) or not k.isidentifier()]
        if bad:
            raise ConfigError(f"method.options: option names are peft config fields, got {bad[0]!r}")
        self.options = checked_options(cls, dict(self.options))
        build_peft_config(self.peft_type, self.options)  # peft's own value checks, once, at load time


def fill_defaults(peft_type: str, options: dict[str, Any], model: PreTrainedModel,
                  tokenizer: PreTrainedTokenizerBase | None) -> dict[str, Any]:
    """Options peft needs and cannot find alone, taken from the model: target modules for a type without a
    default for this architecture (LoRA's defaults for it), the tokenizer a text initialisation reads."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA_TARGETS

    cls = config_class(peft_type)
    names = set(option_names(cls))
    filled = dict(options)
    model_type = getattr(model.config, "model_type", "")
    tuner = next((t for k, t in PEFT_TYPE_TO_TUNER_MAPPING.items() if str(k.value) == peft_type), None)
    mapping = getattr(tuner, "target_module_mapping", None)
    if ("target_modules" in names and filled.get("target_modules") is None and isinstance(mapping, dict)
            and not mapping.get(model_type) and LORA_TARGETS.get(model_type)):
        filled["target_modules"] = list(LORA_TARGETS[model_type])
    if "tokenizer_name_or_path" in names and filled.get("tokenizer_name_or_path") is None and tokenizer is not None:
        filled["tokenizer_name_or_path"] = getattr(tokenizer, "name_or_path", None) or None
    layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    defaults = {"num_virtual_tokens": VIRTUAL_TOKENS, "adapter_len": VIRTUAL_TOKENS // 2,
                "adapter_layers": min(layers or 30, 30)}  # LLaMA-Adapter: 10 tokens in the top 30 layers
    declared = {f.name: f.default for f in dataclasses.fields(cls)}
    for key, value in defaults.items():
        if key in names and filled.get(key) is None and declared[key] is None:
            filled[key] = value
    return filled


def probe(adapter: Adapter, tokenizer: PreTrainedTokenizerBase, peft_type: str) -> None:
    """One forward of two tokens through tunelab's path, with gradients: a type whose layers need what only peft's
    own forward passes (task ids, ...) or whose trainable parameters never reach the model fails here, at build
    time, as one line, not in the middle of training."""
    import torch

    from tunelab.modeling import causal_lm_loss

    token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids = torch.tensor([[token, token]], device=adapter.model.device)
    was_training = adapter.training
    adapter.eval()  # no dropout: the probe draws no random numbers
    try:
        with torch.enable_grad():
            loss, _ = causal_lm_loss(adapter, ids, torch.ones_like(ids), ids)
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError, NotImplementedError) as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(f"method.peft_type={peft_type}: peft's layers fail in tunelab's forward pass "
                          f"(which calls the base model's modules, not peft's forward): {message}") from None
    finally:
        adapter.train(was_training)
    if not loss.requires_grad:
        raise ConfigError(f"method.peft_type={peft_type}: no trainable parameter reaches the model's output through "
                          "tunelab's forward pass; this type cannot be trained here")


class Peft(MethodDefaults):
    """Any peft type; its capabilities depend on ``peft_type`` (``capabilities_for``)."""

    name = "peft"
    Config = PeftMethodConfig
    # what some peft type may do; the rest of tunelab asks ``capabilities_for(config)`` for the exact set
    capabilities = Capabilities(trains=True, changes_weights=True, low_rank_delta=True)

    def parse_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Flat options (``method.r=4``) nested under ``options``; tunelab's own fields stay where they are."""
        own = {f.name for f in dataclasses.fields(PeftMethodConfig)}
        nested = dict(options.get("options") or {}) if isinstance(options.get("options"), dict) else {}
        out = {k: v for k, v in options.items() if k in own}
        out["options"] = {**nested, **{k: v for k, v in options.items() if k not in own}}
        return out

    def capabilities_for(self, config: PeftMethodConfig) -> Capabilities:
        import json

        return _capabilities(config.peft_type, json.dumps(config.options, sort_keys=True, default=str))

    def low_rank_delta(self, directory: Path, config: PeftMethodConfig) -> LowRankDelta | None:
        from tunelab.methods.lora import lora_delta

        return lora_delta(directory) if self.capabilities_for(config).low_rank_delta else None

    def build(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: PeftMethodConfig,
              train: Sequence[Example], seed: int, source: Source | None = None) -> Adapter:
        from tunelab.methods.peft_adapter import GenericPeftAdapter
        from tunelab.methods.transfer import require_no_prompt, starting_model

        require_no_prompt(source, self.name)
        model = starting_model(model, config, source)
        freeze(model)
        peft_config = build_peft_config(config.peft_type, fill_defaults(config.peft_type, config.options,
                                                                        model, tokenizer))
        try:
            wrapped = peft_model(model, peft_config)
        except (ValueError, TypeError, NotImplementedError, KeyError, AttributeError) as exc:
            message = " ".join(str(exc).split())
            raise ConfigError(f"method.peft_type={config.peft_type}: peft cannot apply it to this model: "
                              f"{message}") from None
        adapter = GenericPeftAdapter(wrapped, self.name, config, self.capabilities_for(config))
        probe(adapter, tokenizer, config.peft_type)
        return adapter

    def load(self, directory: Path, model: PreTrainedModel, config: PeftMethodConfig) -> Adapter:
        from tunelab.methods.peft_adapter import GenericPeftAdapter
        from tunelab.methods.transfer import saved_peft_model

        return GenericPeftAdapter(saved_peft_model(directory, model), self.name, config, self.capabilities_for(config))
