"""The pure parts of the transition guard, with no server: rule validation, the trigger's SQL
text (names, quoting, stamps), diagrams and the mapping of the trigger's error back.

Models are mapped in throwaway registries; nothing here connects to a database. The layering
test keeps it that way: the pure modules import nothing that needs a server or a session.
"""

from __future__ import annotations

import ast
import enum
import json
import pickle
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import column_property, mapped_column, registry

from resilient_db import IllegalTransitionError
from resilient_db.transitions import (
    ANY_STATE,
    BYPASS_ROLE,
    BYPASS_SETTING,
    TRANSITION_SQLSTATE,
    TransitionRules,
    TransitionRulesError,
    allowed_transitions,
    rules_to_dot,
    rules_to_mermaid,
    transition_rules,
    transition_trigger_drop_sql,
    transition_trigger_sql,
)
from resilient_db.transitions._dbmap import exception_from_db
from resilient_db.transitions._rules import guards_of, one_guard
from resilient_db.transitions._sql import (
    _dollar_quote,
    drop_statements,
    function_name,
    ident,
    install_statements,
    literal,
    pg_name,
    rules_stamp,
    trigger_names,
)

PACKAGE = Path(__file__).resolve().parent.parent / "resilient_db" / "transitions"

Mapper = Callable[..., type[Any]]


class Phase(enum.Enum):
    draft = "Draft"
    review = "In review"
    done = "Done"


@pytest.fixture
def mapped() -> Iterator[Mapper]:
    """Map a model in a registry of its own (disposed of after the test)."""
    registries: list[registry] = []

    def make(
        rules: Any,
        *,
        column: str = "status",
        type_: Any = None,
        table: str = "items",
        schema: str | None = None,
        name: str = "Item",
        nullable: bool = False,
        composite_pk: bool = False,
        default: Any = None,
        onupdate: Any = None,
    ) -> type[Any]:
        reg = registry()
        registries.append(reg)
        attrs: dict[str, Any] = {
            "__tablename__": table,
            "__table_args__": {"schema": schema},
            "__transitions__": rules,
            "id": mapped_column(sa.Integer, primary_key=True),
            column: mapped_column(
                type_ if type_ is not None else sa.String(40),
                nullable=nullable,
                default=default,
                onupdate=onupdate,
            ),
        }
        if composite_pk:
            attrs["region"] = mapped_column(sa.String(2), primary_key=True)
        return reg.mapped(type(name, (), attrs))

    yield make
    for reg in registries:
        reg.dispose()


def _rules(transitions: Any, initial: Any, column: str = "status", **kw: Any) -> TransitionRules:
    return TransitionRules(column=column, transitions=transitions, initial=initial, **kw)


# ------------------------------------------------------------------------------------------------
# layering: the pure modules need no server and no session
# ------------------------------------------------------------------------------------------------

PURE = ("_rules", "_sql", "_diagrams", "_report", "_dbmap")
# each module imports only package modules listed before it
ORDER = (
    "_rules",
    "_sql",
    "_diagrams",
    "_report",
    "_dbmap",
    "_install",
    "_bypass",
    "_changes",
    "_flush",
    "_bulk",
    "_guards",
)


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(package modules imported, every imported name) of ``transitions/<module>.py``."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    siblings: set[str] = set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.update(alias.name for alias in node.names)
            if node.level == 1 and node.module:
                siblings.add(node.module)
            elif node.module:
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return siblings, names


def test_the_package_has_the_modules_of_the_layout() -> None:
    found = {p.stem for p in PACKAGE.glob("_*.py") if p.stem != "__init__"}
    assert found == set(ORDER)


@pytest.mark.parametrize("module", ORDER)
def test_modules_import_only_those_below_them(module: str) -> None:
    siblings, _ = _imports(module)
    assert siblings <= set(ORDER[: ORDER.index(module)]), siblings


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_need_no_server_or_session(module: str) -> None:
    _, names = _imports(module)
    forbidden = {
        "Session",
        "Connection",
        "Engine",
        "AsyncSession",
        "sqlalchemy.engine",
        "sqlalchemy.ext.asyncio",
        "resilient_db._registry",
        "resilient_db._unit",
        "resilient_db._session",
        "resilient_db._asyncio",
        "resilient_db._commit",
    }
    assert not names & forbidden, names & forbidden


# ------------------------------------------------------------------------------------------------
# rules: validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"transitions": {1.5: {"a"}}}, r"transitions contains 1\.5 of type float"),
        ({"transitions": {True: {"a"}}}, r"contains True of type bool"),
        ({"transitions": {"a": {b"b"}}}, r"states must be str, int or enum\.Enum"),
        ({"transitions": {"a": b"b"}}, r"transitions\['a'\] must be a set of states"),
        ({"initial": {"*"}}, r"initial contains '\*'; the wildcard may only be used as a source"),
        ({"initial": Phase.draft}, r"initial must be a set of states.*write e\.g\."),
        ({"states": "abc"}, r"states must be a set of states"),
        ({"states": {"a\x00"}}, r"NUL character"),
        ({"column": None}, r"column must be the name of the status attribute, got None"),
        ({"transitions": None}, r"transitions must be a mapping .* got NoneType"),
        # a mapping where a set belongs: its values were dropped unseen (b -> c here)
        ({"transitions": {"a": {"b": {"c"}}}}, r"transitions\['a'\] .* got a dict .* unseen"),
        ({"initial": {"a": True}}, r"initial must be a set of states, got a dict"),
        # None as "no moves" is no set: the hint said {None}, a move to NULL
        (
            {"transitions": {"a": {"b"}, "b": None}},
            r"transitions\['b'\] .* got None; write set\(\)",
        ),
    ],
)
def test_rules_name_the_column_and_the_bad_value(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"column": "status", "transitions": {"a": {"b"}}, "initial": {"a"}}
    args.update(kwargs)
    with pytest.raises(TransitionRulesError, match=message):
        TransitionRules(**args)


def test_rules_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="initial is empty"):
        _rules({"a": {"b"}}, set())


