"""SQLAlchemy's own ORM tests, run plainly and through resilient_db's session factories.

resilient_db promises a drop-in in the strict sense: anything that works with ``sessionmaker``
works with ``ResilientSession``. This script checks that promise with SQLAlchemy's own test
suite (the ``test/`` directory of its source distribution, for the version installed): it runs
the chosen modules twice against a throwaway PostgreSQL (the project's embedded server), once
plainly and once with this file loaded as a pytest plugin, which makes every session those tests
make come from resilient_db's factories with their default configuration (retries, breaker,
transition guard on; commit markers not installed unless ``--markers``), and reports each
test whose outcome differs.

Run it (a few minutes; it is not part of ``make test``)::

    cd /tmp && pip download --no-binary :all: --no-deps "sqlalchemy==$(python -c \\
        'import sqlalchemy; print(sqlalchemy.__version__)')" && tar xzf sqlalchemy-*.tar.gz
    python scripts/sqlalchemy_suite.py --source /tmp/sqlalchemy-X.Y.Z
    python scripts/sqlalchemy_suite.py --source ... --driver asyncpg \\
        test/ext/asyncio/test_session.py test/ext/asyncio/test_scoping.py

``--url URL`` uses an existing server instead (a database the suite may fill with tables and
the schemas ``test_schema`` and ``test_schema_2``); ``--through-only`` skips the plain run;
``--markers`` installs the commit markers before the run through resilient_db (without it,
its units verify a lost COMMIT answer by transaction id); ``--guarded-model`` maps a model
with transition rules there, which puts the guard's ``do_orm_execute`` listener on every
session (without one no model has rules, and it is not registered);
``--keep DIR`` keeps the two runs' JUnit XML files there. Each test that passes plainly and not
through resilient_db is listed with its judgement from :data:`KNOWN_DIFFERENCES` (see
docs/sqlalchemy-suite.md), which names the test and what its failure says; the exit status
is 1 when one of them is new (a judged test failing with another message is new too), else 0.

How the sessions are routed (pytest plugin ``sqlalchemy_suite``, on when
``RDB_SQLA_SUITE_ROUTE=1``): SQLAlchemy's ``fixture_session()`` and, in every collected test
module, the names ``Session``, ``sessionmaker``, ``AsyncSession`` and ``async_sessionmaker``
are replaced: ``sessionmaker(...)`` becomes ``rdb.ResilientSession(...)`` (and
``async_sessionmaker`` ``rdb.AsyncResilientSession``), and a session built directly,
``Session(bind, **kw)``, becomes ``rdb.ResilientSession(bind, **kw)()`` (the class named
``Session`` there is a subclass of SQLAlchemy's that the factory's sessions are instances of,
so ``isinstance`` and events set on it work as before). Between tests
``rdb.reset_state()`` closes every breaker, as a test suite of a user's would.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import inspect
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROUTE_ENV = "RDB_SQLA_SUITE_ROUTE"
GUARDED_ENV = "RDB_SQLA_SUITE_GUARDED"

DEFAULT_MODULES = (
    "test/orm/test_transaction.py",
    "test/orm/test_session.py",
    "test/orm/test_events.py",
    "test/orm/test_scoping.py",
    "test/orm/test_bind.py",
    "test/orm/test_unitofwork.py",
    "test/orm/test_unitofworkv2.py",
)

#: The differences seen and judged (docs/sqlalchemy-suite.md): ``Class::test`` pattern (the
#: class without SQLAlchemy's backend suffix, the test without its parameters) -> (text the
#: failure's message holds, why the test differs through resilient_db without a defect of the
#: drop-in). A difference matching no pattern, or failing with another message (the same test
#: failing for a new reason), is new: the run says so and exits with 1.
_MOCK = "takes an Engine, got Mock"
_ASYNC_ENGINE = "ResilientSession takes an Engine, got AsyncEngine"
_IDENTITY = "_MySession'> is not <class"
KNOWN_DIFFERENCES: dict[str, tuple[str, str]] = {
    "GetBindTest::test_bind_*": (
        _MOCK,
        "a Mock given as a bind in binds=: refused (TypeError), no engine",
    ),
    "GetBindTest::test_clause_extracts_orm_plugin_subject": (
        _MOCK,
        "a Mock given as a bind in binds=: refused (TypeError), no engine",
    ),
    "SessionTransactionTest::test_execution_options_*": (
        _MOCK,
        "a Mock given as the bind: refused (TypeError), no engine",
    ),
    "AsyncScopedSessionTest::test_attributes": (
        _ASYNC_ENGINE,
        "sessionmaker(async_engine, class_=AsyncSession): an AsyncEngine is refused by "
        "ResilientSession (TypeError naming AsyncResilientSession)",
    ),
    "AsyncSessionTransactionTest::test_orm_sessionmaker_block_*": (
        _ASYNC_ENGINE,
        "sessionmaker(async_engine, class_=AsyncSession): an AsyncEngine is refused by "
        "ResilientSession (TypeError naming AsyncResilientSession)",
    ),
    "OverrideSyncSession::test_init_orm_sessionmaker": (
        _ASYNC_ENGINE,
        "sessionmaker(async_engine, class_=AsyncSession): an AsyncEngine is refused by "
        "ResilientSession (TypeError naming AsyncResilientSession)",
    ),
    "AsyncProxyTest::test_inspect_session_no_asyncio_*": (
        "takes a sync Engine, got one whose driver",
        "Session(engine) on a sync Engine with an async driver (asyncpg, psycopg async): "
        "refused (TypeError), its statements run only inside SQLAlchemy's greenlet",
    ),
    "AsyncSessionTest::test_requires_async_engine": (
        "AsyncResilientSession takes an AsyncEngine, got Engine",
        "AsyncSession(bind=sync Engine): refused by the factory with a TypeError, where "
        "SQLAlchemy raises ArgumentError at the session",
    ),
    "OverrideSyncSession::test_init_class": (
        _IDENTITY,
        "sync_session_class is the factory's subclass of the class given (isinstance holds, "
        "identity does not)",
    ),
    "OverrideSyncSession::test_init_asyncio_sessionmaker": (
        _IDENTITY,
        "sync_session_class is the factory's subclass of the class given (isinstance holds, "
        "identity does not)",
    ),
    "OverrideSyncSession::test_default": (
        "is not <class 'sqlalchemy_suite.Session'>",
        "the routing's own: the test compares a class with the name Session, which the "
        "routing replaced",
    ),
}

# -- the pytest plugin -----------------------------------------------------------------------


def _routed_names() -> dict[str, Any]:
    """The replacements: name in a test module -> what it becomes."""
    from sqlalchemy import orm  # noqa: PLC0415 - only when the plugin routes
    from sqlalchemy.ext import asyncio as sa_asyncio  # noqa: PLC0415

    import resilient_db as rdb  # noqa: PLC0415

    class _RoutedMeta(type):
        """``Session(...)`` on the routed class itself: a session from a factory."""

        def __call__(cls, *args: Any, **kw: Any) -> Any:
            # (AsyncSession making its sync session: the async factory routed that one)
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if cls.__dict__.get("_routed_factory") is None or caller == sa_asyncio.session.__name__:
                return super().__call__(*args, **kw)
            return cls.__dict__["_routed_factory"](cls, *args, **kw)

        # ``isinstance(x, Session)`` as with SQLAlchemy's class: AsyncSession makes its sync
        # session of its ``sync_session_class``, SQLAlchemy's ``Session`` unless told otherwise
        def __instancecheck__(cls, instance: Any) -> bool:
            original = cls.__dict__.get("_routed_original")
            if original is not None and isinstance(instance, original):
                return True
            return super().__instancecheck__(instance)

        def __subclasscheck__(cls, subclass: type) -> bool:
            original = cls.__dict__.get("_routed_original")
            if original is not None and issubclass(subclass, original):
                return True
            return super().__subclasscheck__(subclass)

    def _session(cls: type, bind: Any = None, **kw: Any) -> Any:
        kw.setdefault("class_", cls)
        _MADE["sessions"] += 1
        return rdb.ResilientSession(bind, **kw)()

    def _async_session(cls: type, bind: Any = None, **kw: Any) -> Any:
        kw.setdefault("class_", cls)
        _MADE["async sessions"] += 1
        return rdb.AsyncResilientSession(bind, **kw)()

    class Session(orm.Session, metaclass=_RoutedMeta):
        _routed_factory = staticmethod(_session)

    class AsyncSession(sa_asyncio.AsyncSession, metaclass=_RoutedMeta):
        _routed_factory = staticmethod(_async_session)

    # (the class keeps SQLAlchemy's name, which tests print and compare, and its signature,
    # which resilient_db reads to check the keywords a factory is given)
    pairs: tuple[tuple[type, type], ...] = (
        (Session, orm.Session),
        (AsyncSession, sa_asyncio.AsyncSession),
    )
    for routed, original in pairs:
        routed.__qualname__ = routed.__name__ = original.__name__
        routed.__signature__ = inspect.signature(original)  # type: ignore[attr-defined]
        routed._routed_original = original  # type: ignore[attr-defined]

    def sessionmaker(bind: Any = None, **kw: Any) -> Any:
        kw.setdefault("class_", Session)
        _MADE["factories"] += 1
        return rdb.ResilientSession(bind, **kw)

    def async_sessionmaker(bind: Any = None, **kw: Any) -> Any:
        kw.setdefault("class_", AsyncSession)
        _MADE["async factories"] += 1
        return rdb.AsyncResilientSession(bind, **kw)

    return {
        "Session": (orm.Session, Session),
        "sessionmaker": (orm.sessionmaker, sessionmaker),
        "AsyncSession": (sa_asyncio.AsyncSession, AsyncSession),
        "async_sessionmaker": (sa_asyncio.async_sessionmaker, async_sessionmaker),
    }


_ROUTED: dict[str, Any] = {}
#: what the routing made, said at the end of the run (a run that routed nothing checks nothing)
_MADE: dict[str, int] = dict.fromkeys(
    ("sessions", "async sessions", "factories", "async factories"), 0
)


def _routing() -> bool:
    return os.environ.get(ROUTE_ENV) == "1"


def _declare_guarded_model() -> None:
    """A model with transition rules, mapped before the tests run (and never used by them):
    the transition guard's ``do_orm_execute`` listener is then on every factory's sessions
    and every mapper the tests configure is looked at for a guarded table, as in an
    application with rules (without one, neither runs)."""
    import sqlalchemy as sa  # noqa: PLC0415
    from sqlalchemy import orm  # noqa: PLC0415

    import resilient_db as rdb  # noqa: PLC0415

    class Base(orm.DeclarativeBase):
        pass

    class SuiteGuarded(Base):
        __tablename__ = "rdb_suite_guarded"
        id = sa.Column(sa.Integer, primary_key=True)
        status = sa.Column(sa.String(20), nullable=False)
        __transitions__ = rdb.TransitionRules(
            column="status", transitions={"new": {"done"}}, initial={"new"}
        )

    _ROUTED["guarded model"] = (SuiteGuarded, SuiteGuarded)  # (kept, named by no module)


def _route_fixture_session() -> None:
    """SQLAlchemy's ``fixture_session()``: a session from a factory (imported only now:
    SQLAlchemy's plugin sets its testing package up first)."""
    from sqlalchemy.testing import config as sa_config  # noqa: PLC0415
    from sqlalchemy.testing import fixtures  # noqa: PLC0415
    from sqlalchemy.testing.fixtures import orm as orm_fixtures  # noqa: PLC0415

    _ROUTED.update(_routed_names())
    routed_session = _ROUTED["Session"][1]
    original = orm_fixtures.fixture_session

    def fixture_session(**kw: Any) -> Any:
        kw.setdefault("autoflush", True)
        kw.setdefault("expire_on_commit", True)
        bind = kw.pop("bind", sa_config.db)
        sess = routed_session(bind, **kw)
        orm_fixtures._fixture_sessions.add(sess)
        return sess

    fixture_session.__wrapped__ = original  # type: ignore[attr-defined]
    orm_fixtures.fixture_session = fixture_session
    fixtures.fixture_session = fixture_session
    _ROUTED["fixture_session"] = (original, fixture_session)


