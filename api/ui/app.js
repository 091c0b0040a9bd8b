// Modelium's dashboard. Plain JavaScript, no framework, no build step: it reads the gateway's
// public API (with the key kept in session storage) and follows GET /events.
"use strict";

const KEY_STORAGE = "modelium.apiKey";
// Models per page of GET /models: a small first page draws the table at once (a List call of
// 100 takes a few tens of ms at 1,000 models), larger ones read the rest.
const FIRST_PAGE = 100;
const PAGE = 1000;
const RELIST_SECONDS = 30;      // the whole list again, in case an event was missed
const NODES_SECONDS = 5;
const STATS_SECONDS = 2;
const FEED_MAX = 300;
const ROW = 30;                 // px, as --row in style.css
const COMING_UP = new Set(["deciding", "reserving", "loading", "restarting", "evicting", "waking"]);

const state = {
  config: null,
  models: new Map(),           // name -> ModelInfo
  progress: new Map(),         // name -> the last load_progress event
  nodes: [],
  stats: { models: {} },
  view: [],                    // names, filtered and sorted
  sort: { key: "name", desc: false },
  search: "",
  phase: "",
  selected: null,
  dirty: new Set(),            // models to read again (an event said they changed)
  listing: false,
  lastEventId: null,
  firstRender: false,
  fullyListed: false,
};

// -- small helpers ------------------------------------------------------------------------------
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v >= 100 || i === 0 ? v.toFixed(0) : v.toFixed(1)} ${units[i]}`;
}

function ago(ts) {
  if (!ts) return "–";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 60) return `${Math.floor(s)}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

