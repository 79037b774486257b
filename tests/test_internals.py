"""Canaries for ``resilient_db/_internals.py``: one per function that reads a library's
non-public API, failing with a message that names the library, the private name, the function
and what breaks (run at both ends of the supported range by ``make test-oldest``); plus the
checks that the guard, the factories and the checkout probe never fail open when one moves."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import importlib
import importlib.util
import inspect
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import psycopg
import pybreaker
import pytest
import sqlalchemy as sa
from processes import wait_for_async
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncSession,
    async_scoped_session,
    create_async_engine,
)
from sqlalchemy.orm import (
    NO_VALUE,
    DeclarativeBase,
    Mapped,
    Session,
    composite,
    mapped_column,
    sessionmaker,
    with_loader_criteria,
)

import resilient_db as rdb
from resilient_db import _classify, _internals
from resilient_db._internals import InternalsChanged
from resilient_db._unit import connection_looks_dead, dead_probe
from resilient_db.examples.tasks import Base, Task
from resilient_db.testing import FaultProxy, PostgresServer
from resilient_db.transitions._rules import enum_db_values


def _says(library: str, name: str, function: str, breaks: str) -> str:
    return (
        f"{library} no longer behaves as resilient_db/_internals.py:{function} expects "
        f"({name}): {breaks}. Find the new spelling and change {function} (and its docstring)."
    )


# -- SQLAlchemy: a bulk UPDATE's values -------------------------------------------------------


def test_dml_values_reads_values_and_ordered_values() -> None:
    by_values = sa.update(Task).values(status="completed", title="t")
    by_order = sa.update(Task).ordered_values((Task.title, "t"), (Task.status, "completed"))
    message = _says(
        "SQLAlchemy",
        "Update._values / _ordered_values / _maintain_values_ordering",
        "dml_values",
        "the bulk-UPDATE transition guard reads no values and refuses every bulk UPDATE",
    )
    got = [(getattr(k, "key", k), getattr(v, "value", v)) for k, v in _dml(by_values)]
    assert sorted(got) == [("status", "completed"), ("title", "t")], message
    got = [(getattr(k, "key", k), getattr(v, "value", v)) for k, v in _dml(by_order)]
    assert got == [("title", "t"), ("status", "completed")], message
    assert _internals.dml_values(sa.update(Task)) == [], message


def _dml(stmt: Any) -> list[tuple[Any, Any]]:
    try:
        return _internals.dml_values(stmt)
    except InternalsChanged as err:
        pytest.fail(f"{err}")


def test_dml_values_refuses_a_statement_it_cannot_read() -> None:
    """A statement class with neither known layout raises, naming SQLAlchemy and the
    attribute: returning no values let an illegal move through the guard (fail open)."""

    class Moved:
        values_by_key: tuple[Any, ...] = ()  # what a release might call it instead

    with pytest.raises(InternalsChanged) as info:
        _internals.dml_values(Moved())
    assert info.value.library == "SQLAlchemy"
    assert "Moved._values" in str(info.value)
    assert "_ordered_values" in str(info.value)

    class NotAMapping:
        _values = (("status", "completed"),)  # the 2.1 name, holding something else
        _maintain_values_ordering = False

    with pytest.raises(InternalsChanged, match="as a mapping"):
        _internals.dml_values(NotAMapping())


def test_with_dml_value_replaces_a_value_where_it_stands() -> None:
    """The value of a key is replaced in its place (values() and ordered_values() alike), a
    key the statement lacks is added last; the statement given is left as it was."""
    message = _says(
        "SQLAlchemy",
        "Update._values / _ordered_values / _maintain_values_ordering / Generative._generate",
        "with_dml_value",
        "the bulk-UPDATE transition guard can't write a SQL expression's state once per row",
    )
    for stmt in (
        sa.update(Task).values(title="t", status="completed"),
        sa.update(Task).ordered_values((Task.title, "t"), (Task.status, "completed")),
    ):
        [_, (status, old)] = _dml(stmt)
        try:
            changed = _internals.with_dml_value(stmt, status, sa.literal("pending"))
            added = _internals.with_dml_value(
                sa.update(Task).ordered_values((Task.title, "t")), Task.status, sa.null()
            )
        except InternalsChanged as err:
            pytest.fail(f"{err}")
        got = [(getattr(k, "key", k), getattr(v, "value", v)) for k, v in _dml(changed)]
        assert got == [("title", "t"), ("status", "pending")], message
        assert _dml(stmt)[1][1] is old, message  # a copy
        assert "SET title='t', status='pending'" in _sql(changed), message
        got = [(getattr(k, "key", k), type(v).__name__) for k, v in _dml(added)]
        assert got == [("title", "BindParameter"), ("status", "Null")], message
        assert _sql(added).startswith("UPDATE tasks SET title='t', status=NULL"), message


def test_with_from_statement_element_runs_another_statement_in_the_wrapper() -> None:
    message = _says(
        "SQLAlchemy",
        "Generative._generate / FromStatement.element",
        "with_from_statement_element",
        "the bulk-UPDATE transition guard refuses every select().from_statement(update())",
    )
    first = sa.update(Task).values(status="completed").returning(Task)
    wrapped = sa.select(Task).from_statement(first)
    second = first.where(Task.title == "t")
    try:
        changed = _internals.with_from_statement_element(wrapped, second)
    except InternalsChanged as err:
        pytest.fail(f"{err}")
    assert type(changed) is type(wrapped), message
    assert changed.element is second, message  # type: ignore[attr-defined]
    assert wrapped.element is first, message  # type: ignore[attr-defined]  # a copy
    assert "WHERE tasks.title" in str(changed.compile(dialect=postgresql.dialect())), message


def test_with_where_replaces_the_criteria() -> None:
    message = _says(
        "SQLAlchemy",
        "DMLWhereBase._where_criteria / Generative._generate",
        "with_where",
        "the bulk-UPDATE transition guard refuses an UPDATE whose criteria are not steady",
    )
    stmt = sa.update(Task).where(sa.func.random() < 0.5).values(status="completed")
    try:
        changed = _internals.with_where(stmt, Task.id == 1, Task.title == "t")
    except InternalsChanged as err:
        pytest.fail(f"{err}")
    assert "WHERE tasks.id = 1 AND tasks.title = 't'" in _sql(changed), message
    assert "random" not in _sql(changed), message
    assert "random" in _sql(stmt), message  # a copy


def _sql(clause: Any) -> str:
    return str(clause.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))


def test_update_loader_criteria_are_those_the_orm_update_compiles() -> None:
    """The criteria read for an ORM UPDATE's ``with_loader_criteria()`` options (an
    expression, or a lambda resolved for the class) are the WHERE SQLAlchemy compiles into
    the UPDATE; none without such options."""
    message = _says(
        "SQLAlchemy",
        "Executable._with_options / ORMOption._is_criteria_option / "
        "LoaderCriteriaOption.get_global_criteria / "
        "bulk_persistence._BulkUDCompileState._adjust_for_extra_criteria",
        "update_loader_criteria",
        "the bulk-UPDATE transition guard judges and locks rows an UPDATE's "
        "with_loader_criteria() leave out (or refuses the UPDATE)",
    )
    mapper = sa.inspect(Task)
    plain = sa.update(Task).where(Task.id == 1).values(status="completed")
    try:
        assert _internals.update_loader_criteria(plain, mapper) == (), message
        for criteria in (Task.title == "t", lambda cls: cls.title == "t"):
            stmt = plain.options(with_loader_criteria(Task, criteria))
            found = _internals.update_loader_criteria(stmt, mapper)
            assert [_sql(c) for c in found] == ["tasks.title = 't'"], message
            assert _sql(stmt).endswith(f"WHERE tasks.id = 1 AND {_sql(found[0])}"), message
    except InternalsChanged as err:
        pytest.fail(f"{message}: {err}")


def test_update_loader_criteria_refuses_a_statement_it_cannot_read() -> None:
    class Moved:  # a release keeping a statement's options elsewhere
        pass

    with pytest.raises(InternalsChanged, match=r"Executable\._with_options"):
        _internals.update_loader_criteria(Moved(), sa.inspect(Task))


def test_is_anonymous_bind_tells_a_values_literal_from_a_named_bindparam() -> None:
    [(_, plain)] = _internals.dml_values(sa.update(Task).values(status="completed"))
    [(_, literal)] = _internals.dml_values(sa.update(Task).values(status=sa.literal("x")))
    [(_, named)] = _internals.dml_values(sa.update(Task).values(status=sa.bindparam("new")))
    message = _says(
        "SQLAlchemy",
        "sqlalchemy.sql.elements._anonymous_label",
        "is_anonymous_bind",
        "an execution parameter named after the status no longer replaces a values() literal "
        "in what the bulk-UPDATE guard checks",
    )
    assert isinstance(plain, sa.BindParameter), message
    assert _internals.is_anonymous_bind(plain), message
    assert _internals.is_anonymous_bind(literal), message
    assert not _internals.is_anonymous_bind(named), message


def test_empty_result_is_an_empty_result() -> None:
    result = _internals.empty_result()
    message = _says(
        "SQLAlchemy",
        "sqlalchemy.engine.result.null_result",
        "empty_result",
        "a bulk UPDATE by primary key whose every row is refused returns no Result",
    )
    assert isinstance(result, sa.Result), message
    assert result.all() == [], message


@dataclasses.dataclass
class _Point:
    x: int
    y: int


class _ShapeBase(DeclarativeBase):
    pass


class _Shape(_ShapeBase):
    __tablename__ = "internals_shapes"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[_Point] = composite(mapped_column("x"), mapped_column("y"))


def test_expand_composites_spreads_a_composite_as_bulk_persistence_does() -> None:
    """A bulk UPDATE by primary key naming a composite attribute: its values are read as the
    columns' SQLAlchemy sends (a dataclass's by the accessor SQLAlchemy generates)."""
    message = _says(
        "SQLAlchemy",
        "Composite._populate_composite_bulk_save_mappings_fn",
        "expand_composites",
        "a status given inside a composite in a bulk UPDATE by primary key is not read",
    )
    mapper = sa.inspect(_Shape)
    given = {"id": 1, "at": _Point(3, 4)}
    assert _internals.expand_composites(mapper, given) == {"id": 1, "x": 3, "y": 4}, message
    assert given == {"id": 1, "at": _Point(3, 4)}  # the caller's set is left as it was
    plain = {"id": 1}
    assert _internals.expand_composites(mapper, plain) is plain


def test_flush_pk_bind_name_is_what_the_flush_binds_its_update_by(pg_url: str) -> None:
    """The compare-and-set finds the primary key among the flush UPDATE's parameters under
    this name (else it checks the rows under lock first: correct, a round trip more)."""
    engine = sa.create_engine(pg_url)
    seen: list[dict[str, Any]] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def note(*args: Any) -> None:
        statement, context = args[2], args[4]
        if statement.startswith("UPDATE tasks"):
            seen.extend(context.compiled_parameters)

    try:
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            task = Task(idem_key=uuid.uuid4().hex, title="t", status="pending")
            s.add(task)
            s.commit()
            task.title = "u"
            s.commit()
        name = _internals.flush_pk_bind_name(Task.__table__.c.id)
        assert seen, "the flush sent no UPDATE"
        assert name in seen[0], _says(
            "SQLAlchemy",
            "ColumnElement._label, the ORM flush's primary-key bind names",
            "flush_pk_bind_name",
            f"the flush's UPDATE binds {sorted(seen[0])}, not {name!r}: every guarded flush "
            "checks its rows under lock first (correct, a round trip more)",
        )
    finally:
        engine.dispose()


def test_attribute_history_reads_a_change_without_loading() -> None:
    task = Task(idem_key="k", title="t", status="pending")
    state = sa.inspect(task)
    history = _internals.attribute_history(state, "status")
    message = _says(
        "SQLAlchemy",
        "InstanceState.manager[key].impl.get_history / sqlalchemy.orm.base",
        "attribute_history",
        "the flush transition guard cannot read a status change",
    )
    assert list(history.added) == ["pending"], message
    # SQLAlchemy's symbol (an alias of the public NO_VALUE in 2.x), not a stand-in of ours
    assert _internals.NEVER_SET is NO_VALUE or "NEVER_SET" in repr(_internals.NEVER_SET), message


class _Color(enum.Enum):
    RED = "r"
    GREEN = "g"
    CRIMSON = "r"  # noqa: PIE796 - an alias of RED


class _Text(str, enum.Enum):
    DRAFT = "draft"
    DONE = "done"


@pytest.mark.parametrize(
    "enum_type",
    [
        sa.Enum("a", "b", name="plain"),
        sa.Enum(_Color, name="color"),
        sa.Enum(_Color, name="color_aliases", omit_aliases=False),
        sa.Enum(_Color, name="color_values", values_callable=lambda c: [m.value for m in c]),
        sa.Enum(_Text, name="text"),
        sa.Enum(_Text, name="text_values", values_callable=lambda c: [m.value for m in c]),
        sa.Enum(_Text, name="text_strict", validate_strings=True),
    ],
    ids=lambda t: t.name,
)
def test_enum_db_values_binds_as_sqlalchemy_does(enum_type: sa.Enum) -> None:
    """The guard reads an Enum's database values from the public ``enums`` / ``enum_class``;
    SQLAlchemy's own lookup (``Enum._db_value_for_elem``, read here only to compare) agrees."""
    ours = enum_db_values(enum_type)
    members = list(enum_type.enum_class) if enum_type.enum_class is not None else []
    candidates = [*members, *enum_type.enums, "no such state"]
    if enum_type.enum_class is not None:
        candidates.extend(m.value for m in enum_type.enum_class)
        candidates.extend(enum_type.enum_class.__members__)
    private: Any = enum_type
    for value in candidates:
        try:
            theirs = private._db_value_for_elem(value)
        except LookupError:
            theirs = None
        if theirs is not None and theirs not in enum_type.enums:
            theirs = None  # an unknown string passed through: no state
        assert ours.get(value) == theirs, (value, ours, theirs)


