"""The pure parts of progressive delivery, tick by tick: gates (`judge`), windows (`Meter`)
and the controller's step function (`advance`)."""

from __future__ import annotations

import bisect

from gateway.metrics import FINE_BOUNDS, BackendStats, WindowSummary
from gateway.rollout.analysis import FAIL, NO_DATA, PASS, SKIPPED, Analysis, Meter, judge
from gateway.rollout.controller import (
    BAKE,
    PAUSED,
    PROGRESSING,
    PROMOTED,
    ROLLED_BACK,
    RolloutState,
    advance,
)
from gateway.rollout.plan import Gates, RolloutPlan


def window(requests: int, errors: int = 0, latency: float = 0.01,
           counters: dict[str, float] | None = None) -> WindowSummary:
    w = WindowSummary(seconds=1.0, requests=requests, errors=errors,
                      counters=dict(counters or {}))
    w.hist[bisect.bisect_left(FINE_BOUNDS, latency)] = requests
    return w


def gate(analysis: Analysis, name: str) -> tuple[str, float | None]:
    found = [g for g in analysis.gates if g.name == name]
    assert found, f"no gate {name} in {analysis.gates}"
    return found[0].verdict, found[0].value


# -- gates -------------------------------------------------------------------------------------
def test_too_few_requests_is_no_data_not_pass_or_fail() -> None:
    a = judge(Gates(max_error_rate=0.01, min_requests=10), window(9, errors=9), window(100), 1)
    assert a.verdict == NO_DATA
    assert gate(a, "min_requests") == (NO_DATA, 9)
    assert gate(a, "error_rate")[0] == NO_DATA


def test_error_rate_absolute() -> None:
    gates = Gates(max_error_rate=0.05, min_requests=10)
    assert judge(gates, window(100, 5), window(100), 1).verdict == PASS
    failed = judge(gates, window(100, 6), window(100), 1)
    assert failed.verdict == FAIL
    assert gate(failed, "error_rate") == (FAIL, 0.06)
    assert "error_rate 0.06 > 0.05" in failed.summary()


def test_error_rate_ratio_with_errors_on_live() -> None:
    gates = Gates(max_error_rate_ratio=2, min_requests=10)
    a = judge(gates, window(100, 4), window(1000, 20), 1)  # 4% vs 2%
    assert gate(a, "error_rate_ratio") == (PASS, 2.0)
    a = judge(gates, window(100, 5), window(1000, 20), 1)  # 5% vs 2%
    assert gate(a, "error_rate_ratio") == (FAIL, 2.5)


def test_error_rate_ratio_when_live_has_no_errors() -> None:
    """Live at 0 errors: judged against one error in live's window, not a division by 0."""
    gates = Gates(max_error_rate_ratio=2, min_requests=10)
    clean = judge(gates, window(100, 0), window(100, 0), 1)
    assert gate(clean, "error_rate_ratio") == (PASS, 0.0)
    one = judge(gates, window(100, 1), window(100, 0), 1)  # 1% vs floor 1%
    assert gate(one, "error_rate_ratio") == (PASS, 1.0)
    many = judge(gates, window(100, 3), window(100, 0), 1)  # 3% vs floor 1%
    assert gate(many, "error_rate_ratio") == (FAIL, 3.0)


def test_one_error_of_a_small_canary_does_not_fail_the_ratio() -> None:
    """At 10 % the candidate sees 1/9 of live's traffic: live's floor must not be 9x lower
    than anything the candidate can show, or its first 5xx fails the gate."""
    gates = Gates(max_error_rate_ratio=2, min_requests=100)
    one = judge(gates, window(139, 1), window(1361, 0), 30)
    assert gate(one, "error_rate_ratio") == (PASS, 1.0)
    assert gate(judge(gates, window(139, 3), window(1361, 0), 30), "error_rate_ratio")[0] == FAIL
    # Live's own errors still raise the bar when it has them.
    assert gate(judge(gates, window(139, 3), window(1361, 30), 30), "error_rate_ratio")[0] \
        == PASS


def test_ratio_gates_skipped_without_live_traffic() -> None:
    """At 100% the live backend gets nothing: ratios do not apply, absolute gates still do."""
    gates = Gates(max_error_rate=0.1, max_error_rate_ratio=2, max_p99_ratio=1.5,
                  min_requests=10)
    a = judge(gates, window(100), window(0), 1)
    assert gate(a, "error_rate_ratio")[0] == SKIPPED
    assert gate(a, "p99_ratio")[0] == SKIPPED
    assert a.verdict == PASS


def test_p99_absolute_and_ratio() -> None:
    gates = Gates(max_p99_ms=100, max_p99_ratio=1.5, min_requests=10)
    ok = judge(gates, window(100, latency=0.02), window(100, latency=0.02), 1)
    assert ok.verdict == PASS
    assert gate(ok, "p99_ratio") == (PASS, 1.0)
    slow = judge(gates, window(100, latency=0.2), window(100, latency=0.02), 1)
    assert slow.verdict == FAIL
    assert gate(slow, "p99_ms")[0] == FAIL
    verdict, ratio = gate(slow, "p99_ratio")
    assert verdict == FAIL and ratio is not None and 8 < ratio < 12


