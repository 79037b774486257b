"""The integrations users put between them and SQLAlchemy, against the real server.

* SQLModel: ``ResilientSession(engine, class_=sqlmodel.Session)`` and
  ``AsyncResilientSession(async_engine, class_=sqlmodel.ext.asyncio.session.AsyncSession)``
  (both async drivers): ``session.exec(select(...))`` in drop-in use and in units replayed
  after real faults (a terminated backend, a real serialization failure), their COMMITs marked;
  ``__transitions__`` on ``table=True`` classes, with and without a ``ClassVar`` annotation, a
  string and an enum status (flush guard, bulk-UPDATE guard through ``session.exec``, trigger);
  SQLModel classes as ``validate=``.
* Flask-SQLAlchemy 3.1: ``db.session`` made by a ``ResilientSession`` on each app's engine (a
  subclass overriding ``init_app``, as docs/sqlmodel-flask.md shows): app contexts, views, units
  surviving a killed backend, the guard through ``db.session`` (409 problem details), dead pooled
  connections replaced, several apps alive at once, another bind key's database, the tracked
  modifications' signals; a view decorated with ``with_self_healing`` (or running an operation
  of its call form) replayed on ``db.session`` without its failed attempt's
  ``after_this_request`` callbacks.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

import pytest
import pytest_asyncio
import sqlalchemy as sa
import sqlmodel
from flask import Flask, after_this_request, current_app, g
from flask import Response as FlaskResponse
from flask_sqlalchemy import SQLAlchemy, track_modifications
from flask_sqlalchemy.session import Session as FlaskSession
from scenarios import ASYNC_DRIVERS, BYPASS_BY_HAND
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, scoped_session
from sqlmodel import Field, SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession as SQLModelAsyncSession

import resilient_db as rdb
from resilient_db.testing import FaultProxy
from resilient_db.web import problem_details

pytestmark = pytest.mark.usefixtures("no_backoff")

TICKET_RULES = rdb.TransitionRules(
    column="status",
    transitions={"open": {"in_progress", "rejected"}, "in_progress": {"done", "open"}},
    initial={"open"},
)


class Ticket(SQLModel, table=True):
    """An SQLModel table model with transition rules (a dunder: pydantic leaves it alone)."""

    __tablename__ = "sqlmodel_tickets"
    __transitions__: ClassVar[rdb.TransitionRules] = TICKET_RULES

    id: int | None = Field(default=None, primary_key=True)
    title: str = Field(unique=True)
    status: str = Field(default="open", max_length=20)


class TicketOut(SQLModel):
    """A plain (not table) SQLModel class: a Pydantic model, usable as ``validate=``."""

    id: int
    title: str
    status: str


def ticket_rows(engine: sa.Engine) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(Ticket.__table__.c.title, Ticket.__table__.c.status))
        return {row[0]: row[1] for row in rows}


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    SQLModel.metadata.create_all(eng, tables=[Ticket.__table__])  # type: ignore[list-item]
    rdb.install_commit_markers(eng)
    eng.dispose()  # connections made from now on find the markers
    yield eng
    eng.dispose()


def counters(service: str) -> dict[str, Any]:
    stats: dict[str, Any] = rdb.health()["services"][service]["counters"]
    return stats


def markers(engine: sa.Engine) -> int:
    """Commit markers in the database: units' COMMITs that went out marked."""
    with engine.connect() as conn:
        return int(conn.scalar(sa.text("SELECT count(*) FROM resilient_db.commit_markers")))


# -- SQLModel, sync ------------------------------------------------------------------------------
def test_sqlmodel_session_class_is_used_as_it_is_in_drop_in_use(
    engine: sa.Engine, service: str
) -> None:
    Session = rdb.ResilientSession(engine, service=service, class_=sqlmodel.Session)
    assert issubclass(Session.class_, sqlmodel.Session)
    with Session.begin() as session:
        assert isinstance(session, sqlmodel.Session)
        session.add(Ticket(title="drop-in"))
    with Session() as session:
        ticket = session.exec(select(Ticket).where(Ticket.title == "drop-in")).one()
        assert ticket.status == "open"
        assert isinstance(ticket.id, int)
        ticket.status = "in_progress"
        session.commit()
    assert ticket_rows(engine) == {"drop-in": "in_progress"}


def test_sqlmodel_unit_with_exec_is_replayed_after_its_backend_is_killed(
    engine: sa.Engine, pg_server: Any, service: str
) -> None:
    Session = rdb.ResilientSession(engine, service=service, class_=sqlmodel.Session)
    with Session.begin() as session:
        session.add(Ticket(title="killed"))
    calls: list[sqlmodel.Session] = []

    def start(session: sqlmodel.Session, title: str) -> str:
        calls.append(session)
        ticket = session.exec(select(Ticket).where(Ticket.title == title)).one()
        ticket.status = "in_progress"
        session.add(Ticket(title=f"{title}: log"))
        session.flush()
        if len(calls) == 1:
            pid = session.scalar(sa.text("SELECT pg_backend_pid()"))
            pg_server.execute(f"SELECT pg_terminate_backend({int(pid)})")
        return session.exec(select(Ticket.status).where(Ticket.title == title)).one()

    assert Session.run(start, "killed") == "in_progress"
    assert len(calls) == 2
    assert calls[0] is not calls[1]  # a fresh session for the replay
    assert all(isinstance(s, sqlmodel.Session) for s in calls)
    assert ticket_rows(engine) == {"killed": "in_progress", "killed: log": "open"}
    assert markers(engine) == 1  # the replay's COMMIT, marked (the setup's drop-in one is not)
    stats = counters(service)
    assert stats["retries_by_class"] == {"disconnect": 1}
    assert stats["recovered"] == 1


