"""lib/validation.py: each field type's accept / refuse cases, and `validate`, which reports every
bad field in one 422 (unknown and server-owned fields included) or returns cleaned values."""
import re

import pytest

from lib.problems import ValidationFailed
from lib.validation import (Boolean, Choice, Date, Email, Field, Integer, Invalid, Text, TextList,
                            body_schema, validate)


def refusal(field, value):
    """The message `field` refuses `value` with."""
    with pytest.raises(Invalid) as caught:
        field.check(value)
    return str(caught.value)


def errors_of(data, fields, **kw):
    """`validate`'s errors as {field: message}."""
    with pytest.raises(ValidationFailed) as caught:
        validate(data, fields, **kw)
    assert caught.value.status == 422
    return {e["field"]: e["message"] for e in caught.value.errors}


# --- Text ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, cleaned", [
    (Text(), "hello", "hello"),
    (Text(), "  padded \t\n", "padded"),
    (Text(), "", ""),
    (Text(strip=False), "  kept  ", "  kept  "),
    (Text(lower=True), "MiXeD", "mixed"),
    (Text(1, 5), "héllo", "héllo"),                       # characters, not bytes
    (Text(1, 5), "  abc", "abc"),                         # trimmed
    (Text(pattern=r"[a-z]+"), "abc", "abc"),
    (Text(), "emoji 🎉", "emoji 🎉"),
])
def test_text_accepts(field, value, cleaned):
    assert field.check(value) == cleaned


@pytest.mark.parametrize("field, value, message", [
    (Text(), 5, "must be a string"),
    (Text(), ["a"], "must be a string"),
    (Text(), True, "must be a string"),
    (Text(1), "", "must not be empty"),
    (Text(1), "   ", "must not be empty"),                # blank after trimming
    (Text(3), "ab", "must be at least 3 characters"),
    (Text(0, 3), "abcd", "must be at most 3 characters"),
    (Text(0, 3), " abc ", "must be at most 3 characters"),   # as sent: the schema's maxLength
    (Text(pattern=r"[a-z]+"), "abc1", "must match [a-z]+"),
    (Text(pattern=r"[a-z]+", pattern_text="lower-case letters only"), "A", "lower-case letters only"),
    (Text(), "\ud800", "must be Unicode text (a lone surrogate such as \\ud800 is not)"),
    (Text(), None, "must not be null"),
])
def test_text_refuses(field, value, message):
    assert refusal(field, value) == message


def test_pattern_must_match_the_whole_value():
    assert refusal(Text(pattern=r"[a-z]+"), "abc def") == "must match [a-z]+"


def test_nullable_field_takes_null():
    assert Text(nullable=True).check(None) is None
    assert Integer(nullable=True).check(None) is None


# --- Integer, Boolean, Choice, Date ----------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    (Integer(), 0), (Integer(), -5), (Integer(), 10**30),
    (Integer(1, 10), 1), (Integer(1, 10), 10), (Integer(minimum=0), 7), (Integer(maximum=0), -7),
])
def test_integer_accepts(field, value):
    assert field.check(value) == value


@pytest.mark.parametrize("value", [5.0, -910.0, 0.0, -0.0, 2.0 ** 53 - 1])
def test_integer_accepts_an_integral_number_as_json_schema_does(value):
    cleaned = Integer().check(value)  # JSON has one number type: 5.0 is the integer 5
    assert cleaned == value and type(cleaned) is int


@pytest.mark.parametrize("field, value, message", [
    (Integer(), "5", "must be an integer"),
    (Integer(), 5.5, "must be an integer"),
    (Integer(), 2.0 ** 53, "must be an integer"),         # a float may no longer hold it exactly
    (Integer(), -1e300, "must be an integer"),
    (Integer(), float("inf"), "must be an integer"),
    (Integer(), float("nan"), "must be an integer"),
    (Integer(1, 10), 11.0, "must be an integer from 1 to 10"),
    (Integer(), True, "must be an integer"),              # bool is an int in Python, not in JSON
    (Integer(), False, "must be an integer"),
    (Integer(), [1], "must be an integer"),
    (Integer(1, 10), 0, "must be an integer from 1 to 10"),
    (Integer(1, 10), 11, "must be an integer from 1 to 10"),
])
def test_integer_refuses(field, value, message):
    assert refusal(field, value) == message


@pytest.mark.parametrize("value", [True, False])
def test_boolean_accepts(value):
    assert Boolean().check(value) is value


@pytest.mark.parametrize("value", [1, 0, "true", "false", "", [], {}])
def test_boolean_refuses_lookalikes(value):
    assert refusal(Boolean(), value) == "must be true or false"


