"""The dashboard over HTTP (Starlette's test client): it refuses to start without ``auth=``,
answers 401/403 to unauthorised requests, serves ``health()`` with recent events and time
series as JSON, bounds what it keeps, and sends its page with a strict CSP. Real self-healing
events come from units of work on a real server; its figures are health()'s (blocked transitions
counted in rows on every path, stale moves apart). The page in a real browser:
``test_dashboard_browser.py``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Generator
from typing import Any

import httpx2 as httpx
import pytest
import sqlalchemy as sa
from scenarios import (
    first_attempt_raises,
    on_event_loop,
    refuse_moves_every_way,
)
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

import resilient_db as rdb
from resilient_db import _commit, _fleet
from resilient_db._state import STATE
from resilient_db.examples.tasks import Base, Task, create_task, move_task
from resilient_db.testing import RedisServer, free_port
from resilient_db.web import Dashboard, Recorder, _recorder, dashboard, token_auth
from resilient_db.web._recorder import (
    MAX_FIELD_CHARS,
    MAX_MESSAGE_CHARS,
    MAX_SERVICES,
    MAX_STATE_CHANGES,
    NO_SERVICE,
)

pytestmark = pytest.mark.usefixtures("no_backoff")

TOKEN = "a-long-enough-dashboard-token"


@pytest.fixture
def tasks(engine: sa.Engine) -> sa.Engine:
    """The tasks schema."""
    Base.metadata.create_all(engine)
    return engine


def mounted(board: Any) -> TestClient:
    return TestClient(Starlette(routes=[Mount("/admin/self-healing", app=board)]))


def test_refuses_to_start_without_auth() -> None:
    with pytest.raises(TypeError, match="dashboard\\(\\) needs auth="):
        dashboard()
    with pytest.raises(TypeError, match="needs a callable"):
        dashboard(auth="admin")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 16 characters"):
        token_auth("short")


@pytest.mark.parametrize(
    "token", [TOKEN + "\n", f" {TOKEN}", " " * 16, TOKEN + "é", TOKEN[:8] + " " + TOKEN[8:]]
)
def test_a_token_no_request_could_carry_is_refused_at_once(token: str) -> None:
    """A header value is stripped and ASCII: a token read from a file with its line end, or
    with spaces or non-ASCII characters in it, could never match: refused, not 403 forever."""
    with pytest.raises(ValueError, match="printable ASCII"):
        token_auth(token)


def test_the_dashboard_class_checks_its_arguments_as_dashboard_does() -> None:
    """``Dashboard`` is public: one built without a check (or with nonsense) fails at once,
    not with an error at every request."""
    good: dict[str, Any] = {
        "auth": lambda request: True,
        "title": "t",
        "poll_seconds": 2.0,
        "events": 10,
        "source": None,
        "health": rdb.health,
    }
    for name, bad, error in (
        ("auth", None, "dashboard\\(\\) needs auth="),
        ("auth", "admin", "needs a callable"),
        ("poll_seconds", float("nan"), "poll_seconds"),
        ("events", -1, "events"),
        ("health", {"ok": True}, "health"),
        ("source", object(), "Recorder"),
        ("title", None, "title"),
        ("title", 123, "title"),
        # (a byte of another encoding: every page and data.json answered 500)
        ("title", "Orders \udcff", "title"),
    ):
        with pytest.raises((TypeError, ValueError), match=error):
            Dashboard(**{**good, name: bad})
    board = Dashboard(**good)
    assert mounted(board).get("/admin/self-healing/").status_code == 200


def test_a_token_auth_without_query_parameter_takes_the_header_only() -> None:
    """``query_param=None``: a token in the URL (kept by access logs, history, proxies) is not
    accepted; the header is."""
    client = mounted(dashboard(auth=token_auth(TOKEN, query_param=None)))
    path = "/admin/self-healing/data.json"
    assert client.get(path, params={"token": TOKEN}).status_code == 401
    assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    renamed = mounted(dashboard(auth=token_auth(TOKEN, query_param="key")))
    assert renamed.get(path, params={"token": TOKEN}).status_code == 401
    assert renamed.get(path, params={"key": TOKEN}).status_code == 200
    for bad in ("", 3):
        with pytest.raises(ValueError, match="query_param"):
            token_auth(TOKEN, query_param=bad)  # type: ignore[arg-type]


def test_a_page_opened_with_the_token_in_its_url_carries_it_on_in_a_cookie() -> None:
    """``?token=`` ends up in access logs (each of the page's polls used to carry it, every
    ``poll_seconds``), history and Referer headers: the page takes it out of the address bar
    and its answer sets an HttpOnly SameSite=Strict cookie for the dashboard's path only, an
    HMAC of the token, which the check takes; the header-only check sets and takes none."""
    client = mounted(dashboard(auth=token_auth(TOKEN)))
    page = client.get("/admin/self-healing/", params={"token": TOKEN})
    assert page.status_code == 200
    assert 'data-token-param="token"' in page.text  # the page's script takes it out
    cookie = page.headers["set-cookie"]
    name, _, value = cookie.partition(";")[0].partition("=")
    assert name == "resilient_db_dashboard"
    assert TOKEN not in cookie
    attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/admin/self-healing"} <= attributes
    assert "secure" not in attributes  # (plain http: a browser would drop a Secure one)
    data = "/admin/self-healing/data.json"
    assert client.get(data).status_code == 200  # the cookie alone, as a reload sends it
    assert client.get(data, params={"token": "wrong"}).status_code == 403  # the URL's first
    client.cookies.clear()
    assert client.get(data).status_code == 401
    # a cookie no accepted token made: as no cookie (the page asks for a token again)
    assert client.get(data, headers={"Cookie": f"{name}={value[:-1]}0"}).status_code == 401
    assert client.get(data, headers={"Cookie": f"{name}={TOKEN}"}).status_code == 401
    assert client.get("/admin/self-healing/").status_code == 401
    assert "set-cookie" not in client.get(data, params={"token": TOKEN}).headers
    with TestClient(
        Starlette(routes=[Mount("/admin/self-healing", app=dashboard(auth=token_auth(TOKEN)))]),
        base_url="https://testserver",
    ) as secure:
        answer = secure.get("/admin/self-healing/", params={"token": TOKEN})
        assert "secure" in {p.strip().lower() for p in answer.headers["set-cookie"].split(";")}
    header_only = mounted(dashboard(auth=token_auth(TOKEN, query_param=None)))
    page = header_only.get("/admin/self-healing/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert "set-cookie" not in page.headers
    assert 'data-token-param=""' in page.text
    assert header_only.get(data, headers={"Cookie": f"{name}={value}"}).status_code == 401


OLD_TOKEN = "the-old-dashboard-token-being-rotated-out"


def cookie_of(answer: httpx.Response) -> str:
    """The dashboard cookie's value set by ``answer``."""
    name, _, value = answer.headers["set-cookie"].partition(";")[0].partition("=")
    assert name == "resilient_db_dashboard"
    return value


