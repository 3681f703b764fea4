// The dashboard: sign in with a key, follow jobs and pipelines live, read a job's results and a pipeline's stages
// side by side, compare every finished job.
// Data only ever enters the page as text (textContent, setAttribute), never as markup.

import * as api from "./api.js";
import { createTooltip, KIND_COLORS, lineChart, tradeoffChart } from "./charts.js";
import * as fmt from "./format.js";
import { ACTIVE_STAGES, gateOf, REPORT_COLUMNS, reportCell, stageOrigin, stagesDone } from "./pipelines.js";
import { modelKey, tradeoffPairs } from "./tradeoffs.js";

const POLL_MS = 1500;
const TRADEOFFS_POLL_MS = 10000;
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
// Stages after training: the bar waits just short of full until the job has published its files.
const FINISHING_STAGES = new Set(["exporting", "evaluating", "converting"]);
const EVENTS_SHOWN = 15;

const views = ["login-view", "jobs-view", "job-view", "pipelines-view", "pipeline-view", "tradeoffs-view"];
const tooltip = createTooltip();
let activePoller = null;

function byId(id) {
  return document.getElementById(id);
}

// h("td", { class: "num", "data-testid": "x" }, "text", childNode, ...): an element with attributes and children.
function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === false || value == null) continue;
    if (key === "class") element.className = value;
    else if (key === "onclick") element.addEventListener("click", value);
    else element.setAttribute(key, value === true ? "" : String(value));
  }
  element.append(...children.flat().filter((child) => child != null && child !== false));
  return element;
}

// --- polling, errors, routing ------------------------------------------------------------------------------

// Runs `step` now and every `interval` ms until it returns false or the view changes.
function poll(step, interval = POLL_MS) {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    let again = true;
    try {
      again = (await step()) !== false;
      showError(null);
    } catch (error) {
      if (!handleAuthError(error)) showError(error.message);
    }
    if (again && !stopped) timer = setTimeout(tick, interval);
  };
  tick();
  return { stop() { stopped = true; clearTimeout(timer); } };
}

function showError(message) {
  const banner = byId("global-error");
  banner.hidden = !message;
  banner.textContent = message || "";
}

function handleAuthError(error) {
  if (!(error instanceof api.ApiError) || error.status !== 401) return false;
  api.forgetKey();
  showLogin("The key was refused (revoked or mistyped). Sign in again.");
  return true;
}

function show(viewId) {
  for (const id of views) byId(id).hidden = id !== viewId;
  const signedIn = viewId !== "login-view";
  byId("nav").hidden = !signedIn;
  byId("session").hidden = !signedIn;
  byId("nav-jobs").classList.toggle("active", viewId === "jobs-view" || viewId === "job-view");
  byId("nav-pipelines").classList.toggle("active", viewId === "pipelines-view" || viewId === "pipeline-view");
  byId("nav-tradeoffs").classList.toggle("active", viewId === "tradeoffs-view");
}

