// garrison review page. Everything the server sends is put on the page as text
// (textContent, SVG text nodes), never as markup: labels and paths come from the network.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const MAX_ROWS = 5000;  // rows follow mode keeps in the table (older ones: "Load older")
const state = { view: "map", q: "", map: null, selected: null, oldest: null, stream: null,
  total: 0, mapTimer: 0 };

// A character the page would act on rather than show (a bidi control reverses the text
// after it: a path could read as another; C0 and C1 controls) reads as its escape, as
// `garrison observe` prints it (garrison/flows/render.py, safe_text).
const UNSAFE = /[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;
const UNSAFE_BUT_NEWLINES = /[\u0000-\u0009\u000b-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;
const SHORT_ESCAPES = { "\n": "\\n", "\r": "\\r", "\t": "\\t" };

function shown(value, pattern = UNSAFE) {
  return String(value).replace(pattern, (c) => {
    const n = c.charCodeAt(0);
    return SHORT_ESCAPES[c] || (n < 0x100 ? "\\x" + n.toString(16).padStart(2, "0")
      : "\\u" + n.toString(16).padStart(4, "0"));
  });
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = tag === "pre" ? shown(v, UNSAFE_BUT_NEWLINES) : shown(v);
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(typeof child === "string" ? document.createTextNode(shown(child)) : child);
    }
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

async function api(path, params) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== "" && v !== null && v !== undefined) url.searchParams.set(k, v);
  }
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

// ------------------------------------------------------------------------------------------
// The URL holds the view and the filter, so a view can be shared.

function readURL() {
  const params = new URLSearchParams(location.search);
  state.view = ["map", "flows", "policy"].includes(params.get("view")) ?
    params.get("view") : "map";
  state.q = params.get("q") || "";
}

function writeURL(push) {
  const params = new URLSearchParams();
  params.set("view", state.view);
  if (state.q) params.set("q", state.q);
  const url = "?" + params.toString();
  if (push) history.pushState(null, "", url); else history.replaceState(null, "", url);
}

function show() {
  for (const name of ["map", "flows", "policy"]) {
    document.getElementById("view-" + name).classList.toggle("active", state.view === name);
    const tab = document.getElementById("tab-" + name);
    tab.classList.toggle("active", state.view === name);
    const params = new URLSearchParams();
    params.set("view", name);
    if (state.q) params.set("q", state.q);
    tab.setAttribute("href", "?" + params.toString());
  }
  document.getElementById("filter").value = state.q;
  document.getElementById("filter-error").textContent = "";
  stopFollow();
  document.getElementById("follow").checked = false;
  if (state.view === "map") loadMap();
  else if (state.view === "flows") loadFlows(true);
  else loadPolicy();
}

function fail(error) {
  document.getElementById("filter-error").textContent = String(error.message || error);
}

// ------------------------------------------------------------------------------------------
// Service map: a layered layout (longest path from the nodes nothing calls), drawn in SVG.

function layout(nodes, edges) {
  const out = new Map(nodes.map((n) => [n.id, []]));
  const indeg = new Map(nodes.map((n) => [n.id, 0]));
  for (const e of edges) {
    if (e.source === e.target) continue;
    out.get(e.source).push(e.target);
    indeg.set(e.target, indeg.get(e.target) + 1);
  }
  // ranks by longest path, cycles broken by visiting order
  const rank = new Map();
  const visiting = new Set();
  function depth(id) {
    if (rank.has(id)) return rank.get(id);
    if (visiting.has(id)) return 0;
    visiting.add(id);
    let r = 0;
    for (const e of edges) {
      if (e.target === id && e.source !== id) r = Math.max(r, depth(e.source) + 1);
    }
    visiting.delete(id);
    rank.set(id, r);
    return r;
  }
  nodes.forEach((n) => depth(n.id));
  const layers = [];
  for (const n of nodes) {
    const r = rank.get(n.id);
    (layers[r] = layers[r] || []).push(n);
  }
  const pos = new Map();
  const W = 250, H = 84, X0 = 30, Y0 = 30, GAP = 200;
  layers.forEach((layer, r) => {
    if (r > 0) {  // order by the mean position of the callers (barycentre)
      const key = (n) => {
        const ys = edges.filter((e) => e.target === n.id && pos.has(e.source))
          .map((e) => pos.get(e.source).y);
        return ys.length ? ys.reduce((a, b) => a + b, 0) / ys.length : 1e9;
      };
      layer.sort((a, b) => key(a) - key(b));
    }
    layer.forEach((n, i) => pos.set(n.id, { x: X0 + r * (W + GAP), y: Y0 + i * (H + 30),
      w: W, h: H, rank: r }));
  });
  return pos;
}

