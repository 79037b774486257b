"""Shared test setup.

The fixtures (``pg_server``, ``pg_database``, ``pg_url``, ``fault_proxy``) and the
``server_control`` marker come from the ``resilient_db`` pytest plugin
(:mod:`resilient_db.testing._pytest_plugin`), which the package's ``pytest11`` entry point loads.
``two_phase_server`` is the suite's, for the tests that need PREPARE TRANSACTION.
``pg_async_url`` is the plugin's, for the driver of ``async_driver`` (asyncpg, unless a module
runs its tests on both async drivers: see ``scenarios.ASYNC_DRIVERS``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, Final

import pytest
import pytest_asyncio
import sqlalchemy as sa
from fleet import Gate
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from scenarios import RAISE_CODE_FUNCTION
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import resilient_db as rdb
from resilient_db import _statements
from resilient_db.otel import install_opentelemetry, uninstall_opentelemetry
from resilient_db.testing import EmbeddedPostgres, PostgresServer, server_kind


def _hangup_heard(signum: int, frame: object) -> None:
    """SIGHUP in a test run started under ``nohup``: ignored (see pytest_configure)."""


def pytest_configure(config: pytest.Config) -> None:
    # running from a source tree that is not pip-installed: no entry point, load the plugin here
    if not config.pluginmanager.has_plugin("resilient_db"):
        config.pluginmanager.import_plugin("resilient_db.testing._pytest_plugin")
    # A run started in the background by a shell without job control (``make test &`` in a
    # script) inherits SIGINT ignored, and Python then makes no KeyboardInterrupt of it: the
    # tests that interrupt with a real SIGINT (and the processes they start, which inherit an
    # ignored signal but not a handler) need Python's own.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # Likewise a run under ``nohup`` inherits SIGHUP ignored, and so would every program the
    # tests start (an ignored signal survives exec): the tests of what a hangup does would see
    # none. A handler that does nothing keeps this process as deaf to it, and is not inherited
    # by a program it starts (handlers go back to the default at exec).
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _hangup_heard)
    # RESILIENT_DB_TEST_LOOP=uvloop: every event loop of the run is uvloop's (pytest-asyncio's,
    # asyncio.run's, the test clients' portals), to run any test file on it
    loop = os.environ.get("RESILIENT_DB_TEST_LOOP", "asyncio")
    if loop == "uvloop":
        import uvloop  # noqa: PLC0415  (only for this run)

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    elif loop != "asyncio":
        raise pytest.UsageError(f"RESILIENT_DB_TEST_LOOP={loop!r}: asyncio or uvloop")
    # Under pytest-xdist the workers order the files (see pytest_collection_modifyitems): the
    # controller hands them out in that order, not re-sorted by their number of tests
    if getattr(config.option, "loadscopereorder", False):
        config.option.loadscopereorder = False


#: Seconds each of the longest test files takes (its tests' wall times added up, in a run of the
#: whole suite, ``-n 2 --dist loadfile``, on a busy 2-core machine: what counts is their order).
#: ``--dist loadfile`` gives a worker a whole file at a time, the next in collection order when
#: it is nearly done: a long file handed out last keeps one worker busy while the other has
#: nothing left. The workers collect these first, longest first; the other files follow, the
#: ones with more tests first (pytest-xdist's own order). Only the order changes: each file
#: still runs whole, on one worker, its tests in their order. A file missing here starts later.
FILE_SECONDS: dict[str, float] = {
    "test_harness.py": 215,
    "test_sync_replication.py": 179,
    "test_dropin.py": 102,
    "test_demo_fleet.py": 78,
    "test_failover_review.py": 69,
    "test_failover.py": 63,
    "test_frozen_server.py": 58,
    "test_fleet_restore.py": 50,
    "test_fleet_redis_generation.py": 30,
    "test_guard_bulk_paths.py": 49,
    "test_dashboard_browser.py": 46,
    "test_bench_large.py": 45,
    "test_demo.py": 43,
    "test_saved_then_interrupted.py": 41,
    "test_commit_interrupted.py": 38,
    "test_fleet_breaker.py": 35,
    "test_session_async.py": 30,
    "test_commit_markers.py": 27,
    "test_migrations.py": 27,
    "test_engine_lifetime.py": 26,
    "test_fleet_review.py": 24,
    "test_sync_unit_coroutine.py": 23,
    "test_cold_start.py": 22,
    "test_commit_protocol_async.py": 22,
    "test_server_settings.py": 22,
    "test_soak.py": 21,
    "test_commit_unseen_writes.py": 20,
    "test_transitions.py": 20,
    "test_commit_statements.py": 19,
    "test_pool_configurations.py": 18,
    "test_startup_installs.py": 18,
    "test_fleet_probe.py": 17,
    "test_breaker_settings.py": 16,
    "test_statement_judge_fuzz.py": 16,
    "test_transaction_timeout.py": 16,
    "test_cli.py": 15,
    "test_classify_driver_errors.py": 15,
    "test_binds.py": 15,
    "test_async_cancel_sweep.py": 14,
    "test_session.py": 14,
    "test_fleet_acl.py": 14,
    "test_commit_protocol.py": 12,
    "test_celery.py": 12,
}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a pytest-xdist worker, the files longest first (:data:`FILE_SECONDS`); a run in one
    process keeps pytest's order."""
    if not hasattr(config, "workerinput"):
        return
    by_file: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_file.setdefault(item.nodeid.partition("::")[0], []).append(item)
    files = sorted(
        by_file,
        key=lambda name: (-FILE_SECONDS.get(name.rpartition("/")[2], 0.0), -len(by_file[name])),
    )
    items[:] = [item for name in files for item in by_file[name]]


