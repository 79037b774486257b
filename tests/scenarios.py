"""What the sync and async tests share: the SQLSTATE tables, the model, the SQL, and a
transaction that moves a row just before a session's UPDATE of it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import resilient_db as rdb

#: SQLAlchemy's async PostgreSQL drivers: asyncpg, and psycopg's ``AsyncConnection`` (what
#: ``create_async_engine("postgresql+psycopg://...")`` uses). A module runs its tests on both by
#: overriding conftest's ``async_driver`` with ``@pytest.fixture(params=ASYNC_DRIVERS)``.
ASYNC_DRIVERS = ("asyncpg", "psycopg")


def async_connect_args(driver: str, timeout: float) -> dict[str, Any]:
    """``connect_args`` for a connect timeout of ``timeout`` seconds on an async driver."""
    if driver == "asyncpg":
        return {"timeout": timeout}
    return {"connect_timeout": max(1, round(timeout))}  # libpq's: whole seconds


def server_settings_args(driver: str, **settings: str) -> dict[str, Any]:
    """``connect_args`` giving the session these server settings on an async driver."""
    if driver == "asyncpg":
        return {"server_settings": dict(settings)}
    return {"options": " ".join(f"-c {name}={value}" for name, value in settings.items())}


async def quick(session: AsyncSession) -> int:
    """A unit that only reads: the engine's connections still serve."""
    return int((await session.execute(sa.text("SELECT 42"))).scalar_one())


#: Codes raised through the real driver with RAISE ... USING ERRCODE, and their class.
TRANSIENT = {
    "40001": rdb.Outcome.CONFLICT,
    "40P01": rdb.Outcome.CONFLICT,
    "55P03": rdb.Outcome.CONFLICT,
    "57P03": rdb.Outcome.UNAVAILABLE,
    "53300": rdb.Outcome.UNAVAILABLE,
    "57P01": rdb.Outcome.DISCONNECT,
    "25006": rdb.Outcome.DISCONNECT,
    "08006": rdb.Outcome.DISCONNECT,
}
NOT_TRANSIENT = ["23505", "22012", "42P01", "P0001", "57014"]

#: ``SELECT raise_code('40001')`` raises exactly that SQLSTATE.
RAISE_CODE_FUNCTION = sa.text(
    "CREATE FUNCTION raise_code(code text) RETURNS void LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'raised %', code USING ERRCODE = code; END $$"
)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)


#: Test setup's own bypass of the transition trigger (as the superuser, unlogged): the setting
#: bound to the current transaction, as ``rdb.bypass_transitions`` sets it.
BYPASS_BY_HAND = (
    "SELECT set_config('resilient_db.bypass_transitions', pg_current_xact_id()::text, true)"
)


class MoveFirst:
    """Another transaction moves a row (and commits) just before this session's UPDATE of it is
    sent: after the flush guard has checked the move, so only a compare-and-set carried by the
    UPDATE itself can notice. ``watched`` is the (sync) engine whose UPDATE is awaited,
    ``other`` the engine the move runs on (the same one for sync tests). The other transaction
    gives up after 2 s if the row is locked."""

    def __init__(self, watched: sa.Engine, other: sa.Engine, sql: str, **params: Any) -> None:
        self.engine, self.other, self.sql, self.params = watched, other, sql, params
        self.done = False
        event.listen(watched, "before_cursor_execute", self._before)

    def _before(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if self.done or not statement.lstrip().upper().startswith("UPDATE"):
            return
        self.done = True
        with self.other.connect() as other:
            other.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
            other.exec_driver_sql(BYPASS_BY_HAND)
            other.execute(sa.text(self.sql), self.params)
            other.commit()

    def __enter__(self) -> MoveFirst:
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._before)


def conflict_after_another_factorys_unit(
    outer_url: str, service: str, inner: Callable[[], Any]
) -> int:
    """Run a unit of a psycopg 3 factory on ``outer_url`` that runs ``inner()`` (a unit of
    another factory: it commits on its own) and then meets a serialization failure. The failure
    must be raised, not replayed: a replay would run ``inner`` and write again. Returns how many
    times the outer unit ran."""
    outer_engine = sa.create_engine(outer_url)
    Outer = rdb.ResilientSession(outer_engine, service=f"{service}-outer")
    calls: list[int] = []

    def unit(session: Any) -> None:
        calls.append(1)
        inner()
        session.execute(
            sa.text("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$")
        )

    try:
        with pytest.raises(sa.exc.OperationalError):
            Outer.run(unit)
    finally:
        outer_engine.dispose()
    return len(calls)