function edgeLabel(c) {
  const parts = [];
  if (c.forwarded) parts.push(c.forwarded + " fwd");
  if (c.dropped) parts.push(c.dropped + " drop");
  if (c.audit) parts.push(c.audit + " audit");
  if (c.error) parts.push(c.error + " err");
  return parts.join(" · ");
}

function drawMap(data) {
  const root = document.getElementById("map");
  root.replaceChildren();
  const pos = layout(data.nodes, data.edges);
  let width = 400, height = 200;
  for (const p of pos.values()) {
    width = Math.max(width, p.x + p.w + 40);
    height = Math.max(height, p.y + p.h + 60);
  }
  root.setAttribute("width", width);
  root.setAttribute("height", height);
  root.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const defs = svg("defs");
  for (const s of ["forwarded", "dropped", "mixed", "audit", "error"]) {
    const m = svg("marker", { id: "arrow-" + s, viewBox: "0 0 10 10", refX: "10", refY: "5",
      markerUnits: "userSpaceOnUse", markerWidth: "12", markerHeight: "12",
      orient: "auto-start-reverse" });
    m.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z" }));
    defs.append(m);
  }
  root.append(defs);
  const edgeLayer = svg("g"), nodeLayer = svg("g");
  root.append(edgeLayer, nodeLayer);
  for (const e of data.edges) {
    const a = pos.get(e.source), b = pos.get(e.target);
    if (!a || !b) continue;
    let d, lx, ly, anchor = "middle";
    if (e.source === e.target) {
      const x = a.x + a.w, y = a.y + a.h / 2;
      d = `M ${x} ${y - 10} C ${x + 60} ${y - 50}, ${x + 60} ${y + 50}, ${x} ${y + 10}`;
      lx = x + 50; ly = y;
    } else if (b.rank > a.rank) {
      const x1 = a.x + a.w, y1 = a.y + a.h / 2, x2 = b.x, y2 = b.y + b.h / 2;
      const mx = (x1 + x2) / 2;
      d = `M ${x1} ${y1} C ${mx} ${y1}, ${mx} ${y2}, ${x2} ${y2}`;
      // the label starts near the caller, where edges of different callers are still apart
      lx = x1 + (x2 - x1) * 0.2; ly = y1 + (y2 - y1) * 0.104 - 5; anchor = "start";
    } else {  // back or same-rank edge: around below
      const x1 = a.x + a.w / 2, y1 = a.y + a.h, x2 = b.x + b.w / 2, y2 = b.y + b.h;
      const low = Math.max(y1, y2) + 45;
      d = `M ${x1} ${y1} C ${x1} ${low}, ${x2} ${low}, ${x2} ${y2}`;
      lx = (x1 + x2) / 2; ly = low - 8;
    }
    const g = svg("g", { class: "edge " + e.state, "data-id": e.id,
      "data-source": e.source, "data-target": e.target });
    const title = svg("title");
    title.textContent = `${shown(nodeName(data, e.source))} → ${shown(nodeName(data, e.target))}: ` +
      edgeLabel(e.counts);
    g.append(title);
    g.append(svg("path", { class: "hit", d }));
    g.append(svg("path", { class: "line", d, "marker-end": `url(#arrow-${e.state})` }));
    const label = svg("text", { x: lx, y: ly, "text-anchor": anchor });
    label.textContent = edgeLabel(e.counts);
    g.append(label);
    g.addEventListener("click", () => selectEdge(e));
    edgeLayer.append(g);
  }
  for (const n of data.nodes) {
    const p = pos.get(n.id);
    const g = svg("g", { class: "node", "data-id": n.id, transform: `translate(${p.x},${p.y})` });
    g.append(svg("rect", { width: p.w, height: p.h, rx: 8 }));
    const name = svg("text", { x: 10, y: 22, class: "name" });
    name.textContent = clip(shown(n.name), 30);
    const who = svg("text", { x: 10, y: 42, class: "sub" });
    const id = n.identity === null ? "namespace" : `ID ${n.identity}`;
    who.textContent = clip(`${shown(n.namespace || "(no namespace)")} · ${id}` +
      (n.pod_count > 1 ? ` · ${n.pod_count} endpoints` : ""), 40);
    const labels = svg("text", { x: 10, y: 62, class: "sub" });
    labels.textContent = clip(shown(n.labels.join(", ")), 38);
    const title = svg("title");
    title.textContent = `${shown(n.name)}\n${n.labels.map((l) => shown(l)).join("\n")}`;
    g.append(title, name, who, labels);
    g.addEventListener("click", () => selectNode(n));
    nodeLayer.append(g);
  }
}

