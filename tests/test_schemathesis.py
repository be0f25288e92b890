"""Every server held to its own OpenAPI document by a contract tester (issue 11 item 5).

schemathesis (requirements-interop.txt; the test skips without it) reads `GET /openapi.json`,
generates requests from it — valid ones and deliberately invalid ones — and checks each answer
against the document: the status is one the operation declares, the body matches the declared
schema and media type, a valid request is not refused, an invalid one is not accepted, and
nothing is a 5xx (every check, as `--checks all` would run them). Any finding fails the test,
with schemathesis' report (each failure with a curl command to replay it) as the message.

The number of examples per operation is bounded (`SCHEMATHESIS_EXAMPLES`, default 5) and the
seed fixed, so a run is repeatable; two runs go at once (`SCHEMATHESIS_RUNS_AT_ONCE`), and the
eleven servers take under a minute on two cores. Raise the number and drop the seed by hand to
search harder.

The servers that need a caller get one: level 02 an `X-User-Id` header, level 03 an account
signed up first (a bearer token, or a session cookie and its CSRF token).
"""
import concurrent.futures
import importlib.util
import os
import subprocess
import sys
import threading

import pytest
import requests

from tests.harness import expect_json
from tests.projects import NOT_STANDALONE, existing_projects

pytestmark = pytest.mark.skipif(importlib.util.find_spec("schemathesis") is None,
                                reason="schemathesis is not installed (requirements-interop.txt)")

EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "5"))
RUNS_AT_ONCE = int(os.environ.get("SCHEMATHESIS_RUNS_AT_ONCE", "2"))
SEED = "20261124"
PROJECTS = [p for p in existing_projects() if p.name not in NOT_STANDALONE]
ACCOUNT = {"email": "contract@example.com", "password": "correct horse battery staple"}
FLAGS_ADMIN_TOKEN = "contract-admin-token"
SERVICE_TOKEN = "contract-service-token-0123456789"
ACCEPTED = '"2xx", "3xx", 401, 403, 404, 409, 429'   # schemathesis' default for valid requests

