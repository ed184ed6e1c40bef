// alignserve playground: one prompt, the base model and up to three guided or searched configurations
// side by side, each streamed from the server's own OpenAI-compatible API.
//
// The selects and parameter inputs come from GET /v1/models and GET /v1/guidance, so modules, guide
// models, search strategies and parameters added to the server (a KL budget, say) appear here as
// soon as the server advertises them.
"use strict";

const MAX_CONFIGURATIONS = 3;  // besides the base column
// Starting values for parameters the API requires (no default in its schema); others start empty,
// which leaves them to the server's default.
const STARTING_VALUES = { strength: 4, n: 4, candidates: 4, block_tokens: 4, every: 4, fraction: 0.5 };
const LABELS = { max_kl: "KL budget (max_kl)", temperature: "selection temperature" };
// Handled by their own controls, not by the generic parameter inputs.
const MODULE_FIELDS = new Set(["type", "model"]);
const SEARCH_FIELDS = new Set(["type", "scorer", "reference", "prune"]);
const PRUNE_FIELDS = new Set(["scorer"]);
// Request fields the openai SDK takes as arguments; the rest go in `extra_body`.
const SDK_ARGUMENTS = new Set(["model", "messages", "prompt", "max_tokens", "temperature", "seed", "stream",
  "stream_options"]);
const ENDPOINTS = { chat: "v1/chat/completions", completion: "v1/completions" };

const $ = (selector, root = document) => root.querySelector(selector);
// The page lives at /playground/; the API is beside it, wherever the server is mounted.
const apiUrl = (path) => new URL(`../${path}`, location.href).href;

const state = { catalog: null, columns: [], nextNumber: 1, running: null };

class ApiError extends Error {}

function authHeaders() {
  const key = $("#api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function describeError(status, body) {
  const error = body && body.error;
  if (!error) return `HTTP ${status}`;
  const param = error.param ? ` (${error.param})` : "";
  return `${status ? `${status} ` : ""}${error.code || error.type || "error"}: ${error.message}${param}`;
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not the API's JSON envelope (a proxy's page, say): the status says enough.
  }
  return new ApiError(describeError(response.status, body));
}

async function getJson(path) {
  const response = await fetch(apiUrl(path), { headers: authHeaders() });
  if (!response.ok) throw await failure(response);
  return response.json();
}

function setStatus(message) {
  const status = $("#status");
  status.textContent = message;
  status.hidden = !message;
}

function fillSelect(select, options, keep = true) {
  const previous = select.value;
  select.replaceChildren(...options.map(({ value, label, disabled }) => {
    const option = new Option(label ?? value, value);
    option.disabled = Boolean(disabled);
    return option;
  }));
  if (keep && options.some((option) => option.value === previous && !option.disabled)) select.value = previous;
}

async function connect() {
  setStatus("");
  try {
    const [models, catalog] = await Promise.all([getJson("v1/models"), getJson("v1/guidance")]);
    fillSelect($("#model"), models.data.map((card) => ({ value: card.id })));
    state.catalog = catalog;
    if (state.columns.length === 0) {
      addColumn(true);
      addColumn(false);
    }
    state.columns.forEach((column) => column.refresh());
    $("#run").disabled = false;
    updateAddButton();
  } catch (error) {
    setStatus(`Could not load the server's models and guidance: ${error.message}`);
  }
}

// Parameter inputs -------------------------------------------------------------------------------

function schemaType(property) {
  if (property.type) return property.type;
  const types = (property.anyOf || []).map((option) => option.type).filter((type) => type && type !== "null");
  return types[0];
}

// The object schema of a parameter that is an object or null (best-of-N's `prune`).
function objectSchema(property) {
  return [property, ...(property.anyOf || [])].find((option) => option.type === "object");
}

// One input per scalar parameter of a JSON schema's properties, in the schema's order.
function renderParams(container, properties, skip) {
  const previous = readParams(container);
  container.replaceChildren();
  for (const [name, property] of Object.entries(properties)) {
    const type = schemaType(property);
    if (skip.has(name) || !["integer", "number", "string"].includes(type)) continue;
    const input = document.createElement("input");
    input.name = name;
    input.dataset.kind = type;
    if (type === "string") {
      input.type = "text";
    } else {
      input.type = "number";
      input.step = type === "integer" ? "1" : "any";
      // The server enforces exclusive bounds; as the input's bounds they catch the rest.
      const minimum = property.minimum ?? property.exclusiveMinimum;
      const maximum = property.maximum ?? property.exclusiveMaximum;
      if (minimum !== undefined) input.min = minimum;
      if (maximum !== undefined) input.max = maximum;
    }
    const required = !("default" in property);
    if (name in previous) input.value = previous[name];
    else if (required && name in STARTING_VALUES) input.value = STARTING_VALUES[name];
    if (!required && property.default !== null) input.placeholder = String(property.default);
    input.required = required;
    const label = document.createElement("label");
    label.title = property.description || "";
    label.append(LABELS[name] || name, input);
    container.append(label);
  }
}

