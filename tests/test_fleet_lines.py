"""A Redis link's lines (Redis down, Redis back) name the services of this process that use the
link at that moment: one Redis may serve several services of a process, and "Redis at ... did
not answer" alone does not say whose breakers and budgets now run on this process's own state."""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pybreaker
import pytest
import sqlalchemy as sa
from fleet import (
    Gate,
    fleet,
    held_by_another_thread,
    open_the_fleets_breaker,
    opener_settings,
    shared,
)
from processes import wait_for

import resilient_db as rdb
from resilient_db import _fleet
from resilient_db._breaker import breakers
from resilient_db._config import mask_url
from resilient_db._fleet import links
from resilient_db._state import STATE
from resilient_db.testing import RedisServer

pytestmark = pytest.mark.slow


def _records(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def test_redis_down_and_back_lines_name_the_services_using_the_link(
    redis_server: RedisServer, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two services share breakers through one Redis, a third only its retry budget: Redis
    killed, its one warning names all three (sorted); restarted, so does its "restored"."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    engine = sa.create_engine(pg_url)
    config = rdb.Config(redis_url=redis_server.url)
    factories = [
        rdb.ResilientSession(engine, service="orders", config=config),
        rdb.ResilientSession(engine, service="billing", config=config),
        # no breaker: attached to the link by its retry budget alone
        rdb.ResilientSession(
            engine,
            service="reports",
            config=config.replace(circuit_breaker=False, retry_budget=0.2),
        ),
    ]
    for service in ("orders", "billing"):
        wait_for(lambda service=service: shared(service)["connected"], "the link", 10)
    where = f"Redis at {mask_url(redis_server.url)} (services: billing, orders, reports)"

    redis_server.kill()
    wait_for(lambda: bool(_records(caplog, "Shared state unavailable")), "the down line", 10)
    (down,) = _records(caplog, "Shared state unavailable")
    assert down.getMessage().startswith(f"[SELF-HEAL] Shared state unavailable: {where} did not")
    assert down.self_heal["services"] == "billing, orders, reports"  # type: ignore[attr-defined]

    redis_server.start()  # the same port
    wait_for(lambda: bool(_records(caplog, "Shared state restored")), "the restored line", 10)
    (back,) = _records(caplog, "Shared state restored")
    assert back.getMessage().startswith(f"[SELF-HEAL] Shared state restored: {where} answers")
    assert back.self_heal["services"] == "billing, orders, reports"  # type: ignore[attr-defined]
    credentials = redis_server.url.partition("://")[2].rpartition("@")[0]
    assert credentials
    assert credentials not in caplog.text
    (link,) = links().values()
    commands = link.commands
    assert link.services() == ["billing", "orders", "reports"]
    assert link.commands == commands  # read from this process's tables: no Redis round trip
    del factories
    engine.dispose()


def test_a_link_says_it_is_down_under_the_logging_switches_a_reload_applied(
    redis_server: RedisServer,
    pg_url: str,
    service: str,
    clean_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A breaker shared through Redis (no retry budget on the link) made with logging off:
    a reload switching logging on reached neither the breaker nor, through it, its link, whose
    "Shared state unavailable" line stayed unsaid when Redis went away."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    clean_env.setenv("SELF_HEALING_REDIS_URL", redis_server.url)
    clean_env.setenv("SELF_HEALING_LOGGING", "false")
    engine = sa.create_engine(pg_url)
    try:
        factory = rdb.ResilientSession(engine, service=service)
        wait_for(lambda: shared(service)["connected"], "the link", 10)
        clean_env.delenv("SELF_HEALING_LOGGING")
        rdb.reload_config()
        redis_server.kill()
        wait_for(lambda: bool(_records(caplog, "Shared state unavailable")), "the down line", 10)
        assert factory.service == service
    finally:
        clean_env.delenv("SELF_HEALING_REDIS_URL")
        engine.dispose()


def test_a_link_refused_by_the_client_names_its_first_service(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A link's first line, made as the link is made (here: the client refuses the URL), comes
    once the service that asked for the link is attached: its event names it."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    url = "redis://:s3cret@127.0.0.1:9/0"
    config = rdb.Config(redis_url=url)
    # a URL the client refuses, behind the validation's back (as in test_redis_url.py)
    object.__setattr__(config, "redis_url", url + "?db=x")
    engine = sa.create_engine("postgresql+psycopg://u@127.0.0.1:9/db")  # never connected
    events: list[rdb.SelfHealEvent] = []
    rdb.add_hook(events.append)
    try:
        factory = rdb.ResilientSession(engine, service="ledger", config=config)
    finally:
        rdb.remove_hook(events.append)
    (line,) = _records(caplog, "Shared state unavailable")
    assert line.self_heal["services"] == "ledger"  # type: ignore[attr-defined]
    # one service: the line's fields name it as service too, as its event does
    assert line.self_heal["service"] == "ledger"  # type: ignore[attr-defined]
    (event,) = [e for e in events if e.name == "shared_state_down"]
    assert (event.service, event.fields["services"]) == ("ledger", "ledger")
    assert "s3cret" not in caplog.text
    del factory
    engine.dispose()


def test_a_followed_opening_says_the_time_it_has_left(
    redis_server: RedisServer,
    pg_url: str,
    gate: Gate,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another process opened the shared breaker for its 600 s reset timeout (its line says
    so), and 300 s of that have passed (the opening's end moved back in Redis, as if they
    had). A process that follows it now says the time it has left, 300 s at most, not the
    600 s of the reset timeout, in its line and its event."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    gate.set(down=True)
    with fleet(1, pg_url, opener_settings(redis_server.url), tmp_path) as (opener,):
        open_the_fleets_breaker(opener)
        (opened,) = opener.said("Circuit breaker opened")
        assert opened.endswith("rejecting calls for 600.0 s")  # made here: the whole timeout
    key = _fleet._keys("fleet").breaker
    client = redis_server.client()
    client.hset(key, "until", repr(float(client.hget(key, "until")) - 300.0))

    engine = sa.create_engine(pg_url)
    config = rdb.Config(redis_url=redis_server.url, failure_threshold=1, reset_timeout=600.0)
    rdb.ResilientSession(engine, service="fleet", config=config)
    wait_for(lambda: bool(_records(caplog, "Circuit breaker opened")), "the opening followed", 10)
    (line,) = _records(caplog, "Circuit breaker opened")
    message = line.getMessage()
    assert "after another process's failures (shared through Redis)" in message
    said = re.search(r"rejecting calls for ([\d.]+) s$", message)
    assert said is not None, message
    assert 0 < float(said[1]) <= 300.0
    left = line.self_heal["open_for"]  # type: ignore[attr-defined]
    assert 0 < left <= 300.0
    assert shared("fleet")["opens_followed"] == 1
    engine.dispose()


def test_an_opening_over_before_a_process_starts_is_not_said_opened_there(
    redis_server: RedisServer,
    pg_url: str,
    gate: Gate,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another process opened the shared breaker, and its time is over with nobody asking for
    a probe since (the fleet idle, or restarted: Redis still holds the opening). A process
    started now lets its first unit through as the fleet's half-open probe, as any process
    would; it does not say the breaker opened (a WARNING "rejecting calls for 0.0 s" on every
    worker of a restart, though nothing is rejected) nor count it as an opening followed. Its
    probe succeeding closes the fleet's breaker."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    gate.set(down=True)
    with fleet(1, pg_url, opener_settings(redis_server.url), tmp_path) as (opener,):
        open_the_fleets_breaker(opener)
    gate.set(down=False)
    key = _fleet._keys("fleet").breaker
    client = redis_server.client()
    client.hset(key, "until", repr(float(client.hget(key, "until")) - 700.0))  # over 100 s ago

    engine = sa.create_engine(pg_url)
    config = rdb.Config(redis_url=redis_server.url, failure_threshold=1, reset_timeout=600.0)
    factory = rdb.ResilientSession(engine, service="fleet", config=config)
    wait_for(lambda: shared("fleet")["connected"], "the link up", 10)
    assert _records(caplog, "Circuit breaker opened") == []
    assert shared("fleet")["opens_followed"] == 0
    assert factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar()) == 1
    assert _records(caplog, "Circuit breaker half-open")  # its unit was the fleet's probe
    assert _records(caplog, "Circuit breaker opened") == []
    assert rdb.health()["services"]["fleet"]["breaker"]["state"] == "closed"
    wait_for(lambda: client.hget(key, "st") == b"closed", "the fleet's breaker closed", 10)
    engine.dispose()


class _FailingListener(pybreaker.CircuitBreakerListener):  # type: ignore[misc]
    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        raise RuntimeError("a listener of the application that fails")


def test_a_failing_listener_is_not_taken_for_redis_failing(
    redis_server: RedisServer,
    pg_url: str,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    """Another process's opening arrives by pub/sub and a breaker listener of the application
    raises on it: the opening is followed, the link stays up and the line names the listener,
    not "Redis did not answer (RuntimeError)" with the link down and its fallback meanwhile.
    Its line is rate-limited as those of the machinery failing in units are (it raises at
    every change the fleet shares: a line each was a log storm); the hooks see each."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    engine = sa.create_engine(pg_url)
    config = rdb.Config(redis_url=redis_server.url, reset_timeout=30.0)
    rdb.ResilientSession(
        engine, service="listened", config=config, breaker_listeners=(_FailingListener(),)
    )
    wait_for(lambda: shared("listened")["connected"], "the link")
    force = redis_server.client().register_script(_fleet._FORCE)

    def another_process(want: str) -> None:
        """Another process opens or closes the shared breaker (its script, straight to Redis),
        and this one follows."""
        force(
            keys=_fleet._breaker_keys("listened"),
            args=[_fleet.CHANNEL.format(db=0), "listened", "another-process", want, 30.0],
        )
        wait_for(lambda: rdb.health()["services"]["listened"]["breaker"]["state"] == want, want)

    another_process("open")
    wait_for(lambda: len(_records(caplog, "Circuit breaker listener failed")) == 1, "the line")
    time.sleep(0.3)  # (a link taken down would be down by now: a condition, not a backoff)
    assert shared("listened")["connected"], shared("listened")["problem"]
    assert _records(caplog, "Shared state unavailable") == []
    (line,) = _records(caplog, "Circuit breaker listener failed")
    assert "service=listened a listener raised RuntimeError" in line.getMessage()
    assert "a listener of the application that fails" not in line.getMessage()  # (no text)
    another_process("closed")  # within the period: no line
    assert len(_records(caplog, "Circuit breaker listener failed")) == 1
    # a new period: the next line says how many the last one left unlogged
    _fleet._LISTENER_LINES.restart(("listened", STATE.generation))
    another_process("open")
    # (the line follows the state change the wait above saw, from the link's thread)
    wait_for(lambda: len(_records(caplog, "Circuit breaker listener failed")) == 2, "the line")
    lines = [r.getMessage() for r in _records(caplog, "Circuit breaker listener failed")]
    assert lines[0].endswith("the change is taken, Redis stays in use")  # folds none
    assert lines[1].endswith("the change is taken, Redis stays in use (1 more since the last line)")
    failed = [e for e in events if e.name == "machinery_failed" and e.service == "listened"]
    assert [(e.fields["part"], e.fields["suppressed"]) for e in failed] == [
        ("circuit breaker listener", 0),
        ("circuit breaker listener", 0),
        ("circuit breaker listener", 1),
    ]
    engine.dispose()


def test_a_failing_listeners_detail_quotes_no_values(
    redis_server: RedisServer, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A breaker listener of the application writes to the database and fails there (a
    duplicate key): the DEBUG line's traceback keeps the frames and names the database error
    by its class and SQLSTATE, without the values its text quotes (before: ``exc_info``, the
    DETAIL and SQLAlchemy's ``[parameters: ...]`` with the row's values)."""
    caplog.set_level(logging.DEBUG, logger="resilient_db")
    secret = "carol.secret@example.com"
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE breaker_audit (who text PRIMARY KEY)"))
        conn.execute(sa.text("INSERT INTO breaker_audit VALUES (:who)"), {"who": secret})

    class _AuditingListener(pybreaker.CircuitBreakerListener):  # type: ignore[misc]
        def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
            with engine.begin() as conn:
                conn.execute(sa.text("INSERT INTO breaker_audit VALUES (:who)"), {"who": secret})

    config = rdb.Config(redis_url=redis_server.url, reset_timeout=30.0)
    rdb.ResilientSession(
        engine, service="audited", config=config, breaker_listeners=(_AuditingListener(),)
    )
    wait_for(lambda: shared("audited")["connected"], "the link")
    force = redis_server.client().register_script(_fleet._FORCE)
    force(
        keys=_fleet._breaker_keys("audited"),
        args=[_fleet.CHANNEL.format(db=0), "audited", "another-process", "open", 30.0],
    )
    wait_for(lambda: _records(caplog, "breaker listener failure detail"), "the detail line")
    (record,) = _records(caplog, "breaker listener failure detail")
    text = logging.Formatter("%(message)s").format(record)
    assert "state_change" in text  # the frames ...
    assert "sqlalchemy.exc.IntegrityError: (SQLSTATE 23505; its text left out" in text
    assert secret not in text  # ... without the values
    assert "[parameters:" not in text
    engine.dispose()


def test_a_failing_listener_does_not_keep_the_link_down_on_rejoining(
    redis_server: RedisServer, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis comes back (restarted) with the shared breaker opened meanwhile: the link reads
    it on rejoining, and a breaker listener of the application raises on the opening. The
    link comes back all the same (it stayed down, its problem the listener's error, until a
    later attempt), and the opening is followed."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    engine = sa.create_engine(pg_url)
    config = rdb.Config(redis_url=redis_server.url, reset_timeout=30.0)
    rdb.ResilientSession(
        engine, service="relistened", config=config, breaker_listeners=(_FailingListener(),)
    )
    wait_for(lambda: shared("relistened")["connected"], "the link")
    redis_server.kill()
    wait_for(lambda: not shared("relistened")["connected"], "the link down")
    redis_server.start()
    redis_server.client().register_script(_fleet._FORCE)(
        keys=_fleet._breaker_keys("relistened"),
        args=[_fleet.CHANNEL.format(db=0), "relistened", "another-process", "open", 30.0],
    )
    problems: list[str] = []

    def back() -> bool:
        entry = shared("relistened")
        problems.append(str(entry["problem"]))
        return bool(entry["connected"])

    wait_for(back, "the link back")
    assert not [p for p in problems if "RuntimeError" in p]
    assert rdb.health()["services"]["relistened"]["breaker"]["state"] == "open"
    assert _records(caplog, "Circuit breaker listener failed")
    engine.dispose()


def test_an_explicit_open_of_a_shared_breaker_says_so_whichever_answer_comes_first(
    redis_server: RedisServer, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``open()`` of a shared breaker: its script answers the caller and publishes the change,
    and the background thread may take the message (this process's own) before the caller
    takes the answer. The opening's line then said "after 5 consecutive failures across the
    fleet", which no failure made: it says "by hand" whichever comes first."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    engine = sa.create_engine(pg_url)
    rdb.ResilientSession(engine, service="orders", config=rdb.Config(redis_url=redis_server.url))
    wait_for(lambda: shared("orders")["connected"], "the link", 10)
    breaker = breakers()["orders"]
    for _ in range(8):  # (bounded: the message wins the race more often than not)
        breaker.open()
        breaker.close()
    opened = _records(caplog, "Circuit breaker opened")
    assert len(opened) == 8
    assert all("service=orders by hand; rejecting" in r.getMessage() for r in opened), [
        r.getMessage() for r in opened
    ]
    engine.dispose()


class _Interrupted(BaseException):
    """What Ctrl-C (``KeyboardInterrupt``) would be, raised by a signal here."""


def _main_thread_awaits_redis() -> bool:
    """Whether the main thread waits in redis-py for Redis's answer (its command sent)."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    while frame is not None:
        code = frame.f_code
        if f"{os.sep}redis{os.sep}" in code.co_filename and code.co_name == "read_response":
            return True
        frame = frame.f_back
    return False


@pytest.mark.usefixtures("clean_env")
def test_an_explicit_open_interrupted_leaves_no_reason_for_the_next_openings(
    redis_server: RedisServer, engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """``open()`` of a shared breaker is interrupted (Ctrl-C) while its script waits for Redis:
    the reason it noted for its own pub/sub message stayed, and the next opening this process
    made, a half-open probe's failure, said it was made by hand."""
    config = rdb.Config(redis_url=redis_server.url, retry=False, reset_timeout=0.3, redis_timeout=5)
    Factory = rdb.ResilientSession(engine, service="interrupted", config=config)
    wait_for(lambda: shared("interrupted")["connected"], "the link", 10)
    breaker = breakers()["interrupted"]

    def interrupt(signum: int, frame: Any) -> None:
        raise _Interrupted

    main = threading.main_thread().ident or 0
    opened = threading.Event()  # open() returned (or raised)

    def interrupt_once_waiting() -> None:
        # once open() waits for Redis's answer, its script sent (not a fixed time after it
        # began, which a busy machine could reach before anything was sent)
        deadline = time.monotonic() + 10
        while not _main_thread_awaits_redis():
            if opened.wait(0.005) or time.monotonic() > deadline:
                return
        signal.pthread_kill(main, signal.SIGALRM)

    previous = signal.signal(signal.SIGALRM, interrupt)
    sender = threading.Thread(target=interrupt_once_waiting, daemon=True)
    redis_server.pause()
    try:
        sender.start()
        with pytest.raises(_Interrupted):
            breaker.open()
    finally:
        opened.set()
        sender.join(10)
        signal.signal(signal.SIGALRM, previous)
        redis_server.resume()
    state = lambda: redis_server.client().hget("resilient_db:{interrupted}:breaker", "st")  # noqa: E731
    wait_for(lambda: state() == b"open", "the open() sent, run", 10)
    wait_for(lambda: shared("interrupted")["connected"], "the link", 10)
    # the breaker's open period (not a backoff), counted from when Redis ran the open(), which
    # may be a moment after the state was first seen: with a margin (exactly 0.3 s could still
    # be refused, "retry in 0.1 s", on a busy machine)
    time.sleep(0.5)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="resilient_db")
    with pytest.raises(sa.exc.DBAPIError):  # the half-open probe fails: reopened
        Factory.run(lambda s: s.execute(sa.text("SELECT raise_code('57P03')")))
    wait_for(lambda: bool(_records(caplog, "Circuit breaker opened")), "the opening's line", 5)
    (opened,) = _records(caplog, "Circuit breaker opened")
    assert "by hand" not in opened.getMessage(), opened.getMessage()
    assert "a half-open probe failed" in opened.getMessage(), opened.getMessage()


@pytest.mark.usefixtures("clean_env")
def test_a_failures_opening_taken_while_another_thread_runs_open_says_what_opened_it(
    redis_server: RedisServer, engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A unit's failure opens the shared breaker; as the answer is taken, another thread of the
    process runs ``open()`` (an operator reacting to the same outage), its script waiting for
    Redis. The reason ``open()`` noted for its own pub/sub message was process-wide: the
    failure's opening, taken meanwhile, said "after an explicit open()", which had not reached
    Redis yet. It says the failures that made it; the opening by hand, made again once Redis
    answers, says it was by hand."""
    config = rdb.Config(
        redis_url=redis_server.url,
        retry=False,
        failure_threshold=1,
        reset_timeout=600,
        redis_timeout=10,  # (longer than Redis is paused here)
    )
    Factory = rdb.ResilientSession(engine, service="raced", config=config)
    Factory.run(lambda s: s.execute(sa.text("SELECT 1")))
    wait_for(lambda: shared("raced")["connected"], "the link", 10)
    breaker = breakers()["raced"]
    link = breaker._fleet
    state = lambda: redis_server.client().hget("resilient_db:{raced}:breaker", "st")  # noqa: E731
    caplog.set_level(logging.INFO, logger="resilient_db")
    failed: list[BaseException] = []

    def fail() -> None:
        try:
            Factory.run(lambda s: s.execute(sa.text("SELECT raise_code('57P03')")))
        except Exception as exc:
            failed.append(exc)

    unit = threading.Thread(target=fail)
    opener = threading.Thread(target=breaker.open)
    try:
        # the answer to the unit's failure waits for the breaker's lock, held here
        with held_by_another_thread(breaker._lock):
            unit.start()
            wait_for(lambda: state() == b"open", "the failure's opening, in Redis", 10)
            redis_server.pause()
            sent = link.commands
            opener.start()
            wait_for(lambda: link.commands > sent, "open()'s script sent", 10)
        unit.join(10)
        assert failed, "the unit did not end"
    finally:
        redis_server.resume()
    opener.join(15)
    assert not opener.is_alive()
    opened = [r.getMessage() for r in _records(caplog, "Circuit breaker opened")]
    assert len(opened) == 2, opened
    assert "1 consecutive failures across the fleet" in opened[0], opened
    assert "by hand" not in opened[0], opened
    assert opened[1].endswith("service=raced by hand; rejecting calls for 600.0 s"), opened


def test_another_processs_explicit_open_is_followed_as_an_open_not_as_failures(
    redis_server: RedisServer, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process runs ``open()`` of the shared breaker (its script, as that process
    sends it, under its own token): this process follows the opening, and its line said
    "after another process's failures", which no failure made. It says it was by hand."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    engine = sa.create_engine(pg_url)
    rdb.ResilientSession(engine, service="orders", config=rdb.Config(redis_url=redis_server.url))
    wait_for(lambda: shared("orders")["connected"], "the link", 10)
    channel = breakers()["orders"]._fleet.channel
    force = redis_server.client().register_script(_fleet._FORCE)
    force(keys=_fleet._breaker_keys("orders"), args=[channel, "orders", "other-1", "open", 60])
    wait_for(lambda: bool(_records(caplog, "Circuit breaker opened")), "the opening's line", 5)
    (opened,) = _records(caplog, "Circuit breaker opened")
    message = opened.getMessage()
    assert "by hand in another process (shared through Redis); rejecting" in message, message
    assert shared("orders")["opens_followed"] == 1
    engine.dispose()