def test_sqlmodel_transactional_unit_is_replayed_after_a_real_serialization_failure(
    engine: sa.Engine, service: str
) -> None:
    """A REPEATABLE READ unit updates a row another transaction changed after the unit's
    snapshot: the server refuses the UPDATE with 40001, and the replay (a new snapshot)
    succeeds."""
    Session = rdb.ResilientSession(engine, service=service, class_=sqlmodel.Session)
    with Session.begin() as session:
        ticket = Ticket(title="contended")
        session.add(ticket)
        session.flush()
        ticket_id = ticket.id
    calls: list[int] = []
    other = sa.create_engine(engine.url)  # another program: no factory on its engine

    @Session.transactional
    def start(session: sqlmodel.Session, ticket_id: int) -> str:
        calls.append(1)
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        ticket = session.exec(select(Ticket).where(Ticket.id == ticket_id)).one()
        if len(calls) == 1:  # another transaction changes the row after this snapshot
            with other.begin() as conn:
                conn.execute(
                    sa.update(Ticket).where(Ticket.id == ticket_id).values(title="renamed")
                )
        ticket.status = "in_progress"
        session.flush()  # 40001 in the first attempt: concurrent update
        return ticket.title

    try:
        assert start(ticket_id) == "renamed"
    finally:
        other.dispose()
    assert len(calls) == 2
    assert ticket_rows(engine) == {"renamed": "in_progress"}
    stats = counters(service)
    assert stats["retries_by_class"] == {"conflict": 1}
    assert stats["recovered"] == 1


def add_tickets(engine: sa.Engine, **statuses: str) -> dict[str, int]:
    """Rows put in place past the guards (setup), with the given statuses; their ids."""
    with engine.begin() as conn:
        conn.exec_driver_sql(BYPASS_BY_HAND)  # (the trigger, where installed)
        rows = conn.execute(
            sa.insert(Ticket).returning(Ticket.__table__.c.title, Ticket.__table__.c.id),
            [{"title": title, "status": status} for title, status in statuses.items()],
        )
        return {row[0]: row[1] for row in rows}


def test_sqlmodel_model_with_transitions_is_guarded_at_flush(
    engine: sa.Engine, service: str
) -> None:
    Session = rdb.ResilientSession(engine, service=service, class_=sqlmodel.Session)
    ids = add_tickets(engine, done="done")

    def reopen(session: sqlmodel.Session) -> None:
        ticket = session.exec(select(Ticket).where(Ticket.id == ids["done"])).one()
        assert rdb.allowed_transitions(ticket) == set()
        ticket.status = "open"

    with pytest.raises(rdb.IllegalTransitionError) as info:
        Session.run(reopen)
    err = info.value
    assert (err.model, err.column, err.from_state, err.to_state, err.via) == (
        "Ticket",
        "status",
        "done",
        "open",
        "flush",
    )
    assert err.pk == ids["done"]

    def insert_done(session: sqlmodel.Session) -> None:  # a new row must start as "open"
        session.add(Ticket(title="born done", status="done"))

    with pytest.raises(rdb.IllegalTransitionError) as info:
        Session.run(insert_done)
    assert info.value.inserted
    assert ticket_rows(engine) == {"done": "done"}
    assert counters(service)["attempts"] == 2  # never retried
    assert rdb.health()["transitions"]["blocked_transitions"] == 2

    def start(session: sqlmodel.Session) -> set[object]:
        ticket = session.exec(select(Ticket).where(Ticket.title == "new")).one()
        ticket.status = "in_progress"
        session.flush()
        return rdb.allowed_transitions(ticket)

    Session.run(lambda session: session.add(Ticket(title="new")))
    assert Session.run(start) == {"done", "open"}
    assert ticket_rows(engine) == {"done": "done", "new": "in_progress"}


def test_sqlmodel_model_with_transitions_is_guarded_in_bulk_updates(
    engine: sa.Engine, service: str
) -> None:
    ids = add_tickets(engine, a="open", b="open", c="done", d="rejected")
    Filtering = rdb.ResilientSession(engine, service=service, class_=sqlmodel.Session)
    Raising = rdb.ResilientSession(
        engine, service=service, class_=sqlmodel.Session, config=rdb.Config(bulk_update="raise")
    )

    def start_all(session: sqlmodel.Session) -> int:  # session.exec takes an UPDATE too
        result = session.exec(sa.update(Ticket).values(status="in_progress"))
        return int(result.rowcount)

    assert Filtering.run(start_all) == 2  # c and d may not start: left unchanged
    assert ticket_rows(engine) == {
        "a": "in_progress",
        "b": "in_progress",
        "c": "done",
        "d": "rejected",
    }
    assert rdb.health()["transitions"]["bulk_rows_filtered"] == 2

    def reject(session: sqlmodel.Session) -> None:
        session.exec(sa.update(Ticket).where(Ticket.id == ids["a"]).values(status="rejected"))

    with pytest.raises(rdb.IllegalTransitionError) as info:
        Raising.run(reject)
    assert (info.value.from_state, info.value.to_state, info.value.via) == (
        "in_progress",
        "rejected",
        "orm-update",
    )
    assert ticket_rows(engine)["a"] == "in_progress"


