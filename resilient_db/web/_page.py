"""The dashboard's page: one HTML document with its style and script inline (no build step, no
CDN: it works offline). The script polls ``data.json`` and draws everything with DOM calls
(``textContent``, ``createElementNS`` for the SVG plots), never ``innerHTML``: a service name,
an error text or a state from the database is always text, never markup. The page is sent with
a Content-Security-Policy allowing only its own nonce'd style and script."""

# ruff: noqa: E501  (the page's CSS and script are text, laid out as such)

from __future__ import annotations

import html

from ._recorder import MAX_STATE_CHANGES

__all__ = ["render_page"]

_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>@TITLE@</title>
<style nonce="@NONCE@">
:root {
  --bg: #f4f6f9; --card: #ffffff; --ink: #1d2433; --muted: #667085; --line: #e4e7ec;
  --ok: #12b76a; --ok-bg: #e8f8f0; --warn: #f79009; --warn-bg: #fef4e6;
  --bad: #e5484d; --bad-bg: #fdecec; --accent: #3e63dd; --head: #101828;
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
header { background: var(--head); color: #fff; padding: 14px 24px; display: flex;
  align-items: center; gap: 16px; flex-wrap: wrap; }
header h1 { font-size: 18px; margin: 0; font-weight: 600; letter-spacing: .2px; }
header .sub { color: #98a2b3; font-size: 13px; }
header .spacer { flex: 1; }
.pill { display: inline-flex; align-items: center; gap: 6px; border-radius: 999px;
  padding: 3px 11px; font-weight: 600; font-size: 12.5px; white-space: nowrap; }
.pill::before { content: ""; width: 8px; height: 8px; border-radius: 50%; background: currentColor; }
.pill.closed, .pill.healthy { color: var(--ok); background: var(--ok-bg); }
.pill.half-open { color: #b54708; background: var(--warn-bg); }
.pill.open, .pill.degraded { color: var(--bad); background: var(--bad-bg); }
.pill.unknown, .pill.off { color: var(--muted); background: #f2f4f7; }
header .pill.healthy { background: rgba(18,183,106,.16); }
header .pill.degraded { background: rgba(229,72,77,.18); }
#live { color: #98a2b3; font-size: 12.5px; }
#live.stale { color: #fda29b; }
main { padding: 20px 24px 32px; display: grid; gap: 18px;
  grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 16px 18px; box-shadow: 0 1px 2px rgba(16,24,40,.04); min-width: 0; }
.card.wide { grid-column: 1 / -1; }
.card h2 { font-size: 16px; margin: 0; font-weight: 600; overflow-wrap: anywhere; }
.card .top { display: flex; align-items: center; gap: 10px; margin-bottom: 12px; flex-wrap: wrap; }
.card .top .note { color: var(--muted); font-size: 12.5px; }
.note.left-out, .card.left-out .note { color: #b54708; background: var(--warn-bg);
  border-radius: 6px; padding: 6px 9px; margin-bottom: 10px; font-size: 12.5px; }
.card.left-out .note { margin: 0; overflow-wrap: anywhere; }
.stats { display: grid; grid-template-columns: repeat(4, 1fr); gap: 8px; margin-bottom: 12px; }
.stat { background: #f9fafb; border: 1px solid #eef0f3; border-radius: 8px; padding: 7px 9px; }
.stat .v { font-size: 19px; font-weight: 650; font-variant-numeric: tabular-nums; }
.stat .k { color: var(--muted); font-size: 11.5px; text-transform: uppercase; letter-spacing: .4px; }
.stat.bad .v { color: var(--bad); } .stat.warn .v { color: #b54708; } .stat.good .v { color: #067647; }
.chips { display: flex; flex-wrap: wrap; gap: 6px; margin: 4px 0 10px; align-items: center; }
.chips .label { color: var(--muted); font-size: 12px; margin-right: 2px; }
.chip { background: #eef2ff; color: #2d3a8c; border-radius: 6px; padding: 1px 8px; font-size: 12.5px;
  font-variant-numeric: tabular-nums; }
.chip.none { background: #f2f4f7; color: var(--muted); }
.plot-title { font-size: 12px; color: var(--muted); margin: 8px 0 3px; display: flex; gap: 12px; }
.plot-title .key { display: inline-flex; align-items: center; gap: 4px; }
.plot-title .sw { width: 10px; height: 10px; border-radius: 2px; display: inline-block; }
svg { display: block; width: 100%; }
svg text { font: 10.5px system-ui, sans-serif; fill: var(--muted); }
.kv { color: var(--muted); font-size: 12.5px; margin-top: 8px; overflow-wrap: anywhere; }
.kv b { color: var(--ink); font-weight: 600; }
table { width: 100%; border-collapse: collapse; font-size: 13px; table-layout: fixed; }
th { text-align: left; color: var(--muted); font-weight: 600; font-size: 12px; padding: 6px 8px;
  border-bottom: 1px solid var(--line); }
td { padding: 6px 8px; border-bottom: 1px solid #f0f1f4; vertical-align: top; overflow-wrap: anywhere; }
td.t { font-variant-numeric: tabular-nums; color: var(--muted); width: 80px; }
col.c-time { width: 84px; } col.c-level { width: 84px; } col.c-svc { width: 150px; }
col.c-ev { width: 170px; }
col.c-system { width: 33%; } col.c-tl { width: 12%; } col.c-since { width: 29%; }
.timelines { margin-top: 10px; }
.timelines .plot-title { margin-top: 0; }
.lvl { font-size: 11.5px; font-weight: 600; border-radius: 5px; padding: 1px 7px; }
.lvl.error, .lvl.critical { background: var(--bad-bg); color: var(--bad); }
.lvl.warning { background: var(--warn-bg); color: #b54708; }
.lvl.info, .lvl.debug { background: #eef2ff; color: #2d3a8c; }
.empty { color: var(--muted); padding: 10px 0; }
#error { display: none; background: var(--bad-bg); color: var(--bad); padding: 8px 24px;
  font-weight: 600; }
</style>
</head>
<body>
<header>
  <h1>@TITLE@</h1>
  <span class="sub">resilient_db self-healing dashboard</span>
  <span id="overall" class="pill unknown">loading</span>
  <span class="spacer"></span>
  <span id="process" class="sub"></span>
  <span id="live">connecting…</span>
</header>
<div id="error" role="alert"></div>
<main id="main" data-poll="@POLL@" data-timeout="@TIMEOUT@" data-retry-cap="@RETRY_CAP@" data-events="@EVENTS@" data-states="@MAX_STATES@" data-token-param="@TOKEN_PARAM@"><div class="card wide empty">Loading…</div></main>
<script nonce="@NONCE@">
"use strict";
(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const main = document.getElementById("main");
  const poll = Math.max(@MIN_POLL@, Number(main.dataset.poll) || 2000);
  // a request not answered by then is given up (and said): the page polls on
  const timeout = Math.max(poll, Number(main.dataset.timeout) || 30000);
  // the longest a Retry-After is waited for (a proxy's "come back tomorrow" would leave the
  // page still for a day): an operator can always reload
  const retryCap = Math.max(poll, Number(main.dataset.retryCap) || 600000);
  const maxEvents = Number(main.dataset.events) || 0;
  const maxStates = Number(main.dataset.states) || 0;
  let shown = null;  // the data drawn last: a delta answer (data.delta) adds to it
  // token_auth's ?token=: out of the address bar (history, bookmarks, a Referer), on as a
  // header; the answer's HttpOnly cookie carries it on to a reload
  const tokenParam = main.dataset.tokenParam || "";
  let token = "";
  if (tokenParam) {
    const here = new URL(window.location.href);
    if (here.searchParams.has(tokenParam)) {
      token = here.searchParams.get(tokenParam) || "";
      here.searchParams.delete(tokenParam);
      window.history.replaceState(window.history.state, "", here.pathname + here.search + here.hash);
    }
  }
  // said while the page can't refresh, once that token was refused (rotated out)
  let tokenRefused = "";
  // names from the data (services, counters, states) are looked up in Maps and objects without a
  // prototype: a service named "__proto__" or "constructor" is one like any other
  const lookup = (entries) => Object.assign(Object.create(null), entries);
  const COLORS = lookup({ "closed": "#12b76a", "half-open": "#f79009", "open": "#e5484d" });
  const LABELS = lookup({
    attempts: "attempts", retries: "retries", recovered: "recovered", gave_up: "gave up",
    breaker_opens: "breaker opened here", breaker_rejections: "rejected calls",
    verified_commits: "verified commits", verified_not_committed: "verified not committed",
    unknown_commits: "unknown commits",
    response_validation_failures: "invalid responses", pool_timeouts: "pool full",
    pool_invalidations: "pools replaced", dead_pooled_connections: "dead connections",
    hot_standby_refused_writes: "writes refused by a standby",
    stale_timeline_refusals: "old primary refused",
    stale_timeline_refusals_fleet: "old primary refused (fleet's timeline)"
  });
  const TONE = lookup({ gave_up: "bad", unknown_commits: "bad", breaker_opens: "warn",
    breaker_rejections: "warn", recovered: "good", verified_commits: "good",
    response_validation_failures: "bad", pool_timeouts: "warn", pool_invalidations: "warn",
    dead_pooled_connections: "warn", hot_standby_refused_writes: "bad",
    stale_timeline_refusals: "bad", stale_timeline_refusals_fleet: "bad" });
  // a JSON object's own entries as a Map (JSON.parse makes "__proto__" an own key; reading a
  // missing key of a plain object finds Object.prototype's, assigning "__proto__" sets it)
  function entries(obj) {
    return new Map(obj && typeof obj === "object" ? Object.entries(obj) : []);
  }

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function svgEl(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const k in attrs) node.setAttribute(k, String(attrs[k]));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }
  function stateClass(state) {
    return ["closed", "half-open", "open", "off"].includes(state) ? state : "unknown";
  }
  function normState(state) {
    return state === "half_open" ? "half-open" : String(state);
  }
  function clock(ts) {
    const d = new Date(ts * 1000);
    return d.toLocaleTimeString([], { hour12: false });
  }
  function chips(label, counts) {
    const row = el("div", "chips");
    row.appendChild(el("span", "label", label));
    const keys = Object.keys(counts || {}).sort((a, b) => counts[b] - counts[a]);
    if (!keys.length) row.appendChild(el("span", "chip none", "none"));
    for (const k of keys) row.appendChild(el("span", "chip", k + ": " + counts[k]));
    return row;
  }
  function plotTitle(text, keys) {
    const t = el("div", "plot-title");
    t.appendChild(el("span", null, text));
    for (const [name, color] of keys) {
      const key = el("span", "key");
      const sw = el("span", "sw");
      sw.style.background = color;
      key.appendChild(sw);
      key.appendChild(el("span", null, name));
      t.appendChild(key);
    }
    return t;
  }
  function axis(svg, w, h, from, to) {
    const span = to - from;
    const minutes = span / 60;
    const step = minutes > 6 ? 120 : minutes > 2 ? 60 : 30;
    for (let s = 0; s <= span + 0.001; s += step) {
      const x = w - (s / span) * w;
      svg.appendChild(svgEl("line", { x1: x, x2: x, y1: 0, y2: h - 14, stroke: "#eef0f3" }));
      const label = s === 0 ? "now" : "-" + (s >= 60 ? (s / 60) + " min" : s + " s");
      const anchor = s === 0 ? "end" : x < 30 ? "start" : "middle";
      svg.appendChild(svgEl("text", { x: s === 0 ? w : x, y: h - 2, "text-anchor": anchor }, label));
    }
  }
  function breakerPlot(changes, current, from, to, since) {
    const w = 600, h = 40;
    const svg = svgEl("svg", { viewBox: "0 0 " + w + " " + h, preserveAspectRatio: "none",
      role: "img", "aria-label": "circuit breaker state over time" });
    const x = (t) => Math.max(0, Math.min(w, ((t - from) / (to - from)) * w));
    let state = changes.length ? "closed" : current;
    let start = Math.max(from, since);  // nothing is known from before the recording began
    const segs = [];
    for (const [t, s] of changes) {
      if (t > from) segs.push([start, t, state]);
      start = Math.max(from, t);
      state = normState(s);
    }
    segs.push([start, to, current || state]);
    for (const [a, b, s] of segs) {
      if (b <= a) continue;
      svg.appendChild(svgEl("rect", { x: x(a), y: 2, width: Math.max(1, x(b) - x(a)), height: 20,
        fill: COLORS[s] || "#d0d5dd", rx: 2 }));
    }
    axis(svg, w, h, from, to);
    svg.dataset.segments = String(segs.length);
    return svg;
  }
  function ratePlot(buckets, from, to, series) {
    const w = 600, h = 96, top = 4, base = h - 16;
    const svg = svgEl("svg", { viewBox: "0 0 " + w + " " + h, role: "img",
      "aria-label": "retries per second" });
    let max = 1;
    for (const row of buckets) max = Math.max(max, series.reduce((sum, [col]) => sum + row[col], 0));
    const bw = Math.max(1, w / (to - from));
    axis(svg, w, h, from, to);
    svg.appendChild(svgEl("line", { x1: 0, x2: w, y1: base, y2: base, stroke: "#d0d5dd" }));
    svg.appendChild(svgEl("text", { x: 2, y: top + 9 }, max + "/s"));
    for (const row of buckets) {
      const sec = row[0];
      if (sec < from) continue;
      const x = ((sec - from) / (to - from)) * w;
      let y = base;
      for (const [col, color] of series) {
        const hgt = (row[col] / max) * (base - top);
        if (!row[col]) continue;
        y -= hgt;
        svg.appendChild(svgEl("rect", { x: x, y: y, width: bw, height: hgt, fill: color }));
      }
    }
    return svg;
  }
  function kvLine(label, obj) {
    const line = el("div", "kv");
    line.appendChild(el("span", null, label + ": "));
    let first = true;
    for (const k of Object.keys(obj)) {
      const v = obj[k];
      if (v !== null && typeof v === "object") continue;
      if (!first) line.appendChild(document.createTextNode(" · "));
      first = false;
      line.appendChild(document.createTextNode(k + " "));
      line.appendChild(el("b", null, String(v)));
    }
    return line;
  }
  function stamp(ts) {
    const d = new Date(ts * 1000);
    const two = (n) => String(n).padStart(2, "0");
    return d.getFullYear() + "-" + two(d.getMonth() + 1) + "-" + two(d.getDate()) + " " +
      two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds());
  }
  // the fleet's timelines the shared breaker's link to Redis knows (its
  // shared.fleet_timelines): the clusters whose old primaries are refused, from which timeline,
  // since when, seen at which server. Every value came from Redis: text only. None: nothing
  function timelinesTable(timelines) {
    const known = entries(timelines);
    const systems = Array.from(known.keys()).sort().filter((system) => {
      const entry = known.get(system);
      return entry !== null && typeof entry === "object";
    });
    if (!systems.length) return null;
    const box = el("div", "timelines");
    box.dataset.fleetTimelines = String(systems.length);
    box.appendChild(el("div", "plot-title", "fleet's timelines: a primary of the cluster on a " +
      "lower timeline is refused (an old primary back after a failover)"));
    const table = el("table");
    const cols = el("colgroup");
    for (const c of ["c-system", "c-tl", "c-since", "c-server"]) cols.appendChild(el("col", c));
    table.appendChild(cols);
    const head = el("tr");
    for (const h of ["cluster (system identifier)", "timeline", "since", "seen at"]) head.appendChild(el("th", null, h));
    table.appendChild(head);
    for (const system of systems) {
      const entry = known.get(system);
      const since = Number(entry.since);
      const tr = el("tr");
      tr.dataset.system = system;
      tr.appendChild(el("td", null, system));
      tr.appendChild(el("td", null, entry.timeline));
      // (null: the message it came by did not say, an earlier release's process)
      tr.appendChild(el("td", null, entry.since !== null && Number.isFinite(since) ? stamp(since) : "unknown"));
      tr.appendChild(el("td", null, entry.server));
      table.appendChild(tr);
    }
    box.appendChild(table);
    return box;
  }
  function leftOutNote(count, limit) {
    return count + (count === 1 ? " service has" : " services have") + " no plots: the " +
      "dashboard keeps per-second series for at most " + limit + " services (a new one takes " +
      "the place of one idle for a whole window)";
  }
  function serviceCard(name, info, series, from, to, since, limit) {
    const card = el("section", "card service");
    card.dataset.service = name;
    const top = el("div", "top");
    top.appendChild(el("h2", null, name));
    const breaker = info.breaker;
    const state = breaker ? normState(breaker.state) : "off";
    const pill = el("span", "pill breaker " + (breaker ? stateClass(state) : "off"),
      breaker ? "breaker " + state : "no breaker");
    pill.dataset.state = state;
    top.appendChild(pill);
    if (breaker) {
      let note = "failures " + breaker.failures + "/" + breaker.failure_threshold;
      if (breaker.retry_after !== undefined) note += " · probes again in " + Number(breaker.retry_after).toFixed(1) + " s";
      top.appendChild(el("span", "note", note));
      if (breaker.by_hand) {
        // an operator's opening (open_breaker), not the database's failures: said, with why
        const hand = el("span", "note by-hand",
          "opened by hand" + (breaker.reason ? ": " + breaker.reason : ""));
        hand.dataset.byHand = "true";
        top.appendChild(hand);
      }
    }
    card.appendChild(top);
    if (!series && limit) {
      const note = el("div", "note left-out", "no plots: the dashboard keeps per-second " +
        "series for at most " + limit + " services, and this one is not among them");
      note.dataset.leftOut = "true";
      card.appendChild(note);
    }
    const counters = info.counters || {};
    const stats = el("div", "stats");
    // the counters named above, then any other count health() has (one added later)
    const keys = Object.keys(LABELS).concat(Object.keys(counters).filter(
      (k) => !(k in LABELS) && typeof counters[k] === "number").sort());
    for (const key of keys) {
      const value = counters[key] || 0;
      const box = el("div", "stat" + (value && TONE[key] ? " " + TONE[key] : ""));
      box.dataset.counter = key;
      box.appendChild(el("div", "v", value));
      box.appendChild(el("div", "k", LABELS[key] || key.replace(/_/g, " ")));
      stats.appendChild(box);
    }
    card.appendChild(stats);
    card.appendChild(chips("retries by class", counters.retries_by_class));
    card.appendChild(chips("retries by SQLSTATE", series ? series.retries_by_sqlstate : {}));
    card.appendChild(plotTitle("circuit breaker", [["closed", COLORS.closed], ["half-open", COLORS["half-open"]], ["open", COLORS.open]]));
    card.appendChild(breakerPlot(series ? series.breaker_states : [], breaker ? state : "off", from, to, since));
    card.appendChild(plotTitle("retries per second", [["retries", "#3e63dd"], ["gave up", "#e5484d"]]));
    card.appendChild(ratePlot(series ? series.buckets : [], from, to, [[1, "#3e63dd"], [2, "#e5484d"]]));
    if (breaker && breaker.shared) card.appendChild(kvLine("shared breaker", breaker.shared));
    const fenced = breaker && breaker.shared ? timelinesTable(breaker.shared.fleet_timelines) : null;
    if (fenced) card.appendChild(fenced);
    if (info.budget) card.appendChild(kvLine("retry budget", info.budget));
    for (const key of Object.keys(info)) {
      if (["breaker", "budget", "counters"].includes(key)) continue;
      const v = info[key];
      if (v && typeof v === "object") card.appendChild(kvLine(key, v));
      else if (v !== null && v !== undefined) card.appendChild(kvLine(key, { value: v }));
    }
    return card;
  }
  function transitionsCard(stats, series, from, to) {
    const card = el("section", "card transitions");
    const top = el("div", "top");
    top.appendChild(el("h2", null, "Status transitions"));
    card.appendChild(top);
    const grid = el("div", "stats");
    for (const key of Object.keys(stats || {})) {
      const box = el("div", "stat" + (stats[key] && key !== "bulk_rows_filtered" ? " warn" : ""));
      box.dataset.counter = key;
      box.appendChild(el("div", "v", stats[key]));
      box.appendChild(el("div", "k", key.replace(/_/g, " ")));
      grid.appendChild(box);
    }
    card.appendChild(grid);
    // rows, as health() counts them; stale moves (the row had moved meanwhile) apart
    card.appendChild(chips("blocked by path", series ? series.blocked_by_via : {}));
    card.appendChild(chips("stale by path", series ? series.stale_by_via : {}));
    card.appendChild(plotTitle("blocked per second", [["blocked", "#f79009"], ["stale", "#7a5af8"]]));
    card.appendChild(ratePlot(series ? series.buckets : [], from, to, [[4, "#f79009"], [5, "#7a5af8"]]));
    return card;
  }
  function eventsCard(events) {
    const card = el("section", "card wide events");
    const top = el("div", "top");
    top.appendChild(el("h2", null, "Recent [SELF-HEAL] events"));
    top.appendChild(el("span", "note", events.length + " shown, newest first"));
    card.appendChild(top);
    if (!events.length) {
      card.appendChild(el("div", "empty", "No self-healing action yet."));
      return card;
    }
    const table = el("table");
    const cols = el("colgroup");
    for (const c of ["c-time", "c-level", "c-svc", "c-ev", "c-msg"]) cols.appendChild(el("col", c));
    table.appendChild(cols);
    const head = el("tr");
    for (const h of ["time", "level", "service", "event", "message"]) head.appendChild(el("th", null, h));
    table.appendChild(head);
    for (const ev of events.slice().reverse()) {
      const tr = el("tr");
      tr.dataset.event = ev.name;
      tr.appendChild(el("td", "t", clock(ev.time)));
      const lvl = el("td");
      lvl.appendChild(el("span", "lvl " + String(ev.level), ev.level));
      tr.appendChild(lvl);
      tr.appendChild(el("td", null, ev.service));
      tr.appendChild(el("td", null, ev.name));
      tr.appendChild(el("td", "msg", ev.message));
      table.appendChild(tr);
    }
    card.appendChild(table);
    return card;
  }
  // the process that answered: behind several workers each poll may reach another, each with
  // figures of its own (health() is per process), so the page says whose it shows
  const processesSeen = new Set();
  function processShown(process) {
    const node = document.getElementById("process");
    if (!process || typeof process !== "object") { node.textContent = ""; return; }
    const who = "pid " + String(process.pid) + " on " + String(process.hostname);
    processesSeen.add(who);
    node.textContent = "figures of " + who + (processesSeen.size > 1
      ? " (" + processesSeen.size + " processes answered this page: each shows its own)" : "");
    document.body.dataset.processes = String(processesSeen.size);
  }
  function render(data) {
    const health = data.health || {};
    const services = health.services || {};
    const series = data.series;  // a Map: see merged()
    const to = data.now;
    const from = to - Math.min(data.window, Math.max(60, to - data.since));
    const open = [];
    const frag = document.createDocumentFragment();
    // services beyond the recorder's bound have no series: said, not left blank
    const leftOut = Array.isArray(data.left_out) ? data.left_out : [];
    if (leftOut.length) {
      const card = el("section", "card wide left-out");
      card.id = "left-out";
      card.appendChild(el("div", "note", leftOutNote(leftOut.length, data.max_services) + ": " +
        leftOut.slice(0, 20).join(", ") + (leftOut.length > 20 ? ", …" : "")));
      frag.appendChild(card);
    }
    // the services health() knows (one forgotten by reset_state() keeps only its old events)
    const known = entries(services);
    for (const name of Array.from(known.keys()).sort()) {
      const info = known.get(name) || {};
      if (info.breaker && normState(info.breaker.state) === "open") open.push(name);
      const limit = leftOut.includes(name) ? data.max_services : 0;
      frag.appendChild(serviceCard(name, info, series.get(name), from, to, data.since, limit));
    }
    frag.appendChild(transitionsCard(health.transitions, series.get(data.no_service), from, to));
    frag.appendChild(eventsCard(data.events || []));
    main.replaceChildren(frag);
    const overall = document.getElementById("overall");
    overall.className = "pill " + (health.healthy ? "healthy" : "degraded");
    // not healthy for another reason than an open breaker (a health() check that failed says
    // why in health.problem): that reason, not an empty list of breakers
    overall.textContent = health.healthy ? "healthy" : open.length
      ? "degraded: breaker open for " + open.join(", ")
      : "degraded" + (health.problem ? ": " + String(health.problem) : "");
    document.body.dataset.healthy = String(!!health.healthy);
    processShown(data.process);
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  }
  // a delta answer (only what changed after the cursor sent) added to the data shown: rows by
  // their second, state changes and events appended, what left the window dropped, as the
  // server's full answer holds them. The series are kept in a Map by service name.
  function merged(old, data) {
    if (!data.delta || !old) return Object.assign({}, data, { series: entries(data.series) });
    const start = data.now - data.window;
    const series = new Map(old.series);
    for (const [name, add] of entries(data.series)) {
      const had = series.get(name);
      if (had) {
        const first = add.buckets.length ? add.buckets[0][0] : Infinity;
        add.buckets = had.buckets.filter((row) => row[0] < first).concat(add.buckets);
        add.breaker_states = had.breaker_states.concat(add.breaker_states);
      }
      series.set(name, add);
    }
    for (const [name, s] of series) {
      const rows = s.buckets.filter((row) => row[0] > Math.floor(data.now) - data.window);
      let states = maxStates ? s.breaker_states.slice(-maxStates) : s.breaker_states;
      let first = 0;
      for (let i = states.length - 1; i >= 0; i--) if (states[i][0] <= start) { first = i; break; }
      states = states.slice(first);
      series.set(name, Object.assign({}, s, { buckets: rows, breaker_states: states }));
    }
    const events = (old.events || []).concat(data.events || []);
    return Object.assign({}, data, { series: series, events: maxEvents ? events.slice(-maxEvents) : [] });
  }
  // how long an answer asks the page to wait (ms), by its Retry-After: seconds, or an HTTP date
  // (measured from the answer's own Date when it has one: the browser's clock may be off); 0
  // for none, one that can't be read, or one already past. Honoured on the answers that say
  // "not now": 429 and every 5xx (a rate limit, a proxy's maintenance, a gateway whose upstream
  // is restarting), 401 and 403 (a check of the application's own, a proxy's login, limiting
  // attempts)
  function retryAfter(answer) {
    if (![401, 403, 429].includes(answer.status) && !(answer.status >= 500 && answer.status < 600)) return 0;
    const value = (answer.headers.get("Retry-After") || "").trim();
    let ms = NaN;
    if (/^[0-9]+$/.test(value)) ms = Number(value) * 1000;
    else if (/^[A-Za-z]{3,9},? /.test(value)) {  // IMF-fixdate, RFC 850 or asctime's
      const sent = Date.parse(answer.headers.get("Date") || "");
      ms = Date.parse(value) - (Number.isFinite(sent) ? sent : Date.now());
    }
    return Number.isFinite(ms) && ms > 0 ? ms : 0;
  }
  // a problem+json answer's detail (the dashboard's 401 says how to give a token), cut short
  async function problemDetail(answer) {
    try {
      if (!/json/i.test(answer.headers.get("Content-Type") || "")) return "";
      const problem = await answer.json();
      const detail = problem && typeof problem.detail === "string" ? problem.detail : "";
      return detail ? ": " + (detail.length > 300 ? detail.slice(0, 300) + "…" : detail) : "";
    } catch (err) {
      return "";
    }
  }
  async function refresh() {
    const live = document.getElementById("live");
    const error = document.getElementById("error");
    const control = new AbortController();
    const timer = window.setTimeout(() => control.abort(), timeout);
    let wait = poll, asked = 0, said = "";
    const sent = token;  // the header's token, if this request carries one
    try {
      const query = new URLSearchParams(window.location.search);
      if (shown && shown.cursor) query.set("after", shown.cursor);
      const search = query.toString();
      const answer = await fetch("data.json" + (search ? "?" + search : ""),
        { cache: "no-store", credentials: "same-origin", signal: control.signal,
          headers: sent ? { "Accept": "application/json", "Authorization": "Bearer " + sent }
            : { "Accept": "application/json" } });
      if (sent && (answer.status === 401 || answer.status === 403) && !answer.headers.has("Retry-After")) {
        // the token of the page's URL is refused (rotated out): sent no more, the requests
        // carry the cookie alone (answered 401, and cleared, if it is the same token's). A
        // refusal with Retry-After says "not now" (a proxy limiting requests), not "never":
        // the token is kept, and sent again after the wait
        token = "";
        tokenRefused = "The token this page was opened with is no longer accepted: open the " +
          "dashboard with ?" + tokenParam + "=<new token>. ";
      }
      if (!answer.ok) {
        asked = retryAfter(answer);
        said = (answer.headers.get("Retry-After") || "").trim().slice(0, 40);
        wait = Math.max(poll, Math.min(asked, retryCap));
        throw new Error("the dashboard answered " + answer.status + await problemDetail(answer));
      }
      const data = merged(shown, await answer.json());
      render(data);
      shown = data;
      document.body.dataset.delta = String(!!data.delta);
      live.textContent = "live · updated " + new Date().toLocaleTimeString([], { hour12: false });
      live.className = "";
      tokenRefused = "";
      error.style.display = "none";
    } catch (err) {
      live.textContent = "not updating";
      live.className = "stale";
      const why = control.signal.aborted ? "no answer within " + (timeout / 1000) + " s"
        : err && err.message ? err.message : String(err);
      if (wait > poll) {  // asked to wait longer than the page polls: it does, and says so
        const at = clock((Date.now() + wait) / 1000);
        live.textContent = "not updating · waiting until " + at + " (Retry-After)";
        error.textContent = tokenRefused + "Could not refresh: " + why + (/[.!?]$/.test(why) ? " " : ". ") +
          "Asked to wait (Retry-After: " +
          said + "): next try in " + Math.ceil(wait / 1000) + " s, at " + at +
          (asked > wait ? " (waits are cut to " + Math.ceil(retryCap / 1000) + " s)" : "");
      } else {
        error.textContent = tokenRefused + "Could not refresh: " + why + " (retrying)";
      }
      error.style.display = "block";
    } finally {
      window.clearTimeout(timer);
      window.setTimeout(refresh, wait);
    }
  }
  refresh();
})();
</script>
</body>
</html>
"""


def render_page(
    *,
    title: str,
    nonce: str,
    poll_ms: int,
    min_poll_ms: int = 100,
    events: int = 100,
    timeout_ms: int = 30_000,
    retry_cap_ms: int = 600_000,
    token_param: str | None = None,
) -> str:
    """The page, with ``title`` escaped and the script's nonce; it polls every ``poll_ms``,
    never more often than every ``min_poll_ms`` (the dashboard's ``MIN_POLL_SECONDS``), gives
    up a request not answered within ``timeout_ms`` (or ``poll_ms``, if longer), saying so,
    and keeps the last ``events`` events (as many as ``data.json`` serves in full). An error
    answer's ``Retry-After`` (401, 403, 429, any 5xx) is waited for, up to ``retry_cap_ms`` (or
    ``poll_ms``, if longer), saying so. A
    ``token_param`` (``token_auth``'s query parameter) is taken out of the address bar and
    sent on as an ``Authorization: Bearer`` header instead, until an answer refuses it (401 or
    403 without ``Retry-After``: rotated out): the page then says so and sends the cookie
    alone."""
    # the title last: a title holding a placeholder (``@NONCE@``) is shown as written
    return (
        _TEMPLATE.replace("@NONCE@", nonce)
        .replace("@MIN_POLL@", str(int(min_poll_ms)))
        .replace("@POLL@", str(int(poll_ms)))
        .replace("@TIMEOUT@", str(int(timeout_ms)))
        .replace("@RETRY_CAP@", str(int(retry_cap_ms)))
        .replace("@EVENTS@", str(int(events)))
        .replace("@MAX_STATES@", str(MAX_STATE_CHANGES))
        .replace("@TOKEN_PARAM@", html.escape(token_param or "", quote=True))
        .replace("@TITLE@", html.escape(title, quote=True))
    )
