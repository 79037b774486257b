"""The factories are SQLAlchemy's factories: everything that works with ``sessionmaker`` /
``async_sessionmaker`` works with ``ResilientSession`` / ``AsyncResilientSession`` (events on the
factory, ``scoped_session``, ``class_``, ``object_session``, ``identity_key``, ``configure``,
``kw``, your own session class, an ``info`` of your own, the async ORM's helpers in a unit),
and resilient_db's behaviour does not depend on anything a user can clear. Against the real
server."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import gc
import logging
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pybreaker
import pytest
import pytest_asyncio
import sqlalchemy as sa
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from processes import wait_for, wait_for_async
from scenarios import (
    ASYNC_DRIVERS,
    Base,
    Item,
    async_connect_args,
    conflict_after_another_factorys_unit,
    otel_points,
)
from sqlalchemy import event
from sqlalchemy.ext.asyncio import (
    AsyncAttrs,
    AsyncEngine,
    AsyncSession,
    async_object_session,
    async_scoped_session,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    scoped_session,
    sessionmaker,
)

import resilient_db as rdb
import resilient_db._asyncio as rdb_async
import resilient_db._errands as rdb_errands
import resilient_db._session as rdb_session
from resilient_db import _unit
from resilient_db._state import STATE
from resilient_db.examples.tasks import Base as TaskBase
from resilient_db.examples.tasks import Task
from resilient_db.otel import install_opentelemetry, uninstall_opentelemetry
from resilient_db.testing import FaultProxy, PostgresServer
from resilient_db.web import problem_details


class MySession(Session):
    """A user's own session class."""

    def label(self) -> str:
        return "mine"


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    TaskBase.metadata.create_all(eng)
    yield eng
    eng.dispose()


@pytest_asyncio.fixture
async def async_engine(engine: sa.Engine, pg_async_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(pg_async_url)
    yield eng
    await eng.dispose()


# -- sync -----------------------------------------------------------------------------------------
def test_the_factory_is_a_sessionmaker(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, class_=MySession, autoflush=False)
    assert isinstance(Sessions, sessionmaker)
    assert issubclass(Sessions.class_, MySession)
    assert Sessions.kw["autoflush"] is False
    Sessions.configure(expire_on_commit=False)
    with Sessions() as session:
        assert type(session) is Sessions.class_
        assert isinstance(session, MySession)
        assert session.label() == "mine"
        assert session.autoflush is False
        assert session.expire_on_commit is False
        item = Item(name="x")
        session.add(item)
        session.flush()
        assert Sessions.object_session(item) is session
        assert Sessions.identity_key(Item, item.id) == (Item, (item.id,), None)


def test_a_with_block_calls_your_class_s_enter_and_exit_as_they_are_now(
    engine: sa.Engine, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drop-in ``with Session()`` / ``with Session.begin()`` block calls your class's
    ``__enter__`` and ``__exit__`` looked up when it runs, as under ``sessionmaker``: ones
    replaced after the factory was made (``mock.patch.object``, ``monkeypatch.setattr``) are
    called. (The factory called those it found when it was made.)"""

    class Patched(Session):
        pass

    plain = sessionmaker(engine, class_=Patched)
    ours = rdb.ResilientSession(engine, service=service, class_=Patched)
    seen: list[str] = []
    enter, leave = Patched.__enter__, Patched.__exit__

    def entered(session: Session) -> Session:
        seen.append("enter")
        return enter(session)

    def left(session: Session, *exc: Any) -> None:
        seen.append("exit")
        leave(session, *exc)

    monkeypatch.setattr(Patched, "__enter__", entered)
    monkeypatch.setattr(Patched, "__exit__", left)
    for factory in (plain, ours):
        seen.clear()
        with factory() as session:
            session.add(Item(name=f"patched-{factory is ours}"))
            session.commit()
        with factory.begin() as session:
            session.scalar(sa.text("SELECT 1"))
        assert seen == ["enter", "exit", "enter", "exit"]


@pytest.mark.asyncio
async def test_an_async_with_block_calls_your_class_s_aenter_and_aexit_as_they_are_now(
    async_engine: AsyncEngine, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The async twin: ``async with Session()``, and ``Session.begin()``'s close."""

    class Patched(AsyncSession):
        pass

    plain = async_sessionmaker(async_engine, class_=Patched)
    ours = rdb.AsyncResilientSession(async_engine, service=service, class_=Patched)
    seen: list[str] = []
    enter, leave = Patched.__aenter__, Patched.__aexit__

    async def entered(session: AsyncSession) -> AsyncSession:
        seen.append("enter")
        return await enter(session)

    async def left(session: AsyncSession, *exc: Any) -> None:
        seen.append("exit")
        await leave(session, *exc)

    monkeypatch.setattr(Patched, "__aenter__", entered)
    monkeypatch.setattr(Patched, "__aexit__", left)
    for factory in (plain, ours):
        seen.clear()
        async with factory() as session:
            session.add(Item(name=f"patched-{factory is ours}"))
            await session.commit()
        assert seen == ["enter", "exit"]


def test_events_on_the_factory_and_on_scoped_session(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    seen: list[str] = []
    event.listen(Sessions, "before_flush", lambda s, ctx, inst: seen.append("before_flush"))

    @event.listens_for(Sessions, "do_orm_execute")
    def _orm_execute(state: Any) -> None:
        seen.append("do_orm_execute")

    scoped = scoped_session(Sessions)
    event.listen(scoped, "after_commit", lambda s: seen.append("after_commit"))
    try:
        session = scoped()
        session.add(Item(name="evented"))
        session.commit()
        session.execute(sa.select(Item.name)).all()
        session.rollback()
    finally:
        scoped.remove()
    assert seen == ["before_flush", "after_commit", "do_orm_execute"]
    # units see them too
    seen.clear()
    Sessions.run(lambda s: s.add(Item(name="unit")))
    assert seen == ["before_flush", "after_commit"]
    # and they stay on this factory's class: another factory's sessions don't fire them
    seen.clear()
    other = rdb.ResilientSession(engine, service=service)
    other.run(lambda s: s.add(Item(name="other")))
    assert seen == []


def assert_a_lost_answer_is_verified(
    Sessions: rdb.ResilientSession[Session], fault_proxy: FaultProxy, name: str
) -> None:
    """A unit adding an Item ``name`` through ``fault_proxy`` whose COMMIT answer is lost is
    verified: done, run once (not replayed, not unknown)."""
    calls: list[int] = []

    def add(session: Session) -> None:
        calls.append(1)
        session.add(Item(name=name))

    Sessions.run(lambda session: session.execute(sa.text("SELECT 1")))  # connected
    lost_before = fault_proxy.commits_lost
    fault_proxy.lose_commit_answer()
    Sessions.run(add)
    assert fault_proxy.commits_lost == lost_before + 1
    assert calls == [1]


def test_configure_onto_another_engine_keeps_commit_verification_there(
    engine: sa.Engine, pg_database: str, fault_proxy: FaultProxy, service: str
) -> None:
    """``Session.configure(bind=...)`` (a factory made early, bound at start-up) rebound the
    sessions and left the engine hooks behind: a lost COMMIT answer on the new engine ended in
    CommitOutcomeUnknownError instead of being verified."""
    placeholder = sa.create_engine(engine.url)
    proxied = sa.create_engine(fault_proxy.url(pg_database))
    Sessions = rdb.ResilientSession(placeholder, service=service)
    try:
        Sessions.configure(bind=proxied)
        assert Sessions.engine is proxied
        assert Sessions.kw["bind"] is proxied
        assert_a_lost_answer_is_verified(Sessions, fault_proxy, "configured")
        with engine.connect() as conn:
            names = conn.scalars(sa.select(Item.name).where(Item.name == "configured")).all()
        assert names == ["configured"]
    finally:
        proxied.dispose()
        placeholder.dispose()


def test_a_session_given_its_own_bind_gets_the_factorys_engine_hooks_there(
    engine: sa.Engine, pg_server: Any, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``Session(bind=other_engine)``, as sessionmaker takes it for one session: the other
    engine had none of the factory's hooks, so its dead pooled connection was handed to the
    session (OperationalError) instead of being replaced at checkout."""
    other = sa.create_engine(engine.url, pool_size=1, max_overflow=0)
    Sessions = rdb.ResilientSession(engine, service=service)
    try:
        with Sessions(bind=other) as session:
            assert session.execute(sa.text("SELECT 1")).scalar_one() == 1
        assert pg_server.terminate_backends(database=engine.url.database) >= 1
        with caplog.at_level(logging.INFO, logger="resilient_db"), Sessions(bind=other) as s:
            assert s.execute(sa.text("SELECT 2")).scalar_one() == 2
        assert "[SELF-HEAL] Discarded a dead pooled connection" in caplog.text
    finally:
        other.dispose()


def test_a_sessions_own_bind_neither_holds_nor_is_held_to_other_factories_settings(
    engine: sa.Engine, service: str
) -> None:
    """A session's own bind is one session's: the factory is not made one of the engine's
    factories. It tied the engine to its settings (a factory made there later with another
    classifier was refused), and a bind to another factory's engine with other settings was
    refused where sessionmaker takes it."""
    other = sa.create_engine(engine.url)
    Sessions = rdb.ResilientSession(engine, service=service)
    try:
        with Sessions(bind=other) as session:
            assert session.execute(sa.text("SELECT 1")).scalar_one() == 1
        strict = rdb.Classifier().without_codes(["40001"])
        Theirs = rdb.ResilientSession(other, service=f"{service}-b", classifier=strict)
        with Sessions(bind=other) as session:  # their engine, their hooks
            assert session.execute(sa.text("SELECT 2")).scalar_one() == 2
        assert Theirs.run(lambda session: session.execute(sa.text("SELECT 3")).scalar()) == 3
    finally:
        other.dispose()


def test_a_factory_made_without_a_bind_is_bound_later_with_configure(
    engine: sa.Engine, pg_database: str, fault_proxy: FaultProxy, service: str
) -> None:
    """``Session = ResilientSession()`` at import, ``Session.configure(bind=engine)`` at start-up,
    as with ``sessionmaker()``: refused before (a bind was required). Until it is bound, its
    sessions (and units) are unbound as sessionmaker's are; once bound, a lost COMMIT answer is
    verified."""
    Sessions: rdb.ResilientSession[Session] = rdb.ResilientSession(service=service)
    assert Sessions.engine is None
    with Sessions() as session, pytest.raises(sa.exc.UnboundExecutionError):
        session.execute(sa.text("SELECT 1"))
    with pytest.raises(sa.exc.UnboundExecutionError):  # SQLAlchemy's own, in a unit too
        Sessions.run(lambda session: session.execute(sa.text("SELECT 1")))
    assert Sessions.run(lambda session: 5) == 5  # nothing to commit, as with sessionmaker
    rdb.reload_config()  # an unbound factory follows reloads too
    proxied = sa.create_engine(fault_proxy.url(pg_database))
    try:
        Sessions.configure(bind=proxied)
        assert Sessions.engine is proxied
        assert_a_lost_answer_is_verified(Sessions, fault_proxy, "bound-later")
    finally:
        proxied.dispose()
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).where(Item.name == "bound-later")) == 1


def test_a_factory_on_a_connection_joins_its_transaction_in_units_too(
    engine: sa.Engine, service: str
) -> None:
    """SQLAlchemy's recipe for a test's external transaction, given to the constructor:
    refused before (an Engine was required)."""
    with engine.connect() as conn:
        outer = conn.begin()
        Sessions = rdb.ResilientSession(
            conn, service=service, join_transaction_mode="create_savepoint"
        )
        assert Sessions.engine is engine
        Sessions.run(lambda session: session.add(Item(name="in-the-test")))
        with Sessions() as session:
            session.add(Item(name="drop-in"))
            session.commit()
        assert conn.scalar(sa.select(sa.func.count()).where(Item.name.like("%-%"))) == 2
        outer.rollback()
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).where(Item.name.like("%-%"))) == 0


@pytest.mark.parametrize("how", ["made", "configured"])
def test_a_factory_with_binds_only_takes_its_first_engine(
    engine: sa.Engine, service: str, how: str
) -> None:
    if how == "made":
        Sessions = rdb.ResilientSession(service=service, binds={Item: engine})
    else:
        Sessions = rdb.ResilientSession(service=service)
        Sessions.configure(binds={Item: engine})
    assert Sessions.engine is engine
    Sessions.run(lambda session: session.add(Item(name="binds-only")))
    with Sessions() as session:
        assert session.scalars(sa.select(Item.name)).all() == ["binds-only"]


def test_an_engine_a_factory_left_speaks_for_the_factory_still_on_it(
    engine: sa.Engine, pg_server: Any, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two factories on one engine, the later configured onto another: the first engine's
    lines (a dead pooled connection here, in drop-in use) named the one that had left."""
    staying = rdb.ResilientSession(engine, service=f"{service}-staying")
    leaving = rdb.ResilientSession(engine, service=f"{service}-leaving")
    other = sa.create_engine(engine.url)
    try:
        leaving.configure(bind=other)
        with staying() as session:
            session.execute(sa.text("SELECT 1"))
        assert pg_server.terminate_backends(database=engine.url.database) >= 1
        with caplog.at_level(logging.INFO, logger="resilient_db"), staying() as session:
            session.execute(sa.text("SELECT 1"))
        lines = [r.getMessage() for r in caplog.records if "dead pooled" in r.getMessage()]
        assert lines
        assert all(f"service={service}-staying" in line for line in lines), lines
    finally:
        other.dispose()


@pytest.mark.asyncio
async def test_an_async_factory_made_without_a_bind_or_on_a_connection(
    async_engine: AsyncEngine, service: str
) -> None:
    Sessions: rdb.AsyncResilientSession[AsyncSession] = rdb.AsyncResilientSession(service=service)
    assert Sessions.engine is None
    Sessions.configure(bind=async_engine)
    assert Sessions.engine is async_engine

    async def add(session: AsyncSession) -> None:
        session.add(Item(name="async-later"))

    await Sessions.run(add)
    async with async_engine.connect() as conn:
        outer = await conn.begin()
        joined = rdb.AsyncResilientSession(
            conn, service=f"{service}-conn", join_transaction_mode="create_savepoint"
        )
        assert joined.engine is async_engine

        async def add_inside(session: AsyncSession) -> None:
            session.add(Item(name="async-inside"))

        await joined.run(add_inside)
        await outer.rollback()
    async with async_engine.connect() as conn:
        names = (await conn.scalars(sa.select(Item.name).order_by(Item.name))).all()
    assert names == ["async-later"]


def test_the_factorys_repr_is_sessionmakers_with_its_service(service: str) -> None:
    """It showed only the service and the engine given first, not your class, your arguments
    or a bind configured since."""
    first = sa.create_engine("postgresql+psycopg://app:secret@127.0.0.1:1/one")
    later = sa.create_engine("postgresql+psycopg://app:secret@127.0.0.1:1/two")
    Sessions = rdb.ResilientSession(first, service=service, class_=MySession, autoflush=False)
    Sessions.configure(bind=later)
    text = repr(Sessions)
    assert text.startswith(f"ResilientSession(service={service!r}, class_='MySession', ")
    assert "bind=Engine(postgresql+psycopg://app:***@127.0.0.1:1/two)" in text
    assert "autoflush=False" in text
    assert "secret" not in text


def test_configure_refuses_a_bind_of_the_other_kind_and_changes_nothing(
    engine: sa.Engine, pg_async_url: str, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    async_engine = create_async_engine(pg_async_url)
    with pytest.raises(TypeError, match=r"configure\(bind=...\) takes an Engine, got AsyncEngine"):
        Sessions.configure(bind=async_engine)
    with pytest.raises(TypeError, match="takes an Engine, got str"):
        Sessions.configure(bind="postgresql://")
    assert Sessions.engine is engine
    assert Sessions.kw["bind"] is engine
    other = rdb.ResilientSession(
        sa.create_engine(engine.url), service=f"{service}-other", config=rdb.Config(enabled=False)
    )
    with pytest.raises(ValueError, match="different engine-wide settings"):
        Sessions.configure(bind=other.engine)  # its factory disagrees: nothing changed
    assert Sessions.kw["bind"] is engine
    other.engine.dispose()


@pytest.mark.asyncio
async def test_an_applications_sessionmaker_given_as_the_bind_names_the_replacement(
    engine: sa.Engine, async_engine: AsyncEngine, service: str
) -> None:
    """An existing application's factory handed to the resilient one, as if it wrapped it: the
    error says the resilient factory is made in its place, with its engine and keywords."""
    maker = sessionmaker(engine, class_=MySession, autoflush=False, expire_on_commit=False)
    with pytest.raises(TypeError) as refused:
        rdb.ResilientSession(maker, service=service)
    message = str(refused.value)
    assert message.startswith("ResilientSession takes an Engine, got sessionmaker")
    assert "is a sessionmaker itself: make it in place of yours" in message
    assert (
        "rdb.ResilientSession(<its Engine>, autoflush=False, expire_on_commit=False, "
        "class_=MySession)" in message
    )
    with pytest.raises(TypeError, match=r"rdb\.ResilientSession\(<its Engine>\)"):
        rdb.ResilientSession(service=service).configure(bind=sessionmaker(engine))
    async_maker = async_sessionmaker(async_engine, expire_on_commit=False)
    with pytest.raises(TypeError) as refused:
        rdb.AsyncResilientSession(async_maker, service=service)
    message = str(refused.value)
    assert message.startswith("AsyncResilientSession takes an AsyncEngine, got async_sessionmaker")
    assert "is an async_sessionmaker itself: make it in place of yours" in message
    assert "rdb.AsyncResilientSession(<its AsyncEngine>, expire_on_commit=False)" in message
    # one of the other kind is named with the factory of its own kind
    with pytest.raises(TypeError, match=r"rdb\.AsyncResilientSession\(<its AsyncEngine>"):
        rdb.ResilientSession(async_maker, service=service)


def test_configure_onto_a_connection_joins_its_transaction(engine: sa.Engine, service: str) -> None:
    """SQLAlchemy's recipe for a test's external transaction works as with sessionmaker."""
    Sessions = rdb.ResilientSession(engine, service=service)
    with engine.connect() as conn:
        outer = conn.begin()
        Sessions.configure(bind=conn, join_transaction_mode="create_savepoint")
        with Sessions() as session:
            session.add(Item(name="inside"))
            session.commit()  # a savepoint released: the outer transaction stays the caller's
        assert conn.scalar(sa.select(sa.func.count()).where(Item.name == "inside")) == 1
        outer.rollback()
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).where(Item.name == "inside")) == 0


@pytest.mark.asyncio
async def test_async_configure_onto_another_engine_keeps_commit_verification_there(
    async_engine: AsyncEngine, pg_database: str, fault_proxy: FaultProxy, service: str
) -> None:
    proxied = create_async_engine(fault_proxy.url(pg_database, driver="asyncpg"))
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    try:
        with pytest.raises(TypeError, match="takes an AsyncEngine, got Engine"):
            Sessions.configure(bind=proxied.sync_engine)
        Sessions.configure(bind=proxied)
        assert Sessions.engine is proxied
        calls: list[int] = []

        async def add(session: AsyncSession) -> None:
            calls.append(1)
            session.add(Item(name="configured-async"))

        async def connect(session: AsyncSession) -> None:
            await session.execute(sa.text("SELECT 1"))

        await Sessions.run(connect)
        fault_proxy.lose_commit_answer()
        await Sessions.run(add)
        assert fault_proxy.commits_lost == 1
        assert calls == [1]
        async with async_engine.connect() as conn:
            found = await conn.scalar(
                sa.select(sa.func.count()).where(Item.name == "configured-async")
            )
        assert found == 1
    finally:
        await proxied.dispose()


def test_info_is_the_users_and_clearing_it_keeps_the_guard(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, info={"tenant": "a"})
    with Sessions(info={"request": 1}) as session:
        assert session.info == {"tenant": "a", "request": 1}
    with Sessions.begin() as session:
        session.add(Task(id=1, title="t", status="pending", idem_key="k1"))
    with Sessions() as session:
        session.info.clear()
        task = session.get(Task, 1)
        assert task is not None
        task.status = "completed"  # pending -> completed is not allowed
        with pytest.raises(rdb.IllegalTransitionError):
            session.flush()


def test_run_in_refuses_a_session_of_another_factory(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    other = rdb.ResilientSession(engine, service=service)
    with other() as session, pytest.raises(TypeError, match="made by this factory"):
        Sessions.run_in(session, lambda s: None)
    with sessionmaker(engine)() as plain, pytest.raises(TypeError, match="made by this factory"):
        Sessions.run_in(plain, lambda s: None)  # type: ignore[arg-type]
    with Sessions() as session:
        assert Sessions.run_in(session, lambda s: s.execute(sa.select(1)).scalar_one()) == 1


def test_drop_in_connect_retry_never_skips_a_later_do_connect_listener(
    pg_database: str, fault_proxy: Any, service: str
) -> None:
    """The connect retry answers ``do_connect`` only as its last listener: a listener of the
    user's registered after the factory (one that sets connect arguments, say) still runs."""
    engine = sa.create_engine(fault_proxy.url(pg_database))
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        fault_proxy.restore()

    Sessions = rdb.ResilientSession(engine, service=service, sleep=sleep)
    calls: list[str] = []

    @event.listens_for(engine, "do_connect")
    def _set_application_name(dialect: Any, rec: Any, cargs: Any, cparams: Any) -> None:
        calls.append("user")
        cparams["application_name"] = "from-user-listener"

    with Sessions() as session:
        name = session.execute(sa.text("SHOW application_name")).scalar_one()
    assert name == "from-user-listener"
    assert calls == ["user"]
    # the user's listener is last: a refused connect is raised, not retried (and not hidden)
    engine.dispose()
    fault_proxy.refuse()
    with Sessions() as session, pytest.raises(sa.exc.OperationalError):
        session.execute(sa.text("SELECT 1"))
    assert slept == []
    fault_proxy.restore()
    engine.dispose()


def test_dispatch_order_is_readable() -> None:
    """The one SQLAlchemy detail the connect retry relies on (``_last_do_connect``): the
    dialect's ``do_connect`` listeners, in order. Fails loudly if SQLAlchemy changes it."""
    from resilient_db._unit import _last_do_connect  # noqa: PLC0415 - the private helper

    engine = sa.create_engine("postgresql+psycopg://u@127.0.0.1:1/db")

    def first(*_: Any) -> None: ...
    def second(*_: Any) -> None: ...

    event.listen(engine, "do_connect", first)
    assert _last_do_connect(engine.dialect, first)
    event.listen(engine, "do_connect", second)
    assert not _last_do_connect(engine.dialect, first)
    assert _last_do_connect(engine.dialect, second)
    engine.dispose()


def test_the_factories_add_no_connection_event_to_their_engines(
    engine: sa.Engine, pg_async_url: str, service: str
) -> None:
    """Any connection event on an engine (``before_execute``, ``commit_twophase``, ...) makes
    every Connection of it join the engine's event dispatch and run the hooks of every
    statement: about 5 % of a writing unit's client time. The factories listen on the dialect
    and the pool only, a guarded unit included, and wrap the dialect's two-phase methods once
    (an engine made by ``execution_options`` shares its dialect). Reads SQLAlchemy's
    ``_has_events`` flag: fails loudly if that changes."""
    assert engine._has_events is False
    Sessions = rdb.ResilientSession(engine, service=service)
    noted = engine.dialect.do_commit_twophase
    serializable = engine.execution_options(isolation_level="SERIALIZABLE")
    rdb.ResilientSession(serializable, service=service + "-serializable")
    assert engine.dialect.do_commit_twophase is noted

    key = uuid.uuid4().hex

    def add(session: Session) -> int:
        task = Task(idem_key=key, title="t", status="pending")
        session.add_all([task, Item(name="x")])
        session.flush()
        return task.id

    def move(session: Session, task_id: int) -> None:
        task = session.get(Task, task_id)
        assert task is not None
        task.status = "in_progress"  # a guarded move: its UPDATE carries the compare-and-set

    Sessions.run(move, Sessions.run(add))
    assert engine._has_events is False

    async def go() -> None:
        aengine = create_async_engine(pg_async_url)
        try:
            await rdb.AsyncResilientSession(aengine, service=service + "-async").run(_add_async)
            assert aengine.sync_engine._has_events is False
        finally:
            await aengine.dispose()

    asyncio.run(go())


async def _add_async(session: AsyncSession) -> None:
    session.add(Item(name="y"))


def test_factory_docstrings() -> None:
    assert rdb.ResilientSession.__doc__
    assert rdb.AsyncResilientSession.__doc__
    assert "async_sessionmaker" in rdb.AsyncResilientSession.__doc__


_FAST = rdb.Config(initial_delay=0.001, conflict_delay=0.001)
_SERIALIZATION_FAILURE = "SELECT serialization_failure()"


def _install_serialization_failure(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE OR REPLACE FUNCTION serialization_failure() RETURNS void LANGUAGE plpgsql "
            "AS $$ BEGIN RAISE EXCEPTION 'try again' USING ERRCODE = '40001'; END $$"
        )


def _end_own_backend(pg_server: Any, pid: int) -> None:
    pg_server.execute(f"SELECT pg_terminate_backend({int(pid)})")
    wait_for(
        lambda: not pg_server.execute(f"SELECT 1 FROM pg_stat_activity WHERE pid = {int(pid)}"),
        "the terminated backend gone",
    )


def _fail(db: Any, pg_server: Any, fault: str) -> None:
    """The session's statement fails with ``fault``: a real serialization failure, or its
    backend terminated by the server."""
    if fault == "serialization failure":
        db.execute(sa.text(_SERIALIZATION_FAILURE))
    else:
        _end_own_backend(pg_server, db.execute(sa.text("SELECT pg_backend_pid()")).one()[0])
        db.execute(sa.text("SELECT 1"))


@pytest.mark.parametrize("fault", ["serialization failure", "terminated backend"])
def test_with_self_healing_around_a_scoped_session_replays_in_a_new_transaction(
    engine: sa.Engine, pg_server: Any, service: str, fault: str
) -> None:
    """Existing code on a long-lived session (``scoped_session``, Flask-SQLAlchemy's
    ``db.session``, a FastAPI dependency's) under ``with_self_healing``: the replay ran in the
    session whose transaction the failed attempt had left aborted, and failed with
    InFailedSqlTransaction or PendingRollbackError in place of the original error (a 500, not
    a 503). The sessions whose transaction the failed attempt made are rolled back before the
    replay, as a unit's replay gets a new session."""
    _install_serialization_failure(engine)
    db = scoped_session(rdb.ResilientSession(engine, service=service))
    name = f"scoped-{uuid.uuid4()}"
    calls: list[int] = []

    @rdb.with_self_healing(service=service, config=_FAST)
    def handler() -> int:
        calls.append(1)
        db.add(Item(name=name))
        db.flush()
        if len(calls) == 1:
            _fail(db, pg_server, fault)
        db.commit()
        return len(calls)

    try:
        assert handler() == 2
    finally:
        db.remove()
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).where(Item.name == name)) == 1


@pytest.mark.parametrize("fault", ["serialization failure", "terminated backend"])
def test_with_self_healing_replays_after_a_drop_in_block_that_only_read(
    engine: sa.Engine, pg_server: Any, service: str, fault: str
) -> None:
    """An operation whose drop-in code commits a block that only read, then fails in the
    next block: that COMMIT committed nothing, so the operation is replayed (it was refused
    as "committed part of its work itself", answered partly-committed). A block that wrote
    before the failure still stops the replay (below)."""
    _install_serialization_failure(engine)
    Sessions = rdb.ResilientSession(engine, service=service)
    name = f"after-read-{uuid.uuid4()}"
    calls: list[int] = []

    @rdb.with_self_healing(service=service, config=_FAST)
    def handler() -> int:
        calls.append(1)
        with Sessions.begin() as s:  # reads only, and commits
            s.scalar(sa.select(sa.func.count()).select_from(Item))
        with Sessions() as s:  # the same with an explicit commit
            s.scalar(sa.select(Item.id).limit(1))
            s.commit()
        with Sessions.begin() as s:
            s.add(Item(name=name))
            s.flush()
            if len(calls) == 1:
                _fail(s, pg_server, fault)
        return len(calls)

    assert handler() == 2
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).where(Item.name == name)) == 1