@pytest.mark.parametrize(
    "given", [(TOKEN, OLD_TOKEN), ([TOKEN, OLD_TOKEN],), ((TOKEN, OLD_TOKEN),)]
)
def test_several_tokens_are_accepted_so_one_can_be_rotated_out(given: tuple[Any, ...]) -> None:
    """``token_auth(new, old)`` (or a sequence of them) accepts both, by header, in the URL and
    by the cookie each sets; once the old one is removed (the application restarted with the
    new one only), the old token is refused (403), and a cookie made from it is answered as no
    credentials (401 with the challenge and the hint to open the page with ``?token=``), so
    that the page asks for a token again. Before, one token only: rotating it locked out every
    open page with a 403 it could do nothing about."""
    data = "/admin/self-healing/data.json"
    page = "/admin/self-healing/"
    rotating = mounted(dashboard(auth=token_auth(*given)))
    cookies = {}
    for token in (TOKEN, OLD_TOKEN):
        assert rotating.get(data, headers={"Authorization": f"Bearer {token}"}).status_code == 200
        rotating.cookies.clear()
        opened = rotating.get(page, params={"token": token})
        assert opened.status_code == 200
        cookies[token] = cookie_of(opened)
        assert rotating.get(data).status_code == 200  # the cookie alone
    assert cookies[TOKEN] != cookies[OLD_TOKEN]  # each token's own
    assert (
        rotating.get(data, headers={"Authorization": "Bearer not-any-of-the-tokens"}).status_code
        == 403
    )

    rotated = mounted(dashboard(auth=token_auth(TOKEN)))
    stale = rotated.get(data, headers={"Cookie": f"resilient_db_dashboard={cookies[OLD_TOKEN]}"})
    rotated.cookies.clear()
    missing = rotated.get(data)
    assert stale.status_code == missing.status_code == 401
    assert stale.headers["www-authenticate"] == missing.headers["www-authenticate"]
    assert stale.json() == missing.json()
    assert "open the dashboard with ?token=<token>" in stale.json()["detail"]
    assert rotated.get(data, headers={"Authorization": f"Bearer {OLD_TOKEN}"}).status_code == 403
    assert rotated.get(data, params={"token": OLD_TOKEN}).status_code == 403
    fresh = rotated.get(data, headers={"Cookie": f"resilient_db_dashboard={cookies[TOKEN]}"})
    assert fresh.status_code == 200


def set_cookie_attributes(answer: httpx.Response) -> tuple[str, set[str]]:
    """The dashboard cookie's value set by ``answer``, and its attributes (lower case)."""
    name_value, *attributes = answer.headers["set-cookie"].split(";")
    name, _, value = name_value.partition("=")
    assert name == "resilient_db_dashboard"
    return value, {a.strip().lower() for a in attributes}


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_stale_cookies_401_clears_the_cookie(scheme: str) -> None:
    """A cookie the check no longer takes (its token rotated out, or none of its cookies) is
    answered 401 as no credentials, and that answer deletes it: ``Max-Age=0`` with the path and
    flags it was set with (``Secure`` as it was), on ``data.json`` as on the page (a reload).
    Before, the 401 left it, and the browser sent it on with every poll and reload. A 401
    without the cookie, a 403, and the answer of a check that takes no cookie clear nothing."""
    data, page = "/admin/self-healing/data.json", "/admin/self-healing/"

    def client(auth: Any) -> TestClient:
        app = Starlette(routes=[Mount("/admin/self-healing", app=dashboard(auth=auth))])
        return TestClient(app, base_url=f"{scheme}://testserver")

    with client(token_auth(TOKEN, OLD_TOKEN)) as rotating:
        opened = rotating.get(page, params={"token": OLD_TOKEN})
        old_cookie, set_with = set_cookie_attributes(opened)
    stale = {"Cookie": f"resilient_db_dashboard={old_cookie}"}
    with client(token_auth(TOKEN)) as rotated:
        for path in (data, page):
            for cookies in (stale, {"Cookie": "resilient_db_dashboard=not-a-cookie-of-ours"}):
                answer = rotated.get(path, headers=cookies)
                assert answer.status_code == 401
                assert "open the dashboard with ?token=<token>" in answer.json()["detail"]
                value, attributes = set_cookie_attributes(answer)
                assert value in ("", '""')
                assert "max-age=0" in attributes
                flags = {a for a in attributes if not a.startswith(("max-age", "expires"))}
                assert flags == {a for a in set_with if not a.startswith("max-age")}
                assert {"httponly", "samesite=strict", "path=/admin/self-healing"} <= flags
                assert ("secure" in flags) is (scheme == "https")
            rotated.cookies.clear()
            assert "set-cookie" not in rotated.get(path).headers  # no cookie: none to clear
            wrong = rotated.get(path, headers={**stale, "Authorization": f"Bearer {OLD_TOKEN}"})
            assert wrong.status_code == 403
            assert "set-cookie" not in wrong.headers
    with client(token_auth(TOKEN, query_param=None)) as header_only:
        answer = header_only.get(data, headers=stale)
        assert answer.status_code == 401
        assert "set-cookie" not in answer.headers


