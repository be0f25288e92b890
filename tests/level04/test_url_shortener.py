"""level04/url_shortener.py, black-box: codes and aliases, URL checks, redirects, the manage
token, click stats counted in batches (and flushed at a clean exit), the cache's invalidation.

One server serves most of the module; tests that need flags or a restart start their own.
"""
import collections
import datetime
import re
import signal
import sqlite3
import threading
import time

import pytest
import requests

from tests.harness import expect, expect_json, expect_problem

SCRIPT = "level04/url_shortener.py"
TIMEOUT = 10
CODE = re.compile(r"[0-9A-Za-z]{7}")


@pytest.fixture(scope="module")
def server(start_server_module):
    return start_server_module(SCRIPT)


def shorten(server, **fields):
    resp = requests.post(f"{server.url}/links", json={"url": "https://example.com/", **fields},
                         timeout=TIMEOUT)
    return resp


def new_link(server, **fields):
    return expect_json(shorten(server, **fields), 201)


def bearer(link):
    return {"Authorization": f"Bearer {link['manage_token']}"}


def click(server, code, **headers):
    return requests.get(f"{server.url}/{code}", headers=headers, allow_redirects=False,
                        timeout=TIMEOUT)


def stats(server, link):
    return expect_json(requests.get(f"{server.url}/links/{link['code']}/stats",
                                    headers=bearer(link), timeout=TIMEOUT), 200)


