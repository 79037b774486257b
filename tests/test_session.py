"""ResilientSession against a real PostgreSQL with real faults.

Exact SQLSTATEs come from ``RAISE ... USING ERRCODE`` through the real driver; disconnects from
``pg_terminate_backend``, the fault proxy and server restarts. Backoff is zeroed by configuration
(``set_testing``), never slept.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from scenarios import NOT_TRANSIENT, RAISE_CODE_FUNCTION, TRANSIENT, Base, Item
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session, sessionmaker

import resilient_db as rdb
from resilient_db import _unit
from resilient_db._state import STATE
from resilient_db.testing import free_port

pytestmark = pytest.mark.usefixtures("no_backoff")


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        conn.execute(RAISE_CODE_FUNCTION)
    yield eng
    eng.dispose()


def factory(engine: sa.Engine, service: str, **cfg: Any) -> rdb.ResilientSession[Any]:
    return rdb.ResilientSession(engine, service=service, config=rdb.Config(**cfg))


def count_items(engine: sa.Engine, name: str | None = None) -> int:
    with engine.connect() as conn:
        q = sa.select(sa.func.count()).select_from(Item)
        if name is not None:
            q = q.where(Item.name == name)
        return int(conn.execute(q).scalar_one())


def raise_code(session: Session, code: str) -> None:
    session.execute(sa.text("SELECT raise_code(:c)"), {"c": code})


# -- replay of whole units -----------------------------------------------------------------------
def test_killed_backend_mid_unit_is_replayed_once_with_exactly_one_row(
    engine: sa.Engine, pg_server: Any, service: str
) -> None:
    Session = factory(engine, service)
    calls: list[int] = []

    def unit(session: Session) -> int:
        calls.append(1)
        session.add(Item(name="killed"))
        session.flush()
        if len(calls) == 1:
            pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
            pg_server.execute(f"SELECT pg_terminate_backend({int(pid)})")
        session.execute(sa.text("SELECT 1"))
        return len(calls)

    assert Session.run(unit) == 2
    assert count_items(engine, "killed") == 1
    stats = rdb.health()["services"][service]["counters"]
    assert stats["retries_by_class"] == {"disconnect": 1}
    assert stats["recovered"] == 1


@pytest.mark.parametrize(("code", "outcome"), sorted(TRANSIENT.items()))
def test_each_transient_sqlstate_is_replayed(
    engine: sa.Engine, service: str, code: str, outcome: rdb.Outcome
) -> None:
    Session = factory(engine, service)
    seen: list[BaseException] = []

    def unit(session: Session) -> str:
        session.add(Item(name=f"t-{code}"))
        session.flush()
        if not seen:
            try:
                raise_code(session, code)
            except sa_exc.DBAPIError as exc:
                seen.append(exc)
                raise
        return "done"

    assert Session.run(unit) == "done"
    assert len(seen) == 1
    assert rdb.sqlstate_of(seen[0]) == code  # the real driver delivered the real code
    assert rdb.classify(seen[0]) is outcome
    assert count_items(engine, f"t-{code}") == 1


@pytest.mark.parametrize("code", NOT_TRANSIENT)
def test_each_non_transient_sqlstate_is_raised_at_once(
    engine: sa.Engine, service: str, code: str
) -> None:
    Session = factory(engine, service)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        session.add(Item(name=f"n-{code}"))
        session.flush()
        raise_code(session, code)

    with pytest.raises(sa_exc.DBAPIError) as info:
        Session.run(unit)
    assert rdb.sqlstate_of(info.value) == code
    assert not rdb.is_transient(info.value)
    assert calls == [1]
    assert count_items(engine) == 0


def test_an_error_raised_while_handling_a_transient_one_is_the_units_own(
    engine: sa.Engine, service: str
) -> None:
    """A unit that catches a serialization failure and raises its own error in the except
    block: that error's context is the conflict, not its cause. It is the unit's answer, raised
    after one attempt, not replayed as the conflict would be."""
    Session = factory(engine, service)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        try:
            raise_code(session, "40001")
        except sa_exc.DBAPIError:
            raise ValueError("the unit's own answer")  # noqa: B904 (the conflict is its context)

    with pytest.raises(ValueError, match="the unit's own answer") as info:
        Session.run(unit)
    assert rdb.sqlstate_of(info.value.__context__) == "40001"
    assert rdb.classify(info.value) is rdb.Outcome.NOT_TRANSIENT
    assert calls == [1]


def test_an_open_circuit_raised_from_a_transient_failure_is_not_transient(
    engine: sa.Engine, service: str
) -> None:
    """The circuit opened by a unit's failure refuses its retry: the CircuitOpenError is
    raised from that failure (57P03, unavailable: transient), and is not transient itself (a
    web client told to retry at once would meet the open circuit)."""
    Session = factory(engine, service, failure_threshold=1, reset_timeout=60.0)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        raise_code(session, "57P03")

    with pytest.raises(rdb.CircuitOpenError) as info:
        Session.run(unit)
    assert rdb.sqlstate_of(info.value.__cause__) == "57P03"
    assert rdb.classify(info.value) is rdb.Outcome.NOT_TRANSIENT
    assert not rdb.is_transient(info.value)
    assert calls == [1]


def test_transaction_resolution_unknown_is_an_unknown_commit_outcome_never_replayed(
    engine: sa.Engine, service: str
) -> None:
    """08007 (transaction_resolution_unknown): the server can't say whether the transaction
    committed. Its class, 08, is otherwise a lost connection, which is replayed: this code
    never is (a replay may write twice)."""
    Session = factory(engine, service)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        session.add(Item(name="u-08007"))
        session.flush()
        raise_code(session, "08007")

    with pytest.raises(sa_exc.DBAPIError) as info:
        Session.run(unit)
    assert rdb.sqlstate_of(info.value) == "08007"
    assert rdb.classify(info.value) is rdb.Outcome.COMMIT_UNKNOWN
    assert not rdb.is_transient(info.value)
    assert calls == [1]


def test_real_sqlstates_from_the_driver_for_real_failures(engine: sa.Engine, service: str) -> None:
    Session = factory(engine, service)
    Session.run(lambda s: s.add(Item(name="dup")))
    with pytest.raises(sa_exc.IntegrityError) as dup:
        Session.run(lambda s: s.add(Item(name="dup")))
    with pytest.raises(sa_exc.DataError) as div:
        Session.run(lambda s: s.execute(sa.text("SELECT 1/0")))
    assert (rdb.sqlstate_of(dup.value), rdb.sqlstate_of(div.value)) == ("23505", "22012")


def test_real_deadlock_between_two_threads_resolves_with_both_units_done(
    engine: sa.Engine, service: str
) -> None:
    Session = factory(engine, service, conflict_delay=0.001, max_retries=8)
    Session.run(lambda s: s.add_all([Item(id=1, name="a"), Item(id=2, name="b")]))
    barrier = threading.Barrier(2, timeout=10)
    attempts = {"first": 0, "second": 0}
    errors: list[BaseException] = []

    def unit(session: Session, who: str, order: tuple[int, int]) -> None:
        attempts[who] += 1
        for n, item_id in enumerate(order):
            session.execute(
                sa.update(Item).where(Item.id == item_id).values(name=f"{who}-{item_id}")
            )
            if n == 0 and attempts[who] == 1:
                barrier.wait()  # both hold their first lock before asking for the second

    def worker(who: str, order: tuple[int, int]) -> None:
        try:
            Session.run(unit, who, order)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=("first", (1, 2))),
        threading.Thread(target=worker, args=("second", (2, 1))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    counters = rdb.health()["services"][service]["counters"]
    # the deadlock's victim was replayed (once, as a rule). Its replay, at once, may take the
    # row the other unit waits for before that one wakes (the victim's aborted lock no longer
    # holds it, and PostgreSQL lets the first to ask have it), and so deadlock with it again:
    # each deadlock is replayed. A chain of them was seen in a CI run (three replays), so the
    # units may retry up to 8 times: the test is about resolving, not about how many rounds
    replays = sum(attempts.values()) - 2
    assert 1 <= replays <= 16, (attempts, counters)
    assert counters["retries_by_class"] == {"conflict": replays}
    with engine.connect() as conn:
        names = dict(conn.execute(sa.select(Item.id, Item.name)).all())
    # both rows hold one unit's names: whichever committed last wrote both, all or nothing
    assert names in ({1: "first-1", 2: "first-2"}, {1: "second-1", 2: "second-2"}), names
    if replays == 1:
        winner = "first" if attempts["first"] == 2 else "second"
        assert names == {1: f"{winner}-1", 2: f"{winner}-2"}  # the replayed unit ran last


def test_exhausted_retries_reraise_the_original_database_error(
    engine: sa.Engine, service: str
) -> None:
    Session = factory(engine, service, max_retries=2)
    errors: list[BaseException] = []

    def unit(session: Session) -> None:
        try:
            raise_code(session, "40001")
        except sa_exc.DBAPIError as exc:
            errors.append(exc)
            raise

    with pytest.raises(sa_exc.OperationalError) as info:
        Session.run(unit)
    assert len(errors) == 3
    assert info.value is errors[-1]
    assert rdb.health()["services"][service]["counters"]["gave_up"] == 1


class _OwnBase(sa.orm.DeclarativeBase):
    pass


class _KeyedText(sa.types.TypeDecorator[str]):
    """A column type that calls another service of the application for each value it binds
    (a key service, here one that is down: nothing listens on the port)."""

    impl = sa.Text
    cache_ok = True
    port = 0

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
        return value


class _Doc(_OwnBase):
    __tablename__ = "own_os_error_docs"
    id: sa.orm.Mapped[int] = sa.orm.mapped_column(primary_key=True)
    title: sa.orm.Mapped[str]
    secret: sa.orm.Mapped[str | None] = sa.orm.mapped_column(_KeyedText)

    @sa.orm.validates("title")
    def _from_template(self, key: str, value: str) -> str:
        if value == "from-template":
            with open("/nonexistent/resilient_db/template.txt") as f:  # the application's file
                return f.read()
        return value


class _Stamped(_OwnBase):
    __tablename__ = "own_os_error_stamped"
    id: sa.orm.Mapped[int] = sa.orm.mapped_column(primary_key=True)
    title: sa.orm.Mapped[str]
    # a builtin as the default (os.getlogin is one that fails without a terminal): SQLAlchemy
    # calls it through a lambda of its own, which is the innermost frame of the error
    stamp: sa.orm.Mapped[str] = sa.orm.mapped_column(
        default=functools.partial(os.stat, "/nonexistent/resilient_db/stamp")
    )


@pytest.mark.parametrize(
    ("doc", "kind"),
    [
        (lambda: _Doc(id=1, title="from-template"), FileNotFoundError),  # in a @validates hook
        (lambda: _Doc(id=2, title="x", secret="s"), ConnectionRefusedError),  # in a bind type
        (lambda: _Stamped(id=3, title="x"), FileNotFoundError),  # a builtin column default
    ],
)
def test_the_applications_os_errors_raised_through_sqlalchemy_are_not_disconnects(
    engine: sa.Engine, service: str, doc: Callable[[], object], kind: type[OSError]
) -> None:
    """The application's own OSError raised in its code that SQLAlchemy calls (a validator
    reading a file, a column type calling a service) passed through SQLAlchemy's frames, which
    made it a driver's socket error: the unit was replayed, the breaker counted each attempt
    (and opened on a healthy database), and the web answer was 503. It is the application's:
    raised at once, not retried, not counted."""
    _KeyedText.port = free_port()  # nothing listens there
    _OwnBase.metadata.create_all(engine)
    Session = factory(engine, service, failure_threshold=1)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        session.add(doc())
        session.flush()

    with pytest.raises((kind, sa_exc.StatementError)) as info:  # (a bind type's: wrapped)
        Session.run(unit)
    assert isinstance(getattr(info.value, "orig", info.value), kind)
    assert calls == [1]
    assert not rdb.is_transient(info.value)
    assert rdb.classify(info.value) is not rdb.Outcome.DISCONNECT
    assert rdb.health()["services"][service]["breaker"]["state"] == "closed"
    assert Session.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1


def test_a_creator_whose_own_socket_is_refused_is_a_disconnect(pg_url: str, service: str) -> None:
    """A ``creator=`` that opens the connection's socket itself (a cloud SQL connector): its
    refused connect is raised from its own code, not the driver's, and is a lost connection
    all the same (raised while the pool connects): retried, counted."""
    url = sa.make_url(pg_url)
    refused_port = free_port()
    made: list[int] = []

    def creator() -> Any:
        made.append(1)
        if len(made) == 1:  # the connector's first try: its proxy is not up yet
            socket.create_connection(("127.0.0.1", refused_port), timeout=2).close()
        return psycopg.connect(
            host=url.host, port=url.port, user=url.username, password=url.password,
            dbname=url.database,
        )  # fmt: skip

    engine = sa.create_engine("postgresql+psycopg://", creator=creator)
    try:
        Session = factory(engine, service, initial_delay=0.001)
        assert Session.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
        assert made == [1, 1]
        counters = rdb.health()["services"][service]["counters"]
        assert counters["retries_by_class"] == {"disconnect": 1}
    finally:
        engine.dispose()


def test_nested_units_run_once_inside_the_outer_and_are_not_retried_alone(
    engine: sa.Engine, service: str
) -> None:
    Session = factory(engine, service)
    calls = {"outer": 0, "inner": 0}

    def inner(session: Session) -> None:
        calls["inner"] += 1
        session.add(Item(name=f"inner-{calls['inner']}"))
        session.flush()
        if calls["inner"] == 1:
            raise_code(session, "40001")

    def outer(session: Session) -> None:
        calls["outer"] += 1
        session.add(Item(name=f"outer-{calls['outer']}"))
        Session.run(inner)

    Session.run(outer)
    assert calls == {"outer": 2, "inner": 2}
    with engine.connect() as conn:
        names = set(conn.execute(sa.select(Item.name)).scalars())
    assert names == {"outer-2", "inner-2"}  # the failed first attempt left nothing


def test_a_unit_inside_with_self_healing_runs_once_per_operation_attempt(
    engine: sa.Engine, service: str
) -> None:
    """``with_self_healing`` around code that runs a unit (the plan's handler shape): the
    operation retries, the unit inside runs once per attempt, so the loops don't multiply."""
    Session = factory(engine, service, max_retries=3)
    calls = {"handler": 0, "unit": 0}

    def unit(session: Session) -> None:
        calls["unit"] += 1
        raise_code(session, "40001")

    def handler() -> None:
        calls["handler"] += 1
        Session.run(unit)

    with pytest.raises(sa.exc.OperationalError):
        rdb.with_self_healing(handler, service=service, config=rdb.Config(max_retries=3))
    assert calls == {"handler": 4, "unit": 4}  # not 4 x 4
    with pytest.raises(sa.exc.OperationalError):  # an operation that doesn't retry: run does
        rdb.with_self_healing(handler, service=service, use_retry=False)
    assert calls == {"handler": 5, "unit": 8}


def test_a_unit_whose_code_swallowed_a_database_error_is_not_reported_done(
    engine: sa.Engine, service: str
) -> None:
    """The unit writes, then catches a database error and goes on: its transaction has failed,
    and its COMMIT is answered with a ROLLBACK. psycopg takes that for done, so the unit was
    reported done with nothing written; it raises 25P02 now, as on asyncpg (not retried)."""
    Session = factory(engine, service)

    def unit(session: Session) -> str:
        session.add(Item(name="swallowed"))
        session.flush()
        with contextlib.suppress(sa.exc.DBAPIError):  # "handled"
            raise_code(session, "22012")
        return "done"

    with pytest.raises(sa.exc.InternalError) as caught:
        Session.run(unit)
    assert getattr(caught.value.orig, "sqlstate", None) == "25P02"
    with engine.connect() as conn:
        assert conn.execute(sa.select(Item).where(Item.name == "swallowed")).first() is None
    assert Session.run(lambda session: session.execute(sa.text("SELECT 1")).scalar()) == 1


def test_a_unit_that_committed_part_of_its_work_is_not_replayed(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``session.commit()`` inside a unit, then a transient error: replaying would write the
    committed part again, so the error is raised as it is (and said so); a unit that commits
    inside and then succeeds is unchanged."""
    Session = factory(engine, service)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        session.add(Item(name="committed-inside"))
        session.commit()
        session.add(Item(name="after"))
        session.flush()
        raise_code(session, "40001")

    with (
        caplog.at_level(logging.WARNING, logger="resilient_db"),
        pytest.raises(sa_exc.OperationalError) as raised,
    ):
        Session.run(unit)
    assert rdb.sqlstate_of(raised.value) == "40001"
    assert len(calls) == 1
    assert count_items(engine, "committed-inside") == 1
    assert count_items(engine, "after") == 0
    assert any("committed part of its work itself" in r.getMessage() for r in caplog.records)
    assert not any("Gave up" in r.getMessage() for r in caplog.records)
    stats = rdb.health()["services"][service]["counters"]
    assert stats["retries"] == 0

    def commits_inside(session: Session) -> None:
        session.add(Item(name="first"))
        session.commit()
        session.add(Item(name="second"))

    Session.run(commits_inside)
    assert count_items(engine, "first") == count_items(engine, "second") == 1
    calls.clear()

    def fails_before_any_commit(session: Session) -> None:  # the next attempt starts afresh
        calls.append(1)
        session.add(Item(name="replayed"))
        session.flush()
        if len(calls) == 1:
            raise_code(session, "40001")

    Session.run(fails_before_any_commit)
    assert len(calls) == 2
    assert count_items(engine, "replayed") == 1


@pytest.fixture
def autocommit(pg_url: str) -> Iterator[sa.Engine]:
    """A new engine in ``AUTOCOMMIT``: each statement commits on its own."""
    eng = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    yield eng
    eng.dispose()


def test_a_unit_on_an_autocommit_engine_is_replayed_only_before_its_first_write(
    autocommit: sa.Engine, engine: sa.Engine, service: str
) -> None:
    """On an ``AUTOCOMMIT`` engine each statement commits on its own: once a writing statement
    went through, a failure is raised, not replayed. One the server refused with an error
    committed nothing, so a unit failing there is replayed."""
    Session = factory(autocommit, service)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        session.execute(sa.text("INSERT INTO items (name) VALUES ('autocommitted')"))
        raise_code(session, "40001")

    def refused_first(session: Session) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise_code(session, "40001")  # a function call: a statement that may write
        session.execute(sa.text("INSERT INTO items (name) VALUES ('after-refusal')"))

    with pytest.raises(sa_exc.OperationalError):
        Session.run(unit)
    assert len(calls) == 1
    assert count_items(engine, "autocommitted") == 1
    calls.clear()
    Session.run(refused_first)
    assert len(calls) == 2
    assert count_items(engine, "after-refusal") == 1


def test_the_first_unit_on_a_new_autocommit_engine_is_replayed_after_a_refusal(
    autocommit: sa.Engine, engine: sa.Engine, service: str
) -> None:
    """SQLAlchemy's first statements on a new engine (``select pg_catalog.version()``, ``select
    current_schema()``) run inside the first unit that connects; on an ``AUTOCOMMIT`` engine
    they counted as statements that may have written, so that unit was never replayed."""
    Session = factory(autocommit, service)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise_code(session, "40001")  # refused by the server: nothing committed
        session.execute(sa.text("INSERT INTO items (name) VALUES ('first-unit')"))

    Session.run(unit)
    assert len(calls) == 2
    assert count_items(engine, "first-unit") == 1


def test_an_autocommit_statement_lost_by_the_factorys_own_disconnect_code_is_not_replayed(
    autocommit: sa.Engine, engine: sa.Engine, service: str
) -> None:
    """Whether a failed autocommit statement was answered (committed nothing) is the factory's
    classifier's call: a SQLSTATE it counts as a disconnect is no answer, so the statement may
    have committed and the unit is not replayed. (The default classifier knows nothing of the
    code and would call it an answer: the unit would be replayed, its write possibly twice.)"""
    Session = rdb.ResilientSession(
        autocommit,
        service=service,
        classifier=rdb.Classifier().with_codes({"RX001": "disconnect"}),
    )
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        raise_code(session, "RX001")  # a function call: a statement that may write

    with pytest.raises(sa_exc.DBAPIError) as info:
        Session.run(unit)
    assert rdb.sqlstate_of(info.value) == "RX001"
    assert len(calls) == 1  # not replayed


#: statements whose session state a failed attempt's ROLLBACK keeps, and their undoing
KEPT_BY_ROLLBACK = {
    # (lock_timeout: without the fix, a replay on the other pooled connection waits on the
    # lock the failed attempt's idle connection still holds)
    "advisory lock": (
        "SET LOCAL lock_timeout = '2s'; SELECT pg_advisory_lock(4242)",
        "SELECT pg_advisory_unlock(4242)",
    ),
    # (without the fix, a replay on the same connection meets its PREPARE: 42P05)
    "prepared statement": ("PREPARE kept_by_rollback AS SELECT 1", "DEALLOCATE kept_by_rollback"),
}


@pytest.mark.parametrize("kept", KEPT_BY_ROLLBACK)
def test_what_a_failed_attempts_rollback_keeps_does_not_reach_the_replay(
    engine: sa.Engine, service: str, kept: str
) -> None:
    take, release = KEPT_BY_ROLLBACK[kept]
    if kept == "advisory lock":
        with engine.connect(), engine.connect():
            pass  # two pooled connections: the replay gets the other one (the pool is FIFO)
    Session = factory(engine, service)
    calls: list[int] = []

    def unit(session: Session) -> int:
        calls.append(1)
        session.connection().exec_driver_sql(take)
        session.add(Item(name=f"kept-{len(calls)}"))
        session.flush()
        if len(calls) == 1:
            raise_code(session, "40001")
        session.execute(sa.text(release))
        return len(calls)

    assert Session.run(unit) == 2
    assert count_items(engine) == 1
    with engine.connect() as conn:  # nothing of the failed attempt is left on a pooled one
        held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
        assert conn.execute(sa.text(held)).scalar_one() == 0


def test_a_unit_whose_own_commit_was_refused_is_replayed(engine: sa.Engine, service: str) -> None:
    """The server answered the unit's own COMMIT with an error (here a deferred trigger raising
    40001 at COMMIT): nothing was committed, so the unit is replayed as any other."""
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE deferred_checks (v int)"))
        conn.execute(
            sa.text(
                "CREATE FUNCTION refuse_negative() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN IF NEW.v < 0 THEN RAISE EXCEPTION 'refused' USING ERRCODE = '40001'; "
                "END IF; RETURN NEW; END $$"
            )
        )
        conn.execute(
            sa.text(
                "CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON deferred_checks "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_negative()"
            )
        )
    Session = factory(engine, service)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        value = -1 if len(calls) == 1 else 1
        session.execute(sa.text("INSERT INTO deferred_checks VALUES (:v)"), {"v": value})
        session.commit()  # refused at the first attempt: the trigger runs at COMMIT
        session.add(Item(name="after-own-commit"))

    Session.run(unit)
    assert len(calls) == 2
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT v FROM deferred_checks")).scalars().all() == [1]
    assert count_items(engine, "after-own-commit") == 1


@pytest.mark.parametrize("other_enabled", [True, False], ids=["other-on", "other-off"])
def test_a_unit_that_ran_a_committed_unit_of_another_factory_is_not_replayed(
    engine: sa.Engine, pg_url: str, service: str, other_enabled: bool
) -> None:
    """A unit of another factory (another database) inside a unit commits on its own: a replay
    of the enclosing unit would run it, and write, again. Also when self-healing is off for
    the other factory, whose connections then carry nothing that would show its COMMIT."""
    other_engine = sa.create_engine(pg_url)
    Outer = factory(engine, service)
    Other = factory(other_engine, f"{service}-other", enabled=other_enabled)
    calls: list[int] = []

    def other_unit(session: Session) -> None:
        session.add(Item(name="other-database"))

    def unit(session: Session) -> None:
        calls.append(1)
        Other.run(other_unit)
        session.add(Item(name="outer"))
        session.flush()
        raise_code(session, "40001")

    try:
        with pytest.raises(sa_exc.OperationalError):
            Outer.run(unit)
    finally:
        other_engine.dispose()
    assert len(calls) == 1
    assert count_items(engine, "other-database") == 1
    assert count_items(engine, "outer") == 0


def test_transactional_decorator_keeps_the_signature_and_commits(
    engine: sa.Engine, service: str
) -> None:
    Session = factory(engine, service)

    @Session.transactional
    def create(session: Session, name: str, *, suffix: str = "") -> int:
        item = Item(name=name + suffix)
        session.add(item)
        session.flush()
        return item.id

    new_id = create("decorated", suffix="!")
    assert isinstance(new_id, int)
    assert count_items(engine, "decorated!") == 1


def test_run_refuses_a_transaction_the_caller_opened(engine: sa.Engine, service: str) -> None:
    Session = factory(engine, service)
    with Session() as session:
        session.execute(sa.text("SELECT 1"))
        assert session.in_transaction()
        with pytest.raises(rdb.TransactionStateError, match="can't retry inside a transaction"):
            Session.run_in(session, lambda s: s.add(Item(name="never")))
        session.rollback()
        Session.run_in(session, lambda s: s.add(Item(name="fine")))
    assert count_items(engine) == 1


def item_names(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(Item.name)).scalars())


@pytest.mark.parametrize("enabled", [True, False], ids=["enabled", "disabled"])
def test_what_a_unit_may_do_does_not_depend_on_the_kill_switch(
    engine: sa.Engine, service: str, enabled: bool
) -> None:
    """A unit may open its own transaction, commit and carry on, and run nested units, which
    join it (the outer unit's failure takes them back): with SELF_HEALING_ENABLED=false as with
    it on, for run and run_in. (Switched off, run was ``with Session.begin()``: the first two
    raised InvalidRequestError and a nested unit committed on its own.)"""
    Session = factory(engine, service, enabled=enabled)

    def begins(session: Session, name: str) -> str:
        with session.begin():
            session.add(Item(name=name))
        return name

    def commits_and_goes_on(session: Session) -> None:
        session.add(Item(name="first"))
        session.commit()
        session.add(Item(name="second"))

    def outer(session: Session) -> None:
        session.add(Item(name="outer"))
        session.flush()
        Session.run(lambda inner: inner.add(Item(name="inner")))
        raise ValueError("the outer unit fails")

    assert Session.run(begins, "began") == "began"
    Session.run(commits_and_goes_on)
    with Session() as session:
        assert Session.run_in(session, begins, "began in run_in") == "began in run_in"
    with pytest.raises(ValueError, match="the outer unit fails"):
        Session.run(outer)
    assert item_names(engine) == {"began", "first", "second", "began in run_in"}


@pytest.mark.parametrize("enabled", [True, False], ids=["enabled", "disabled"])
def test_units_of_a_factory_without_autobegin(
    engine: sa.Engine, service: str, enabled: bool
) -> None:
    """``autobegin=False``: run begins each attempt's transaction itself, so units work (every
    one failed with "Autobegin is disabled") and a replayed one begins afresh; a unit that
    commits its work itself is done, not reported failed; one that opens a transaction of its
    own is told at once that one is begun, with nothing committed (it was committed, then
    reported failed)."""
    Session = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(enabled=enabled), autobegin=False
    )
    calls: list[str] = []

    def add(session: Session, name: str, *, conflict_first: bool = False) -> str:
        calls.append(name)
        session.add(Item(name=name))
        session.flush()
        if conflict_first and calls.count(name) == 1:
            raise_code(session, "40001")
        return name

    def commits_itself(session: Session) -> str:
        session.add(Item(name="committed by the unit"))
        session.commit()
        return "done"

    def begins(session: Session) -> None:
        with session.begin():
            session.add(Item(name="never"))

    assert Session.run(add, "added") == "added"
    assert Session.run(commits_itself) == "done"
    with Session() as session:
        assert Session.run_in(session, add, "in run_in") == "in run_in"
    with pytest.raises(sa_exc.InvalidRequestError, match="already begun"):
        Session.run(begins)
    expected = {"added", "committed by the unit", "in run_in"}
    if enabled:
        assert Session.run(add, "replayed", conflict_first=True) == "replayed"
        assert calls.count("replayed") == 2
        expected.add("replayed")
    assert item_names(engine) == expected


def test_business_errors_never_trip_the_breaker(engine: sa.Engine, service: str) -> None:
    Session = factory(engine, service, failure_threshold=2)
    Session.run(lambda s: s.add(Item(name="taken")))
    for _ in range(6):
        with pytest.raises(sa_exc.IntegrityError):
            Session.run(lambda s: s.add(Item(name="taken")))
    with pytest.raises(sa_exc.ProgrammingError):
        Session.run(lambda s: s.execute(sa.text("SELECT * FROM no_such_table")))
    assert rdb.health()["services"][service]["breaker"]["state"] == "closed"


# -- the breaker against a real outage ------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_rejects_without_network_half_opens_and_closes(
    pg_database: str, fault_proxy: Any, service: str
) -> None:
    clock = Clock()
    engine = sa.create_engine(fault_proxy.url(pg_database), connect_args={"connect_timeout": 2})
    Session = rdb.ResilientSession(
        engine,
        service=service,
        config=rdb.Config(failure_threshold=3, max_retries=1, reset_timeout=10.0),
        wall_clock=clock,
    )
    assert Session.run(lambda s: s.execute(sa.text("SELECT 1")).scalar()) == 1
    fault_proxy.refuse()
    fault_proxy.cut_all()
    with pytest.raises(sa_exc.OperationalError):  # 2 attempts, both refused
        Session.run(lambda s: s.execute(sa.text("SELECT 1")).scalar())
    with pytest.raises(rdb.CircuitOpenError) as info:  # third failure opens, loop ends at once
        Session.run(lambda s: s.execute(sa.text("SELECT 1")).scalar())
    assert info.value.service == service
    assert rdb.health()["services"][service]["breaker"]["state"] == "open"
    assert rdb.health()["healthy"] is False

    fault_proxy.restore()
    accepted = fault_proxy.connections_accepted
    with pytest.raises(rdb.CircuitOpenError) as info:
        Session.run(lambda s: s.execute(sa.text("SELECT 1")).scalar())
    assert info.value.retry_after == pytest.approx(10.0)
    assert fault_proxy.connections_accepted == accepted  # rejected without touching the network

    clock.now += 10.0  # reset timeout over: one probe goes through, succeeds, closes the circuit
    assert Session.run(lambda s: s.execute(sa.text("SELECT 2")).scalar()) == 2
    assert rdb.health()["services"][service]["breaker"]["state"] == "closed"
    assert fault_proxy.connections_accepted > accepted
    engine.dispose()


@pytest.mark.slow
@pytest.mark.server_control
def test_server_restart_mid_workload_recovers(
    pg_server: Any, engine: sa.Engine, service: str
) -> None:
    rdb.set_testing(False)  # real (small) backoff while the server is down
    # The breaker would open during the outage and fail units fast (its own test is above):
    # here the retry loop alone rides out the restart.
    Session = factory(
        engine, service, initial_delay=0.05, max_delay=0.5, max_retries=40, circuit_breaker=False
    )
    done: list[int] = []

    def unit(session: Session, n: int) -> None:
        session.add(Item(name=f"w-{n}"))

    restarter: threading.Thread | None = None
    for n in range(60):
        if n == 10:
            restarter = pg_server.restart_after(0.5, crash=True)
        Session.run(unit, n)
        done.append(n)
    assert restarter is not None
    restarter.join(timeout=30)
    assert len(done) == 60
    # Durability across the crash is not the point (the test server runs with fsync off); no
    # unit may be written twice, and every unit after the restart is there.
    with engine.connect() as conn:
        names = list(conn.execute(sa.select(Item.name)).scalars())
    assert len(names) == len(set(names))
    assert {f"w-{n}" for n in range(20, 60)} <= set(names)


# -- COMMIT whose answer is lost ------------------------------------------------------------------
def test_commit_answer_lost_is_verified_and_never_written_twice(
    pg_database: str, fault_proxy: Any, service: str, pg_url: str
) -> None:
    engine = sa.create_engine(fault_proxy.url(pg_database))
    Base.metadata.create_all(engine)
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    calls: list[int] = []

    def unit(session: Session) -> str:
        calls.append(1)
        session.add(Item(name="once"))
        return "committed"

    fault_proxy.lose_commit_answer()
    assert Session.run(unit) == "committed"
    assert fault_proxy.commits_lost == 1
    assert calls == [1]
    direct = sa.create_engine(pg_url)
    assert count_items(direct, "once") == 1
    assert rdb.health()["services"][service]["counters"]["verified_commits"] == 1
    direct.dispose()
    engine.dispose()


def test_a_verified_commit_fires_no_rollback_event_and_leaves_a_run_in_callers_objects(
    pg_database: str, fault_proxy: Any, service: str, pg_url: str
) -> None:
    """A unit whose lost COMMIT answer was proved committed: the session's failed transaction
    was ended with a rollback, which told the application's ``after_rollback`` listeners of
    work that is committed (its ``after_commit`` listeners were never told), and let go of a
    ``run_in`` caller's objects (a later change of theirs, committed by the caller, wrote
    nothing)."""
    engine = sa.create_engine(fault_proxy.url(pg_database))
    Base.metadata.create_all(engine)
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    rollbacks: list[str] = []
    commits: list[str] = []
    sa.event.listen(Session, "after_rollback", lambda session: rollbacks.append("rollback"))
    sa.event.listen(
        Session, "after_commit", lambda session: commits.append(session.info.get("unit", "?"))
    )
    Session.run(lambda session: session.add(Item(name="kept")))
    assert commits == ["?"]

    def verified(session: Session) -> None:
        session.info["unit"] = "verified"  # what an outbox's listener would look at
        session.add(Item(name="verified"))

    fault_proxy.lose_commit_answer()
    Session.run(verified)
    assert fault_proxy.commits_lost == 1
    assert rollbacks == []
    # committed: its after_commit listeners are told, once (an outbox, a cache invalidation)
    assert commits == ["?", "verified"]

    with Session() as session:
        item = session.execute(sa.select(Item).where(Item.name == "kept")).scalar_one()
        session.rollback()  # run_in wants a session out of a transaction

        def rename(unit_session: Session) -> None:
            unit_session.get(Item, item.id).name = "renamed"  # type: ignore[union-attr]

        fault_proxy.lose_commit_answer()
        Session.run_in(session, rename)
        assert fault_proxy.commits_lost == 2
        assert item in session
        session.rollback()  # after a failed COMMIT, as SQLAlchemy asks
        item.name = "changed by the caller"
        session.commit()
    assert count_items(engine, "changed by the caller") == 1
    engine.dispose()


def test_a_pooled_connection_made_before_the_factory_and_dead_is_replaced_at_checkout(
    engine: sa.Engine, pg_server: Any, service: str
) -> None:
    """A connection the checkout sees for the first time is left unchecked only when the
    factory's hooks saw it made: one made before the factory (or while self-healing was off)
    is checked, and a dead one replaced, as before."""
    pooled = sa.create_engine(engine.url, pool_size=1, max_overflow=0)
    try:
        with pooled.connect() as conn:  # made before any resilient factory on this engine
            conn.execute(sa.text("SELECT 1"))
        Session = factory(pooled, service)
        assert pg_server.terminate_backends(database=engine.url.database) >= 1
        with Session() as session:
            assert session.execute(sa.text("SELECT 2")).scalar_one() == 2
    finally:
        pooled.dispose()


WRITE_PATHS = {
    "text": lambda s: s.execute(sa.text("INSERT INTO items (id, name) VALUES (1, 'w')")),
    "core-insert": lambda s: s.execute(sa.insert(Item).values(id=1, name="w")),
    "scalar-returning": lambda s: s.scalar(
        sa.insert(Item).values(id=1, name="w").returning(Item.id)
    ),
    "raw-connection": lambda s: s.connection().execute(sa.insert(Item).values(id=1, name="w")),
    "bulk-mappings": lambda s: s.bulk_insert_mappings(Item, [{"id": 1, "name": "w"}]),
    "orm-bulk-update": lambda s: s.execute(sa.update(Item).where(Item.id == 0).values(name="w")),
}


@pytest.mark.parametrize("path", sorted(WRITE_PATHS))
def test_every_write_path_is_verified_after_a_lost_commit_answer(
    pg_database: str, fault_proxy: Any, service: str, pg_url: str, path: str
) -> None:
    engine = sa.create_engine(fault_proxy.url(pg_database))
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(Item).values(id=0, name="seed"))
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        WRITE_PATHS[path](session)

    fault_proxy.lose_commit_answer()
    Session.run(unit)
    assert fault_proxy.commits_lost == 1
    assert calls == [1]  # verified committed on the server: not replayed
    assert rdb.health()["services"][service]["counters"]["verified_commits"] == 1
    direct = sa.create_engine(pg_url)
    assert count_items(direct, "w") == 1
    direct.dispose()
    engine.dispose()


def test_commit_answer_lost_and_unverifiable_raises_commit_outcome_unknown(
    pg_database: str, fault_proxy: Any, service: str, pg_url: str
) -> None:
    engine = sa.create_engine(fault_proxy.url(pg_database), connect_args={"connect_timeout": 2})
    Base.metadata.create_all(engine)
    refused: list[float] = []

    def sleep(seconds: float) -> None:  # keep the proxy refusing while verification retries
        refused.append(seconds)

    Session = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(circuit_breaker=False), sleep=sleep
    )
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        session.add(Item(name="maybe"))
        session.flush()
        fault_proxy.lose_commit_answer()
        # The open connection stays; nobody can connect again to ask what became of the COMMIT.
        fault_proxy.refuse()

    with pytest.raises(rdb.CommitOutcomeUnknownError) as info:
        Session.run(unit)
    assert calls == [1]  # never replayed
    assert info.value.xid is not None
    assert "not replayed" in str(info.value)
    fault_proxy.restore()
    direct = sa.create_engine(pg_url)
    assert count_items(direct, "maybe") == 1  # the server did commit; nothing was written twice
    direct.dispose()
    engine.dispose()


def test_read_only_unit_with_lost_commit_answer_is_simply_replayed(
    pg_database: str, fault_proxy: Any, service: str
) -> None:
    engine = sa.create_engine(fault_proxy.url(pg_database))
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    calls: list[int] = []

    def unit(session: Session) -> int:
        calls.append(1)
        return int(session.execute(sa.text("SELECT 41 + 1")).scalar_one())

    fault_proxy.lose_commit_answer()
    assert Session.run(unit) == 42
    assert calls == [1, 1]
    engine.dispose()


# -- drop-in use ---------------------------------------------------------------------------------
def test_drop_in_sessions_behave_like_sessionmaker(engine: sa.Engine, service: str) -> None:
    Sessions = factory(engine, service)
    with Sessions.begin() as session:
        session.add(Item(name="dropin"))
    with Sessions() as session:
        assert session.scalars(sa.select(Item.name)).all() == ["dropin"]
        assert isinstance(session, Session)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libc poll checked on Linux")
def test_the_dead_connection_check_polls_without_releasing_the_gil(
    engine: sa.Engine, pg_server: Any
) -> None:
    """The checkout's check is libc's poll called through ctypes.PyDLL (the GIL held: a
    released GIL is a thread switch per checkout under load), not a fallback: live socket
    quiet, a terminated backend's socket readable."""
    assert _unit._poll is not None
    with engine.connect() as conn:
        raw: Any = conn.connection.driver_connection
        cache: dict[str, Any] = {}
        assert _unit._readable(raw.pgconn.socket, cache) is False
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        pg_server.execute(f"SELECT pg_terminate_backend({int(pid)})")
        for _ in range(500):  # the server's goodbye arrives (a condition, not a backoff)
            if _unit._readable(raw.pgconn.socket, cache):
                break
            time.sleep(0.01)
        assert _unit._readable(raw.pgconn.socket, cache) is True
        conn.invalidate()


