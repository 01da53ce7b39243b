// pgsched dashboard: hash routes (#/jobs, #/job/ID, #/failed, #/schedules, #/workers),
// each view a function that renders into <main> and may take live events. No framework:
// elements are built with h(), and text always goes in as text, never as HTML.

import { ApiError, get, post, query, subscribe } from "./api.js";

const view = document.getElementById("view");
const canWrite = document.body.dataset.role === "write";
const STATUSES = ["pending", "running", "completed", "failed", "cancelled", "expired"];
const RETRYABLE = new Set(["failed", "expired", "cancelled"]);
let current = null; // the active view: { onJob(job), onEvent(kind, data), stop() }

// -- helpers ----------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function badge(status) { return h("span", { class: `badge s-${status}` }, status); }

function toast(message, isError = false) {
  const el = document.getElementById("toast");
  el.textContent = message;
  el.className = `toast${isError ? " error" : ""}`;
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, isError ? 6000 : 2500);
}

function relative(iso) {
  if (!iso) return "";
  const seconds = (new Date(iso).getTime() - Date.now()) / 1000;
  const abs = Math.abs(seconds);
  const text = abs < 1 ? "now" : abs < 60 ? `${Math.round(abs)}s` : abs < 3600
    ? `${Math.floor(abs / 60)}m ${String(Math.round(abs % 60)).padStart(2, "0")}s`
    : abs < 86400 ? `${Math.floor(abs / 3600)}h ${String(Math.floor(abs % 3600 / 60)).padStart(2, "0")}m`
    : `${Math.floor(abs / 86400)}d ${Math.floor(abs % 86400 / 3600)}h`;
  if (text === "now") return text;
  return seconds > 0 ? `in ${text}` : `${text} ago`;
}

function time(iso) {
  if (!iso) return h("span", { class: "muted" }, "–");
  return h("time", { datetime: iso, title: new Date(iso).toLocaleString(), "data-rel": iso },
    relative(iso));
}

// Relative times tick once a second, wherever they are on the page.
setInterval(() => {
  for (const el of document.querySelectorAll("[data-rel]")) el.textContent = relative(el.dataset.rel);
}, 1000);

async function act(button, work, done) {
  button.disabled = true;
  try {
    const result = await work();
    if (done) toast(done(result));
    return result;
  } catch (error) {
    toast(error instanceof ApiError ? error.message : String(error), true);
  } finally {
    button.disabled = false;
  }
}

function actionButton(label, work, done, cls = "") {
  const button = h("button", { class: `small write ${cls}`, type: "button" }, label);
  button.addEventListener("click", (event) => { event.preventDefault(); act(button, work, done); });
  return button;
}

function jobActions(job) {
  const buttons = [];
  if (job.status === "pending" || job.status === "running") {
    buttons.push(actionButton("Cancel", () => post(`jobs/${encodeURIComponent(job.id)}/cancel`),
      () => `cancel requested for ${job.id}`, "danger"));
  }
  if (RETRYABLE.has(job.status)) {
    buttons.push(actionButton("Retry", () => post(`jobs/${encodeURIComponent(job.id)}/retry`),
      () => `${job.id} is pending again`));
  }
  return buttons;
}

// -- figures and chart ------------------------------------------------------------------

async function refreshStats() {
  const [status, series] = await Promise.all([get("status?active=true"), get("throughput")]);
  const t = status.totals;
  const hour = status.throughput.last_hour;
  const ended = hour.completed + hour.failed + hour.expired;
  const rate = ended ? `${(100 * hour.completed / ended).toFixed(1)}%` : "–";
  const figure = (label, value, id) => h("div", { class: "figure", id },
    h("div", { class: "value" }, value), h("div", { class: "label" }, label));
  document.getElementById("stats").replaceChildren(
    figure("pending", t.pending + (t.capped ? "+" : ""), "fig-pending"),
    figure("running", t.running, "fig-running"),
    figure("completed, 1 h", hour.completed, "fig-completed"),
    figure("failed, 1 h", hour.failed + hour.expired, "fig-failed"),
    figure("success rate, 1 h", rate, "fig-rate"),
    figure("completed, 1 min", status.throughput.last_minute.completed, "fig-minute"),
    h("div", { class: "figure chart" }, chart(series.minutes),
      h("div", { class: "label axis" }, h("span", {}, "60 min ago"),
        h("span", {}, "jobs ended per minute (red: failed)"), h("span", {}, "now"))),
  );
}

