"""``install_exception_handlers``: resilient_db's errors as problem details in Starlette/FastAPI."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import asyncpg
import psycopg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from resilient_db._classify import failure_detail, log_quietly
from resilient_db._config import Config
from resilient_db._errors import (
    CircuitOpenError,
    CommitOutcomeUnknownError,
    IllegalTransitionError,
    ResponseValidationError,
    StaleTransitionError,
)
from resilient_db._observability import LineLimit, emit
from resilient_db._state import renew_after_fork
from resilient_db._wrapper import is_async_callable
from resilient_db.transitions._report import env_config

from ._problems import (
    BASE_GROUP,
    EXCEPTION_GROUP,
    MAX_GROUP_ERRORS,
    PARTLY,
    PROBLEM_JSON,
    PROBLEM_TYPE_BASE,
    TRANSIENT_RETRY_AFTER,
    Problem,
    check_config_and_base,
    group_errors,
    pool_exhausted,
    problem_details,
)

__all__ = ["HANDLED", "handled_classes", "install_exception_handlers", "problem_response"]

#: WebSocket close codes (RFC 6455, IANA registry) for a problem met on a WebSocket route:
#: "Try Again Later" for a 503 (open circuit, database unavailable), "Internal Error" otherwise.
WS_TRY_AGAIN_LATER = 1013
WS_INTERNAL_ERROR = 1011

#: The exception classes the handlers are registered for: resilient_db's own, and the classes a
#: transient database error that ran out of retries can have. SQLAlchemy wraps the driver's
#: errors in ``DBAPIError``, but not all of asyncpg's: a refused or broken connect reaches the
#: application as a plain ``OSError`` (``ConnectionRefusedError``, ``TimeoutError``), and
#: asyncpg's and psycopg's own classes do where SQLAlchemy does not translate them (statements
#: sent on the driver's own connection: COPY, a ``psycopg.sql`` composition); so do psycopg2's
#: and pg8000's, where installed (:data:`OPTIONAL_DRIVER_ERRORS`).
#: Only transient ones (``is_transient``) are answered; any other error of these classes goes to
#: the application's own handling (see ``install_exception_handlers``). SQLAlchemy's pool
#: ``TimeoutError`` (no ``DBAPIError``: no connection was had) is this process overloaded. An
#: ``ExceptionGroup`` (a ``TaskGroup``'s) is answered when its errors are (see
#: ``problem_details``). A ``TimeoutError`` (an ``OSError``; before Python 3.11 asyncio's own
#: class) is answered when it was raised from a unit's cancellation that cut off its COMMIT
#: (``asyncio.timeout`` or ``asyncio.wait_for`` around ``run``): an unknown commit outcome.
HANDLED: tuple[type[Exception], ...] = (
    CircuitOpenError,
    IllegalTransitionError,
    StaleTransitionError,
    CommitOutcomeUnknownError,
    ResponseValidationError,
    PoolTimeoutError,
    DBAPIError,
    OSError,
    *(() if issubclass(asyncio.TimeoutError, OSError) else (asyncio.TimeoutError,)),
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    psycopg.Error,
    *(() if EXCEPTION_GROUP is None else (EXCEPTION_GROUP,)),
)

#: The base error classes of the other drivers a unit runs on (README, "Drivers"): psycopg2's
#: and pg8000's, whose SQLSTATEs the classifier reads. resilient_db does not install them, so
#: each is registered beside :data:`HANDLED` only where it is installed (imported then, when
#: the handlers are installed: not when resilient_db.web is); a statement sent on their own
#: connection fails with it, unwrapped, as with psycopg's and asyncpg's.
OPTIONAL_DRIVER_ERRORS = (("psycopg2", "Error"), ("pg8000.exceptions", "Error"))


def handled_classes() -> tuple[type[Exception], ...]:
    """:data:`HANDLED`, and the classes of :data:`OPTIONAL_DRIVER_ERRORS` that are installed."""
    found: list[type[Exception]] = []
    for module, name in OPTIONAL_DRIVER_ERRORS:
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:  # not installed (or unusable: then nothing raises its errors)
            continue
        if isinstance(cls, type) and issubclass(cls, Exception):
            found.append(cls)
    return (*HANDLED, *found)


_Handler = Callable[[Any, Exception], Any]

log_web = logging.getLogger("resilient_db.web")
#: the pool-exhausted line: at most one per ``WARNING_LINE_PERIOD`` (an overloaded process
#: answers every waiting request so), each saying how many came since the last
POOL_LINES = LineLimit()
# (a forked worker's own: a thread of the parent may have held its lock)
renew_after_fork(globals(), "POOL_LINES", LineLimit)


def report_pool_exhausted(config: Config | None, exc: BaseException) -> None:
    """The ``[SELF-HEAL]`` line (WARNING, ``resilient_db.web``, rate-limited) and the
    ``pool_exhausted`` hook event (every occurrence) of a pool exhaustion answered with a 503:
    nothing else reports it (the unit raised it at once, as an error not transient), and
    without the handlers it was a logged 500."""
    log, unlogged = POOL_LINES.take()
    emit(
        config if config is not None else env_config(),
        log_web,
        logging.WARNING,
        "Connection pool exhausted: %d request(s) since the last line waited for a database "
        "connection for the whole pool_timeout (%s) and were answered 503, Retry-After %d s; "
        "every connection was in use (a slow database, or more concurrent work than "
        "pool_size + max_overflow)",
        unlogged + 1,
        type(exc).__name__,
        TRANSIENT_RETRY_AFTER,
        log=log,
        service=None,
        event="pool_exhausted",
        error=type(exc).__name__,
        status=503,
        suppressed=unlogged if log else 0,  # (as the other rate-limited events')
    )


def report_unseen_failure(
    problem: Problem, exc: BaseException, config: Config | None, type_base: str
) -> None:
    """The ERROR line (``resilient_db.web``) of errors of the application's own that the
    answer ``problem`` hides from the application's handlers and from the server, which would
    have logged them: ``exc`` answered ``partly-committed`` with no ``failure`` (a bug, a
    database error that is not transient), and the errors of a group answered for another of
    its errors (a ``KeyError`` of one task beside an unknown commit outcome or a partly
    committed change of another). With their tracebacks as the DEBUG lines show them: no text
    of a database error, which may quote values. The library's own errors were said by its own
    lines; the unit's ``Not replaying`` line names only the class of one of these."""
    if problem.status != 500:  # (a 503 of a group: every error of it is one of ours)
        return

    def unseen(error: BaseException) -> bool:
        own = problem_details(error, config=config, type_base=type_base)
        return own is None or (own.body["type"] == type_base + PARTLY and "failure" not in own.body)

    errors = group_errors(exc)
    if errors is None:
        if BASE_GROUP is not None and isinstance(exc, BASE_GROUP):
            hidden = [f"(the group's errors not looked into: more than {MAX_GROUP_ERRORS})"]
        elif unseen(exc):
            hidden = []
        else:
            return
    else:
        hidden = [
            f"Error {n} of the group:\n{failure_detail(error)}"
            for n, error in enumerate(errors, 1)
            if unseen(error)
        ]
        if not hidden and not unseen(exc):
            return
    log_quietly(  # (the application's logging raising loses the line, not the answer)
        log_web,
        logging.ERROR,
        "Answered 500 %s: the request failed with %s, which is or holds an error that is not "
        "one of resilient_db's, and no handler of the application's will see it:\n%s",
        str(problem.body.get("type", "")).removeprefix(type_base),
        type(exc).__name__,
        "\n".join([failure_detail(exc), *hidden]),
    )


