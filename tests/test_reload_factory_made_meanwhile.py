"""A factory made without ``config=`` while a ``reload_config()`` runs takes what the reload
applies. It read its configuration before the reload and registered for reloads after the
reload had gone through the factories it knew: it kept the configuration read before (a kill
switch or a breaker switched off by the reload did not reach it) until the next reload.

Deterministic: the factory is paused between its reading and its registration by a
classifier whose table it reads in between (a factory's classifier is read once, when it is
made), while the test's thread reloads."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import resilient_db as rdb


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


def made_during_a_reload(make: Any, reload: dict[str, str]) -> Any:
    """The factory ``make(classifier)`` returns, made in another thread while this one
    reloads ``reload``."""
    classifier = PausingClassifier()
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
        assert classifier.reading.wait(10)  # it has read its configuration
        rdb.reload_config(reload)
    finally:
        classifier.go.set()
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
