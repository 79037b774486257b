"""The ORM bulk-UPDATE guard (``do_orm_execute``): ``update(Model).values(status=...)`` is
restricted to the rows that may legally make the move, or refused (``bulk_update="raise"``); an
UPDATE by primary key (a list of parameter sets) has each row locked and checked."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Iterator, Mapping
from typing import Any, NamedTuple, NoReturn

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Result
from sqlalchemy.orm import FromStatement, Mapper, ORMExecuteState
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import (
    BindParameter,
    ClauseElement,
    ColumnElement,
    Null,
)

from resilient_db._config import Config
from resilient_db._errors import IllegalTransitionError
from resilient_db._internals import (
    dml_values,
    empty_result,
    expand_composites,
    is_anonymous_bind,
    update_loader_criteria,
    with_dml_value,
    with_from_statement_element,
    with_where,
)
from resilient_db._observability import emit
from resilient_db._registry import service_of

from ._bypass import active_config
from ._changes import Change, as_declared, illegal, in_key_order, read_by_keys
from ._flush import key_text, state_of_text
from ._install import in_autocommit
from ._report import count, logger, report, row_keys, row_label, service_words, unit_service
from ._rules import Guard, Key, TransitionRulesError, compiled_guards, plain, same_rules, sort_key

__all__ = ["do_orm_execute"]


class _Target(NamedTuple):
    static: bool
    value: Any  # the Python value (static) or a SQL expression (dynamic)
    onupdate: bool = False  # the column's onupdate, which the statement does not override
    key: Any = None  # the values() key a SQL expression stands under (None: the onupdate's)


def _is_guard_key(key: Any, guard: Guard) -> bool:
    """Whether ``key`` of an UPDATE's ``values()`` names the guarded column: its attribute,
    its ``Column.key`` or its name, the column itself (also annotated, or as a column of an
    alias of its table), or any column whose key is the guarded column's."""
    if isinstance(key, str):
        return key in (guard.attr_key, guard.column.key, guard.column.name)
    element = key.__clause_element__() if hasattr(key, "__clause_element__") else key
    if element is guard.column:
        return True
    if not isinstance(element, sa.ColumnClause):
        return False
    # SQLAlchemy matches a values() key to the target table's columns by its key alone,
    # whatever table it belongs to: column("status"), literal_column("status") or another
    # model's Other.status all set the UPDATE's own status column
    return guard.column in element.proxy_set or element.key == guard.column.key


def _param_name(params: Any, guard: Guard, by_pk: str | None) -> str | None:
    """The execution parameter that sets the guarded column, if ``params`` has one: in a bulk
    UPDATE by primary key, the attribute ``by_pk`` (see :func:`_written_attr`), else the
    ``Column.key`` (as SQLAlchemy reads them)."""
    if not isinstance(params, Mapping):
        return None
    name = by_pk if by_pk is not None else guard.column.key
    return name if name in params else None


def _written_attr(mapper: Mapper[Any], guard: Guard) -> str:
    """The attribute a bulk UPDATE by primary key through ``mapper`` reads the guarded column
    from: the one the mapper maps the column to. A column mapped under two attributes
    (``legacy = column_property(tasks.c.status)`` beside ``status``) is written from the one
    mapped last, which need not be the one the rules name; the other is ignored there."""
    return mapper.get_property_by_column(guard.column).key


def _row_key_attrs(mapper: Mapper[Any], guard: Guard) -> tuple[str, ...]:
    """The attributes a bulk UPDATE by primary key through ``mapper`` finds the guarded row by:
    those mapped to the key columns of the guarded column's table, which SQLAlchemy reads for
    that table's UPDATE. A joined-table subclass may map its table's key under attributes of
    its own (``cid``, its base's ``pid``): its row there is found by ``cid``."""
    return tuple(mapper.get_property_by_column(c).key for c in guard.pk_columns)


def _target(stmt: Any, params: Any, guard: Guard, *, by_pk: str | None = None) -> _Target | None:
    """The state the UPDATE writes into the guarded column, as SQLAlchemy will send it: a
    literal of ``values()`` is a parameter named after the column, which an execution
    parameter of that name replaces; a ``bindparam()`` of its own takes its own parameter."""
    given = _param_name(params, guard, by_pk)
    for key, value in dml_values(stmt):
        if _is_guard_key(key, guard):
            if given is not None and _replaceable(value):
                return _Target(True, params[given])
            return _resolve_value(value, params)._replace(key=key)
    if given is not None:
        return _Target(True, params[given])
    return _onupdate(guard)


def _onupdate(guard: Guard) -> _Target | None:
    """The state an UPDATE that does not set the guarded column writes into it all the same:
    the column's ``onupdate``, which SQLAlchemy applies to every such statement (and to every
    parameter set without the column). A value is judged as one given in ``values()``, a SQL
    expression as such an expression is; a Python function's value is computed by SQLAlchemy
    only as it runs the UPDATE (with the statement's execution context), after the check:
    refused."""
    default = guard.column.onupdate
    if not isinstance(default, sa.ColumnDefault):
        return None  # none (a Sequence is no onupdate SQLAlchemy applies)
    if default.is_scalar:
        return _Target(True, default.arg, onupdate=True)
    if default.is_clause_element:
        return _Target(False, default.arg, onupdate=True)
    raise TransitionRulesError(
        f"an UPDATE of {guard.model} that does not set {guard.attr_key} sets it all the same "
        f"through the column's onupdate, a Python function SQLAlchemy calls only as it runs the "
        f"UPDATE: the guard can't judge the state it writes before; set {guard.attr_key} in "
        f"the statement (values(), or each parameter set), or give the column a value or a SQL "
        f"expression as its onupdate"
    )


