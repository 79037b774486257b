"""Putting the trigger into a database and checking it is still there: running the generated
statements through an Alembic ``op``, a Connection, an Engine or a Session (also used for the
commit markers), install / uninstall, and drift detection against the declared rules.

What is installed comes from a model's ``__transitions__``, or from a :class:`TransitionTrigger`,
which describes one guarded column without a mapped class (what a migration installs): it
compiles to the same :class:`~._rules.Guard` by the same code, and registers nothing, so the
database error of its trigger is mapped back by the application's models alone and no session
guards it."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol, TypeAlias

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Mapper, Session, registry
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.elements import ClauseElement

from resilient_db._classify import sqlstate_of
from resilient_db._errors import ResilientDBError, finite, shown_number

from ._report import logger
from ._rules import (
    Guard,
    TransitionRules,
    TransitionRulesError,
    _compile,
    guards_of,
    mapper_of,
    trigger_guards,
)
from ._sql import (
    BYPASS_ROLE,
    EQ,
    GT,
    INSTALL_LOCK_TIMEOUT,
    NE,
    bypass_role_statement,
    column_of_trigger,
    drop_plan,
    drop_plan_statements,
    drop_script,
    drop_statements,
    gone_column_condition,
    guards_script,
    insert_when_printed,
    left_over_statements,
    literal,
    online_install_statements,
    online_uninstall_statements,
    quoted_table,
    script_statements,
    source_matches,
    spellings,
    stamp_generator,
    stamp_prefix,
    stored_name,
    trigger_names,
    unqualified,
    update_when_printed,
)
from ._sql import transition_trigger_drop_sql as _model_drop_sql
from ._sql import transition_trigger_sql as _model_sql

__all__ = [
    "TransitionTrigger",
    "TriggerInstallRefusedError",
    "in_autocommit",
    "install_transition_trigger",
    "run_statements",
    "transition_trigger_drop_sql",
    "transition_trigger_sql",
    "trigger_drift",
    "uninstall_transition_trigger",
]


# --------------------------------------------------------------------------------------------
# A trigger described without a mapped class: what a migration installs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class TransitionTrigger:
    """The database trigger of one guarded column, for :func:`install_transition_trigger` and
    :func:`uninstall_transition_trigger` in place of a model: how a migration declares the rules
    it was written with, without a model of its own::

        TASKS = rdb.transitions.TransitionTrigger(
            model="Task",
            table="tasks",
            primary_key="id",
            rules=rdb.TransitionRules(
                column="status",
                transitions={"pending": {"in_progress"}, "in_progress": {"done"}},
                initial={"pending"},
            ),
        )

        def upgrade() -> None:
            rdb.install_transition_trigger(op, TASKS)

    It installs exactly the trigger of a model of that table, row key, column and rules (the same
    function, names, stamp and error detail), so the two are interchangeable, drift detection
    included; unlike a model it is never used to map the trigger's error back to
    :class:`IllegalTransitionError`, nor by the session guards.

    ``model``: the class name the trigger's error names (the application's model of the table).
    ``table`` and ``schema``: the table (``schema=None``: the one found on the search_path).
    Whether the schema is given or left to the search_path, here or in the application's model,
    the trigger of one table is the same to :func:`trigger_drift` and to an install through an
    Engine (which sends nothing when it is current), though its function's name, which hashes
    the schema as written, differs (an install on a server drops the one of the other name).
    ``primary_key``: the name of the row key's column, or a sequence of them in the key's order
    (the error's ``pk``). ``rules``: the rules of the column ``rules.column`` (the column's name
    in the database). ``type_``: the column's SQLAlchemy type (``sa.String(20)``,
    ``sa.Enum(Status)``): required for states that are ``enum.Enum`` members, whose stored text
    depends on it (an ``Enum`` column stores a member's name, a string column its value);
    and for a ``Numeric`` column, whose states the trigger compares as the column writes them
    (1 in ``sa.Numeric(4, 2)`` as ``'1.00'``; a value of ``sa.Numeric()``, which keeps the
    decimals written, without its trailing zeros: 3.000 as ``'3'``); otherwise optional (bools
    mean a ``Boolean`` column, anything else a string or integer column, which both store a
    state as its text), and when given its checks apply as for a model (a state longer than a
    ``String``'s length, a string state in an ``Integer`` column, 1000 in
    ``sa.Numeric(4, 2)``).
    Invalid input raises :class:`TransitionRulesError` (or ``TypeError`` for a wrong kind of
    argument) when the value is built.
    """

    model: str
    table: str
    primary_key: str | Sequence[str]
    rules: TransitionRules
    schema: str | None = None
    type_: sa.types.TypeEngine[Any] | type[sa.types.TypeEngine[Any]] | None = None
    _guard: Guard = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        key = _names("primary_key", self.primary_key)
        object.__setattr__(self, "primary_key", key)
        for name, value in (("model", self.model), ("table", self.table)):
            if not isinstance(value, str) or not value:
                raise TypeError(f"TransitionTrigger: {name} must be a non-empty str, got {value!r}")
            _no_nul(name, value)
        if self.schema is not None:
            if not isinstance(self.schema, str) or not self.schema:
                raise TypeError(
                    f"TransitionTrigger: schema must be a non-empty str or None, got "
                    f"{self.schema!r}"
                )
            _no_nul("schema", self.schema)
        if not isinstance(self.rules, TransitionRules):
            raise TypeError(
                f"TransitionTrigger: rules must be a TransitionRules, got {self.rules!r} (one "
                "value per guarded column)"
            )
        _no_nul("rules.column", self.rules.column)
        object.__setattr__(self, "_guard", self._compiled(self._column_type()))

    @property
    def column(self) -> str:
        """The guarded column (``rules.column``)."""
        return self.rules.column

    def _where(self) -> str:
        where = f"model={self.model!r}, table={self.table!r}"
        if self.schema is not None:
            where += f", schema={self.schema!r}"
        return f"TransitionTrigger({where}, column={self.rules.column!r})"

    def _column_type(self) -> sa.types.TypeEngine[Any]:
        given = self.type_
        if isinstance(given, type) and issubclass(given, sa.types.TypeEngine):
            return given()
        if isinstance(given, sa.types.TypeEngine):
            return given
        if given is not None:
            raise TypeError(
                f"{self._where()}: type_ must be a SQLAlchemy type (sa.String(20), "
                f"sa.Enum(Status)), got {given!r}"
            )
        states = self.rules.declared_states
        member = next((s for s in states if isinstance(s, enum.Enum)), None)
        if member is not None:
            cls = type(member).__name__
            raise TransitionRulesError(
                f"{self._where()}: state {member!r} is a member of {cls}, whose text in the "
                f"database depends on the column's type: pass type_= as the column is "
                f"declared (sa.Enum({cls}) stores a member's name, a string column its value)"
            )
        if any(isinstance(s, bool) for s in states):
            return sa.Boolean()
        return sa.String()

    def _compiled(self, column_type: sa.types.TypeEngine[Any]) -> Guard:
        """The guard a model of this table, key, column and rules compiles to (by the same
        code): compiled on a mapping of its own, disposed of at once, which no registry of the
        application's sees and which declares no ``__transitions__`` (so nothing registers it
        for the error mapping or the session guards)."""
        column = self.rules.column
        columns = [
            sa.Column(name, column_type if name == column else sa.types.NullType())
            for name in self.primary_key
        ]
        if column not in self.primary_key:
            columns.append(sa.Column(column, column_type))
        # the key's columns in the order given (the error detail's pk, the stamp)
        key = sa.PrimaryKeyConstraint(*self.primary_key)
        table = sa.Table(self.table, sa.MetaData(), *columns, key, schema=self.schema)
        mappings = registry()
        try:
            mapper: Mapper[Any] = mappings.map_imperatively(type(self.model, (), {}), table)
            try:
                return _compile(mapper, self.rules)
            except TransitionRulesError as exc:
                prefix = f"{self.model}.__transitions__ (column {column!r})"
                message = str(exc).replace(prefix, self._where(), 1)
                raise TransitionRulesError(message) from None
        finally:
            mappings.dispose()


def _names(what: str, value: object) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, Sequence) or isinstance(names, (bytes, str)):
        raise TypeError(
            f"TransitionTrigger: {what} must be a column name or a sequence of them, got {value!r}"
        )
    found = tuple(names)
    if not found:
        raise TypeError(f"TransitionTrigger: {what} names no column")
    for name in found:
        if not isinstance(name, str) or not name:
            raise TypeError(f"TransitionTrigger: {what}: {name!r} is not a column name")
        _no_nul(what, name)
    if len(set(found)) != len(found):
        raise TypeError(f"TransitionTrigger: {what} names a column twice: {found!r}")
    return found


def _no_nul(what: str, value: str) -> None:
    if "\x00" in value:
        raise TransitionRulesError(
            f"TransitionTrigger: {what} {value!r} contains a NUL character, which PostgreSQL "
            "identifiers cannot hold"
        )


def described(trigger: TransitionTrigger) -> str:
    """``trigger`` as messages name it: ``TransitionTrigger(model=..., table=..., column=...)``."""
    return trigger._where()


def guard_of(trigger: TransitionTrigger) -> Guard:
    """The compiled guard of ``trigger`` (for the install)."""
    return trigger._guard


def _driver_message(orig: BaseException) -> str:
    """The driver's error message of ``orig``, stripped: SQLAlchemy 2.0's asyncpg adapter
    (2.0.52, at least; 2.1's does not) puts the asyncpg exception's class in front of it
    ("<class ...>: ")."""
    return re.sub(r"^<class '[^']*'>: ", "", str(orig).strip())


class _DriverRefusal(ResilientDBError, sa.exc.ProgrammingError):
    """An install error that stands for the driver's ``ProgrammingError`` it was raised for:
    its ``statement``, ``params`` and ``orig`` are that error's, ``reason`` the first line of
    the server's message, and its text ``message``, which a subclass sets."""

    message: str
    reason: str

    def _stand_for(self, error: sa.exc.DBAPIError | str, default: str) -> None:
        """Take ``error`` (a message alone: no statement, ``orig`` an ``Exception`` of it);
        ``default`` the reason where the server's message is empty."""
        if isinstance(error, sa.exc.DBAPIError):
            statement, params = error.statement, error.params
            orig = error.orig if error.orig is not None else Exception(str(error))
            text = _driver_message(orig)
        else:
            statement, params, orig, text = None, None, Exception(error), error
        self.reason = text.splitlines()[0] if text else default
        super().__init__(statement, params, orig)

    def __str__(self) -> str:
        return self.message


class TriggerInstallRefusedError(_DriverRefusal):
    """:func:`install_transition_trigger` through an Engine found the trigger in the database
    not as declared, and this role may not install it (SQLSTATE 42501: an application role at
    startup, say, which owns neither the table nor its schema). ``model`` names what was
    installed, ``drift`` is what :func:`trigger_drift` said, ``reason`` the server's refusal;
    the driver's error is ``orig``, as on the ``ProgrammingError`` it stands for (which is its
    ``__cause__``, and which handlers of ``ProgrammingError`` keep catching). The fix: install
    as the table's owner (the migration), or declare the rules that are installed; after that,
    the startup install sends nothing."""

    def __init__(self, model: str, drift: str, error: sa.exc.DBAPIError | str) -> None:
        self.model = model
        self.drift = drift
        self._stand_for(error, "permission denied")
        self.message = (
            f"install_transition_trigger({model}): the trigger in the database is not the one "
            f"declared (drift: {drift}), so an install was needed, and this role may not run it "
            f"({self.reason}); install it as the table's owner (the migration's "
            f"install_transition_trigger), after which this call sends nothing"
        )


_INSUFFICIENT_PRIVILEGE = "42501"


def _model_name(model: type[Any] | TransitionTrigger) -> str:
    if isinstance(model, TransitionTrigger):
        return described(model)
    return getattr(model, "__name__", repr(model))


# --------------------------------------------------------------------------------------------
# Running the statements
# --------------------------------------------------------------------------------------------


class _Verbatim(Executable, ClauseElement):
    """A statement that compiles to its text, unchanged: what Alembic's offline mode writes
    out. Not ``sa.text()``: it takes every ``:name`` for a bind parameter, and for a dialect
    of the ``format`` or ``pyformat`` paramstyle (an env.py without ``dialect_opts=
    {"paramstyle": "named"}``, Flask-Migrate's) writes every ``%`` as ``%%``, which changed
    the trigger's ``format()`` strings (its messages, the DROPs of its cleanup blocks)."""

    inherit_cache = False

    def __init__(self, statement: str) -> None:
        self.statement = statement


def _compile_verbatim(element: _Verbatim, compiler: Any, **kw: Any) -> str:
    return element.statement


# (through Any: SQLAlchemy 2.0 leaves ``compiles`` untyped, which mypy --strict refuses in an
# application checking this package, and a type: ignore would be unused on 2.1)
_compiles: Any = compiles
_compiles(_Verbatim)(_compile_verbatim)


# Installers running at once (two instances of an application starting together) collide in
# the catalog (CREATE SCHEMA IF NOT EXISTS and CREATE OR REPLACE FUNCTION are not safe against a
# concurrent twin): each takes this transaction-level advisory lock first, so they run one after
# the other ("rdb_inst" in ASCII; released with the transaction).
INSTALL_LOCK = "SELECT pg_catalog.pg_advisory_xact_lock(8242821379925111668)"


#: the session's lock_timeout, kept for the transaction while an install bounds its own waits
_SAVED_LOCK_TIMEOUT = "resilient_db.install_saved_lock_timeout"


def lock_timeout_ms(lock_timeout: object) -> int | None:
    """``lock_timeout`` (seconds, or None: the session's own) in milliseconds, checked."""
    if lock_timeout is None:
        return None
    if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)):
        raise TypeError(
            "lock_timeout must be a number of seconds (or None: the session's own "
            f"lock_timeout), got {type(lock_timeout).__name__} {lock_timeout!r}"
        )
    if not finite(lock_timeout) or lock_timeout <= 0:
        raise ValueError(
            "lock_timeout must be a positive number of seconds (or None: the session's own "
            f"lock_timeout), got {lock_timeout!r}"
        )
    if lock_timeout > _MAX_LOCK_TIMEOUT_MS / 1000:
        # (the server refuses more, with a DataError quoting the milliseconds, once the
        # install has begun)
        raise ValueError(
            f"lock_timeout must be at most {_MAX_LOCK_TIMEOUT_MS / 1000:g} seconds (PostgreSQL's "
            f"largest lock_timeout, about 24 days), got {shown_number(lock_timeout)}"
        )
    return max(1, math.ceil(lock_timeout * 1000))