function clock(seconds) {
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const r = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${r}` : `${m}:${r}`;
}

function firstLine(text) {
  return (text || "").split("\n", 1)[0];
}

function notice(text, kind) {
  const box = $("notice");
  if (!text) { box.hidden = true; return; }
  box.textContent = text;
  box.className = `notice ${kind || ""}`;
  box.hidden = false;
}

// -- the API ------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function headers(extra) {
  const h = Object.assign({ Accept: "application/json" }, extra || {});
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  if (opts.json !== undefined) {
    opts.body = JSON.stringify(opts.json);
    opts.headers["Content-Type"] = "application/json";
    delete opts.json;
  }
  const response = await fetch(path, opts);
  if (response.ok) return response.status === 204 ? null : response.json();
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON */ }
  if (response.status === 401) askForKey(message);
  throw new ApiError(response.status, message);
}

// Server-sent events over fetch (EventSource cannot send an Authorization header).
async function streamEvents(path, onEvent, signal, onOpen) {
  const h = headers({ Accept: "text/event-stream" });
  if (state.lastEventId !== null && path === "/events") h["Last-Event-ID"] = String(state.lastEventId);
  const response = await fetch(path, { headers: h, signal });
  if (!response.ok) {
    let message = `${response.status}`;
    try { message = (await response.json()).error.message; } catch (_) { /* keep the status */ }
    if (response.status === 401) askForKey(message);
    throw new ApiError(response.status, message);
  }
  if (onOpen) onOpen();
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const event = { id: null, event: "message", data: [] };
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") event.data.push(text);
        else if (field === "id") event.id = text;
        else if (field === "event") event.event = text;
      }
      if (event.data.length) onEvent(event.event, event.data.join("\n"), event.id);
    }
  }
}

// -- the key ------------------------------------------------------------------------------------
function askForKey(reason) {
  const dialog = $("key-dialog");
  $("key-reason").textContent = reason || "This gateway asks for an API key.";
  if (!dialog.open) dialog.showModal();
}

function setupKeyDialog() {
  $("key-button").addEventListener("click", () => askForKey(state.config && !state.config.keys_required
    ? "This gateway needs no key (no API keys are configured)." : "The API key this tab uses."));
  $("key-dialog").addEventListener("close", () => {
    const choice = $("key-dialog").returnValue;
    if (choice === "save" && $("key-input").value.trim()) {
      sessionStorage.setItem(KEY_STORAGE, $("key-input").value.trim());
    } else if (choice === "forget") {
      sessionStorage.removeItem(KEY_STORAGE);
    } else {
      return;
    }
    $("key-input").value = "";
    restart();
  });
}

// -- models -------------------------------------------------------------------------------------
async function listAll() {
  if (state.listing) return;
  state.listing = true;
  const seen = new Set();
  let token = null;
  let pages = 0;
  try {
    do {
      const query = new URLSearchParams({ limit: String(pages === 0 ? FIRST_PAGE : PAGE) });
      if (token) query.set("page_token", token);
      const page = await api(`/models?${query}`);
      for (const m of page.models) { state.models.set(m.name, m); seen.add(m.name); }
      token = page.next_page_token;
      pages += 1;
      $("list-status").textContent = token ? `reading… ${state.models.size}` : "";
      refreshView();
      if (pages === 1 && !state.firstRender) {
        state.firstRender = true;
        performance.mark("modelium-models-rendered");
      }
    } while (token);
    for (const name of [...state.models.keys()]) if (!seen.has(name)) state.models.delete(name);
    refreshView();
    if (!state.fullyListed) {
      state.fullyListed = true;
      performance.mark("modelium-models-listed");
    }
    notice("");
  } catch (err) {
    if (err.status !== 401) notice(`Cannot list models: ${err.message}`);
  } finally {
    state.listing = false;
  }
}

async function readDirty() {
  const names = [...state.dirty];
  state.dirty.clear();
  if (names.length > 25) { await listAll(); return; }
  await Promise.all(names.map(async (name) => {
    try {
      state.models.set(name, await api(`/models/${encodeURIComponent(name)}`));
    } catch (err) {
      if (err.status === 404) state.models.delete(name);
    }
  }));
  refreshView();
  if (state.selected && names.includes(state.selected)) renderDetail();
}

let dirtyTimer = null;
function markDirty(name) {
  state.dirty.add(name);
  if (!dirtyTimer) dirtyTimer = setTimeout(() => { dirtyTimer = null; readDirty(); }, 250);
}

function unloadsAt(m) {
  if (m.phase !== "loaded" || m.pinned) return null;
  const since = Math.max(m.last_used_at || 0, m.loaded_at || 0);
  return since ? since + m.idle_timeout_seconds : null;
}

function idleText(m) {
  if (m.pinned) return "pinned";
  const at = unloadsAt(m);
  if (at === null) return "–";
  const left = at - Date.now() / 1000;
  return left > 0 ? `unloads in ${clock(left)}` : "unloading soon";
}

const SORTERS = {
  name: (m) => m.name,
  phase: (m) => state.config.phases.indexOf(m.phase),
  runtime: (m) => m.runtime || "",
  place: (m) => `${m.node || ""} ${m.device || ""}`,
  booked: (m) => m.booked_bytes || 0,
  measured: (m) => m.measured_memory_bytes || 0,
  idle: (m) => (m.pinned ? Infinity : unloadsAt(m) || -1),
  requests: (m) => m.request_count || 0,
  used: (m) => m.last_used_at || 0,
  error: (m) => (m.last_error ? 0 : 1),
};

function refreshView() {
  const needle = state.search.toLowerCase();
  const rows = [];
  for (const m of state.models.values()) {
    if (state.phase && m.phase !== state.phase) continue;
    if (needle && !m.name.toLowerCase().includes(needle)
      && !(m.runtime || "").includes(needle) && !(m.node || "").toLowerCase().includes(needle)) continue;
    rows.push(m);
  }
  const key = SORTERS[state.sort.key];
  const sign = state.sort.desc ? -1 : 1;
  rows.sort((a, b) => {
    const x = key(a);
    const y = key(b);
    if (x < y) return -sign;
    if (x > y) return sign;
    return a.name < b.name ? -1 : 1;
  });
  state.view = rows.map((m) => m.name);
  $("model-count").textContent = state.view.length === state.models.size
    ? `${state.models.size}` : `${state.view.length} of ${state.models.size}`;
  $("spacer").style.height = `${state.view.length * ROW}px`;
  renderRows();
  renderSummary();
}

function renderSummary() {
  const counts = {};
  for (const m of state.models.values()) counts[m.phase] = (counts[m.phase] || 0) + 1;
  const chips = state.config.phases.filter((p) => counts[p]).map((p) => el("span", {
    class: "chip", text: `${counts[p]} ${p.replaceAll("_", " ")}`, "data-phase": p,
  }));
  $("summary").replaceChildren(...chips);
}

function renderRows() {
  const viewport = $("viewport");
  const first = Math.max(0, Math.floor(viewport.scrollTop / ROW) - 5);
  const count = Math.ceil(viewport.clientHeight / ROW) + 10;
  const names = state.view.slice(first, first + count);
  $("rows").style.transform = `translateY(${first * ROW}px)`;
  $("rows").replaceChildren(...names.map((name) => renderRow(state.models.get(name))));
}

function phaseCell(m) {
  const cell = el("span", { class: "phase" }, el("span", { class: `badge ${m.phase}`, text: m.phase.replaceAll("_", " ") }));
  if (m.update_state) {
    // A new version on its way beside the serving one, or one that failed (the old one serves).
    const failed = m.update_state === "update_failed";
    cell.append(el("span", {
      class: `badge update${failed ? " failed" : ""}`,
      text: failed ? "update failed" : `updating: ${m.update_state.replaceAll("_", " ")}`,
      title: failed ? m.update_error || "" : "the previous version serves until the switch",
    }));
  }
  if (COMING_UP.has(m.phase)) {
    const p = state.progress.get(m.name);
    const bar = el("div", { class: "progress" }, el("div"));
    if (p && typeof p.fraction === "number") {
      bar.firstChild.style.width = `${Math.round(p.fraction * 100)}%`;
      bar.title = `${p.elapsed_seconds}s of ~${p.expected_seconds}s${p.runtime_line ? `: ${p.runtime_line}` : ""}`;
    } else {
      bar.classList.add("unknown");
      bar.title = p ? `${p.elapsed_seconds}s so far (no earlier load to compare)` : "on its way";
    }
    cell.append(bar);
  }
  return cell;
}

function renderRow(m) {
  const row = el("div", {
    class: `row model${state.selected === m.name ? " selected" : ""}`,
    "data-model": m.name,
    "data-phase": m.phase,
    onclick: () => select(m.name),
  },
  el("span", { class: "name", text: m.name, title: m.name }),
  phaseCell(m),
  el("span", { class: "runtime", text: m.runtime || "–" }),
  el("span", { class: "place", text: m.node ? `${m.node} / ${m.device || "?"}` : "–" }),
  el("span", { class: "num", text: bytes(m.booked_bytes) }),
  el("span", { class: "num", text: bytes(m.measured_memory_bytes) }),
  el("span", { class: "idle", text: idleText(m) }),
  el("span", { class: "num", text: String(m.request_count) }),
  el("span", { text: ago(m.last_used_at) }),
  el("span", { class: m.last_error ? "error err" : "error", text: firstLine(m.last_error) || "", title: m.last_error || "" }),
  actions(m));
  return row;
}

function actions(m) {
  const box = el("span", { class: "actions" });
  if (!state.config.principal.admin) return box;
  const stop = (fn) => (ev) => { ev.stopPropagation(); fn(); };
  const busy = COMING_UP.has(m.phase) || m.phase === "unloading" || m.phase === "waiting_for_capacity";
  if (m.phase !== "loaded" && !busy) {
    const verb = m.phase === "failed" ? "retry" : m.phase === "parked" ? "wake" : "load";
    box.append(el("button", { type: "button", class: "load", text: verb, onclick: stop(() => ask(m.name, "load", {})) }));
  }
  if (m.phase === "loaded" || m.phase === "parked" || busy) {
    box.append(el("button", { type: "button", class: "unload", text: "unload", onclick: stop(() => ask(m.name, "unload", { reason: "unloaded from the dashboard" })) }));
  }
  if (m.pinned) {
    box.append(el("button", { type: "button", class: "unpin", text: "unpin", onclick: stop(() => unpin(m)) }));
  } else {
    box.append(el("button", { type: "button", class: "pin", text: "pin", onclick: stop(() => ask(m.name, "load", { pin: true })) }));
  }
  return box;
}

// A management call; the answer is the model's state, and the events tell the rest.
async function act(name, verb, body) {
  try {
    const info = await api(`/models/${encodeURIComponent(name)}/${verb}`, { method: "POST", json: body });
    state.models.set(name, info);
    refreshView();
    markDirty(name);
  } catch (err) {
    notice(`Could not ${verb} ${name}: ${err.message}`);
  }
}

// Load and unload answer at once (202) and the row follows the events.
function ask(name, verb, body) {
  return act(name, verb, Object.assign({ wait: false }, body));
}

function unpin(m) {
  // Unpinning a loaded model keeps it loaded (it may now unload when idle); one that is not
  // loaded yet stops waiting for room too.
  if (m.phase === "loaded") ask(m.name, "load", { pin: false });
  else ask(m.name, "unload", { reason: "unpinned from the dashboard" });
}

// -- the detail panel ---------------------------------------------------------------------------
let logAbort = null;

function select(name) {
  state.selected = name;
  renderRows();
  renderDetail();
  loadLog();
}

function field(label, value) {
  return [el("dt", { text: label }), el("dd", {}, value === null || value === undefined || value === "" ? "–" : value)];
}

function renderDetail() {
  const m = state.models.get(state.selected);
  const box = $("detail");
  if (!m) { box.hidden = true; return; }
  box.hidden = false;
  $("detail-name").textContent = m.name;
  const buttons = [...actions(m).childNodes];
  if (state.config.principal.admin && m.phase === "loaded" && m.rollback_to && !m.update_state) {
    buttons.push(el("button", {
      type: "button", class: "rollback", text: `roll back to ${m.rollback_to}`,
      onclick: () => act(m.name, "rollback", { reason: "rolled back from the dashboard" }),
    }));
  }
  $("detail-actions").replaceChildren(...buttons);
  const cfg = state.config;
  const link = cfg.temporal_ui
    ? el("a", { href: `${cfg.temporal_ui}/namespaces/${encodeURIComponent(cfg.namespace)}/workflows/${encodeURIComponent(cfg.workflow_id_prefix + m.name)}`, target: "_blank", rel: "noopener", text: "open in the Temporal UI", class: "temporal-link" })
    : el("span", { class: "muted", text: "no Temporal UI known (temporal.ui_url)" });
  const orgs = Object.entries(m.requests_by_organization || {}).map(([o, n]) => `${o}: ${n}`).join(", ");
  $("detail-fields").replaceChildren(
    ...field("phase", m.phase),
    ...field("path", m.path),
    ...field("task", m.task),
    ...field("analysis", m.analysis),
    ...field("runtime", m.runtime),
    ...field("decision", m.decision_reason ? `${m.decision_reason} (${m.decision_source})` : null),
    ...field("placed on", m.node ? `${m.node} / ${m.device}` : null),
    ...field("memory", `estimate ${bytes(m.memory_estimate_bytes)} · booked ${bytes(m.booked_bytes)} · measured ${bytes(m.measured_memory_bytes)} · peak ${bytes(m.peak_memory_bytes)}`),
    ...field("version", `${m.fingerprint ? m.fingerprint.slice(0, 12) : "–"}${m.switched_at ? `, switched ${ago(m.switched_at)}` : ""}`),
    ...field("update", m.update_state ? `${m.update_state.replaceAll("_", " ")}${m.update_error ? `: ${m.update_error}` : ""}` : null),
    ...field("loads", `${m.load_count}${m.load_seconds ? `, last in ${m.load_seconds.toFixed(1)} s` : ""}`),
    ...field("idle unload", idleText(m)),
    ...field("requests", `${m.request_count}${orgs ? ` (${orgs})` : ""}${m.waiting_requests ? `, ${m.waiting_requests} waiting` : ""}`),
    ...field("last use", ago(m.last_used_at)),
    ...field("resting", m.rest_reason),
    ...field("unloaded", m.unload_reason),
    ...field("workflow", link),
  );
  $("detail-error-box").hidden = !m.last_error;
  $("detail-error").textContent = m.last_error || "";
  const series = state.stats.models[m.name];
  $("detail-chart").replaceChildren(series ? chart(m.name, series) : el("p", { class: "muted", text: "no requests in the last 2 minutes" }));
}

async function loadLog() {
  if (logAbort) { logAbort.abort(); logAbort = null; }
  const name = state.selected;
  const pre = $("detail-log");
  const m = state.models.get(name);
  if (!state.config.principal.admin) { pre.textContent = "runtime logs need an admin key"; return; }
  if (!m || !m.runtime) { pre.textContent = "no runtime log: the model was never placed on a node"; return; }
  if ($("log-follow").checked) {
    pre.textContent = "";
    logAbort = new AbortController();
    const lines = [];
    streamEvents(`/models/${encodeURIComponent(name)}/logs?tail=200&follow=true`, (kind, data) => {
      if (kind === "error") { pre.textContent += `\n${JSON.parse(data).error.message}`; return; }
      lines.push(data);
      if (lines.length > 1000) lines.splice(0, lines.length - 1000);
      pre.textContent = lines.join("\n");
      pre.scrollTop = pre.scrollHeight;
    }, logAbort.signal).catch((err) => { if (err.name !== "AbortError") pre.textContent += `\n${err.message}`; });
    return;
  }
  pre.textContent = "reading…";
  try {
    const log = await api(`/models/${encodeURIComponent(name)}/logs?tail=200`);
    if (state.selected !== name) return;
    pre.textContent = log.lines.length ? log.lines.join("\n") : `(${log.path} is empty)`;
    pre.scrollTop = pre.scrollHeight;
  } catch (err) {
    if (state.selected === name) pre.textContent = err.message;
  }
}

// -- nodes --------------------------------------------------------------------------------------
const COLORS = ["#5aa9ff", "#3fbf7f", "#e0b34a", "#b58cff", "#ef8b5b", "#4fd1c5", "#f06292", "#a3be8c"];
function colorOf(name) {
  let h = 0;
  for (const c of name) h = (h * 31 + c.charCodeAt(0)) >>> 0;
  return COLORS[h % COLORS.length];
}

async function loadNodes() {
  try {
    state.nodes = (await api("/nodes")).nodes;
    renderNodes();
  } catch (err) {
    if (err.status !== 401) $("nodes").replaceChildren(el("p", { class: "err", text: `Cannot read the nodes: ${err.message}` }));
  }
}

function renderNodes() {
  if (!state.nodes.length) {
    $("nodes").replaceChildren(el("p", { class: "muted", text: "no node agent has announced itself" }));
    return;
  }
  $("nodes").replaceChildren(...state.nodes.map((n) => el("div", { class: `node${n.lost ? " lost" : ""}`, "data-node": n.node },
    el("h3", { text: `${n.node}${n.lost ? ` — lost: ${n.lost}` : ""}` }),
    el("div", { class: "muted", text: `runtimes: ${n.runtimes.join(", ")} · announced ${ago(n.announced_at)}` }),
    ...n.devices.map((d) => device(n, d)))));
}

function device(n, d) {
  const bar = el("div", { class: "bar", title: `${d.name}: ${bytes(d.booked_bytes)} booked of ${bytes(d.total_bytes)}` });
  let shown = 0;
  for (const b of d.bookings) {
    const seg = el("div", { class: "seg", title: `${b.model}: ${bytes(b.bytes)} (${b.phase})`, text: b.model, "data-model": b.model });
    seg.style.width = `${(100 * b.bytes) / d.total_bytes}%`;
    seg.style.background = colorOf(b.model);
    bar.append(seg);
    shown += b.bytes;
  }
  if (d.booked_bytes > shown) {
    const other = el("div", { class: "seg other", title: `${bytes(d.booked_bytes - shown)} booked by models this key does not see` });
    other.style.width = `${(100 * (d.booked_bytes - shown)) / d.total_bytes}%`;
    bar.append(other);
  }
  if (d.used_bytes !== null) {
    const used = el("div", { class: "used", title: `${bytes(d.used_bytes)} in use (measured)` });
    used.style.left = `${Math.min(100, (100 * d.used_bytes) / d.total_bytes)}%`;
    bar.append(used);
  }
  const used = d.used_bytes === null ? "" : ` · used ${bytes(d.used_bytes)}`;
  return el("div", { class: "device", "data-device": d.device },
    el("div", { class: "label" }, el("span", { text: `${d.device} — ${d.name}` }),
      el("span", { text: `booked ${bytes(d.booked_bytes)} of ${bytes(d.total_bytes)}${used}` })),
    bar);
}

// -- request charts -----------------------------------------------------------------------------
async function loadStats() {
  try {
    state.stats = await api("/stats/requests?seconds=120&top=8");
    renderCharts();
  } catch (_) { /* shown by the other panels */ }
}

function renderCharts() {
  const entries = Object.entries(state.stats.models);
  $("charts").replaceChildren(...(entries.length
    ? entries.map(([name, s]) => chart(name, s))
    : [el("p", { class: "muted", text: "no requests in the last 2 minutes" })]));
  if (state.selected && state.stats.models[state.selected]) {
    $("detail-chart").replaceChildren(chart(state.selected, state.stats.models[state.selected]));
  }
}

function chart(name, s) {
  const recent = s.requests.slice(-10);
  const rate = recent.reduce((a, b) => a + b, 0) / recent.length;
  const canvas = el("canvas", { width: 380, height: 36 });
  const box = el("div", { class: "chart", "data-model": name },
    el("div", { class: "title" }, el("span", { text: name }),
      el("span", { class: "muted", text: `${rate.toFixed(1)} req/s · p50 ${s.p50_ms_window === null ? "–" : `${s.p50_ms_window} ms`} · ${s.total} in 2 min${s.errors ? ` · ${s.errors} errors` : ""}` })),
    canvas);
  const ctx = canvas.getContext("2d");
  const w = canvas.width / s.requests.length;
  const peak = Math.max(1, ...s.requests);
  ctx.fillStyle = "#2f6fb3";
  s.requests.forEach((n, i) => { const h = (n / peak) * 34; ctx.fillRect(i * w, 36 - h, Math.max(1, w - 0.5), h); });
  const lat = s.p50_ms.filter((v) => v !== null);
  if (lat.length) {
    const top = Math.max(...lat) * 1.1;
    ctx.strokeStyle = "#e0b34a";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let started = false;
    s.p50_ms.forEach((v, i) => {
      if (v === null) return;
      const y = 36 - (v / top) * 34;
      if (started) ctx.lineTo(i * w + w / 2, y); else { ctx.moveTo(i * w + w / 2, y); started = true; }
    });
    ctx.stroke();
  }
  return box;
}

// -- events -------------------------------------------------------------------------------------
function describe(kind, e) {
  switch (kind) {
    case "phase": return `${e.model}: ${e.previous || "new"} → ${e.phase}${e.reason ? ` (${firstLine(e.reason)})` : ""}${e.load_seconds ? ` in ${e.load_seconds}s` : ""}`;
    case "load_progress": return `${e.model}: ${e.phase} ${e.elapsed_seconds}s${e.expected_seconds ? ` of ~${e.expected_seconds}s` : ""}${e.runtime_line ? ` — ${e.runtime_line}` : ""}`;
    case "booking": return `${e.model}: booked ${bytes(e.bytes)} on ${e.node} ${e.devices.join(",")}`;
    case "release": return `${e.model}: released ${bytes(e.bytes)} on ${e.node} ${e.devices.join(",")}`;
    case "eviction": return `${e.model}: evicted (${e.reason})`;
    case "update": return `${e.model}: new version ${e.state.replaceAll("_", " ")}${e.error ? ` (${firstLine(e.error)})` : ""}`;
    case "node": return `${e.node}${e.lost ? ` lost: ${e.lost}` : " announced"} (${e.devices.length} devices)`;
    case "request": return `${e.model} ${e.status} in ${e.latency_ms} ms (${e.organization || "?"})${e.skipped_before ? `, ${e.skipped_before} not shown` : ""}`;
    case "gap": return e.reason;
    default: return JSON.stringify(e);
  }
}

function feed(kind, e) {
  if (kind === "load_progress" && !e.runtime_line) return; // the bar shows it
  const li = el("li", { "data-kind": kind, "data-model": e.model || "" },
    el("time", { text: new Date(e.at * 1000).toLocaleTimeString() }),
    el("span", { class: `kind ${kind}`, text: kind }),
    el("span", { class: "text", text: describe(kind, e), title: describe(kind, e) }));
  if (kind === "request" && !$("show-requests").checked) li.hidden = true;
  const list = $("activity");
  list.prepend(li);
  while (list.childElementCount > FEED_MAX) list.lastElementChild.remove();
}

function onEvent(kind, data, id) {
  const e = JSON.parse(data);
  if (id) state.lastEventId = Number(id);
  feed(kind, e);
  const m = e.model ? state.models.get(e.model) : null;
  switch (kind) {
    case "phase":
      if (m) { m.phase = e.phase; }
      if (!COMING_UP.has(e.phase)) state.progress.delete(e.model);
      markDirty(e.model);
      break;
    case "load_progress":
      state.progress.set(e.model, e);
      if (m && m.phase !== e.phase) { m.phase = e.phase; markDirty(e.model); }
      renderRows();
      break;
    case "update":
      markDirty(e.model);
      break;
    case "booking": case "release": case "eviction":
      scheduleNodes();
      if (e.model) markDirty(e.model);
      break;
    case "node":
      scheduleNodes();
      break;
    case "gap":
      listAll();
      break;
    default:
      break;
  }
}

let nodesTimer = null;
function scheduleNodes() {
  if (!nodesTimer) nodesTimer = setTimeout(() => { nodesTimer = null; loadNodes(); }, 500);
}

let eventsAbort = null;
async function followEvents() {
  const conn = $("conn");
  for (;;) {
    eventsAbort = new AbortController();
    try {
      await streamEvents("/events", onEvent, eventsAbort.signal, () => {
        conn.textContent = "events: live";
        conn.className = "conn up";
      });
    } catch (err) {
      if (err.name === "AbortError") return;
      if (err.status === 401) { conn.textContent = "events: needs a key"; conn.className = "conn down"; return; }
    }
    conn.textContent = "events: reconnecting";
    conn.className = "conn down";
    await new Promise((r) => setTimeout(r, 2000));
  }
}

// -- start --------------------------------------------------------------------------------------
const timers = [];

async function start() {
  try {
    state.config = await api("/ui/config");
  } catch (err) {
    if (err.status !== 401) notice(`The gateway did not answer: ${err.message}`);
    return;
  }
  const p = state.config.principal;
  $("who").textContent = state.config.keys_required ? `${p.name} (${p.organization})${p.admin ? ", admin" : ""}` : "open access (no keys configured)";
  const filter = $("phase-filter");
  if (filter.options.length === 1) {
    for (const phase of state.config.phases) filter.append(el("option", { value: phase, text: phase.replaceAll("_", " ") }));
  }
  $("log-follow").disabled = !p.admin;
  await listAll();
  loadNodes();
  loadStats();
  followEvents();
  timers.push(setInterval(listAll, RELIST_SECONDS * 1000));
  timers.push(setInterval(loadNodes, NODES_SECONDS * 1000));
  timers.push(setInterval(loadStats, STATS_SECONDS * 1000));
  // Countdowns and "ago" move on their own.
  timers.push(setInterval(() => { renderRows(); if (state.selected) renderDetail(); }, 1000));
}

function restart() {
  while (timers.length) clearInterval(timers.pop());
  if (eventsAbort) eventsAbort.abort();
  state.models.clear();
  state.lastEventId = null;
  notice("");
  start();
}

function setupControls() {
  $("search").addEventListener("input", (ev) => { state.search = ev.target.value.trim(); $("viewport").scrollTop = 0; refreshView(); });
  $("phase-filter").addEventListener("change", (ev) => { state.phase = ev.target.value; $("viewport").scrollTop = 0; refreshView(); });
  $("viewport").addEventListener("scroll", () => requestAnimationFrame(renderRows), { passive: true });
  for (const button of document.querySelectorAll("#table-head button")) {
    button.addEventListener("click", () => {
      const key = button.dataset.sort;
      state.sort = { key, desc: state.sort.key === key ? !state.sort.desc : false };
      for (const b of document.querySelectorAll("#table-head button")) b.classList.remove("sorted", "desc");
      button.classList.add("sorted");
      if (state.sort.desc) button.classList.add("desc");
      refreshView();
    });
  }
  document.querySelector('#table-head button[data-sort="name"]').classList.add("sorted");
  $("detail-close").addEventListener("click", () => {
    state.selected = null;
    if (logAbort) logAbort.abort();
    $("detail").hidden = true;
    renderRows();
  });
  $("log-follow").addEventListener("change", loadLog);
  $("show-requests").addEventListener("change", (ev) => {
    for (const li of document.querySelectorAll('#activity li[data-kind="request"]')) li.hidden = !ev.target.checked;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setupKeyDialog();
  setupControls();
  start();
});
