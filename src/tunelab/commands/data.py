"""`tunelab data inspect|convert`: look at a dataset in any supported format, or write it as uniform JSONL."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.rule import Rule
from rich.table import Table

from tunelab.commands import console as make_console
from tunelab.data.example import Example

app = typer.Typer(no_args_is_help=True, help="Inspect or convert datasets in their native formats.")
console = make_console()

Format = Annotated[str | None, typer.Option("--format", help="force a format (default: detected); see `tunelab "
                                            "data formats`")]
Mapping = Annotated[str | None, typer.Option("--map", help="Example field=source column, e.g. "
                                             "instruction=question,output=answer ('\"text\"' = literal)")]
SkipBad = Annotated[bool, typer.Option("--skip-bad", help="skip malformed records and report how many")]
Templates = Annotated[str | None, typer.Option("--templates", help="promptsource templates.yaml or Flan templates "
                                               "file applied to the rows")]
Rename = Annotated[str | None, typer.Option("--rename", help="with --templates: column=name_the_template_uses, "
                                            "e.g. mr=meaning_representation")]
TemplateName = Annotated[str | None, typer.Option("--template", help="one template name/id ('all' = every one)")]
SniEncoding = Annotated[str, typer.Option("--sni-encoding", help="Super-NI task files: plain, def, def+pos2, "
                                          "def+pos2+neg2+expl ...")]
Tables = Annotated[str | None, typer.Option("--tables", help="Spider tables.json (default: beside the file)")]
Split = Annotated[str, typer.Option("--split", help="Hugging Face datasets split")]
Subset = Annotated[str | None, typer.Option("--subset", help="Hugging Face datasets configuration")]


def _load(path: str, fmt: str | None, mapping: str | None, skip_bad: bool, templates: str | None,
          template: str | None, sni_encoding: str, tables: str | None, split: str, subset: str | None,
          rename: str | None):
    from tunelab.data import load_examples
    from tunelab.data.formats import LoadReport
    from tunelab.data.formats.tabular import parse_mapping, parse_rename

    report = LoadReport()
    examples = load_examples(path, skip_bad=skip_bad, report=report, format=fmt, mapping=parse_mapping(mapping),
                             templates=templates, template=template, sni_encoding=sni_encoding, tables=tables,
                             split=split, subset=subset, rename=parse_rename(rename))
    return examples, report


def _print_report(report) -> None:
    console.print(f"[bold]{report.loaded}[/bold] examples from {report.path} (format: {report.format})")
    if report.skipped:
        console.print(f"[yellow]skipped {len(report.skipped)} malformed records[/yellow]; first: {report.skipped[0]}")
    for what, n in sorted(report.notes.items()):
        console.print(f"{n} {what}")


def histogram(values: Sequence[int], bins: int = 10, width: int = 40) -> list[str]:
    """A text histogram, one line per bin (``lo-hi  count  bar``); values above the 99th percentile
    share one overflow line so a single huge example does not flatten the rest."""
    if not values:
        return ["(no examples)"]
    ordered = sorted(values)
    lo, hi = ordered[0], ordered[int(0.99 * (len(ordered) - 1))]
    step = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter(min((v - lo) // step, bins) for v in values)
    top = max(counts.values())
    lines = []
    for b in range(min(bins, -(-(hi - lo + 1) // step)) + (1 if counts.get(bins) else 0)):
        n = counts.get(b, 0)
        label = f"{lo + b * step:>6}-{lo + (b + 1) * step - 1:<6}" if b < bins else f"{'>=' + str(lo + b * step):>13}"
        lines.append(f"{label} {n:>7}  {'█' * round(width * n / top)}")
    return lines


def render_example(example: Example, tokenizer, template: str) -> tuple[str, str]:
    """(prompt, target) as the model would see them in training."""
    from tunelab.formatting import build_prompt, target_text

    if example.messages:
        return tokenizer.apply_chat_template(list(example.messages), tokenize=False), "(loss on assistant turns)"
    return build_prompt(tokenizer, template, example), target_text(template, example)


def token_lengths(examples: Sequence[Example], tokenizer, template: str) -> list[int]:
    """Training sequence length (prompt + target + EOS, untruncated) of each example."""
    from tunelab.formatting import PromptLayout, encode_example

    layout = PromptLayout(template, max_length=10**9)
    return [len(encode_example(tokenizer, layout, e).input_ids) for e in examples]


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="data file (any supported format) or hf:NAME")],
    model: Annotated[str, typer.Option(help="tokenizer for the length histogram")] = "smollm2-135m",
    template: Annotated[str, typer.Option("--prompt-template", help="auto | chat | alpaca | plain")] = "auto",
    max_length: Annotated[int, typer.Option(help="count examples longer than this (data.max_length)")] = 512,
    show: Annotated[int, typer.Option(help="rendered prompts to print")] = 3,
    fmt: Format = None, mapping: Mapping = None, skip_bad: SkipBad = False, templates: Templates = None,
    template_name: TemplateName = None, sni_encoding: SniEncoding = "plain", tables: Tables = None,
    split: Split = "train", subset: Subset = None, rename: Rename = None,
) -> None:
    """Counts per task, a token-length histogram for MODEL's tokenizer, and rendered prompts."""
    from tunelab.errors import DataError
    from tunelab.formatting import resolve_template

    examples, report = _load(path, fmt, mapping, skip_bad, templates, template_name, sni_encoding, tables, split,
                             subset, rename)
    if not examples:  # as `tunelab eval` on the same file: nothing to inspect is an error, not a report
        skipped = f" ({len(report.skipped)} malformed records skipped)" if report.skipped else ""
        raise DataError(f"no examples in this file{skipped}", path=path)
    _print_report(report)
    tasks = Counter(e.task for e in examples)
    table = Table(title=f"{len(tasks)} task(s)")
    table.add_column("task", overflow="fold")
    table.add_column("examples", justify="right")
    for task, n in tasks.most_common(30):
        table.add_row(task, str(n))
    if len(tasks) > 30:
        table.add_row(f"... {len(tasks) - 30} more", str(sum(n for _, n in tasks.most_common()[30:])))
    console.print(table)
    kinds = {"conversations": sum(bool(e.messages) for e in examples),
             "with options": sum(bool(e.options) for e in examples),
             "multi-reference": sum(len(e.references) > 1 for e in examples),
             "no reference": sum(bool(e.meta.get("no_reference")) for e in examples)}
    console.print(", ".join(f"{n} {k}" for k, n in kinds.items() if n) or "single-turn examples")
    from tunelab.models import load_tokenizer  # transformers: only once there is something to tokenize

    tokenizer = load_tokenizer(model)
    resolved = resolve_template(template, tokenizer)
    lengths = token_lengths(examples, tokenizer, resolved)
    ordered = sorted(lengths)
    console.print(f"\ntokens per example ({model}, {resolved} layout): min {ordered[0]}, "
                  f"median {ordered[len(ordered) // 2]}, p95 {ordered[int(0.95 * (len(ordered) - 1))]}, "
                  f"max {ordered[-1]}; {sum(n > max_length for n in lengths)} longer than {max_length} "
                  "(cut on training: prompts from the left, conversations from the right)")
    for line in histogram(lengths):
        console.print(line, highlight=False)
    rng = random.Random(0)
    for e in rng.sample(examples, min(show, len(examples))):
        prompt, target = render_example(e, tokenizer, resolved)
        console.print(Rule(f"{e.id} ({e.task})"), width=min(console.width, 100))
        console.print(prompt, markup=False, highlight=False)
        console.print(f"[green]{target}[/green]" if not e.messages else f"[dim]{target}[/dim]", highlight=False)


