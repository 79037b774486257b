"""Mapping the trigger's error back: a database error with SQLSTATE :data:`TRANSITION_SQLSTATE`
becomes :class:`IllegalTransitionError` (``via="db"``), states given back as the model declares
them when the model is known in this process. Pure: reads the exception, sends nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from resilient_db._config import Config
from resilient_db._errors import IllegalTransitionError

from ._report import report
from ._rules import guard_for_table
from ._sql import TRANSITION_SQLSTATE

__all__ = ["exception_from_db"]


def _error_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop(0)
        if item is None or id(item) in seen or len(seen) > 8:
            continue
        seen.add(id(item))
        yield item
        orig = getattr(item, "orig", None)
        todo += [orig if isinstance(orig, BaseException) else None, item.__cause__]


def _sqlstate_detail(exc: BaseException) -> tuple[bool, str | None]:
    matched = False
    detail: str | None = None
    for item in _error_chain(exc):
        code = getattr(item, "sqlstate", None) or getattr(item, "pgcode", None)
        if code == TRANSITION_SQLSTATE:
            matched = True
        if detail is None:
            diag = getattr(item, "diag", None)
            text = getattr(diag, "message_detail", None) or getattr(item, "detail", None)
            if isinstance(text, str) and text:
                detail = text
    return matched, detail


def exception_from_db(
    exc: BaseException, *, log: bool = False, config: Config | None = None
) -> IllegalTransitionError | None:
    """Map the trigger's error (SQLSTATE :data:`TRANSITION_SQLSTATE`) to an
    :class:`IllegalTransitionError` with ``via="db"``; ``None`` for any other error.

    Works on the SQLAlchemy ``DBAPIError`` (or the driver error) of psycopg 3 and asyncpg.
    States are given back as declared on the model when the model is known in this process.
    With ``log=True`` the block is reported and counted like the session guards do (under
    ``config``'s switches; by default the environment's).
    """
    matched, detail = _sqlstate_detail(exc)
    if not matched:
        return None
    info: dict[str, Any] = {}
    if detail:
        try:
            parsed = json.loads(detail)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            info = parsed
    table = str(info.get("table", "?"))
    column = str(info.get("column", "?"))
    guard = guard_for_table(info.get("model"), info.get("schema"), table, column)
    pk_obj = info.get("pk")
    pk: Any = pk_obj
    if isinstance(pk_obj, dict):
        values = tuple(pk_obj.values())
        pk = values[0] if len(values) == 1 else values
    from_key, to_key = info.get("from"), info.get("to")
    op = info.get("op")
    err = IllegalTransitionError(
        model=str(info.get("model", guard.model if guard else table)),
        pk=pk,
        column=guard.attr_key if guard else column,
        from_state=guard.state(from_key) if guard else from_key,
        to_state=guard.state(to_key) if guard else to_key,
        via="db",
        reason=(
            "new rows must start in an initial state"
            if op == "INSERT"
            else "blocked by the database trigger"
        ),
    )
    if log:
        report(err, config)
    return err