@pytest.fixture(autouse=True)
def _fresh_self_healing_state() -> Iterator[None]:
    """Breakers and counters are process-wide (one per service): start every test clean."""
    yield
    rdb.reset_state()


#: the major version of each server asked (its ``server_version_num`` // 10000)
_server_majors: dict[PostgresServer, int] = {}


def server_major(server: PostgresServer) -> int:
    """The major version of ``server`` (15, 18, ...), asked once per server."""
    major = _server_majors.get(server)
    if major is None:
        major = int(server.execute("SHOW server_version_num")[0][0]) // 10000
        _server_majors[server] = major
    return major


@pytest.fixture(autouse=True)
def _server_version_needed(request: pytest.FixtureRequest) -> None:
    """``@pytest.mark.server_version(17, "transaction_timeout")``: the test (or every test of a
    module with it in ``pytestmark``) needs that PostgreSQL feature, which servers older than
    that major version lack: skipped on them, saying so (``RESILIENT_DB_TEST_PG_BIN``,
    ``RESILIENT_DB_TEST_URL`` run the suite on older ones)."""
    marker = request.node.get_closest_marker("server_version")
    if marker is None:
        return
    needed, feature = marker.args
    server: PostgresServer = request.getfixturevalue("pg_server")
    have = server_major(server)
    if have < needed:
        pytest.skip(f"{feature} needs PostgreSQL {needed}+ (the server is PostgreSQL {have})")


#: what the two-phase tests' embedded server adds to the harness's settings: PostgreSQL's
#: default, 0, refuses PREPARE TRANSACTION (which tests on ``pg_server`` rely on)
TWO_PHASE_SETTINGS: Final[Mapping[str, str]] = {"max_prepared_transactions": "4"}


@pytest.fixture(scope="session")
def two_phase_server(request: pytest.FixtureRequest) -> Iterator[PostgresServer]:
    """A server that takes PREPARE TRANSACTION (``max_prepared_transactions`` above 0).

    Where the suite's server is embedded: another embedded one with
    :data:`TWO_PHASE_SETTINGS`, started when a test first asks for it (under pytest-xdist, once
    per worker that runs such a test; none on the others) and closed at the session's end,
    whatever the tests did. Where it is given (``RESILIENT_DB_TEST_URL``, or Docker's): that
    server itself when its ``max_prepared_transactions`` is above 0; else every test that
    needs this one is skipped, naming the setting. Tests make databases of their own on it
    (and roll back what they leave prepared: a pending one blocks the database's drop)."""
    if server_kind() == "embedded":
        with EmbeddedPostgres(settings=TWO_PHASE_SETTINGS) as own:
            yield own
        return
    given: PostgresServer = request.getfixturevalue("pg_server")
    have = int(given.execute("SHOW max_prepared_transactions")[0][0])
    if have <= 0:
        pytest.skip(
            f"needs PREPARE TRANSACTION: the given server has max_prepared_transactions = {have}"
            " (above 0 runs these tests)"
        )
    yield given


_services = itertools.count()