#: PostgreSQL's largest ``lock_timeout``, in milliseconds (an int4 setting)
_MAX_LOCK_TIMEOUT_MS: Final = 2_147_483_647


def _bounded(statements: list[str], ms: int | None) -> list[str]:
    """``statements`` with their lock waits bounded by ``ms`` for their duration (a session's
    shorter ``lock_timeout`` stays), the caller's setting put back after them: in a caller's
    transaction (a Connection, Alembic's ``op``) the statements that follow the install keep
    theirs. Operators named with their schema (nothing on the caller's search_path runs)."""
    if ms is None:
        return statements
    bound = (
        f"SELECT pg_catalog.set_config('{_SAVED_LOCK_TIMEOUT}', s.setting, true), "
        "pg_catalog.set_config('lock_timeout', CASE WHEN s.setting::pg_catalog.int4 "
        f"OPERATOR(pg_catalog.>) 0 AND s.setting::pg_catalog.int4 OPERATOR(pg_catalog.<) {ms} "
        f"THEN s.setting ELSE '{ms}' END, true) FROM pg_catalog.pg_settings s "
        "WHERE s.name OPERATOR(pg_catalog.=) 'lock_timeout'"
    )
    # (in AUTOCOMMIT, where each statement commits on its own: nothing saved, the setting as
    # it is)
    restore = (
        "SELECT pg_catalog.set_config('lock_timeout', CASE WHEN COALESCE("
        f"pg_catalog.current_setting('{_SAVED_LOCK_TIMEOUT}', true), '') "
        "OPERATOR(pg_catalog.=) '' THEN pg_catalog.current_setting('lock_timeout') "
        f"ELSE pg_catalog.current_setting('{_SAVED_LOCK_TIMEOUT}') END, true)"
    )
    return [bound, *statements, restore]


