// defectkit dashboard: polls the JSON endpoints; no framework, no build step.
"use strict";

const $ = (sel) => document.querySelector(sel);
const tokenInput = $("#token");
tokenInput.value = localStorage.getItem("defectkit-token") || "";
tokenInput.addEventListener("change", () => localStorage.setItem("defectkit-token", tokenInput.value));

function auth() {
  return tokenInput.value ? { Authorization: "Bearer " + tokenInput.value } : {};
}

function cell(row, content) {
  const td = document.createElement("td");
  if (content instanceof Node) td.appendChild(content); else td.textContent = content ?? "";
  row.appendChild(td);
  return td;
}

function verdict(r) {
  const span = document.createElement("span");
  span.textContent = r.is_defect === null ? "?" : (r.is_defect ? "NG" : "OK");
  span.className = r.is_defect ? "ng" : "ok";
  return span;
}

function thumb(r) {
  const img = document.createElement("img");
  img.src = r.links.overlay;
  img.alt = "overlay " + r.id;
  return img;
}

async function getJSON(url) {
  const res = await fetch(url);
  if (!res.ok) throw new Error(url + ": " + res.status);
  return res.json();
}

async function refreshFeed() {
  const page = await getJSON("/results?limit=20");
  const body = $("#feed tbody");
  body.replaceChildren();
  for (const r of page.items) {
    const tr = document.createElement("tr");
    tr.dataset.id = r.id;
    cell(tr, String(r.id));
    cell(tr, r.created_at.replace("T", " ").slice(0, 19));
    cell(tr, r.line);
    cell(tr, r.lot);
    cell(tr, verdict(r));
    cell(tr, r.score === null ? "" : r.score.toFixed(3));
    cell(tr, r.severity);
    cell(tr, thumb(r));
    body.appendChild(tr);
  }
}

async function review(id, verdictValue, typeInput) {
  const res = await fetch(`/results/${id}/review`, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...auth() },
    body: JSON.stringify({ verdict: verdictValue, defect_type: typeInput.value || null }),
  });
  if (!res.ok) {
    const err = await res.json();
    $("#upload-status").textContent = "review failed: " + err.detail;
  }
  await refreshAll();
}

async function refreshQueue() {
  const page = await getJSON("/results?reviewed=false&limit=100");
  const body = $("#queue tbody");
  body.replaceChildren();
  for (const r of page.items) {
    const doubtful = r.is_defect || (r.threshold && r.score >= 0.9 * r.threshold);
    if (!doubtful) continue;
    const tr = document.createElement("tr");
    tr.dataset.id = r.id;
    cell(tr, String(r.id));
    cell(tr, thumb(r));
    cell(tr, verdict(r));
    cell(tr, r.score === null ? "" : r.score.toFixed(3));
    const type = document.createElement("input");
    type.className = "review-type";
    type.size = 10;
    type.value = r.defect_type || "";
    cell(tr, type);
    const buttons = document.createElement("span");
    for (const v of ["defect", "good"]) {
      const b = document.createElement("button");
      b.textContent = v;
      b.className = "review-" + v;
      b.addEventListener("click", () => review(r.id, v, type));
      buttons.appendChild(b);
    }
    cell(tr, buttons);
    body.appendChild(tr);
  }
}

function drawScores(s) {
  const canvas = $("#chart-scores");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const pts = s.points;
  if (!pts.length) return;
  const ys = pts.map((p) => p.score).concat([s.ewma_ucl, s.ewma_lcl].filter((v) => v !== null));
  const lo = Math.min(...ys), hi = Math.max(...ys), pad = 10;
  const x = (i) => pad + (i / Math.max(1, pts.length - 1)) * (canvas.width - 2 * pad);
  const y = (v) => canvas.height - pad - ((v - lo) / (hi - lo || 1)) * (canvas.height - 2 * pad);
  ctx.fillStyle = "#888";
  pts.forEach((p, i) => ctx.fillRect(x(i) - 1, y(p.score) - 1, 3, 3));
  ctx.strokeStyle = "#06c";
  ctx.beginPath();
  pts.forEach((p, i) => { if (p.ewma !== undefined) ctx.lineTo(x(i), y(p.ewma)); });
  ctx.stroke();
  for (const [v, colour] of [[s.ewma_ucl, "#b00"], [s.center, "#070"], [s.ewma_lcl, "#b00"]]) {
    if (v === null || v === undefined) continue;
    ctx.strokeStyle = colour;
    ctx.beginPath();
    ctx.moveTo(pad, y(v));
    ctx.lineTo(canvas.width - pad, y(v));
    ctx.stroke();
  }
}

async function refreshSpc() {
  const spc = await getJSON("/spc");
  $("#spc-count").textContent = String(spc.scores.points.length);
  $("#spc-baseline").textContent = spc.scores.mean === null
    ? `(limits after ${spc.scores.baseline_n} good parts)`
    : `centre ${spc.scores.center.toPrecision(4)}, EWMA limits ${spc.scores.ewma_lcl.toPrecision(4)}..${spc.scores.ewma_ucl.toPrecision(4)}`;
  drawScores(spc.scores);
  const body = $("#pchart tbody");
  body.replaceChildren();
  for (const g of spc.p_chart) {
    const tr = document.createElement("tr");
    cell(tr, g.group);
    cell(tr, String(g.n));
    cell(tr, String(g.defects));
    cell(tr, (100 * g.p).toFixed(1) + "%");
    cell(tr, g.ucl === null ? "" : (100 * g.ucl).toFixed(1) + "%");
    body.appendChild(tr);
  }
  const alarms = $("#alarms");
  alarms.replaceChildren();
  for (const a of spc.stored_alarms) {
    const li = document.createElement("li");
    li.textContent = `${a.created_at} [${a.chart} ${a.rule}] ${a.message}`;
    alarms.appendChild(li);
  }
}

async function refreshAll() {
  await Promise.all([refreshFeed(), refreshQueue(), refreshSpc()]);
}

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
  const thr = m.threshold && typeof m.threshold.value === "number" ? m.threshold.value.toPrecision(4) : "none";
  $("#model-info").textContent = `model: ${m.name} (${m.method}), threshold ${thr}`;
}).catch(() => {});
refreshAll();
setInterval(refreshAll, 5000);
