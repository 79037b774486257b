"""Settings a production server, database or role may have (the suite's own server runs on
defaults): the library's main paths under each, on both drivers. Applied as a DBA would, with
``ALTER DATABASE ... SET`` on the test's own database (dropped after the test) or
``ALTER ROLE ... SET`` on a role made for the test (dropped after it, failed or not)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from scenarios import add_expired_markers, expired_markers, server_settings_args
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb
from resilient_db.testing import FaultProxy, PostgresServer

pytestmark = pytest.mark.usefixtures("no_backoff")

#: state names a literal built carelessly would break on, or be injected through
NEW = "new"
QUOTED = "it's"
SLASHED = "back\\slash"
NASTY = "\\'); DROP TABLE settings_items; --"


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "settings_items"
    __table_args__ = {"schema": "public"}  # noqa: RUF012  (a search_path may be empty)
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(default=NEW)

    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={NEW: {QUOTED}, QUOTED: {SLASHED}, SLASHED: {NASTY}},
        initial={NEW},
    )


SERIALIZATION_FAILURE = (
    "CREATE FUNCTION public.settings_conflict() RETURNS void LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'try again' USING ERRCODE = '40001'; END $$"
)


def _set_up(url: str) -> None:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql(SERIALIZATION_FAILURE)
        rdb.install_commit_markers(engine)
        rdb.install_transition_trigger(engine, Item)
    finally:
        engine.dispose()


def _status(server: PostgresServer, database: str, key: int) -> str:
    rows = server.execute(
        "SELECT status FROM public.settings_items WHERE id = %s", params=[key], database=database
    )
    return str(rows[0][0])


def _alter_database(server: PostgresServer, database: str, settings: dict[str, str]) -> None:
    for name, value in settings.items():
        server.execute(f'ALTER DATABASE "{database}" SET {name} = {value}')


def run_sync_paths(
    server: PostgresServer, database: str, url: str, proxy: FaultProxy, service: str
) -> None:
    """Every main path of a sync factory, through ``proxy``."""
    engine = sa.create_engine(url)
    try:
        Sessions = rdb.ResilientSession(engine, service=service)
        assert Sessions.run(lambda s: s.execute(sa.text("SELECT 41 + 1")).scalar_one()) == 42

        def add(session: Session) -> None:
            session.add(Item(id=1))

        Sessions.run(add)
        calls: list[int] = []

        def move(session: Session, to: str) -> str:
            calls.append(1)
            item = session.get_one(Item, 1)
            item.status = to
            session.flush()
            return item.status

        proxy.lose_commit_answer()
        assert Sessions.run(move, QUOTED) == QUOTED
        assert proxy.commits_lost == 1
        assert len(calls) == 1  # settled by the marker, not replayed
        assert _status(server, database, 1) == QUOTED
        add_expired_markers(server, database, 5)
        Sessions._hooks.commit._next_prune = 0.0
        assert Sessions.run(move, SLASHED) == SLASHED
        assert expired_markers(server, database) == 0

        def raw_back(session: Session) -> None:
            session.execute(sa.text("UPDATE public.settings_items SET status = :s"), {"s": NEW})

        with pytest.raises(rdb.IllegalTransitionError) as refused:
            Sessions.run(raw_back)
        assert refused.value.via == "db"
        assert (refused.value.from_state, refused.value.to_state) == (SLASHED, NEW)
        tries: list[int] = []

        def conflict_once(session: Session) -> str:
            tries.append(1)
            if len(tries) == 1:
                session.execute(sa.text("SELECT public.settings_conflict()"))
            item = session.get_one(Item, 1)
            item.status = NASTY
            return item.status

        assert Sessions.run(conflict_once) == NASTY
        assert len(tries) == 2
        assert _status(server, database, 1) == NASTY
        counters = rdb.health()["services"][service]["counters"]
        assert counters["verified_commits"] == 1
        assert counters["retries"] == 1
        assert counters["gave_up"] == 0
        assert rdb.health()["healthy"]
    finally:
        engine.dispose()


async def run_async_paths(
    server: PostgresServer, database: str, url: str, proxy: FaultProxy, service: str
) -> None:
    """The same paths through an async factory."""
    engine = create_async_engine(url)
    try:
        Sessions = rdb.AsyncResilientSession(engine, service=service)

        async def read(session: AsyncSession) -> int:
            return int((await session.execute(sa.text("SELECT 41 + 1"))).scalar_one())

        assert await Sessions.run(read) == 42

        async def add(session: AsyncSession) -> None:
            session.add(Item(id=2))

        await Sessions.run(add)
        calls: list[int] = []

        async def move(session: AsyncSession, to: str) -> str:
            calls.append(1)
            item = await session.get_one(Item, 2)
            item.status = to
            await session.flush()
            return item.status

        proxy.lose_commit_answer()
        assert await Sessions.run(move, QUOTED) == QUOTED
        assert proxy.commits_lost == 1
        assert len(calls) == 1
        assert _status(server, database, 2) == QUOTED
        add_expired_markers(server, database, 5)
        Sessions._hooks.commit._next_prune = 0.0
        assert await Sessions.run(move, SLASHED) == SLASHED
        pruning = Sessions._hooks.commit.pruning
        assert pruning is not None
        await pruning
        assert expired_markers(server, database) == 0

        async def raw_back(session: AsyncSession) -> None:
            await session.execute(
                sa.text("UPDATE public.settings_items SET status = :s WHERE id = 2"), {"s": NEW}
            )

        with pytest.raises(rdb.IllegalTransitionError) as refused:
            await Sessions.run(raw_back)
        assert refused.value.via == "db"
        tries: list[int] = []

        async def conflict_once(session: AsyncSession) -> str:
            tries.append(1)
            if len(tries) == 1:
                await session.execute(sa.text("SELECT public.settings_conflict()"))
            item = await session.get_one(Item, 2)
            item.status = NASTY
            return item.status

        assert await Sessions.run(conflict_once) == NASTY
        assert len(tries) == 2
        counters = rdb.health()["services"][service]["counters"]
        assert counters["verified_commits"] == 1
        assert counters["gave_up"] == 0
        assert rdb.health()["healthy"]
    finally:
        await engine.dispose()


SETTINGS: dict[str, dict[str, str]] = {
    "no-standard-strings": {
        "standard_conforming_strings": "off",
        "backslash_quote": "on",
        "escape_string_warning": "on",
    },
    "serializable": {"default_transaction_isolation": "'serializable'"},
    "repeatable-read": {"default_transaction_isolation": "'repeatable read'"},
    # tight as production roles have them, yet above what a statement of these paths takes on
    # a loaded 2-core machine (50 ms and a 300 ms transaction cut the trigger's install there)
    "timeouts": {
        "statement_timeout": "'500ms'",
        "lock_timeout": "'100ms'",
        "idle_in_transaction_session_timeout": "'1s'",
        "transaction_timeout": "'2s'",
    },
    "empty-search-path": {"search_path": "''"},
    "chatty": {"client_min_messages": "debug5", "log_min_messages": "debug5"},
    "async-commit": {"synchronous_commit": "off"},
    "local-commit": {"synchronous_commit": "local"},
    "remote-apply": {"synchronous_commit": "remote_apply"},
    "odd-styles": {
        "DateStyle": "'SQL, DMY'",
        "TimeZone": "'Asia/Kathmandu'",
        "IntervalStyle": "'sql_standard'",
        "bytea_output": "'escape'",
        "extra_float_digits": "'-15'",
    },
    "generic-plans": {"plan_cache_mode": "force_generic_plan"},
    "jit": {
        "jit": "on",
        "jit_above_cost": "0",
        "jit_inline_above_cost": "0",
        "jit_optimize_above_cost": "0",
    },
}


#: the settings of a newer PostgreSQL than some servers the suite runs on: their cases need it
#: (skipped on older servers, naming the setting)
NEEDS: dict[str, pytest.MarkDecorator] = {
    "timeouts": pytest.mark.server_version(17, "transaction_timeout"),
}


def _cases(names: list[str]) -> list[Any]:
    """``names`` as parameters, each marked with what it needs (:data:`NEEDS`)."""
    return [pytest.param(name, marks=NEEDS.get(name, ())) for name in names]


@pytest.mark.parametrize("name", _cases(list(SETTINGS)))
def test_sync_paths_under_a_databases_settings(
    name: str, pg_server: PostgresServer, pg_database: str, fault_proxy: FaultProxy, service: str
) -> None:
    _alter_database(pg_server, pg_database, SETTINGS[name])
    _set_up(pg_server.url(pg_database))
    run_sync_paths(pg_server, pg_database, fault_proxy.url(pg_database), fault_proxy, service)


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
@pytest.mark.parametrize("name", _cases(list(SETTINGS)))
async def test_async_paths_under_a_databases_settings(
    *,
    name: str,
    driver: str,
    pg_server: PostgresServer,
    pg_database: str,
    fault_proxy: FaultProxy,
    service: str,
) -> None:
    _alter_database(pg_server, pg_database, SETTINGS[name])
    _set_up(pg_server.url(pg_database))
    await run_async_paths(
        pg_server, pg_database, fault_proxy.url(pg_database, driver=driver), fault_proxy, service
    )


@pytest.fixture
def role(pg_server: PostgresServer, pg_database: str) -> Iterator[str]:
    """A login role made for the test, granted the test's table and the markers (its
    ``ALTER ROLE ... SET`` settings, and a schema ``app`` a test made, go with it)."""
    name = "rdb_settings_" + uuid.uuid4().hex[:8]
    pg_server.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{name}'")
    try:
        _set_up(pg_server.url(pg_database))
        pg_server.execute(
            f"GRANT SELECT, INSERT, UPDATE ON public.settings_items TO {name}; "
            f"GRANT SELECT, INSERT ON resilient_db.commit_markers TO {name}",
            database=pg_database,
        )
        yield name
    finally:
        pg_server.execute("DROP SCHEMA IF EXISTS app CASCADE", database=pg_database)
        pg_server.execute(f"DROP OWNED BY {name}", database=pg_database)
        pg_server.execute(f"DROP ROLE {name}")


def _as_role(url: str, role: str) -> str:
    return sa.make_url(url).set(username=role, password=role).render_as_string(hide_password=False)


@pytest.mark.parametrize("name", _cases(["timeouts", "chatty", "serializable"]))
def test_sync_paths_under_a_roles_settings(
    *,
    name: str,
    pg_server: PostgresServer,
    pg_database: str,
    role: str,
    fault_proxy: FaultProxy,
    service: str,
) -> None:
    for setting, value in SETTINGS[name].items():
        pg_server.execute(f"ALTER ROLE {role} SET {setting} = {value}")
    url = _as_role(fault_proxy.url(pg_database), role)
    run_sync_paths(pg_server, pg_database, url, fault_proxy, service)


#: functions, tables and an operator named as the library's and as built-ins it calls, in a
#: schema the role puts first on its search_path: none of them may run in the library's SQL
PLANTED = [
    "CREATE TABLE app.commit_markers (id uuid, fence boolean)",
    "CREATE TABLE app.commit_markers_born (born timestamptz)",
    *(
        f"CREATE FUNCTION app.{signature} RETURNS {returns} LANGUAGE plpgsql AS "
        f"$$ BEGIN RAISE EXCEPTION 'planted {signature}'; END $$"
        for signature, returns in [
            ("mark_commit(uuid)", "void"),
            ("mark_commit(uuid, boolean)", "void"),
            ("claim_commit(uuid, integer)", "text"),
            ("prune_commit_markers(integer)", "integer"),
            ("set_config(text, text, boolean)", "text"),
            ("current_setting(text)", "text"),
            ("now()", "timestamptz"),
            ("clock_timestamp()", "timestamptz"),
            ("pg_current_xact_id()", "xid8"),
            ("pg_current_xact_id_if_assigned()", "xid8"),
            ("pg_is_in_recovery()", "boolean"),
            ("uuid_eq(uuid, uuid)", "boolean"),
        ]
    ),
    "CREATE OPERATOR app.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = app.uuid_eq)",
]


@pytest.mark.parametrize("path", ["app, public", "app, pg_catalog, public"])
def test_a_schema_first_on_the_roles_search_path_shadows_nothing_of_the_librarys(
    *,
    path: str,
    pg_server: PostgresServer,
    pg_database: str,
    role: str,
    fault_proxy: FaultProxy,
    service: str,
) -> None:
    pg_server.execute(
        f"CREATE SCHEMA app AUTHORIZATION {role}; " + "; ".join(PLANTED), database=pg_database
    )
    pg_server.execute(f"ALTER ROLE {role} SET search_path = {path}")
    url = _as_role(fault_proxy.url(pg_database), role)
    run_sync_paths(pg_server, pg_database, url, fault_proxy, service)


# -- transactions read-only by default for the login (ALTER ROLE, the URL's options) ----------
def _read_only_login(server: PostgresServer, role: str, how: str) -> dict[str, Any]:
    """The role's transactions read-only by default: by ``ALTER ROLE ... SET`` (``role``), or
    by the connection's own options (``url``: the ``connect_args`` to give the engine)."""
    if how == "role":
        server.execute(f"ALTER ROLE {role} SET default_transaction_read_only = on")
        return {}
    return {"connect_args": {"options": "-c default_transaction_read_only=on"}}


