"""`tunelab board` is a registered command whose serving errors are one line."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from tunelab.cli import app

pytest.importorskip("gradio", reason="tunelab board needs gradio: pip install 'tunelab[board]'")


def test_board_is_a_command_with_runs_host_and_port():
    result = CliRunner().invoke(app, ["board", "--help"])
    assert result.exit_code == 0
    assert all(flag in result.output for flag in ("--runs", "--host", "--port"))


def test_a_taken_port_is_a_one_line_error(tmp_path):
    from tunelab.errors import TunelabError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["board", "--runs", str(tmp_path), "--port", str(port)])
    assert isinstance(result.exception, TunelabError)
    assert f"cannot serve on 127.0.0.1:{port}" in str(result.exception) and "--port" in str(result.exception)
