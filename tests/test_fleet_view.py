"""A shared breaker's view answers the success path without Redis: closed, a call goes
through unasked (``fast_closed``); open, it is refused from the view for the time the fleet's
opening has left (``before_call``, ``open_for``), Redis not asked, so a Redis that hangs
meanwhile neither delays the refusal nor takes the link down."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fleet import shared
from processes import wait_for

import resilient_db as rdb
from resilient_db._breaker import Breaker, breaker_for
from resilient_db.testing import RedisServer

pytestmark = pytest.mark.slow

#: the shared breaker's open period here (real time: what the test waits out)
RESET = 0.5


class User:
    """A user of the breaker (a factory's policy stands here): alive for the test."""


@pytest.fixture
def user() -> Iterator[User]:
    yield User()
    rdb.reset_state()


def shared_breaker(redis: RedisServer, service: str, user: User) -> Breaker:
    config = rdb.Config(
        redis_url=redis.url,
        reset_timeout=RESET,
        failure_threshold=1,
        half_open_probes=1,
        redis_timeout=2.0,
    )
    b = breaker_for(service, config, user=user)
    wait_for(lambda: shared(service)["connected"], "the link")
    return b


def test_an_open_shared_breaker_refuses_from_its_view_while_redis_hangs(
    redis_server: RedisServer, user: User
) -> None:
    b = shared_breaker(redis_server, "view-open", user)
    assert b.fast_closed() is True  # the view is closed: nothing to ask
    assert b.open_for() == 0.0
    assert b.before_call() is False
    assert b.open() is True  # shared: the fleet's breaker
    assert b.fast_closed() is False
    assert 0.0 < b.open_for() <= RESET
    redis_server.pause()
    try:
        with pytest.raises(rdb.CircuitOpenError) as refused:
            b.before_call()
        assert 0.0 < refused.value.retry_after <= RESET
        assert refused.value.by_hand is True
        # nothing asked: a command to the paused Redis would have waited out its 2 s timeout
        # and taken the link down (no timed assertion needed)
        assert shared("view-open")["connected"] is True
    finally:
        redis_server.resume()
    time.sleep(RESET)  # the breaker's open period (not a backoff)
    assert b.open_for() == 0.0  # over: the next call asks the fleet for its probe
    probe = b.before_call()
    assert probe is True
    b.on_success(probe)
    assert b.state == "closed"
    assert b.fast_closed() is True
    assert b.open(reason="again") is True
    assert b.close(reason="after all") is True  # shared too
    assert b.fast_closed() is True
    assert b.open_for() == 0.0
    # the openings this process made in the fleet's breaker: two (a closing is none)
    assert shared("view-open")["opened_here"] == 2


def test_a_call_refused_with_every_probe_slot_taken_waits_on_the_view(
    redis_server: RedisServer, user: User
) -> None:
    """Half-open, the fleet's one probe slot taken: a call is refused (told to ask again
    within a second), and the calls after it within that second are refused from the view,
    Redis not asked (it hangs meanwhile, and the link stays up)."""
    b = shared_breaker(redis_server, "view-probe", user)
    assert b.open() is True
    time.sleep(RESET)  # the breaker's open period (not a backoff)
    probe = b.before_call()
    assert probe is True  # this process's probe holds the one slot
    with pytest.raises(rdb.CircuitOpenError) as first:
        b.before_call()
    assert first.value.state == "half-open"
    assert first.value.retry_after == pytest.approx(min(RESET, 1.0))
    redis_server.pause()
    try:
        with pytest.raises(rdb.CircuitOpenError) as again:
            b.before_call()
        assert again.value.state == "half-open"
        assert shared("view-probe")["connected"] is True  # (Redis not asked, as above)
    finally:
        redis_server.resume()
    b.on_success(probe)
    assert b.state == "closed"