def _replaceable(value: Any) -> bool:
    """A ``values()`` entry an execution parameter named after the column replaces: a plain
    value, or the anonymous parameter SQLAlchemy makes of it (also of ``literal()``)."""
    if isinstance(value, BindParameter):
        return is_anonymous_bind(value)
    return not (isinstance(value, ClauseElement) or hasattr(value, "__clause_element__"))


def _resolve_value(value: Any, params: Any) -> _Target:
    if isinstance(value, BindParameter):
        if value.callable is not None:
            return _Target(True, value.callable())
        if isinstance(params, Mapping) and value.key in params:
            return _Target(True, params[value.key])
        return _Target(True, value.value)
    if isinstance(value, Null):
        return _Target(True, None)
    if isinstance(value, ClauseElement) or hasattr(value, "__clause_element__"):
        return _Target(False, value)
    return _Target(True, value)


class _Named(NamedTuple):
    """The guarded table's columns as the UPDATE names its target (the mapped class, or an
    alias of its table)."""

    status: Any  # the guarded column
    pks: tuple[Any, ...]  # the primary key
    of: Any  # what a locking read locks


def _named(stmt: Any, mapper: Mapper[Any], guard: Guard) -> _Named:
    entity = stmt.entity_description.get("entity") if hasattr(stmt, "entity_description") else None
    insp = sa.inspect(entity, raiseerr=False) if entity is not None else None
    if insp is None or not getattr(insp, "is_aliased_class", False):
        return _Named(
            getattr(mapper.class_, guard.attr_key),
            guard.pk_columns,
            guard.table,
        )
    selectable = insp.selectable
    pks = tuple(
        selectable.corresponding_column(c) if isinstance(selectable, sa.Alias) else None
        for c in guard.pk_columns
    )
    if (
        not isinstance(selectable, sa.Alias)
        or selectable.element is not guard.table
        or any(c is None for c in pks)
    ):
        raise TransitionRulesError(
            f"update() of an alias of {guard.model} that is not an alias of its table "
            f"{guard.table.name!r}: the guard of {guard.model}.{guard.attr_key} can't name "
            f"its rows; update({guard.model}) instead"
        )
    return _Named(getattr(entity, guard.attr_key), pks, selectable)


def _loader_criteria(
    orm_state: ORMExecuteState, stmt: Any, mapper: Mapper[Any], guard: Guard, named: _Named
) -> Any:
    """The criteria the ORM adds to the UPDATE for its ``with_loader_criteria()`` options (its
    own, or given by a ``do_orm_execute`` listener that ran before this one), as a condition
    of the check (None: no such criteria). SQLAlchemy adds them to an UPDATE with WHERE
    criteria ("orm" strategy), not to one run as Core ("core_only") or by primary key
    ("bulk"). It adds them on the table, also to an UPDATE of an alias of it (``UPDATE tasks AS
    t ... FROM tasks WHERE tasks...``): the alias's rows change if any row of the table meets
    them, which the check asks as such (a join would count each row once per such row).

    Criteria a listener running after this one adds (one registered later on a Session
    class, or on a factory or a session: SQLAlchemy runs a class's listeners first) are not
    seen: the check is then wider than the UPDATE, as without criteria, never narrower, and
    the UPDATE's own condition still leaves every illegal move out. The check is no SELECT
    run through the session: a listener adding criteria to SELECTs only would narrow it."""
    extra = update_loader_criteria(stmt, mapper)
    if not extra or orm_state.execution_options.get("dml_strategy") in ("core_only", "bulk"):
        return None
    if named.of is not guard.table:
        return sa.exists().where(*extra)
    return sa.and_(*extra)


def _with(criteria: Any, extra: Any) -> Any:
    """The statement's own criteria and the ORM's ``extra`` ones, either may be None."""
    if extra is None:
        return criteria
    return extra if criteria is None else sa.and_(criteria, extra)


def _membership(expr: Any, guard: Guard, keys: Collection[Key]) -> ColumnElement[bool]:
    present = [k for k in keys if k is not None and k in guard.binds]
    parts: list[ColumnElement[bool]] = []
    if present:
        parts.append(expr.in_([guard.binds[k] for k in sorted(present, key=sort_key)]))
    if None in keys:
        parts.append(expr.is_(None))
    if not parts:
        return sa.false()
    return parts[0] if len(parts) == 1 else sa.or_(*parts)


def _legal_predicate(guard: Guard, col: Any, new: Any) -> ColumnElement[bool]:
    """SQL: the row may move from ``col`` to the value of expression ``new``. Equalities, not
    ``IN`` or ``IS NOT DISTINCT FROM``: an executemany can't take an expanding ``IN``, and the
    ORM's "evaluate" synchronization can evaluate neither."""
    parts: list[ColumnElement[bool]] = [col == new, sa.and_(col.is_(None), new.is_(None))]
    for source, targets in sorted(guard.next.items(), key=lambda kv: sort_key(kv[0])):
        if not targets:
            continue
        at_source = col.is_(None) if source is None else col == guard.binds[source]
        into = [new == guard.binds[k] for k in sorted(targets - {None}, key=sort_key)]
        if None in targets:
            into.append(new.is_(None))
        parts.append(sa.and_(at_source, sa.or_(*into)))
    return sa.or_(*parts)


