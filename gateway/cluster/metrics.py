"""Cluster-wide metrics for decisions: every gateway process's numbers, summed through Redis.

Rollout gates, alarms, drift, the dashboard and the admin API's numbers read a
`MetricsSource`:

- `LocalMetrics` (the memory store): this process's own `BackendStats` and `ShadowStats`,
  straight from the `Recorder`: the views *are* those objects, nothing is copied.
- `ClusterMetrics` (the Redis store): the sum over every process publishing to the same Redis
  namespace, so a canary is judged on all its traffic, whichever worker or replica served it.

Prometheus ``/metrics`` stays per process (Prometheus sums across pods: its convention), and
nothing here is on the request path: the proxy fills the same `BackendStats` as always, a
publisher task pushes what they gained since its last push, and a reader task keeps a local
mirror of the cluster's sums that consumers read synchronously.

Keys (``{ns}`` is the store's namespace; hash fields are ``{route}\\x1f{backend}\\x1f{name}``):

    {ns}:m:s:{second}    hash  that second's sums: n (requests), e (5xx), l (latency sum),
                               h{i} (fine latency bucket i), c:{counter}; and ``#v``, the
                               last batch that changed it; expires 960 s after that second
    {ns}:sh:s:{second}   hash  that second's shadow tallies (`Tally` fields, see _tally_fields)
                               and ``#v``; expires an hour after (the longest shadow window)
    {ns}:sh:tot          hash  cumulative shadow tallies; ``since``: the earliest time covered
                               (display only: a Redis that lost it starts it again)
    {ns}:m:late          zset  seconds published late (a process catching up after an outage),
                               scored by {ns}:m:latever, so that readers re-read them
    {ns}:m:seq:{member}  str   the last batch applied for that process (applied only once)

Publishing, every `interval` just after each whole second: for each `BackendStats`, the
completed one-second slots not yet published; for each `ShadowStats` the same, and its
cumulative tally minus the one last published. One Lua script applies a batch (HINCRBY,
HINCRBYFLOAT, a max, a min, EXPIRE) atomically and only once: a batch carries a number, the
script skips one already applied, and a batch whose outcome is unknown (connection lost) is
sent again unchanged. The publish marks move only when Redis confirmed, so what is observed
while Redis is down goes out with the first batch that succeeds: nothing lost, nothing counted
twice. Histogram buckets are fixed, so merged latency histograms are exact bucket-by-bucket
sums. A process's contributions stay after it dies (its traffic did happen) and age out with
the per-second keys.

Reading, every `interval` a little later (30 % into it), with one read-only Lua script: the
three last completed seconds (publishers a little late), any second flagged late, and the
shadow totals; on start the whole retained history once. A hash comes back as one JSON string
(orjson parses it, not redis-py's RESP parser), or as ``=`` when its ``#v`` is the one already
read, so the seconds re-read for late publishers cost nothing when nobody was late. The mirror
is one `BackendStats` per (route, backend) holding the merged slots, so `window()` and
`series()` are the very code the local view runs. A second is visible once it is over,
published and read: ~0.3 s after it ends with synchronised clocks, at most ~2 s. So cluster
windows end at the last completed second (`lag` = 1 s).

The cluster's `Totals` (what the rollout gates difference) are running sums the reader keeps:
every second it reads adds what that second gained since it last read it. They count from the
history loaded at start, grow in whole seconds, and never go back: a second Redis lost keeps
the numbers the mirror had (a smaller re-read is ignored), so a Redis restart is no reset.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from redis.exceptions import RedisError

from gateway.metrics import (
    EMPTY,
    N_BUCKETS,
    WINDOW_SLOTS,
    BackendStats,
    Recorder,
    Slot,
    Totals,
    WindowSummary,
)
from gateway.shadow.stats import Tally
from gateway.tasks import cancel_and_wait

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from gateway.store import Store

log = logging.getLogger("modelgate.cluster")

SEP = "\x1f"
METRICS_KEEP = WINDOW_SLOTS + 60  # seconds a per-second metrics hash lives after its second
SHADOW_WINDOW_MAX = 3600  # the longest shadow window the config allows
SHADOW_KEEP = SHADOW_WINDOW_MAX + 60
DEFAULT_SHADOW_WINDOW = 300.0
TOTALS_TTL = 7 * 86400  # the shadow totals of a cluster idle for a week go
SEQ_TTL = 3600
REREAD = 3  # completed seconds read again every time: publishers a little late
LATE_KEEP = 2000  # late-flagged seconds remembered
MAX_OPS = 20_000  # per batch: a backlog after an outage goes out in several batches
READ_CHUNK = 1000  # hashes per read script call (loading the history)
PUBLISH_AT = 0.05  # fraction of the interval after each whole second: the second is final
READ_AT = 0.3  # later still: every process's publish of that second has landed
BACKOFF_MAX = 2.0
STOP_FLUSH_TIMEOUT = 1.0
UNREACHABLE = (RedisError, OSError)


# -- the interface ------------------------------------------------------------------------------
class BackendView(Protocol):
    """One backend of one route: windows over one-second slots and cumulative totals."""

    def window(self, seconds: float, now: float | None = None) -> WindowSummary: ...

    def series(self, seconds: int, step: int, now: float | None = None
               ) -> list[WindowSummary]: ...

    def totals(self) -> Totals: ...


class ShadowView(Protocol):
    """One (route, shadow backend): comparison tallies over a window and since `since`."""

    @property
    def backend(self) -> str: ...

    @property
    def window(self) -> float: ...

    @property
    def since(self) -> float: ...

    @property
    def total(self) -> Tally: ...

    def window_tally(self, seconds: float | None = None) -> Tally: ...

    def agreement(self, seconds: float) -> tuple[int, float | None]: ...


class MetricsSource(Protocol):
    """Where decisions read numbers: this process's, or the whole cluster's.

    `lag`: how many seconds the windows trail the clock (the cluster's current second is not
    published before it is over); a window asked for without `now` ends `lag` seconds ago.
    Reads are synchronous and local; `start`/`stop` own whatever keeps them current."""

    @property
    def cluster(self) -> bool: ...

    @property
    def lag(self) -> float: ...

    def backend(self, route: str, backend: str) -> BackendView: ...

    def shadow(self, route: str, backend: str) -> ShadowView | None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class LocalMetrics:
    """This process's numbers: the recorder's own objects."""

    cluster = False
    lag = 0.0

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def backend(self, route: str, backend: str) -> BackendView:
        return self.recorder.stats(route, backend)

    def shadow(self, route: str, backend: str) -> ShadowView | None:
        return self.recorder.find_shadow_stats(route, backend)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


def metrics_source(store: Store, member: str, recorder: Recorder,
                   clock: Callable[[], float] = time.time) -> MetricsSource:
    """Local numbers with a store of one process; the cluster's with a shared (Redis) one."""
    if not store.shared:
        return LocalMetrics(recorder)
    shared: Any = store  # RedisStore: its client and key namespace
    return ClusterMetrics(shared.redis, shared.namespace, member, recorder, clock=clock)


