"""Sequential verdicts, the pure parts: the statistics against known values and exact
identities, the evidence carried between checks, the controller's sequential rules, the
config, and the simulation that proves the false-alarm bound (fixed seeds)."""

from __future__ import annotations

import math
import time

import pytest

from gateway.errors import ConfigError
from gateway.metrics import BackendStats, WindowSummary
from gateway.rollout.analysis import (
    FAIL,
    NO_DATA,
    PASS,
    Meter,
    judge,
    sequential_check,
    slow_requests,
)
from gateway.rollout.controller import PROGRESSING, PROMOTED, ROLLED_BACK, RolloutState, advance
from gateway.rollout.plan import AnalysisConfig, Gates, RolloutPlan, parse_plan
from gateway.rollout.sequential import (
    ERRORS,
    LATENCY,
    NOT_WORSE,
    PENDING,
    RHOS,
    WORSE,
    Counts,
    Evidence,
    MetricEvidence,
    decide,
    msprt_e,
    not_worse_e,
    restricted_variance,
    share_log_lr,
)
from gateway.rollout.simulation import (
    FIXED_ARMS,
    Scenario,
    simulate_clustered,
    simulate_fixed,
    simulate_sequential,
    simulate_shipped,
)
from gateway.rules import RULED_ERRORS, RULED_REQUESTS

ALPHA = 0.05


# -- the statistics ----------------------------------------------------------------------------
def test_msprt_closed_form_matches_known_value_and_numeric_mixture() -> None:
    # θ̂ = 0.02, V = 1e-4, τ = 0.01: V + τ² = 2e-4, so
    # Λ = 2·sqrt(1/2)·exp(1)·Φ(√2) = 2 · 0.7071068 · 2.7182818 · 0.9213504 = 3.5419...
    assert msprt_e(0.02, 1e-4, 0.01) == pytest.approx(
        2 * math.sqrt(0.5) * math.e * 0.9213503964748574, rel=1e-9)
    # ... which is the half-normal mixture of normal likelihood ratios, integrated numerically.
    for est, var, tau in ((0.02, 1e-4, 0.01), (-0.01, 4e-4, 0.02), (0.003, 1e-6, 0.01)):
        steps = 20000
        top = 12 * tau
        total = 0.0
        for i in range(steps):
            theta = (i + 0.5) * top / steps
            density = 2 * math.exp(-theta * theta / (2 * tau * tau)) / (tau * math.sqrt(
                2 * math.pi))
            total += density * math.exp((theta * est - theta * theta / 2) / var) * top / steps
        assert msprt_e(est, var, tau) == pytest.approx(total, rel=1e-4)
    assert msprt_e(0.02, 0.0, 0.01) == 0.0  # no variance: no evidence, never a crash


def test_share_likelihood_ratio_known_value_and_exact_martingale() -> None:
    # 2 errors, both on a candidate with 10 % of requests, ρ = 2: π = 0.2/1.1, LR = (π/w)².
    pi = 0.2 / 1.1
    assert share_log_lr(Counts(10, 2), Counts(90, 0), 2.0) == pytest.approx(
        2 * math.log(pi / 0.1))
    assert share_log_lr(Counts(10, 0), Counts(90, 0), 2.0) == 0.0  # no failure: no evidence
    assert share_log_lr(Counts(100, 3), Counts(0, 0), 2.0) == 0.0  # live idle (100 %)
    # Under H0 (equal rates), given k failures, the candidate's count is Binomial(k, w): the
    # expected likelihood ratio is exactly 1 for every ρ, whatever the base rate.
    for k in (1, 3, 12):
        for n1, n0 in ((10, 90), (50, 50), (3, 997)):
            w = n1 / (n1 + n0)
            for rho in RHOS:
                expected = sum(
                    math.comb(k, x) * w ** x * (1 - w) ** (k - x)
                    * math.exp(share_log_lr(Counts(n1, x), Counts(n0, k - x), rho))
                    for x in range(k + 1))
                assert expected == pytest.approx(1.0, rel=1e-9)


