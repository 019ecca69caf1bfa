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


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "board.example.org"])
def test_a_non_loopback_host_without_a_login_is_a_one_line_refusal(tmp_path, host, monkeypatch):
    from tunelab.errors import TunelabError

    monkeypatch.delenv("TUNELAB_BOARD_AUTH", raising=False)
    result = CliRunner().invoke(app, ["board", "--runs", str(tmp_path), "--host", host])
    assert isinstance(result.exception, TunelabError)
    message = str(result.exception)
    assert "\n" not in message and f"--host {host}" in message and "--auth" in message and "--no-auth" in message


def _taken_port(host: str = "0.0.0.0") -> socket.socket:
    taken = socket.socket()
    taken.bind((host, 0))
    taken.listen()
    return taken


@pytest.mark.parametrize("how", ["flag", "file", "env", "no-auth"])
def test_a_login_or_no_auth_lets_a_non_loopback_host_through(tmp_path, monkeypatch, how):
    """Past the exposure check the board tries to serve (here on a taken port, so it stops right there)."""
    from tunelab.errors import TunelabError

    monkeypatch.delenv("TUNELAB_BOARD_AUTH", raising=False)
    (tmp_path / "login").write_text("# board login\nann:s3:cret\n")
    extra = {"flag": ["--auth", "ann:pw"], "file": ["--auth-file", str(tmp_path / "login")], "env": [],
             "no-auth": ["--no-auth"]}[how]
    if how == "env":
        monkeypatch.setenv("TUNELAB_BOARD_AUTH", "ann:pw")
    with _taken_port() as taken:
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["board", "--runs", str(tmp_path), "--host", "0.0.0.0", "--port", str(port),
                                          *extra])
    assert isinstance(result.exception, TunelabError)
    assert f"cannot serve on 0.0.0.0:{port}" in str(result.exception)


def test_bad_logins_are_one_line_errors(tmp_path, monkeypatch):
    from tunelab.board.access import credentials, parse_credentials
    from tunelab.errors import TunelabError

    monkeypatch.delenv("TUNELAB_BOARD_AUTH", raising=False)
    assert credentials(None, None) is None
    assert parse_credentials("ann:a:b", "--auth") == [("ann", "a:b")]
    (tmp_path / "empty").write_text("# nothing\n")
    for auth, auth_file in [("ann", None), (":pw", None), ("ann:", None), (None, tmp_path / "empty"),
                            (None, tmp_path / "missing")]:
        with pytest.raises(TunelabError) as info:
            credentials(auth, auth_file)
        assert "\n" not in str(info.value)
    result = CliRunner().invoke(app, ["board", "--runs", str(tmp_path), "--auth", "ann:pw", "--no-auth"])
    assert isinstance(result.exception, TunelabError) and "contradicts" in str(result.exception)
