"""Playground tab: one prompt to several adapters and the base model, side by side, as the server answers."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from tunelab.board import playground
from tunelab.errors import TunelabError


def build(runs: Path, engine: playground.Playground) -> dict:
    folders = playground.adapter_dirs(runs)
    with gr.Row():
        folder = gr.Dropdown(folders, value=folders[0] if folders else None, allow_custom_value=True,
                             label="adapters folder (one subfolder per run, e.g. a grid's cells/)",
                             elem_id="play-folder", scale=3)
        model = gr.Textbox(label="base model", elem_id="play-model", scale=2)
        refresh = gr.Button("refresh", scale=1)
    chosen = gr.CheckboxGroup([], label="send to", elem_id="play-adapters")
    instruction = gr.Textbox(label="instruction (optional)", elem_id="play-instruction")
    text = gr.Textbox(label="input", lines=3, elem_id="play-input")
    with gr.Row():
        max_tokens = gr.Slider(1, 256, value=32, step=1, label="max new tokens (greedy)")
        send = gr.Button("send", variant="primary", elem_id="play-send")
    message = gr.Markdown(elem_id="play-message")
    answers = gr.Dataframe(headers=["adapter", "method", "completion"], wrap=True, elem_id="play-answers")

    def pick(name: str | None):
        if not name:
            return gr.update(choices=[], value=[]), gr.update()
        try:
            path = playground.folder_of(runs, name)
        except TunelabError as exc:
            raise gr.Error(str(exc)) from None
        options = [(playground.BASE, playground.BASE)] + [(c.label, c.name) for c in playground.candidates(path)]
        return gr.update(choices=options, value=[]), playground.base_model_of(path) or "smollm2-135m"

    def answer(name, model_name, names, instruction_text, input_text, budget):
        try:
            folder_path = playground.folder_of(runs, name or "")
            rows = engine.complete(folder_path, model_name, list(names or []), input_text, instruction_text, budget)
        except TunelabError as exc:
            return f"**error**: {exc}", pd.DataFrame(columns=["adapter", "method", "completion"])
        return f"{len(rows)} answers", pd.DataFrame(rows, columns=["adapter", "method", "completion"])

    def listed(current: str | None):
        found = playground.adapter_dirs(runs)
        return gr.update(choices=found, value=current if current in found else next(iter(found), None))

    folder.input(pick, [folder], [chosen, model], api_name="adapters")
    refresh.click(listed, [folder], [folder]).then(pick, [folder], [chosen, model])
    send.click(answer, [folder, model, chosen, instruction, text, max_tokens], [message, answers], api_name="send")
    return {"on_load": lambda demo: demo.load(listed, [folder], [folder]).then(pick, [folder], [chosen, model])}