def test_restricted_variance_is_pooled_at_zero_and_floored_by_the_margin() -> None:
    cand, live = Counts(100, 3), Counts(900, 17)
    pooled = 0.02 * 0.98 * (1 / 100 + 1 / 900)
    assert restricted_variance(cand, live, 0.0) == pytest.approx(pooled)
    # No errors at all: under "worse by 0.01" the candidate's rate is 0.01, not 0.
    assert restricted_variance(Counts(100, 0), Counts(900, 0), 0.01) == pytest.approx(
        0.01 * 0.99 / 100)


def test_not_worse_needs_enough_clean_traffic() -> None:
    # Zero errors on both sides, margin 0.01: 100 candidate requests are no proof (a 1 %
    # candidate shows none 37 % of the time); 3000 are.
    assert not_worse_e(Counts(100, 0), Counts(900, 0), 0.01) < 1 / ALPHA
    assert not_worse_e(Counts(3000, 0), Counts(27000, 0), 0.01) > 1 / ALPHA
    # A candidate clearly worse than live + margin never looks "not worse".
    assert not_worse_e(Counts(3000, 150), Counts(27000, 270), 0.01) < 1.0


def test_decide_guards_small_samples_and_splits_alpha_over_metrics() -> None:
    strong = MetricEvidence(Counts(50, 20), Counts(450, 0), (0.0,) * len(RHOS), 1e6, 0.0)
    # Overwhelming evidence, but fewer than min_samples candidate requests: pending.
    assert decide(Evidence({ERRORS: strong}), ALPHA, 100).verdict == PENDING
    assert decide(Evidence({ERRORS: strong}), ALPHA, 50).verdict == WORSE
    # e = 30 crosses 1/α = 20 alone, but not 1/(α/2) = 40 when latency is tested too.
    e30 = strong._replace(max_worse=30.0)
    assert decide(Evidence({ERRORS: e30}), ALPHA, 50).verdict == WORSE
    both = decide(Evidence({ERRORS: e30, LATENCY: e30}), ALPHA, 50)
    assert both.verdict == PENDING
    assert {m.alpha_worse for m in both.metrics} == {ALPHA / 2}
    # "Not worse" needs every metric, and min_samples in the current step.
    nw = strong._replace(max_worse=1.0, max_not_worse=25.0, not_worse=25.0)
    assert decide(Evidence({ERRORS: nw}, step_requests=49), ALPHA, 50).verdict == PENDING
    assert decide(Evidence({ERRORS: nw}, step_requests=50), ALPHA, 50).verdict == NOT_WORSE
    assert decide(Evidence({ERRORS: nw, LATENCY: strong._replace(max_worse=1.0)},
                           step_requests=50), ALPHA, 50).verdict == PENDING
    result = decide(Evidence({ERRORS: nw}, step_requests=50), ALPHA, 50)
    assert result.metrics[0].p_not_worse == pytest.approx(1 / 25)


def test_evidence_accumulates_and_round_trips_through_json() -> None:
    ev = Evidence()
    for _ in range(3):
        ev = ev.update({ERRORS: (Counts(10, 1), Counts(90, 1), 0.01)})
    m = ev.metrics[ERRORS]
    assert (m.cand, m.live, ev.step_requests) == (Counts(30, 3), Counts(270, 3), 30)
    assert m.log_lrs[2] == pytest.approx(3 * share_log_lr(Counts(10, 1), Counts(90, 1), 2.0))
    again = Evidence.from_json(ev.to_json())
    assert again.metrics[ERRORS].cand == m.cand
    assert again.metrics[ERRORS].log_lrs == pytest.approx(m.log_lrs)
    assert (again.metrics[ERRORS].max_worse, again.step_requests) == (m.max_worse, 30)
    assert ev.new_step().step_requests == 0
    assert Evidence.from_json(None) == Evidence()


