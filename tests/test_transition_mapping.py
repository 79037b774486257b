"""The trigger's error mapped back to the model's rules, against the real server: which model's
rules a refused move is read with (same-named tables in several schemas), and the row's key
given back with the key columns' Python types.

Models are mapped in registries of their own, disposed of after each test."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import enum
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import refused_by_trigger
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import mapped_column, registry

import resilient_db as rdb
from resilient_db.transitions._rules import guards_of

Mapper = Callable[..., type[Any]]


class St(enum.Enum):
    NEW = "new"
    DONE = "done"


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    yield eng
    eng.dispose()


@pytest.fixture
def mapped() -> Iterator[Mapper]:
    """Map a model (``name``, a table with ``attrs``) in a registry of its own; its rules are
    compiled at once, so the model is known in this process in the order made."""
    registries: list[registry] = []

    def make(name: str, table: str, schema: str | None, **attrs: Any) -> type[Any]:
        reg = registry()
        registries.append(reg)
        ns = {"__tablename__": table, "__table_args__": {"schema": schema}, **attrs}
        model = reg.mapped(type(name, (), ns))
        guards_of(model)
        return model

    yield make
    for reg in registries:
        reg.dispose()


def test_a_schema_table_is_read_with_its_own_rules_not_a_same_named_schemaless_one(
    engine: sa.Engine, mapped: Mapper
) -> None:
    """``tenant."Tasks"`` (enum states) and ``"Tasks"`` without a schema (strings), both of a
    model named ``Task``: the tenant table's refused move comes back as its enum members, even
    when the schema-less model's rules were compiled last."""
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE SCHEMA tenant")
    tenant = mapped(
        "Task",
        "Tasks",
        "tenant",
        id=mapped_column(sa.Integer, primary_key=True),
        status=mapped_column(sa.Enum(St, name="st", schema="tenant")),
        __transitions__=rdb.TransitionRules(
            column="status", transitions={St.NEW: {St.DONE}}, initial={St.NEW}
        ),
    )
    plain = mapped(
        "Task",
        "Tasks",
        None,
        id=mapped_column(sa.Integer, primary_key=True),
        status=mapped_column(sa.String(10)),
        __transitions__=rdb.TransitionRules(
            column="status", transitions={"new": {"done"}}, initial={"new"}
        ),
    )
    for model in (tenant, plain):
        model.__table__.metadata.create_all(engine)
        rdb.install_transition_trigger(engine, model)
    with engine.begin() as conn:
        conn.execute(sa.insert(tenant).values(id=1, status=St.NEW))
        conn.execute(sa.update(tenant.__table__).values(status=St.DONE))
    with engine.connect() as conn:
        err = refused_by_trigger(conn, sa.update(tenant.__table__).values(status=St.NEW))
        assert (err.from_state, err.to_state, err.pk) == (St.DONE, St.NEW, 1)
        conn.execute(sa.insert(plain).values(id=1, status="new"))
        conn.execute(sa.update(plain.__table__).values(status="done"))
        err = refused_by_trigger(conn, sa.update(plain.__table__).values(status="new"))
        assert (err.from_state, err.to_state) == ("done", "new")


