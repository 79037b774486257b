"""A half-open probe that hangs (a statement waiting for a lock, a connect to a silent address)
holds its slot of the local breaker for at most the probe lease, ``max(reset timeout, 10 s)``,
as a shared breaker's probe holds its slot in Redis: then new probes are let through, and the
hung probe's end counts nowhere. Before, one hung probe refused every call of the service until
it ended (for a silent network, until the operating system gave up on its connection)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from processes import wait_for
from scenarios import FakeClock
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db._breaker import Breaker

pytestmark = pytest.mark.usefixtures("no_backoff")

LOCK_KEY = 734_211
CONFIG = rdb.Config(failure_threshold=1, max_retries=0, reset_timeout=30.0, half_open_probes=1)


def unavailable(session: Session) -> None:
    session.execute(sa.text("SELECT raise_code('57P03')"))  # cannot connect now: a failure


def healthy(session: Session) -> int:
    return int(session.execute(sa.text("SELECT 1")).scalar_one())


def state(service: str) -> str:
    return str(rdb.health()["services"][service]["breaker"]["state"])


@pytest.fixture
def lock_holder(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A connection holding the advisory lock the hung probe waits for."""
    with engine.connect() as holder:
        holder.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": LOCK_KEY})
        yield holder
        holder.execute(sa.text("SELECT pg_advisory_unlock_all()"))


def waiting_for_lock(engine: sa.Engine) -> int | None:
    """The backend waiting for the advisory lock, if one is."""
    with engine.connect() as conn:
        pid = conn.execute(
            sa.text(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND objid = :k"
            ),
            {"k": LOCK_KEY},
        ).scalar()
    return None if pid is None else int(pid)


