"""Equal-budget tuning: each method with a ``tune:`` block searches its space on a dev split first.

For every (method, task, training-set size, prompt length) group of a tuned method, an Optuna study
runs the same number of trials (``tune.trials``, unless the method sets its own): seeded TPE, or a
seeded walk through the grid for small all-choice spaces. In an all-choice space no trial repeats a scored
configuration: TPE's random startup trials walk the seeded grid instead, and a later TPE proposal already
scored is replaced by the next untried configuration of that walk. A trial is a normal cell run (through
``runner.run_cell``) that trains on the training data minus a seeded dev split and is scored on that
dev split; the test split is never loaded for scoring and never chosen from. The best dev score wins
(ties: the lower final dev loss where pruning measured it, then the earlier trial), and every seed of the winning configuration then runs on the test split
as the grid's ordinary cells.

Resumable like the store: the study lives in an Optuna RDB file beside the results store
(``<store>.optuna.sqlite``, ``load_if_exists``), each finished trial is a row of the store's ``trials``
table (one per configuration), and a trial killed mid-run is marked failed and asked again. The
sampler for the k-th trial is seeded with ``seed + k`` and sees only finished trials, so a killed and
rerun study asks the very same configurations as an uninterrupted one.

Pruning (``tune.pruner: median``, ``compare/pruning.py``): a trial's process measures its dev loss
every ``tune.prune_every`` steps and stops when Optuna's ``MedianPruner`` says it is worse than the
median of the finished trials at that step. A pruned trial is stored once with status ``pruned`` and
its last dev loss, is never the winner, and its CPU seconds count in the tuning cost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console

from tunelab.compare.grid import (
    PROMPT_LENGTH_FIELD,
    Cell,
    GridConfig,
    MethodSpec,
    TaskSpec,
    cell_key,
    with_params,
)
from tunelab.compare.pruning import PruneProbe, dev_losses, make_pruner
from tunelab.compare.store import Store
from tunelab.config import RunConfig, from_dict, to_dict
from tunelab.errors import TunelabError
from tunelab.paths import atomic_write_text, safe_child

TUNING_DIR = "tuning"  # under the grid's --out: dev-split files and the trials' cell directories


def optuna_path(store_path: Path) -> Path:
    """The Optuna study file beside a results store."""
    return store_path.with_name(store_path.stem + ".optuna.sqlite")


def tuned_groups(grid: GridConfig, cells: list[Cell]) -> dict[tuple, list[int]]:
    """(method, task, size, length) -> indices of the cells one study serves (length None when tuned)."""
    specs = {m.display: m for m in grid.methods}
    groups: dict[tuple, list[int]] = {}
    for i, cell in enumerate(cells):
        spec = specs[cell.method]
        if spec.tune is None:
            continue
        length = None if PROMPT_LENGTH_FIELD in spec.tune.space else cell.prompt_length
        groups.setdefault((cell.method, spec.tune.task or cell.task, cell.train_size, length), []).append(i)
    return groups


def tune_cells(grid: GridConfig, cells: list[Cell], store: Store, out_dir: Path, store_path: Path, *,
               progress: bool = False, console: Console | None = None) -> list[Cell]:
    """Run every tuned method's study (skipping finished trials) and return the cells with winners applied."""
    groups = tuned_groups(grid, cells)
    if not groups:
        return cells
    optuna = _optuna()
    console = console or Console()
    storage = optuna.storages.RDBStorage(f"sqlite:///{optuna_path(store_path)}",
                                         engine_kwargs={"connect_args": {"timeout": 60}})
    specs = {m.display: m for m in grid.methods}
    out = list(cells)
    for (method, task, size, length), indices in groups.items():
        # the study's own task: every task's, or the one `tune.task` names (its winner then serves them all)
        base = next((cells[i] for i in indices if cells[i].task == task), None)
        if base is None:
            raise TunelabError(f"{method}: tune.task {task!r} has no cell at train size {size}, length {length}")
        name = study_name(grid, method, task, size, length)
        params = run_study(grid, specs[method], base, name, store, storage, out_dir, progress=progress,
                           console=console)
        for i in indices:
            out[i] = with_params(cells[i], params)
    seen: set[str] = set()
    unique = []
    for cell in out:  # a tuned prompt length collapses the length sweep: one cell per seed remains
        if cell.key not in seen:
            seen.add(cell.key)
            unique.append(cell)
    return unique