function route() {
  activePoller?.stop();
  activePoller = null;
  tooltip.hide();
  if (!api.storedKey()) {
    showLogin();
    return;
  }
  const hash = window.location.hash.replace(/^#/, "") || "/";
  const jobMatch = hash.match(/^\/jobs\/([A-Za-z0-9_-]+)$/);
  const pipelineMatch = hash.match(/^\/pipelines\/([A-Za-z0-9_-]+)$/);
  if (jobMatch) activePoller = showJob(jobMatch[1]);
  else if (pipelineMatch) activePoller = showPipeline(pipelineMatch[1]);
  else if (hash === "/pipelines") activePoller = showPipelines();
  else if (hash === "/tradeoffs") activePoller = showTradeoffs();
  else activePoller = showJobs();
}

// --- sign in -----------------------------------------------------------------------------------------------

function showLogin(message = null) {
  activePoller?.stop();
  show("login-view");
  const error = byId("login-error");
  error.hidden = !message;
  error.textContent = message || "";
  byId("api-key").focus();
}

async function signIn(event) {
  event.preventDefault();
  const key = byId("api-key").value.trim();
  const button = byId("login-button");
  button.disabled = true;
  try {
    const me = await api.whoAmI(key);
    api.storeKey(key);
    byId("api-key").value = "";
    byId("tenant").textContent = me.tenant;
    route();
  } catch (error) {
    showLogin(error instanceof api.ApiError && error.status === 401 ? "That key was not accepted." : error.message);
  } finally {
    button.disabled = false;
  }
}

function signOut() {
  api.forgetKey();
  byId("tenant").textContent = "";
  window.location.hash = "#/";
  showLogin();
}

// --- progress ----------------------------------------------------------------------------------------------

// { percent (null: unknown), label } of a job's bar.
function progressOf(job) {
  const progress = job.progress || {};
  if (job.status === "succeeded") return { percent: 100, label: "done" };
  if (job.status === "queued") return { percent: 0, label: job.attempt > 0 ? "queued for a retry" : "queued" };
  let percent = null;
  if (FINISHING_STAGES.has(progress.stage)) percent = 97;
  else if (progress.total_steps) percent = Math.min(95, Math.round((95 * progress.step) / progress.total_steps));
  const parts = [progress.stage || job.status];
  if (progress.epoch && progress.epochs && !FINISHING_STAGES.has(progress.stage)) {
    parts.push(`epoch ${progress.epoch}/${progress.epochs}`);
  }
  if (progress.stage_steps) parts.push(`${progress.stage_step ?? 0}/${progress.stage_steps}`);
  // A multi-task run: each head's accuracy after the last epoch.
  for (const [task, accuracy] of Object.entries(progress.val_accuracy_by_task || {})) {
    parts.push(`${task} ${fmt.percent(accuracy, 1)}`);
  }
  if (progress.eta_seconds != null && job.status === "running" && !FINISHING_STAGES.has(progress.stage)) {
    parts.push(`ETA ${fmt.duration(progress.eta_seconds)}`);
  }
  if (!TERMINAL.has(job.status)) return { percent, label: parts.join(" · ") };
  return { percent: percent ?? 0, label: job.status };
}

function progressBar(job) {
  const { percent, label } = progressOf(job);
  const fill = h("div", { class: "progress-fill" });
  if (percent != null) fill.style.width = `${percent}%`;
  const bar = h("div", {
    class: `progress ${job.status}${percent == null ? " indeterminate" : ""}`, role: "progressbar",
    "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": percent ?? false, "aria-label": label,
    "data-testid": "job-progress", "data-status": job.status, "data-percent": percent ?? "",
  }, fill);
  return h("div", { class: "progress-wrap" }, bar,
    h("span", { class: "progress-label", "data-testid": "progress-label" },
      percent != null && job.status !== "succeeded" ? `${percent}% · ${label}` : label));
}

function statusPill(status, testId = "job-status") {
  return h("span", { class: `pill ${status}`, "data-testid": testId }, status);
}

function kindBadge(kind) {
  return h("span", { class: `badge ${kind}` }, kind);
}

// --- the job list ------------------------------------------------------------------------------------------

function showJobs() {
  show("jobs-view");
  return poll(async () => {
    const page = await api.listJobs({ limit: 50 });
    renderJobRows(page.items);
    byId("jobs-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  });
}

function renderJobRows(jobs) {
  byId("jobs-empty").hidden = jobs.length > 0;
  byId("jobs-body").replaceChildren(...jobs.map((job) => {
    const summary = job.summary;
    const accuracy = summary ? `${fmt.percent(summary.before.accuracy, 1)} → ${fmt.percent(summary.after.accuracy, 1)}`
      : "–";
    const link = h("a", { href: `#/jobs/${job.id}`, class: "mono", "data-testid": "job-link" }, fmt.shortId(job.id));
    const row = h("tr", { "data-testid": "job-row", "data-job-id": job.id, "data-status": job.status,
      class: "clickable" },
      h("td", {}, link),
      h("td", {}, kindBadge(job.kind)),
      h("td", {}, statusPill(job.status)),
      h("td", { class: "progress-col" }, progressBar(job)),
      h("td", { class: "num" }, accuracy),
      h("td", { class: "num" }, summary ? fmt.bytes(summary.after.file_bytes) : "–"),
      h("td", { class: "muted", title: fmt.dateTime(job.created_at) }, fmt.ago(job.created_at)));
    row.addEventListener("click", (event) => {
      if (event.target.closest("a")) return;
      window.location.hash = `#/jobs/${job.id}`;
    });
    return row;
  }));
}

// --- one job -----------------------------------------------------------------------------------------------

function showJob(jobId) {
  show("job-view");
  const view = byId("job-view");
  view.replaceChildren(h("p", { class: "muted" }, "Loading…"));
  const page = new JobPage(view);
  return poll(async () => {
    const job = await api.getJob(jobId);
    page.update(job);
    return !TERMINAL.has(job.status);
  });
}

// A page built once whose sections are refreshed only when their data changes, so that a poll never resets
// what the user is doing (a download in flight, a scrolled list).
class LivePage {
  constructor(view, prefix) {
    this.view = view;
    this.prefix = prefix;
    this.rendered = {};
    this.sections = null;
  }

  refresh(name, data, render) {
    const signature = JSON.stringify(data);
    if (this.rendered[name] === signature) return;
    this.rendered[name] = signature;
    this.sections[name].replaceChildren(...[render()].flat().filter((child) => child != null));
  }

  // A card holding the section `name` (id and data-testid `${prefix}-${name}`), under `title` if given.
  section(name, title, attributes = {}) {
    this.sections[name] = h("div", { id: `${this.prefix}-${name}`, "data-testid": `${this.prefix}-${name}` });
    return h("div", { class: "card", ...attributes }, title ? h("h2", {}, title) : null, this.sections[name]);
  }

  // A cancel button for the header of something that has not ended.
  cancelButton(label, cancel, requested = false) {
    const button = h("button", { type: "button", class: "button danger", "data-testid": "cancel-button",
      disabled: requested }, requested ? "Canceling…" : label);
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        await cancel();
      } catch (error) {
        showError(error.message);
      }
    });
    return button;
  }
}

class JobPage extends LivePage {
  constructor(view) {
    super(view, "job");
  }

  update(job) {
    if (!this.sections) this.build(job);
    this.refresh("header", [job.status, job.cancel_requested], () => this.header(job));
    this.refresh("progress", [job.status, job.progress, job.error, job.attempt], () => this.progress(job));
    this.refresh("summary", job.summary, () => this.summary(job));
    const curve = curvePoints(job);
    this.refresh("curves", curve, () => this.curves(curve));
    this.refresh("artifacts", job.artifacts.map((a) => a.id), () => this.artifacts(job));
    this.refresh("events", job.events.map((e) => e.id ?? e.at), () => this.events(job));
  }

  build(job) {
    this.sections = {};
    const spec = h("pre", { id: "job-spec", class: "code", "data-testid": "job-spec" },
      JSON.stringify(job.spec, null, 2));
    this.sections.header = h("div", { class: "view-header job-title" });
    this.view.replaceChildren(
      h("a", { href: "#/", class: "back" }, "← All jobs"),
      this.sections.header,
      this.section("progress", null),
      h("div", { class: "grid two" },
        this.section("summary", "Before and after"),
        this.section("curves", "Training curves")),
      this.section("artifacts", "Artifacts"),
      h("div", { class: "grid two" },
        h("div", { class: "card" }, h("h2", {}, "Spec"), spec),
        this.section("events", "Latest events")));
  }

  header(job) {
    const title = h("h1", {}, kindBadge(job.kind), h("span", { class: "mono", "data-testid": "job-id" }, job.id),
      statusPill(job.status));
    const actions = h("div", { class: "actions" });
    if (!TERMINAL.has(job.status)) {
      actions.append(this.cancelButton("Cancel job", () => api.cancelJob(job.id), job.cancel_requested));
    }
    return [title, actions];
  }

  progress(job) {
    const pipeline = job.pipeline_id ? h("a", { href: `#/pipelines/${job.pipeline_id}`, "data-testid": "job-pipeline" },
      `${job.pipeline_id}, stage ${job.stage}`) : null;
    const facts = h("dl", { class: "facts" },
      fact("Input model", job.model, true), fact("Dataset", job.dataset, true),
      pipeline ? fact("Pipeline", pipeline, true) : null,
      fact("Attempt", `${job.attempt} of ${job.max_attempts}`),
      fact("Created", fmt.dateTime(job.created_at)), fact("Started", fmt.dateTime(job.started_at)),
      fact("Finished", fmt.dateTime(job.finished_at)));
    const error = job.error ? h("p", { class: "error-box", "data-testid": "job-error" }, job.error) : null;
    return [progressBar(job), facts, error];
  }

  summary(job) {
    const summary = job.summary;
    if (!summary) {
      return h("p", { class: "muted" }, TERMINAL.has(job.status) ? "No measurements (the job did not succeed)."
        : "Measured when the job finishes: accuracy on held-out images, size and CPU latency of the files.");
    }
    const rows = fmt.FIGURES.map(([name, title]) => {
      const [changeText, tone] = fmt.change(name, summary.before[name], summary.after[name]);
      return h("tr", { "data-figure": name }, h("th", {}, title),
        h("td", { class: "num" }, fmt.figure(name, summary.before[name])),
        h("td", { class: "num" }, fmt.figure(name, summary.after[name])),
        h("td", { class: `num ${tone}` }, changeText));
    });
    const table = h("table", { class: "table compact", id: "metrics-table", "data-testid": "metrics-table" },
      h("thead", {}, h("tr", {}, h("th", {}), h("th", { class: "num" }, summary.before.label),
        h("th", { class: "num" }, summary.after.label), h("th", { class: "num" }, "change"))),
      h("tbody", {}, rows));
    const notes = (job.metrics.notes || []).map((note) => h("li", {}, note));
    const failed = summary.failed_formats || [];
    const cpu = summary.measured_on ? ` (${summary.measured_on.model}; ${summary.measured_on.features.join(", ")})` : "";
    const evaluation = summary.evaluation ? summary.evaluation.note
      : `${summary.validation_samples ?? "?"} held-out images.`;
    return [failed.length ? h("p", { class: "error-box", "data-testid": "failed-formats" },
      `Not results: the ${failed.join(" and ")} file(s) failed their acceptance checks and are kept only as `
      + "diagnostics (REJECTED-*). See the notes.") : null,
    table, this.formats(summary.formats || []), this.tasks(summary.tasks), this.teachers(summary.teachers),
    this.control(summary.control),
    h("p", { class: "muted small", "data-testid": "evaluation" }, `Accuracy: ${evaluation} Latency of the `
      + `TorchScript files on the worker's CPU${cpu}.`),
    notes.length ? h("ul", { class: "notes" }, notes) : null, this.work(job.metrics.work)];
  }

  // A multi-task student: each head beside its own task's teachers.
  tasks(tasks) {
    if (!tasks || !tasks.length) return null;
    const rows = tasks.map((task) => {
      const [changeText, tone] = fmt.change("accuracy", task.teacher_accuracy, task.accuracy);
      return h("tr", { "data-task": task.name }, h("th", {}, task.name),
        h("td", { class: "num" }, fmt.percent(task.accuracy, 2)),
        h("td", { class: "num" }, fmt.percent(task.teacher_accuracy, 2)),
        h("td", { class: `num ${tone}` }, changeText),
        h("td", { class: task.passed ? "good" : "bad" }, task.passed ? "passed" : "rejected"));
    });
    return h("table", { class: "table compact", "data-testid": "task-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "task (head)"), h("th", { class: "num" }, "student"),
        h("th", { class: "num" }, "task's teachers"), h("th", { class: "num" }, "change"), h("th", {}, "verdict"))),
      h("tbody", {}, rows));
  }

  // An ensemble's members (the "before" column is all of them together).
  teachers(teachers) {
    if (!teachers || !teachers.length) return null;
    const rows = teachers.map((member) => h("tr", { "data-teacher": member.id }, h("th", {}, member.id),
      h("td", {}, member.task || "–"), h("td", {}, member.arch), h("td", { class: "num" }, String(member.weight)),
      h("td", { class: "num" }, fmt.percent(member.accuracy, 2)),
      h("td", { class: "num" }, fmt.figure("cpu_latency_ms_batch1", member.cpu_latency_ms_batch1))));
    return h("table", { class: "table compact", "data-testid": "teacher-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "teacher"), h("th", {}, "task"), h("th", {}, "architecture"),
        h("th", { class: "num" }, "weight"), h("th", { class: "num" }, "accuracy"),
        h("th", { class: "num" }, "CPU latency, batch 1"))),
      h("tbody", {}, rows));
  }

  control(control) {
    if (!control) return null;
    const gain = control.kd_gain_pts;
    return h("p", { "data-testid": "control-run" }, "Control: the same student trained alone scored ",
      h("strong", {}, fmt.percent(control.accuracy, 2)), "; distillation gained ",
      h("strong", { class: gain >= 0 ? "good" : "bad" }, `${gain >= 0 ? "+" : ""}${gain.toFixed(2)} pts`), ".");
  }

  // What the job did to the model, and what it did not do that a reader might assume it did.
  work(work) {
    if (!work) return null;
    const list = (title, lines) => (lines && lines.length
      ? [h("h3", {}, title), h("ul", { class: "notes" }, lines.map((line) => h("li", {}, line)))] : []);
    return h("div", { "data-testid": "work" }, ...list("What was done", work.done),
      ...list("What was not done", work.not_done));
  }

  formats(formats) {
    if (!formats.length) return null;
    const points = (value) => (value === null || value === undefined ? "n/a" : `${(-value).toFixed(2)} pts`);
    const rows = formats.map((entry) => h("tr", { "data-format": entry.format }, h("th", {}, entry.format),
      h("td", { class: "num" }, fmt.percent(entry.accuracy, 2)),
      h("td", { class: "num", title: entry.agreement_with ? `top-1 agreement with the ${entry.agreement_with}` : "" },
        entry.agreement === null || entry.agreement === undefined ? "n/a" : fmt.percent(entry.agreement, 2)),
      h("td", { class: "num" }, points(entry.drop_pts)),
      h("td", { class: entry.passed ? "good" : "bad" },
        entry.passed ? "passed" : `rejected: ${(entry.reasons || []).join("; ") || "failed its check"}`)));
    return h("table", { class: "table compact", "data-testid": "format-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "file format"), h("th", { class: "num" }, "accuracy"),
        h("th", { class: "num" }, "agreement"), h("th", { class: "num" }, "vs input model"), h("th", {}, "verdict"))),
      h("tbody", {}, rows));
  }

  curves(points) {
    const loss = h("div", { class: "chart", id: "curve-loss", "data-testid": "curve-loss" });
    const accuracy = h("div", { class: "chart", id: "curve-accuracy", "data-testid": "curve-accuracy" });
    lineChart(loss, { points: points.map((p) => [p.epoch, p.train_loss]), series: "train_loss", color: "#dc2626",
      yFormat: (v) => v.toPrecision(3), label: "Training loss per epoch" });
    lineChart(accuracy, { points: points.map((p) => [p.epoch, p.val_accuracy]), series: "val_accuracy",
      color: "#2563eb", yFormat: (v) => `${(v * 100).toFixed(1)}%`, label: "Validation accuracy per epoch" });
    return [h("h3", {}, "Training loss"), loss, h("h3", {}, "Validation accuracy"), accuracy];
  }

  artifacts(job) {
    if (!job.artifacts.length) {
      return h("p", { class: "muted" }, "Files appear here when the job succeeds.");
    }
    const rows = job.artifacts.map((artifact) => {
      const status = h("span", { class: "download-status", "data-testid": "download-status" });
      const button = h("button", { type: "button", class: "button small", "data-testid": "download-button",
        "data-artifact-kind": artifact.kind, "data-filename": artifact.filename }, "Download");
      button.addEventListener("click", () => download(artifact, button, status));
      return h("tr", { "data-testid": "artifact-row", "data-artifact-kind": artifact.kind },
        h("td", { class: "mono" }, artifact.filename), h("td", { class: "muted" }, artifact.runtime),
        h("td", { class: "num" }, fmt.bytes(artifact.bytes)),
        h("td", { class: "mono hash", title: artifact.sha256, "data-testid": "artifact-sha256" },
          artifact.sha256.slice(0, 16) + "…"),
        h("td", { class: "right" }, button, status));
    });
    return h("table", { class: "table compact", id: "artifacts-table", "data-testid": "artifacts-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "File"), h("th", {}, "Runtime"), h("th", { class: "num" }, "Size"),
        h("th", {}, "sha256"), h("th", {}))), h("tbody", {}, rows));
  }

  events(job) {
    const latest = job.events.slice(-EVENTS_SHOWN).reverse();
    return h("ol", { class: "events" }, latest.map((event) => h("li", {},
      h("span", { class: "muted small" }, new Date(event.at).toLocaleTimeString()),
      h("span", { class: `event-kind kind-${event.kind}` }, event.kind), h("span", {}, event.message))));
  }
}