def test_rules_expand_the_wildcard_and_ignore_self_moves() -> None:
    rules = _rules({"a": {"a", "b"}, ANY_STATE: {"x"}, "x": {"a"}}, {"a"})
    assert rules.declared_states == {"a", "b", "x"}
    assert rules.next_states("a") == {"b", "x"}  # a -> a is no transition
    assert rules.next_states("b") == {"x"}
    assert rules.next_states("x") == {"a"}  # the wildcard does not add x -> x
    assert rules.next_states("unknown") == frozenset()


def test_compiled_rules_are_checked_against_the_mapping(mapped: Mapper) -> None:
    with pytest.raises(TransitionRulesError, match=r"Item declares no __transitions__"):
        guards_of(mapped(None))
    with pytest.raises(TypeError, match="is not a mapped class or instance"):
        guards_of(object())
    model = mapped(_rules({"a": {"b"}}, {"a"}))
    # (the columns it guards named: the message said only which one it does not)
    with pytest.raises(
        TransitionRulesError,
        match=r"^Item declares no transitions for column 'nope'; it guards 'status'$",
    ):
        one_guard(model, "nope")
    with pytest.raises(TransitionRulesError, match=r"a sequence of them; found 'not rules'"):
        guards_of(mapped([_rules({"a": {"b"}}, {"a"}), "not rules"], table="other"))


@pytest.mark.parametrize(
    ("type_", "default"),
    [(sa.String(40), "b"), (sa.String(40), "zzz"), (sa.Enum("a", "b", name="ab"), "c")],
)
def test_a_python_default_that_is_no_initial_state_is_refused_at_mapping(
    mapped: Mapper, type_: Any, default: str
) -> None:
    """As a ``server_default`` is: every row added without a status would start in it, which
    the flush guard refuses (it was found only then, at the first insert)."""
    rules = _rules({"a": {"b"}}, {"a"})
    with pytest.raises(
        TransitionRulesError,
        match=rf"Item\.__transitions__ \(column 'status'\): the column's default {default!r} "
        r"is not an initial state \('a'\)",
    ):
        guards_of(mapped(rules, type_=type_, table=f"d_{default}", default=default))
    assert guards_of(mapped(rules, type_=type_, table="d_ok", default="a"))[0].initial == {"a"}


@pytest.mark.parametrize(
    ("type_", "onupdate"),
    [(sa.String(40), "zzz"), (sa.Enum("a", "b", name="ab"), "c")],
)
def test_an_onupdate_that_is_no_state_is_refused_at_mapping(
    mapped: Mapper, type_: Any, onupdate: str
) -> None:
    """A status column's ``onupdate`` value is what every UPDATE of a row that leaves the status
    out writes: one that is no state of the rules made each such UPDATE (an edit of another
    column) an illegal move, refused by the flush guard (found only then, at the first edit).
    One that is a state is taken: a move into it is judged from where the row is."""
    rules = _rules({"a": {"b"}, "b": {"a"}}, {"a"})
    with pytest.raises(
        TransitionRulesError,
        match=rf"Item\.__transitions__ \(column 'status'\): the column's onupdate {onupdate!r} "
        r"is no state of the rules \('a', 'b'\)",
    ):
        guards_of(mapped(rules, type_=type_, table=f"u_{onupdate}", onupdate=onupdate))
    taken = guards_of(mapped(rules, type_=sa.String(40), table="u_ok", onupdate="a"))[0]
    assert taken.onupdate is not None


@pytest.mark.parametrize(
    "type_", [sa.JSON(), postgresql.JSONB(), sa.ARRAY(sa.String()), sa.LargeBinary()]
)
def test_a_column_of_structured_or_binary_values_is_refused_at_mapping(
    mapped: Mapper, type_: Any
) -> None:
    """Such a column's text is no state as declared (a JSON string 'a' is '"a"'): the session
    guards let the moves through and the trigger refused every write, the first insert too."""
    with pytest.raises(
        TransitionRulesError,
        match=r"Item\.__transitions__ \(column 'status'\): the column's type .* holds "
        r"structured or binary values",
    ):
        guards_of(mapped(_rules({"a": {"b"}}, {"a"}), type_=type_))


def test_a_column_mapped_to_an_expression_is_refused() -> None:
    reg = registry()
    try:
        table = sa.Table(
            "exprs",
            reg.metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("n", sa.Integer),
        )
        attrs = {
            "__table__": table,
            "__transitions__": _rules({"1": {"2"}}, {"1"}, column="label"),
            "label": column_property(sa.cast(table.c.n, sa.String)),
        }
        with pytest.raises(TransitionRulesError, match="mapped to a SQL expression"):
            guards_of(reg.mapped(type("Expr", (), attrs)))
    finally:
        reg.dispose()


def test_states_are_compared_by_their_database_spelling(mapped: Mapper) -> None:
    model = mapped(
        _rules({Phase.draft: {Phase.review}, Phase.review: {Phase.done}}, {Phase.draft}, "phase"),
        column="phase",
        type_=sa.Enum(Phase, name="phase"),
    )
    (guard,) = guards_of(model)
    # an Enum column stores the member's name: 'draft', not 'Draft'
    assert guard.key(Phase.draft) == guard.key("draft") == "draft"
    assert guard.legal(guard.key("draft"), guard.key(Phase.review))
    assert not guard.legal(guard.key(Phase.draft), guard.key(Phase.done))
    assert guard.state("review") is Phase.review
    assert guard.key("no such member") not in guard.next  # never equal to a real key
    assert allowed_transitions(model()) == {Phase.draft}  # a new row: the initial states
    assert transition_rules(model) == (model.__transitions__,)


# ------------------------------------------------------------------------------------------------
# SQL: quoting and names
# ------------------------------------------------------------------------------------------------


def _unquote(sql: str) -> str:
    """What PostgreSQL reads from a literal that :func:`literal` wrote."""
    if sql.startswith("E'"):
        body = sql[2:-1].replace("''", "'")
        return re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), body)
    assert sql.startswith("'")
    assert sql.endswith("'")
    return sql[1:-1].replace("''", "'")


