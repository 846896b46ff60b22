// The trio-relay browser console: plain JavaScript, no dependencies, no build step.
//
// It reads /stats from the server that served it (the relay's HTTP side port) to learn the
// relay's WebSocket port, then speaks the trio-relay.v1 envelope protocol (PROTOCOL.md) to
// ws(s)://<this host>:<relay port>/<topic>. After a drop it reconnects with backoff and
// resumes with since=<the last sequence number seen>; gap frames are shown in the log.
"use strict";

(() => {
  const SUBPROTOCOL = "trio-relay.v1";
  const MAX_MESSAGES = 500; // entries kept in the log; the oldest go first
  const BACKOFF_FIRST = 0.1; // seconds before the first reconnection attempt, doubling...
  const BACKOFF_MAX = 5; // ...up to this
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

  let relay = null; // {ports, tls, auth, ...}: the latest /stats
  let topic = ""; // the topic connected to ("" is the root topic, path /)
  let token = "";
  let socket = null; // the current WebSocket; handlers of older ones do nothing
  let wanted = false; // whether the user wants a connection (false after Disconnect)
  let last = null; // sequence number of the last message seen: the resume point
  let attempt = 0; // consecutive failed attempts, for the backoff
  let refusals = 0; // consecutive attempts refused while the side port answered
  let retryTimer = null;
  let nextId = 1;
  const mine = new Set(); // sequence numbers of messages this page published
  let pending = []; // log entries not yet in the DOM (added in batches)
  let flushScheduled = false;
  let previous = null; // the previous /stats sample, for the rates

  // ------------------------------------------------------------------ state and errors

  function setState(state, detail) {
    ui.state.dataset.state = state;
    ui.stateBadge.textContent = state;
    ui.stateDetail.textContent = detail;
    ui.disconnect.disabled = !wanted;
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
    if (event.code === 1006) return "connection lost (code 1006)";
    return `code ${event.code}${event.reason ? ` (${event.reason})` : ""}`;
  }

  function refusalText() {
    const where = `${location.protocol}//${location.host}`;
    if (relay && relay.auth && !token) {
      return "This relay requires a token: paste one in Token and press Connect.";
    }
    if (relay && relay.auth) {
      return (
        "The relay refused the connection: the token may be wrong or expired, or may not " +
        `allow topic ${topicLabel(topic)}. (It also refuses this page's origin, ${where}, ` +
        "when --allowed-origins does not list it, and connections over its limits.)"
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

  function payload(frame) {
    if (typeof frame.text === "string") return frame.text;
    const bytes = Uint8Array.from(atob(frame.binary || ""), (c) => c.charCodeAt(0));
    const hex = Array.from(bytes.slice(0, 64), (b) => b.toString(16).padStart(2, "0"));
    return `<${bytes.length} bytes> ${hex.join(" ")}${bytes.length > 64 ? " …" : ""}`;
  }

  // ------------------------------------------------------------------ the connection

  function relayUrl(since) {
    const scheme = relay.tls ? "wss" : "ws";
    const query = new URLSearchParams();
    if (since !== null) query.set("since", String(since));
    if (token) query.set("token", token);
    const search = query.toString();
    return `${scheme}://${location.hostname}:${relay.ports[0]}/${topic}${search ? `?${search}` : ""}`;
  }

  function connect() {
    clearTimeout(retryTimer);
    retryTimer = null;
    const since = last;
    const url = relayUrl(since);
    const shown = url.replace(/([?&]token=)[^&]*/, "$1…");
    setState(attempt === 0 ? "connecting" : "reconnecting", shown);
    const ws = new WebSocket(url, SUBPROTOCOL);
    socket = ws;
    let opened = false;
    ws.onopen = () => {
      if (ws !== socket) return;
      opened = true;
      attempt = 0;
      refusals = 0;
      hideError();
      setState("open", shown);
    };
    ws.onmessage = (event) => {
      if (ws !== socket) return;
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        note(`not a JSON frame: ${String(event.data).slice(0, 200)}`);
        return;
      }
      receive(frame, since);
    };
    ws.onclose = (event) => {
      if (ws !== socket) return;
      socket = null;
      if (!wanted) {
        setState("closed", describeClose(event));
      } else if (opened) {
        note(`connection closed: ${describeClose(event)}; reconnecting`);
        retry(`closed: ${describeClose(event)}`);
      } else {
        diagnose();
      }
    };
  }

  // A connection that failed before it opened: the relay refused the upgrade (HTTP 401,
  // 403, 400 or 503: a browser sees only code 1006) or the relay is down. If this page's
  // own server still answers, the relay (the same process) is up: it was a refusal.
  async function diagnose() {
    const reachable = await refreshStats();
    if (!wanted || socket !== null || retryTimer !== null) return;
    if (!reachable) {
      retry("the relay is unreachable");
      return;
    }
    refusals += 1;
    showError(refusalText());
    if (refusals >= REFUSALS_BEFORE_GIVING_UP) {
      wanted = false;
      setState("refused", "the relay refused the connection; press Connect to try again");
      return;
    }
    retry("the relay refused the connection");
  }

  function retry(why) {
    const delay = Math.min(BACKOFF_FIRST * 2 ** attempt, BACKOFF_MAX);
    attempt += 1;
    setState("reconnecting", `${why}; trying again in ${delay.toFixed(1)} s`);
    retryTimer = setTimeout(connect, delay * 1000);
  }

  function receive(frame, since) {
    switch (frame.type) {
      case "welcome":
        if (since === null) {
          note(`subscribed to ${topicLabel(frame.topic)}, which is at #${frame.seq}`);
        } else {
          note(`resumed ${topicLabel(frame.topic)} after #${since} (the topic is at #${frame.seq})`);
        }
        if (last === null) last = frame.seq;
        break;
      case "message":
        last = frame.seq;
        entry("message", frame.seq, payload(frame));
        break;
      case "gap":
        if (frame.first > frame.since) {
          const lost = frame.first - 1 === frame.since + 1
            ? `message #${frame.first - 1} was`
            : `messages #${frame.since + 1} to #${frame.first - 1} were`;
          entry("gap", null, `gap: ${lost} lost (no longer retained by the relay)`);
        } else {
          entry(
            "gap",
            null,
            `gap: the topic was reset (the relay restarted or forgot it): messages after ` +
              `#${frame.since} are lost, and numbering starts again`,
          );
          mine.clear(); // those numbers now name other messages
        }
        last = frame.first - 1;
        break;
      case "ack": {
        mine.add(frame.seq);
        for (const item of ui.messages.querySelectorAll(`li[data-seq="${frame.seq}"]`)) {
          item.classList.add("mine");
        }
        let report = `published as #${frame.seq}, queued for ${frame.queued}`;
        if (frame.dropped) report += `, dropped for ${frame.dropped}`;
        if (frame.evicted) report += `, evicted ${frame.evicted}`;
        ui.publishStatus.textContent = report;
        break;
      }
      case "error":
        ui.publishStatus.textContent = `not published: ${frame.code}: ${frame.detail}`;
        entry("error", null, `error ${frame.code}: ${frame.detail}`);
        break;
      default:
        break;
    }
  }

  function start() {
    const wasTopic = topic;
    const input = ui.topic.value.trim().replace(/^\//, "");
    if (!TOPIC.test(input)) {
      ui.topic.reportValidity();
      return;
    }
    topic = input;
    token = ui.token.value.trim();
    try {
      sessionStorage.setItem("trio-relay-token", token);
    } catch {
      // storage disabled: the token lasts as long as the page
    }
    const params = new URLSearchParams(location.search);
    if (topic) params.set("topic", topic);
    else params.delete("topic");
    const search = params.toString();
    history.replaceState(null, "", `${location.pathname}${search ? `?${search}` : ""}`);
    if (topic !== wasTopic) {
      clearLog();
      last = null;
    }
    closeSocket();
    hideError();
    wanted = true;
    attempt = 0;
    refusals = 0;
    connect();
  }

  // Close the current connection, if any, without reconnecting: its handlers now do nothing.
  function closeSocket() {
    clearTimeout(retryTimer);
    retryTimer = null;
    const ws = socket;
    socket = null;
    if (ws) ws.close(1000, "closed by the console");
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
    let stats;
    try {
      const response = await fetch("stats", { cache: "no-store", signal: AbortSignal.timeout(3000) });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      stats = await response.json();
    } catch (error) {
      ui.statsStatus.textContent = `cannot read /stats: ${error.message}`;
      return false;
    }
    relay = stats;
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
    if (relay === null) {
      showError("The relay's address is unknown: /stats did not answer. Reload the page.");
      return;
    }
    start();
  });

  ui.disconnect.addEventListener("click", () => {
    wanted = false;
    closeSocket();
    setState("closed", "disconnected by you");
  });

  ui.publishForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.message.value;
    if (text === "") {
      ui.publishStatus.textContent = "type a message first";
      return;
    }
    if (socket === null || socket.readyState !== WebSocket.OPEN) {
      ui.publishStatus.textContent = "not connected: the message was not sent";
      return;
    }
    socket.send(JSON.stringify({ type: "publish", id: nextId++, text }));
    ui.publishStatus.textContent = "publishing…";
    ui.message.value = "";
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
    } else if (relay.ports.length === 0) {
      setState("closed", "the relay has no TCP port to connect to");
    } else if (relay.auth && !ui.token.value.trim()) {
      setState("closed", "this relay requires a token");
      showError(refusalText());
      ui.token.focus();
    } else {
      start();
    }
  }

  main();
})();
