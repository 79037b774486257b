"""Integer states on a ``numeric`` status column: PostgreSQL writes a value with the column's
scale (``col::text`` of 1 in ``NUMERIC(4, 2)`` is ``'1.00'``), and the guards, the trigger's
literals and drift detection key the states so.

- The trigger compared ``'1.00'`` with the literal ``'1'``: it refused the INSERT of the initial
  state and every legal move, while the rules' checks and ``trigger_drift`` reported nothing.
- The session guards keyed a row read back (a ``Decimal``) as no state at all, and refused
  every move of it at flush, on any ``numeric`` column (``NUMERIC``, ``NUMERIC(5)`` too).
- ``NUMERIC`` without a scale keeps the decimals each value was written with (``3.000``): the
  trigger compares its text without the trailing zeros (``trim_scale``), as the guards do.
- A state the column can't hold as declared (1000 in ``NUMERIC(4, 2)``: overflow; ``'1.005'``:
  rounded; ``'1.5'``: written ``'1.50'``) is refused at mapping; a literal ``server_default`` is
  compared as stored (``'1.0'`` is the initial 1.00).

Real server."""

from __future__ import annotations

import decimal
import io
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from scenarios import refused_by_trigger
from sqlalchemy.orm import Session, mapped_column, registry

import resilient_db as rdb
from resilient_db.transitions import TransitionTrigger
from resilient_db.transitions._rules import guards_of

RULES = rdb.TransitionRules(column="level", transitions={1: {2}, 2: {3}}, initial={1})

#: (column type, the column's text of the states 1, 2, 3)
TYPES = [
    (sa.Numeric(4, 2), ["1.00", "2.00", "3.00"]),
    (sa.Numeric(5), ["1", "2", "3"]),
    (sa.Numeric(6, 0), ["1", "2", "3"]),
    (sa.Numeric(), ["1", "2", "3"]),
]


@pytest.fixture
def reg() -> Iterator[registry]:
    found = registry()
    yield found
    found.dispose()


def mapped(
    reg: registry, type_: Any, rules: rdb.TransitionRules = RULES, **column: Any
) -> type[Any]:
    attrs = {
        "__tablename__": "jobs",
        "__transitions__": rules,
        "id": mapped_column(sa.Integer, primary_key=True),
        "level": mapped_column(type_, **column),
    }
    return reg.mapped(type("Job", (), attrs))


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    yield eng
    eng.dispose()


def installed(engine: sa.Engine, model: type[Any]) -> type[Any]:
    model.__table__.create(engine)
    rdb.install_transition_trigger(engine, model)
    return model


def stored(engine: sa.Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql("SELECT id, level::text FROM jobs")]


@pytest.mark.parametrize(("type_", "texts"), TYPES)
def test_every_legal_write_passes_on_every_path(
    engine: sa.Engine, reg: registry, service: str, type_: Any, texts: list[str]
) -> None:
    """Raw SQL as psql sends it, the ORM (a row read back, a ``Decimal``, moved on), a bulk
    UPDATE: all legal, all written; and the installed trigger is the rules' one."""
    Job = installed(engine, mapped(reg, type_))
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO jobs VALUES (1, 1)")
        conn.exec_driver_sql("UPDATE jobs SET level = 2 WHERE id = 1")
        conn.exec_driver_sql("UPDATE jobs SET level = 2.0 WHERE id = 1")  # (the same state)
        conn.exec_driver_sql("UPDATE jobs SET level = 3.000 WHERE id = 1")
    Sessions = rdb.ResilientSession(engine, service=service)
    Sessions.run(lambda s: s.add_all([Job(id=2, level=1), Job(id=3, level=decimal.Decimal(1))]))

    def move(to: Any) -> None:
        def moved(session: Session) -> None:
            row = session.get_one(Job, 2)
            assert isinstance(row.level, decimal.Decimal)
            row.level = to

        Sessions.run(moved)

    move(2)
    move(decimal.Decimal(3))
    bulk = Sessions.run(lambda s: s.execute(sa.update(Job).where(Job.id == 3).values(level=2)))
    assert bulk.rowcount == 1
    three = "3.000" if type_.precision is None else texts[2]  # (NUMERIC keeps the decimals)
    assert sorted(stored(engine)) == [(1, three), (2, texts[2]), (3, texts[1])]
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Job) is None


