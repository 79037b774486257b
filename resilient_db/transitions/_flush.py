"""The flush guard: every changed row is checked before anything is sent, and the write is a
compare-and-set carried by the flush's own UPDATE.

``before_flush`` checks each change of a guarded column against the state the row was loaded in
(and each new row against the initial states), then records per connection what every changed row
must still hold. Engine listeners add ``AND col = :expected`` to the flush's UPDATE of those rows
and compare its row count: a row that another transaction moved raises
:class:`StaleTransitionError`. Where the row count can't tell, the rows are checked under lock
before their UPDATE instead. No implicit lazy loads: works unchanged under ``AsyncSession``.
"""

from __future__ import annotations

import decimal
import enum
import functools
import operator
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple, TypeAlias

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import NO_VALUE, Mapper, Session, UOWTransaction
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.sql.elements import ClauseElement

from resilient_db._classify import error_chain, sqlstate_of
from resilient_db._config import Config
from resilient_db._errors import IllegalTransitionError, StaleTransitionError
from resilient_db._internals import NEVER_SET, attribute_history
from resilient_db._state import STATE
from resilient_db._statements import StatementGuard, current_attempt, note_write

from ._bypass import active_config
from ._changes import (
    Change,
    as_declared,
    illegal,
    in_key_order,
    raise_errors,
    read_by_keys,
    with_reason,
)
from ._rules import (
    Guard,
    compiled_guards,
    enum_db_values,
    plain,
    sort_key,
    storage_type,
    trims_scale,
)

__all__ = [
    "before_flush",
    "before_insert",
    "before_update",
    "flush_ended",
    "guard_execute",
    "guard_for_commit_protocol",
    "install_engine_hooks",
    "key_text",
    "state_of_text",
]


def before_flush(
    session: Session, flush_context: UOWTransaction, instances: Sequence[Any] | None
) -> None:
    if STATE.flushing.get(session) is not None:
        flush_ended(session)  # an earlier flush that another before_flush listener stopped
    config = active_config(session)
    if config is None:
        return
    only = None if instances is None else {id(o) for o in instances}
    errors: list[IllegalTransitionError] = []
    changes: list[Change] = []
    guards_of = _GuardsByMapper()
    new = session.new
    replaced: dict[Any, InstanceState[Any]] | None = None  # deleted rows, by identity key
    # mappers of guarded rows this flush updates with no change of status seen here: a mapper's
    # before_update listener may still set one during the flush (checked when it is sent); and
    # of new rows whose status a post_update relationship writes from a row the flush makes
    # (with those rows: judged when that UPDATE is sent)
    touched: _Touched = {}
    added = list(new) if only is None else [o for o in new if id(o) in only]
    if added and (len(added) < _FEW or _any_guarded(added, guards_of)):
        for obj in added:
            state = instance_state(obj)  # the session's objects are mapped: no inspect() needed
            if guards := guards_of[state.mapper]:
                if replaced is None:
                    gone = (instance_state(o) for o in session.deleted)
                    replaced = {d.key: d for d in gone if d.key is not None}
                switched = _switched_from(state, replaced) if replaced else None
                for guard in guards:
                    if switched is not None:
                        _check_row_switch(guard, state, switched, changes, errors)
                        continue
                    value = state.dict.get(guard.attr_key)
                    if value.__class__ is str and value in guard.initial_text and not guard.related:
                        continue  # the common case: an initial state, as _check_insert would find
                    errors.extend(_check_insert(guard, state, in_flush=False, later=touched))
    dirty = session.dirty
    updated = list(dirty) if only is None else [o for o in dirty if id(o) in only]
    walked = updated and (len(updated) < _FEW or _any_guarded(updated, guards_of))
    for obj in updated if walked else ():
        state = instance_state(obj)
        guards = guards_of[state.mapper]
        key = state.key
        if not guards or key is None:
            continue
        changed = False
        committed = state.committed_state
        for guard in guards:
            if guard.attr_key in committed:
                change = _pending_change(guard, state, key[1])
            elif guard.related:
                change = _related_change(guard, state, key[1], committed)
            elif guard.onupdate is None:
                continue  # not set since the row was loaded (most rows a flush updates)
            else:
                change = None
            if change is None:
                if guard.onupdate is None:
                    continue
                # not written by the flush's UPDATE of the row: its onupdate is
                change = _onupdate_change(guard, state, key[1])
                if change is None:
                    continue
                changed = True
                changes.append(change)  # judged when the UPDATE is sent, if it is
                continue
            changed = True
            if change.old_known and not guard.legal_move(change.old, change.new):
                errors.append(illegal(change, change.old, "flush"))
            else:
                changes.append(change)
        if not changed and state.mapper not in touched:
            touched[state.mapper] = []
    if not errors:
        if len(changes) == 1 and not touched and changes[0].old_known:
            errors = _prepare_one_row(session, config, changes[0], guards_of)  # the common case
        elif changes or touched:
            errors = _prepare_compare_and_set(session, config, changes, touched, guards_of)
    if errors:
        raise_errors(errors, config, session)


def before_update(mapper: Mapper[Any], connection: Connection, state: InstanceState[Any]) -> None:
    """Mapper ``before_update`` of a model with rules: a row of it is being updated by a flush.
    A status set after :func:`before_flush` looked (by a ``before_flush`` listener added after
    the guard's, or by the ORM itself: a foreign key written through a one-to-many
    collection) was judged by no one: the guarded tables of ``mapper`` are watched on
    ``connection`` for this flush, so that the flush's UPDATE setting a guarded column of a row
    with no expectation has the row checked under lock first (:func:`_check_written`). Costs
    a lookup when the flush watches them already. Listened to raw (``state``: the row's
    ``InstanceState``), see ``_guards._watch``."""
    checks: _FlushChecks | None = STATE.flush_checks.get(connection)
    if checks is not None and mapper in checks.covered:
        return  # the common case: before_flush watches these tables already
    guards = compiled_guards(mapper)
    if checks is not None:
        rows = checks.rows
        for guard in guards:
            if guard.table not in rows:
                break
        else:
            checks.covered.add(mapper)  # (the flush's next row of it returns above)
            return
    if not guards:
        return
    session = state.session
    if session is None or not any(
        cls in STATE.guarded_session_classes for cls in type(session).__mro__
    ):
        return  # a session whose flushes the guard does not follow
    config = active_config(session)
    if config is None:
        return
    if checks is None:
        install_engine_hooks(connection.engine)
        checks = STATE.flush_checks[connection] = _FlushChecks(config, session)
        STATE.flushing.setdefault(session, []).append(connection)
    for guard in guards:
        checks.note_guard(guard, mapper)
        checks.rows.setdefault(guard.table, {})
    checks.covered.add(mapper)


def before_insert(mapper: Mapper[Any], connection: Connection, state: InstanceState[Any]) -> None:
    """Mapper ``before_insert`` of a model with rules: a new row of it is being inserted by a
    flush. A status set after :func:`before_flush` looked (by a ``before_insert`` listener of
    the application's, say) must still be an initial state. The row is judged first (a
    membership test when it starts as it should); the session is looked at only when it
    does not. Listened to raw (``state``: the row's ``InstanceState``), see
    ``_guards._watch``."""
    errors = None
    for guard in compiled_guards(mapper):
        value = state.dict.get(guard.attr_key)
        if value.__class__ is str and value in guard.initial_text:
            continue  # the common case: an initial state, as _check_insert would find
        found = _check_insert(guard, state)
        if found:
            errors = found if errors is None else [*errors, *found]
    if not errors:
        return
    session = state.session
    if session is None or not any(
        cls in STATE.guarded_session_classes for cls in type(session).__mro__
    ):
        return  # a session whose flushes the guard does not follow
    key = mapper.identity_key_from_instance(state.obj())
    if None not in key[1] and key in session.identity_map:
        # a row deleted in this flush that this object replaces (SQLAlchemy's row switch, for
        # which it calls before_insert too): sent as an UPDATE of that row, judged as a move
        return
    config = active_config(session)
    if config is not None:
        raise_errors(errors, config, session)


#: mappers of rows a flush watches (see before_flush), each with the new rows of it whose status
#: a post_update relationship writes from a row the flush makes, and their guards
_Touched: TypeAlias = dict[Mapper[Any], list[tuple[Guard, InstanceState[Any]]]]


#: a flush of fewer new (or changed) objects than this walks them at once, each one's guards
#: looked up there; from a few on, first once per class (see :func:`_any_guarded`)
_FEW: Final = 8


def _any_guarded(objs: list[Any], guards_of: _GuardsByMapper) -> bool:
    """Whether any of a flush's new or changed objects ``objs`` may be of a model with guards:
    looked up once per class (a class's objects share its mapper), so that a flush of many
    rows of models without rules pays one comprehension for them, not a walk. (Asked of a
    flush of :data:`_FEW` objects or more: a unit's usual flush of a few is walked at once.)"""
    by_class = {o.__class__: o for o in objs}
    return any(guards_of[instance_state(o).mapper] for o in by_class.values())


class _GuardsByMapper(dict[Mapper[Any], tuple[Guard, ...]]):
    """The guards of each mapper a flush meets, looked up once per mapper (a flush of a
    thousand rows of one model asks a thousand times)."""

    def __missing__(self, mapper: Mapper[Any]) -> tuple[Guard, ...]:
        guards = self[mapper] = compiled_guards(mapper)
        return guards


def _check_insert(
    guard: Guard,
    state: InstanceState[Any],
    *,
    in_flush: bool = True,
    later: _Touched | None = None,
) -> list[IllegalTransitionError]:
    """The error of a new row not in an initial state, if it isn't. ``in_flush`` False (from
    :func:`before_flush`): a status not set yet that the ORM may set during the flush, from a
    related object, is left to :func:`before_insert`, which sees it set; one that a
    ``post_update`` relationship writes after the INSERT (a second statement, for which no
    ``before_insert`` is called) is judged here, as the state the row starts in, or, when the
    related row's key is not known yet (the database makes it in this flush), added to
    ``later`` (by its mapper): judged when that UPDATE is sent (see :func:`_check_written`)."""
    value = state.dict.get(guard.attr_key)
    if guard.related and not in_flush:
        late = _set_after_insert(guard, state)
        if late is _LATER:
            if later is not None:
                later.setdefault(state.mapper, []).append((guard, state))
        elif late is not _UNSET:
            value = late
    if value is None:
        default = guard.column.default
        if default is not None and getattr(default, "is_scalar", False):
            value = getattr(default, "arg", None)
        elif default is not None or guard.column.server_default is not None:
            return []  # the database computes it; the trigger checks it
        elif not in_flush and _set_from_related(guard, state.mapper):
            return []
    if isinstance(value, ClauseElement) or hasattr(value, "__clause_element__"):
        return []  # a SQL expression: only the trigger can see its value
    if guard.key(value) in guard.initial:
        return []
    pk = guard.pk_of(state.key[1] if state.key else _pending_pk(guard, state))
    return [_not_initial(guard, pk, value)]