function chart(minutes) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 600 44");
  svg.setAttribute("preserveAspectRatio", "none");
  const now = Math.floor(Date.now() / 60000);
  const buckets = Array.from({ length: 60 }, () => ({ ok: 0, bad: 0 }));
  for (const row of minutes) {
    const index = 59 - (now - Math.floor(new Date(row.minute).getTime() / 60000));
    if (index < 0 || index > 59) continue;
    if (row.status === "completed") buckets[index].ok += row.jobs;
    else buckets[index].bad += row.jobs;
  }
  const top = Math.max(1, ...buckets.map((b) => b.ok + b.bad));
  buckets.forEach((b, i) => {
    let y = 44;
    for (const [count, cls] of [[b.ok, "ok"], [b.bad, "bad"]]) {
      if (!count) continue;
      const height = Math.max(1, 42 * count / top);
      y -= height;
      const rect = document.createElementNS(ns, "rect");
      Object.entries({ x: i * 10 + 1, y, width: 8, height, class: cls }).forEach(([k, v]) => rect.setAttribute(k, v));
      svg.append(rect);
    }
  });
  return svg;
}

let statsTimer = null;
function statsSoon() { // many job events in a burst cost one refresh
  if (statsTimer) return;
  statsTimer = setTimeout(() => { statsTimer = null; refreshStats().catch(() => {}); }, 1000);
}

// -- jobs and failed --------------------------------------------------------------------

function jobRow(job) {
  const link = h("a", { href: `#/job/${encodeURIComponent(job.id)}` }, job.id);
  return h("tr", { "data-id": job.id },
    h("td", { class: "id mono", title: job.id }, link),
    h("td", {}, job.task), h("td", {}, job.queue), h("td", {}, badge(job.status)),
    h("td", {}, time(job.execution_time)),
    h("td", { class: "num", title: `max retries ${job.max_retries}` }, job.attempts),
    h("td", { class: "error", title: job.last_error || "" }, job.last_error || ""),
    h("td", { class: "actions" }, jobActions(job)));
}

function jobsView(params, { failed = false } = {}) {
  const filters = failed ? { status: "failed" } : {
    status: params.get("status") || "", task: params.get("task") || "", queue: params.get("queue") || "" };
  const body = h("tbody");
  const more = h("button", { type: "button", hidden: true }, "Load more");
  let next = null;
  const columns = ["id", "task", "queue", "status", "due", "attempts", "last error", ""];
  const table = h("table", { id: "jobs-table" }, h("thead", {}, h("tr", {}, columns.map((c) => h("th", {}, c)))), body);

  async function load(append) {
    const data = await get(`jobs${query({ ...filters, limit: 50, before: append ? next : null })}`);
    if (!append) body.replaceChildren();
    for (const job of data.jobs) body.append(jobRow(job));
    if (!body.children.length) body.append(h("tr", {}, h("td", { colspan: 8, class: "empty" }, failed ? "No failed jobs." : "No jobs match.")));
    next = data.next;
    more.hidden = !next;
  }
  more.addEventListener("click", () => load(true));

  const toolbar = failed ? h("div", { class: "toolbar" },
    h("span", { class: "muted" }, "Jobs that used up their retries. Each keeps its attempts and tracebacks."),
    h("span", { class: "spacer" }),
    actionButton("Retry all failed", () => post("jobs/retry", { status: ["failed"] }),
      (r) => { load(false); return `retried ${r.retried} jobs`; }, "primary"))
    : filterBar(filters);
  view.replaceChildren(h("h1", {}, failed ? "Failed jobs" : "Jobs"), toolbar,
    h("div", { class: "card" }, table), h("p", {}, more));
  load(false).catch((e) => toast(e.message, true));

  const matches = (job) => (!filters.status || job.status === filters.status)
    && (!filters.task || job.task === filters.task) && (!filters.queue || job.queue === filters.queue);
  return {
    onJob(job) {
      const existing = body.querySelector(`tr[data-id="${CSS.escape(job.id)}"]`);
      if (existing) {
        if (matches(job)) existing.replaceWith(freshRow(job));
        else existing.remove();
      } else if (matches(job)) {
        body.querySelector(".empty")?.closest("tr").remove();
        body.prepend(freshRow(job));
      }
    },
    onEvent(kind) { if (kind === "resync") load(false); },
  };
}

