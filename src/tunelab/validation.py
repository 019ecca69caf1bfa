"""Allowed values declared on the config field itself: ``batch_size: int = at_least(1, default=8)``.

Each helper returns a ``dataclasses.field`` whose metadata holds a ``Rule``; ``tunelab.config.from_dict``
checks it after the value's type is coerced, so every config built from YAML, dotted overrides or CLI
flags is checked before any model loads. A bad value fails with one line in one shape:

    train.batch_size: got 0, expected an integer >= 1
    data.template: got 'x', expected one of auto, chat, alpaca, plain

``None`` always passes (``int | None`` fields mean "not set"); a subclass that redeclares a field only
to change its default keeps the base class's rule (see ``rule_for``). Checks that involve two fields
stay in the dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tunelab.errors import ConfigError

RULE = "tunelab.rule"  # the metadata key
_NOUNS = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}


@dataclass(frozen=True)
class Rule:
    """A predicate on a coerced value and the words that describe what it accepts."""

    test: Callable[[Any], bool]
    expected: str | Callable[[], str]  # ">= 1", "one of a, b": what follows "expected" (a callable: computed late)
    typed: bool = True  # prefix the type's noun ("an integer >= 1"); choices and patterns read without it

    def describe(self, hint: Any) -> str:
        expected = self.expected() if callable(self.expected) else self.expected
        noun = _NOUNS.get(_base_type(hint)) if self.typed else None
        return f"{noun} {expected}" if noun else expected


def _field(rule: Rule, default: Any, factory: Callable[[], Any] | None) -> Any:
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={RULE: rule})
    return dataclasses.field(default=default, metadata={RULE: rule})


def at_least(minimum: float, default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None) -> Any:
    """A field whose value must be >= ``minimum``."""
    return _field(Rule(lambda v: v >= minimum, f">= {minimum}"), default, factory)


def above(minimum: float, default: Any = dataclasses.MISSING) -> Any:
    """A field whose value must be > ``minimum`` (learning rates, temperatures)."""
    return _field(Rule(lambda v: v > minimum, f"> {minimum}"), default, None)


def between(low: float, high: float, default: Any = dataclasses.MISSING, *, low_open: bool = False,
            high_open: bool = False) -> Any:
    """A field in the interval from ``low`` to ``high`` (closed unless ``low_open`` / ``high_open``)."""
    def test(v: Any) -> bool:
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    span = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return _field(Rule(test, span), default, None)


def choice(choices: Sequence[Any], default: Any = dataclasses.MISSING) -> Any:
    """A field whose value must be one of ``choices`` (a tuple, or a dict's keys), imported from the module
    that owns the list (``tunelab.choices`` for lists owned by modules that import torch)."""
    allowed = tuple(choices)
    return _field(Rule(lambda v: v in allowed, f"one of {', '.join(map(str, allowed))}", typed=False), default, None)


def each_of(choices: Sequence[Any], default: Any = dataclasses.MISSING) -> Any:
    """A list field whose every item must be one of ``choices`` (as in ``choice``)."""
    allowed = tuple(choices)
    return _field(Rule(lambda v: all(x in allowed for x in v), f"a list of: {', '.join(map(str, allowed))}",
                       typed=False), default, None)


def matching(pattern: str, expected: str, default: Any = dataclasses.MISSING) -> Any:
    """A string field that must match ``pattern`` entirely; ``expected`` says what that means to a user."""
    regex = re.compile(pattern)
    return _field(Rule(lambda v: bool(regex.fullmatch(str(v))), expected, typed=False), default, None)


def satisfying(test: Callable[[Any], bool], expected: str | Callable[[], str], default: Any = dataclasses.MISSING) -> Any:
    """A field checked by ``test`` (e.g. a parser that must accept it); ``expected`` describes the valid values."""
    return _field(Rule(test, expected, typed=False), default, None)


def rule_for(cls: type, name: str) -> Rule | None:
    """The rule declared for field ``name`` on ``cls`` or, when ``cls`` only redeclares it, on a base class."""
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        found = {f.name: f for f in dataclasses.fields(klass)}.get(name)
        if found is not None and RULE in found.metadata:
            return found.metadata[RULE]
    return None


def check(cls: type, name: str, hint: Any, value: Any, raw: Any, path: str) -> None:
    """ConfigError ``path: got RAW, expected ...`` unless ``value`` passes the rule declared for the field."""
    rule = rule_for(cls, name)
    if rule is None or value is None:
        return
    try:
        ok = bool(rule.test(value))
    except TypeError:  # e.g. a list where a number was declared: the type check let it through
        ok = False
    if not ok:
        raise ConfigError(f"{path}: got {raw!r}, expected {rule.describe(hint)}")


def finite(value: float) -> bool:
    """True for real numbers (nan and +-inf are never a sensible setting)."""
    return math.isfinite(value)


def _base_type(hint: Any) -> Any:
    """``int`` for ``int | None``; the hint itself otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint
