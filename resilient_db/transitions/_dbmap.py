"""Mapping the trigger's error back: a database error with SQLSTATE :data:`TRANSITION_SQLSTATE`
raised by one of our trigger functions becomes :class:`IllegalTransitionError` (``via="db"``),
states given back as the model declares them when the model is known in this process. Pure:
reads the exception, sends nothing.

What is trusted. Any SQL can raise SQLSTATE ``RDB01`` with a copy of our JSON detail (``RAISE
... USING ERRCODE``, also its ``SCHEMA``/``TABLE``/``COLUMN`` fields), so neither proves anything.
The error's CONTEXT does: the server writes it, naming the PL/pgSQL function that raised and the
statement (``PL/pgSQL function public.rdb_transition_tasks_status_<hash>() line 41 at RAISE``),
schema-qualified because our functions run with ``search_path = pg_catalog, pg_temp``. An error
is ours when that innermost line names, at a RAISE, the function generated for exactly the
schema, table and column of the detail (:func:`~._sql.function_name`, or the older name of a
trigger installed by an earlier release) in a schema that is not temporary, and the detail's table
is not temporary either. A DO block, a temporary function, or our function attached to a
temporary table all fail this. Forging it takes CREATE on a non-temporary schema (to define a
function of that name, or a table using ours) or ownership of our function: what an ordinary
application role does not have (PostgreSQL 15+ no longer grants CREATE on ``public`` to all).
It costs nothing on the success path: the check reads the exception only.
"""

from __future__ import annotations

import datetime
import decimal
import json
import re
import uuid
from typing import Any

import sqlalchemy as sa

from resilient_db._classify import error_chain
from resilient_db._config import Config
from resilient_db._errors import IllegalTransitionError

from ._report import report
from ._rules import Guard, Key, allowed_from, guard_for_table, plain, sort_key
from ._sql import TRANSITION_SQLSTATE, function_name, pg_name, stored_name

__all__ = ["exception_from_db"]


class _Diagnostics:
    """The fields of the first error in the chain carrying our SQLSTATE."""

    def __init__(self) -> None:
        self.matched = False
        self.detail: str | None = None
        self.context: str | None = None


def _diagnostics(exc: BaseException) -> _Diagnostics:
    found = _Diagnostics()
    for item in error_chain(exc):
        code = getattr(item, "sqlstate", None) or getattr(item, "pgcode", None)
        if code == TRANSITION_SQLSTATE:
            found.matched = True
        diag = getattr(item, "diag", None)  # psycopg: diag.message_detail, diag.context
        if found.detail is None:
            text = getattr(diag, "message_detail", None) or getattr(item, "detail", None)
            if isinstance(text, str) and text:
                found.detail = text
        if found.context is None:
            text = getattr(diag, "context", None) or getattr(item, "context", None)  # asyncpg
            if isinstance(text, str) and text:
                found.context = text
    return found


# An identifier as format_procedure() writes it: bare, or double-quoted with "" for ".
_IDENT = r'(?:"(?:[^"]|"")+"|[^\s".()]+)'
# "PL/pgSQL function <schema>.<name>() line <n> at RAISE": the words are translated with
# lc_messages, the signature and the statement name ("RAISE") are not. No double quote may
# stand before or after the signature, so a quoted name can't hide a fake signature inside it.
_RAISED_BY = re.compile(rf'^[^"]*?\s(?P<schema>{_IDENT})\.(?P<name>{_IDENT})\(\)\s[^"]*\sRAISE$')
_TEMP_SCHEMA = re.compile(r"pg_(?:toast_)?temp_\d+")


def _unquote(ident: str) -> str:
    return ident[1:-1].replace('""', '"') if ident.startswith('"') else ident


def _raised_by_our_trigger(context: str | None, info: dict[str, Any]) -> bool:
    """Whether the server-written CONTEXT says the trigger function of the detail's table and
    column raised the error (see the module's doc for what this trusts)."""
    schema, table, column = info.get("schema"), info.get("table"), info.get("column")
    if not (context and isinstance(schema, str) and isinstance(table, str)):
        return False
    if not isinstance(column, str) or _TEMP_SCHEMA.fullmatch(schema):
        return False
    match = _RAISED_BY.match(context.splitlines()[0])
    if match is None:
        return False
    fn_schema, fn_name = _unquote(match["schema"]), _unquote(match["name"])
    if _TEMP_SCHEMA.fullmatch(fn_schema):
        return False
    if fn_name == function_name(schema, table, column):
        return fn_schema == schema  # a model with a schema: its function lives there
    # a model without a schema: the function lives in the schema current at install
    return fn_name in (function_name(None, table, column), pg_name("rdb_transition", table, column))


def _guard_of(info: dict[str, Any]) -> Guard | None:
    """The guard of the detail's table and column, known in this process (or None)."""
    table, column = info.get("table"), info.get("column")
    if not (isinstance(table, str) and isinstance(column, str)):
        return None
    return guard_for_table(info.get("model"), info.get("schema"), table, column, stored=stored_name)