def do_orm_execute(orm_state: ORMExecuteState) -> Result[Any] | None:
    if not orm_state.is_update and type(orm_state.statement) is not FromStatement:
        return None
    session = orm_state.session
    config = active_config(session)
    if config is None:
        return None
    stmt: Any = orm_state.statement
    outer = None
    if type(stmt) is FromStatement:  # (select(Model).from_statement(update(Model)...))
        # select(Model).from_statement(update(Model)...returning(Model)): the UPDATE inside
        # is judged and restricted as one run by itself, then run as given (SQLAlchemy
        # reports the wrapper as an UPDATE)
        outer, stmt = stmt, stmt.element
        if not (stmt.is_dml and stmt.is_update):
            return None
    mapper = orm_state.bind_mapper
    if mapper is None:
        return None
    guards = compiled_guards(mapper)
    params = orm_state.parameters
    if len(mapper.self_and_descendants) > 1:
        _refuse_other_rules(stmt, params, mapper, guards)
    if not guards:
        return None
    if isinstance(params, (list, tuple)):
        # A list of parameter sets: SQLAlchemy's "bulk UPDATE by primary key" unless the
        # statement asks for an executemany of itself ("orm" / "core_only", WHERE allowed)
        if orm_state.execution_options.get("dml_strategy", "auto") in ("auto", "bulk"):
            return _bulk_by_pk(orm_state, config, mapper, guards, list(params), stmt=stmt)
        return _restrict_many(
            orm_state, config, mapper, guards, list(params), given=stmt, outer=outer
        )
    for guard in guards:
        target = _target(stmt, params, guard)
        if target is not None:
            named = _named(stmt, mapper, guard)
            extra = _loader_criteria(orm_state, stmt, mapper, guard, named)
            col = named.status
            criteria = _with(stmt.whereclause, extra)
            exec_params = dict(params) if isinstance(params, Mapping) else {}
            if _judged_once(stmt, named, criteria, target):
                stmt = _restrict_to_judged(
                    orm_state,
                    config,
                    guard,
                    named=named,
                    stmt=stmt,
                    criteria=criteria,
                    target=target,
                    exec_params=exec_params,
                )
            else:
                if target.static:
                    legal = _membership(col, guard, guard.sources_of(guard.key(target.value)))
                    new_expr: Any = None
                    shown = repr(plain(target.value))
                else:
                    new_expr = sa.type_coerce(target.value, guard.column.type)
                    legal = _legal_predicate(guard, col, new_expr)
                    shown = "(SQL expression)"
                    stmt = _set_once(stmt, guard, named, target, new_expr)
                _check_rows(
                    orm_state,
                    config=config,
                    guard=guard,
                    named=named,
                    where=(criteria, legal),
                    param_sets=[exec_params],
                    new=(new_expr, target.value),
                    shown=shown,
                )
                stmt = stmt.where(legal)
            if orm_state.execution_options.get("synchronize_session", "auto") in (
                "auto",
                "evaluate",
            ):
                # "fetch" (on PostgreSQL the rows' keys come back with the UPDATE: no round
                # trip more): "evaluate" would judge the legal condition against the states of
                # the session's objects, which may be older than their rows', and set an
                # object whose row the condition left alone (or leave one it moved)
                stmt = _synchronized_by(orm_state, stmt, "fetch")
    orm_state.statement = _as_given(outer, stmt)
    return None


#: Functions PostgreSQL evaluates to the same value for the same arguments throughout a
#: transaction, without side effects (IMMUTABLE, or STABLE and fixed per transaction, as
#: ``now()``): criteria made of these, the row's columns and parameters match the same rows
#: in the check and in the UPDATE. Any other function may not (``random()``, ``nextval()``,
#: ``clock_timestamp()``, ``statement_timestamp()``, a function of the application's, which
#: may also write).
_STEADY_FUNCTIONS = frozenset(
    {
        "abs", "array_length", "btrim", "cardinality", "ceil", "ceiling", "char_length",
        "character_length", "coalesce", "concat", "concat_ws", "current_date",
        "current_time", "current_timestamp", "date_part", "date_trunc", "floor", "greatest",
        "left", "least", "length", "localtime", "localtimestamp", "lower", "lpad", "ltrim",
        "md5", "mod", "now", "nullif", "octet_length", "position", "replace", "right",
        "round", "rpad", "rtrim", "sign", "split_part", "starts_with", "strpos", "substr",
        "substring", "transaction_timestamp", "trim", "trunc", "upper",
    }
)  # fmt: skip


def _unsteady(element: Any) -> bool:
    """Whether the SQL expression ``element`` (or None) may evaluate otherwise, or have side
    effects, when evaluated again by the next statement of the transaction: it calls a
    function not in :data:`_STEADY_FUNCTIONS`, a sequence's ``next_value()``, reads a
    subquery (rows other transactions may change meanwhile; ``FOR UPDATE SKIP LOCKED LIMIT
    1`` picks another row each time it runs elsewhere) or holds SQL text the guard can't read."""
    if element is None:
        return False
    for node in visitors.iterate(element):
        if isinstance(node, sa.FunctionElement):
            if str(getattr(node, "name", "")).lower() not in _STEADY_FUNCTIONS:
                return True
        elif isinstance(node, (sa.SelectBase, sa.TextClause)) or (
            isinstance(node, sa.ColumnClause) and node.is_literal
        ):
            return True
    return False


def _judged_once(stmt: Any, named: _Named, criteria: Any, target: _Target) -> bool:
    """Whether the UPDATE ``stmt`` is to be restricted to the keys of the rows its check
    judged (:func:`_restrict_to_judged`) rather than carry its criteria to the server again:
    its criteria, or the new state it sets (a SQL expression), are not steady
    (:func:`_unsteady`). Not when they read a data-modifying WITH (its change is the UPDATE's
    to make: the check runs in a savepoint rolled back, see :func:`_check_rows`), nor when
    the UPDATE reads another table (``UPDATE ... FROM``, whose join the criteria hold: other
    values of the SET read the joined row).

    Measured against the two evaluations it replaces: the same two statements, but every
    matched row's key comes back with the check and goes out again with the UPDATE (one
    array parameter), and the UPDATE finds its rows by key, not by its criteria. Cheap for
    the few rows such criteria pick (a queue's next row), a cost for a statement moving many
    rows by plain criteria, whose second evaluation matches the rows the check locked: those
    keep the criteria (the common case)."""
    new = None if target.static else target.value
    if not (_unsteady(criteria) or _unsteady(new)) or _modifies_data(criteria, new):
        return False
    values = [v for _, v in dml_values(stmt)]
    probe = sa.select(
        *named.pks,
        *(
            v.__clause_element__() if hasattr(v, "__clause_element__") else v
            for v in values
            if isinstance(v, ClauseElement) or hasattr(v, "__clause_element__")
        ),
    )
    if criteria is not None:
        probe = probe.where(criteria)
    return len(probe.get_final_froms()) <= 1


