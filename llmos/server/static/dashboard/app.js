// llmos dashboard: one page, no build step, no dependencies. It signs in with an API key
// (kept in sessionStorage only), reads the live feed (/v1/dashboard/feed, server-sent
// events read through fetch so the key can ride in a header) and draws what the kernel is
// doing; actions go through the kernel and process APIs with the same key.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "llmos.key";
  const WINDOW_S = 600;                       // history kept: the last ten minutes
  const SMOOTH_S = 10;                        // the tenant chart's moving average
  const MAX_SWAP_SQUARES = 1200;
  // Owners' colours: readable on light and dark, none close to the cached-prefix stripes.
  const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#59a14f", "#b07aa1", "#edc948", "#9c755f", "#ff9da7",
                   "#bcbd22", "#17becf"];
  const C = { blue: "#4e79a7", orange: "#f28e2b", red: "#e15759", green: "#59a14f", purple: "#b07aa1",
              teal: "#76b7b2", brown: "#9c755f" };

  const S = {
    key: "", me: null, samples: [], interval: 1, feed: null, tab: "overview",
    sort: { key: null, dir: 1 }, filter: "", colourBy: "tenant", highlight: null,
    timers: [], logPid: null, logOffset: 0, chat: [], chatAbort: null, chartWindow: 300,
  };

  // -- formatting ---------------------------------------------------------------------

  function fmtNum(v, digits = 1) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (Math.abs(v) >= 1e6) return (v / 1e6).toFixed(digits) + "M";
    if (Math.abs(v) >= 1e4) return (v / 1e3).toFixed(digits) + "k";
    return Number.isInteger(v) ? String(v) : v.toFixed(digits);
  }
  function fmtBytes(b) {
    if (b === null || b === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(b) >= 1024 && i < units.length - 1) { b /= 1024; i++; }
    return (i === 0 ? String(Math.round(b)) : b.toFixed(b >= 100 ? 0 : 1)) + " " + units[i];
  }
  function fmtSec(s) {
    if (s === null || s === undefined) return "–";
    if (s === 0) return "0 s";
    if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 1 : 0) + " ms";
    if (s < 120) return s.toFixed(1) + " s";
    return Math.round(s / 60) + " min";
  }
  function fmtPct(x) { return x === null || x === undefined ? "–" : (x * 100).toFixed(x < 0.1 ? 1 : 0) + "%"; }
  function fmtClock(t) { return new Date(t * 1000).toLocaleTimeString(); }
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }
  function setText(node, text) { if (node.textContent !== text) node.textContent = text; }
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // Stable colours: a name's hash picks its colour (the same in every tab and session),
  // moving on to the next free colour when another name on this page holds that one.
  const colourMaps = { tenant: new Map(), request: new Map() };
  function colourOf(kind, name) {
    const m = colourMaps[kind];
    if (!m.has(name)) {
      let h = 0;
      for (const ch of String(name)) h = (h * 31 + ch.codePointAt(0)) >>> 0;
      const taken = new Set(m.values());
      let i = h % PALETTE.length;
      for (let k = 0; k < PALETTE.length && taken.has(PALETTE[i]); k++) i = (i + 1) % PALETTE.length;
      m.set(name, PALETTE[i]);
    }
    return m.get(name);
  }

  // -- the API ------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, code) { super(message); this.status = status; this.code = code; }
  }
  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (S.key) h.Authorization = "Bearer " + S.key;
    return h;
  }
  async function errorOf(r) {
    let message = r.status + " " + r.statusText, code = null;
    try {
      const j = await r.json();
      if (j && j.error) { message = j.error.message || message; code = j.error.code || null; }
      else if (j && j.detail) message = typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail);
    } catch (e) { /* not JSON: keep the status line */ }
    return new ApiError(r.status, message, code);
  }
  async function api(path, opts = {}) {
    const init = { method: opts.method || "GET", headers: headers(), cache: "no-store", signal: opts.signal };
    if (opts.body !== undefined) { init.body = JSON.stringify(opts.body); init.headers["Content-Type"] = "application/json"; }
    const r = await fetch(path, init);
    if (!r.ok) {
      const err = await errorOf(r);
      if (r.status === 401 && S.me) signOut("The server no longer accepts this key: " + err.message);
      throw err;
    }
    return opts.raw ? r : r.json();
  }

  // Server-sent events from a fetch() body: blocks separated by a blank line, each with
  // "event:" and "data:" lines (":" starts a comment, used as a keep-alive).
  async function readSSE(body, onEvent) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let m;
      while ((m = /\r?\n\r?\n/.exec(buf))) {
        const block = buf.slice(0, m.index);
        buf = buf.slice(m.index + m[0].length);
        let event = "message";
        const data = [];
        for (const line of block.split(/\r?\n/)) {
          if (!line || line.startsWith(":")) continue;
          const i = line.indexOf(":");
          const field = i < 0 ? line : line.slice(0, i);
          let val = i < 0 ? "" : line.slice(i + 1);
          if (val.startsWith(" ")) val = val.slice(1);
          if (field === "event") event = val;
          else if (field === "data") data.push(val);
        }
        if (data.length) onEvent(event, data.join("\n"));
      }
    }
  }

  // -- sign in ------------------------------------------------------------------------

  async function whoami(key) {
    const r = await fetch("/v1/dashboard/whoami", {
      headers: key ? { Authorization: "Bearer " + key } : {}, cache: "no-store" });
    if (!r.ok) throw await errorOf(r);
    return r.json();
  }

  function showSignIn(message) {
    $("app").hidden = true;
    $("signin").hidden = false;
    $("sign-out").hidden = true;
    setText($("who"), "");
    setText($("signin-error"), message || "");
    $("signin-key").focus();
  }

  async function onSignIn(ev) {
    ev.preventDefault();
    const key = $("signin-key").value.trim();
    if (!key) return;
    $("signin-submit").disabled = true;
    setText($("signin-error"), "");
    try {
      const me = await whoami(key);
      S.key = key;
      sessionStorage.setItem(KEY_STORAGE, key);
      $("signin-key").value = "";
      enter(me);
    } catch (e) {
      setText($("signin-error"), e.status === 401 ? "That key was not accepted: " + e.message
        : e.status ? e.message : "Could not reach the server: " + e.message);
    } finally {
      $("signin-submit").disabled = false;
    }
  }

  function enter(me) {
    S.me = me;
    $("signin").hidden = true;
    $("app").hidden = false;
    $("sign-out").hidden = !me.auth;
    const who = $("who");
    who.replaceChildren(
      me.auth ? "tenant " : "auth off · tenant ", el("b", { text: me.tenant }),
      me.admin ? " " : null, me.admin ? el("span", { class: "badge", text: "admin" }) : null,
      " · " + (me.model || ""));
    setText($("footer"), "llmos " + (me.version || "") + " · dashboard");
    const models = me.models && me.models.length ? me.models : [me.model];
    $("pg-model").replaceChildren(...models.map((m) => el("option", { value: m, text: m })));
    const fromHash = location.hash.slice(1);
    selectTab(TABS.includes(fromHash) ? fromHash : "overview");
    startFeed();
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY_STORAGE);
    S.key = ""; S.me = null; S.samples = [];
    if (S.feed) { S.feed.abort(); S.feed = null; }
    if (S.chatAbort) S.chatAbort.abort();
    stopPolling();
    setConn("", "offline");
    showSignIn(message);
  }

  // -- the live feed ------------------------------------------------------------------

  function setConn(cls, text) {
    const c = $("conn");
    c.className = "conn " + cls;
    setText(c.querySelector(".conn-text"), text);
  }

  async function startFeed() {
    if (S.feed) S.feed.abort();
    const ctl = new AbortController();
    S.feed = ctl;
    let backoff = 1000;
    while (!ctl.signal.aborted) {
      try {
        setConn("retry", "connecting…");
        const r = await fetch("/v1/dashboard/feed", { headers: headers(), cache: "no-store", signal: ctl.signal });
        if (r.status === 401) { signOut("The server no longer accepts this key."); return; }
        if (!r.ok) throw await errorOf(r);
        await readSSE(r.body, (event, data) => {
          const msg = JSON.parse(data);
          if (event === "hello") {
            S.interval = msg.interval || 1;
            S.samples = (msg.history || []).slice();
            backoff = 1000;
            setConn("live", "live");
            render();
          } else if (event === "sample") {
            addSample(msg);
          }
        });
      } catch (e) {
        if (ctl.signal.aborted) return;
      }
      if (ctl.signal.aborted) return;
      setConn("retry", "reconnecting in " + Math.round(backoff / 1000) + " s");
      await sleep(backoff);
      backoff = Math.min(backoff * 2, 15000);
    }
  }

  function addSample(s) {
    const arr = S.samples;
    arr.push(s);
    while (arr.length && arr[0].t < s.t - WINDOW_S) arr.shift();
    if (!document.hidden) render();      // a background tab keeps the history but draws nothing
  }

  const latest = () => S.samples[S.samples.length - 1];

  function render() {
    const s = latest();
    if (!s) return;
    if (S.tab === "overview") renderOverview(s);
    else if (S.tab === "memory") renderMemory(s);
    else if (S.tab === "requests") renderRequests(s);
    else if (S.tab === "tenants") renderTenants(s);
    setText($("footer"), "llmos " + ((S.me && S.me.version) || "") + " · last sample " + fmtClock(s.t));
  }

  // -- charts (canvas, drawn here) ----------------------------------------------------

  function cssVar(name) { return getComputedStyle(document.documentElement).getPropertyValue(name).trim(); }

  class Chart {
    // series: [{label, color}]; opts: {fmt, max (fixed top), stacked}
    constructor(canvas, legend, series, opts = {}) {
      this.canvas = canvas; this.legend = legend; this.series = series; this.opts = opts;
      this.ts = []; this.cols = []; this.hover = null;
      canvas.addEventListener("mousemove", (e) => this.onHover(e));
      canvas.addEventListener("mouseleave", () => { this.hover = null; this.draw(); });
    }
    set(ts, cols, series) {
      if (series) this.series = series;
      this.ts = ts; this.cols = cols;
      this.canvas.dataset.points = String(ts.length);
      if (ts.length) this.canvas.dataset.last = String(ts[ts.length - 1]);
      this.draw();
    }
    onHover(e) {
      if (!this.ts.length) return;
      const r = this.canvas.getBoundingClientRect();
      const x = e.clientX - r.left;
      const [t0, t1] = this.domain();
      const t = t0 + ((x - this.padL) / Math.max(1, r.width - this.padL - 6)) * (t1 - t0);
      let best = 0;
      for (let i = 0; i < this.ts.length; i++) if (Math.abs(this.ts[i] - t) < Math.abs(this.ts[best] - t)) best = i;
      this.hover = best;
      this.draw();
    }
    domain() {
      const t1 = this.ts.length ? this.ts[this.ts.length - 1] : Date.now() / 1000;
      return [t1 - S.chartWindow, t1];
    }
    draw() {
      const c = this.canvas, w = c.clientWidth, h = c.clientHeight;
      if (!w || !h) return;
      const dpr = window.devicePixelRatio || 1;
      if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
        c.width = Math.round(w * dpr); c.height = Math.round(h * dpr);
      }
      const g = c.getContext("2d");
      g.setTransform(dpr, 0, 0, dpr, 0, 0);
      g.clearRect(0, 0, w, h);
      const fmt = this.opts.fmt || ((v) => fmtNum(v));
      const [t0, t1] = this.domain();
      const first = this.ts.findIndex((t) => t >= t0);
      const lo = first < 0 ? this.ts.length : first;
      // stacked: cumulative sums per point; otherwise the values as they are
      let rows = this.cols;
      if (this.opts.stacked) {     // cumulative sums; a point missing in any series is a gap in all
        rows = [];
        let acc = this.ts.map(() => 0);
        for (const col of this.cols) {
          acc = acc.map((a, i) => (a === null || col[i] === null || col[i] === undefined ? null : a + col[i]));
          rows.push(acc.slice());
        }
      }
      let top = this.opts.max || 0;
      if (!this.opts.max) {
        for (const col of rows) for (let i = lo; i < col.length; i++) if (col[i] !== null && col[i] > top) top = col[i];
        top = niceCeil(top || 1);
      }
      g.font = "11px system-ui, sans-serif";
      const labels = [0, 0.25, 0.5, 0.75, 1].map((f) => fmt(top * f));
      this.padL = Math.max(...labels.map((l) => g.measureText(l).width)) + 10;
      const padB = 16, padT = 6, padR = 6;
      const X = (t) => this.padL + ((t - t0) / (t1 - t0)) * (w - this.padL - padR);
      const Y = (v) => padT + (1 - v / top) * (h - padT - padB);
      g.strokeStyle = cssVar("--grid"); g.fillStyle = cssVar("--muted"); g.lineWidth = 1;
      g.textAlign = "right"; g.textBaseline = "middle";
      [0, 0.25, 0.5, 0.75, 1].forEach((f, i) => {
        const y = Math.round(Y(top * f)) + 0.5;
        g.beginPath(); g.moveTo(this.padL, y); g.lineTo(w - padR, y); g.stroke();
        g.fillText(labels[i], this.padL - 5, y);
      });
      g.textAlign = "center"; g.textBaseline = "alphabetic";
      const step = S.chartWindow <= 120 ? 30 : S.chartWindow <= 300 ? 60 : 120;
      for (let ago = 0; ago <= S.chartWindow; ago += step) {
        const x = X(t1 - ago);
        g.fillText(ago === 0 ? "now" : "-" + (ago >= 60 ? ago / 60 + "m" : ago + "s"), Math.min(Math.max(x, this.padL + 12), w - 14), h - 3);
      }
      const n = this.ts.length;
      const gap = 3 * S.interval;      // a hole in the samples longer than this breaks the line
      for (let k = rows.length - 1; k >= 0; k--) {
        const col = rows[k], color = this.series[k] ? this.series[k].color : "#888";
        g.strokeStyle = color; g.lineWidth = 1.6;
        if (this.opts.stacked) {
          const below = k > 0 ? rows[k - 1] : null;
          g.fillStyle = color; g.globalAlpha = 0.8;
          for (let a = lo; a < n;) {           // one filled band per run of points without a gap
            if (col[a] === null) { a++; continue; }
            let b = a;
            while (b + 1 < n && col[b + 1] !== null && this.ts[b + 1] - this.ts[b] <= gap) b++;
            g.beginPath();
            for (let i = a; i <= b; i++) g.lineTo(X(this.ts[i]), Y(col[i]));
            for (let i = b; i >= a; i--) g.lineTo(X(this.ts[i]), Y(below ? below[i] : 0));
            g.closePath(); g.fill();
            a = b + 1;
          }
          g.globalAlpha = 1;
          continue;
        }
        g.beginPath();
        let pen = false;
        for (let i = lo; i < n; i++) {
          const v = col[i];
          if (v === null || v === undefined || (i > lo && this.ts[i] - this.ts[i - 1] > gap)) { pen = false; if (v === null || v === undefined) continue; }
          const x = X(this.ts[i]), y = Y(v);
          if (pen) g.lineTo(x, y); else g.moveTo(x, y);
          pen = true;
        }
        g.stroke();
      }
      const at = this.hover !== null && this.hover < n ? this.hover : n - 1;
      if (this.hover !== null && at >= lo) {
        const x = Math.round(X(this.ts[at])) + 0.5;
        g.strokeStyle = cssVar("--muted"); g.setLineDash([3, 3]);
        g.beginPath(); g.moveTo(x, padT); g.lineTo(x, h - padB); g.stroke(); g.setLineDash([]);
      }
      this.renderLegend(at, fmt);
    }
    renderLegend(at, fmt) {
      if (!this.legend) return;
      const items = this.series.map((s, k) => {
        const v = at >= 0 && this.cols[k] ? this.cols[k][at] : null;
        return el("span", {}, el("span", { class: "sw", style: "background:" + s.color }), s.label + " ", el("b", { text: fmt(v) }));
      });
      if (this.hover !== null && at >= 0) items.push(el("span", { text: "at " + fmtClock(this.ts[at]) }));
      this.legend.replaceChildren(...items);
      const c = this.canvas;
      c.setAttribute("aria-label", (c.dataset.title || "") + ": " + this.series.map((s, k) =>
        s.label + " " + fmt(at >= 0 && this.cols[k] ? this.cols[k][at] : null)).join(", "));
    }
  }

  // A top for the y axis whose quarters are round numbers.
  function niceCeil(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1.2, 1.6, 2, 4, 6, 8, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  const ms = (v) => (v === null || v === undefined ? null : v * 1000);
  const fmtMs = (v) => (v === null || v === undefined ? "–" : v === 0 ? "0" : v >= 1000 ? (v / 1000).toFixed(1) + " s" : v.toFixed(v < 10 ? 1 : 0) + " ms");
  const fmtRate = (v) => (v === null || v === undefined ? "–" : fmtNum(v) + "/s");
  const fmtP = (v) => (v === null || v === undefined ? "–" : v === 0 ? "0%" : v.toFixed(v < 10 ? 1 : 0) + "%");
  let charts = null;
  function makeCharts() {
    const mk = (id, series, opts) => {
      const c = $("chart-" + id);
      c.dataset.title = c.getAttribute("aria-label");
      return new Chart(c, $("legend-" + id), series, opts);
    };
    charts = {
      tokens: mk("tokens", [{ label: "output", color: C.blue }, { label: "prompt", color: C.orange }], { fmt: fmtRate }),
      requests: mk("requests", [{ label: "running", color: C.green }, { label: "waiting", color: C.orange },
        { label: "swapped", color: C.blue }, { label: "suspended", color: C.purple }], {}),
      memory: mk("memory", [{ label: "KV used", color: C.blue }, { label: "KV cached", color: C.teal },
        { label: "swap host", color: C.red }], { fmt: fmtP, max: 100 }),
      prefix: mk("prefix", [{ label: "hit rate", color: C.green }], { fmt: fmtP, max: 100 }),
      ttft: mk("ttft", [{ label: "p50", color: C.blue }, { label: "p90", color: C.orange }, { label: "p99", color: C.red }], { fmt: fmtMs }),
      itl: mk("itl", [{ label: "p50", color: C.blue }, { label: "p90", color: C.orange }, { label: "p99", color: C.red }], { fmt: fmtMs }),
      cpu: mk("cpu", [{ label: "CPU", color: C.purple }], { fmt: fmtP }),
      rss: mk("rss", [{ label: "RSS", color: C.brown }], { fmt: fmtBytes }),
      tenants: new Chart($("chart-tenants"), $("legend-tenants"), [], { stacked: true }),
    };
    $("chart-tenants").dataset.title = "Tokens per tenant";
  }

  function pct(a, b) { return b ? (100 * a) / b : null; }

  // -- overview -------------------------------------------------------------------------

  function stat(label, value, sub, meter) {
    return el("div", { class: "stat" }, el("div", { class: "label", text: label }), el("div", { class: "value", text: value }),
      sub ? el("div", { class: "sub", text: sub }) : null,
      meter === undefined ? null : el("div", { class: "meter" }, el("i", { style: "width:" + Math.min(100, Math.max(0, meter)).toFixed(1) + "%" })));
  }

  function renderOverview(s) {
    const kv = s.kv, sw = s.swap, lat = s.latency, rq = s.requests;
    $("overview-stats").replaceChildren(
      stat("Output tokens/s", fmtNum(s.tokens_per_s.output), "prompt " + fmtNum(s.tokens_per_s.prompt) + "/s"),
      stat("Requests running", String(rq.running), `waiting ${rq.waiting} · swapped ${rq.swapped} · suspended ${rq.suspended}`),
      stat("KV pool", fmtPct(kv.total ? kv.used / kv.total : 0), `${kv.used} of ${kv.total} blocks · ${kv.cached} cached`, pct(kv.used, kv.total)),
      stat("Swap tier", fmtBytes(sw.host_bytes),
        `of ${fmtBytes(sw.host_budget)} host · disk ${fmtBytes(sw.disk_bytes)} · ${sw.swapped_requests} req`,
        pct(sw.host_bytes, sw.host_budget)),
      stat("Prefix cache hit rate", fmtPct(s.prefix_cache.queries ? s.prefix_cache.hit_rate : null),
        `${s.prefix_cache.hits} of ${s.prefix_cache.queries} lookups`),
      stat("TTFT p50", fmtSec(lat.ttft.p50), "p90 " + fmtSec(lat.ttft.p90) + " · p99 " + fmtSec(lat.ttft.p99)),
      stat("Inter-token p50", fmtSec(lat.itl.p50), "p90 " + fmtSec(lat.itl.p90) + " · p99 " + fmtSec(lat.itl.p99)),
      stat("Server", fmtP(s.server.cpu_percent) + " CPU", "RSS " + fmtBytes(s.server.rss_bytes)));
    const xs = S.samples, ts = xs.map((x) => x.t), col = (f) => xs.map(f);
    charts.tokens.set(ts, [col((x) => x.tokens_per_s.output), col((x) => x.tokens_per_s.prompt)]);
    charts.requests.set(ts, ["running", "waiting", "swapped", "suspended"].map((k) => col((x) => x.requests[k])));
    charts.memory.set(ts, [col((x) => pct(x.kv.used, x.kv.total)), col((x) => pct(x.kv.cached, x.kv.total)),
      col((x) => pct(x.swap.host_bytes, x.swap.host_budget))]);
    charts.prefix.set(ts, [col((x) => (x.prefix_cache.queries ? 100 * x.prefix_cache.hit_rate : null))]);
    charts.ttft.set(ts, ["p50", "p90", "p99"].map((p) => col((x) => ms(x.latency.ttft[p]))));
    charts.itl.set(ts, ["p50", "p90", "p99"].map((p) => col((x) => ms(x.latency.itl[p]))));
    charts.cpu.set(ts, [col((x) => x.server.cpu_percent)]);
    charts.rss.set(ts, [col((x) => x.server.rss_bytes)]);
  }

  // -- memory map -----------------------------------------------------------------------

  let blockEls = [], blockKeys = [], lastMap = null;

  function ownerInfo(mm, v) {
    if (v === -1) return { cls: "free", key: "free", label: "free" };
    if (v === -2) return { cls: "cached", key: "cached", label: "free, holds a cached prefix (reusable)" };
    const o = mm.owners[v] || {};
    if (!o.tenant && !o.request_id) return { cls: "hidden-owner", key: "other", label: "another tenant's" };
    const name = S.colourBy === "request" ? (o.request_id || "prefix cache (" + o.tenant + ")") : o.tenant;
    const colour = colourOf(S.colourBy, name);
    return { cls: "owned", key: S.colourBy + ":" + name, colour, label: (o.tenant ? "tenant " + o.tenant : "") +
      (o.request_id ? " · request " + o.request_id : " · cached prefix"), tenant: o.tenant, request: o.request_id, name };
  }

  function renderMemory(s) {
    const mm = s.memory_map;
    if (!mm) return;
    lastMap = mm;
    const grid = $("kv-grid");
    if (blockEls.length !== mm.blocks.length) {
      blockEls = mm.blocks.map((_, i) => el("div", { class: "blk", "data-i": String(i) }));
      blockKeys = mm.blocks.map(() => "");
      grid.replaceChildren(...blockEls);
    }
    sizeGrid();
    const shared = new Set(mm.shared || []);
    const counts = new Map();
    let free = 0, cached = 0, other = 0;
    mm.blocks.forEach((v, i) => {
      const o = ownerInfo(mm, v);
      if (o.cls === "free") free++; else if (o.cls === "cached") cached++; else if (o.cls === "hidden-owner") other++;
      else counts.set(o.name, (counts.get(o.name) || 0) + 1);
      const dim = S.highlight && S.highlight !== o.key;
      const key = o.key + "|" + (shared.has(i) ? "s" : "") + (dim ? "d" : "") + "|" + (o.request || "");
      if (blockKeys[i] === key) return;
      blockKeys[i] = key;
      const b = blockEls[i];
      b.className = "blk " + o.cls + (shared.has(i) ? " shared" : "") + (dim ? " dim" : "");
      b.style.background = o.colour || "";
      if (o.request) b.dataset.request = o.request; else delete b.dataset.request;
      if (o.tenant) b.dataset.tenant = o.tenant; else delete b.dataset.tenant;
    });
    const used = mm.blocks.length - free - cached;
    grid.setAttribute("aria-label", `KV pool: ${used} of ${mm.total} blocks in use, ${cached} free with a cached prefix, ${free} free` +
      (other ? `, ${other} held by other tenants` : ""));
    setText($("pool-caption"), `${mm.total} blocks × ${mm.block_size} tokens` + (s.kv.block_bytes ? " × " + fmtBytes(s.kv.block_bytes) : ""));
    setText($("memory-summary"), `${used} used · ${cached} cached · ${free} free · ${shared.size} shared`);
    const legendItem = (key, colour, label, n, cls) => el("button", {
      type: "button", class: "item", "aria-pressed": S.highlight === key ? "true" : "false",
      "aria-label": `Highlight ${label} (${n} blocks)`,
      onclick: () => { S.highlight = S.highlight === key ? null : key; renderMemory(latest()); },
    }, el("span", { class: "sw blk " + (cls || ""), style: colour ? "background:" + colour : "" }), label + " ", el("b", { text: String(n) }));
    const items = [...counts.entries()].sort((a, b) => b[1] - a[1]).map(([name, n]) =>
      legendItem(S.colourBy + ":" + name, colourOf(S.colourBy, name), name, n));
    items.push(legendItem("cached", null, "cached prefix (free)", cached, "cached"));
    items.push(legendItem("free", null, "free", free, "free"));
    if (other) items.push(legendItem("other", null, "other tenants", other, "hidden-owner"));
    if (shared.size) {
      items.push(el("span", {}, el("span", { class: "sw blk owned shared", style: "background:" + PALETTE[0] }),
        "shared prefix ", el("b", { text: String(shared.size) })));
    }
    $("kv-legend").replaceChildren(...items);
    renderSwap(mm.swap, mm);
  }

  // Squares as large as fit a box about half as tall as it is wide (the pool's size varies
  // with the model and kv_cache_memory: a few hundred blocks to many thousands).
  function sizeGrid() {
    const grid = $("kv-grid"), n = blockEls.length, w = grid.clientWidth;
    if (!n || !w) return;
    const h = Math.min(460, Math.max(160, w * 0.45));
    const cell = Math.max(5, Math.min(22, Math.floor(Math.sqrt((w * h) / n)) - 2));
    if (grid.style.getPropertyValue("--cell") !== cell + "px") grid.style.setProperty("--cell", cell + "px");
  }

  function renderSwap(sw, mm) {
    if (!sw) return;
    const bb = sw.block_bytes || 1;
    const seg = (colour, frac, label) => el("i", { style: `width:${Math.min(100, frac * 100).toFixed(2)}%;background:${colour}`, title: label });
    const name = (e) => (S.colourBy === "request" ? e.request_id : e.tenant) || "other tenants";
    const colourFor = (e) => (e.tenant || e.request_id ? colourOf(S.colourBy, name(e)) : cssVar("--hidden"));
    const host = sw.entries.filter((e) => e.where === "host"), disk = sw.entries.filter((e) => e.where === "disk");
    const budget = sw.host_budget || 1;
    const hostSegs = host.map((e) => seg(colourFor(e), (e.blocks * bb) / budget, `${e.request_id || "another tenant's request"}: ${e.blocks} blocks`));
    if (sw.prefix_blocks) hostSegs.push(seg(cssVar("--cached"), (sw.prefix_blocks * bb) / budget, `cached prefixes: ${sw.prefix_blocks} blocks`));
    $("swap-host-bar").replaceChildren(...hostSegs);
    $("swap-host-bar").setAttribute("aria-label", `Host swap: ${fmtBytes(sw.host_bytes)} of ${fmtBytes(sw.host_budget)}`);
    setText($("swap-host-text"), `${fmtBytes(sw.host_bytes)} of ${fmtBytes(sw.host_budget)}` +
      (sw.prefix_blocks ? ` · ${sw.prefix_blocks} prefix blocks` : ""));
    const diskTotal = disk.reduce((a, e) => a + e.blocks * bb, 0) || 1;
    $("swap-disk-bar").replaceChildren(...disk.map((e) => seg(colourFor(e), (e.blocks * bb) / diskTotal,
      `${e.request_id || "another tenant's request"}: ${e.blocks} blocks`)));
    $("swap-disk-bar").setAttribute("aria-label", `Disk swap: ${fmtBytes(sw.disk_bytes)}`);
    setText($("swap-disk-text"), fmtBytes(sw.disk_bytes));
    // the swapped blocks themselves, one square each, as in the pool
    const squares = (entries, prefix) => {
      const out = [];
      const add = (n, colour, cls, label) => {
        for (let i = 0; i < n && out.length < MAX_SWAP_SQUARES; i++) {
          out.push(el("div", { class: "blk " + cls, style: colour ? "background:" + colour : null, title: label }));
        }
      };
      for (const e of entries) {
        add(e.blocks, colourFor(e), e.tenant ? "owned" : "hidden-owner",
          (e.request_id || "another tenant's request") + (e.compressed ? " (int8)" : ""));
      }
      add(prefix, null, "cached", "cached prefix");
      const total = entries.reduce((a, e) => a + e.blocks, 0) + prefix;
      if (total > out.length) out.push(el("span", { class: "more", text: `+${total - out.length} more blocks` }));
      return out;
    };
    $("swap-host-grid").replaceChildren(...squares(host, sw.prefix_blocks || 0));
    $("swap-disk-grid").replaceChildren(...squares(disk, 0));
    const rows = sw.entries.map((e) => el("tr", { "data-request": e.request_id || "" },
      el("td", { class: "mono", text: e.request_id ? "…" + e.request_id.slice(-14) : "(another tenant)", title: e.request_id || "" }),
      el("td", { text: e.tenant || "–" }), el("td", { class: "num", text: String(e.blocks) }),
      el("td", { text: e.where + (e.compressed ? " (int8)" : "") })));
    if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "4", class: "muted", text: "nothing swapped out" })));
    $("swap-entries").replaceChildren(...rows);
  }

  function onGridHover(e) {
    const tip = $("tooltip");
    const b = e.target.closest && e.target.closest(".blk[data-i]");
    if (!b || !lastMap) { tip.hidden = true; return; }
    const i = Number(b.dataset.i);
    const o = ownerInfo(lastMap, lastMap.blocks[i]);
    const shared = (lastMap.shared || []).includes(i);
    tip.textContent = `block ${i} · ${o.label}${shared ? " · shared by several requests" : ""}`;
    tip.hidden = false;
    const x = Math.min(e.clientX + 12, window.innerWidth - tip.offsetWidth - 8);
    tip.style.left = Math.max(4, x) + "px";
    tip.style.top = (e.clientY + 14) + "px";
  }

  // -- requests -------------------------------------------------------------------------

  const reqRows = new Map();   // request_id -> {tr, cells, input, err, row}

  function reqAction(id, action, body) {
    const r = reqRows.get(id);
    setText(r.err, "");
    api(`/v1/kernel/requests/${encodeURIComponent(id)}/${action}`, { method: "POST", body: body || {} })
      .then((res) => {
        setText(r.cells.state.firstChild, res.state);
        r.cells.state.firstChild.className = "state state-" + res.state;
        if (!res.ok) setText(r.err, `${action}: nothing to do (already ${res.state})`);
      })
      .catch((e) => setText(r.err, `${action} failed: ${e.message}`));
  }

  function makeReqRow(row) {
    const id = row.request_id;
    const cells = {};
    const td = (k, cls) => (cells[k] = el("td", { class: cls || "" }));
    const input = el("input", { type: "number", step: "1", "aria-label": "Priority for " + id, value: String(row.priority) });
    if (S.me && S.me.min_priority !== undefined) input.min = String(S.me.min_priority);
    const err = el("div", { class: "row-error", role: "alert" });
    const btn = (label, action) => el("button", { type: "button", class: "btn tiny" + (action === "cancel" ? " danger" : ""),
      "aria-label": label + " request " + id, "data-action": action, text: label, onclick: () => reqAction(id, action) });
    const set = el("button", { type: "button", class: "btn tiny", "aria-label": "Set priority of request " + id, text: "Set",
      onclick: () => {
        const p = Number(input.value);
        if (!Number.isInteger(p)) { setText(err, "priority must be an integer"); return; }
        input.dataset.dirty = "";
        reqAction(id, "priority", { priority: p });
      } });
    input.addEventListener("input", () => { input.dataset.dirty = "1"; });
    input.addEventListener("keydown", (e) => { if (e.key === "Enter") set.click(); });
    const buttons = { cancel: btn("Cancel", "cancel"), suspend: btn("Suspend", "suspend"), resume: btn("Resume", "resume") };
    const tr = el("tr", { "data-request": id },
      el("td", { class: "mono", text: id, title: id }), td("tenant"), td("priority", "num"),
      cells.state = el("td", {}, el("span", { class: "state" })),
      td("prompt_tokens", "num"), td("output_tokens", "num"), td("kv_blocks", "num"), td("waiting_s", "num"), td("owner_pid", "num"),
      el("td", {}, el("div", { class: "actions" }, buttons.cancel, buttons.suspend, buttons.resume, input, set), err));
    return { tr, cells, input, err, buttons };
  }

  function renderRequests(s) {
    const body = $("requests-body");
    const f = S.filter.toLowerCase();
    const missing = (v) => v === null || v === undefined;
    let rows = (s.rows || []).filter((r) => !f || [r.request_id, r.tenant, r.state, r.user, r.owner_pid]
      .some((v) => !missing(v) && String(v).toLowerCase().includes(f)));
    if (S.sort.key) {              // missing values last either way
      const k = S.sort.key, d = S.sort.dir;
      rows = rows.slice().sort((a, b) => (a[k] === b[k] ? 0 : missing(a[k]) ? 1 : missing(b[k]) ? -1 : a[k] < b[k] ? -d : d));
    }
    const seen = new Set();
    rows.forEach((row, i) => {
      seen.add(row.request_id);
      let r = reqRows.get(row.request_id);
      if (!r) { r = makeReqRow(row); reqRows.set(row.request_id, r); }
      r.row = row;
      setText(r.cells.tenant, row.tenant);
      setText(r.cells.priority, String(row.priority));
      const st = r.cells.state.firstChild;
      setText(st, row.state); st.className = "state state-" + row.state;
      setText(r.cells.prompt_tokens, String(row.prompt_tokens));
      setText(r.cells.output_tokens, String(row.output_tokens));
      setText(r.cells.kv_blocks, String(row.kv_blocks));
      setText(r.cells.waiting_s, fmtSec(row.waiting_s));
      setText(r.cells.owner_pid, row.owner_pid === null || row.owner_pid === undefined ? "–" : String(row.owner_pid));
      r.tr.classList.toggle("gone", row.state === "finished");
      r.buttons.suspend.disabled = row.state === "suspended" || row.state === "finished";
      r.buttons.resume.disabled = row.state !== "suspended";
      r.buttons.cancel.disabled = row.state === "finished";
      if (document.activeElement !== r.input && !r.input.dataset.dirty) r.input.value = String(row.priority);
      if (body.children[i] !== r.tr) body.insertBefore(r.tr, body.children[i] || null);
    });
    for (const [id, r] of reqRows) if (!seen.has(id)) { r.tr.remove(); reqRows.delete(id); }
    $("requests-empty").hidden = rows.length > 0;
    const all = s.rows || [];
    setText($("requests-count"), rows.length === all.length ? `${all.length} requests` : `${rows.length} of ${all.length} requests`);
  }

  function onSort(th) {
    const k = th.dataset.key;
    S.sort = { key: k, dir: S.sort.key === k ? -S.sort.dir : 1 };
    for (const h of document.querySelectorAll("#requests-table th[data-key]")) {
      if (h.dataset.key === k) h.setAttribute("aria-sort", S.sort.dir > 0 ? "ascending" : "descending");
      else h.removeAttribute("aria-sort");
    }
    if (latest()) renderRequests(latest());
  }

  // -- tenants --------------------------------------------------------------------------

  function renderTenants(s) {
    const names = new Set();
    for (const x of S.samples) for (const n of Object.keys(x.tenants || {})) names.add(n);
    const list = [...names].sort();
    const xs = S.samples, ts = xs.map((x) => x.t), share = $("tenants-mode").value === "share";
    // a moving average over SMOOTH_S: one step's tokens land in one sample, so raw shares flicker
    const k = Math.max(1, Math.round(SMOOTH_S / S.interval));
    const avg = list.map((n) => {
      let sum = 0;
      return xs.map((x, i) => {
        sum += x.tenants && x.tenants[n] ? x.tenants[n].tokens_per_s : 0;
        const old = xs[i - k];
        if (old) sum -= old.tenants && old.tenants[n] ? old.tenants[n].tokens_per_s : 0;
        return Math.max(0, sum) / Math.min(k, i + 1);
      });
    });
    const cols = share ? avg.map((col) => col.map((v, i) => {
      const total = avg.reduce((a, c) => a + c[i], 0);
      return total > 1e-9 ? (100 * v) / total : null;
    })) : avg;
    charts.tenants.opts.max = share ? 100 : null;
    charts.tenants.opts.fmt = share ? fmtP : fmtRate;
    charts.tenants.set(ts, cols, list.map((n) => ({ label: n, color: colourOf("tenant", n) })));
    // "share now": over the last 30 s, so one quiet second does not read as starvation
    const recent = xs.filter((x) => x.t > s.t - 30);
    const sums = {};
    let total = 0;
    for (const x of recent) for (const [n, t] of Object.entries(x.tenants || {})) { sums[n] = (sums[n] || 0) + t.tokens_per_s; total += t.tokens_per_s; }
    const tenants = s.tenants || {};
    const active = (n, t) => (sums[n] || 0) > 0 || t.kv_blocks > 0;
    const wsum = Object.entries(tenants).reduce((a, [n, t]) => a + (active(n, t) ? t.weight || 0 : 0), 0);
    const rows = Object.entries(tenants).sort((a, b) => a[0].localeCompare(b[0])).map(([n, t]) => el("tr", { "data-tenant": n },
      el("td", {}, el("span", { class: "sw", style: "background:" + colourOf("tenant", n) }), n),
      el("td", { class: "num", text: fmtNum(t.weight, 2) }),
      el("td", { class: "num", text: active(n, t) && wsum ? fmtPct(t.weight / wsum) : "idle" }),
      el("td", { class: "num", text: total ? fmtPct((sums[n] || 0) / total) : "–" }),
      el("td", { class: "num", text: fmtNum(t.tokens_per_s) }),
      el("td", { class: "num", text: fmtNum(t.tokens_served, 1) }),
      el("td", { class: "num", text: String(t.kv_blocks) }),
      el("td", { class: "num", text: t.kv_quota === null || t.kv_quota === undefined ? "none" : String(t.kv_quota) })));
    if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "8", class: "muted", text: "No tenant has used the engine yet." })));
    $("tenants-body").replaceChildren(...rows);
  }

  // -- processes ------------------------------------------------------------------------

  const psRows = new Map();
  const LIVE_STATES = ["starting", "running", "blocked", "waiting-approval", "suspended"];

  function treeOrder(procs) {
    const byPid = new Map(procs.map((p) => [p.pid, p]));
    const kids = new Map();
    const roots = [];
    for (const p of procs) {
      if (p.ppid !== null && p.ppid !== undefined && byPid.has(p.ppid)) {
        if (!kids.has(p.ppid)) kids.set(p.ppid, []);
        kids.get(p.ppid).push(p);
      } else roots.push(p);
    }
    const out = [];
    const walk = (p, depth) => { out.push([p, depth]); for (const c of kids.get(p.pid) || []) walk(c, depth + 1); };
    roots.sort((a, b) => a.pid - b.pid).forEach((p) => walk(p, 0));
    return out;
  }

  function limitsText(l) {
    if (!l) return "–";
    const parts = [];
    for (const [k, v] of Object.entries(l)) {
      if (v === null || v === undefined) continue;
      parts.push(k.replace(/^max_/, "") + " " + (k === "max_memory" ? fmtBytes(v) : k === "max_wall" || k === "max_cpu" ? v + "s" : fmtNum(v)));
    }
    return parts.join(", ") || "none";
  }

  function psAction(pid, action, body) {
    const r = psRows.get(pid);
    setText(r.err, "");
    api(`/v1/processes/${pid}/${action}`, { method: "POST", body: body || undefined })
      .then((res) => {
        const st = r.cells.state.firstChild;
        setText(st, res.state); st.className = "state state-" + res.state;
        if (!res.ok) setText(r.err, `${action}: nothing to do (${res.state})`);
        refreshProcesses();
      })
      .catch((e) => setText(r.err, `${action} failed: ${e.message}`));
  }

  function makePsRow(p) {
    const pid = p.pid, cells = {};
    const td = (k, cls) => (cells[k] = el("td", { class: cls || "" }));
    const err = el("div", { class: "row-error", role: "alert" });
    const btn = (label, action) => el("button", { type: "button", class: "btn tiny" + (action === "kill" ? " danger" : ""),
      "aria-label": `${label} process ${pid}`, "data-action": action, text: label, onclick: () => psAction(pid, action) });
    const prio = el("input", { type: "number", step: "1", "aria-label": "Priority for process " + pid, value: String(p.priority) });
    const weight = el("input", { type: "number", step: "0.1", min: "0.1", "aria-label": "Weight for process " + pid, value: String(p.weight) });
    for (const i of [prio, weight]) i.addEventListener("input", () => { i.dataset.dirty = "1"; });
    const renice = el("button", { type: "button", class: "btn tiny", "aria-label": "Renice process " + pid, text: "Renice",
      onclick: () => {
        const body = { priority: Number(prio.value) };
        if (weight.value) body.weight = Number(weight.value);
        prio.dataset.dirty = ""; weight.dataset.dirty = "";
        psAction(pid, "renice", body);
      } });
    const logs = el("button", { type: "button", class: "btn tiny", "aria-label": "Show logs of process " + pid, text: "Logs",
      onclick: () => openLogs(pid) });
    const buttons = { kill: btn("Kill", "kill"), suspend: btn("Suspend", "suspend"), resume: btn("Resume", "resume") };
    const tr = el("tr", { "data-pid": String(pid) }, td("pid", "num"), td("name"), td("tenant"),
      cells.state = el("td", {}, el("span", { class: "state" })), td("priority", "num"), td("weight", "num"),
      td("tokens", "num"), td("syscalls", "num"), td("mailbox", "num"), td("cpu", "num"), td("rss", "num"), td("limits"),
      td("confinement"), el("td", {}, el("div", { class: "actions" }, logs, buttons.suspend, buttons.resume, buttons.kill, prio, weight, renice), err));
    return { tr, cells, err, prio, weight, buttons };
  }

  async function refreshProcesses() {
    let data;
    try {
      data = await api("/v1/processes" + ($("ps-all").checked ? "?all=true" : ""));
      setText($("ps-error"), "");
    } catch (e) { setText($("ps-error"), "Could not list processes: " + e.message); return; }
    const body = $("ps-body");
    const seen = new Set();
    treeOrder(data.data).forEach(([p, depth], i) => {
      seen.add(p.pid);
      let r = psRows.get(p.pid);
      if (!r) { r = makePsRow(p); psRows.set(p.pid, r); }
      setText(r.cells.pid, String(p.pid));
      r.cells.name.replaceChildren(depth ? el("span", { class: "tree", text: "  ".repeat(depth - 1) + "└ " }) : "", p.name || "");
      r.cells.name.title = (p.argv || []).join(" ");
      setText(r.cells.tenant, p.tenant);
      const st = r.cells.state.firstChild;
      const live = LIVE_STATES.includes(p.state);
      setText(st, p.state + (!live && p.reason && p.reason !== p.state ? " (" + p.reason + ")" : ""));
      st.className = "state state-" + p.state;
      setText(r.cells.priority, String(p.priority));
      setText(r.cells.weight, fmtNum(p.weight, 2));
      setText(r.cells.tokens, fmtNum((p.prompt_tokens || 0) + (p.output_tokens || 0)));
      setText(r.cells.syscalls, fmtNum(p.syscalls));
      setText(r.cells.mailbox, p.mailbox_depth === undefined || p.mailbox_depth === null ? "–" : String(p.mailbox_depth));
      setText(r.cells.cpu, (p.cpu_seconds || 0).toFixed(1));
      setText(r.cells.rss, p.peak_rss ? fmtBytes(p.peak_rss) : "–");
      setText(r.cells.limits, limitsText(p.limits));
      setText(r.cells.confinement, p.confinement || "–");
      r.buttons.kill.disabled = !live;
      r.buttons.suspend.disabled = !live || p.state === "suspended";
      r.buttons.resume.disabled = p.state !== "suspended";
      if (document.activeElement !== r.prio && !r.prio.dataset.dirty) r.prio.value = String(p.priority);
      if (document.activeElement !== r.weight && !r.weight.dataset.dirty) r.weight.value = String(p.weight);
      if (body.children[i] !== r.tr) body.insertBefore(r.tr, body.children[i] || null);
    });
    for (const [pid, r] of psRows) if (!seen.has(pid)) { r.tr.remove(); psRows.delete(pid); }
    $("ps-empty").hidden = data.data.length > 0;
    setText($("ps-count"), `${data.data.length} processes`);
    refreshConfinement();
  }

  async function refreshConfinement() {
    let agents;
    try { agents = (await api("/v1/kernel/stats")).agents; } catch (e) { return; }
    if (!agents) return;
    const none = agents.confinement === "none";
    $("ps-unconfined").hidden = !none;
    setText($("ps-confinement"), none ? "agents unconfined" : `agents confined (jail, limits: ${agents.limits})`);
  }

  function openLogs(pid) {
    S.logPid = pid; S.logOffset = 0;
    setText($("logs"), "");
    setText($("logs-pid"), "pid " + pid);
    refreshLogs();
  }

  async function refreshLogs() {
    if (S.logPid === null) return;
    const pid = S.logPid, pre = $("logs");
    try {
      const r = await api(`/v1/processes/${pid}/logs?offset=${S.logOffset}`, { raw: true });
      const text = await r.text();
      if (pid !== S.logPid) return;
      const size = Number(r.headers.get("X-Log-Size"));
      if (Number.isFinite(size) && size < S.logOffset) {     // the capped log was cut: read it again
        S.logOffset = 0; pre.textContent = "";
        return refreshLogs();
      }
      S.logOffset = Number.isFinite(size) && size ? size : S.logOffset + new TextEncoder().encode(text).length;
      if (text) {
        const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        pre.append(text);
        if (pre.textContent.length > 200000) pre.textContent = pre.textContent.slice(-100000);
        if (atBottom) pre.scrollTop = pre.scrollHeight;
      } else if (!pre.textContent) pre.textContent = "(no output yet)";
    } catch (e) {
      setText(pre, "Could not read the log: " + e.message);
      S.logPid = null;
    }
  }

  async function refreshAudit() {
    const denied = $("audit-denied").checked;
    let data;
    try {
      data = await api("/v1/audit?limit=200" + (denied ? "&denied=true" : ""));
    } catch (e) {
      $("audit-body").replaceChildren(el("tr", {}, el("td", { colspan: "6", class: "error", text: "Could not read the audit log: " + e.message })));
      return;
    }
    const rows = data.data.slice().reverse().map((a) => el("tr", { class: a.allowed ? "" : "denied-row" },
      el("td", { text: fmtClock(a.time) }), el("td", { class: "num", text: a.pid === null ? "–" : String(a.pid) }),
      el("td", { text: a.tenant }), el("td", { class: "mono", text: a.call }),
      el("td", { class: a.allowed ? "" : "denied", text: a.allowed ? "yes" : "denied" }),
      el("td", { class: "mono", text: a.allowed ? (a.outcome || "…") + (a.duration ? " · " + fmtSec(a.duration) : "") : a.reason || "" })));
    if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "6", class: "muted", text: denied ? "No denied calls." : "No system calls yet." })));
    $("audit-body").replaceChildren(...rows);
    try {
      const dead = await api("/v1/messages/dead?limit=1000");
      setText($("dead-letters"), `${dead.data.length} dead-lettered message${dead.data.length === 1 ? "" : "s"}`);
    } catch (e) { setText($("dead-letters"), ""); }
  }

  // -- polling for tabs the feed does not cover ---------------------------------------

  function stopPolling() { for (const t of S.timers) clearInterval(t); S.timers = []; }
  function startPolling() {
    stopPolling();
    if (S.tab !== "processes" || !S.me) return;
    const tick = () => { refreshProcesses(); refreshLogs(); };
    tick(); refreshAudit();
    S.timers.push(setInterval(tick, 2000), setInterval(refreshAudit, 4000));
  }

  // -- playground -----------------------------------------------------------------------

  function bubble(role, text) {
    const b = el("div", { class: "msg " + role, text });
    $("pg-transcript").append(b);
    $("pg-transcript").scrollTop = $("pg-transcript").scrollHeight;
    return b;
  }

  function numberOf(id) {
    const v = $(id).value.trim();
    return v === "" ? undefined : Number(v);
  }

  async function onSend(ev) {
    ev.preventDefault();
    if (S.chatAbort) return;
    const text = $("pg-message").value.trim();
    if (!text) return;
    setText($("pg-error"), "");
    const body = {
      model: $("pg-model").value, stream: true, stream_options: { include_usage: true },
      messages: [], temperature: numberOf("pg-temperature"), top_p: numberOf("pg-top-p"), top_k: numberOf("pg-top-k"),
      min_p: numberOf("pg-min-p"), max_tokens: numberOf("pg-max-tokens"), seed: numberOf("pg-seed"), priority: numberOf("pg-priority"),
    };
    if ($("pg-ignore-eos").checked) body.ignore_eos = true;
    for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
    const system = $("pg-system").value.trim();
    if (system) body.messages.push({ role: "system", content: system });
    if ($("pg-json").checked) {
      let schema;
      try { schema = JSON.parse($("pg-schema").value); } catch (e) { setText($("pg-error"), "The JSON schema does not parse: " + e.message); return; }
      body.response_format = { type: "json_schema", json_schema: { name: "answer", schema } };
    }
    body.messages.push(...S.chat, { role: "user", content: text });
    $("pg-message").value = "";
    bubble("user", text);
    const out = bubble("assistant streaming", "");
    const ctl = new AbortController();
    S.chatAbort = ctl;
    $("pg-send").disabled = true; $("pg-stop").disabled = false;
    for (const id of ["pg-ttft", "pg-tps", "pg-tokens", "pg-finish"]) setText($(id), "–");
    const t0 = performance.now();
    let tFirst = null, chunks = 0, answer = "", finish = null, usage = null;
    const showRate = () => {
      const n = usage ? usage.completion_tokens : chunks;
      const dt = (performance.now() - (tFirst || t0)) / 1000;
      setText($("pg-tokens"), String(n));
      if (tFirst !== null && n > 1 && dt > 0) setText($("pg-tps"), ((n - 1) / dt).toFixed(1));
    };
    try {
      const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers({ "Content-Type": "application/json" }),
        body: JSON.stringify(body), signal: ctl.signal });
      if (!r.ok) throw await errorOf(r);
      out.dataset.requestId = (r.headers.get("X-Request-Id") || "") + "-0";
      await readSSE(r.body, (_event, data) => {
        if (data === "[DONE]") return;
        const c = JSON.parse(data);
        if (c.error) throw new ApiError(0, c.error.message || "generation failed", c.error.code);
        if (c.usage) usage = c.usage;
        const ch = c.choices && c.choices[0];
        if (!ch) { showRate(); return; }
        const delta = ch.delta && ch.delta.content;
        if (delta) {
          if (tFirst === null) { tFirst = performance.now(); setText($("pg-ttft"), fmtSec((tFirst - t0) / 1000)); }
          chunks++;
          answer += delta;
          out.textContent = answer;
          $("pg-transcript").scrollTop = $("pg-transcript").scrollHeight;
          showRate();
        }
        if (ch.finish_reason) finish = ch.finish_reason;
      });
      showRate();
      setText($("pg-finish"), finish || "–");
      S.chat.push({ role: "user", content: text }, { role: "assistant", content: answer });
      if (body.response_format) {
        let ok = true;
        try { JSON.parse(answer); } catch (e) { ok = false; }
        out.append(el("span", { class: "valid " + (ok ? "" : "denied"), text: ok ? "✓ valid JSON" : "✗ not valid JSON (cut by max_tokens?)" }));
      }
    } catch (e) {
      if (ctl.signal.aborted) { setText($("pg-finish"), "stopped"); S.chat.push({ role: "user", content: text }, { role: "assistant", content: answer }); }
      else setText($("pg-error"), "The request failed: " + e.message);
      if (!answer) out.remove();
    } finally {
      out.classList.remove("streaming");
      out.dataset.done = "1";
      S.chatAbort = null;
      $("pg-send").disabled = false; $("pg-stop").disabled = true;
    }
  }

  // -- tabs, theme, wiring --------------------------------------------------------------

  const TABS = ["overview", "memory", "requests", "tenants", "processes", "playground"];

  function selectTab(name) {
    S.tab = name;
    for (const t of TABS) {
      const tab = $("tab-" + t), on = t === name;
      tab.setAttribute("aria-selected", on ? "true" : "false");
      tab.tabIndex = on ? 0 : -1;
      $("panel-" + t).hidden = !on;
    }
    if (location.hash.slice(1) !== name) history.replaceState(null, "", "#" + name);
    $("tooltip").hidden = true;
    render();
    startPolling();
  }

  function effectiveTheme() {
    const forced = document.documentElement.dataset.theme;
    if (forced) return forced;
    return window.matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  }
  function labelThemeButton() {
    $("theme-toggle").setAttribute("aria-label", effectiveTheme() === "dark" ? "Switch to light theme" : "Switch to dark theme");
  }
  function toggleTheme() {
    const next = effectiveTheme() === "dark" ? "light" : "dark";
    document.documentElement.dataset.theme = next;
    try { localStorage.setItem("llmos.theme", next); } catch (e) { /* private mode: this page only */ }
    labelThemeButton();
    redrawCharts();
  }
  function redrawCharts() { if (charts) Object.values(charts).forEach((c) => c.draw()); }

  function wire() {
    makeCharts();
    labelThemeButton();
    $("signin-form").addEventListener("submit", onSignIn);
    $("sign-out").addEventListener("click", () => signOut(""));
    $("theme-toggle").addEventListener("click", toggleTheme);
    window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => { labelThemeButton(); redrawCharts(); });
    const tablist = document.querySelector(".tabs");
    tablist.addEventListener("click", (e) => { const b = e.target.closest("[role=tab]"); if (b) selectTab(b.dataset.tab); });
    tablist.addEventListener("keydown", (e) => {
      const i = TABS.indexOf(S.tab);
      let j = null;
      if (e.key === "ArrowRight") j = (i + 1) % TABS.length;
      else if (e.key === "ArrowLeft") j = (i + TABS.length - 1) % TABS.length;
      else if (e.key === "Home") j = 0;
      else if (e.key === "End") j = TABS.length - 1;
      if (j === null) return;
      e.preventDefault(); selectTab(TABS[j]); $("tab-" + TABS[j]).focus();
    });
    document.addEventListener("visibilitychange", () => { if (!document.hidden) render(); });
    window.addEventListener("hashchange", () => { const h = location.hash.slice(1); if (S.me && TABS.includes(h) && h !== S.tab) selectTab(h); });
    const win = el("select", { id: "chart-window", "aria-label": "Chart time window" },
      ...[[60, "last minute"], [300, "last 5 minutes"], [600, "last 10 minutes"]]
        .map(([v, l]) => el("option", { value: String(v), text: l, selected: v === S.chartWindow })));
    win.addEventListener("change", () => { S.chartWindow = Number(win.value); render(); });
    $("panel-overview").prepend(el("div", { class: "toolbar" }, el("label", { for: "chart-window", text: "Charts show the" }), win));
    let resizeTimer = null;
    window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(() => { redrawCharts(); sizeGrid(); }, 100); });
    $("memory-colour").addEventListener("change", (e) => { S.colourBy = e.target.value; S.highlight = null; blockKeys = blockKeys.map(() => ""); render(); });
    $("kv-grid").addEventListener("mousemove", onGridHover);
    $("kv-grid").addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
    $("requests-filter").addEventListener("input", (e) => { S.filter = e.target.value; render(); });
    for (const th of document.querySelectorAll("#requests-table th[data-key]")) th.querySelector("button").addEventListener("click", () => onSort(th));
    $("tenants-mode").addEventListener("change", render);
    $("ps-all").addEventListener("change", refreshProcesses);
    $("audit-denied").addEventListener("change", refreshAudit);
    $("pg-send-form").addEventListener("submit", onSend);
    $("pg-message").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("pg-send-form").requestSubmit(); }
    });
    $("pg-stop").addEventListener("click", () => { if (S.chatAbort) S.chatAbort.abort(); });
    $("pg-clear").addEventListener("click", () => { S.chat = []; $("pg-transcript").replaceChildren(); setText($("pg-error"), ""); });
    $("pg-form").addEventListener("submit", (e) => e.preventDefault());
    $("pg-json").addEventListener("change", (e) => { $("pg-schema").hidden = !e.target.checked; $("pg-schema-label").hidden = !e.target.checked; });
  }

  async function boot() {
    wire();
    S.key = sessionStorage.getItem(KEY_STORAGE) || "";
    try {
      const me = await whoami(S.key);
      if (me.auth && !me.tenant) showSignIn("");     // a server that answers a keyless probe without a 401
      else enter(me);
    } catch (e) {
      if (e.status === 401) {
        const had = !!S.key;
        sessionStorage.removeItem(KEY_STORAGE);
        S.key = "";
        showSignIn(had ? "Your key is no longer accepted; sign in again." : "");
      } else {
        showSignIn("Could not reach the llmos server: " + e.message);
      }
    }
  }

  boot();
})();
