"""Factories whose session class picks the engine itself: no ``bind``/``binds`` on the factory,
the engine chosen by a ``get_bind()`` override (SQLAlchemy's "custom vertical partitioning"
recipe, a read/write split) or by ``ShardedSession(shards=...)``. The engines it routes to get
the factory's hooks when the session first picks them, before any connection is made there:
units run, their COMMITs are marked, and a lost COMMIT answer is settled in the database the
COMMIT went to. Real server, real faults (the fault proxy loses a COMMIT's answer)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from scenarios import ASYNC_DRIVERS, Base, Item, held_and_released
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.ext.horizontal_shard import ShardedSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb
from resilient_db._state import STATE
from resilient_db.testing import FaultProxy, PostgresServer
from resilient_db.transitions._report import transition_stats

pytestmark = pytest.mark.usefixtures("no_backoff")


@pytest.fixture
def database(pg_server: PostgresServer, pg_database: str) -> str:
    engine = sa.create_engine(pg_server.url(pg_database))
    try:
        Base.metadata.create_all(engine)
        rdb.install_commit_markers(engine)
    finally:
        engine.dispose()
    return pg_database


@pytest.fixture
def leader_follower(
    pg_server: PostgresServer, database: str, fault_proxy: FaultProxy
) -> Iterator[tuple[sa.Engine, sa.Engine]]:
    """The leader through the fault proxy, the follower straight to the server (a replica in
    real life; the same database here)."""
    made = (
        sa.create_engine(fault_proxy.url(database), connect_args={"connect_timeout": 2}),
        sa.create_engine(pg_server.url(database)),
    )
    yield made
    for engine in made:
        engine.dispose()


def routing_class(leader: Any, follower: Any) -> type[Session]:
    """A read/write split: flushes and DML to the leader, the rest to the follower."""

    class RoutingSession(Session):
        def get_bind(self, mapper: Any = None, clause: Any = None, **kw: Any) -> Any:
            if self._flushing or isinstance(clause, (sa.Update, sa.Delete, sa.Insert)):
                return leader
            return follower

    return RoutingSession


def names(server: PostgresServer, database: str) -> list[str]:
    return sorted(row[0] for row in server.execute("SELECT name FROM items", database=database))


def markers(server: PostgresServer, database: str) -> int:
    found = server.execute("SELECT count(*) FROM resilient_db.commit_markers", database=database)
    return int(found[0][0])


def add_and_count(session: Session, name: str) -> int:
    session.add(Item(name=name))
    session.flush()
    return int(session.scalar(sa.select(sa.func.count()).select_from(Item)) or 0)


def test_a_routed_unit_runs_and_its_commit_is_marked(
    pg_server: PostgresServer,
    database: str,
    leader_follower: tuple[sa.Engine, sa.Engine],
    service: str,
) -> None:
    Sessions = rdb.ResilientSession(class_=routing_class(*leader_follower), service=service)
    Sessions.run(add_and_count, "a")
    assert names(pg_server, database) == ["a"]
    assert markers(pg_server, database) == 1  # the leader's COMMIT carried its marker
    with Sessions.begin() as session:  # drop-in use, as before
        session.add(Item(name="b"))
    assert names(pg_server, database) == ["a", "b"]


def test_a_lost_answer_on_a_routed_engine_is_settled_there_done_once(
    pg_server: PostgresServer,
    database: str,
    leader_follower: tuple[sa.Engine, sa.Engine],
    fault_proxy: FaultProxy,
    service: str,
) -> None:
    Sessions = rdb.ResilientSession(class_=routing_class(*leader_follower), service=service)
    calls: list[str] = []

    def unit(session: Session) -> None:
        calls.append("x")
        session.add(Item(name=f"u-{len(calls)}"))

    fault_proxy.lose_commit_answer()  # the very first COMMIT: the engine's first connection
    Sessions.run(unit)
    assert fault_proxy.commits_lost == 1
    assert calls == ["x"]  # verified done by its marker, not replayed
    assert names(pg_server, database) == ["u-1"]


def test_a_sharded_session_with_shards_only_runs_units(
    pg_server: PostgresServer, database: str, fault_proxy: FaultProxy, service: str
) -> None:
    first = sa.create_engine(fault_proxy.url(database), connect_args={"connect_timeout": 2})
    second = sa.create_engine(pg_server.url(database))
    try:
        Sessions = rdb.ResilientSession(
            class_=ShardedSession,
            service=service,
            shards={"first": first, "second": second},
            shard_chooser=lambda mapper, instance, clause=None: "first",
            identity_chooser=lambda *args, **kw: ["first"],
            execute_chooser=lambda context: ["first"],
        )
        calls: list[str] = []

        def unit(session: Session) -> int:
            calls.append("x")
            return add_and_count(session, f"s-{len(calls)}")

        fault_proxy.lose_commit_answer()
        assert Sessions.run(unit) == 1
        assert calls == ["x"]
        assert names(pg_server, database) == ["s-1"]
    finally:
        first.dispose()
        second.dispose()


def test_a_routed_engine_with_another_factorys_settings_is_refused_by_name(
    database: str, leader_follower: tuple[sa.Engine, sa.Engine], service: str
) -> None:
    leader, _ = leader_follower
    # kept: a factory nobody holds leaves the engine at the next garbage collection
    other = rdb.ResilientSession(
        leader, service="other", config=rdb.Config(status_validation=False)
    )
    Sessions = rdb.ResilientSession(
        class_=routing_class(*leader_follower),
        service=service,
        config=rdb.Config(status_validation=True),
    )
    with pytest.raises(ValueError, match="status_validation"):
        Sessions.run(add_and_count, "refused")
    assert other.kw is not None  # (held to here)


def test_a_factory_without_bind_or_routing_fails_as_sessionmaker_does(
    database: str, service: str
) -> None:
    """No engine anywhere: SQLAlchemy's own error at the first statement (as with
    sessionmaker); a unit that runs no statement has nothing to commit and returns."""
    Sessions = rdb.ResilientSession(service=service)
    assert Sessions.run(lambda session: 7) == 7
    with pytest.raises(sa.exc.UnboundExecutionError):
        Sessions.run(lambda session: session.execute(sa.text("SELECT 1")))


@pytest_asyncio.fixture(params=ASYNC_DRIVERS)
async def async_leader_follower(
    request: pytest.FixtureRequest,
    pg_server: PostgresServer,
    database: str,
    fault_proxy: FaultProxy,
) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    driver = request.param
    made = (
        create_async_engine(fault_proxy.url(database, driver=driver)),
        create_async_engine(pg_server.url(database, driver=driver)),
    )
    yield made
    for engine in made:
        await engine.dispose()


@pytest.mark.asyncio
async def test_async_a_routed_unit_is_marked_and_a_lost_answer_settled_once(
    pg_server: PostgresServer,
    database: str,
    async_leader_follower: tuple[AsyncEngine, AsyncEngine],
    fault_proxy: FaultProxy,
    service: str,
) -> None:
    leader, follower = async_leader_follower
    Sessions = rdb.AsyncResilientSession(
        service=service,
        sync_session_class=routing_class(leader.sync_engine, follower.sync_engine),
    )
    calls: list[str] = []

    async def unit(session: AsyncSession) -> None:
        calls.append("x")
        session.add(Item(name=f"a-{len(calls)}"))

    async def count(session: AsyncSession) -> int:
        return int(await session.scalar(sa.select(sa.func.count()).select_from(Item)) or 0)

    fault_proxy.lose_commit_answer()  # the very first COMMIT: the engine's first connection
    await Sessions.run(unit)
    assert fault_proxy.commits_lost == 1
    assert calls == ["x"]  # verified done by its marker, not replayed
    await Sessions.run(unit)
    assert await Sessions.run(count) == 2  # read on the follower
    assert names(pg_server, database) == ["a-1", "a-2"]


@pytest.mark.parametrize("fault", ["lost", "swallowed"])
def test_a_lost_answer_of_a_unit_that_read_on_the_follower_is_settled_on_the_leader(
    *,
    pg_server: PostgresServer,
    database: str,
    leader_follower: tuple[sa.Engine, sa.Engine],
    fault_proxy: FaultProxy,
    service: str,
    fault: str,
) -> None:
    """A unit that wrote on the leader and read on the follower spans two connections, which
    SQLAlchemy commits one by one, in an order that varies from unit to unit. The follower's
    part wrote nothing, so the leader's COMMIT decides, whichever went first: its answer lost
    after it committed, the unit is done once; swallowed before the server, it is replayed
    once. Several units, so that both orders are met."""
    Sessions = rdb.ResilientSession(class_=routing_class(*leader_follower), service=service)
    for round_ in range(6):
        calls: list[str] = []

        def unit(session: Session, calls: list[str] = calls, round_: int = round_) -> int:
            calls.append("x")
            return add_and_count(session, f"r{round_}-{len(calls)}")

        if fault == "lost":
            fault_proxy.lose_commit_answer()
            Sessions.run(unit)
            assert calls == ["x"]  # done: verified by its marker on the leader
        else:
            fault_proxy.swallow_commit()
            releaser = held_and_released(fault_proxy)
            Sessions.run(unit)
            releaser.join(15)
            assert calls == ["x", "x"]  # the check fenced the held COMMIT: replayed once
    done = [f"r{n}-1" if fault == "lost" else f"r{n}-2" for n in range(6)]
    assert names(pg_server, database) == sorted(done)
    assert (fault_proxy.commits_lost, fault_proxy.commits_swallowed) == (
        (6, 0) if fault == "lost" else (0, 6)
    )


def test_a_lost_answer_of_the_followers_read_only_commit_is_settled_without_a_check(
    pg_server: PostgresServer,
    database: str,
    fault_proxy: FaultProxy,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The follower's COMMIT (read-only) loses its answer. When the leader's COMMIT went out
    first it was answered: every part that wrote is committed, so the unit is done, nothing
    to check. When the follower's went first, the leader's never went out: nothing written is
    committed, and the unit is replayed. Either way one row per unit (several units, fresh
    connections each, so that SQLAlchemy's order varies)."""
    leader = sa.create_engine(pg_server.url(database))
    follower = sa.create_engine(fault_proxy.url(database), connect_args={"connect_timeout": 2})
    try:
        Sessions = rdb.ResilientSession(
            class_=routing_class(leader, follower),
            service=service,
            config=rdb.Config(failure_threshold=1000),
        )
        outcomes = set()
        # (the order is SQLAlchemy's iteration of a set of its connections, by their hashes:
        # 12 rounds once met one order only; the loop ends as soon as both were met)
        for round_ in range(40):
            for engine in (leader, follower):
                engine.dispose()
            calls: list[str] = []

            def unit(session: Session, calls: list[str] = calls, round_: int = round_) -> int:
                calls.append("x")
                return add_and_count(session, f"f{round_}-{len(calls)}")

            fault_proxy.lose_commit_answer()
            caplog.clear()
            Sessions.run(unit)
            if calls == ["x"]:  # the leader's COMMIT went first and was answered
                outcomes.add("done")
                assert any(
                    "the one whose answer was lost wrote nothing" in r.getMessage()
                    for r in caplog.records
                )
            else:  # the follower's went first: the leader's never went out
                outcomes.add("replayed")
                assert calls == ["x", "x"]
            if len(outcomes) == 2:
                break
        rows = names(pg_server, database)
        assert len(rows) == round_ + 1  # one per unit: none twice, none lost
        assert {row.split("-")[0] for row in rows} == {f"f{n}" for n in range(round_ + 1)}
        assert outcomes == {"done", "replayed"}  # both orders were met
    finally:
        leader.dispose()
        follower.dispose()


