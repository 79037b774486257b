"""The status-transition guard: rules, flush guard, bulk UPDATE guard, trigger, bypass, drift.

Everything that touches data runs against a real PostgreSQL (the ``pg_url`` fixture of the
resilient_db pytest plugin); races are real concurrent transactions, never sleeps.
"""

from __future__ import annotations

import datetime
import enum
import gc
import io
import logging
import re
import subprocess
import sys
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from scenarios import BYPASS_BY_HAND, MoveFirst
from sent import Sent
from sqlalchemy import event
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    registry,
    sessionmaker,
)
from sqlalchemy.orm.exc import StaleDataError

from resilient_db import ResilientSession
from resilient_db._config import Config
from resilient_db._errors import IllegalTransitionError, StaleTransitionError
from resilient_db._state import STATE
from resilient_db.transitions import (
    ANY_STATE,
    TRANSITION_SQLSTATE,
    TransitionRules,
    TransitionRulesError,
    allowed_transitions,
    bypass_transitions,
    install_transition_trigger,
    rules_to_dot,
    rules_to_mermaid,
    transition_rules,
    transition_trigger_drop_sql,
    transition_trigger_sql,
    trigger_drift,
    uninstall_transition_trigger,
)
from resilient_db.transitions._bypass import GUARD_INFO_KEY
from resilient_db.transitions._dbmap import exception_from_db
from resilient_db.transitions._flush import before_flush, guard_execute, install_engine_hooks
from resilient_db.transitions._guards import install_guard
from resilient_db.transitions._report import transition_stats
from resilient_db.transitions._rules import guards_of
from resilient_db.transitions._sql import install_statements, trigger_names

LOGGER = "resilient_db.transitions"
HOSTILE = 'it\'s "odd"; drop table x; --'
WEIRD = ("back\\slash \\: colon :name %s %% $rdb$ $$", "tab\there", "new\nline", "ünï ☃ 'q'")


class Base(DeclarativeBase):
    pass


