"""level05/chat.py's WebSocket codec and handshake as the pure functions a later project imports
(an API gateway proxying WebSockets): byte literals both ways, the RFC's own examples first.
The server's behaviour is tested black-box in test_chat.py; this file holds the importable API
to its contract, the way tests/lib tests lib.
"""
import pytest

from level05.chat import (CloseCode, Closed, Frame, InvalidData, Message, MessageTooBig, Opcode,
                          ProtocolError, ServerProtocol, State, accept_key, check_handshake,
                          encode_close, encode_frame, parse_close, parse_frame)
from lib import HTTPError

MASK = bytes([0x37, 0xFA, 0x21, 0x3D])

# RFC 6455 §5.7, "Examples".
RFC_EXAMPLES = [
    (Frame(Opcode.TEXT, b"Hello"), None, bytes([0x81, 0x05, 0x48, 0x65, 0x6C, 0x6C, 0x6F])),
    (Frame(Opcode.TEXT, b"Hello"), MASK,
     bytes([0x81, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58])),
    (Frame(Opcode.TEXT, b"Hel", fin=False), None, bytes([0x01, 0x03, 0x48, 0x65, 0x6C])),
    (Frame(Opcode.CONTINUATION, b"lo"), None, bytes([0x80, 0x02, 0x6C, 0x6F])),
    (Frame(Opcode.PING, b"Hello"), None, bytes([0x89, 0x05, 0x48, 0x65, 0x6C, 0x6C, 0x6F])),
    (Frame(Opcode.PONG, b"Hello"), MASK,
     bytes([0x8A, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58])),
    (Frame(Opcode.BINARY, bytes(256)), None, bytes([0x82, 0x7E, 0x01, 0x00]) + bytes(256)),
    (Frame(Opcode.BINARY, bytes(65536)), None,
     bytes([0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0]) + bytes(65536)),
]


@pytest.mark.parametrize("frame, mask, data", RFC_EXAMPLES)
def test_the_rfc_examples_both_ways(frame, mask, data):
    assert encode_frame(frame, mask) == data
    assert parse_frame(data + b"next", max_size=1 << 20, masked=mask is not None) == (frame, len(data))


@pytest.mark.parametrize("frame, mask, data", RFC_EXAMPLES)
def test_a_partial_frame_needs_more(frame, mask, data):
    for cut in range(len(data)):
        if cut in (0, 1, 2, 3, 5, 9, len(data) - 1):
            assert parse_frame(data[:cut], max_size=1 << 20, masked=mask is not None) is None


@pytest.mark.parametrize("data, error", [
    (b"\x81\x05Hello", ProtocolError),                          # a client frame, unmasked
    (b"\xc1\x80" + MASK, ProtocolError),                        # RSV1
    (b"\x83\x80" + MASK, ProtocolError),                        # opcode 0x3
    (b"\x09\x80" + MASK, ProtocolError),                        # a ping without FIN
    (b"\x89\xfe\x00\x7e" + MASK, ProtocolError),                # a ping of 126 bytes
    (b"\x82\xff\x80\x00\x00\x00\x00\x00\x00\x00", ProtocolError),   # 64-bit length, top bit set
    (b"\x82\xfe\x04\x01" + MASK, MessageTooBig),               # 1025 bytes over a 1024 limit
])
def test_broken_frames_raise_with_their_close_code(data, error):
    with pytest.raises(error) as raised:
        parse_frame(data, max_size=1024)
    assert raised.value.code == {ProtocolError: 1002, MessageTooBig: 1009}[error]


def test_close_payloads():
    assert encode_close(CloseCode.NORMAL, "bye") == b"\x03\xe8bye"
    assert encode_close(CloseCode.NO_STATUS) == b""
    assert len(encode_close(CloseCode.GOING_AWAY, "é" * 100)) <= 125   # cut at a character
    assert parse_close(b"\x03\xe8bye") == (1000, "bye")
    assert parse_close(b"") == (CloseCode.NO_STATUS, "")
    for bad in (b"\x03", b"\x03\xed", b"\x03\xee", b"\x03\xe7", b"\x13\x88"):   # 1, 1005, 1006, 999, 5000
        with pytest.raises(ProtocolError):
            parse_close(bad)
    with pytest.raises(InvalidData):
        parse_close(b"\x03\xe8\xff")


def test_the_handshake():
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="   # §1.3
    good = {"host": "chat.test", "upgrade": "websocket", "connection": "keep-alive, Upgrade",
            "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==", "sec-websocket-version": "13"}
    assert check_handshake("GET", good)["Sec-WebSocket-Accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert check_handshake("GET", {**good, "origin": "http://chat.test"})
    assert check_handshake("GET", {**good, "origin": "https://app.test"}, frozenset({"https://app.test"}))
    for changes, status in (({"upgrade": "h2c"}, 426), ({"sec-websocket-version": "8"}, 426),
                            ({"sec-websocket-key": "c2hvcnQ="}, 400),
                            ({"origin": "https://evil.test"}, 403)):
        with pytest.raises(HTTPError) as refused:
            check_handshake("GET", {**good, **changes})
        assert refused.value.status == status


def masked(opcode, payload, fin=True):
    return encode_frame(Frame(opcode, payload, fin), MASK)


def test_the_protocol_assembles_fragments_answers_pings_and_echoes_close():
    protocol = ServerProtocol(max_message=1024)
    events = protocol.receive_data(masked(Opcode.TEXT, "caf".encode() + b"\xc3", fin=False)
                                   + masked(Opcode.PING, b"p")
                                   + masked(Opcode.CONTINUATION, b"\xa9 !")[:4])
    assert events == [] and protocol.data_to_send() == b"\x8a\x01p"   # the pong, at once
    events = protocol.receive_data(masked(Opcode.CONTINUATION, b"\xa9 !")[4:])
    assert events == [Message("café !")]
    events = protocol.receive_data(masked(Opcode.CLOSE, b"\x03\xe8"))
    assert events == [Closed(1000, "", by_peer=True)]
    assert protocol.data_to_send() == b"\x88\x02\x03\xe8" and protocol.state is State.CLOSED


def test_the_protocol_fails_with_the_code_of_the_broken_rule():
    protocol = ServerProtocol()
    events = protocol.receive_data(masked(Opcode.TEXT, b"ok", fin=False) + masked(Opcode.CONTINUATION, b"\xff"))
    assert events == [Closed(1007, "a text message that is not UTF-8", by_peer=False)]
    assert protocol.data_to_send().startswith(b"\x88") and protocol.state is State.CLOSED
    assert protocol.receive_data(masked(Opcode.TEXT, b"more")) == []   # nothing more is read
