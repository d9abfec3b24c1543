// The llmos web console. Every call goes through the HTTP/JSON gateway: POST /v1/kernel/<Method>
// with the protobuf JSON mapping (camelCase fields; 64-bit integers, pids included, as strings),
// streaming methods as Server-Sent Events. The engine panel reads /metrics (Prometheus text).
"use strict";

const REFRESH_MS = 1000;      // process list, detail and engine refresh
const RETRY_MS = 1000;        // before a stream that broke (Events, FollowLog) is opened again
const LOG_KEEP = 1000;        // log lines kept in the detail panel
const EVENTS_KEEP = 500;
const TOP_PAGE = 100;         // rows per page of the top view
const CHART_POINTS = 120;     // samples per engine chart
const ENDED = new Set(["EXITED", "KILLED", "CRASHED"]);

// -- who this console's user is ---------------------------------------------------------------
// The token comes from the login field or the URL's fragment (/#token=...: the fragment never
// reaches a server log) and is kept in sessionStorage (this tab only, gone when it closes). Every
// call sends it as "Authorization: Bearer"; without one, a loopback server treats the caller as the
// owner of namespace "default". GetNamespace says the token's role.
const TOKEN_KEY = "llmos-token";
let role = null;  // "admin" | "owner" | "reader", once known

function token() { return sessionStorage.getItem(TOKEN_KEY) ?? ""; }

function takeTokenFromFragment() {  // whether there was one
  const given = new URLSearchParams(location.hash.slice(1)).get("token");
  if (given === null) return false;
  sessionStorage.setItem(TOKEN_KEY, given);
  history.replaceState(null, "", location.pathname + location.search);  // out of the address bar and history
  $("token").value = given;
  return true;
}

function tokenChanged() {
  learnRole();
  if (selected) followLog(selected);
}

async function learnRole() {
  try {
    const ns = await call("GetNamespace", {});
    role = ns.callerRole || null;
    $("who").textContent = `${role} of ${ns.name}`;
  } catch (e) {
    role = null;
    $("who").textContent = e.message;
  }
  refreshDetail();
}

// The one place that decides which actions the console offers: a reader token may only look. The
// kernel refuses a reader's Kill or SetPriority anyway (PERMISSION_DENIED); this keeps the buttons honest.
function allowed(action /* "kill" | "priority" */) {
  return role === "admin" || role === "owner";
}

// -- calls ------------------------------------------------------------------------------------
function headers() {
  const h = { "Content-Type": "application/json" };
  if (token()) h.Authorization = `Bearer ${token()}`;
  return h;
}

class CallError extends Error {
  constructor(status, message) { super(`${status}: ${message}`); this.status = status; }
}

async function call(method, request = {}) {
  const response = await fetch(`/v1/kernel/${method}`, { method: "POST", headers: headers(), body: JSON.stringify(request) });
  const body = await response.json();
  if (!response.ok) throw new CallError(body.error?.status ?? response.status, body.error?.message ?? "");
  return body;
}

// A streaming method: calls onMessage with each message until the stream ends or signal aborts.
async function stream(method, request, onMessage, signal) {
  const response = await fetch(`/v1/kernel/${method}`, { method: "POST", headers: headers(), body: JSON.stringify(request), signal });
  if (!response.ok) {
    const body = await response.json();
    throw new CallError(body.error?.status ?? response.status, body.error?.message ?? "");
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (event === "end") return;
      if (event === "error") { const e = JSON.parse(data).error; throw new CallError(e.status, e.message); }
      onMessage(JSON.parse(data));
    }
  }
}

// -- state ------------------------------------------------------------------------------------
const procs = new Map();       // pid (string) -> ProcessInfo as JSON
const collapsed = new Set();   // pids whose children are hidden
const previousCpu = new Map(); // pid -> cpuMs at the previous refresh, for CPU %
let cpuPercent = new Map();
let lastRefresh = 0, refreshSeconds = 0;
let selected = null;
let logFollow = null;  // the AbortController of the selected process's FollowLog stream
let topPage = 0;
let filesPath = "";

const $ = (id) => document.getElementById(id);
const num = (v) => Number(v ?? 0);
const usage = (p, key) => num(p.usage?.[key]);
const kb = (p) => Math.floor(usage(p, "memoryBytes") / 1024);
const when = (ms) => (num(ms) ? new Date(num(ms)).toLocaleTimeString() : "–");
function stateText(p) { return p.state + (p.blockedOn ? `:${p.blockedOn}` : ""); }
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k.startsWith("data-")) node.setAttribute(k, v); else node[k] = v;
  }
  node.append(...children);
  return node;
}

