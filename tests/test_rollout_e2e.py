"""Rollouts end to end: real gateway, real demo model servers (blue v1, green v2), real loopback
sockets, traffic from background client loops."""

from __future__ import annotations

from typing import Any

from gateway.rollout.controller import RolloutState
from gateway.rollout.plan import Gates, RolloutPlan
from gateway.store import InMemoryStore
from tests.helpers import (
    ModelServer,
    classifier_config,
    refusing_port,
    running_gateway,
    wait_for,
)
from tests.test_rollout_support import (
    ROLLOUT,
    ROUTE,
    Traffic,
    events,
    rollout_view,
    set_faults,
    wait_phase,
)

CHECK = 0.1


def plan(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "backend": "green", "steps": [10, 50, 100], "interval": "400ms",
        "check_interval": f"{CHECK * 1000:g}ms", "failure_threshold": 2,
        # Bounded by time in step: on a busy machine with little traffic a step still gathers
        # min_requests instead of holding on "no data" for ever.
        "window": "10s",
        "gates": {"max_error_rate": 0.05, "max_error_rate_ratio": 2, "max_p99_ms": 2000,
                  "max_p99_ratio": 50, "min_requests": 5},
    }
    body.update(overrides)
    return body


async def test_healthy_green_is_promoted_and_sticky_users_never_flap(
    blue: ModelServer, green: ModelServer
) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        async with Traffic(gw.client) as traffic:
            await traffic.more(30)
            r = await gw.admin.post(ROLLOUT, json=plan())
            assert r.status_code == 201, r.text
            started = r.json()
            assert (started["phase"], started["step"], started["weight"]) == ("progressing", 0,
                                                                             10)
            assert gw.gateway.control.state(ROUTE).canary_weight == 10
            view = await wait_phase(gw, "promoted", "rolled_back", "aborted")
            assert view["phase"] == "promoted", view["reason"]
            await traffic.more(150)  # users keep coming after the promotion
        state = gw.gateway.control.state(ROUTE)
        assert (state.live, state.previous, state.canary_weight) == ("green", "blue", 0)
        log = await events(gw)

    # Every decision is audited, with its numbers.
    actions = [(e["action"], e["actor"]) for e in log]
    assert ("rollout_start", "admin") in actions
    steps = [e for e in log if e["action"] == "rollout_step"]
    assert [e["after"]["weight"] for e in steps] == [50, 100]
    assert all("error_rate" in e["reason"] and "baked" in e["reason"] for e in steps)
    canaries = [e["after"]["canary_weight"] for e in log
                if e["action"] == "canary" and e["actor"] == "controller"]
    assert canaries == [10, 50, 100]
    promote = [e for e in log if e["action"] == "switch" and e["actor"] == "controller"]
    assert len(promote) == 1 and promote[0]["after"]["live"] == "green"
    assert [e["action"] for e in log][-1] == "rollout_promote"

    # Sticky users: each key's backends over the ramp are v1* v2* -- never back to v1.
    moved = 0
    for key, seq in traffic.seen.items():
        assert seq == sorted(seq), f"{key} flapped: {seq}"
        assert seq[-1] == "v2"
        moved += "v1" in seq
    assert moved > len(traffic.seen) // 2
    assert all(r.status == 200 for r in traffic.results)


