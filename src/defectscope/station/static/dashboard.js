// The station dashboard: draws what /v1/dashboard computes (no statistics here) and runs the review queue.
// Plain DOM + SVG, no library, works offline. Client-supplied text (file names, station, lot) only ever
// goes through textContent, never innerHTML.
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
// Green means good, and only good: the good class is GOOD_COLOR, the defect classes take DEFECT_COLORS in turn.
const GOOD_COLOR = "#15803d";
const DEFECT_COLORS = ["#dc2626", "#f59e0b", "#7c3aed", "#0891b2", "#db2777", "#ea580c", "#92400e", "#be185d", "#4b5563"];
const KIND_COLORS = { REVIEW: "#9ca3af", Drift: "#111827" };
// Another model's good class: still green (it passed), a lighter one; a class whose model's good class the
// station cannot tell: a neutral stone, neither good nor defect.
const OTHER_GOOD_COLOR = "#86efac";
const UNKNOWN_COLOR = "#a8a29e";
const $ = (id) => document.getElementById(id);
// reviewed: ids stored from this page, so a queue answer fetched before a review cannot bring its item back;
// queueSeq: only the newest queue request's answer is applied (a refresh and a review can overlap).
let state = { data: null, queue: [], current: null, labels: [], reviewed: new Set(), queueSeq: 0 };

function el(tag, attrs = {}, parent = null, text = null) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function html(tag, attrs = {}, parent = null, text = null) {
  const node = document.createElement(tag);
  // style through the CSSOM: the Content-Security-Policy refuses inline style attributes.
  for (const [k, v] of Object.entries(attrs)) if (k === "style") node.style.cssText = v; else node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function fmtTime(iso, bucketMinutes) {
  const d = new Date(iso);
  const hm = d.toISOString().slice(11, 16);
  return bucketMinutes >= 1440 ? d.toISOString().slice(5, 10) : hm;
}

const pct = (x, digits = 2) => (x === null || x === undefined ? "-" : (100 * x).toFixed(digits) + " %");

// A frame with axes; returns helpers mapping bucket index / value to pixels.
function frame(container, n, ymax, opts = {}) {
  container.textContent = "";
  const W = 600, H = 170, L = 44, R = 8, T = 8, B = 22;
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img" }, container);
  const x = (i) => L + (n <= 1 ? (W - L - R) / 2 : (i * (W - L - R)) / (n - 1));
  const bw = n > 0 ? (W - L - R) / n : 0;
  const xb = (i) => L + i * bw;
  const top = ymax > 0 ? ymax : 1;
  const y = (v) => T + (H - T - B) * (1 - v / top);
  el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999" }, svg);
  el("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#999" }, svg);
  for (const f of [0, 0.5, 1]) {
    const v = top * f;
    el("text", { x: L - 4, y: y(v) + 4, "text-anchor": "end", "font-size": 10, fill: "#666" }, svg,
      opts.percent ? (100 * v).toFixed(v * 100 < 1 ? 2 : 1) + "%" : (v >= 100 ? v.toFixed(0) : +v.toPrecision(3)).toString());
  }
  const labels = opts.labels || [];
  const every = Math.max(1, Math.ceil(labels.length / 8));
  labels.forEach((lab, i) => {
    if (i % every === 0) el("text", { x: opts.bars ? xb(i) + bw / 2 : x(i), y: H - 6, "text-anchor": "middle", "font-size": 10, fill: "#666" }, svg, lab);
  });
  return { svg, x, xb, bw, y };
}

function polyline(f, values, attrs, xfun = null, dots = true) {
  let d = "", pen = false;
  values.forEach((v, i) => {
    if (v === null || v === undefined) { pen = false; return; }
    const px = (xfun || f.x)(i), py = f.y(v);
    d += (pen ? " L" : " M") + px.toFixed(1) + " " + py.toFixed(1);
    pen = true;
  });
  if (d) el("path", { d, fill: "none", ...attrs }, f.svg);
  // Dots too: a series with data in one bucket only has no line to draw.
  if (dots) values.forEach((v, i) => {
    if (v !== null && v !== undefined) el("circle", { cx: (xfun || f.x)(i), cy: f.y(v), r: 1.8, fill: attrs.stroke }, f.svg);
  });
}

