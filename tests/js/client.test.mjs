// The JavaScript client (trio_relay/console/trio-relay.js) against a fake WebSocket: the
// test plays the relay, frame by frame, under Node's mocked timers (no real time passes).
// Run: node --test tests/js/ (tests/test_js_client.py runs it from pytest).

import assert from "node:assert/strict";
import { beforeEach, test } from "node:test";

import { connect, Relay, RelayError, SUBPROTOCOL } from "../../trio_relay/console/trio-relay.js";
import { FakeWebSocket } from "./fake-websocket.mjs";

const URL_ = "ws://relay.test:4000/";

/** Let queued microtasks and promise callbacks run (setImmediate is not mocked). */
const settle = () => new Promise((resolve) => setImmediate(resolve));

/** Every event of `relay` of the given types, as plain objects, in order. */
function record(relay, ...types) {
  const events = [];
  for (const type of types) {
    relay.addEventListener(type, (event) => {
      const fields = Object.entries(event).filter(([key]) => key !== "isTrusted");
      events.push({ type, ...Object.fromEntries(fields) });
    });
  }
  return events;
}

/** A client on a fake socket, opened; timers mocked. */
async function opened(t, options = {}) {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const relay = connect(URL_, { WebSocket: FakeWebSocket, jitter: 0, ...options });
  await settle();
  FakeWebSocket.last.open();
  return relay;
}

/** Answer every subscribe frame `socket` sent since the last take() with `subscribed`. */
function answerSubscribes(socket, seqs = {}) {
  const frames = socket.take();
  for (const frame of frames) {
    if (frame.type === "subscribe") {
      socket.receive({ type: "subscribed", topic: frame.topic, seq: seqs[frame.topic] ?? 0, id: frame.id });
    }
  }
  return frames;
}

beforeEach(() => FakeWebSocket.reset());

test("it connects with trio-relay.v2 and the token in the query, and says so", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const relay = connect("ws://relay.test:4000/", { WebSocket: FakeWebSocket, token: "s3cret&x" });
  const events = record(relay, "state");
  assert.equal(relay.state, "connecting");
  await settle();
  const socket = FakeWebSocket.last;
  assert.equal(socket.url, "ws://relay.test:4000/?token=s3cret%26x");
  assert.equal(socket.requested, SUBPROTOCOL);
  assert.equal(SUBPROTOCOL, "trio-relay.v2");
  socket.open();
  assert.equal(relay.state, "connected");
  assert.deepEqual(events, [
    { type: "state", state: "connecting", url: "ws://relay.test:4000/?token=…" },
    { type: "state", state: "connected", url: "ws://relay.test:4000/?token=…" },
  ]);
  assert.equal(relay.url, "ws://relay.test:4000/");
  assert.ok(!JSON.stringify(events).includes("s3cret"));
});

test("the URL must be the relay's root, over ws or wss", () => {
  assert.throws(() => connect("ws://relay.test:4000/news", { WebSocket: FakeWebSocket }), {
    name: "TypeError",
    message: /names a topic \(\/news\)/,
  });
  assert.throws(() => connect("http://relay.test:4000/", { WebSocket: FakeWebSocket }), {
    name: "TypeError",
    message: /must be ws:\/\/ or wss:\/\//,
  });
  // Node 20 without --experimental-websocket has no global WebSocket.
  const global = globalThis.WebSocket;
  delete globalThis.WebSocket;
  try {
    assert.throws(() => connect(URL_), { name: "TypeError", message: /no WebSocket class: pass one/ });
  } finally {
    if (global !== undefined) globalThis.WebSocket = global;
  }
  // Behind a proxy that maps a prefix to the relay's root.
  connect("wss://example.com/relay/", { WebSocket: FakeWebSocket }).close();
});