# -- encoding -----------------------------------------------------------------------------------
_TALLY_INTS = ("dropped", "dropped_down", "elements", "elements_agree", "labels",
               "labels_agree", "numbers", "numbers_agree", "texts", "texts_agree",
               "mismatched")
_TALLY_FLOATS = ("delta_sum", "similarity_sum", "live_sum", "shadow_sum")
_TALLY_MAX = "delta_max"
_FLOAT_FIELDS = frozenset(_TALLY_FLOATS)
SINCE = "since"


def _slot_fields(slot: Slot) -> Iterable[tuple[str, str, int | float]]:
    """(op, field name, value) of one second of one backend."""
    if slot.requests:
        yield "i", "n", slot.requests
    if slot.errors:
        yield "i", "e", slot.errors
    if slot.latency_sum:
        yield "f", "l", slot.latency_sum
    for i, n in enumerate(slot.hist):
        if n:
            yield "i", f"h{i}", n
    for name, value in slot.counters.items():
        if value:
            yield "f", "c:" + name, value


def _tally_fields(t: Tally) -> dict[str, int | float]:
    """A tally as flat numbers (the fields of its Redis hash)."""
    out: dict[str, int | float] = {}
    for name, n in t.outcomes.items():
        if n:
            out["o:" + name] = n
    for name in _TALLY_INTS:
        n = getattr(t, name)
        if n:
            out[name] = n
    for name in _TALLY_FLOATS:
        v = getattr(t, name)
        if v:
            out[name] = v
    if t.delta_max:
        out[_TALLY_MAX] = t.delta_max
    for pair, n in t.confusion.items():
        out["c:" + orjson.dumps(pair).decode()] = n
    for i, n in t.live_hist.items():
        out[f"lh:{i}"] = n
    for i, n in t.shadow_hist.items():
        out[f"sh:{i}"] = n
    return out


