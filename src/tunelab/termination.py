"""Did the answers end? The share of a cell's generations that ran on to the token limit.

An answer ends at an end-of-sequence token or a stop string (``eval.stop``); one that does neither runs until
``max_new_tokens`` (``evaluate.derive_max_new_tokens``: 1.5x the longest reference plus 8) and is cut there,
usually a loop of repeated sentences that scores far below the model's ended answers on BLEU or ROUGE. A prompt
tuned for a few dozen steps may not yet have learned to emit the end token: on the paper preset (Gemma 3 270M
base, 40 steps), the seeds of prompt tuning on E2E whose answers ran on are the seeds with low BLEU, so the spread
over seeds that the variance claim reads is largely this (docs/results/paper/README.md). The report shows each
cell's share (section "Termination") and a claim's verdict names a side with cells over ``THRESHOLD``.

Pure: reads what ``tunelab.run`` recorded in a cell's result (``eval.termination``); None for cells that did not
record it (stored before it existed, or scored by ranking only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

THRESHOLD = 0.10  # a cell with more than this share of its answers cut at the token limit is flagged


def ran_to_limit(new_ids: int, text: str, max_new_tokens: int, stop: Sequence[str]) -> bool:
    """Was this generation cut by the token limit, not ended by the model? ``new_ids``: the tokens it generated
    (end token excluded), ``text``: its decoded text before cutting at a stop string.

    >>> ran_to_limit(40, "a b c", 40, ["\\n"]), ran_to_limit(40, "a\\nb", 40, ["\\n"]), ran_to_limit(39, "a", 40, [])
    (True, False, False)
    """
    return new_ids >= max_new_tokens and not any(s and s in text for s in stop)


def record(flags: Sequence[bool], max_new_tokens: int) -> dict[str, Any]:
    """What a cell's result keeps: how many of its answers were cut, of how many, at which limit."""
    return {"at_limit": int(sum(flags)), "answers": len(flags), "max_new_tokens": int(max_new_tokens)}


def of_row(row: dict[str, Any]) -> dict[str, Any] | None:
    """A stored cell's termination record plus ``share`` (cut answers / answers); None if it has none."""
    found = ((row.get("result") or {}).get("eval") or {}).get("termination")
    if not found or not found.get("answers"):
        return None
    return {**found, "share": found["at_limit"] / found["answers"]}


def runaway(row: dict[str, Any]) -> bool | None:
    """More than ``THRESHOLD`` of the cell's answers cut at the token limit (None: not recorded)."""
    found = of_row(row)
    return None if found is None else found["share"] > THRESHOLD