def run_statements(
    target: Any,
    statements: list[str],
    *,
    current: Callable[[Connection], bool] | None = None,
    lock_timeout: float | None = INSTALL_LOCK_TIMEOUT,
    name: str,
    model: type[Any] | TransitionTrigger | None = None,
) -> bool:
    """Send ``statements`` one at a time through ``target``, after :data:`INSTALL_LOCK`: an
    Alembic ``op`` (offline mode: emitted as SQL text, ``:name`` escaped), an Engine (in a
    transaction of its own), a Session (its connection) or a Connection. Their lock waits are
    bounded by ``lock_timeout`` seconds (see :data:`INSTALL_LOCK_TIMEOUT`; None: the session's
    setting), except in an offline script, which leaves it to whoever runs the script.

    ``current``: through an Engine, asked once the lock is held; when it says the install is
    current now (another process installed while this one waited for the lock: the instances
    of a deploy, starting at once), nothing is sent and this returns False.

    ``name`` (and ``model``, a trigger's): the function called, for the error that refuses
    another ``target``."""
    ms = lock_timeout_ms(lock_timeout)
    migration_context = getattr(target, "migration_context", None)
    if migration_context is None and not isinstance(target, (Engine, Connection, Session)):
        get_context = getattr(target, "get_context", None)
        if callable(get_context):  # ``from alembic import op``: the module proxy of Operations
            migration_context = get_context()
    if migration_context is not None:  # an Alembic Operations object (``op``)
        _require_postgresql(migration_context.dialect)
        if getattr(migration_context, "as_sql", False):
            # offline: written out as they are (see _Verbatim), as transition_trigger_sql()
            # writes them: whoever runs the script sets its lock_timeout (psql's session)
            for stmt in [INSTALL_LOCK, *statements]:
                target.execute(_Verbatim(stmt))
            return True
        _send(target.get_bind(), [INSTALL_LOCK, *_bounded(statements, ms)])
        return True
    if isinstance(target, Engine):
        _require_postgresql(target.dialect)
        # READ COMMITTED whatever the engine's level: the look once the lock is held must see
        # what the installer that held it committed (a REPEATABLE READ snapshot, taken when
        # the lock was asked for, would not), and the install is one transaction (also on an
        # AUTOCOMMIT engine, see _send)
        with target.connect() as conn:
            conn.execution_options(isolation_level="READ COMMITTED")
            with conn.begin():
                conn.exec_driver_sql(INSTALL_LOCK, execution_options={"no_parameters": True})
                if current is not None and _current_now(conn, current):
                    return False
                _send(conn, _bounded(statements, ms))
        return True
    if isinstance(target, Session):
        # (refused before its connection(), which begins the session's transaction)
        _require_postgresql(target.get_bind().dialect)
        target = target.connection()
    if not isinstance(target, Connection):
        raise TypeError(_not_a_target(target, name, model))
    _require_postgresql(target.dialect)
    _send(target, [INSTALL_LOCK, *_bounded(statements, ms)])
    return True


def _not_a_target(target: Any, name: str, model: type[Any] | TransitionTrigger | None) -> str:
    """The refusal of an install's ``target``, naming the call to make instead: with asyncio
    (an AsyncEngine, AsyncConnection or AsyncSession, a newcomer's first try) the sync function
    run on a connection of the AsyncEngine."""
    text = (
        f"{name}() takes an Alembic op, a Connection, an Engine or a Session, got "
        f"{type(target).__name__}"
    )
    if model is None:
        args = ""
    elif isinstance(model, TransitionTrigger):
        args = ", <the TransitionTrigger>"
    else:
        args = f", {_model_name(model)}"
    text += (
        f"; with asyncio, run it on a connection of the AsyncEngine: async with "
        f"engine.begin() as conn: await conn.run_sync(rdb.{name}{args})"
    )
    if name == "install_commit_markers":
        # an Engine looks first and sends nothing when they are current; a Connection installs
        text += (
            " (or await conn.run_sync(lambda c: rdb.install_commit_markers(c.engine)), which "
            "sends nothing when they are current, for an application role at startup)"
        )
    return text


def _current_now(conn: Connection, current: Callable[[Connection], bool]) -> bool:
    """``current(conn)`` in a savepoint: a failed look (see :func:`installed_already`) means
    an install, in the transaction it would have aborted."""
    try:
        with conn.begin_nested():
            return current(conn)
    except sa.exc.DBAPIError:
        return False


def installed_already(target: Any, check: Callable[[Connection], bool]) -> bool:
    """Whether an install through ``target`` would change nothing (``check`` says so on a
    connection of its own): then it sends no DDL, so an application role without rights on
    the schema (``CREATE SCHEMA IF NOT EXISTS`` needs ``CREATE`` on the database even when the
    schema exists) may call it at startup, as the quickstart does. Asked of an Engine only: a
    failed look on a caller's connection would abort the caller's transaction."""
    if not isinstance(target, Engine) or target.dialect.name != "postgresql":
        return False
    try:
        with target.connect() as conn:
            return check(conn)
    except sa.exc.DBAPIError:  # can't look (no USAGE on the schema, say): install
        return False


def _send(connection: Connection, statements: list[str]) -> None:
    """Send ``statements`` in the connection's transaction; on a connection in AUTOCOMMIT mode,
    in one transaction of their own (BEGIN ... COMMIT): each statement committing on its own
    would leave the table without its trigger between a DROP TRIGGER and its CREATE TRIGGER, and
    the install lock would be released at once."""
    if not in_autocommit(connection):
        for stmt in statements:
            connection.exec_driver_sql(stmt, execution_options={"no_parameters": True})
        return
    connection.exec_driver_sql("BEGIN", execution_options={"no_parameters": True})
    try:
        for stmt in statements:
            connection.exec_driver_sql(stmt, execution_options={"no_parameters": True})
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to raise
            connection.exec_driver_sql("ROLLBACK", execution_options={"no_parameters": True})
        raise
    connection.exec_driver_sql("COMMIT", execution_options={"no_parameters": True})


def in_autocommit(connection: Connection) -> bool:
    """Whether statements on ``connection`` commit one at a time: AUTOCOMMIT set on it (an
    execution option) or for the whole engine (``create_engine(isolation_level="AUTOCOMMIT")``),
    which the driver connection says."""
    if connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return True
    return getattr(connection.connection.dbapi_connection, "autocommit", False) is True


def _require_postgresql(dialect: Any) -> None:
    """Refuse, before sending anything, a database these PostgreSQL objects can't go into."""
    if dialect.name != "postgresql":
        raise ValueError(
            "resilient_db installs PostgreSQL objects here (schema, functions, triggers); this "
            f"database is {dialect.name}: commit markers and transition triggers need PostgreSQL"
        )


def _install_guards(model: type[Any] | TransitionTrigger) -> tuple[Guard, ...]:
    """The guards whose triggers an install of ``model`` puts in: a model's (checked against
    the other classes of its tables), or the one a :class:`TransitionTrigger` describes."""
    if isinstance(model, TransitionTrigger):
        return (guard_of(model),)
    return trigger_guards(model)


def _declared_guards(model: type[Any] | TransitionTrigger) -> tuple[Guard, ...]:
    """The guards drift detection compares the database with (see :func:`_install_guards`)."""
    if isinstance(model, TransitionTrigger):
        return (guard_of(model),)
    return guards_of(model)


