"""The dashboard in a real headless browser (Debian's Chromium driven by its chromedriver through
Selenium): the page loads and shows the services and their breaker states, updates by itself
after a real fault (a breaker opened by refused connections through the fault proxy), keeps
markup from the database as text, refuses without authorisation; and during ``resilient-db demo
--dashboard-port`` it shows the demo's service and its breaker opening. Screenshots are kept under
``build/test-artifacts/`` (or ``$RESILIENT_DB_TEST_ARTIFACTS``).

Skipped, saying so, where no Chromium and chromedriver are installed (``.ci/run`` installs them
with apt where it can)."""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session
from test_dashboard import share_as_another_process

import resilient_db as rdb
from resilient_db._state import STATE
from resilient_db.examples.tasks import Base, Task, create_task
from resilient_db.testing import FaultProxy, PostgresServer, RedisServer
from resilient_db.web import dashboard, token_auth
from resilient_db.web._serve import BackgroundServer, serve_in_background

pytestmark = pytest.mark.usefixtures("no_backoff")

webdriver = pytest.importorskip("selenium.webdriver")

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "browser-test-token-" + uuid.uuid4().hex
XSS = '<img src=x onerror="window.__xss = 1">'
_services = itertools.count()


def artifacts() -> Path:
    where = Path(os.environ.get("RESILIENT_DB_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts"))
    where.mkdir(parents=True, exist_ok=True)
    return where


def _chromium() -> tuple[str, str] | None:
    browser = next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p),
        None,
    )
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    found = _chromium()
    if found is None:
        pytest.skip(
            "no headless browser: needs Chromium and chromedriver on PATH (Debian: apt-get "
            "install chromium chromium-driver; .ci/run installs them where apt works)"
        )
    binary, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1300",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver_path)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def updates(browser: Any) -> int:
    """How many times the page has refreshed its data."""
    return int(browser.find_element("tag name", "body").get_attribute("data-updates") or 0)


def next_refresh(browser: Any) -> None:
    """Wait until the page has refreshed once more (its plots drawn from newer data)."""
    seen = updates(browser)
    wait_for("one more refresh", lambda: updates(browser) > seen)


