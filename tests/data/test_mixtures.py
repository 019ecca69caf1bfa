"""Examples-proportional mixing with a per-task cap; deterministic with a seed."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from tests.conftest import shared_path

from tunelab.data import Example, load_task
from tunelab.data.mixtures import Source, by_task, mix, mixture_counts, parse_source
from tunelab.errors import ConfigError


def examples(task: str, n: int) -> list[Example]:
    return [Example(id=f"{task}-{i}", task=task, instruction="i", output=str(i)) for i in range(n)]


def test_cap_limits_large_sources_and_keeps_small_ones_whole():
    sources = [Source("big", examples("big", 1000)), Source("mid", examples("mid", 80)), Source("small", examples("small", 5))]
    assert mixture_counts(sources, cap=100) == {"big": 100, "mid": 80, "small": 5}
    mixed = mix(sources, cap=100, seed=0)
    assert Counter(e.task for e in mixed) == {"big": 100, "mid": 80, "small": 5}
    assert len({e.id for e in mixed}) == len(mixed)  # without upsampling nothing repeats


def test_weights_and_total_follow_the_capped_sizes():
    sources = [Source("a", examples("a", 1000), weight=2.0), Source("b", examples("b", 50))]
    counts = mixture_counts(sources, cap=100, total=500)
    # rates: a = 2 * 100, b = 1 * 50  ->  shares 0.8 / 0.2
    assert counts == {"a": 400, "b": 100}
    mixed = mix(sources, cap=100, total=500, seed=1)
    assert Counter(e.task for e in mixed) == counts
    assert Counter(e.id for e in mixed if e.task == "b").most_common(1)[0][1] == 2  # b repeats whole epochs


def test_same_seed_same_mixture_other_seed_other_order():
    sources = by_task(examples("a", 300) + examples("b", 40))
    one, two, other = mix(sources, cap=50, seed=3), mix(sources, cap=50, seed=3), mix(sources, cap=50, seed=4)
    assert one == two and one != other
    assert Counter(e.task for e in other) == Counter(e.task for e in one)


def test_total_is_exact_with_rounding():
    sources = [Source(str(k), examples(str(k), 7)) for k in range(3)]
    assert sum(mixture_counts(sources, total=10).values()) == 10


@pytest.mark.parametrize("kwargs", [{"cap": 0}, {"total": None, "cap": -1}])
def test_bad_cap_is_a_config_error(kwargs):
    with pytest.raises(ConfigError, match="cap"):
        mixture_counts([Source("a", examples("a", 3))], **kwargs)


def test_parse_source():
    assert parse_source("data/a.json@2.5") == ("data/a.json", 2.5)
    assert parse_source("data/a.json") == ("data/a.json", 1.0)
    with pytest.raises(ConfigError, match="weight"):
        parse_source("a.json@heavy")


def test_super_ni_thirty_task_mixture_with_cap():
    task = load_task(str(shared_path("super_ni")), task_cap=100, seed=0)
    counts = Counter(e.task for e in task.train)
    assert len(counts) == 30
    assert max(counts.values()) == 100 and counts["task1452_location_entity_extraction_btc_corpus"] == 100
    assert len(task.eval) == 2935  # the eval split is never mixed


def test_extra_sources_are_mixed_into_the_train_split(tmp_path):
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"instruction": "x", "output": str(i), "task": "extra"}) + "\n"
                             for i in range(30)))
    task = load_task("sentiment", mixture=[f"{extra}@1"], task_cap=50, seed=0)
    assert Counter(e.task for e in task.train) == {"sentiment": 50, "extra": 30}
    assert len(task.eval) == 200
