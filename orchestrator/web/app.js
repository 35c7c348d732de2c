// The Nexus web tracker, in plain JavaScript with no build step.
//
// - protobuf: a small codec for the few messages of nexus.v1 the page uses
//   (field numbers from proto/nexus/v1/workflow.proto).
// - gRPC-Web: calls WorkflowService on the page's own origin with `fetch`,
//   5-byte frames in both directions, the trailer frame (or trailers-only
//   headers) carrying grpc-status and grpc-message. Watching reads the
//   response body as a stream: no polling.
// - The run's state is rebuilt from its events alone (`applyEvent`), then
//   drawn (`render`).
// - Resuming: the state together with the cursor of the last event applied
//   to it is kept in sessionStorage, written as one value, so the two always
//   agree. After a reload the page draws that state and watches after its
//   cursor; after a dropped stream it watches again after the cursor in
//   memory. Either way every event is applied once: no gap, no duplicate
//   text. A run opened fresh (the list, a new tab) is watched from its first
//   event.
"use strict";

// ---------------------------------------------------------------- protobuf

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();

class Writer {
  constructor() { this.parts = []; }
  varint(n) {
    while (n > 127) { this.parts.push((n % 128) | 128); n = Math.floor(n / 128); }
    this.parts.push(n);
  }
  tag(field, wire) { this.varint(field * 8 + wire); }
  bytes(field, bytes) { this.tag(field, 2); this.varint(bytes.length); for (const b of bytes) this.parts.push(b); }
  string(field, text) { if (text) this.bytes(field, utf8.encode(text)); }
  uint(field, n) { if (n) { this.tag(field, 0); this.varint(n); } }
  bool(field, yes) { if (yes) { this.tag(field, 0); this.varint(1); } }
  message(field, writer) { this.bytes(field, writer.finish()); }
  map(field, entries) {
    for (const [key, value] of entries) {
      const entry = new Writer();
      entry.string(1, key);
      entry.string(2, value);
      this.message(field, entry);
    }
  }
  finish() { return Uint8Array.from(this.parts); }
}

class Reader {
  constructor(bytes) { this.buf = bytes; this.pos = 0; }
  eof() { return this.pos >= this.buf.length; }
  byte() {
    if (this.pos >= this.buf.length) throw new Error("truncated protobuf message");
    return this.buf[this.pos++];
  }
  varint() {
    let value = 0, scale = 1, b;
    do { b = this.byte(); value += (b & 127) * scale; scale *= 128; } while (b & 128);
    return value;
  }
  take(n) {
    if (this.pos + n > this.buf.length) throw new Error("truncated protobuf message");
    const out = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }
  lengthDelimited() { return this.take(this.varint()); }
  double() { const b = this.take(8); return new DataView(b.buffer, b.byteOffset, 8).getFloat64(0, true); }
  skip(wire) {
    if (wire === 0) this.varint();
    else if (wire === 1) this.take(8);
    else if (wire === 2) this.lengthDelimited();
    else if (wire === 5) this.take(4);
    else throw new Error(`unsupported wire type ${wire}`);
  }
}

// A schema maps field numbers to [name, type, repeated]. A type is "string",
// "string?" (proto3 `optional`: undefined when absent), "uint" (any unsigned
// varint), "bool", "double", "map" (map<string,string>) or another schema (a
// nested message).
const WIRE = { string: 2, "string?": 2, uint: 0, bool: 0, double: 1, map: 2 };
const DEFAULT = { string: "", uint: 0, bool: false, double: 0 };

function decode(schema, bytes) {
  const out = {};
  for (const [name, type, repeated] of Object.values(schema)) {
    if (repeated) out[name] = [];
    else if (type === "map") out[name] = {};
    else if (type in DEFAULT) out[name] = DEFAULT[type];
  }
  const r = new Reader(bytes);
  while (!r.eof()) {
    const key = r.varint();
    const field = Math.floor(key / 8), wire = key % 8;
    const spec = schema[field];
    const expected = spec && (typeof spec[1] === "string" ? WIRE[spec[1]] : 2);
    if (!spec || wire !== expected) { r.skip(wire); continue; }
    const [name, type, repeated] = spec;
    let value;
    if (type === "string" || type === "string?") value = fromUtf8.decode(r.lengthDelimited());
    else if (type === "uint") value = r.varint();
    else if (type === "bool") value = r.varint() !== 0;
    else if (type === "double") value = r.double();
    else if (type === "map") {
      const entry = decode(MAP_ENTRY, r.lengthDelimited());
      out[name][entry.key] = entry.value;
      continue;
    } else value = decode(type, r.lengthDelimited());
    if (repeated) out[name].push(value); else out[name] = value;
  }
  return out;
}

