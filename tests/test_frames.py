"""Tests for chatlib.frames: RFC 6455 examples, properties, and agreement with `websockets`.

`websockets` is the reference: its own parser and serializer (the sans-I/O layer under the
chat server) must read what we write, write what we read, and reject what we reject.
"""

from __future__ import annotations

import asyncio
import doctest
import random
import struct

import pytest
import websockets.exceptions
import websockets.frames as ws_frames
import websockets.utils
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from websockets.streams import StreamReader

from chatlib import frames
from chatlib.frames import (
    CloseCode,
    Frame,
    FrameError,
    IncompleteFrame,
    Opcode,
    PayloadTooBig,
    ProtocolError,
    close_payload,
    decode,
    describe,
    encode,
    mask_bytes,
    parse_close,
    read_frame,
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY = bytes.fromhex("37fa213d")  # the masking key of the RFC examples


# --- helpers ------------------------------------------------------------------------------


def ws_parse(data: bytes, *, mask: bool, max_size: int | None = None) -> ws_frames.Frame:
    """Parse one frame with websockets' own parser; assert it consumed exactly ``data``."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()  # so that missing bytes raise EOFError instead of waiting forever
    parser = ws_frames.Frame.parse(reader.read_exact, mask=mask, max_size=max_size)
    try:
        next(parser)
    except StopIteration as done:
        assert not reader.buffer, "websockets left bytes unread"
        return done.value
    raise AssertionError("websockets asked for more data")  # pragma: no cover


def to_ws(frame: Frame) -> ws_frames.Frame:
    return ws_frames.Frame(
        ws_frames.Opcode(frame.opcode), frame.payload, frame.fin, frame.rsv1, frame.rsv2, frame.rsv3
    )


def from_ws(frame: ws_frames.Frame) -> Frame:
    return Frame(
        Opcode(frame.opcode), bytes(frame.data), frame.fin, frame.rsv1, frame.rsv2, frame.rsv3
    )


def payload_of(size: int, seed: int) -> bytes:
    # Hypothesis can't cheaply draw 64 KiB of bytes, so it draws a size and a seed instead.
    return random.Random(seed).randbytes(size)


# Sizes on both sides of every length-encoding boundary: 125/126 (7 bits -> 16 bits) and
# 65535/65536 (16 bits -> 64 bits).
data_sizes = st.one_of(
    st.integers(0, 130),
    st.integers(250, 260),
    st.integers(65530, 65541),
    st.sampled_from([0, 1, 125, 126, 127, 65535, 65536]),
)
mask_keys = st.one_of(st.none(), st.binary(min_size=4, max_size=4))


@st.composite
def valid_frames(draw: st.DrawFn) -> Frame:
    """Any frame RFC 6455 allows without extensions."""
    opcode = draw(st.sampled_from(list(Opcode)))
    if opcode.is_control:
        size, fin = draw(st.integers(0, 125)), True
    else:
        size, fin = draw(data_sizes), draw(st.booleans())
    return Frame(opcode, payload_of(size, draw(st.integers(0, 2**32))), fin)


# --- RFC 6455, section 5.7 ----------------------------------------------------------------

RFC_EXAMPLES = [
    # (description, frame, mask key, bytes on the wire)
    ("unmasked text", Frame(Opcode.TEXT, b"Hello"), None, "81 05 48 65 6c 6c 6f"),
    ("masked text", Frame(Opcode.TEXT, b"Hello"), KEY, "81 85 37 fa 21 3d 7f 9f 4d 51 58"),
    ("first fragment", Frame(Opcode.TEXT, b"Hel", fin=False), None, "01 03 48 65 6c"),
    ("last fragment", Frame(Opcode.CONT, b"lo"), None, "80 02 6c 6f"),
    ("unmasked ping", Frame(Opcode.PING, b"Hello"), None, "89 05 48 65 6c 6c 6f"),
    ("masked pong", Frame(Opcode.PONG, b"Hello"), KEY, "8a 85 37 fa 21 3d 7f 9f 4d 51 58"),
]


@pytest.mark.parametrize(
    "frame, key, wire", [e[1:] for e in RFC_EXAMPLES], ids=[e[0] for e in RFC_EXAMPLES]
)
def test_rfc_examples(frame: Frame, key: bytes | None, wire: str) -> None:
    data = bytes.fromhex(wire)
    assert encode(frame, mask_key=key) == data
    assert decode(data) == (frame, len(data))
    assert decode(data, masked=key is not None) == (frame, len(data))


def test_rfc_256_bytes_binary() -> None:
    payload = bytes(range(256))
    data = encode(Frame(Opcode.BINARY, payload), mask_key=None)
    assert data[:4] == bytes.fromhex("82 7e 01 00")
    assert data[4:] == payload
    assert decode(data) == (Frame(Opcode.BINARY, payload), 4 + 256)


def test_rfc_64_kib_binary() -> None:
    payload = bytes(range(256)) * 256
    data = encode(Frame(Opcode.BINARY, payload), mask_key=None)
    assert data[:10] == bytes.fromhex("82 7f 00 00 00 00 00 01 00 00")
    assert data[10:] == payload
    assert decode(data) == (Frame(Opcode.BINARY, payload), 10 + 65536)


def test_doctests() -> None:
    result = doctest.testmod(frames)
    assert result.attempted > 10
    assert result.failed == 0


# --- encode / decode details --------------------------------------------------------------


def test_frame_normalises_opcode_and_payload() -> None:
    frame = Frame(1, bytearray(b"hi"))  # type: ignore[arg-type]
    assert frame.opcode is Opcode.TEXT
    assert type(frame.payload) is bytes
    assert frame == Frame(Opcode.TEXT, b"hi")
    with pytest.raises(ValueError):
        Frame(3, b"")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Frame(Opcode.BINARY, 5)  # type: ignore[arg-type]


def test_decode_leaves_the_next_frame_alone() -> None:
    first = encode(Frame(Opcode.TEXT, b"one"), mask_key=None)
    second = encode(Frame(Opcode.TEXT, b"two"), mask_key=None)
    frame, used = decode(first + second)
    assert (frame.payload, used) == (b"one", len(first))
    assert decode((first + second)[used:])[0].payload == b"two"


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = bytes.fromhex("818537fa213d7f9f4d5158")
    expected = (Frame(Opcode.TEXT, b"Hello"), 11)
    assert decode(bytearray(data)) == expected
    assert decode(memoryview(data)) == expected


def test_encode_rejects_bad_mask_key() -> None:
    with pytest.raises(ValueError):
        encode(Frame(Opcode.TEXT, b"x"), mask_key=b"abc")
    with pytest.raises(ValueError):
        mask_bytes(b"x", b"abcde")


@pytest.mark.parametrize(
    "frame",
    [
        Frame(Opcode.PING, b"x", fin=False),
        Frame(Opcode.CLOSE, bytes(126)),
        Frame(Opcode.TEXT, b"x", rsv1=True),
        Frame(Opcode.BINARY, b"x", rsv3=True),
    ],
)
def test_encode_refuses_forbidden_frames_unless_told(frame: Frame) -> None:
    with pytest.raises(ProtocolError):
        encode(frame, mask_key=None)
    # check=False writes it anyway (to see how a peer reacts), and decode still rejects it.
    data = encode(frame, mask_key=KEY, check=False)
    with pytest.raises(ProtocolError):
        decode(data)


def test_text_helper() -> None:
    assert frames.text("Hello", mask_key=KEY) == bytes.fromhex("818537fa213d7f9f4d5158")
    assert decode(frames.text("héllo ✓", mask_key=None))[0].payload == "héllo ✓".encode()


@given(payload=st.binary(max_size=300), key=st.binary(min_size=4, max_size=4))
@SETTINGS
def test_mask_bytes_is_the_simple_xor_and_agrees_with_websockets(payload, key) -> None:
    simple = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    assert mask_bytes(payload, key) == simple
    assert mask_bytes(payload, key) == websockets.utils.apply_mask(payload, key)
    assert mask_bytes(mask_bytes(payload, key), key) == payload


def test_new_mask_key() -> None:
    keys = {frames.new_mask_key() for _ in range(20)}
    assert all(len(k) == 4 for k in keys)
    assert len(keys) > 1


# --- rejecting invalid input --------------------------------------------------------------

INVALID = [
    # (description, bytes, masked expected by the receiver)
    ("reserved opcode 3", "83 00", None),
    ("reserved opcode 0xB", "8b 00", None),
    ("reserved opcode 0xF", "8f 00", None),
    ("RSV1 without extension", "c1 01 41", None),
    ("RSV2", "a1 01 41", None),
    ("RSV3", "91 01 41", None),
    ("fragmented ping", "09 00", None),
    ("fragmented close", "08 00", None),
    ("ping of 126 bytes", "89 7e 00 7e" + "00" * 126, None),
    ("pong announcing 64-bit length", "8a 7f" + "00" * 6 + "00 80" + "00" * 128, None),
    ("unmasked frame to a server", "81 05 48 65 6c 6c 6f", True),
    ("masked frame to a client", "81 85 37 fa 21 3d 7f 9f 4d 51 58", False),
]


@pytest.mark.parametrize("wire, masked", [e[1:] for e in INVALID], ids=[e[0] for e in INVALID])
def test_invalid_frames_rejected_like_websockets(wire: str, masked: bool | None) -> None:
    data = bytes.fromhex(wire)
    with pytest.raises(ProtocolError) as info:
        decode(data, masked=masked)
    assert info.value.close_code == CloseCode.PROTOCOL_ERROR
    # websockets has no "either" mode: parse as the side that would receive this frame.
    ws_mask = masked if masked is not None else bool(data[1] & 0x80)
    with pytest.raises(websockets.exceptions.ProtocolError):
        ws_parse(data, mask=ws_mask)


@pytest.mark.parametrize(
    "wire",
    [
        "81 7e 00 05 48 65 6c 6c 6f",  # 5 in 16 bits
        "81 7e 00 7d" + "00" * 125,  # 125 in 16 bits
        "82 7f 00 00 00 00 00 00 00 05 48 65 6c 6c 6f",  # 5 in 64 bits
        "82 7f 00 00 00 00 00 00 ff ff" + "00" * 65535,  # 65535 in 64 bits
    ],
)
def test_non_minimal_length_rejected(wire: str) -> None:
    # Stricter than websockets (it accepts these): RFC 6455 5.2 says the minimal number of
    # bytes MUST be used.
    with pytest.raises(ProtocolError, match="shortest"):
        decode(bytes.fromhex(wire))


def test_64_bit_length_with_top_bit_rejected() -> None:
    data = bytes.fromhex("82 7f 80 00 00 00 00 00 00 00")
    with pytest.raises(ProtocolError, match="most significant bit"):
        decode(data, max_size=None)


def test_payload_too_big_is_refused_from_the_header_alone() -> None:
    header = bytes.fromhex("82 7f 00 00 00 00 00 10 00 01")  # announces 1 MiB + 1 byte
    with pytest.raises(PayloadTooBig) as info:
        decode(header)  # no payload byte present: refused before buffering any
    assert info.value.close_code == CloseCode.MESSAGE_TOO_BIG
    assert isinstance(info.value, FrameError)
    with pytest.raises(websockets.exceptions.PayloadTooBig):
        ws_parse(header, mask=False, max_size=frames.DEFAULT_MAX_SIZE)


def test_max_size_boundary() -> None:
    data = encode(Frame(Opcode.BINARY, bytes(1000)), mask_key=KEY)
    assert decode(data, max_size=1000)[0].payload == bytes(1000)
    with pytest.raises(PayloadTooBig):
        decode(data, max_size=999)


@st.composite
def raw_frames(draw: st.DrawFn) -> bytes:
    """Arbitrary header bits and lengths, in every length encoding; payload if reasonable."""
    first = draw(st.integers(0, 255))
    mask = draw(st.booleans())
    form = draw(st.sampled_from([7, 16, 64]))
    if form == 7:
        length = draw(st.integers(0, 125))
        header = struct.pack("!BB", first, mask << 7 | length)
    elif form == 16:
        length = draw(st.integers(0, 300) | st.integers(65500, 65535))
        header = struct.pack("!BBH", first, mask << 7 | 126, length)
    else:
        length = draw(
            st.integers(0, 300) | st.integers(65530, 70000) | st.integers(70001, 2**64 - 1)
        )
        header = struct.pack("!BBQ", first, mask << 7 | 127, length)
    key = draw(st.binary(min_size=4, max_size=4)) if mask else b""
    # Huge lengths come without their payload: both parsers must refuse them before.
    payload = payload_of(length, draw(st.integers(0, 2**32))) if length <= 70000 else b""
    return header + key + payload


@given(data=raw_frames(), server_side=st.booleans())
@example(data=bytes.fromhex("89 7e 00 7e") + bytes(126), server_side=False)
@SETTINGS
def test_arbitrary_bytes_judged_like_websockets(data: bytes, server_side: bool) -> None:
    """Whatever websockets rejects, we reject; whatever we accept, websockets reads the same.

    The only frames websockets accepts and we refuse have a length not in its shortest form.
    """
    max_size = 65536 + 16  # below the 70000 bytes of payload_of: every big length is refused
    try:
        theirs: ws_frames.Frame | Exception = ws_parse(data, mask=server_side, max_size=max_size)
    except (websockets.exceptions.ProtocolError, websockets.exceptions.PayloadTooBig) as exc:
        theirs = exc
    try:
        ours: tuple[Frame, int] | Exception = decode(data, max_size=max_size, masked=server_side)
    except FrameError as exc:
        ours = exc

    event(f"websockets: {type(theirs).__name__}, chatlib: {type(ours).__name__}")
    if isinstance(theirs, Exception):
        assert isinstance(ours, FrameError), f"websockets rejects ({theirs}), we accept"
        if isinstance(theirs, websockets.exceptions.PayloadTooBig):
            assert isinstance(ours, (PayloadTooBig, ProtocolError))
    elif isinstance(ours, Exception):
        assert isinstance(ours, ProtocolError) and "shortest" in str(ours), ours
    else:
        assert ours == (from_ws(theirs), len(data))


# --- properties: round trip and cross-checks with websockets ------------------------------


@given(frame=valid_frames(), key=mask_keys, trailing=st.binary(max_size=20))
@SETTINGS
def test_round_trip(frame: Frame, key: bytes | None, trailing: bytes) -> None:
    data = encode(frame, mask_key=key)
    # The header is as short as possible: 2 bytes, + 2 or 8 for the length, + 4 for the key.
    n = len(frame.payload)
    extended = 0 if n <= 125 else 2 if n <= 65535 else 8
    assert len(data) == 2 + extended + (4 if key is not None else 0) + n
    assert decode(data + trailing) == (frame, len(data))
    assert decode(data, masked=key is not None) == (frame, len(data))


@given(frame=valid_frames(), key=mask_keys)
@SETTINGS
def test_websockets_parses_what_we_encode(frame: Frame, key: bytes | None) -> None:
    data = encode(frame, mask_key=key)
    assert from_ws(ws_parse(data, mask=key is not None)) == frame


@given(frame=valid_frames(), mask=st.booleans())
@SETTINGS
def test_we_decode_what_websockets_serializes(frame: Frame, mask: bool) -> None:
    data = to_ws(frame).serialize(mask=mask)
    assert decode(data, masked=mask) == (frame, len(data))
    # websockets picked its own random key: with the same key, our bytes are identical.
    key = None
    if mask:
        n = len(frame.payload)
        offset = 2 + (0 if n <= 125 else 2 if n <= 65535 else 8)
        key = data[offset : offset + 4]
    assert encode(frame, mask_key=key) == data


# --- incomplete input ---------------------------------------------------------------------


def prefixes(data: bytes) -> list[int]:
    """Prefix lengths to try: all of them for small frames, a spread for large ones."""
    if len(data) <= 400:
        return list(range(len(data)))
    return sorted({*range(20), *range(len(data) - 20, len(data)), *range(0, len(data), 997)})


@given(frame=valid_frames(), key=mask_keys)
@SETTINGS
def test_every_strict_prefix_is_incomplete(frame: Frame, key: bytes | None) -> None:
    data = encode(frame, mask_key=key)
    for cut in prefixes(data):
        with pytest.raises(IncompleteFrame) as info:
            decode(data[:cut])
        # `needed` is positive and never reaches into the next frame.
        assert 0 < info.value.needed <= len(data) - cut


@given(frame=valid_frames(), key=mask_keys)
@SETTINGS
def test_needed_leads_to_the_frame_in_at_most_three_steps(frame: Frame, key: bytes | None) -> None:
    data = encode(frame, mask_key=key)
    have = 0
    for _ in range(3):
        try:
            decode(data[:have])
        except IncompleteFrame as exc:
            have += exc.needed
        else:
            break
    assert have == len(data)
    assert decode(data[:have]) == (frame, len(data))


# --- close frames -------------------------------------------------------------------------


def test_close_payload_and_parse_close() -> None:
    payload = close_payload(CloseCode.NORMAL, "bye")
    assert payload == b"\x03\xe8bye"
    code, reason = parse_close(payload)
    assert (code, reason) == (1000, "bye")
    assert code is CloseCode.NORMAL
    assert parse_close(b"") == (None, "")
    assert parse_close(close_payload(4000)) == (4000, "")
    assert parse_close(close_payload(1014, "ü")) == (1014, "ü")  # valid, not in CloseCode


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000])
def test_close_codes_that_must_not_be_sent(code: int) -> None:
    with pytest.raises(ValueError):
        close_payload(code)
    with pytest.raises(ProtocolError):
        parse_close(struct.pack("!H", code))


def test_close_reason_limits() -> None:
    assert len(close_payload(1000, "x" * 123)) == 125
    with pytest.raises(ValueError):
        close_payload(1000, "x" * 124)
    with pytest.raises(ValueError):
        close_payload(1000, "é" * 62)  # 124 bytes of UTF-8
    with pytest.raises(ProtocolError):
        parse_close(b"\x03")
    with pytest.raises(ProtocolError) as info:
        parse_close(b"\x03\xe8\xff")
    assert info.value.close_code == CloseCode.INVALID_DATA


close_payloads = st.binary(max_size=125) | st.builds(
    lambda code, reason: struct.pack("!H", code) + reason.encode(),
    st.integers(990, 5010),
    st.text(max_size=40),
)


@given(payload=close_payloads)
@example(payload=b"\x03\xe8ok")
@SETTINGS
def test_parse_close_agrees_with_websockets(payload: bytes) -> None:
    try:
        theirs: ws_frames.Close | None = ws_frames.Close.parse(payload) if payload else None
    except (websockets.exceptions.ProtocolError, UnicodeDecodeError):
        with pytest.raises(ProtocolError):
            parse_close(payload)
        return
    code, reason = parse_close(payload)
    if theirs is None:
        assert (code, reason) == (None, "")
    else:
        assert (code, reason) == (theirs.code, theirs.reason)
        assert close_payload(code, reason) == theirs.serialize() == payload


@given(code=st.sampled_from(list(CloseCode)) | st.integers(3000, 4999), reason=st.text(max_size=40))
@SETTINGS
def test_close_payload_agrees_with_websockets(code: int, reason: str) -> None:
    assert close_payload(code, reason) == ws_frames.Close(code, reason).serialize()


# --- describe -----------------------------------------------------------------------------


def test_describe_examples() -> None:
    masked_hello = bytes.fromhex("818537fa213d7f9f4d5158")
    assert describe(masked_hello) == (
        "FIN=1 RSV=000 opcode=1 (TEXT) MASK=1 len=5 key=37fa213d payload='Hello'"
    )
    assert describe(masked_hello + b"\x89") == (
        "FIN=1 RSV=000 opcode=1 (TEXT) MASK=1 len=5 key=37fa213d payload='Hello'"
        " (+1 byte(s) after this frame)"
    )
    assert describe(bytes.fromhex("01 03 48 65 6c")) == (
        "FIN=0 RSV=000 opcode=1 (TEXT) MASK=0 len=3 payload='Hel'"
    )
    assert describe(encode(Frame(Opcode.CLOSE, b""), mask_key=None)) == (
        "FIN=1 RSV=000 opcode=8 (CLOSE) MASK=0 len=0 close=(no code)"
    )
    assert describe(bytes.fromhex("82 7e 01 00") + bytes(256)) == (
        "FIN=1 RSV=000 opcode=2 (BINARY) MASK=0 len=256 (16-bit) payload="
        + repr(bytes(32))
        + "...(+224 bytes)"
    )
    assert describe(b"\x81") == "FIN=1 RSV=000 opcode=1 (TEXT) (incomplete header: 1 more byte(s))"
    assert describe(b"") == "(empty: no frame)"
    assert describe(bytes.fromhex("c1 01 41")).endswith(
        "(invalid: RSV bits must be 0: no extension was negotiated)"
    )
    assert describe(bytes.fromhex("81 7e 00 02 68 69")).startswith(
        "FIN=1 RSV=000 opcode=1 (TEXT) MASK=0 len=2 (16-bit) payload='hi' (invalid: length 2"
    )


@given(data=st.binary(max_size=40) | raw_frames())
@SETTINGS
def test_describe_never_raises_and_is_deterministic(data: bytes) -> None:
    text = describe(data)
    assert isinstance(text, str) and "\n" not in text
    assert describe(data) == text


# --- read_frame over a real stream --------------------------------------------------------


async def test_read_frame_reads_exactly_one_frame() -> None:
    reader = asyncio.StreamReader()
    big = Frame(Opcode.BINARY, payload_of(70000, 1))
    reader.feed_data(
        encode(Frame(Opcode.TEXT, b"Hello"), mask_key=None)
        + encode(big, mask_key=None)
        + encode(Frame(Opcode.PING, b""), mask_key=None)
    )
    reader.feed_eof()
    assert await read_frame(reader, masked=False) == Frame(Opcode.TEXT, b"Hello")
    assert await read_frame(reader, masked=False) == big
    assert await read_frame(reader, masked=False) == Frame(Opcode.PING, b"")
    with pytest.raises(asyncio.IncompleteReadError):
        await read_frame(reader)


async def test_read_frame_checks_limits_before_reading_the_payload() -> None:
    reader = asyncio.StreamReader()
    # The header announces 10 MiB but no payload follows: the limit must trip right away,
    # not after waiting for (or buffering) 10 MiB.
    reader.feed_data(bytes.fromhex("82 7f 00 00 00 00 00 a0 00 00"))
    with pytest.raises(PayloadTooBig):
        await asyncio.wait_for(read_frame(reader), 1)


async def test_read_frame_eof_mid_frame() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(bytes.fromhex("81 05 48 65"))
    reader.feed_eof()
    with pytest.raises(EOFError):
        await read_frame(reader)
