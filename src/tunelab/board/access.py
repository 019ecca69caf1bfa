"""Who may reach the board: a login (Gradio's ``auth=``) and the rule for binding beyond loopback.

Credentials are ``USER:PASSWORD`` entries (split at the first ``:``, so a password may hold one), from
``--auth`` (visible to other users in the process list), ``--auth-file FILE`` (one entry per line,
``#`` comments) or ``$TUNELAB_BOARD_AUTH`` (read by the command as ``--auth``, entries one per line). A board
bound to anything but loopback without a login is refused unless ``--no-auth`` says that something in
front of it (a proxy with its own login) guards it: its Launch tab starts processes.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from tunelab.errors import TunelabError

ENV = "TUNELAB_BOARD_AUTH"
LOGIN_OPTIONS = f"--auth USER:PASSWORD, --auth-file FILE or ${ENV}"


def parse_credentials(text: str, where: str) -> list[tuple[str, str]]:
    """``USER:PASSWORD`` lines as (user, password) pairs; blank lines and ``#`` comments skipped.

    >>> parse_credentials("ann:s3:cret\\n# a comment\\nbob:pw", "--auth")
    [('ann', 's3:cret'), ('bob', 'pw')]
    """
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise TunelabError(f"{where} (entry {n}): expected USER:PASSWORD with both parts non-empty")
        pairs.append((user.strip(), password))
    return pairs


def credentials(auth: str | None, auth_file: str | Path | None) -> list[tuple[str, str]] | None:
    """The login pairs of ``--auth`` (or ``$TUNELAB_BOARD_AUTH``) and ``--auth-file``; None when none is given."""
    pairs = parse_credentials(auth, f"--auth (or ${ENV})") if auth else []
    if auth_file:
        try:
            text = Path(auth_file).read_text()
        except OSError as exc:
            raise TunelabError(f"--auth-file {auth_file}: cannot read it ({exc.strerror})") from None
        found = parse_credentials(text, f"--auth-file {auth_file}")
        if not found:
            raise TunelabError(f"--auth-file {auth_file}: no USER:PASSWORD line in it")
        pairs += found
    return pairs or None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (127.0.0.0/8, ::1, localhost).

    >>> [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "10.0.0.5", "example.org")]
    [True, True, True, False, False, False]
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any address
        return False


def check_exposure(host: str, login: list[tuple[str, str]] | None, no_auth: bool) -> None:
    """Refuse a non-loopback ``host`` without a login unless ``no_auth``; refuse a login with ``no_auth``."""
    if login and no_auth:
        raise TunelabError(f"--no-auth contradicts the login given ({LOGIN_OPTIONS}); drop one of them")
    if login is None and not no_auth and not is_loopback(host):
        raise TunelabError(f"--host {host} lets other machines reach the board, whose Launch tab starts processes: "
                           f"give a login ({LOGIN_OPTIONS}), or pass --no-auth if a proxy with its own login "
                           "guards it")