def _by_keys(pks: tuple[Any, ...], keys: list[tuple[Any, ...]]) -> ColumnElement[bool]:
    """SQL: the row's key is one of ``keys``, sent as one array parameter per key column
    (whatever their number: no parameter limit, one statement to cache)."""
    arrays = [
        sa.cast(sa.bindparam(None, [k[n] for k in keys]), postgresql.ARRAY(pk.type))
        for n, pk in enumerate(pks)
    ]
    if len(pks) == 1:
        found: ColumnElement[bool] = pks[0] == sa.any_(arrays[0])
        return found
    return sa.tuple_(*pks).in_(sa.select(*(sa.func.unnest(a) for a in arrays)))


def _restrict_to_judged(
    orm_state: ORMExecuteState,
    config: Config,
    guard: Guard,
    *,
    named: _Named,
    stmt: Any,
    criteria: Any,
    target: _Target,
    exec_params: dict[str, Any],
) -> Any:
    """The check of an UPDATE whose criteria or new state are not steady (see
    :func:`_judged_once`), evaluating them once: one locking read of the rows the criteria
    match (in key order), their keys, states and (for a SQL expression) new states, judged
    here; raise mode refuses an illegal move, filter mode leaves it out and logs it. Returns
    the UPDATE restricted to the keys of the legal rows, its criteria dropped (evaluated
    again they would match other rows, and repeat a side effect: an audit row written, a
    sequence advanced), with the legal condition of a value kept (the rows are locked, but in
    AUTOCOMMIT mode the locks end with the check). A new state given as a SQL expression is
    written as the check computed it for each row: a ``CASE`` by key over the states
    written, each where the row's state may still move there; the SET's expression is not
    evaluated again."""
    col = named.status
    n_pk = len(named.pks)
    selected = [*named.pks, key_text(col)]  # (its text: see _held)
    if not target.static:
        selected.append(sa.type_coerce(target.value, guard.column.type))
    matched = sa.select(*selected)
    if criteria is not None:
        matched = matched.where(criteria)
    matched = matched.order_by(*named.pks).with_for_update(of=named.of)
    conn = _connection_of(orm_state)
    legal: list[tuple[tuple[Any, ...], Any, Any]] = []  # key, state, new state
    blocked: list[tuple[Any, ...]] = []  # key..., state, new state
    for row in conn.execute(matched, exec_params):
        key, old = tuple(row[:n_pk]), _held(guard, row[n_pk])
        new = target.value if target.static else row[n_pk + 1]
        if guard.legal(guard.key(old), guard.key(new)):
            legal.append((key, old, new))
        else:
            blocked.append((*key, old, new))
    if blocked:
        if config.bulk_update == "raise":
            _raise_blocked(guard, blocked, n_pk, config, service_of(orm_state.session))
        shown = repr(plain(target.value)) if target.static else "(SQL expression)"
        _log_filtered(orm_state, config, guard, n_blocked=len(blocked), shown=shown, target=target)
    keys = [key for key, _, _ in legal]
    if target.static:
        sources = guard.sources_of(guard.key(target.value))
        return with_where(stmt, _by_keys(named.pks, keys), _membership(col, guard, sources))
    moved: dict[Key, list[tuple[Any, ...]]] = {}
    for key, old, new in legal:
        if guard.key(new) != guard.key(old):  # a row keeping its state is written no state
            moved.setdefault(guard.key(new), []).append(key)
    whens = [
        (
            sa.and_(_by_keys(named.pks, by_state), _membership(col, guard, guard.sources_of(k))),
            sa.cast(sa.null(), guard.column.type)
            if k is None
            else sa.literal(guard.binds[k], guard.column.type),
        )
        for k, by_state in sorted(moved.items(), key=lambda kv: sort_key(kv[0]))
    ]
    written = sa.case(*whens, else_=col) if whens else col
    where = target.key if target.key is not None else col
    return with_where(with_dml_value(stmt, where, written), _by_keys(named.pks, keys))


def _log_filtered(
    orm_state: ORMExecuteState,
    config: Config,
    guard: Guard,
    *,
    n_blocked: int,
    shown: str,
    target: _Target | None,
) -> None:
    """Filter mode: count and log the ``n_blocked`` rows a bulk UPDATE leaves out (``target``
    the state written, None or a SQL expression when not one value)."""
    count("bulk_rows_filtered", n_blocked)
    service = unit_service(service_of(orm_state.session))
    emit(
        config,
        logger,
        logging.WARNING,
        "Status transition blocked for %d row(s): %sbulk UPDATE of %s.%s "
        "to %s left them unchanged (filter mode)",
        n_blocked,
        service_words(service),
        guard.model,
        guard.attr_key,
        shown,
        event="transition_blocked",
        unit_service=service,
        model=guard.model,
        column=guard.attr_key,
        to_state=plain(target.value) if target is not None and target.static else None,
        via="orm-update",
        stale=False,
        blocked_rows=n_blocked,
    )


def _as_given(outer: Any, stmt: Any) -> Any:
    """The UPDATE ``stmt`` as the application gave it: by itself, or inside the
    ``from_statement()`` wrapper ``outer``."""
    return stmt if outer is None else with_from_statement_element(outer, stmt)


def _set_once(stmt: Any, guard: Guard, named: _Named, target: _Target, new_expr: Any) -> Any:
    """``stmt`` writing the new state ``new_expr`` (a SQL expression) through
    :func:`_written_once`: where the statement gives it (or, for the column's ``onupdate``,
    as a value of its own, which SQLAlchemy then no longer adds)."""
    key = target.key if target.key is not None else named.status
    return with_dml_value(stmt, key, _written_once(guard, named.status, new_expr))