@pytest.mark.parametrize(
    ("value", "sql"),
    [
        ("pending", "'pending'"),
        ("it's", "'it''s'"),
        ("", "''"),
        ("ünï ☃", "'ünï ☃'"),
        ("%s $$ $rdb$ a:", "'%s $$ $rdb$ a:'"),  # nothing special to PostgreSQL here
        # text() (op.execute) would take :name for a bind parameter, inside quotes too
        ("%s :name", "E'%s \\x3aname'"),
        ("a::int", "E'a:\\x3aint'"),
        ("back\\slash", "E'back\\x5cslash'"),
        ("tab\there", "E'tab\\x09here'"),
        ("new\nline 'q'", "E'new\\x0aline ''q'''"),
        ("del\x7f", "E'del\\x7f'"),
    ],
)
def test_literals_mean_the_value_whatever_the_settings(value: str, sql: str) -> None:
    assert literal(value) == sql
    assert _unquote(sql) == value
    assert re.fullmatch(r"(?:[^\\]|\\x[0-9a-f]{2})*", sql)  # every backslash starts a \xHH
    assert not any(ord(ch) < 32 for ch in sql)  # no control character in the SQL text
    assert not sa.text(f"SELECT {sql}").compile().params  # no bind parameter seen by text()


def test_nul_has_no_spelling_in_postgres() -> None:
    with pytest.raises(TransitionRulesError, match="NUL"):
        literal("a\x00b")
    with pytest.raises(TransitionRulesError, match="NUL"):
        ident("a\x00b")


def test_identifiers_are_always_double_quoted() -> None:
    assert ident("status") == '"status"'
    assert ident('we"ird; drop') == '"we""ird; drop"'
    assert ident("Mixed Case") == '"Mixed Case"'


def test_dollar_quote_picks_a_tag_the_body_does_not_contain() -> None:
    assert _dollar_quote("body") == "$rdb$body$rdb$"
    assert _dollar_quote("a $rdb$ b $rdb1$") == "$rdb2$a $rdb$ b $rdb1$$rdb2$"


@pytest.mark.parametrize(
    "parts",
    [
        ("rdb_transition", "t" * 70, "s" * 60),
        ("rdb_transition", "ü" * 40, "x"),  # two bytes each: cut on a character boundary
        ("rdb_transition", "☃" * 30, "ins"),
    ],
)
def test_long_names_fit_63_bytes_and_stay_distinct(parts: tuple[str, ...]) -> None:
    name = pg_name(*parts)
    assert len(name.encode()) <= 63
    assert name.startswith("rdb_transition_")
    assert re.fullmatch(r".*_[0-9a-f]{10}", name)
    name.encode().decode()  # valid UTF-8
    assert pg_name(*parts) == name  # deterministic
    assert pg_name(*parts[:-1], parts[-1] + "!") != name  # the hash covers the whole name


def test_short_names_are_kept_as_they_are() -> None:
    assert pg_name("rdb_transition", "tasks", "status") == "rdb_transition_tasks_status"
    exact = "a" * 63
    assert pg_name(exact) == exact


def test_trigger_names_of_a_schema_qualified_table(mapped: Mapper) -> None:
    model = mapped(_rules({"a": {"b"}}, {"a"}), table='jo"bs', schema="audit")
    (guard,) = guards_of(model)
    names = trigger_names(guard)
    assert names.table == '"audit"."jo""bs"'
    assert names.function == '"audit"."rdb_transition_jo""bs_status_704b3df1d23d"'
    assert names.function_name == 'rdb_transition_jo"bs_status_704b3df1d23d'
    assert names.legacy_function_name == 'rdb_transition_jo"bs_status'
    assert (names.insert_trigger, names.update_trigger) == (
        "rdb_transition_status_ins",
        "rdb_transition_status_upd",
    )


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ((None, "a_b", "c"), (None, "a", "b_c")),  # the same old name rdb_transition_a_b_c
        (("x", "y_z", "s"), ("x_y", "z", "s")),  # schema and table run together
        (("x", "t", "s"), ("y", "t", "s")),  # same table and column in two schemas
        ((None, "t", "s"), ("public", "t", "s")),
        ((None, "t" * 60, "s"), (None, "t" * 60, "s2")),  # past the cut, only the hash differs
    ],
)
def test_function_names_are_unique_per_schema_table_and_column(
    one: tuple[str | None, str, str], other: tuple[str | None, str, str]
) -> None:
    assert function_name(*one) != function_name(*other)


def test_function_names_are_the_same_in_every_process() -> None:
    """A name is found again by the process that drops or replaces the function (another
    release's, too): a hash of the triple's text, no per-process salt (``hash()``) or order."""
    assert function_name(None, "a_b", "c") == "rdb_transition_a_b_c_13181d152df9"
    assert function_name(None, "a", "b_c") == "rdb_transition_a_b_c_45baa231d39f"
    assert function_name("x", "t", "s") == "rdb_transition_t_s_df8502fe893b"


def test_colliding_models_get_different_functions(mapped: Mapper) -> None:
    """``a_b``.``c`` and ``a``.``b_c`` used to share rdb_transition_a_b_c: installing the second
    replaced the first, and every write to ``a_b`` then failed with 42703."""
    rules = _rules({"a": {"b"}}, {"a"}, "c")
    (one,) = guards_of(mapped(rules, table="a_b", column="c"))
    (other,) = guards_of(mapped(_rules({"a": {"b"}}, {"a"}, "b_c"), table="a", column="b_c"))
    assert trigger_names(one).legacy_function_name == trigger_names(other).legacy_function_name
    assert trigger_names(one).function_name != trigger_names(other).function_name
    (sx,) = guards_of(mapped(_rules({"a": {"b"}}, {"a"}, "z"), table="y_z", schema="x", column="z"))
    (sy,) = guards_of(mapped(_rules({"a": {"b"}}, {"a"}, "z"), table="z", schema="x_y", column="z"))
    assert trigger_names(sx).function_name != trigger_names(sy).function_name


