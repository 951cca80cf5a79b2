// dermlens web page: upload an image, show the model's calibrated probabilities. No external resources.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, file: null, previewUrl: null };

function pct(p) {
  const v = 100 * p;
  return v >= 99.95 ? "100%" : v < 0.05 ? "<0.1%" : `${v.toFixed(1)}%`;
}

function show(el, visible) {
  el.classList.toggle("hidden", !visible);
}

function bar(label, sublabel, p, kind, highlight) {
  const row = document.createElement("div");
  row.className = `bar ${kind}${highlight ? " top-row" : ""}`;
  const name = document.createElement("div");
  name.className = "bar-label";
  name.textContent = label;
  if (sublabel) {
    const sub = document.createElement("span");
    sub.className = "bar-code";
    sub.textContent = sublabel;
    name.appendChild(sub);
  }
  const track = document.createElement("div");
  track.className = "bar-track";
  const fill = document.createElement("div");
  fill.className = "bar-fill";
  fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
  track.appendChild(fill);
  const value = document.createElement("div");
  value.className = "bar-value";
  value.textContent = pct(p);
  row.append(name, track, value);
  return row;
}

function fillSelect(select, values) {
  for (const v of values) {
    const opt = document.createElement("option");
    opt.value = v;
    opt.textContent = v;
    select.appendChild(opt);
  }
}

async function loadModel() {
  try {
    const res = await fetch("/model");
    const body = await res.json();
    if (!res.ok) throw new Error(body.error ? body.error.message : res.statusText);
    state.model = body;
    $("model-tag").textContent = `${body.name} · v${body.version} · ${body.precision}`;
    $("disclaimer-text").textContent = body.disclaimer;
    const words = body.refer && body.refer.words;
    $("refer-rate-note").textContent = words
      ? `This model ${words} to a dermatologist (measured on validation images).`
      : "";
    show($("refer-rate-note"), Boolean(words));
    $("footer-version").textContent = `dermlens ${body.dermlens_version} · model ${body.name} v${body.version}`;
    fillSelect($("sex"), body.sexes);
    fillSelect($("site"), body.sites);
    show($("token-row"), body.auth_required);
    $("token").value = sessionStorage.getItem("dermlens-token") || "";
  } catch (err) {
    $("model-tag").textContent = "model unavailable";
    showError(`Cannot reach the model: ${err.message}`);
  }
  updateButton();
}

function updateButton() {
  $("analyze").disabled = !(state.model && state.file);
}

function showError(message) {
  $("error").textContent = message;
  show($("error"), true);
}

function resetResult() {
  show($("error"), false);
  show($("result"), false);
  show($("placeholder"), false);
  $("cam-overlay").removeAttribute("src");
  $("cam-toggle").checked = false;
  $("cam-toggle").disabled = true;
  show($("cam-overlay"), false);
}

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(file);
  $("preview").src = state.previewUrl;
  $("filename").textContent = file.name;
  show($("viewer"), true);
  $("drop-zone").classList.add("compact");
  document.querySelector(".drop-main").textContent = "Drop another image here";
  document.querySelector(".drop-sub").textContent = "or click to choose a file";
  updateButton();
  analyze();
}

function className(code) {
  const c = state.model.classes.find((x) => x.code === code);
  return c ? c.name : code;
}

function oodText(score) {
  if (score === null || score === undefined) return "";
  const thr = state.model.card.ood && state.model.card.ood.threshold;
  const fmt = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3));
  return ` · OOD score ${fmt(score)}` + (typeof thr === "number" ? ` (refused above ${fmt(thr)})` : "");
}

// Plain-words explanation of each machine-readable refer reason the API returns.
const REFER_TEXT = {
  ood: "The image does not look like the dermoscopic lesion images the model learned from.",
  not_dermoscopy: "The image looks like an ordinary clinical or phone photo, not a dermoscopy image.",
  low_confidence: "The model is not confident enough in its most likely diagnosis.",
  set_too_large: (r) =>
    `Too many diagnoses remain possible: to be ${pct(r.set_coverage || 0.9)} ` +
    `sure of including the right one, the model needs ${r.prediction_set ? r.prediction_set.length : "several"} diagnoses.`,
};

function renderRefer(r, refused) {
  const codes = r.refer_codes || [];
  show($("refer-warning"), r.refer && !refused);
  const list = $("refer-list");
  list.replaceChildren();
  for (const code of codes) {
    const t = REFER_TEXT[code];
    if (!t) continue;
    const li = document.createElement("li");
    li.textContent = typeof t === "function" ? t(r) : t;
    li.dataset.code = code;
    list.appendChild(li);
  }
  const reason = r.refer_reason || "";
  $("refer-reason").textContent = codes.length
    ? "This result should not be relied on:"
    : reason
      ? `This result should not be relied on: ${reason}.`
      : "The model flags this image for expert review.";
}

