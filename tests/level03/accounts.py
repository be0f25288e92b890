"""What the level03 test files share: accounts on a server whose signup and login are jwt_auth's.

Every level03 project signs users up with `POST /auth/signup` and logs them in with
`POST /auth/login`, under jwt_auth's rules (imported by each). Tests run the servers at the
lowest scrypt cost they accept (`LOW_COST`), and each test uses emails of its own.
"""
import uuid

import requests

from tests.harness import expect_json

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