class MigrationOperations(Protocol):
    """Alembic's ``op`` in a migration (a module) or an ``Operations``: what an install uses."""

    def get_bind(self) -> Connection: ...


#: What the installs take: an Engine, a Connection, a Session, or Alembic's ``op``.
InstallTarget: TypeAlias = Engine | Connection | Session | MigrationOperations


def install_transition_trigger(
    bind_or_op: InstallTarget,
    model: type[Any] | TransitionTrigger,
    *,
    lock_timeout: float | None = INSTALL_LOCK_TIMEOUT,
) -> None:
    """Install (or replace) the trigger of ``model``: in an Alembic migration pass ``op``;
    otherwise a ``Connection``, ``Engine`` or ``Session`` (for asyncio:
    ``await conn.run_sync(install_transition_trigger, Model)``).

    ``model`` is a mapped class declaring ``__transitions__``, or a :class:`TransitionTrigger`
    describing the table, key, column and rules without a class (what a migration installs):
    both install the same trigger for the same table, key, column and rules.

    Creates the role :data:`~resilient_db.transitions.BYPASS_ROLE` first if it is missing; when
    the installing role may not create it, the trigger is installed all the same, refuses every
    bypass until the role exists, and a warning says so. Installing again replaces the trigger
    of an older release (whose bypass any role could switch on). Through an Engine on which
    the trigger is installed as declared (no drift), nothing is sent, also when the role is
    missing (a warning says so): an application role may call it at startup. The table is
    compared as the server resolves it: installed by a migration naming its schema, and
    declared by a model without one that reaches it through the search_path (or the other way
    round), it is current. When there is drift and the role may not install (SQLSTATE 42501),
    :class:`TriggerInstallRefusedError` (a ``ProgrammingError``, as before) says what the
    drift is and that the table's owner must install (the driver's error is its cause).
    On a server and in an offline script (Alembic ``--sql``, :func:`transition_trigger_sql`)
    alike, a function of the trigger's earlier name (its table written with or without the
    schema) is dropped with the triggers that called it (unless another role owns it); the
    script names the function by the table as declared and needs no server.

    The trigger belongs to the table and column, not to the model: the classes of one table
    (single-table inheritance, two models of one table) guarding a column by the same rules
    install the same trigger, and a model whose rules for the column differ from another's is
    refused (:class:`TransitionRulesError` naming both). Our triggers on the model's tables for a
    column the table no longer has (renamed or dropped by a migration: their function reads a
    column that is gone, so every write they check fails) are dropped, with their functions;
    whether the column exists is asked of the table itself when the statements run. Our
    triggers of another column that exists are left alone, declared by this model or not (they
    may be another code base's): remove such a guard on purpose with
    ``uninstall_transition_trigger(bind, Model, columns=(...))``. Triggers of the application's
    are never touched.

    Installs started at once (the instances of a deploy) take turns on an advisory lock;
    through an Engine, one that finds the trigger current once it holds the lock (another
    installed it meanwhile) sends nothing. ``lock_timeout`` (seconds; None: the session's own
    ``lock_timeout``) bounds each wait for a lock on the table: ``DROP TRIGGER`` asks for an
    ACCESS EXCLUSIVE lock, which waits behind any transaction using the table while every
    query on it queues behind the request. Past it the server's 55P03 is raised (an
    ``OperationalError``; nothing is installed through an Engine, and a caller's transaction
    is aborted, as by any error); a session's shorter ``lock_timeout`` stays, and the
    caller's setting is put back after the install.
    """
    lock_timeout_ms(lock_timeout)  # (checked before anything is sent)
    guards = _install_guards(model)
    _refuse_schema_translation(
        bind_or_op, model, [g.table for g in guards], "install_transition_trigger"
    )
    _warn_partitioned(bind_or_op, guards)
    role_found: list[bool] = []
    drift: list[str] = []
    if installed_already(bind_or_op, lambda conn: _trigger_current(conn, model, role_found, drift)):
        # Current is the trigger's state: a missing bypass role (the migration role could not
        # create it) is no reason to send DDL, which an application role at startup may not.
        if role_found and not role_found[0]:
            _warn_no_role(guards[0].model, installed_now=False)
        return
    # Offline, the statements are written into a script that may run them one at a time, each
    # committing on its own (psql's default, a migration environment without a transaction):
    # there, each guard's function and triggers are replaced in one statement. Online they are
    # sent in one transaction (see _send). Either way a function of the trigger's earlier name
    # (the table written with or without its schema) is dropped with the triggers that called it.
    per_guard = script_statements if _offline(bind_or_op) else online_install_statements
    statements = [
        bypass_role_statement(),
        *(s for g in guards for s in per_guard(g)),
        *left_over_statements(g.table for g in guards),
    ]
    role_now: list[bool] = []
    try:
        sent = run_statements(
            bind_or_op,
            statements,
            # installed by another process while this one waited for the install lock
            current=lambda conn: _trigger_current(conn, model, role_now, []),
            lock_timeout=lock_timeout,
            name="install_transition_trigger",
            model=model,
        )
    except sa.exc.ProgrammingError as exc:  # what the drivers make of 42501
        if drift and sqlstate_of(exc) == _INSUFFICIENT_PRIVILEGE:
            raise TriggerInstallRefusedError(_model_name(model), drift[0], exc) from exc
        raise
    if not sent:
        if role_now and not role_now[0]:
            _warn_no_role(guards[0].model, installed_now=False)
        return
    if _role_missing(bind_or_op):
        _warn_no_role(guards[0].model, installed_now=True)


_ROLE_QUERY = sa.text("SELECT pg_catalog.to_regrole(:role) IS NOT NULL")


def _role_exists(conn: Connection) -> bool:
    return bool(conn.execute(_ROLE_QUERY, {"role": BYPASS_ROLE}).scalar())


def _role_missing(target: Any) -> bool:
    """Whether the bypass role is missing after an install through ``target``: asked on its
    connection, or on a connection of its own for an Engine (whose transaction is over);
    offline, nobody can tell (False)."""
    if isinstance(target, Engine):
        with target.connect() as conn:
            return not _role_exists(conn)
    live = _live_connection(target)
    return live is not None and not _role_exists(live)


def _warn_no_role(model: str, *, installed_now: bool) -> None:
    logger.warning(
        "transition trigger of %s installed, but role %s does not exist%s: every bypass is "
        "refused until a role with CREATEROLE runs CREATE ROLE %s NOLOGIN",
        model,
        BYPASS_ROLE,
        " and could not be created by this role" if installed_now else "",
        BYPASS_ROLE,
    )


# Operators, types and functions named with their schema, as the drift queries (see
# _DRIFT_QUERY): asked at every install and startup, before anything else, with the
# installer's rights. Whether the table is partitioned, and the tables that inherit from it
# (INHERITS, not partitions), if any.
_TABLE_SHAPE_QUERY = sa.text(
    f"SELECT c.relkind {EQ} 'p' AS partitioned,"
    " (SELECT pg_catalog.string_agg(i.inhrelid::pg_catalog.regclass::pg_catalog.text, ', '"
    "  ORDER BY i.inhrelid::pg_catalog.regclass::pg_catalog.text)"
    f"  FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class k ON k.oid {EQ} i.inhrelid"
    f"  WHERE i.inhparent {EQ} c.oid AND NOT k.relispartition) AS inheriting"
    f" FROM pg_catalog.pg_class c WHERE c.oid {EQ} pg_catalog.to_regclass(:table)::pg_catalog.oid"
)


