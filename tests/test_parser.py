"""The relay's frame parser: RFC 6455 rules one by one, and differential tests against wsproto.

wsproto is the reference: for any byte stream of client frames, split anywhere, our parser
must report the same messages, pings, pongs and close, and fail with the same close code.
"""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings, strategies as st
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from trio_relay._parser import CLOSE, MESSAGE, PING, PONG, Close, FrameParser, ProtocolError

BIG = 1 << 40


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    masked: bool = True,
    rsv: int = 0,
    long_length: bool = False,
) -> bytes:
    """A client frame; ``long_length`` uses a 2-byte length where 1 byte would do."""
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if length < 126 and not long_length:
        head += bytes([mask_bit | length])
    elif length < 65536:
        head += bytes([mask_bit | 126]) + length.to_bytes(2, "big")
    else:
        head += bytes([mask_bit | 127]) + length.to_bytes(8, "big")
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def ours(
    data: bytes, chunks: list[int] | None = None, limit: int = BIG
) -> list[tuple[object, ...]]:
    """Our parser's view of ``data`` fed in pieces, normalized for comparison."""
    parser = FrameParser(limit)
    out: list[tuple[object, ...]] = []
    pieces = _split(data, chunks or [])
    for piece in pieces:
        try:
            events = parser.feed(piece)
        except ProtocolError as exc:
            out.extend(_normal(e) for e in exc.events)
            out.append(("error", exc.code))
            return out
        out.extend(_normal(e) for e in events)
    return out


def _normal(event: tuple[int, bytes, bool]) -> tuple[object, ...]:
    kind, payload, text = event
    if kind == MESSAGE:
        return ("message", payload, text)
    if kind == PING:
        return ("ping", payload)
    if kind == PONG:
        return ("pong", payload)
    assert kind == CLOSE
    close = Close.parse(payload)
    return ("close", close.code, close.reason)


def reference(data: bytes, chunks: list[int] | None = None) -> list[tuple[object, ...]]:
    """wsproto's server-side view of the same bytes, normalized the same way."""
    conn = Connection(ConnectionType.SERVER)
    out: list[tuple[object, ...]] = []
    parts: list[bytes] = []
    text = False
    for piece in _split(data, chunks or []):
        conn.receive_data(piece)
        for event in conn.events():
            if isinstance(event, TextMessage | BytesMessage):
                text = isinstance(event, TextMessage)
                parts.append(event.data.encode() if text else bytes(event.data))
                if event.message_finished:
                    out.append(("message", b"".join(parts), text))
                    parts = []
            elif isinstance(event, Ping):
                out.append(("ping", bytes(event.payload)))
            elif isinstance(event, Pong):
                out.append(("pong", bytes(event.payload)))
            elif isinstance(event, CloseConnection):
                if conn.state is ConnectionState.REMOTE_CLOSING:
                    out.append(("close", int(event.code), event.reason or ""))
                else:  # wsproto reports a protocol error as the close it wants sent
                    out.append(("error", int(event.code)))
                return out
    return out


def _split(data: bytes, chunks: list[int]) -> list[bytes]:
    pieces, pos = [], 0
    for size in chunks:
        if pos >= len(data):
            break
        pieces.append(data[pos : pos + size])
        pos += size
    if pos < len(data):
        pieces.append(data[pos:])
    return pieces


# ------------------------------------------------------------------ rules, one by one


def test_a_masked_text_frame_is_unmasked_into_a_message() -> None:
    assert ours(frame(1, "héllo".encode())) == [("message", "héllo".encode(), True)]


def test_a_binary_frame_stays_binary() -> None:
    assert ours(frame(2, b"\x00\xff")) == [("message", b"\x00\xff", False)]


def test_fragments_with_a_ping_between_them_make_one_message() -> None:
    data = frame(1, b"frag", fin=False) + frame(9, b"p") + frame(0, b"ment")
    assert ours(data) == [("ping", b"p"), ("message", b"fragment", True)]