@app.command()
def convert(
    path: Annotated[str, typer.Argument(help="data file (any supported format) or hf:NAME")],
    to: Annotated[Path, typer.Option("--to", help="output .jsonl in tunelab's uniform schema")],
    fmt: Format = None, mapping: Mapping = None, skip_bad: SkipBad = False, templates: Templates = None,
    template_name: TemplateName = None, sni_encoding: SniEncoding = "plain", tables: Tables = None,
    split: Split = "train", subset: Subset = None, rename: Rename = None,
) -> None:
    """Write PATH as uniform JSONL (one Example.to_dict() per line), atomically."""
    from tunelab.errors import ConfigError
    from tunelab.paths import atomic_write_text

    if to.suffix != ".jsonl":
        raise ConfigError(f"--to {to}: the uniform schema is JSONL; use a .jsonl file name")
    examples, report = _load(path, fmt, mapping, skip_bad, templates, template_name, sni_encoding, tables, split,
                             subset, rename)
    atomic_write_text(to, "".join(json.dumps(_jsonable(e.to_dict()), ensure_ascii=False) + "\n" for e in examples))
    _print_report(report)
    console.print(f"wrote {len(examples)} examples to {to}")


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """Meta can hold values JSON cannot (e.g. from Parquet); make them strings rather than fail."""
    return json.loads(json.dumps(row, ensure_ascii=False, default=str))


@app.command("formats")
def formats() -> None:
    """List the formats `--format` accepts."""
    from tunelab.data.formats import FORMATS

    table = Table(title="data formats")
    table.add_column("format")
    table.add_column("what")
    for name, (_, what) in FORMATS.items():
        if what:
            table.add_row(name, what)
    console.print(table)
