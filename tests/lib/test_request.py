"""lib/request.py: what a handler reads, and the 4xx each reader raises by itself (common.md's
table): query parameters, JSON and form bodies, cookies, If-Match / If-None-Match."""
import datetime
import re

import pytest

from lib.problems import HTTPError
from lib.protocol import parse_head
from lib.request import Request, bad_query, utc_timestamp


def with_query(query_string):
    return Request("GET", "/", query_string)


def with_body(body, content_type="application/json", *, has_body=True):
    headers = {"content-type": content_type} if content_type is not None else {}
    return Request("POST", "/", "", headers, body, has_body=has_body)


def refused(call, *args, **kw):
    """The HTTPError `call` raises (fails if it returns)."""
    with pytest.raises(HTTPError) as caught:
        call(*args, **kw)
    return caught.value


def test_from_head_decodes_the_path_and_keeps_the_query():
    head = parse_head(b"GET /files/a%20b%2Fc?x=%20 HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\n")
    request = Request.from_head(head, b"", False, ("127.0.0.1", 5), None)
    assert (request.method, request.path, request.query_string) == ("GET", "/files/a b/c", "x=%20")
    assert request.header("X-A") == request.header("x-a") == "1"
    assert request.header("missing", "d") == "d"
    assert request.client == ("127.0.0.1", 5)


# --- query string ---------------------------------------------------------------------------


@pytest.mark.parametrize("query_string, query", [
    ("", {}),
    ("a=1", {"a": ["1"]}),
    ("tag=a&tag=b&tag=a", {"tag": ["a", "b", "a"]}),
    ("a=&b", {"a": [""], "b": [""]}),                   # blank values are kept
    ("q=a+b%20c%2B", {"q": ["a b c+"]}),
    ("q=%C3%A9", {"q": ["é"]}),
    ("a=1&&b=2&", {"a": ["1"], "b": ["2"]}),
    ("a=1=2", {"a": ["1=2"]}),
    ("a=1;b=2", {"a": ["1;b=2"]}),                       # ";" is not a separator (bpo-42967)
    ("%61=1", {"a": ["1"]}),
])
def test_query(query_string, query):
    assert with_query(query_string).query == query


@pytest.mark.parametrize("query_string", [
    pytest.param("q=%FF", id="not-utf8"),
    pytest.param("q=%C3", id="truncated-utf8"),
    pytest.param("%FF=1", id="not-utf8-name"),
    pytest.param("&".join(f"a{i}=1" for i in range(201)), id="too-many-fields"),
])
def test_malformed_query_is_400(query_string):
    assert refused(lambda: with_query(query_string).query).status == 400


def test_query_param_takes_the_last_value():
    request = with_query("limit=5&limit=7")
    assert request.query_param("limit") == "7"
    assert request.query_param("none", "d") == "d"


@pytest.mark.parametrize("query_string, value", [
    ("", 20), ("limit=", 20), ("limit=1", 1), ("limit=100", 100), ("other=5", 20),
])
def test_query_int(query_string, value):
    assert with_query(query_string).query_int("limit", 20, low=1, high=100) == value


@pytest.mark.parametrize("text", ["0", "-0", "101", "-1", "abc", "1.5", "1e2", "0x10", "9" * 5000])
def test_query_int_out_of_range_or_not_an_int_is_400_naming_it(text):
    error = refused(with_query(f"limit={text}").query_int, "limit", 20, low=1, high=100)
    assert error.status == 400
    assert error.errors == [{"field": "limit", "message": "must be an integer from 1 to 100"}]
    assert "'limit'" in error.detail


@pytest.mark.parametrize("text", ["1_0", "+5", "%205", "5%20", "%D9%A3"])
def test_query_int_refuses_non_canonical_spellings(text):
    refused(with_query(f"limit={text}").query_int, "limit", 20, low=1, high=100)


