// The /v1 API as the dashboard uses it. The key lives in sessionStorage: it is gone when the tab closes,
// and it is sent only as an Authorization header (never in a URL, where logs and history would keep it).

const KEY_STORAGE = "condenser.apiKey";

export class ApiError extends Error {
  constructor(status, detail) {
    super(`${detail} (HTTP ${status})`);
    this.status = status;
    this.detail = detail;
  }
}

export function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function storeKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
}

async function request(path, options = {}, key = storedKey()) {
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { ...options, headers, cache: "no-store" });
  if (!response.ok) {
    let detail = response.statusText;
    try {
      detail = (await response.json()).detail || detail;
    } catch {
      // Not JSON (a proxy's error page): the status text says enough.
    }
    throw new ApiError(response.status, typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return response;
}

export async function getJson(path, key) {
  return (await request(path, {}, key)).json();
}

export async function postJson(path, body) {
  const options = { method: "POST", headers: { "Content-Type": "application/json" } };
  if (body !== undefined) options.body = JSON.stringify(body);
  return (await request(path, options)).json();
}

export function whoAmI(key) {
  return getJson("/v1/me", key);
}

export function getJob(jobId) {
  return getJson(`/v1/jobs/${encodeURIComponent(jobId)}`);
}

export function listJobs(params = {}) {
  const query = new URLSearchParams(params).toString();
  return getJson(`/v1/jobs${query ? `?${query}` : ""}`);
}

// Every page of a listing, up to `cap` items (the trade-off chart wants all finished jobs and their models).
async function listAll(path, params = {}, cap = 1000) {
  const items = [];
  let cursor = null;
  do {
    const query = new URLSearchParams({ ...params, limit: 100, ...(cursor ? { cursor } : {}) });
    const page = await getJson(`${path}?${query}`);
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && items.length < cap);
  return items;
}

export function listAllJobs(params) {
  return listAll("/v1/jobs", params);
}

export function listAllModels() {
  return listAll("/v1/models");
}

export function cancelJob(jobId) {
  return postJson(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`);
}

export function listPipelines(params = {}) {
  const query = new URLSearchParams(params).toString();
  return getJson(`/v1/pipelines${query ? `?${query}` : ""}`);
}

// The report carries the pipeline itself: one request refreshes the whole pipeline page.
export function getPipelineReport(pipelineId) {
  return getJson(`/v1/pipelines/${encodeURIComponent(pipelineId)}/report`);
}

export function cancelPipeline(pipelineId) {
  return postJson(`/v1/pipelines/${encodeURIComponent(pipelineId)}/cancel`);
}

// A plain <a href> cannot send the Authorization header, so the file is fetched, checked against the
// server's sha256 in the browser, and handed to the browser's download manager from an object URL.
export async function downloadArtifact(artifact) {
  const response = await request(artifact.download_url, { headers: { Accept: "*/*" } });
  const blob = await response.blob();
  const sha256 = await sha256Hex(blob);
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = artifact.filename;
  document.body.append(link);
  link.click();
  link.remove();
  // Revoked later, not now: the download manager reads the URL after click() returns.
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return { sha256, matches: sha256 === artifact.sha256, bytes: blob.size };
}

async function sha256Hex(blob) {
  const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  return Array.from(new Uint8Array(digest), (byte) => byte.toString(16).padStart(2, "0")).join("");
}
