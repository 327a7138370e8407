"""Config parsing: good files load into frozen objects; every error names its key path."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.config import (
    DEFAULT_ADMIN_LISTEN,
    DEFAULT_LISTEN,
    DEFAULT_MAX_BODY,
    GatewayConfig,
    StickyKey,
    Timeouts,
    load_config,
    parse_config,
)
from gateway.errors import ConfigError

ROOT = Path(__file__).parent.parent


def minimal() -> dict[str, Any]:
    return {
        "routes": [{
            "name": "classifier",
            "match": {"path_prefix": "/v2/models/classifier"},
            "backends": {"blue": {"url": "http://127.0.0.1:9001"},
                         "green": {"url": "http://127.0.0.1:9002"}},
            "live": "blue",
        }]
    }


def full() -> dict[str, Any]:
    return {
        "listen": ["127.0.0.1:8000", "[::1]:8000"],
        "admin": {"listen": "127.0.0.1:8101", "token": "s3cret-admin-token",
                  "tokens": {"ci": "another-secret-token"}},
        "store": "memory",
        "drain_timeout": "5s",
        "access_log_sample": 0.5,
        "routes": [
            {
                "name": "classifier",
                "match": {"path_prefix": "/v2/models/classifier", "host": "Models.Example.com"},
                "backends": {
                    "blue": {"urls": ["http://10.0.0.1:9001/", "http://10.0.0.2:9001"]},
                    "green": {"url": "https://green.internal:8443"},
                },
                "live": "blue",
                "canary": {"backend": "green", "weight": 12.5},
                "sticky": {"cookie": "uid"},
                "override_header": "X-Modelgate-Backend",
                "timeouts": {"connect": "500ms", "read": "2m"},
                "max_body_bytes": "1MiB",
            },
            {
                "name": "chat",
                "match": {"path_prefix": "/v1/chat"},
                "backends": {"a": {"url": "http://127.0.0.1:9003"}},
                "live": "a",
                "sticky": {"query": "user"},
                "max_body_bytes": 2048,
            },
        ],
    }


def error_of(data: Any, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env=env or {})
    return str(info.value)


def broken(change: Callable[[dict[str, Any]], Any]) -> str:
    """The error message of the minimal config after `change` (which edits it in place)."""
    data = minimal()
    change(data)
    return error_of(data)


def route0(data: dict[str, Any]) -> dict[str, Any]:
    route: dict[str, Any] = data["routes"][0]
    return route


# -- good configs --------------------------------------------------------------------------------


def test_minimal_config_gets_the_defaults() -> None:
    config = parse_config(minimal(), env={})
    assert config.listen == (DEFAULT_LISTEN,)
    assert config.admin.listen == DEFAULT_ADMIN_LISTEN
    assert config.admin.tokens == {}
    assert config.store == "memory"
    route = config.routes[0]
    assert route.name == "classifier"
    assert route.path_prefix == "/v2/models/classifier"
    assert route.host is None
    assert route.backends["blue"].urls == ("http://127.0.0.1:9001",)
    assert route.live == "blue"
    assert route.canary is None and route.canary_weight == 0.0
    assert route.sticky is None and route.override_header is None
    assert route.timeouts == Timeouts(connect=2.0, read=30.0)
    assert route.max_body_bytes == DEFAULT_MAX_BODY == 10 * 1024 * 1024
    assert config.route("classifier") is route and config.route("nope") is None


def test_full_config() -> None:
    config = parse_config(full(), env={})
    assert config.listen == (("127.0.0.1", 8000), ("::1", 8000))
    assert config.admin.listen == ("127.0.0.1", 8101)
    assert config.admin.tokens == {"admin": "s3cret-admin-token", "ci": "another-secret-token"}
    assert config.drain_timeout == 5.0
    assert config.access_log_sample == 0.5
    route = config.routes[0]
    assert route.host == "models.example.com"
    assert route.backends["blue"].urls == ("http://10.0.0.1:9001", "http://10.0.0.2:9001")
    assert route.backends["green"].urls == ("https://green.internal:8443",)
    assert (route.canary, route.canary_weight) == ("green", 12.5)
    assert route.sticky == StickyKey("cookie", "uid")
    assert route.override_header == "x-modelgate-backend"
    assert route.timeouts == Timeouts(connect=0.5, read=120.0)
    assert route.max_body_bytes == 1024 * 1024
    chat = config.routes[1]
    assert chat.sticky == StickyKey("query", "user")
    assert chat.max_body_bytes == 2048


def test_config_objects_are_frozen() -> None:
    config = parse_config(minimal(), env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.store = "redis://x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.routes[0].live = "green"  # type: ignore[misc]


@pytest.mark.parametrize("given, expected", [
    ({"read": "250ms"}, Timeouts(connect=2.0, read=0.25)),
    ({"connect": "1s"}, Timeouts(connect=1.0, read=30.0)),
    ({"read": 5}, Timeouts(connect=2.0, read=5.0)),
    ({"read": "1.5s", "connect": "0.1s"}, Timeouts(connect=0.1, read=1.5)),
    ({"read": "1h"}, Timeouts(connect=2.0, read=3600.0)),
])
def test_partial_timeouts_keep_the_other_default(given: dict[str, Any], expected: Timeouts
                                                 ) -> None:
    data = minimal()
    route0(data)["timeouts"] = given
    assert parse_config(data, env={}).routes[0].timeouts == expected


@pytest.mark.parametrize("given, expected", [
    (1000, 1000), ("64kb", 64_000), ("64KiB", 65_536), ("10MiB", 10 * 1024**2),
    ("1.5mb", 1_500_000), ("1GiB", 1024**3), (0, 0),
])
def test_sizes(given: Any, expected: int) -> None:
    data = minimal()
    route0(data)["max_body_bytes"] = given
    assert parse_config(data, env={}).routes[0].max_body_bytes == expected


def test_listen_forms() -> None:
    for given, expected in [
        ("127.0.0.1:8000", (("127.0.0.1", 8000),)),
        (":8000", (("0.0.0.0", 8000),)),
        ("[::1]:8080", (("::1", 8080),)),
        (8000, (("127.0.0.1", 8000),)),
        ("127.0.0.1:0", (("127.0.0.1", 0),)),
    ]:
        data = minimal()
        data["listen"] = given
        assert parse_config(data, env={}).listen == expected, given


def test_canary_weight_hundredths_are_fine() -> None:
    data = minimal()
    route0(data)["canary"] = {"backend": "green", "weight": 0.01}
    assert parse_config(data, env={}).routes[0].canary_weight == 0.01


def test_demo_config_loads() -> None:
    config = load_config(ROOT / "configs" / "demo.yaml",
                         env={"MODELGATE_BLUE_PORT": "9101", "MODELGATE_GREEN_PORT": "9102"})
    route = config.route("classifier")
    assert route is not None
    assert route.backends["blue"].urls == ("http://127.0.0.1:9101",)
    assert route.backends["green"].urls == ("http://127.0.0.1:9102",)
    assert route.sticky == StickyKey("header", "x-user-id")
    assert config.listen == (("127.0.0.1", 8000),)
    assert config.admin.tokens == {}  # ${MODELGATE_ADMIN_TOKEN:-} empty: generated at start


# -- ${ENV} --------------------------------------------------------------------------------------


def test_env_substitution_with_value_and_default() -> None:
    data = minimal()
    route0(data)["backends"]["green"]["url"] = "http://${GREEN_HOST}:${GREEN_PORT:-9002}"
    data["listen"] = "${LISTEN:-127.0.0.1:7000}"
    config = parse_config(data, env={"GREEN_HOST": "10.1.2.3"})
    assert config.routes[0].backends["green"].urls == ("http://10.1.2.3:9002",)
    assert config.listen == (("127.0.0.1", 7000),)
    config = parse_config(data, env={"GREEN_HOST": "h", "GREEN_PORT": "1234",
                                     "LISTEN": ":9"})
    assert config.routes[0].backends["green"].urls == ("http://h:1234",)
    assert config.listen == (("0.0.0.0", 9),)


def test_env_substitution_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.setenv("MG_TEST_GREEN_URL", "http://10.9.9.9:1")
    data = minimal()
    route0(data)["backends"]["green"]["url"] = "${MG_TEST_GREEN_URL}"
    assert parse_config(data).routes[0].backends["green"].urls == ("http://10.9.9.9:1",)


def test_unset_env_variable_is_an_error_naming_the_key() -> None:
    data = minimal()
    route0(data)["backends"]["green"]["url"] = "http://h:${GREEN_PORT}"
    assert error_of(data) == (
        "routes[0].backends.green.url: environment variable GREEN_PORT is not set"
    )
    data = minimal()
    data["listen"] = ["127.0.0.1:1", "${SECOND}"]
    assert error_of(data) == "listen[1]: environment variable SECOND is not set"


def test_substituted_value_is_validated_too() -> None:
    data = minimal()
    route0(data)["backends"]["green"]["url"] = "${GREEN_URL}"
    assert error_of(data, env={"GREEN_URL": "ftp://x"}) == (
        "routes[0].backends.green.url: not an http(s) URL: 'ftp://x'"
    )


# -- errors name the key path and the problem ----------------------------------------------------


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        node: Any = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


def _del(path: list[Any]) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        node: Any = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return change


R = ["routes", 0]
GREEN_URL = [*R, "backends", "green", "url"]

ERRORS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("scheme", _set(GREEN_URL, "ftp://x"),
     "routes[0].backends.green.url: not an http(s) URL: 'ftp://x'"),
    ("no scheme", _set(GREEN_URL, "127.0.0.1:9002"),
     "routes[0].backends.green.url: not an http(s) URL: '127.0.0.1:9002'"),
    ("not a string", _set(GREEN_URL, 5),
     "routes[0].backends.green.url: not an http(s) URL: 5"),
    ("credentials", _set(GREEN_URL, "http://user:secret@x:9002"),
     "routes[0].backends.green.url: credentials in a backend URL are not supported"),
    ("bad port", _set(GREEN_URL, "http://x:99999"),
     "routes[0].backends.green.url: bad port in URL: 'http://x:99999'"),
    ("url in list", _set([*R, "backends", "green"], {"urls": ["http://a:1", "gopher://b"]}),
     "routes[0].backends.green.urls[1]: not an http(s) URL: 'gopher://b'"),
    ("empty urls", _set([*R, "backends", "green"], {"urls": []}),
     "routes[0].backends.green.urls: needs at least one URL"),
    ("url and urls", _set([*R, "backends", "green"], {"url": "http://a:1", "urls": ["http://b"]}),
     "routes[0].backends.green: give exactly one of 'url' or 'urls'"),
    ("backend not a mapping", _set([*R, "backends", "green"], "http://a:1"),
     "routes[0].backends.green: expected a mapping, got a string"),
    ("unknown key in backend", _set([*R, "backends", "green", "weight"], 3),
     "routes[0].backends.green.weight: unknown key"),
    ("bad backend name", _set([*R, "backends", "bad name"], {"url": "http://a:1"}),
     "routes[0].backends.bad name: not a valid backend name: 'bad name'"),
    ("no backends", _set([*R, "backends"], {}), "routes[0].backends: needs at least one backend"),
    ("unknown top key", _set(["listne"], ":8000"), "listne: unknown key"),
    ("unknown route key", _set([*R, "canery"], {}), "routes[0].canery: unknown key"),
    ("unknown match key", _set([*R, "match", "path"], "/x"), "routes[0].match.path: unknown key"),
    ("unknown timeout key", _set([*R, "timeouts"], {"raed": "1s"}),
     "routes[0].timeouts.raed: unknown key"),
    ("unknown admin key", _set(["admin"], {"port": 8001}), "admin.port: unknown key"),
    ("missing name", _del([*R, "name"]), "routes[0].name: required"),
    ("missing match", _del([*R, "match"]), "routes[0].match: required"),
    ("missing prefix", _set([*R, "match"], {}), "routes[0].match.path_prefix: required"),
    ("missing live", _del([*R, "live"]), "routes[0].live: required"),
    ("missing canary backend", _set([*R, "canary"], {"weight": 5}),
     "routes[0].canary.backend: required"),
    ("prefix without slash", _set([*R, "match", "path_prefix"], "v2/models"),
     "routes[0].match.path_prefix: must start with '/'"),
    ("bad route name", _set([*R, "name"], "my route"),
     "routes[0].name: not a valid name: 'my route'"),
    ("live unknown", _set([*R, "live"], "red"), "routes[0].live: unknown backend 'red'"),
    ("canary unknown", _set([*R, "canary"], {"backend": "red", "weight": 5}),
     "routes[0].canary.backend: unknown backend 'red'"),
    ("canary is live", _set([*R, "canary"], {"backend": "blue", "weight": 5}),
     "routes[0].canary.backend: canary must differ from live"),
    ("weight over", _set([*R, "canary"], {"backend": "green", "weight": 101}),
     "routes[0].canary.weight: must be a number from 0 to 100, got 101"),
    ("weight under", _set([*R, "canary"], {"backend": "green", "weight": -1}),
     "routes[0].canary.weight: must be a number from 0 to 100, got -1"),
    ("weight text", _set([*R, "canary"], {"backend": "green", "weight": "ten"}),
     "routes[0].canary.weight: expected a number, got 'ten'"),
    ("weight bool", _set([*R, "canary"], {"backend": "green", "weight": True}),
     "routes[0].canary.weight: expected a number, got True"),
    ("weight below 0.01", _set([*R, "canary"], {"backend": "green", "weight": 1e-9}),
     "routes[0].canary.weight: resolution is 0.01, got 1e-09"),
    ("weight too fine", _set([*R, "canary"], {"backend": "green", "weight": 10.005}),
     "routes[0].canary.weight: resolution is 0.01, got 10.005"),
    ("two sticky sources", _set([*R, "sticky"], {"header": "x-user-id", "cookie": "uid"}),
     "routes[0].sticky: give exactly one of 'header', 'cookie', 'query'"),
    ("empty sticky name", _set([*R, "sticky"], {"query": ""}),
     "routes[0].sticky.query: expected a non-empty string, got ''"),
    ("bad duration", _set([*R, "timeouts"], {"read": "soon"}),
     "routes[0].timeouts.read: expected a duration like '500ms', '30s' or '2m', got 'soon'"),
    ("negative duration", _set([*R, "timeouts"], {"connect": -1}),
     "routes[0].timeouts.connect: duration must be >= 0, got -1"),
    ("zero timeout", _set([*R, "timeouts"], {"read": 0}), "routes[0].timeouts.read: must be > 0"),
    ("duration bool", _set(["drain_timeout"], True),
     "drain_timeout: expected a duration like '500ms', '30s' or '2m', got True"),
    ("bad size", _set([*R, "max_body_bytes"], "10 elephants"),
     "routes[0].max_body_bytes: expected a size like '10MiB', got '10 elephants'"),
    ("negative size", _set([*R, "max_body_bytes"], -5),
     "routes[0].max_body_bytes: size must be >= 0"),
    ("float size", _set([*R, "max_body_bytes"], 1.5),
     "routes[0].max_body_bytes: expected a size like '10MiB', got 1.5"),
    ("listen garbage", _set(["listen"], "nope"), "listen: expected 'host:port', got 'nope'"),
    ("listen port", _set(["listen"], "127.0.0.1:70000"), "listen: bad port in '127.0.0.1:70000'"),
    ("listen no port", _set(["listen"], "127.0.0.1:"), "listen: bad port in '127.0.0.1:'"),
    ("listen list item", _set(["listen"], ["127.0.0.1:1", "x"]),
     "listen[1]: expected 'host:port', got 'x'"),
    ("listen empty", _set(["listen"], []), "listen: needs at least one address"),
    ("admin listen", _set(["admin"], {"listen": "localhost"}),
     "admin.listen: expected 'host:port', got 'localhost'"),
    ("admin token type", _set(["admin"], {"token": 12345678}), "admin.token: expected a string"),
    ("short named token", _set(["admin"], {"tokens": {"ci": "short"}}),
     "admin.tokens.ci: token must be a string of at least 16 characters"),
    ("store", _set(["store"], "postgres://db"),
     "store: expected 'memory' or a redis:// URL, got 'postgres://db'"),
    ("routes not a list", _set(["routes"], {"classifier": {}}),
     "routes: expected a list, got a mapping"),
    ("route not a mapping", _set(["routes"], ["classifier"]),
     "routes[0]: expected a mapping, got a string"),
    ("access log sample", _set(["access_log_sample"], 2),
     "access_log_sample: must be between 0 and 1, got 2"),
]


@pytest.mark.parametrize("change, expected", [(c, e) for _, c, e in ERRORS],
                         ids=[name for name, _, _ in ERRORS])
def test_error_names_key_path_and_problem(change: Callable[[dict[str, Any]], None],
                                          expected: str) -> None:
    assert broken(change) == expected


def test_error_carries_path_and_problem_separately() -> None:
    data = minimal()
    route0(data)["backends"]["green"]["url"] = "ftp://x"
    with pytest.raises(ConfigError) as info:
        parse_config(data, env={})
    assert info.value.path == "routes[0].backends.green.url"
    assert info.value.problem == "not an http(s) URL: 'ftp://x'"


def test_second_route_errors_name_its_index() -> None:
    data = minimal()
    second = copy.deepcopy(route0(data))
    second["name"] = "other"
    second["match"] = {"path_prefix": "/other"}
    second["live"] = "purple"
    data["routes"].append(second)
    assert error_of(data) == "routes[1].live: unknown backend 'purple'"


def test_duplicate_route_names() -> None:
    data = minimal()
    second = copy.deepcopy(route0(data))
    second["match"] = {"path_prefix": "/elsewhere"}
    data["routes"].append(second)
    assert error_of(data) == "routes[1].name: duplicate route name 'classifier'"


def test_two_routes_with_the_same_match() -> None:
    data = minimal()
    second = copy.deepcopy(route0(data))
    second["name"] = "shadowing"
    data["routes"].append(second)
    assert error_of(data) == "routes[1].match: another route has the same host and prefix"
    second["match"]["host"] = "a.example.com"  # same prefix on another host is fine
    assert len(parse_config(data, env={}).routes) == 2


def test_top_level_must_be_a_mapping() -> None:
    assert error_of(["routes"]) == "(top): expected a mapping, got a list"


# -- files ---------------------------------------------------------------------------------------


def test_load_config_from_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        "listen: 127.0.0.1:8100\n"
        "routes:\n"
        "  - name: classifier\n"
        "    match: {path_prefix: /v2/models/classifier}\n"
        "    backends:\n"
        "      blue: {url: 'http://127.0.0.1:${BLUE_PORT:-9001}'}\n"
        "    live: blue\n"
        "    timeouts: {read: 10s}\n"
    )
    config = load_config(path, env={})
    assert isinstance(config, GatewayConfig)
    assert config.source == str(path)
    assert config.listen == (("127.0.0.1", 8100),)
    assert config.routes[0].backends["blue"].urls == ("http://127.0.0.1:9001",)
    assert config.routes[0].timeouts.read == 10.0


def test_empty_file_is_an_empty_config(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path, env={}).routes == ()


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "cannot read" in message
    assert "No such file" in message


def test_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("routes:\n  - name: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not valid YAML")
    assert "line" in message  # points at where the parser gave up


def test_file_errors_name_the_key_path(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        "routes:\n"
        "  - name: classifier\n"
        "    match: {path_prefix: /v2}\n"
        "    backends:\n"
        "      blue: {url: 'http://127.0.0.1:9001'}\n"
        "      green: {url: 'green-host:9002'}\n"
        "    live: blue\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == (
        "routes[0].backends.green.url: not an http(s) URL: 'green-host:9002'"
    )


def test_an_empty_key_means_absent(tmp_path: Path) -> None:
    """`timeouts:` with nothing after it (YAML null) keeps the defaults, as it always did."""
    text = """
listen: 127.0.0.1:0
admin:
webhooks:
routes:
  - name: r
    match: {path_prefix: /}
    backends: {blue: {url: "http://127.0.0.1:1"}}
    live: blue
    timeouts:
    shadow:
"""
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    config = load_config(path)
    assert config.routes[0].timeouts.read == 30.0
    assert config.routes[0].shadow is None and config.webhooks == ()


def test_numeric_backend_names_and_absurd_sizes() -> None:
    """YAML reads `1:` as a number: backend names stay text, as they always did. A size too
    large for a float is a key-path error, not a traceback."""
    data = minimal()
    route = data["routes"][0]
    url = next(iter(route["backends"].values()))["url"]
    route["backends"] = {1: {"url": url}, 2: {"url": url}}
    route["live"] = "1"
    assert list(parse_config(data).routes[0].backends) == ["1", "2"]
    route["max_body_bytes"] = "9" * 400 + "gb"
    assert error_of(data).startswith("routes[0].max_body_bytes: size too large")
