"""Where tunelab keeps things on disk, and atomic writes so a crash never leaves half a file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError


def cache_dir() -> Path:
    """``$TUNELAB_CACHE`` or ``~/.cache/tunelab``."""
    return Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab")


def safe_child(root: str | Path, name: str) -> Path:
    """``root/name``, refusing names that would escape ``root`` (``..``, absolute paths, separators)."""
    if not name or name in {".", ".."} or "/" in name or "\\" in name or "\x00" in name:
        raise TunelabError(f"invalid name {name!r}: use letters, digits, '-', '_' or '.' only")
    root = Path(root).resolve()
    child = (root / name).resolve()
    if child.parent != root:
        raise TunelabError(f"name {name!r} escapes {root}")
    return child


@contextmanager
def _reported(path: Path):
    try:
        yield
    except OSError as exc:  # disk full, permission denied, ...: one line with the path
        raise TunelabError(f"cannot write {path}: {exc.strerror or exc}") from None


def _umask_mode(directory: bool) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    with _reported(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _umask_mode(directory=False))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextmanager
def atomic_directory(path: str | Path):
    """Yield a temp directory beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    with _reported(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        os.chmod(tmp, _umask_mode(directory=True))
    try:
        yield tmp
        with _reported(path):
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def directory_bytes(path: str | Path) -> int:
    """Total size of the files under ``path``."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
