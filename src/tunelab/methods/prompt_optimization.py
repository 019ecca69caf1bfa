"""Prompt optimisation with DSPy (Khattab et al. 2024; Opsahl-Ong et al. 2024, MIPRO): train nothing, let a
DSPy optimizer choose the instruction and the few-shot demonstrations, scored on a dev split.

The language model DSPy calls is the run's own base model, in process: a ``dspy.LM`` whose engine
(``complete(Request) -> Response``, DSPy 3.4's interface for custom backends) generates greedily with
``tunelab.generate.generate``. A DSPy adapter (``TunelabFormat``) lays every call out with tunelab's own
prompt layout: the candidate instruction (``{instruction}`` = the example's own), the candidate
demonstrations rendered as ICL renders them, then the input; the whole generation is the answer. So the dev
score of a candidate is the score the saved adapter gets in `tunelab eval`, where the winner becomes the
example's instruction (``Adapter.rewrite``, discrete_prompt's mechanism) and needs no DSPy.

``optimizer``: ``bootstrap`` (``BootstrapFewShotWithRandomSearch``: zero-shot, labelled-only and
``candidates`` bootstrapped demonstration sets) or ``mipro`` (``MIPROv2``: ``candidates`` proposed
instructions and demonstration sets, ``trials`` Bayesian-optimisation trials; its proposer is the same
small model, so expect little from its instructions). Candidates are scored with the task's first metric
(per example, averaged: sentence-level for BLEU / chrF) on ``n_dev`` rows drawn from the training rows; the
others are the optimizer's training set. Saved: ``prompt_optimization.json`` (the instruction, the chosen
demonstrations, every trial's dev score, and the cost: LM calls, generated tokens, CPU seconds).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.data import default_metrics
from tunelab.data.example import Example
from tunelab.errors import ConfigError, TunelabError
from tunelab.formatting import TEMPLATES
from tunelab.methods.base import Capabilities, MethodConfig, MethodDefaults, freeze
from tunelab.validation import at_least, choice

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunelab.methods.base import Adapter
    from tunelab.methods.transfer import Source

RESULT_FILE = "prompt_optimization.json"
OPTIMIZERS = ("bootstrap", "mipro")
SELF = "{instruction}"  # in an instruction: the example's own


@dataclass
class PromptOptimizationConfig(MethodConfig):
    optimizer: str = choice(OPTIMIZERS, "bootstrap")  # bootstrap (random search over demo sets) | mipro (MIPROv2)
    candidates: int = at_least(1, 4)  # bootstrap: demonstration sets tried; mipro: instructions and demo sets proposed
    trials: int = at_least(1, 8)  # mipro: optimisation trials
    max_demos: int = at_least(0, 2)  # demonstrations in a candidate (bootstrapped and labelled each)
    n_dev: int = at_least(1, 16)  # training rows held out to score candidates on
    # training rows the optimizer draws demonstrations from (a bootstrap walks them until enough candidates pass the
    # metric: with a weak base model that is every row, one generation each, so the pool bounds the search's cost)
    n_pool: int = at_least(1, 64)
    template: str = choice(TEMPLATES, "auto")  # prompt layout while scoring; keep it equal to data.template
    max_new_tokens: int | None = at_least(1, None)  # None = from the longest training reference
    seed: int = at_least(0, 0)  # the dev split and the optimizer's sampling

    def __post_init__(self) -> None:
        if self.init_from:
            raise ConfigError("method.init_from: prompt_optimization starts from the base model; "
                              "drop method.init_from / --init-from")


def compose(instruction: str, demos: Sequence[dict[str, str]]) -> str:
    """One instruction text carrying the demonstrations, rendered as ICL renders them after the instruction.

    >>> compose("{instruction}", [{"input": "2+2", "output": "4"}])
    '{instruction}\\n\\nInput: 2+2\\nOutput: 4'
    """
    from tunelab.formatting import render_demo

    shown = [render_demo(Example(id="", task="", instruction="", input=d.get("input", ""), output=d.get("output", "")))
             for d in demos]
    return "\n\n".join([instruction.strip(), *shown])


@dataclass
class Usage:
    """What the optimizer cost: calls to the local model, tokens it generated and read."""

    calls: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0


@dataclass
class Bridge:
    """The local model as DSPy sees it: prompt text in, greedy generation out (one ``dspy.LM`` engine)."""

    adapter: Any
    tokenizer: Any
    template: str
    max_new_tokens: int
    usage: Usage = field(default_factory=Usage)

    def prompt(self, instruction: str, demos: Sequence[dict[str, Any]], inputs: dict[str, Any]) -> str:
        """tunelab's prompt text for one DSPy call (the task's signature, or a proposer's with other fields)."""
        from tunelab.formatting import build_prompt
        from tunelab.methods.discrete_prompt import fill

        own = str(inputs.get("instruction", ""))
        text = str(inputs["input"]) if set(inputs) <= {"instruction", "input"} else \
            "\n".join(f"{k}: {v}" for k, v in inputs.items())
        example = fill(compose(instruction, demos), Example(id="", task="", instruction=own, input=text))
        return build_prompt(self.tokenizer, self.template, example)

    def complete(self, request: Any) -> Any:
        """DSPy's engine call: generate for the last message's text (already a full tunelab prompt)."""
        from dspy.lm15 import Message, Response, TextPart
        from dspy.lm15 import Usage as LMUsage

        from tunelab.formatting import encode_prompt
        from tunelab.generate import GenerationConfig, generate

        ids = encode_prompt(self.tokenizer, request.messages[-1].text or "", 1024)
        text = generate(self.adapter, self.tokenizer, [ids], GenerationConfig(max_new_tokens=self.max_new_tokens))[0]
        n_out = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        self.usage.calls += 1
        self.usage.prompt_tokens += len(ids)
        self.usage.generated_tokens += n_out
        return Response(id=None, model="tunelab", message=Message.assistant([TextPart(text.strip() or " ")]),
                        finish_reason="stop", usage=LMUsage(input_tokens=len(ids), output_tokens=n_out))

    def close(self) -> None:
        return None


