/* modelgate dashboard: polls GET /admin/dashboard/data and draws it with uPlot.
 * Plain JS, no build step. All text from the API goes in through textContent (never
 * innerHTML): event reasons and alarm names are operator input. */
"use strict";

(() => {
  const DATA_URL = "/admin/dashboard/data?minutes=15&step=5";
  const REFRESH_MS = 3000;
  const TOKEN_KEY = "modelgate.adminToken";
  const CHART_HEIGHT = 150;
  const NAMED_COLORS = {
    blue: "#4ea1ff", green: "#3fd28b", red: "#ff6b6b", orange: "#ffa94d", yellow: "#ffd43b",
    purple: "#b197fc", pink: "#f783ac", cyan: "#3bc9db", teal: "#38d9a9", gray: "#adb5bd",
  };
  const PALETTE = ["#4ea1ff", "#3fd28b", "#ffa94d", "#b197fc", "#f783ac", "#3bc9db"];

  const $ = (id) => document.getElementById(id);
  let timer = null;
  let generation = 0;         // bumped by stop(): an answer for an older poll is dropped
  let layout = "";            // routes and backends the charts were built for
  const charts = new Map();   // "route/chart" -> {plot, holder, card, box}
  const observers = [];       // one ResizeObserver per route's chart grid

  /** el("td", {class: "x"}, "text", child): a DOM node; strings become text nodes. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v);
    }
    for (const c of children) {
      if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
    }
    return node;
  }

  // -- formatting --------------------------------------------------------------------------
  const pct = (v) => (v === null || v === undefined ? null : v * 100);
  function num(v, digits = 1) {
    if (v === null || v === undefined) return "–";
    const a = Math.abs(v);
    return a >= 1000 ? v.toFixed(0) : a >= 100 ? v.toFixed(Math.min(digits, 1))
      : v.toFixed(digits);
  }
  const duration = (s) => (typeof s !== "number" ? String(s)
    : s % 60 === 0 ? `${s / 60}m` : `${s}s`);
  const showPct = (v) => (v === null || v === undefined ? "–" : num(v * 100, 1) + "%");
  const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  const hhmm = (t) => new Date(t * 1000).toLocaleTimeString([], {
    hour12: false, hour: "2-digit", minute: "2-digit" });

  function colorOf(names, name) {
    return NAMED_COLORS[name.toLowerCase()] || PALETTE[names.indexOf(name) % PALETTE.length];
  }

  // -- login -------------------------------------------------------------------------------
  function showLogin(message) {
    stop();
    $("wall").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    $("login-message").textContent = message || "";
    setStatus("off", "not connected");
    $("token").focus();
  }

  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = $("token").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    $("login-message").textContent = "";
    refresh();
  });

  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("Signed out.");
  });

  function setStatus(kind, text) {
    const s = $("status");
    s.className = "status " + kind;
    s.lastElementChild.textContent = text;
  }

  function stop() {
    clearTimeout(timer);
    timer = null;
    generation++;
  }

  // -- polling -----------------------------------------------------------------------------
  async function refresh() {
    stop();
    const mine = generation;
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) return showLogin("");
    let data;
    try {
      const res = await fetch(DATA_URL, {
        headers: { Authorization: "Bearer " + token }, cache: "no-store",
      });
      if (mine !== generation) return;  // signed out or re-polled meanwhile
      if (res.status === 401) {
        sessionStorage.removeItem(TOKEN_KEY);
        return showLogin("The gateway rejected this token (401). Check it and try again.");
      }
      if (!res.ok) throw new Error("HTTP " + res.status);
      data = await res.json();
    } catch (err) {
      if (mine !== generation) return;
      setStatus("down", "gateway unreachable (" + err.message + "), retrying");
      timer = setTimeout(refresh, REFRESH_MS);
      return;
    }
    if (mine !== generation) return;
    $("login").hidden = true;
    $("wall").hidden = false;
    $("logout").hidden = false;
    render(data);
    setStatus("ok", "live · updated " + clock(data.time));
    timer = setTimeout(refresh, REFRESH_MS);
  }

  // -- charts ------------------------------------------------------------------------------
  /* Each chart: series(route, names) -> [{label, color, values}] */
  const perBackend = (pick, transform = (v) => v) => (r, names) => names.map((b) => ({
    label: b, color: colorOf(names, b), values: r.backends[b][pick].map(transform),
  }));
  /** Legend text: the hovered point, or the latest value when the cursor is elsewhere. */
  const legendValue = (unit) => (u, v, si, idx) => {
    if (idx === null) {
      const col = u.data[si];
      for (let i = col.length - 1; i >= 0 && v == null; i--) v = col[i];
    }
    return v === null || v === undefined ? "–" : num(v, 2) + " " + unit;
  };
  /** Indices of points with no neighbour to draw a line to (e.g. the first few seconds). */
  const isolated = (u, si, show) => {
    if (show) return null;
    const d = u.data[si];
    const idxs = [];
    for (let i = 0; i < d.length; i++) {
      if (d[i] !== null && d[i - 1] == null && d[i + 1] == null) idxs.push(i);
    }
    return idxs.length ? idxs : null;
  };
  /** Axis labels with as many decimals as the tick spacing needs. */
  const axisValues = (u, vals, ax, space, incr) => {
    const digits = Math.min(3, (String(+(incr || 1).toFixed(6)).split(".")[1] || "").length);
    return vals.map((v) => (v === 0 ? "0" : v.toFixed(digits)));
  };
  const CHARTS = [
    { id: "throughput", title: "Throughput", unit: "req/s", series: perBackend("rps") },
    { id: "p50", title: "Latency p50", unit: "ms", series: perBackend("p50_ms") },
    { id: "p99", title: "Latency p99", unit: "ms", series: perBackend("p99_ms") },
    { id: "errors", title: "Error rate (5xx)", unit: "%", max: 1,
      series: perBackend("error_rate", pct) },
    { id: "nonnull", title: "Non-null outputs", unit: "%", range: [0, 100],
      empty: "no probed outputs (route has no output probe)",
      series: perBackend("non_null", pct) },
    { id: "missing", title: "Missing input values", unit: "%", max: 1,
      empty: "no probed inputs (route has no input probe)",
      series: perBackend("input_missing", pct) },
    { id: "ttft", title: "Time to first token p99 (streams)", unit: "ms",
      empty: "no streamed (server-sent-event) answers in this window",
      series: perBackend("ttft_p99_ms") },
    { id: "traffic", title: "Traffic share · canary weight", unit: "%", range: [0, 100],
      stepped: true, marks: true,
      series: (r, names) => names.map((b) => ({
        label: b, color: colorOf(names, b), values: r.traffic[b],
      })) },
    { id: "shadow", title: "Shadow agreement", unit: "%", range: [0, 100],
      empty: "no shadow comparisons in this window",
      series: (r) => [{ label: "agreement", color: "#ffd43b",
        values: r.shadow_agreement.map(pct) }] },
  ];

  const AXIS = {
    stroke: "#8b95a7", font: "11px system-ui, sans-serif",
    grid: { stroke: "rgba(139,149,167,0.12)", width: 1 },
    ticks: { stroke: "rgba(139,149,167,0.25)", width: 1 },
  };

  /** Vertical lines where the live backend changed, labelled with the new one. */
  function liveMarks(holder) {
    return (u) => {
      const live = holder.live || [];
      const ctx = u.ctx;
      const { left, top, width, height } = u.bbox;
      ctx.save();
      ctx.setLineDash([3, 3]);
      ctx.lineWidth = devicePixelRatio;
      ctx.font = `${10 * devicePixelRatio}px system-ui, sans-serif`;
      for (let i = 1; i < live.length; i++) {
        if (live[i] && live[i - 1] && live[i] !== live[i - 1]) {
          const x = Math.round(u.valToPos(u.data[0][i], "x", true));
          ctx.strokeStyle = ctx.fillStyle = colorOf(holder.names, live[i]);
          ctx.beginPath();
          ctx.moveTo(x, top);
          ctx.lineTo(x, top + height);
          ctx.stroke();
          const label = "live → " + live[i];
          const right = x + ctx.measureText(label).width + 8 * devicePixelRatio > left + width;
          ctx.textAlign = right ? "right" : "left";
          ctx.fillText(label, x + (right ? -4 : 4) * devicePixelRatio, top + 12 * devicePixelRatio);
        }
      }
      ctx.restore();
    };
  }

  function makeChart(def, r, names, box) {
    const holder = { live: r.live, names };
    const series = def.series(r, names);
    const yRange = def.range ? () => def.range
      : (u, min, max) => [0, Math.max(max === null ? 0 : max * 1.1, def.max || 0.001)];
    const opts = {
      width: Math.max(200, box.clientWidth), height: CHART_HEIGHT,
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { range: yRange } },
      axes: [
        { ...AXIS, space: 70,
          values: (u, vals, ax, space, incr) => vals.map(incr < 60 ? clock : hhmm) },
        { ...AXIS, size: 44, values: axisValues },
      ],
      series: [
        {},
        ...series.map((s) => ({
          label: s.label, stroke: s.color, width: 1.6, spanGaps: false,
          points: { show: false, size: 5, filter: isolated },
          paths: def.stepped ? uPlot.paths.stepped({ align: 1 }) : undefined,
          value: legendValue(def.unit),
        })),
      ],
      hooks: def.marks ? { draw: [liveMarks(holder)] } : {},
    };
    const plot = new uPlot(opts, [r.time, ...series.map((s) => s.values)], box);
    return { plot, def, holder };
  }

  function chartCard(route, def) {
    const box = el("div", { class: "plot" });
    const card = el("div", { class: "card", "data-testid": `chart-${route}-${def.id}` },
      el("div", { class: "card-head" },
        el("h3", null, def.title), el("span", { class: "unit" }, def.unit)),
      el("div", { class: "hint" }), box);
    return { card, box };
  }

  function buildRoutes(data) {
    for (const c of charts.values()) c.plot.destroy();
    charts.clear();
    observers.splice(0).forEach((o) => o.disconnect());
    const root = $("routes");
    root.replaceChildren();
    for (const r of data.routes) {
      const names = Object.keys(r.backends);
      const grid = el("div", { class: "grid" });
      const section = el("section", { class: "route", "data-route": r.name },
        el("div", { class: "route-head", id: "head-" + r.name }), grid);
      root.append(section);
      for (const def of CHARTS) {
        const { card, box } = chartCard(r.name, def);
        grid.append(card);
        charts.set(r.name + "/" + def.id, { ...makeChart(def, r, names, box), card, box });
      }
      const observer = new ResizeObserver(() => {
        for (const def of CHARTS) {
          const c = charts.get(r.name + "/" + def.id);
          if (c) c.plot.setSize({ width: Math.max(200, c.box.clientWidth), height: CHART_HEIGHT });
        }
      });
      observer.observe(grid);
      observers.push(observer);
    }
  }

  function updateCharts(r) {
    const names = Object.keys(r.backends);
    for (const def of CHARTS) {
      const c = charts.get(r.name + "/" + def.id);
      const series = def.series(r, names);
      c.holder.live = r.live;
      c.plot.setData([r.time, ...series.map((s) => s.values)]);
      const empty = series.every((s) => s.values.every((v) => v === null));
      c.card.querySelector(".hint").textContent = empty && def.empty ? def.empty : "";
    }
  }

  // -- route header ------------------------------------------------------------------------
  function swatch(color) {
    const node = el("i", { class: "swatch" });
    node.style.background = color;  // CSSOM: allowed by the page's CSP, unlike style=""
    return node;
  }

  function badge(kind, label, value, testid) {
    return el("span", { class: "badge " + kind }, el("span", { class: "badge-k" }, label),
      el("b", { "data-testid": testid }, value));
  }

  function renderHead(r, recent) {
    const s = r.state;
    const names = Object.keys(r.backends);
    const total = names.reduce((sum, b) => sum + r.summary[b].rps, 0);
    const role = (b) => (b === s.live ? "live" : s.canary && b === s.canary.backend ? "canary"
      : s.shadow && b === s.shadow.backend ? "shadow" : "idle");
    const rows = names.map((b) => {
      const m = r.summary[b];
      return el("tr", { class: role(b) },
        el("td", null, swatch(colorOf(names, b)), b),
        el("td", null, el("span", { class: "role " + role(b) }, role(b))),
        el("td", { class: "n" }, num(m.rps, 2)),
        el("td", { class: "n" }, num(m.p50_ms, 1)),
        el("td", { class: "n" }, num(m.p99_ms, 1)),
        el("td", { class: "n" }, showPct(m.error_rate)),
        el("td", { class: "n" }, showPct(m.non_null)),
        el("td", { class: "n" }, showPct(m.input_missing)),
        el("td", { class: "n", "data-testid": `ttft-p50-${r.name}-${b}` }, num(m.ttft_p50_ms, 1)),
        el("td", { class: "n", "data-testid": `ttft-p99-${r.name}-${b}` }, num(m.ttft_p99_ms, 1)));
    });
    $("head-" + r.name).replaceChildren(
      el("div", { class: "route-title" },
        el("h2", null, r.name),
        el("code", null, (s.match.host ? s.match.host : "") + s.match.path_prefix),
        el("span", { class: "muted" }, "state v" + s.version)),
      el("div", { class: "badges" },
        badge("live", "LIVE", s.live, "live-" + r.name),
        badge("canary", "CANARY", s.canary ? `${s.canary.backend} ${s.canary.weight}%` : "off",
          "canary-" + r.name),
        badge("shadow", "SHADOW", s.shadow ? `${s.shadow.backend} ${s.shadow.sample}%` : "off",
          "shadow-" + r.name),
        el("span", { class: "big" }, el("b", { "data-testid": "rps-" + r.name }, num(total, 2)),
          " req/s", el("span", { class: "muted" }, ` last ${duration(recent)}`))),
      el("table", { class: "backends" },
        el("thead", null, el("tr", null, ...["backend", "role", "req/s", "p50 ms", "p99 ms",
          "errors", "non-null", "missing", "TTFT p50", "TTFT p99"].map((h) => el("th", null, h)))),
        el("tbody", null, ...rows)),
      renderRules(r, recent));
  }

  const RULE_SOURCES = ["header", "cookie", "query", "body"];
  const RULE_OPS = ["exact", "prefix", "regex", "one_of"];

  /** The route's match rules (first match wins) with their hits over the header's window. */
  function renderRules(r, recent) {
    const rules = r.rules || [];
    if (!rules.length) return null;
    return el("table", { class: "backends rules", "data-testid": "rules-" + r.name },
      el("thead", null, el("tr", null, ...["rule", "condition", "backend",
        `hits (last ${duration(recent)})`].map((h) => el("th", null, h)))),
      el("tbody", null, ...rules.map((rule) => {
        const source = RULE_SOURCES.find((k) => k in rule);
        const op = RULE_OPS.find((k) => k in rule);
        const value = Array.isArray(rule[op]) ? rule[op].join(", ") : rule[op];
        return el("tr", null,
          el("td", null, rule.name),
          el("td", null, el("code", null, `${source} ${rule[source]} ${op} ${value}`)),
          el("td", null, rule.backend),
          el("td", { class: "n", "data-testid": `rule-hits-${r.name}-${rule.name}` },
            num(rule.hits, 0)));
      })));
  }

  // -- alarms and events -------------------------------------------------------------------
  function renderAlarms(alarms) {
    const box = $("alarms");
    if (alarms === null) {
      $("alarm-count").textContent = "";
      box.replaceChildren(el("p", { class: "muted" }, "Alarms are not available in this gateway."));
      return;
    }
    const firing = alarms.filter((a) => a.state === "firing").length;
    $("alarm-count").textContent = firing ? `${firing} firing` : "";
    $("alarm-count").className = "count" + (firing ? " firing" : "");
    if (!alarms.length) {
      box.replaceChildren(el("p", { class: "muted" }, "No alarm rules configured."));
      return;
    }
    const order = { firing: 0, pending: 1, ok: 2 };
    const sorted = [...alarms].sort((a, b) => (order[a.state] ?? 3) - (order[b.state] ?? 3));
    box.replaceChildren(el("table", { class: "list" },
      el("thead", null, el("tr", null, ...["state", "alarm", "route / backend", "rule", "value",
        "since"].map((h) => el("th", null, h)))),
      el("tbody", null, ...sorted.map((a) => el("tr", { class: "alarm " + a.state },
        el("td", null, el("span", { class: "pill " + a.state }, a.state)),
        el("td", { class: "nowrap", title: a.description || null }, a.name),
        el("td", null, [a.route, a.backend, a.value_backend && a.value_backend !== a.backend
          ? `(${a.value_backend})` : null].filter(Boolean).join(" / ").replace("/ (", "(")),
        el("td", null, `${a.metric} ${a.comparison || ">"} ${a.threshold}`
          + (a.window ? ` over ${duration(a.window)}` : "")),
        el("td", { class: "n" }, typeof a.value === "number" ? num(a.value, 3) : "–"),
        el("td", null, typeof a.since === "number" ? clock(a.since) : "–"))))));
  }

  /** "live: blue → green, canary_weight: 30 → 0": the keys both sides have ("previous" and
   * "version" follow from the rest; the reason column explains the other events). */
  function change(before, after) {
    if (!before || !after) return "";
    return Object.keys(before)
      .filter((k) => k in after && k !== "version" && k !== "previous"
        && JSON.stringify(before[k]) !== JSON.stringify(after[k]))
      .map((k) => `${k}: ${shown(before[k])} → ${shown(after[k])}`).join(", ");
  }

  function shown(value) {  // rules: their names
    if (Array.isArray(value)) return value.map((v) => v && v.name ? v.name : v).join(",") || "–";
    return value ?? "–";
  }

  function renderEvents(events) {
    const box = $("events");
    if (!events.length) {
      box.replaceChildren(el("p", { class: "muted" }, "No events yet."));
      return;
    }
    box.replaceChildren(el("table", { class: "list" },
      el("thead", null, el("tr", null, ...["time", "route", "action", "change", "actor",
        "reason"].map((h) => el("th", null, h)))),
      el("tbody", null, ...[...events].reverse().map((e) => el("tr",
        { class: e.action.startsWith("alarm_firing") ? "alarm firing" : "" },
        el("td", { class: "n" }, clock(e.time)),
        el("td", null, e.route || "–"),
        el("td", null, el("span", { class: "action" }, e.action)),
        el("td", null, change(e.before, e.after)),
        el("td", null, e.actor),
        el("td", { class: "reason" }, e.reason || ""))))));
  }

  function render(data) {
    const shape = JSON.stringify(data.routes.map((r) => [r.name, Object.keys(r.backends)]));
    if (shape !== layout) {
      buildRoutes(data);
      layout = shape;
    }
    for (const r of data.routes) {
      renderHead(r, data.summary_seconds);
      updateCharts(r);
    }
    renderAlarms(data.alarms);
    renderEvents(data.events);
  }

  refresh();
})();
