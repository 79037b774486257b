"""The ``/admin/self-healing`` dashboard: an ASGI application behind an explicit authorisation
check, serving one self-refreshing page and its data as JSON (``data.json``): ``health()``, the
recent ``[SELF-HEAL]`` events and per-second time series kept by a bounded
:class:`~resilient_db.web._recorder.Recorder` on the public hook API."""

from __future__ import annotations

import hmac
import inspect
import json
import logging
import math
import os
import secrets
import socket
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Literal, TypedDict, final, overload

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import Receive, Scope, Send

from resilient_db._classify import failure_detail, log_quietly
from resilient_db._errors import finite, shown_number, utf8_problem
from resilient_db._observability import HealthReport, LineLimit
from resilient_db._observability import health as _health
from resilient_db._state import renew_after_fork
from resilient_db._wrapper import is_async_callable

from ._page import render_page
from ._problems import PROBLEM_JSON
from ._recorder import NO_SERVICE, Recorder, RecorderSnapshot, install, recorder

__all__ = [
    "AuthCheck",
    "Dashboard",
    "DashboardData",
    "DashboardProcess",
    "HealthProblem",
    "dashboard",
    "token_auth",
]

#: ``check(request) -> bool`` (or an awaitable of it): True lets the request in, False answers
#: 403; raising Starlette's ``HTTPException`` answers with its status and headers (401 with a
#: ``WWW-Authenticate`` challenge, for example).
AuthCheck = Callable[[Request], bool | Awaitable[bool]]

#: ``health() -> dict`` (or a coroutine function giving one): what ``data.json`` serves as
#: ``health``; :func:`resilient_db.health` by default (a mapping: its
#: :class:`~resilient_db.HealthReport` is one, as a plain dict is).
HealthCheck = Callable[[], Mapping[str, Any] | Awaitable[Mapping[str, Any]]]


# -- the shape of data.json --------------------------------------------------------------------
# TypedDicts, as health()'s and the recorder's snapshot's are: plain dicts at run time.


class DashboardProcess(TypedDict):
    """``data.json``'s ``process``: whose figures these are."""

    pid: int
    hostname: str


@final
class HealthProblem(TypedDict):
    """``data.json``'s ``health`` when the check raised or returned what can't be sent as JSON:
    not healthy, and why (the error's class, never its text). Final: a type checker tells it
    from a :class:`~resilient_db.HealthReport` by a key (``"services" in health``)."""

    healthy: Literal[False]
    problem: str


class _DashboardDataKeys(RecorderSnapshot):
    title: str
    process: DashboardProcess
    no_service: str  # the name the guard's events are kept under: "(transitions)"


class DashboardData(_DashboardDataKeys):
    """What ``data.json`` serves (and :meth:`Dashboard.data` returns) with the default check,
    :func:`resilient_db.health`: the recorder's snapshot (:class:`RecorderSnapshot`), the
    dashboard's ``title``, the ``process`` and ``health``, a
    :class:`~resilient_db.HealthReport`, or a :class:`HealthProblem` when the check failed.
    With a ``health=`` check of your own, ``health`` is that check's value (made plain JSON)."""

    health: HealthReport | HealthProblem


_NO_AUTH = (
    "dashboard() needs auth=, a callable check(request) -> bool deciding who may see the "
    "dashboard (it shows the database's health and self-healing events). For example "
    "auth=lambda request: request.user.is_authenticated with Starlette's AuthenticationMiddleware, "
    "or auth=resilient_db.web.token_auth(secret) for a bearer token"
)
#: The page polls ``data.json`` at most this often and at least this rarely (seconds): faster
#: only loads the server, and a browser runs a timer of more than ~24.8 days at once.
MIN_POLL_SECONDS = 0.1
MAX_POLL_SECONDS = 86_400.0
#: The page gives up a ``data.json`` request not answered within this many seconds (or the
#: poll interval, if longer), says it is not updating, and polls on: without it, a request the
#: server never answers (a sync check waiting for a threadpool full of the application's
#: endpoints, a connection gone quiet) stopped the polling for good, the page still "live".
REQUEST_TIMEOUT_SECONDS = 30.0
#: The page waits as long as a ``Retry-After`` of a 401, 403, 429 or 5xx answer to its
#: ``data.json`` request asks (seconds or an HTTP date; a check of the application's own, a rate
#: limit or a proxy may send one), saying so, but at most this many seconds (or the poll
#: interval, if longer): a proxy's "come back tomorrow" would leave the page still for a day.
RETRY_AFTER_CAP_SECONDS = 600.0
#: WebSocket close code "Policy Violation": the dashboard serves no WebSocket.
_WS_POLICY_VIOLATION = 1008

