"""Checked by mypy (strict) in `make types`, never run: every public name as a user's code uses
it (the README's shapes), with the types a user's checker must infer (``assert_type``)."""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Coroutine, Iterator
from contextlib import AbstractContextManager
from typing import Any, Literal

import pybreaker
import redis
import sqlalchemy as sa
from alembic import op
from fastapi import FastAPI
from flask import Flask
from prometheus_client import CollectorRegistry, Metric
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from typing_extensions import assert_type

import resilient_db as rdb
from resilient_db import metrics, otel, testing, transitions, web

engine = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1/app")
aengine = create_async_engine("postgresql+asyncpg://postgres@127.0.0.1/app")


# -- models: __transitions__ on Mapped columns, str and Enum statuses ---------------------------
class Base(DeclarativeBase):
    pass


class Status(enum.Enum):
    PENDING = "pending"
    DONE = "done"


class Task(Base):
    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    status: Mapped[str] = mapped_column(default="pending")
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"pending": {"in_progress", "cancelled"}, "in_progress": {"done"}},
        initial={"pending"},
    )


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    state: Mapped[Status] = mapped_column(default=Status.PENDING)
    __transitions__ = (
        rdb.TransitionRules(
            column="state", transitions={Status.PENDING: {Status.DONE}}, initial={Status.PENDING}
        ),
    )


# rules built from mappings made beforehand (a dict's key type is invariant: no false error)
job_moves: dict[Status, set[Status]] = {Status.PENDING: {Status.DONE}}
task_moves: dict[str, frozenset[str]] = {"pending": frozenset({"done"}), rdb.ANY_STATE: frozenset()}
job_rules = rdb.TransitionRules(column="state", transitions=job_moves, initial=[Status.PENDING])
task_rules = rdb.TransitionRules(column="status", transitions=task_moves, initial=("pending",))
rules: rdb.TransitionRules = Task.__transitions__
assert_type(rules.column, str)
assert_type(rdb.transition_rules(Task), tuple[rdb.TransitionRules, ...])
assert_type(rdb.allowed_transitions(Task(id=1, title="t")), set[Any])
assert_type(rdb.transition_trigger_sql(Task), str)
assert_type(rdb.transition_trigger_drop_sql(Job, columns=["state"]), str)
assert_type(rdb.rules_to_mermaid(Task), str)
assert_type(rdb.rules_to_dot(Job, column="state"), str)
trigger = rdb.TransitionTrigger(
    model="Task", table="tasks", primary_key="id", rules=Task.__transitions__
)
assert_type(trigger.column, str)
assert_type(rdb.transition_trigger_sql(trigger), str)
rdb.install_transition_trigger(engine, Task)
rdb.install_transition_trigger(engine, trigger, lock_timeout=None)
rdb.uninstall_transition_trigger(engine, Task, columns=["status"])
rdb.install_commit_markers(engine)
rdb.install_commit_markers(engine, lock_timeout=2.5)
rdb.uninstall_commit_markers(engine)
with engine.connect() as connection:
    rdb.install_commit_markers(connection)
    assert_type(rdb.trigger_drift(connection, Task), str | None)
constants: tuple[str, ...] = (
    rdb.ANY_STATE,
    rdb.BYPASS_ROLE,
    rdb.BYPASS_SETTING,
    rdb.TRANSITION_SQLSTATE,
    web.PROBLEM_JSON,
    web.PROBLEM_TYPE_BASE,
)
assert_type(transitions.transition_rules(Job), tuple[rdb.TransitionRules, ...])


# -- the sync factory: a drop-in sessionmaker and units of work ---------------------------------
Sessions = rdb.ResilientSession(engine, service="database", expire_on_commit=False)
assert_type(Sessions, rdb.ResilientSession[Session])
with Sessions() as s:
    assert_type(s, Session)
with Sessions.begin() as s:
    assert_type(s, Session)
    rdb.bypass_transitions(s, reason="repair")


