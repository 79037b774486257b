"""SQLAlchemy 2.x's own documentation examples of ``sessionmaker`` / ``async_sessionmaker`` (and
of sessions made by one), each run twice against the real server: with SQLAlchemy's factory,
then with resilient_db's in its place. What the example observes (results, the session's and
the connection's state, the events fired and how often, the statements sent, the errors, the
warnings, isinstance facts) must be the same.

The examples follow doc/build/orm/session_transaction.rst (``Session.begin()``,
``begin_nested()``, ``autobegin=False``, isolation levels, "Joining a Session into an External
Transaction" in every ``join_transaction_mode``), session_basics.rst, contextual.rst
(``scoped_session`` with ``scopefunc``, ``query_property``, ``configure``),
session_state_management.rst (``merge``, ``make_transient``, ``refresh``,
``populate_existing``, pickling, ``close_all_sessions``, ``object_session``),
session_events.rst (events on the factory, on ``Session``, ``do_orm_execute`` with
``with_loader_criteria`` and a result cache), persistence_techniques.rst (``binds=``,
``get_bind`` overrides for vertical partitioning and a read/write split, horizontal sharding)
and extensions/asyncio.rst (``AsyncAttrs``, ``run_sync``, ``async_object_session``,
``async_scoped_session``, events through ``sync_session_class=``). Where the two differ by
design, the "Drop-in use" item of docs/units-of-work.md says so (``repr``, ``type(session)``, a
bind of the other
kind refused when the factory is made, the COMMIT of an async ``Session.begin()``)."""

from __future__ import annotations

import asyncio
import functools
import pickle
import re
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy import ForeignKey, event, inspect
from sqlalchemy.ext.asyncio import (
    AsyncAttrs,
    AsyncEngine,
    AsyncSession,
    async_object_session,
    async_scoped_session,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.ext.horizontal_shard import ShardedSession
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    close_all_sessions,
    make_transient,
    make_transient_to_detached,
    mapped_column,
    object_session,
    relationship,
    scoped_session,
    selectinload,
    sessionmaker,
    with_loader_criteria,
)
from sqlalchemy.sql import Delete, Update

import resilient_db as rdb


class DocsBase(AsyncAttrs, DeclarativeBase):
    pass


class User(DocsBase):
    __tablename__ = "docs_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    status: Mapped[str] = mapped_column(default="new")
    addresses: Mapped[list[Address]] = relationship(
        back_populates="user", cascade="all, delete-orphan"
    )


class Address(DocsBase):
    __tablename__ = "docs_addresses"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]
    user_id: Mapped[int] = mapped_column(ForeignKey("docs_users.id"))
    user: Mapped[User] = relationship(back_populates="addresses")


class Account(DocsBase):
    __tablename__ = "docs_accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str]


TRUNCATE = sa.text("TRUNCATE docs_addresses, docs_users, docs_accounts RESTART IDENTITY CASCADE")

#: the session events the examples count
SESSION_EVENTS = (
    "after_begin",
    "after_transaction_create",
    "after_transaction_end",
    "before_commit",
    "after_commit",
    "after_rollback",
    "after_soft_rollback",
    "before_flush",
    "after_flush",
    "after_flush_postexec",
    "do_orm_execute",
    "after_attach",
    "transient_to_pending",
    "pending_to_persistent",
    "pending_to_transient",
    "persistent_to_detached",
    "persistent_to_deleted",
    "deleted_to_detached",
    "detached_to_persistent",
    "loaded_as_persistent",
    "after_bulk_update",
)

Record = list[Any]
Observed = tuple[Record, Any, list[tuple[str, str]]]


def listen_all(target: Any, rec: Record, tag: str) -> Callable[[], None]:
    """Every session event on ``target`` noted in ``rec``; returns what removes them."""
    listeners = []
    for name in SESSION_EVENTS:

        def noted(*_: Any, _name: str = name, **__: Any) -> None:
            rec.append(f"{tag}:{_name}")

        event.listen(target, name, noted)
        listeners.append((name, noted))

    def remove() -> None:
        for name, fn in listeners:
            event.remove(target, name, fn)

    return remove


