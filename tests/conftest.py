from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.helpers import ModelServer, model_server


@pytest.fixture
async def blue() -> AsyncIterator[ModelServer]:
    async with model_server("v1") as server:
        yield server


@pytest.fixture
async def green() -> AsyncIterator[ModelServer]:
    async with model_server("v2") as server:
        yield server
