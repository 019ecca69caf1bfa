"""What a committed results store keeps of a cell beyond its row, so that no ``cells/`` folder is needed.

A store is meant to be committed beside its report (``docs/results/NAME/results.sqlite``) while the
cell folders are not. For the report, the claims, sizing and the board's Examples view to work from the
store alone, it keeps, per finished cell (``compare.store``):

- its predictions rows, pruned to the fields those readers use (``EXAMPLE_FIELDS``), as one
  lzma-compressed JSON document in the ``examples`` table, with the per-example teacher-forced losses
  of ``result.generalization`` (``NLL_FIELDS``), which leave the ``result`` column (it keeps the means);
- the references once per distinct list (table ``shared``, keyed by their SHA-256): every cell of a
  task scores against the same ones, and on E2E they are most of a predictions file;
- for a cell that another cell starts from (``init_from: {cell: ...}``), its adapter folder as a tar.xz
  (table ``adapters``) when its files total at most ``ADAPTER_LIMIT`` (a soft prompt: tens of KB), so a
  fresh clone can still run the cells that start from it.

``compare.store`` creates these tables and calls ``write_examples`` in the transaction that records the
cell; ``read_reference`` is how ``compare.examples.read_predictions`` reads a cell without its files.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import sqlite3
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.paths import atomic_directory, directory_bytes

EXAMPLE_FIELDS = ("id", "prediction", "references", "scores", "ranked_prediction", "demo_similarity",
                  "demonstrations")  # what compare.examples, claims, report, sizing and board.examples read
DEMO_FIELDS = ("instruction", "input", "output")  # a demonstration as the board shows it
NLL_FIELDS = ("train_nll", "eval_nll")  # result.generalization's per-example losses (claims' loss-gap test)
REFERENCE = "sqlite:"  # a row's ``predictions`` when only the store holds them: sqlite:<store path>#<key>
# bytes of adapter files kept in a store: soft prompts (~50 KB) and a 135M-270M model's LoRA (r 8 on q, v: ~1.9 MB)
# yes, full fine-tuning no; kept while a planned or stored cell starts from it (compare._keep_sources)
ADAPTER_LIMIT = 4 << 20


@dataclass
class Packed:
    """One cell's examples ready for the store: its blob, its references (digest, blob) and its slimmer result."""

    examples: bytes
    digest: str
    references: bytes
    result: dict[str, Any] | None


def compress(obj: Any) -> bytes:
    """``obj`` as compact JSON, lzma-compressed."""
    return lzma.compress(json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode())


def decompress(blob: bytes) -> Any:
    """The object ``compress`` packed."""
    return json.loads(lzma.decompress(blob))


def pack_examples(predictions: Path, result: dict[str, Any] | None) -> Packed | None:
    """A cell's predictions.jsonl (and the per-example losses of its ``result``) packed; None without the file."""
    if not predictions.is_file():
        return None
    rows = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
    references = [r.get("references", []) for r in rows]
    digest = hashlib.sha256(json.dumps(references, ensure_ascii=False).encode()).hexdigest()
    kept = [_pruned(r) for r in rows]
    nll: dict[str, Any] = {}
    if result is not None and isinstance(result.get("generalization"), dict):
        general = dict(result["generalization"])
        nll = {name: general.pop(name) for name in NLL_FIELDS if name in general}
        result = {**result, "generalization": general}
    return Packed(compress({"rows": kept, "references": digest, "nll": nll}), digest, compress(references), result)


def _pruned(row: dict[str, Any]) -> dict[str, Any]:
    kept = {k: row[k] for k in EXAMPLE_FIELDS if k in row and k != "references"}
    if "demonstrations" in kept:
        kept["demonstrations"] = [{k: d[k] for k in DEMO_FIELDS if d.get(k)} for d in kept["demonstrations"]]
    return kept


