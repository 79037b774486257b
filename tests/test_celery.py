"""The Celery task of docs/many-processes.md ("Celery and other job queues"), run as a reader
runs it: the block copied as written into a module of its own (with the models and URLs it
names), a real ``celery worker`` on the prefork pool with two children, a Redis broker (the
harness's), the breaker and retry budget shared through the same Redis, and the test's
database. What the docs promise of it: a task pays its order; a task delivered again (the
same task id) finds its ``Done`` row and is a no-op; an illegal move fails the task at once
(not retried by ``autoretry_for``); the children's pooled connections killed between tasks
are healed inside the task (a new pool per child: the engine was made at import, in the
parent)."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa
from processes import wait_for

from resilient_db.testing import RedisServer

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "many-processes.md"

#: What the docs' block names and does not define: the reader's models, URLs and imports
PRELUDE = """\
from __future__ import annotations

import os

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import resilient_db as rdb

DATABASE_URL = os.environ["DATABASE_URL"]
BROKER_URL = os.environ["BROKER_URL"]


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "celery_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(unique=True)
    status: Mapped[str] = mapped_column(default="pending")

    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"pending": {"paid", "cancelled"}, "paid": {"shipped"}},
        initial={"pending"},
    )


class Done(Base):
    __tablename__ = "celery_done"
    task_id: Mapped[str] = mapped_column(primary_key=True)


"""

#: The test reads the tasks' results (the docs' app has a broker only)
POSTLUDE = """

app.conf.result_backend = BROKER_URL
"""


def celery_block() -> str:
    """The first ``py`` block of the docs' "Celery and other job queues" section."""
    section = DOC.read_text(encoding="utf-8").split("## Celery and other job queues", 1)[1]
    found = re.search(r"```py\n(.*?)```", section, flags=re.S)
    assert found, "docs/many-processes.md: the Celery section has no py block"
    return found.group(1)


@pytest.fixture
def shop(tmp_path: Path, pg_url: str, redis_server: RedisServer) -> Iterator[ModuleType]:
    """The reader's module (``shop_tasks``: prelude, the docs' block, the result backend),
    imported here as the client that sends the tasks, its tables and the commit markers made."""
    (tmp_path / "shop_tasks.py").write_text(PRELUDE + celery_block() + POSTLUDE, encoding="utf-8")
    env = {"DATABASE_URL": pg_url, "BROKER_URL": redis_server.url}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module("shop_tasks")
        module.Base.metadata.create_all(module.engine)
        module.rdb.install_commit_markers(module.engine)
        yield module
    finally:
        sys.modules.pop("shop_tasks", None)
        sys.path.remove(str(tmp_path))
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    module.app.close()
    module.engine.dispose()


class Worker:
    """``celery -A shop_tasks worker`` on the prefork pool, its output in a file."""

    def __init__(self, directory: Path, pg_url: str, redis_url: str) -> None:
        self.log = directory / "worker.log"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(directory), str(ROOT)]),
            "DATABASE_URL": pg_url,
            "BROKER_URL": redis_url,
            "SELF_HEALING_REDIS_URL": redis_url,
            "SELF_HEALING_RETRY_BUDGET": "0.2",
            # no sleeping through backoff: the delays shrunk
            "SELF_HEALING_INITIAL_DELAY": "1",
            "SELF_HEALING_MAX_DELAY": "10",
        }
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "shop_tasks",
                    "worker",
                    "--pool",
                    "prefork",
                    "--concurrency",
                    "2",
                    "--loglevel",
                    "INFO",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                ],
                cwd=directory,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def said(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, f"the worker ended:\n{self.said()}"
            return " ready." in self.said()

        wait_for(ready, "the Celery worker to be ready", timeout=60)

    def stop(self) -> None:
        """Celery's warm shutdown (SIGTERM), then SIGKILL to the whole group if it hangs."""
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # (children left behind, if any)
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


@pytest.fixture
def worker(
    shop: ModuleType, tmp_path: Path, pg_url: str, redis_server: RedisServer
) -> Iterator[Worker]:
    running = Worker(tmp_path, pg_url, redis_server.url)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def _send(shop: ModuleType, key: str, task_id: str | None = None) -> Any:
    """``pay(key)`` sent to the worker (a new task id unless ``task_id``): its AsyncResult."""
    return shop.pay.apply_async(args=[key], task_id=task_id or str(uuid.uuid4()))


def _paid(shop: ModuleType, *orders: int) -> list[Any]:
    """``pay`` sent for each of ``orders`` together, then each one's answer."""
    sent = [_send(shop, f"order-{n}") for n in orders]
    return [t.get(timeout=60) for t in sent]


def _result(shop: ModuleType, key: str, task_id: str | None = None) -> Any:
    sent = _send(shop, key, task_id)
    sent.get(timeout=60, propagate=False)
    return sent


def _status(engine: sa.Engine, key: str) -> str:
    with engine.connect() as conn:
        return str(
            conn.execute(
                sa.text("SELECT status FROM celery_orders WHERE key = :key"), {"key": key}
            ).scalar_one()
        )


def _done_rows(engine: sa.Engine, task_id: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT count(*) FROM celery_done WHERE task_id = :t"), {"t": task_id}
            ).scalar_one()
        )