# -- from windows to the test --------------------------------------------------------------------
def window(requests: int, errors: int = 0, slow: int = 0) -> WindowSummary:
    w = WindowSummary(seconds=1.0, requests=requests, errors=errors)
    w.hist[10] = requests - slow  # ~0.4 ms
    w.hist[60] = slow  # ~2.8 s
    return w


def test_slow_requests_counts_buckets_above_the_threshold() -> None:
    w = window(100, slow=7)
    assert slow_requests(w, 500) == 7
    assert slow_requests(w, 0.01) == 100
    assert slow_requests(w, 60_000) == 0


def test_sequential_check_feeds_errors_and_latency() -> None:
    cfg = AnalysisConfig(mode="sequential", min_samples=10, latency_ms=500)
    result = sequential_check(cfg, Evidence(), window(50, errors=2, slow=5), window(450))
    by = {m.metric: m for m in result.metrics}
    assert by[ERRORS].candidate == Counts(50, 2) and by[ERRORS].live == Counts(450, 0)
    assert by[LATENCY].candidate == Counts(50, 5)
    assert by[LATENCY].alpha_worse == ALPHA / 2


def test_rule_routed_requests_are_left_out_of_the_error_test() -> None:
    """Review finding 2: a rule picks a segment (a tenant), not a random share of users, so
    its requests must not count as evidence: 40 of the candidate's requests, all 30 of its
    errors, came through a rule."""
    cand = window(100, errors=30)
    cand.counters.update({RULED_REQUESTS: 40.0, RULED_ERRORS: 30.0})
    result = sequential_check(PLAN.analysis, Evidence(), cand, window(900, errors=9))
    metric = result.evidence.metrics[ERRORS]
    assert (metric.cand, metric.live) == (Counts(60, 0), Counts(900, 9))
    assert result.verdict != WORSE
    assert sequential_check(PLAN.analysis, Evidence(), window(100, errors=30),
                            window(900, errors=9)).verdict == WORSE  # unruled: worse


def test_meter_batches_count_each_request_once() -> None:
    now = [0.0]
    stats = {"c": BackendStats("r", "c", clock=lambda: now[0]),
             "l": BackendStats("r", "l", clock=lambda: now[0])}
    meter = Meter(stats, window=60)
    meter.mark(0.0, force=True)  # the rollout's start
    total = 0
    for i in range(1, 6):
        for _ in range(i):
            stats["c"].observe(500, 0.01)
        stats["l"].observe(200, 0.01)
        now[0] = float(i)
        meter.windows(float(i), 0.0, ("c", "l"))
        batch = meter.batch(("c", "l"))
        assert (batch["c"].requests, batch["c"].errors, batch["l"].requests) == (i, i, 1)
        total += batch["c"].requests
    assert total == 15


# -- the controller ------------------------------------------------------------------------------
PLAN = RolloutPlan(backend="green", steps=(10.0, 50.0, 100.0), interval=60.0,
                   check_interval=1.0, failure_threshold=3,
                   gates=Gates(max_error_rate=1.0, min_requests=5),
                   analysis=AnalysisConfig(mode="sequential", min_samples=20))


def state() -> RolloutState:
    return RolloutState(route="r", backend="green", baseline="blue", started=0.0,
                        step_started=0.0)


def check(st: RolloutState, cand: WindowSummary, live: WindowSummary, now: float
          ) -> tuple[str, RolloutState, str]:
    seq = sequential_check(PLAN.analysis, Evidence.from_json(st.evidence), cand, live)
    decision = advance(st, judge(PLAN.gates, cand, live, 1.0, sequential=seq), now, PLAN)
    return decision.action, decision.state, decision.reason


