"""Wrong arguments are refused where the mistake is made, with an error that names it: not
taken (a truthy string for a flag, a hook that never sees an event, the ``token_auth`` factory
for a check) nor answered later with an error from deep inside (an ``AttributeError`` about
``run_sync`` or ``items``). None of these needs a database: each is refused before any I/O."""

from __future__ import annotations

import asyncio
import errno
import functools
import math
import re
import socket
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db._state import STATE

# never connected to: every call below is refused before anything is sent
_NOWHERE = "postgresql+psycopg://127.0.0.1:9/never"
_NOWHERE_ASYNC = "postgresql+asyncpg://127.0.0.1:9/never"


# -- with_self_healing's flags ----------------------------------------------------------------
@pytest.mark.parametrize("flag", ["use_retry", "use_circuit_breaker"])
@pytest.mark.parametrize("value", ["false", "no", 0, None])
def test_a_flag_that_is_not_a_bool_is_refused_before_the_operation_runs(
    flag: str, value: Any
) -> None:
    """``use_retry="false"`` is truthy: it would retry an operation its caller said is not
    safe to replay. Refused, and the operation is not called."""
    calls: list[int] = []
    # (services an earlier test's factory still holds are not this test's)
    before = set(rdb.health()["services"])
    with pytest.raises(TypeError, match=rf"^with_self_healing's {flag}= takes a bool .*got "):
        rdb.with_self_healing(lambda: calls.append(1), **{flag: value})
    with pytest.raises(TypeError, match=rf"{flag}= takes a bool"):
        rdb.with_self_healing(**{flag: value})  # the decorator form, when it is made
    assert calls == []
    assert set(rdb.health()["services"]) == before  # no breaker made for it


def test_bool_flags_are_taken() -> None:
    assert rdb.with_self_healing(lambda: 7, use_retry=False, use_circuit_breaker=False) == 7


# -- add_hook ---------------------------------------------------------------------------------
async def _async_hook(event: rdb.SelfHealEvent) -> None:
    pass


async def _async_generator_hook(event: rdb.SelfHealEvent) -> AsyncIterator[None]:
    yield


class _AsyncCall:
    async def __call__(self, event: rdb.SelfHealEvent) -> None:
        pass


def _no_argument() -> None:
    pass


def _two_arguments(event: rdb.SelfHealEvent, more: object) -> None:
    pass


def _keyword_needed(event: rdb.SelfHealEvent, *, more: object) -> None:
    pass


@pytest.fixture
def hooks_before() -> Iterator[tuple[Any, ...]]:
    before = STATE.hooks
    yield before
    STATE.hooks = before


@pytest.mark.parametrize(
    "hook",
    [
        _async_hook,
        functools.partial(_async_hook),
        _AsyncCall(),
        functools.partial(_AsyncCall()),
        _async_generator_hook,
    ],
    ids=["async-def", "partial-of-async", "async-call", "partial-of-async-call", "async-gen"],
)
def test_an_async_hook_is_refused(hook: Any, hooks_before: tuple[Any, ...]) -> None:
    """Hooks are called synchronously: an async one's coroutine would never be awaited."""
    with pytest.raises(TypeError, match=r"^add_hook\(\) can't use .*: it is async, and hooks"):
        rdb.add_hook(hook)
    assert STATE.hooks == hooks_before


# the reason is inspect's: Python 3.12+ says which kind of argument is missing
_KEYWORD_ONLY_MISSING = (
    "missing a required keyword-only argument: 'more'"
    if sys.version_info >= (3, 12)
    else "missing a required argument: 'more'"
)


@pytest.mark.parametrize(
    ("hook", "why"),
    [
        (_no_argument, "too many positional arguments"),
        (_two_arguments, "missing a required argument: 'more'"),
        (_keyword_needed, _KEYWORD_ONLY_MISSING),
    ],
)
def test_a_hook_that_cannot_take_the_event_is_refused(
    hook: Any, why: str, hooks_before: tuple[Any, ...]
) -> None:
    """One that takes no argument (or needs more) would fail at every event, said only at
    DEBUG."""
    with pytest.raises(TypeError, match=r"^add_hook\(\) can't use .*hook\(event\)") as raised:
        rdb.add_hook(hook)
    assert hook.__name__ in str(raised.value)
    assert why in str(raised.value)
    assert STATE.hooks == hooks_before