def study_name(grid: GridConfig, method: str, task: str, size: int | None, length: int | None) -> str:
    return f"{grid.name}/{method}/{task}/n={'all' if size is None else size}/len={'-' if length is None else length}"


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise TunelabError("the grid has `tune:` blocks, which need Optuna: pip install 'tunelab[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _distribution(values: Any) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(values, list):
        return CategoricalDistribution(values)
    if values.get("int"):
        return IntDistribution(int(values["low"]), int(values["high"]), log=bool(values.get("log")))
    return FloatDistribution(float(values["low"]), float(values["high"]), log=bool(values.get("log")))


def grid_order(space: dict[str, Any], seed: int, name: str) -> list[dict[str, Any]] | None:
    """Every configuration of an all-choice space in a seeded order; None when a key is a range."""
    if not all(isinstance(v, list) for v in space.values()):
        return None
    keys = sorted(space)
    combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(space[k] for k in keys))]
    random.Random(f"{seed}|{name}").shuffle(combos)
    return combos


def run_study(grid: GridConfig, spec: MethodSpec, base: Cell, name: str, store: Store, storage: Any,
              out_dir: Path, *, progress: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Run (or resume) one study; return the winning configuration and record it in the store."""
    optuna = _optuna()
    from optuna.trial import TrialState

    from tunelab.compare.runner import run_cell

    console = console or Console()
    settings = grid.tune
    assert spec.tune is not None
    space = spec.tune.space
    n_trials = spec.tune.trials or settings.trials
    combos = grid_order(space, settings.seed, name)
    kind = settings.sampler
    if kind == "auto":
        kind = "grid" if combos is not None and len(combos) <= n_trials else "tpe"
    if kind == "grid":
        if combos is None:
            raise TunelabError(f"{name}: tune.sampler grid needs every space entry to be a list of choices")
        n_trials = min(n_trials, len(combos))
    distributions = {k: _distribution(v) for k, v in space.items()}
    trial_base = dev_config(base, settings.seed, settings.dev_rows, out_dir)
    prunes = _prunes(grid, spec, trial_base, name)
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction="maximize",
                                pruner=make_pruner(settings.pruner, settings.prune_startup_trials,
                                                   settings.prune_warmup_steps))
    while True:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            # left RUNNING by a killed grid (one process runs a study): ask its configuration again below
            study.tell(t.number, state=TrialState.FAIL)
        finished = [t for t in study.get_trials(deepcopy=False)
                    if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                    or (t.state == TrialState.FAIL and "error" in t.user_attrs)]
        k = len(finished)
        if k >= n_trials:
            break
        tried = [dict(t.params) for t in finished]
        if kind == "grid":
            assert combos is not None
            trial = _ask_fixed(optuna, study, distributions, combos[k], k)
        elif combos is not None and k < settings.startup_trials:
            # TPE's startup is random *with* replacement: in a small all-choice space it repeats configurations
            # (3 trials once tried 2 distinct ones). Walk the seeded grid instead: distinct, still seeded.
            trial = _ask_fixed(optuna, study, distributions, _untried(combos, tried), k)
        else:  # reseeded per trial: the same finished trials give the same next configuration after a kill
            study.sampler = optuna.samplers.TPESampler(seed=settings.seed + k,
                                                       n_startup_trials=settings.startup_trials)
            trial = study.ask(distributions)
            if combos is not None and dict(trial.params) in tried and len(tried) < len(combos):
                # a configuration already scored would spend a trial on nothing: the next untried one instead
                # (the duplicate is told FAIL without an error: it is neither counted nor seen by TPE)
                study.tell(trial, state=TrialState.FAIL)
                trial = _ask_fixed(optuna, study, distributions, _untried(combos, tried), k)
        params = dict(trial.params)
        cell = trial_cell(base, trial_base, params)
        stored = store.trial(name, cell.key)
        if stored is None:
            console.print(f"[bold]tune {name}[/bold] trial {k + 1}/{n_trials} ({kind}): {_fmt(params)}",
                          highlight=False)
            probe = None
            if prunes:
                probe = PruneProbe(storage.url, name, trial.number, settings.prune_every,
                                   settings.prune_startup_trials, settings.prune_warmup_steps)
            row = run_cell(grid, cell, out_dir / TUNING_DIR, progress, monitor=probe)
            stored = _trial_row(name, cell.key, k, params, row)
            store.record_trial(stored)
            _print_trial(console, row, stored)
            replay = bool(row.get("reused"))  # result.json of a killed grid: no process reported this time
        else:  # stored by a grid killed before it told the study
            replay = True
        for step, loss in (stored["dev_losses"] or []) if replay else []:
            trial.report(-loss, step)  # the pruner of later trials sees what an uninterrupted study saw
        if stored["status"] == "done" and stored["dev_score"] is not None:
            study.tell(trial, float(stored["dev_score"]))
        elif stored["status"] == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        else:
            trial.set_user_attr("error", "the trial cell failed")
            study.tell(trial, state=TrialState.FAIL)
    return _record_winner(store, name, base, n_trials)


def _ask_fixed(optuna, study, distributions: dict[str, Any], params: dict[str, Any], k: int):
    """A trial of ``study`` with exactly ``params``."""
    with warnings.catch_warnings():  # PartialFixedSampler is marked experimental; it fixes every value here
        warnings.simplefilter("ignore")
        study.sampler = optuna.samplers.PartialFixedSampler(params, optuna.samplers.RandomSampler(seed=k))
    return study.ask(distributions)


def _untried(combos: list[dict[str, Any]], tried: list[dict[str, Any]]) -> dict[str, Any]:
    """The first configuration of the seeded grid order not scored yet (the grid's first when all were)."""
    return next((c for c in combos if c not in tried), combos[0])


def _prunes(grid: GridConfig, spec: MethodSpec, trial_base: RunConfig, name: str) -> bool:
    """Whether this study's trials are pruned: a pruner is set and the method trains (a declared capability)."""
    from tunelab.methods import get_method

    settings = grid.tune
    if settings.pruner == "none" or not get_method(spec.name).trains:
        return False
    if (grid.resources.get("processes") or 1) > 1:
        raise TunelabError(f"{name}: tune.pruner {settings.pruner} measures the dev loss inside a single-process "
                           "trial; set resources.processes: 1 or tune.pruner: none")
    steps = trial_base.train.steps
    if settings.prune_every >= steps:  # a trial is measured before its last step only (then it is scored)
        raise TunelabError(f"{name}: tune.prune_every={settings.prune_every} is not below train.steps={steps}, so no "
                           "trial would ever be measured; lower tune.prune_every or set tune.pruner: none")
    return True


def _trial_row(name: str, key: str, number: int, params: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """The store's trials row of one trial cell: done, pruned (the runner's ``stopped``) or failed."""
    status = {"done": "done", "stopped": "pruned"}.get(row["status"], "failed")
    losses = dev_losses(Path(row["out_dir"])) if row.get("out_dir") and status != "failed" else []
    return {"study": name, "key": key, "number": number, "params": params, "status": status,
            "metric": row.get("primary_metric"), "dev_score": row.get("quality") if status == "done" else None,
            "dev_loss": losses[-1][1] if losses else None, "dev_losses": losses,
            "pruned_step": row["stopped"]["step"] if status == "pruned" else None,
            "cpu_seconds": row.get("cpu_seconds"), "out_dir": row.get("out_dir")}


def _print_trial(console: Console, row: dict[str, Any], stored: dict[str, Any]) -> None:
    if stored["status"] == "done":
        console.print(f"  dev {row['primary_metric']} = {row['quality']:.2f}", highlight=False)
    elif stored["status"] == "pruned":
        console.print(f"  pruned at step {stored['pruned_step']} (dev loss {stored['dev_loss']:.4f})", highlight=False)
    else:
        console.print(f"  [red]trial failed[/red]: {(row.get('error') or '').splitlines()[0]}", highlight=False)


def _record_winner(store: Store, name: str, base: Cell, n_trials: int) -> dict[str, Any]:
    trials = store.trials(name)
    done = [t for t in trials if t["status"] == "done" and t["dev_score"] is not None]
    if not done:
        raise TunelabError(f"{name}: every tuning trial failed; see the trials' error.json under "
                           f"{TUNING_DIR}/cells/ and fix the search space")
    # ties (e.g. every trial at 0 exact match on a hard task): the lower final dev loss where it was measured
    # (tune.pruner probes), then the earlier trial; never a pruned one
    best = max(done, key=lambda t: (t["dev_score"], -(t["dev_loss"] if t.get("dev_loss") is not None else 0.0),
                                    -t["number"]))
    cost = sum(t["cpu_seconds"] or 0.0 for t in trials)  # pruned and failed trials cost too
    store.record_tuned({"study": name, "method": base.method, "task": base.task, "params": best["params"],
                        "dev_score": best["dev_score"], "trials": len(trials), "cpu_seconds": round(cost, 3)})
    return dict(best["params"])


def _fmt(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


def trial_cell(base: Cell, trial_base: RunConfig, params: dict[str, Any]) -> Cell:
    """One trial: the dev-split config with ``params``; keyed by its resolved config."""
    spec = TaskSpec(task=base.task_spec.task, name=base.task)  # no subset recipe: the dev files are the data
    cell = dataclasses.replace(base, key="", config=trial_base, task_spec=spec, seed=trial_base.train.seed)
    cell = with_params(cell, params)
    return dataclasses.replace(cell, key=cell_key(cell.config, spec))


def dev_config(base: Cell, seed: int, dev_rows: int, out_dir: Path) -> RunConfig:
    """The base cell's config retargeted at a seeded dev split of its training data.

    Only the training file is loaded and split (``dev_rows`` drawn, the rest kept in order); trials
    train on the rest and are scored on the dev rows, with the grid's metrics for the task (else the
    defaults its training rows imply: the test rows are not opened). Trials skip the passes only a
    test cell's report reads (``eval.loss``, ``eval.forgetting``).
    """
    from tunelab.data import TASKS, _find, load_task

    cfg = base.config
    d = cfg.data
    train_file = d.train
    if train_file is None and d.task not in TASKS and Path(d.task).is_dir():
        found = _find(Path(d.task), ("train",))
        train_file = str(found) if found else None
    # the training file alone (a built-in task generates its splits; a single-file task holds no test rows apart)
    data = load_task(d.task, train_file, None, skip_bad=d.skip_bad, task_cap=d.task_cap, mixture=d.mixture,
                     seed=cfg.train.seed, sni_encoding=d.sni_encoding)
    rows = list(data.train)
    if len(rows) < dev_rows + 1:
        raise TunelabError(f"task {base.task}: {len(rows)} training rows cannot spare tune.dev_rows={dev_rows} "
                           "for a dev split; lower tune.dev_rows")
    picked = set(random.Random(f"tunelab-dev:{seed}").sample(range(len(rows)), dev_rows))
    dev = [r for i, r in enumerate(rows) if i in picked]
    rest = [r for i, r in enumerate(rows) if i not in picked]
    texts = {split: "".join(json.dumps(e.to_dict(), ensure_ascii=False) + "\n" for e in part)
             for split, part in (("train", rest), ("dev", dev))}
    recipe = hashlib.sha256((texts["train"] + texts["dev"]).encode()).hexdigest()[:12]
    target = safe_child(out_dir / TUNING_DIR / "data", f"{base.task}-{recipe}")
    files = {}
    for split, text in texts.items():
        path = target / f"{split}.jsonl"
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)
        files[split] = str(path)
    raw = to_dict(cfg)
    raw["data"].update(train=files["train"], eval=files["dev"], max_eval=None, task_cap=None, mixture=None)
    raw["eval"]["metrics"] = list(cfg.eval.metrics or data.metrics)
    # a trial is chosen by its dev score (ties: the pruner's dev losses) and nothing else of it is read: no
    # held-out loss pass (eval.loss) and no forgetting probe, two teacher-forced passes per finished trial saved
    raw["eval"].update(loss=False, forgetting=False)
    raw["train"]["seed"] = seed
    return from_dict(RunConfig, raw)


def tuning_tables(store: Store) -> list[Any]:
    """The report's tuning section: one summary table, then each study's trials."""
    from tunelab.compare.report import Table

    tuned = store.tuned()
    if not tuned:
        return []
    trials = store.trials()
    pruned = {t["study"]: sum(x["status"] == "pruned" for x in trials if x["study"] == t["study"]) for t in tuned}
    summary = Table(["method", "task", "study", "trials", "chosen configuration", "best dev score",
                     "tuning CPU s"],
                    [[t["method"], t["task"], t["study"],
                      f"{t['trials']} ({pruned[t['study']]} pruned)" if pruned[t["study"]] else str(t["trials"]),
                      _fmt(t["params"]), "-" if t["dev_score"] is None else f"{t['dev_score']:.2f}",
                      "-" if t["cpu_seconds"] is None else f"{t['cpu_seconds']:.1f}"] for t in tuned])
    winners = {t["study"]: t["params"] for t in tuned}
    table = Table(["study", "trial", "configuration", "dev metric", "dev score", "dev loss", "CPU s", "chosen"],
                  [[t["study"], str(t["number"]), _fmt(t["params"]), t["metric"] or "-", _score_cell(t),
                    "-" if t["dev_loss"] is None else f"{t['dev_loss']:.4f}",
                    "-" if t["cpu_seconds"] is None else f"{t['cpu_seconds']:.1f}",
                    "yes" if t["status"] == "done" and t["params"] == winners.get(t["study"]) else ""]
                   for t in trials])
    note = ("Each tuned method ran the same number of trials per task on a dev split drawn (seeded) from its "
            "training data, never from the test split; the best dev score chose the configuration its test cells "
            "use. Tuning CPU seconds are the trials' own processes, pruned ones included; add them to a method's "
            "training cost when comparing what it took to reach its score.")
    if any(t["status"] == "pruned" for t in trials):
        note += (" A pruned trial stopped training early because its dev loss (teacher-forced, on the dev rows) "
                 "was worse than the median of the finished trials at the same step (tune.pruner: median); it has "
                 "no dev score and is never chosen.")
    return [note, summary, table]


def _score_cell(trial: dict[str, Any]) -> str:
    if trial["status"] == "pruned":
        return f"pruned at step {trial['pruned_step']}"
    return "failed" if trial["dev_score"] is None else f"{trial['dev_score']:.2f}"