function clip(text, n) { return text.length > n ? text.slice(0, n - 1) + "…" : text; }

function nodeName(data, id) {
  const n = data.nodes.find((x) => x.id === id);
  return n ? n.name : id;
}

function markSelected(kind, id) {
  document.querySelectorAll("#map .selected").forEach((x) => x.classList.remove("selected"));
  const target = [...document.querySelectorAll(`#map .${kind}`)]
    .find((x) => x.getAttribute("data-id") === id);
  if (target) target.classList.add("selected");
}

function countsCells(c) {
  return ["forwarded", "dropped", "audit", "error"].map((k) => el("td", { class: "num",
    text: String(c[k] || 0) }));
}

function countsHead(first) {
  return el("tr", {}, el("th", { text: first }), el("th", { class: "num", text: "fwd" }),
    el("th", { class: "num", text: "drop" }), el("th", { class: "num", text: "audit" }),
    el("th", { class: "num", text: "err" }));
}

function flowsLink(filter, text) {
  const params = new URLSearchParams({ view: "flows", q: filter });
  const a = el("a", { href: "?" + params.toString(), class: "flows-link", text });
  a.addEventListener("click", (ev) => {
    ev.preventDefault();
    state.view = "flows"; state.q = filter; writeURL(true); show();
  });
  return a;
}

function selectEdge(e) {
  state.selected = e.id;
  markSelected("edge", e.id);
  const data = state.map;
  const box = document.getElementById("map-detail");
  box.replaceChildren();
  box.append(el("h3", { text: `${nodeName(data, e.source)} → ${nodeName(data, e.target)}` }));
  box.append(el("p", { class: "edge-counts",
    text: `${edgeLabel(e.counts) || "no decisions"}; last ${e.last_time || "—"}` }));
  if (e.l7.length) {
    const head = countsHead("L7 request");
    head.append(el("th", { text: "answers" }));
    const t = el("table", { class: "l7" }, head);
    for (const x of e.l7) {
      const answers = el("td", { class: "answers" });
      for (const a of x.answers) answers.append(el("span", { class: "chip",
        text: `${a.text} ×${a.count}` }));
      t.append(el("tr", {}, el("td", { class: "l7-what", text: `${x.protocol} ${x.what}` }),
        ...countsCells(x), answers));
    }
    box.append(t);
  }
  if (e.ports.length) {
    const t = el("table", { class: "ports" }, countsHead("L3/L4"));
    for (const x of e.ports) t.append(el("tr", {}, el("td", { text: x.port }),
      ...countsCells(x)));
    box.append(t);
  }
  box.append(el("h3", { text: "Policy rules" }));
  if (e.rules.length) {
    const t = el("table", { class: "edge-rules" }, el("tr", {}, el("th", { text: "rule" }),
      el("th", { class: "num", text: "allowed" }), el("th", { class: "num", text: "denied" }),
      el("th", { class: "num", text: "audited" })));
    for (const r of e.rules) t.append(el("tr", {}, el("td", { class: "rule", text: r.text }),
      el("td", { class: "num", text: String(r.allowed) }),
      el("td", { class: "num", text: String(r.denied) }),
      el("td", { class: "num", text: String(r.audited) })));
    box.append(t);
  } else {
    box.append(el("p", { class: "muted",
      text: "No rule named by these flows (default deny, or no policy)." }));
  }
  if (e.filter) box.append(el("p", {}, flowsLink(e.filter, "Show these flows")));
}

