"""The one record type every data format is converted into."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One supervised example.

    ``output`` is the training target; ``references`` are all acceptable answers for evaluation
    (``references[0] == output`` when the source has several). ``options`` lists the label set of
    a classification task (for rank classification and Flan-style OPTIONS prompts). ``messages``
    holds a whole multi-turn conversation when the source is chat data (loss on assistant turns).
    """

    id: str
    task: str
    instruction: str
    input: str = ""
    output: str = ""
    references: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    messages: tuple[dict[str, str], ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def targets(self) -> list[str]:
        """All acceptable answers (references, else the output)."""
        return list(self.references) if self.references else [self.output]

    def to_dict(self) -> dict[str, Any]:
        """The uniform JSONL schema (lists, not tuples; empty optional fields omitted)."""
        row = asdict(self)
        for key in ("references", "options", "messages"):
            row[key] = list(row[key])
            if not row[key]:
                del row[key]
        if not row["meta"]:
            del row["meta"]
        return row
