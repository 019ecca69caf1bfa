"""`tunelab board`: the browser UI (results, examples, launch and watch, playground)."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from tunelab.errors import TunelabError


def board_command(
    runs: Annotated[str, typer.Option(help="runs folder: stores are found, and jobs write, under it")] = "runs",
    host: Annotated[str, typer.Option(help="address to bind; keep 127.0.0.1 unless behind a proxy")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 7860,
) -> None:
    """Browse stores and predictions, launch and watch runs and grids, and try adapters, in the browser."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from tunelab.board.app import serve
    except ImportError as exc:
        raise TunelabError(f"tunelab board needs gradio ({exc.name} is missing): pip install 'tunelab[board]'") from None
    typer.echo(f"tunelab board on http://{host}:{port} (runs folder: {runs})")
    try:
        serve(runs, host, port)
    except OSError as exc:  # port taken, address not on this machine
        raise TunelabError(f"cannot serve on {host}:{port}: {str(exc).split('. ')[0]}; choose another --port "
                           "or --host") from None
