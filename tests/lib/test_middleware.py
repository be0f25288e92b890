"""lib/middleware.py and App.handle, in-process: a request object in, a response object out, no
sockets. Request ids, Server-Timing, the access log line on fd 2, errors rendered as problem+json
(and a 500 that tells the client nothing about the code), OPTIONS, and what handlers may return."""
import json
import re

import pytest

from lib import (App, BadRequest, ContentTooLarge, NotFound, Request, Response, StreamingResponse,
                 TooManyRequests, Unauthorized, text_response)
from lib.middleware import compose

GENERATED_ID = re.compile(r"[0-9a-f]{16}\Z")
ACCESS_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (?P<client>\S*) (?P<method>\S+) "
                         r"(?P<path>\S+) (?P<status>\d{3}) (?P<bytes>\d+)B (?P<ms>\d+\.\d\d)ms "
                         r"id=(?P<id>\S+)\n")


def tiny_app():
    app = App("tiny", "A test app.", port=0)

    @app.get("/things/{thing_id:int}")
    def read_thing(request, thing_id):
        return {"id": thing_id, "q": request.query_param("q")}

    @app.delete("/things/{thing_id:int}")
    def delete_thing(request, thing_id):
        return None

    @app.put("/things/{thing_id:int}")
    def replace_thing(request, thing_id):
        return text_response("replaced", 200, {"ETag": '"2"'})

    @app.get("/list")
    def list_things(request):
        return [1, 2]

    @app.get("/stream")
    def stream(request):
        return StreamingResponse(iter([b"ab", b"c"]))

    @app.get("/limited")
    def limited(request):
        raise TooManyRequests("slow down", retry_after=2.5)

    @app.get("/secret-crash")
    def crash(request):
        raise RuntimeError("db password is hunter2")

    @app.get("/missing")
    def missing(request):
        raise NotFound("no such thing")

    @app.get("/auth")
    def auth(request):
        raise Unauthorized("who are you?", www_authenticate='Bearer realm="tiny"')

    return app


@pytest.fixture
def app():
    return tiny_app()


def call(app, method, path, query="", headers=None, body=b"", failure=None):
    request = Request(method, path, query, dict(headers or {}), body, has_body=bool(body),
                      client=("127.0.0.1", 5555), app=app)
    return app.handle(request, failure)


def problem_of(response, status):
    assert response.status == status
    assert response.header("Content-Type") == "application/problem+json"
    problem = json.loads(response.body)
    assert problem["status"] == status
    assert problem["type"] == "about:blank"
    return problem


def access_lines(capfd):
    return [ACCESS_LINE.fullmatch(line + "\n") for line in capfd.readouterr().err.splitlines()
            if ACCESS_LINE.fullmatch(line + "\n")]


# --- what a handler returns ------------------------------------------------------------------


def test_dict_becomes_200_json(app):
    response = call(app, "GET", "/things/7", "q=%C3%A9")
    assert response.status == 200
    assert response.header("Content-Type") == "application/json"
    assert json.loads(response.body) == {"id": 7, "q": "é"}


def test_json_is_utf8_not_ascii_escaped(app):
    assert "é".encode() in call(app, "GET", "/things/7", "q=%C3%A9").body


def test_list_becomes_200_json(app):
    response = call(app, "GET", "/list")
    assert (response.status, json.loads(response.body)) == (200, [1, 2])


def test_none_becomes_204_without_body(app):
    response = call(app, "DELETE", "/things/7")
    assert (response.status, response.body) == (204, b"")


def test_response_is_passed_through(app):
    response = call(app, "PUT", "/things/7")
    assert (response.status, response.body, response.header("ETag")) == (200, b"replaced", '"2"')


def test_head_is_answered_by_the_get_handler(app):
    response = call(app, "HEAD", "/things/7")
    assert response.status == 200 and json.loads(response.body)["id"] == 7


# --- built-in routes -------------------------------------------------------------------------


def test_health(app):
    response = call(app, "GET", "/health")
    assert (response.status, json.loads(response.body)) == (200, {"status": "ok"})


def test_index_names_the_app_and_its_routes(app):
    index = json.loads(call(app, "GET", "/").body)
    assert (index["name"], index["description"]) == ("tiny", "A test app.")
    assert {"method": "GET", "path": "/things/{thing_id:int}", "summary": "read thing"} in index["routes"]