def _not_initial(guard: Guard, pk: Any, value: Any) -> IllegalTransitionError:
    """The error of a new row whose status ``value`` is no initial state."""
    allowed = ", ".join(repr(plain(guard.state(k))) for k in sorted(guard.initial, key=sort_key))
    return IllegalTransitionError(
        model=guard.model,
        pk=pk,
        column=guard.attr_key,
        from_state=None,
        to_state=as_declared(guard, value),
        via="flush",
        reason=f"new rows must start in one of: {allowed}",
        inserted=True,
    )


def _set_from_related(guard: Guard, mapper: Mapper[Any]) -> bool:
    """Whether the flush may set the status column from a related object: it is a foreign key
    (a many-to-one relationship of the model, or another model's one-to-many collection, copies
    the related row's key into it), or a column a relationship of the model writes."""
    column = guard.column
    return bool(column.foreign_keys) or any(
        column in prop.local_columns for prop in mapper.relationships
    )


def _set_after_insert(guard: Guard, state: InstanceState[Any]) -> Any:
    """The state a many-to-one relationship with ``post_update=True`` of a new row writes into
    its status column (SQLAlchemy inserts the row with the column as it is, then sets it by an
    UPDATE of its own), when the related row's key is known; ``_LATER`` when it is not (a
    related row whose key the database makes in this flush, or one whose key is not loaded);
    else ``_UNSET``."""
    relationships = state.mapper.relationships
    for relation, related_key in guard.related:
        if not relationships[relation].post_update:
            continue
        target = state.dict.get(relation)
        if target is not None:
            new = instance_state(target).dict.get(related_key)
            return _LATER if new is None else new
    return _UNSET


def _switched_from(
    state: InstanceState[Any], replaced: dict[Any, InstanceState[Any]]
) -> InstanceState[Any] | None:
    """The deleted row a new object replaces in this flush (the same identity key), if any:
    SQLAlchemy sends the pair as one UPDATE of that row (its "row switch")."""
    key = state.mapper.identity_key_from_instance(state.obj())
    if None in key[1]:
        return None  # no key of its own yet (the database gives it): no row to switch to
    return replaced.get(key)


def _check_row_switch(
    guard: Guard,
    state: InstanceState[Any],
    gone: InstanceState[Any],
    changes: list[Change],
    errors: list[IllegalTransitionError],
) -> None:
    """A new object replacing the row ``gone`` (deleted in the same flush, same key): the
    UPDATE SQLAlchemy sends for the pair moves the row from the state it was loaded in to the
    new object's, so the move is judged as one, not as a new row's (the trigger judges that
    UPDATE so too; the same delete and add in two flushes are a DELETE and an INSERT). A legal
    move is recorded like a changed row's (``changes``), so its UPDATE is a compare-and-set; a
    state that was not loaded is read first, as for a changed row."""
    attr = guard.attr_key
    if attr not in state.committed_state:
        return  # not set on the new object: SQLAlchemy's UPDATE leaves the column alone
    new = state.dict.get(attr)
    if new.__class__ is not str and (
        isinstance(new, ClauseElement) or hasattr(new, "__clause_element__")
    ):
        return  # a SQL expression: only the trigger can see its value
    old = gone.committed_state.get(attr, _UNSET)
    if old is _UNSET:
        old = gone.dict.get(attr, _UNSET)
    known = old is not _UNSET and old is not NO_VALUE and old is not NEVER_SET
    identity = gone.key[1]  # type: ignore[index]
    change = Change(
        guard,
        guard.pk_of(identity),
        identity,
        old if known else None,
        known,
        new,
        state.mapper,
        state,
    )
    if not known or guard.legal(guard.key(old), guard.key(new)):
        changes.append(change)
        return
    err = illegal(change, old, "flush")
    errors.append(
        with_reason(
            err,
            f"{err.reason}; a row deleted and added again with the same key in one flush is "
            "written as an UPDATE of the row: flush the delete first to replace it",
        )
    )


_UNSET: Any = object()
_LATER: Any = object()  # see _set_after_insert


def _pending_pk(guard: Guard, state: InstanceState[Any]) -> tuple[Any, ...] | None:
    values = tuple(state.dict.get(k) for k in guard.pk_attr_keys)
    return None if all(v is None for v in values) else values


def _pending_change(
    guard: Guard, state: InstanceState[Any], identity: tuple[Any, ...]
) -> Change | None:
    """The change of the guarded column that the flush will write, if any (``identity``: the
    row's, from ``state.key``). Called for a column set since the row was loaded (in
    ``state.committed_state``).

    The history's ``added`` is empty exactly when the ORM leaves the column out of its UPDATE (both
    compare with the attribute's ``is_equal``). A change to a value with the same database
    spelling (an Enum member for its name) is still returned: it is legal, but the UPDATE sets
    the column, so it carries the compare-and-set like any other.
    """
    key = guard.attr_key
    # the attribute's own history (``state.attrs[...]`` builds a view of every attribute), a
    # named tuple (added, unchanged, deleted)
    added, _, deleted = attribute_history(state, key)
    if not added:
        return None
    new = added[0]
    if new.__class__ is not str and (
        isinstance(new, ClauseElement) or hasattr(new, "__clause_element__")
    ):
        return None  # a SQL expression: only the trigger can see its value
    pk = identity[0] if len(identity) == 1 else identity
    old = deleted[0] if deleted else None
    return Change(guard, pk, identity, old, bool(deleted), new, state.mapper, state)


def _related_change(
    guard: Guard, state: InstanceState[Any], identity: tuple[Any, ...], committed: Any
) -> Change | None:
    """The change of the status column that a many-to-one relationship assigned since the row
    was loaded will write (the flush copies the related row's key into the column), as
    :func:`_pending_change` gives one of the column set itself: judged from the state the row
    was loaded in, its UPDATE compare-and-set on it. None when no such relationship was
    assigned, or the related row's key is not known yet (a new row whose key the database
    gives: the UPDATE is then checked under lock when the flush sends it, see
    :func:`before_update`)."""
    for relation, related_key in guard.related:
        if relation not in committed:
            continue
        added, _, _ = attribute_history(state, relation)
        if not added:
            continue
        target = added[0]
        new = None if target is None else instance_state(target).dict.get(related_key)
        if target is not None and new is None:
            return None
        pk = identity[0] if len(identity) == 1 else identity
        loaded = state.dict.get(guard.attr_key, _UNSET)
        if loaded is _UNSET:  # expired: read first, as a status set but not loaded is
            return Change(guard, pk, identity, None, False, new, state.mapper, state)
        return Change(guard, pk, identity, loaded, True, new, state.mapper, state)
    return None


class _OnUpdate:
    """The state a Change writes when it is the column's onupdate not judged yet (a Python
    function's value, or a move that is not legal): judged as the UPDATE is sent (see
    :func:`_check_written`), which records the state written instead."""

    def __repr__(self) -> str:
        return "(the column's onupdate)"


_ONUPDATE: Any = _OnUpdate()


def _onupdate_change(
    guard: Guard, state: InstanceState[Any], identity: tuple[Any, ...]
) -> Change | None:
    """The change of the status column that the flush's UPDATE of a row writes when the flush
    does not set it: the column's Python-side ``onupdate`` (:attr:`Guard.onupdate`), which
    SQLAlchemy applies to every UPDATE of the row that leaves the column out. Judged from the
    state the row was loaded in and compare-and-set on it, as a status set is, at no extra
    round trip. The flush may send no UPDATE of the row (no column of it has a net change),
    and a Python function's value is computed only as it is sent, a SQL expression's only by
    the server: a move judged legal here carries its state; any other carries
    :data:`_ONUPDATE`, and is judged (refused if illegal) when the UPDATE is sent, by
    :func:`_check_written` (a Python onupdate) or from what the server wrote (a SQL
    expression: see :func:`_server_written`). None when the state was not loaded (the UPDATE
    is then checked under lock, see :func:`before_update`), but for a SQL expression, whose
    row's state is read first, as a status set but not loaded is."""
    old = state.dict.get(guard.attr_key, _UNSET)
    pk = identity[0] if len(identity) == 1 else identity
    if old is _UNSET:
        if guard.sql_onupdate:
            return Change(guard, pk, identity, None, False, _ONUPDATE, state.mapper, state)
        return None
    if isinstance(old, ClauseElement) or hasattr(old, "__clause_element__"):
        return None
    onupdate = guard.onupdate
    new = _ONUPDATE
    if onupdate.is_scalar and guard.legal_move(old, onupdate.arg):
        new = onupdate.arg
    return Change(guard, pk, identity, old, True, new, state.mapper, state)


def _stale(change: Change, reason: str, from_state: Any = None) -> StaleTransitionError:
    guard = change.guard
    return StaleTransitionError(
        model=guard.model,
        pk=change.pk,
        column=guard.attr_key,
        from_state=as_declared(guard, change.old if from_state is None else from_state),
        to_state=as_declared(guard, change.new),
        via="flush",
        reason=reason,
    )


def _moved(guard: Guard, value: Any) -> str:
    return f"the row now holds {plain(as_declared(guard, value))!r}; reload it and decide again"


def _read_states(
    conn: Connection,
    pk_columns: Sequence[sa.Column[Any]],
    guards: Sequence[Guard],
    keys: Sequence[tuple[Any, ...]],
    *,
    lock: bool,
    extra: Sequence[Any] = (),
) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """The states the columns of ``guards`` hold in the rows with primary keys ``keys`` (then
    the ``extra`` columns), by key as given (see :func:`read_by_keys`). Each is read as its key
    (``col::text``, see :func:`key_text`) and given as :func:`state_of_text` makes it: the
    column type's own result processing is not used, which raises for a value it can't load
    (an ``Enum`` label or a ``TypeDecorator``'s code that a newer version of the application
    writes): the guard's answer (stale, illegal) named it."""
    n_pk, n = len(pk_columns), len(guards)
    texts = [key_text(g.column) for g in guards]
    found = read_by_keys(conn, pk_columns, [*texts, *extra], keys, lock=lock)
    return {
        key: (
            *(
                None if text is None else state_of_text(g, text)
                for g, text in zip(guards, row[n_pk : n_pk + n], strict=True)
            ),
            *row[n_pk + n :],
        )
        for key, row in found.items()
    }