def test_with_self_healing_still_refuses_a_replay_after_a_drop_in_block_that_wrote(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    _install_serialization_failure(engine)
    name = f"wrote-{uuid.uuid4()}"
    _not_replayed_after(engine, service, caplog, lambda s: s.add(Item(name=name)))
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).where(Item.name == name)) == 1


def _not_replayed_after(
    engine: sa.Engine,
    service: str,
    caplog: pytest.LogCaptureFixture,
    first: Callable[[Session], object],
) -> None:
    """A ``with_self_healing`` operation whose first drop-in block does ``first`` and commits,
    and whose second block meets a serialization failure: run once, its error raised, and the
    "committed part of its work itself" line said."""
    Sessions = rdb.ResilientSession(engine, service=service)
    calls: list[int] = []

    @rdb.with_self_healing(service=service, config=_FAST)
    def handler() -> None:
        calls.append(1)
        with Sessions.begin() as s:
            first(s)
        with Sessions.begin() as s:
            s.execute(sa.text(_SERIALIZATION_FAILURE))

    with (
        caplog.at_level(logging.WARNING, logger="resilient_db"),
        pytest.raises(sa.exc.OperationalError),
    ):
        handler()
    assert calls == [1]
    assert "committed part of its work itself" in caplog.text


def test_a_unit_that_committed_only_reads_inside_is_replayed(
    engine: sa.Engine, service: str
) -> None:
    """``session.commit()`` inside a unit after reads only, then a transient error: the unit is
    replayed (that COMMIT saved nothing a replay would repeat)."""
    _install_serialization_failure(engine)
    Sessions = rdb.ResilientSession(engine, service=service, config=_FAST)
    name = f"unit-{uuid.uuid4()}"
    calls: list[int] = []

    def unit(session: Session) -> int:
        calls.append(1)
        session.scalar(sa.select(sa.func.count()).select_from(Item))
        session.commit()
        session.add(Item(name=name))
        session.flush()
        if len(calls) == 1:
            session.execute(sa.text(_SERIALIZATION_FAILURE))
        return len(calls)

    assert Sessions.run(unit) == 2
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).where(Item.name == name)) == 1


@pytest.mark.asyncio
async def test_async_with_self_healing_replays_after_a_drop_in_block_that_only_read(
    engine: sa.Engine, async_engine: AsyncEngine, pg_server: Any, service: str
) -> None:
    _install_serialization_failure(engine)
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    name = f"async-after-read-{uuid.uuid4()}"
    calls: list[int] = []

    @rdb.with_self_healing(service=service, config=_FAST)
    async def handler() -> int:
        calls.append(1)
        async with Sessions.begin() as s:
            await s.scalar(sa.select(sa.func.count()).select_from(Item))
        async with Sessions() as s:
            await s.scalar(sa.select(Item.id).limit(1))
            await s.commit()
        async with Sessions.begin() as s:
            s.add(Item(name=name))
            await s.flush()
            if len(calls) == 1:
                pid = (await s.execute(sa.text("SELECT pg_backend_pid()"))).one()[0]
                _end_own_backend(pg_server, pid)
                await s.execute(sa.text("SELECT 1"))
        return len(calls)

    assert await handler() == 2
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).where(Item.name == name)) == 1


def _install_writing_view(engine: sa.Engine) -> None:
    """``SELECT x FROM writes_when_read``: a plain SELECT (judged read-only by its text) that
    inserts a row into ``items`` through the function its view calls."""
    _install_serialization_failure(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE OR REPLACE FUNCTION write_when_read() RETURNS int LANGUAGE sql VOLATILE "
            "AS $$ INSERT INTO items (name) VALUES ('written-by-a-read') RETURNING 1 $$"
        )
        conn.exec_driver_sql(
            "CREATE OR REPLACE VIEW writes_when_read AS SELECT write_when_read() AS x"
        )


def _written_by_a_read(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.scalar(sa.select(sa.func.count()).where(Item.name == "written-by-a-read")) or 0
        )