# -- the bulk-UPDATE guard never lets an illegal move through --------------------------------


@pytest.fixture
def tasks_engine(pg_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_url)
    Base.metadata.create_all(engine)  # no trigger: the ORM guard is the only one
    yield engine
    engine.dispose()


def _pending_task(engine: sa.Engine) -> int:
    with engine.begin() as conn:
        found = conn.execute(
            sa.insert(Task)
            .values(idem_key=uuid.uuid4().hex, title="t", status="pending")
            .returning(Task.id)
        ).scalar_one()
    return int(found)


def _status(engine: sa.Engine, task_id: int) -> str:
    with engine.connect() as conn:
        return str(conn.execute(sa.select(Task.status).where(Task.id == task_id)).scalar_one())


@pytest.mark.parametrize("form", ["values", "ordered_values"])
def test_an_illegal_bulk_update_is_refused_in_either_form(
    tasks_engine: sa.Engine, form: str
) -> None:
    """``pending -> completed`` is illegal: the guard leaves the row as it was, whether the
    UPDATE says ``values()`` or ``ordered_values()`` (stored differently by SQLAlchemy 2.0 and
    2.1)."""
    sessions = rdb.ResilientSession(tasks_engine, service="internals")
    task_id = _pending_task(tasks_engine)

    def unit(s: Session) -> None:
        stmt = sa.update(Task).where(Task.id == task_id)
        if form == "values":
            stmt = stmt.values(status="completed")
        else:
            stmt = stmt.ordered_values((Task.title, "moved"), (Task.status, "completed"))
        s.execute(stmt)

    sessions.run(unit)
    assert _status(tasks_engine, task_id) == "pending"


