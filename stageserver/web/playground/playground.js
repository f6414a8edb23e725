// The playground: one stage at a time, through the same module browser clients use.
import { cancelStage, streamStage } from "../static/stageserver.js";

const baseUrl = new URL("..", import.meta.url).href; // where stageserver is mounted
const $ = (id) => document.getElementById(id);
const buttons = { start: $("start"), stop: $("stop"), drop: $("drop") };
let running = null; // { stageId, lastEventId, drop }
let listing = 0; // the latest listing of the upstreams; an earlier one under way is dropped

$("stage-form").addEventListener("submit", (event) => {
  event.preventDefault();
  start();
});
$("user-prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    $("stage-form").requestSubmit();
  }
});
buttons.stop.addEventListener("click", stop);
buttons.drop.addEventListener("click", drop);
$("api-key").addEventListener("change", listUpstreams);
listUpstreams();

/** The API key typed in, if any: read from its field each time, stored nowhere else. */
function apiKey() {
  return $("api-key").value.trim() || undefined;
}

/** Next to the key's field: the server's 401, plainly, or nothing (null). */
function keyRefused(message) {
  let text = "";
  if (message) {
    text = apiKey()
      ? `The server refused this API key (401): ${message}`
      : "This server requires an API key: enter it here.";
  }
  $("api-key-problem").textContent = text;
}

async function listUpstreams() {
  const select = $("upstream");
  const key = apiKey();
  const call = ++listing;
  try {
    const response = await fetch(new URL("upstreams", baseUrl), {
      headers: key ? { Authorization: `Bearer ${key}` } : {},
    });
    if (call !== listing) return;
    select.replaceChildren();
    if (response.status === 401) {
      keyRefused((await response.json()).error);
      select.append(new Option("the API key is needed first", ""));
      return;
    }
    keyRefused(null);
    const { upstreams } = await response.json();
    for (const { name, kind, default: isDefault } of upstreams) {
      const label = `${name} (${kind}${isDefault ? ", default" : ""})`;
      select.append(new Option(label, name, isDefault, isDefault));
    }
    if (upstreams.length === 0) select.append(new Option("none configured", ""));
  } catch (error) {
    log(`Could not list the upstreams: ${error.message}`);
  }
}

function request(stageId) {
  const body = {
    stage_id: stageId,
    model_name: $("model").value,
    user_prompt: $("user-prompt").value,
    resumable: $("resumable").checked,
  };
  const optional = {
    upstream: $("upstream").value,
    system_prompt: $("system-prompt").value,
    temperature: $("temperature").valueAsNumber,
    max_tokens: $("max-tokens").valueAsNumber,
  };
  for (const [field, value] of Object.entries(optional)) {
    if (value !== "" && !Number.isNaN(value)) body[field] = value;
  }
  return body;
}

async function start() {
  if (running) return;
  const stageId = `play-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 6)}`;
  running = { stageId, lastEventId: null, drop: null };
  const clock = { started: performance.now(), firstToken: null, tokens: 0 };
  for (const id of ["answer", "raw-events", "connection-log"]) $(id).replaceChildren();
  for (const id of ["ttft", "rate", "usage"]) $(id).textContent = "–";
  $("chunks").textContent = "0";
  setRunning(true);
  say(`Running stage ${stageId}…`);
  try {
    const result = await streamStage(request(stageId), {
      baseUrl,
      apiKey: apiKey(),
      onConnect: (connection) => {
        running.drop = connection.drop;
        log(connection.kind === "chat"
          ? `POST /chat: streaming stage ${stageId}.`
          : `Resumed: GET /stages/${stageId}/events, Last-Event-ID ${connection.lastEventId}.`);
      },
      onEvent: (event) => {
        running.lastEventId = event.id;
        showRaw(event);
        if (event.type === "chat_completion_chunk") showChunk(event, clock);
      },
    });
    if (result.usage) showUsage(result.usage);
    say({ done: "Done.", error: `Error: ${result.error}`, cancelled: `Cancelled: ${result.reason}` }[
      result.status]);
  } catch (error) {
    if (error.status === 401) keyRefused(error.message);
    say(`Failed: ${error.message}`);
  } finally {
    running = null;
    setRunning(false);
  }
}

function showChunk(event, clock) {
  $("chunks").textContent = String(Number($("chunks").textContent) + 1);
  if (event.data.chunk?.usage) showUsage(event.data.chunk.usage);
  if (!event.text) return;
  const now = performance.now();
  clock.firstToken ??= now;
  clock.tokens += 1;
  $("answer").append(event.text);
  $("ttft").textContent = `${Math.round(clock.firstToken - clock.started)} ms`;
  if (clock.tokens > 1) {
    // Counted in content chunks: one token each from llama.cpp, vLLM and Ollama.
    const rate = (clock.tokens - 1) / ((now - clock.firstToken) / 1000);
    $("rate").textContent = rate.toFixed(1);
  }
}

function showUsage(usage) {
  const estimated = usage.estimated ? " (estimated)" : "";
  $("usage").textContent = `${usage.prompt_tokens} prompt + ${usage.completion_tokens} `
    + `completion = ${usage.total_tokens} tokens${estimated}`;
}

function showRaw(event) {
  // As on the wire, with the data re-serialised compactly.
  const item = document.createElement("li");
  const wire = document.createElement("pre");
  wire.textContent = `id: ${event.id}\nevent: ${event.type}\ndata: ${JSON.stringify(event.data)}`;
  item.append(wire);
  const list = $("raw-events");
  const following = list.scrollTop + list.clientHeight >= list.scrollHeight - 8;
  list.append(item);
  if (following) list.scrollTop = list.scrollHeight; // unless the reader scrolled up
}

async function stop() {
  if (!running) return;
  const { stageId } = running;
  try {
    await cancelStage(stageId, { baseUrl, apiKey: apiKey() });
    log(`POST /stages/${stageId}/cancel: cancelling.`);
  } catch (error) {
    if (error.status === 401) keyRefused(error.message);
    log(`Stop failed: ${error.message}`);
  }
}

function drop() {
  if (!running?.drop) return;
  log(`Dropped the connection after ${running.lastEventId ?? "no event"}.`);
  running.drop();
}

function setRunning(isRunning) {
  const hadFocus = document.activeElement;
  buttons.start.disabled = isRunning;
  buttons.stop.disabled = !isRunning;
  buttons.drop.disabled = !isRunning;
  // Keep keyboard focus on a button that can still be pressed.
  if (hadFocus === buttons.start && isRunning) buttons.stop.focus();
  if ((hadFocus === buttons.stop || hadFocus === buttons.drop) && !isRunning) {
    buttons.start.focus();
  }
}

function say(text) {
  $("status").textContent = text;
}

function log(text) {
  const item = document.createElement("li");
  item.textContent = text;
  $("connection-log").append(item);
}
