"""Sequential verdicts: always-valid tests of a candidate against the live backend.

A fixed-window gate asks "is the candidate worse *in this window*?" at every check, and every
check is another chance of a false alarm. An always-valid test bounds the chance of a false
verdict *over all checks of a rollout* by α, however often it looks, so it may stop as soon as
the evidence is in. Two one-sided tests per metric (the error rate; optionally the share of
requests slower than ``latency_ms``):

**worse → roll back.** H0: the candidate's rate is at most live's. Conditional on which
requests failed, each failure lands on the candidate with probability w (the candidate's share
of requests in that check) when both are equally good, and with π = wρ / (wρ + 1 − w) when the
candidate's rate is ρ times live's. The product over checks of the likelihood ratios π/w and
(1 − π)/(1 − w) is a martingale under H0 *whatever the base rate* (it cancels), also at a
handful of errors where a normal approximation is badly off; averaged over a grid of ρ
(`RHOS`, equal weights) it is an e-process, and by Ville's inequality
P(ever ≥ 1/α) ≤ α. For ρ_true < 1 it is a supermartingale, so a better candidate is covered.

**not worse by the margin → advance.** H0: candidate rate ≥ live + margin. The normal-mixture
mSPRT (Johari, Pekelis, Walsh, "Always valid inference", 2017) on the difference of the
cumulative rates, one-sided (a half-normal mixture, scale τ = margin), with the variance
evaluated under H0 (rates shifted by the margin, as Farrington-Manning): at zero errors the
variance stays ≥ margin(1 − margin)/n, so "no errors yet" is not certainty. For normal data
with any allocation sequence (weights changing between steps, live idle at 100 %), the
likelihood ratio of the maximal invariant under a common shift (Wijsman) is exactly the normal
likelihood ratio of the difference of means with that variance, and a martingale: so the
mixture is valid for any ramp; the binomial plug-in is the approximation, checked by the
simulation (tests/test_rollout_sequential.py, `python -m gateway.rollout.simulation`).

α: a false rollback needs one "worse" test to cross, so with the latency test on, each metric's
"worse" side runs at α/2 (Bonferroni); a false advance needs *every* metric's "not worse" side
to cross, so each runs at α. No verdict before `min_samples` candidate requests: looking less
often never breaks Ville's bound.

Everything here is pure; the evidence carried from check to check is `Evidence` (JSON in the
rollout document, so a new lease holder continues the same test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

RHOS = (1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
_LOG_RHOS = tuple((math.log(rho), rho - 1.0) for rho in RHOS)
ERRORS = "errors"
LATENCY = "latency"
WORSE = "worse"
NOT_WORSE = "not_worse"
PENDING = "pending"
MAX_LOG = 700.0  # exp() overflow guard; far beyond any 1/α


class Counts(NamedTuple):
    """One backend's requests and, of them, failures (errors or slow requests). (Tuples:
    the simulation builds millions.)"""

    requests: int = 0
    hits: int = 0

    def plus(self, other: Counts) -> Counts:
        return Counts(self[0] + other[0], self[1] + other[1])

    @property
    def rate(self) -> float | None:
        return self.hits / self.requests if self.requests else None


# -- the statistics ----------------------------------------------------------------------------
def share_log_lr(cand: Counts, live: Counts, rho: float) -> float:
    """log likelihood ratio (candidate ρ times worse vs equal) of one batch's failures falling
    x1 on the candidate and x0 on live, given the candidate had share w of the requests:
    x1·log(π/w) + x0·log((1−π)/(1−w)) = x1·log ρ − (x1 + x0)·log(1 + w(ρ − 1))."""
    n1, x1 = cand
    n0, x0 = live
    if x1 + x0 <= 0 or n1 <= 0 or n0 <= 0:
        return 0.0  # no failure, or one side idle: the batch says nothing about the split
    return x1 * math.log(rho) - (x1 + x0) * math.log1p(n1 / (n1 + n0) * (rho - 1.0))


def share_log_lrs(cand: Counts, live: Counts) -> tuple[float, ...] | None:
    """`share_log_lr` for every ρ of `RHOS`; None when the batch says nothing."""
    n1, x1 = cand
    n0, x0 = live
    hits = x1 + x0
    if hits <= 0 or n1 <= 0 or n0 <= 0:
        return None
    w = n1 / (n1 + n0)
    return tuple([x1 * log_rho - hits * math.log1p(w * rho_1) for log_rho, rho_1 in _LOG_RHOS])


def mixture_e(log_lrs: tuple[float, ...]) -> float:
    """The e-value of the equal-weight mixture over `RHOS` of the cumulative log ratios."""
    if max(log_lrs) > MAX_LOG:
        return math.exp(MAX_LOG)
    return sum(map(math.exp, log_lrs)) / len(log_lrs)


def restricted_variance(cand: Counts, live: Counts, delta: float) -> float:
    """Variance of p̂_cand − p̂_live with both rates estimated under H0: p_cand = p_live + δ
    (the pooled variance at δ = 0)."""
    n1, n0 = cand.requests, live.requests
    base = (cand.hits + live.hits - n1 * delta) / (n1 + n0)
    p0 = min(max(base, max(0.0, -delta)), min(1.0, 1.0 - delta))
    p1 = p0 + delta
    return p1 * (1.0 - p1) / n1 + p0 * (1.0 - p0) / n0


def msprt_e(estimate: float, variance: float, tau: float) -> float:
    """One-sided normal-mixture likelihood ratio for an effect > 0, given an estimate of it
    with `variance`; the mixing density is half-normal with scale τ::

        Λ = 2 · sqrt(V / (V + τ²)) · exp(τ² θ̂² / (2V(V + τ²))) · Φ(θ̂ τ / sqrt(V (V + τ²)))
    """
    if variance <= 0.0 or tau <= 0.0:
        return 0.0
    total = variance + tau * tau
    log_e = (0.5 * math.log(variance / total)
             + tau * tau * estimate * estimate / (2.0 * variance * total))
    tail = 0.5 * math.erfc(-estimate * tau / math.sqrt(2.0 * variance * total))
    if tail <= 0.0:
        return 0.0
    return math.exp(min(log_e + math.log(2.0 * tail), MAX_LOG))


def not_worse_e(cand: Counts, live: Counts, margin: float) -> float:
    """E-value against "candidate rate ≥ live rate + margin" (evidence it is not worse)."""
    if cand.requests <= 0 or live.requests <= 0:
        return 0.0
    diff = cand.hits / cand.requests - live.hits / live.requests
    return msprt_e(margin - diff, restricted_variance(cand, live, margin), margin)


# -- the evidence carried from check to check ----------------------------------------------------
class MetricEvidence(NamedTuple):
    """One metric's cumulative counts and test state since the rollout began."""

    cand: Counts = Counts()
    live: Counts = Counts()
    log_lrs: tuple[float, ...] = (0.0,) * len(RHOS)
    max_worse: float = 0.0  # running max of the "worse" e-value: p = 1 / max
    max_not_worse: float = 0.0
    # The not-worse e-value *now* (on all evidence so far). Advancing asks for this one, not
    # the running max: "not worse" reached at the first step must still hold on the later
    # steps' traffic (Ville bounds every look, so the current value is as valid as the max).
    not_worse: float = 0.0

    def update(self, cand: Counts, live: Counts, margin: float) -> MetricEvidence:
        """Add one check's new traffic (`cand`, `live`: counts since the last check)."""
        lrs = share_log_lrs(cand, live)
        log_lrs = self.log_lrs
        max_worse = self.max_worse
        if lrs is not None:
            log_lrs = tuple([a + b for a, b in zip(log_lrs, lrs, strict=True)])
            max_worse = max(max_worse, mixture_e(log_lrs))
        total_c = Counts(self.cand[0] + cand[0], self.cand[1] + cand[1])
        total_l = Counts(self.live[0] + live[0], self.live[1] + live[1])
        now = not_worse_e(total_c, total_l, margin)
        return MetricEvidence(total_c, total_l, log_lrs, max_worse,
                              max(self.max_not_worse, now), now)

    def to_json(self) -> dict[str, Any]:
        return {"candidate": [self.cand.requests, self.cand.hits],
                "live": [self.live.requests, self.live.hits],
                "log_lrs": [round(v, 9) for v in self.log_lrs],
                "max_worse": self.max_worse, "max_not_worse": self.max_not_worse,
                "not_worse": self.not_worse}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MetricEvidence:
        lrs = tuple(float(v) for v in data.get("log_lrs") or ())
        return cls(Counts(*data.get("candidate", (0, 0))), Counts(*data.get("live", (0, 0))),
                   lrs if len(lrs) == len(RHOS) else (0.0,) * len(RHOS),
                   float(data.get("max_worse", 0.0)), float(data.get("max_not_worse", 0.0)),
                   float(data.get("not_worse", data.get("max_not_worse", 0.0))))


