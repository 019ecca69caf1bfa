"""Mixing several datasets (or the tasks inside one) into one training set.

Examples-proportional mixing with a cap (Raffel et al. 2020 §3.5.2; Flan, Wei et al. 2022 §2.3 and
Chung et al. 2022): a source's share is proportional to ``weight * min(size, cap)``, so large
datasets cannot drown small ones. The result is a finite, seeded list: the same sources, weights,
cap and seed always give the same examples in the same order.

>>> a = [Example(id=f"a{i}", task="a", instruction="", output="x") for i in range(100)]
>>> b = [Example(id=f"b{i}", task="b", instruction="", output="y") for i in range(10)]
>>> mixed = mix([Source("a", a), Source("b", b)], cap=20, seed=0)
>>> sorted(Counter(e.task for e in mixed).items())
[('a', 20), ('b', 10)]
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from tunelab.data.example import Example
from tunelab.errors import ConfigError


@dataclass(frozen=True)
class Source:
    """One component of a mixture."""

    name: str
    examples: Sequence[Example]
    weight: float = 1.0


def by_task(examples: Sequence[Example]) -> list[Source]:
    """One source per ``Example.task``, in first-seen order."""
    groups: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        groups[e.task].append(e)
    return [Source(name, group) for name, group in groups.items()]


def mixture_counts(sources: Sequence[Source], cap: int | None = None, total: int | None = None) -> dict[str, int]:
    """How many examples each source contributes.

    Without ``total`` the mixture has ``sum(min(size, cap))`` examples; its shares then follow the
    weights (a weight of 2 doubles a source's share, repeating examples if it runs out).
    """
    if not sources:
        raise ConfigError("a mixture needs at least one source")
    for s in sources:
        if s.weight < 0 or not len(s.examples):
            raise ConfigError(f"mixture source {s.name!r}: weight must be >= 0 and the source non-empty")
    if cap is not None and cap < 1:
        raise ConfigError(f"mixture cap must be >= 1 (got {cap})")
    capped = {s.name: min(len(s.examples), cap) if cap else len(s.examples) for s in sources}
    rates = {s.name: s.weight * capped[s.name] for s in sources}
    mass = sum(rates.values())
    if mass <= 0:
        raise ConfigError("every mixture weight is 0")
    n = total if total is not None else sum(capped.values())
    # Largest-remainder rounding keeps the total exact and the split deterministic.
    exact = {k: n * r / mass for k, r in rates.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: (counts[k] - exact[k], k))[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def _take(examples: Sequence[Example], n: int, rng: random.Random) -> list[Example]:
    """``n`` examples: seeded permutations, repeated whole when ``n`` exceeds the source."""
    out: list[Example] = []
    while len(out) < n:
        order = list(range(len(examples)))
        rng.shuffle(order)
        out.extend(examples[i] for i in order[: n - len(out)])
    return out


def mix(sources: Sequence[Source], cap: int | None = None, total: int | None = None, seed: int = 0) -> list[Example]:
    """The mixed, shuffled training list (see ``mixture_counts``)."""
    counts = mixture_counts(sources, cap, total)
    out: list[Example] = []
    for s in sources:
        out.extend(_take(s.examples, counts[s.name], random.Random(f"tunelab:mix:{seed}:{s.name}")))
    random.Random(f"tunelab:mix:{seed}").shuffle(out)
    return out


def parse_source(spec: str) -> tuple[str, float]:
    """``"path/to/data.json@2"`` -> (path, 2.0); no ``@`` means weight 1."""
    path, sep, weight = spec.rpartition("@")
    if not sep:
        return spec, 1.0
    try:
        return path, float(weight)
    except ValueError:
        raise ConfigError(f"mixture entry {spec!r}: the part after '@' must be a weight (e.g. data.json@2)") from None


def describe(examples: Sequence[Example]) -> dict[str, int]:
    """Examples per task, largest first."""
    return dict(Counter(e.task for e in examples).most_common())


__all__ = ["Source", "by_task", "mixture_counts", "mix", "parse_source", "describe"]
