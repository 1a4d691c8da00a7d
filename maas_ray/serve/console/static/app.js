// maas web console: plain JavaScript, no build step, no third-party code.
// Hash routes: #/models, #/models/{id}, #/chat[?model=id], #/embeddings, #/jobs, #/jobs/{id}.
// Every view talks to the public HTTP API, exactly as any other client would.
"use strict";

const KEY_STORAGE = "maas.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const JOB_POLL_MS = 2000;

// ---------------------------------------------------------------- API client

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function apiFetch(path, options = {}) {
  const headers = { ...authHeaders(), ...(options.headers || {}) };
  if (options.body !== undefined && typeof options.body !== "string") {
    headers["Content-Type"] = "application/json";
    options = { ...options, body: JSON.stringify(options.body) };
  }
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function api(path, options) {
  return (await apiFetch(path, options)).json();
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    const detail = body.error && (body.error.message || body.error);
    if (detail) message = `${response.status}: ${detail}`;
  } catch (_) { /* not JSON */ }
  if (response.status === 401) message += " (set the API key at the top of the page)";
  return new ApiError(response.status, message);
}

const modelPath = (id) => `/v1/models/${encodeURIComponent(id).replace(/%3A/gi, ":")}`;

// ---------------------------------------------------------------- DOM helpers

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") el.textContent = value;
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function refs(root) {
  const out = {};
  root.querySelectorAll("[data-ref]").forEach((el) => { out[el.dataset.ref] = el; });
  return out;
}

function showError(el, err) {
  if (!err) { el.hidden = true; el.textContent = ""; return; }
  el.hidden = false;
  el.textContent = err.message || String(err);
}

function announce(text) {
  const el = document.getElementById("announce");
  el.textContent = "";
  setTimeout(() => { el.textContent = text; }, 50);
}

const fmtNumber = (v) => (typeof v === "number" && !Number.isInteger(v) ? v.toPrecision(4) : String(v));

function fmtValue(v) {
  if (v === null || v === undefined || v === "") return "—";
  if (typeof v === "object") return JSON.stringify(v);
  return fmtNumber(v);
}

const fmtTime = (ts) => (ts ? new Date(ts * 1000).toLocaleString() : "—");

function fillKv(dl, pairs) {
  dl.replaceChildren();
  for (const [k, v] of pairs) {
    if (v === null || v === undefined || v === "") continue;
    dl.append(h("dt", { text: k }), h("dd", {}, v instanceof Node ? v : fmtValue(v)));
  }
}

function fillTable(table, header, rows) {
  table.replaceChildren(
    h("thead", {}, h("tr", {}, header.map((c) => h("th", { scope: "col", text: c })))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c, i) =>
      i === 0 ? h("th", { scope: "row", text: fmtValue(c) }) : h("td", { text: fmtValue(c) }))))),
  );
}

// Fill a playground's model <select> with the registry's models of one task:
// the one in the URL (?model=) first, else the tab's last choice.
async function loadModelSelect(r, task, wanted) {
  try {
    const models = (await api("/v1/models")).data.filter((m) => m.task === task);
    if (!models.length) throw new Error(`No ${task} models in the registry yet (maas models import).`);
    const select = r.model;
    select.replaceChildren(...models.map((m) => h("option", { value: m.id, text: m.id })));
    const stored = sessionStorage.getItem(`maas.model.${select.id}`);
    const pick = [wanted, stored].find((id) => id && models.some((m) => m.id === id));
    if (pick) select.value = pick;
    select.addEventListener("change", () => sessionStorage.setItem(`maas.model.${select.id}`, select.value));
  } catch (err) {
    showError(r.error, err);
  }
}

// ---------------------------------------------------------------- views
// Each view renders into <main> and returns a cleanup function (timers, fetches).

const views = {};

views.models = async (main) => {
  const r = refs(main);
  let models = [];
  const render = () => {
    const q = main.querySelector("#model-filter").value.trim().toLowerCase();
    const shown = models.filter((m) => !q || m.id.toLowerCase().includes(q) || (m.task || "").includes(q));
    r.list.replaceChildren(...shown.map(modelCard));
    r.summary.textContent = `${shown.length} of ${models.length} models`;
  };
  main.querySelector("#model-filter").addEventListener("input", render);
  try {
    models = (await api("/v1/models")).data;
    render();
    // Fill each card with its headline metric and loss plot, in parallel.
    await Promise.all(models.map(async (m) => {
      try { decorateCard(m, await api(`${modelPath(m.id)}/card`)); } catch (_) { /* card stays plain */ }
    }));
  } catch (err) {
    showError(r.error, err);
  }
};

