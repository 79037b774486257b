"""Commit markers another role planted: a role with CREATE on the database (and nothing else)
creates schema ``resilient_db`` before ``install_commit_markers`` runs, or plants the whole
current set of objects with a ``claim_commit`` of its own. Such a claim answers "not committed"
for a committed unit (replayed: written twice) and runs with the rights of whoever asks it.

The install refuses objects owned by a role that is neither the installing role, a superuser
nor the database's owner, naming it; a connection uses the markers only when every object they
rely on is owned by a superuser, the database's owner or the role it logs in as, and says why
not otherwise. Real server, real roles.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db import _commit
from resilient_db.testing import FaultProxy

pytestmark = pytest.mark.usefixtures("no_backoff")

#: a claim that says every unit it is asked about did not commit, and notes whose rights it
#: ran with (it runs with the caller's: a superuser operator's, when settling by hand)
LIAR_CLAIM = """
CREATE OR REPLACE FUNCTION resilient_db.claim_commit(marker uuid, wait_ms integer)
RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.loot VALUES (current_user);
    RETURN 'fenced';
END $$"""


@dataclass
class Role:
    name: str
    url: str

    def engine(self, **kwargs: Any) -> sa.Engine:
        return sa.create_engine(self.url, **kwargs)


@pytest.fixture
def admin(pg_url: str) -> Iterator[sa.Engine]:
    """The superuser the suite's server runs as, on this test's database; a counter to bump and
    a table where a planted claim notes whose rights it ran with."""
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE counters (id int PRIMARY KEY, value int NOT NULL)")
        conn.exec_driver_sql("INSERT INTO counters VALUES (1, 0)")
        conn.exec_driver_sql("CREATE TABLE public.loot (who text)")
        conn.exec_driver_sql("GRANT INSERT ON public.loot TO PUBLIC")
        conn.exec_driver_sql("GRANT SELECT, UPDATE ON counters TO PUBLIC")
    yield engine
    engine.dispose()


@pytest.fixture
def make_role(admin: sa.Engine, pg_url: str, pg_database: str) -> Iterator[Any]:
    """``make_role(*grants)``: a login role of its own (dropped after the test); ``grants`` are
    statements run as the admin with ``{role}`` standing for its name."""
    made: list[str] = []

    def make(*grants: str) -> Role:
        name = f"rdb_owner_{uuid.uuid4().hex[:8]}"
        password = uuid.uuid4().hex
        with admin.begin() as conn:
            conn.exec_driver_sql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
            made.append(name)
            for grant in grants:
                conn.exec_driver_sql(grant.format(role=name, database=pg_database))
        url = sa.make_url(pg_url).set(username=name, password=password)
        return Role(name, url.render_as_string(hide_password=False))

    yield make
    admin.dispose()
    with admin.begin() as conn:
        conn.exec_driver_sql(f'ALTER DATABASE "{pg_database}" OWNER TO CURRENT_USER')
        for name in made:
            conn.exec_driver_sql(f"DROP OWNED BY {name} CASCADE")
            conn.exec_driver_sql(f"DROP ROLE {name}")


@pytest.fixture
def mallory(make_role: Any) -> Role:
    """A role that may create schemas in the database, and nothing more."""
    role: Role = make_role('GRANT CREATE ON DATABASE "{database}" TO {role}')
    return role


def _plant_everything(mallory: Role) -> None:
    """Mallory installs the current markers herself (her own install: nothing was there), then
    swaps in her claim; she lets everyone use them."""
    engine = mallory.engine()
    try:
        rdb.install_commit_markers(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql(LIAR_CLAIM)
            conn.exec_driver_sql("GRANT SELECT, INSERT ON resilient_db.commit_markers TO PUBLIC")
    finally:
        engine.dispose()


def _exists(engine: sa.Engine, sql: str) -> bool:
    with engine.connect() as conn:
        return bool(conn.exec_driver_sql(sql).scalar())


def _bump(session: Session) -> int:
    value = session.execute(
        sa.text("UPDATE counters SET value = value + 1 WHERE id = 1 RETURNING value")
    ).scalar_one()
    return int(value)


def _counter(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT value FROM counters").scalar_one())


def _loot(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return [str(r[0]) for r in conn.exec_driver_sql("SELECT who FROM public.loot")]


def _untrusted_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if getattr(r, "self_heal", {}).get("event") == "commit_markers_untrusted"
    ]


def _install_through(admin: sa.Engine, through: str) -> None:
    if through == "engine":
        rdb.install_commit_markers(admin)
        return
    with admin.begin() as conn:
        rdb.install_commit_markers(conn)


@pytest.mark.parametrize("through", ["engine", "connection"])
def test_the_install_refuses_a_schema_another_role_created(
    admin: sa.Engine, mallory: Role, through: str
) -> None:
    """Mallory creates the schema and a claim of hers before the install. Before: the install
    (here as a superuser) went ahead, kept her schema and replaced her function's body but not
    its owner, so she could swap it again at any time. Now it refuses before creating anything,
    naming the schema's owner and her function."""
    engine = mallory.engine()
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE SCHEMA resilient_db")
            conn.exec_driver_sql(LIAR_CLAIM)
    finally:
        engine.dispose()
    with pytest.raises(sa.exc.ProgrammingError) as info:
        _install_through(admin, through)
    message = str(info.value)
    assert f"schema resilient_db is owned by role {mallory.name}" in message
    assert f"claim_commit(uuid,integer) is owned by role {mallory.name}" in message
    assert "DROP SCHEMA resilient_db CASCADE" in message
    assert not _exists(admin, "SELECT to_regclass('resilient_db.commit_markers') IS NOT NULL")