def test_drop_in_use_survives_a_dead_pooled_connection(
    engine: sa.Engine, pg_server: Any, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    Session = factory(engine, service)
    with Session() as session:
        pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    assert pg_server.terminate_backends(database=engine.url.database) >= 1
    with caplog.at_level(logging.INFO, logger="resilient_db"), Session() as session:
        new_pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    assert new_pid != pid
    assert "[SELF-HEAL] Discarded a dead pooled connection" in caplog.text


def test_dead_pooled_connections_are_said_once_every_few_seconds_and_each_counted(
    engine: sa.Engine, pg_server: Any, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A restart or a failover leaves every pooled connection dead: one line each was a log
    storm on a large pool. One line per engine every few seconds, saying how many more; the
    counter and the hooks see each."""
    events: list[tuple[str, int]] = []

    def hook(event: rdb.SelfHealEvent) -> None:
        if event.service == service and event.name == "dead_pooled_connection":
            events.append((event.name, event.fields["suppressed"]))

    rdb.add_hook(hook)
    try:
        Session = rdb.ResilientSession(engine, service=service)
        held = [engine.connect() for _ in range(3)]  # three pooled connections
        for conn in held:
            conn.exec_driver_sql("SELECT 1")
        for conn in held:
            conn.close()
        with caplog.at_level(logging.INFO, logger="resilient_db"):
            for _ in range(2):  # the second time in a new period: its line says how many more
                assert pg_server.terminate_backends(database=engine.url.database) >= 3
                sessions = [Session() for _ in range(3)]
                for session in sessions:  # each checks a connection out: all three found dead
                    session.execute(sa.text("SELECT 1"))
                for session in sessions:
                    session.close()
                STATE.engine_hooks[engine]._pool_lines.restart(_unit._DEAD_LINES)
    finally:
        rdb.remove_hook(hook)
    lines = [r for r in caplog.records if "dead pooled connection" in r.getMessage()]
    assert len(lines) == 2
    assert lines[0].getMessage().endswith(f"at checkout: service={service}")  # folds none
    assert lines[1].getMessage().endswith("(2 more since the last line)")
    # the events say it as the other rate-limited ones do (0 for those left unlogged)
    assert events == [("dead_pooled_connection", n) for n in (0, 0, 0, 2, 0, 0)]
    assert [line.self_heal["suppressed"] for line in lines] == [0, 2]  # type: ignore[attr-defined]
    assert rdb.health()["services"][service]["counters"]["dead_pooled_connections"] == 6


def test_a_unit_that_committed_part_of_its_work_survives_a_dead_pooled_connection(
    engine: sa.Engine, pg_server: Any, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A unit commits part of its work itself, the server ends the connection it gave back to
    the pool moments ago, and the unit goes on: the checkout finds the connection dead and the
    pool replaces it before anything is sent. A checkout that took a connection used moments
    ago for alive (to save the poll's system call) would have the unit's next statement fail
    on it, in an attempt that can no longer be replayed: half its work saved, an error raised."""
    table = f"part_{service.replace('-', '_')}"
    pg_server.execute(f"CREATE TABLE {table} (v text)", database=engine.url.database)
    pooled = sa.create_engine(engine.url, pool_size=1, max_overflow=0)
    Session = factory(pooled, service)

    def unit(session: Session) -> None:
        session.execute(sa.text(f"INSERT INTO {table} VALUES ('a')"))
        session.commit()  # part of its work, committed by its own code
        pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        session.commit()  # (the connection back in the pool)
        pg_server.execute(f"SELECT pg_terminate_backend({int(pid)}, 5000)")
        session.execute(sa.text(f"INSERT INTO {table} VALUES ('b')"))

    try:
        with caplog.at_level(logging.INFO, logger="resilient_db"):
            Session.run(unit)
        assert "[SELF-HEAL] Discarded a dead pooled connection" in caplog.text
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(f"SELECT v FROM {table} ORDER BY v").scalars().all()
        assert rows == ["a", "b"]
    finally:
        pooled.dispose()


def test_a_dead_pooled_connection_then_a_new_one_ended_at_once_is_replayed(
    engine: sa.Engine, pg_server: Any, service: str
) -> None:
    """The pooled connection is dead, and so is the new one the pool makes for it (the server
    terminating every backend, a kill storm). The pool retries a checkout once: the checkout
    check, which refused the new one too, made SQLAlchemy raise "This connection is closed",
    which no classifier takes for a disconnect, so the unit failed at once. A connection the
    check sees for the first time is not checked (as SQLAlchemy's pre-ping): it fails its
    first statement with a disconnect, and the unit is run again."""
    pooled = sa.create_engine(engine.url, pool_size=1, max_overflow=0)
    Session = factory(pooled, service)
    ends_at_once = [1]

    @sa.event.listens_for(pooled, "connect")
    def terminated_on_connect(dbapi_connection: Any, record: Any) -> None:
        if ends_at_once:
            ends_at_once.pop()
            pid = int(dbapi_connection.info.backend_pid)
            pg_server.execute(f"SELECT pg_terminate_backend({pid}, 5000)")

    def backend(session: Session) -> int:
        return int(session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())

    try:
        ends_at_once.clear()
        first = Session.run(backend)
        ends_at_once.append(1)
        assert pg_server.terminate_backends(database=engine.url.database) >= 1
        assert Session.run(backend) != first
        assert not ends_at_once  # the new connection was ended, and the unit ran again
        assert rdb.health()["services"][service]["counters"]["retries"] == 1
    finally:
        pooled.dispose()


_PSYCOPG_BACKLOG = tuple(int(n) for n in psycopg.__version__.split(".")[:2]) >= (3, 3)


@pytest.mark.parametrize(
    "via",
    [
        "handler",
        pytest.param(
            "notifies",
            marks=pytest.mark.skipif(
                not _PSYCOPG_BACKLOG,
                reason="psycopg before 3.3 drops a notification that came while no notifies() "
                "ran (plain SQLAlchemy's too): only notify handlers get it",
            ),
        ),
    ],
)
def test_a_pooled_connection_with_notifications_waiting_is_kept_and_they_are_delivered(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture, via: str
) -> None:
    """A connection LISTENing sits in the pool when a NOTIFY comes: its socket polls readable,
    which the checkout took for a server that had left. The connection was discarded, its
    LISTEN and the notification with it; plain SQLAlchemy hands both over at the next use, to
    the connection's notify handlers or (none added) to ``notifies()``."""
    pooled = sa.create_engine(engine.url, pool_size=1, max_overflow=0)
    Session = factory(pooled, service)
    handled: list[str] = []
    try:
        with Session() as session:
            conn = session.connection()
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            conn.exec_driver_sql("LISTEN rdb_jobs")
            listening: Any = conn.connection.driver_connection
            if via == "handler":
                listening.add_notify_handler(lambda n: handled.append(n.payload))
            fd = listening.pgconn.socket
            session.commit()
        with engine.begin() as other:
            other.exec_driver_sql("NOTIFY rdb_jobs, 'job-1'")
        assert select.select([fd], [], [], 10)[0], "the notification never arrived"
        with caplog.at_level(logging.INFO, logger="resilient_db"), Session() as session:
            conn = session.connection()
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() == pid
            if via == "notifies":
                driver: Any = conn.connection.driver_connection
                handled = [n.payload for n in driver.notifies(timeout=2, stop_after=1)]
        assert handled == ["job-1"]
        assert "Discarded a dead pooled connection" not in caplog.text
    finally:
        pooled.dispose()


def test_drop_in_connect_failure_is_retried_before_anything_is_sent(
    pg_database: str, fault_proxy: Any, service: str
) -> None:
    engine = sa.create_engine(fault_proxy.url(pg_database))
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        fault_proxy.restore()  # the server "comes back" during the first backoff

    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config(), sleep=sleep)
    fault_proxy.refuse()
    with Session() as session:
        assert session.execute(sa.text("SELECT 7")).scalar_one() == 7
    assert len(slept) == 1
    engine.dispose()


def test_drop_in_connect_after_a_dead_pooled_connection_is_retried(
    pg_database: str, fault_proxy: Any, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A restart leaves the pool holding dead connections while the server still refuses: the
    dead pooled connection is discarded at checkout, and the connect that replaces it is the
    drop-in session's first connect, retried as on an empty pool. (It was raised at once: the
    session's connect was taken as made before the dead connection was found.)"""
    engine = sa.create_engine(fault_proxy.url(pg_database), pool_size=1, max_overflow=0)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        fault_proxy.restore()  # the server "comes back" during the first backoff

    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config(), sleep=sleep)
    try:
        with Session() as session:
            assert session.execute(sa.text("SELECT 1")).scalar_one() == 1  # pooled now
        fault_proxy.refuse()
        assert fault_proxy.cut_all() >= 1  # the pooled connection is dead
        with caplog.at_level(logging.INFO, logger="resilient_db"), Session() as session:
            assert session.execute(sa.text("SELECT 7")).scalar_one() == 7
        assert "[SELF-HEAL] Discarded a dead pooled connection" in caplog.text
        assert len(slept) == 1
    finally:
        engine.dispose()


def test_a_session_that_never_connected_leaves_no_connect_retry_behind(
    pg_database: str, fault_proxy: Any, service: str
) -> None:
    """The connect retry belongs to the drop-in session waiting for its connection: once that
    transaction has ended without connecting, a plain connect in the same thread is not
    retried under the factory's policy (it fails at once, as plain SQLAlchemy's does)."""
    engine = sa.create_engine(fault_proxy.url(pg_database))
    slept: list[float] = []
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config(), sleep=slept.append)
    with Session() as session:
        session.begin()  # a transaction, never connected
    fault_proxy.refuse()
    with pytest.raises(sa_exc.OperationalError), engine.connect():
        pass
    assert slept == []
    fault_proxy.restore()
    with Session() as session:  # and a drop-in session still gets its retry
        fault_proxy.refuse()
        slept_before = len(slept)

        def come_back(seconds: float) -> None:
            slept.append(seconds)
            fault_proxy.restore()

        Session.policy.sleep = come_back
        assert session.execute(sa.text("SELECT 7")).scalar_one() == 7
        assert len(slept) == slept_before + 1
    engine.dispose()