@dataclass(frozen=True, slots=True)
class Evidence:
    """Per metric evidence plus the candidate's requests in the current step."""

    metrics: dict[str, MetricEvidence] = field(default_factory=dict)
    step_requests: int = 0

    def update(self, batches: dict[str, tuple[Counts, Counts, float]]) -> Evidence:
        """`batches`: metric → (candidate counts, live counts, margin) since the last check."""
        metrics = dict(self.metrics)
        step = self.step_requests
        for name, (cand, live, margin) in batches.items():
            metrics[name] = metrics.get(name, MetricEvidence()).update(cand, live, margin)
            if name == ERRORS:
                step += cand.requests
        return Evidence(metrics, step)

    def new_step(self) -> Evidence:
        return replace(self, step_requests=0)

    def to_json(self) -> dict[str, Any]:
        return {"metrics": {k: v.to_json() for k, v in self.metrics.items()},
                "step_requests": self.step_requests}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Evidence:
        if not data:
            return cls()
        metrics = {str(k): MetricEvidence.from_json(v)
                   for k, v in (data.get("metrics") or {}).items()}
        return cls(metrics, int(data.get("step_requests", 0)))


class MetricVerdict(NamedTuple):
    metric: str
    verdict: str
    candidate: Counts
    live: Counts
    e_worse: float
    e_not_worse: float
    alpha_worse: float
    alpha_not_worse: float

    @property
    def p_worse(self) -> float:
        return min(1.0, 1.0 / self.e_worse) if self.e_worse > 0 else 1.0

    @property
    def p_not_worse(self) -> float:
        return min(1.0, 1.0 / self.e_not_worse) if self.e_not_worse > 0 else 1.0

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "verdict": self.verdict,
                "candidate": {"requests": self.candidate.requests, "hits": self.candidate.hits},
                "live": {"requests": self.live.requests, "hits": self.live.hits},
                "p_worse": _round(self.p_worse), "p_not_worse": _round(self.p_not_worse),
                "e_worse": _round(self.e_worse), "e_not_worse": _round(self.e_not_worse),
                "alpha_worse": self.alpha_worse, "alpha_not_worse": self.alpha_not_worse}

    def describe(self) -> str:
        c, lv = self.candidate, self.live
        what = "errors" if self.metric == ERRORS else "slow"
        return (f"sequential {self.metric} {self.verdict}: candidate {c.hits}/{c.requests} "
                f"{what}, live {lv.hits}/{lv.requests}, p_worse {_fmt(self.p_worse)} "
                f"(α {self.alpha_worse:g}), p_not_worse {_fmt(self.p_not_worse)} "
                f"(α {self.alpha_not_worse:g})")