def _dspy() -> Any:
    try:
        import dspy
    except ImportError:
        raise ConfigError("method prompt_optimization needs DSPy: pip install 'tunelab[dspy]' (dspy==3.4.1)") from None
    return dspy


@functools.cache
def _format_class() -> type:
    """``TunelabFormat``: a ``dspy.Adapter`` that lays a call out as tunelab does and reads the whole
    generation as the first output field (defined on first use: dspy is an optional extra)."""
    dspy = _dspy()

    class TunelabFormat(dspy.Adapter):  # type: ignore[name-defined]  # dspy is imported at run time
        def __init__(self, bridge: Bridge) -> None:
            super().__init__()
            self.bridge = bridge

        def format(self, signature, demos, inputs):  # type: ignore[override]
            fields = [k for k in signature.input_fields if k in inputs]
            return [{"role": "user", "content": self.bridge.prompt(signature.instructions, demos,
                                                                   {k: inputs[k] for k in fields})}]

        def parse(self, signature, completion):  # type: ignore[override]
            names = list(signature.output_fields)
            return {name: completion.strip() if i == 0 else "" for i, name in enumerate(names)}

    return TunelabFormat


def metric_fn(name: str):
    """A DSPy metric: the task metric of one prediction against the example's references."""
    from tunelab.metrics import compute

    def metric(example: Any, prediction: Any, trace: Any = None) -> float:
        return compute([name], [str(getattr(prediction, "output", "") or "")], [list(example.targets)])[name]

    return metric