@pytest.mark.parametrize("query_string, value", [
    ("", "new"), ("sort=", "new"), ("sort=old", "old"), ("sort=new", "new"),
])
def test_query_choice(query_string, value):
    assert with_query(query_string).query_choice("sort", ("new", "old"), "new") == value


@pytest.mark.parametrize("text", ["NEW", "newest", " new", "new,old"])
def test_query_choice_outside_the_choices_is_400_naming_it(text):
    error = refused(with_query(f"sort={text}").query_choice, "sort", ("new", "old"), "new")
    assert error.status == 400
    assert error.errors == [{"field": "sort", "message": "must be one of: new, old"}]


@pytest.mark.parametrize("query_string, value", [
    ("", None), ("done=", None), ("done=true", True), ("done=false", False),
])
def test_query_bool(query_string, value):
    assert with_query(query_string).query_bool("done") is value


@pytest.mark.parametrize("text", ["1", "0", "yes", "True", "FALSE", "on", "t"])
def test_query_bool_accepts_only_json_spelling(text):
    error = refused(with_query(f"done={text}").query_bool, "done")
    assert error.status == 400
    assert error.errors == [{"field": "done", "message": "must be true or false"}]


@pytest.mark.parametrize("text, value", [
    ("2026-03-01", datetime.date(2026, 3, 1)),
    ("2024-02-29", datetime.date(2024, 2, 29)),
    ("0001-01-01", datetime.date(1, 1, 1)),
])
def test_query_date(text, value):
    assert with_query(f"from={text}").query_date("from") == value


def test_query_date_default():
    assert with_query("").query_date("from", "d") == "d"


@pytest.mark.parametrize("text", [
    "2026-02-30", "2025-02-29", "2026-13-01", "2026-00-10", "0000-01-01",
    "20260301", "2026-W09-7", "2026-3-1", "2026-03-01T00:00:00", "2026-03-01Z",
    "%D9%A2%D9%A0%D9%A2%D9%A6-01-01",   # non-ASCII digits
    "yesterday", "2026-03-01%20",
])
def test_query_date_malformed_or_impossible_is_400_naming_it(text):
    error = refused(with_query(f"from={text}").query_date, "from")
    assert error.status == 400
    assert error.errors == [{"field": "from", "message": "must be a real date written YYYY-MM-DD"}]


# --- JSON bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [
    "application/json", "application/json; charset=utf-8", "Application/JSON",
    " application/json ;charset=UTF-8", "application/merge-patch+json", "application/problem+json",
])
def test_json_content_types(content_type):
    assert with_body(b'{"a": [1, "\\u00e9"]}', content_type).json() == {"a": [1, "é"]}


@pytest.mark.parametrize("content_type", [
    None, "", "text/plain", "text/json", "application/x-www-form-urlencoded",
    "application/jsonp", "application/json-seq", "multipart/form-data",
])
def test_wrong_content_type_is_415(content_type):
    assert refused(with_body(b"{}", content_type).json).status == 415


@pytest.mark.parametrize("body", [
    b"{", b"{'a': 1}", b'{"a": 1,}', b" ", b"[1 2]", b'{"a": 1} x', b"undefined",
    b'"unterminated', b"1" * 5000,
])
def test_malformed_json_is_400(body):
    assert refused(with_body(body).json).status == 400


@pytest.mark.parametrize("body", [b'{"a": "\xff"}', b'{"a": "\xc3"}', b'{"\xc0\xaf": 1}'])
def test_body_that_is_not_utf8_is_400(body):
    error = refused(with_body(body).json)
    assert error.status == 400
    assert "UTF-8" in error.detail


def test_encoded_surrogate_is_not_utf8():
    assert refused(with_body(b'{"a": "\xed\xa0\x80"}').json).status == 400