@pytest.mark.parametrize("value", ["low", "high"])
def test_choice_accepts(value):
    assert Choice(("low", "high")).check(value) == value


@pytest.mark.parametrize("value", ["LOW", " low", "lo", "", 1, ["low"], {"low": 1}])
def test_choice_is_exact(value):
    assert refusal(Choice(("low", "high")), value) == "must be one of: low, high"


def test_choice_from_a_dict_uses_its_keys():
    assert Choice({"low": 0, "high": 1}).check("high") == "high"


@pytest.mark.parametrize("value", [True, 1.0])
def test_choice_of_numbers_is_exact(value):
    refusal(Choice((1, 2, 3)), value)


@pytest.mark.parametrize("value", ["2026-03-01", "2024-02-29", "0001-01-01", "9999-12-31"])
def test_date_accepts(value):
    assert Date().check(value) == value


@pytest.mark.parametrize("value, message", [
    ("2026-02-30", "is not a real calendar date"),
    ("2025-02-29", "is not a real calendar date"),
    ("2026-13-01", "is not a real calendar date"),
    ("0000-01-01", "is not a real calendar date"),
    ("20260301", "must be a date written YYYY-MM-DD"),
    ("2026-3-1", "must be a date written YYYY-MM-DD"),
    ("2026-03-01T10:00:00Z", "must be a date written YYYY-MM-DD"),
    (" 2026-03-01", "must be a date written YYYY-MM-DD"),
    (20260301, "must be a date written YYYY-MM-DD"),
])
def test_date_refuses(value, message):
    assert refusal(Date(), value) == message


def test_date_refuses_non_ascii_digits():
    refusal(Date(), "\u0662\u0660\u0662\u0666-\u0660\u0661-\u0660\u0661")


# --- Email ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value, cleaned", [
    ("ann@example.com", "ann@example.com"),
    ("Ann.Lee@Example.COM", "Ann.Lee@example.com"),      # only the domain is lower-cased
    ("  ann@example.com\n", "ann@example.com"),
    ("a+tag@sub.example.co.uk", "a+tag@sub.example.co.uk"),
    ("o'neil!#$%&*/=?^_`{|}~-@x.io", "o'neil!#$%&*/=?^_`{|}~-@x.io"),
    ("josé@bücher.DE", "josé@bücher.de"),                 # RFC 6531: non-ASCII letters
    ("a@b-c.d", "a@b-c.d"),
    ("a" * 64 + "@example.com", "a" * 64 + "@example.com"),
    ("a@" + "b" * 63 + ".com", "a@" + "b" * 63 + ".com"),
])
def test_email_accepts_and_normalises(value, cleaned):
    assert Email().check(value) == cleaned


@pytest.mark.parametrize("value", [
    "", "ann", "ann@", "@example.com", "ann@example", "ann@localhost",
    "a b@example.com", "ann@exa mple.com", "a..b@example.com", ".ann@example.com",
    "ann.@example.com", "ann@@example.com", "ann@example..com", "ann@.example.com",
    "ann@example.com.", "ann@-example.com", "ann@example-.com", "ann@exa_mple.com",
    "ann@example.123", '"ann"@example.com', "ann@[192.0.2.1]", "ann(comment)@example.com",
    "ann@example.com\x00", "a\u00a0b@example.com", "\ud800@example.com",
    "a" * 65 + "@example.com",                            # local part over 64
    "a@" + "b" * 64 + ".com",                             # label over 63
    "a@" + ".".join(["b" * 60] * 5) + ".com",             # over 254 in all
])
def test_email_refuses(value):
    assert refusal(Email(), value) == "must be an email address like name@example.com"


@pytest.mark.parametrize("typed", [
    "jos\u00e9@example.com",                 # é as one code point (NFC)
    "jose\u0301@example.com",                # e + COMBINING ACUTE ACCENT (NFD)
    "  jose\u0301@EXAMPLE.com ",
])
def test_email_is_one_address_however_its_unicode_is_composed(typed):
    assert Email().check(typed) == "jos\u00e9@example.com"
    assert Email.normalise(typed) == "jos\u00e9@example.com"


def test_email_domain_in_nfd_is_composed_too():
    assert Email().check("ann@bu\u0308cher.DE") == "ann@b\u00fccher.de"


@pytest.mark.parametrize("value", [
    "\uff4a\uff4f\uff45@example.com",        # fullwidth ｊｏｅ
    "joe@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com",   # a fullwidth domain
    "\ufb01nn@example.com",                  # the ligature ﬁ
    "ann\u00b2@example.com",                 # superscript two
])
def test_email_refuses_compatibility_forms_instead_of_folding_them(value):
    assert refusal(Email(), value) == "must be an email address like name@example.com"
    assert Email.normalise(value) is None


