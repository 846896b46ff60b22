// The JavaScript client against a real relay (`trio-relay serve` with a secret and
// --history-size 3), over Node's own WebSocket. tests/test_js_client.py starts the relay
// and runs this file with:
//   TRIO_RELAY_TEST_URL    the relay's root, ws://127.0.0.1:PORT/
//   TRIO_RELAY_TEST_TOKEN  a token that allows publishing and subscribing to news/**
//   TRIO_RELAY_TEST_OTHER  a token that allows the same, for the refresh test
// Without them, every test here skips (and pytest asserts that none did).

import assert from "node:assert/strict";
import { test } from "node:test";

import { connect } from "../../trio_relay/console/trio-relay.js";

const url = process.env.TRIO_RELAY_TEST_URL;
const token = process.env.TRIO_RELAY_TEST_TOKEN;
const other = process.env.TRIO_RELAY_TEST_OTHER;
const skip = url ? false : "TRIO_RELAY_TEST_URL is not set (tests/test_js_client.py sets it)";
const DEADLINE = 10_000; // milliseconds any single wait may take

/** The next event of `type` on `relay` for which `accept(event)` holds, within DEADLINE. */
function next(relay, type, accept = () => true) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      relay.removeEventListener(type, listener);
      reject(new Error(`no matching ${type} event within ${DEADLINE} ms`));
    }, DEADLINE);
    function listener(event) {
      if (!accept(event)) return;
      clearTimeout(timer);
      relay.removeEventListener(type, listener);
      resolve(event);
    }
    relay.addEventListener(type, listener);
  });
}

/** The next `count` message events of `topic`, as [seq, data]. */
function messages(relay, topic, count) {
  return new Promise((resolve, reject) => {
    const seen = [];
    const timer = setTimeout(() => {
      relay.removeEventListener("message", listener);
      reject(new Error(`${seen.length} of ${count} messages of ${topic} within ${DEADLINE} ms`));
    }, DEADLINE);
    function listener(event) {
      if (event.topic !== topic) return;
      seen.push([event.seq, event.data]);
      if (seen.length < count) return;
      clearTimeout(timer);
      relay.removeEventListener("message", listener);
      resolve(seen);
    }
    relay.addEventListener("message", listener);
  });
}

test("many topics on one connection: publish, with its report, and receive", { skip }, async () => {
  const relay = connect(url, { token });
  try {
    const subscribed = await Promise.all([relay.subscribe("news/a"), relay.subscribe("news/b")]);
    const epoch = subscribed[0].epoch; // the relay's, new per process (PROTOCOL.md "Epochs")
    assert.match(epoch, /^[0-9a-f]{8}$/);
    assert.deepEqual(subscribed, [
      { topic: "news/a", seq: 0, epoch },
      { topic: "news/b", seq: 0, epoch },
    ]);
    assert.equal(relay.state, "connected");
    const a = messages(relay, "news/a", 2);
    const b = messages(relay, "news/b", 1);
    const reports = await Promise.all([
      relay.publish("news/a", "héllo ✓"),
      relay.publish("news/b", "to b"),
      relay.publish("news/a", new Uint8Array([0, 1, 254, 255])),
    ]);
    assert.deepEqual(reports, [
      { topic: "news/a", seq: 1, epoch, queued: 1, dropped: 0, evicted: 0 },
      { topic: "news/b", seq: 1, epoch, queued: 1, dropped: 0, evicted: 0 },
      { topic: "news/a", seq: 2, epoch, queued: 1, dropped: 0, evicted: 0 },
    ]);
    assert.deepEqual(await a, [
      [1, "héllo ✓"],
      [2, new Uint8Array([0, 1, 254, 255])],
    ]);
    assert.deepEqual(await b, [[1, "to b"]]);
    // The same idempotency key twice: published once, the second report names the first.
    const copies = messages(relay, "news/b", 2);
    const keyed = await relay.publish("news/b", "keyed", { idempotencyKey: "k-1" });
    const again = await relay.publish("news/b", "keyed", { idempotencyKey: "k-1" });
    assert.deepEqual([again.seq, again.epoch, again.duplicate, keyed.duplicate], [keyed.seq, epoch, true, undefined]);
    await relay.publish("news/b", "after");
    assert.deepEqual(await copies, [[keyed.seq, "keyed"], [keyed.seq + 1, "after"]]); // one copy
    // echo: false: published (and counted), not sent back to this connection.
    const quiet = await relay.publish("news/b", "not echoed", { echo: false });
    const echoed = messages(relay, "news/b", 1);
    await relay.publish("news/b", "echoed");
    assert.deepEqual(await echoed, [[quiet.seq + 1, "echoed"]]);
  } finally {
    await relay.close();
  }
  assert.equal(relay.state, "closed");
});