def test_a_page_answer_sets_the_cookie_of_the_token_in_its_url_only_when_it_is_accepted() -> None:
    """The page's cookie is made from the token of its URL; a request let in by its header
    with another, wrong, token in its URL gets none."""
    client = mounted(dashboard(auth=token_auth(OLD_TOKEN, TOKEN)))
    page = "/admin/self-healing/"
    own = mounted(dashboard(auth=token_auth(TOKEN)))
    assert cookie_of(client.get(page, params={"token": TOKEN})) == cookie_of(
        own.get(page, params={"token": TOKEN})
    )
    client.cookies.clear()
    answer = client.get(
        page, params={"token": "wrong-token-ignored"}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert answer.status_code == 200
    assert "set-cookie" not in answer.headers


def test_every_accepted_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each request is compared with every accepted token (``hmac.compare_digest``), whichever
    matches: no early way out that would tell which token, or how many, by its timing."""
    from resilient_db.web import _dashboard  # noqa: PLC0415

    third = "a-third-dashboard-token-0123"
    client = mounted(dashboard(auth=token_auth(TOKEN, OLD_TOKEN, third)))
    compared: list[bytes] = []
    compare = _dashboard.hmac.compare_digest

    def counted(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return compare(a, b)

    monkeypatch.setattr(_dashboard.hmac, "compare_digest", counted)
    data = "/admin/self-healing/data.json"
    for token, status in ((TOKEN, 200), (third, 200), ("not-one-of-them-at-all", 403)):
        compared.clear()
        answer = client.get(data, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == status
        assert compared == [t.encode() for t in (TOKEN, OLD_TOKEN, third)]


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (("",), ValueError, "empty token \\(the token; an unset environment variable\\?\\)"),
        ((TOKEN, ""), ValueError, "empty token \\(token 2;"),
        (([],), ValueError, "at least one token"),
        ((TOKEN, "short"), ValueError, "at least 16 characters \\(token 2 has 5\\)"),
        ((TOKEN, OLD_TOKEN + "\n"), ValueError, "printable ASCII .*token 2"),
        ((None,), TypeError, "got NoneType"),
        ((TOKEN.encode(),), TypeError, "got bytes"),
        (({"token": TOKEN},), TypeError, "got dict"),
        (([TOKEN, 123],), TypeError, "token 2 is int"),
        ((TOKEN, None), TypeError, "token 2 is NoneType"),
    ],
)
def test_bad_tokens_are_refused_naming_the_problem(
    args: tuple[Any, ...], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        token_auth(*args)


def test_secure_cookie_forces_the_cookies_secure_attribute_either_way() -> None:
    """Behind a proxy that ends TLS and forwards plain http (no ``X-Forwarded-Proto``), the
    request looks like http and the cookie was never ``Secure``: ``secure_cookie=True`` makes
    it so; ``False`` leaves it off even over https; None (the default) follows the request."""

    def secure(auth: Any, base_url: str) -> bool:
        app = Starlette(routes=[Mount("/admin/self-healing", app=dashboard(auth=auth))])
        with TestClient(app, base_url=base_url) as client:
            answer = client.get("/admin/self-healing/", params={"token": TOKEN})
        assert answer.status_code == 200
        attributes = {p.strip().lower() for p in answer.headers["set-cookie"].split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/admin/self-healing"} <= attributes
        return "secure" in attributes

    http, https = "http://testserver", "https://testserver"
    assert secure(token_auth(TOKEN, secure_cookie=True), http)
    assert secure(token_auth(TOKEN, secure_cookie=True), https)
    assert not secure(token_auth(TOKEN, secure_cookie=False), https)
    assert not secure(token_auth(TOKEN, secure_cookie=False), http)
    assert not secure(token_auth(TOKEN), http)
    assert secure(token_auth(TOKEN, secure_cookie=None), https)
    for bad in ("yes", 1, 0):
        with pytest.raises(TypeError, match=r"secure_cookie=\.\.\.\) must be True, False or None"):
            token_auth(TOKEN, secure_cookie=bad)  # type: ignore[arg-type]


def test_a_check_object_neither_hashable_nor_weakly_referable_serves_the_page() -> None:
    """The page looks its check up among ``token_auth``'s: a check that is a dataclass
    instance (unhashable) or a ``__slots__`` class's (no weak reference) is simply not one of
    them, and the page is served without a token parameter, not answered with a 500."""

    @dataclasses.dataclass
    class StaffOnly:
        role: str

        def __call__(self, request: Request) -> bool:
            return request.headers.get("x-role") == self.role

    class Always:
        __slots__ = ()

        def __call__(self, request: Request) -> bool:
            return True

    for check in (StaffOnly("staff"), Always()):
        client = mounted(dashboard(auth=check))
        page = client.get("/admin/self-healing/", headers={"x-role": "staff"})
        assert page.status_code == 200, page.text
        assert 'data-token-param=""' in page.text
        assert "set-cookie" not in page.headers


def test_unauthorised_requests_get_401_or_403() -> None:
    client = mounted(dashboard(auth=token_auth(TOKEN)))
    for path in ("/admin/self-healing/", "/admin/self-healing/data.json"):
        client.cookies.clear()  # (the page opened with ?token= set one)
        missing = client.get(path)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert missing.headers["content-type"] == "application/problem+json"
        assert "health" not in missing.text
        wrong = client.get(path, headers={"Authorization": "Bearer not-the-token-at-all"})
        assert wrong.status_code == 403
        assert client.get(path, params={"token": "wrong"}).status_code == 403
        assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert client.get(path, params={"token": TOKEN}).status_code == 200

    calls: list[str] = []

    async def staff_only(request: Request) -> bool:  # an async check, deciding per request
        calls.append(request.url.path)
        return request.headers.get("x-role") == "staff"

    client = mounted(dashboard(auth=staff_only))
    assert client.get("/admin/self-healing/data.json").status_code == 403
    assert (
        client.get("/admin/self-healing/data.json", headers={"x-role": "staff"}).status_code == 200
    )
    assert calls == ["/admin/self-healing/data.json"] * 2
    client = mounted(dashboard(auth=lambda request: "yes"))  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="must return True or False"):
        client.get("/admin/self-healing/")


def test_data_is_health_plus_events_and_series_from_real_units(
    engine: sa.Engine, pg_url: str, service: str
) -> None:
    board = dashboard(auth=lambda request: True, events=50)
    Sessions = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(max_retries=2, failure_threshold=3)
    )
    calls: list[int] = []

    def flaky(session: sa.orm.Session) -> int:
        calls.append(1)
        if len(calls) == 1:
            session.execute(sa.text("SELECT raise_code('40001')"))
        return 1

    assert Sessions.run(flaky) == 1  # one retry (serialization failure), then recovered
    for _ in range(3):  # unavailable: every attempt fails, the breaker opens
        with contextlib.suppress(sa.exc.DBAPIError, rdb.CircuitOpenError):
            Sessions.run(lambda s: s.execute(sa.text("SELECT raise_code('57P03')")))
    client = mounted(board)
    data = client.get("/admin/self-healing/data.json").json()
    counters = rdb.health()["services"][service]["counters"]
    assert data["health"]["services"][service]["counters"] == counters
    assert data["health"]["healthy"] is False
    assert data["health"]["services"][service]["breaker"]["state"] == "open"
    names = [e["name"] for e in data["events"] if e["service"] == service]
    assert names.index("retry") < names.index("recovered") < names.index("breaker_opened")
    assert "breaker_opened" in names
    series = data["series"][service]
    assert series["retries_by_sqlstate"] == {"40001": 1, "57P03": 2}
    assert [state for _, state in series["breaker_states"]] == ["open"]
    assert sum(row[1] for row in series["buckets"]) == 3  # retries per second, summed
    assert data["bucket_columns"][:2] == ["second", "retries"]
    page = client.get("/admin/self-healing/")
    assert page.headers["content-type"].startswith("text/html")
    assert client.get("/admin/self-healing/nothing").status_code == 404
    assert client.post("/admin/self-healing/data.json").status_code == 405


def test_the_page_is_escaped_and_locked_down() -> None:
    evil = '<script>alert("x")</script>'
    client = mounted(dashboard(auth=lambda request: True, title=evil))
    page = client.get("/admin/self-healing/")
    assert evil not in page.text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page.text
    csp = page.headers["content-security-policy"]
    nonce = re.search(r"script-src 'nonce-([^']+)'", csp)
    assert nonce is not None
    assert f'<script nonce="{nonce.group(1)}">' in page.text
    assert "innerHTML" not in page.text
    assert "http://" not in page.text.replace("http://www.w3.org/2000/svg", "")  # no CDN
    assert "https://" not in page.text
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-store"
    # another request, another nonce
    again = client.get("/admin/self-healing/").headers["content-security-policy"]
    assert again != csp


def test_the_title_is_shown_as_given_even_with_the_pages_placeholders() -> None:
    title = "Ops @NONCE@ @POLL@ @EVENTS@"
    client = mounted(dashboard(auth=lambda request: True, title=title))
    page = client.get("/admin/self-healing/")
    nonce = re.search(r"script-src 'nonce-([^']+)'", page.headers["content-security-policy"])
    assert nonce is not None
    assert f"<title>{title}</title>" in page.text
    assert f"<h1>{title}</h1>" in page.text
    assert page.text.count(nonce.group(1)) == 2  # the style's and the script's, nowhere else


def test_recorder_is_bounded() -> None:
    now = [1_000_000.0]
    rec = Recorder(max_events=5, window=30, clock=lambda: now[0])
    for n in range(100):
        now[0] += 1.0
        rec(
            rdb.SelfHealEvent(
                name="retry",
                service="svc",
                level=30,
                message=f"retry {n}",
                fields={"sqlstate": f"S{n}", "pk": "secret"},
            )
        )
    snap = rec.snapshot()
    assert [e["message"] for e in snap["events"]] == [f"retry {n}" for n in range(95, 100)]
    assert "pk" not in snap["events"][0]["fields"]
    assert len(snap["series"]["svc"]["buckets"]) <= 30
    assert len(snap["series"]["svc"]["retries_by_sqlstate"]) == 64  # labels are capped too
    for n in range(100):
        rec(rdb.SelfHealEvent(name="retry", service=f"s{n}", level=30, message="", fields={}))
    assert len(rec.snapshot()["series"]) == 64
    with pytest.raises(ValueError, match="max_events"):
        Recorder(max_events=0)


def test_recorder_counts_rows_and_keeps_the_guards_series_when_full() -> None:
    """A blocked-transition event counts its ``blocked_rows`` (1 without), a stale one counts
    apart; the guard's events (no service) are kept even once ``MAX_SERVICES`` are tracked."""
    rec = Recorder(clock=lambda: 1_000_000.0)
    for n in range(MAX_SERVICES):
        rec(rdb.SelfHealEvent(name="retry", service=f"s{n}", level=30, message="", fields={}))
    for fields in (
        {"via": "orm-update", "blocked_rows": 4, "stale": False},
        {"via": "flush", "stale": False},
        {"via": "flush", "blocked_rows": 1, "stale": True},
    ):
        rec(
            rdb.SelfHealEvent(
                name="transition_blocked", service=None, level=40, message="", fields=fields
            )
        )
    series = rec.snapshot()["series"][NO_SERVICE]
    assert series["blocked_by_via"] == {"orm-update": 4, "flush": 1}
    assert series["stale_by_via"] == {"flush": 1}
    assert [row[4:] for row in series["buckets"]] == [[5, 1]]


def _retry(service: str = "svc") -> rdb.SelfHealEvent:
    return rdb.SelfHealEvent(name="retry", service=service, level=30, message="", fields={})


def test_the_librarys_events_without_a_service_are_listed_apart_from_the_guards_series(
    engine: sa.Engine,
) -> None:
    """``install_commit_markers`` finding a later release's markers (a rollback), a shared
    state lost before any service used it: events of the library with no service, and not the
    transition guard's. They were listed under ``(transitions)`` and counted in the guard's
    series (the transitions card's); they are listed under ``(library)``, counted in no
    series, and a ``data.json?after=<cursor>`` delta lists them as the full answer does."""
    rec = Recorder()
    rdb.add_hook(rec)
    try:
        cursor = rec.snapshot()["cursor"]
        rdb.install_commit_markers(engine)
        later = _commit._MARKERS_COMMENT.replace(
            f"version {_commit.MARKERS_VERSION}:", f"version {_commit.MARKERS_VERSION + 1}:"
        )
        with engine.begin() as conn:
            conn.execute(sa.text(f"COMMENT ON TABLE resilient_db.commit_markers IS '{later}'"))
        rdb.install_commit_markers(engine)  # left as they are, said
    finally:
        rdb.remove_hook(rec)
    rec(_event("shared_state_down", None))
    rec(_event("transition_blocked", None, via="flush"))  # the guard's: its series
    full = rec.snapshot()
    assert [(e["name"], e["service"]) for e in full["events"]] == [
        ("commit_markers_newer", "(library)"),
        ("shared_state_down", "(library)"),
        ("transition_blocked", NO_SERVICE),
    ]
    assert list(full["series"]) == [NO_SERVICE]
    assert full["series"][NO_SERVICE]["events_by_name"] == {"transition_blocked": 1}
    delta = rec.snapshot(after=cursor)
    assert delta["delta"] is True
    assert (delta["events"], delta["series"]) == (full["events"], full["series"])
    board = dashboard(auth=lambda request: True, recorder=rec)
    data = mounted(board).get("/admin/self-healing/data.json").json()
    assert [e["service"] for e in data["events"]] == ["(library)"] * 2 + [NO_SERVICE]
    assert list(data["series"]) == [data["no_service"]]


def test_recorder_keeps_one_bucket_per_second_in_order_when_times_come_out_of_order() -> None:
    """An event recorded after another may carry an earlier time (a clock read before the
    lock, a wall clock stepped back): it is counted in its own second's row, each second one
    row, in order; one older than every row of a full window is counted nowhere."""
    now = [103.0]
    rec = Recorder(clock=lambda: now[0])
    times = [101.5, 100.5, 101.7, 99.2, 100.9, 103.0, 102.1]
    for when in times:
        now[0] = when
        rec(_retry())
    now[0] = 104.0
    snap = rec.snapshot()
    rows = snap["series"]["svc"]["buckets"]
    assert [row[:2] for row in rows] == [[99, 1], [100, 2], [101, 2], [102, 1], [103, 1]]
    assert [e["time"] for e in snap["events"]] == times
    now = [1_000.0]
    full = Recorder(window=10, clock=lambda: now[0])
    for second in range(1_000, 1_010):
        now[0] = second
        full(_retry())
    now[0] = 999.0  # older than the window's every row: not counted, nothing dropped
    full(_retry())
    now[0] = 1_004.5  # a second it holds
    full(_retry())
    now[0] = 1_010.0
    seconds = [row[0] for row in full.snapshot()["series"]["svc"]["buckets"]]
    assert seconds == list(range(1_001, 1_010))  # (the snapshot's window: after 1,000)


def test_recorder_buckets_from_threads_are_one_per_second_in_order() -> None:
    """Hooks run in the units' threads: events recorded by four threads around second
    boundaries (a clock that moves a second every 50 readings) make one row per second, in
    order, whose counts add up to every event; the events are listed in the order of their
    times."""
    ticks = iter(range(10**9))
    rec = Recorder(max_events=200, clock=lambda: 1_000_000 + next(ticks) / 50)
    per_thread = 5_000

    def work() -> None:
        for _ in range(per_thread):
            rec(_retry())

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snap = rec.snapshot()
    seconds = [row[0] for row in snap["series"]["svc"]["buckets"]]
    assert seconds == sorted(set(seconds))
    assert sum(row[1] for row in snap["series"]["svc"]["buckets"]) == 4 * per_thread
    times = [e["time"] for e in snap["events"]]
    assert times == sorted(times)


def test_recorder_beyond_max_services_lists_those_left_out_and_keeps_the_active() -> None:
    """Beyond ``MAX_SERVICES`` a new service has no series: it is listed in ``left_out`` (the
    page says so), unless a tracked one had no event for a whole window, whose place it
    takes (that one is then listed)."""
    now = [1_000_000.0]
    rec = Recorder(window=60, clock=lambda: now[0])
    rec(_retry("s0"))
    now[0] += 5
    for n in range(1, MAX_SERVICES):
        rec(_retry(f"s{n}"))
    rec(_retry("late"))  # every tracked service active within the window: left out
    snap = rec.snapshot()
    assert (len(snap["series"]), "late" in snap["series"]) == (MAX_SERVICES, False)
    assert (snap["left_out"], snap["max_services"]) == (["late"], MAX_SERVICES)
    rec(_retry("late"))
    assert rec.snapshot()["left_out"] == ["late"]  # listed once
    now[0] += 57  # s0 idle for a whole window now, the others not yet
    rec(_retry("late"))
    snap = rec.snapshot()
    assert "late" in snap["series"]
    assert "s0" not in snap["series"]
    assert snap["series"]["late"]["buckets"][0][1] == 1
    assert (len(snap["series"]), snap["left_out"]) == (MAX_SERVICES, ["s0"])
    rec.clear()
    assert rec.snapshot()["left_out"] == []


def test_data_json_lists_the_services_left_out() -> None:
    rec = Recorder(clock=lambda: 1_000_000.0)
    for n in range(MAX_SERVICES + 2):
        rec(_retry(f"svc-{n:03d}"))
    board = mounted(dashboard(auth=lambda request: True, recorder=rec))
    data = board.get("/admin/self-healing/data.json").json()
    assert data["left_out"] == [f"svc-{MAX_SERVICES:03d}", f"svc-{MAX_SERVICES + 1:03d}"]
    assert data["max_services"] == MAX_SERVICES


def test_blocked_transitions_are_rows_as_health_counts_them_stale_apart(
    tasks: sa.Engine, service: str
) -> None:
    """Every path that refuses a move, on a real server: a bulk UPDATE whose filter leaves four
    rows unchanged (one event naming 4 rows), one by primary key with a parameter set skipped,
    a bulk UPDATE refused in raise mode (4 rows named), a flush, the database trigger, and a
    stale flush. The dashboard's blocked counts (by path, per second) are health()'s
    ``blocked_transitions``, row for row; the stale move is shown apart, never as blocked."""
    board = dashboard(auth=lambda request: True)
    board.recorder.clear()  # the guard's events of earlier tests (health() was reset for this one)
    refuse_moves_every_way(tasks, service, trigger=True)

    data = mounted(board).get("/admin/self-healing/data.json").json()
    transitions = rdb.health()["transitions"]
    assert data["health"]["transitions"] == transitions
    assert transitions["blocked_transitions"] == 4 + 1 + 4 + 1 + 1
    assert transitions["stale_transitions"] == 1
    series = data["series"][data["no_service"]]
    assert series["blocked_by_via"] == {"orm-update": 4 + 1 + 4, "flush": 1, "db": 1}
    assert sum(series["blocked_by_via"].values()) == transitions["blocked_transitions"]
    assert series["stale_by_via"] == {"flush": 1}
    columns = data["bucket_columns"]
    blocked, stale = columns.index("blocked"), columns.index("stale")
    assert sum(row[blocked] for row in series["buckets"]) == transitions["blocked_transitions"]
    assert sum(row[stale] for row in series["buckets"]) == transitions["stale_transitions"]
    fields = [e["fields"] for e in data["events"] if e["name"] == "transition_blocked"]
    assert sum(f["blocked_rows"] for f in fields if not f.get("stale")) == 11  # shown per event
    assert [f["via"] for f in fields if f.get("stale")] == ["flush"]

    rdb.reset_state()  # health() starts over: so does what the dashboard shows
    data = mounted(board).get("/admin/self-healing/data.json").json()
    assert data["health"]["transitions"]["blocked_transitions"] == 0
    assert (data["events"], data["series"]) == ([], {})


def page_labels(page: str) -> set[str]:
    """The counters the page's script shows on a service's card (its ``LABELS``)."""
    found = re.search(r"const LABELS = lookup\(\{(.*?)\}\);", page, re.DOTALL)
    assert found is not None
    return set(re.findall(r"(\w+):", found.group(1)))


def test_every_counter_of_health_is_shown_validation_failures_included(
    engine: sa.Engine, service: str
) -> None:
    """A result failing its ``validate=`` check on a real unit counts in the service's
    ``response_validation_failures``: data.json carries it and the page has a box for it, as
    for every other count health() keeps per service."""
    board = dashboard(auth=lambda request: True)
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config())

    def answer(session: Session) -> int:
        return int(session.execute(sa.text("SELECT -1")).scalar_one())

    with pytest.raises(rdb.ResponseValidationError):
        Sessions.run(answer, validate=lambda value: value > 0)
    client = mounted(board)
    counters = client.get("/admin/self-healing/data.json").json()["health"]["services"][service][
        "counters"
    ]
    assert counters == rdb.health()["services"][service]["counters"]
    assert counters["response_validation_failures"] == 1
    shown = page_labels(client.get("/admin/self-healing/").text)
    assert "response_validation_failures" in shown
    scalar = {key for key, value in counters.items() if not isinstance(value, dict)}
    assert scalar <= shown  # retries_by_class is shown as chips