async def test_errors_mid_ramp_roll_back_within_one_check_interval(
    blue: ModelServer, green: ModelServer
) -> None:
    """green starts returning 500s at 50%: rolled back to 0% at the threshold-reaching check;
    the failed client requests match weight x error rate x time."""
    threshold = 2
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        async with Traffic(gw.client) as traffic:
            await traffic.more(30)
            r = await gw.admin.post(ROLLOUT, json=plan(
                interval="1500ms", failure_threshold=threshold,
                gates={"max_error_rate": 0.1, "min_requests": 5}))
            assert r.status_code == 201, r.text
            await wait_for(lambda: gw.gateway.control.state(ROUTE).canary_weight == 50,
                           timeout=20, message="step 2 (50%)")
            t_fault = gw.gateway.clock()
            await set_faults(green.url, error_rate=1)
            view = await wait_phase(gw, "rolled_back", "promoted", timeout=20)
            assert view["phase"] == "rolled_back", view
            assert gw.gateway.control.state(ROUTE).canary_weight == 0
            await traffic.more(100)
        log = await events(gw)

    rollback = next(e for e in log if e["action"] == "canary" and e["actor"] == "controller"
                    and e["after"]["canary_weight"] == 0)
    decided = next(e for e in log if e["action"] == "rollout_rollback")
    first_fail = next(e for e in log if e["action"] == "rollout_check"
                      and e["after"]["analysis"]["verdict"] == "fail")
    assert "2 consecutive failed checks" in rollback["reason"]
    assert "error_rate" in rollback["reason"] and "> 0.1" in rollback["reason"]
    threshold_check = view["last_check_time"]  # the check that reached the threshold
    assert decided["after"]["failures"] == threshold
    # The weight went to 0 in the same tick as the threshold-reaching check...
    assert 0 <= rollback["time"] - threshold_check <= CHECK
    # ...which came (threshold - 1) check intervals after the first failed one.
    assert rollback["time"] - first_fail["time"] <= threshold * CHECK + CHECK

    # The next requests after the rollback all went to blue.
    after = [r for r in traffic.results if r.started > rollback["time"]]
    assert after and all(r.version == "v1" and r.status == 200 for r in after)

    # Failed requests vs. weight x error rate x time.
    t_rollback = rollback["time"]
    during = [r for r in traffic.results if t_fault <= r.started <= t_rollback]
    failed = sum(1 for r in traffic.results if r.status >= 500)
    rate = len(during) / (t_rollback - t_fault)
    expected = rate * 0.5 * 1.0 * (t_rollback - t_fault)
    print(f"\nrollback figures: fault→first failed check "
          f"{first_fail['time'] - t_fault:.3f}s, first failed check→rollback "
          f"{t_rollback - first_fail['time']:.3f}s, fault→rollback {t_rollback - t_fault:.3f}s; "
          f"traffic {rate:.0f} req/s; failed requests {failed}, expected "
          f"rate×weight×error_rate×time = {rate:.0f}×0.5×1.0×{t_rollback - t_fault:.3f} "
          f"= {expected:.1f}")
    assert 0 < failed <= 2 * expected + 10


async def test_slow_green_mid_ramp_rolls_back_on_p99(blue: ModelServer, green: ModelServer
                                                    ) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        async with Traffic(gw.client, loops=6) as traffic:
            await traffic.more(30)
            r = await gw.admin.post(ROLLOUT, json=plan(
                interval="3s", gates={"max_p99_ms": 300, "min_requests": 3}))
            assert r.status_code == 201, r.text
            await set_faults(green.url, latency_ms=600)
            view = await wait_phase(gw, "rolled_back", "promoted", timeout=20)
        assert view["phase"] == "rolled_back", view
        assert "p99_ms" in view["reason"] and "> 300" in view["reason"]
        assert gw.gateway.control.state(ROUTE).canary_weight == 0
        assert traffic.count > 0


async def test_manual_canary_change_pauses_and_manual_rollback_aborts(
    blue: ModelServer, green: ModelServer
) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        r = await gw.admin.post(ROLLOUT, json=plan(interval="30s"))
        assert r.status_code == 201, r.text
        r = await gw.admin.put(f"/admin/routes/{ROUTE}/canary", json={"weight": 20})
        assert r.status_code == 200, r.text
        view = await rollout_view(gw)
        assert view["phase"] == "paused"
        assert view["reason"] == "manual canary change by admin"
        assert gw.gateway.control.state(ROUTE).canary_weight == 20  # the operator's weight
        # Resume: the controller takes over again and re-applies the step's weight.
        r = await gw.admin.post(f"{ROLLOUT}/resume", json={})
        assert r.status_code == 200, r.text
        assert r.json()["phase"] == "progressing"
        assert gw.gateway.control.state(ROUTE).canary_weight == 10
        # A manual rollback aborts the rollout; the core does the rollback (weight 0, live
        # unchanged -- not an undo of some earlier switch).
        r = await gw.admin.post(f"/admin/routes/{ROUTE}/rollback", json={})
        assert r.status_code == 200, r.text
        view = await rollout_view(gw)
        assert view["phase"] == "aborted" and view["reason"] == "manual rollback by admin"
        state = gw.gateway.control.state(ROUTE)
        assert (state.live, state.canary_weight) == ("blue", 0)
        actions = [e["action"] for e in await events(gw)]
        assert actions.count("rollout_pause") == 1 and actions.count("rollout_abort") == 1


