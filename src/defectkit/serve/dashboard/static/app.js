// defectkit dashboard: polls the service's JSON and SVG endpoints; no framework,
// no build step. Times are shown in the browser's local time; the API speaks UTC.
"use strict";

const $ = (sel) => document.querySelector(sel);
const REFRESH_MS = 5000;
const tokenInput = $("#token");
tokenInput.value = localStorage.getItem("defectkit-token") || "";
tokenInput.addEventListener("change", () => localStorage.setItem("defectkit-token", tokenInput.value));

function auth() {
  return tokenInput.value ? { Authorization: "Bearer " + tokenInput.value } : {};
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c ?? ""));
  return node;
}

function cell(row, content) {
  row.append(el("td", {}, content));
}

const fmt = (v, digits = 3) => (v === null || v === undefined ? "–" : Number(v).toPrecision(digits));
const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(1) + "%");
const localTime = (iso) => (iso ? new Date(iso).toLocaleString() : "");

function verdictSpan(r) {
  const text = r.is_defect === null ? "?" : (r.is_defect ? "NG" : "OK");
  return el("span", { class: r.is_defect ? "ng" : "ok" }, text);
}

async function getJSON(url) {
  const res = await fetch(url);
  if (!res.ok) throw new Error(url + ": " + res.status);
  return res.json();
}

// -- filters -------------------------------------------------------------------
const FILTERS = { line: "#f-line", lot: "#f-lot", product: "#f-product", verdict: "#f-verdict" };

function filterParams() {
  const q = new URLSearchParams();
  for (const [key, sel] of Object.entries(FILTERS)) if ($(sel).value) q.set(key, $(sel).value);
  for (const [key, sel] of [["since", "#f-since"], ["until", "#f-until"]]) {
    if ($(sel).value) q.set(key, new Date($(sel).value).toISOString());
  }
  return q;
}

function fillSelect(sel, values) {
  const select = $(sel);
  const keep = select.value;
  const have = [...select.options].map((o) => o.value);
  for (const v of values) if (!have.includes(v)) select.append(el("option", { value: v }, v));
  select.value = keep;
}

async function refreshFacets() {
  const f = await getJSON("/facets");
  fillSelect("#f-line", f.lines);
  fillSelect("#f-lot", f.lots);
  fillSelect("#f-product", f.products);
  const list = $("#defect-types");
  list.replaceChildren(...f.defect_types.map((t) => el("option", { value: t })));
}

// -- header --------------------------------------------------------------------
async function refreshSummary() {
  const q = filterParams();
  q.delete("verdict"); q.delete("since"); q.delete("until");
  q.set("window", $("#window").value);
  const s = await getJSON("/summary?" + q);
  $("#kpi-yield").textContent = pct(s.yield);
  $("#kpi-ng").textContent = pct(s.ng_rate);
  $("#kpi-parts").textContent = String(s.n);
  $("#kpi-rate").textContent = s.per_minute.toFixed(1);
  $("#kpi-rate-now").textContent = `now ${s.per_minute_now.toFixed(1)}`;
  $("#kpi-alarms").textContent = String(s.alarms);
  $("#kpi-alarms-box").classList.toggle("bad", s.alarms > 0);
  for (const [sel, groups] of [["#by-line", s.by_line], ["#by-lot", s.by_lot]]) {
    const body = $(sel + " tbody");
    body.replaceChildren();
    for (const g of groups) {
      const tr = el("tr");
      const decided = g.ok + g.ng;
      cell(tr, g.name ?? "(none)");
      cell(tr, String(g.n));
      cell(tr, decided ? pct(g.ok / decided) : "–");
      cell(tr, String(g.ng));
      body.append(tr);
    }
  }
}

// -- feed ----------------------------------------------------------------------
async function refreshFeed() {
  const q = filterParams();
  q.set("limit", "60");
  const page = await getJSON("/results?" + q);
  $("#feed-count").textContent = `(${page.items.length} of ${page.total})`;
  const feed = $("#feed");
  feed.replaceChildren();
  for (const r of page.items) {
    const card = el("div", { class: "card" + (r.is_defect ? " ng" : ""), tabindex: "0",
      "data-id": r.id, title: `result ${r.id}: ${r.path}`, onclick: () => openDetail(r.id),
      onkeydown: (ev) => { if (ev.key === "Enter") openDetail(r.id); } },
      el("img", { src: r.links.overlay, alt: "overlay " + r.id, loading: "lazy" }),
      el("div", { class: "meta" }, verdictSpan(r), el("span", {}, fmt(r.score)),
        el("span", {}, new Date(r.created_at).toLocaleTimeString())));
    feed.append(card);
  }
}