def test_a_hung_probe_gives_up_its_slot_after_the_lease_and_its_end_counts_nowhere(
    engine: sa.Engine,
    service: str,
    lock_holder: sa.Connection,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    clock = FakeClock()
    Factory = rdb.ResilientSession(engine, service=service, config=CONFIG, wall_clock=clock)
    caplog.set_level(logging.INFO, logger="resilient_db")
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(unavailable)
    assert state(service) == "open"
    clock.advance(30.0)

    outcome: list[BaseException | None] = []

    def hung_probe() -> None:
        def wait_for_the_lock(session: Session) -> None:
            session.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": LOCK_KEY})

        try:
            Factory.run(wait_for_the_lock)
        except BaseException as error:  # (the test reads it)
            outcome.append(error)
        else:
            outcome.append(None)

    probe = threading.Thread(target=hung_probe)
    probe.start()
    try:
        wait_for(lambda: waiting_for_lock(engine) is not None, "the probe to wait for the lock")
        assert state(service) == "half-open"
        with pytest.raises(rdb.CircuitOpenError) as refused:
            Factory.run(healthy)  # its one slot is taken
        assert refused.value.state == "half-open"
        clock.advance(29.9)
        with pytest.raises(rdb.CircuitOpenError):
            Factory.run(healthy)  # within the lease
        assert not lines(caplog, "probe overdue")

        clock.advance(0.1)  # the lease, max(30 s, 10 s), is over: a new probe goes through
        assert Factory.run(healthy) == 1
        assert state(service) == "closed"
        (line,) = lines(caplog, "Circuit breaker probe overdue")
        assert line == (
            f"[SELF-HEAL] Circuit breaker probe overdue: service={service} its half-open "
            "probe(s) still running after 30.0 s; letting new probe(s) through (theirs will "
            "count nowhere)"
        )
        (overdue,) = [e for e in events if e.name == "breaker_probe_overdue"]
        assert overdue.service == service
        assert overdue.fields["running_for"] == pytest.approx(30.0)

        # the hung probe's connection is cut: a transient failure, which would open a
        # threshold-1 breaker, counts nowhere
        pid = waiting_for_lock(engine)
        assert pid is not None
        with engine.connect() as killer:
            killer.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    finally:
        probe.join(30)
    assert not probe.is_alive()
    (error,) = outcome
    assert isinstance(error, sa.exc.OperationalError), error
    assert state(service) == "closed"
    assert rdb.health()["services"][service]["breaker"]["failures"] == 0
    assert Factory.run(healthy) == 1


def test_a_probe_of_an_earlier_half_open_state_holds_no_slot_of_the_next(
    engine: sa.Engine, service: str, lock_holder: sa.Connection
) -> None:
    """Two probe slots: one probe fails (the breaker opens again) while the other hangs. In
    the next half-open state, the hung one's success is not that state's: it neither frees a
    slot of its probes nor counts toward closing."""
    clock = FakeClock()
    config = rdb.Config(failure_threshold=1, max_retries=0, reset_timeout=30.0, half_open_probes=2)
    Factory = rdb.ResilientSession(engine, service=service, config=config, wall_clock=clock)
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(unavailable)
    clock.advance(30.0)
    done: list[object] = []

    def hung_probe() -> None:
        def wait_for_the_lock(session: Session) -> int:
            session.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": LOCK_KEY})
            session.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
            return 1

        done.append(Factory.run(wait_for_the_lock))

    probe = threading.Thread(target=hung_probe)
    probe.start()
    try:
        wait_for(lambda: waiting_for_lock(engine) is not None, "the probe to wait for the lock")
        with pytest.raises(sa.exc.OperationalError):
            Factory.run(unavailable)  # the second probe fails: open again
        assert state(service) == "open"
        clock.advance(30.0)
        Probe = rdb.ResilientSession(engine, service=service, config=config, wall_clock=clock)
        assert Probe.run(healthy) == 1  # half-open again: one success of the two it needs
        assert state(service) == "half-open"
        # the hung probe ends, with success, in this half-open state it was not let through by
        lock_holder.execute(sa.text("SELECT pg_advisory_unlock_all()"))
        probe.join(30)
        assert done == [1]
        assert state(service) == "half-open"  # its success was not one of this state's
        assert Probe.run(healthy) == 1
        assert state(service) == "closed"
    finally:
        lock_holder.execute(sa.text("SELECT pg_advisory_unlock_all()"))
        probe.join(30)


def test_the_lease_runs_from_when_the_slots_were_taken_not_from_the_half_open_state(
    engine: sa.Engine, service: str, lock_holder: sa.Connection
) -> None:
    """Half-open for a while (one of two probes succeeded, then no call for a minute): the two
    probes that take the slots then have the whole lease, from when the first of them went
    through."""
    clock = FakeClock()
    config = rdb.Config(failure_threshold=1, max_retries=0, reset_timeout=30.0, half_open_probes=2)
    Factory = rdb.ResilientSession(engine, service=service, config=config, wall_clock=clock)
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(unavailable)
    clock.advance(30.0)
    assert Factory.run(healthy) == 1  # one success of the two that close it
    clock.advance(60.0)

    def wait_for_the_lock(session: Session) -> None:
        session.execute(sa.text("SELECT pg_advisory_lock_shared(:k)"), {"k": LOCK_KEY})

    probes = [threading.Thread(target=Factory.run, args=(wait_for_the_lock,)) for _ in range(2)]
    try:
        for n, probe in enumerate(probes, 1):
            probe.start()
            wait_for(lambda n=n: waiting(engine) == n, f"probe {n} to wait for the lock")
        clock.advance(29.9)
        with pytest.raises(rdb.CircuitOpenError):
            Factory.run(healthy)  # both slots held, within their lease
        clock.advance(0.1)
        assert Factory.run(healthy) == 1
        assert Factory.run(healthy) == 1
        assert state(service) == "closed"
    finally:
        lock_holder.execute(sa.text("SELECT pg_advisory_unlock_all()"))
        for probe in probes:
            probe.join(30)


def waiting(engine: sa.Engine) -> int:
    """How many backends wait for the advisory lock."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                    "AND objid = :k"
                ),
                {"k": LOCK_KEY},
            ).scalar_one()
        )


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.mark.asyncio
async def test_an_async_units_hung_probe_gives_up_its_slot_after_the_lease(
    engine: sa.Engine, pg_async_url: str, service: str, lock_holder: sa.Connection
) -> None:
    clock = FakeClock()
    async_engine = create_async_engine(pg_async_url)
    Factory = rdb.AsyncResilientSession(
        async_engine, service=service, config=CONFIG, wall_clock=clock
    )

    async def async_unavailable(session: AsyncSession) -> None:
        await session.execute(sa.text("SELECT raise_code('57P03')"))

    async def async_healthy(session: AsyncSession) -> int:
        return int((await session.execute(sa.text("SELECT 1"))).scalar_one())

    async def wait_for_the_lock(session: AsyncSession) -> None:
        await session.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": LOCK_KEY})

    try:
        with pytest.raises(sa.exc.DBAPIError):
            await Factory.run(async_unavailable)
        clock.advance(30.0)
        hung = asyncio.ensure_future(Factory.run(wait_for_the_lock))
        for _ in range(3000):
            if await asyncio.to_thread(waiting_for_lock, engine) is not None:
                break
            await asyncio.sleep(0.005)
        pid = waiting_for_lock(engine)
        assert pid is not None, "the probe never waited for the lock"
        with pytest.raises(rdb.CircuitOpenError):
            await Factory.run(async_healthy)
        clock.advance(30.0)
        assert await Factory.run(async_healthy) == 1
        assert state(service) == "closed"
        with engine.connect() as killer:
            killer.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        with pytest.raises(sa.exc.DBAPIError):
            await asyncio.wait_for(hung, 30)
        assert state(service) == "closed"
        assert rdb.health()["services"][service]["breaker"]["failures"] == 0
    finally:
        await async_engine.dispose()


def overdue_events(events: list[rdb.SelfHealEvent]) -> list[rdb.SelfHealEvent]:
    return [e for e in events if e.name == "breaker_probe_overdue"]


def test_the_slots_are_given_back_exactly_at_the_lease_from_the_first_slot_taken(
    service: str, events: list[rdb.SelfHealEvent]
) -> None:
    """The local breaker's lease, to the second: half-open a minute already (one success of
    the two that close it), two probes take the slots 29 s apart and hang. A call is refused,
    told to ask again within a second, until the lease of the first slot taken
    (``max(reset timeout, 10 s)``) is over; then, and not before, both slots go to new
    probes, with one overdue line, and every slot is taken again. A probe admitted while a slot
    is free is not overdue. The hung probes' ends count nowhere (a failure would open the
    breaker); a new probe's success closes it. Each probe runs in a context of its own (a
    thread's, a task's), where its end is reported."""
    clock = FakeClock()
    config = rdb.Config(failure_threshold=1, reset_timeout=30.0, half_open_probes=2)
    b = Breaker(service, config, clock=clock)
    b.on_failure(b.before_call())
    clock.advance(30.0)
    first = b.before_call()
    assert first is True
    b.on_success(first)  # one success of the two that close it
    assert b.state == "half-open"
    clock.advance(60.0)
    hung = [contextvars.copy_context() for _ in range(2)]
    assert hung[0].run(b.before_call) is True  # the first slot taken: its lease runs from now
    clock.advance(29.0)
    assert hung[1].run(b.before_call) is True  # the second
    assert not overdue_events(events)
    clock.advance(0.5)
    with pytest.raises(rdb.CircuitOpenError) as refused:
        b.before_call()
    assert refused.value.state == "half-open"
    assert refused.value.retry_after == pytest.approx(1.0)  # within one attempt
    assert not overdue_events(events)
    clock.advance(0.5)  # 30 s since the first slot was taken
    fresh = [contextvars.copy_context() for _ in range(2)]
    assert fresh[0].run(b.before_call) is True
    (overdue,) = overdue_events(events)
    assert overdue.fields["running_for"] == pytest.approx(30.0)
    assert fresh[1].run(b.before_call) is True  # the second slot was given back too
    with pytest.raises(rdb.CircuitOpenError):
        b.before_call()  # both taken by the new probes, whose lease starts now
    assert len(overdue_events(events)) == 1
    hung[0].run(b.on_failure, True)  # a hung probe fails at last: it counts nowhere
    hung[1].run(b.on_success, True)  # nor does the other's success
    assert b.state == "half-open"
    with pytest.raises(rdb.CircuitOpenError):
        b.before_call()  # (their slots were not theirs to give back)
    fresh[0].run(b.on_success, True)  # the second success of this half-open state
    assert b.state == "closed"