log_web = logging.getLogger("resilient_db.web")
#: the failed health() check's line: at most one per ``WARNING_LINE_PERIOD``
HEALTH_LINES = LineLimit()
# (a forked worker's own: a thread of the parent may have held its lock)
renew_after_fork(globals(), "HEALTH_LINES", LineLimit)


class Dashboard:
    """The dashboard application (ASGI). Made by :func:`dashboard`."""

    def __init__(
        self,
        *,
        auth: AuthCheck,
        title: str,
        poll_seconds: float,
        events: int,
        source: Recorder | None,
        health: HealthCheck,
    ) -> None:
        # checked here, not only in dashboard(): the class is public, and one built without a
        # check must fail at once, not answer every request with an error
        if auth is None:
            raise TypeError(_NO_AUTH)
        if not callable(auth):
            raise TypeError(f"dashboard(auth=...) needs a callable, got {type(auth).__name__}")
        _refuse_unfit_check(auth)
        if (
            isinstance(poll_seconds, bool)
            or not isinstance(poll_seconds, (int, float))
            or not finite(poll_seconds)
            or not MIN_POLL_SECONDS <= poll_seconds <= MAX_POLL_SECONDS
        ):
            raise ValueError(
                f"dashboard(poll_seconds=...) must be a number of seconds from "
                f"{MIN_POLL_SECONDS:g} to {MAX_POLL_SECONDS:g}, got {shown_number(poll_seconds)}"
            )
        if not isinstance(title, str):
            raise TypeError(f"dashboard(title=...) must be a string, got {type(title).__name__}")
        if utf8_problem(title) is not None:
            # (a byte of another encoding, as os.environ gives it: every page answered 500)
            raise ValueError(
                f"dashboard(title=...) must be UTF-8 text, got {title[:40]!r} (a byte of "
                "another encoding?)"
            )
        if isinstance(events, bool) or not isinstance(events, int) or events < 0:
            raise ValueError(f"dashboard(events=...) must be a whole number >= 0, got {events!r}")
        if not callable(health):
            raise TypeError(f"dashboard(health=...) needs a callable, got {type(health).__name__}")
        if source is not None and not isinstance(source, Recorder):
            raise TypeError(
                f"dashboard(recorder=...) needs a resilient_db.web.Recorder, got "
                f"{type(source).__name__}"
            )
        self.auth = auth
        self.title = title
        self.poll_seconds = poll_seconds
        self.events = events
        self._source = source
        self.health = health

    @property
    def recorder(self) -> Recorder:
        return install(self._source) if self._source is not None else recorder()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # served on its own (uvicorn): nothing to set up
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "websocket":  # none here: refused, before any auth check runs
            message = await receive()
            if message["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": _WS_POLICY_VIOLATION})
            return
        if scope["type"] != "http":
            raise RuntimeError(f"the self-healing dashboard serves HTTP, not {scope['type']!r}")
        request = Request(scope, receive)
        response = await self._respond(request)
        await response(scope, receive, send)

    async def _respond(self, request: Request) -> Response:
        path = _route_path(request.scope)
        if path not in ("", "/", "/data.json"):
            return _secured(_problem(404, "Not found", "No such page on the dashboard."))
        if request.method not in ("GET", "HEAD"):
            answer = _problem(405, "Method not allowed", "The dashboard is read-only.")
            answer.headers["Allow"] = "GET, HEAD"
            return _secured(answer)
        refused = await self._refused(request)
        if refused is not None:
            if refused.status_code == 401 and TOKEN_COOKIE in request.cookies:
                _clear_stale_cookie(refused, request, _token_check(self.auth))
            return _secured(refused)
        if path == "/data.json":
            # the page sends the cursor of the data it shows: only what changed since comes back
            after = request.query_params.get("after")
            return _secured(
                JSONResponse(
                    self.data(await self._health(), after=after),
                    headers={"Cache-Control": "no-store"},
                ),
            )
        nonce = secrets.token_urlsafe(16)
        token = _token_check(self.auth)
        page = render_page(
            title=self.title,
            nonce=nonce,
            poll_ms=round(self.poll_seconds * 1000),
            min_poll_ms=round(MIN_POLL_SECONDS * 1000),
            timeout_ms=round(REQUEST_TIMEOUT_SECONDS * 1000),
            retry_cap_ms=round(RETRY_AFTER_CAP_SECONDS * 1000),
            events=min(self.events, self.recorder.max_events),
            token_param=token.query_param if token is not None else None,
        )
        answer = HTMLResponse(page)
        cookie = None
        if token is not None and token.query_param in request.query_params:
            cookie = token.cookie_for(request.query_params[token.query_param])
        if token is not None and cookie is not None:
            # the page takes the token out of the address bar: a cookie carries it on to
            # data.json and to a reload, out of the URL (access logs, history, Referer)
            answer.set_cookie(
                TOKEN_COOKIE,
                cookie,
                path=_cookie_path(request),
                secure=token.secure_for(request),
                httponly=True,
                samesite="strict",
            )
        return _secured(answer, nonce=nonce)

    async def _refused(self, request: Request) -> Response | None:
        try:
            verdict = await self._verdict(request)
        except HTTPException as exc:
            answer = _problem(exc.status_code, _reason(exc.status_code), str(exc.detail))
            for name, value in (exc.headers or {}).items():
                answer.headers[name] = value
            return answer
        if verdict is True:
            return None
        if verdict is False:
            return _problem(403, "Forbidden", "Not allowed to see the self-healing dashboard.")
        raise TypeError(
            f"the dashboard's auth check returned {type(verdict).__name__}; it must return "
            "True or False (or raise starlette.exceptions.HTTPException)"
        )

    async def _verdict(self, request: Request) -> object:
        """What the check says: a coroutine function is awaited; anything else is called in
        Starlette's threadpool (a sync check may block, on a session lookup say, and must not
        stop the event loop; it then waits for a thread as the application's sync endpoints
        do), and what it returns awaited when it is awaitable."""
        auth = self.auth
        if is_async_callable(auth):
            verdict: object = await auth(request)  # type: ignore[misc]
        else:
            verdict = await run_in_threadpool(auth, request)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return verdict

    async def _health(self) -> Any:
        """``health()``'s value as plain JSON (see :func:`_jsonable`), or what failed. The
        process's own :func:`resilient_db.health` is read on the event loop (it only reads
        counters: no thread to wait for while the application's sync endpoints fill the
        threadpool); a check of the application's own is awaited when it is a coroutine
        function, and a sync one (which may ping a database) runs in Starlette's threadpool, as
        a sync endpoint does: on the event loop it stopped the whole application while it
        waited. Called on the loop, a coroutine function's coroutine was sent as its text."""
        check = self.health
        try:
            if check is _health:
                value: object = check()
            elif is_async_callable(check):
                value = await check()  # type: ignore[misc]
            else:
                value = await run_in_threadpool(check)
            if inspect.isawaitable(value):
                value = await value
            return _jsonable(value)
        except Exception as exc:  # the application's check: said, not a 500 of the whole page
            return _health_problem(exc)

    @overload
    def data(
        self, health: HealthReport | HealthProblem, *, after: str | None = None
    ) -> DashboardData: ...

    @overload
    def data(self, health: Any, *, after: str | None = None) -> dict[str, Any]: ...

    def data(self, health: Any, *, after: str | None = None) -> DashboardData | dict[str, Any]:
        """What ``data.json`` serves: ``health`` (the check's value, made plain JSON), recent
        events and the time series; ``after``, the ``cursor`` of an earlier answer: the
        events and series only as far as they changed since (see :meth:`Recorder.snapshot`).
        A :class:`DashboardData` for a ``health`` that is :func:`resilient_db.health`'s report
        (or a :class:`HealthProblem`); with another value, the same keys, as a plain
        ``dict[str, Any]`` to a type checker."""
        snapshot = self.recorder.snapshot(events=self.events, after=after)
        return {
            "title": self.title,
            # whose figures these are: behind several workers each request may reach another
            "process": {"pid": os.getpid(), "hostname": socket.gethostname()},
            "health": health,
            "no_service": NO_SERVICE,
            **snapshot,
        }