test("many topics on one connection, each message tagged with its topic", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const relay = connect(URL_, { WebSocket: FakeWebSocket });
  const events = record(relay, "subscribed", "message");
  const answers = [relay.subscribe("news"), relay.subscribe("sport/live", { since: 3 }), relay.subscribe("")];
  await settle();
  const socket = FakeWebSocket.last;
  assert.deepEqual(socket.sent, []); // nothing before the handshake
  socket.open();
  const frames = socket.take();
  assert.deepEqual(frames, [
    { type: "subscribe", topic: "news", id: frames[0].id },
    { type: "subscribe", topic: "sport/live", id: frames[1].id, since: 3 },
    { type: "subscribe", topic: "", id: frames[2].id },
  ]);
  assert.equal(new Set(frames.map((frame) => frame.id)).size, 3);
  socket.receive({ type: "subscribed", topic: "news", seq: 41, id: frames[0].id });
  socket.receive({ type: "subscribed", topic: "sport/live", seq: 5, id: frames[1].id });
  socket.receive({ type: "subscribed", topic: "", seq: 0, id: frames[2].id });
  socket.receive({ type: "message", topic: "sport/live", seq: 4, text: "replayed" });
  socket.receive({ type: "message", topic: "news", seq: 42, text: "héllo" });
  socket.receive({ type: "message", topic: "", seq: 1, binary: "AAH+/w==" });
  socket.receive({ type: "message", topic: "other", seq: 9, text: "not subscribed" });
  assert.deepEqual(await Promise.all(answers), [
    { topic: "news", seq: 41 },
    { topic: "sport/live", seq: 5 },
    { topic: "", seq: 0 },
  ]);
  assert.deepEqual(events, [
    { type: "subscribed", topic: "news", seq: 41, since: null },
    { type: "subscribed", topic: "sport/live", seq: 5, since: 3 },
    { type: "subscribed", topic: "", seq: 0, since: null },
    { type: "message", topic: "sport/live", seq: 4, data: "replayed" },
    { type: "message", topic: "news", seq: 42, data: "héllo" },
    { type: "message", topic: "", seq: 1, data: new Uint8Array([0, 1, 254, 255]) },
  ]);
  assert.equal(FakeWebSocket.made.length, 1);
  assert.deepEqual(relay.subscriptions, [
    { topic: "news", last: 42, subscribed: true },
    { topic: "sport/live", last: 4, subscribed: true },
    { topic: "", last: 1, subscribed: true },
  ]);
  // Subscribing again changes nothing and answers as the first time.
  assert.deepEqual(await relay.subscribe("news"), { topic: "news", seq: 41 });
  assert.deepEqual(socket.take(), []);
});

test("publish resolves with the delivery report, or rejects with the relay's error", async (t) => {
  const relay = await opened(t);
  const socket = FakeWebSocket.last;
  const text = relay.publish("news", "hello");
  const bytes = relay.publish("news", new Uint8Array([0, 1, 2, 255]).subarray(1), { echo: false });
  const buffer = relay.publish("news", new Uint8Array([104, 105]).buffer);
  const refused = relay.publish("secret", "psst");
  const [a, b, c, d] = socket.take();
  assert.deepEqual(a, { type: "publish", topic: "news", id: a.id, text: "hello" });
  assert.deepEqual(b, { type: "publish", topic: "news", id: b.id, binary: "AQL/", echo: false });
  assert.deepEqual(c, { type: "publish", topic: "news", id: c.id, binary: "aGk=" });
  socket.receive({ type: "error", code: "forbidden", detail: "not allowed", id: d.id, topic: "secret" });
  socket.receive({ type: "ack", topic: "news", seq: 8, id: b.id, queued: 2, dropped: 0, evicted: 0 });
  socket.receive({ type: "ack", topic: "news", seq: 7, id: a.id, queued: 3, dropped: 1, evicted: 0, remote: true });
  socket.receive({ type: "ack", topic: "news", seq: 9, id: c.id, queued: 2, dropped: 0, evicted: 0 });
  assert.deepEqual(await text, { topic: "news", seq: 7, queued: 3, dropped: 1, evicted: 0, remote: true });
  assert.deepEqual(await bytes, { topic: "news", seq: 8, queued: 2, dropped: 0, evicted: 0 });
  assert.equal((await buffer).seq, 9);
  await assert.rejects(refused, (error) => {
    assert.ok(error instanceof RelayError);
    assert.deepEqual(
      { code: error.code, detail: error.detail, id: error.id, topic: error.topic, message: error.message },
      { code: "forbidden", detail: "not allowed", id: d.id, topic: "secret", message: "forbidden: not allowed" },
    );
    return true;
  });
  await assert.rejects(relay.publish("news", { not: "bytes" }), TypeError);
  await assert.rejects(relay.publish(7, "x"), TypeError);
  assert.deepEqual(socket.take(), []);
});

