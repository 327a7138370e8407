from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.helpers import ModelServer, model_server
from tests.redis_server import RedisServer


@pytest.fixture
async def blue() -> AsyncIterator[ModelServer]:
    async with model_server("v1") as server:
        yield server


@pytest.fixture
async def green() -> AsyncIterator[ModelServer]:
    async with model_server("v2") as server:
        yield server


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server on a free port for this test (stopped after it)."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