function modelCard(m) {
  const id = `card-${m.id.replace(/[^A-Za-z0-9_-]/g, "_")}`;
  return h("li", { class: "card", id, "data-model": m.id },
    h("h2", {}, h("a", { href: `#/models/${encodeURIComponent(m.id)}`, text: m.id })),
    h("p", {},
      h("span", { class: `badge task-${m.task}`, text: m.task || "unknown" }), " ",
      h("span", { class: "muted", text: `version ${m.version}` + (m.versions && m.versions.length > 1 ? ` of ${m.versions.length}` : "") })),
    h("p", { class: "muted small-print", text: `created ${fmtTime(m.created)}` }),
    h("p", { class: "headline", "data-ref": "headline" }),
    h("div", { class: "thumb", "data-ref": "thumb" }));
}

function decorateCard(m, card) {
  const li = document.querySelector(`li[data-model="${CSS.escape(m.id)}"]`);
  if (!li) return;
  const metrics = card.card.metrics || {};
  const keys = ["test_mse", "test_accuracy", "val_loss", "valid_loss", "train_loss"].filter((k) => k in metrics);
  li.querySelector('[data-ref="headline"]').textContent =
    keys.slice(0, 2).map((k) => `${k} ${fmtNumber(metrics[k])}`).join(" · ") ||
    [card.card.architecture, card.card.num_parameters && `${(card.card.num_parameters / 1e6).toFixed(0)}M params`]
      .filter(Boolean).join(" · ");
  if (card.plot_url) {
    li.querySelector('[data-ref="thumb"]').replaceChildren(
      h("img", { src: card.plot_url, alt: `Training and validation loss of ${card.id}`, loading: "lazy",
                 width: 320, height: 180 }));
  }
}

views.model = async (main, id) => {
  const r = refs(main);
  r.title.textContent = id;
  document.title = `${id} · maas console`;
  try {
    const card = await api(`${modelPath(id)}/card`);
    const c = card.card;
    r.title.textContent = card.id;
    r.description.textContent = c.description || "";
    fillKv(r.summary, [
      ["task", c.task], ["version", card.version], ["format", c.format], ["base model", c.base_model],
      ["architecture", c.architecture], ["parameters", c.num_parameters], ["context length", c.context_length],
      ["created", fmtTime(c.created_at)], ["training time (s)", c.training_time_s],
      ["source", c.source], ["run", c.run && c.run.name],
    ]);
    if (card.plot_url) {
      r["curve-section"].hidden = false;
      r.plot.src = card.plot_url;
      r.plot.alt = `Train and validation loss of ${card.id} per ${(c.loss_curve || []).some((p) => "step" in p) ? "step" : "epoch"}`;
      r["plot-caption"].textContent = c.loss_units ? `Loss in ${c.loss_units}.` : "";
    }
    const table = (section, el, obj) => {
      if (!obj || !Object.keys(obj).length) return;
      r[section].hidden = false;
      fillTable(el, ["name", "value"], Object.entries(obj));
    };
    table("metrics-section", r.metrics, c.metrics);
    table("hyper-section", r.hyper, c.hyperparameters || (c.spec && c.spec.training));
    table("data-section", r.data, c.data);
    r.markdown.textContent = card.markdown;
    if (c.task === "chat") r.actions.append(h("a", { class: "button", href: `#/chat?model=${encodeURIComponent(card.id)}`, text: "Chat with this model" }));
    if (c.task === "embedding") r.actions.append(h("a", { class: "button", href: `#/embeddings?model=${encodeURIComponent(card.id)}`, text: "Embed with this model" }));
    r.body.hidden = false;
  } catch (err) {
    showError(r.error, err);
  }
};