function drawDecisions(d) {
  const kinds = Object.keys(d.decisions_by_kind);
  const n = d.buckets.length;
  const totals = d.buckets.map((_, i) => kinds.reduce((s, k) => s + d.decisions_by_kind[k][i], 0));
  const labels = d.buckets.map((b) => fmtTime(b, d.bucket_minutes));
  const f = frame($("c-decisions"), n, Math.max(1, ...totals), { labels, bars: true });
  // Colours from each kind's verdict, which the server took from the row's own model (d.kinds), not its name.
  const verdictOf = (k) => (d.kinds && d.kinds[k] ? d.kinds[k].verdict : (k === d.good_class ? "PASS" : "REJECT"));
  const defects = kinds.filter((k) => !KIND_COLORS[k] && verdictOf(k) === "REJECT");
  const colorOf = (k) => {
    if (KIND_COLORS[k]) return KIND_COLORS[k];
    const v = verdictOf(k);
    if (v === "PASS") return k === d.good_class ? GOOD_COLOR : OTHER_GOOD_COLOR;
    if (v === "REJECT") return DEFECT_COLORS[defects.indexOf(k) % DEFECT_COLORS.length];
    return UNKNOWN_COLOR;
  };
  const about = (k) => {
    const e = d.kinds && d.kinds[k];
    if (!e || KIND_COLORS[k]) return k;
    const models = e.models.filter((m) => m !== d.model.id);
    const whose = models.length ? `, decided by model ${models.join(", ")}` : "";
    return `${k}: ${e.verdict || "verdict unknown (that model's good class is not known here)"}${whose}`;
  };
  for (let i = 0; i < n; i++) {
    let acc = 0;
    kinds.forEach((k, j) => {
      const c = d.decisions_by_kind[k][i];
      if (!c) return;
      const rect = el("rect", { x: f.xb(i) + 1, width: Math.max(1, f.bw - 2), y: f.y(acc + c), height: f.y(acc) - f.y(acc + c), fill: colorOf(k) }, f.svg);
      el("title", {}, rect, `${labels[i]} ${about(k)}: ${c}`);
      acc += c;
    });
  }
  const legend = $("l-decisions");
  legend.textContent = "";
  kinds.forEach((k) => {
    const s = html("span", { title: about(k), "data-kind": k, "data-verdict": verdictOf(k) || "unknown" }, legend);
    html("i", { style: `background:${colorOf(k)}` }, s);
    s.appendChild(document.createTextNode(`${k} ${d.decisions_by_kind[k].reduce((a, b) => a + b, 0)}`));
  });
}

function drawPChart(d) {
  const p = d.p_chart;
  const n = d.buckets.length;
  const vals = [...p.p, ...p.ucl].filter((v) => v !== null);
  const f = frame($("c-pchart"), n, Math.min(1, Math.max(0.01, ...vals) * 1.1), { labels: d.buckets.map((b) => fmtTime(b, d.bucket_minutes)), percent: true });
  if (p.pbar !== null) {
    el("line", { x1: f.x(0), x2: f.x(n - 1), y1: f.y(p.pbar), y2: f.y(p.pbar), stroke: "#2563eb", "stroke-dasharray": "4 3" }, f.svg);
  }
  polyline(f, p.ucl, { stroke: "#dc2626", "stroke-width": 1, "stroke-dasharray": "2 2", class: "ucl" }, null, false);
  polyline(f, p.lcl, { stroke: "#dc2626", "stroke-width": 1, "stroke-dasharray": "2 2", class: "lcl" }, null, false);
  polyline(f, p.p, { stroke: "#111827", "stroke-width": 1.5 }, null, false);
  p.p.forEach((v, i) => {
    if (v === null) return;
    const broken = p.violations[i];
    const dot = el("circle", { cx: f.x(i), cy: f.y(v), r: broken.length ? 4.5 : 2.5, fill: broken.length ? "#dc2626" : "#111827", class: broken.length ? "ooc" : "point" }, f.svg);
    const why = broken.map((r) => `rule ${r}: ${p.rules[r]}`).join("; ");
    el("title", {}, dot, `${pct(v)} (${p.defects[i]}/${p.n[i]}), limits ${pct(p.lcl[i])}..${pct(p.ucl[i])}${why ? " - " + why : ""}`);
  });
  const u = d.verdict_unknown;
  $("pchart-note").textContent = u && u.decisions
    ? `${u.decisions} automatic decision(s) of model(s) ${u.models.join(", ")} left out of the defect rate: the ` +
      `station cannot tell which of that model's classes passes (${Object.keys(u.kinds).join(", ")}).`
    : "";
}