def _written_once(guard: Guard, col: Any, new: Any) -> Any:
    """What the SET writes for a new state given as the SQL expression ``new``: its value where
    the row's state ``col`` may move to it (or holds it), else ``col`` (the row keeps its state).

    The legal condition added to the UPDATE's WHERE evaluates ``new`` apart from the SET, and
    the server evaluates an expression each time it appears: a volatile one (``nextval()``,
    ``random()``, ``clock_timestamp()``, a VOLATILE function) could be legal in the WHERE and
    illegal in the SET. Here it appears once, as the operand of a simple ``CASE``, which the
    server evaluates once and compares with each declared state; the state written is the
    declared one it equals. (A ``CASE`` of conditions would evaluate it in each; a subquery
    would keep it once too, but SQLAlchemy compiles a scalar subquery of the application's
    inside one without correlating it to the UPDATE's table.) Where ``None`` is a state a row
    may move to, the operand is ``ARRAY[new]``, whose equality holds for NULL too."""
    by_target: dict[Key, set[Key]] = {}
    for source, targets in guard.next.items():
        for target in targets:
            by_target.setdefault(target, set()).add(source)
    to_null = None in by_target
    whens: list[tuple[Any, Any]] = []
    for target in sorted(by_target, key=sort_key):
        sources = sorted(guard.sources_of(target), key=sort_key)
        if target is None:
            state: Any = sa.cast(sa.null(), guard.column.type)
        else:
            state = sa.literal(guard.binds[target], guard.column.type)
        # equalities, not IN: an executemany can't take an expanding IN
        held = [col.is_(None) if k is None else col == guard.binds[k] for k in sources]
        written = sa.case((sa.or_(*held), state), else_=col)
        whens.append((postgresql.array([state]) if to_null else state, written))
    if not whens:
        return col
    operand = postgresql.array([new]) if to_null else new
    return sa.case(*whens, value=operand, else_=col)


def _synchronized_by(orm_state: ORMExecuteState, stmt: Any, how: Any) -> Any:
    """``stmt``, to be synchronized with the session by ``how`` instead of ``"evaluate"``: the
    legal condition added is about the rows' states in the database, which the session's
    objects may not hold (and one for a new state given as a SQL expression SQLAlchemy's
    evaluator refuses, where the statement without it ran)."""
    orm_state.update_execution_options(synchronize_session=how)
    return stmt.execution_options(synchronize_session=how)


def _refuse_other_rules(
    stmt: Any, params: Any, mapper: Mapper[Any], guards: tuple[Guard, ...]
) -> None:
    """A bulk UPDATE through ``mapper`` that sets a column its subclasses guard by rules of
    their own (or that only they guard): one statement's condition can't hold both sets of
    rules for rows it can't tell apart, so it is refused, naming the classes."""
    first = params[0] if isinstance(params, (list, tuple)) and params else params
    for sub in mapper.self_and_descendants:
        if sub is mapper:
            continue
        for guard in compiled_guards(sub):
            if guard.table not in mapper.tables:
                continue  # rows the UPDATE can't reach (a concrete subclass's own table)
            own = next((g for g in guards if g.column is guard.column), None)
            if same_rules(guard, own) or (
                _target(stmt, first, guard) is None
                and _target(stmt, first, guard, by_pk=_written_attr(sub, guard)) is None
            ):
                continue
            name = mapper.class_.__name__
            which = f"rules other than {name}'s" if own is not None else f"rules {name} lacks"
            raise TransitionRulesError(
                f"update({name}) sets {name}.{guard.attr_key}, which {guard.model} (a subclass "
                f"keeping its rows in table {guard.table.name!r}) guards by {which}: the "
                f"guard can't tell its rows apart in one statement; update them with "
                f"update({guard.model}) and the others with a WHERE criterion leaving "
                f"{guard.model}'s rows out"
            )


def _restrict_many(
    orm_state: ORMExecuteState,
    config: Config,
    mapper: Mapper[Any],
    guards: tuple[Guard, ...],
    params: list[Any],
    *,
    given: Any,
    outer: Any,
) -> Result[Any] | None:
    """An UPDATE executed once per parameter set (its WHERE criteria pick the rows): each
    set's target state travels as a parameter of ours, so the one statement holds the legal
    condition of every set; each set's rows are checked (or counted) before it runs. The
    restricted statement runs through ``invoke_statement``, which adds our parameters to each
    set. ``given``: the UPDATE, run inside ``outer`` when that is a ``from_statement()``
    wrapper."""
    stmt: Any = given
    if not params or not all(isinstance(p, Mapping) for p in params):
        return None  # nothing to run, or not parameter sets SQLAlchemy would take
    sets = [dict(p) for p in params]  # copies: the caller's dicts are left as they were
    ours: list[str] = []  # the names of the parameters added to each set
    expression = False  # a new state given as a SQL expression (see below)
    for n, guard in enumerate(guards):
        targets = [_target(stmt, p, guard) for p in sets]
        first = next((t for t in targets if t is not None), None)
        if first is None:
            continue
        if first.static:
            name = f"rdb_new_{n}"
            ours.append(name)
            for p, target in zip(sets, targets, strict=True):
                p[name] = None if target is None else target.value
            new_expr: Any = sa.bindparam(name, type_=guard.column.type)
            values = {guard.key(p[name]): p[name] for p in sets}
            shown = "(one state per parameter set)"
            if len(values) == 1:
                shown = repr(plain(next(iter(values.values()))))
        else:
            new_expr = sa.type_coerce(first.value, guard.column.type)
            shown = "(SQL expression)"
            expression = True
        named = _named(stmt, mapper, guard)
        if not first.static:
            stmt = _set_once(stmt, guard, named, first, new_expr)
        legal = _legal_predicate(guard, named.status, new_expr)
        _check_rows(
            orm_state,
            config=config,
            guard=guard,
            named=named,
            where=(
                _with(stmt.whereclause, _loader_criteria(orm_state, stmt, mapper, guard, named)),
                legal,
            ),
            param_sets=sets,
            new=(new_expr, None),
            shown=shown,
        )
        stmt = stmt.where(legal)
    if stmt is given:
        return None  # no guarded column set: the statement runs as it is
    added = [{name: p[name] for name in ours} for p in sets]
    if expression and orm_state.execution_options.get("synchronize_session", "auto") in (
        "auto",
        "evaluate",
    ):
        # "fetch" (what "auto" falls back to) takes no parameter sets: not synchronized, as
        # SQLAlchemy's "evaluate" leaves the session's objects here anyway
        stmt = _synchronized_by(orm_state, stmt, False)
    return orm_state.invoke_statement(
        statement=_as_given(outer, stmt), params=added if ours else None
    )


