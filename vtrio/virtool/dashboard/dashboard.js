/**
 * The vtrio dashboard: the samples and jobs an API key's user may see, kept live over the
 * websocket by vtrio.js. Plain DOM code, no framework and no build step.
 *
 * Data flow: the page keeps two maps, samples and jobs by id. The "reload" event fills them
 * from samples.list and jobs.list; from then on change messages update them (insert and update
 * carry the whole document, delete a list of ids). The page never applies what a call returned:
 * the server sends a write's change message before the write's response, so the message has
 * always arrived first, and applying the (possibly older) result could undo a later change.
 * Every change schedules one render, at the next animation frame, however many came at once.
 *
 * The key is kept in sessionStorage (this tab only, gone when it closes). It may be given once
 * in the address, `/?token=KEY`; it is then taken out of the address bar at once, so that it is
 * not left in the history or in a copied link.
 */

import { connect } from "./vtrio.js";

const KEY_STORAGE = "vtrio.key";
const PAGE_SIZE = 100; // the most samples.list and jobs.list return at once
const ACTIVE = new Set(["waiting", "running"]);
const STATUS_LABELS = {
  connecting: "connecting…",
  resuming: "reconnecting…",
  reloading: "loading…",
  live: "live",
  offline: "offline",
  "signed-out": "signed out",
  closed: "signed out",
};

const state = {
  client: null,
  samples: new Map(), // id -> sample (its quality: undefined until fetched, then null or an object)
  jobs: new Map(), // id -> job
  selected: null, // id of the sample in the details panel
  plotted: null, // the quality the plot shows, not to be drawn again at every render
  renderPending: false,
};

const byTestId = (id, root = document) => root.querySelector(`[data-testid="${id}"]`);
const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

start();

function start() {
  byTestId("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn(byTestId("key-input").value.trim());
  });
  byTestId("sign-out").addEventListener("click", signOut);
  byTestId("new-sample-form").addEventListener("submit", createSample);
  // Uploads are files, not documents: no message says they changed, so look when asked.
  byTestId("new-sample-reads").addEventListener("focus", () => {
    refreshUploads(state.client).catch(showError);
  });
  byTestId("samples-table").addEventListener("click", onSampleClick);
  byTestId("jobs-table").addEventListener("click", onJobClick);

  const key = takeKeyFromAddress() ?? sessionStorage.getItem(KEY_STORAGE);
  if (key) signIn(key);
  else showSignIn({ refused: false });
}

/** The key given as `?token=`, taken out of the address bar; null if none was. */
function takeKeyFromAddress() {
  const address = new URL(location.href);
  const key = address.searchParams.get("token");
  if (key === null) return null;
  address.searchParams.delete("token");
  history.replaceState(history.state, "", address);
  return key;
}