function drawDrift(d) {
  const dr = d.drift;
  const rates = dr.per_bucket.map((k, i) => (dr.n[i] ? k / dr.n[i] : null));
  const calibrated = dr.calibrated_rate;
  const n = d.buckets.length;
  const f = frame($("c-drift"), n, Math.max(0.01, calibrated || 0, ...rates.filter((v) => v !== null)) * 1.15, { labels: d.buckets.map((b) => fmtTime(b, d.bucket_minutes)), percent: true });
  if (calibrated) el("line", { x1: f.x(0), x2: f.x(n - 1), y1: f.y(calibrated), y2: f.y(calibrated), stroke: "#2563eb", "stroke-dasharray": "4 3" }, f.svg);
  polyline(f, rates, { stroke: "#111827", "stroke-width": 1.5 });
  const t = $("drift-test");
  const a = dr.alarm;
  if (!calibrated) t.textContent = "This model has no Drift rule (no calibrated rate).";
  else if (!a || !a.n) t.textContent = `Calibrated rate ${pct(calibrated)}; no decisions yet.`;
  else t.textContent = `Last ${a.n} decisions: ${a.k} Drift (${pct(a.rate)}) vs calibrated ${pct(calibrated)}; one-sided binomial p = ${a.p_value.toPrecision(3)}${a.alarm ? " - ALARM" : ""}`;
}

function drawAutomation(d) {
  const a = d.automation;
  const labels = d.buckets.map((b) => fmtTime(b, d.bucket_minutes));
  let f = frame($("c-automation"), labels.length, 1, { labels, percent: true });
  polyline(f, a.rate, { stroke: "#15803d", "stroke-width": 2 });
  f = frame($("c-review"), labels.length, Math.max(1, ...a.review), { labels, bars: true });
  a.review.forEach((v, i) => { if (v) el("rect", { x: f.xb(i) + 1, width: Math.max(1, f.bw - 2), y: f.y(v), height: f.y(0) - f.y(v), fill: "#d97706" }, f.svg); });
}

function drawConfidence(d) {
  const c = d.confidence;
  const f = frame($("c-confidence"), d.buckets.length, 1, { labels: d.buckets.map((b) => fmtTime(b, d.bucket_minutes)), percent: true });
  polyline(f, c.q10, { stroke: "#93c5fd", "stroke-width": 1 });
  polyline(f, c.q90, { stroke: "#93c5fd", "stroke-width": 1 });
  polyline(f, c.q50, { stroke: "#1d4ed8", "stroke-width": 2 });
}

function drawThroughput(d) {
  const labels = d.buckets.map((b) => fmtTime(b, d.bucket_minutes));
  const tp = d.throughput_per_minute;
  let f = frame($("c-throughput"), tp.length, Math.max(1, ...tp), { labels, bars: true });
  tp.forEach((v, i) => { if (v) el("rect", { x: f.xb(i) + 1, width: Math.max(1, f.bw - 2), y: f.y(v), height: f.y(0) - f.y(v), fill: "#0891b2" }, f.svg); });
  const lat = d.latency_ms;
  f = frame($("c-latency"), labels.length, Math.max(1, ...lat.p99.filter((v) => v !== null)), { labels });
  polyline(f, lat.p50, { stroke: "#15803d", "stroke-width": 2 });
  polyline(f, lat.p99, { stroke: "#dc2626", "stroke-width": 1.5 });
}