function setOnline(ok, why = "") {
  const c = $("connection");
  c.textContent = ok ? "live" : `offline ${why}`;
  c.classList.toggle("bad", !ok);
}

// -- the process list: a full refresh each second, kept current between them by Events ---------
async function refreshProcesses() {
  const began = performance.now();
  const listed = [];
  for (let after = "0"; ;) {  // the kernel answers in pages, by pid
    const page = await call("ListProcesses", { includeEnded: $("show-ended").checked, pageSize: 10000, afterPid: after });
    listed.push(...page.processes);
    if (page.nextAfterPid === "0") break;
    after = page.nextAfterPid;
  }
  const now = performance.now();
  refreshSeconds = lastRefresh ? (now - lastRefresh) / 1000 : 0;
  lastRefresh = now;
  procs.clear();
  cpuPercent = new Map();
  for (const p of listed) {
    procs.set(p.pid, p);
    const before = previousCpu.get(p.pid);
    if (refreshSeconds && before !== undefined) {
      cpuPercent.set(p.pid, (100 * (usage(p, "cpuMs") - before)) / (refreshSeconds * 1000));
    }
  }
  previousCpu.clear();
  for (const p of procs.values()) previousCpu.set(p.pid, usage(p, "cpuMs"));
  renderSummary();
  renderTree();
  renderTop();
  return performance.now() - began;
}

function renderSummary() {
  const counts = {};
  for (const p of procs.values()) counts[p.state] = (counts[p.state] ?? 0) + 1;
  const parts = Object.entries(counts).map(([s, n]) => `${n} ${s.toLowerCase()}`);
  $("summary").textContent = `${procs.size} processes` + (parts.length ? ` (${parts.join(", ")})` : "");
}

// The tree in display order: each process after its parent, children by pid.
function treeOrder() {
  const filter = $("filter").value.trim().toLowerCase();
  const children = new Map();
  const roots = [];
  for (const p of procs.values()) {
    if (p.parent !== "0" && procs.has(p.parent)) {
      if (!children.has(p.parent)) children.set(p.parent, []);
      children.get(p.parent).push(p);
    } else roots.push(p);
  }
  const byPid = (a, b) => num(a.pid) - num(b.pid);
  const order = [];
  const visit = (p, depth) => {
    const kids = children.get(p.pid) ?? [];
    order.push({ p, depth, kids: kids.length });
    if (!collapsed.has(p.pid)) for (const c of kids.sort(byPid)) visit(c, depth + 1);
  };
  if (filter) {  // a filter shows matching processes flat
    return [...procs.values()].filter((p) =>
      [p.pid, p.name, p.state, p.kind, p.blockedOn].some((v) => String(v ?? "").toLowerCase().includes(filter)))
      .sort(byPid).map((p) => ({ p, depth: 0, kids: 0 }));
  }
  for (const r of roots.sort(byPid)) visit(r, 0);
  return order;
}

let treeRows = [];
function renderTree() {
  treeRows = treeOrder();
  $("tree-count").textContent = `${treeRows.length} shown`;
  $("tree").querySelector(".spacer").style.height = `${treeRows.length * rowHeight()}px`;
  drawVisibleRows();
}

function rowHeight() { return parseFloat(getComputedStyle(document.documentElement).getPropertyValue("--row")) || 22; }

// Only the rows in view exist in the DOM: 10,000 processes cost what 40 do.
function drawVisibleRows() {
  const box = $("tree"), h = rowHeight();
  const first = Math.max(0, Math.floor(box.scrollTop / h) - 5);
  const last = Math.min(treeRows.length, first + Math.ceil(box.clientHeight / h) + 10);
  const rows = box.querySelector(".rows");
  rows.style.top = `${first * h}px`;
  rows.replaceChildren(...treeRows.slice(first, last).map(({ p, depth, kids }) => {
    const twist = kids ? (collapsed.has(p.pid) ? "▸" : "▾") : "";
    const row = el("div", { class: `row tree-row${p.pid === selected ? " selected" : ""}`, "data-pid": p.pid },
      el("span", { style: `padding-left:${depth}em` }, el("span", { class: "twist", "data-twist": p.pid }, twist), p.pid),
      el("span", {}, p.name || "–"), el("span", {}, p.kind),
      el("span", { class: `state-${p.state}` }, stateText(p)), el("span", {}, String(p.priority ?? 0)),
      el("span", {}, String(usage(p, "cpuMs"))), el("span", {}, String(kb(p))), el("span", {}, String(usage(p, "tokens"))),
      el("span", {}, String(usage(p, "mailboxLen"))));
    return row;
  }));
}

