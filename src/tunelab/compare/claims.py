"""The claims table: each adjective from the articles, stated as a comparison the grid can measure.

A quality claim ("IPT > PT") pairs the cells of two methods on the same task, training-set size and
prompt length, and runs ``tunelab.stats.paired_bootstrap`` over examples (shared, the pairing) and
seeds (drawn per method). Each such test gets a p-value (t on A − B over its bootstrap standard
error), an equivalence test (TOST) against the metric's margin and the minimum detectable effect at
80% power; p-values are Holm-adjusted across every quality test of the report (``decide``). Verdicts:
*supported* / *contradicted* (adjusted p < 0.05, by the sign of A − B), *equivalent* (adjusted TOST
p < 0.05: |A − B| < margin), else *underpowered*. A claim measured on several tasks also gets one
test across them (a stratified bootstrap: rows resampled within each task, tasks weighted equally).
Contrast claims (``it_scale``, ``pt_transfer_gap``) are a difference of two differences on the same
evaluation rows, (A − B) − (C − D), bootstrapped with all four systems resampled together
(``stats.contrast_bootstrap``); they get the same p-value, TOST and Holm treatment as the quality tests.
Cost claims (bytes, time) compare measured ratios. A claim whose methods are absent from the grid is
reported as *not measured*, saying what it needs (``Claim.needs``).

Cells are paired within one base model (``model.name``): a grid that runs some methods on a second model
(a method entry's ``model: {name: ...}``) keeps each model's cells apart, and names the model in a group
when the claim's cells come from more than one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import mean
from typing import Any

import numpy as np

from tunelab.compare.archive import source_cell, source_key
from tunelab.compare.examples import (
    SIMILARITY_KEY,
    cell_predictions,
    example_scores,
    example_stats,
    generalization,
    mean_by_id,
)
from tunelab.compare.sequential import FIXED, SEQUENTIAL, Look, look_key, split_p_values, with_look
from tunelab.metrics import METRICS
from tunelab.stats import (
    ALPHA,
    SPREAD_MIN_SEEDS,
    SPREAD_RATIO,
    contrast_bootstrap,
    holm,
    mde,
    paired_bootstrap,
    se_needed,
    spread_test,
    t_test,
    tost,
    welch_df,
    welch_df_systems,
)

Selector = Callable[[dict[str, Any]], bool]
FORGETTING_NOISE = 0.01  # nats per token: probe losses that close are the same (rounding, batch shape)
NOISE = 0.15  # wall-time ratios within 15% of 1 are noise on this kind of machine (MODELS.md: runs vary 15-30%)
FALLBACK_MARGIN = 1.0  # a metric tunelab does not know (equivalence margins are declared on each metric)
ACROSS_TASKS = "all tasks"  # group name of a claim's pooled test over its tasks


def _opts(row: dict[str, Any]) -> dict[str, Any]:
    return (row.get("config") or {}).get("method") or {}


def _model(row: dict[str, Any]) -> str | None:
    return ((row.get("config") or {}).get("model") or {}).get("name")


def _steps(row: dict[str, Any]) -> int:
    return int(((row.get("config") or {}).get("train") or {}).get("steps", 1))


def _source(row: dict[str, Any]) -> dict[str, Any]:
    """The cell a row started from (``_with_sources``): its method (registry name), label and task; {} if none."""
    return row.get("source_cell") or {}


def is_method(name: str) -> Selector:
    """Cells of that method trained from the base model (a cell started from another's adapter is a transfer)."""
    return lambda r: r["method_name"] == name and not _opts(r).get("init_from")


def is_transfer(r: dict[str, Any]) -> bool:
    """A source-task prompt used as is on the target task, with target demonstrations (IPT, no training)."""
    return (r["method_name"] == "ipt" and bool(_opts(r).get("init_from"))
            and int(r["config"].get("train", {}).get("steps", 1)) == 0)


def started_from(name: str, source: str) -> Selector:
    """Cells of method ``name`` trained on top of a ``source``-method cell's adapter (``init_from: {cell: ...}``),
    e.g. prompt tuning on the model an instruction-tuning cell made."""
    return lambda r: r["method_name"] == name and _source(r).get("method") == source and _steps(r) > 0


def moved_from_task(name: str) -> Selector:
    """A ``name`` adapter trained on one task and used as is on another: the cell starts from a ``name`` cell of
    another task and trains no further (``train.steps: 0``)."""
    return lambda r: (r["method_name"] == name and _source(r).get("method") == name
                      and _source(r).get("task") not in (None, r["task"]) and _steps(r) == 0)


def is_base(r: dict[str, Any]) -> bool:
    """The untouched base model: zero-shot prompting (ICL with k = 0)."""
    return r["method_name"] == "icl" and int(_opts(r).get("k", 1)) == 0


def is_icl(selection: str) -> Selector:
    def pick(r: dict[str, Any]) -> bool:
        if r["method_name"] != "icl" or int(_opts(r).get("k", 1)) == 0:
            return False
        chosen = _opts(r).get("selection", "random")
        return chosen == "random" if selection == "random" else chosen != "random"

    return pick


def any_of(*selectors: Selector) -> Selector:
    return lambda r: any(s(r) for s in selectors)


@dataclass
class Claim:
    id: str
    source: str  # the claim as the articles make it
    test: str  # the measurable statement
    kind: str  # quality | variance | similarity | gap | cost | contrast
    a: Selector
    b: Selector
    a_name: str
    b_name: str
    needs: str = ""  # the cells a grid must run to measure it (said when it is not measured)
    cost: str = ""  # cost column for kind == "cost"
    only_unseen: bool = False
    only_tag: str | None = None  # measured only on tasks the grid tags so (TaskSpec.tags)
    across_tasks: bool = False  # pair every A cell with every B cell (a run's cost, whatever its task)
    smallest_size: bool = False  # compare at the smallest training-set size only
    # contrast claims: effect (A − B) − (C − D) on the same rows; with by_model, (A − B) on the grid's larger model
    # (more parameters, result.json's total_params) minus (A − B) on its smaller, and no C / D
    c: Selector | None = None
    d: Selector | None = None
    c_name: str = ""
    d_name: str = ""
    by_model: bool = False


CLAIMS: list[Claim] = [
    Claim("ipt_beats_pt", "IPT improves on prompt tuning (Sun et al. 2023)", "IPT > PT (quality, same task/data/length)",
          "quality", is_method("ipt"), is_method("prompt_tuning"), "IPT", "PT", needs="ipt and prompt_tuning on a task"),
    Claim("pt_unstable", "Prompt tuning is unstable across seeds; IPT reduces the variance",
          "std over seeds: PT > IPT", "variance", is_method("prompt_tuning"), is_method("ipt"), "PT", "IPT",
          needs="prompt_tuning and ipt on a task, >= 2 seeds each (10 for a verdict)"),
    Claim("ipt_needs_similar", "IPT helps only when the demonstration is semantically similar to the input "
          "(Sun et al. 2023)", "IPT − PT on the more similar half of examples > on the less similar half",
          "similarity", is_method("ipt"), is_method("prompt_tuning"), "IPT", "PT",
          needs="ipt (it records each demonstration's similarity) and prompt_tuning on a task"),
    Claim("retrieved_icl", "ICL helps when demonstrations are semantically similar to the input",
          "retrieved ICL > random ICL", "quality", is_icl("retrieved"), is_icl("random"), "retrieved ICL",
          "random ICL", needs="icl with selection: similar and with selection: random (k >= 1) on a task"),
    Claim("pt_beats_icl", "Prompt tuning beats in-context learning given training data",
          "PT > random ICL", "quality", is_method("prompt_tuning"), is_icl("random"), "PT", "random ICL",
          needs="prompt_tuning and random icl (k >= 1) on a task"),
    Claim("lora_beats_pt", "LoRA outperforms prompt tuning at equal data", "LoRA > PT (same task and data)",
          "quality", is_method("lora"), is_method("prompt_tuning"), "LoRA", "PT", needs="lora and prompt_tuning on a task"),
    Claim("pt_reasoning", "Prompt tuning struggles with complex reasoning",
          "LoRA > PT on tasks tagged `reasoning` (e.g. text-to-SQL)", "quality", is_method("lora"),
          is_method("prompt_tuning"), "LoRA", "PT", only_tag="reasoning",
          needs="lora and prompt_tuning on a task tagged reasoning (tags: [reasoning])"),
    Claim("pt_less_data", "Prompt tuning needs less data", "PT > LoRA at the smallest training-set size",
          "quality", is_method("prompt_tuning"), is_method("lora"), "PT", "LoRA", smallest_size=True,
          needs="prompt_tuning and lora at two or more training-set sizes of a task (train_sizes, or a method's "
                "data.max_train)"),
    Claim("ft_peak", "Full fine-tuning achieves peak performance on its task", "full FT > LoRA",
          "quality", is_method("full_finetune"), is_method("lora"), "full FT", "LoRA",
          needs="full_finetune and lora on a task"),
    Claim("ft_overfits", "Full fine-tuning has a higher overfitting risk",
          "full FT loss gap (eval − train, teacher-forced) > LoRA's", "gap", is_method("full_finetune"),
          is_method("lora"), "full FT", "LoRA", needs="full_finetune and lora on a task, eval.loss: true (the default)"),
    Claim("pt_fewer_bytes", "Prompt tuning scales better to many tasks (less to store per task)",
          "PT bytes per task < LoRA / full FT bytes", "cost", is_method("prompt_tuning"),
          any_of(is_method("lora"), is_method("full_finetune")), "PT", "LoRA/full FT", cost="adapter_bytes",
          needs="prompt_tuning and lora or full_finetune on a task"),
    Claim("pt_cheaper", "Prompt tuning is more resource-efficient", "PT train time < LoRA / full FT train time",
          "cost", is_method("prompt_tuning"), any_of(is_method("lora"), is_method("full_finetune")), "PT",
          "LoRA/full FT", cost="train_seconds", needs="prompt_tuning and lora or full_finetune on a task"),
    Claim("prompt_transfer", "A prompt tuned on a source task helps a target task when paired with target "
          "demonstrations (Sun et al. 2023)", "source-task prompt + retrieved target demonstrations (IPT, no training) "
          "> retrieved ICL alone", "quality", is_transfer, is_icl("retrieved"), "transferred prompt + demos",
          "retrieved ICL", needs="an ipt method with init_from: {cell: a prompt cell of another task} and "
                                 "train.steps: 0, and retrieved icl on its target task"),
    Claim("pt_cheaper_tuned", "Prompt tuning is more resource-efficient, counting the tuning it took",
          "PT CPU seconds incl. its share of tuning < LoRA / full FT's", "cost", is_method("prompt_tuning"),
          any_of(is_method("lora"), is_method("full_finetune")), "PT", "LoRA/full FT", cost="tuned_cpu_seconds",
          needs="prompt_tuning and lora or full_finetune on a task, with a tune: block (equal trials)"),
    Claim("it_unseen", "Instruction tuning generalizes better to unseen tasks",
          "instruction-tuned > base model on unseen tasks", "quality", is_method("instruction_tuning"), is_base,
          "instruction-tuned", "base model", only_unseen=True,
          needs="instruction_tuning and the base model (icl k: 0) on a task marked unseen: true"),
    Claim("it_costly", "Instruction tuning is computationally intensive",
          "instruction tuning train time > PT train time (any tasks, same steps)", "cost",
          is_method("instruction_tuning"), is_method("prompt_tuning"), "instruction tuning", "PT",
          cost="train_seconds", across_tasks=True,
          needs="instruction_tuning and prompt_tuning with the same train.steps and batch_size"),
    Claim("ft_forgets", "Fine-tuning forgets more than prompt tuning",
          "LoRA / full FT forgetting (general-text loss increase over the base model) > PT's", "cost",
          any_of(is_method("lora"), is_method("full_finetune")), is_method("prompt_tuning"), "LoRA/full FT", "PT",
          cost="forgetting", needs="lora or full_finetune and prompt_tuning on a task, eval.forgetting: true "
                                   "(the default)"),
    Claim("it_pt_synergy", "Instruction tuning followed by prompt tuning beats prompt tuning alone",
          "PT on the instruction-tuned model > PT on the base model (same task, data and prompt length)", "quality",
          started_from("prompt_tuning", "instruction_tuning"), is_method("prompt_tuning"), "IT→PT", "PT",
          needs="a prompt_tuning method with init_from: {cell: {method: <an instruction_tuning label>, task: ...}} "
                "and plain prompt_tuning on the same task"),
    Claim("it_scale", "Larger models benefit more from instruction tuning",
          "(instruction-tuned − base model) on the larger model > on the smaller, on unseen tasks", "contrast",
          is_method("instruction_tuning"), is_base, "instruction-tuned", "base model", only_unseen=True,
          by_model=True, needs="instruction_tuning and the base model (icl k: 0) on the same unseen task for two "
                               "models (a method entry's model: {name: ...})"),
    Claim("pt_transfer_gap", "Prompt tuning generalizes worse to tasks unlike its training task",
          "PT's drop on a task when trained on another task (in-task PT − moved PT) > LoRA's drop, same rows",
          "contrast", is_method("prompt_tuning"), moved_from_task("prompt_tuning"), "PT", "PT from another task",
          c=is_method("lora"), d=moved_from_task("lora"), c_name="LoRA", d_name="LoRA from another task",
          needs="prompt_tuning and lora on target task Y, and on Y cells of each started from its own task-X cell "
                "(init_from: {cell: {method: <label>, task: X}}, train.steps: 0)"),
]


@dataclass
class Finding:
    """One claim measured on one group of cells (task, training-set size, prompt length)."""

    claim: Claim
    group: str
    effect: float | None = None
    ci: tuple[float, float] | None = None
    verdict: str = "not measured"
    detail: str = ""
    n: dict[str, int] = field(default_factory=dict)
    # quality tests only (filled by _quality and decide)
    metric: str | None = None
    se: float | None = None
    df: float | None = None  # t degrees of freedom (Welch–Satterthwaite: fractional)
    p_value: float | None = None
    p_adjusted: float | None = None
    margin: float | None = None
    p_tost: float | None = None
    p_tost_adjusted: float | None = None
    mde: float | None = None
    diffs: Any = None  # (R,) bootstrap differences, for the pooled test across tasks
    example_var: float = 0.0
    seed_var: float = 0.0
    seed_vars: tuple[float, ...] = (0.0, 0.0)  # each side's spread of per-seed scores (variance): A, B (a contrast: A-D)
    welch_df: float | None = None  # degrees of freedom counting the seeds (sequential tests' t -> normal)
    procedure: str = FIXED  # fixed-sample | sequential (anytime-valid: the grid added cells until decisive)
    keys: tuple[list[str], ...] = ([], [])  # each side's cells measured (A, B; a contrast's A-D): the adaptive planner's
    unconverged: list[str] = field(default_factory=list)  # "PT (2 of 3 seeds)": sides whose loss still moved
    runaway: list[str] = field(default_factory=list)  # "PT (7 of 17 cells)": sides whose answers ran to the token limit
    spread_p: float | None = None  # variance claims: Brown–Forsythe p-value (its own Holm family)

    @property
    def caveat(self) -> str:
        """What a reader must know beside the verdict: sides whose training had not flattened, and sides with cells
        that cut over ``termination.THRESHOLD`` of their answers at the token limit."""
        parts = [f"unconverged: {', '.join(self.unconverged)}" if self.unconverged else "",
                 f"answers ran to the token limit: {', '.join(self.runaway)}" if self.runaway else ""]
        return "; ".join(p for p in parts if p)

    @property
    def tested(self) -> bool:
        """A quality test with a p-value (it enters the Holm family)."""
        return self.p_value is not None


def margin_for(metric: str | None, margins: dict[str, float] | None = None) -> float:
    """The equivalence margin of a metric: the grid's ``margins`` first, then the metric's own
    (``MetricFacts.margin``)."""
    if margins and metric in margins:
        return float(margins[metric])
    spec = METRICS.get(metric or "")
    return spec.facts.margin if spec is not None else FALLBACK_MARGIN


def evaluate_claims(rows: list[dict[str, Any]], n_resamples: int = 1000,
                    margins: dict[str, float] | None = None,
                    looks: dict[str, list[Look]] | None = None) -> list[Finding]:
    """Every claim in ``CLAIMS`` measured on the store's finished rows (one Finding per group).

    Quality claims on several groups get one more Finding (group ``all tasks``); then every quality
    test's p-value is Holm-adjusted across the whole list and verdicts are set (``decide``). ``looks``:
    the earlier looks of an ``until: decisive`` grid (``compare.sequential``); tests with looks are
    decided by the anytime-valid procedure.
    """
    out = _measure(rows, n_resamples)
    out = _with_pooled(out, margins)
    return decide(out, margins, looks=looks)


def _measure(rows: list[dict[str, Any]], n_resamples: int) -> list[Finding]:
    out: list[Finding] = []
    rows = _with_sources(rows)
    for claim in CLAIMS:
        usable = [r for r in rows if r["unseen"]] if claim.only_unseen else rows
        if claim.only_tag:
            usable = [r for r in usable if claim.only_tag in (r.get("tags") or [])]
        if claim.kind == "contrast":
            out.extend(_contrasts(claim, usable, n_resamples))
            continue
        pairs = _pairs(claim, usable)
        if not pairs:
            out.append(_not_measured(claim, usable, ((claim.a_name, claim.a), (claim.b_name, claim.b)),
                                     "no two cells share task and data size"))
            continue
        for group, a_rows, b_rows in pairs:
            measure = {"quality": _quality, "variance": _variance, "cost": _cost,
                       "similarity": _similarity_gap, "gap": _loss_gap}[claim.kind]
            finding = measure(claim, group, a_rows, b_rows, n_resamples)
            finding.unconverged, finding.runaway = _flags(((claim.a_name, a_rows), (claim.b_name, b_rows)))
            out.append(finding)
    return out


def _not_measured(claim: Claim, usable: list[dict[str, Any]], sides: tuple[tuple[str, Selector], ...],
                  otherwise: str) -> Finding:
    """*not measured*, saying what the claim needs and which of its sides the grid lacks."""
    missing = [name for name, sel in sides if not any(sel(r) for r in usable)]
    why = f"no cells for {', '.join(missing)}" if missing else otherwise
    where = " on unseen tasks" if claim.only_unseen else f" on tasks tagged {claim.only_tag}" if claim.only_tag else ""
    return Finding(claim, "-", detail=f"needs {claim.needs} ({why}{where})" if claim.needs else why + where)


def _with_sources(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows that started from another cell of ``rows`` (``method.init_from``: that cell's directory, named by its
    key) get ``source_cell``: that cell's method (registry name), label and task. A source outside the store (a run
    directory given by hand) stays unknown: such a cell is no side of the claims that ask for one."""
    by_key = {r["key"]: r for r in rows if "key" in r}
    out = []
    for r in rows:
        if r.get("source_cell"):  # ``Store.tagged_rows`` found it in the whole store
            out.append(r)
            continue
        key = source_key(r.get("config"))
        src = by_key.get(key) if key else None
        out.append({**r, "source_cell": source_cell(src)} if src is not None else r)
    return out


def _flags(sides: tuple[tuple[str, list[dict]], ...]) -> tuple[list[str], list[str]]:
    """Each side some of whose cells' training loss was still moving when training stopped (``convergence``), and
    each side some of whose cells cut over ``termination.THRESHOLD`` of their answers at the token limit."""
    from tunelab import convergence, termination

    def count(flagged: Callable[[dict], bool]) -> list[str]:
        found = ((name, sum(1 for r in side if flagged(r)), len(side)) for name, side in sides)
        return [f"{name} ({k} of {n} cells)" for name, k, n in found if k]

    return (count(lambda r: (convergence.of_row(r) or {}).get("converged") is False),
            count(lambda r: termination.runaway(r) is True))


def _with_pooled(findings: list[Finding], margins: dict[str, float] | None = None) -> list[Finding]:
    """After each quality claim's groups, its test across them: the mean effect over groups.

    Each group's bootstrap resamples its own rows and seeds independently, so averaging the groups'
    r-th resampled differences is one draw of the stratified bootstrap (strata: the groups). The pooled
    equivalence margin is the mean of the groups' own margins (each from its metric: BLEU ±1 and exact match
    ±2 pool to ±1.5), as the pooled effect is the mean of their effects.
    """
    out: list[Finding] = []
    by_claim: dict[str, list[Finding]] = defaultdict(list)
    for f in findings:
        by_claim[f.claim.id].append(f)
    for group in by_claim.values():
        out.extend(group)
        tested = [f for f in group if f.diffs is not None]
        if len(tested) < 2:
            continue
        diffs = np.mean(np.stack([f.diffs for f in tested]), axis=0)
        effect = float(np.mean([f.effect for f in tested]))
        lo, hi = np.quantile(diffs, [ALPHA / 2, 1 - ALPHA / 2])
        metrics = sorted({f.metric for f in tested if f.metric})
        rows = sum(f.n.get("examples", 0) for f in tested)
        pooled = Finding(group[0].claim, ACROSS_TASKS, effect, (float(lo), float(hi)),
                         detail=f"mean of {len(tested)} groups' A − B ({', '.join(metrics)}), "
                                f"stratified bootstrap over groups' rows and seeds; {rows} rows in all",
                         n={"examples": rows, "groups": len(tested)},
                         metric=metrics[0] if len(metrics) == 1 else None,
                         se=float(np.std(diffs, ddof=1)), df=_pooled_df(tested), diffs=diffs,
                         welch_df=_pooled_df(tested),
                         unconverged=sorted({u for f in tested for u in f.unconverged}),
                         runaway=sorted({u for f in tested for u in f.runaway}),
                         margin=float(np.mean([f.margin if f.margin is not None else margin_for(f.metric, margins)
                                               for f in tested])))
        pooled.p_value = t_test(effect, pooled.se, pooled.df)
        out.append(pooled)
    return out


def _pooled_df(tested: list[Finding]) -> float:
    """Welch–Satterthwaite degrees of freedom of the mean of the groups' effects: se² = Σ se_g² / G²."""
    parts = [(float(f.se) ** 2, float(f.df or 1)) for f in tested if f.se]
    if not parts:
        return 1.0
    return float(sum(v for v, _ in parts) ** 2 / sum(v ** 2 / df for v, df in parts))