def pytest_collection_modifyitems(session: Any, config: Any, items: list[Any]) -> None:
    if not _routing():
        return
    if not _ROUTED:
        _route_fixture_session()
        if os.environ.get(GUARDED_ENV) == "1":
            _declare_guarded_model()
    seen: set[int] = set()
    for item in items:
        module = getattr(item, "module", None)
        if module is None or id(module) in seen:
            continue
        seen.add(id(module))
        for name, (original, routed) in _ROUTED.items():
            if module.__dict__.get(name) is original:
                setattr(module, name, routed)


def pytest_runtest_teardown(item: Any) -> None:
    if not _routing():
        return
    import resilient_db as rdb  # noqa: PLC0415

    rdb.reset_state()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _routing():
        made = ", ".join(f"{n} {what}" for what, n in _MADE.items())
        terminalreporter.write_line(f"made through resilient_db: {made}")


# -- the driver ------------------------------------------------------------------------------


def _outcomes(xml_path: Path) -> dict[str, tuple[str, str]]:
    """test id -> (passed / failed / error / skipped, the failure's message), from a JUnit
    XML file."""
    result: dict[str, tuple[str, str]] = {}
    if not xml_path.exists():
        return result
    for case in ET.parse(xml_path).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = child.get("message") or ""
                if outcome != "skipped":
                    break
        result[name] = (outcome, message)
    return result