def test_sqlmodel_model_gets_the_transition_trigger(engine: sa.Engine, service: str) -> None:
    rdb.install_transition_trigger(engine, Ticket)
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Ticket) is None
    Session = rdb.ResilientSession(engine, service=service, class_=sqlmodel.Session)
    ids = add_tickets(engine, done="done")

    def raw_reopen(session: sqlmodel.Session) -> None:  # past the ORM: only the trigger sees it
        session.execute(
            sa.text("UPDATE sqlmodel_tickets SET status = 'open' WHERE id = :id"),
            {"id": ids["done"]},
        )

    with pytest.raises(rdb.IllegalTransitionError) as info:
        Session.run(raw_reopen)
    assert (info.value.model, info.value.from_state, info.value.to_state, info.value.via) == (
        "Ticket",
        "done",
        "open",
        "db",
    )
    with engine.begin() as conn, pytest.raises(rdb.IllegalTransitionError) as info:
        conn.execute(sa.update(Ticket.__table__).values(status="open"))  # Core, same engine
    assert info.value.via == "db"
    other = sa.create_engine(engine.url)  # another program: the trigger's SQLSTATE
    try:
        with other.begin() as conn, pytest.raises(sa.exc.DBAPIError) as raw:
            conn.execute(sa.insert(Ticket.__table__).values(title="x", status="done"))
    finally:
        other.dispose()
    assert rdb.sqlstate_of(raw.value) == rdb.TRANSITION_SQLSTATE
    assert ticket_rows(engine) == {"done": "done"}


class Phase(str, enum.Enum):
    draft = "draft"
    live = "live"
    retired = "retired"


class Page(SQLModel, table=True):
    """An enum status, as SQLModel maps it (a SQLAlchemy ``Enum`` column)."""

    __tablename__ = "sqlmodel_pages"
    __transitions__ = rdb.TransitionRules(
        column="phase",
        transitions={Phase.draft: {Phase.live}, Phase.live: {Phase.retired}},
        initial={Phase.draft},
    )

    id: int | None = Field(default=None, primary_key=True)
    phase: Phase = Phase.draft


def test_sqlmodel_enum_status_is_guarded_by_flush_bulk_and_trigger(
    engine: sa.Engine, service: str
) -> None:
    assert isinstance(Page.__table__.c.phase.type, sa.Enum)
    SQLModel.metadata.create_all(engine, tables=[Page.__table__])  # type: ignore[list-item]
    rdb.install_transition_trigger(engine, Page)
    Session = rdb.ResilientSession(engine, service=service, class_=sqlmodel.Session)
    Session.run(lambda session: session.add(Page()))

    def move(session: sqlmodel.Session, to: Phase) -> None:
        page = session.exec(select(Page)).one()
        page.phase = to

    Session.run(move, Phase.live)
    with pytest.raises(rdb.IllegalTransitionError) as info:
        Session.run(move, Phase.draft)
    assert (info.value.from_state, info.value.to_state) == (Phase.live, Phase.draft)
    assert Session.run(lambda s: s.exec(sa.update(Page).values(phase=Phase.draft)).rowcount) == 0
    with pytest.raises(rdb.IllegalTransitionError) as info:
        Session.run(lambda s: s.execute(sa.text("UPDATE sqlmodel_pages SET phase = 'draft'")))
    assert (info.value.from_state, info.value.to_state, info.value.via) == (
        Phase.live,
        Phase.draft,
        "db",
    )
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT phase::text FROM sqlmodel_pages")) == "live"


def test_sqlmodel_classes_as_response_validators(engine: sa.Engine, service: str) -> None:
    Session = rdb.ResilientSession(
        engine, service=service, class_=sqlmodel.Session, expire_on_commit=False
    )
    add_tickets(engine, a="open", b="done")

    def load(session: sqlmodel.Session) -> list[Ticket]:
        return list(session.exec(select(Ticket).order_by(Ticket.title)).all())

    tickets = Session.run(load, validate=list[TicketOut])  # ORM rows, read from attributes
    assert [t.title for t in tickets] == ["a", "b"]
    assert all(isinstance(t, Ticket) for t in tickets)  # returned as they are
    one = Session.run(
        lambda s: s.exec(select(Ticket).where(Ticket.title == "a")).one(), validate=Ticket
    )
    assert one.status == "open"

    def add_and_answer_badly(session: sqlmodel.Session) -> dict[str, object]:
        session.add(Ticket(title="written"))
        session.flush()
        return {"id": "one", "title": "written", "status": "open"}

    with pytest.raises(rdb.ResponseValidationError) as info:
        Session.run(add_and_answer_badly, validate=TicketOut)
    assert info.value.reason.startswith("id: Input should be a valid integer")
    assert "written" not in ticket_rows(engine)  # the unit was rolled back
    assert counters(service)["response_validation_failures"] == 1


class Crew(SQLModel, table=True):
    """A table model with a relationship (a crew of members)."""

    __tablename__ = "sqlmodel_crews"
    id: int | None = Field(default=None, primary_key=True)
    name: str
    # (the relationship spelled for SQLAlchemy: this module's annotations are strings)
    members: list[Member] = sqlmodel.Relationship(
        sa_relationship=sa.orm.relationship("Member", back_populates="crew")
    )