def complete(session: Session, task_id: int, *, note: str = "") -> str:
    return note


assert_type(Sessions.run(complete, 1), str)
assert_type(Sessions.run(complete, 1, note="x"), str)
assert_type(Sessions.run(lambda session: 1), int)
assert_type(Sessions.run(complete, 1, validate=str), str)
with Sessions() as s:
    assert_type(Sessions.run_in(s, complete, 2), str)


@Sessions.transactional
def start(session: Session, task_id: int) -> str:
    return "in_progress"


@Sessions.transactional(validate=str)
def start_checked(session: Session, task_id: int, *, force: bool = False) -> str:
    return "in_progress"


assert_type(start(1), str)
assert_type(start_checked(1, force=True), str)


# -- the async factory -----------------------------------------------------------------------
AsyncSessions = rdb.AsyncResilientSession(aengine, service="database")
assert_type(AsyncSessions, rdb.AsyncResilientSession[AsyncSession])


@AsyncSessions.transactional
async def start_async(session: AsyncSession, task_id: int) -> str:
    return "in_progress"


async def acomplete(session: AsyncSession, task_id: int) -> int:
    return task_id


async def use_async() -> None:
    assert_type(await start_async(1), str)
    assert_type(await AsyncSessions.run(acomplete, 1), int)
    assert_type(await AsyncSessions.run(acomplete, 1, validate=int), int)
    async with AsyncSessions.begin() as session:
        assert_type(session, AsyncSession)
        await rdb.bypass_transitions_async(session, reason="repair")
    async with aengine.begin() as conn:
        await conn.run_sync(rdb.install_commit_markers)
        await conn.run_sync(rdb.install_transition_trigger, Task)
        await conn.run_sync(lambda c: rdb.install_commit_markers(c.engine))
    async with AsyncSessions() as session:
        assert_type(session, AsyncSession)
        assert_type(await AsyncSessions.run_in(session, acomplete, 2), int)


# -- with_self_healing: call form and decorator form, sync and async, methods ------------------
def handler() -> int:
    return 1


async def ahandler() -> str:
    return ""


assert_type(rdb.with_self_healing(handler, service="database"), int)
assert_type(rdb.with_self_healing(ahandler), Awaitable[str])
assert_type(
    rdb.with_self_healing(handler, use_retry=True, use_circuit_breaker=False, validate=int), int
)
decorate = rdb.with_self_healing(service="database")
assert_type(decorate, rdb.SelfHealingDecorator)


@rdb.with_self_healing(service="database")
def fetch(limit: int, *, offset: int = 0) -> list[int]:
    return [limit, offset]


@rdb.with_self_healing(service="database", config=rdb.Config(max_retries=1))
async def afetch(item_id: int) -> dict[str, int]:
    return {"id": item_id}


assert_type(fetch(1, offset=2), list[int])
pending: Coroutine[Any, Any, dict[str, int]] = afetch(1)
pending.close()


class Repository:
    @rdb.with_self_healing(service="database")
    def get(self, item_id: int) -> str:
        return str(item_id)

    @rdb.with_self_healing(service="database")
    async def aget(self, item_id: int) -> bytes:
        return b""

    @rdb.with_self_healing(service="database")
    @staticmethod
    def static(item_id: int) -> int:
        return item_id

    @rdb.with_self_healing(service="database")
    @classmethod
    def made(cls, item_id: int) -> Repository:
        return cls()


repo = Repository()
assert_type(repo.get(1), str)
apending: Coroutine[Any, Any, bytes] = repo.aget(1)
apending.close()
assert_type(Repository.static(1), int)
assert_type(repo.static(1), int)
assert_type(Repository.made(1), Repository)


