"""``reload_config()`` while other threads call ``with_self_healing`` operations: the reload
went through the operations' cached policies while those threads added policies to them
(each operation's first call under a configuration makes its policy), and failed with
``RuntimeError: dictionary changed size during iteration``, after it had made its
configuration the environment's but before it applied it to any factory: half applied.

Bounded: a hundred reloads while 4 threads call operations of 40 services with each
retry and breaker setting, the interpreter switching threads as often as it can."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import resilient_db as rdb

SERVICES = [f"reload-op-{n}" for n in range(40)]
RELOADS = 100


@pytest.fixture
def switching_often() -> Iterator[None]:
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


@pytest.mark.usefixtures("switching_often", "clean_env")
def test_reloads_while_operations_make_their_policies(engine: sa.Engine) -> None:
    Factory = rdb.ResilientSession(engine, service="reload-op-factory")
    done = threading.Event()
    failed: list[BaseException] = []

    def operations() -> None:
        try:
            while not done.is_set():
                for service in SERVICES:
                    for retry in (True, False):
                        for breaker in (True, False):
                            rdb.with_self_healing(
                                lambda: None,
                                service=service,
                                use_retry=retry,
                                use_circuit_breaker=breaker,
                            )
        except BaseException as exc:  # (reported below)
            failed.append(exc)

    threads = [threading.Thread(target=operations) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for n in range(RELOADS):
            env = {"SELF_HEALING_MAX_RETRIES": str(1 + n % 5)}
            assert rdb.reload_config(env) == rdb.load_config(env)
            assert Factory.config == rdb.load_config(env)  # applied, wholly
    finally:
        done.set()
        for thread in threads:
            thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert not failed, failed