@pytest.mark.parametrize("body", [
    pytest.param('{"a": 1}'.encode("utf-16"), id="utf-16-with-bom"),  # b'\xff\xfe{\x00"…'
    pytest.param('{"a": 1}'.encode("utf-16-be"), id="utf-16-be"),
    pytest.param('{"a": 1}'.encode("utf-32"), id="utf-32-with-bom"),
])
def test_utf16_or_utf32_body_is_400(body):
    assert refused(with_body(body).json).status == 400


@pytest.mark.parametrize("body", [b'{"a": NaN}', b"[Infinity]", b"-Infinity"])
def test_non_json_numbers_are_400(body):
    assert refused(with_body(body).json).status == 400


def test_json_nested_too_deeply_is_400():
    error = refused(with_body(b"[" * 100_000 + b"]" * 100_000).json)
    assert error.status == 400
    assert "nested" in error.detail


def test_json_body_required_without_framing_is_411():
    assert refused(with_body(b"", has_body=False).json).status == 411


def test_json_body_required_but_empty_is_422():
    assert refused(with_body(b"", has_body=True).json).status == 422


def test_empty_body_is_checked_before_the_content_type():
    assert refused(with_body(b"", None, has_body=False).json).status == 411


@pytest.mark.parametrize("has_body", [False, True])
def test_optional_json_body_absent_is_none(has_body):
    assert with_body(b"", has_body=has_body).json(required=False) is None


def test_optional_json_body_present_is_parsed():
    assert with_body(b"[1]").json(required=False) == [1]


def test_utf8_bom_is_tolerated():
    # RFC 8259 §8.1: a parser MAY ignore a byte order mark.
    assert with_body(b'\xef\xbb\xbf{"a": 1}').json() == {"a": 1}


def test_json_object():
    assert with_body(b'{"title": "x"}').json_object() == {"title": "x"}


@pytest.mark.parametrize("body", [b"[]", b'[{"a": 1}]', b'"text"', b"1", b"true", b"false"])
def test_json_object_refuses_anything_but_an_object_with_422(body):
    assert refused(with_body(body).json_object).status == 422


def test_json_object_refuses_null_with_422():
    assert refused(with_body(b"null").json_object).status == 422


def test_json_object_optional_and_absent_is_empty():
    assert with_body(b"", has_body=False).json_object(required=False) == {}


# --- forms ----------------------------------------------------------------------------------

FORM = "application/x-www-form-urlencoded"


@pytest.mark.parametrize("body, form", [
    (b"", {}),
    (b"name=Ann+Lee&email=ann%40example.com", {"name": "Ann Lee", "email": "ann@example.com"}),
    (b"a=1&a=2", {"a": "2"}),                    # last value wins
    (b"a=&b", {"a": "", "b": ""}),
    (b"n=%C3%A9", {"n": "é"}),
])
def test_form(body, form):
    assert with_body(body, FORM).form() == form


def test_form_with_charset_parameter():
    assert with_body(b"a=1", FORM + "; charset=utf-8").form() == {"a": "1"}


@pytest.mark.parametrize("body", [b"n=%FF", b"n=\xff", b"&".join(b"a%d=1" % i for i in range(201))])
def test_malformed_form_is_400(body):
    assert refused(with_body(body, FORM).form).status == 400


@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data", None])
def test_form_with_another_content_type_is_415(content_type):
    assert refused(with_body(b"a=1", content_type).form).status == 415


def test_fields_reads_a_form_or_a_json_object():
    assert with_body(b"a=1", FORM).fields() == {"a": "1"}
    assert with_body(b'{"a": 1}').fields() == {"a": 1}
    assert refused(with_body(b"[1]").fields).status == 422
    assert refused(with_body(b"a=1", "text/plain").fields).status == 415


# --- cookies --------------------------------------------------------------------------------


