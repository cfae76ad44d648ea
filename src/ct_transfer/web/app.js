// ct-transfer serve: the page. Vanilla JS, no build step; talks only to this server's JSON API.
"use strict";

const state = { runs: [], rows: [], patients: [], sort: { key: null, dir: 1 } };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

const pct = (v) => (v === null || v === undefined ? "—" : (100 * v).toFixed(1) + "%");
const num = (v, d = 4) => (v === null || v === undefined ? "—" : Number(v).toFixed(d));

function currentRun() {
  return state.runs.find((r) => r.name === $("run").value) || state.runs[0];
}

function thresholdText(run) {
  if (run.threshold === null || run.threshold === undefined) return "argmax (no threshold set)";
  return `p(${run.positive_class}) ≥ ${num(run.threshold, 3)}`;
}

// ---- run card --------------------------------------------------------------------------------
function metricCell(row, key) {
  const v = row[key];
  if (key === "n") return v === undefined ? "—" : String(v);
  const ci = (row.ci95 || {})[key];
  return ci ? `${num(v, 3)} [${num(ci[0], 3)}, ${num(ci[1], 3)}]` : num(v, 3);
}

function metricsTable(rows) {
  const keys = ["accuracy", "recall", "specificity", "f1", "roc_auc", "n"];
  const head = el("tr", {}, el("th", { text: "set" }), ...keys.map((k) => el("th", { text: k.replace("_", "-") })));
  const body = rows.map(([name, row]) => el("tr", {}, el("td", { text: name }),
    ...keys.map((k) => el("td", { class: "num", text: metricCell(row, k) }))));
  return el("table", { class: "metrics" }, el("thead", {}, head), el("tbody", {}, ...body));
}

function renderCard() {
  const run = currentRun();
  const card = $("card");
  card.replaceChildren();
  if (!run) return;
  const values = Object.entries(run.recipe || {}).map(([k, v]) => `${k} ${v}`).join(" · ");
  const recipe = `${run.recipe_name || "no named recipe (options given one by one)"}${values ? " — " + values : ""}`;
  const facts = [
    ["Model", `${run.model} · weights ${run.weights} · input ${run.image_size}×${run.image_size}`],
    ["Training data", run.data || "—"],
    ["Recipe", recipe],
    ["Preprocessing", run.preprocess],
    ["Classes", run.classes.join(", ")],
    ["Decision", `${thresholdText(run)} · temperature ${num(run.temperature, 3)}`],
  ];
  const dl = el("dl", { class: "facts" });
  for (const [k, v] of facts) dl.append(el("dt", { text: k }), el("dd", { text: v }));
  card.append(el("h2", { text: `Run ${run.name}` }), dl);
  for (const w of run.warnings) card.append(el("p", { class: "warning", text: w }));
  if (run.model_card) {  // intended use, data, metrics, what was not measured: the run's own model card
    const details = el("details", { class: "model-card" });
    details.append(el("summary", { text: "Model card" }), el("pre", { class: "small", text: run.model_card }));
    card.append(details);
  }
  const rows = Object.entries(run.internal).map(([s, m]) => [`internal ${s}`, m]);
  for (const e of run.external) rows.push([`${e.independent === false ? "NOT external (near-duplicates)" : "external"}: ${e.name}`, e.metrics]);
  if (rows.length) {
    card.append(el("h3", { text: "Metrics (95% intervals where recorded)" }), metricsTable(rows));
  }
}

// ---- upload ------------------------------------------------------------------------------------
function showMessages(list) {
  const ul = $("messages");
  ul.replaceChildren(...list.map((m) => el("li", { text: m })));
}