def decide(findings: list[Finding], margins: dict[str, float] | None = None, alpha: float = ALPHA,
           looks: dict[str, list[Look]] | None = None) -> list[Finding]:
    """Holm-adjust the p-values of every quality test (and, as a second family, their TOST p-values), then
    set each test's verdict: supported / contradicted / equivalent / underpowered.

    With ``looks`` (a grid that added cells until decisive), every quality test's p-values are those of the
    split procedure over its earlier looks plus this one (``compare.sequential.split_p_values``: the t test at
    the first look, the planned cells, at alpha / 2, and the anytime-valid mixture over every look at alpha / 2).
    Variance claims' Brown–Forsythe p-values are a family of their own (``_decide_spread``).
    """
    tested = [f for f in findings if f.tested]
    for f in tested:
        if f.margin is None:
            f.margin = margin_for(f.metric, margins)
        f.p_tost = tost(f.effect, f.se, f.df, f.margin)
        f.mde = mde(f.se, f.df, alpha)
        if looks is not None:
            assert f.effect is not None and f.se is not None
            level = alpha / len(tested)  # rho is tuned for the strictest Holm step, as the sizing is
            history = with_look(looks.get(look_key(f.claim.id, f.group), []), look_of(f))
            f.p_value, f.p_tost = split_p_values(history, f.margin, se_needed(f.margin, level), level)
            f.procedure = SEQUENTIAL
            f.n["looks"] = len(history)
    for f, p in zip(tested, holm([f.p_value for f in tested]), strict=True):
        f.p_adjusted = p
    for f, p in zip(tested, holm([f.p_tost for f in tested]), strict=True):
        f.p_tost_adjusted = p
    for f in tested:
        assert f.p_adjusted is not None and f.p_tost_adjusted is not None and f.effect is not None
        if f.p_adjusted < alpha:
            f.verdict = "supported" if f.effect > 0 else "contradicted"
        elif f.p_tost_adjusted < alpha:
            f.verdict = "equivalent"
        else:
            f.verdict = "underpowered"
        f.detail += (f"; MDE(80%) {f.mde:.2f}, margin ±{f.margin:g}, p={f.p_value:.3g} (Holm {f.p_adjusted:.3g}), "
                     f"TOST p={f.p_tost:.3g} (Holm {f.p_tost_adjusted:.3g})")
        if f.procedure == SEQUENTIAL:
            f.detail += f"; anytime-valid p over {f.n['looks']} looks"
    _decide_spread(findings, alpha)
    return findings


