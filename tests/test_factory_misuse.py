"""A factory given what it can't use refuses it where the mistake is made, with an error that
names it and the remedy, and a refused call leaves the factory (and the engines, the health
report) as they were: nothing a later, correct factory would meet."""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pybreaker
import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

import resilient_db as rdb
from resilient_db._breaker import breakers
from resilient_db._state import STATE

pytestmark = pytest.mark.usefixtures("no_backoff")


def one(session: Session) -> int:
    return int(session.execute(sa.text("SELECT 1")).scalar_one())


async def aone(session: AsyncSession) -> int:
    return int((await session.execute(sa.text("SELECT 1"))).scalar_one())


@pytest_asyncio.fixture
async def async_engine(pg_async_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(pg_async_url)
    yield engine
    await engine.dispose()


# -- configure() given the factory's own keywords ----------------------------------------------
def test_configure_refuses_the_factorys_own_keywords_and_leaves_the_factory_working(
    engine: sa.Engine, service: str
) -> None:
    Factory = rdb.ResilientSession(engine, service=service)
    kw = dict(Factory.kw)
    with pytest.raises(TypeError) as info:
        Factory.configure(config=rdb.Config(max_retries=10), service="orders-v2")
    assert str(info.value) == (
        "ResilientSession.configure() got config=, service=, which are the factory's own, not "
        "the sessions': configure() passes its keywords to every session the factory makes, "
        "and Session takes no config=, service= (every Session() and unit would fail). Give "
        "them when the factory is made: ResilientSession(engine, config=..., service=...); to "
        "change the configuration of a running factory, set the SELF_HEALING_* variables and "
        "call resilient_db.reload_config() (it applies to the factories made without config=)"
    )
    assert Factory.kw == kw
    assert Factory.run(one) == 1
    with Factory() as session:
        assert one(session) == 1


@pytest.mark.parametrize("name", ["classifier", "clock", "wall_clock", "sleep", "asleep"])
def test_configure_refuses_each_own_keyword(engine: sa.Engine, service: str, name: str) -> None:
    Factory = rdb.ResilientSession(engine, service=service)
    with pytest.raises(TypeError, match=rf"configure\(\) got {name}=, which is the factory's own"):
        Factory.configure(**{name: None})
    assert Factory.run(one) == 1


@pytest.mark.asyncio
async def test_async_configure_refuses_the_factorys_own_keywords(
    async_engine: AsyncEngine, service: str
) -> None:
    Factory = rdb.AsyncResilientSession(async_engine, service=service)
    with pytest.raises(TypeError) as info:
        Factory.configure(asleep=None, expire_on_commit=False)
    assert str(info.value).startswith(
        "AsyncResilientSession.configure() got asleep=, which is the factory's own, not the "
        "sessions': configure() passes its keywords to every session the factory makes, and "
        "Session takes no asleep= "
    )
    assert Factory.kw["expire_on_commit"] is True  # nothing of the refused call was kept
    assert await Factory.run(aone) == 1


# -- a refused configure() or construction leaves no trace --------------------------------------
REPORTS = sa.Table("reports", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))
RELAXED = rdb.Config(status_validation=False)  # engine-wide settings of another kind


def nothing_left(engine: sa.Engine, service: str) -> None:
    """No hooks or listeners on ``engine``, no breaker or health entry for ``service``."""
    assert STATE.engine_hooks.get(engine) is None
    assert len(engine.pool.dispatch.checkout) == 0
    assert service not in breakers()
    assert service not in rdb.health()["services"]


def test_a_refused_configure_registers_the_factory_on_no_engine(
    pg_url: str, engine: sa.Engine, service: str
) -> None:
    """Every engine of a configure() is checked before the factory registers on any: refused
    for ``binds=``'s engine, it is not left on the new ``bind``'s hooks, whose own factory
    (other settings) is then made."""
    engine_b, engine_c = sa.create_engine(pg_url), sa.create_engine(pg_url)
    try:
        Reporting = rdb.ResilientSession(engine_c, service=f"{service}-r", config=RELAXED)
        Orders = rdb.ResilientSession(engine, service=service)
        with pytest.raises(ValueError, match=r"service '.*-r'.* different engine-wide settings"):
            Orders.configure(bind=engine_b, binds={REPORTS: engine_c})
        assert Orders.kw["bind"] is engine
        assert "binds" not in Orders.kw
        assert STATE.engine_hooks.get(engine_b) is None
        Batch = rdb.ResilientSession(engine_b, service=f"{service}-b", config=RELAXED)
        assert Batch.run(one) == Orders.run(one) == Reporting.run(one) == 1
    finally:
        engine_b.dispose()
        engine_c.dispose()