@pytest.mark.parametrize(
    ("schema", "table", "column"),
    [
        (None, "tasks", "status"),
        ("s" * 63, "t" * 63, "c" * 63),
        (None, "ü" * 31, "x"),  # two bytes each: cut on a character boundary
        ("☃", "☃" * 21, "☃" * 21),  # three bytes each
        (None, "a" * 34, "é"),  # the cut falls inside the last character
    ],
)
def test_function_names_fit_63_bytes(schema: str | None, table: str, column: str) -> None:
    name = function_name(schema, table, column)
    assert len(name.encode()) <= 63
    assert re.fullmatch(r"rdb_transition_.*_[0-9a-f]{12}", name, re.DOTALL)
    assert name.encode().decode() == name  # valid UTF-8
    readable = name[len("rdb_transition_") : -13]
    assert f"{table}_{column}".startswith(readable)


# ------------------------------------------------------------------------------------------------
# SQL: the trigger script for several rule sets
# ------------------------------------------------------------------------------------------------

JOBS_SQL = """\
DO $rdb$
BEGIN
    IF pg_catalog.to_regrole('resilient_db_bypass') IS NULL THEN
        BEGIN
            CREATE ROLE "resilient_db_bypass" NOLOGIN;
            COMMENT ON ROLE "resilient_db_bypass" IS 'resilient_db: roles granted this one \
may bypass the status-transition triggers, one transaction at a time, through resilient_db \
bypass_transitions()';
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL;
            WHEN insufficient_privilege THEN
                RAISE WARNING USING
                    MESSAGE = 'role resilient_db_bypass does not exist and this role may not \
create it: the transition triggers are installed, and refuse every bypass until it exists',
                    HINT = 'Run CREATE ROLE resilient_db_bypass NOLOGIN as a role with \
CREATEROLE';
        END;
    END IF;
END
$rdb$;

DO $rdb1$
BEGIN
CREATE OR REPLACE FUNCTION "rdb_transition_jobs_state_b53b700df013"() RETURNS trigger \
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $rdb$
DECLARE
    v_from text;
    v_to text := NEW."state"::text;
    v_pk json;
    v_bypass text;
    v_reason text;
    v_role oid;
    v_schema text;
    v_table text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF coalesce(v_to IN ('new'), false) THEN
            RETURN NULL;
        END IF;
        v_pk := json_build_object('id', NEW."id");
    ELSE
        v_from := OLD."state"::text;
        IF v_from IS NOT DISTINCT FROM v_to THEN
            RETURN NULL;
        END IF;
        IF (v_from IS NOT DISTINCT FROM 'new' AND coalesce(v_to IN ('run'), false))
            OR (v_from IS NOT DISTINCT FROM 'run' AND coalesce(v_to IN ('done', 'new'), \
false)) THEN
            RETURN NULL;
        END IF;
        v_pk := json_build_object('id', OLD."id");
    END IF;
    SELECT n.nspname::text, c.relname::text INTO v_schema, v_table
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = coalesce(pg_partition_root(TG_RELID), TG_RELID);
    v_bypass := current_setting('resilient_db.bypass_transitions', true);
    IF v_bypass <> '' AND v_bypass = pg_current_xact_id()::text THEN
        v_role := to_regrole('resilient_db_bypass');
        IF pg_catalog.pg_has_role(current_user, v_role, 'USAGE') AND \
(pg_catalog.pg_has_role(session_user, v_role, 'USAGE') OR CASE WHEN \
pg_catalog.current_setting('server_version_num')::integer >= 160000 THEN \
pg_catalog.pg_has_role(session_user, v_role, 'SET') ELSE \
pg_catalog.pg_has_role(session_user, v_role, 'MEMBER') END) THEN
            -- the audit, on the server: every move let through, whoever set the value
            v_reason := current_setting('resilient_db.bypass_reason', true);
            RAISE LOG USING
                MESSAGE = format('resilient_db: status transition guard bypassed: %s.%s %s '
                                 '%s -> %s by role %s (logged in as %s), reason: %s',
                    v_table, 'state', v_pk,
                    CASE WHEN TG_OP = 'INSERT' THEN '(new row)'
                         ELSE coalesce(quote_literal(v_from), 'NULL') END,
                    coalesce(quote_literal(v_to), 'NULL'),
                    quote_ident(current_user), quote_ident(session_user),
                    CASE WHEN coalesce(v_reason, '') = ''
                         THEN 'none given (the bypass was not asked for through \
bypass_transitions())'
                         ELSE quote_literal(v_reason) END),
                DETAIL = json_build_object(
                    'resilient_db', 'transition_bypassed', 'model', 'Job',
                    'schema', v_schema, 'table', v_table, 'column', 'state',
                    'op', TG_OP, 'from', v_from, 'to', v_to, 'pk', v_pk,
                    'role', current_user, 'login_role', session_user,
                    'xid', v_bypass, 'reason', nullif(v_reason, ''))::text;
            RETURN NULL;
        END IF;
        RAISE EXCEPTION USING
            ERRCODE = 'insufficient_privilege',
            MESSAGE = format('transition guard bypass refused: %s',
                CASE WHEN v_role IS NULL THEN 'role resilient_db_bypass does not exist'
                     ELSE format('role %s (logged in as %s) may not bypass: it needs to be '
                                 'granted resilient_db_bypass', quote_ident(current_user),
                                 quote_ident(session_user)) END),
            HINT = 'A database administrator grants the bypass with GRANT resilient_db_bypass \
TO <role> (CREATE ROLE resilient_db_bypass NOLOGIN first if it does not exist); it is then \
asked for with resilient_db bypass_transitions(), within one transaction';
    END IF;
    RAISE EXCEPTION USING
        ERRCODE = 'RDB01',
        MESSAGE = format('Status transition blocked: %s.%s %s -> %s',
            v_table, 'state',
            CASE WHEN TG_OP = 'INSERT' THEN '(new row)'
                 ELSE coalesce(quote_literal(v_from), 'NULL') END,
            coalesce(quote_literal(v_to), 'NULL')),
        DETAIL = json_build_object(
            'resilient_db', 'transition', 'model', 'Job',
            'schema', v_schema, 'table', v_table, 'column', 'state',
            'op', TG_OP, 'from', v_from, 'to', v_to, 'pk', v_pk)::text,
        HINT = 'Allowed moves are declared in the __transitions__ of the model; '
            'for an audited repair use resilient_db bypass_transitions()',
        SCHEMA = TG_TABLE_SCHEMA, TABLE = TG_TABLE_NAME, COLUMN = 'state';
END
$rdb$;
COMMENT ON FUNCTION "rdb_transition_jobs_state_b53b700df013"() IS 'resilient_db transition \
guard v5 rules-sha256=184928a9ef0e5f045c6898167df67086cdc88f3f6cdc57de5b11eda78345e73f';
DECLARE
    v_rel pg_catalog.oid := pg_catalog.to_regclass('"jobs"')::pg_catalog.oid;
    v_own pg_catalog.oid := \
pg_catalog.to_regprocedure('"rdb_transition_jobs_state_b53b700df013"()')::pg_catalog.oid;
    r record;
BEGIN
    FOR r IN
        SELECT t.tgname::pg_catalog.text AS trigger, t.tgfoid AS fn,
               p.proname::pg_catalog.text AS function, s.nspname::pg_catalog.text AS schema,
               p.proowner AS owner
        FROM pg_catalog.pg_trigger t
        JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) t.tgfoid
        JOIN pg_catalog.pg_namespace s ON s.oid OPERATOR(pg_catalog.=) p.pronamespace
        WHERE t.tgrelid OPERATOR(pg_catalog.=) v_rel AND NOT t.tgisinternal
            AND pg_catalog.starts_with(pg_catalog.obj_description(t.tgfoid, 'pg_proc'), \
'resilient_db transition guard ')
            AND t.tgname::pg_catalog.text OPERATOR(pg_catalog.=) ANY \
(ARRAY['rdb_transition_state_ins', 'rdb_transition_state_upd']::pg_catalog.text[])
            AND (v_own IS NULL OR t.tgfoid OPERATOR(pg_catalog.<>) v_own)
    LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER %I ON %s', r.trigger, '"jobs"');
        -- a function this role may not drop (another role's, stamped like ours) stays: its
        -- trigger is gone, and the install must not fail on it
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_trigger WHERE tgfoid OPERATOR(pg_catalog.=) \
r.fn)
                AND pg_catalog.pg_has_role(r.owner, 'USAGE') THEN
            EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS %I.%I()', r.schema, r.function);
        END IF;
    END LOOP;
END;
DROP TRIGGER IF EXISTS "rdb_transition_state_ins" ON "jobs";
CREATE TRIGGER "rdb_transition_state_ins" AFTER INSERT ON "jobs"
FOR EACH ROW WHEN (NOT (coalesce(NEW."state"::pg_catalog.text COLLATE pg_catalog."C"
    OPERATOR(pg_catalog.=) ANY (ARRAY['new']::pg_catalog.text[]), false)))
EXECUTE FUNCTION "rdb_transition_jobs_state_b53b700df013"();
DROP TRIGGER IF EXISTS "rdb_transition_state_upd" ON "jobs";
CREATE TRIGGER "rdb_transition_state_upd" AFTER UPDATE ON "jobs"
FOR EACH ROW WHEN (NOT coalesce(OLD."state"::pg_catalog.text COLLATE pg_catalog."C"
    OPERATOR(pg_catalog.=) NEW."state"::pg_catalog.text COLLATE pg_catalog."C",
    OLD."state" IS NULL AND NEW."state" IS NULL))
EXECUTE FUNCTION "rdb_transition_jobs_state_b53b700df013"();
END
$rdb1$;

DO $rdb$
DECLARE
    v_old pg_catalog.regprocedure := \
pg_catalog.to_regprocedure('"rdb_transition_jobs_state"()');
BEGIN
    IF v_old IS NOT NULL
        AND pg_catalog.starts_with(pg_catalog.obj_description(v_old, 'pg_proc'), \
'resilient_db transition guard ')
        AND NOT EXISTS (SELECT FROM pg_catalog.pg_trigger WHERE tgfoid OPERATOR(pg_catalog.=) \
v_old::pg_catalog.oid)
        AND pg_catalog.pg_has_role((SELECT p.proowner FROM pg_catalog.pg_proc p WHERE p.oid \
OPERATOR(pg_catalog.=) v_old::pg_catalog.oid), 'USAGE') THEN
        DROP FUNCTION "rdb_transition_jobs_state"();
    END IF;
END
$rdb$;

DO $rdb$
DECLARE
    v_rel pg_catalog.oid := pg_catalog.to_regclass('"jobs"')::pg_catalog.oid;
    r record;
BEGIN
    IF v_rel IS NULL THEN
        RETURN;
    END IF;
    FOR r IN
        SELECT t.tgname::pg_catalog.text AS trigger, t.tgfoid AS fn,
               p.proname::pg_catalog.text AS function, s.nspname::pg_catalog.text AS schema,
               p.proowner AS owner
        FROM pg_catalog.pg_trigger t
        JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) t.tgfoid
        JOIN pg_catalog.pg_namespace s ON s.oid OPERATOR(pg_catalog.=) p.pronamespace
        WHERE t.tgrelid OPERATOR(pg_catalog.=) v_rel AND NOT t.tgisinternal
            AND pg_catalog.starts_with(pg_catalog.obj_description(t.tgfoid, 'pg_proc'), \
'resilient_db transition guard ')
            AND (pg_catalog.length(t.tgname::pg_catalog.text) OPERATOR(pg_catalog.>) 19
                AND pg_catalog.starts_with(t.tgname::pg_catalog.text, 'rdb_transition_')
                AND pg_catalog.right(t.tgname::pg_catalog.text, 4) OPERATOR(pg_catalog.=) ANY \
(ARRAY['_ins', '_upd']::pg_catalog.text[])
                AND NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a
                    WHERE a.attrelid OPERATOR(pg_catalog.=) v_rel AND a.attnum \
OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
                    AND a.attname::pg_catalog.text OPERATOR(pg_catalog.=)
                        pg_catalog.left(pg_catalog.substr(t.tgname::pg_catalog.text, 16), -4)))
    LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER %I ON %s', r.trigger, '"jobs"');
        -- a function this role may not drop (another role's, stamped like ours) stays: its
        -- trigger is gone, and the install must not fail on it
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_trigger WHERE tgfoid OPERATOR(pg_catalog.=) \
r.fn)
                AND pg_catalog.pg_has_role(r.owner, 'USAGE') THEN
            EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS %I.%I()', r.schema, r.function);
        END IF;
    END LOOP;
END
$rdb$;
"""


