"""Simulated rollouts: fixed-window gates against the sequential test, at the same traffic.

Each simulated rollout ramps a candidate through the plan's steps; every check, `per_check`
requests arrive, the candidate gets the step's weight of them (as the sticky split does on
average) and each fails with its backend's error rate. The fixed-window arm runs the real gates
(`analysis.judge`) and the real controller (`controller.advance`): the window is the step so
far, `failure_threshold` failed checks in a row roll back, a step advances when its bake time is
over and the check passes. The sequential arm runs the real test (`sequential.decide`): "worse"
rolls back at once, "not worse" advances (min_samples candidate requests per step), nothing
else moves a step; a rollout undecided after `max_checks` checks counts as undecided.
`run_shipped` is sequential mode *as it ships*: the test through the real gates (the plan's,
by default `DEFAULT_GATES`, over a sliding window of `window_checks` checks) and the real
controller, so a gate that fails on noise shows up in the figures.

``python -m gateway.rollout.simulation`` prints the table that README.md quotes (plain Python,
seeded: the same numbers every run).
"""

from __future__ import annotations

import argparse
import bisect
import functools
import math
import random
import statistics
from dataclasses import dataclass

from gateway.metrics import WindowSummary
from gateway.rollout.analysis import judge
from gateway.rollout.controller import PROGRESSING, RolloutState, advance
from gateway.rollout.plan import DEFAULT_GATES, AnalysisConfig, Gates, RolloutPlan
from gateway.rollout.sequential import (
    ERRORS,
    NOT_WORSE,
    WORSE,
    Counts,
    Evidence,
    MetricEvidence,
    decide,
)

ROLLED_BACK = "rolled_back"
PROMOTED = "promoted"
UNDECIDED = "undecided"


@dataclass(frozen=True, slots=True)
class Scenario:
    live_rate: float = 0.02
    cand_rate: float = 0.02
    per_check: int = 100
    steps: tuple[float, ...] = (10.0, 50.0, 100.0)
    checks_per_step: int = 10  # the fixed arm's bake time, in checks
    max_checks: int = 1000  # the sequential arm gives up (undecided) after this many


@dataclass(frozen=True, slots=True)
class Outcome:
    end: str  # rolled_back, promoted, undecided
    requests: int  # requests through the route until the end


@dataclass(frozen=True, slots=True)
class Summary:
    runs: int
    rolled_back: int
    promoted: int
    undecided: int
    median_requests_to_rollback: float | None
    median_requests_to_promote: float | None

    @property
    def rollback_share(self) -> float:
        return self.rolled_back / self.runs


@functools.lru_cache(maxsize=256)
def _cdf(n: int, p: float) -> tuple[float, ...]:
    out: list[float] = []
    total = 0.0
    for k in range(n + 1):
        total += math.comb(n, k) * p ** k * (1.0 - p) ** (n - k)
        out.append(total)
    return tuple(out)


def binomial(rng: random.Random, n: int, p: float) -> int:
    """A Binomial(n, p) draw by inverting its CDF (a cached table per n, p; no numpy)."""
    if n <= 0 or p <= 0.0:
        return 0
    if p >= 1.0:
        return n
    return min(n, bisect.bisect_right(_cdf(n, p), rng.random()))


def _traffic(rng: random.Random, sc: Scenario, weight: float) -> tuple[Counts, Counts]:
    # The sticky split gives the candidate its share of users, near enough its share of
    # requests at every check.
    cand_n = round(sc.per_check * weight / 100.0)
    live_n = sc.per_check - cand_n
    return (Counts(cand_n, binomial(rng, cand_n, sc.cand_rate)),
            Counts(live_n, binomial(rng, live_n, sc.live_rate)))


def run_sequential(rng: random.Random, sc: Scenario, alpha: float, margin: float,
                   min_samples: int) -> Outcome:
    evidence = Evidence()
    step = 0
    for check in range(1, sc.max_checks + 1):
        cand, live = _traffic(rng, sc, sc.steps[step])
        evidence = evidence.update({ERRORS: (cand, live, margin)})
        result = decide(evidence, alpha, min_samples)
        if result.verdict == WORSE:
            return Outcome(ROLLED_BACK, check * sc.per_check)
        if result.verdict == NOT_WORSE:
            step += 1
            if step >= len(sc.steps):
                return Outcome(PROMOTED, check * sc.per_check)
            evidence = evidence.new_step()
    return Outcome(UNDECIDED, sc.max_checks * sc.per_check)


