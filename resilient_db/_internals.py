"""The one module that touches a library's non-public API.

resilient_db depends on the public APIs of SQLAlchemy, psycopg, asyncpg and pybreaker. Where a
private one is unavoidable it is read here, in one function, and ``tests/test_internals.py``
has a canary per function that fails naming the library, the private name, the function and
what breaks (``tests/test_no_private_api.py`` fails when a private use appears elsewhere).

Rules for every function here:
- its docstring names the private API, the versions verified (the oldest supported pins and
  the newest installed: SQLAlchemy 2.0.52 / 2.1.9, psycopg 3.2.1 / 3.3.9, asyncpg 0.30.0 /
  0.32.0, pybreaker 1.4.0 / 1.4.1; Flask, for ``with_self_healing`` in a Flask view, 3.1.3;
  and SQLAlchemy's newest 2.0 release, 2.0.59, which ``make test-sqla20`` installs) and the
  public alternative, if any;
- nothing private is imported at module level unguarded: ``import resilient_db`` never fails
  because a library moved a private name;
- when the private is gone it raises :class:`InternalsChanged` (or degrades where degrading is
  safe, saying so): it never silently fails open.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import LoaderCriteriaOption, Session

from ._errors import ResilientDBError

__all__ = [
    "ASYNCPG_CLOSED_CHECKS",
    "ASYNCPG_CONNECT_FUNCTION",
    "ASYNCPG_CONNECT_MODULES",
    "ASYNCPG_RESOURCE_CHECK",
    "ASYNCPG_SIMPLE_QUERY",
    "ASYNC_CREATOR_KWARG",
    "NEVER_SET",
    "PLAIN_COMMITS",
    "SQLALCHEMY_ASYNCPG_MODULE",
    "SQLALCHEMY_COMMIT_CODE",
    "InternalsChanged",
    "asyncpg_abort_socket",
    "asyncpg_address",
    "asyncpg_command_timeout",
    "asyncpg_socket_fd",
    "asyncpg_statement_connection",
    "attribute_history",
    "commit_flushes",
    "commit_returned",
    "committed_unclosed",
    "dml_values",
    "empty_result",
    "engine_of_options",
    "event_keys",
    "expand_composites",
    "fire_after_commit",
    "flask_after_request_functions",
    "flush_pk_bind_name",
    "forget_event_keys",
    "is_anonymous_bind",
    "last_do_connect",
    "psycopg_error_from_result",
    "psycopg_notify_handler",
    "psycopg_on_deallocate_all",
    "psycopg_simple_query",
    "psycopg_simple_query_async",
    "pybreaker_lock",
    "raised_by_commit_impl",
    "renew_pybreaker_lock",
    "sa_await",
    "server_side_result",
    "session_binds",
    "transaction_committed_unclosed",
    "transaction_connections",
    "update_loader_criteria",
    "with_dml_value",
    "with_from_statement_element",
    "with_own_session_class",
    "with_where",
]


class InternalsChanged(ResilientDBError, RuntimeError):
    """A library no longer has the non-public API resilient_db reads in one place.

    ``library`` and ``name`` say which; the message says what resilient_db would get wrong
    without it. Raised instead of guessing: pin the library to a version listed in
    ``resilient_db/_internals.py`` until resilient_db supports the new one.
    """

    def __init__(self, library: str, name: str, detail: str) -> None:
        self.library = library
        self.name = name
        self.detail = detail
        version = _version_of(library)
        super().__init__(
            f"{library} {version} no longer has {name}, which resilient_db reads "
            f"(resilient_db/_internals.py): {detail}. Pin {library} to a version "
            "resilient_db supports until it supports this one."
        )


def _version_of(library: str) -> str:
    import importlib.metadata  # noqa: PLC0415 - only when reporting

    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


# --------------------------------------------------------------------------------------------
# SQLAlchemy
# --------------------------------------------------------------------------------------------


def dml_values(stmt: Any) -> list[tuple[Any, Any]]:
    """The ``(column or key, value)`` pairs an ``update().values()`` / ``ordered_values()``
    sets, in the statement's order (what the bulk-UPDATE transition guard checks).

    Private: SQLAlchemy ``UpdateBase``/``ValuesBase`` storage, in one of two known layouts:
    - 2.0 (verified 2.0.52, 2.0.59): ``_ordered_values`` (a list of pairs, or None) for
      ``ordered_values()``, ``_values`` (a mapping, or None) for ``values()``;
    - 2.1 (verified 2.1.9): ``_values`` (an ordered mapping, or None) for both, with
      ``_maintain_values_ordering`` set by ``ordered_values()``.
    Neither layout found: :class:`InternalsChanged` (returning no pairs would let an illegal
    move through the guard). Public alternative: none (no accessor for a DML statement's
    values; compiling the statement would lose which value is a user's ``bindparam``).
    """
    cls = type(stmt)
    if hasattr(cls, "_ordered_values"):  # the 2.0 layout
        ordered = stmt._ordered_values
        if ordered:
            return list(ordered)
        values = stmt._values
    elif hasattr(cls, "_maintain_values_ordering") and hasattr(cls, "_values"):  # 2.1
        values = stmt._values
    else:
        raise InternalsChanged(
            "SQLAlchemy",
            f"{cls.__name__}._values / ._ordered_values",
            "the transition guard cannot read the values of a bulk UPDATE, so it refuses it "
            "rather than let an illegal status move through",
        )
    if values is None:
        return []
    if not isinstance(values, Mapping):
        raise InternalsChanged(
            "SQLAlchemy",
            f"{cls.__name__}._values as a mapping",
            f"it holds {type(values).__name__}; the transition guard cannot read the values of "
            "a bulk UPDATE, so it refuses it rather than let an illegal status move through",
        )
    return list(values.items())


def with_dml_value(stmt: Any, key: Any, value: Any) -> Any:
    """A copy of the UPDATE ``stmt`` whose SET writes ``value`` for ``key``: a key as
    :func:`dml_values` gives it (the value replaced where it stands, in ``ordered_values()``
    order too), or one the statement does not set (added last, as ``values()`` adds it).

    Private: the storage :func:`dml_values` reads (``_values`` / ``_ordered_values``, verified
    2.0.52, 2.0.59, 2.1.9) and ``Generative._generate`` (the copy every generative method makes).
    Either layout gone: :class:`InternalsChanged` (from :func:`dml_values`). Public
    alternative: ``values()`` for a key the statement lacks, none to replace one (a second
    ``values()`` adds a second entry for a key spelled otherwise; after ``ordered_values()``
    it raises).
    """
    pairs = dml_values(stmt)
    if not any(k is key for k, _ in pairs):
        if not _has_ordered_values(stmt):
            return stmt.values({key: value})
        # coerced as values() coerces it, on a statement of the same target
        pairs += dml_values(sa.update(stmt.table).values({key: value}))
        key = pairs[-1][0]
    replaced = [(k, value if k is key else v) for k, v in pairs]
    new = stmt._generate()
    if hasattr(type(stmt), "_ordered_values") and stmt._ordered_values:  # 2.0, ordered
        new._ordered_values = replaced
    else:  # 2.0 values(), 2.1 either (an ordered mapping)
        new._values = sa.util.immutabledict(replaced)
    return new


def with_from_statement_element(stmt: Any, element: Any) -> Any:
    """A copy of ``stmt``, a ``select(...).from_statement(...)`` construct, running
    ``element`` instead of the statement it wraps (``stmt.element``).

    Private: ``Generative._generate`` (the copy every generative method makes; verified 2.0.52,
    2.0.59, 2.1.9). Gone: :class:`InternalsChanged`. Public alternative: ``select(*entities)
    .from_statement(element)``, which needs the wrapper's entities (``_raw_columns``, private
    too).
    """
    generate = getattr(stmt, "_generate", None)
    if generate is None or not hasattr(stmt, "element"):
        raise InternalsChanged(
            "SQLAlchemy",
            f"{type(stmt).__name__}._generate / .element",
            "the transition guard cannot restrict an UPDATE run through from_statement(), so "
            "it refuses it rather than let an illegal status move through",
        )
    new = generate()
    new.element = element
    return new


def with_where(stmt: Any, *criteria: Any) -> Any:
    """A copy of the UPDATE ``stmt`` whose WHERE is ``criteria`` alone, its own dropped (the
    bulk-UPDATE guard restricts an UPDATE whose criteria it evaluated once to the keys of the
    rows they matched: evaluated again, they could match other rows, or repeat a side effect).

    Private: ``DMLWhereBase._where_criteria`` (a tuple of the ``where()`` criteria) and
    ``Generative._generate`` (verified 2.0.52, 2.0.59, 2.1.9). Gone: :class:`InternalsChanged`.
    Public alternative: none (``where()`` only adds criteria; a new ``update()`` would lose the
    statement's options, RETURNING, CTEs and execution options).
    """
    generate = getattr(stmt, "_generate", None)
    if generate is None or not isinstance(getattr(stmt, "_where_criteria", None), tuple):
        raise InternalsChanged(
            "SQLAlchemy",
            f"{type(stmt).__name__}._where_criteria / ._generate",
            "the transition guard cannot restrict a bulk UPDATE to the rows its check judged, "
            "so it refuses it rather than judge other rows than those it changes",
        )
    new = generate()
    new._where_criteria = tuple(criteria)
    return new


def _has_ordered_values(stmt: Any) -> bool:
    if hasattr(type(stmt), "_ordered_values"):  # 2.0
        return bool(stmt._ordered_values)
    return bool(stmt._maintain_values_ordering)  # 2.1


def _adjust_for_extra_criteria() -> Callable[[dict[Any, Any], Any], Iterable[Any]]:
    try:
        from sqlalchemy.orm import bulk_persistence  # noqa: PLC0415
    except ImportError:  # pragma: no cover - exercised by tests/test_internals.py's canary
        bulk_persistence = None  # type: ignore[assignment]
    state = getattr(bulk_persistence, "_BulkUDCompileState", None) or getattr(
        bulk_persistence, "BulkUDCompileState", None
    )
    adjust = getattr(state, "_adjust_for_extra_criteria", None)
    if adjust is None:
        raise InternalsChanged(
            "SQLAlchemy",
            "sqlalchemy.orm.bulk_persistence._BulkUDCompileState._adjust_for_extra_criteria",
            "the bulk-UPDATE transition guard cannot apply an UPDATE's with_loader_criteria() "
            "to its check, so it refuses the UPDATE rather than judge and lock other rows",
        )
    result: Callable[[dict[Any, Any], Any], Iterable[Any]] = adjust
    return result


def update_loader_criteria(stmt: Any, mapper: Any) -> tuple[sa.ColumnElement[bool], ...]:
    """The WHERE criteria SQLAlchemy adds to ORM-enabled UPDATE ``stmt`` of ``mapper`` for the
    ``with_loader_criteria()`` options it carries (with, among them, a single-table
    subclass's discriminator), as it compiles them into the UPDATE; empty when it carries
    none (then nothing private is called beyond reading the empty options). The
    bulk-UPDATE transition guard's check applies them, so it judges and locks the rows the
    UPDATE changes, not every row its own WHERE matches.

    Private: SQLAlchemy ``Executable._with_options``, ``ORMOption._is_criteria_option``,
    ``LoaderCriteriaOption.get_global_criteria`` and the classmethod
    ``_adjust_for_extra_criteria(global_attributes, mapper)`` of
    ``orm/bulk_persistence.py``'s ``_BulkUDCompileState`` (2.1; ``BulkUDCompileState`` in
    2.0): what the UPDATE's compilation (``_setup_for_orm_update``) and its "evaluate"
    synchronization (``_eval_condition_from_statement``) call (verified 2.0.52, 2.0.59, 2.1.9).
    Gone: :class:`InternalsChanged`. Public alternative: none (a statement's options can't
    be read; an ORM ``select()`` given them applies them by a SELECT's rules, which differ
    for an aliased entity, and only at the top level of the statement compiled).
    """
    try:
        options = stmt._with_options
    except AttributeError:
        raise InternalsChanged(
            "SQLAlchemy",
            "Executable._with_options",
            "the bulk-UPDATE transition guard cannot read an UPDATE's with_loader_criteria() "
            "options, so it refuses the UPDATE rather than judge and lock other rows",
        ) from None
    if not options:
        return ()
    found: dict[Any, Any] = {}
    for option in options:
        criteria = getattr(option, "_is_criteria_option", None)
        if criteria is None and isinstance(option, LoaderCriteriaOption):
            raise InternalsChanged(
                "SQLAlchemy",
                "ORMOption._is_criteria_option",
                "the bulk-UPDATE transition guard cannot tell an UPDATE's with_loader_criteria() "
                "options, so it refuses the UPDATE rather than judge and lock other rows",
            )
        if criteria:
            option.get_global_criteria(found)
    if not found:
        return ()
    return tuple(_adjust_for_extra_criteria()(found, mapper))


def _anonymous_label_class() -> type[str]:
    try:
        from sqlalchemy.sql.elements import _anonymous_label  # noqa: PLC0415

        return _anonymous_label
    except ImportError:
        raise InternalsChanged(
            "SQLAlchemy",
            "sqlalchemy.sql.elements._anonymous_label",
            "the bulk-UPDATE transition guard cannot tell the parameter SQLAlchemy makes of a "
            "plain values() value from a bindparam() of the application's own",
        ) from None


_ANONYMOUS: list[type[str]] = []


def is_anonymous_bind(bind: sa.BindParameter[Any]) -> bool:
    """Whether ``bind`` is the anonymous parameter SQLAlchemy makes of a plain ``values()``
    value (or of ``literal()``), as opposed to a named ``bindparam()`` of the application's.

    Private: SQLAlchemy ``sqlalchemy.sql.elements._anonymous_label``, the ``str`` subclass of
    an anonymous bind's key (verified 2.0.52, 2.0.59, 2.1.9); imported on first use. Gone:
    :class:`InternalsChanged`. Public alternative: none exact.
    """
    if not _ANONYMOUS:
        _ANONYMOUS.append(_anonymous_label_class())
    return isinstance(bind.key, _ANONYMOUS[0])


def empty_result() -> sa.Result[Any]:
    """An empty, closed :class:`~sqlalchemy.engine.Result` (a bulk UPDATE by primary key whose
    every parameter set was refused sends nothing).

    Private: SQLAlchemy ``sqlalchemy.engine.result.null_result`` (undocumented module
    function; verified 2.0.52, 2.0.59, 2.1.9), imported on use. Gone: :class:`InternalsChanged`.
    Public alternative: partial (``IteratorResult`` needs private result metadata).
    """
    try:
        from sqlalchemy.engine.result import null_result  # noqa: PLC0415
    except ImportError:
        raise InternalsChanged(
            "SQLAlchemy",
            "sqlalchemy.engine.result.null_result",
            "a bulk UPDATE by primary key whose every row the transition guard refused has no "
            "result to return",
        ) from None
    result: sa.Result[Any] = null_result()
    return result


def expand_composites(mapper: Any, row: Mapping[str, Any]) -> Mapping[str, Any]:
    """``row``, a parameter set of an ORM bulk UPDATE by primary key, with the values of the
    mapper's composite attributes it names spread over their column attributes, as SQLAlchemy
    sends them (a copy; ``row`` itself when it names no composite): the bulk-UPDATE transition
    guard reads a status given inside a composite from it.

    Private: SQLAlchemy ``Composite._populate_composite_bulk_save_mappings_fn``, what
    ``orm/bulk_persistence.py``'s ``_expand_composites`` calls for every such set (verified
    2.1.9; the same method in 2.0's ``orm/descriptor_props.py``, verified 2.0.52, 2.0.59). Gone:
    :class:`InternalsChanged`. Public alternative: none (a composite's values are read by an
    accessor SQLAlchemy generates for a dataclass, else by ``__composite_values__()``).
    """
    composites = mapper.composites
    named = [key for key, _ in composites.items() if key in row]
    if not named:
        return row
    expanded = dict(row)
    for key in named:
        populate = getattr(composites[key], "_populate_composite_bulk_save_mappings_fn", None)
        if populate is None:
            raise InternalsChanged(
                "SQLAlchemy",
                "Composite._populate_composite_bulk_save_mappings_fn",
                "the bulk-UPDATE transition guard cannot read a status given inside a "
                "composite attribute, so it refuses the UPDATE rather than let an illegal move "
                "through",
            )
        populate()(expanded)
    return expanded


def flush_pk_bind_name(column: sa.ColumnElement[Any]) -> str:
    """The name the ORM flush gives the parameter of ``column`` in an UPDATE's primary-key
    criteria (``tasks_id``): the transition guard's compare-and-set reads it.

    Private: SQLAlchemy ``ColumnElement._label``, which ``orm/persistence.py`` uses for those
    binds (verified 2.0.52, 2.0.59, 2.1.9). Gone: :class:`InternalsChanged`. (If only the flush
    stops naming its binds so, the compare-and-set finds no parameter and falls back to checking
    the rows under lock: correct, slower; ``tests/test_internals.py`` fails for that too.)
    Public alternative: none.
    """
    label = getattr(column, "_label", None)
    if not isinstance(label, str):
        raise InternalsChanged(
            "SQLAlchemy",
            "ColumnElement._label",
            "the transition guard cannot name the primary-key parameters of the flush's "
            "UPDATE, so it cannot make that UPDATE a compare-and-set",
        )
    return str(label)


#: SQLAlchemy's symbol for an attribute never set on a new object (private:
#: ``sqlalchemy.orm.base.NEVER_SET``, verified 2.0.52, 2.0.59, 2.1.9; public alternative: none, the
#: public ``sqlalchemy.orm.NO_VALUE`` is the other such symbol). Gone: a symbol of our own,
#: which no attribute holds, so such a value counts as known and is checked (refused as no
#: declared state) instead of being skipped; the canary in tests/test_internals.py fails.
NEVER_SET: Any
try:  # guarded: read on every guarded flush, so bound once here
    from sqlalchemy.orm.base import NEVER_SET, PASSIVE_NO_INITIALIZE
except ImportError:  # pragma: no cover - exercised by tests/test_internals.py's canary
    NEVER_SET = object()

    def attribute_history(state: Any, key: str) -> Any:
        """See the definition below: the private names are gone."""
        raise InternalsChanged(
            "SQLAlchemy",
            "sqlalchemy.orm.base.PASSIVE_NO_INITIALIZE",
            "the flush transition guard cannot read a changed status without loading it",
        )

else:

    def attribute_history(state: Any, key: str) -> Any:
        """The ``History`` of attribute ``key`` of ``state`` (an ``InstanceState``), without
        loading anything: what the flush transition guard reads for a changed status.

        Private: ``state.manager[key].impl.get_history(state, state.dict,
        PASSIVE_NO_INITIALIZE)`` (the attribute's implementation object, and
        ``sqlalchemy.orm.base.PASSIVE_NO_INITIALIZE``), verified 2.0.52, 2.0.59, 2.1.9.
        Public alternative: ``sqlalchemy.orm.attributes.get_history(obj, key,
        passive=PASSIVE_NO_INITIALIZE)``, equivalent, but three calls deeper on every guarded
        flush (``tests/test_bench.py`` holds the lines a guarded unit may add).
        """
        return state.manager[key].impl.get_history(state, state.dict, PASSIVE_NO_INITIALIZE)


#: Run an awaitable from inside SQLAlchemy's greenlet (an async engine's sync code), the
#: event loop running meanwhile. Private: ``sqlalchemy.util.await_`` (2.1; verified 2.1.9) or
#: ``await_only`` (2.0; verified 2.0.52, 2.0.59; in 2.1 a deprecated alias, to go in 2.2). Both
#: gone: it raises :class:`InternalsChanged`. Public alternative: ``AdaptedConnection.run_async``
#: for a driver connection's own coroutines (used wherever one is at hand); none for others
#: (a session's ``flush()``, a sleep), short of the ``awaitlet`` package.
sa_await: Callable[[Any], Any]
try:
    # (a type check against SQLAlchemy 2.0 finds no ``await_``: not an error there)
    from sqlalchemy.util import await_ as sa_await  # type: ignore[attr-defined,no-redef,unused-ignore]
except ImportError:  # SQLAlchemy 2.0
    try:
        from sqlalchemy.util import await_only as sa_await
    except ImportError:  # pragma: no cover - exercised by tests/test_internals.py's canary

        def sa_await(awaitable: Any) -> Any:
            awaitable.close()
            raise InternalsChanged(
                "SQLAlchemy",
                "sqlalchemy.util.await_ / await_only",
                "nothing can be awaited from inside an async engine's sync code",
            )


def session_binds(session: Any) -> Iterable[Any]:
    """The ``binds=`` of ``session`` (a sync ``Session``): the engines and connections given
    per mapper or table, whether the factory or the session itself was given them (and
    ``bind_mapper()`` / ``bind_table()`` since).

    Private: SQLAlchemy 2.1's ``Session.binds`` (undocumented; verified 2.1.9), 2.0's
    ``Session.__binds`` (``_Session__binds``; verified 2.0.52, 2.0.59). Gone:
    :class:`InternalsChanged` (a unit could not tell that it must join its caller's
    transaction). Public alternative: partial (``sessionmaker.kw["binds"]`` and the ``binds=``
    given to ``__call__`` miss ``bind_mapper()`` / ``bind_table()``).
    """
    binds: Any = getattr(session, "binds", None)
    if isinstance(binds, dict):  # (SQLAlchemy's immutabledict is one: no ABC check, every
        return binds.values() if binds else ()  # unit passes here)
    if not isinstance(binds, Mapping):
        binds = getattr(session, "_Session__binds", _GONE)
        if binds is _GONE:
            raise InternalsChanged(
                "SQLAlchemy",
                "Session.binds / Session.__binds",
                "a unit cannot tell which engines and connections its session was bound to",
            )
    return binds.values() if isinstance(binds, Mapping) and binds else ()


_GONE: Any = object()


def transaction_connections(transaction: Any) -> frozenset[Any]:
    """The ``Connection`` objects a session's root ``transaction`` (a ``SessionTransaction``)
    has begun on so far, acquiring none.

    Public since SQLAlchemy 2.1.7 (``SessionTransaction.connections``; verified 2.1.9); before,
    private: ``SessionTransaction._connections`` (keyed by connection and by engine, each to a
    tuple whose first item is the connection; verified 2.0.52, 2.0.59). Gone:
    :class:`InternalsChanged` (a bypass could not reach the connections the transaction began
    before it).
    """
    if isinstance(getattr(type(transaction), "connections", None), property):
        return frozenset(transaction.connections)
    found = getattr(transaction, "_connections", _GONE)
    if not isinstance(found, Mapping):
        raise InternalsChanged(
            "SQLAlchemy",
            "SessionTransaction.connections (2.1.7+) / SessionTransaction._connections",
            "bypass_transitions() cannot reach the connections a session's transaction began on",
        )
    return frozenset(entry[0] for entry in found.values())


def fire_after_commit(session: Any) -> None:
    """Call ``session``'s ``after_commit`` listeners (class- and instance-level), as
    ``SessionTransaction.commit`` does: a COMMIT whose answer was lost, proven committed.

    Private: the event dispatcher's ``dispatch.after_commit(session)`` call, as SQLAlchemy's
    own code makes it (``dispatch`` is the attribute every event target has; calling it is
    undocumented; verified 2.0.52, 2.0.59, 2.1.9). Gone: :class:`InternalsChanged`. Public
    alternative: none.
    """
    dispatch = getattr(getattr(session, "dispatch", None), "after_commit", None)
    if not callable(dispatch):
        raise InternalsChanged(
            "SQLAlchemy",
            "Session.dispatch.after_commit",
            "after_commit listeners are not told of a COMMIT proven committed",
        )
    dispatch(session)


def prime_class_listeners(cls: type[Any]) -> None:
    """Make the class-level listener collections of session class ``cls`` now, while one
    thread does it: before any session of ``cls`` exists.

    SQLAlchemy makes them at the first instance of a class (``_Dispatch.__init__`` calls
    ``_ClsLevelDispatch.update_subclass`` per event), unlocked: it files an empty collection
    for the class, then copies the bases' listeners into it. A second thread's first session
    in between takes the empty collection and runs without the class's listeners (the flush
    and bulk-UPDATE guards, a drop-in block's notes, the application's own): 16 threads'
    first units through a barrier missed them in a run of two now and then (verified 2.0.52,
    2.1.9; 2.0.59 makes them the same way, unlocked). A factory's class is its own, so the
    factory primes it when it makes it.

    Private: ``cls.dispatch._for_class(cls)``, which files the collections for ``cls`` as a
    first instance does (verified 2.0.52, 2.0.59, 2.1.9). Gone: :class:`InternalsChanged`. Public
    alternative: making a session of ``cls``, which runs the application's ``__init__``.
    """
    for_class = getattr(getattr(cls, "dispatch", None), "_for_class", None)
    if not callable(for_class):
        raise InternalsChanged(
            "SQLAlchemy",
            "Session.dispatch._for_class",
            "the first sessions of a factory made in several threads at once may run "
            "without the class's listeners (the transition guard among them)",
        )
    for_class(cls)


def server_side_result(result: Any) -> bool:
    """Whether ``result`` (a ``CursorResult``, the ORM's ``ChunkedIteratorResult``, or a
    ``ScalarResult`` / ``MappingResult`` of one) reads its rows from a server-side cursor
    (``stream_results``, ``yield_per``), which ends with its transaction: a sync unit that
    returns one is refused (reading it after the unit's COMMIT fails).

    Private: ``FilterResult._real_result`` (the result a ``ScalarResult`` or ``MappingResult``
    filters), ``ChunkedIteratorResult.raw`` (the ORM's cursor result; no underscore, not
    documented) and ``DefaultExecutionContext._is_server_side`` (verified 2.0.52, 2.0.59, 2.1.9).
    Gone: False (degrading to before: such a result is returned, and fails when read; the
    canary fails). Public alternative: none (``execution_options`` says what was asked for,
    not whether the dialect opened a server-side cursor).
    """
    for _ in range(3):  # (a filter of a filter: bounded)
        inner = getattr(result, "_real_result", None)
        if inner is None:
            break
        result = inner
    raw = getattr(result, "raw", None)
    if raw is not None:
        result = raw
    return getattr(getattr(result, "context", None), "_is_server_side", False) is True


def committed_unclosed(session: Any) -> bool:
    """Whether the transaction of ``session`` (a sync ``Session``) has committed and is not
    closed yet: an interruption raised from its ``commit()`` meanwhile came after the server
    answered every COMMIT of it (in an ``after_commit`` listener, or SQLAlchemy's removal of
    the transaction's snapshot), not before (in the flush, or a COMMIT cut off).

    Private: ``SessionTransaction._state`` (``SessionTransactionState.COMMITTED``, set as the
    COMMITs return, before ``after_commit`` fires, until the transaction closes; verified
    2.0.52, 2.0.59, 2.1.9), of the root transaction ``Session.get_transaction()`` gives
    (public). Gone: False (degrading safely: such an interruption is raised unmarked, as before
    it was looked at; the canary fails). Public alternative: none (``SessionTransaction.is_active``
    is False too for a transaction that a failed flush deactivated, whose COMMIT was never
    sent).
    """
    return transaction_committed_unclosed(session.get_transaction())


def transaction_committed_unclosed(transaction: Any) -> bool:
    """Whether the root ``transaction`` (a ``SessionTransaction``, or None) has committed and
    is not closed yet: :func:`committed_unclosed` of a transaction that may no longer be its
    session's (SQLAlchemy takes one off its session as its close begins, before it hands its
    connections back to the pool). Private: ``SessionTransaction._state``, as there."""
    state = getattr(transaction, "_state", None)
    return getattr(state, "name", None) == "COMMITTED"


def commit_returned(transaction: Any, *, prepared_committed: bool) -> bool:
    """Whether ``transaction`` (the root transaction a ``Session.commit()`` that raised was
    called on) got past its COMMITs: every one returned, and the error came after them, from
    an ``after_commit`` listener or SQLAlchemy's removal of the transaction's snapshot (state
    ``COMMITTED``) or an ``after_transaction_end`` listener as it closed (``CLOSED``). A
    COMMIT that failed, or an error before it (a ``before_commit`` listener, the flush), leaves
    it ``PREPARED`` or ``ACTIVE``; a two-phase session's failed PREPARE closes it too
    (SQLAlchemy rolls it back), so ``CLOSED`` counts for one only when every PREPARE's
    COMMIT PREPARED went out (``prepared_committed``).

    Private: ``SessionTransaction._state``, as :func:`committed_unclosed` (verified 2.0.52,
    2.0.59, 2.1.9). Gone: False (degrading to before: such an error is settled as a failed COMMIT,
    and may be replayed; the canary fails). Public alternative: none.
    """
    state = getattr(getattr(transaction, "_state", None), "name", None)
    if state == "CLOSED":
        return prepared_committed or not transaction.session.twophase
    return state == "COMMITTED"


def commit_flushes(session: Any) -> bool:
    """Whether a unit's ``session.commit()`` must do its flush, as plain SQLAlchemy's does:
    the session has a ``before_commit`` listener (which ``commit()`` calls before it flushes,
    to see ``session.new`` and ``session.dirty`` and add to them), or its class has a
    ``commit()`` of its own (which may read them). A unit otherwise flushes first, on its own.

    Private: the truth of ``session.dispatch.before_commit`` (whether it has listeners), as
    SQLAlchemy's ``commit()`` asks it (verified 2.0.52, 2.0.59, 2.1.9). Gone: False (a unit flushes
    first, as before: its ``before_commit`` listeners see a flushed session; the canary fails).
    Public alternative: none (``event.contains`` needs the listener).
    """
    listeners = getattr(getattr(session, "dispatch", None), "before_commit", None)
    return bool(listeners) or getattr(type(session), "commit", None) not in PLAIN_COMMITS


#: ``commit`` methods that are SQLAlchemy's own (see :func:`commit_flushes`): ``Session``'s,
#: and the async twin's stand-in for a session class that overrides only ``flush`` or
#: ``close`` (``_asyncio._OwnMethods``), added there
PLAIN_COMMITS: set[Any] = {Session.commit}


def engine_of_options(engine: Any) -> Any:
    """The engine whose pool and dialect ``engine`` uses: ``engine`` itself, or for an
    ``execution_options()`` copy of an engine (SQLAlchemy's ``OptionEngine``, a copy of a copy
    likewise) the engine it was made from. Pool and dialect events listened for on the copy
    are the engine's (SQLAlchemy files them on the shared pool and dialect, and the copy's
    dispatch joins the engine's): hooks installed per engine are installed on this one.

    Private: ``OptionEngine._proxied`` (verified 2.0.52, 2.1.9; set by
    ``OptionEngineMixin.__init__`` since 1.4). Taken only when it is an engine with the same
    dialect. Gone: ``engine`` itself (degrading is safe as far as it goes: each copy gets
    hooks of its own, as before, heard twice on the shared pool and dialect; the canary
    fails). Public alternative: none (the copy's ``pool`` and ``dialect`` are its engine's,
    but nothing names the engine)."""
    while isinstance(engine, sa.engine.Engine):
        proxied = getattr(engine, "_proxied", None)
        if not isinstance(proxied, sa.engine.Engine) or proxied.dialect is not engine.dialect:
            break
        engine = proxied
    return engine


def last_do_connect(dialect: Any, listener: Any) -> bool:
    """Whether ``listener`` is the last ``do_connect`` listener of ``dialect`` (the one whose
    connect arguments the dialect uses).

    Private: iterating ``dialect.dispatch.do_connect`` in call order (verified 2.0.52,
    2.0.59, 2.1.9). Public alternative: none (``event.contains`` tells membership, not order).
    """
    listeners = list(dialect.dispatch.do_connect)
    return bool(listeners) and listeners[-1] == listener


def event_keys(target: Any, listeners: Iterable[tuple[str, Any]]) -> tuple[Any, ...]:
    """The keys under which SQLAlchemy's event registry files ``listeners`` (event name,
    function) registered on ``target`` (a class), for :func:`forget_event_keys` once
    ``target`` is gone.

    Private: ``sqlalchemy.event.registry._EventKey(target, identifier, fn, target)._key``
    (verified 2.0.52, 2.0.59, 2.1.9). Gone: ``()``, and the entries stay, as before (degrading is
    safe: it costs memory only). Public alternative: ``event.remove``, which needs
    ``target`` alive; a class given to a factory goes with its factories, whenever the
    application drops them."""
    try:
        from sqlalchemy.event.registry import _EventKey  # noqa: PLC0415 - private, see above

        return tuple(_EventKey(target, name, fn, target)._key for name, fn in listeners)
    except (ImportError, AttributeError, TypeError):
        return ()


def forget_event_keys(keys: Iterable[Any]) -> None:
    """Remove the entries of ``keys`` (from :func:`event_keys`) from SQLAlchemy's event
    registry: their target is gone. SQLAlchemy keeps a class-level listener's entries after
    its class is freed (they are keyed by the class's ``id()``): a process making a class per
    tenant or per test grew without bound.

    Private: ``sqlalchemy.event.registry._key_to_collection`` (key -> {collection ref:
    listener ref}) and ``_collection_to_key`` (collection ref -> {listener ref: key}), as its
    own ``_removed_from_collection`` updates them (verified 2.0.52, 2.0.59, 2.1.9). Gone: nothing
    removed (see :func:`event_keys`). Public alternative: none for a target already gone."""
    from sqlalchemy.event import registry  # noqa: PLC0415 - private, see above

    by_key = getattr(registry, "_key_to_collection", None)
    by_collection = getattr(registry, "_collection_to_key", None)
    if by_key is None or by_collection is None:
        return
    for key in keys:
        for owner_ref, listen_ref in (by_key.pop(key, None) or {}).items():
            filed = by_collection.get(owner_ref)
            if filed is not None and filed.get(listen_ref) == key:
                del filed[listen_ref]


#: The code of SQLAlchemy's ``Connection._commit_impl``, the method that sends a
#: transaction's COMMIT through the dialect (``do_commit``) and catches its driver error: the
#: frame at the head of that error's traceback when ``handle_error`` sees it. Private (verified
#: 2.0.52, 2.0.59, 2.1.9). Gone: None, and no lost COMMIT answer is recognised this way with
#: self-healing off (the canary fails). Public alternative: ``ConnectionEvents.commit``, at
#: about +5 % per unit.
SQLALCHEMY_COMMIT_CODE: Any = getattr(
    getattr(sa.engine.Connection, "_commit_impl", None), "__code__", None
)


def raised_by_commit_impl(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by the COMMIT a ``Connection`` sent through its dialect
    (:data:`SQLALCHEMY_COMMIT_CODE` at the head of its traceback)."""
    tb = exc.__traceback__
    return (
        tb is not None
        and SQLALCHEMY_COMMIT_CODE is not None
        and tb.tb_frame.f_code is SQLALCHEMY_COMMIT_CODE
    )


#: The keyword SQLAlchemy's asyncpg DBAPI adapter takes for the connect function to use
#: (``create_async_engine(async_creator=)`` arrives at ``do_connect`` as it). Private:
#: ``AsyncAdapt_asyncpg_dbapi.connect(..., async_creator_fn=)`` (verified 2.0.52, 2.0.59, 2.1.9).
#: Renamed: every asyncpg connect fails with a TypeError from ``asyncpg.connect`` (the canary
#: fails first). Public alternative: none at ``do_connect`` time.
ASYNC_CREATOR_KWARG = "async_creator_fn"


def with_own_session_class(
    kwargs: Mapping[str, Any], base_of: Callable[[type[Any]], type[Any]] | None = None
) -> dict[str, Any]:
    """``sessionmaker`` keywords ``kwargs`` with ``class_`` replaced by a class of the
    factory's own, subclassing the class given (``Session`` by default), or ``base_of`` it (a
    class shared by the factories given that class, see ``_unit.listening_base``).

    SQLAlchemy's ``sessionmaker.__init__`` makes a new subclass per factory today
    (``type(class_.__name__, (class_,), {})``, undocumented; verified 2.0.52, 2.0.59, 2.1.9);
    resilient_db marks the factory's class as the factory's (``_registry.register_class``).
    It does not rely on that: the class is made here, before ``sessionmaker.__init__`` sees
    it, so whatever SQLAlchemy does with it (a subclass of it, or it as given) belongs to the
    factory alone, never to the application's class or to ``Session``. Public API only
    (``class_=`` is documented); listed here because it replaces an assumption about
    SQLAlchemy's internals.
    """
    given = kwargs.get("class_", Session)
    parent = given if base_of is None else base_of(given)
    own = type(
        given.__name__,
        (parent,),
        {"__module__": given.__module__, "__qualname__": given.__qualname__},
    )
    return {**kwargs, "class_": own}


# --------------------------------------------------------------------------------------------
# asyncpg
# --------------------------------------------------------------------------------------------


def asyncpg_abort_socket(connection: Any) -> None:
    """Close the socket of asyncpg connection ``connection`` at once, whatever its state.

    asyncpg's public ``terminate()`` does so only for a connection not yet closing: after a
    graceful ``close()`` cut short (its task cancelled, or a timeout around it), asyncpg 0.30
    has marked it closed without closing its socket (``Protocol.abort()`` returns at once once
    ``close()`` began; fixed in 0.32), which then stays open until the garbage collector finds
    the transport. Closing it twice is harmless.

    Private: asyncpg ``Connection._transport`` (a ``__slots__`` attribute, the asyncio
    transport, kept after the connection is closed; verified 0.30.0, 0.32.0). Gone: none (the
    socket of such a close is left to the garbage collector, as asyncpg 0.30 leaves it; 0.32
    closes it itself). Public alternative: ``terminate()``, which does nothing here.
    """
    transport = getattr(connection, "_transport", None)
    if transport is not None:
        transport.abort()


def asyncpg_socket_fd(connection: Any) -> int | None:
    """The descriptor of an asyncpg connection's socket, for the checkout probe's poll: None
    when it has no transport (closed), -1 when the socket is broken.

    Private: asyncpg ``Connection._transport`` (a ``__slots__`` attribute; verified 0.30.0,
    0.32.0) and the transport's ``get_extra_info("socket")`` (public asyncio). Gone:
    :class:`InternalsChanged` (reading it as "no socket" made the probe hand out a terminated
    backend as alive). Public alternative: none (asyncpg exposes no transport or descriptor;
    ``pool_pre_ping`` costs a round trip per checkout).
    """
    if not hasattr(type(connection), "_transport"):
        raise InternalsChanged(
            "asyncpg",
            "Connection._transport",
            "the checkout probe cannot find the connection's socket, so it cannot tell a "
            "terminated backend from a live one",
        )
    transport = connection._transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return None
    try:
        return int(sock.fileno())
    except Exception:
        return -1


@contextlib.contextmanager
def asyncpg_command_timeout(
    driver: Any, seconds: float, *, keep_shorter: bool = False
) -> Iterator[None]:
    """Every statement of asyncpg connection ``driver`` cut off by asyncpg after ``seconds``
    while inside (asyncpg cancels it and raises ``TimeoutError``), whatever its
    ``command_timeout`` (``keep_shorter``: unless that is shorter): for statements SQLAlchemy
    sends, which take no per-call timeout (the check's COMMIT, whose wait for synchronous
    standbys the server bounds with nothing; the library's statements on a server that may
    be frozen).

    Private: asyncpg ``Connection._config``, a ``_ClientConfiguration`` named tuple whose
    ``command_timeout`` asyncpg reads at each statement, replaced with ``_replace`` (verified
    0.30.0, 0.32.0). Gone: :class:`InternalsChanged` (the check's COMMIT could wait for
    good). Public alternative: the ``timeout=`` of asyncpg's own ``execute``/``fetch*``, used
    where resilient_db sends the statement itself (the claim, through SQLAlchemy's public
    ``AdaptedConnection.run_async``); SQLAlchemy's asyncpg adapter passes none.
    """
    config: Any = getattr(driver, "_config", None)
    if not hasattr(config, "command_timeout") or not hasattr(config, "_replace"):
        raise InternalsChanged(
            "asyncpg",
            "Connection._config.command_timeout",
            "the check's COMMIT cannot be cut off after its wait for synchronous standbys",
        )
    current = config.command_timeout
    if keep_shorter and current is not None and current <= seconds:
        seconds = current
    driver._config = config._replace(command_timeout=seconds)
    try:
        yield
    finally:
        driver._config = config


def asyncpg_statement_connection(statement: Any) -> Any:
    """The connection an asyncpg prepared statement (or cursor) belongs to.

    Private: asyncpg ``PreparedStatement._connection`` / ``CursorFactory``/``Cursor``
    ``._connection`` (verified 0.30.0, 0.32.0). Gone: ``AttributeError`` naming
    ``_connection`` at the first statement (read at every statement SQLAlchemy's adapter
    sends, so not wrapped: the canary in tests/test_internals.py fails first, and asyncpg is
    bounded above). Public alternative: none (and no ``__weakref__`` slot, so no side table
    either).
    """
    return statement._connection  # (one line: read at each statement a unit sends)


def asyncpg_address(driver: Any) -> Any:
    """The address an asyncpg connection connected to (a multi-host URL: the host that
    answered): a ``(host, port)`` tuple, a socket path, or None when it has none to say.

    Private: asyncpg ``Connection._addr`` (verified 0.30.0, 0.32.0). Gone: None (safe: only
    the "read-only standby" message's wording degrades to "an unknown address"). Public
    alternative: none (the URL's host and port, for a single-host URL).
    """
    return getattr(driver, "_addr", None)


#: Where asyncpg's code that connects runs, by module name, for telling "while connecting"
#: from a traceback (a bare ``TimeoutError`` / ``OSError`` asyncpg lets out): its module
#: ``asyncpg.connect_utils``, and the function ``connect`` of ``asyncpg.connection`` (a raw
#: ``asyncpg.connect(timeout=...)`` raises its timeout there). Internal layout, no private
#: name (verified 0.30.0, 0.32.0). Moved: a connect's timeout or socket error is taken for a
#: statement's (not retried as a connect); the canary fails first. Public alternative: none
#: (asyncpg raises bare builtins).
ASYNCPG_CONNECT_MODULES: tuple[str, ...] = ("asyncpg.connect_utils",)
ASYNCPG_CONNECT_FUNCTION: tuple[str, str] = ("asyncpg.connection", "connect")
#: The functions of ``asyncpg.connection`` that raise ``InterfaceError`` only for a closed
#: connection (``if self.is_closed(): raise InterfaceError(...)``): the private
#: ``Connection._check_open``, which every public method that talks to the server calls first,
#: and ``add_log_listener``, which makes the same check itself (verified 0.30.0, 0.32.0).
#: Moved: such an error while connecting is not taken for a lost connection (not retried);
#: the canary fails first. Public alternative: none.
ASYNCPG_CLOSED_CHECKS: tuple[str, ...] = ("_check_open", "add_log_listener")
#: Where asyncpg's cursors and prepared statements check their connection before each call
#: (``ConnectionResource._check_conn_validity`` of ``asyncpg.connresource``, private): it raises
#: ``InterfaceError`` for a connection released to asyncpg's own pool, which SQLAlchemy does not
#: use, or closed. SQLAlchemy's asyncpg adapter lets it out unwrapped from a server-side cursor's
#: fetch (``stream()``, ``yield_per``) (verified 0.30.0, 0.32.0). Moved: a stream whose backend
#: ended before its next fetch is not taken for a lost connection (not replayed); the canary
#: fails first. Public alternative: none.
ASYNCPG_RESOURCE_CHECK: tuple[str, str] = ("asyncpg.connresource", "_check_conn_validity")
#: Where asyncpg starts a simple query (``Connection.execute`` without arguments: asyncpg's own
#: BEGIN, COMMIT and ROLLBACK): the private Cython method ``CoreProtocol._simple_query`` of
#: ``asyncpg.protocol.protocol`` (its traceback entry's name, qualified by Cython, ends so). It
#: checks the connection and switches the protocol's state (``_ensure_connected``,
#: ``_set_state``, which raise ``InternalClientError`` when they refuse) before it builds the
#: message, and writes it last: an ``InternalClientError`` raised through it never reached the
#: socket (verified 0.30.0, 0.32.0). Moved: a COMMIT asyncpg refused to send is taken for one
#: whose answer was lost (an unknown outcome, not replayed: safe); the canary fails first.
#: Public alternative: none (the error has no attribute saying where it was raised).
ASYNCPG_SIMPLE_QUERY: tuple[str, str] = ("asyncpg.protocol.protocol", "_simple_query")
#: SQLAlchemy's asyncpg adapter, in whose frames a raw asyncpg error is one of a statement the
#: adapter sent (its server-side cursor's fetches are not wrapped)
SQLALCHEMY_ASYNCPG_MODULE = "sqlalchemy.dialects.postgresql.asyncpg"


# --------------------------------------------------------------------------------------------
# psycopg
# --------------------------------------------------------------------------------------------

try:  # guarded: the marked COMMIT of every psycopg unit sends through it
    from psycopg.generators import execute as _psycopg_execute
except ImportError:  # pragma: no cover - exercised by tests/test_internals.py's canary

    def psycopg_simple_query(connection: Any, message: bytes) -> list[Any]:
        """See the definition below: the private name is gone."""
        raise InternalsChanged(
            "psycopg",
            "psycopg.generators.execute",
            "the marked COMMIT cannot be sent as one message",
        )

    async def psycopg_simple_query_async(connection: Any, message: bytes) -> list[Any]:
        """See the definition below: the private name is gone."""
        raise InternalsChanged(
            "psycopg",
            "psycopg.generators.execute",
            "the marked COMMIT cannot be sent as one message",
        )

else:

    def psycopg_simple_query(connection: Any, message: bytes) -> list[Any]:
        """Send ``message`` (several statements, no parameters) as one simple-query message
        on psycopg connection ``connection`` and wait for its results (libpq's
        ``PGresult``s; :func:`psycopg_error_from_result` makes psycopg's error of one).

        This is what psycopg's own ``commit()`` does for ``COMMIT``: the libpq call through
        the public ``pgconn``, waited for by the connection's ``wait()`` (so Ctrl-C still
        cancels), under the connection's ``lock``, with psycopg's generator for a sent query.
        Private: ``psycopg.generators.execute`` (an undocumented module), and the
        undocumented ``Connection.lock`` and ``Connection.wait()`` (verified 3.2.1, 3.3.9).
        Gone at import: this raises :class:`InternalsChanged` (``import resilient_db`` does
        not fail). Public alternative: a base ``psycopg.Cursor``'s parameterless
        ``execute(message, prepare=False)`` runs the statements too, at about 40,000 more
        instructions per commit (query conversion, prepared-statement bookkeeping).
        """
        with connection.lock:
            pgconn = connection.pgconn
            pgconn.send_query(message)
            results: list[Any] = connection.wait(_psycopg_execute(pgconn))
        return results

    async def psycopg_simple_query_async(connection: Any, message: bytes) -> list[Any]:
        """:func:`psycopg_simple_query` on a ``psycopg.AsyncConnection`` (the same privates,
        its ``lock`` an ``asyncio.Lock`` and its ``wait()`` a coroutine)."""
        async with connection.lock:
            connection.pgconn.send_query(message)
            results: list[Any] = await connection.wait(_psycopg_execute(connection.pgconn))
        return results


def psycopg_error_from_result(result: Any, connection: Any) -> BaseException:
    """psycopg's own exception for a failed libpq ``result`` of ``connection`` (the class its
    SQLSTATE maps to, with its diagnostics), as psycopg raises it for a cursor.

    Private: ``psycopg.errors.error_from_result`` (undocumented; verified 3.2.1, 3.3.9),
    imported on use (an error path). Gone: :class:`InternalsChanged`. Public alternative:
    none for a result psycopg did not make.
    """
    try:
        from psycopg.errors import error_from_result  # noqa: PLC0415
    except ImportError:
        return InternalsChanged(
            "psycopg",
            "psycopg.errors.error_from_result",
            "an error of the marked COMMIT cannot be raised as psycopg's own exception",
        )
    error: BaseException = error_from_result(result, encoding=connection.info.encoding)
    return error


def psycopg_on_deallocate_all(connection: Any, callback: Callable[[], None]) -> bool:
    """Have ``callback`` called whenever psycopg connection ``connection`` (sync or async)
    decides to send ``DEALLOCATE ALL`` (its prepared statements, the marker statement among
    them, are dropped); False when that cannot be watched.

    Private: psycopg ``Connection._prepared`` (the ``PrepareManager``), whose ``clear()``
    returns True when it will deallocate; wrapped on this connection's manager (verified
    3.2.1, 3.3.9). Gone: False, and nothing is watched (safe: the statement's loss is found
    at the next COMMIT, which is replayed, then the engine's COMMITs go inline). Public
    alternative: partial (only the ``DEALLOCATE ALL`` on the wire; ``prepare_threshold=None``
    avoids it but changes the application's setting).
    """
    manager: Any = getattr(connection, "_prepared", None)
    clear = getattr(manager, "clear", None)
    if not callable(clear):
        return False

    def clear_and_tell() -> bool:
        dropping: bool = clear()
        if dropping:
            callback()
        return dropping

    manager.clear = clear_and_tell
    return True


def psycopg_notify_handler(pgconn: Any) -> Callable[[Any], None] | None:
    """What psycopg does with a notification read on ``pgconn`` (``notifies()``' backlog or
    the application's notify handlers): the hook psycopg installs on its ``PGconn``, which
    the checkout probe calls for notifications it read.

    Private: ``PGconn.notify_handler`` (``pgconn`` is public, this attribute undocumented;
    verified 3.2.1, where it drops a notification when no handler is registered, and 3.3.9,
    where it goes to the ``notifies()`` backlog: each as the version itself does). Gone:
    :class:`InternalsChanged` (notifications the probe read would be lost). Public
    alternative: none.
    """
    try:
        handler: Callable[[Any], None] | None = pgconn.notify_handler
    except AttributeError:
        raise InternalsChanged(
            "psycopg",
            "PGconn.notify_handler",
            "notifications a pooled connection received would be lost",
        ) from None
    return handler


# --------------------------------------------------------------------------------------------
# pybreaker
# --------------------------------------------------------------------------------------------


def pybreaker_lock(cb: Any) -> Any:
    """The lock pybreaker's ``CircuitBreaker`` holds while its state setter notifies the
    listeners.

    Private: pybreaker ``CircuitBreaker._lock`` (an ``RLock``; verified 1.4.0, 1.4.1). Gone:
    :class:`InternalsChanged`. Public alternative: rebuilding the breaker in a forked child
    with the public constructor, which would lose its in-memory state.
    """
    try:
        return cb._lock
    except AttributeError:
        raise InternalsChanged(
            "pybreaker",
            "CircuitBreaker._lock",
            "a forked child cannot renew the lock a thread of its parent may have held (its "
            "breaker could hang)",
        ) from None


def renew_pybreaker_lock(cb: Any) -> None:
    """Give ``cb`` a new lock of the kind it had (in a forked child: a thread of the parent
    may have held the old one, and it does not exist here). Private: as
    :func:`pybreaker_lock`."""
    cb._lock = type(pybreaker_lock(cb))()


# --------------------------------------------------------------------------------------------
# Flask (never imported here: only when the application has imported it)
# --------------------------------------------------------------------------------------------


def flask_after_request_functions() -> list[Any] | None:
    """The callbacks ``flask.after_this_request`` registered for the current request, in the
    list Flask runs them from once the view returned; None when Flask is not imported or no
    request context is active (a CLI command, a bare ``app.app_context()``).

    ``with_self_healing`` notes the list's length when an operation begins and cuts what a
    failed attempt added before the replay, so that the answer is the successful attempt's
    alone (as it takes back a FastAPI route's ``BackgroundTasks`` and ``Response``).

    Private: Flask ``RequestContext._after_request_functions``, reached through
    ``flask.globals.request_ctx`` (verified 3.1.3; the same since Flask 2.2, the oldest
    Flask-SQLAlchemy 3.1 takes), or ``AppContext._after_request_functions`` through
    ``flask.globals.app_ctx`` where Flask merged the two contexts (its 3.2 sources; looked at
    first, so that the deprecated ``request_ctx`` is not read there). Gone: None, and one
    WARNING line saying so (a replayed view then sends its failed attempts' callbacks' effects
    too, as before this was taken back; raising instead would fail every decorated view of an
    application after a Flask upgrade). Public alternative: none (Flask only appends to that
    list).
    """
    flask = sys.modules.get("flask")
    if flask is None or not flask.has_request_context():
        return None
    functions: object = None
    for proxy in ("app_ctx", "request_ctx"):
        try:
            context = getattr(flask.globals, proxy)._get_current_object()
        except (AttributeError, RuntimeError):  # (RuntimeError: a proxy with nothing pushed)
            continue
        functions = getattr(context, "_after_request_functions", None)
        if functions is not None:
            break
    if not isinstance(functions, list):
        global _flask_changed_told
        if not _flask_changed_told:
            _flask_changed_told = True
            changed = InternalsChanged(
                "flask",
                "RequestContext._after_request_functions",
                "a Flask view replayed by with_self_healing now runs the after_this_request "
                "callbacks of its failed attempts too",
            )
            logging.getLogger("resilient_db").warning("%s", changed)
        return None
    return functions


#: whether the WARNING of :func:`flask_after_request_functions` finding Flask changed was given
_flask_changed_told = False
