// The trio-relay browser console: plain JavaScript, no dependencies, no build step.
//
// It reads /stats from the server that served it (the relay's HTTP side port) to learn the
// relay's WebSocket port, then connects with trio-relay.js, the relay's JavaScript client
// (trio-relay.v2, PROTOCOL.md), to ws(s)://<this host>:<relay port>/ and subscribes to the
// topic typed. The client reconnects with backoff and resumes the topic from the last
// sequence number seen; gaps are shown in the log. Another topic with the same token is a
// new subscription on the same connection.

import { connect } from "./trio-relay.js";

const MAX_MESSAGES = 500; // entries kept in the log; the oldest go first
const STATS_EVERY = 1000; // milliseconds between refreshes of the relay panel
const REFUSALS_BEFORE_GIVING_UP = 3;
const TOPIC = /^(?:[A-Za-z0-9_.~-]+(?:\/[A-Za-z0-9_.~-]+)*)?$/;

const byId = (id) => document.getElementById(id);
const ui = {
  state: byId("state"),
  stateBadge: byId("state").querySelector(".badge"),
  stateDetail: byId("state-detail"),
  error: byId("error"),
  connectForm: byId("connect-form"),
  topic: byId("topic"),
  token: byId("token"),
  disconnect: byId("disconnect"),
  log: byId("log"),
  messages: byId("messages"),
  count: byId("count"),
  publishForm: byId("publish-form"),
  message: byId("message"),
  publish: byId("publish"),
  publishStatus: byId("publish-status"),
  statsStatus: byId("stats-status"),
};

let stats = null; // {ports, tls, auth, ...}: the latest /stats
let client = null; // the trio-relay.js client; events of older ones are ignored
let token = ""; // the token `client` connects with
let topic = ""; // the topic subscribed to ("" is the root topic)
let last = null; // sequence number of the last message seen: where a new Connect resumes
let refusals = 0; // consecutive attempts refused while the side port answered
let attempts = 0; // consecutive attempts that did not connect
const mine = new Set(); // sequence numbers of messages this page published
let pending = []; // log entries not yet in the DOM (added in batches)
let flushScheduled = false;
let previous = null; // the previous /stats sample, for the rates

// ------------------------------------------------------------------ state and errors

function setState(state, detail) {
  ui.state.dataset.state = state;
  ui.stateBadge.textContent = state;
  ui.stateDetail.textContent = detail;
  ui.disconnect.disabled = client === null;
  ui.publish.disabled = state !== "open";
}

function showError(text) {
  ui.error.textContent = text;
  ui.error.hidden = false;
}

function hideError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

function topicLabel(name) {
  return name === "" ? "/ (root)" : name;
}

function describeClose(event) {
  if (event.code === null) return event.reason;
  if (event.code === 1006) return "connection lost (code 1006)";
  return `code ${event.code}${event.closeReason ? ` (${event.closeReason})` : ""}`;
}

function refusalText() {
  const where = `${location.protocol}//${location.host}`;
  if (stats && stats.auth && !token) {
    return "This relay requires a token: paste one in Token and press Connect.";
  }
  if (stats && stats.auth) {
    return (
      "The relay refused the connection: the token may be wrong or expired. (It also " +
      `refuses this page's origin, ${where}, when --allowed-origins does not list it, and ` +
      "connections over its limits.)"
    );
  }
  return (
    "The relay refused the connection: this page's origin, " +
    `${where}, may be missing from its --allowed-origins, or it is at a connection limit.`
  );
}

// ------------------------------------------------------------------ the log

function clock() {
  return new Date().toLocaleTimeString([], { hour12: false });
}

function entry(kind, seq, text) {
  const item = document.createElement("li");
  item.className = kind;
  const time = document.createElement("time");
  time.textContent = clock();
  item.append(time, " ");
  if (seq !== null) {
    item.dataset.seq = String(seq);
    const number = document.createElement("span");
    number.className = "seq";
    number.textContent = `#${seq}`;
    item.append(number, " ");
  }
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  item.append(body);
  pending.push(item);
  if (pending.length > MAX_MESSAGES) pending = pending.slice(-MAX_MESSAGES);
  if (!flushScheduled) {
    flushScheduled = true;
    setTimeout(flush, 16);
  }
}

function note(text) {
  entry("note", null, text);
}