@pytest.mark.asyncio
async def test_async_a_lost_answer_of_a_unit_that_read_on_the_follower_is_done_once(
    pg_server: PostgresServer,
    database: str,
    async_leader_follower: tuple[AsyncEngine, AsyncEngine],
    fault_proxy: FaultProxy,
    service: str,
) -> None:
    """The async twin: a read on the follower and a write on the leader, whose COMMIT answer
    is lost after it committed: done once, whichever COMMIT SQLAlchemy sent first."""
    leader, follower = async_leader_follower
    Sessions = rdb.AsyncResilientSession(
        service=service,
        sync_session_class=routing_class(leader.sync_engine, follower.sync_engine),
    )
    for round_ in range(6):
        calls: list[str] = []

        async def unit(
            session: AsyncSession, calls: list[str] = calls, round_: int = round_
        ) -> int:
            calls.append("x")
            session.add(Item(name=f"a{round_}"))
            await session.flush()
            return int(await session.scalar(sa.select(sa.func.count()).select_from(Item)) or 0)

        fault_proxy.lose_commit_answer()
        await Sessions.run(unit)
        assert calls == ["x"]
    assert names(pg_server, database) == [f"a{n}" for n in range(6)]
    assert fault_proxy.commits_lost == 6


def test_a_routed_unit_prunes_expired_markers_where_it_committed(
    pg_server: PostgresServer,
    database: str,
    leader_follower: tuple[sa.Engine, sa.Engine],
    service: str,
) -> None:
    """A factory without an engine of its own prunes through the engine its unit's COMMIT went
    to, as a bound factory prunes through its own."""
    leader, _ = leader_follower
    with leader.begin() as conn:  # five markers 20 minutes old: expired
        conn.execute(
            sa.text(
                "INSERT INTO resilient_db.commit_markers (id) SELECT (lpad(to_hex(floor(extract("
                "epoch FROM now() - interval '20 minutes') * 1000)::bigint), 12, '0') || '7' || "
                "substr(md5(g::text), 1, 3) || '8' || substr(md5(g::text), 4, 15))::uuid "
                "FROM generate_series(1, 5) g"
            )
        )
    Sessions = rdb.ResilientSession(class_=routing_class(*leader_follower), service=service)
    Sessions.run(lambda session: session.add(Item(name="first")))  # the leader gets its hooks
    assert markers(pg_server, database) == 6
    STATE.engine_hooks[leader].commit._next_prune = 0.0  # (as if the interval had passed)
    Sessions.run(lambda session: session.add(Item(name="second")))
    assert markers(pg_server, database) == 2  # the expired ones pruned; the two units' kept


