"""Evaluation protocols behind `tunelab eval`: load a model (and adapter), pick examples, score, save.

- ``standard``: every example of a file (or a task directory's eval split), the task's metrics.
- ``super_ni``: the unseen-task protocol of Super-NaturalInstructions (Wang et al. 2022, §5): each
  instance is shown with its task's definition and k positive examples (Tk-Instruct's "def + pos k"
  encoding, rendered by ``tunelab.data.formats.super_ni``), only tasks absent from the adapter's
  training data are scored, and ROUGE-L (plus exact match) is reported per task and averaged.
  The headline numbers average over instances, as Super-NI's ``compute_metrics`` does; the mean
  over tasks is reported beside them.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab import metrics as M
from tunelab.choices import PROTOCOLS
from tunelab.config import EvalCommandConfig as EvalRequest
from tunelab.data import default_metrics, load_examples, load_task
from tunelab.data.example import Example
from tunelab.data.formats import LoadReport
from tunelab.errors import ConfigError, DataError
from tunelab.formatting import PromptLayout

if TYPE_CHECKING:  # torch and transformers load with the model, after the request and its data are checked
    from tunelab.evaluate import EvalResult
    from tunelab.methods.io import Loaded

# EvalRequest (tunelab.config.EvalCommandConfig): what `tunelab eval` was asked, typed and validated like `run`.
SUPER_NI_METRICS = ("rouge_l", "exact_match")


@dataclass
class Report:
    """Scores with 95% intervals, per task when the protocol asks, and every prediction."""

    metrics: dict[str, float]
    metrics_ci: dict[str, list[float] | None]
    per_task: dict[str, dict[str, Any]]
    predictions: list[dict]
    info: dict[str, Any]


@dataclass
class EvalModel:
    """A model ready to evaluate: the loaded adapter (or bare base model), its tokenizer and base model name."""

    loaded: Loaded
    tokenizer: Any
    model_name: str
    seconds: float  # load time

    @property
    def adapter(self) -> Any:
        return self.loaded.adapter

    @property
    def layout(self) -> PromptLayout:
        return self.loaded.layout


def load_for_eval(model: str | None, adapter_dir: str | None, template: str = "auto",
                  system_prompt: str | None = None, max_length: int | None = None,
                  engine: str = "tunelab") -> EvalModel:
    """The base model with the adapter in ``adapter_dir`` (any method) loaded on top, or the bare model.

    The adapter's saved layout is used (a method that shows demonstrations draws them, as in its run,
    from the run's prepared training pool: ``methods.io.load_adapter``); ``layout`` overrides its
    ``template`` (unless ``auto``), ``system_prompt`` and ``max_length`` override it where given.
    """
    from tunelab.methods.base import read_meta
    from tunelab.methods.io import load_adapter, load_base
    from tunelab.models import load_model, portable_name, resolve_base_model

    start = time.perf_counter()
    meta = read_meta(Path(adapter_dir)) if adapter_dir else {}
    base = resolve_base_model(meta.get("base_model"))  # the adapter's portable name -> this machine's copy
    if model and base and portable_name(model) != base:
        raise ConfigError(f"--adapter {adapter_dir} was trained on base model {base!r}, not {model!r}; "
                          f"drop --model or pass --model {base}")
    name = model or base or "smollm2-135m"
    if engine == "vllm":  # decided before any model loads
        check_vllm(adapter_dir, name)
    base_model, tokenizer = load_model(name)
    loaded = load_adapter(adapter_dir, base_model, tokenizer) if adapter_dir else load_base(base_model, tokenizer)
    loaded.layout = replace(loaded.layout, template=loaded.layout.template if template == "auto" else template,
                            system_prompt=system_prompt or loaded.layout.system_prompt,
                            max_length=max_length or loaded.layout.max_length).resolved(tokenizer)
    loaded.adapter.eval()
    return EvalModel(loaded, tokenizer, name, time.perf_counter() - start)


def check_vllm(adapter_dir: str | None, model: str) -> None:
    """Refuse, in one line naming the alternative, an adapter or model ``eval.engine=vllm`` cannot run."""
    from tunelab.inference.vllm_support import refusal
    from tunelab.methods.base import BASE_CAPABILITIES

    method, caps = "base model", BASE_CAPABILITIES
    if adapter_dir:
        from tunelab.methods.io import read_checked_meta

        m, config, _ = read_checked_meta(Path(adapter_dir))
        method, caps = m.name, m.capabilities_for(config)
    why = refusal(method, caps, model)
    if why:
        raise ConfigError(f"eval.engine=vllm: {why}")


def _run_config(adapter_dir: str) -> dict[str, Any] | None:
    """The resolved config of the run that wrote ``adapter_dir``, if it is recorded."""
    from tunelab.methods.io import run_config

    return run_config(Path(adapter_dir))


def cap_per_task(examples: Sequence[Example], n: int | None) -> list[Example]:
    """The first ``n`` examples of each task, in file order."""
    if n is None:
        return list(examples)
    seen: dict[str, int] = defaultdict(int)
    out = []
    for e in examples:
        seen[e.task] += 1
        if seen[e.task] <= n:
            out.append(e)
    return out


def unseen_only(examples: Sequence[Example], seen_tasks: set[str], where: str) -> list[Example]:
    """Drop examples of tasks present in the training data; an error when nothing is left."""
    kept = [e for e in examples if e.task not in seen_tasks]
    if examples and not kept:
        raise ConfigError(f"every eval task also appears in the training data ({where}), so no task is unseen; "
                          "evaluate on other tasks, or pass --include-seen to score seen tasks anyway")
    return kept


def training_tasks(path: str) -> set[str]:
    """Task names in a training file or task directory (its train split)."""
    p = Path(path)
    examples = load_examples(p) if p.is_file() else load_task(path).train
    return {e.task for e in examples}


def adapter_training_data(adapter_dir: str) -> str | None:
    """The training data recorded by the run that wrote ``adapter_dir`` (RUN/result.json), if any."""
    data = (_run_config(adapter_dir) or {}).get("data", {})
    return data.get("train") or data.get("task")


def load_eval_examples(path: str, skip_bad: bool = False) -> tuple[list[Example], int]:
    """All examples of a file, or the eval split of a task directory / built-in task, and how many malformed
    records ``skip_bad`` skipped."""
    p = Path(path)
    if p.is_file():
        report = LoadReport()
        return load_examples(p, skip_bad=skip_bad, report=report), len(report.skipped)
    task = load_task(path, skip_bad=skip_bad)
    return task.eval, task.skipped


def super_ni_examples(examples: Sequence[Example], tasks_file: str, k: int) -> list[Example]:
    """Each instance with its task's definition and first k positive examples as the instruction."""
    from tunelab.data.formats.super_ni import SniEncoding, apply_encoding, load_task_rows

    if k < 0:
        raise ConfigError(f"--k must be >= 0, got {k}")
    return apply_encoding(examples, load_task_rows(tasks_file), SniEncoding(definition=True, pos=k))


