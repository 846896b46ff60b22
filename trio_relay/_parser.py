"""Sans-IO parser for the frames a WebSocket client sends to the relay (RFC 6455, section 5).

It does what wsproto's frame layer does for a server without extensions -- unmasking,
reassembly of fragmented messages with control frames in between, UTF-8 validation across
fragments, close-code validation -- and is differential-tested against wsproto
(``tests/test_parser.py``). It exists because the relay's hot path needs the raw payload
bytes of many frames per read, cheaply: wsproto decodes text to ``str`` (which the relay
would encode again) and builds several objects per frame.

Feed bytes with :meth:`FrameParser.feed`; it returns the events those bytes completed. A
protocol violation raises :class:`ProtocolError` carrying the close code to send; events
completed before the bad frame are in its ``events`` attribute. ``feed`` can be told to
stop after so many messages or control frames (the connection's rate limits): the rest of
the bytes then stay buffered, unparsed, until the next call.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CLOSE",
    "CONTROL",
    "MAX_HEADER",
    "MESSAGE",
    "PING",
    "PONG",
    "Close",
    "FrameParser",
    "ProtocolError",
    "unmask",
]

MESSAGE: Final = 0
PING: Final = 1
PONG: Final = 2
CLOSE: Final = 3
CONTROL: Final = PING
"""What :attr:`FrameParser.stopped` is when a ping or pong frame stopped parsing."""
UNLIMITED: Final = 1 << 62
"""The default allowance of :meth:`FrameParser.feed`: no limit."""

MAX_HEADER: Final = 14
"""The longest frame header a client sends: 2 bytes, 8 of extended length, 4 of mask."""

Event = tuple[int, bytes, bool]
"""``(MESSAGE, payload, is_text)``, ``(PING, payload, False)``, ``(PONG, payload, False)``,
or ``(CLOSE, payload, False)`` with the raw close payload (see :class:`Close`)."""


@dataclass(frozen=True)
class Close:
    """A parsed close frame: ``code`` 1005 when the client sent none."""

    code: int
    reason: str

    @classmethod
    def parse(cls, payload: bytes) -> Close:
        """Validate a close frame's payload as RFC 6455 section 7.4 (and wsproto) do."""
        if not payload:
            return cls(1005, "")
        if len(payload) == 1:
            raise ProtocolError(1002, "close frame with a 1-byte payload")
        code = int.from_bytes(payload[:2], "big")
        if not (1000 <= code <= 4999):
            raise ProtocolError(1002, f"close code {code} out of range")
        if code in _LOCAL_ONLY_CODES:
            raise ProtocolError(1002, f"close code {code} may not be sent")
        if code < 3000 and code not in _DEFINED_CODES:
            raise ProtocolError(1002, f"reserved close code {code}")
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(1007, "close reason is not valid UTF-8") from None
        return cls(code, reason)


_DEFINED_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013})
_LOCAL_ONLY_CODES = frozenset({1005, 1006, 1015})


class ProtocolError(Exception):
    """The client broke RFC 6455: close the connection with :attr:`code`. For 1009,
    :attr:`size` is the message's size in bytes as far as its frame headers announced it."""

    def __init__(self, code: int, reason: str, size: int = 0) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.size = size
        self.events: list[Event] = []


def unmask(payload: bytes | bytearray | memoryview, mask: bytes | bytearray) -> bytes:
    """XOR ``payload`` with the repeating 4-byte ``mask`` (its own inverse)."""
    length = len(payload)
    if not length:
        return b""
    key = (bytes(mask) * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        length, "little"
    )