def _warn_partitioned(target: Any, guards: Iterable[Guard]) -> None:
    """Warn when a guarded table is partitioned (declared so by the model, or found so in the
    database): an UPDATE moving a row to another partition runs as a DELETE and an INSERT,
    for which PostgreSQL fires no UPDATE trigger, so the trigger can't judge that move. And
    when other tables inherit from it (INHERITS): a table's row triggers fire for its own
    rows only, so the trigger does not judge the rows of those tables, which an UPDATE of
    this one reaches."""
    tables = list(dict.fromkeys(g.table for g in guards))
    partitioned = [
        t for t in tables if t.dialect_options["postgresql"].get("partition_by") is not None
    ]
    inheriting: dict[sa.Table, str] = {}
    with contextlib.suppress(sa.exc.DBAPIError):
        for table in tables:
            in_db, children = _shape_in_db(target, table)
            if in_db and table not in partitioned:
                partitioned.append(table)
            if children:
                inheriting[table] = children
    for table in partitioned:
        logger.warning(
            "transition trigger of %s on partitioned table %r: an UPDATE that moves a row to "
            "another partition runs as a DELETE and an INSERT, for which PostgreSQL fires no "
            "UPDATE trigger, so the trigger does not judge such a move (an illegal one is not "
            "refused by the database) and refuses a legal one into a state that is not "
            "initial, as it refuses such an INSERT; the session guards judge the ORM's "
            "writes as before. Keep status changes from moving rows across partitions (e.g. a "
            "partition key other than the status, never changed in the same UPDATE)",
            _model_of(guards, table),
            table.fullname,
        )
    for table, children in inheriting.items():
        logger.warning(
            "transition trigger of %s on table %r: %s inherit from it (INHERITS); PostgreSQL "
            "fires a table's row triggers for its own rows only, so the trigger does not "
            "judge the rows of those tables, which an UPDATE of %r reaches too (an illegal "
            "move of such a row is not refused by the database). Guard each of them with a "
            "trigger of its own (install_transition_trigger with a model of that table), "
            "or make them partitions, which PostgreSQL gives the table's triggers",
            _model_of(guards, table),
            table.fullname,
            children,
            table.fullname,
        )


def _model_of(guards: Iterable[Guard], table: sa.Table) -> str:
    return next(g.model for g in guards if g.table is table)


def _shape_in_db(target: Any, table: sa.Table) -> tuple[bool, str | None]:
    """Whether ``table`` is partitioned in the database ``target`` reaches, and the tables
    inheriting from it (see :data:`_TABLE_SHAPE_QUERY`); ``(False, None)`` when it can't be
    asked (offline Alembic) or there is no such table."""
    name = quoted_table(table)
    if isinstance(target, Engine):
        if target.dialect.name != "postgresql":
            return False, None
        with target.connect() as conn:
            row = conn.execute(_TABLE_SHAPE_QUERY, {"table": name}).first()
    else:
        live = _live_connection(target)
        if live is None or live.dialect.name != "postgresql":
            return False, None
        if in_autocommit(live):
            row = live.execute(_TABLE_SHAPE_QUERY, {"table": name}).first()
        else:
            # the caller's transaction: a look that fails (no USAGE on the table's schema, a
            # cancel) is rolled back to a savepoint, so the install goes on to send its
            # statements and raise their error, not "current transaction is aborted" (25P02)
            with live.begin_nested():
                row = live.execute(_TABLE_SHAPE_QUERY, {"table": name}).first()
    if row is None:
        return False, None
    return bool(row.partitioned), row.inheriting


def _trigger_current(
    conn: Connection,
    model: type[Any] | TransitionTrigger,
    role_found: list[bool],
    drift: list[str],
) -> bool:
    """Installed as declared (no drift; else what differs is put into ``drift``). Whether the
    bypass role exists is put into ``role_found``: a missing role is warned about, not
    reinstalled (the trigger looks it up when a bypass is asked for; creating it takes
    CREATEROLE, which an install may lack)."""
    found = trigger_drift(conn, model)
    if found is not None:
        drift.append(found)
        return False
    role_found.append(_role_exists(conn))
    return True


def _migration_context(target: Any) -> Any:
    """The MigrationContext of an Alembic ``op`` (an Operations object or the module proxy),
    else None."""
    context = getattr(target, "migration_context", None)
    if context is None and not isinstance(target, (Engine, Connection, Session)):
        get_context = getattr(target, "get_context", None)
        context = get_context() if callable(get_context) else None
    return context


def _offline(target: Any) -> bool:
    """Whether ``target`` is an Alembic ``op`` in offline mode (``--sql``: SQL written out)."""
    return bool(getattr(_migration_context(target), "as_sql", False))


def _live_connection(target: Any) -> Connection | None:
    """The connection the statements went through, when there is one to ask (not offline
    Alembic, not an Engine, whose transaction is over)."""
    if isinstance(target, Connection):
        return target
    if isinstance(target, Session):
        return target.connection()
    context = _migration_context(target)
    if context is None or getattr(context, "as_sql", False):
        return None
    bind = context.bind
    return bind if isinstance(bind, Connection) else None


def transition_trigger_sql(model: type[Any] | TransitionTrigger) -> str:
    """Idempotent PostgreSQL DDL enforcing the rules of ``model`` in the database.

    Per guarded column: a PL/pgSQL function (``CREATE OR REPLACE``) stamped with a hash of the
    rules (``COMMENT ON FUNCTION``), an ``AFTER INSERT`` row trigger that fires only for a row
    not in an initial state (a bulk INSERT of rows starting as they should queues no trigger
    event) and an ``AFTER UPDATE`` row trigger that fires only ``WHEN (OLD.col IS DISTINCT FROM
    NEW.col)`` (both compare the column's text bytewise, ``COLLATE "C"``, whatever its
    collation, with the built-in equality named, ``OPERATOR(pg_catalog.=)``, whatever the
    installer's search_path holds): AFTER, so they check the row as stored, whatever other
    BEFORE triggers of the table did to it. Our triggers left on the model's tables for a column
    the table no longer has (renamed or dropped) are dropped (see
    :func:`install_transition_trigger`). An illegal change raises SQLSTATE
    :data:`TRANSITION_SQLSTATE` with a JSON DETAIL (model, schema, table, column, from, to, pk),
    unless a member of :data:`BYPASS_ROLE` asked for a bypass of the current transaction (see
    :func:`~resilient_db.bypass_transitions`); the script first creates that role if it is
    missing. All literals and identifiers are quoted. Run it as a script (``psql``,
    ``op.execute`` through psycopg), or with :func:`install_transition_trigger`, which sends the
    statements one at a time (also through asyncpg, which prepares every statement and so can't
    run the script in one call: there :class:`ScriptOnPreparedStatementError` says so). Each
    statement may commit on its own (``psql`` without ``-1``): the function and both triggers of
    a column are replaced in one ``DO`` block, so no statement leaves the table unguarded; there
    is no ``BEGIN`` or ``COMMIT``, so it runs inside a caller's transaction too.

    ``model`` may be a :class:`TransitionTrigger` too: the script of its column, as the model it
    stands for would have it.
    """
    if isinstance(model, TransitionTrigger):
        script = guards_script([guard_of(model)])
    else:
        script = _model_sql(model)
    name = _model_name(model)
    return _handed_out(
        script, f"transition_trigger_sql({name})", f"install_transition_trigger(op, {name})"
    )


def transition_trigger_drop_sql(
    model: type[Any] | TransitionTrigger, *, columns: Iterable[str] | None = None
) -> str:
    """DDL removing what :func:`transition_trigger_sql` installs (for a downgrade), and our
    triggers on its tables for a column the table no longer has (renamed or dropped).

    ``columns``: remove instead our triggers (and their functions, when no other trigger calls
    them) of exactly these columns of the model's tables, whichever model declared them; names
    are the columns' (or their mapped attributes'), an unknown one raises
    :class:`TransitionRulesError`. A model whose ``__transitions__`` was removed needs it (it
    raises without): nothing else says which guards to remove, and the triggers of a column
    that still exists may be another code base's.

    ``model`` may be a :class:`TransitionTrigger` too: the removal of its column's trigger
    (``columns=`` is for a model).

    The script holds several statements, except with ``columns=``: asyncpg, which prepares
    every statement, can't run it in one call (``op.execute`` in a migration run through it
    raises :class:`ScriptOnPreparedStatementError`, naming
    :func:`uninstall_transition_trigger`, which sends them one at a time)."""
    if not isinstance(model, TransitionTrigger):
        script = _model_drop_sql(model, columns=columns)
    elif columns is not None:
        raise TypeError(_columns_of_a_trigger("transition_trigger_drop_sql", model))
    else:
        guard = guard_of(model)
        script = drop_script([*drop_statements(guard), *left_over_statements([guard.table])])
    args = _model_name(model)
    if columns is not None:
        args += f", columns={tuple(columns)!r}"
    return _handed_out(
        script, f"transition_trigger_drop_sql({args})", f"uninstall_transition_trigger(op, {args})"
    )


