"""Webhook notifications: delivery, retries, bounded queue, and a hanging receiver that never
delays the rollout controller."""

from __future__ import annotations

import time
from functools import partial

from gateway.app import default_components
from gateway.notify import Notifier, event_kind
from gateway.rollout.component import Rollouts
from gateway.state import Event
from tests.helpers import ModelServer, classifier_config, running_gateway, wait_for
from tests.test_rollout_support import ROLLOUT, Receiver, Traffic, set_faults, wait_phase


def event(n: int, action: str = "rollout_step") -> Event:
    return Event(id=n, time=time.time(), route="classifier", actor="controller", action=action,
                 before=None, after={"weight": 50}, reason=f"reason {n}")


def test_event_kind() -> None:
    assert event_kind("rollout_rollback") == "rollout"
    assert event_kind("alarm_firing") == "alarm"
    assert event_kind("canary") == "routing"
    assert event_kind("shadow_off") == "routing"


async def test_delivers_every_event_as_json_with_its_kind() -> None:
    async with Receiver() as hook:
        notifier = Notifier([hook.url], timeout=2, retries=0)
        await notifier.start()
        try:
            notifier.offer(event(1, "rollout_start"))
            notifier.offer(event(2, "alarm_firing"))
            await wait_for(lambda: notifier.counts()[hook.url].sent == 2, message="2 webhooks")
        finally:
            await notifier.stop()
    first, second = hook.received
    assert (first["action"], first["kind"], first["reason"]) == ("rollout_start", "rollout",
                                                                 "reason 1")
    assert first["source"] == "modelgate" and first["timestamp"].endswith("Z")
    assert (second["kind"], second["after"]) == ("alarm", {"weight": 50})
    assert notifier.counts()[hook.url].sent == 2


async def test_retries_with_backoff_then_gives_up() -> None:
    async with Receiver(fail_first=2) as flaky, Receiver(fail_first=100) as broken:
        notifier = Notifier([flaky.url, broken.url], timeout=2, retries=2, backoff=0.01)
        await notifier.start()
        try:
            notifier.offer(event(1))
            await wait_for(lambda: len(flaky.received) == 1 and broken.attempts == 3
                           and notifier.counts()[broken.url].failed == 1,
                           message="delivery after retries, and giving up")
        finally:
            await notifier.stop()
    counts = notifier.counts()
    assert (counts[flaky.url].sent, counts[flaky.url].retries, flaky.attempts) == (1, 2, 3)
    assert (counts[broken.url].sent, counts[broken.url].failed) == (0, 1)


async def test_full_queue_drops_and_counts_and_stop_does_not_wait_for_a_hang() -> None:
    async with Receiver(hang=True) as hung:
        notifier = Notifier([hung.url], timeout=60, retries=3, queue_size=2)
        await notifier.start()
        try:
            notifier.offer(event(1))
            await wait_for(lambda: hung.attempts == 1, message="the first post in flight")
            for n in range(2, 7):
                notifier.offer(event(n))  # returns at once: 2 fit, 3 are dropped
            assert notifier.counts()[hung.url].dropped == 3
        finally:
            await notifier.stop()  # cancels the hanging post instead of waiting 60 s
        assert notifier.counts()[hung.url].dropped == 5  # + the 2 still queued
        notifier.offer(event(9))  # after stop: ignored, no error


async def test_rollout_webhooks_and_a_hanging_receiver_never_delays_the_controller(
    blue: ModelServer, green: ModelServer
) -> None:
    async with Receiver() as hook, Receiver(hang=True) as hung:
        cfg = classifier_config(blue.url, green.url, webhooks=[hung.url, hook.url])
        factories = [*(f for f in default_components() if f is not Rollouts),
                     partial(Rollouts, notify_timeout=60)]
        async with running_gateway(cfg, components=factories) as gw:
            async with Traffic(gw.client) as traffic:
                await traffic.more(20)
                body = {"backend": "green", "steps": [20, 100], "interval": "200ms",
                        "check_interval": "100ms", "window": "10s",
                        "gates": {"max_error_rate": 0.1,
                                                             "min_requests": 5}}
                r = await gw.admin.post(ROLLOUT, json=body)
                assert r.status_code == 201, r.text
                await wait_phase(gw, "promoted")
                # Back to blue, then break blue mid-ramp: rolled back.
                r = await gw.admin.post(ROLLOUT, json={**body, "backend": "blue",
                                                       "interval": "30s"})
                assert r.status_code == 201, r.text
                await traffic.more(10)
                await set_faults(blue.url, error_rate=1)
                await wait_phase(gw, "rolled_back")
            # The whole promotion and rollback happened while the first receiver hung on the
            # very first event with a 60 s timeout.
            assert hung.attempts == 1 and not hung.release.is_set()
            await wait_for(lambda: "rollout_rollback" in hook.actions(),
                           message="rollback webhook")
            rollout = [e for e in hook.received if e["kind"] == "rollout"]
            actions = [e["action"] for e in rollout]
            assert actions[0] == "rollout_start"
            assert {"rollout_step", "rollout_promote", "rollout_rollback"} <= set(actions)
            rollback = next(e for e in rollout if e["action"] == "rollout_rollback")
            assert "consecutive failed checks" in rollback["reason"]
            assert rollback["after"]["analysis"]["verdict"] == "fail"
            assert any(e["kind"] == "routing" and e["action"] == "switch"
                       for e in hook.received)
            metrics = (await gw.admin.get("/metrics")).text
            assert "modelgate_webhook_events_total" in metrics


def test_webhook_urls_are_redacted_wherever_they_are_shown() -> None:
    """Webhook URLs often carry a secret (Slack's path, a login): /metrics is open and logs
    are shipped, so both show scheme and host only."""
    from gateway.notify import redacted

    url = "https://user:pass@hooks.example.com:8443/services/T0/B0/s3cr3t?token=abc"
    assert redacted(url, 2) == "https://hooks.example.com:8443/…#2"
    notifier = Notifier([url])
    text = "".join(str(sample) for family in notifier.collect() for sample in family.samples)
    assert "s3cr3t" not in text and "pass" not in text and "token" not in text
    assert "hooks.example.com" in text