def _check_against_db(
    conn: Connection, changes: Sequence[Change], *, lock: bool, or_written: bool = False
) -> tuple[list[IllegalTransitionError], list[Any]]:
    """Read the current state of every changed row (one SELECT per table) and check it: a row
    whose loaded state is known must still hold it (else stale); a row whose state was not
    loaded must be allowed to move from the state it holds (else illegal). ``or_written``: a
    row may hold the state the flush writes instead (see :func:`_lock_and_check`). Returns the
    errors and, per change, the state read."""
    by_table: dict[sa.Table, list[int]] = {}
    for index, change in enumerate(changes):
        by_table.setdefault(change.guard.table, []).append(index)
    errors: list[IllegalTransitionError] = []
    values: list[Any] = [None] * len(changes)
    # tables, then rows, in a fixed order: concurrent flushes lock in the same order
    for _, indexes in sorted(by_table.items(), key=lambda kv: (kv[0].schema or "", kv[0].name)):
        group = [changes[i] for i in indexes]
        columns: list[sa.Column[Any]] = []
        read: list[Guard] = []  # (one per column: the first change's)
        for change in group:
            if all(c is not change.guard.column for c in columns):
                columns.append(change.guard.column)
                read.append(change.guard)
        keys = in_key_order({c.identity for c in group})
        current = _read_states(conn, group[0].guard.pk_columns, read, keys, lock=lock)
        for index in indexes:
            change = changes[index]
            guard = change.guard
            found = current.get(change.identity)
            if found is None:
                errors.append(_gone(conn, change, change.old))
                continue
            db_value = found[next(i for i, c in enumerate(columns) if c is guard.column)]
            values[index] = db_value
            if not change.old_known:
                # (a SQL onupdate's state is judged once the server wrote it)
                if change.new is not _ONUPDATE and not guard.legal(
                    guard.key(db_value), guard.key(change.new)
                ):
                    errors.append(illegal(change, db_value, "flush"))
            elif guard.key(db_value) != guard.key(change.old) and not (
                or_written and guard.key(db_value) == guard.key(change.new)
            ):
                errors.append(_stale(change, _moved(guard, db_value)))
    return errors, values


# The compare-and-set, carried by the flush's own UPDATE ------------------------------------
#
# before_flush checks every move against the loaded state (nothing is sent for an illegal one)
# and records, per connection, the state each changed row must still hold. When the flush's
# UPDATE of those rows reaches the driver, a ``do_execute`` / ``do_executemany`` listener on the
# engine's dialect sends it with ``AND status = :expected`` added and compares the row count: a
# row that another transaction moved (or deleted) is not matched, and StaleTransitionError is
# raised from the flush. The current state of such a row is read on that error path only.
# SQLAlchemy's ``version_id_col`` makes the same check, but only for one column per mapper, on
# every UPDATE and DELETE of the row, and one row per statement (a 1,000-row flush measured 5.4x
# slower on psycopg, 10.9x on asyncpg); this keeps the ORM's executemany and leaves DELETE and
# other UPDATEs alone.
#
# Why the dialect's events and not the engine's ``before_execute``: a connection event on an
# engine makes every Connection of it join the engine's event dispatch and run the event hooks
# of every statement, begin and commit, reads included (measured: +16 % client instructions per
# primary-key read unit, +10 % per guarded write unit). Dialect events cost a statement one
# listener call, which returns at once unless the statement is an UPDATE. The listener sends the
# compare-and-set form compiled by SQLAlchemy for the same dialect (cached per compiled UPDATE),
# so SQLAlchemy's echo and ``before_cursor_execute`` listeners see the ORM's UPDATE, and the
# server receives it with the added condition.
#
# An executemany on PostgreSQL whose driver reports no row count for it (asyncpg) carries a
# condition that makes the server raise for a row that moved (:func:`_raising_condition`); its
# error names the row and the state it holds.
#
# A session that picks connections per row (``connection_callable``, horizontal sharding) has
# each row's expectation recorded on the connection the flush writes it through. A row of an
# UPDATE with no recorded expectation (its status was changed after before_flush) is read under
# lock first and expected to hold the state read; an UPDATE whose SQL has its schema names
# translated (``schema_translate_map``) is sent in the compare-and-set form compiled with the
# same map. Only where the row count can't tell (a dialect without a reliable one), or the SQL
# sent was rewritten otherwise, the guard falls back to checking the rows under lock
# (``SELECT ... FOR UPDATE``, one per table) and sending the UPDATE as it is: on a connection in
# AUTOCOMMIT mode those locks end with the check (the trigger is what holds there).


class _Expect(NamedTuple):
    change: Change
    value: Any  # the state the row must still hold: the loaded one, or the one read


# what one row must still hold, per guarded column
_Row: TypeAlias = dict[sa.Column[Any], _Expect]


class _FlushChecks:
    """What one flush expects of the rows it updates through one connection (one per guarded
    flush: a plain class with slots, cheaper to make than a dataclass)."""

    __slots__ = ("_session", "config", "covered", "guards", "inserted", "mappers", "rows")

    #: new rows (with their guard) whose status a post_update UPDATE writes after their INSERT,
    #: from a row whose key the flush makes, by table: each must start in an initial state
    #: (see :func:`_check_written`; set by :meth:`note_inserted` only: most flushes have none)
    inserted: dict[sa.Table, list[tuple[Guard, InstanceState[Any]]]]

    def __init__(self, config: Config, session: Session) -> None:
        self.config = config
        # whose service its errors name (see raise_errors); weak: these checks are kept by the
        # flush's Connection (a weak key), which the session would otherwise keep alive
        self._session = weakref.ref(session)
        self.rows: dict[sa.Table, dict[tuple[Any, ...], _Row]] = {}
        self.guards: dict[sa.Table, tuple[Guard, ...]] = {}
        #: a mapper of each table (what a row set during the flush, with no expectation, is
        #: judged as: see :func:`_check_written`)
        self.mappers: dict[sa.Table, Mapper[Any]] = {}
        #: mappers every guarded table of which is in ``rows`` (watched): :func:`before_update`
        #: has nothing to add for their rows
        self.covered: set[Mapper[Any]] = set()

    @property
    def session(self) -> Session | None:
        """The flush's session (None once it is gone)."""
        return self._session()

    def expect(self, change: Change, value: Any) -> None:
        guard = change.guard
        self.note_guard(guard, change.mapper)
        self.rows.setdefault(guard.table, {}).setdefault(change.identity, {})[guard.column] = (
            _Expect(change, value)
        )

    def note_inserted(self, guard: Guard, state: InstanceState[Any]) -> None:
        try:
            inserted = self.inserted
        except AttributeError:
            inserted = self.inserted = {}
        inserted.setdefault(guard.table, []).append((guard, state))

    def note_guard(self, guard: Guard, mapper: Mapper[Any]) -> None:
        # one guard per column: the models of an inheritance hierarchy share the column, and the
        # compare-and-set depends on nothing else (rules differ; errors name each row's model)
        table = guard.table
        guards = self.guards.get(table)
        if guards is None:  # the table's first guard (``mappers`` has none for it either)
            self.guards[table] = (guard,)
            self.mappers[table] = mapper
        elif all(g.column is not guard.column for g in guards):
            self.guards[table] = (*guards, guard)


class _Plan:
    """What the compare-and-set needs of one compiled UPDATE, for the guards of its table that
    a flush expects something of (memoized per compiled UPDATE: see :func:`_plan`)."""

    __slots__ = (
        "column",
        "form",
        "guards",
        "label",
        "labels",
        "raising_form",
        "returning_form",
        "server",
    )

    def __init__(
        self, guards: tuple[Guard, ...], labels: tuple[str, ...], server: tuple[Guard, ...] = ()
    ) -> None:
        self.guards = guards  # those whose column the UPDATE sets
        self.labels = labels  # its primary-key parameters
        #: those of ``guards`` whose column the UPDATE sets to its onupdate SQL expression,
        #: which the server computes (see :func:`_server_written`)
        self.server = server
        # the column of its one guard (the common case), the label of a one-column key
        self.column: sa.Column[Any] | None = (
            guards[0].column if len(guards) == 1 and not server else None
        )
        self.label: str | None = labels[0] if len(labels) == 1 else None
        #: the compare-and-set forms of the UPDATE for these guards, plain and raising (see
        #: :func:`_cas_form`; None: not usable), made on first use (_NO_PLAN until then)
        self.form: _CasForm | None = _NO_PLAN
        self.raising_form: _CasForm | None = _NO_PLAN
        #: the plain form returning what the server wrote into the ``server`` guards' columns
        self.returning_form: _CasForm | None = _NO_PLAN


class _CasForm(NamedTuple):
    """The compare-and-set form of one compiled UPDATE, as the driver takes it."""

    sql: str
    names: tuple[str, ...]  # its added parameters (one per guard; then the row's number)
    processors: tuple[Callable[[Any], Any] | None, ...]  # their bind processors (per guard)
    positional: bool  # then the added parameters follow the UPDATE's own
    raising: bool  # see _raising_condition: the server raises for a row that moved


# Flushes in progress live in STATE: ``STATE.flush_checks`` (Connection -> _FlushChecks) by the
# Connection their UPDATEs go through, ``STATE.flushing`` (Session -> [Connection]) the
# connections of each session's flush. Weak: a connection or session that is dropped takes its
# entry along. One thread (or greenlet) uses a Connection at a time. session.info stays the
# user's. ``STATE.guard_engines``: the engines with the listeners below.
#
# Caches, weak by their key: the compare-and-set form of a flush's UPDATE statement, per guards
# (:func:`_cas_statement`); the plan of a compiled UPDATE, per guards of its table (:func:`_plan`;
# None: it sets none), which holds the compare-and-set forms of that compiled UPDATE too (one
# lookup per UPDATE sent).
_cas_statements: weakref.WeakKeyDictionary[
    Any, dict[tuple[tuple[Guard, ...], bool, tuple[Guard, ...]], Any]
] = weakref.WeakKeyDictionary()
_plans: weakref.WeakKeyDictionary[Any, dict[tuple[Guard, ...], _Plan | None]] = (
    weakref.WeakKeyDictionary()
)
_NO_PLAN: Any = object()


def flush_ended(session: Session, *_: Any) -> None:
    """after_flush / after_soft_rollback: the flush's expectations are done with. (A pop, no
    test of the weak dictionary's length first: that costs as much as the pop.)"""
    conns = STATE.flushing.pop(session, None)
    if conns is not None:
        flush_checks = STATE.flush_checks
        for conn in conns:
            flush_checks.pop(conn, None)