@pytest.mark.parametrize(("type_", "texts"), TYPES)
def test_illegal_writes_are_refused_by_the_trigger_and_the_guards(
    engine: sa.Engine, reg: registry, service: str, type_: Any, texts: list[str]
) -> None:
    Job = installed(engine, mapped(reg, type_))
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO jobs VALUES (1, 1)")
        conn.exec_driver_sql("UPDATE jobs SET level = 2 WHERE id = 1")
    with engine.connect() as conn:
        back = refused_by_trigger(conn, "UPDATE jobs SET level = 1.000 WHERE id = 1")
        inserted = refused_by_trigger(conn, "INSERT INTO jobs VALUES (2, 2)")
    assert (back.from_state, back.to_state, back.via) == (2, 1, "db")
    assert "allowed from here: 3" in back.reason
    assert (inserted.to_state, inserted.inserted) == (2, True)

    Sessions = rdb.ResilientSession(engine, service=service)

    def skip(session: Session) -> None:
        session.get_one(Job, 1).level = 1

    with pytest.raises(rdb.IllegalTransitionError) as at_flush:
        Sessions.run(skip)
    assert (at_flush.value.from_state, at_flush.value.to_state) == (2, 1)
    assert at_flush.value.via == "flush"
    assert "allowed from here: 3" in at_flush.value.reason  # (the row read back is state 2)
    assert stored(engine) == [(1, texts[1])]


def test_a_value_with_more_digits_than_the_scale_is_refused_saying_so(
    engine: sa.Engine, reg: registry, service: str
) -> None:
    """PostgreSQL would round 1.001 to the state 1.00: no guard can tell as the database
    would, so it is no state."""
    Job = installed(engine, mapped(reg, sa.Numeric(4, 2)))
    Sessions = rdb.ResilientSession(engine, service=service)
    Sessions.run(lambda s: s.add(Job(id=1, level=1)))

    def move(session: Session) -> None:
        session.get_one(Job, 1).level = decimal.Decimal("2.001")

    with pytest.raises(rdb.IllegalTransitionError) as info:
        Sessions.run(move)
    assert "2.001 has more digits than the column's scale (2) keeps" in info.value.reason
    assert stored(engine) == [(1, "1.00")]


@pytest.mark.parametrize("type_", [sa.Numeric(4, 2), sa.Numeric()])
def test_a_trigger_of_the_earlier_text_is_drift(
    engine: sa.Engine, reg: registry, type_: Any
) -> None:
    """What an earlier release installed for a ``NUMERIC(4, 2)`` column (literals ``'1'``,
    which the column's text never is) or a ``NUMERIC`` one (its text compared with its trailing
    zeros) is told apart from the trigger of its rules, and an install replaces it."""
    Job = mapped(reg, type_)
    Job.__table__.create(engine)
    earlier = TransitionTrigger(
        model="Job", table="jobs", primary_key="id", rules=RULES, type_=sa.Integer
    )
    with engine.begin() as conn:
        rdb.install_transition_trigger(conn, earlier)
        assert rdb.trigger_drift(conn, Job) is not None
        rdb.install_transition_trigger(conn, Job)
        assert rdb.trigger_drift(conn, Job) is None
        conn.exec_driver_sql("INSERT INTO jobs VALUES (1, 1.0)")


def offline_script(target: Any) -> str:
    buffer = io.StringIO()
    context = MigrationContext.configure(  # as Alembic's env.py template configures it
        dialect_name="postgresql",
        opts={"as_sql": True, "output_buffer": buffer},
        dialect_opts={"paramstyle": "named"},
    )
    rdb.install_transition_trigger(Operations(context), target)
    return buffer.getvalue()


