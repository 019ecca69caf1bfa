"""Examples tab: one task of a store, every method's prediction per example, filters and a word diff."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from tunelab.board import examples
from tunelab.board.stores import find_stores, store_path, store_rows


def build(runs: Path) -> dict:
    stores = find_stores(runs)
    with gr.Row():
        store = gr.Dropdown(stores, value=stores[0] if stores else None, label="results store",
                            elem_id="examples-store", scale=3)
        task = gr.Dropdown([], label="task", elem_id="examples-task", scale=2)
        seed = gr.Dropdown([], label="seed shown (a method without it shows its lowest)", elem_id="examples-seed",
                           scale=1)
        refresh = gr.Button("refresh list", scale=1)
    methods = gr.CheckboxGroup([], label="methods shown", elem_id="examples-methods")
    with gr.Row():
        mode = gr.Radio(list(examples.FILTERS), value="all", label="filter", elem_id="examples-filter", scale=3)
        a = gr.Dropdown([], label="A", elem_id="examples-a", scale=2)
        b = gr.Dropdown([], label="B", elem_id="examples-b", scale=2)
        by_diff = gr.Checkbox(label="sort by |score A − score B|", elem_id="examples-sort", scale=1)
    count = gr.Markdown(elem_id="examples-count")
    table = gr.Dataframe(wrap=True, elem_id="examples-table", max_height=520)
    with gr.Row():
        example = gr.Dropdown([], label="example for the word diff (A → B)", elem_id="examples-id")
    diff = gr.HighlightedText(label="words only in A (−) and only in B (+)", combine_adjacent=True,
                              color_map={"-": "red", "+": "green"}, elem_id="examples-diff")

    def pick_store(name: str | None):
        if not name:
            return gr.update(choices=[], value=None)
        tasks = examples.tasks_of(store_rows(store_path(runs, name)))
        return gr.update(choices=tasks, value=tasks[0] if tasks else None)

    def pick_task(name: str | None, task_name: str | None):
        if not name or not task_name:
            return gr.update(choices=[], value=None), gr.update(choices=[], value=[]), gr.update(), gr.update()
        rows = store_rows(store_path(runs, name))
        seeds = examples.seeds_of(rows, task_name)
        data = examples.load_task_examples(rows, task_name, seeds[0] if seeds else None)
        ms = data.methods
        return (gr.update(choices=seeds, value=seeds[0] if seeds else None), gr.update(choices=ms, value=ms),
                gr.update(choices=ms, value=ms[0] if ms else None),
                gr.update(choices=ms, value=ms[1] if len(ms) > 1 else None))

    def show(name, task_name, seed_value, shown, filter_mode, a_name, b_name, sort):
        if not name or not task_name or not shown:
            return "", pd.DataFrame(), gr.update(choices=[], value=None)
        data = examples.load_task_examples(store_rows(store_path(runs, name)), task_name, seed_value)
        shown = [m for m in data.methods if m in shown]
        ids = examples.select(data, shown, filter_mode, a_name, b_name, sort)
        seeds = ", ".join(f"{m}: seed {data.seeds[m]}" for m in shown)
        text = (f"**{len(ids)}** of {len(data.order)} examples · per-example score: "
                f"`{data.metric or 'none'}` · {seeds}")
        frame = examples.example_frame(data, ids, shown)
        # id narrow; reference, each prediction and the demonstration share the width; similarity narrow
        wide = f"{84 // (len(frame.columns) - 2)}%" if len(frame.columns) > 2 else "40%"
        widths = ["8%"] + [wide] * (len(frame.columns) - 2) + ["8%"] if len(frame.columns) > 2 else None
        return (text, gr.update(value=frame, column_widths=widths),
                gr.update(choices=ids, value=ids[0] if ids else None))

    def show_diff(name, task_name, seed_value, a_name, b_name, example_id):
        if not (name and task_name and a_name and b_name and example_id):
            return []
        data = examples.load_task_examples(store_rows(store_path(runs, name)), task_name, seed_value)
        per = data.rows.get(example_id, {})
        if a_name not in per or b_name not in per:
            return []
        return examples.spaced(examples.word_diff(per[a_name]["prediction"], per[b_name]["prediction"]))

    view = [store, task, seed, methods, mode, a, b, by_diff]
    diff_inputs = [store, task, seed, a, b, example]
    # .input fires on the user's own changes only; programmatic updates are chained explicitly (.then)
    def chain(event):
        event.then(pick_task, [store, task], [seed, methods, a, b]).then(show, view, [count, table, example]).then(
            show_diff, diff_inputs, [diff])

    chain(store.input(pick_store, [store], [task]))
    task.input(pick_task, [store, task], [seed, methods, a, b]).then(show, view, [count, table, example]).then(
        show_diff, diff_inputs, [diff])
    for control in (seed, methods, mode, a, b, by_diff):
        control.input(show, view, [count, table, example]).then(show_diff, diff_inputs, [diff])
    example.input(show_diff, diff_inputs, [diff])
    def listed(current: str | None):
        """The stores on disk now (a page load sees stores written since the board started)."""
        found = find_stores(runs)
        return gr.update(choices=found, value=current if current in found else next(iter(found), None))

    refresh.click(listed, [store], [store]).then(pick_store, [store], [task])

    def on_load(demo: gr.Blocks) -> None:
        chain(demo.load(listed, [store], [store]).then(pick_store, [store], [task]))

    return {"on_load": on_load, "store": store}