def _named_as_declared(info: dict[str, Any], guard: Guard | None) -> dict[str, Any]:
    """The detail with the table and column named as the guard's model names them: the server
    writes a name longer than 63 bytes cut (``TG_TABLE_NAME``), while the trigger function's
    name hashes the whole one."""
    if guard is None:
        return info
    return {**info, "table": guard.table.name, "column": guard.column.name}


def _typed(column: sa.Column[Any] | None, value: Any) -> Any:
    """A key value of the detail (JSON: text, number) as the column's Python type, as the
    flush guard gives it (UUID, date, datetime, time, Decimal, float, int); as it is when the
    type is unknown or the value does not convert (a date ``'infinity'``)."""
    try:
        python_type = column.type.python_type if column is not None else None
    except NotImplementedError:
        python_type = None
    if python_type is None or value is None or isinstance(value, python_type):
        return value
    try:
        if isinstance(value, str):
            if python_type is uuid.UUID:
                return uuid.UUID(value)
            if python_type in (datetime.datetime, datetime.date, datetime.time):
                return python_type.fromisoformat(value)
        elif isinstance(value, (int, decimal.Decimal)) and not isinstance(value, bool):
            if python_type is decimal.Decimal:
                return decimal.Decimal(value)
            if python_type is float:
                return float(value)
            if python_type is int and value == int(value):
                return int(value)
    except (ValueError, TypeError, ArithmeticError):
        pass
    return value


def _typed_key(guard: Guard | None, pk: dict[str, Any]) -> tuple[Any, ...]:
    """The detail's row key, each value typed by its key column of ``guard``."""
    if guard is None:
        return tuple(pk.values())
    columns = {stored_name(c.name): c for c in guard.pk_columns}
    return tuple(_typed(columns.get(stored_name(name)), value) for name, value in pk.items())


def _shown(guard: Guard, keys: list[Key]) -> str:
    return ", ".join(repr(plain(guard.state(k))) for k in keys)


def exception_from_db(
    exc: BaseException,
    *,
    log: bool = False,
    config: Config | None = None,
    service: str | None = None,
) -> IllegalTransitionError | None:
    """Map the trigger's error (SQLSTATE :data:`TRANSITION_SQLSTATE`) to an
    :class:`IllegalTransitionError` with ``via="db"``; ``None`` for any other error, including
    one with that SQLSTATE that our trigger did not raise (see the module's doc).

    Works on the SQLAlchemy ``DBAPIError`` (or the driver error) of psycopg 3 and asyncpg.
    States are given back as declared on the model when the model is known in this process.
    With ``log=True`` the block is reported and counted like the session guards do (under
    ``config``'s switches; by default the environment's).
    """
    found = _diagnostics(exc)
    if not found.matched or not found.detail:
        return None
    try:
        info = json.loads(found.detail, parse_float=decimal.Decimal)  # numeric keys exactly
    except ValueError:
        return None
    if not isinstance(info, dict) or info.get("resilient_db") != "transition":
        return None
    guard = _guard_of(info)
    if not _raised_by_our_trigger(found.context, _named_as_declared(info, guard)):
        return None
    table = str(info["table"])
    column = str(info["column"])
    pk_obj = info.get("pk")
    pk: Any = pk_obj
    if isinstance(pk_obj, dict):
        values = _typed_key(guard, pk_obj)
        pk = values[0] if len(values) == 1 else values
    from_key, to_key = info.get("from"), info.get("to")
    op = info.get("op")
    reason = (
        "new rows must start in an initial state"
        if op == "INSERT"
        else "blocked by the database trigger"
    )
    if guard is not None and (
        to_key in guard.initial if op == "INSERT" else guard.legal(from_key, to_key)
    ):
        # the model declares this move legal: the trigger was installed from other rules
        reason = (
            f"{reason}, whose rules differ from those declared on the model (which allow this "
            "move): install the trigger again from the model's __transitions__ (a migration "
            "calling rdb.install_transition_trigger; rdb.trigger_drift tells what differs)"
        )
    elif guard is not None:
        # what the flush guard would say: the declared way out (or in)
        if op == "INSERT":
            initial = sorted(guard.initial, key=sort_key)
            reason = f"new rows must start in an initial state: {_shown(guard, initial)}"
        else:
            reason = f"{reason}; {allowed_from(guard, from_key)}"
    err = IllegalTransitionError(
        model=str(info.get("model", guard.model if guard else table)),
        pk=pk,
        column=guard.attr_key if guard else column,
        from_state=guard.state(from_key) if guard else from_key,
        to_state=guard.state(to_key) if guard else to_key,
        via="db",
        reason=reason,
        inserted=op == "INSERT",
    )
    if log:
        report(err, config, service=service)
    return err
