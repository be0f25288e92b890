"""Checking a JSON body against declared fields, naming every bad field at once.

A project declares its fields once, as a dict of field objects, and `validate` returns the
cleaned values or raises one 422 whose `errors` list names *every* problem (common.md), so a
client fixes its request in one round trip instead of one field at a time:

    NOTE = {"title": Text(1, 200, required=True), "tags": TextList(max_items=10, item_max=30),
            "pinned": Boolean(default=False)}
    values = validate(request.json_object(), NOTE, read_only={"id", "created_at"})

What it guards against besides bad values: unknown fields and server-owned fields in a body are
refused (422), never silently ignored or, worse, written — that is how mass assignment bugs
happen (a client sending `"owner": "someone-else"`). `partial=True` is for PATCH: only the
fields given are checked, and nothing is required.

The same declarations describe the body in `GET /openapi.json`: `body_schema(NOTE)` is the JSON
Schema of an object with those fields, each field giving its own (`Field.schema`), so the
documentation cannot drift from what the server really accepts:

    @app.post("/notes", request_schema=body_schema(NOTE))

Cleaning is part of checking: text is trimmed (and must still be long enough), `Choice`s are
exact, dates must exist on the calendar (2026-02-30 is refused), and booleans are real JSON
booleans — `1` and `"true"` are not `true`.
"""
import datetime
import re
import unicodedata

from lib.problems import ValidationFailed

MISSING = object()


class Invalid(Exception):
    """A value failed its field's check; the message says what a valid one looks like."""


class Field:
    """A body field: how to check and clean its value, and how to describe it (JSON Schema,
    https://json-schema.org/draft/2020-12, the dialect of OpenAPI 3.1). A subclass overrides
    `clean` and `shape`; `description` says what the shape cannot (units, formats)."""

    def __init__(self, *, required=False, nullable=False, default=MISSING, description=None):
        self.required = required
        self.nullable = nullable
        self.default = default
        self.description = description

    def shape(self):
        """The JSON Schema of a valid value, without null: {} is any value."""
        return {}

    def schema(self):
        schema = self.shape()
        if self.nullable:
            if "enum" in schema:
                schema["enum"] = [*schema["enum"], None]
            elif "type" in schema:
                schema["type"] = [schema["type"], "null"]
        if isinstance(self.default, type):  # `default=list`: a fresh [] each time
            schema["default"] = self.default()
        elif self.default is not MISSING and not callable(self.default):  # a computed one varies
            schema["default"] = self.default
        if self.description:
            schema["description"] = self.description
        return schema

    def check(self, value):
        if value is None:
            if self.nullable:
                return None
            raise Invalid("must not be null")
        return self.clean(value)

    def clean(self, value):
        return value


