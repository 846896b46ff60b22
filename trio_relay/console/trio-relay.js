// trio-relay.js: a client for the trio-relay WebSocket relay, in the browser and in Node.
//
// One ES module, no dependencies, no build step. It speaks trio-relay.v2 (PROTOCOL.md):
// many topics on one connection. The relay's HTTP side port serves it at /trio-relay.js.
//
//   import { connect } from "http://localhost:9100/trio-relay.js";
//   const relay = connect("ws://localhost:4000/", { token });
//   relay.addEventListener("message", (event) => console.log(event.topic, event.seq, event.data));
//   relay.subscribe("news");
//   const report = await relay.publish("news", "hello");  // {topic, seq, queued, dropped, evicted}
//
// After a lost connection it reconnects with exponential backoff and resubscribes every
// topic from the last sequence number it saw, so each message arrives once, in order, or a
// "gap" event says which were lost. Events (EventTarget): "state", "message", "gap",
// "subscribed", "unsubscribed", "error". Promises reject with a RelayError whose `code` is
// the relay's error code (PROTOCOL.md) or one of this client's: "disconnected", "timeout",
// "closed", "unsubscribed".

export const SUBPROTOCOL = "trio-relay.v2";

const OPEN = 1; // WebSocket.OPEN
const CLOSING_OR_CLOSED = 2;

/** An error the relay answered (`code` as in PROTOCOL.md), or one of this client's. */
export class RelayError extends Error {
  constructor(code, detail, { id, topic } = {}) {
    super(`${code}: ${detail}`);
    this.name = "RelayError";
    /** "forbidden", "bad-topic", ... (the relay's), or "disconnected", "timeout", "closed", "unsubscribed". */
    this.code = code;
    /** Why, for people. */
    this.detail = detail;
    /** The request's id, when it had one. */
    this.id = id;
    /** The request's topic, when it had one. */
    this.topic = topic;
  }
}

/** An event of a Relay: an Event with the fields its type documents. */
export class RelayEvent extends Event {
  constructor(type, fields) {
    super(type);
    Object.assign(this, fields);
  }
}

/** Open a client to the relay at `url` (`ws://host:port/` or `wss://...`): see Relay. */
export function connect(url, options = {}) {
  return new Relay(url, options);
}

function encodeBase64(bytes) {
  let binary = "";
  for (let start = 0; start < bytes.length; start += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(start, start + 0x8000));
  }
  return btoa(binary);
}

function decodeBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function payloadOf(data) {
  if (typeof data === "string") return { text: data };
  if (data instanceof ArrayBuffer) return { binary: encodeBase64(new Uint8Array(data)) };
  if (ArrayBuffer.isView(data)) {
    return { binary: encodeBase64(new Uint8Array(data.buffer, data.byteOffset, data.byteLength)) };
  }
  return null;
}

function noop() {}

/**
 * A connection to a relay that carries many subscriptions, and reconnects.
 *
 * Options:
 * - `token`: a string, or a function returning one (or a promise of one), called before
 *   every connection; sent as `?token=` (browsers cannot set headers on a WebSocket).
 *   When the relay closes with 4401 (token expired), a function is called again for a new
 *   token; with a string the client stops ("closed").
 * - `resume` (true): reconnect after a lost connection and resubscribe every topic from the
 *   last sequence number seen. false: a lost connection ends the client ("closed").
 * - `backoff` ([0.1, 5]): seconds before the first reconnection attempt, doubling after
 *   each attempt that delivers nothing, up to the second figure.
 * - `jitter` (0.5): each delay is shortened at random by up to this fraction, so that
 *   many clients do not all come back to a restarted relay at once.
 * - `connectTimeout` (10): seconds an opening handshake may take before it is abandoned
 *   (and retried).
 * - `publishTimeout` (10): seconds a publish may wait for its delivery report, counted from
 *   the call (waiting for a connection included).
 * - `WebSocket`: the WebSocket class to use (default: the global one).
 */
export class Relay extends EventTarget {
  #url;
  #token;
  #resume;
  #backoff;
  #jitter;
  #connectTimeout;
  #publishTimeout;
  #WebSocket;

  #state = "connecting";
  #socket = null;
  #opened = false; // whether #socket opened
  #delivered = false; // whether #socket delivered a frame (which resets the backoff)
  #attempt = 0; // attempts since the last connection that delivered a frame
  #retryTimer = null;
  #connectTimer = null;
  #nextId = 1;
  #subscriptions = new Map(); // topic -> Subscription
  #ignored = new Map(); // topic -> unsubscribes sent and not yet answered on #socket
  #requests = new Map(); // id -> request awaiting an answer on #socket
  #outbox = []; // publishes waiting for a connection
  #closedWaiters = [];

