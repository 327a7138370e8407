"""The operator commands' HTTP client for the admin API, and shared output helpers.

The admin URL comes from ``--admin`` or ``MODELGATE_ADMIN_URL`` (default
http://127.0.0.1:8001); the token from ``--token``, ``MODELGATE_ADMIN_TOKEN``, or the file a
gateway writes when it generated its own (see gateway/admin/auth.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from rich.console import Console

from gateway.admin.auth import TOKEN_ENV, read_token_file, token_file

DEFAULT_ADMIN_URL = "http://127.0.0.1:8001"


class CliError(Exception):
    """One line for the operator, then exit non-zero."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """--admin, --token, --json: every operator command takes these."""
    parser.add_argument("--admin", default=os.environ.get("MODELGATE_ADMIN_URL",
                                                          DEFAULT_ADMIN_URL),
                        help="admin API URL (env MODELGATE_ADMIN_URL; default %(default)s)")
    parser.add_argument("--token", default=None,
                        help=f"admin token (env {TOKEN_ENV}, else the gateway's token file)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


class AdminClient:
    def __init__(self, base_url: str, token: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.base_url, timeout=timeout,
            headers={"Authorization": f"Bearer {token}"},
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AdminClient:
        token = args.token or os.environ.get(TOKEN_ENV)
        if not token:
            port = urlsplit(args.admin).port or 80
            token = read_token_file(port)
            if not token:
                raise CliError(
                    f"no admin token: pass --token, set {TOKEN_ENV}, or run on the gateway's "
                    f"host (looked in {token_file(port)})"
                )
        return cls(args.admin, token)

    def request(self, method: str, path: str, body: Any = None,
                params: dict[str, Any] | None = None) -> Any:
        try:
            resp = self._client.request(
                method, path, params=params,
                content=orjson.dumps(body) if body is not None else None,
                headers={"Content-Type": "application/json"} if body is not None else None,
            )
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach the admin API at {self.base_url}: {exc}") from None
        try:
            data = orjson.loads(resp.content) if resp.content else None
        except orjson.JSONDecodeError:
            data = None
        if resp.status_code >= 400:
            if isinstance(data, dict) and "message" in data:
                raise CliError(f"{data['message']} (HTTP {resp.status_code})")
            raise CliError(f"HTTP {resp.status_code} from {method} {path}")
        return data

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items()
                                                 if v is not None} or None)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def download(self, path: str, dest: Path) -> int:
        """Stream a file the admin API serves into `dest`; the bytes written."""
        written = 0
        try:
            with self._client.stream("GET", path) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    try:
                        message = orjson.loads(resp.content).get("message")
                    except (orjson.JSONDecodeError, AttributeError):
                        message = None
                    raise CliError(f"{message or 'download failed'} (HTTP {resp.status_code})")
                with dest.open("wb") as fh:
                    for chunk in resp.iter_bytes():
                        fh.write(chunk)
                        written += len(chunk)
        except httpx.HTTPError as exc:
            raise CliError(f"cannot download from {self.base_url}: {exc}") from None
        except OSError as exc:
            raise CliError(f"cannot write {dest}: {exc}") from None
        return written

    def close(self) -> None:
        self._client.close()


NONE = "-"  # a table cell with no value


def console() -> Console:
    """Rich output; wide when piped so tables are not squeezed into 80 columns."""
    tty = sys.stdout.isatty()
    return Console(file=sys.stdout, width=None if tty else 200, highlight=False,
                   soft_wrap=not tty)


def print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
