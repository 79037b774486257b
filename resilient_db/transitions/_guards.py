"""The session guards wired into SQLAlchemy: the flush guard's listeners on a Session class,
and the bulk-UPDATE guard's, which are added only once a model with rules is configured."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Mapper, Session

from resilient_db._state import STATE

from ._bulk import do_orm_execute
from ._flush import before_flush, before_insert, before_update, flush_ended
from ._rules import compiled_guards, declared_when_mapped, lent_rules_changed

__all__ = ["install_guard"]


def install_guard(session_class: type[Session]) -> None:
    """Register the flush and bulk-UPDATE guards on ``session_class`` (idempotent).

    The listeners act only for sessions of a resilient factory (their factory's
    :class:`Config`), or whose ``info[GUARD_INFO_KEY]`` is a :class:`Config`, with
    ``guard_on``; its ``bulk_update`` picks "filter" or "raise" for bulk UPDATEs. Listeners reach
    subclasses, so a class whose base is guarded already is left alone (the guard runs once).
    The compare-and-set is sent by listeners on the engine's dialect, added by a resilient
    factory or by the first guarded flush through an engine (see :func:`install_engine_hooks`).
    """
    if not (isinstance(session_class, type) and issubclass(session_class, Session)):
        raise TypeError(f"install_guard() needs a Session subclass, got {session_class!r}")
    if any(
        event.contains(base, "before_flush", before_flush)
        for base in session_class.__mro__[1:]
        if isinstance(base, type) and issubclass(base, Session)
    ):
        return
    # A bypass ends with its transaction: the bypass check (_bypass) compares the marker with the
    # current transaction, so no after_transaction_end listener is needed on every transaction.
    # after_flush / after_soft_rollback end what a flush expects of its UPDATEs (a failed flush
    # rolls back, so one of the two always follows a flush that reached the database).
    for name, fn in (
        ("before_flush", before_flush),
        ("after_flush", flush_ended),
        ("after_soft_rollback", flush_ended),
    ):
        if not event.contains(session_class, name, fn):
            event.listen(session_class, name, fn)
    with STATE.lock:
        STATE.guarded_session_classes.add(session_class)
        needed = STATE.bulk_guard_needed
    if needed:
        _listen_bulk_guard(session_class)


# A ``do_orm_execute`` listener makes SQLAlchemy build an ORMExecuteState for every statement
# (several microseconds each), so the bulk-UPDATE guard is registered only once a class with
# ``__transitions__`` is mapped: applications without rules don't pay for it. That is the
# mapper's construction (``instrument_class``), when the class is declared, not its
# configuration: a session reads its ``do_orm_execute`` listeners before the statement's
# compilation configures the mappers, so a listener added at configuration would miss the
# first statement of a process that names the model. The classes guarded so far and whether
# such a model exists are in STATE (guarded_session_classes, bulk_guard_needed).


def _listen_bulk_guard(session_class: type[Session]) -> None:
    if not any(
        event.contains(base, "do_orm_execute", do_orm_execute)
        for base in session_class.__mro__
        if isinstance(base, type) and issubclass(base, Session)
    ):
        event.listen(session_class, "do_orm_execute", do_orm_execute)


def _enable_bulk_guard() -> None:
    with STATE.lock:
        STATE.bulk_guard_needed = True
        classes = list(STATE.guarded_session_classes)
    for session_class in classes:
        _listen_bulk_guard(session_class)


@event.listens_for(Mapper, "instrument_class")
def _on_class_mapped(mapper: Mapper[Any], class_: type[Any]) -> None:
    """A class with ``__transitions__`` (its own or inherited) is mapped: guard bulk UPDATEs
    from now on, before any statement can name it."""
    if getattr(class_, "__transitions__", None) is not None:
        declared_when_mapped(class_)
        _enable_bulk_guard()


@event.listens_for(Mapper, "mapper_configured")
def _on_mapper_configured(mapper: Mapper[Any], class_: type[Any]) -> None:
    """Validate ``__transitions__`` as soon as the mapper is configured (fail early), and
    watch the flush's inserts and updates of its rows (a status set after ``before_flush``
    looked: see :func:`before_insert` and :func:`before_update`). Configured before any session
    can flush it: the listeners are added while no flush can be reading the mapper's
    listeners."""
    if getattr(class_, "__transitions__", None) is not None:
        # (rules set only after the class was mapped are refused by compiled_guards, here and
        # from then on: by every bulk UPDATE too, whose guard the refusal must not leave off)
        if not guarded_models_exist():
            _enable_bulk_guard()
        compiled_guards(mapper)
        _watch(mapper)
        # classes of its tables configured before it, without rules of their own: their rows
        # there are judged by the table's rules, which may be this class's now
        for other in lent_rules_changed(mapper):
            if compiled_guards(other):
                _watch(other)
    elif guarded_models_exist() and compiled_guards(mapper):
        _watch(mapper)  # it maps a table another class guards: judged by the table's rules


def _watch(mapper: Mapper[Any]) -> None:
    # raw (the row's InstanceState, not its object) and retval (the return value is SQLAlchemy's
    # to ignore for these two events): SQLAlchemy then calls the listener itself, not through
    # the wrapper it adds otherwise (six lines per row of a flush, on every row of a guarded
    # model a flush inserts or updates)
    for name, fn in (("before_insert", before_insert), ("before_update", before_update)):
        if not event.contains(mapper, name, fn):
            event.listen(mapper, name, fn, raw=True, retval=True)


def guarded_models_exist() -> bool:
    """Whether a model with ``__transitions__`` has been configured in this process."""
    return STATE.bulk_guard_needed