views.chat = async (main, _id, params) => {
  const r = refs(main);
  const history = []; // {role, content}
  let controller = null;
  await loadModelSelect(r, "chat", params.get("model"));

  r.input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      r.form.requestSubmit();
    }
  });
  r.clear.addEventListener("click", () => {
    history.length = 0;
    r.transcript.replaceChildren();
    r.stats.textContent = "";
    r.input.focus();
  });
  r.stop.addEventListener("click", () => controller && controller.abort());

  r.form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = r.input.value.trim();
    if (!text || controller) return;
    showError(r.error, null);
    history.push({ role: "user", content: text });
    r.transcript.append(h("li", { class: "msg user" }, h("span", { class: "role", text: "You" }), h("div", { class: "content", text })));
    const content = h("div", { class: "content", "data-chunks": "0" });
    const reply = h("li", { class: "msg assistant", "aria-busy": "true" },
      h("span", { class: "role", text: r.model.value }), content);
    r.transcript.append(reply);
    reply.scrollIntoView({ block: "end" });
    r.input.value = "";
    controller = new AbortController();
    r.send.disabled = true;
    r.stop.disabled = false;
    const system = r.system.value.trim();
    const body = {
      model: r.model.value,
      messages: (system ? [{ role: "system", content: system }] : []).concat(history),
      stream: true,
      stream_options: { include_usage: true },
      temperature: Number(r.temperature.value),
      max_tokens: Number(r["max-tokens"].value),
    };
    const started = performance.now();
    let firstAt = null;
    let usage = null;
    let finish = null;
    try {
      const response = await apiFetch("/v1/chat/completions", { method: "POST", body, signal: controller.signal });
      for await (const event of sseEvents(response)) {
        if (event.usage) usage = event.usage;
        for (const choice of event.choices || []) {
          const delta = (choice.delta && choice.delta.content) || "";
          if (delta) {
            if (firstAt === null) firstAt = performance.now();
            content.textContent += delta;
            content.dataset.chunks = String(Number(content.dataset.chunks) + 1);
            reply.scrollIntoView({ block: "end" });
          }
          finish = choice.finish_reason || finish;
        }
      }
      reply.dataset.finish = finish || "";
      history.push({ role: "assistant", content: content.textContent });
      const decodeSecs = firstAt === null ? 0 : (performance.now() - firstAt) / 1000;
      const parts = [];
      if (firstAt !== null) parts.push(`first token ${((firstAt - started) / 1000).toFixed(2)} s`);
      if (usage) {
        // Tokens after the first, over the time since it: the decode rate.
        const rate = usage.completion_tokens > 1 && decodeSecs > 0 ? (usage.completion_tokens - 1) / decodeSecs : null;
        parts.push(`${usage.completion_tokens} tokens` + (rate ? `, ${rate.toFixed(1)} tok/s` : ""));
      }
      if (finish) parts.push(`finish: ${finish}`);
      r.stats.textContent = parts.join(" · ");
      announce("Reply complete");
    } catch (err) {
      if (err.name === "AbortError") {
        reply.dataset.finish = "stopped";
        history.push({ role: "assistant", content: content.textContent });
        r.stats.textContent = "stopped";
      } else {
        reply.remove();
        history.pop();
        showError(r.error, err);
      }
    } finally {
      reply.removeAttribute("aria-busy");
      controller = null;
      r.send.disabled = false;
      r.stop.disabled = true;
      r.input.focus();
    }
  });
  return () => controller && controller.abort();
};

// Server-sent events from a fetch() response: yields each `data:` JSON object.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message || "stream error");
      yield event;
    }
  }
}

views.embeddings = async (main, _id, params) => {
  const r = refs(main);
  await loadModelSelect(r, "embedding", params.get("model"));
  r.form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const texts = r.input.value.split("\n").map((t) => t.trim()).filter(Boolean);
    if (!texts.length) return;
    showError(r.error, null);
    r.send.disabled = true;
    const started = performance.now();
    try {
      const body = { model: r.model.value, input: texts };
      if (r.dimensions.value) body.dimensions = Number(r.dimensions.value);
      const out = await api("/v1/embeddings", { method: "POST", body });
      const vectors = out.data.map((d) => d.embedding);
      const label = (i) => (texts[i].length > 28 ? `${texts[i].slice(0, 27)}…` : texts[i]);
      fillTable(r.similarity, ["", ...texts.map((_, i) => label(i))],
        vectors.map((a, i) => [label(i), ...vectors.map((b) => cosine(a, b))]));
      r.similarity.querySelectorAll("tbody td").forEach((td) => {
        const v = Number(td.textContent);
        td.style.backgroundColor = `hsla(210, 80%, 50%, ${Math.max(0, v) * 0.6})`;
      });
      fillTable(r.vectors, ["text", "dimensions", "first values"],
        vectors.map((v, i) => [label(i), v.length, v.slice(0, 6).map((x) => x.toFixed(3)).join(", ") + " …"]));
      r.results.hidden = false;
      r.stats.textContent = `${vectors.length} vectors of ${vectors[0].length} dimensions, ` +
        `${out.usage.prompt_tokens} tokens, ${((performance.now() - started) / 1000).toFixed(2)} s`;
    } catch (err) {
      showError(r.error, err);
    } finally {
      r.send.disabled = false;
    }
  });
};

function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
  return dot / Math.sqrt(na * nb || 1);
}

function statusBadge(status) {
  return h("span", { class: "badge", "data-status": status, text: status });
}