class SequentialResult(NamedTuple):
    """One check's sequential verdict: ``worse``, ``not_worse`` or ``pending``."""

    verdict: str
    metrics: tuple[MetricVerdict, ...]
    evidence: Evidence
    step_requests: int
    min_samples: int

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "step_requests": self.step_requests,
                "min_samples": self.min_samples,
                "metrics": [m.to_json() for m in self.metrics]}

    def describe(self) -> str:
        shown = [m for m in self.metrics if m.verdict == WORSE] or list(self.metrics)
        return "; ".join(m.describe() for m in shown)


def decide(evidence: Evidence, alpha: float, min_samples: int) -> SequentialResult:
    """The verdict from the evidence: ``worse`` when any metric's worse-test crossed 1/(α/k),
    ``not_worse`` when every metric's not-worse e-value *now* is ≥ 1/α (and the step has seen
    `min_samples` candidate requests), else ``pending``."""
    names = sorted(evidence.metrics)
    k = max(1, len(names))
    alpha_worse = alpha / k
    verdicts: list[MetricVerdict] = []
    for name in names:
        m = evidence.metrics[name]
        if m.cand.requests < min_samples:
            verdict = PENDING
        elif m.max_worse >= 1.0 / alpha_worse:
            verdict = WORSE
        elif m.not_worse >= 1.0 / alpha:
            verdict = NOT_WORSE
        else:
            verdict = PENDING
        verdicts.append(MetricVerdict(name, verdict, m.cand, m.live, m.max_worse,
                                      m.not_worse, alpha_worse, alpha))
    if any(v.verdict == WORSE for v in verdicts):
        overall = WORSE
    elif verdicts and all(v.verdict == NOT_WORSE for v in verdicts) \
            and evidence.step_requests >= min_samples:
        overall = NOT_WORSE
    else:
        overall = PENDING
    return SequentialResult(overall, tuple(verdicts), evidence, evidence.step_requests,
                            min_samples)


def _round(value: float) -> float:
    if value == 0 or not math.isfinite(value):
        return value
    return float(f"{value:.6g}")


def _fmt(value: float) -> str:
    return f"{value:.3g}"
