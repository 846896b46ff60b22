"""Specification of the ``trio-relay.v1`` envelope codec (``trio_relay._envelope``).

Determinism rules for this module:

* The codec is sans-IO: every test calls plain functions on bytes, with no trio, no clock and
  no network, so nothing here depends on scheduling or time.
* Relay frames are checked by parsing them back with ``json.loads`` and comparing the whole
  dictionary, so a missing, extra or renamed field fails the test.
* Client frames are built the way a client builds them: ``json.dumps`` of a dict, encoded as
  UTF-8.
* The property tests are plain synchronous hypothesis tests; the known crashing inputs found
  by hand are pinned as explicit examples, since random bytes do not reach them.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from trio_relay._envelope import (
    MAX_ID_LENGTH,
    SUBPROTOCOL,
    EnvelopeError,
    PublishRequest,
    encode_ack,
    encode_error,
    encode_gap,
    encode_message,
    parse_client_frame,
)

TOPIC = "news"


def frame(**fields: Any) -> bytes:
    """The bytes of a client's JSON text frame with these fields."""
    return json.dumps(fields).encode("utf-8")


def parse(data: bytes, *, text: bool = True, topic: str = TOPIC) -> PublishRequest:
    return parse_client_frame(data, text=text, topic=topic)


def rejection(data: bytes, *, text: bool = True, topic: str = TOPIC) -> EnvelopeError:
    """The EnvelopeError that parsing ``data`` raises."""
    with pytest.raises(EnvelopeError) as caught:
        parse_client_frame(data, text=text, topic=topic)
    return caught.value


def test_the_subprotocol_name_is_trio_relay_v1() -> None:
    assert SUBPROTOCOL == "trio-relay.v1"


# --------------------------------------------------------------------------------------------
# Errors: each code and what triggers it
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data", [b"not json", b"", b"{", b'{"type": "publish",}', b"\xff\xfe\xfd"], ids=repr
)
def test_a_frame_that_is_not_json_is_not_json(data: bytes) -> None:
    error = rejection(data)
    assert (error.code, error.detail, error.request_id) == (
        "not-json",
        "the frame is not valid JSON",
        None,
    )


@pytest.mark.parametrize("data", [b"[]", b'"publish"', b"42", b"null", b"true"], ids=repr)
def test_json_that_is_not_an_object_is_a_bad_frame(data: bytes) -> None:
    error = rejection(data)
    assert (error.code, error.detail, error.request_id) == (
        "bad-frame",
        "the frame must be a JSON object",
        None,
    )


@pytest.mark.parametrize(
    "request_id",
    [1.5, True, False, ["m-1"], {"id": 1}, "x" * (MAX_ID_LENGTH + 1)],
    ids=["float", "true", "false", "list", "object", "129-characters"],
)
def test_an_id_of_the_wrong_type_or_length_is_a_bad_frame_without_an_id(
    request_id: object,
) -> None:
    error = rejection(frame(type="publish", id=request_id, text="hello"))
    assert (error.code, error.request_id) == ("bad-frame", None)
    assert error.detail == '"id" must be a string of at most 128 characters or an integer'


def test_an_unreadable_id_is_reported_before_an_unknown_type() -> None:
    error = rejection(frame(type="subscribe", id=2.5))
    assert (error.code, error.request_id) == ("bad-frame", None)


@pytest.mark.parametrize("echo", ["yes", 1, 0, None, []], ids=repr)
def test_an_echo_that_is_not_a_boolean_is_a_bad_frame_with_the_id(echo: object) -> None:
    error = rejection(frame(type="publish", id="m-1", text="hello", echo=echo))
    assert (error.code, error.detail, error.request_id) == (
        "bad-frame",
        '"echo" must be true or false',
        "m-1",
    )


@pytest.mark.parametrize(
    ("fields", "shown"),
    [
        pytest.param({}, "None", id="missing"),
        pytest.param({"type": "subscribe"}, "'subscribe'", id="subscribe"),
        pytest.param({"type": "Publish"}, "'Publish'", id="capitalised"),
        pytest.param({"type": None}, "None", id="null"),
        pytest.param({"type": 1}, "1", id="number"),
    ],
)
def test_a_missing_or_other_type_is_an_unknown_type_with_the_id(
    fields: dict[str, Any], shown: str
) -> None:
    error = rejection(frame(id=7, text="hello", **fields))
    assert (error.code, error.detail, error.request_id) == (
        "unknown-type",
        f'unknown "type": {shown}',
        7,
    )