// An event carries a job summary: every field a row shows.
function freshRow(job) {
  const row = jobRow(job);
  row.classList.add("fresh");
  return row;
}

function filterBar(filters) {
  const status = h("select", { name: "status", "aria-label": "status" },
    h("option", { value: "" }, "any status"), STATUSES.map((s) => h("option", { value: s, selected: s === filters.status }, s)));
  const task = h("input", { name: "task", placeholder: "task", value: filters.task, "aria-label": "task" });
  const queue = h("input", { name: "queue", placeholder: "queue", value: filters.queue, "aria-label": "queue" });
  const search = h("input", { name: "id", placeholder: "find a job by id", "aria-label": "job id", class: "mono" });
  const apply = () => { location.hash = `#/jobs${query({ status: status.value, task: task.value.trim(), queue: queue.value.trim() })}`; };
  status.addEventListener("change", apply);
  for (const input of [task, queue]) input.addEventListener("keydown", (e) => { if (e.key === "Enter") apply(); });
  const form = h("form", { class: "toolbar", onsubmit: (e) => { e.preventDefault(); if (search.value.trim()) location.hash = `#/job/${encodeURIComponent(search.value.trim())}`; } },
    status, task, queue, h("button", { type: "button", onclick: apply }, "Filter"), h("span", { class: "spacer" }), search,
    h("button", { type: "submit" }, "Open"));
  return form;
}

// -- one job ----------------------------------------------------------------------------

function jobView(id) {
  async function load() {
    let job;
    try {
      job = await get(`jobs/${encodeURIComponent(id)}`);
    } catch (error) {
      view.replaceChildren(h("h1", {}, "Job"), h("div", { class: "card empty" }, error.message));
      return;
    }
    const json = (value) => h("pre", {}, JSON.stringify(value, null, 2));
    const fields = [["status", badge(job.status)], ["task", job.task], ["queue", job.queue],
      ["priority", job.priority], ["due", time(job.execution_time)], ["created", time(job.created_at)],
      ["started", time(job.started_at)], ["finished", time(job.finished_at)],
      ["attempts", `${job.attempts} (max retries ${job.max_retries})`], ["timeout", job.timeout_seconds ? `${job.timeout_seconds}s` : "none"],
      ["worker", job.worker_id || "–"]];
    const attempts = h("tbody", {}, job.history.map((a) => h("tr", {},
      h("td", { class: "num" }, a.attempt), h("td", {}, badge(a.outcome)), h("td", {}, time(a.started_at)),
      h("td", { class: "num" }, a.duration_seconds === null ? "–" : `${a.duration_seconds}s`),
      h("td", { class: "mono" }, a.worker_id || "–"),
      h("td", {}, a.error ? h("div", {}, a.error) : "", a.traceback ? h("details", {}, h("summary", {}, "traceback"), h("pre", {}, a.traceback)) : ""))));
    view.replaceChildren(
      h("h1", { class: "mono" }, job.id),
      h("div", { class: "toolbar" }, jobActions(job), h("span", { class: "spacer" }), h("a", { href: "#/jobs" }, "all jobs")),
      h("div", { class: "grid2" },
        h("div", { class: "card" }, h("dl", { class: "fields" }, fields.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]))),
        h("div", { class: "card" }, h("dl", { class: "fields" },
          h("dt", {}, "args"), h("dd", {}, json(job.args)), h("dt", {}, "kwargs"), h("dd", {}, json(job.kwargs)),
          h("dt", {}, "result"), h("dd", {}, json(job.result))))),
      h("h2", {}, "Attempts"),
      h("div", { class: "card" }, job.history.length ? h("table", { id: "attempts" }, h("thead", {}, h("tr", {},
        ["#", "outcome", "started", "took", "worker", "error"].map((c) => h("th", {}, c)))), attempts)
        : h("div", { class: "empty" }, "Not run yet.")));
  }
  load();
  return { onJob(job) { if (job.id === id) load(); }, onEvent(kind) { if (kind === "resync") load(); } };
}

