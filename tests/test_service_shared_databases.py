"""Factories left to the default service name on two databases: one ``[SELF-HEAL]`` WARNING
per pair of databases, naming both (passwords masked), the shared name, what it means and the
fix; nothing for factories given ``service=`` (the same name on two URLs included), nothing for
two factories on one database, nothing for a factory that is gone.

Two real databases on the suite's server (the test's own and conftest's ``second_database``),
sync (psycopg)
and async (asyncpg); the multi-host cases on URLs whose engines never connect (what identifies
a database is read from the URL).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import resilient_db as rdb
from resilient_db import _unit
from resilient_db.testing import PostgresServer

SAID = "Databases sharing a service"


def said(caplog: pytest.LogCaptureFixture, *names: str) -> list[logging.LogRecord]:
    """The warnings naming every one of ``names`` (other tests' factories may be alive on
    databases of their own: only the pairs of this test's are looked at)."""
    return [
        r
        for r in caplog.records
        if SAID in r.getMessage() and all(f"/{name}" in r.getMessage() for name in names)
    ]


_PAIR = re.compile(r"on two databases, (.*?) and (.*?), are both service=")


def pairs_among(caplog: pytest.LogCaptureFixture, marker: str) -> list[str]:
    """The warnings whose two databases both have ``marker`` in their URL: this test's pairs
    (a factory of another test of the process, alive on a database of its own, is paired with
    this test's as it should be, and is no concern here)."""
    found = []
    for record in caplog.records:
        match = _PAIR.search(record.getMessage())
        if match and marker in match[1] and marker in match[2]:
            found.append(record.getMessage())
    return found


@pytest.fixture
def pair_said(
    caplog: pytest.LogCaptureFixture, pg_database: str, second_database: str
) -> Callable[[], list[logging.LogRecord]]:
    """A call for the warnings naming the test's two databases (resilient_db's warnings
    captured from the test's start)."""
    caplog.set_level(logging.WARNING, logger="resilient_db")
    return lambda: said(caplog, pg_database, second_database)


@pytest_asyncio.fixture
async def async_engines(
    pg_server: PostgresServer, pg_database: str, second_database: str
) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    made = (
        create_async_engine(pg_server.url(pg_database, driver="asyncpg")),
        create_async_engine(pg_server.url(second_database, driver="asyncpg")),
    )
    yield made
    for engine in made:
        await engine.dispose()


def select_one(session: sa.orm.Session) -> int:
    return int(session.execute(sa.text("SELECT 1")).scalar_one())


def test_two_databases_without_service_said_once(
    engines: tuple[sa.Engine, sa.Engine],
    pg_server: PostgresServer,
    pg_database: str,
    pair_said: Callable[[], list[logging.LogRecord]],
) -> None:
    orders = rdb.ResilientSession(engines[0])
    assert not pair_said()  # one database: nothing to say
    analytics = rdb.ResilientSession(engines[1])
    [record] = pair_said()
    line = record.getMessage()
    assert line.startswith("[SELF-HEAL] ")
    assert record.levelno == logging.WARNING
    assert "service=database" in line
    assert "one circuit breaker and one retry budget for both" in line
    assert "an outage of either fails the other's units fast" in line
    assert 'service="..." on each factory' in line
    password = sa.make_url(pg_server.url(pg_database)).password
    if password:
        assert password not in line
    # and the units of both run as before: a warning, nothing refused
    assert orders.run(select_one) == analytics.run(select_one) == 1
    # once per pair of databases: another factory on either says nothing more
    third = rdb.ResilientSession(engines[1])
    fourth = rdb.ResilientSession(engines[0])
    assert len(pair_said()) == 1
    assert third.service == fourth.service == "database"
    assert type(third.service) is str  # (a plain name, not the marker of the default)


def test_configure_bind_later_is_looked_at(
    engines: tuple[sa.Engine, sa.Engine], pair_said: Callable[[], list[logging.LogRecord]]
) -> None:
    orders = rdb.ResilientSession(engines[0])
    later = rdb.ResilientSession()  # bound at start-up, as an application's may be
    assert not pair_said()
    later.configure(bind=engines[1])
    assert len(pair_said()) == 1
    assert orders.run(select_one) == later.run(select_one) == 1


@pytest.mark.asyncio
async def test_async_two_databases_without_service(
    async_engines: tuple[AsyncEngine, AsyncEngine],
    pair_said: Callable[[], list[logging.LogRecord]],
) -> None:
    orders = rdb.AsyncResilientSession(async_engines[0])
    analytics = rdb.AsyncResilientSession(async_engines[1])
    [record] = pair_said()
    assert "service=database" in record.getMessage()
    assert "postgresql+asyncpg://" in record.getMessage()

    async def one(session: AsyncSession) -> int:
        return int((await session.execute(sa.text("SELECT 1"))).scalar_one())

    assert await orders.run(one) == await analytics.run(one) == 1


def test_explicit_service_is_left_alone(
    engines: tuple[sa.Engine, sa.Engine], pair_said: Callable[[], list[logging.LogRecord]]
) -> None:
    """The same name given on two URLs is a breaker shared on purpose ("database" too)."""
    held = [
        rdb.ResilientSession(engines[0], service="shared-on-purpose"),
        rdb.ResilientSession(engines[1], service="shared-on-purpose"),
        rdb.ResilientSession(engines[0], service="database"),
        rdb.ResilientSession(engines[1], service="database"),
    ]
    assert not pair_said()
    # one left to the default beside them: a given "database" is not "left to the default"
    held.append(rdb.ResilientSession(engines[1]))
    assert not pair_said()
    assert len(held) == 5


@pytest.mark.asyncio
async def test_same_database_is_left_alone(
    pg_server: PostgresServer,
    pg_database: str,
    made_async_engines: list[AsyncEngine],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two engines on one database (another driver, another spelling of the URL): silent."""
    caplog.set_level(logging.WARNING, logger="resilient_db")
    url = sa.make_url(pg_server.url(pg_database))
    plain = sa.create_engine(url)
    spelled = sa.create_engine(url.set(host=(url.host or "").upper() or None))
    made_async_engines.append(create_async_engine(pg_server.url(pg_database, driver="asyncpg")))
    try:
        held = [
            rdb.ResilientSession(plain),
            rdb.ResilientSession(spelled),
            rdb.AsyncResilientSession(made_async_engines[0]),
        ]
        assert not pairs_among(caplog, pg_database)
        assert held[0].run(select_one) == 1
    finally:
        plain.dispose()
        spelled.dispose()


def test_factory_gone_is_not_a_second_database(
    engines: tuple[sa.Engine, sa.Engine], pair_said: Callable[[], list[logging.LogRecord]]
) -> None:
    """A factory nobody holds (its registries' entries are weak, but it and its class refer
    to each other: it lasts until the cyclic collector runs) is no database of the
    application's. The collector is kept from running by itself meanwhile."""
    gc.disable()
    try:
        assert rdb.ResilientSession(engines[0]).run(select_one) == 1  # then dropped
        kept = rdb.ResilientSession(engines[1])
    finally:
        gc.enable()
    assert not pair_said()
    assert kept.run(select_one) == 1


def test_multi_host_urls(caplog: pytest.LogCaptureFixture) -> None:
    """A multi-host URL's ``host=`` list: the same database as a URL to one of its hosts
    (any order, spelling, driver, port given apart or the default one); another database
    than one on other hosts or of another name. Read from the URLs: these engines never connect."""
    caplog.set_level(logging.WARNING, logger="resilient_db")
    db = f"t_svc_multi_{uuid.uuid4().hex[:8]}"
    urls = [
        f"postgresql+psycopg://app:s3cret@/{db}?host=db1.example:5432&host=db2.example:5433",
        f"postgresql+asyncpg://other:pw@/{db}?host=DB2.example:5433&host=db1.example:5432",
        f"postgresql+psycopg://app@db2.example:5433/{db}",
        f"postgresql+psycopg://app@/{db}?host=db1.example,db2.example&port=5432,5433",
    ]
    made = [sa.create_engine(u) for u in urls if "asyncpg" not in u]
    made_async = [create_async_engine(u) for u in urls if "asyncpg" in u]
    held: list[object] = [rdb.ResilientSession(e) for e in made]
    held += [rdb.AsyncResilientSession(e) for e in made_async]
    assert not pairs_among(caplog, db)

    other_hosts = sa.create_engine(
        f"postgresql+psycopg://app@/{db}?host=db7.example&host=db8.example"
    )
    held.append(rdb.ResilientSession(other_hosts))
    lines = pairs_among(caplog, db)
    assert lines  # another cluster holding a database of that name: another database
    assert all("db7.example" in line for line in lines)
    assert not any("s3cret" in line for line in lines)  # masked
    caplog.clear()

    other_name = sa.create_engine(f"postgresql+psycopg://app@db1.example/{db}_other")
    held.append(rdb.ResilientSession(other_name))
    lines = pairs_among(caplog, db)
    assert any(f"/{db}_other" in line for line in lines)
    assert len(held) == 6


def test_two_factories_made_at_once_say_a_pair_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threads making factories on two databases at the same moment: each pair said once.
    Forced: each factory, on its engine, waits for the other before it looks at the others, so
    both find the pair to say. (Engines that never connect: the databases are told apart by
    their URLs.)"""
    caplog.set_level(logging.WARNING, logger="resilient_db")
    say = _unit.say_databases_sharing
    meet: list[threading.Barrier] = []

    def say_together(factory: object) -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            meet[-1].wait(timeout=5)
        say(factory)

    monkeypatch.setattr(_unit, "say_databases_sharing", say_together)
    rounds = 10
    tag = uuid.uuid4().hex[:8]
    for i in range(rounds):
        made = [
            sa.create_engine(f"postgresql+psycopg://app@db.example/t_{tag}_{i}_{side}")
            for side in "ab"
        ]
        start = threading.Barrier(len(made))
        meet.append(threading.Barrier(len(made)))
        held: list[object] = []

        def make(
            engine: sa.Engine, start: threading.Barrier = start, held: list[object] = held
        ) -> None:
            start.wait()
            held.append(rdb.ResilientSession(engine))

        threads = [threading.Thread(target=make, args=(e,)) for e in made]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(held) == 2
    for i in range(rounds):
        assert len(said(caplog, f"t_{tag}_{i}_a", f"t_{tag}_{i}_b")) == 1, i


def test_with_self_healing_left_to_the_default_on_two_databases_is_said(
    engines: tuple[sa.Engine, sa.Engine], pair_said: Callable[[], list[logging.LogRecord]]
) -> None:
    """``with_self_healing()`` without ``service=`` is service "database" too: wrapping the
    work of factories on two databases (named ones here: each its own breaker), its breaker
    and budget span both, and an outage of either refuses the other's operations. Said as for
    factories left to the default, once per pair, when its work first begins a transaction on
    the second database; nothing for a ``service=`` given to it."""
    orders = rdb.ResilientSession(engines[0], service="orders-db")
    analytics = rdb.ResilientSession(engines[1], service="analytics-db")
    assert rdb.with_self_healing(lambda: orders.run(select_one)) == 1
    assert not pair_said()  # one database so far
    given = rdb.with_self_healing(lambda: analytics.run(select_one), service="database")
    assert given == 1
    assert not pair_said()  # the name given: a breaker shared on purpose
    assert rdb.with_self_healing(lambda: analytics.run(select_one)) == 1
    [record] = pair_said()
    line = record.getMessage()
    assert line.startswith("[SELF-HEAL] Databases sharing a service: with_self_healing()")
    assert record.levelno == logging.WARNING
    assert "service=database" in line
    assert "one circuit breaker and one retry budget for both" in line
    assert 'with_self_healing(fn, service="orders-db")' in line

    @rdb.with_self_healing()
    def both() -> int:
        with orders() as s:
            first = select_one(s)
        return first + analytics.run(select_one)

    assert both() == 2
    assert len(pair_said()) == 1  # (once per pair)


def test_with_self_healing_and_a_factory_left_to_the_default_on_two_databases_is_said(
    engines: tuple[sa.Engine, sa.Engine], pair_said: Callable[[], list[logging.LogRecord]]
) -> None:
    """A factory made without ``service=`` on one database, the work of ``with_self_healing()``
    without it on the other (a factory given a name, its unit run inside): one breaker."""
    orders = rdb.ResilientSession(engines[0])
    analytics = rdb.ResilientSession(engines[1], service="analytics-db")
    assert orders.run(select_one) == 1
    assert not pair_said()
    assert rdb.with_self_healing(lambda: analytics.run(select_one)) == 1
    [record] = pair_said()
    assert "service=database" in record.getMessage()


@pytest.mark.asyncio
async def test_async_with_self_healing_left_to_the_default_on_two_databases_is_said(
    async_engines: tuple[AsyncEngine, AsyncEngine],
    pair_said: Callable[[], list[logging.LogRecord]],
) -> None:
    orders = rdb.AsyncResilientSession(async_engines[0], service="orders-db")
    analytics = rdb.AsyncResilientSession(async_engines[1], service="analytics-db")

    async def one(session: AsyncSession) -> int:
        return int((await session.execute(sa.text("SELECT 1"))).scalar_one())

    assert await rdb.with_self_healing(lambda: orders.run(one)) == 1
    assert not pair_said()
    assert await rdb.with_self_healing(lambda: analytics.run(one)) == 1
    assert len(pair_said()) == 1