def test_a_bulk_update_the_guard_cannot_read_is_refused(
    tasks_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If SQLAlchemy stores an UPDATE's values where the guard does not look, the UPDATE is
    refused with an error naming SQLAlchemy and the attribute, and the row keeps its status
    (it was committed as ``completed``: the guard read no values and let it through)."""
    from resilient_db.transitions import _bulk  # noqa: PLC0415

    def moved(stmt: Any) -> list[tuple[Any, Any]]:
        class Update:  # what a release that renamed both attributes would hand over
            pass

        return _internals.dml_values(Update())

    monkeypatch.setattr(_bulk, "dml_values", moved)
    sessions = rdb.ResilientSession(tasks_engine, service="internals")
    task_id = _pending_task(tasks_engine)
    stmt = sa.update(Task).where(Task.id == task_id).values(status="completed")
    with pytest.raises(InternalsChanged, match=r"SQLAlchemy .* no longer has Update\._values"):
        sessions.run(lambda s: s.execute(stmt))
    assert _status(tasks_engine, task_id) == "pending"


# -- SQLAlchemy: the factory's own session class ---------------------------------------------


def test_sessionmaker_class_is_the_factorys_own() -> None:
    class MySession(Session):
        pass

    engine = sa.create_engine("postgresql+psycopg://u:p@127.0.0.1:1/db")  # never connected
    a = rdb.ResilientSession(engine, service="a", class_=MySession)
    b = rdb.ResilientSession(engine, service="b", class_=MySession)
    plain = rdb.ResilientSession(engine, service="plain")
    for factory in (a, b, plain):
        assert factory.class_ not in (MySession, Session), factory.class_
    assert a.class_ is not b.class_
    assert issubclass(a.class_, MySession)
    assert issubclass(plain.class_, Session)
    assert "_resilient_db_factory" not in vars(Session)
    assert "_resilient_db_factory" not in vars(MySession)
    assert sessionmaker(class_=MySession).class_ is not MySession, _says(
        "SQLAlchemy",
        "sessionmaker.__init__ making a subclass per factory",
        "own_session_class",
        "nothing (resilient_db makes the class itself); update the docstring",
    )


def test_factories_own_their_class_when_sessionmaker_keeps_it_as_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Were ``sessionmaker`` to keep ``class_`` as given (it makes a subclass per factory
    today, undocumented), factory A's sessions would be B's and a plain ``Session()`` a
    resilient factory's: the factory makes its class itself."""
    from resilient_db._registry import factory_of  # noqa: PLC0415

    made = sessionmaker.__init__

    def keeps_the_class(self: Any, *args: Any, **kwargs: Any) -> None:
        given = kwargs.get("class_", Session)
        made(self, *args, **kwargs)
        self.class_ = given

    monkeypatch.setattr(sessionmaker, "__init__", keeps_the_class)
    engine = sa.create_engine("postgresql+psycopg://u:p@127.0.0.1:1/db")  # never connected
    a = rdb.ResilientSession(engine, service="orders")
    b = rdb.ResilientSession(engine, service="billing")
    assert "_resilient_db_factory" not in vars(Session)
    assert factory_of(Session(engine)) is None
    with a() as s:
        assert factory_of(s) is a
    with b() as s:
        assert factory_of(s) is b


def test_async_sessionmaker_class_is_the_factorys_own() -> None:
    """An async factory's ``Session.class_`` is a subclass of the class given, made for it, as
    a sync factory's (SQLAlchemy's ``async_sessionmaker`` uses the class as it is): its drop-in
    ``async with`` blocks note what they commit, and your class, and ``AsyncSession``, are left
    as they are. ``isinstance``, ``configure()`` and ``async_scoped_session`` work as with
    ``async_sessionmaker``."""

    class MyAsyncSession(AsyncSession):
        pass

    engine = create_async_engine("postgresql+asyncpg://u:p@127.0.0.1:1/db")  # never connected
    a = rdb.AsyncResilientSession(engine, service="a", class_=MyAsyncSession)
    b = rdb.AsyncResilientSession(engine, service="b", class_=MyAsyncSession)
    plain = rdb.AsyncResilientSession(engine, service="plain")
    for factory in (a, b, plain):
        assert factory.class_ not in (MyAsyncSession, AsyncSession), factory.class_
    assert a.class_ is not b.class_
    assert issubclass(a.class_, MyAsyncSession)
    assert issubclass(plain.class_, AsyncSession)
    for attribute in ("__name__", "__qualname__", "__module__"):
        assert getattr(a.class_, attribute) == getattr(MyAsyncSession, attribute)
    assert "__aexit__" in vars(a.class_)  # (the noting one)
    assert "__aenter__" not in vars(MyAsyncSession)
    assert "__aexit__" not in vars(MyAsyncSession)
    assert not hasattr(AsyncSession.__aexit__, "_rdb_noting")
    a.configure(expire_on_commit=False)
    session = a()
    assert type(session) is a.class_
    assert isinstance(session, MyAsyncSession)
    assert session.sync_session.expire_on_commit is False
    scoped = async_scoped_session(a, scopefunc=lambda: "one")
    assert isinstance(scoped(), MyAsyncSession)
    assert repr(a).startswith("AsyncResilientSession(service='a', class_='MyAsyncSession', ")


# -- asyncpg ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _asyncpg_driver(
    url: str, **connect_args: Any
) -> AsyncIterator[tuple[AsyncConnection, Any]]:
    """A connection of an engine of its own, and that connection's asyncpg connection;
    closed, and the engine disposed of, at the end."""
    engine = create_async_engine(url, connect_args=connect_args, poolclass=sa.NullPool)
    try:
        async with engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            assert isinstance(driver, asyncpg.Connection)
            yield conn, driver
    finally:
        await engine.dispose()


