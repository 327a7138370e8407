"""Wiring and lifecycle of one gateway process.

`Gateway` owns everything with a lifetime: the store, the control plane, the upstream pools,
the client-facing server, the admin server and the feature components (shadow, rollout,
monitoring). `start()` brings them up in dependency order; `stop()` drains in-flight requests,
then cancels and awaits every background task before closing pools.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client.core import GaugeMetricFamily, Metric

from gateway import __version__
from gateway.admin.app import admin_tls_context, build_admin_app
from gateway.cluster.lease import Lease
from gateway.cluster.members import Membership
from gateway.cluster.metrics import MetricsSource, metrics_source
from gateway.component import Component, ComponentFactory, Hooks
from gateway.config import GatewayConfig
from gateway.control import ControlPlane
from gateway.metrics import Recorder
from gateway.monitoring.component import Monitoring
from gateway.proxy import Proxy
from gateway.record.component import Recordings
from gateway.resilience.budget import RetryBudget
from gateway.resilience.health import BackendChecks, HealthChecks
from gateway.resilience.limits import gate
from gateway.resilience.metrics import collect as resilience_metrics
from gateway.resilience.outlier import Outliers
from gateway.rollout.component import Rollouts
from gateway.routing import (
    Backend,
    CompiledRoute,
    RoutingTable,
    StaticRoute,
)
from gateway.rules import rule_hits_metric
from gateway.server import ProxyServer, make_server
from gateway.shadow.component import Shadowing
from gateway.state import RouteState
from gateway.store import Store, open_store
from gateway.upstream import Upstream, UpstreamFactory, make_upstream

log = logging.getLogger("modelgate")


def default_components() -> list[ComponentFactory]:
    return [Monitoring, Shadowing, Rollouts, Recordings]


C = TypeVar("C")


def _one(components: list[Component], kind: type[C]) -> C | None:
    """The component of class `kind` among `components`, if one runs (typed, for the admin
    API: the components themselves meet through `Hooks`, never through each other)."""
    for comp in components:
        if isinstance(comp, kind):
            return comp
    return None


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        store: Store | None = None,
        upstream_kind: str | UpstreamFactory = "fast",
        admin_token: dict[str, str] | None = None,
        components: list[ComponentFactory] | None = None,
        clock: Callable[[], float] = time.time,
        reuse_port: bool = False,
        worker: int | None = None,
        server_kind: str | None = None,
    ) -> None:
        self.config = config
        # Workers of `serve --workers N` share the proxy port (SO_REUSEPORT); `worker` is this
        # process's index among them (None: a single process).
        self.reuse_port = reuse_port
        self.worker = worker
        self.clock = clock
        self.store = store if store is not None else open_store(config.store)
        # This process in the cluster: heartbeats under this id, holds the lease with it.
        self.member_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.lease = Lease(self.store, self.member_id)
        self.membership = Membership(self.store, self.member_id, self.member_info)
        self.control = ControlPlane(config, self.store)
        self.recorder = Recorder(clock)
        # What decisions read: this process's numbers, or with a shared store the cluster's.
        self.metrics: MetricsSource = metrics_source(self.store, self.member_id, self.recorder,
                                                     clock)
        self.recorder.add_collector("cluster", self._collect_cluster)
        self.recorder.add_collector("rules", lambda: [rule_hits_metric(
            (r.name, r.rules.names() if r.rules else (), self.static[r.name].stats.values())
            for r in self.table.routes)])
        self.recorder.add_collector("resilience", lambda: resilience_metrics(self.static))
        # Token name -> secret, and -> role; a name missing from `roles` (the env token, the
        # generated one) is an operator's.
        self.tokens = config.admin.secrets()
        self.roles: dict[str, str] = dict(config.admin.roles())
        if admin_token:
            self.tokens.update(admin_token)
            for name in admin_token:
                self.roles.pop(name, None)
        self.upstream_kind = upstream_kind
        self._upstreams: dict[str, Upstream] = {}
        self.static: dict[str, StaticRoute] = {}
        self.health = HealthChecks(())  # active health checks, built with the static routes
        # The proxy gets only what it uses; `self.table` reads and replaces its table.
        self.proxy = Proxy(self.recorder, config.access_log_sample, config.trusted_proxies)
        self.server_kind = server_kind or config.server.kind
        self._proxy_server: ProxyServer | None = None
        # Components offer and find each other's services here, never by name.
        self.hooks = Hooks()
        factories = default_components() if components is None else components
        self.components: list[Component] = [factory(self) for factory in factories]
        # Typed handles for the admin API (None: that feature does not run here).
        self.rollouts: Rollouts | None = _one(self.components, Rollouts)
        self.shadowing: Shadowing | None = _one(self.components, Shadowing)
        self.monitoring: Monitoring | None = _one(self.components, Monitoring)
        self.recordings: Recordings | None = _one(self.components, Recordings)
        self.ready = False
        self.draining = False
        self.started_at = 0.0
        self._runners: list[web.BaseRunner] = []
        self.addresses: list[tuple[str, int]] = []
        self.admin_address: tuple[str, int] | None = None

    @property
    def table(self) -> RoutingTable:
        return self.proxy.table

    @table.setter
    def table(self, table: RoutingTable) -> None:
        self.proxy.table = table

    def component(self, name: str) -> Any:
        """The component named `name` (tests and debugging; code uses `hooks` or the typed
        `rollouts`/`shadowing`/`monitoring`)."""
        for comp in self.components:
            if comp.name == name:
                return comp
        raise KeyError(name)

    # -- routing snapshot ----------------------------------------------------------------------
    def _upstream(self, origin: str) -> Upstream:
        found = self._upstreams.get(origin)
        if found is None:
            found = self._upstreams[origin] = make_upstream(origin, self.upstream_kind)
        return found

    def _build_static(self) -> None:
        for route in self.config.routes:
            stats = {name: self.recorder.stats(route.name, name) for name in route.backends}
            backends = {
                name: Backend(name, [self._upstream(url) for url in b.urls], stats[name],
                              Outliers(list(b.urls), b.outlier_detection), gate(b.limits),
                              RetryBudget(route.retry_budget))
                for name, b in route.backends.items()
            }
            self.static[route.name] = StaticRoute(
                config=route,
                backends=backends,
                stats=stats,
                salt=route.name.encode()[:64],
                shadow_salt=(route.name + "#shadow").encode()[:64],
                gate=gate(route.limits),
            )
        self.health = HealthChecks(
            BackendChecks(f"{route.name}/{name}", list(b.urls), backend.outliers, b.health_check)
            for route in self.config.routes for name, b in route.backends.items()
            if b.health_check is not None
            and (backend := self.static[route.name].backends[name]).outliers is not None)

    def compile_route(self, name: str, state: RouteState) -> CompiledRoute:
        static = self.static[name]
        taps = []
        for comp in self.components:
            tap = comp.tap(static.config, state)
            if tap is not None:
                taps.append(tap)
        return CompiledRoute(static, state, tuple(taps))

    def _on_state(self, name: str, state: RouteState) -> None:
        """Swap in a new snapshot: requests already running keep the one they started with."""
        compiled = self.compile_route(name, state)
        if name in self.table.by_name:
            self.table = self.table.replace(compiled)
        else:
            self.table = RoutingTable([*self.table.routes, compiled])

    def refresh_route(self, name: str) -> None:
        """Recompile a route (a component's tap changed, e.g. probes turned on)."""
        self._on_state(name, self.control.state(name))

    # -- lifecycle -----------------------------------------------------------------------------
    def member_info(self) -> dict[str, Any]:
        """What this process tells the cluster about itself (``GET /admin/cluster``)."""
        host = socket.gethostname()
        admin = _url(host, *self.admin_address) if self.admin_address else None
        return {"host": host, "pid": os.getpid(), "version": __version__,
                "worker": self.worker, "address": [_url(host, h, p) for h, p in self.addresses],
                "admin": admin,
                "started": self.started_at, "ready": self.ready,
                "leader": self._leader_now()}

    def _leader_now(self) -> bool:
        try:
            return self.lease.held
        except RuntimeError:  # no running loop (called from a thread)
            return False

    def _collect_cluster(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("modelgate_store_up",
                               "1 when the routing-state store answered the last operation.")
        up.add_metric([], 1.0 if self.store.up else 0.0)
        held = GaugeMetricFamily("modelgate_controller_lease_held",
                                 "1 on the one process that runs rollouts and alarms.")
        held.add_metric([], 1.0 if self._leader_now() else 0.0)
        yield up
        yield held

    async def start(self, *, serve_proxy: bool = True, serve_admin: bool = True,
                    sockets: Sequence[socket.socket] = ()) -> None:
        """Bring everything up; the proxy listens on `sockets` when given (listening sockets
        inherited from a supervisor), else on the config's `listen` addresses."""

        self.started_at = time.time()
        await self.store.start()
        await self.metrics.start()
        self._build_static()
        self.control.on_change(self._on_state)
        await self.control.start()
        await self.health.start()
        await self.lease.start()
        for comp in self.components:
            await comp.start()
        # Components may have changed what they tap now that they started.
        for name in list(self.static):
            self.refresh_route(name)
        if serve_proxy:
            server = self._proxy_server = make_server(self.server_kind, self.proxy,
                                                      self.config.server)
            await server.start(self.config.listen, sockets, self.reuse_port)
            self.addresses.extend(server.addresses)
        if serve_admin:
            admin_app = build_admin_app(self)
            admin_runner = web.AppRunner(admin_app, access_log=None, handle_signals=False)
            await admin_runner.setup()
            self._runners.append(admin_runner)
            host, port = self.config.admin.listen
            site = web.TCPSite(admin_runner, host, port, reuse_address=True,
                               ssl_context=admin_tls_context(self.config.admin))
            await site.start()
            self.admin_address = _bound(site, host, port)
        # Start-up garbage lives forever: keep the collector from rescanning it under load.
        gc.collect()
        gc.freeze()
        self.ready = True
        await self.membership.start()
        log.info("gateway ready", extra={"event": "ready", "listen": self.addresses,
                                         "admin": self.admin_address})

    async def drain(self, timeout: float | None = None) -> None:
        """Stop being ready, then wait (bounded) for requests in flight to finish."""
        self.draining = True
        self.ready = False
        deadline = time.monotonic() + (self.config.drain_timeout if timeout is None else timeout)
        while self.proxy.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def stop(self, drain_timeout: float | None = None) -> None:
        # Hand the controller lease over first: another process takes over while we drain.
        await self.lease.stop()
        await self.drain(drain_timeout)
        if self._proxy_server is not None:
            await self._proxy_server.stop(timeout=1.0)
            self._proxy_server = None
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        for comp in reversed(self.components):
            try:
                await comp.stop()
            except Exception:
                log.exception("component %s failed to stop", comp.name)
        await self.membership.stop()
        await self.health.stop()
        for upstream in self._upstreams.values():
            await upstream.close()
        await self.metrics.stop()
        await self.store.close()
        gc.unfreeze()


def _bound(site: web.TCPSite, host: str, port: int) -> tuple[str, int]:
    server: Any = site._server  # the only way to learn the port chosen for port 0
    sockets = getattr(server, "sockets", None)
    if sockets:
        return host, int(sockets[0].getsockname()[1])
    return host, port


def _url(hostname: str, host: str, port: int) -> str:
    """An address other hosts can use: a wildcard listen address becomes the host name."""
    if host in ("", "0.0.0.0", "::"):
        host = hostname
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