#: The removal's first statement: our triggers of the column, with the function of ours they call
#: (whichever its name: the table's schema written otherwise), and that function.
JOBS_TRIGGERS_DROP = """\
DO $rdb$
DECLARE
    v_rel pg_catalog.oid := pg_catalog.to_regclass('"jobs"')::pg_catalog.oid;
    r record;
BEGIN
    IF v_rel IS NULL THEN
        RETURN;
    END IF;
    FOR r IN
        SELECT t.tgname::pg_catalog.text AS trigger, t.tgfoid AS fn,
               p.proname::pg_catalog.text AS function, s.nspname::pg_catalog.text AS schema,
               p.proowner AS owner
        FROM pg_catalog.pg_trigger t
        JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) t.tgfoid
        JOIN pg_catalog.pg_namespace s ON s.oid OPERATOR(pg_catalog.=) p.pronamespace
        WHERE t.tgrelid OPERATOR(pg_catalog.=) v_rel AND NOT t.tgisinternal
            AND pg_catalog.starts_with(pg_catalog.obj_description(t.tgfoid, 'pg_proc'), \
'resilient_db transition guard ')
            AND t.tgname::pg_catalog.text OPERATOR(pg_catalog.=) ANY \
(ARRAY['rdb_transition_state_ins', 'rdb_transition_state_upd']::pg_catalog.text[])
    LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER %I ON %s', r.trigger, '"jobs"');
        -- a function this role may not drop (another role's, stamped like ours) stays: its
        -- trigger is gone, and the install must not fail on it
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_trigger WHERE tgfoid OPERATOR(pg_catalog.=) \
r.fn)
                AND pg_catalog.pg_has_role(r.owner, 'USAGE') THEN
            EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS %I.%I()', r.schema, r.function);
        END IF;
    END LOOP;
END
$rdb$;

"""