def test_drop_in_failure_after_the_transaction_sent_something_is_raised(
    engine: sa.Engine, pg_server: Any, service: str
) -> None:
    Session = factory(engine, service)
    with Session() as session:
        session.add(Item(name="lost"))
        session.flush()
        pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        pg_server.execute(f"SELECT pg_terminate_backend({int(pid)})")
        with pytest.raises(sa_exc.OperationalError) as info:
            session.execute(sa.text("SELECT 1"))
        assert rdb.is_transient(info.value)
        assert info.value.connection_invalidated
        session.rollback()
        assert session.execute(sa.text("SELECT 1")).scalar_one() == 1  # usable again
    assert count_items(engine, "lost") == 0


# -- switches and logs ---------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["false", "0", "no", "OFF"])
def test_disabled_is_exact_plain_sqlalchemy(engine: sa.Engine, service: str, spelling: str) -> None:
    config = rdb.load_config({"SELF_HEALING_ENABLED": spelling})
    Session = rdb.ResilientSession(engine, service=service, config=config)
    plain = sessionmaker(engine)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        raise_code(session, "40001")

    with pytest.raises(sa_exc.OperationalError) as ours:
        Session.run(unit)
    with plain.begin() as session, pytest.raises(sa_exc.OperationalError) as theirs:
        unit(session)
    assert calls == [1, 1]
    assert type(ours.value) is type(theirs.value)
    assert type(ours.value.orig) is type(theirs.value.orig)
    assert str(ours.value.orig) == str(theirs.value.orig)
    with Session.begin() as session:
        session.add(Item(name="plain"))

    def duplicate(session: Session) -> None:  # fails at the unit's end: its flush
        session.add(Item(name="plain"))

    with pytest.raises(sa_exc.IntegrityError) as ours_at_the_end:
        Session.run(duplicate)
    with plain() as session:
        duplicate(session)
        with pytest.raises(sa_exc.IntegrityError) as theirs_at_the_end:
            session.commit()
    assert type(ours_at_the_end.value.orig) is type(theirs_at_the_end.value.orig)
    with Session() as s1, plain() as s2:
        q = sa.select(Item.id, Item.name)
        assert s1.execute(q).all() == s2.execute(q).all()
    assert service not in rdb.health()["services"] or (
        rdb.health()["services"][service]["breaker"]["state"] == "off"
    )