def test_a_planted_current_install_is_refused_by_the_install_and_not_used(
    *,
    admin: sa.Engine,
    mallory: Role,
    fault_proxy: FaultProxy,
    pg_database: str,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Mallory plants the whole current install, her claim lying "fenced". Before: the
    superuser's ``install_commit_markers(engine)`` found it current and sent nothing, the
    engine used it, and a unit whose COMMIT answer was lost was replayed on her word: written
    twice, and her claim ran as the superuser. Now the install refuses, naming her, and the
    engine verifies by transaction id instead (once written, not replayed), saying why."""
    _plant_everything(mallory)
    caplog.set_level(logging.WARNING, logger="resilient_db")
    proxied = sa.create_engine(fault_proxy.url(pg_database))
    Sessions = rdb.ResilientSession(proxied, service=service)
    calls: list[int] = []

    def bump(session: Session) -> int:
        calls.append(1)
        return _bump(session)

    try:
        assert Sessions.run(bump) == 1
        with proxied.connect() as conn:
            mode = conn.connection.driver_connection._rdb_mode
        fault_proxy.lose_commit_answer()
        Sessions.run(bump)
        assert fault_proxy.commits_lost == 1
    finally:
        proxied.dispose()
    assert _loot(admin) == []  # her claim never ran (before: it ran as the superuser)
    assert len(calls) == 2  # verified by xid, not replayed (before: replayed on her word)
    assert _counter(admin) == 2
    assert mode == _commit.XID
    (line,) = _untrusted_lines(caplog)
    assert f"schema resilient_db is owned by role {mallory.name}" in line
    assert f"function resilient_db.claim_commit(uuid, integer) is owned by role {mallory.name}" in (
        line
    )
    assert "not used" in line
    with pytest.raises(sa.exc.ProgrammingError, match=f"owned by role {mallory.name}"):
        rdb.install_commit_markers(admin)


def test_asyncpg_does_not_use_a_planted_install_either(
    admin: sa.Engine,
    mallory: Role,
    pg_async_url: str,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _plant_everything(mallory)
    caplog.set_level(logging.WARNING, logger="resilient_db")

    async def bump(session: AsyncSession) -> int:
        value = (
            await session.execute(
                sa.text("UPDATE counters SET value = value + 1 WHERE id = 1 RETURNING value")
            )
        ).scalar_one()
        return int(value)

    async def main() -> str:
        engine = create_async_engine(pg_async_url)
        try:
            Sessions = rdb.AsyncResilientSession(engine, service=service)
            assert await Sessions.run(bump) == 1
            async with engine.connect() as conn:
                raw = await conn.get_raw_connection()
                return str(raw.driver_connection._rdb_mode)
        finally:
            await engine.dispose()

    assert asyncio.run(main()) == _commit.XID
    (line,) = _untrusted_lines(caplog)
    assert f"owned by role {mallory.name}" in line


def test_the_application_role_calling_the_install_over_a_plant_is_not_fooled(
    admin: sa.Engine, mallory: Role, make_role: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An application role without CREATE on the database calls the install at startup (the
    quickstart): over a plant it can do nothing about, the call sends nothing and raises
    nothing, and its connections don't use the planted objects (a warning names the owner)."""
    _plant_everything(mallory)
    app = make_role()
    caplog.set_level(logging.WARNING, logger="resilient_db")
    engine = app.engine()
    try:
        rdb.install_commit_markers(engine)
        Sessions = rdb.ResilientSession(engine, service="markers-owner-app")
        assert Sessions.run(_bump) == 1
        with engine.connect() as conn:
            assert conn.connection.driver_connection._rdb_mode == _commit.XID
    finally:
        engine.dispose()
    (line,) = _untrusted_lines(caplog)
    assert f"owned by role {mallory.name}" in line


def test_markers_installed_by_the_database_owner_are_used_by_the_application_role(
    admin: sa.Engine, make_role: Any, pg_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The usual production set-up keeps working: the database's owner (not a superuser)
    installs, the application role (only the documented grants) calls the install at startup
    (nothing to do) and uses the markers, with no warning."""
    owner = make_role('ALTER DATABASE "{database}" OWNER TO {role}')
    app = make_role()
    owner_engine = owner.engine()
    try:
        rdb.install_commit_markers(owner_engine)
        rdb.install_commit_markers(owner_engine)  # again: current, its own
        with owner_engine.begin() as conn:
            conn.exec_driver_sql(
                f"GRANT SELECT, INSERT ON resilient_db.commit_markers TO {app.name}"
            )
    finally:
        owner_engine.dispose()
    caplog.set_level(logging.WARNING, logger="resilient_db")
    engine = app.engine()
    try:
        rdb.install_commit_markers(engine)  # current: nothing sent
        Sessions = rdb.ResilientSession(engine, service="markers-owner-db")
        assert Sessions.run(_bump) == 1
        with engine.connect() as conn:
            assert conn.connection.driver_connection._rdb_mode == _commit.MARKERS
    finally:
        engine.dispose()
    assert _untrusted_lines(caplog) == []
    assert not [r for r in caplog.records if "not installed" in r.getMessage()]


def test_a_superuser_reinstalls_over_the_database_owners_markers(
    admin: sa.Engine, make_role: Any, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Objects of the database's owner are trusted by the install too: a superuser may
    install again over them (an upgrade run by the DBA: not refused with 42501), and its
    connections use them, with no warning."""
    owner = make_role('ALTER DATABASE "{database}" OWNER TO {role}')
    owner_engine = owner.engine()
    try:
        rdb.install_commit_markers(owner_engine)
    finally:
        owner_engine.dispose()
    caplog.set_level(logging.WARNING, logger="resilient_db")
    with admin.begin() as conn:
        rdb.install_commit_markers(conn)
    engine = sa.create_engine(pg_url)  # (connections made after the install)
    try:
        Sessions = rdb.ResilientSession(engine, service="markers-owner-dba")
        assert Sessions.run(_bump) == 1
        with engine.connect() as conn:
            assert conn.connection.driver_connection._rdb_mode == _commit.MARKERS
    finally:
        engine.dispose()
    assert _untrusted_lines(caplog) == []


def _counting_owner_checks(admin: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Count, in the database, each time an engine asks who owns the markers' objects (a
    sequence advanced by the same query); returns a function reading the count."""
    with admin.begin() as conn:
        conn.exec_driver_sql("CREATE SEQUENCE public.owner_checks")
        conn.exec_driver_sql("GRANT USAGE, SELECT ON SEQUENCE public.owner_checks TO PUBLIC")
    asked = getattr(_commit, "_owners_sql", None)  # (none where asked at every connection)

    def counted(owner: str | None) -> str:
        assert asked is not None
        return f"{asked(owner)}, pg_catalog.nextval('public.owner_checks')"

    monkeypatch.setattr(_commit, "_owners_sql", counted, raising=False)

    def count() -> int:
        with admin.connect() as conn:
            row = conn.exec_driver_sql("SELECT last_value, is_called FROM public.owner_checks")
            last, called = row.one()
            return int(last) if called else 0

    return count


def test_owners_are_asked_once_per_set_of_objects_never_when_nothing_is_installed(
    admin: sa.Engine,
    mallory: Role,
    service: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The owners' lookups cost a new backend milliseconds: asked at every connection, they
    weighed on every unit of a NullPool engine (before: on every one, and most of all where no
    markers are installed, the default). Now: never while nothing is installed, once for a
    trusted install, once for an untrusted one (warned once)."""
    owner_checks = _counting_owner_checks(admin, monkeypatch)
    caplog.set_level(logging.WARNING, logger="resilient_db")

    def units(engine: sa.Engine, n: int) -> str:
        Sessions = rdb.ResilientSession(engine, service=service)
        for _ in range(n):
            Sessions.run(_bump)
        with engine.connect() as conn:
            return str(conn.connection.driver_connection._rdb_mode)

    bare = sa.create_engine(admin.url, poolclass=sa.pool.NullPool)
    try:
        assert units(bare, 5) == _commit.XID
    finally:
        bare.dispose()
    assert owner_checks() == 0  # nothing installed: nothing to ask

    _plant_everything(mallory)
    planted = sa.create_engine(admin.url, poolclass=sa.pool.NullPool)
    try:
        assert units(planted, 5) == _commit.XID
    finally:
        planted.dispose()
    assert owner_checks() == 1
    assert len(_untrusted_lines(caplog)) == 1

    with admin.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA resilient_db CASCADE")
    rdb.install_commit_markers(admin)  # the superuser's own
    trusted = sa.create_engine(admin.url, poolclass=sa.pool.NullPool)
    try:
        assert units(trusted, 5) == _commit.MARKERS
    finally:
        trusted.dispose()
    assert owner_checks() == 2


def test_markers_planted_after_trusted_ones_were_dropped_are_not_used(
    admin: sa.Engine,
    mallory: Role,
    service: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An engine that found the superuser's markers trusted kept trusting whatever stood under
    their names: after a DROP SCHEMA (a downgrade, a reinstall) mallory installed her own, and
    the engine's new connections used them (her mark_commit at every COMMIT, her claim with the
    application's rights). Their identity changed: asked again, and refused."""
    owner_checks = _counting_owner_checks(admin, monkeypatch)
    caplog.set_level(logging.WARNING, logger="resilient_db")
    rdb.install_commit_markers(admin)
    engine = sa.create_engine(admin.url)
    Sessions = rdb.ResilientSession(engine, service=service)
    try:
        Sessions.run(_bump)
        with engine.connect() as conn:
            assert conn.connection.driver_connection._rdb_mode == _commit.MARKERS
        with admin.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA resilient_db CASCADE")
        _plant_everything(mallory)
        engine.dispose()  # the same engine: new connections
        Sessions.run(_bump)
        with engine.connect() as conn:
            assert conn.connection.driver_connection._rdb_mode == _commit.XID
    finally:
        engine.dispose()
    assert owner_checks() == 2
    (line,) = _untrusted_lines(caplog)
    assert f"owned by role {mallory.name}" in line
    assert _counter(admin) == 2


def test_a_migration_role_named_as_the_markers_owner_is_trusted(
    admin: sa.Engine, make_role: Any, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A least-privilege set-up: a migration role (CREATE on the database, not its owner)
    installs the markers, the application role uses them. Its markers are not trusted by
    default (no catalog tells that role from one that planted them: a warning says so and
    the engine verifies by transaction id); ``SELF_HEALING_MARKERS_OWNER`` names it, and they
    are used."""
    migrator = make_role('GRANT CREATE ON DATABASE "{database}" TO {role}')
    app = make_role()
    engine = migrator.engine()
    try:
        rdb.install_commit_markers(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql(
                f"GRANT SELECT, INSERT ON resilient_db.commit_markers TO {app.name}"
            )
    finally:
        engine.dispose()
    caplog.set_level(logging.WARNING, logger="resilient_db")

    def mode(config: rdb.Config) -> str:
        app_engine = app.engine()
        try:
            Sessions = rdb.ResilientSession(app_engine, service=service, config=config)
            Sessions.run(_bump)
            with app_engine.connect() as conn:
                return str(conn.connection.driver_connection._rdb_mode)
        finally:
            app_engine.dispose()

    assert mode(rdb.Config()) == _commit.XID
    (line,) = _untrusted_lines(caplog)
    assert f"owned by role {migrator.name}" in line
    caplog.clear()
    assert mode(rdb.load_config({"SELF_HEALING_MARKERS_OWNER": migrator.name})) == (_commit.MARKERS)
    assert mode(rdb.Config(markers_owner="someone_else")) == _commit.XID
    assert _counter(admin) == 3


@pytest.mark.parametrize("bad", ["", "   ", "x" * 64, "a\x00b", "mig\udcffrator"])
def test_a_markers_owner_that_cannot_be_a_role_name_is_refused(bad: str) -> None:
    """(A name with a byte of another encoding, as ``os.environ`` gives it, a lone surrogate:
    Config() raised the codec's UnicodeEncodeError, and the environment's error quoted the
    codec.)"""
    with pytest.raises(rdb.ConfigError, match="SELF_HEALING_MARKERS_OWNER") as info:
        rdb.load_config({"SELF_HEALING_MARKERS_OWNER": bad})
    assert "codec" not in str(info.value)
    if bad.strip():
        with pytest.raises(rdb.ConfigError, match="markers_owner"):
            rdb.Config(markers_owner=bad)
    if "\udcff" in bad:
        assert "is not UTF-8 text" in str(info.value)


def test_a_markers_owner_that_is_no_string_is_refused_naming_its_type() -> None:
    """(A name read as bytes from a file, say: never compared with the role's name.)"""
    for bad, kind in ((b"migrator", "bytes"), (5, "int")):
        with pytest.raises(rdb.ConfigError) as info:
            rdb.Config(markers_owner=bad)  # type: ignore[arg-type]
        assert info.value.problems == {
            "markers_owner": f"must be a role name (a string) or None, got {kind}"
        }


def test_a_markers_owner_of_the_longest_role_name_is_taken() -> None:
    """PostgreSQL keeps 63 bytes of a name (NAMEDATALEN - 1): a name that long is taken, one
    byte more is refused; bytes of UTF-8 are counted, not characters."""
    for name in ("x" * 63, "\u00e9" * 31 + "x"):
        assert rdb.load_config({"SELF_HEALING_MARKERS_OWNER": name}).markers_owner == name
        assert rdb.Config(markers_owner=name).markers_owner == name
    for name in ("\u00e9" * 32, "x" * 63 + "\u00e9"):
        with pytest.raises(rdb.ConfigError, match="too long for a PostgreSQL role name"):
            rdb.Config(markers_owner=name)


@pytest.mark.parametrize("spaced", [" admin", "admin ", "\tadmin\n"])
def test_a_markers_owner_with_spaces_at_its_ends_is_refused_in_code_and_stripped_from_the_env(
    spaced: str,
) -> None:
    """The environment's ``SELF_HEALING_MARKERS_OWNER=" admin "`` names the role admin (its
    value is stripped, as every variable's); ``Config(markers_owner=" admin ")`` kept the spaces
    and trusted no role of that name, silently. Refused, naming the problem."""
    assert rdb.load_config({"SELF_HEALING_MARKERS_OWNER": spaced}).markers_owner == "admin"
    with pytest.raises(rdb.ConfigError, match=r"markers_owner.*spaces at its ends"):
        rdb.Config(markers_owner=spaced)


def test_the_application_installing_at_startup_trusts_the_named_markers_owner(
    admin: sa.Engine, make_role: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The application role holds CREATE on the database (``GRANT ALL ON DATABASE``, common)
    and calls ``install_commit_markers(engine)`` at startup, as the quickstart does, over the
    markers the migration role named in ``SELF_HEALING_MARKERS_OWNER`` installed: its units use
    them, yet the install took them for another role's, sent DDL and was refused (advising to
    drop the schema). It sends nothing now."""
    migrator = make_role('GRANT CREATE ON DATABASE "{database}" TO {role}')
    app = make_role('GRANT CREATE ON DATABASE "{database}" TO {role}')
    engine = migrator.engine()
    try:
        rdb.install_commit_markers(engine)
    finally:
        engine.dispose()
    app_engine = app.engine()
    sent: list[str] = []
    sa.event.listen(app_engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
    try:
        with pytest.raises(sa.exc.ProgrammingError, match="owned by role"):
            rdb.install_commit_markers(app_engine)  # not named: refused, as before
        monkeypatch.setenv("SELF_HEALING_MARKERS_OWNER", migrator.name)
        rdb.reload_config()  # (the process's configuration: the environment read at first use)
        sent.clear()
        rdb.install_commit_markers(app_engine)
    finally:
        app_engine.dispose()
        monkeypatch.delenv("SELF_HEALING_MARKERS_OWNER")
        rdb.reload_config()
    assert sent  # it looked
    assert [s for s in sent if s.lstrip().upper().startswith(("DO", "CREATE"))] == []


def test_a_role_set_at_connect_whose_login_role_may_not_write_markers_uses_the_fallback(
    admin: sa.Engine, make_role: Any, service: str
) -> None:
    """The login role (NOINHERIT, a member of the application's role) sets that role in a
    connect listener, as shared-login set-ups do; the grants went to the application's role.
    The connection's check asked the role in effect and used the markers, but ``mark_commit``
    asks the login role: a unit switching roles (``SET LOCAL ROLE``) was refused ("may not
    write commit markers"), and no prune ever ran. The check asks the login role too: such a
    connection verifies by transaction id, and every unit commits."""
    rdb.install_commit_markers(admin)
    app, tenant = make_role(), make_role()
    login = make_role("ALTER ROLE {role} NOINHERIT", f"GRANT {app.name} TO {{role}}")
    with admin.begin() as conn:
        conn.exec_driver_sql(f"GRANT {tenant.name} TO {app.name}")
        conn.exec_driver_sql(f"GRANT SELECT, INSERT ON resilient_db.commit_markers TO {app.name}")
    engine = login.engine()

    @sa.event.listens_for(engine, "connect")
    def set_role(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET ROLE {app.name}")
        dbapi_connection.commit()

    def switching(session: Session) -> int:
        session.execute(sa.text(f"SET LOCAL ROLE {tenant.name}"))
        return _bump(session)

    try:
        Sessions = rdb.ResilientSession(engine, service=service)
        Sessions.run(_bump)
        Sessions.run(switching)
        with engine.connect() as conn:
            assert conn.connection.driver_connection._rdb_mode == _commit.XID
    finally:
        engine.dispose()
    assert _counter(admin) == 2


def test_an_application_role_that_may_create_but_not_replace_leaves_earlier_markers(
    admin: sa.Engine, make_role: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A rolling deploy: an earlier release's markers (version 4), installed by the database's
    owner, and the application's role holding CREATE on the database (``GRANT ALL ON
    DATABASE``, common) but owning none of them. Its startup ``install_commit_markers(engine)``
    sent the install, which failed ("permission denied for schema resilient_db"): every new
    instance failed to start, where a role without CREATE is told and goes on. It is told too
    now: it could not replace them, so it leaves them, and units use them."""
    owner = make_role('ALTER DATABASE "{database}" OWNER TO {role}')
    app = make_role(
        'GRANT CREATE ON DATABASE "{database}" TO {role}',
        "GRANT SELECT, UPDATE ON counters TO {role}",
    )
    owner_engine = owner.engine()
    try:
        rdb.install_commit_markers(owner_engine)
        with owner_engine.begin() as conn:
            conn.exec_driver_sql(
                f"GRANT SELECT, INSERT ON resilient_db.commit_markers TO {app.name}"
            )
            conn.exec_driver_sql(
                "COMMENT ON TABLE resilient_db.commit_markers IS 'resilient_db commit markers, "
                "version 4: proof that a unit of work committed, kept 900 s'"
            )
    finally:
        owner_engine.dispose()
    app_engine = app.engine()
    sent: list[str] = []
    sa.event.listen(app_engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
    try:
        with caplog.at_level(logging.WARNING, logger="resilient_db"):
            rdb.install_commit_markers(app_engine)
        assert [s for s in sent if s.lstrip().upper().startswith(("DO", "CREATE"))] == []
        assert "has commit markers version 4, installed by an earlier release" in caplog.text
        Sessions = rdb.ResilientSession(app_engine, service="rolling")
        assert Sessions.run(_bump) == 1
    finally:
        app_engine.dispose()
    with admin.connect() as conn:
        assert (
            conn.exec_driver_sql("SELECT count(*) FROM resilient_db.commit_markers").scalar() == 1
        )


def test_an_install_by_a_role_that_may_not_replace_the_markers_names_their_owner(
    admin: sa.Engine, make_role: Any
) -> None:
    """A role with CREATE on the database but none of the markers (a migration role apart from
    the database's owner, running the Alembic step; an application role at startup where a
    function is missing) sends the install: refused as before (42501, before anything is
    changed), but naming the markers' owner to install as, where the server said only
    "permission denied for schema resilient_db"."""
    owner = make_role('ALTER DATABASE "{database}" OWNER TO {role}')
    migrator = make_role('GRANT CREATE ON DATABASE "{database}" TO {role}')
    owner_engine = owner.engine()
    try:
        rdb.install_commit_markers(owner_engine)
        with owner_engine.begin() as conn:
            conn.exec_driver_sql("DROP FUNCTION resilient_db.prune_commit_markers(integer)")
    finally:
        owner_engine.dispose()
    engine = migrator.engine()
    try:
        with pytest.raises(sa.exc.ProgrammingError) as raised:
            rdb.install_commit_markers(engine)
        with engine.connect() as conn, pytest.raises(sa.exc.ProgrammingError) as through:
            rdb.install_commit_markers(conn)
    finally:
        engine.dispose()
    for error in (raised.value, through.value):
        assert getattr(error.orig, "sqlstate", None) == "42501"
        message = str(error.orig)
        assert "permission denied for schema resilient_db" in message
        assert f"role {migrator.name} may not replace the commit markers" in message
        assert f"which belong to role {owner.name}" in message


@pytest.mark.parametrize("may_create", [False, True])
def test_an_application_role_without_usage_on_the_schema_starts_and_is_told_so(
    make_role: Any, caplog: pytest.LogCaptureFixture, may_create: bool
) -> None:
    """USAGE on schema resilient_db revoked from PUBLIC (a hardening) and not granted to the
    application's role: its startup install looked by name, was refused ("permission denied
    for schema"), took that for nothing installed and tried to install: refused again, naming
    a CREATE the role need not have (or the raw permission error). It sends nothing now; the
    engine's warning names the USAGE it lacks."""
    owner = make_role('ALTER DATABASE "{database}" OWNER TO {role}')
    grants = ['GRANT CREATE ON DATABASE "{database}" TO {role}'] if may_create else []
    app = make_role(*grants)
    owner_engine = owner.engine()
    try:
        rdb.install_commit_markers(owner_engine)
        with owner_engine.begin() as conn:
            conn.exec_driver_sql("REVOKE USAGE ON SCHEMA resilient_db FROM PUBLIC")
            conn.exec_driver_sql(
                f"GRANT SELECT, INSERT ON resilient_db.commit_markers TO {app.name}"
            )
    finally:
        owner_engine.dispose()
    caplog.set_level(logging.WARNING, logger="resilient_db")
    engine = app.engine()
    try:
        rdb.install_commit_markers(engine)  # at startup: nothing to do, nothing raised
        Sessions = rdb.ResilientSession(engine, service=f"no-usage-{may_create}")
        assert Sessions.run(_bump) >= 1
    finally:
        engine.dispose()
    assert any(
        f"role {app.name} lacks USAGE on schema resilient_db" in r.getMessage()
        for r in caplog.records
    )