def said(exc: BaseException) -> tuple[str, str]:
    """An error as a user sees it: its class and its message (addresses left out)."""
    return type(exc).__name__, re.sub(r"0x[0-9a-f]+", "0x?", str(exc))


def observe(example: Callable[[Record], None]) -> Observed:
    rec: Record = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            example(rec)
            outcome: Any = "ok"
        except Exception as exc:
            outcome = said(exc)
    return rec, outcome, [(w.category.__name__, str(w.message)) for w in caught]


async def observe_async(example: Callable[[Record], Awaitable[None]]) -> Observed:
    rec: Record = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            await example(rec)
            outcome: Any = "ok"
        except Exception as exc:
            outcome = said(exc)
    return rec, outcome, [(w.category.__name__, str(w.message)) for w in caught]


@pytest.fixture
def engines(engines: tuple[sa.Engine, sa.Engine]) -> tuple[sa.Engine, sa.Engine]:
    """conftest's two engines, the docs' tables in each database."""
    for eng in engines:
        DocsBase.metadata.create_all(eng)
    return engines


@pytest_asyncio.fixture
async def async_engines(
    engines: tuple[sa.Engine, sa.Engine],
) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    made = tuple(
        create_async_engine(eng.url.set(drivername="postgresql+asyncpg")) for eng in engines
    )
    yield made[0], made[1]
    for eng in made:
        await eng.dispose()


def reset(*engines: sa.Engine) -> None:
    for eng in engines:
        with eng.begin() as conn:
            conn.execute(TRUNCATE)


Maker = Callable[..., Any]


def run_with(example: Callable[[Maker, Record], None], make: Maker, rec: Record) -> None:
    example(make, rec)


async def run_with_async(
    example: Callable[[Maker, Record], Awaitable[None]], make: Maker, rec: Record
) -> None:
    await example(make, rec)


def both(
    engines: tuple[sa.Engine, sa.Engine], service: str, example: Callable[[Maker, Record], None]
) -> Observed:
    """``example(make, rec)`` run with ``make = sessionmaker``, then with
    ``ResilientSession``, each on empty tables: the same observed, which is returned."""

    def resilient(*args: Any, **kwargs: Any) -> Any:
        return cast(Any, rdb.ResilientSession)(*args, service=service, **kwargs)

    runs = []
    for make in (sessionmaker, resilient):
        reset(*engines)
        runs.append(observe(functools.partial(run_with, example, make)))
    plain, ours = runs
    assert ours == plain
    return plain


async def both_async(
    engines: tuple[sa.Engine, sa.Engine],
    service: str,
    example: Callable[[Maker, Record], Awaitable[None]],
) -> Observed:

    def resilient(*args: Any, **kwargs: Any) -> Any:
        return cast(Any, rdb.AsyncResilientSession)(*args, service=service, **kwargs)

    runs = []
    for make in (async_sessionmaker, resilient):
        reset(*engines)
        runs.append(await observe_async(functools.partial(run_with_async, example, make)))
    plain, ours = runs
    assert ours == plain
    return plain


# -- session_transaction.rst ----------------------------------------------------------------------
def test_begin_blocks_and_savepoints(engines: tuple[sa.Engine, sa.Engine], service: str) -> None:
    e1, _ = engines

    def example(make: Maker, rec: Record) -> None:
        Session = make(e1)
        remove = listen_all(Session, rec, "factory")
        with Session.begin() as session:
            session.add(User(name="u1"))
            session.add(User(name="u2"))
            nested = session.begin_nested()  # establish a savepoint
            session.add(User(name="u3"))
            nested.rollback()  # rolls back u3, keeps u1 and u2
            rec.append((session.in_transaction(), session.in_nested_transaction()))
        rec.append(session.in_transaction())
        with Session() as session:  # a savepoint per record, its IntegrityError caught
            for name in ("a", "b", "a", "c"):
                try:
                    with session.begin_nested():
                        session.add(User(name=name))
                except sa.exc.IntegrityError as err:
                    rec.append(("skipped", name, type(err.orig).__name__))
            session.commit()
        with Session() as session, session.begin():
            rec.append(sorted(session.scalars(sa.select(User.name))))
        try:
            with Session.begin() as session:
                session.add(User(name="r"))
                session.flush()
                raise ValueError("the block's own error")
        except ValueError:
            rec.append(("rolled back", session.in_transaction()))
        remove()

    rec, outcome, _ = both(engines, service, example)
    assert outcome == "ok"
    assert ["a", "b", "c", "u1", "u2"] in rec
    assert rec.count("factory:after_commit") == 6  # savepoints released count too


