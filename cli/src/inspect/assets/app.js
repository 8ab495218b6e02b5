// Burrow inspector page: a list kept live by the server-sent event stream /api/events,
// and a detail pane fetched from /api/exchanges/{id}. No polling.
"use strict";

const $ = (s) => document.querySelector(s);
const rows = new Map(); // id -> summary
let selected = null;
let detailTimer = null;
let filterTimer = null;

const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const ms = (v) => (v == null ? "–" : v < 10 ? v.toFixed(1) + " ms" : v < 10000 ? Math.round(v) + " ms" : (v / 1000).toFixed(1) + " s");
const size = (n) => (n < 1024 ? n + " B" : n < 1048576 ? (n / 1024).toFixed(1) + " KiB" : (n / 1048576).toFixed(1) + " MiB");
const time = (iso) => new Date(iso).toLocaleTimeString([], { hour12: false });

function filters() {
  return { kind: $("#f-kind").value, status: $("#f-status").value, path: $("#f-path").value.trim(), q: $("#f-q").value.trim() };
}

function matches(s, f) {
  if (f.kind && s.kind !== f.kind) return false;
  if (f.status && String(Math.floor((s.status || 0) / 100)) !== f.status) return false;
  if (f.path && !s.path.startsWith(f.path)) return false;
  return true;
}

function statusCell(s) {
  if (s.kind === "ws" && s.state === "refused") return `<span class="st s${Math.floor(s.status / 100)}">${s.status}</span>`;
  if (s.kind === "ws") {
    const st = s.state === "open" ? "open" : s.state === "error" ? s.status || "error" : s.ws && s.ws.close_code ? "closed " + s.ws.close_code : s.state;
    return `<span class="st ${s.state === "open" ? "s2" : s.state === "error" ? "s5" : "sp"}">${esc(st)}</span>`;
  }
  if (s.status == null) return `<span class="st sp">…</span>`;
  return `<span class="st s${Math.floor(s.status / 100)}">${s.status}</span>`;
}

function io(s) {
  if (s.kind === "ws" && s.ws) return `${s.ws.messages_in} in / ${s.ws.messages_out} out`;
  return `${size(s.request_bytes)} / ${size(s.response_bytes)}`;
}

function rowHtml(s) {
  return `<td>${time(s.started_at)}</td><td><span class="badge ${s.kind}">${s.kind === "ws" ? "WS" : "HTTP"}</span>${s.replay_of ? ' <span class="badge" title="replay of #' + s.replay_of + '">replay</span>' : ""}</td>` +
    `<td>${esc(s.method)}</td><td class="path" title="${esc(s.path)}">${esc(s.path)}</td><td>${statusCell(s)}</td>` +
    `<td class="num">${ms(s.duration_ms)}</td><td class="num">${io(s)}</td>`;
}

function upsertRow(s, fresh) {
  const f = filters();
  let tr = document.querySelector(`tr.row[data-id="${s.id}"]`);
  if (!matches(s, f) || (f.q && !tr)) {
    if (tr && !matches(s, f)) tr.remove();
    // Text search runs on the server (it looks into headers and bodies).
    if (f.q && !tr && matches(s, f)) { clearTimeout(filterTimer); filterTimer = setTimeout(reload, 300); }
    return;
  }
  if (!tr) {
    tr = document.createElement("tr");
    tr.className = "row" + (fresh ? " fresh" : "");
    tr.dataset.id = s.id;
    tr.addEventListener("click", () => select(s.id));
    const body = $("#rows");
    // Newest first: ids grow with time.
    let before = null;
    for (const other of body.children) {
      if (Number(other.dataset.id) < s.id) { before = other; break; }
    }
    body.insertBefore(tr, before);
  }
  tr.dataset.kind = s.kind;
  tr.dataset.state = s.state;
  tr.classList.toggle("sel", s.id === selected);
  tr.innerHTML = rowHtml(s);
  updateCount();
}

function updateCount() {
  const n = $("#rows").children.length;
  $("#count").textContent = `${n} shown`;
  $("#empty").style.display = n ? "none" : "block";
}

