"""A fleet starting at once against one database (the instances of a deploy, workers of a
server): installs called by every process at startup, racing each other and the units of
processes already running.

Processes are real (``python -c``), killed at the end of each test whatever happens; waits are
for conditions (a backend waiting on a lock, seen in ``pg_locks``), bounded."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from processes import wait_for

import resilient_db as rdb
from resilient_db._commit import MARKERS_VERSION, _install_statements
from resilient_db.examples.tasks import Base, Task
from resilient_db.transitions._install import INSTALL_LOCK, INSTALL_LOCK_TIMEOUT
from resilient_db.transitions._rules import trigger_guards
from resilient_db.transitions._sql import online_install_statements

INSTALL_KEY = int(INSTALL_LOCK.rpartition("(")[2].rstrip(")"))
FLEET = 4  # (8 in the review that found it; interpreters cost seconds each here)


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    yield eng
    eng.dispose()


def _waiting_for_the_install_lock(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND database = (SELECT oid FROM pg_database"
                    " WHERE datname = current_database())"
                    " AND ((classid::bigint << 32) | objid::bigint) = :key"
                ),
                {"key": INSTALL_KEY},
            ).scalar_one()
        )


@contextlib.contextmanager
def _processes(script: str, url: str, count: int) -> Iterator[list[subprocess.Popen[str]]]:
    """``count`` interpreters running ``script`` (``URL`` is the database's), killed on leaving
    the block if still running."""
    started: list[subprocess.Popen[str]] = []
    try:
        for _ in range(count):
            started.append(
                subprocess.Popen(
                    [sys.executable, "-c", f"URL = {url!r}\n{script}"],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=30)


def _finished(processes: list[subprocess.Popen[str]]) -> list[tuple[int, str]]:
    """Each process's exit status and stderr, once it ended (bounded)."""
    return [(p.wait(timeout=60), p.communicate(timeout=30)[1]) for p in processes]


_INSTALL_MARKERS = """
import sqlalchemy as sa, resilient_db as rdb
engine = sa.create_engine(URL)
rdb.install_commit_markers(engine)
engine.dispose()
"""
_INSTALL_TRIGGER = """
import sqlalchemy as sa, resilient_db as rdb
from resilient_db.examples.tasks import Task
engine = sa.create_engine(URL)
rdb.install_transition_trigger(engine, Task)
engine.dispose()
"""

# The transaction that last wrote each object the installs make (their catalog rows' xmin): an
# install sends CREATE OR REPLACE, COMMENT, GRANT, DROP and CREATE TRIGGER, each a new row
_MARKERS_WRITTEN_BY = """SELECT array_agg(xmin::text ORDER BY what) FROM (
    SELECT 'function ' || proname AS what, xmin FROM pg_proc
     WHERE pronamespace = to_regnamespace('resilient_db')
    UNION ALL SELECT 'comment', xmin FROM pg_description
     WHERE objoid = to_regclass('resilient_db.commit_markers')
    UNION ALL SELECT 'schema', xmin FROM pg_namespace WHERE nspname = 'resilient_db') o"""
_TRIGGER_WRITTEN_BY = """SELECT array_agg(xmin::text ORDER BY what) FROM (
    SELECT 'trigger ' || tgname AS what, xmin FROM pg_trigger
     WHERE tgrelid = to_regclass('tasks') AND NOT tgisinternal
    UNION ALL SELECT 'function ' || proname, xmin FROM pg_proc
     WHERE starts_with(proname, 'rdb_transition')) o"""


@pytest.mark.slow  # (interpreters started)
@pytest.mark.parametrize("what", ["markers", "trigger"])
def test_a_fleet_installing_at_once_installs_once(
    pg_url: str, engine: sa.Engine, what: str
) -> None:
    """Every instance of a deploy calls the install at startup. Each looked whether the install
    was current before taking the install lock, so instances that looked while another was
    installing then installed again, one after the other (8 processes: 8 installs, each taking
    its locks on the guarded table while the others waited; a trigger's DROP TRIGGER is an
    ACCESS EXCLUSIVE lock). An install finds, once it holds the lock, that another has just
    done it, and sends nothing."""
    if what == "trigger":
        Base.metadata.create_all(engine)
    written_by = _MARKERS_WRITTEN_BY if what == "markers" else _TRIGGER_WRITTEN_BY
    script = _INSTALL_MARKERS if what == "markers" else _INSTALL_TRIGGER
    with engine.connect() as holder:
        # another instance, installing: it holds the lock until it commits
        holder.exec_driver_sql(INSTALL_LOCK)
        if what == "markers":
            statements = _install_statements()
        else:
            statements = online_install_statements(trigger_guards(Task)[0])
        for statement in statements:
            holder.exec_driver_sql(statement, execution_options={"no_parameters": True})
        with _processes(script, pg_url, FLEET) as fleet:
            # each has looked (nothing installed yet: the holder's install is not committed)
            # and waits for the lock
            wait_for(
                lambda: (
                    _waiting_for_the_install_lock(engine) == FLEET
                    or any(p.poll() is not None for p in fleet)
                ),
                "the fleet waiting for the install lock",
            )
            holder.commit()
            with engine.connect() as conn:
                installed = conn.exec_driver_sql(written_by).scalar_one()
            ended = _finished(fleet)
    assert ended == [(0, "")] * FLEET
    with engine.connect() as conn:
        assert conn.exec_driver_sql(written_by).scalar_one() == installed
        if what == "trigger":
            assert rdb.trigger_drift(conn, Task) is None


def test_an_install_waiting_for_a_later_releases_install_leaves_it(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A rolling deploy: an instance of this release looks, finds nothing current, and waits
    for the lock held by an instance of a later release that is installing its markers. It
    installed its own over them when it got the lock (a downgrade: the later release's
    instances then warned that the markers were outdated). It finds the later release's and
    leaves them, as it does when it finds them at its first look."""
    later = MARKERS_VERSION + 1
    outcome: list[BaseException | None] = []

    def install() -> None:
        try:
            rdb.install_commit_markers(engine)
            outcome.append(None)
        except BaseException as exc:  # collected for the assertion below
            outcome.append(exc)

    thread = threading.Thread(target=install)
    with engine.connect() as holder:
        holder.exec_driver_sql(INSTALL_LOCK)
        for statement in _install_statements():
            holder.exec_driver_sql(statement, execution_options={"no_parameters": True})
        holder.exec_driver_sql(
            f"COMMENT ON TABLE resilient_db.commit_markers IS "
            f"'resilient_db commit markers, version {later}: a later release'"
        )
        with caplog.at_level(logging.WARNING, logger="resilient_db"):
            thread.start()
            try:
                wait_for(
                    lambda: _waiting_for_the_install_lock(engine) == 1 or not thread.is_alive(),
                    "the install waiting for the lock",
                )
            finally:
                holder.commit()
                thread.join(timeout=60)
    assert outcome == [None]
    with engine.connect() as conn:
        comment = conn.exec_driver_sql(
            "SELECT obj_description('resilient_db.commit_markers'::regclass, 'pg_class')"
        ).scalar_one()
    assert f"version {later}" in comment
    said = [getattr(r, "self_heal", {}).get("event") for r in caplog.records]
    assert said.count("commit_markers_newer") == 1, said


# -- how long an install waits for a lock on a table ------------------------------------------


def _drifted_trigger(engine: sa.Engine) -> None:
    """The tasks table with its trigger installed, then disabled: drift, which an install
    through an Engine repairs (DROP TRIGGER and CREATE TRIGGER on the table)."""
    Base.metadata.create_all(engine)
    rdb.install_transition_trigger(engine, Task)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE tasks DISABLE TRIGGER USER")
        assert rdb.trigger_drift(conn, Task) is not None


def _waiting_for_a_table(engine: sa.Engine, table: str) -> int:
    """How many backends wait for a lock on ``table``."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'relation' AND NOT granted"
                    " AND relation = to_regclass(:table)"
                ),
                {"table": table},
            ).scalar_one()
        )