def _jobs(mapped: Mapper, table: str = "jobs") -> type[Any]:
    rules = _rules({"new": {"run"}, "run": {"done", "new"}}, {"new"}, "state")
    return mapped(rules, column="state", table=table, name="Job")


def test_the_trigger_script_of_a_simple_machine(mapped: Mapper) -> None:
    """The whole script, byte for byte: a change here changes every installed trigger's stamp."""
    model = _jobs(mapped)
    assert transition_trigger_sql(model) == JOBS_SQL
    # then the old-named function's drop, and that of triggers of columns no longer guarded
    assert transition_trigger_drop_sql(model) == (
        JOBS_TRIGGERS_DROP + 'DROP TRIGGER IF EXISTS "rdb_transition_state_ins" ON "jobs";\n\n'
        'DROP TRIGGER IF EXISTS "rdb_transition_state_upd" ON "jobs";\n\n'
        'DROP FUNCTION IF EXISTS "rdb_transition_jobs_state_b53b700df013"();\n\n'
        + JOBS_SQL[JOBS_SQL.index("DO $rdb$\nDECLARE\n    v_old") :]
    )
    (guard,) = guards_of(model)
    assert len(install_statements(guard)) == 7
    assert [s.split(" ", 2)[:2] for s in drop_statements(guard)] == [
        ["DO", "$rdb$\nDECLARE\n"],
        *[["DROP", "TRIGGER"]] * 2,
        ["DROP", "FUNCTION"],
        ["DO", "$rdb$\nDECLARE\n"],
    ]
    assert f"ERRCODE = '{TRANSITION_SQLSTATE}'" in JOBS_SQL
    assert f"current_setting('{BYPASS_SETTING}', true)" in JOBS_SQL
    # the bypass: only a value naming this transaction, only for a role granted BYPASS_ROLE,
    # looked at only for a move that would be blocked; the role is created first if missing
    assert JOBS_SQL.startswith(f"DO $rdb$\nBEGIN\n    IF pg_catalog.to_regrole('{BYPASS_ROLE}')")
    assert "v_bypass <> '' AND v_bypass = pg_current_xact_id()::text" in JOBS_SQL
    assert "pg_has_role(current_user, v_role, 'USAGE')" in JOBS_SQL
    assert "pg_has_role(session_user, v_role, 'USAGE')" in JOBS_SQL
    assert "pg_has_role(session_user, v_role, 'SET')" in JOBS_SQL
    assert JOBS_SQL.index("v_bypass :=") > JOBS_SQL.index("v_pk := json_build_object('id', OLD")


def test_integer_states_wildcard_and_composite_key(mapped: Mapper) -> None:
    rules = _rules({1: {2}, 2: {3}, ANY_STATE: {9}}, {1})
    sql = transition_trigger_sql(mapped(rules, type_=sa.Integer, composite_pk=True))
    # keys are the text the database gives (col::text), so integers are compared as '1', '2'
    assert "IF coalesce(v_to IN ('1'), false) THEN" in sql
    assert "(v_from IS NOT DISTINCT FROM '1' AND coalesce(v_to IN ('2', '9'), false))" in sql
    assert "(v_from IS NOT DISTINCT FROM '3' AND coalesce(v_to IN ('9'), false))" in sql
    assert "FROM '9' AND" not in sql  # the wildcard does not move a state to itself
    assert "json_build_object('id', NEW.\"id\", 'region', NEW.\"region\")" in sql