def test_with_self_healing_does_not_replay_a_drop_in_block_that_wrote_through_a_read(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A block whose statement only reads by its text, but writes through the view it reads
    (a function in its definition), committed: the server says the transaction wrote (it holds
    a transaction id), so the operation is not replayed after the next block's transient error
    (replayed, it wrote that row twice)."""
    _install_writing_view(engine)
    _not_replayed_after(
        engine,
        service,
        caplog,
        lambda s: s.execute(sa.text("SELECT x FROM writes_when_read")).all(),
    )
    assert _written_by_a_read(engine) == 1


def test_a_unit_that_committed_a_write_through_a_read_is_not_replayed(
    engine: sa.Engine, service: str
) -> None:
    """The same inside a unit: its own ``session.commit()`` after a read that wrote through
    its view stops the replay."""
    _install_writing_view(engine)
    Sessions = rdb.ResilientSession(engine, service=service, config=_FAST)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        session.execute(sa.text("SELECT x FROM writes_when_read")).all()
        session.commit()
        session.execute(sa.text(_SERIALIZATION_FAILURE))

    with pytest.raises(sa.exc.OperationalError):
        Sessions.run(unit)
    assert calls == [1]
    assert _written_by_a_read(engine) == 1


def test_an_operation_and_a_unit_are_replayed_after_a_lost_answer_to_a_commit_of_reads(
    engine: sa.Engine, pg_database: str, fault_proxy: FaultProxy, service: str
) -> None:
    """The answer to the COMMIT of a drop-in block (or of a unit's own ``session.commit()``)
    that only read is lost: that COMMIT saved nothing, so the operation (the unit) is replayed
    as after any lost connection (it was refused as "committed part of its work itself", a 500
    partly-committed, though nothing was saved). One that wrote through its read stays an
    unknown outcome, not replayed."""
    _install_writing_view(engine)
    proxied = sa.create_engine(fault_proxy.url(pg_database))
    try:
        Sessions = rdb.ResilientSession(proxied, service=service, config=_FAST)
        Sessions.run(lambda session: session.execute(sa.text("SELECT 1")))  # connected
        calls: list[int] = []

        @rdb.with_self_healing(service=service, config=_FAST)
        def handler(query: str) -> int:
            calls.append(1)
            if len(calls) == 1:
                fault_proxy.lose_commit_answer()
            with Sessions.begin() as s:
                s.execute(sa.text(query)).all()
            return len(calls)

        assert handler("SELECT count(*) FROM items") == 2
        assert fault_proxy.commits_lost == 1

        def unit(session: Session) -> int:
            calls.append(1)
            session.execute(sa.text("SELECT count(*) FROM items")).all()
            if len(calls) == 1:
                fault_proxy.lose_commit_answer()
            session.commit()
            return len(calls)

        calls.clear()
        assert Sessions.run(unit) == 2
        assert fault_proxy.commits_lost == 2

        calls.clear()
        with pytest.raises(sa.exc.OperationalError) as info:
            handler("SELECT x FROM writes_when_read")
        assert calls == [1]
        assert rdb.classify(info.value) is rdb.Outcome.COMMIT_UNKNOWN
        assert _written_by_a_read(engine) == 1
    finally:
        proxied.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_async_with_self_healing_does_not_replay_a_block_that_wrote_through_a_read(
    engine: sa.Engine, pg_server: Any, pg_database: str, service: str, driver: str
) -> None:
    """The async twin, on both drivers."""
    _install_writing_view(engine)
    async_engine = create_async_engine(pg_server.url(pg_database, driver=driver))
    try:
        Sessions = rdb.AsyncResilientSession(async_engine, service=service)
        calls: list[int] = []

        @rdb.with_self_healing(service=service, config=_FAST)
        async def handler() -> None:
            calls.append(1)
            async with Sessions.begin() as s:
                (await s.execute(sa.text("SELECT x FROM writes_when_read"))).all()
            async with Sessions.begin() as s:
                await s.execute(sa.text(_SERIALIZATION_FAILURE))

        with pytest.raises(sa.exc.DBAPIError) as info:
            await handler()
        assert rdb.sqlstate_of(info.value) == "40001"
        assert calls == [1]
    finally:
        await async_engine.dispose()
    assert _written_by_a_read(engine) == 1


def test_with_self_healing_does_not_replay_into_a_transaction_begun_before_it(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The session was in a transaction before the operation (the caller's own work in it),
    which the failed attempt aborted: replaying the operation alone can't bring that work
    back. Not rolled back; the original error is raised (a 503, as without the wrapper), not
    the replay's InFailedSqlTransaction, with a line saying why."""
    _install_serialization_failure(engine)
    db = scoped_session(rdb.ResilientSession(engine, service=service))
    calls: list[int] = []

    @rdb.with_self_healing(service=service, config=_FAST)
    def helper() -> None:
        calls.append(1)
        db.execute(sa.text(_SERIALIZATION_FAILURE))

    try:
        db.add(Item(name=f"before-{uuid.uuid4()}"))
        db.flush()  # the caller's work, in the session's transaction
        with (
            caplog.at_level(logging.WARNING, logger="resilient_db"),
            pytest.raises(sa.exc.OperationalError) as raised,
        ):
            helper()
    finally:
        db.remove()
    assert rdb.sqlstate_of(raised.value) == "40001"
    assert "Not replaying" in caplog.text
    assert "begun before the operation" in caplog.text
    # nothing was saved (the caller's transaction is not committed): answered as the error
    # is by itself, not 500 partly-committed
    problem = problem_details(raised.value)
    assert problem is not None
    assert problem.status == 503


@pytest.mark.parametrize("how", ["add", "begin"])
def test_with_self_healing_keeps_the_callers_pending_work_in_a_shared_session(
    engine: sa.Engine, pg_server: Any, service: str, how: str
) -> None:
    """The caller's session holds work not sent yet (``add()``, or ``begin()``: a transaction
    with no connection) when the operation starts. The operation's flush gave that transaction
    its connection, which made it look begun by the attempt: rolled back before the replay, it
    took the caller's pending row with it, and the caller's commit then succeeded without it.
    A transaction that existed before the operation is never rolled back: the original error
    is raised."""
    db = scoped_session(rdb.ResilientSession(engine, service=service))
    mine, theirs = f"caller-{uuid.uuid4()}", f"operation-{uuid.uuid4()}"
    calls: list[int] = []

    @rdb.with_self_healing(service=service, config=_FAST)
    def operation() -> None:
        calls.append(1)
        db.add(Item(name=theirs))
        db.flush()
        if len(calls) == 1:
            _fail(db, pg_server, "terminated backend")

    try:
        if how == "begin":
            db.begin()
        db.add(Item(name=mine))  # the caller's, pending
        with pytest.raises(sa.exc.OperationalError):
            operation()
    finally:
        db.remove()
    with engine.connect() as conn:
        names = set(conn.scalars(sa.select(Item.name).where(Item.name.in_([mine, theirs]))))
    assert names == set()  # nothing half-done: the caller's work and the operation's both gone


# -- async ----------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_the_async_factory_is_an_async_sessionmaker_with_the_users_class(
    async_engine: AsyncEngine, service: str
) -> None:
    Sessions = rdb.AsyncResilientSession(
        async_engine, service=service, sync_session_class=MySession, info={"tenant": "a"}
    )
    assert isinstance(Sessions, async_sessionmaker)
    assert Sessions.kw["sync_session_class"] is MySession
    Sessions.configure(expire_on_commit=False)
    async with Sessions(info={"request": 1}) as session:
        # (a subclass the factory makes of yours, as a sync factory's: see _routed)
        assert isinstance(session.sync_session, MySession)
        made = type(session.sync_session)
        assert (made.__name__, made.__qualname__, made.__module__) == (
            MySession.__name__,
            MySession.__qualname__,
            MySession.__module__,
        )
        assert session.info == {"tenant": "a", "request": 1}
        assert session.sync_session.expire_on_commit is False

    async def unit(session: AsyncSession) -> str:
        assert type(session.sync_session) is made
        session.add(Item(name="async"))
        return session.sync_session.label()  # type: ignore[attr-defined, no-any-return]

    assert await Sessions.run(unit) == "mine"


class _Routing(Session):
    """A sync session class that picks its engine itself (SQLAlchemy's routing recipe)."""

    engine: sa.Engine
    picked = 0

    def get_bind(self, *args: Any, **kw: Any) -> Any:
        _Routing.picked += 1
        return self.engine


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["made", "configured", "one session", "routing"])
async def test_async_events_on_a_sessionmaker_given_as_sync_session_class(
    async_engine: AsyncEngine, service: str, how: str
) -> None:
    """SQLAlchemy's recipe for ORM events on an async factory's sessions: a sync
    ``sessionmaker`` given as ``sync_session_class`` (``async_sessionmaker`` calls it as a
    class), the listeners on it. Drop-in blocks and units hear them, with its keywords; given
    to the factory, to ``configure()`` or to one session, or of a class that routes (was: a
    ``TypeError`` saying it takes a Session subclass)."""
    _Routing.engine = async_engine.sync_engine
    sync_maker = sessionmaker(class_=_Routing if how == "routing" else Session, info={"k": 1})
    heard: list[str] = []
    event.listen(sync_maker, "before_commit", lambda session: heard.append("before_commit"))
    made = {"sync_session_class": sync_maker} if how in {"made", "routing"} else {}
    Sessions = rdb.AsyncResilientSession(
        None if how == "routing" else async_engine, service=service, **made
    )
    if how == "configured":
        Sessions.configure(sync_session_class=sync_maker)
    one = {"sync_session_class": sync_maker} if how == "one session" else {}
    async with Sessions(**one) as session:
        assert isinstance(session.sync_session, sync_maker.class_)
        assert session.info == {"k": 1}
        session.add(Item(name=f"drop-in {how}"))
        await session.commit()
    assert heard == ["before_commit"]
    if how != "one session":
        async with Sessions.begin() as session:
            session.add(Item(name=f"begin {how}"))

        async def unit(session: AsyncSession) -> int:
            session.add(Item(name=f"unit {how}"))
            return len(session.info)

        assert await Sessions.run(unit) == 1
        assert heard == ["before_commit"] * 3
    if how == "routing":
        assert _Routing.picked >= 3


@pytest.mark.asyncio
@pytest.mark.parametrize("fault", ["serialization failure", "terminated backend"])
async def test_async_with_self_healing_around_a_scoped_session_replays_in_a_new_transaction(
    engine: sa.Engine, async_engine: AsyncEngine, pg_server: Any, service: str, fault: str
) -> None:
    """As for sync: an async operation on an ``async_scoped_session``, its replay in the same
    session, rolled back first."""
    _install_serialization_failure(engine)
    db = async_scoped_session(
        rdb.AsyncResilientSession(async_engine, service=service), scopefunc=asyncio.current_task
    )
    name = f"scoped-{uuid.uuid4()}"
    calls: list[int] = []

    @rdb.with_self_healing(service=service, config=_FAST)
    async def handler() -> int:
        calls.append(1)
        db.add(Item(name=name))
        await db.flush()
        if len(calls) == 1:
            if fault == "serialization failure":
                await db.execute(sa.text(_SERIALIZATION_FAILURE))
            else:
                pid = (await db.execute(sa.text("SELECT pg_backend_pid()"))).one()[0]
                _end_own_backend(pg_server, pid)
                await db.execute(sa.text("SELECT 1"))
        await db.commit()
        return len(calls)

    try:
        assert await handler() == 2
    finally:
        await db.remove()
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).where(Item.name == name)) == 1


@pytest.mark.asyncio
async def test_async_with_self_healing_keeps_the_callers_pending_work_in_a_shared_session(
    engine: sa.Engine, async_engine: AsyncEngine, pg_server: Any, service: str
) -> None:
    """As for sync: the caller's pending row is never rolled back by the operation's replay."""
    db = async_scoped_session(
        rdb.AsyncResilientSession(async_engine, service=service), scopefunc=asyncio.current_task
    )
    mine, theirs = f"caller-{uuid.uuid4()}", f"operation-{uuid.uuid4()}"
    calls: list[int] = []

    @rdb.with_self_healing(service=service, config=_FAST)
    async def operation() -> None:
        calls.append(1)
        db.add(Item(name=theirs))
        await db.flush()
        if len(calls) == 1:
            pid = (await db.execute(sa.text("SELECT pg_backend_pid()"))).one()[0]
            _end_own_backend(pg_server, pid)
            await db.execute(sa.text("SELECT 1"))

    try:
        db.add(Item(name=mine))
        with pytest.raises(sa.exc.DBAPIError):
            await operation()
    finally:
        await db.remove()
    with engine.connect() as conn:
        names = set(conn.scalars(sa.select(Item.name).where(Item.name.in_([mine, theirs]))))
    assert names == set()


@pytest.mark.asyncio
async def test_async_with_self_healing_does_not_replay_into_a_transaction_begun_before_it(
    engine: sa.Engine, async_engine: AsyncEngine, service: str
) -> None:
    _install_serialization_failure(engine)
    db = async_scoped_session(
        rdb.AsyncResilientSession(async_engine, service=service), scopefunc=asyncio.current_task
    )

    @rdb.with_self_healing(service=service, config=_FAST)
    async def helper() -> None:
        await db.execute(sa.text(_SERIALIZATION_FAILURE))

    try:
        db.add(Item(name=f"before-{uuid.uuid4()}"))
        await db.flush()
        with pytest.raises(sa.exc.DBAPIError) as raised:
            await helper()
    finally:
        await db.remove()
    assert rdb.sqlstate_of(raised.value) == "40001"


@pytest.mark.asyncio
async def test_async_info_clear_keeps_the_guard(async_engine: AsyncEngine, service: str) -> None:
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    async with Sessions.begin() as session:
        session.add(Task(id=2, title="t", status="pending", idem_key="k2"))
    async with Sessions() as session:
        session.info.clear()
        task = await session.get(Task, 2)
        assert task is not None
        task.status = "completed"
        with pytest.raises(rdb.IllegalTransitionError):
            await session.flush()


@pytest.mark.asyncio
async def test_async_run_in_refuses_a_session_of_another_factory(
    async_engine: AsyncEngine, service: str
) -> None:
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    other = rdb.AsyncResilientSession(async_engine, service=service)

    async def unit(session: AsyncSession) -> int:
        return (await session.execute(sa.select(1))).scalar_one()

    async with other() as session:
        with pytest.raises(TypeError, match="made by this AsyncResilientSession"):
            await Sessions.run_in(session, unit)
    async with Sessions() as session:
        assert await Sessions.run_in(session, unit) == 1