# --------------------------------------------------------------------------------------------
# A script given to asyncpg
# --------------------------------------------------------------------------------------------


class ScriptOnPreparedStatementError(_DriverRefusal):
    """A script of :func:`transition_trigger_sql` or :func:`transition_trigger_drop_sql` holding
    several statements was sent in one call through asyncpg (``op.execute(script)`` in a
    migration run by an async engine): asyncpg prepares every statement it sends, and a
    prepared statement holds one command, so the server refused it (SQLSTATE 42601, "cannot
    insert multiple commands into a prepared statement"). The message names the call that
    sends the statements one at a time; the driver's error is ``orig``, as on the
    ``ProgrammingError`` it stands for (its ``__cause__``, which handlers of
    ``ProgrammingError`` keep catching)."""

    def __init__(self, made_by: str, instead: str, error: sa.exc.DBAPIError | str) -> None:
        self.made_by = made_by
        self.instead = instead
        self._stand_for(error, "cannot insert multiple commands")
        self.message = (
            f"the script of {made_by} holds several statements, and asyncpg sends each "
            f"statement as a prepared statement, which holds one command ({self.reason}): in a "
            f"migration call rdb.{instead} instead of op.execute(script) (it sends the "
            f"statements one at a time, online and offline alike); elsewhere run the script "
            f"with psql or through psycopg"
        )


# The scripts this process handed out (their text, at most the last _SCRIPTS_KEPT: a migration
# runs a script as soon as it has it), with what made them and the call that sends their
# statements one at a time: an asyncpg connection's refusal of one is told in those words (see
# _script_refused) instead of the driver's. Looked up only when a statement failed.
# The listener is on every Engine, not on those that ran an install of ours: a script is text
# handed out before any engine is known, and the migration that runs it with op.execute may
# never have called an install (a downgrade runs on a fresh engine of env.py); what scopes it is
# the statement, which must be a script this process handed out, refused by asyncpg with 42601.
# Other engines pay a comparison of the driver's name, on a failed statement only.
_SCRIPTS: dict[str, tuple[str, str]] = {}
_SCRIPTS_KEPT = 32
_SCRIPTS_LOCK = threading.Lock()
_SYNTAX_ERROR = "42601"  # what the server answers a prepared statement of several commands


def _handed_out(script: str, made_by: str, instead: str) -> str:
    """``script``, noted as made by ``made_by`` (for :func:`_script_refused`)."""
    with _SCRIPTS_LOCK:
        _SCRIPTS.pop(script, None)
        _SCRIPTS[script] = (made_by, instead)
        while len(_SCRIPTS) > _SCRIPTS_KEPT:
            del _SCRIPTS[next(iter(_SCRIPTS))]
        if not sa.event.contains(Engine, "handle_error", _script_refused):
            sa.event.listen(Engine, "handle_error", _script_refused)
    return script


def _script_refused(ctx: sa.engine.ExceptionContext) -> BaseException | None:
    """``handle_error`` of every engine (listened to once a script was handed out): an asyncpg
    connection's refusal (42601) of a script of ours, handed out by this process, is raised as
    :class:`ScriptOnPreparedStatementError`, naming the call to make instead."""
    if ctx.dialect.driver != "asyncpg" or ctx.statement is None:
        return None
    found = _SCRIPTS.get(ctx.statement)
    error = ctx.sqlalchemy_exception
    if found is None or not isinstance(error, sa.exc.DBAPIError):
        return None
    if sqlstate_of(error) != _SYNTAX_ERROR:
        return None
    return ScriptOnPreparedStatementError(*found, error)


def _columns_of_a_trigger(what: str, model: TransitionTrigger) -> str:
    return (
        f"{what}: columns= names the guards to remove of a model's tables; {described(model)} "
        f"removes the trigger of its own column {model.column!r}: leave columns= out, or pass a "
        "TransitionTrigger of each column to remove"
    )


def uninstall_transition_trigger(
    bind_or_op: InstallTarget,
    model: type[Any] | TransitionTrigger,
    *,
    columns: Iterable[str] | None = None,
    lock_timeout: float | None = INSTALL_LOCK_TIMEOUT,
) -> None:
    """Remove the triggers and functions of ``model`` (the downgrade of the install), and ours on
    its tables for a column the table no longer has (see :func:`install_transition_trigger`).

    ``columns``: remove instead our triggers (and their functions, when no other trigger calls
    them) of exactly these columns of the model's tables, whichever model (or code base) declared
    them, and not the model's other guards: how a guard is removed on purpose, also for a model
    whose ``__transitions__`` was removed. Names are the columns' (or their mapped attributes');
    an unknown one raises :class:`TransitionRulesError` before anything is sent. A model without
    ``__transitions__`` raises without ``columns``: nothing else says which guards to remove, and
    our triggers of a column that still exists may be another code base's.

    A :class:`TransitionTrigger` removes the trigger and function of its column (and ours left
    on its table for a column the table no longer has), as the model it stands for would;
    ``columns=`` is for a model. ``lock_timeout``: as for the install."""
    lock_timeout_ms(lock_timeout)  # (checked before anything is sent)
    if isinstance(model, TransitionTrigger):
        if columns is not None:
            raise TypeError(_columns_of_a_trigger("uninstall_transition_trigger", model))
        guard = guard_of(model)
        _refuse_schema_translation(bind_or_op, model, [guard.table], "uninstall_transition_trigger")
        per_guard = drop_statements if _offline(bind_or_op) else online_uninstall_statements
        run_statements(
            bind_or_op,
            [*per_guard(guard), *left_over_statements([guard.table])],
            lock_timeout=lock_timeout,
            name="uninstall_transition_trigger",
            model=model,
        )
        return
    _, tables, _ = drop_plan(model, columns)
    _refuse_schema_translation(bind_or_op, model, tables, "uninstall_transition_trigger")
    online = not _offline(bind_or_op)
    run_statements(
        bind_or_op,
        drop_plan_statements(model, columns, online=online),
        lock_timeout=lock_timeout,
        name="uninstall_transition_trigger",
        model=model,
    )


def _refuse_schema_translation(
    target: Any, model: object, tables: Iterable[sa.Table], what: str
) -> None:
    """Refuse, before sending anything, a connection whose ``schema_translate_map`` moves one
    of ``tables`` (of ``model``) elsewhere: the trigger's statements are sent as text and name
    the table as the model declares it, so they would act on that table, not on the one the
    connection's queries reach (a tenant's table left unguarded, and drift saying all is well)."""
    options: Mapping[str, Any] = {}
    if isinstance(target, Engine):
        options = target.get_execution_options()
    else:
        conn = _live_connection(target)
        if conn is not None:
            options = conn.get_execution_options()
    mapping = options.get("schema_translate_map") or {}
    for table in tables:
        schema = table.schema
        if schema in mapping and mapping[schema] != schema:
            name = (
                described(model)
                if isinstance(model, TransitionTrigger)
                else mapper_of(model).class_.__name__
            )
            raise ValueError(
                f"{what}() does not follow schema_translate_map: this connection maps the schema "
                f"{schema!r} of {name} (table {quoted_table(table)}) "
                f"to {mapping[schema]!r}, and the trigger's statements name the table as the "
                f"model declares it, so they would act on another table than this connection's "
                f"queries; use a connection without schema_translate_map, with a model (or "
                f"Table) of the schema to guard"
            )