def _run(
    source: Path,
    url: str,
    modules: list[str],
    xml_path: Path,
    *,
    route: bool,
    extra: list[str],
    guarded: bool = False,
) -> int:
    env = dict(os.environ)
    env[ROUTE_ENV] = "1" if route else "0"
    env[GUARDED_ENV] = "1" if route and guarded else "0"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parent), env.get("PYTHONPATH")) if p
    )
    command = [
        sys.executable,
        "-s",  # the installed SQLAlchemy (the sdist's conftest adds its lib/ otherwise)
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:resilient_db",
        "-p",
        "sqlalchemy_suite",
        "-q",
        "--tb=short",
        "--maxfail=100000",
        f"--junitxml={xml_path}",
        f"--dburi={url}",
        *extra,
        *modules,
    ]
    print(("through resilient_db: " if route else "plainly: ") + " ".join(modules), flush=True)
    return subprocess.call(command, cwd=source, env=env)


def _prepare(url: str) -> None:
    import sqlalchemy as sa  # noqa: PLC0415

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for schema in ("test_schema", "test_schema_2"):
            conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    engine.dispose()


def _install_markers(url: str) -> None:
    """The commit markers, for the run through resilient_db only (the plain run's database
    stays as SQLAlchemy's suite expects it)."""
    import sqlalchemy as sa  # noqa: PLC0415

    import resilient_db as rdb  # noqa: PLC0415

    engine = sa.create_engine(url)
    rdb.install_commit_markers(engine)
    engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, type=Path, help="SQLAlchemy's unpacked sdist")
    parser.add_argument("--url", help="an existing server's database (psycopg URL)")
    parser.add_argument(
        "--driver", default="psycopg", choices=("psycopg", "asyncpg", "psycopg_async")
    )
    parser.add_argument("--through-only", action="store_true")
    parser.add_argument(
        "--markers",
        action="store_true",
        help="install the commit markers before the run through resilient_db",
    )
    parser.add_argument(
        "--guarded-model",
        action="store_true",
        help="map a model with transition rules in the run through resilient_db",
    )
    parser.add_argument("--keep", type=Path, help="keep the JUnit XML files in this directory")
    parser.add_argument("modules", nargs="*", default=list(DEFAULT_MODULES))
    args, extra = parser.parse_known_args(argv)
    if not (args.source / "test" / "conftest.py").is_file():
        parser.error(f"--source {args.source}: no test/conftest.py there (SQLAlchemy's sdist?)")
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            from resilient_db.testing import EmbeddedPostgres  # noqa: PLC0415

            server = EmbeddedPostgres()
            stack.callback(server.close)
            server.start()
            server.create_database("test")
            url = server.url("test")
        _prepare(url)
        import sqlalchemy as sa  # noqa: PLC0415

        dburi = sa.make_url(url).set(drivername=f"postgresql+{args.driver}")
        dburi_text = dburi.render_as_string(hide_password=False)
        out = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        out.mkdir(parents=True, exist_ok=True)
        plain_xml, routed_xml = out / "plain.xml", out / "routed.xml"
        if not args.through_only:
            _run(args.source, dburi_text, args.modules, plain_xml, route=False, extra=extra)
        if args.markers:
            _install_markers(url)
        _run(
            args.source,
            dburi_text,
            args.modules,
            routed_xml,
            route=True,
            extra=extra,
            guarded=args.guarded_model,
        )
        plain, routed = _outcomes(plain_xml), _outcomes(routed_xml)
    return _report(plain, routed, through_only=args.through_only)