class _SyncCall:
    def __call__(self, event: rdb.SelfHealEvent) -> None:
        pass


class _Unreadable:
    """A callable whose signature can't be read: taken as it is."""

    def __call__(self, *args: Any) -> None:
        pass

    @property
    def __signature__(self) -> Any:
        raise ValueError("no signature")


def test_hooks_that_take_the_event_are_taken(hooks_before: tuple[Any, ...]) -> None:
    seen: list[rdb.SelfHealEvent] = []
    good: list[Any] = [
        seen.append,
        lambda event: None,
        functools.partial(_two_arguments, more=1),
        _SyncCall(),
        _Unreadable(),
        print,
    ]
    for hook in good:
        rdb.add_hook(hook)
    assert STATE.hooks == (*hooks_before, *good)


# -- install_opentelemetry --------------------------------------------------------------------
class _BrokenProvider:
    """A meter provider whose meters can't be made."""

    def get_meter(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("meter provider shut down")


def test_a_wrong_meter_provider_is_refused_and_leaves_the_installed_hook_as_it_was() -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415 - optional extra
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: PLC0415

    from resilient_db.otel import install_opentelemetry, uninstall_opentelemetry  # noqa: PLC0415

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    hook = install_opentelemetry(meter_provider=provider)
    try:
        with pytest.raises(TypeError, match=r"got the class MeterProvider: pass MeterProvider"):
            install_opentelemetry(meter_provider=MeterProvider)
        with pytest.raises(TypeError, match=r"an object with get_meter\(\)\), got str"):
            install_opentelemetry(meter_provider="console")
        with pytest.raises(RuntimeError, match="meter provider shut down"):
            install_opentelemetry(meter_provider=_BrokenProvider())
        # telemetry stayed on, with the hook installed before
        assert hook in STATE.hooks
        assert hook.active
        assert install_opentelemetry(meter_provider=provider) is hook
        assert sum(h is hook for h in STATE.hooks) == 1
        # replacing it with a good provider still swaps them
        other = MeterProvider(metric_readers=[InMemoryMetricReader()])
        new = install_opentelemetry(meter_provider=other)
        assert new is not hook
        assert new.active
        assert not hook.active
        assert new in STATE.hooks
        assert hook not in STATE.hooks
    finally:
        uninstall_opentelemetry()
        provider.shutdown()


# -- dashboard(auth=...) ----------------------------------------------------------------------
def test_the_token_auth_factory_itself_is_refused_as_a_check() -> None:
    """``auth=token_auth`` (not ``token_auth(secret)``) would answer every request 500."""
    pytest.importorskip("starlette")
    from resilient_db.web import dashboard, token_auth  # noqa: PLC0415 - optional extra

    with pytest.raises(TypeError, match=r"auth=token_auth\) passes the factory itself.*"):
        dashboard(auth=token_auth)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"is called as check\(request\).*too many positional"):
        dashboard(auth=_no_argument)  # type: ignore[arg-type]
    assert callable(dashboard(auth=token_auth("s" * 32)).auth)


# -- bypass_transitions_async -----------------------------------------------------------------
@pytest.fixture
def async_engine() -> Iterator[AsyncEngine]:
    engine = create_async_engine(_NOWHERE_ASYNC)
    yield engine
    engine.sync_engine.dispose()  # nothing was ever connected


@pytest.mark.asyncio
async def test_bypass_transitions_async_refuses_what_is_not_async_session_or_connection(
    async_engine: AsyncEngine,
) -> None:
    engine = sa.create_engine(_NOWHERE)
    try:
        expected = r"^bypass_transitions_async\(\) takes an AsyncSession or an AsyncConnection"
        with Session(engine) as session, pytest.raises(TypeError, match=expected + ".*got Session"):
            await rdb.bypass_transitions_async(session, reason="repair")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=expected + ".*got AsyncEngine"):
            await rdb.bypass_transitions_async(async_engine, reason="repair")  # type: ignore[arg-type]
    finally:
        engine.dispose()


