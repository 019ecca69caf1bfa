"""The sections of a run's config (``model``, ``data``, ``train``, ``eval``, ``report``): typed, each field
declaring its allowed values (``tunelab.validation``).

They live apart from ``tunelab.config`` (which re-exports them) so that the modules acting on one section
(``train``, ``evaluate``, ``data.prepare``, ``tracking``, a method scoring its candidates) import it without
importing the method registry: ``config`` -> ``methods`` -> ``sections``, one way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.choices import ENGINES, PRECISIONS, SCHEDULES
from tunelab.errors import ConfigError
from tunelab.formatting import TEMPLATES
from tunelab.metrics import METRICS
from tunelab.models import DTYPES
from tunelab.validation import above, at_least, between, choice, each_of, matching, satisfying

DEVICES = r"auto|cpu|mps|cuda(:\d+)?"


def non_empty(value: str) -> bool:
    """A string with something besides whitespace."""
    return bool(value.strip())


def _sni_encoding(value: str) -> bool:
    from tunelab.data.formats.super_ni import SniEncoding

    try:
        SniEncoding.parse(value)
    except ConfigError:
        return False
    return True


@dataclass
class ModelConfig:
    name: str = satisfying(non_empty, "a registry name, Hugging Face id or local directory",
                           "smollm2-135m")  # registry name, Hugging Face id, or local directory
    dtype: str = choice(DTYPES, "float32")  # bf16 is ~40x slower on CPUs without bf16 units
    threads: int | None = at_least(1, None)  # torch threads; None = all cores
    device: str = matching(DEVICES, "auto, cpu, cuda, cuda:N or mps",
                           "auto")  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:1 | mps
    trust_remote_code: bool = False  # never run a hub repo's code unless asked
    allow_pickle: bool = False  # load pickle-only (*.bin) local model weights; pickles can run code


@dataclass
class DataConfig:
    task: str = satisfying(non_empty, "a built-in task name, a data file or a directory",
                           "date_format")  # built-in task name, a JSONL file, or a directory with train/test files
    train: str | None = None  # explicit train file (overrides what `task` implies)
    eval: str | None = None  # explicit eval file
    max_train: int | None = at_least(1, None)  # cap on training examples (learning curves)
    max_eval: int | None = at_least(1, 100)  # cap on evaluation examples
    max_length: int = at_least(1, 512)  # tokens per training sequence; longer prompts are cut from the left
    template: str = choice(TEMPLATES, "auto")  # auto | chat | alpaca | plain
    system_prompt: str | None = None  # chat template system message; None keeps the model's default
    skip_bad: bool = False  # skip malformed records (counted in result.json) instead of stopping
    task_cap: int | None = at_least(1, None)  # examples-proportional mixing of the train tasks, at most this many per task
    mixture: list[str] | None = None  # more training files mixed in, each "path" or "path@weight"
    sni_encoding: str = satisfying(_sni_encoding, "plain or parts joined by '+': def, posK, negK, expl (e.g. def+pos2)",
                                   "plain")  # Super-NI instructions: plain (Definition) or Tk-Instruct's def, def+pos2, ...


@dataclass
class TrainConfig:
    steps: int = at_least(0, 100)  # 0 = no training (e.g. a transferred prompt used as is)
    lr: float | None = above(0, None)  # None = the method's default
    batch_size: int = at_least(1, 8)
    grad_accum: int = at_least(1, 1)
    warmup_steps: int = at_least(0, 0)
    schedule: str = choice(SCHEDULES, "linear")  # linear: warmup then decay to 10% of lr | constant: warmup then flat
    group_by_length: bool = True  # batches of similar-length examples (less padding); order stays random
    weight_decay: float = at_least(0, 0.0)
    max_grad_norm: float = at_least(0, 1.0)  # 0 = no clipping
    seed: int = between(0, 2**32 - 1, 0)  # numpy's seed range
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    precision: str = choice(PRECISIONS, "auto")  # fp32 | bf16 (autocast) | auto: bf16 where measured faster (tunelab.distributed)
    checkpoint_every: int = at_least(0, 0)  # steps between resumable checkpoints; 0 = only at the end
    log_every: int = at_least(1, 10)
    resume: bool = False  # continue from OUT/checkpoint (done anyway when one exists; with this flag, warn if none)
    restart: bool = False  # throw OUT/checkpoint away and start from step 1 (otherwise a run resumes from it when
    # it was made with this run's settings, and refuses, naming the settings that differ, when it was not)

    def __post_init__(self) -> None:
        if self.resume and self.restart:
            raise ConfigError("train.resume and train.restart: choose one (--resume continues from OUT/checkpoint, "
                              "--restart throws it away)")


@dataclass
class EvalConfig:
    batch_size: int = at_least(1, 16)
    max_new_tokens: int | None = at_least(1, None)  # None = derived from the longest training reference
    metrics: list[str] | None = each_of(METRICS, None)  # None = the task's default metrics
    do_sample: bool = False
    temperature: float = above(0, 1.0)
    top_p: float = between(0, 1, 1.0, low_open=True)
    loss: bool = True  # teacher-forced loss on the eval rows and as many training rows (the overfitting gap)
    forgetting: bool = True  # general-text loss with the adapter minus the base model's (tunelab.forgetting)
    forgetting_probe: str | None = None  # JSONL of general text ('output' / 'text'); None = shared Alpaca, else built-in
    # fp32 | bf16 | auto: prefill and decode each in bf16 where fast (tunelab.precision). fp32 by default: bf16
    # rounding differs with the batch's shape, so on a real model a greedy near-tie can flip between batched and
    # one-by-one output (docs/performance.md); fp32 keeps them equal, and stored cells comparable
    precision: str = choice(PRECISIONS, "fp32")
    # tunelab | vllm: which engine generates (inference.engine, or vLLM in this process: inference.vllm_engine,
    # for the methods inference.vllm_support allows); part of a compare cell's key, so stores never mix them
    engine: str = choice(ENGINES, "tunelab")
    # stop strings (lm-eval's `until`): generation ends at the first one and the text is cut there. A base model
    # (no chat template, so no end-of-turn token it learned to emit) rambles past a one-line answer until
    # max_new_tokens; ["\n"] ends it where one-line references (E2E, DART, WebNLG) end. [] = EOS only
    stop: list[str] = field(default_factory=list)


TRACKERS = ("mlflow", "tensorboard", "wandb", "trackio")  # report.to names (tunelab.tracking)


@dataclass
class ReportConfig:
    """Experiment tracking (``report.to``, like Trainer's ``report_to``); see ``tunelab.tracking``."""

    to: list[str] = field(default_factory=list)  # any of mlflow, tensorboard, wandb, trackio; [] = none
    mlflow_uri: str = "sqlite:///runs/mlflow.db"  # MLflow tracking URI (a local sqlite store; no server)
    experiment: str = "tunelab"  # MLflow experiment, W&B and Trackio project
    dir: str | None = None  # TensorBoard / W&B / Trackio files; None = OUT/tracking (runs/tracking without --out)
    run_name: str | None = None  # None = METHOD-TASK-seedS

    def __post_init__(self) -> None:
        unknown = [t for t in self.to if t not in TRACKERS]
        if unknown:
            raise ConfigError(f"report.to: unknown tracker {unknown[0]!r}; choose any of {', '.join(TRACKERS)}")