  constructor(url, options = {}) {
    super();
    const {
      token = null,
      resume = true,
      backoff = [0.1, 5],
      jitter = 0.5,
      connectTimeout = 10,
      publishTimeout = 10,
      WebSocket = globalThis.WebSocket,
    } = options;
    if (typeof WebSocket !== "function") {
      throw new TypeError("no WebSocket class: pass one as the WebSocket option");
    }
    this.#url = new URL(url);
    if (this.#url.protocol !== "ws:" && this.#url.protocol !== "wss:") {
      throw new TypeError(`the relay's URL must be ws:// or wss://, not ${this.#url.protocol}`);
    }
    if (!this.#url.pathname.endsWith("/")) {
      // A path that names a topic would subscribe it outside of subscribe()'s bookkeeping.
      throw new TypeError(
        `the relay's URL names a topic (${this.#url.pathname}): give its root ` +
          "(ws://host:port/) and subscribe() to topics",
      );
    }
    this.#token = token;
    this.#resume = resume;
    this.#backoff = backoff;
    this.#jitter = jitter;
    this.#connectTimeout = connectTimeout;
    this.#publishTimeout = publishTimeout;
    this.#WebSocket = WebSocket;
    queueMicrotask(() => this.#open());
  }

  /** "connecting", "connected", "retrying" (waiting to reconnect) or "closed". */
  get state() {
    return this.#state;
  }

  /** The relay's URL as shown in events: any token in it is replaced by "…". */
  get url() {
    return this.#shown(this.#url);
  }

  /**
   * The subscriptions: for each, `{topic, last, subscribed}`: the sequence number of the
   * last message (or of the point subscribed to, or gap), from which a reconnection
   * resumes; whether the relay has it now.
   */
  get subscriptions() {
    return Array.from(this.#subscriptions.values(), (sub) =>
      Object.freeze({
        topic: sub.topic,
        last: sub.last,
        ...(sub.epoch !== null && { epoch: sub.epoch }),
        subscribed: sub.subscribed,
      }),
    );
  }

  /**
   * Subscribe to `topic` ("news", "news/sport"; "" is the root topic), from `since` (the
   * last sequence number already seen: messages after it are replayed first) or from now;
   * `epoch` is the epoch of `since`, as the relay sent it (a relay whose numbering of the
   * topic is another answers with a "gap" event whose `reset` is true). Every reconnection
   * resumes from the last number and epoch seen.
   *
   * Resolves with `{topic, seq, epoch}` when the relay has subscribed (`seq`: the topic's
   * last number then, of `epoch`); rejects with a RelayError ("forbidden", "bad-topic",
   * "too-many-subscriptions", ...) when it refuses, and the subscription is dropped. The
   * subscription is kept across reconnections until `unsubscribe`. Subscribing to a topic
   * already subscribed returns the same answer and changes nothing. Its rejection is also
   * reported by an "unsubscribed" event, so a caller may ignore the promise.
   */
  subscribe(topic, { since = null, epoch = null } = {}) {
    if (typeof topic !== "string") {
      return Promise.reject(new TypeError("a topic is a string"));
    }
    if (since !== null && !(Number.isSafeInteger(since) && since >= 0)) {
      return Promise.reject(new TypeError("since is a whole number >= 0, or null"));
    }
    if (epoch !== null && (typeof epoch !== "string" || since === null)) {
      return Promise.reject(new TypeError("epoch is a string, the epoch of since"));
    }
    if (this.#state === "closed") {
      return Promise.reject(new RelayError("closed", "the client is closed", { topic }));
    }
    const existing = this.#subscriptions.get(topic);
    if (existing !== undefined) return existing.promise;
    const sub = { topic, last: since, epoch, subscribed: false, retryTimer: null };
    sub.promise = new Promise((resolve, reject) => {
      sub.resolve = resolve;
      sub.reject = reject;
    });
    sub.promise.catch(noop); // also reported by an "unsubscribed" event
    this.#subscriptions.set(topic, sub);
    if (this.#isOpen()) this.#sendSubscribe(sub);
    return sub.promise;
  }

  /**
   * End the subscription to `topic`: no message of it is delivered after this call.
   * Resolves once the relay has answered (at once when not connected, or not subscribed).
   */
  unsubscribe(topic) {
    const sub = this.#subscriptions.get(topic);
    if (sub === undefined) return Promise.resolve();
    this.#drop(sub, new RelayError("unsubscribed", "unsubscribed before the relay answered", { topic }));
    this.#dispatch("unsubscribed", { topic, code: null, detail: null });
    if (!this.#isOpen()) return Promise.resolve();
    this.#ignored.set(topic, (this.#ignored.get(topic) ?? 0) + 1);
    return new Promise((resolve) => {
      const id = this.#nextId++;
      this.#requests.set(id, { kind: "unsubscribe", topic, resolve });
      this.#send({ type: "unsubscribe", topic, id });
    });
  }

  /**
   * Publish `data` (a string; or bytes: an ArrayBuffer or a typed array) on `topic`.
   *
   * Resolves with the delivery report `{topic, seq, epoch, queued, dropped, evicted}` (and
   * `remote` with a Redis backplane: PROTOCOL.md "ack"; `duplicate: true` when
   * `idempotencyKey` was used on the topic within the relay's window: nothing was
   * published again, and `seq` names the first one). Rejects with a RelayError: the
   * relay's ("forbidden", "bad-topic", "bad-payload", ...: nothing was published);
   * "disconnected" (the connection was lost after the message was sent: it may or may not
   * have been published; it is not sent again); "timeout" (no report within
   * `publishTimeout`); "closed" (`close()` was called first). While not connected, the
   * message waits for the next connection. `echo: false`: the relay does not send it back
   * to this connection's own subscription. `idempotencyKey` (a string of 1 to 128
   * characters) makes publishing it again after "disconnected" or "timeout" safe.
   */
  publish(topic, data, { echo = true, idempotencyKey = null } = {}) {
    if (typeof topic !== "string") {
      return Promise.reject(new TypeError("a topic is a string"));
    }
    const payload = payloadOf(data);
    if (payload === null) {
      return Promise.reject(new TypeError("publish a string, an ArrayBuffer or a typed array"));
    }
    if (idempotencyKey !== null && !(typeof idempotencyKey === "string" && idempotencyKey.length >= 1 && idempotencyKey.length <= 128)) {
      return Promise.reject(new TypeError("idempotencyKey is a string of 1 to 128 characters"));
    }
    if (this.#state === "closed") {
      return Promise.reject(new RelayError("closed", "the client is closed", { topic }));
    }
    return new Promise((resolve, reject) => {
      const id = this.#nextId++;
      const frame = { type: "publish", topic, id, ...payload };
      if (!echo) frame.echo = false;
      if (idempotencyKey !== null) frame.idempotency_key = idempotencyKey;
      const request = { kind: "publish", topic, id, frame, resolve, reject, sent: false };
      request.timer = setTimeout(() => this.#timeOut(request), this.#publishTimeout * 1000);
      if (this.#isOpen()) {
        this.#sendRequest(request);
      } else {
        this.#outbox.push(request);
      }
    });
  }

  /**
   * Send a new token for this connection (before the current one expires). Resolves with
   * `{exp}` (the new token's expiry, seconds since the epoch; null when the relay has no
   * secret); rejects with a RelayError "bad-token" or "forbidden", and the old token goes
   * on. Once accepted, the new token is also used for every later connection (unless the
   * `token` option is a function, which is asked again for each). Not
   * connected: it is kept for the next connection and the promise resolves with
   * `{exp: undefined}`.
   */
  refresh(token) {
    if (typeof token !== "string" || token === "") {
      return Promise.reject(new TypeError("a token is a non-empty string"));
    }
    if (this.#state === "closed") {
      return Promise.reject(new RelayError("closed", "the client is closed"));
    }
    if (!this.#isOpen()) {
      this.#token = token;
      return Promise.resolve({ exp: undefined });
    }
    return new Promise((resolve, reject) => {
      const id = this.#nextId++;
      this.#requests.set(id, { kind: "refresh", token, resolve, reject });
      this.#send({ type: "refresh", token, id });
    });
  }

  /**
   * Close the connection and stop: pending requests reject with "closed" (a publish
   * already sent may still have been published). Resolves once the socket has closed.
   */
  close() {
    if (this.#state === "closed") return Promise.resolve();
    const socket = this.#socket;
    const closing = socket !== null && socket.readyState < CLOSING_OR_CLOSED;
    this.#finish("closed by the client", null);
    if (!closing) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(done, 1000); // a relay that never answers the close
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this.#closedWaiters.push(done);
    });
  }

  // ------------------------------------------------------------------ the connection

  async #open() {
    if (this.#state === "closed") return;
    this.#retryTimer = null;
    let token = this.#token;
    if (typeof token === "function") {
      try {
        token = await token();
      } catch (error) {
        this.#retry(`the token function failed: ${error?.message ?? error}`, null, "");
        return;
      }
      if (this.#state === "closed") return;
    }
    const url = new URL(this.#url);
    if (token) url.searchParams.set("token", token);
    this.#setState("connecting", { url: this.#shown(url) });
    let socket;
    try {
      socket = new this.#WebSocket(url.href, SUBPROTOCOL);
    } catch (error) {
      this.#retry(`cannot open a WebSocket: ${error?.message ?? error}`, null, "");
      return;
    }
    socket.binaryType = "arraybuffer";
    this.#socket = socket;
    this.#opened = false;
    this.#delivered = false;
    this.#connectTimer = setTimeout(() => {
      if (socket !== this.#socket) return;
      this.#lost(socket, null, `no handshake within ${this.#connectTimeout} s`);
      socket.close();
    }, this.#connectTimeout * 1000);
    socket.onopen = () => {
      if (socket !== this.#socket) return;
      clearTimeout(this.#connectTimer);
      if (socket.protocol !== SUBPROTOCOL) {
        // A relay without trio-relay.v2 (an older one) answers in another protocol.
        this.#finish(
          `the server does not speak ${SUBPROTOCOL} (it chose ${JSON.stringify(socket.protocol)})`,
          null,
        );
        socket.close();
        return;
      }
      this.#opened = true;
      this.#setState("connected", { url: this.#shown(url) });
      for (const sub of this.#subscriptions.values()) {
        if (sub.retryTimer === null) this.#sendSubscribe(sub);
      }
      const outbox = this.#outbox;
      this.#outbox = [];
      for (const request of outbox) this.#sendRequest(request);
    };
    socket.onmessage = (event) => {
      if (socket !== this.#socket) return;
      this.#receive(event.data);
    };
    socket.onclose = (event) => {
      for (const resolve of this.#closedWaiters.splice(0)) resolve();
      if (socket !== this.#socket) return;
      this.#lost(socket, event.code, event.reason);
    };
    socket.onerror = () => {
      // Browsers follow an error with a close event; Node 20's WebSocket, when the handshake
      // fails, does not (it stays CONNECTING): a failed handshake ends here.
      if (socket !== this.#socket || this.#opened) return;
      this.#lost(socket, 1006, "");
      socket.close();
    };
  }

  #isOpen() {
    return this.#socket !== null && this.#opened && this.#socket.readyState === OPEN;
  }

  #send(frame) {
    this.#socket.send(JSON.stringify(frame));
  }

  #sendRequest(request) {
    request.sent = true;
    this.#requests.set(request.id, request);
    this.#send(request.frame);
  }

  #sendSubscribe(sub) {
    const id = this.#nextId++;
    this.#requests.set(id, { kind: "subscribe", topic: sub.topic, sub });
    const frame = { type: "subscribe", topic: sub.topic, id };
    if (sub.last !== null) frame.since = sub.last;
    if (sub.last !== null && sub.epoch !== null) frame.epoch = sub.epoch;
    this.#send(frame);
  }

  // The socket closed (or its handshake timed out): reconnect, or stop.
  #lost(socket, code, reason) {
    clearTimeout(this.#connectTimer);
    this.#socket = null;
    socket.onopen = socket.onmessage = socket.onerror = null;
    const why = code === null ? reason : `code ${code}${reason ? ` (${reason})` : ""}`;
    this.#abandonRequests(
      (request) =>
        new RelayError(
          "disconnected",
          `the connection closed before the relay answered (${why}): the message may or may not have been published`,
          { id: request.id, topic: request.topic },
        ),
    );
    if (this.#state === "closed") return;
    if (code === 4401 && typeof this.#token !== "function") {
      this.#finish(`the token expired (${why}): connect with a new one`, code, reason);
    } else if (!this.#resume) {
      this.#finish(`the connection closed: ${why}`, code, reason);
    } else {
      if (code === 4401) this.#attempt = 0; // the token function gives a new one at once
      this.#retry(why, code, reason);
    }
  }

  #retry(why, code, reason) {
    const [first, most] = this.#backoff;
    const delay = Math.min(first * 2 ** this.#attempt, most) * (1 - this.#jitter * Math.random());
    this.#attempt += 1;
    const opened = this.#opened;
    this.#opened = false;
    this.#setState("retrying", { reason: why, code, closeReason: reason, delay, opened });
    this.#retryTimer = setTimeout(() => this.#open(), delay * 1000);
  }

  #finish(why, code, reason = "") {
    const socket = this.#socket;
    this.#socket = null;
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#connectTimer);
    this.#abandonRequests(
      (request) =>
        new RelayError(
          "closed",
          request.sent ? "closed before the relay answered: the message may or may not have been published" : "closed before it was sent",
          { id: request.id, topic: request.topic },
        ),
    );
    for (const request of this.#outbox.splice(0)) {
      clearTimeout(request.timer);
      request.reject(new RelayError("closed", "the client closed before the message was sent", { id: request.id, topic: request.topic }));
    }
    for (const sub of this.#subscriptions.values()) {
      clearTimeout(sub.retryTimer);
      sub.reject(new RelayError("closed", "the client closed before the relay answered", { topic: sub.topic }));
    }
    const opened = this.#opened;
    this.#opened = false;
    this.#setState("closed", { reason: why, code, closeReason: reason, opened });
    if (socket !== null) {
      socket.onopen = socket.onmessage = socket.onerror = null;
      if (socket.readyState < CLOSING_OR_CLOSED) socket.close(1000, "closed by the client");
    }
  }

  // Requests of the lost connection: publishes and refreshes sent reject (`error`); answers
  // to unsubscribes are implied; subscriptions wait for the next connection.
  #abandonRequests(error) {
    const requests = [...this.#requests.values()];
    this.#requests.clear();
    this.#ignored.clear();
    for (const sub of this.#subscriptions.values()) sub.subscribed = false;
    for (const request of requests) {
      if (request.kind === "publish") {
        clearTimeout(request.timer);
        request.reject(error(request));
      } else if (request.kind === "refresh") {
        request.reject(error(request));
      } else if (request.kind === "unsubscribe") {
        request.resolve();
      }
    }
  }

  #timeOut(request) {
    if (request.sent) {
      if (this.#requests.get(request.id) !== request) return;
      this.#requests.delete(request.id);
    } else {
      const index = this.#outbox.indexOf(request);
      if (index < 0) return;
      this.#outbox.splice(index, 1);
    }
    const what = request.sent
      ? "it may or may not have been published"
      : "it was not sent (no connection)";
    request.reject(
      new RelayError("timeout", `no delivery report within ${this.#publishTimeout} s: ${what}`, {
        id: request.id,
        topic: request.topic,
      }),
    );
  }

  // Drop a subscription: it is no longer wanted (or the relay refused it).
  #drop(sub, error) {
    clearTimeout(sub.retryTimer);
    this.#subscriptions.delete(sub.topic);
    sub.reject(error);
  }

  // ------------------------------------------------------------------ frames

  #receive(data) {
    let frame;
    try {
      frame = typeof data === "string" ? JSON.parse(data) : null;
    } catch {
      frame = null;
    }
    if (frame === null || typeof frame !== "object") {
      this.#dispatch("error", {
        error: new RelayError("bad-frame", "the relay sent a frame that is not a JSON object"),
      });
      return;
    }
    if (!this.#delivered) {
      this.#delivered = true;
      this.#attempt = 0;
    }
    const request = frame.id === undefined ? undefined : this.#requests.get(frame.id);
    if (request !== undefined) this.#requests.delete(frame.id);
    switch (frame.type) {
      case "message":
        this.#onMessage(frame);
        break;
      case "gap":
        this.#onGap(frame);
        break;
      case "subscribed":
        if (request?.kind === "subscribe") this.#onSubscribed(request.sub, frame);
        break;
      case "unsubscribed":
        this.#onUnsubscribed(frame, request);
        break;
      case "ack":
        if (request?.kind === "publish") {
          clearTimeout(request.timer);
          const { type, id, ...report } = frame;
          request.resolve(report);
        }
        break;
      case "refreshed":
        if (request?.kind === "refresh") {
          if (typeof this.#token !== "function") this.#token = request.token;
          request.resolve({ exp: frame.exp });
        }
        break;
      case "error":
        this.#onError(frame, request);
        break;
      default:
        break; // a frame type added later: ignored
    }
  }

  #current(topic) {
    // The subscription messages of `topic` belong to now, or undefined: not subscribed, or
    // an unsubscribe is on its way and what precedes its answer is from before it.
    if (this.#ignored.get(topic)) return undefined;
    const sub = this.#subscriptions.get(topic);
    return sub?.subscribed ? sub : undefined;
  }

  #onMessage(frame) {
    const sub = this.#current(frame.topic);
    if (sub === undefined) return;
    sub.last = frame.seq;
    if (typeof frame.epoch === "string") sub.epoch = frame.epoch;
    const data = typeof frame.text === "string" ? frame.text : decodeBase64(frame.binary ?? "");
    const epoch = typeof frame.epoch === "string" ? { epoch: frame.epoch } : {};
    this.#dispatch("message", { topic: frame.topic, seq: frame.seq, ...epoch, data });
  }

  #onGap(frame) {
    const sub = this.#current(frame.topic);
    if (sub === undefined) return;
    sub.last = frame.first - 1;
    if (typeof frame.epoch === "string") sub.epoch = frame.epoch;
    const reset = typeof frame.reset === "boolean" ? frame.reset : frame.first <= frame.since;
    const epoch = typeof frame.epoch === "string" ? { epoch: frame.epoch } : {};
    this.#dispatch("gap", { topic: frame.topic, since: frame.since, first: frame.first, ...epoch, reset });
  }