def test_null_rate_from_probe_counters() -> None:
    gates = Gates(max_null_rate=0.1, min_requests=10)
    probed = {"output_total": 100.0, "output_null": 20.0}
    assert gate(judge(gates, window(100, counters=probed), window(100), 1),
                "null_rate") == (FAIL, 0.2)
    fine = {"output_total": 100.0, "output_null": 5.0}
    assert judge(gates, window(100, counters=fine), window(100), 1).verdict == PASS
    # No probe configured: the gate does not apply (and says so).
    a = judge(gates, window(100), window(100), 1)
    assert gate(a, "null_rate")[0] == SKIPPED and a.verdict == PASS
    # Probed, but too few outputs yet: no data.
    few = {"output_total": 3.0, "output_null": 3.0}
    assert judge(gates, window(100, counters=few), window(100), 1).verdict == NO_DATA


def test_shadow_agreement_and_alarms() -> None:
    gates = Gates(min_shadow_agreement=0.9, no_firing_alarms=True, min_requests=10)
    a = judge(gates, window(100), window(100), 1, shadow=None, alarms=None)
    assert gate(a, "shadow_agreement")[0] == SKIPPED
    assert gate(a, "firing_alarms")[0] == SKIPPED
    assert a.verdict == PASS
    a = judge(gates, window(100), window(100), 1, shadow=(50, 0.95), alarms=[])
    assert a.verdict == PASS
    a = judge(gates, window(100), window(100), 1, shadow=(50, 0.8), alarms=[])
    assert gate(a, "shadow_agreement") == (FAIL, 0.8)
    a = judge(gates, window(100), window(100), 1, shadow=(5, 0.1), alarms=[])
    assert a.verdict == NO_DATA
    a = judge(gates, window(100), window(100), 1, shadow=(50, 0.99), alarms=["p99_high"])
    assert gate(a, "firing_alarms") == (FAIL, 1.0) and a.verdict == FAIL


def test_meter_windows_are_exact_and_bounded_by_step_start() -> None:
    now = [100.0]
    stats = {"green": BackendStats("r", "green", lambda: now[0]),
             "blue": BackendStats("r", "blue", lambda: now[0])}
    meter = Meter(stats, window=10.0)
    meter.mark(100.0, force=True)
    for _ in range(5):
        stats["green"].observe(500, 0.01)
    meter.mark(100.5, force=True)  # a step starts here
    for _ in range(3):
        stats["green"].observe(200, 0.01)
    stats["blue"].observe(200, 0.01)
    seconds, windows = meter.windows(101.0, not_before=100.5, backends=("green", "blue"))
    assert seconds == 0.5
    assert (windows["green"].requests, windows["green"].errors) == (3, 0)
    assert windows["blue"].requests == 1
    seconds, windows = meter.windows(101.2, not_before=100.0, backends=("green",))
    assert (windows["green"].requests, windows["green"].errors) == (8, 5)
    assert abs(seconds - 1.2) < 1e-9


def test_meter_window_covers_at_least_its_length_when_the_step_allows() -> None:
    now = [0.0]
    stats = {"green": BackendStats("r", "green", lambda: now[0])}
    meter = Meter(stats, window=1.0)
    for t in (0.0, 0.5, 1.0, 1.5):
        now[0] = t
        meter.mark(t)
        stats["green"].observe(200, 0.01)
    seconds, windows = meter.windows(1.7, not_before=0.0, backends=("green",))
    assert abs(seconds - 1.2) < 1e-9  # from the 0.5 s snapshot: not shorter than 1 s
    assert windows["green"].requests == 3
    seconds, _ = meter.windows(1.7, not_before=1.0, backends=("green",))
    assert abs(seconds - 0.7) < 1e-9  # but never before the step began


# -- the controller, tick by tick ----------------------------------------------------------------
PLAN = RolloutPlan(backend="green", steps=(10, 50, 100), interval=3.0, check_interval=1.0,
                   failure_threshold=2, gates=Gates(max_error_rate=0.05, min_requests=10))


def start(at: float = 0.0) -> RolloutState:
    return RolloutState(route="r", backend="green", baseline="blue", started=at,
                        step_started=at)


def analysis(verdict: str) -> Analysis:
    if verdict == PASS:
        return judge(PLAN.gates, window(100), window(100), 1)
    if verdict == FAIL:
        return judge(PLAN.gates, window(100, 50), window(100), 1)
    return judge(PLAN.gates, window(3), window(100), 1)