# -- one engine, one breaker per service: agreements checked, nothing silently overridden ---------
class _Counting(pybreaker.CircuitBreakerListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.changes = 0

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.changes += 1


def test_reloads_do_not_add_a_breaker_listener_again(
    engine: sa.Engine, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = _Counting()
    Sessions = rdb.ResilientSession(engine, service=service, breaker_listeners=(listener,))
    for threshold in ("3", "4", "5"):
        monkeypatch.setenv("SELF_HEALING_FAILURE_THRESHOLD", threshold)
        rdb.reload_config()
    assert Sessions.config.failure_threshold == 5
    breaker = Sessions.policy.breaker
    assert breaker is not None
    breaker.open()
    assert listener.changes == 1
    monkeypatch.delenv("SELF_HEALING_FAILURE_THRESHOLD")
    rdb.reload_config()  # leave the process-wide default configuration as the environment says


def test_a_second_storage_for_one_service_is_refused(engine: sa.Engine, service: str) -> None:
    first = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    rdb.ResilientSession(engine, service=service, breaker_storage=first)
    rdb.ResilientSession(engine, service=service, breaker_storage=first)  # the same: fine
    rdb.ResilientSession(engine, service=service)  # none given: shares the breaker
    other = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    with pytest.raises(ValueError, match=f"service '{service}' already has a circuit breaker"):
        rdb.ResilientSession(engine, service=service, breaker_storage=other)


def test_a_reload_warns_only_of_factories_that_really_disagree(
    engine: sa.Engine,
    service: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two factories of the environment's configuration on one engine follow a reload together:
    no warning while the first is applied and the second not yet; one of an explicit config
    that the reload leaves behind is named."""
    first = rdb.ResilientSession(engine, service=service)
    second = rdb.ResilientSession(engine, service=service + "-2")
    caplog.set_level(logging.WARNING, logger="resilient_db")
    monkeypatch.setenv("SELF_HEALING_STATUS_VALIDATION", "false")  # an engine-wide setting
    rdb.reload_config()
    assert not [r for r in caplog.records if "disagree" in r.getMessage()]
    pinned = rdb.ResilientSession(engine, service=service + "-3", config=first.config)
    monkeypatch.delenv("SELF_HEALING_STATUS_VALIDATION")
    rdb.reload_config()
    lines = [r.getMessage() for r in caplog.records if "disagree" in r.getMessage()]
    assert lines  # (once per factory of the environment's that follows the reload)
    assert all(f"service={service}-3 (status validation" in line for line in lines)
    del first, second, pinned


def test_a_reload_switching_self_healing_off_says_what_another_factory_loses(
    engine: sa.Engine,
    service: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``SELF_HEALING_ENABLED=false`` reloaded turns the engine-wide hooks off for a factory
    with its own ``config=`` on the same engine too (its COMMITs go unmarked): the warning
    saying so was emitted under the new configuration, which says nothing, so it was lost."""
    follows = rdb.ResilientSession(engine, service=service)
    pinned = rdb.ResilientSession(engine, service=service + "-pinned", config=rdb.Config())
    caplog.set_level(logging.WARNING, logger="resilient_db")
    monkeypatch.setenv("SELF_HEALING_ENABLED", "false")
    try:
        rdb.reload_config()
    finally:
        monkeypatch.delenv("SELF_HEALING_ENABLED")
        rdb.reload_config()  # the process-wide default configuration as the environment says
    lines = [
        r.getMessage()
        for r in caplog.records
        if "disagree" in r.getMessage() and f"service={service}-pinned" in r.getMessage()
    ]  # (factories of earlier tests not yet collected may disagree on their engines too)
    assert lines
    assert f"also for service={service}-pinned" in lines[0]
    assert "enabled: True there, False here" in lines[0]
    del follows, pinned


def test_engine_wide_lines_are_said_under_the_units_factory(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The engine's hooks are shared by its factories: a trigger's block (and the other
    engine-wide lines) was said under the engine's latest factory's configuration and name, so
    a second factory with logging off silenced the first one's blocks, and their events named
    the other service. Now the running unit's factory says them."""
    with engine.begin() as conn:
        rdb.install_transition_trigger(conn, Task)
        conn.execute(sa.text("DELETE FROM tasks"))
        conn.execute(sa.text("INSERT INTO tasks (idem_key, title) VALUES ('speaker', 't')"))
    orders = rdb.ResilientSession(engine, service=service)
    quiet = rdb.ResilientSession(
        engine, service=f"{service}-quiet", config=rdb.load_config().replace(logging=False)
    )
    events: list[Any] = []
    rdb.add_hook(events.append)
    caplog.set_level(logging.ERROR, logger="resilient_db")
    try:
        with pytest.raises(rdb.IllegalTransitionError):
            orders.run(
                lambda s: s.execute(
                    sa.text("UPDATE tasks SET status = 'completed' WHERE idem_key = 'speaker'")
                )
            )
    finally:
        rdb.remove_hook(events.append)
    blocked = [e for e in events if e.name == "transition_blocked"]
    assert [e.fields["unit_service"] for e in blocked] == [service]
    assert [r for r in caplog.records if "Status transition blocked" in r.getMessage()]
    del quiet


def test_factories_on_one_engine_must_agree_on_engine_wide_settings(
    engine: sa.Engine, service: str
) -> None:
    first = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    # per-factory settings may differ: retries, breaker numbers, deadlines
    rdb.ResilientSession(engine, service="other", config=rdb.Config(max_retries=9, deadline=5))
    with pytest.raises(ValueError, match="enabled: True there, False here"):
        rdb.ResilientSession(engine, service="off", config=rdb.Config(enabled=False))
    with pytest.raises(ValueError, match="classifier codes differ"):
        rdb.ResilientSession(
            engine, service=service, classifier=rdb.Classifier().without_codes(["55P03"])
        )
    assert first.config.enabled  # untouched by the refused ones
    # another engine is free to differ
    other_engine = sa.create_engine(engine.url)
    rdb.ResilientSession(other_engine, service="off", config=rdb.Config(enabled=False))
    other_engine.dispose()


# -- factories come and go: nothing of them stays behind ----------------------------------------
def test_a_factory_nobody_holds_is_collected(engine: sa.Engine, service: str) -> None:
    """A ResilientSession goes, as a sessionmaker does, once nobody holds it: the class it made
    with it, after units and drop-in use alike. (The registry held every factory ever made:
    about 28 KiB each, for good.)"""
    Sessions = rdb.ResilientSession(engine, service=service)
    Sessions.run(lambda session: session.add(Item(name="collected")))
    with Sessions() as session:
        assert session.scalar(sa.select(Item.name)) == "collected"
    factory, made = weakref.ref(Sessions), weakref.ref(Sessions.class_)
    del Sessions, session
    gc.collect()
    assert factory() is None
    assert made() is None


def test_a_session_keeps_its_factory(engine: sa.Engine, service: str) -> None:
    """A session outliving every other reference to its factory is still the factory's
    (guarded, here), as a sessionmaker's session needs nothing of its sessionmaker."""
    session = rdb.ResilientSession(engine, service=service)()
    gc.collect()
    with session:
        task = Task(idem_key=uuid.uuid4().hex, title="kept", status="pending")
        session.add(task)
        session.commit()
        task.status = "completed"  # pending -> completed is not a legal move
        with pytest.raises(rdb.IllegalTransitionError):
            session.commit()


def test_making_a_factory_costs_the_same_however_many_were_made(
    engine: sa.Engine, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new factory is checked against the settings its engine's factories agreed on, not
    against each of them, and factories that are gone leave nothing to check or keep: making
    one took longer with every factory ever made (4.4, 7.4, 18 ms over batches of 500)."""
    computed: list[int] = []
    settings = _unit.engine_settings

    def counted(*args: Any) -> Any:
        computed.append(1)
        return settings(*args)

    monkeypatch.setattr(_unit, "engine_settings", counted)
    kept = [rdb.ResilientSession(engine, service=service) for _ in range(50)]
    hooks = STATE.engine_hooks[engine]
    gc.collect()
    classes = len(STATE.factory_by_class)
    for _ in range(3):
        computed.clear()
        for _ in range(100):
            rdb.ResilientSession(engine, service=service)
        assert len(computed) == 100  # one each, the new factory's own
        gc.collect()
        assert len(hooks.factories) == len(kept)
        assert len(STATE.factory_by_class) <= classes


def test_once_an_engines_factories_are_gone_a_new_one_may_differ(
    engine: sa.Engine, service: str
) -> None:
    """Factories sharing an engine must agree on its engine-wide settings; once the last one
    is gone, a new factory is free to use others (the gone ones stayed, and refused it)."""
    first = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    with pytest.raises(ValueError, match="enabled: True there, False here"):
        rdb.ResilientSession(engine, service=service, config=rdb.Config(enabled=False))
    del first
    gc.collect()
    off = rdb.ResilientSession(engine, service=service, config=rdb.Config(enabled=False))
    assert off.run(lambda session: session.scalar(sa.select(sa.literal(1)))) == 1


def test_a_factorys_class_made_where_a_gone_ones_was_still_retries_connects(
    pg_database: str, fault_proxy: Any, service: str
) -> None:
    """SQLAlchemy's event registry remembers a class by its address after the class is gone,
    so ``event.contains`` says a new class made there listens already. The class a factory
    makes goes with it: a new factory's class taken for a gone one's went without the drop-in
    connect retry's listeners (its sessions' connects were never retried)."""
    engine = sa.create_engine(fault_proxy.url(pg_database))
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        fault_proxy.restore()  # the server "comes back" during the first backoff

    try:

        def make() -> rdb.ResilientSession[Session]:
            return rdb.ResilientSession(engine, service=service, config=rdb.Config(), sleep=sleep)

        gone: set[int] = set()
        Sessions = make()
        while id(Sessions.class_) not in gone:
            assert len(gone) < 50, "no factory's class was made where a gone one's had been"
            gone.add(id(Sessions.class_))
            del Sessions
            gc.collect()
            Sessions = make()
        fault_proxy.refuse()
        with Sessions() as session:
            assert session.execute(sa.text("SELECT 7")).scalar_one() == 7
        assert len(slept) == 1
    finally:
        fault_proxy.restore()
        engine.dispose()


def test_an_engine_the_commit_protocol_cannot_mark_still_runs_units_and_the_guard(
    tmp_path: Any, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Not PostgreSQL through psycopg 3 or asyncpg (here SQLite, as a test setup may use): the
    factory says once that commits can't be verified there, and units, the guard and its
    compare-and-set work as on PostgreSQL. (Its statement listener read a driver attribute
    that SQLite's connection lacks: every write failed with AttributeError.)"""
    eng = sa.create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    try:
        Task.__table__.create(eng)
        with caplog.at_level("WARNING", logger="resilient_db"):
            Sessions = rdb.ResilientSession(eng, service=service)
            rdb.ResilientSession(eng, service=service)  # the engine's hooks exist: no repeat
        said = [r for r in caplog.records if "can't carry a marker" in r.getMessage()]
        assert len(said) == 1
        assert "sqlite+pysqlite" in said[0].getMessage()

        def add(session: Session) -> None:
            session.add(Task(id=1, idem_key="k1", title="on sqlite"))

        def move(session: Session, to: str) -> str:
            task = session.get(Task, 1)
            assert task is not None
            task.status = to
            return task.status

        Sessions.run(add)
        assert Sessions.run(move, "in_progress") == "in_progress"
        with pytest.raises(rdb.IllegalTransitionError):
            Sessions.run(move, "pending_review")
        with Sessions() as session:  # loaded 'in_progress'; another session moves it first
            task = session.get(Task, 1)
            assert task is not None
            Sessions.run(move, "completed")
            task.status = "failed"
            with pytest.raises(rdb.StaleTransitionError):
                session.commit()
        with Sessions() as session:
            assert session.scalar(sa.select(Task.status)) == "completed"
    finally:
        eng.dispose()


@pytest.fixture
def two_phase_database(two_phase_server: PostgresServer) -> Iterator[str]:
    """A database of the test's own on ``two_phase_server`` (conftest's), with the items."""
    name = f"tp_{uuid.uuid4().hex[:8]}"
    two_phase_server.create_database(name)
    eng = sa.create_engine(two_phase_server.url(name))
    Base.metadata.create_all(eng)
    eng.dispose()
    yield name
    for gid in pending_prepared(two_phase_server, (name,)):  # (they would block the drop)
        two_phase_server.execute(f"ROLLBACK PREPARED '{gid}'", database=name)
    two_phase_server.drop_database(name)


def test_two_phase_sessions_commit_and_a_lost_answer_is_never_replayed(
    two_phase_server: PostgresServer,
    two_phase_database: str,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``twophase=True`` works as with ``sessionmaker``. Its COMMIT goes out as SQLAlchemy's
    ``COMMIT PREPARED`` statement, which carries no marker: a lost answer of it ends in
    CommitOutcomeUnknownError, not in a replay that would write the unit twice."""
    direct = sa.create_engine(two_phase_server.url(two_phase_database))
    with FaultProxy(two_phase_server) as proxy:
        eng = sa.create_engine(proxy.url(two_phase_database))
        try:
            Sessions = rdb.ResilientSession(eng, service=service, twophase=True)
            calls = []

            def add(session: Session, name: str) -> None:
                calls.append(name)
                session.add(Item(name=name))

            Sessions.run(add, "first")
            proxy.lose_commit_answer()
            with (
                caplog.at_level("ERROR", logger="resilient_db"),
                pytest.raises(rdb.CommitOutcomeUnknownError),
            ):
                Sessions.run(add, "second")
            assert proxy.commits_lost == 1
            assert calls == ["first", "second"]  # not replayed
            assert any("carried no marker" in r.getMessage() for r in caplog.records)
        finally:
            eng.dispose()
    with direct.connect() as conn:
        assert sorted(conn.scalars(sa.select(Item.name))) == ["first", "second"]
    direct.dispose()
    assert pending_prepared(two_phase_server, (two_phase_database,)) == []


@pytest.fixture
def two_databases(two_phase_server: PostgresServer) -> Iterator[tuple[str, str]]:
    """Items in one new database of the two-phase server, tasks in another."""
    names = (f"tp_items_{uuid.uuid4().hex[:8]}", f"tp_tasks_{uuid.uuid4().hex[:8]}")
    for name, base in zip(names, (Base, TaskBase), strict=True):
        two_phase_server.create_database(name)
        eng = sa.create_engine(two_phase_server.url(name))
        base.metadata.create_all(eng)
        eng.dispose()
    yield names
    for name in names:  # a failed test may leave prepared transactions, which block the drop
        for gid in pending_prepared(two_phase_server, (name,)):
            two_phase_server.execute(f"ROLLBACK PREPARED '{gid}'", database=name)
        two_phase_server.drop_database(name)


@pytest.fixture
def two_engines(
    two_phase_server: PostgresServer, two_databases: tuple[str, str]
) -> Iterator[list[Any]]:
    """An engine on each of the two databases."""
    engines = [sa.create_engine(two_phase_server.url(name)) for name in two_databases]
    yield engines
    for eng in engines:
        eng.dispose()


@pytest.fixture
def two_proxied(
    two_phase_server: PostgresServer, two_databases: tuple[str, str]
) -> Iterator[tuple[FaultProxy, list[Any]]]:
    """A fault proxy in front of the server, and an engine through it on each database."""
    with FaultProxy(two_phase_server) as proxy:
        engines = [
            sa.create_engine(proxy.url(name), connect_args={"connect_timeout": 2})
            for name in two_databases
        ]
        yield proxy, engines
        for eng in engines:
            eng.dispose()


@pytest_asyncio.fixture
async def two_async_engines(
    two_phase_server: PostgresServer, two_databases: tuple[str, str], driver: str
) -> AsyncIterator[list[Any]]:
    """An async engine on ``driver`` on each of the two databases."""
    engines = [
        create_async_engine(
            two_phase_server.url(name, driver=driver), connect_args=async_connect_args(driver, 2)
        )
        for name in two_databases
    ]
    yield engines
    for eng in engines:
        await eng.dispose()


@pytest_asyncio.fixture
async def two_async_proxied(
    two_phase_server: PostgresServer, two_databases: tuple[str, str], driver: str
) -> AsyncIterator[tuple[FaultProxy, list[Any]]]:
    """A fault proxy in front of the server, and an async engine on ``driver`` through it on
    each database (asyncpg's COMMIT PREPARED goes through the extended protocol, psycopg's as a
    simple query: the proxy sees either)."""
    with FaultProxy(two_phase_server) as proxy:
        engines = [
            create_async_engine(
                proxy.url(name, driver=driver), connect_args=async_connect_args(driver, 2)
            )
            for name in two_databases
        ]
        yield proxy, engines
        for eng in engines:
            await eng.dispose()


def pending_prepared(server: PostgresServer, databases: tuple[str, ...]) -> list[str]:
    """The prepared transactions still pending in ``databases`` (they hold their locks)."""
    return [
        row[0]
        for name in databases
        for row in server.execute(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()",
            database=name,
        )
    ]


def before_commit_prepared(
    engines: list[Any], number: int, action: Callable[[Any, Any], None]
) -> list[str]:
    """``action(conn, xid)`` right before the unit's ``number``-th COMMIT PREPARED (SQLAlchemy's
    ``commit_twophase`` event, on the sync engines). Returns the xids seen, in order."""
    seen: list[str] = []

    def before(conn: Any, xid: Any, is_prepared: bool) -> None:
        seen.append(str(xid))
        if len(seen) == number:
            action(conn, xid)

    for eng in engines:
        event.listen(getattr(eng, "sync_engine", eng), "commit_twophase", before)
    return seen


def refuse_commit_prepared(server: PostgresServer, engines: list[Any], number: int) -> list[str]:
    """Before the unit's ``number``-th COMMIT PREPARED, someone rolls that prepared transaction
    back: the server refuses that COMMIT PREPARED (42704). Returns the xids seen, in order."""

    def roll_back(conn: Any, xid: Any) -> None:
        database = conn.engine.url.database  # where it was prepared
        server.execute(f"ROLLBACK PREPARED '{xid}'", database=database)

    return before_commit_prepared(engines, number, roll_back)


def kill_before_the_first_commit_prepared(server: PostgresServer, engines: list[Any]) -> list[str]:
    """Right before the unit's first COMMIT PREPARED, its connection's backend is terminated
    (a real disconnect; the prepared transactions outlive it). Returns the xids seen."""

    def terminate(conn: Any, xid: Any) -> None:
        driver = conn.connection.driver_connection
        pid = driver.get_server_pid() if hasattr(driver, "get_server_pid") else None
        pid = pid or driver.info.backend_pid
        server.execute(f"SELECT pg_terminate_backend({int(pid)}, 5000)")

    return before_commit_prepared(engines, 1, terminate)


def counts(server: PostgresServer, databases: tuple[str, str]) -> list[int]:
    return [
        server.execute(f"SELECT count(*) FROM {table}", database=name)[0][0]
        for name, table in zip(databases, ("items", "tasks"), strict=True)
    ]


def two_phase_factory(factory: Any, engines: list[Any], service: str, **kwargs: Any) -> Any:
    """A two-phase factory whose items go to the first engine and tasks to the second, that
    retries 42704 (the prepared transaction is gone) as a transient error would be, unless
    given a ``classifier=`` of its own."""
    kwargs.setdefault("classifier", rdb.Classifier().with_codes({"42704": "conflict"}))
    return factory(
        engines[0],
        service=service,
        twophase=True,
        binds={Item: engines[0], Task: engines[1]},
        **kwargs,
    )


def add_to_both(session: Any, calls: list[int]) -> None:
    """A unit's work: an item and a task (one per database), named per attempt."""
    calls.append(1)
    session.add(Item(name=f"u-{len(calls)}"))
    session.add(Task(idem_key=f"k-{len(calls)}", title="two databases"))


async def add_to_both_async(session: AsyncSession, calls: list[int]) -> None:
    add_to_both(session, calls)


def test_a_two_phase_unit_across_two_databases_is_not_replayed_after_one_committed(
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_engines: list[Any],
    service: str,
) -> None:
    """``twophase=True`` with models bound to two databases: SQLAlchemy prepares both, then
    sends COMMIT PREPARED to one, then the other. The first commits for good; when the second
    is refused with an error the factory retries, a replay would write the first database's
    part twice. The unit raises the error instead, marked partly committed."""
    Sessions = two_phase_factory(rdb.ResilientSession, two_engines, service)
    seen = refuse_commit_prepared(two_phase_server, two_engines, 2)
    calls: list[int] = []
    with pytest.raises(sa.exc.DBAPIError) as info:
        Sessions.run(add_to_both, calls)
    assert rdb.sqlstate_of(info.value) == "42704"
    assert calls == [1]  # not replayed
    assert len(seen) == 2
    assert sorted(counts(two_phase_server, two_databases)) == [0, 1]  # the first one's only


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_async_a_two_phase_unit_across_two_databases_is_not_replayed_after_one_committed(
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_async_engines: list[Any],
    service: str,
) -> None:
    """The async twin, on both drivers: psycopg commits a prepared transaction with its own
    ``tpc_commit``, asyncpg through SQLAlchemy's COMMIT PREPARED statement."""
    Sessions = two_phase_factory(rdb.AsyncResilientSession, two_async_engines, service)
    seen = refuse_commit_prepared(two_phase_server, two_async_engines, 2)
    calls: list[int] = []
    with pytest.raises(sa.exc.DBAPIError) as info:
        await Sessions.run(add_to_both_async, calls)
    assert rdb.sqlstate_of(info.value) == "42704"
    assert calls == [1]  # not replayed
    assert len(seen) == 2
    assert sorted(counts(two_phase_server, two_databases)) == [0, 1]


def test_a_refused_first_commit_prepared_is_replayed_and_finishes_nothing(
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_engines: list[Any],
    service: str,
) -> None:
    """The server answers the first COMMIT PREPARED with an error (someone rolled that
    prepared transaction back): nothing committed there, so the other database's prepared
    transaction is rolled back with the session, not finished, and the replay writes each
    database once."""
    Sessions = two_phase_factory(rdb.ResilientSession, two_engines, service)
    refuse_commit_prepared(two_phase_server, two_engines, 1)
    calls: list[int] = []
    Sessions.run(add_to_both, calls)
    assert calls == [1, 1]
    assert counts(two_phase_server, two_databases) == [1, 1]
    assert pending_prepared(two_phase_server, two_databases) == []


def _backend_pid(conn: Any) -> int:
    """The server process of a SQLAlchemy ``Connection`` (psycopg or asyncpg)."""
    driver = conn.connection.driver_connection
    pid = driver.get_server_pid() if hasattr(driver, "get_server_pid") else None
    return int(pid or driver.info.backend_pid)


def kill_at_a_prepare(server: PostgresServer, engine: Any, *, after: bool) -> list[str]:
    """The first PREPARE TRANSACTION on ``engine`` fails with its connection: its backend is
    terminated right before it is sent, or (``after``) right after the server prepared it,
    whose answer then never reaches the unit: the driver raises the termination on the next
    use of the connection (its prepared transaction outlives it, holding its locks). Returns
    the xids prepared on ``engine``."""
    dialect = getattr(engine, "sync_engine", engine).dialect
    prepare = dialect.do_prepare_twophase
    seen: list[str] = []

    def do_prepare_twophase(conn: Any, xid: Any) -> None:
        seen.append(str(xid))
        if len(seen) > 1:
            return prepare(conn, xid)
        if not after:
            server.execute(f"SELECT pg_terminate_backend({_backend_pid(conn)}, 5000)")
            prepare(conn, xid)  # the driver meets the termination
            raise AssertionError("the connection survived its backend")
        prepare(conn, xid)
        server.execute(f"SELECT pg_terminate_backend({_backend_pid(conn)}, 5000)")
        conn.exec_driver_sql("SELECT 1")  # the driver meets the termination
        raise AssertionError("the connection survived its backend")

    dialect.do_prepare_twophase = do_prepare_twophase
    return seen


@pytest.mark.parametrize("after", [False, True], ids=["before it", "its answer lost"])
@pytest.mark.parametrize("which", [0, 1], ids=["first database", "second database"])
def test_a_two_phase_unit_whose_prepare_lost_its_connection_is_replayed(
    *,
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_engines: list[Any],
    service: str,
    which: int,
    after: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A connection of a two-phase unit across two databases is lost at its PREPARE, before
    any COMMIT PREPARED went out: nothing of the unit can have committed. It ended in
    CommitOutcomeUnknownError ("part of which may be committed"). It is replayed now, once
    (plain ``sessionmaker`` raises the transient error); and a PREPARE the server carried out
    whose answer was lost is rolled back first (else it would hold its locks, and its writes
    could be committed by hand next to the replay's)."""
    Sessions = two_phase_factory(rdb.ResilientSession, two_engines, service)
    seen = kill_at_a_prepare(two_phase_server, two_engines[which], after=after)
    calls: list[int] = []
    with caplog.at_level("WARNING", logger="resilient_db"):
        Sessions.run(add_to_both, calls)
    assert calls == [1, 1]
    assert counts(two_phase_server, two_databases) == [1, 1]
    assert pending_prepared(two_phase_server, two_databases) == []
    ended = [r.getMessage() for r in caplog.records if "Ended a two-phase" in r.getMessage()]
    if after:  # the one it left prepared, rolled back: said
        assert len(ended) == 1
        assert ended[0].startswith("[SELF-HEAL] ")
        assert seen[0] in ended[0]
    # (before it, the other database's prepared transaction is SQLAlchemy's to roll back)


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
@pytest.mark.parametrize("after", [False, True], ids=["before it", "its answer lost"])
async def test_async_a_two_phase_unit_whose_prepare_lost_its_connection_is_replayed(
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_async_engines: list[Any],
    service: str,
    after: bool,
) -> None:
    """The async twin, on both drivers, the second database's PREPARE lost."""
    Sessions = two_phase_factory(rdb.AsyncResilientSession, two_async_engines, service)
    kill_at_a_prepare(two_phase_server, two_async_engines[1], after=after)
    calls: list[int] = []
    await Sessions.run(add_to_both_async, calls)
    assert calls == [1, 1]
    assert counts(two_phase_server, two_databases) == [1, 1]
    assert pending_prepared(two_phase_server, two_databases) == []


SLOW_PREPARE = """
CREATE FUNCTION slow_prepare() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER slow_prepare AFTER INSERT ON tasks DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION slow_prepare();
"""


def cut_while_preparing(
    server: PostgresServer, database: str, proxy: FaultProxy
) -> threading.Thread:
    """Cut every connection through ``proxy`` once a backend of ``database`` runs a PREPARE
    TRANSACTION (its deferred trigger keeps it running a second): the unit's connection is
    lost while the server carries its PREPARE out, which then completes, prepared."""

    def cut() -> None:
        # (its deferred trigger sleeping: the PREPARE executing, not the Parse of asyncpg's
        # extended protocol, which shows it active a moment before it is carried out; and in
        # this database, not the other's)
        query = (
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
            "AND datname = current_database() AND query ILIKE 'PREPARE TRANSACTION%' "
            "AND wait_event = 'PgSleep'"
        )
        wait_for(lambda: server.execute(query, database=database)[0][0] > 0, "a PREPARE")
        proxy.cut_all()

    thread = threading.Thread(target=cut, daemon=True)
    thread.start()
    return thread


def comment_every_statement(engine: Any) -> None:
    """A listener appending a comment to every statement, as SQLCommenter (OpenTelemetry's
    ``enable_commenter``) does: the PREPARE TRANSACTION's text is not SQLAlchemy's alone."""

    def comment(conn: Any, cursor: Any, statement: str, *rest: Any) -> tuple[str, Any]:
        return statement + " /*app='tests'*/", rest[0]

    event.listen(
        getattr(engine, "sync_engine", engine), "before_cursor_execute", comment, retval=True
    )


@pytest.mark.slow
@pytest.mark.parametrize("commented", [False, True], ids=["plain", "commented"])
def test_a_prepare_cut_off_while_it_runs_is_waited_for_and_rolled_back(
    *,
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_proxied: tuple[FaultProxy, list[Any]],
    service: str,
    commented: bool,
) -> None:
    """The second database's PREPARE is still running on the server when the unit's connection
    is cut: the look for what it left must wait for it (it completes, prepared, holding its
    locks) and roll it back before the unit is replayed; taken for "not prepared", the replay
    waited on the prepared transaction's locks for good. The PREPARE's text may carry a
    listener's comment."""
    proxy, engines = two_proxied
    two_phase_server.execute(SLOW_PREPARE, database=two_databases[1])
    if commented:
        for eng in engines:
            comment_every_statement(eng)
    Sessions = two_phase_factory(rdb.ResilientSession, engines, service)
    cutter = cut_while_preparing(two_phase_server, two_databases[1], proxy)
    calls: list[int] = []
    Sessions.run(add_to_both, calls)
    cutter.join(10)
    assert calls == [1, 1]
    assert counts(two_phase_server, two_databases) == [1, 1]
    assert pending_prepared(two_phase_server, two_databases) == []


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["asyncpg"])
async def test_asyncpg_a_commented_prepare_cut_off_while_it_runs_is_waited_for(
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_async_proxied: tuple[FaultProxy, list[Any]],
    service: str,
) -> None:
    """The asyncpg twin, where SQLAlchemy sends the PREPARE through the listeners too."""
    proxy, engines = two_async_proxied
    two_phase_server.execute(SLOW_PREPARE, database=two_databases[1])
    for eng in engines:
        comment_every_statement(eng)
    Sessions = two_phase_factory(rdb.AsyncResilientSession, engines, service)
    cutter = cut_while_preparing(two_phase_server, two_databases[1], proxy)
    calls: list[int] = []
    await asyncio.wait_for(Sessions.run(add_to_both_async, calls), 30)
    cutter.join(10)
    assert calls == [1, 1]
    assert counts(two_phase_server, two_databases) == [1, 1]
    assert pending_prepared(two_phase_server, two_databases) == []


def errand_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The lines of the background look a two-phase unit interrupted in its PREPARE step hands
    its PREPAREs to (its end: something rolled back, something left, or nothing found)."""
    ends = ("Ended a two-phase unit's", "Two-phase unit not ended", "Two-phase unit ended")
    lines = [r.getMessage().removeprefix("[SELF-HEAL] ") for r in caplog.records]
    # (not the unit's own look, before the interruption: "its PREPARE step failed")
    return [line for line in lines if line.startswith(ends) and "step failed" not in line]


def only(lines: list[str], caplog: pytest.LogCaptureFixture) -> list[str]:
    """``lines``, asserted to be one line; else every line the test logged, to tell why."""
    assert len(lines) == 1, "\n".join(r.getMessage() for r in caplog.records)
    return lines


def handed_over(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The WARNING lines saying a two-phase unit's PREPAREs were handed to the background."""
    start = "[SELF-HEAL] Ending a two-phase unit's prepared transactions"
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["asyncpg"])
@pytest.mark.parametrize("loop_ends", [False, True], ids=["runs", "loop-ends"])
async def test_a_unit_cancelled_while_it_looks_for_a_lost_prepare_ends_it_afterwards(
    *,
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_async_proxied: tuple[FaultProxy, list[Any]],
    service: str,
    caplog: pytest.LogCaptureFixture,
    loop_ends: bool,
) -> None:
    """Cancelled while it waits for a PREPARE the server is still carrying out (its connection
    lost): the prepared transaction that PREPARE leaves would hold its locks until someone ends
    it. The cancellation goes on at once; the look goes on in the background, waits for the
    PREPARE and rolls it back, and says so. Should its task be cancelled too (as
    ``asyncio.run`` does at its end), an ERROR line names what may be left."""
    caplog.set_level("INFO", logger="resilient_db")
    proxy, engines = two_async_proxied
    # a PREPARE of three seconds: the cut (found by polling the server, slower on a busy
    # machine) and the factory's first look after it land well inside it
    slow = SLOW_PREPARE.replace("pg_sleep(1)", "pg_sleep(3)")
    two_phase_server.execute(slow, database=two_databases[1])
    looking = asyncio.Event()  # the unit waits between two looks for the PREPARE
    tasks: list[asyncio.Future[Any]] = []

    async def asleep(seconds: float) -> None:
        if asyncio.current_task() is tasks[0]:  # (the unit's, not the background look's)
            looking.set()
        await asyncio.sleep(seconds)

    Sessions = two_phase_factory(rdb.AsyncResilientSession, engines, service, asleep=asleep)
    cutter = cut_while_preparing(two_phase_server, two_databases[1], proxy)
    calls: list[int] = []
    unit = asyncio.ensure_future(Sessions.run(add_to_both_async, calls))
    tasks.append(unit)
    # inside the seconds the PREPARE runs on after the cut, while the factory looks for it:
    # the unit seen waiting between two looks (its first look found the PREPARE running),
    # not a fixed time after the cut, which a busy machine may overrun
    await asyncio.wait_for(looking.wait(), 10)
    unit.cancel()
    with pytest.raises(asyncio.CancelledError):
        await unit
    cutter.join(10)
    assert calls == [1]
    (handed,) = only(handed_over(caplog), caplog)
    assert "interrupted (CancelledError)" in handed
    if loop_ends:
        (errand,) = rdb_async._ERRAND_TASKS
        errand.cancel()
        with pytest.raises(asyncio.CancelledError):
            await errand
        (line,) = only(errand_lines(caplog), caplog)
        assert line.startswith("Two-phase unit not ended"), line
        gid = line.split("may be left prepared: ")[1].split(" ")[0]
        assert gid in handed
        assert f"{gid}: interrupted (CancelledError)" in line
        # the PREPARE completes on the server, prepared (the fixture rolls it back)
        wait_for(lambda: pending_prepared(two_phase_server, two_databases) == [gid], gid)
        return
    await wait_for_async(lambda: bool(errand_lines(caplog)), "the background look's end")
    assert pending_prepared(two_phase_server, two_databases) == []
    assert counts(two_phase_server, two_databases) == [0, 0]
    (line,) = only(errand_lines(caplog), caplog)
    assert line.startswith("Ended a two-phase unit's prepared transactions")
    assert "was interrupted (CancelledError)" in line
    # the one it rolled back is the one it had handed over
    gid = line.rsplit(": ", 1)[1]
    assert gid in handed


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout: 3.11+")
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_a_unit_timed_out_in_its_prepare_ends_what_it_leaves_prepared_afterwards(
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_async_engines: list[Any],
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``asyncio.timeout`` ends a unit while the server still carries out its PREPARE (a slow
    deferred trigger): the PREPARE may complete after the client stopped waiting (the driver
    may also cancel it on the server), leaving a prepared transaction that holds its locks
    until someone ends it. The deadline goes on at once; the background look waits for the
    PREPARE and rolls back whatever it left, and says what it did."""
    caplog.set_level("INFO", logger="resilient_db")
    # a PREPARE of three seconds: the deadline, set once the server is seen running it (by
    # polling, slower on a busy machine), fires well inside it
    slow = SLOW_PREPARE.replace("pg_sleep(1)", "pg_sleep(3)")
    two_phase_server.execute(slow, database=two_databases[1])
    Sessions = two_phase_factory(rdb.AsyncResilientSession, two_async_engines, service)
    calls: list[int] = []
    running = (  # (see cut_while_preparing)
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
        "AND datname = current_database() AND query ILIKE 'PREPARE TRANSACTION%' "
        "AND wait_event = 'PgSleep'"
    )

    def preparing() -> bool:
        return bool(two_phase_server.execute(running, database=two_databases[1])[0][0])

    async def time_out_inside_the_prepare(deadline: asyncio.Timeout) -> None:
        # the deadline reached once the server runs the PREPARE (the unit awaits its answer),
        # however long the unit took to get there: not a fixed time after, which a busy
        # machine may overrun
        await asyncio.to_thread(wait_for, preparing, "the PREPARE")
        deadline.reschedule(asyncio.get_running_loop().time())

    watchers: list[asyncio.Future[None]] = []

    async def unit_with_that_deadline() -> None:
        async with asyncio.timeout(None) as deadline:
            watchers.append(asyncio.ensure_future(time_out_inside_the_prepare(deadline)))
            await Sessions.run(add_to_both_async, calls)

    with pytest.raises(TimeoutError):
        await unit_with_that_deadline()
    await watchers[0]
    assert calls == [1]
    await wait_for_async(lambda: bool(errand_lines(caplog)), "the background look's end")
    assert not preparing()
    assert pending_prepared(two_phase_server, two_databases) == []
    assert counts(two_phase_server, two_databases) == [0, 0]
    (handed,) = only(handed_over(caplog), caplog)
    assert "interrupted (CancelledError)" in handed  # (asyncio.timeout cancels, then raises)
    (line,) = only(errand_lines(caplog), caplog)
    # rolled back what the PREPARE left, or found it cancelled on the server: never "left"
    assert line.startswith(("Ended a two-phase unit's", "Two-phase unit ended")), line


class Interrupted(BaseException):
    """Raised by a signal handler in the main thread, as ``KeyboardInterrupt`` is on Ctrl-C (the
    factory treats every interruption alike; a stray ``KeyboardInterrupt`` would end the test
    run rather than fail the test)."""


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["runs", "exits", "no-thread", "look-fails"])
def test_a_sync_unit_interrupted_while_it_looks_for_a_lost_prepare_ends_it_in_a_thread(
    *,
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_proxied: tuple[FaultProxy, list[Any]],
    service: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    ending: str,
) -> None:
    """The sync twin: interrupted by a signal while it waits for a PREPARE the server is still
    carrying out (its connection lost); the interruption goes on at once, and a thread of the
    factory's waits for the PREPARE and rolls back what it left. Should the process exit
    first (its exit handler run while the PREPARE still runs, past the grace it waits), an
    ERROR line names what may be left, once; so it does when no thread can be started (the
    process at its limit of threads), and the interruption still goes on as it is, and when
    the look itself fails (here the factory's ``sleep``, in the errand's thread only)."""
    caplog.set_level("INFO", logger="resilient_db")
    proxy, engines = two_proxied
    slow = SLOW_PREPARE.replace("pg_sleep(1)", "pg_sleep(3)")
    two_phase_server.execute(slow, database=two_databases[1])
    main = threading.get_ident()
    looking = threading.Event()  # the unit waits between two looks for the PREPARE

    def sleep(seconds: float) -> None:
        if threading.get_ident() == main:
            looking.set()
        elif ending == "look-fails":
            raise RuntimeError("a sleep that fails")
        time.sleep(seconds)

    Sessions = two_phase_factory(rdb.ResilientSession, engines, service, sleep=sleep)

    def interrupt_once_cut() -> None:
        cutter = cut_while_preparing(two_phase_server, two_databases[1], proxy)
        cutter.join(10)
        # inside the PREPARE's seconds, while the factory looks (its unit waiting between two
        # looks: seen, not a fixed time after the cut, which a busy machine may overrun)
        if looking.wait(10):
            signal.pthread_kill(main, signal.SIGUSR1)

    def raise_interrupted(signum: int, frame: Any) -> None:
        raise Interrupted

    def no_thread(*args: Any) -> None:
        raise RuntimeError("can't start new thread")  # (as threading says at the limit)

    previous = signal.signal(signal.SIGUSR1, raise_interrupted)
    calls: list[int] = []
    try:
        interrupter = threading.Thread(target=interrupt_once_cut, daemon=True)
        interrupter.start()
        if ending == "no-thread":  # (after the interrupter's own thread started)
            monkeypatch.setattr(rdb_session, "start_thread", no_thread)
        with pytest.raises(Interrupted):
            Sessions.run(add_to_both, calls)
        interrupter.join(10)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert calls == [1]
    (handed,) = only(handed_over(caplog), caplog)
    assert "interrupted (Interrupted)" in handed
    if ending == "look-fails":
        wait_for(lambda: bool(errand_lines(caplog)), "the background look's end")
        (line,) = only(errand_lines(caplog), caplog)
        assert line.startswith("Two-phase unit not ended"), line
        assert "the background look failed (RuntimeError: a sleep that fails)" in line
        assert not rdb_errands._RUNNING
        return
    if ending == "no-thread":
        (line,) = only(errand_lines(caplog), caplog)
        assert line.startswith("Two-phase unit not ended"), line
        assert "no background look could be started (RuntimeError: can't start" in line
        assert not rdb_errands._RUNNING
        return
    if ending == "exits":
        (errand,) = rdb_errands._RUNNING
        monkeypatch.setattr(rdb_errands, "EXIT_GRACE", 0.1)
        rdb_errands._at_exit()  # (what the interpreter runs at exit: see atexit)
        assert not rdb_errands._RUNNING
        (line,) = only(errand_lines(caplog), caplog)
        assert line.startswith("Two-phase unit not ended"), line
        assert "the process exited first" in line
        assert line.split("may be left prepared: ")[1].split(" ")[0] in handed
        # the thread, finishing afterwards, has nothing more to say
        assert errand.thread is not None
        errand.thread.join(30)
        assert not errand.thread.is_alive()
        assert len(errand_lines(caplog)) == 1
        return
    wait_for(lambda: bool(errand_lines(caplog)), "the background look's end")
    assert pending_prepared(two_phase_server, two_databases) == []
    assert counts(two_phase_server, two_databases) == [0, 0]
    (line,) = only(errand_lines(caplog), caplog)
    assert line.startswith("Ended a two-phase unit's prepared transactions"), line
    assert line.rsplit(": ", 1)[1] in handed


# the PREPARE of the unit adding "first" runs a second, then fails (as one the server
# cancels): nothing of it is prepared
SLOW_THEN_FAILED = """
CREATE FUNCTION slow_prepare() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.name = 'first' THEN
    PERFORM pg_sleep(1);
    RAISE EXCEPTION 'cancelled' USING ERRCODE = '57014';
  END IF;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER slow_prepare AFTER INSERT ON items DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION slow_prepare();
"""

RUNNING_PREPARE = (  # (see cut_while_preparing)
    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
    "AND datname = current_database() AND query ILIKE 'PREPARE TRANSACTION%' "
    "AND wait_event = 'PgSleep'"
)


@pytest.mark.asyncio
async def test_an_errand_never_rolls_back_another_units_prepared_transaction(
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SQLAlchemy's ``create_xid`` draws a two-phase unit's xids from the process-wide
    ``random``: two units drawing from the same state of it (an application or a test runner
    that seeds it; prefork workers sharing it, as uWSGI's do unless told to call
    ``PyOS_AfterFork``) got the same xids. The first is cancelled in its PREPARE, which then
    fails on the server, leaving nothing prepared; its errand, its database unreachable a
    moment, keeps looking for its xid. It found the second unit's prepared transaction of
    that name between that unit's PREPARE and its COMMIT PREPARED, and rolled it back: the
    second unit failed (42704), though it did nothing wrong (spread over two databases it
    would have been partly committed). The factory's engines name two-phase transactions
    with the operating system's randomness: an errand finds only its own unit's."""
    caplog.set_level("INFO", logger="resilient_db")
    name = two_databases[0]
    two_phase_server.execute(SLOW_THEN_FAILED, database=name)
    with FaultProxy(two_phase_server) as proxy:
        async_engine = create_async_engine(proxy.url(name, driver="psycopg"))
        sync_engine = sa.create_engine(two_phase_server.url(name))
        config = rdb.Config(initial_delay=0.5, max_delay=1.0, max_retries=60, deadline=30)
        first = rdb.AsyncResilientSession(
            async_engine, service=service, twophase=True, config=config
        )
        second = rdb.ResilientSession(sync_engine, service=f"{service}-b", twophase=True)
        xids: list[str] = []
        event.listen(sync_engine, "prepare_twophase", lambda conn, xid: xids.append(str(xid)))

        def between_prepare_and_commit(*args: Any) -> None:
            # (the second unit's other database preparing, say: a moment between its PREPARE
            # here and its COMMIT PREPARED; the first unit's database reachable again)
            proxy.restore()
            wait_for(lambda: bool(errand_lines(caplog)), "the errand's end", timeout=10)

        event.listen(sync_engine, "commit_twophase", between_prepare_and_commit)

        async def add(session: Any, what: str) -> None:
            session.add(Item(name=what))

        def add_sync(session: Any, what: str) -> None:
            session.add(Item(name=what))

        outcome: list[BaseException | None] = []

        def second_unit() -> None:
            random.seed(31)  # (the state the first unit drew its xid from)
            try:
                second.run(add_sync, "second")
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        try:
            random.seed(31)
            unit = asyncio.ensure_future(first.run(add, "first"))
            await asyncio.to_thread(
                wait_for,
                lambda: two_phase_server.execute(RUNNING_PREPARE, database=name)[0][0] > 0,
                "the first PREPARE",
            )
            proxy.refuse()  # (new connections only: the unit's own goes on)
            unit.cancel()
            with pytest.raises(asyncio.CancelledError):
                await unit
            (handed,) = only(handed_over(caplog), caplog)
            await asyncio.to_thread(second_unit)
            await wait_for_async(lambda: bool(errand_lines(caplog)), "the errand's end")
            print("handed:", handed, "second unit's xids:", xids, *errand_lines(caplog))
            with sync_engine.connect() as conn:
                names = sorted(conn.scalars(sa.select(Item.name)))
            assert outcome == [None], outcome
            assert names == ["second"]
            (line,) = only(errand_lines(caplog), caplog)
            assert line.startswith("Two-phase unit ended"), line  # (nothing of its own left)
        finally:
            await async_engine.dispose()
            sync_engine.dispose()


def test_an_errand_said_at_exit_names_the_transaction_it_just_failed_to_end(
    *,
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_proxied: tuple[FaultProxy, list[Any]],
    service: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The errand's thread counted a transaction as looked for (``sweep.looked += 1``) before
    it noted how the look ended (``left`` or ``ended``), and the exit handler's ``done`` read
    ``ended``, ``left`` and ``looked`` with no lock the thread took. Should the process exit
    between the two (the thread is held at its first line once ``looked`` counts the look,
    by a trace function: the interleaving made certain, nothing else changed), that
    transaction was in none of them: a PREPARE still running at the errand's deadline, which
    will be left prepared, went unnamed, and the line said the unit "left nothing prepared"
    (INFO)."""
    caplog.set_level("INFO", logger="resilient_db")
    proxy, engines = two_proxied
    slow = SLOW_PREPARE.replace("pg_sleep(1)", "pg_sleep(4)")
    two_phase_server.execute(slow, database=two_databases[1])
    main = threading.get_ident()
    looking = threading.Event()  # the unit waits between two looks for the PREPARE

    def sleep(seconds: float) -> None:
        if threading.get_ident() == main:
            looking.set()
        time.sleep(seconds)

    Sessions = rdb.ResilientSession(
        engines[0],
        service=service,
        twophase=True,
        binds={Item: engines[0], Task: engines[1]},
        config=rdb.Config(deadline=1.0),  # (the errand's look ends with the PREPARE running)
        sleep=sleep,
    )
    held, release = threading.Event(), threading.Event()

    def hold_after_a_look(frame: Any, what: str, arg: Any) -> Any:
        # (at the errand's first line once the look that found the PREPARE still running
        # is counted as looked for)
        if (
            what == "line"
            and not held.is_set()
            and frame.f_locals["sweep"].looked
            and frame.f_locals.get("found", 0) is None
        ):
            held.set()
            release.wait(30)
        return hold_after_a_look

    def tracer(frame: Any, what: str, arg: Any) -> Any:
        if frame.f_code is rdb_session.ResilientSession._roll_back_prepared.__code__:
            return hold_after_a_look
        return None

    def interrupt_once_cut() -> None:
        cutter = cut_while_preparing(two_phase_server, two_databases[1], proxy)
        cutter.join(10)
        # inside the PREPARE's seconds, while the factory looks (its unit waiting between two
        # looks: seen, not a fixed time after the cut, which a busy machine may overrun)
        if looking.wait(10):
            signal.pthread_kill(main, signal.SIGUSR1)

    def raise_interrupted(signum: int, frame: Any) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGUSR1, raise_interrupted)
    calls: list[int] = []
    found = threading.gettrace()  # (a coverage run's, say: put back after the test)
    try:
        interrupter = threading.Thread(target=interrupt_once_cut, daemon=True)
        interrupter.start()
        threading.settrace(tracer)  # (the threads started from now on: the errand's)
        with pytest.raises(Interrupted):
            Sessions.run(add_to_both, calls)
        interrupter.join(10)
        assert held.wait(20), "the errand's look did not end with its PREPARE running"
        (errand,) = rdb_errands._RUNNING
        gid = errand.pending[-1][1]  # (the one whose PREPARE the cut left running)
        monkeypatch.setattr(rdb_errands, "EXIT_GRACE", 0.1)
        rdb_errands._at_exit()  # (what the interpreter runs at exit)
        release.set()
        assert errand.thread is not None
        errand.thread.join(30)
        (line,) = only(errand_lines(caplog), caplog)
        assert line.startswith("Two-phase unit not ended"), line
        assert f"{gid}: its PREPARE was still running at the last look" in line, line
    finally:
        threading.settrace(found)  # type: ignore[arg-type]
        release.set()
        signal.signal(signal.SIGUSR1, previous)


REFUSE_FIRST_PREPARE = """
CREATE FUNCTION refuse_prepare() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.idem_key = 'k-1' THEN  -- the first attempt's task
    RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001';
  END IF;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER refuse_prepare AFTER INSERT ON tasks DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION refuse_prepare();
"""


def refused_then_replayed(caplog: pytest.LogCaptureFixture) -> None:
    retries = [r.getMessage() for r in caplog.records if "Retry attempt" in r.getMessage()]
    assert len(retries) == 1
    assert "conflict (SQLSTATE 40001)" in retries[0]


def test_a_prepare_the_server_refuses_with_a_conflict_is_replayed(
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_engines: list[Any],
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A deferred trigger refuses the second database's PREPARE with 40001 (as SERIALIZABLE
    may): a conflict, to be replayed as one at COMMIT is. psycopg's rollback of the failed
    PREPARE step hid it behind 42704 ("prepared transaction ... does not exist": psycopg takes
    the transaction for prepared once ``tpc_prepare()`` began, and sends ROLLBACK PREPARED),
    which the unit raised, not replayed, and which no classifier could take for what it was.
    The default classifier here."""
    caplog.set_level("INFO", logger="resilient_db")
    two_phase_server.execute(REFUSE_FIRST_PREPARE, database=two_databases[1])
    Sessions = two_phase_factory(rdb.ResilientSession, two_engines, service, classifier=None)
    calls: list[int] = []
    Sessions.run(add_to_both, calls)
    assert calls == [1, 1]
    assert counts(two_phase_server, two_databases) == [1, 1]
    assert pending_prepared(two_phase_server, two_databases) == []
    refused_then_replayed(caplog)


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_async_a_prepare_the_server_refuses_with_a_conflict_is_replayed(
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_async_engines: list[Any],
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The async twin, on both drivers (asyncpg's dialect prepares with a statement, and was
    not affected)."""
    caplog.set_level("INFO", logger="resilient_db")
    two_phase_server.execute(REFUSE_FIRST_PREPARE, database=two_databases[1])
    Sessions = two_phase_factory(
        rdb.AsyncResilientSession, two_async_engines, service, classifier=None
    )
    calls: list[int] = []
    await Sessions.run(add_to_both_async, calls)
    assert calls == [1, 1]
    assert counts(two_phase_server, two_databases) == [1, 1]
    assert pending_prepared(two_phase_server, two_databases) == []
    refused_then_replayed(caplog)


# -- a server with prepared transactions disabled ------------------------------------------------
# PostgreSQL's default, max_prepared_transactions = 0 (the suite's own server keeps it), refuses
# PREPARE TRANSACTION with 55000 "prepared transactions are disabled". psycopg raises that as a
# NotSupportedError of its own, without a SQLSTATE (the server's error only its context), and
# its rollback then sends ROLLBACK PREPARED for a transaction never prepared: plain SQLAlchemy
# raises 42704 "prepared transaction ... does not exist", the refusal hidden in its context.


@pytest.fixture
def disabled_engine(engine: sa.Engine) -> sa.Engine:
    """The module's engine, on the suite's server: prepared transactions disabled there."""
    with engine.connect() as conn:
        if conn.exec_driver_sql("SHOW max_prepared_transactions").scalar() != "0":
            pytest.skip("needs a server with max_prepared_transactions = 0")
    return engine


def refused_as_disabled(exc: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    """``exc`` is the server's refusal of PREPARE TRANSACTION, which names the setting, a
    configuration error (not retried), and no line took it for a COMMIT whose answer was
    lost, nor logged the pool's failed reset (see :func:`no_failed_reset`)."""
    assert rdb.sqlstate_of(exc) == "55000"
    assert "prepared transactions are disabled" in str(exc)
    assert rdb.classify(exc) is rdb.Outcome.NOT_TRANSIENT
    if sys.version_info >= (3, 11):
        assert any("max_prepared_transactions" in note for note in exc.__notes__)
    assert not [r for r in caplog.records if "outcome unknown" in r.getMessage()]
    no_failed_reset(caplog)


def no_failed_reset(caplog: pytest.LogCaptureFixture) -> None:
    """No ERROR of SQLAlchemy's pool: psycopg keeps a connection whose ROLLBACK PREPARED failed
    in its two-phase transaction (every later ``rollback()`` raises ProgrammingError), so the
    pool's reset of it at checkin failed, logged as "Exception during reset or similar" with a
    traceback, for a refusal the unit's own error says. The factory discards that connection
    as the rollback fails (the pool made a new one either way)."""
    pool_errors = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("sqlalchemy.pool") and r.levelno >= logging.ERROR
    ]
    assert pool_errors == []


def tasks_in(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(sa.select(sa.func.count()).select_from(Task)) or 0)


def test_a_two_phase_unit_with_prepared_transactions_disabled_raises_the_refusal(
    *,
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_engines: list[Any],
    disabled_engine: sa.Engine,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Items in a database of a server with prepared transactions, tasks on one without: the
    latter's PREPARE is refused (the other's prepared before it or not: SQLAlchemy prepares
    them in no set order). The unit raised 42704 from psycopg's rollback, and nothing said what
    to set. Now it raises the refusal, once (a configuration error: not replayed), with a note
    naming the setting, and nothing is left prepared."""
    caplog.set_level("INFO", logger="resilient_db")
    engines = [two_engines[0], disabled_engine]
    Sessions = two_phase_factory(rdb.ResilientSession, engines, service, classifier=None)
    calls: list[int] = []
    with pytest.raises(sa.exc.DBAPIError) as info:
        Sessions.run(add_to_both, calls)
    refused_as_disabled(info.value, caplog)
    assert calls == [1]
    assert pending_prepared(two_phase_server, two_databases) == []
    assert counts(two_phase_server, two_databases) == [0, 0]
    assert tasks_in(disabled_engine) == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_async_a_two_phase_unit_with_prepared_transactions_disabled_raises_the_refusal(
    *,
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_async_engines: list[Any],
    disabled_engine: sa.Engine,
    pg_server: Any,
    pg_database: str,
    driver: str,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The async twin, on both drivers (asyncpg's dialect prepares with a statement and rolls
    back with a plain ROLLBACK: it raised the refusal, without the server's hint)."""
    caplog.set_level("INFO", logger="resilient_db")
    disabled = create_async_engine(
        pg_server.url(pg_database, driver=driver), connect_args=async_connect_args(driver, 2)
    )
    try:
        engines = [two_async_engines[0], disabled]
        Sessions = two_phase_factory(rdb.AsyncResilientSession, engines, service, classifier=None)
        calls: list[int] = []
        with pytest.raises(sa.exc.DBAPIError) as info:
            await Sessions.run(add_to_both_async, calls)
    finally:
        await disabled.dispose()
    refused_as_disabled(info.value, caplog)
    assert calls == [1]
    assert pending_prepared(two_phase_server, two_databases) == []
    assert counts(two_phase_server, two_databases) == [0, 0]
    assert tasks_in(disabled_engine) == 0


def test_a_drop_in_two_phase_block_with_prepared_transactions_disabled(
    disabled_engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Drop-in use (``with Session.begin()``) raises what SQLAlchemy raises, as with
    ``sessionmaker``; but the refused PREPARE, which carried no SQLSTATE, was taken for a
    COMMIT whose answer was lost: an ERROR line "Commit outcome unknown" and an unknown
    outcome counted, for a transaction that saved nothing."""
    caplog.set_level("INFO", logger="resilient_db")
    Sessions = rdb.ResilientSession(disabled_engine, service=service, twophase=True)
    with pytest.raises(sa.exc.DBAPIError) as info, Sessions.begin() as session:
        session.add(Task(idem_key="k-1", title="drop-in"))
    assert rdb.classify(info.value) is rdb.Outcome.NOT_TRANSIENT
    assert not [r for r in caplog.records if "outcome unknown" in r.getMessage()]
    no_failed_reset(caplog)
    assert rdb.health()["services"][service]["counters"]["unknown_commits"] == 0
    assert tasks_in(disabled_engine) == 0


def test_a_lost_prepare_that_cant_be_looked_for_is_not_replayed(
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_proxied: tuple[FaultProxy, list[Any]],
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The PREPARE's answer is lost and no new connection gets through while the factory
    looks for what it left prepared: the unit is not replayed (a replay could wait on the
    prepared transaction's locks for good), and the line names it for the operator."""
    proxy, engines = two_proxied
    Sessions = two_phase_factory(rdb.ResilientSession, engines, service)
    seen = kill_at_a_prepare(two_phase_server, engines[1], after=True)

    def refuse_new_connections(_context: Any) -> None:  # the PREPARE lost: before looking
        proxy.refuse()

    sa.event.listen(engines[1], "handle_error", refuse_new_connections)
    calls: list[int] = []
    with caplog.at_level("ERROR", logger="resilient_db"), pytest.raises(sa.exc.DBAPIError):
        Sessions.run(add_to_both, calls)
    assert calls == [1]
    assert counts(two_phase_server, two_databases) == [0, 0]
    left = pending_prepared(two_phase_server, two_databases)
    assert left == [seen[0]]  # (the fixture rolls it back)
    assert any(
        "Two-phase unit not ended" in r.getMessage() and seen[0] in r.getMessage()
        for r in caplog.records
    )


def test_a_swallowed_commit_prepared_is_finished_not_left_pending(
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_proxied: tuple[FaultProxy, list[Any]],
    service: str,
) -> None:
    """The first COMMIT PREPARED never reaches the server and the connection drops: both
    databases hold a prepared transaction, which outlives its connection and keeps its locks.
    The unit had decided to commit, so the factory commits both on new connections (as a
    two-phase coordinator recovers) and the unit is done, once."""
    proxy, engines = two_proxied
    Sessions = two_phase_factory(rdb.ResilientSession, engines, service)
    calls: list[int] = []
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = Sessions.run(add_to_both, calls)
        except Exception as exc:  # checked below
            outcome["error"] = exc

    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    install_opentelemetry(meter_provider=meter_provider)
    try:
        proxy.swallow_commit()
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        wait_for(lambda: proxy.commits_swallowed == 1, "the COMMIT PREPARED held", timeout=10)
        assert len(pending_prepared(two_phase_server, two_databases)) == 2
        proxy.release_swallowed()
        worker.join(30)
        assert not worker.is_alive()
        verifications = otel_points(reader, "resilient_db.commit.verifications")
    finally:
        uninstall_opentelemetry()
        meter_provider.shutdown()
    assert "error" not in outcome, outcome
    assert calls == [1]  # done once, not replayed
    assert counts(two_phase_server, two_databases) == [1, 1]
    assert pending_prepared(two_phase_server, two_databases) == []
    # counted once as a verified commit, by health() and OpenTelemetry alike
    assert rdb.health()["services"][service]["counters"]["verified_commits"] == 1
    assert verifications == {(("outcome", "committed"), ("service", service)): 1}


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_async_a_swallowed_commit_prepared_is_finished_not_left_pending(
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_async_proxied: tuple[FaultProxy, list[Any]],
    service: str,
) -> None:
    """The async twin, on both drivers."""
    proxy, engines = two_async_proxied
    Sessions = two_phase_factory(rdb.AsyncResilientSession, engines, service)
    calls: list[int] = []
    proxy.swallow_commit()
    unit = asyncio.ensure_future(Sessions.run(add_to_both_async, calls))
    await wait_for_async(
        lambda: proxy.commits_swallowed == 1, "the COMMIT PREPARED held", timeout=10
    )
    assert len(pending_prepared(two_phase_server, two_databases)) == 2
    proxy.release_swallowed()
    await asyncio.wait_for(unit, 30)
    assert calls == [1]  # done once, not replayed
    assert counts(two_phase_server, two_databases) == [1, 1]
    assert pending_prepared(two_phase_server, two_databases) == []


def test_a_two_phase_unit_that_cant_finish_keeps_its_prepared_transactions(
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_proxied: tuple[FaultProxy, list[Any]],
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first COMMIT PREPARED's answer is lost and no new connection gets through while the
    factory tries to finish: the outcome is unknown, and the other database's prepared
    transaction is kept prepared, named in the line, never rolled back (SQLAlchemy's rollback
    sent ROLLBACK PREPARED for it while the first database had committed: half a unit)."""
    proxy, engines = two_proxied
    Sessions = two_phase_factory(rdb.ResilientSession, engines, service)
    calls: list[int] = []

    def refuse_new_connections(_context: Any) -> None:  # the answer lost: before finishing
        if proxy.commits_lost:
            proxy.refuse()

    for eng in engines:
        sa.event.listen(eng, "handle_error", refuse_new_connections)
    proxy.lose_commit_answer()
    try:
        with (
            caplog.at_level(logging.WARNING, logger="resilient_db"),
            pytest.raises(rdb.CommitOutcomeUnknownError),
        ):
            Sessions.run(add_to_both, calls)
    finally:
        proxy.restore()
    assert proxy.commits_lost == 1
    assert calls == [1]
    left = pending_prepared(two_phase_server, two_databases)
    assert len(left) == 1  # kept prepared, for an operator to COMMIT PREPARED
    assert sorted(counts(two_phase_server, two_databases)) == [0, 1]  # one committed
    (line,) = [r.getMessage() for r in caplog.records if "Commit outcome unknown" in r.getMessage()]
    assert "kept prepared, never rolled back" in line
    assert left[0] in line


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_a_two_phase_unit_cancelled_while_it_finishes_keeps_its_prepared_transactions(
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_async_proxied: tuple[FaultProxy, list[Any]],
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The async twin, on both drivers, cancelled (a client gone, ``asyncio.timeout``) while the
    factory backs off between its tries to finish: the interruption is said and counted, naming
    the prepared transaction kept."""
    proxy, engines = two_async_proxied
    backing_off = asyncio.Event()

    async def asleep(_seconds: float) -> None:
        backing_off.set()
        await asyncio.Event().wait()  # until cancelled

    Sessions = rdb.AsyncResilientSession(
        engines[0],
        service=service,
        twophase=True,
        binds={Item: engines[0], Task: engines[1]},
        asleep=asleep,
    )

    def refuse_new_connections(_context: Any) -> None:  # the answer lost: before finishing
        if proxy.commits_lost:
            proxy.refuse()

    for eng in engines:
        sa.event.listen(eng.sync_engine, "handle_error", refuse_new_connections)
    calls: list[int] = []
    proxy.lose_commit_answer()
    try:
        with caplog.at_level(logging.WARNING, logger="resilient_db"):
            unit = asyncio.ensure_future(Sessions.run(add_to_both_async, calls))
            await asyncio.wait_for(backing_off.wait(), 30)
            unit.cancel()
            with pytest.raises(asyncio.CancelledError):
                await unit
    finally:
        proxy.restore()
    assert calls == [1]
    left = pending_prepared(two_phase_server, two_databases)
    assert len(left) == 1
    assert sorted(counts(two_phase_server, two_databases)) == [0, 1]
    (line,) = [r.getMessage() for r in caplog.records if "Commit interrupted" in r.getMessage()]
    assert "kept prepared, never rolled back" in line
    assert left[0] in line
    assert rdb.health()["services"][service]["counters"]["unknown_commits"] == 1


def test_a_lost_commit_prepared_answer_still_finishes_the_other_database(
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_proxied: tuple[FaultProxy, list[Any]],
    service: str,
) -> None:
    """The first COMMIT PREPARED commits but its answer is lost: SQLAlchemy never sends the
    second. That one is committed by the factory (the unit's decision); whether the first
    committed can't be told without a marker, so the unit ends unknown, and nothing is left
    pending."""
    proxy, engines = two_proxied
    Sessions = two_phase_factory(rdb.ResilientSession, engines, service)
    calls: list[int] = []
    proxy.lose_commit_answer()
    with pytest.raises(rdb.CommitOutcomeUnknownError):
        Sessions.run(add_to_both, calls)
    assert proxy.commits_lost == 1
    assert calls == [1]
    assert counts(two_phase_server, two_databases) == [1, 1]
    assert pending_prepared(two_phase_server, two_databases) == []


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_async_a_lost_commit_prepared_answer_still_finishes_the_other_database(
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_async_proxied: tuple[FaultProxy, list[Any]],
    service: str,
) -> None:
    """The async twin, on both drivers."""
    proxy, engines = two_async_proxied
    Sessions = two_phase_factory(rdb.AsyncResilientSession, engines, service)
    calls: list[int] = []
    proxy.lose_commit_answer()
    with pytest.raises(rdb.CommitOutcomeUnknownError):
        await Sessions.run(add_to_both_async, calls)
    assert proxy.commits_lost == 1
    assert calls == [1]
    assert counts(two_phase_server, two_databases) == [1, 1]
    assert pending_prepared(two_phase_server, two_databases) == []


def test_a_commit_prepared_cut_off_is_finished_not_left_pending(
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_engines: list[Any],
    service: str,
) -> None:
    """A real disconnect: the backend of the first COMMIT PREPARED is terminated before it
    arrives. Both prepared transactions are committed on new connections; the unit is done,
    once, and nothing is left pending."""
    Sessions = two_phase_factory(rdb.ResilientSession, two_engines, service)
    seen = kill_before_the_first_commit_prepared(two_phase_server, two_engines)
    calls: list[int] = []
    Sessions.run(add_to_both, calls)
    assert len(seen) == 1  # SQLAlchemy sent no second COMMIT PREPARED: finished here
    assert calls == [1]
    assert counts(two_phase_server, two_databases) == [1, 1]
    assert pending_prepared(two_phase_server, two_databases) == []


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_async_a_commit_prepared_cut_off_is_finished_not_left_pending(
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_async_engines: list[Any],
    service: str,
) -> None:
    """The async twin, on both drivers."""
    Sessions = two_phase_factory(rdb.AsyncResilientSession, two_async_engines, service)
    seen = kill_before_the_first_commit_prepared(two_phase_server, two_async_engines)
    calls: list[int] = []
    await Sessions.run(add_to_both_async, calls)
    assert len(seen) == 1
    assert calls == [1]
    assert counts(two_phase_server, two_databases) == [1, 1]
    assert pending_prepared(two_phase_server, two_databases) == []


def test_a_unit_that_ran_a_committed_two_phase_unit_is_not_replayed(
    two_phase_server: PostgresServer,
    two_databases: tuple[str, str],
    two_engines: list[Any],
    service: str,
) -> None:
    """A two-phase unit of another factory inside a unit commits on its own (its COMMIT
    PREPAREDs carry no ticket): a replay of the enclosing unit would write it again."""
    Inner = two_phase_factory(rdb.ResilientSession, two_engines, service)
    inner_calls: list[int] = []
    runs = conflict_after_another_factorys_unit(
        two_phase_server.url("two_phase"), service, lambda: Inner.run(add_to_both, inner_calls)
    )
    assert runs == 1
    assert inner_calls == [1]
    assert counts(two_phase_server, two_databases) == [1, 1]


_SYNC_BEFORE_ASYNC = """
import sys
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
import resilient_db as rdb
from resilient_db.testing import FaultProxy

url, async_url, host, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
proxy = FaultProxy((host, port))
try:
    through = url.replace(f"@{host}:{port}/", f"@{proxy.host}:{proxy.port}/")
    config = rdb.Config(initial_delay=0.01)
    Session = rdb.ResilientSession(sa.create_engine(through), service="sync", config=config)
    rdb.AsyncResilientSession(create_async_engine(async_url), service="async", config=config)

    def add(session):
        session.execute(sa.text("INSERT INTO sync_before_async DEFAULT VALUES"))

    Session.run(add)  # connects (and looks for the markers) before the answer is lost
    proxy.lose_commit_answer()
    Session.run(add)
    counters = rdb.health()["services"]["sync"]["counters"]
    print(counters["verified_commits"], counters["unknown_commits"], proxy.commits_lost)
finally:
    proxy.close()
"""


def test_a_sync_factory_made_before_an_async_one_records_each_connection_once(
    engine: sa.Engine, pg_url: str, pg_async_url: str, tmp_path: Any
) -> None:
    """An async factory makes SQLAlchemy's Session listen for the unit's connections; a sync
    factory's class made earlier listened itself: both heard each BEGIN, and a unit on one
    connection, taken for one spanning two, had its lost COMMIT answer reported unknown instead
    of verified. A fresh process: in this one, Session listens since the first async factory."""
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE sync_before_async (id serial PRIMARY KEY)")
    url = sa.make_url(pg_url)
    script = tmp_path / "sync_before_async.py"
    script.write_text(_SYNC_BEFORE_ASYNC)
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            pg_url,
            pg_async_url,
            str(url.host),
            str(url.port),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "0", "1"]  # verified, not unknown; one answer lost
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM sync_before_async").scalar() == 2


@pytest.mark.parametrize("variable", ["SELF_HEALING_LOG_LEVEL=debug", "SELF_HEALING_LOGGING=off"])
def test_factories_on_one_engine_may_log_differently(
    engine: sa.Engine, service: str, clean_env: pytest.MonkeyPatch, variable: str
) -> None:
    """A default factory (the environment's settings) and one with ``config=`` on one engine:
    turning debug logging on (or logging off) in the environment made the second refuse to
    start. Logging is no engine-wide setting: the engine's own lines follow the latest."""
    name, value = variable.split("=")
    clean_env.setenv(name, value)
    default = rdb.ResilientSession(engine, service=service)
    explicit = rdb.ResilientSession(engine, service=f"{service}-x", config=rdb.Config())
    assert default.run(lambda session: session.scalar(sa.select(sa.literal(1)))) == 1
    assert explicit.run(lambda session: session.scalar(sa.select(sa.literal(2)))) == 2


def test_a_kill_switch_refusal_says_how_to_follow_the_environment(
    engine: sa.Engine, service: str, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("SELF_HEALING_ENABLED", "false")
    # held: the refusal is about the engine's live factories (a dropped one, collected by a
    # garbage collection that came between, made the test depend on the tests before it)
    following = rdb.ResilientSession(engine, service=service)
    with pytest.raises(ValueError, match=r"enabled: False there, True here") as info:
        rdb.ResilientSession(engine, service=f"{service}-x", config=rdb.Config())
    assert "config=rdb.load_config().replace(...)" in str(info.value)
    follows = rdb.load_config().replace(max_retries=9)
    rdb.ResilientSession(engine, service=f"{service}-y", config=follows)  # agrees: accepted
    assert not following.config.enabled


# -- a drop-in COMMIT whose answer is lost ---------------------------------------------------
@pytest.mark.parametrize("write", [True, False])
def test_a_drop_in_commit_whose_answer_is_lost_is_an_unknown_outcome_not_a_transient_error(
    engine: sa.Engine,
    pg_database: str,
    fault_proxy: FaultProxy,
    service: str,
    write: bool,
    *,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Drop-in use raises the driver's error, as plain SQLAlchemy does; it was classified a
    transient disconnect, and the web handlers answered "503, retry shortly" for a write that
    had committed: a client obeying Retry-After wrote twice. A COMMIT that may have written
    and got no answer is an unknown outcome (a 500 that says to check first); a read's stays
    a transient disconnect."""
    from resilient_db.web import problem_details  # noqa: PLC0415 - the web extra

    name = f"lost-{uuid.uuid4()}"
    proxied = sa.create_engine(fault_proxy.url(pg_database))
    Sessions = rdb.ResilientSession(proxied, service=service)
    try:
        with Sessions() as session:
            session.execute(sa.text("SELECT 1"))
            session.commit()  # connected
            if write:
                session.add(Item(name=name))
            else:
                session.execute(sa.text("SELECT 1"))
            fault_proxy.lose_commit_answer()
            with (
                caplog.at_level(logging.WARNING, logger="resilient_db"),
                pytest.raises(sa.exc.OperationalError) as raised,
            ):
                session.commit()
    finally:
        proxied.dispose()
    assert fault_proxy.commits_lost == 1
    answer = problem_details(raised.value)
    assert answer is not None
    # is_transient: "whether replaying your unit may succeed" (the README's drop-in advice);
    # it said yes to the write, which had committed: a replay wrote it twice
    assert rdb.is_transient(raised.value) is not write
    # said and counted, as a unit's unknown outcome is (nothing was, before)
    assert rdb.health()["services"][service]["counters"]["unknown_commits"] == int(write)
    assert ("Commit outcome unknown" in caplog.text) is write
    if write:
        assert rdb.classify(raised.value) is rdb.Outcome.COMMIT_UNKNOWN
        assert answer.status == 500
        assert answer.body["type"].endswith("commit-outcome-unknown")
        assert "Retry-After" not in answer.headers
        with engine.connect() as conn:  # it did commit
            assert conn.scalar(sa.select(sa.func.count()).where(Item.name == name)) == 1
    else:
        assert rdb.classify(raised.value) is rdb.Outcome.DISCONNECT
        assert answer.status == 503


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_an_async_drop_in_commit_whose_answer_is_lost_is_an_unknown_outcome(
    engine: sa.Engine, pg_database: str, fault_proxy: FaultProxy, service: str, driver: str
) -> None:
    name = f"lost-{uuid.uuid4()}"
    proxied = create_async_engine(fault_proxy.url(pg_database, driver=driver))
    Sessions = rdb.AsyncResilientSession(proxied, service=service)
    try:
        async with Sessions() as session:
            await session.execute(sa.text("SELECT 1"))
            await session.commit()
            session.add(Item(name=name))
            fault_proxy.lose_commit_answer()
            with pytest.raises(sa.exc.DBAPIError) as raised:
                await session.commit()
    finally:
        await proxied.dispose()
    assert fault_proxy.commits_lost == 1
    assert rdb.classify(raised.value) is rdb.Outcome.COMMIT_UNKNOWN
    assert not rdb.is_transient(raised.value)
    assert rdb.health()["services"][service]["counters"]["unknown_commits"] == 1
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).where(Item.name == name)) == 1


@pytest.mark.parametrize("how", ["with_self_healing", "the-units-own-commit"])
def test_an_own_commit_whose_answer_is_lost_is_an_unknown_outcome(
    engine: sa.Engine,
    pg_database: str,
    fault_proxy: FaultProxy,
    service: str,
    how: str,
    *,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same lost answer inside an operation: ``with_self_healing`` around drop-in work (a
    route handler), or a unit's own ``session.commit()``. Not replayed (it committed itself),
    and not a transient error either: the web answer was 503 with Retry-After. Its line said
    the unit "committed part of its work", which nobody knows: it says the outcome is
    unknown."""
    from resilient_db.web import problem_details  # noqa: PLC0415 - the web extra

    name = f"own-{uuid.uuid4()}"
    proxied = sa.create_engine(fault_proxy.url(pg_database))
    Sessions = rdb.ResilientSession(proxied, service=service)
    calls: list[int] = []

    @rdb.with_self_healing(service=service)
    def handler() -> None:
        calls.append(1)
        with Sessions() as session:
            session.add(Item(name=name))
            session.commit()

    def unit(session: Session) -> None:
        calls.append(1)
        session.add(Item(name=name))
        session.commit()

    try:
        Sessions.run(lambda session: session.execute(sa.text("SELECT 1")))  # connected
        fault_proxy.lose_commit_answer()
        with (
            caplog.at_level(logging.WARNING, logger="resilient_db"),
            pytest.raises(sa.exc.OperationalError) as raised,
        ):
            handler() if how == "with_self_healing" else Sessions.run(unit)
    finally:
        proxied.dispose()
    assert fault_proxy.commits_lost == 1
    assert calls == [1]
    assert "lost its answer" in caplog.text
    assert "the outcome is unknown" in caplog.text
    assert "committed part of its work" not in caplog.text
    assert rdb.classify(raised.value) is rdb.Outcome.COMMIT_UNKNOWN
    answer = problem_details(raised.value)
    assert answer is not None
    assert answer.status == 500
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).where(Item.name == name)) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("fail", [False, True])
async def test_async_begin_left_in_another_task_commits_and_closes_as_plain(
    async_engine: AsyncEngine, engine: sa.Engine, service: str, fail: bool
) -> None:
    """An async factory's ``Session.begin()`` block entered in one task and left in another (an
    async generator whose setup and teardown two tasks drive: an AnyIO portal, a fixture run
    by ``create_task``): it raised ``ValueError`` (its context variable's token was made in
    another context) after its COMMIT, left the session open, and hid the block's own error.
    Now as plain ``async_sessionmaker.begin()``: committed and closed, or the block's error."""
    outcomes = []
    for n, factory in enumerate(
        (async_sessionmaker(async_engine), rdb.AsyncResilientSession(async_engine, service=service))
    ):

        async def block(factory: Any = factory) -> AsyncIterator[AsyncSession]:
            async with factory.begin() as session:
                yield session

        gen = block()
        session = await asyncio.create_task(gen.__anext__())  # entered in one task
        item = Item(id=900 + n, name=f"cross-task-{n}")
        session.add(item)

        async def leave(gen: Any = gen) -> None:
            if fail:
                await gen.athrow(KeyError("the block's own error"))
            else:
                with pytest.raises(StopAsyncIteration):
                    await gen.__anext__()

        try:
            await asyncio.create_task(leave())  # left in another
            outcomes.append("done")
        except KeyError as err:
            outcomes.append(str(err))
        outcomes.append(sa.inspect(item).detached)
    with engine.connect() as conn:
        ids = list(conn.scalars(sa.text("SELECT id FROM items WHERE id >= 900 ORDER BY id")))
    if fail:
        assert outcomes == ['"the block\'s own error"', False] * 2
        assert ids == []
    else:
        assert outcomes == ["done", True] * 2
        assert ids == [900, 901]


#: drop-in blocks entered in one thread or task and left in another, in the tests below
LEFT_ELSEWHERE = 30


def _notes_held() -> list[Any]:
    """The drop-in blocks' notes this context holds: the innermost and those it encloses."""
    from resilient_db._statements import dropin_block  # noqa: PLC0415

    notes = []
    note = dropin_block.get()
    while note is not None:
        notes.append(note)
        note = note.enclosing
    return notes


def test_sync_blocks_left_in_another_thread_leave_no_chain_behind(
    engine: sa.Engine, service: str
) -> None:
    """Sessions entered (``with``) in one thread and left in another (a worker pool running a
    generator's setup and teardown as two jobs): the thread that entered them can't take their
    notes out of its context, and each block it entered next held the one before (its note
    enclosed the one left behind), a chain as long as the blocks run, held for the thread's
    life. Now a block entered there encloses the block around it, still heard (a save in it is
    the outer block's too), not the notes left behind."""
    Sessions = rdb.ResilientSession(engine, service=service)

    def blocks() -> tuple[int, int, bool]:
        with concurrent.futures.ThreadPoolExecutor(1) as other, Sessions():
            (outer_note,) = _notes_held()
            for _ in range(LEFT_ELSEWHERE):
                session = Sessions()
                session.__enter__()
                session.execute(sa.text("SELECT 1"))
                other.submit(session.__exit__, None, None, None).result()
            held_after = len(_notes_held())
            with Sessions() as inner:
                inner.add(Item(id=950, name="left-elsewhere"))
                inner.commit()
                notes = _notes_held()
                held_inside = len(notes)
                assert notes[-1] is outer_note
        return held_after, held_inside, outer_note.saved

    # (in a context of its own: the test's thread keeps none of it)
    held_after, held_inside, outer_saved = contextvars.copy_context().run(blocks)
    assert (held_after, held_inside, outer_saved) == (2, 2, True)


@pytest.mark.asyncio
async def test_async_blocks_left_in_another_task_leave_no_chain_behind(
    async_engine: AsyncEngine, service: str
) -> None:
    """The async twin: ``Session.begin()`` blocks and ``async with Session()`` sessions entered
    in one task and left in another (an async generator whose setup and teardown two tasks
    drive) made a chain of notes in the entering task's context, as long as the blocks run."""
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)

    async def blocks() -> tuple[int, int]:
        for _ in range(LEFT_ELSEWHERE):
            begun = Sessions.begin()
            session = await begun.__aenter__()
            await session.execute(sa.text("SELECT 1"))
            await asyncio.create_task(begun.__aexit__(None, None, None))
            session = Sessions()
            await session.__aenter__()
            await session.execute(sa.text("SELECT 1"))
            await asyncio.create_task(session.__aexit__(None, None, None))
        held_after = len(_notes_held())
        async with Sessions.begin():
            held_inside = len(_notes_held())
        return held_after, held_inside

    # (a task of its own: its context is dropped with it)
    assert await asyncio.create_task(blocks()) == (1, 1)


def test_factories_made_and_dropped_leave_no_event_registrations(
    engine: sa.Engine, service: str
) -> None:
    """A factory per request (or per tenant, or per test) grew SQLAlchemy's event registry for
    good: each sync factory's own class listened for the drop-in connect retry, and the
    registry keeps an entry per class that listened after the class is gone (keyed by its
    ``id()``): +52,000 entries and +21 MB after 80,000 factories, where ``sessionmaker`` stays
    flat. Listened once on a base shared by the factories given one class. (The registry is
    SQLAlchemy's private ``event.registry._key_to_collection``; read here only, to count.)"""
    from sqlalchemy.event import registry  # noqa: PLC0415 - the private registry, this test only

    entries = getattr(registry, "_key_to_collection", None)
    assert entries is not None, "SQLAlchemy's event registry moved: count its entries anew"

    def make_and_drop(n: int) -> None:
        for _ in range(n):
            factory = rdb.ResilientSession(engine, service=service)
            with factory() as session:
                session.execute(sa.text("SELECT 1"))
        gc.collect()

    make_and_drop(5)
    before = len(entries)
    make_and_drop(300)
    assert len(entries) - before < 10


_CLASS_PER_FACTORY = """
import asyncio, gc, sys
import sqlalchemy as sa
from sqlalchemy.event import registry
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session, sessionmaker
import resilient_db as rdb

url, async_url = sys.argv[1], sys.argv[2]
engine = sa.create_engine(url)
entries = registry._key_to_collection  # SQLAlchemy's private registry, counted only


def tenant_class(routes):
    class Tenant(Session):
        if routes:  # a class that picks its engine itself (a get_bind of its own)
            def get_bind(self, *args, **kwargs):
                return engine
    return Tenant


def sync(n, routes):
    for _ in range(n):
        Tenant = tenant_class(routes)
        factory = rdb.ResilientSession(None if routes else engine, service="s", class_=Tenant)
        with factory() as session:
            session.execute(sa.text("SELECT 1"))
        del factory, session, Tenant
    gc.collect()
    return len(entries)


async def asynchronous(aengine, n, maker):
    for _ in range(n):
        given = sessionmaker() if maker else tenant_class(False)
        factory = rdb.AsyncResilientSession(aengine, service="a", sync_session_class=given)
        async with factory() as session:
            await session.execute(sa.text("SELECT 1"))
        del factory, session, given
    gc.collect()
    return len(entries)


async def main():
    grown = []
    for routes in (False, True):  # first: no async factory yet (Session does not listen)
        before = sync(5, routes)
        grown.append(sync(200, routes) - before)
    aengine = create_async_engine(async_url)
    for maker in (False, True):
        before = await asynchronous(aengine, 5, maker)
        grown.append(await asynchronous(aengine, 200, maker) - before)
    await aengine.dispose()
    print(*grown)


asyncio.run(main())
engine.dispose()
"""


def test_factories_given_a_class_made_per_tenant_leave_no_event_registrations(
    pg_url: str, pg_async_url: str, tmp_path: Any
) -> None:
    """A session class made per tenant (or per test) and given to its factory (``class_=``;
    async: ``sync_session_class=``, a class or a ``sessionmaker``): the class listening for
    the drop-in connect retry was made per class given, and SQLAlchemy's event registry kept
    its entries after the class and its factories were gone: +369 entries per 200 factories
    (sync), +249 (async). A sync factory's listening base now leaves the registry when it is
    freed; an async factory listens on ``Session``. A fresh process: in
    this one, ``Session`` listens since the first async factory, and nothing listens per class
    (the sync leak only shows before that)."""
    script = tmp_path / "class_per_factory.py"
    script.write_text(_CLASS_PER_FACTORY)
    done = subprocess.run(
        [sys.executable, str(script), pg_url, pg_async_url],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    grown = [int(word) for word in done.stdout.split()]
    assert len(grown) == 4, done.stdout
    assert all(entries < 10 for entries in grown), grown  # sync, routing, async class, maker


def test_a_class_given_where_a_gone_ones_base_was_still_retries_connects(
    pg_database: str, fault_proxy: Any, service: str
) -> None:
    """The listening base of a class given to factories leaves SQLAlchemy's event registry
    when the collector frees it (its entries are removed then, by their keys): a base made
    where a gone one was (the same ``id()``, which keys the registry) still listens, and its
    factory's sessions' connects are retried."""
    engine = sa.create_engine(fault_proxy.url(pg_database))
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        fault_proxy.restore()  # the server "comes back" during the first backoff

    def make() -> rdb.ResilientSession[Session]:
        class Tenant(Session):
            pass

        return rdb.ResilientSession(
            engine, service=service, config=rdb.Config(), sleep=sleep, class_=Tenant
        )

    try:
        gone: set[int] = set()
        Sessions = make()
        while id(Sessions.class_.__mro__[1]) not in gone:
            assert len(gone) < 50, "no listening base was made where a gone one had been"
            gone.add(id(Sessions.class_.__mro__[1]))
            del Sessions
            gc.collect()
            Sessions = make()
        fault_proxy.refuse()
        with Sessions() as session:
            assert session.execute(sa.text("SELECT 7")).scalar_one() == 7
        assert len(slept) == 1
    finally:
        fault_proxy.restore()
        engine.dispose()


# (the pooled connection of an engine dropped without dispose() is closed by the collector,
# which psycopg warns of, as under sessionmaker)
@pytest.mark.filterwarnings("ignore:.*was deleted while still open:ResourceWarning")
def test_a_session_class_made_per_tenant_is_freed_with_its_factory_and_engine(
    pg_url: str, service: str
) -> None:
    """A ``class_`` made per tenant whose ``get_bind`` holds the tenant's engine: once the
    factory and the class are dropped, the engine and its pooled connection are freed, as under
    ``sessionmaker``. Before: the factories' shared listening base was kept in a module-level
    table by the class given, which kept every such class, engine and connection for good."""
    engines: list[weakref.ref[sa.Engine]] = []
    for _ in range(3):
        engine = sa.create_engine(pg_url)

        class TenantSession(Session):
            tenant_engine = engine

            def get_bind(self, *args: Any, **kwargs: Any) -> Any:
                return self.tenant_engine

        factory = rdb.ResilientSession(service=service, class_=TenantSession)
        with factory() as session:
            assert session.execute(sa.text("SELECT 1")).scalar_one() == 1
        engines.append(weakref.ref(engine))
        del factory, session, TenantSession, engine
    gc.collect()
    assert [ref() for ref in engines] == [None, None, None]


@pytest.mark.asyncio
async def test_async_begin_whose_commit_fails_leaves_the_session_as_plain(
    async_engine: AsyncEngine, engine: sa.Engine, service: str
) -> None:
    """An async factory's ``Session.begin()`` whose COMMIT fails (here its flush: a duplicate
    name) closed the session, detaching what it had loaded; ``async_sessionmaker.begin()``
    leaves it open, its objects in it."""
    with engine.begin() as conn:
        conn.execute(sa.insert(Item), [{"id": 950, "name": "taken"}])
    outcomes = []
    for factory in (
        async_sessionmaker(async_engine),
        rdb.AsyncResilientSession(async_engine, service=service),
    ):
        block = factory.begin()
        session = await block.__aenter__()
        loaded = await session.get(Item, 950)
        session.add(Item(id=951, name="taken"))
        with pytest.raises(sa.exc.IntegrityError):
            await block.__aexit__(None, None, None)  # (the block's end: its COMMIT)
        outcomes.append((sa.inspect(loaded).persistent, loaded in session))
        await session.close()
    assert outcomes == [(True, True), (True, True)]


class _AttrsBase(AsyncAttrs, DeclarativeBase):
    pass


class Shelf(_AttrsBase):
    __tablename__ = "shelves"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    books: Mapped[list[Book]] = relationship(back_populates="shelf", order_by="Book.id")


class Book(_AttrsBase):
    __tablename__ = "books"
    id: Mapped[int] = mapped_column(primary_key=True)
    shelf_id: Mapped[int] = mapped_column(sa.ForeignKey("shelves.id"))
    title: Mapped[str]
    shelf: Mapped[Shelf] = relationship(back_populates="books")


@pytest.mark.asyncio
async def test_async_orm_idioms_in_a_unit_as_in_an_async_sessionmaker_block(
    async_engine: AsyncEngine, service: str
) -> None:
    """What async ORM code does in ``async with async_sessionmaker.begin()`` it does in a unit,
    with the same results: ``async_object_session``, ``AsyncAttrs.awaitable_attrs``,
    ``refresh(with_for_update=True)``, ``stream_scalars``, ``begin_nested()`` as an async
    context manager rolled back by an error and released, ``async_scoped_session`` (its
    session given to ``run_in``)."""
    async with async_engine.begin() as conn:
        await conn.run_sync(_AttrsBase.metadata.create_all)

    async def work(session: AsyncSession, tag: str) -> list[Any]:
        shelf = Shelf(name=tag, books=[Book(title=f"{tag}-a"), Book(title=f"{tag}-b")])
        session.add(shelf)
        await session.flush()
        session.expire(shelf)
        books = await shelf.awaitable_attrs.books
        await session.refresh(books[0], with_for_update=True)
        titles = [
            b.title
            async for b in await session.stream_scalars(
                sa.select(Book).where(Book.shelf_id == shelf.id).order_by(Book.id)
            )
        ]
        with contextlib.suppress(LookupError):
            async with session.begin_nested():
                session.add(Book(shelf=shelf, title=f"{tag}-gone"))
                await session.flush()
                raise LookupError("rolled back to the savepoint")
        async with session.begin_nested():
            session.add(Book(shelf=shelf, title=f"{tag}-kept"))
        return [async_object_session(shelf) is session, titles]

    plain = async_sessionmaker(async_engine)
    ours = rdb.AsyncResilientSession(async_engine, service=service)
    async with plain.begin() as session:
        done_plain = await work(session, "plain")
    done_ours = await ours.run(work, "ours")
    scoped = async_scoped_session(ours, scopefunc=asyncio.current_task)
    done_scoped = await ours.run_in(scoped(), work, "scoped")
    await scoped.remove()
    assert done_plain == [True, ["plain-a", "plain-b"]]
    assert done_ours == [True, ["ours-a", "ours-b"]]
    assert done_scoped == [True, ["scoped-a", "scoped-b"]]
    async with plain() as session:
        titles = (await session.scalars(sa.select(Book.title).order_by(Book.id))).all()
    assert titles == [
        *(f"{tag}-{end}" for tag in ("plain", "ours", "scoped") for end in ("a", "b", "kept"))
    ]
