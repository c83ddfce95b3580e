// The page: polls /api/runs and the ticked runs' histories every POLL_MS, draws the table, the
// overlaid curves, the config diff and the sweeps; the "Try a model" tab calls the JSON API.
"use strict";

const POLL_MS = 2000;
const EVAL_KEYS = ["zeroshot_top1", "i2t_R@1", "t2i_R@1", "val_loss"];
const state = { runs: [], ticked: new Set(), details: {}, colors: {}, firstLoad: true, image: null };

const $ = (sel) => document.querySelector(sel);
const h = (tag, attrs, ...kids) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node[k] = v; else node.setAttribute(k, v);
  }
  for (const kid of kids) node.append(kid instanceof Node ? kid : document.createTextNode(kid ?? ""));
  return node;
};

async function getJSON(url, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const r = await fetch(url, init);
  const data = await r.json();
  if (!r.ok) throw new Error((data.error && data.error.message) || r.statusText);
  return data;
}

function num(v, digits = 4) {
  if (v === null || v === undefined) return "";
  if (typeof v !== "number") return String(v);
  return Math.abs(v) !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e5) ? v.toExponential(2) : +v.toPrecision(digits) + "";
}

function duration(s) {
  if (s === null || s === undefined) return "";
  s = Math.round(s);
  return s >= 3600 ? `${(s / 3600).toFixed(1)} h` : `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function colorOf(name) {
  if (!(name in state.colors)) state.colors[name] = PALETTE[Object.keys(state.colors).length % PALETTE.length];
  return state.colors[name];
}

// ---------------------------------------------------------------------------------- runs tab

function drawRuns() {
  const body = $("#runs tbody");
  body.replaceChildren();
  $("#no-runs").hidden = state.runs.length > 0;
  for (const r of state.runs) {
    const box = h("input", { type: "checkbox", onchange: (e) => toggle(r.name, e.target.checked) });
    box.checked = state.ticked.has(r.name);
    // The headline metrics (and eval sets' "NAME/top1"-like ones) in the cell, all of them on hover.
    const all = Object.entries(r.eval).filter(([, v]) => typeof v === "number");
    const shown = all.filter(([k]) => EVAL_KEYS.includes(k) || /\/(top1|i2t_R@1|probe_top1)$/.test(k));
    const text = (pairs) => pairs.map(([k, v]) => `${k} ${num(v, 3)}`).join(", ");
    body.append(h("tr", { "data-run": r.name },
      h("td", {}, box),
      h("td", {}, h("span", { class: "swatch", style: `background:${colorOf(r.name)}` }), r.name),
      h("td", {}, h("span", { class: `status status-${r.status}` }, r.status)),
      h("td", {}, r.total_steps ? `${r.step} / ${r.total_steps}` : String(r.step)),
      h("td", {}, num(r.loss)), h("td", {}, num(r.lr, 3)), h("td", {}, num(r.img_per_s, 3)),
      h("td", {}, duration(r.eta_s)), h("td", { class: "evals", title: text(all) }, text(shown))));
  }
}

function toggle(name, on) {
  if (on) state.ticked.add(name); else state.ticked.delete(name);
  refreshDetails().then(drawCharts).then(drawDiff);
}

async function refreshDetails() {
  const updated = Object.fromEntries(state.runs.map((r) => [r.name, r.updated]));
  await Promise.all([...state.ticked].map(async (name) => {
    const known = state.details[name];
    if (known && known.updated === updated[name] && known.status !== "running") return;
    try { state.details[name] = await getJSON(`/api/run?name=${encodeURIComponent(name)}`); } catch (e) { state.ticked.delete(name); }
  }));
}

function drawCharts() {
  const runs = [...state.ticked].filter((n) => state.details[n]).map((n) => state.details[n]);
  const series = (key, from, markers) => runs.map((d) => ({
    name: d.name, color: colorOf(d.name), markers,
    points: d[from].filter((r) => typeof r[key] === "number").map((r) => [r.step, r[key]]),
  }));
  lineChart($("#chart-loss"), series("loss", "train"));
  lineChart($("#chart-lr"), series("lr", "train"));
  lineChart($("#chart-speed"), series("img_per_s", "train"));
  const evalKey = EVAL_KEYS.find((k) => runs.some((d) => d.evals.some((r) => typeof r[k] === "number"))) || "zeroshot_top1";
  $("#chart-eval").previousElementSibling.textContent = `held-out: ${evalKey}`;
  lineChart($("#chart-eval"), series(evalKey, "evals", true));
}

async function drawDiff() {
  const names = [...state.ticked];
  const table = $("#diff");
  $("#diff-note").hidden = names.length >= 2;
  table.tHead.replaceChildren();
  table.tBodies[0].replaceChildren();
  if (names.length < 2) return;
  const q = names.map((n) => `name=${encodeURIComponent(n)}`).join("&");
  const { rows } = await getJSON(`/api/diff?${q}`);
  table.tHead.append(h("tr", {}, h("th", {}, "key"), ...names.map((n) => h("th", {}, n))));
  for (const row of rows) {
    table.tBodies[0].append(h("tr", {}, h("td", {}, row.key),
      ...names.map((n) => h("td", {}, row.values[n] === null ? "—" : JSON.stringify(row.values[n])))));
  }
  if (!rows.length) table.tBodies[0].append(h("tr", {}, h("td", {}, "the configs are the same")));
}

function drawSweeps(sweeps) {
  const root = $("#sweeps");
  if (!sweeps.length) return;
  root.replaceChildren();
  for (const s of sweeps) {
    const rows = s.trials.map((t) => h("tr", { class: t.best ? "best" : "", "data-trial": t.number },
      h("td", {}, (t.best ? "★ " : "") + t.number), h("td", {}, t.state || ""), h("td", {}, num(t.value)),
      h("td", {}, Object.entries(t.params).map(([k, v]) => `${k}=${num(v, 3)}`).join(", ")),
      h("td", {}, t.reason), h("td", {}, t.run || "")));
    root.append(h("div", { class: "sweep", "data-sweep": s.name },
      h("h3", {}, `${s.name}: ${s.metric || "?"} (${s.direction || "?"})`),
      s.error ? h("p", { class: "muted" }, `trial states unavailable: ${s.error}`) : "",
      h("table", {}, h("thead", {}, h("tr", {}, ...["trial", "state", "value", "params", "reason", "run"].map((c) => h("th", {}, c)))),
        h("tbody", {}, ...rows))));
  }
}

async function poll() {
  try {
    const data = await getJSON("/api/runs");
    state.runs = data.runs.sort((a, b) => (b.updated || 0) - (a.updated || 0));
    $("#root").textContent = data.root;
    if (state.firstLoad) {  // overlay the newest runs that have metrics at first
      state.runs.filter((r) => r.updated).slice(0, 3).forEach((r) => state.ticked.add(r.name));
      state.firstLoad = false;
    }
    drawRuns();
    drawSweeps(data.sweeps);
    await refreshDetails();
    drawCharts();
    if (!state.diffDrawn) { state.diffDrawn = true; drawDiff(); }
  } catch (e) {
    $("#root").textContent = `cannot reach the server: ${e.message}`;
  }
  setTimeout(poll, POLL_MS);
}

// -------------------------------------------------------------------------------- try a model

function showError(e) { $("#error").textContent = e ? String(e.message || e) : ""; }

async function loadModels() {
  const data = await getJSON("/api/models");
  const select = $("#model");
  const current = select.value;
  select.replaceChildren(...data.checkpoints.map((c) => h("option", { value: c.name }, c.name)));
  if (current) select.value = current;
  $("#folder").replaceChildren(...data.folders.map((f) => h("option", { value: f }, f)));
  $("#no-folders").hidden = data.folders.length > 0;
}

function useFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;  // a data: URL, sent as base64
    $("#preview").src = reader.result;
    $("#preview").hidden = false;
  };
  reader.readAsDataURL(file);
}

const lines = (sel) => $(sel).value.split("\n").map((s) => s.trim()).filter(Boolean);

async function classify() {
  showError();
  if (!state.image) return showError("choose or drop an image first");
  try {
    const out = await getJSON("/v1/classify", { model: $("#model").value, image: state.image, labels: lines("#labels") });
    $("#probs").replaceChildren(...out.top.map((t) => h("div", { class: "prob", "data-label": t.label },
      h("span", { class: "label" }, t.label),
      h("div", {}, h("div", { class: "bar", style: `width:${(100 * t.prob).toFixed(1)}%` })),
      h("span", { class: "pct" }, `${(100 * t.prob).toFixed(1)}%`))));
  } catch (e) { showError(e); }
}

async function captions() {
  showError();
  if (!state.image) return showError("choose or drop an image first");
  try {
    const out = await getJSON("/v1/captions", { model: $("#model").value, image: state.image, captions: lines("#caption-pool") });
    $("#caption-list").replaceChildren(...out.captions.map((c) => h("li", {}, `${c.caption}  (${num(c.score, 3)})`)));
  } catch (e) { showError(e); }
}

async function search(ev) {
  ev.preventDefault();
  showError();
  try {
    const out = await getJSON("/v1/search", { model: $("#model").value, folder: $("#folder").value, query: $("#query").value });
    $("#results").replaceChildren(...out.results.map((r) => h("figure", { "data-path": r.path },
      h("img", { src: r.thumbnail, alt: r.path, title: r.path }),
      h("figcaption", {}, `${num(r.score, 3)} ${r.path}`))));
  } catch (e) { showError(e); }
}

function setUp() {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.onclick = () => {
      document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
      document.querySelectorAll(".tab-page").forEach((p) => { p.hidden = p.id !== tab.dataset.tab; });
      if (tab.dataset.tab === "try-tab") loadModels().catch(showError); else drawCharts();
    };
  }
  const drop = $("#drop");
  drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); useFile(e.dataTransfer.files[0]); };
  $("#file").onchange = (e) => useFile(e.target.files[0]);
  $("#classify").onclick = classify;
  $("#captions").onclick = captions;
  $("#search-form").onsubmit = search;
  loadModels().catch(() => {});
  poll();
}

setUp();
