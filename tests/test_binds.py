"""Units whose session writes through several connections: models bound to two databases with
SQLAlchemy's ``binds``. SQLAlchemy commits a session's connections one after the other, in no
set order, so a COMMIT that fails may leave part of the unit committed: such a unit is never
replayed after that (nor reported done when a part's outcome is unknown), and a marker is never
looked up in a database the COMMIT did not go to. Real servers, real faults (the fault proxy
holds or loses one database's COMMIT; a deferred trigger fails one at COMMIT)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, ClassVar

import pytest
import pytest_asyncio
import sqlalchemy as sa
from processes import wait_for
from scenarios import (
    ASYNC_DRIVERS,
    BYPASS_BY_HAND,
    Base,
    Item,
    async_connect_args,
    held_and_released,
)
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb
from resilient_db._classify import partly_committed
from resilient_db.testing import FaultProxy, PostgresServer, StandbyPair

pytestmark = pytest.mark.usefixtures("no_backoff")


class OtherBase(DeclarativeBase):
    pass


class Entry(OtherBase):
    """A row of the second database."""

    __tablename__ = "entries"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)


class Step(OtherBase):
    """A guarded row of the second database."""

    __tablename__ = "steps"
    __transitions__ = rdb.TransitionRules(
        column="status", transitions={"todo": {"done"}}, initial={"todo"}
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str]


#: fails COMMIT with 40001 for an entry named '...-first' (a deferred trigger runs at COMMIT)
FAIL_FIRST_AT_COMMIT = [
    "CREATE FUNCTION fail_first() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "IF right(NEW.name, 6) = '-first' THEN "
    "RAISE EXCEPTION 'conflict at commit' USING ERRCODE = '40001'; END IF; "
    "RETURN NULL; END $$",
    "CREATE CONSTRAINT TRIGGER fail_first AFTER INSERT ON entries "
    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_first()",
]


@pytest.fixture
def databases(pg_server: PostgresServer, pg_database: str, second_database: str) -> tuple[str, str]:
    """Items in the first database, entries (with the COMMIT-time trigger) in the second, the
    commit markers in both."""
    for name, base in ((pg_database, Base), (second_database, OtherBase)):
        eng = sa.create_engine(pg_server.url(name))
        try:
            base.metadata.create_all(eng)
            rdb.install_commit_markers(eng)
            if base is OtherBase:
                with eng.begin() as conn:
                    for statement in FAIL_FIRST_AT_COMMIT:
                        conn.exec_driver_sql(statement)
        finally:
            eng.dispose()
    return pg_database, second_database


@pytest.fixture
def second_proxy(pg_server: PostgresServer) -> Iterator[FaultProxy]:
    with FaultProxy(pg_server) as proxy:
        yield proxy


def names(server: PostgresServer, database: str, table: str) -> list[str]:
    return sorted(row[0] for row in server.execute(f"SELECT name FROM {table}", database=database))


@pytest.fixture
def engines(
    databases: tuple[str, str], fault_proxy: FaultProxy, second_proxy: FaultProxy
) -> Iterator[tuple[sa.Engine, sa.Engine]]:
    """An engine per database, each through its own fault proxy."""
    first, second = databases
    made = (
        sa.create_engine(fault_proxy.url(first), connect_args={"connect_timeout": 2}),
        sa.create_engine(second_proxy.url(second), connect_args={"connect_timeout": 2}),
    )
    yield made
    for engine in made:
        engine.dispose()


@pytest_asyncio.fixture(params=ASYNC_DRIVERS)
async def async_engines(
    request: pytest.FixtureRequest,
    databases: tuple[str, str],
    fault_proxy: FaultProxy,
    second_proxy: FaultProxy,
) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    """The async twin of ``engines``, on each async driver."""
    driver = request.param
    made = tuple(
        create_async_engine(
            proxy.url(name, driver=driver), connect_args=async_connect_args(driver, 2)
        )
        for proxy, name in zip((fault_proxy, second_proxy), databases, strict=True)
    )
    yield made[0], made[1]
    for engine in made:
        await engine.dispose()


def bound(
    e1: Any, e2: Any, service: str, factory: Any = rdb.ResilientSession, **kwargs: Any
) -> Any:
    """A factory whose items go to ``e1`` and entries to ``e2``."""
    return factory(e1, service=service, binds={Item: e1, Entry: e2}, **kwargs)


#: units that fail on purpose, round after round, must not open the circuit
PATIENT = rdb.Config(failure_threshold=1000)


def both(calls: list[str]) -> Callable[[Session], None]:
    """A unit writing one item (first database) and one entry (second), named per attempt."""

    def unit(session: Session) -> None:
        name = f"u-{len(calls) + 1}"
        calls.append(name)
        session.add(Item(name=name))
        session.add(Entry(name=name))

    return unit


def test_a_unit_across_two_databases_commits_both(
    pg_server: PostgresServer,
    databases: tuple[str, str],
    engines: tuple[sa.Engine, sa.Engine],
    service: str,
) -> None:
    first, second = databases
    calls: list[str] = []
    bound(*engines, service).run(both(calls))
    assert calls == ["u-1"]
    assert names(pg_server, first, "items") == ["u-1"]
    assert names(pg_server, second, "entries") == ["u-1"]


#: what a lost or swallowed COMMIT of one database makes of a unit writing to both, by whether
#: SQLAlchemy sent that database's COMMIT first (the other's never went out: rolled back) or
#: second (the other's was answered: committed)
SETTLED = {
    # the COMMIT reached the server: first, the unit is committed there only (never replayed);
    # second, it is committed on both: done
    "lost": {"first": "partly committed", "second": "done"},
    # it never did: first, nothing is committed anywhere (replayed once); second, only the
    # other database's part is (never replayed)
    "swallowed": {"first": "replayed", "second": "partly committed"},
}
ROUNDS = 16  # units per case at most: SQLAlchemy's order of the two COMMITs varies per unit


def settled(
    server: PostgresServer,
    databases: tuple[str, str],
    *,
    held: str,
    fault: str,
    prefix: str,
    calls: list[str],
    raised: BaseException | None,
) -> str:
    """Which of the ``held`` database's COMMIT went out, "first" or "second", as the outcome
    of a unit writing ``prefix``-named rows to both databases proves it (``calls``: the names
    its attempts wrote; ``raised``: its error), checked against both databases and against
    what ``fault`` should make of that order (:data:`SETTLED`)."""
    faulted, other = databases if held == "first" else databases[::-1]
    here = {
        "faulted": [n for n in names(server, faulted, FAULTED_TABLE[held]) if n.startswith(prefix)],
        "other": [n for n in names(server, other, OTHER_TABLE[held]) if n.startswith(prefix)],
    }
    first = f"{prefix}1"
    if raised is None and calls == [first]:
        assert here == {"faulted": [first], "other": [first]}
        outcome = "done"
    elif raised is None:
        assert calls == [first, f"{prefix}2"]
        assert here == {"faulted": [calls[1]], "other": [calls[1]]}
        outcome = "replayed"
    else:
        assert not isinstance(raised, rdb.CommitOutcomeUnknownError), raised
        assert calls == [first]  # not replayed
        assert partly_committed(raised)
        committed_on = "faulted" if fault == "lost" else "other"
        assert here[committed_on] == [first]
        assert here["other" if committed_on == "faulted" else "faulted"] == []
        outcome = "partly committed"
    orders = [order for order, expected in SETTLED[fault].items() if expected == outcome]
    assert orders, f"{fault}: {outcome} is no outcome of either order"
    return orders[0]


def armed(
    proxy: FaultProxy, fault: str, ended_first: Callable[[], None] | None = None
) -> threading.Thread | None:
    """Arm ``fault`` on ``proxy``'s next COMMIT: "lost" (its answer), or "swallowed" (held,
    then released, ``ended_first`` called before: the thread that releases it, to join)."""
    if fault == "lost":
        proxy.lose_commit_answer()
        return None
    proxy.swallow_commit()
    return held_and_released(proxy, ended_first=ended_first)


def held_transaction_ended(server: PostgresServer, database: str) -> Callable[[], None]:
    """End the transaction whose COMMIT the proxy holds, in ``database``, before its client is
    released: its backend terminated, and waited for until gone. Released by a reset of both
    sides alone, the backend ends once it reads the reset, which on a loaded machine may come
    after every one of the unit's checks by transaction id (delays shrunk to nothing) asked
    about it: "in progress", so unknown, rightly (a COMMIT held on the way may still arrive:
    ``test_late_commit_after_the_check_is_fenced_off``). A swallowed COMMIT's transaction is
    over by the time the checks ask here, as the outcomes these tests settle need."""

    def end() -> None:
        rows = server.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s"
            " AND state = 'idle in transaction' AND pid <> pg_backend_pid()",
            params=(database,),
        )
        assert len(rows) == 1, rows  # the unit's held one, no other
        pid = rows[0][0]
        server.execute("SELECT pg_terminate_backend(%s)", params=(pid,))
        wait_for(
            lambda: (
                not server.execute("SELECT FROM pg_stat_activity WHERE pid = %s", params=(pid,))
            ),
            "the held transaction's backend to end",
        )

    return end


FAULTED_TABLE = {"first": "items", "second": "entries"}
OTHER_TABLE = {"first": "entries", "second": "items"}


def without_markers(pg_server: PostgresServer, databases: tuple[str, ...]) -> None:
    """The commit markers uninstalled from ``databases``: units verify by transaction id."""
    for name in databases:
        eng = sa.create_engine(pg_server.url(name))
        try:
            rdb.uninstall_commit_markers(eng)
        finally:
            eng.dispose()


def both_orders_settled(
    Sessions: Any,
    pg_server: PostgresServer,
    databases: tuple[str, str],
    engines: tuple[sa.Engine, sa.Engine],
    proxies: tuple[FaultProxy, FaultProxy],
    *,
    fault: str,
    prefix: str,
    bind: Callable[[Session], None] | None = None,
    ended_first: bool = False,
) -> None:
    """Rounds of a unit of ``Sessions`` writing an item and an entry (each named
    ``{prefix}{round}-{call}``; ``bind`` called first on its session), ``fault`` armed on the
    COMMIT of the first database's proxy, then the second's, in turn, each round's outcome
    checked against the databases (:func:`settled`), until both orders of SQLAlchemy's
    COMMITs were met (the faulted database's went out first, and second). ``ended_first``: a
    swallowed COMMIT's transaction is ended before its client is released
    (:func:`held_transaction_ended`)."""
    seen: set[str] = set()
    for round_ in range(ROUNDS):
        held = ("first", "second")[round_ % 2]
        for engine in engines:  # new connections for both: no order carried over
            engine.dispose()
        proxy = proxies[0] if held == "first" else proxies[1]
        calls: list[str] = []

        def unit(session: Session, calls: list[str] = calls, round_: int = round_) -> None:
            if bind is not None:
                bind(session)
            name = f"{prefix}{round_}-{len(calls) + 1}"
            calls.append(name)
            session.add(Item(name=name))
            session.add(Entry(name=name))

        faulted = databases[0] if held == "first" else databases[1]
        ending = held_transaction_ended(pg_server, faulted) if ended_first else None
        releaser = armed(proxy, fault, ending)
        raised: BaseException | None = None
        try:
            Sessions.run(unit)
        except sa.exc.DBAPIError as exc:
            raised = exc
        if releaser is not None:
            releaser.join(15)
        order = settled(
            pg_server,
            databases,
            held=held,
            fault=fault,
            prefix=f"{prefix}{round_}-",
            calls=calls,
            raised=raised,
        )
        seen.add(order)
        if len(seen) == 2:
            break
    assert seen == {"first", "second"}  # both orders were met


@pytest.mark.parametrize("markers", [True, False], ids=["markers", "fallback"])
@pytest.mark.parametrize("fault", ["lost", "swallowed"])
def test_a_lost_commit_across_two_databases_is_settled_part_by_part(
    *,
    pg_server: PostgresServer,
    databases: tuple[str, str],
    fault_proxy: FaultProxy,
    second_proxy: FaultProxy,
    service: str,
    engines: tuple[sa.Engine, sa.Engine],
    fault: str,
    markers: bool,
) -> None:
    """One database's COMMIT loses its answer, or never arrives. SQLAlchemy commits the two
    connections one by one, in an order of its own, and stops at the failed one: what the
    other part did is known (answered, or never sent), and the failed one is checked in its own
    database. Each unit ends done, replayed once, or raised as partly committed (never
    replayed: the committed part would be written twice), never unknown; the databases agree
    with the outcome. The faulted database alternates, so that both orders are met whether
    SQLAlchemy's order is fixed or varies. With the commit markers, and without them (the
    fallback: each writing COMMIT's transaction id read before it, its status asked after a
    lost answer, in the database it went to). Without the markers, a swallowed COMMIT's
    transaction is ended before the unit hears: a check by transaction id that finds it still
    open can only answer unknown (the markers' claim fences it off instead)."""
    if not markers:
        without_markers(pg_server, databases)
    Sessions = bound(*engines, service, config=PATIENT)
    both_orders_settled(
        Sessions,
        pg_server,
        databases,
        engines,
        (fault_proxy, second_proxy),
        fault=fault,
        prefix="r",
        ended_first=not markers,
    )


@pytest.mark.parametrize("markers", [True, False], ids=["markers", "fallback"])
def test_a_lost_answer_of_the_part_that_only_read_leaves_the_write_done_once(
    *,
    pg_server: PostgresServer,
    databases: tuple[str, str],
    engines: tuple[sa.Engine, sa.Engine],
    second_proxy: FaultProxy,
    service: str,
    markers: bool,
) -> None:
    """A unit that writes an item (first database) and only reads entries (second): the
    second database's COMMIT loses its answer. That COMMIT committed nothing: sent second,
    the item's COMMIT was answered and the unit is done; sent first, the item's never went
    out and the unit is replayed. Never unknown, never partly committed, the item written
    once. (SQLAlchemy picks the order: rounds until both are met.)"""
    first, _ = databases
    if not markers:
        without_markers(pg_server, databases)
    Sessions = bound(*engines, service, config=PATIENT)
    seen: set[str] = set()
    for round_ in range(ROUNDS):
        for engine in engines:  # new connections for both: no order carried over
            engine.dispose()
        calls: list[str] = []

        def unit(session: Session, calls: list[str] = calls, round_: int = round_) -> None:
            name = f"r{round_}-{len(calls) + 1}"
            calls.append(name)
            session.add(Item(name=name))
            session.execute(sa.select(Entry.id).limit(1)).all()

        second_proxy.lose_commit_answer()
        Sessions.run(unit)
        assert second_proxy.commits_lost == round_ + 1
        written = [n for n in names(pg_server, first, "items") if n.startswith(f"r{round_}-")]
        assert written == calls[-1:], (calls, written)
        seen.add("second" if calls == [f"r{round_}-1"] else "first")
        if len(seen) == 2:
            break
    assert seen == {"first", "second"}  # both orders were met


@pytest.mark.parametrize("markers", [True, False], ids=["markers", "fallback"])
def test_a_part_whose_backend_was_terminated_before_its_commit_is_settled_part_by_part(
    *,
    pg_server: PostgresServer,
    databases: tuple[str, str],
    engines: tuple[sa.Engine, sa.Engine],
    service: str,
    markers: bool,
) -> None:
    """A unit writing to both databases whose second database's backend is terminated
    (pg_terminate_backend) after its writes, before the COMMITs: that part's COMMIT (or, in
    the fallback, the read of its transaction id before it) fails, and nothing of it was
    committed. Sent first, nothing is committed anywhere: replayed once. Sent second, the
    item's COMMIT was answered: raised as partly committed, never replayed, never unknown.
    (SQLAlchemy picks the order: rounds until both are met.)"""
    first, second = databases
    if not markers:
        without_markers(pg_server, databases)
    Sessions = bound(*engines, service, config=PATIENT)
    seen: set[str] = set()
    for round_ in range(ROUNDS):
        for engine in engines:  # new connections for both: no order carried over
            engine.dispose()
        calls: list[str] = []

        def unit(session: Session, calls: list[str] = calls, round_: int = round_) -> None:
            name = f"r{round_}-{len(calls) + 1}"
            calls.append(name)
            session.add(Item(name=name))
            session.add(Entry(name=name))
            session.flush()
            if len(calls) == 1:
                entries = session.connection(bind_arguments={"mapper": Entry})
                pid = entries.exec_driver_sql("SELECT pg_backend_pid()").scalar()
                pg_server.execute("SELECT pg_terminate_backend(%s)", params=(pid,))

        raised: sa.exc.DBAPIError | None = None
        try:
            Sessions.run(unit)
        except sa.exc.DBAPIError as exc:
            raised = exc
        prefix = f"r{round_}-"
        items = [n for n in names(pg_server, first, "items") if n.startswith(prefix)]
        entries = [n for n in names(pg_server, second, "entries") if n.startswith(prefix)]
        if raised is None:
            assert calls == [f"{prefix}1", f"{prefix}2"]
            assert (items, entries) == ([f"{prefix}2"], [f"{prefix}2"])
            seen.add("first")
        else:
            assert not isinstance(raised, rdb.CommitOutcomeUnknownError), raised
            assert partly_committed(raised)
            assert calls == [f"{prefix}1"]  # not replayed: the item is committed
            assert (items, entries) == ([f"{prefix}1"], [])
            seen.add("second")
        if len(seen) == 2:
            break
    assert seen == {"first", "second"}  # both orders were met


@pytest.mark.parametrize("end", ["reads", "writes-an-item"])
def test_a_unit_committed_midway_whose_read_only_end_loses_an_answer_is_done(
    *,
    pg_server: PostgresServer,
    databases: tuple[str, str],
    engines: tuple[sa.Engine, sa.Engine],
    second_proxy: FaultProxy,
    service: str,
    end: str,
) -> None:
    """A unit writes to both databases and commits them itself (``session.commit()``), then
    only reads in both: the second database's final COMMIT loses its answer. Every write was
    committed by the answered COMMITs midway, and the final transaction wrote nothing on
    either connection, whether the first database's final COMMIT went out (sent second) or
    never did (sent first: SQLAlchemy stopped at the lost one): the unit is done, not an
    error. (SQLAlchemy picks the order: rounds until both are met.) When its end writes an
    item in the first database instead, that item is lost where its COMMIT never went out:
    raised as partly committed, never done."""
    first, second = databases
    Sessions = bound(*engines, service, config=PATIENT)
    committing: list[sa.Engine] = []  # the engines whose final COMMIT was begun, in order

    def heard(conn: sa.Connection) -> None:
        committing.append(conn.engine)

    for engine in engines:
        event.listen(engine, "commit", heard)
    seen: set[str] = set()
    for round_ in range(ROUNDS):
        for engine in engines:  # new connections for both: no order carried over
            engine.dispose()
        calls: list[str] = []

        def unit(session: Session, calls: list[str] = calls, round_: int = round_) -> None:
            name = f"r{round_}-{len(calls) + 1}"
            calls.append(name)
            session.add(Item(name=name))
            session.add(Entry(name=name))
            session.commit()
            second_proxy.lose_commit_answer()  # (the final one: its transaction only reads)
            committing.clear()
            session.execute(sa.select(Item.id)).all()
            session.execute(sa.select(Entry.id)).all()
            if end == "writes-an-item":
                session.add(Item(name=f"{name}-end"))

        raised: sa.exc.DBAPIError | None = None
        try:
            Sessions.run(unit)
        except sa.exc.DBAPIError as exc:
            raised = exc
        assert calls == [f"r{round_}-1"]
        prefix = f"r{round_}-"
        items = [n for n in names(pg_server, first, "items") if n.startswith(prefix)]
        assert [n for n in names(pg_server, second, "entries") if n.startswith(prefix)] == calls
        order = "first" if committing[0] is engines[1] else "second"
        seen.add(order)
        if end == "reads":
            assert raised is None, raised
            assert items == calls
        elif order == "first":  # the item's COMMIT never went out: lost
            assert raised is not None
            assert partly_committed(raised)
            assert items == calls
        else:
            assert raised is None, raised
            assert items == [*calls, f"{calls[0]}-end"]
        if len(seen) == 2:
            break
    assert seen == {"first", "second"}  # the lost COMMIT went out first, and second


@pytest.mark.asyncio
async def test_async_a_unit_committed_midway_whose_read_only_end_loses_an_answer_is_done(
    pg_server: PostgresServer,
    databases: tuple[str, str],
    async_engines: tuple[AsyncEngine, AsyncEngine],
    second_proxy: FaultProxy,
    service: str,
) -> None:
    """The async twin of the ``reads`` case of
    :func:`test_a_unit_committed_midway_whose_read_only_end_loses_an_answer_is_done`."""
    first, second = databases
    Sessions = bound(*async_engines, service, rdb.AsyncResilientSession, config=PATIENT)
    committing: list[sa.Engine] = []

    def heard(conn: sa.Connection) -> None:
        committing.append(conn.engine)

    for engine in async_engines:
        event.listen(engine.sync_engine, "commit", heard)
    seen: set[str] = set()
    for round_ in range(ROUNDS):
        for engine in async_engines:  # new connections for both: no order carried over
            await engine.dispose()
        calls: list[str] = []

        async def unit(
            session: AsyncSession, calls: list[str] = calls, round_: int = round_
        ) -> None:
            name = f"a{round_}-{len(calls) + 1}"
            calls.append(name)
            session.add(Item(name=name))
            session.add(Entry(name=name))
            await session.commit()
            second_proxy.lose_commit_answer()
            committing.clear()
            (await session.execute(sa.select(Item.id))).all()
            (await session.execute(sa.select(Entry.id))).all()

        await Sessions.run(unit)
        assert calls == [f"a{round_}-1"]
        prefix = f"a{round_}-"
        assert [n for n in names(pg_server, first, "items") if n.startswith(prefix)] == calls
        assert [n for n in names(pg_server, second, "entries") if n.startswith(prefix)] == calls
        seen.add("first" if committing[0] is async_engines[1].sync_engine else "second")
        if len(seen) == 2:
            break
    assert seen == {"first", "second"}  # the lost COMMIT went out first, and second


def test_a_commit_refused_after_the_other_database_committed_is_not_replayed(
    pg_server: PostgresServer,
    databases: tuple[str, str],
    engines: tuple[sa.Engine, sa.Engine],
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The second database refuses its COMMIT with a conflict (40001, transient) on the first
    attempt. When the first database committed before it, that part is committed for good: the
    error is raised, not replayed. When it was refused first, nothing was committed: the unit
    is replayed as usual. Either way nothing is written twice. (SQLAlchemy picks the order;
    several rounds.)"""
    first, second = databases
    Sessions = bound(*engines, service)
    for round_ in range(4):
        calls: list[str] = []

        def unit(session: Session, calls: list[str] = calls, round_: int = round_) -> None:
            name = f"r{round_}-first" if not calls else f"r{round_}-again"
            calls.append(name)
            session.add(Item(name=name))
            session.add(Entry(name=name))

        refused: sa.exc.DBAPIError | None = None
        try:
            Sessions.run(unit)
        except sa.exc.DBAPIError as exc:
            refused = exc
        if refused is not None:
            assert rdb.sqlstate_of(refused) == "40001"
            assert calls == [f"r{round_}-first"]  # not replayed: the items row committed
            assert f"r{round_}-first" in names(pg_server, first, "items")
            assert any("on another connection" in r.getMessage() for r in caplog.records)
        else:
            assert calls == [f"r{round_}-first", f"r{round_}-again"]  # nothing committed
            assert f"r{round_}-first" not in names(pg_server, first, "items")
            assert f"r{round_}-again" in names(pg_server, second, "entries")
    items = names(pg_server, first, "items")
    assert len(items) == 4  # one per round: none twice, none lost
    assert len({name.split("-")[0] for name in items}) == 4


@pytest.mark.parametrize("fault", ["lost", "swallowed"])
def test_a_lost_answer_on_another_engine_is_settled_in_that_engines_database(
    *,
    pg_server: PostgresServer,
    databases: tuple[str, str],
    engines: tuple[sa.Engine, sa.Engine],
    second_proxy: FaultProxy,
    service: str,
    fault: str,
) -> None:
    """A unit that writes only entries: its one connection is the second database's (marked:
    the engines of ``binds`` get the factory's hooks). Its marker is in the second database,
    where the COMMIT went; a claim in the first would find nothing, fence, and have the unit
    replayed: written twice. It is settled in the second: an answer lost after the COMMIT
    committed is done once; a COMMIT swallowed before the server (released after the claim
    fenced it) is replayed once and its late arrival refused."""
    Sessions = bound(*engines, service)
    calls: list[int] = []

    def entry_only(session: Session) -> None:
        calls.append(1)
        session.add(Entry(name=f"e-{len(calls)}"))

    Sessions.run(entry_only)
    if fault == "lost":
        second_proxy.lose_commit_answer()
        Sessions.run(entry_only)
        assert second_proxy.commits_lost == 1
        assert len(calls) == 2  # done, not replayed
        assert names(pg_server, databases[1], "entries") == ["e-1", "e-2"]
    else:
        second_proxy.swallow_commit()
        releaser = held_and_released(second_proxy, keep_server=True)
        Sessions.run(entry_only)
        releaser.join(15)
        assert second_proxy.commits_swallowed == 1
        assert second_proxy.deliver_late_commits() == 1  # refused: the claim fenced it
        assert len(calls) == 3  # replayed once
        assert names(pg_server, databases[1], "entries") == ["e-1", "e-3"]
    assert names(pg_server, databases[0], "items") == []
    markers = pg_server.execute(
        "SELECT count(*) FROM resilient_db.commit_markers", database=databases[0]
    )
    assert markers[0][0] == 0  # nothing was claimed in the factory's database


@pytest.mark.asyncio
@pytest.mark.parametrize("fault", ["lost", "swallowed"])
async def test_async_a_lost_commit_across_two_databases_is_settled_part_by_part(
    *,
    pg_server: PostgresServer,
    databases: tuple[str, str],
    fault_proxy: FaultProxy,
    second_proxy: FaultProxy,
    async_engines: tuple[AsyncEngine, AsyncEngine],
    service: str,
    fault: str,
) -> None:
    """The async twin: one database's COMMIT loses its answer or never arrives; each unit is
    done, replayed once or raised as partly committed, as the databases agree, and both
    orders of SQLAlchemy's COMMITs are met."""
    Sessions = bound(*async_engines, service, rdb.AsyncResilientSession, config=PATIENT)
    seen: set[str] = set()
    for round_ in range(ROUNDS):
        held = ("first", "second")[round_ % 2]
        for engine in async_engines:  # new connections for both: no order carried over
            await engine.dispose()
        proxy = fault_proxy if held == "first" else second_proxy
        calls: list[str] = []

        async def unit(
            session: AsyncSession, calls: list[str] = calls, round_: int = round_
        ) -> None:
            name = f"a{round_}-{len(calls) + 1}"
            calls.append(name)
            session.add(Item(name=name))
            session.add(Entry(name=name))

        releaser = armed(proxy, fault)
        raised: BaseException | None = None
        try:
            await Sessions.run(unit)
        except sa.exc.DBAPIError as exc:
            raised = exc
        if releaser is not None:
            await asyncio.to_thread(releaser.join, 15)
        order = settled(
            pg_server,
            databases,
            held=held,
            fault=fault,
            prefix=f"a{round_}-",
            calls=calls,
            raised=raised,
        )
        seen.add(order)
        if len(seen) == 2:
            break
    assert seen == {"first", "second"}  # both orders were met


def test_the_guard_compares_and_sets_through_the_connection_of_the_models_own_database(
    pg_server: PostgresServer,
    databases: tuple[str, str],
    engines: tuple[sa.Engine, sa.Engine],
    service: str,
) -> None:
    """The flush guard looks up the connection a flush will use among those the unit's
    transaction began on: a guarded row of the second database, loaded after the first
    database's connection began, gets its compare-and-set on the second database's connection
    (the first has no such table). A row another client moved meanwhile fails the unit with
    StaleTransitionError and nothing of it is written; one nobody moved is updated."""
    first, second = databases
    pg_server.execute(
        "INSERT INTO steps (id, status) VALUES (1, 'todo'), (2, 'todo')", database=second
    )
    Sessions = rdb.ResilientSession(
        engines[0], service=service, binds={Item: engines[0], Step: engines[1]}
    )

    def finish(session: Session, key: int, moved_meanwhile: bool) -> None:
        session.add(Item(name=f"i-{key}"))
        session.flush()  # the first database's connection begins first
        step = session.get(Step, key)
        assert step is not None
        if moved_meanwhile:
            pg_server.execute(f"UPDATE steps SET status = 'done' WHERE id = {key}", database=second)
        step.status = "done"

    with pytest.raises(rdb.StaleTransitionError, match="now holds 'done'"):
        Sessions.run(finish, 1, True)
    Sessions.run(finish, 2, False)
    assert names(pg_server, first, "items") == ["i-2"]
    rows = pg_server.execute("SELECT id, status FROM steps ORDER BY id", database=second)
    assert [tuple(r) for r in rows] == [(1, "done"), (2, "done")]


def test_the_guard_compares_and_sets_on_an_engine_bound_by_the_session_alone(
    pg_server: PostgresServer,
    databases: tuple[str, str],
    engines: tuple[sa.Engine, sa.Engine],
    service: str,
) -> None:
    """A model bound to a second engine by the session itself (``Session.bind_mapper``, after
    the factory was made: the factory never hooked that engine) still gets its compare-and-set
    there. The connection the flush writes through is one the unit's transaction began on, and
    was once taken for an engine with the guard's listener (as a factory's engines have): the
    UPDATE went out without its condition, and a row another client had moved was written over.
    Now it fails with StaleTransitionError naming the row and what it holds, nothing of the
    unit is written; a row nobody moved is updated once."""
    first, second = databases
    pg_server.execute(
        "INSERT INTO steps (id, status) VALUES (1, 'todo'), (2, 'todo')", database=second
    )
    Sessions = rdb.ResilientSession(engines[0], service=service)

    def finish(session: Session, key: int, moved_meanwhile: bool) -> None:
        session.add(Item(name=f"i-{key}"))
        session.flush()  # the first database's connection begins first
        session.bind_mapper(Step, engines[1])
        step = session.get(Step, key)
        assert step is not None
        if moved_meanwhile:
            pg_server.execute(f"UPDATE steps SET status = 'lost' WHERE id = {key}", database=second)
        step.status = "done"

    with pytest.raises(rdb.StaleTransitionError, match="now holds 'lost'") as raised:
        Sessions.run(finish, 1, True)
    assert (raised.value.pk, raised.value.from_state, raised.value.to_state) == (1, "todo", "done")
    Sessions.run(finish, 2, False)
    assert names(pg_server, first, "items") == ["i-2"]
    rows = pg_server.execute("SELECT id, status FROM steps ORDER BY id", database=second)
    assert [tuple(r) for r in rows] == [(1, "lost"), (2, "done")]


@pytest.mark.asyncio
async def test_async_the_guard_compares_and_sets_on_an_engine_bound_by_the_session_alone(
    pg_server: PostgresServer,
    databases: tuple[str, str],
    async_engines: tuple[AsyncEngine, AsyncEngine],
    service: str,
) -> None:
    """The async twin: the session binds the guarded model to the second engine itself."""
    first, second = databases
    pg_server.execute(
        "INSERT INTO steps (id, status) VALUES (1, 'todo'), (2, 'todo')", database=second
    )
    Sessions = rdb.AsyncResilientSession(async_engines[0], service=service)

    async def finish(session: AsyncSession, key: int, moved_meanwhile: bool) -> None:
        session.add(Item(name=f"i-{key}"))
        await session.flush()  # the first database's connection begins first
        session.sync_session.bind_mapper(Step, async_engines[1].sync_engine)
        step = await session.get(Step, key)
        assert step is not None
        if moved_meanwhile:
            await asyncio.to_thread(
                pg_server.execute,
                f"UPDATE steps SET status = 'lost' WHERE id = {key}",
                database=second,
            )
        step.status = "done"

    with pytest.raises(rdb.StaleTransitionError, match="now holds 'lost'") as raised:
        await Sessions.run(finish, 1, True)
    assert (raised.value.pk, raised.value.from_state, raised.value.to_state) == (1, "todo", "done")
    await Sessions.run(finish, 2, False)
    assert names(pg_server, first, "items") == ["i-2"]
    rows = pg_server.execute("SELECT id, status FROM steps ORDER BY id", database=second)
    assert [tuple(r) for r in rows] == [(1, "lost"), (2, "done")]


@pytest.mark.asyncio
async def test_async_a_lost_answer_on_another_engine_is_settled_in_that_engines_database(
    *,
    pg_server: PostgresServer,
    databases: tuple[str, str],
    second_proxy: FaultProxy,
    async_engines: tuple[AsyncEngine, AsyncEngine],
    service: str,
) -> None:
    """The async twin: the claim runs on the second engine (wrapped as an AsyncEngine)."""
    first, second = databases
    Sessions = bound(*async_engines, service, rdb.AsyncResilientSession)
    calls: list[int] = []

    async def entry_only(session: AsyncSession) -> None:
        calls.append(1)
        session.add(Entry(name=f"a-{len(calls)}"))

    await Sessions.run(entry_only)
    second_proxy.lose_commit_answer()
    await Sessions.run(entry_only)
    assert second_proxy.commits_lost == 1
    assert len(calls) == 2  # done, not replayed
    assert names(pg_server, second, "entries") == ["a-1", "a-2"]
    assert names(pg_server, first, "items") == []


# -- engines the factory did not hook: bound by the session itself, or routed by its class ----

#: how a unit's entries come to be written through the second engine, which the factory was
#: not given: the session binds the model or its table itself, or the factory's own session
#: class (``Session.class_``) is given a ``get_bind`` that picks it
UNKNOWN_BINDS = ["bind_mapper", "bind_table", "class_get_bind"]


def unknown_bind(Sessions: Any, how: str, second: sa.Engine) -> Callable[[Session], None]:
    """What binds ``Entry`` to ``second`` in a unit's session, ``how`` (:data:`UNKNOWN_BINDS`),
    to call first in the unit (the factory's class is routed at once)."""
    if how == "class_get_bind":
        holder = Sessions.class_
        own = holder.get_bind

        def get_bind(session: Session, mapper: Any = None, **kw: Any) -> Any:
            if mapper is not None and mapper.class_ is Entry:
                return second
            return own(session, mapper=mapper, **kw)

        holder.get_bind = get_bind
        return lambda session: None
    if how == "bind_table":
        return lambda session: session.bind_table(Entry.__table__, second)
    return lambda session: session.bind_mapper(Entry, second)


@pytest.mark.parametrize("fault", ["lost", "swallowed"])
@pytest.mark.parametrize("how", UNKNOWN_BINDS)
def test_a_lost_answer_on_an_engine_the_factory_was_not_given_is_settled_there(
    *,
    pg_server: PostgresServer,
    databases: tuple[str, str],
    engines: tuple[sa.Engine, sa.Engine],
    second_proxy: FaultProxy,
    service: str,
    fault: str,
    how: str,
) -> None:
    """A unit whose entry goes to the second engine, which the factory was never given (the
    session binds it, or the factory's own class routes to it): that engine gets the factory's
    hooks the first time a unit's transaction begins there, before it sends anything, so its
    COMMIT is marked and a lost answer settled in its database, as for an engine of
    ``binds=``. It was unmarked: every lost answer raised CommitOutcomeUnknownError, a
    COMMIT that never reached the server too. Now an answer lost after the COMMIT committed is
    done once; a COMMIT swallowed before the server is replayed once, its late arrival
    refused."""
    Sessions = rdb.ResilientSession(engines[0], service=service)
    bind = unknown_bind(Sessions, how, engines[1])
    calls: list[int] = []

    def entry_only(session: Session) -> None:
        bind(session)
        calls.append(1)
        session.add(Entry(name=f"e-{len(calls)}"))

    Sessions.run(entry_only)
    if fault == "lost":
        second_proxy.lose_commit_answer()
        Sessions.run(entry_only)
        assert second_proxy.commits_lost == 1
        assert len(calls) == 2  # done, not replayed
        assert names(pg_server, databases[1], "entries") == ["e-1", "e-2"]
    else:
        second_proxy.swallow_commit()
        releaser = held_and_released(second_proxy, keep_server=True)
        Sessions.run(entry_only)
        releaser.join(15)
        assert second_proxy.commits_swallowed == 1
        assert second_proxy.deliver_late_commits() == 1  # refused: the claim fenced it
        assert len(calls) == 3  # replayed once
        assert names(pg_server, databases[1], "entries") == ["e-1", "e-3"]
    assert names(pg_server, databases[0], "items") == []


@pytest.mark.parametrize("how", UNKNOWN_BINDS)
def test_a_dead_connection_of_an_engine_the_factory_was_not_given_is_replaced_at_checkout(
    *,
    pg_server: PostgresServer,
    databases: tuple[str, str],
    engines: tuple[sa.Engine, sa.Engine],
    service: str,
    how: str,
) -> None:
    """The second engine's pooled connection dies (its backend killed, as a restart does)
    between two units that write through it, the factory never given that engine. Hooked at
    its first transaction, the engine's checkout finds the dead connection and the pool
    replaces it: the unit runs once, as on the factory's own engine. Unhooked, the unit's
    first statement failed on it, a failed attempt counted against the service (replayed)."""
    Sessions = rdb.ResilientSession(engines[0], service=service)
    # straight to the server, not through a proxy: the killed backend's goodbye is on the
    # client's socket once terminate_backends returns (a proxy relays it a moment later, on
    # its own thread)
    second = sa.create_engine(pg_server.url(databases[1]))
    bind = unknown_bind(Sessions, how, second)
    calls: list[int] = []

    def entry_only(session: Session) -> None:
        bind(session)
        calls.append(1)
        session.add(Entry(name=f"k-{len(calls)}"))

    try:
        Sessions.run(entry_only)
        assert pg_server.terminate_backends(database=databases[1]) >= 1
        Sessions.run(entry_only)
    finally:
        second.dispose()
    assert len(calls) == 2  # one attempt each
    assert names(pg_server, databases[1], "entries") == ["k-1", "k-2"]


@pytest.mark.parametrize("fault", ["lost", "swallowed"])
def test_a_unit_writing_through_an_engine_it_bound_itself_is_settled_part_by_part(
    *,
    pg_server: PostgresServer,
    databases: tuple[str, str],
    fault_proxy: FaultProxy,
    second_proxy: FaultProxy,
    service: str,
    engines: tuple[sa.Engine, sa.Engine],
    fault: str,
) -> None:
    """As ``test_a_lost_commit_across_two_databases_is_settled_part_by_part``, with the
    entries' engine bound by the unit's session (``bind_mapper``), not given to the factory:
    each unit is done, replayed once or raised as partly committed as the databases agree,
    both orders of SQLAlchemy's COMMITs met. The second engine's COMMIT was unmarked: every
    such unit raised CommitOutcomeUnknownError, one that had committed nothing too."""
    Sessions = rdb.ResilientSession(engines[0], service=service, config=PATIENT)
    both_orders_settled(
        Sessions,
        pg_server,
        databases,
        engines,
        (fault_proxy, second_proxy),
        fault=fault,
        prefix="b",
        bind=lambda session: session.bind_mapper(Entry, engines[1]),
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("fault", ["lost", "swallowed"])
async def test_async_a_lost_answer_on_an_engine_the_session_bound_itself_is_settled_there(
    *,
    pg_server: PostgresServer,
    databases: tuple[str, str],
    second_proxy: FaultProxy,
    async_engines: tuple[AsyncEngine, AsyncEngine],
    service: str,
    fault: str,
) -> None:
    """The async twin: the session binds the entries to the second engine itself
    (``sync_session.bind_mapper``); a lost answer there is done once, a swallowed COMMIT
    replayed once (CommitOutcomeUnknownError both, before)."""
    first, second = databases
    Sessions = rdb.AsyncResilientSession(async_engines[0], service=service)
    calls: list[int] = []

    async def entry_only(session: AsyncSession) -> None:
        session.sync_session.bind_mapper(Entry, async_engines[1].sync_engine)
        calls.append(1)
        session.add(Entry(name=f"a-{len(calls)}"))

    await Sessions.run(entry_only)
    if fault == "lost":
        second_proxy.lose_commit_answer()
        await Sessions.run(entry_only)
        assert second_proxy.commits_lost == 1
        assert len(calls) == 2  # done, not replayed
        assert names(pg_server, second, "entries") == ["a-1", "a-2"]
    else:
        second_proxy.swallow_commit()
        releaser = held_and_released(second_proxy, keep_server=True)
        await Sessions.run(entry_only)
        await asyncio.to_thread(releaser.join, 15)
        assert second_proxy.commits_swallowed == 1
        assert second_proxy.deliver_late_commits() == 1  # refused: the claim fenced it
        assert len(calls) == 3  # replayed once
        assert names(pg_server, second, "entries") == ["a-1", "a-3"]
    assert names(pg_server, first, "items") == []


# -- the transition guard with models bound to two databases ----------------------------------


class ZooBase(DeclarativeBase):
    pass


class Animal(ZooBase):
    """Guarded, with a joined-table subclass (``Dog``)."""

    __tablename__ = "zoo_animals"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"pending": {"running"}, "running": {"done"}},
        initial={"pending"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str]
    status: Mapped[str]
    __mapper_args__: ClassVar[dict[str, Any]] = {
        "polymorphic_on": "kind",
        "polymorphic_identity": "animal",
    }


class Dog(Animal):
    __tablename__ = "zoo_dogs"
    id: Mapped[int] = mapped_column(sa.ForeignKey("zoo_animals.id"), primary_key=True)
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "dog"}


class Keeper(ZooBase):
    """Guarded, with no subclass."""

    __tablename__ = "zoo_keepers"
    __transitions__ = rdb.TransitionRules(
        column="status", transitions={"pending": {"running"}}, initial={"pending"}
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str]


@pytest.fixture
def zoos(
    pg_server: PostgresServer, pg_database: str, second_database: str
) -> Iterator[tuple[sa.Engine, sa.Engine]]:
    """An engine per database, each with the zoo's tables and triggers: dog 1 and keeper 1 are
    pending in the first, done in the second."""
    made: list[sa.Engine] = []
    for name, state in ((pg_database, "pending"), (second_database, "done")):
        engine = sa.create_engine(pg_server.url(name))
        made.append(engine)
        ZooBase.metadata.create_all(engine)
        with engine.begin() as conn:
            for model in (Animal, Keeper):
                rdb.install_transition_trigger(conn, model)
            conn.exec_driver_sql(BYPASS_BY_HAND)
            conn.exec_driver_sql(f"INSERT INTO zoo_animals VALUES (1, 'dog', '{state}')")
            conn.exec_driver_sql("INSERT INTO zoo_dogs VALUES (1)")
            conn.exec_driver_sql(f"INSERT INTO zoo_keepers VALUES (1, '{state}')")
    yield made[0], made[1]
    for engine in made:
        engine.dispose()


def zoo_state(engine: sa.Engine, table: str) -> str:
    with engine.connect() as conn:
        return str(conn.exec_driver_sql(f"SELECT status FROM {table} WHERE id = 1").scalar())


@pytest.mark.parametrize("mode", ["raise", "filter"])
def test_a_bulk_update_by_key_of_a_subclass_is_checked_where_its_base_is_written(
    zoos: tuple[sa.Engine, sa.Engine], service: str, mode: str
) -> None:
    """SQLAlchemy writes a bulk UPDATE by primary key through the base mapper's connection:
    with the subclass bound to another database, the guard read the row there (done), and
    refused (raise) or left out (filter) a legal move of the row the UPDATE writes
    (pending)."""
    first, second = zoos
    Sessions = rdb.ResilientSession(
        first,
        service=service,
        binds={Animal: first, Dog: second},
        config=rdb.Config(bulk_update=mode),
    )
    Sessions.run(lambda s: s.execute(sa.update(Dog), [{"id": 1, "status": "running"}]))
    assert zoo_state(first, "zoo_animals") == "running"
    assert zoo_state(second, "zoo_animals") == "done"  # where SQLAlchemy did not write


def test_the_trigger_refusing_a_move_on_an_engine_the_session_bound_itself_is_named(
    zoos: tuple[sa.Engine, sa.Engine], service: str
) -> None:
    """A statement of the unit that the database's transition trigger refuses, on an engine
    the factory was never given (the session binds ``Keeper`` to it): the refusal is
    IllegalTransitionError naming the row and the move, not retried, as on the factory's own
    engines. The engine had none of the factory's hooks, so SQLAlchemy's DatabaseError came
    out as it was."""
    first, second = zoos
    Sessions = rdb.ResilientSession(first, service=service)
    calls: list[int] = []

    def unit(session: Session) -> None:
        session.bind_mapper(Keeper, second)
        calls.append(1)
        session.execute(
            sa.text("UPDATE zoo_keepers SET status = 'pending' WHERE id = 1"),
            bind_arguments={"mapper": sa.inspect(Keeper)},
        )

    with pytest.raises(rdb.IllegalTransitionError, match="'done' -> 'pending'") as raised:
        Sessions.run(unit)
    assert (raised.value.pk, raised.value.from_state, raised.value.to_state) == (
        1,
        "done",
        "pending",
    )
    assert calls == [1]
    assert zoo_state(second, "zoo_keepers") == "done"


def repair(session: Session) -> None:
    """Bypass, then make an illegal move in each database: animal 1 pending -> done (the
    first), keeper 1 done -> pending (the second)."""
    rdb.bypass_transitions(session, reason="ticket 7: repair")
    animal, keeper = session.get(Animal, 1), session.get(Keeper, 1)
    assert animal is not None
    assert keeper is not None
    animal.status, keeper.status = "done", "pending"


@pytest.mark.parametrize("default", [False, True], ids=["no default bind", "default bind"])
def test_a_bypass_of_a_session_is_bound_on_each_database_it_uses(
    zoos: tuple[sa.Engine, sa.Engine], service: str, default: bool
) -> None:
    """bypass_transitions(session) took session.connection(): with no default bind it failed
    (UnboundExecutionError), and with one, the other database's connection, begun after the
    bypass, had none: its trigger refused the move the session guards let through. Each
    connection of the transaction gets it (those it has, those it begins later); the next
    transaction is guarded again on both."""
    first, second = zoos
    Sessions = rdb.ResilientSession(
        *([first] if default else []), service=service, binds={Animal: first, Keeper: second}
    )
    Sessions.run(repair)
    assert zoo_state(first, "zoo_animals") == "done"
    assert zoo_state(second, "zoo_keepers") == "pending"

    def again(session: Session) -> None:
        keeper = session.get(Keeper, 1)
        assert keeper is not None
        keeper.status = "done"
        session.flush()

    with pytest.raises(rdb.IllegalTransitionError, match="'pending' -> 'done'"):
        Sessions.run(again)


@pytest.mark.parametrize("began", [False, True], ids=["bypass first", "after a write"])
def test_a_bypass_of_a_routed_session_is_bound_on_the_primary(
    zoos: tuple[sa.Engine, sa.Engine], service: str, began: bool
) -> None:
    """SQLAlchemy's read/write split (a get_bind() sending flushes and DML to the primary, the
    rest to a replica): the bypass was bound on the replica's transaction alone, and the
    primary's trigger refused the flush's move."""
    primary = zoos[0]
    replica = primary.execution_options(postgresql_readonly=True)

    class Routed(Session):
        def get_bind(self, mapper: Any = None, clause: Any = None, **kw: Any) -> Any:
            if self._flushing or isinstance(clause, (sa.Update, sa.Delete, sa.Insert)):
                return primary
            return replica

    def unit(session: Session) -> None:
        if began:  # pending -> running, legal: the primary's connection begins before
            session.execute(sa.update(Keeper).where(Keeper.id == 1).values(status="running"))
        rdb.bypass_transitions(session, reason="ticket 8: repair")
        animal = session.get(Animal, 1)  # read on the replica
        assert animal is not None
        animal.status = "done"  # flushed to the primary

    rdb.ResilientSession(class_=Routed, service=service).run(unit)
    assert zoo_state(primary, "zoo_animals") == "done"


def test_a_bypass_of_a_session_reading_on_a_hot_standby_is_bound_on_the_primary(
    pg_standby: StandbyPair, service: str
) -> None:
    """The read/write split with a real replica: the bypass statement on the standby's
    connection failed (no transaction id can be assigned in recovery), whether the bypass went
    there (bypass first) or the standby's connection began after it. A standby, where nothing
    is written, is left alone; the primary gets the bypass."""
    pair = pg_standby
    pair.create_database("zoo")
    primary = sa.create_engine(pair.primary.url("zoo"))
    replica = sa.create_engine(pair.standby.url("zoo"))
    try:
        ZooBase.metadata.create_all(primary)
        with primary.begin() as conn:
            for model in (Animal, Keeper):
                rdb.install_transition_trigger(conn, model)
            conn.exec_driver_sql(BYPASS_BY_HAND)
            conn.exec_driver_sql("INSERT INTO zoo_animals VALUES (1, 'dog', 'pending')")
            conn.exec_driver_sql("INSERT INTO zoo_dogs VALUES (1)")
            conn.exec_driver_sql("INSERT INTO zoo_keepers VALUES (1, 'pending')")
        pair.wait_replayed()

        class Routed(Session):
            def get_bind(self, mapper: Any = None, clause: Any = None, **kw: Any) -> Any:
                if self._flushing or isinstance(clause, (sa.Update, sa.Delete, sa.Insert)):
                    return primary
                return replica

        Sessions = rdb.ResilientSession(class_=Routed, service=service)

        def move(session: Session, to: str) -> None:
            animal = session.get(Animal, 1)  # read on the standby
            assert animal is not None
            animal.status = to  # flushed to the primary

        def bypass_first(session: Session) -> None:
            rdb.bypass_transitions(session, reason="ticket 11")  # the standby's begins
            move(session, "done")  # pending -> done: illegal

        def after_a_write(session: Session) -> None:
            session.execute(sa.update(Keeper).where(Keeper.id == 1).values(status="running"))
            rdb.bypass_transitions(session, reason="ticket 12")  # the primary's has begun
            move(session, "pending")  # done -> pending: illegal

        Sessions.run(bypass_first)
        pair.wait_replayed()
        Sessions.run(after_a_write)
        assert zoo_state(primary, "zoo_animals") == "pending"
        assert zoo_state(primary, "zoo_keepers") == "running"
        with replica.connect() as conn, pytest.raises(ValueError, match="hot standby"):
            rdb.bypass_transitions(conn, reason="ticket 13")
    finally:
        primary.dispose()
        replica.dispose()


@pytest.mark.asyncio
async def test_async_a_bypass_is_bound_on_a_connection_begun_after_it(
    pg_server: PostgresServer,
    pg_database: str,
    second_database: str,
    zoos: tuple[sa.Engine, sa.Engine],
    service: str,
) -> None:
    """The async twin: the second database's connection begins after the bypass."""
    first, second = (
        create_async_engine(pg_server.url(name, driver="asyncpg"))
        for name in (pg_database, second_database)
    )
    Sessions = rdb.AsyncResilientSession(first, service=service, binds={Keeper: second})

    async def unit(session: AsyncSession) -> None:
        await rdb.bypass_transitions_async(session, reason="ticket 9: repair")
        animal, keeper = await session.get(Animal, 1), await session.get(Keeper, 1)
        assert animal is not None
        assert keeper is not None
        animal.status, keeper.status = "done", "pending"

    try:
        await Sessions.run(unit)
    finally:
        await first.dispose()
        await second.dispose()
    assert zoo_state(zoos[0], "zoo_animals") == "done"
    assert zoo_state(zoos[1], "zoo_keepers") == "pending"
