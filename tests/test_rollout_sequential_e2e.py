"""Sequential verdicts end to end: a real gateway, the real demo model servers (blue v1,
green v2), loopback sockets, client traffic; the rollout decided by the sequential test, shown
by `modelgate rollout status` and in the audit events."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from typing import Any

from gateway.admin.routes.rollout import VIEW
from gateway.cli import main
from tests.helpers import TOKEN, ModelServer, classifier_config, running_gateway, wait_for
from tests.redis_server import RedisServer
from tests.test_rollout_support import (
    ROLLOUT,
    ROUTE,
    Traffic,
    events,
    rollout_view,
    set_faults,
    wait_phase,
)

ALPHA = 0.05


def plan(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "backend": "green", "steps": [20, 50, 100],
        # A bake time the test never reaches: only the sequential verdict can move a step.
        "interval": "10m", "check_interval": "100ms", "failure_threshold": 3,
        "gates": {"max_error_rate": 1, "min_requests": 5},  # no ceiling: the test decides
        "analysis": {"mode": "sequential", "alpha": ALPHA, "margin": 0.2, "min_samples": 25},
    }
    body.update(overrides)
    return body


async def status(gw_admin_url: str, *extra: str) -> str:
    """`modelgate rollout status classifier` as a user's shell runs it (in a thread)."""
    out = io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out):
            return main(["rollout", "status", ROUTE, "--admin", gw_admin_url,
                         "--token", TOKEN, *extra])

    assert await asyncio.to_thread(run) == 0
    return out.getvalue()


async def test_candidate_with_errors_is_rolled_back_by_the_sequential_test(
    blue: ModelServer, green: ModelServer
) -> None:
    await set_faults(green.url, error_rate=0.3)
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        async with Traffic(gw.client) as traffic:
            await traffic.more(20)
            r = await gw.admin.post(ROLLOUT, json=plan())
            assert r.status_code == 201, r.text
            view = await wait_phase(gw, "rolled_back", "promoted", "aborted", timeout=30)
        assert view["phase"] == "rolled_back", view["reason"]
        VIEW.validate_python(view)  # the OpenAPI document's response model holds it
        assert gw.gateway.control.state(ROUTE).canary_weight == 0
        assert "significantly worse" in view["reason"]
        seq = view["last_check"]["sequential"]
        errors = next(m for m in seq["metrics"] if m["metric"] == "errors")
        assert seq["verdict"] == "worse" and errors["verdict"] == "worse"
        assert errors["p_worse"] <= ALPHA and errors["e_worse"] >= 1 / ALPHA
        assert errors["candidate"]["requests"] >= 25 and errors["candidate"]["hits"] > 0
        assert errors["live"]["hits"] == 0 and errors["live"]["requests"] > 0

        # The audit event of the decision carries the verdict, p-values and samples.
        log = await events(gw)
        decided = next(e for e in log if e["action"] == "rollout_rollback")
        assert decided["after"]["analysis"]["sequential"] == seq
        assert "p_worse" in decided["reason"]
        assert traffic.count > 0

        # ... and so does `modelgate rollout status`, for humans and as JSON.
        text = await status(gw.admin_url)
        assert "sequential test: worse" in text
        assert f"{errors['candidate']['hits']} err / {errors['candidate']['requests']}" in text
        assert "p worse" in text and "rolled_back" in text
        assert "assume independent requests" in " ".join(text.split())
        shown = json.loads(await status(gw.admin_url, "--json"))
        assert shown["last_check"]["sequential"] == seq


async def test_healthy_candidate_advances_early_on_not_worse(
    blue: ModelServer, green: ModelServer
) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        # A bad analysis section: a 400 naming the key, and no rollout.
        r = await gw.admin.post(ROLLOUT, json=plan(analysis={"mode": "sequential",
                                                             "alpha": 2}))
        assert r.status_code == 400, r.text
        assert "analysis.alpha" in r.json()["message"]
        assert (await gw.admin.get(ROLLOUT)).status_code == 404
        async with Traffic(gw.client) as traffic:
            await traffic.more(20)
            r = await gw.admin.post(ROLLOUT, json=plan())
            assert r.status_code == 201, r.text
            view = await wait_phase(gw, "promoted", "rolled_back", "aborted", timeout=30)
            await traffic.more(20)
        assert view["phase"] == "promoted", view["reason"]
        state = gw.gateway.control.state(ROUTE)
        assert (state.live, state.previous) == ("green", "blue")
        # Promoted long before one 10-minute bake: the evidence moved every step.
        assert view["finished"] - view["started"] < 60
        log = await events(gw)
    steps = [e for e in log if e["action"] in ("rollout_step", "rollout_promote")]
    assert [e["after"]["weight"] for e in steps] == [50, 100, 100]
    for e in steps:
        assert "sequential verdict not worse" in e["reason"], e["reason"]
        seq = e["after"]["analysis"]["sequential"]
        errors = seq["metrics"][0]
        assert seq["verdict"] == "not_worse" and errors["p_not_worse"] <= ALPHA
        assert seq["step_requests"] >= 25
    # The test runs over the whole rollout: its samples only grow from step to step.
    seen = [e["after"]["analysis"]["sequential"]["metrics"][0]["candidate"]["requests"]
            for e in steps]
    assert seen == sorted(seen)
    assert all(r.status == 200 for r in traffic.results)