function detailText(body, status) {
  if (body && typeof body.detail === "string") return body.detail;
  if (body && Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join("; ");
  return `the server answered ${status}`;
}

// opts (re-analysis with another DICOM window): run, method, overlay, window, replace
async function upload(fileList, opts = {}) {
  const files = Array.from(fileList || []);
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  form.append("run", opts.run || currentRun().name);
  form.append("method", opts.method || $("method").value);
  form.append("overlay", (opts.overlay ?? $("overlay").checked) ? "true" : "false");
  const win = opts.window !== undefined ? opts.window : windowValue();
  if (win) form.append("window", win);
  $("status").textContent = `Analysing ${files.length} file${files.length > 1 ? "s" : ""}…`;
  showMessages([]);
  document.body.classList.add("busy");
  try {
    const resp = await fetch("/api/predict", { method: "POST", body: form });
    let body = null;
    try { body = await resp.json(); } catch (_) { body = null; }
    if (!resp.ok) {
      $("status").textContent = "";
      showMessages([detailText(body, resp.status)]);
      return;
    }
    addResults(body, files, opts.replace);
    addPatients(body);
    $("status").textContent = `${body.results.length} image${body.results.length === 1 ? "" : "s"} classified` +
      (body.patients && body.patients.length ? `, ${body.patients.length} scan${body.patients.length === 1 ? "" : "s"}` : "") +
      (body.errors.length ? `, ${body.errors.length} refused` : "") + ".";
    showMessages(body.errors.map((e) => e.error));
  } catch (err) {
    $("status").textContent = "";
    showMessages(["The server could not be reached: " + err.message]);
  } finally {
    document.body.classList.remove("busy");
    $("files").value = "";
  }
}

// ---- results table -------------------------------------------------------------------------
function addResults(body, files = [], replace = false) {
  for (const r of body.results) {
    // the uploaded file a result came from (a zip's members are named zip/inner/path): kept to
    // re-request it with another DICOM window
    const source = files.find((f) => r.name === f.name || r.name.startsWith(f.name + "/")) || null;
    const row = {
      file: r.name, run: body.run, pred: r.label, probabilities: r.probabilities, classes: body.classes,
      threshold: body.threshold, positive: body.positive_class, temperature: body.temperature,
      method: body.method, input: r.input, overlay: r.overlay || null, explained: r.explained_class || null,
      shift: r.shift_score ?? null, inDist: r.in_distribution ?? null, guard: body.shift_guard || null,
      image: r.image || null, heatmap: r.heatmap || null, dicom: !!r.dicom, window: body.window || null, source,
    };
    const at = replace ? state.rows.findIndex((x) => x.run === row.run && x.file === row.file) : -1;
    if (at >= 0) state.rows[at] = row; else state.rows.push(row);
  }
  renderTable();
}

// ---- DICOM window / level ----------------------------------------------------------------------
function windowValue() {
  if ($("window-preset").value === "") return "";
  const w = Number($("window-width").value), l = Number($("window-level").value);
  if ($("window-width").value === "" || $("window-level").value === "" || !(w > 0)) return "";
  return `${w},${l}`;
}

function choosePreset() {
  const v = $("window-preset").value;
  if (v === "" || v === "custom") {
    if (v === "") { $("window-width").value = ""; $("window-level").value = ""; }
    return;
  }
  const [w, l] = v.split(",");
  $("window-width").value = w;
  $("window-level").value = l;
}

// every DICOM row again, from its uploaded file, with the window chosen (same run, method, overlay)
async function applyWindow() {
  const groups = new Map();
  for (const r of state.rows) {
    if (!r.dicom || !r.source) continue;
    const key = `${r.run}\u0000${r.method || ""}`;
    if (!groups.has(key)) groups.set(key, { run: r.run, method: r.method, files: [] });
    const g = groups.get(key);
    if (!g.files.includes(r.source)) g.files.push(r.source);
  }
  if (!groups.size) { $("status").textContent = "No DICOM images in the table."; return; }
  for (const g of groups.values()) {
    await upload(g.files, { run: g.run, method: g.method || undefined, overlay: !!g.method,
                            window: windowValue(), replace: true });
  }
}

// ---- zoom --------------------------------------------------------------------------------------
function zoom(node) {
  const copy = node.cloneNode(true);
  if (copy.tagName === "IMG") copy.classList.add("zoomed");
  $("zoom-body").replaceChildren(copy);
  $("zoom").showModal();
}

function classColumns() {
  const seen = [];
  for (const row of state.rows) for (const c of row.classes) if (!seen.includes(c)) seen.push(c);
  return seen;
}

function columns() {
  return [
    { key: "file", label: "File", value: (r) => r.file },
    { key: "run", label: "Run", value: (r) => r.run },
    { key: "pred", label: "Prediction", value: (r) => r.pred },
    ...classColumns().map((c) => ({ key: "p:" + c, label: `p(${c})`, value: (r) => r.probabilities[c] ?? null, num: true })),
    { key: "threshold", label: "Decision rule", value: (r) => (r.threshold === null ? -1 : r.threshold) },
    { key: "shift", label: "Like the training images?", value: (r) => (r.shift === null ? -Infinity : r.shift), num: true },
    { key: "input", label: "Input", sortable: false },
    { key: "overlay", label: "Overlay", sortable: false },
  ];
}

function renderTable() {
  const cols = columns();
  $("results-panel").hidden = state.rows.length === 0;
  $("count").textContent = `${state.rows.length} image${state.rows.length === 1 ? "" : "s"}`;
  const head = $("results").tHead.rows[0];
  head.replaceChildren(...cols.map((c) => {
    const th = el("th", { "data-key": c.key, text: c.label });
    if (c.sortable !== false) {
      th.classList.add("sortable");
      if (state.sort.key === c.key) th.classList.add(state.sort.dir > 0 ? "asc" : "desc");
      th.addEventListener("click", () => sortBy(c.key));
    }
    return th;
  }));
  let rows = state.rows.slice();
  const col = cols.find((c) => c.key === state.sort.key);
  if (col) {
    rows.sort((a, b) => {
      const x = col.value(a), y = col.value(b);
      const cmp = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y), undefined, { numeric: true });
      return cmp * state.sort.dir;
    });
  }
  $("results").tBodies[0].replaceChildren(...rows.map((r) => {
    const tr = el("tr", { class: "result" });
    tr.append(el("td", { class: "file", text: r.file, title: r.file }), el("td", { text: r.run }),
      el("td", { class: "pred", text: r.pred }));
    for (const c of classColumns()) {
      const v = r.probabilities[c];
      const td = el("td", { class: "num prob", "data-class": c, text: v === undefined ? "—" : num(v) });
      if (v !== undefined) td.append(el("span", { class: "bar" }, el("span", { style: `width:${(100 * v).toFixed(1)}%` })));
      tr.append(td);
    }
    tr.append(el("td", { class: "rule", text: r.threshold === null ? "argmax" : `p(${r.positive}) ≥ ${num(r.threshold, 3)}` }));
    tr.append(shiftCell(r));
    const inp = el("td", {}, el("img", { class: "input", src: r.input, alt: `model input for ${r.file}` }));
    if (r.dicom && r.window) {
      inp.append(el("div", { class: "muted small window-note", text: `DICOM · window ${r.window[0]} / ${r.window[1]} HU` }));
    }
    tr.append(inp);
    const ov = el("td");
    if (r.image && r.heatmap) {  // the heat map over the image, its opacity from the slider
      ov.append(el("div", { class: "stack", title: "click to zoom" },
        el("img", { class: "base", src: r.image, alt: `image ${r.file}` }),
        el("img", { class: "overlay heat", src: r.heatmap, alt: `${r.method} heat map for ${r.file}` })),
      el("div", { class: "muted small", text: `${r.method} · evidence for ${r.explained}` }));
    } else if (r.overlay) {
      ov.append(el("img", { class: "overlay", src: r.overlay, alt: `${r.method} overlay for ${r.file}` }),
        el("div", { class: "muted small", text: `${r.method} · evidence for ${r.explained}` }));
    } else ov.append(el("span", { class: "muted", text: "—" }));
    tr.append(ov);
    return tr;
  }));
}