class Task(Base):
    __tablename__ = "tasks"
    __transitions__ = TransitionRules(
        column="status",
        transitions={
            "pending": {"in_progress", "cancelled"},
            "in_progress": {"completed", "failed"},
            "failed": {"pending"},
        },
        initial={"pending"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(default="task")
    status: Mapped[str] = mapped_column(sa.String(40), default="pending")


class Phase(enum.Enum):
    draft = "Draft"
    review = "In review"
    published = "Published"
    retired = "Retired"


class Doc(Base):
    __tablename__ = "docs"
    __transitions__ = TransitionRules(
        column="phase",
        transitions={
            Phase.draft: {Phase.review},
            Phase.review: {Phase.draft, Phase.published},
            ANY_STATE: {Phase.retired},
        },
        initial={Phase.draft},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    phase: Mapped[Phase] = mapped_column(sa.Enum(Phase, name="doc_phase"), default=Phase.draft)


class Order(Base):
    """Two guarded columns, a composite primary key and a nullable state."""

    __tablename__ = "orders"
    __transitions__ = (
        TransitionRules(
            column="status",
            transitions={"open": {"shipped"}, "shipped": {"delivered"}},
            initial={"open"},
        ),
        TransitionRules(
            column="payment",
            transitions={None: {"paid"}, "paid": {"refunded"}},
            initial={None},
        ),
    )
    region: Mapped[str] = mapped_column(primary_key=True)
    number: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(default="open")
    payment: Mapped[str | None] = mapped_column(nullable=True)


class Hostile(Base):
    __tablename__ = 'we"ird; table'
    __transitions__ = TransitionRules(
        column="state",
        transitions={"new": {HOSTILE}, HOSTILE: set(WEIRD)},
        initial={"new"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    state: Mapped[str] = mapped_column('st"ate', sa.Text, default="new")


class Ticket(Base):
    """Rules beside the model's own version counter (``version_id_col``)."""

    __tablename__ = "tickets"
    __transitions__ = TransitionRules(
        column="status", transitions={"open": {"closed"}}, initial={"open"}
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(default="ticket")
    status: Mapped[str] = mapped_column(default="open")
    version: Mapped[int] = mapped_column(default=1)
    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012


class Vehicle(Base):
    """Joined-table inheritance: the rules (and the column) are shared by the subclass."""

    __tablename__ = "vehicles"
    __transitions__ = TransitionRules(
        column="state", transitions={"parked": {"moving"}, "moving": {"parked"}}, initial={"parked"}
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str]
    state: Mapped[str] = mapped_column(default="parked")
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "vehicle"}  # noqa: RUF012


class Truck(Vehicle):
    __tablename__ = "trucks"
    id: Mapped[int] = mapped_column(sa.ForeignKey("vehicles.id"), primary_key=True)
    load: Mapped[int] = mapped_column(default=0)
    __mapper_args__ = {"polymorphic_identity": "truck"}  # noqa: RUF012


MODELS = (Task, Doc, Order, Hostile)


class _S(Session):
    pass


install_guard(_S)


def _table(model: type[Any]) -> sa.Table:
    table = model.__table__
    assert isinstance(table, sa.Table)
    return table


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE x (id int)")
        for model in MODELS:
            install_transition_trigger(conn, model)
    yield eng
    eng.dispose()


def _factory(engine: sa.Engine, **config: Any) -> sessionmaker[_S]:
    return sessionmaker(engine, class_=_S, info={GUARD_INFO_KEY: Config(**config)})


@pytest.fixture
def sessions(engine: sa.Engine) -> sessionmaker[_S]:
    return _factory(engine)


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog attached to the transitions logger itself (works even if it does not propagate)."""
    logger = logging.getLogger(LOGGER)
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # captured once, by the handler attached here
    caplog.handler.setLevel(logging.DEBUG)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(old_level)
    logger.propagate = old_propagate


def _add_task(engine: sa.Engine, status: str = "pending", title: str = "t") -> int:
    """Insert a task in any state (setup only: sets the bypass by hand, unlogged)."""
    with engine.begin() as conn:
        conn.exec_driver_sql(BYPASS_BY_HAND)
        table = _table(Task)
        return int(
            conn.execute(
                table.insert().values(title=title, status=status).returning(table.c.id)
            ).scalar_one()
        )


def _db_status(engine: sa.Engine, task_id: int) -> str:
    with engine.connect() as conn:
        return str(
            conn.execute(
                sa.select(_table(Task).c.status).where(_table(Task).c.id == task_id)
            ).scalar_one()
        )


def _db_error(fn: Callable[[], Any]) -> IllegalTransitionError:
    with pytest.raises(sa.exc.DBAPIError) as info:
        fn()
    err = exception_from_db(info.value)
    assert err is not None, f"not mapped: {info.value!r}"
    return err


# ------------------------------------------------------------------------------------------------
# rules as data
# ------------------------------------------------------------------------------------------------


def test_rules_are_frozen_hashable_data() -> None:
    rules = TransitionRules(
        column="status",
        transitions={"a": ["b", "c"], "b": {"c"}, ANY_STATE: {"z"}},
        initial=("a",),
    )
    assert rules.initial == frozenset({"a"})
    assert rules.transitions["a"] == frozenset({"b", "c"})
    assert rules.declared_states == {"a", "b", "c", "z"}
    assert rules.next_states("a") == {"b", "c", "z"}
    assert rules.next_states("z") == frozenset()
    assert rules.next_states("c") == {"z"}
    with pytest.raises(AttributeError):
        rules.column = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        rules.transitions["q"] = frozenset()  # type: ignore[index]
    same = TransitionRules(
        column="status",
        transitions={"a": {"b", "c"}, "b": {"c"}, "*": {"z"}},
        initial={"a"},
    )
    assert same == rules
    assert hash(same) == hash(rules)
    assert len({same, rules}) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial": "pending"}, "initial must be a set of states"),
        ({"initial": set()}, "initial is empty"),
        ({"transitions": {"pending": "done"}}, "must be a set of states"),
        ({"transitions": {"pending": {"*"}}}, "may only be used as a source"),
        ({"transitions": {"pending": {1.5}}}, "states must be str, int or enum.Enum"),
        ({"transitions": {"pending": {True}}}, "states must be str, int or enum.Enum"),
        ({"transitions": {"pending": {"a\x00b"}}}, "NUL"),
        # (a byte of another encoding, os.environ's lone surrogate: mapped, and the install
        # and every write of it failed with the codec's UnicodeEncodeError)
        ({"transitions": {"pending": {"d\udcffne"}}}, "no UTF-8 text"),
        ({"transitions": [("pending", "done")]}, "transitions must be a mapping"),
        ({"column": ""}, "column must be the name"),
        # no moves at all, most likely a table that came out empty: said, and the spelling of
        # a status set once at insert given (the rules of each state, empty)
        ({"transitions": {}}, r"transitions is empty.*\{'pending': set\(\)\}"),
    ],
)
def test_rules_reject_malformed_declarations(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {
        "column": "status",
        "transitions": {"pending": {"done"}},
        "initial": {"pending"},
    }
    args.update(kwargs)
    with pytest.raises(TransitionRulesError, match=message):
        TransitionRules(**args)


class _NoneAsNull(sa.types.TypeDecorator[str]):
    """Text whose value ``"none"`` is stored as NULL."""

    impl = sa.String(20)
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        return None if value == "none" else value

    def process_result_value(self, value: str | None, dialect: Any) -> str | None:
        return "none" if value is None else value


class _DateText(sa.types.TypeDecorator[str]):
    """ISO dates as text in Python, stored as ``date``."""

    impl = sa.Date
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> Any:
        return None if value is None else datetime.date.fromisoformat(value)

    def process_result_value(self, value: Any, dialect: Any) -> str | None:
        return None if value is None else str(value)


def _configure_model(**columns_and_rules: Any) -> None:
    """Map a throwaway model in its own registry and configure it (then dispose of it)."""
    reg = registry()
    try:
        attrs: dict[str, Any] = {
            "__tablename__": "throwaway",
            "id": mapped_column(sa.Integer, primary_key=True),
            "status": mapped_column(sa.String(20)),
            **columns_and_rules,
        }
        # held until configured: the registry holds its classes weakly, and a class left
        # unreferenced may be collected first (the collector's timing), leaving nothing to
        # configure, nothing checked
        model = reg.mapped(type("Widget", (), attrs))
        reg.configure()
        assert sa.inspect(model).configured
    finally:
        reg.dispose()


@pytest.mark.parametrize(
    ("rules", "extra", "message"),
    [
        # an empty sequence declares no rules: the model's writes were left unguarded
        ([], {}, r"^Widget\.__transitions__ is an empty sequence"),
        ((), {}, r"^Widget\.__transitions__ is an empty sequence"),
        (
            TransitionRules(column="state", transitions={"a": {"b"}}, initial={"a"}),
            {},
            r"Widget\.__transitions__ \(column 'state'\): Widget has no mapped column 'state'",
        ),
        (
            TransitionRules(column="status", transitions={"a": {"b"}, "x": {"b"}}, initial={"a"}),
            {},
            r"Widget.*'status'.*state 'x' is neither initial nor reachable",
        ),
        (
            TransitionRules(column="status", transitions={"a": {"b"}}, initial={"a"}, states={"a"}),
            {},
            r"Widget.*'status'.*state 'b' is used in the rules but not declared in states=",
        ),
        (
            TransitionRules(column="phase", transitions={"draft": {"gone"}}, initial={"draft"}),
            {"phase": mapped_column(sa.Enum(Phase, name="p"))},
            r"Widget.*'phase'.*state 'gone' has no declaration in the column type",
        ),
        # an enum member's value, which the Enum column does not store (it stores the name)
        (
            TransitionRules(column="phase", transitions={"Draft": {"Review"}}, initial={"Draft"}),
            {"phase": mapped_column(sa.Enum(Phase, name="p"))},
            r"Widget.*'phase'.*state 'Draft' has no declaration in the column type .*: it is the "
            r"value of Phase\.draft, which the column stores by its name; declare the member, "
            r"Phase\.draft",
        ),
        (
            TransitionRules(
                column="phase", transitions={"draft": {Phase.review}}, initial={Phase.draft}
            ),
            {"phase": mapped_column(sa.Enum(Phase, name="p"))},
            r"Widget.*states <Phase.draft: 'Draft'> and 'draft' are the same database value",
        ),
        (
            [
                TransitionRules(column="status", transitions={"a": {"b"}}, initial={"a"}),
                TransitionRules(column="status", transitions={"a": {"c"}}, initial={"a"}),
            ],
            {},
            r"Widget.__transitions__ declares rules for column 'status' twice",
        ),
        ("status", {}, r"Widget.__transitions__ must be a TransitionRules"),
        (
            TransitionRules(column="level", transitions={1: {"two"}}, initial={1}),
            {"level": mapped_column(sa.Integer)},
            r"Widget.*state 'two' can't be stored in the column.*the column holds integers",
        ),
        (
            TransitionRules(column="status", transitions={"a": {"x" * 21}}, initial={"a"}),
            {},
            r"Widget.*can't be stored.*it is 21 characters long, the column at most 20",
        ),
        # NULL in a NOT NULL column: no row holds it, a rule about it never applies
        (
            TransitionRules(column="status", transitions={None: {"a"}}, initial={None}),
            {"status": mapped_column(sa.String(20), nullable=False)},
            r"Widget.*state None stands for SQL NULL, but the column is NOT NULL",
        ),
        (
            TransitionRules(column="status", transitions={"a": {"b"}}, initial={"a", None}),
            {"status": mapped_column(sa.String(20), nullable=False)},
            r"Widget.*state None stands for SQL NULL.*take it out of the rules",
        ),
        (
            TransitionRules(
                column="status", transitions={"a": {"b"}}, initial={"a"}, states={"a", "b", None}
            ),
            {"status": mapped_column(sa.String(20), primary_key=True)},
            r"Widget.*state None stands for SQL NULL, but the column is NOT NULL",
        ),
        (
            TransitionRules(column="status", transitions={"a": {"none"}}, initial={"a"}),
            {"status": mapped_column(_NoneAsNull(), nullable=False)},
            r"Widget.*state 'none' is stored by the column's type as SQL NULL, but the column "
            r"is NOT NULL",
        ),
        # types whose values the ORM loads as objects no state equals
        *[
            (
                TransitionRules(column="status", transitions={text: {"b"}}, initial={text}),
                {"status": mapped_column(type_)},
                rf"Widget.*the column's type .* holds {kind}, which the ORM loads as objects",
            )
            for type_, text, kind in [
                (sa.Float(), "1.5", r"floating-point numbers \(float\)"),
                (sa.Double(), "1.5", r"floating-point numbers \(float\)"),
                (sa.Date(), "2020-01-01", r"dates \(date\)"),
                (sa.DateTime(timezone=True), "2020-01-01 00:00:00+00", r"timestamps \(datetime\)"),
                (sa.Time(), "12:00:00", r"times of day \(time\)"),
                (sa.Uuid(), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", r"UUIDs \(uuid.UUID\)"),
                (_DateText(), "2020-01-01", r"dates \(date\)"),
            ]
        ],
    ],
)
def test_rules_checked_when_the_mapper_configures(rules: Any, extra: Any, message: str) -> None:
    with pytest.raises(TransitionRulesError, match=message):
        _configure_model(__transitions__=rules, **extra)


def test_valid_declarations_configure_and_can_be_read_back() -> None:
    assert transition_rules(Task) == (Task.__transitions__,)
    assert [r.column for r in transition_rules(Order)] == ["status", "payment"]
    _configure_model(
        __transitions__=TransitionRules(column="status", transitions={"a": {"b"}}, initial={"a"})
    )
    _configure_model(  # None (NULL) in a nullable column
        __transitions__=TransitionRules(column="status", transitions={None: {"a"}}, initial={None})
    )
    _configure_model(  # integer states, negative ones included, and text of integers
        __transitions__=TransitionRules(column="level", transitions={-1: {"2"}}, initial={-1}),
        level=mapped_column(sa.Integer),
    )


def test_allowed_transitions_from_in_memory_state() -> None:
    task = Task(status="pending")
    assert allowed_transitions(task) == {"pending"}  # not in the database yet: initial states
    doc = Doc()
    assert allowed_transitions(doc) == {Phase.draft}
    with pytest.raises(TypeError, match="several columns"):
        allowed_transitions(Order())
    assert allowed_transitions(Order(), column="payment") == {None}


def test_mermaid_diagram() -> None:
    text = rules_to_mermaid(Task)
    lines = text.splitlines()
    assert lines[0] == "stateDiagram-v2"
    ids = {
        line.split('"')[1]: line.rsplit(" ", 1)[1] for line in lines if line.startswith("    state")
    }
    assert set(ids) == {"pending", "in_progress", "cancelled", "completed", "failed"}
    assert f"    [*] --> {ids['pending']}" in lines
    assert f"    {ids['pending']} --> {ids['in_progress']}" in lines
    assert f"    {ids['failed']} --> {ids['pending']}" in lines
    assert f"    {ids['completed']} --> [*]" in lines
    assert f"    {ids['pending']} --> {ids['completed']}" not in lines
    # Enum states are labelled by value, the wildcard is expanded to every declared state
    doc = rules_to_mermaid(Doc)
    assert 'state "In review" as' in doc
    # [*]->draft, draft: 2, review: 3, published: 1, retired->[*]
    assert doc.count("-->") == 1 + 2 + 3 + 1 + 1


def test_mermaid_and_dot_quote_hostile_names() -> None:
    mermaid = rules_to_mermaid(Hostile)
    labels = [
        line[len('    state "') : line.rindex('" as ')]
        for line in mermaid.splitlines()
        if line.startswith("    state ")
    ]
    assert len(labels) == 2 + len(WEIRD)
    for label in labels:
        bare = re.sub(r"#\d+;", "", label)
        assert not set(bare) & set('"#;:\n\t\\')
    assert "it's #34;odd#34;#59; drop table x#59; --" in labels
    assert "tab#9;here" in labels
    dot = rules_to_dot(Hostile)
    assert 'label="it\'s \\"odd\\"; drop table x; --"' in dot
    assert 'label="new\\nline"' in dot
    assert 'label="back\\\\slash' in dot
    assert dot.startswith('digraph "Hostile.state" {')
    for line in dot.splitlines()[1:-1]:
        body = line.replace('\\"', "")
        assert body.count('"') in (0, 2), line


def test_dot_diagram_shape() -> None:
    dot = rules_to_dot(Task)
    assert dot.startswith('digraph "Task.status" {\n')
    assert dot.rstrip().endswith("}")
    nodes = {
        line.split('label="')[1].split('"')[0]: line.split()[0]
        for line in dot.splitlines()
        if "label=" in line and "shape=point" not in line
    }
    assert f"    start -> {nodes['pending']};" in dot
    assert f"    {nodes['in_progress']} -> {nodes['failed']};" in dot
    rules_only = rules_to_dot(Task.__transitions__)
    assert rules_only.startswith('digraph "status" {')


def test_trigger_sql_shape() -> None:
    sql = transition_trigger_sql(Task)
    function = trigger_names(guards_of(Task)[0]).function_name
    assert re.fullmatch(r"rdb_transition_tasks_status_[0-9a-f]{12}", function)
    assert f'CREATE OR REPLACE FUNCTION "{function}"() RETURNS trigger' in sql
    assert 'DROP TRIGGER IF EXISTS "rdb_transition_status_ins" ON "tasks"' in sql
    assert 'CREATE TRIGGER "rdb_transition_status_ins" AFTER INSERT ON "tasks"' in sql
    assert 'CREATE TRIGGER "rdb_transition_status_upd" AFTER UPDATE ON "tasks"' in sql
    assert "BEFORE" not in sql
    # IS DISTINCT FROM with the built-in equality named (bound whatever the installer's path)
    assert (
        'WHEN (NOT coalesce(OLD."status"::pg_catalog.text COLLATE pg_catalog."C"\n'
        '    OPERATOR(pg_catalog.=) NEW."status"::pg_catalog.text COLLATE pg_catalog."C",\n'
        '    OLD."status" IS NULL AND NEW."status" IS NULL))' in sql
    )
    assert f"ERRCODE = '{TRANSITION_SQLSTATE}'" in sql
    assert "current_setting('resilient_db.bypass_transitions', true)" in sql
    assert "json_build_object(" in sql
    assert f'COMMENT ON FUNCTION "{function}"() IS' in sql
    assert "rules-sha256=" in sql
    assert transition_trigger_sql(Task) == sql  # deterministic
    assert TRANSITION_SQLSTATE == "RDB01"
    two = transition_trigger_sql(Order)
    assert two.count("CREATE OR REPLACE FUNCTION") == 2
    assert "v_to IS NULL" in two  # NULL is a declared state of Order.payment
    drop = transition_trigger_drop_sql(Task)
    assert f'DROP FUNCTION IF EXISTS "{function}"()' in drop


def test_trigger_sql_quotes_hostile_names() -> None:
    sql = transition_trigger_sql(Hostile)
    assert """'it''s "odd"; drop table x; --'""" in sql
    assert "E'tab\\x09here'" in sql
    assert "E'new\\x0aline'" in sql
    # (a colon before a word too: text(), as op.execute, would take it for a parameter)
    assert "E'back\\x5cslash \\x5c: colon \\x3aname %s %% $rdb$ $$'" in sql
    assert '"we""ird; table"' in sql
    assert 'NEW."st""ate"' in sql
    assert "$rdb1$" in sql  # the body contains "$rdb$", so another dollar-quote tag is used
    assert "\t" not in sql


def test_long_names_are_shortened_to_postgres_limit() -> None:
    reg = registry()
    try:
        attrs: dict[str, Any] = {
            "__tablename__": "t" * 70,
            "__transitions__": TransitionRules(
                column="s" * 60, transitions={"a": {"b"}}, initial={"a"}
            ),
            "id": mapped_column(sa.Integer, primary_key=True),
            "s" * 60: mapped_column(sa.String(5)),
        }
        sql = transition_trigger_sql(reg.mapped(type("Long", (), attrs)))
        function = sql.split("CREATE OR REPLACE FUNCTION ")[1].split('"')[1]
        triggers = {part.split('"')[1] for part in sql.split("CREATE TRIGGER ")[1:]}
        assert len(triggers) == 2
        for name in (function, *triggers):
            assert len(name.encode()) <= 63, name
            assert name.startswith("rdb_transition_")
    finally:
        reg.dispose()


def _documents(reg: Any, *, base_rules: bool) -> tuple[Any, Any, Any]:
    """Single-table inheritance: Doc, and Contract and Invoice guarding ``status`` by rules
    of their own (Doc by Contract's too when ``base_rules``)."""
    contract_rules = TransitionRules(
        column="status", transitions={"draft": {"signed"}}, initial={"draft"}
    )
    doc_attrs: dict[str, Any] = {
        "__tablename__": "sti_docs",
        "__mapper_args__": {"polymorphic_on": "kind", "polymorphic_identity": "doc"},
        "id": mapped_column(sa.Integer, primary_key=True),
        "kind": mapped_column(sa.String(20)),
        "status": mapped_column(sa.String(20)),
    }
    if base_rules:
        doc_attrs["__transitions__"] = contract_rules
    doc = reg.mapped(type("Doc", (), doc_attrs))
    contract = reg.mapped(
        type(
            "Contract",
            (doc,),
            {
                "__mapper_args__": {"polymorphic_identity": "contract"},
                "__transitions__": contract_rules,
            },
        )
    )
    invoice = reg.mapped(
        type(
            "Invoice",
            (doc,),
            {
                "__mapper_args__": {"polymorphic_identity": "invoice"},
                "__transitions__": TransitionRules(
                    column="status", transitions={"open": {"paid"}}, initial={"open"}
                ),
            },
        )
    )
    return doc, contract, invoice


def test_a_trigger_refuses_classes_sharing_a_table_with_other_rules() -> None:
    """One trigger per table and column holds one set of rules: a subclass whose rows share
    the table with rows guarded otherwise (or not at all) can't have one."""
    reg = registry()
    try:
        doc, contract, invoice = _documents(reg, base_rules=False)
        with pytest.raises(TransitionRulesError, match="Doc, Invoice keep their rows there"):
            transition_trigger_sql(contract)
        with pytest.raises(TransitionRulesError, match="Doc, Contract keep their rows"):
            install_transition_trigger(sa.create_engine("postgresql+psycopg://"), invoice)
    finally:
        reg.dispose()
    reg = registry()
    try:
        doc, _, _ = _documents(reg, base_rules=True)
        with pytest.raises(TransitionRulesError, match="but Invoice keeps its rows there"):
            transition_trigger_sql(doc)
    finally:
        reg.dispose()


def test_bulk_update_through_a_base_class_of_other_rules_is_refused(engine: sa.Engine) -> None:
    """update(Doc) setting a column that Contract guards by rules of its own can't hold both
    sets in one condition: refused before anything is sent, naming the class; the subclass's
    own update(Contract) is guarded as usual."""
    reg = registry()
    try:
        doc, contract, _ = _documents(reg, base_rules=False)
        reg.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO sti_docs VALUES (1, 'contract', 'signed')")
        with _factory(engine)() as s:
            statements = Sent(engine)
            with pytest.raises(TransitionRulesError, match=r"update\(Doc\) sets Doc.status"):
                s.execute(sa.update(doc).where(doc.id == 1).values(status="draft"))
            assert not statements.matching("UPDATE")
            s.rollback()
            s.execute(sa.update(doc).values(kind="contract"))  # leaves the status alone
            moved = s.execute(sa.update(contract).values(status="draft"))
            assert isinstance(moved, sa.CursorResult)
            assert moved.rowcount == 0  # signed -> draft filtered
            s.commit()
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT status FROM sti_docs").scalar() == "signed"
    finally:
        reg.metadata.drop_all(engine)
        reg.dispose()


# ------------------------------------------------------------------------------------------------
# flush guard
# ------------------------------------------------------------------------------------------------


def test_legal_chain_commits(engine: sa.Engine, sessions: sessionmaker[_S]) -> None:
    with sessions() as s:
        task = Task(title="chain")
        s.add(task)
        s.commit()
        assert allowed_transitions(task) == {"in_progress", "cancelled"}
        for step in ("in_progress", "failed", "pending", "in_progress", "completed"):
            task.status = step
            s.commit()
            assert _db_status(engine, task.id) == step
        assert allowed_transitions(task) == set()


@pytest.mark.parametrize("state", ["pending", "completed"])
def test_keeping_the_state_is_let_through_on_every_path(
    engine: sa.Engine, sessions: sessionmaker[_S], state: str
) -> None:
    """No rule says ``state -> state`` (``completed`` has no moves out at all): writing the
    state a row holds is no transition, let through by the flush, a bulk UPDATE and the
    trigger alike (as the docs say), and the rules' next states never list it."""
    task_id = _add_task(engine, state)
    with sessions() as s:
        task = s.get(Task, task_id)
        assert task is not None
        assert state not in allowed_transitions(task)
        task.status = state
        task.title = "kept"
        s.commit()
        moved = s.execute(
            sa.update(Task).where(Task.id == task_id).values(status=state),
            execution_options={"synchronize_session": False},
        )
        assert moved.rowcount == 1
        s.commit()
    with engine.begin() as conn:
        table = _table(Task)
        kept = conn.execute(
            table.update().where(table.c.id == task_id).values(status=table.c.status)
        )
        assert kept.rowcount == 1
    assert _db_status(engine, task_id) == state
    # and declared, a self-loop changes nothing
    looped = TransitionRules(
        column="status", transitions={"a": {"a", "b"}, "b": {"b"}}, initial={"a"}
    )
    assert looped.next_states("a") == {"b"}
    assert looped.next_states("b") == frozenset()


ILLEGAL = [
    ("pending", "completed"),
    ("pending", "failed"),
    ("in_progress", "pending"),
    ("in_progress", "cancelled"),
    ("completed", "in_progress"),
    ("cancelled", "pending"),
    ("failed", "completed"),
    ("pending", "bogus"),
]


@pytest.mark.parametrize(("start", "target"), ILLEGAL)
def test_illegal_move_blocked_at_flush_and_nothing_written(
    engine: sa.Engine,
    sessions: sessionmaker[_S],
    log: pytest.LogCaptureFixture,
    start: str,
    target: str,
) -> None:
    task_id = _add_task(engine, start)
    statements = Sent(engine)
    before = transition_stats()["blocked_transitions"]
    with sessions() as s:
        task = s.get(Task, task_id)
        assert task is not None
        task.status = target
        task.title = "changed too"
        with pytest.raises(IllegalTransitionError) as info:
            s.flush()
        err = info.value
        assert type(err) is IllegalTransitionError
        assert (err.model, err.pk, err.column, err.via) == ("Task", task_id, "status", "flush")
        assert (err.from_state, err.to_state) == (start, target)
        assert "allowed from here" in err.reason or "no moves" in err.reason
        assert not statements.matching("UPDATE")
        s.rollback()
        # the session is usable after the rollback
        assert s.get(Task, task_id) is not None
    assert _db_status(engine, task_id) == start
    assert transition_stats()["blocked_transitions"] == before + 1
    [record] = [r for r in log.records if r.name == LOGGER]
    assert record.levelno == logging.ERROR
    assert record.getMessage().startswith("[SELF-HEAL] Status transition blocked")
    assert f"'{start}' -> '{target}'" in record.getMessage()
    assert record.self_heal["model"] == "Task"
    assert "pk" not in record.self_heal  # row keys stay out of logs unless opted in
    assert f"pk={task_id}" not in record.getMessage()
    assert record.self_heal["via"] == "flush"
    assert (record.self_heal["from_state"], record.self_heal["to_state"]) == (start, target)
    assert "changed too" not in record.getMessage()


def test_insert_must_use_an_initial_state(engine: sa.Engine, sessions: sessionmaker[_S]) -> None:
    with sessions() as s:
        s.add(Task(id=41, status="in_progress"))
        with pytest.raises(IllegalTransitionError) as info:
            s.flush()
        err = info.value
        assert (err.model, err.pk, err.column, err.via) == ("Task", 41, "status", "flush")
        assert (err.from_state, err.to_state) == (None, "in_progress")
        assert "new rows must start in one of: 'pending'" in str(err)
        s.rollback()
        s.add(Task(id=42))  # the column default is initial
        s.add(Task(id=43, status="pending"))
        s.commit()
    with engine.connect() as conn:
        ids = conn.execute(sa.select(_table(Task).c.id).order_by(_table(Task).c.id)).scalars()
        assert list(ids) == [42, 43]


def test_one_flush_with_many_illegal_changes_reports_them(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    ids = [_add_task(engine) for _ in range(3)]
    with sessions() as s:
        tasks = [s.get(Task, i) for i in ids]
        for task in tasks:
            assert task is not None
            task.status = "completed"
        with pytest.raises(IllegalTransitionError, match="2 more illegal change"):
            s.flush()


def test_two_sessions_race_loser_gets_stale(engine: sa.Engine, sessions: sessionmaker[_S]) -> None:
    task_id = _add_task(engine)
    with sessions() as winner, sessions() as loser:
        mine = loser.get(Task, task_id)
        theirs = winner.get(Task, task_id)
        assert mine is not None
        assert theirs is not None
        theirs.status = "in_progress"
        winner.commit()
        mine.status = "cancelled"  # legal from the state it loaded, but the row moved
        with pytest.raises(StaleTransitionError) as info:
            loser.flush()
        err = info.value
        assert isinstance(err, IllegalTransitionError)
        assert (err.pk, err.from_state, err.to_state, err.via) == (
            task_id,
            "pending",
            "cancelled",
            "flush",
        )
        assert "now holds 'in_progress'" in err.reason
        loser.rollback()
    assert _db_status(engine, task_id) == "in_progress"


def test_race_while_winner_holds_the_row_lock(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    """The loser's locked SELECT waits for the winner; whatever the timing it sees the new state."""
    task_id = _add_task(engine)
    outcome: list[BaseException | None] = []
    with sessions() as winner, sessions() as loser:
        mine = loser.get(Task, task_id)
        theirs = winner.get(Task, task_id)
        assert mine is not None
        assert theirs is not None
        theirs.status = "in_progress"
        winner.flush()  # holds the row lock, not committed yet
        mine.status = "cancelled"

        def loser_flush() -> None:
            try:
                loser.flush()
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=loser_flush)
        thread.start()
        winner.commit()
        thread.join(timeout=60)
        assert not thread.is_alive()
        loser.rollback()
    assert len(outcome) == 1
    assert isinstance(outcome[0], StaleTransitionError)
    assert _db_status(engine, task_id) == "in_progress"


def test_expired_attribute_is_read_by_the_guard_not_lazily(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    task_id = _add_task(engine)
    with sessions() as s:
        task = s.get(Task, task_id)
        assert task is not None
        s.commit()  # expires every attribute
        statements = Sent(engine)
        task.status = "in_progress"  # loaded value unknown
        s.flush()
        # the guard's first statement reads the status; the status is read by nothing else
        # (SQLAlchemy itself refreshes the expired primary key for its UPDATE). No lock: the
        # UPDATE carries the state that was read, as it carries a loaded one.
        selects = statements.matching("SELECT")
        assert "tasks.status" in selects[0]
        assert "title" not in selects[0]
        assert "FOR UPDATE" not in selects[0]
        assert not [q for q in selects[1:] if "status" in q]
        [update] = statements.matching("UPDATE")
        assert "AND tasks.status = " in update
        s.commit()
        s.expire(task)
        task.status = "pending"  # illegal from the stored 'in_progress'
        with pytest.raises(IllegalTransitionError) as info:
            s.flush()
        assert (info.value.from_state, info.value.to_state) == ("in_progress", "pending")
    assert _db_status(engine, task_id) == "in_progress"


def test_guarded_change_sends_no_select_before_its_update(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    """The compare-and-set costs no round trip: the UPDATE carries the loaded state."""
    task_id = _add_task(engine)
    with sessions() as s:
        task = s.get(Task, task_id)
        assert task is not None
        statements = Sent(engine)
        task.status = "in_progress"
        s.flush()
        assert len(statements.sql) == 1, statements.sql
        [update] = statements.sql
        assert update.startswith("UPDATE tasks SET status=")
        assert re.search(r"WHERE tasks\.id = \S+ AND tasks\.status = \S+$", update), update
        s.commit()
    assert _db_status(engine, task_id) == "in_progress"


def test_move_landing_between_the_check_and_the_update_is_stale(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    """Two workers make the same move; the second one's UPDATE must not report success."""
    task_id = _add_task(engine, "in_progress")
    before = transition_stats()["stale_transitions"]
    with sessions() as s:
        task = s.get(Task, task_id)
        assert task is not None
        task.status = "failed"  # legal, and the trigger would let failed -> failed through
        with (
            MoveFirst(
                engine, engine, "UPDATE tasks SET status = 'failed' WHERE id = :id", id=task_id
            ),
            pytest.raises(StaleTransitionError) as info,
        ):
            s.flush()
        err = info.value
        assert (err.model, err.pk, err.column, err.via) == ("Task", task_id, "status", "flush")
        assert (err.from_state, err.to_state) == ("in_progress", "failed")
        assert "now holds 'failed'" in err.reason
        s.rollback()
    assert transition_stats()["stale_transitions"] == before + 1


def test_expired_state_read_by_the_guard_is_compared_again_by_the_update(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    task_id = _add_task(engine)
    with sessions() as s:
        task = s.get(Task, task_id)
        assert task is not None
        s.expire(task, ["status"])
        task.status = "cancelled"  # checked against the 'pending' the guard reads
        with (
            MoveFirst(
                engine, engine, "UPDATE tasks SET status = 'in_progress' WHERE id = :id", id=task_id
            ),
            pytest.raises(StaleTransitionError) as info,
        ):
            s.flush()
        assert (info.value.from_state, info.value.to_state) == ("pending", "cancelled")
        assert "now holds 'in_progress'" in info.value.reason
    assert _db_status(engine, task_id) == "in_progress"


def test_stale_row_in_a_many_row_flush(engine: sa.Engine, sessions: sessionmaker[_S]) -> None:
    """One executemany UPDATE for all rows (psycopg counts its rows); the moved row is named."""
    ids = [_add_task(engine) for _ in range(4)]
    executemany: list[bool] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("UPDATE"):
            executemany.append(args[-1])

    with sessions() as s:
        tasks = [s.get(Task, i) for i in ids]
        with engine.begin() as conn:  # another transaction moves the third row
            conn.execute(
                sa.update(_table(Task))
                .where(_table(Task).c.id == ids[2])
                .values(status="cancelled")
            )
        for task in tasks:
            assert task is not None
            task.status = "in_progress"
        event.listen(engine, "before_cursor_execute", note)
        try:
            with pytest.raises(StaleTransitionError) as info:
                s.flush()
        finally:
            event.remove(engine, "before_cursor_execute", note)
        assert executemany == [True]
        assert (info.value.pk, info.value.from_state, info.value.to_state) == (
            ids[2],
            "pending",
            "in_progress",
        )
        assert "now holds 'cancelled'" in info.value.reason
        s.rollback()
        assert [_db_status(engine, i) for i in ids] == [
            "pending",
            "pending",
            "cancelled",
            "pending",
        ]
        for task in tasks:  # reloaded after the rollback; the others may move now
            assert task is not None
            if task.status == "pending":
                task.status = "in_progress"
        s.commit()
    assert [_db_status(engine, i) for i in ids] == [
        "in_progress",
        "in_progress",
        "cancelled",
        "in_progress",
    ]


def test_rows_moved_to_the_same_state_in_a_many_row_flush(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    ids = [_add_task(engine) for _ in range(3)]
    with sessions() as s:
        tasks = [s.get(Task, i) for i in ids]
        for task in tasks:
            assert task is not None
            task.status = "in_progress"
        with engine.begin() as conn:  # another worker claims the second task first
            conn.execute(
                sa.update(_table(Task))
                .where(_table(Task).c.id == ids[1])
                .values(status="in_progress")
            )
        with pytest.raises(StaleTransitionError) as info:
            s.flush()
        assert (info.value.pk, info.value.to_state) == (ids[1], "in_progress")
        assert "had already moved the row to 'in_progress'" in info.value.reason
        s.rollback()


def test_concurrent_workers_claim_every_task_exactly_once(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    """Real concurrent transactions racing for the same rows: a claim whose row another worker
    claimed first is stale, so no task is claimed twice (without the compare-and-set both
    claims of a task would commit: pending -> in_progress is legal, and the trigger lets the
    second, in_progress -> in_progress, through as no change)."""
    ids = [_add_task(engine) for _ in range(12)]
    claims: dict[int, list[int]] = {}
    stale: list[int] = []
    start = threading.Barrier(4)

    def worker(n: int) -> None:
        mine = claims.setdefault(n, [])
        start.wait()
        while True:
            with sessions() as s:
                task = s.scalars(
                    sa.select(Task).where(Task.status == "pending").order_by(Task.id).limit(1)
                ).first()
                if task is None:
                    return
                task.status = "in_progress"
                try:
                    s.commit()
                except StaleTransitionError:
                    stale.append(n)
                    continue
                mine.append(task.id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    claimed = sorted(i for mine in claims.values() for i in mine)
    assert claimed == ids  # each task once
    assert all(_db_status(engine, i) == "in_progress" for i in ids)
    assert transition_stats()["stale_transitions"] >= len(stale)


def test_row_deleted_by_another_transaction_is_stale(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    task_id = _add_task(engine)
    with sessions() as s:
        task = s.get(Task, task_id)
        assert task is not None
        with engine.begin() as conn:
            conn.execute(sa.delete(_table(Task)).where(_table(Task).c.id == task_id))
        task.status = "in_progress"
        with pytest.raises(StaleTransitionError, match="no longer exists"):
            s.flush()


def test_row_deleted_meanwhile_in_a_many_row_flush_is_stale(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    """psycopg counts the rows of a many-row UPDATE: one short, the row deleted meanwhile is
    found and named."""
    ids = [_add_task(engine) for _ in range(3)]
    with sessions() as s:
        tasks = [s.get(Task, i) for i in ids]
        with engine.begin() as conn:
            conn.execute(sa.delete(_table(Task)).where(_table(Task).c.id == ids[1]))
        for task in tasks:
            assert task is not None
            task.status = "in_progress"
        with pytest.raises(StaleTransitionError, match="no longer exists") as info:
            s.flush()
        assert info.value.pk == ids[1]
        s.rollback()
    assert [_db_status(engine, i) for i in (ids[0], ids[2])] == ["pending", "pending"]


def test_stale_transition_is_also_sqlalchemy_stale_data(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    task_id = _add_task(engine)
    with sessions() as winner, sessions() as loser:
        mine, theirs = loser.get(Task, task_id), winner.get(Task, task_id)
        assert mine is not None
        assert theirs is not None
        theirs.status = "cancelled"
        winner.commit()
        mine.status = "in_progress"
        with pytest.raises(StaleDataError) as info:  # what code written for version_id_col catches
            loser.commit()
        assert isinstance(info.value, StaleTransitionError)
        assert isinstance(info.value, IllegalTransitionError)


def test_delete_does_not_compare_the_status(engine: sa.Engine, sessions: sessionmaker[_S]) -> None:
    """Unlike a version_id_col, the guard leaves DELETE as it was: deleting is no transition."""
    task_id = _add_task(engine)
    with sessions() as s:
        task = s.get(Task, task_id)
        with engine.begin() as conn:
            conn.execute(
                sa.update(_table(Task))
                .where(_table(Task).c.id == task_id)
                .values(status="cancelled")
            )
        statements = Sent(engine)
        s.delete(task)
        s.commit()
        [delete] = statements.matching("DELETE")
        assert "status" not in delete
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(_table(Task))).scalar() == 0


def test_other_updates_do_not_compare_the_status(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    task_id = _add_task(engine)
    with sessions() as s:
        task = s.get(Task, task_id)
        assert task is not None
        statements = Sent(engine)
        task.title = "renamed"
        s.commit()
        [update] = statements.matching("UPDATE")
        assert "status" not in update


def test_compare_and_set_beside_the_models_own_version_counter(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    with sessions() as s:
        s.add(Ticket(id=1))
        s.commit()
    for moved, stale in (("title", StaleDataError), ("status", StaleTransitionError)):
        with sessions() as winner, sessions() as loser:
            mine, theirs = loser.get(Ticket, 1), winner.get(Ticket, 1)
            assert mine is not None
            assert theirs is not None
            setattr(theirs, moved, "closed")  # either way the version counter moves on
            winner.commit()
            mine.status = "closed"
            with pytest.raises(StaleDataError) as info:
                loser.flush()
            assert type(info.value) is stale  # a title edit: SQLAlchemy's own version check
            loser.rollback()
        with engine.begin() as conn:
            conn.execute(sa.update(_table(Ticket)).values(status="open"))


def test_composite_key_nullable_state_and_two_columns_in_one_update(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    with sessions() as s:
        s.add_all([Order(region="eu", number=1), Order(region="us", number=1)])
        s.commit()
    with sessions() as s:
        statements = Sent(engine)
        eu = s.get(Order, ("eu", 1))
        us = s.get(Order, ("us", 1))
        assert eu is not None
        assert us is not None
        eu.status, eu.payment = "shipped", "paid"
        us.status, us.payment = "shipped", "paid"
        s.commit()
        [update] = statements.matching("UPDATE")
        assert "AND orders.status = " in update
        assert "AND orders.payment IS NOT DISTINCT FROM " in update
    with sessions() as winner, sessions() as loser:
        mine = loser.get(Order, ("eu", 1))
        theirs = winner.get(Order, ("eu", 1))
        assert mine is not None
        assert theirs is not None
        theirs.payment = "refunded"
        winner.commit()
        mine.status = "delivered"
        mine.payment = "refunded"
        with pytest.raises(StaleTransitionError) as info:
            loser.flush()
        assert (info.value.pk, info.value.column) == (("eu", 1), "payment")
        assert (info.value.from_state, info.value.to_state) == ("paid", "refunded")


def test_enum_column_compare_and_set(engine: sa.Engine, sessions: sessionmaker[_S]) -> None:
    with sessions() as s:
        s.add(Doc(id=5))
        s.commit()
    with sessions() as winner, sessions() as loser:
        mine, theirs = loser.get(Doc, 5), winner.get(Doc, 5)
        assert mine is not None
        assert theirs is not None
        theirs.phase = Phase.retired
        winner.commit()
        mine.phase = Phase.review
        with pytest.raises(StaleTransitionError) as info:
            loser.flush()
        assert (info.value.from_state, info.value.to_state) == (Phase.draft, Phase.review)
        assert "now holds 'Retired'" in info.value.reason


def test_inheritance_hierarchy_shares_one_compare_and_set(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    with sessions() as s:
        s.add_all([Vehicle(id=1), Truck(id=2), Truck(id=3)])
        s.commit()
    with sessions() as s:
        vehicles = [s.get(Vehicle, i) for i in (1, 2, 3)]
        for vehicle in vehicles:
            assert vehicle is not None
            vehicle.state = "moving"
        statements = Sent(engine)
        s.commit()
        assert not [q for q in statements.sql if "FOR UPDATE" in q]
        [update] = statements.matching("UPDATE")
        assert "AND vehicles.state = " in update
    with sessions() as s:
        truck = s.get(Truck, 3)
        assert truck is not None
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE vehicles SET state = 'parked' WHERE id = 3"))
        truck.state, truck.load = "parked", 7
        with pytest.raises(StaleTransitionError) as info:
            s.flush()
        assert (info.value.model, info.value.pk, info.value.column) == ("Truck", 3, "state")


def test_stale_inside_a_savepoint_leaves_the_transaction_usable(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    a, b = _add_task(engine), _add_task(engine)
    with sessions() as s:
        ta, tb = s.get(Task, a), s.get(Task, b)
        assert ta is not None
        assert tb is not None
        with engine.begin() as conn:
            conn.execute(
                sa.update(_table(Task)).where(_table(Task).c.id == a).values(status="cancelled")
            )
        nested = s.begin_nested()
        ta.status = "in_progress"
        with pytest.raises(StaleTransitionError):
            s.flush()
        assert not STATE.flush_checks  # a failed flush leaves no expectations behind
        assert not STATE.flushing
        nested.rollback()
        tb.status = "in_progress"
        statements = Sent(engine)
        s.commit()
        [update] = statements.matching("UPDATE")
        assert "AND tasks.status = " in update
        assert not STATE.flush_checks  # nor does a successful one
        assert not STATE.flushing
    assert (_db_status(engine, a), _db_status(engine, b)) == ("cancelled", "in_progress")


def test_row_changed_after_the_guard_ran_falls_back_to_a_locked_check(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    """A status set during the flush (here by a before_update listener) has no recorded
    expectation; its UPDATE goes out as it is once every row sent with it is checked under
    lock, in one SELECT: that row for a legal move from what it holds, the others for the
    state they must still hold."""
    a, b = _add_task(engine), _add_task(engine)

    def claim_b(mapper: Any, connection: Any, target: Task) -> None:
        if target.id == b:
            target.status = {"pending": "in_progress", "in_progress": "completed"}[target.status]

    event.listen(Task, "before_update", claim_b)
    try:
        with sessions() as s:
            ta, tb = s.get(Task, a), s.get(Task, b)
            assert ta is not None
            assert tb is not None
            ta.title, ta.status = "a2", "in_progress"
            tb.title = "b2"
            statements = Sent(engine)
            s.commit()
            assert len(statements.matching("UPDATE")) == 1
            [locked] = [q for q in statements.sql if q.endswith("FOR UPDATE")]
            assert "tasks.id IN" in locked
            assert (ta.status, tb.status) == ("in_progress", "in_progress")  # loaded again
            ta.title, ta.status = "a3", "completed"
            tb.title = "b3"
            with engine.begin() as conn:
                conn.execute(
                    sa.update(_table(Task)).where(_table(Task).c.id == a).values(status="failed")
                )
            with pytest.raises(StaleTransitionError, match="now holds 'failed'"):
                s.flush()
    finally:
        event.remove(Task, "before_update", claim_b)
    assert (_db_status(engine, a), _db_status(engine, b)) == ("failed", "in_progress")


def test_status_set_by_a_listener_during_the_flush_is_judged(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    """A before_update listener that sets the status after before_flush judged the flush: the
    state written is judged too, whether the row had a judged change (from its loaded state)
    or none (from the state it holds), and in a flush with no other change of status."""
    a, b, c = _add_task(engine), _add_task(engine), _add_task(engine, "in_progress")

    def finish(mapper: Any, connection: Any, target: Task) -> None:
        if target.title == "finish":
            target.status = "completed"

    event.listen(Task, "before_update", finish)
    try:
        with sessions() as s:  # judged pending -> in_progress, written completed
            task = s.get(Task, a)
            assert task is not None
            task.title, task.status = "finish", "in_progress"
            with pytest.raises(IllegalTransitionError) as info:
                s.flush()
            assert (info.value.pk, info.value.from_state, info.value.to_state) == (
                a,
                "pending",
                "completed",
            )
        with sessions() as s:  # nothing judged: the only change is the title
            task = s.get(Task, b)
            assert task is not None
            task.title = "finish"
            statements = Sent(engine)
            with pytest.raises(IllegalTransitionError) as info:
                s.flush()
            assert (info.value.pk, info.value.from_state, info.value.to_state) == (
                b,
                "pending",
                "completed",
            )
            assert not statements.matching("UPDATE")  # refused before it was sent
        with sessions() as s:  # in_progress -> completed is legal: written
            task = s.get(Task, c)
            assert task is not None
            task.title = "finish"
            s.commit()
    finally:
        event.remove(Task, "before_update", finish)
    assert [_db_status(engine, i) for i in (a, b, c)] == ["pending", "pending", "completed"]


def test_other_update_of_the_status_during_the_flush_checks_the_rows_first(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    """An UPDATE of the status that is not the flush's own (here sent by a before_update
    listener, not by primary key) runs after the rows this flush expects something of are
    checked under lock."""
    a, b = _add_task(engine), _add_task(engine, title="other")
    table = _table(Task)

    def cancel_others(mapper: Any, connection: Any, target: Task) -> None:
        connection.execute(
            table.update().where(table.c.title == sa.bindparam("other")),
            {"other": "other", "status": "cancelled"},
        )

    event.listen(Task, "before_update", cancel_others)
    try:
        with sessions() as s:
            task = s.get(Task, a)
            assert task is not None
            task.status = "in_progress"
            statements = Sent(engine)
            s.commit()
            kinds = [q.split()[0] for q in statements.sql]
            assert kinds == ["SELECT", "UPDATE", "UPDATE"], statements.sql
            assert statements.sql[0].endswith("FOR UPDATE")
            assert "AND tasks.status = " in statements.sql[2]
    finally:
        event.remove(Task, "before_update", cancel_others)
    assert (_db_status(engine, a), _db_status(engine, b)) == ("in_progress", "cancelled")


@pytest.mark.parametrize("moved", [1, 2])
def test_other_update_of_the_status_after_the_flush_wrote_its_rows(
    engine: sa.Engine, sessions: sessionmaker[_S], moved: int
) -> None:
    """The same UPDATE sent by an after_update listener, once the flush's own UPDATE moved its
    rows: they hold the states the flush wrote, which is no conflict (it was refused as a
    StaleTransitionError naming the flush's own row, and nothing was written). One changed row
    and two, in a flush whose UPDATE was sent before (the same compiled statement)."""
    rows = [_add_task(engine) for _ in range(moved)]
    other = _add_task(engine, title="other")
    table = _table(Task)
    sent = [_add_task(engine) for _ in range(moved)]

    def cancel_others(mapper: Any, connection: Any, target: Task) -> None:
        connection.execute(
            table.update().where(table.c.title == sa.bindparam("other")),
            {"other": "other", "status": "cancelled"},
        )

    with sessions() as s:  # the UPDATE's plan made before (no listener yet)
        for key in sent:
            s.get_one(Task, key).status = "in_progress"
        s.commit()
    event.listen(Task, "after_update", cancel_others)
    try:
        with sessions() as s:
            for key in rows:
                s.get_one(Task, key).status = "in_progress"
            s.commit()
    finally:
        event.remove(Task, "after_update", cancel_others)
    assert [_db_status(engine, key) for key in rows] == ["in_progress"] * moved
    assert _db_status(engine, other) == "cancelled"


def test_unchanged_and_same_value_are_not_transitions(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    task_id = _add_task(engine, "completed")
    statements = Sent(engine)
    with sessions() as s:
        task = s.get(Task, task_id)
        assert task is not None
        task.status = "completed"
        task.title = "renamed"
        s.commit()
    assert not [q for q in statements.sql if "FOR UPDATE" in q]


def test_guard_off_by_config_leaves_only_the_trigger(engine: sa.Engine) -> None:
    for config in ({"status_validation": False}, {"enabled": False}):
        sessions = _factory(engine, **config)
        task_id = _add_task(engine, "completed")
        with sessions() as s:
            task = s.get(Task, task_id)
            assert task is not None
            task.status = "pending"
            err = _db_error(s.flush)
            assert err.via == "db"
    with engine.begin() as conn:
        uninstall_transition_trigger(conn, Task)
    sessions = _factory(engine, status_validation=False)
    task_id = _add_task(engine, "completed")
    with sessions() as s:
        task = s.get(Task, task_id)
        assert task is not None
        task.status = "pending"
        s.add(Task(status="failed"))
        s.commit()
    assert _db_status(engine, task_id) == "pending"


def test_plain_session_without_config_is_not_guarded(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        uninstall_transition_trigger(conn, Task)
    with sessionmaker(engine, class_=_S)() as s:
        s.add(Task(id=7, status="completed"))  # not an initial state: the guard would refuse it
        s.commit()
    assert _db_status(engine, 7) == "completed"


def test_enum_column(engine: sa.Engine, sessions: sessionmaker[_S]) -> None:
    with sessions() as s:
        doc = Doc()
        s.add(doc)
        s.commit()
        assert allowed_transitions(doc) == {Phase.review, Phase.retired}
        doc.phase = Phase.review
        s.commit()
        doc.phase = Phase.published
        s.commit()
        doc.phase = Phase.draft
        with pytest.raises(IllegalTransitionError) as info:
            s.flush()
        assert (info.value.from_state, info.value.to_state) == (Phase.published, Phase.draft)
        assert "'Published' -> 'Draft'" in str(info.value)
        s.rollback()
        doc.phase = Phase.retired  # the wildcard
        s.commit()
        s.add(Doc(phase=Phase.review))
        with pytest.raises(IllegalTransitionError):
            s.flush()
        s.rollback()
        doc_id = doc.id
    with engine.connect() as conn:
        err = _db_error(
            lambda: conn.execute(sa.update(Doc).where(Doc.id == doc_id).values(phase=Phase.draft))
        )
        # states come back as the declared Enum members
        assert (err.model, err.pk, err.from_state, err.to_state) == (
            "Doc",
            doc_id,
            Phase.retired,
            Phase.draft,
        )


def test_two_guarded_columns_composite_key_and_null_state(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    with sessions() as s:
        order = Order(region="eu", number=1)
        s.add(order)
        s.commit()
        assert allowed_transitions(order, column="status") == {"shipped"}
        assert allowed_transitions(order, column="payment") == {"paid"}
        order.payment = "refunded"
        with pytest.raises(IllegalTransitionError) as info:
            s.flush()
        assert (info.value.pk, info.value.column) == (("eu", 1), "payment")
        assert (info.value.from_state, info.value.to_state) == (None, "refunded")
        s.rollback()
        order.payment = "paid"
        order.status = "shipped"
        s.commit()
        order.status = "open"
        with pytest.raises(IllegalTransitionError) as info:
            s.flush()
        assert info.value.column == "status"
        s.rollback()
        s.add(Order(region="eu", number=2, payment="paid"))
        with pytest.raises(IllegalTransitionError, match="new rows must start in one of: None"):
            s.flush()
        s.rollback()
    with engine.connect() as conn:
        err = _db_error(
            lambda: conn.exec_driver_sql(
                "UPDATE orders SET payment = NULL WHERE region = 'eu' AND number = 1"
            )
        )
        assert (err.model, err.column, err.pk) == ("Order", "payment", ("eu", 1))
        assert (err.from_state, err.to_state) == ("paid", None)


def test_install_guard_is_idempotent_and_checks_its_argument(
    engine: sa.Engine, log: pytest.LogCaptureFixture
) -> None:
    install_guard(_S)
    install_guard(_S)
    # on SQLAlchemy's Session, once (resilient_db installs it there): it reaches _S, whose own
    # registration would make it run twice
    assert event.contains(Session, "before_flush", before_flush)
    assert not event.contains(_S, "before_flush", before_flush)
    install_engine_hooks(engine)
    install_engine_hooks(engine)
    assert event.contains(engine, "do_execute", guard_execute)
    with pytest.raises(TypeError, match="Session subclass"):
        install_guard(sessionmaker)  # type: ignore[arg-type]
    task_id = _add_task(engine, "completed")
    with _factory(engine)() as s:
        task = s.get(Task, task_id)
        assert task is not None
        task.status = "pending"
        with pytest.raises(IllegalTransitionError):
            s.flush()
    assert len(log.records) == 1  # one listener, one block


def test_logging_switch_keeps_the_guard(engine: sa.Engine, log: pytest.LogCaptureFixture) -> None:
    task_id = _add_task(engine, "completed")
    with _factory(engine, logging=False)() as s:
        task = s.get(Task, task_id)
        assert task is not None
        task.status = "pending"
        with pytest.raises(IllegalTransitionError):
            s.flush()
    assert not log.records


# ------------------------------------------------------------------------------------------------
# ORM-enabled bulk UPDATE
# ------------------------------------------------------------------------------------------------


def _tasks_in(engine: sa.Engine, *states: str) -> dict[str, int]:
    return {state: _add_task(engine, state, title=state) for state in states}


def _states(engine: sa.Engine) -> dict[int, str]:
    table = _table(Task)
    with engine.connect() as conn:
        return {row.id: row.status for row in conn.execute(sa.select(table.c.id, table.c.status))}


ALL_STATES = ("pending", "in_progress", "completed", "failed", "cancelled")


def test_bulk_update_only_moves_rows_that_may_move(
    engine: sa.Engine, sessions: sessionmaker[_S], log: pytest.LogCaptureFixture
) -> None:
    ids = _tasks_in(engine, *ALL_STATES)
    with sessions() as s:
        result = s.execute(sa.update(Task).values(status="completed"))
        assert isinstance(result, sa.CursorResult)
        assert result.rowcount == 2  # in_progress moved, completed was already there
        s.commit()
    after = _states(engine)
    assert after[ids["in_progress"]] == "completed"
    for state in ("pending", "failed", "cancelled"):
        assert after[ids[state]] == state
    [record] = [r for r in log.records if r.name == LOGGER]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("[SELF-HEAL] Status transition blocked for 3 row(s)")
    assert record.self_heal["blocked_rows"] == 3
    assert record.self_heal["via"] == "orm-update"


def test_bulk_update_with_where_params_and_bindparams(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    ids = _tasks_in(engine, *ALL_STATES)
    with sessions() as s:
        s.execute(
            sa.update(Task).where(Task.title.in_(["pending", "failed"])), {"status": "pending"}
        )
        s.execute(
            sa.update(Task)
            .where(Task.id == sa.bindparam("target_id"))
            .values({Task.status: sa.bindparam("new_status")}),
            {"target_id": ids["pending"], "new_status": "in_progress"},
        )
        s.execute(
            sa.update(Task).where(Task.id == ids["completed"]).values(status=sa.literal("failed"))
        )
        s.commit()
    after = _states(engine)
    assert after[ids["failed"]] == "pending"  # failed -> pending is legal
    assert after[ids["pending"]] == "in_progress"
    assert after[ids["completed"]] == "completed"  # completed -> failed blocked


def test_bulk_update_raise_mode(engine: sa.Engine) -> None:
    sessions = _factory(engine, bulk_update="raise")
    ids = _tasks_in(engine, *ALL_STATES)
    before = _states(engine)
    with sessions() as s:
        with pytest.raises(IllegalTransitionError) as info:
            s.execute(sa.update(Task).values(status="failed"))
        err = info.value
        assert (err.model, err.column, err.to_state, err.via) == (
            "Task",
            "status",
            "failed",
            "orm-update",
        )
        assert err.pk in ids.values()
        assert err.from_state in {"pending", "completed", "cancelled"}
        assert "3 matching row(s)" in err.reason
        s.rollback()
        assert _states(engine) == before
        result = s.execute(
            sa.update(Task).where(Task.status == "in_progress").values(status="failed")
        )
        assert isinstance(result, sa.CursorResult)
        assert result.rowcount == 1
        s.commit()
    assert _states(engine)[ids["in_progress"]] == "failed"


def test_bulk_update_with_sql_expression_target(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    ids = _tasks_in(engine, "pending", "in_progress", "completed")
    flip = sa.case(
        (Task.status == "pending", "in_progress"),
        (Task.status == "in_progress", "pending"),  # illegal
        else_="cancelled",  # illegal from completed
    )
    with sessions() as s:
        s.execute(sa.update(Task).values(status=flip))
        s.commit()
    after = _states(engine)
    assert after == {
        ids["pending"]: "in_progress",
        ids["in_progress"]: "in_progress",
        ids["completed"]: "completed",
    }
    raising = _factory(engine, bulk_update="raise")
    with raising() as s, pytest.raises(IllegalTransitionError) as info:
        s.execute(sa.update(Task).values(status=flip))
    assert (info.value.from_state, info.value.to_state) in {
        ("in_progress", "pending"),
        ("completed", "cancelled"),
    }


def test_bulk_update_by_primary_key(engine: sa.Engine, sessions: sessionmaker[_S]) -> None:
    ids = _tasks_in(engine, "pending", "in_progress", "completed")
    rows = [
        {"id": ids["pending"], "status": "in_progress", "title": "a"},
        {"id": ids["in_progress"], "status": "pending", "title": "b"},  # illegal: skipped
        {"id": ids["completed"], "title": "c"},  # no status change
    ]
    with sessions() as s:
        s.execute(sa.update(Task), rows)
        s.commit()
    table = _table(Task)
    with engine.connect() as conn:
        got = {r.id: (r.status, r.title) for r in conn.execute(sa.select(table))}
    assert got[ids["pending"]] == ("in_progress", "a")
    assert got[ids["in_progress"]] == ("in_progress", "in_progress")
    assert got[ids["completed"]] == ("completed", "c")
    with sessions() as s:  # every parameter set rejected: nothing is executed
        s.execute(sa.update(Task), [{"id": ids["completed"], "status": "pending"}])
        s.commit()
    raising = _factory(engine, bulk_update="raise")
    with raising() as s:
        with pytest.raises(IllegalTransitionError) as info:
            s.execute(sa.update(Task), [{"id": ids["completed"], "status": "pending"}])
        assert (info.value.pk, info.value.from_state, info.value.via) == (
            ids["completed"],
            "completed",
            "orm-update",
        )
    assert _states(engine)[ids["completed"]] == "completed"


def test_bulk_update_by_primary_key_counts_each_refused_move(
    engine: sa.Engine, sessions: sessionmaker[_S], log: pytest.LogCaptureFixture
) -> None:
    """A parameter set moving two guarded columns illegally is two refused moves: two events,
    and two in the counters (as an UPDATE with criteria counts them, per column), the set
    skipped once."""
    with sessions() as s:
        s.add_all([Order(region="eu", number=7), Order(region="us", number=7)])
        s.commit()
    before = transition_stats()
    rows = [
        {"region": "eu", "number": 7, "status": "delivered", "payment": "refunded"},  # both
        {"region": "us", "number": 7, "status": "shipped", "payment": "paid"},  # legal
    ]
    with sessions() as s:
        s.execute(sa.update(Order), rows)
        s.commit()
    after = transition_stats()
    events = [r for r in log.records if "parameter set skipped" in r.getMessage()]
    assert sorted(r.self_heal["column"] for r in events) == ["payment", "status"]
    assert after["bulk_rows_filtered"] - before["bulk_rows_filtered"] == 2
    assert after["blocked_transitions"] - before["blocked_transitions"] == 2
    with engine.connect() as conn:
        got = {r[0]: tuple(r[1:]) for r in conn.execute(sa.select(*_table(Order).c[:4]))}
    assert got == {"eu": (7, "open", None), "us": (7, "shipped", "paid")}


@pytest.mark.parametrize("strategy", ["orm", "core_only"])
def test_bulk_update_executed_once_per_parameter_set(
    engine: sa.Engine, strategy: str, log: pytest.LogCaptureFixture
) -> None:
    """An UPDATE with WHERE criteria run over a list of parameter sets: each set's move is
    judged (the target state differs per set), in filter and in raise mode."""
    ids = _tasks_in(engine, "pending", "completed", "failed", "in_progress")
    stmt = (
        sa.update(Task)
        .where(Task.id == sa.bindparam("task_id"))
        .values(status=sa.bindparam("new_status"))
    )
    sets = [
        {"task_id": ids["pending"], "new_status": "in_progress"},  # legal
        {"task_id": ids["completed"], "new_status": "pending"},  # illegal
        {"task_id": ids["failed"], "new_status": "pending"},  # legal
        {"task_id": ids["in_progress"], "new_status": "pending"},  # illegal
    ]
    copies = [dict(p) for p in sets]
    options = {"dml_strategy": strategy}
    raising = _factory(engine, bulk_update="raise")
    with raising() as s:
        with pytest.raises(IllegalTransitionError) as info:
            s.execute(stmt, sets, execution_options=options)
        assert (info.value.pk, info.value.from_state, info.value.to_state) == (
            ids["completed"],
            "completed",
            "pending",
        )
    assert _states(engine) == {v: k for k, v in ids.items()}  # nothing moved
    with _factory(engine)() as s:
        s.execute(stmt, sets, execution_options=options)
        s.commit()
    assert sets == copies  # the caller's parameter sets are left as they were
    assert _states(engine) == {
        ids["pending"]: "in_progress",
        ids["completed"]: "completed",
        ids["failed"]: "pending",
        ids["in_progress"]: "in_progress",
    }
    [record] = [r for r in log.records if "filter mode" in r.getMessage()]
    assert record.self_heal["blocked_rows"] == 2


def test_bulk_update_by_primary_key_judges_each_set_from_the_one_before(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    """The same row twice in one list: the second move starts where the first left it."""
    ids = _tasks_in(engine, "pending", "in_progress")
    with sessions() as s:
        s.execute(
            sa.update(Task),
            [
                {"id": ids["pending"], "status": "cancelled"},
                {"id": ids["pending"], "status": "in_progress"},  # cancelled is final: skipped
                {"id": ids["in_progress"], "status": "failed"},
                {"id": ids["in_progress"], "status": "pending"},  # failed -> pending: legal
            ],
        )
        s.commit()
    assert _states(engine) == {ids["pending"]: "cancelled", ids["in_progress"]: "pending"}
    raising = _factory(engine, bulk_update="raise")
    with raising() as s, pytest.raises(IllegalTransitionError) as info:
        s.execute(
            sa.update(Task),
            [
                {"id": ids["in_progress"], "status": "in_progress"},
                {"id": ids["in_progress"], "status": "pending"},
            ],
        )
    assert (info.value.from_state, info.value.to_state) == ("in_progress", "pending")


def test_bulk_update_of_a_subclass_counts_its_own_rows_only(
    engine: sa.Engine, log: pytest.LogCaptureFixture
) -> None:
    """update(Sub) of a single-table subclass: the rows it leaves behind are counted among the
    subclass's rows (the discriminator the ORM adds), not the whole table's."""
    reg = registry()
    try:
        rules = TransitionRules(column="status", transitions={"a": {"b"}}, initial={"a"})
        base = reg.mapped(
            type(
                "Job",
                (),
                {
                    "__tablename__": "sti_jobs",
                    "__mapper_args__": {"polymorphic_on": "kind", "polymorphic_identity": "job"},
                    "__transitions__": rules,
                    "id": mapped_column(sa.Integer, primary_key=True),
                    "kind": mapped_column(sa.String(20)),
                    "status": mapped_column(sa.String(20)),
                },
            )
        )
        sub = reg.mapped(
            type("SpecialJob", (base,), {"__mapper_args__": {"polymorphic_identity": "special"}})
        )
        reg.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO sti_jobs VALUES (1, 'job', 'b'), (2, 'special', 'a'), "
                "(3, 'special', 'b')"
            )
        with _factory(engine)() as s:
            s.execute(sa.update(sub).values(status="a"))  # 3: b -> a illegal; 1 is no Sub
            s.commit()
    finally:
        reg.metadata.drop_all(engine)
        reg.dispose()
    [record] = [r for r in log.records if "filter mode" in r.getMessage()]
    assert record.self_heal["blocked_rows"] == 1


def test_bulk_update_enum_column(engine: sa.Engine, sessions: sessionmaker[_S]) -> None:
    with sessions() as s:
        s.add_all([Doc(id=1), Doc(id=2, phase=Phase.draft)])
        s.commit()
        s.execute(sa.update(Doc).where(Doc.id == 2).values(phase=Phase.review))
        s.execute(sa.update(Doc).values(phase=Phase.published))
        s.commit()
        phases = {row.id: row.phase for row in s.execute(sa.select(Doc.id, Doc.phase))}
    assert phases == {1: Phase.draft, 2: Phase.published}


_FIRST_STATEMENT = """
import sys
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
import resilient_db as rdb

class Base(DeclarativeBase):
    pass

class Job(Base):
    __tablename__ = "first_statement_jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20))
    __transitions__ = rdb.TransitionRules(
        column="status", transitions={"new": {"done"}}, initial={"new"}
    )

engine = sa.create_engine(sys.argv[1])
with engine.begin() as conn:  # Core only: no mapper is configured before the ORM UPDATE
    conn.exec_driver_sql("DROP TABLE IF EXISTS first_statement_jobs")
    conn.exec_driver_sql("CREATE TABLE first_statement_jobs (id int PRIMARY KEY, status text)")
    conn.exec_driver_sql("INSERT INTO first_statement_jobs VALUES (1, 'done')")
with rdb.ResilientSession(engine)() as session:
    moved = session.execute(sa.update(Job).where(Job.id == 1).values(status="new")).rowcount
    session.commit()
with engine.connect() as conn:
    print(moved, conn.exec_driver_sql("SELECT status FROM first_statement_jobs").scalar())
engine.dispose()
"""


def test_bulk_update_guarded_from_the_first_statement_of_a_process(
    pg_url: str, tmp_path: Any
) -> None:
    """The first ORM statement of a process configures the mappers while it is being executed;
    the bulk guard must already be listening then (it is added when the class is mapped)."""
    script = tmp_path / "first_statement.py"
    script.write_text(_FIRST_STATEMENT)
    done = subprocess.run(
        [sys.executable, str(script), pg_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "done"]  # filtered: the row stays done


# ------------------------------------------------------------------------------------------------
# database trigger
# ------------------------------------------------------------------------------------------------


def test_trigger_blocks_raw_update_and_insert(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO tasks (id, title, status) VALUES (5, 't', 'pending')")
        conn.exec_driver_sql("UPDATE tasks SET status = 'in_progress' WHERE id = 5")
    with engine.connect() as conn:
        err = _db_error(
            lambda: conn.exec_driver_sql("UPDATE tasks SET status = 'pending' WHERE id = 5")
        )
        assert (err.model, err.pk, err.column, err.via) == ("Task", 5, "status", "db")
        assert (err.from_state, err.to_state) == ("in_progress", "pending")
        conn.rollback()
        err = _db_error(
            lambda: conn.exec_driver_sql(
                "INSERT INTO tasks (id, title, status) VALUES (6, 't', 'completed')"
            )
        )
        assert (err.pk, err.from_state, err.to_state) == (6, None, "completed")
        assert "initial" in err.reason
        conn.rollback()
        # the row's own constraints are checked before the AFTER trigger runs: NOT NULL refuses
        with pytest.raises(sa.exc.IntegrityError, match="not-null"):
            conn.exec_driver_sql("UPDATE tasks SET status = NULL WHERE id = 5")
        conn.rollback()
        # same value and other columns are not transitions: the trigger does not fire
        conn.exec_driver_sql("UPDATE tasks SET status = status, title = 'x' WHERE id = 5")
        conn.commit()
    assert _db_status(engine, 5) == "in_progress"


def test_a_before_trigger_of_the_application_sorting_after_ours_is_checked(
    engine: sa.Engine,
) -> None:
    """PostgreSQL fires the BEFORE row triggers of an event in name order: one of the
    application's that sets the status, named to fire after ``rdb_transition_...``, is judged
    all the same (the guard's triggers run AFTER the write, on the row as stored)."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION zz_sync_status() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN IF NEW.title = 'done' THEN NEW.status := 'completed'; END IF; "
            "RETURN NEW; END $$"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER zz_sync_status BEFORE INSERT OR UPDATE ON tasks "
            "FOR EACH ROW EXECUTE FUNCTION zz_sync_status()"
        )
        conn.exec_driver_sql("INSERT INTO tasks (id, title, status) VALUES (7, 't', 'pending')")
    with engine.connect() as conn:
        err = _db_error(
            lambda: conn.exec_driver_sql("UPDATE tasks SET title = 'done' WHERE id = 7")
        )
        assert (err.pk, err.from_state, err.to_state) == (7, "pending", "completed")
        conn.rollback()
        err = _db_error(
            lambda: conn.exec_driver_sql(
                "INSERT INTO tasks (id, title, status) VALUES (8, 'done', 'pending')"
            )
        )
        assert (err.pk, err.from_state, err.to_state) == (8, None, "completed")
        conn.rollback()
    assert _db_status(engine, 7) == "pending"
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM tasks WHERE id = 8").scalar() == 0


class _PartitionedBase(DeclarativeBase):
    pass


class PartJob(_PartitionedBase):
    __tablename__ = "p_jobs"
    __table_args__ = ({"postgresql_partition_by": "LIST (region)"},)
    __transitions__ = TransitionRules(
        column="status", transitions={"pending": {"done"}}, initial={"pending"}
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    region: Mapped[str] = mapped_column(sa.String(10), primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20))


def test_a_refused_move_on_a_partitioned_table_names_the_table_of_the_model(
    engine: sa.Engine,
) -> None:
    """The trigger fires on the partition the row is in (TG_TABLE_NAME is the partition's): its
    error names the root table, so the error maps back to the model."""
    _PartitionedBase.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE p_jobs_eu PARTITION OF p_jobs FOR VALUES IN ('eu')")
        install_transition_trigger(conn, PartJob)
        conn.exec_driver_sql("INSERT INTO p_jobs VALUES (1, 'eu', 'pending')")
    with engine.connect() as conn:
        assert trigger_drift(conn, PartJob) is None
        err = _db_error(
            lambda: conn.exec_driver_sql("UPDATE p_jobs SET status = 'bogus' WHERE id = 1")
        )
        assert (err.model, err.pk, err.column) == ("PartJob", (1, "eu"), "status")
        assert (err.from_state, err.to_state, err.via) == ("pending", "bogus", "db")
        conn.rollback()
        err = _db_error(
            lambda: conn.exec_driver_sql("INSERT INTO p_jobs_eu VALUES (2, 'eu', 'done')")
        )
        assert (err.model, err.pk, err.to_state, err.inserted) == (
            "PartJob",
            (2, "eu"),
            "done",
            True,
        )
        conn.rollback()
        with pytest.raises(sa.exc.DBAPIError, match=r"blocked: p_jobs\.status 'pending' -> 'x'"):
            conn.exec_driver_sql("UPDATE p_jobs SET status = 'x' WHERE id = 1")
        conn.rollback()


def test_exception_from_db_ignores_other_errors(engine: sa.Engine) -> None:
    with engine.connect() as conn, pytest.raises(sa.exc.DBAPIError) as info:
        conn.exec_driver_sql("SELECT 1/0")
    assert exception_from_db(info.value) is None
    assert exception_from_db(ValueError("x")) is None


def test_exception_from_db_logs_when_asked(
    engine: sa.Engine, log: pytest.LogCaptureFixture
) -> None:
    with engine.connect() as conn, pytest.raises(sa.exc.DBAPIError) as info:
        conn.exec_driver_sql("INSERT INTO tasks (id, title, status) VALUES (1, 't', 'failed')")
    assert exception_from_db(info.value) is not None
    assert not log.records
    assert info.value.orig is not None
    err = exception_from_db(info.value.orig, log=True)  # the driver error itself works too
    assert err is not None
    assert err.via == "db"
    [record] = log.records
    assert record.getMessage().startswith("[SELF-HEAL] Status transition blocked")


def test_hostile_state_names_round_trip_without_injection(
    engine: sa.Engine, sessions: sessionmaker[_S]
) -> None:
    table = _table(Hostile)
    col = table.c['st"ate']
    with engine.begin() as conn:  # the whole script also runs as one multi-statement string
        conn.exec_driver_sql(
            transition_trigger_sql(Hostile), execution_options={"no_parameters": True}
        )
    with sessions() as s:
        row = Hostile(id=1)
        s.add(row)
        s.commit()
        assert allowed_transitions(row) == {HOSTILE}
        row.state = HOSTILE
        s.commit()
        assert allowed_transitions(row) == set(WEIRD)
        row.state = "new"
        with pytest.raises(IllegalTransitionError) as info:
            s.flush()
        assert info.value.from_state == HOSTILE
        s.rollback()
        s.add(Hostile(id=100))
        s.flush()
        result = s.execute(sa.update(Hostile).values(state=WEIRD[0]))
        assert isinstance(result, sa.CursorResult)
        assert result.rowcount == 1  # only row 1 may move; row 100 is still 'new'
        s.commit()
        assert row.state == WEIRD[0]
    for i, weird in enumerate(WEIRD, start=2):
        with engine.begin() as conn:
            conn.execute(table.insert().values({"id": i, col: "new"}))
            conn.execute(table.update().where(table.c.id == i).values({col: HOSTILE}))
            conn.execute(table.update().where(table.c.id == i).values({col: weird}))
            stored = conn.execute(sa.select(col).where(table.c.id == i)).scalar_one()
            assert stored == weird
        with engine.connect() as conn:
            err = _db_error(
                lambda i=i: conn.execute(  # type: ignore[misc]
                    table.update().where(table.c.id == i).values({col: "new"})
                )
            )
            assert (err.model, err.column, err.pk) == ("Hostile", "state", i)
            assert (err.from_state, err.to_state) == (weird, "new")
    with engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        assert {"x", 'we"ird; table', "tasks"} <= tables
        assert trigger_drift(conn, Hostile) is None


# ------------------------------------------------------------------------------------------------
# bypass
# ------------------------------------------------------------------------------------------------


def test_bypass_only_inside_its_transaction_and_logged(
    engine: sa.Engine, sessions: sessionmaker[_S], log: pytest.LogCaptureFixture
) -> None:
    task_id = _add_task(engine, "completed")
    log.clear()
    with sessions() as s:
        bypass_transitions(s, reason="ticket OPS-42: reopen after data fix")
        task = s.get(Task, task_id)
        assert task is not None
        task.status = "pending"  # flush guard off for this transaction
        s.flush()
        s.execute(sa.text("UPDATE tasks SET status = 'failed' WHERE id = :id"), {"id": task_id})
        s.commit()  # the bypass ends with the transaction
        assert _db_status(engine, task_id) == "failed"
        task.status = "completed"
        with pytest.raises(IllegalTransitionError):
            s.flush()
        s.rollback()
        with pytest.raises(sa.exc.DBAPIError) as info:
            s.execute(sa.text("UPDATE tasks SET status = 'completed' WHERE id = :id"), {"id": 1})
        assert exception_from_db(info.value) is not None
        s.rollback()
        bypass_transitions(s, reason="rolled back repair")
        task.status = "completed"
        s.flush()
        s.rollback()  # a rolled back transaction ends the bypass too
        task.status = "completed"
        with pytest.raises(IllegalTransitionError):
            s.flush()
    assert _db_status(engine, task_id) == "failed"
    bypasses = [r for r in log.records if "bypassed" in r.getMessage()]
    assert len(bypasses) == 2
    xid = bypasses[0].self_heal["xid"]
    assert xid.isdigit()
    with engine.connect() as conn:
        role = conn.exec_driver_sql("SELECT current_user::text").scalar()
    assert bypasses[0].getMessage() == (
        f"[SELF-HEAL] transition guard bypassed for the current transaction (xid {xid}) by "
        f"role {role}: reason=ticket OPS-42: reopen after data fix"
    )
    assert bypasses[0].self_heal["reason"] == "ticket OPS-42: reopen after data fix"
    # who asked, as a refusal says it (the audit's who and why)
    assert bypasses[0].self_heal["role"] == bypasses[0].self_heal["login_role"] == role


@pytest.mark.parametrize("switch", ["enabled", "status_validation"])
def test_a_bypass_is_logged_with_self_healing_switched_off(
    engine: sa.Engine, log: pytest.LogCaptureFixture, switch: str, service: str
) -> None:
    """The trigger honours a bypass whatever the client's switches say: its audit line was
    dropped with ``SELF_HEALING_ENABLED=false`` (the move went through, unlogged); only
    ``SELF_HEALING_LOGGING=false`` silences it."""
    task_id = _add_task(engine, "completed")
    for logging_on in (True, False):
        log.clear()
        config = Config(**{switch: False, "logging": logging_on})
        factory = ResilientSession(engine, service=f"{service}-{logging_on}", config=config)
        with factory() as s:
            bypass_transitions(s, reason="ticket OPS-43")
            s.execute(
                sa.text("UPDATE tasks SET status = 'pending' WHERE id = :id"), {"id": task_id}
            )
            s.rollback()
        lines = [r.getMessage() for r in log.records if "bypassed" in r.getMessage()]
        assert len(lines) == (1 if logging_on else 0)


def test_bypass_on_a_connection(engine: sa.Engine, sessions: sessionmaker[_S]) -> None:
    task_id = _add_task(engine, "completed")
    with engine.connect() as conn:
        with pytest.raises(ValueError, match="reason"):
            bypass_transitions(conn, reason=" ")
        # PostgreSQL text holds no NUL: said so, before anything is sent (psycopg raised a
        # DataError quoting the whole statement; asyncpg's aborted the transaction)
        with pytest.raises(ValueError, match="NUL character"):
            bypass_transitions(conn, reason="migration\x000042")
        # what goes into the audit line and each of the trigger's server log lines: one line of
        # text that can be sent (a lone surrogate, os.environ's spelling of a byte that is no
        # UTF-8, failed with the driver's UnicodeEncodeError; a line end began a line of the
        # server's log that looked like the server's own), as open_breaker's reason is
        for bad, said in (("ticket\udcff", "not valid UTF-8"), ("ok\nLOG:  fake", "control")):
            with pytest.raises(ValueError, match=rf"^bypass_transitions\(\): reason .*{said}"):
                bypass_transitions(conn, reason=bad)
        assert not conn.in_transaction()  # (refused before anything was sent)
        bypass_transitions(conn, reason="migration 0042")
        conn.exec_driver_sql(f"UPDATE tasks SET status = 'pending' WHERE id = {task_id}")
        conn.commit()
        with pytest.raises(sa.exc.DBAPIError):
            conn.exec_driver_sql(f"UPDATE tasks SET status = 'completed' WHERE id = {task_id}")
        conn.rollback()
    with (
        engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn,
        pytest.raises(ValueError, match="AUTOCOMMIT"),
    ):
        bypass_transitions(conn, reason="x")
    assert _db_status(engine, task_id) == "pending"


def test_bypass_is_refused_on_an_engine_in_autocommit_and_logs_nothing(
    pg_url: str, log: pytest.LogCaptureFixture
) -> None:
    """AUTOCOMMIT for the whole engine (not only as a connection's option): SET LOCAL would
    have no effect, so nothing is bypassed, counted or logged."""
    engine = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    before = transition_stats()["bypasses"]
    try:
        with engine.connect() as conn, pytest.raises(ValueError, match="AUTOCOMMIT"):
            bypass_transitions(conn, reason="x")
        with Session(engine) as session, pytest.raises(ValueError, match="AUTOCOMMIT"):
            bypass_transitions(session, reason="x")
    finally:
        engine.dispose()
    assert transition_stats()["bypasses"] == before
    assert not [r for r in log.records if "bypassed" in r.getMessage()]


def test_a_bypass_leaves_session_info_alone(engine: sa.Engine) -> None:
    task_id = _add_task(engine, "completed")
    with _factory(engine)() as s:
        bypass_transitions(s, reason="repair")
        assert set(s.info) == {GUARD_INFO_KEY}  # nothing of the bypass in the user's info
        task = s.get(Task, task_id)
        assert task is not None
        task.status = "pending"
        s.flush()  # bypassed for this transaction
        s.rollback()
        task = s.get(Task, task_id)
        assert task is not None
        task.status = "pending"
        with pytest.raises(IllegalTransitionError):
            s.flush()  # the bypass ended with its transaction


def test_a_bypassed_session_is_not_kept_after_it_is_dropped(engine: sa.Engine) -> None:
    """The bypass's record held the session's transaction, which holds the session: the
    session, keyed weakly, was kept for good."""
    with _factory(engine)() as s:
        bypass_transitions(s, reason="repair")
        s.commit()
    dropped = weakref.ref(s)
    del s
    gc.collect()
    assert dropped() is None


# ------------------------------------------------------------------------------------------------
# drift, install helpers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("through", ["engine", "connection"])
def test_an_install_in_autocommit_mode_is_one_transaction(engine: sa.Engine, through: str) -> None:
    """Through an AUTOCOMMIT engine or connection the install still runs in one transaction:
    no moment where a DROP TRIGGER is committed and its CREATE TRIGGER not yet (illegal writes
    of other sessions got through then); an install that fails half-way changes nothing."""
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    with engine.begin() as conn:  # drift, so that the install sends its statements
        conn.exec_driver_sql(
            f"COMMENT ON FUNCTION {trigger_names(guards_of(Task)[0]).function}() IS 'old'"
        )
    triggers = (
        "SELECT tgname FROM pg_trigger WHERE tgrelid = 'tasks'::regclass "
        "AND tgname LIKE 'rdb_transition%%' ORDER BY tgname"
    )

    def fail_at_the_second_create(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith('CREATE TRIGGER "rdb_transition_status_upd"'):
            with engine.connect() as other:  # what other sessions see meanwhile
                seen.append(list(other.exec_driver_sql(triggers).scalars()))
            raise RuntimeError("interrupted")

    seen: list[list[str]] = []
    event.listen(autocommit, "before_cursor_execute", fail_at_the_second_create)
    try:
        if through == "engine":
            with pytest.raises(RuntimeError, match="interrupted"):
                install_transition_trigger(autocommit, Task)
        else:
            with autocommit.connect() as conn, pytest.raises(RuntimeError, match="interrupted"):
                install_transition_trigger(conn, Task)
    finally:
        event.remove(autocommit, "before_cursor_execute", fail_at_the_second_create)
    both = ["rdb_transition_status_ins", "rdb_transition_status_upd"]
    assert seen == [both]  # the DROP TRIGGER of the update trigger was not committed
    with engine.connect() as conn:
        assert list(conn.exec_driver_sql(triggers).scalars()) == both
        assert "stamp" in (trigger_drift(conn, Task) or "")  # rolled back as a whole
    with autocommit.connect() as conn:
        install_transition_trigger(conn, Task)
    with engine.connect() as conn:
        assert trigger_drift(conn, Task) is None


def test_an_application_role_may_call_the_trigger_install_once_it_is_current(
    engine: sa.Engine, pg_url: str
) -> None:
    """As for the commit markers: an install that would change nothing sends no DDL (a role
    without CREATE on the schema failed with it); a trigger that drifted is installed again."""
    name, password = f"rdb_app_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
    app_url = sa.make_url(pg_url).set(username=name, password=password)
    app_engine = sa.create_engine(app_url)
    try:
        install_transition_trigger(app_engine, Task)  # current: nothing to do
        with engine.begin() as conn:
            names = trigger_names(guards_of(Task)[0])
            conn.exec_driver_sql(f"DROP TRIGGER {names.update_trigger} ON {names.table}")
        with pytest.raises(sa.exc.ProgrammingError):
            install_transition_trigger(app_engine, Task)  # drifted: the owner's job
    finally:
        app_engine.dispose()
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP ROLE {name}")
    install_transition_trigger(engine, Task)
    with engine.connect() as conn:
        assert trigger_drift(conn, Task) is None


def test_a_trigger_installed_from_other_rules_says_so_when_it_blocks(pg_url: str) -> None:
    """The model's rules changed (a new move allowed) and the trigger was not installed again:
    the trigger's refusal of a move the model allows says the two differ and what to do."""
    engine = sa.create_engine(pg_url)
    table = sa.Table(
        "drifted_jobs",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("status", sa.String(20)),
    )

    def mapped(reg: Any, transitions: dict[str, set[str]]) -> type[Any]:
        rules = TransitionRules(column="status", transitions=transitions, initial={"new"})
        return reg.mapped(type("DriftedJob", (), {"__table__": table, "__transitions__": rules}))

    old = registry()
    try:
        with engine.begin() as conn:
            table.create(conn)
            install_transition_trigger(conn, mapped(old, {"new": {"done"}}))
            conn.execute(table.insert(), [{"id": 1, "status": "new"}, {"id": 2, "status": "new"}])
    finally:
        old.dispose()
    new = registry()
    try:
        # "skipped" is new: the trigger never heard of it (the class is kept, as a module keeps
        # its models: the guard lives as long as its mapper)
        model = mapped(new, {"new": {"done", "skipped"}})
        sa.orm.configure_mappers()  # (as the application's first ORM statement would)
        Sessions = ResilientSession(engine, service="drifted")

        def move(key: int, to: str) -> Callable[[Session], None]:
            def unit(session: Session) -> None:
                session.execute(table.update().where(table.c.id == key).values(status=to))

            return unit

        with pytest.raises(IllegalTransitionError) as allowed_here:
            Sessions.run(move(1, "skipped"))
        assert allowed_here.value.via == "db"
        assert "whose rules differ from those declared on the model" in str(allowed_here.value)
        assert "install_transition_trigger" in str(allowed_here.value)
        with pytest.raises(IllegalTransitionError) as illegal:  # refused by both: no such hint
            Sessions.run(move(2, "new-again"))
        assert "differ" not in str(illegal.value)
        assert model.__table__ is table
    finally:
        new.dispose()
        with engine.begin() as conn:
            table.drop(conn)
        engine.dispose()


def test_drift_detection(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        for model in MODELS:
            assert trigger_drift(conn, model) is None
    reg = registry()
    try:
        changed: type[Any] = reg.mapped(
            type(
                "Task",
                (),
                {
                    "__table__": sa.Table(
                        "tasks",
                        sa.MetaData(),
                        sa.Column("id", sa.Integer, primary_key=True),
                        sa.Column("title", sa.String),
                        sa.Column("status", sa.String(40)),
                    ),
                    "__transitions__": TransitionRules(
                        column="status",
                        transitions={"pending": {"in_progress"}, "in_progress": {"pending"}},
                        initial={"pending"},
                    ),
                },
            )
        )
        with engine.connect() as conn:
            drift = trigger_drift(conn, changed)
            assert drift is not None
            assert "stamp" in drift
            assert "does not match the declared rules" in drift
        with engine.begin() as conn:
            install_transition_trigger(conn, changed)
        with engine.connect() as conn:
            assert trigger_drift(conn, changed) is None
            assert "stamp" in (trigger_drift(conn, Task) or "")
    finally:
        reg.dispose()
    with engine.begin() as conn:
        conn.exec_driver_sql('ALTER TABLE tasks DISABLE TRIGGER "rdb_transition_status_upd"')
        assert "rdb_transition_status_upd is disabled" in (trigger_drift(conn, Task) or "")
        conn.exec_driver_sql('DROP TRIGGER "rdb_transition_status_ins" ON tasks')
        assert "rdb_transition_status_ins is missing" in (trigger_drift(conn, Task) or "")
        uninstall_transition_trigger(conn, Task)
        drift = trigger_drift(conn, Task)
        assert drift is not None
        assert drift.count("missing") == 2
    with Session(engine) as s:
        install_transition_trigger(s, Task)
        s.commit()
        assert trigger_drift(s, Task) is None
    install_transition_trigger(engine, Task)  # idempotent, also from an Engine
    with engine.connect() as conn:
        assert trigger_drift(conn, Task) is None


def _mapped_guarded(
    reg: registry, name: str, table: str, column: str, schema: str | None = None
) -> Any:
    return reg.mapped(
        type(
            name,
            (),
            {
                "__tablename__": table,
                "__table_args__": {"schema": schema},
                "__transitions__": TransitionRules(
                    column=column, transitions={"new": {"done"}}, initial={"new"}
                ),
                "id": mapped_column(sa.Integer, primary_key=True),
                column: mapped_column(sa.String(10)),
            },
        )
    )


@pytest.fixture
def colliding(engine: sa.Engine) -> Iterator[list[Any]]:
    """Models whose trigger functions shared a name before: ``a_b``.``c`` and ``a``.``b_c`` (both
    ``rdb_transition_a_b_c``), and ``x``.``y_z``.``z`` beside ``x_y``.``z``.``z``."""
    reg = registry()
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE SCHEMA x; CREATE SCHEMA x_y")
    models = [
        _mapped_guarded(reg, "AB", "a_b", "c"),
        _mapped_guarded(reg, "A", "a", "b_c"),
        _mapped_guarded(reg, "XYZ", "y_z", "z", schema="x"),
        _mapped_guarded(reg, "XYZ2", "z", "z", schema="x_y"),
    ]
    reg.metadata.create_all(engine)
    yield models
    reg.dispose()


def _writes_are_guarded(engine: sa.Engine, model: Any) -> None:
    table = _table(model)
    column = table.c[model.__transitions__.column]
    with engine.begin() as conn:
        conn.execute(table.insert().values({"id": 1, column.key: "new"}))
        conn.execute(table.update().values({column.key: "done"}))
    with engine.connect() as conn:
        err = _db_error(lambda: conn.execute(table.update().values({column.key: "new"})))
        assert (err.model, err.column, err.from_state, err.to_state) == (
            model.__name__,
            column.key,
            "done",
            "new",
        )
        conn.rollback()
        err = _db_error(lambda: conn.execute(table.insert().values({"id": 2, column.key: "done"})))
        assert err.to_state == "done"


_FN = "{function}()"


@pytest.mark.parametrize(
    ("tamper", "said"),
    [
        (
            ['ALTER TABLE tasks ENABLE REPLICA TRIGGER "rdb_transition_status_upd"'],
            "rdb_transition_status_upd fires only in sessions replaying replication",
        ),
        (
            ['ALTER TABLE tasks ENABLE ALWAYS TRIGGER "rdb_transition_status_upd"'],
            "rdb_transition_status_upd is set to fire ALWAYS",
        ),
        (
            [
                'DROP TRIGGER "rdb_transition_status_upd" ON tasks',
                'CREATE TRIGGER "rdb_transition_status_upd" AFTER UPDATE ON tasks '
                f"FOR EACH ROW WHEN (false) EXECUTE FUNCTION {_FN}",
            ],
            "rdb_transition_status_upd is not the one install creates",
        ),
        (
            [
                'DROP TRIGGER "rdb_transition_status_upd" ON tasks',
                'CREATE TRIGGER "rdb_transition_status_upd" AFTER UPDATE OF id ON tasks '
                f"FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) "
                f"EXECUTE FUNCTION {_FN}",
            ],
            "rdb_transition_status_upd is not the one install creates",
        ),
        (
            [
                'DROP TRIGGER "rdb_transition_status_ins" ON tasks',
                'CREATE TRIGGER "rdb_transition_status_ins" BEFORE INSERT ON tasks '
                f"FOR EACH ROW EXECUTE FUNCTION {_FN}",
            ],
            "rdb_transition_status_ins is not the one install creates",
        ),
        (
            [
                f"CREATE OR REPLACE FUNCTION {_FN} RETURNS trigger LANGUAGE plpgsql "
                "SET search_path = pg_catalog, pg_temp AS $$BEGIN RETURN NULL; END$$"
            ],
            "(its body or settings were changed, its stamp kept)",
        ),
        (
            [f"ALTER FUNCTION {_FN} SECURITY DEFINER"],
            "(its body or settings were changed, its stamp kept)",
        ),
    ],
    ids=["replica", "always", "when-false", "update-of", "before", "body", "definer"],
)
def test_drift_notices_a_guard_switched_off_behind_its_back(
    engine: sa.Engine, tamper: list[str], said: str
) -> None:
    """Each of these leaves the trigger's names and the function's stamp as installed: the
    drift check compares the triggers' definitions and the function's source too, so the
    startup install (which installs only on drift) puts the guard back."""
    function = trigger_names(guards_of(Task)[0]).function
    _add_task(engine, "completed")
    with engine.begin() as conn:
        for statement in tamper:
            conn.exec_driver_sql(statement.replace(_FN, f"{function}()"))
    with engine.connect() as conn:
        drift = trigger_drift(conn, Task)
    assert drift is not None
    assert said in drift
    install_transition_trigger(engine, Task)  # the startup call
    with engine.connect() as conn:
        assert trigger_drift(conn, Task) is None
        _db_error(lambda: conn.exec_driver_sql("UPDATE tasks SET status = 'pending'"))


class _TenantBase(DeclarativeBase):
    pass


class TenantTask(_TenantBase):
    __tablename__ = "tasks"
    __table_args__ = ({"schema": "tenant"},)
    __transitions__ = TransitionRules(
        column="status", transitions={"pending": {"done"}}, initial={"pending"}
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20))


def test_a_connection_translating_the_models_schema_is_refused(engine: sa.Engine) -> None:
    """Install, uninstall and drift send text naming the table as the model declares it: through
    a connection whose schema_translate_map moves it, they would act on another table than the
    connection's queries (the tenant's table unguarded, drift None). Refused, nothing sent."""
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE SCHEMA tenant; CREATE SCHEMA t1")
    _TenantBase.metadata.create_all(engine)
    translated = engine.execution_options(schema_translate_map={"tenant": "t1"})
    _TenantBase.metadata.create_all(translated)
    said = "does not follow schema_translate_map: this connection maps the schema 'tenant'"
    with pytest.raises(ValueError, match=said):
        install_transition_trigger(translated, TenantTask)
    with translated.connect() as conn:
        for call in (install_transition_trigger, uninstall_transition_trigger, trigger_drift):
            with pytest.raises(ValueError, match=said):
                call(conn, TenantTask)
    with Session(translated) as session, pytest.raises(ValueError, match=said):
        install_transition_trigger(session, TenantTask)
    count = (
        "SELECT count(*) FROM pg_trigger WHERE tgrelid IN ('tenant.tasks'::regclass, "
        "'t1.tasks'::regclass)"
    )
    with engine.connect() as conn:
        assert conn.exec_driver_sql(count).scalar() == 0
    # a map that leaves the model's schema alone changes nothing
    other = engine.execution_options(schema_translate_map={"elsewhere": "t1", None: "public"})
    with other.begin() as conn:
        install_transition_trigger(conn, TenantTask)
        assert trigger_drift(conn, TenantTask) is None
        assert conn.exec_driver_sql(count).scalar() == 2


def test_models_whose_old_function_names_collide_keep_their_own_triggers(
    engine: sa.Engine, colliding: list[Any]
) -> None:
    with engine.begin() as conn:
        for model in colliding:
            install_transition_trigger(conn, model)
    for model in colliding:
        _writes_are_guarded(engine, model)  # a_b failed with 42703 once a's function replaced it
    with engine.connect() as conn:
        for model in colliding:
            assert trigger_drift(conn, model) is None


def _install_under_the_old_names(conn: sa.Connection, model: Any) -> None:
    """What earlier releases installed: the same triggers, calling rdb_transition_<table>_<col>."""
    uninstall_transition_trigger(conn, model)
    for guard in guards_of(model):
        n = trigger_names(guard)
        for stmt in install_statements(guard):
            if not stmt.startswith("DO "):
                conn.exec_driver_sql(stmt.replace(n.function_name, n.legacy_function_name))


def _functions(conn: sa.Connection, like: str) -> set[str]:
    query = sa.text("SELECT proname::text FROM pg_proc WHERE proname LIKE :p")
    return set(conn.execute(query, {"p": like}).scalars())


def test_an_install_under_the_old_names_is_drift_and_is_upgraded_in_place(
    engine: sa.Engine, colliding: list[Any]
) -> None:
    ab, a = colliding[:2]
    with engine.begin() as conn:
        _install_under_the_old_names(conn, Task)
        _install_under_the_old_names(conn, ab)
        _install_under_the_old_names(conn, a)  # replaces the function a_b's triggers call
        for model in (Task, ab, a):
            drift = trigger_drift(conn, model) or ""
            assert drift.count("is installed under an older name") == 2, drift
            assert "run install_transition_trigger again" in drift
        install_transition_trigger(conn, ab)
        assert trigger_drift(conn, ab) is None
        # a's triggers still call the shared old function: it stays until a is reinstalled
        assert "rdb_transition_a_b_c" in _functions(conn, "rdb_transition_a_b_c%")
        install_transition_trigger(conn, a)
        install_transition_trigger(conn, Task)
        old = {"rdb_transition_a_b_c", "rdb_transition_tasks_status"}
        assert not old & _functions(conn, "rdb_transition_%")
        for model in (Task, ab, a):
            assert trigger_drift(conn, model) is None
    _writes_are_guarded(engine, ab)
    _writes_are_guarded(engine, a)
    with engine.begin() as conn:  # an uninstall after an old install removes the old function
        _install_under_the_old_names(conn, Task)
        uninstall_transition_trigger(conn, Task)
        assert _functions(conn, "rdb_transition_tasks%") == set()


def test_install_and_bypass_through_a_resilient_factorys_session(engine: sa.Engine) -> None:
    """Statements sent without parameters (the install's, the bypass's) go through the engine
    hooks of a resilient factory (its ``do_execute_no_params`` listener) like any other."""
    import resilient_db as rdb  # noqa: PLC0415 - the public factory, only here

    task_id = _add_task(engine, "completed")
    factory = rdb.ResilientSession(engine, service="install-through-factory")
    with factory() as session:
        install_transition_trigger(session, Task)
        bypass_transitions(session, reason="reopen through the factory")
        session.execute(sa.text(f"UPDATE tasks SET status = 'pending' WHERE id = {task_id}"))
        session.commit()
        assert trigger_drift(session, Task) is None
    assert _db_status(engine, task_id) == "pending"


def test_drift_when_table_missing(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE docs")
        assert "table does not exist" in (trigger_drift(conn, Doc) or "")


def test_alembic_op_online_and_offline(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        op = Operations(MigrationContext.configure(conn))
        uninstall_transition_trigger(op, Hostile)
        assert trigger_drift(conn, Hostile) is not None
        install_transition_trigger(op, Hostile)
        assert trigger_drift(conn, Hostile) is None
    buffer = io.StringIO()
    offline = MigrationContext.configure(
        dialect_name="postgresql",
        opts={"as_sql": True, "output_buffer": buffer},
        dialect_opts={"paramstyle": "named"},
    )
    install_transition_trigger(Operations(offline), Hostile)
    script = buffer.getvalue()
    expected = transition_trigger_sql(Hostile)
    for statement in expected.split(";\n\n"):
        assert statement.strip().rstrip(";") in script


class _ColonBase(DeclarativeBase):
    pass


_COLON_STATES = ("review :ab:cd", "a::b", "end:", ":start", "back\\:slash", "x :y z:")


class Colons(_ColonBase):
    __tablename__ = "col:ons"
    __transitions__ = TransitionRules(
        column="st:ate", transitions={"new": set(_COLON_STATES)}, initial={"new"}
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    state: Mapped[str] = mapped_column("st:ate", sa.String(40))


def test_alembic_offline_script_carries_every_colon(engine: sa.Engine) -> None:
    """Offline, the statements go through text() and are written out: a ``:word:`` in a state
    (or a name) came out with a backslash in it, and the declared move was refused."""
    buffer = io.StringIO()
    offline = MigrationContext.configure(
        dialect_name="postgresql",
        opts={"as_sql": True, "output_buffer": buffer},
        dialect_opts={"paramstyle": "named"},
    )
    install_transition_trigger(Operations(offline), Colons)
    script = buffer.getvalue()
    for statement in transition_trigger_sql(Colons).split(";\n\n"):
        assert statement.strip().rstrip(";") in script
    _ColonBase.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(script, execution_options={"no_parameters": True})
    table = _table(Colons)
    column = table.c["st:ate"]
    with engine.connect() as conn:
        assert trigger_drift(conn, Colons) is None
        for number, state in enumerate(_COLON_STATES):
            conn.execute(table.insert().values({table.c.id: number, column: "new"}))
            conn.execute(table.update().where(table.c.id == number).values({column: state}))
        conn.commit()


def test_row_keys_reach_the_logs_only_when_the_operator_opts_in(
    engine: sa.Engine, log: pytest.LogCaptureFixture
) -> None:
    """A key can be personal data (an e-mail address): it stays in the exception, and reaches
    the log line only with SELF_HEALING_LOG_ROW_KEYS=true."""
    from resilient_db._config import load_config  # noqa: PLC0415

    task_id = _add_task(engine, "completed")
    for opted_in in (False, True):
        log.clear()
        with _factory(engine, log_row_keys=opted_in)() as s:
            task = s.get(Task, task_id)
            assert task is not None
            task.status = "pending"
            with pytest.raises(IllegalTransitionError) as info:
                s.flush()
        assert info.value.pk == task_id
        [record] = [r for r in log.records if r.name == LOGGER]
        assert (f"Task(pk={task_id})" in record.getMessage()) is opted_in
        assert ("pk" in record.self_heal) is opted_in
    assert load_config({"SELF_HEALING_LOG_ROW_KEYS": "true"}).log_row_keys


def test_control_characters_from_outside_cannot_forge_a_log_line(
    engine: sa.Engine, log: pytest.LogCaptureFixture
) -> None:
    """A state (or a database error's text, or a reason) with a line break is escaped: one
    record, one line, no fake second [SELF-HEAL] line."""
    from resilient_db.transitions._report import report  # noqa: PLC0415

    forged = "pending\n[SELF-HEAL] Circuit breaker closed: service=database recovered"
    err = IllegalTransitionError(
        model="Task",
        pk=1,
        column="status",
        from_state="completed",
        to_state=forged,
        via="db",
        reason="detail\r\nwith\x1b[31m escapes",
    )
    report(err, Config())
    [record] = [r for r in log.records if r.name == LOGGER]
    text = record.getMessage()
    for control in ("\n", "\r", "\x1b", "\u2028"):
        assert control not in text
    assert text.count("[SELF-HEAL]") == 2  # the real prefix, and the forged one inside quotes
    assert text.startswith("[SELF-HEAL] Status transition blocked")