# -- configuration, classification, exceptions ------------------------------------------------
config = rdb.Config(
    enabled=True,
    max_retries=5,
    initial_delay=0.5,
    reset_timeout=10.0,
    redis_url=None,
    retry_budget=0.2,
    log_level="debug",
)
assert_type(config.max_retries, int)
assert_type(config.initial_delay, float)
assert_type(config.redis_url, str | None)
assert_type(config.retry_on, bool)
assert_type(config.replace(max_retries=1), rdb.Config)
assert_type(config.as_env(masked=True), dict[str, str])
assert_type(rdb.load_config({"SELF_HEALING_RETRY": "off"}), rdb.Config)
assert_type(rdb.load_config(), rdb.Config)
assert_type(rdb.reload_config(), rdb.Config)
assert_type(rdb.is_transient(ValueError()), bool)
assert_type(rdb.classify(ValueError()), rdb.Outcome)
assert_type(rdb.classify(ValueError()).transient, bool)
assert_type(rdb.sqlstate_of(ValueError()), str | None)
classifier = rdb.Classifier().with_codes({"55006": rdb.Outcome.CONFLICT}).without_codes("57P03")
assert_type(classifier, rdb.Classifier)
assert_type(rdb.is_transient(ValueError(), classifier=classifier), bool)
FactoryWithCodes = rdb.ResilientSession(engine, classifier=classifier, config=config)


class OpeningsHeard(pybreaker.CircuitBreakerListener):
    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        pass


# listeners as docs/circuit-breaker.md gives them, a list (any iterable is taken)
Listened = rdb.ResilientSession(engine, service="listened", breaker_listeners=[OpeningsHeard()])
AsyncListened = rdb.AsyncResilientSession(
    aengine, service="listened", breaker_listeners=[OpeningsHeard()]
)

try:
    start(1)
except rdb.CircuitOpenError as err:
    assert_type(err.service, str)
    assert_type(err.retry_after, float)
    assert_type(err.cause, str | None)
    assert_type(err.state, str)
except rdb.StaleTransitionError as err:
    assert_type(err.via, str)
except rdb.IllegalTransitionError as err:
    assert_type(err.model, str)
    assert_type(err.column, str)
    assert_type(err.via, str)
    assert_type(err.reason, str)
    assert_type(err.inserted, bool)
except rdb.CommitOutcomeUnknownError as err:
    assert_type(err.service, str)
    assert_type(err.xid, int | None)
    assert_type(err.marker, str | None)
    assert_type(err.detail, str)
except rdb.ResponseValidationError as err:
    assert_type(err.validator, str)
    assert_type(err.reason, str)
except rdb.ConfigError as err:
    assert_type(err.problems, dict[str, str])
except rdb.BypassRefusedError as err:
    assert_type(err.role, str)
except (rdb.TransactionStateError, rdb.TransitionRulesError):
    pass
except (rdb.TriggerInstallRefusedError, rdb.ScriptOnPreparedStatementError):
    pass
except rdb.ResilientDBError:
    pass


# -- hooks, health, testing switches -----------------------------------------------------------
def on_event(event: rdb.SelfHealEvent) -> None:
    assert_type(event.name, str)
    assert_type(event.service, str | None)
    assert_type(event.level, int)
    assert_type(event.message, str)
    logging.getLogger("app").info("%s %s", event.name, event.fields.get("sqlstate"))


hook: rdb.SelfHealHook = on_event
rdb.add_hook(on_event)
rdb.remove_hook(on_event)
report = rdb.health()
healthy: bool = report["healthy"]
assert_type(report, rdb.HealthReport)
assert_type(report["transitions"]["blocked_transitions"], int)
for service_name, service_health in report["services"].items():
    assert_type(service_name, str)
    assert_type(service_health["counters"]["attempts"], int)
    assert_type(service_health["counters"]["retries_by_class"], dict[str, int])
    breaker_health = service_health["breaker"]
    if breaker_health is not None and breaker_health["state"] != "unknown":
        # (an unreadable breaker_storage= of yours: rdb.UnavailableHealth, ruled out above)
        assert_type(breaker_health, rdb.BreakerHealth)
        assert_type(breaker_health["state"], Literal["closed", "open", "half-open", "off"])
        assert_type(breaker_health["reason"], str | None)
        assert_type(breaker_health.get("retry_after"), float | None)
        shared_health = breaker_health.get("shared")
        if shared_health is not None:
            assert_type(shared_health["connected"], bool)
            assert_type(shared_health["problem"], str | None)
            for timeline in shared_health["fleet_timelines"].values():
                assert_type(timeline["since"], float | None)
    budget_health = service_health["budget"]
    if budget_health is not None and "available" in budget_health:
        assert_type(budget_health, rdb.BudgetHealth)
        assert_type(budget_health["scope"], Literal["process", "fleet"])
        assert_type(budget_health["available"], float)
        fleet_figures = budget_health.get("fleet")
        if fleet_figures is not None:
            assert_type(fleet_figures["floor_tokens"], float)