// The parameters the user set; an empty input is left to the server's default.
function readParams(container) {
  const params = {};
  for (const input of container.querySelectorAll("input[name]")) {
    if (input.value === "") continue;
    params[input.name] = input.dataset.kind === "string" ? input.value : Number(input.value);
  }
  return params;
}

// Columns ----------------------------------------------------------------------------------------

class Column {
  constructor(isBase) {
    this.isBase = isBase;
    this.el = $("#column-template").content.firstElementChild.cloneNode(true);
    this.number = isBase ? 0 : state.nextNumber++;
    $("h2", this.el).textContent = isBase ? "Base" : `Configuration ${this.number}`;
    this.el.dataset.column = isBase ? "base" : String(this.number);
    this.lastRequest = null;
    if (isBase) {
      $(".config", this.el).remove();
      $(".remove", this.el).remove();
    } else {
      $(".remove", this.el).addEventListener("click", () => removeColumn(this));
      for (const select of ["module", "guide-model", "search-type", "scorer"]) {
        this.field(select).addEventListener("change", () => this.refresh());
      }
      this.field("prune").addEventListener("change", () => this.refresh());
    }
    $(".copy-curl", this.el).addEventListener("click", () => this.copy("curl"));
    $(".copy-python", this.el).addEventListener("click", () => this.copy("python"));
  }

  field(name) {
    return $(`.${name}`, this.el);
  }

  module() {
    return state.catalog.modules.find((module) => module.type === this.field("module").value);
  }

  searchType() {
    return state.catalog.search.types.find((search) => search.type === this.field("search-type").value);
  }

  // Re-derive every select and input from the catalog and the current choices.
  refresh() {
    if (this.isBase || !state.catalog) return;
    const { modules, guide_models: guideModels, search } = state.catalog;
    const moduleSelect = this.field("module");
    const firstFill = moduleSelect.options.length === 0;
    fillSelect(moduleSelect, [{ value: "", label: "none" }, ...modules.map((module) => ({ value: module.type }))]);
    if (firstFill && modules.length) moduleSelect.value = modules[0].type;
    const module = this.module();
    this.el.querySelectorAll(".needs-module").forEach((el) => { el.hidden = !module; });
    if (module) {
      const fitting = guideModels.filter((model) => module.guide_heads.includes(model.head));
      fillSelect(this.field("guide-model"), fitting.length
        ? fitting.map((model) => ({ value: model.name, label: `${model.name} (${model.head})` }))
        : [{ value: "", label: "no guide model for this module", disabled: true }]);
      renderParams($(".module-params", this.el), module.parameters, MODULE_FIELDS);
    }

    fillSelect(this.field("search-type"),
      [{ value: "", label: "none" }, ...search.types.map((type) => ({ value: type.type }))]);
    const searchType = this.searchType();
    this.el.querySelectorAll(".needs-search").forEach((el) => { el.hidden = !searchType; });
    if (searchType) {
      fillSelect(this.field("scorer"), search.scorers.map((scorer) => ({
        value: scorer.name, label: `${scorer.name} (${scorer.kind === "model" ? scorer.head : "verifier"})` })));
      const scorer = search.scorers.find((candidate) => candidate.name === this.field("scorer").value);
      $(".reference-field", this.el).hidden = !(scorer && scorer.needs_reference);
      renderParams($(".search-params", this.el), searchType.parameters, SEARCH_FIELDS);
      // A verifier judges finished answers only, so only model scorers can prune.
      const pruners = search.scorers.filter((scorer) => scorer.kind === "model");
      $(".prune-fields", this.el).hidden = !("prune" in searchType.parameters) || pruners.length === 0;
      fillSelect(this.field("prune-scorer"), pruners.map((scorer) => ({ value: scorer.name })));
      if ("prune" in searchType.parameters) {
        renderParams($(".prune-inputs", this.el), objectSchema(searchType.parameters.prune).properties, PRUNE_FIELDS);
      }
      $(".prune-params", this.el).hidden = !this.field("prune").checked;
    }
  }

