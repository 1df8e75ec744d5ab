/* Win-Train dashboard: plain JavaScript over the JSON API, no build step. */
"use strict";

const KEY_NAME = "wintrain.apiKey";
const ROOT = document.body.dataset.root || "";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

// ---------------------------------------------------------------- helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const $ = (sel) => document.querySelector(sel);

function fmtNum(v, digits = 4) {
  if (v === null || v === undefined || v === "") return "–";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e6) ? v.toExponential(2) : v.toFixed(digits).replace(/\.?0+$/, "");
}

function fmtEta(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

function fmtTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

function fmtBytes(n) {
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function statusBadge(status) {
  return el("span", { class: `status ${status}`, text: status });
}

function formData(form) {
  const out = {};
  for (const [k, v] of new FormData(form).entries()) {
    if (typeof v === "string" && v.trim() === "") continue;
    if (k in out) out[k] = [].concat(out[k], v);
    else out[k] = v;
  }
  return out;  // unchecked boxes are absent; read plain on/off boxes with form.name.checked
}

function num(v) {
  return v === undefined || v === null || v === "" ? undefined : Number(v);
}

// ---------------------------------------------------------------- API key and requests

const WT = {
  key() { return sessionStorage.getItem(KEY_NAME) || ""; },
  setKey(k) { k ? sessionStorage.setItem(KEY_NAME, k) : sessionStorage.removeItem(KEY_NAME); showKeyState(); },
  headers(extra) {
    const h = Object.assign({}, extra || {});
    const k = WT.key();
    if (k) h["X-API-Key"] = k;
    return h;
  },
  async api(path, opts = {}) {
    const init = Object.assign({}, opts, { headers: WT.headers(opts.headers) });
    if (opts.json !== undefined) {
      init.body = JSON.stringify(opts.json);
      init.headers["Content-Type"] = "application/json";
      init.method = init.method || "POST";
      delete init.json;
    }
    const r = await fetch(ROOT + path, init);
    const text = await r.text();
    let body = text;
    try { body = text ? JSON.parse(text) : null; } catch (e) { /* not JSON */ }
    if (!r.ok) {
      const msg = body && body.error ? body.error.message : `${r.status} ${r.statusText}`;
      if (r.status === 401) keyNeeded(msg);
      const err = new Error(msg);
      err.status = r.status;
      err.body = body;
      throw err;
    }
    return body;
  },
  // Server-sent events over fetch (EventSource cannot send the key header); calls onEvent(type, data, id).
  async sse(path, opts, onEvent) {
    const init = Object.assign({}, opts || {}, { headers: WT.headers(Object.assign({ Accept: "text/event-stream" }, (opts || {}).headers)) });
    if (init.json !== undefined) {
      init.body = JSON.stringify(init.json);
      init.headers["Content-Type"] = "application/json";
      init.method = "POST";
      delete init.json;
    }
    const r = await fetch(ROOT + path, init);
    if (!r.ok) {
      let msg = `${r.status} ${r.statusText}`;
      try { msg = (await r.json()).error.message; } catch (e) { /* keep the status */ }
      if (r.status === 401) keyNeeded(msg);
      throw new Error(msg);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        let type = "message", id = null;
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue;
          const i = line.indexOf(":");
          const field = i < 0 ? line : line.slice(0, i);
          const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
          if (field === "event") type = val;
          else if (field === "data") data.push(val);
          else if (field === "id") id = val;
        }
        if (data.length) onEvent(type, data.join("\n"), id);
      }
    }
  },
  async download(path, name) {
    const r = await fetch(ROOT + path, { headers: WT.headers() });
    if (!r.ok) {
      let msg = `${r.status}`;
      try { msg = (await r.json()).error.message; } catch (e) { /* keep */ }
      if (r.status === 401) keyNeeded(msg);
      throw new Error(msg);
    }
    const url = URL.createObjectURL(await r.blob());
    const a = el("a", { href: url, download: name });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  },
  charts: {},
};
window.WT = WT;

