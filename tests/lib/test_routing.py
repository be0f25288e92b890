"""lib/routing.py: a match is none (404), partial (405 + Allow) or full (handler + converted
parameters); path converters; and the OpenAPI document and index built from the same routes."""
import datetime

import pytest

from lib.problems import BadRequest, MethodNotAllowed, NotFound
from lib.request import Query, Request
from lib.routing import PAGE, PAGE_ANSWER, Route, Router, allowed_methods


def handler_named(name, doc=None):
    def handler(request, **params):
        return params
    handler.__name__ = name
    handler.__doc__ = doc
    return handler


def router_with(*routes, **options):
    router = Router()
    for method, pattern in routes:
        router.add(Route(method, pattern, handler_named(f"{method.lower()}_{len(router.routes)}"),
                         **options))
    return router


def matched(router, method, path):
    route, params = router.match(method, path)
    return route.method, route.pattern, params


# --- full matches ---------------------------------------------------------------------------


def test_static_route():
    router = router_with(("GET", "/health"))
    assert matched(router, "GET", "/health") == ("GET", "/health", {})


def test_dynamic_route_gives_its_parameter_as_text():
    router = router_with(("GET", "/counters/{name}"))
    assert matched(router, "GET", "/counters/visits") == ("GET", "/counters/{name}", {"name": "visits"})


def test_parameter_is_one_segment():
    router = router_with(("GET", "/counters/{name}"))
    for path in ("/counters/a/b", "/counters/", "/counters"):
        with pytest.raises(NotFound):
            router.match("GET", path)


def test_several_parameters():
    router = router_with(("GET", "/users/{user}/notes/{note_id:int}"))
    assert matched(router, "GET", "/users/ann/notes/7")[2] == {"user": "ann", "note_id": 7}


def test_static_route_wins_over_a_dynamic_one():
    router = router_with(("GET", "/notes/{note_id}"), ("GET", "/notes/search"))
    assert matched(router, "GET", "/notes/search")[1] == "/notes/search"
    assert matched(router, "GET", "/notes/12")[1] == "/notes/{note_id}"


def test_dynamic_routes_match_in_declaration_order():
    router = router_with(("GET", "/files/{name}"), ("GET", "/files/{rest:path}"))
    assert matched(router, "GET", "/files/a")[1] == "/files/{name}"
    assert matched(router, "GET", "/files/a/b")[1] == "/files/{rest:path}"


def test_regex_characters_in_a_pattern_are_literal():
    router = router_with(("GET", "/v1.0/items/{id}"))
    with pytest.raises(NotFound):
        router.match("GET", "/v1x0/items/1")
    assert matched(router, "GET", "/v1.0/items/1")[2] == {"id": "1"}


def test_path_must_match_to_its_end():
    router = router_with(("GET", "/items/{id}"))
    with pytest.raises(NotFound):
        router.match("GET", "/items/1/extra")


@pytest.mark.parametrize("path, value", [
    ("/files/a", "a"),
    ("/files/a/b/c.txt", "a/b/c.txt"),
    ("/files/a//b/", "a//b/"),
])
def test_path_converter_takes_the_rest_with_slashes(path, value):
    router = router_with(("GET", "/files/{rest:path}"))
    assert matched(router, "GET", path)[2] == {"rest": value}


def test_path_converter_needs_at_least_one_character():
    with pytest.raises(NotFound):
        router_with(("GET", "/files/{rest:path}")).match("GET", "/files/")


@pytest.mark.parametrize("text, value", [("7", 7), ("0", 0), ("-3", -3), ("123456789", 123456789)])
def test_int_converter(text, value):
    router = router_with(("GET", "/items/{id:int}"))
    assert matched(router, "GET", f"/items/{text}")[2] == {"id": value}


@pytest.mark.parametrize("text", ["abc", "1.5", "1e3", "0x10", "--1", "1" * 5000])
def test_bad_int_is_400_naming_the_parameter(text):
    # The route exists, the value is bad: 400, not 404 (common.md).
    router = router_with(("GET", "/items/{item_id:int}"))
    with pytest.raises(BadRequest) as caught:
        router.match("GET", f"/items/{text}")
    assert caught.value.status == 400
    assert caught.value.errors == [{"field": "item_id", "message": "must be an integer"}]
    assert "item_id" in caught.value.detail


@pytest.mark.parametrize("text", ["1_000", "+5", " 5", "5 ", "\u0663"])
def test_int_converter_refuses_non_canonical_spellings(text):
    with pytest.raises(BadRequest):
        router_with(("GET", "/items/{id:int}")).match("GET", f"/items/{text}")


