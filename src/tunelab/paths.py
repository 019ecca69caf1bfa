"""Where tunelab keeps things on disk, and atomic writes so a crash never leaves half a file.

Every file tunelab writes goes through ``atomic_write_bytes`` (temp file in the same directory,
fsync, rename) or ``atomic_directory`` (temp directory, rename). OS errors while writing
(disk full, permission denied, a file where a directory should be) become one ``TunelabError``
line naming the path, which the CLI prints without a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from tunelab.errors import TunelabError


def cache_dir() -> Path:
    """``$TUNELAB_CACHE`` or ``~/.cache/tunelab``."""
    return Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab")


def safe_child(root: str | Path, name: str) -> Path:
    """``root/name``, refusing names that would escape ``root`` (``..``, absolute paths, separators,
    symlinks pointing elsewhere)."""
    if not name or name in {".", ".."} or "/" in name or "\\" in name or "\x00" in name:
        raise TunelabError(f"invalid name {name!r}: use letters, digits, '-', '_' or '.' only")
    root = Path(root).resolve()
    child = (root / name).resolve()
    if child.parent != root:
        raise TunelabError(f"name {name!r} escapes {root}")
    return child


@contextmanager
def _reported(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:  # disk full, permission denied, ...: one line with the path
        reason = exc.strerror or str(exc)
        if isinstance(exc, FileExistsError | NotADirectoryError):
            reason += " (a file is where a directory should be)"
        raise TunelabError(f"cannot write {path}: {reason}") from None
    except SafetensorError as exc:  # safetensors wraps the OS error in its own type
        if "I/O error" not in str(exc):
            raise
        # "Error while serializing: I/O error: No space left on device (os error 28) at path ..."
        reason = re.sub(r"\s*\(os error \d+\)", "", str(exc).split("I/O error:", 1)[1].split(" at path", 1)[0]).strip()
        raise TunelabError(f"cannot write {path}: {reason}") from None


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
    """``atomic_write_bytes`` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """``atomic_write_bytes`` of indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover_directory(path: str | Path) -> None:
    """Undo a replacement that a crash interrupted between its two renames (see ``atomic_directory``)."""
    path = Path(path)
    if not path.exists() and _old(path).is_dir():
        os.replace(_old(path), path)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; on success it replaces ``path`` by renames.

    A new ``path`` appears in one rename. Replacing an existing one takes two (``path`` ->
    ``.path.old``, temp -> ``path``); a crash between them is undone by ``recover_directory``,
    which the next ``atomic_directory`` on the same path calls first.
    """
    path = Path(path)
    with _reported(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        recover_directory(path)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        os.chmod(tmp, _umask_mode(directory=True))
    try:
        with _reported(path):
            yield tmp
            if path.exists():
                old = _old(path)
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and prove a file can be written there; fails fast, before hours of
    training, with one line naming the path."""
    path = Path(path)
    with _reported(path):
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    return path


def directory_bytes(path: str | Path) -> int:
    """Total size of the files under ``path``."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