function banner(msg) {
  const b = $("#banner");
  if (!msg) { b.hidden = true; b.textContent = ""; return; }
  b.textContent = msg;
  b.hidden = false;
}

function keyNeeded(msg) {
  banner(`${msg} Enter the API key at the top right; it is kept in this tab only.`);
  $("#api-key").focus();
}

function showKeyState() {
  $("#key-state").textContent = WT.key() ? "key set" : "";
  $("#api-key").placeholder = WT.key() ? "••••••••" : "not set";
}

function fail(where) {
  return (err) => { console.warn(err); banner(`${where}: ${err.message}`); };
}

$("#key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  WT.setKey($("#api-key").value.trim());
  $("#api-key").value = "";
  location.reload();  // every request of the page goes again, now with the key
});
$("#key-clear").addEventListener("click", () => WT.setKey(""));

// ---------------------------------------------------------------- shared lookups

async function fillDatasetList(datalist) {
  const files = await WT.api("/api/data/files");
  datalist.replaceChildren(...files.items.map((f) => el("option", { value: f.file_path })));
}

async function modelIds() {
  const [models, trained] = await Promise.all([
    WT.api("/v1/models"),
    WT.api("/api/train/tasks?kind=train&status=succeeded&limit=500"),
  ]);
  const trainedIds = new Map(trained.items.map((t) => [t.id, t]));
  return models.data.map((m) => ({ id: m.id, created: m.created, task: trainedIds.get(m.id) || null }));
}

function modelLabel(m) {
  if (!m.task) return `${m.id} (base)`;
  const req = m.task.request.train || m.task.request;
  return `${m.id.slice(0, 8)}… ${req.strategy || ""} on ${(req.dataset_path || "").split("/").slice(-2).join("/")}`;
}

// ---------------------------------------------------------------- Tasks page

let tasksTimer = null;

async function refreshTasks() {
  const form = $("#task-filter");
  const params = new URLSearchParams({ limit: "100" });
  for (const k of ["status", "kind"]) if (form[k].value) params.set(k, form[k].value);
  const page = await WT.api(`/api/train/tasks?${params}`);
  $("#tasks-count").textContent = `${page.items.length} of ${page.total}`;
  const rows = page.items.map((t) => el("tr", { "data-task-id": t.id, "data-status": t.status },
    el("td", {}, el("a", { href: `${ROOT}/ui/tasks/${t.id}` }, el("code", { text: t.id }))),
    el("td", { text: t.kind }),
    el("td", {}, statusBadge(t.status)),
    el("td", {}, el("div", { class: "progress", title: `${fmtNum(t.progress, 1)}%` },
      el("div", { style: `width:${Math.min(100, t.progress || 0)}%` })), ` ${fmtNum(t.progress, 1)}%`),
    el("td", { text: t.total_steps ? `${t.current_step}/${t.total_steps}` : t.current_step || "–" }),
    el("td", { class: "loss", text: fmtNum(t.loss) }),
    el("td", { text: TERMINAL.has(t.status) ? "–" : fmtEta(t.eta_seconds) }),
    el("td", { text: fmtTime(t.created_at) }),
    el("td", {}, TERMINAL.has(t.status) ? null : el("button", {
      type: "button", class: "cancel", text: "Cancel",
      onclick: async (e) => {
        e.target.disabled = true;
        try { await WT.api(`/api/train/cancel/${t.id}`, { method: "POST" }); } catch (err) { fail("cancel")(err); }
        refreshTasks().catch(fail("tasks"));
      },
    })),
  ));
  $("#tasks-body").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 9, class: "muted", text: "no tasks" }))]));
}