@pytest.mark.parametrize("value", ["99999999999999999999", "9223372036854775808", "-9223372036854775809"])
def test_int_converter_answers_404_past_64_bits(value):
    # Well-formed, but no sqlite row can have it: nothing there (and never an OverflowError).
    with pytest.raises(NotFound):
        router_with(("GET", "/items/{id:int}")).match("GET", f"/items/{value}")


# --- 404 and 405 ----------------------------------------------------------------------------


def test_unknown_path_is_404():
    router = router_with(("GET", "/a"), ("GET", "/b/{x}"))
    with pytest.raises(NotFound) as caught:
        router.match("GET", "/c")
    assert caught.value.status == 404


def test_known_path_wrong_method_is_405_with_sorted_allow():
    router = router_with(("PUT", "/notes/{id}"), ("DELETE", "/notes/{id}"), ("GET", "/notes/{id}"),
                         ("PATCH", "/notes/{id}"))
    with pytest.raises(MethodNotAllowed) as caught:
        router.match("POST", "/notes/1")
    assert caught.value.status == 405
    assert caught.value.headers == {"Allow": "DELETE, GET, HEAD, OPTIONS, PATCH, PUT"}


def test_allow_without_get_has_no_head():
    router = router_with(("POST", "/login"))
    with pytest.raises(MethodNotAllowed) as caught:
        router.match("GET", "/login")
    assert caught.value.headers["Allow"] == "OPTIONS, POST"


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_a_static_path_shadows_the_patterns(method):
    # `/notes/search` is written out: it is never the note with id "search", whatever the method.
    router = router_with(("GET", "/notes/search"), ("DELETE", "/notes/{id}"))
    with pytest.raises(MethodNotAllowed) as caught:
        router.match(method, "/notes/search")
    assert caught.value.headers["Allow"] == "GET, HEAD, OPTIONS"


def test_allow_gathers_the_methods_of_every_pattern_that_matches():
    router = router_with(("GET", "/notes/{id}"), ("DELETE", "/notes/{name}"))
    with pytest.raises(MethodNotAllowed) as caught:
        router.match("PUT", "/notes/7")
    assert caught.value.headers["Allow"] == "DELETE, GET, HEAD, OPTIONS"


def test_options_is_a_405_the_app_answers_with_204():
    # The router has no OPTIONS routes: the 405's Allow is what App answers OPTIONS with.
    router = router_with(("GET", "/a"))
    with pytest.raises(MethodNotAllowed) as caught:
        router.match("OPTIONS", "/a")
    assert caught.value.headers["Allow"] == "GET, HEAD, OPTIONS"


def test_method_names_are_case_sensitive():
    router = router_with(("GET", "/a"))
    with pytest.raises(MethodNotAllowed):
        router.match("get", "/a")


def test_route_method_is_upper_cased_when_declared():
    assert Route("get", "/a", handler_named("h")).method == "GET"


def test_bad_int_on_wrong_method_is_405_not_400():
    router = router_with(("GET", "/items/{id:int}"))
    with pytest.raises(MethodNotAllowed):
        router.match("POST", "/items/abc")


@pytest.mark.parametrize("methods, allow", [
    ({"GET"}, ["GET", "HEAD", "OPTIONS"]),
    ({"POST", "DELETE"}, ["DELETE", "OPTIONS", "POST"]),
    ({"HEAD"}, ["HEAD", "OPTIONS"]),
    ({"OPTIONS", "GET"}, ["GET", "HEAD", "OPTIONS"]),
])
def test_allowed_methods(methods, allow):
    assert allowed_methods(methods) == allow


# --- HEAD -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/static", "/dynamic/1"])
def test_head_is_served_by_the_get_route(path):
    router = router_with(("GET", "/static"), ("GET", "/dynamic/{id:int}"))
    method, _, _ = matched(router, "HEAD", path)
    assert method == "GET"


def test_a_declared_head_route_wins_over_get():
    router = router_with(("GET", "/a"), ("HEAD", "/a"))
    assert matched(router, "HEAD", "/a")[0] == "HEAD"


def test_head_without_get_is_405():
    router = router_with(("POST", "/a"))
    with pytest.raises(MethodNotAllowed):
        router.match("HEAD", "/a")


# --- declaring routes -----------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["/a", "/a/{id}"])
def test_duplicate_route_is_refused(pattern):
    router = router_with(("GET", pattern))
    with pytest.raises(ValueError, match="duplicate"):
        router.add(Route("GET", pattern, handler_named("again")))