function drawPilot(d) {
  const p = d.pilot;
  const box = $("pilot");
  box.textContent = "";
  html("p", { class: "muted" }, box, p.enabled ? "Pilot mode: every decision also goes to review." : "Reviewed decisions (REVIEW, Drift and picked ones).");
  const table = html("table", { class: "pilot" }, box);
  const head = html("tr", {}, table);
  for (const h of ["", "rate", `${Math.round(100 * p.confidence)} % interval`, "k / n"]) html("th", {}, head, h);
  const c = p.caps_against_people || {};
  const rows = [["agreement", p.agreement], ["escape (defect passed as GOOD)", p.escape], ["overkill (GOOD rejected)", p.overkill]];
  if (c.escape_of_defective) rows.push([`escape cap: defective (by people) passed${c.escape_of_defective.cap ? ", cap " + pct(c.escape_of_defective.cap) : ""}`, c.escape_of_defective]);
  if (c.overkill_of_good) rows.push([`overkill cap: good (by people) rejected${c.overkill_of_good.cap ? ", cap " + pct(c.overkill_of_good.cap) : ""}`, c.overkill_of_good]);
  for (const [name, r] of rows) {
    const tr = html("tr", {}, table);
    html("td", {}, tr, name);
    html("td", {}, tr, pct(r.rate, 1));
    html("td", {}, tr, r.n ? `${pct(r.low, 1)} - ${pct(r.high, 1)}` : "-");
    html("td", {}, tr, `${r.k} / ${r.n}`);
  }
  if (p.verdict_unknown) html("p", { class: "muted" }, box, `${p.verdict_unknown} reviewed decision(s) of a model whose good class the station cannot tell are not counted here.`);
  const verdict = html("p", {}, box);
  if (p.can_stop_reviewing_good) {
    verdict.className = "ok";
    verdict.textContent = `Enough evidence: the upper bound on escapes among GOOD decisions (${pct(p.escape_upper_one_sided)}) is below the cap ${pct(p.escape_cap)}. GOOD decisions may stop going to review.`;
  } else {
    verdict.className = "muted";
    verdict.textContent = `Keep reviewing GOOD decisions: escape upper bound ${pct(p.escape_upper_one_sided)} vs cap ${pct(p.escape_cap)}` +
      (p.more_good_reviews_needed !== null ? ` (at least ${p.more_good_reviews_needed} more escape-free GOOD reviews needed).` : ".");
  }
}

function drawReplicas(d) {
  // One row per process writing to this database (serve replicas by name, the sorter as "sorter"): its share of
  // the window, its decisions by kind, the models that made them and its newest row.
  const box = $("replicas");
  box.textContent = "";
  const reps = d.replicas || [];
  if (!reps.length) { html("p", { class: "muted" }, box, "No decisions in this window."); return; }
  const table = html("table", { class: "pilot" }, box);
  const head = html("tr", {}, table);
  for (const h of ["replica", "decisions", "by kind", "models", "last"]) html("th", {}, head, h);
  for (const r of reps) {
    const tr = html("tr", {}, table);
    const name = r.replica === null ? "sorter" : r.replica;
    html("td", {}, tr, name + (r.replica !== null && r.replica === d.replica ? " (this one)" : ""));
    html("td", {}, tr, String(r.total));
    html("td", {}, tr, Object.entries(r.decisions).map(([k, v]) => `${k} ${v}`).join(", "));
    html("td", {}, tr, Object.keys(r.models).join(", "));
    html("td", {}, tr, r.last || "-");
  }
}