# Every operator, type and function below is named with its schema (OPERATOR(pg_catalog.=)):
# these queries run with the rights of the application at startup, of the installer, or of an
# operator asking, and a search_path listing pg_catalog after another schema would make that
# schema's operators (an exact match of built-in types too) win over the built-ins.
_T: Final = "pg_catalog.text"
_DRIFT_QUERY = sa.text(
    f"""
    SELECT t.tgname::{_T} AS name, t.tgenabled::{_T} AS enabled, p.proname::{_T} AS function,
           pg_catalog.obj_description(p.oid, 'pg_proc') AS stamp,
           t.tgtype::pg_catalog.int4 AS type, pg_catalog.cardinality(t.tgattr::pg_catalog.int2[])
               AS columns,
           t.tgnargs::pg_catalog.int4 AS nargs, t.tgconstraint {NE} 0::pg_catalog.oid
               AS constraint_trigger,
           pg_catalog.pg_get_triggerdef(t.oid) AS definition,
           pg_catalog.quote_ident(:col) AS quoted_column,
           p.prosrc AS source, p.proconfig::{_T}[] AS config, p.prosecdef AS definer,
           l.lanname::{_T} AS language,
           -- what its WHEN is bound to besides its table and function: nothing for ours, whose
           -- operators, type, functions and collation are built in (the server records no
           -- dependency on those); an operator or function of another schema shows here,
           -- named with its schema whatever the session's search_path. The guarded column's
           -- own collation is left out: a varchar's cast to text carries it until COLLATE "C"
           -- overrides it, and the server records it (a collation of the database's
           -- own, not built in), though it binds the WHEN to nothing the column does
           -- not already depend on
           (SELECT pg_catalog.string_agg(pg_catalog.format('%s %s', o.type, o.identity),
                       ', ' ORDER BY d.refclassid, d.refobjid)
            FROM pg_catalog.pg_depend d, LATERAL pg_catalog.pg_identify_object(
                d.refclassid, d.refobjid, d.refobjsubid) o
            WHERE d.classid {EQ} 'pg_catalog.pg_trigger'::pg_catalog.regclass
                AND d.objid {EQ} t.oid
                AND NOT (d.refclassid {EQ} 'pg_catalog.pg_class'::pg_catalog.regclass
                         AND d.refobjid {EQ} t.tgrelid)
                AND NOT (d.refclassid {EQ} 'pg_catalog.pg_proc'::pg_catalog.regclass
                         AND d.refobjid {EQ} t.tgfoid)
                AND NOT (d.refclassid {EQ} 'pg_catalog.pg_collation'::pg_catalog.regclass
                         AND d.refobjid {EQ} ANY (
                             SELECT a.attcollation FROM pg_catalog.pg_attribute a
                             WHERE a.attrelid {EQ} t.tgrelid AND a.attnum {GT} 0
                                 AND NOT a.attisdropped
                                 AND a.attname::{_T} {EQ} CAST(:col AS {_T})))) AS bound
    FROM pg_catalog.pg_trigger t
    JOIN pg_catalog.pg_proc p ON p.oid {EQ} t.tgfoid
    JOIN pg_catalog.pg_language l ON l.oid {EQ} p.prolang
    WHERE t.tgrelid {EQ} pg_catalog.to_regclass(:rel)::pg_catalog.oid
        AND t.tgname {EQ} ANY (ARRAY[:ins, :upd]::pg_catalog.name[])
    """
)
# The clones of our triggers that PostgreSQL made on the partitions of a partitioned table (a
# sub-partition's too: every level below the table) and that do not fire as installed: each
# can be disabled on its own (ALTER TABLE <partition> DISABLE TRIGGER), and then a write to a
# row of that partition goes unchecked while the table's own triggers look as installed.
_PARTITION_QUERY = sa.text(
    f"""
    SELECT p.relid::pg_catalog.regclass::{_T} AS partition, t.tgname::{_T} AS name,
           t.tgenabled::{_T} AS enabled
    FROM pg_catalog.pg_partition_tree(pg_catalog.to_regclass(:rel)) p
    JOIN pg_catalog.pg_trigger t ON t.tgrelid {EQ} p.relid::pg_catalog.oid
    WHERE p.level {GT} 0 AND t.tgname {EQ} ANY (ARRAY[:ins, :upd]::pg_catalog.name[])
        AND t.tgenabled {NE} 'O'
    ORDER BY p.level, 1, 2
    """
)
# pg_trigger.tgtype bits: FOR EACH ROW 1, BEFORE 2, INSERT 4, DELETE 8, UPDATE 16, TRUNCATE 32,
# INSTEAD 64. What install creates: AFTER INSERT / AFTER UPDATE row triggers, each with a WHEN.
_TRIGGER_TYPE_INSERT = 1 | 4
_TRIGGER_TYPE_UPDATE = 1 | 16
_ENABLED = {
    "D": "is disabled",
    "R": "fires only in sessions replaying replication (ENABLE REPLICA TRIGGER), not in others",
    "A": "is set to fire ALWAYS (ENABLE ALWAYS TRIGGER), not as installed",
}
# The WHEN condition in pg_get_triggerdef()'s text: "... FOR EACH ROW WHEN (<cond>) EXECUTE ..."
_WHEN = re.compile(r" FOR EACH ROW WHEN \((?P<cond>.*)\) EXECUTE (?:FUNCTION|PROCEDURE) ", re.S)
_FUNCTION_CONFIG = ["search_path=pg_catalog, pg_temp"]


def _shape_differs(row: Any, guard: Guard, update: bool) -> bool:
    """Whether the trigger of ``row`` is not the one install creates: AFTER INSERT WHEN the row
    is not in an initial state, or AFTER UPDATE with no column list and WHEN (OLD.col IS
    DISTINCT FROM NEW.col), both comparing the column's text bytewise (COLLATE "C"), for each
    row, no arguments, not a constraint trigger; a WHEN bound to nothing but built-ins (an
    earlier release's ``IN`` and ``IS DISTINCT FROM`` too, when installed on a search_path
    that found the built-in equality)."""
    expected = _TRIGGER_TYPE_UPDATE if update else _TRIGGER_TYPE_INSERT
    if row.type != expected or row.columns or row.nargs or row.constraint_trigger:
        return True
    if row.bound is not None:  # bound to an operator or function not built in
        return True
    match = _WHEN.search(row.definition)
    if match is None:
        return True
    col = row.quoted_column
    printed = insert_when_printed(guard, col) if not update else update_when_printed(guard, col)
    # as PostgreSQL prints it back (a WHEN without the bytewise COLLATE is not ours any more),
    # however it qualifies the built-ins it names
    return unqualified(match["cond"]) not in {unqualified(p) for p in printed}


# the schema the table resolves to (no row: no such table); named operators, as the others
_TABLE_QUERY = sa.text(
    f"SELECT s.nspname::{_T} FROM pg_catalog.pg_class c"
    f" JOIN pg_catalog.pg_namespace s ON s.oid {EQ} c.relnamespace"
    f" WHERE c.oid {EQ} pg_catalog.to_regclass(:rel)::pg_catalog.oid"
)
# text = text, as the other queries compare (attname is a name)
_COLUMN_QUERY = sa.text(
    "SELECT EXISTS (SELECT FROM pg_catalog.pg_attribute"
    f" WHERE attrelid {EQ} pg_catalog.to_regclass(:rel)::pg_catalog.oid AND attnum {GT} 0"
    f" AND NOT attisdropped AND attname::{_T} {EQ} CAST(:col AS {_T}))"
)