def test_worse_rolls_back_at_once_without_consecutive_failures() -> None:
    action, st, reason = check(state(), window(100, errors=30), window(900, errors=9), 1.0)
    assert action == "rollback" and st.phase == ROLLED_BACK
    assert "significantly worse" in reason and "p_worse" in reason
    analysis = st.last_check or {}
    assert analysis["sequential"]["verdict"] == WORSE
    gate = next(g for g in analysis["gates"] if g["name"] == "sequential")
    assert gate["verdict"] == FAIL and gate["value"] <= ALPHA


def test_not_worse_advances_before_the_bake_time_and_evidence_resets_per_step() -> None:
    st = state()
    action, st, _ = check(st, window(10), window(90), 1.0)
    assert (action, st.step) == ("hold", 0)  # pending: too few samples; no_data
    assert st.last_verdict == NO_DATA
    now = 1.0
    while st.step == 0:
        now += 1
        action, st, reason = check(st, window(100), window(900), now)
        assert now < 60  # long before the 60 s bake time
    assert action == "advance" and "sequential verdict not worse" in reason
    assert Evidence.from_json(st.evidence).step_requests == 0
    assert Evidence.from_json(st.evidence).metrics[ERRORS].cand.requests > 0
    # Step 2: the test has concluded, but the step needs min_samples (20) of its own.
    action, st, _ = check(st, window(10), window(10), now + 1)
    assert (action, st.step, st.last_verdict) == ("hold", 1, NO_DATA)
    action, st, _ = check(st, window(10), window(10), now + 2)
    assert (action, st.step, st.last_verdict) == ("advance", 2, PASS)
    # 100 %: live idle; the candidate's own min_samples, then promotion.
    action, st, _ = check(st, window(20), window(0), now + 3)
    assert action == "promote" and st.phase == PROMOTED


def test_pending_holds_past_the_bake_time() -> None:
    st = state()
    action, st, reason = check(st, window(30, errors=1), window(270, errors=3), 500.0)
    assert (action, st.phase, st.step) == ("hold", PROGRESSING, 0)
    assert "pending" in reason


def test_a_failing_gate_holds_the_step_but_never_rolls_back_in_sequential_mode() -> None:
    """Sequential mode holds a step long, so a noisy fixed window would fail twice in a row
    by chance (review finding 1): a failed gate holds, only the test rolls back."""
    plan = RolloutPlan(backend="green", steps=(10.0, 100.0), failure_threshold=1,
                       gates=Gates(max_error_rate=0.05, min_requests=5),
                       analysis=AnalysisConfig(mode="sequential", min_samples=10))
    st = state()
    for now in (1.0, 2.0, 3.0):
        seq = sequential_check(plan.analysis, Evidence.from_json(st.evidence),
                               window(10, errors=1), window(90, errors=9))
        decision = advance(st, judge(plan.gates, window(10, errors=1), window(90, errors=9),
                                     1.0, sequential=seq), now, plan)
        st = decision.state
        assert decision.action == "hold" and st.phase == PROGRESSING, decision.reason
        assert "gate failed" in decision.reason and "error_rate" in decision.reason
    # The fixed mode keeps failure_threshold.
    fixed = RolloutPlan(backend="green", steps=(10.0, 100.0), failure_threshold=1,
                        gates=Gates(max_error_rate=0.05, min_requests=5))
    decision = advance(state(), judge(fixed.gates, window(10, errors=1), window(90), 1.0),
                       1.0, fixed)
    assert decision.action == "rollback" and "error_rate" in decision.reason


def test_not_worse_must_still_hold_on_the_later_steps_traffic() -> None:
    """"Not worse" reached at step 1 is not kept for good (review finding 8): the current
    e-value decides, so a candidate whose later traffic erodes the evidence holds."""
    m = MetricEvidence().update(Counts(3000, 60), Counts(27000, 540), 0.01)
    assert m.not_worse >= 1 / ALPHA and m.max_not_worse == m.not_worse
    assert decide(Evidence({ERRORS: m}, step_requests=3000), ALPHA, 100).verdict == NOT_WORSE
    m = m.update(Counts(3000, 120), Counts(3000, 60), 0.01)  # the candidate at 4 % now
    assert m.max_not_worse >= 1 / ALPHA > m.not_worse
    assert decide(Evidence({ERRORS: m}, step_requests=3000), ALPHA, 100).verdict != NOT_WORSE
    assert MetricEvidence.from_json(m.to_json()).not_worse == m.not_worse  # carried in JSON