test("a publish waits for the connection, within its timeout", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const relay = connect(URL_, { WebSocket: FakeWebSocket, publishTimeout: 5, jitter: 0 });
  const early = relay.publish("news", "early");
  await settle();
  const socket = FakeWebSocket.last;
  t.mock.timers.tick(4999);
  socket.open();
  const [frame] = socket.take();
  assert.equal(frame.text, "early");
  socket.receive({ type: "ack", topic: "news", seq: 1, id: frame.id, queued: 0, dropped: 0, evicted: 0 });
  assert.equal((await early).seq, 1);

  // The connection is lost; a publish meanwhile is not sent after its timeout has passed.
  socket.end(1001, "relay shutting down");
  const late = relay.publish("news", "late");
  const sent = relay.publish("news", "sent, then no answer");
  t.mock.timers.tick(5000);
  await assert.rejects(late, { code: "timeout", message: /not sent/ });
  await assert.rejects(sent, { code: "timeout" });
  FakeWebSocket.last.open();
  assert.deepEqual(FakeWebSocket.last.take(), []);
  // Sent and not answered in time: it may have been published.
  const answered = relay.publish("news", "slow");
  t.mock.timers.tick(5000);
  await assert.rejects(answered, { code: "timeout", message: /may or may not have been published/ });
  const [slow] = FakeWebSocket.last.take();
  FakeWebSocket.last.receive({ type: "ack", topic: "news", seq: 2, id: slow.id, queued: 0, dropped: 0, evicted: 0 });
});

test("after a lost connection it resubscribes every topic from its last number", async (t) => {
  const relay = await opened(t);
  const events = record(relay, "state", "subscribed", "gap", "message");
  relay.subscribe("a");
  relay.subscribe("b");
  relay.subscribe("c");
  relay.subscribe("d", { since: 10 });
  let socket = FakeWebSocket.last;
  answerSubscribes(socket, { a: 5, b: 7, c: 3, d: 12 });
  socket.receive({ type: "message", topic: "a", seq: 6, text: "a6" }); // a: the last message
  socket.receive({ type: "gap", topic: "c", since: 3, first: 9 }); // c: cannot happen without since, but the gap counts
  // d: nothing yet since 10
  const inFlight = relay.publish("a", "lost with the connection");
  socket.take();
  socket.end(1001, "relay shutting down");
  await assert.rejects(inFlight, { code: "disconnected", message: /code 1001 \(relay shutting down\).*may or may not/ });
  assert.equal(relay.state, "retrying");
  assert.deepEqual(relay.subscriptions.map((sub) => sub.subscribed), [false, false, false, false]);
  t.mock.timers.tick(99);
  assert.equal(FakeWebSocket.made.length, 1);
  t.mock.timers.tick(1);
  await settle();
  socket = FakeWebSocket.last;
  assert.equal(FakeWebSocket.made.length, 2);
  socket.open();
  const frames = answerSubscribes(socket, { a: 6, b: 7, c: 8, d: 12 });
  assert.deepEqual(
    frames.map(({ topic, since }) => ({ topic, since })),
    [
      { topic: "a", since: 6 },
      { topic: "b", since: 7 },
      { topic: "c", since: 8 },
      { topic: "d", since: 10 },
    ],
  );
  socket.receive({ type: "message", topic: "d", seq: 11, text: "d11" });
  const states = events.filter((event) => event.type === "state");
  assert.deepEqual(
    states.map(({ state, delay, code, opened }) => ({ state, delay, code, opened })),
    [
      { state: "retrying", delay: 0.1, code: 1001, opened: true },
      { state: "connecting", delay: undefined, code: undefined, opened: undefined },
      { state: "connected", delay: undefined, code: undefined, opened: undefined },
    ],
  );
  assert.deepEqual(
    events.filter((event) => event.type === "subscribed").slice(4),
    [
      { type: "subscribed", topic: "a", seq: 6, since: 6 },
      { type: "subscribed", topic: "b", seq: 7, since: 7 },
      { type: "subscribed", topic: "c", seq: 8, since: 8 },
      { type: "subscribed", topic: "d", seq: 12, since: 10 },
    ],
  );
  assert.deepEqual(events.at(-1), { type: "message", topic: "d", seq: 11, data: "d11" });
});

