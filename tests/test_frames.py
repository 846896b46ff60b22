"""The sans-IO pieces: server framing and request-head splitting, on plain bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st
from wsproto.frame_protocol import FrameProtocol

from trio_relay import encode_frame
from trio_relay._frames import frame_payload, split_request_head


def _wsproto_server_frame(message: str | bytes) -> bytes:
    """What wsproto (and so trio-websocket) puts on the wire for a server message."""
    return bytes(FrameProtocol(client=False, extensions=[]).send_data(message, fin=True))


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_frames_are_byte_identical_to_wsproto_at_every_length_boundary(size: int) -> None:
    assert encode_frame(b"b" * size) == _wsproto_server_frame(b"b" * size)
    assert encode_frame("t" * size) == _wsproto_server_frame("t" * size)


@given(st.one_of(st.text(), st.binary()))
def test_frames_are_byte_identical_to_wsproto_for_any_message(message: str | bytes) -> None:
    assert encode_frame(message) == _wsproto_server_frame(message)


def test_frame_payload_frames_encoded_text_without_decoding_it() -> None:
    assert frame_payload("é".encode(), text=True) == encode_frame("é")
    assert frame_payload(b"\x00", text=False) == b"\x82\x01\x00"


def test_split_request_head_waits_for_the_blank_line() -> None:
    assert split_request_head(b"GET / HTTP/1.1\r\nHost: x\r\n") is None


def test_split_request_head_keeps_what_follows_the_head() -> None:
    head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert split_request_head(head + b"\x81\x80abcd") == (head, b"\x81\x80abcd")
    assert split_request_head(bytearray(head)) == (head, b"")