def _tally_ops(now: dict[str, int | float], base: dict[str, int | float]
               ) -> Iterable[tuple[str, str, int | float]]:
    """The ops turning `base`'s published fields into `now`'s (a max for the max)."""
    for name, value in now.items():
        if name == _TALLY_MAX:
            if value > base.get(name, 0.0):
                yield "x", name, value
            continue
        d = value - base.get(name, 0)
        if d:
            yield ("f" if name in _FLOAT_FIELDS else "i"), name, d


def _set_tally_field(t: Tally, name: str, raw: str) -> None:
    if name.startswith("o:"):
        outcome = name[2:]
        if outcome in t.outcomes:
            t.outcomes[outcome] += int(raw)
    elif name.startswith("c:"):
        live, shadow = orjson.loads(name[2:])
        t.confusion[(str(live), str(shadow))] = int(raw)
    elif name.startswith("lh:"):
        t.live_hist[int(name[3:])] = int(raw)
    elif name.startswith("sh:"):
        t.shadow_hist[int(name[3:])] = int(raw)
    elif name in _FLOAT_FIELDS or name == _TALLY_MAX:
        setattr(t, name, float(raw))
    elif name in _TALLY_INTS:
        setattr(t, name, int(raw))


@functools.lru_cache(maxsize=1 << 16)
def _split(field: str) -> tuple[tuple[str, str], str] | None:
    """A hash field as ((route, backend), name); the same few thousand come every second."""
    parts = field.split(SEP, 2)
    if len(parts) != 3:
        return None
    return (parts[0], parts[1]), parts[2]


_REQUESTS, _ERRORS, _LATENCY, _HIST, _COUNTER = range(5)
_SLOT_CODES = {"n": _REQUESTS, "e": _ERRORS, "l": _LATENCY}


@functools.lru_cache(maxsize=1 << 16)
def _slot_field(field: str) -> tuple[tuple[str, str], int, Any] | None:
    """A per-second metrics field as ((route, backend), what, bucket or counter name)."""
    parsed = _split(field)
    if parsed is None:
        return None
    key, name = parsed
    code = _SLOT_CODES.get(name)
    if code is not None:
        return key, code, None
    if name.startswith("c:"):
        return key, _COUNTER, name[2:]
    if name[:1] == "h" and name[1:].isdigit() and int(name[1:]) < N_BUCKETS:
        return key, _HIST, int(name[1:])
    return None


def _pairs(flat: list[str]) -> Iterable[tuple[tuple[str, str], str, str]]:
    """((route, backend), name, value) of a hash read as [field, value, field, value...]."""
    it = iter(flat)
    for field, value in zip(it, it, strict=True):
        parsed = _split(field)
        if parsed is not None:
            yield parsed[0], parsed[1], value


def _copy_tally(t: Tally) -> Tally:
    out = Tally(t.second, t.max_confusion)
    out.merge(t)
    return out


# -- publishing ---------------------------------------------------------------------------------
# KEYS: this member's last applied batch, the late version, the late set, then the data keys
# ARGV: batch number, ttl of those three, late seconds kept, then the batch as JSON:
#       [[late second...], [op, index into KEYS, field, value, op, ...]] (values as strings:
#       Lua numbers would lose digits)
# -> 1 applied now, 0 applied before (a retry)
_APPLY = """
local last = redis.call('GET', KEYS[1])
if last and tonumber(last) >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
local batch = cjson.decode(ARGV[4])
local late, ops = batch[1], batch[2]
if #late > 0 then
  local version = redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  for i = 1, #late do redis.call('ZADD', KEYS[3], version, late[i]) end
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(tonumber(ARGV[3]) + 1))
  redis.call('EXPIRE', KEYS[3], ARGV[2])
end
for i = 1, #ops, 4 do
  local op, key, field, value = ops[i], KEYS[ops[i + 1]], ops[i + 2], ops[i + 3]
  if op == 'i' then
    redis.call('HINCRBY', key, field, value)
  elseif op == 'f' then
    redis.call('HINCRBYFLOAT', key, field, value)
  elseif op == 'x' or op == 'n' then
    local current = redis.call('HGET', key, field)
    if not current or (op == 'x' and tonumber(current) < tonumber(value))
        or (op == 'n' and tonumber(current) > tonumber(value)) then
      redis.call('HSET', key, field, value)
    end
  elseif op == 't' then
    redis.call('EXPIRE', key, value)
  elseif op == 'h' then
    redis.call('HSET', key, field, value)
  end
end
return 1
"""
_FIXED_KEYS = 3