const MAP_ENTRY = { 1: ["key", "string"], 2: ["value", "string"] };
const Timestamp = { 1: ["seconds", "uint"], 2: ["nanos", "uint"] };
const Usage = {
  1: ["promptTokens", "uint"], 2: ["completionTokens", "uint"], 3: ["totalTokens", "uint"],
  4: ["costUsd", "double"], 5: ["cachedPromptTokens", "uint"], 6: ["reasoningTokens", "uint"],
};
const Rating = { 1: ["score", "uint"], 2: ["reasons", "string", true] };
const ProjectPlan = { 1: ["name", "string"], 2: ["description", "string"], 3: ["fields", "map"] };
const Phase = {
  1: ["index", "uint"], 2: ["name", "string"], 3: ["model", "string"], 4: ["status", "uint"],
  5: ["output", "string"], 6: ["usage", Usage], 7: ["durationMs", "uint"], 8: ["tries", "uint"],
  9: ["finishReason", "string"], 10: ["generationId", "string"], 11: ["cacheHit", "bool"],
  12: ["savedUsd", "double"], 13: ["requestedModel", "string"],
};
const Workflow = {
  1: ["workflowId", "string"], 2: ["status", "uint"], 3: ["plan", ProjectPlan],
  4: ["createdAt", Timestamp], 5: ["updatedAt", Timestamp], 6: ["phases", Phase, true],
  7: ["finalPlan", "string"], 8: ["rating", Rating], 9: ["totalUsage", Usage], 10: ["reason", "string"],
  11: ["idempotencyKey", "string"], 12: ["pipeline", "string"], 13: ["models", "map"],
  14: ["instructions", "string"],
};
const ListWorkflowsResponse = { 1: ["workflows", Workflow, true], 2: ["nextPageToken", "string"] };
const StartWorkflowResponse = { 1: ["workflowId", "string"], 2: ["created", "bool"] };
const WorkflowEvent = {
  1: ["cursor", "string"], 2: ["workflowId", "string"], 3: ["time", Timestamp],
  10: ["accepted", { 1: ["planName", "string"], 2: ["pipeline", "string"], 3: ["phases", Phase, true] }],
  11: ["phaseStarted", {
    1: ["index", "uint"], 2: ["phase", "string"], 3: ["model", "string"], 4: ["delivery", "uint"],
    5: ["worker", "string"], 6: ["attempt", "uint"],
  }],
  12: ["phaseOutputDelta", {
    1: ["index", "uint"], 2: ["phase", "string"], 3: ["text", "string"], 4: ["delivery", "uint"], 5: ["try", "uint"],
  }],
  13: ["phaseCompleted", {
    1: ["index", "uint"], 2: ["phase", "string"], 3: ["model", "string"], 4: ["output", "string"],
    5: ["usage", Usage], 6: ["durationMs", "uint"], 7: ["tries", "uint"], 8: ["rating", Rating],
    10: ["finishReason", "string"], 12: ["cacheHit", "bool"], 13: ["savedUsd", "double"],
    16: ["outputOmitted", "bool"], 17: ["outputBytes", "uint"],
  }],
  14: ["phaseRetrying", {
    1: ["index", "uint"], 2: ["phase", "string"], 3: ["try", "uint"], 4: ["reason", "string"], 5: ["retryInMs", "uint"],
  }],
  15: ["completed", {
    1: ["finalPlan", "string"], 2: ["rating", Rating], 3: ["totalUsage", Usage], 4: ["finalPlanOmitted", "bool"],
  }],
  16: ["failed", { 1: ["reason", "string"], 2: ["phase", "string"] }],
  17: ["cancelled", { 1: ["reason", "string"] }],
  18: ["phaseWaiting", {
    1: ["index", "uint"], 2: ["phase", "string"], 3: ["reason", "string"], 4: ["waitMs", "uint"], 5: ["waitedTotalMs", "uint"],
  }],
  21: ["phaseAwaitingApproval", {
    1: ["index", "uint"], 2: ["phase", "string"], 3: ["deadline", Timestamp], 4: ["onTimeout", "string"],
  }],
  22: ["phaseApproved", {
    1: ["index", "uint"], 2: ["phase", "string"], 3: ["editedOutput", "string?"], 4: ["comment", "string"], 5: ["timedOut", "bool"],
  }],
  20: ["phaseFallback", {
    1: ["index", "uint"], 2: ["phase", "string"], 3: ["fromModel", "string"], 4: ["toModel", "string"], 5: ["reason", "string"],
  }],
};