views.jobs = async (main) => {
  const r = refs(main);
  let timer = null;
  const load = async () => {
    clearTimeout(timer);
    try {
      const list = await api("/v1/fine_tuning/jobs?limit=100");
      showError(r.error, null);
      r.table.hidden = false;
      r.rows.replaceChildren(...list.data.map((job) => h("tr", { "data-job": job.id },
        h("th", { scope: "row" }, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, text: job.id })),
        h("td", { text: job.model }),
        h("td", {}, statusBadge(job.status)),
        h("td", { text: fmtTime(job.created_at) }),
        h("td", {}, job.fine_tuned_model
          ? h("a", { href: `#/models/${encodeURIComponent(job.fine_tuned_model)}`, text: job.fine_tuned_model }) : "—"))));
      r.summary.textContent = list.data.length ? `${list.data.length} jobs` : "No fine-tuning jobs yet.";
      if (list.data.some((j) => !TERMINAL.has(j.status))) timer = setTimeout(load, JOB_POLL_MS * 2);
    } catch (err) {
      r.table.hidden = true;
      showError(r.error, err.status === 404 ? new Error("This server has no fine-tuning API (/v1/fine_tuning/jobs answered 404).") : err);
    }
  };
  r.refresh.addEventListener("click", load);
  await load();
  return () => clearTimeout(timer);
};

views.job = async (main, id) => {
  const r = refs(main);
  r.title.textContent = id;
  document.title = `${id} · maas console`;
  let timer = null;
  let stopped = false;
  const base = `/v1/fine_tuning/jobs/${encodeURIComponent(id)}`;
  r.cancel.addEventListener("click", async () => {
    r.cancel.disabled = true;
    try {
      await api(`${base}/cancel`, { method: "POST" });
      announce("Cancellation requested");
      await load();
    } catch (err) {
      showError(r.error, err);
      r.cancel.disabled = false;
    }
  });
  const load = async () => {
    clearTimeout(timer);
    try {
      const [job, events] = await Promise.all([api(base), allEvents(base)]);
      if (stopped) return;
      showError(r.error, null);
      r.body.hidden = false;
      const previous = r.status.dataset.status;
      r.status.textContent = job.status;
      r.status.dataset.status = job.status;
      if (previous && previous !== job.status) announce(`Job ${job.status}`);
      r.cancel.hidden = TERMINAL.has(job.status);
      if (job.error && job.error.message) {
        r["job-error"].hidden = false;
        r["job-error"].textContent = `${job.error.code || "error"}: ${job.error.message}`;
      } else {
        r["job-error"].hidden = true;
      }
      const hp = job.hyperparameters || {};
      fillKv(r.details, [
        ["base model", job.model],
        ["fine-tuned model", job.fine_tuned_model
          ? h("a", { href: `#/models/${encodeURIComponent(job.fine_tuned_model)}`, text: job.fine_tuned_model }) : null],
        ["created", fmtTime(job.created_at)], ["finished", job.finished_at ? fmtTime(job.finished_at) : null],
        ["epochs", hp.n_epochs], ["batch size", hp.batch_size], ["learning rate multiplier", hp.learning_rate_multiplier],
        ["training file", job.training_file], ["validation file", job.validation_file],
        ["trained tokens", job.trained_tokens], ["seed", job.seed],
      ]);
      r.events.replaceChildren(...events.map((e) => h("li", { class: `event level-${e.level}` },
        h("time", { datetime: new Date(e.created_at * 1000).toISOString(), text: fmtTime(e.created_at) }), " ",
        h("span", { class: "level", text: e.level }), " ", e.message)));
      const points = events.filter((e) => e.type === "metrics" && e.data).map((e) => e.data)
        .sort((a, b) => (a.step || 0) - (b.step || 0));
      drawLossChart(r.chart, points);
      r["chart-note"].textContent = points.length
        ? `${points.length} points; latest step ${points[points.length - 1].step}: train loss ${fmtNumber(points[points.length - 1].train_loss)}`
        : "No metrics yet.";
      if (!TERMINAL.has(job.status)) timer = setTimeout(load, JOB_POLL_MS);
    } catch (err) {
      showError(r.error, err);
      if (err.status !== 404 && !stopped) timer = setTimeout(load, JOB_POLL_MS * 2);
    }
  };
  await load();
  return () => { stopped = true; clearTimeout(timer); };
};

// Every event of a job (the API pages newest first with `after`).
async function allEvents(base) {
  const out = [];
  let after = null;
  for (let page = 0; page < 20; page++) {
    const q = new URLSearchParams({ limit: "500" });
    if (after) q.set("after", after);
    const res = await api(`${base}/events?${q}`);
    out.push(...res.data);
    if (!res.has_more || !res.data.length) break;
    after = res.data[res.data.length - 1].id;
  }
  return out;
}