@pytest.mark.asyncio
async def test_asyncpg_socket_fd_is_the_connections_socket(
    pg_server: PostgresServer, pg_database: str
) -> None:
    """The descriptor is the socket this connection talks to its backend on (the server sees
    the client's port the socket is bound to)."""
    async with _asyncpg_driver(pg_server.url(pg_database, driver="asyncpg")) as (conn, driver):
        client_port = (await conn.exec_driver_sql("SELECT inet_client_port()")).scalar_one()
        fd = _internals.asyncpg_socket_fd(driver)
        message = _says(
            "asyncpg",
            "Connection._transport",
            "asyncpg_socket_fd",
            "the checkout probe cannot tell a terminated backend from a live one",
        )
        assert isinstance(fd, int), message
        assert fd >= 0, message
        with socket.socket(fileno=os.dup(fd)) as sock:
            assert sock.getsockname()[1] == client_port, message


@pytest.mark.asyncio
async def test_asyncpg_abort_socket_closes_what_a_cut_close_left_open(
    fault_proxy: FaultProxy, pg_database: str
) -> None:
    """A graceful close cut short while it waits for the cancel of a statement cut off (the
    proxy forwards nothing: neither the cancel nor an answer comes) leaves the connection
    closed for asyncpg, and on asyncpg 0.30 its socket open, which ``terminate()`` no longer
    closes; the helper closes it, the connection still referenced (no garbage collector at
    work)."""
    url = fault_proxy.url(pg_database, driver="asyncpg")
    async with _asyncpg_driver(url) as (_conn, driver):
        message = _says(
            "asyncpg",
            "Connection._transport",
            "asyncpg_abort_socket",
            "a connection whose graceful close was cut short (a stalled server, a cancelled "
            "unit) keeps its socket open on asyncpg 0.30",
        )
        fd = _internals.asyncpg_socket_fd(driver)
        link = f"/proc/self/fd/{fd}"
        its_socket = os.readlink(link)

        def closed() -> bool:
            try:
                return os.readlink(link) != its_socket
            except FileNotFoundError:
                return True

        fault_proxy.blackhole()
        try:
            with pytest.raises(asyncio.TimeoutError):
                await driver.execute("SELECT 1", timeout=0.05)
            closing = asyncio.ensure_future(driver.close(timeout=60))
            await wait_for_async(driver.is_closed, "the close begun")
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
            driver.terminate()  # (public: does nothing more for a connection closed already)
            _internals.asyncpg_abort_socket(driver)
            await wait_for_async(closed, message)
            _internals.asyncpg_abort_socket(driver)  # (again: harmless)
        finally:
            fault_proxy.restore()


@pytest.mark.asyncio
async def test_asyncpg_refuses_a_simple_query_before_it_writes_it(
    pg_server: PostgresServer, fault_proxy: FaultProxy, pg_database: str
) -> None:
    """asyncpg's ``InternalClientError`` for a COMMIT it refused to start (it has read the
    FATAL message of a session the server ended, not yet the socket's close, which the proxy
    holds back) is raised through the method that writes a simple query, before it writes:
    the classifier takes such a COMMIT for one never sent (replayed), by that method's name
    in the error's traceback; the same class raised anywhere else, whatever its text, is not
    one."""
    module, function = _internals.ASYNCPG_SIMPLE_QUERY
    message = _says(
        "asyncpg",
        f"{module}.CoreProtocol.{function}",
        "ASYNCPG_SIMPLE_QUERY",
        "a COMMIT asyncpg refused to send, its server session ended, is taken for one whose "
        "answer was lost (an unknown outcome: a drop-in block's is not replayed)",
    )
    # the method checks and switches the protocol's state first, and writes last
    spec = importlib.util.find_spec("asyncpg.protocol")
    assert spec is not None, message
    assert spec.submodule_search_locations is not None, message
    pyx = os.path.join(next(iter(spec.submodule_search_locations)), "coreproto.pyx")
    assert os.path.exists(pyx), message
    with open(pyx, encoding="utf-8") as f:
        source = f.read()
    body = source.partition(f"cdef {function}(self")[2].partition("\n    cdef ")[0]
    checks = [body.find("self._ensure_connected()"), body.find("self._set_state(")]
    assert -1 not in checks, message
    assert max(checks) < body.find("self._write(buf)"), message

    url = fault_proxy.url(pg_database, driver="asyncpg")
    async with _asyncpg_driver(url) as (_conn, driver):
        try:
            await driver.execute("BEGIN")
            pid = await driver.fetchval("SELECT pg_backend_pid()")
            fault_proxy.delay_closes(60)
            pg_server.execute(f"SELECT pg_terminate_backend({int(pid)})")
            await wait_for_async(lambda: fault_proxy.closes_delayed == 1, "the close held back")
            for _ in range(3):  # the event loop reads what the proxy delivered
                await asyncio.sleep(0)
            with pytest.raises(asyncpg.InternalClientError) as refused:
                await driver.execute("COMMIT")
        finally:
            fault_proxy.restore()
    assert _classify.never_sent(refused.value), message
    with pytest.raises(asyncpg.InternalClientError) as elsewhere:
        raise asyncpg.InternalClientError(str(refused.value))
    assert not _classify.never_sent(elsewhere.value)


@pytest.mark.asyncio
async def test_the_checkout_probe_refuses_an_asyncpg_connection_it_cannot_read() -> None:
    """An asyncpg whose connection keeps its transport under another name: the probe raises,
    naming asyncpg and the attribute (it found "no socket" and called every connection,
    a terminated backend's too, alive)."""

    class Renamed:  # asyncpg's Connection, as a release that renamed _transport would have it
        transport_renamed = None

        def is_closed(self) -> bool:
            return False

    class Adapted:  # SQLAlchemy's adapter around it
        driver_connection = Renamed()

    with pytest.raises(InternalsChanged, match=r"asyncpg .* no longer has Connection\._transport"):
        connection_looks_dead(Adapted(), {})
    with pytest.raises(InternalsChanged, match=r"Connection\._transport"):
        dead_probe(Adapted(), {})()