const WORKFLOW_STATUS = ["unspecified", "pending", "running", "completed", "failed", "cancelled", "awaiting approval"];
const TERMINAL = new Set(["completed", "failed", "cancelled"]);

// ---------------------------------------------------------------- gRPC-Web

const SERVICE = "nexus.v1.WorkflowService/"; // relative: the page works behind a path prefix
const CODE_NAMES = [
  "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
  "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
  "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
];
// Worth calling again: the server or the network, not the request.
const RETRYABLE = new Set([1, 2, 4, 8, 10, 13, 14]);

class GrpcError extends Error {
  constructor(code, message) {
    super(`${CODE_NAMES[code] || `status ${code}`}: ${message || "(no message)"}`);
    this.code = code;
  }
  get retryable() { return RETRYABLE.has(this.code); }
}

function token() { return localStorage.getItem("nexus.token") || ""; }

function frame(message) {
  const out = new Uint8Array(5 + message.length);
  new DataView(out.buffer).setUint32(1, message.length);
  out.set(message, 5);
  return out;
}

function parseTrailers(bytes) {
  const trailers = {};
  for (const line of fromUtf8.decode(bytes).split("\r\n")) {
    const colon = line.indexOf(":");
    if (colon > 0) trailers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
  }
  return trailers;
}

function statusFrom(trailers) {
  const code = Number(trailers["grpc-status"] ?? 2);
  if (code === 0) return null;
  let message = trailers["grpc-message"] || "";
  try { message = decodeURIComponent(message); } catch { /* keep it as sent */ }
  return new GrpcError(code, message);
}

// Calls `method` and yields each response message's bytes; throws a
// GrpcError for a non-OK status, and a TypeError (from fetch) when the
// network fails. A body that ends without a status is a broken stream.
async function* grpcCall(method, request, signal) {
  const headers = {
    "content-type": "application/grpc-web+proto",
    accept: "application/grpc-web+proto",
    "x-grpc-web": "1",
  };
  if (token()) headers.authorization = `Bearer ${token()}`;
  const response = await fetch(SERVICE + method, { method: "POST", headers, body: frame(request), signal });
  const headerStatus = response.headers.get("grpc-status");
  if (headerStatus !== null) { // trailers-only: the status came with the headers
    const error = statusFrom({ "grpc-status": headerStatus, "grpc-message": response.headers.get("grpc-message") });
    if (error) throw error;
  }
  if (!response.ok) throw new GrpcError(response.status === 404 ? 12 : 14, `HTTP ${response.status}`);
  const reader = response.body.getReader();
  let buffer = new Uint8Array(0);
  let trailers = headerStatus !== null ? { "grpc-status": headerStatus } : null;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    const joined = new Uint8Array(buffer.length + value.length);
    joined.set(buffer);
    joined.set(value, buffer.length);
    buffer = joined;
    while (buffer.length >= 5) {
      const length = new DataView(buffer.buffer, buffer.byteOffset, 5).getUint32(1);
      if (buffer.length < 5 + length) break;
      const flags = buffer[0];
      const payload = buffer.slice(5, 5 + length);
      buffer = buffer.slice(5 + length);
      if (flags & 0x80) trailers = parseTrailers(payload);
      else yield payload;
    }
  }
  if (!trailers) throw new GrpcError(14, "the stream ended without a status");
  const error = statusFrom(trailers);
  if (error) throw error;
}

