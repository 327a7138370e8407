"""The in-process upstream: features tested without spawning model servers (the behaviour
under test is the comparison and the gates, not the socket), and the mock itself."""

from __future__ import annotations

import orjson

from gateway.errors import UpstreamConnectError
from gateway.upstream.mock import Handler, MockRequest, MockResponse, mock_factory
from tests.helpers import classifier_config, running_gateway, wait_for

BLUE, GREEN = "http://blue.test:9001", "http://green.test:9002"
PREDICT = "/v1/models/m:predict"


def scores(offset: float) -> Handler:
    def answer(request: MockRequest) -> MockResponse:
        rows = orjson.loads(request.body)["instances"]
        body = orjson.dumps({"predictions": [[x + offset for x in row] for row in rows]})
        return MockResponse(200, [(b"Content-Type", b"application/json")], body)

    return answer


async def test_shadow_comparison_over_in_process_backends() -> None:
    config = classifier_config(BLUE, GREEN, match={"path_prefix": "/v1/models"},
                               shadow={"backend": "green", "compare": {
                                   "preset": "tf_serving",
                                   "numbers": {"abs_tol": 1e-3, "rel_tol": 0}}})
    factory = mock_factory({BLUE: scores(0.0), GREEN: scores(0.002)})
    async with running_gateway(config, upstream_kind=factory) as gw:
        for _ in range(4):
            r = await gw.client.post(PREDICT, json={"instances": [[1.0, 2.0]]})
            assert r.status_code == 200
            assert r.json() == {"predictions": [[1.0, 2.0]]}  # live's answer, never green's

        async def compared() -> dict[str, object] | None:
            rep = (await gw.admin.get("/admin/routes/classifier/shadow")).json()
            total: dict[str, object] = rep["total"]
            return total if total["compared"] == 4 else None

        total = await wait_for(compared, timeout=10, message="4 comparisons")
    assert total["agree"] == 0 and total["disagree"] == 4  # 0.002 > abs_tol everywhere


async def test_a_backend_that_refuses_is_a_502_and_counted() -> None:
    def down(request: MockRequest) -> MockResponse:
        raise UpstreamConnectError("connection refused (mock)")

    config = classifier_config(BLUE, GREEN, match={"path_prefix": "/v1/models"})
    async with running_gateway(config, upstream_kind=mock_factory({BLUE: down, GREEN: down})
                               ) as gw:
        r = await gw.client.post(PREDICT, json={"instances": [[1.0]]})
        assert r.status_code == 502
        assert gw.gateway.recorder.stats("classifier", "blue").totals().errors == 1


async def test_the_mock_sees_what_the_backend_would() -> None:
    seen: list[MockRequest] = []

    def echo(request: MockRequest) -> MockResponse:
        seen.append(request)
        return MockResponse(200, chunks=[b"a", b"b", b"c"])

    config = classifier_config(BLUE, GREEN, match={"path_prefix": "/v1/models"})
    async with running_gateway(config, upstream_kind=mock_factory({BLUE: echo, GREEN: echo})
                               ) as gw:
        r = await gw.client.post(PREDICT + "?x=1", content=b"hello",
                                 headers={"x-user-id": "u1"})
    assert r.status_code == 200 and r.content == b"abc"
    assert r.headers["transfer-encoding"] == "chunked"
    (request,) = seen
    assert (request.method, request.target, request.body) == ("POST", PREDICT + "?x=1",
                                                              b"hello")
    assert request.header(b"X-User-Id") == b"u1"
