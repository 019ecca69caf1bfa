"""What a saved adapter directory says about itself: a portable ``adapter_config.json`` and a model card.

peft records the base model as the path it was loaded from, which for tunelab's registry models is a
converted copy in one machine's cache (``~/.cache/tunelab/models/smollm2-135m``); that path means
nothing elsewhere. Here the peft config and the card name it as ``models.portable_name`` does (the
registry name, a hub id, or a path as the user gave it), and the card says exactly which weights the
adapter was trained on, on what task, with what scores and by which command.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab.models import model_spec, random_weights
from tunelab.paths import atomic_write_json, atomic_write_text

PEFT_CONFIG = "adapter_config.json"
CARD = "README.md"


@dataclass
class CardInfo:
    """The facts a model card states; all come from the run that wrote the adapter."""

    base_model: str  # portable name (models.portable_name)
    method: str
    task: str
    metrics: dict[str, float]
    metrics_ci: dict[str, list[float] | None] = field(default_factory=dict)
    n_train: int = 0
    n_eval: int = 0
    command: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # the method's resolved options
    versions: dict[str, str] = field(default_factory=dict)


def equivalent_command(config: dict[str, Any], defaults: dict[str, Any]) -> str:
    """A ``tunelab run`` command that reproduces a resolved config: every non-default value as an override."""
    overrides = [f"{key}={_yaml_value(value)}" for key, value in _changed(config, defaults)
                 if key not in ("train.resume", "report.to")]
    return " ".join(["tunelab", "run", *(shlex.quote(o) for o in overrides)])


def _changed(values: dict[str, Any], defaults: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in values.items():
        name, default = f"{prefix}{key}", defaults.get(key) if isinstance(defaults, dict) else None
        if isinstance(value, dict):
            out.extend(_changed(value, default if isinstance(default, dict) else {}, f"{name}."))
        elif value != default or name == "method.name":
            out.append((name, value))
    return out


def _yaml_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_yaml_value(v) for v in value) + "]"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def portable_peft_config(directory: Path, base_model: str) -> None:
    """Rewrite peft's machine-specific paths in ``adapter_config.json`` (base model, tokenizer) to
    ``base_model``; nothing to do for a directory without one (full fine-tuning, ICL)."""
    path = Path(directory) / PEFT_CONFIG
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_model
    tokenizer = config.get("tokenizer_name_or_path")
    if tokenizer is not None and (tokenizer == "base_model" or Path(tokenizer).is_absolute()):
        config["tokenizer_name_or_path"] = base_model
    atomic_write_json(path, config)


def _front_matter(text: str) -> dict[str, Any]:
    """The YAML metadata block peft wrote at the top of README.md ({} if none)."""
    if not text.startswith("---"):
        return {}
    _, block, *_ = text.split("---", 2) + [""]
    return yaml.safe_load(block) or {}


def card_metadata(directory: Path, info: CardInfo) -> dict[str, Any]:
    """peft's card metadata (library, tags, pipeline) with the base model named portably."""
    existing = Path(directory) / CARD
    meta = _front_matter(existing.read_text()) if existing.is_file() else {}
    spec = model_spec(info.base_model)
    hub_id = spec.hub_id if spec else (info.base_model if _looks_like_hub_id(info.base_model) else None)
    tags = [t for t in meta.get("tags", []) if not str(t).startswith("base_model:")]
    if hub_id:
        meta["base_model"] = hub_id  # the hub's field takes hub ids; the text says which weights exactly
        tags.insert(0, f"base_model:adapter:{hub_id}")
    else:
        meta.pop("base_model", None)
    meta["tags"] = sorted(set(tags) | {"tunelab", info.method.replace("_", "-")})
    meta.setdefault("library_name", "peft" if (Path(directory) / PEFT_CONFIG).is_file() else "transformers")
    meta.setdefault("pipeline_tag", "text-generation")
    return meta


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def _weights_line(base_model: str) -> str:
    spec = model_spec(base_model)
    if spec is not None:
        return spec.weights or spec.description
    return f"`{base_model}` as transformers loads it (float32)"


def _load_hint(base_model: str) -> str:
    if random_weights(base_model):  # tiny and the random: entries: rebuilt from the seed, nothing to download
        return f'`tunelab.models.load_model("{base_model}", seed=SEED)`, SEED = the run\'s train.seed'
    if model_spec(base_model) is not None:
        return (f'`AutoModelForCausalLM.from_pretrained(tunelab.models.model_dir("{base_model}"))`, '
                "tunelab's local copy")
    return f'`AutoModelForCausalLM.from_pretrained("{base_model}")`'


def model_card(directory: Path, info: CardInfo) -> str:
    """The README.md text: metadata, exact base weights, task, metrics, command, options, versions."""
    meta = card_metadata(directory, info)
    peft_config = Path(directory) / PEFT_CONFIG
    init = ""
    if peft_config.is_file():
        config = json.loads(peft_config.read_text())
        if config.get("prompt_tuning_init"):
            text = config.get("prompt_tuning_init_text")
            init = f"\nThe soft prompt started as `{config['prompt_tuning_init']}`" + (
                f" from the text {json.dumps(text)}." if text else ".")
    if info.options.get("init_from"):
        init += f"\nIt started from the run in `{info.options['init_from']}` (`method.init_from`)."
    rows = "\n".join(f"| {name} | {value:.4f} | {_ci(info.metrics_ci.get(name))} |"
                     for name, value in info.metrics.items())
    options = "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in info.options.items())
    versions = "\n".join(f"- {k} {v}" for k, v in info.versions.items())
    return f"""---
{yaml.safe_dump(meta, sort_keys=True).strip()}
---

# {info.method} adapter for `{info.base_model}` on {info.task}

## Base model

- tunelab name: `{info.base_model}` (`tunelab ls models`)
- weights trained on: {_weights_line(info.base_model)}

Outside tunelab, load those exact weights first ({_load_hint(info.base_model)}), then this directory with
`peft.PeftModel.from_pretrained(model, "<this directory>")`; tunelab's docs/interop.md has the snippet,
and says why a soft-prompt adapter should be decoded with a forward loop rather than peft's `generate()`.

## Training
{init}
Trained on {info.n_train} examples of `{info.task}`; evaluated on {info.n_eval}. Reproduce with:

```bash
{info.command}
```

| metric | value | 95% bootstrap CI |
|---|---|---|
{rows}

## Method options

| option | value |
|---|---|
{options}

## Framework versions

{versions}
"""


def _ci(ci: list[float] | None) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "-"


def finish_adapter_dir(directory: Path, info: CardInfo) -> None:
    """Make a freshly saved adapter directory portable and self-describing (peft config + README.md)."""
    portable_peft_config(directory, info.base_model)
    atomic_write_text(Path(directory) / CARD, model_card(directory, info))