def test_a_table_name_longer_than_63_bytes_is_mapped_back(
    engine: sa.Engine, mapped: Mapper, service: str
) -> None:
    """PostgreSQL keeps the first 63 bytes of a longer name (SQLAlchemy sends it whole and
    works): the trigger's detail carries the cut name, the model the whole one."""
    name = "заявки_на_обслуживание_клиентов_архив"  # 37 characters, 70 bytes
    assert len(name.encode()) > 63
    model = mapped(
        "Ticket",
        name,
        None,
        id=mapped_column(sa.Integer, primary_key=True),
        status=mapped_column(sa.String(10)),
        __transitions__=rdb.TransitionRules(
            column="status", transitions={"open": {"closed"}}, initial={"open"}
        ),
    )
    model.__table__.metadata.create_all(engine)
    rdb.install_transition_trigger(engine, model)
    with engine.connect() as conn:
        conn.execute(sa.insert(model).values(id=1, status="open"))
        err = refused_by_trigger(conn, sa.update(model.__table__).values(status="reopened"))
    assert (err.model, err.column, err.pk) == ("Ticket", "status", 1)
    assert (err.from_state, err.to_state, err.via) == ("open", "reopened", "db")
    Sessions = rdb.ResilientSession(engine, service=service)

    def unit(session: Any) -> None:  # through a session: the engine's hook maps it the same
        session.add(model(id=2, status="open"))
        session.flush()
        session.execute(sa.text(f"UPDATE \"{name}\" SET status = 'gone' WHERE id = 2"))

    with pytest.raises(rdb.IllegalTransitionError) as info:
        Sessions.run(unit)
    assert (info.value.model, info.value.from_state, info.value.to_state) == (
        "Ticket",
        "open",
        "gone",
    )


def prio_model(mapped: Mapper, transitions: Any, initial: Any) -> Any:
    """A model ``P`` whose integer column ``prio`` follows ``transitions``."""
    return mapped(
        "P",
        "p",
        None,
        id=mapped_column(sa.Integer, primary_key=True),
        prio=mapped_column(sa.Integer),
        __transitions__=rdb.TransitionRules(
            column="prio", transitions=transitions, initial=initial
        ),
    )


@pytest.mark.parametrize(("state", "as_read"), [("01", "1"), ("+1", "1"), ("-0", "0")])
def test_an_integer_state_the_database_never_writes_so_isrefused_by_trigger(
    mapped: Mapper, state: str, as_read: str
) -> None:
    """``col::text`` of an integer column is never "01": a rule about it could never apply."""
    with pytest.raises(rdb.TransitionRulesError) as info:
        prio_model(mapped, {"0": {state}}, {"0"})
    message = str(info.value)
    assert f"P.__transitions__ (column 'prio'): state {state!r}" in message
    assert f"writes this one as {as_read!r}" in message
    assert "col::text" in message


def test_integer_states_as_the_database_writes_them_are_accepted(mapped: Mapper) -> None:
    model = prio_model(mapped, {"0": {1, "-2"}, 10: {"0"}}, {"0", 10})
    (guard,) = guards_of(model)
    assert set(guard.next) == {"0", "1", "-2", "10"}


def test_the_row_key_from_the_trigger_has_the_key_columns_types(
    engine: sa.Engine, mapped: Mapper, service: str
) -> None:
    """UUID, date, timestamp and Decimal key values come back as the flush guard gives them
    (a numeric's digits exact), not as the detail's JSON text and float; a value that has no
    Python form (a date 'infinity') as the database wrote it."""
    model = mapped(
        "Entry",
        "entries",
        None,
        id=mapped_column(sa.Uuid, primary_key=True),
        day=mapped_column(sa.Date, primary_key=True),
        at=mapped_column(sa.DateTime(timezone=True), primary_key=True),
        amount=mapped_column(sa.Numeric(20, 2), primary_key=True),
        status=mapped_column(sa.String(10)),
        __transitions__=rdb.TransitionRules(
            column="status", transitions={"pending": {"done"}}, initial={"pending"}
        ),
    )
    model.__table__.metadata.create_all(engine)
    rdb.install_transition_trigger(engine, model)
    key = (
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        datetime.date(2024, 2, 29),
        datetime.datetime(2024, 2, 29, 10, 30, 15, 123456, tzinfo=datetime.timezone.utc),
        decimal.Decimal("123456789012345678.10"),  # more digits than a float holds
    )
    row = dict(zip(("id", "day", "at", "amount"), key, strict=True))
    with engine.begin() as conn:
        conn.exec_driver_sql("SET TIME ZONE 'UTC'")
        conn.execute(sa.insert(model).values(**row, status="pending"))
    with engine.connect() as conn:
        conn.exec_driver_sql("SET TIME ZONE 'UTC'")
        err = refused_by_trigger(conn, sa.update(model.__table__).values(status="zz"))
    assert err.pk == key
    assert [type(v) for v in err.pk] == [type(v) for v in key]
    assert str(err.pk[3]) == "123456789012345678.10"
    with engine.connect() as conn:
        conn.exec_driver_sql("SET TIME ZONE 'UTC'")
        conn.exec_driver_sql(
            "INSERT INTO entries VALUES (%s, 'infinity', %s, 1, 'pending')", (key[0], key[2])
        )
        err = refused_by_trigger(
            conn, sa.text("UPDATE entries SET status = 'zz' WHERE day = 'infinity'")
        )
    assert err.pk == (key[0], "infinity", key[2], decimal.Decimal(1))
    Sessions = rdb.ResilientSession(engine, service=service)

    def unit(session: Any) -> None:
        session.get(model, key).status = "zz"

    with pytest.raises(rdb.IllegalTransitionError) as info:
        Sessions.run(unit)
    assert info.value.via == "flush"
    assert info.value.pk == key  # the same as the trigger's