@pytest.mark.asyncio
async def test_asyncpg_command_timeout_is_what_asyncpg_enforces(
    pg_server: PostgresServer, pg_database: str
) -> None:
    url = pg_server.url(pg_database, driver="asyncpg")
    async with _asyncpg_driver(url) as (_conn, driver):
        message = _says(
            "asyncpg",
            "Connection._config.command_timeout",
            "asyncpg_command_timeout",
            "the check's COMMIT is not cut off after its wait for synchronous standbys",
        )
        # asyncio.TimeoutError: asyncpg's, the builtin TimeoutError only since Python 3.11
        with _internals.asyncpg_command_timeout(driver, 0.2), pytest.raises(asyncio.TimeoutError):
            await driver.fetchval("SELECT pg_sleep(2)")
        assert await driver.fetchval("SELECT 1 FROM pg_sleep(0.4)"), message


@pytest.mark.asyncio
async def test_asyncpgs_per_call_timeout_overrides_command_timeout(
    pg_server: PostgresServer, pg_database: str
) -> None:
    """The claim relies on it (public asyncpg API: ``timeout=`` of ``fetchval``), sent
    through SQLAlchemy's public ``AdaptedConnection.run_async``."""
    url = pg_server.url(pg_database, driver="asyncpg")
    engine = create_async_engine(url, connect_args={"command_timeout": 0.2}, poolclass=sa.NullPool)
    try:
        async with engine.connect() as conn:
            raw: Any = await conn.get_raw_connection()

            def slow(adapted: Any) -> Any:
                return adapted.run_async(
                    lambda driver: driver.fetchval("SELECT 1 FROM pg_sleep(0.5)", timeout=5)
                )

            assert await conn.run_sync(lambda _: slow(raw.dbapi_connection))
            with pytest.raises(asyncio.TimeoutError):  # (the builtin one since Python 3.11)
                await raw.driver_connection.fetchval("SELECT pg_sleep(0.5)")
    finally:
        await engine.dispose()


@pytest.mark.asyncio
async def test_asyncpg_statement_connection_is_the_statements_connection(
    pg_server: PostgresServer, pg_database: str
) -> None:
    async with _asyncpg_driver(pg_server.url(pg_database, driver="asyncpg")) as (_conn, driver):
        statement = await driver.prepare("SELECT 1")
        assert _internals.asyncpg_statement_connection(statement) is driver, _says(
            "asyncpg",
            "PreparedStatement._connection",
            "asyncpg_statement_connection",
            "writes through a prepared statement are not noted against their unit (a lost "
            "COMMIT answer of such a unit ends unknown)",
        )


@pytest.mark.asyncio
async def test_asyncpg_address_is_where_it_connected(
    pg_server: PostgresServer, pg_database: str
) -> None:
    async with _asyncpg_driver(pg_server.url(pg_database, driver="asyncpg")) as (_conn, driver):
        addr = _internals.asyncpg_address(driver)
        assert isinstance(addr, tuple), _says(
            "asyncpg",
            "Connection._addr",
            "asyncpg_address",
            "a read-only standby's error names 'an unknown address' instead of the standby",
        )
        assert addr[1] == pg_server.port


def test_the_async_creator_keyword_is_what_sqlalchemys_asyncpg_adapter_takes() -> None:
    from sqlalchemy.dialects.postgresql import asyncpg as sa_asyncpg  # noqa: PLC0415

    source = inspect.getsource(sa_asyncpg.AsyncAdapt_asyncpg_dbapi.connect)
    assert f'"{_internals.ASYNC_CREATOR_KWARG}"' in source, _says(
        "SQLAlchemy",
        "AsyncAdapt_asyncpg_dbapi.connect(async_creator_fn=)",
        "ASYNC_CREATOR_KWARG",
        "every asyncpg connect fails (the keyword reaches asyncpg.connect)",
    )


# -- SQLAlchemy: the rest --------------------------------------------------------------------


def test_sa_await_is_sqlalchemys_greenlet_bridge(pg_server: PostgresServer) -> None:
    import sqlalchemy.util as sa_util  # noqa: PLC0415

    known = [getattr(sa_util, name, None) for name in ("await_", "await_only")]
    message = _says(
        "SQLAlchemy",
        "sqlalchemy.util.await_ / await_only",
        "sa_await",
        "async units cannot back off, flush or commit from SQLAlchemy's greenlet",
    )
    assert _internals.sa_await in [k for k in known if k is not None], message

    async def inside() -> str:
        engine = create_async_engine(pg_server.url(driver="asyncpg"), poolclass=sa.NullPool)
        try:
            async with engine.connect() as conn:
                return str(
                    await conn.run_sync(lambda _: _internals.sa_await(asyncio.sleep(0, "awaited")))
                )
        finally:
            await engine.dispose()

    assert asyncio.run(inside()) == "awaited", message


def test_session_binds_are_what_the_session_was_given() -> None:
    engine = sa.create_engine("postgresql+psycopg://u:p@127.0.0.1:1/db")  # never connected
    other = sa.create_engine("postgresql+psycopg://u:p@127.0.0.1:1/other")
    session = Session(binds={Task: engine})
    session.bind_table(sa.Table("elsewhere", sa.MetaData()), other)
    message = _says(
        "SQLAlchemy",
        "Session.binds (2.1) / Session.__binds (2.0)",
        "session_binds",
        "a unit cannot tell that it must join its caller's transaction",
    )
    assert set(map(id, _internals.session_binds(session))) == {id(engine), id(other)}, message
    assert list(_internals.session_binds(Session(engine))) == [], message