  // The request body this column sends, given the shared request settings.
  body(shared) {
    const body = { ...shared };
    if (this.isBase) return body;
    const module = this.module();
    if (module) {
      body.guidance = [{ type: module.type, model: this.field("guide-model").value,
        ...readParams($(".module-params", this.el)) }];
    }
    const searchType = this.searchType();
    if (searchType) {
      const search = { type: searchType.type, scorer: this.field("scorer").value,
        ...readParams($(".search-params", this.el)) };
      if (!$(".reference-field", this.el).hidden) search.reference = this.field("reference").value;
      if (!$(".prune-fields", this.el).hidden && this.field("prune").checked) {
        search.prune = { scorer: this.field("prune-scorer").value, ...readParams($(".prune-inputs", this.el)) };
      }
      body.search = search;
    }
    return body;
  }

  reset() {
    $(".output", this.el).textContent = "";
    $(".error", this.el).hidden = true;
    this.el.querySelectorAll("[data-stat]").forEach((dd) => { dd.textContent = "–"; });
    this.el.classList.remove("done", "failed");
    this.el.classList.add("running");
    $(".snippet", this.el).hidden = true;
  }

  stat(name, value) {
    $(`[data-stat="${name}"]`, this.el).textContent = value;
  }

  async run(endpoint, body, signal) {
    this.reset();
    this.lastRequest = { url: apiUrl(ENDPOINTS[endpoint]), endpoint, body, authorized: "Authorization" in authHeaders() };
    this.el.querySelectorAll(".copy-curl, .copy-python").forEach((button) => { button.disabled = false; });
    const output = $(".output", this.el);
    const started = performance.now();
    let firstToken = null;
    const elapsed = () => `${((performance.now() - started) / 1000).toFixed(2)} s`
      + (firstToken === null ? "" : ` (first token ${((firstToken - started) / 1000).toFixed(2)} s)`);
    try {
      const response = await fetch(this.lastRequest.url, {
        method: "POST", signal, body: JSON.stringify(body),
        headers: { "Content-Type": "application/json", ...authHeaders() },
      });
      if (!response.ok) throw await failure(response);
      for await (const data of serverSentEvents(response.body)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(describeError(null, chunk));
        for (const choice of chunk.choices) {
          const text = endpoint === "chat" ? choice.delta && choice.delta.content : choice.text;
          if (text) {
            if (firstToken === null) firstToken = performance.now();
            output.textContent += text;
          }
          if (choice.guidance) this.report(choice.guidance);
          if (choice.finish_reason) this.stat("finish", choice.finish_reason);
        }
        if (chunk.usage) this.stat("tokens", String(chunk.usage.completion_tokens));
        this.stat("time", elapsed());
      }
      this.el.classList.add("done");
    } catch (error) {
      if (error.name === "AbortError") return;
      const message = $(".error", this.el);
      message.textContent = error.message;
      message.hidden = false;
      this.el.classList.add("failed");
    } finally {
      this.stat("time", elapsed());
      this.el.classList.remove("running");
    }
  }

  // The choice's guidance report: KL and steps of per-step guidance, a search's scores.
  report(guidance) {
    this.stat("kl", guidance.kl.toFixed(4));
    this.stat("steps", String(guidance.steps));
    if (guidance.score !== undefined) this.stat("score", formatScore(guidance.score));
    if (guidance.candidate_scores) {
      this.stat("candidates", guidance.candidate_scores.map((score, index) => {
        const shown = score === null ? "pruned" : formatScore(score);
        return index === guidance.selected ? `[${shown}]` : shown;
      }).join(", "));
    }
    if (guidance.generated_tokens !== undefined) this.stat("generated", String(guidance.generated_tokens));
  }

  async copy(format) {
    const text = format === "curl" ? curlCommand(this.lastRequest) : pythonScript(this.lastRequest);
    const snippet = $(".snippet", this.el);
    snippet.textContent = text;
    snippet.hidden = false;
    snippet.dataset.format = format;
    const button = $(`.copy-${format}`, this.el);
    const label = button.textContent;
    button.textContent = (await copyText(text, snippet)) ? "Copied" : "Select and copy below";
    setTimeout(() => { button.textContent = label; }, 1500);
  }
}

function formatScore(score) {
  return Number.isInteger(score) ? String(score) : score.toFixed(3);
}

// The `data:` payloads of a server-sent event stream, as they arrive.
async function* serverSentEvents(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) !== -1) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

// The clipboard API exists only on secure origins (https, localhost); elsewhere the shown snippet is
// selected and copied the old way.
async function copyText(text, snippet) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // Permission refused: fall through to the selection.
    }
  }
  const range = document.createRange();
  range.selectNodeContents(snippet);
  const selection = getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
  return document.execCommand("copy");
}