def test_utf8_split_across_fragments_is_valid() -> None:
    euro = "€".encode()
    data = frame(1, euro[:1], fin=False) + frame(0, euro[1:])
    assert ours(data) == [("message", euro, True)]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(1, b"x", masked=False), 1002),
        (frame(1, b"x", rsv=4), 1002),
        (frame(3, b"x"), 1002),
        (frame(11, b"x"), 1002),
        (frame(9, b"x" * 126), 1002),
        (frame(9, b"x", fin=False), 1002),
        (frame(0, b"x"), 1002),
        (frame(1, b"a", fin=False) + frame(2, b"b"), 1002),
        (frame(1, b"x", long_length=True), 1002),
        (frame(1, b"\xff"), 1007),
        (frame(1, b"ok", fin=False) + frame(0, b"\xc3"), 1007),
        (frame(8, b"\x03"), 1002),
        (frame(8, (999).to_bytes(2, "big")), 1002),
        (frame(8, (1005).to_bytes(2, "big")), 1002),
        (frame(8, (1004).to_bytes(2, "big")), 1002),
        (frame(8, (1000).to_bytes(2, "big") + b"\xff"), 1007),
    ],
    ids=[
        "unmasked",
        "reserved-bits",
        "opcode-3",
        "opcode-11",
        "control-over-125",
        "fragmented-control",
        "orphan-continuation",
        "new-message-mid-fragments",
        "non-minimal-length",
        "invalid-utf8",
        "invalid-utf8-in-last-fragment",
        "close-1-byte",
        "close-code-below-1000",
        "close-code-local-only",
        "close-code-reserved",
        "close-reason-not-utf8",
    ],
)
def test_each_violation_fails_with_its_close_code(data: bytes, code: int) -> None:
    assert ours(data)[-1] == ("error", code)
    assert reference(data)[-1] == ("error", code)


def test_a_header_announcing_2_to_the_63_bytes_is_a_protocol_error() -> None:
    header = bytes([0x82, 0x80 | 127]) + (1 << 63).to_bytes(8, "big")
    assert ours(header) == [("error", 1002)]


def test_an_oversized_message_fails_from_its_header_before_the_payload_arrives() -> None:
    header = bytes([0x82, 0x80 | 127]) + (1 << 40).to_bytes(8, "big")
    assert ours(header, limit=1024) == [("error", 1009)]
    fragments = frame(2, b"x" * 600, fin=False) + frame(0, b"y" * 600)
    assert ours(fragments, limit=1024) == [("error", 1009)]


def test_unfinished_counts_the_payload_held_of_the_message_in_progress() -> None:
    parser = FrameParser(1024)
    whole = frame(2, b"x" * 1000)  # 4-byte header (2-byte length) and 4-byte mask
    assert parser.feed(whole[:508]) == []
    assert parser.unfinished == 508 - 14  # up to 14 header bytes are not counted
    assert parser.feed(whole[508:]) == [(MESSAGE, b"x" * 1000, False)]
    assert parser.unfinished == 0
    # Fragments: what arrived of them, plus the frame still coming, while pings pass.
    first, ping, rest = frame(2, b"a" * 300, fin=False), frame(9, b"p"), frame(0, b"b" * 300)
    assert parser.feed(first + ping + rest[:100]) == [(PING, b"p", False)]
    assert parser.unfinished == 300 + 100 - 14
    assert parser.feed(rest[100:]) == [(MESSAGE, b"a" * 300 + b"b" * 300, False)]
    assert parser.unfinished == 0


def test_a_message_of_the_largest_size_counts_as_at_most_that_size() -> None:
    parser = FrameParser(100_000)
    whole = frame(2, b"x" * 100_000)  # a 14-byte header
    parser.feed(whole[:-1])
    assert parser.unfinished == 100_000 - 1


def test_abandon_lets_go_of_the_message_and_ignores_what_follows() -> None:
    parser = FrameParser(1024)
    parser.feed(frame(2, b"a" * 300, fin=False) + frame(0, b"b" * 300)[:50])
    assert parser.unfinished > 0
    parser.abandon()
    assert parser.unfinished == 0
    assert parser.feed(frame(1, b"late")) == []


def test_events_before_a_violation_are_kept() -> None:
    assert ours(frame(1, b"good") + frame(1, b"bad", masked=False)) == [
        ("message", b"good", True),
        ("error", 1002),
    ]


def test_bytes_after_a_close_frame_are_ignored() -> None:
    data = frame(8, (1000).to_bytes(2, "big") + b"bye") + frame(1, b"late")
    assert ours(data) == [("close", 1000, "bye")]


def test_an_empty_close_means_no_status_code() -> None:
    assert ours(frame(8, b"")) == [("close", 1005, "")]