def test_a_factory_refused_for_a_binds_engine_leaves_no_trace(
    pg_url: str, engine: sa.Engine, service: str
) -> None:
    other = sa.create_engine(pg_url)
    try:
        Reports = rdb.ResilientSession(other, service=f"{service}-r", config=RELAXED)
        with pytest.raises(ValueError, match="different engine-wide settings") as info:
            rdb.ResilientSession(engine, service=service, binds={REPORTS: other})
        assert info.value.__traceback__ is not None  # the refused factory, still referenced
        nothing_left(engine, service)
        # the fix: a factory of engine's own, with other settings, while the refused one lives
        Orders = rdb.ResilientSession(engine, service=service, config=RELAXED)
        assert Orders.run(one) == Reports.run(one) == 1
    finally:
        other.dispose()


@pytest.mark.asyncio
async def test_async_a_factory_refused_for_a_binds_engine_leaves_no_trace(
    pg_async_url: str, async_engine: AsyncEngine, service: str
) -> None:
    other = create_async_engine(pg_async_url)
    try:
        # held (a factory nobody holds leaves its engine at the next garbage collection)
        Reports = rdb.AsyncResilientSession(other, service=f"{service}-r", config=RELAXED)
        with pytest.raises(ValueError, match="different engine-wide settings"):
            rdb.AsyncResilientSession(async_engine, service=service, binds={REPORTS: other})
        nothing_left(async_engine.sync_engine, service)
        Orders = rdb.AsyncResilientSession(async_engine, service=service, config=RELAXED)
        assert await Orders.run(aone) == await Reports.run(aone) == 1
    finally:
        await other.dispose()


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_an_engine_whose_password_holds_an_unencoded_at_is_refused_leaving_no_trace(
    driver: str, service: str
) -> None:
    """SQLAlchemy (and libpq) end a URL's password at its first "@" and take the rest for the
    host: the factory was made, its first unit failed to resolve the host (its name the end of
    the password, in the driver's error and the engine's repr). Said when the factory is made
    (or configured), naming neither."""
    secret = "rest-of-pw"
    url = f"postgresql+{driver}://app:pw@{secret}@127.0.0.1:1/db"
    sync = sa.create_engine(url) if driver == "psycopg" else None
    made = create_async_engine(url) if driver == "asyncpg" else None
    bind: Any = sync if sync is not None else made
    factory: Any = rdb.ResilientSession if sync is not None else rdb.AsyncResilientSession
    wanted = r"the engine's URL has an @ in its host: its password holds an unencoded @"
    with pytest.raises(ValueError, match=rf"^{factory.__name__}: {wanted}") as info:
        factory(bind, service=service)
    assert secret not in str(info.value)
    nothing_left(sync if sync is not None else made.sync_engine, service)  # type: ignore[union-attr]
    later = factory(service=service)  # (bound later: configure(bind=...) refuses it too)
    with pytest.raises(ValueError, match=rf"configure\(bind=...\): {wanted}"):
        later.configure(bind=bind)


def test_a_factory_refused_for_its_engine_is_no_service_of_health(
    engine: sa.Engine, service: str
) -> None:
    # kept: a factory nobody holds leaves the engine at the next garbage collection
    first = rdb.ResilientSession(engine, service=f"{service}-a")
    with pytest.raises(ValueError, match="different engine-wide settings"):
        rdb.ResilientSession(engine, service=service, config=RELAXED)
    assert service not in breakers()
    assert service not in rdb.health()["services"]
    assert first.kw is not None  # (held to here)