async def test_slow_candidate_is_rolled_back_on_the_latency_metric(
    blue: ModelServer, green: ModelServer
) -> None:
    await set_faults(green.url, latency_ms=250)
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        async with Traffic(gw.client, loops=6) as traffic:
            await traffic.more(20)
            r = await gw.admin.post(ROLLOUT, json=plan(analysis={
                "mode": "sequential", "alpha": ALPHA, "margin": 0.2, "min_samples": 25,
                "latency_ms": 150}))
            assert r.status_code == 201, r.text
            view = await wait_phase(gw, "rolled_back", "promoted", "aborted", timeout=30)
        assert view["phase"] == "rolled_back", view["reason"]
        assert traffic.count > 0
    seq = view["last_check"]["sequential"]
    by = {m["metric"]: m for m in seq["metrics"]}
    assert by["latency"]["verdict"] == "worse" and by["errors"]["verdict"] != "worse"
    # Two metrics: each "worse" side at α/2, so the pair's false rollbacks stay ≤ α.
    assert by["latency"]["alpha_worse"] == ALPHA / 2
    assert by["latency"]["p_worse"] <= ALPHA / 2
    cand, live = by["latency"]["candidate"], by["latency"]["live"]
    # (live may have a slow request on a busy machine; green's are all slow)
    assert cand["hits"] == cand["requests"] > 0 and live["hits"] < live["requests"] / 10
    assert "sequential latency worse" in view["reason"]


async def test_the_controller_tests_the_clusters_traffic(
    blue: ModelServer, green: ModelServer, redis_server: RedisServer,
) -> None:
    """Two gateways on one Redis; all traffic goes through the one that does not decide: the
    sequential test reads the cluster's numbers, so the controller still rolls back."""
    config = classifier_config(blue.url, green.url, store=redis_server.url)
    await set_faults(green.url, error_rate=0.3)
    async with running_gateway(config) as a, running_gateway(config) as b:
        leader, follower = (a, b) if a.gateway.lease.held else (b, a)
        assert not follower.gateway.lease.held
        r = await follower.admin.post(ROLLOUT, json=plan())
        assert r.status_code == 201, r.text
        async with Traffic(follower.client, loops=3):
            view = await wait_phase(leader, "rolled_back", "promoted", "aborted", timeout=30)
        assert view["phase"] == "rolled_back", view["reason"]
        assert leader.gateway.recorder.stats(ROUTE, "green").totals().requests == 0
        errors = view["last_check"]["sequential"]["metrics"][0]
        assert errors["verdict"] == "worse" and errors["candidate"]["hits"] > 0


async def test_a_new_lease_holder_continues_the_same_test(
    blue: ModelServer, green: ModelServer, redis_server: RedisServer,
) -> None:
    """The controller hands its lease over mid-step: the other process goes on from the
    evidence in the rollout document (the samples never drop back) and finishes the rollout."""
    config = classifier_config(blue.url, green.url, store=redis_server.url)
    async with running_gateway(config) as a, running_gateway(config) as b:
        leader, follower = (a, b) if a.gateway.lease.held else (b, a)
        r = await follower.admin.post(ROLLOUT, json=plan(steps=[50, 100], analysis={
            "mode": "sequential", "alpha": ALPHA, "margin": 0.2, "min_samples": 150}))
        assert r.status_code == 201, r.text
        seen: list[int] = []

        async def samples() -> int:
            view = (await follower.admin.get(ROLLOUT)).json()
            seq = (view.get("last_check") or {}).get("sequential")
            if seq and view["phase"] == "progressing":
                seen.append(seq["metrics"][0]["candidate"]["requests"])
            return seen[-1] if seen else 0

        async with Traffic(follower.client, loops=3):
            await wait_for(lambda: _at_least(samples, 40), timeout=20,
                           message="evidence gathered by the first controller")
            assert (await rollout_view(follower))["step"] == 0
            before = seen[-1]
            await leader.gateway.lease.stop()  # hand over, as on a graceful shutdown
            await wait_for(lambda: follower.gateway.lease.held, timeout=15,
                           message="the other process to take the lease")
            await wait_for(lambda: _at_least(samples, before + 20), timeout=20,
                           message="checks by the new controller")
            view = await wait_phase(follower, "promoted", "rolled_back", "aborted",
                                    timeout=30)
        assert view["phase"] == "promoted", view["reason"]
        assert seen == sorted(seen), seen  # never restarted from zero
        promote = [e for e in await events(follower) if e["action"] == "rollout_promote"]
        final = promote[0]["after"]["analysis"]["sequential"]["metrics"][0]
        assert final["candidate"]["requests"] >= before + 150


async def _at_least(read: Any, n: int) -> bool:
    return bool(await read() >= n)