def test_holds_while_baking_then_advances() -> None:
    s = start()
    d = advance(s, analysis(PASS), 1.0, PLAN)
    assert d.action == "hold" and "baking" in d.reason
    d = advance(d.state, analysis(PASS), 2.0, PLAN)
    assert d.action == "hold"
    d = advance(d.state, analysis(PASS), 3.0, PLAN)
    assert d.action == "advance"
    assert d.state.step == 1 and d.state.step_started == 3.0
    assert d.state.weight(PLAN) == 50
    assert "step 2/3 → 50%" in d.reason and "error_rate 0 <= 0.05" in d.reason


def test_no_data_holds_forever_and_is_neither_pass_nor_fail() -> None:
    s = start()
    d = advance(s, analysis(FAIL), 1.0, PLAN)
    assert d.state.failures == 1
    for t in range(2, 10):
        d = advance(d.state, analysis(NO_DATA), float(t), PLAN)
        assert d.action == "hold" and "no data" in d.reason
        assert d.state.failures == 1  # not reset (no pass) and not increased (no fail)
        assert d.state.step == 0
    # Bake time has long elapsed, but only a passing check moves on.
    d = advance(d.state, analysis(PASS), 10.0, PLAN)
    assert d.action == "advance"


def test_rollback_after_threshold_consecutive_failures() -> None:
    s = start()
    d = advance(s, analysis(FAIL), 1.0, PLAN)
    assert d.action == "hold" and d.state.failures == 1 and "check failed (1/2)" in d.reason
    d = advance(d.state, analysis(FAIL), 2.0, PLAN)
    assert d.action == "rollback"
    assert d.state.phase == ROLLED_BACK and d.state.finished == 2.0
    assert d.state.weight(PLAN) == 0
    assert "2 consecutive failed checks" in d.reason and "error_rate 0.5 > 0.05" in d.reason
    assert d.state.reason == d.reason


def test_a_pass_resets_the_failure_count() -> None:
    s = start()
    d = advance(s, analysis(FAIL), 1.0, PLAN)
    d = advance(d.state, analysis(PASS), 2.0, PLAN)
    assert d.state.failures == 0
    d = advance(d.state, analysis(FAIL), 2.5, PLAN)
    assert d.action == "hold" and d.state.failures == 1


def test_failed_check_blocks_advance_even_after_bake() -> None:
    d = advance(start(), analysis(FAIL), 5.0, PLAN)
    assert d.action == "hold" and d.state.step == 0


def test_promote_at_the_last_step() -> None:
    s = start().evolve(step=2, step_started=10.0)
    d = advance(s, analysis(PASS), 12.0, PLAN)
    assert d.action == "hold"
    d = advance(d.state, analysis(PASS), 13.0, PLAN)
    assert d.action == "promote"
    assert d.state.phase == PROMOTED and d.state.weight(PLAN) == 100
    assert "promoted after step 3/3" in d.reason


def test_whole_ramp_tick_by_tick() -> None:
    s, actions = start(), []
    for t in range(1, 20):
        d = advance(s, analysis(PASS), float(t), PLAN)
        actions.append(d.action)
        s = d.state
        if s.phase != PROGRESSING:
            break
    assert actions == ["hold", "hold", "advance", "hold", "hold", "advance", "hold", "hold",
                       "promote"]


def test_paused_and_finished_rollouts_do_nothing() -> None:
    paused = start().evolve(phase=PAUSED, paused_at=1.0)
    d = advance(paused, analysis(FAIL), 5.0, PLAN)
    assert d.action == "hold" and d.state is paused
    # Resumed (the component restarts the step's bake), it goes on from the same step.
    resumed = paused.evolve(phase=PROGRESSING, paused_at=None, step_started=5.0)
    assert advance(resumed, analysis(PASS), 6.0, PLAN).action == "hold"
    assert advance(resumed, analysis(PASS), 8.0, PLAN).action == "advance"
    done = start().evolve(phase=PROMOTED)
    assert advance(done, analysis(FAIL), 5.0, PLAN).action == "hold"


def test_verdict_changes_are_flagged_for_the_audit_log() -> None:
    d = advance(start(), analysis(NO_DATA), 1.0, PLAN)
    assert d.verdict_changed
    d = advance(d.state, analysis(NO_DATA), 2.0, PLAN)
    assert not d.verdict_changed
    d = advance(d.state, analysis(PASS), 2.5, PLAN)
    assert d.verdict_changed


def test_bake_ends_on_time_even_without_traffic_but_not_on_a_failure() -> None:
    bake_plan = RolloutPlan(backend="green", steps=(100,), interval=2.0, check_interval=1.0,
                            failure_threshold=2, gates=PLAN.gates)
    s = RolloutState(route="r", backend="green", baseline="blue", started=0, step_started=0,
                     kind=BAKE)
    d = advance(s, analysis(NO_DATA), 1.0, bake_plan)
    assert d.action == "hold"
    d = advance(d.state, analysis(NO_DATA), 2.0, bake_plan)
    assert d.action == "promote" and "too little traffic" in d.reason
    d = advance(s, analysis(FAIL), 2.0, bake_plan)
    assert d.action == "hold"
    d = advance(d.state, analysis(FAIL), 3.0, bake_plan)
    assert d.action == "rollback"
