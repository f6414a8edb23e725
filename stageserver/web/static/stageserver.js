/**
 * stageserver.js: the browser client of stageserver. An ES module without dependencies.
 *
 *     import { streamStage, cancelStage } from "/static/stageserver.js";
 *
 *     const result = await streamStage(
 *       { stage_id: "hello-1", model_name: "smollm2", user_prompt: "Hi!", resumable: true },
 *       { onEvent: (event) => { output.textContent += event.text ?? ""; } },
 *     );
 *     // result: { status: "done" | "error" | "cancelled", text, usage, error, reason, events }
 *
 * streamStage(body, options) -> Promise<StageResult>
 *   Posts `body` to /chat with `"stream": true` and reads the Server-Sent Events itself
 *   (EventSource cannot POST): comments, multi-line data, `id:`, `retry:`, CRLF, UTF-8
 *   split across reads. Calls `onEvent` once per event, in order, and resolves when the
 *   stage ends. If the connection drops first, it re-attaches through
 *   GET /stages/<id>/events with the `Last-Event-ID` header, waiting the server's
 *   `retry:` (else `resume.delayMs`), doubled at each failed attempt, so every event
 *   arrives exactly once. Only a resumable stage outlives a drop; the server cancels one
 *   that is not. Started with `resumable: false`, the promise then rejects at once; left
 *   to the server's default, it re-attaches all the same and reports the server's
 *   `cancel`, if there was one.
 *   options:
 *     baseUrl   where stageserver is mounted (default "/", against the page's URL)
 *     apiKey    sent as `Authorization: Bearer <apiKey>`
 *     onEvent   (event) => void; event: { type, id, data, text? }, type being
 *               "chat_completion_chunk", "done", "error" or "cancel"
 *     onConnect (connection) => void, at each connection: { kind: "chat" | "resume",
 *               lastEventId, attempt, drop() }; drop() cuts that connection as a network
 *               failure would (for trying the resume out)
 *     signal    an AbortSignal. Aborting it is a disconnect, never a cancel: the promise
 *               rejects with the signal's reason, and the server cancels the stage only
 *               if it is not resumable. The stop is cancelStage().
 *     resume    false, or { attempts: 5, delayMs: 250 } (the default)
 *   Rejects with a StageError when the server refuses (`status`, `message`, `body`,
 *   `fields`, `retryAfter` in seconds) or when the stream cannot be resumed (`status` 0).
 *
 * cancelStage(stageId, { baseUrl, apiKey }) -> Promise<{ stage_id, status }>
 *   Stops the stage wherever it runs; every client following it gets `cancel`.
 *
 * SSEParser: the parser itself. push(text) returns the events completed by `text`.
 */

const TERMINAL = { done: "done", error: "error", cancel: "cancelled" };
const STAGE_EVENTS = new Set(["chat_completion_chunk", ...Object.keys(TERMINAL)]);
const DEFAULT_RESUME = { attempts: 5, delayMs: 250 };
const MAX_DELAY_MS = 10000;

export class StageError extends Error {
  constructor(message, { status = 0, body = null, retryAfter = null, cause } = {}) {
    super(message, { cause });
    this.name = "StageError";
    this.status = status;
    this.body = body;
    this.retryAfter = retryAfter;
    this.fields = body?.fields ?? (body?.field ? [{ field: body.field, message }] : []);
  }
}

/** Server-Sent Events as the HTML standard reads them, a piece of text at a time. */
export class SSEParser {
  constructor(lastEventId = "") {
    this.lastEventId = lastEventId;
    this.retry = null;
    this._rest = "";
    this._afterCR = false;
    this._started = false;
    this._type = "";
    this._data = [];
  }