class Member(SQLModel, table=True):
    __tablename__ = "sqlmodel_members"
    id: int | None = Field(default=None, primary_key=True)
    name: str
    crew_id: int | None = Field(default=None, foreign_key="sqlmodel_crews.id")
    crew: Crew | None = sqlmodel.Relationship(
        sa_relationship=sa.orm.relationship("Crew", back_populates="members")
    )


def test_a_table_model_with_relationships_is_refused_as_a_response_validator(
    engine: sa.Engine, service: str
) -> None:
    """Checking a result with it built instances of it from the unit's objects, and their
    relationships' backrefs moved the unit's own related rows onto those copies: the crew the
    unit returned came back without its members (with validation off, with them). Refused
    where it is given, as a type Pydantic can't check is, naming what to use instead."""
    Session = rdb.ResilientSession(
        engine, service=service, class_=sqlmodel.Session, expire_on_commit=False
    )
    calls: list[int] = []

    def load_crew(session: sqlmodel.Session) -> Crew:
        calls.append(1)
        return session.exec(select(Crew)).one()

    for form in (Crew, list[Member], Member | None):
        with pytest.raises(TypeError, match=r"is a mapped \(table\) model with relationships"):
            Session.run(load_crew, validate=form)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"is a mapped \(table\) model with relationships"):
            Session.transactional(validate=form)  # type: ignore[arg-type]
    assert calls == []


# -- SQLModel, async ------------------------------------------------------------------------------
@pytest.fixture(params=ASYNC_DRIVERS)
def async_driver(request: pytest.FixtureRequest) -> str:
    """The async tests run on both async drivers (asyncpg, psycopg 3)."""
    return str(request.param)


@pytest_asyncio.fixture
async def async_engine(engine: sa.Engine, pg_async_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(pg_async_url)
    yield eng
    await eng.dispose()


def async_factory(async_engine: AsyncEngine, service: str, **kw: Any) -> Any:
    return rdb.AsyncResilientSession(
        async_engine, service=service, class_=SQLModelAsyncSession, **kw
    )


@pytest.mark.asyncio
async def test_async_sqlmodel_session_in_drop_in_use(
    engine: sa.Engine, async_engine: AsyncEngine, service: str
) -> None:
    Session = async_factory(async_engine, service)
    async with Session.begin() as session:
        assert isinstance(session, SQLModelAsyncSession)
        assert isinstance(session.sync_session, sqlmodel.Session)
        session.add(Ticket(title="async drop-in"))
    async with Session() as session:
        ticket = (await session.exec(select(Ticket))).one()
        ticket.status = "in_progress"
        await session.commit()
    async with Session() as session:
        ticket = (await session.exec(select(Ticket))).one()
        ticket.status = "open"
        await session.flush()  # legal: in_progress -> open
        ticket.status = "done"
        with pytest.raises(rdb.IllegalTransitionError) as info:
            await session.flush()  # open -> done: blocked
        assert info.value.via == "flush"
        await session.rollback()
    assert ticket_rows(engine) == {"async drop-in": "in_progress"}


@pytest.mark.asyncio
async def test_async_sqlmodel_unit_is_replayed_after_its_backend_is_killed(
    engine: sa.Engine, async_engine: AsyncEngine, pg_server: Any, service: str
) -> None:
    Session = async_factory(async_engine, service, expire_on_commit=False)
    ids = add_tickets(engine, killed="open")
    calls: list[SQLModelAsyncSession] = []

    async def start(session: SQLModelAsyncSession, ticket_id: int) -> Ticket:
        calls.append(session)
        ticket = (await session.exec(select(Ticket).where(Ticket.id == ticket_id))).one()
        ticket.status = "in_progress"
        session.add(Ticket(title="killed: log"))
        await session.flush()
        if len(calls) == 1:
            pid = await session.scalar(sa.text("SELECT pg_backend_pid()"))
            pg_server.execute(f"SELECT pg_terminate_backend({int(pid)})")
        await session.exec(select(Ticket.id).where(Ticket.id == ticket_id))
        return ticket

    ticket = await Session.run(start, ids["killed"], validate=TicketOut)
    assert ticket.status == "in_progress"
    assert len(calls) == 2
    assert all(isinstance(s, SQLModelAsyncSession) for s in calls)
    assert ticket_rows(engine) == {"killed": "in_progress", "killed: log": "open"}
    assert markers(engine) == 1
    stats = counters(service)
    assert stats["retries_by_class"] == {"disconnect": 1}
    assert stats["recovered"] == 1


@pytest.mark.asyncio
async def test_async_sqlmodel_guards_refuse_illegal_moves(
    engine: sa.Engine, async_engine: AsyncEngine, service: str
) -> None:
    ids = add_tickets(engine, a="open", c="done")
    Session = async_factory(async_engine, service, config=rdb.Config(bulk_update="raise"))

    async def reopen(session: SQLModelAsyncSession) -> None:
        ticket = (await session.exec(select(Ticket).where(Ticket.id == ids["c"]))).one()
        ticket.status = "open"

    with pytest.raises(rdb.IllegalTransitionError) as info:
        await Session.run(reopen)
    assert (info.value.from_state, info.value.to_state, info.value.via) == ("done", "open", "flush")

    @Session.transactional
    async def finish_all(session: SQLModelAsyncSession) -> None:
        await session.exec(sa.update(Ticket).values(status="done"))

    with pytest.raises(rdb.IllegalTransitionError) as info:  # a is open: may not be done
        await finish_all()
    assert info.value.via == "orm-update"
    assert ticket_rows(engine) == {"a": "open", "c": "done"}
    assert counters(service)["attempts"] == 2  # neither retried


# -- Flask-SQLAlchemy -----------------------------------------------------------------------------
class ResilientSQLAlchemy(SQLAlchemy):
    """What docs/sqlmodel-flask.md shows: ``db.session`` made by a ``ResilientSession`` on each
    app's engine.

    Flask-SQLAlchemy builds ``db.session`` in ``__init__``, before any engine exists (engines
    are made per app by ``init_app``), so the factories are made in ``init_app``, in an app
    context: one on each of the app's engines (other bind keys too: a factory gives its engine
    resilient_db's hooks), of the class and with the options of Flask-SQLAlchemy's own
    sessionmaker (its ``Session``, whose ``get_bind`` picks the engine of each app context and
    bind key, the ``session_options`` given; listeners on its class reach theirs), under its
    scope (one session per app context, removed at teardown). Flask-SQLAlchemy's own
    ``init_app`` is given its own ``db.session`` (it listens there for tracked modifications).
    The default engine's factory is ``app.extensions["resilient_db"]``, for units of work.
    """

    def init_app(self, app: Flask) -> None:
        self.flask_session = getattr(self, "flask_session", self.session)
        self.session = self.flask_session
        super().init_app(app)
        plain = self.flask_session.session_factory
        with app.app_context():
            factories = {
                key: rdb.ResilientSession(
                    **{**plain.kw, "bind": engine},  # (its kw: bind=None, db, query_cls, ...)
                    service=app.config.get("RESILIENT_DB_SERVICE", "database"),
                    class_=plain.class_,
                )
                for key, engine in self.engines.items()
            }
        app.extensions["resilient_db"] = factories[None]
        app.extensions["resilient_db.binds"] = factories
        self.session = scoped_session(
            factories[None], scopefunc=self.flask_session.registry.scopefunc
        )


class FlaskBase(DeclarativeBase):
    pass


class JobsSession(FlaskSession):
    """A session class of the application's, given in ``session_options``."""

    def label(self) -> str:
        return "jobs"


db = ResilientSQLAlchemy(
    model_class=FlaskBase,
    session_options={"class_": JobsSession, "expire_on_commit": False},
)


class Job(db.Model):  # type: ignore[name-defined, misc]
    __tablename__ = "flask_jobs"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"queued": {"running"}, "running": {"finished", "queued"}},
        initial={"queued"},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50), unique=True)
    status: Mapped[str] = mapped_column(sa.String(20), default="queued")