# -- SQLAlchemy's using_bind recipe: a session copied from another routes as its own class does
def named_routing_class(engines: dict[str, Any]) -> type[Session]:
    """The read/write split of SQLAlchemy's documentation with its ``using_bind(name)``: a new
    session of the class with the first one's state (``vars``) and a name that picks the
    engine."""

    class NamedRoutingSession(Session):
        _name: str | None = None

        def get_bind(self, mapper: Any = None, clause: Any = None, **kw: Any) -> Any:
            if self._name:
                return engines[self._name]
            if self._flushing:
                return engines["leader"]
            return engines["follower"]

        def using_bind(self, name: str) -> Session:
            copy = NamedRoutingSession()
            vars(copy).update(vars(self))
            copy._name = name
            return copy

    return NamedRoutingSession


def read_through(session: Session, name: str) -> str:
    """The ``application_name`` of the connection a copy of ``session`` made by ``using_bind``
    reads through (the engines differ by it)."""
    copy: Any = session.using_bind(name)  # type: ignore[attr-defined]
    try:  # (the first session began nothing: the copy's transaction is its own)
        return str(copy.scalar(sa.text("SELECT current_setting('application_name')")))
    finally:
        copy.close()


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.asyncio
async def test_async_using_bind_reads_through_the_engine_named(
    pg_server: PostgresServer,
    database: str,
    service: str,
    clean_env: pytest.MonkeyPatch,
    enabled: bool,
) -> None:
    clean_env.setenv("SELF_HEALING_ENABLED", str(enabled).lower())
    rdb.reload_config()
    url = pg_server.url(database, driver="asyncpg")
    made = {
        name: create_async_engine(url, connect_args={"server_settings": {"application_name": name}})
        for name in ("leader", "follower")
    }
    try:
        cls = named_routing_class({n: e.sync_engine for n, e in made.items()})
        plain = sa.ext.asyncio.async_sessionmaker(sync_session_class=cls)
        ours = rdb.AsyncResilientSession(service=service, sync_session_class=cls)
        for factory in (plain, ours):
            async with factory() as session:
                assert await session.run_sync(read_through, "leader") == "leader"
                assert await session.run_sync(read_through, "follower") == "follower"
                assert isinstance(session.sync_session, cls)
    finally:
        for engine in made.values():
            await engine.dispose()
        clean_env.undo()
        rdb.reload_config()