def run_shipped(rng: random.Random, sc: Scenario, alpha: float, margin: float,
                min_samples: int, gates: Gates = DEFAULT_GATES, window_checks: int = 6
                ) -> Outcome:
    """Sequential mode through `judge` and `advance` as the rollout component runs it: a
    check every 10 s, the gates over a 60 s window (never reaching before the step)."""
    plan = RolloutPlan(backend="green", steps=sc.steps, interval=60.0, check_interval=10.0,
                       failure_threshold=2, gates=gates,
                       analysis=AnalysisConfig(mode="sequential", alpha=alpha, margin=margin,
                                               min_samples=min_samples))
    state = RolloutState(route="r", backend="green", baseline="blue", started=0.0,
                         step_started=0.0)
    recent: list[tuple[Counts, Counts]] = []
    check = 0
    while state.phase == PROGRESSING and check < sc.max_checks:
        check += 1
        cand, live = _traffic(rng, sc, plan.steps[state.step])
        recent = [*recent[-(window_checks - 1):], (cand, live)]
        cand_w, live_w = Counts(), Counts()
        for c, lv in recent:
            cand_w, live_w = cand_w.plus(c), live_w.plus(lv)
        seq = decide(Evidence.from_json(state.evidence).update({ERRORS: (cand, live, margin)}),
                     alpha, min_samples)
        analysis = judge(plan.gates, _window(cand_w), _window(live_w), 60.0, sequential=seq)
        decision = advance(state, analysis, check * 10.0, plan)
        if decision.action == "advance":
            recent = []
        state = decision.state
    end = {ROLLED_BACK: ROLLED_BACK, PROMOTED: PROMOTED}.get(state.phase, UNDECIDED)
    return Outcome(end, check * sc.per_check)


def _window(c: Counts) -> WindowSummary:
    return WindowSummary(seconds=1.0, requests=c.requests, errors=c.hits)


def run_fixed(rng: random.Random, sc: Scenario, gates: Gates, failure_threshold: int = 2
              ) -> Outcome:
    plan = RolloutPlan(backend="green", steps=sc.steps, interval=float(sc.checks_per_step),
                       check_interval=1.0, failure_threshold=failure_threshold, gates=gates)
    state = RolloutState(route="r", backend="green", baseline="blue", started=0.0,
                         step_started=0.0)
    cand_w, live_w = Counts(), Counts()
    check = 0
    while state.phase == PROGRESSING and check < sc.max_checks:
        check += 1
        cand, live = _traffic(rng, sc, plan.steps[state.step])
        cand_w, live_w = cand_w.plus(cand), live_w.plus(live)
        analysis = judge(gates, _window(cand_w), _window(live_w), 1.0)
        decision = advance(state, analysis, float(check), plan)
        if decision.action == "advance":
            cand_w, live_w = Counts(), Counts()  # the window never reaches before the step
        state = decision.state
    if state.phase == ROLLED_BACK:
        return Outcome(ROLLED_BACK, check * sc.per_check)
    if state.phase == PROMOTED:
        return Outcome(PROMOTED, check * sc.per_check)
    return Outcome(UNDECIDED, check * sc.per_check)


def summarize(outcomes: list[Outcome]) -> Summary:
    back = [o.requests for o in outcomes if o.end == ROLLED_BACK]
    done = [o.requests for o in outcomes if o.end == PROMOTED]
    return Summary(len(outcomes), len(back), len(done),
                   sum(1 for o in outcomes if o.end == UNDECIDED),
                   statistics.median(back) if back else None,
                   statistics.median(done) if done else None)


def simulate_sequential(sc: Scenario, runs: int, seed: int, *, alpha: float = 0.05,
                        margin: float = 0.01, min_samples: int = 100) -> Summary:
    rng = random.Random(seed)
    return summarize([run_sequential(rng, sc, alpha, margin, min_samples)
                      for _ in range(runs)])


def simulate_shipped(sc: Scenario, runs: int, seed: int, *, alpha: float = 0.05,
                     margin: float = 0.01, min_samples: int = 100,
                     gates: Gates = DEFAULT_GATES) -> Summary:
    rng = random.Random(seed)
    return summarize([run_shipped(rng, sc, alpha, margin, min_samples, gates)
                      for _ in range(runs)])


def simulate_fixed(sc: Scenario, runs: int, seed: int, gates: Gates,
                   failure_threshold: int = 2) -> Summary:
    rng = random.Random(seed)
    return summarize([run_fixed(rng, sc, gates, failure_threshold) for _ in range(runs)])


