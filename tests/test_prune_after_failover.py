"""The prune of expired commit markers across a failover: the primary crashed, the standby
promoted. The markers replicated to the standby; the prune's claim and interval are the engine's
(kept across the failover), its connections the pool's (those to the crashed primary are dead).
The first writing unit on the promoted standby whose prune is due deletes the expired markers
there, and nothing of it reaches a unit.

Real servers (a :class:`~resilient_db.testing.StandbyPair`, its multi-host URL), both drivers;
the prune is made due as ``test_prune_after_commit`` makes it (as if ``PRUNE_INTERVAL`` had
passed), never by sleeping."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import add_expired_markers, expired_markers
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import StandbyPair

pytestmark = pytest.mark.usefixtures("no_backoff")

DATABASE = "app"
EXPIRED = 50  # markers 20 minutes older than the newest: past RETENTION
#: enough attempts for a unit cut off by the crash to reach the promoted standby
CONFIG = rdb.Config(max_retries=20, circuit_breaker=False)


def prepare(pair: StandbyPair) -> None:
    """The notes table and the commit markers on the primary, replicated to the standby."""
    pair.create_database(DATABASE)
    engine = sa.create_engine(pair.primary.url(DATABASE), poolclass=sa.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE notes (note text NOT NULL)"))
        rdb.install_commit_markers(engine)
    finally:
        engine.dispose()


def note(session: Session, text: str) -> str:
    session.execute(sa.text("INSERT INTO notes (note) VALUES (:n)"), {"n": text})
    return text


async def anote(session: AsyncSession, text: str) -> str:
    await session.execute(sa.text("INSERT INTO notes (note) VALUES (:n)"), {"n": text})
    return text


def failover(pair: StandbyPair, factory: Any) -> None:
    """Markers expired on the primary and replicated, the engine's prune due, the primary
    crashed and the standby promoted."""
    add_expired_markers(pair, DATABASE, EXPIRED)
    pair.wait_replayed()
    assert expired_markers(pair, DATABASE) == EXPIRED
    factory._hooks.commit._next_prune = 0.0  # as if PRUNE_INTERVAL had passed
    pair.crash_primary()
    pair.promote()


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_expired_markers_are_pruned_on_the_promoted_standby(
    pg_standby: StandbyPair,
    driver: str,
    service: str,
    events: list[rdb.SelfHealEvent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    pair = pg_standby
    prepare(pair)
    url = pair.url(DATABASE, driver=driver)
    with caplog.at_level(logging.DEBUG, logger="resilient_db.session"):
        if driver == "asyncpg":

            async def units() -> list[str]:
                engine = create_async_engine(url)
                factory = rdb.AsyncResilientSession(engine, service=service, config=CONFIG)
                try:
                    done = [await factory.run(anote, "before")]
                    async with engine.connect(), engine.connect():
                        pass  # the pool holds two connections to the primary about to crash
                    failover(pair, factory)
                    # the first unit on the promoted standby: its connections to the crashed
                    # primary are dead (replaced at checkout, or it is replayed), and its
                    # COMMIT starts the prune
                    done.append(await factory.run(anote, "after"))
                    pruning = factory._hooks.commit.pruning
                    assert pruning is not None  # the prune's task, started by that COMMIT
                    await pruning
                    done.append(await factory.run(anote, "then"))
                    return done
                finally:
                    await engine.dispose()

            done = asyncio.run(units())
        else:
            engine = sa.create_engine(url)
            factory = rdb.ResilientSession(engine, service=service, config=CONFIG)
            try:
                done = [factory.run(note, "before")]
                with engine.connect(), engine.connect():
                    pass  # the pool holds two connections to the primary about to crash
                failover(pair, factory)
                done.append(factory.run(note, "after"))  # pruned inline, after its COMMIT
                done.append(factory.run(note, "then"))
            finally:
                engine.dispose()

    assert done == ["before", "after", "then"]
    assert expired_markers(pair, DATABASE) == 0
    rows = pair.execute("SELECT count(*) FROM resilient_db.commit_markers", database=DATABASE)
    assert int(rows[0][0]) >= 1 + 3  # the newest one before, and the units' own, kept
    assert [r.getMessage() for r in caplog.records if "pruned" in r.getMessage()] == [
        f"pruned {EXPIRED} expired commit markers"
    ]
    assert not [r for r in caplog.records if "pruning commit markers failed" in r.getMessage()]
    names = [e.name for e in events]
    # the first unit after the crash reached the new primary: its pooled connections to the
    # crashed one were found dead at checkout and replaced, or (the crash not yet seen on
    # their sockets) its first statement failed on one and it was replayed
    assert {"recovered", "dead_pooled_connection"} & set(names)
    assert not {"gave_up", "commit_unknown"} & set(names)