# -- bounds, checks and what the dashboard refuses -------------------------------------------------
def test_a_client_chosen_megabyte_is_cut_in_the_log_line_the_hooks_and_the_dashboard(
    tasks: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client asks to move a task to a status of a megabyte: the guard refuses it, and the
    value is cut (marked with how much was left off) in the ``[SELF-HEAL]`` line, in every
    hook's fields and in what the dashboard keeps and serves: every such request would keep
    megabytes otherwise."""
    board = dashboard(auth=lambda request: True)
    Sessions = rdb.ResilientSession(tasks, service=service, config=rdb.Config())
    with Session(tasks) as session, session.begin():
        task = create_task(session, title="t", idem_key=str(uuid.uuid4()))
        session.flush()
        task_id = task.id
    huge = "X" * 1_000_000
    seen: list[rdb.SelfHealEvent] = []
    rdb.add_hook(seen.append)

    def move(session: Session) -> None:
        found = session.get(Task, task_id)
        assert found is not None
        move_task(session, found, huge, idem_key=str(uuid.uuid4()))
        session.flush()

    try:
        with caplog.at_level(logging.INFO, logger="resilient_db"):
            for _ in range(3):
                with pytest.raises(rdb.IllegalTransitionError):
                    Sessions.run(move)
    finally:
        rdb.remove_hook(seen.append)
    lines = [r for r in caplog.records if "Status transition blocked" in r.getMessage()]
    assert len(lines) == 3
    line = lines[0].getMessage()
    assert len(line) < 2_000
    assert "X" * 1000 + "…(+999000 characters)" in line
    assert lines[0].self_heal["to_state"] == "X" * 1000 + "…(+999000 characters)"  # type: ignore[attr-defined]
    assert seen[0].fields["to_state"] == "X" * 1000 + "…(+999000 characters)"

    answer = mounted(board).get("/admin/self-healing/data.json")
    assert len(answer.content) < 20_000
    events = [e for e in answer.json()["events"] if e["name"] == "transition_blocked"]
    assert len(events) == 3
    for event in events:
        assert len(event["message"]) < MAX_MESSAGE_CHARS + 30
        assert event["message"].endswith(" characters)")
        assert event["fields"]["to_state"] == (
            "X" * MAX_FIELD_CHARS + f"…(+{1000 - MAX_FIELD_CHARS + 21} characters)"
        )
    assert rdb.health()["transitions"]["blocked_transitions"] == 3


def test_recorder_cuts_long_messages_and_fields() -> None:
    """What one event keeps is bounded whatever it carries (a hook may be fed directly)."""
    rec = Recorder(max_events=3)
    rec(
        rdb.SelfHealEvent(
            name="transition_blocked",
            service=None,
            level=40,
            message="m" * 1_000_000,
            fields={"to_state": "s" * 1_000_000, "via": "flush", "blocked_rows": 1},
        )
    )
    (event,) = rec.snapshot()["events"]
    assert event["message"] == "m" * MAX_MESSAGE_CHARS + (
        f"…(+{1_000_000 - MAX_MESSAGE_CHARS} characters)"
    )
    assert event["fields"]["to_state"] == "s" * MAX_FIELD_CHARS + (
        f"…(+{1_000_000 - MAX_FIELD_CHARS} characters)"
    )
    assert event["fields"]["via"] == "flush"
    assert event["fields"]["blocked_rows"] == 1


def test_a_sync_check_runs_in_the_threadpool_not_on_the_event_loop() -> None:
    """A sync check may block (a session lookup in a database): it runs in Starlette's
    threadpool, so the application keeps answering meanwhile. Async checks, sync ones
    returning an awaitable and objects with an async ``__call__`` are awaited; a check that
    raises or returns a non-bool is a 500, never a way in."""
    pinged = threading.Event()
    checking = threading.Event()
    loops: list[bool] = []

    def blocking(request: Request) -> bool:
        loops.append(on_event_loop())
        checking.set()
        return pinged.wait(10)  # let in once the application answered another request

    def ping(request: Request) -> JSONResponse:
        pinged.set()
        return JSONResponse({"pong": True})

    app = Starlette(
        routes=[Route("/ping", ping), Mount("/admin/self-healing", app=dashboard(auth=blocking))]
    )
    answers: list[int] = []
    with TestClient(app) as client:
        waiting = threading.Thread(
            target=lambda: answers.append(client.get("/admin/self-healing/data.json").status_code)
        )
        waiting.start()
        assert checking.wait(10)
        assert client.get("/ping").json() == {"pong": True}
        waiting.join(20)
    assert answers == [200]
    assert loops == [False]

    async def decide(request: Request) -> bool:
        loops.append(on_event_loop())
        return request.headers.get("x-role") == "staff"

    class Verdict:  # an awaitable that is no coroutine
        def __init__(self, verdict: bool) -> None:
            self.verdict = verdict

        def __await__(self) -> Generator[Any, None, bool]:
            loops.append(on_event_loop())
            return self.verdict
            yield  # a generator: awaitable

    class AsyncCall:
        async def __call__(self, request: Request) -> bool:
            return await decide(request)

    def coroutine_of(request: Request) -> Awaitable[bool]:  # a sync callable, an awaitable out
        return decide(request)

    def verdict_of(request: Request) -> Verdict:
        return Verdict(request.headers.get("x-role") == "staff")

    checks: list[Any] = [decide, AsyncCall(), coroutine_of, verdict_of]
    for check in checks:
        loops.clear()
        client = mounted(dashboard(auth=check))
        assert client.get("/admin/self-healing/data.json").status_code == 403
        staff = client.get("/admin/self-healing/data.json", headers={"x-role": "staff"})
        assert staff.status_code == 200
        assert loops == [True, True]  # awaited on the event loop

    def broken(request: Request) -> bool:
        raise ValueError("the session store is down")

    def unsure(request: Request) -> Awaitable[str]:
        async def maybe() -> str:
            return "yes"

        return maybe()

    for check in (broken, unsure):
        client = TestClient(
            Starlette(routes=[Mount("/admin/self-healing", app=dashboard(auth=check))]),
            raise_server_exceptions=False,
        )
        answer = client.get("/admin/self-healing/data.json")
        assert answer.status_code == 500
        assert "health" not in answer.text


def test_a_websocket_is_refused_with_1008_before_any_check() -> None:
    """The dashboard serves no WebSocket: a connection is closed with 1008 (policy violation),
    not a 500 and a logged traceback, and the auth check is not even asked."""
    calls: list[str] = []

    def check(request: Request) -> bool:
        calls.append(request.url.path)
        return True

    client = mounted(dashboard(auth=check))
    for path in ("/admin/self-healing/", "/admin/self-healing/data.json"):
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect(path):
            pass
        assert refused.value.code == 1008
    assert calls == []
    assert client.get("/admin/self-healing/data.json").status_code == 200  # HTTP as before


def test_a_recorder_of_ones_own_records_once_however_many_dashboards_show_it(
    engine: sa.Engine, service: str
) -> None:
    """``dashboard(recorder=Recorder(...))`` records the process's events with that recorder,
    registered as one hook however often it is given; ``reset_state()`` clears it."""
    own = Recorder(max_events=10)
    boards = [dashboard(auth=lambda request: True, recorder=own) for _ in range(2)]
    try:
        recorded_once(own, boards, engine, service)
    finally:
        rdb.remove_hook(own)


def test_a_dropped_apps_recorder_leaves_the_hooks(engine: sa.Engine, service: str) -> None:
    """An application factory (an app per test, or per tenant) giving each app's dashboard a
    recorder of its own: every dropped app's recorder stayed installed as a hook, alive, for
    good (called on every later event, keeping its events). It leaves with its app; the one
    still shown records as before."""
    gc.collect()  # a dropped app of an earlier test leaves now, not in the middle of the count
    before = len(STATE.hooks)
    dropped: list[weakref.ref[Recorder]] = []
    for _ in range(20):
        rec = Recorder(max_events=10)
        dashboard(auth=lambda request: True, recorder=rec)
        dropped.append(weakref.ref(rec))
        del rec
    kept = Recorder(max_events=10)
    board = dashboard(auth=lambda request: True, recorder=kept)
    gc.collect()
    assert [ref() for ref in dropped] == [None] * 20
    assert len(STATE.hooks) == before + 1
    try:
        recorded_once(kept, [board], engine, service)
    finally:
        rdb.remove_hook(kept)
    assert len(STATE.hooks) == before


def test_dashboards_made_at_once_with_one_recorder_install_it_once(
    engine: sa.Engine, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two dashboards given one new recorder, made at once in two threads (an application
    factory run by two workers' threads): each found the recorder without its hook, made one,
    and added it: two hooks, every event recorded twice. One is made and added."""
    own = Recorder(max_events=10)
    both_inside = threading.Barrier(2)
    made = _recorder._Installed.__init__

    def made_side_by_side(self: Any, rec: Recorder) -> None:
        # both threads inside at once where nothing keeps them apart; where the first is
        # alone, it waits a moment, then goes on
        with contextlib.suppress(threading.BrokenBarrierError):
            both_inside.wait(timeout=0.5)
        made(self, rec)

    monkeypatch.setattr(_recorder._Installed, "__init__", made_side_by_side)
    boards: list[Any] = []
    threads = [
        threading.Thread(
            target=lambda: boards.append(dashboard(auth=lambda request: True, recorder=own))
        )
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    monkeypatch.undo()
    try:
        assert len(boards) == 2
        recorded_once(own, boards, engine, service)
    finally:
        rdb.remove_hook(own)


def recorded_once(own: Recorder, boards: list[Any], engine: sa.Engine, service: str) -> None:
    assert sum(hook == own for hook in STATE.hooks) == 1
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config(max_retries=2))
    flaky, _calls = first_attempt_raises("40001")
    assert Sessions.run(flaky) == 1
    names = [e["name"] for e in own.snapshot()["events"] if e["service"] == service]
    assert names[-2:] == ["retry", "recovered"]
    assert names.count("retry") == names.count("recovered") == 1  # once each: one hook
    for board in boards:
        assert board.recorder is own
        data = mounted(board).get("/admin/self-healing/data.json").json()
        assert [e["name"] for e in data["events"] if e["service"] == service] == names
        assert data["series"][service]["retries_by_sqlstate"] == {"40001": 1}
    rdb.reset_state()
    assert own.snapshot()["events"] == []


@pytest.mark.parametrize(
    "poll", [float("inf"), float("-inf"), float("nan"), 0, -1, 0.01, 1e10, True, "2", None]
)
def test_poll_seconds_out_of_range_is_refused_at_once(poll: Any) -> None:
    """A poll interval that can't work (infinite, not a number, absurdly short or long) is
    refused when the dashboard is made, naming the argument, not at every request."""
    with pytest.raises(ValueError, match="poll_seconds"):
        dashboard(auth=lambda request: True, poll_seconds=poll)


def test_poll_seconds_and_events_in_range_work() -> None:
    for poll in (0.1, 0.3, 2, 86_400):
        page = mounted(dashboard(auth=lambda request: True, poll_seconds=poll))
        assert page.get("/admin/self-healing/").status_code == 200
    for events in (float("inf"), -1, 2.5, True):
        with pytest.raises(ValueError, match="events"):
            dashboard(auth=lambda request: True, events=events)  # type: ignore[arg-type]


def test_a_client_chosen_nan_state_leaves_data_json_servable(
    tasks: sa.Engine, service: str
) -> None:
    """A move to a status of ``NaN`` or ``Infinity`` (a float Python's ``json`` reads from a
    request body) is refused by the guard; what the dashboard keeps of it is the state's text.
    Kept as a float, every ``data.json`` answered 500 (JSON has no such number) until 200 more
    events had pushed it out: one request took the dashboard down."""
    board = dashboard(auth=lambda request: True)
    Sessions = rdb.ResilientSession(tasks, service=service, config=rdb.Config())
    with Session(tasks) as session, session.begin():
        task = create_task(session, title="t", idem_key=str(uuid.uuid4()))
        session.flush()
        task_id = task.id
    for wanted in (float("nan"), float("inf")):

        def move(session: Session, wanted: float = wanted) -> None:
            found = session.get_one(Task, task_id)
            move_task(session, found, wanted, idem_key=str(uuid.uuid4()))  # type: ignore[arg-type]
            session.flush()

        with pytest.raises(rdb.IllegalTransitionError):
            Sessions.run(move)
    answer = mounted(board).get("/admin/self-healing/data.json")
    assert answer.status_code == 200, answer.text
    events = [e for e in answer.json()["events"] if e["name"] == "transition_blocked"]
    assert [e["fields"]["to_state"] for e in events] == ["nan", "inf"]
    # a hook may be fed directly: its fields are kept as JSON can carry them
    rec = Recorder()
    rec(
        rdb.SelfHealEvent(
            name="transition_blocked",
            service=None,
            level=40,
            message="m",
            fields={"from_state": float("-inf"), "to_state": 1.5, "blocked_rows": 2},
        )
    )
    (event,) = rec.snapshot()["events"]
    assert event["fields"] == {"from_state": "-inf", "to_state": 1.5, "blocked_rows": 2}


def test_a_health_check_with_a_value_json_cant_carry_leaves_data_json_servable(
    engine: sa.Engine,
) -> None:
    """A ``health=`` check that reads a figure from the database may get ``NaN`` or an infinity
    (PostgreSQL's ``float8`` has them); a key that is not text, or a value of another type, is
    as easily returned. Kept, every ``data.json`` answered a plain-text 500 (Starlette renders no
    NaN): the whole dashboard went blank. Now such a float is its text, as a state's is."""

    def health() -> dict[Any, Any]:
        with engine.connect() as conn:
            lag, top = conn.execute(sa.text("SELECT 'NaN'::float8, '-Infinity'::float8")).one()
        return {
            **rdb.health(),
            "lag": lag,
            "floor": [top],
            ("replica", 1): {2: True, lag: None, 0.5: False},
        }

    answer = mounted(dashboard(auth=lambda request: True, health=health)).get(
        "/admin/self-healing/data.json"
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    got = answer.json()["health"]
    assert got["lag"] == "nan"
    assert got["floor"] == ["-inf"]
    assert got["('replica', 1)"] == {"2": True, "nan": None, "0.5": False}
    assert got["healthy"] is True


def test_a_health_check_that_fails_is_said_in_data_json(caplog: pytest.LogCaptureFixture) -> None:
    """A ``health=`` check that can't reach its database (it raises), or returns a structure
    that holds itself, made every ``data.json`` a plain-text 500: the events and series were lost
    in the very outage they show. Now ``health`` says the check failed (by its error's class:
    its text may quote a URL), the rest is served, and the traceback is an ERROR line."""
    down = sa.create_engine(
        f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/nothing",
        connect_args={"connect_timeout": 2},
    )

    def unreachable() -> dict[str, Any]:
        with down.connect() as conn:
            return {"healthy": bool(conn.scalar(sa.text("SELECT true")))}

    looped: dict[str, Any] = {"healthy": True}
    looped["self"] = looped
    with caplog.at_level(logging.ERROR, logger="resilient_db.web"):
        for check, said in (
            (unreachable, "failed: OperationalError"),
            (lambda: looped, "returned what can't be sent as JSON"),
        ):
            answer = mounted(dashboard(auth=lambda request: True, health=check)).get(
                "/admin/self-healing/data.json"
            )
            assert answer.status_code == 200, answer.text
            data = answer.json()
            assert data["health"]["healthy"] is False
            assert said in data["health"]["problem"]
            assert "events" in data
    down.dispose()
    [line] = [r.getMessage() for r in caplog.records if "health() check failed" in r.getMessage()]
    assert "OperationalError" in line
    assert "127.0.0.1" not in line  # the driver's text (its URL) is not logged


def test_a_health_check_of_ones_own_runs_off_the_event_loop_or_is_awaited(
    pg_async_url: str, engine: sa.Engine
) -> None:
    """A ``health=`` check pings a database: a coroutine function's coroutine is awaited (it was
    sent as its text, ``"<coroutine object ...>"``, never run), and a sync check runs in the
    threadpool, as a sync ``auth`` check does (on the event loop, a check waiting on its
    database stopped the whole application)."""
    from sqlalchemy.ext.asyncio import create_async_engine  # noqa: PLC0415

    async def awaited() -> None:
        aengine = create_async_engine(pg_async_url)

        async def pinged_async() -> dict[str, Any]:
            async with aengine.connect() as conn:
                return {"healthy": True, "database": await conn.scalar(sa.text("SELECT 'up'"))}

        board = dashboard(auth=lambda request: True, health=pinged_async)
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=board), base_url="http://dashboard"
            ) as client:
                answer = await client.get("/data.json")
        finally:
            await aengine.dispose()
        assert answer.json()["health"] == {"healthy": True, "database": "up"}

    asyncio.run(awaited())

    pinged = threading.Event()
    checking = threading.Event()
    loops: list[bool] = []

    def blocking() -> dict[str, Any]:
        loops.append(on_event_loop())
        checking.set()
        assert pinged.wait(10)  # answers once the application answered another request
        with engine.connect() as conn:
            return {"healthy": True, "database": conn.scalar(sa.text("SELECT 'up'"))}

    def ping(request: Request) -> JSONResponse:
        pinged.set()
        return JSONResponse({"pong": True})

    board = dashboard(auth=lambda request: True, health=blocking)
    app = Starlette(routes=[Route("/ping", ping), Mount("/admin/self-healing", app=board)])
    answers: list[Any] = []
    with TestClient(app) as client:
        waiting = threading.Thread(
            target=lambda: answers.append(client.get("/admin/self-healing/data.json").json())
        )
        waiting.start()
        assert checking.wait(10)
        assert client.get("/ping").json() == {"pong": True}
        waiting.join(20)
    assert [a["health"] for a in answers] == [{"healthy": True, "database": "up"}]
    assert loops == [False]


