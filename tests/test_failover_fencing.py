"""An old primary back as a primary after a failover (split brain) is refused by its timeline.

A promoted standby writes on a new timeline of its cluster; the old primary, restarted without
being demoted, is still on the old one. Each new connection's check at connect reads the
server's cluster (system identifier) and timeline, in the statement it already sent: an engine
that has seen the new timeline refuses a connection to a primary of the same cluster on an
older one (SQLSTATE 08004, a lost connection to the classifier). Nothing is written or verified
there. Not refused: a server restarted on its own timeline, another cluster at the same
address (a new ``initdb``), a standby.

Real servers (:class:`~resilient_db.testing.StandbyPair`, :class:`EmbeddedPostgres`), real
faults (an immediate stop, ``pg_promote``, a restart, a COMMIT answer lost by a
:class:`~resilient_db.testing.FaultProxy`), a plain login role (no superuser)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from test_failover_review import DATABASE, LEDGER_DDL, Units, fail_over, ledger, units

import resilient_db as rdb
from resilient_db.testing import EmbeddedPostgres, FaultProxy, StandbyPair

pytestmark = pytest.mark.slow

DRIVERS = ["psycopg", "asyncpg"]
ROLE, PASSWORD = "app", "app-secret"
#: a few quick retries, no breaker: a refused unit gives up within a second
CONFIG = rdb.Config(
    initial_delay=0.01, max_delay=0.05, max_retries=3, deadline=5.0, circuit_breaker=False
)


def prepare_as_plain_role(server: EmbeddedPostgres) -> None:
    """The ledger in database ``app``, owned by a plain login role, and the commit markers."""
    server.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
    server.create_database(DATABASE)
    server.execute(f"ALTER DATABASE {DATABASE} OWNER TO {ROLE}")
    engine = sa.create_engine(as_plain_role(server.url(DATABASE)))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(LEDGER_DDL))
        rdb.install_commit_markers(engine)
    finally:
        engine.dispose()


def as_plain_role(url: str | sa.URL) -> sa.URL:
    return sa.make_url(url).set(username=ROLE, password=PASSWORD)


def keys_on(server: EmbeddedPostgres) -> dict[str, int]:
    rows = server.execute("SELECT key, count(*) FROM ledger GROUP BY key", database=DATABASE)
    return {str(key): int(count) for key, count in rows}


def refused_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if getattr(r, "self_heal", {}).get("event") == "stale_timeline_refused"
    ]


def two_pooled(url: sa.URL, driver: str, service: str) -> contextlib.AbstractContextManager[Units]:
    """Units of a plain role on ``url`` through a pool of two connections, the most recently
    returned handed out next (a test holds one out and knows which the next unit gets)."""
    return units(
        as_plain_role(url),
        driver,
        config=CONFIG,
        service=service,
        pool_size=2,
        max_overflow=0,
        pool_use_lifo=True,
    )


@pytest.fixture
def split_pair(pg_standby_factory: Callable[..., StandbyPair]) -> StandbyPair:
    """An asynchronous pair (the old primary, restarted, waits for no standby), its ledger
    owned by a plain role."""
    pair = pg_standby_factory(synchronous=False)
    prepare_as_plain_role(pair.primary)
    pair.wait_replayed()
    return pair


@pytest.mark.parametrize("driver", DRIVERS)
def test_an_old_primary_back_as_a_primary_takes_no_unit(
    split_pair: StandbyPair, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """After the failover the engine has seen the new timeline; the old primary, restarted as
    a primary and listed first, is refused at connect (units fail as if it were down, named in
    one ERROR line), and units go on once it is stopped again."""
    pair = split_pair
    caplog.set_level(logging.INFO, logger="resilient_db")
    service = f"fencing-{driver}"
    url = as_plain_role(pair.url(DATABASE, driver=driver))
    with units(url, driver, config=CONFIG, service=service) as made:
        assert made.write("a") == pair.primary.port
        pair.wait_replayed()  # (asynchronous: "a" is on the standby before the crash)
        fail_over(pair)
        assert made.write("b") == pair.standby.port  # timeline 2 seen here
        pair.primary.start()  # not demoted: a second primary, on timeline 1
        pair.standby.terminate_backends()  # a disconnect: the next connections are new ones
        with pytest.raises(Exception) as raised:  # noqa: PT011 - the driver's, wrapped or not
            made.write("c")
        assert rdb.classify(raised.value) is rdb.Outcome.DISCONNECT, raised.value
        assert rdb.is_transient(raised.value)
        assert rdb.sqlstate_of(raised.value) == "08004", raised.value
        assert f"127.0.0.1:{pair.primary.port}" in str(raised.value)
        counters = rdb.health()["services"][service]["counters"]
        assert counters["stale_timeline_refusals"] == 1 + CONFIG.max_retries
        pair.primary.stop()  # fenced by hand at last: the next connections go to the new one
        assert made.write("d") == pair.standby.port
    pair.primary.start()  # (to look)
    assert keys_on(pair.primary) == {"a": 1}  # nothing landed on the old primary
    assert ledger(pair) == {"a": 1, "b": 1, "d": 1}
    lines = refused_lines(caplog)
    assert len(lines) == 1, [r.getMessage() for r in lines]  # rate-limited: one per server
    line = lines[0]
    assert line.levelno == logging.ERROR
    text = line.getMessage()
    assert text.startswith("[SELF-HEAL] Refused a connection to an old primary"), text
    assert f"127.0.0.1:{pair.primary.port} takes writes on timeline 1" in text, text
    assert f"timeline 2 of that cluster was seen at 127.0.0.1:{pair.standby.port}" in text


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_lost_commit_answer_on_the_new_primary_is_not_settled_on_the_old_one(
    split_pair: StandbyPair, driver: str
) -> None:
    """The COMMIT answer of a unit on the new primary is lost; the check's new connection goes
    to the old primary (listed first, back as a primary): refused there, so the unit is
    neither found missing there nor replayed there; while the old primary answers, the outcome
    stays unknown (the unit wrote once, on the new primary)."""
    pair = split_pair
    config = rdb.Config(
        initial_delay=0.01, max_delay=0.05, max_retries=5, deadline=2.0, circuit_breaker=False
    )
    with FaultProxy(pair.standby) as proxy:
        url = sa.make_url(pair.url(DATABASE, driver=driver)).update_query_dict(
            {"host": [f"{pair.primary.host}:{pair.primary.port}", f"{proxy.host}:{proxy.port}"]}
        )
        with units(as_plain_role(url), driver, config=config) as made:
            assert made.write("a") == pair.primary.port
            pair.wait_replayed()  # (asynchronous: "a" is on the standby before the crash)
            fail_over(pair)
            assert made.write("b") == pair.standby.port  # through the proxy: timeline 2
            pair.primary.start()  # a second primary, listed first
            proxy.lose_commit_answer()
            with pytest.raises(rdb.CommitOutcomeUnknownError):
                made.write("k")
    assert proxy.commits_lost == 1
    assert made.calls.count("k") == 1  # never replayed
    assert keys_on(pair.primary) == {"a": 1}
    assert ledger(pair) == {"a": 1, "b": 1, "k": 1}


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_restarted_server_and_a_new_cluster_at_its_address_are_not_refused(
    driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A server restarted (after a crash too) stays on its timeline: its connections are
    taken. A new cluster (another ``initdb``, so another system identifier) at the same
    address, on timeline 1 where the old one was on timeline 2, is not judged by the old
    cluster's timelines."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    with StandbyPair(synchronous=False) as pair:
        prepare_as_plain_role(pair.primary)
        pair.wait_replayed()
        fail_over(pair)  # the standby: timeline 2
        port = pair.standby.port
        url = as_plain_role(pair.standby.url(DATABASE, driver=driver))
        with units(url, driver, config=CONFIG) as made:
            assert made.write("a") == port
            pair.standby.restart(crash=True)  # the same cluster, the same timeline
            assert made.write("b") == port
            pair.close()  # its files deleted: the address is free for another cluster
            with EmbeddedPostgres(port=port) as other:
                prepare_as_plain_role(other)  # timeline 1 of a new cluster
                assert made.write("c") == port
                assert keys_on(other) == {"c": 1}
    assert made.calls == ["a", "b", "c"]
    assert refused_lines(caplog) == []


#: how a server keeps the cluster and timeline from the role: EXECUTE revoked from PUBLIC (a
#: hardening, a managed service), or a function it lacks (a server built from PostgreSQL that
#: does not give its WAL position: here renamed away in the application's database)
REFUSALS = {
    "42501": "REVOKE EXECUTE ON FUNCTION pg_catalog.pg_control_system() FROM PUBLIC",
    "42883": "ALTER FUNCTION pg_catalog.pg_walfile_name(pg_catalog.pg_lsn) RENAME TO gone",
}


@pytest.mark.parametrize("code", sorted(REFUSALS))
@pytest.mark.parametrize("driver", DRIVERS)
def test_a_role_that_may_not_read_the_timeline_connects_unfenced(
    driver: str, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The check at connect is refused the cluster and timeline (42501: the role may not call
    pg_control_system(); 42883: the server lacks pg_walfile_name()) and made again without
    them, once per engine; connections work, the commit markers are used, a WARNING says
    nothing is fenced, with the SQLSTATE."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    with EmbeddedPostgres() as server:
        prepare_as_plain_role(server)
        server.execute(REFUSALS[code], database=DATABASE)
        url = as_plain_role(server.url(DATABASE, driver=driver))
        with units(url, driver, config=CONFIG, pool_size=1, max_overflow=0) as made:
            assert made.write("a") == server.port
            server.terminate_backends()  # the next unit's connection is a new one
            assert made.write("b") == server.port
            assert keys_on(server) == {"a": 1, "b": 1}
    events = [getattr(r, "self_heal", {}).get("event") for r in caplog.records]
    assert events.count("timeline_unreadable") == 1, events
    (line,) = [
        r
        for r in caplog.records
        if getattr(r, "self_heal", {}).get("event") == "timeline_unreadable"
    ]
    assert line.self_heal["sqlstate"] == code  # type: ignore[attr-defined]
    assert "commit_markers_missing" not in events  # (the check answered: markers in use)
    assert "stale_timeline_refused" not in events


def test_the_cluster_is_asked_only_of_a_connection_off_the_highest_timeline(
    pg_url: str, service: str, tmp_path: Path
) -> None:
    """pg_control_system() reads the control file from disk at each call: a ``NullPool``
    engine would pay it on every unit. The check at connect reads the timeline alone; the
    cluster is asked (a second statement) of the first connection only, whose timeline the
    engine had not seen; the next connections, on that timeline, send the check alone."""
    eng = sa.create_engine(pg_url, poolclass=sa.NullPool)
    Sessions = rdb.ResilientSession(eng, service=service, config=CONFIG)
    paths: list[Path] = []

    def traced(dbapi_connection: Any, record: Any) -> None:  # before the factory's set-up
        path = tmp_path / f"trace-{len(paths)}"
        paths.append(path)
        handle = path.open("w")
        dbapi_connection.pgconn.trace(handle.fileno())
        dbapi_connection.pgconn.set_trace_flags(
            psycopg.pq.Trace.SUPPRESS_TIMESTAMPS | psycopg.pq.Trace.REGRESS_MODE
        )
        handles.append(handle)

    handles: list[Any] = []
    sa.event.listen(eng, "connect", traced, insert=True)
    try:
        for _ in range(3):
            assert Sessions.run(lambda s: s.execute(sa.text("SELECT 1")).scalar()) == 1
    finally:
        eng.dispose()
        for handle in handles:
            handle.close()
    assert len(paths) == 3  # a new connection per unit
    sent = [_client_messages(path.read_text()) for path in paths]
    checks = [[m for m in messages if "pg_walfile_name" in m] for messages in sent]
    assert [len(c) for c in checks] == [1, 1, 1], sent  # the check, with the timeline
    assert all("pg_control_system" not in m for c in checks for m in c), checks
    asked = [len([m for m in messages if "pg_control_system" in m]) for messages in sent]
    assert asked == [1, 0, 0], sent


def _client_messages(trace: str) -> list[str]:
    """The messages a libpq trace shows the client sent (a query's text may span lines)."""
    messages: list[str] = []
    for line in trace.splitlines():
        if line.startswith(("F\t", "B\t")):
            messages.append(line if line.startswith("F") else "")
        elif messages:
            messages[-1] += "\n" + line if messages[-1] else ""
    return [m for m in messages if m]


@contextmanager
def holding(made: Units) -> Iterator[None]:
    """One of ``made``'s pooled connections checked out (and given back at the end)."""
    if made.driver == "asyncpg":
        loop = made._runner
        assert loop is not None
        conn = loop.run_until_complete(made.engine.connect())
        try:
            yield
        finally:
            loop.run_until_complete(conn.close())
    else:
        with made.engine.connect():
            yield


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_pooled_connection_to_the_old_primary_is_refused_at_its_next_checkout(
    split_pair: StandbyPair, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection made to the old primary, back as a primary, before the engine saw the new
    timeline (it was not refused then: nothing said there was a newer one) stays in the pool;
    once another connection of the engine reached the promoted standby, the old one is refused
    at its next checkout as a new one would be (the same ERROR line and counter), in memory,
    and the pool replaces it: the unit goes to the new primary."""
    pair = split_pair
    caplog.set_level(logging.INFO, logger="resilient_db")
    service = f"fencing-pooled-{driver}"
    with FaultProxy(pair.primary) as proxy:
        url = sa.make_url(pair.url(DATABASE, driver=driver)).update_query_dict(
            {"host": [f"{proxy.host}:{proxy.port}", f"{pair.standby.host}:{pair.standby.port}"]}
        )
        with two_pooled(url, driver, service) as made:
            assert made.write("a") == pair.primary.port
            pair.wait_replayed()
            fail_over(pair)
            pair.primary.start()  # not demoted: a second primary, on timeline 1
            # its pooled connection died with it: the new one reaches it again (listed first),
            # and is taken, as the engine has seen no other timeline yet
            assert made.write("b") == pair.primary.port
            with holding(made):  # that connection, out of the pool
                proxy.refuse()  # (new connections only: the held one goes on)
                assert made.write("c") == pair.standby.port  # timeline 2 seen here
            # the old primary's connection is back in the pool, handed out next
            assert made.write("d") == pair.standby.port
            counters = rdb.health()["services"][service]["counters"]
            assert counters["stale_timeline_refusals"] == 1
    assert keys_on(pair.primary) == {"a": 1, "b": 1}  # nothing more landed there
    assert ledger(pair) == {"a": 1, "c": 1, "d": 1}
    (line,) = refused_lines(caplog)
    assert line.levelno == logging.ERROR
    text = line.getMessage()
    assert f"127.0.0.1:{proxy.port} takes writes on timeline 1" in text, text
    assert f"timeline 2 of that cluster was seen at 127.0.0.1:{pair.standby.port}" in text


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_pooled_connection_to_another_cluster_on_the_same_timeline_is_kept(
    split_pair: StandbyPair, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A URL whose hosts are two clusters, both on timeline 1: a connection to the second
    one, made while the first one's timeline 1 was the highest the engine had seen, is not
    taken for the first cluster's. Once the first cluster fails over (its standby reached on
    timeline 2), that pooled connection to the other cluster is judged by its own cluster at
    its next checkout and kept: nothing is refused, the unit runs there."""
    pair = split_pair
    caplog.set_level(logging.INFO, logger="resilient_db")
    service = f"fencing-two-clusters-{driver}"
    with (
        EmbeddedPostgres() as other,
        FaultProxy(pair.primary) as to_primary,
        FaultProxy(other) as to_other,
    ):
        prepare_as_plain_role(other)  # another initdb: its own timeline 1
        hosts = [to_primary, to_other, pair.standby]
        url = sa.make_url(pair.url(DATABASE, driver=driver)).update_query_dict(
            {"host": [f"{h.host}:{h.port}" for h in hosts]}
        )
        with two_pooled(url, driver, service) as made:
            assert made.write("a") == pair.primary.port  # cluster 1, timeline 1
            with holding(made):  # the primary's connection, out of the pool
                to_primary.refuse()
                assert made.write("b") == other.port  # cluster 2, timeline 1
            pair.wait_replayed()
            fail_over(pair)  # the primary's pooled connection died with it
            to_other.refuse()  # (new connections only: the pooled one goes on)
            with holding(made):  # a new connection, to the promoted standby: timeline 2
                # the other cluster's pooled connection, judged again: its cluster is not
                # the one that rose
                assert made.write("c") == other.port
            counters = rdb.health()["services"][service]["counters"]
            assert counters["stale_timeline_refusals"] == 0
        assert keys_on(other) == {"b": 1, "c": 1}
    assert ledger(pair) == {"a": 1}
    assert refused_lines(caplog) == []
