"""Single-turn instruction datasets: Alpaca (and Alpaca-like Evol-Instruct), Dolly, Unnatural
Instructions and the WizardLM test set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.data.example import Example
from tunelab.data.formats.base import (
    BadRecord,
    LoadOptions,
    LoadReport,
    convert_records,
    items,
    json_records,
    jsonl_records,
    obj,
    read_json,
    text,
)


def records_of(path: Path) -> tuple[list[tuple[int, Any]], str]:
    """Records of a JSON array file or a JSONL file, with the position unit for error messages."""
    if path.suffix == ".jsonl":
        return jsonl_records(path, strict=False), "line"
    return json_records(path, read_json(path)), "record"


def alpaca_example(record: Any, where: int, *, stem: str) -> Example:
    """``{instruction, input, output}`` (Alpaca); Evol-Instruct rows have no ``input``."""
    return Example(id=f"{stem}-{where}", task=stem, instruction=text(record, "instruction"),
                   input=text(record, "input", required=False), output=text(record, "output"))


def load_alpaca(path: Path, opts: LoadOptions, report: LoadReport) -> list[Example]:
    """Alpaca's JSON array (``alpaca_data.json``) or the same rows as JSONL; also Evol-Instruct."""
    records, unit = records_of(path)
    return convert_records(records, lambda r, i: alpaca_example(r, i, stem=path.stem), path=path, unit=unit,
                           opts=opts, report=report)


def dolly_example(record: Any, where: int, *, stem: str) -> Example:
    """``{instruction, context, response, category}``: the context becomes the input."""
    category = text(record, "category", required=False)
    return Example(id=f"{stem}-{where}", task=category or stem, instruction=text(record, "instruction"),
                   input=text(record, "context", required=False), output=text(record, "response"),
                   meta={"category": category} if category else {})


def load_dolly(path: Path, opts: LoadOptions, report: LoadReport) -> list[Example]:
    """databricks-dolly-15k JSONL (one object per line)."""
    records, unit = records_of(path)
    return convert_records(records, lambda r, i: dolly_example(r, i, stem=path.stem), path=path, unit=unit,
                           opts=opts, report=report)


def _with_constraints(instruction: str, constraints: str) -> str:
    """Unnatural Instructions shows the output constraints after the instruction (none = 'None')."""
    constraints = constraints.strip()
    return f"{instruction.strip()}\n{constraints}" if constraints and constraints != "None" else instruction


def unnatural_examples(record: Any, where: int, *, stem: str, reformulations: bool) -> list[Example]:
    """One core record: an instruction with ``instances`` (input, constraints, output) and, in the
    full data, ``reformulations`` (paraphrased instruction with its own input/output).

    A flat row ``{instruction, input, constraints, output}`` (the Hugging Face export) is read too.
    """
    row = obj(record)
    if "instances" not in row:
        inst = text(row, "instruction")
        return [Example(id=f"{stem}-{where}", task=stem, output=text(row, "output"), input=text(row, "input"),
                        instruction=_with_constraints(inst, text(row, "constraints", required=False)))]
    instruction = text(row, "instruction")
    out: list[Example] = []
    for k, instance in enumerate(items(row, "instances")):
        try:
            out.append(Example(
                id=f"{stem}-{where}-{k}", task=stem, input=text(instance, "input"), output=text(instance, "output"),
                instruction=_with_constraints(instruction, text(instance, "constraints", required=False)),
                meta={"instruction_with_input": text(instance, "instruction_with_input", required=False)}))
        except BadRecord as exc:
            raise BadRecord(f"instances[{k}]: {exc.message}", exc.field) from None
    if not reformulations:
        return out
    for k, ref in enumerate(items(row, "reformulations", required=False)):
        try:
            out.append(Example(id=f"{stem}-{where}-r{k}", task=stem, instruction=text(ref, "instruction"),
                               input=text(ref, "input", required=False), output=text(ref, "output"),
                               meta={"reformulation_of": instruction}))
        except BadRecord as exc:
            raise BadRecord(f"reformulations[{k}]: {exc.message}", exc.field) from None
    return out


def load_unnatural(path: Path, opts: LoadOptions, report: LoadReport) -> list[Example]:
    """Unnatural Instructions core/full data (JSONL)."""
    records, unit = records_of(path)
    return convert_records(
        records, lambda r, i: unnatural_examples(r, i, stem=path.stem, reformulations=opts.reformulations),
        path=path, unit=unit, opts=opts, report=report)


def wizardlm_example(record: Any, where: int) -> Example:
    """WizardLM_testset.jsonl: ``{idx, Skill, Difficulty, Instruction}``, no reference answers."""
    row = obj(record)
    idx = row.get("idx", where)
    if not isinstance(idx, int | str) or isinstance(idx, bool):
        raise BadRecord(f"expected an integer, got {type(idx).__name__}", "idx")
    return Example(id=f"wizardlm-test-{idx:03d}" if isinstance(idx, int) else f"wizardlm-test-{idx}", task="wizardlm_testset", instruction=text(row, "Instruction"),
                   meta={"skill": text(row, "Skill", required=False), "difficulty": row.get("Difficulty"),
                         "no_reference": True})


def load_wizardlm(path: Path, opts: LoadOptions, report: LoadReport) -> list[Example]:
    """The WizardLM test set (a prompt set: outputs are empty and marked ``no_reference``)."""
    records, unit = records_of(path)
    return convert_records(records, wizardlm_example, path=path, unit=unit, opts=opts, report=report)
