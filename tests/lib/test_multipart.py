"""lib.multipart: the multipart/form-data parser, fed byte literals in pieces of every size."""
import random

import pytest
from urllib3 import encode_multipart_formdata

from lib.multipart import MAX_PART_HEAD, MAX_PARTS, PART_END, MultipartParser, Part, boundary
from lib.problems import BadRequest, UnsupportedMediaType

BOUNDARY = b"----b0undary"


def form(*parts, preamble=b"", epilogue=b""):
    """A multipart body of (head lines, content) parts."""
    body = preamble
    for head, content in parts:
        body += b"--" + BOUNDARY + b"\r\n" + b"".join(line + b"\r\n" for line in head) + b"\r\n"
        body += content + b"\r\n"
    return body + b"--" + BOUNDARY + b"--\r\n" + epilogue


def parse(body, pieces=None, boundary_=BOUNDARY):
    """[(Part, content)] of `body` fed in `pieces` (sizes), checking the event order."""
    parser = MultipartParser(boundary_)
    parts, at = [], 0
    sizes = iter(pieces or [len(body)])
    while at < len(body):
        size = next(sizes, len(body))
        for event in parser.feed(body[at:at + size]):
            if isinstance(event, Part):
                parts.append([event, b""])
            elif event is PART_END:
                assert parts and parts[-1][1] is not None, "PART_END without its Part"
                parts[-1][1] = bytes(parts[-1][1])
            else:
                assert isinstance(event, bytes) and event, f"an empty or odd event: {event!r}"
                parts[-1][1] += event
        at += size
    parser.close()
    return [(part, content) for part, content in parts]


CAT = bytes(range(256)) * 40 + b"\r\n--" + BOUNDARY[:-1] + b"\r\n-"  # almost a boundary, twice
BODY = form(([b'Content-Disposition: form-data; name="file"; filename="cat.png"',
              b"Content-Type: image/png"], CAT),
            ([b'Content-Disposition: form-data; name="note"'], b"hello"),
            ([b'Content-Disposition: form-data; name="file"; filename="empty.txt"'], b""),
            preamble=b"ignored preamble\r\n", epilogue=b"ignored epilogue")


def test_a_form_gives_each_part_with_its_head_and_content():
    parts = parse(BODY)
    assert [(p.name, p.filename, p.content_type) for p, _ in parts] == [
        ("file", "cat.png", "image/png"), ("note", None, "text/plain"), ("file", "empty.txt",
                                                                         "text/plain")]
    assert [content for _, content in parts] == [CAT, b"hello", b""]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 13, 64, 1000])
def test_the_same_parts_however_the_body_is_split(size):
    assert parse(BODY, [size] * len(BODY)) == parse(BODY)


def test_random_splits_give_the_same_parts():
    rng = random.Random(7)
    for _ in range(200):
        sizes = [rng.randint(1, 40) for _ in range(len(BODY))]
        assert parse(BODY, sizes) == parse(BODY)


def test_a_large_file_streams_in_constant_memory():
    """10 MiB in 64 KiB pieces: the parser never holds more than a piece and a delimiter."""
    content = bytes(range(256)) * 4096 * 10
    body = form(([b'Content-Disposition: form-data; name="file"; filename="big"'], content))
    parser = MultipartParser(BOUNDARY)
    received, biggest = 0, 0
    for at in range(0, len(body), 65536):
        for event in parser.feed(body[at:at + 65536]):
            if isinstance(event, bytes):
                received += len(event)
        biggest = max(biggest, len(parser.buffer))
    parser.close()
    assert received == len(content)
    assert biggest < len(BOUNDARY) + 8


def test_quoted_names_escapes_and_the_rfc_5987_filename():
    body = form(([b'Content-Disposition: form-data; name="a\\"b"; filename="x\\\\y\\".txt"'],
                 b"1"),
                ([b"Content-Disposition: form-data; name=plain; filename*=UTF-8''caf%C3%A9.txt"],
                 b"2"),
                (['Content-Disposition: form-data; name="f"; filename="naïve.txt"'.encode()],
                 b"3"))
    assert [(p.name, p.filename) for p, _ in parse(body)] == [
        ('a"b', 'x\\y".txt'), ("plain", "café.txt"), ("f", "naïve.txt")]


def test_what_requests_sends_is_read_back_exactly():
    """urllib3's encoder (what requests uses for `files=`) is a real client's wire format."""
    body, content_type = encode_multipart_formdata([
        ("file", ("a b\".png", b"\x89PNG\r\n\x1a\n" + bytes(1000), "image/png")),
        ("field", "value")])
    parts = parse(body, boundary_=boundary(content_type))
    assert [(p.name, p.filename, p.content_type, c[:4]) for p, c in parts] == [
        ("file", "a b%22.png", "image/png", b"\x89PNG"), ("field", None, "text/plain", b"valu")]


@pytest.mark.parametrize("body, problem", [
    (b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nno end",
     "ends before its closing boundary"),
    (b"no boundary at all", "ends before its closing boundary"),
    (form(([b"Content-Type: text/plain"], b"x")), "Content-Disposition"),
    (form(([b'Content-Disposition: attachment; name="a"'], b"x")), "Content-Disposition"),
    (form(([b'Content-Disposition: form-data; filename="a"'], b"x")), "Content-Disposition"),
    (form(([b"Content-Disposition form-data"], b"x")), "malformed multipart header line"),
    (form(([b'Content-Disposition: form-data; name="a'], b"x")), "malformed header parameters"),
    (form(([b'Content-Disposition: form-data; name="\xff"'], b"x")), "not valid UTF-8"),
    (form(([b'Content-Disposition: form-data; name="a"; filename*=utf-8\'\'%FF'], b"x")),
     "not valid UTF-8"),
    (b"--" + BOUNDARY + b"junk\r\n\r\n", "boundary line"),
    (b"--" + BOUNDARY + b"\r\nX: " + b"a" * MAX_PART_HEAD, "head is over"),
    (form(*[([b'Content-Disposition: form-data; name="a"'], b"")] * (MAX_PARTS + 1)),
     f"more than {MAX_PARTS} parts"),
])
def test_malformed_forms_are_a_400_naming_the_fault(body, problem):
    with pytest.raises(BadRequest, match=problem):
        parse(body)


def test_transport_padding_after_a_boundary_is_allowed():
    body = BODY.replace(b"--" + BOUNDARY + b"\r\n", b"--" + BOUNDARY + b" \t \r\n")
    assert parse(body) == parse(BODY)


@pytest.mark.parametrize("content_type, expected", [
    ("multipart/form-data; boundary=abc", b"abc"),
    ('Multipart/Form-Data; charset=utf-8; boundary="a b:c"', b"a b:c"),
    ("multipart/form-data;boundary=" + "x" * 70, b"x" * 70),
])
def test_the_boundary_is_read_from_the_content_type(content_type, expected):
    assert boundary(content_type) == expected


@pytest.mark.parametrize("content_type, error", [
    ("application/json", UnsupportedMediaType),
    ("multipart/mixed; boundary=abc", UnsupportedMediaType),
    ("multipart/form-data", BadRequest),
    ("multipart/form-data; boundary=", BadRequest),
    ("multipart/form-data; boundary=" + "x" * 71, BadRequest),
    ('multipart/form-data; boundary="ends in space "', BadRequest),
    ("multipart/form-data; boundary=a\x00b", BadRequest),
])
def test_a_missing_or_bad_boundary_is_refused(content_type, error):
    with pytest.raises(error):
        boundary(content_type)
