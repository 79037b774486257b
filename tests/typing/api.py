"""Checked by mypy (strict) in `make types`, never run: the public API keeps its types.

A decorated unit keeps its signature without the session; results keep their types.
"""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from pydantic import BaseModel, TypeAdapter
from sqlalchemy.ext.asyncio import (
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, scoped_session, sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request

import resilient_db as rdb
from resilient_db.otel import OpenTelemetryHook, install_opentelemetry
from resilient_db.web import (
    Dashboard,
    Problem,
    dashboard,
    install_exception_handlers,
    problem_details,
    token_auth,
)

engine = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1/app")
Sessions = rdb.ResilientSession(engine, service="typing", config=rdb.Config(max_retries=2))


@Sessions.transactional
def rename(session: Session, item_id: int, *, name: str) -> str:
    return name


renamed: str = rename(1, name="x")
count: int = Sessions.run(lambda s: int(s.execute(sa.text("SELECT 1")).scalar_one()))
config: rdb.Config = rdb.load_config({"SELF_HEALING_RETRY": "off"})
transient: bool = rdb.is_transient(ValueError())
outcome: rdb.Outcome = rdb.classify(ValueError())
wrapped: int = rdb.with_self_healing(lambda: 1, service="typing", use_retry=False)

aengine = create_async_engine("postgresql+asyncpg://postgres@127.0.0.1/app")
AsyncSessions = rdb.AsyncResilientSession(aengine, service="typing-async")


@AsyncSessions.transactional
async def arename(session: AsyncSession, item_id: int) -> str:
    return str(item_id)


async def use() -> str:
    first: str = await arename(1)
    second: int = await AsyncSessions.run(_one)
    return first + str(second)


async def _one(session: AsyncSession) -> int:
    return 1


try:
    rename(1, name="y")
except rdb.CircuitOpenError as err:
    retry_after: float = err.retry_after
except rdb.IllegalTransitionError as err:
    via: str = err.via


# -- response validation and the decorator form of with_self_healing ----------------------------
class TaskOut(BaseModel):
    id: int
    title: str


def has_title(value: object) -> bool:
    return bool(getattr(value, "title", None))


def load(session: Session, task_id: int) -> dict[str, object]:
    return {"id": task_id, "title": "x"}


checked: dict[str, object] = Sessions.run(load, 1, validate=TaskOut)
listed: list[int] = Sessions.run(lambda s: [1, 2], validate=TypeAdapter(list[int]))
by_callable: dict[str, object] = Sessions.run(load, 2, validate=has_title)
wrapped_checked: int = rdb.with_self_healing(lambda: 1, validate=lambda v: v == 1)


@Sessions.transactional(validate=TaskOut)
def load_checked(session: Session, task_id: int) -> dict[str, object]:
    return {"id": task_id, "title": "y"}


loaded: dict[str, object] = load_checked(3)


@rdb.with_self_healing(service="typing")
def fetch_count(limit: int, *, offset: int = 0) -> int:
    return limit + offset


@rdb.with_self_healing(service="typing", validate=TaskOut)
async def handler(task_id: int) -> dict[str, object]:
    return {"id": task_id, "title": "z"}


fetched: int = fetch_count(3, offset=1)


async def use_handler() -> dict[str, object]:
    validated: dict[str, object] = await AsyncSessions.run(_aload, 1, validate=TaskOut)
    return {**validated, **(await handler(1))}


async def _aload(session: AsyncSession, task_id: int) -> dict[str, object]:
    return {"id": task_id, "title": "a"}


try:
    fetch_count(1)
except rdb.ResponseValidationError as err:
    reason: str = err.reason
    validator_name: str = err.validator


# -- resilient_db.web and resilient_db.otel ---------------------------------------------------
def staff_only(request: Request) -> bool:
    return request.headers.get("x-role") == "staff"


app = Starlette()
install_exception_handlers(app)
board: Dashboard = dashboard(auth=staff_only, title="typing")
app.mount("/admin/self-healing", board)
app.mount("/admin/token", dashboard(auth=token_auth("a-secret-of-sixteen-chars")))
problem: Problem | None = problem_details(rdb.CircuitOpenError("typing", 1.0))
status: int = problem.status if problem is not None else 0
hook: OpenTelemetryHook = install_opentelemetry()


# -- a session class of one's own (SQLModel's, say): the factory is of that class -------------
class OwnSession(Session):
    def own(self) -> int:
        return 1


class OwnAsyncSession(AsyncSession):
    def own(self) -> int:
        return 1


OwnSessions = rdb.ResilientSession(engine, class_=OwnSession, expire_on_commit=False)


def uses_own(session: OwnSession) -> int:
    return session.own()


own_result: int = OwnSessions.run(uses_own)
own_session: OwnSession = OwnSessions()
OwnAsyncSessions = rdb.AsyncResilientSession(aengine, class_=OwnAsyncSession)


async def auses_own(session: OwnAsyncSession) -> int:
    return session.own()


async def use_own() -> int:
    return await OwnAsyncSessions.run(auses_own)


async def begin_own() -> int:
    # drop-in: Session.begin() gives a session of the factory's class
    async with OwnAsyncSessions.begin() as session:
        return session.own()


# -- where sessionmaker / async_sessionmaker are expected, the factories are accepted ---------
def typed_maker() -> sessionmaker[OwnSession]:
    return rdb.ResilientSession(engine, class_=OwnSession)


def typed_async_maker() -> async_sessionmaker[OwnAsyncSession]:
    return rdb.AsyncResilientSession(aengine, class_=OwnAsyncSession)


scoped: scoped_session[OwnSession] = scoped_session(OwnSessions)
scoped_own: int = scoped().own()
explicit: rdb.ResilientSession[OwnSession] = rdb.ResilientSession[OwnSession](
    engine, class_=OwnSession
)


async def scoped_async() -> int:
    factory = async_scoped_session(typed_async_maker(), scopefunc=asyncio.current_task)
    async with typed_async_maker().begin() as session:
        own: int = session.own()
    return factory().own() + own


# SQLAlchemy's recipe for ORM events on async sessions: a sessionmaker as sync_session_class
sync_maker = sessionmaker()
EventedAsyncSessions = rdb.AsyncResilientSession(aengine, sync_session_class=sync_maker)