def problem_response(problem: Problem) -> Response:
    """``problem`` as a Starlette response (``application/problem+json``)."""
    if not isinstance(problem, Problem):
        raise TypeError(
            "problem_response() takes a Problem (what problem_details(exc) returns when it "
            f"answers exc), got {type(problem).__name__}"
        )
    return JSONResponse(
        problem.body,
        status_code=problem.status,
        headers=problem.headers,
        media_type=PROBLEM_JSON,
    )


async def close_websocket(websocket: WebSocket, problem: Problem, exc: Exception) -> None:
    """Answer ``problem`` on a WebSocket connection: close it with 1013 (try again later) for a
    503, 1011 (internal error) otherwise, the problem's title as the reason (no values). Closed
    before ``accept()``, the server refuses the handshake (HTTP 403). Already closed (by the
    route, before it raised): nothing more to say; the client gone: nobody to tell."""
    state = websocket.application_state
    if state == WebSocketState.DISCONNECTED:
        return
    if state not in (WebSocketState.CONNECTING, WebSocketState.CONNECTED):
        raise exc  # an HTTP denial response already started: it can't be answered now
    code = WS_TRY_AGAIN_LATER if problem.status == 503 else WS_INTERNAL_ERROR
    with contextlib.suppress(WebSocketDisconnect, OSError):
        await websocket.close(code=code, reason=str(problem.body.get("title", ""))[:120])