def test_the_offline_script_compares_the_scaled_text(engine: sa.Engine, reg: registry) -> None:
    """``alembic upgrade --sql`` of a migration's ``TransitionTrigger`` writes the model's
    script, whose trigger, run as a script, takes the legal writes and is current."""
    Job = mapped(reg, sa.Numeric(4, 2))
    value = TransitionTrigger(
        model="Job", table="jobs", primary_key="id", rules=RULES, type_=sa.Numeric(4, 2)
    )
    script = offline_script(value)
    assert script == offline_script(Job)
    assert "IN ('1.00')" in script
    Job.__table__.create(engine)
    with engine.begin() as conn:
        with conn.connection.dbapi_connection.cursor() as cursor:  # type: ignore[union-attr]
            cursor.execute(script)  # as psql runs it (no parameters)
        conn.exec_driver_sql("INSERT INTO jobs VALUES (1, 1)")
        conn.exec_driver_sql("UPDATE jobs SET level = 2 WHERE id = 1")
        assert rdb.trigger_drift(conn, Job) is None
        assert rdb.trigger_drift(conn, value) is None


@pytest.mark.parametrize(
    ("type_", "state", "message"),
    [
        (sa.Numeric(4, 2), 1000, r"state 1000 can't be stored .*numeric field overflow"),
        (sa.Numeric(4, 2), 100, r"numeric\(4, 2\) holds numbers below 100 in absolute value"),
        (sa.Numeric(3), 1000, r"numeric\(3, 0\) holds numbers below 1000"),
        (sa.Numeric(4, 2), "1.005", r"state '1.005' can't .*would round it to 1.01"),
        (sa.Numeric(2, -3), 1234, r"state 1234 can't .*would round it to 1000"),
        (sa.Numeric(4, 2), "1.5", r"state '1.5' .*writes this one as '1.50'.*declare it as '1.50'"),
        (sa.Numeric(4, 2), "2", r"writes this one as '2.00'.*declare it as 2 \(or '2.00'\)"),
        (sa.Numeric(6, 0), "2.0", r"writes this one as '2'.*never '2.0'"),
        (sa.Numeric(), "02", r"writes this one as '2'.*never '02'"),
        (sa.Numeric(4, 2), "two", r"state 'two' can't be stored .*the column holds numbers"),
    ],
)
def test_a_state_the_column_cant_hold_as_declared_is_refused_at_mapping(
    reg: registry, type_: Any, state: Any, message: str
) -> None:
    rules = rdb.TransitionRules(column="level", transitions={0: {state}}, initial={0})
    where = r"Job\.__transitions__ \(column 'level'\): .*"
    with pytest.raises(rdb.TransitionRulesError, match=where + message):
        guards_of(mapped(reg, type_, rules))
    with pytest.raises(rdb.TransitionRulesError, match=message):
        TransitionTrigger(model="Job", table="jobs", primary_key="id", rules=rules, type_=type_)


@pytest.mark.parametrize("default", ["1", "1.0", " 1.004 "])
def test_a_server_default_is_compared_as_stored(reg: registry, default: str) -> None:
    (guard,) = guards_of(mapped(reg, sa.Numeric(4, 2), server_default=default))
    assert guard.initial == {"1.00"}
    other = registry()
    try:
        with pytest.raises(rdb.TransitionRulesError, match=r"server_default '2\.0' is not an init"):
            guards_of(mapped(other, sa.Numeric(4, 2), server_default="2.0"))
    finally:
        other.dispose()


def test_a_value_out_of_numerics_range_is_no_state(reg: registry) -> None:
    """No key is computed for it (the flush raised ``decimal.Overflow`` making one), and none
    is taken for another state (``1E-999999999`` is no 0)."""
    rules = rdb.TransitionRules(column="level", transitions={1: {0}}, initial={1})
    (guard,) = guards_of(mapped(reg, sa.Numeric(), rules))
    for value in (decimal.Decimal("1E+999999999"), decimal.Decimal("1E-999999999")):
        assert not guard.legal_move(1, value)
        assert "out of the range of PostgreSQL's numeric" in getattr(guard.key(value), "why", "")


DECIMAL_RULES = rdb.TransitionRules(
    column="level",
    transitions={decimal.Decimal("1.5"): {decimal.Decimal("2.25")}, decimal.Decimal("2.25"): {3}},
    initial={decimal.Decimal("1.5")},
)