def test_null_as_a_declared_state(mapped: Mapper) -> None:
    rules = _rules({None: {"paid"}, "paid": {"refunded"}}, {None}, "payment")
    sql = transition_trigger_sql(mapped(rules, column="payment", nullable=True))
    assert "IF v_to IS NULL THEN" in sql  # new rows start with no payment
    assert "(v_from IS NOT DISTINCT FROM NULL AND coalesce(v_to IN ('paid'), false))" in sql


def test_enum_states_are_written_as_the_database_stores_them(mapped: Mapper) -> None:
    rules = _rules(
        {Phase.draft: {Phase.review}, Phase.review: {Phase.done}}, {Phase.draft}, "phase"
    )
    sql = transition_trigger_sql(mapped(rules, column="phase", type_=sa.Enum(Phase, name="ph")))
    assert "coalesce(v_to IN ('review'), false)" in sql  # names, not values
    assert "'In review'" not in sql


def test_a_machine_without_moves_allows_no_update(mapped: Mapper) -> None:
    sql = transition_trigger_sql(mapped(_rules({"only": set()}, {"only"})))
    assert "IF false THEN" in sql


def test_the_stamp_follows_the_database_rules_only(mapped: Mapper) -> None:
    (base,) = guards_of(_jobs(mapped))
    (same,) = guards_of(_jobs(mapped))  # another registry, the same rules
    assert rules_stamp(base) == rules_stamp(same)
    assert rules_stamp(base).startswith("resilient_db transition guard v5 rules-sha256=")
    more = _rules({"new": {"run", "done"}, "run": {"done", "new"}}, {"new"}, "state")
    (changed,) = guards_of(mapped(more, column="state", table="jobs", name="Job"))
    (other_table,) = guards_of(_jobs(mapped, table="jobs_2"))
    assert len({rules_stamp(base), rules_stamp(changed), rules_stamp(other_table)}) == 3


def test_the_trigger_sql_carries_no_raw_control_characters(mapped: Mapper) -> None:
    weird = ("back\\slash :name", "tab\there", "new\nline", "quote'd", "$rdb$ $$")
    rules = _rules({"new": set(weird)}, {"new"}, "state")
    sql = transition_trigger_sql(mapped(rules, column="state", type_=sa.Text))
    assert "\t" not in sql
    for value in weird:
        assert literal(value) in sql
    assert "AS $rdb1$" in sql  # the body holds "$rdb$": another tag


# ------------------------------------------------------------------------------------------------
# diagrams
# ------------------------------------------------------------------------------------------------

RULES = TransitionRules(
    column="status",
    transitions={"new": {"open"}, "open": {"done"}, ANY_STATE: {"void"}},
    initial={"new"},
)

MERMAID = """\
stateDiagram-v2
    %% status
    state "done" as s0
    state "new" as s1
    state "open" as s2
    state "void" as s3
    [*] --> s1
    s0 --> s3
    s1 --> s2
    s1 --> s3
    s2 --> s0
    s2 --> s3
    s3 --> [*]
"""

DOT = """\
digraph "status" {
    rankdir=LR;
    node [shape=box, style=rounded];
    start [shape=point, label=""];
    n0 [label="done"];
    n1 [label="new"];
    n2 [label="open"];
    n3 [label="void"];
    start -> n1;
    n0 -> n3;
    n1 -> n2;
    n1 -> n3;
    n2 -> n0;
    n2 -> n3;
}
"""


def test_diagrams_of_plain_rules() -> None:
    assert rules_to_mermaid(RULES) == MERMAID
    assert rules_to_dot(RULES) == DOT


def test_diagrams_of_a_model_use_its_name_and_declared_states(mapped: Mapper) -> None:
    rules = _rules(
        {Phase.draft: {Phase.review}, Phase.review: {Phase.done}}, {Phase.draft}, "phase"
    )
    model = mapped(rules, column="phase", type_=sa.Enum(Phase, name="ph"), name="Doc")
    mermaid = rules_to_mermaid(model)
    assert "    %% Doc.phase" in mermaid
    assert 'state "In review" as' in mermaid  # labelled by value
    assert rules_to_dot(model).startswith('digraph "Doc.phase" {')


def test_diagrams_label_null_and_escape_labels() -> None:
    rules = _rules({None: {'a "b": c;'}}, {None})
    mermaid = rules_to_mermaid(rules)
    assert 'state "NULL" as s0' in mermaid
    assert 'state "a #34;b#34;#58; c#59;" as s1' in mermaid
    dot = rules_to_dot(rules)
    assert 'n0 [label="NULL"];' in dot
    assert 'n1 [label="a \\"b\\": c;"];' in dot


# ------------------------------------------------------------------------------------------------
# the trigger's error, mapped back
# ------------------------------------------------------------------------------------------------


class _Diag:
    def __init__(self, detail: str | None, context: str | None) -> None:
        self.message_detail = detail
        self.context = context


def _context(table: str, column: str, schema: str | None = None, *, where: str = "public") -> str:
    """The CONTEXT line the server writes for a RAISE in our trigger function."""
    return f"PL/pgSQL function {where}.{function_name(schema, table, column)}() line 42 at RAISE"


class _DriverError(Exception):
    """What psycopg raises: ``sqlstate``, ``diag.message_detail`` and ``diag.context``."""

    def __init__(self, sqlstate: str, detail: str | None, context: str | None = None) -> None:
        super().__init__("Status transition blocked")
        self.sqlstate = sqlstate
        self.diag = _Diag(detail, context)


class _AsyncpgError(Exception):
    """What asyncpg raises: ``sqlstate``, ``detail`` and ``context`` as attributes."""

    def __init__(self, sqlstate: str, detail: str, context: str) -> None:
        super().__init__("Status transition blocked")
        self.sqlstate, self.detail, self.context = sqlstate, detail, context


def _wrapped(driver: BaseException) -> sa.exc.DBAPIError:
    return sa.exc.DBAPIError("UPDATE ...", {}, driver)


DOC_DETAIL = {
    "resilient_db": "transition",
    "model": "Doc",
    "schema": "public",
    "table": "mapped_docs",
    "column": "phase",
    "op": "UPDATE",
    "from": "review",
    "to": "draft",
    "pk": {"id": 7},
}