with rdb.set_testing():
    rdb.reset_state()
assert_type(rdb.set_testing(False), AbstractContextManager[None])
assert_type(rdb.__version__, str)
validator: rdb.ResponseValidator = int


# -- resilient_db.web: Starlette, FastAPI, Flask -----------------------------------------------
def staff_only(request: Request) -> bool:
    return request.headers.get("x-role") == "staff"


async def astaff_only(request: Request) -> bool:
    return True


starlette_app = Starlette()
web.install_exception_handlers(starlette_app)
fastapi_app = FastAPI()
web.install_exception_handlers(fastapi_app, config=config, type_base="https://example.com/p/")
board = web.dashboard(auth=staff_only, title="ops", poll_seconds=1.0, events=50)
assert_type(board, web.Dashboard)
fastapi_app.mount("/admin/self-healing", board)
fastapi_app.mount("/admin/async", web.dashboard(auth=astaff_only))
fastapi_app.mount("/admin/token", web.dashboard(auth=web.token_auth("a-secret-of-sixteen-chars")))
check: web.AuthCheck = staff_only
check_async: web.AuthCheck = astaff_only
recorder = web.Recorder(max_events=10)
web.dashboard(auth=staff_only, recorder=recorder)
snapshot = recorder.snapshot(events=20)
assert_type(snapshot, web.RecorderSnapshot)
assert_type(snapshot["delta"], bool)
for recorded in snapshot["events"]:
    assert_type(recorded, web.RecordedEvent)
    assert_type(recorded["level"], Literal["info", "warning", "error"])
    assert_type(recorded["fields"].get("sqlstate"), str | None)
    assert_type(recorded["fields"].get("blocked_rows"), int | None)
    assert_type(recorded["fields"].get("to_state"), str | int | float | bool | None)
for series in recorder.snapshot(after=snapshot["cursor"])["series"].values():
    assert_type(series, web.ServiceSeries)
    assert_type(series["retries_by_sqlstate"], dict[str, int])
    seconds = [row[0] for row in series["buckets"]]
    assert_type(seconds, list[int])
    for change in series["breaker_states"]:  # [time, state]
        assert_type(change[1], float | Literal["open", "half-open", "closed"])
assert_type(
    snapshot["bucket_columns"],
    list[Literal["second", "retries", "gave_up", "recovered", "blocked", "stale"]],
)
served = board.data(rdb.health(), after=snapshot["cursor"])
assert_type(served, web.DashboardData)
assert_type(served["process"]["pid"], int)
assert_type(served["events"], list[web.RecordedEvent])
served_health = served["health"]
if "services" in served_health:  # (a web.HealthProblem when the check failed: ruled out)
    assert_type(served_health, rdb.HealthReport)
    assert_type(served_health["transitions"]["stale_transitions"], int)
else:
    assert_type(served_health, web.HealthProblem)
    assert_type(served_health["problem"], str)
own_check_data = board.data({"ok": True})  # a check of one's own: its value, untyped
assert_type(own_check_data, dict[str, Any])
problem = web.problem_details(rdb.CircuitOpenError("database", 1.0))
assert_type(problem, web.Problem | None)
if problem is not None:
    assert_type(problem.status, int)
    assert_type(problem.headers, dict[str, str])
    assert_type(problem.response_headers, dict[str, str])
    assert_type(web.problem_response(problem), Response)


