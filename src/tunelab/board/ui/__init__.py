"""Gradio UI of `tunelab board`: one module per tab, each a ``build(...)`` called inside a ``gr.Tab``."""