test("it resumes each topic with the epoch of its last number (PROTOCOL.md Epochs)", async (t) => {
  const relay = await opened(t);
  const events = record(relay, "subscribed", "gap", "message");
  relay.subscribe("a");
  relay.subscribe("b", { since: 4, epoch: "e0" });
  let socket = FakeWebSocket.last;
  const first = socket.take();
  assert.deepEqual(first.map(({ topic, since, epoch }) => ({ topic, since, epoch })), [
    { topic: "a", since: undefined, epoch: undefined },
    { topic: "b", since: 4, epoch: "e0" },
  ]);
  socket.receive({ type: "subscribed", topic: "a", seq: 2, epoch: "e1", id: first[0].id });
  socket.receive({ type: "subscribed", topic: "b", seq: 9, epoch: "e2", id: first[1].id });
  // b was renumbered while away (another epoch): told, and resumed in the new one.
  socket.receive({ type: "gap", topic: "b", since: 4, first: 1, epoch: "e2", reset: true });
  socket.receive({ type: "message", topic: "b", seq: 1, epoch: "e2", text: "b1" });
  assert.deepEqual(events.slice(-2), [
    { type: "gap", topic: "b", since: 4, first: 1, epoch: "e2", reset: true },
    { type: "message", topic: "b", seq: 1, epoch: "e2", data: "b1" },
  ]);
  assert.deepEqual(
    relay.subscriptions.map(({ topic, last, epoch }) => ({ topic, last, epoch })),
    [
      { topic: "a", last: 2, epoch: "e1" },
      { topic: "b", last: 1, epoch: "e2" },
    ],
  );
  socket.end(1001, "relay shutting down");
  t.mock.timers.tick(100);
  await settle();
  socket = FakeWebSocket.last;
  socket.open();
  assert.deepEqual(
    socket.take().map(({ topic, since, epoch }) => ({ topic, since, epoch })),
    [
      { topic: "a", since: 2, epoch: "e1" },
      { topic: "b", since: 1, epoch: "e2" },
    ],
  );
  await assert.rejects(relay.subscribe("c", { epoch: "e3" }), TypeError); // an epoch needs since
});

test("gap events say what was lost, or that the topic was reset", async (t) => {
  const relay = await opened(t);
  const events = record(relay, "gap", "message");
  relay.subscribe("news", { since: 10 });
  relay.subscribe("reset", { since: 50 });
  answerSubscribes(FakeWebSocket.last, { news: 30, reset: 2 });
  const socket = FakeWebSocket.last;
  socket.receive({ type: "gap", topic: "news", since: 10, first: 25 });
  socket.receive({ type: "message", topic: "news", seq: 25, text: "25" });
  socket.receive({ type: "gap", topic: "reset", since: 50, first: 1 });
  socket.receive({ type: "gap", topic: "reset", since: 2, first: 5, reset: true }); // the relay says
  assert.deepEqual(events, [
    { type: "gap", topic: "news", since: 10, first: 25, reset: false },
    { type: "message", topic: "news", seq: 25, data: "25" },
    { type: "gap", topic: "reset", since: 50, first: 1, reset: true },
    { type: "gap", topic: "reset", since: 2, first: 5, reset: true },
  ]);
  assert.deepEqual(relay.subscriptions.map((sub) => sub.last), [25, 4]);
});