def look_of(f: Finding) -> Look:
    """This measurement of a quality test as one look of the sequential procedure."""
    assert f.effect is not None and f.se is not None
    return Look(float(f.effect), float(f.se), float(f.welch_df if f.welch_df is not None else f.df or 1))


def _decide_spread(findings: list[Finding], alpha: float) -> None:
    """Variance claims: Holm over their Brown–Forsythe p-values; a verdict needs SPREAD_MIN_SEEDS seeds a side."""
    spread = [f for f in findings if f.spread_p is not None]
    for f, p in zip(spread, holm([f.spread_p for f in spread]), strict=True):
        f.p_adjusted = p
        enough = min(f.n["a_seeds"], f.n["b_seeds"]) >= SPREAD_MIN_SEEDS
        if not enough:
            f.verdict = "underpowered"
            f.detail += f"; a verdict needs >= {SPREAD_MIN_SEEDS} seeds per side"
        elif p < alpha:
            f.verdict = "supported" if (f.effect or 0) > 1 else "contradicted"
        else:
            f.verdict = "inconclusive"
        f.detail += f" (Holm p={p:.3g})"


def _pairs(claim: Claim, rows: list[dict[str, Any]]) -> list[tuple[str, list[dict], list[dict]]]:
    """Groups where both sides have cells: same task and size, same prompt length where both have one."""
    if claim.across_tasks:
        return _across_tasks(claim, rows)
    a_groups: dict[tuple, list[dict]] = defaultdict(list)
    b_groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if claim.a(r):
            a_groups[_where(r)].append(r)
        elif claim.b(r):
            b_groups[_where(r)].append(r)
    models = {key[3] for key in (*a_groups, *b_groups)}
    found = []
    for (task, size, length, model), a_rows in sorted(a_groups.items(), key=lambda kv: str(kv[0])):
        b_rows = _one_setting(_matching(b_groups, (task, size, length, model)))
        if b_rows:
            found.append((_group_name(task, size, length, model if len(models) > 1 else None), a_rows, b_rows))
    if claim.smallest_size and found:
        sizes = sorted({r["train_size"] for _, a, _ in found for r in a if r["train_size"] is not None})
        found = [f for f in found if sizes and f[1][0]["train_size"] == sizes[0]] if len(sizes) > 1 else []
    return found