# -- config --------------------------------------------------------------------------------------
def test_config_errors_name_the_key_path() -> None:
    ok = parse_plan({"analysis": {"mode": "sequential", "alpha": 0.01, "latency_ms": 300}},
                    {"blue", "green"})
    assert ok.analysis.sequential and ok.analysis.slow_margin == ok.analysis.margin
    assert parse_plan(ok.to_json(), {"blue", "green"}) == ok
    assert "analysis" not in parse_plan({}, {"blue", "green"}).to_json()
    for body, message in (
        ({"mode": "sequential", "alpha": 0}, "analysis.alpha: must be > 0"),
        ({"mode": "sequential", "alpha": 0.9}, "analysis.alpha: must be <= 0.5"),
        ({"mode": "sequential", "margin": -1}, "analysis.margin: must be > 0"),
        ({"mode": "sequential", "min_samples": 0}, "analysis.min_samples: must be between"),
        ({"mode": "bayes"}, "analysis.mode: expected one of"),
        ({"alpha": 0.1}, "analysis.alpha: only used with mode: sequential"),
        ({"mode": "sequential", "tau": 1}, "analysis.tau: unknown key"),
    ):
        with pytest.raises(ConfigError) as err:
            parse_plan({"analysis": body}, {"blue", "green"}, "routes[0].rollout")
        assert f"routes[0].rollout.{message}" in str(err.value)


# -- the simulation ------------------------------------------------------------------------------
def test_simulation_false_rollbacks_at_alpha_and_a_2x_worse_candidate_is_caught() -> None:
    """1,000 rollouts of a candidate as good as live (2 % errors), checked every 100 requests:
    the share rolled back stays ≤ α. Tolerance: were the true rate exactly α, the observed
    share's standard deviation is sqrt(α(1−α)/n) = 0.69 %; 3 of them is a 0.13 % chance of
    a false test failure. Then 300 rollouts of a candidate with 4 % errors: all caught; and of
    one worse by exactly the margin (3 %): promoted (a false advance) in ≤ α of them."""
    started = time.process_time()
    equal = Scenario(live_rate=0.02, cand_rate=0.02)
    runs = 1000
    seq_equal = simulate_sequential(equal, runs, seed=11)
    tolerance = 3 * math.sqrt(ALPHA * (1 - ALPHA) / runs)
    assert seq_equal.rollback_share <= ALPHA + tolerance, seq_equal
    assert seq_equal.undecided == 0 and seq_equal.promoted > 0.9 * runs

    worse = Scenario(live_rate=0.02, cand_rate=0.04)
    seq_worse = simulate_sequential(worse, 300, seed=12)
    assert seq_worse.rolled_back == 300, seq_worse

    margin = Scenario(live_rate=0.02, cand_rate=0.03)
    seq_margin = simulate_sequential(margin, 300, seed=13)
    assert seq_margin.promoted / 300 <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / 300)

    # The fixed-window gates at the same traffic catch the 2x candidate sooner, but roll back
    # an equal one far more often than α: the price of judging each window alone.
    lines = []
    for name, gates in FIXED_ARMS:
        eq = simulate_fixed(equal, 200, seed=21, gates=gates)
        bad = simulate_fixed(worse, 200, seed=22, gates=gates)
        assert eq.rollback_share > 2 * ALPHA, (name, eq)
        lines.append(f"{name}: false rollbacks {eq.rollback_share:.1%}, 2x caught "
                     f"{bad.rollback_share:.1%} after a median "
                     f"{bad.median_requests_to_rollback} requests")
    lines.append(f"sequential α {ALPHA}: false rollbacks {seq_equal.rollback_share:.1%}, 2x "
                 f"caught {seq_worse.rollback_share:.1%} after a median "
                 f"{seq_worse.median_requests_to_rollback} requests; worse by the margin "
                 f"promoted {seq_margin.promoted / 300:.1%}")
    print("\n" + "\n".join(lines) + f"\n(simulated in {time.process_time() - started:.1f}s CPU)")