def is_unicode_text(text):
    """False for a string holding a lone UTF-16 surrogate: JSON can spell one (`"\\ud800"`) and
    Python decodes it, but it is no character, cannot be written as UTF-8, and sqlite refuses
    to store it (an exception, so a 500, unless it is caught here)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Text(Field):
    def __init__(self, min_length=0, max_length=1000, *, strip=True, pattern=None, lower=False,
                 pattern_text=None, **kw):
        super().__init__(**kw)
        self.min_length = min_length
        self.max_length = max_length
        self.strip = strip
        self.lower = lower
        self.pattern = re.compile(pattern) if pattern else None
        self.pattern_text = pattern_text

    def shape(self):
        schema = {"type": "string", "minLength": self.min_length, "maxLength": self.max_length}
        # JSON Schema patterns are unanchored and see the text as sent; `clean` trims it (white
        # space alone trims to nothing, too short) and then matches the whole of it.
        space = r"\s*" if self.strip else ""
        patterns = [f"^{space}(?:{self.pattern.pattern}){space}$"] if self.pattern else []
        if self.strip and self.min_length:
            patterns.append(r"\S" if self.min_length == 1 else rf"\S[\s\S]{{{self.min_length - 2},}}\S")
        if patterns:
            schema["pattern"] = patterns[0]
        if len(patterns) > 1:  # one `pattern` keyword per schema: the second one joins through allOf
            schema["allOf"] = [{"pattern": patterns[1]}]
        return schema

    def clean(self, value):
        if not isinstance(value, str):
            raise Invalid("must be a string")
        if not is_unicode_text(value):
            raise Invalid("must be Unicode text (a lone surrogate such as \\ud800 is not)")
        if len(value) > self.max_length:  # as sent, as the schema's maxLength counts it
            raise Invalid(f"must be at most {self.max_length} characters")
        if self.strip:
            value = value.strip()
        if self.lower:
            value = value.lower()
        if len(value) < self.min_length:
            raise Invalid("must not be empty" if self.min_length == 1 else
                          f"must be at least {self.min_length} characters")
        if self.pattern and not self.pattern.fullmatch(value):
            raise Invalid(self.pattern_text or f"must match {self.pattern.pattern}")
        return value


class Integer(Field):
    def __init__(self, minimum=None, maximum=None, **kw):
        super().__init__(**kw)
        self.minimum = minimum
        self.maximum = maximum

    def shape(self):
        schema = {"type": "integer"}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        return schema

    def clean(self, value):
        # JSON has one number type: `910.0` is the integer 910 (as JSON Schema counts it), but
        # only while a float holds it exactly (RFC 8259 §6: below 2**53); beyond, `…993.0` would
        # silently become `…992`.
        if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise Invalid("must be an integer")
        if (self.minimum is not None and value < self.minimum) or \
                (self.maximum is not None and value > self.maximum):
            raise Invalid(f"must be an integer from {self.minimum} to {self.maximum}")
        return value


class Boolean(Field):
    def shape(self):
        return {"type": "boolean"}

    def clean(self, value):
        if not isinstance(value, bool):
            raise Invalid("must be true or false")
        return value


class Choice(Field):
    def __init__(self, choices, **kw):
        super().__init__(**kw)
        self.choices = tuple(choices)

    def shape(self):
        return {"enum": list(self.choices)}

    def clean(self, value):
        # Exact: `True == 1` and `1.0 == 1` in Python, but not in a JSON contract.
        if not any(type(value) is type(choice) and value == choice for choice in self.choices):
            raise Invalid("must be one of: " + ", ".join(map(str, self.choices)))
        return value


class Date(Field):
    """A calendar date written YYYY-MM-DD (RFC 3339 full-date), returned as that string."""

    def shape(self):
        return {"type": "string", "format": "date"}

    def clean(self, value):
        if not isinstance(value, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            raise Invalid("must be a date written YYYY-MM-DD")
        try:
            datetime.date.fromisoformat(value)
        except ValueError:
            raise Invalid("is not a real calendar date") from None
        return value


class Email(Field):
    """An email address of sane syntax, trimmed, its domain lower-cased; returned normalised.

    "Sane" is the everyday `local@domain.tld` (RFC 5321 §4.1.2's dot-atom, plus non-ASCII
    letters for internationalised addresses, RFC 6531), at most 254 characters: quoted local
    parts, comments and IP-literal domains are valid by the RFC but refused here, as most
    services do. Only the domain is lower-cased: RFC 5321 §2.4 lets the mailbox server treat
    `Ann` and `ann` as different people, so deciding that they are one account (a unique index
    on the case-folded address) is the caller's choice, not the validator's.

    Unicode first, before anything else: the address is put in NFC (RFC 6532 §3.1), so `josé`
    typed with `é` or with `e` + U+0301 is one address, not two accounts. Compatibility forms
    (fullwidth `ｊｏｅ`, ligatures like `ﬁ`, superscripts: whatever NFKC would change) are
    refused rather than folded: folding would silently turn one mailbox into another (RFC 6532
    advises against NFKC for addresses), and refusing keeps look-alike twins of an address out."""

    _LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]+"
                        r"(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]+)*")
    _LABEL = re.compile(r"[a-z0-9\u0080-\U0010ffff](?:[a-z0-9\u0080-\U0010ffff-]{0,61}"
                        r"[a-z0-9\u0080-\U0010ffff])?")

    def shape(self):
        return {"type": "string", "format": "email", "maxLength": 254}

    def clean(self, value):
        if not isinstance(value, str):
            raise Invalid("must be a string")
        normalised = self.normalise(value)
        if normalised is None:
            raise Invalid("must be an email address like name@example.com")
        return normalised

    @classmethod
    def normalise(cls, text):
        """`text` as a normalised address, or None when it is not a sane one."""
        text = unicodedata.normalize("NFC", text.strip())
        if unicodedata.normalize("NFKC", text) != text:
            return None
        local, at, domain = text.rpartition("@")
        domain = domain.lower()
        labels = domain.split(".")
        if (not at or len(text) > 254 or len(local) > 64 or not text.isprintable()
                or not cls._LOCAL.fullmatch(local)
                or len(labels) < 2 or labels[-1].isdigit()
                or not all(cls._LABEL.fullmatch(label) for label in labels)):
            return None
        return unicodedata.normalize("NFC", f"{local}@{domain}")  # lower() can undo NFC ("İ")


class TextList(Field):
    """A list of short strings, trimmed; optionally lower-cased and de-duplicated in order.

    `max_items` bounds the list as sent, duplicates included, and is checked before any item
    is looked at: so a body of 100,000 copies of one tag costs one `len()`, and the limit is
    the `maxItems` that /openapi.json documents."""

    def __init__(self, *, max_items=10, item_min=1, item_max=100, lower=False, unique=True, **kw):
        super().__init__(**kw)
        self.max_items = max_items
        self.item = Text(item_min, item_max, lower=lower)
        self.unique = unique

    def shape(self):
        return {"type": "array", "maxItems": self.max_items, "items": self.item.shape()}

    def clean(self, value):
        if not isinstance(value, list):
            raise Invalid("must be a list of strings")
        if len(value) > self.max_items:
            raise Invalid(f"must have at most {self.max_items} items")
        items, seen = [], set()
        for index, item in enumerate(value):
            try:
                item = self.item.clean(item)
            except Invalid as err:
                raise Invalid(f"item {index} {err}") from None
            if self.unique and item in seen:
                continue
            seen.add(item)
            items.append(item)
        return items


def body_schema(fields, *, partial=False):
    """The JSON Schema of a body that `validate(data, fields)` accepts: an object of these
    fields and no others; with `partial=True` (PATCH) none is required."""
    properties = {name: field.schema() for name, field in fields.items()}
    if partial:  # a PATCH leaves out what it does not change: no default is filled in
        for schema in properties.values():
            schema.pop("default", None)
    schema = {"type": "object", "additionalProperties": False, "properties": properties}
    required = [] if partial else [name for name, field in fields.items() if field.required]
    if required:
        schema["required"] = required
    return schema


def validate(data, fields, *, partial=False, read_only=()):
    """Check `data` (a dict from a JSON body) against `fields`; return the cleaned values.

    Raises one `ValidationFailed` (422) naming every bad field: unknown, read-only, missing,
    or failing its check. With `partial=True` (PATCH) only the given fields are checked and
    defaults are not filled in."""
    errors = {}
    values = {}
    for name in data:
        if name in read_only:
            errors[name] = "is set by the server and cannot be changed"
        elif name not in fields:
            errors[name] = "is not a known field"
    for name, field in fields.items():
        if name in data:
            try:
                values[name] = field.check(data[name])
            except Invalid as err:
                errors[name] = str(err)
        elif partial:
            continue
        elif field.required:
            errors[name] = "is required"
        elif field.default is not MISSING:
            values[name] = field.default() if callable(field.default) else field.default
    if errors:
        raise ValidationFailed(errors)
    return values
