"""Sans-IO pieces of the server side of RFC 6455: framing, close codes, request heads.

Nothing here touches a stream, so tests drive it with plain bytes.
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "CloseCode",
    "close_frame",
    "control_frame",
    "encode_frame",
    "frame_header",
    "frame_payload",
    "split_request_head",
]


class CloseCode(enum.IntEnum):
    """The WebSocket close codes the relay sends, and when."""

    NORMAL = 1000
    """The client closed, and the relay answered."""
    GOING_AWAY = 1001
    """The relay is shutting down (cancellation, SIGINT or SIGTERM)."""
    PROTOCOL_ERROR = 1002
    """The client broke RFC 6455 (unmasked frame, bad opcode, oversized control frame...)."""
    INVALID_DATA = 1007
    """A text message was not valid UTF-8."""
    SLOW_CONSUMER = 1008
    """The client's queue stayed full longer than the slow-consumer timeout (policy violation)."""
    MESSAGE_TOO_BIG = 1009
    """A message exceeded ``max_message_size`` bytes."""
    INTERNAL_ERROR = 1011
    """The relay hit an unexpected error on this connection (or the application's
    ``on_publish`` hook failed on its message), or the client did not answer a keepalive
    ping within ``ping_timeout``; other connections are unaffected."""
    TRY_AGAIN_LATER = 1013
    """The relay's budget for unfinished incoming messages (``max_unfinished_bytes``, shared
    by all connections) had no room for the rest of this client's message. Nothing of that
    message was published; retrying later may succeed."""
    TOKEN_EXPIRED = 4401
    """The connection's token expired (its ``exp``), and no ``refresh`` frame replaced it
    in time. The client may reconnect with a new token."""
    GAP = 4410
    """A raw client asked for messages (``since``) that are no longer retained, of another
    epoch or beyond the topic's last number; or, live, its topic's numbering skipped
    numbers or changed epoch. Envelope clients get a ``gap`` frame instead and stay
    connected."""


_TEXT = 0x81  # FIN + opcode 1
_BINARY = 0x82  # FIN + opcode 2
_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack


def encode_frame(message: str | bytes) -> bytes:
    """Frame ``message`` as one unfragmented, unmasked server frame (text for ``str``).

    Server frames are never masked, so the same bytes go to every consumer: the relay
    frames each message once, whatever the number of subscribers.
    """
    if isinstance(message, str):
        return frame_payload(message.encode("utf-8"), text=True)
    return frame_payload(bytes(message), text=False)


def frame_payload(payload: bytes, *, text: bool) -> bytes:
    """Frame an already encoded payload (UTF-8 bytes when ``text``); see :func:`encode_frame`."""
    return frame_header(len(payload), text=text) + payload


def frame_header(length: int, *, text: bool) -> bytes:
    """The header of an unfragmented, unmasked data frame carrying ``length`` bytes."""
    first = _TEXT if text else _BINARY
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return _pack_short(first, 126, length)
    return _pack_long(first, 127, length)


PING_OPCODE = 0x9
PONG_OPCODE = 0xA
CLOSE_OPCODE = 0x8


def control_frame(opcode: int, payload: bytes = b"") -> bytes:
    """An unmasked control frame (ping, pong, close); ``payload`` is at most 125 bytes."""
    if len(payload) > 125:
        raise ValueError("control frame payloads are at most 125 bytes")
    return bytes((0x80 | opcode, len(payload))) + payload


def close_frame(code: int | None, reason: str = "") -> bytes:
    """A close frame; ``code=None`` (or 1005, "no status") sends an empty payload.

    The reason is cut to fit the 125-byte limit without splitting a UTF-8 character.
    """
    if code is None or code == 1005:
        return control_frame(CLOSE_OPCODE)
    encoded = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    return control_frame(CLOSE_OPCODE, code.to_bytes(2, "big") + encoded)


_END_OF_HEAD = b"\r\n\r\n"


def split_request_head(buffer: bytes | bytearray) -> tuple[bytes, bytes] | None:
    """Split received bytes into the HTTP request head and whatever followed it.

    Returns ``None`` while the head is incomplete. The relay feeds only the head to the
    handshake parser and hands the rest to the frame parser after accepting, so a frame
    sent in the same segment as the handshake is processed at once (trio-websocket 0.12.2
    leaves such bytes in h11's buffer until more data arrives).
    """
    end = buffer.find(_END_OF_HEAD)
    if end < 0:
        return None
    end += len(_END_OF_HEAD)
    return bytes(buffer[:end]), bytes(buffer[end:])