def trigger_drift(
    connection: Connection | Session, model: type[Any] | TransitionTrigger
) -> str | None:
    """``None`` when the database enforces exactly the declared rules of ``model``; otherwise a
    sentence saying what differs: a trigger missing, not enabled as installed (disabled, or
    firing only for replication), or defined otherwise (timing, events, columns, WHEN); the
    function's stamp from other rules or an older release, or its body or settings changed; the
    guarded column missing from the table (renamed or dropped); a trigger of ours on the table
    for a column the table no longer has (install and uninstall drop it). Our triggers of
    another column that exists are not this model's concern (another code base may declare
    them). ``model`` may be a :class:`TransitionTrigger`: the trigger it describes is compared
    (what its install put in, or a model's of the same table, key, column and rules).

    The table is the one this connection resolves the declared name to, and its triggers are
    compared however its install wrote the table: with its schema or without it (found on the
    installer's search_path). A migration's ``TransitionTrigger(schema="app")`` and a model
    without a schema reaching ``app.tasks`` through ``search_path=app`` (or the other way
    round) name the function differently (the name hashes the schema as written, so that
    offline SQL needs no server), and are the same trigger here: no drift."""
    conn = connection.connection() if isinstance(connection, Session) else connection
    if not isinstance(conn, Connection):
        hint = (
            "use engine.connect()"
            if isinstance(conn, Engine)
            else "for asyncio use await conn.run_sync(trigger_drift, Model)"
        )
        raise TypeError(
            f"trigger_drift expected a Connection or a Session, got {type(conn).__name__} ({hint})"
        )
    guards = _declared_guards(model)
    _refuse_schema_translation(conn, model, [g.table for g in guards], "trigger_drift")
    problems: list[str] = []
    for guard in guards:
        n = trigger_names(guard)
        where = f"{guard.model}.{guard.attr_key} (table {guard.table.name})"
        resolved = conn.execute(_TABLE_QUERY, {"rel": n.table}).first()
        if resolved is None:
            problems.append(f"{where}: the table does not exist")
            continue
        # the function name and stamp as an install of this table spelled with or without its
        # schema writes them: both are this table's trigger (the triggers are read off it)
        accepted = spellings(guard, resolved[0])
        # (a name longer than 63 bytes as the server keeps it: cut)
        column = stored_name(guard.column.name)
        if not conn.execute(_COLUMN_QUERY, {"rel": n.table, "col": column}).scalar():
            problems.append(
                f"{where}: the table has no column {guard.column.name!r} (renamed or dropped by a "
                "migration?); the trigger function reads it, so every write it checks fails: "
                "declare the column's name in __transitions__ and run install_transition_trigger "
                "again"
            )
            continue
        rows = {
            r.name: r
            for r in conn.execute(
                _DRIFT_QUERY,
                {
                    "rel": n.table,
                    "ins": n.insert_trigger,
                    "upd": n.update_trigger,
                    "col": column,
                },
            )
        }
        expected = accepted[n.function_name]
        expected_generator = stamp_generator(expected)
        stamps: dict[str | None, str] = {}  # installed stamp -> the one expected
        altered: dict[str, None] = {}  # functions whose body or settings were changed
        for trigger in (n.insert_trigger, n.update_trigger):
            row = rows.get(trigger)
            if row is None:
                problems.append(f"{where}: trigger {trigger} is missing")
                continue
            if row.enabled != "O":
                state = _ENABLED.get(row.enabled, f"has tgenabled = {row.enabled!r}")
                problems.append(f"{where}: trigger {trigger} {state}")
            if _shape_differs(row, guard, update=trigger == n.update_trigger):
                bound = "" if row.bound is None else f", its WHEN bound to {row.bound}"
                problems.append(
                    f"{where}: trigger {trigger} is not the one install creates "
                    f"({row.definition}{bound}); run install_transition_trigger again"
                )
            current = row.function in accepted and row.stamp == accepted[row.function]
            if current and (
                not source_matches(guard, row.source)
                or list(row.config or ()) != _FUNCTION_CONFIG
                or row.definer
                or row.language != "plpgsql"
            ):
                altered.setdefault(row.function)
            if row.function == n.legacy_function_name:
                problems.append(
                    f"{where}: trigger {trigger} is installed under an older name (it calls "
                    f"{row.function}(), which another table's guard may share); run "
                    f"install_transition_trigger again"
                )
            elif row.function not in accepted:
                problems.append(
                    f"{where}: trigger {trigger} calls {row.function}() instead of "
                    f"{n.function_name}()"
                )
            else:
                stamps.setdefault(row.stamp, accepted[row.function])
        partitions = conn.execute(
            _PARTITION_QUERY,
            {"rel": n.table, "ins": n.insert_trigger, "upd": n.update_trigger},
        )
        for part in partitions:
            table_trigger = rows.get(part.name)
            if table_trigger is not None and table_trigger.enabled == part.enabled:
                continue  # disabled on the table and its partitions alike: said above
            state = _ENABLED.get(part.enabled, f"has tgenabled = {part.enabled!r}")
            problems.append(
                f"{where}: on partition {part.partition}, trigger {part.name} {state}; run "
                "install_transition_trigger again"
            )
        for function in altered:
            problems.append(
                f"{where}: function {function}() is not the one generated for the declared "
                f"rules (its body or settings were changed, its stamp kept); run "
                f"install_transition_trigger again"
            )
        for stamp in sorted((found for found in stamps if found != stamps[found]), key=str):
            generator = stamp_generator(stamp)
            if generator is not None and expected_generator and generator < expected_generator:
                # v1 honoured the bypass setting for any role that set it
                risk = (
                    "; any role can switch its bypass on"
                    if generator < 2
                    else "; bypassed moves are not written to the server log"
                    if generator < 3
                    else "; it runs BEFORE the write, so another BEFORE trigger of the table "
                    "that sorts after it by name can set the column to a state it never checks"
                    if generator < 4
                    else "; it is stamped with one model's name, so each class of its table "
                    "reinstalls it, replacing the other's, and its INSERT trigger queues an "
                    "event for every row inserted"
                    if generator < 5
                    else ""
                )
                problems.append(
                    f"{where}: the installed trigger was generated by an older release "
                    f"(generator v{generator}{risk}); run install_transition_trigger again"
                )
                continue
            problems.append(
                f"{where}: installed function stamp ({stamp or 'no stamp'}) does not match the "
                f"declared rules ({stamps[stamp]}); reinstall with transition_trigger_sql()"
            )
    problems.extend(_left_over(conn, guards))
    return "; ".join(problems) if problems else None


_STAMPED = literal(stamp_prefix())
_INDENT = "\n            "
_LEFT_OVER_QUERY = sa.text(
    f"""
    SELECT t.tgname::{_T} AS name, p.proname::{_T} AS function
    FROM pg_catalog.pg_trigger t
    JOIN pg_catalog.pg_proc p ON p.oid {EQ} t.tgfoid
    WHERE t.tgrelid {EQ} pg_catalog.to_regclass(:rel)::pg_catalog.oid AND NOT t.tgisinternal
        AND pg_catalog.starts_with(pg_catalog.obj_description(p.oid, 'pg_proc'), {_STAMPED})
        AND {gone_column_condition(f"t.tgname::{_T}", "t.tgrelid", _INDENT)}
    ORDER BY 1
    """
)


def _left_over(conn: Connection, guards: Iterable[Guard]) -> list[str]:
    """Our triggers on the tables of ``guards`` for a column the table no longer has (install
    and uninstall drop them): one sentence per column. Ours of a column that exists are not the
    model's drift, declared by it or not (another code base may declare them)."""
    found: list[str] = []
    tables: dict[str, str] = {}
    for g in guards:
        tables.setdefault(trigger_names(g).table, g.model)
    for table, owner in tables.items():
        by_column: dict[str, list[tuple[str, str]]] = {}
        for row in conn.execute(_LEFT_OVER_QUERY, {"rel": table}):
            column = column_of_trigger(row.name)
            label = f"column {column!r}" if column is not None else "a column"
            by_column.setdefault(label, []).append((row.name, row.function))
        for label, triggers in by_column.items():
            names = ", ".join(name for name, _ in triggers)
            functions = ", ".join(sorted({f"{fn}()" for _, fn in triggers}))
            found.append(
                f"table {table}: trigger {names} of {owner}'s table is installed for {label}, "
                f"which the table no longer has (renamed or dropped), so every write it checks "
                f"fails (it calls {functions}); run install_transition_trigger again, which "
                "drops it"
            )
    return found