def test_using_bind_reads_through_the_engine_named(
    pg_server: PostgresServer, database: str, service: str
) -> None:
    url = pg_server.url(database)
    made = {
        name: sa.create_engine(url, connect_args={"application_name": name})
        for name in ("leader", "follower")
    }
    try:
        cls = named_routing_class(made)
        for factory in (
            sa.orm.sessionmaker(class_=cls),
            rdb.ResilientSession(service=service, class_=cls),
        ):
            with factory() as session:
                assert read_through(session, "leader") == "leader"
                assert read_through(session, "follower") == "follower"
    finally:
        for engine in made.values():
            engine.dispose()


def application_name(session: Session) -> str:
    return str(session.scalar(sa.text("SELECT current_setting('application_name')")))


def test_a_get_bind_replaced_after_the_factory_was_made_is_the_one_that_routes(
    pg_server: PostgresServer, database: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As under ``sessionmaker``, whose class looks ``get_bind`` up on your class at each call:
    a test that patches it (``mock.patch.object``, ``monkeypatch.setattr``) after the
    application made its factory routes the factory's sessions, units included, to the engine
    the patch picks, which gets the factory's hooks there. (The factory called the method it
    found when it was made: the sessions went on to the application's engine.)"""
    url = pg_server.url(database)
    made = {
        name: sa.create_engine(url, connect_args={"application_name": name})
        for name in ("app", "test")
    }
    try:

        class AppSession(Session):
            def get_bind(self, mapper: Any = None, clause: Any = None, **kw: Any) -> Any:
                return made["app"]

        plain = sa.orm.sessionmaker(class_=AppSession)
        ours = rdb.ResilientSession(service=service, class_=AppSession)
        for factory in (plain, ours):
            with factory() as session:
                assert application_name(session) == "app"

        def to_test(self: Session, mapper: Any = None, clause: Any = None, **kw: Any) -> Any:
            return made["test"]

        monkeypatch.setattr(AppSession, "get_bind", to_test)
        for factory in (plain, ours):
            with factory() as session:
                assert application_name(session) == "test"
        assert ours.run(application_name) == "test"
        assert STATE.engine_hooks.get(made["test"]) is not None  # the factory's hooks there
        monkeypatch.undo()
        assert ours.run(application_name) == "app"
    finally:
        for engine in made.values():
            engine.dispose()


@pytest.mark.asyncio
async def test_async_a_get_bind_replaced_after_the_factory_was_made_is_the_one_that_routes(
    pg_server: PostgresServer, database: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The async twin: ``sync_session_class=`` with a ``get_bind`` patched later."""
    url = pg_server.url(database, driver="asyncpg")
    made = {
        name: create_async_engine(url, connect_args={"server_settings": {"application_name": name}})
        for name in ("app", "test")
    }
    try:

        class AppSession(Session):
            def get_bind(self, mapper: Any = None, clause: Any = None, **kw: Any) -> Any:
                return made["app"].sync_engine

        plain = sa.ext.asyncio.async_sessionmaker(sync_session_class=AppSession)
        ours = rdb.AsyncResilientSession(service=service, sync_session_class=AppSession)
        for factory in (plain, ours):
            async with factory() as session:
                assert await session.run_sync(application_name) == "app"

        def to_test(self: Session, mapper: Any = None, clause: Any = None, **kw: Any) -> Any:
            return made["test"].sync_engine

        monkeypatch.setattr(AppSession, "get_bind", to_test)
        for factory in (plain, ours):
            async with factory() as session:
                assert await session.run_sync(application_name) == "test"

        async def unit(session: AsyncSession) -> str:
            return await session.run_sync(application_name)

        assert await ours.run(unit) == "test"
        assert STATE.engine_hooks.get(made["test"].sync_engine) is not None
    finally:
        for engine in made.values():
            await engine.dispose()


def add_named(session: Session, name: str) -> str:
    session.add(Item(name=name))
    session.flush()
    return application_name(session)


def test_a_get_bind_added_after_the_factory_was_made_has_its_engines_hooked(
    pg_server: PostgresServer, database: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Your class had no ``get_bind`` when the factory was made (the factory's ``bind`` is
    the application's engine); a test adds one (``monkeypatch.setattr``, ``mock.patch.object``)
    that routes to another engine. Sessions and units route there as ``sessionmaker``'s do,
    and that engine gets the factory's hooks as one picked by a ``get_bind`` present from the
    start: a unit's COMMIT there carries its marker. (It routed, but its engine had no hooks:
    no marker, no dead-connection check, a lost COMMIT answer not verified there.)"""
    url = pg_server.url(database)
    made = {
        name: sa.create_engine(url, connect_args={"application_name": name})
        for name in ("app", "test")
    }
    try:

        class AppSession(Session):
            pass

        plain = sa.orm.sessionmaker(made["app"], class_=AppSession)
        ours = rdb.ResilientSession(made["app"], service=service, class_=AppSession)
        assert ours.run(add_named, "before") == "app"
        assert markers(pg_server, database) == 1

        def to_test(self: Session, mapper: Any = None, clause: Any = None, **kw: Any) -> Any:
            return made["test"]

        monkeypatch.setattr(AppSession, "get_bind", to_test)
        for factory in (plain, ours):
            with factory() as session:
                assert application_name(session) == "test"
        assert STATE.engine_hooks.get(made["test"]) is not None  # the factory's hooks there
        assert ours.run(add_named, "routed") == "test"
        assert markers(pg_server, database) == 2  # its COMMIT marked there
        monkeypatch.undo()
        assert ours.run(add_named, "after") == "app"
        assert names(pg_server, database) == ["after", "before", "routed"]
    finally:
        for engine in made.values():
            engine.dispose()


@pytest.mark.asyncio
async def test_async_a_get_bind_added_after_the_factory_was_made_has_its_engines_hooked(
    pg_server: PostgresServer, database: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The async twin: ``sync_session_class=`` given a ``get_bind`` after the factory's first
    sessions and units."""
    url = pg_server.url(database, driver="asyncpg")
    made = {
        name: create_async_engine(url, connect_args={"server_settings": {"application_name": name}})
        for name in ("app", "test")
    }
    try:

        class AppSession(Session):
            pass

        plain = sa.ext.asyncio.async_sessionmaker(made["app"], sync_session_class=AppSession)
        ours = rdb.AsyncResilientSession(
            made["app"], service=service, sync_session_class=AppSession
        )

        async def unit(session: AsyncSession, name: str) -> str:
            return await session.run_sync(add_named, name)

        assert await ours.run(unit, "before") == "app"
        assert markers(pg_server, database) == 1

        def to_test(self: Session, mapper: Any = None, clause: Any = None, **kw: Any) -> Any:
            return made["test"].sync_engine

        monkeypatch.setattr(AppSession, "get_bind", to_test)
        for factory in (plain, ours):
            async with factory() as session:
                assert await session.run_sync(application_name) == "test"
        assert STATE.engine_hooks.get(made["test"].sync_engine) is not None
        assert await ours.run(unit, "routed") == "test"
        assert markers(pg_server, database) == 2  # its COMMIT marked there
        monkeypatch.undo()
        assert await ours.run(unit, "after") == "app"
        assert names(pg_server, database) == ["after", "before", "routed"]
    finally:
        for engine in made.values():
            await engine.dispose()


class JobsBase(DeclarativeBase):
    pass


class Job(JobsBase):
    __tablename__ = "routed_jobs"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"pending": {"running"}, "running": {"done"}},
        initial={"pending"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")


@pytest.fixture
def jobs_engines(pg_url: str) -> Iterator[tuple[sa.Engine, sa.Engine]]:
    """The primary, where job 1 is pending, and an engine reaching another ``routed_jobs``
    table (its search_path), where job 1 is done: another database, or a replica that lags."""
    primary = sa.create_engine(pg_url)
    with primary.begin() as conn:
        JobsBase.metadata.create_all(conn)
        conn.exec_driver_sql("CREATE SCHEMA lagging")
        conn.exec_driver_sql("CREATE TABLE lagging.routed_jobs (LIKE public.routed_jobs)")
        conn.exec_driver_sql("INSERT INTO routed_jobs VALUES (1, 'pending')")
        conn.exec_driver_sql("INSERT INTO lagging.routed_jobs VALUES (1, 'done')")
    elsewhere = sa.create_engine(pg_url, connect_args={"options": "-c search_path=lagging"})
    yield primary, elsewhere
    primary.dispose()
    elsewhere.dispose()


def job_states(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.text("SELECT status FROM routed_jobs ORDER BY id")))


@pytest.mark.parametrize("mode", ["filter", "raise"])
@pytest.mark.parametrize("how", ["routed", "bind given"])
def test_a_bulk_update_is_checked_where_it_runs(
    jobs_engines: tuple[sa.Engine, sa.Engine], service: str, how: str, mode: str
) -> None:
    """The bulk-UPDATE guard reads and locks the rows on the connection the UPDATE runs on:
    the one a read/write split's get_bind() gives the statement (not the replica it gives
    the mapper alone: SELECT ... FOR UPDATE fails on a read-only one), or the bind given to
    execute(). It read the other one, and refused a legal move for a state the row doesn't
    hold there."""
    primary, elsewhere = jobs_engines
    config = rdb.Config(bulk_update=mode)
    if how == "routed":
        replica = elsewhere.execution_options(postgresql_readonly=True)
        Sessions = rdb.ResilientSession(
            class_=routing_class(primary, replica), service=service, config=config
        )
        bind_arguments: dict[str, Any] = {}
    else:
        Sessions = rdb.ResilientSession(elsewhere, service=service, config=config)
        bind_arguments = {"bind": primary}
    before = transition_stats()["bulk_rows_filtered"]

    def unit(session: Session) -> None:
        moved = sa.update(Job).where(Job.id == 1).values(status="running")
        session.execute(moved, bind_arguments=bind_arguments)

    Sessions.run(unit)
    assert job_states(primary) == ["running"]
    assert job_states(elsewhere) == ["done"]
    assert transition_stats()["bulk_rows_filtered"] == before  # no row was left out
