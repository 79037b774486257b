"""A unit's ``before_commit`` listeners see its changes, as under plain SQLAlchemy, whose
``commit()`` calls them before it flushes: the outbox idiom (collect ``session.new`` in
``before_commit``, publish in ``after_commit``) and stamping pending rows work in units. Before,
a unit flushed first, so they saw a clean session. A failure of the flush that ``commit()``
then does is still a failure before any COMMIT: a deadlock there is replayed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from processes import wait_for
from scenarios import in_no_transaction
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

import resilient_db as rdb

pytestmark = pytest.mark.usefixtures("no_backoff")


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "bc_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str] = mapped_column(default="")


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    rdb.install_commit_markers(eng)
    yield eng
    eng.dispose()


def outbox(target: Any, published: list[int]) -> None:
    """Collect the new orders in ``before_commit`` (and stamp them), publish in
    ``after_commit``."""

    def collect(session: Session) -> None:
        for order in session.new:
            if isinstance(order, Order):
                order.note = "stamped"
                session.info.setdefault("outbox", []).append(order.id)

    def publish(session: Session) -> None:
        published.extend(session.info.pop("outbox", []))

    event.listen(target, "before_commit", collect)
    event.listen(target, "after_commit", publish)


def waits_for_a_lock(engine: sa.Engine, pid: int) -> bool:
    """Whether backend ``pid`` waits for a lock (a row another transaction holds)."""
    with engine.connect() as conn:
        waiting = conn.execute(
            sa.text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
        ).scalar_one_or_none()
    return waiting == "Lock"


def notes(engine: sa.Engine) -> dict[int, str]:
    with engine.connect() as conn:
        return {row.id: row.note for row in conn.execute(sa.select(Order.id, Order.note))}


@pytest.mark.parametrize("enabled", [True, False])
def test_before_commit_listeners_of_a_unit_see_its_changes(
    engine: sa.Engine, service: str, enabled: bool
) -> None:
    Orders = rdb.ResilientSession(engine, service=service, config=rdb.Config(enabled=enabled))
    published: list[int] = []
    outbox(Orders, published)

    Orders.run(lambda s: s.add(Order(id=1)))

    @Orders.transactional
    def place(session: Session, order_id: int) -> None:
        session.add(Order(id=order_id))

    place(2)
    with Orders.begin() as session:  # drop-in, as before
        session.add(Order(id=3))
    assert published == [1, 2, 3]
    assert notes(engine) == {1: "stamped", 2: "stamped", 3: "stamped"}


def test_a_session_classs_own_commit_sees_the_units_changes(
    engine: sa.Engine, service: str
) -> None:
    seen: list[int] = []

    class Auditing(Session):
        def commit(self) -> None:
            seen.extend(o.id for o in self.new if isinstance(o, Order))
            super().commit()

    Orders = rdb.ResilientSession(engine, service=service, class_=Auditing)
    Orders.run(lambda s: s.add(Order(id=7)))
    assert seen == [7]
    assert notes(engine) == {7: ""}


def test_a_deadlock_in_the_flush_after_the_before_commit_listeners_is_replayed(
    engine: sa.Engine, service: str
) -> None:
    """The flush ``commit()`` does after the listeners meets a real deadlock (the other
    transaction waits first; the unit's flush closes the cycle, with the shorter
    ``deadlock_timeout``: it is the victim): no COMMIT went out, so the unit is replayed, not
    settled as a COMMIT that failed. (The server checks a wait for a deadlock once, after its
    ``deadlock_timeout``: the unit waiting first, its check could pass before the other's
    wait closed the cycle, and the other would be the victim.) The replay waits for the other
    transaction to end before it takes row 10: the failed attempt's abort wakes the other,
    whose UPDATE of 10 has yet to run, and PostgreSQL gives that row to whichever asks first
    (the aborted updater's row is free, and the waiter's tuple lock stops only those that find
    a live one): a replay that ran first (the other's backend not yet on a CPU, under load)
    would hold 10 while the other, holding 11, waited for it, and its flush would be a second
    deadlock's victim (three attempts)."""
    with engine.begin() as conn:
        conn.execute(sa.insert(Order), [{"id": 10}, {"id": 11}])
    Orders = rdb.ResilientSession(engine, service=service)
    published: list[int] = []
    outbox(Orders, published)
    attempts: list[int] = []
    other_locked = threading.Event()
    mine_locked = threading.Event()
    other_pid: list[int] = []

    def other() -> None:
        with engine.begin() as conn:
            conn.execute(sa.text("SET LOCAL deadlock_timeout = '10s'"))  # the unit is the victim
            conn.execute(sa.update(Order).where(Order.id == 11).values(note="other"))
            other_pid.append(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
            other_locked.set()
            mine_locked.wait(10)
            conn.execute(sa.update(Order).where(Order.id == 10).values(note="other"))

    thread = threading.Thread(target=other)

    def unit(session: Session) -> None:
        attempts.append(1)
        if len(attempts) > 1:  # (the replay: the other's transaction ends first, see above)
            wait_for(lambda: in_no_transaction(engine, other_pid[0]), "the other's end", 20)
        session.execute(sa.text("SET LOCAL deadlock_timeout = '20ms'"))
        session.execute(sa.update(Order).where(Order.id == 10).values(note="mine"))
        order = session.get(Order, 11)
        assert order is not None
        order.note = "mine"  # flushed by commit(), after the listeners: waits for the other
        session.add(Order(id=12))
        if len(attempts) == 1:
            thread.start()
            other_locked.wait(10)
            mine_locked.set()
            # the flush (after this) closes the cycle: the other waits for row 10 first
            wait_for(lambda: waits_for_a_lock(engine, other_pid[0]), "the other's wait")

    Orders.run(unit)
    thread.join(10)
    assert len(attempts) == 2  # the unit was the deadlock's victim, in its flush: replayed
    assert published == [12]
    assert notes(engine) == {10: "mine", 11: "mine", 12: "stamped"}


@pytest.mark.asyncio
async def test_async_before_commit_listeners_of_a_unit_see_its_changes(
    engine: sa.Engine, pg_async_url: str, service: str
) -> None:
    class Listening(Session):
        pass

    published: list[int] = []
    outbox(Listening, published)
    async_engine = create_async_engine(pg_async_url)
    try:
        Orders = rdb.AsyncResilientSession(
            async_engine, service=service, sync_session_class=Listening
        )

        async def place(session: AsyncSession) -> None:
            session.add(Order(id=21))

        await Orders.run(place)
    finally:
        await async_engine.dispose()
    assert published == [21]
    assert notes(engine) == {21: "stamped"}


class Line(Base):
    __tablename__ = "bc_lines"
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(sa.ForeignKey("bc_orders.id"))
    order: Mapped[Order] = relationship()  # (its order is inserted first)


FAIL_FIRST_LINE = (
    "CREATE SEQUENCE bc_seen",
    "CREATE FUNCTION bc_fail_first() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "IF nextval('bc_seen') = 1 THEN RAISE EXCEPTION 'deadlock' USING ERRCODE = '40P01'; "
    "END IF; RETURN NEW; END $$",
    "CREATE TRIGGER bc_fail_first BEFORE INSERT ON bc_lines FOR EACH ROW "
    "EXECUTE FUNCTION bc_fail_first()",
    "CREATE TABLE bc_audit (id serial PRIMARY KEY, order_id int NOT NULL)",
)


@pytest.mark.parametrize("listening", [False, True])
def test_a_flush_that_committed_a_side_write_before_it_failed_is_not_replayed(
    engine: sa.Engine, service: str, listening: bool
) -> None:
    """A flush-time listener (a mapper's ``after_insert``) commits an audit row through a
    drop-in session of the factory, then the same flush fails (40P01). The unit committed part
    of its work: raised, not replayed, one audit row; with a ``before_commit`` listener (whose
    flush comes inside ``commit()``) as without. Before, with one: the drop-in COMMIT was taken
    for the unit's own (the unit's commit request was already the context's), the unit was
    replayed and the audit row written twice."""
    with engine.begin() as conn:
        for statement in FAIL_FIRST_LINE:
            conn.execute(sa.text(statement))
    Orders = rdb.ResilientSession(engine, service=service)
    if listening:
        event.listen(Orders, "before_commit", lambda session: None)

    def audit(mapper: Any, connection: Any, order: Order) -> None:
        with Orders.begin() as session:  # committed on its own
            session.execute(sa.text("INSERT INTO bc_audit (order_id) VALUES (:o)"), {"o": order.id})

    event.listen(Order, "after_insert", audit)
    attempts: list[int] = []

    def unit(session: Session) -> None:
        attempts.append(1)
        session.add(Line(id=30, order=Order(id=30)))

    try:
        with pytest.raises(sa.exc.OperationalError):
            Orders.run(unit)
    finally:
        event.remove(Order, "after_insert", audit)
    assert attempts == [1]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM bc_audit")).scalar_one() == 1


def test_a_savepoint_in_a_before_commit_listener_ends_as_under_plain_sqlalchemy(
    engine: sa.Engine, service: str
) -> None:
    """A ``before_commit`` listener that writes in a savepoint of the unit's session (whose
    release fires ``before_commit`` too): the unit's flush and COMMIT step come after the
    listeners, once, and the result is plain SQLAlchemy's (``sessionmaker.begin()``)."""

    def audit(session: Session) -> None:
        if session.in_nested_transaction() or session.info.get("audited"):
            return
        session.info["audited"] = True
        with session.begin_nested():
            session.add(Order(id=session.info["audit_id"], note="audit"))

    results = []
    for make, first in ((sessionmaker, 40), (rdb.ResilientSession, 50)):
        factory = make(engine) if make is sessionmaker else make(engine, service=service)
        published: list[int] = []
        outbox(factory, published)
        event.listen(factory, "before_commit", audit)

        def unit(session: Session, first: int = first) -> None:
            session.info["audit_id"] = first + 1
            session.add(Order(id=first))

        if make is sessionmaker:
            with factory.begin() as session:
                unit(session)
        else:
            factory.run(unit)
        rows = notes(engine)
        results.append(
            (
                [o - first for o in published],
                {o - first: rows[o] for o in rows if first <= o <= first + 1},
            )
        )
    assert results[1] == results[0]