def test_same_path_different_methods_is_fine():
    router = router_with(("GET", "/a/{id}"), ("PUT", "/a/{id}"))
    assert [r.method for r in router.routes] == ["GET", "PUT"]


def test_summary_from_argument_docstring_or_name():
    assert Route("GET", "/", handler_named("h", "First line.\n\nMore."), summary="Given").summary == "Given"
    assert Route("GET", "/", handler_named("h", "  First line.\n\nMore.")).summary == "First line."
    assert Route("GET", "/", handler_named("list_notes")).summary == "list notes"


def test_meta_keeps_unknown_options():
    route = Route("GET", "/", handler_named("h"), public=True, permission="notes:read")
    assert route.meta == {"public": True, "permission": "notes:read"}


# --- the index and OpenAPI ------------------------------------------------------------------


def documented_router():
    router = Router()
    router.add(Route("GET", "/notes", handler_named("list_notes", "List notes."),
                     query=PAGE, tags=["notes"]))
    router.add(Route("POST", "/notes", handler_named("create_note", "Create a note."),
                     request_schema={"type": "object", "required": ["title"]},
                     responses={201: "the note", 422: "invalid fields"}))
    router.add(Route("GET", "/notes/{note_id:int}", handler_named("read_note", "Read a note.")))
    router.add(Route("DELETE", "/notes/{note_id:int}", handler_named("delete_note"),
                     responses={204: "deleted"}))
    router.add(Route("GET", "/files/{rest:path}", handler_named("read_file")))
    return router


def test_index_lists_every_route_in_declaration_order():
    assert documented_router().index() == [
        {"method": "GET", "path": "/notes", "summary": "List notes."},
        {"method": "POST", "path": "/notes", "summary": "Create a note."},
        {"method": "GET", "path": "/notes/{note_id:int}", "summary": "Read a note."},
        {"method": "DELETE", "path": "/notes/{note_id:int}", "summary": "delete note"},
        {"method": "GET", "path": "/files/{rest:path}", "summary": "read file"},
    ]


def test_openapi_document_header():
    doc = documented_router().openapi("notes", "Notes of a user.", "1.2.3")
    assert doc["openapi"] == "3.1.0"
    assert doc["info"] == {"title": "notes", "description": "Notes of a user.", "version": "1.2.3"}
    problem = doc["components"]["schemas"]["Problem"]
    assert problem["required"] == ["type", "title", "status"]


def test_openapi_paths_drop_the_converters():
    paths = documented_router().openapi("t", "d", "1")["paths"]
    assert sorted(paths) == ["/files/{rest}", "/notes", "/notes/{note_id}"]
    assert sorted(paths["/notes/{note_id}"]) == ["delete", "get"]
    assert not any(":" in path for path in paths)


def test_openapi_path_parameters_with_their_types():
    paths = documented_router().openapi("t", "d", "1")["paths"]
    assert paths["/notes/{note_id}"]["get"]["parameters"] == [
        {"name": "note_id", "in": "path", "required": True, "schema": {"type": "integer"}}]
    assert paths["/files/{rest}"]["get"]["parameters"] == [
        {"name": "rest", "in": "path", "required": True, "schema": {"type": "string"}}]


def test_openapi_query_parameters():
    operation = documented_router().openapi("t", "d", "1")["paths"]["/notes"]["get"]
    limit, cursor = operation["parameters"]
    assert limit["name"] == "limit" and limit["in"] == "query"
    assert limit["schema"] == {"type": "integer", "minimum": 1, "maximum": 100}
    assert cursor["name"] == "cursor" and cursor["schema"] == {"type": "string"}
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == PAGE_ANSWER
    assert operation["tags"] == ["notes"]
    assert operation["operationId"] == "list_notes"
    assert operation["summary"] == "List notes."