// -- schedules --------------------------------------------------------------------------

function schedulesView() {
  const body = h("tbody");
  async function load() {
    const { schedules } = await get("schedules");
    body.replaceChildren(...schedules.map((s) => {
      const paused = s.state === "paused";
      const outcomes = h("span", { class: "dots" }, s.outcomes.map((o) =>
        h("a", { class: `dot s-${o.status}`, href: `#/job/${encodeURIComponent(o.id)}`, title: `${o.status} · ${o.execution_time}` })));
      return h("tr", { "data-id": s.id },
        h("td", { class: "mono" }, s.id), h("td", {}, s.task),
        h("td", { class: "mono" }, s.cron ? `${s.cron}${s.tz ? ` (${s.tz})` : ""}` : `every ${s.every}`),
        h("td", {}, s.next_fire_at ? time(s.next_fire_at) : h("span", { class: "muted" }, "–")),
        h("td", {}, s.outcomes.length ? outcomes : h("span", { class: "muted" }, "none yet")),
        h("td", {}, badge(s.state)), h("td", { class: "muted" }, s.origin),
        h("td", { class: "actions" },
          actionButton("Run now", () => post(`schedules/${encodeURIComponent(s.id)}/trigger`), (j) => `started ${j.id}`),
          actionButton(paused ? "Resume" : "Pause", () => post(`schedules/${encodeURIComponent(s.id)}/${paused ? "resume" : "pause"}`),
            () => { load(); return `${s.id} ${paused ? "resumed" : "paused"}`; })));
    }));
    if (!schedules.length) body.append(h("tr", {}, h("td", { colspan: 8, class: "empty" }, "No schedules. Add one with pgsched add TASK --cron ... --id NAME.")));
  }
  view.replaceChildren(h("h1", {}, "Schedules"), h("div", { class: "card" }, h("table", { id: "schedules-table" },
    h("thead", {}, h("tr", {}, ["id", "task", "schedule", "next fire", "last five", "state", "origin", ""].map((c) => h("th", {}, c)))), body)));
  load().catch((e) => toast(e.message, true));
  let timer = null;
  const soon = () => { clearTimeout(timer); timer = setTimeout(() => load().catch(() => {}), 300); };
  return { onJob(job) { if (job.id.includes("@")) soon(); }, onEvent(kind) { if (kind === "schedules" || kind === "resync") soon(); } };
}

// -- workers and queues -----------------------------------------------------------------

