// The live status page: polls the API once a second (cookie session), draws with uPlot.
// window.rta exposes the charts and the last responses (the browser tests read them).
"use strict";
(function () {
  const rta = (window.rta = { charts: {}, fleet: null, series: null, me: null });
  const $ = (id) => document.getElementById(id);
  const SECONDS = 300;

  async function api(method, path, body) {
    const opts = { method, credentials: "same-origin", headers: {} };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const resp = await fetch(path, opts);
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    return { status: resp.status, data };
  }

  const fmt = (v, d = 3) => (v === null || v === undefined ? "-" : Number(v).toFixed(d));
  const pct = (v) => (v === null || v === undefined ? "-" : (100 * v).toFixed(1) + "%");
  const stepped = uPlot.paths.stepped({ align: 1 });

  function chart(id, series, yRange) {
    const el = $(id);
    const opts = {
      width: Math.max(380, el.clientWidth || 420), height: 220,
      scales: { x: { time: true }, y: yRange ? { range: yRange } : {} },
      series: [{}].concat(series),
      axes: [{}, { size: 55 }],
    };
    const empty = [[]].concat(series.map(() => []));
    return new uPlot(opts, empty, el);
  }

  function makeCharts() {
    const share = (lo, hi) => () => [lo, hi];
    rta.charts.block = chart("chart-block", [
      { label: "block share", stroke: "#c62828", width: 1.5, value: (u, v) => pct(v) },
      { label: "target r", stroke: "#1565c0", width: 2, paths: stepped, value: (u, v) => fmt(v, 2) },
    ], share(0, 1));
    rta.charts.pass = chart("chart-pass", [
      { label: "uncertain", stroke: "#6a1b9a", value: (u, v) => pct(v) },
      { label: "p_u", stroke: "#6a1b9a", dash: [6, 4], paths: stepped, value: (u, v) => fmt(v, 2) },
      { label: "explore", stroke: "#2e7d32", value: (u, v) => pct(v) },
      { label: "epsilon", stroke: "#2e7d32", dash: [6, 4], paths: stepped, value: (u, v) => fmt(v, 2) },
    ], share(0, 0.5));
    rta.charts.th = chart("chart-th", [
      { label: "theta", stroke: "#ef6c00", value: (u, v) => fmt(v, 4) },
      { label: "tau_u", stroke: "#00838f", value: (u, v) => fmt(v, 4) },
    ]);
  }

  function drawSeries(s) {
    const c = s.series;
    rta.charts.block.setData([c.t, c.block, c.r]);
    rta.charts.pass.setData([c.t, c.uncertain, c.p_u, c.explore, c.epsilon]);
    rta.charts.th.setData([c.t, c.theta, c.tau_u]);
  }

  function drawFleet(f) {
    const t = f.targets || {};
    $("t-r").textContent = fmt(t.r, 2);
    $("t-pu").textContent = fmt(t.p_u, 2);
    $("t-eps").textContent = fmt(t.epsilon, 2);
    $("t-version").textContent = f.version;
    $("t-by").textContent = f.updated_by ? "set by " + f.updated_by : "";
    const banner = $("banner");
    $("model").textContent = f.models.length ? f.models.join(" + ") : (f.registry_current || "-");
    banner.classList.toggle("mixed", !!f.mixed_models);
    if (f.mixed_models) $("model").textContent += " (mixed: reload in progress)";
    $("w-count").textContent = "(" + f.workers.length + ")";
    const body = $("workers").querySelector("tbody");
    body.replaceChildren(...f.workers.map((w) => {
      const tr = document.createElement("tr");
      const cells = [w.id, w.model, fmt(w.theta, 4), fmt(w.tau_u, 4), w.degraded ? "DEGRADED" : "ok",
        (w.targets_source || "-") + " v" + w.targets_version,
        w.request_age_ms == null ? "-" : Math.round(w.request_age_ms) + " ms",
        w.last_seen_s == null ? "-" : w.last_seen_s + " s", w.events, w.partitions];
      cells.forEach((v, i) => {
        const td = document.createElement("td");
        td.textContent = v === undefined || v === null ? "-" : String(v);
        if (i === 4 && w.degraded) td.className = "degraded";
        tr.appendChild(td);
      });
      return tr;
    }));
  }

  function drawAudit(entries) {
    $("audit").replaceChildren(...entries.map((e) => {
      const li = document.createElement("li");
      const old = e.old || {};
      const diff = Object.keys(e.new || {}).filter((k) => old[k] !== e.new[k])
        .map((k) => k + " " + fmt(old[k], 2) + " \u2192 " + fmt(e.new[k], 2)).join(", ") || "no change";
      li.textContent = e.when + "  " + e.who + ": " + diff + "  (" + e.reason + ", v" + e.version + ")";
      return li;
    }));
  }

  async function tick() {
    const [f, s, a] = await Promise.all([
      api("GET", "/api/v1/fleet"), api("GET", "/api/v1/series?seconds=" + SECONDS), api("GET", "/api/v1/audit?n=30"),
    ]);
    if (f.status === 401) return showLogin();
    if (f.status === 200) { rta.fleet = f.data; drawFleet(f.data); }
    if (s.status === 200) { rta.series = s.data; drawSeries(s.data); }
    if (a.status === 200) drawAudit(a.data.entries);
  }

  let timer = null;
  function showLogin(msg) {
    if (timer) { clearInterval(timer); timer = null; }
    $("main").hidden = true;
    $("login").hidden = false;
    $("who").textContent = "";
    $("login-error").textContent = msg || "";
  }

  function showMain(me) {
    rta.me = me;
    $("login").hidden = true;
    $("main").hidden = false;
    $("who").textContent = me.name + " (" + me.role + ")";
    $("targets-form").hidden = me.role !== "operator";
    if (!rta.charts.block) makeCharts();
    tick();
    if (!timer) timer = setInterval(tick, 1000);
  }

  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const r = await api("POST", "/api/v1/session", { token: $("token").value });
    $("token").value = "";
    if (r.status === 200) showMain(r.data);
    else showLogin((r.data && r.data.error) || "login failed");
  });

  $("targets-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const msg = $("f-msg");
    const body = { r: parseFloat($("f-r").value), reason: $("f-reason").value,
      expected_version: rta.fleet ? rta.fleet.version : 0 };
    if ($("f-pu").value !== "") body.p_u = parseFloat($("f-pu").value);
    if ($("f-eps").value !== "") body.epsilon = parseFloat($("f-eps").value);
    const r = await api("POST", "/api/v1/targets", body);
    if (r.status === 200) {
      msg.className = "msg ok";
      msg.textContent = "r " + fmt(r.data.new.r, 2) + " (version " + r.data.version + ")";
      tick();
    } else {
      msg.className = "msg error";
      msg.textContent = (r.data && r.data.error) || "HTTP " + r.status;
    }
  });

  $("logout").addEventListener("click", async (ev) => {
    ev.preventDefault();
    await api("DELETE", "/api/v1/session");
    showLogin();
  });

  (async () => {
    const me = await api("GET", "/api/v1/session");
    if (me.status === 200) showMain(me.data);
    else showLogin();
  })();
})();