async function reload() {
  const f = filters();
  const qs = new URLSearchParams();
  for (const [k, v] of Object.entries(f)) if (v) qs.set(k, v);
  qs.set("limit", "1000");
  const r = await fetch("/api/exchanges?" + qs);
  const data = await r.json();
  $("#rows").innerHTML = "";
  rows.clear();
  for (const s of data.exchanges.reverse()) { rows.set(s.id, s); upsertRow(s, false); }
  updateCount();
}

async function loadSession() {
  const r = await fetch("/api/status");
  const s = await r.json();
  if (!s) return;
  const fw = (s.forwards || []).map(([pub, local]) => `<span class="fw"><b>${esc(pub)}</b> → ${esc(local)}</span>`).join("");
  $("#session").innerHTML = fw || `<span class="fw">${esc(s.status)}</span>`;
}

function kv(headers) {
  if (!headers.length) return '<p class="note">none</p>';
  return `<table class="kv">${headers.map(([k, v]) => `<tr><td>${esc(k)}</td><td>${esc(v)}</td></tr>`).join("")}</table>`;
}

function bodyHtml(b) {
  if (b.encoding === "none") return `<p class="note">${b.size ? size(b.size) + " (not kept)" : "empty"}</p>`;
  const cut = b.truncated ? ` — first ${size(b.captured)} of ${size(b.size)} kept` : "";
  return `<p class="note">${size(b.size)}, ${b.encoding}${cut}</p><pre>${esc(b.content)}</pre>`;
}

function wsHtml(d) {
  const w = d.ws || {};
  const ws = d.websocket || { frames: [] };
  const close = w.close_code != null ? `${w.close_code}${w.close_reason ? `<small>${esc(w.close_reason)}</small>` : ""}` : "–";
  const frames = ws.frames.map((f) =>
    `<tr><td class="num">${f.at_ms.toFixed(1)} ms</td><td><span class="dir ${f.dir}">${f.dir === "in" ? "→ in" : "← out"}</span></td>` +
    `<td>${esc(f.opcode)}${f.fin ? "" : " (more)"}</td><td class="num">${size(f.size)}</td><td class="pv">${esc(f.preview ?? "")}</td></tr>`).join("");
  return `<div class="stats">
      <div class="stat"><div class="k">Messages in</div><div class="v" id="ws-in">${w.messages_in ?? 0}</div></div>
      <div class="stat"><div class="k">Messages out</div><div class="v" id="ws-out">${w.messages_out ?? 0}</div></div>
      <div class="stat"><div class="k">Bytes in / out</div><div class="v">${size(w.bytes_in ?? 0)} / ${size(w.bytes_out ?? 0)}</div></div>
      <div class="stat"><div class="k">Close</div><div class="v" id="ws-close">${close}</div></div>
    </div>
    <div class="meta" style="margin-top:10px"><span>State <b id="ws-state">${esc(d.state)}</b></span>
      <span>Subprotocol <b>${esc(ws.subprotocol || "none")}</b></span><span>Extensions <b>${esc(ws.extensions || "none")}</b></span>
      ${w.closed_by ? `<span>Closed by <b>${esc(w.closed_by)}</b></span>` : ""}</div>
    <h3>Frames ${ws.frames_dropped ? `<span class="note">(${ws.frames_dropped} older not kept)</span>` : ""}</h3>
    ${frames ? `<table class="frames"><thead><tr><th class="num">Time</th><th>Dir</th><th>Opcode</th><th class="num">Size</th><th>Preview</th></tr></thead><tbody>${frames}</tbody></table>` : '<p class="note">no frames yet</p>'}
    <h3>Upgrade request headers</h3>${kv(d.request.headers)}
    <h3>Upgrade response headers</h3>${kv(d.response.headers)}`;
}

function httpHtml(d) {
  return `<div class="actions"><button id="replay">Replay</button><button id="edit" class="ghost">Edit &amp; replay</button></div>
    <div id="editor"></div><div id="toast" class="toast"></div>
    ${d.error ? `<p class="note" style="color:var(--bad)">${esc(d.error)}</p>` : ""}
    <h3>Request headers</h3>${kv(d.request.headers)}
    <h3>Request body</h3>${bodyHtml(d.request.body)}
    <h3>Response headers</h3>${kv(d.response.headers)}
    <h3>Response body</h3>${bodyHtml(d.response.body)}`;
}