async function unary(method, request, schema) {
  let reply = null;
  for await (const message of grpcCall(method, request)) reply = message;
  return decode(schema, reply || new Uint8Array(0));
}

function startRequest(plan, idempotencyKey) {
  const p = new Writer();
  p.string(1, plan.name);
  p.string(2, plan.description);
  p.map(3, plan.fields);
  const w = new Writer();
  w.message(1, p);
  w.string(2, idempotencyKey);
  return w.finish();
}

function watchRequest(workflowId, afterCursor) {
  const w = new Writer();
  w.string(1, workflowId);
  w.string(2, afterCursor);
  w.bool(3, true); // skip_reasoning: the page shows answers, not thoughts
  return w.finish();
}

function idRequest(workflowId) {
  const w = new Writer();
  w.string(1, workflowId);
  return w.finish();
}

function listRequest(pageSize) {
  const w = new Writer();
  w.uint(1, pageSize);
  return w.finish();
}

// ---------------------------------------------------------------- a run's state

// Cursors are Redis stream ids, "<ms>-<seq>".
function cursorAfter(a, b) {
  const [am, as] = a.split("-").map(Number), [bm, bs] = b.split("-").map(Number);
  return am > bm || (am === bm && as > bs);
}

function newRun(id) {
  return { id, cursor: "", name: "", pipeline: "", status: "pending", phases: [], finalPlan: "", rating: null, totalUsage: null, reason: "" };
}

function phaseOf(run, index, name) {
  while (run.phases.length <= index) {
    run.phases.push({ index: run.phases.length, name: "", model: "", status: "pending", text: "", stream: "", note: "" });
  }
  const phase = run.phases[index];
  if (name) phase.name = name;
  return phase;
}

// Applies one event to the run's state; false if it was already applied.
function applyEvent(run, event) {
  if (run.cursor && !cursorAfter(event.cursor, run.cursor)) return false;
  run.cursor = event.cursor;
  const e = event;
  if (e.accepted) {
    run.name = e.accepted.planName;
    run.pipeline = e.accepted.pipeline;
    for (const p of e.accepted.phases) phaseOf(run, p.index, p.name).model = p.model;
  } else if (e.phaseStarted) {
    const p = phaseOf(run, e.phaseStarted.index, e.phaseStarted.phase);
    Object.assign(p, { status: "running", model: e.phaseStarted.model, text: "", stream: "", note: "" });
    if (e.phaseStarted.delivery > 1) p.note = `delivered again (${e.phaseStarted.delivery}) after a worker was lost`;
    run.status = "running";
  } else if (e.phaseOutputDelta) {
    const d = e.phaseOutputDelta;
    const p = phaseOf(run, d.index, d.phase);
    const stream = `${d.delivery}/${d.try}`;
    if (p.stream !== stream) { p.stream = stream; p.text = ""; } // a new try writes anew
    p.text += d.text;
  } else if (e.phaseRetrying) {
    const r = e.phaseRetrying;
    phaseOf(run, r.index, r.phase).note = `try ${r.try} failed (${r.reason}); next try in ${seconds(r.retryInMs)}`;
  } else if (e.phaseWaiting) {
    const w = e.phaseWaiting;
    phaseOf(run, w.index, w.phase).note = `waiting ${seconds(w.waitMs)}: ${w.reason}`;
  } else if (e.phaseFallback) {
    const f = e.phaseFallback;
    const p = phaseOf(run, f.index, f.phase);
    p.note = `${f.fromModel} gave up (${f.reason}); falling back to ${f.toModel}`;
    p.model = f.toModel;
  } else if (e.phaseCompleted) {
    const c = e.phaseCompleted;
    const p = phaseOf(run, c.index, c.phase);
    // The accepted text is the last try's deltas; it differs only when no
    // delta came (a cached answer). `streamed` records which it was.
    // An output over 256 KiB is left out of the event: the deltas are it.
    p.streamed = c.outputOmitted || p.text === c.output;
    Object.assign(p, {
      status: "completed", model: c.model, text: c.outputOmitted ? p.text : c.output, note: "", usage: c.usage || null,
      durationMs: c.durationMs, tries: c.tries, rating: c.rating || null, cacheHit: c.cacheHit,
    });
  } else if (e.phaseAwaitingApproval) {
    const a = e.phaseAwaitingApproval;
    const until = a.deadline ? new Date(a.deadline.seconds * 1000).toLocaleString() : "";
    phaseOf(run, a.index, a.phase).note = `awaits a person's approval (until ${until}, then ${a.onTimeout || "reject"})`;
    run.status = "awaiting approval";
  } else if (e.phaseApproved) {
    const a = e.phaseApproved;
    const p = phaseOf(run, a.index, a.phase);
    const edited = a.editedOutput !== undefined;
    if (edited) p.text = a.editedOutput;
    p.note = a.timedOut ? "approved when the gate timed out" : `approved${edited ? ", edited by a person" : ""}${a.comment ? `: ${a.comment}` : ""}`;
    run.status = "running";
  } else if (e.completed) {
    Object.assign(run, { status: "completed", finalPlan: e.completed.finalPlan, rating: e.completed.rating || null, totalUsage: e.completed.totalUsage || null });
    if (e.completed.finalPlanOmitted) {
      // Too long to repeat in an event: read it once from GetWorkflow.
      unary("GetWorkflow", idRequest(run.id), Workflow)
        .then((workflow) => { run.finalPlan = workflow.finalPlan; scheduleRender(); })
        .catch((error) => showError("run-error", error));
    }
  } else if (e.failed) {
    Object.assign(run, { status: "failed", reason: e.failed.reason });
    for (const p of run.phases) if (p.status === "running" || (p.name === e.failed.phase && p.status !== "completed")) p.status = "failed";
  } else if (e.cancelled) {
    Object.assign(run, { status: "cancelled", reason: e.cancelled.reason || "cancelled" });
    for (const p of run.phases) if (p.status === "running") p.status = "cancelled";
  }
  return true;
}

