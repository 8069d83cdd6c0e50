// The chat page of `qlora-pipeline serve`: talks to this server's own OpenAI API and nothing else.
// Every text a model or a file brings is put on the page with textContent, never as HTML.
"use strict";

const KEY_STORE = "qlora-pipeline-api-key"; // sessionStorage: gone when the tab closes
const SETTINGS = ["temperature", "top_p", "max_tokens", "seed"];
const $ = (id) => document.getElementById(id);

const state = {
  models: [], // the cards of GET /v1/models
  panes: {a: {model: null, messages: []}, b: {model: null, messages: []}},
  running: [], // AbortControllers of the replies being streamed
};

function status(text) {
  $("status").textContent = text || "";
}

async function api(path, options = {}) {
  const headers = {"Content-Type": "application/json", ...(options.headers || {})};
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers.Authorization = "Bearer " + key;
  const response = await fetch(path, {...options, headers});
  if (response.status === 401) {
    $("key-form").hidden = false;
    $("api-key").focus();
    throw new Error(key ? "the API key was refused; enter it again" : "this server needs its API key");
  }
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try {
      message = (await response.json()).error.message;
    } catch (_) { /* not OpenAI's error shape: keep the status line */ }
    throw new Error(message);
  }
  return response;
}

// ------------------------------------------------------------------------------ models, settings

async function loadModels() {
  const cards = (await (await api("/v1/models")).json()).data;
  state.models = cards;
  for (const id of ["model-a", "model-b"]) {
    const select = $(id);
    const previous = select.value;
    select.replaceChildren(...cards.map((card) => new Option(card.id, card.id)));
    if (cards.some((card) => card.id === previous)) select.value = previous;
  }
  const firstAdapter = cards.find((card) => card.id !== "base");
  if (!state.panes.a.model) $("model-a").value = firstAdapter ? firstAdapter.id : cards[0].id;
  if (!state.panes.b.model) $("model-b").value = "base";
  state.panes.a.model = $("model-a").value;
  state.panes.b.model = $("model-b").value;
  showModelInfo();
  status("");
}

function card(id) {
  return state.models.find((c) => c.id === id) || {};
}

function showModelInfo() {
  const shown = comparing() ? [state.panes.a.model, state.panes.b.model] : [state.panes.a.model];
  $("trained-system").textContent = shown
    .map((id) => `${id}: trained system prompt ${JSON.stringify(card(id).system_prompt || "(none)")}`)
    .join("\n");
  // each model has its own defaults (the decoding chosen for it on validation, else the params' chat section)
  const decoding = (id) => Object.entries(card(id).default_decoding || {})
    .map(([k, v]) => `${k} ${JSON.stringify(v)}`).join(", ");
  $("defaults").textContent = "Empty fields take each model's defaults: " +
    shown.map((id) => `${id}: ${decoding(id)}`).join("; ");
  $("pane-a").querySelector(".pane-title").textContent = state.panes.a.model;
  $("pane-b").querySelector(".pane-title").textContent = state.panes.b.model;
}

function comparing() {
  return $("compare").checked;
}

function settings() {
  const out = {};
  for (const name of SETTINGS) {
    const raw = $(name).value.trim();
    if (raw !== "") out[name] = Number(raw);
  }
  return out;
}

// ------------------------------------------------------------------------------ conversation

function addMessage(paneId, message) {
  const item = document.createElement("li");
  item.className = message.role;
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = message.content; // text, never markup
  item.append(text);
  if (message.role === "assistant" && message.model) {
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = message.model + (message.finish_reason ? " · " + message.finish_reason : "");
    item.append(meta);
  }
  $("pane-" + paneId).querySelector(".log").append(item);
  item.scrollIntoView({block: "end"});
  return item;
}

function render() {
  for (const id of ["a", "b"]) {
    $("pane-" + id).querySelector(".log").replaceChildren();
    for (const message of state.panes[id].messages) addMessage(id, message);
  }
  showModelInfo();
}

function requestMessages(pane) {
  const system = $("system").value.trim();
  const turns = pane.messages.filter((m) => m.role !== "error").map((m) => ({role: m.role, content: m.content}));
  return system ? [{role: "system", content: system}, ...turns] : turns;
}

