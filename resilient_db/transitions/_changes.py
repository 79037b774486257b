"""What the session guards share: a guarded column's change, the errors it raises, and the
helpers for reading rows by primary key (chunked, in key order so that locks are taken in the
same order by concurrent flushes)."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, NoReturn

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapper, Session

from resilient_db._config import Config
from resilient_db._errors import IllegalTransitionError
from resilient_db._registry import service_of

from ._report import report
from ._rules import Guard, Undeclared, allowed_from, written_by_name

__all__ = [
    "Change",
    "as_declared",
    "chunks",
    "illegal",
    "in_key_order",
    "pk_filter",
    "raise_errors",
    "read_by_keys",
]

_CHUNK = 1000  # keys per locked SELECT


class Change(NamedTuple):
    guard: Guard
    pk: Any
    identity: tuple[Any, ...]
    old: Any
    old_known: bool
    new: Any
    mapper: Mapper[Any]  # the row's mapper (its base mapper picks the flush's connection)
    #: the flush's object of the row (its ``InstanceState``): in a session that picks each
    #: row's connection by the row (``connection_callable``: horizontal sharding), it picks the
    #: connection the row is checked on. None for a bulk UPDATE's row
    state: Any = None


def raise_errors(
    errors: Sequence[IllegalTransitionError], config: Config, session: Session | None = None
) -> NoReturn:
    """Log and count every error (under the service of ``session``'s factory, where no unit
    runs: see :func:`report`); raise the first, saying how many more there were."""
    service = None if session is None else service_of(session)
    for err in errors:
        report(err, config, service=service)
    first = errors[0]
    if len(errors) > 1:
        more = f"{len(errors) - 1} more illegal change(s) in the same flush"
        first = with_reason(first, f"{first.reason}; {more}" if first.reason else more)
    raise first


def with_reason(err: IllegalTransitionError, reason: str) -> IllegalTransitionError:
    return type(err)(
        model=err.model,
        pk=err.pk,
        column=err.column,
        from_state=err.from_state,
        to_state=err.to_state,
        via=err.via,
        reason=reason,
        inserted=err.inserted,
    )


def as_declared(guard: Guard, value: Any) -> Any:
    """``value``, a state as assigned or read, in the form the declared states have, for
    errors: a value the column stores as a declared state is that state (an ``Enum`` column's
    member given by its name, a ``str`` enum's member read as its value, a ``CHAR(n)`` value
    read with its padding, ``1.0`` for the integer state 1); anything else is as given."""
    if value is None:
        return None
    return guard.states.get(guard.key(value), value)


def illegal(change: Change, old: Any, via: str) -> IllegalTransitionError:
    guard = change.guard
    reason = allowed_from(guard, guard.key(old))
    new = change.new
    if isinstance(new, enum.Enum) and written_by_name(guard.column.type, new):
        reason = (
            f"{new!r} is a member of a plain enum.Enum, which the driver writes by its name "
            f"({new.name!r}), not its value, into a column that is not an Enum column; "
            f"{reason}"
        )
    else:
        key = guard.key(new)
        if isinstance(key, Undeclared) and key.why:
            reason = f"{key.why}; {reason}"  # what the column type made of the value
    return IllegalTransitionError(
        model=guard.model,
        pk=change.pk,
        column=guard.attr_key,
        from_state=as_declared(guard, old),
        to_state=as_declared(guard, change.new),
        via=via,
        reason=reason,
    )


def chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def in_key_order(keys: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    items = list(keys)
    try:
        return sorted(items)
    except TypeError:
        return sorted(items, key=repr)


def pk_filter(pk_columns: Sequence[sa.Column[Any]], keys: Sequence[tuple[Any, ...]]) -> Any:
    """``pk IN (keys)``, the keys bound as values of the key columns' types (a key given in
    another Python type, ``"2"`` for an integer, is converted by the database as the UPDATE
    converts it, not compared as text)."""
    if len(pk_columns) == 1:
        column = pk_columns[0]
        values = [k[0] for k in keys]
        return column.in_(sa.bindparam("rdb_keys", values, expanding=True, type_=column.type))
    return sa.tuple_(*pk_columns).in_([tuple(k) for k in keys])


def read_by_keys(
    conn: Connection,
    pk_columns: Sequence[sa.Column[Any]],
    columns: Sequence[Any],
    keys: Sequence[tuple[Any, ...]],
    *,
    lock: bool,
    of: Any = None,
) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """``pk_columns`` and ``columns`` of the rows with primary keys ``keys``, by key as given:
    one SELECT per chunk of keys, rows in key order (``FOR UPDATE`` when ``lock``, of ``of``
    when given: concurrent writers lock in the same order).

    A key given in another Python type than the database returns (a UUID or an integer given
    as a string) is matched by the database, as the UPDATE matches it: the keys not found by
    equality are looked up again by their position in a VALUES list of the key columns'
    types. A key absent from the result matches no row."""
    n_pk = len(pk_columns)
    current: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for chunk in chunks(keys):
        stmt = (
            sa.select(*pk_columns, *columns)
            .where(pk_filter(pk_columns, chunk))
            .order_by(*pk_columns)
        )
        if lock:
            stmt = stmt.with_for_update(of=of) if of is not None else stmt.with_for_update()
        for row in conn.execute(stmt):
            current[tuple(row[:n_pk])] = tuple(row)
    missing = [k for k in keys if k not in current]
    if missing:
        current.update(_read_by_position(conn, pk_columns, columns, missing, lock=lock, of=of))
    return current


def _read_by_position(
    conn: Connection,
    pk_columns: Sequence[sa.Column[Any]],
    columns: Sequence[Any],
    keys: Sequence[tuple[Any, ...]],
    *,
    lock: bool,
    of: Any,
) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    found: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for chunk in chunks(keys):
        given = sa.values(
            sa.column("rdb_n", sa.Integer()),
            *(sa.column(f"rdb_k{i}", c.type) for i, c in enumerate(pk_columns)),
            name="rdb_keys",
        ).data([(n, *key) for n, key in enumerate(chunk)])
        on = sa.and_(
            *(c == sa.cast(given.c[f"rdb_k{i}"], c.type) for i, c in enumerate(pk_columns))
        )
        table = pk_columns[0].table
        stmt = (
            sa.select(given.c.rdb_n, *pk_columns, *columns)
            .select_from(table)
            .join(given, on)
            .order_by(*pk_columns)
        )
        if lock:
            stmt = stmt.with_for_update(of=of if of is not None else table)
        for row in conn.execute(stmt):
            found[tuple(chunk[row[0]])] = tuple(row[1:])
    return found