# Flask-SQLAlchemy (3.1.1, its newest release) gives a model of a __bind_key__ a MetaData of
# its bind by setting the class's own ``metadata`` before declarative maps it; SQLAlchemy 2.1.0
# to 2.1.3 warn of any class-level ``metadata`` ("should be left reserved for the MetaData
# instance"), 2.1.4 on (and 2.0) accept a MetaData there. Only that warning, only here.
with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore",
        message="Attribute name 'metadata' should be left reserved for the MetaData instance",
        category=sa.exc.SAWarning,
    )

    class Archived(db.Model):  # type: ignore[name-defined, misc]
        """A model of another bind key (``SQLALCHEMY_BINDS``), another database."""

        __tablename__ = "flask_archived"
        __bind_key__ = "archive"
        __transitions__ = rdb.TransitionRules(
            column="status", transitions={"kept": {"purged"}}, initial={"kept"}
        )

        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(sa.String(50), unique=True)
        status: Mapped[str] = mapped_column(sa.String(20), default="kept")


def create_app(url: str, service: str, **config: Any) -> Flask:
    setup = sa.create_engine(url)  # the schema and the markers, as a migration makes them
    try:
        FlaskBase.metadata.create_all(setup)
        rdb.install_commit_markers(setup)
    finally:
        setup.dispose()
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    app.config["RESILIENT_DB_SERVICE"] = service
    app.config.update(config)
    db.init_app(app)
    return app


def units(app: Flask) -> rdb.ResilientSession[FlaskSession]:
    factory: rdb.ResilientSession[FlaskSession] = app.extensions["resilient_db"]
    return factory


@pytest.fixture
def flask_app(pg_url: str, service: str) -> Iterator[Flask]:
    app = create_app(pg_url, service)
    yield app
    with app.app_context():
        db.engine.dispose()


def job_rows(app: Flask) -> dict[str, str]:
    with app.app_context(), db.engine.connect() as conn:
        return {row[0]: row[1] for row in conn.execute(sa.select(Job.name, Job.status))}


def marker_count(app: Flask) -> int:
    """Commit markers in the app's database: COMMITs that went out marked (see Units of work)."""
    with app.app_context(), db.engine.connect() as conn:
        return int(conn.scalar(sa.text("SELECT count(*) FROM resilient_db.commit_markers")))