# KEYS: the late version, the late set, then hashes; ARGV: the late version already seen, then
#       the version of each hash already read ('' if none)
# -> {version, late seconds and their versions as JSON, then per hash: '=' if its version is
#    the one already read, '' if absent, else the hash as JSON}: a few bulk strings for orjson
#    instead of thousands of RESP lines for redis-py, and nothing for a second read before
_READ = """
local out = {redis.call('GET', KEYS[1]) or '0',
             cjson.encode(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf',
                                     'WITHSCORES'))}
for i = 3, #KEYS do
  local known = ARGV[i - 1]
  if known ~= '' and redis.call('HGET', KEYS[i], '#v') == known then
    out[i] = '='
  else
    local h = redis.call('HGETALL', KEYS[i])
    if #h == 0 then out[i] = '' else out[i] = cjson.encode(h) end
  end
end
return out
"""
VERSION = "#v"  # a per-second hash's field naming the last batch that changed it


class _Batch:
    """One publish: the script's keys and ops, and the marks to set once applied."""

    __slots__ = ("seq", "keys", "args", "late", "commits", "ops", "full", "_expiring")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.keys: dict[str, int] = {}
        self.args: list[str | int] = []
        self.late: set[int] = set()
        self.commits: list[Callable[[], None]] = []
        self.ops = 0
        self.full = False  # stopped at MAX_OPS: more is waiting
        self._expiring: set[str] = set()

    def add(self, op: str, key: str, field: str, value: int | float | str) -> None:
        idx = self.keys.get(key)
        if idx is None:
            idx = self.keys[key] = len(self.keys) + _FIXED_KEYS + 1
        self.args += (op, idx, field, repr(value) if isinstance(value, float) else str(value))
        self.ops += 1

    def expire(self, key: str, ttl: int, *, version: str | None = None) -> None:
        """Once per key and batch. Relative to our clock, not Redis': skew does not matter.
        `version` (unique to this batch) goes into the hash's VERSION field, so that readers
        fetch the hash again only once it changed."""
        if key not in self._expiring:
            self._expiring.add(key)
            self.add("t", key, "", max(1, ttl))
            if version is not None:
                self.add("h", key, VERSION, version)

    def payload(self) -> bytes:
        return orjson.dumps([sorted(self.late), self.args])


class _ShadowMark:
    __slots__ = ("second", "fields", "covered")

    def __init__(self, second: int, fields: dict[str, int | float], covered: float) -> None:
        self.second = second
        self.fields = fields  # the cumulative tally published, as fields
        self.covered = covered  # the published total counts everything since this time


# -- the cluster views --------------------------------------------------------------------------
class _ClusterBackend:
    """A backend's cluster-wide numbers: the mirror's merged slots and the summed totals."""

    __slots__ = ("owner", "key", "mirror")

    def __init__(self, owner: ClusterMetrics, key: tuple[str, str], mirror: BackendStats
                 ) -> None:
        self.owner = owner
        self.key = key
        self.mirror = mirror

    def window(self, seconds: float, now: float | None = None) -> WindowSummary:
        return self.mirror.window(seconds, self.owner.now() if now is None else now)

    def series(self, seconds: int, step: int, now: float | None = None) -> list[WindowSummary]:
        return self.mirror.series(seconds, step, self.owner.now() if now is None else now)

    def totals(self) -> Totals:
        return self.owner.totals_of(self.key)


class _ClusterShadow:
    """A shadow's cluster-wide tallies: completed seconds only (the current one is not
    published yet)."""

    __slots__ = ("owner", "key", "_cache", "_cache_key")

    def __init__(self, owner: ClusterMetrics, key: tuple[str, str]) -> None:
        self.owner = owner
        self.key = key
        self._cache: dict[int, Tally] = {}
        self._cache_key = (-1, -1)

    @property
    def backend(self) -> str:
        return self.key[1]

    @property
    def window(self) -> float:
        local = self.owner.recorder.find_shadow_stats(*self.key)
        return local.window if local is not None else DEFAULT_SHADOW_WINDOW

    @property
    def since(self) -> float:
        found = self.owner.shadow_since.get(self.key)
        if found is not None:
            return found
        local = self.owner.recorder.find_shadow_stats(*self.key)
        return local.since if local is not None else self.owner.clock()

    @property
    def total(self) -> Tally:
        found = self.owner.shadow_totals.get(self.key)
        return _copy_tally(found) if found is not None else Tally()

    def window_tally(self, seconds: float | None = None) -> Tally:
        span = max(1, min(SHADOW_WINDOW_MAX,
                          math.ceil(self.window if seconds is None else seconds)))
        end = int(self.owner.now())
        key = (end, self.owner.generation)
        if self._cache_key != key:  # merged once per second and read, whoever asks
            self._cache, self._cache_key = {}, key
        merged = self._cache.get(span)
        if merged is None:
            merged = self._cache[span] = Tally()
            seconds_of = self.owner.shadow_slots.get(self.key, {})
            for second in range(end - span + 1, end + 1):
                slot = seconds_of.get(second)
                if slot is not None:
                    merged.merge(slot)
        return _copy_tally(merged)

    def agreement(self, seconds: float) -> tuple[int, float | None]:
        tally = self.window_tally(seconds)
        return tally.compared, tally.agreement_rate