# What a JSON Schema cannot say, told to schemathesis instead; each entry is narrow and says why.
# An entry's include-* keys each select on their own (a path OR a method): one operation is
# named "METHOD /path" (include-name). Checks are left to the config (all on by default), as a
# `--checks all` on the command line would turn back on what an entry turns off.
CONFIG = f"""
# An If-Match that is not the current ETag is a 412: the tester cannot guess the current one.
[checks.positive_data_acceptance]
expected-statuses = [{ACCEPTED}, 412]

# A cursor is opaque: only the server can make a valid one (a made-up one is a 400, common.md).
# The tester asks for the first page; cursors are tested in the projects' own tests.
[parameters]
"query.cursor" = ""

# counter: a deleted counter reads as 0 (level01.md), it is not "still available".
[[operations]]
include-path-regex = "^/counters/"
checks.use_after_free.enabled = false

# A new password may also be refused for what no schema can test: being a common password or
# the email (NIST SP 800-63B); the length rule is in the schema.
[[operations]]
include-path = ["/auth/signup", "/auth/password"]
checks.positive_data_acceptance.expected-statuses = [{ACCEPTED}, 412, 422]

# A reset token is valid only when the server issued it: a made-up one is a 400.
[[operations]]
include-path = ["/auth/reset", "/reset"]
checks.positive_data_acceptance.expected-statuses = [{ACCEPTED}, 400, 412, 422]

# request_logger: /status/{{code}} answers the status asked for, 5xx included: that is its point;
# its body is {{"status": n}} below 400 and a problem from 400, which the document (one answer per
# declared status) does not list code by code.
[[operations]]
include-path = "/status/{{code}}"
checks.not_a_server_error.enabled = false
checks.positive_data_acceptance.enabled = false
checks.content_type_conformance.enabled = false

# request_logger: /slow waits as long as asked, up to 5 s (1 s by default): the tester asks for
# no wait (the bounds of `ms` are request_logger's own tests).
[[operations]]
include-path = "/slow"
parameters = {{ "query.ms" = 0 }}

# deployment_ready: /debug/sleep sleeps as long as asked, up to 60 s, and past REQUEST_TIMEOUT_S
# answers the deadline's 503: that is its point. The tester asks for no sleep (the deadline is
# deployment_ready's own tests).
[[operations]]
include-path = "/debug/sleep"
parameters = {{ "query.s" = 0 }}

# expenses: from ≤ to and min ≤ max relate two parameters, which a schema cannot (a 400).
[[operations]]
include-name = ["GET /expenses", "GET /expenses/summary", "GET /expenses/export.csv"]
checks.positive_data_acceptance.expected-statuses = [{ACCEPTED}, 400, 412]

# expenses: a category_id must name one of your categories (422), which no schema knows.
[[operations]]
include-name = ["POST /expenses", "PUT /expenses/{{expense_id}}", "PATCH /expenses/{{expense_id}}"]
checks.positive_data_acceptance.expected-statuses = [{ACCEPTED}, 412, 422]

# contacts: an import is CSV whose header names known columns, name among them (422), and
# which parses (400): the schema says text/csv, the rest is contacts' own tests.
[[operations]]
include-path = "/contacts/import"
checks.positive_data_acceptance.expected-statuses = [{ACCEPTED}, 400, 422]

# search_api: a bulk import is NDJSON, which the tester cannot write (it has no serializer for
# application/x-ndjson); the bulk route's rules are search_api's own tests.
[[operations]]
include-name = "POST /documents/bulk"
enabled = false

# url_shortener: a new link's expires_at must still be ahead (422), which no schema can say.
[[operations]]
include-name = "POST /links"
checks.positive_data_acceptance.expected-statuses = [{ACCEPTED}, 422]

# feature_flags: a flag's fields refer to each other (a rule's serve, default_variant and weights
# name variants; weights add up to 100; rollout is for boolean flags), which no schema can say.
[[operations]]
include-name = ["POST /flags", "PATCH /flags/{{key}}"]
checks.positive_data_acceptance.expected-statuses = [{ACCEPTED}, 412, 422]

# feature_flags: a deleted flag's history stays readable (who deleted it, and what it was).
[[operations]]
include-path = "/flags/{{key}}/history"
checks.use_after_free.enabled = false

# feature_flags: GET /stream is an event stream that stays open: the tester would wait out its
# request timeout on every call (90 s a run); feature_flags' own tests read it event by event.
[[operations]]
include-name = "GET /stream"
enabled = false

# expenses: reassign_to must name another category of yours (422), which no schema knows.
[[operations]]
include-name = "DELETE /categories/{{category_id}}"
checks.positive_data_acceptance.expected-statuses = [{ACCEPTED}, 412, 422]

# file_upload: a file's type is read from its bytes (magic numbers, else UTF-8 text without NUL;
# anything else is a 415), which no schema can say. And a form part is bytes: a "number" sent
# in place of the file's "string" is the same bytes, a valid file, not a schema violation.
[[operations]]
include-name = "POST /files"
checks.positive_data_acceptance.expected-statuses = [{ACCEPTED}, 415]
checks.negative_data_rejection.enabled = false

# email_queue: a templated email's template must exist, and every {{{{ var }}}} it uses needs a
# value (422 naming vars.<name>): the placeholders are data, which no schema knows.
[[operations]]
include-name = "POST /emails"
checks.positive_data_acceptance.expected-statuses = [{ACCEPTED}, 422]

# notification_queue: a webhook URL must resolve to a public address (SSRF), and the email
# channel needs a server started with --smtp: a 422 that no schema can foresee.
[[operations]]
include-name = "PUT /users/{{user_id}}/preferences"
checks.positive_data_acceptance.expected-statuses = [{ACCEPTED}, 422]

# notification_queue: a user's live stream stays open, like feature_flags' GET /stream.
[[operations]]
include-name = "GET /users/{{user_id}}/stream"
enabled = false

# job_processor: a job's event stream stays open until the job ends, and the tester's jobs may
# sleep for minutes (sleep's ms goes to 600,000): each call waited out the request timeout
# (100 s a run); job_processor's own tests read the stream to its end.
[[operations]]
include-name = "GET /jobs/{{job_id}}/events"
enabled = false

# central_logging: GET /logs/stream is a live tail that stays open (as feature_flags' stream).
[[operations]]
include-name = "GET /logs/stream"
enabled = false

# chat: GET /ws switches the connection to a WebSocket (101), which an HTTP tester cannot speak;
# its handshake answers (426, 400, 403) are chat's own tests, over raw sockets.
[[operations]]
include-name = "GET /ws"
enabled = false

# payment_webhooks: a delivery must carry a Stripe-Signature, an HMAC of its raw bytes under the
# endpoint's secret, which no tester can make: every delivery it sends is a 400, stored nowhere.
[[operations]]
include-name = "POST /webhooks/stripe"
checks.positive_data_acceptance.expected-statuses = [{ACCEPTED}, 400]

# rate_limiter: a check's cost may not exceed its policy's burst (it could never pass: 422), a
# relation between two fields that no schema can say.
[[operations]]
include-name = "POST /check"
checks.positive_data_acceptance.expected-statuses = [{ACCEPTED}, 422]

# email_notifications: a notification's template must exist, and every {{{{ var }}}} the template
# uses needs a value (422 naming vars.<name>): the placeholders are data, which no schema knows.
[[operations]]
include-name = ["POST /notifications", "POST /templates/{{name}}/preview"]
checks.positive_data_acceptance.expected-statuses = [{ACCEPTED}, 422]
"""