def _prepare_compare_and_set(
    session: Session,
    config: Config,
    changes: list[Change],
    touched: _Touched,
    guards_of: dict[Mapper[Any], tuple[Guard, ...]],
) -> list[IllegalTransitionError]:
    """Record what each change expects of its row, on the connection the flush will use for
    its UPDATE; rows whose state was not loaded are read first (and checked) so that their
    UPDATE can carry the state they hold. ``touched``: mappers of guarded rows updated with no
    change seen (their UPDATEs are watched too), with the new rows of each whose status a
    post_update UPDATE writes later (judged as they start, see :func:`_check_written`);
    ``guards_of``: the guards of each mapper the flush met. Returns the errors found.

    A session that picks each row's connection by the row (``connection_callable``: horizontal
    sharding, one database per shard) writes a row through its own shard's connection, not
    knowable ahead by mapper: each row's expectation is recorded on the connection the flush
    will write it through (``connection_callable(base_mapper, obj)``, as the flush asks it).
    Its rows updated with no change seen (``touched``) are watched as their UPDATEs are sent
    (see :func:`before_update`)."""
    # the flush gets its connection with get_bind(mapper=base_mapper): the same one
    by_conn: dict[Connection, list[Change]] = {}
    conn_of: dict[Mapper[Any], Connection] = {}
    attempt = current_attempt.get()
    began = None if attempt is None else attempt.began
    pick = session.connection_callable
    first = changes[0].mapper.base_mapper if changes else None
    if pick is not None:
        for change in changes:
            obj = None if change.state is None else change.state.obj()
            by_conn.setdefault(pick(change.mapper.base_mapper, obj), []).append(change)
        touched = {}
    elif (
        first is not None
        and not touched
        and (len(changes) == 1 or all(c.mapper.base_mapper is first for c in changes))
    ):  # the common case, without a lookup per row
        by_conn[_flush_connection(session, first, began)] = changes
    else:
        for change in changes:
            base = change.mapper.base_mapper
            seen = conn_of.get(base)
            if seen is None:
                seen = conn_of[base] = _flush_connection(session, base, began)
            by_conn.setdefault(seen, []).append(change)
    watched: dict[Connection, set[Mapper[Any]]] = {}
    for mapper in touched:
        base = mapper.base_mapper
        seen = conn_of.get(base)
        if seen is None:
            seen = conn_of[base] = _flush_connection(session, base, began)
        watched.setdefault(seen, set()).add(mapper)
        by_conn.setdefault(seen, [])
    errors: list[IllegalTransitionError] = []
    prepared: list[tuple[Connection, _FlushChecks]] = []
    for conn, group in by_conn.items():
        if not conn.dialect.supports_sane_rowcount:
            # the UPDATE's row count can't be trusted: lock and check (a status set during the
            # flush by a listener, or by a post_update UPDATE from a row the flush makes, is
            # left to the trigger here)
            errors.extend(_check_against_db(conn, group, lock=True)[0])
            continue
        checks = _FlushChecks(config, session)
        if watched:
            for mapper in watched.get(conn, ()):
                for guard in compiled_guards(mapper):
                    checks.note_guard(guard, mapper)
                    checks.rows.setdefault(guard.table, {})
                for guard, state in touched[mapper]:
                    checks.note_inserted(guard, state)
        unknown = [c for c in group if not c.old_known]
        if unknown:
            found, values = _check_against_db(conn, unknown, lock=False)
            errors.extend(found)
            for change, value in zip(unknown, values, strict=True):
                checks.expect(change, value)
        rows: dict[tuple[Any, ...], _Row] = {}
        last: Guard | None = None
        for change in [c for c in group if c.old_known] if unknown else group:
            guard = change.guard
            if guard is not last:  # rows come grouped by model: look the table up on a switch
                mapper = change.mapper
                checks.note_guard(guard, mapper)
                rows = checks.rows.setdefault(guard.table, {})
                if len(guards_of.get(mapper, ())) == 1:
                    checks.covered.add(mapper)  # its one guarded table is watched now
                last = guard
            row = rows.get(change.identity)
            if row is None:
                rows[change.identity] = {guard.column: _Expect(change, change.old)}
            else:
                row[guard.column] = _Expect(change, change.old)
        prepared.append((conn, checks))
    if errors:
        return errors
    flush_checks = STATE.flush_checks
    conns: list[Connection] = []
    for conn, checks in prepared:
        # (a membership test for an engine with the listener already: a resilient factory's
        # has the commit protocol's; an engine a unit's transaction began on may have neither,
        # one bound by the session's bind_mapper(), say)
        install_engine_hooks(conn.engine)
        flush_checks[conn] = checks
        conns.append(conn)
    if conns:
        STATE.flushing[session] = conns
    return errors


def _prepare_one_row(
    session: Session,
    config: Config,
    change: Change,
    guards_of: dict[Mapper[Any], tuple[Guard, ...]],
) -> list[IllegalTransitionError]:
    """:func:`_prepare_compare_and_set` for a flush whose one change is of a row whose state
    was loaded, and that updates no other guarded row (the common case), without its
    grouping: the same checks are recorded."""
    if session.connection_callable is not None:  # the row picks its connection
        return _prepare_compare_and_set(session, config, [change], {}, guards_of)
    attempt = current_attempt.get()
    mapper = change.mapper
    conn = _flush_connection(
        session, mapper.base_mapper, None if attempt is None else attempt.began
    )
    if not conn.dialect.supports_sane_rowcount:  # see _prepare_compare_and_set
        return _check_against_db(conn, [change], lock=True)[0]
    guard = change.guard
    table = guard.table
    checks = _FlushChecks(config, session)
    checks.guards[table] = (guard,)
    checks.mappers[table] = mapper
    checks.rows[table] = {change.identity: {guard.column: _Expect(change, change.old)}}
    if len(guards_of.get(mapper, ())) == 1:
        checks.covered.add(mapper)  # its one guarded table is watched
    install_engine_hooks(conn.engine)  # see _prepare_compare_and_set
    STATE.flush_checks[conn] = checks
    STATE.flushing[session] = [conn]
    return []


def _flush_connection(
    session: Session, base: Mapper[Any], began: list[tuple[Any, Any, bool, Any]] | None
) -> Connection:
    """The connection the flush will write ``base``'s rows through (``began``: the running
    attempt's record of the connections the session's transaction began on, see
    ``AttemptRecord.began_on``; the latest entry of an engine counts). The session's
    transaction has it once it began there; asking ``session.connection()`` again costs about
    40 lines of SQLAlchemy's bookkeeping per flush, so a connection already seen is looked up
    by its engine (a ``get_bind`` returning a Connection, or an engine not yet begun on,
    asks)."""
    transaction = session.get_transaction() if began else None
    if began:
        bind: Any = None
        for trans, conn, _, _ in reversed(began):
            if trans is not transaction:
                continue
            if bind is None:
                bind = session.get_bind(mapper=base)
            if conn.engine is bind:
                if not conn.closed:
                    return conn  # type: ignore[no-any-return]
                break
    return session.connection(bind_arguments={"mapper": base})


def install_engine_hooks(engine: Engine) -> None:
    """Listen on ``engine``'s dialect for the flush's UPDATEs, to send them with the
    compare-and-set (idempotent).

    A resilient factory's engine needs none of this: the commit protocol's statement listener,
    added when the factory is created, calls :func:`guard_execute` for every UPDATE. The flush
    guard calls this when a plain engine first serves a guarded flush. SQLAlchemy's event
    registration is not meant to race with dispatch: a thread inside another ``do_execute`` /
    ``do_executemany`` listener of this engine while these are added fails with "deque mutated
    during iteration". A plain engine without such listeners has nothing to iterate; one with
    listeners of yours should get these first, by calling this when it is created.

    The listeners send the flush's UPDATE themselves and return True, which ends SQLAlchemy's
    chain of ``do_execute`` listeners (they run in the order they were added; dialect events
    take no ``insert``): a listener of yours added later sees every other statement. One of
    yours added earlier that sends statements itself would send that UPDATE without the
    compare-and-set, so add such a listener after creating the resilient factory.
    """
    if engine in STATE.guard_engines:
        return
    with STATE.lock:
        if engine in STATE.guard_engines:
            return
        event.listen(engine, "do_execute", guard_execute)
        event.listen(engine, "do_executemany", guard_execute)
        STATE.guard_engines.add(engine)


def guard_for_commit_protocol(engine: Engine) -> StatementGuard | None:
    """The guard's statement listener, for a resilient factory's commit protocol to call from
    its own (one listener call per statement); ``engine`` counts as guarded from then on. None
    when the engine has the guard's own listeners already (it served a guarded flush before it
    had a resilient factory). The caller holds ``STATE.lock``."""
    if engine in STATE.guard_engines:
        return None
    STATE.guard_engines.add(engine)
    return _guard_update