function initTasks() {
  const form = $("#task-filter");
  form.onchange = () => refreshTasks().catch(fail("tasks"));
  const loop = async () => {
    try { await refreshTasks(); } catch (err) { fail("tasks")(err); }
    clearTimeout(tasksTimer);
    tasksTimer = setTimeout(loop, 2000);
  };
  loop();
  fillDatasetList($("#dataset-files")).catch(() => {});
  const preset = new URLSearchParams(location.search).get("dataset");
  const train = $("#train-form");
  if (preset) train.dataset_path.value = preset;
  train.onsubmit = async (e) => {
    e.preventDefault();
    const f = formData(train);
    const config = { max_steps: num(f.max_steps), learning_rate: num(f.learning_rate), per_device_train_batch_size: num(f.per_device_train_batch_size) };
    if (f.eval_dataset_path) config.eval_dataset_path = f.eval_dataset_path;
    if (f.eval_steps) config.eval_steps = num(f.eval_steps);
    if (f.report_to) config.report_to = f.report_to;
    try {
      const started = await WT.api("/api/train/start", { json: { strategy: f.strategy, dataset_path: f.dataset_path, config } });
      $("#train-result").textContent = `started ${started.task_id}`;
      location.href = `${ROOT}/ui/tasks/${started.task_id}`;
    } catch (err) {
      $("#train-result").textContent = `could not start: ${err.message}`;
    }
  };
}

// ---------------------------------------------------------------- one task's page

const CURVES = [
  ["loss", "Train loss", "#2563eb"],
  ["eval_loss", "Eval loss", "#db2777"],
  ["learning_rate", "Learning rate", "#059669"],
  ["tokens_per_second", "Tokens/s", "#d97706"],
];

function makeChart(key, label, color) {
  const box = $(`#chart-${key}`);
  const data = [[], []];
  const plot = new uPlot({
    width: Math.max(280, box.clientWidth - 2),
    height: 200,
    scales: { x: { time: false } },
    axes: [{ label: "step" }, { size: 60, values: (u, vals) => vals.map((v) => fmtNum(v, 4)) }],
    series: [{ label: "step" }, { label, stroke: color, width: 2, points: { show: true, size: 5 } }],
  }, data, box);
  return { plot, data, points: new Map() };
}

function addPoint(key, step, value) {
  const chart = WT.charts[key];
  if (!chart || value === null || value === undefined || Number.isNaN(value)) return;
  chart.points.set(step, value);  // a step seen twice (replayed stream) keeps one point
  const steps = [...chart.points.keys()].sort((a, b) => a - b);
  chart.data = [steps, steps.map((s) => chart.points.get(s))];
  chart.plot.setData(chart.data);
  $(`#points-${key}`).textContent = `${steps.length} point${steps.length === 1 ? "" : "s"}`;
}