// -- top -------------------------------------------------------------------------------------
function renderTop() {
  const live = [...procs.values()].filter((p) => !ENDED.has(p.state));
  live.sort((a, b) => (cpuPercent.get(b.pid) ?? 0) - (cpuPercent.get(a.pid) ?? 0) || num(a.pid) - num(b.pid));
  const pages = Math.max(1, Math.ceil(live.length / TOP_PAGE));
  topPage = Math.min(topPage, pages - 1);
  $("top-page").textContent = `page ${topPage + 1} of ${pages}`;
  $("top").tBodies[0].replaceChildren(...live.slice(topPage * TOP_PAGE, (topPage + 1) * TOP_PAGE).map((p) =>
    el("tr", { "data-pid": p.pid }, ...[p.pid, p.name || "–", p.kind, stateText(p), p.priority ?? 0, p.weight,
      (cpuPercent.get(p.pid) ?? 0).toFixed(1), usage(p, "cpuMs"), kb(p), usage(p, "tokens"),
      `${usage(p, "messagesReceived")}/${usage(p, "messagesSent")}`, usage(p, "mailboxLen")]
      .map((v) => el("td", {}, String(v))))));
}

// -- events ----------------------------------------------------------------------------------
function onEvent(event) {
  if (event.kind === "subscribed") { setOnline(true); return; }
  const p = event.process;
  if (event.kind === "spawned" || $("show-ended").checked) procs.set(p.pid, p);
  else procs.delete(p.pid);
  const list = $("events");
  const what = event.kind === "ended" && p.exitReason ? ` (${p.exitReason})` : "";
  list.prepend(el("li", { "data-pid": p.pid, "data-kind": event.kind },
    `${when(event.atMs)}  ${event.kind.padEnd(7)} ${p.pid} ${p.kind} ${p.name || "–"} ${p.state}${what}`));
  while (list.children.length > EVENTS_KEEP) list.lastChild.remove();
  scheduleRender();
  if (p.pid === selected) refreshDetail();
}

let renderPending = false;
function scheduleRender() {  // a burst of events redraws once per frame
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => { renderPending = false; renderSummary(); renderTree(); });
}

async function followEvents() {
  for (;;) {
    try {
      await stream("Events", {}, onEvent);
    } catch (e) {
      setOnline(false, e.message);
    }
    await new Promise((r) => setTimeout(r, RETRY_MS));
  }
}

// -- the selected process --------------------------------------------------------------------
function select(pid) {
  selected = pid;
  $("detail-log").textContent = "";
  $("detail").hidden = false;
  $("control-status").textContent = "";
  drawVisibleRows();
  refreshDetail();
  followLog(pid);
}

async function refreshDetail() {
  if (!selected) return;
  const pid = selected;
  let p;
  try { p = await call("GetProcess", { pid }); } catch (e) { $("detail-state").textContent = e.message; return; }
  if (pid !== selected) return;
  $("detail-pid").textContent = p.pid;
  $("detail-name").textContent = p.name ? `“${p.name}”` : "";
  $("detail-state").textContent = stateText(p) + (p.exitReason ? ` (${p.exitReason})` : "");
  $("detail-state").className = `state-${p.state}`;
  $("detail-kind").textContent = `${p.kind} in namespace ${p.namespace || "default"}`;
  $("detail-parent").textContent = p.parent === "0" ? "–" : p.parent;
  $("detail-priority").textContent = `${p.priority ?? 0} / ${p.weight}`;
  $("detail-mailbox").textContent = `${usage(p, "mailboxLen")} messages, ${usage(p, "mailboxBytes")} bytes waiting`;
  $("detail-usage").textContent = `cpu ${usage(p, "cpuMs")} ms, wall ${usage(p, "wallMs")} ms, memory ${kb(p)} KB, ` +
    `tokens ${usage(p, "tokens")}, messages ${usage(p, "messagesReceived")} in / ${usage(p, "messagesSent")} out, ` +
    `${usage(p, "processes")} live descendants`;
  $("detail-limits").textContent = Object.entries(p.limits ?? {}).filter(([, v]) => num(v))
    .map(([k, v]) => `${k} ${v}`).join(", ") || "server defaults";
  const pids = (list) => (list ?? []).join(", ") || "none";
  $("detail-monitors").textContent = `watches ${pids(p.monitors)}; watched by ${pids(p.monitoredBy)}`;
  $("detail-times").textContent = `${when(p.startedAtMs)} / ${when(p.endedAtMs)}`;
  $("detail-result").textContent = p.error || (ENDED.has(p.state) ? JSON.stringify(p.result ?? null) : "–");
  const ended = ENDED.has(p.state);
  $("kill").hidden = !allowed("kill");
  $("priority-controls").hidden = !allowed("priority");
  $("kill").disabled = ended;
  $("set-priority").disabled = ended;
  $("priority").disabled = ended;
  if (document.activeElement !== $("priority")) $("priority").value = p.priority ?? 0;
}

