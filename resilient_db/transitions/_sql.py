"""The database trigger as SQL text: a PL/pgSQL function per guarded column, its INSERT and
UPDATE triggers, their names (within PostgreSQL's 63 bytes), the stamp that identifies the rules
they enforce, and the drop script. Pure: every identifier and literal is quoted here, nothing is
sent (see ``_install`` for that)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Final, NamedTuple

import sqlalchemy as sa

from ._rules import (
    Guard,
    Key,
    TransitionRulesError,
    compiled_guards,
    mapper_of,
    same_table,
    sort_key,
    trigger_guards,
    trims_scale,
)

__all__ = [
    "BYPASS_REASON_SETTING",
    "BYPASS_ROLE",
    "BYPASS_SETTING",
    "BYPASS_STATEMENT",
    "EQ",
    "GT",
    "NE",
    "TRANSITION_SQLSTATE",
    "TriggerNames",
    "bypass_role_statement",
    "column_of_trigger",
    "column_text",
    "drop_plan",
    "drop_plan_statements",
    "drop_statements",
    "function_name",
    "gone_column_condition",
    "ident",
    "insert_when",
    "insert_when_printed",
    "install_statements",
    "left_over_statement",
    "left_over_statements",
    "literal",
    "online_install_statements",
    "online_uninstall_statements",
    "pg_name",
    "quoted_table",
    "replaced_functions_statement",
    "rules_stamp",
    "script_statements",
    "source_matches",
    "spellings",
    "sql_ident",
    "stamp_generator",
    "stamp_prefix",
    "stamp_prefix_pattern",
    "transition_trigger_drop_sql",
    "transition_trigger_sql",
    "trigger_names",
    "unqualified",
    "update_when",
    "update_when_printed",
]

#: SQLSTATE raised by the generated trigger (class ``RD`` is not used by PostgreSQL).
TRANSITION_SQLSTATE = "RDB01"
#: The transaction-local setting that asks the trigger for a bypass. Only a value naming the
#: current transaction (its id, ``pg_current_xact_id()``) asks; any other value (``on``, a
#: session-level leftover, a connect option) is ignored.
BYPASS_SETTING = "resilient_db.bypass_transitions"
#: The transaction-local setting holding the reason given to
#: :func:`~resilient_db.bypass_transitions`, which the trigger writes into the server log with
#: every move it lets through by a bypass.
BYPASS_REASON_SETTING = "resilient_db.bypass_reason"
#: The role whose members may bypass the trigger (NOLOGIN; created by the trigger's install).
BYPASS_ROLE = "resilient_db_bypass"

# v2: the bypass only for members of BYPASS_ROLE; v3: each bypassed move in the server log;
# v4: AFTER row triggers, which check the row as stored (after every BEFORE trigger), and the
# login role needs USAGE or SET on BYPASS_ROLE (not a bare membership), and the error and log
# line name the root of a partitioned table; v5: the stamp identifies the table, column and rules
# (not the model), and the trigger names the model nearest the root of its hierarchy, so every
# class of one table installs the same trigger; the INSERT trigger fires only WHEN the row is not
# in an initial state (no event queued for a row that starts as it should)
_GENERATOR_VERSION = 5
_STAMP_PREFIX = "resilient_db transition guard"
_PG_NAME_MAX = 63  # NAMEDATALEN - 1, in bytes


def ident(name: str) -> str:
    """``name`` as a quoted identifier, as the server reads it back from a string
    (``to_regclass()``, ``to_regprocedure()``): see :func:`sql_ident` for the statements' own
    text."""
    if "\x00" in name:
        raise TransitionRulesError(f"identifier {name!r} contains a NUL character")
    return '"' + name.replace('"', '""') + '"'


def sql_ident(name: str) -> str:
    """``name`` as a quoted identifier in the text of a statement: :func:`ident`, or, for a name
    in which SQLAlchemy's ``text()`` (what Alembic's ``op.execute`` makes of a string) would
    find a bind parameter (``"c :d"``) or take out a backslash before a colon (``"c\\:d"``), a
    Unicode escape identifier ``U&"c \\003Ad"`` that means the same name (to the server, to
    ``psql``) and holds no colon."""
    quoted = ident(name)
    if _BOUND_IN_TEXT.search(quoted) is None:
        return quoted
    return 'U&"' + name.replace("\\", "\\\\").replace(":", "\\003A").replace('"', '""') + '"'


#: what ``text()`` reads in an identifier: ``:word`` after neither a word character nor a colon
#: (a bind parameter), or a backslash before a colon (an escaped one: the backslash is dropped)
_BOUND_IN_TEXT: Final = re.compile(r"(?<![:\w]):[\w$]|\\:")
_QUOTED_PART: Final = re.compile(r'"((?:[^"]|"")*)"')


def _sql_name(quoted: str) -> str:
    """A (schema-qualified) name written by :func:`ident` as :func:`sql_ident` writes it."""
    return _QUOTED_PART.sub(lambda m: sql_ident(m.group(1).replace('""', '"')), quoted)


def literal(value: str) -> str:
    """A PostgreSQL string literal that means ``value`` whatever standard_conforming_strings is.

    Plain ``'...'`` when there is nothing special; otherwise an escape string ``E'...'`` in which
    backslashes and control characters are written as ``\\xHH`` (so the SQL text itself contains
    neither, and survives tools that rewrite tabs or treat backslash-colon specially), and so is
    a colon before a letter, digit or ``_``: SQLAlchemy's ``text()`` (what Alembic's
    ``op.execute`` makes of a string) takes every ``:word`` for a bind parameter, inside quotes
    too.
    """
    if "\x00" in value:
        raise TransitionRulesError(f"value {value!r} contains a NUL character")
    if _ESCAPED.search(value) is None:
        return "'" + value.replace("'", "''") + "'"
    return "E'" + _ESCAPED.sub(_escape, value).replace("'", "''") + "'"


#: what :func:`literal` writes as ``\\xHH``: a backslash, a control character, a colon that
#: ``text()`` would read as the start of a bind parameter
_ESCAPED: Final = re.compile(r"[\\\x00-\x1f\x7f]|:(?=\w)")


def _escape(found: re.Match[str]) -> str:
    return f"\\x{ord(found.group()):02x}"


# Who may bypass: the role in effect must hold the privileges of BYPASS_ROLE (USAGE: a member
# that inherits it, or one that did SET ROLE to it) and the role that logged in must be a member
# (MEMBER). USAGE rather than MEMBER for the role in effect: PostgreSQL 16+ makes the
# non-superuser creator of a role its member WITH ADMIN OPTION (but without INHERIT or SET), and
# a migration role that created BYPASS_ROLE must not be able to bypass without being granted it.
# session_user as well as current_user: an unprivileged login that sets the value and then calls
# a SECURITY DEFINER function owned by a member (current_user = the owner) is not let through.
# The login role must hold the role's privileges (USAGE) or be able to SET ROLE to it (SET,
# PostgreSQL 16+): a membership granted WITH INHERIT FALSE, SET FALSE (to a role that is a member)
# confers no rights, and must not lend the bypass to a login calling such a function. Before 16
# every member may SET ROLE, so MEMBER is the same check there (and 'SET' is unknown).
# ``{ge}``: ``>=`` in the trigger function (its search_path pinned, and its source what drift
# detection compares), ``OPERATOR(pg_catalog.>=)`` in a statement run on the caller's path.
_MAY_BYPASS = (
    "pg_catalog.pg_has_role(current_user, {role}, 'USAGE')"
    " AND (pg_catalog.pg_has_role(session_user, {role}, 'USAGE')"
    " OR CASE WHEN pg_catalog.current_setting('server_version_num')::integer {ge} 160000"
    " THEN pg_catalog.pg_has_role(session_user, {role}, 'SET')"
    " ELSE pg_catalog.pg_has_role(session_user, {role}, 'MEMBER') END)"
)

_QUALIFIED_GE = "OPERATOR(pg_catalog.>=)"

#: What :func:`~resilient_db.bypass_transitions` sends (on the caller's search_path: operators
#: and types named with their schema): one round trip that binds the bypass to
#: the current transaction (its id) when the roles may bypass, with its reason (the bind
#: parameter ``reason``, for the trigger's log lines), and says who asked. On a hot standby
#: (in recovery: nothing is written there, and no transaction id can be assigned) it binds
#: nothing and says ``standby``.
BYPASS_STATEMENT = f"""\
SELECT r.oid IS NOT NULL AS role_exists, r.standby,
       current_user::pg_catalog.text AS acting_role, session_user::pg_catalog.text AS login_role,
       CASE WHEN NOT r.standby THEN pg_catalog.pg_current_xact_id()::pg_catalog.text END AS xid,
       CASE WHEN NOT r.standby AND {_MAY_BYPASS.format(role="r.oid", ge=_QUALIFIED_GE)}
            THEN pg_catalog.set_config({literal(BYPASS_REASON_SETTING)}, :reason, true) END
           AS reason,
       CASE WHEN NOT r.standby AND {_MAY_BYPASS.format(role="r.oid", ge=_QUALIFIED_GE)}
            THEN pg_catalog.set_config({literal(BYPASS_SETTING)},
                pg_catalog.pg_current_xact_id()::pg_catalog.text, true) END AS bound