def dev_split(train: Sequence[Example], n_dev: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(optimizer's training rows, dev rows): ``n_dev`` rows held out at random, at least one row left on each side."""
    if len(train) < 2:
        raise TunelabError("prompt_optimization needs at least 2 training rows (demonstration pool + dev split)")
    order = list(train)
    random.Random(f"{seed}:dev").shuffle(order)
    k = min(n_dev, len(order) - 1)
    return order[k:], order[:k]


def optimize(bridge: Bridge, config: PromptOptimizationConfig, train: Sequence[Example],
             dev: Sequence[Example], metric: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the DSPy optimizer; returns (the winner: instruction and demos, every trial with its dev score)."""
    dspy = _dspy()

    def as_dspy(e: Example):
        return dspy.Example(instruction=e.instruction, input=e.input, output=e.output,
                            targets=tuple(e.targets)).with_inputs("instruction", "input")

    program = dspy.Predict(dspy.Signature("instruction, input -> output", SELF))
    lm = dspy.LM("tunelab/local", engine=bridge, cache=False, num_retries=0)
    common = dict(metric=metric_fn(metric), max_bootstrapped_demos=config.max_demos,
                  max_labeled_demos=config.max_demos, num_threads=1)  # one model, one thread
    # DSPy prints scores and tqdm bars as it goes; the run reports the result (trials are saved)
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    logging.getLogger("dspy").setLevel(logging.WARNING)
    with dspy.context(lm=lm, adapter=_format_class()(bridge)), quiet[0], quiet[1]:
        if config.optimizer == "mipro":
            optimizer = dspy.MIPROv2(auto=None, num_candidates=config.candidates, seed=config.seed, **common)
            best = optimizer.compile(program, trainset=[as_dspy(e) for e in train], valset=[as_dspy(e) for e in dev],
                                     num_trials=config.trials, minibatch=False)
        else:
            optimizer = dspy.BootstrapFewShotWithRandomSearch(num_candidate_programs=config.candidates, **common)
            best = optimizer.compile(program, trainset=[as_dspy(e) for e in train], valset=[as_dspy(e) for e in dev])
    trials = [{**_describe(c["program"]), "dev_score": float(c["score"])}
              for c in getattr(best, "candidate_programs", [])]
    return _describe(best), trials


def _describe(program: Any) -> dict[str, Any]:
    """A compiled program's one predictor as plain data: instruction and demonstrations."""
    predictor = program.predictors()[0]
    demos = [{"input": str(d.get("input", "")), "output": str(d.get("output", ""))} for d in predictor.demos]
    return {"instruction": predictor.signature.instructions, "demos": demos}


@functools.cache
def _adapter_class() -> type:
    """The frozen model plus the optimised instruction (discrete_prompt's adapter), saving the whole result."""
    from tunelab.methods.discrete_prompt import DiscretePromptAdapter

    class OptimizedPromptAdapter(DiscretePromptAdapter):
        def __init__(self, model, method: str, config: MethodConfig, result: dict[str, Any]) -> None:
            super().__init__(model, method, config, PromptOptimization.capabilities, result["instruction"], {})
            self.result = result

        def save_weights(self, directory: Path) -> None:
            (Path(directory) / RESULT_FILE).write_text(json.dumps(self.result, indent=2, ensure_ascii=False))

    return OptimizedPromptAdapter


class PromptOptimization(MethodDefaults):
    name = "prompt_optimization"
    Config = PromptOptimizationConfig
    capabilities = Capabilities(rewrites_input=True)

    def build(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: PromptOptimizationConfig,
              train: Sequence[Example], seed: int, source: Source | None = None) -> Adapter:
        from tunelab.evaluate import derive_max_new_tokens
        from tunelab.formatting import resolve_template

        _dspy()
        freeze(model)
        pool, dev = dev_split(train, config.n_dev, config.seed)
        pool = pool[:config.n_pool]  # already shuffled by the seed
        probe = _adapter_class()(model, self.name, config, {"instruction": SELF})  # the bare model: no rewrite
        bridge = Bridge(probe, tokenizer, resolve_template(config.template, tokenizer),
                        config.max_new_tokens or derive_max_new_tokens(tokenizer, train))
        metric = default_metrics(list(dev))[0]
        cpu, wall = time.process_time(), time.perf_counter()
        best, trials = optimize(bridge, config, pool, dev, metric)
        cost = {"lm_calls": bridge.usage.calls, "prompt_tokens": bridge.usage.prompt_tokens,
                "generated_tokens": bridge.usage.generated_tokens, "cpu_seconds": round(time.process_time() - cpu, 3),
                "seconds": round(time.perf_counter() - wall, 3)}
        result = {"instruction": compose(best["instruction"], best["demos"]), "program": best, "metric": metric,
                  "n_dev": len(dev), "n_pool": len(pool), "optimizer": config.optimizer, "trials": trials, "cost": cost}
        return _adapter_class()(model, self.name, config, result)

    def load(self, directory: Path, model: PreTrainedModel, config: PromptOptimizationConfig) -> Adapter:
        path = Path(directory) / RESULT_FILE
        if not path.is_file():
            raise TunelabError(f"{directory}: no {RESULT_FILE}; pass the adapter/ directory of a prompt_optimization run")
        freeze(model)
        return _adapter_class()(model, self.name, config, json.loads(path.read_text()))

