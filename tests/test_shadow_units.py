"""Shadow config parsing, per-second tallies and the comparison log, tested directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.shadow.compare import Comparison
from gateway.shadow.config import AUTO, LogConfig, ShadowConfig, parse_shadow
from gateway.shadow.log import ComparisonLog
from gateway.shadow.stats import (
    MAX_CONFUSION,
    OTHER,
    SLOT_CONFUSION,
    ShadowStats,
    Tally,
    quantile,
)
from tests.helpers import classifier_config, wait_for

BACKENDS = {"blue", "green"}


def parse(section: dict[str, Any]) -> ShadowConfig:
    return parse_shadow(section, BACKENDS, "routes[0].shadow")


# --------------------------------------------------------------------------------------------
# config


def test_defaults_and_a_section_without_backend() -> None:
    cfg = parse({})
    assert cfg.backend is None and cfg.sample == 0.0
    assert (cfg.timeout, cfg.window, cfg.queue, cfg.senders) == (5.0, 300.0, 1000, 16)
    assert cfg.compare.preset == AUTO and cfg.log is None
    on = parse({"backend": "green"})
    assert on.sample == 100.0


def test_full_section() -> None:
    cfg = parse({
        "backend": "green", "sample": 12.5, "timeout": "250ms", "window": "2m", "queue": 10,
        "queue_bytes": "1MiB", "senders": 2,
        "compare": {"path": "outputs[0].data", "numbers": {"abs_tol": 0.1, "rel_tol": 0.01},
                    "text": {"mode": "similarity", "min_similarity": 0.8},
                    "agree_on": "all", "strings": "text"},
        "log": {"path": "/tmp/x.jsonl", "max_bytes": "1MiB", "backups": 5,
                "redact_bodies": True, "body_limit": "1KiB"},
    })
    assert (cfg.sample, cfg.timeout, cfg.window, cfg.queue_bytes) == (12.5, 0.25, 120.0,
                                                                       1024 * 1024)
    assert cfg.compare.preset is None and cfg.compare.path is not None
    assert cfg.compare.path.text == "outputs[0].data"
    assert cfg.compare.numbers.abs_tol == 0.1 and cfg.compare.text.mode == "similarity"
    assert cfg.log == LogConfig("/tmp/x.jsonl", 1024 * 1024, 5, True, 1024)


@pytest.mark.parametrize(("section", "where"), [
    ({"backend": "red"}, "routes[0].shadow.backend"),
    ({"sample": 101}, "routes[0].shadow.sample"),
    ({"timeout": 0}, "routes[0].shadow.timeout"),
    ({"window": "2h"}, "routes[0].shadow.window"),
    ({"queue": 0}, "routes[0].shadow.queue"),
    ({"senders": "many"}, "routes[0].shadow.senders"),
    ({"bogus": 1}, "routes[0].shadow.bogus"),
    ({"compare": {"preset": "sklearn"}}, "routes[0].shadow.compare.preset"),
    ({"compare": {"preset": "tf_serving", "path": "x"}}, "routes[0].shadow.compare"),
    ({"compare": {"path": "outputs[0"}}, "routes[0].shadow.compare.path"),
    ({"compare": {"numbers": {"abs_tol": -1}}}, "routes[0].shadow.compare.numbers.abs_tol"),
    ({"compare": {"text": {"mode": "fuzzy"}}}, "routes[0].shadow.compare.text.mode"),
    ({"compare": {"agree_on": "most"}}, "routes[0].shadow.compare.agree_on"),
    ({"compare": {"strings": "words"}}, "routes[0].shadow.compare.strings"),
    ({"log": {}}, "routes[0].shadow.log.path"),
    ({"log": {"path": "x", "max_bytes": 10}}, "routes[0].shadow.log.max_bytes"),
    ({"log": {"path": "x", "redact_bodies": "yes"}}, "routes[0].shadow.log.redact_bodies"),
])
def test_errors_name_the_key(section: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(section)
    assert info.value.path == where, info.value


def test_route_config_seeds_the_state() -> None:
    cfg = parse_config(classifier_config("http://127.0.0.1:1", "http://127.0.0.1:2",
                                         shadow={"backend": "green", "sample": 30}))
    assert cfg.routes[0].shadow is not None and cfg.routes[0].shadow.sample == 30.0


def test_demo_config_parses() -> None:
    from gateway.config import load_config

    cfg = load_config(Path(__file__).parent.parent / "configs" / "demo.yaml",
                      env={"MODELGATE_STATE_DIR": "/tmp/state"})
    shadow = cfg.routes[0].shadow
    assert shadow is not None and shadow.backend is None  # turned on at run time
    assert shadow.compare.preset == "kserve_v2"
    assert shadow.log is not None and shadow.log.path == "/tmp/state/shadow-classifier.jsonl"


# --------------------------------------------------------------------------------------------
# stats


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def comparison(labels: list[tuple[str, str]], delta: float = 0.0) -> Comparison:
    c = Comparison("auto")
    c.labels = len(labels)
    c.labels_agree = sum(a == b for a, b in labels)
    c.confusion = labels
    c.numbers = 1
    c.numbers_agree = delta <= 1e-6
    c.delta_sum = c.delta_max = delta
    return c


def test_window_slides_and_totals_stay() -> None:
    clock = Clock()
    stats = ShadowStats("r", "green", window=10, clock=clock)
    stats.record("agree", 0.010, 0.020, comparison([("a", "a"), ("b", "b")], 0.1))
    stats.drop()
    clock.now += 5
    stats.record("disagree", 0.010, 0.030, comparison([("a", "b")], 0.3))
    stats.record("shadow_timeout", None, None, None)
    window = stats.window_tally()
    assert window.compared == 2 and window.dropped == 1
    assert window.agreement_rate == 2 / 3
    assert stats.agreement(10) == (2, 2 / 3)
    assert stats.agreement(3) == (1, 0.0)  # only the last 3 seconds
    clock.now += 7  # the first second has left the 10 s window
    assert stats.agreement(10) == (1, 0.0)
    summary = stats.window_tally().summary()
    assert summary["confusion"] == {"a": {"b": 1}}
    assert summary["shadow_timeouts"] == 1 and summary["dropped"] == 0
    total = stats.total.summary()
    assert total["confusion"] == {"a": {"a": 1, "b": 1}, "b": {"b": 1}}
    assert total["numbers"]["max_delta"] == 0.3
    assert total["numbers"]["mean_delta"] == pytest.approx(0.2)
    assert total["latency"]["shadow"]["count"] == 2
    assert 0.02 <= total["latency"]["shadow"]["p50"] < 0.025
    assert 0.03 <= total["latency"]["shadow"]["p99"] < 0.036
    clock.now += 100  # an old ring slot is reused, not counted twice
    stats.record("agree", 0.01, 0.01, comparison([("a", "a")]))
    assert stats.agreement(10) == (1, 1.0)
    assert stats.total.compared == 3


def test_confusion_is_bounded() -> None:
    tally = Tally()
    for i in range(MAX_CONFUSION + 50):
        tally.add("disagree", None, None, comparison([(f"l{i}", "x")]))
    assert len(tally.confusion) == MAX_CONFUSION + 1
    assert tally.confusion[(OTHER, OTHER)] == 50


def test_window_counts_the_current_second_exactly_while_past_seconds_are_cached() -> None:
    clock = Clock()
    stats = ShadowStats("r", "green", window=10, clock=clock)
    stats.record("agree", 0.01, 0.01, comparison([("a", "a")]))
    clock.now += 1
    for n in range(1, 4):  # the same second: every new pair shows at once
        stats.record("disagree", 0.01, 0.01, comparison([("a", "b")]))
        assert stats.agreement(10) == (1 + n, 1 / (1 + n))
        assert stats.agreement(5) == (1 + n, 1 / (1 + n))  # another span, its own cache
    clock.now += 1
    assert stats.agreement(1) == (0, None)  # the current second has nothing yet
    assert stats.agreement(10) == (4, 0.25)


def test_a_seconds_confusion_pairs_are_capped_lower_than_the_totals() -> None:
    clock = Clock()
    stats = ShadowStats("r", "green", window=300, clock=clock)
    for i in range(SLOT_CONFUSION + 10):
        stats.record("disagree", None, None, comparison([(f"l{i}", "x")]))
    window = stats.window_tally()
    assert len(window.confusion) == SLOT_CONFUSION + 1
    assert window.confusion[(OTHER, OTHER)] == 10
    assert len(stats.total.confusion) == SLOT_CONFUSION + 10  # under MAX_CONFUSION


def test_quantile() -> None:
    assert quantile({}, 0.5) is None
    hist = {10: 99, 40: 1}
    from gateway.metrics import FINE_BOUNDS

    assert quantile(hist, 0.5) == FINE_BOUNDS[10]
    assert quantile(hist, 0.99) == FINE_BOUNDS[10]
    assert quantile(hist, 1.0) == FINE_BOUNDS[40]


# --------------------------------------------------------------------------------------------
# the comparison log


async def test_log_rotation_keeps_backups(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "c.jsonl"
    writer = ComparisonLog(LogConfig(str(path), max_bytes=1024, backups=2))
    await writer.start()
    try:
        for i in range(100):
            assert writer.write(orjson.dumps({"i": i, "pad": "x" * 80}) + b"\n")
        await wait_for(lambda: writer.written == 100, message="100 lines")
    finally:
        await writer.stop()
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["c.jsonl", "c.jsonl.1", "c.jsonl.2"]
    assert all((path.parent / n).stat().st_size <= 1024 for n in names)
    assert all((path.parent / n).stat().st_mode & 0o777 == 0o600 for n in names)
    last = [orjson.loads(line)["i"] for line in path.read_bytes().splitlines()]
    older = [orjson.loads(line)["i"] for line in (path.parent / "c.jsonl.1").read_bytes()
             .splitlines()]
    assert last[-1] == 99 and older[-1] == last[0] - 1  # rotation keeps lines in order


async def test_log_without_backups_truncates(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    writer = ComparisonLog(LogConfig(str(path), max_bytes=1024, backups=0))
    await writer.start()
    try:
        for i in range(50):
            writer.write(orjson.dumps({"i": i, "pad": "x" * 80}) + b"\n")
        await wait_for(lambda: writer.written == 50, message="50 lines")
    finally:
        await writer.stop()
    assert [p.name for p in tmp_path.iterdir()] == ["c.jsonl"]
    assert path.stat().st_size <= 1024


async def test_log_queue_is_bounded_and_flushed_on_stop(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    writer = ComparisonLog(LogConfig(str(path)), max_lines=10, max_bytes=10_000)
    await writer.start()
    # Nothing runs between these writes: the writer cannot drain, the queue bound holds.
    accepted = [writer.write(b'{"n": 1}\n') for _ in range(25)]
    assert accepted.count(True) == 10 and writer.dropped == 15
    await writer.stop()  # flushes what was queued
    assert writer.written == 10
    assert len(path.read_bytes().splitlines()) == 10
    assert not writer.write(b"{}\n")  # closed


async def test_log_write_errors_are_counted(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    writer = ComparisonLog(LogConfig(str(tmp_path / "sub" / "c.jsonl")))
    await writer.start()  # creates tmp_path/sub
    (tmp_path / "sub").rmdir()
    (tmp_path / "sub").symlink_to(blocker)  # now the directory is a file: writes fail
    try:
        writer.write(b"{}\n")
        await wait_for(lambda: writer.errors == 1, message="a write error")
        assert writer.dropped == 1 and writer.written == 0
    finally:
        await writer.stop()
