// The trade-off charts' points, without the DOM (so that node can test them): one hollow point per input model
// however many jobs measured it, and one filled point per job's result.

export function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

// The same file uploaded twice is two model ids with one sha256: the file, not the upload, is the model.
// A model missing from `sha256ByModel` (listed past the dashboard's cap) is keyed by its id.
export function modelKey(modelId, sha256ByModel) {
  return sha256ByModel.get(modelId) ?? modelId;
}

// `jobs`: succeeded jobs with a summary; `key`: the figure on the x axis (a ModelFigures field).
// Returns [{ id, kind, href, before, after }] where every job of one input model shares one `before`:
// { key, x, y, count, label }, the median of the figures its jobs measured (a busy host times one file
// differently from job to job), `count` the jobs behind it.
export function tradeoffPairs(jobs, key, sha256ByModel) {
  const byModel = new Map();
  for (const job of jobs) {
    const model = modelKey(job.model, sha256ByModel);
    if (!byModel.has(model)) byModel.set(model, []);
    byModel.get(model).push(job);
  }
  const pairs = [];
  for (const [model, modelJobs] of byModel) {
    const before = inputPoint(model, modelJobs, key);
    for (const job of modelJobs) {
      const { after } = job.summary;
      pairs.push({ id: job.id, kind: job.kind, href: `#/jobs/${job.id}`, before,
        after: { x: after[key], y: after.accuracy, label: `${job.kind} ${job.id}: ${after.label}` } });
    }
  }
  return pairs;
}

function inputPoint(model, jobs, key) {
  const measured = jobs.map((job) => job.summary.before).filter((side) => side[key] > 0 && side.accuracy != null);
  const first = jobs[0];
  const where = `${first.summary.before.label} ${first.model}`;
  const label = measured.length > 1 ? `${where}: median of ${measured.length} jobs` : where;
  return { key: model, count: measured.length, label,
    x: measured.length ? median(measured.map((side) => side[key])) : null,
    y: measured.length ? median(measured.map((side) => side.accuracy)) : null };
}