  #onSubscribed(sub, frame) {
    if (this.#subscriptions.get(sub.topic) !== sub) return; // unsubscribed meanwhile
    const since = sub.last;
    sub.subscribed = true;
    const epoch = typeof frame.epoch === "string" ? { epoch: frame.epoch } : {};
    if (sub.last === null) {
      sub.last = frame.seq;
      sub.epoch = frame.epoch ?? null;
    }
    sub.resolve({ topic: sub.topic, seq: frame.seq, ...epoch });
    this.#dispatch("subscribed", { topic: sub.topic, seq: frame.seq, ...epoch, since });
  }

  #onUnsubscribed(frame, request) {
    const topic = frame.topic;
    if (request?.kind === "unsubscribe") {
      this.#endIgnoring(topic);
      request.resolve();
      return;
    }
    // The relay ended a subscription on its own (its queue overflowed: "slow-consumer").
    const sub = this.#current(topic);
    if (sub === undefined) return;
    const code = frame.code ?? null;
    const detail = frame.detail ?? null;
    if (code === "slow-consumer" && this.#resume) {
      // Come back from the last message seen, after a backoff, as after a lost connection.
      sub.subscribed = false;
      const [first, most] = this.#backoff;
      sub.attempt = (sub.attempt ?? 0) + 1;
      const delay = Math.min(first * 2 ** (sub.attempt - 1), most);
      sub.retryTimer = setTimeout(() => {
        sub.retryTimer = null;
        if (this.#subscriptions.get(topic) === sub && this.#isOpen()) this.#sendSubscribe(sub);
      }, delay * 1000);
      this.#dispatch("unsubscribed", { topic, code, detail, retry: delay });
      return;
    }
    this.#drop(sub, new RelayError(code ?? "unsubscribed", detail ?? "the relay ended the subscription", { topic }));
    this.#dispatch("unsubscribed", { topic, code, detail });
  }