def test_a_boolean_column_is_guarded_by_bool_states(
    engine: sa.Engine, mapped: Mapper, service: str
) -> None:
    """``True``/``False`` are the states of a Boolean column: the flush guard, an ORM bulk
    UPDATE and the trigger (which compares ``col::text``, 'true'/'false') agree on them."""
    model = mapped(
        "Flag",
        "flags",
        None,
        id=mapped_column(sa.Integer, primary_key=True),
        ok=mapped_column(sa.Boolean, nullable=True),
        __transitions__=rdb.TransitionRules(
            column="ok", transitions={False: {True}, None: {False}}, initial={False, None}
        ),
    )
    (guard,) = guards_of(model)
    assert guard.initial == {"false", None}
    assert dict(guard.next) == {"false": {"true"}, "true": set(), None: {"false"}}
    model.__table__.metadata.create_all(engine)
    rdb.install_transition_trigger(engine, model)
    with engine.connect() as conn:
        conn.execute(sa.insert(model).values(id=1, ok=False))
        conn.execute(sa.update(model.__table__).values(ok=True))
        err = refused_by_trigger(conn, sa.update(model.__table__).values(ok=False))
        assert (err.from_state, err.to_state, err.via) == (True, False, "db")
        err = refused_by_trigger(conn, sa.insert(model).values(id=2, ok=True))
        assert (err.from_state, err.to_state, err.inserted) == (None, True, True)
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions.begin() as session:
        session.add(model(id=1, ok=False))
        session.add(model(id=2, ok=None))
    with Sessions.begin() as session:
        session.get(model, 1).ok = True
        session.get(model, 2).ok = False
    assert rdb.allowed_transitions(model(ok=False)) == {False, None}  # a new row's: initial

    def back(session: Any) -> None:
        session.get(model, 1).ok = False

    with pytest.raises(rdb.IllegalTransitionError) as info:
        Sessions.run(back)
    assert (info.value.from_state, info.value.to_state, info.value.via) == (True, False, "flush")
    with Sessions.begin() as session:  # bulk: only the rows that may move (2: False -> True)
        session.execute(sa.update(model).values(ok=True))
    with Sessions.begin() as session:  # True -> False: no row may
        assert session.execute(sa.update(model).values(ok=False)).rowcount == 0
    with engine.connect() as conn:
        assert dict(conn.execute(sa.select(model.id, model.ok)).all()) == {
            1: True,
            2: True,
        }