def test_email_refuses_a_non_string():
    assert refusal(Email(), 5) == "must be a string"


# --- TextList ------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, cleaned", [
    (TextList(), [], []),
    (TextList(), [" a ", "b"], ["a", "b"]),
    (TextList(), ["a", "b", "a"], ["a", "b"]),             # de-duplicated, first order kept
    (TextList(unique=False), ["a", "a"], ["a", "a"]),
    (TextList(lower=True), ["Work", "WORK", "home"], ["work", "home"]),
    (TextList(max_items=2), ["a", "A"], ["a", "A"]),
])
def test_text_list_accepts(field, value, cleaned):
    assert field.check(value) == cleaned


@pytest.mark.parametrize("field, value, message", [
    (TextList(), "a", "must be a list of strings"),
    (TextList(), {"a": 1}, "must be a list of strings"),
    (TextList(), ["a", 5], "item 1 must be a string"),
    (TextList(), ["a", " "], "item 1 must not be empty"),
    (TextList(item_max=3), ["abcd"], "item 0 must be at most 3 characters"),
    (TextList(max_items=2), ["a", "b", "c"], "must have at most 2 items"),
    (TextList(max_items=2), ["a", "a", "b"], "must have at most 2 items"),  # as sent: duplicates count
])
def test_text_list_refuses(field, value, message):
    assert refusal(field, value) == message


@pytest.mark.parametrize("items", [
    pytest.param([f"tag{i}" for i in range(3000)], id="distinct"),
    pytest.param(["tag"] * 100_000, id="one-repeated"),   # ten once de-duplicated
])
def test_text_list_refuses_a_long_list_before_looking_at_any_item(items):
    field = TextList(max_items=10, lower=True)
    cleaned = []
    original = field.item.clean
    field.item.clean = lambda value: cleaned.append(value) or original(value)
    assert refusal(field, items) == "must have at most 10 items"
    assert cleaned == []


# --- validate ------------------------------------------------------------------------------

NOTE = {
    "title": Text(1, 20, required=True),
    "body": Text(0, 100, default=""),
    "pinned": Boolean(default=False),
    "tags": TextList(default=list),
    "due": Date(nullable=True),
}
SERVER_OWNED = {"id", "owner", "created_at"}


def test_valid_body_is_cleaned_and_defaults_filled():
    assert validate({"title": "  Shop  ", "due": "2026-03-01"}, NOTE) == {
        "title": "Shop", "body": "", "pinned": False, "tags": [], "due": "2026-03-01"}


def test_optional_field_without_default_is_left_out():
    assert "due" not in validate({"title": "t"}, NOTE)


def test_callable_default_is_called_each_time():
    first, second = validate({"title": "a"}, NOTE), validate({"title": "b"}, NOTE)
    assert first["tags"] == [] and first["tags"] is not second["tags"]


def test_given_value_wins_over_default():
    assert validate({"title": "t", "pinned": True}, NOTE)["pinned"] is True


def test_null_for_a_nullable_field_is_kept():
    assert validate({"title": "t", "due": None}, NOTE)["due"] is None


def test_missing_required_field():
    assert errors_of({}, NOTE) == {"title": "is required"}


def test_every_bad_field_is_reported_at_once():
    data = {"title": "", "pinned": "yes", "tags": "x", "due": "2026-02-30", "colour": "red",
            "id": 5}
    assert errors_of(data, NOTE, read_only=SERVER_OWNED) == {
        "title": "must not be empty",
        "pinned": "must be true or false",
        "tags": "must be a list of strings",
        "due": "is not a real calendar date",
        "colour": "is not a known field",
        "id": "is set by the server and cannot be changed",
    }


def test_error_detail_names_the_fields():
    with pytest.raises(ValidationFailed) as caught:
        validate({"pinned": 1}, NOTE)
    assert caught.value.detail.startswith("invalid fields: ")
    assert sorted(caught.value.detail.removeprefix("invalid fields: ").split(", ")) == ["pinned", "title"]
    problem = caught.value.to_problem()
    assert problem["status"] == 422 and problem["title"] == "Unprocessable Content"
    assert sorted(problem["errors"], key=lambda e: e["field"]) == [
        {"field": "pinned", "message": "must be true or false"},
        {"field": "title", "message": "is required"}]


@pytest.mark.parametrize("name", ["owner", "created_at", "id"])
def test_read_only_field_is_422_even_with_a_plausible_value(name):
    # Mass assignment: a client must not set what the server owns.
    assert errors_of({"title": "t", name: "someone-else"}, NOTE, read_only=SERVER_OWNED) == \
        {name: "is set by the server and cannot be changed"}


