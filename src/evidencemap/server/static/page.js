// The page of `evidencemap serve`. Loaded as a file (the Content-Security-Policy allows no inline
// script and no eval). Talks to /api/methods, /api/labels, /api/explain, /api/progress/{id} and
// /api/cancel/{id}.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 400;
const SLOW_SECONDS = 5;
let labels = [];
let methodInfo = new Map();  // name → GET /api/methods entry
let chosenFile = null;
let panels = [];             // {canvas, photo, heat}
let lastBody = null;         // the latest answer of POST /api/explain
let lastText = "";           // …as the server sent it
let running = null;          // {id, controller, started, timer, polling, cancelled}

// ------------------------------------------------------------------ small helpers

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function randomId() {  // crypto.randomUUID needs a secure context; getRandomValues does not
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function seconds(value) {
  if (value === null || value === undefined) return "?";
  if (value < 0.095) return value.toFixed(2) + " s";
  if (value < 9.5) return value.toFixed(1) + " s";
  if (value < 90) return Math.round(value) + " s";
  return (value / 60).toFixed(1) + " min";
}

function fileStem() {
  const name = chosenFile ? chosenFile.name.replace(/\.[^.]*$/, "") : "image";
  return name.replace(/[^A-Za-z0-9_-]+/g, "_").slice(0, 40) || "image";
}

function save(blob, name) {
  const url = URL.createObjectURL(blob);
  const link = el("a");
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// ------------------------------------------------------------------ .npz files (NumPy)

function decodeArray(item) {
  const bytes = Uint8Array.from(atob(item.data), (c) => c.charCodeAt(0));
  return new Float32Array(bytes.buffer);
}

// The service writes the file (POST /api/download/npz) from the arrays of the answer.
async function downloadNpz(result, name) {
  try {
    const response = await fetch("/api/download/npz", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        map: result.map, raw: result.raw, target: result.target, method: result.method,
        score: result.score, layer: result.layer, options: result.options,
      }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error || response.statusText);
    }
    save(await response.blob(), name);
  } catch (error) {
    showError("could not make the .npz file: " + error.message);
  }
}

// ------------------------------------------------------------------ methods and their cost

function workValue(name, option) {  // the work option as the options box sets it, if it does
  let parsed;
  try { parsed = JSON.parse($("options").value || "{}"); } catch { return undefined; }
  if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) return undefined;
  const own = parsed[name];
  if (own && typeof own === "object" && option in own) return own[option];
  if (option in parsed) return parsed[option];
  return undefined;
}

function passesFor(info, work) {  // model passes when the work option is `work`
  const cost = info.cost;
  const fallback = info.options[cost.work_option];  // its default, e.g. SmoothGrad's samples
  const perUnit = typeof fallback === "number" && fallback > 0 && cost.passes !== null
    ? cost.passes / fallback  // e.g. 2 for SmoothGrad over guided Grad-CAM
    : 1;  // Score-CAM's top_k (default: every channel): one masked forward each
  return work * perUnit;
}

function expectedCost(name) {
  const info = methodInfo.get(name);
  const cost = info && info.cost;
  if (!cost) return null;
  let passes = cost.passes;
  if (cost.work_option) {
    const value = workValue(name, cost.work_option);
    if (typeof value === "number" && value > 0) passes = passesFor(info, value);
  }
  let perPass = cost.seconds_per_pass;
  const lastPasses = cost.last_work !== null ? passesFor(info, cost.last_work) : cost.passes;
  if (cost.last_seconds !== null && typeof lastPasses === "number" && lastPasses > 0) {
    perPass = cost.last_seconds / lastPasses;  // measured on this method's latest run here
  }
  return { passes, seconds: passes !== null && perPass !== null ? passes * perPass : null, cost };
}