def test_autobegin_false_and_isolation_levels(
    engines: tuple[sa.Engine, sa.Engine], service: str
) -> None:
    e1, _ = engines

    def example(make: Maker, rec: Record) -> None:
        with make(e1, autobegin=False)() as session:
            try:
                session.execute(sa.text("SELECT 1"))
            except sa.exc.InvalidRequestError as err:
                rec.append(said(err))
            session.begin()
            rec.append(session.scalar(sa.text("SELECT 1")))
            session.commit()
        show = sa.text("SHOW transaction_isolation")
        with make(e1.execution_options(isolation_level="REPEATABLE READ"))() as session:
            rec.append(session.scalar(show))
        autocommit_engine = e1.execution_options(isolation_level="AUTOCOMMIT")
        Session = make(e1)
        with Session(bind=autocommit_engine) as session:
            rec.append(session.scalar(show))
            session.execute(sa.text("INSERT INTO docs_accounts (owner) VALUES ('auto')"))
            session.rollback()  # nothing to roll back: written in autocommit
        with Session() as session:
            rec.append(session.scalars(sa.select(Account.owner)).all())
            session.bind_mapper(Account, autocommit_engine)
            rec.append(session.get_bind(Account) is autocommit_engine)
        with Session() as session:
            session.connection(execution_options={"isolation_level": "SERIALIZABLE"})
            rec.append(session.scalar(show))
            session.commit()
            rec.append(session.scalar(show))
        with Session.begin() as session:
            session.connection(execution_options={"isolation_level": "SERIALIZABLE"})
            rec.append(session.scalar(show))

    rec, outcome, _ = both(engines, service, example)
    assert outcome == "ok"
    assert rec[2:] == [
        "repeatable read",
        "read committed",
        ["auto"],
        True,
        "serializable",
        "read committed",
        "serializable",
    ]


MODES = (None, "conditional_savepoint", "create_savepoint", "rollback_only", "control_fully")


@pytest.mark.parametrize("outer", ["none", "transaction", "savepoint"])
@pytest.mark.parametrize("mode", MODES)
def test_a_session_joining_an_external_transaction(
    engines: tuple[sa.Engine, sa.Engine], service: str, mode: str | None, outer: str
) -> None:
    """The test-suite recipe, in every join_transaction_mode, on a connection with no
    transaction, one in a transaction and one in a savepoint: the same states throughout."""
    e1, _ = engines

    def example(make: Maker, rec: Record) -> None:
        Session = make()
        connection = e1.connect()
        trans = connection.begin() if outer != "none" else None
        if outer == "savepoint":
            connection.begin_nested()
        session = Session(
            bind=connection, **({} if mode is None else {"join_transaction_mode": mode})
        )
        remove = listen_all(session, rec, "session")

        def state(tag: str) -> None:
            rec.append(
                (
                    tag,
                    connection.in_transaction(),
                    connection.in_nested_transaction(),
                    None if trans is None else trans.is_active,
                    session.in_transaction(),
                )
            )

        try:
            session.add(User(name="a"))
            session.commit()
            state("commit")
            session.add(User(name="b"))
            session.flush()
            session.rollback()
            state("rollback")
            session.add(User(name="a"))
            try:
                session.flush()
            except sa.exc.IntegrityError:
                state("duplicate")
                session.rollback()
            with session.begin():
                session.add(User(name="c"))
            state("begin block")
            rec.append(sorted(session.scalars(sa.select(User.name))))
        finally:
            remove()
            session.close()
            state("closed")
            if connection.in_transaction():
                connection.rollback()
            connection.close()
        with e1.connect() as conn:
            rec.append(conn.scalar(sa.text("SELECT count(*) FROM docs_users")))

    rec, _, _ = both(engines, service, example)
    assert any(isinstance(entry, tuple) and entry[0] == "closed" for entry in rec)


