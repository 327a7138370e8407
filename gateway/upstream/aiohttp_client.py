"""The simple `Upstream`: aiohttp's client with a keep-alive pool per origin."""

from __future__ import annotations

import io
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import aiohttp
from aiohttp import hdrs, payload
from aiohttp.typedefs import LooseHeaders
from multidict import CIMultiDict
from yarl import URL

from gateway.config import Timeouts
from gateway.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamPoolTimeout,
    UpstreamResetError,
    UpstreamTimeout,
)
from gateway.upstream.base import Body, Headers, InterimReceiver

POOL_LIMIT = 512
LARGE_BODY = 1024 * 1024
_SKIP_PAYLOAD_HEADERS: CIMultiDict[None] = CIMultiDict([(hdrs.CONTENT_TYPE, None)])


class _ForwardRequest(aiohttp.ClientRequest):
    """Send the caller's headers as given. aiohttp would add Accept, Accept-Encoding (the
    client would then get compressed bodies it never asked for), User-Agent and a default
    Content-Type; overriding the hook is cheaper than `skip_auto_headers`, which copies the
    headers per request. Framing headers are always aiohttp's, matching the body it sends."""

    def update_headers(self, headers: LooseHeaders | None) -> None:
        super().update_headers(headers)
        self.headers.popall(hdrs.CONTENT_LENGTH, None)
        self.headers.popall(hdrs.TRANSFER_ENCODING, None)

    def update_auto_headers(self, skip_auto_headers: object) -> None:
        self._skip_auto_headers = _SKIP_PAYLOAD_HEADERS


class _SizedStream(payload.AsyncIterablePayload):
    """A streamed body of known length: aiohttp then sends Content-Length, not chunked."""

    def __init__(self, value: AsyncIterable[bytes], length: int) -> None:
        super().__init__(value)
        self._size = length


def _text(value: bytes) -> str:
    # aiohttp writes header text as UTF-8: surrogates keep the client's exact bytes (invalid
    # UTF-8 cannot be written and surfaces as ValueError, a 400).
    return value.decode("utf-8", "surrogateescape")


class AiohttpResponse:
    __slots__ = ("_resp", "status", "reason", "headers", "content_length")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.reason = resp.reason or ""
        self.headers = list(resp.raw_headers)
        self.content_length = resp.content_length

    async def read(self) -> bytes:
        try:
            body = await self._resp.read()
        except TimeoutError as exc:
            self._resp.close()
            raise UpstreamTimeout("read timeout while reading the body") from exc
        except aiohttp.ClientError as exc:
            self._resp.close()
            raise UpstreamResetError(f"body read failed: {exc}") from exc
        self._resp.release()
        return body

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except TimeoutError as exc:
            self._resp.close()
            raise UpstreamTimeout("read timeout while streaming") from exc
        except aiohttp.ClientError as exc:
            self._resp.close()
            raise UpstreamResetError(f"stream failed: {exc}") from exc
        self._resp.release()

    def close(self) -> None:
        self._resp.close()


class AiohttpUpstream:
    def __init__(self, origin: str) -> None:
        self.origin = origin
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[Timeouts, aiohttp.ClientTimeout] = {}

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=POOL_LIMIT, ttl_dns_cache=300, enable_cleanup_closed=False
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=(),
                request_class=_ForwardRequest,
            )
        return self._session

    async def send(
        self, method: str, target: str, headers: Headers, body: Body, timeouts: Timeouts,
        length: int | None = None, interim: InterimReceiver | None = None,
    ) -> AiohttpResponse:
        # `interim` is never called: aiohttp's client parser skips 1xx heads without a word
        # (a documented limit: the aiohttp upstream does not forward 103 Early Hints).
        timeout = self._timeouts.get(timeouts)
        if timeout is None:
            # `connect` bounds the wait for a pooled connection too (unbounded otherwise).
            timeout = aiohttp.ClientTimeout(
                total=None, connect=timeouts.connect, sock_connect=timeouts.connect,
                sock_read=timeouts.read,
            )
            self._timeouts[timeouts] = timeout
        data: Any = body
        if isinstance(body, bytes):
            # aiohttp warns (ResourceWarning) on in-memory bodies over 1 MiB: a file-like
            # object sends the same bytes without the copy it worries about.
            if len(body) > LARGE_BODY:
                data = io.BytesIO(body)
        elif body is not None and length is not None:
            data = _SizedStream(body, length)
        session = self._get_session()
        connector = session.connector
        # Every pooled connection busy as we start: a connect timeout is then the pool wait.
        full = connector is not None and 0 < connector.limit <= len(connector._acquired)
        try:
            resp = await session.request(
                method,
                URL(self.origin + target, encoded=True),
                headers=[(_text(k), _text(v)) for k, v in headers],
                data=data,
                timeout=timeout,
                allow_redirects=False,
                compress=None,
            )
        except TimeoutError as exc:
            if full and isinstance(exc, aiohttp.ConnectionTimeoutError):
                raise UpstreamPoolTimeout(f"{self.origin}: no connection free within "
                                          f"{timeouts.connect}s") from exc
            raise UpstreamTimeout(f"{self.origin}: timed out") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamConnectError(f"{self.origin}: {exc.strerror or exc}") from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                aiohttp.ClientPayloadError) as exc:
            raise UpstreamResetError(f"{self.origin}: {exc}") from exc
        except aiohttp.ClientResponseError as exc:
            raise UpstreamResetError(f"{self.origin}: bad response: {exc.message}") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"{self.origin}: {exc}") from exc
        return AiohttpResponse(resp)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