def guard_execute(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
    """``do_execute`` and ``do_executemany`` listener: a flush's UPDATE of rows with
    expectations is sent with the compare-and-set (True: sent here); any other statement is left
    to the dialect (False)."""
    if not context.isupdate:
        return False
    return _compare_and_set(cursor, statement, parameters, context)


def _compare_and_set(
    cursor: Any, statement: str, parameters: Any, context: Any, noted: bool = False
) -> bool:
    """:func:`guard_execute` past its UPDATE check: sends the UPDATE with the compare-and-set
    when it is a flush's UPDATE of rows with expectations (True), else leaves it (False).
    ``noted``: the transaction is already noted as one that writes (the commit protocol's
    listener calls this for UPDATEs only, through :data:`_guard_update`)."""
    conn = context.root_connection
    # (a get, no test of the weak dictionary's length first: that costs more than the get)
    checks: _FlushChecks | None = STATE.flush_checks.get(conn)
    if checks is None:
        return False
    many = bool(context.executemany)  # do_executemany: parameters is a list of parameter sets
    compiled = context.compiled
    update = None if compiled is None else compiled.statement
    if not isinstance(update, sa.Update):
        return False
    table = update.table
    table_rows = checks.rows.get(table)  # type: ignore[call-overload]
    if table_rows is None:
        return False
    rows: list[dict[str, Any]] = context.compiled_parameters  # the values as the ORM gave them
    if not rows:
        return False  # sent without parameters: not the flush's UPDATE by primary key
    table_guards = checks.guards[table]  # type: ignore[index]
    by_guards = _plans.get(compiled)
    plan = _NO_PLAN if by_guards is None else by_guards.get(table_guards, _NO_PLAN)
    if plan is _NO_PLAN:
        plan = _plan(compiled, table_guards, rows[0], context)
    if plan is None:
        return False  # the UPDATE leaves the guarded columns alone
    column, label, form = plan.column, plan.label, plan.form
    if (
        not many
        and len(rows) == 1
        and column is not None
        and label is not None
        and form is not None
        and form is not _NO_PLAN
        and statement == compiled.string
        and label in rows[0]
    ):
        # The common case, one row of one guarded column by a one-column key, sent here when
        # it is as before_flush judged it; anything else is left to the general steps below,
        # which find the same for such a row.
        sent_row = rows[0]
        found = table_rows.get((sent_row[label],))
        expect = None if found is None else found.get(column)
        if expect is not None:
            judged, written = expect.change.new, sent_row[column.key]
            if judged is written or judged == written:  # (as the general steps compare)
                value = expect.value
                process = form.processors[0]
                if process is not None:
                    value = process(value)
                dialect = context.dialect
                if form.positional:
                    sent = dialect.execute_sequence_format((*parameters, value))
                else:
                    sent = {**parameters, form.names[0]: value}
                if not noted:
                    note_write(context)  # a later listener of the chain won't see it
                dialect.do_execute(cursor, form.sql, sent, context)
                matched = cursor.rowcount
                if matched != 1:
                    errors = _stale_rows(conn, plan.guards, [found], matched)
                    if errors:
                        raise_errors(errors, checks.config, checks.session)
                return True
    if plan.server:  # (its column is None: not the common case above)
        return _server_written(
            cursor,
            statement,
            parameters,
            context,
            checks=checks,
            table_rows=table_rows,
            plan=plan,
            noted=noted,
        )
    guards, labels = plan.guards, plan.labels
    try:
        if len(labels) == 1:
            label = labels[0]
            identities = [(row[label],) for row in rows]
        else:
            identities = [tuple(row[label] for label in labels) for row in rows]
    except KeyError:
        # Not an UPDATE by primary key, so not the flush's own (one a flush event sends, say),
        # yet it sets a guarded column of this table: the rows this flush expects something of
        # are checked under lock before it runs, whichever of them it touches. A row whose
        # own UPDATE this flush sent already (before an after_update listener's statement,
        # say) holds the state written: that one passes too. One that another transaction
        # moved there before that UPDATE was sent failed its compare-and-set then, and one
        # whose UPDATE is still to come is compared by it.
        pending = [r for r in table_rows.values() if all(g.column in r for g in guards)]
        if pending:
            _lock_and_check(conn, checks, guards, pending, or_written=True)
        return False
    # the rows this flush expects something of for every guard the UPDATE sets (a row
    # without: its status was changed after before_flush)
    if len(guards) == 1:
        column = guards[0].column
        expected = [r for r in map(table_rows.get, identities) if r is not None and column in r]
        complete = len(expected) == len(identities)
        # what is written must be what before_flush judged (a mapper's before_update listener
        # may have set another state since): a list comparison, identity first, then ==; per
        # row in C but for one line
        as_judged = complete and [r[column].change.new for r in expected] == list(
            map(operator.itemgetter(column.key), rows)
        )
    else:
        expected = [
            r
            for r in map(table_rows.get, identities)
            if r is not None and all(g.column in r for g in guards)
        ]
        complete = len(expected) == len(identities)
        as_judged = complete and all(
            r[g.column].change.new == row[g.column.key]
            for r, row in zip(expected, rows, strict=True)
            for g in guards
        )
    if not as_judged and _check_written(
        conn, checks, table_rows, guards=guards, sent=(identities, rows)
    ):
        # rows with no expectation were read under lock and now carry the state read: the
        # UPDATE is still the compare-and-set (on a connection in AUTOCOMMIT mode the check's
        # locks end with it; another transaction may move such a row before the UPDATE runs)
        expected = [
            r
            for r in map(table_rows.get, identities)
            if r is not None and all(g.column in r for g in guards)
        ]
        complete = len(expected) == len(identities)
    if not expected:
        return False
    dialect = context.dialect
    form = None
    if complete:
        if not many or dialect.supports_sane_multi_rowcount:
            form = plan.form
            if form is _NO_PLAN:
                form = plan.form = _cas_form(compiled, guards, dialect, raising=False)
        elif dialect.name == "postgresql":  # asyncpg: an executemany reports no row count
            # (psycopg's could name a moved row too, but measured 5-7 % slower on a flush of
            # 1,000 rows: its row count is kept, which can say how many, not which)
            form = plan.raising_form
            if form is _NO_PLAN:
                form = plan.raising_form = _cas_form(compiled, guards, dialect, raising=True)
    if form is not None and statement != compiled.string:  # (a call only where it differs)
        form = _as_sent(form, compiled, guards, statement, context)
    if form is None:
        # the row count can't tell, or the SQL sent is not the compiled one (nor that with
        # schema names translated): check under lock, let the UPDATE go as it is
        _lock_and_check(conn, checks, guards, expected)
        return False
    sent = _with_expected(form, parameters if many else [parameters], guards, expected, dialect)
    if not noted:
        note_write(context)  # a later listener of the chain (the commit protocol's) won't see it
    _send_compare_and_set(
        cursor, context, form, sent, many, guards=guards, expected=expected, checks=checks
    )
    if form.raising:
        return True  # no row count: a row deleted meanwhile goes unnoticed, as it does there
    matched = cursor.rowcount
    if matched != len(expected):
        errors = _stale_rows(conn, guards, expected, matched)
        if errors:
            raise_errors(errors, checks.config, checks.session)
        # else the rows of a versioned model hold the states expected (their version moved
        # on), or more rows matched than were sent: SQLAlchemy's row count check raises
    return True


def _send_compare_and_set(
    cursor: Any,
    context: Any,
    form: _CasForm,
    sent: list[Any],
    many: bool,
    *,
    guards: tuple[Guard, ...],
    expected: list[Any],
    checks: _FlushChecks,
) -> None:
    """Send the compare-and-set ``form`` of a flush's UPDATE with its parameters ``sent``; a
    raising form's error for a row that moved (see :func:`_raised_stale`) is raised as the
    stale error it stands for."""
    dialect = context.dialect
    try:
        if many:
            dialect.do_executemany(cursor, form.sql, sent, context)
        else:
            dialect.do_execute(cursor, form.sql, sent[0], context)
    except Exception as exc:
        stale = _raised_stale(exc, guards, expected) if form.raising else None
        if stale is None:
            raise
        raise_errors([stale], checks.config, checks.session)


_guard_update: StatementGuard = functools.partial(_compare_and_set, noted=True)


def _server_written(
    cursor: Any,
    statement: str,
    parameters: Any,
    context: Any,
    *,
    checks: _FlushChecks,
    table_rows: dict[tuple[Any, ...], _Row],
    plan: _Plan,
    noted: bool,
) -> bool:
    """:func:`_compare_and_set` for a flush's UPDATE that sets guarded columns to their
    ``onupdate`` SQL expression (``plan.server``): the server computes the state written, so it
    is judged once written, from the state the row had to hold (the compare-and-set makes sure
    it did), and a move the rules forbid raises IllegalTransitionError from the flush: its
    transaction is rolled back, as for any error of a flush, and nothing illegal commits.

    The expression is evaluated once, by the UPDATE itself; what it wrote comes back with it:
    one row sent alone returns it (``RETURNING``, at no extra round trip). Rows sent as an
    executemany (a driver's executemany returns no rows), or by an UPDATE with a RETURNING of
    SQLAlchemy's own (``eager_defaults=True``, which SQLAlchemy reads from the cursor itself),
    are read back after it, by primary key, in one SELECT: they are still locked by the
    UPDATE, so they hold what it wrote. Rows this flush has no expectation of (made dirty
    during the flush) are read under lock first; an UPDATE that can't carry the
    compare-and-set has its rows checked under lock, is sent as it is, and read back."""
    conn = context.root_connection
    many = bool(context.executemany)
    compiled = context.compiled
    rows: list[dict[str, Any]] = context.compiled_parameters
    guards, server, labels = plan.guards, plan.server, plan.labels
    try:
        identities = [tuple(row[label] for label in labels) for row in rows]
    except KeyError:
        # not the flush's own UPDATE by primary key (see _compare_and_set)
        pending = [r for r in table_rows.values() if all(g.column in r for g in guards)]
        if pending:
            _lock_and_check(conn, checks, guards, pending, or_written=True)
        return False
    set_guards = tuple(g for g in guards if g not in server)
    if set_guards and not all(
        found is not None and g.column in found and found[g.column].change.new == row[g.column.key]
        for found, row in zip(map(table_rows.get, identities), rows, strict=True)
        for g in set_guards
    ):
        _check_written(conn, checks, table_rows, guards=set_guards, sent=(identities, rows))
    lacking = [
        identity
        for identity in identities
        if (found := table_rows.get(identity)) is None or any(g.column not in found for g in guards)
    ]
    if lacking:
        _expect_held(
            conn,
            checks,
            table_rows=table_rows,
            guards=guards,
            server=server,
            sent=dict(zip(identities, rows, strict=True)),
            lacking=lacking,
        )
    expected = [table_rows[identity] for identity in identities]
    dialect = context.dialect
    returning = not many and not compiled.effective_returning
    form: _CasForm | None = None
    if returning:
        form = plan.returning_form
        if form is _NO_PLAN:
            form = plan.returning_form = _cas_form(
                compiled, guards, dialect, raising=False, returning=server
            )
    elif not many or dialect.supports_sane_multi_rowcount:
        form = plan.form
        if form is _NO_PLAN:
            form = plan.form = _cas_form(compiled, guards, dialect, raising=False)
    elif dialect.name == "postgresql":  # asyncpg: see _compare_and_set
        form = plan.raising_form
        if form is _NO_PLAN:
            form = plan.raising_form = _cas_form(compiled, guards, dialect, raising=True)
    if not noted:
        note_write(context)  # a later listener of the chain (the commit protocol's) won't see it
    if form is not None and statement != compiled.string:
        form = _as_sent(
            form, compiled, guards, statement, context, returning=server if returning else ()
        )
    if form is None:
        # no compare-and-set form (see _compare_and_set): rows checked under lock, the
        # UPDATE sent as it is, what it wrote read back
        _lock_and_check(conn, checks, guards, expected)
        if many:
            dialect.do_executemany(cursor, statement, parameters, context)
        else:
            dialect.do_execute(cursor, statement, parameters, context)
        returning = False
    else:
        sent = _with_expected(form, parameters if many else [parameters], guards, expected, dialect)
        _send_compare_and_set(
            cursor, context, form, sent, many, guards=guards, expected=expected, checks=checks
        )
        returned = cursor.fetchall() if returning else None
        if returned is not None:
            matched = len(returned)
        elif form.raising:
            matched = len(expected)  # (a row that moved made the server raise)
        else:
            matched = cursor.rowcount
        if matched != len(expected):
            moved = _stale_rows(conn, guards, expected, matched)
            if moved:
                raise_errors(moved, checks.config, checks.session)
        if returned is not None:
            if not returned:
                return True  # it wrote nothing (SQLAlchemy's row count check raises)
            written = {identities[0]: tuple(returned[0])}
    if not returning:
        pk_columns = server[0].pk_columns
        found_rows = read_by_keys(
            conn, pk_columns, [key_text(g.column) for g in server], identities, lock=False
        )
        written = {key: row[len(pk_columns) :] for key, row in found_rows.items()}
    errors: list[IllegalTransitionError] = []
    for identity, found in zip(identities, expected, strict=True):
        texts = written.get(identity)
        for position, g in enumerate(server):
            expect = found[g.column]
            own = expect.change.guard
            if texts is None:
                # not found by the key it was updated by: the UPDATE changed it (the status is
                # part of it), and the state written can't be read back: refused
                err = illegal(expect.change, expect.value, "flush")
                errors.append(
                    with_reason(
                        err,
                        "the state the column's onupdate SQL expression wrote could not be "
                        "read back (the UPDATE changed the row's primary key)",
                    )
                )
                continue
            text = texts[position]
            state = None if text is None else state_of_text(own, text)
            change = expect.change._replace(old=expect.value, old_known=True, new=state)
            # what the row moved to from here on (a later stale error names it)
            found[g.column] = expect._replace(change=change._replace(old=expect.change.old))
            if not own.legal(own.key(expect.value), None if text is None else text):
                err = illegal(change, expect.value, "flush")
                errors.append(
                    with_reason(
                        err,
                        f"{err.reason}; {plain(as_declared(own, state))!r} is what the SQL "
                        "expression the UPDATE sets the column to wrote (its onupdate, for an "
                        "UPDATE of the row that does not set the column)",
                    )
                )
    if errors:
        raise_errors(errors, checks.config, checks.session)
    return True


def _expect_held(
    conn: Connection,
    checks: _FlushChecks,
    *,
    table_rows: dict[tuple[Any, ...], _Row],
    guards: tuple[Guard, ...],
    server: tuple[Guard, ...],
    sent: dict[tuple[Any, ...], dict[str, Any]],
    lacking: list[tuple[Any, ...]],
) -> None:
    """The expectations of rows an UPDATE writing an onupdate SQL expression moves that the
    flush has none of (made dirty during it): the states they hold now, read under lock
    (judged by the rules of the row's own model, see :func:`_row_guard`). A row not found is
    gone: StaleTransitionError."""
    first = guards[0]
    keys = in_key_order(set(lacking))
    held = _read_states(conn, first.pk_columns, guards, keys, lock=True)
    errors: list[IllegalTransitionError] = []
    for identity in keys:
        values = held.get(identity)
        row = table_rows.setdefault(identity, {})
        for g, value in zip(guards, values or [None] * len(guards), strict=True):
            if g.column in row:
                continue
            own, mapper = _row_guard(checks, g, identity)
            new = _ONUPDATE if g in server else sent[identity][g.column.key]
            change = Change(own, own.pk_of(identity), identity, value, True, new, mapper)
            row[g.column] = _Expect(change, value)
            if values is None:
                errors.append(_stale(change, "the row no longer exists", value))
    if errors:
        raise_errors(errors[:1], checks.config, checks.session)


def _plan(
    compiled: Any, table_guards: tuple[Guard, ...], first: dict[str, Any], context: Any
) -> _Plan | None:
    """The plan of ``compiled`` for ``table_guards``, memoized per compiled UPDATE (looked up
    by :func:`_compare_and_set` itself): its parameters (``first``, a row's) are named the same
    for every execution of it. A guarded column the UPDATE sets to its onupdate SQL expression
    is not among them: SQLAlchemy renders the expression in the SET, and lists the column in
    ``postfetch_cols`` (or, with ``eager_defaults=True``, in the RETURNING it adds)."""
    by_guards = _plans.get(compiled)
    if by_guards is None:
        by_guards = _plans.setdefault(compiled, {})
    found: _Plan | None = by_guards.get(table_guards, _NO_PLAN)
    if found is not _NO_PLAN:
        return found
    guards = tuple(g for g in table_guards if g.column.key in first)
    server: tuple[Guard, ...] = ()
    if any(g.sql_onupdate for g in table_guards):
        computed = [*(context.postfetch_cols or ()), *(compiled.effective_returning or ())]
        server = tuple(
            g
            for g in table_guards
            if g.sql_onupdate and g.column.key not in first and any(c is g.column for c in computed)
        )
        guards += server
    plan = _Plan(guards, guards[0].pk_labels, server) if guards else None
    by_guards[table_guards] = plan
    return plan


def _with_expected(
    form: _CasForm,
    parameters: Sequence[Any],
    guards: tuple[Guard, ...],
    expected: list[_Row],
    dialect: Any,
) -> list[Any]:
    """The driver's parameters of each row, with the states the row must still hold added
    (and, for the raising form, the row's number). Comprehensions, not a loop: a flush of a
    thousand rows passes here once per row."""
    if len(guards) == 1:  # the common case, one comprehension
        column, process = guards[0].column, form.processors[0]
        if process is None:
            states = [found[column].value for found in expected]
        else:
            states = [process(found[column].value) for found in expected]
        rows = zip(parameters, states, strict=True)
        if form.positional:
            sequence = dialect.execute_sequence_format
            if form.raising:
                return [sequence((*p, v, str(n))) for n, (p, v) in enumerate(rows)]
            return [sequence((*p, v)) for p, v in rows]
        if form.raising:
            name, number = form.names
            return [{**p, name: v, number: str(n)} for n, (p, v) in enumerate(rows)]
        name = form.names[0]
        return [{**p, name: v} for p, v in rows]
    pairs = list(zip([g.column for g in guards], form.processors, strict=True))
    values = [
        tuple(found[c].value if f is None else f(found[c].value) for c, f in pairs)
        for found in expected
    ]
    if form.raising:
        values = [(*v, str(n)) for n, v in enumerate(values)]
    if form.positional:
        sequence = dialect.execute_sequence_format
        return [sequence((*p, *v)) for p, v in zip(parameters, values, strict=True)]
    names = form.names
    return [
        {**p, **dict(zip(names, v, strict=True))} for p, v in zip(parameters, values, strict=True)
    ]


def _cas_statement(
    statement: sa.Update,
    guards: tuple[Guard, ...],
    raising: bool,
    returning: tuple[Guard, ...] = (),
) -> Any:
    """``statement`` with ``AND col = :expected`` per guard (``IS NOT DISTINCT FROM`` for a
    nullable column), or with :func:`_raising_condition` per guard, memoized per statement;
    ``returning``: and returning the key of what it wrote into those guards' columns (see
    :func:`key_text`)."""
    by_guards = _cas_statements.get(statement)
    if by_guards is None:
        by_guards = _cas_statements.setdefault(statement, {})
    key = (guards, raising, returning)
    found = by_guards.get(key)
    if found is None:
        conditions = []
        for position, g in enumerate(guards):
            expected = sa.bindparam(g.cas_param, type_=g.column.type)
            holds = (
                g.column.is_not_distinct_from(expected)
                if g.column.nullable
                else g.column == expected
            )
            conditions.append(_raising_condition(g, holds, position) if raising else holds)
        found = statement.where(*conditions)
        if returning:
            found = found.returning(
                *(key_text(g.column).label(f"rdb_written_{i}") for i, g in enumerate(returning))
            )
        by_guards[key] = found
    return found


def key_text(column: sa.Column[Any]) -> Any:
    """SQL: the key of the state ``column`` holds, as the guards and the trigger spell states
    (``col::text``; ``trim_scale(col)::text`` for a ``numeric`` without a scale)."""
    value: Any = sa.func.pg_catalog.trim_scale(column) if trims_scale(column) else column
    return sa.cast(value, sa.Text)


#: the parameter carrying a row's number in the raising form (see _raising_condition)
_ROW_PARAM = "rdb_row"
#: what the raising form makes the server put in its error: the row's number, the guard's
#: position, and what the row holds ("n": NULL, or "v" and its text)
_STALE_TOKEN = re.compile(r"rdb-stale:(\d+):(\d+):([nv])(.*):rdb-end", re.DOTALL)
_STALE_SQLSTATE = "22P02"  # invalid_text_representation: the token is no integer


def _raising_condition(guard: Guard, holds: Any, position: int) -> Any:
    """A condition that is true for the row the UPDATE targets while it holds the expected
    state, and makes the server raise when it does not.

    For an executemany whose driver reports no row count for it (asyncpg), where a row the
    compare-and-set misses would go unnoticed. The error aborts the flush's transaction, as a
    StaleTransitionError does anyway; its message carries the row's number and what the row
    holds (:data:`_STALE_TOKEN`), so nothing needs to be read afterwards (nothing can be, on an
    aborted transaction).

    Written by hand: SQL has no RAISE expression; a cast of text that is no integer is one that
    needs nothing installed. The planner computes constant subexpressions ahead, even in a CASE
    branch never taken, and a plan made for the parameters' values takes them as constants: the
    text is built by ``concat`` (not immutable) from the row's own column, so it is computed
    only where the branch is taken. The CASE first rules out any row but the targeted one, so
    no other row is ever tested, whatever order the server evaluates the conditions in.
    """
    column = guard.column
    targeted = sa.and_(
        *(
            c == sa.bindparam(label, type_=c.type)
            for c, label in zip(guard.pk_columns, guard.pk_labels, strict=True)
        )
    )
    # the column's key, as the guards and the trigger spell its states (see state_of_text)
    value: Any = sa.func.pg_catalog.trim_scale(column) if trims_scale(column) else column
    held = sa.case(
        (column.is_(None), sa.literal_column("'n'")),
        else_=sa.literal_column("'v'").concat(sa.cast(value, sa.Text)),
    )
    token = sa.func.concat(
        sa.literal_column("'rdb-stale:'"),
        sa.bindparam(_ROW_PARAM, type_=sa.String()),
        sa.literal_column(f"':{position}:'"),
        held,
        sa.literal_column("':rdb-end'"),
    )
    return sa.case(
        (sa.not_(targeted), sa.false()),
        (holds, sa.true()),
        else_=sa.cast(token, sa.Integer).is_(None),
    )


def _raised_stale(
    exc: BaseException, guards: tuple[Guard, ...], expected: list[_Row]
) -> IllegalTransitionError | None:
    """The StaleTransitionError of a raising form's executemany that failed with ``exc``, or
    None when ``exc`` is not the raising condition's error (then it is raised as it is)."""
    if sqlstate_of(exc) != _STALE_SQLSTATE:
        return None
    # the server's message, in the driver's error or the one it wraps
    match = next(filter(None, (_STALE_TOKEN.search(str(err)) for err in error_chain(exc))), None)
    if match is None:
        return None
    number, position, kind, text = match.groups()
    if int(number) >= len(expected) or int(position) >= len(guards):
        return None
    guard = guards[int(position)]
    found = expected[int(number)][guard.column]
    held = state_of_text(guard, text) if kind == "v" else None
    return _stale(found.change, _moved(guard, held), found.value)


def state_of_text(guard: Guard, text: str) -> Any:
    """What a row holds, from its column's text as the raising form's error carries it: the
    column's key (``col::text``, a ``numeric`` without a scale through ``trim_scale``), which is
    how the guard spells its states. The declared state of that key; else, for a value no rule
    declares, the text as a value of the type the column stores (an integer, a number, a bool,
    an ``Enum`` member), else the text. The column type's own result processing is not used:
    it reads what the driver decodes (a driver's processor may need the column's type code; a
    ``TypeDecorator``'s takes values of the stored type, not their text)."""
    state = guard.states.get(text, _UNSET)
    if state is not _UNSET:
        return state
    impl = storage_type(guard.column.type)
    try:
        if isinstance(impl, sa.Boolean):
            return {"true": True, "false": False}.get(text, text)
        if isinstance(impl, sa.Integer):
            return int(text)
        if isinstance(impl, sa.Numeric) and not isinstance(impl, sa.Float):
            return decimal.Decimal(text)
    except (ArithmeticError, ValueError):
        return text
    if isinstance(impl, sa.Enum) and impl.enum_class is not None:
        return next(
            (
                v
                for v, db in enum_db_values(impl).items()
                if db == text and isinstance(v, enum.Enum)
            ),
            text,
        )
    return text


def _cas_form(
    compiled: Any,
    guards: tuple[Guard, ...],
    dialect: Any,
    *,
    raising: bool,
    returning: tuple[Guard, ...] = (),
    translate: dict[str | None, str | None] | None = None,
) -> _CasForm | None:
    """The compare-and-set form of ``compiled`` (a flush's UPDATE), compiled by SQLAlchemy for
    the same dialect with the same columns (memoized by the compiled UPDATE's plan). None when
    its parameters are not those of ``compiled`` plus the added ones: then the rows are checked
    under lock instead. ``returning``: see :func:`_cas_statement`; ``translate``: a
    ``schema_translate_map``, rendered into the form's SQL (see :func:`_as_sent`)."""
    names = tuple(g.cas_param for g in guards) + ((_ROW_PARAM,) if raising else ())
    form: _CasForm | None = None
    translated: dict[str, Any] = {} if translate is None else {"schema_translate_map": translate}
    try:
        cas = _cas_statement(compiled.statement, guards, raising, returning).compile(
            dialect=dialect,
            column_keys=compiled.column_keys,
            for_executemany=compiled.for_executemany,
            render_schema_translate=translate is not None,
            **translated,
        )
    except sa.exc.CompileError:  # e.g. a column keyed like one of our parameters
        return None
    if cas.positional:
        # the added parameters after the UPDATE's own, each once (a dialect that repeats a
        # parameter in its positions: not usable, the rows are checked under lock)
        usable = compiled.positiontup is not None and list(cas.positiontup or ()) == [
            *compiled.positiontup,
            *names,
        ]
    else:
        usable = set(cas.binds) == {*compiled.binds, *names} and not any(
            n in cas.escaped_bind_names for n in names
        )
    if usable and not set(names) & set(compiled.binds) and "POSTCOMPILE" not in cas.string:
        processors = tuple(
            g.column.type.dialect_impl(dialect).bind_processor(dialect) for g in guards
        )
        form = _CasForm(cas.string, names, processors, cas.positional, raising)
    return form


#: the compare-and-set forms of a compiled UPDATE sent with a ``schema_translate_map``, by
#: guards, kind and map, each with the SQL the UPDATE itself is sent as (see :func:`_as_sent`)
_translated_forms: weakref.WeakKeyDictionary[
    Any, dict[tuple[Any, ...], tuple[str, _CasForm | None]]
] = weakref.WeakKeyDictionary()


def _as_sent(
    form: _CasForm,
    compiled: Any,
    guards: tuple[Guard, ...],
    statement: str,
    context: Any,
    *,
    returning: tuple[Guard, ...] = (),
) -> _CasForm | None:
    """``form``, the compare-and-set form of ``compiled``, for the SQL ``statement`` the
    UPDATE is sent as, which is not the compiled SQL (the callers keep the common case, the
    compiled SQL sent as it is, to one comparison without a call): when it is
    that SQL with schema names translated (an execution's ``schema_translate_map``), the form
    compiled with the same map rendered (memoized per compiled UPDATE and map); else None (the
    SQL was rewritten otherwise, by a ``before_cursor_execute`` listener, say: the rows are
    then checked under lock, and the UPDATE sent as it is)."""
    translate = context.execution_options.get("schema_translate_map")
    if not translate:
        return None
    forms = _translated_forms.get(compiled)
    if forms is None:
        forms = _translated_forms.setdefault(compiled, {})
    key = (guards, form.raising, returning, frozenset(translate.items()))
    found = forms.get(key)
    if found is None:
        try:
            sent_as = compiled.statement.compile(
                dialect=context.dialect,
                column_keys=compiled.column_keys,
                for_executemany=compiled.for_executemany,
                schema_translate_map=translate,
                render_schema_translate=True,
            ).string
        except sa.exc.CompileError:
            sent_as = ""
        translated = _cas_form(
            compiled,
            guards,
            context.dialect,
            raising=form.raising,
            returning=returning,
            translate=translate,
        )
        found = forms[key] = (sent_as, translated)
    sent_as, translated = found
    return translated if sent_as == statement else None


def _check_written(
    conn: Connection,
    checks: _FlushChecks,
    table_rows: dict[tuple[Any, ...], _Row],
    *,
    guards: tuple[Guard, ...],
    sent: tuple[list[tuple[Any, ...]], list[dict[str, Any]]],
) -> bool:
    """An UPDATE writing a state before_flush did not judge (a mapper's ``before_update``
    listener set it during the flush): the move from the state the row must hold (or, for a
    row with no expectation, the state it holds now, read under lock) to the state written
    must be legal, else IllegalTransitionError before it is sent. Each row is judged by the
    rules of its own model (``guards`` are one per column of the table, the first model's
    noted: the classes of an inheritance hierarchy may declare different rules for one
    column): a row with an expectation by those of its change, one without by those of the
    session's object of the row (see :func:`_row_guard`). ``sent``: the rows' primary keys and
    parameters. Returns whether the rows were read under lock (some had no expectation: every
    row of the UPDATE was then checked in the same SELECT, those with one for the state they
    must still hold); each row that had none is then expected to hold the state read, which
    the UPDATE's compare-and-set carries (the lock ends with the SELECT on a connection in
    AUTOCOMMIT mode)."""
    errors: list[IllegalTransitionError] = []
    unknown: list[Change] = []
    known: list[Change] = []
    identities, rows = sent
    born = _inserted_here(checks, guards[0].table)
    for identity, row in zip(identities, rows, strict=True):
        found = table_rows.get(identity)
        for g in guards:
            written = row[g.column.key]
            expect = None if found is None else found.get(g.column)
            if expect is None:
                new_row = born.get((identity, g.column)) if born else None
                if new_row is not None:
                    # inserted by this flush (no other transaction sees it): a post_update
                    # UPDATE writes the state it starts in
                    if new_row.key(written) not in new_row.initial:
                        errors.append(_not_initial(new_row, new_row.pk_of(identity), written))
                    continue
                own, mapper = _row_guard(checks, g, identity)
                unknown.append(
                    Change(own, own.pk_of(identity), identity, None, False, written, mapper)
                )
            else:
                change = expect.change._replace(old=expect.value, old_known=True, new=written)
                own = change.guard
                if expect.change.new is _ONUPDATE:
                    # the column's onupdate, its value known now: judged, and what the row
                    # moves to from here on (a stale row's error names it)
                    moved = change._replace(old=expect.change.old)
                    table_rows[identity][g.column] = expect._replace(change=moved)
                    if not own.legal(own.key(expect.value), own.key(written)):
                        err = illegal(change, expect.value, "flush")
                        errors.append(
                            with_reason(
                                err,
                                f"{err.reason}; {plain(as_declared(own, written))!r} is the "
                                "column's onupdate, which SQLAlchemy writes by an UPDATE of the "
                                "row that does not set the column",
                            )
                        )
                elif own.key(expect.change.new) != own.key(written) and not own.legal(
                    own.key(expect.value), own.key(written)
                ):
                    errors.append(illegal(change, expect.value, "flush"))
                known.append(change)
    if unknown and not errors:
        errors, values = _check_against_db(conn, [*known, *unknown], lock=True)
        if not errors:
            for change, value in zip(unknown, values[len(known) :], strict=True):
                read = change._replace(old=value, old_known=True)
                table_rows.setdefault(change.identity, {})[change.guard.column] = _Expect(
                    read, value
                )
    if errors:
        raise_errors(errors, checks.config, checks.session)
    return bool(unknown)


def _inserted_here(
    checks: _FlushChecks, table: sa.Table
) -> dict[tuple[tuple[Any, ...], sa.Column[Any]], Guard] | None:
    """The new rows of ``table`` whose status a post_update UPDATE writes in this flush (see
    :attr:`_FlushChecks.inserted`), by primary key (given by their INSERT, which is sent
    before that UPDATE) and guarded column; None when there are none."""
    inserted = getattr(checks, "inserted", None)
    rows = None if inserted is None else inserted.get(table)
    if not rows:
        return None
    born: dict[tuple[tuple[Any, ...], sa.Column[Any]], Guard] = {}
    for guard, state in rows:
        obj = state.obj()
        if obj is not None:
            born[(state.mapper.identity_key_from_instance(obj)[1], guard.column)] = guard
    return born


def _row_guard(
    checks: _FlushChecks, guard: Guard, identity: tuple[Any, ...]
) -> tuple[Guard, Mapper[Any]]:
    """The guard of ``guard``'s column and the mapper a row of its table that the flush has no
    expectation of is judged by: those of the session's object of the row (its class's rules:
    a subclass may declare rules of its own for a column its base class shares), else those
    noted for the table. Looked up only for an UPDATE writing a state no one judged yet."""
    mapper = checks.mappers[guard.table]
    session = checks.session
    if session is not None:
        # the row's object may be of another class mapping the table, not of the noted one's
        # hierarchy (an identity key names the base class): each hierarchy is looked in
        bases = [mapper.base_mapper]
        for other in mapper.registry.mappers:
            if guard.table in other.tables and other.base_mapper not in bases:
                bases.append(other.base_mapper)
        for base in bases:
            obj = session.identity_map.get(base.identity_key_from_primary_key(identity))
            if obj is None:
                continue
            own = instance_state(obj).mapper
            for g in compiled_guards(own):
                if g.column is guard.column:
                    return g, own
    return guard, mapper


def _lock_and_check(
    conn: Connection,
    checks: _FlushChecks,
    guards: tuple[Guard, ...],
    expected: list[_Row],
    *,
    or_written: bool = False,
) -> None:
    """The fallback: lock the rows, check they hold the expected states, let the UPDATE go
    (``or_written``: or the states the flush writes, see :func:`_check_against_db`)."""
    changes = [
        found[g.column].change._replace(old=found[g.column].value, old_known=True)
        for found in expected
        for g in guards
    ]
    errors = _check_against_db(conn, changes, lock=True, or_written=or_written)[0]
    if errors:
        raise_errors(errors, checks.config, checks.session)


def _stale_rows(
    conn: Connection, guards: tuple[Guard, ...], expected: list[_Row], matched: int
) -> list[IllegalTransitionError]:
    """The error path of a compare-and-set UPDATE that matched fewer rows than it was sent for:
    read what the rows hold now and say which moved.

    A row that now holds the state this flush wrote was updated by it, or moved there first by
    another transaction: on PostgreSQL the row's ``xmin`` tells them apart (this transaction
    wrote the row's current version). That answer is used only when it accounts for exactly
    the rows the UPDATE matched (not within a savepoint, whose rows carry the savepoint's own
    transaction id); else no row is named (``pk`` None) rather than a wrong one.

    A row that holds the state this flush expected, where it wrote another, was not updated by
    it (a row it updated holds what it wrote, and stays locked): another transaction moved it
    meanwhile, and back since. So was the row of a one-row UPDATE that matched nothing,
    whatever it holds now. An UPDATE that matched fewer rows than it was sent for gets an
    error, but for a row of a model with a ``version_id_col`` that holds the state expected:
    the UPDATE checked its version too, which another transaction may have moved on by any
    change (SQLAlchemy's row count check raises its ``StaleDataError`` for it, as without the
    guard)."""
    first = guards[0]
    keys = in_key_order({found[first.column].change.identity for found in expected})
    position = {identity: i for i, identity in enumerate(keys)}
    rows = sorted(expected, key=lambda found: position[found[first.column].change.identity])
    # (and whether this transaction wrote each row's current version)
    extra = [_written_here(first.table)] if conn.dialect.name == "postgresql" else []
    current = _read_states(conn, first.pk_columns, guards, keys, lock=False, extra=extra)
    n_guards = len(guards)
    stale: list[IllegalTransitionError] = []
    unsure: list[_Row] = []
    unsure_by: list[Guard] = []  # the guard of each row of ``unsure`` whose column moved
    written_here = 0  # rows whose current version this transaction wrote
    gone: list[_Row] = []  # rows not found by the key they were loaded with
    for found in rows:
        change = found[first.column].change
        now = current.get(change.identity)
        if now is None:
            gone.append(found)
            continue
        if now[n_guards:] and now[n_guards]:
            written_here += 1
        moved = [
            (g, value)
            for g, value in zip(guards, now[:n_guards], strict=True)
            if g.key(value) != g.key(found[g.column].value)
        ]
        if not moved:
            # holds what this flush expected: not updated, unless it wrote the same spelling
            changed = [
                g
                for g in guards
                if g.key(found[g.column].change.new) != g.key(found[g.column].value)
            ]
            if (changed or len(rows) == 1) and change.mapper.version_id_col is None:
                g = changed[0] if changed else first
                expect = found[g.column]
                shown = plain(as_declared(g, expect.value))
                reason = (
                    f"another transaction changed the row since it was read, though it now "
                    f"holds {shown!r} as then; reload it and decide again"
                )
                stale.append(_stale(expect.change, reason, expect.value))
            continue
        # the row holds every state this flush writes, or it was not updated by the flush
        # (another transaction moved it: one guard's column, say, while another still holds
        # the state expected where the flush writes another)
        # (an onupdate SQL expression's state is not known before it is written: any may be)
        as_written = all(
            found[g.column].change.new is _ONUPDATE or g.key(v) == g.key(found[g.column].change.new)
            for g, v in zip(guards, now[:n_guards], strict=True)
        )
        if len(rows) == 1 or not as_written:
            elsewhere = [(g, v) for g, v in moved if g.key(v) != g.key(found[g.column].change.new)]
            g, value = (elsewhere or moved)[0]  # a column that moved, where it moved elsewhere
            stale.append(_stale(found[g.column].change, _moved(g, value), found[g.column].value))
        else:
            # updated now, or moved there first by another transaction (the first column that
            # moved says by which guard)
            unsure.append(found)
            unsure_by.append(moved[0][0])
    missing = len(rows) - matched - len(stale)
    # A row not found by its loaded key was deleted by another transaction, or given a new key
    # by this very UPDATE (a flush changing primary keys): when the rows found account for
    # every row the UPDATE missed, it is the latter; when every row it matched was found (the
    # rows this transaction wrote are as many), or only such rows are left to account for
    # them, the former; else which is which can't be told
    if gone and missing > 0:
        found_all = written_here == matched and bool(extra)
        if not found_all and (unsure or len(gone) != missing):
            keyed = next((g for g in guards if _in_key(g)), None)
            how = (
                f"had their {keyed.attr_key} (part of their key) changed"
                if keyed is not None
                else "moved to the state it writes"
            )
            stale.append(
                _unnamed_stale(
                    first if keyed is None else keyed,
                    gone + unsure,
                    f"{missing} of the {len(gone) + len(unsure)} rows of this UPDATE not found "
                    f"as expected were deleted, or {how}, by another transaction meanwhile, "
                    "which of them can't be told (the UPDATE changes their keys); reload them "
                    "and decide again",
                )
            )
            return stale
        # (a row whose key holds a guarded column: named by that guard, see _gone)
        keyed = next((g for g in guards if _in_key(g)), first)
        for found in gone:
            expect = found[keyed.column]
            stale.append(_gone(conn, expect.change, expect.value))
        missing -= len(gone)
    if missing > 0 and unsure:
        # Rows that another transaction had already moved to the state this flush was writing
        # look the same as rows this flush updated, but for who wrote them.
        if written_here == matched and bool(extra):
            there_first = [
                (f, g)
                for f, g in zip(unsure, unsure_by, strict=True)
                if not current[f[first.column].change.identity][-1]
            ]
            if len(there_first) == missing:
                for found, g in there_first:
                    expect = found[g.column]
                    reason = (
                        f"another transaction had already moved the row to "
                        f"{plain(as_declared(g, expect.change.new))!r}; reload it and decide "
                        "again"
                    )
                    if expect.change.new is _ONUPDATE:  # moved, by what it holds
                        now = current[expect.change.identity]
                        reason = _moved(g, now[next(i for i, c in enumerate(guards) if c is g)])
                    stale.append(_stale(expect.change, reason, expect.value))
                return stale
        # Else no row is named, and no state it was in unless they all were in one; the column
        # named is the one that moved, when it is one column for all of them.
        g = unsure_by[0] if all(u is unsure_by[0] for u in unsure_by) else first
        shown = plain(as_declared(g, unsure[0][g.column].change.new))
        stale.append(
            _unnamed_stale(
                g,
                unsure,
                f"{missing} of the {len(unsure)} rows of this UPDATE that now hold {shown!r} had "
                "already been moved there by another transaction, which of them can't be told; "
                "reload them and decide again",
            )
        )
    if (
        not stale
        and matched < len(rows)
        and all(f[first.column].change.mapper.version_id_col is None for f in rows)
    ):
        # rows that hold what this flush expected and wrote (the same spelling): which of them
        # another transaction changed meanwhile can't be told
        stale.append(
            _unnamed_stale(
                first,
                rows,
                f"{len(rows) - matched} of the {len(rows)} rows of this UPDATE were changed by "
                "another transaction meanwhile, which of them can't be told; reload them and "
                "decide again",
            )
        )
    return stale


def _in_key(guard: Guard) -> bool:
    """Whether ``guard``'s column is part of its table's primary key."""
    return any(c is guard.column for c in guard.pk_columns)


def _gone(conn: Connection, change: Change, expected: Any) -> StaleTransitionError:
    """The error for a row not found by the key it was loaded with, which had to hold
    ``expected`` (on an error path: may read). Deleted by another transaction, unless its key
    holds the guarded column: then another transaction that changed the row's status changed
    its key with it. The rows holding the key's other columns are read to tell: the state they
    hold now is named (key values are not: the reason is logged, row keys only on request)."""
    guard = change.guard
    if not _in_key(guard):
        return _stale(change, "the row no longer exists", expected)
    column = guard.column
    shown = plain(as_declared(guard, expected))
    others = [
        (c, v) for c, v in zip(guard.pk_columns, change.identity, strict=True) if c is not column
    ]
    if not others:
        return _stale(
            change,
            f"no row holds {shown!r} any longer: the {guard.attr_key} is the row's whole primary "
            "key, and another transaction changed it (or deleted the row) since the row was "
            "loaded; reload it and decide again",
            expected,
        )
    # (read as the column's key, see _read_states)
    query = sa.select(key_text(column)).where(
        *(c == sa.bindparam(None, v, type_=c.type) for c, v in others)
    )
    held = [
        None if text is None else state_of_text(guard, text)
        for text in conn.execute(query.limit(_GONE_SHOWN + 1)).scalars()
    ]
    if not held:
        return _stale(change, "the row no longer exists", expected)
    states = sorted({guard.key(v): v for v in held}.items(), key=lambda kv: sort_key(kv[0]))
    now = ", ".join(repr(plain(as_declared(guard, v))) for _, v in states[:_GONE_SHOWN])
    if len(held) > _GONE_SHOWN:
        now += ", ..."
    if len(held) == 1:
        where = f"the row with the rest of its key now holds {now}"
    else:
        where = f"the rows with the rest of its key now hold {now}"
    return _stale(
        change,
        f"the row's {guard.attr_key} changed since it was loaded ({shown!r} expected): it is "
        f"part of the primary key, which another transaction changed with it; {where}; reload "
        "it and decide again",
        expected,
    )


#: how many states of the rows sharing the rest of a gone row's key its error names
_GONE_SHOWN = 5


def _unnamed_stale(guard: Guard, rows: list[_Row], reason: str) -> StaleTransitionError:
    """The error for stale ``rows`` of one UPDATE none of which can be named: no ``pk``, and
    no state the rows were in unless they all were in one."""
    expect = rows[0][guard.column]
    held = {guard.key(f[guard.column].value) for f in rows}
    change = expect.change._replace(pk=None, old=expect.value if len(held) == 1 else None)
    return _stale(change, reason)


def _written_here(table: sa.Table) -> Any:
    """True for a row of ``table`` whose current version this transaction wrote (its ``xmin``
    is the low 32 bits of the transaction's id; NULL before the transaction wrote anything).
    The system column is named with its table: a join hides it otherwise."""
    xmin: sa.ColumnClause[Any] = sa.column("xmin")
    xmin.table = table
    return sa.cast(sa.cast(xmin, sa.Text), sa.BigInteger) == (
        sa.func.txid_current_if_assigned() % 4294967296
    )
