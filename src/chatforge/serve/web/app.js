// The chatforge chat page: plain JavaScript over the server's OpenAI-compatible API (/v1/...).
// The part worth reading is streamChat(): how a streamed reply is read piece by piece as it is generated.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "chatforge-api-key";

const state = {
  models: [],        // [{id, context}] from /v1/models
  history: [],       // the chat so far: [{role: "user" | "assistant", content}]
  controller: null,  // the AbortController of the request(s) streaming now; null when idle
};

// ---- talking to the API -------------------------------------------------------------------------

function headers() {
  // The key is kept in localStorage so a reload does not ask for it again.
  const key = localStorage.getItem(KEY_STORAGE);
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// The server answers every error with {"error": {"message", "code", ...}}; fall back to the status line.
async function apiError(response) {
  if (response.status === 401) showKeyForm();
  try {
    const { message, code } = (await response.json()).error;
    return Object.assign(new Error(message), { code });
  } catch {
    return new Error(`${response.status} ${response.statusText}`);
  }
}

async function loadModels() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (e) {
    return showError(`Could not reach the server: ${e.message}`);
  }
  if (!response.ok) return showError((await apiError(response)).message);
  state.models = (await response.json()).data.map((m) => ({ id: m.id, context: m.context }));
  $("key-form").hidden = true;
  showError("");
  fillModelPickers();
}

// POST one chat completion with stream: true and call onText(replySoFar) each time a piece arrives.
// Resolves to the whole reply. Rejects on an API error, a network error or abort (signal).
async function streamChat(model, messages, signal, onText) {
  const body = { model: model.id, messages, stream: true, ...sampling(model) };
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(body), signal,
  });
  if (!response.ok) throw await apiError(response);

  // The body is server-sent events: "data: {json}\n\n" per piece, then "data: [DONE]".
  // It arrives in network chunks that can end anywhere: mid-line, even mid-character.
  const reader = response.body.getReader();
  const decoder = new TextDecoder();  // UTF-8
  let buffer = "";
  let reply = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return reply;  // the server closed the stream
    // {stream: true}: bytes of a character split across two chunks (a Chinese character is 3 bytes)
    // are held back until the rest arrives, instead of each half becoming a "�".
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split("\n");
    buffer = lines.pop();  // the last piece may be an unfinished line: keep it for the next chunk
    for (const line of lines) {
      if (!line.startsWith("data: ")) continue;  // blank separator lines (and SSE comments)
      const data = line.slice("data: ".length);
      if (data === "[DONE]") return reply;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const piece = chunk.choices?.[0]?.delta?.content;
      if (piece) {
        reply += piece;
        onText(reply);
      }
    }
  }
}

// The settings every request is sent with. The server refuses max_tokens above a model's context,
// so the page asks for at most that much (the server also stops where the context is full).
function sampling(model) {
  const wanted = parseInt($("max-tokens").value, 10) || 100;
  return {
    temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top-p").value),
    max_tokens: model.context ? Math.min(wanted, model.context) : wanted,
  };
}

function systemMessages() {
  const text = $("system").value.trim();
  return text ? [{ role: "system", content: text }] : [];
}

const isAbort = (e) => e.name === "AbortError";

// ---- the page around it -------------------------------------------------------------------------

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function showKeyForm() {
  $("key-form").hidden = false;
  $("api-key").focus();
}

function fillModelPickers() {
  const select = $("model");
  const boxes = $("arena-models");
  select.replaceChildren();
  boxes.replaceChildren();
  for (const model of state.models) {
    select.append(new Option(model.id, model.id));
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = true;  // the arena compares every model unless told otherwise
    box.value = model.id;
    box.dataset.testid = "arena-model";
    const label = document.createElement("label");
    label.append(box, ` ${model.id}`);
    boxes.append(label);
  }
  // Chat with a chat model by default: a base (pre-trained) model only continues text.
  const chatModel = state.models.find((m) => !["pretrain", "base"].includes(m.id));
  if (chatModel) select.value = chatModel.id;
}

// While a reply streams, Send waits and Stop is live (one conversation turn at a time).
function setBusy(controller) {
  state.controller = controller;
  for (const id of ["send", "arena-send"]) $(id).disabled = Boolean(controller);
  for (const id of ["stop", "arena-stop"]) $(id).disabled = !controller;
}

function stop() {
  if (state.controller) state.controller.abort();
}

function addBubble(role, text) {
  const bubble = document.createElement("li");
  bubble.className = `msg ${role}`;
  bubble.dataset.testid = `msg-${role}`;
  bubble.textContent = text;  // textContent, never innerHTML: model text is shown as text, not run as HTML
  $("messages").append(bubble);
  bubble.scrollIntoView({ block: "end" });
  return bubble;
}

