"""What the session guards share: a guarded column's change, the errors it raises, and the
helpers for reading rows by primary key (chunked, in key order so that locks are taken in the
same order by concurrent flushes)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, NoReturn

import sqlalchemy as sa
from sqlalchemy.orm import Mapper

from resilient_db._config import Config
from resilient_db._errors import IllegalTransitionError

from ._report import report
from ._rules import Guard, plain, sort_key

__all__ = ["Change", "chunks", "illegal", "in_key_order", "pk_filter", "raise_errors"]

_CHUNK = 1000  # keys per locked SELECT


class Change(NamedTuple):
    guard: Guard
    pk: Any
    identity: tuple[Any, ...]
    old: Any
    old_known: bool
    new: Any
    mapper: Mapper[Any]  # the row's mapper (its base mapper picks the flush's connection)


def raise_errors(errors: Sequence[IllegalTransitionError], config: Config) -> NoReturn:
    """Log and count every error; raise the first, saying how many more there were."""
    for err in errors:
        report(err, config)
    first = errors[0]
    if len(errors) > 1:
        more = f"{len(errors) - 1} more illegal change(s) in the same flush"
        first = _with_reason(first, f"{first.reason}; {more}" if first.reason else more)
    raise first


def _with_reason(err: IllegalTransitionError, reason: str) -> IllegalTransitionError:
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


def illegal(change: Change, old: Any, via: str) -> IllegalTransitionError:
    guard = change.guard
    nxt = guard.next.get(guard.key(old), frozenset())
    allowed = ", ".join(repr(plain(guard.state(k))) for k in sorted(nxt, key=sort_key))
    return IllegalTransitionError(
        model=guard.model,
        pk=change.pk,
        column=guard.attr_key,
        from_state=old,
        to_state=change.new,
        via=via,
        reason=f"allowed from here: {allowed}" if allowed else "no moves are allowed from here",
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
    if len(pk_columns) == 1:
        return pk_columns[0].in_([k[0] for k in keys])
    return sa.tuple_(*pk_columns).in_([tuple(k) for k in keys])