def test_flask_db_session_is_a_resilient_session(flask_app: Flask) -> None:
    Session = units(flask_app)
    assert isinstance(db.session.session_factory, rdb.ResilientSession)
    assert db.session.session_factory is Session
    with flask_app.app_context():
        session = db.session()
        assert type(session) is Session.class_
        assert isinstance(session, JobsSession)  # the class of session_options
        assert session.label() == "jobs"
        assert session.expire_on_commit is False  # the options of session_options
        assert session.get_bind(Job) is db.engine  # Flask-SQLAlchemy's choice: the app's engine
        db.session.add(Job(name="a"))
        db.session.commit()
        assert db.session() is session  # one session per app context, as before
        assert db.session.get(Job, 1) is not None
    assert marker_count(flask_app) == 0  # drop-in COMMITs are plain ones
    with flask_app.app_context():
        units(flask_app).run(lambda session: session.add(Job(name="b")))
    assert marker_count(flask_app) == 1  # a unit's COMMIT carried its marker
    with flask_app.app_context():
        assert db.session() is not session  # removed when the context ended
        job = db.get_or_404(Job, 1)
        assert Job.query.filter_by(name="a").one() is job  # the legacy query, same session
        job.status = "running"
        db.session.commit()
        page = db.paginate(sa.select(Job).order_by(Job.name), page=1, per_page=10)
        assert [j.name for j in page.items] == ["a", "b"]
    assert job_rows(flask_app) == {"a": "running", "b": "queued"}


def test_flask_views_use_db_session_and_units(
    flask_app: Flask, pg_server: Any, service: str
) -> None:
    """A view uses ``db.session`` drop-in; another runs a unit (replayed after its backend is
    killed); the guard refuses an illegal move made through ``db.session``, answered 409 by
    resilient_db's problem details."""
    calls: list[int] = []

    @flask_app.errorhandler(rdb.ResilientDBError)
    def problem(exc: rdb.ResilientDBError) -> Any:
        answer = problem_details(exc)
        assert answer is not None
        return answer.body, answer.status, answer.headers

    @flask_app.post("/jobs/<name>")
    def create(name: str) -> Any:
        db.session.add(Job(name=name))
        db.session.commit()
        return {"name": name}, 201

    @flask_app.post("/jobs/<name>/status/<status>")
    def move(name: str, status: str) -> Any:
        job = db.session.execute(sa.select(Job).where(Job.name == name)).scalar_one()
        job.status = status
        db.session.commit()
        return {"status": job.status}

    def start(session: FlaskSession, name: str) -> str:
        calls.append(1)
        job = session.execute(sa.select(Job).where(Job.name == name)).scalar_one()
        job.status = "running"
        session.flush()
        if len(calls) == 1:
            pid = session.scalar(sa.text("SELECT pg_backend_pid()"))
            pg_server.execute(f"SELECT pg_terminate_backend({int(pid)})")
        session.execute(sa.text("SELECT 1"))
        return job.status

    @flask_app.post("/jobs/<name>/start")
    def start_view(name: str) -> Any:
        return {"status": units(current_app).run(start, name)}

    client = flask_app.test_client()
    assert client.post("/jobs/a").status_code == 201
    assert client.post("/jobs/b").status_code == 201
    answer = client.post("/jobs/a/start")
    assert answer.status_code == 200
    assert answer.json == {"status": "running"}
    assert len(calls) == 2
    stats = counters(service)
    assert stats["retries_by_class"] == {"disconnect": 1}
    assert stats["recovered"] == 1

    answer = client.post("/jobs/b/status/finished")  # queued -> finished: blocked at flush
    assert answer.status_code == 409
    assert answer.json is not None
    assert (answer.json["from_state"], answer.json["to_state"], answer.json["via"]) == (
        "queued",
        "finished",
        "flush",
    )
    assert client.post("/jobs/a/status/finished").status_code == 200
    assert job_rows(flask_app) == {"a": "finished", "b": "queued"}
    assert rdb.health()["transitions"]["blocked_transitions"] == 1
    assert counters(service)["retries"] == 1  # the blocked move was not retried


def test_flask_db_session_guards_bulk_updates_and_replaces_killed_pooled_connections(
    flask_app: Flask, pg_server: Any
) -> None:
    with flask_app.app_context():
        db.session.add_all([Job(name="a"), Job(name="b", status="queued")])
        db.session.commit()
        db.session.execute(sa.update(Job).where(Job.name == "a").values(status="running"))
        db.session.commit()
        pid = db.session.scalar(sa.text("SELECT pg_backend_pid()"))
    # the pooled connection dies between two requests (a restart of the server, a failover, an
    # idle timeout of a proxy): the next app context gets a new one, no error
    pg_server.execute(f"SELECT pg_terminate_backend({int(pid)}, 5000)")  # (gone on return)
    with flask_app.app_context():
        result = db.session.execute(sa.update(Job).values(status="finished"))  # only a may
        assert result.rowcount == 1  # type: ignore[attr-defined]
        db.session.commit()
        assert db.session.scalar(sa.text("SELECT pg_backend_pid()")) != pid
    assert job_rows(flask_app) == {"a": "finished", "b": "queued"}
    assert rdb.health()["transitions"]["bulk_rows_filtered"] == 1


def killed_once(session: FlaskSession, server: Any, calls: list[int], name: str) -> None:
    """A unit adding a job, whose backend ``server`` terminates in its first attempt."""
    calls.append(1)
    session.add(Job(name=name))
    session.flush()
    if len(calls) == 1:
        pid = session.scalar(sa.text("SELECT pg_backend_pid()"))
        server.execute(f"SELECT pg_terminate_backend({int(pid)})")
    session.execute(sa.text("SELECT 1"))