def select_examples(req: EvalRequest) -> tuple[list[Example], dict[str, Any]]:
    """The examples to score under ``req.protocol`` and a record of what was excluded and why."""
    if req.protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol {req.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    examples, skipped = load_eval_examples(req.data, req.skip_bad)
    info: dict[str, Any] = {"n_loaded": len(examples), "skipped_bad_records": skipped}
    if req.protocol == "super_ni":
        seen_from = req.seen_from or (adapter_training_data(req.adapter) if req.adapter else None)
        seen = training_tasks(seen_from) if seen_from and not req.include_seen else set()
        excluded = sorted(seen & {e.task for e in examples})
        examples = unseen_only(examples, seen, str(seen_from))
        tasks_file = req.tasks_file or str(Path(req.data).parent / "tasks.jsonl"
                                           if Path(req.data).is_file() else Path(req.data) / "tasks.jsonl")
        if not Path(tasks_file).is_file():
            raise DataError("Super-NI task definitions not found; pass --tasks-file PATH/tasks.jsonl",
                            path=tasks_file)
        examples = super_ni_examples(examples, tasks_file, req.k)
        info.update(seen_from=seen_from, excluded_seen_tasks=excluded, tasks_file=tasks_file,
                    encoding=f"def+pos{req.k}")
    examples = cap_per_task(examples, req.max_per_task)
    examples = examples[: req.max_eval] if req.max_eval is not None else examples
    if not examples:
        raise DataError("no examples to evaluate after filtering; check --max-eval / --max-per-task", path=req.data)
    info["n_eval"] = len(examples)
    return examples, info


def _by_task(examples: Sequence[Example]) -> dict[str, list[Example]]:
    groups: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        groups[e.task].append(e)
    return dict(groups)


def score_per_task(run_one: Callable[[list[Example], int], EvalResult], examples: Sequence[Example],
                   names: Sequence[str], tokenizer, n_resamples: int) -> Report:
    """Evaluate task by task (each with its own generation budget) and pool the predictions."""
    from tunelab.evaluate import derive_max_new_tokens

    per_task: dict[str, dict[str, Any]] = {}
    predictions: list[dict] = []
    for task, group in _by_task(examples).items():
        result = run_one(group, derive_max_new_tokens(tokenizer, group))
        per_task[task] = {"n": len(group), "metrics": result.metrics, "metrics_ci": result.ci,
                          "seconds": round(result.seconds, 2)}
        predictions += result.predictions
    preds = [p["prediction"] for p in predictions]
    refs = [p["references"] for p in predictions]
    ranked = [p["ranked_prediction"] for p in predictions] if any(n in M.RANKED for n in names) else None
    overall = M.score(names, preds, refs, ranked)[0]
    ci = M.confidence_intervals(names, preds, refs, ranked, n_resamples=n_resamples)
    for n in names:
        overall[f"{n}_task_mean"] = sum(t["metrics"][n] for t in per_task.values()) / len(per_task)
    return Report(overall, {n: list(v) if v else None for n, v in ci.items()}, per_task, predictions, {})


def run_eval(req: EvalRequest, progress: Callable[[int], None] | None = None) -> Report:
    """Load, select, generate, score and (with ``req.out``) write OUT/metrics.json + OUT/predictions.jsonl."""
    from tunelab.evaluate import evaluate

    start = time.perf_counter()
    examples, info = select_examples(req)
    names = tuple(req.metrics or (SUPER_NI_METRICS if req.protocol == "super_ni" else default_metrics(examples)))
    M.check_names(names)
    loaded = load_for_eval(req.model, req.adapter, req.template, req.system_prompt, req.max_length, req.eval.engine)
    layout = loaded.layout

    steps_used: set[str] = set()  # the decode steps generation ran (inference.steps.BACKENDS)
    cut = {"at_limit": 0, "answers": 0}  # answers that ran to the token limit instead of ending (termination.py)

    def run_one(group: list[Example], max_new_tokens: int | None) -> EvalResult:
        group = [loaded.adapter.rewrite(e) for e in group]  # a discrete prompt swaps the instruction
        result = evaluate(loaded.adapter, loaded.tokenizer, layout, group, names, req.eval,
                          req.eval.max_new_tokens or max_new_tokens, progress, req.n_resamples)
        steps_used.update(s for s in result.decode_step.split("+") if s)
        for field in cut:
            cut[field] += (result.termination or {}).get(field, 0)
        return result

    if req.protocol == "super_ni":
        report = score_per_task(run_one, examples, names, loaded.tokenizer, req.n_resamples)
    else:
        result = run_one(examples, None)
        report = Report(result.metrics, result.ci, {}, result.predictions, {})
    report.info = {**info, "protocol": req.protocol, "model": loaded.model_name, "adapter": req.adapter,
                   "method": loaded.loaded.method_name, "template": layout.template, "data": req.data,
                   "seconds": round(time.perf_counter() - start, 2), "load_seconds": round(loaded.seconds, 2),
                   "decode_step": "+".join(sorted(steps_used)) or None, "request": asdict(req),
                   "termination": cut if cut["answers"] else None}
    if req.out:
        write_report(report, Path(req.out))
    return report


def write_report(report: Report, out: Path) -> None:
    """OUT/metrics.json (scores, intervals, per task, run info) and OUT/predictions.jsonl (one row per example)."""
    from tunelab.paths import atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "predictions.jsonl",
                      "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in report.predictions))
    atomic_write_json(out / "metrics.json", {"metrics": report.metrics, "metrics_ci": report.metrics_ci,
                                             "per_task": report.per_task, **report.info})