function seconds(ms) { return ms >= 1000 ? `${(ms / 1000).toFixed(1)} s` : `${ms} ms`; }

// ---------------------------------------------------------------- keeping it across reloads

const saved = {
  key: (id) => `nexus.run.${id}`,
  load(id) {
    try {
      const run = JSON.parse(sessionStorage.getItem(this.key(id)) || "null");
      return run && run.id === id && typeof run.cursor === "string" && Array.isArray(run.phases) ? run : null;
    } catch { return null; }
  },
  store(run) {
    try { sessionStorage.setItem(this.key(run.id), JSON.stringify(run)); }
    catch { sessionStorage.removeItem(this.key(run.id)); } // too big: a reload then watches from the start
  },
};

// ---------------------------------------------------------------- the page

const $ = (id) => document.getElementById(id);
// What the tests read: each watch's starting cursor, newest last.
const debug = { watches: [] };
let current = null; // { run, abort, saveTimer }

function open(id) {
  if (current && current.run.id === id) return;
  close();
  const restored = saved.load(id);
  current = { run: restored || newRun(id), abort: new AbortController(), saveTimer: 0, cards: [] };
  $("welcome").hidden = true;
  $("run").hidden = false;
  $("phases").textContent = "";
  $("final-plan").textContent = "";
  $("run-error").hidden = true;
  render();
  if (!TERMINAL.has(current.run.status)) follow(current);
  else setConnection("finished");
  markCurrentRun();
}

function close() {
  if (!current) return;
  current.abort.abort();
  saveNow(current);
  current = null;
}

function scheduleSave(view) {
  if (!view.saveTimer) view.saveTimer = setTimeout(() => saveNow(view), 250);
}

function saveNow(view) {
  clearTimeout(view.saveTimer);
  view.saveTimer = 0;
  saved.store(view.run);
}