test("the backoff doubles up to its cap while attempts fail, and resets once one delivers", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const relay = connect(URL_, { WebSocket: FakeWebSocket, backoff: [0.5, 3], jitter: 0 });
  const delays = [];
  relay.addEventListener("state", (event) => {
    if (event.state === "retrying") delays.push([event.delay, event.opened]);
  });
  await settle();
  for (let attempt = 0; attempt < 5; attempt += 1) {
    FakeWebSocket.last.end(1006); // refused, or the relay is down: it never opened
    t.mock.timers.tick(delays.at(-1)[0] * 1000);
    await settle();
  }
  assert.deepEqual(delays, [[0.5, false], [1, false], [2, false], [3, false], [3, false]]);
  // Opened, but closed before any frame: still backing off.
  FakeWebSocket.last.open();
  FakeWebSocket.last.end(4000);
  assert.deepEqual(delays.at(-1), [3, true]);
  t.mock.timers.tick(3000);
  await settle();
  relay.subscribe("news");
  FakeWebSocket.last.open();
  answerSubscribes(FakeWebSocket.last);
  FakeWebSocket.last.end(1006);
  assert.deepEqual(delays.at(-1), [0.5, true]);
  assert.equal(FakeWebSocket.made.length, 7);
  await relay.close();
});

test("a handshake that fails with an error event alone (Node 20) is retried", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const relay = connect(URL_, { WebSocket: FakeWebSocket, jitter: 0 });
  const states = record(relay, "state");
  await settle();
  const socket = FakeWebSocket.last;
  socket.failWithoutClose();
  assert.deepEqual(states.at(-1), { type: "state", state: "retrying", reason: "code 1006", code: 1006, closeReason: "", delay: 0.1, opened: false });
  assert.ok(socket.closedWith !== null);
  await settle(); // the fake's close of a connecting socket ends it: nothing more happens
  assert.equal(states.length, 2);
  t.mock.timers.tick(100);
  await settle();
  assert.equal(FakeWebSocket.made.length, 2);
  await relay.close();
});

test("jitter shortens each delay at random, by up to its fraction", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  t.mock.method(Math, "random", () => 0.5);
  const relay = connect(URL_, { WebSocket: FakeWebSocket, backoff: [1, 5] }); // jitter 0.5
  let delay = null;
  relay.addEventListener("state", (event) => {
    if (event.state === "retrying") delay = event.delay;
  });
  await settle();
  FakeWebSocket.last.end(1006);
  assert.equal(delay, 0.75);
  t.mock.timers.tick(749);
  await settle();
  assert.equal(FakeWebSocket.made.length, 1);
  t.mock.timers.tick(1);
  await settle();
  assert.equal(FakeWebSocket.made.length, 2);
  await relay.close();
});

test("a forbidden topic is refused alone; the others go on, now and after reconnecting", async (t) => {
  const relay = await opened(t);
  const events = record(relay, "unsubscribed", "message", "error");
  const news = relay.subscribe("news");
  const secret = relay.subscribe("secret");
  const socket = FakeWebSocket.last;
  const [first, second] = socket.take();
  socket.receive({ type: "subscribed", topic: "news", seq: 0, id: first.id });
  socket.receive({ type: "error", code: "forbidden", detail: "the token does not allow subscribing to secret", id: second.id, topic: "secret" });
  socket.receive({ type: "message", topic: "news", seq: 1, text: "still here" });
  await news;
  await assert.rejects(secret, { name: "RelayError", code: "forbidden", topic: "secret", id: second.id });
  assert.deepEqual(events, [
    { type: "unsubscribed", topic: "secret", code: "forbidden", detail: "the token does not allow subscribing to secret" },
    { type: "message", topic: "news", seq: 1, data: "still here" },
  ]);
  assert.deepEqual(relay.subscriptions.map((sub) => sub.topic), ["news"]);
  socket.end(1006);
  t.mock.timers.tick(100);
  await settle();
  FakeWebSocket.last.open();
  assert.deepEqual(FakeWebSocket.last.take().map((frame) => frame.topic), ["news"]);
});