class _ProblemHandler:
    """The handler :func:`install_exception_handlers` registers for each class of
    :data:`HANDLED`. An error it does not answer goes where it would have gone without it, so
    that registering for broad classes (``DBAPIError``, ``OSError``) takes nothing from the
    application: to the application's handler of the nearest class in the error's MRO (looked
    up at each error, so handlers registered later count), where a handler of ours stands for
    the one it ``displaced`` (the application's own for that class, registered before us)."""

    def __init__(
        self,
        app: Starlette,
        config: Config | None,
        type_base: str,
        displaced: Mapping[Any, _Handler],
    ) -> None:
        self._app = app
        self._config = config
        self._type_base = type_base
        self.displaced = displaced

    async def __call__(self, request: Request | WebSocket, exc: Exception) -> Any:
        problem = problem_details(exc, config=self._config, type_base=self._type_base)
        if problem is not None:
            # (not when a partly-committed change is answered: the line says "answered 503")
            exhausted = [e for e in group_errors(exc) or [exc] if pool_exhausted(e)]
            if exhausted and problem.status == 503:
                report_pool_exhausted(self._config, exhausted[0])
            report_unseen_failure(problem, exc, self._config, self._type_base)
            if isinstance(request, WebSocket):
                # an HTTP response is no answer on a WebSocket (after accept() it is a protocol
                # error that hides this one): close it, saying why in a few words
                return await close_websocket(request, problem, exc)
            return problem_response(problem)
        handler = self._applications(exc)
        if handler is None:
            # Starlette's ServerErrorMiddleware: the app's handler of Exception (or 500), else
            # a plain 500, as without us
            raise exc
        return await _answer_with(handler, request, exc)

    def _applications(self, exc: Exception) -> _Handler | None:
        """The application's own handler for ``exc``, as Starlette's ``ExceptionMiddleware``
        would find it without us: ``Exception`` is left to ``ServerErrorMiddleware``."""
        handlers = self._app.exception_handlers
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None
            handler: _Handler | None = handlers.get(cls)
            if isinstance(handler, _ProblemHandler):
                handler = handler.displaced.get(cls)
            if handler is not None:
                return handler
        return None


class _LastResort(_ProblemHandler):
    """The handler registered for ``Exception``, which Starlette calls (in its
    ``ServerErrorMiddleware``, HTTP only) for an error no other handler answered, and then
    raises the error on to the server, which logs it. It answers only an error of any class
    marked partly committed (a ``KeyError`` of the application's own after a unit committed
    part of the change): a plain 500 would say nothing of the saved part. Anything else (an
    error raised in a middleware, outside the handlers, included) goes to the application's
    own ``Exception`` (or ``500``) handler it displaced, or gets Starlette's plain 500."""

    async def __call__(self, request: Request | WebSocket, exc: Exception) -> Any:
        problem = problem_details(exc, config=self._config, type_base=self._type_base)
        if problem is not None and problem.body["type"] == self._type_base + PARTLY:
            return problem_response(problem)
        own = self.displaced.get(Exception)
        if own is None:  # Starlette's own answer, when there is no handler of Exception
            return PlainTextResponse("Internal Server Error", status_code=500)
        return await _answer_with(own, request, exc)


async def _answer_with(handler: _Handler, request: Request | WebSocket, exc: Exception) -> Any:
    """The application's ``handler``'s answer to ``exc``, a sync one run in the threadpool, as
    Starlette runs it."""
    if is_async_callable(handler):
        return await handler(request, exc)
    return await run_in_threadpool(handler, request, exc)