// ---- chat ---------------------------------------------------------------------------------------

async function sendChat() {
  const content = $("message").value.trim();
  const model = state.models.find((m) => m.id === $("model").value);
  if (!content || !model || state.controller) return;
  showError("");
  $("message").value = "";
  // This turn belongs to this conversation, even if "New chat" starts another before the reply ends.
  const history = state.history;
  history.push({ role: "user", content });
  const userBubble = addBubble("user", content);
  const bubble = addBubble("assistant", "");
  const controller = new AbortController();
  setBusy(controller);
  // The model remembers nothing between requests: the whole conversation goes with every turn.
  const messages = [...systemMessages(), ...history];
  try {
    const reply = await streamChat(model, messages, controller.signal, (text) => {
      bubble.textContent = text;
      bubble.scrollIntoView({ block: "end" });
    });
    history.push({ role: "assistant", content: reply });
  } catch (e) {
    if (isAbort(e)) {
      // Stopped: keep what was said so far as the reply.
      history.push({ role: "assistant", content: bubble.textContent });
      bubble.dataset.stopped = "true";
    } else {
      // Failed: take the turn back out of the conversation and return the text to the box to retry.
      history.pop();
      userBubble.remove();
      bubble.remove();
      $("message").value = content;
      // A small model's context fills after a few turns, as the whole conversation is sent each time.
      const full = e.code === "context_length_exceeded" && history.length > 0;
      showError(full ? `${e.message}. Start a new chat to go on.` : e.message);
    }
  } finally {
    bubble.dataset.done = "true";
    if (state.controller === controller) setBusy(null);
  }
}

function newChat() {
  stop();
  state.history = [];
  $("messages").replaceChildren();
  showError("");
  $("message").focus();
}

// ---- arena --------------------------------------------------------------------------------------

async function sendArena() {
  const prompt = $("arena-prompt").value.trim();
  const checked = [...$("arena-models").querySelectorAll("input:checked")].map((box) => box.value);
  const models = state.models.filter((m) => checked.includes(m.id));
  if (!prompt || !models.length || state.controller) return;
  showError("");
  const controller = new AbortController();
  setBusy(controller);
  const messages = [...systemMessages(), { role: "user", content: prompt }];
  $("arena-columns").replaceChildren();
  // One request per model, all at once: the server batches them, so they stream side by side.
  await Promise.all(models.map(async (model) => {
    const column = document.createElement("section");
    column.className = "arena-column";
    column.dataset.testid = "arena-column";
    column.dataset.model = model.id;
    const title = document.createElement("h2");
    title.textContent = model.id;
    const reply = document.createElement("p");
    reply.className = "arena-reply";
    reply.dataset.testid = "arena-reply";
    column.append(title, reply);
    $("arena-columns").append(column);
    try {
      await streamChat(model, messages, controller.signal, (text) => { reply.textContent = text; });
    } catch (e) {
      if (isAbort(e)) {
        column.dataset.stopped = "true";
      } else {
        // One model failing should not hide the others' replies: the error goes in its own column.
        const error = document.createElement("p");
        error.className = "error";
        error.dataset.testid = "arena-error";
        error.textContent = e.message;
        column.append(error);
      }
    } finally {
      column.dataset.done = "true";
    }
  }));
  if (state.controller === controller) setBusy(null);
}

// ---- wiring -------------------------------------------------------------------------------------

function showView(name) {
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.view === name));
  }
  $("chat-view").hidden = name !== "chat";
  $("arena-view").hidden = name !== "arena";
  document.body.dataset.view = name;  // the CSS hides the chat's model picker in the arena
}

for (const tab of document.querySelectorAll("[role=tab]")) {
  tab.addEventListener("click", () => showView(tab.dataset.view));
}

$("chat-form").addEventListener("submit", (e) => { e.preventDefault(); sendChat(); });
$("arena-form").addEventListener("submit", (e) => { e.preventDefault(); sendArena(); });
$("stop").addEventListener("click", stop);
$("arena-stop").addEventListener("click", stop);
$("new-chat").addEventListener("click", newChat);

// Enter sends, Shift+Enter makes a new line. isComposing: Enter that confirms a Chinese or Japanese
// input-method candidate must not send the half-typed message.
for (const [box, send] of [[$("message"), sendChat], [$("arena-prompt"), sendArena]]) {
  box.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  localStorage.setItem(KEY_STORAGE, key);
  $("api-key").value = "";
  loadModels();
});

showView("chat");
loadModels();