def merged(shown: dict[str, Any], data: dict[str, Any], events: int) -> dict[str, Any]:
    """What the page draws after answer ``data`` to a request with ``shown``'s cursor (the
    page's ``merged()``): a delta added to what was shown, rows by their second, state
    changes and events appended, what left the window dropped."""
    if not data["delta"]:
        return data
    now, window = data["now"], data["window"]
    series = dict(shown["series"])
    for name, added in data["series"].items():
        had = series.get(name)
        first = added["buckets"][0][0] if added["buckets"] else math.inf
        series[name] = (
            added
            if had is None
            else {
                **added,
                "buckets": [r for r in had["buckets"] if r[0] < first] + added["buckets"],
                "breaker_states": had["breaker_states"] + added["breaker_states"],
            }
        )
    for name, s in series.items():
        states = s["breaker_states"][-MAX_STATE_CHANGES:]
        before = [i for i, (t, _) in enumerate(states) if t <= now - window]
        series[name] = {
            **s,
            "buckets": [r for r in s["buckets"] if r[0] > int(now) - window],
            "breaker_states": states[before[-1] if before else 0 :],
        }
    recent = (shown["events"] + data["events"])[-events:] if events else []
    return {**data, "series": series, "events": recent}


def _event(name: str, service: str | None, **fields: Any) -> rdb.SelfHealEvent:
    return rdb.SelfHealEvent(name=name, service=service, level=30, message=name, fields=fields)