function fact(term, value, mono = false) {
  return h("div", {}, h("dt", {}, term), h("dd", { class: mono ? "mono" : "" }, value ?? "–"));
}

// Per-epoch points: the finished job's history, or while it runs, the epochs its events have recorded.
function curvePoints(job) {
  const history = job.metrics.history;
  if (history?.length) return history;
  const byEpoch = new Map();
  for (const event of job.events) {
    const data = event.data || {};
    if (event.kind === "progress" && data.epoch != null && data.train_loss != null) byEpoch.set(data.epoch, data);
  }
  return [...byEpoch.values()].sort((a, b) => a.epoch - b.epoch)
    .map(({ epoch, train_loss, val_accuracy }) => ({ epoch, train_loss, val_accuracy }));
}

async function download(artifact, button, status) {
  button.disabled = true;
  status.className = "download-status";
  status.textContent = "downloading…";
  try {
    const result = await api.downloadArtifact(artifact);
    status.classList.add(result.matches ? "good" : "bad");
    status.dataset.sha256 = result.sha256;
    status.textContent = result.matches ? "✓ sha256 verified" : `✗ sha256 ${result.sha256.slice(0, 12)}… differs`;
  } catch (error) {
    if (!handleAuthError(error)) {
      status.classList.add("bad");
      status.textContent = error.message;
    }
  } finally {
    button.disabled = false;
  }
}

