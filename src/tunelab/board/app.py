"""`tunelab board`: the Gradio app over a runs folder, served on loopback (or behind a login) with no
network access; what it may read, write and run is ``board.confine``'s, who may reach it ``board.access``'s."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry calls

import gradio as gr  # noqa: E402

from tunelab.board.playground import Playground  # noqa: E402
from tunelab.board.ui import examples, launch, playground, results  # noqa: E402

# table headers wrap between words, never inside one: Gradio's wrapped cells use `word-break: break-word`,
# which lets a header column shrink below its longest word and split it ("trainab|le_params")
CSS = ("#examples-table td{vertical-align:top}"
       " .header-cell span{word-break:normal!important;overflow-wrap:normal!important;hyphens:manual}")


def theme() -> gr.themes.Base:
    """Gradio's default look with system fonts: the stock theme fetches Google Fonts, which offline cannot."""
    return gr.themes.Default(font=[gr.themes.Font("system-ui"), gr.themes.Font("sans-serif")],
                             font_mono=[gr.themes.Font("ui-monospace"), gr.themes.Font("monospace")])


def build_app(runs: str | Path, allow_remote_code: bool = False) -> gr.Blocks:
    """The four tabs over ``runs`` (created if missing); ``allow_remote_code``: launches may set
    ``model.trust_remote_code`` / ``model.allow_pickle``."""
    root = Path(runs).resolve()
    root.mkdir(parents=True, exist_ok=True)
    engine = Playground(root)
    with gr.Blocks(title="tunelab board", analytics_enabled=False) as demo:
        gr.Markdown(f"## tunelab board · runs folder `{root}`")
        loaders = []
        with gr.Tab("Results", id="results", elem_id="tab-results"):
            loaders.append(results.build(root)["on_load"])
        with gr.Tab("Examples", id="examples", elem_id="tab-examples"):
            loaders.append(examples.build(root)["on_load"])
        with gr.Tab("Launch", id="launch", elem_id="tab-launch"):
            loaders.append(launch.build(root, allow_remote_code)["on_load"])
        with gr.Tab("Playground", id="playground", elem_id="tab-playground"):
            loaders.append(playground.build(root, engine)["on_load"])
        for on_load in loaders:
            on_load(demo)
    return demo


def serve(runs: str | Path, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
          auth: list[tuple[str, str]] | None = None, allow_remote_code: bool = False) -> gr.Blocks:
    """Build and launch the board (``block=False``: return once it answers, for tests and notebooks);
    ``auth``: the (user, password) pairs of Gradio's login page (``board.access``), None for no login."""
    demo = build_app(runs, allow_remote_code)
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block,
                auth=auth or None, auth_message="tunelab board: log in with the --auth credentials",
                quiet=not block, ssr_mode=False, theme=theme(), css=CSS, footer_links=[], pwa=False,
                mcp_server=False, enable_monitoring=False)
    return demo