def test_data_json_after_a_cursor_sends_what_changed_since_and_adds_up_to_the_full_answer() -> None:
    """``data.json?after=<cursor>`` (the page sends the ``cursor`` of the data it shows): the
    events since, and only the series that changed, each with its rows changed since and its
    new breaker state changes; added to what the page shows (as its script does), it is what a
    full answer holds, whatever left the window meanwhile. 64 busy services sent everything
    (a megabyte, some 40 ms of the event loop) at every poll of every open page."""
    now = [1_000_000.0]
    rec = Recorder(max_events=50, window=20, clock=lambda: now[0])
    client = mounted(dashboard(auth=lambda request: True, recorder=rec, events=30))
    path = "/admin/self-healing/data.json"
    busy = [f"svc-{n}" for n in range(5)]
    for _ in range(30):
        now[0] += 1
        for name in busy:
            rec(_event("retry", name, sqlstate="40001"))
    first = client.get(path).json()
    assert (first["delta"], first["cursor"]) == (False, rec.snapshot()["cursor"])
    shown = first
    states = ["breaker_opened", "breaker_half_open", "breaker_closed"]
    for step in range(24):  # idle polls, two services busy, state changes, the window moving on
        now[0] += 0.4 if step % 3 else 3.0
        if step % 4 != 3:
            rec(_event("retry", busy[0], sqlstate="40P01"))
            rec(_event(states[step % 3], busy[1]))
            rec(_event("transition_blocked", None, via="flush", blocked_rows=2))
        answer = client.get(path, params={"after": shown["cursor"]})
        data = answer.json()
        assert data["delta"] is True
        assert set(data["series"]) <= {busy[0], busy[1], NO_SERVICE}
        if step % 4 == 3:  # nothing new: no event, no series
            assert (data["events"], data["series"]) == ([], {})
        else:
            assert [e["name"] for e in data["events"]] == [
                "retry",
                states[step % 3],
                "transition_blocked",
            ]
            assert len(data["series"][busy[0]]["buckets"]) <= 2  # its second's row, maybe again
        shown = merged(shown, data, 30)
        full = client.get(path).json()
        assert shown["events"] == full["events"]
        assert shown["series"] == full["series"]
        assert {k: v for k, v in shown.items() if k != "delta"} == {
            k: v for k, v in full.items() if k != "delta"
        }


