"""Bearer tokens for the admin API. The token's name is the actor in audit events, its role
(``viewer``: read only; ``operator``: may change things) goes with it."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from gateway.errors import Unauthorized
from gateway.state import OPERATOR

TOKEN_ENV = "MODELGATE_ADMIN_TOKEN"
STATE_DIR_ENV = "MODELGATE_STATE_DIR"


def state_dir() -> Path:
    configured = os.environ.get(STATE_DIR_ENV)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "modelgate"


def token_file(admin_port: int) -> Path:
    """Where a gateway without a configured token writes the one it generated."""
    return state_dir() / f"admin-token-{admin_port}"


def generate_token_file(admin_port: int) -> tuple[str, Path]:
    """Make a fresh token and write it to a 0600 file the CLI knows to look in."""
    token = secrets.token_urlsafe(32)
    return token, write_token_file(admin_port, token)


def write_token_file(admin_port: int, token: str) -> Path:
    """Write `token` to the CLI's 0600 file for `admin_port` (a supervisor writes one token
    for every worker's port)."""
    path = token_file(admin_port)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # A fresh file that only we can read from its first byte, then renamed into place: an
    # existing file or symlink at `path` (planted by someone else) is replaced, never written.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_token_file(admin_port: int) -> str | None:
    try:
        return token_file(admin_port).read_text().strip() or None
    except OSError:
        return None


READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def may(role: str, method: str) -> bool:
    """Whether a token of `role` may make a `method` request (viewers only read)."""
    return role == OPERATOR or method.upper() in READ_METHODS


def actor_for(header: str | None, tokens: dict[str, str]) -> str:
    """The token's name for a valid ``Authorization: Bearer …`` header, else `Unauthorized`."""
    if not header or header[:7].lower() != "bearer ":  # the scheme is case-insensitive
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    given = header[7:].strip().encode("utf-8", "surrogateescape")  # any bytes: 401, not 500
    found = None
    for name, secret in tokens.items():
        # compare against every token so the time taken does not reveal which one is close
        if hmac.compare_digest(given, secret.encode()):
            found = name
    if found is None:
        raise Unauthorized("invalid token")
    return found
