"""A factory made without ``config=`` while a ``reload_config()`` runs takes what the reload
applies. It read its configuration before the reload and registered for reloads after the
reload had gone through the factories it knew: it kept the configuration read before (a kill
switch or a breaker switched off by the reload did not reach it) until the next reload.

Deterministic: the factory is paused between its reading and its registration by a
classifier whose table it reads in between (a factory's classifier is read once, when it is
made), or where it has checked its engine and not yet taken the engine's hooks, while the
test's thread reloads."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import resilient_db as rdb
from resilient_db import _unit


class PausingClassifier(rdb.Classifier):
    """A classifier whose table, read first while the factory is made, holds it there until
    the test lets it go."""

    __slots__ = ("go", "reading")

    def __init__(self) -> None:
        super().__init__()
        self.reading = threading.Event()
        self.go = threading.Event()

    @property
    def codes(self) -> Any:
        if not self.reading.is_set():
            self.reading.set()
            assert self.go.wait(10)
        return super().codes


class Pause:
    """Holds the thread that reaches :meth:`hold` first until the test lets it go."""

    def __init__(self) -> None:
        self.reading = threading.Event()
        self.go = threading.Event()

    def hold(self) -> None:
        if not self.reading.is_set():
            self.reading.set()
            assert self.go.wait(10)


def made_during_a_reload(make: Any, reload: dict[str, str], pause: Any = None) -> Any:
    """The factory ``make(classifier)`` returns, made in another thread while this one
    reloads ``reload`` once ``pause`` (by default the classifier) holds it."""
    classifier = PausingClassifier()
    pause = pause or classifier
    made: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            made.append(make(classifier))
        except BaseException as exc:  # (reported below)
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert pause.reading.wait(10)  # it has read its configuration
        rdb.reload_config(reload)
    finally:
        pause.go.set()
        thread.join(10)
    assert not thread.is_alive()
    assert not errors, errors
    return made[0]


@pytest.fixture
def started(clean_env: pytest.MonkeyPatch) -> None:
    rdb.reload_config({"SELF_HEALING_MAX_RETRIES": "3"})


@pytest.mark.usefixtures("started")
def test_a_factory_made_during_a_reload_takes_it(engine: sa.Engine, service: str) -> None:
    reload = {"SELF_HEALING_MAX_RETRIES": "7", "SELF_HEALING_CIRCUIT_BREAKER": "false"}
    Factory = made_during_a_reload(
        lambda classifier: rdb.ResilientSession(engine, service=service, classifier=classifier),
        reload,
    )
    assert Factory.config == rdb.load_config(reload)
    assert Factory.policy.config == Factory.config
    assert rdb.health()["services"][service]["breaker"]["state"] == "off"
    assert Factory.run(lambda session: session.scalar(sa.text("SELECT 1"))) == 1


@pytest.mark.usefixtures("started")
def test_a_factory_made_during_a_reload_takes_its_kill_switch(
    engine: sa.Engine, service: str
) -> None:
    reload = {"SELF_HEALING_ENABLED": "false"}
    Factory = made_during_a_reload(
        lambda classifier: rdb.ResilientSession(engine, service=service, classifier=classifier),
        reload,
    )
    assert not Factory.config.enabled
    assert Factory.run(lambda session: session.scalar(sa.text("SELECT 1"))) == 1
    assert rdb.health()["services"][service]["counters"]["attempts"] == 0  # (nothing counted)


@pytest.mark.usefixtures("started")
@pytest.mark.asyncio
async def test_an_async_factory_made_during_a_reload_takes_it(
    pg_async_url: str, service: str
) -> None:
    engine = create_async_engine(pg_async_url)
    try:
        reload = {"SELF_HEALING_MAX_RETRIES": "7"}
        Factory = made_during_a_reload(
            lambda classifier: rdb.AsyncResilientSession(
                engine, service=service, classifier=classifier
            ),
            reload,
        )
        assert Factory.config == rdb.load_config(reload)
        assert Factory.policy.config == Factory.config
    finally:
        await engine.dispose()


def test_a_factory_with_its_own_config_is_left_alone(
    engine: sa.Engine, service: str, clean_env: pytest.MonkeyPatch
) -> None:
    own = rdb.load_config({}).replace(max_retries=2)
    Factory = made_during_a_reload(
        lambda classifier: rdb.ResilientSession(
            engine, service=service, classifier=classifier, config=own
        ),
        {"SELF_HEALING_MAX_RETRIES": "7"},
    )
    assert Factory.config == own


@pytest.mark.usefixtures("started")
@pytest.mark.parametrize(
    "reload",
    [{"SELF_HEALING_ENABLED": "false"}, {"SELF_HEALING_STATUS_VALIDATION": "false"}],
    ids=["kill switch", "guard off"],
)
def test_a_factory_made_during_a_reload_joins_an_engine_the_reload_changed(
    engine: sa.Engine, service: str, reload: dict[str, str]
) -> None:
    """The reload changes what the engine's hooks act on (the kill switch, the guard): a
    factory of the environment's configuration already on the engine takes it, and the one
    made meanwhile, which read the configuration before, was refused as disagreeing with it
    (``ValueError``: "another resilient factory ... different engine-wide settings") instead
    of taking it too."""
    first = rdb.ResilientSession(engine, service=service)
    Factory = made_during_a_reload(
        lambda classifier: rdb.ResilientSession(
            engine, service=f"{service}-meanwhile", classifier=classifier
        ),
        reload,
    )
    assert Factory.config == first.config == rdb.load_config(reload)
    assert Factory.policy.config == Factory.config
    assert Factory.run(lambda session: session.scalar(sa.text("SELECT 1"))) == 1


@pytest.mark.usefixtures("started")
def test_a_factory_taking_its_engine_after_a_reload_changed_it_takes_the_reload(
    engine: sa.Engine, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, the reload coming once the factory has checked the engine against the
    configuration it read, before it takes the engine's hooks (it makes its breaker, its
    budget and their link to Redis in between): paused where it makes its commit referee."""
    first = rdb.ResilientSession(engine, service=service)
    pause = Pause()
    referee = _unit.CommitReferee

    def pausing_referee(*args: Any) -> Any:
        pause.hold()
        return referee(*args)

    monkeypatch.setattr(_unit, "CommitReferee", pausing_referee)
    reload = {"SELF_HEALING_STATUS_VALIDATION": "false"}
    Factory = made_during_a_reload(
        lambda _: rdb.ResilientSession(engine, service=f"{service}-meanwhile"), reload, pause
    )
    assert Factory.config == first.config == rdb.load_config(reload)
    assert Factory.policy.config == Factory.config
    assert Factory.run(lambda session: session.scalar(sa.text("SELECT 1"))) == 1