def install_exception_handlers(
    app: Starlette,
    *,
    config: Config | None = None,
    type_base: str = PROBLEM_TYPE_BASE,
) -> None:
    """Answer resilient_db's errors with RFC 9457 problem details (see
    :func:`~resilient_db.web.problem_details`): 503 with ``Retry-After`` for an open circuit,
    for a transient error that ran out of retries and for SQLAlchemy's pool ``TimeoutError``
    (every connection in use: logged as a ``[SELF-HEAL]`` WARNING of ``resilient_db.web``, at
    most one line per 10 s, and a ``pool_exhausted`` hook event), 409 for illegal and stale
    transitions,
    500 of its own type for an unknown commit outcome. On a WebSocket route the connection is
    closed instead, with code 1013 (try again later) for a 503 and 1011 (internal error)
    otherwise, the problem's title as the reason. Works for Starlette and FastAPI
    applications; calling it again replaces the handlers. ``config`` decides whether row keys
    may be shown (default: the environment's ``SELF_HEALING_LOG_ROW_KEYS`` as the process last
    read it: at its first use, and again at each ``rdb.reload_config()``; a change to the
    environment counts from the next reload).

    Any other error stays the application's: a non-transient ``DBAPIError`` or an ``OSError`` of
    its own goes to the application's handler of the nearest class (``SQLAlchemyError``, its own
    ``OSError`` handler registered before this call, ...), or is raised as before. A handler the
    application registers afterwards for one of :data:`HANDLED` itself replaces ours for that
    class, as Starlette's registration does; one it registers for a narrower class
    (``OperationalError``), before or after, answers those errors before ours, transient ones
    included; one it registered before for our own classes (``CircuitOpenError``) is replaced.
    An ``ExceptionGroup`` (a ``TaskGroup``'s) is answered when its errors are (one, or several
    503s), and as an unknown commit outcome or ``partly-committed`` when one of its errors is
    one, or when it is marked partly committed itself (an operation that committed part of its
    work before one of its tasks failed). An error of the application's own that such an
    answer hides from its handlers and the server (answered ``partly-committed``, or beside
    another error of its group) is logged as an ERROR of ``resilient_db.web``, with its
    traceback (no text of a database error). An error of another class marked partly
    committed (a ``KeyError`` of the route's own after its unit committed) is answered by the
    handler registered for ``Exception`` too (Starlette's last resort, which answers nothing
    else and keeps the application's own). Not answered: errors of a mounted sub-application
    (install on it too), errors raised in a middleware (outside Starlette's handlers), and
    errors raised after the response started (a ``BackgroundTask``, a streaming body):
    Starlette raises its "response already started" ``RuntimeError`` from them instead. Call it
    before the application's first request (Starlette copies the handlers then)."""
    if not hasattr(app, "add_exception_handler"):
        raise TypeError(
            "install_exception_handlers needs a Starlette or FastAPI application, got "
            f"{type(app).__name__}"
        )
    check_config_and_base("install_exception_handlers", config, type_base)
    handled = handled_classes()
    displaced: dict[type[Exception], _Handler] = {}
    for cls in handled:
        previous: _Handler | None = app.exception_handlers.get(cls)
        if isinstance(previous, _ProblemHandler):  # installed again: keep what the first took
            previous = previous.displaced.get(cls)
        if previous is not None:
            displaced[cls] = previous
    handle = _ProblemHandler(app, config, type_base, displaced)
    for cls in handled:
        app.add_exception_handler(cls, handle)
    # an error of any other class the application raises after part of its change committed
    # (see _LastResort): Starlette's handler of Exception, the application's kept for the rest.
    # Starlette takes a handler of 500 for one of Exception, the one registered last when both
    # are: that one is the application's to keep, and ours takes both keys (left under 500, the
    # application's would be used instead of ours)
    own: _Handler | None = None
    for key, handler in app.exception_handlers.items():
        if key == 500 or key is Exception:
            own = handler
    if isinstance(own, _ProblemHandler):  # installed again
        own = own.displaced.get(Exception)
    last = _LastResort(app, config, type_base, {} if own is None else {Exception: own})
    app.add_exception_handler(Exception, last)
    if 500 in app.exception_handlers:
        app.add_exception_handler(500, last)