FROM (SELECT pg_catalog.to_regrole({literal(BYPASS_ROLE)})::pg_catalog.oid AS oid,
             pg_catalog.pg_is_in_recovery() AS standby) AS r"""


def pg_name(*parts: str) -> str:
    """A PostgreSQL identifier from ``parts``, shortened with a hash to fit 63 bytes."""
    name = "_".join(parts)
    if len(name.encode()) <= _PG_NAME_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    budget = _PG_NAME_MAX - len(digest) - 1
    short = name.encode()[:budget].decode(errors="ignore")
    return f"{short}_{digest}"


class TriggerNames(NamedTuple):
    table: str  # quoted, schema-qualified when the table has a schema
    function: str  # quoted, schema-qualified likewise
    function_name: str
    insert_trigger: str
    update_trigger: str
    #: The function name of earlier releases, ``rdb_transition_<table>_<column>``, which two
    #: models could share (``a_b``.``c`` and ``a``.``b_c``). Dropped on install when unused.
    legacy_function_name: str


_FUNCTION_PREFIX = "rdb_transition_"
_FUNCTION_HASH_LEN = 12


def stored_name(name: str) -> str:
    """An identifier as PostgreSQL keeps it: cut to 63 bytes, on a character boundary (what
    ``pg_attribute.attname`` holds for a longer column name)."""
    return _truncate_utf8(name, _PG_NAME_MAX)


def _truncate_utf8(text: str, budget: int) -> str:
    return text.encode()[:budget].decode(errors="ignore")


def function_name(schema: str | None, table: str, column: str) -> str:
    """The trigger function's name: ``rdb_transition_<table>_<column>`` cut to fit, then ``_``
    and 12 hex digits of a hash of the exact (schema, table, column) triple, so no two guarded
    columns share a function (functions share the schema's namespace; triggers are per table).
    At most 63 bytes, cut on a character boundary."""
    triple = json.dumps([schema, table, column], ensure_ascii=False).encode()
    digest = hashlib.sha256(triple).hexdigest()[:_FUNCTION_HASH_LEN]
    budget = _PG_NAME_MAX - len(_FUNCTION_PREFIX) - 1 - _FUNCTION_HASH_LEN
    return f"{_FUNCTION_PREFIX}{_truncate_utf8(f'{table}_{column}', budget)}_{digest}"


def quoted_table(table: sa.Table) -> str:
    """``table``'s name quoted, schema-qualified when it has a schema."""
    return f"{ident(table.schema)}.{ident(table.name)}" if table.schema else ident(table.name)


def trigger_names(guard: Guard) -> TriggerNames:
    table = guard.table
    schema = f"{ident(table.schema)}." if table.schema else ""
    fname = function_name(table.schema, table.name, guard.column.name)
    return TriggerNames(
        table=f"{schema}{ident(table.name)}",
        function=f"{schema}{ident(fname)}",
        function_name=fname,
        # Trigger names live in the table's namespace: the column alone keeps them apart.
        insert_trigger=pg_name("rdb_transition", guard.column.name, "ins"),
        update_trigger=pg_name("rdb_transition", guard.column.name, "upd"),
        legacy_function_name=pg_name("rdb_transition", table.name, guard.column.name),
    )


def _sql_names(n: TriggerNames) -> TriggerNames:
    """``n`` with its table and function as the text of a statement writes them
    (:func:`sql_ident`); not for a name read back from a string (``to_regclass()``)."""
    return n._replace(table=_sql_name(n.table), function=_sql_name(n.function))


# The statements run with the installer's rights and search_path: every function they call is
# named with its schema, and every operator on built-in types too (OPERATOR(pg_catalog.=)). A
# search_path that lists pg_catalog after another schema (``SET search_path = app, pg_catalog``)
# makes an operator or function of that schema win over the built-in of the same argument types,
# and a role that may create objects there would run its code as the installer. (``DO`` can't
# ``SET search_path``; the trigger function pins it and is written as plain PL/pgSQL.)
#: ``=``, ``<>`` and ``>`` of the built-in types, whatever the caller's search_path holds
EQ: Final = "OPERATOR(pg_catalog.=)"
NE: Final = "OPERATOR(pg_catalog.<>)"
GT: Final = "OPERATOR(pg_catalog.>)"

#: How long, by default, an install's (or uninstall's: the trigger's, the commit markers')
#: statements may wait for a lock on a table (seconds): a trigger's ``DROP TRIGGER`` asks for
#: an ACCESS EXCLUSIVE lock on the guarded table (``CREATE TRIGGER`` for SHARE ROW EXCLUSIVE),
#: an uninstall's ``DROP TABLE`` for one on the markers. Such a request waits behind any
#: transaction using the table (a long report, a transaction left idle), and every query on
#: the table that comes after it queues behind the request: without a bound, an install at
#: startup stopped the service's reads and writes of the table for as long as that
#: transaction ran. Past it, the install fails with the server's 55P03 ("canceling statement
#: due to lock timeout"), leaving nothing, and may be run again.
INSTALL_LOCK_TIMEOUT: Final = 5.0

_OWNER_OF_OLD: Final = (
    f"(SELECT p.proowner FROM pg_catalog.pg_proc p WHERE p.oid {EQ} v_old::pg_catalog.oid)"
)


def _drop_legacy_function(n: TriggerNames, guard: Guard) -> str:
    """Drop the function of the old naming scheme if it is ours, no trigger still calls it and
    this role may drop it (after a name collision it may be another table's; that one drops it
    on its reinstall. Another role's, stamped like ours, stays, as in the other cleanup
    blocks: an install by a role that may not drop it does not fail on it)."""
    schema = f"{ident(guard.table.schema)}." if guard.table.schema else ""
    legacy = f"{schema}{ident(n.legacy_function_name)}"
    legacy_sql = _sql_name(legacy)
    return _do(f"""\
DECLARE
    v_old pg_catalog.regprocedure := pg_catalog.to_regprocedure({literal(legacy + "()")});
BEGIN
    IF v_old IS NOT NULL
        AND {_stamped("v_old")}
        AND {_uncalled("v_old::pg_catalog.oid")}
        AND {_may_drop(_OWNER_OF_OLD)} THEN
        DROP FUNCTION {legacy_sql}();
    END IF;
END""")


def rules_stamp(guard: Guard) -> str:
    """Version stamp: a hash of the database-level rules (table, column, row key, states and
    moves) and of the generator version. Not of the model: the classes of one table (single-table
    inheritance, two models of one table) guarding a column by the same rules install the same
    trigger. The table as declared: its schema, or none (see :func:`spellings`)."""
    return _stamp(guard, guard.table.schema)


def spellings(guard: Guard, resolved_schema: str | None) -> dict[str, str]:
    """The function names (each with its stamp) under which an install of ``guard``'s rules
    may have put the trigger of the table the server resolves to ``resolved_schema``: the
    table as declared, without its schema (found on the installer's search_path), and with
    the schema it resolves to. The name and stamp hash the schema as written (what offline
    SQL knows), so a migration's ``TransitionTrigger(schema="app")`` and a model of ``tasks``
    reached through ``search_path=app`` install the same trigger under two names; on a
    server both are the one table's trigger (drift detection asks which table the trigger is
    on, and it is this one). The declared spelling comes first."""
    found: dict[str, str] = {}
    for schema in (guard.table.schema, None, resolved_schema):
        name = function_name(schema, guard.table.name, guard.column.name)
        found.setdefault(name, _stamp(guard, schema))
    return found


def _stamp(guard: Guard, schema: str | None) -> str:
    canonical = {
        "generator": _GENERATOR_VERSION,
        "schema": schema,
        "table": guard.table.name,
        "column": guard.column.name,
        "pk": [c.name for c in guard.pk_columns],
        "initial": sorted(guard.initial, key=sort_key),
        "transitions": [
            [source, sorted(targets, key=sort_key)]
            for source, targets in sorted(guard.next.items(), key=lambda kv: sort_key(kv[0]))
        ],
    }
    digest = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()
    return f"{_STAMP_PREFIX} v{_GENERATOR_VERSION} rules-sha256={digest}"


_NO_REASON = "none given (the bypass was not asked for through bypass_transitions())"

_BYPASS_HINT = (
    f"A database administrator grants the bypass with GRANT {BYPASS_ROLE} TO <role> "
    f"(CREATE ROLE {BYPASS_ROLE} NOLOGIN first if it does not exist); "
    "it is then asked for with resilient_db bypass_transitions(), within one transaction"
)


def stamp_generator(stamp: str | None) -> int | None:
    """The generator version in a stamp written by :func:`rules_stamp` (None if not one)."""
    prefix = f"{_STAMP_PREFIX} v"
    if not stamp or not stamp.startswith(prefix):
        return None
    version = stamp[len(prefix) :].split(" ", 1)[0]
    return int(version) if version.isascii() and version.isdigit() else None


def _member_sql(expr: str, keys: Collection[Key]) -> str:
    return _membership(expr, keys, lambda states: f"coalesce({expr} IN ({states}), false)")


def _membership(expr: str, keys: Collection[Key], test: Callable[[str], str]) -> str:
    """SQL true when ``expr`` is one of ``keys`` (None among them: NULL), the states not None
    tested by ``test`` given their literals, comma-separated."""
    present = sorted((k for k in keys if k is not None), key=sort_key)
    parts = []
    if present:
        parts.append(test(", ".join(literal(k) for k in present)))
    if None in keys:
        parts.append(f"{expr} IS NULL")
    if not parts:
        return "false"
    return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"


def _function_body(guard: Guard, field: Callable[[str, str], str] | None = None) -> str:
    """The trigger function's body; ``field`` writes a column of ``NEW`` or ``OLD``
    (:func:`_field`; :func:`_plain_field` as releases before the ``U&`` spelling wrote it)."""
    field = _field if field is None else field
    col_lit = literal(guard.column.name)
    pk_new = ", ".join(f"{literal(c.name)}, {field('NEW', c.name)}" for c in guard.pk_columns)
    pk_old = ", ".join(f"{literal(c.name)}, {field('OLD', c.name)}" for c in guard.pk_columns)
    moves = [
        f"(v_from IS NOT DISTINCT FROM {'NULL' if src is None else literal(src)}"
        f" AND {_member_sql('v_to', targets)})"
        for src, targets in sorted(guard.next.items(), key=lambda kv: sort_key(kv[0]))
        if targets
    ]
    update_ok = "\n            OR ".join(moves) if moves else "false"
    # Run by AFTER row triggers: NEW is the row as stored, after every BEFORE trigger (also one
    # of the application's that sets the column and fires after ours in name order); the
    # function only reads it and raises, its return value is ignored.
    # The legal moves are checked first: the bypass is looked at only for a move that would be
    # blocked, so a legal write pays for nothing more. A bypass value naming this transaction
    # from a role that may not bypass raises its own error (42501), not RDB01: the caller asked
    # for a bypass and is told why it was refused.
    # The table named in the log line and the error (its detail is how the error is mapped back to
    # the model) is the one the model maps: on a partitioned table TG_TABLE_NAME names the
    # partition the row is in, so the root of its partition tree is looked up (a blocked or
    # bypassed move only).
    return f"""
DECLARE
    v_from text;
    v_to text := {_column_value("NEW", guard.column, field)}::text;
    v_pk json;
    v_bypass text;
    v_reason text;
    v_role oid;
    v_schema text;
    v_table text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF {_member_sql("v_to", guard.initial)} THEN
            RETURN NULL;
        END IF;
        v_pk := json_build_object({pk_new});
    ELSE
        v_from := {_column_value("OLD", guard.column, field)}::text;
        IF v_from IS NOT DISTINCT FROM v_to THEN
            RETURN NULL;
        END IF;
        IF {update_ok} THEN
            RETURN NULL;
        END IF;
        v_pk := json_build_object({pk_old});
    END IF;
    SELECT n.nspname::text, c.relname::text INTO v_schema, v_table
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = coalesce(pg_partition_root(TG_RELID), TG_RELID);
    v_bypass := current_setting({literal(BYPASS_SETTING)}, true);
    IF v_bypass <> '' AND v_bypass = pg_current_xact_id()::text THEN
        v_role := to_regrole({literal(BYPASS_ROLE)});
        IF {_MAY_BYPASS.format(role="v_role", ge=">=")} THEN
            -- the audit, on the server: every move let through, whoever set the value
            v_reason := current_setting({literal(BYPASS_REASON_SETTING)}, true);
            RAISE LOG USING
                MESSAGE = format('resilient_db: status transition guard bypassed: %s.%s %s '
                                 '%s -> %s by role %s (logged in as %s), reason: %s',
                    v_table, {col_lit}, v_pk,
                    CASE WHEN TG_OP = 'INSERT' THEN '(new row)'
                         ELSE coalesce(quote_literal(v_from), 'NULL') END,
                    coalesce(quote_literal(v_to), 'NULL'),
                    quote_ident(current_user), quote_ident(session_user),
                    CASE WHEN coalesce(v_reason, '') = ''
                         THEN {literal(_NO_REASON)}
                         ELSE quote_literal(v_reason) END),
                DETAIL = json_build_object(
                    'resilient_db', 'transition_bypassed', 'model', {literal(guard.owner)},
                    'schema', v_schema, 'table', v_table, 'column', {col_lit},
                    'op', TG_OP, 'from', v_from, 'to', v_to, 'pk', v_pk,
                    'role', current_user, 'login_role', session_user,
                    'xid', v_bypass, 'reason', nullif(v_reason, ''))::text;
            RETURN NULL;
        END IF;
        RAISE EXCEPTION USING
            ERRCODE = 'insufficient_privilege',
            MESSAGE = format('transition guard bypass refused: %s',
                CASE WHEN v_role IS NULL THEN {literal(f"role {BYPASS_ROLE} does not exist")}
                     ELSE format('role %s (logged in as %s) may not bypass: it needs to be '
                                 'granted {BYPASS_ROLE}', quote_ident(current_user),
                                 quote_ident(session_user)) END),
            HINT = {literal(_BYPASS_HINT)};
    END IF;
    RAISE EXCEPTION USING
        ERRCODE = {literal(TRANSITION_SQLSTATE)},
        MESSAGE = format('Status transition blocked: %s.%s %s -> %s',
            v_table, {col_lit},
            CASE WHEN TG_OP = 'INSERT' THEN '(new row)'
                 ELSE coalesce(quote_literal(v_from), 'NULL') END,
            coalesce(quote_literal(v_to), 'NULL')),
        DETAIL = json_build_object(
            'resilient_db', 'transition', 'model', {literal(guard.owner)},
            'schema', v_schema, 'table', v_table, 'column', {col_lit},
            'op', TG_OP, 'from', v_from, 'to', v_to, 'pk', v_pk)::text,
        HINT = 'Allowed moves are declared in the __transitions__ of the model; '
            'for an audited repair use resilient_db bypass_transitions()',
        SCHEMA = TG_TABLE_SCHEMA, TABLE = TG_TABLE_NAME, COLUMN = {col_lit};
END
"""


_MODEL_PLACEHOLDER = "rdb-model-placeholder-7f3a9c"
# A literal as literal() writes it: plain, or E'...' whose only backslashes are \xHH escapes.
_LITERAL = r"(?:'(?:[^'\\\x00-\x1f\x7f]|'')*'|E'(?:[^'\\\x00-\x1f\x7f]|''|\\x[0-9a-f]{2})*')"


def source_matches(guard: Guard, source: str | None) -> bool:
    """Whether ``source`` (an installed function's body) is the one generated for ``guard``'s
    rules, for whichever model it names: a trigger installed through another class of the
    table with the same rules (another registry's, one not imported here) enforces the same."""
    if source is None:
        return False
    # a column whose name _field writes as U&"..." was written NEW."..." by earlier releases
    # (install_transition_trigger's, which PL/pgSQL reads as well): the same function
    names = [guard.column.name, *(c.name for c in guard.pk_columns)]
    fields = [_field]
    if any(_field("NEW", name) != _plain_field("NEW", name) for name in names):
        fields.append(_plain_field)
    return any(_source_is(guard, source, field) for field in fields)


def _source_is(guard: Guard, source: str, field: Callable[[str, str], str]) -> bool:
    if source == _function_body(guard, field):
        return True
    parts = _function_body(dataclasses.replace(guard, owner=_MODEL_PLACEHOLDER), field).split(
        literal(_MODEL_PLACEHOLDER)
    )
    pattern = re.escape(parts[0]) + f"(?P<model>{_LITERAL})"
    pattern += "".join(re.escape(part) + "(?P=model)" for part in parts[1:-1])
    pattern += re.escape(parts[-1])
    return re.fullmatch(pattern, source) is not None


def _dollar_quote(body: str) -> str:
    tag = "$rdb$"
    n = 0
    while tag in body:
        n += 1
        tag = f"$rdb{n}$"
    return f"{tag}{body}{tag}"


def _do(block: str) -> str:
    """``block`` (PL/pgSQL: ``[DECLARE ...] BEGIN ... END``) as a ``DO`` statement: it runs
    wherever the statements run, also in a script (``psql``, Alembic's offline mode)."""
    return "DO " + _dollar_quote("\n" + block + "\n")


def _stamped(function: str) -> str:
    """SQL true when ``function`` (its oid or ``regprocedure``) is ours: stamped with a
    ``COMMENT`` only install writes (never told by its name alone)."""
    return (
        f"pg_catalog.starts_with(pg_catalog.obj_description({function}, 'pg_proc'), "
        f"{literal(stamp_prefix())})"
    )


def _uncalled(function: str) -> str:
    """SQL true when no trigger calls ``function`` (its oid)."""
    return f"NOT EXISTS (SELECT FROM pg_catalog.pg_trigger WHERE tgfoid {EQ} {function})"


def _may_drop(owner: str) -> str:
    """SQL true when this role may drop an object ``owner`` (SQL: a role's oid) owns: a member
    of that role. Another role's function, stamped like ours, stays (the install must not fail
    on it)."""
    return f"pg_catalog.pg_has_role({owner}, 'USAGE')"


def _our_triggers_dropped(
    table: str, condition: str, declare: str = "", *, inner: bool = False
) -> str:
    """A PL/pgSQL block that drops our triggers (their function stamped: :func:`_stamped`) on
    ``table`` (quoted, as :func:`quoted_table` writes it) for which ``condition`` holds (SQL on
    ``t``, their ``pg_trigger`` row, and ``v_rel``, the table's oid), and then each one's
    function when no trigger calls it any more and this role may drop it (another role's,
    stamped like ours, stays). Nothing when there is no such table. ``declare``: more
    variables, each a line of its own. ``inner``: a block inside another, which goes on after
    it: no early ``RETURN`` (which would end the outer block too) when the table is missing
    (no trigger is found then either)."""
    quoted = literal(table)
    missing = "" if inner else "    IF v_rel IS NULL THEN\n        RETURN;\n    END IF;\n"
    return f"""\
DECLARE
    v_rel pg_catalog.oid := pg_catalog.to_regclass({quoted})::pg_catalog.oid;{declare}
    r record;
BEGIN
{missing}    FOR r IN
        SELECT t.tgname::pg_catalog.text AS trigger, t.tgfoid AS fn,
               p.proname::pg_catalog.text AS function, s.nspname::pg_catalog.text AS schema,
               p.proowner AS owner
        FROM pg_catalog.pg_trigger t
        JOIN pg_catalog.pg_proc p ON p.oid {EQ} t.tgfoid
        JOIN pg_catalog.pg_namespace s ON s.oid {EQ} p.pronamespace
        WHERE t.tgrelid {EQ} v_rel AND NOT t.tgisinternal
            AND {_stamped("t.tgfoid")}
            AND {condition}
    LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER %I ON %s', r.trigger, {quoted});
        -- a function this role may not drop (another role's, stamped like ours) stays: its
        -- trigger is gone, and the install must not fail on it
        IF {_uncalled("r.fn")}
                AND {_may_drop("r.owner")} THEN
            EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS %I.%I()', r.schema, r.function);
        END IF;
    END LOOP;
END"""


def bypass_role_statement() -> str:
    """Create :data:`BYPASS_ROLE` (NOLOGIN, no members) unless it exists.

    Roles belong to the whole cluster, so two installs may race: the loser's ``duplicate_object``
    or ``unique_violation`` means the role is there. An installing role without ``CREATEROLE``
    gets a WARNING and the install goes on: the trigger then refuses every bypass (it looks the
    role up when asked) until an administrator creates the role. The guard itself is never
    left off, and the bypass never open to everyone.
    """
    return _do(f"""\
BEGIN
    IF pg_catalog.to_regrole({literal(BYPASS_ROLE)}) IS NULL THEN
        BEGIN
            CREATE ROLE {ident(BYPASS_ROLE)} NOLOGIN;
            COMMENT ON ROLE {ident(BYPASS_ROLE)} IS {literal(_ROLE_COMMENT)};
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL;
            WHEN insufficient_privilege THEN
                RAISE WARNING USING
                    MESSAGE = {literal(_NO_ROLE_WARNING)},
                    HINT = {literal(_NO_ROLE_HINT)};
        END;
    END IF;
END""")


_NO_ROLE_HINT = f"Run CREATE ROLE {BYPASS_ROLE} NOLOGIN as a role with CREATEROLE"
_ROLE_COMMENT = (
    "resilient_db: roles granted this one may bypass the status-transition triggers, "
    "one transaction at a time, through resilient_db bypass_transitions()"
)
_NO_ROLE_WARNING = (
    f"role {BYPASS_ROLE} does not exist and this role may not create it: the transition "
    "triggers are installed, and refuse every bypass until it exists"
)


# The WHENs compare the column's text bytewise. Under the column's own collation, a
# nondeterministic one (ICU, deterministic = false: case- or accent-insensitive) took 'PENDING'
# for the initial 'pending', so the function (which compares under the default collation, and
# refuses it) was never called, and a change of case only was not seen. Schema-qualified, so no
# collation "C" of another schema on the installer's search_path is bound instead.
_BYTEWISE = 'COLLATE pg_catalog."C"'


def _column_value(
    row: str, column: sa.Column[Any], field: Callable[[str, str], str] | None = None
) -> str:
    """``column`` of ``row`` (``NEW`` or ``OLD``) as the trigger compares its text: as it is, or
    a ``numeric`` without a scale without its trailing zeros (PostgreSQL keeps the decimals each
    value was written with, and ``3.000`` is the state 3: see :func:`trims_scale`). ``field``
    writes the column of the row: :func:`_field` in the function's body, else as a trigger's
    WHEN reads it (``NEW.`` and :func:`sql_ident`)."""
    value = f"{row}.{sql_ident(column.name)}" if field is None else field(row, column.name)
    return f"pg_catalog.trim_scale({value})" if trims_scale(column) else value


def _field(row: str, name: str) -> str:
    """The field ``name`` of ``row`` (``NEW`` or ``OLD``) in the function's body: ``NEW."name"``,
    or, for a name :func:`sql_ident` writes as a Unicode escape identifier (one that ``text()``,
    Alembic's ``op.execute``, would read a bind parameter in), ``(NEW).U&"..."``: PL/pgSQL
    looks a ``NEW.`` field up by the name as written, ``U&`` and escapes included ("record
    \"new\" has no field"), the SQL parser reads the one after ``(NEW).``."""
    quoted = sql_ident(name)
    return f"{row}.{quoted}" if quoted.startswith('"') else f"({row}).{quoted}"


def _plain_field(row: str, name: str) -> str:
    """The field ``name`` of ``row`` as releases before :func:`_field`'s ``U&`` spelling wrote
    it in the function's body (``NEW."name"``), which :func:`source_matches` still takes."""
    return f"{row}.{ident(name)}"


def column_text(row: str, column: sa.Column[Any]) -> str:
    """The text of ``column`` of ``row`` (``NEW`` or ``OLD``) as the trigger's WHEN compares it:
    cast to the built-in text (compared with the built-in text equality, named, whatever the
    installer's search_path holds) and bytewise (:data:`_BYTEWISE`), whatever the column's
    collation."""
    return f"{_column_value(row, column)}::pg_catalog.text {_BYTEWISE}"


# A WHEN is bound when the trigger is created, with the installer's search_path, and then runs
# at every write of the table, as whichever role writes: its operators are named
# (OPERATOR(pg_catalog.=): no IN, no IS DISTINCT FROM, which can't name theirs), and so are its
# type and collation. Releases before wrote IN and IS DISTINCT FROM: a search_path listing
# pg_catalog after another schema bound them to a ``text = text`` planted there.
def _when_member(expr: str, keys: Collection[Key]) -> str:
    """:func:`_member_sql` for a WHEN: ``= ANY`` of an array, the operator named."""
    array = "ARRAY[{}]::pg_catalog.text[]"
    return _membership(
        expr, keys, lambda states: f"coalesce({expr}\n    {EQ} ANY ({array.format(states)}), false)"
    )


def insert_when(guard: Guard) -> str:
    """The INSERT trigger's WHEN: the new row is not in an initial state."""
    return f"NOT ({_when_member(column_text('NEW', guard.column), guard.initial)})"


def update_when(guard: Guard) -> str:
    """The UPDATE trigger's WHEN: the column's text changed (bytewise). ``IS DISTINCT FROM``
    written with the equality named: not equal, or exactly one of the two NULL."""
    old, new = column_text("OLD", guard.column), column_text("NEW", guard.column)
    name = sql_ident(guard.column.name)
    return f"NOT coalesce({old}\n    {EQ} {new},\n    OLD.{name} IS NULL AND NEW.{name} IS NULL)"


def _printed_values(guard: Guard, row: str, quoted_column: str) -> list[str]:
    """:func:`column_text` as ``pg_get_triggerdef()`` prints it, :func:`unqualified`: the
    column read as is (a ``text`` column, whose cast is dropped) or cast (any other type); a
    ``numeric`` without a scale through ``trim_scale``."""
    value = f"{row}.{quoted_column}"
    if trims_scale(guard.column):
        read = [f"(trim_scale({value}))::text"]
    else:
        read = [value, f"({value})::text"]
    return [f'({text} COLLATE "C")' for text in read]


_QUALIFIED_OPERATOR: Final = re.compile(r"OPERATOR\(pg_catalog\.([^()\s]+)\)")


def unqualified(printed: str) -> str:
    """``printed`` (a WHEN as ``pg_get_triggerdef()`` prints it) without ``pg_catalog.``: the
    server qualifies a built-in operator, function, type or collation when another of its name
    is visible first on the session's search_path, and leaves it bare otherwise. Whether what
    is bound is built in is asked of the catalog (the trigger depends on nothing else)."""
    return _QUALIFIED_OPERATOR.sub(r"\1", printed).replace("pg_catalog.", "")


def update_when_printed(guard: Guard, quoted_column: str) -> set[str]:
    """:func:`update_when` as ``pg_get_triggerdef()`` prints it back (:func:`unqualified`), and
    the ``IS DISTINCT FROM`` of earlier releases (bound to the built-in equality when its
    trigger depends on no operator of another schema, which drift detection asks)."""
    found: set[str] = set()
    both_null = f"((old.{quoted_column} IS NULL) AND (new.{quoted_column} IS NULL))"
    for old, new in zip(
        _printed_values(guard, "old", quoted_column),
        _printed_values(guard, "new", quoted_column),
        strict=True,
    ):
        found.add(f"({old} IS DISTINCT FROM {new})")
        found.add(f"(NOT COALESCE(({old} = {new}), {both_null}))")
    return found


def _printed_literal(value: str, *, doubled_backslashes: bool) -> str:
    """``value`` as ``pg_get_triggerdef()`` prints a text constant: quotes doubled, and
    backslashes doubled too when the session has standard_conforming_strings off."""
    text = value.replace("'", "''")
    if doubled_backslashes:
        text = text.replace("\\", "\\\\")
    return f"'{text}'::text"


def insert_when_printed(guard: Guard, quoted_column: str) -> set[str]:
    """:func:`insert_when` as ``pg_get_triggerdef()`` prints it back (``quoted_column``: the
    column as the server quotes it; :func:`unqualified`): the column read as is (a ``text``
    column) or cast (any other type), bytewise, with the session's standard_conforming_strings
    on or off; and the ``IN`` of earlier releases (printed ``=`` for one state)."""
    found: set[str] = set()
    present = sorted((k for k in guard.initial if k is not None), key=sort_key)
    for value in _printed_values(guard, "new", quoted_column):
        for doubled in (False, True):
            literals = [_printed_literal(k, doubled_backslashes=doubled) for k in present]
            alternatives: list[list[str]] = [[]]
            if literals:
                any_of = f"COALESCE(({value} = ANY (ARRAY[{', '.join(literals)}])), false)"
                alternatives = [[any_of]]
                if len(literals) == 1:  # IN of one state, as earlier releases wrote it
                    alternatives.append([f"COALESCE(({value} = {literals[0]}), false)"])
            for states in alternatives:
                parts = [*states, f"({value} IS NULL)"] if None in guard.initial else states
                member = parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"
                found.add(f"(NOT {member})")
    return found


def install_statements(guard: Guard) -> list[str]:
    n = trigger_names(guard)
    n = _sql_names(n)
    return [
        f"CREATE OR REPLACE FUNCTION {n.function}() RETURNS trigger LANGUAGE plpgsql\n"
        f"SET search_path = pg_catalog, pg_temp\n"
        f"AS {_dollar_quote(_function_body(guard))}",
        f"COMMENT ON FUNCTION {n.function}() IS {literal(rules_stamp(guard))}",
        f"DROP TRIGGER IF EXISTS {sql_ident(n.insert_trigger)} ON {n.table}",
        f"CREATE TRIGGER {sql_ident(n.insert_trigger)} AFTER INSERT ON {n.table}\n"
        # only for a row not in an initial state: PostgreSQL queues an event for every row an
        # AFTER trigger fires for (held in memory to the statement's end), so a bulk INSERT of
        # rows starting as they should queues none; the function checks the same (col::text,
        # compared with the built-in text equality, named, whatever the installer's search_path
        # holds, and bytewise whatever the column's collation) for the rows it gets
        f"FOR EACH ROW WHEN ({insert_when(guard)})\n"
        f"EXECUTE FUNCTION {n.function}()",
        f"DROP TRIGGER IF EXISTS {sql_ident(n.update_trigger)} ON {n.table}",
        f"CREATE TRIGGER {sql_ident(n.update_trigger)} AFTER UPDATE ON {n.table}\n"
        # compared as text, as the function compares (col::text): and written so, with the
        # operator named, the WHEN is bound to the built-in text equality whatever the
        # installer's search_path holds (an equality of the column's own type planted in public,
        # varchar = varchar, which has no built-in exact match, would win and could keep the
        # trigger from ever firing; a text = text of a schema listed before pg_catalog too); and
        # bytewise, so a change of case under a case-insensitive collation is seen
        f"FOR EACH ROW WHEN ({update_when(guard)})\n"
        f"EXECUTE FUNCTION {n.function}()",
        _drop_legacy_function(n, guard),
    ]


def script_statements(guard: Guard) -> list[str]:
    """:func:`install_statements` for a script whose statements may each commit on their own
    (``psql`` runs a file so by default, as does an Alembic offline script without a
    transaction around it): the function, its stamp and both triggers in one ``DO`` block, one
    statement, so no statement leaves the table without its trigger (between a ``DROP TRIGGER``
    and its ``CREATE TRIGGER`` a concurrent write went unchecked) nor an older release's
    triggers calling the new function (a BEFORE trigger of generator v3 calling the new AFTER
    function, which returns NULL, skipped every write it fired for). The statements are those
    of :func:`install_statements`, unchanged (not indented: the function's source is what
    drift detection compares), so what is installed is the same. Before the triggers, the
    same block drops those that call a function of ours of another name, and that function, as
    an install on a server does (:func:`replaced_functions_statement`): the function of the
    table written otherwise goes with the triggers that called it, and the table is never
    without its triggers. No BEGIN or COMMIT: the script also runs inside a transaction
    (``op.execute``, ``psql -1``)."""
    create, comment, *triggers, legacy = install_statements(guard)
    ddl = [create, comment, _replaced_functions(guard, keep_own=True, inner=True), *triggers]
    return [_do("BEGIN\n" + "".join(f"{s};\n" for s in ddl) + "END"), legacy]


def replaced_functions_statement(guard: Guard, *, keep_own: bool = True) -> str:
    """Drop our INSERT and UPDATE triggers of ``guard``'s column on its table that call a
    function of ours (stamped) other than the one its install creates (``keep_own=False``:
    whichever function they call), then each such function no trigger calls any more, when
    this role may drop it (another role's, stamped like ours, stays). The function an earlier
    install put in under another name, the table written otherwise (its schema given or left
    to the search_path: see :func:`spellings`), goes with it; told by the function the
    table's triggers call, never by a name alone. Run before the triggers are created again,
    in the same transaction: the table is never without its triggers to another session."""
    return _do(_replaced_functions(guard, keep_own=keep_own))


def _replaced_functions(guard: Guard, *, keep_own: bool, inner: bool = False) -> str:
    """The PL/pgSQL block of :func:`replaced_functions_statement` (``inner``: see
    :func:`_our_triggers_dropped`)."""
    n = trigger_names(guard)
    ours = ", ".join(literal(t) for t in (n.insert_trigger, n.update_trigger))
    condition = f"t.tgname::pg_catalog.text {EQ} ANY (ARRAY[{ours}]::pg_catalog.text[])"
    if not keep_own:
        return _our_triggers_dropped(n.table, condition, inner=inner)
    own = literal(f"{n.function}()")
    return _our_triggers_dropped(
        n.table,
        f"{condition}\n            AND (v_own IS NULL OR t.tgfoid {NE} v_own)",
        f"\n    v_own pg_catalog.oid := pg_catalog.to_regprocedure({own})::pg_catalog.oid;",
        inner=inner,
    )


def online_install_statements(guard: Guard) -> list[str]:
    """:func:`install_statements` as an install on a server sends them, in one transaction:
    once the function exists, :func:`replaced_functions_statement` drops the triggers that
    call an earlier function of another name, and that function (no leftovers), as the
    scripts do (:func:`script_statements`, in their one block)."""
    create, comment, *rest = install_statements(guard)
    return [create, comment, replaced_functions_statement(guard), *rest]


def online_uninstall_statements(guard: Guard) -> list[str]:
    """:func:`drop_statements`: an uninstall on a server sends what the scripts hold."""
    return drop_statements(guard)


def drop_statements(guard: Guard) -> list[str]:
    """What removes ``guard``'s trigger, on a server and in a script alike: first our triggers
    of the column with whatever function of ours they call (installed under the other spelling
    of the table too: see :func:`spellings`), and that function; then the triggers and the
    function by their names, and the function of the old naming scheme."""
    n = _sql_names(trigger_names(guard))
    return [
        replaced_functions_statement(guard, keep_own=False),
        f"DROP TRIGGER IF EXISTS {sql_ident(n.insert_trigger)} ON {n.table}",
        f"DROP TRIGGER IF EXISTS {sql_ident(n.update_trigger)} ON {n.table}",
        f"DROP FUNCTION IF EXISTS {n.function}()",
        _drop_legacy_function(n, guard),
    ]


def stamp_prefix_pattern() -> str:
    """A LIKE pattern matching every stamp :func:`rules_stamp` writes (of any release)."""
    return stamp_prefix() + "%"


def stamp_prefix() -> str:
    """What every stamp :func:`rules_stamp` writes (of any release) starts with (for
    ``pg_catalog.starts_with``, which no operator of the caller's search_path can stand in
    for, as one can for ``LIKE``)."""
    return _STAMP_PREFIX + " "


_TRIGGER_PREFIX = "rdb_transition_"


def gone_column_condition(trigger: str, rel: str, indent: str = " ") -> str:
    """SQL true when ``trigger`` (a ``pg_trigger`` name, as text) on the table ``rel`` (its oid)
    is named ``rdb_transition_<column>_ins`` or ``_upd`` (as :func:`pg_name` names it when it
    does not cut the name) and ``<column>`` is not a column of the table any more (renamed or
    dropped). A name that was cut to fit (it ends in a hash) never says its column: false. Only
    built-in functions and operators on ``text`` (and ``oid``), schema-qualified (operators
    too: ``OPERATOR(pg_catalog.=)``). ``indent`` joins its lines."""
    prefix = len(_TRIGGER_PREFIX)
    lines = [
        f"(pg_catalog.length({trigger}) {GT} {prefix + 4}",
        f"AND pg_catalog.starts_with({trigger}, {literal(_TRIGGER_PREFIX)})",
        f"AND pg_catalog.right({trigger}, 4) {EQ} ANY (ARRAY['_ins', '_upd']::pg_catalog.text[])",
        "AND NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a",
        f"    WHERE a.attrelid {EQ} {rel} AND a.attnum {GT} 0 AND NOT a.attisdropped",
        f"    AND a.attname::pg_catalog.text {EQ}",
        # the name between the prefix and the suffix (a negative length: all but the last 4)
        f"        pg_catalog.left(pg_catalog.substr({trigger}, {prefix + 1}), -4)))",
    ]
    return indent.join(lines)


def left_over_statement(table: sa.Table, columns: Collection[str] = ()) -> str:
    """Drop our triggers on ``table`` whose column the table no longer has (renamed or dropped:
    the function reads a column that is gone, so every write it checks fails), and those of
    ``columns`` (named on purpose), then each one's function if no trigger calls it any more.
    Which column a trigger guards is read from its name, and whether the column exists from the
    table itself, when the statement runs: a trigger of ours for a column that exists is kept
    (another code base may declare it), and so is one whose name was cut to fit (its column
    can't be read back). Ours are told by their function's stamp (a ``COMMENT`` only install
    writes), never by name alone, so a trigger of the application's is never touched. A DO
    block, so that it runs where the statements run (also in a script written by Alembic's
    offline mode)."""
    named = sorted({pg_name("rdb_transition", c, op) for c in columns for op in ("ins", "upd")})
    condition = gone_column_condition("t.tgname::pg_catalog.text", "v_rel", "\n                ")
    if named:
        names = ", ".join(literal(n) for n in named)
        condition = (
            f"({condition}\n                OR t.tgname::pg_catalog.text {EQ} "
            f"ANY (ARRAY[{names}]::pg_catalog.text[]))"
        )
    return _do(_our_triggers_dropped(quoted_table(table), condition))


def _distinct_tables(tables: Iterable[sa.Table]) -> list[sa.Table]:
    found: list[sa.Table] = []
    for table in tables:
        if not any(same_table(table, seen) for seen in found):
            found.append(table)
    return found


def left_over_statements(
    tables: Iterable[sa.Table], columns: Mapping[str, Collection[str]] | None = None
) -> list[str]:
    """:func:`left_over_statement` for each of ``tables``; ``columns`` maps a table's
    :func:`quoted_table` to the columns whose triggers to drop on purpose."""
    return [
        left_over_statement(t, (columns or {}).get(quoted_table(t), ()))
        for t in _distinct_tables(tables)
    ]


def column_of_trigger(name: str) -> str | None:
    """The column a trigger of ours was named after, when its name says so (not cut)."""
    for suffix in ("_ins", "_upd"):
        prefix = _TRIGGER_PREFIX
        if name.startswith(prefix) and name.endswith(suffix):
            column = name[len(prefix) : -len(suffix)]
            if pg_name("rdb_transition", column, suffix[1:]) == name:
                return column
    return None


def _script(statements: Iterable[str]) -> str:
    return "".join(f"{s};\n\n" for s in statements).rstrip("\n") + "\n"


def guards_script(guards: Iterable[Guard]) -> str:
    """The script that installs ``guards`` (see :func:`transition_trigger_sql`)."""
    guards = list(guards)
    return _script(
        [
            bypass_role_statement(),
            *(s for g in guards for s in script_statements(g)),
            *left_over_statements(g.table for g in guards),
        ]
    )


def drop_script(statements: Iterable[str]) -> str:
    """``statements`` (a removal's) as a script (see :func:`transition_trigger_drop_sql`)."""
    return _script(statements)


def transition_trigger_sql(model: type[Any]) -> str:
    """The script of a model (see :func:`~._install.transition_trigger_sql`, the public one)."""
    return guards_script(trigger_guards(model))


def _named_columns(mapper: Any, tables: list[sa.Table], columns: object) -> dict[str, list[str]]:
    """``columns`` (the ``columns=`` of an uninstall) checked against ``tables``: each a column
    of one of them, by its name in the database or its mapped attribute's name. Returns, per
    table (:func:`quoted_table`), the database names of the columns it has."""
    model = mapper.class_.__name__
    if isinstance(columns, (str, bytes)) or not isinstance(columns, Iterable):
        raise TransitionRulesError(
            f"columns= takes a collection of column names (columns=({columns!r},)), not {columns!r}"
        )
    known = {c.name for t in tables for c in t.columns}
    found: dict[str, list[str]] = {}
    names = list(columns)
    if not names:
        raise TransitionRulesError(f"columns= names no column of {model}")
    for name in names:
        if not isinstance(name, str):
            raise TransitionRulesError(f"columns=: {name!r} is not a column name")
        column_name = name
        if name not in known:
            prop = mapper.columns.get(name)
            if isinstance(prop, sa.Column) and prop.name in known:
                column_name = prop.name
            else:
                raise TransitionRulesError(
                    f"columns=: {model} has no column {name!r} (its table has "
                    f"{', '.join(sorted(known))}); a trigger of ours for a column the table no "
                    "longer has (renamed or dropped) is dropped without being named"
                )
        for table in tables:
            if any(c.name == column_name for c in table.columns):
                found.setdefault(quoted_table(table), []).append(column_name)
    return found


def drop_plan(
    model: object, columns: Iterable[str] | None = None
) -> tuple[tuple[Guard, ...], list[sa.Table], dict[str, list[str]]]:
    """What an uninstall of ``model`` removes: without ``columns``, the triggers of its guards
    (it must declare ``__transitions__``); with ``columns``, our triggers of exactly those
    columns of its tables (whoever declares them, also for a model without
    ``__transitions__``). Both: ours on those tables for a column the table no longer has.
    Returns the guards, the tables and the named columns per table."""
    mapper = mapper_of(model)
    if columns is None:
        guards = tuple(g for g in compiled_guards(mapper) if g.lender is None)
        if not guards:
            name = mapper.class_.__name__
            raise TransitionRulesError(
                f"{name} declares no __transitions__: name the columns whose guards to drop, "
                f"uninstall_transition_trigger(bind, {name}, columns=(...)) or "
                f"transition_trigger_drop_sql({name}, columns=(...)) (the triggers of a column "
                "the table no longer has are dropped by either)"
            )
        return guards, _distinct_tables(g.table for g in guards), {}
    tables = _distinct_tables(t for t in mapper.tables if isinstance(t, sa.Table))
    return (), tables, _named_columns(mapper, tables, columns)


def drop_plan_statements(
    model: object, columns: Iterable[str] | None = None, *, online: bool = False
) -> list[str]:
    """The statements of a removal (``online``: as an uninstall on a server sends them, see
    :func:`online_uninstall_statements`; otherwise as the script has them)."""
    guards, tables, named = drop_plan(model, columns)
    per_guard = online_uninstall_statements if online else drop_statements
    return [*(s for g in guards for s in per_guard(g)), *left_over_statements(tables, named)]


def transition_trigger_drop_sql(model: type[Any], *, columns: Iterable[str] | None = None) -> str:
    """The removal script of a model (see :func:`~._install.transition_trigger_drop_sql`)."""
    return _script(drop_plan_statements(model, columns))
