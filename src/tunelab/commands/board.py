"""`tunelab board`: the browser UI (results, examples, launch and watch, playground)."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from tunelab.errors import TunelabError


def board_command(
    runs: Annotated[str, typer.Option(help="runs folder: stores are found, and jobs write, under it")] = "runs",
    host: Annotated[str, typer.Option(help="address to bind; anything but loopback needs a login or --no-auth")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 7860,
    auth: Annotated[str | None, typer.Option(
        envvar="TUNELAB_BOARD_AUTH", show_default=False,
        help="login as USER:PASSWORD (one per line for several); prefer the env var or --auth-file, since "
             "flags show in the process list")] = None,
    auth_file: Annotated[str | None, typer.Option(help="file of USER:PASSWORD lines for the login")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="serve a non-loopback --host without a login "
                                          "(only behind a proxy with its own login)")] = False,
    allow_remote_code: Annotated[bool, typer.Option(
        "--allow-remote-code", help="let launches set model.trust_remote_code / model.allow_pickle, which run "
                                    "code from a model directory")] = False,
) -> None:
    """Browse stores and predictions, launch and watch runs and grids, and try adapters, in the browser."""
    from tunelab.board.access import check_exposure, credentials

    login = credentials(auth, auth_file)
    check_exposure(host, login, no_auth)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from tunelab.board.app import serve
    except ImportError as exc:
        raise TunelabError(f"tunelab board needs gradio ({exc.name} is missing): pip install 'tunelab[board]'") from None
    typer.echo(f"tunelab board on http://{host}:{port} (runs folder: {runs}"
               f"{'; login required' if login else ''}{'; remote code allowed' if allow_remote_code else ''})")
    try:
        serve(runs, host, port, auth=login, allow_remote_code=allow_remote_code)
    except OSError as exc:  # port taken, address not on this machine
        raise TunelabError(f"cannot serve on {host}:{port}: {str(exc).split('. ')[0]}; choose another --port "
                           "or --host") from None
