"""The config file's JSON Schema (`modelgate config-schema`) and values typed after ${ENV}.

The schema comes from the same models that load the file, so every config shipped in the
repository must pass both: the schema (what an editor checks) and the models (what the
gateway checks).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway.cli import main
from gateway.config import config_schema, load_config, parse_config
from gateway.errors import ConfigError
from tests.test_config import full, minimal

ROOT = Path(__file__).parent.parent
# Gateway configs only: deploy/ also holds Compose, Kubernetes and Prometheus documents.
SHIPPED = sorted([*ROOT.glob("configs/*.yaml"), ROOT / "deploy" / "gateway.yaml"])
# What deploy/gateway.yaml needs from the environment (the manifests set these).
DEPLOY_ENV = {"MODELGATE_BLUE_URL": "http://blue:9001", "MODELGATE_GREEN_URL": "http://green:9002"}


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = config_schema()
    jsonschema.Draft202012Validator.check_schema(schema)  # a valid draft 2020-12 document
    return jsonschema.Draft202012Validator(schema)


def problems(validator: jsonschema.Draft202012Validator, data: Any) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(data)]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_pass_the_schema_and_the_models(
        path: Path, validator: jsonschema.Draft202012Validator) -> None:
    assert problems(validator, yaml.safe_load(path.read_text())) == []
    load_config(path, env=DEPLOY_ENV)


def test_there_are_shipped_configs() -> None:
    assert any(p.name == "demo.yaml" for p in SHIPPED)


def test_documents_of_the_test_suite_pass_the_schema(
        validator: jsonschema.Draft202012Validator) -> None:
    for data in (minimal(), full()):
        assert problems(validator, data) == []
        parse_config(data, env={})


@pytest.mark.parametrize("change", [
    lambda d: d.update(listne=":8000"),                                   # unknown key
    lambda d: d["routes"][0].update(live=None),                           # wrong type
    lambda d: d["routes"][0]["backends"]["blue"].update(weight=3),        # unknown key
    lambda d: d["routes"][0].update(max_body_bytes="10 elephants"),       # not a size
    lambda d: d["routes"][0].update(timeouts={"read": "soon"}),           # not a duration
    lambda d: d.update(access_log_sample=2),                              # out of range
    lambda d: d["routes"][0].update(shadow={"compare": {"preset": "x"}}),  # not an enum value
    lambda d: d["routes"][0].update(rollout={"gates": {"max_errors": 1}}),
    lambda d: d.update(alarms=[{"name": "a", "route": "classifier", "metric": "happiness",
                                "threshold": 1}]),
])
def test_the_schema_refuses_what_the_models_refuse(
        change: Any, validator: jsonschema.Draft202012Validator) -> None:
    data = minimal()
    change(data)
    assert problems(validator, data) != []
    with pytest.raises(ConfigError):
        parse_config(data, env={})


def test_placeholders_pass_the_schema(validator: jsonschema.Draft202012Validator) -> None:
    data = minimal()
    data["access_log_sample"] = "${SAMPLE:-0}"
    data["routes"][0]["max_body_bytes"] = "${MAX_BODY}"
    assert problems(validator, data) == []


def test_whole_string_substitutions_are_typed_by_the_model() -> None:
    data = minimal()
    data["access_log_sample"] = "${SAMPLE}"
    data["drain_timeout"] = "${DRAIN}"
    route = data["routes"][0]
    route["max_body_bytes"] = "${MAX_BODY}"
    route["canary"] = {"backend": "green", "weight": "${WEIGHT}"}
    route["rollout"] = {"failure_threshold": "${THRESHOLD}",
                        "gates": {"no_firing_alarms": "${NO_ALARMS}"}}
    route["shadow"] = {"log": {"path": "/tmp/x", "redact_bodies": "${REDACT:-true}"}}
    env = {"SAMPLE": "0.5", "DRAIN": "30s", "MAX_BODY": "1MiB", "WEIGHT": "12.5",
           "THRESHOLD": "3", "NO_ALARMS": "false"}
    config = parse_config(data, env=env)
    assert config.access_log_sample == 0.5 and config.drain_timeout == 30.0
    r = config.routes[0]
    assert r.max_body_bytes == 1024 * 1024 and r.canary_weight == 12.5
    assert r.rollout is not None and r.rollout.failure_threshold == 3
    assert r.rollout.gates.no_firing_alarms is False
    assert r.shadow is not None and r.shadow.log is not None and r.shadow.log.redact_bodies
    for key, bad, says in [("SAMPLE", "lots", "access_log_sample: expected a number"),
                           ("THRESHOLD", "2.5", "failure_threshold: expected a whole number"),
                           ("NO_ALARMS", "yes", "no_firing_alarms: expected true or false")]:
        with pytest.raises(ConfigError, match=says):
            parse_config(data, env={**env, key: bad})


def test_config_schema_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["config-schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == config_schema()
    assert printed["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    out = tmp_path / "gateway.schema.json"
    assert main(["config-schema", "-o", str(out)]) == 0
    assert json.loads(out.read_text()) == printed