def _assert_raised_at_once(service: str) -> None:
    """The write refused (25006) was the unit's: raised at once, nothing replaced, retried or
    counted by the breaker (before, taken for a server that takes no writes, it was replayed
    with backoff, the pool replaced at every attempt, and a few such units opened the breaker
    for every unit of the service, reads too)."""
    entry = rdb.health()["services"][service]
    assert entry["counters"]["retries"] == 0
    assert entry["counters"]["pool_invalidations"] == 0
    assert entry["counters"]["gave_up"] == 0
    assert entry["breaker"]["failures"] == 0


@pytest.mark.parametrize("how", ["role", "url"])
def test_a_login_read_only_by_default_reads_writes_when_asked_and_its_write_is_raised_at_once(
    *,
    how: str,
    pg_server: PostgresServer,
    pg_database: str,
    role: str,
    fault_proxy: FaultProxy,
    service: str,
) -> None:
    engine = sa.create_engine(
        _as_role(fault_proxy.url(pg_database), role), **_read_only_login(pg_server, role, how)
    )
    try:
        Sessions = rdb.ResilientSession(engine, service=service)
        assert Sessions.run(lambda s: s.execute(sa.text("SELECT 41 + 1")).scalar_one()) == 42
        calls: list[int] = []

        def add(session: Session) -> None:
            calls.append(1)
            session.add(Item(id=1))

        with pytest.raises(sa.exc.InternalError) as refused:
            Sessions.run(add)
        assert rdb.sqlstate_of(refused.value) == "25006"
        assert not rdb.is_transient(refused.value)
        assert len(calls) == 1
        _assert_raised_at_once(service)

        def add_read_write(session: Session, key: int, status: str = NEW) -> None:
            calls.append(1)
            session.execute(sa.text("SET TRANSACTION READ WRITE"))
            if key == 1:
                session.add(Item(id=1))
            else:
                session.get_one(Item, 1).status = status

        calls.clear()
        fault_proxy.lose_commit_answer()
        Sessions.run(add_read_write, 1)
        assert fault_proxy.commits_lost == 1
        assert len(calls) == 1  # settled by the marker (a claim that begins READ WRITE)
        assert _status(pg_server, pg_database, 1) == NEW
        add_expired_markers(pg_server, pg_database, 5)
        Sessions._hooks.commit._next_prune = 0.0
        Sessions.run(add_read_write, 2, QUOTED)
        assert expired_markers(pg_server, pg_database) == 0

        def raw_back(session: Session) -> None:
            session.execute(sa.text("SET TRANSACTION READ WRITE"))
            session.execute(sa.text("UPDATE public.settings_items SET status = :s"), {"s": NEW})

        with pytest.raises(rdb.IllegalTransitionError):
            Sessions.run(raw_back)
        counters = rdb.health()["services"][service]["counters"]
        assert counters["verified_commits"] == 1
        assert rdb.health()["healthy"]
    finally:
        engine.dispose()


