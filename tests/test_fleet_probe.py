"""A half-open probe of a shared breaker whose end Redis missed (it hung for a moment): the
outcome is reported when Redis answers again, before the process reads the shared state back,
so a probe that succeeded closes the breaker for the fleet instead of holding its probe slot
until the lease runs out."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from fleet import shared
from processes import wait_for
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import RedisServer

pytestmark = pytest.mark.slow


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    e = sa.create_engine(pg_url)
    yield e
    e.dispose()


def _fleet_state(redis: RedisServer, service: str) -> str:
    state: bytes | None = redis.client().hget(f"resilient_db:{{{service}}}:breaker", "st")
    return (state or b"closed").decode()


def test_a_probe_that_succeeded_while_redis_blipped_closes_the_fleet_breaker_on_rejoin(
    redis_server: RedisServer, engine: sa.Engine
) -> None:
    reset = 0.3
    config = rdb.Config(
        redis_url=redis_server.url,
        retry=False,
        reset_timeout=reset,
        half_open_probes=1,
        failure_threshold=5,
    )
    Factory = rdb.ResilientSession(engine, service="blip", config=config)
    wait_for(lambda: shared("blip")["connected"], "the link")
    breaker = Factory.policy.breaker
    assert breaker is not None
    breaker.open()
    assert _fleet_state(redis_server, "blip") == "open"
    time.sleep(reset)  # the breaker's open period (not a backoff)

    def probe(s: Session) -> int:
        value = int(s.execute(sa.text("SELECT 1")).scalar_one())
        redis_server.pause()  # Redis hangs just as the probe ends: its end goes unheard
        return value

    try:
        assert Factory.run(probe) == 1
        assert shared("blip")["connected"] is False
    finally:
        redis_server.resume()
    wait_for(lambda: shared("blip")["connected"], "the link, again")
    # the probe's success was reported before the shared state was read back: closed for all
    assert _fleet_state(redis_server, "blip") == "closed"
    assert breaker.state == "closed"
    assert Factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