@pytest.mark.parametrize("topic", ["sport", "", "news/", None, 1], ids=repr)
def test_a_topic_other_than_the_connections_is_a_wrong_topic_with_the_id(topic: object) -> None:
    error = rejection(frame(type="publish", id="m-2", topic=topic, text="hello"))
    assert (error.code, error.request_id) == ("wrong-topic", "m-2")
    assert error.detail == f"this connection publishes to topic 'news', not {topic!r}"


def test_the_topic_is_checked_before_the_payload() -> None:
    error = rejection(frame(type="publish", topic="sport"))
    assert error.code == "wrong-topic"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"text": "a", "binary": "YQ=="}, id="both"),
        pytest.param({}, id="neither"),
    ],
)
def test_a_publish_needs_exactly_one_of_text_and_binary(payload: dict[str, Any]) -> None:
    error = rejection(frame(type="publish", id="m-3", **payload))
    assert (error.code, error.detail, error.request_id) == (
        "bad-payload",
        'a publish frame has exactly one of "text" and "binary"',
        "m-3",
    )


@pytest.mark.parametrize("text", [1, None, ["a"], {"a": 1}, True], ids=repr)
def test_a_text_that_is_not_a_string_is_a_bad_payload_with_the_id(text: object) -> None:
    error = rejection(frame(type="publish", id=3, text=text))
    assert (error.code, error.detail, error.request_id) == (
        "bad-payload",
        '"text" must be a string',
        3,
    )


@pytest.mark.parametrize(
    "binary",
    ["!!!!", "YQ", "YQ=", "YQ==\n", "Y Q==", "YQ==YQ", "\u0080YQ=", 123, None, ["YQ=="]],
    ids=repr,
)
def test_a_binary_that_is_not_base64_is_a_bad_payload_with_the_id(binary: object) -> None:
    error = rejection(frame(type="publish", id="m-4", binary=binary))
    assert (error.code, error.detail, error.request_id) == (
        "bad-payload",
        '"binary" must be base64',
        "m-4",
    )


@pytest.mark.parametrize(
    "data", [b"\x00\xff", b"", frame(type="publish", id="m-5", text="hello")], ids=repr
)
def test_a_binary_websocket_frame_is_a_binary_frame_error_whatever_it_holds(data: bytes) -> None:
    error = rejection(data, text=False)
    assert (error.code, error.request_id) == ("binary-frame", None)
    assert error.detail == 'trio-relay.v1 uses JSON text frames: send {"binary": "<base64>"}'


def test_an_envelope_error_message_is_the_code_and_the_detail() -> None:
    error = EnvelopeError("bad-payload", '"text" must be a string', "m-6")
    assert str(error) == 'bad-payload: "text" must be a string'
    assert (error.code, error.detail, error.request_id) == (
        "bad-payload",
        '"text" must be a string',
        "m-6",
    )


def test_a_text_with_a_lone_surrogate_escape_is_an_envelope_error_with_the_id() -> None:
    error = rejection(b'{"type": "publish", "id": "m-7", "text": "\\ud800"}')
    assert error.request_id == "m-7"


def test_deeply_nested_json_is_an_envelope_error() -> None:
    rejection(b"[" * 100_000)


# --------------------------------------------------------------------------------------------
# Valid publish frames
# --------------------------------------------------------------------------------------------


def test_a_text_publish_gives_its_utf8_bytes_as_a_text_payload() -> None:
    assert parse(frame(type="publish", text="héllo ✓")) == PublishRequest(
        "héllo ✓".encode(), text=True, id=None, echo=True
    )


def test_a_binary_publish_gives_the_base64_decoded_bytes() -> None:
    data = bytes(range(256))
    encoded = base64.b64encode(data).decode("ascii")
    assert parse(frame(type="publish", binary=encoded)) == PublishRequest(
        data, text=False, id=None, echo=True
    )


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param({"text": ""}, PublishRequest(b"", True), id="text"),
        pytest.param({"binary": ""}, PublishRequest(b"", False), id="binary"),
    ],
)
def test_an_empty_payload_is_valid(payload: dict[str, str], expected: PublishRequest) -> None:
    assert parse(frame(type="publish", **payload)) == expected