class ClusterMetrics:
    """The sum of every process's numbers: this process publishes its own to Redis and
    mirrors everyone's (see the module docstring for keys, timing and failure handling)."""

    cluster = True
    lag = 1.0

    def __init__(self, redis: aioredis.Redis, namespace: str, member: str, recorder: Recorder,
                 *, clock: Callable[[], float] = time.time, interval: float = 1.0) -> None:
        if not 0 < interval <= 1.0:
            raise ValueError("interval must be more than 0 and at most 1 s")
        self.redis = redis
        self.namespace = namespace
        self.member = member
        self.recorder = recorder
        self.clock = clock
        self.interval = interval
        ns = namespace
        self._k_shtot = f"{ns}:sh:tot"
        self._k_late = f"{ns}:m:late"
        self._k_latever = f"{ns}:m:latever"
        self._k_seq = f"{ns}:m:seq:{member}"
        self._apply_script = redis.register_script(_APPLY)
        self._read_script = redis.register_script(_READ)
        # publishing
        self._seq = 0
        self._pending: _Batch | None = None
        self._marks: dict[tuple[str, str], int] = {}  # every slot up to this second is out
        self._shadow_marks: dict[tuple[str, str], _ShadowMark] = {}
        # the mirror
        self._mirrors: dict[tuple[str, str], BackendStats] = {}
        self._views: dict[tuple[str, str], _ClusterBackend] = {}
        self._shadow_views: dict[tuple[str, str], _ClusterShadow] = {}
        self._sums: dict[tuple[str, str], Slot] = {}  # running sums of every second read
        self._totals: dict[tuple[str, str], tuple[int, Totals]] = {}  # by generation
        self.shadow_slots: dict[tuple[str, str], dict[int, Tally]] = {}
        self.shadow_totals: dict[tuple[str, str], Tally] = {}
        self.shadow_since: dict[tuple[str, str], float] = {}
        self.generation = 0  # one more at every read: cached merges are stale
        self._read_upto: int | None = None  # the last completed second read
        self._versions: dict[tuple[str, int], str] = {}  # of each second read
        self._late_seen = 0
        self._tasks: list[asyncio.Task[None]] = []

    # -- the views ------------------------------------------------------------------------------
    def now(self) -> float:
        """The end of the freshest complete window: the last second that is over."""
        return self.clock() - self.lag

    def _mirror(self, key: tuple[str, str]) -> BackendStats:
        found = self._mirrors.get(key)
        if found is None:
            found = self._mirrors[key] = BackendStats(key[0], key[1], self.clock)
        return found

    def totals_of(self, key: tuple[str, str]) -> Totals:
        """The running sums of every second read (built once per read, on demand)."""
        found = self._totals.get(key)
        if found is not None and found[0] == self.generation:
            return found[1]
        sums = self._sums.get(key)
        totals = EMPTY if sums is None else Totals(
            sums.requests, sums.errors, sums.latency_sum, tuple(sums.hist),
            tuple(sums.counters.items()))
        self._totals[key] = (self.generation, totals)
        return totals

    def backend(self, route: str, backend: str) -> BackendView:
        key = (route, backend)
        found = self._views.get(key)
        if found is None:
            found = self._views[key] = _ClusterBackend(self, key, self._mirror(key))
        return found

    def shadow(self, route: str, backend: str) -> ShadowView | None:
        key = (route, backend)
        found = self._shadow_views.get(key)
        if found is None:
            if (self.recorder.find_shadow_stats(route, backend) is None
                    and key not in self.shadow_slots and key not in self.shadow_totals):
                return None  # nobody has compared against it
            found = self._shadow_views[key] = _ClusterShadow(self, key)
        return found

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            async with asyncio.timeout(5.0):
                await self.read_once()  # the history, before anyone asks
        except (*UNREACHABLE, TimeoutError) as exc:
            log.warning("cluster metrics: cannot load the history yet (%s); will retry", exc)
        self._tasks = [
            asyncio.create_task(self._loop(self.publish_once, PUBLISH_AT, "publish"),
                                name="modelgate-metrics-publisher"),
            asyncio.create_task(self._loop(self.read_once, READ_AT, "read"),
                                name="modelgate-metrics-reader"),
        ]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(tasks)
        # This process's last numbers, the current second included: no more traffic comes.
        try:
            async with asyncio.timeout(STOP_FLUSH_TIMEOUT):
                await self.publish_once(final=True)
        except (*UNREACHABLE, TimeoutError) as exc:
            log.warning("cluster metrics: last publish failed (%s)", exc)

    async def _loop(self, step: Callable[[], Awaitable[None]], at: float, what: str) -> None:
        """Run `step` every interval at `at` of it; back off while Redis fails, log once per
        outage, and never let an error end the loop."""
        failures = 0
        while True:
            if failures:
                delay = min(BACKOFF_MAX, self.interval * 2 ** (failures - 1))
            else:
                t = self.clock()
                target = math.floor(t / self.interval) * self.interval + at * self.interval
                while target <= t:
                    target += self.interval
                # never less than a fifth of the interval: a stopped clock must not spin us
                delay = max(target - t, self.interval / 5)
            await asyncio.sleep(delay)
            try:
                await step()
            except UNREACHABLE as exc:
                failures += 1
                if failures == 1:
                    log.warning("cluster metrics: cannot %s (%s); retrying, nothing is lost",
                                what, exc, extra={"event": "cluster_metrics_down"})
                continue
            except Exception:
                failures += 1
                if failures == 1:
                    log.exception("cluster metrics: %s failed", what)
                continue
            if failures:
                log.info("cluster metrics: %s works again", what,
                         extra={"event": "cluster_metrics_up"})
                failures = 0

    # -- publishing -----------------------------------------------------------------------------
    async def publish_once(self, *, final: bool = False) -> None:
        """Push what this process observed since the last confirmed push (`final`: the
        current second too). Raises on a Redis error; the next call sends the same batch."""
        while True:
            batch = self._pending  # one whose outcome is unknown goes first, unchanged
            fresh = batch is None
            if batch is None:
                batch = self._pending = self._build(self.clock(), final)
            if batch.ops or batch.late:
                keys = [self._k_seq, self._k_latever, self._k_late, *batch.keys]
                await self._apply_script(keys=keys, args=[batch.seq, SEQ_TTL, LATE_KEEP,
                                                          batch.payload()])
            self._pending = None
            for commit in batch.commits:
                commit()
            if fresh and not batch.full:
                return

    def _build(self, now: float, final: bool) -> _Batch:
        self._seq += 1
        batch = _Batch(self._seq)
        current = int(now)
        done = current if final else current - 1  # the last second no one writes to any more
        late_before = current - 2  # readers re-read the three last seconds; older: flag them
        stamp = f"{self.member}:{batch.seq}"
        ns = self.namespace
        oldest = done - WINDOW_SLOTS + 1
        for stats in self.recorder.all_stats():
            key = (stats.route, stats.backend)
            mark = self._marks.get(key)
            prefix = f"{stats.route}{SEP}{stats.backend}{SEP}"
            last = max(mark if mark is not None else oldest - 1, oldest - 1)
            for second in range(last + 1, done + 1):
                if batch.ops >= MAX_OPS:
                    batch.full = True
                    break
                last = second
                slot = stats.slot_at(second)
                if slot is None:
                    continue
                k = f"{ns}:m:s:{second}"
                before = batch.ops
                for op, name, value in _slot_fields(slot):
                    batch.add(op, k, prefix + name, value)
                if batch.ops != before:
                    batch.expire(k, second + METRICS_KEEP - current, version=stamp)
                    if second < late_before:
                        batch.late.add(second)
            batch.commits.append(_set_mark(self._marks, key, last))
        for shadow in self.recorder.all_shadow_stats():
            key = (shadow.route, shadow.backend)
            smark = self._shadow_marks.get(key)
            prefix = f"{shadow.route}{SEP}{shadow.backend}{SEP}"
            first = done - min(SHADOW_WINDOW_MAX, max(1, math.ceil(shadow.window))) + 1
            last = max(smark.second if smark is not None else first - 1, first - 1)
            for second in range(last + 1, done + 1):
                if batch.ops >= MAX_OPS:
                    batch.full = True
                    break
                last = second
                tally = shadow.slot_at(second)
                if tally is None:
                    continue
                k = f"{ns}:sh:s:{second}"
                before = batch.ops
                for op, name, value in _tally_ops(_tally_fields(tally), {}):
                    batch.add(op, k, prefix + name, value)
                if batch.ops != before:
                    batch.expire(k, second + SHADOW_KEEP - current, version=stamp)
                    if second < late_before:
                        batch.late.add(second)
            fields = _tally_fields(shadow.total)
            published = smark.fields if smark is not None else {}
            covered = smark.covered if smark is not None else shadow.since
            before = batch.ops
            for op, name, value in _tally_ops(fields, published):
                batch.add(op, self._k_shtot, prefix + name, value)
            if batch.ops != before:
                batch.add("n", self._k_shtot, prefix + SINCE, covered)
                batch.expire(self._k_shtot, TOTALS_TTL)
                covered = now
            batch.commits.append(_set_mark(self._shadow_marks, key,
                                           _ShadowMark(last, fields, covered)))
        return batch

    # -- reading --------------------------------------------------------------------------------
    async def read_once(self) -> None:
        """Bring the mirror up to date: recent seconds, late ones, and the totals."""
        done = int(self.clock()) - 1
        first_metrics = done - WINDOW_SLOTS + 1
        first_shadow = done - SHADOW_WINDOW_MAX + 1
        if self._read_upto is not None:
            since = min(self._read_upto, done) - REREAD + 1
            first_metrics = max(first_metrics, since)
            first_shadow = max(first_shadow, since)
        wanted: list[tuple[str, int]] = [("m", s) for s in range(first_metrics, done + 1)]
        wanted += [("sh", s) for s in range(first_shadow, done + 1)]
        version, late, hashes = await self._fetch([self._k_shtot], wanted)
        if version < self._late_seen:  # Redis lost its data: the versions start again
            self._late_seen = 0
            version, late, _ = await self._fetch([], [])
        again: list[tuple[str, int]] = []
        read = set(wanted)
        for second, seen in late:
            self._late_seen = max(self._late_seen, seen)
            for kind, first in (("m", done - WINDOW_SLOTS + 1),
                                ("sh", done - SHADOW_WINDOW_MAX + 1)):
                if first <= second <= done and (kind, second) not in read:
                    again.append((kind, second))
        if again:
            _, _, extra = await self._fetch([], again)
            wanted += again
            hashes += extra
        # Everything is in: apply it in one go (no await from here on).
        self._apply_shadow_totals(hashes[0] or [])
        versions = self._versions
        for ks, fields in zip(wanted, hashes[1:], strict=True):
            if not fields:
                continue  # unchanged since we read it, or absent
            it = iter(fields)
            versions[ks] = next((v for f, v in zip(it, it, strict=True) if f == VERSION), "")
            if ks[0] == "m":
                self._apply_second(ks[1], fields)
            else:
                self._apply_shadow_second(ks[1], fields)
        if len(versions) > WINDOW_SLOTS + SHADOW_KEEP:
            oldest = done - SHADOW_KEEP
            self._versions = {ks: v for ks, v in versions.items() if ks[1] >= oldest}
        self._prune_shadow(done - SHADOW_WINDOW_MAX)
        self._read_upto = done
        self.generation += 1

    async def _fetch(self, keys: list[str], seconds: list[tuple[str, int]]
                     ) -> tuple[int, list[tuple[int, int]], list[list[str] | None]]:
        """(late version, late seconds newer than those seen with their version, the hashes
        `keys` then those of `seconds` as flat field, value lists; None for a second that did
        not change since it was last read), in chunks."""
        ns = self.namespace
        names = keys + [f"{ns}:{kind}:s:{second}" for kind, second in seconds]
        known = [""] * len(keys) + [self._versions.get(ks, "") for ks in seconds]
        version = 0
        late: list[tuple[int, int]] = []
        hashes: list[list[str] | None] = []
        for start in range(0, max(1, len(names)), READ_CHUNK):
            end = start + READ_CHUNK
            reply = await self._read_script(keys=[self._k_latever, self._k_late, *names[start:end]],
                                            args=[self._late_seen, *known[start:end]])
            if start == 0:
                version = int(reply[0])
                flat = orjson.loads(reply[1])
                if isinstance(flat, list):  # an empty one comes as {}
                    late = [(int(flat[i]), int(float(flat[i + 1])))
                            for i in range(0, len(flat), 2)]
            hashes += [None if raw == b"=" else orjson.loads(raw) if raw else []
                       for raw in reply[2:]]
        return version, late, hashes

    def _apply_shadow_totals(self, flat: list[str]) -> None:
        tallies: dict[tuple[str, str], Tally] = {}
        since: dict[tuple[str, str], float] = {}
        for key, name, value in _pairs(flat):
            if name == SINCE:
                since[key] = float(value)
                continue
            tally = tallies.get(key)
            if tally is None:
                tally = tallies[key] = Tally()
            _set_tally_field(tally, name, value)
        self.shadow_totals = tallies
        self.shadow_since = since

    def _apply_second(self, second: int, flat: list[str]) -> None:
        slots: dict[tuple[str, str], Slot] = {}
        it = iter(flat)
        for field, value in zip(it, it, strict=True):
            parsed = _slot_field(field)
            if parsed is None:
                continue
            key, code, arg = parsed
            slot = slots.get(key)
            if slot is None:
                slot = slots[key] = Slot(second)
            if code == _HIST:
                slot.hist[arg] = int(value)
            elif code == _COUNTER:
                slot.counters[arg] = float(value)
            elif code == _REQUESTS:
                slot.requests = int(value)
            elif code == _ERRORS:
                slot.errors = int(value)
            else:
                slot.latency_sum = float(value)
        for key, slot in slots.items():
            mirror = self._mirror(key)
            old = mirror.slot_at(second)
            # Sums only grow; a smaller one means Redis lost that second: keep what we had.
            if old is not None and not _grew(slot, old):
                continue
            mirror.put_slot(slot)
            sums = self._sums.get(key)
            if sums is None:
                sums = self._sums[key] = Slot(-1)
            _accumulate(sums, slot, old)

    def _apply_shadow_second(self, second: int, flat: list[str]) -> None:
        tallies: dict[tuple[str, str], Tally] = {}
        for key, name, value in _pairs(flat):
            tally = tallies.get(key)
            if tally is None:
                tally = tallies[key] = Tally(second)
            _set_tally_field(tally, name, value)
        for key, tally in tallies.items():
            seconds_of = self.shadow_slots.setdefault(key, {})
            old = seconds_of.get(second)
            if old is not None and _mirrored(tally) < _mirrored(old):
                continue  # Redis lost that second: keep what we had
            seconds_of[second] = tally

    def _prune_shadow(self, before: int) -> None:
        for seconds_of in self.shadow_slots.values():
            if len(seconds_of) > SHADOW_KEEP:
                for second in [s for s in seconds_of if s < before]:
                    del seconds_of[second]