@pytest.mark.parametrize("mode", MODES[1:])
def test_a_factory_bound_to_an_external_transaction(
    engines: tuple[sa.Engine, sa.Engine], service: str, mode: str
) -> None:
    """The same recipe with the connection given to the factory (a fixture's
    ``Session.configure(bind=connection, join_transaction_mode=...)``, undone after)."""
    e1, _ = engines

    def example(make: Maker, rec: Record) -> None:
        Session = make(e1)
        connection = e1.connect()
        trans = connection.begin()
        Session.configure(bind=connection, join_transaction_mode=mode)
        with Session.begin() as session:
            session.add(User(name="x"))
        try:
            with Session.begin() as session:
                session.add(User(name="x"))
        except sa.exc.IntegrityError:
            rec.append(("duplicate", connection.in_transaction(), trans.is_active))
        with Session() as session:
            try:
                rec.append(sorted(session.scalars(sa.select(User.name))))
            except sa.exc.SQLAlchemyError as err:
                rec.append(said(err)[0])
        rec.append((connection.in_transaction(), trans.is_active))
        if connection.in_transaction():
            connection.rollback()
        connection.close()
        Session.configure(bind=e1, join_transaction_mode="conditional_savepoint")
        with Session() as session:
            rec.append(session.scalar(sa.select(sa.func.count()).select_from(User)))

    rec, outcome, _ = both(engines, service, example)
    assert outcome == "ok"
    # the test's transaction took everything with it, unless the session controlled it fully
    assert rec[-1] == (1 if mode == "control_fully" else 0)


# -- contextual.rst -------------------------------------------------------------------------------
def test_scoped_sessions(engines: tuple[sa.Engine, sa.Engine], service: str) -> None:
    e1, e2 = engines

    def example(make: Maker, rec: Record) -> None:
        Scoped = scoped_session(make())
        Scoped.configure(bind=e1)
        session = Scoped()
        rec.append(Scoped() is session)
        Scoped.add(User(name="scoped"))
        Scoped.commit()
        Scoped.configure(bind=e2)  # warns: a session is present already
        rec.append((Scoped.bind is e1, Scoped.registry.has()))
        Scoped.remove()
        rec.append((Scoped.registry.has(), Scoped().bind is e2))
        Scoped.remove()
        seen: list[Session] = []
        thread = threading.Thread(target=lambda: seen.append(Scoped()))
        thread.start()
        thread.join()
        rec.append(seen[0] is not Scoped())
        Scoped.remove()
        scope = {"key": 1}
        ByKey = scoped_session(make(e1), scopefunc=lambda: scope["key"])
        first = ByKey()
        scope["key"] = 2
        rec.append(ByKey() is not first)
        query = ByKey.query_property()
        rec.append([user.name for user in query.__get__(None, User).all()])
        ByKey.remove()
        scope["key"] = 1
        ByKey.remove()

    rec, outcome, warned = both(engines, service, example)
    assert outcome == "ok"
    assert rec == [True, (True, True), (False, True), True, True, ["scoped"]]
    assert [category for category, _ in warned] == ["SAWarning"]


# -- session_events.rst ---------------------------------------------------------------------------
def test_events_on_session_factory_and_engine_fire_alike(
    engines: tuple[sa.Engine, sa.Engine], service: str
) -> None:
    """Listeners on ``Session`` (every session), on the factory and on the engine (its
    statements, transactions and checkouts): each fired as often, in the same order."""
    e1, _ = engines

    def example(make: Maker, rec: Record) -> None:
        Session = make(e1)
        removes = [listen_all(Session, rec, "factory"), listen_all(sa.orm.Session, rec, "class")]
        engine_events = ("begin", "commit", "rollback", "savepoint", "release_savepoint")

        def statement(conn: Any, cursor: Any, text: str, *_: Any) -> None:
            rec.append("sql:" + text.split(maxsplit=1)[0].upper())

        def engine_event(*_: Any, _name: str = "") -> None:
            rec.append("engine:" + _name)

        hooks: list[tuple[Any, str, Any]] = [(e1, "before_cursor_execute", statement)]
        for name in engine_events:
            hooks.append((e1, name, lambda *a, _n=name: engine_event(_name=_n)))
        for name in ("checkout", "checkin"):
            hooks.append((e1.pool, name, lambda *a, _n=name: engine_event(_name=_n)))
        for target, name, fn in hooks:
            event.listen(target, name, fn)
        try:
            with Session.begin() as session:
                session.add(User(name="ev", addresses=[Address(email="a@b")]))
                with session.begin_nested():
                    session.add(Account(owner="ev"))
            with Session() as session:
                user = session.scalars(sa.select(User).options(selectinload(User.addresses))).one()
                user.status = "seen"
                session.commit()
                session.refresh(user)
                session.merge(User(id=user.id, name="ev", status="merged"))
                session.commit()
                session.delete(user)
                session.commit()
            with Session() as session:
                session.execute(sa.update(User).values(status="bulk"))
                session.rollback()
        finally:
            for target, name, fn in hooks:
                event.remove(target, name, fn)
            for remove in removes:
                remove()

    rec, outcome, _ = both(engines, service, example)
    assert outcome == "ok"
    assert rec.count("factory:after_commit") == 5  # (the savepoint's release is one)
    assert rec.count("engine:checkout") == 5