function drawTiles(d) {
  $("t-total").textContent = d.total;
  $("t-automation").textContent = d.automation && d.automation.total_rate !== null ? pct(d.automation.total_rate) : "-";
  $("t-pbar").textContent = pct(d.p_chart.pbar);
  const a = d.drift.alarm;
  $("t-drift").textContent = a && a.n ? pct(a.rate) : "-";
  const p50 = d.latency_ms.p50.filter((v) => v !== null), p99 = d.latency_ms.p99.filter((v) => v !== null);
  $("t-latency").textContent = p50.length ? `${p50[p50.length - 1].toFixed(0)} / ${p99[p99.length - 1].toFixed(0)} ms` : "-";
  $("model").textContent = `model ${d.model.id} (${d.model.version}) - classes ${d.model.classes.join(", ")}`;
  const alarm = $("alarm");
  const ooc = d.p_chart.violations.reduce((s, v) => s + (v.length ? 1 : 0), 0);
  const msgs = [];
  if (a && a.alarm) msgs.push(`Drift alarm: ${a.k} of the last ${a.n} decisions flagged Drift (${pct(a.rate)}), calibrated ${pct(a.p0)} (p = ${a.p_value.toPrecision(2)}).`);
  if (ooc) msgs.push(`${ooc} p-chart point(s) out of control.`);
  alarm.hidden = msgs.length === 0;
  alarm.textContent = msgs.join(" ");
  if (d.auth_required) $("key-label").hidden = false;
}

// With keys set on the station every read needs one too: the key typed in the page is kept for this tab only
// (sessionStorage) and sent with every request, images included (fetched, then shown from a blob URL).
function authHeaders(extra = {}) {
  const key = $("apikey").value.trim();
  return key ? { ...extra, Authorization: "Bearer " + key } : extra;
}

async function getJSON(url) {
  const r = await fetch(url, { headers: authHeaders({ Accept: "application/json" }) });
  if (r.status === 401 || r.status === 403) {
    $("key-label").hidden = false;
    throw new Error(`${url}: HTTP ${r.status}, enter an API key below`);
  }
  if (!r.ok) {
    const detail = await r.json().catch(() => ({}));
    throw new Error(`${url}: HTTP ${r.status} ${detail.detail ? JSON.stringify(detail.detail) : ""}`);
  }
  return r.json();
}

async function showImage(img, url) {
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  if (!url) { img.removeAttribute("src"); return false; }
  const r = await fetch(url, { headers: authHeaders() });
  if (!r.ok) { img.removeAttribute("src"); return false; }
  img.src = URL.createObjectURL(await r.blob());
  return true;
}

// A queued decision whose image was never stored, or whose file is gone, shows a plain placeholder instead of
// the browser's broken-image box; the heatmap is only drawn over an image.
async function showReviewImage(item) {
  const img = $("rq-image"), hm = $("rq-heatmap"), none = $("rq-noimage");
  const ok = await showImage(img, item.image_url).catch(() => false);
  if (state.current !== item) return; // a newer item was shown while this one loaded
  img.hidden = !ok;
  none.hidden = ok;
  none.title = item.image_url ? "the image file is no longer on the station" : "this decision's image was not stored";
  hm.hidden = true;
  if (ok && item.heatmap_url) hm.hidden = !(await showImage(hm, item.heatmap_url).catch(() => false)) || state.current !== item;
}

async function refresh() {
  try {
    const d = await getJSON(`/v1/dashboard?hours=${$("hours").value}&bucket_minutes=${$("bucket").value}`);
    state.data = d;
    drawTiles(d); drawDecisions(d); drawAutomation(d); drawPChart(d); drawDrift(d); drawConfidence(d); drawThroughput(d); drawPilot(d); drawReplicas(d);
    await refreshQueue();
    $("status").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    $("status").textContent = "offline: " + e.message;
  }
}

async function refreshQueue() {
  const seq = ++state.queueSeq;
  const q = await getJSON("/v1/review/queue?limit=20");
  if (seq !== state.queueSeq) return;
  q.items = q.items.filter((it) => !state.reviewed.has(it.id));
  state.queue = q.items;
  state.labels = q.labels;
  // The tile and the panel's count are one figure from one answer (the queue's, never cached); the dashboard's
  // own review_queue may be up to its cache's 2 s old and would disagree with the panel after a change.
  $("rq-count").textContent = `(${q.total} waiting)`;
  $("t-queue").textContent = q.total;
  if (!state.current || !q.items.some((it) => it.id === state.current.id)) showItem(q.items[0] || null, true);
}