async function showDetail(id) {
  const r = await fetch(`/api/exchanges/${id}`);
  if (selected !== id) return;
  if (!r.ok) { $("#detail").innerHTML = '<p class="empty">This exchange is no longer kept.</p>'; return; }
  const d = await r.json();
  const keepEditor = $("#editor") && $("#editor").innerHTML && d.kind === "http";
  if (keepEditor) return; // do not wipe a form being edited
  $("#detail").innerHTML = `<h2>${esc(d.method)} ${esc(d.path)}</h2>
    <div class="meta"><span>#${d.id}</span><span>${esc(d.started_at)}</span><span>→ ${esc(d.target)}</span>
    <span>${d.status ?? "pending"}</span><span>${ms(d.duration_ms)}</span>${d.replay_of ? `<span>replay of #${d.replay_of}</span>` : ""}</div>
    ${d.kind === "ws" ? wsHtml(d) : httpHtml(d)}`;
  if (d.kind === "http") {
    $("#replay").addEventListener("click", () => replay(d.id, null));
    $("#edit").addEventListener("click", () => editor(d));
  }
}

function editor(d) {
  const body = d.request.body.encoding === "none" ? "" : d.request.body.content;
  $("#editor").innerHTML = `<form class="edit">
    <div class="line"><input name="method" value="${esc(d.method)}" size="8"><input name="path" value="${esc(d.path)}" style="flex:1"></div>
    <textarea name="headers">${esc(d.request.headers.map(([k, v]) => k + ": " + v).join("\n"))}</textarea>
    <textarea name="body" placeholder="body">${esc(body)}</textarea>
    <div class="line"><button type="submit">Send</button><button type="button" class="ghost" id="cancel">Cancel</button></div></form>`;
  const form = $("#editor form");
  $("#cancel").addEventListener("click", () => { $("#editor").innerHTML = ""; });
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const headers = form.headers.value.split("\n").filter((l) => l.includes(":")).map((l) => {
      const i = l.indexOf(":"); return [l.slice(0, i).trim(), l.slice(i + 1).trim()];
    });
    replay(d.id, { method: form.method.value, path: form.path.value, headers, body: form.body.value });
  });
}

async function replay(id, edits) {
  const r = await fetch(`/api/exchanges/${id}/replay`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(edits || {}) });
  const out = await r.json();
  const t = $("#toast");
  if (!t) return;
  if (r.ok) { t.textContent = `Replayed as #${out.id}: ${out.status} in ${ms(out.duration_ms)}`; t.style.color = "var(--ok)"; if ($("#editor")) $("#editor").innerHTML = ""; }
  else { t.textContent = out.error || "replay failed"; t.style.color = "var(--bad)"; }
}

function select(id) {
  selected = id;
  for (const tr of document.querySelectorAll("tr.row")) tr.classList.toggle("sel", Number(tr.dataset.id) === id);
  showDetail(id);
}

function connect() {
  const es = new EventSource("/api/events");
  es.onopen = () => { $("#live").classList.remove("off"); reload(); loadSession(); };
  es.onerror = () => $("#live").classList.add("off");
  es.addEventListener("exchange", (ev) => {
    const s = JSON.parse(ev.data);
    const known = rows.has(s.id);
    rows.set(s.id, s);
    upsertRow(s, !known);
    if (!known && rows.size === 1) loadSession();
    if (s.id === selected) {
      clearTimeout(detailTimer);
      detailTimer = setTimeout(() => showDetail(s.id), 150);
    }
  });
  es.addEventListener("cleared", () => { rows.clear(); $("#rows").innerHTML = ""; updateCount(); });
  es.addEventListener("resync", reload);
}

for (const el of ["#f-kind", "#f-status", "#f-path", "#f-q"]) {
  $(el).addEventListener("input", () => { clearTimeout(filterTimer); filterTimer = setTimeout(reload, 150); });
}
$("#clear").addEventListener("click", () => fetch("/api/exchanges", { method: "DELETE" }));
updateCount();
connect();