def test_transaction_connections_are_those_the_transaction_began_on(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    other = sa.create_engine(pg_url)
    message = _says(
        "SQLAlchemy",
        "SessionTransaction.connections (2.1.7+) / SessionTransaction._connections",
        "transaction_connections",
        "bypass_transitions() cannot reach the connections a session's transaction began on",
    )
    try:
        with Session(engine, binds={Task: other}) as session:
            session.execute(sa.text("SELECT 1"))
            transaction = session.get_transaction()
            assert transaction is not None
            first = session.connection()
            assert _internals.transaction_connections(transaction) == {first}, message
            second = session.connection(bind_arguments={"mapper": sa.inspect(Task)})
            assert second is not first
            session.begin_nested()  # the root's, not the savepoint's
            found = _internals.transaction_connections(transaction)
            assert found == {first, second}, message
    finally:
        engine.dispose()
        other.dispose()


def test_fire_after_commit_tells_class_and_instance_listeners() -> None:
    class Listened(Session):
        pass

    heard: list[str] = []
    sa.event.listen(Listened, "after_commit", lambda s: heard.append("class"))
    session = Listened()
    sa.event.listen(session, "after_commit", lambda s: heard.append("instance"))
    _internals.fire_after_commit(session)
    assert sorted(heard) == ["class", "instance"], _says(
        "SQLAlchemy",
        "Session.dispatch.after_commit(session)",
        "fire_after_commit",
        "after_commit listeners (an outbox, a cache) miss a COMMIT proven committed",
    )


def test_prime_class_listeners_files_a_classs_listeners_before_its_first_session() -> None:
    """What a first session of the class would file (the collections its sessions read,
    with the bases' listeners in them) is filed by the priming alone, before any session:
    the first sessions of several threads then take the filled collections, none an empty
    one being filled (tests/test_cold_start.py shows the race itself)."""

    class Listened(Session):
        pass

    def listener(session: Session, transaction: Any) -> None:
        pass

    sa.event.listen(Listened, "after_transaction_create", listener)
    own = type("Own", (Listened,), {})
    _internals.prime_class_listeners(own)
    filed = getattr(type(Session.dispatch), "_empty_listener_reg", {}).get(own)
    says = _says(
        "SQLAlchemy",
        "Session.dispatch._for_class(cls) (the class's listener collections, filed)",
        "prime_class_listeners",
        "the first sessions of a factory made in several threads at once may run without "
        "the class's listeners (the transition guard among them)",
    )
    assert filed is not None, says
    assert listener in list(filed["after_transaction_create"].parent_listeners), says


def test_event_keys_are_those_sqlalchemys_registry_files_and_forgets() -> None:
    """The keys of a class's listeners are the registry's (a class listening adds them) and
    forgetting them removes what that class added, nothing else (another class's listener of
    the same function stays)."""
    from sqlalchemy.event import registry  # noqa: PLC0415 - the private registry, counted

    def listener(session: Any, transaction: Any, connection: Any) -> None: ...

    class Listened(Session):
        pass

    class Other(Session):
        pass

    sa.event.listen(Other, "after_begin", listener)
    before = len(registry._key_to_collection)
    sa.event.listen(Listened, "after_begin", listener)
    keys = _internals.event_keys(Listened, [("after_begin", listener)])
    message = _says(
        "SQLAlchemy",
        "event.registry._EventKey / _key_to_collection / _collection_to_key",
        "event_keys / forget_event_keys",
        "the event registry keeps an entry per class given to a factory for good (a class per "
        "tenant or per test grows the process without bound)",
    )
    assert len(keys) == 1, message
    assert keys[0] in registry._key_to_collection, message
    assert len(registry._key_to_collection) == before + 1, message
    _internals.forget_event_keys(keys)
    assert keys[0] not in registry._key_to_collection, message
    assert len(registry._key_to_collection) == before, message
    assert sa.event.contains(Other, "after_begin", listener), message


def test_server_side_result_tells_a_stream_from_a_buffered_result(pg_url: str) -> None:
    message = _says(
        "SQLAlchemy",
        "FilterResult._real_result, ChunkedIteratorResult.raw, "
        "DefaultExecutionContext._is_server_side",
        "server_side_result",
        "a unit returning a streamed result is not refused, and fails when it is read",
    )
    engine = sa.create_engine(pg_url)
    streamed = {"stream_results": True, "yield_per": 5}
    query = sa.select(sa.func.generate_series(1, 20))
    try:
        with Session(engine) as session:
            for result, server_side in (
                (session.execute(query), False),
                (session.scalars(query), False),
                (session.connection().execute(query).mappings(), False),
                (session.execute(query, execution_options=streamed), True),
                (session.scalars(query, execution_options=streamed), True),
                (session.execute(query, execution_options=streamed).mappings(), True),
                (session.connection().execution_options(**streamed).execute(query), True),
            ):
                assert _internals.server_side_result(result) is server_side, message
                result.close()
    finally:
        engine.dispose()


def test_committed_unclosed_tells_a_transaction_between_its_commit_and_its_close() -> None:
    session = Session()  # (no bind: a transaction without connections commits with no I/O)
    seen: list[bool] = []
    sa.event.listen(
        session, "after_commit", lambda s: seen.append(_internals.committed_unclosed(s))
    )
    message = _says(
        "SQLAlchemy",
        "SessionTransaction._state (COMMITTED)",
        "committed_unclosed",
        "an interruption in a drop-in block's COMMIT step after the server answered it is not "
        "marked saved-then-interrupted",
    )
    assert not _internals.committed_unclosed(session), message  # no transaction
    session.begin()
    assert not _internals.committed_unclosed(session), message  # begun, not committed
    session.commit()
    assert seen == [True], message  # committed, not closed yet: as after_commit listeners run
    assert not _internals.committed_unclosed(session), message  # closed


def test_transaction_committed_unclosed_tells_one_handing_its_connection_back(pg_url: str) -> None:
    """As a committed transaction's close hands its connection back to the pool, SQLAlchemy
    has taken it off its session and not marked it closed yet."""
    message = _says(
        "SQLAlchemy",
        "SessionTransaction._state (COMMITTED) as its close checks its connections in",
        "transaction_committed_unclosed",
        "an interruption in a drop-in block's COMMIT step as its connection goes back to the "
        "pool (its reset) is not marked saved-then-interrupted",
    )
    engine = sa.create_engine(pg_url)
    seen: list[tuple[Any, bool]] = []
    try:
        with Session(engine) as session:
            session.execute(sa.text("SELECT 1"))
            transaction = session.get_transaction()
            assert not _internals.transaction_committed_unclosed(transaction), message  # begun

            def checked_in(*_: Any) -> None:
                unclosed = _internals.transaction_committed_unclosed(transaction)
                seen.append((session.get_transaction(), unclosed))

            sa.event.listen(engine, "checkin", checked_in)
            session.commit()
            assert seen == [(None, True)], message
            assert not _internals.transaction_committed_unclosed(transaction), message  # closed
        assert not _internals.transaction_committed_unclosed(None), message
    finally:
        engine.dispose()


def test_commit_returned_tells_an_error_after_the_commits_from_one_before() -> None:
    message = _says(
        "SQLAlchemy",
        "SessionTransaction._state (COMMITTED, CLOSED)",
        "commit_returned",
        "an error raised by an after_commit listener after a unit's COMMIT succeeded is settled "
        "as a failed COMMIT, and may be replayed",
    )
    for event_name, failing in (
        ("before_commit", False),
        ("after_commit", True),
        ("after_transaction_end", True),
    ):
        session = Session()  # (no bind: a transaction without connections commits with no I/O)
        transaction = session.begin()

        def fail(*_: Any) -> None:
            raise RuntimeError("a listener failed")

        sa.event.listen(session, event_name, fail)
        with pytest.raises(RuntimeError):
            session.commit()
        returned = _internals.commit_returned(transaction, prepared_committed=False)
        assert returned is failing, (event_name, message)


def test_commit_flushes_reads_the_sessions_before_commit_listeners() -> None:
    message = _says(
        "SQLAlchemy",
        "Session.dispatch.before_commit",
        "commit_flushes",
        "a unit's before_commit listeners see a flushed session",
    )
    session = Session()
    assert not _internals.commit_flushes(session), message
    sa.event.listen(session, "before_commit", lambda s: None)
    assert _internals.commit_flushes(session), message

    class Own(Session):
        def commit(self) -> None:
            super().commit()

    assert _internals.commit_flushes(Own()), message


def test_last_do_connect_tells_the_order_of_listeners() -> None:
    engine = sa.create_engine("postgresql+psycopg://u:p@127.0.0.1:1/db")  # never connected

    def first(*args: Any) -> None:
        pass

    def second(*args: Any) -> None:
        pass

    message = _says(
        "SQLAlchemy",
        "iterating dialect.dispatch.do_connect",
        "last_do_connect",
        "the drop-in connect retry cannot tell whether its listener runs last",
    )
    sa.event.listen(engine, "do_connect", first)
    assert _internals.last_do_connect(engine.dialect, first), message
    sa.event.listen(engine, "do_connect", second)
    assert not _internals.last_do_connect(engine.dialect, first), message
    assert _internals.last_do_connect(engine.dialect, second), message


def test_raised_by_commit_impl_recognises_a_failed_commit(pg_url: str) -> None:
    """A deferred constraint fails at COMMIT: ``handle_error`` sees the driver's error with
    SQLAlchemy's ``Connection._commit_impl`` at the head of its traceback."""
    engine = sa.create_engine(pg_url)
    seen: list[bool] = []
    sa.event.listen(
        engine,
        "handle_error",
        lambda ctx: seen.append(_internals.raised_by_commit_impl(ctx.original_exception)),
    )
    table = f"t_internals_{uuid.uuid4().hex[:8]}"
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                f"CREATE TABLE {table} (id int UNIQUE DEFERRABLE INITIALLY DEFERRED)"
            )
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.exec_driver_sql(f"INSERT INTO {table} VALUES (1), (1)")
        assert seen == [True], _says(
            "SQLAlchemy",
            "Connection._commit_impl",
            "raised_by_commit_impl",
            "with self-healing off, a lost COMMIT answer is not recognised as one",
        )
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
        engine.dispose()