test("a subscribe refused on a later connection ends that subscription with an event", async (t) => {
  const relay = await opened(t);
  const events = record(relay, "unsubscribed");
  relay.subscribe("news");
  answerSubscribes(FakeWebSocket.last);
  FakeWebSocket.last.end(1006);
  t.mock.timers.tick(100);
  await settle();
  FakeWebSocket.last.open();
  const [frame] = FakeWebSocket.last.take();
  FakeWebSocket.last.receive({ type: "error", code: "too-many-subscriptions", detail: "at most 100", id: frame.id, topic: "news" });
  assert.deepEqual(events, [{ type: "unsubscribed", topic: "news", code: "too-many-subscriptions", detail: "at most 100" }]);
  assert.deepEqual(relay.subscriptions, []);
});

test("unsubscribe: nothing of the topic is delivered after the call", async (t) => {
  const relay = await opened(t);
  const events = record(relay, "message", "unsubscribed", "subscribed");
  relay.subscribe("news");
  const socket = FakeWebSocket.last;
  answerSubscribes(socket, { news: 3 });
  const done = relay.unsubscribe("news");
  const [frame] = socket.take();
  assert.deepEqual(frame, { type: "unsubscribe", topic: "news", id: frame.id });
  // Subscribed again before the relay answered: what precedes its answer is the old one's.
  const again = relay.subscribe("news");
  const [resubscribe] = socket.take();
  assert.deepEqual(resubscribe, { type: "subscribe", topic: "news", id: resubscribe.id });
  socket.receive({ type: "message", topic: "news", seq: 4, text: "sent before the unsubscribe arrived" });
  socket.receive({ type: "unsubscribed", topic: "news", id: frame.id });
  await done;
  socket.receive({ type: "subscribed", topic: "news", seq: 4, id: resubscribe.id });
  socket.receive({ type: "message", topic: "news", seq: 5, text: "new" });
  assert.deepEqual(await again, { topic: "news", seq: 4 });
  assert.deepEqual(events, [
    { type: "subscribed", topic: "news", seq: 3, since: null },
    { type: "unsubscribed", topic: "news", code: null, detail: null },
    { type: "subscribed", topic: "news", seq: 4, since: null },
    { type: "message", topic: "news", seq: 5, data: "new" },
  ]);
  await relay.unsubscribe("never subscribed");
  assert.deepEqual(socket.take(), []);
});

test("unsubscribing a subscription the relay is refusing ends with its not-subscribed", async (t) => {
  const relay = await opened(t);
  const secret = relay.subscribe("secret");
  const done = relay.unsubscribe("secret");
  await assert.rejects(secret, { code: "unsubscribed" });
  const socket = FakeWebSocket.last;
  const [subscribe, unsubscribe] = socket.take();
  socket.receive({ type: "error", code: "forbidden", detail: "no", id: subscribe.id, topic: "secret" });
  socket.receive({ type: "error", code: "not-subscribed", detail: "no", id: unsubscribe.id, topic: "secret" });
  await done;
  relay.subscribe("secret");
  const [again] = socket.take();
  socket.receive({ type: "subscribed", topic: "secret", seq: 0, id: again.id });
  socket.receive({ type: "message", topic: "secret", seq: 1, text: "delivered" });
  assert.deepEqual(relay.subscriptions, [{ topic: "secret", last: 1, subscribed: true }]);
});

test("a subscription the relay ends as a slow consumer comes back from its last number", async (t) => {
  const relay = await opened(t, { backoff: [0.2, 5] });
  const events = record(relay, "unsubscribed", "message");
  relay.subscribe("busy");
  relay.subscribe("quiet");
  const socket = FakeWebSocket.last;
  answerSubscribes(socket, { busy: 10, quiet: 1 });
  socket.receive({ type: "message", topic: "busy", seq: 11, text: "11" });
  socket.receive({ type: "unsubscribed", topic: "busy", code: "slow-consumer", detail: "its queue overflowed" });
  socket.receive({ type: "message", topic: "busy", seq: 12, text: "not after its end" });
  socket.receive({ type: "message", topic: "quiet", seq: 2, text: "quiet goes on" });
  assert.deepEqual(events, [
    { type: "message", topic: "busy", seq: 11, data: "11" },
    { type: "unsubscribed", topic: "busy", code: "slow-consumer", detail: "its queue overflowed", retry: 0.2 },
    { type: "message", topic: "quiet", seq: 2, data: "quiet goes on" },
  ]);
  t.mock.timers.tick(199);
  assert.deepEqual(socket.take(), []);
  t.mock.timers.tick(1);
  const [frame] = socket.take();
  assert.deepEqual(frame, { type: "subscribe", topic: "busy", id: frame.id, since: 11 });
  assert.equal(FakeWebSocket.made.length, 1);
});