  push(text) {
    if (!text) return [];
    if (!this._started) {
      this._started = true;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    // A CR ending one piece and the LF starting the next are one line break.
    if (this._afterCR && text.startsWith("\n")) text = text.slice(1);
    this._afterCR = text.endsWith("\r");
    const lines = (this._rest + text).split(/\r\n|\r|\n/);
    this._rest = lines.pop();
    const events = [];
    for (const line of lines) {
      const event = this._line(line);
      if (event) events.push(event);
    }
    return events;
  }

  _line(line) {
    if (line === "") return this._dispatch();
    if (line.startsWith(":")) return null;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this._type = value;
    else if (field === "data") this._data.push(value);
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.retry = Number(value);
    return null;
  }

  _dispatch() {
    const [type, data] = [this._type || "message", this._data];
    [this._type, this._data] = ["", []];
    if (data.length === 0) return null;
    return { type, data: data.join("\n"), lastEventId: this.lastEventId };
  }
}

export async function streamStage(body, options = {}) {
  const { baseUrl = "/", apiKey, onEvent, onConnect, signal } = options;
  const resume = options.resume === false ? null : { ...DEFAULT_RESUME, ...options.resume };
  const stage = {
    id: body.stage_id, lastEventId: "", retryMs: resume?.delayMs ?? 0,
    events: [], text: "", usage: null, end: null,
  };
  const chat = {
    kind: "chat", method: "POST", path: "chat", body: JSON.stringify({ ...body, stream: true }),
  };
  const events = {
    kind: "resume", method: "GET", path: `stages/${encodeURIComponent(stage.id)}/events`,
  };
  let answered = false;
  let failures = 0;
  const opened = (response, drop) => {
    if (response.status === 204) throw lost(stage, "the server says it is over (204)");
    const kind = answered ? "resume" : "chat";
    onConnect?.({ kind, lastEventId: stage.lastEventId, attempt: failures, drop });
    answered = true;
  };
  const taken = (event) => {
    failures = 0;
    return take(stage, event, onEvent);
  };
  for (;;) {
    let failure = null;
    try {
      await connect(answered ? events : chat, { baseUrl, apiKey, signal, stage }, opened, taken);
    } catch (error) {
      if (signal?.aborted) throw signal.reason ?? error;
      if (error instanceof Fatal) throw error.error;
      if (!answered) {
        if (error instanceof StageError) throw error;
        throw new StageError(`no answer from stageserver: ${error.message}`, { cause: error });
      }
      if (error instanceof StageError && ![429, 503].includes(error.status)) {
        throw error.status ? lost(stage, `re-attaching was refused: ${error.message}`) : error;
      }
      failure = error;
    }
    if (stage.end) return result(stage);
    if (!resume) throw lost(stage, "resuming is off (resume: false)");
    if (body.resumable === false) {
      throw lost(stage, "the stage is not resumable, so the server cancelled it");
    }
    failures += 1;
    if (failures > resume.attempts) {
      const last = failure?.message ?? "the stream ended early";
      throw lost(stage, `${resume.attempts} attempts to re-attach failed; the last: ${last}`);
    }
    const backoff = Math.min(stage.retryMs * 2 ** (failures - 1), MAX_DELAY_MS);
    await sleep(Math.max(backoff, (failure?.retryAfter ?? 0) * 1000), signal);
  }
}

export async function cancelStage(stageId, { baseUrl = "/", apiKey, signal } = {}) {
  const url = endpoint(baseUrl, `stages/${encodeURIComponent(stageId)}/cancel`);
  const response = await fetch(url, { method: "POST", headers: headers(apiKey), signal });
  if (response.status !== 202) throw await refusal(response);
  return response.json();
}

/** One connection: fetch, then hand each event to `onEvent` until it says the end came. */
async function connect(request, { baseUrl, apiKey, signal, stage }, onOpen, onEvent) {
  const connection = new AbortController();
  const relay = () => connection.abort(signal.reason);
  signal?.addEventListener("abort", relay);
  try {
    const requestHeaders = headers(apiKey, { Accept: "text/event-stream" });
    if (request.body) requestHeaders["Content-Type"] = "application/json";
    if (request.kind === "resume" && stage.lastEventId) {
      requestHeaders["Last-Event-ID"] = stage.lastEventId;
    }
    const response = await fetch(endpoint(baseUrl, request.path), {
      method: request.method, headers: requestHeaders, body: request.body,
      cache: "no-store", signal: connection.signal,
    });
    if (response.status !== 200 && response.status !== 204) throw await refusal(response);
    onOpen(response, () => connection.abort(new DOMException("connection dropped", "AbortError")));
    const reader = response.body.getReader();
    const parser = new SSEParser(stage.lastEventId);
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      const events = parser.push(decoder.decode(value, { stream: true }));
      if (parser.retry !== null) stage.retryMs = parser.retry;
      for (const event of events) {
        if (onEvent(event)) {
          await reader.cancel().catch(() => {});
          return;
        }
      }
    }
  } finally {
    signal?.removeEventListener("abort", relay);
  }
}

/** An error that ends the stream at once: no resume can help it. */
class Fatal {
  constructor(error) {
    this.error = error;
  }
}

/** Record one event; true once it is the terminal one. */
function take(stage, sse, onEvent) {
  stage.lastEventId = sse.lastEventId;
  if (!STAGE_EVENTS.has(sse.type)) return false;
  let data;
  try {
    data = JSON.parse(sse.data);
  } catch {
    const what = `the ${sse.type} event ${sse.lastEventId}`;
    throw new Fatal(new StageError(`${what} does not carry JSON: ${sse.data}`));
  }
  const event = { type: sse.type, id: sse.lastEventId, data };
  if (event.type === "chat_completion_chunk") {
    const chunk = data.chunk ?? {};
    event.text = (chunk.choices ?? []).map((c) => c?.delta?.content ?? "").join("");
    stage.text += event.text;
    if (chunk.usage) stage.usage = chunk.usage;
  } else {
    stage.end = event;
    if (data.usage) stage.usage = data.usage;
  }
  stage.events.push(event);
  try {
    onEvent?.(event);
  } catch (error) {
    throw new Fatal(error);
  }
  return stage.end !== null;
}

function result(stage) {
  const { type, data } = stage.end;
  return {
    status: TERMINAL[type], text: stage.text, usage: stage.usage,
    error: data.error ?? null, reason: data.reason ?? null, events: stage.events,
  };
}

function lost(stage, why) {
  const after = stage.lastEventId || "no event";
  return new StageError(`the stream of stage ${stage.id} dropped after ${after}; ${why}`);
}

async function refusal(response) {
  const text = await response.text();
  let body = null;
  try { body = JSON.parse(text); } catch { /* not JSON: keep the text as the message */ }
  const message = typeof body?.error === "string" ? body.error : text || response.statusText;
  return new StageError(message, {
    status: response.status, body, retryAfter: secondsToWait(response.headers.get("Retry-After")),
  });
}

function secondsToWait(retryAfter) {
  if (!retryAfter) return null;
  if (/^\d+$/.test(retryAfter.trim())) return Number(retryAfter);
  const when = Date.parse(retryAfter);
  return Number.isNaN(when) ? null : Math.max(0, (when - Date.now()) / 1000);
}

function headers(apiKey, extra = {}) {
  return apiKey ? { ...extra, Authorization: `Bearer ${apiKey}` } : { ...extra };
}

function endpoint(baseUrl, path) {
  const base = new URL(baseUrl, globalThis.location?.href);
  if (!base.pathname.endsWith("/")) base.pathname += "/";
  return new URL(path, base);
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const timer = setTimeout(() => { signal?.removeEventListener("abort", stop); resolve(); }, ms);
    const stop = () => { clearTimeout(timer); reject(signal.reason); };
    signal?.addEventListener("abort", stop, { once: true });
  });
}