async def test_refused_manual_changes_leave_the_rollout_alone(
    blue: ModelServer, green: ModelServer
) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        r = await gw.admin.post(ROLLOUT, json=plan(interval="30s"))
        assert r.status_code == 201, r.text
        # A canary body the core refuses (bad weight, live backend) does not pause it.
        for body in ({"weight": 101}, {"backend": "blue", "weight": 5}):
            r = await gw.admin.put(f"/admin/routes/{ROUTE}/canary", json=body)
            assert r.status_code == 400, r.text
        assert (await rollout_view(gw))["phase"] == "progressing"
        # Pause by hand with weight 0: now nothing has traffic and nothing was switched, so
        # a rollback is refused (409) -- and must not abort the paused rollout either.
        r = await gw.admin.put(f"/admin/routes/{ROUTE}/canary", json={"weight": 0})
        assert r.status_code == 200, r.text
        assert (await rollout_view(gw))["phase"] == "paused"
        r = await gw.admin.post(f"/admin/routes/{ROUTE}/rollback", json={})
        assert r.status_code == 409, r.text
        assert (await rollout_view(gw))["phase"] == "paused"
        actions = [e["action"] for e in await events(gw)]
        assert "rollout_abort" not in actions and actions.count("rollout_pause") == 1


async def test_api_validation_conflicts_and_views(blue: ModelServer, green: ModelServer) -> None:
    cfg = classifier_config(blue.url, green.url, rollout={
        "backend": "green", "steps": [5, 100], "interval": "1m", "check_interval": "1s",
        "gates": {"max_error_rate": 0.02, "min_requests": 50}})
    async with running_gateway(cfg) as gw:
        r = await gw.admin.get(ROLLOUT)
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        route = (await gw.admin.get(f"/admin/routes/{ROUTE}")).json()
        assert route["rollout"] is None

        bad = [
            ({"steps": [50, 10]}, "steps[1]: steps must increase"),
            ({"interval": "soon"}, "interval: expected a duration"),
            ({"backend": "red"}, "backend: unknown backend 'red'"),
            ({"backend": "blue"}, "'blue' is already live"),
            ({"gates": {"max_error_rate": 7}}, "gates.max_error_rate"),
            ({"force": "yes"}, "force: must be true or false"),
            ({"nope": 1}, "unknown field 'nope'"),
        ]
        for body, message in bad:
            r = await gw.admin.post(ROLLOUT, json=body)
            assert r.status_code == 400, (body, r.text)
            assert message in r.json()["message"], (body, r.json())
        assert gw.gateway.control.state(ROUTE).canary_weight == 0
        assert await gw.admin.get(ROLLOUT) is not None
        assert [e["action"] for e in await events(gw)] == []  # nothing changed

        # {} starts the config plan; body keys override it.
        r = await gw.admin.post(ROLLOUT, json={"reason": "ship it"})
        assert r.status_code == 201, r.text
        view = r.json()
        assert (view["backend"], view["steps"], view["weight"]) == ("green", [5, 100], 5)
        assert view["plan"]["gates"] == {"max_error_rate": 0.02, "min_requests": 50}
        assert view["plan"]["interval"] == 60 and view["time_in_step"] >= 0
        r = await gw.admin.post(ROLLOUT, json={})
        assert r.status_code == 409 and "progressing" in r.json()["message"]
        route = (await gw.admin.get(f"/admin/routes/{ROUTE}")).json()
        assert route["rollout"]["phase"] == "progressing"
        assert route["rollout"]["weight"] == 5

        r = await gw.admin.post(f"{ROLLOUT}/resume", json={})
        assert r.status_code == 409
        r = await gw.admin.post(f"{ROLLOUT}/pause", json={"reason": "lunch"})
        assert r.status_code == 200 and r.json()["phase"] == "paused"
        r = await gw.admin.post(f"{ROLLOUT}/pause", json={})
        assert r.status_code == 409
        r = await gw.admin.post(f"{ROLLOUT}/abort", json={})
        assert r.status_code == 200 and r.json()["phase"] == "aborted"
        assert gw.gateway.control.state(ROUTE).canary_weight == 0
        r = await gw.admin.post(f"{ROLLOUT}/promote", json={})
        assert r.status_code == 409

        # Linear form, overriding the config's steps.
        r = await gw.admin.post(ROLLOUT, json={"step": 30, "max_weight": 90})
        assert r.status_code == 201, r.text
        assert r.json()["steps"] == [30, 60, 90]
        r = await gw.admin.post(f"{ROLLOUT}/promote", json={})
        assert r.status_code == 200 and r.json()["phase"] == "promoted"
        state = gw.gateway.control.state(ROUTE)
        assert (state.live, state.previous) == ("green", "blue")

        doc = await gw.gateway.store.read(f"rollout/{ROUTE}")
        assert doc is not None and doc[0]["phase"] == "promoted"
        paths = (await gw.admin.get("/admin/openapi.json")).json()["paths"]
        assert {f"/admin/routes/{{route}}/rollout{p}" for p in
                ("", "/pause", "/resume", "/promote", "/abort")} <= set(paths)
        metrics = (await gw.admin.get("/metrics")).text
        assert 'modelgate_rollout_phase{phase="promoted",route="classifier"} 1.0' in metrics