// The selected process's log, streamed by the server (FollowLog) as it is written: the last
// LOG_KEEP lines, then each new one, until the process ends or another is selected.
async function followLog(pid) {
  if (logFollow) logFollow.abort();
  const mine = logFollow = new AbortController();
  let offset = "0", tail = LOG_KEEP;
  const show = (page) => {
    offset = page.nextOffset;
    if (!page.lines.length) return;
    const log = $("detail-log");
    const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    const lines = (log.textContent ? log.textContent.split("\n") : []).concat(page.lines).slice(-LOG_KEEP);
    log.textContent = lines.join("\n");
    if (atEnd) log.scrollTop = log.scrollHeight;
  };
  while (!mine.signal.aborted) {
    try {
      await stream("FollowLog", { pid, offset, tail }, show, mine.signal);
      return;  // the process ended and its last line is shown
    } catch (e) {
      if (mine.signal.aborted || e.status === "NOT_FOUND" || e.status === "PERMISSION_DENIED") return;
    }
    tail = 0;  // from where it broke off
    await new Promise((r) => setTimeout(r, RETRY_MS));
  }
}

async function control(what, request, method) {
  $("control-status").textContent = "…";
  try {
    await call(method, request);
    $("control-status").textContent = `${what}: done`;
  } catch (e) {
    $("control-status").textContent = `${what}: ${e.message}`;
  }
  refreshDetail();
}

// -- the engine panel: /metrics, sampled each second -------------------------------------------
const series = { batch: [], tps: [], kv: [] };

function parseMetrics(text) {
  const values = {};
  for (const line of text.split("\n")) {
    const m = /^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (m) values[m[1] + (m[2] ?? "")] = Number(m[3]);
  }
  return values;
}

function drawChart(canvas, points, max) {
  const ctx = canvas.getContext("2d"), w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#dde2e8";
  ctx.strokeRect(0.5, 0.5, w - 1, h - 1);
  if (!points.length) return;
  const top = Math.max(max ?? 0, ...points, 1e-9);
  ctx.strokeStyle = "#2563eb";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  points.forEach((v, i) => {
    const x = (i / (CHART_POINTS - 1)) * (w - 4) + 2, y = h - 3 - (v / top) * (h - 8);
    if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
  });
  ctx.stroke();
}

async function refreshEngine() {
  const response = await fetch("/metrics", { headers: headers() });
  if (!response.ok) return;
  const m = parseMetrics(await response.text());
  const used = m['llmos_engine_kv_blocks{state="used"}'], free = m['llmos_engine_kv_blocks{state="free"}'];
  const sample = { batch: m.llmos_engine_batch_size, tps: m.llmos_engine_tokens_per_second, kv: used };
  if (sample.batch === undefined) { $("engine-stats").replaceChildren(el("dt", {}, "engine"), el("dd", {}, "none (llmosd --model none)")); return; }
  for (const [k, v] of Object.entries(sample)) {
    series[k].push(v ?? 0);
    if (series[k].length > CHART_POINTS) series[k].shift();
  }
  $("val-batch").textContent = sample.batch.toFixed(2);
  $("val-tps").textContent = sample.tps.toFixed(1);
  $("val-kv").textContent = `${used} of ${used + free}`;
  drawChart($("chart-batch"), series.batch);
  drawChart($("chart-tps"), series.tps);
  drawChart($("chart-kv"), series.kv, used + free);
  const facts = [["running sequences", m.llmos_engine_running_sequences], ["waiting sequences", m.llmos_engine_waiting_sequences],
    ["tokens generated", m.llmos_engine_generated_tokens_total], ["steps", m.llmos_engine_steps_total],
    ["preemptions", m.llmos_engine_preemptions_total], ["prefix-cache hits", m.llmos_engine_prefix_cache_hits_total],
    ["run queue", m.llmos_run_queue_length], ["virtual CPUs", m.llmos_virtual_cpus]];
  $("engine-stats").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-metric": k }, String(v ?? "–"))]));
}

