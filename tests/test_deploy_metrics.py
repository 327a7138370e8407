"""The Grafana dashboard and the alert rules against a live gateway's /metrics.

The gateway runs as the Kubernetes Deployment runs it: `modelgate serve` with the container's
args and environment from the rendered base manifests, the ConfigMap's config, a real Redis
store, and the demo model servers as blue and green. Traffic, a shadow, a drift baseline and
a rollout make every metric family appear; then every PromQL expression of the dashboard and
the rules may name only metrics (and labels) that this /metrics really has.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import INFER, free_port, infer_body, model_server, wait_for
from tests.redis_server import RedisServer
from tests.test_deploy import PROMETHEUS, alert_groups, container_env, tool
from tests.test_deploy_render import BASE, find, render

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "modelgate.json"
TARGET_LABELS = {"job", "instance", "namespace", "pod", "le"}  # added by Prometheus / buckets
PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself for each target
METRIC = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
NAME = re.compile(r"\b(modelgate_[a-z0-9_]+)\b")
BY = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
AGGREGATED = re.compile(r"^(1 - )?(sum|max|min|count|avg|histogram_quantile)\b")


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        if panel["type"] != "row":
            yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def rule_exprs() -> list[str]:
    return [r["expr"] for g in alert_groups() for r in g["rules"]]


def as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced by what they stand for."""
    return expr.replace("$__rate_interval", "1m").replace("$route", ".*")