def _sqlstate(exc: BaseException | None) -> str | None:
    return getattr(getattr(exc, "orig", None), "sqlstate", None)


@pytest.mark.slow  # (the default lock_timeout runs out: seconds)
def test_a_trigger_install_behind_a_long_transaction_gives_up_and_lets_queries_through(
    engine: sa.Engine,
) -> None:
    """``DROP TRIGGER`` asks for an ACCESS EXCLUSIVE lock on the table: behind a transaction
    that had only read it (a long report), the install waited as long as that ran, and every
    query on the table that came after, a plain SELECT too, waited behind the install (the
    service stopped). The install's waits are bounded by default: it gives up (55P03, nothing
    installed) and the queries behind it go on, while the long transaction still runs."""
    _drifted_trigger(engine)
    outcome: dict[str, BaseException | int | None] = {}

    def install() -> None:
        try:
            rdb.install_transition_trigger(engine, Task)  # (the default lock_timeout)
            outcome["install"] = None
        except BaseException as exc:  # collected for the assertions below
            outcome["install"] = exc

    def read() -> None:
        try:
            with engine.connect() as conn:
                outcome["read"] = int(conn.exec_driver_sql("SELECT count(*) FROM tasks").scalar())
        except BaseException as exc:  # collected for the assertions below
            outcome["read"] = exc

    installing, reading = threading.Thread(target=install), threading.Thread(target=read)
    with engine.connect() as report:
        report.exec_driver_sql("SELECT count(*) FROM tasks")  # (its transaction stays open)
        installing.start()
        try:
            wait_for(
                lambda: _waiting_for_a_table(engine, "tasks") == 1 or not installing.is_alive(),
                "the install waiting for the table",
            )
            reading.start()  # behind the install's request
            installing.join(timeout=30)
            reading.join(timeout=30)
            # both ended while the report still runs
            assert not installing.is_alive()
            assert not reading.is_alive()
        finally:
            report.rollback()
            installing.join(timeout=30)
            if reading.is_alive() or reading.ident is not None:
                reading.join(timeout=30)
    assert _sqlstate(outcome["install"]) == "55P03", outcome
    assert outcome["read"] == 0
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Task) is not None  # nothing of the install is left
    rdb.install_transition_trigger(engine, Task)  # once the report is over
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Task) is None