def _where(r: dict[str, Any]) -> tuple:
    """What a pair of cells must share: task, training-set size (-1: all), prompt length and base model."""
    return r["task"], r["train_size"] if r["train_size"] is not None else -1, r["prompt_length"], _model(r)


def _matching(groups: dict[tuple, list[dict]], where: tuple) -> list[dict]:
    """The rows of ``groups`` at ``where``: the same task, size and model; the same prompt length where both have one."""
    task, size, length, model = where
    return [r for (t, s, ln, m), rs in groups.items() for r in rs
            if t == task and s == size and m == model and (ln == length or ln is None or length is None)]


def _across_tasks(claim: Claim, rows: list[dict[str, Any]]) -> list[tuple[str, list[dict], list[dict]]]:
    """One group: every A cell against every B cell of the same model trained for as many steps of the same batch
    size."""
    def budget(r: dict[str, Any]) -> tuple:
        return (r["config"].get("train", {}).get("steps"), r["config"].get("train", {}).get("batch_size"),
                _model(r))

    a_rows = [r for r in rows if claim.a(r)]
    budgets = {budget(r) for r in a_rows}
    b_rows = _one_setting([r for r in rows if claim.b(r) and budget(r) in budgets])
    a_rows = [r for r in a_rows if budget(r) in {budget(b) for b in b_rows}]
    if not a_rows or not b_rows:
        return []
    tasks = lambda side: ", ".join(sorted({r["task"] for r in side}))  # noqa: E731
    return [(f"{tasks(a_rows)} vs {tasks(b_rows)}", a_rows, b_rows)]