def test_a_cursor_that_cant_be_followed_gets_the_full_answer() -> None:
    """A cursor of another recorder (another process behind the same URL), one from before
    ``reset_state()``, before a service's series was dropped for another, or before an event
    was counted in an earlier second than the last (the clock stepped back), or nonsense: the
    full answer, never a delta the page would add to what is gone."""
    now = [1_000_000.0]
    rec = Recorder(window=10, clock=lambda: now[0])
    client = mounted(dashboard(auth=lambda request: True, recorder=rec))
    path = "/admin/self-healing/data.json"
    rec(_retry("a"))

    def answer(after: str) -> dict[str, Any]:
        data: dict[str, Any] = client.get(path, params={"after": after}).json()
        return data

    cursor = client.get(path).json()["cursor"]
    assert answer(cursor)["delta"] is True
    other = Recorder(window=10, clock=lambda: now[0])
    other(_retry("a"))
    epoch, _, number = cursor.partition(".")
    for bad in (
        other.snapshot()["cursor"],
        "",
        "x",
        f"{epoch}.",
        f"{epoch}.-1",
        f"{epoch}.²",
        f"{epoch}.{'9' * 5000}",
    ):
        assert answer(bad)["delta"] is False, bad
    assert answer(f"{epoch}.{int(number) + 1}")["delta"] is False  # from the future
    now[0] += 0.5
    rec(_retry("a"))
    now[0] -= 2  # an earlier second: a row before the last changed
    rec(_retry("a"))
    data = answer(cursor)
    assert data["delta"] is False
    assert [row[1] for row in data["series"]["a"]["buckets"]] == [1, 2]
    cursor = data["cursor"]
    assert answer(cursor)["delta"] is True
    rec.clear()
    rec(_retry("a"))
    assert answer(cursor)["delta"] is False
    cursor = client.get(path).json()["cursor"]
    for n in range(MAX_SERVICES - 1):
        rec(_retry(f"s{n}"))
    now[0] += 11  # "a" and the others idle for a whole window: a new service takes a place
    assert answer(cursor)["delta"] is True
    rec(_retry("new"))
    data = answer(cursor)
    assert data["delta"] is False
    assert "new" in data["series"]
    assert len(data["series"]) == MAX_SERVICES


