"""Results tab: pick a store; quality table with every seed, claims with verdicts and intervals, plots."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from tunelab.board import results
from tunelab.board.stores import claim_settings, find_stores, store_path, store_rows
from tunelab.compare.plots import COSTS

ALL = "(all tasks)"


def build(runs: Path) -> dict:
    """Build the tab; returns ``on_load`` (wires the first fill to the page load) and the store picker."""
    stores = find_stores(runs)
    with gr.Row():
        store = gr.Dropdown(stores, value=stores[0] if stores else None, label="results store (under the runs folder)",
                            elem_id="results-store", scale=4)
        refresh = gr.Button("refresh list", scale=1)
    summary = gr.Markdown(elem_id="results-summary")
    quality = gr.Dataframe(label="quality per method and task (mean ± std, every seed)", elem_id="results-quality",
                           wrap=True)
    claims = gr.Dataframe(label="claims: one verdict each", elem_id="results-claims", wrap=True)
    with gr.Accordion("claims: every group measured (effect A − B, 95% bootstrap interval)", open=False):
        detail = gr.Dataframe(elem_id="results-claims-detail", wrap=True)
    with gr.Row():
        task = gr.Dropdown([ALL], value=ALL, label="task shown in the plots", elem_id="results-task")
        cost = gr.Radio([(label, key) for key, label in COSTS.items()], value="trainable_params", label="cost axis")
    with gr.Row():
        pareto = gr.ScatterPlot(x="cost", y="quality", color="method", title="quality vs cost", x_title="cost",
                                elem_id="results-pareto", tooltip=["task", "method", "cost", "quality", "seeds"])
        similarity = gr.BarPlot(x="quintile", y="ipt_minus_pt", color="task", title="IPT − PT by demonstration "
                                "similarity quintile (low → high)", elem_id="results-similarity")
    with gr.Row():
        length = gr.LinePlot(x="prompt_length", y="quality", color="method", title="quality vs prompt length",
                             elem_id="results-length")
        size = gr.LinePlot(x="train_size", y="quality", color="method", title="quality vs training-set size",
                           elem_id="results-size")
    failed = gr.Dataframe(label="failed cells", visible=False)

    def load(name: str | None, chosen_task: str, cost_key: str):
        if not name:
            empty = pd.DataFrame()
            return ("no results store under the runs folder yet: run `tunelab compare` or use the Launch tab",
                    empty, empty, empty, gr.update(choices=[ALL], value=ALL), empty, empty, empty, empty,
                    gr.update(visible=False))
        rows = store_rows(store_path(runs, name))
        tasks = sorted({r["task"] for r in rows})
        chosen_task = chosen_task if chosen_task in tasks else ALL
        shown = rows if chosen_task == ALL else [r for r in rows if r["task"] == chosen_task]
        summary_text, detail_frame = results.claims_frames(rows, **claim_settings(store_path(runs, name)))
        fails = results.failed_frame(rows)
        return (results.summary_line(rows), results.quality_frame(rows), summary_text, detail_frame,
                gr.update(choices=[ALL, *tasks], value=chosen_task),
                gr.update(value=results.cost_points(shown, cost_key), x_title=COSTS[cost_key]),
                results.similarity_points(shown), results.sweep_points(shown, "prompt_length"),
                results.sweep_points(shown, "train_size"), gr.update(value=fails, visible=len(fails) > 0))

    outputs = [summary, quality, claims, detail, task, pareto, similarity, length, size, failed]
    store.input(load, [store, task, cost], outputs)
    task.input(load, [store, task, cost], outputs)
    cost.change(load, [store, task, cost], outputs)
    def refreshed(current: str | None):
        found = find_stores(runs)
        return gr.update(choices=found, value=current if current in found else next(iter(found), None))

    refresh.click(refreshed, [store], [store]).then(load, [store, task, cost], outputs)
    return {"on_load": lambda demo: demo.load(refreshed, [store], [store]).then(load, [store, task, cost], outputs),
            "store": store}