def _one_setting(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Several settings of B may match (e.g. ICL without a size); keep the first label's seeds only."""
    if not rows:
        return rows
    label = rows[0]["method"]
    return [r for r in rows if r["method"] == label]


def _group_name(task: str, size: int, length: int | None, model: str | None = None) -> str:
    parts = [task]
    if size != -1:
        parts.append(f"n={size}")
    if length is not None:
        parts.append(f"len={length}")
    if model is not None:
        parts.append(f"on {model}")
    return " ".join(parts)


def _verdict(ci: tuple[float, float] | None) -> str:
    if ci is None:
        return "inconclusive"
    lo, hi = ci
    return "supported" if lo > 0 else "contradicted" if hi < 0 else "inconclusive"


def _aligned(a_rows: list[dict], b_rows: list[dict]) -> tuple[np.ndarray, np.ndarray, Callable, str] | None:
    """(S_a, n, d) and (S_b, n, d) statistics on the examples every cell evaluated, plus the reduction."""
    aligned = _aligned_sides([a_rows, b_rows])
    if aligned is None:
        return None
    (a, b), reduce, metric = aligned
    return a, b, reduce, metric


def _aligned_sides(sides: list[list[dict]]) -> tuple[list[np.ndarray], Callable, str] | None:
    """One (S, n, d) statistics array per side on the examples every cell of every side evaluated, the
    reduction and the metric; None if the sides' primary metrics differ or they share no example."""
    cells = [r for side in sides for r in side]
    metric = cells[0]["primary_metric"]
    if any(r["primary_metric"] != metric for r in cells):
        return None
    per_cell = [example_stats(r, metric) for r in cells]
    common = set.intersection(*(set(ids) for ids, _, _ in per_cell))
    if not common:
        return None
    order = sorted(common)
    stacked = []
    for ids, stats, _ in per_cell:
        index = {i: k for k, i in enumerate(ids)}
        stacked.append(stats[[index[i] for i in order]])
    out, start = [], 0
    for side in sides:
        out.append(np.stack(stacked[start: start + len(side)]))
        start += len(side)
    return out, per_cell[0][2], metric


def _quality(claim: Claim, group: str, a_rows: list[dict], b_rows: list[dict], n_resamples: int) -> Finding:
    aligned = _aligned(a_rows, b_rows)
    n = {"a_seeds": len(a_rows), "b_seeds": len(b_rows)}
    if aligned is None:
        return Finding(claim, group, verdict="not measured", detail="cells share no evaluation examples", n=n)
    a, b, reduce, metric = aligned
    # each group draws its own resamples (seeded by its name): the groups are independent strata
    result = paired_bootstrap(a, b, reduce, n_resamples=n_resamples, seed=_group_seed(claim.id, group))
    n["examples"] = result.n_examples
    detail = (f"{metric}: {claim.a_name} {result.a:.2f} vs {claim.b_name} {result.b:.2f} "
              f"({result.n_examples} rows x {len(a_rows)} vs {len(b_rows)} seeds)")
    # the t test's degrees of freedom count the seeds (Welch–Satterthwaite over the row and seed terms of se²): with
    # 3 seeds a side and a large seed spread that is ~4, not rows − 1, which would claim far more than 3 seeds can
    df = welch_df(result.example_var, result.n_examples, result.seed_vars[0], len(a_rows), result.seed_vars[1],
                  len(b_rows))
    return Finding(claim, group, result.delta, result.ci, "underpowered", detail, n, metric=metric, se=result.se,
                   df=df, p_value=t_test(result.delta, result.se, df), diffs=result.diffs,
                   example_var=result.example_var, seed_var=result.seed_var, seed_vars=result.seed_vars,
                   welch_df=df, keys=(_keys(a_rows), _keys(b_rows)))


def _keys(rows: list[dict[str, Any]]) -> list[str]:
    return [r["key"] for r in rows if "key" in r]


def _contrasts(claim: Claim, rows: list[dict[str, Any]], n_resamples: int) -> list[Finding]:
    """A contrast claim's tests, one per group where all four sides have cells; else *not measured*."""
    groups = _model_groups(claim, rows) if claim.by_model else _four_sides(claim, rows)
    if not groups:
        sides: tuple[tuple[str, Selector], ...] = ((claim.a_name, claim.a), (claim.b_name, claim.b))
        if claim.c is not None and claim.d is not None:
            sides += ((claim.c_name, claim.c), (claim.d_name, claim.d))
        otherwise = ("no two models (with a recorded total_params) have both on one task and size" if claim.by_model
                     else "no task where all four share size and model")
        return [_not_measured(claim, rows, sides, otherwise)]
    out = []
    for group, names, sides_rows in groups:
        finding = _contrast(claim, group, names, sides_rows, n_resamples)
        finding.unconverged, finding.runaway = _flags(tuple(zip(names, sides_rows, strict=True)))
        out.append(finding)
    return out


def _four_sides(claim: Claim, rows: list[dict[str, Any]]) -> list[tuple[str, list[str], list[list[dict]]]]:
    """Groups where A, B, C and D all have cells of one task, size and model (one prompt length where two have
    one), each side other than A kept to one method entry (``_one_setting``), as B is in ``_pairs``."""
    assert claim.c is not None and claim.d is not None
    selectors = (claim.a, claim.b, claim.c, claim.d)
    by_side: list[dict[tuple, list[dict]]] = [defaultdict(list) for _ in selectors]
    for r in rows:
        for groups, select in zip(by_side, selectors, strict=True):
            if select(r):
                groups[_where(r)].append(r)
                break
    models = {key[3] for groups in by_side for key in groups}
    names = [claim.a_name, claim.b_name, claim.c_name, claim.d_name]
    found = []
    for where, a_rows in sorted(by_side[0].items(), key=lambda kv: str(kv[0])):
        others = [_one_setting(_matching(groups, where)) for groups in by_side[1:]]
        if all(others):
            task, size, length, model = where
            found.append((_group_name(task, size, length, model if len(models) > 1 else None), names,
                          [a_rows, *others]))
    return found


def _model_groups(claim: Claim, rows: list[dict[str, Any]]) -> list[tuple[str, list[str], list[list[dict]]]]:
    """Per task and training-set size: A and B on the largest model that has both (most parameters: the fewest
    total_params any of its cells recorded, i.e. the base model's own) and A and B on the smallest."""
    by_where: dict[tuple, dict[str | None, tuple[list[dict], list[dict]]]] = defaultdict(
        lambda: defaultdict(lambda: ([], [])))
    for r in rows:
        side = 0 if claim.a(r) else 1 if claim.b(r) else None
        if side is not None:
            by_where[(r["task"], r["train_size"] if r["train_size"] is not None else -1)][_model(r)][side].append(r)
    found = []
    for (task, size), models in sorted(by_where.items(), key=lambda kv: str(kv[0])):
        both = {m: (_one_setting(a), _one_setting(b)) for m, (a, b) in models.items() if a and b}
        params = {m: _params(a + b) for m, (a, b) in both.items()}
        known = {m: v for m, v in params.items() if v is not None}
        if len(set(known.values())) < 2:
            continue
        large, small = max(known, key=known.__getitem__), min(known, key=known.__getitem__)
        names = [f"{claim.a_name} ({large})", f"{claim.b_name} ({large})", f"{claim.a_name} ({small})",
                 f"{claim.b_name} ({small})"]
        found.append((_group_name(task, size, None, f"{large} vs {small}"), names, [*both[large], *both[small]]))
    return found


def _params(rows: list[dict[str, Any]]) -> int | None:
    counts = [(r.get("result") or {}).get("total_params") for r in rows]
    known = [int(c) for c in counts if c]
    return min(known) if known else None


def _contrast(claim: Claim, group: str, names: list[str], sides: list[list[dict]], n_resamples: int) -> Finding:
    """(A − B) − (C − D) on the rows all four sides evaluated (``stats.contrast_bootstrap``: examples resampled
    once for the four, seeds per side), tested as a quality claim is: t on the effect over its bootstrap
    standard error, TOST at the metric's margin, both Holm-adjusted with the report's other quality tests."""
    n = {"a_seeds": max(len(sides[0]), len(sides[1])), "b_seeds": max(len(sides[2]), len(sides[3]))}
    aligned = _aligned_sides(sides)
    if aligned is None:
        return Finding(claim, group, verdict="not measured", detail="cells share no evaluation examples", n=n)
    stats, reduce, metric = aligned
    result = contrast_bootstrap((stats[0], stats[1]), (stats[2], stats[3]), reduce, n_resamples=n_resamples,
                                seed=_group_seed(claim.id, group))
    n["examples"] = result.n_examples
    detail = (f"{metric}: {names[0]} − {names[1]} = {result.a:+.2f}, {names[2]} − {names[3]} = {result.b:+.2f} "
              f"({result.n_examples} rows evaluated by all four; seeds {'/'.join(str(len(s)) for s in sides)})")
    df = welch_df_systems(result.example_var, result.n_examples,  # seeds counted, as in _quality
                          [(v, len(s)) for v, s in zip(result.system_vars, sides, strict=True)])
    return Finding(claim, group, result.delta, result.ci, "underpowered", detail, n, metric=metric, se=result.se,
                   df=df, p_value=t_test(result.delta, result.se, df), diffs=result.diffs,
                   example_var=result.example_var, seed_var=result.seed_var, seed_vars=result.system_vars,
                   welch_df=df, keys=tuple(_keys(side) for side in sides))


def _group_seed(claim_id: str, group: str) -> int:
    import zlib

    return zlib.crc32(f"{claim_id}|{group}".encode())


def _variance(claim: Claim, group: str, a_rows: list[dict], b_rows: list[dict], n_resamples: int) -> Finding:
    """Is A's score more spread out over seeds than B's? Brown–Forsythe on the per-seed scores.

    Effect: sd_a / sd_b with a bootstrap interval (seeds resampled within each side); the p-value is the
    Brown–Forsythe test's (``stats.spread_test``), Holm-adjusted across the report's spread tests in
    ``decide``. With fewer than ``SPREAD_MIN_SEEDS`` seeds on a side the verdict is *underpowered* whatever
    the data: at 3 seeds per side the test finds even a twofold SD ratio about one time in ten.
    """
    n = {"a_seeds": len(a_rows), "b_seeds": len(b_rows)}
    if len(a_rows) < 2 or len(b_rows) < 2:
        return Finding(claim, group, verdict="inconclusive", detail="needs >= 2 seeds per method", n=n)
    aligned = _aligned(a_rows, b_rows)
    if aligned is None:
        return Finding(claim, group, verdict="inconclusive", detail="cells share no evaluation examples", n=n)
    a, b, reduce, metric = aligned
    count = a.shape[1]
    scores = [np.array([reduce(s.sum(0, keepdims=True), count)[0] for s in side]) for side in (a, b)]
    test = spread_test(scores[0], scores[1], n_resamples=max(n_resamples, 1000), seed=_group_seed(claim.id, group))
    n["examples"] = count
    detail = (f"{metric} sd over seeds: {claim.a_name} {test.sd_a:.2f} ({len(a_rows)} seeds) vs {claim.b_name} "
              f"{test.sd_b:.2f} ({len(b_rows)} seeds); Brown–Forsythe p={test.p_value:.3g}; power to find a "
              f"{SPREAD_RATIO:g}x sd ratio at these seeds {test.power:.0%} (F-test approximation; {test.seeds_needed} seeds "
              "per side for 80%)")
    return Finding(claim, group, test.ratio, test.ci, "underpowered", detail, n, metric=metric,
                   spread_p=test.p_value, seed_vars=(test.sd_a ** 2, test.sd_b ** 2), keys=(_keys(a_rows), _keys(b_rows)))


def _similarity_gap(claim: Claim, group: str, a_rows: list[dict], b_rows: list[dict],
                    n_resamples: int) -> Finding:
    """(A − B) on the examples whose demonstration is more similar than the median, minus the same on the rest.

    Each example carries four statistics per cell, [score·top, top, score·bottom, bottom], whose reduction is
    mean(top) − mean(bottom); the paired bootstrap of A − B over examples and seeds then gives the
    difference of differences with its interval, the same resampling as every quality claim.
    """
    n = {"a_seeds": len(a_rows), "b_seeds": len(b_rows)}
    similarity = mean_by_id((cell_predictions(r) for r in a_rows), lambda p: p.get(SIMILARITY_KEY))
    if not similarity:
        return Finding(claim, group, verdict="not measured", n=n,
                       detail=f"{claim.a_name} predictions carry no per-example `{SIMILARITY_KEY}`")
    metric = _per_example_metric(a_rows + b_rows)
    if metric is None:
        return Finding(claim, group, verdict="inconclusive", detail="no per-example metric in every cell", n=n)
    per_cell = [example_scores(r, metric) for r in a_rows + b_rows]
    ids = sorted(set(similarity).intersection(*per_cell))
    if len(ids) < 10:
        return Finding(claim, group, verdict="inconclusive", detail=f"{len(ids)} shared examples (< 10)", n=n)
    sims = np.array([similarity[i] for i in ids])
    top = (sims >= np.median(sims)).astype(np.float64)
    scores = [np.array([cell[i] for i in ids]) for cell in per_cell]
    stats = np.stack([np.stack([s * top, top, s * (1 - top), 1 - top], axis=1) for s in scores])  # (cells, n, 4)
    a_stats, b_stats = stats[: len(a_rows)], stats[len(a_rows):]
    result = paired_bootstrap(a_stats, b_stats, _ratio_difference, n_resamples=n_resamples, seed=0)
    n["examples"] = len(ids)

    def half_mean(system: np.ndarray, k: int) -> float:  # mean over seeds of the half's mean score
        return float(np.mean(system[:, :, k].sum(1) / system[:, :, k + 1].sum(1)))

    halves = {name: half_mean(a_stats, k) - half_mean(b_stats, k) for name, k in (("similar", 0), ("dissimilar", 2))}
    detail = (f"{metric} per example, {len(ids)} examples split at median similarity {np.median(sims):.3f}: "
              f"{claim.a_name} − {claim.b_name} = {halves['similar']:+.2f} on the similar half, "
              f"{halves['dissimilar']:+.2f} on the other (p={result.p_value:.3f})")
    return Finding(claim, group, result.delta, result.ci, _verdict(result.ci), detail, n)


def _ratio_difference(sums: np.ndarray, n: int) -> np.ndarray:
    """sums[0] / sums[1] − sums[2] / sums[3]: e.g. [s·top, top, s·bottom, bottom] gives mean(top) − mean(bottom)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.nan_to_num(sums[:, 0] / sums[:, 1]) - np.nan_to_num(sums[:, 2] / sums[:, 3])


def _loss_gap(claim: Claim, group: str, a_rows: list[dict], b_rows: list[dict], n_resamples: int) -> Finding:
    """Generalisation gap of A minus that of B, bootstrapped over eval and training rows and seeds.

    Each cell's rows are [nll, tokens, 0, 0] for evaluation rows and [0, 0, nll, tokens] for training
    rows, so ``_ratio_difference`` of their sums is eval loss − train loss; both methods saw the same
    rows (same task and size), which pairs them.
    """
    n = {"a_seeds": len(a_rows), "b_seeds": len(b_rows)}
    gaps: list[Any] = [generalization(r) for r in a_rows + b_rows]
    if any(g is None for g in gaps):
        return Finding(claim, group, verdict="not measured", n=n,
                       detail="cells without a held-out loss (`generalization` in result.json; eval.loss=true)")
    if len({(len(g["eval_nll"]), len(g["train_nll"])) for g in gaps}) != 1:
        return Finding(claim, group, verdict="inconclusive", detail="cells measured different rows", n=n)
    stats = np.stack([np.array([[nll, tokens, 0, 0] for nll, tokens in g["eval_nll"]]
                               + [[0, 0, nll, tokens] for nll, tokens in g["train_nll"]], dtype=np.float64)
                      for g in gaps])
    result = paired_bootstrap(stats[: len(a_rows)], stats[len(a_rows):], _ratio_difference,
                              n_resamples=n_resamples, seed=0)
    n["examples"] = stats.shape[1]
    detail = (f"eval − train loss: {claim.a_name} {result.a:.3f} vs {claim.b_name} {result.b:.3f} "
              f"({len(a_rows)} vs {len(b_rows)} seeds, {len(gaps[0]['eval_nll'])} eval + "
              f"{len(gaps[0]['train_nll'])} train rows, p={result.p_value:.3f})")
    return Finding(claim, group, result.delta, result.ci, _verdict(result.ci), detail, n)


def _per_example_metric(rows: list[dict]) -> str | None:
    """The primary metric when it is a mean of per-example scores, else the first such metric every cell has."""
    primary = rows[0]["primary_metric"]
    candidates = [primary] + [m for m in cell_predictions(rows[0])[0].get("scores", {}) if m != primary]
    for metric in candidates:
        if all(example_scores(r, metric) for r in rows):
            return metric
    return None


def _cost(claim: Claim, group: str, a_rows: list[dict], b_rows: list[dict], n_resamples: int) -> Finding:
    """Ratio of mean costs A / B; the claim says A costs less (ratio < 1) unless it names A as costlier."""
    values_a = [r[claim.cost] for r in a_rows if r.get(claim.cost) is not None]
    values_b = [r[claim.cost] for r in b_rows if r.get(claim.cost) is not None]
    n = {"a_seeds": len(values_a), "b_seeds": len(values_b)}
    if claim.cost == "forgetting" and values_a and values_b:
        return _forgetting(claim, group, values_a, values_b, n)
    if not values_a or not values_b or not mean(values_b):
        verdict = "not measured" if claim.cost == "tuned_cpu_seconds" else "inconclusive"  # untuned grids
        return Finding(claim, group, verdict=verdict, detail=f"no {claim.cost} recorded", n=n)
    ratio = mean(values_a) / mean(values_b)
    claims_less = claim.id != "it_costly"
    tolerance = 0.0 if claim.cost == "adapter_bytes" else NOISE  # bytes are exact; times are noisy
    if claims_less:
        verdict = "supported" if ratio < 1 - tolerance else "contradicted" if ratio > 1 + tolerance else "inconclusive"
    else:
        verdict = "supported" if ratio > 1 + tolerance else "contradicted" if ratio < 1 - tolerance else "inconclusive"
    detail = (f"{claim.cost}: {claim.a_name} {mean(values_a):,.1f} vs {b_rows[0]['method']} {mean(values_b):,.1f} "
              f"(ratio {ratio:.3g}; measured, no interval" + (f"; within ±{NOISE:.0%} counts as noise)"
                                                               if tolerance else ")"))
    return Finding(claim, group, ratio, None, verdict, detail, n)


def _forgetting(claim: Claim, group: str, values_a: list[float], values_b: list[float],
                n: dict[str, int]) -> Finding:
    """A's forgetting (nats per token, vs the base model) minus B's: a difference, not a ratio (either may be
    near 0 or negative); within FORGETTING_NOISE nats counts as no difference."""
    diff = mean(values_a) - mean(values_b)
    verdict = ("supported" if diff > FORGETTING_NOISE else "contradicted" if diff < -FORGETTING_NOISE
               else "inconclusive")
    detail = (f"forgetting: {claim.a_name} {mean(values_a):+.4f} vs {claim.b_name} {mean(values_b):+.4f} nats/token "
              f"(difference {diff:+.4f}; measured on a fixed general-text probe, no interval; within "
              f"±{FORGETTING_NOISE} counts as none)")
    return Finding(claim, group, diff, None, verdict, detail, n)


def summarise(findings: list[Finding]) -> dict[str, str]:
    """One verdict per claim over its groups: unanimous, or 'mixed' when groups disagree."""
    by_claim: dict[str, set[str]] = defaultdict(set)
    for f in findings:
        by_claim[f.claim.id].add(f.verdict)
    out = {}
    pooled = {f.claim.id: f.verdict for f in findings if f.group == ACROSS_TASKS}
    for cid, verdicts in by_claim.items():
        if cid in pooled:  # a claim on several tasks: its one verdict across them
            out[cid] = f"{pooled[cid]} (across tasks)"
            continue
        decided = verdicts - {"inconclusive", "underpowered", "not measured"}
        if len(decided) > 1:
            out[cid] = "mixed"
        elif decided:
            weak = verdicts & {"inconclusive", "underpowered"}
            out[cid] = decided.pop() if not weak else f"{next(iter(decided))} (some groups {' or '.join(sorted(weak))})"
        else:
            out[cid] = ("not measured" if verdicts == {"not measured"}
                        else "underpowered" if "underpowered" in verdicts else "inconclusive")
    for cid in out:  # the verdict says when a side's training had not flattened, or its answers ran on
        moving = sorted({u.split(" (")[0] for f in findings if f.claim.id == cid for u in f.unconverged})
        if moving:
            out[cid] += f"; {', '.join(moving)} unconverged"
        running = sorted({u.split(" (")[0] for f in findings if f.claim.id == cid for u in f.runaway})
        if running:
            out[cid] += f"; {', '.join(running)} answers ran to the token limit"
    return out
