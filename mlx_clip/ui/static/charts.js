// Line charts drawn as SVG, no library: lineChart(svg, series) with
// series = [{name, color, points: [[x, y], ...], markers}]. Each series is one <polyline
// class="series"> with data-run and data-points (the number of points), so the page's tests
// can read what was drawn.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#2b6cb0", "#d9480f", "#2f9e44", "#9c36b5", "#e67700", "#0c8599", "#c2255c", "#5c940d"];

function el(name, attrs, parent) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

// About `count` round tick values covering [lo, hi].
function ticks(lo, hi, count) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(+t.toPrecision(12));
  return out;
}

// A tick label: as many decimals as the tick spacing needs, so neighbours never read the same.
function fmt(v, step) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
  return v.toFixed(Math.max(0, -Math.floor(Math.log10(step || 1))));
}

function lineChart(svg, series) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = svg.clientWidth || 480, H = svg.clientHeight || 220;
  const m = { l: 48, r: 20, t: 8, b: 22 };  // room for the last x label
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const pts = series.flatMap((s) => s.points).filter((p) => isFinite(p[0]) && isFinite(p[1]));
  if (!pts.length) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, svg).textContent = "no points yet";
    return;
  }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const X = (x) => m.l + ((x - x0) / (x1 - x0)) * (W - m.l - m.r);
  const Y = (y) => H - m.b - ((y - y0) / (y1 - y0)) * (H - m.t - m.b);
  const yt = ticks(y0, y1, 4), xt = ticks(x0, x1, 6);
  for (const t of yt) {
    el("line", { class: "grid", x1: m.l, x2: W - m.r, y1: Y(t), y2: Y(t) }, svg);
    el("text", { x: m.l - 4, y: Y(t) + 3, "text-anchor": "end" }, svg).textContent = fmt(t, yt[1] - yt[0]);
  }
  for (const t of xt) {
    el("text", { x: X(t), y: H - 6, "text-anchor": "middle" }, svg).textContent = fmt(t, xt[1] - xt[0]);
  }
  el("line", { class: "axis", x1: m.l, x2: m.l, y1: m.t, y2: H - m.b }, svg);
  el("line", { class: "axis", x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b }, svg);
  for (const s of series) {
    const p = s.points.filter((q) => isFinite(q[0]) && isFinite(q[1]));
    const line = el("polyline", {
      class: "series", stroke: s.color, "data-run": s.name, "data-points": p.length,
      points: p.map((q) => `${X(q[0]).toFixed(1)},${Y(q[1]).toFixed(1)}`).join(" "),
    }, svg);
    el("title", {}, line).textContent = s.name;
    if (s.markers || p.length === 1) {
      for (const q of p) el("circle", { cx: X(q[0]), cy: Y(q[1]), r: 2.5, fill: s.color }, svg);
    }
  }
}