function costText(name) {
  const expected = expectedCost(name);
  if (!expected) return { short: "", long: "" };
  const { passes, seconds: s, cost } = expected;
  let short = s === null ? "cost unknown" : "≈ " + seconds(s);
  if (passes !== null && passes > 1) {
    short += " · " + (cost.at_most ? "≤ " : "") + Math.round(passes) + " passes";
  }
  let long = passes === null
    ? "model passes per class: unknown"
    : "about " + Math.round(passes) + " model pass" + (passes === 1 ? "" : "es") + " per class" +
      (cost.work_option ? " (" + cost.work_option + (cost.at_most ? ", at most" : "") + ")" : "");
  if (cost.last_seconds !== null) {
    long += "; its last run here took " + seconds(cost.last_seconds) + " per class, so ≈ " +
      seconds(s) + " per class now";
  } else if (cost.seconds_per_pass !== null) {
    const kinds = { layer: "Grad-CAM", input: "saliency", forward: "plain forward" };
    long += "; one " + (kinds[cost.pass_kind] || cost.pass_kind) + " pass took " +
      seconds(cost.seconds_per_pass) +
      " on this server, so ≈ " + seconds(s) + " per class on an idle server (a rough estimate)";
  }
  return { short, long };
}

function classCount() {
  const mode = document.querySelector("input[name=mode]:checked").value;
  if (mode !== "topk") return 1;
  const k = Number($("top-k").value);
  return Number.isInteger(k) && k >= 1 ? Math.min(k, 10) : 1;
}

function updateCosts() {
  let total = 0;
  let known = true;
  const checked = [...document.querySelectorAll("input[name=method]:checked")].map((i) => i.value);
  for (const label of document.querySelectorAll("#methods label.method")) {
    const name = label.dataset.method;
    const info = methodInfo.get(name);
    const { short, long } = info.applies === false ? { short: "", long: "" } : costText(name);
    const small = label.querySelector(".cost");
    small.textContent = short;
    const expected = expectedCost(name);
    small.classList.toggle("slow", !!expected && expected.seconds !== null && expected.seconds > SLOW_SECONDS);
    label.title = info.summary + (info.applies === false ? "\ndoes not apply to this model: " +
      info.reason : "") + (long ? "\n" + long : "");
    if (checked.includes(name)) {
      if (expected && expected.seconds !== null) total += expected.seconds;
      else known = false;
    }
  }
  const k = classCount();
  $("estimate").textContent = checked.length
    ? "expected " + (known ? "≈ " + seconds(total * k) : "time unknown") + " for " +
      checked.length + " method" + (checked.length === 1 ? "" : "s") + " × " + k +
      " class" + (k === 1 ? "" : "es") + " (estimate on an idle server)"
    : "";
}

// The methods that do not apply to the served model, after the others: greyed out, never
// ticked, grouped under the reason they do not apply.
function unavailableGroups(methods, preset) {
  const byReason = new Map();
  for (const m of methods.filter((x) => x.applies === false)) {
    if (!byReason.has(m.reason)) byReason.set(m.reason, []);
    byReason.get(m.reason).push(m);
  }
  return [...byReason].map(([reason, group]) => {
    const box = el("div", "unavailable-group");
    box.setAttribute("role", "group");
    box.setAttribute("aria-label", "methods that do not apply to this model");
    box.append(el("p", "reason", "not for this model: " + reason));
    for (const m of group) box.append(methodLabel(m, preset));
    return box;
  });
}

function methodLabel(m, preset) {
  const label = el("label", "method");
  label.dataset.method = m.name;
  const input = el("input");
  input.type = "checkbox";
  input.name = "method";
  input.value = m.name;
  input.checked = m.name === preset;
  input.addEventListener("change", updateCosts);
  const name = el("span", "name");
  m.name.split("_").forEach((part, i) => {  // long names wrap at their underscores
    if (i) name.append("_", el("wbr"));
    name.append(part);
  });
  label.append(input, name, el("small", "cost"));
  if (m.applies === false) {
    input.disabled = true;
    input.checked = false;
    label.classList.add("unavailable");
    label.setAttribute("aria-disabled", "true");
  }
  return label;
}

async function loadMethods() {
  const methods = await getJSON("/api/methods");
  methodInfo = new Map(methods.map((m) => [m.name, m]));
  const box = $("methods");
  if (box.querySelector("label.method")) {  // a refresh of the costs: keep the ticks
    updateCosts();
    return;
  }
  box.textContent = "";
  const usable = methods.filter((m) => m.applies !== false).map((m) => m.name);
  const preset = usable.includes("gradcam") ? "gradcam" : usable[0];
  for (const m of methods.filter((x) => x.applies !== false)) box.append(methodLabel(m, preset));
  box.append(...unavailableGroups(methods, preset));
  updateCosts();
}