@pytest.mark.parametrize("spelling", ["false", "0", "no", "off"])
def test_retry_switch_off_raises_transient_errors_at_once_and_breaker_still_counts(
    engine: sa.Engine, service: str, spelling: str
) -> None:
    config = rdb.load_config(
        {"SELF_HEALING_RETRY": spelling, "SELF_HEALING_FAILURE_THRESHOLD": "2"}
    )
    Session = rdb.ResilientSession(engine, service=service, config=config)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        raise_code(session, "57P03")

    for _ in range(2):
        with pytest.raises(sa_exc.OperationalError):
            Session.run(unit)
    assert calls == [1, 1]
    with pytest.raises(rdb.CircuitOpenError):
        Session.run(unit)
    assert calls == [1, 1]


def test_breaker_switch_off_leaves_retry_on(engine: sa.Engine, service: str) -> None:
    Session = factory(engine, service, circuit_breaker=False, failure_threshold=1)
    seen: list[int] = []

    def unit(session: Session) -> None:
        seen.append(1)
        if len(seen) < 3:
            raise_code(session, "57P03")

    Session.run(unit)
    assert len(seen) == 3
    assert rdb.health()["services"][service]["breaker"]["state"] == "off"


def test_logging_switch_off_is_silent(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    Session = factory(engine, service, logging=False)
    seen: list[int] = []

    def unit(session: Session) -> None:
        seen.append(1)
        if len(seen) == 1:
            raise_code(session, "40001")

    with caplog.at_level(logging.DEBUG, logger="resilient_db"):
        Session.run(unit)
    assert len(seen) == 2
    assert "[SELF-HEAL]" not in caplog.text


def test_log_level_filters_self_healing_messages(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    Session = factory(engine, service, log_level="error")
    seen: list[int] = []

    def unit(session: Session) -> None:
        seen.append(1)
        if len(seen) == 1:
            raise_code(session, "40001")

    with caplog.at_level(logging.DEBUG, logger="resilient_db"):
        Session.run(unit)
    assert "Retry attempt" not in caplog.text  # a warning, below the configured level


def test_logs_carry_the_prefix_and_no_secrets(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    # the server's own password (a wrong one is refused at connect: nothing retried to log);
    # a server that trusts gets one as bait
    url = engine.url if engine.url.password else engine.url.set(password="s3cret-pw")
    engine = sa.create_engine(url)
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config(max_retries=1))

    def unit(session: Session) -> None:
        session.execute(
            sa.text("SELECT raise_code(:c) WHERE CAST(:secret AS text) <> ''"),
            {"c": "40001", "secret": "hunter2-param"},
        )

    with caplog.at_level(logging.DEBUG, logger="resilient_db"), pytest.raises(sa_exc.DBAPIError):
        Session.run(unit)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("resilient_db")]
    assert any(m.startswith("[SELF-HEAL] Retry attempt 1/1") for m in messages), messages
    assert any(m.startswith("[SELF-HEAL] Gave up") for m in messages)
    text = "\n".join(messages) + repr([r.__dict__ for r in caplog.records])
    for secret in (str(url.password), "hunter2-param", str(url.port)):
        assert secret not in text
    engine.dispose()


def test_with_self_healing_does_not_replay_an_operation_that_committed(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An operation of two transactions whose second fails after the first committed: a replay
    would commit the first again. Seen on an engine a resilient factory marks."""
    factory(engine, service)
    calls: list[int] = []

    def handler() -> None:
        calls.append(1)
        with Session(engine) as session, session.begin():
            session.add(Item(name="first-transaction"))
        with Session(engine) as session, session.begin():
            session.add(Item(name="second-transaction"))
            session.flush()
            raise_code(session, "40P01")

    with (
        caplog.at_level(logging.WARNING, logger="resilient_db"),
        pytest.raises(sa_exc.OperationalError),
    ):
        rdb.with_self_healing(handler, service=service, config=rdb.Config())
    assert calls == [1]
    assert count_items(engine, "first-transaction") == 1
    assert count_items(engine, "second-transaction") == 0
    assert any("Not replaying" in r.getMessage() for r in caplog.records)


def test_with_self_healing_wraps_any_callable(engine: sa.Engine, service: str) -> None:
    calls: list[int] = []

    def handler() -> int:
        calls.append(1)
        with Session(engine) as session, session.begin():
            if len(calls) == 1:
                raise_code(session, "40P01")
            session.add(Item(name="wrapped"))
        return len(calls)

    assert rdb.with_self_healing(handler, service=service, config=rdb.Config()) == 2
    assert count_items(engine, "wrapped") == 1
    calls.clear()
    with pytest.raises(sa_exc.OperationalError):
        rdb.with_self_healing(handler, service=service, use_retry=False, config=rdb.Config())
    assert calls == [1]


# -- what run() refuses ---------------------------------------------------------------------------
def test_run_refuses_what_is_not_a_sync_unit_before_sending_anything(
    engine: sa.Engine, service: str
) -> None:
    """Something that is not a function, or an async function, is named in the error, and no
    connection is taken for it."""
    Session = factory(engine, service)

    async def async_unit(session: Any) -> None:
        pass

    checked_out = engine.pool.checkedout()
    with pytest.raises(TypeError, match=r"^ResilientSession\.run needs a function taking the "):
        Session.run(42)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"async_unit is a coroutine function; use Async"):
        Session.run(async_unit)
    with pytest.raises(TypeError, match=r"coroutine function; use AsyncResilientSession\.trans"):
        Session.transactional(async_unit)
    with (
        Session() as session,
        pytest.raises(TypeError, match=r"^ResilientSession\.run_in needs a function taking "),
    ):
        Session.run_in(session, "select 1")  # type: ignore[call-overload]
    assert engine.pool.checkedout() == checked_out
    assert rdb.health()["services"][service]["counters"]["attempts"] == 0


def test_transactional_with_parentheses_and_no_validator_is_the_plain_decorator(
    engine: sa.Engine, service: str
) -> None:
    """``@Session.transactional()`` (parentheses, no ``validate=``) decorates as
    ``@Session.transactional`` does: the function runs as a unit, its change committed."""
    Session = factory(engine, service)

    @Session.transactional()
    def add(session: Any, name: str) -> str:
        session.add(Item(name=name))
        return name

    assert add("with parentheses") == "with parentheses"
    assert count_items(engine, "with parentheses") == 1
    assert rdb.health()["services"][service]["counters"]["attempts"] == 1


def test_run_in_inside_a_unit_runs_once_and_the_outer_unit_retries_whole(
    engine: sa.Engine, service: str
) -> None:
    """``run_in`` called inside a unit of the same factory (a helper given a session of its
    own) does not retry by itself: a transaction can't be retried from its middle. Its
    transient error (a serialization failure, from the server) reaches the outer unit, which
    is retried whole; the inner unit's change is committed once, by its second run."""
    Session = factory(engine, service)
    calls = {"outer": 0, "inner": 0}

    def inner(session: Any, name: str) -> str:
        calls["inner"] += 1
        if calls["inner"] == 1:
            session.execute(sa.text("SELECT raise_code('40001')"))
        session.add(Item(name=name))
        return name

    def outer(session: Any) -> str:
        calls["outer"] += 1
        session.execute(sa.text("SELECT 1"))
        with Session() as own:
            return Session.run_in(own, inner, "nested run_in")

    assert Session.run(outer) == "nested run_in"
    assert calls == {"outer": 2, "inner": 2}
    assert count_items(engine, "nested run_in") == 1
    counters = rdb.health()["services"][service]["counters"]
    assert (counters["attempts"], counters["retries"]) == (2, 1)


def test_transactional_refuses_a_method_which_would_get_the_session_as_self(
    engine: sa.Engine, service: str
) -> None:
    """Decorated in its class, a method was called with the session as ``self`` and the
    instance as the session, silently."""
    Session = factory(engine, service)
    with pytest.raises(TypeError, match=r"Repo\.get takes 'self' first, but transactional "):

        class Repo:
            @Session.transactional
            def get(self, session: Any, n: int) -> int:
                return n

    with pytest.raises(TypeError, match=r"takes 'cls' first"):
        Session.transactional(lambda cls, session: None)

    @Session.transactional
    def get(session: Any, n: int) -> int:  # a function: the session first
        return int(session.execute(sa.text(f"SELECT {n}")).scalar_one())

    assert get(3) == 3


@pytest.mark.parametrize(
    "name",
    ["", os.fsdecode(b"caf\xe9"), "a\udcff", "tab\there", "line\u2028", "nel\x85", "x" * 201],
)
def test_a_service_name_that_is_not_utf8_text_is_refused_at_once(
    engine: sa.Engine, name: str
) -> None:
    """A name with a lone surrogate (what ``os.environ`` gives for a byte that is not UTF-8)
    was accepted, then failed in the shared breaker's link to Redis, taking it down for every
    service; it can't be a metrics label or a Redis key either. One with a control character
    or of more than 200 characters was accepted and had two labels: escaped or cut in log
    lines, hook events and OTel's event counters, as given in health(), Prometheus and OTel's
    attempts (a retry ratio by service could not be joined)."""
    with pytest.raises(ValueError, match="service"):
        rdb.ResilientSession(engine, service=name)
    with pytest.raises(ValueError, match="service"):
        rdb.AsyncResilientSession(
            create_async_engine("postgresql+asyncpg://u@127.0.0.1/d"), service=name
        )
    with pytest.raises((TypeError, ValueError), match="service"):
        rdb.with_self_healing(service=name)
    assert rdb.ResilientSession(engine, service="café: orders 1").service == "café: orders 1"
    assert rdb.ResilientSession(engine, service="y" * 200).service == "y" * 200


@pytest.mark.parametrize("name", [" ", "   ", "\u00a0", "orders ", " orders", "\u3000orders"])
def test_a_blank_service_name_or_one_with_spaces_at_its_ends_is_refused_at_once(
    engine: sa.Engine, name: str
) -> None:
    """A name of spaces only was taken: its log lines said ``service=  disconnect``, naming
    nothing. One with a space at an end (``"orders "``, read from a variable set with a
    stray space) was taken as a service of its own: a second breaker, counters and Redis key
    for the same database, its log lines looking like the other's."""
    with pytest.raises(ValueError, match=r"service name .* (is blank|begins or ends with)"):
        rdb.ResilientSession(engine, service=name)
    with pytest.raises(ValueError, match=r"service name .* (is blank|begins or ends with)"):
        rdb.AsyncResilientSession(
            create_async_engine("postgresql+asyncpg://u@127.0.0.1/d"), service=name
        )
    with pytest.raises(ValueError, match=r"service name .* (is blank|begins or ends with)"):
        rdb.with_self_healing(service=name)
    assert name not in STATE.breakers
    assert rdb.ResilientSession(engine, service="orders db").service == "orders db"