// --- pipelines ---------------------------------------------------------------------------------------------

function showPipelines() {
  show("pipelines-view");
  return poll(async () => {
    const page = await api.listPipelines({ limit: 50 });
    renderPipelineRows(page.items);
    byId("pipelines-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  });
}

function renderPipelineRows(pipelines) {
  byId("pipelines-empty").hidden = pipelines.length > 0;
  byId("pipelines-body").replaceChildren(...pipelines.map((pipeline) => {
    const link = h("a", { href: `#/pipelines/${pipeline.id}`, "data-testid": "pipeline-link" }, pipeline.name);
    const chips = pipeline.stages.map((stage) => h("span", { class: `pill small ${stage.status}`,
      title: `${stage.kind}: ${stage.status}`, "data-stage": stage.name }, stage.name));
    const row = h("tr", { "data-testid": "pipeline-row", "data-pipeline-id": pipeline.id,
      "data-status": pipeline.status, class: "clickable" },
      h("td", {}, link, h("div", { class: "mono muted small" }, fmt.shortId(pipeline.id))),
      h("td", {}, statusPill(pipeline.status, "pipeline-status")),
      h("td", {}, h("div", { class: "chips" }, chips), h("div", { class: "muted small" }, stagesDone(pipeline))),
      h("td", { class: "mono" }, pipeline.final_model ? fmt.shortId(pipeline.final_model) : "–"),
      h("td", { class: "muted", title: fmt.dateTime(pipeline.created_at) }, fmt.ago(pipeline.created_at)));
    row.addEventListener("click", (event) => {
      if (event.target.closest("a")) return;
      window.location.hash = `#/pipelines/${pipeline.id}`;
    });
    return row;
  }));
}

function showPipeline(pipelineId) {
  show("pipeline-view");
  const view = byId("pipeline-view");
  view.replaceChildren(h("p", { class: "muted" }, "Loading…"));
  const page = new PipelinePage(view);
  return poll(async () => {
    const report = await api.getPipelineReport(pipelineId);
    page.update(report);
    return !TERMINAL.has(report.pipeline.status);
  });
}

// A pipeline: its stages as a row of cards, one before/after table of every stage, the final model's lineage.
class PipelinePage extends LivePage {
  constructor(view) {
    super(view, "pipeline");
  }

  update(report) {
    const pipeline = report.pipeline;
    if (!this.sections) this.build();
    this.refresh("header", [pipeline.name, pipeline.status], () => this.header(pipeline));
    this.refresh("facts", [pipeline.status, pipeline.error, pipeline.input_accuracy, pipeline.final_model,
      pipeline.started_at, pipeline.finished_at], () => this.facts(pipeline));
    this.refresh("stages", [pipeline.status, pipeline.stages], () => this.stages(pipeline));
    this.refresh("report", report.rows, () => this.report(report.rows));
    this.refresh("lineage", report.final_model_lineage, () => this.lineage(report.final_model_lineage));
  }

  build() {
    this.sections = { header: h("div", { class: "view-header job-title" }) };
    this.view.replaceChildren(
      h("a", { href: "#/pipelines", class: "back" }, "← All pipelines"),
      this.sections.header,
      this.section("facts", null),
      this.section("stages", "Stages"),
      this.section("report", "Before and after, stage by stage"),
      this.section("lineage", "Where the final model came from"));
  }

  header(pipeline) {
    const title = h("h1", {}, h("span", { "data-testid": "pipeline-name" }, pipeline.name),
      h("span", { class: "mono muted", "data-testid": "pipeline-id" }, pipeline.id),
      statusPill(pipeline.status, "pipeline-status"));
    const actions = h("div", { class: "actions" });
    if (!TERMINAL.has(pipeline.status)) {
      actions.append(this.cancelButton("Cancel pipeline", () => api.cancelPipeline(pipeline.id),
        pipeline.status === "canceling"));
    }
    return [title, actions];
  }

  facts(pipeline) {
    const facts = h("dl", { class: "facts" },
      fact("Input model", pipeline.model, true), fact("Dataset", pipeline.dataset, true),
      fact("Evaluation images", pipeline.eval_dataset ?? "a held-out split of the dataset"),
      fact("Input model's accuracy", fmt.percent(pipeline.input_accuracy)),
      fact("Final model", pipeline.final_model, true), fact("Created", fmt.dateTime(pipeline.created_at)),
      fact("Started", fmt.dateTime(pipeline.started_at)), fact("Finished", fmt.dateTime(pipeline.finished_at)));
    const error = pipeline.error ? h("p", { class: "error-box", "data-testid": "pipeline-error" }, pipeline.error)
      : null;
    return [facts, error];
  }

  stages(pipeline) {
    return h("div", { class: "stages" }, pipeline.stages.map((stage) => stageCard(stage)));
  }

  report(rows) {
    const head = h("tr", {}, REPORT_COLUMNS.map(([key, title]) => h("th", { class: reportClass(key) }, title)));
    const body = rows.map((row) => h("tr", { "data-stage": row.stage }, REPORT_COLUMNS.map(([key]) =>
      h(key === "stage" ? "th" : "td", { class: reportClass(key), "data-column": key,
        title: key === "model" ? row.model : false }, reportCell(key, row[key])))));
    const note = rows.length > 1 ? "Each stage's figures are measured on the files it published, on the same "
      + "evaluation images; CPU latency of its TorchScript file on the worker's CPU."
      : "A stage's figures appear here when it succeeds; the input model's, when the first stage has measured it.";
    return [h("div", { class: "table-scroll" }, h("table", { class: "table compact",
      "data-testid": "pipeline-report-table" }, h("thead", {}, head), h("tbody", {}, body))),
    h("p", { class: "muted small" }, note)];
  }

  lineage(chain) {
    if (!chain.length) return h("p", { class: "muted" }, "Shown when the pipeline has succeeded.");
    return h("ol", { class: "lineage", "data-testid": "lineage" }, chain.map(({ model, made_by: job }) => h("li",
      { "data-model-id": model.id },
      h("span", { class: "mono" }, model.id), h("span", {}, model.name),
      h("span", { class: "pill" }, model.precision),
      job ? h("span", { class: "muted" }, "made by ", kindBadge(job.kind), " ",
        h("a", { href: `#/jobs/${job.id}`, class: "mono" }, fmt.shortId(job.id)))
        : h("span", { class: "muted" }, "uploaded"))));
  }
}

function reportClass(key) {
  if (key === "formats") return "lines";
  return ["stage", "kind", "model", "precision", "gate"].includes(key) ? "" : "num";
}

function stageCard(stage) {
  const gate = gateOf(stage);
  const gateLine = gate ? h("p", { class: `gate ${gate.verdict.replace(" ", "-")}`, "data-testid": "stage-gate",
    "data-verdict": gate.verdict, title: gate.detail ?? "" }, `Gate ${gate.text}: ${gate.verdict}`) : null;
  const bar = ACTIVE_STAGES.has(stage.status) ? progressBar({ status: stage.status, progress: stage.progress,
    attempt: 0 }) : null;
  const problem = stage.gate_result ?? stage.error;
  return h("div", { class: `stage-card ${stage.status}`, "data-testid": "stage-card", "data-stage": stage.name,
    "data-status": stage.status },
  h("div", { class: "stage-head" }, h("strong", { class: "mono" }, stage.name), kindBadge(stage.kind),
    statusPill(stage.status, "stage-status")),
  h("p", { class: "muted small" }, stageOrigin(stage)),
  bar,
  h("p", { class: "small" }, "Model: ", h("span", { class: "mono", "data-testid": "stage-model" },
    stage.model_id ?? "–")),
  gateLine,
  problem ? h("p", { class: "error-box small" }, problem) : null,
  stage.job_id ? h("a", { href: `#/jobs/${stage.job_id}`, class: "small", "data-testid": "stage-job-link" },
    `Job ${fmt.shortId(stage.job_id)} →`) : null);
}

// --- trade-offs across the tenant --------------------------------------------------------------------------

function showTradeoffs() {
  show("tradeoffs-view");
  renderLegend();
  return poll(async () => {
    const [allJobs, models] = await Promise.all([api.listAllJobs({ status: "succeeded" }), api.listAllModels()]);
    const jobs = allJobs.filter((job) => job.summary);
    const sha256ByModel = new Map(models.map((model) => [model.id, model.sha256]));
    const inputs = new Set(jobs.map((job) => modelKey(job.model, sha256ByModel))).size;
    byId("tradeoffs-count").textContent = `${jobs.length} succeeded job${jobs.length === 1 ? "" : "s"} from `
      + `${inputs} input model${inputs === 1 ? "" : "s"}`;
    const pairsBy = (key) => tradeoffPairs(jobs, key, sha256ByModel);
    tradeoffChart(byId("chart-size"), { pairs: pairsBy("torchscript_bytes"),
      xLabel: "TorchScript file size (log scale)", xFormat: fmt.bytes, tickFormat: fmt.compactBytes,
      label: "Accuracy against file size", tooltip });
    tradeoffChart(byId("chart-latency"), { pairs: pairsBy("cpu_latency_ms_batch1"),
      xLabel: "CPU latency at batch 1 (log scale)", xFormat: fmt.milliseconds, tickFormat: fmt.compactMilliseconds,
      label: "Accuracy against latency", tooltip });
  }, TRADEOFFS_POLL_MS);
}

function renderLegend() {
  const entries = Object.entries(KIND_COLORS).map(([kind, color]) => {
    const swatch = h("span", { class: "swatch" });
    swatch.style.background = color;
    return h("span", { class: "legend-item" }, swatch, `${kind} result`);
  });
  entries.push(h("span", { class: "legend-item" }, h("span", { class: "swatch hollow" }), "input model"));
  byId("tradeoffs-legend").replaceChildren(...entries);
}

// --- start -------------------------------------------------------------------------------------------------

async function start() {
  byId("login-form").addEventListener("submit", signIn);
  byId("logout").addEventListener("click", signOut);
  window.addEventListener("hashchange", route);
  const key = api.storedKey();
  if (key) {
    try {
      byId("tenant").textContent = (await api.whoAmI(key)).tenant;
    } catch (error) {
      if (!handleAuthError(error)) showError(error.message);
      if (!api.storedKey()) return;
    }
  }
  route();
}

start();