def test_openapi_document(app):
    doc = json.loads(call(app, "GET", "/openapi.json").body)
    assert doc["openapi"] == "3.1.0"
    assert "/things/{thing_id}" in doc["paths"]


# --- request ids -----------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["abc", "a" * 128, "!", "~", "req-1:2/3?x=y", "0" * 16])
def test_sane_request_id_is_kept(app, given):
    response = call(app, "GET", "/health", headers={"x-request-id": given})
    assert response.header("X-Request-Id") == given


@pytest.mark.parametrize("given", [
    pytest.param("a" * 129, id="too-long"),
    pytest.param("a b", id="space"),
    pytest.param("a\tb", id="tab"),
    pytest.param("caf\xe9", id="non-ascii"),   # latin-1 code points, as parse_head gives them
    pytest.param("caf\xc3\xa9", id="utf8-bytes"),
    pytest.param("a\x7f", id="del"),
    pytest.param("", id="empty"),
])
def test_insane_request_id_is_replaced(app, given):
    response = call(app, "GET", "/health", headers={"x-request-id": given})
    assert GENERATED_ID.match(response.header("X-Request-Id"))


def test_generated_ids_differ(app):
    ids = {call(app, "GET", "/health").header("X-Request-Id") for _ in range(50)}
    assert len(ids) == 50


def test_request_id_is_on_error_answers_too(app):
    assert call(app, "GET", "/nowhere", headers={"x-request-id": "r1"}).header("X-Request-Id") == "r1"
    assert call(app, "GET", "/secret-crash", headers={"x-request-id": "r2"}).header("X-Request-Id") == "r2"


# --- Server-Timing ---------------------------------------------------------------------------


@pytest.mark.parametrize("method, path", [("GET", "/health"), ("GET", "/nowhere"), ("GET", "/secret-crash")])
def test_server_timing_on_every_answer(app, method, path):
    assert re.fullmatch(r"app;dur=\d+\.\d\d", call(app, method, path).header("Server-Timing"))


# --- errors ----------------------------------------------------------------------------------


def test_http_error_becomes_problem_json(app):
    problem = problem_of(call(app, "GET", "/missing"), 404)
    assert problem == {"type": "about:blank", "title": "Not Found", "status": 404,
                       "detail": "no such thing"}


def test_http_error_keeps_its_headers(app):
    response = call(app, "GET", "/limited")
    problem_of(response, 429)
    assert response.header("Retry-After") == "3"      # rounded up, whole seconds


def test_401_carries_www_authenticate(app):
    response = call(app, "GET", "/auth")
    problem_of(response, 401)
    assert response.header("WWW-Authenticate") == 'Bearer realm="tiny"'


def test_plain_exception_is_a_500_that_leaks_nothing(app, capfd):
    response = call(app, "GET", "/secret-crash", headers={"x-request-id": "crash-1"})
    problem = problem_of(response, 500)
    assert problem["title"] == "Internal Server Error"
    assert "crash-1" in problem["detail"]             # the id to quote when reporting it
    for leak in (b"Traceback", b"hunter2", b"RuntimeError", b"test_middleware", b".py"):
        assert leak not in response.body
    log = capfd.readouterr().err
    assert "Traceback" in log and "hunter2" in log and "id=crash-1" in log


def test_unknown_route_is_404_problem(app):
    problem_of(call(app, "GET", "/nowhere"), 404)


def test_wrong_method_is_405_with_allow(app):
    response = call(app, "POST", "/things/7")
    problem_of(response, 405)
    assert response.header("Allow") == "DELETE, GET, HEAD, OPTIONS, PUT"


def test_bad_path_parameter_is_400_naming_it(app):
    problem = problem_of(call(app, "GET", "/things/seven"), 400)
    assert problem["errors"] == [{"field": "thing_id", "message": "must be an integer"}]


def test_options_is_204_with_allow(app):
    response = call(app, "OPTIONS", "/things/7")
    assert (response.status, response.body) == (204, b"")
    assert response.header("Allow") == "DELETE, GET, HEAD, OPTIONS, PUT"
    assert response.header("X-Request-Id")


def test_options_on_an_unknown_path_is_404(app):
    problem_of(call(app, "OPTIONS", "/nowhere"), 404)