function flush() {
  flushScheduled = false;
  const box = ui.log;
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  const fragment = document.createDocumentFragment();
  for (const item of pending) {
    // An ack and the echo of the same message can arrive in either order.
    if (mine.has(Number(item.dataset.seq))) item.classList.add("mine");
  }
  fragment.append(...pending);
  pending = [];
  ui.messages.append(fragment);
  while (ui.messages.childElementCount > MAX_MESSAGES) ui.messages.firstElementChild.remove();
  const shown = ui.messages.childElementCount;
  ui.count.textContent = shown >= MAX_MESSAGES ? `(the latest ${MAX_MESSAGES})` : "";
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function clearLog() {
  pending = [];
  ui.messages.replaceChildren();
  ui.count.textContent = "";
  mine.clear();
}

function shownPayload(data) {
  if (typeof data === "string") return data;
  const hex = Array.from(data.slice(0, 64), (b) => b.toString(16).padStart(2, "0"));
  return `<${data.length} bytes> ${hex.join(" ")}${data.length > 64 ? " …" : ""}`;
}

function markMine(seq) {
  mine.add(seq);
  for (const item of ui.messages.querySelectorAll(`li[data-seq="${seq}"]`)) {
    item.classList.add("mine");
  }
}

// ------------------------------------------------------------------ the connection

function relayUrl() {
  const scheme = stats.tls ? "wss" : "ws";
  return `${scheme}://${location.hostname}:${stats.ports[0]}/`;
}

function where() {
  return `${client.url}, topic ${topicLabel(topic)}`;
}

// Listen to `relay`'s events; those of a client replaced meanwhile are ignored.
function listen(relay) {
  const on = (type, handler) =>
    relay.addEventListener(type, (event) => {
      if (relay === client) handler(event);
    });
  on("state", (event) => {
    if (event.state === "connecting") {
      setState(attempts === 0 ? "connecting" : "reconnecting", where());
    } else if (event.state === "connected") {
      refusals = 0;
      attempts = 0;
      hideError();
      setState("open", where());
    } else if (event.state === "retrying") {
      attempts += 1;
      const wait = `trying again in ${event.delay.toFixed(1)} s`;
      if (event.opened) {
        note(`connection closed: ${describeClose(event)}; reconnecting`);
        setState("reconnecting", `closed: ${describeClose(event)}; ${wait}`);
      } else {
        setState("reconnecting", `${describeClose(event)}; ${wait}`);
        diagnose(relay);
      }
    } else if (event.state === "closed" && event.reason !== "closed by the client") {
      client = null;
      setState("closed", event.reason);
    }
  });
  on("subscribed", (event) => {
    if (event.topic !== topic) return;
    if (event.since === null) {
      note(`subscribed to ${topicLabel(event.topic)}, which is at #${event.seq}`);
    } else {
      note(`resumed ${topicLabel(event.topic)} after #${event.since} (the topic is at #${event.seq})`);
    }
    if (last === null) last = event.seq;
  });
  on("unsubscribed", (event) => {
    if (event.topic !== topic || event.code === null) return;
    const again = event.retry === undefined ? "" : `; subscribing again in ${event.retry.toFixed(1)} s`;
    entry("error", null, `${topicLabel(event.topic)}: ${event.code}: ${event.detail}${again}`);
    if (event.retry === undefined) {
      showError(`Not subscribed to ${topicLabel(event.topic)}: ${event.code}: ${event.detail}`);
    }
  });
  on("message", (event) => {
    if (event.topic !== topic) return;
    last = event.seq;
    entry("message", event.seq, shownPayload(event.data));
  });
  on("gap", (event) => {
    if (event.topic !== topic) return;
    if (!event.reset) {
      const lost =
        event.first - 1 === event.since + 1
          ? `message #${event.first - 1} was`
          : `messages #${event.since + 1} to #${event.first - 1} were`;
      entry("gap", null, `gap: ${lost} lost (no longer retained by the relay)`);
    } else {
      entry(
        "gap",
        null,
        "gap: the topic was reset (the relay restarted or forgot it): messages after " +
          `#${event.since} are lost, and numbering starts again`,
      );
      mine.clear(); // those numbers now name other messages
    }
    last = event.first - 1;
  });
  on("error", (event) => {
    entry("error", null, `error ${event.error.code}: ${event.error.detail}`);
  });
}

// An attempt that failed before it opened: the relay refused the upgrade (HTTP 401, 403,
// 400 or 503: a browser sees only code 1006) or the relay is down. If this page's own
// server still answers, the relay (the same process) is up: it was a refusal.
async function diagnose(relay) {
  const reachable = await refreshStats();
  if (relay !== client || relay.state === "connected") return;
  if (!reachable) {
    if (relay.state === "retrying") setState("reconnecting", "the relay is unreachable; trying again");
    return;
  }
  refusals += 1;
  showError(refusalText());
  if (refusals >= REFUSALS_BEFORE_GIVING_UP) {
    client = null;
    relay.close();
    setState("refused", "the relay refused the connection; press Connect to try again");
  }
}

function start() {
  const input = ui.topic.value.trim().replace(/^\//, "");
  if (!TOPIC.test(input)) {
    ui.topic.reportValidity();
    return;
  }
  const wanted = ui.token.value.trim();
  try {
    sessionStorage.setItem("trio-relay-token", wanted);
  } catch {
    // storage disabled: the token lasts as long as the page
  }
  const params = new URLSearchParams(location.search);
  if (input) params.set("topic", input);
  else params.delete("topic");
  const search = params.toString();
  history.replaceState(null, "", `${location.pathname}${search ? `?${search}` : ""}`);
  if (input !== topic) {
    clearLog();
    last = null;
  }
  hideError();
  if (client !== null && wanted === token) {
    // The same token: another topic on the same connection.
    if (input !== topic) {
      client.unsubscribe(topic);
      topic = input;
      client.subscribe(topic);
    } else if (!client.subscriptions.some((sub) => sub.topic === topic)) {
      client.subscribe(topic, { since: last }); // it had been refused: try again
    }
    if (client.state === "connected") setState("open", where());
    return;
  }
  topic = input;
  token = wanted;
  stop();
  refusals = 0;
  attempts = 0;
  client = connect(relayUrl(), { token: token || null });
  listen(client);
  client.subscribe(topic, { since: last });
}

// Close the client, if any, without reconnecting: its events are then ignored.
function stop() {
  const relay = client;
  client = null;
  if (relay !== null) relay.close();
}

async function publish(text) {
  ui.publishStatus.textContent = "publishing…";
  try {
    const report = await client.publish(topic, text);
    markMine(report.seq);
    let shown = `published as #${report.seq}, queued for ${report.queued}`;
    if (report.dropped) shown += `, dropped for ${report.dropped}`;
    if (report.evicted) shown += `, evicted ${report.evicted}`;
    ui.publishStatus.textContent = shown;
  } catch (error) {
    ui.publishStatus.textContent = `not published: ${error.code}: ${error.detail}`;
    entry("error", null, `error ${error.code}: ${error.detail}`);
  }
}

// ------------------------------------------------------------------ the relay panel

function show(id, value) {
  byId(id).textContent = value;
}

function rate(now, before, seconds) {
  const value = (now - before) / seconds;
  return value >= 10 ? String(Math.round(value)) : value.toFixed(1);
}

async function refreshStats() {
  let answer;
  try {
    const response = await fetch("stats", { cache: "no-store", signal: AbortSignal.timeout(3000) });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    answer = await response.json();
  } catch (error) {
    ui.statsStatus.textContent = `cannot read /stats: ${error.message}`;
    return false;
  }
  stats = answer;
  const now = performance.now();
  show("stat-connections", String(stats.connections));
  show("stat-dropped", String(stats.dropped));
  show("stat-evicted", String(stats.evicted));
  show("stat-topics", String(stats.topics));
  show("stat-subscribers", String(stats.subscribers));
  // With a Redis backplane: "up", or "down" while this relay serves its own clients only.
  byId("stat-backplane-tile").hidden = stats.backplane === null;
  if (stats.backplane !== null) show("stat-backplane", stats.backplane);
  if (previous === null || now - previous.at > 500) {
    if (previous !== null) {
      const seconds = (now - previous.at) / 1000;
      show("stat-rate-in", rate(stats.messages_in, previous.stats.messages_in, seconds));
      show("stat-rate-out", rate(stats.messages_out, previous.stats.messages_out, seconds));
    }
    previous = { at: now, stats };
  }
  ui.statsStatus.textContent = `updated ${clock()}`;
  return true;
}

async function pollStats() {
  await refreshStats();
  setTimeout(pollStats, STATS_EVERY);
}

// ------------------------------------------------------------------ start

ui.connectForm.addEventListener("submit", (event) => {
  event.preventDefault();
  if (stats === null) {
    showError("The relay's address is unknown: /stats did not answer. Reload the page.");
    return;
  }
  start();
});

ui.disconnect.addEventListener("click", () => {
  stop();
  setState("closed", "disconnected by you");
});

ui.publishForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.message.value;
  if (text === "") {
    ui.publishStatus.textContent = "type a message first";
    return;
  }
  if (client === null || client.state !== "connected") {
    ui.publishStatus.textContent = "not connected: the message was not sent";
    return;
  }
  ui.message.value = "";
  publish(text);
});

async function main() {
  ui.topic.value = new URLSearchParams(location.search).get("topic") || "";
  try {
    ui.token.value = sessionStorage.getItem("trio-relay-token") || "";
  } catch {
    // storage disabled
  }
  const reachable = await refreshStats();
  setTimeout(pollStats, STATS_EVERY);
  if (!reachable) {
    setState("closed", "cannot read /stats from this page's server");
    showError("The relay's address is unknown: /stats did not answer. Reload the page.");
  } else if (stats.ports.length === 0) {
    setState("closed", "the relay has no TCP port to connect to");
  } else if (stats.auth && !ui.token.value.trim()) {
    setState("closed", "this relay requires a token");
    showError(refusalText());
    ui.token.focus();
  } else {
    start();
  }
}

main();