# -- psycopg ---------------------------------------------------------------------------------


def test_psycopg_simple_query_runs_every_statement_and_fails_as_psycopg(
    pg_server: PostgresServer, pg_database: str
) -> None:
    message = _says(
        "psycopg",
        "psycopg.generators.execute / Connection.lock / Connection.wait()",
        "psycopg_simple_query",
        "the marked COMMIT of every psycopg unit fails",
    )
    with psycopg.connect(pg_server.conninfo(pg_database)) as conn:
        conn.execute("SELECT 1")  # a transaction open, as a unit's
        results = _internals.psycopg_simple_query(conn, b"SELECT 1; COMMIT")
        assert [r.command_status for r in results] == [b"SELECT 1", b"COMMIT"], message
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE, message
        results = _internals.psycopg_simple_query(conn, b"SELECT no_such_function(); COMMIT")
        error = _internals.psycopg_error_from_result(results[-1], conn)
        assert isinstance(error, psycopg.errors.UndefinedFunction), _says(
            "psycopg",
            "psycopg.errors.error_from_result",
            "psycopg_error_from_result",
            "a failed marked COMMIT raises the wrong error",
        )


@pytest.mark.asyncio
async def test_psycopg_simple_query_async_runs_every_statement(
    pg_server: PostgresServer, pg_database: str
) -> None:
    """The async twin reads the same names on ``AsyncConnection``, a class of its own (its
    ``lock`` an ``asyncio.Lock``, its ``wait()`` a coroutine): canaried there too."""
    message = _says(
        "psycopg",
        "psycopg.generators.execute / AsyncConnection.lock / AsyncConnection.wait()",
        "psycopg_simple_query_async",
        "the marked COMMIT of every unit on psycopg's async connections fails",
    )
    async with await psycopg.AsyncConnection.connect(pg_server.conninfo(pg_database)) as conn:
        await conn.execute("SELECT 1")  # a transaction open, as a unit's
        results = await _internals.psycopg_simple_query_async(conn, b"SELECT 1; COMMIT")
        assert [r.command_status for r in results] == [b"SELECT 1", b"COMMIT"], message
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE, message


def test_psycopg_on_deallocate_all_is_told_when_psycopg_drops_its_statements(
    pg_server: PostgresServer, pg_database: str
) -> None:
    with psycopg.connect(pg_server.conninfo(pg_database), prepare_threshold=0) as conn:
        told: list[bool] = []
        assert _internals.psycopg_on_deallocate_all(conn, lambda: told.append(True)), _says(
            "psycopg",
            "Connection._prepared.clear()",
            "psycopg_on_deallocate_all",
            "after psycopg's DEALLOCATE ALL the next marked COMMIT fails once and is replayed",
        )
        conn.execute("SELECT 1")  # prepared at once (prepare_threshold=0)
        conn.rollback()  # psycopg deallocates what it prepared
        assert told == [True]


def test_psycopg_notify_handler_delivers_a_notification_read_by_hand(
    pg_server: PostgresServer, pg_database: str
) -> None:
    with psycopg.connect(pg_server.conninfo(pg_database), autocommit=True) as conn:
        heard: list[str] = []
        conn.add_notify_handler(lambda n: heard.append(n.payload))
        conn.execute("LISTEN rdb_internals")
        with pg_server.connect(pg_database) as other:
            other.execute("NOTIFY rdb_internals, 'hello'")
        pgconn = conn.pgconn
        for _ in range(100):
            pgconn.consume_input()
            notify = pgconn.notifies()
            if notify is not None:
                break
            time.sleep(0.01)  # the notification on its way (not a backoff)
        assert notify is not None
        handler = _internals.psycopg_notify_handler(pgconn)
        assert handler is not None
        handler(notify)
        assert heard == ["hello"], _says(
            "psycopg",
            "PGconn.notify_handler",
            "psycopg_notify_handler",
            "notifications a pooled connection received while idle are lost",
        )


# -- pybreaker -------------------------------------------------------------------------------


def test_pybreaker_lock_is_the_lock_its_state_setter_holds() -> None:
    cb = pybreaker.CircuitBreaker()
    lock = _internals.pybreaker_lock(cb)
    message = _says(
        "pybreaker",
        "CircuitBreaker._lock",
        "pybreaker_lock / renew_pybreaker_lock",
        "a forked child may hang on a lock a thread of its parent held",
    )
    assert isinstance(lock, type(threading.RLock())), message
    _internals.renew_pybreaker_lock(cb)
    assert _internals.pybreaker_lock(cb) is not lock, message
    assert isinstance(_internals.pybreaker_lock(cb), type(threading.RLock())), message


# -- Flask -------------------------------------------------------------------------------------


def test_flask_after_request_functions_is_the_list_after_this_request_fills_and_flask_runs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """with_self_healing cuts from this list what a failed attempt of a view added: Flask must
    take its callbacks from there when it answers, and nothing else."""
    flask = pytest.importorskip("flask")
    message = _says(
        "flask",
        "RequestContext._after_request_functions",
        "flask_after_request_functions",
        "a view replayed by with_self_healing runs its failed attempts' after_this_request "
        "callbacks too",
    )
    app = flask.Flask(__name__)
    ran: list[str] = []

    def callback(name: str) -> Any:
        def run(response: Any) -> Any:
            ran.append(name)
            return response

        return run

    @app.get("/")
    def view() -> str:
        functions = _internals.flask_after_request_functions()
        assert isinstance(functions, list), message
        count = len(functions)
        flask.after_this_request(callback("taken back"))
        assert len(functions) == count + 1, message
        del functions[count:]
        flask.after_this_request(callback("kept"))
        return "ok"

    assert _internals.flask_after_request_functions() is None  # no request
    with app.app_context():
        assert _internals.flask_after_request_functions() is None  # a CLI command's context
    assert app.test_client().get("/").status_code == 200
    assert ran == ["kept"], message
    with app.test_request_context() as ctx:
        del ctx._after_request_functions
        monkeypatch.setattr(_internals, "_flask_changed_told", False)
        with caplog.at_level(logging.WARNING, logger="resilient_db"):
            assert _internals.flask_after_request_functions() is None  # degraded, said once
            assert _internals.flask_after_request_functions() is None
        ctx._after_request_functions = []
    said = [r.getMessage() for r in caplog.records if "after_this_request" in r.getMessage()]
    assert len(said) == 1
    assert "flask" in said[0]
    assert "no longer has RequestContext" in said[0]