function workersView() {
  const workers = h("tbody");
  const queues = h("tbody");
  async function load() {
    const [list, { queues: rows }] = await Promise.all([get("workers"), get("queues")]);
    workers.replaceChildren(...list.map((w) => h("tr", {},
      h("td", { class: "mono" }, w.id), h("td", {}, `${w.host} · ${w.pid}`), h("td", {}, (w.queues || ["every queue"]).join(", ")),
      h("td", { class: "num" }, `${w.running}/${w.concurrency}`), h("td", {}, time(w.started_at)),
      h("td", { class: "num" }, `${w.heartbeat_age_seconds.toFixed(1)}s`), h("td", {}, badge(w.live ? "live" : "stale")))));
    if (!list.length) workers.append(h("tr", {}, h("td", { colspan: 7, class: "empty" }, "No worker registered. Start one with pgsched worker.")));
    queues.replaceChildren(...rows.map((q) => h("tr", { "data-queue": q.queue },
      h("td", { class: "mono" }, q.queue), h("td", {}, badge(q.paused ? "paused" : "active")),
      h("td", { class: "num" }, q.due + (q.capped ? "+" : "")), h("td", { class: "num" }, q.scheduled + (q.capped ? "+" : "")), h("td", { class: "num" }, q.running),
      h("td", { class: "num" }, q.lag_seconds == null ? "-" : `${q.lag_seconds.toFixed(1)}s`),
      h("td", { class: "muted" }, q.paused ? `by ${q.paused_by || "?"}${q.reason ? `: ${q.reason}` : ""}` : ""),
      h("td", { class: "actions" }, actionButton(q.paused ? "Resume" : "Pause",
        () => post(`queues/${encodeURIComponent(q.queue)}/${q.paused ? "resume" : "pause"}`),
        () => { load(); return `queue ${q.queue} ${q.paused ? "resumed" : "paused"}`; })))));
    if (!rows.length) queues.append(h("tr", {}, h("td", { colspan: 8, class: "empty" }, "No queue has pending or running jobs.")));
  }
  view.replaceChildren(
    h("h1", {}, "Workers"), h("div", { class: "card" }, h("table", { id: "workers-table" }, h("thead", {}, h("tr", {},
      ["id", "host · pid", "queues", "running", "started", "heartbeat", ""].map((c) => h("th", {}, c)))), workers)),
    h("h2", {}, "Queues"), h("div", { class: "card" }, h("table", { id: "queues-table" }, h("thead", {}, h("tr", {},
      ["queue", "state", "due", "scheduled", "running", "lag", "paused", ""].map((c) => h("th", {}, c)))), queues)));
  load().catch((e) => toast(e.message, true));
  let timer = null;
  const soon = () => { clearTimeout(timer); timer = setTimeout(() => load().catch(() => {}), 500); };
  const every = setInterval(soon, 5000); // heartbeats age even when nothing happens
  return { onJob: soon, onEvent: soon, stop() { clearInterval(every); } };
}

// -- routing and live updates -----------------------------------------------------------

function route() {
  current?.stop?.();
  const [path, search = ""] = location.hash.replace(/^#\/?/, "").split("?");
  const [name, ...rest] = path.split("/");
  const params = new URLSearchParams(search);
  for (const link of document.querySelectorAll("nav a[data-view]")) {
    link.classList.toggle("active", link.dataset.view === (name === "job" ? "jobs" : name || "jobs"));
  }
  if (name === "job" && rest.length) current = jobView(decodeURIComponent(rest.join("/")));
  else if (name === "failed") current = jobsView(params, { failed: true });
  else if (name === "schedules") current = schedulesView();
  else if (name === "workers") current = workersView();
  else current = jobsView(params);
}

window.addEventListener("hashchange", route);
route();
refreshStats().catch((e) => toast(e.message, true));
setInterval(statsSoon, 10000);

const live = document.getElementById("live");
subscribe({
  job: (job) => { current?.onJob?.(job); statsSoon(); },
  queues: (data) => current?.onEvent?.("queues", data),
  workers: (data) => current?.onEvent?.("workers", data),
  schedules: (data) => current?.onEvent?.("schedules", data),
  resync: () => { current?.onEvent?.("resync"); statsSoon(); },
}, (on) => { live.textContent = on ? "live" : "reconnecting"; live.className = `live ${on ? "on" : "off"}`; });
