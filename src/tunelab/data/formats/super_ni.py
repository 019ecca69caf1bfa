"""Super-NaturalInstructions task files and the Tk-Instruct instruction encodings.

A task file holds a ``Definition``, ``Positive Examples`` / ``Negative Examples`` (input, output,
explanation) and ``Instances`` (input, several gold outputs). Tk-Instruct (Wang et al. 2022, §5)
trains and evaluates with encodings such as "definition + 2 positive examples"; ``render_instruction``
produces that text from the parts, so the same function serves task files, the shared
``super_ni/tasks.jsonl`` and the unseen-task evaluation protocol.

>>> enc = SniEncoding.parse("def+pos1")
>>> print(render_instruction("Return the capital", [{"input": "India", "output": "New Delhi"}], [], enc))
Definition: Return the capital.
<BLANKLINE>
Positive Example 1 -
Input: India.
Output: New Delhi.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.example import Example
from tunelab.data.formats.base import (
    BadRecord,
    LoadOptions,
    LoadReport,
    convert_records,
    distinct,
    jsonl_records,
    read_json,
    strings,
    text,
)
from tunelab.errors import ConfigError, DataError

ENCODING_RE = re.compile(r"^(def)?(?:\+?pos(\d+))?(?:\+?neg(\d+))?(\+?expl)?$")


@dataclass(frozen=True)
class SniEncoding:
    """Which parts of a task's instruction are shown (Tk-Instruct's "def + pos k + neg k + expl")."""

    definition: bool = True
    pos: int = 0
    neg: int = 0
    explanation: bool = False
    plain: bool = False  # the Definition text alone, unprefixed (the layout of ../shared/data/super_ni)

    @classmethod
    def parse(cls, spec: str) -> SniEncoding:
        """``"plain"``, ``"def"``, ``"def+pos2"``, ``"pos2"``, ``"def+pos2+neg2+expl"`` ..."""
        if spec.strip().lower() == "plain":
            return cls(plain=True)
        match = ENCODING_RE.match(spec.strip().lower().replace(" ", ""))
        if not spec.strip() or not match:
            raise ConfigError(f"Super-NI encoding {spec!r}: use 'plain' or parts joined by '+': def, posK, negK, "
                              "expl (e.g. def+pos2)")
        return cls(bool(match[1]), int(match[2] or 0), int(match[3] or 0), bool(match[4]))

    def __str__(self) -> str:
        if self.plain:
            return "plain"
        parts = (["def"] if self.definition else []) + ([f"pos{self.pos}"] if self.pos else []) + \
            ([f"neg{self.neg}"] if self.neg else []) + (["expl"] if self.explanation else [])
        return "+".join(parts) or "none"


def _end(s: str) -> str:
    """Tk-Instruct ends every field with punctuation."""
    s = s.strip()
    return s if not s or s[-1] in string.punctuation else s + "."


def _demo(kind: str, k: int, demo: Mapping[str, Any], explanation: bool) -> str:
    lines = [f"{kind} Example {k} -", f"Input: {_end(str(demo.get('input', '')))}",
             f"Output: {_end(str(demo.get('output', '')))}"]
    if explanation and demo.get("explanation"):
        lines.append(f"Explanation: {_end(str(demo['explanation']))}")
    return "\n".join(lines)


def render_instruction(definition: str, positive: Sequence[Mapping[str, Any]],
                       negative: Sequence[Mapping[str, Any]], encoding: SniEncoding) -> str:
    """The task instruction under ``encoding``: definition, then k positive and k negative examples.

    The instance input is not included; tunelab's prompt layout appends it (``Input: ...``).
    """
    if encoding.plain:
        return definition
    parts = [f"Definition: {_end(definition)}"] if encoding.definition and definition.strip() else []
    parts += [_demo("Positive", k + 1, d, encoding.explanation) for k, d in enumerate(positive[: encoding.pos])]
    parts += [_demo("Negative", k + 1, d, encoding.explanation) for k, d in enumerate(negative[: encoding.neg])]
    return "\n\n".join(parts)


def task_parts(task: Mapping[str, Any]) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """(definition, positive, negative) of a task file or a ``super_ni/tasks.jsonl`` row."""
    definition = task.get("Definition", task.get("definition", ""))
    if isinstance(definition, list):
        definition = definition[0] if definition and isinstance(definition[0], str) else ""
    if not isinstance(definition, str):
        raise BadRecord("expected a string or a list of strings", "Definition")
    demos = []
    for key in (("Positive Examples", "positive_examples"), ("Negative Examples", "negative_examples")):
        value = task.get(key[0], task.get(key[1], []))
        if not isinstance(value, list) or not all(isinstance(d, dict) for d in value):
            raise BadRecord("expected a list of {input, output, explanation} objects", key[0])
        demos.append(value)
    return definition, demos[0], demos[1]


def load_super_ni(path: Path, opts: LoadOptions, report: LoadReport) -> list[Example]:
    """One Super-NI task file: each instance becomes an Example with all gold outputs as references."""
    encoding = SniEncoding.parse(opts.sni_encoding)
    data = read_json(path)
    if not isinstance(data, dict) or "Instances" not in data:
        raise DataError("expected a Super-NI task object with 'Definition' and 'Instances'", path=str(path),
                        field="Instances")
    try:
        definition, positive, negative = task_parts(data)
    except BadRecord as exc:
        raise DataError(exc.message, path=str(path), field=exc.field) from None
    instances = data["Instances"]
    if not isinstance(instances, list):
        raise DataError("expected a list of instances", path=str(path), field="Instances")
    instruction = render_instruction(definition, positive, negative, encoding)
    task = path.stem
    number = task.split("_", 1)[0]

    def convert(record: Any, where: int) -> Example:
        outputs = distinct(strings(record, "output"))
        if not outputs:
            raise BadRecord("no non-empty gold output", "output")
        return Example(id=text(record, "id", required=False) or f"{number}-contrib-{where}", task=task,
                       instruction=instruction, input=text(record, "input"), output=outputs[0],
                       references=outputs)

    return convert_records(enumerate(instances), convert, path=path, unit="instance", opts=opts, report=report)


def load_task_rows(path: str | Path) -> dict[str, dict[str, Any]]:
    """``super_ni/tasks.jsonl`` (one row per task: definition, positive/negative examples) by task name."""
    rows = {}
    for lineno, row in jsonl_records(path):
        if not isinstance(row, dict) or not isinstance(row.get("task"), str):
            raise DataError("expected an object with a 'task' name", path=str(path), line=lineno, field="task")
        rows[row["task"]] = row
    return rows


def apply_encoding(examples: Sequence[Example], tasks: Mapping[str, Mapping[str, Any]],
                   encoding: SniEncoding | str) -> list[Example]:
    """Re-render each example's instruction from its task's parts (the unseen-task protocol)."""
    from dataclasses import replace

    enc = SniEncoding.parse(encoding) if isinstance(encoding, str) else encoding
    out = []
    for ex in examples:
        if ex.task not in tasks:
            raise DataError(f"example {ex.id}: task {ex.task!r} is not in the task file", field="task")
        definition, positive, negative = task_parts(tasks[ex.task])
        out.append(replace(ex, instruction=render_instruction(definition, positive, negative, enc)))
    return out