async def test_start_refuses_a_candidate_that_is_not_ready(blue: ModelServer) -> None:
    async with refusing_port() as dead_url, \
            running_gateway(classifier_config(blue.url, dead_url)) as gw:
        r = await gw.admin.post(ROLLOUT, json=plan())
        assert r.status_code == 409, r.text
        assert "not ready" in r.json()["message"] and "/v2/health/ready" in r.json()["message"]
        assert gw.gateway.control.state(ROUTE).canary_weight == 0
        r = await gw.admin.post(ROLLOUT, json=plan(force=True, interval="30s"))
        assert r.status_code == 201, r.text
        assert gw.gateway.control.state(ROUTE).canary_weight == 10


async def test_a_new_gateway_takes_over_a_running_rollout_from_the_store(
    blue: ModelServer, green: ModelServer
) -> None:
    """The rollout lives in the store, not in the process: a restarted gateway (or, later,
    another replica's controller) carries on where the last one stopped."""
    store = InMemoryStore()
    cfg = classifier_config(blue.url, green.url)
    async with running_gateway(cfg, store=store) as gw:
        r = await gw.admin.post(ROLLOUT, json=plan(steps=[10, 100], interval="300ms"))
        assert r.status_code == 201, r.text
    doc = await store.read(f"rollout/{ROUTE}")
    assert doc is not None and doc[0]["phase"] == "progressing"
    async with running_gateway(cfg, store=store) as gw:
        assert gw.gateway.control.state(ROUTE).canary_weight in (10, 100)
        async with Traffic(gw.client) as traffic:
            view = await wait_phase(gw, "promoted", "rolled_back")
            assert view["phase"] == "promoted", view
        assert gw.gateway.control.state(ROUTE).live == "green"
        assert traffic.count > 0


async def test_shadow_agreement_gate_reads_only_the_candidates_own_comparison(
    blue: ModelServer, green: ModelServer
) -> None:
    """A shadow of another backend says nothing about the candidate: the gate is skipped."""
    cfg = classifier_config(blue.url, green.url)
    cfg["routes"][0]["backends"]["red"] = {"url": green.url}
    async with running_gateway(cfg) as gw:
        rollouts = gw.gateway.component("rollout")
        plan = RolloutPlan(backend="green", gates=Gates(max_error_rate=0.05,
                                                        min_shadow_agreement=0.9))
        now = gw.gateway.clock()
        state = RolloutState(route=ROUTE, backend="green", baseline="blue", started=now,
                             step_started=now)
        await gw.gateway.control.set_shadow(ROUTE, "red", 100, actor="test")
        assert rollouts._shadow(state, plan, 10.0) is None
        await gw.gateway.control.set_shadow(ROUTE, "green", 100, actor="test")
        assert rollouts._shadow(state, plan, 10.0) == (0, None)  # green's own: no pairs yet