def _check_rows(
    orm_state: ORMExecuteState,
    *,
    config: Config,
    guard: Guard,
    named: _Named,
    where: tuple[Any, ColumnElement[bool]],
    param_sets: list[dict[str, Any]],
    new: tuple[Any, Any],
    shown: str,
) -> None:
    """Before a bulk UPDATE restricted to the rows that may legally move (``where``: the
    statement's own criteria and the legal condition): raise for the first row it would
    leave behind ("raise" mode), or count and log them ("filter" mode), one query per
    parameter set; over several sets, a row one set moves is judged for the next from the
    state it leaves it in. ``new``: the target as a SQL expression (or None) and as a value
    (when static).

    The query locks every row the statement's criteria match (in key order, as concurrent
    flushes lock), not only those it would leave behind, so that the answer holds for the
    UPDATE that follows: another transaction can no longer move a row the check found legal
    into a state the UPDATE then leaves out, unseen (the UPDATE locks those rows itself
    anyway, a moment later). It returns only the rows left behind (or their count). Rows that
    come to match the criteria only after the check (a change committed in between, under
    READ COMMITTED) are judged by the UPDATE's condition alone."""
    session = orm_state.session
    conn = _connection_of(orm_state)
    # Criteria (or a new state) reading a data-modifying WITH (an INSERT, UPDATE or DELETE
    # ... RETURNING made a CTE: the queue-pop pattern) put that statement in the check's query
    # too: run as it is, the check would make that change before the UPDATE makes it once more
    # (a DELETE's rows gone when the UPDATE looks for them, an INSERT's key taken). Such a
    # check runs inside a savepoint rolled back after it, so the UPDATE finds the rows as the
    # check did; the locks the check took go with it (the UPDATE's condition still judges
    # every row it changes). Without a transaction (AUTOCOMMIT) nothing can undo the check's
    # change: it is left out in filter mode (the UPDATE's condition alone leaves the illegal
    # moves out, not logged), refused in raise mode.
    undo: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if _modifies_data(where[0], new[0]):
        if not in_autocommit(conn):
            undo = _rolled_back(conn)
        elif config.bulk_update == "raise":
            raise TransitionRulesError(
                f"an UPDATE of {guard.model} whose criteria or new {guard.attr_key} read a "
                f"data-modifying WITH (an INSERT, UPDATE or DELETE made a CTE) can't be "
                f"checked before it runs on a connection in AUTOCOMMIT mode: the check would "
                f"make and commit that change before the UPDATE makes it again; run it in a "
                f"transaction, or with SELF_HEALING_BULK_UPDATE=filter"
            )
        else:
            return
    with undo:
        criteria, legal = where
        new_expr, value = new
        col = named.status
        blocked: ColumnElement[bool] = sa.not_(sa.func.coalesce(legal, sa.false()))
        n_pk = len(named.pks)
        # the mapped attribute brings the ORM's criteria of a single-table subclass (the
        # discriminator), as the UPDATE has them
        selected = [
            *(pk.label(f"rdb_k{n}") for n, pk in enumerate(named.pks)),
            key_text(col).label("rdb_old"),  # (its text: see _held)
            blocked.label("rdb_blocked"),
        ]
        if new_expr is not None:
            selected.append(new_expr.label("rdb_new"))
        matched = sa.select(*selected)
        if criteria is not None:
            matched = matched.where(criteria)
        matched = matched.order_by(*named.pks).with_for_update(of=named.of)
        # materialized: the server runs the locking read in full, whatever the outer query keeps
        rows_q = matched.cte("rdb_matched").prefix_with("MATERIALIZED", dialect="postgresql")
        left = rows_q.c
        if len(param_sets) > 1 and new_expr is not None:
            # sets run in turn, and one may move a row that an earlier set moved: each row is
            # judged from the state the sets before leave it in, as the UPDATE's condition judges
            # it set after set (not from the state all sets found)
            in_turn = _blocked_in_turn(conn, guard, rows_q, n_pk, param_sets)
            if config.bulk_update == "raise":
                for blocked_rows in in_turn:
                    if blocked_rows:
                        _raise_blocked(guard, blocked_rows, n_pk, config, service_of(session))
                return
            n_blocked = sum(map(len, in_turn))
        elif config.bulk_update == "raise":
            shown_cols = [*(left[f"rdb_k{n}"] for n in range(n_pk)), left.rdb_old]
            if new_expr is not None:
                shown_cols.append(left.rdb_new)
            query = (
                sa.select(*shown_cols)
                .where(left.rdb_blocked)
                .order_by(*(left[f"rdb_k{n}"] for n in range(n_pk)))
            )
            for exec_params in param_sets:
                rows = [
                    (*row[:n_pk], _held(guard, row[n_pk]), *row[n_pk + 1 :])
                    for row in conn.execute(query, exec_params)
                ]
                if rows:
                    _raise_blocked(
                        guard,
                        rows,
                        n_pk,
                        config,
                        service_of(session),
                        *(() if new_expr is not None else (value,)),
                    )
            return
        else:
            count_q = sa.select(sa.func.count()).select_from(rows_q).where(left.rdb_blocked)
            n_blocked = sum(int(conn.execute(count_q, p).scalar_one()) for p in param_sets)
        if n_blocked:
            static = None if new_expr is not None else _Target(True, value)
            _log_filtered(orm_state, config, guard, n_blocked=n_blocked, shown=shown, target=static)