def simulate_clustered(runs: int, seed: int, *, users: int = 500, bad_share: float = 0.01,
                       bad_rate: float = 0.5, rate: float = 0.01, weight: float = 0.1,
                       per_check: int = 100, checks: int = 200, alpha: float = 0.05) -> float:
    """The share of equal candidates the "worse" test flags when errors cluster by user:
    `bad_share` of `users` fail at `bad_rate`, the rest at `rate`, on either backend; each
    user is sticky on one side (the candidate's with probability `weight`). The test assumes
    independent requests; this measures what clustering costs (README, docs/ARCHITECTURE.md)."""
    rng = random.Random(seed)
    fired = 0
    for _ in range(runs):
        rates = [bad_rate if rng.random() < bad_share else rate for _ in range(users)]
        on_cand = [rng.random() < weight for _ in range(users)]
        evidence = MetricEvidence()
        for _ in range(checks):
            n1 = x1 = n0 = x0 = 0
            for _ in range(per_check):
                u = rng.randrange(users)
                failed = rng.random() < rates[u]
                if on_cand[u]:
                    n1 += 1
                    x1 += failed
                else:
                    n0 += 1
                    x0 += failed
            evidence = evidence.update(Counts(n1, x1), Counts(n0, x0), 0.01)
            if evidence.max_worse >= 1.0 / alpha:
                fired += 1
                break
    return fired / runs


FIXED_ARMS: tuple[tuple[str, Gates], ...] = (
    ("fixed: max_error_rate_ratio 1.5", Gates(max_error_rate=1.0, max_error_rate_ratio=1.5,
                                              min_requests=50)),
    ("fixed: max_error_rate_ratio 2", Gates(max_error_rate=1.0, max_error_rate_ratio=2.0,
                                            min_requests=50)),
    ("fixed: max_error_rate 0.03", Gates(max_error_rate=0.03, min_requests=50)),
)


def table(runs: int = 2000, seed: int = 1, alpha: float = 0.05,
          margins: tuple[float, ...] = (0.01, 0.02), live_rate: float = 0.02) -> str:
    """The README's table: per arm, false rollbacks of an equal candidate (and how soon it
    is promoted), and for a 2× worse one the share caught and the median requests (through
    the route) until caught."""
    equal = Scenario(live_rate=live_rate, cand_rate=live_rate)
    worse = Scenario(live_rate=live_rate, cand_rate=2 * live_rate)
    rows = [("arm", "false rollbacks (equal)", "promoted (equal), median req",
             "2× worse caught", "median req to catch 2×")]

    def row(name: str, eq: Summary, bad: Summary) -> None:
        rows.append((name, f"{eq.rollback_share:.1%}",
                     f"{eq.promoted / eq.runs:.1%}, {_req(eq.median_requests_to_promote)}",
                     f"{bad.rollback_share:.1%}", _req(bad.median_requests_to_rollback)))

    for i, (name, gates) in enumerate(FIXED_ARMS):
        row(name, simulate_fixed(equal, runs, seed + i, gates),
            simulate_fixed(worse, runs, seed + 100 + i, gates))
    for i, margin in enumerate(margins):
        row(f"sequential α {alpha:g}, margin {margin:g}, as shipped",
            simulate_shipped(equal, runs, seed + 200 + i, alpha=alpha, margin=margin),
            simulate_shipped(worse, runs, seed + 300 + i, alpha=alpha, margin=margin))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _req(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.rollout.simulation",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--margin", type=float, action="append",
                        help="a sequential arm's margin (repeatable; default 0.01 and 0.02)")
    parser.add_argument("--live-rate", type=float, default=0.02)
    parser.add_argument("--clustered", action="store_true",
                        help="instead: equal candidates flagged worse when errors cluster by "
                             "user (300 rollouts each; the figures README quotes)")
    args = parser.parse_args(argv)
    if args.clustered:
        for name, kwargs in (("1% of 500 users at 50% errors", {}),
                             ("1% of 5,000 users at 50% errors", {"users": 5000}),
                             ("no clustering", {"bad_share": 0.0})):
            share = simulate_clustered(300, args.seed + 2, alpha=args.alpha,
                                       **kwargs)
            print(f"{name}: {share:.1%} of equal candidates flagged worse")
        return 0
    margins = tuple(args.margin) if args.margin else (0.01, 0.02)
    print(table(args.runs, args.seed, args.alpha, margins, args.live_rate))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
