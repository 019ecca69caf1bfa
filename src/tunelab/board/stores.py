"""Finding results stores under the runs folder and reading their rows as the report does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.compare.store import open_existing
from tunelab.errors import TunelabError

BOARD_DIR = ".board"  # the board's own files (job state, saved configs) under the runs folder


def find_stores(runs: str | Path) -> list[str]:
    """Every ``*.sqlite`` under ``runs`` (relative paths, sorted), the board's own folder excepted."""
    root = Path(runs)
    if not root.is_dir():
        return []
    found = [p for p in root.rglob("*.sqlite") if BOARD_DIR not in p.relative_to(root).parts]
    return sorted(str(p.relative_to(root)) for p in found)


def store_path(runs: str | Path, name: str) -> Path:
    """A store picked from ``find_stores`` as a path; refuses one outside the runs folder."""
    root = Path(runs).resolve()
    path = (root / name).resolve()
    if root not in path.parents:
        raise TunelabError(f"store {name!r} is not under the runs folder {root}")
    return path


def store_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every stored cell as a dict with its task tags and tuning cost, exactly the rows ``build_report`` works on."""
    from tunelab.compare.summary import with_tuning_cost

    with open_existing(path) as db:
        return with_tuning_cost(db.tagged_rows(), db)


def claim_settings(path: str | Path) -> dict[str, Any]:
    """What the report's claims read from a store beside its rows: the grid's equivalence ``margins`` and the
    sequential tests' earlier ``looks`` (``compare.sequential``), as keyword arguments of ``claims_frames``."""
    from tunelab.compare.sequential import load_looks

    with open_existing(path) as db:
        return {"margins": db.margins() or None, "looks": load_looks(db.path) or None}


def done(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "done"]


def setting(row: dict[str, Any]) -> str:
    """A method setting as one label: the method, plus training-set size and prompt length when set."""
    label = row["method"]
    if row.get("train_size") is not None:
        label += f" · n={row['train_size']}"
    if row.get("prompt_length") is not None:
        label += f" · len={row['prompt_length']}"
    return label
