"""The one module that touches a library's non-public API.

resilient_db depends on the public APIs of SQLAlchemy, psycopg, asyncpg and pybreaker. Where a
private one is unavoidable it is read here, in one function, and ``tests/test_internals.py``
has a canary per function that fails naming the library, the private name, the function and
what breaks (``tests/test_no_private_api.py`` fails when a private use appears elsewhere).

Rules for every function here:
- its docstring names the private API, the versions verified (the oldest supported pins and
  the newest installed: SQLAlchemy 2.0.24 / 2.1.9, psycopg 3.2.1 / 3.3.9, asyncpg 0.30.0 /
  0.32.0, pybreaker 1.4.0 / 1.4.1) and the public alternative, if any;
- nothing private is imported at module level unguarded: ``import resilient_db`` never fails
  because a library moved a private name;
- when the private is gone it raises :class:`InternalsChanged` (or degrades where degrading is
  safe, saying so): it never silently fails open.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ._errors import ResilientDBError

__all__ = [
    "NEVER_SET",
    "InternalsChanged",
    "asyncpg_command_timeout",
    "asyncpg_socket_fd",
    "attribute_history",
    "dml_values",
    "empty_result",
    "flush_pk_bind_name",
    "is_anonymous_bind",
    "with_own_session_class",
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
    - 2.0 (verified 2.0.24): ``_ordered_values`` (a list of pairs, or None) for
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
    an anonymous bind's key (verified 2.0.24, 2.1.9); imported on first use. Gone:
    :class:`InternalsChanged`. Public alternative: none exact.
    """
    if not _ANONYMOUS:
        _ANONYMOUS.append(_anonymous_label_class())
    return isinstance(bind.key, _ANONYMOUS[0])


def empty_result() -> sa.Result[Any]:
    """An empty, closed :class:`~sqlalchemy.engine.Result` (a bulk UPDATE by primary key whose
    every parameter set was refused sends nothing).

    Private: SQLAlchemy ``sqlalchemy.engine.result.null_result`` (undocumented module
    function; verified 2.0.24, 2.1.9), imported on use. Gone: :class:`InternalsChanged`.
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


def flush_pk_bind_name(column: sa.Column[Any]) -> str:
    """The name the ORM flush gives the parameter of ``column`` in an UPDATE's primary-key
    criteria (``tasks_id``): the transition guard's compare-and-set reads it.

    Private: SQLAlchemy ``ColumnElement._label``, which ``orm/persistence.py`` uses for those
    binds (verified 2.0.24, 2.1.9). Gone: :class:`InternalsChanged`. (If only the flush stops
    naming its binds so, the compare-and-set finds no parameter and falls back to checking the
    rows under lock: correct, slower; ``tests/test_internals.py`` fails for that too.)
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
#: ``sqlalchemy.orm.base.NEVER_SET``, verified 2.0.24, 2.1.9; public alternative: none, the
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
        ``sqlalchemy.orm.base.PASSIVE_NO_INITIALIZE``), verified 2.0.24, 2.1.9.
        Public alternative: ``sqlalchemy.orm.attributes.get_history(obj, key,
        passive=PASSIVE_NO_INITIALIZE)``, equivalent, but three calls deeper on every guarded
        flush (``tests/test_bench.py`` holds the lines a guarded unit may add).
        """
        return state.manager[key].impl.get_history(state, state.dict, PASSIVE_NO_INITIALIZE)


def with_own_session_class(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``sessionmaker`` keywords ``kwargs`` with ``class_`` replaced by a class of the
    factory's own, subclassing the class given (``Session`` by default).

    SQLAlchemy's ``sessionmaker.__init__`` makes a new subclass per factory today
    (``type(class_.__name__, (class_,), {})``, undocumented; verified 2.0.24, 2.1.9);
    resilient_db marks the factory's class as the factory's (``_registry.register_class``).
    It does not rely on that: the class is made here, before ``sessionmaker.__init__`` sees
    it, so whatever SQLAlchemy does with it (a subclass of it, or it as given) belongs to the
    factory alone, never to the application's class or to ``Session``. Public API only
    (``class_=`` is documented); listed here because it replaces an assumption about
    SQLAlchemy's internals.
    """
    given = kwargs.get("class_", Session)
    own = type(
        given.__name__,
        (given,),
        {"__module__": given.__module__, "__qualname__": given.__qualname__},
    )
    return {**kwargs, "class_": own}


# --------------------------------------------------------------------------------------------
# asyncpg
# --------------------------------------------------------------------------------------------


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
def asyncpg_command_timeout(driver: Any, seconds: float) -> Iterator[None]:
    """Every statement of asyncpg connection ``driver`` cut off by asyncpg after ``seconds``
    while inside (asyncpg cancels it and raises ``TimeoutError``), whatever its
    ``command_timeout``: for statements SQLAlchemy sends, which take no per-call timeout (the
    check's COMMIT, whose wait for synchronous standbys the server bounds with nothing).

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
    driver._config = config._replace(command_timeout=seconds)
    try:
        yield
    finally:
        driver._config = config
