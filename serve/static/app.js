// dermgraph review page: plain DOM, no build step. The API token stays in this tab (sessionStorage).
"use strict";
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("dermgraph-token") || "";
let current = null;

function el(tag, attrs = {}, text = "") {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== "") e.textContent = text;
  return e;
}

async function api(path, opts = {}) {
  opts.headers = Object.assign({}, opts.headers || {}, token ? { Authorization: "Bearer " + token } : {});
  const r = await fetch(path, opts);
  if (r.status === 401) { setStatus("Enter a valid API token."); throw new Error("unauthorised"); }
  if (!r.ok) {
    let msg = r.status + "";
    try { msg += ": " + JSON.stringify((await r.json()).detail); } catch (e) {}
    setStatus("Error " + msg);
    throw new Error(msg);
  }
  return r;
}

function setStatus(t) { $("status").textContent = t; }

async function loadWorklist() {
  const rows = await (await api("/v1/cases?status=awaiting_review")).json();
  const body = $("worklist").querySelector("tbody");
  body.replaceChildren();
  for (const c of rows) {
    const tr = el("tr", { "data-case": c.case_id });
    tr.append(el("td", {}, c.case_id.slice(0, 8)), el("td", {}, c.modality || "-"),
      el("td", {}, c.label_name || "-"), el("td", {}, c.verdict), el("td", {}, c.stage || ""));
    tr.addEventListener("click", () => openCase(c.case_id));
    body.append(tr);
  }
  $("empty").hidden = rows.length > 0;
}

async function openCase(id) {
  const r = await (await api("/v1/cases/" + encodeURIComponent(id))).json();
  render(r);
  const img = await api(r.image_url).then((x) => x.blob()).catch(() => null);
  if (img) $("case-image").src = URL.createObjectURL(img);
}

function render(r) {
  current = r;
  const d = r.diagnosis;
  $("case").hidden = false;
  $("case-title").textContent = "Case " + r.case_id.slice(0, 8) + (r.status === "awaiting_review" ? " — awaiting review" : " — complete");
  $("case-modality").textContent = d.modality ? `${d.modality.label} (p=${d.modality.confidence.toFixed(2)})` : "-";
  const v = $("case-verdict");
  v.className = "verdict " + d.verdict;
  v.textContent = d.verdict.toUpperCase() + (d.label_name ? ` — ${d.label_name} (p=${d.confidence.toFixed(2)})` : "");
  if (d.review && d.review.override) v.textContent += ` · reviewer's diagnosis: ${d.review.override}`;
  $("case-reasons").replaceChildren(...(d.reasons || []).map((x) => el("li", {}, x)));

  const req = d.review_request;
  const tbody = $("findings").querySelector("tbody");
  tbody.replaceChildren();
  const rows = req ? req.findings : (d.findings || []).map((f) => ({ criterion: f.criterion, value: f.value, confidence: f.confidence, options: [f.value] }));
  for (const f of rows) {
    const tr = el("tr");
    const sel = el("select", { "data-criterion": f.criterion, "data-model": f.value });
    for (const o of f.options) { const opt = el("option", { value: o }, o); if (o === f.value) opt.selected = true; sel.append(opt); }
    sel.disabled = !req;
    sel.addEventListener("change", () => tr.classList.toggle("changed", sel.value !== sel.dataset.model));
    tr.append(el("td", {}, f.criterion.replaceAll("_", " ")), el("td"), el("td", {}, f.confidence == null ? "reviewer" : f.confidence.toFixed(2)));
    tr.children[1].append(sel);
    tbody.append(tr);
  }
  if (!rows.length) {
    const tr = el("tr");
    tr.append(el("td", { colspan: "3", class: "muted" }, "No structured 7-point findings for this modality" + (d.limitations && d.limitations.length ? ": " + d.limitations[0] : ".")));
    tbody.append(tr);
  }

  const diff = $("differential");
  diff.replaceChildren();
  for (const x of d.differential || []) {
    const row = el("div", { class: "bar" });
    const fill = el("div", { class: "fill" });
    fill.style.width = Math.max(1, Math.round(240 * x.probability)) + "px";
    row.append(el("span", { class: "name" }, x.name), fill, el("span", {}, x.probability.toFixed(3)));
    diff.append(row);
  }
  $("rationale").textContent = d.rationale || "";
  const cited = new Set(d.cited || []);
  $("evidence").replaceChildren(...(d.evidence || []).filter((e) => cited.has(e.id)).map((e) => {
    const li = el("li");
    li.append(el("code", {}, e.id), document.createTextNode(` ${e.title}: ${e.text}`));
    return li;
  }));

  const ov = $("override");
  ov.replaceChildren(el("option", { value: "" }, "override diagnosis…"));
  const labels = new Map((d.differential || []).map((x) => [x.label, x.name]));
  for (const [k, n] of labels) ov.append(el("option", { value: k }, n));
  $("review-form").hidden = !req;

  $("trace").replaceChildren(...(d.trace || []).map((t) => {
    const li = el("li", { class: t.node === "review" ? "review" : "" });
    li.append(el("span", { class: "node" }, `${t.step}. ${t.node}`), document.createTextNode(` · ${t.duration_s.toFixed(2)} s · ${t.model_id || ""}`));
    if (t.notes && t.notes.length) li.append(el("div", { class: "muted" }, t.notes.join("; ")));
    return li;
  }));
}

async function submitReview(kind) {
  if (!current) return;
  const reviewer = $("reviewer").value.trim();
  if (!reviewer) { setStatus("Enter your reviewer id."); $("reviewer").focus(); return; }
  const body = { reviewer, note: $("note").value.trim() || null };
  if (kind === "continue") {
    body.findings = {};
    for (const s of $("findings").querySelectorAll("select")) if (s.value !== s.dataset.model) body.findings[s.dataset.criterion] = s.value;
  } else if (kind === "accept") {
    body.diagnosis = current.diagnosis.label || null;
  } else if (kind === "override") {
    body.diagnosis = $("override").value || null;
    if (!body.diagnosis) { setStatus("Choose the overriding diagnosis."); return; }
  }
  setStatus("Submitting review…");
  const r = await (await api(`/v1/cases/${encodeURIComponent(current.case_id)}/review`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  })).json();
  render(r);
  setStatus(r.status === "awaiting_review" ? "Updated; the case awaits sign-off." : "Review recorded; case complete.");
  await loadWorklist();
}

$("accept").addEventListener("click", () => submitReview("accept"));
$("continue").addEventListener("click", () => submitReview("continue"));
$("override-btn").addEventListener("click", () => submitReview("override"));
$("refresh").addEventListener("click", () => loadWorklist());
$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem("dermgraph-token", token);
  loadWorklist().then(() => setStatus("Token accepted."));
});
$("upload").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const fd = new FormData();
  fd.append("image", $("file").files[0]);
  if ($("question").value) fd.append("question", $("question").value);
  const meta = {};
  if ($("age").value) meta.age = Number($("age").value);
  if ($("sex").value) meta.sex = $("sex").value;
  if ($("site").value) meta.site = $("site").value;
  if (Object.keys(meta).length) fd.append("metadata", JSON.stringify(meta));
  setStatus("Running the case…");
  $("submit").disabled = true;
  try {
    const r = await (await api("/v1/cases", { method: "POST", body: fd })).json();
    setStatus(`Case ${r.case_id.slice(0, 8)}: ${r.status}`);
    await loadWorklist();
  } finally { $("submit").disabled = false; }
});
loadWorklist().catch(() => {});