@pytest.fixture
def trusted_calls() -> Iterator[None]:
    """The built-ins' names trusted again after the test (a database's function under one of
    them distrusts it for the process: see resilient_db._statements.distrust_calls)."""
    yield
    _statements._trusted_calls = _statements._SAFE_CALLS
    _statements.forget_verdicts()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No SELF_HEALING_* variables from the machine running the tests. Afterwards the
    environment is restored and the process's configuration read again from it: a test that
    reloaded it (a Redis URL, say) leaves nothing to the factories of the tests after it."""
    for name in list(os.environ):
        if name.startswith("SELF_HEALING_"):
            monkeypatch.delenv(name)
    yield monkeypatch
    monkeypatch.undo()
    rdb.reload_config()


@pytest.fixture
def service(request: pytest.FixtureRequest) -> str:
    """A service name of the test's own (breakers and budgets are per service, process-wide),
    named after its module."""
    return f"{request.module.__name__.rpartition('.')[2]}-{next(_services)}"


@pytest.fixture
def async_driver() -> str:
    """The async driver of ``pg_async_url`` (and of a module's proxied engines)."""
    return "asyncpg"


@pytest.fixture
def pg_async_url(pg_server: PostgresServer, pg_database: str, async_driver: str) -> str:
    """SQLAlchemy URL of this test's database, for ``create_async_engine`` with ``async_driver``."""
    return pg_server.url(pg_database, driver=async_driver)


@pytest_asyncio.fixture
async def aengine(pg_async_url: str) -> AsyncIterator[AsyncEngine]:
    """A plain async engine on this test's database (``async_driver``'s), disposed after it.
    A module whose engine needs more (tables first, another fixture before it) has its own."""
    engine = create_async_engine(pg_async_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def no_backoff() -> Iterator[None]:
    """Retries without waiting: the delays are shrunk by configuration, never slept.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("no_backoff")``."""
    with rdb.set_testing():
        yield


@pytest_asyncio.fixture
async def made_async_engines() -> AsyncIterator[list[AsyncEngine]]:
    """Async engines a test makes (it appends them), disposed of after it."""
    made: list[AsyncEngine] = []
    yield made
    for engine in made:
        await engine.dispose()


@pytest.fixture
def events() -> Iterator[list[rdb.SelfHealEvent]]:
    """Every self-healing action while the test runs (a hook on the one emitter)."""
    seen: list[rdb.SelfHealEvent] = []
    rdb.add_hook(seen.append)
    yield seen
    rdb.remove_hook(seen.append)


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    """An engine on the test's database with ``raise_code(sqlstate)`` installed
    (``scenarios.RAISE_CODE_FUNCTION``), for the modules that define no ``engine`` of their own
    (a module's own fixture of that name replaces this one)."""
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(RAISE_CODE_FUNCTION)
    yield engine
    engine.dispose()


@pytest.fixture
def second_database(pg_server: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """Name of a database beside ``pg_database`` on the test's server, for tests over two
    databases (named after the module), dropped after the test."""
    module = request.module.__name__.rpartition(".")[2].removeprefix("test_")
    name = f"t_{module}_{uuid.uuid4().hex[:10]}"
    pg_server.create_database(name)
    try:
        yield name
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def engines(
    pg_server: PostgresServer, pg_database: str, second_database: str
) -> Iterator[tuple[sa.Engine, sa.Engine]]:
    """An engine (psycopg) on the test's database and one on ``second_database``, for the
    modules that define no ``engines`` of their own (a module's own fixture of that name
    replaces this one, and may ask for it)."""
    made = (
        sa.create_engine(pg_server.url(pg_database)),
        sa.create_engine(pg_server.url(second_database)),
    )
    yield made
    for eng in made:
        eng.dispose()


@pytest.fixture
def gate(pg_url: str) -> Iterator[Gate]:
    """The fleet tests' switch for the database's answer (``fleet.Gate``)."""
    g = Gate(pg_url)
    yield g
    g.close()


@pytest.fixture
def otel() -> Iterator[tuple[Any, InMemorySpanExporter, InMemoryMetricReader]]:
    """OpenTelemetry installed on in-memory providers: a tracer, the finished spans, the metric
    reader; uninstalled after the test."""
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    install_opentelemetry(meter_provider=meter_provider)
    yield tracer_provider.get_tracer("test"), spans, reader
    uninstall_opentelemetry()
    meter_provider.shutdown()
    tracer_provider.shutdown()