@pytest.mark.parametrize(
    "request_id",
    ["m-17", "", "x" * MAX_ID_LENGTH, 18, 0, -5, 2**63 - 1, -(2**63), None],
    ids=[
        "string",
        "empty",
        "128-characters",
        "int",
        "zero",
        "negative",
        "int64-max",
        "int64-min",
        "null",
    ],
)
def test_an_id_is_a_string_of_at_most_128_characters_or_a_64_bit_integer(
    request_id: object,
) -> None:
    assert parse(frame(type="publish", id=request_id, text="a")).id == request_id


@pytest.mark.parametrize("echo", [False, True])
def test_echo_is_taken_as_given(echo: bool) -> None:
    request = parse(frame(type="publish", text="a", echo=echo))
    assert request.echo is echo


def test_echo_defaults_to_true() -> None:
    assert parse(frame(type="publish", text="a")).echo is True


@pytest.mark.parametrize("topic", ["news", "", "a/b"])
def test_a_topic_equal_to_the_connections_is_accepted(topic: str) -> None:
    request = parse(frame(type="publish", topic=topic, id=1, text="a"), topic=topic)
    assert request == PublishRequest(b"a", text=True, id=1, echo=True)


def test_the_protocol_examples_parse() -> None:
    assert parse(b'{"type": "publish", "id": "m-17", "text": "hello"}') == PublishRequest(
        b"hello", True, "m-17", True
    )
    assert parse(
        b'{"type": "publish", "id": 18, "binary": "AAEC", "echo": false}'
    ) == PublishRequest(b"\x00\x01\x02", False, 18, False)


# --------------------------------------------------------------------------------------------
# Relay frames
# --------------------------------------------------------------------------------------------


def test_a_text_message_frame_carries_the_decoded_text() -> None:
    body = encode_message("news", 42, "héllo".encode(), text=True)
    assert json.loads(body) == {"type": "message", "topic": "news", "seq": 42, "text": "héllo"}


def test_a_binary_message_frame_carries_base64() -> None:
    body = encode_message("news", 43, b"\x00\x01\x02", text=False)
    assert json.loads(body) == {"type": "message", "topic": "news", "seq": 43, "binary": "AAEC"}


def test_an_empty_binary_message_has_an_empty_base64_string() -> None:
    body = encode_message("", 1, b"", text=False)
    assert json.loads(body) == {"type": "message", "topic": "", "seq": 1, "binary": ""}


def test_relay_frames_are_compact_utf8_json() -> None:
    assert encode_message("news", 1, "é".encode(), text=True) == (
        '{"type":"message","topic":"news","seq":1,"text":"é"}'.encode()
    )


def test_an_ack_carries_the_delivery_report_and_the_id() -> None:
    body = encode_ack("news", 42, "m-17", queued=3, dropped=1, evicted=2)
    assert json.loads(body) == {
        "type": "ack",
        "topic": "news",
        "seq": 42,
        "id": "m-17",
        "queued": 3,
        "dropped": 1,
        "evicted": 2,
    }


def test_an_ack_keeps_an_integer_id_an_integer() -> None:
    assert json.loads(encode_ack("news", 1, 18, 0, 0, 0))["id"] == 18


def test_an_ack_without_an_id_has_no_id_field() -> None:
    assert json.loads(encode_ack("news", 5, None, 0, 0, 0)) == {
        "type": "ack",
        "topic": "news",
        "seq": 5,
        "queued": 0,
        "dropped": 0,
        "evicted": 0,
    }


def test_a_gap_names_the_topic_since_and_first() -> None:
    assert json.loads(encode_gap("news", 10, 25)) == {
        "type": "gap",
        "topic": "news",
        "since": 10,
        "first": 25,
        "reset": False,
    }
    # Of another numbering (epoch) than the client's: a reset, whatever the numbers say.
    assert json.loads(encode_gap("news", 10, 25, "0a1b2c3d", reset=True)) == {
        "type": "gap",
        "topic": "news",
        "since": 10,
        "first": 25,
        "epoch": "0a1b2c3d",
        "reset": True,
    }
    assert json.loads(encode_gap("news", 10, 1))["reset"] is True  # beyond the numbering


def test_an_error_carries_the_code_detail_and_id() -> None:
    body = encode_error("bad-payload", '"binary" must be base64', "m-17")
    assert json.loads(body) == {
        "type": "error",
        "code": "bad-payload",
        "detail": '"binary" must be base64',
        "id": "m-17",
    }


