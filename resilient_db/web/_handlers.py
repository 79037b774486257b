"""``install_exception_handlers``: resilient_db's errors as problem details in Starlette/FastAPI."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from resilient_db._config import Config
from resilient_db._errors import (
    CircuitOpenError,
    CommitOutcomeUnknownError,
    IllegalTransitionError,
    ResponseValidationError,
    StaleTransitionError,
)

from ._problems import PROBLEM_JSON, PROBLEM_TYPE_BASE, Problem, problem_details

__all__ = ["HANDLED", "install_exception_handlers", "problem_response"]

#: The exception classes the handlers are registered for. A ``DBAPIError`` is answered only
#: when it is transient (retries ran out); any other is re-raised to the application's own
#: handling (a 500 as before).
HANDLED: tuple[type[Exception], ...] = (
    CircuitOpenError,
    IllegalTransitionError,
    StaleTransitionError,
    CommitOutcomeUnknownError,
    ResponseValidationError,
    DBAPIError,
)


def problem_response(problem: Problem) -> Response:
    """``problem`` as a Starlette response (``application/problem+json``)."""
    return JSONResponse(
        problem.body,
        status_code=problem.status,
        headers=problem.headers,
        media_type=PROBLEM_JSON,
    )


def install_exception_handlers(
    app: Starlette,
    *,
    config: Config | None = None,
    type_base: str = PROBLEM_TYPE_BASE,
) -> None:
    """Answer resilient_db's errors with RFC 9457 problem details (see
    :func:`~resilient_db.web.problem_details`): 503 with ``Retry-After`` for an open circuit
    and for a transient error that ran out of retries, 409 for illegal and stale transitions,
    500 of its own type for an unknown commit outcome. Works for Starlette and FastAPI
    applications; calling it again replaces the handlers. ``config`` decides whether row keys
    may be shown (default: the environment's ``SELF_HEALING_LOG_ROW_KEYS`` at each error)."""
    if not hasattr(app, "add_exception_handler"):
        raise TypeError(
            "install_exception_handlers needs a Starlette or FastAPI application, got "
            f"{type(app).__name__}"
        )

    async def handle(request: Request, exc: Exception) -> Response:
        problem = problem_details(exc, config=config, type_base=type_base)
        if problem is None:
            raise exc  # not ours to answer (a non-transient database error): the app's 500
        return problem_response(problem)

    for cls in HANDLED:
        app.add_exception_handler(cls, handle)