def dashboard(
    *,
    auth: AuthCheck | None = None,
    title: str = "Self-healing",
    poll_seconds: float = 2.0,
    events: int = 100,
    recorder: Recorder | None = None,
    health: HealthCheck = _health,
) -> Dashboard:
    """The self-healing dashboard, an ASGI app to mount, e.g.
    ``app.mount("/admin/self-healing", dashboard(auth=check))``.

    ``auth`` is required: ``check(request) -> bool`` (sync or async) decides every request
    (page and data); False answers 403, and a check raising Starlette's ``HTTPException``
    answers with its status (use 401 with ``WWW-Authenticate`` when credentials are missing;
    :func:`token_auth` does). The page refreshes itself every ``poll_seconds`` from
    ``data.json`` (the same data as :func:`resilient_db.health`, the last ``events``
    ``[SELF-HEAL]`` events and per-second series); ``poll_seconds`` is from 0.1 to 86400.
    Each ``data.json`` answer has a ``cursor``: ``data.json?after=<cursor>`` answers only what
    changed since (``delta`` true: the new events, and the series that changed with their
    changed rows and new breaker state changes), as the page asks after its first answer; a
    cursor that can't be followed (another process's, one from before ``reset_state()``) gets
    the full answer (``delta`` false); its shape is :class:`DashboardData`. Its ``process``
    (``pid``, ``hostname``) names the process whose figures it holds (behind several workers
    each request may reach another); the page shows it.
    Events are recorded from the first ``dashboard()`` call on, by a hook
    (:func:`resilient_db.add_hook`) with bounded memory: the process's shared
    :class:`~resilient_db.web.Recorder`, or ``recorder`` (installed as a hook once, however many
    dashboards show it; ``reset_state()`` clears it). A sync ``auth`` check runs in Starlette's
    threadpool, as a sync endpoint does, and so shares it: while the application's sync
    endpoints fill it waiting on a slow database, the dashboard waits with them. An async check
    (:func:`token_auth`'s is one) runs on the event loop, and the dashboard's own work needs no
    thread. A WebSocket request is refused (closed with 1008).

    ``health`` (default :func:`resilient_db.health`) is called for each ``data.json`` (a
    coroutine function awaited, a sync check of your own run in Starlette's threadpool, as a
    sync ``auth`` check is, so that one pinging a database doesn't stop the application): a float
    JSON has no number for (NaN, an infinity) is sent as its text (``"nan"``, ``"inf"``), a key
    that is not text as its text; a check that raises, or returns a structure that holds
    itself, is served as ``{"healthy": false, "problem": ...}`` (its error's class, not its
    text), the events and series with it, and logged as an ERROR of ``resilient_db.web`` (at
    most one line per 10 s).
    """
    if auth is None:
        raise TypeError(_NO_AUTH)
    app = Dashboard(
        auth=auth,
        title=title,
        poll_seconds=poll_seconds,
        events=events,
        source=recorder,
        health=health,
    )
    _ = app.recorder  # start recording now, not at the first request
    return app