@contextlib.contextmanager
def _rolled_back(conn: Connection) -> Iterator[None]:
    """A savepoint on ``conn`` around the block, rolled back after it whatever happens."""
    savepoint = conn.begin_nested()
    try:
        yield
    finally:
        savepoint.rollback()


def _connection_of(orm_state: ORMExecuteState) -> Connection:
    """The connection the session runs the UPDATE on, which the check must read and lock the
    rows through: the one its bind arguments pick, as SQLAlchemy picks it (the statement's
    mapper and the statement itself, which a ``get_bind()`` routing writes to the primary and
    reads to a replica looks at; a ``bind`` given to ``execute()``), not the mapper's alone."""
    return orm_state.session.connection(bind_arguments=dict(orm_state.bind_arguments))


def _modifies_data(*elements: Any) -> bool:
    """Whether any of ``elements`` (SQL expressions, or None) reads a data-modifying common
    table expression (``insert()``/``update()``/``delete()`` made a CTE), which a query
    holding the element runs each time it is run."""
    return any(
        isinstance(node, sa.CTE) and node.element.is_dml
        for element in elements
        if element is not None
        for node in visitors.iterate(element)
    )


def _blocked_in_turn(
    conn: Any, guard: Guard, rows_q: Any, n_pk: int, param_sets: list[dict[str, Any]]
) -> list[list[tuple[Any, ...]]]:
    """The rows each parameter set would leave behind (key..., state, new state), the sets
    taken in turn: a row an earlier set moved is judged from the state that set leaves it in
    (the new state of an expression is the one the check computes). One locking read per set,
    returning every row it matches."""
    left = rows_q.c
    keys = [left[f"rdb_k{n}"] for n in range(n_pk)]
    query = sa.select(*keys, left.rdb_old, left.rdb_new, left.rdb_blocked).order_by(*keys)
    moved: dict[tuple[Any, ...], Any] = {}  # a row's state after the sets before
    found: list[list[tuple[Any, ...]]] = []
    for exec_params in param_sets:
        blocked: list[tuple[Any, ...]] = []
        for row in conn.execute(query, exec_params):
            key = tuple(row[:n_pk])
            old, new, is_blocked = row[n_pk:]
            old = _held(guard, old)
            if key in moved:
                old = moved[key]
                is_blocked = not guard.legal(guard.key(old), guard.key(new))
            if is_blocked:
                blocked.append((*key, old, new))
            else:
                moved[key] = new
        found.append(blocked)
    return found


def _held(guard: Guard, text: str | None) -> Any:
    """The state a row holds, read as its column's text (``key_text``): the column type's own
    result processing raises for a value it can't load (an ``Enum`` label, a ``TypeDecorator``
    code a newer version of the application writes), which the guard refuses as a move from
    it, naming it."""
    return None if text is None else state_of_text(guard, text)


def _raise_blocked(
    guard: Guard, rows: Any, n_pk: int, config: Config, service: str | None, *value: Any
) -> NoReturn:
    """Raise mode: the first of the rows a bulk UPDATE would leave behind, (key..., state,
    new state), or (key..., state) when the new state is the one ``value`` given
    (``service``: the session's, see ``report``)."""
    first = rows[0]
    err = IllegalTransitionError(
        model=guard.model,
        pk=guard.pk_of(first[:n_pk]),
        column=guard.attr_key,
        from_state=as_declared(guard, first[n_pk]),
        to_state=as_declared(guard, value[0] if value else first[n_pk + 1]),
        via="orm-update",
        reason=f"{len(rows)} matching row(s) may not make this move; nothing was updated",
    )
    report(err, config, blocked_rows=len(rows), service=service)
    raise err