@pytest.mark.parametrize("reason", [5, None, b"ticket 4711", ["ticket 4711"]])
def test_a_bypass_reason_that_is_not_a_str_is_a_type_error_naming_it(reason: Any) -> None:
    """A reason of the wrong type is a ``TypeError`` naming ``reason`` and the type given (it
    was the ``ValueError`` of a missing reason); a blank one stays a ``ValueError``."""
    engine = sa.create_engine(_NOWHERE)
    try:
        with Session(engine) as session:
            said = (
                rf"^bypass_transitions\(\) takes reason= as a str .*, got {type(reason).__name__}$"
            )
            with pytest.raises(TypeError, match=said):
                rdb.bypass_transitions(session, reason=reason)
            with pytest.raises(ValueError, match=r"needs a reason="):
                rdb.bypass_transitions(session, reason=" ")
    finally:
        engine.dispose()


@pytest.mark.asyncio
async def test_an_async_bypass_reason_that_is_not_a_str_is_a_type_error_naming_it(
    async_engine: AsyncEngine,
) -> None:
    async with AsyncSession(async_engine) as session:
        with pytest.raises(
            TypeError, match=r"^bypass_transitions_async\(\) takes reason= as a str .*, got int"
        ):
            await rdb.bypass_transitions_async(session, reason=5)  # type: ignore[arg-type]


def test_installs_given_an_async_engine_name_the_call_to_make_on_its_connection(
    async_engine: AsyncEngine,
) -> None:
    """``install_commit_markers(async_engine)``, a newcomer's first try with asyncio, is refused
    naming the function and the ``run_sync`` call that does it (it said "install")."""
    rules = rdb.TransitionRules(column="status", transitions={"new": {"done"}}, initial={"new"})
    jobs = rdb.TransitionTrigger(model="Job", table="jobs", primary_key="id", rules=rules)
    for install, call in [
        (rdb.install_commit_markers, "rdb.install_commit_markers)"),
        (rdb.uninstall_commit_markers, "rdb.uninstall_commit_markers)"),
        (
            functools.partial(rdb.install_transition_trigger, model=jobs),
            "rdb.install_transition_trigger, <the TransitionTrigger>)",
        ),
        (
            functools.partial(rdb.uninstall_transition_trigger, model=jobs),
            "rdb.uninstall_transition_trigger, <the TransitionTrigger>)",
        ),
    ]:
        name = call.split(",")[0].split(")")[0].removeprefix("rdb.")
        with pytest.raises(TypeError) as refused:
            install(async_engine)
        message = str(refused.value)
        assert message.startswith(
            f"{name}() takes an Alembic op, a Connection, an Engine or a Session, got AsyncEngine"
        ), message
        assert f"async with engine.begin() as conn: await conn.run_sync({call}" in message, message
    with pytest.raises(TypeError, match=r"rdb\.install_commit_markers\(c\.engine\)"):
        rdb.install_commit_markers(async_engine)


# -- load_config ------------------------------------------------------------------------------
def test_load_config_refuses_what_is_not_a_mapping_without_showing_it() -> None:
    text = "SELF_HEALING_REDIS_URL=redis://:hunter2@cache:6379/0"
    for read in (rdb.load_config, rdb.reload_config):
        with pytest.raises(TypeError, match=r"^load_config\(environ=...\) takes a mapping") as err:
            read(text)  # type: ignore[arg-type]
        assert "got str" in str(err.value)
        assert "hunter2" not in str(err.value)
    assert rdb.load_config({"SELF_HEALING_ENABLED": "false"}).enabled is False


# -- Classifier -------------------------------------------------------------------------------
def test_is_disconnect_code_takes_no_code_and_follows_the_table() -> None:
    """Whether a connection that met a code must not be used again: never for no code at all
    (an error without SQLSTATE), for the table's lost connections and unknown outcomes, a
    class 08 code outside the table (08P01 included), not for a code the table made another
    outcome (a lost connection made a conflict)."""
    classifier = rdb.Classifier()
    assert classifier.is_disconnect_code(None) is False
    for code in ("57P01", "08007", "08006", "08P01"):
        assert classifier.is_disconnect_code(code), code
    for code in ("40001", "23505", "57014"):
        assert not classifier.is_disconnect_code(code), code
    assert not classifier.with_codes({"57P01": rdb.Outcome.CONFLICT}).is_disconnect_code("57P01")