@lru_cache(maxsize=256)
def unpack_examples(examples: bytes, references: bytes) -> tuple[tuple[dict[str, Any], ...], dict[str, Any]]:
    """(predictions rows with their references, per-example losses) of a packed cell; cached per blob."""
    data = decompress(examples)
    refs = decompress(references)
    rows = tuple({**r, "references": ref} for r, ref in zip(data["rows"], refs, strict=True))
    return rows, data.get("nll") or {}


def pack_adapter(directory: Path, limit: int = ADAPTER_LIMIT) -> bytes | None:
    """The adapter folder as a tar.xz; None when it is missing or its files total more than ``limit`` bytes."""
    if not directory.is_dir() or directory_bytes(directory) > limit:
        return None
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(directory)))
    return buffer.getvalue()


def unpack_adapter(blob: bytes, directory: Path) -> None:
    """Put a ``pack_adapter`` archive back as ``directory`` (atomically; plain files only, nothing outside it)."""
    with atomic_directory(directory) as tmp, tarfile.open(fileobj=io.BytesIO(blob), mode="r:xz") as tar:
        tar.extractall(tmp, filter="data")


def write_examples(conn: sqlite3.Connection, key: str, packed: Packed | None) -> None:
    """A cell's examples blob (and its references, once per distinct list), or none for a cell without."""
    if packed is None:
        conn.execute("DELETE FROM examples WHERE key = ?", (key,))
        return
    conn.execute("INSERT OR IGNORE INTO shared VALUES (?, ?)", (packed.digest, packed.references))
    conn.execute("INSERT OR REPLACE INTO examples VALUES (?, ?, ?)", (key, packed.examples, packed.digest))


def is_cell_dir(path: str) -> bool:
    """``.../cells/<16 hex>``: a grid cell's output directory (what ``grid.resolve_sources`` writes)."""
    name = Path(path).name
    return Path(path).parent.name == "cells" and len(name) == 16 and all(c in "0123456789abcdef" for c in name)


def source_key(config: dict[str, Any] | None) -> str | None:
    """Key of the cell a stored cell started from (``init_from`` naming a grid cell's folder); None if none."""
    source = ((config or {}).get("method") or {}).get("init_from")
    return Path(source).name if isinstance(source, str) and is_cell_dir(source) else None


def source_keys(configs: Iterable[dict[str, Any] | None]) -> set[str]:
    """Keys of the cells that stored cells started from."""
    return {key for config in configs if (key := source_key(config)) is not None}


def source_cell(source: dict[str, Any]) -> dict[str, Any]:
    """How a cell names the cell it started from (``source_cell``, read by the claims' transfer contrasts): that
    cell's method (registry name), label and task."""
    return {"method": source["method_name"], "label": source["method"], "task": source["task"]}


def read_reference(reference: str) -> tuple[tuple[dict[str, Any], ...], dict[str, Any]]:
    """(predictions rows, per-example losses) of the cell a ``sqlite:<store>#<key>`` reference names."""
    path, _, key = reference[len(REFERENCE):].rpartition("#")
    if not Path(path).is_file():
        raise TunelabError(f"{path} is missing: the store row points at examples kept in that results store")
    conn = sqlite3.connect(path, timeout=60)
    try:
        found = conn.execute("SELECT examples.data, shared.data FROM examples JOIN shared ON shared.digest = "
                             "examples.refs WHERE examples.key = ?", (key,)).fetchone()
    finally:
        conn.close()
    if found is None:
        raise TunelabError(f"{path} holds no examples of cell {key}")
    return unpack_examples(found[0], found[1])


def size_line(sizes: dict[str, int]) -> str:
    """``Store.size()`` as one line, e.g. ``412 KB: 49 cells; examples 298 KB, references 51 KB, adapters 40 KB``."""
    parts = ", ".join(f"{name} {_bytes(sizes[name])}" for name in ("examples", "references", "adapters"))
    return f"{_bytes(sizes['total'])}: {sizes['cells']} cells; {parts}"


def _bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"