function selectNode(n) {
  markSelected("node", n.id);
  const box = document.getElementById("map-detail");
  box.replaceChildren();
  box.append(el("h3", { text: n.name }));
  box.append(el("p", { text: `namespace ${n.namespace || "—"}, ` +
    (n.identity === null ? "a namespace group" : `identity ${n.identity}`) }));
  const labels = el("p");
  for (const l of n.labels) labels.append(el("span", { class: "chip", text: l }));
  box.append(labels);
  if (n.pods.length) {
    box.append(el("p", { text: `Endpoints (${n.pod_count}): ${n.pods.join(", ")}` }));
  }
  if (n.ips && n.ips.length) box.append(el("p", { text: `Addresses: ${n.ips.join(", ")}` }));
  if (n.identity !== null) {
    const f = (n.namespace ? `--namespace ${n.namespace} ` : "") + `--identity ${n.identity}`;
    box.append(el("p", {}, flowsLink(f, "Show its flows")));
  }
}

async function loadMap() {
  const note = document.getElementById("map-note");
  note.textContent = "Loading…";
  try {
    const data = await api("/api/map", { q: state.q });
    state.map = data;
    drawMap(data);
    if (data.loading) {
      const pct = data.loading.bytes ? Math.floor(100 * data.loading.done / data.loading.bytes) : 0;
      note.textContent = data.loading.failed ? "Reading the log failed (see the source line)." :
        `Reading the log: ${pct}% — ${data.records} records so far…`;
      if (!data.loading.failed) {
        clearTimeout(state.mapTimer);
        state.mapTimer = setTimeout(() => { if (state.view === "map") loadMap(); }, 700);
      }
      return;
    }
    note.textContent = data.records === 0 && !data.skipped ?
      "No flow records" + (state.q ? " match this filter." : " in this log yet.") :
      `${data.records} records, ${data.nodes.length} nodes, ${data.edges.length} edges` +
      (data.skipped ? `; ${data.skipped} lines were no flow record and were skipped` : "") +
      (data.grouped ? " — many endpoints: grouped by namespace" : "");
    if (state.selected) {
      const e = data.edges.find((x) => x.id === state.selected);
      if (e) selectEdge(e);
    }
  } catch (err) {
    note.textContent = "";
    fail(err);
  }
}

// ------------------------------------------------------------------------------------------
// Flows: newest first, paged by sequence number; follow mode over server-sent events.

function flowRow(f) {
  const tr = el("tr", { "data-seq": String(f.seq) });
  if (f.lost) {
    tr.append(el("td", { colspan: "7", class: "muted",
      text: `record ${f.seq}: no longer in the file (truncated)` }));
    return tr;
  }
  tr.append(el("td", { text: f.time || "" }), el("td", { text: f.source || "" }),
    el("td", { text: f.arrow || "" }), el("td", { text: f.destination || "" }),
    el("td", { text: f.type || "" }),
    el("td", { class: "v-" + (f.verdict || ""), text: f.verdict || "" }),
    el("td", { text: f.summary || "" }));
  tr.addEventListener("click", () => {
    document.querySelectorAll("#flows tr.selected").forEach((x) => x.classList.remove("selected"));
    tr.classList.add("selected");
    const box = document.getElementById("flow-detail");
    box.replaceChildren(el("h3", { text: `Record ${f.seq}` }));
    for (const p of f.policies || []) box.append(el("p", { class: "policy", text: p }));
    box.append(el("pre", { text: JSON.stringify(f.record, null, 2) }));
  });
  return tr;
}

async function loadFlows(fresh) {
  const body = document.querySelector("#flows tbody");
  const status = document.getElementById("flows-status");
  const more = document.getElementById("flows-more");
  if (fresh) {
    body.replaceChildren();
    state.oldest = null;
    document.getElementById("flow-detail").replaceChildren(el("p", { class: "muted",
      text: "Click a row to see the whole record." }));
  }
  status.textContent = "Loading…";
  try {
    const data = await api("/api/flows", { q: state.q, before: state.oldest, limit: 100 });
    if (fresh) state.total = data.total;
    for (const f of data.flows) body.append(flowRow(f));
    state.oldest = data.next_before;
    more.hidden = data.complete;
    status.textContent = `${body.children.length} shown of ${data.records} records` +
      (data.complete ? "" : " (more below)") +
      (data.loading ? " — still reading the log: reload for the newest" : "");
  } catch (err) {
    status.textContent = "";
    fail(err);
  }
}

