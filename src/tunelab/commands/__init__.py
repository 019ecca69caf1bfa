"""One module per command group; ``console()`` is what every command prints through."""

from __future__ import annotations

import sys

from rich.console import Console

PIPED_WIDTH = 10_000  # wide enough that no table cell is cut: `tunelab ls methods | grep lora` finds its row


def console() -> Console:
    """A rich console for the command's output. On a terminal rich fits tables to its width; into a pipe or
    a file (where rich would assume 80 columns and cut cells to `instruction_tun…`) every line is whole."""
    if sys.stdout.isatty():
        return Console()
    return Console(width=PIPED_WIDTH)