def test_every_split_point_gives_the_same_events() -> None:
    data = frame(1, b"a" * 300) + frame(9, b"ping") + frame(2, b"b" * 70_000)
    whole = ours(data)
    assert whole == [
        ("message", b"a" * 300, True),
        ("ping", b"ping"),
        ("message", b"b" * 70_000, False),
    ]
    for cut in range(0, 320):
        assert ours(data, [cut]) == whole, cut


# ------------------------------------------------------------------ differential


def _mostly(
    value: object, other: st.SearchStrategy[object], one_in: int = 20
) -> st.SearchStrategy[object]:
    """``value`` except about once in ``one_in`` draws, when ``other`` is drawn."""
    return st.integers(1, one_in).flatmap(lambda i: other if i == 1 else st.just(value))


_frames = st.builds(
    lambda opcode, payload, fin, masked, rsv: frame(
        opcode, payload, fin=fin, masked=masked, rsv=rsv
    ),
    # Mostly messages, some fragments and control frames, rarely an unknown opcode.
    opcode=st.sampled_from([1, 1, 1, 2, 2, 2, 0, 0, 9, 10, 8]) | _mostly(1, st.integers(3, 15)),
    payload=st.one_of(
        st.text(max_size=80).map(str.encode),
        st.binary(max_size=200),
        st.binary(min_size=126, max_size=300),
    ),
    fin=_mostly(True, st.just(False), one_in=3),
    masked=_mostly(True, st.just(False), one_in=30),
    rsv=_mostly(0, st.integers(1, 7), one_in=30),
)


@st.composite
def _conversations(draw: st.DrawFn) -> bytes:
    """Well-formed messages (fragmented at random, control frames in between), and now and
    then one frame from ``_frames`` dropped in somewhere, which may or may not be legal."""
    frames: list[bytes] = []
    for _ in range(draw(st.integers(0, 5))):
        text = draw(st.booleans())
        payload = draw(st.text(max_size=60).map(str.encode) if text else st.binary(max_size=300))
        cuts = sorted(set(draw(st.lists(st.integers(0, len(payload)), max_size=3))))
        bounds = [0, *cuts, len(payload)]
        pieces = [payload[a:b] for a, b in itertools.pairwise(bounds)]
        for i, piece in enumerate(pieces):
            opcode = (1 if text else 2) if i == 0 else 0
            frames.append(frame(opcode, piece, fin=i == len(pieces) - 1))
            if draw(st.integers(0, 4)) == 0:
                frames.append(frame(draw(st.sampled_from([9, 10])), draw(st.binary(max_size=125))))
    if draw(st.booleans()):
        frames.insert(draw(st.integers(0, len(frames))), draw(_frames))
    if draw(st.integers(0, 5)) == 0:
        code = draw(st.sampled_from([1000, 1001, 1008, 3000, 4999]))
        frames.append(frame(8, code.to_bytes(2, "big") + draw(st.text(max_size=20)).encode()))
    return b"".join(frames)


@settings(max_examples=300, deadline=None)
@given(data=_conversations(), chunks=st.lists(st.integers(1, 64), max_size=20))
def test_we_agree_with_wsproto_on_conversations(data: bytes, chunks: list[int]) -> None:
    assert ours(data, chunks) == reference(data, chunks)


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(_frames, max_size=8),
    chunks=st.lists(st.integers(1, 64), max_size=20),
)
def test_we_agree_with_wsproto_on_any_frame_sequence(
    frames: list[bytes], chunks: list[int]
) -> None:
    data = b"".join(frames)
    assert ours(data, chunks) == reference(data, chunks)


@settings(max_examples=200, deadline=None)
@given(
    texts=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 8), max_size=4),
    chunks=st.lists(st.integers(1, 16), max_size=20),
)
def test_we_agree_with_wsproto_on_fragmented_utf8(
    texts: list[str], cuts: list[int], chunks: list[int]
) -> None:
    # One text message cut into fragments at arbitrary byte offsets (maybe mid-character).
    payload = "".join(texts).encode()
    offsets = sorted({min(c, len(payload)) for c in cuts} | {0, len(payload)})
    pieces = [payload[a:b] for a, b in itertools.pairwise(offsets)] or [b""]
    data = b"".join(
        frame(1 if i == 0 else 0, piece, fin=i == len(pieces) - 1) for i, piece in enumerate(pieces)
    )
    assert ours(data, chunks) == reference(data, chunks) == [("message", payload, True)]