def test_decimal_states_on_a_numeric_column(engine: sa.Engine, reg: registry, service: str) -> None:
    """States declared as ``Decimal`` (they were refused: non-integer states had to be written
    as PostgreSQL's text, ``'1.50'``) are keyed as the column stores them, on every path: the
    session guards, the trigger's literals, drift, errors naming the declared states."""
    Job = installed(engine, mapped(reg, sa.Numeric(4, 2), DECIMAL_RULES))
    (guard,) = guards_of(Job)
    assert dict(guard.states) == {
        "1.50": decimal.Decimal("1.5"),
        "2.25": decimal.Decimal("2.25"),
        "3.00": 3,
    }
    Sessions = rdb.ResilientSession(engine, service=service)
    Sessions.run(lambda s: s.add(Job(id=1, level=decimal.Decimal("1.50"))))

    def move(to: Any) -> None:
        def moved(session: Session) -> None:
            session.get_one(Job, 1).level = to

        Sessions.run(moved)

    move(decimal.Decimal("2.25"))
    with pytest.raises(rdb.IllegalTransitionError) as at_flush:
        move(decimal.Decimal("1.5"))
    assert (at_flush.value.from_state, at_flush.value.to_state) == (
        decimal.Decimal("2.25"),
        decimal.Decimal("1.5"),
    )
    assert "allowed from here: 3" in at_flush.value.reason
    with engine.connect() as conn:
        # (the resilient factory's engine raises the trigger's refusal mapped back)
        with pytest.raises(rdb.IllegalTransitionError) as by_trigger:
            conn.exec_driver_sql("UPDATE jobs SET level = 1.5 WHERE id = 1")
        conn.rollback()
        back = by_trigger.value
        assert (back.from_state, back.to_state, back.via) == (
            decimal.Decimal("2.25"),
            decimal.Decimal("1.5"),
            "db",
        )
        assert rdb.trigger_drift(conn, Job) is None
    move(3)
    assert stored(engine) == [(1, "3.00")]
    assert 'state "1.5" as s0' in rdb.rules_to_mermaid(Job)
    migration = TransitionTrigger(
        model="Job", table="jobs", primary_key="id", rules=DECIMAL_RULES, type_=sa.Numeric(4, 2)
    )
    assert offline_script(migration) == offline_script(Job)


@pytest.mark.parametrize(
    ("type_", "state", "message"),
    [
        (sa.Integer, decimal.Decimal("1.5"), r"Decimal\('1.5'\) is no integer"),
        (sa.String(10), decimal.Decimal("1.5"), r"is a number, but the column .* holds no numb"),
        (sa.Numeric(4, 2), decimal.Decimal("1.505"), r"would round it to 1.51"),
        (sa.Numeric(4, 2), decimal.Decimal("100"), r"numeric field overflow"),
    ],
)
def test_a_decimal_state_the_column_cant_hold_is_refused_at_mapping(
    reg: registry, type_: Any, state: decimal.Decimal, message: str
) -> None:
    rules = rdb.TransitionRules(column="level", transitions={0: {state}}, initial={0})
    with pytest.raises(rdb.TransitionRulesError, match=r"Job\.__transitions__ .*" + message):
        guards_of(mapped(reg, type_, rules))


def test_a_decimal_state_is_the_integer_state_of_an_integer_column(reg: registry) -> None:
    rules = rdb.TransitionRules(
        column="level", transitions={decimal.Decimal("1.0"): {2}}, initial={1}
    )
    (guard,) = guards_of(mapped(reg, sa.Integer, rules))
    assert guard.initial == {"1"}
    assert guard.next["1"] == {"2"}


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "sNaN"])
def test_a_decimal_that_is_no_finite_number_is_refused(value: str) -> None:
    with pytest.raises(rdb.TransitionRulesError, match="no finite number; declare it as text"):
        rdb.TransitionRules(column="level", transitions={0: [decimal.Decimal(value)]}, initial={0})


def test_a_migrations_trigger_without_the_numeric_type_says_so() -> None:
    with pytest.raises(rdb.TransitionRulesError, match="give it the column's type_"):
        TransitionTrigger(model="Job", table="jobs", primary_key="id", rules=DECIMAL_RULES)