def test_without_codes_takes_one_code_as_a_string() -> None:
    one = rdb.Classifier().without_codes("40001")
    assert one.codes == rdb.Classifier().without_codes(["40001"]).codes
    assert one.codes["40001"] is rdb.Outcome.NOT_TRANSIENT
    assert one.codes["40P01"] is rdb.Outcome.CONFLICT
    with pytest.raises(TypeError, match=r"^without_codes\(\) takes SQLSTATEs .*got int"):
        rdb.Classifier().without_codes(40001)  # type: ignore[arg-type]


def test_codes_that_are_not_a_mapping_are_refused() -> None:
    with pytest.raises(TypeError, match=r"^with_codes\(\) takes a mapping of SQLSTATE to outcome"):
        rdb.Classifier().with_codes(["40001"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^Classifier\(\) takes a mapping .*got str"):
        rdb.Classifier("40001")  # type: ignore[arg-type]


def test_an_unknown_outcome_is_refused_with_the_outcomes_there_are() -> None:
    for make in (rdb.Classifier, rdb.Classifier().with_codes):
        with pytest.raises(
            ValueError, match=r"'retry' \(for SQLSTATE '40001'\) is not an outcome"
        ) as err:
            make({"40001": "retry"})
        for outcome in rdb.Outcome:
            assert f"Outcome.{outcome.name} ({outcome.value!r})" in str(err.value)
    assert rdb.Classifier({"40001": "conflict"}).codes == {"40001": rdb.Outcome.CONFLICT}


@pytest.mark.parametrize("value", ["no", "false", 0, None])
def test_set_testing_refuses_what_is_not_a_bool(value: Any) -> None:
    """``set_testing("no")`` is truthy: it would switch test mode on (every backoff zeroed)."""
    from resilient_db._retry import _testing  # noqa: PLC0415 - the switch itself

    before = _testing.is_set()
    with pytest.raises(TypeError, match=r"^set_testing\(\) takes a bool \(True or False\), got "):
        rdb.set_testing(value)
    assert _testing.is_set() == before


def test_an_interruption_is_classified_not_transient() -> None:
    """Cancellation, ``KeyboardInterrupt``, ``SystemExit``: no ``Exception``, never replayed."""
    for interruption in (asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(1)):
        assert rdb.classify(interruption) is rdb.Outcome.NOT_TRANSIENT
        assert not rdb.is_transient(interruption)


def test_a_cause_chain_that_loops_is_read_bounded() -> None:
    """An error whose causes loop back (``__cause__`` set by hand: Python checks no loop) is
    classified, not walked forever."""
    first, second = ValueError("first"), ValueError("second")
    first.__cause__, second.__cause__ = second, first
    assert rdb.classify(first) is rdb.Outcome.NOT_TRANSIENT
    assert rdb.sqlstate_of(first) is None


@pytest.mark.parametrize("read", [rdb.classify, rdb.is_transient])
def test_classify_refuses_what_is_not_an_exception_or_a_classifier(read: Any) -> None:
    """A mapping of codes was taken for the built-in table when empty, and failed with an
    AttributeError otherwise; a non-exception was answered "not transient"."""
    name = read.__name__
    error = sa.exc.OperationalError("SELECT 1", {}, ValueError("x"))
    for codes in ({}, {"40001": "not-transient"}):
        with pytest.raises(
            TypeError,
            match=rf"^{name}\(classifier=...\) takes a resilient_db.Classifier .*got dict$",
        ):
            read(error, classifier=codes)
    for value in (None, "40001"):
        with pytest.raises(TypeError, match=rf"^{name}\(\) takes an exception, got "):
            read(value)
    assert read(error, classifier=rdb.Classifier()) in (False, rdb.Outcome.NOT_TRANSIENT)


def test_sqlstate_of_refuses_what_is_not_an_exception() -> None:
    """As classify() and is_transient() do: a string (the code itself, say) failed with an
    AttributeError, and None was answered "no SQLSTATE"."""
    for value in (None, "40001"):
        with pytest.raises(TypeError, match=r"^sqlstate_of\(\) takes an exception, got "):
            rdb.sqlstate_of(value)  # type: ignore[arg-type]
    assert rdb.sqlstate_of(ValueError("x")) is None


# -- resilient_db.metrics ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("port", "addr", "error", "message"),
    [
        (-1, "127.0.0.1", ValueError, r"^serve\(\) takes a port from 0 to 65535 .*got -1$"),
        (70000, "127.0.0.1", ValueError, r"^serve\(\) takes a port from 0 to 65535"),
        ("9100", "127.0.0.1", TypeError, r"^serve\(\) takes a port number .*got '9100'$"),
        (True, "127.0.0.1", TypeError, r"^serve\(\) takes a port number .*got True$"),
        (0, None, TypeError, r"^serve\(addr=...\) takes the address .*got None$"),
        (0, " ", ValueError, r"^serve\(addr=...\) takes the address .*got ' '$"),
    ],
    ids=["negative", "too-large", "str", "bool", "addr-None", "addr-blank"],
)
def test_metrics_serve_refuses_a_bad_port_or_address_before_listening(
    port: Any, addr: Any, error: type[Exception], message: str
) -> None:
    """They failed inside the socket layer (``gaierror: Servname not supported``,
    ``OverflowError``, ``OSError: Int or String expected``); ``addr=None`` listened on every
    interface (0.0.0.0), where the default is 127.0.0.1."""
    pytest.importorskip("prometheus_client")
    from resilient_db import metrics  # noqa: PLC0415 - optional extra

    with pytest.raises(error, match=message):
        metrics.serve(port, addr=addr)


def test_metrics_register_and_collector_refuse_what_they_cant_use() -> None:
    pytest.importorskip("prometheus_client")
    from resilient_db import metrics  # noqa: PLC0415 - optional extra

    with pytest.raises(TypeError, match=r"^register\(\) takes a prometheus_client .*got str$"):
        metrics.register("default")
    with pytest.raises(TypeError, match=r"^HealthCollector\(health=...\) takes a function .*dict"):
        metrics.HealthCollector({"healthy": True})  # type: ignore[arg-type]


# -- resilient_db.web: problem_details, problem_response, Recorder ----------------------------
def test_web_helpers_refuse_what_they_cant_use() -> None:
    """``problem_details(exc, config=1)`` answered None for most errors and failed with an
    AttributeError (inside an exception handler) for the others; ``problem_response(None)``
    and ``Recorder(max_events="5")``/``Recorder(clock=5)`` failed with errors naming nothing."""
    pytest.importorskip("starlette")
    from resilient_db.web import (  # noqa: PLC0415 - optional extra
        Recorder,
        problem_details,
        problem_response,
    )

    error = rdb.CircuitOpenError("orders", 3.0)
    with pytest.raises(TypeError, match=r"^problem_details\(config=...\) needs a .*got int$"):
        problem_details(ValueError("not ours"), config=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^problem_details\(type_base=...\) must be a string"):
        problem_details(error, type_base=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^problem_response\(\) takes a Problem .*NoneType$"):
        problem_response(problem_details(ValueError("not ours")))  # type: ignore[arg-type]
    problem = problem_details(error)
    assert problem is not None
    assert problem_response(problem).status_code == 503
    with pytest.raises(TypeError, match=r"^Recorder\(max_events=...\) takes a whole number"):
        Recorder(max_events="5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^Recorder\(window=...\) takes a whole number"):
        Recorder(window=60.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^Recorder\(clock=...\) takes a function"):
        Recorder(clock=5)  # type: ignore[arg-type]


def test_web_helpers_refuse_what_is_no_exception_and_numbers_too_large() -> None:
    """``problem_details("boom")`` (or the class ``ValueError``) failed with an AttributeError
    inside the application's exception handler, ``problem_details(None)`` with a TypeError
    naming classify(); ``Recorder(max_events=10**30)`` failed with an OverflowError naming
    nothing, and ``Recorder(window=10**30)`` was taken and then failed in the hook at the first
    event of each service (logged at DEBUG: the dashboard showed no plots, unexplained);
    ``snapshot(events=-1)`` gave all events but the first."""
    pytest.importorskip("starlette")
    from resilient_db.web import Recorder, problem_details  # noqa: PLC0415 - optional extra

    for thing, shown in (("boom", "str"), (ValueError, "type"), (None, "NoneType")):
        with pytest.raises(
            TypeError, match=rf"^problem_details\(\) takes an exception, got {shown}$"
        ):
            problem_details(thing)  # type: ignore[arg-type]
    for name in ("max_events", "window"):
        with pytest.raises(ValueError, match=rf"^Recorder\({name}=...\) must be at most [0-9,]+"):
            Recorder(**{name: 10**30})
    assert Recorder(max_events=100_000, window=86_400).window == 86_400
    rec = Recorder()
    for n in range(3):
        rec(rdb.SelfHealEvent(name="retry", service="s", level=30, message=str(n), fields={}))
    assert [e["message"] for e in rec.snapshot(events=2)["events"]] == ["1", "2"]
    for events in (-1, 1.5, "2", True):
        with pytest.raises((TypeError, ValueError), match=r"^Recorder.snapshot\(events=...\)"):
            rec.snapshot(events=events)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^Recorder.snapshot\(after=...\) takes a cursor"):
        rec.snapshot(after=5)  # type: ignore[arg-type]


def test_metrics_serve_names_the_address_it_cant_listen_on() -> None:
    """A port another process holds raised ``OSError: [Errno 98] Address already in use``,
    naming neither the port nor the address (the application's log showed no more)."""
    pytest.importorskip("prometheus_client")
    from resilient_db import metrics  # noqa: PLC0415 - optional extra

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(
            OSError, match=rf"serve\(\) can't listen on 127\.0\.0\.1:{port}: "
        ) as info:
            metrics.serve(port)
    assert info.value.errno == errno.EADDRINUSE  # (the error's number kept, for code testing it)


def test_metrics_serve_url_of_an_ipv6_address_is_bracketed() -> None:
    """``serve(addr="::1")`` listened, but its ``url`` was ``http://::1:PORT/metrics``, which no
    HTTP client can use (an IPv6 host is written in brackets in a URL)."""
    pytest.importorskip("prometheus_client")
    from resilient_db import metrics  # noqa: PLC0415 - optional extra

    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        served = metrics.serve(0, addr="::1")
    except OSError as exc:  # (a host without IPv6 loopback)
        pytest.skip(f"can't listen on ::1: {exc}")
    try:
        assert re.fullmatch(r"http://\[::1\]:[0-9]+/metrics", served.url), served.url
        with urllib.request.urlopen(served.url, timeout=10) as answer:
            assert b"resilient_db_healthy" in answer.read()
    finally:
        served.close()


# -- the errors an application raises itself -------------------------------------------------
def test_a_circuit_open_error_of_any_wait_is_made_and_answered() -> None:
    """A ``CircuitOpenError`` an application raises itself, with a wait too long to say in
    tenths (``1e308``), failed in its own constructor with an OverflowError (and so in the
    handler that would answer it); one whose wait is no number failed comparing it to 0.0."""
    pytest.importorskip("starlette")
    from resilient_db.web import problem_details  # noqa: PLC0415 - optional extra

    for seconds in (1e308, math.inf, math.nan, -1.0, 10**400):
        error = rdb.CircuitOpenError("orders", seconds)
        assert "; retry in " in str(error)
        problem = problem_details(error)
        assert problem is not None
        assert problem.status == 503
    with pytest.raises(TypeError, match=r"^CircuitOpenError\(retry_after=...\) takes a number of"):
        rdb.CircuitOpenError("orders", "5")  # type: ignore[arg-type]


# -- numbers past a float's range -------------------------------------------------------------
def test_a_whole_number_too_large_for_a_float_is_refused_naming_the_argument(
    engine: sa.Engine, service: str
) -> None:
    """``10**400`` failed with ``OverflowError: int too large to convert to float``, naming
    neither the argument nor the function, where any other number out of range is a
    ``ValueError`` naming both (Config's settings already were)."""
    pytest.importorskip("starlette")
    from resilient_db.testing import FaultProxy  # noqa: PLC0415 - only here
    from resilient_db.web import dashboard, token_auth  # noqa: PLC0415 - optional extra

    huge = 10**400
    rdb.ResilientSession(engine, service=service)
    with pytest.raises(ValueError, match=r"^open_breaker\(\): seconds must be .*, got 401 digits$"):
        rdb.open_breaker(service, seconds=huge)
    with pytest.raises(ValueError, match=r"^dashboard\(poll_seconds=...\) must be .*401 digits$"):
        dashboard(auth=token_auth("t" * 16), poll_seconds=huge)
    with pytest.raises(ValueError, match=r"^lock_timeout must be .*, got 401 digits$"):
        rdb.install_commit_markers(engine, lock_timeout=huge)
    with (
        FaultProxy(("127.0.0.1", 1)) as proxy,
        pytest.raises(ValueError, match=r"^latency must be a finite number .*401 digits$"),
    ):
        proxy.latency(huge)


# -- the session factories ----------------------------------------------------------------
def test_a_factory_given_the_other_kinds_sleep_is_refused() -> None:
    """``AsyncResilientSession(sleep=time.sleep)`` would block the event loop in each backoff
    (or, as a session argument, fail at the first unit); ``ResilientSession(asleep=...)``
    would never be awaited. Each is refused when the factory is made, naming the one to give."""
    engine = sa.create_engine(_NOWHERE)
    async_engine = create_async_engine(_NOWHERE_ASYNC)
    try:
        with pytest.raises(TypeError, match=r"^ResilientSession takes sleep= .*not asleep=$"):
            rdb.ResilientSession(engine, asleep=_async_hook)
        with pytest.raises(TypeError, match=r"^AsyncResilientSession takes asleep= .*not sleep=$"):
            rdb.AsyncResilientSession(async_engine, sleep=lambda seconds: None)
    finally:
        engine.dispose()
        async_engine.sync_engine.dispose()


def test_a_sync_generator_function_is_refused_as_a_unit(service: str) -> None:
    """A generator function's body runs only when its result is iterated: after the unit
    committed and closed its session (its statements would run outside any unit, or not at
    all). Refused by ``run``, ``run_in`` and ``transactional``, before anything is sent."""

    def rows(session: Session) -> Iterator[int]:
        yield session.execute(sa.text("SELECT 1")).scalar_one()

    engine = sa.create_engine(_NOWHERE)
    Session = rdb.ResilientSession(engine, service=service)
    generator_function = r"\.rows is a generator function: its body would run only when"
    try:
        with pytest.raises(TypeError, match=generator_function):
            Session.run(rows)
        with pytest.raises(TypeError, match=generator_function):
            Session.transactional(rows)
        with Session() as session, pytest.raises(TypeError, match=generator_function):
            Session.run_in(session, rows)
        assert rdb.health()["services"][service]["counters"]["attempts"] == 0
    finally:
        engine.dispose()


def test_run_in_refuses_what_is_not_a_session_of_the_factory(service: str) -> None:
    """``run_in`` given the engine (or the async factory's session) instead of one of the
    factory's sessions: refused, naming what it got (not an ``AttributeError`` from inside);
    a plain SQLAlchemy ``Session`` is refused as not the factory's."""
    engine = sa.create_engine(_NOWHERE)
    async_engine = create_async_engine(_NOWHERE_ASYNC)
    Session = rdb.ResilientSession(engine, service=service)
    not_a_session = r"^run_in\(\) needs a session made by this factory, got {}$"
    try:
        with pytest.raises(TypeError, match=not_a_session.format("Engine")):
            Session.run_in(engine, lambda s: None)  # type: ignore[type-var]
        with pytest.raises(TypeError, match=not_a_session.format("AsyncSession")):
            Session.run_in(sa.ext.asyncio.AsyncSession(async_engine), lambda s: None)  # type: ignore[type-var]
        with (
            sa.orm.Session(engine) as plain,
            pytest.raises(TypeError, match=r"^run_in\(\) runs only in a session made by this "),
        ):
            Session.run_in(plain, lambda s: None)
        assert rdb.health()["services"][service]["counters"]["attempts"] == 0
    finally:
        engine.dispose()
        async_engine.sync_engine.dispose()


def test_async_transactional_refuses_a_method_which_would_get_the_session_as_self(
    service: str,
) -> None:
    """As the sync factory's ``transactional``: decorated in its class, an async method would
    be called with the session as ``self`` and the instance as the session."""
    engine = create_async_engine(_NOWHERE_ASYNC)
    Session = rdb.AsyncResilientSession(engine, service=service)
    try:
        with pytest.raises(TypeError, match=r"Repo\.get takes 'self' first, but transactional "):

            class Repo:
                @Session.transactional
                async def get(self, session: Any, n: int) -> int:
                    return n

        async def by_class(cls: Any, session: Any) -> None:
            pass

        with pytest.raises(TypeError, match=r"takes 'cls' first"):
            Session.transactional(by_class)
    finally:
        engine.sync_engine.dispose()