#: the cookie the page is answered with when it was opened with ``?token=``: an HMAC of the
#: token (not the token), HttpOnly, SameSite=Strict, for the dashboard's path only
TOKEN_COOKIE = "resilient_db_dashboard"


class _TokenCheck:
    """What the dashboard needs of a :func:`token_auth` check that takes a token in the URL:
    the parameter's name, each accepted token with its cookie, and whether the cookie is
    ``Secure`` (None: when the request came over https)."""

    __slots__ = ("accepted", "query_param", "secure")

    def __init__(
        self, query_param: str, accepted: tuple[tuple[bytes, str], ...], secure: bool | None
    ) -> None:
        self.query_param = query_param
        self.accepted = accepted
        self.secure = secure

    def secure_for(self, request: Request) -> bool:
        """Whether the cookie is ``Secure`` on the answer to ``request``."""
        return request.url.scheme == "https" if self.secure is None else self.secure

    def cookie_for(self, given: str) -> str | None:
        """The cookie of the accepted token ``given`` (the one in the page's URL), or None
        when it is not one of them; every token compared, in constant time."""
        found = None
        for token, cookie in self.accepted:
            if hmac.compare_digest(given.encode(), token):
                found = cookie
        return found


def _cookie_path(request: Request) -> str:
    """The path of the dashboard's cookie: the dashboard's own (where it is mounted)."""
    path: str = request.scope.get("root_path") or "/"
    return path