// Watches the run until its terminal event, resuming after the last applied
// event whenever the stream breaks.
async function follow(view) {
  const run = view.run;
  let failures = 0;
  while (!TERMINAL.has(run.status) && !view.abort.signal.aborted) {
    debug.watches.push(run.cursor);
    setConnection(run.cursor ? `live (resumed after ${run.cursor})` : "live");
    try {
      for await (const bytes of grpcCall("WatchWorkflow", watchRequest(run.id, run.cursor), view.abort.signal)) {
        if (applyEvent(run, decode(WorkflowEvent, bytes))) {
          failures = 0;
          scheduleRender();
          scheduleSave(view);
        }
      }
      if (!TERMINAL.has(run.status)) throw new GrpcError(14, "the stream ended before the run did");
    } catch (error) {
      if (view.abort.signal.aborted) return;
      if (error instanceof GrpcError && !error.retryable) {
        setConnection("stopped");
        showError("run-error", error);
        return;
      }
      failures += 1;
      const wait = Math.min(250 * 2 ** (failures - 1), 5000);
      setConnection(`connection lost (${error.message}); resuming after ${run.cursor || "the start"} in ${seconds(wait)}`);
      await sleep(wait, view.abort.signal);
    }
  }
  if (view.abort.signal.aborted) return;
  saveNow(view);
  render();
  setConnection("finished");
  loadRuns();
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

function setConnection(text) { $("connection").textContent = `Watching: ${text}`; }

let renderQueued = false;
function scheduleRender() {
  if (!renderQueued) { renderQueued = true; requestAnimationFrame(() => { renderQueued = false; render(); }); }
}

function render() {
  if (!current) return;
  const run = current.run;
  $("run-name").textContent = run.name || "…";
  $("run-id").textContent = run.id;
  setBadge($("run-status"), run.status);
  $("run-status").dataset.status = run.status;
  $("cancel").hidden = TERMINAL.has(run.status);
  const listed = document.querySelector(`#runs a[data-id="${CSS.escape(run.id)}"] .badge`);
  if (listed) setBadge(listed, run.status);
  if (run.reason && run.status !== "completed") showError("run-error", `${run.status}: ${run.reason}`);
  run.phases.forEach((phase, i) => renderPhase(cardFor(i), phase, run.phases.length));
  const done = run.status === "completed";
  $("outcome").hidden = !done;
  if (done) renderOutcome(run);
}

function cardFor(i) {
  if (!current.cards[i]) {
    const card = document.createElement("article");
    card.className = "phase";
    card.dataset.index = i;
    card.innerHTML = '<div class="top"><span class="name"></span><span class="badge"></span></div>'
      + '<div class="model"></div><div class="text"></div><div class="note"></div><div class="stats"></div>';
    $("phases").append(card);
    current.cards[i] = card;
  }
  return current.cards[i];
}

function renderPhase(card, phase, count) {
  const part = (name) => card.querySelector(`.${name}`);
  card.dataset.state = phase.status;
  card.dataset.name = phase.name;
  if (phase.streamed !== undefined) card.dataset.streamed = phase.streamed;
  part("name").textContent = `${phase.index + 1}/${count} · ${phase.name}`;
  setBadge(part("badge"), phase.status);
  part("model").textContent = phase.model;
  const box = part("text");
  if (box.textContent !== phase.text) {
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 24;
    box.textContent = phase.text;
    if (atBottom) box.scrollTop = box.scrollHeight;
  }
  part("note").textContent = phase.note || "";
  part("stats").textContent = phase.usage ? phaseStats(phase) : "";
}

function phaseStats(phase) {
  const u = phase.usage;
  const parts = [`${u.promptTokens} in / ${u.completionTokens} out tokens`, money(u.costUsd), seconds(phase.durationMs)];
  if (phase.tries > 1) parts.push(`${phase.tries} tries`);
  if (phase.cacheHit) parts.push("from cache");
  return parts.join(" · ");
}

function money(usd) { return `$${(usd || 0).toFixed(usd >= 1 ? 2 : 4)}`; }

function setBadge(el, status) { el.className = `badge ${status.replace(/ /g, "-")}`; el.textContent = status; }

function renderOutcome(run) {
  if (current.finalShown !== run.finalPlan) {
    $("final-plan").innerHTML = renderMarkdown(run.finalPlan);
    current.finalShown = run.finalPlan;
  }
  $("rating").hidden = !run.rating;
  if (run.rating) {
    $("score").innerHTML = `${run.rating.score}<small> / 10</small>`;
    $("reasons").replaceChildren(...run.rating.reasons.map((reason) => {
      const li = document.createElement("li");
      li.textContent = reason;
      return li;
    }));
  }
  const rows = [["phase", "tokens in", "tokens out", "cost"]];
  for (const p of run.phases) {
    const u = p.usage || {};
    rows.push([p.name, u.promptTokens || 0, u.completionTokens || 0, money(u.costUsd)]);
  }
  const t = run.totalUsage || {};
  rows.push(["total", t.promptTokens || 0, t.completionTokens || 0, money(t.costUsd)]);
  $("usage").replaceChildren(...rows.map((cells, i) => {
    const tr = document.createElement("tr");
    if (i === rows.length - 1) tr.className = "total";
    for (const cell of cells) {
      const td = document.createElement(i === 0 ? "th" : "td");
      td.textContent = cell;
      tr.append(td);
    }
    return tr;
  }));
}

function showError(id, error) {
  const el = $(id);
  let text = error instanceof Error ? error.message : String(error);
  if (error instanceof GrpcError && error.code === 16) text += "\nEnter the server's API token at the top right.";
  el.textContent = text;
  el.hidden = false;
}

// ---------------------------------------------------------------- Markdown

const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

// Inline Markdown on already escaped text: code spans first, so nothing
// inside them is formatted.
function inline(text) {
  return text.split(/(`[^`]+`)/).map((part, i) => {
    if (i % 2) return `<code>${part.slice(1, -1)}</code>`;
    return part
      .replace(/\*\*(.+?)\*\*|__(.+?)__/g, (_, a, b) => `<strong>${a ?? b}</strong>`)
      .replace(/(^|[^*\w])\*(?!\s)(.+?)\*(?!\w)|(^|\W)_(?!\s)(.+?)_(?!\w)/g,
        (_, p1, a, p2, b) => `${p1 ?? p2}<em>${a ?? b}</em>`);
  }).join("");
}

// A small, safe Markdown renderer: headings, paragraphs, lists, block
// quotes, code blocks, tables, rules, bold, italics and code. The input is
// escaped first, so the only tags in the output are the ones made here.
function renderMarkdown(source) {
  const lines = escapeHtml(source.replace(/\r\n?/g, "\n")).split("\n");
  const out = [];
  let i = 0;
  const isBlockStart = (line) => /^(#{1,6}\s|```|\s*([-*+]|\d+[.)])\s|&gt;|\|)/.test(line) || /^\s*([-*_])(\s*\1){2,}\s*$/.test(line);
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) { i++; continue; }
    if (line.startsWith("```")) {
      const code = [];
      for (i++; i < lines.length && !lines[i].startsWith("```"); i++) code.push(lines[i]);
      i++;
      out.push(`<pre><code>${code.join("\n")}</code></pre>`);
    } else if ((m = /^(#{1,6})\s+(.*?)\s*#*\s*$/.exec(line))) {
      out.push(`<h${m[1].length}>${inline(m[2])}</h${m[1].length}>`);
      i++;
    } else if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
      out.push("<hr>");
      i++;
    } else if (/^\s*([-*+]|\d+[.)])\s/.test(line)) {
      const ordered = /^\s*\d/.test(line);
      const items = [];
      while (i < lines.length && (m = /^\s*(?:[-*+]|\d+[.)])\s+(.*)$/.exec(lines[i]))) {
        items.push(inline(m[1]));
        i++;
        while (i < lines.length && /^\s{2,}\S/.test(lines[i]) && !/^\s*([-*+]|\d+[.)])\s/.test(lines[i])) {
          items[items.length - 1] += ` ${inline(lines[i].trim())}`;
          i++;
        }
      }
      const tag = ordered ? "ol" : "ul";
      out.push(`<${tag}>${items.map((item) => `<li>${item}</li>`).join("")}</${tag}>`);
    } else if (line.startsWith("&gt;")) {
      const quoted = [];
      while (i < lines.length && lines[i].startsWith("&gt;")) quoted.push(lines[i++].replace(/^&gt;\s?/, ""));
      out.push(`<blockquote>${inline(quoted.join(" "))}</blockquote>`);
    } else if (line.trim().startsWith("|") && i + 1 < lines.length && /^\s*\|?\s*:?-{2,}/.test(lines[i + 1])) {
      const cells = (row) => row.trim().replace(/^\||\|$/g, "").split("|").map((c) => inline(c.trim()));
      const head = cells(line);
      i += 2;
      const body = [];
      while (i < lines.length && lines[i].trim().startsWith("|")) body.push(cells(lines[i++]));
      out.push(`<table><thead><tr>${head.map((c) => `<th>${c}</th>`).join("")}</tr></thead><tbody>`
        + body.map((r) => `<tr>${r.map((c) => `<td>${c}</td>`).join("")}</tr>`).join("") + "</tbody></table>");
    } else {
      const para = [line.trim()];
      for (i++; i < lines.length && lines[i].trim() && !isBlockStart(lines[i]); i++) para.push(lines[i].trim());
      out.push(`<p>${inline(para.join(" "))}</p>`);
    }
  }
  return out.join("\n");
}