def stats_when(server, link, done, timeout=2.0):
    """Poll the stats until `done(stats)` or `timeout` s (the batch interval is 0.5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        current = stats(server, link)
        if done(current) or time.monotonic() > deadline:
            return current
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# Creating links


def test_create_answers_a_random_code_a_short_url_and_a_token(server):
    resp = shorten(server)
    link = expect_json(resp, 201)
    assert CODE.fullmatch(link["code"])
    assert link["short_url"] == f"http://localhost:{server.port}/{link['code']}"
    assert link["url"] == "https://example.com/"
    assert len(link["manage_token"]) >= 43
    assert resp.headers["Location"] == f"/links/{link['code']}"


def test_codes_are_random_not_sequential(server):
    codes = [new_link(server)["code"] for _ in range(20)]
    assert len(set(codes)) == 20
    assert codes != sorted(codes), "20 codes in creation order should not come out sorted"


def test_short_url_never_comes_from_the_host_header(server):
    resp = requests.post(f"{server.url}/links", json={"url": "https://example.com/"},
                         headers={"Host": "evil.example"}, timeout=TIMEOUT)
    assert expect_json(resp, 201)["short_url"].startswith(f"http://localhost:{server.port}/")


def test_public_url_is_the_base_of_short_links(start_server):
    other = start_server(SCRIPT, "--public-url", "https://sho.rt/")
    link = new_link(other)
    assert link["short_url"] == f"https://sho.rt/{link['code']}"
    problem = expect_problem(shorten(other, url="https://SHO.RT:443/abc"), 422)
    assert problem["errors"][0]["field"] == "url"


def test_an_alias_is_unique(server):
    link = new_link(server, alias="launch-2026")
    assert link["code"] == "launch-2026"
    problem = expect_problem(shorten(server, alias="launch-2026"), 409)
    assert problem["errors"] == [{"field": "alias", "message": "is taken"}]


@pytest.mark.parametrize("alias", ["health", "links"])
def test_an_alias_cannot_shadow_a_route(server, alias):
    expect_problem(shorten(server, alias=alias), 409)
    expect(requests.get(f"{server.url}/health", timeout=TIMEOUT), 200)


@pytest.mark.parametrize("alias", ["ab", "x" * 33, "has space", "dots.not", "ü-ber", "a/b"])
def test_a_malformed_alias_is_a_422(server, alias):
    problem = expect_problem(shorten(server, alias=alias), 422)
    assert [e["field"] for e in problem["errors"]] == ["alias"]


@pytest.mark.parametrize("url", [
    "javascript:alert(1)", "data:text/html,<script>alert(1)</script>", "file:///etc/passwd",
    "ftp://example.com/", "//example.com/", "/relative", "https://", "http:///path",
    "https://user:pw@example.com/", "https://bank.example@evil.example/",
    "https://example.com/a b", "https://example.com/\r\nSet-Cookie: x=1",
    "https://exa\\mple.com/", "https://example.com:99999/", "https://example.com:0/",
    "https://-bad-.example/", "https://a..b/", "http://[::1/",
    "https://example.com/" + "a" * 2040,
])
def test_unsafe_or_malformed_urls_are_refused(server, url):
    problem = expect_problem(shorten(server, url=url), 422)
    assert [e["field"] for e in problem["errors"]] == ["url"]


def test_links_to_the_shortener_itself_are_refused(server):
    for url in (f"http://localhost:{server.port}/abcdefg", f"HTTP://LOCALHOST:{server.port}"):
        expect_problem(shorten(server, url=url), 422)
    new_link(server, url=f"http://localhost:{server.port + 1 if server.port < 65535 else 1}/")


def test_idns_are_normalised_and_non_ascii_paths_escaped(server):
    link = new_link(server, url="https://Bücher.Example/straße?q=ä#ü")
    assert link["url"] == "https://xn--bcher-kva.example/stra%C3%9Fe?q=%C3%A4#%C3%BC"
    assert click(server, link["code"]).headers["Location"] == link["url"]


def test_a_url_of_2048_characters_is_the_limit(server):
    base = "https://example.com/"
    new_link(server, url=base + "a" * (2048 - len(base)))
    expect_problem(shorten(server, url=base + "a" * (2049 - len(base))), 422)


def test_every_bad_field_is_named_and_server_fields_refused(server):
    problem = expect_problem(requests.post(f"{server.url}/links", json={
        "url": "ftp://x", "alias": "a", "expires_at": "tomorrow", "code": "mine"},
        timeout=TIMEOUT), 422)
    assert {e["field"] for e in problem["errors"]} == {"url", "alias", "expires_at", "code"}


def test_an_expiry_in_the_past_is_refused(server):
    problem = expect_problem(shorten(server, expires_at="2000-01-01T00:00:00Z"), 422)
    assert problem["errors"] == [{"field": "expires_at", "message": "must be in the future"}]


# --------------------------------------------------------------------------------------------
# Redirects


def test_redirect_is_a_302_that_no_cache_keeps(server):
    link = new_link(server, url="https://example.com/page?x=1")
    resp = click(server, link["code"])
    expect(resp, 302)
    assert resp.headers["Location"] == "https://example.com/page?x=1"
    assert resp.headers["Cache-Control"] == "no-store"


def test_permanent_is_a_301_cacheable_for_a_day(start_server):
    other = start_server(SCRIPT, "--permanent")
    resp = click(other, new_link(other)["code"])
    expect(resp, 301)
    assert resp.headers["Cache-Control"] == "public, max-age=86400"


@pytest.mark.parametrize("path", ["/nOsUcH1", "/favicon.ico", "/x"])
def test_unknown_codes_are_404(server, path):
    expect_problem(requests.get(server.url + path, allow_redirects=False, timeout=TIMEOUT), 404)


def test_expired_and_disabled_links_are_410(server):
    soon = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1))
    link = new_link(server, expires_at=soon.isoformat())
    expect(click(server, link["code"]), 302)  # warms the cache: expiry must still be checked
    deadline = time.monotonic() + 5
    while click(server, link["code"]).status_code == 302 and time.monotonic() < deadline:
        time.sleep(0.05)
    expect_problem(click(server, link["code"]), 410)
    other = new_link(server)
    expect(click(server, other["code"]), 302)
    expect_json(requests.patch(f"{server.url}/links/{other['code']}", json={"disabled": True},
                               headers=bearer(other), timeout=TIMEOUT), 200)
    expect_problem(click(server, other["code"]), 410)


def test_head_redirects_but_is_not_a_click(start_server, tmp_path):
    db = tmp_path / "links.sqlite3"
    first = start_server(SCRIPT, "--db", db, "--flush-interval", "3600")
    link = new_link(first)
    for _ in range(3):
        resp = requests.head(f"{first.url}/{link['code']}", allow_redirects=False, timeout=TIMEOUT)
        expect(resp, 302)
        assert resp.headers["Location"] == "https://example.com/"
    expect(click(first, link["code"]), 302)
    first.stop(signal.SIGTERM)   # writes every click buffered: a counted HEAD would be there
    second = start_server(SCRIPT, "--db", db)
    assert stats(second, link)["total_clicks"] == 1


# --------------------------------------------------------------------------------------------
# The manage token


def test_stats_patch_and_delete_need_the_manage_token(server):
    link, other = new_link(server), new_link(server)
    url = f"{server.url}/links/{link['code']}"
    for method in ("GET", "PATCH", "DELETE"):
        for path in ([url, url + "/stats"] if method == "GET" else [url]):
            resp = requests.request(method, path, json={} if method == "PATCH" else None,
                                    timeout=TIMEOUT)
            expect_problem(resp, 401)
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            expect_problem(requests.request(method, path, headers=bearer(other),
                                            json={} if method == "PATCH" else None,
                                            timeout=TIMEOUT), 403)
    expect(click(server, link["code"]), 302)


def test_the_token_is_stored_only_as_its_hash(start_server):
    other = start_server(SCRIPT)
    link = new_link(other)
    other.stop()
    data = b"".join(path.read_bytes() for path in other.db_path.parent.glob("db.sqlite3*"))
    assert link["manage_token"].encode() not in data


def test_patch_changes_the_target_at_once_and_honours_if_match(server):
    link = new_link(server)
    expect(click(server, link["code"]), 302)   # now cached
    url = f"{server.url}/links/{link['code']}"
    resp = requests.patch(url, json={"url": "https://example.org/new"}, timeout=TIMEOUT,
                          headers={**bearer(link), "If-Match": '"1"'})
    assert expect_json(resp, 200)["url"] == "https://example.org/new"
    assert resp.headers["ETag"] == '"2"'
    assert click(server, link["code"]).headers["Location"] == "https://example.org/new"
    expect_problem(requests.patch(url, json={"disabled": True}, timeout=TIMEOUT,
                                  headers={**bearer(link), "If-Match": '"1"'}), 412)
    expect_problem(requests.patch(url, json={"code": "x"}, headers=bearer(link),
                                  timeout=TIMEOUT), 422)


def test_delete_makes_the_code_404_for_good(server):
    link = new_link(server, alias="gone-soon")
    expect(click(server, "gone-soon"), 302)    # cached
    expect(requests.delete(f"{server.url}/links/gone-soon", headers=bearer(link),
                           timeout=TIMEOUT), 204)
    expect_problem(click(server, "gone-soon"), 404)
    expect_problem(requests.get(f"{server.url}/links/gone-soon/stats", headers=bearer(link),
                                timeout=TIMEOUT), 404)
    expect_problem(shorten(server, alias="gone-soon"), 409)  # never handed out again


# --------------------------------------------------------------------------------------------
# Click stats


def test_stats_count_clicks_visitors_days_and_referrers(server):
    link = new_link(server)
    code = link["code"]
    for agent in ("curl/1", "curl/1", "browser/2"):
        expect(click(server, code, **{"User-Agent": agent}), 302)
    for n in range(12):
        for _ in range(n + 1):
            expect(click(server, code, Referer=f"https://site{n}.example/page?q={n}"), 302)
    total = 3 + sum(range(1, 13))
    current = stats_when(server, link, lambda s: s["total_clicks"] == total)
    assert current["total_clicks"] == total
    assert current["unique_visitors"] == 3   # curl/1, browser/2, requests' own user agent
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    assert current["clicks_per_day"] == {today: total}
    assert current["top_referrers"] == [{"host": f"site{n}.example", "clicks": n + 1}
                                        for n in range(11, 1, -1)]


TRANSPORTS = ["asyncio", "threaded"]


def wait_past(moment):
    """Let the clock pass `moment` (time.monotonic()): a promise about time needs time to pass."""
    time.sleep(max(0.0, moment - time.monotonic()))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_parallel_clicks_are_counted_exactly_once(start_server, tmp_path, transport):
    db = tmp_path / "links.sqlite3"
    first = start_server(SCRIPT, "--server", transport, "--db", db, "--flush-interval", "0.05")
    link = new_link(first, url="https://example.com/hot")
    answers = []   # list.append is atomic; a Counter's += from 16 threads is not

    def clicks():
        with requests.Session() as session:
            for _ in range(50):
                resp = session.get(f"{first.url}/{link['code']}", allow_redirects=False,
                                   timeout=TIMEOUT)
                answers.append((resp.status_code, resp.headers.get("Location")))

    threads = [threading.Thread(target=clicks) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert collections.Counter(answers) == {(302, "https://example.com/hot"): 800}
    assert stats_when(first, link, lambda s: s["total_clicks"] >= 800,
                      timeout=5)["total_clicks"] == 800
    first.stop(signal.SIGTERM)  # the last flush: a click written twice would show now
    second = start_server(SCRIPT, "--server", transport, "--db", db)
    assert stats(second, link)["total_clicks"] == 800


def test_a_redirect_runs_no_sql_and_the_raw_ip_is_never_stored(start_server):
    other = start_server(SCRIPT, "--trace")
    link = new_link(other)
    expect(click(other, link["code"]), 302)     # loads the link into the cache
    expect(click(other, link["code"], **{"X-Request-Id": "second-click"}), 302)
    trace = other.wait_for_stderr("trace second-click")
    block = other.stderr_text().split(trace, 1)[1].split("\ntrace ", 1)[0]
    assert "SQL" not in block, f"a cached redirect should write nothing itself:\n{block}"
    stats_when(other, link, lambda s: s["total_clicks"] == 2)
    other.stop()
    with sqlite3.connect(other.db_path) as conn:
        stored = conn.execute("SELECT * FROM clicks").fetchall()
    assert len(stored) == 2
    assert not any("127.0.0.1" in str(value) for row in stored for value in row)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_buffered_clicks_are_written_at_a_clean_exit(start_server, tmp_path, transport):
    db = tmp_path / "links.sqlite3"
    first = start_server(SCRIPT, "--server", transport, "--db", db, "--flush-interval", "3600")
    link = new_link(first)
    for _ in range(25):
        expect(click(first, link["code"]), 302)
    assert stats(first, link)["total_clicks"] == 0   # all still in the buffer
    first.stop(signal.SIGTERM)
    second = start_server(SCRIPT, "--server", transport, "--db", db)
    assert stats(second, link)["total_clicks"] == 25


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_kill_9_loses_at_most_the_last_flush_intervals_clicks(start_server, tmp_path, transport):
    interval = 0.1
    db = tmp_path / "links.sqlite3"
    first = start_server(SCRIPT, "--server", transport, "--db", db,
                         "--flush-interval", str(interval))
    links = [new_link(first) for _ in range(10)]   # each 201 is a commit: durable from then on
    hot = links[0]
    for _ in range(30):
        expect(click(first, hot["code"]), 302)
    wait_past(time.monotonic() + 3 * interval)   # more than two intervals, with room to spare
    for _ in range(10):   # answered within the last interval: these may be lost
        expect(click(first, hot["code"]), 302)
    assert first.kill9() == -signal.SIGKILL
    second = start_server(SCRIPT, "--server", transport, "--db", db)
    assert 30 <= stats(second, hot)["total_clicks"] <= 40
    for link in links:
        assert expect_json(requests.get(f"{second.url}/links/{link['code']}",
                                        headers=bearer(link), timeout=TIMEOUT), 200)["url"] \
            == "https://example.com/"
        expect(click(second, link["code"]), 302)


def test_clicks_still_buffered_when_a_link_is_deleted_are_never_written(start_server):
    other = start_server(SCRIPT, "--flush-interval", "3600")
    link, kept = new_link(other), new_link(other)
    for code in (link["code"], kept["code"]):
        expect(click(other, code), 302)
    expect(requests.delete(f"{other.url}/links/{link['code']}", headers=bearer(link),
                           timeout=TIMEOUT), 204)
    other.stop(signal.SIGTERM)   # writes the buffer: both clicks were still in it
    with sqlite3.connect(other.db_path) as conn:
        stored = conn.execute("SELECT code FROM clicks").fetchall()
    assert stored == [(kept["code"],)]


def test_bad_flags_exit_2(start_server):
    from tests.harness import run_once
    for args in (["--public-url", "ftp://x"], ["--flush-interval", "0"], ["--cache-size", "0"]):
        done = run_once(SCRIPT, *args)
        assert done.returncode == 2, (args, done.stderr)
