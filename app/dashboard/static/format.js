// How figures read on the dashboard: the same units and words as the report's model card.

export const FIGURES = [
  ["accuracy", "Top-1 accuracy"],
  ["params", "Parameters"],
  ["macs", "MACs per image"],
  ["file_bytes", "Weights file size"],
  ["torchscript_bytes", "TorchScript file size"],
  ["cpu_latency_ms_batch1", "CPU latency, batch 1"],
  ["cpu_latency_ms_batch32", "CPU latency, batch 32"],
];

const LOWER_IS_BETTER = {
  params: ["fewer", "more"],
  macs: ["fewer", "more"],
  file_bytes: ["smaller", "larger"],
  torchscript_bytes: ["smaller", "larger"],
  cpu_latency_ms_batch1: ["faster", "slower"],
  cpu_latency_ms_batch32: ["faster", "slower"],
};

export function percent(value, digits = 2) {
  return value == null ? "–" : `${(value * 100).toFixed(digits)}%`;
}

export function bytes(count) {
  if (count == null) return "–";
  if (count < 1024) return `${count} B`;
  if (count < 1024 ** 2) return `${(count / 1024).toFixed(1)} KiB`;
  if (count < 1024 ** 3) return `${(count / 1024 ** 2).toFixed(1)} MiB`;
  return `${(count / 1024 ** 3).toFixed(2)} GiB`;
}

// Axis ticks sit at round decimal values (1, 2, 5 x 10^n): decimal units keep their labels round too.
export function compactBytes(count) {
  const [divisor, unit] = count >= 1e9 ? [1e9, "GB"] : count >= 1e6 ? [1e6, "MB"]
    : count >= 1e3 ? [1e3, "kB"] : [1, "B"];
  return `${Number((count / divisor).toPrecision(3))} ${unit}`;
}

export function compactMilliseconds(value) {
  return `${Number(value.toPrecision(3))} ms`;
}

export function milliseconds(value) {
  return value == null ? "–" : `${value.toFixed(3)} ms`;
}

export function integer(value) {
  return value == null ? "–" : Math.round(value).toLocaleString("en-US");
}

export function figure(name, value) {
  if (name === "accuracy") return percent(value);
  if (name.endsWith("bytes")) return bytes(value);
  if (name.startsWith("cpu_latency_ms")) return milliseconds(value);
  return integer(value);
}

// Returns [text, tone]: tone is "good", "bad" or "" for the cell's colour.
export function change(name, before, after) {
  if (before == null || after == null) return ["–", ""];
  if (name === "accuracy") {
    const points = (after - before) * 100;
    return [`${points >= 0 ? "+" : ""}${points.toFixed(2)} pts`, points >= 0 ? "good" : "bad"];
  }
  if (!before || !after) return ["–", ""];
  if (before === after) return ["same", ""];
  const [better, worse] = LOWER_IS_BETTER[name];
  return after <= before ? [`${(before / after).toFixed(2)}x ${better}`, "good"]
    : [`${(after / before).toFixed(2)}x ${worse}`, "bad"];
}

export function dateTime(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
}

export function ago(iso) {
  if (!iso) return "–";
  const seconds = Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000);
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

export function duration(seconds) {
  if (seconds == null) return "–";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

export function shortId(id) {
  return id.length > 14 ? `${id.slice(0, 12)}…` : id;
}