  #endIgnoring(topic) {
    const count = this.#ignored.get(topic) ?? 0;
    if (count <= 1) this.#ignored.delete(topic);
    else this.#ignored.set(topic, count - 1);
  }

  #onError(frame, request) {
    const error = new RelayError(frame.code, frame.detail ?? "", { id: frame.id, topic: frame.topic });
    if (request?.kind === "publish") {
      clearTimeout(request.timer);
      request.reject(error);
    } else if (request?.kind === "refresh") {
      request.reject(error);
    } else if (request?.kind === "unsubscribe") {
      // "not-subscribed": the relay had refused the subscription already. Either way, done.
      this.#endIgnoring(request.topic);
      request.resolve();
    } else if (request?.kind === "subscribe") {
      const sub = request.sub;
      if (this.#subscriptions.get(sub.topic) !== sub) return;
      this.#drop(sub, error);
      this.#dispatch("unsubscribed", { topic: sub.topic, code: error.code, detail: error.detail });
    } else {
      this.#dispatch("error", { error });
    }
  }

  // ------------------------------------------------------------------ events

  #setState(state, fields) {
    this.#state = state;
    this.#dispatch("state", { state, ...fields });
  }

  #dispatch(type, fields) {
    this.dispatchEvent(new RelayEvent(type, fields));
  }

  #shown(url) {
    const copy = new URL(url);
    if (copy.searchParams.has("token")) copy.searchParams.set("token", "…");
    return decodeURI(copy.href);
  }
}