// keepMessage: the line under the buttons (e.g. "stored: #12 = GOOD") stays when the panel moves on by itself.
function showItem(item, keepMessage = false) {
  state.current = item;
  $("rq-empty").hidden = !!item;
  $("rq-item").hidden = !item;
  if (!item) return;
  showReviewImage(item);
  const meta = $("rq-meta");
  meta.textContent = "";
  html("div", {}, meta, `#${item.id} ${item.file_name} - model says ${item.decision}` + (item.decision !== item.top_class ? ` (top class ${item.top_class})` : ""));
  html("div", { class: "muted" }, meta, [item.time, item.station && `station ${item.station}`, item.lot && `lot ${item.lot}`, item.part_id && `part ${item.part_id}`, item.drift_score !== null && `drift ${(+item.drift_score).toFixed(2)} (1.00 = the Drift line)`].filter(Boolean).join(" - "));
  const probs = $("rq-probs");
  probs.textContent = "";
  Object.entries(item.probabilities || {}).sort((a, b) => b[1] - a[1]).forEach(([c, p]) => {
    const row = html("div", { class: "prob" }, probs);
    html("span", { class: "name" }, row, c);
    html("span", { class: "bar", style: `width:${(200 * p).toFixed(0)}px` }, row);
    html("span", {}, row, pct(p, 1));
  });
  const buttons = $("rq-buttons");
  buttons.textContent = "";
  const confirmLabel = state.labels.includes(item.top_class) ? item.top_class : null;
  if (confirmLabel) {
    const b = html("button", { class: "confirm", "data-label": confirmLabel, title: "Enter" }, buttons, `Confirm ${confirmLabel} (Enter)`);
    b.onclick = () => submit(confirmLabel);
  }
  state.labels.forEach((label, i) => {
    const key = label === "Drift" ? "d" : String(i + 1);
    const b = html("button", { "data-label": label, title: `key ${key}` }, buttons, `${key}: ${label}`);
    b.onclick = () => submit(label);
  });
  $("rq-comment").value = "";
  if (!keepMessage) $("rq-msg").textContent = "";
}

async function submit(label) {
  const item = state.current;
  if (!item) return;
  const headers = authHeaders({ "Content-Type": "application/json" });
  const reviewer = $("reviewer").value.trim();
  localStorage.setItem("defectscope.reviewer", reviewer);
  const body = { decision_id: item.id, label, reviewer: reviewer || null, comment: $("rq-comment").value.trim() || null };
  const r = await fetch("/v1/reviews", { method: "POST", headers, body: JSON.stringify(body) });
  if (!r.ok) {
    const detail = await r.json().catch(() => ({}));
    $("rq-msg").textContent = `not stored: HTTP ${r.status} ${detail.detail ? JSON.stringify(detail.detail) : ""}`;
    return;
  }
  state.reviewed.add(item.id);
  state.queue = state.queue.filter((it) => it.id !== item.id);
  showItem(state.queue[0] || null);
  $("rq-msg").textContent = `stored: #${item.id} = ${label}`;
  refreshQueue().catch(() => {});
}

document.addEventListener("keydown", (ev) => {
  if (!state.current || ev.target.tagName === "INPUT" || ev.target.tagName === "SELECT") return;
  if (ev.key === "Enter") {
    if (state.labels.includes(state.current.top_class)) submit(state.current.top_class);
  } else if (ev.key === "d") {
    submit("Drift");
  } else if (ev.key === "s") {
    const i = state.queue.findIndex((it) => it.id === state.current.id);
    showItem(state.queue[(i + 1) % state.queue.length] || null);
  } else if (/^[1-9]$/.test(ev.key)) {
    const label = state.labels[+ev.key - 1];
    if (label) submit(label);
  } else {
    return;
  }
  ev.preventDefault();
});

$("reviewer").value = localStorage.getItem("defectscope.reviewer") || "";
$("apikey").value = sessionStorage.getItem("defectscope.key") || "";
$("apikey").onchange = () => { sessionStorage.setItem("defectscope.key", $("apikey").value.trim()); refresh(); };
$("hours").onchange = refresh;
$("bucket").onchange = refresh;
refresh();
setInterval(refresh, 5000);