def _clear_stale_cookie(answer: Response, request: Request, token: _TokenCheck | None) -> None:
    """On ``token_auth``'s 401 to a request that carried the dashboard's cookie (made from a
    token no longer accepted, rotated out, or not one of its cookies at all): the answer deletes
    it (``Max-Age=0``, the path and flags it was set with), so that the browser stops sending
    it with every request and a reload; the 401 itself is the one of no credentials."""
    if token is None:  # a check that takes no cookie (query_param=None, one's own): left alone
        return
    answer.delete_cookie(
        TOKEN_COOKIE,
        path=_cookie_path(request),
        secure=token.secure_for(request),
        httponly=True,
        samesite="strict",
    )


#: token_auth's checks that take a token in the URL: what the dashboard needs to take it out
_TOKEN_CHECKS: weakref.WeakKeyDictionary[Callable[..., Any], _TokenCheck] = (
    weakref.WeakKeyDictionary()
)


def _token_check(auth: Callable[..., Any]) -> _TokenCheck | None:
    """What the page needs of ``token_auth``'s check ``auth``; None for any other check, one
    not hashable (a dataclass instance) or not weakly referable (``__slots__``) included."""
    try:
        return _TOKEN_CHECKS.get(auth)
    except TypeError:  # not one of token_auth's checks, which are plain functions
        return None