def test_do_orm_execute_criteria_and_a_result_cache(
    engines: tuple[sa.Engine, sa.Engine], service: str
) -> None:
    e1, _ = engines

    def example(make: Maker, rec: Record) -> None:
        Session = make(e1)
        cache: dict[str, Any] = {}

        @event.listens_for(Session, "do_orm_execute")
        def criteria(state: Any) -> Any:
            rec.append(("execute", state.is_select, state.is_update))
            if state.is_select and not (state.is_column_load or state.is_relationship_load):
                state.statement = state.statement.options(
                    with_loader_criteria(User, User.status != "hidden", include_aliases=True)
                )
            if "cache_key" in state.execution_options:
                key = state.execution_options["cache_key"]
                if key not in cache:
                    cache[key] = state.invoke_statement().freeze()
                return cache[key]()
            return None

        with Session.begin() as session:
            session.add_all([User(name="shown"), User(name="hidden", status="hidden")])
        with Session() as session:
            rec.append(session.scalars(sa.select(User.name)).all())
            for _ in range(2):
                cached = sa.select(User.name).execution_options(cache_key="names")
                rec.append(session.scalars(cached).all())
            session.execute(sa.update(User).where(User.name == "shown").values(status="x"))
            session.commit()

    rec, outcome, _ = both(engines, service, example)
    assert outcome == "ok"
    assert rec.count(["shown"]) == 3


# -- session_state_management.rst -----------------------------------------------------------------
def test_object_states_merge_refresh_and_pickling(
    engines: tuple[sa.Engine, sa.Engine], service: str
) -> None:
    e1, _ = engines

    def example(make: Maker, rec: Record) -> None:
        Session = make(e1)
        with Session.begin() as session:
            session.add(User(name="st", addresses=[Address(email="q")]))
        with Session() as session:
            user = session.scalars(sa.select(User)).one()
            rec.append((object_session(user) is session, Session.object_session(user) is session))
            session.expunge(user)
            rec.append((inspect(user).detached, object_session(user)))
            make_transient(user)
            rec.append((inspect(user).transient, user.id))
            user.id = None
            user.name = "st2"
            session.add(user)
            session.commit()
            detached = User(id=1, name="st")
            make_transient_to_detached(detached)
            merged = session.merge(detached, load=False)
            rec.append((merged.name, inspect(merged).persistent))
            session.execute(sa.text("UPDATE docs_users SET status = 'changed' WHERE id = 1"))
            rec.append(session.get_one(User, 1).status)  # from the identity map
            again = session.execute(
                sa.select(User).where(User.id == 1).execution_options(populate_existing=True)
            ).scalar_one()
            rec.append(again.status)
            session.expire(again)
            session.refresh(again)
            rec.append(again.status)
            copy = pickle.loads(pickle.dumps(again))
            rec.append((copy.name, inspect(copy).detached, session.merge(copy) is again))
            rec.append((session.in_transaction(), session.is_modified(again)))
            try:
                inspect(session)
            except sa.exc.NoInspectionAvailable as err:
                rec.append(said(err)[0])
        left = Session()
        pending = User(name="pending")
        left.add(pending)
        close_all_sessions()
        rec.append((len(left.new), object_session(pending)))

    rec, outcome, _ = both(engines, service, example)
    assert outcome == "ok"
    assert "changed" in rec