// A small line chart on <canvas>: train and validation loss per step.
function drawLossChart(canvas, points) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 640;
  const height = Math.round(width / 2);
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  canvas.style.height = `${height}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  const css = getComputedStyle(canvas);
  const fg = css.color || "#222";
  ctx.clearRect(0, 0, width, height);
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillStyle = fg;
  const series = [
    { key: "train_loss", label: "train", color: "#1f77b4" },
    { key: "valid_loss", label: "validation", color: "#d62728" },
  ].map((s) => ({ ...s, pts: points.filter((p) => Number.isFinite(p[s.key])).map((p) => [p.step, p[s.key]]) }))
    .filter((s) => s.pts.length);
  if (!series.length) {
    ctx.fillText("waiting for metrics…", 16, height / 2);
    return;
  }
  const all = series.flatMap((s) => s.pts);
  const [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  const [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  const pad = { l: 52, r: 12, t: 24, b: 32 };
  const sx = (x) => pad.l + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (width - pad.l - pad.r);
  const sy = (y) => height - pad.b - (y1 === y0 ? 0.5 : (y - y0) / (y1 - y0)) * (height - pad.t - pad.b);
  ctx.strokeStyle = fg;
  ctx.globalAlpha = 0.3;
  ctx.beginPath();
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    ctx.moveTo(pad.l, sy(y));
    ctx.lineTo(width - pad.r, sy(y));
  }
  ctx.stroke();
  ctx.globalAlpha = 1;
  ctx.textAlign = "right";
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    ctx.fillText(y.toPrecision(3), pad.l - 6, sy(y) + 4);
  }
  ctx.textAlign = "center";
  ctx.fillText(`step ${x0}`, pad.l + 20, height - 10);
  ctx.fillText(`step ${x1}`, width - pad.r - 24, height - 10);
  ctx.textAlign = "left";
  series.forEach((s, i) => {
    ctx.strokeStyle = s.color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    s.pts.forEach(([x, y], j) => (j ? ctx.lineTo(sx(x), sy(y)) : ctx.moveTo(sx(x), sy(y))));
    ctx.stroke();
    ctx.fillStyle = s.color;
    ctx.fillRect(pad.l + 8 + i * 100, 8, 12, 3);
    ctx.fillStyle = fg;
    ctx.fillText(`${s.label} loss`, pad.l + 24 + i * 100, 14);
  });
}

// ---------------------------------------------------------------- router

let cleanup = null;

function parseRoute() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query] = raw.split("?");
  const [page, ...rest] = path.split("/");
  const id = rest.length ? decodeURIComponent(rest.join("/")) : null;
  const known = { models: id ? "model" : "models", chat: "chat", embeddings: "embeddings", jobs: id ? "job" : "jobs" };
  return { view: page === "" ? "models" : known[page] || "missing", nav: page || "models", id, params: new URLSearchParams(query || "") };
}

async function route() {
  if (cleanup) { try { cleanup(); } catch (_) { /* ignore */ } cleanup = null; }
  const { view, nav, id, params } = parseRoute();
  const main = document.getElementById("main");
  main.replaceChildren(document.getElementById(`view-${view}`).content.cloneNode(true));
  document.title = `${main.querySelector("h1").textContent} · maas console`;
  document.querySelectorAll("[data-nav]").forEach((a) => {
    if (a.dataset.nav === nav) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  });
  const heading = main.querySelector("h1");
  if (route.started) heading.focus();  // move focus for keyboard and screen-reader users
  route.started = true;
  main.dataset.view = view;
  main.dataset.ready = "false";
  const generation = (route.generation = (route.generation || 0) + 1);
  const fn = views[view];
  const done = fn ? await fn(main, id, params) : null;
  const stop = typeof done === "function" ? done : null;
  if (generation !== route.generation) { if (stop) stop(); return; }  // navigated away meanwhile
  cleanup = stop;
  main.dataset.ready = "true";
}

function initApiKey() {
  const input = document.getElementById("api-key");
  input.value = sessionStorage.getItem(KEY_STORAGE) || "";
  input.addEventListener("change", () => {
    const v = input.value.trim();
    if (v) sessionStorage.setItem(KEY_STORAGE, v);
    else sessionStorage.removeItem(KEY_STORAGE);
    announce(v ? "API key saved for this tab" : "API key cleared");
    route();
  });
  document.getElementById("api-key-clear").addEventListener("click", () => {
    input.value = "";
    input.dispatchEvent(new Event("change"));
  });
}

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => {
  initApiKey();
  route();
});