test("any other end of a subscription by the relay drops it", async (t) => {
  const relay = await opened(t);
  const events = record(relay, "unsubscribed");
  relay.subscribe("news");
  answerSubscribes(FakeWebSocket.last);
  FakeWebSocket.last.receive({ type: "unsubscribed", topic: "news", code: "forbidden", detail: "the new token does not allow it" });
  assert.deepEqual(events, [{ type: "unsubscribed", topic: "news", code: "forbidden", detail: "the new token does not allow it" }]);
  assert.deepEqual(relay.subscriptions, []);
});

test("close code 4401: a token function is asked again, a fixed token stops the client", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  let issued = 0;
  const relay = connect(URL_, {
    WebSocket: FakeWebSocket,
    jitter: 0,
    backoff: [1, 5],
    token: async () => `token-${++issued}`,
  });
  await settle();
  assert.equal(FakeWebSocket.last.url, `${URL_}?token=token-1`);
  FakeWebSocket.last.end(1006); // attempt 1 fails: the next waits 1 s, then 2 s
  t.mock.timers.tick(1000);
  await settle();
  FakeWebSocket.last.open();
  FakeWebSocket.last.end(4401, "token expired");
  assert.equal(relay.state, "retrying");
  t.mock.timers.tick(1000); // from the first delay again: a new token is at hand
  await settle();
  assert.equal(FakeWebSocket.last.url, `${URL_}?token=token-3`);
  await relay.close();

  const fixed = connect(URL_, { WebSocket: FakeWebSocket, token: "tok" });
  const states = record(fixed, "state");
  await settle();
  FakeWebSocket.last.open();
  FakeWebSocket.last.end(4401, "token expired");
  assert.equal(fixed.state, "closed");
  assert.match(states.at(-1).reason, /the token expired \(code 4401 \(token expired\)\): connect with a new one/);
  assert.equal(states.at(-1).code, 4401);
  t.mock.timers.tick(60_000);
  assert.equal(FakeWebSocket.made.length, 4);
});

test("a token function that fails is retried with backoff", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  let calls = 0;
  const relay = connect(URL_, {
    WebSocket: FakeWebSocket,
    jitter: 0,
    token: () => {
      calls += 1;
      if (calls === 1) throw new Error("no session");
      return "ok";
    },
  });
  const states = record(relay, "state");
  await settle();
  assert.deepEqual(states, [{ type: "state", state: "retrying", reason: "the token function failed: no session", code: null, closeReason: "", delay: 0.1, opened: false }]);
  t.mock.timers.tick(100);
  await settle();
  assert.equal(FakeWebSocket.last.url, `${URL_}?token=ok`);
});

test("resume: false ends the client with its connection", async (t) => {
  const relay = await opened(t, { resume: false });
  const pending = relay.subscribe("news");
  FakeWebSocket.last.end(1008, "slow consumer");
  assert.equal(relay.state, "closed");
  await assert.rejects(pending, { code: "closed" });
  await assert.rejects(relay.publish("news", "x"), { code: "closed" });
  await assert.rejects(relay.subscribe("news"), { code: "closed" });
  t.mock.timers.tick(60_000);
  assert.equal(FakeWebSocket.made.length, 1);
});

