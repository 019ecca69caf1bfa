"""Loading files a stranger may have written without running their code.

Pickle (``torch.load`` of ``*.bin``/``*.pt``, ``pickle.load``) executes whatever the file says, so
tunelab never unpickles: adapters and checkpoints are safetensors + JSON, and a directory that
holds pickle-format weights is refused *before* peft or transformers see it (peft, for one, falls
back to ``adapter_model.bin`` when no safetensors file is there). Names that become paths
(adapter names, task names) go through ``paths.safe_child`` so they cannot leave their directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from tunelab.errors import ModelError, TunelabError
from tunelab.paths import safe_child

# Formats that are (or usually wrap) Python pickles; ``numpy.load`` of .npy/.npz only unpickles when
# asked to, so they are not listed.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")


class UnsafeFileError(TunelabError):
    """A directory holds pickle-format files, which can run code when loaded."""


def pickle_files(directory: str | Path) -> list[Path]:
    """Pickle-format files anywhere under ``directory`` (sorted)."""
    return sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def check_adapter_dir(directory: str | Path, needs_weights: bool = True) -> Path:
    """Refuse an adapter directory holding any pickle-format file, or (``needs_weights``) no safetensors."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TunelabError(f"adapter directory {directory} does not exist; pass the adapter/ a `tunelab run --out DIR` wrote")
    found = pickle_files(directory)
    if found:
        names = ", ".join(str(p.relative_to(directory)) for p in found[:3])
        raise UnsafeFileError(
            f"refusing to load {directory}: it holds pickle-format files ({names}), which can run arbitrary code "
            "when loaded; tunelab adapters are safetensors + JSON only. Convert the weights to safetensors "
            "(safetensors.torch.save_file) in a sandbox you trust and delete the pickle files")
    if needs_weights and not any(directory.rglob("*.safetensors")):
        raise UnsafeFileError(f"{directory} holds no *.safetensors weights; tunelab adapters are safetensors + JSON")
    return directory


def check_model_dir(directory: str | Path, allow_pickle: bool = False) -> bool:
    """For a local model directory: True when it has safetensors weights (load only those). A
    pickle-only directory is refused unless ``allow_pickle``; then returns False."""
    directory = Path(directory)
    if any(directory.glob("*.safetensors")):
        return True
    found = pickle_files(directory)
    if found and not allow_pickle:
        raise ModelError(
            f"{directory} holds only pickle-format weights ({found[0].name}), which can run arbitrary code when "
            "loaded; convert them to safetensors, or pass --allow-pickle (model.allow_pickle=true) if you trust "
            "whoever wrote them")
    return False


def adapter_path(root: str | Path, name: str) -> Path:
    """``root/name`` for an adapter called ``name``, refusing names that escape ``root``."""
    return safe_child(root, name)


def load_adapter(directory: str | Path, model: PreTrainedModel, base_model: str | None = None) -> Any:
    """Load a tunelab adapter directory onto ``model`` safely: refuse pickles, read
    ``tunelab_adapter.json``, validate its method options, then call that method's ``load``.

    With ``base_model``, refuse an adapter trained on another base model (its meta names it).
    """
    from tunelab.methods import method_config
    from tunelab.methods.base import ADAPTER_META, read_meta

    directory = check_adapter_dir(directory, needs_weights=False)  # before anything in it is parsed
    meta = read_meta(directory)
    if not isinstance(meta.get("method"), str) or not isinstance(meta.get("config", {}), dict):
        raise TunelabError(f"{directory / ADAPTER_META}: needs a 'method' name and a 'config' mapping")
    method, config = method_config({**meta.get("config", {}), "name": meta["method"]})
    if method.trains:
        check_adapter_dir(directory)
    from tunelab.models import portable_name, resolve_base_model

    saved_base = resolve_base_model(meta.get("base_model"))
    if base_model is not None and saved_base is not None and saved_base != portable_name(base_model):
        raise TunelabError(f"adapter {directory} was trained on {saved_base!r}, not {base_model!r}; "
                           f"load it with --model {saved_base}")
    return method.load(directory, model, config)