def test_unknown_field_is_422_not_ignored():
    assert errors_of({"title": "t", "Title": "x"}, NOTE) == {"Title": "is not a known field"}


def test_null_for_a_non_nullable_field():
    assert errors_of({"title": None}, NOTE) == {"title": "must not be null"}


def test_partial_checks_only_the_given_fields():
    assert validate({"pinned": True}, NOTE, partial=True) == {"pinned": True}


def test_partial_empty_body_is_valid_and_empty():
    assert validate({}, NOTE, partial=True) == {}


def test_partial_still_checks_given_values_unknown_and_read_only():
    assert errors_of({"title": "", "x": 1, "owner": "b"}, NOTE, partial=True,
                     read_only=SERVER_OWNED) == {
        "title": "must not be empty",
        "x": "is not a known field",
        "owner": "is set by the server and cannot be changed"}


# --- the JSON Schema of a declared body (OpenAPI's requestBody) -------------------------------

def test_body_schema_describes_every_field_and_what_is_required():
    fields = {"title": Text(1, 200, required=True),
              "tags": TextList(max_items=10, item_max=30, default=list),
              "pinned": Boolean(default=False),
              "priority": Choice(("low", "high"), nullable=True, default=None),
              "due": Date(nullable=True),
              "stars": Integer(0, 5, description="how much you like it"),
              "email": Email()}
    assert body_schema(fields) == {
        "type": "object", "additionalProperties": False, "required": ["title"],
        "properties": {
            "title": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"\S"},
            "tags": {"type": "array", "maxItems": 10, "default": [],
                     "items": {"type": "string", "minLength": 1, "maxLength": 30, "pattern": r"\S"}},
            "pinned": {"type": "boolean", "default": False},
            "priority": {"enum": ["low", "high", None], "default": None},
            "due": {"type": ["string", "null"], "format": "date"},
            "stars": {"type": "integer", "minimum": 0, "maximum": 5,
                      "description": "how much you like it"},
            "email": {"type": "string", "format": "email", "maxLength": 254}}}


def test_a_computed_default_is_not_shown():
    field = Text(3, 3, default=lambda: "EUR")  # e.g. a server setting: it may differ per run
    assert "default" not in field.schema()


def test_a_partial_body_requires_nothing():
    schema = body_schema({"title": Text(1, 200, required=True), "pinned": Boolean(default=False)},
                         partial=True)
    assert "required" not in schema
    assert schema["properties"] == {"title": {"type": "string", "minLength": 1, "maxLength": 200,
                                              "pattern": r"\S"},
                                    "pinned": {"type": "boolean"}}  # PATCH fills in no default


def test_schema_pattern_is_anchored_like_the_check():
    field = Text(3, 3, strip=False, pattern="[A-Z]{3}")
    pattern = field.schema()["pattern"]
    assert pattern == "^(?:[A-Z]{3})$"
    for value in ("USD", "usd", "USDX", "XUSD", " USD"):  # JSON Schema searches; anchors make it whole
        assert bool(re.search(pattern, value)) == accepts(field, value), value


def schema_accepts(schema, value):
    """Whether a string `value` is valid by a Text's schema (the keywords a Text uses)."""
    patterns = [schema.get("pattern", "")] + [part["pattern"] for part in schema.get("allOf", [])]
    return (schema["minLength"] <= len(value) <= schema["maxLength"]
            and all(re.search(pattern, value) for pattern in patterns))


@pytest.mark.parametrize("field, values", [
    (Text(1, 20), ["a", " a ", "", " ", "\t\n", "\u3000", "\x1c"]),  # Python's strip: \x1c is space
    (Text(2, 20), ["ab", " a b ", "a", " a ", "  a  ", "a\u3000"]),
    (Text(3, 20), ["abc", " a b", " ab ", "a  "]),
    (Text(0, 20), ["", " ", "a", "a" + " " * 20]),  # maxLength counts the text as sent
    (Text(1, 20, strip=False), [" ", "a"]),
    (Text(3, 20, pattern="[A-Z]{3}"), ["USD", " USD ", "usd", "US", " US "]),
])
def test_the_schema_of_trimmed_text_accepts_what_clean_accepts(field, values):
    for value in values:  # white space alone or around too short a text is refused: says so
        assert schema_accepts(field.schema(), value) == accepts(field, value), repr(value)


def accepts(field, value):
    try:
        field.clean(value)
    except Invalid:
        return False
    return True


def test_a_custom_field_without_a_shape_accepts_any_value_in_the_schema():
    class Anything(Field):
        pass

    assert body_schema({"x": Anything(description="free-form")})["properties"] == {
        "x": {"description": "free-form"}}
