"""The keywords a resilient factory takes for itself (``service``, ``config``, ``classifier``,
``breaker_storage``, ``breaker_listeners``, ``sleep``/``asleep``, ``clock``, ``wall_clock``) are
never passed on to the session class, where a ``sessionmaker`` passes every keyword to it. A
session class whose ``__init__`` declares a parameter of such a name, given that keyword through
the factory, would silently never get it: the factory refuses to be made, with a TypeError that
names the keyword and the class and says how to give it to the sessions, and leaves nothing
behind (no breaker, no engine hooks). A class taking only ``**kw`` is left alone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pybreaker
import pytest
import pytest_asyncio
import sqlalchemy as sa
from scenarios import FakeClock
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db._breaker import breakers
from resilient_db._state import STATE

pytestmark = pytest.mark.usefixtures("no_backoff")


async def _asleep(seconds: float) -> None:
    pass


def factory_values(service: str) -> dict[str, Any]:
    """A value of each keyword both factories take for themselves."""
    return {
        "service": service,
        "config": rdb.Config(max_retries=2),
        "classifier": rdb.Classifier(),
        "breaker_storage": pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED),
        "breaker_listeners": (pybreaker.CircuitBreakerListener(),),
        "clock": FakeClock(),
        "wall_clock": FakeClock(),
    }


SYNC_OWN = ["service", "config", "classifier", "breaker_storage", "breaker_listeners", "sleep"]
SYNC_OWN += ["clock", "wall_clock"]
ASYNC_OWN = [*(name for name in SYNC_OWN if name != "sleep"), "asleep"]


class TakesTheirNames(Session):
    """A session class declaring a parameter of every name a factory keeps for itself."""

    def __init__(
        self,
        *args: Any,
        service: str = "own default",
        config: object = None,
        classifier: object = None,
        breaker_storage: object = None,
        breaker_listeners: object = None,
        sleep: object = None,
        asleep: object = None,
        clock: object = None,
        wall_clock: object = None,
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        self.service = service


class TakesService(Session):
    def __init__(self, bind: Any = None, service: str = "own default", **kw: Any) -> None:
        super().__init__(bind, **kw)
        self.service = service


class TakesAnyKeyword(Session):
    def __init__(self, **kw: Any) -> None:
        self.extra = {k: kw.pop(k) for k in list(kw) if k == "service"}
        super().__init__(**kw)


class Plain(Session):
    pass


def served(session: Session) -> tuple[str, int]:
    return getattr(session, "service", ""), int(session.execute(sa.text("SELECT 1")).scalar_one())


# -- the sync factory ------------------------------------------------------------------------
@pytest.mark.parametrize("name", SYNC_OWN)
def test_a_keyword_the_factory_keeps_is_refused_when_the_session_class_declares_it(
    engine: sa.Engine, service: str, name: str
) -> None:
    value = {**factory_values(service), "sleep": lambda seconds: None}[name]
    with pytest.raises(TypeError) as info:
        rdb.ResilientSession(engine, class_=TakesTheirNames, **{name: value})
    # the keyword (only the one given), the class, and what to do
    assert str(info.value) == (
        f"TakesTheirNames.__init__ takes {name}=, which ResilientSession keeps for itself: "
        "given to the factory, it never reaches TakesTheirNames. Give it to the sessions "
        f"instead: Factory({name}=...) for one session, Factory.configure({name}=...) for every "
        "session the factory makes (run()'s included); or rename that parameter of "
        "TakesTheirNames."
    )
    _nothing_left(engine, service)


def test_every_keyword_refused_is_named_at_once_positional_service_included(
    engine: sa.Engine, service: str
) -> None:
    with pytest.raises(TypeError) as info:
        rdb.ResilientSession(
            engine, service, class_=TakesTheirNames, config=rdb.Config(), clock=FakeClock()
        )
    assert str(info.value).startswith(
        "TakesTheirNames.__init__ takes service=, config=, clock=, which ResilientSession keeps "
        "for itself: given to the factory, they never reach TakesTheirNames. Give them to the "
        "sessions instead: Factory(service=..., config=..., clock=...) for one session, "
    )
    _nothing_left(engine, service)


def test_a_refused_factory_leaves_nothing_a_later_one_would_meet(
    engine: sa.Engine, service: str
) -> None:
    """No breaker for its service, no hooks on its engine: a factory made next on the same
    engine with other engine-wide settings (which a half-made one would have had it refused
    for, while the first lives: the error's traceback holds it) is made and runs units."""
    off = rdb.Config(status_validation=False)
    with pytest.raises(TypeError) as info:
        rdb.ResilientSession(engine, service=service, class_=TakesService, config=off)
    assert info.value.__traceback__ is not None  # the refused factory, still referenced
    _nothing_left(engine, service)
    Factory = rdb.ResilientSession(engine, service=service, class_=Plain, config=rdb.Config())
    assert Factory.run(served) == ("", 1)
    assert STATE.engine_hooks.get(engine) is not None


def test_a_class_taking_the_name_works_while_the_factory_is_not_given_it(
    engine: sa.Engine, service: str
) -> None:
    """The remedy the error names: the keyword goes to the sessions, per session or for
    every session of the factory (``run()``'s units included)."""
    Factory = rdb.ResilientSession(engine, class_=TakesService)
    assert Factory.policy.service == "database"  # the factory's default, given to nobody
    assert Factory.run(served) == ("own default", 1)
    with Factory(service="per session") as session:
        assert session.service == "per session"  # type: ignore[attr-defined]
    Factory.configure(service="every session")
    assert Factory.run(served) == ("every session", 1)
    with Factory() as session:
        assert session.service == "every session"  # type: ignore[attr-defined]


@pytest.mark.parametrize("cls", [Session, Plain, TakesAnyKeyword], ids=lambda c: c.__name__)
def test_ordinary_session_classes_and_those_taking_any_keyword_are_left_alone(
    engine: sa.Engine, service: str, cls: type[Session]
) -> None:
    values = {**factory_values(service), "sleep": lambda seconds: None}
    Factory = rdb.ResilientSession(engine, class_=cls, **values)
    assert Factory.policy.service == service
    assert Factory.run(served) == ("", 1)
    if cls is TakesAnyKeyword:
        with Factory(service="per session") as session:
            assert session.extra == {"service": "per session"}  # type: ignore[attr-defined]


# -- the async factory ----------------------------------------------------------------------------
@pytest_asyncio.fixture
async def async_engine(pg_async_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(pg_async_url)
    yield engine
    await engine.dispose()


class AsyncTakesService(AsyncSession):
    def __init__(self, bind: Any = None, *, service: str = "own default", **kw: Any) -> None:
        super().__init__(bind, **kw)
        self.service = service


class AsyncWithItsOwnSyncClass(AsyncSession):
    sync_session_class = TakesTheirNames


class AsyncTakesAnyKeyword(AsyncSession):
    def __init__(self, *args: Any, **kw: Any) -> None:
        self.extra = {k: kw.pop(k) for k in list(kw) if k == "service"}
        super().__init__(*args, **kw)


async def aserved(session: AsyncSession) -> tuple[str, int]:
    one = (await session.execute(sa.text("SELECT 1"))).scalar_one()
    return getattr(session, "service", ""), int(one)


@pytest.mark.parametrize("name", ASYNC_OWN)
@pytest.mark.parametrize(
    ("classes", "refused"),
    [
        ({"class_": AsyncWithItsOwnSyncClass}, "TakesTheirNames"),  # class_'s sync class
        ({"sync_session_class": TakesTheirNames}, "TakesTheirNames"),  # one given
    ],
    ids=["class_-sync-class", "sync_session_class"],
)
@pytest.mark.asyncio
async def test_async_a_keyword_the_factory_keeps_is_refused_when_a_session_class_declares_it(
    async_engine: AsyncEngine,
    service: str,
    name: str,
    classes: dict[str, type[Any]],
    refused: str,
) -> None:
    value = {**factory_values(service), "asleep": _asleep}[name]
    with pytest.raises(TypeError) as info:
        rdb.AsyncResilientSession(async_engine, **classes, **{name: value})
    assert str(info.value).startswith(
        f"{refused}.__init__ takes {name}=, which AsyncResilientSession keeps for itself: given "
        f"to the factory, it never reaches {refused}. Give it to the sessions instead: "
        f"Factory({name}=...) for one session, Factory.configure({name}=...) for every session"
    )
    _nothing_left(async_engine.sync_engine, service)


@pytest.mark.asyncio
async def test_async_the_class_itself_declaring_the_keyword_is_refused_too(
    async_engine: AsyncEngine, service: str
) -> None:
    with pytest.raises(TypeError) as info:
        rdb.AsyncResilientSession(async_engine, service=service, class_=AsyncTakesService)
    assert str(info.value).startswith(
        "AsyncTakesService.__init__ takes service=, which AsyncResilientSession keeps for itself"
    )
    _nothing_left(async_engine.sync_engine, service)
    # made again as the error says: the service given to each session
    Factory = rdb.AsyncResilientSession(async_engine, class_=AsyncTakesService)
    Factory.configure(service=service)
    assert await Factory.run(aserved) == (service, 1)


@pytest.mark.asyncio
async def test_async_a_class_taking_the_name_works_while_the_factory_is_not_given_it(
    async_engine: AsyncEngine,
) -> None:
    Factory = rdb.AsyncResilientSession(async_engine, class_=AsyncTakesService)
    assert await Factory.run(aserved) == ("own default", 1)
    async with Factory(service="per session") as session:
        assert session.service == "per session"
    Factory.configure(service="every session")
    assert await Factory.run(aserved) == ("every session", 1)


@pytest.mark.parametrize(
    "classes",
    [{}, {"class_": AsyncTakesAnyKeyword}, {"sync_session_class": Plain}],
    ids=["default", "any-keyword", "plain-sync-class"],
)
@pytest.mark.asyncio
async def test_async_ordinary_session_classes_and_those_taking_any_keyword_are_left_alone(
    async_engine: AsyncEngine, service: str, classes: dict[str, type[Any]]
) -> None:
    values = {**factory_values(service), "asleep": _asleep}
    Factory = rdb.AsyncResilientSession(async_engine, **classes, **values)
    assert await Factory.run(aserved) == ("", 1)
    assert STATE.engine_hooks.get(async_engine.sync_engine) is not None


def _nothing_left(engine: sa.Engine, service: str) -> None:
    """A refused factory made no breaker and hooked nothing on the engine."""
    assert service not in breakers()
    assert STATE.engine_hooks.get(engine) is None  # (the hooks' listeners are made with it)
