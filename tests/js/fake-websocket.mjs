// A WebSocket stand-in for the client's Node tests: the test plays the relay. It records
// what the client sends (parsed JSON) and opens, answers or closes when the test says.

export class FakeWebSocket {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSING = 2;
  static CLOSED = 3;

  /** Every socket made, in order. */
  static made = [];

  static reset() {
    FakeWebSocket.made = [];
  }

  /** The latest socket made. */
  static get last() {
    return FakeWebSocket.made.at(-1);
  }

  constructor(url, protocol) {
    this.url = url;
    this.requested = protocol;
    this.protocol = "";
    this.readyState = FakeWebSocket.CONNECTING;
    this.binaryType = "blob";
    this.sent = []; // frames the client sent, parsed
    this.closedWith = null; // [code, reason] of the client's close()
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeWebSocket.made.push(this);
  }

  send(data) {
    if (this.readyState !== FakeWebSocket.OPEN) throw new Error(`send in state ${this.readyState}`);
    this.sent.push(JSON.parse(data));
  }

  close(code = 1005, reason = "") {
    if (this.readyState >= FakeWebSocket.CLOSING) return;
    this.closedWith = [code, reason];
    const connecting = this.readyState === FakeWebSocket.CONNECTING;
    this.readyState = FakeWebSocket.CLOSING;
    // As in browsers: closing a socket still connecting fails it (error, close 1006).
    if (connecting) setImmediate(() => this.end(1006));
  }

  // ---- the relay's side

  /** The handshake succeeds with `protocol` (the one asked for, by default). */
  open(protocol = this.requested) {
    this.protocol = protocol;
    this.readyState = FakeWebSocket.OPEN;
    this.onopen?.({ type: "open" });
  }

  /** The relay sends `frame` (an object, sent as JSON; or a string as it is). */
  receive(frame) {
    const data = typeof frame === "string" ? frame : JSON.stringify(frame);
    this.onmessage?.({ type: "message", data });
  }

  /** The connection ends with `code` (1006: lost, or refused before it opened). */
  end(code = 1006, reason = "") {
    if (code === 1006) this.onerror?.({ type: "error" });
    this.readyState = FakeWebSocket.CLOSED;
    this.onclose?.({ type: "close", code, reason, wasClean: code !== 1006 });
  }

  /** The handshake fails as in Node 20: an error event, and no close event ever. */
  failWithoutClose() {
    this.onerror?.({ type: "error" });
  }

  /** The frames sent since the last call. */
  take() {
    const frames = this.sent;
    this.sent = [];
    return frames;
  }
}