@fastapi_app.get("/items/{item_id}")
@rdb.with_self_healing(service="database")
async def read_item(item_id: int) -> dict[str, int]:
    return {"id": item_id}


flask_app = Flask(__name__)


@flask_app.errorhandler(Exception)
def flask_problem(exc: Exception) -> Any:
    answer = web.problem_details(exc)
    if answer is None:
        raise exc
    return answer.body, answer.status, answer.response_headers


# -- resilient_db.metrics and resilient_db.otel --------------------------------------------------
collector = metrics.register()
assert_type(collector, metrics.HealthCollector)
server = metrics.serve(9464)
assert_type(server, metrics.MetricsServer)
assert_type(server.url, str)
assert_type(server.registry, CollectorRegistry)
assert_type(list(collector.collect()), list[Metric])
server.close()
otel_hook = otel.install_opentelemetry()
assert_type(otel_hook, otel.OpenTelemetryHook)
otel.uninstall_opentelemetry()


# -- resilient_db.testing ----------------------------------------------------------------------
def pg_server_in_tests() -> Iterator[str]:
    with testing.EmbeddedPostgres() as pg:
        assert_type(pg, testing.EmbeddedPostgres)
        assert_type(pg.url(), str)
        assert_type(pg.port, int)
        pg.restart(crash=True)
        with testing.FaultProxy(pg) as proxy:
            assert_type(proxy, testing.FaultProxy)
            proxy.lose_commit_answer()
            yield proxy.url("app", driver="asyncpg")
    with testing.StandbyPair(synchronous=False) as pair:
        assert_type(pair.promote(), float)
    with testing.RedisServer() as redis_server:
        assert_type(redis_server.url, str)
        assert_type(redis_server.client(decode_responses=True), redis.Redis)
    assert_type(testing.server_from_env(), testing.PostgresServer)
    assert_type(testing.free_port(), int)
    assert_type(testing.server_kind(), str)
    external: testing.PostgresServer = testing.ExternalPostgres("postgresql://x@127.0.0.1/db")
    docker: testing.PostgresServer = testing.DockerPostgres()
    standby = testing.StandbyServer(testing.EmbeddedPostgres(), name="replica")
    assert_type(standby.is_in_recovery(), bool)
    error: type[Exception] = testing.ServerStartError
    control: type[Exception] = testing.ServerControlError
    delayed: testing.DelayedStart = external.restart_after(0.1)
    binary = testing.redis_server_binary()
    yield str((docker, standby, error, control, delayed, binary))


async def awaited() -> None:
    assert_type(await afetch(1), dict[str, int])
    assert_type(await repo.aget(1), bytes)


# -- installs in an Alembic migration (``op`` is a module) and refused targets ------------------
def upgrade() -> None:
    rdb.install_commit_markers(op)
    rdb.install_transition_trigger(op, trigger)


def downgrade() -> None:
    rdb.uninstall_transition_trigger(op, trigger)
    rdb.uninstall_commit_markers(op, lock_timeout=None)


def refused() -> None:
    rdb.install_commit_markers(aengine)  # type: ignore[arg-type]
    rdb.install_commit_markers("postgresql://app@127.0.0.1/app")  # type: ignore[arg-type]
    rdb.install_transition_trigger(aengine, Task)  # type: ignore[arg-type]


def refused_calls() -> None:
    start("1")  # type: ignore[arg-type]
    Sessions.run(complete)  # type: ignore[call-overload]
    Sessions.run(complete, 1, notes="x")  # type: ignore[call-arg]
    rdb.Config(max_retries="3")  # type: ignore[arg-type]
    fetch("1")  # type: ignore[arg-type]
    rdb.TransitionRules(column="s", transitions={b"a": {"b"}}, initial={"a"})  # type: ignore[type-var]
    web.dashboard(auth=lambda: True)  # type: ignore[arg-type, misc]