def test_transport_failure_is_answered_through_the_chain(app, capfd):
    response = call(app, "POST", "/things/7", failure=ContentTooLarge("body over 10 bytes"),
                    headers={"x-request-id": "big-1"})
    assert problem_of(response, 413)["detail"] == "body over 10 bytes"
    assert response.header("X-Request-Id") == "big-1"
    [line] = access_lines(capfd)
    assert (line["status"], line["id"]) == ("413", "big-1")


# --- the access log --------------------------------------------------------------------------


def test_one_access_line_per_request_on_fd_2(app, capfd):
    response = call(app, "GET", "/things/7", "token=secret", headers={"x-request-id": "log-1"})
    captured = capfd.readouterr()
    assert captured.out == ""
    [line] = [ACCESS_LINE.fullmatch(text + "\n") for text in captured.err.splitlines()]
    assert line is not None, captured.err
    assert line.group("client", "method", "path", "status", "id") == \
        ("127.0.0.1", "GET", "/things/7", "200", "log-1")
    assert int(line["bytes"]) == len(response.body)
    assert "secret" not in captured.err                # the query string is left out


def test_access_line_for_head_counts_no_bytes(app, capfd):
    call(app, "HEAD", "/things/7")
    [line] = access_lines(capfd)
    assert (line["method"], line["status"], line["bytes"]) == ("HEAD", "200", "0")


def test_streamed_answer_is_logged_when_it_ends_with_the_bytes_sent(app, capfd):
    response = call(app, "GET", "/stream")
    assert access_lines(capfd) == []                   # not yet: the body is still to be sent
    response.sent = sum(map(len, response.chunks))     # what a transport does while writing
    response.on_close()
    [line] = access_lines(capfd)
    assert (line["path"], line["status"], line["bytes"]) == ("/stream", "200", "3")


@pytest.mark.parametrize("path, status", [("/nowhere", "404"), ("/secret-crash", "500"),
                                          ("/things/x", "400")])
def test_access_line_for_errors(app, capfd, path, status):
    call(app, "GET", path)
    [line] = access_lines(capfd)
    assert line["status"] == status


# --- the project's own middleware -------------------------------------------------------------


def test_project_middleware_runs_after_routing_and_sees_the_route(app):
    seen = []

    def remember(request, call_next):
        seen.append((request.route.pattern, request.path_params))
        response = call_next(request)
        response.headers.append(("X-Seen", "1"))
        return response

    app.use(remember)
    response = call(app, "GET", "/things/7")
    assert seen == [("/things/{thing_id:int}", {"thing_id": 7})]
    assert response.header("X-Seen") == "1"
    call(app, "GET", "/nowhere")
    assert len(seen) == 1                              # a 404 never reaches it


def test_project_middleware_error_becomes_a_problem(app):
    def deny(request, call_next):
        raise BadRequest("denied by middleware")

    app.use(deny)
    assert problem_of(call(app, "GET", "/health"), 400)["detail"] == "denied by middleware"


def test_middleware_before_routing_sees_404s(app):
    statuses = []

    def observe(request, call_next):
        try:
            response = call_next(request)
        except Exception as error:
            statuses.append(getattr(error, "status", 500))
            raise
        statuses.append(response.status)
        return response

    app.use(observe, before_routing=True)
    assert call(app, "GET", "/nowhere").status == 404
    assert call(app, "GET", "/health").status == 200
    assert statuses == [404, 200]


def test_compose_nests_the_first_step_outermost():
    order = []

    def step(name):
        def run(request, call_next):
            order.append(f"{name} in")
            response = call_next(request)
            order.append(f"{name} out")
            return response
        return run

    chain = compose([step("a"), step("b")], lambda request: order.append("handler") or Response())
    chain(object())
    assert order == ["a in", "b in", "handler", "b out", "a out"]


# --- log lines a client cannot forge --------------------------------------------------------

@pytest.mark.parametrize("path, shown", [
    ("/plain/é", "/plain/é"),
    ("/x\r\n2026-01-01T00:00:00Z 127.0.0.1 DELETE /notes/1 204", "/x\\r\\n2026-01-01T00:00:00Z 127.0.0.1 DELETE /notes/1 204"),
    ("/esc\x1b[31m", "/esc\\x1b[31m"),
    ("/nul\x00", "/nul\\x00"),
])
def test_printable_escapes_control_characters(path, shown):
    from lib.trace import printable

    assert printable(path) == shown
    assert "\n" not in printable(path) and "\r" not in printable(path)