def test_breaker_state_changes_served_are_the_windows_and_the_one_before() -> None:
    """A breaker flapping for longer than the window: ``data.json`` sends the state changes of
    the window and the last one before it (the state its plot starts with), not all 256 kept
    (the page draws none older)."""
    now = [1_000_000.0]
    rec = Recorder(window=60, clock=lambda: now[0])
    for n in range(MAX_STATE_CHANGES):
        now[0] += 5
        rec(_event("breaker_opened" if n % 2 else "breaker_closed", "flappy"))
    client = mounted(dashboard(auth=lambda request: True, recorder=rec))
    changes = client.get("/admin/self-healing/data.json").json()["series"]["flappy"][
        "breaker_states"
    ]
    assert len(changes) == 13  # 12 in the last 60 s (one every 5 s), and the one before
    assert changes[0][0] <= now[0] - 60 < changes[1][0]
    assert changes[-1] == [now[0], "open"]


def test_data_json_names_the_process_whose_figures_it_serves() -> None:
    """Behind several workers each ``data.json`` may come from another process, each with
    figures of its own (``health()`` is per process): the answer says whose they are, the
    page shows it (``test_dashboard_browser``), full and delta answers alike."""
    client = mounted(dashboard(auth=lambda request: True))
    path = "/admin/self-healing/data.json"
    first = client.get(path).json()
    me = {"pid": os.getpid(), "hostname": socket.gethostname()}
    assert first["process"] == me
    delta = client.get(path, params={"after": first["cursor"]}).json()
    assert delta["delta"] is True
    assert delta["process"] == me


def share_as_another_process(client: Any, system: str, timeline: int, server: str) -> float:
    """``timeline`` of cluster ``system`` seen at ``server``, shared through Redis (``client``'s)
    as another process of the fleet shares it (the library's own script, published on the
    channel); the entry's time as Redis recorded it (seconds since the epoch)."""
    share = client.register_script(_fleet._TIMELINE)
    args = [_fleet.CHANNEL.format(db=0), "another-process", system, timeline, server, 64]
    share(keys=[_fleet.TIMELINES_KEY], args=args)
    value = client.hget(_fleet.TIMELINES_KEY, system).decode()
    return int(value.split(" ")[1]) / 1_000_000


def until(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)  # polling a condition, not a backoff


def test_data_json_carries_the_fleets_timelines_with_since_when(
    redis_server: RedisServer, engine: sa.Engine, service: str
) -> None:
    """With a breaker shared through Redis, a service of data.json carries the fleet's
    timelines its link knows (``breaker.shared.fleet_timelines``, the old-primary fence): by
    cluster, the timeline, the server it was seen at and since when (Redis's time of the
    entry), whether the link read it on joining or heard another process share it (None from
    a process of an earlier release, whose message says no time); none while no cluster failed
    over. (The page shows them: ``test_dashboard_browser``.)"""
    with contextlib.closing(redis_server.client()) as client:
        board = mounted(dashboard(auth=lambda request: True))
        path = "/admin/self-healing/data.json"

        def fenced(name: str) -> Any:
            shared = board.get(path).json()["health"]["services"][name]["breaker"]["shared"]
            return shared["fleet_timelines"]

        rdb.ResilientSession(engine, service=service, config=rdb.Config(redis_url=redis_server.url))
        link = STATE.fleet_links[redis_server.url]
        until(lambda: link.up, "the link")
        assert fenced(service) == {}  # (a fleet whose clusters never failed over)

        # heard: another process shares a cluster's timeline 2 (its server as Redis has it)
        system = "7312345678901234567"
        server = '<img src=x onerror="window.__xss = 1">'
        since = share_as_another_process(client, system, 2, server)
        until(lambda: system in link.timelines, "the timeline heard")
        assert fenced(service) == {system: {"timeline": 2, "server": server, "since": since}}

        # heard from a process of an earlier release, whose message says no time
        older = "7312345678901234568"
        said = {"tl": older, "t": "4", "at": "10.0.0.9:5432", "b": "an-older-process"}
        client.publish(_fleet.CHANNEL.format(db=0), json.dumps(said))
        until(lambda: older in link.timelines, "the older process's timeline")
        assert fenced(service)[older] == {"timeline": 4, "server": "10.0.0.9:5432", "since": None}

        # read on joining: a link of another Redis database, whose hash has one already
        other = redis_server.url.removesuffix("/0") + "/1"
        with contextlib.closing(redis_server.client(db=1)) as other_client:
            entry = "3 1700000000123456 10.0.0.8:5432"
            other_client.hset(_fleet.TIMELINES_KEY, "7100000000000000001", entry)
        rdb.ResilientSession(engine, service=f"{service}-1", config=rdb.Config(redis_url=other))
        until(lambda: STATE.fleet_links[other].up, "the other link")
        assert fenced(f"{service}-1") == {
            "7100000000000000001": {
                "timeline": 3,
                "server": "10.0.0.8:5432",
                "since": 1700000000.123456,
            }
        }