// ---- scans: one patient each, a strip of the slices used, heat maps of the decisive ones ----------
function addPatients(body) {
  for (const p of body.patients || []) state.patients.push({ ...p, run: body.run, method: body.method });
  renderPatients();
}

function renderPatients() {
  $("patients-panel").hidden = state.patients.length === 0;
  $("patients").replaceChildren(...state.patients.map((p) => {
    const flagged = p.flagged_share === null || p.flagged_share === undefined ? "no shift guard" : `${pct(p.flagged_share)} of slices flagged by the shift guard`;
    const head = el("p", { class: "patient-head" }, el("strong", { class: "patient-id", text: p.patient }),
      ` · ${p.kind} · ${p.run} · `, el("span", { class: "patient-pred", text: p.label }),
      ` · p(${p.positive_class}) `, el("span", { class: "num patient-prob", text: num(p.probability) }),
      ` · ${p.slices_used} of ${p.slices_total} slices used · ${flagged} · ${p.decision}`);
    const strip = el("div", { class: "strip", title: `p(${p.positive_class}) per slice, inferior to superior` },
      ...p.slices.map((s) => el("figure", { class: "strip-slice" + (s.label === p.positive_class ? " positive" : ""), "data-index": String(s.index) },
        el("img", { src: s.thumb, alt: `slice ${s.index}` }), el("figcaption", { class: "num", text: num(s.probability, 2) }))));
    const heat = el("div", { class: "decisive" }, ...p.decisive.map((d) => el("figure", { class: "decisive-slice", "data-index": String(d.index) },
      d.overlay ? el("img", { class: "overlay", src: d.overlay, alt: `${p.method} overlay, slice ${d.index}` }) : el("span", { class: "muted", text: "no overlay" }),
      el("figcaption", { class: "small", text: `slice ${d.index} · p=${num(d.probability, 3)}` + (d.explained_class ? ` · evidence for ${d.explained_class}` : "") }))));
    return el("article", { class: "patient", "data-name": p.name }, head, strip,
      el("h3", { text: "Most decisive slices" }), heat);
  }));
}

