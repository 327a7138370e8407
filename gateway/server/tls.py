"""TLS for the proxy port: one context, built when the server starts."""

from __future__ import annotations

import ssl

from gateway.config import ServerConfig


def tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The server's TLS context, built once at start (None: plain HTTP)."""
    if config.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context