def _grew(new: Slot, old: Slot) -> bool:
    """Whether `new` has all of `old` (a re-read second: later publishes only add)."""
    if new.requests < old.requests or new.errors < old.errors:
        return False
    if any(a < b for a, b in zip(new.hist, old.hist, strict=True)):
        return False
    counters = new.counters
    return all(counters.get(name, 0.0) >= value for name, value in old.counters.items())


def _accumulate(sums: Slot, new: Slot, old: Slot | None) -> None:
    """Add what `new` has beyond `old` (nothing: a second read for the first time)."""
    if old is None:
        old = Slot(-1)
    sums.requests += new.requests - old.requests
    sums.errors += new.errors - old.errors
    sums.latency_sum += new.latency_sum - old.latency_sum
    if new.requests != old.requests:
        hist = sums.hist
        for i, (a, b) in enumerate(zip(new.hist, old.hist, strict=True)):
            if a != b:
                hist[i] += a - b
    counters = sums.counters
    for name, value in new.counters.items():
        d = value - old.counters.get(name, 0.0)
        if d:
            counters[name] = counters.get(name, 0.0) + d


def _mirrored(t: Tally) -> int:
    return sum(t.outcomes.values()) + t.dropped


def _set_mark(marks: dict[tuple[str, str], Any], key: tuple[str, str], mark: Any
              ) -> Callable[[], None]:
    def commit() -> None:
        marks[key] = mark
    return commit


__all__ = ["BackendView", "ClusterMetrics", "LocalMetrics", "MetricsSource",
           "ShadowView", "metrics_source"]