def token_auth(
    token: str | Iterable[str],
    *more: str,
    query_param: str | None = "token",
    secure_cookie: bool | None = None,
) -> Callable[[Request], Awaitable[bool]]:
    """An auth check accepting ``Authorization: Bearer <token>`` or ``?token=<token>``.
    Missing: 401 with a ``WWW-Authenticate`` challenge; wrong: 403. Compared in constant time.
    The dashboard's page opened with ``?token=`` takes it out of the address bar (browser
    history) and sends it on as a header; the page's answer sets an HttpOnly SameSite=Strict
    cookie for the dashboard's path (an HMAC of the token), which this check also accepts, so
    that a reload and the page's ``data.json`` requests carry no token in their URL. The one
    URL that does can still end up in access logs and proxies: ``query_param=None`` accepts
    the header only (for a reverse proxy or a client that sends it); outside a local demo
    prefer that, or a check on your own session login.

    Several tokens are accepted alike, ``token_auth(new, old)`` or ``token_auth([new, old])``,
    to rotate one without locking anyone out: give the new one to those who need it, then
    remove the old. A cookie made from a token no longer accepted is answered as no
    credentials (401, not 403), so that the page asks for a token again, and that answer
    deletes it. A page left open with a token since removed stops sending it once refused,
    says so, and polls on with the cookie alone.

    The cookie is ``Secure`` when the page's request came over https (``secure_cookie=None``,
    the default); ``secure_cookie=True`` makes it always ``Secure`` (behind a proxy that ends
    TLS and forwards plain http without ``X-Forwarded-Proto``, which the application then
    can't tell), ``False`` never (a browser on plain http drops a ``Secure`` cookie).

    The check is a coroutine function: it only compares strings, so it runs on the event loop
    and never waits for a thread of Starlette's threadpool, which the application's sync
    endpoints fill while they wait on a slow database (the dashboard answers meanwhile)."""
    tokens = _accepted_tokens(token, more)
    if query_param is not None and (not isinstance(query_param, str) or not query_param):
        raise ValueError(
            f"token_auth(query_param=...) must be a non-empty name or None, got {query_param!r}"
        )
    if secure_cookie is not None and not isinstance(secure_cookie, bool):
        raise TypeError(
            f"token_auth(secure_cookie=...) must be True, False or None (from the request's "
            f"scheme), got {type(secure_cookie).__name__} {secure_cookie!r}"
        )
    expected = tuple(t.encode() for t in tokens)
    cookies = tuple(
        hmac.new(t, b"resilient_db dashboard cookie", "sha256").hexdigest().encode()
        for t in expected
    )
    hint = f", or open the dashboard with ?{query_param}=<token>" if query_param else ""
    missing = f"Authentication needed: a bearer token (an Authorization: Bearer header{hint})."

    async def check(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        given = value.strip() if scheme.lower() == "bearer" else None
        if not given and query_param is not None:
            given = request.query_params.get(query_param)
            cookie = None if given else request.cookies.get(TOKEN_COOKIE)
            if cookie and _one_of(cookie.encode(), cookies):
                return True
            # else: no cookie, or one of a token no longer accepted (rotated out): as no
            # credentials, a 401 the page can ask for a token again on, not a 403
        if not given:
            raise HTTPException(
                401,
                missing,
                headers={"WWW-Authenticate": 'Bearer realm="resilient_db dashboard"'},
            )
        return _one_of(given.encode(), expected)

    if query_param is not None:
        _TOKEN_CHECKS[check] = _TokenCheck(
            query_param,
            tuple((t, c.decode()) for t, c in zip(expected, cookies, strict=True)),
            secure_cookie,
        )
    return check


def _accepted_tokens(token: object, more: tuple[object, ...]) -> list[str]:
    """``token_auth``'s tokens, checked: one or more non-empty strings a header can carry."""
    if isinstance(token, str):
        given: list[object] = [token]
    elif isinstance(token, (bytes, bytearray, Mapping)) or not isinstance(token, Iterable):
        raise TypeError(
            f"token_auth needs a token (a str), several, or a sequence of them, got "
            f"{type(token).__name__}"
        )
    else:
        given = list(token)
    given.extend(more)
    if not given:
        raise ValueError("token_auth needs at least one token, got an empty sequence")
    tokens: list[str] = []
    for number, each in enumerate(given, 1):
        which = f"token {number}" if len(given) > 1 else "the token"
        if not isinstance(each, str):
            raise TypeError(f"token_auth's tokens are str, and {which} is {type(each).__name__}")
        if not each:
            raise ValueError(
                f"token_auth got an empty token ({which}; an unset environment variable?)"
            )
        if len(each) < 16:
            raise ValueError(
                f"token_auth needs a secret token of at least 16 characters ({which} has "
                f"{len(each)})"
            )
        if each != each.strip() or not all("!" <= c <= "~" for c in each):
            # (a header value is stripped, and carries ASCII only: such a token could never
            # match; a secret read from a file with its line end, most often)
            raise ValueError(
                f"token_auth needs a token of printable ASCII characters without spaces "
                f"({which}; a token read from a file still has its line end?)"
            )
        if each not in tokens:
            tokens.append(each)
    return tokens


def _one_of(given: bytes, accepted: tuple[bytes, ...]) -> bool:
    """``given`` is one of ``accepted``: compared in constant time with each of them."""
    found = False
    for candidate in accepted:
        found |= hmac.compare_digest(given, candidate)
    return found


# -- helpers -------------------------------------------------------------------------------------
def _refuse_unfit_check(auth: object) -> None:
    """An auth check is called as ``check(request)``: the factory :func:`token_auth` itself
    (which would take the request for its token, and fail every request with a 500), or a
    callable that can't take the request alone, would fail every request; said here instead.
    A callable whose signature can't be read is taken as it is."""
    if auth is token_auth:
        raise TypeError(
            "dashboard(auth=token_auth) passes the factory itself: call it with the secret, "
            "auth=token_auth(secret), to get the check"
        )
    try:
        signature = inspect.signature(auth)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return
    try:
        signature.bind(None)
    except TypeError as exc:
        name = getattr(auth, "__qualname__", None) or repr(auth)
        raise TypeError(
            f"dashboard(auth=...) is called as check(request), with the request as its one "
            f"argument, and {name}{signature} can't be called that way ({exc})"
        ) from None


_CSP = (
    "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


def _secured(response: Response, *, nonce: str | None = None) -> Response:
    headers = response.headers
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    headers["Cache-Control"] = "no-store"
    headers["X-Frame-Options"] = "DENY"
    headers["Content-Security-Policy"] = (
        _CSP.format(nonce=nonce) if nonce else "default-src 'none'; frame-ancestors 'none'"
    )
    return response


def _problem(status: int, title: str, detail: str) -> Response:
    return JSONResponse(
        {"type": "about:blank", "title": title, "status": status, "detail": detail},
        status_code=status,
        media_type=PROBLEM_JSON,
    )


def _reason(status: int) -> str:
    from http import HTTPStatus  # noqa: PLC0415

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _route_path(scope: Scope) -> str:
    """The path below the mount point (Starlette keeps the full ``path`` and extends
    ``root_path`` when mounting; a router that strips ``path`` instead gives it as it is)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :]
    return path


#: how deep ``health()``'s value is looked into (``rdb.health()``'s is four levels deep)
_MAX_HEALTH_DEPTH = 32


class _Unsendable(ValueError):
    """``health()`` returned what can't be made plain JSON (the text is ours: no values)."""


def _jsonable(value: Any, depth: int = 0) -> Any:
    """``health()``'s value as plain JSON: a float JSON has no number for (NaN, an infinity) as
    its text, ``"nan"``, ``"inf"``, as the states of events are (kept, the whole ``data.json``
    was a 500: Starlette renders no NaN); a key that is not text as JSON would write it, or as
    its text; any other unexpected type as its text. A ``ValueError`` for what can't be made
    plain (a structure that holds itself, or nested deeper than :data:`_MAX_HEALTH_DEPTH`):
    ``_Unsendable``."""
    if depth > _MAX_HEALTH_DEPTH:
        raise _Unsendable(
            f"its value is nested deeper than {_MAX_HEALTH_DEPTH} levels, or holds itself"
        )
    if value is None or isinstance(value, (str, int)):  # bool included
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {_key(key): _jsonable(item, depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, depth + 1) for item in value]
    return str(value)


def _key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, int) or (isinstance(key, float) and math.isfinite(key)):
        return json.dumps(key)  # as json writes it: "1", "true", "null", "1.5"
    return str(key)  # "nan", "inf", "('replica', 1)"


def _health_problem(exc: Exception) -> HealthProblem:
    """What ``data.json`` shows for a ``health()`` that raised or returned what can't be sent:
    not healthy, and why (the class of its error; its traceback, without database errors'
    texts, as an ERROR of ``resilient_db.web``). The events and series are still served: they
    matter most in the outage that may have made the check fail."""
    log, unlogged = HEALTH_LINES.take()  # each poll of each open page meets it
    if log:
        log_quietly(  # (the application's logging raising loses the line, not the answer)
            log_web,
            logging.ERROR,
            "The dashboard's health() check failed with %s (%d time(s) since the last line); "
            "data.json says so in health.problem:\n%s",
            type(exc).__name__,
            unlogged + 1,
            failure_detail(exc),
        )
    said = (
        f"returned what can't be sent as JSON: {exc}"
        if isinstance(exc, _Unsendable)
        else f"failed: {type(exc).__name__}"
    )
    return {"healthy": False, "problem": f"the dashboard's health() check {said}"}
