"""What the level03 test files share: accounts on a server whose signup and login are jwt_auth's.

Every level03 project signs users up with `POST /auth/signup` and logs them in with
`POST /auth/login`, under jwt_auth's rules (imported by each). Tests run the servers at the
lowest scrypt cost they accept (`LOW_COST`), and each test uses emails of its own.

They also share jwt_auth's request bodies, so `/openapi.json` must describe them alike: the
JSON Schemas below (`SIGN_UP_BODY`, `LOGIN_BODY`, `REFRESH_BODY`, `TOKEN_ROUTE_BODIES`) are what each project's
`request_bodies` must hold, exactly, and `check_password_bounds` proves that the schema's
password lengths are the ones the server really enforces.
"""
import copy
import uuid

import requests

from tests.harness import expect, expect_json, expect_problem

PASSWORD = "correct horse battery staple"
LOW_COST = ("--scrypt-n", "1024")   # the lowest --scrypt-n: a signup or login hashes fast
TIMEOUT = 15                        # s, for every single request


def fresh_email(prefix="u"):
    """An address no other test uses, so tests sharing one server do not meet."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}@example.com"


class AccountClient:
    """JSON requests to one server on a keep-alive session (`http`), and the signup and login
    every level03 project answers. A test file subclasses it with its project's routes."""

    def __init__(self, server):
        self.url = server.url
        self.http = requests.Session()

    def post(self, path, body, token=None):
        """POST `body` as JSON; with `token`, as `Authorization: Bearer <token>`."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.http.post(self.url + path, json=body, headers=headers, timeout=TIMEOUT)

    def signup(self, email, password=PASSWORD):
        return expect_json(self.post("/auth/signup", {"email": email, "password": password}), 201)

    def login_response(self, email, password=PASSWORD):
        return self.post("/auth/login", {"email": email, "password": password})

    def login(self, email, password=PASSWORD):
        return expect_json(self.login_response(email, password), 200)


# --------------------------------------------------------------------------------------------
# Request bodies, as /openapi.json describes them (JSON Schema 2020-12, OpenAPI 3.1)


def body_schema(properties, required):
    """An object of exactly these properties (an unknown field is a 422), `required` of them."""
    schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = required
    return schema


EMAIL_SCHEMA = {"type": "string", "format": "email", "maxLength": 254}
NEW_PASSWORD_SCHEMA = {"type": "string", "minLength": 8, "maxLength": 128}  # the policy's 8–128
GIVEN_PASSWORD_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 512}  # checked, not judged
REFRESH_TOKEN_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"\S"}

SIGN_UP_BODY = body_schema({"email": EMAIL_SCHEMA, "password": NEW_PASSWORD_SCHEMA},
                           ["email", "password"])
LOGIN_BODY = body_schema({"email": EMAIL_SCHEMA, "password": GIVEN_PASSWORD_SCHEMA},
                         ["email", "password"])
REFRESH_BODY = body_schema({"refresh_token": REFRESH_TOKEN_SCHEMA}, ["refresh_token"])
# jwt_auth's token routes, which jwt_auth, rbac and password_reset all serve
TOKEN_ROUTE_BODIES = {("POST", "/auth/signup"): SIGN_UP_BODY, ("POST", "/auth/login"): LOGIN_BODY,
                      ("POST", "/auth/refresh"): REFRESH_BODY, ("POST", "/auth/logout"): REFRESH_BODY}


def request_bodies(url):
    """{(METHOD, path): (schema, {field: description})} for every operation of the server's
    /openapi.json that takes a body: the schema with its fields' descriptions taken out (they
    are prose; the rest is compared exactly), and the descriptions apart."""
    doc = expect_json(requests.get(url + "/openapi.json", timeout=TIMEOUT), 200)
    bodies = {}
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if "requestBody" not in operation:
                continue
            content = operation["requestBody"]["content"]
            assert list(content) == ["application/json"], f"{method} {path}: {list(content)}"
            schema = copy.deepcopy(content["application/json"]["schema"])
            descriptions = {name: field.pop("description")
                            for name, field in schema.get("properties", {}).items()
                            if "description" in field}
            bodies[(method.upper(), path)] = schema, descriptions
    return bodies


def assert_policy_described(description):
    """A new password's description says what its schema cannot: the rest of the policy."""
    assert "8–128 characters" in description and "common passwords" in description, description
    assert "email" in description, description


def password_of_length(length):
    """A password of exactly `length` characters (ASCII: the same after NFKC), on no list of
    common passwords and equal to no email."""
    return ("v7Kq-" * (length // 5 + 1))[:length]


def check_password_bounds(schema, field, send, accepted):
    """The lengths `schema` gives `field` are the ones the server enforces: a password one
    character outside either bound is a 422 naming `field`, and one exactly at a bound gets
    `accepted` (201, 204 …). `send(password)` makes one request (on an account or a token of
    its own, if an accepted one uses it up) and returns the response."""
    low, high = schema["properties"][field]["minLength"], schema["properties"][field]["maxLength"]
    for length in (low - 1, high + 1):
        problem = expect_problem(send(password_of_length(length)), 422)
        assert [e["field"] for e in problem["errors"]] == [field], (length, problem)
        assert problem["errors"][0]["message"] == (f"must be at least {low} characters"
                                                   if length < low else
                                                   f"must be at most {high} characters")
    for length in (low, high):
        expect(send(password_of_length(length)), accepted)


# Long enough for the policy, so only the lone surrogate is wrong: JSON can spell "\ud800", and
# Python decodes it into a string that has no UTF-8 (scrypt hashes UTF-8).
LONE_SURROGATE_PASSWORD = "correct horse \ud800 battery staple"


def expect_lone_surrogate_refused(resp, field):
    """A new password holding a lone surrogate: a 422 naming `field`, not a 500."""
    problem = expect_problem(resp, 422)
    assert [e["field"] for e in problem["errors"]] == [field], problem
    assert "surrogate" in problem["errors"][0]["message"], problem


def check_bodies_name_their_fields(bodies, send):
    """What each schema says about fields is what the server does: a body of one field the
    schema does not name (`additionalProperties: false`) is one 422 that names it and every
    field the schema requires, and no other. `send(method, path, body)` returns the response."""
    for (method, path), (schema, _) in bodies.items():
        problem = expect_problem(send(method, path, {"unexpected": 1}), 422)
        assert sorted(e["field"] for e in problem["errors"]) == \
            sorted(["unexpected", *schema.get("required", [])]), (method, path, problem)