// ---------------------------------------------------------------- start, list, cancel

let idempotencyKey = "";

function readFields(text) {
  const fields = [];
  for (const [n, raw] of text.split("\n").entries()) {
    const line = raw.trim();
    if (!line) continue;
    const eq = line.indexOf("=");
    if (eq < 1) throw new Error(`fields, line ${n + 1}: "${line}" is not key=value`);
    fields.push([line.slice(0, eq).trim(), line.slice(eq + 1).trim()]);
  }
  return fields;
}

async function startRun(event) {
  event.preventDefault();
  $("start-error").hidden = true;
  const button = $("start");
  button.disabled = true;
  try {
    const plan = { name: $("plan-name").value.trim(), description: $("plan-description").value, fields: readFields($("plan-fields").value) };
    // One key per plan as typed: pressing Start again after a lost answer
    // returns the run the first press made instead of starting a second.
    idempotencyKey ||= `web-${crypto.randomUUID()}`;
    const reply = await unary("StartWorkflow", startRequest(plan, idempotencyKey), StartWorkflowResponse);
    idempotencyKey = "";
    location.hash = reply.workflowId;
    loadRuns();
  } catch (error) {
    showError("start-error", error);
  } finally {
    button.disabled = false;
  }
}

async function cancelRun() {
  if (!current) return;
  try {
    const w = new Writer();
    w.string(1, current.run.id);
    w.string(2, "cancelled in the web tracker");
    await unary("CancelWorkflow", w.finish(), Workflow);
  } catch (error) {
    showError("run-error", error);
  }
}