def test_an_install_in_the_callers_transaction_keeps_its_shorter_lock_timeout_and_puts_it_back(
    engine: sa.Engine,
) -> None:
    """Through a Connection the install runs in the caller's transaction: a shorter
    ``lock_timeout`` of the caller's bounds it too, and the caller's setting is what the
    statements after the install run with."""
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL lock_timeout = '7s'")
        rdb.install_transition_trigger(conn, Task, lock_timeout=1.5)
        rdb.install_commit_markers(conn, lock_timeout=1.5)
        assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "7s"
    with engine.begin() as conn:
        rdb.install_transition_trigger(conn, Task)
        assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "0"
    _drifted_trigger(engine)
    with engine.connect() as report:
        report.exec_driver_sql("SELECT count(*) FROM tasks")
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SET lock_timeout = '50ms'")  # (the session's)
                conn.commit()
                with pytest.raises(sa.exc.OperationalError) as err:
                    rdb.install_transition_trigger(conn, Task, lock_timeout=60)
                assert _sqlstate(err.value) == "55P03"
                conn.rollback()
                assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "50ms"
        finally:
            report.rollback()


def test_an_uninstall_of_the_markers_behind_a_transaction_using_them_gives_up(
    engine: sa.Engine,
) -> None:
    """An uninstall's DROP TABLE asks for an ACCESS EXCLUSIVE lock on the markers, behind which
    every writing unit's COMMIT (its marker INSERT) waits: bounded, it gives up (55P03) and
    leaves the markers as they were."""
    rdb.install_commit_markers(engine)
    with engine.connect() as holder:
        holder.exec_driver_sql("SELECT count(*) FROM resilient_db.commit_markers")
        try:
            with pytest.raises(sa.exc.OperationalError) as err:
                rdb.uninstall_commit_markers(engine, lock_timeout=0.2)
            assert _sqlstate(err.value) == "55P03"
        finally:
            holder.rollback()
    with engine.connect() as conn:
        assert conn.exec_driver_sql(
            "SELECT to_regclass('resilient_db.commit_markers') IS NOT NULL"
        ).scalar()


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (-1, ValueError),
        (0, ValueError),
        (float("nan"), ValueError),
        ("5s", TypeError),
        # past PostgreSQL's largest lock_timeout (2147483647 ms): refused by the server, a
        # DataError quoting a number of milliseconds, once the install had begun
        (2_147_484, ValueError),
        (10**20, ValueError),
        (1e308, ValueError),
    ],
)
def test_a_bad_lock_timeout_is_refused_before_anything_is_sent(
    value: object, error: type[Exception]
) -> None:
    """Checked before any connection is made (the engine's URL leads nowhere)."""
    nowhere = sa.create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    for install in (
        lambda: rdb.install_commit_markers(nowhere, lock_timeout=value),  # type: ignore[arg-type]
        lambda: rdb.uninstall_commit_markers(nowhere, lock_timeout=value),  # type: ignore[arg-type]
        lambda: rdb.install_transition_trigger(nowhere, Task, lock_timeout=value),  # type: ignore[arg-type]
        lambda: rdb.uninstall_transition_trigger(nowhere, Task, lock_timeout=value),  # type: ignore[arg-type]
    ):
        with pytest.raises(error, match="lock_timeout must be"):
            install()


def test_the_default_lock_timeout_is_the_same_for_every_install() -> None:
    import inspect  # noqa: PLC0415 - only here

    defaults = {
        inspect.signature(f).parameters["lock_timeout"].default
        for f in (
            rdb.install_commit_markers,
            rdb.uninstall_commit_markers,
            rdb.install_transition_trigger,
            rdb.uninstall_transition_trigger,
        )
    }
    assert defaults == {INSTALL_LOCK_TIMEOUT}