@pytest.mark.parametrize(
    ("type_", "rules", "message"),
    [
        pytest.param(
            sa.Boolean,
            {"transitions": {"false": {"true"}}, "initial": {"false"}},
            r"state 'false' is no value of the Boolean column .*states are True and False",
            id="text states of a Boolean column",
        ),
        pytest.param(
            sa.String(10),
            {"transitions": {False: {True}}, "initial": {False}},
            r"state False is a bool, but the column .* is not Boolean",
            id="bool states of a text column",
        ),
        pytest.param(
            sa.Integer,
            {"transitions": {False: {True}}, "initial": {False}},
            r"state False is a bool, but the column .* is not Boolean",
            id="bool states of an integer column",
        ),
    ],
)
def test_bool_states_and_boolean_columns_go_together(
    mapped: Mapper, type_: Any, rules: dict[str, Any], message: str
) -> None:
    with pytest.raises(rdb.TransitionRulesError, match=message):
        mapped(
            "Flag",
            "flags",
            None,
            id=mapped_column(sa.Integer, primary_key=True),
            ok=mapped_column(type_),
            __transitions__=rdb.TransitionRules(column="ok", **rules),
        )


def test_zero_and_one_are_a_boolean_columns_false_and_true(mapped: Mapper) -> None:
    """0 and 1 are Python's False and True (equal, and one key in a dict or set): declared for a
    Boolean column they are taken as them, as docs/transition-guard.md says; 2 is refused."""

    def flag(state: int) -> Any:
        return mapped(
            "Flag",
            "flags",
            None,
            id=mapped_column(sa.Integer, primary_key=True),
            ok=mapped_column(sa.Boolean),
            __transitions__=rdb.TransitionRules(
                column="ok", transitions={state: {1}}, initial={state}
            ),
        )

    model = flag(0)
    (guard,) = guards_of(model)
    assert guard.initial == {"false"}
    assert dict(guard.next) == {"false": {"true"}, "true": set()}
    assert rdb.allowed_transitions(model(ok=False)) == {False}  # a new row's: initial
    with pytest.raises(rdb.TransitionRulesError, match=r"state 2 is no value of the Boolean"):
        flag(2)


def test_bool_states_mixed_with_others_arerefused_by_trigger() -> None:
    with pytest.raises(rdb.TransitionRulesError, match=r"True of type bool among states of other"):
        rdb.TransitionRules(column="ok", transitions={"pending": {True}}, initial={"pending"})
    rules = rdb.TransitionRules(column="ok", transitions={"*": {False}}, initial={True})
    assert rules.declared_states == {True, False}


def test_a_boolean_row_moved_underneath_an_asyncpg_flush_of_many_is_named_as_a_bool(
    engine: sa.Engine, mapped: Mapper, pg_server: Any, pg_database: str
) -> None:
    """asyncpg reports no row count for an executemany, so the flush's UPDATE of many rows
    raises from the server with what the moved row holds, as text: for a Boolean column the
    message said "holds 'true'" where every other path says True."""
    model = mapped(
        "Switch",
        "switches",
        None,
        id=mapped_column(sa.Integer, primary_key=True),
        on=mapped_column(sa.Boolean, nullable=False),
        __transitions__=rdb.TransitionRules(
            column="on", transitions={False: {True}, True: {False}}, initial={False}
        ),
    )
    model.__table__.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(model), [{"id": i, "on": False} for i in (1, 2, 3)])

    async def main() -> rdb.StaleTransitionError:
        aengine = create_async_engine(pg_server.url(pg_database, driver="asyncpg"))
        Sessions = rdb.AsyncResilientSession(aengine, service="bool-stale")
        try:
            async with Sessions() as session:
                rows = [await session.get(model, i) for i in (1, 2, 3)]
                with engine.begin() as conn:  # another transaction moves the second row
                    conn.execute(sa.update(model.__table__).where(model.id == 2).values(on=True))
                for row in rows:
                    row.on = True
                with pytest.raises(rdb.StaleTransitionError) as info:
                    await session.flush()
                return info.value
        finally:
            await aengine.dispose()

    err = asyncio.run(main())
    assert (err.pk, err.from_state, err.to_state) == (2, False, True)
    assert "now holds True" in err.reason, err.reason