# -- persistence_techniques.rst: partitioning -----------------------------------------------------
def test_binds_routing_classes_and_sharding(
    engines: tuple[sa.Engine, sa.Engine], service: str
) -> None:
    e1, e2 = engines

    class RoutingSession(Session):  # vertical partitioning by get_bind
        def get_bind(self, mapper: Any = None, clause: Any = None, **kw: Any) -> Any:
            if mapper is not None and issubclass(mapper.class_, Account):
                return e2
            return e1

    follower = e1.execution_options(logging_token="follower")

    class ReadWrite(Session):  # the leader/follower recipe
        def get_bind(self, mapper: Any = None, clause: Any = None, **kw: Any) -> Any:
            if self._flushing or isinstance(clause, (Update, Delete)):
                return e1
            return follower

    def shard_chooser(mapper: Any, instance: Any, clause: Any = None) -> str:
        return "two" if isinstance(instance, Account) else "one"

    def example(make: Maker, rec: Record) -> None:
        Binds = make(binds={User: e1, Account.__table__: e2})
        with Binds() as session:
            session.add_all([User(name="b"), Account(owner="b")])
            session.commit()
            rec.append((session.get_bind(User) is e1, session.get_bind(Account) is e2))
        Routed = make(class_=RoutingSession)
        rec.append(issubclass(Routed.class_, RoutingSession))
        with Routed.begin() as session:
            session.add_all([User(name="r"), Account(owner="r")])
        Split = make(class_=ReadWrite)
        with Split() as session:
            session.execute(sa.update(User).values(status="split"))
            session.commit()
            rec.append(sorted(session.scalars(sa.select(User.status))))
        Sharded = make(
            class_=ShardedSession,
            shards={"one": e1, "two": e2},
            shard_chooser=shard_chooser,
            identity_chooser=lambda *a, **k: ["one", "two"],
            execute_chooser=lambda context: ["one", "two"],
        )
        with Sharded.begin() as session:
            session.add(Account(owner="sharded"))
        with Sharded() as session:
            rec.append(sorted(session.scalars(sa.select(Account.owner))))
        with e2.connect() as conn:
            rec.append(conn.scalar(sa.text("SELECT count(*) FROM docs_accounts")))

    rec, outcome, _ = both(engines, service, example)
    assert outcome == "ok"
    assert rec[-1] == 3


def test_your_session_class_methods_are_the_ones_called(
    engines: tuple[sa.Engine, sa.Engine], service: str
) -> None:
    e1, _ = engines

    def example(make: Maker, rec: Record) -> None:
        class Counting(Session):
            def commit(self) -> None:
                rec.append("commit")
                super().commit()

            def rollback(self) -> None:
                rec.append("rollback")
                super().rollback()

            def close(self) -> None:
                rec.append("close")
                super().close()

            def __exit__(self, *exc: Any) -> None:
                rec.append("exit")
                super().__exit__(*exc)

        Sessions = make(e1, class_=Counting, info={"app": 1})
        with Sessions.begin() as session:
            session.add(User(name="o"))
        with Sessions(info={"request": 2}) as session:
            rec.append(sorted(session.info.items()))
            session.add(User(name="o"))
            try:
                session.commit()
            except sa.exc.IntegrityError:
                session.rollback()
        rec.append((isinstance(Sessions, sessionmaker), sorted(Sessions.kw["info"].items())))

    rec, outcome, _ = both(engines, service, example)
    assert outcome == "ok"
    assert rec.count("close") == 2