def test_flask_apps_alive_at_once_each_get_their_engine_healed(
    pg_server: Any, pg_url: str, service: str
) -> None:
    """``db.session`` is one object for every app: the factory of the app made last. In another
    app's context its sessions get that app's engine (Flask-SQLAlchemy's ``get_bind``), which
    its own factory gave resilient_db's hooks: COMMITs there are marked, units replayed, the
    guard applies, in that app's database."""
    second_database = f"{service}-second".replace("-", "_")
    pg_server.create_database(second_database)
    first = create_app(pg_url, service)
    second = create_app(pg_server.url(second_database), service)
    try:
        assert db.session.session_factory is units(second)
        for app, name in ((first, "one"), (second, "two")):
            calls: list[int] = []
            with app.app_context():
                assert db.session().get_bind(Job) is db.engine
                units(app).run(killed_once, pg_server, calls, name)
                assert len(calls) == 2
                job = db.session.execute(sa.select(Job).where(Job.name == name)).scalar_one()
                job.status = "finished"
                with pytest.raises(rdb.IllegalTransitionError):
                    db.session.commit()
                db.session.rollback()
                job.status = "running"
                db.session.commit()
            assert job_rows(app) == {name: "running"}
            assert marker_count(app) == 1  # the unit's COMMIT went out marked, there
    finally:
        for app in (first, second):
            with app.app_context():
                db.engine.dispose()
        pg_server.drop_database(second_database)


def test_flask_signals_of_tracked_modifications_still_come(pg_url: str, service: str) -> None:
    app = create_app(pg_url, service, SQLALCHEMY_TRACK_MODIFICATIONS=True)
    seen: list[tuple[str, str]] = []

    def committed(sender: Flask, changes: list[tuple[Job, str]]) -> None:
        seen.extend((job.name, operation) for job, operation in changes)

    track_modifications.models_committed.connect(committed, app)
    try:
        with app.app_context():
            db.session.add(Job(name="signalled"))
            db.session.commit()
            units(app).run(lambda session: session.add(Job(name="in a unit")))
    finally:
        track_modifications.models_committed.disconnect(committed, app)
        with app.app_context():
            db.engine.dispose()
    assert seen == [("signalled", "insert"), ("in a unit", "insert")]


def test_flask_engines_of_other_bind_keys_are_healed_too(
    pg_server: Any, pg_url: str, fault_proxy: FaultProxy, service: str
) -> None:
    """A unit touching a model of another bind key runs on that engine (Flask-SQLAlchemy's
    ``get_bind``); the factory made on it gave it the hooks: the unit is replayed after its
    backend there is killed, its COMMIT goes out marked, in that database, and a lost answer of
    that COMMIT is settled there (done once, not replayed)."""
    archive_database = f"{service}-archive".replace("-", "_")
    pg_server.create_database(archive_database)
    archive_url = pg_server.url(archive_database)
    setup = sa.create_engine(archive_url)
    try:
        Archived.metadata.create_all(setup)
        rdb.install_commit_markers(setup)
    finally:
        setup.dispose()
    app = create_app(
        pg_url, service, SQLALCHEMY_BINDS={"archive": fault_proxy.url(archive_database)}
    )
    calls: list[int] = []

    def archive(session: FlaskSession, name: str) -> str:
        calls.append(1)
        session.add(Archived(name=name))
        session.flush()
        if len(calls) == 1:
            connection = session.connection(bind_arguments={"mapper": Archived})
            pid = connection.scalar(sa.text("SELECT pg_backend_pid()"))
            pg_server.execute(f"SELECT pg_terminate_backend({int(pid)})")
        session.execute(sa.select(Archived))
        return str(session.get_bind(Archived).url.database)

    try:
        with app.app_context():
            assert set(app.extensions["resilient_db.binds"]) == {None, "archive"}
            assert units(app).run(archive, "old") == archive_database
            assert len(calls) == 2
            with db.engines["archive"].connect() as conn:
                marked = conn.scalar(sa.text("SELECT count(*) FROM resilient_db.commit_markers"))
                assert marked == 1
                assert conn.execute(sa.select(Archived.name, Archived.status)).all() == [
                    ("old", "kept")
                ]
            lost: list[int] = []

            def archive_once_more(session: FlaskSession) -> None:
                lost.append(1)
                session.add(Archived(name="lost answer"))

            fault_proxy.lose_commit_answer()
            units(app).run(archive_once_more)
            assert fault_proxy.commits_lost == 1
            assert lost == [1]  # committed: verified in the archive database, not replayed
            with db.engines["archive"].connect() as conn:
                assert conn.scalars(sa.select(Archived.name).order_by(Archived.name)).all() == [
                    "lost answer",
                    "old",
                ]
            assert counters(service)["verified_commits"] == 1
            db.session.execute(
                sa.select(Archived).where(Archived.name == "old")
            ).scalar_one().status = "purged"
            db.session.commit()
            db.session.execute(
                sa.select(Archived).where(Archived.name == "old")
            ).scalar_one().status = "kept"
            with pytest.raises(rdb.IllegalTransitionError) as info:  # on that engine too
                db.session.commit()
            assert (info.value.from_state, info.value.to_state) == ("purged", "kept")
            db.session.rollback()
        assert marker_count(app) == 0  # nothing went to the default database
    finally:
        with app.app_context():
            for engine in db.engines.values():
                engine.dispose()
        pg_server.drop_database(archive_database)