function renderSet(r) {
  const ps = r.prediction_set;
  show($("pset"), !!ps);
  if (!ps) return;
  $("pset-title").textContent = `${pct(r.set_coverage)} prediction set`;
  $("pset-classes").textContent = ps.map((c) => className(c)).join(", ");
  $("pset-note").textContent =
    `The right diagnosis is among these ${ps.length} with about ${pct(r.set_coverage)} probability, ` +
    "for each diagnosis on its own (conformal prediction, checked on held-out images)." +
    (r.calibration_condition === "no_meta" ? " Calibrated for images without age, sex or body site." : "");
}

function render(r) {
  const notDerm = !!r.not_dermoscopy;
  const refused = r.ood || notDerm;
  show($("ood-warning"), r.ood);
  show($("not-dermoscopy-warning"), notDerm && !r.ood);
  renderRefer(r, refused);
  renderSet(r);
  show($("scores"), !refused);

  $("top-class").textContent = r.top_class_name;
  $("confidence").textContent = pct(r.confidence);

  const coarse = $("bars-coarse");
  coarse.replaceChildren();
  const topCoarse = Object.keys(r.coarse).reduce((a, b) => (r.coarse[a] >= r.coarse[b] ? a : b));
  for (const [code, p] of Object.entries(r.coarse)) coarse.appendChild(bar(code, "", p, code, code === topCoarse));

  const fine = $("bars-fine");
  fine.replaceChildren();
  for (const c of state.model.classes) {
    const p = r.fine[c.code];
    if (p === undefined) continue;
    fine.appendChild(bar(className(c.code), c.code, p, c.coarse, c.code === r.top_class));
  }

  if (r.cam_png_base64 && !refused) {
    $("cam-overlay").src = `data:image/png;base64,${r.cam_png_base64}`;
    $("cam-toggle").disabled = false;
  }
  const t = r.timing_ms.total;
  $("meta-line").textContent =
    `Model ${r.model_name} v${r.model_version}` +
    oodText(r.ood_score) +
    (t !== undefined ? ` · ${Math.round(t)} ms` : "") +
    ` · record ${r.record_id.slice(0, 8)}`;
  show($("result"), true);
}

async function analyze() {
  if (!state.model || !state.file) return;
  resetResult();
  const limit = state.model.limits.max_upload_bytes;
  if (state.file.size > limit) {
    showError(`This file is ${(state.file.size / 1e6).toFixed(1)} MB; the server accepts up to ${(limit / 1e6).toFixed(1)} MB.`);
    return;
  }
  show($("busy"), true);
  $("analyze").disabled = true;
  const form = new FormData();
  form.append("file", state.file, state.file.name);
  for (const id of ["age", "sex", "site"]) {
    const v = $(id).value.trim();
    if (v) form.append(id, v);
  }
  form.append("cam", "true");
  const headers = {};
  const token = $("token").value.trim();
  if (token) {
    headers.Authorization = `Bearer ${token}`;
    sessionStorage.setItem("dermlens-token", token);
  }
  try {
    const res = await fetch("/predict", { method: "POST", body: form, headers });
    let body = null;
    try {
      body = await res.json();
    } catch {
      body = null;
    }
    if (!res.ok) {
      const msg = body && body.error ? body.error.message : `${res.status} ${res.statusText}`;
      throw new Error(msg);
    }
    render(body);
  } catch (err) {
    showError(`Could not analyse this image: ${err.message}`);
  } finally {
    show($("busy"), false);
    updateButton();
  }
}

function setup() {
  const zone = $("drop-zone");
  $("file-input").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  for (const ev of ["dragenter", "dragover"]) {
    zone.addEventListener(ev, (e) => {
      e.preventDefault();
      zone.classList.add("dragging");
    });
  }
  for (const ev of ["dragleave", "drop"]) {
    zone.addEventListener(ev, (e) => {
      e.preventDefault();
      zone.classList.remove("dragging");
    });
  }
  zone.addEventListener("drop", (e) => chooseFile(e.dataTransfer.files[0]));
  // Dropping outside the zone must not navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  $("cam-toggle").addEventListener("change", (e) => show($("cam-overlay"), e.target.checked));
  $("meta-form").addEventListener("submit", (e) => {
    e.preventDefault();
    analyze();
  });
  loadModel();
}

document.addEventListener("DOMContentLoaded", setup);
