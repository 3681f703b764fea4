// Two hand-drawn SVG charts (a line chart per training curve, a log-x scatter of trade-offs): small enough
// that a charting library, and the CDN it would come from, is not worth it.

const NS = "http://www.w3.org/2000/svg";
const WIDTH = 560;
const MARGIN = { top: 16, right: 20, bottom: 44, left: 60 };

export const KIND_COLORS = { distill: "#2563eb", prune: "#d97706", quantize: "#059669" };
const INPUT_COLOR = "#64748b";

function svgElement(name, attributes = {}, parent = null) {
  const element = document.createElementNS(NS, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  if (parent) parent.append(element);
  return element;
}

function text(parent, x, y, content, attributes = {}) {
  const element = svgElement("text", { x, y, ...attributes }, parent);
  element.textContent = content;
  return element;
}

class LinearScale {
  constructor([low, high], [start, end]) {
    Object.assign(this, { low, high, start, end });
  }

  map(value) {
    return this.start + ((value - this.low) / (this.high - this.low)) * (this.end - this.start);
  }

  ticks(count = 5) {
    const raw = (this.high - this.low) / count;
    const magnitude = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
    const ticks = [];
    for (let tick = Math.ceil(this.low / step) * step; tick <= this.high + step * 1e-9; tick += step) {
      ticks.push(Number(tick.toPrecision(12)));
    }
    return ticks;
  }
}

class LogScale {
  constructor([low, high], [start, end]) {
    Object.assign(this, { low: Math.log10(low), high: Math.log10(high), start, end });
  }

  map(value) {
    return this.start + ((Math.log10(value) - this.low) / (this.high - this.low)) * (this.end - this.start);
  }

  // Whole decades when the range is wide, more steps per decade the narrower it is.
  ticks() {
    const decades = this.high - this.low;
    const multiples = decades > 4 ? [1] : decades > 1.5 ? [1, 3] : decades > 0.6 ? [1, 2, 5]
      : [1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9];
    const ticks = [];
    for (let power = Math.floor(this.low); power <= Math.ceil(this.high); power += 1) {
      for (const multiple of multiples) {
        const tick = multiple * 10 ** power;
        const position = Math.log10(tick);
        if (position >= this.low - 1e-9 && position <= this.high + 1e-9) ticks.push(tick);
      }
    }
    return ticks;
  }
}

// A non-empty interval around the values with some air, so that a flat line or a single point shows.
function padded(values, { log = false, clampLow = -Infinity, clampHigh = Infinity } = {}) {
  let low = Math.min(...values);
  let high = Math.max(...values);
  if (log) {
    return [low / 1.6, high * 1.6];
  }
  const pad = (high - low) * 0.12 || Math.abs(high) * 0.1 || 1;
  low = Math.max(clampLow, low - pad);
  high = Math.min(clampHigh, high + pad);
  return [low, high];
}

function frame(container, height, label) {
  container.replaceChildren();
  const svg = svgElement("svg", { viewBox: `0 0 ${WIDTH} ${height}`, role: "img", "aria-label": label,
    class: "chart-svg", preserveAspectRatio: "xMidYMid meet" }, container);
  return svg;
}

function axes(svg, x, y, height, { xLabel, tickFormat, yFormat }) {
  const bottom = height - MARGIN.bottom;
  const grid = svgElement("g", { class: "grid" }, svg);
  for (const tick of y.ticks()) {
    const position = y.map(tick);
    svgElement("line", { x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: position, y2: position }, grid);
    text(svg, MARGIN.left - 8, position + 4, yFormat(tick), { class: "tick", "text-anchor": "end" });
  }
  for (const tick of x.ticks()) {
    const position = x.map(tick);
    svgElement("line", { x1: position, x2: position, y1: MARGIN.top, y2: bottom, class: "vertical" }, grid);
    text(svg, position, bottom + 16, tickFormat(tick), { class: "tick", "text-anchor": "middle" });
  }
  svgElement("line", { x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: bottom, y2: bottom, class: "axis" }, svg);
  text(svg, (MARGIN.left + WIDTH - MARGIN.right) / 2, height - 6, xLabel, { class: "axis-label",
    "text-anchor": "middle" });
}

function emptyState(container, message) {
  container.replaceChildren();
  const paragraph = document.createElement("p");
  paragraph.className = "chart-empty";
  paragraph.textContent = message;
  container.append(paragraph);
}

// One curve over epochs: `points` is [[epoch, value], ...]; one marked point per epoch.
export function lineChart(container, { points, series, color, yFormat, label, height = 240 }) {
  if (!points.length) {
    emptyState(container, "No finished epoch yet.");
    return;
  }
  const svg = frame(container, height, label);
  const epochs = points.map(([epoch]) => epoch);
  const x = new LinearScale([Math.min(...epochs), Math.max(Math.max(...epochs), Math.min(...epochs) + 1)],
    [MARGIN.left, WIDTH - MARGIN.right]);
  const y = new LinearScale(padded(points.map(([, value]) => value)), [height - MARGIN.bottom, MARGIN.top]);
  // Epochs are whole numbers: ticks at fractions of one would label positions that hold no point.
  const wholeX = { ticks: () => x.ticks(Math.min(10, epochs.length)).filter(Number.isInteger), map: (v) => x.map(v) };
  axes(svg, wholeX, y, height, { xLabel: "epoch", tickFormat: String, yFormat });
  const path = points.map(([epoch, value]) => `${x.map(epoch).toFixed(1)},${y.map(value).toFixed(1)}`).join(" ");
  svgElement("polyline", { points: path, fill: "none", stroke: color, "stroke-width": 2.2,
    "stroke-linejoin": "round" }, svg);
  for (const [epoch, value] of points) {
    const dot = svgElement("circle", { cx: x.map(epoch), cy: y.map(value), r: 3.8, fill: color,
      class: "point", "data-series": series, "data-epoch": epoch }, svg);
    svgElement("title", {}, dot).textContent = `epoch ${epoch}: ${yFormat(value)}`;
  }
}

// Each job as a line from its input model (hollow) to its result (filled), x on a log scale; an input model
// that several jobs measured is one point (tradeoffs.js gives their pairs the same `before`).
// `pairs`: [{ id, kind, href, before: { key, x, y, count, label }, after: { x, y, label } }].
export function tradeoffChart(container, { pairs, xLabel, xFormat, tickFormat, label, tooltip, height = 340 }) {
  const usable = pairs.filter((pair) => [pair.before, pair.after].every((p) => p.x > 0 && p.y != null));
  if (!usable.length) {
    emptyState(container, "No succeeded job with these measurements yet.");
    return;
  }
  const svg = frame(container, height, label);
  const xs = usable.flatMap((pair) => [pair.before.x, pair.after.x]);
  const accuracies = usable.flatMap((pair) => [pair.before.y, pair.after.y]);
  const x = new LogScale(padded(xs, { log: true }), [MARGIN.left, WIDTH - MARGIN.right]);
  const y = new LinearScale(padded(accuracies, { clampLow: 0, clampHigh: 1 }), [height - MARGIN.bottom, MARGIN.top]);
  axes(svg, x, y, height, { xLabel, tickFormat, yFormat: (v) => `${(v * 100).toFixed(0)}%` });
  const dot = (parent, point, side, fill, href, data = {}) => {
    const circle = svgElement("circle", { cx: x.map(point.x), cy: y.map(point.y), r: side === "after" ? 6 : 5,
      class: `dot ${side}`, stroke: side === "after" ? "#ffffff" : INPUT_COLOR, fill, "data-side": side,
      "data-testid": `tradeoff-${side}`, ...data }, parent);
    circle.addEventListener("mouseenter", () => tooltip.show(circle, `${point.label}\n${xFormat(point.x)} · ` +
      `${(point.y * 100).toFixed(2)}%`));
    circle.addEventListener("mouseleave", () => tooltip.hide());
    circle.addEventListener("click", () => { window.location.hash = href; });
  };
  const inputs = new Map();
  for (const pair of usable) {
    const color = KIND_COLORS[pair.kind] || INPUT_COLOR;
    const group = svgElement("g", { class: "pair", "data-job-id": pair.id }, svg);
    svgElement("line", { x1: x.map(pair.before.x), y1: y.map(pair.before.y), x2: x.map(pair.after.x),
      y2: y.map(pair.after.y), stroke: color, class: "pair-line" }, group);
    dot(group, pair.after, "after", color, pair.href);
    if (!inputs.has(pair.before.key)) inputs.set(pair.before.key, pair);
  }
  // Drawn last, so that no job's line hides the point its input shares with other jobs.
  const inputLayer = svgElement("g", { class: "inputs" }, svg);
  for (const { before, href } of inputs.values()) {
    dot(inputLayer, before, "before", "#ffffff", href, { "data-model": before.key, "data-jobs": before.count });
  }
}

// A floating label for chart points (an SVG <title> shows only after a delay, and not on touch screens).
export function createTooltip() {
  const element = document.createElement("div");
  element.className = "tooltip";
  element.hidden = true;
  document.body.append(element);
  return {
    show(target, content) {
      element.textContent = content;
      element.hidden = false;
      const box = target.getBoundingClientRect();
      element.style.left = `${box.left + window.scrollX + box.width / 2}px`;
      element.style.top = `${box.top + window.scrollY - 8}px`;
    },
    hide() {
      element.hidden = true;
    },
  };
}
