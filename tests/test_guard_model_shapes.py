"""The guard on the model shapes applications map their tables with: joined-table subclasses
whose key is spelled otherwise than their base's, concrete inheritance (plain, and under an
``AbstractConcreteBase``), rules set on a class after it was mapped, rules naming an attribute
that is no column. Each shape is either guarded on every path (flush, bulk UPDATE, trigger) or
refused with an error naming the model and the problem.

The shapes found guarded as they are (single-table inheritance with rules on the base, on a
subclass only or per subclass; joined-table inheritance with the status on either table;
``polymorphic_abstract``; mixins and ``declared_attr``; ``__abstract__`` bases;
``MappedAsDataclass``; ``map_imperatively``; ``__table__``; an attribute named otherwise than
its column, ``key=``, ``column_property``, a status inside a ``composite``; enum, ``Literal``,
integer, Boolean, nullable and ``TypeDecorator`` statuses; several guarded columns; a table
mapped by two classes) are covered by docs/transition-guard.md's list and the suite's other guard
tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import BYPASS_BY_HAND, metadata_engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.declarative import AbstractConcreteBase
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    composite,
    mapped_column,
    registry,
    sessionmaker,
    synonym,
)

import resilient_db as rdb
from resilient_db._config import Config
from resilient_db._errors import IllegalTransitionError
from resilient_db.transitions import (
    TransitionRules,
    TransitionRulesError,
    install_transition_trigger,
)
from resilient_db.transitions._bypass import GUARD_INFO_KEY
from resilient_db.transitions._guards import install_guard


def _rules(column: str = "status") -> TransitionRules:
    return TransitionRules(
        column=column,
        transitions={"pending": {"running"}, "running": {"done"}},
        initial={"pending"},
    )


class Base(DeclarativeBase):
    pass


class Node(Base):
    """The base of a joined-table hierarchy keyed by ``pid``."""

    __tablename__ = "shape_nodes"
    pid: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "node"}  # noqa: RUF012


class Leaf(Node):
    """Its table's key is mapped as ``cid``, not under the base's ``pid``."""

    __tablename__ = "shape_leaves"
    __transitions__ = _rules()
    cid: Mapped[int] = mapped_column(sa.ForeignKey("shape_nodes.pid"), primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")
    __mapper_args__ = {"polymorphic_identity": "leaf"}  # noqa: RUF012


class Pair(Base):
    """The base of a joined-table hierarchy with a key of two columns, ``(a, b)``."""

    __tablename__ = "shape_pairs"
    a: Mapped[int] = mapped_column(primary_key=True)
    b: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "pair"}  # noqa: RUF012


class SwappedPair(Pair):
    """Its table lists the key's columns the other way round, ``(b, a)``."""

    __tablename__ = "shape_swapped"
    __transitions__ = _rules()
    b: Mapped[int] = mapped_column(primary_key=True)
    a: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")
    __table_args__ = (sa.ForeignKeyConstraint(["a", "b"], ["shape_pairs.a", "shape_pairs.b"]),)
    __mapper_args__ = {"polymorphic_identity": "swapped"}  # noqa: RUF012


class RenamedPair(Pair):
    """Its table names the key's columns otherwise (``y``, ``x``, listed the other way round),
    each referring to its base column by a foreign key, mapped under attributes of their own:
    only the foreign keys tell which is which."""

    __tablename__ = "shape_renamed"
    __transitions__ = _rules()
    y: Mapped[int] = mapped_column(primary_key=True)
    x: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")
    __table_args__ = (sa.ForeignKeyConstraint(["x", "y"], ["shape_pairs.a", "shape_pairs.b"]),)
    __mapper_args__ = {"polymorphic_identity": "renamed"}  # noqa: RUF012


class Account(Base):
    """Concrete inheritance: ``Savings`` keeps its rows in a table of its own, by the rules it
    inherits."""

    __tablename__ = "shape_accounts"
    __transitions__ = _rules()
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")


class Savings(Account):
    __tablename__ = "shape_savings"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")
    __mapper_args__ = {"concrete": True}  # noqa: RUF012