async function loadLabels() {
  labels = await getJSON("/api/labels");
  const list = $("labels");
  for (let i = 0; i < labels.length; i++) {
    const option = el("option");
    option.value = i + ": " + labels[i];
    list.append(option);
  }
}

// ------------------------------------------------------------------ the form

function pickFile(file) {
  if (!file) return;
  chosenFile = file;
  $("drop-text").textContent = file.name + " (" + Math.round(file.size / 1024) + " kB)";
  const thumb = $("thumb");
  thumb.src = URL.createObjectURL(file);
  thumb.hidden = false;
  showError("");
}

function chosenTarget() {
  const mode = document.querySelector("input[name=mode]:checked").value;
  if (mode === "class") {
    let value = $("class-index").value.trim();
    const search = $("label-search").value.trim();
    if (!value && search) {
      const match = search.match(/^(\d+)\s*:/);
      if (match) value = match[1];
      else {
        const i = labels.findIndex((l) => l.toLowerCase() === search.toLowerCase());
        if (i < 0) throw new Error("no class is labelled '" + search + "'; pick one from the list");
        value = String(i);
      }
    }
    if (!value) throw new Error("enter a class index or search a label");
    return { target: value };
  }
  if (mode === "topk") return { top_k: $("top-k").value.trim() };
  return {};
}

// ------------------------------------------------------------------ results

function clearResults() {
  panels = [];
  lastBody = null;
  lastText = "";
  $("grid").textContent = "";
  $("prediction-list").textContent = "";
  $("input-image").removeAttribute("src");
  $("input-caption").textContent = "";
  $("hover").textContent = "";
  $("results").hidden = true;
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("could not draw an image the server sent"));
    image.src = src;
  });
}

function draw(panel) {
  const alpha = Number($("opacity").value) / 100;
  const ctx = panel.canvas.getContext("2d");
  ctx.globalAlpha = 1;
  ctx.drawImage(panel.photo, 0, 0, panel.canvas.width, panel.canvas.height);
  ctx.globalAlpha = alpha;
  ctx.drawImage(panel.heat, 0, 0, panel.canvas.width, panel.canvas.height);
  ctx.globalAlpha = 1;
}

function redrawAll() {
  $("opacity-value").textContent = (Number($("opacity").value) / 100).toFixed(2);
  panels.forEach(draw);
}

function downloadLink(text, kind, make) {
  const link = el("a", "download", text);
  link.href = "#";
  link.dataset.kind = kind;
  link.addEventListener("click", (event) => {
    event.preventDefault();
    make();
  });
  return link;
}

function cell(r, photo, heat, side) {
  const fig = el("figure", "cell");
  fig.setAttribute("role", "cell");
  fig.dataset.method = r.method;
  fig.dataset.target = String(r.target);
  const canvas = el("canvas", "overlay");
  canvas.width = side;
  canvas.height = side;
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", r.method + " evidence for " + r.label);
  canvas.dataset.method = r.method;
  canvas.dataset.target = String(r.target);
  const panel = { canvas, photo, heat };
  const values = decodeArray(r.map);
  const size = r.map.shape[0];
  canvas.addEventListener("mousemove", (event) => {
    const rect = canvas.getBoundingClientRect();
    const x = Math.min(size - 1, Math.floor((event.clientX - rect.left) / rect.width * size));
    const y = Math.min(size - 1, Math.floor((event.clientY - rect.top) / rect.height * size));
    $("hover").textContent = r.method + " · " + r.label + ": evidence " +
      values[y * size + x].toFixed(2) + " at (" + x + ", " + y + ")";
  });
  fig.append(canvas);
  if (r.explanation_png) {
    const deleted = r.explanation_kind === "deleted";
    const image = el("img", "explanation");
    image.src = r.explanation_png;
    image.alt = r.method + (deleted ? " deleted evidence" : " explanation image");
    fig.append(image, el("figcaption", "",
      (deleted ? "deleted evidence: p without it " : "explanation: p on it ") +
      (100 * r.explanation_score).toFixed(1) + "% · top-1 class " + r.explanation_top1));
  }
  if (r.warning) {
    const note = el("p", "warning", "⚠ " + r.warning);
    note.setAttribute("role", "note");
    fig.append(note);
  }
  const stem = fileStem() + "_" + r.method + "_" + r.target;
  const links = el("div", "downloads");
  links.append(
    downloadLink("PNG", "png", () => canvas.toBlob((blob) => save(blob, stem + ".png"), "image/png")),
    downloadLink(".npz", "npz", () => downloadNpz(r, stem + ".npz")),
  );
  fig.append(links);
  panels.push(panel);
  draw(panel);
  return fig;
}