// The shift guard's verdict on this image, apart from the prediction: a warning when the image is
// unlike the run's training images (the label may then be confidently wrong).
function shiftCell(r) {
  if (r.inDist === null) return el("td", { class: "shift muted", text: "no guard" });
  const score = `shift score ${num(r.shift, 3)} (threshold ${num(r.guard.threshold, 3)})`;
  if (r.inDist) return el("td", { class: "shift ok", title: score, text: "yes" });
  return el("td", { class: "shift" }, el("div", {
    class: "warning shift-warning", role: "alert", title: score,
    text: "Unlike this run's training images (another scanner, site or framing?): the prediction beside it " +
      "may be wrong however confident it looks. Check it by other means, or validate and adapt the model on " +
      `labelled slices from this site. ${score}.`,
  }));
}

function sortBy(key) {
  state.sort = state.sort.key === key ? { key, dir: -state.sort.dir } : { key, dir: 1 };
  renderTable();
}

// A text cell that a spreadsheet would run as a formula (=, +, -, @, tab, CR, or their full-width
// forms first) gets a leading ' (as ct_transfer._io.csv_safe does); numbers and numeric text stay as they are.
const FORMULA_START = /^'*[=+\-@\t\r\uff1d\uff0b\uff0d\uff20]/;
const NUMBER = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/;

function csvSafe(v) {
  return typeof v === "string" && FORMULA_START.test(v) && !NUMBER.test(v) ? "'" + v : v;
}

function csvCell(v) {
  const s = v === null || v === undefined ? "" : String(csvSafe(v));
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

function downloadCsv() {
  const classes = classColumns();
  const header = ["file", "run", "pred", ...classes.map((c) => "prob_" + c), "threshold", "temperature", "method",
    "shift_score", "in_distribution"];
  const lines = [header.map(csvCell).join(",")];
  for (const r of state.rows) {
    lines.push([r.file, r.run, r.pred, ...classes.map((c) => r.probabilities[c]), r.threshold, r.temperature,
      r.method, r.shift, r.inDist].map(csvCell).join(","));
  }
  const blob = new Blob([lines.join("\n") + "\n"], { type: "text/csv" });
  const a = el("a", { href: URL.createObjectURL(blob), download: "ct-transfer-predictions.csv" });
  document.body.append(a);
  a.click();
  a.remove();
}

// ---- start -----------------------------------------------------------------------------------
async function start() {
  try {
    const resp = await fetch("/api/runs");
    const body = await resp.json();
    state.runs = body.runs;
    $("run").replaceChildren(...state.runs.map((r) => el("option", { value: r.name, text: `${r.name} (${r.model})` })));
    $("run").disabled = state.runs.length < 2;
    // the explanation methods come from the server's registry, not from this page
    $("method").replaceChildren(...Object.entries(body.methods).map(([name, title]) =>
      el("option", { value: name, text: title })));
    const lim = body.limits;
    $("limits").textContent = `Up to ${lim.max_images} images and ${lim.max_request_mb} MB per upload; ` +
      `images up to ${(lim.max_pixels / 1e6).toFixed(0)} megapixels. Files stay on this server, in memory, ` +
      `and are discarded after the answer.`;
    renderCard();
  } catch (err) {
    $("card").replaceChildren(el("p", { class: "warning", text: "Could not load the runs: " + err.message }));
  }
  $("run").addEventListener("change", renderCard);
  $("files").addEventListener("change", (e) => upload(e.target.files));
  $("csv").addEventListener("click", downloadCsv);
  const opacity = () => {
    document.body.style.setProperty("--overlay-opacity", $("opacity").value);
    $("opacity-value").textContent = Number($("opacity").value).toFixed(2);
  };
  $("opacity").addEventListener("input", opacity);
  opacity();
  $("window-preset").addEventListener("change", choosePreset);
  for (const id of ["window-width", "window-level"]) {
    $(id).addEventListener("input", () => { $("window-preset").value = "custom"; });
  }
  $("window-apply").addEventListener("click", applyWindow);
  $("results").addEventListener("click", (e) => {
    const target = e.target.closest(".stack") || (e.target.matches("img.input, img.overlay") ? e.target : null);
    if (target) zoom(target);
  });
  $("zoom").addEventListener("click", () => $("zoom").close());
  $("clear-scans").addEventListener("click", () => { state.patients = []; renderPatients(); });
  $("clear").addEventListener("click", () => { state.rows = []; state.patients = []; renderTable(); renderPatients(); showMessages([]); $("status").textContent = ""; });
  const drop = $("drop");
  for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  drop.addEventListener("drop", (e) => upload(e.dataTransfer.files));
}

start();