async function loadRuns() {
  try {
    const reply = await unary("ListWorkflows", listRequest(15), ListWorkflowsResponse);
    $("runs-error").hidden = true;
    $("runs-empty").hidden = reply.workflows.length > 0;
    $("runs").replaceChildren(...reply.workflows.map((w) => {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = `#${w.workflowId}`;
      a.dataset.id = w.workflowId;
      const name = document.createElement("span");
      name.textContent = w.plan?.name || w.workflowId;
      const status = document.createElement("span");
      setBadge(status, WORKFLOW_STATUS[w.status] || "unknown");
      const when = document.createElement("span");
      when.className = "when";
      const created = w.createdAt ? new Date(w.createdAt.seconds * 1000).toLocaleString() : "";
      when.textContent = `${created} · ${money(w.totalUsage?.costUsd)}`;
      a.append(name, status, when);
      li.append(a);
      return li;
    }));
    markCurrentRun();
  } catch (error) {
    showError("runs-error", error);
  }
}

function markCurrentRun() {
  for (const a of document.querySelectorAll("#runs a")) a.classList.toggle("current", a.dataset.id === current?.run.id);
}

function openFromHash() {
  const id = decodeURIComponent(location.hash.slice(1));
  if (id) open(id);
}

$("token").value = token();
$("token").addEventListener("change", () => {
  localStorage.setItem("nexus.token", $("token").value.trim());
  loadRuns();
  if (current && !TERMINAL.has(current.run.status)) { const id = current.run.id; close(); open(id); }
});
$("start-form").addEventListener("submit", startRun);
$("start-form").addEventListener("input", () => { idempotencyKey = ""; });
$("refresh-runs").addEventListener("click", loadRuns);
$("cancel").addEventListener("click", cancelRun);
window.addEventListener("hashchange", openFromHash);
window.addEventListener("pagehide", () => { if (current) saveNow(current); });
window.nexusTracker = { debug, renderMarkdown, state: () => current?.run };
openFromHash();
loadRuns();