test("close() closes the socket, rejects what waits, and stops reconnecting", async (t) => {
  const relay = await opened(t);
  const socket = FakeWebSocket.last;
  const sent = relay.publish("news", "sent");
  const sub = relay.subscribe("news");
  const states = record(relay, "state");
  const closed = relay.close();
  assert.deepEqual(socket.closedWith, [1000, "closed by the client"]);
  await assert.rejects(sent, { code: "closed", message: /may or may not have been published/ });
  await assert.rejects(sub, { code: "closed" });
  let done = false;
  closed.then(() => (done = true));
  await settle();
  assert.equal(done, false); // until the relay answers the close
  socket.end(1000);
  await closed;
  assert.deepEqual(states.map((event) => event.state), ["closed"]);
  t.mock.timers.tick(60_000);
  assert.equal(FakeWebSocket.made.length, 1);
  await relay.close(); // again: nothing to do
  // A relay that never answers the close: close() still ends, after a second.
  const other = connect(URL_, { WebSocket: FakeWebSocket });
  await settle();
  FakeWebSocket.last.open();
  const waiting = other.close();
  t.mock.timers.tick(1000);
  await waiting;
});

test("a server that does not speak trio-relay.v2 stops the client", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const relay = connect(URL_, { WebSocket: FakeWebSocket });
  const states = record(relay, "state");
  await settle();
  FakeWebSocket.last.open("");
  assert.equal(relay.state, "closed");
  assert.equal(states.at(-1).reason, 'the server does not speak trio-relay.v2 (it chose "")');
  assert.deepEqual(FakeWebSocket.last.closedWith, [1000, "closed by the client"]);
});

test("a handshake that does not finish in connectTimeout is abandoned and retried", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const relay = connect(URL_, { WebSocket: FakeWebSocket, connectTimeout: 3, jitter: 0 });
  const states = record(relay, "state");
  await settle();
  const socket = FakeWebSocket.last;
  t.mock.timers.tick(2999);
  assert.equal(relay.state, "connecting");
  t.mock.timers.tick(1);
  assert.equal(relay.state, "retrying");
  assert.equal(states.at(-1).reason, "no handshake within 3 s");
  assert.ok(socket.closedWith !== null);
  socket.open(); // too late: ignored
  assert.equal(relay.state, "retrying");
  t.mock.timers.tick(100);
  await settle();
  assert.equal(FakeWebSocket.made.length, 2);
});

test("refresh sends the new token, and the accepted one is used to reconnect", async (t) => {
  const relay = await opened(t, { token: "old" });
  const socket = FakeWebSocket.last;
  const refused = relay.refresh("bad");
  const accepted = relay.refresh("new");
  const [bad, good] = socket.take();
  assert.deepEqual(bad, { type: "refresh", token: "bad", id: bad.id });
  socket.receive({ type: "error", code: "bad-token", detail: "invalid token", id: bad.id });
  socket.receive({ type: "refreshed", exp: 1767225600, id: good.id });
  await assert.rejects(refused, { code: "bad-token" });
  assert.deepEqual(await accepted, { exp: 1767225600 });
  socket.end(1006);
  assert.deepEqual(await relay.refresh("offline"), { exp: undefined });
  t.mock.timers.tick(100);
  await settle();
  assert.equal(FakeWebSocket.last.url, `${URL_}?token=offline`);
  await assert.rejects(relay.refresh(""), TypeError);
});

test("frames it cannot read, and errors that answer nothing, are error events", async (t) => {
  const relay = await opened(t);
  const events = [];
  relay.addEventListener("error", (event) => events.push(event.error));
  FakeWebSocket.last.receive("not json");
  FakeWebSocket.last.receive({ type: "error", code: "not-json", detail: "the frame is not valid JSON" });
  FakeWebSocket.last.receive({ type: "future-frame" }); // ignored
  assert.deepEqual(
    events.map((error) => [error.code, error.detail]),
    [
      ["bad-frame", "the relay sent a frame that is not a JSON object"],
      ["not-json", "the frame is not valid JSON"],
    ],
  );
  assert.ok(events.every((error) => error instanceof RelayError));
  assert.ok(relay instanceof Relay && relay instanceof EventTarget);
});