// -- review --------------------------------------------------------------------
async function review(id, verdictValue, type) {
  const res = await fetch(`/results/${id}/review`, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...auth() },
    body: JSON.stringify({ verdict: verdictValue, defect_type: type || null }),
  });
  const body = await res.json();
  const message = res.ok ? `reviewed: ${verdictValue}` + (type ? ` (${type})` : "")
    : `review failed: ${res.status} ${body.detail}`;
  $("#upload-status").textContent = message;
  await refreshAll();
  return { ok: res.ok, message };
}

async function refreshQueue() {
  const body = $("#queue tbody");
  if (body.contains(document.activeElement)) return; // someone is typing a defect type
  const q = filterParams();
  q.set("reviewed", "false"); q.set("order", "doubt"); q.set("limit", "40");
  const page = await getJSON("/results?" + q);
  $("#queue-count").textContent = String(page.total);
  body.replaceChildren();
  for (const r of page.items) {
    const tr = el("tr", { "data-id": r.id });
    cell(tr, el("img", { src: r.links.overlay, alt: "overlay " + r.id, onclick: () => openDetail(r.id) }));
    cell(tr, verdictSpan(r));
    cell(tr, `${fmt(r.score)} / ${fmt(r.threshold)}`);
    const type = el("input", { class: "review-type", size: "10", list: "defect-types",
      value: r.defect_type || "" });
    cell(tr, type);
    const buttons = el("span");
    for (const v of ["defect", "good"]) {
      buttons.append(el("button", { class: "review-" + v, type: "button",
        onclick: () => review(r.id, v, v === "defect" ? type.value : null) }, v));
    }
    cell(tr, buttons);
    body.append(tr);
  }
}

// -- charts and alarms ---------------------------------------------------------
let modelProducts = []; // a unified model's products: each has its own charts

function chartProduct() {
  return $("#f-product").value || modelProducts[0] || "";
}

async function svgInto(sel, url, product) {
  const box = $(sel);
  const width = Math.max(320, Math.round(box.clientWidth || 640));
  const q = new URLSearchParams({ width, height: Math.round(width * 0.36) });
  if (product) q.set("product", product);
  const res = await fetch(`${url}?${q}`);
  if (res.ok) box.innerHTML = await res.text();
  else box.textContent = `no charts for ${product} yet`;
}

async function refreshSpc() {
  const product = chartProduct();
  $("#spc-product").textContent = product ? `product ${product}` : "";
  const res = await fetch("/spc" + (product ? "?product=" + encodeURIComponent(product) : ""));
  if (!res.ok) {
    $("#spc-count").textContent = "0";
    $("#chart-scores").textContent = $("#chart-p").textContent = `no results of ${product} yet`;
    return;
  }
  const spc = await res.json();
  const s = spc.scores;
  $("#spc-count").textContent = String(s.points.length);
  $("#spc-baseline").textContent = s.mean === null
    ? `(limits after ${s.baseline_n} good parts)`
    : `· centre ${fmt(s.center, 4)}, EWMA limits ${fmt(s.ewma_lcl, 4)}..${fmt(s.ewma_ucl, 4)}`;
  const alarms = $("#alarms");
  alarms.replaceChildren(...spc.stored_alarms.map((a) => el("li", {},
    `${localTime(a.created_at)} [${a.chart} ${a.rule}] ${a.message}`,
    a.result_id ? el("a", { href: "#", onclick: (ev) => { ev.preventDefault(); openDetail(a.result_id); } },
      ` (result ${a.result_id})`) : "")));
  $("#alarm-count").textContent = String(spc.stored_alarms.length);
  await Promise.all([
    svgInto("#chart-scores", "/spc/scores.svg", product),
    svgInto("#chart-p", "/spc/p.svg", product),
  ]);
}

// -- detail view ---------------------------------------------------------------
let detailId = null;

function fact(dl, name, value) {
  dl.append(el("dt", {}, name), el("dd", {}, value));
}