def wait_for(what: str, condition: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except Exception:  # the page is being re-rendered: ask again
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def breaker_state(driver: Any, service: str) -> str | None:
    state: str | None = driver.execute_script(
        "const card = Array.from(document.querySelectorAll('section.service'))"
        ".find(c => c.dataset.service === arguments[0]);"
        "return card ? card.querySelector('.pill.breaker').dataset.state : null;",
        service,
    )
    return state


def counter(driver: Any, service: str, name: str) -> int:
    value = driver.execute_script(
        "const card = Array.from(document.querySelectorAll('section.service'))"
        ".find(c => c.dataset.service === arguments[0]);"
        "const box = card && card.querySelector(`[data-counter='${arguments[1]}'] .v`);"
        "return box ? box.textContent : null;",
        service,
        name,
    )
    return int(value) if value is not None else -1


@pytest.fixture
def served() -> Iterator[BackgroundServer]:
    app = dashboard(auth=token_auth(TOKEN), title="orders API", poll_seconds=0.3)
    with serve_in_background(app) as server:
        yield server


def test_page_shows_services_updates_after_a_real_fault_and_refuses_strangers(
    browser: Any,
    served: BackgroundServer,
    fault_proxy: FaultProxy,
    pg_database: str,
    pg_url: str,
) -> None:
    direct = sa.create_engine(pg_url)
    Base.metadata.create_all(direct)
    rdb.install_commit_markers(direct)
    proxied = sa.create_engine(fault_proxy.url(pg_database), connect_args={"connect_timeout": 2})
    n = next(_services)
    orders, reports = f"orders-{n}", f"reports-{n}"
    Orders = rdb.ResilientSession(direct, service=orders, config=rdb.Config())
    Reports = rdb.ResilientSession(
        proxied, service=reports, config=rdb.Config(max_retries=1, failure_threshold=3)
    )
    try:

        def add(session: Session) -> int:
            task = create_task(session, title="t", idem_key=str(uuid.uuid4()))
            session.flush()
            return task.id

        task_id = Orders.run(add)
        assert Reports.run(lambda s: s.scalar(sa.select(sa.func.count()).select_from(Task))) == 1

        # the page, with the token in its URL (taken out of the address bar, on in a header)
        browser.get(f"{served.url}/?token={TOKEN}")
        wait_for("both services", lambda: breaker_state(browser, reports) == "closed")
        assert breaker_state(browser, orders) == "closed"
        assert browser.title == "orders API"
        assert browser.find_element("id", "overall").text == "healthy"

        # markup from the database is shown as text: a state that is no state, blocked
        def smuggle(session: Session) -> None:
            task = session.get(Task, task_id)
            assert task is not None
            task.status = XSS
            session.flush()

        with pytest.raises(rdb.IllegalTransitionError):
            Orders.run(smuggle)
        shown = wait_for(
            "the blocked transition in the event list",
            lambda: [
                row.text
                for row in browser.find_elements("css selector", "tr[data-event]")
                if "transition_blocked" in row.text and "onerror" in row.text
            ],
        )
        assert XSS in shown[0]
        assert browser.execute_script("return window.__xss === undefined")
        assert browser.find_elements("css selector", "main img") == []

        # a real fault: the reports database refuses connections; units fail until the
        # breaker opens, and the page follows without being reloaded
        refreshed = updates(browser)
        fault_proxy.refuse(cut=True)
        for _ in range(10):
            try:
                Reports.run(lambda s: s.execute(sa.text("SELECT 1")))
            except rdb.CircuitOpenError:
                break
            except sa.exc.DBAPIError:
                continue
        assert rdb.health()["services"][reports]["breaker"]["state"] == "open"
        wait_for("the open breaker on the page", lambda: breaker_state(browser, reports) == "open")
        assert updates(browser) > refreshed
        assert breaker_state(browser, orders) == "closed"
        overall = browser.find_element("id", "overall").text
        assert overall == f"degraded: breaker open for {reports}"
        assert counter(browser, reports, "breaker_opens") == 1
        assert counter(browser, reports, "gave_up") >= 1
        next_refresh(browser)  # the plot has the open segment
        browser.save_screenshot(str(artifacts() / "dashboard-fault.png"))

        # no token (nor the cookie the page's answer set), a wrong token: refused, nothing of
        # the dashboard shown
        browser.delete_all_cookies()
        browser.get(f"{served.url}/")
        assert "Authentication needed" in browser.page_source
        assert browser.find_elements("css selector", "section.service") == []
        browser.get(f"{served.url}/?token=wrong")
        assert "Forbidden" in browser.page_source
        browser.get(f"{served.url}/data.json")
        assert "Authentication needed" in browser.page_source
        assert reports not in browser.page_source
    finally:
        fault_proxy.restore()
        proxied.dispose()
        direct.dispose()


#: run before the page's own script: records the delay of every timer the page sets
_RECORD_TIMERS = (
    "window.__delays = [];"
    "const setTimer = window.setTimeout;"
    "window.setTimeout = function (fn, delay, ...rest) {"
    "  window.__delays.push(delay); return setTimer(fn, delay, ...rest); };"
)


def test_page_polls_as_often_as_asked_and_says_which_services_have_no_plots(
    browser: Any, pg_url: str
) -> None:
    """``poll_seconds=0.1`` (the least ``dashboard()`` takes) is what the page polls at, not a
    floor of its own (it was 0.5 s); and with more services than the recorder keeps series
    for, the page says which have no plots (the service's card, and a note above) instead of
    showing empty plots."""
    from resilient_db.web import Recorder  # noqa: PLC0415
    from resilient_db.web._dashboard import REQUEST_TIMEOUT_SECONDS  # noqa: PLC0415
    from resilient_db.web._recorder import MAX_SERVICES  # noqa: PLC0415

    n = next(_services)
    left = f"left-out-{n}"
    engine = sa.create_engine(pg_url)
    Sessions = rdb.ResilientSession(engine, service=left)  # health() lists it
    rec = Recorder()
    for k in range(MAX_SERVICES):  # as many services active as series are kept
        rec(rdb.SelfHealEvent(name="retry", service=f"busy-{k}", level=30, message="", fields={}))
    rec(rdb.SelfHealEvent(name="retry", service=left, level=30, message="", fields={}))
    app = dashboard(auth=token_auth(TOKEN), recorder=rec, poll_seconds=0.1)
    try:
        with serve_in_background(app) as server:
            browser.execute_cdp_cmd(
                "Page.addScriptToEvaluateOnNewDocument", {"source": _RECORD_TIMERS}
            )
            browser.get(f"{server.url}/?token={TOKEN}")
            wait_for("three refreshes", lambda: updates(browser) >= 3)
            delays = browser.execute_script("return window.__delays")
            # (the other timer each request sets: its own timeout, which gives it up)
            given_up_after = round(REQUEST_TIMEOUT_SECONDS * 1000)
            polls = [d for d in delays if d != given_up_after]
            assert polls
            assert set(polls) == {100}, delays
            note = browser.execute_script("return document.getElementById('left-out').textContent")
            assert f"at most {MAX_SERVICES} services" in note
            assert left in note
            shown = browser.execute_script(
                "const card = Array.from(document.querySelectorAll('section.service'))"
                ".find(c => c.dataset.service === arguments[0]);"
                "const note = card && card.querySelector('[data-left-out]');"
                "return note ? note.textContent : null;",
                left,
            )
            assert shown is not None
            assert "no plots" in shown
            browser.save_screenshot(str(artifacts() / "dashboard-left-out.png"))
    finally:
        del Sessions
        engine.dispose()


def test_page_says_why_a_failed_health_check_is_not_healthy(browser: Any) -> None:
    """A ``health=`` check that raises is said in ``health.problem``, and the page shows it
    ("degraded: breaker open for " with no breaker named said nothing)."""

    def failing() -> dict[str, Any]:
        raise ConnectionRefusedError("no database")

    app = dashboard(auth=token_auth(TOKEN), health=failing, poll_seconds=0.1)
    with serve_in_background(app) as server:
        browser.get(f"{server.url}/?token={TOKEN}")
        wait_for("a refresh", lambda: updates(browser) >= 1)
        overall = browser.find_element("id", "overall").text
    assert overall == "degraded: the dashboard's health() check failed: ConnectionRefusedError"


def test_page_says_it_is_not_updating_while_data_json_gives_no_answer(
    browser: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``data.json`` that does not answer (a sync check waiting for a threadpool that the
    application's endpoints fill in an outage, a connection gone quiet) is given up after the
    page's request timeout: the page says it is not updating and polls on. Before, the page
    waited for it for good, still saying "live" and showing the last answer (healthy) as it
    was: no sign that what it showed was stale."""
    from resilient_db.web import _dashboard  # noqa: PLC0415

    monkeypatch.setattr(_dashboard, "REQUEST_TIMEOUT_SECONDS", 1.0)
    answering = threading.Event()
    answering.set()
    gone_quiet = threading.Event()

    def check() -> dict[str, Any]:  # a sync check: run in the threadpool, as docs/web.md says
        if not answering.is_set():
            gone_quiet.set()
            answering.wait(30)
        return {"healthy": True, "services": {}}

    app = dashboard(auth=token_auth(TOKEN), health=check, poll_seconds=0.1)
    try:
        with serve_in_background(app) as server:
            browser.get(f"{server.url}/?token={TOKEN}")
            wait_for("a refresh", lambda: updates(browser) >= 1)
            live = browser.find_element("id", "live")
            assert live.get_attribute("class") == ""
            answering.clear()
            assert gone_quiet.wait(20)
            wait_for("the page saying so", lambda: live.get_attribute("class") == "stale")
            said = browser.find_element("id", "error").text
            assert "no answer within 1 s" in said, said
            answering.set()  # answers again: the page follows
            wait_for("live again", lambda: live.get_attribute("class") == "")
            assert not browser.find_element("id", "error").is_displayed()
    finally:
        answering.set()


def test_page_adds_what_changed_to_what_it_shows_as_a_full_answer_would_show_it(
    browser: Any,
) -> None:
    """After its first answer the page asks ``data.json`` only for what changed since its
    ``cursor``, and adds it to what it shows: after events in some services, breaker state
    changes, and the window moving on past old rows and states, it draws exactly what a page
    loaded afresh draws from a full answer (the recorder's clock held still to compare)."""
    from resilient_db.web import Recorder  # noqa: PLC0415

    now = [1_800_000_000.0]
    rec = Recorder(max_events=50, window=10, clock=lambda: now[0])
    quiet = {"breaker": None, "budget": None, "counters": {}}

    async def health() -> dict[str, Any]:
        return {"healthy": True, "services": {"a": quiet, "b": quiet, "c": quiet}}

    def event(name: str, service: str) -> None:
        rec(rdb.SelfHealEvent(name=name, service=service, level=30, message=name, fields={}))

    for second in range(12):
        now[0] += 1
        for _ in range(9 if second == 2 else second % 4):  # (a rate no later second has)
            event("retry", "a")
        event("retry", "c")
    event("breaker_opened", "b")
    app, once = (
        dashboard(auth=token_auth(TOKEN), recorder=rec, health=health, poll_seconds=p, events=5)
        for p in (0.1, 3600)
    )
    page = f"{{}}/?token={TOKEN}"
    main = "return document.getElementById('main').innerHTML"
    with serve_in_background(app) as server, serve_in_background(once) as afresh:
        browser.get(page.format(server.url))
        wait_for("a refresh", lambda: updates(browser) >= 1)
        for step, state in enumerate(["breaker_half_open", "breaker_closed"] * 4):
            now[0] += 1.5
            for _ in range(step % 3 + 1):
                event("retry", "a")
            event(state, "b")
            next_refresh(browser)
            next_refresh(browser)  # one asked for after the events
            event("retry", "a")  # the same second again: its row sent again
            next_refresh(browser)
            next_refresh(browser)
        polled = browser.execute_script(main)
        assert browser.execute_script("return document.body.dataset.delta") == "true"
        asked = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
            ".filter(n => n.includes('data.json'))"
        )
        assert "after=" not in asked[0]
        # the token is out of the address bar (history, Referer) and of every poll's URL
        # (access logs): a header carries it, and the page's cookie a reload
        assert all("after=" in name for name in asked[1:])
        assert not [name for name in asked if "token" in name]
        assert browser.current_url == server.url + "/"
        browser.refresh()
        wait_for("a refresh after a reload", lambda: updates(browser) >= 1)
        browser.get(page.format(afresh.url))  # the same data: one full answer
        wait_for("a refresh", lambda: updates(browser) >= 1)
        assert browser.execute_script("return document.body.dataset.delta") == "false"
        fresh = browser.execute_script(main)
    assert polled == fresh
    assert fresh.count("<tr data-event") == 5


@pytest.mark.slow
def test_dashboard_during_the_demo(browser: Any, pg_server: PostgresServer) -> None:
    """``resilient-db demo --dashboard-port 0``: the page shows the demo's service, its counters
    moving and its breaker opening during the demo's outage."""
    from resilient_db.demo import DemoOptions, run_demo  # noqa: PLC0415

    out, err = io.StringIO(), io.StringIO()
    status: list[int] = []
    options = DemoOptions(
        seconds=8, url=pg_server.url(), as_json=True, seed=7, dashboard_port=0, plain=True
    )
    demo = threading.Thread(
        target=lambda: status.append(run_demo(options, out=out, err=err)), daemon=True
    )
    with rdb.set_testing(False):  # the demo's own delays
        demo.start()
        try:
            url = wait_for(
                "the dashboard URL in the demo's progress",
                lambda: re.search(
                    r"dashboard at (http://127\.0\.0\.1:\d+/\?token=\S+)", err.getvalue()
                ),
                timeout=60,
            ).group(1)
            browser.get(url)
            wait_for("the demo's service", lambda: breaker_state(browser, "tasks-demo"))
            wait_for("units of work", lambda: counter(browser, "tasks-demo", "attempts") > 0)
            try:
                wait_for(
                    "the breaker opening during the outage",
                    lambda: counter(browser, "tasks-demo", "breaker_opens") >= 1,
                    timeout=90,
                )
            except AssertionError as exc:
                raise AssertionError(f"{exc}; the demo said:\n{err.getvalue()[-2000:]}") from None
            wait_for("retries", lambda: counter(browser, "tasks-demo", "retries") > 0)
            assert browser.find_elements("css selector", "tr[data-event]")
            next_refresh(browser)
            browser.save_screenshot(str(artifacts() / "dashboard-demo.png"))
        finally:
            demo.join(180)
    assert not demo.is_alive()
    assert status == [0], err.getvalue()[-2000:]
    with contextlib.suppress(Exception):  # the dashboard stopped with the demo
        browser.get(url)
    assert "tasks-demo" not in browser.page_source


def test_services_named_as_object_properties_are_shown_as_any_other_after_delta_answers(
    browser: Any,
) -> None:
    """A service named ``__proto__``, ``constructor`` or ``hasOwnProperty`` (``valueOf``, with
    no series) is a service like any other: the page keeps its per-service data in a ``Map``.
    Before, a plain object's key: ``series["valueOf"]`` found ``Object.prototype``'s function
    (the page stopped drawing at once), and adding a delta answer set ``__proto__`` as the
    prototype of the series rather than a series of its own."""
    from resilient_db.web import Recorder  # noqa: PLC0415

    names = ["__proto__", "constructor", "hasOwnProperty"]
    now = [1_800_000_000.0]
    rec = Recorder(max_events=50, window=10, clock=lambda: now[0])
    quiet = {"breaker": None, "budget": None, "counters": {"retries": 0}}

    async def health() -> dict[str, Any]:
        return {"healthy": True, "services": dict.fromkeys([*names, "valueOf"], quiet)}

    def event(name: str, service: str) -> None:
        rec(rdb.SelfHealEvent(name=name, service=service, level=30, message=name, fields={}))

    for name in names:
        event("retry", name)
    app, once = (
        dashboard(auth=token_auth(TOKEN), recorder=rec, health=health, poll_seconds=p)
        for p in (0.1, 3600)
    )
    page = f"{{}}/?token={TOKEN}"
    main = "return document.getElementById('main').innerHTML"
    shown = (
        "return Array.from(document.querySelectorAll('section.service'))"
        ".map(c => [c.dataset.service, c.querySelectorAll('rect').length])"
    )
    with serve_in_background(app) as server, serve_in_background(once) as afresh:
        browser.get(page.format(server.url))
        wait_for("a refresh", lambda: updates(browser) >= 1)
        for step in range(3):
            now[0] += 1
            for name in names[step:]:
                event("retry", name)
            event("breaker_opened" if step == 1 else "breaker_closed", "constructor")
            next_refresh(browser)
            next_refresh(browser)  # one asked for after the events
        assert browser.execute_script("return document.body.dataset.delta") == "true"
        polled = browser.execute_script(main)
        cards = browser.execute_script(shown)
        browser.get(page.format(afresh.url))  # the same data: one full answer
        wait_for("a refresh", lambda: updates(browser) >= 1)
        assert browser.execute_script("return document.body.dataset.delta") == "false"
        fresh = browser.execute_script(main)
    assert [name for name, _ in cards] == sorted([*names, "valueOf"])
    plotted = dict(cards)
    assert all(plotted[name] > 1 for name in names), cards  # bars and breaker segments
    assert polled == fresh


def _record_polls(timeout_ms: int) -> str:
    """A script run before the page's own: each poll the page sets (every timer but a
    request's own timeout of ``timeout_ms``) is recorded with its delay and what the page says
    at that moment, and run after at most 50 ms (the test's clock runs fast: no waiting)."""
    return (
        "window.__polls = [];"
        "const setTimer = window.setTimeout;"
        "window.setTimeout = function (fn, delay, ...rest) {"
        f"  if (delay === {timeout_ms}) return setTimer(fn, delay, ...rest);"
        "  const text = (id) => {"
        "    const e = document.getElementById(id); return e ? e.textContent : null; };"
        "  window.__polls.push({ delay: delay, live: text('live'), error: text('error') });"
        "  return setTimer(fn, Math.min(delay, 50), ...rest); };"
    )


def test_page_waits_as_long_as_a_retry_after_asks_and_says_so(browser: Any) -> None:
    """A 429 or 5xx (or a 401 or 403) answer to ``data.json`` with ``Retry-After`` (a rate
    limit, a proxy's maintenance, a check of the application's own) is waited for, in seconds
    or until an HTTP date (from the answer's ``Date``), at most 600 s, and the page says it
    waits, until when and why; a ``Retry-After`` that can't be read, of 0, or on another
    status, leaves the poll interval. Before, the page polled every ``poll_seconds`` whatever
    the answer asked, and then a 5xx other than 503 (a gateway's 502) was not waited for."""
    from email.utils import formatdate  # noqa: PLC0415

    from starlette.exceptions import HTTPException  # noqa: PLC0415
    from starlette.requests import Request  # noqa: PLC0415

    from resilient_db.web._dashboard import (  # noqa: PLC0415
        REQUEST_TIMEOUT_SECONDS,
        RETRY_AFTER_CAP_SECONDS,
    )

    plan: list[tuple[int, str | None]] = [
        (429, "7"),
        (503, "date"),  # an HTTP date two minutes on
        (401, "999999"),  # more than the cap
        (502, "5"),  # a gateway's (its upstream restarting): any 5xx, not only 503
        (500, "9"),
        (403, "soon"),  # not a Retry-After
        (503, None),
        (404, "30"),  # not a status that asks to wait
        (429, "0"),
    ]
    answers = list(plan)

    async def check(request: Request) -> bool:
        if not request.url.path.endswith("data.json") or not answers:
            return True
        status, after = answers.pop(0)
        if after == "date":
            after = formatdate(time.time() + 120, usegmt=True)
        headers = {"Retry-After": after} if after is not None else {}
        raise HTTPException(status, f"planned {status}", headers=headers)

    app = dashboard(auth=check, poll_seconds=0.1)
    with serve_in_background(app) as server:
        browser.execute_cdp_cmd(
            "Page.addScriptToEvaluateOnNewDocument",
            {"source": _record_polls(round(REQUEST_TIMEOUT_SECONDS * 1000))},
        )
        browser.get(f"{server.url}/")
        wait_for("a refresh after the planned answers", lambda: updates(browser) >= 1)
        polls = browser.execute_script("return window.__polls")
    assert not answers
    assert len(polls) >= len(plan) + 1, polls
    said = [(p["delay"], p["live"], p["error"]) for p in polls[: len(plan) + 1]]
    cap = round(RETRY_AFTER_CAP_SECONDS * 1000)
    delay, live, error = said[0]
    assert delay == 7000
    assert live.startswith("not updating · waiting until "), live
    assert "the dashboard answered 429: planned 429. Asked to wait (Retry-After: 7)" in error
    assert "next try in 7 s, at " in error
    delay, live, error = said[1]
    assert 118_000 <= delay <= 122_000, delay
    assert "answered 503: planned 503. Asked to wait (Retry-After: " in error
    assert "GMT): next try in 1" in error
    delay, live, error = said[2]
    assert delay == cap
    assert f"next try in {cap // 1000} s, at " in error
    assert f"(waits are cut to {cap // 1000} s)" in error
    for (delay, live, error), seconds in zip(said[3:5], (5, 9), strict=True):
        assert delay == seconds * 1000, said
        assert live.startswith("not updating · waiting until "), live
        assert f"Asked to wait (Retry-After: {seconds}): next try in {seconds} s" in error
    for (delay, live, error), (status, _) in zip(said[5:-1], plan[5:], strict=True):
        assert delay == 100, said
        assert live == "not updating"
        assert (
            error
            == f"Could not refresh: the dashboard answered {status}: planned {status} (retrying)"
        )
    delay, live, error = said[-1]
    assert delay == 100
    assert live.startswith("live · updated ")


class _Restartable:
    """An ASGI app handing each request to ``app`` (replaced, as an application restarted with
    other tokens), recording each ``data.json`` request's ``Authorization`` and ``Cookie``, and
    its answer's status and ``Set-Cookie``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.polls: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("data.json"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        poll = {
            "authorization": headers.get("authorization", ""),
            "cookie": headers.get("cookie", ""),
        }

        async def answering(message: Any) -> None:
            if message["type"] == "http.response.start":
                poll["status"] = message["status"]
                poll["set_cookie"] = next(
                    (v.decode() for k, v in message["headers"] if k.lower() == b"set-cookie"), ""
                )
            await send(message)

        await self.app(scope, receive, answering)
        self.polls.append(poll)


def test_page_opened_with_a_token_rotated_out_says_so_and_goes_on_with_the_cookie(
    browser: Any,
) -> None:
    """A page opened with ``?token=old`` sends that token as a header; once the operator
    removes it (the application restarted with ``token_auth(new)``), the page's next request
    is refused (403): the page drops the token, says so ("open the dashboard with
    ?token=<new token>"), and sends the cookie alone, which, the old token's, is answered 401
    and cleared; the page still says why. Once a cookie of an accepted token is set (the
    dashboard opened with ``?token=new`` in the same browser), the page is live again without
    a reload. Before, it sent the refused token on and was answered 403 until reloaded."""
    new = "browser-test-new-token-" + uuid.uuid4().hex
    front = _Restartable(dashboard(auth=token_auth(new, TOKEN), poll_seconds=0.1))
    refused = "The token this page was opened with is no longer accepted: open the dashboard with "
    with serve_in_background(front) as server:
        browser.get(f"{server.url}/?token={TOKEN}")
        wait_for("a refresh", lambda: updates(browser) >= 1)
        assert front.polls[0]["authorization"] == f"Bearer {TOKEN}"
        front.app = dashboard(auth=token_auth(new), poll_seconds=0.1)  # the old one removed
        error, live = browser.find_element("id", "error"), browser.find_element("id", "live")
        wait_for("the page saying so", lambda: refused in error.text)
        first = next(i for i, p in enumerate(front.polls) if p["status"] != 200)
        wait_for("three requests after", lambda: len(front.polls) >= first + 4)
        polls = list(front.polls)
        assert polls[first]["status"] == 403
        assert polls[first]["authorization"] == f"Bearer {TOKEN}"
        assert all(not p["authorization"] for p in polls[first + 1 :]), polls
        stale = polls[first + 1]  # the cookie alone: the old token's, answered 401 and cleared
        assert "resilient_db_dashboard=" in stale["cookie"]
        assert stale["status"] == 401
        assert "max-age=0" in stale["set_cookie"].lower()
        for poll in polls[first + 2 :]:  # no token, no cookie: 401, and nothing to clear
            assert (poll["status"], poll["cookie"], poll["set_cookie"]) == (401, "", ""), polls
        said = error.text
        assert said.startswith(refused + "?token=<new token>. Could not refresh: "), said
        assert "the dashboard answered 401: Authentication needed" in said
        assert live.get_attribute("class") == "stale"
        browser.save_screenshot(str(artifacts() / "dashboard-token-rotated-out.png"))

        # the dashboard opened with the new token (its answer sets that token's cookie): the
        # page, not reloaded, goes on with the cookie
        seen = updates(browser)
        browser.execute_script(
            "fetch(arguments[0], { credentials: 'same-origin' })", f"{server.url}/?token={new}"
        )
        wait_for("live again", lambda: live.get_attribute("class") == "")
        assert updates(browser) > seen
        assert not error.is_displayed()
        assert front.polls[-1]["status"] == 200
        assert not [p for p in front.polls if p["authorization"] == f"Bearer {new}"]


class _LimitingProxy:
    """An ASGI proxy in front of ``app`` answering the next ``data.json`` requests itself, one
    status of ``refusals`` each, with ``Retry-After: 1`` (a proxy limiting requests or logins),
    and recording each ``data.json`` request's ``Authorization``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.refusals: list[int] = []
        self.authorizations: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("data.json"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.authorizations.append(headers.get("authorization", ""))
        if not self.refusals:
            await self.app(scope, receive, send)
            return
        status = self.refusals.pop(0)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"retry-after", b"1"), (b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": b"slow down"})


def test_page_keeps_its_token_through_a_refusal_that_asks_to_wait(browser: Any) -> None:
    """A 401 or 403 with ``Retry-After`` from a proxy in front of the dashboard (limiting
    requests) made the page drop the token it was opened with and say that it is no longer
    accepted. It says "not now": the page waits, and sends the token on after."""
    from resilient_db.web._dashboard import REQUEST_TIMEOUT_SECONDS  # noqa: PLC0415

    front = _LimitingProxy(dashboard(auth=token_auth(TOKEN), poll_seconds=0.1))
    with serve_in_background(front) as server:
        browser.execute_cdp_cmd(
            "Page.addScriptToEvaluateOnNewDocument",
            {"source": _record_polls(round(REQUEST_TIMEOUT_SECONDS * 1000))},
        )
        browser.get(f"{server.url}/?token={TOKEN}")
        wait_for("a refresh", lambda: updates(browser) >= 1)
        sent = len(front.authorizations)
        front.refusals.extend([401, 403])
        wait_for(
            "two refusals and two requests after", lambda: len(front.authorizations) >= sent + 4
        )
        wait_for(
            "live again", lambda: browser.find_element("id", "live").get_attribute("class") == ""
        )
        polls = browser.execute_script("return window.__polls")
    assert not front.refusals
    assert len(front.authorizations) >= sent + 4
    assert set(front.authorizations) == {f"Bearer {TOKEN}"}, front.authorizations
    errors = [p["error"] for p in polls]
    assert any("the dashboard answered 401" in e and "Retry-After: 1" in e for e in errors), errors
    assert any("the dashboard answered 403" in e and "Retry-After: 1" in e for e in errors), errors
    assert not [e for e in errors if "no longer accepted" in e], errors


def test_page_says_a_breaker_was_opened_by_hand_and_why(browser: Any, engine: sa.Engine) -> None:
    """An operator's opening (``open_breaker``) is said on the service's card with its reason
    (text, never markup), not taken for the database's failures; closed by hand, it is gone."""
    service = f"by-hand-{next(_services)}"
    rdb.ResilientSession(engine, service=service, config=rdb.Config(reset_timeout=600))
    rdb.open_breaker(service, reason=f"database upgrade {XSS}")
    app = dashboard(auth=token_auth(TOKEN), poll_seconds=0.1)

    def said() -> str | None:
        text: str | None = browser.execute_script(
            "const card = Array.from(document.querySelectorAll('section.service'))"
            ".find(c => c.dataset.service === arguments[0]);"
            "const note = card && card.querySelector('[data-by-hand]');"
            "return note ? note.textContent : null;",
            service,
        )
        return text

    with serve_in_background(app) as server:
        browser.get(f"{server.url}/?token={TOKEN}")
        wait_for("the breaker open", lambda: breaker_state(browser, service) == "open")
        assert said() == f"opened by hand: database upgrade {XSS}"
        assert browser.execute_script("return window.__xss") is None
        rdb.close_breaker(service)
        wait_for("the breaker closed", lambda: breaker_state(browser, service) == "closed")
        assert said() is None


def test_page_shows_the_fleets_timelines_beside_the_shared_breaker(
    browser: Any, engine: sa.Engine, redis_server: RedisServer
) -> None:
    """A breaker shared through Redis: its card shows the fleet's timelines its link knows
    (the old-primary fence: the cluster, its timeline, since when, the server it was seen
    at), every value from Redis as text (a server holding markup included); nothing while
    no cluster failed over."""
    service = f"fenced-{next(_services)}"
    rdb.ResilientSession(engine, service=service, config=rdb.Config(redis_url=redis_server.url))
    link = STATE.fleet_links[redis_server.url]
    app = dashboard(auth=token_auth(TOKEN), poll_seconds=0.1)

    def rows() -> list[list[str]] | None:
        """The card's rows of timelines ([] without them); None before the card is shown."""
        found: list[list[str]] | None = browser.execute_script(
            "const card = Array.from(document.querySelectorAll('section.service'))"
            ".find(c => c.dataset.service === arguments[0]);"
            "if (!card || !card.textContent.includes('shared breaker')) return null;"
            "const box = card.querySelector('[data-fleet-timelines]');"
            "return box ? Array.from(box.querySelectorAll('tr[data-system]'), "
            "(tr) => Array.from(tr.cells, (td) => td.textContent)) : [];",
            service,
        )
        return found

    with serve_in_background(app) as server, contextlib.closing(redis_server.client()) as client:
        browser.get(f"{server.url}/?token={TOKEN}")
        wait_for("the link", lambda: link.up)
        wait_for("the shared breaker's card", lambda: rows() is not None)
        assert rows() == []  # (no cluster failed over: nothing said)
        system = "7312345678901234567"
        since = share_as_another_process(client, system, 2, XSS)
        shown = wait_for("the fleet's timeline", rows)
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
        assert shown == [[system, "2", when, XSS]]
        assert browser.execute_script("return document.querySelector('main img')") is None
        assert browser.execute_script("return window.__xss") is None
        browser.save_screenshot(str(artifacts() / "dashboard-fleet-timelines.png"))


_OTHER_DASHBOARD = """
import sys
from resilient_db.web import dashboard, token_auth
from resilient_db.web._serve import serve_in_background
with serve_in_background(dashboard(auth=token_auth(sys.argv[1]), poll_seconds=0.1)) as server:
    print(server.url, flush=True)
    sys.stdin.read()  # until the test closes it
"""


def test_page_says_whose_figures_it_shows_when_several_processes_answer(
    browser: Any, tmp_path: Path
) -> None:
    """Two worker processes behind one address (a round-robin front, as a load balancer or
    uvicorn's workers spread requests): the page names the process whose figures it shows,
    and once both have answered says that each shows its own."""
    import httpx2 as httpx  # noqa: PLC0415 (Starlette's test client's)

    other = subprocess.Popen(
        [sys.executable, "-c", _OTHER_DASHBOARD, TOKEN],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None
        other_url = other.stdout.readline().strip()
        assert other_url.startswith("http://127.0.0.1:"), other_url
        here = dashboard(auth=token_auth(TOKEN), poll_seconds=0.1)
        turns = itertools.count()

        async def front(scope: Any, receive: Any, send: Any) -> None:
            """data.json from each process in turn, the page from this one."""
            assert scope["type"] == "http"
            if scope["path"].endswith("/data.json") and next(turns) % 2:
                query = scope["query_string"].decode()
                headers = {k.decode(): v.decode() for k, v in scope["headers"]}
                headers.pop("host", None)
                async with httpx.AsyncClient() as client:
                    answer = await client.get(f"{other_url}/data.json?{query}", headers=headers)
                await send(
                    {
                        "type": "http.response.start",
                        "status": answer.status_code,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send({"type": "http.response.body", "body": answer.content})
                return
            await here(scope, receive, send)

        def shown() -> str:
            text: str = browser.execute_script(
                "return document.getElementById('process').textContent"
            )
            return text

        with serve_in_background(front) as server:
            browser.get(f"{server.url}/?token={TOKEN}")
            host = socket.gethostname()
            pids = {os.getpid(), other.pid}
            first = wait_for(
                "the process named", lambda: re.match(r"figures of pid (\d+) on ", shown())
            )
            assert int(first.group(1)) in pids
            assert shown().startswith(f"figures of pid {first.group(1)} on {host}")
            wait_for(
                "both processes seen",
                lambda: (
                    browser.find_element("tag name", "body").get_attribute("data-processes") == "2"
                ),
            )
            assert "(2 processes answered this page: each shows its own)" in shown()
            browser.save_screenshot(str(artifacts() / "dashboard-two-processes.png"))
    finally:
        if other.stdin is not None:
            other.stdin.close()
        try:
            other.wait(timeout=10)
        except subprocess.TimeoutExpired:
            other.kill()
            other.wait()
        if other.stdout is not None:
            other.stdout.close()