// Copy as curl / Python. The API key stays out of the text (snippets get pasted into chats and
// tickets): it is read from OPENAI_API_KEY, the variable the openai SDK reads too.

function shellQuote(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

function curlCommand({ url, body, authorized }) {
  const lines = [`curl -N ${shellQuote(url)}`, `-H 'Content-Type: application/json'`];
  if (authorized) lines.push(`-H "Authorization: Bearer $OPENAI_API_KEY"`);
  lines.push(`-d ${shellQuote(JSON.stringify(body))}`);
  return lines.join(" \\\n  ");
}

// A JSON value written as a Python literal.
function pythonLiteral(value) {
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) return `[${value.map(pythonLiteral).join(", ")}]`;
  if (typeof value === "object") {
    return `{${Object.entries(value).map(([key, item]) => `${JSON.stringify(key)}: ${pythonLiteral(item)}`).join(", ")}}`;
  }
  return JSON.stringify(value);
}

function pythonScript({ url, endpoint, body, authorized }) {
  const baseUrl = url.slice(0, url.indexOf("/v1/") + 3);
  const args = [];
  const extra = {};
  for (const [name, value] of Object.entries(body)) {
    if (SDK_ARGUMENTS.has(name)) args.push(`    ${name}=${pythonLiteral(value)},`);
    else extra[name] = value;
  }
  if (Object.keys(extra).length) args.push(`    extra_body=${pythonLiteral(extra)},`);
  const text = endpoint === "chat" ? "choice.delta.content" : "choice.text";
  return [
    ...(authorized ? ["import os", ""] : []),
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${JSON.stringify(baseUrl)}, api_key=${authorized ? 'os.environ["OPENAI_API_KEY"]' : '"unused"'})`,
    `stream = client.${endpoint === "chat" ? "chat.completions" : "completions"}.create(`,
    ...args,
    ")",
    "for chunk in stream:",
    "    for choice in chunk.choices:",
    `        print(${text} or "", end="", flush=True)`,
    "        if choice.finish_reason:  # the guidance report (KL, steps, scores) comes with it",
    '            print("\\nguidance:", (choice.model_extra or {}).get("guidance"))',
    "    if chunk.usage:",
    '        print("usage:", chunk.usage)',
  ].join("\n");
}

// The page --------------------------------------------------------------------------------------

function addColumn(isBase) {
  const column = new Column(isBase);
  state.columns.push(column);
  $("#columns").append(column.el);
  column.refresh();
  updateAddButton();
  return column;
}

function removeColumn(column) {
  state.columns = state.columns.filter((other) => other !== column);
  column.el.remove();
  updateAddButton();
}

function updateAddButton() {
  const configured = state.columns.filter((column) => !column.isBase).length;
  $("#add-column").disabled = !state.catalog || configured >= MAX_CONFIGURATIONS;
}

function sharedBody(endpoint) {
  const body = { model: $("#model").value };
  const prompt = $("#prompt").value;
  if (endpoint === "chat") {
    const system = $("#system").value.trim();
    body.messages = [...(system ? [{ role: "system", content: system }] : []), { role: "user", content: prompt }];
  } else {
    body.prompt = prompt;
  }
  body.max_tokens = Number($("#max-tokens").value);
  body.temperature = Number($("#temperature").value);
  if ($("#seed").value !== "") body.seed = Number($("#seed").value);
  body.stream = true;
  body.stream_options = { include_usage: true };
  return body;
}

function runComparison() {
  if ($("#run").disabled) return;
  if (state.running) state.running.abort();  // a new run replaces the one still streaming
  const controller = new AbortController();
  state.running = controller;
  const endpoint = $("#mode").value;
  const shared = sharedBody(endpoint);
  const runs = state.columns.map((column) => column.run(endpoint, column.body(shared), controller.signal));
  document.body.classList.add("running");
  Promise.all(runs).then(() => {
    if (state.running === controller) {
      state.running = null;
      document.body.classList.remove("running");
    }
  });
}

function showEndpointFields() {
  const chat = $("#mode").value === "chat";
  $("#system-field").hidden = !chat;
  $("#prompt-label").textContent = chat ? "User message" : "Prompt";
}

document.addEventListener("DOMContentLoaded", () => {
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    connect();
  });
  $("#run").addEventListener("click", runComparison);
  $("#add-column").addEventListener("click", () => addColumn(false));
  $("#mode").addEventListener("change", showEndpointFields);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) runComparison();
  });
  showEndpointFields();
  connect();
});
