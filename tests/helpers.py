"""A raw WebSocket client for tests that need exact bytes on the wire.

It speaks through wsproto's client side, so its frames are masked and well-formed unless a
test writes bytes of its own with :meth:`RawClient.send_raw`.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
import tracemalloc
from collections import deque
from collections.abc import Iterator
from typing import NoReturn

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from trio_relay.testing import MemoryRelay

HOST = "relay.test"
EPOCH = re.compile(r"[0-9a-f]{8}")
"""An epoch as the relay makes it (8 hex digits)."""


def without_epoch(frame: dict[str, object]) -> dict[str, object]:
    """``frame`` (a decoded envelope frame) without its ``epoch``, which must be one the
    relay makes if present: for tests of other things, which compare frames whole (epochs
    are random per process; their own tests check them)."""
    frame = dict(frame)
    epoch = frame.pop("epoch", None)
    assert epoch is None or (isinstance(epoch, str) and EPOCH.fullmatch(epoch)), epoch
    return frame


def without_epochs(document: object) -> object:
    """:func:`without_epoch` through a whole JSON document (lists and objects in it)."""
    if isinstance(document, list):
        return [without_epochs(item) for item in document]
    if isinstance(document, dict):
        return {key: without_epochs(value) for key, value in without_epoch(document).items()}
    return document


def upgrade_request(path: str = "/", *, extra: str = "") -> bytes:
    """A hand-written, valid WebSocket upgrade request."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


def masked_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client frame, masked as RFC 6455 requires."""
    mask = os.urandom(4)
    length = len(payload)
    header = bytes([(0x80 if fin else 0) | opcode])
    if length < 126:
        header += bytes([0x80 | length])
    elif length < 65536:
        header += bytes([0x80 | 126]) + length.to_bytes(2, "big")
    else:
        header += bytes([0x80 | 127]) + length.to_bytes(8, "big")
    key = (mask * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(length, "big")
    return header + mask + masked


class RawClient:
    """One client connection driven by the test, event by event."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._events: deque[Event] = deque()

    @classmethod
    async def connect(cls, relay: MemoryRelay, path: str = "/") -> RawClient:
        client = cls(await relay.open_stream())
        await client.send(Request(host=HOST, target=path))
        event = await client.next_event()
        assert isinstance(event, AcceptConnection), event
        return client

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def send_text(self, text: str) -> None:
        await self.send(TextMessage(data=text))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next_event(self) -> Event:
        """The next event from the relay; raises EOFError if the stream ends first."""
        while not self._events:
            data = await self.stream.receive_some()
            if not data:
                raise EOFError("the relay closed the stream")
            self.ws.receive_data(bytes(data))
            self._events.extend(self.ws.events())
        return self._events.popleft()

    async def next_message(self) -> str | bytes:
        """The next data message, reassembled from the pieces wsproto reports; pongs and
        pings in between are skipped."""
        parts: list[str | bytes] = []
        while True:
            event = await self.next_event()
            if isinstance(event, TextMessage | BytesMessage):
                parts.append(event.data if isinstance(event.data, str) else bytes(event.data))
                if event.message_finished:
                    return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)  # type: ignore[arg-type]
            assert not isinstance(event, CloseConnection), event

    async def next_close(self) -> CloseConnection:
        """Read until the relay's close frame, skipping data; do not answer it."""
        while True:
            event = await self.next_event()
            if isinstance(event, CloseConnection):
                return event

    async def close_from_relay(self) -> CloseConnection:
        """Read until the relay's close frame, skipping data; answer it like a good client."""
        event = await self.next_close()
        await self.send(event.response())
        return event

    async def read_to_eof(self) -> bytes:
        """Everything the relay still sends, until it closes the stream."""
        data = b""
        while chunk := await self.stream.receive_some():
            data += chunk
        return data


async def rejected(relay: MemoryRelay, request: bytes) -> tuple[int, bytes]:
    """Send a raw request; return the HTTP status and body of the relay's rejection."""
    stream = await relay.open_stream()
    with contextlib.suppress(trio.BrokenResourceError):
        # Refused when accepted (a connection limit): the relay may have closed already.
        await stream.send_all(request)
    ws = WSConnection(ConnectionType.CLIENT)
    ws.send(Request(host=HOST, target="/"))  # puts wsproto's client in the state to read one
    status, body = 0, b""
    while True:
        data = await stream.receive_some()
        ws.receive_data(bytes(data) if data else None)
        for event in ws.events():
            if isinstance(event, RejectConnection):
                status = event.status_code
            elif isinstance(event, RejectData):
                body += event.data
                if event.body_finished:
                    return status, body
            else:
                raise AssertionError(f"unexpected {event!r}")
        if not data:
            return status, body


async def http_request(
    port: int, path: str, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request to 127.0.0.1:``port`` (the relay's side port closes after each):
    the status, the headers (lower-case names) and the body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        response = b""
        while chunk := await stream.receive_some():
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def unavailable(reason: str) -> NoReturn:
    """Skip for want of ``reason`` (a program or package, and how to install it); fail
    instead where integration tests are required (CI sets TRIO_RELAY_REQUIRE_INTEGRATION=1)."""
    if os.environ.get("TRIO_RELAY_REQUIRE_INTEGRATION") == "1":
        pytest.fail(f"{reason} (TRIO_RELAY_REQUIRE_INTEGRATION=1: no skipping)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def traced_memory() -> Iterator[None]:
    """Trace allocations with tracemalloc for the test (a module that measures memory uses
    it on every test: ``pytestmark = pytest.mark.usefixtures("traced_memory")``)."""
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


@pytest.fixture
def wall_clock(monkeypatch: pytest.MonkeyPatch) -> float:
    """Make ``time.time()`` follow trio's (virtual) clock: the wall time returned (a whole
    second not before the real one) plus ``trio.current_time()``, or plus 0 outside a
    trio run, for sans-IO tests that pass times of their own. Token expiries (``exp``, on
    the wall clock) then fall at exact virtual times: a token minted with
    ``now=wall_clock, ttl=20`` expires at virtual time 20. PyJWT's own expiry check reads
    ``datetime.now()``, the real clock, so such tokens stay valid there for ``ttl`` real
    seconds."""
    start = float(math.ceil(time.time()))

    def follow() -> float:
        try:
            return start + trio.current_time()
        except RuntimeError:  # not in a trio run
            return start

    monkeypatch.setattr(time, "time", follow)
    return start
