"""lib/protocol.py, sans I/O: request heads, body framing, chunked bodies and responses, checked
with byte literals both ways (the way h11 and websockets test their protocol layers).

Every refusal is checked for its status: the parser decides which 4xx (or 5xx) the transport
answers, so a wrong status here is a wrong answer on the wire.
"""
import calendar
import re
import time

import pytest

from lib.problems import ContentTooLarge, HTTPError
from lib.protocol import (CHUNKED, MAX_CHUNK_LINE, MAX_HEADER_COUNT, MAX_HEADER_LINE,
                          MAX_REQUEST_LINE, ChunkedDecoder, ContentLengthDecoder, ProtocolError, RequestHead,
                          body_length, encode_chunk, encode_head, encode_response, parse_head,
                          status_line, wants_continue)


def refusal(data):
    """The status `parse_head` refuses `data` with (fails if it accepts it)."""
    with pytest.raises(ProtocolError) as caught:
        parse_head(data)
    return caught.value.status


# --- parse_head: what it accepts ----------------------------------------------------------


def test_minimal_http11_head():
    head = parse_head(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert (head.method, head.target, head.path, head.query_string, head.version) == \
        ("GET", "/", "/", "", "HTTP/1.1")
    assert head.headers == {"host": "example.com"}


def test_http10_needs_no_host():
    head = parse_head(b"GET /a HTTP/1.0\r\n\r\n")
    assert (head.version, head.path, head.headers) == ("HTTP/1.0", "/a", {})


def test_query_string_is_split_from_the_path():
    head = parse_head(b"GET /notes?limit=5&tag=a%20b HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (head.path, head.query_string, head.target) == \
        ("/notes", "limit=5&tag=a%20b", "/notes?limit=5&tag=a%20b")


def test_path_stays_percent_encoded():
    # Decoding is Request.from_head's job; the head keeps the target as it came.
    assert parse_head(b"GET /a%2Fb HTTP/1.1\r\nHost: a\r\n\r\n").path == "/a%2Fb"


@pytest.mark.parametrize("target, path, query", [
    ("http://example.com/notes/1?x=1", "/notes/1", "x=1"),
    ("http://example.com", "/", ""),
    ("https://example.com:8443/a/b", "/a/b", ""),
])
def test_absolute_form_target(target, path, query):
    # RFC 9112 §3.2.2: a server must accept the absolute form (proxies send it).
    head = parse_head(b"GET %s HTTP/1.1\r\nHost: example.com\r\n\r\n" % target.encode())
    assert (head.path, head.query_string) == (path, query)


def test_asterisk_form_target():
    head = parse_head(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (head.method, head.path) == ("OPTIONS", "*")


@pytest.mark.parametrize("method", ["PATCH", "get", "PROPFIND", "X-CUSTOM", "M!#$%&'*+.^_`|~"])
def test_any_token_is_a_method(method):
    # RFC 9110 §9.1: a method is a case-sensitive token; the router, not the parser, answers
    # an unknown one (405 or 404).
    head = parse_head(b"%s / HTTP/1.1\r\nHost: a\r\n\r\n" % method.encode())
    assert head.method == method


def test_field_names_are_lower_cased_and_values_keep_their_case():
    head = parse_head(b"GET / HTTP/1.1\r\nHOST: A\r\nX-Request-ID: AbC\r\n\r\n")
    assert head.headers == {"host": "A", "x-request-id": "AbC"}


@pytest.mark.parametrize("line, value", [
    (b"X: v", "v"),
    (b"X:v", "v"),
    (b"X:   v   ", "v"),
    (b"X:\t v \t", "v"),
    (b"X: a  b", "a  b"),          # inner white space is part of the value
    (b"X: a\tb", "a\tb"),
    (b"X:", ""),                   # an empty value is a value
    (b"X:   ", ""),
    (b"X: caf\xc3\xa9", "caf\xc3\xa9"),  # obs-text: kept as latin-1 code points
])
def test_field_value_trims_optional_white_space(line, value):
    head = parse_head(b"GET / HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n\r\n")
    assert head.headers["x"] == value


def test_repeated_field_is_joined_with_comma():
    # RFC 9110 §5.3
    head = parse_head(b"GET / HTTP/1.1\r\nHost: a\r\nAccept: a/b\r\naccept: c/d\r\n"
                      b"Accept: e/f\r\n\r\n")
    assert head.headers["accept"] == "a/b, c/d, e/f"


def test_repeated_cookie_is_joined_with_semicolon():
    # RFC 6265 §5.4: one Cookie header, pairs separated by "; "
    head = parse_head(b"GET / HTTP/1.1\r\nHost: a\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n")
    assert head.headers["cookie"] == "a=1; b=2"


def test_exactly_the_maximum_number_of_fields():
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADER_COUNT - 1))
    head = parse_head(b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n")
    assert len(head.headers) == MAX_HEADER_COUNT


def test_request_line_of_exactly_the_limit():
    prefix, suffix = b"GET /", b" HTTP/1.1"
    target_tail = b"a" * (MAX_REQUEST_LINE - len(prefix) - len(suffix))
    line = prefix + target_tail + suffix
    assert len(line) == MAX_REQUEST_LINE
    assert parse_head(line + b"\r\nHost: a\r\n\r\n").path == "/" + "a" * len(target_tail)


def test_header_line_of_exactly_the_limit():
    line = b"X: " + b"v" * (MAX_HEADER_LINE - 3)
    assert len(line) == MAX_HEADER_LINE
    head = parse_head(b"GET / HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n\r\n")
    assert len(head.headers["x"]) == MAX_HEADER_LINE - 3


# --- parse_head: what it refuses, and with which status ---------------------------------------


@pytest.mark.parametrize("data", [
    pytest.param(b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", id="two-spaces-after-method"),
    pytest.param(b"GET /  HTTP/1.1\r\nHost: a\r\n\r\n", id="two-spaces-after-target"),
    pytest.param(b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", id="trailing-space"),
    pytest.param(b" GET / HTTP/1.1\r\nHost: a\r\n\r\n", id="leading-space"),
    pytest.param(b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", id="tab-separator"),
    pytest.param(b"GET /\r\nHost: a\r\n\r\n", id="no-version-http09"),
    pytest.param(b"GET / \r\nHost: a\r\n\r\n", id="empty-version"),
    pytest.param(b"GET / http/1.1\r\nHost: a\r\n\r\n", id="lowercase-version"),
    pytest.param(b"GET / HTTP/1\r\nHost: a\r\n\r\n", id="version-without-minor"),
    pytest.param(b"GET / HTTP/1.1.1\r\nHost: a\r\n\r\n", id="version-too-long"),
    pytest.param(b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", id="method-not-a-token"),
    pytest.param(b"/ HTTP/1.1\r\nHost: a\r\n\r\n", id="no-method"),
    pytest.param(b"GET / HTTP/1.1\nHost: a\r\n\r\n", id="request-line-ends-with-bare-lf"),
    pytest.param(b"GET / HTTP/1.1\rHost: a\r\n\r\n", id="request-line-ends-with-bare-cr"),
    pytest.param(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", id="empty-line-first"),
    pytest.param(b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n", id="utf8-in-target"),
    pytest.param(b"GET /\xe9 HTTP/1.1\r\nHost: a\r\n\r\n", id="latin1-in-target"),
    pytest.param(b"GET /a\x00b HTTP/1.1\r\nHost: a\r\n\r\n", id="nul-in-target"),
    pytest.param(b"GET /a\x7fb HTTP/1.1\r\nHost: a\r\n\r\n", id="del-in-target"),
    pytest.param(b"GET notes HTTP/1.1\r\nHost: a\r\n\r\n", id="relative-target"),
    pytest.param(b"GET ?x=1 HTTP/1.1\r\nHost: a\r\n\r\n", id="query-only-target"),
    pytest.param(b"", id="empty"),
])
def test_malformed_request_line_is_400(data):
    assert refusal(data) == 400


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/3.0", b"HTTP/0.9"])
def test_unsupported_version_is_505(version):
    assert refusal(b"GET / %s\r\nHost: a\r\n\r\n" % version) == 505


def test_http11_without_host_is_400():
    # RFC 9112 §3.2
    assert refusal(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n") == 400


def test_http11_with_two_host_lines_is_400():
    assert refusal(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n") == 400


def test_target_starting_with_h_but_not_absolute_form_is_400():
    assert refusal(b"GET hello HTTP/1.1\r\nHost: a\r\n\r\n") == 400


@pytest.mark.parametrize("line", [
    pytest.param(b"Host : a", id="space-before-colon"),
    pytest.param(b"Host\t: a", id="tab-before-colon"),
    pytest.param(b"Host a", id="no-colon"),
    pytest.param(b": a", id="empty-name"),
    pytest.param(b"Ho st: a", id="space-in-name"),
    pytest.param(b"Ho(st: a", id="name-not-a-token"),
    pytest.param(b"X: a\x00b", id="nul-in-value"),
    pytest.param(b"X: a\x01b", id="control-char-in-value"),
    pytest.param(b"X: a\x7fb", id="del-in-value"),
    pytest.param(b"X: a\rb", id="bare-cr-in-value"),
    pytest.param(b"X: a\r", id="bare-cr-at-end-of-value"),
])
def test_malformed_field_line_is_400(line):
    assert refusal(b"GET / HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n\r\n") == 400


def test_obsolete_line_folding_is_400():
    # RFC 9112 §5.2: a server must reject obs-fold (or replace it; this one rejects).
    assert refusal(b"GET / HTTP/1.1\r\nHost: a\r\nX: first\r\n second\r\n\r\n") == 400
    assert refusal(b"GET / HTTP/1.1\r\nHost: a\r\nX: first\r\n\tsecond\r\n\r\n") == 400


def test_bare_lf_cannot_smuggle_a_header_line():
    # Read as a line break by a lenient parser, the LF would add "X-Admin: 1"; and with Host
    # only before it, a parser that splits on CRLF alone would see one field. Either way: 400.
    assert refusal(b"GET / HTTP/1.1\r\nHost: a\nX-Admin: 1\r\n\r\n") == 400


@pytest.mark.parametrize("data", [
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\n\r\n", id="bare-lf-ends-field"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n\n", id="bare-lf-ends-head"),
    pytest.param(b"GET / HTTP/1.1\r\n\nHost: a\r\n\r\n", id="bare-lf-empty-line"),
    pytest.param(b"GET / HTTP/1.1\r\nX: 1\nHost: a\r\n\r\n", id="host-smuggled-after-lf"),
])
def test_bare_lf_anywhere_in_the_fields_is_400(data):
    assert refusal(data) == 400


def test_request_line_one_over_the_limit_is_414():
    prefix, suffix = b"GET /", b" HTTP/1.1"
    line = prefix + b"a" * (MAX_REQUEST_LINE + 1 - len(prefix) - len(suffix)) + suffix
    assert len(line) == MAX_REQUEST_LINE + 1
    assert refusal(line + b"\r\nHost: a\r\n\r\n") == 414


def test_long_malformed_request_line_is_414_not_400():
    # Too long is decided before malformed: the client learns the real problem.
    line = b"GET /" + b"\x01" * MAX_REQUEST_LINE + b" HTTP/1.1"
    assert refusal(line + b"\r\nHost: a\r\n\r\n") == 414


@pytest.mark.parametrize("size", [MAX_HEADER_LINE + 1, 3 * MAX_HEADER_LINE])
def test_header_value_over_the_line_limit_is_431(size):
    line = b"X: " + b"v" * size
    assert refusal(b"GET / HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n\r\n") == 431


def test_header_line_one_over_the_limit_is_431():
    line = b"X: " + b"v" * (MAX_HEADER_LINE - 2)
    assert len(line) == MAX_HEADER_LINE + 1
    assert refusal(b"GET / HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n\r\n") == 431


def test_one_field_over_the_count_limit_is_431():
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADER_COUNT))  # + Host = 101
    assert refusal(b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n") == 431


def test_too_many_fields_is_431_even_if_one_is_malformed():
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADER_COUNT)) + b"bad line\r\n"
    assert refusal(b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n") == 431


def test_field_line_of_spaces_is_refused_in_linear_time():
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX:" + b" " * 6000 + b"\x00\r\n\r\n"
    started = time.perf_counter()
    assert refusal(data) == 400
    assert time.perf_counter() - started < 0.05


# --- RequestHead.keep_alive (RFC 9112 §9.3) ------------------------------------------------


@pytest.mark.parametrize("version, connection, keep_alive", [
    ("HTTP/1.1", None, True),
    ("HTTP/1.1", "keep-alive", True),
    ("HTTP/1.1", "close", False),
    ("HTTP/1.1", "Close", False),
    ("HTTP/1.1", "keep-alive, close", False),
    ("HTTP/1.1", "Upgrade, CLOSE", False),
    ("HTTP/1.0", None, False),
    ("HTTP/1.0", "close", False),
    ("HTTP/1.0", "keep-alive", True),
    ("HTTP/1.0", "Keep-Alive", True),
])
def test_keep_alive(version, connection, keep_alive):
    fields = b"Host: a\r\n" + (b"Connection: %s\r\n" % connection.encode() if connection else b"")
    head = parse_head(b"GET / %s\r\n%s\r\n" % (version.encode(), fields))
    assert head.keep_alive is keep_alive


@pytest.mark.parametrize("version, expect, wanted", [
    ("HTTP/1.1", "100-continue", True),
    ("HTTP/1.1", "100-Continue", True),
    ("HTTP/1.1", None, False),
    ("HTTP/1.0", "100-continue", False),   # a 1.0 client does not understand 100
])
def test_wants_continue(version, expect, wanted):
    headers = {"host": "a", **({"expect": expect} if expect else {})}
    assert wants_continue(RequestHead("POST", "/", version, headers)) is wanted


# --- body_length (RFC 9112 §6.3) -------------------------------------------------------------


def framing(version="HTTP/1.1", **fields):
    headers = {name.replace("_", "-"): value for name, value in fields.items()}
    return body_length(RequestHead("POST", "/", version, headers))


def framing_refusal(version="HTTP/1.1", **fields):
    with pytest.raises(HTTPError) as caught:
        framing(version, **fields)
    return caught.value.status


def test_no_framing_means_no_body():
    assert framing() is None


@pytest.mark.parametrize("value, length", [
    ("0", 0), ("5", 5), ("5, 5", 5), ("5,5", 5), ("00012", 12), ("999999999999999999", 10**18 - 1),
])
def test_content_length(value, length):
    assert framing(content_length=value) == length


def test_repeated_content_length_lines_with_one_value():
    head = parse_head(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n")
    assert body_length(head) == 5


def test_repeated_content_length_lines_that_disagree_are_400():
    head = parse_head(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n")
    with pytest.raises(ProtocolError) as caught:
        body_length(head)
    assert caught.value.status == 400


@pytest.mark.parametrize("value", [
    "5, 6", "", "abc", "-1", "+5", "5.0", "0x10", "1e3", "5,", "\xd9\xa3",
    "9" * 19,        # past what an int64 holds: refused, not 413'd after a failed int()
    "1" * 5000,      # past Python's int() digit limit: still a clean 400
])
def test_bad_content_length_is_400(value):
    assert framing_refusal(content_length=value) == 400


@pytest.mark.parametrize("value", ["chunked", "Chunked", "CHUNKED", " chunked "])
def test_chunked_is_case_insensitive(value):
    assert framing(transfer_encoding=value) == CHUNKED


def test_transfer_encoding_with_content_length_is_400():
    # Both framings at once is how request smuggling starts (RFC 9112 §6.3 rule 3).
    assert framing_refusal(transfer_encoding="chunked", content_length="5") == 400


def test_transfer_encoding_in_http10_is_400():
    assert framing_refusal("HTTP/1.0", transfer_encoding="chunked") == 400


@pytest.mark.parametrize("value", ["gzip", "gzip, chunked", "identity", "deflate"])
def test_other_transfer_codings_are_501(value):
    assert framing_refusal(transfer_encoding=value) == 501


# --- ChunkedDecoder (RFC 9112 §7.1) ----------------------------------------------------------

WIKIPEDIA = b"4\r\nWiki\r\n7\r\npedia i\r\nB\r\nn \r\nchunks.\r\n0\r\n\r\n"


def decode(data, limit=1024):
    decoder = ChunkedDecoder(limit)
    decoder.feed(data)
    return decoder


def test_whole_body_at_once():
    decoder = decode(WIKIPEDIA)
    assert decoder.done
    assert decoder.body == b"Wikipedia in \r\nchunks."
    assert decoder.unused == b""


def test_fed_one_byte_at_a_time():
    decoder = ChunkedDecoder(1024)
    for i in range(len(WIKIPEDIA)):
        assert not decoder.done
        decoder.feed(WIKIPEDIA[i:i + 1])
    assert decoder.done
    assert decoder.body == b"Wikipedia in \r\nchunks."


def test_empty_body():
    decoder = decode(b"0\r\n\r\n")
    assert (decoder.done, decoder.body) == (True, b"")


def test_not_done_until_the_final_blank_line():
    decoder = decode(b"3\r\nabc\r\n0\r\n")
    assert not decoder.done
    decoder.feed(b"\r\n")
    assert decoder.done and decoder.body == b"abc"


@pytest.mark.parametrize("size_line", [b"3;name=value", b"3;a;b=\"quoted\"", b"3 ;ext", b"03", b"3\t"])
def test_chunk_extensions_and_size_white_space_are_ignored(size_line):
    assert decode(size_line + b"\r\nabc\r\n0\r\n\r\n").body == b"abc"


def test_hex_sizes_in_either_case():
    assert decode(b"a\r\n" + b"x" * 10 + b"\r\nA\r\n" + b"y" * 10 + b"\r\n0\r\n\r\n").body == \
        b"x" * 10 + b"y" * 10


def test_trailer_fields_are_dropped():
    decoder = decode(b"3\r\nabc\r\n0\r\nExpires: never\r\nX-Checksum: 1\r\n\r\n")
    assert (decoder.done, decoder.body, decoder.unused) == (True, b"abc", b"")


def test_unused_keeps_the_next_pipelined_request():
    following = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    decoder = decode(b"3\r\nabc\r\n0\r\n\r\n" + following)
    assert (decoder.done, decoder.body, decoder.unused) == (True, b"abc", following)


def test_unused_after_byte_by_byte_feeding_then_more():
    decoder = ChunkedDecoder(1024)
    for byte in b"1\r\nz\r\n0\r\n\r\n":
        decoder.feed(bytes([byte]))
    decoder.feed(b"NEXT")
    assert decoder.unused == b"NEXT"


@pytest.mark.parametrize("data", [
    pytest.param(b"x\r\n", id="not-hex"),
    pytest.param(b"-1\r\n", id="negative"),
    pytest.param(b"0x5\r\n", id="0x-prefix"),
    pytest.param(b"\r\n", id="empty-size"),
    pytest.param(b";ext\r\n", id="extension-only"),
    pytest.param(b"+5\r\n", id="plus-sign"),
    pytest.param(b"1" * 16 + b"\r\n", id="size-too-many-digits"),
    pytest.param(b"3\r\nabcX\r\n", id="data-longer-than-size"),
    pytest.param(b"3\r\nabc\n0\r\n\r\n", id="bare-lf-after-data"),
    pytest.param(b"3\r\nabcde", id="no-crlf-after-data"),
])
def test_invalid_chunk_is_400(data):
    with pytest.raises(ProtocolError) as caught:
        decode(data)
    assert caught.value.status == 400


def test_size_line_too_long_is_400_when_fed_in_pieces():
    decoder = ChunkedDecoder(1024)
    with pytest.raises(ProtocolError) as caught:
        for byte in b"3;" + b"e" * MAX_CHUNK_LINE + b"\r\n":
            decoder.feed(bytes([byte]))
    assert caught.value.status == 400


def test_size_line_too_long_is_400_when_fed_at_once():
    with pytest.raises(ProtocolError):
        decode(b"3;" + b"e" * (2 * MAX_CHUNK_LINE) + b"\r\nabc\r\n0\r\n\r\n")


def test_trailer_line_too_long_is_refused_when_fed_at_once():
    with pytest.raises(ProtocolError):
        decode(b"3\r\nabc\r\n0\r\nX: " + b"t" * 100_000 + b"\r\n\r\n")


def test_too_many_trailer_fields_is_431():
    trailers = b"".join(b"T-%d: v\r\n" % i for i in range(MAX_HEADER_COUNT + 1))
    with pytest.raises(ProtocolError) as caught:
        decode(b"0\r\n" + trailers + b"\r\n")
    assert caught.value.status == 431


def test_body_of_exactly_the_limit():
    assert decode(b"5\r\nabcde\r\n0\r\n\r\n", limit=5).body == b"abcde"


def test_over_the_limit_is_413_as_soon_as_the_size_line_says_so():
    decoder = ChunkedDecoder(5)
    decoder.feed(b"3\r\nabc\r\n")
    with pytest.raises(ContentTooLarge) as caught:
        decoder.feed(b"3\r\n")        # 6 declared > 5: refused before any of its data arrives
    assert caught.value.status == 413


def test_one_huge_declared_chunk_is_413_before_its_data():
    with pytest.raises(ContentTooLarge):
        decode(b"fffffffffffff\r\n", limit=1024 * 1024)


def test_fed_a_byte_at_a_time_and_the_next_request_stays_unused():
    """A transport feeds whatever arrived: the body comes out the same, and what follows it
    (a pipelined request) is left in `unused`."""
    stream = b"4\r\nWiki\r\n11\r\n" + b"p" * 17 + b"\r\n0\r\nT: 1\r\n\r\nGET / HTTP/1.1\r\n"
    decoder = ChunkedDecoder(1024)
    for position in range(len(stream)):
        decoder.feed(stream[position:position + 1])
    assert decoder.done
    assert decoder.body == b"Wiki" + b"p" * 17
    assert decoder.unused == b"GET / HTTP/1.1\r\n"


# --- ContentLengthDecoder (RFC 9112 §6.2) -----------------------------------------------------

def test_length_body_in_pieces_keeps_what_follows():
    decoder = ContentLengthDecoder(10)
    decoder.feed(b"0123")
    assert not decoder.done
    decoder.feed(b"456789GET /")
    assert decoder.done
    assert decoder.body == b"0123456789"
    assert decoder.unused == b"GET /"
    decoder.feed(b" HTTP/1.1")
    assert decoder.unused == b"GET / HTTP/1.1"


def test_length_zero_is_done_at_once():
    decoder = ContentLengthDecoder(0)
    decoder.feed(b"")
    assert decoder.done and decoder.body == b"" and decoder.unused == b""


# --- responses -----------------------------------------------------------------------------

DATE_LINE = re.compile(rb"Date: (Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d "
                       rb"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} "
                       rb"\d\d:\d\d:\d\d GMT\r\n")


def without_date(raw):
    """`raw` with its Date line (checked for its RFC 9110 §5.6.7 shape) taken out: the line
    right after the status line."""
    status_end = raw.index(b"\r\n") + 2
    date = DATE_LINE.match(raw, status_end)
    assert date is not None, raw
    return raw[:status_end] + raw[date.end():]


def test_response_bytes():
    raw = encode_response(200, [("Content-Type", "application/json")], b'{"a":1}')
    assert without_date(raw) == (b"HTTP/1.1 200 OK\r\n"
                                 b"Content-Type: application/json\r\n"
                                 b"Content-Length: 7\r\n"
                                 b"\r\n"
                                 b'{"a":1}')


def test_date_line_is_now():
    raw = encode_response(200, [], b"")
    date = DATE_LINE.search(raw).group(0)[6:-2].decode()
    assert abs(calendar.timegm(time.strptime(date, "%a, %d %b %Y %H:%M:%S GMT")) - time.time()) < 5


def test_empty_body_gets_content_length_zero():
    assert without_date(encode_response(200, [], b"")) == \
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def test_headers_keep_their_order_and_repeats():
    raw = encode_response(201, [("Location", "/a/1"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")], b"")
    assert without_date(raw) == (b"HTTP/1.1 201 Created\r\nLocation: /a/1\r\nSet-Cookie: a=1\r\n"
                                 b"Set-Cookie: b=2\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize("status, line", [
    (204, b"HTTP/1.1 204 No Content\r\n"),
    (304, b"HTTP/1.1 304 Not Modified\r\n"),
    (100, b"HTTP/1.1 100 Continue\r\n"),
    (101, b"HTTP/1.1 101 Switching Protocols\r\n"),
])
def test_no_content_length_and_no_body_on_1xx_204_304(status, line):
    # RFC 9110 §8.6, §6.4.1: these responses never have content.
    raw = encode_response(status, [("ETag", '"1"')], b"ignored")
    assert without_date(raw) == line + b'ETag: "1"\r\n\r\n'


def test_head_gets_the_get_length_and_no_body():
    # RFC 9110 §9.3.2: the same header fields as GET, without the content.
    raw = encode_response(200, [("Content-Type", "text/plain")], b"hello", head_only=True)
    assert without_date(raw) == b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n"


def test_connection_close_when_not_keeping_alive():
    raw = encode_response(400, [], b"x", keep_alive=False)
    assert without_date(raw) == b"HTTP/1.1 400 Bad Request\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"


def test_a_handlers_connection_field_gives_way_to_the_transports_close():
    raw = encode_response(200, [("connection", "keep-alive"), ("X", "1")], b"x", keep_alive=False)
    assert without_date(raw) == b"HTTP/1.1 200 OK\r\nX: 1\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"


def test_no_connection_header_when_keeping_alive():
    assert b"Connection:" not in encode_response(200, [], b"x", keep_alive=True)


@pytest.mark.parametrize("value", [
    "a\r\nSet-Cookie: admin=1", "a\nX: 1", "a\rX: 1", "\r\n", "a\r\n\r\n<html>",
])
def test_line_break_in_a_header_value_is_refused(value):
    # Response splitting: a value with a line break would write header lines of its own.
    with pytest.raises(ValueError):
        encode_response(302, [("Location", value)], b"")


def test_line_break_in_a_header_name_is_refused():
    with pytest.raises(ValueError):
        encode_head(200, [("X\r\nSet-Cookie", "a")], 0)


def test_nul_in_a_header_value_is_refused():
    with pytest.raises(ValueError):
        encode_head(200, [("X", "a\x00b")], 0)


def test_encode_head_without_content_length_for_streams():
    raw = encode_head(200, [("Transfer-Encoding", "chunked")], None)
    assert without_date(raw) == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_encode_head_with_close():
    raw = encode_head(200, [], None, keep_alive=False)
    assert without_date(raw) == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("status, line", [
    (200, b"HTTP/1.1 200 OK\r\n"),
    (201, b"HTTP/1.1 201 Created\r\n"),
    (404, b"HTTP/1.1 404 Not Found\r\n"),
    (405, b"HTTP/1.1 405 Method Not Allowed\r\n"),
    (413, b"HTTP/1.1 413 Content Too Large\r\n"),        # RFC 9110 §15.5.14, not "Request Entity…"
    (414, b"HTTP/1.1 414 URI Too Long\r\n"),             # not "Request-URI Too Long"
    (416, b"HTTP/1.1 416 Range Not Satisfiable\r\n"),
    (422, b"HTTP/1.1 422 Unprocessable Content\r\n"),    # not "Unprocessable Entity"
    (431, b"HTTP/1.1 431 Request Header Fields Too Large\r\n"),
    (505, b"HTTP/1.1 505 HTTP Version Not Supported\r\n"),
    (599, b"HTTP/1.1 599 Status 599\r\n"),               # unregistered: still a valid line
    (299, b"HTTP/1.1 299 Status 299\r\n"),
])
def test_status_lines(status, line):
    assert status_line(status).encode("latin-1") == line


def test_unknown_status_still_encodes_a_whole_response():
    raw = encode_response(599, [], b"x")
    assert without_date(raw) == b"HTTP/1.1 599 Status 599\r\nContent-Length: 1\r\n\r\nx"


@pytest.mark.parametrize("data, chunk", [
    (b"hello", b"5\r\nhello\r\n"),
    (b"x" * 255, b"ff\r\n" + b"x" * 255 + b"\r\n"),     # lower-case hex
    (b"\r\n", b"2\r\n\r\n\r\n"),
    (b"", b"0\r\n\r\n"),                                 # the last chunk ends the body
])
def test_encode_chunk(data, chunk):
    assert encode_chunk(data) == chunk


def test_encoded_chunks_decode_back():
    pieces = [b"a", b"bc" * 300, b"\r\n0\r\n\r\n", b"z"]
    decoder = decode(b"".join(map(encode_chunk, pieces)) + encode_chunk(b""), limit=10_000)
    assert decoder.done and decoder.body == b"".join(pieces)