async function render(body) {
  const photo = await loadImage(body.input_png);
  const side = body.image.display_size;
  $("input-image").src = body.input_png;
  $("input-caption").textContent = "the model's input: " + body.image.input_size + "×" +
    body.image.input_size + " centre crop of the " + body.image.width + "×" +
    body.image.height + " photo";
  const list = $("prediction-list");
  for (const p of body.predictions) {
    const li = el("li", "prediction", p.label + " (" + p["class"] + ") " +
      (100 * p.probability).toFixed(1) + "%");
    const bar = el("span", "prob");
    bar.style.width = Math.max(2, Math.round(120 * p.probability)) + "px";
    li.append(bar);
    list.append(li);
  }

  const grid = $("grid");
  const k = body.targets.length;
  grid.style.gridTemplateColumns = "minmax(70px, 130px) repeat(" + k + ", minmax(" +
    (k > 4 ? 120 : 150) + "px, 260px))";
  const head = el("div", "corner", "method \\ class");
  head.setAttribute("role", "columnheader");
  grid.append(head);
  for (const t of body.targets) {
    const th = el("div", "class-head", t.label);
    th.setAttribute("role", "columnheader");
    th.dataset.target = String(t["class"]);
    th.append(el("small", "", "class " + t["class"] + " · " + (100 * t.probability).toFixed(1) + "%"));
    grid.append(th);
  }
  const heats = await Promise.all(body.explanations.map((r) => loadImage(r.heatmap_png)));
  for (const method of body.methods) {
    const rows = body.explanations.filter((r) => r.method === method);
    const first = rows[0];
    const rh = el("div", "method-head", method);
    rh.setAttribute("role", "rowheader");
    rh.dataset.method = method;
    const layer = Array.isArray(first.layer) ? first.layer.join(", ") : (first.layer || "input");
    rh.append(el("small", "", "layer " + layer), el("small", "", seconds(first.seconds) +
      (k > 1 ? " for " + k + " classes" : "")));
    grid.append(rh);
    for (const t of body.targets) {
      const r = rows.find((x) => x.target === t["class"]);
      grid.append(cell(r, photo, heats[body.explanations.indexOf(r)], side));
    }
  }
  $("results").hidden = false;
}

// ------------------------------------------------------------------ running a request

function setProgress(info, cancelled) {
  const n = info.methods.length;
  const bar = $("progress");
  bar.value = info.fraction;
  let text = info.state;
  if (cancelled || info.state === "cancelling") {
    const step = info.step && info.step.total > 0
      ? " (stopped at " + info.step.desc + " " + info.step.done + " / " + info.step.total + ")"
      : "";
    $("progress-text").textContent = "cancelling…" + step;
    return;
  }
  if (info.state === "queued") text = "waiting for a free worker";
  if (info.state === "running" && info.method) {
    text = info.method + " (" + (info.method_index + 1) + " of " + n + ")";
    if (info.step && info.step.total > 0) {
      text += " · " + info.step.desc + " " + info.step.done + " / " + info.step.total;
    }
  }
  $("progress-text").textContent = text;
}

async function poll() {
  const run = running;
  if (!run || run.polling) return;
  run.polling = true;
  try {
    const info = await getJSON("/api/progress/" + run.id);
    if (running === run && info.state !== "unknown") setProgress(info, run.cancelled);
  } catch {
    // a missed poll is shown by the next one
  } finally {
    run.polling = false;
  }
}

function tick() {
  if (!running) return;
  $("elapsed").textContent = ((performance.now() - running.started) / 1000).toFixed(1) + " s";
}