def _kill_other_backends(engine: sa.Engine) -> int:
    """Terminate every backend on the test's database but this one: the worker children's
    pooled connections. How many there were."""
    with engine.connect() as conn:
        killed = conn.execute(
            sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend'"
            )
        ).scalar_one()
        conn.commit()
    return int(killed)


def test_the_docs_celery_task_runs_on_a_prefork_worker(
    shop: ModuleType, worker: Worker, pg_url: str
) -> None:
    engine = sa.create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO celery_orders (key, status) VALUES (:k, 'pending')"),
                [{"k": f"order-{n}"} for n in range(6)] + [{"k": "cancelled-order"}],
            )
            conn.execute(
                sa.text("UPDATE celery_orders SET status = 'cancelled' WHERE key = :k"),
                {"k": "cancelled-order"},
            )

        # a task pays its order, and writes its Done row in the same unit
        first = _result(shop, "order-0")
        assert (first.state, first.result) == ("SUCCESS", "paid"), worker.said()
        assert _status(engine, "order-0") == "paid"
        assert _done_rows(engine, first.id) == 1

        # delivered again (acks_late: the same task id): the Done row makes it a no-op (the
        # first run's result forgotten, so that the one read is the second run's)
        first.forget()
        again = _result(shop, "order-0", task_id=first.id)
        assert (again.state, again.result) == ("SUCCESS", "done before"), worker.said()
        assert _done_rows(engine, first.id) == 1

        # an illegal move fails the task at once: not retried by autoretry_for
        illegal = _result(shop, "cancelled-order")
        assert illegal.state == "FAILURE", worker.said()
        assert "IllegalTransitionError" in (illegal.traceback or ""), illegal.traceback
        assert "cancelled" in (illegal.traceback or "")
        assert _status(engine, "cancelled-order") == "cancelled"
        assert f"Task shop_tasks.pay[{illegal.id}] retry" not in worker.said()

        # both children hold pooled connections (tasks sent together); killed between tasks,
        # each next task heals inside resilient_db's unit, without a Celery retry
        assert _paid(shop, 1, 2) == ["paid", "paid"], worker.said()
        assert _kill_other_backends(engine) >= 1
        assert _paid(shop, 3, 4, 5) == ["paid"] * 3, worker.said()
        for n in range(6):
            assert _status(engine, f"order-{n}") == "paid"
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM celery_done")).scalar_one() == 6
        said = worker.said()
        assert "[SELF-HEAL] Discarded a dead pooled connection at checkout" in said, said
        assert " retry: Retry in" not in said, said  # no task went back to Celery
    finally:
        engine.dispose()


def test_the_block_is_the_one_the_docs_show() -> None:
    """The block this file runs is the docs' task (not an empty match): the names a reader
    copies are in it."""
    block = textwrap.dedent(celery_block())
    for name in ("acks_late=True", "autoretry_for=", "Session.run(unit)", "self.request.id"):
        assert name in block