class NotASession:
    pass


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"class_": NotASession},
            "ResilientSession(class_=...) takes a Session subclass (sqlalchemy.orm.Session or "
            "yours), got NotASession",
        ),
        (
            {"class_": dict},
            "ResilientSession(class_=...) takes a Session subclass (sqlalchemy.orm.Session or "
            "yours), got dict",
        ),
        (
            {"class_": AsyncSession},
            "ResilientSession(class_=...) takes a Session subclass (sqlalchemy.orm.Session or "
            "yours), got AsyncSession, an async session class: for async code use "
            "AsyncResilientSession with an AsyncEngine",
        ),
    ],
    ids=["not-a-session", "dict", "async"],
)
def test_a_session_class_of_another_kind_is_refused_leaving_no_trace(
    engine: sa.Engine, service: str, kw: dict[str, Any], message: str
) -> None:
    with pytest.raises(TypeError) as info:
        rdb.ResilientSession(engine, service=service, **kw)
    assert str(info.value) == message
    nothing_left(engine, service)
    with sessionmaker(engine)() as session:  # plain sessions on it: nothing prepared for them
        prepared = session.execute(sa.text("SELECT name FROM pg_prepared_statements"))
        assert prepared.scalars().all() == []


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"class_": Session},
            "AsyncResilientSession(class_=...) takes an AsyncSession subclass, got Session, a "
            "sync session class: give it as sync_session_class= (the class of each "
            "AsyncSession's sync_session), or use ResilientSession with a sync Engine",
        ),
        (
            {"sync_session_class": AsyncSession},
            "AsyncResilientSession(sync_session_class=...) takes a sync Session subclass or a "
            "sessionmaker of one (the class of each AsyncSession's sync_session), got "
            "AsyncSession, the async session class: give it as class_=",
        ),
        (
            {"sync_session_class": "a ResilientSession"},  # (made in the test)
            "AsyncResilientSession(sync_session_class=...) takes a sync Session subclass or a "
            "plain sessionmaker, got a ResilientSession: its sessions would be that factory's, "
            "not this one's (give its class_, or a sessionmaker of it, for its listeners)",
        ),
        (
            {"class_": NotASession},
            "AsyncResilientSession(class_=...) takes an AsyncSession subclass, got NotASession",
        ),
    ],
    ids=["sync-class", "async-sync-class", "resilient-sync-factory", "not-a-session"],
)
@pytest.mark.asyncio
async def test_async_a_session_class_of_another_kind_is_refused_leaving_no_trace(
    async_engine: AsyncEngine, service: str, kw: dict[str, Any], message: str
) -> None:
    if kw.get("sync_session_class") == "a ResilientSession":
        kw = {"sync_session_class": rdb.ResilientSession(service=f"{service}-sync")}
    with pytest.raises(TypeError) as info:
        rdb.AsyncResilientSession(async_engine, service=service, **kw)
    assert str(info.value) == message
    nothing_left(async_engine.sync_engine, service)


@pytest.mark.asyncio
async def test_async_a_sync_session_class_of_another_kind_for_one_session_is_refused(
    async_engine: AsyncEngine, service: str
) -> None:
    """(Given for one session, ``Session(sync_session_class=...)``: refused when that session is
    made, as one given to the factory is when the factory is; the factory keeps working.)"""
    Sessions = rdb.AsyncResilientSession(async_engine, service=service)
    with pytest.raises(TypeError) as info:
        Sessions(sync_session_class=AsyncSession)
    assert str(info.value) == (
        "AsyncResilientSession(sync_session_class=...) takes a sync Session subclass or a "
        "sessionmaker of one (the class of each AsyncSession's sync_session), got "
        "AsyncSession, the async session class: give it as class_="
    )
    assert await Sessions.run(aone) == 1


@pytest.mark.asyncio
async def test_the_sync_engine_of_an_async_engine_is_refused_by_the_sync_factory(
    async_engine: AsyncEngine, engine: sa.Engine, service: str
) -> None:
    sync_engine = async_engine.sync_engine
    expected = (
        "takes a sync Engine, got one whose driver (asyncpg) is async: the sync_engine of an "
        "AsyncEngine (or a Connection of it, as run_sync gives), whose statements run only "
        "inside SQLAlchemy's greenlet there. Use AsyncResilientSession with the AsyncEngine "
        "itself"
    )
    with pytest.raises(TypeError, match=re.escape(f"ResilientSession {expected}")):
        rdb.ResilientSession(sync_engine, service=service)
    with pytest.raises(TypeError, match=re.escape(f"ResilientSession(binds=...) {expected}")):
        rdb.ResilientSession(engine, service=service, binds={REPORTS: sync_engine})
    nothing_left(sync_engine, service)
    Factory = rdb.ResilientSession(engine, service=service)
    with pytest.raises(TypeError, match=re.escape(expected)):
        Factory.configure(bind=sync_engine)
    assert Factory.run(one) == 1


# -- the sleep and clocks are checked where they are given --------------------------------------
async def _asleep(seconds: float) -> None:
    pass