function startFollow() {
  stopFollow();
  const params = new URLSearchParams({ after: String(state.total) });
  if (state.q) params.set("q", state.q);
  const source = new EventSource("/api/stream?" + params.toString());
  source.addEventListener("flow", (ev) => {
    const f = JSON.parse(ev.data);
    const body = document.querySelector("#flows tbody");
    body.prepend(flowRow(f));
    while (body.children.length > MAX_ROWS) body.lastElementChild.remove();  // bounded
  });
  source.addEventListener("total", (ev) => { state.total = Number(ev.data); });
  state.stream = source;
  document.getElementById("flows-status").textContent = "Following new records…";
}

function stopFollow() {
  if (state.stream) { state.stream.close(); state.stream = null; }
}

// ------------------------------------------------------------------------------------------
// Policy review

async function loadPolicy() {
  try {
    const data = await api("/api/policy");
    const body = document.querySelector("#rules tbody");
    body.replaceChildren();
    for (const r of data.rules) {
      body.append(el("tr", {}, el("td", { class: "rule", text: r.text }),
        el("td", { class: "num", text: String(r.allowed) }),
        el("td", { class: "num", text: String(r.denied) }),
        el("td", { class: "num", text: String(r.audited) }),
        el("td", { text: r.first_time || "—" }), el("td", { text: r.last_time || "—" })));
    }
    const never = document.getElementById("never");
    never.replaceChildren();
    if (data.never_matched === null) {
      never.append(el("p", { class: "muted", text: "Unknown: start the page with --policy " +
        "FILES (or on the agent) to list the rules no flow matched." }));
    } else if (!data.never_matched.length) {
      never.append(el("p", { text: "Every rule matched at least one flow." }));
    } else {
      const ul = el("ul", { class: "never" });
      for (const r of data.never_matched) ul.append(el("li", { class: "rule", text: r.text }));
      never.append(ul);
    }
    const audited = document.getElementById("audited");
    audited.replaceChildren();
    if (!data.audited.length) {
      audited.append(el("p", { class: "muted", text: "No audited flows." }));
    } else {
      const t = el("table", {}, el("tr", {}, el("th", { text: "From" }),
        el("th", { text: "To" }), el("th", { text: "Request" }),
        el("th", { class: "num", text: "Count" }), el("th", { text: "Rules" })));
      for (const a of data.audited) {
        t.append(el("tr", {}, el("td", { text: data.nodes[a.source] || a.source }),
          el("td", { text: data.nodes[a.target] || a.target }),
          el("td", { class: "l7-what", text: `${a.protocol} ${a.what}` }),
          el("td", { class: "num", text: String(a.count) }),
          el("td", { text: a.rules.join("; ") })));
      }
      audited.append(t);
    }
  } catch (err) {
    fail(err);
  }
}

// ------------------------------------------------------------------------------------------

// Read again every few seconds: the source line says when the agent stopped answering (and
// when it is back), and when this page's own server is gone.
const INFO_EVERY_MS = 3000;

async function loadInfo() {
  const source = document.getElementById("source");
  try {
    const info = await api("/api/info");
    source.textContent = shown(`${info.source} · ${info.records} records` +
      (info.skipped ? ` · ${info.skipped} lines skipped` : "") +
      (info.policies ? ` · policies: ${info.policies}` : "") +
      (info.problem ? ` · ${info.problem}` : ""));
    source.classList.toggle("error", Boolean(info.problem));
    source.title = info.skipped_samples.join("\n");
  } catch (err) {
    source.textContent = `the review server does not answer (${location.host}): it stopped, ` +
      "or the agent serving it did; reload once it runs again";
    source.classList.add("error");
  }
  setTimeout(loadInfo, INFO_EVERY_MS);
}

function init() {
  readURL();
  for (const name of ["map", "flows", "policy"]) {
    document.getElementById("tab-" + name).addEventListener("click", (ev) => {
      ev.preventDefault();
      state.view = name; writeURL(true); show();
    });
  }
  document.getElementById("filter-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.q = document.getElementById("filter").value.trim();
    state.selected = null;
    writeURL(true); show();
  });
  document.getElementById("filter-clear").addEventListener("click", () => {
    state.q = ""; writeURL(true); show();
  });
  document.getElementById("follow").addEventListener("change", (ev) => {
    if (ev.target.checked) startFollow(); else stopFollow();
  });
  document.getElementById("flows-more").addEventListener("click", () => loadFlows(false));
  window.addEventListener("popstate", () => { readURL(); show(); });
  loadInfo();
  writeURL(false);
  show();
}

init();