@pytest.mark.parametrize("form", ["decorator", "call"])
def test_flask_view_replayed_by_with_self_healing_runs_only_its_last_attempts_after_request(
    flask_app: Flask, pg_server: Any, service: str, form: str
) -> None:
    """A view whose operation is replayed (decorated with ``@rdb.with_self_healing``, or
    calling ``rdb.with_self_healing(fn)``) after its backend is killed mid-request: the
    callbacks its failed attempt gave ``flask.after_this_request`` are taken back before the
    replay (they ran on the successful attempt's response: a header sent twice, an e-mail of a
    failed attempt sent), those registered before the operation (a ``before_request`` hook's)
    are kept; ``db.session``, its transaction begun by the failed attempt, is rolled back for
    the replay (one row); what the failed attempt put on ``flask.g`` stays (documented)."""
    calls: list[int] = []
    ran: list[str] = []

    @flask_app.before_request
    def before() -> None:
        @after_this_request
        def hook(response: FlaskResponse) -> FlaskResponse:
            ran.append("before")
            return response

    def attempt(name: str) -> dict[str, Any]:
        calls.append(1)
        number = len(calls)
        g.attempts = [*g.get("attempts", []), number]

        @after_this_request
        def tell(response: FlaskResponse) -> FlaskResponse:
            ran.append(f"attempt {number}")
            response.headers.add("X-Attempt", str(number))
            return response

        db.session.add(Job(name=name))
        db.session.flush()
        if number == 1:
            pid = db.session.scalar(sa.text("SELECT pg_backend_pid()"))
            pg_server.execute(f"SELECT pg_terminate_backend({int(pid)})")
        db.session.execute(sa.text("SELECT 1"))
        db.session.commit()
        return {"attempt": number, "g": g.attempts}

    if form == "decorator":

        @flask_app.post("/jobs/<name>")
        @rdb.with_self_healing(service=service)
        def create(name: str) -> dict[str, Any]:
            return attempt(name)

    else:

        @flask_app.post("/jobs/<name>")
        def create(name: str) -> dict[str, Any]:
            return rdb.with_self_healing(lambda: attempt(name), service=service)

    answer = flask_app.test_client().post("/jobs/a")
    assert answer.status_code == 200, answer.text
    assert answer.json == {"attempt": 2, "g": [1, 2]}  # replayed; flask.g kept as it was
    assert answer.headers.getlist("X-Attempt") == ["2"]
    assert ran == ["before", "attempt 2"]
    assert job_rows(flask_app) == {"a": "queued"}
    stats = counters(service)
    assert (stats["retries"], stats["recovered"]) == (1, 1)


def test_flask_view_that_succeeds_at_once_keeps_its_after_request_callbacks(
    flask_app: Flask, service: str
) -> None:
    ran: list[str] = []

    @flask_app.get("/ping")
    @rdb.with_self_healing(service=service)
    def ping() -> dict[str, int]:
        @after_this_request
        def tell(response: FlaskResponse) -> FlaskResponse:
            ran.append("ping")
            return response

        return {"one": int(db.session.scalar(sa.text("SELECT 1")))}

    answer = flask_app.test_client().get("/ping")
    assert (answer.status_code, answer.json) == (200, {"one": 1})
    assert ran == ["ping"]


@pytest.mark.parametrize("hook_commits", [False, True], ids=["hook-reads", "hook-commits"])
def test_flask_before_request_using_db_session_and_a_replayed_view(
    flask_app: Flask, pg_server: Any, service: str, hook_commits: bool
) -> None:
    """As docs/sqlmodel-flask.md says: a ``before_request`` hook reading through ``db.session``
    begins its transaction before the decorated view's operation, which is then not replayed (503,
    the original error); a hook that ends its transaction (``db.session.commit()``) leaves the
    view replayable."""
    calls: list[int] = []

    @flask_app.before_request
    def load() -> None:
        g.jobs = db.session.scalar(sa.select(sa.func.count()).select_from(Job))
        if hook_commits:
            db.session.commit()

    @flask_app.post("/jobs/<name>")
    @rdb.with_self_healing(service=service)
    def create(name: str) -> dict[str, int]:
        calls.append(1)
        db.session.add(Job(name=name))
        db.session.flush()
        if len(calls) == 1:
            pid = db.session.scalar(sa.text("SELECT pg_backend_pid()"))
            pg_server.execute(f"SELECT pg_terminate_backend({int(pid)})")
        db.session.execute(sa.text("SELECT 1"))
        db.session.commit()
        return {"attempt": len(calls)}

    def problem(exc: Exception) -> Any:
        answer = problem_details(exc)
        assert answer is not None, exc
        return answer.body, answer.status, answer.response_headers

    flask_app.register_error_handler(sa.exc.OperationalError, problem)
    answer = flask_app.test_client().post("/jobs/a")
    if hook_commits:
        assert (answer.status_code, answer.json) == (200, {"attempt": 2})
        assert job_rows(flask_app) == {"a": "queued"}
    else:
        assert answer.status_code == 503
        assert answer.json is not None
        assert answer.json["type"] == "urn:resilient-db:problem:database-unavailable"
        assert len(calls) == 2  # the replay met the hook's aborted transaction
        assert job_rows(flask_app) == {}