// -- files -----------------------------------------------------------------------------------
async function refreshFiles() {
  $("files-path").textContent = `/${filesPath}`;
  let reply;
  try { reply = await call("ListFiles", { path: filesPath }); } catch (e) { $("file-view").textContent = e.message; return; }
  $("files").tBodies[0].replaceChildren(...(reply.entries ?? []).map((f) =>
    el("tr", { "data-path": f.path, "data-dir": String(!!f.isDir) },
      el("td", {}, f.path.split("/").pop() + (f.isDir ? "/" : "")), el("td", {}, f.isDir ? "" : f.size),
      el("td", {}, new Date(num(f.modifiedMs)).toLocaleString()))));
}

async function showFile(path) {
  const pieces = [];
  try {
    await stream("ReadFile", { path, length: String(64 << 10) }, (chunk) => pieces.push(atob(chunk.data ?? "")));
  } catch (e) { $("file-view").textContent = e.message; return; }
  const bytes = Uint8Array.from(pieces.join(""), (c) => c.charCodeAt(0));
  $("file-view").textContent = new TextDecoder().decode(bytes);
}

// -- wiring ----------------------------------------------------------------------------------
function every(ms, fn) {
  const tick = async () => {
    let spent = 0;
    try { spent = (await fn()) ?? 0; } catch (e) { setOnline(false, e.message); }
    setTimeout(tick, Math.max(ms, 4 * spent));  // a slow refresh (huge lists) spaces the next one out
  };
  tick();
}

function activeTab() { return document.querySelector("#tabs .active").dataset.tab; }

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = token();
  takeTokenFromFragment();
  $("token").addEventListener("change", () => {
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    tokenChanged();
  });
  window.addEventListener("hashchange", () => { if (takeTokenFromFragment()) tokenChanged(); });  // a link to this page
  learnRole();
  for (const b of document.querySelectorAll("#tabs button")) {
    b.addEventListener("click", () => {
      document.querySelectorAll("#tabs button, .pane").forEach((n) => n.classList.remove("active"));
      b.classList.add("active");
      $(`tab-${b.dataset.tab}`).classList.add("active");
      if (b.dataset.tab === "tree") drawVisibleRows();
      if (b.dataset.tab === "files") refreshFiles();
    });
  }
  $("tree").addEventListener("scroll", drawVisibleRows);
  $("tree").addEventListener("click", (e) => {
    const twist = e.target.closest("[data-twist]");
    if (twist && twist.textContent) {
      const pid = twist.dataset.twist;
      if (collapsed.has(pid)) collapsed.delete(pid); else collapsed.add(pid);
      renderTree();
      return;
    }
    const row = e.target.closest("[data-pid]");
    if (row) select(row.dataset.pid);
  });
  $("top").addEventListener("click", (e) => { const row = e.target.closest("[data-pid]"); if (row) select(row.dataset.pid); });
  $("events").addEventListener("click", (e) => { const row = e.target.closest("[data-pid]"); if (row) select(row.dataset.pid); });
  $("top-prev").addEventListener("click", () => { topPage = Math.max(0, topPage - 1); renderTop(); });
  $("top-next").addEventListener("click", () => { topPage += 1; renderTop(); });
  $("filter").addEventListener("input", renderTree);
  $("show-ended").addEventListener("change", refreshProcesses);
  $("kill").addEventListener("click", () => control("kill", { pid: selected, reason: "console" }, "Kill"));
  $("set-priority").addEventListener("click", () =>
    control("priority", { pid: selected, priority: Number($("priority").value) }, "SetPriority"));
  $("files-up").addEventListener("click", () => { filesPath = filesPath.split("/").slice(0, -1).join("/"); refreshFiles(); });
  $("files").addEventListener("click", (e) => {
    const row = e.target.closest("[data-path]");
    if (!row) return;
    if (row.dataset.dir === "true") { filesPath = row.dataset.path; refreshFiles(); } else showFile(row.dataset.path);
  });
  window.addEventListener("resize", drawVisibleRows);

  followEvents();
  every(REFRESH_MS, async () => { const spent = await refreshProcesses(); setOnline(true); return spent; });
  every(REFRESH_MS, async () => { await refreshDetail(); });
  every(REFRESH_MS, async () => { if (activeTab() === "engine" || !series.batch.length) await refreshEngine(); });
});
