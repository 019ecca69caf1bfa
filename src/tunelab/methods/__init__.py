"""Method registry: one module per method, one line each here."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from tunelab.errors import ConfigError, did_you_mean
from tunelab.methods.base import Method, MethodConfig
from tunelab.methods.discrete_prompt import DiscretePrompt
from tunelab.methods.full_finetune import FullFinetune
from tunelab.methods.icl import ICL
from tunelab.methods.instruction_tuning import InstructionTuning
from tunelab.methods.ipt import IPT
from tunelab.methods.lora import Lora
from tunelab.methods.p_tuning import PTuning
from tunelab.methods.peft_method import Peft
from tunelab.methods.prefix_tuning import PrefixTuning
from tunelab.methods.prompt_optimization import PromptOptimization
from tunelab.methods.prompt_tuning import PromptTuning
from tunelab.validation import from_dict

DEFAULT_METHOD = "prompt_tuning"  # what `tunelab run` trains when no method is named

METHODS: dict[str, Method] = {
    "icl": ICL(),
    "discrete_prompt": DiscretePrompt(),
    "prompt_tuning": PromptTuning(),
    "ipt": IPT(),
    "prefix_tuning": PrefixTuning(),
    "p_tuning": PTuning(),
    "lora": Lora(),
    "full_finetune": FullFinetune(),
    "instruction_tuning": InstructionTuning(),
    "prompt_optimization": PromptOptimization(),
    "peft": Peft(),
}


def get_method(name: str) -> Method:
    """The registered method called ``name``, or an error listing the valid names."""
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"unknown method {name!r}{did_you_mean(name, METHODS)}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def method_config(spec: dict[str, Any] | MethodConfig, path: str = "method") -> tuple[Method, MethodConfig]:
    """Validate ``{"name": ..., **options}`` against the method's own config dataclass.

    The name defaults to ``prompt_tuning`` (as ``RunConfig``'s); errors name ``path`` (``method.k``,
    ``methods[1].k`` in a grid). An already built config is returned with its method.
    """
    if isinstance(spec, MethodConfig):
        return get_method(spec.name), spec
    options = dict(spec)
    name = options.pop("name", DEFAULT_METHOD)
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"{path}.name: unknown method {name!r}{did_you_mean(name, METHODS)}; "
                          f"choose one of {', '.join(METHODS)}")
    method = METHODS[name]
    try:
        config = from_dict(method.Config, method.parse_options(options), path=path)
    except TypeError as exc:  # __post_init__ signature problems surface as TypeError
        names = ", ".join(f.name for f in fields(method.Config))
        raise ConfigError(f"{path}: method {method.name}: {exc}; valid options: {names}") from None
    return method, config.bind(method.name, options)


__all__ = ["DEFAULT_METHOD", "METHODS", "Method", "MethodConfig", "get_method", "method_config"]