@pytest.mark.parametrize("how", ["role", "url"])
def test_a_login_read_only_by_default_is_told_apart_on_the_drivers_own_connection(
    *, how: str, pg_server: PostgresServer, pg_database: str, role: str, service: str
) -> None:
    """A write on psycopg's own connection inside a unit reaches no ``handle_error`` and the
    server is not asked: what decides is where the login's read-only default comes from, noted
    at connect (the role's or the URL's settings: the unit's own write, raised at once; not a
    server that takes no writes, which would be replayed and counted by the breaker)."""
    engine = sa.create_engine(
        _as_role(pg_server.url(pg_database), role), **_read_only_login(pg_server, role, how)
    )
    calls: list[int] = []

    def raw(session: Session) -> None:
        calls.append(1)
        driver = session.connection().connection.driver_connection
        driver.execute("INSERT INTO public.settings_items (id, status) VALUES (7, 'new')")

    try:
        Sessions = rdb.ResilientSession(engine, service=service)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as refused:  # unwrapped
            Sessions.run(raw)
        assert rdb.classify(refused.value) is rdb.Outcome.NOT_TRANSIENT
        assert len(calls) == 1
        _assert_raised_at_once(service)
    finally:
        engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
@pytest.mark.parametrize("how", ["role", "url"])
async def test_async_a_login_read_only_by_default_reads_writes_when_asked_and_its_write_is_raised(
    *,
    how: str,
    driver: str,
    pg_server: PostgresServer,
    pg_database: str,
    role: str,
    fault_proxy: FaultProxy,
    service: str,
) -> None:
    kwargs = _read_only_login(pg_server, role, how)
    if kwargs:
        kwargs = {"connect_args": server_settings_args(driver, default_transaction_read_only="on")}
    engine = create_async_engine(
        _as_role(fault_proxy.url(pg_database, driver=driver), role), **kwargs
    )
    try:
        Sessions = rdb.AsyncResilientSession(engine, service=service)

        async def read(session: AsyncSession) -> int:
            return int((await session.execute(sa.text("SELECT 41 + 1"))).scalar_one())

        assert await Sessions.run(read) == 42
        calls: list[int] = []

        async def add(session: AsyncSession) -> None:
            calls.append(1)
            session.add(Item(id=1))

        with pytest.raises(sa.exc.DBAPIError) as refused:
            await Sessions.run(add)
        assert rdb.sqlstate_of(refused.value) == "25006"
        assert len(calls) == 1
        _assert_raised_at_once(service)

        async def add_read_write(session: AsyncSession) -> None:
            calls.append(1)
            await session.execute(sa.text("SET TRANSACTION READ WRITE"))
            session.add(Item(id=1))

        calls.clear()
        fault_proxy.lose_commit_answer()
        await Sessions.run(add_read_write)
        assert fault_proxy.commits_lost == 1
        assert len(calls) == 1
        assert _status(pg_server, pg_database, 1) == NEW
        assert rdb.health()["services"][service]["counters"]["verified_commits"] == 1
    finally:
        await engine.dispose()