def test_the_trigger_error_comes_back_with_declared_states(mapped: Mapper) -> None:
    rules = _rules({Phase.draft: {Phase.review}}, {Phase.draft}, "phase")
    model = mapped(
        rules, column="phase", type_=sa.Enum(Phase, name="ph"), table="mapped_docs", name="Doc"
    )
    transition_rules(model)  # compiled: the model is known in this process
    context = _context("mapped_docs", "phase")
    for driver in (
        _DriverError(TRANSITION_SQLSTATE, json.dumps(DOC_DETAIL), context),
        _AsyncpgError(TRANSITION_SQLSTATE, json.dumps(DOC_DETAIL), context),
    ):
        err = exception_from_db(_wrapped(driver))
        assert isinstance(err, IllegalTransitionError)
        assert (err.model, err.pk, err.column, err.via) == ("Doc", 7, "phase", "db")
        assert (err.from_state, err.to_state) == (Phase.review, Phase.draft)
        assert err.reason == "blocked by the database trigger; no moves are allowed from here"


def test_an_unknown_table_keeps_the_database_text() -> None:
    detail = {
        "resilient_db": "transition",
        "schema": "app",
        "table": "elsewhere",
        "column": "st",
        "op": "INSERT",
        "to": "x",
        "pk": {"a": 1, "b": 2},
    }
    cause = _DriverError(TRANSITION_SQLSTATE, json.dumps(detail), _context("elsewhere", "st"))
    outer = RuntimeError("wrapped")
    outer.__cause__ = cause
    err = exception_from_db(outer)
    assert err is not None
    assert (err.model, err.column, err.pk) == ("elsewhere", "st", (1, 2))
    assert (err.from_state, err.to_state) == (None, "x")
    assert err.reason == "new rows must start in an initial state"


def test_other_errors_are_not_mapped() -> None:
    assert exception_from_db(_wrapped(_DriverError("23505", None))) is None
    assert exception_from_db(ValueError("no sqlstate")) is None
    context = _context("mapped_docs", "phase")
    assert (
        exception_from_db(_wrapped(_DriverError(TRANSITION_SQLSTATE, "not json", context))) is None
    )


DOC_FN = function_name(None, "mapped_docs", "phase")


@pytest.mark.parametrize(
    ("context", "detail_changes"),
    [
        pytest.param(None, {}, id="no context"),
        pytest.param("PL/pgSQL function inline_code_block line 1 at RAISE", {}, id="DO block"),
        pytest.param(f"PL/pgSQL function pg_temp_3.{DOC_FN}() line 42 at RAISE", {}, id="temp fn"),
        pytest.param(
            f'PL/pgSQL function pg_temp_3."x public.{DOC_FN}() line 1 at"() line 1 at RAISE',
            {},
            id="signature hidden in a quoted name",
        ),
        pytest.param(_context("mapped_docs", "phase"), {"schema": "pg_temp_3"}, id="temp table"),
        pytest.param(_context("other", "phase"), {}, id="another table's function"),
        pytest.param(_context("mapped_docs", "phase"), {"column": "title"}, id="another column"),
        pytest.param(
            _context("mapped_docs", "phase", "sales", where="public"),
            {"schema": "sales"},
            id="a schema's function outside its schema",
        ),
        pytest.param(
            f"PL/pgSQL function public.{DOC_FN}() line 42 at RETURN", {}, id="not at a RAISE"
        ),
        pytest.param(
            f"SQL function public.{DOC_FN}() statement 1\nPL/pgSQL function x() line 1 at RAISE",
            {},
            id="ours not innermost",
        ),
        pytest.param(_context("mapped_docs", "phase"), {"resilient_db": None}, id="not our detail"),
    ],
)
def test_a_forged_trigger_error_is_not_ours(
    context: str | None, detail_changes: dict[str, Any]
) -> None:
    """SQLSTATE RDB01 with our JSON detail is not enough: the server-written CONTEXT must name
    the trigger function of exactly that table and column, in a schema that is not temporary."""
    detail = json.dumps({**DOC_DETAIL, **detail_changes})
    assert exception_from_db(_wrapped(_DriverError(TRANSITION_SQLSTATE, detail, context))) is None


@pytest.mark.parametrize(
    ("context", "schema"),
    [
        pytest.param(_context("mapped_docs", "phase"), "public", id="in public"),
        pytest.param(_context("mapped_docs", "phase", where='"My App"'), "public", id="quoted"),
        pytest.param(
            _context("mapped_docs", "phase", "sales", where="sales"), "sales", id="model schema"
        ),
        pytest.param(
            f"PL/pgSQL-Funktion public.{DOC_FN}() Zeile 42 bei RAISE\n"
            "SQL-Anweisung »UPDATE mapped_docs SET phase = 'Draft'«",
            "public",
            id="translated, nested",
        ),
        pytest.param(
            f"PL/pgSQL function public.{pg_name('rdb_transition', 'mapped_docs', 'phase')}() "
            "line 30 at RAISE",
            "public",
            id="installed by an earlier release",
        ),
    ],
)
def test_the_trigger_error_is_recognised_by_its_context(context: str, schema: str) -> None:
    detail = json.dumps({**DOC_DETAIL, "schema": schema})
    err = exception_from_db(_wrapped(_DriverError(TRANSITION_SQLSTATE, detail, context)))
    assert err is not None
    assert err.via == "db"


def test_an_update_from_null_is_not_called_a_new_row() -> None:
    """from_state None is both an inserted row and an UPDATE of a nullable status from NULL:
    ``inserted`` tells them apart, in the message too, and survives pickling."""
    fields: dict[str, Any] = {
        "model": "Job",
        "pk": 1,
        "column": "status",
        "from_state": None,
        "to_state": "done",
        "via": "flush",
    }
    update = IllegalTransitionError(**fields)
    insert = IllegalTransitionError(**fields, inserted=True)
    assert not update.inserted
    assert "None -> 'done'" in str(update)
    assert "(new row) -> 'done'" in str(insert)
    copy = pickle.loads(pickle.dumps(insert))
    assert copy.inserted
    assert str(copy) == str(insert)