async function streamReply(paneId) {
  const pane = state.panes[paneId];
  const controller = new AbortController();
  state.running.push(controller);
  const reply = {role: "assistant", content: "", model: pane.model, settings: settings()};
  const item = addMessage(paneId, {role: "assistant", content: ""});
  item.dataset.streaming = "true";
  const text = item.querySelector(".text");
  try {
    const body = {model: pane.model, messages: requestMessages(pane), stream: true, ...reply.settings};
    const response = await api("/v1/chat/completions", {method: "POST", body: JSON.stringify(body),
                                                         signal: controller.signal});
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      // Server-sent events end lines with \r\n, \n or \r (sse-starlette sends \r\n).
      buffer = (buffer + decoder.decode(value, {stream: true})).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message);
          const choice = (chunk.choices || [])[0];
          if (!choice) continue;
          if (choice.delta && choice.delta.content) {
            reply.content += choice.delta.content;
            text.textContent = reply.content;
          }
          if (choice.finish_reason) reply.finish_reason = choice.finish_reason;
        }
      }
    }
  } catch (err) {
    if (err.name === "AbortError") {
      reply.finish_reason = "stopped";
    } else {
      item.remove();
      const failure = {role: "error", content: String(err.message || err)};
      pane.messages.push(failure);
      addMessage(paneId, failure);
      return;
    }
  } finally {
    state.running = state.running.filter((c) => c !== controller);
  }
  pane.messages.push(reply);
  item.remove();
  addMessage(paneId, reply).dataset.done = "true";
}

async function send(event) {
  event.preventDefault();
  const content = $("message").value.trim();
  if (!content || state.running.length) return;
  $("message").value = "";
  const panes = comparing() ? ["a", "b"] : ["a"];
  for (const id of panes) {
    const message = {role: "user", content};
    state.panes[id].messages.push(message);
    addMessage(id, message);
  }
  busy(true);
  await Promise.all(panes.map(streamReply));
  busy(false);
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  document.body.dataset.busy = on ? "true" : "false";
}

// ------------------------------------------------------------------------------ save, open

function save() {
  const panes = comparing() ? ["a", "b"] : ["a"];
  const saved = {
    format: "qlora-pipeline-chat/1",
    saved_at: new Date().toISOString(),
    system_prompt: $("system").value.trim() || null,
    settings: settings(),
    conversations: panes.map((id) => ({model: state.panes[id].model, messages: state.panes[id].messages})),
  };
  const blob = new Blob([JSON.stringify(saved, null, 2)], {type: "application/json"});
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "conversation-" + saved.saved_at.replace(/[:.]/g, "-") + ".json";
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

async function open(event) {
  const file = event.target.files[0];
  event.target.value = "";
  if (!file) return;
  try {
    const saved = JSON.parse(await file.text());
    const conversations = saved.conversations;
    if (saved.format !== "qlora-pipeline-chat/1" || !Array.isArray(conversations) || !conversations.length ||
        conversations.length > 2) throw new Error("not a conversation saved by this page");
    const ids = ["a", "b"];
    conversations.forEach((conversation, i) => {
      const messages = (conversation.messages || []).filter(
        (m) => m && typeof m.content === "string" && ["user", "assistant", "error"].includes(m.role));
      state.panes[ids[i]] = {model: String(conversation.model), messages};
    });
    $("compare").checked = conversations.length === 2;
    toggleCompare();
    $("system").value = saved.system_prompt || "";
    render();
    status("");
  } catch (err) {
    status(`${file.name}: ${err.message}`);
  }
}

// ------------------------------------------------------------------------------ wiring

function toggleCompare() {
  $("pane-b").hidden = !comparing();
  $("model-b").disabled = !comparing();
  showModelInfo();
}

function startOver() {
  for (const controller of state.running) controller.abort();
  for (const id of ["a", "b"]) state.panes[id].messages = [];
  render();
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    $("api-key").value = "";
    $("key-form").hidden = true;
    loadModels().catch((err) => status(err.message));
  });
  $("model-a").addEventListener("change", (e) => { state.panes.a.model = e.target.value; showModelInfo(); });
  $("model-b").addEventListener("change", (e) => { state.panes.b.model = e.target.value; showModelInfo(); });
  $("compare").addEventListener("change", toggleCompare);
  $("send-form").addEventListener("submit", send);
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) send(event);
  });
  $("stop").addEventListener("click", () => state.running.forEach((c) => c.abort()));
  $("new").addEventListener("click", startOver);
  $("save").addEventListener("click", save);
  $("open").addEventListener("change", open);
  busy(false);
  loadModels().catch((err) => status(err.message));
});