# -- session_replication_role = replica: no ordinary trigger fires ----------------------------
def _without_triggers() -> int:
    return int(rdb.health()["transitions"]["connections_without_triggers"])


def _triggers_off(events: list[rdb.SelfHealEvent]) -> list[rdb.SelfHealEvent]:
    return [e for e in events if e.name == "triggers_off"]


def test_under_session_replication_role_replica_the_flush_guard_still_refuses(
    pg_server: PostgresServer, pg_database: str, service: str, events: list[rdb.SelfHealEvent]
) -> None:
    """PostgreSQL fires no ordinary trigger, the guard's included, in a session whose
    ``session_replication_role`` is ``replica`` (only a superuser, or a role granted SET on
    it, can have it: docs/security.md): raw SQL moves past the rules there, as documented; the
    ORM's paths are still judged by the client. The check at connect reads the setting: a
    warning once per engine (``triggers_off``), each such connection counted in
    ``health()``."""
    _set_up(pg_server.url(pg_database))
    before = _without_triggers()
    engine = sa.create_engine(pg_server.url(pg_database))
    try:
        Sessions = rdb.ResilientSession(engine, service=service)
        Sessions.run(lambda s: s.add(Item(id=1)))
        assert not _triggers_off(events)  # (the default: origin)
        assert _without_triggers() == before
    finally:
        engine.dispose()
    pg_server.execute(f'ALTER DATABASE "{pg_database}" SET session_replication_role = replica')
    engine = sa.create_engine(pg_server.url(pg_database))
    try:
        Sessions = rdb.ResilientSession(engine, service=service)

        def skip(session: Session) -> None:
            session.get_one(Item, 1).status = SLASHED

        with pytest.raises(rdb.IllegalTransitionError) as refused:
            Sessions.run(skip)
        assert refused.value.via == "flush"
        Sessions.run(
            lambda s: s.execute(
                sa.text("UPDATE public.settings_items SET status = :s"), {"s": NASTY}
            )
        )
        assert _status(pg_server, pg_database, 1) == NASTY  # the trigger did not fire
        said = _triggers_off(events)
        assert len(said) == 1, said
        assert said[0].level == logging.WARNING
        assert said[0].service == service
        assert pg_database in said[0].message
        assert "session_replication_role is replica" in said[0].message
        assert _without_triggers() == before + 1  # (one connection so far)
        engine.dispose()  # a new connection: counted, not said again
        Sessions.run(lambda s: s.get_one(Item, 1))
        assert _without_triggers() == before + 2
        assert len(_triggers_off(events)) == 1
    finally:
        engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_async_a_connection_under_session_replication_role_replica_is_said(
    pg_server: PostgresServer,
    pg_database: str,
    service: str,
    driver: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    """The async factory's connections are checked alike (asyncpg and psycopg)."""
    _set_up(pg_server.url(pg_database))
    pg_server.execute(f'ALTER DATABASE "{pg_database}" SET session_replication_role = replica')
    before = _without_triggers()
    engine = create_async_engine(pg_server.url(pg_database, driver=driver))
    try:
        Sessions = rdb.AsyncResilientSession(engine, service=service)

        async def raw(session: AsyncSession) -> None:
            session.add(Item(id=1))
            await session.flush()
            await session.execute(
                sa.text("UPDATE public.settings_items SET status = :s"), {"s": NASTY}
            )

        await Sessions.run(raw)
        assert _status(pg_server, pg_database, 1) == NASTY  # the trigger did not fire
        said = _triggers_off(events)
        assert len(said) == 1, said
        assert pg_database in said[0].message
        assert _without_triggers() == before + 1
    finally:
        await engine.dispose()