test("a forbidden topic is refused alone, the others go on", { skip }, async () => {
  const relay = connect(url, { token });
  try {
    await relay.subscribe("news/forbidden-test");
    const refused = next(relay, "unsubscribed", (event) => event.topic === "secret");
    await assert.rejects(relay.subscribe("secret"), (error) => {
      assert.equal(error.name, "RelayError");
      assert.equal(error.code, "forbidden");
      assert.equal(error.topic, "secret");
      assert.equal(typeof error.id, "number");
      return true;
    });
    assert.equal((await refused).code, "forbidden");
    await assert.rejects(relay.publish("secret", "psst"), { code: "forbidden", topic: "secret" });
    await assert.rejects(relay.subscribe("bad//topic"), { code: "bad-topic" });
    const delivered = messages(relay, "news/forbidden-test", 1);
    await relay.publish("news/forbidden-test", "still here");
    assert.deepEqual(await delivered, [[1, "still here"]]);
    const [{ epoch }] = relay.subscriptions;
    assert.match(epoch, /^[0-9a-f]{8}$/);
    assert.deepEqual(relay.subscriptions, [{ topic: "news/forbidden-test", last: 1, epoch, subscribed: true }]);
  } finally {
    await relay.close();
  }
});

test("after a lost connection it resumes each topic from its last number, gap shown", { skip }, async () => {
  // The WebSocket the client makes, kept so that the test can cut the connection.
  const sockets = [];
  class Recorded extends WebSocket {
    constructor(...args) {
      super(...args);
      sockets.push(this);
    }
  }
  // The reconnection waits for the token: until the test has published what the client misses.
  let gate = null;
  const relay = connect(url, {
    WebSocket: Recorded,
    token: () => gate?.promise ?? token,
    backoff: [0.01, 0.01],
    jitter: 0,
  });
  const publisher = connect(url, { token });
  try {
    await relay.subscribe("news/resume");
    await relay.subscribe("news/kept");
    const first = messages(relay, "news/resume", 1);
    await publisher.publish("news/resume", "1");
    assert.deepEqual(await first, [[1, "1"]]);

    let open;
    gate = { promise: new Promise((resolve) => (open = resolve)) };
    const retrying = next(relay, "state", (event) => event.state === "retrying");
    sockets.at(-1).close();
    assert.equal((await retrying).opened, true);
    for (let n = 2; n <= 6; n += 1) await publisher.publish("news/resume", String(n));
    await publisher.publish("news/kept", "while away");

    const gap = next(relay, "gap");
    const replayed = messages(relay, "news/resume", 3);
    const kept = messages(relay, "news/kept", 1);
    const resubscribed = next(relay, "subscribed", (event) => event.topic === "news/resume");
    gate = null;
    open(token);
    const again = await resubscribed;
    assert.deepEqual([again.seq, again.since], [6, 1]);
    // --history-size 3: 4, 5 and 6 are retained; 2 and 3 are lost, and said to be.
    const { topic, since, first: firstKept, reset } = await gap;
    assert.deepEqual({ topic, since, first: firstKept, reset }, { topic: "news/resume", since: 1, first: 4, reset: false });
    assert.deepEqual(await replayed, [[4, "4"], [5, "5"], [6, "6"]]);
    assert.deepEqual(await kept, [[1, "while away"]]);
    assert.equal(sockets.length, 2);
    assert.equal(relay.state, "connected");
  } finally {
    await Promise.all([relay.close(), publisher.close()]);
  }
});

test("refresh replaces the connection's token", { skip }, async () => {
  const relay = connect(url, { token });
  try {
    await relay.subscribe("news/refresh");
    const { exp } = await relay.refresh(other);
    assert.ok(Number.isInteger(exp) && exp > Date.now() / 1000, `exp ${exp}`);
    await assert.rejects(relay.refresh("not a token"), { code: "bad-token" });
    assert.equal((await relay.publish("news/refresh", "after")).seq, 1);
  } finally {
    await relay.close();
  }
});

test("a wrong token: the handshake is refused, and the client keeps trying", { skip }, async () => {
  const relay = connect(url, { token: "not a token", backoff: [0.01, 0.01], jitter: 0 });
  try {
    const retrying = await next(relay, "state", (event) => event.state === "retrying");
    assert.equal(retrying.opened, false);
    assert.ok(!JSON.stringify(retrying.reason).includes("not a token"));
  } finally {
    await relay.close();
  }
});