# -- extensions/asyncio.rst -----------------------------------------------------------------------
@pytest.mark.asyncio
async def test_async_orm_example(
    engines: tuple[sa.Engine, sa.Engine],
    async_engines: tuple[AsyncEngine, AsyncEngine],
    service: str,
) -> None:
    engine, _ = async_engines

    async def example(make: Maker, rec: Record) -> None:
        async_session = make(engine, expire_on_commit=False)
        async with async_session() as session, session.begin():
            session.add_all(
                [
                    User(name="a1", addresses=[Address(email="b1"), Address(email="b2")]),
                    User(name="a2", addresses=[]),
                ]
            )
        async with async_session() as session:
            result = await session.execute(
                sa.select(User).order_by(User.id).options(selectinload(User.addresses))
            )
            for user in result.scalars():
                rec.append((user.name, sorted(a.email for a in user.addresses)))
            first = (await session.execute(sa.select(User).order_by(User.id))).scalars().first()
            assert first is not None
            first.name = "new name"
            await session.commit()
            rec.append(first.name)  # expire_on_commit=False
            rec.append(len(await first.awaitable_attrs.addresses))
            rec.append(async_object_session(first) is session)
            second = await session.get_one(User, 2)
            await session.refresh(second, ["addresses"])
            rec.append(second.addresses)
            rec.append(
                await session.run_sync(
                    lambda sync: [u.name for u in sync.query(User).order_by(User.id)]
                )
            )
            streamed = await session.stream_scalars(sa.select(User.name).order_by(User.id))
            rec.append([name async for name in streamed])
            rec.append((session.in_transaction(), type(session.sync_session).__name__))
        rec.append(async_object_session(first))

    rec, outcome, _ = await both_async(engines, service, example)
    assert outcome == "ok"
    assert rec[0] == ("a1", ["b1", "b2"])


@pytest.mark.asyncio
async def test_async_scoped_sessions_and_events_through_a_sync_maker(
    engines: tuple[sa.Engine, sa.Engine],
    async_engines: tuple[AsyncEngine, AsyncEngine],
    service: str,
) -> None:
    engine, other = async_engines

    class SyncSession(Session):
        pass

    class OwnAsync(AsyncSession):
        sync_session_class = SyncSession

    async def example(make: Maker, rec: Record) -> None:
        sync_maker = sessionmaker()
        removes = [listen_all(sync_maker, rec, "sync_maker"), listen_all(SyncSession, rec, "own")]
        try:
            maker = make(engine, sync_session_class=sync_maker, info={"app": 1})
            Scoped = async_scoped_session(maker, scopefunc=asyncio.current_task)
            session = Scoped()
            rec.append((Scoped() is session, sorted(session.info.items())))
            Scoped.add(User(name="scoped"))
            await Scoped.commit()
            await Scoped.remove()

            async def in_another_task() -> bool:
                mine = Scoped() is not session
                await Scoped.remove()
                return mine

            rec.append(await asyncio.create_task(in_another_task()))
            own = make(engine, class_=OwnAsync)
            async with own.begin() as session:
                session.add(Account(owner="own"))
                rec.append(
                    (isinstance(session, OwnAsync), isinstance(session.sync_session, SyncSession))
                )
            async with own(bind=other) as session:
                rec.append(await session.scalar(sa.select(sa.func.count()).select_from(Account)))
            rec.append(isinstance(maker, async_sessionmaker))
        finally:
            for remove in removes:
                remove()

    rec, outcome, _ = await both_async(engines, service, example)
    assert outcome == "ok"
    assert "sync_maker:after_commit" in rec
    assert "own:after_commit" in rec


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["create_savepoint", "rollback_only"])
async def test_async_session_joining_an_external_transaction(
    engines: tuple[sa.Engine, sa.Engine],
    async_engines: tuple[AsyncEngine, AsyncEngine],
    service: str,
    mode: str,
) -> None:
    engine, _ = async_engines
    e1, _ = engines

    async def example(make: Maker, rec: Record) -> None:
        maker = make()
        conn = await engine.connect()
        trans = await conn.begin()
        session = maker(bind=conn, join_transaction_mode=mode)
        session.add(User(name="ext"))
        await session.commit()
        rec.append((conn.in_transaction(), trans.is_active))
        session.add(User(name="ext2"))
        await session.flush()
        await session.rollback()
        rec.append((conn.in_transaction(), trans.is_active))
        try:
            rec.append(sorted(await session.scalars(sa.select(User.name))))
        except sa.exc.SQLAlchemyError as err:
            rec.append(said(err)[0])
        await session.close()
        if conn.in_transaction():
            await trans.rollback()
        await conn.close()
        with e1.connect() as sync:
            rec.append(sync.scalar(sa.text("SELECT count(*) FROM docs_users")))

    rec, outcome, _ = await both_async(engines, service, example)
    assert outcome == "ok"
    assert rec[-1] == 0