def test_openapi_request_body_only_when_a_schema_is_given():
    paths = documented_router().openapi("t", "d", "1")["paths"]
    assert paths["/notes"]["post"]["requestBody"] == {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object", "required": ["title"]}}}}
    assert "requestBody" not in paths["/notes"]["get"]
    assert "parameters" not in paths["/notes"]["post"]


def test_openapi_request_body_may_be_optional():
    router = Router()
    router.add(Route("POST", "/counters/{name}/increment", lambda request, name: None,
                     request_schema={"type": "object"}, body_required=False))
    operation = router.openapi("t", "d", "1")["paths"]["/counters/{name}/increment"]["post"]
    assert operation["requestBody"]["required"] is False


def test_openapi_request_body_of_another_media_type():
    router = Router()
    router.add(Route("POST", "/import", lambda request: None, request_schema={"type": "string"},
                     request_media_type="text/csv"))
    body = router.openapi("t", "d", "1")["paths"]["/import"]["post"]["requestBody"]
    assert body == {"required": True, "content": {"text/csv": {"schema": {"type": "string"}}}}


def test_openapi_a_response_may_be_a_whole_response_object():
    page = {"description": "an HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}
    router = Router()
    router.add(Route("GET", "/reset", lambda request: None, media_type="text/html",
                     responses={200: "the form", 400: page, 404: "no such thing"}))
    responses = router.openapi("t", "d", "1")["paths"]["/reset"]["get"]["responses"]
    assert responses["400"] == page
    assert list(responses["404"]["content"]) == ["application/problem+json"]


def test_openapi_a_success_response_object_keeps_its_content():
    """A download answers in the type of what it sends: the route's one media type must not
    replace the several its Response Object lists."""
    download = {"description": "the file", "content": {"image/png": {}, "application/pdf": {}}}
    router = Router()
    router.add(Route("GET", "/files/{id:int}", lambda request: None, responses={200: download}))
    responses = router.openapi("t", "d", "1")["paths"]["/files/{id}"]["get"]["responses"]
    assert responses["200"] == {"description": "the file",
                                "content": {"image/png": {}, "application/pdf": {}}}


def test_openapi_responses():
    paths = documented_router().openapi("t", "d", "1")["paths"]
    post = paths["/notes"]["post"]["responses"]
    assert post["201"] == {"description": "the note",
                           "content": {"application/json": {"schema": {"type": "object"}}}}
    assert post["422"]["content"]["application/problem+json"]["schema"] == \
        {"$ref": "#/components/schemas/Problem"}
    assert "200" not in post
    assert post["default"]["content"]["application/problem+json"]["schema"] == \
        {"$ref": "#/components/schemas/Problem"}
    assert set(paths["/notes/{note_id}"]["delete"]["responses"]) == {"204", "default"}
    assert set(paths["/notes/{note_id}"]["get"]["responses"]) == {"200", "default"}


def test_openapi_success_status_is_the_declared_one():
    router = Router()
    router.add(Route("POST", "/things", handler_named("make_thing"), status=201))
    router.add(Route("POST", "/things/{id:int}/archive", handler_named("archive_thing")))
    router.add(Route("DELETE", "/things/{id:int}", handler_named("delete_thing"), status=204))
    paths = router.openapi("t", "d", "1")["paths"]
    assert set(paths["/things"]["post"]["responses"]) == {"201", "default"}
    assert set(paths["/things/{id}/archive"]["post"]["responses"]) == {"200", "default"}
    assert paths["/things/{id}"]["delete"]["responses"]["204"] == {"description": "Success"}


def test_query_declarations_document_what_they_read():
    declared = [Query("n", "a number", int, 5, 1, 9), Query("on", "a flag", bool),
                Query("day", "a date", datetime.date), Query("sort", "an order", ("a", "-a"), "a"),
                Query("code", "a code", {"pattern": "^[A-Z]{3}$"})]
    assert [q.schema for q in declared] == [
        {"type": "integer", "minimum": 1, "maximum": 9}, {"type": "boolean"},
        {"type": "string", "format": "date"}, {"type": "string", "enum": ["a", "-a"]},
        {"type": "string", "pattern": "^[A-Z]{3}$"}]
    request = Request("GET", "/", "n=7&on=true&day=2026-02-28&sort=-a&code=EUR")
    assert [q.read(request) for q in declared] == [7, True, datetime.date(2026, 2, 28), "-a", "EUR"]
    assert [q.read(Request("GET", "/")) for q in declared] == [5, None, None, "a", None]
    for bad in ("n=10", "on=1", "day=2026-02-30", "sort=b"):
        with pytest.raises(BadRequest):
            [q.read(Request("GET", "/", bad)) for q in declared]


def test_openapi_if_match_and_path_schemas_when_declared():
    router = Router()
    router.add(Route("PUT", "/counters/{name}", handler_named("set_counter"), if_match=True,
                     path_schemas={"name": {"pattern": "^[a-z]+$"}}))
    operation = router.openapi("t", "d", "1")["paths"]["/counters/{name}"]["put"]
    name, if_match = operation["parameters"]
    assert name["schema"] == {"type": "string", "pattern": "^[a-z]+$"}
    assert if_match["name"] == "If-Match" and if_match["in"] == "header"
