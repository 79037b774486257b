"""A pooled connection's record keeps the checkout's dead-connection probe in its ``info``
(``resilient_db.dead_probe``: the driver's connection, a probe bound to its socket). SQLAlchemy
clears a record's ``info`` only as the record connects again, at the slot's next checkout: an
invalidated (closed) connection stayed alive until then, with its statement cache and its
transaction, in a pool slot that may not be checked out again for long (a pool that grew for a
burst). The probe is dropped as the record's connection is closed (the pool's ``close``
event: an invalidation, a dispose, an overflow connection returned): the old driver
connection is garbage-collected before that checkout.

Real server, real invalidations (an explicit one, a backend the server ended), psycopg."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import PostgresServer

PROBE_KEY = "resilient_db.dead_probe"


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    made = sa.create_engine(pg_url, pool_size=1, max_overflow=0)
    yield made
    made.dispose()


def _checked_out(Sessions: Any) -> tuple[Session, Any, Any]:
    """A session of the factory holding its connection, the pool record's probe, and a weak
    reference to the driver's connection."""
    session: Session = Sessions()
    session.execute(sa.text("SELECT 1"))
    pooled = session.connection().connection
    probe = pooled.info.get(PROBE_KEY)
    assert probe is not None  # the probe is kept
    assert probe[0] is pooled.dbapi_connection
    return session, pooled, weakref.ref(pooled.driver_connection)


def _gone_before_next_checkout(engine: sa.Engine, driver: weakref.ref[Any]) -> None:
    gc.collect()
    assert driver() is None, "the closed driver connection is still referenced"
    # the slot still works: its next checkout connects again and keeps a new probe
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
        assert conn.connection.info[PROBE_KEY][0] is conn.connection.dbapi_connection


@pytest.mark.usefixtures("no_backoff")
def test_an_invalidated_connection_is_freed_before_the_slots_next_checkout(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    session, pooled, driver = _checked_out(Sessions)
    session.connection().invalidate()
    session.close()
    del session, pooled
    _gone_before_next_checkout(engine, driver)


@pytest.mark.usefixtures("no_backoff")
def test_a_connection_whose_backend_ended_is_freed_before_the_slots_next_checkout(
    engine: sa.Engine, service: str, pg_server: PostgresServer
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    session, pooled, driver = _checked_out(Sessions)
    pid = int(session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
    pg_server.execute(f"SELECT pg_terminate_backend({pid}, 5000)")
    with pytest.raises(sa.exc.OperationalError) as caught:
        session.execute(sa.text("SELECT 1"))
    assert caught.value.connection_invalidated
    session.close()
    del session, pooled, caught
    _gone_before_next_checkout(engine, driver)