/** The server's websocket: `/ws` beside this page, over TLS if the page came over TLS. */
function websocketUrl() {
  const url = new URL("ws", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.search = url.hash = "";
  return url.href;
}

// --- signing in and out -------------------------------------------------------------------

function signIn(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
  state.client?.close();
  const client = connect({ url: websocketUrl(), token: key });
  state.client = client;
  const current =
    (handler) =>
    (...args) =>
      client === state.client && handler(...args);
  client.on(
    "status",
    current((status) => {
      showStatus(status);
      if (status === "signed-out") refused();
    }),
  );
  client.on(
    "reload",
    current(() => reload(client)),
  );
  for (const kind of ["samples", "jobs"]) {
    client.subscribe(
      kind,
      current((message) => apply(kind, message)),
    );
  }
  showStatus(client.status);
  document.getElementById("sign-in").hidden = true;
  byTestId("sign-out").hidden = false;
  document.getElementById("workspace").hidden = false;
}

function signOut() {
  state.client?.close();
  state.client = null;
  sessionStorage.removeItem(KEY_STORAGE);
  showSignIn({ refused: false });
}

function showSignIn({ refused }) {
  // What the last key could see is not for whoever signs in next.
  state.samples = new Map();
  state.jobs = new Map();
  state.selected = null;
  render();
  document.getElementById("workspace").hidden = true;
  byTestId("sign-out").hidden = true;
  document.getElementById("sign-in").hidden = false;
  byTestId("signed-out-message").hidden = !refused;
  byTestId("key-input").value = "";
  byTestId("key-input").focus();
  showStatus("signed-out");
}

/** The server refused the key (wrong, or revoked): forget it, and ask for another. */
function refused() {
  state.client = null;
  sessionStorage.removeItem(KEY_STORAGE);
  showSignIn({ refused: true });
}

function showStatus(status) {
  const element = byTestId("status");
  element.dataset.status = status;
  element.textContent = STATUS_LABELS[status] ?? status;
}

// --- keeping the lists ----------------------------------------------------------------------

/** Replace both lists with the server's (vtrio.js holds change messages until this ends). */
async function reload(client) {
  const [samples, jobs] = await Promise.all([
    fetchSamples(client),
    fetchJobs(client),
    refreshUploads(client),
  ]);
  state.samples = new Map(samples.map((sample) => [sample.id, sample]));
  state.jobs = new Map(jobs.map((job) => [job.id, job]));
  if (state.samples.has(state.selected)) await fetchQuality(state.selected);
  render();
}

async function fetchSamples(client) {
  const samples = [];
  let after = null;
  do {
    const page = await client.call("samples.list", {
      limit: PAGE_SIZE,
      ...(after === null ? {} : { after }),
    });
    samples.push(...page.items);
    after = page.next ?? null;
  } while (after !== null);
  return samples;
}

async function fetchJobs(client) {
  // jobs.list pages by skip, newest first: a job created between two pages pushes the rest
  // down by one, so the next page repeats a job (the map keeps one) and misses none; the new
  // job's own insert message, held until the reload ends, adds it.
  const jobs = [];
  for (;;) {
    const page = await client.call("jobs.list", { skip: jobs.length, limit: PAGE_SIZE });
    jobs.push(...page.items);
    if (page.items.length < PAGE_SIZE || jobs.length >= page.total) return jobs;
  }
}

/** Apply a change message to `state[kind]` ("samples" or "jobs", as its interface). */
function apply(kind, { operation, data }) {
  if (operation === "delete") {
    for (const id of data) state[kind].delete(id);
  } else if (Object.keys(data).length === 1) {
    // An update carrying its id alone: the server could not read the document back after
    // writing it. Its state is unknown: fetch it.
    refetch(kind, data.id);
  } else {
    state[kind].set(data.id, data);
  }
  scheduleRender();
}

async function refetch(kind, id) {
  try {
    const document = await state.client.call(`${kind}.get`, { id });
    state[kind].set(id, document);
  } catch (error) {
    if (error.code === 404) state[kind].delete(id);
    else showError(error);
  }
  scheduleRender();
}

async function refreshUploads(client) {
  if (!client) return;
  const select = byTestId("new-sample-reads");
  const uploads = await client.call("uploads.list");
  const chosen = select.value;
  select.replaceChildren(select.options[0]);
  for (const { name, size } of uploads) {
    select.append(new Option(`${name} (${formatSize(size)})`, name));
  }
  select.value = uploads.some(({ name }) => name === chosen) ? chosen : "";
}

/** A sample's read statistics, which samples.list leaves out. */
async function fetchQuality(id) {
  try {
    const sample = await state.client.call("samples.get", { id });
    // Unless a change message brought a newer version meanwhile:
    if (state.samples.get(id)?.quality === undefined) state.samples.set(id, sample);
  } catch (error) {
    if (error.code !== 404) showError(error);
  }
  scheduleRender();
}

// --- actions --------------------------------------------------------------------------------

async function createSample(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const fields = Object.fromEntries(new FormData(form));
  await act(form.querySelector("button"), async () => {
    const sample = await state.client.call("samples.create", fields);
    form.reset();
    select(sample.id);
  });
}

function onSampleClick(event) {
  const button = event.target.closest("button");
  const id = button?.closest("tr")?.dataset.id;
  if (!id) return;
  if (button.dataset.testid === "sample-name") {
    select(id);
  } else if (button.dataset.testid === "start-job") {
    act(button, () => state.client.call("jobs.create", { task: "sample_stats", sample_id: id }));
  }
}

function onJobClick(event) {
  const button = event.target.closest('[data-testid="cancel-job"]');
  const id = button?.closest("tr")?.dataset.id;
  if (id) act(button, () => state.client.call("jobs.cancel", { id }));
}

function select(id) {
  state.selected = id;
  if (state.samples.get(id)?.quality === undefined) fetchQuality(id);
  scheduleRender();
}

/** Run a call for a button: disabled meanwhile, its error shown if it fails. */
async function act(button, action) {
  showError(null);
  button.disabled = true;
  try {
    await action();
  } catch (error) {
    showError(error);
  } finally {
    button.disabled = false;
    render(); // at once, not at the next frame: it decides whether the button stays enabled
  }
}

function showError(error) {
  const element = byTestId("error");
  element.hidden = !error;
  element.textContent = error ? error.message : "";
}

// --- rendering ------------------------------------------------------------------------------

function scheduleRender() {
  if (state.renderPending) return;
  state.renderPending = true;
  requestAnimationFrame(() => {
    state.renderPending = false;
    render();
  });
}

function render() {
  const samples = [...state.samples.values()].sort((a, b) => compare(a.name, b.name));
  const jobs = [...state.jobs.values()].sort(
    (a, b) => compare(b.created_at, a.created_at) || compare(a.id, b.id),
  );
  const busy = new Set(jobs.filter((job) => ACTIVE.has(job.state)).map((job) => job.sample_id));

  byTestId("sample-count").textContent = `(${samples.length})`;
  byTestId("no-samples").hidden = samples.length > 0;
  reconcile(byTestId("samples-table").tBodies[0], samples, "sample-row", (row, sample) => {
    row.classList.toggle("selected", sample.id === state.selected);
    byTestId("sample-name", row).textContent = sample.name;
    byTestId("sample-owner", row).textContent = sample.user;
    byTestId("sample-host", row).textContent = sample.host;
    byTestId("sample-reads", row).textContent = sample.reads;
    byTestId("sample-created", row).textContent = formatDate(sample.created_at);
    byTestId("start-job", row).disabled = busy.has(sample.id);
  });

  byTestId("job-count").textContent = `(${jobs.length})`;
  byTestId("no-jobs").hidden = jobs.length > 0;
  reconcile(byTestId("jobs-table").tBodies[0], jobs, "job-row", (row, job) => {
    byTestId("job-sample", row).textContent =
      state.samples.get(job.sample_id)?.name ?? job.sample_id;
    byTestId("job-task", row).textContent = job.task;
    const jobState = byTestId("job-state", row);
    jobState.textContent = job.state;
    jobState.dataset.state = job.state;
    jobState.title = job.error ?? "";
    byTestId("job-progress", row).value = job.progress;
    byTestId("job-percent", row).textContent = `${Math.floor(job.progress * 100)}%`;
    byTestId("job-created", row).textContent = formatDate(job.created_at);
    byTestId("cancel-job", row).hidden = !ACTIVE.has(job.state);
  });

  renderDetails(state.samples.get(state.selected));
}

/**
 * Make `tbody`'s rows show `items`, in order: a row per item (by id), made from the template
 * `templateId`, filled by `fill`. Rows are updated in place and moved only when out of order,
 * so that a button keeps its focus while its row's progress changes.
 */
function reconcile(tbody, items, templateId, fill) {
  const rows = new Map([...tbody.rows].map((row) => [row.dataset.id, row]));
  items.forEach((item, index) => {
    let row = rows.get(item.id);
    rows.delete(item.id);
    if (!row) {
      row = document.getElementById(templateId).content.firstElementChild.cloneNode(true);
      row.dataset.id = item.id;
    }
    fill(row, item);
    if (tbody.rows[index] !== row) tbody.insertBefore(row, tbody.rows[index] ?? null);
  });
  for (const row of rows.values()) row.remove();
}

function renderDetails(sample) {
  const panel = byTestId("sample-details");
  panel.hidden = !sample;
  if (!sample) return;
  byTestId("details-name").textContent = sample.name;
  byTestId("details-meta").textContent = [sample.user, sample.host, sample.isolate]
    .filter(Boolean)
    .join(" · ");
  const quality = sample.quality ?? null; // undefined: being fetched
  byTestId("no-quality").hidden = quality !== null || sample.quality === undefined;
  byTestId("quality-stats").hidden = byTestId("quality-figure").hidden = quality === null;
  if (quality === null) return;
  const stats = byTestId("quality-stats");
  const field = (name) => stats.querySelector(`[data-field="${name}"]`);
  field("count").textContent = quality.count.toLocaleString();
  field("bases").textContent = quality.bases.toLocaleString();
  const [shortest, longest] = quality.length;
  field("length").textContent = shortest === longest ? `${shortest}` : `${shortest}–${longest}`;
  field("gc").textContent = `${quality.gc.toFixed(1)}%`;
  if (state.plotted !== quality) {
    drawQualityPlot(byTestId("quality-plot"), quality.mean_quality_by_position);
    state.plotted = quality;
  }
}

// --- the plot -------------------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";
const PLOT = { width: 480, height: 220, left: 40, right: 12, top: 12, bottom: 34 };
// FastQC's bands: poor below 20, reasonable to 28, good above.
const BANDS = [
  { from: 0, to: 20, className: "band-poor" },
  { from: 20, to: 28, className: "band-fair" },
  { from: 28, to: Infinity, className: "band-good" },
];

/** Draw mean quality by position (1-based) as a line over FastQC's quality bands. */
function drawQualityPlot(svg, means) {
  const { width, height, left, right, top, bottom } = PLOT;
  const last = Math.max(means.length, 2); // the x axis spans at least positions 1 and 2
  const yMax = Math.max(41, Math.ceil(means.reduce((a, b) => Math.max(a, b), 0)));
  const x = (position) => left + ((position - 1) / (last - 1)) * (width - left - right);
  const y = (score) => top + (1 - score / yMax) * (height - top - bottom);

  const parts = BANDS.map(({ from, to, className }) => {
    const upper = Math.min(to, yMax);
    return element("rect", {
      class: className,
      x: left,
      y: y(upper),
      width: width - left - right,
      height: y(from) - y(upper),
    });
  });
  for (let score = 0; score <= yMax; score += 10) {
    parts.push(
      element("line", { class: "grid", x1: left, x2: width - right, y1: y(score), y2: y(score) }),
    );
    parts.push(
      element("text", { class: "tick", x: left - 6, y: y(score) + 4, "text-anchor": "end" }, score),
    );
  }
  for (const position of ticks(last)) {
    const label = {
      class: "tick",
      x: x(position),
      y: height - bottom + 16,
      "text-anchor": "middle",
    };
    parts.push(element("text", label, position));
  }
  const axisLabel = {
    class: "label",
    x: (left + width - right) / 2,
    y: height - 4,
    "text-anchor": "middle",
  };
  parts.push(element("text", axisLabel, "position"));

  const points = means.map((score, index) => `${x(index + 1).toFixed(1)},${y(score).toFixed(1)}`);
  parts.push(
    element("polyline", { class: "line", "data-testid": "quality-line", points: points.join(" ") }),
  );
  if (means.length <= 30) {
    // Few positions: a line alone would hide them (or, for one position, not show at all).
    means.forEach((score, index) => {
      parts.push(element("circle", { class: "point", cx: x(index + 1), cy: y(score), r: 3 }));
    });
  }
  svg.replaceChildren(...parts);
}

/** About six round positions from 1 to `last`, for the x axis. */
function ticks(last) {
  const rough = last / 6;
  const magnitude = 10 ** Math.floor(Math.log10(Math.max(rough, 1)));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= rough) ?? 10 * magnitude;
  const found = [1];
  for (let position = step; position <= last; position += step) {
    if (position > 1) found.push(position);
  }
  return found;
}

function element(tag, attributes, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

// --- formatting -----------------------------------------------------------------------------

function compare(a, b) {
  return a < b ? -1 : a > b ? 1 : 0;
}

function formatDate(iso) {
  return iso ? dateFormat.format(new Date(iso)) : "";
}

function formatSize(bytes) {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let index = 0;
  while (bytes >= 1000 && index < units.length - 1) {
    bytes /= 1000;
    index += 1;
  }
  return `${index === 0 ? bytes : bytes.toFixed(1)} ${units[index]}`;
}
