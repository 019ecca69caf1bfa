"""Allowed values declared on the config field itself (``batch_size: int = at_least(1, default=8)``), and
``from_dict``, which builds a config dataclass from plain data and checks them.

Each helper returns a ``dataclasses.field`` whose metadata holds a ``Rule``; ``from_dict`` checks it after
the value's type is coerced, so every config built from YAML, dotted overrides or CLI
flags is checked before any model loads. A bad value fails with one line in one shape:

    train.batch_size: got 0, expected an integer >= 1
    data.template: got 'x', expected one of auto, chat, alpaca, plain

``None`` always passes (``int | None`` fields mean "not set"); a subclass that redeclares a field only
to change its default keeps the base class's rule (see ``rule_for``). Checks that involve two fields
stay in the dataclass's ``__post_init__``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tunelab.errors import ConfigError, did_you_mean

RULE = "tunelab.rule"  # the metadata key
COERCE = "tunelab.coerce"  # metadata: a function (raw value, path) -> value that builds the field's value itself
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


def built_by(coerce: Callable[[Any, str], Any], factory: Callable[[], Any]) -> Any:
    """A field whose value ``coerce(raw, path)`` builds from what was given (``RunConfig.method``: a method
    name or ``{name: ..., **options}`` -> that method's own config dataclass)."""
    return dataclasses.field(default_factory=factory, metadata={COERCE: coerce})


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


# Building a dataclass from plain data (YAML, JSON, dotted overrides): keys, types, then each field's rule

def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking key names, value types and each field's declared rule."""
    where = f"{path}." if path else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: got {data!r}, expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in fields}
    unknown = sorted(str(k) for k in set(data) - names)
    if unknown:
        section = f"{path}: " if path else ""  # every message starts with the path it is about
        key = where + unknown[0]  # repr: a key with a newline still makes one line
        raise ConfigError(f"{section}unknown config key {key!r}{did_you_mean(unknown[0], names)}; "
                          f"valid keys: {', '.join(sorted(names))}")
    missing = [f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}{missing[0]}: missing; set it in the config file, as {where}{missing[0]}=VALUE "
                          "or with its flag")
    kwargs = {}
    by_name = {f.name: f for f in fields}
    for key, raw in data.items():
        own = by_name[key].metadata.get(COERCE)  # a field that builds its own value (``RunConfig.method``)
        if own is None and isinstance(raw, dict) and raw and not _takes_mapping(hints[key]):  # `model.name=x`: a str
            not_a_section(cls, f"{where}{key}", next(iter(raw)))
        value = own(raw, f"{where}{key}") if own is not None else _coerce(hints[key], raw, f"{where}{key}")
        check(cls, key, hints[key], value, raw, f"{where}{key}")
        kwargs[key] = value
    return cls(**kwargs)


def _takes_mapping(hint: Any) -> bool:
    """Whether a field of type ``hint`` can be given as a mapping (a section, a dict, a method spec)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_takes_mapping(a) for a in typing.get_args(hint))
    return hint is Any or hint is dict or typing.get_origin(hint) is dict or dataclasses.is_dataclass(hint)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, path)  # type: ignore[arg-type]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: got {value!r}, expected a list")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: got {value!r}, expected a mapping")
        return dict(value)
    if hint is Any:
        return value
    return _scalar(hint, value, path)


def _scalar(hint: type, value: Any, path: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
            return value.lower() in {"true", "1", "yes"}
        raise ConfigError(f"{path}: got {value!r}, expected true/false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: got {value!r}, expected an integer")
    if hint is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else float("inf")  # huge ints overflow float()
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None and finite(number):
            return number
        raise ConfigError(f"{path}: got {value!r}, expected a {'finite ' if number is not None else ''}number")
    if hint is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: got {value!r}, expected a string")
    return value


def not_a_section(cls: type, key: str, sub: str) -> None:
    names = sorted(f.name for f in dataclasses.fields(cls) if f.init)
    also = did_you_mean(f"{key}.{sub}", getattr(cls, "ALIASES", {}))  # data.max_evl -> data.max_eval
    raise ConfigError(f"{key}: a value, not a section, so {key + '.' + str(sub)!r} is not a config key{also}; "
                      f"valid keys: {', '.join(names)}")