def test_a_missing_private_raises_naming_the_library() -> None:
    class Bare:
        pass

    with pytest.raises(InternalsChanged, match=r"pybreaker .* no longer has CircuitBreaker\._lock"):
        _internals.pybreaker_lock(Bare())
    with pytest.raises(InternalsChanged, match=r"Session\.dispatch\.after_commit"):
        _internals.fire_after_commit(Bare())
    with pytest.raises(InternalsChanged, match=r"Session\.dispatch\._for_class"):
        _internals.prime_class_listeners(Bare)
    with pytest.raises(InternalsChanged, match=r"Session\.binds / Session\.__binds"):
        _internals.session_binds(Bare())
    with pytest.raises(InternalsChanged, match=r"PGconn\.notify_handler"):
        _internals.psycopg_notify_handler(Bare())
    with pytest.raises(AttributeError, match="_connection"):
        _internals.asyncpg_statement_connection(Bare())
    timeout = _internals.asyncpg_command_timeout(Bare(), 1.0)
    with pytest.raises(InternalsChanged, match=r"_config\.command_timeout"):
        timeout.__enter__()
    assert not _internals.psycopg_on_deallocate_all(Bare(), lambda: None)
    assert _internals.asyncpg_address(Bare()) is None


# -- the drivers' objects take the project's subclasses (a behaviour, no private name) --------


@pytest.mark.asyncio
async def test_asyncpg_objects_switch_to_the_projects_subclasses(
    pg_server: PostgresServer, pg_database: str
) -> None:
    """A connection made by an application's ``async_creator`` and every prepared statement
    switch class (``obj.__class__ = ...``), which needs the same layout: a release that gives
    asyncpg's classes a layout the subclasses do not share fails here (TypeError), not at an
    application's ``prepare()``."""
    from resilient_db._commit import _adopt_asyncpg  # noqa: PLC0415
    from resilient_db._statements import MAY_WRITE, _noting_statement_class  # noqa: PLC0415

    async with _asyncpg_driver(pg_server.url(pg_database, driver="asyncpg")) as (_conn, driver):
        _adopt_asyncpg(driver)
        assert getattr(driver, "_rdb_marked", False), (
            "asyncpg's Connection no longer takes resilient_db's marked subclass "
            "(_commit._adopt_asyncpg): connections of an application's async_creator stay "
            "unmarked, and a lost COMMIT answer of their units ends unknown"
        )
        assert await driver.fetchval("SELECT 2") == 2
        statement = await driver.prepare("SELECT 1")
        statement.__class__ = _noting_statement_class(type(statement), MAY_WRITE)
        assert await statement.fetchval() == 1


def test_psycopg_objects_switch_to_the_projects_subclasses(
    pg_server: PostgresServer, pg_database: str
) -> None:
    """psycopg keeps a connection's ``cursor_factory`` in the instance (what marking moves to
    the marked class), and a connection and its cursors switch class."""
    from resilient_db._commit import _mark_psycopg  # noqa: PLC0415
    from resilient_db._statements import marked_cursor_class  # noqa: PLC0415

    with psycopg.connect(pg_server.conninfo(pg_database)) as conn:
        assert "cursor_factory" in vars(conn), (
            "psycopg no longer keeps Connection.cursor_factory in the instance (_commit."
            "_mark_psycopg moves it from there): a marked connection's cursors are not noted"
        )
        cursor = conn.cursor()
        cursor.__class__ = marked_cursor_class(type(cursor))
        assert cursor.execute("SELECT 1").fetchone() == (1,)
        assert _mark_psycopg(conn)
        assert getattr(conn, "_rdb_marked", False)
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_asyncpgs_connect_and_closed_checks_are_where_the_classifier_looks() -> None:
    """The classifier tells "while connecting" and "connection closed" from the frames of a
    bare error asyncpg lets out."""
    import asyncpg.connection  # noqa: PLC0415

    message = _says(
        "asyncpg",
        "asyncpg.connect_utils, asyncpg.connection.connect, Connection._check_open",
        "ASYNCPG_CONNECT_MODULES / ASYNCPG_CONNECT_FUNCTION / ASYNCPG_CLOSED_CHECKS",
        "a connect's timeout or a closed connection's error while connecting is not retried",
    )
    for name in _internals.ASYNCPG_CONNECT_MODULES:
        assert importlib.util.find_spec(name) is not None, message
    module, function = _internals.ASYNCPG_CONNECT_FUNCTION
    assert inspect.isfunction(getattr(importlib.import_module(module), function, None)), message
    for name in _internals.ASYNCPG_CLOSED_CHECKS:
        source = inspect.getsource(getattr(asyncpg.connection.Connection, name))
        assert "if self.is_closed():" in source, message
        assert "InterfaceError" in source, message


def test_asyncpgs_cursor_check_of_its_connection_is_where_the_classifier_looks() -> None:
    """A server-side cursor's fetch on a closed connection is told by the function of asyncpg
    that raised it, under SQLAlchemy's asyncpg adapter."""
    module_name, function = _internals.ASYNCPG_RESOURCE_CHECK
    message = _says(
        "asyncpg",
        f"{module_name}.ConnectionResource.{function}",
        "ASYNCPG_RESOURCE_CHECK",
        "a stream whose backend ended between two fetches is not replayed on asyncpg",
    )
    module = importlib.import_module(module_name)
    source = inspect.getsource(getattr(module.ConnectionResource, function))
    assert "is_closed()" in source, message
    assert "InterfaceError" in source, message
    assert importlib.util.find_spec(_internals.SQLALCHEMY_ASYNCPG_MODULE) is not None, message


def test_engine_of_options_finds_the_engine_of_a_copy() -> None:
    engine = sa.create_engine("postgresql+psycopg://u:p@127.0.0.1:1/db")  # never connected
    copy = engine.execution_options(isolation_level="AUTOCOMMIT")
    message = _says(
        "SQLAlchemy",
        "OptionEngine._proxied",
        "engine_of_options",
        "a factory on an execution_options() copy installs a second set of engine hooks",
    )
    assert _internals.engine_of_options(copy) is engine, message
    assert _internals.engine_of_options(copy.execution_options(logging_token="x")) is engine
    assert _internals.engine_of_options(engine) is engine