def caller_headers(project, url):
    """The headers that make the generated requests come from a signed-in caller."""
    if project.level == 2:
        return {"X-User-Id": "contract-tester"}
    if project.name == "feature_flags":   # the admin token manages and evaluates
        return {"Authorization": f"Bearer {FLAGS_ADMIN_TOKEN}"}
    if project.name in ("auth_service", "audit_log"):  # a service's bearer credential
        return {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    paths = expect_json(requests.get(f"{url}/openapi.json", timeout=10), 200)["paths"]
    if "/auth/signup" not in paths:  # level03's accounts, served by every project that signs in
        return {}
    resp = requests.post(f"{url}/auth/signup", json=ACCOUNT, timeout=10)
    expect_json(resp, 201)
    if project.name == "session_auth":
        body = resp.json()
        return {"Cookie": f"sid={resp.cookies['sid']}", "X-CSRF-Token": body["csrf_token"]}
    resp = requests.post(f"{url}/auth/login", json=ACCOUNT, timeout=10)
    return {"Authorization": f"Bearer {expect_json(resp, 200)['access_token']}"}


def contract_run(start_server, project, workdir):
    """Start the project's server, sign a caller in, and run schemathesis against it."""
    args = {"rbac": ["--admin-email", ACCOUNT["email"]],
            "feature_flags": ["--admin-token", FLAGS_ADMIN_TOKEN],
            "auth_service": ["--service-token", SERVICE_TOKEN],
            "audit_log": ["--token", SERVICE_TOKEN]}.get(project.name, [])
    server = start_server(project.script, *args)
    headers = caller_headers(project, server.url)
    (workdir / "schemathesis.toml").write_text(CONFIG)
    command = [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
               "--config-file", str(workdir / "schemathesis.toml"), "run", f"{server.url}/openapi.json",
               "--max-examples", str(EXAMPLES), "--seed", SEED, "--no-shrink",
               "--workers", "1", "--request-timeout", "10"]
    for name, value in headers.items():
        command += ["--header", f"{name}: {value}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=workdir,
                          stdin=subprocess.DEVNULL, env={**os.environ, "NO_COLOR": "1"})


@pytest.fixture(scope="module")
def contract_runs(request, start_server_module, tmp_path_factory):
    """{project name: the future of its contract run} for every project this session selected,
    RUNS_AT_ONCE of them at a time: the tester is CPU-bound (one run keeps a core busy, more
    workers in one run only contend), so two runs on two cores take about half the time."""
    selected = [item.callspec.params["project"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")]
    starting = threading.Lock()  # ServerGroup is not thread-safe; starts are short anyway

    def start(*args):
        with starting:
            return start_server_module(*args)

    with concurrent.futures.ThreadPoolExecutor(RUNS_AT_ONCE) as pool:
        yield {project.name: pool.submit(contract_run, start, project,
                                         tmp_path_factory.mktemp(project.name))
               for project in selected}


@pytest.mark.parametrize("project", PROJECTS, ids=[p.name for p in PROJECTS])
def test_the_server_keeps_its_openapi_document(contract_runs, project):
    done = contract_runs[project.name].result()
    assert done.returncode == 0, f"schemathesis found problems in {project.name}:\n" \
                                 f"{done.stdout[-20000:]}\n{done.stderr[-2000:]}"