function finishRun(text) {
  if (running) {
    clearInterval(running.timer);
    clearInterval(running.poller);
    if (running.fallback) clearTimeout(running.fallback);
  }
  running = null;
  $("cancel").hidden = true;
  $("cancel").textContent = "Cancel";
  $("run").classList.remove("cancelling");
  $("explain").disabled = false;
  $("progress-text").textContent = text;
}

async function cancelRun() {
  const run = running;
  if (!run || run.cancelled) return;
  run.cancelled = true;
  $("cancel").disabled = true;
  $("cancel").textContent = "Cancelling…";
  $("run").classList.add("cancelling");
  $("progress-text").textContent = "cancelling…";
  try {
    await fetch("/api/cancel/" + run.id, { method: "POST" });
  } catch {
    // the abort below stops the request anyway (the server sees the client go)
  }
  // the answer (499) comes once the method reaches its next step; should it not come, close
  // the connection, which the server also takes as a cancel
  run.fallback = setTimeout(() => run.controller.abort(), 15000);
}

async function explain(event) {
  event.preventDefault();
  if (running) return;
  showError("");
  clearResults();
  let methods;
  const form = new FormData();
  try {
    if (!chosenFile) throw new Error("choose or drop an image first");
    methods = [...document.querySelectorAll("input[name=method]:checked")].map((i) => i.value);
    if (!methods.length) throw new Error("pick at least one method");
    form.append("file", chosenFile, chosenFile.name);
    form.append("method", methods.join(","));
    for (const [key, value] of Object.entries(chosenTarget())) form.append(key, value);
    const options = $("options").value.trim();
    if (options) form.append("options", options);
  } catch (error) {
    showError(error.message);
    return;
  }
  const run = {
    id: randomId(), controller: new AbortController(), started: performance.now(),
    polling: false, cancelled: false,
  };
  form.append("request_id", run.id);
  running = run;
  run.timer = setInterval(tick, 100);
  run.poller = setInterval(poll, POLL_MS);
  $("run").hidden = false;
  $("run").dataset.requestId = run.id;
  $("progress").value = 0;
  $("progress-text").textContent = "uploading…";
  $("cancel").hidden = false;
  $("cancel").disabled = false;
  $("explain").disabled = true;
  tick();
  try {
    const response = await fetch("/api/explain", {
      method: "POST", body: form, signal: run.controller.signal,
    });
    const text = await response.text();
    let body;
    try { body = JSON.parse(text); } catch { body = { error: response.statusText }; }
    if (!response.ok) throw new Error(body.error || ("request failed: " + response.status));
    lastText = text;
    await render(body);
    lastBody = body;
    $("progress").value = 1;
    tick();
    finishRun("done in " + seconds(body.seconds) + " on the server");
    loadMethods().catch(() => {});  // the measured costs changed
  } catch (error) {
    clearResults();
    tick();
    if (run.cancelled) {
      finishRun("cancelled");
    } else {
      finishRun("failed");
      showError(error.message);
    }
  }
}

// ------------------------------------------------------------------ wiring

function init() {
  $("file").addEventListener("change", (e) => pickFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    pickFile(e.dataTransfer.files[0]);
  });
  const pick = (value) => () => {
    document.querySelector("input[name=mode][value=" + value + "]").checked = true;
    updateCosts();
  };
  $("class-index").addEventListener("focus", pick("class"));
  $("label-search").addEventListener("focus", pick("class"));
  $("label-search").addEventListener("change", () => { $("class-index").value = ""; });
  $("top-k").addEventListener("focus", pick("topk"));
  $("top-k").addEventListener("input", updateCosts);
  for (const radio of document.querySelectorAll("input[name=mode]")) {
    radio.addEventListener("change", updateCosts);
  }
  $("options").addEventListener("input", updateCosts);
  $("opacity").addEventListener("input", redrawAll);
  $("cancel").addEventListener("click", cancelRun);
  $("download-json").addEventListener("click", () => {
    if (lastText) save(new Blob([lastText], { type: "application/json" }), fileStem() + "_evidence.json");
  });
  $("form").addEventListener("submit", explain);
  Promise.all([loadMethods(), loadLabels()])
    .catch((error) => showError("could not reach the service: " + error.message));
}

init();