class FrameParser:
    """Turns client bytes into events; one instance per connection.

    ``max_message_size`` bounds a whole message in bytes (across fragments); a frame header
    announcing more raises :class:`ProtocolError` with code 1009 before its payload arrives,
    so the buffer never holds more than one message plus one read.
    """

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        # Unparsed bytes: b"" (shared, never changed) when there are none, a bytearray of
        # their own otherwise. Nothing is allocated per connection until it is needed.
        self._buffer: bytes | bytearray = b""
        self._closed = False
        # The fragmented message in progress, if any.
        # One growing buffer, not a list: a flood of tiny fragments costs its bytes only.
        self._fragments: bytearray | None = None
        self._fragmented_text = False
        self._fragmenting = False
        self._fragment_size = 0
        self._decoder: codecs.IncrementalDecoder | None = None
        self.unfinished = 0
        """Payload bytes held of the message in progress, as of the last :meth:`feed`: its
        fragments so far, and what of the frame that has not fully arrived is past its
        first 14 bytes (a header's most, so that a message of ``max_message_size`` counts
        as at most that). Unparsed whole frames held back by a rate count too."""
        self.too_big = "message of {size} bytes over the {limit}-byte limit"
        """The reason of the 1009 error, with ``{size}`` and ``{limit}`` to fill in."""
        self.stopped: int | None = None
        """:data:`MESSAGE` or :data:`CONTROL` if the last :meth:`feed` stopped before a frame
        of that kind because its allowance was spent; the frame and everything after it are
        buffered for the next call. None otherwise."""

    def feed(
        self,
        data: bytes | bytearray,
        max_messages: int = UNLIMITED,
        max_controls: int = UNLIMITED,
    ) -> list[Event]:
        """Add received bytes; return the events they complete, in order.

        At most ``max_messages`` messages and ``max_controls`` ping and pong frames are
        parsed (close frames always are); then parsing stops, :attr:`stopped` says why,
        and the remaining bytes wait in the buffer: call again (with ``b""``) to go on.
        After a close frame, further bytes are ignored (RFC 6455 5.5.1).
        """
        self.stopped = None
        if self._closed:
            return []
        buffer = self._buffer
        if buffer:
            assert isinstance(buffer, bytearray)
            buffer += data
            view: bytes | bytearray = buffer
        else:
            view = data
        events: list[Event] = []
        try:
            consumed = self._parse(view, events, max_messages, max_controls)
        except ProtocolError as exc:
            self._closed = True
            self._buffer = b""
            self.unfinished = self._fragment_size
            exc.events = events
            raise
        if consumed == len(view):
            self._buffer = b""
            self.unfinished = self._fragment_size
            return events
        if view is buffer:
            assert isinstance(buffer, bytearray)
            del buffer[:consumed]
        else:
            self._buffer = bytearray(view[consumed:])
        self.unfinished = self._fragment_size + max(len(self._buffer) - MAX_HEADER, 0)
        return events

    def abandon(self) -> None:
        """Let go of the message in progress and ignore whatever comes after: the
        connection is being failed (RFC 6455 7.1.7) and its bytes no longer matter."""
        self._closed = True
        self._buffer = b""
        self._fragments = None
        self._fragment_size = 0
        self._fragmenting = False
        self._decoder = None
        self.unfinished = 0

    def _parse(
        self, data: bytes | bytearray, events: list[Event], messages: int, controls: int
    ) -> int:
        size = len(data)
        pos = 0
        limit = self.max_message_size
        while size - pos >= 2:
            first = data[pos]
            second = data[pos + 1]
            opcode = first & 0x0F
            fin = first & 0x80
            if first & 0x70:
                raise ProtocolError(1002, "reserved bits set (no extension was negotiated)")
            if not second & 0x80:
                raise ProtocolError(1002, "client frame is not masked")
            length = second & 0x7F
            if length < 126:
                header = 6
            elif length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                if length < 126:
                    raise ProtocolError(1002, "payload length not minimally encoded")
                header = 8
            else:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                if length >> 63:
                    raise ProtocolError(1002, "payload length has its top bit set")
                if length < 65536:
                    raise ProtocolError(1002, "payload length not minimally encoded")
                header = 14
            if opcode >= 8:
                if opcode > 10:
                    raise ProtocolError(1002, f"unknown opcode {opcode:#x}")
                if not fin:
                    raise ProtocolError(1002, "fragmented control frame")
                if length > 125:
                    raise ProtocolError(1002, "control frame payload over 125 bytes")
                if opcode != 8:
                    if not controls:
                        self.stopped = CONTROL
                        break
                    controls -= 1
            elif opcode > 2:
                raise ProtocolError(1002, f"unknown opcode {opcode:#x}")
            elif opcode == 0:
                if not self._fragmenting:
                    raise ProtocolError(1002, "continuation frame without a message to continue")
                if self._fragment_size + length > limit:
                    size = self._fragment_size + length
                    reason = self.too_big.format(size=f"at least {size}", limit=limit)
                    raise ProtocolError(1009, reason, size)
                if fin:
                    if not messages:
                        self.stopped = MESSAGE
                        break
                    messages -= 1
            else:
                if self._fragmenting:
                    raise ProtocolError(1002, "new message before the previous one finished")
                if length > limit:
                    reason = self.too_big.format(size=length, limit=limit)
                    raise ProtocolError(1009, reason, length)
                if fin:
                    if not messages:
                        self.stopped = MESSAGE
                        break
                    messages -= 1
            end = pos + header + length
            if end > size:
                break
            payload = unmask(data[pos + header : end], data[pos + header - 4 : pos + header])
            pos = end
            if opcode == 1 and fin:
                if not payload.isascii():
                    try:
                        payload.decode("utf-8")
                    except UnicodeDecodeError:
                        raise ProtocolError(1007, "text message is not valid UTF-8") from None
                events.append((MESSAGE, payload, True))
            elif opcode == 2 and fin:
                events.append((MESSAGE, payload, False))
            elif opcode < 8:
                self._fragment(opcode, payload, bool(fin), events)
            elif opcode == 9:
                events.append((PING, payload, False))
            elif opcode == 10:
                events.append((PONG, payload, False))
            else:
                Close.parse(payload)  # validate now: a bad close frame is a protocol error
                events.append((CLOSE, payload, False))
                self._closed = True
                return size
        return pos

    def _fragment(self, opcode: int, payload: bytes, fin: bool, events: list[Event]) -> None:
        if opcode:  # the first frame of a fragmented message
            self._fragmenting = True
            self._fragmented_text = opcode == 1
            self._decoder = codecs.getincrementaldecoder("utf-8")() if opcode == 1 else None
        if self._decoder is not None:
            try:
                self._decoder.decode(payload, fin)
            except UnicodeDecodeError:
                raise ProtocolError(1007, "text message is not valid UTF-8") from None
        fragments = self._fragments
        if fragments is None:
            fragments = self._fragments = bytearray()
        fragments += payload
        self._fragment_size += len(payload)
        if fin:
            message = bytes(fragments)
            events.append((MESSAGE, message, self._fragmented_text))
            self._fragments = None
            self._fragment_size = 0
            self._fragmenting = False
            self._decoder = None