class AsyncSleeper:
    def __init__(self) -> None:
        self.slept: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"sleep": 0}, "sleep= takes a function of seconds (time.sleep, say), got an int"),
        (
            {"clock": None},
            "clock= takes a function returning monotonic seconds (time.monotonic, say), got None",
        ),
        (
            {"wall_clock": "utc"},
            "wall_clock= takes a function returning seconds (time.time, say), or None, got a str",
        ),
        (
            {"sleep": asyncio.sleep},
            "sleep= takes a function of seconds (time.sleep, say), called in sync code: "
            "asyncio.tasks.sleep is an async function, whose coroutine would never be awaited "
            "(no backoff at all); for async code use AsyncResilientSession(asleep=...)",
        ),
    ],
    ids=["sleep", "clock", "wall_clock", "async-sleep"],
)
def test_a_sleep_or_clock_that_cant_be_called_is_refused_when_given(
    engine: sa.Engine, service: str, kw: dict[str, Any], message: str
) -> None:
    with pytest.raises(TypeError) as info:
        rdb.ResilientSession(engine, service=service, **kw)
    assert str(info.value) == message
    nothing_left(engine, service)


@pytest.mark.parametrize(
    ("asleep", "message"),
    [
        (
            time.sleep,
            "asleep= takes an async function of seconds (asyncio.sleep, say): the backoff "
            "awaits what it returns, and time.sleep is no async function (async def, or a "
            "functools.partial of one)",
        ),
        (None, "asleep= takes an async function of seconds (asyncio.sleep, say), got None"),
    ],
    ids=["time.sleep", "None"],
)
@pytest.mark.asyncio
async def test_async_an_asleep_that_is_no_async_function_is_refused_when_given(
    async_engine: AsyncEngine, service: str, asleep: Any, message: str
) -> None:
    with pytest.raises(TypeError) as info:
        rdb.AsyncResilientSession(async_engine, service=service, asleep=asleep)
    assert str(info.value) == message
    nothing_left(async_engine.sync_engine, service)
    with pytest.raises(TypeError, match=r"^clock= takes"):
        rdb.AsyncResilientSession(async_engine, service=service, clock=0)


@pytest.mark.parametrize(
    "asleep",
    [_asleep, functools.partial(_asleep), AsyncSleeper(), functools.partial(AsyncSleeper())],
    ids=["async-def", "partial", "async-__call__", "partial-of-object"],
)
@pytest.mark.asyncio
async def test_async_the_forms_of_an_async_sleep_are_accepted(
    engine: sa.Engine, async_engine: AsyncEngine, service: str, asleep: Any
) -> None:
    Factory = rdb.AsyncResilientSession(async_engine, service=service, asleep=asleep)
    attempts: list[int] = []

    async def conflict_once(session: AsyncSession) -> int:
        attempts.append(1)
        if len(attempts) == 1:
            await session.execute(sa.text("SELECT raise_code('40001')"))
        return await aone(session)

    assert await Factory.run(conflict_once) == 1
    assert len(attempts) == 2


# -- a keyword no session class takes (a typo) is refused where it is given ---------------------
@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"servce": "orders"},
            "ResilientSession got servce= (did you mean service=?), which is no keyword of the "
            "factory's and is taken by no session class of it (Session): kept, it would make "
            "every Session() and unit fail",
        ),
        (
            {"expire_on_comit": False, "autoflush": False, "autoflsh": True},
            "ResilientSession got expire_on_comit= (did you mean expire_on_commit=?), autoflsh= "
            "(did you mean autoflush=?), which are no keywords of the factory's and are taken by "
            "no session class of it (Session): kept, they would make every Session() and unit "
            "fail",
        ),
    ],
    ids=["service", "two"],
)
def test_a_keyword_no_session_takes_is_refused_leaving_no_trace(
    engine: sa.Engine, service: str, kw: dict[str, Any], message: str
) -> None:
    """sessionmaker keeps any keyword and gives it to every session it makes: ``servce=``
    would make a factory whose every ``Session()`` and unit fails with a TypeError."""
    with pytest.raises(TypeError) as info:
        rdb.ResilientSession(engine, service=service, **kw)
    assert str(info.value) == message
    nothing_left(engine, service)
    Factory = rdb.ResilientSession(engine, service=service, expire_on_commit=False)
    kept = dict(Factory.kw)
    with pytest.raises(TypeError) as info:
        Factory.configure(autoflush=False, expire_on_comit=True)
    assert str(info.value) == (
        "ResilientSession.configure() got expire_on_comit= (did you mean expire_on_commit=?), "
        "which is taken by no session class of it (Session): kept, it would make every "
        "Session() and unit fail"
    )
    assert Factory.kw == kept
    assert Factory.run(one) == 1


