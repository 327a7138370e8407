"""The rollout controller as a pure step function, Flagger-style.

`advance(state, analysis, now, plan)` looks at one check's `Analysis` and returns a `Decision`:
hold, advance (next step), promote or roll back, with the reason in numbers and the state to
store next. It does no I/O and reads no clock, so it is tested tick by tick with hand-made
analyses; the `Rollouts` component's scheduler calls it every check interval and carries out
the decision through the control plane.

Rules:
- a check that fails counts a failure; one that passes resets the count; "no data" (fewer than
  `min_requests` in the window) changes nothing: the step holds, neither pass nor fail;
- failures >= `failure_threshold` → roll back;
- a step advances when its bake time (`interval`) has elapsed and this check passed; after the
  last step the candidate is promoted;
- a *bake* (watching a backend after a blue-green switch) ends when its time is up and the last
  check did not fail; too little traffic to judge does not keep it open forever;
- sequential mode (the analysis carries a `SequentialResult`): "worse" rolls back at once (the
  test already bounds false alarms; no consecutive failures needed), a passing check (the
  test said "not worse" and every gate passed) advances without waiting for the bake time,
  and time alone never advances a step: evidence does. The test's evidence is carried in
  the state (`evidence`), its per-step request count reset at each step. A failed *gate*
  only holds the step (never rolls back): sequential mode holds a step far longer than a
  bake, so `failure_threshold` consecutive failures of a fixed window would come by chance
  (67 % of equal candidates rolled back at 2 % errors under the default gate); only the
  test, whose false alarms are bounded by α, rolls back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from gateway.rollout.analysis import FAIL, NO_DATA, PASS, Analysis
from gateway.rollout.plan import RolloutPlan
from gateway.rollout.sequential import WORSE

PROGRESSING = "progressing"
PAUSED = "paused"
PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"
ABORTED = "aborted"
PHASES = (PROGRESSING, PAUSED, PROMOTED, ROLLED_BACK, ABORTED)
ACTIVE = frozenset({PROGRESSING, PAUSED})

CANARY = "canary"
BAKE = "bake"

Action = Literal["hold", "advance", "promote", "rollback"]


@dataclass(frozen=True, slots=True)
class RolloutState:
    """A rollout's progress: the JSON document stored under ``rollout/<route>``.

    `baseline` is the backend live when the rollout started (what the candidate is compared
    with, and where a bake switches back to).
    """

    route: str
    backend: str
    baseline: str
    started: float
    step_started: float
    kind: str = CANARY
    phase: str = PROGRESSING
    step: int = 0
    failures: int = 0
    checks: int = 0
    last_verdict: str | None = None
    last_check: dict[str, Any] | None = None
    last_check_time: float | None = None
    reason: str | None = None
    finished: float | None = None
    paused_at: float | None = None
    started_by: str | None = None
    # The sequential test's evidence so far (`sequential.Evidence` as JSON), sequential mode.
    evidence: dict[str, Any] | None = None

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE

    def weight(self, plan: RolloutPlan) -> float:
        if self.kind == BAKE:
            return 100.0
        if self.phase == PROMOTED:
            return 100.0
        if self.phase in (ROLLED_BACK, ABORTED):
            return 0.0
        return plan.steps[min(self.step, len(plan.steps) - 1)]

    def time_in_step(self, now: float) -> float:
        end = self.finished or self.paused_at or now
        return max(0.0, end - self.step_started)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutState:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def evolve(self, **changes: Any) -> RolloutState:
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str
    state: RolloutState
    # The verdict differs from the previous check's: worth an audit event even on a hold.
    verdict_changed: bool = False


def advance(state: RolloutState, analysis: Analysis, now: float, plan: RolloutPlan) -> Decision:
    """One tick of the controller (pure)."""
    if state.phase != PROGRESSING:
        return Decision("hold", f"rollout is {state.phase}", state)
    verdict = analysis.verdict
    if verdict == FAIL:
        failures = state.failures + 1
    elif verdict == PASS:
        failures = 0
    else:
        failures = state.failures
    seq = analysis.sequential
    checked = state.evolve(
        failures=failures, checks=state.checks + 1, last_verdict=verdict,
        last_check=analysis.to_json(), last_check_time=now,
        evidence=seq.evidence.to_json() if seq is not None else state.evidence,
    )
    changed = verdict != state.last_verdict
    threshold = plan.failure_threshold
    n_steps = len(plan.steps)
    here = f"step {state.step + 1}/{n_steps} ({plan.steps[state.step]:g}%)"
    if state.kind == BAKE:
        here = "bake"

    if seq is not None and seq.verdict == WORSE:
        reason = (f"rolled back at {here}: candidate significantly worse than live: "
                  f"{analysis.summary()}")
        return Decision("rollback", reason, checked.evolve(
            phase=ROLLED_BACK, reason=reason, finished=now), changed)
    if verdict == FAIL and failures >= threshold and seq is None:
        reason = (f"rolled back at {here}: {failures} consecutive failed checks "
                  f"(threshold {threshold}): {analysis.summary()}")
        return Decision("rollback", reason, checked.evolve(
            phase=ROLLED_BACK, reason=reason, finished=now), changed)

    elapsed = now - state.step_started
    # Sequential: a pass means the test said "not worse", so the step is done, baked or not.
    baked = seq is not None or elapsed >= plan.interval - 1e-9
    how = "sequential verdict not worse" if seq is not None else f"baked {elapsed:.2f}s"
    if state.kind == BAKE and baked and verdict != FAIL:
        how = "checks passed" if verdict == PASS else "too little traffic to judge"
        reason = f"bake of {plan.interval:g}s finished ({how}): {analysis.summary()}"
        return Decision("promote", reason, checked.evolve(
            phase=PROMOTED, reason=reason, finished=now), changed)
    if verdict == PASS and baked:
        if state.step + 1 >= n_steps:
            reason = f"promoted after {here} {how}: {analysis.summary()}"
            return Decision("promote", reason, checked.evolve(
                phase=PROMOTED, reason=reason, finished=now), changed)
        nxt = state.step + 1
        reason = (f"step {nxt + 1}/{n_steps} → {plan.steps[nxt]:g}% after {here} {how}: "
                  f"{analysis.summary()}")
        evidence = seq.evidence.new_step().to_json() if seq is not None else state.evidence
        return Decision("advance", reason, checked.evolve(
            step=nxt, step_started=now, failures=0, evidence=evidence), changed)

    if verdict == FAIL and seq is not None:
        reason = (f"holding {here}: gate failed (sequential mode: a gate holds the step, only "
                  f"the test rolls back): {analysis.summary()}")
    elif verdict == FAIL:
        reason = f"holding {here}: check failed ({failures}/{threshold}): {analysis.summary()}"
    elif verdict == NO_DATA:
        reason = f"holding {here}: no data: {analysis.summary()}"
    else:
        reason = f"holding {here}: baking {elapsed:.2f}s of {plan.interval:g}s"
    return Decision("hold", reason, checked, changed)