async function openDetail(id) {
  const r = await getJSON(`/results/${id}`);
  detailId = id;
  $("#detail-title").textContent = `Result ${r.id}: ${r.path}`;
  $("#detail-image").src = r.links.image;
  $("#detail-overlay").src = r.links.overlay;
  $("#detail-worst").src = `/results/${id}/worst-patch.png`;
  const good = $("#detail-good");
  $("#detail-good-caption").textContent = "closest good patch";
  good.hidden = false;
  good.onerror = () => { good.hidden = true; $("#detail-good-caption").textContent = "closest good patch: not available"; };
  good.src = `/results/${id}/closest-good.png`;
  const dl = $("#detail-facts");
  dl.replaceChildren();
  fact(dl, "verdict", verdictSpan(r));
  fact(dl, "score / threshold", `${fmt(r.score, 4)} / ${fmt(r.threshold, 4)}`);
  fact(dl, "severity", r.severity ?? "–");
  if (r.defect_type) fact(dl, "predicted type", r.defect_type);
  fact(dl, "time", localTime(r.created_at));
  fact(dl, "line / lot", `${r.line ?? "–"} / ${r.lot ?? "–"}`);
  if (r.product) fact(dl, "product", r.product);
  if (r.part_id) fact(dl, "part", r.part_id);
  fact(dl, "review", r.review ? `${r.review.verdict}${r.review.defect_type ? " (" + r.review.defect_type + ")" : ""}` : "not reviewed");
  const body = $("#detail-regions tbody");
  body.replaceChildren();
  r.regions.forEach((g, i) => {
    const tr = el("tr");
    cell(tr, String(i + 1));
    cell(tr, g.bbox.join(", "));
    cell(tr, g.area_mm2 === null ? `${g.area_px} px` : `${g.area_mm2.toFixed(2)} mm² (${g.area_px} px)`);
    cell(tr, fmt(g.score));
    cell(tr, g.severity ?? "–");
    body.append(tr);
  });
  if (!r.regions.length) {
    const tr = el("tr"); cell(tr, "no regions above the pixel threshold"); body.append(tr);
  }
  $("#detail-type").value = (r.review && r.review.defect_type) || r.defect_type || "";
  $("#detail-review").textContent = "";
  $("#detail").hidden = false;
  $("#detail-close").focus();
}

function closeDetail() {
  $("#detail").hidden = true;
  detailId = null;
}

$("#detail-close").addEventListener("click", closeDetail);
$("#detail").addEventListener("click", (ev) => { if (ev.target === $("#detail")) closeDetail(); });
document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") closeDetail(); });
for (const [sel, v] of [["#detail-defect", "defect"], ["#detail-goodbtn", "good"]]) {
  $(sel).addEventListener("click", async () => {
    if (detailId === null) return;
    const id = detailId;
    const out = await review(id, v, v === "defect" ? $("#detail-type").value : null);
    $("#detail-review").textContent = out.message;
    if (out.ok) await openDetail(id);
  });
}

// -- tabs, refresh, upload -----------------------------------------------------
for (const b of document.querySelectorAll(".tabs button")) {
  b.addEventListener("click", () => {
    for (const o of document.querySelectorAll(".tabs button")) o.classList.toggle("active", o === b);
    for (const t of document.querySelectorAll(".tab")) t.hidden = t.id !== "tab-" + b.dataset.tab;
    if (b.dataset.tab === "charts") refreshSpc();
  });
}

let refreshing = null;
async function refreshAll() {
  if (refreshing) return refreshing; // one refresh at a time
  refreshing = Promise.all([refreshSummary(), refreshFeed(), refreshQueue(), refreshSpc(), refreshFacets()])
    .catch((e) => { $("#upload-status").textContent = "refresh failed: " + e.message; })
    .finally(() => { refreshing = null; });
  return refreshing;
}

for (const sel of [...Object.values(FILTERS), "#f-since", "#f-until", "#window"]) {
  $(sel).addEventListener("change", refreshAll);
}
$("#f-clear").addEventListener("click", () => {
  for (const sel of [...Object.values(FILTERS), "#f-since", "#f-until"]) $(sel).value = "";
  refreshAll();
});

$("#upload-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const form = new FormData();
  form.append("file", $("#upload-file").files[0]);
  if ($("#upload-line").value) form.append("line", $("#upload-line").value);
  if ($("#upload-lot").value) form.append("lot", $("#upload-lot").value);
  $("#upload-status").textContent = "inspecting…";
  const res = await fetch("/inspect", { method: "POST", body: form, headers: auth() });
  const body = await res.json();
  $("#upload-status").textContent = res.ok
    ? `result ${body.id}: ${body.is_defect ? "NG" : "OK"} (score ${body.score.toFixed(3)})`
    : `error ${res.status}: ${body.detail}`;
  await refreshAll();
});

getJSON("/model").then((m) => {
  if (m.kind === "products") {
    modelProducts = Object.keys(m.products);
    fillSelect("#f-product", modelProducts);
    $("#model-info").textContent = `model: ${m.name}, ${modelProducts.length} products (${modelProducts.join(", ")})`;
    refreshSpc();
    return;
  }
  const thr = m.threshold && typeof m.threshold.value === "number" ? m.threshold.value.toPrecision(4) : "none";
  $("#model-info").textContent = `model: ${m.name} (${m.method}), threshold ${thr}`;
}).catch(() => {});
refreshAll();
setInterval(refreshAll, REFRESH_MS);