def test_an_error_without_an_id_has_no_id_field() -> None:
    assert json.loads(encode_error("not-json", "the frame is not valid JSON")) == {
        "type": "error",
        "code": "not-json",
        "detail": "the frame is not valid JSON",
    }


def test_an_envelope_error_encodes_as_the_error_frame_a_client_gets() -> None:
    error = rejection(frame(type="publish", id=9, text=1))
    assert json.loads(encode_error(error.code, error.detail, error.request_id)) == {
        "type": "error",
        "code": "bad-payload",
        "detail": '"text" must be a string',
        "id": 9,
    }


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
"""Any JSON value."""

frame_fields = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["publish", "message", None]) | json_values,
        "text": st.text() | json_values,
        "binary": st.binary().map(lambda b: base64.b64encode(b).decode()) | json_values,
        "id": st.text(max_size=130) | st.integers() | json_values,
        "echo": st.booleans() | json_values,
        "topic": st.sampled_from([TOPIC, "other"]) | json_values,
    },
)
"""Objects with the fields of a publish frame, each valid or not."""

client_bytes = st.one_of(
    st.binary(),
    json_values.map(lambda value: json.dumps(value).encode()),
    frame_fields.map(lambda fields: json.dumps(fields).encode()),
    frame_fields.map(lambda fields: json.dumps(fields, ensure_ascii=False).encode()),
)


@settings(max_examples=300)
@given(data=client_bytes, text=st.booleans())
def test_property_any_bytes_give_a_publish_request_or_an_envelope_error(
    data: bytes, text: bool
) -> None:
    try:
        result = parse_client_frame(data, text=text, topic=TOPIC)
    except EnvelopeError as error:
        assert error.code in {
            "not-json",
            "bad-frame",
            "unknown-type",
            "wrong-topic",
            "bad-payload",
            "binary-frame",
        }
        assert error.request_id is None or isinstance(error.request_id, str | int)
    else:
        assert isinstance(result, PublishRequest)
        assert text


request_ids = st.none() | st.text(max_size=MAX_ID_LENGTH) | st.integers(-(2**63), 2**63 - 1)
topics = st.sampled_from(["", "news", "a/b", "x" * 200])


@given(
    payload=st.text() | st.binary(),
    request_id=request_ids,
    echo=st.none() | st.booleans(),
    topic=topics,
    name_the_topic=st.booleans(),
    ensure_ascii=st.booleans(),
)
def test_property_a_client_frame_round_trips(
    payload: str | bytes,
    request_id: str | int | None,
    echo: bool | None,
    topic: str,
    name_the_topic: bool,
    ensure_ascii: bool,
) -> None:
    fields: dict[str, Any] = {"type": "publish"}
    if isinstance(payload, str):
        fields["text"] = payload
    else:
        fields["binary"] = base64.b64encode(payload).decode("ascii")
    if request_id is not None:
        fields["id"] = request_id
    if echo is not None:
        fields["echo"] = echo
    if name_the_topic:
        fields["topic"] = topic
    data = json.dumps(fields, ensure_ascii=ensure_ascii).encode("utf-8")

    request = parse_client_frame(data, text=True, topic=topic)

    expected_payload = payload.encode("utf-8") if isinstance(payload, str) else payload
    assert request == PublishRequest(
        expected_payload,
        text=isinstance(payload, str),
        id=request_id,
        echo=True if echo is None else echo,
    )


@given(
    topic=topics,
    seq=st.integers(min_value=1, max_value=2**63),
    payload=st.text() | st.binary(),
)
def test_property_a_message_frame_gives_back_the_topic_seq_and_payload(
    topic: str, seq: int, payload: str | bytes
) -> None:
    if isinstance(payload, str):
        body = encode_message(topic, seq, payload.encode("utf-8"), text=True)
        expected = {"type": "message", "topic": topic, "seq": seq, "text": payload}
    else:
        body = encode_message(topic, seq, payload, text=False)
        expected = {
            "type": "message",
            "topic": topic,
            "seq": seq,
            "binary": base64.b64encode(payload).decode("ascii"),
        }
    decoded = json.loads(body.decode("utf-8"))
    assert decoded == expected
    if "binary" in decoded:
        assert base64.b64decode(decoded["binary"], validate=True) == payload