class Document(AbstractConcreteBase, Base):
    """Rules on an abstract concrete base, mapped to the union of its subclasses' tables."""

    __transitions__ = _rules()
    strict_attrs = True
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")


class Invoice(Document):
    __tablename__ = "shape_invoices"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")
    __mapper_args__ = {"polymorphic_identity": "invoice", "concrete": True}  # noqa: RUF012


class _S(Session):
    pass


install_guard(_S)


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    yield from metadata_engine(pg_url, Base)


def _factory(engine: sa.Engine, mode: str = "raise") -> sessionmaker[_S]:
    return sessionmaker(engine, class_=_S, info={GUARD_INFO_KEY: Config(bulk_update=mode)})


def _run(engine: sa.Engine, *statements: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(BYPASS_BY_HAND)
        for statement in statements:
            conn.exec_driver_sql(statement)


def _statuses(engine: sa.Engine, table: str, columns: str = "*") -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        sql = f"SELECT {columns} FROM {table} ORDER BY 1, 2"
        return [tuple(r) for r in conn.exec_driver_sql(sql)]


# ------------------------------------------------------------------------------------------------
# joined-table inheritance: the subclass's table keyed otherwise than its base
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sync", ["auto", "evaluate", False])  # ("fetch": not for these)
def test_a_bulk_update_by_the_subclass_tables_own_key_is_judged(
    engine: sa.Engine, sync: Any
) -> None:
    """``update(Leaf)`` with ``[{"cid": 1, "status": ...}]``: SQLAlchemy writes the row of
    ``shape_leaves`` by ``cid``, the attribute of that table's key (the set has no ``pid``);
    the guard skipped such a set as keyless, so any move was written unjudged (and committed:
    with ``synchronize_session=False`` nothing raised at all)."""
    _run(
        engine,
        "INSERT INTO shape_nodes VALUES (1, 'leaf'), (2, 'leaf')",
        "INSERT INTO shape_leaves VALUES (1, 'pending'), (2, 'running')",
    )
    options = {"synchronize_session": sync}
    with _factory(engine)() as s:
        with pytest.raises(IllegalTransitionError) as info:
            s.execute(sa.update(Leaf), [{"cid": 1, "status": "done"}], execution_options=options)
        assert (info.value.pk, info.value.from_state, info.value.to_state) == (1, "pending", "done")
        s.rollback()
    with _factory(engine, "filter")() as s:
        s.execute(sa.update(Leaf), [{"cid": 1, "status": "done"}], execution_options=options)
        s.commit()
    assert _statuses(engine, "shape_leaves") == [(1, "pending"), (2, "running")]
    with _factory(engine)() as s:  # legal moves are written (the base's key given too: the
        # session's objects are synchronized by it, which SQLAlchemy's "evaluate" needs)
        s.execute(
            sa.update(Leaf),
            [{"pid": 1, "cid": 1, "status": "running"}, {"pid": 2, "cid": 2, "status": "done"}],
            execution_options=options,
        )
        s.commit()
    assert _statuses(engine, "shape_leaves") == [(1, "running"), (2, "done")]


@pytest.mark.parametrize("mode", ["raise", "filter"])
def test_a_bulk_update_of_a_key_listed_in_another_order_judges_its_own_row(
    engine: sa.Engine, mode: str
) -> None:
    """``shape_swapped`` lists its key as ``(b, a)``, its base as ``(a, b)``: the row of
    ``{"a": 1, "b": 2}`` was looked for as ``b = 1 AND a = 2``, another row, whose state judged
    the move (here the illegal pending -> done went through, the legal running -> done was
    refused)."""
    _run(
        engine,
        "INSERT INTO shape_pairs VALUES (1, 2, 'swapped'), (2, 1, 'swapped')",
        "INSERT INTO shape_swapped (a, b, status) VALUES (1, 2, 'pending'), (2, 1, 'running')",
    )
    with _factory(engine, mode)() as s:
        if mode == "raise":
            with pytest.raises(IllegalTransitionError) as info:
                s.execute(sa.update(SwappedPair), [{"a": 1, "b": 2, "status": "done"}])
            assert (info.value.pk, info.value.from_state) == ((1, 2), "pending")
            s.rollback()
        else:
            s.execute(sa.update(SwappedPair), [{"a": 1, "b": 2, "status": "done"}])
            s.commit()
    with _factory(engine, mode)() as s:
        s.execute(sa.update(SwappedPair), [{"a": 2, "b": 1, "status": "done"}])
        s.commit()
    assert _statuses(engine, "shape_swapped", "a, b, status") == [(1, 2, "pending"), (2, 1, "done")]


def test_a_flush_of_a_key_listed_in_another_order_reads_its_own_row(engine: sa.Engine) -> None:
    """A status not loaded is read by key before it is judged, and the flush's UPDATE carries
    it as its compare-and-set: both by the row's own key, not by its values swapped."""
    _run(
        engine,
        "INSERT INTO shape_pairs VALUES (1, 2, 'swapped'), (2, 1, 'swapped')",
        "INSERT INTO shape_swapped (a, b, status) VALUES (1, 2, 'pending'), (2, 1, 'running')",
    )
    with _factory(engine)() as s:
        row = s.get_one(SwappedPair, (1, 2))
        s.expire(row, ["status"])
        row.status = "done"  # pending -> done: illegal (the other row's running -> done is not)
        with pytest.raises(IllegalTransitionError) as info:
            s.flush()
        assert (info.value.pk, info.value.from_state) == ((1, 2), "pending")
    with _factory(engine)() as s:
        row = s.get_one(SwappedPair, (2, 1))
        s.expire(row, ["status"])
        row.status = "done"
        s.commit()
    assert _statuses(engine, "shape_swapped", "a, b, status") == [(1, 2, "pending"), (2, 1, "done")]


# ------------------------------------------------------------------------------------------------
# concrete inheritance
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sync", ["auto", "fetch", False])
def test_an_update_of_a_concrete_base_is_judged_not_refused_for_its_subclass(
    engine: sa.Engine, sync: Any
) -> None:
    """``update(Account)`` writes ``shape_accounts`` alone: ``Savings``'s rows, in a table of
    their own, are out of its reach. It was refused (``TransitionRulesError``: "Savings guards
    by rules Account lacks", rules it inherits from Account)."""
    _run(engine, "INSERT INTO shape_accounts VALUES (1, 'pending')")
    _run(engine, "INSERT INTO shape_savings VALUES (1, 'pending')")
    options = {"synchronize_session": sync}
    with _factory(engine)() as s:
        with pytest.raises(IllegalTransitionError):
            s.execute(
                sa.update(Account).where(Account.id == 1).values(status="done"),
                execution_options=options,
            )
        s.rollback()
        s.execute(
            sa.update(Account).where(Account.id == 1).values(status="running"),
            execution_options=options,
        )
        s.commit()
    assert _statuses(engine, "shape_accounts") == [(1, "running")]
    assert _statuses(engine, "shape_savings") == [(1, "pending")]


def test_rules_on_an_abstract_concrete_base_guard_each_concrete_table(engine: sa.Engine) -> None:
    """Configuring the mappers refused ``Document``'s rules ("'status' is mapped to a SQL
    expression"): the abstract base is mapped to the union of its subclasses' tables. It keeps
    no rows; each concrete subclass guards its own table by the rules it inherits, on every
    path, and the base itself is named as such where a model with a table is needed."""
    install_transition_trigger(engine, Invoice)
    with _factory(engine)() as s:
        s.add(Invoice(id=1))
        s.commit()
        s.get_one(Invoice, 1).status = "done"
        with pytest.raises(IllegalTransitionError) as info:
            s.flush()
        assert (info.value.model, info.value.via) == ("Invoice", "flush")
        s.rollback()
        with pytest.raises(IllegalTransitionError):
            s.execute(sa.update(Invoice).where(Invoice.id == 1).values(status="done"))
        s.rollback()
        s.execute(sa.update(Invoice).where(Invoice.id == 1).values(status="running"))
        s.commit()
    with pytest.raises(DBAPIError) as raised, engine.begin() as conn:
        conn.exec_driver_sql("UPDATE shape_invoices SET status = 'pending'")
    assert rdb.sqlstate_of(raised.value) == rdb.TRANSITION_SQLSTATE
    assert _statuses(engine, "shape_invoices") == [(1, "running")]
    with pytest.raises(TransitionRulesError, match="Document is an abstract concrete base"):
        rdb.transition_trigger_sql(Document)


# ------------------------------------------------------------------------------------------------
# declarations refused, by name
# ------------------------------------------------------------------------------------------------


def test_a_key_named_otherwise_is_told_apart_by_its_foreign_keys(engine: sa.Engine) -> None:
    """``shape_renamed``'s key ``(y, x)``: ``x`` stands for ``a`` and ``y`` for ``b`` by their
    foreign keys alone; the flush reads and compare-and-sets the row of its own key (the
    columns lined up by name or order, it would read the other row)."""
    _run(
        engine,
        "INSERT INTO shape_pairs VALUES (1, 2, 'renamed'), (2, 1, 'renamed')",
        "INSERT INTO shape_renamed (x, y, status) VALUES (1, 2, 'pending'), (2, 1, 'running')",
    )
    with _factory(engine)() as s:
        row = s.get_one(RenamedPair, (1, 2))
        s.expire(row, ["status"])
        row.status = "done"  # pending -> done: illegal (the other row's running -> done is not)
        with pytest.raises(IllegalTransitionError) as info:
            s.flush()
        assert (info.value.pk, info.value.from_state) == ((1, 2), "pending")
    with _factory(engine)() as s:
        row = s.get_one(RenamedPair, (2, 1))
        s.expire(row, ["status"])
        row.status = "done"
        s.commit()
    assert _statuses(engine, "shape_renamed", "x, y, status") == [(1, 2, "pending"), (2, 1, "done")]


def test_a_subclass_key_that_cant_be_lined_up_is_refused_at_mapping() -> None:
    """A joined-table subclass guarding a column of its own table, whose table's key has
    another number of columns than its base's, or columns neither mapped under the base's key
    attributes nor referring to them: refused as the class is configured, saying which."""
    for shape, says in (("longer", "does not line up"), ("unrelated", "can't be told apart")):
        reg = registry()
        try:
            base: Any = reg.generate_base()

            class Top(base):  # type: ignore[misc, valid-type]
                __tablename__ = "shape_tops"
                a = sa.Column(sa.Integer, primary_key=True)
                b = sa.Column(sa.Integer, primary_key=True)
                kind = sa.Column(sa.String(20))
                __mapper_args__ = {"polymorphic_on": kind}  # noqa: RUF012

            if shape == "longer":

                class Sub(Top):
                    __tablename__ = "shape_subs"
                    __transitions__ = _rules()
                    a = sa.Column(sa.Integer, primary_key=True)
                    b = sa.Column(sa.Integer, primary_key=True)
                    c = sa.Column(sa.Integer, primary_key=True)
                    status = sa.Column(sa.String(20))
                    __table_args__ = (
                        sa.ForeignKeyConstraint(["a", "b"], ["shape_tops.a", "shape_tops.b"]),
                    )
                    __mapper_args__ = {"polymorphic_identity": "sub"}  # noqa: RUF012
            else:
                subs = sa.Table(
                    "shape_subs",
                    reg.metadata,
                    sa.Column("p", sa.Integer, primary_key=True),
                    sa.Column("q", sa.Integer, primary_key=True),
                    sa.Column("status", sa.String(20)),
                )
                tops: Any = Top.__table__

                class Sub(Top):  # type: ignore[no-redef]
                    __table__ = subs
                    __transitions__ = _rules()
                    __mapper_args__ = {  # noqa: RUF012
                        "polymorphic_identity": "sub",
                        "inherit_condition": sa.and_(tops.c.a == subs.c.p, tops.c.b == subs.c.q),
                    }

            with pytest.raises(TransitionRulesError, match=says) as info:
                reg.configure()
            assert "shape_subs" in str(info.value)
            assert "guard a column of the base table" in str(info.value)
        finally:
            reg.dispose()


def test_rules_set_after_the_class_was_mapped_are_refused(engine: sa.Engine) -> None:
    """``Late.__transitions__ = ...`` after the class statement: the bulk-UPDATE guard and the
    flush's listeners are set up as a class with rules is mapped. The flush guard judged its
    rows, but a bulk UPDATE (in a process where no class had rules as it was mapped) and a
    status set during the flush went unjudged: refused, at configuration and after."""
    reg = registry()
    try:

        class Late(reg.generate_base()):  # type: ignore[misc]
            __tablename__ = "shape_accounts"
            id = sa.Column(sa.Integer, primary_key=True)
            status = sa.Column(sa.String(20), default="pending")

        Late.__transitions__ = _rules()
        with pytest.raises(TransitionRulesError, match="was set after Late was mapped"):
            reg.configure()
        _run(engine, "INSERT INTO shape_accounts VALUES (1, 'pending')")
        with _factory(engine)() as s, pytest.raises(TransitionRulesError, match="after Late"):
            s.execute(sa.update(Late).where(Late.id == 1).values(status="done"))
        assert _statuses(engine, "shape_accounts") == [(1, "pending")]
    finally:
        reg.dispose()


def test_rules_set_after_the_mappers_were_configured_are_refused(engine: sa.Engine) -> None:
    """``Later.__transitions__ = ...`` once the mappers were configured (a query ran first), in
    a process where classes with rules were mapped (this module's): the class, configured
    without rules, had its guards compiled as none, and rules set on it afterwards were never
    looked at: its flush and its bulk UPDATEs went through unjudged (an illegal status
    committed) and the trigger's install said it declared no __transitions__. Refused, as the
    rules set before configuration are, by every write of it."""
    reg = registry()
    try:

        class Later(reg.generate_base()):  # type: ignore[misc]
            __tablename__ = "shape_accounts"
            id = sa.Column(sa.Integer, primary_key=True)
            status = sa.Column(sa.String(20), default="pending")

        reg.configure()
        sa.inspect(Later).local_table  # noqa: B018 - (configured, its guards compiled: none)
        Later.__transitions__ = _rules()
        with pytest.raises(TransitionRulesError, match="was set after Later was mapped"):
            rdb.transition_trigger_sql(Later)
        with _factory(engine)() as s:
            s.add(Later(id=1, status="done"))
            with pytest.raises(TransitionRulesError, match="after Later"):
                s.flush()
        _run(engine, "INSERT INTO shape_accounts VALUES (2, 'pending')")
        with _factory(engine)() as s, pytest.raises(TransitionRulesError, match="after Later"):
            s.execute(sa.update(Later).where(Later.id == 2).values(status="done"))
        assert _statuses(engine, "shape_accounts") == [(2, "pending")]
    finally:
        reg.dispose()


@dataclasses.dataclass
class _Phase:
    status: str
    note: str


def _named_attribute(kind: str) -> type[Any]:
    reg = registry()

    class Model(reg.generate_base()):  # type: ignore[misc]
        __tablename__ = "shape_named"
        __transitions__ = _rules("state")
        id = sa.Column(sa.Integer, primary_key=True)
        if kind == "synonym":
            status = sa.Column(sa.String(20))
            state = synonym("status")
        elif kind == "composite":
            state = composite(
                _Phase, sa.Column("status", sa.String(20)), sa.Column("note", sa.Text)
            )
        else:
            status = sa.Column(sa.String(20))

            @hybrid_property
            def state(self) -> Any:
                return self.status

    return Model


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        ("synonym", "it is a synonym of 'status'; name the column, 'status'"),
        ("composite", "it is a composite of columns 'status', 'note'"),
        ("hybrid", "it is a hybrid_property, which the guards can't see through"),
    ],
)
def test_rules_naming_an_attribute_that_is_no_column_say_what_it_is(kind: str, said: str) -> None:
    """Rules naming a synonym, a composite or a hybrid were refused as "no mapped column
    'state'" alone, beside a list of columns the name seemed to be missing from."""
    model = _named_attribute(kind)
    reg = sa.inspect(model).registry
    try:
        with pytest.raises(TransitionRulesError) as info:
            reg.configure()
        assert "Model.__transitions__ (column 'state'): Model has no mapped column" in str(
            info.value
        )
        assert said in str(info.value)
    finally:
        reg.dispose()