@pytest.mark.parametrize("header, cookies", [
    (None, {}),
    ("", {}),
    ("sid=abc", {"sid": "abc"}),
    ("a=1; b=2", {"a": "1", "b": "2"}),
    ("a=1;b=2", {"a": "1", "b": "2"}),
    ("sid=first; sid=second", {"sid": "first"}),   # the most specific path comes first
    ('theme="dark"', {"theme": "dark"}),
    ("a=; b=2", {"a": "", "b": "2"}),
    ("a=x=y", {"a": "x=y"}),
    ("flag; a=1", {"a": "1"}),                     # a pair without "=" is skipped
    ("=v; a=1", {"a": "1"}),                       # so is one without a name
    (";;  a=1 ;", {"a": "1"}),
])
def test_cookies(header, cookies):
    headers = {"cookie": header} if header is not None else {}
    assert Request("GET", "/", headers=headers).cookies == cookies


def test_cookies_from_several_cookie_lines():
    head = parse_head(b"GET / HTTP/1.1\r\nHost: a\r\nCookie: a=1\r\nCookie: b=2; a=3\r\n\r\n")
    assert Request.from_head(head, b"", False, ("", 0), None).cookies == {"a": "1", "b": "2"}


# --- conditional requests -------------------------------------------------------------------


def with_header(name, value):
    return Request("PUT", "/", headers={name: value} if value is not None else {})


@pytest.mark.parametrize("header, etag", [
    (None, '"3"'),             # no If-Match: go on (the client did not ask for a check)
    ('"3"', '"3"'),
    (' "3" ', '"3"'),
    ('"1", "3"', '"3"'),
    ('"1","3"', '"3"'),
    ("*", '"3"'),              # "*": any current representation
    (None, None),
])
def test_if_match_passes(header, etag):
    assert with_header("if-match", header).require_if_match(etag) is None


@pytest.mark.parametrize("header, etag", [
    ('"2"', '"3"'),            # stale
    ('"30"', '"3"'),
    ("3", '"3"'),              # unquoted is not the same tag
    ('W/"3"', '"3"'),          # weak tags never match in strong comparison (RFC 9110 §8.8.3.2)
    ('"3"', None),             # nothing there to match
    ("*", None),
])
def test_if_match_fails_with_412(header, etag):
    error = refused(with_header("if-match", header).require_if_match, etag)
    assert error.status == 412


@pytest.mark.parametrize("header, etag, fresh", [
    (None, '"3"', False),
    ('"3"', '"3"', True),
    ('"2"', '"3"', False),
    ('"2", "3"', '"3"', True),
    ('W/"3"', '"3"', True),    # weak comparison (RFC 9110 §13.1.2)
    ('"3"', 'W/"3"', True),
    ("*", '"3"', True),
    ('"3"', None, False),
])
def test_if_none_match(header, etag, fresh):
    assert with_header("if-none-match", header).if_none_match(etag) is fresh


# --- times on the wire and the query's 400 ----------------------------------------------------


@pytest.mark.parametrize("timespec, text", [
    ("seconds", "2026-11-24T06:41:00Z"),
    ("milliseconds", "2026-11-24T06:41:00.123Z"),
    ("microseconds", "2026-11-24T06:41:00.123456Z"),
])
def test_utc_timestamp_is_rfc3339_utc_at_a_fixed_width(timespec, text):
    when = datetime.datetime(2026, 11, 24, 6, 41, 0, 123456, datetime.timezone.utc)
    assert utc_timestamp(when.timestamp(), timespec=timespec) == text
    paris = datetime.timezone(datetime.timedelta(hours=1))
    assert utc_timestamp(when.astimezone(paris), timespec=timespec) == text


def test_utc_timestamp_defaults_to_now():
    before = utc_timestamp(timespec="microseconds")
    now = utc_timestamp()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", now)
    assert before[:19] <= now[:19] <= utc_timestamp(timespec="microseconds")[:19]


def test_bad_query_names_the_parameter():
    error = bad_query("tz", "must be an IANA time zone name")
    assert error.status == 400
    assert error.detail == "query parameter 'tz' must be an IANA time zone name"
    assert error.errors == [{"field": "tz", "message": "must be an IANA time zone name"}]