def test_sequential_mode_as_shipped_keeps_false_rollbacks_at_alpha() -> None:
    """Review finding 1: the test through the real gates (DEFAULT_GATES over a 60 s window,
    failure_threshold 2) and the real controller, equal candidates at 2 % errors, 10 % weight
    first: ≤ α rolled back. 200 rollouts: were the true rate α, the share's standard
    deviation is sqrt(α(1−α)/200) = 1.5 %; 3 of them (a 0.13 % chance of a false failure).
    (Before the fix 67 % were rolled back, all by the gate.) A 2× worse one is still caught."""
    runs = 200
    equal = simulate_shipped(Scenario(live_rate=0.02, cand_rate=0.02), runs, seed=31)
    assert equal.rollback_share <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / runs), equal
    assert equal.undecided == 0
    worse = simulate_shipped(Scenario(live_rate=0.02, cand_rate=0.04), 40, seed=32)
    assert worse.rolled_back == 40, worse


def test_clustered_errors_make_worse_come_easier_the_documented_limit() -> None:
    """Review finding 2, the residual risk README states: the test assumes independent
    requests; with errors clustered by (sticky) user, equal candidates are flagged "worse"
    more often than without. Small and seeded: it shows the direction, README has figures."""
    clustered = simulate_clustered(60, seed=3, checks=100)
    control = simulate_clustered(60, seed=3, checks=100, bad_share=0.0)
    assert control <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / 60)
    assert clustered > control


def test_simulation_is_seeded() -> None:
    sc = Scenario(cand_rate=0.04)
    assert simulate_sequential(sc, 20, seed=5) == simulate_sequential(sc, 20, seed=5)


def test_cli_start_flags_build_the_analysis_section() -> None:
    from gateway.cli import build_parser
    from gateway.cli.rollout import build_body

    args = build_parser().parse_args([
        "rollout", "start", "classifier", "--analysis", "sequential", "--alpha", "0.01",
        "--margin", "0.02", "--min-samples", "200", "--latency-ms", "300"])
    assert build_body(args)["analysis"] == {"mode": "sequential", "alpha": 0.01,
                                            "margin": 0.02, "min_samples": 200,
                                            "latency_ms": 300.0}
    plain = build_parser().parse_args(["rollout", "start", "classifier"])
    assert "analysis" not in build_body(plain)


def test_config_schema_describes_the_analysis_section() -> None:
    import jsonschema

    from gateway.config import config_schema, parse_config

    validator = jsonschema.Draft202012Validator(config_schema())
    route: dict[str, object] = {
        "name": "r", "match": {"path_prefix": "/r"}, "live": "blue",
        "backends": {"blue": {"url": "http://127.0.0.1:1"},
                     "green": {"url": "http://127.0.0.1:2"}},
        "rollout": {"backend": "green", "analysis": {"mode": "sequential", "alpha": 0.01,
                                                     "margin": 0.02, "latency_ms": 300}}}
    doc = {"routes": [route]}
    assert not list(validator.iter_errors(doc))
    assert parse_config(doc).routes[0].rollout is not None
    route["rollout"] = {"analysis": {"mode": "sequential", "alpha": 0.9}}
    assert list(validator.iter_errors(doc))
    with pytest.raises(ConfigError, match=r"routes\[0\]\.rollout\.analysis\.alpha"):
        parse_config(doc)