class TakesMore(Session):
    """Takes a keyword of its own (and any other, by ``**kw``: not refused)."""

    def __init__(self, *args: Any, tenant: str = "", **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.tenant = tenant


def test_keywords_the_session_class_takes_are_taken(engine: sa.Engine, service: str) -> None:
    Factory = rdb.ResilientSession(
        engine, service=service, class_=TakesMore, tenant="a", join_transaction_mode="rollback_only"
    )
    Factory.configure(tenant="b", info={"x": 1})
    with Factory() as session:
        assert isinstance(session, TakesMore)
        assert session.tenant == "b"


@pytest.mark.asyncio
async def test_async_a_keyword_no_session_takes_is_refused(
    async_engine: AsyncEngine, service: str
) -> None:
    """AsyncSession passes the keywords it does not declare to its sync session class."""
    with pytest.raises(TypeError) as info:
        rdb.AsyncResilientSession(async_engine, service=service, servce="orders")
    assert str(info.value) == (
        "AsyncResilientSession got servce= (did you mean service=?), which is no keyword of "
        "the factory's and is taken by no session class of it (AsyncSession, nor Session "
        "behind it): kept, it would make every Session() and unit fail"
    )
    nothing_left(async_engine.sync_engine, service)
    Factory = rdb.AsyncResilientSession(async_engine, service=service, autobegin=True)
    with pytest.raises(TypeError, match=r"configure\(\) got autoflsh= \(did you mean autoflush"):
        Factory.configure(autoflsh=False)
    Factory.configure(sync_session_class=TakesMore, tenant="t")
    async with Factory() as session:
        assert session.sync_session.tenant == "t"  # type: ignore[attr-defined]
    assert await Factory.run(aone) == 1


# -- the breaker's storage and listeners are checked where they are given -----------------------
class Listener(pybreaker.CircuitBreakerListener):
    pass


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"breaker_listeners": Listener()},
            "breaker_listeners= takes a sequence of pybreaker listeners ((listener,), say), got "
            "a Listener",
        ),
        (
            {"breaker_listeners": [print]},
            "breaker_listeners= takes pybreaker listeners (instances of a pybreaker."
            "CircuitBreakerListener subclass), got print, which has no before_call, failure, "
            "success, state_change()",
        ),
        (
            {"breaker_listeners": (Listener,)},
            "breaker_listeners= takes pybreaker listeners (instances of a pybreaker."
            "CircuitBreakerListener subclass), got Listener: a class; give an instance of it",
        ),
        (
            {"breaker_storage": "redis://cache:6379/0"},
            "breaker_storage= takes a pybreaker state storage (pybreaker.CircuitRedisStorage(...)"
            ", say, or None for one in memory), got a str",
        ),
        (
            {"breaker_storage": pybreaker.CircuitMemoryStorage},
            "breaker_storage= takes a pybreaker state storage (pybreaker.CircuitRedisStorage(...)"
            ", say, or None for one in memory), got CircuitMemoryStorage: a class; give an "
            "instance of it",
        ),
    ],
    ids=["one-listener", "function", "listener-class", "url", "storage-class"],
)
def test_a_breaker_storage_or_listener_pybreaker_cant_use_is_refused_leaving_no_trace(
    engine: sa.Engine, service: str, kw: dict[str, Any], message: str
) -> None:
    """Taken, pybreaker failed on them later (an AttributeError at the breaker's making, or at
    its first state change), and the refused factory's service stayed in health()."""
    with pytest.raises(TypeError) as info:
        rdb.ResilientSession(engine, service=service, **kw)
    assert str(info.value) == message
    nothing_left(engine, service)


def test_breaker_listeners_may_be_any_iterable(engine: sa.Engine, service: str) -> None:
    listener = Listener()
    storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    Factory = rdb.ResilientSession(
        engine, service=service, breaker_storage=storage, breaker_listeners=iter([listener])
    )
    assert listener in breakers()[service]._cb.listeners
    assert Factory.run(one) == 1


class _OwnStorage:
    """A storage of pybreaker's interface written without its base class, its values plain
    attributes of the instance (not properties of the class)."""

    def __init__(self) -> None:
        self.name = "own"
        self.state = pybreaker.STATE_CLOSED
        self.counter = 0
        self.success_counter = 0
        self.opened_at: Any = None

    def increment_counter(self) -> None:
        self.counter += 1

    def reset_counter(self) -> None:
        self.counter = 0

    def increment_success_counter(self) -> None:
        self.success_counter += 1

    def reset_success_counter(self) -> None:
        self.success_counter = 0


def test_a_storage_whose_values_are_attributes_of_the_instance_is_taken(
    engine: sa.Engine, service: str
) -> None:
    Factory = rdb.ResilientSession(engine, service=service, breaker_storage=_OwnStorage())
    assert Factory.run(one) == 1