def _report(
    plain: dict[str, tuple[str, str]], routed: dict[str, tuple[str, str]], *, through_only: bool
) -> int:
    def count(outcomes: dict[str, tuple[str, str]], what: str) -> int:
        return sum(1 for o, _ in outcomes.values() if o == what)

    if not through_only:
        print(
            f"plainly:              {count(plain, 'passed')} passed, {count(plain, 'failed')}"
            f" failed, {count(plain, 'error')} errors, {count(plain, 'skipped')} skipped"
        )
    print(
        f"through resilient_db: {count(routed, 'passed')} passed, {count(routed, 'failed')}"
        f" failed, {count(routed, 'error')} errors, {count(routed, 'skipped')} skipped"
    )
    if through_only:
        differences = sorted(t for t, (o, _) in routed.items() if o in ("failed", "error"))
    else:
        differences = sorted(
            t
            for t, (o, _) in plain.items()
            if o == "passed" and routed.get(t, ("missing", ""))[0] != "passed"
        )
    new = 0
    for test in differences:
        outcome, message = routed.get(test, ("missing", ""))
        why = known_difference(test, message)
        new += why is None
        print(f"  {outcome:8} {test}: {why or 'NEW, not judged yet'}")
        if why is None:
            print(f"           {message.splitlines()[0] if message else '(no message)'}")
    print(f"{len(differences)} difference(s), {new} of them new")
    return 1 if new else 0


def known_difference(test: str, message: str) -> str | None:
    """Why ``test`` (``module.Class::name``, as JUnit names it), failing with ``message``, is
    a known difference."""
    classname, _, name = test.rpartition("::")
    cls = classname.rsplit(".", 1)[-1].split("_postgresql", 1)[0]
    key = f"{cls}::{name.split('[', 1)[0]}"
    return next(
        (
            why
            for pattern, (says, why) in KNOWN_DIFFERENCES.items()
            if fnmatch.fnmatchcase(key, pattern) and says in message
        ),
        None,
    )


if __name__ == "__main__":
    sys.exit(main())
