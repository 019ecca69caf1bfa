"""The library's own errors. The CLI turns any of these into one line; nothing else is caught."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` (difflib), or nothing when none is close.

    >>> did_you_mean("prompt_tunning", ["icl", "prompt_tuning"])
    " (did you mean 'prompt_tuning'?)"
    """
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class TunelabError(Exception):
    """A problem the user can fix; the message says how."""


class ConfigError(TunelabError):
    """A config key, value or combination is wrong."""


class DataError(TunelabError):
    """A data file or record is malformed. Names the file, the line (or record index) and the field."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.path, self.line, self.field = path, line, field
        where = ":".join(str(p) for p in (path, line) if p is not None)
        prefix = f"{where}: " if where else ""
        suffix = f" (field '{field}')" if field else ""
        super().__init__(f"{prefix}{message}{suffix}")


class ModelError(TunelabError):
    """A model cannot be found or loaded."""