function renderTask(t) {
  const status = $("#task-status");
  status.replaceWith(Object.assign(statusBadge(t.status), { id: "task-status" }));
  $("#task-progress-bar").style.width = `${Math.min(100, t.progress || 0)}%`;
  $("#task-progress").textContent = `${fmtNum(t.progress, 1)}%` + (t.total_steps ? ` · step ${t.current_step}/${t.total_steps}` : "");
  $("#task-cancel").hidden = TERMINAL.has(t.status);
  const items = [
    ["Kind", t.kind], ["Loss", fmtNum(t.loss)], ["Learning rate", fmtNum(t.learning_rate)],
    ["Tokens/s", fmtNum(t.tokens_per_second, 1)], ["Epoch", fmtNum(t.epoch, 2)],
    ["ETA", TERMINAL.has(t.status) ? "–" : fmtEta(t.eta_seconds)], ["Created", fmtTime(t.created_at)],
    ["Started", fmtTime(t.started_at)], ["Finished", fmtTime(t.finished_at)], ["Output", t.output_dir || "–"],
  ];
  $("#task-summary").replaceChildren(...items.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", { text: v }))));
  $("#task-error").hidden = !t.error;
  $("#task-error").textContent = t.error || "";
  $("#task-request").textContent = JSON.stringify(t.request, null, 2);
  const flat = flatten(t.metrics || {});
  $("#task-metrics").replaceChildren(...(flat.length ? flat : [["", "no metrics yet"]]).map(([k, v]) => el("tr", {}, el("td", { text: k }), el("td", { text: fmtNum(v) }))));
  const link = $("#task-eval-link");
  link.hidden = t.kind !== "eval";
  link.href = `${ROOT}/ui/evals?task=${t.id}`;
}

function flatten(obj, prefix = "") {
  const out = [];
  for (const [k, v] of Object.entries(obj)) {
    if (v && typeof v === "object" && !Array.isArray(v)) out.push(...flatten(v, `${prefix}${k}.`));
    else out.push([`${prefix}${k}`, Array.isArray(v) ? JSON.stringify(v) : v]);
  }
  return out;
}

function appendLog(ev) {
  const pre = $("#task-logs");
  const time = new Date(ev.created_at).toLocaleTimeString();
  const stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  pre.append(`${time} [${ev.type}] ${ev.message || ""}\n`);
  if (stick) pre.scrollTop = pre.scrollHeight;
}

async function refreshFiles(taskId) {
  const body = $("#task-files tbody");
  try {
    const files = await WT.api(`/api/tasks/${taskId}/files`);
    body.replaceChildren(...files.items.map((f) => el("tr", {},
      el("td", {}, el("code", { text: f.path })),
      el("td", { text: fmtBytes(f.size_bytes) }),
      el("td", { text: fmtTime(f.modified_at) }),
      el("td", {}, el("button", {
        type: "button", text: "Download",
        onclick: () => WT.download(`/api/tasks/${taskId}/files/${f.path.split("/").map(encodeURIComponent).join("/")}`, f.path.split("/").pop()).catch(fail("download")),
      })),
    )));
    $("#task-files-note").textContent = `${files.items.length} file(s) in ${files.output_dir}${files.truncated ? " (list truncated)" : ""}`;
  } catch (err) {
    body.replaceChildren();
    $("#task-files-note").textContent = err.message;
  }
}

async function initTask() {
  const taskId = document.body.dataset.taskId;
  for (const [key, label, color] of CURVES) WT.charts[key] = makeChart(key, label, color);
  let task;
  try {
    task = await WT.api(`/api/train/status/${taskId}`);
  } catch (err) {
    fail("task")(err);
    return;
  }
  renderTask(task);
  refreshFiles(taskId);
  $("#task-cancel").onclick = async () => {
    try { renderTask(await WT.api(`/api/train/cancel/${taskId}`, { method: "POST" })); } catch (err) { fail("cancel")(err); }
  };
  // Progress (step, ETA) changes without events: poll the row while the stream runs.
  let ended = false;
  const poll = async () => {
    if (ended) return;
    try { renderTask(await WT.api(`/api/train/status/${taskId}`)); } catch (err) { /* the stream reports */ }
    setTimeout(poll, 1500);
  };
  setTimeout(poll, 1500);
  const state = $("#stream-state");
  state.textContent = TERMINAL.has(task.status) ? "(stored events)" : "(live)";
  $("#task-logs").textContent = "";
  try {
    await WT.sse(`/api/train/events/${taskId}`, {}, (type, raw) => {
      const ev = JSON.parse(raw);
      if (type === "end") {
        ended = true;
        renderTask(ev);
        refreshFiles(taskId);
        state.textContent = `(${ev.status})`;
        return;
      }
      appendLog(ev);
      const d = ev.data || {};
      if (type === "metrics" && d.step !== undefined) {
        addPoint("loss", d.step, d.loss);
        addPoint("learning_rate", d.step, d.learning_rate);
        addPoint("tokens_per_second", d.step, d.tokens_per_second);
      } else if (type === "eval" && d.step !== undefined) {
        addPoint("eval_loss", d.step, d.eval_loss);
      } else if (type === "checkpoint") {
        refreshFiles(taskId);
      }
    });
  } catch (err) {
    state.textContent = `(stream stopped: ${err.message})`;
  }
  ended = true;
}

// ---------------------------------------------------------------- Datasets page

const preview = { file: null, offset: 0, limit: 20 };

async function refreshDatasetFiles() {
  const files = await WT.api("/api/data/files");
  $("#dataset-files tbody").replaceChildren(...files.items.map((f) => el("tr", {},
    el("td", {}, el("code", { text: f.file_path })),
    el("td", { text: fmtBytes(f.size_bytes) }),
    el("td", {},
      el("button", { type: "button", text: "Validate", onclick: () => validateFile(f.file_path) }), " ",
      el("button", { type: "button", text: "Preview", onclick: () => showPreview(f.file_path, 0) }), " ",
      el("button", { type: "button", text: "Process", onclick: () => useForProcess(f.file_path) }), " ",
      el("a", { href: `${ROOT}/ui?dataset=${encodeURIComponent(f.file_path)}`, text: "Train" })),
  )));
}

function useForProcess(path) {
  const form = $("#process-form");
  form.input_file.value = path;
  if (!form.output_dir.value) form.output_dir.value = `processed/${path.split("/").pop().replace(/\.jsonl?$/, "")}`;
  form.scrollIntoView({ behavior: "smooth" });
}

async function validateFile(path) {
  const r = await WT.api("/api/data/validate", { json: { file_path: path } }).catch(fail("validate"));
  if (!r) return;
  $("#report").hidden = false;
  $("#report-file").textContent = path;
  $("#report-total").textContent = r.total;
  $("#report-valid").textContent = r.valid_count;
  $("#report-invalid").textContent = r.invalid_count;
  $("#report-verdict").textContent = r.valid ? "valid" : "has errors";
  $("#report-formats").replaceChildren(...Object.entries(r.formats).map(([k, v]) => el("tr", {}, el("td", { text: k }), el("td", { text: v }))));
  const s = r.token_stats;
  const stats = s ? [["min", s.min], ["mean", s.mean], ["median", s.median], ["p95", s.p95], ["max", s.max], ["max_length", s.max_length], ["over max_length", s.over_max_length]] : [["", "no valid records"]];
  $("#report-stats").replaceChildren(...stats.map(([k, v]) => el("tr", {}, el("td", { text: k }), el("td", { text: fmtNum(v, 2) }))));
  const hist = $("#report-histogram");
  const bins = (s && s.histogram) || [];
  const top = Math.max(1, ...bins.map((b) => b.count));
  hist.replaceChildren(...bins.map((b) => el("div", {
    class: "bar", style: `height:${(100 * b.count) / top}%`, title: `${b.start}–${b.end - 1} tokens: ${b.count}`,
  }, el("span", { text: b.count || "" }))));
  const axis = hist.nextElementSibling && hist.nextElementSibling.classList.contains("histogram-axis") ? hist.nextElementSibling : null;
  const ticks = el("div", { class: "histogram-axis" }, el("span", { text: bins.length ? bins[0].start : "" }), el("span", { text: bins.length ? `${bins[bins.length - 1].end - 1} tokens` : "" }));
  if (axis) axis.replaceWith(ticks); else hist.after(ticks);
  $("#report-errors tbody").replaceChildren(...(r.errors.length ? r.errors.map((e) => el("tr", {}, el("td", { text: e.line }), el("td", { text: e.reason })))
    : [el("tr", {}, el("td", { colspan: 2, class: "muted", text: "no errors" }))]));
  $("#report-errors-note").textContent = r.errors_truncated ? `(first ${r.errors.length} of ${r.invalid_count})` : "";
  $("#report").scrollIntoView({ behavior: "smooth" });
}

async function showPreview(path, offset) {
  const p = await WT.api(`/api/data/preview?${new URLSearchParams({ file_path: path, offset, limit: preview.limit })}`).catch(fail("preview"));
  if (!p) return;
  Object.assign(preview, { file: path, offset });
  $("#preview").hidden = false;
  $("#preview-file").textContent = path;
  $("#preview-range").textContent = p.items.length ? `records ${offset + 1}–${offset + p.items.length}` : "no records";
  $("#preview-prev").disabled = offset === 0;
  $("#preview-next").disabled = p.next_offset === null;
  $("#preview-table tbody").replaceChildren(...p.items.map((r) => el("tr", { class: r.error ? "bad" : "" },
    el("td", { text: r.line }),
    el("td", { text: r.format || "invalid" }),
    el("td", {}, r.error ? el("span", { class: "error", text: r.error })
      : r.messages.map((m) => el("div", { class: "msg" }, el("b", { text: m.role }), m.content))),
  )));
}

function initDatasets() {
  refreshDatasetFiles().catch(fail("datasets"));
  $("#preview-prev").onclick = () => showPreview(preview.file, Math.max(0, preview.offset - preview.limit));
  $("#preview-next").onclick = () => showPreview(preview.file, preview.offset + preview.limit);
  const upload = $("#upload-form");
  upload.onsubmit = async (e) => {
    e.preventDefault();
    const body = new FormData();
    body.append("file", $("#upload-file").files[0]);
    body.append("overwrite", upload.overwrite.checked ? "true" : "false");
    try {
      const r = await WT.api("/api/data/upload", { method: "POST", body });
      const rel = r.file_path.split("/").slice(-2).join("/");
      $("#upload-result").textContent = `stored ${rel} (${fmtBytes(r.size_bytes)})`;
      await refreshDatasetFiles();
      useForProcess(rel);
      await validateFile(rel);
    } catch (err) {
      $("#upload-result").textContent = `upload failed: ${err.message}`;
    }
  };
  const proc = $("#process-form");
  proc.onsubmit = async (e) => {
    e.preventDefault();
    const f = formData(proc);
    const req = {
      input_file: f.input_file, output_dir: f.output_dir, overwrite: proc.overwrite.checked,
      split_config: { train_ratio: num(f.train_ratio), val_ratio: num(f.val_ratio), test_ratio: num(f.test_ratio), seed: num(f.seed) },
    };
    try {
      const r = await WT.api("/api/data/process", { json: req });
      const out = $("#process-result");
      out.replaceChildren(
        el("p", {}, `kept ${r.kept} of ${r.total} (${r.invalid_dropped} invalid, ${r.duplicates_dropped} duplicates dropped)`),
        el("table", { id: "process-splits" }, el("tbody", {}, Object.entries(r.splits).map(([name, s]) => {
          const rel = `${f.output_dir.replace(/\/$/, "")}/${name}.jsonl`;
          return el("tr", {}, el("td", { text: name }), el("td", { text: s.count }), el("td", {}, el("code", { text: rel })),
            el("td", {}, el("button", { type: "button", text: "Preview", onclick: () => showPreview(rel, 0) }), " ",
              name === "train" ? el("a", { href: `${ROOT}/ui?dataset=${encodeURIComponent(rel)}`, text: "Train on it" }) : null));
        }))),
      );
      refreshDatasetFiles().catch(() => {});
    } catch (err) {
      $("#process-result").replaceChildren(el("p", { class: "error", text: `process failed: ${err.message}` }));
    }
  };
}

// ---------------------------------------------------------------- Models page

const chat = { history: [], abort: null };

async function initModels() {
  let models;
  try { models = await modelIds(); } catch (err) { fail("models")(err); return; }
  $("#models-table tbody").replaceChildren(...models.map((m) => el("tr", {},
    el("td", {}, m.task ? el("a", { href: `${ROOT}/ui/tasks/${m.id}` }, el("code", { text: m.id })) : el("code", { text: m.id })),
    el("td", { text: m.task ? `trained (${(m.task.request.train || {}).strategy || "?"})` : "base" }),
    el("td", { text: new Date(m.created * 1000).toLocaleString() }),
  )));
  const select = $("#chat-model");
  select.replaceChildren(...models.map((m) => el("option", { value: m.id, text: modelLabel(m) })));
  const wanted = new URLSearchParams(location.search).get("model");
  if (wanted) select.value = wanted;
  $("#chat-reset").onclick = () => { chat.history = []; $("#chat-log").replaceChildren(); $("#chat-meta").textContent = ""; };
  $("#chat-stop").onclick = () => chat.abort && chat.abort.abort();
  $("#chat-form").onsubmit = sendChat;
  $("#chat-input").onkeydown = (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#chat-form").requestSubmit(); } };
}

async function sendChat(e) {
  e.preventDefault();
  const input = $("#chat-input");
  const text = input.value.trim();
  if (!text || chat.abort) return;
  const settings = formData($("#chat-settings"));
  const log = $("#chat-log");
  chat.history.push({ role: "user", content: text });
  log.append(el("div", { class: "bubble user", text }));
  input.value = "";
  const bubble = el("div", { class: "bubble assistant streaming" });
  log.append(bubble);
  const messages = (settings.system ? [{ role: "system", content: settings.system }] : []).concat(chat.history);
  const body = { model: settings.model, messages, temperature: num(settings.temperature), max_tokens: num(settings.max_tokens) };
  chat.abort = new AbortController();
  $("#chat-send").disabled = true;
  $("#chat-stop").hidden = false;
  let answer = "";
  const started = performance.now();
  try {
    await WT.sse("/api/inference/chat/stream", { json: body, signal: chat.abort.signal }, (type, raw) => {
      const d = JSON.parse(raw);
      if (type === "delta") {
        answer += d.content;
        bubble.textContent = answer;
        log.scrollTop = log.scrollHeight;
      } else if (type === "done") {
        const u = d.usage || {};
        const secs = (performance.now() - started) / 1000;
        $("#chat-meta").textContent = `${d.finish_reason} · ${u.completion_tokens ?? "?"} tokens in ${secs.toFixed(1)}s`;
      } else if (type === "error") {
        bubble.classList.add("error");
        bubble.textContent = `${answer}\n[error: ${d.message}]`;
      }
    });
  } catch (err) {
    if (err.name === "AbortError") $("#chat-meta").textContent = "stopped";
    else { bubble.classList.add("error"); bubble.textContent = `${answer}${answer ? "\n" : ""}[${err.message}]`; }
  } finally {
    bubble.classList.remove("streaming");
    bubble.dataset.done = "1";
    chat.history.push({ role: "assistant", content: answer });
    chat.abort = null;
    $("#chat-send").disabled = false;
    $("#chat-stop").hidden = true;
  }
}

// ---------------------------------------------------------------- Evaluations page

let evalsTimer = null;

async function refreshEvals(selected) {
  const page = await WT.api("/api/train/tasks?kind=eval&limit=100");
  $("#evals-table tbody").replaceChildren(...(page.items.length ? page.items.map((t) => {
    const req = t.request.eval || {};
    return el("tr", { class: t.id === selected ? "selected" : "", "data-task-id": t.id },
      el("td", {}, el("a", { href: `?task=${t.id}`, onclick: (e) => { e.preventDefault(); history.replaceState(null, "", `?task=${t.id}`); showEval(t.id); } }, el("code", { text: t.id.slice(0, 12) + "…" }))),
      el("td", {}, statusBadge(t.status)),
      el("td", { text: req.model || req.model_path || "base" }),
      el("td", { text: req.compare_with || "–" }),
      el("td", { text: req.dataset_path || "" }));
  }) : [el("tr", {}, el("td", { colspan: 5, class: "muted", text: "no evaluations yet" }))]));
  return page.items;
}

async function showEval(taskId) {
  const section = $("#eval-detail");
  section.hidden = false;
  clearTimeout(evalsTimer);
  const t = await WT.api(`/api/train/status/${taskId}`).catch(fail("evaluation"));
  if (!t) return;
  refreshEvals(taskId).catch(() => {});
  $("#eval-task-id").textContent = t.id;
  $("#eval-task-link").href = `${ROOT}/ui/tasks/${t.id}`;
  $("#eval-status").replaceWith(Object.assign(statusBadge(t.status), { id: "eval-status" }));
  const mhead = $("#eval-metrics thead"), mbody = $("#eval-metrics tbody");
  const ehead = $("#eval-examples thead"), ebody = $("#eval-examples tbody");
  if (!TERMINAL.has(t.status)) {
    mhead.replaceChildren();
    mbody.replaceChildren(el("tr", {}, el("td", { class: "muted", text: `${t.status} · ${fmtNum(t.progress, 1)}%` })));
    ebody.replaceChildren();
    evalsTimer = setTimeout(() => showEval(taskId), 2000);
    return;
  }
  if (t.status !== "succeeded") {
    mhead.replaceChildren();
    mbody.replaceChildren(el("tr", {}, el("td", { class: "error", text: t.error || t.status })));
    ebody.replaceChildren();
    return;
  }
  const res = t.metrics || {};
  const primary = res.metrics || {};
  const other = (res.compare_with || {}).metrics || null;
  const names = [res.model || "model"].concat(other ? [res.compare_with.model] : []);
  mhead.replaceChildren(el("tr", {}, el("th", { text: "metric" }), names.map((n) => el("th", { text: n })), other ? el("th", { text: "difference" }) : null));
  mbody.replaceChildren(...Object.keys(primary).map((k) => {
    const d = res.delta ? res.delta[k] : undefined;
    const better = res.better ? res.better[k] : undefined;
    return el("tr", {}, el("td", { text: k }), el("td", { text: fmtNum(primary[k]) }),
      other ? el("td", { text: fmtNum(other[k]) }) : null,
      other ? el("td", { class: better === undefined || !d ? "" : better ? "better" : "worse", text: d === undefined ? "–" : `${d > 0 ? "+" : ""}${fmtNum(d)}` }) : null);
  }));
  let details = null;
  try { details = await WT.api(`/api/tasks/${t.id}/files/evaluation_results.json`); } catch (err) { /* no file */ }
  const preds = (details && details.predictions) || [];
  const cmp = (details && details.compare_predictions) || [];
  $("#eval-examples-note").textContent = preds.length ? `${preds.length} records` : "(no generated answers: add accuracy, bleu or rouge_l)";
  ehead.replaceChildren(el("tr", {}, el("th", { text: "#" }), el("th", { text: "prompt" }), el("th", { text: "reference" }),
    el("th", { text: names[0] }), cmp.length ? el("th", { text: names[1] }) : null));
  ebody.replaceChildren(...preds.map((p, i) => el("tr", {},
    el("td", { text: p.index + 1 }), el("td", { text: p.prompt }), el("td", { text: p.reference }),
    el("td", { class: p.correct ? "yes" : "no", text: p.prediction }),
    cmp.length ? el("td", { class: cmp[i] && cmp[i].correct ? "yes" : "no", text: cmp[i] ? cmp[i].prediction : "" }) : null)));
}

async function initEvals() {
  const selected = new URLSearchParams(location.search).get("task");
  refreshEvals(selected).catch(fail("evaluations"));
  fillDatasetList($("#eval-dataset-files")).catch(() => {});
  try {
    const models = await modelIds();
    for (const select of document.querySelectorAll(".model-select")) {
      const opts = models.map((m) => el("option", { value: m.id, text: modelLabel(m) }));
      select.replaceChildren(...(select.dataset.optional ? [el("option", { value: "", text: "(none)" })] : []), ...opts);
    }
    const trained = models.filter((m) => m.task);
    const form = $("#eval-form");
    if (trained.length) {  // the usual question: the newest fine-tune against its base
      form.model.value = trained[trained.length - 1].id;
      form.compare_with.value = models.find((m) => !m.task)?.id || "";
    }
  } catch (err) { fail("models")(err); }
  if (selected) showEval(selected);
  const form = $("#eval-form");
  form.onsubmit = async (e) => {
    e.preventDefault();
    const f = formData(form);
    const req = {
      dataset_path: f.dataset_path, model: f.model, accuracy_mode: f.accuracy_mode,
      metrics: [].concat(f.metrics || []), max_samples: num(f.max_samples), generation: { max_tokens: num(f.max_tokens), temperature: 0 },
    };
    if (f.compare_with) req.compare_with = f.compare_with;
    try {
      const r = await WT.api("/api/eval/evaluate", { json: req });
      $("#eval-result").textContent = `queued ${r.task_id}`;
      history.replaceState(null, "", `?task=${r.task_id}`);
      showEval(r.task_id);
    } catch (err) {
      $("#eval-result").textContent = `could not start: ${err.message}`;
    }
  };
}

// ---------------------------------------------------------------- start

const PAGES = { tasks: initTasks, task: initTask, datasets: initDatasets, models: initModels, evals: initEvals };
showKeyState();
(PAGES[document.body.dataset.page] || (() => {}))();
