// What the pipeline pages say about stages, gates and the report, without the DOM (so that node can test it).

import * as fmt from "./format.js";

// Stages whose job is at work: their card shows a progress bar.
export const ACTIVE_STAGES = new Set(["queued", "running", "canceling"]);

// The report's columns, in the order the API's Markdown table has them: [row key, heading].
export const REPORT_COLUMNS = [
  ["stage", "Stage"],
  ["kind", "Kind"],
  ["model", "Model"],
  ["precision", "Precision"],
  ["accuracy", "Accuracy"],
  ["formats", "Per file"],
  ["params", "Params"],
  ["macs", "MACs"],
  ["file_bytes", "Weights"],
  ["torchscript_bytes", "TorchScript"],
  ["cpu_latency_ms_batch1", "CPU, batch 1"],
  ["gate", "Gate"],
];

const FIGURE_KEYS = new Set(["accuracy", "params", "macs", "file_bytes", "torchscript_bytes", "cpu_latency_ms_batch1"]);

// One report cell as text: figures as the job page shows them, "–" for what was not measured, a model's id
// shortened (the page puts the whole id in the cell's title), a line per published file.
export function reportCell(key, value) {
  if (value == null || value === "" || (key === "formats" && !Object.keys(value).length)) return "–";
  if (FIGURE_KEYS.has(key)) return fmt.figure(key, value);
  if (key === "model") return fmt.shortId(value);
  if (key === "formats") {
    return Object.entries(value).map(([format, accuracy]) => `${format} ${fmt.percent(accuracy)}`).join("\n");
  }
  return String(value);
}

// A stage's gate: null without one, else { text: "≤ 3 pts vs input", verdict, detail } where verdict is
// "passed" or "missed" once the stage succeeded, "pending" while it may still run, "not reached" otherwise.
export function gateOf(stage) {
  if (!stage.gate) return null;
  const text = `≤ ${stage.gate.max_accuracy_drop_pts} pts vs ${stage.gate.against === "input" ? "the input model"
    : "the previous stage"}`;
  let verdict = "not reached";
  if (stage.status === "succeeded") verdict = stage.gate_result == null ? "passed" : "missed";
  else if (stage.status === "waiting" || ACTIVE_STAGES.has(stage.status)) verdict = "pending";
  return { text, verdict, detail: stage.gate_result ?? null };
}

// Where the stage's model comes from, and for a stage not started, what it waits for.
export function stageOrigin(stage) {
  const source = stage.after === "input" ? "the input model" : stage.after;
  if (stage.status === "waiting") return `waits for ${source}`;
  if (stage.status === "skipped") return `after ${source}; skipped: the pipeline ended first`;
  return `after ${source}`;
}

// "2 of 4 stages done".
export function stagesDone(pipeline) {
  const done = pipeline.stages.filter((stage) => stage.status === "succeeded").length;
  return `${done} of ${pipeline.stages.length} stage${pipeline.stages.length === 1 ? "" : "s"} done`;
}