# -- static checks of the dashboard ----------------------------------------------------------------
def test_dashboard_has_the_built_in_dashboards_panels() -> None:
    doc = dashboard()
    assert doc["uid"] == "modelgate"
    titles = " | ".join(p["title"].lower() for p in panels())
    for wanted in ("throughput", "p50", "p99", "error rate", "non-null outputs",
                   "missing input", "traffic share", "canary weight", "shadow agreement",
                   "drift", "alarms firing", "rollout phase"):
        assert wanted in titles, f"no panel for {wanted}"
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_queries_sum_over_replicas_per_route_and_backend() -> None:
    for expr in dashboard_exprs():
        assert AGGREGATED.match(expr), f"not aggregated over replicas: {expr}"
        if "route=~\"$route\"" not in expr:
            assert "route" not in " ".join(BY.findall(expr)), expr
    per_backend = [e for e in dashboard_exprs() if "backend" in " ".join(BY.findall(e))]
    assert len(per_backend) >= 10


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """promtool parses every panel query (as recording rules)."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": as_promql(e)}
        for i, e in enumerate(dashboard_exprs())]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([tool("promtool"), "check", "rules", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# -- a live gateway, run as the Deployment runs it ----------------------------------------------
def scrape(text: str) -> dict[str, set[str]]:
    """Sample name -> the label names seen on it."""
    seen: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            seen.setdefault(sample.name, set()).update(sample.labels)
    return seen


def referenced(exprs: list[str]) -> set[str]:
    return {name for e in exprs for name in NAME.findall(e)}


def check_expr(expr: str, live: dict[str, set[str]]) -> list[str]:
    """What in `expr` the live /metrics does not have: metric names, matcher labels, and
    grouping labels that none of its metrics carries."""
    problems = []
    names = set(NAME.findall(expr))
    for name in names:
        if name not in live:
            problems.append(f"metric {name}")
    for name, matchers in METRIC.findall(expr):
        if name in PROMETHEUS_OWN or name not in live:
            continue
        for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers):
            if label not in live[name] | TARGET_LABELS:
                problems.append(f"label {label} on {name}")
    carried = set().union(*(live.get(n, set()) for n in names)) | TARGET_LABELS
    for group in BY.findall(expr):
        for label in filter(None, (x.strip() for x in group.split(","))):
            if label not in carried:
                problems.append(f"grouping label {label}")
    return problems


@pytest.fixture
def deployment_container() -> dict[str, Any]:
    docs = render(BASE)
    container: dict[str, Any] = find(docs, "Deployment", "modelgate")["spec"]["template"][
        "spec"]["containers"][0]
    container["_env"] = container_env(container, docs)
    container["_config"] = find(docs, "ConfigMap", "modelgate-config")["data"]["gateway.yaml"]
    return container


async def test_dashboard_and_rules_name_only_live_metrics(
        deployment_container: dict[str, Any], redis_server: RedisServer,
        tmp_path: Path) -> None:
    config_file = tmp_path / "etc" / "gateway.yaml"
    config_file.parent.mkdir()
    config_file.write_text(deployment_container["_config"])
    args = list(deployment_container["args"])
    args[args.index("-c") + 1] = str(config_file)
    state_dir, cwd = tmp_path / "state", tmp_path / "cwd"
    state_dir.mkdir()
    cwd.mkdir()
    proxy_port, admin_port = free_port(), free_port()
    token = deployment_container["_env"]["MODELGATE_ADMIN_TOKEN"]

    async with model_server("v1", null_rate=0.1, seed=1) as blue, \
            model_server("v2", seed=2) as green:
        env = {**deployment_container["_env"],
               "MODELGATE_STORE": redis_server.url,
               "MODELGATE_BLUE_URL": blue.url, "MODELGATE_GREEN_URL": green.url,
               "MODELGATE_STATE_DIR": str(state_dir),
               "MODELGATE_LISTEN": f"127.0.0.1:{proxy_port}",
               "MODELGATE_ADMIN_LISTEN": f"127.0.0.1:{admin_port}"}
        proc = subprocess.Popen([sys.executable, "-m", "gateway", *args], cwd=cwd,
                                env={**os.environ, **env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy_port}",
                                         timeout=10) as proxy, \
                    httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin_port}", timeout=10,
                                      headers={"Authorization": f"Bearer {token}"}) as admin:
                await run_checks(proc, proxy, admin)
        finally:
            proc.terminate()
            out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
    # Read-only root friendly: nothing written outside the state dir.
    assert list(cwd.iterdir()) == []


async def send(proxy: httpx.AsyncClient, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        row: list[Any] = [6.1, 2.8, 4.7, 1.2] if i % 10 else [5.0, None, 1.4, 0.2]
        response = await proxy.post(INFER, json=infer_body([row]),
                                    headers={"x-user-id": f"user-{i}"})
        assert response.status_code == 200, response.text


async def run_checks(proc: subprocess.Popen[bytes], proxy: httpx.AsyncClient,
                     admin: httpx.AsyncClient) -> None:
    async def ready() -> bool:
        assert proc.poll() is None, "modelgate serve exited: " + (
            proc.stdout.read().decode(errors="replace") if proc.stdout else "")
        try:
            return (await admin.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    await wait_for(ready, timeout=30, interval=0.1, message="the gateway to be ready")
    assert (await admin.get("/healthz")).json()["store"] == {"kind": "redis", "up": True}
    await send(proxy, 120)
    response = await admin.put("/admin/routes/classifier/shadow",
                               json={"backend": "green", "sample": 100})
    assert response.status_code == 200, response.text
    await send(proxy, 60, start=1000)

    async def baseline_taken() -> bool:
        # Decisions read the cluster's sums, published to Redis after each completed second:
        # until then there is "no probed traffic" to take a baseline of (409).
        response = await admin.post("/admin/routes/classifier/drift/baseline", json={})
        assert response.status_code in (200, 201, 409), response.text
        return response.status_code != 409

    await wait_for(baseline_taken, timeout=30, interval=0.2, message="a drift baseline")
    response = await admin.post("/admin/routes/classifier/rollout", json={})
    assert response.status_code == 201, response.text

    needed = referenced(dashboard_exprs() + rule_exprs())
    live: dict[str, set[str]] = {}
    sent = [2000]

    async def families_present() -> bool:
        nonlocal live
        await send(proxy, 20, start=sent[0])
        sent[0] += 20
        text = (await admin.get("/metrics")).text
        live = scrape(text)
        return needed <= set(live)

    try:
        await wait_for(families_present, timeout=60, interval=0.2,
                       message="every metric the dashboard and the rules name")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: missing {sorted(needed - set(live))}") from None

    problems = {e: p for e in dashboard_exprs() + rule_exprs() if (p := check_expr(e, live))}
    assert not problems, problems
    # The checker is not vacuous: a wrong name or label is caught.
    assert check_expr('sum by (route) (rate(modelgate_request_total{route="x"}[1m]))', live)
    assert check_expr('sum by (model) (rate(modelgate_requests_total[1m]))', live)
    assert check_expr('sum(rate(modelgate_requests_total{status="500"}[1m]))', live)


def test_rules_select_the_scrape_jobs_labels() -> None:
    """Rules name modelgate_* metrics and Prometheus' own `up`, nothing else."""
    for expr in rule_exprs():
        for name, _ in METRIC.findall(expr):
            assert name.startswith("modelgate_") or name in PROMETHEUS_OWN, name
    assert (PROMETHEUS / "alerts.yml").exists()