def _bulk_by_pk(
    orm_state: ORMExecuteState,
    config: Config,
    mapper: Mapper[Any],
    guards: tuple[Guard, ...],
    params: list[Any],
    *,
    stmt: Any,
) -> Result[Any] | None:
    """ORM bulk UPDATE by primary key (a list of parameter dicts): lock and check each row.
    The state a set writes is its own (by the attribute's name) or the statement's
    ``values()``, as SQLAlchemy sends it; its row is found by the database (a key given as a
    string for a UUID or an integer matches as it does in the UPDATE)."""
    rejected: set[int] = set()
    #: per guard, the state each set judged legal must find (see :func:`_held_as_judged`)
    judged: dict[Guard, dict[int, Any]] = {}
    conn: Connection | None = None
    for guard in guards:
        written = _written_attr(mapper, guard)
        keys = _row_key_attrs(mapper, guard)
        wanted: dict[tuple[Any, ...], list[tuple[int, Any]]] = {}
        for index, given in enumerate(params):
            if not isinstance(given, Mapping):
                continue
            # a status given inside a composite attribute is sent as its column's
            row = expand_composites(mapper, given)
            target = _target(stmt, row, guard, by_pk=written)
            if target is None or any(k not in row for k in keys):
                continue  # (SQLAlchemy refuses a set without its row's key)
            if not target.static:
                how = " (the column's onupdate)" if target.onupdate else ""
                raise TransitionRulesError(
                    f"a bulk UPDATE by primary key of {guard.model} sets {guard.attr_key} to a "
                    f"SQL expression{how}, whose value per row the guard can't read before the "
                    f"UPDATE; set the state as a value, or run an UPDATE with WHERE criteria "
                    f"(update({guard.model}).where(...).values(...))"
                )
            identity = tuple(row[k] for k in keys)
            wanted.setdefault(identity, []).append((index, target.value))
        if not wanted:
            continue
        # SQLAlchemy sends a bulk UPDATE by primary key through the connection of the base
        # mapper alone (no statement to route by, no bind given to execute() used): a
        # subclass bound elsewhere (binds=, get_bind()) is written where its base is
        conn = orm_state.session.connection(bind_arguments={"mapper": mapper.base_mapper})
        n_pk = len(guard.pk_columns)
        # (the state as the column's text: see _held)
        found = read_by_keys(
            conn, guard.pk_columns, [key_text(guard.column)], in_key_order(wanted), lock=True
        )
        # the sets of each row (keys spelled apart may name one row), in their order
        per_row: dict[tuple[Any, ...], list[tuple[int, Any]]] = {}
        current: dict[tuple[Any, ...], Any] = {}
        for given, items in wanted.items():
            db_row = found.get(given)
            if db_row is None:
                # no such row, judged as the check found it: the set is left out (the UPDATE,
                # which carries no condition of ours, would move a row another transaction
                # inserts and commits meanwhile, never judged)
                rejected.update(index for index, _ in items)
                continue
            identity = db_row[:n_pk]
            current[identity] = _held(guard, db_row[n_pk])
            per_row.setdefault(identity, []).extend(items)
        for identity, items in per_row.items():
            old = current[identity]
            for index, new in sorted(items, key=lambda item: item[0]):
                if guard.legal(guard.key(old), guard.key(new)):
                    judged.setdefault(guard, {})[index] = old
                    old = new  # a later set of the same row moves on from here
                    continue
                change = Change(guard, guard.pk_of(identity), identity, old, True, new, mapper)
                err = illegal(change, old, "orm-update")
                if config.bulk_update == "raise":
                    report(err, config, service=service_of(orm_state.session))
                    raise err
                rejected.add(index)
                # one per refused move, as the event says (a set moving two guarded columns
                # illegally is two), like the filter of an UPDATE with criteria counts them
                count("bulk_rows_filtered")
                service = unit_service(service_of(orm_state.session))
                emit(
                    config,
                    logger,
                    logging.WARNING,
                    "Status transition blocked: %s%s.%s %r -> %r "
                    "(via orm-update, filter mode: parameter set skipped)",
                    service_words(service),
                    row_label(guard.model, change.pk, config),
                    guard.attr_key,
                    plain(err.from_state),
                    plain(err.to_state),
                    event="transition_blocked",
                    unit_service=service,
                    model=guard.model,
                    column=guard.attr_key,
                    from_state=plain(err.from_state),
                    to_state=plain(err.to_state),
                    via="orm-update",
                    stale=False,
                    blocked_rows=1,
                    **row_keys(change.pk, config),
                )
    if conn is not None and judged and in_autocommit(conn):
        held = _held_as_judged(
            orm_state, mapper, stmt=stmt, params=params, rejected=rejected, judged=judged
        )
        if held is not None:
            return held
    if not rejected:
        return None
    kept = [row for index, row in enumerate(params) if index not in rejected]
    if not kept:
        return empty_result()
    orm_state.parameters = kept
    return orm_state.invoke_statement()


def _held_as_judged(
    orm_state: ORMExecuteState,
    mapper: Mapper[Any],
    *,
    stmt: Any,
    params: list[Any],
    rejected: set[int],
    judged: dict[Guard, dict[int, Any]],
) -> Result[Any] | None:
    """A bulk UPDATE by primary key on a connection in AUTOCOMMIT mode, whose check's locks
    ended with the check: another transaction may move a row the check judged before the
    UPDATE (which carries no condition of its own) writes it. Each set judged legal is sent
    with the state its row must still hold (``IS NOT DISTINCT FROM``, a parameter of the set;
    a set that writes no guarded state is not held to one), so such a row is left out, as the
    condition of an UPDATE with criteria leaves out rows that came to match them after its
    check. SQLAlchemy synchronizes no session object of a bulk UPDATE with criteria: those of
    the rows sent have the attributes their sets give expired (reloaded on access) rather than
    set. None (the statement left as it is) where the condition can't go into the UPDATE: a
    mapper writing more tables than the guarded one (SQLAlchemy adds the criteria to each
    table's UPDATE), a statement run inside ``from_statement()``, a set not a mapping."""
    if (
        orm_state.statement is not stmt
        or list(mapper.tables) != [next(iter(judged)).table]
        or not all(isinstance(p, Mapping) for p in params)
    ):
        return None
    kept = [index for index in range(len(params)) if index not in rejected]
    if not kept:
        return empty_result()
    sent = [dict(params[index]) for index in kept]
    held: Any = stmt
    for n, (guard, by_index) in enumerate(judged.items()):
        state, checked = f"rdb_held_{n}", f"rdb_judged_{n}"
        held = held.where(
            sa.or_(
                sa.not_(sa.bindparam(checked, type_=sa.Boolean())),
                guard.column.is_not_distinct_from(sa.bindparam(state, type_=guard.column.type)),
            )
        )
        for index, row in zip(kept, sent, strict=True):
            row[state] = by_index.get(index)
            row[checked] = index in by_index
    sync = orm_state.execution_options.get("synchronize_session", "auto")
    if sync in ("auto", "evaluate"):
        held = _synchronized_by(orm_state, held, False)
    orm_state.parameters = sent
    result = orm_state.invoke_statement(statement=held)
    if sync in ("auto", "evaluate"):
        session = orm_state.session
        pk_attrs = [mapper.get_property_by_column(c).key for c in mapper.primary_key]
        keys = [c.key for c in mapper.column_attrs if c.key not in pk_attrs]
        for row in sent:
            pk = tuple(row.get(k) for k in pk_attrs)
            obj = session.identity_map.get(mapper.identity_key_from_primary_key(pk))
            if obj is not None:
                session.expire(obj, [k for k in keys if k in row])
    return result
