"""The status-transition guard: rules declared once on the model, enforced on every write path.

A model declares which moves its status column may make::

    class Task(Base):
        __transitions__ = TransitionRules(
            column="status",
            transitions={"pending": {"in_progress", "cancelled"}, "in_progress": {"done"}},
            initial={"pending"},
        )

The same rules are enforced in three places:

1. **flush** (``before_flush``): every changed row is checked against the state it was loaded in,
   before anything is sent; the write is a compare-and-set carried by the flush's own UPDATE
   (``... WHERE id = :id AND status = :loaded``, as SQLAlchemy's ``version_id_col`` does), and a
   row that another transaction moved matches no row and raises :class:`StaleTransitionError`.
   New rows must start in an initial state.
2. **ORM bulk UPDATE** (``do_orm_execute``): ``update(Task).values(status=...)`` is restricted to
   the rows that may legally make the move (or raises, in ``bulk_update="raise"`` mode).
3. **the database** (:func:`transition_trigger_sql`): a generated PostgreSQL trigger blocks every
   other path (Core, raw SQL, other programs) with SQLSTATE :data:`TRANSITION_SQLSTATE`, which
   :func:`exception_from_db` maps back to :class:`IllegalTransitionError`.

Rules are frozen data compiled once per mapper; nothing is kept per row beyond the flush that
writes it. The guards never do implicit lazy I/O, so they work unchanged under ``AsyncSession``.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import re
import threading
import weakref
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple, NoReturn, TypeAlias

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, Result
from sqlalchemy.engine.result import null_result
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, UOWTransaction
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.base import PASSIVE_NO_INITIALIZE
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.sql.elements import BindParameter, ClauseElement, ColumnElement, Null

from ._config import Config, load_config
from ._errors import IllegalTransitionError, ResilientDBError, StaleTransitionError
from ._observability import emit
from ._registry import config_of
from ._state import STATE

__all__ = [
    "ANY_STATE",
    "BYPASS_SETTING",
    "GUARD_INFO_KEY",
    "TRANSITION_SQLSTATE",
    "TransitionRules",
    "TransitionRulesError",
    "allowed_transitions",
    "bypass_transitions",
    "bypass_transitions_async",
    "exception_from_db",
    "install_engine_hooks",
    "install_guard",
    "install_transition_trigger",
    "rules_to_dot",
    "rules_to_mermaid",
    "transition_rules",
    "transition_stats",
    "transition_trigger_drop_sql",
    "transition_trigger_sql",
    "trigger_drift",
    "uninstall_transition_trigger",
]

logger = logging.getLogger("resilient_db.transitions")

#: SQLSTATE raised by the generated trigger (class ``RD`` is not used by PostgreSQL).
TRANSITION_SQLSTATE = "RDB01"
#: ``session.info`` key holding the :class:`Config` that switches the session guards on.
GUARD_INFO_KEY = "resilient_db.config"
#: The transaction-local setting that the trigger reads to allow an audited bypass.
BYPASS_SETTING = "resilient_db.bypass_transitions"
#: Wildcard source state: "from any declared state".
ANY_STATE = "*"

_BYPASS_INFO_KEY = "resilient_db.transitions.bypass"
_GENERATOR_VERSION = 1
_STAMP_PREFIX = "resilient_db transition guard"
_PG_NAME_MAX = 63  # NAMEDATALEN - 1, in bytes
_CHUNK = 1000  # keys per locked SELECT

#: A status value: a string, an integer or an ``enum.Enum`` member (``None`` means SQL NULL).
State: TypeAlias = str | int | enum.Enum | None
_Key: TypeAlias = str | None  # a state as the database spells it (``col::text``)


class TransitionRulesError(ResilientDBError, ValueError):
    """A ``__transitions__`` declaration is wrong (unknown column, unreachable state, bad type).

    Raised when the rules are built or when the model's mapper is configured; the message names
    the model, the column and the offending state.
    """


# --------------------------------------------------------------------------------------------
# Rules: frozen data
# --------------------------------------------------------------------------------------------


def _check_state(value: object, *, where: str, column: str) -> State:
    if value is None or isinstance(value, enum.Enum):
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TransitionRulesError(
            f"TransitionRules(column={column!r}): {where} contains {value!r} of type "
            f"{type(value).__name__}; states must be str, int or enum.Enum members"
        )
    if isinstance(value, str) and "\x00" in value:
        raise TransitionRulesError(
            f"TransitionRules(column={column!r}): {where} contains a state with a NUL character, "
            "which PostgreSQL text cannot store"
        )
    return value


def _state_set(values: object, *, where: str, column: str) -> frozenset[State]:
    if isinstance(values, (str, bytes, enum.Enum)) or not isinstance(values, Iterable):
        raise TransitionRulesError(
            f"TransitionRules(column={column!r}): {where} must be a set of states, got "
            f"{values!r}; write e.g. {{{values!r}}}"
        )
    out = frozenset(_check_state(v, where=where, column=column) for v in values)
    if ANY_STATE in out:
        raise TransitionRulesError(
            f"TransitionRules(column={column!r}): {where} contains {ANY_STATE!r}; the wildcard "
            "may only be used as a source state (a key of transitions)"
        )
    return out


@dataclasses.dataclass(frozen=True, init=False)
class TransitionRules:
    """Which values a status column may move between; declare as ``__transitions__`` on a model.

    ``column``: the mapped attribute name (or database column name) of the status.
    ``transitions``: ``{from_state: {to_state, ...}}``; the key ``"*"`` (:data:`ANY_STATE`)
    means "from any declared state". ``initial``: the states a new row may start in.
    ``states``: optionally, every state of the machine; when given, a state used in the rules
    but missing here is an error. States are strings, integers or ``enum.Enum`` members (for a
    SQLAlchemy ``Enum`` column); ``None`` stands for SQL NULL and is a state only if declared.

    Instances are immutable and hashable. A model may guard several columns by setting
    ``__transitions__`` to a sequence of rules. Setting a column to the value it already holds
    is never a transition.
    """

    column: str
    transitions: Mapping[State, frozenset[State]] = dataclasses.field(hash=False)
    initial: frozenset[State]
    states: frozenset[State] | None

    def __init__(
        self,
        *,
        column: str,
        transitions: Mapping[State, Iterable[State]],
        initial: Iterable[State],
        states: Iterable[State] | None = None,
    ) -> None:
        if not isinstance(column, str) or not column:
            raise TransitionRulesError(
                f"TransitionRules: column must be the name of the status attribute, got {column!r}"
            )
        if not isinstance(transitions, Mapping):
            raise TransitionRulesError(
                f"TransitionRules(column={column!r}): transitions must be a mapping "
                f"{{from_state: {{to_state, ...}}}}, got {type(transitions).__name__}"
            )
        table: dict[State, frozenset[State]] = {}
        for source, targets in transitions.items():
            src = _check_state(source, where="transitions", column=column)
            table[src] = _state_set(targets, where=f"transitions[{source!r}]", column=column)
        init = _state_set(initial, where="initial", column=column)
        if not init:
            raise TransitionRulesError(
                f"TransitionRules(column={column!r}): initial is empty, so no row could ever be "
                "inserted; name the state(s) new rows start in"
            )
        declared = None if states is None else _state_set(states, where="states", column=column)
        object.__setattr__(self, "column", column)
        object.__setattr__(self, "transitions", MappingProxyType(table))
        object.__setattr__(self, "initial", init)
        object.__setattr__(self, "states", declared)

    @property
    def declared_states(self) -> frozenset[State]:
        """Every state named by the rules (the wildcard excluded)."""
        found: set[State] = set(self.initial)
        for source, targets in self.transitions.items():
            if source != ANY_STATE:
                found.add(source)
            found.update(targets)
        if self.states is not None:
            found.update(self.states)
        return frozenset(found)

    def next_states(self, state: State) -> frozenset[State]:
        """The states a row in ``state`` may move to (by equality of the declared values)."""
        graph = _expand(self.declared_states, self.transitions, key=_identity)
        return graph.get(state, frozenset())


def _identity(value: State) -> Any:
    return value


def _expand(
    declared: Iterable[State],
    transitions: Mapping[State, frozenset[State]],
    *,
    key: Any,
) -> dict[Any, frozenset[Any]]:
    """The transition graph over ``key(state)``, with the wildcard applied to every state."""
    nodes = {key(s) for s in declared}
    wildcard = {key(t) for t in transitions.get(ANY_STATE, frozenset())}
    graph: dict[Any, set[Any]] = {n: set() for n in nodes}
    for source, targets in transitions.items():
        if source == ANY_STATE:
            continue
        graph.setdefault(key(source), set()).update(key(t) for t in targets)
    for node, moves in graph.items():
        moves.update(wildcard)
        moves.discard(node)
    return {n: frozenset(t) for n, t in graph.items()}


def _normalize_rules(value: object, owner: str) -> tuple[TransitionRules, ...]:
    if isinstance(value, TransitionRules):
        return (value,)
    if isinstance(value, Sequence) and not isinstance(value, str):
        rules = tuple(value)
        for item in rules:
            if not isinstance(item, TransitionRules):
                raise TransitionRulesError(
                    f"{owner}.__transitions__ must be a TransitionRules or a sequence of them; "
                    f"found {item!r}"
                )
        return rules
    raise TransitionRulesError(
        f"{owner}.__transitions__ must be a TransitionRules or a sequence of them, got {value!r}"
    )


# --------------------------------------------------------------------------------------------
# Compiled guard: one per (mapper, guarded column)
# --------------------------------------------------------------------------------------------


class _Undeclared(str):
    """Key of a value that is no state of the column type; it starts with NUL, which no real
    key contains, so it never equals one."""

    __slots__ = ()


@dataclasses.dataclass(frozen=True, eq=False)
class _Guard:
    rules: TransitionRules
    model: str
    attr_key: str
    column: sa.Column[Any]
    pk_columns: tuple[sa.Column[Any], ...]
    pk_attr_keys: tuple[str, ...]
    initial: frozenset[_Key]
    next: Mapping[_Key, frozenset[_Key]]
    states: Mapping[_Key, State]  # key -> declared state (for users)
    binds: Mapping[_Key, Any]  # key -> value as SQLAlchemy binds it for this column
    pk_labels: tuple[str, ...]  # how the flush's UPDATE names its primary-key parameters
    cas_param: str  # the parameter carrying the expected state in that UPDATE
    text_keys: bool  # a str value is its own key (any column type but Enum)

    @property
    def table(self) -> sa.Table:
        table = self.column.table
        assert isinstance(table, sa.Table)
        return table

    def key(self, value: object) -> _Key:
        """The database spelling of ``value`` (what ``col::text`` gives)."""
        if value.__class__ is str and self.text_keys:
            return value  # the common case, without _db_key
        try:
            return _db_key(self.column.type, value)
        except (LookupError, TypeError, ValueError):
            return _Undeclared("\x00" + repr(value))

    def legal(self, old: _Key, new: _Key) -> bool:
        return old == new or new in self.next.get(old, frozenset())

    def sources_of(self, target: _Key) -> frozenset[_Key]:
        """Keys that may move to ``target``, ``target`` itself included (a no-op is fine)."""
        found = {source for source, targets in self.next.items() if target in targets}
        found.add(target)
        return frozenset(found)

    def state(self, key: _Key) -> Any:
        """The declared state for a key, or the database text when the key is undeclared."""
        return self.states.get(key, key)

    def pk_of(self, identity: Sequence[Any] | None) -> Any:
        if identity is None:
            return None
        values = tuple(identity)
        return values[0] if len(values) == 1 else values


def _db_key(type_: sa.types.TypeEngine[Any], value: object) -> _Key:
    if value is None:
        return None
    impl = getattr(type_, "impl", type_) if isinstance(type_, sa.types.TypeDecorator) else type_
    if isinstance(impl, sa.Enum):
        enum_type: Any = impl  # _db_value_for_elem: name or member -> database value
        db = enum_type._db_value_for_elem(value)
        if db is not None and db not in impl.enums:
            raise LookupError(f"{value!r} is not among the values of {impl!r}")
        return None if db is None else str(db)
    if isinstance(value, enum.Enum):
        return _db_key(type_, value.value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"{value!r} is no state value")
    return str(value)


def _bind_value(type_: sa.types.TypeEngine[Any], state: State) -> Any:
    impl = getattr(type_, "impl", type_) if isinstance(type_, sa.types.TypeDecorator) else type_
    if isinstance(impl, sa.Enum) or not isinstance(state, enum.Enum):
        return state
    return state.value


_compiled: weakref.WeakKeyDictionary[Mapper[Any], tuple[_Guard, ...]] = weakref.WeakKeyDictionary()
_by_table: dict[tuple[str, str], list[weakref.ref[_Guard]]] = {}
_registry_lock = threading.Lock()


def _guards(mapper: Mapper[Any]) -> tuple[_Guard, ...]:
    """The compiled guards of ``mapper`` (compiled and validated on first use)."""
    found = _compiled.get(mapper)
    if found is not None:
        return found
    declared = getattr(mapper.class_, "__transitions__", None)
    guards: tuple[_Guard, ...] = ()
    if declared is not None:
        owner = mapper.class_.__name__
        rules = _normalize_rules(declared, owner)
        guards = tuple(_compile(mapper, r) for r in rules)
        columns = [g.column for g in guards]
        for g in guards:
            if sum(c is g.column for c in columns) > 1:
                raise TransitionRulesError(
                    f"{owner}.__transitions__ declares rules for column {g.attr_key!r} twice"
                )
    with _registry_lock:
        _compiled[mapper] = guards
        for g in guards:
            refs = _by_table.setdefault((g.table.name, g.column.name), [])
            refs[:] = [r for r in refs if r() is not None]
            refs.append(weakref.ref(g))
    return guards


def _compile(mapper: Mapper[Any], rules: TransitionRules) -> _Guard:
    model = mapper.class_.__name__
    where = f"{model}.__transitions__ (column {rules.column!r})"
    attr_key, column = _resolve_column(mapper, rules.column, where)
    type_ = column.type
    impl = getattr(type_, "impl", type_) if isinstance(type_, sa.types.TypeDecorator) else type_

    states: dict[_Key, State] = {}
    binds: dict[_Key, Any] = {}
    for state in sorted(rules.declared_states, key=_sort_key):
        try:
            key = _db_key(type_, state)
        except (LookupError, TypeError, ValueError):
            allowed = ", ".join(repr(v) for v in getattr(impl, "enums", ()))
            raise TransitionRulesError(
                f"{where}: state {state!r} has no declaration in the column type "
                f"{type_!r}" + (f" (declared values: {allowed})" if allowed else "")
            ) from None
        if key in states and states[key] != state:
            raise TransitionRulesError(
                f"{where}: states {states[key]!r} and {state!r} are the same database value "
                f"{key!r}; declare each state once"
            )
        states[key] = state
        binds[key] = _bind_value(type_, state)
    if isinstance(impl, sa.Enum) and impl.enum_class is not None:
        for member in impl.enum_class:
            member_key = _db_key(type_, member)
            if member_key in binds:
                binds[member_key] = member
                if not isinstance(states[member_key], enum.Enum):
                    states[member_key] = member

    def key_of(state: State) -> _Key:
        return _db_key(type_, state)

    graph = _expand(rules.declared_states, rules.transitions, key=key_of)
    initial = frozenset(key_of(s) for s in rules.initial)
    if rules.states is not None:
        declared_keys = {key_of(s) for s in rules.states}
        for key in sorted(set(graph) - declared_keys, key=_sort_key):
            raise TransitionRulesError(
                f"{where}: state {states[key]!r} is used in the rules but not declared in states="
            )
    reached = set(initial)
    todo = list(initial)
    while todo:
        for target in graph.get(todo.pop(), frozenset()):
            if target not in reached:
                reached.add(target)
                todo.append(target)
    for key in sorted(set(graph) - reached, key=_sort_key):
        raise TransitionRulesError(
            f"{where}: state {states[key]!r} is neither initial nor reachable from an initial "
            f"state ({', '.join(repr(states[k]) for k in sorted(initial, key=_sort_key))}); "
            "add a transition into it or list it in initial"
        )

    pk_columns, pk_attr_keys = _pk_columns(mapper, column, where)
    # The ORM's flush binds an UPDATE's primary key as ``col._label`` (``tasks_id``) and the new
    # values as ``col.key``; the compare-and-set reads both (see _attach_compare_and_set).
    pk_labels = tuple(str(c._label) for c in pk_columns)
    position = next(i for i, c in enumerate(column.table.columns) if c is column)
    return _Guard(
        rules=rules,
        model=model,
        attr_key=attr_key,
        column=column,
        pk_columns=pk_columns,
        pk_attr_keys=pk_attr_keys,
        initial=initial,
        next=MappingProxyType(graph),
        states=MappingProxyType(states),
        binds=MappingProxyType(binds),
        pk_labels=pk_labels,
        cas_param=f"rdb_expected_{position}",
        text_keys=not isinstance(impl, sa.Enum),
    )


def _resolve_column(mapper: Mapper[Any], name: str, where: str) -> tuple[str, sa.Column[Any]]:
    columns = mapper.columns
    found: tuple[str, Any] | None = None
    if name in columns:
        found = (name, columns[name])
    else:
        for key, col in columns.items():
            if getattr(col, "name", None) == name:
                found = (key, col)
                break
    if found is None:
        known = ", ".join(sorted(columns.keys()))
        raise TransitionRulesError(
            f"{where}: {mapper.class_.__name__} has no mapped column {name!r} (mapped: {known})"
        )
    key, col = found
    if not isinstance(col, sa.Column) or not isinstance(col.table, sa.Table):
        raise TransitionRulesError(
            f"{where}: {name!r} is mapped to a SQL expression, not to a table column"
        )
    return key, col


def _pk_columns(
    mapper: Mapper[Any], column: sa.Column[Any], where: str
) -> tuple[tuple[sa.Column[Any], ...], tuple[str, ...]]:
    table = column.table
    mapper_pk = tuple(mapper.primary_key)
    attr_keys = tuple(mapper.get_property_by_column(c).key for c in mapper_pk)
    if all(c.table is table for c in mapper_pk):
        return tuple(c for c in mapper_pk if isinstance(c, sa.Column)), attr_keys
    table_pk = tuple(table.primary_key.columns)
    if len(table_pk) != len(mapper_pk):
        raise TransitionRulesError(
            f"{where}: the primary key of table {table.name!r} does not line up with the "
            f"primary key of {mapper.class_.__name__}; guard a column of the base table instead"
        )
    return table_pk, attr_keys


def _sort_key(key: object) -> tuple[int, str]:
    return (0, "") if key is None else (1, str(key))


@event.listens_for(Mapper, "mapper_configured")
def _on_mapper_configured(mapper: Mapper[Any], class_: type[Any]) -> None:
    """Validate ``__transitions__`` as soon as the mapper is configured (fail early)."""
    if getattr(class_, "__transitions__", None) is not None and _guards(mapper):
        _enable_bulk_guard()


def _mapper_of(target: object) -> Mapper[Any]:
    if isinstance(target, Mapper):
        return target
    insp = sa.inspect(target, raiseerr=False)
    mapper = getattr(insp, "mapper", None)
    if not isinstance(mapper, Mapper):
        raise TypeError(f"{target!r} is not a mapped class or instance")
    return mapper


def _state_of(obj: object) -> InstanceState[Any]:
    state = sa.inspect(obj, raiseerr=False)
    if not isinstance(state, InstanceState):
        raise TypeError(f"{obj!r} is not an instance of a mapped class")
    return state


def _guards_of(target: object) -> tuple[_Guard, ...]:
    mapper = _mapper_of(target)
    guards = _guards(mapper)
    if not guards:
        raise TransitionRulesError(f"{mapper.class_.__name__} declares no __transitions__")
    return guards


def _one_guard(target: object, column: str | None) -> _Guard:
    guards = _guards_of(target)
    if column is None:
        if len(guards) > 1:
            names = ", ".join(repr(g.attr_key) for g in guards)
            raise TypeError(f"{guards[0].model} guards several columns ({names}); pass column=")
        return guards[0]
    for g in guards:
        if column in (g.attr_key, g.column.name):
            return g
    raise TransitionRulesError(f"{guards[0].model} declares no transitions for column {column!r}")


def transition_rules(model: type[Any]) -> tuple[TransitionRules, ...]:
    """The validated rules declared on ``model`` (one entry per guarded column)."""
    return tuple(g.rules for g in _guards_of(model))


# --------------------------------------------------------------------------------------------
# Observability
# --------------------------------------------------------------------------------------------

_stats_lock = threading.Lock()
_stats: dict[str, int] = {
    "blocked_transitions": 0,
    "stale_transitions": 0,
    "bulk_rows_filtered": 0,
    "bypasses": 0,
}


def _count(name: str, amount: int = 1) -> None:
    with _stats_lock:
        _stats[name] += amount


def transition_stats() -> dict[str, int]:
    """Counters since process start: blocked and stale transitions, rows left unchanged by the
    bulk-UPDATE filter, and bypasses. Stable names, for ``health()`` and metrics."""
    with _stats_lock:
        return dict(_stats)


def _reset_stats() -> None:
    with _stats_lock:
        for name in _stats:
            _stats[name] = 0


STATE.resetters["transition_stats"] = _reset_stats


def _report(err: IllegalTransitionError, config: Config | None, *, blocked_rows: int = 1) -> None:
    """Count ``err`` and report it through the one emitter (hooks and the ``[SELF-HEAL]`` line,
    under ``config``'s switches; ``None``: the environment's configuration)."""
    stale = isinstance(err, StaleTransitionError)
    _count("stale_transitions" if stale else "blocked_transitions")
    emit(
        config if config is not None else _env_config(),
        logger,
        logging.WARNING if stale else logging.ERROR,
        "Status transition blocked%s: %s(pk=%r).%s %s -> %r (via %s)%s",
        " (row moved by another transaction)" if stale else "",
        err.model,
        err.pk,
        err.column,
        "(new row)" if err.from_state is None else repr(_plain(err.from_state)),
        _plain(err.to_state),
        err.via,
        f"; {err.reason}" if err.reason else "",
        event="transition_blocked",
        model=err.model,
        pk=err.pk,
        column=err.column,
        from_state=_plain(err.from_state),
        to_state=_plain(err.to_state),
        via=err.via,
        stale=stale,
        blocked_rows=blocked_rows,
    )


def _env_config() -> Config:
    """The environment's configuration, for reports outside any factory's session."""
    try:
        return load_config()
    except Exception:  # a bad environment must not hide the report
        return Config()


def _plain(state: object) -> object:
    return state.value if isinstance(state, enum.Enum) else state


# --------------------------------------------------------------------------------------------
# Session guards: flush and ORM bulk UPDATE
# --------------------------------------------------------------------------------------------


def install_guard(session_class: type[Session]) -> None:
    """Register the flush and bulk-UPDATE guards on ``session_class`` (idempotent).

    The listeners act only for sessions of a resilient factory (their factory's
    :class:`Config`), or whose ``info[GUARD_INFO_KEY]`` is a :class:`Config`, with
    ``guard_on``; its ``bulk_update`` picks "filter" or "raise" for bulk UPDATEs. Listeners reach
    subclasses, so a class whose base is guarded already is left alone (the guard runs once).
    The first guarded flush through an engine adds the engine listeners that attach the
    compare-and-set to the flush's UPDATE (see :func:`install_engine_hooks`).
    """
    if not (isinstance(session_class, type) and issubclass(session_class, Session)):
        raise TypeError(f"install_guard() needs a Session subclass, got {session_class!r}")
    if any(
        event.contains(base, "before_flush", _before_flush)
        for base in session_class.__mro__[1:]
        if isinstance(base, type) and issubclass(base, Session)
    ):
        return
    # A bypass ends with its transaction: _bypassed() compares the marker with the current
    # transaction, so no after_transaction_end listener is needed on every transaction.
    # after_flush / after_soft_rollback end what a flush expects of its UPDATEs (a failed flush
    # rolls back, so one of the two always follows a flush that reached the database).
    for name, fn in (
        ("before_flush", _before_flush),
        ("after_flush", _flush_ended),
        ("after_soft_rollback", _flush_ended),
    ):
        if not event.contains(session_class, name, fn):
            event.listen(session_class, name, fn)
    with _registry_lock:
        _guarded_session_classes.add(session_class)
        needed = _bulk_guard_needed
    if needed:
        _listen_bulk_guard(session_class)


# A ``do_orm_execute`` listener makes SQLAlchemy build an ORMExecuteState for every statement
# (several microseconds each), so the bulk-UPDATE guard is registered only once a model with
# ``__transitions__`` has been configured: applications without rules don't pay for it. Mappers
# configure before any statement naming them can run, so no guarded UPDATE gets past.
_guarded_session_classes: weakref.WeakSet[type[Session]] = weakref.WeakSet()
_bulk_guard_needed = False


def _listen_bulk_guard(session_class: type[Session]) -> None:
    if not any(
        event.contains(base, "do_orm_execute", _do_orm_execute)
        for base in session_class.__mro__
        if isinstance(base, type) and issubclass(base, Session)
    ):
        event.listen(session_class, "do_orm_execute", _do_orm_execute)


def _enable_bulk_guard() -> None:
    global _bulk_guard_needed
    with _registry_lock:
        _bulk_guard_needed = True
        classes = list(_guarded_session_classes)
    for session_class in classes:
        _listen_bulk_guard(session_class)


def _active_config(session: Session) -> Config | None:
    # A resilient factory's session: its factory's configuration (session.info plays no part).
    # Otherwise a session whose info carries a Config under GUARD_INFO_KEY (a plain sessionmaker
    # guarded by hand, as the guard's own tests do).
    config = config_of(session)
    if config is None:
        config = session.info.get(GUARD_INFO_KEY)
    if not isinstance(config, Config) or not config.guard_on:
        return None
    if _bypassed(session):
        return None
    return config


def _bypassed(session: Session) -> bool:
    marker = session.info.get(_BYPASS_INFO_KEY)
    if marker is None:
        return False
    if marker is session.get_transaction():
        return True
    session.info.pop(_BYPASS_INFO_KEY, None)
    return False


class _Change(NamedTuple):
    guard: _Guard
    pk: Any
    identity: tuple[Any, ...]
    old: Any
    old_known: bool
    new: Any
    mapper: Mapper[Any]  # the row's mapper (its base mapper picks the flush's connection)


def _before_flush(
    session: Session, flush_context: UOWTransaction, instances: Sequence[Any] | None
) -> None:
    _flush_ended(session)  # an earlier flush that another before_flush listener stopped
    config = _active_config(session)
    if config is None:
        return
    only = None if instances is None else {id(o) for o in instances}
    errors: list[IllegalTransitionError] = []
    changes: list[_Change] = []
    for obj in list(session.new):
        if only is not None and id(obj) not in only:
            continue
        state = _state_of(obj)
        for guard in _guards(state.mapper):
            errors.extend(_check_insert(guard, state))
    guards_of: dict[Mapper[Any], tuple[_Guard, ...]] = {}
    for obj in list(session.dirty):
        if only is not None and id(obj) not in only:
            continue
        state = instance_state(obj)  # the session's objects are mapped: no inspect() needed
        mapper = state.mapper
        guards = guards_of.get(mapper)
        if guards is None:
            guards = guards_of[mapper] = _guards(mapper)
        if not guards or state.key is None:
            continue
        for guard in guards:
            change = _pending_change(guard, state)
            if change is None:
                continue
            if change.old_known and not guard.legal(guard.key(change.old), guard.key(change.new)):
                errors.append(_illegal(change, change.old, "flush"))
            else:
                changes.append(change)
    if not errors and changes:
        errors.extend(_prepare_compare_and_set(session, config, changes))
    if errors:
        _raise(errors, config)


def _raise(errors: Sequence[IllegalTransitionError], config: Config) -> NoReturn:
    """Log and count every error; raise the first, saying how many more there were."""
    for err in errors:
        _report(err, config)
    first = errors[0]
    if len(errors) > 1:
        more = f"{len(errors) - 1} more illegal change(s) in the same flush"
        first = _with_reason(first, f"{first.reason}; {more}" if first.reason else more)
    raise first


def _with_reason(err: IllegalTransitionError, reason: str) -> IllegalTransitionError:
    return type(err)(
        model=err.model,
        pk=err.pk,
        column=err.column,
        from_state=err.from_state,
        to_state=err.to_state,
        via=err.via,
        reason=reason,
    )


def _check_insert(guard: _Guard, state: InstanceState[Any]) -> list[IllegalTransitionError]:
    value = state.dict.get(guard.attr_key)
    if value is None:
        default = guard.column.default
        if default is not None and getattr(default, "is_scalar", False):
            value = getattr(default, "arg", None)
        elif default is not None or guard.column.server_default is not None:
            return []  # the database computes it; the trigger checks it
    if isinstance(value, ClauseElement) or hasattr(value, "__clause_element__"):
        return []  # a SQL expression: only the trigger can see its value
    if guard.key(value) in guard.initial:
        return []
    allowed = ", ".join(repr(_plain(guard.state(k))) for k in sorted(guard.initial, key=_sort_key))
    pk = guard.pk_of(state.key[1] if state.key else _pending_pk(guard, state))
    return [
        IllegalTransitionError(
            model=guard.model,
            pk=pk,
            column=guard.attr_key,
            from_state=None,
            to_state=value,
            via="flush",
            reason=f"new rows must start in one of: {allowed}",
        )
    ]


def _pending_pk(guard: _Guard, state: InstanceState[Any]) -> tuple[Any, ...] | None:
    values = tuple(state.dict.get(k) for k in guard.pk_attr_keys)
    return None if all(v is None for v in values) else values


def _pending_change(guard: _Guard, state: InstanceState[Any]) -> _Change | None:
    """The change of the guarded column that the flush will write, if any.

    ``history.added`` is empty exactly when the ORM leaves the column out of its UPDATE (both
    compare with the attribute's ``is_equal``). A change to a value with the same database
    spelling (an Enum member for its name) is still returned: it is legal, but the UPDATE sets
    the column, so it carries the compare-and-set like any other.
    """
    if guard.attr_key not in state.committed_state:
        return None  # the attribute was not set since the row was loaded
    # the attribute's own history (``state.attrs[...]`` builds a view of every attribute)
    history = state.manager[guard.attr_key].impl.get_history(
        state, state.dict, PASSIVE_NO_INITIALIZE
    )
    if not history.added:
        return None
    new = history.added[0]
    if new.__class__ is not str and (
        isinstance(new, ClauseElement) or hasattr(new, "__clause_element__")
    ):
        return None  # a SQL expression: only the trigger can see its value
    assert state.key is not None
    identity = state.key[1]
    known = bool(history.deleted)
    old = next(iter(history.deleted), None)
    pk = identity[0] if len(identity) == 1 else identity
    return _Change(guard, pk, identity, old, known, new, state.mapper)


def _illegal(change: _Change, old: Any, via: str) -> IllegalTransitionError:
    guard = change.guard
    nxt = guard.next.get(guard.key(old), frozenset())
    allowed = ", ".join(repr(_plain(guard.state(k))) for k in sorted(nxt, key=_sort_key))
    return IllegalTransitionError(
        model=guard.model,
        pk=change.pk,
        column=guard.attr_key,
        from_state=old,
        to_state=change.new,
        via=via,
        reason=f"allowed from here: {allowed}" if allowed else "no moves are allowed from here",
    )


def _stale(change: _Change, reason: str, from_state: Any = None) -> StaleTransitionError:
    guard = change.guard
    return StaleTransitionError(
        model=guard.model,
        pk=change.pk,
        column=guard.attr_key,
        from_state=change.old if from_state is None else from_state,
        to_state=change.new,
        via="flush",
        reason=reason,
    )


def _moved(value: Any) -> str:
    return f"the row now holds {_plain(value)!r}; reload it and decide again"


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _ordered(keys: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    items = list(keys)
    try:
        return sorted(items)
    except TypeError:
        return sorted(items, key=repr)


def _pk_filter(pk_columns: Sequence[sa.Column[Any]], keys: Sequence[tuple[Any, ...]]) -> Any:
    if len(pk_columns) == 1:
        return pk_columns[0].in_([k[0] for k in keys])
    return sa.tuple_(*pk_columns).in_([tuple(k) for k in keys])


def _read_states(
    conn: Connection,
    pk_columns: Sequence[sa.Column[Any]],
    columns: Sequence[sa.Column[Any]],
    keys: Sequence[tuple[Any, ...]],
    *,
    lock: bool,
) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """``columns`` of the rows with primary keys ``keys``: one SELECT per chunk of keys, rows
    in key order (``FOR UPDATE`` when ``lock``: concurrent flushes lock in the same order)."""
    n_pk = len(pk_columns)
    current: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for chunk in _chunks(keys):
        stmt = (
            sa.select(*pk_columns, *columns)
            .where(_pk_filter(pk_columns, chunk))
            .order_by(*pk_columns)
        )
        if lock:
            stmt = stmt.with_for_update()
        for row in conn.execute(stmt):
            current[tuple(row[:n_pk])] = tuple(row[n_pk:])
    return current


def _check_against_db(
    conn: Connection, changes: Sequence[_Change], *, lock: bool
) -> tuple[list[IllegalTransitionError], list[Any]]:
    """Read the current state of every changed row (one SELECT per table) and check it: a row
    whose loaded state is known must still hold it (else stale); a row whose state was not
    loaded must be allowed to move from the state it holds (else illegal). Returns the errors
    and, per change, the state read."""
    by_table: dict[sa.Table, list[int]] = {}
    for index, change in enumerate(changes):
        by_table.setdefault(change.guard.table, []).append(index)
    errors: list[IllegalTransitionError] = []
    values: list[Any] = [None] * len(changes)
    # tables, then rows, in a fixed order: concurrent flushes lock in the same order
    for _, indexes in sorted(by_table.items(), key=lambda kv: (kv[0].schema or "", kv[0].name)):
        group = [changes[i] for i in indexes]
        columns: list[sa.Column[Any]] = []
        for change in group:
            if all(c is not change.guard.column for c in columns):
                columns.append(change.guard.column)
        keys = _ordered({c.identity for c in group})
        current = _read_states(conn, group[0].guard.pk_columns, columns, keys, lock=lock)
        for index in indexes:
            change = changes[index]
            guard = change.guard
            found = current.get(change.identity)
            if found is None:
                errors.append(_stale(change, "the row no longer exists"))
                continue
            db_value = found[next(i for i, c in enumerate(columns) if c is guard.column)]
            values[index] = db_value
            if not change.old_known:
                if not guard.legal(guard.key(db_value), guard.key(change.new)):
                    errors.append(_illegal(change, db_value, "flush"))
            elif guard.key(db_value) != guard.key(change.old):
                errors.append(_stale(change, _moved(db_value)))
    return errors, values


# The compare-and-set, carried by the flush's own UPDATE ------------------------------------
#
# before_flush checks every move against the loaded state (nothing is sent for an illegal one)
# and records, per connection, the state each changed row must still hold. A ``before_execute``
# listener on the engine adds ``AND status = :expected`` to the flush's UPDATE of those rows,
# and an ``after_execute`` listener compares the row count: a row that another transaction
# moved (or deleted) is not matched, and StaleTransitionError is raised from the flush. The
# current state of such a row is read on that error path only. SQLAlchemy's ``version_id_col``
# makes the same check, but only for one column per mapper, on every UPDATE and DELETE of the
# row, and one row per statement (a 1,000-row flush measured 5.4x slower on psycopg, 10.9x on
# asyncpg); this keeps the ORM's executemany and leaves DELETE and other UPDATEs alone.
#
# Where the row count can't tell, the guard falls back to checking the rows under lock
# (``SELECT ... FOR UPDATE``, one per table) before their UPDATE: on a dialect without a reliable
# row count, for a session that picks connections per row (``connection_callable``, horizontal
# sharding), for the rows of a table that change together on a dialect whose executemany
# reports no row count (asyncpg; a lone row there gets the compare-and-set), and for an UPDATE in
# which some row has no recorded expectation (its status was changed after before_flush).


class _Expect(NamedTuple):
    change: _Change
    value: Any  # the state the row must still hold: the loaded one, or the one read


# what one row must still hold, per guarded column
_Row: TypeAlias = dict[sa.Column[Any], _Expect]


class _Inflight(NamedTuple):
    statement: Any  # the UPDATE as sent (with the compare-and-set)
    guards: tuple[_Guard, ...]
    rows: list[_Row]  # per parameter set


@dataclasses.dataclass(eq=False)
class _FlushChecks:
    """What one flush expects of the rows it updates through one connection."""

    config: Config
    rows: dict[sa.Table, dict[tuple[Any, ...], _Row]] = dataclasses.field(default_factory=dict)
    guards: dict[sa.Table, list[_Guard]] = dataclasses.field(default_factory=dict)
    inflight: _Inflight | None = None

    def expect(self, change: _Change, value: Any) -> None:
        guard = change.guard
        self.note_guard(guard)
        self.rows.setdefault(guard.table, {}).setdefault(change.identity, {})[guard.column] = (
            _Expect(change, value)
        )

    def note_guard(self, guard: _Guard) -> None:
        # one guard per column: the models of an inheritance hierarchy share the column, and the
        # compare-and-set depends on nothing else (rules differ; errors name each row's model)
        guards = self.guards.setdefault(guard.table, [])
        if all(g.column is not guard.column for g in guards):
            guards.append(guard)


# Flushes in progress, by the Connection their UPDATEs go through (and the connections of each
# session's flush). Weak: a connection or session that is dropped takes its entry along. One
# thread (or greenlet) uses a Connection at a time. session.info stays the user's.
_pending: weakref.WeakKeyDictionary[Connection, _FlushChecks] = weakref.WeakKeyDictionary()
_flushing: weakref.WeakKeyDictionary[Session, list[Connection]] = weakref.WeakKeyDictionary()
_hooked_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
_cas_statements: weakref.WeakKeyDictionary[Any, dict[tuple[_Guard, ...], Any]] = (
    weakref.WeakKeyDictionary()
)


def _flush_ended(session: Session, *_: Any) -> None:
    """after_flush / after_soft_rollback: the flush's expectations are done with."""
    if _flushing:  # else no guarded flush is in progress anywhere
        for conn in _flushing.pop(session, ()):
            _pending.pop(conn, None)


def _prepare_compare_and_set(
    session: Session, config: Config, changes: list[_Change]
) -> list[IllegalTransitionError]:
    """Record what each change expects of its row, on the connection the flush will use for
    its UPDATE; rows whose state was not loaded are read first (and checked) so that their
    UPDATE can carry the state they hold. Returns the errors found."""
    by_conn: dict[Connection, list[_Change]] = {}
    conn_of: dict[Mapper[Any], Connection] = {}
    for change in changes:
        # the flush gets its connection with get_bind(mapper=base_mapper): the same one
        base = change.mapper.base_mapper
        conn = conn_of.get(base)
        if conn is None:
            conn = conn_of[base] = session.connection(bind_arguments={"mapper": base})
        by_conn.setdefault(conn, []).append(change)
    errors: list[IllegalTransitionError] = []
    prepared: list[tuple[Connection, _FlushChecks]] = []
    per_row_connections = session.connection_callable is not None
    for conn, conn_changes in by_conn.items():
        group = conn_changes
        dialect = conn.dialect
        if per_row_connections or not dialect.supports_sane_rowcount:
            # the UPDATE's row count can't be trusted (or its connection known): lock and check
            errors.extend(_check_against_db(conn, group, lock=True)[0])
            continue
        if not dialect.supports_sane_multi_rowcount:
            # asyncpg: an executemany reports no row count, so the rows of a table that change
            # together are locked and checked now (one SELECT per table); a lone row's UPDATE
            # runs on its own and carries the compare-and-set
            rows_of: dict[sa.Table, set[tuple[Any, ...]]] = {}
            for change in group:
                rows_of.setdefault(change.guard.table, set()).add(change.identity)
            together = [c for c in group if len(rows_of[c.guard.table]) > 1]
            if together:
                errors.extend(_check_against_db(conn, together, lock=True)[0])
                group = [c for c in group if len(rows_of[c.guard.table]) == 1]
        checks = _FlushChecks(config)
        unknown = [c for c in group if not c.old_known]
        if unknown:
            found, values = _check_against_db(conn, unknown, lock=False)
            errors.extend(found)
            for change, value in zip(unknown, values, strict=True):
                checks.expect(change, value)
        rows: dict[tuple[Any, ...], _Row] | None = None
        last: _Guard | None = None
        for change in group:
            if not change.old_known:
                continue
            guard = change.guard
            if guard is not last:  # rows come grouped by model: look the table up on a switch
                checks.note_guard(guard)
                rows = checks.rows.setdefault(guard.table, {})
                last = guard
            assert rows is not None
            row = rows.get(change.identity)
            if row is None:
                rows[change.identity] = {guard.column: _Expect(change, change.old)}
            else:
                row[guard.column] = _Expect(change, change.old)
        prepared.append((conn, checks))
    if errors:
        return errors
    for conn, checks in prepared:
        install_engine_hooks(conn.engine)
        _pending[conn] = checks
    if prepared:
        _flushing[session] = [conn for conn, _ in prepared]
    return errors


def guarded_models_exist() -> bool:
    """Whether a model with ``__transitions__`` has been configured in this process."""
    return _bulk_guard_needed


def install_engine_hooks(engine: Engine) -> None:
    """Listen on ``engine`` for the flush's UPDATEs, to attach the compare-and-set (idempotent).

    The flush guard calls this when the engine first serves a guarded flush, so engines of
    applications without transition rules never run the listeners (connection events make
    SQLAlchemy take its slower execution path, a few microseconds per statement, unless the
    engine has such listeners already). Existing connections see the listeners at once: they
    join the engine's event dispatch when created.

    SQLAlchemy's event registration is not meant to race with dispatch: a thread that is inside
    another ``before_execute`` / ``after_execute`` listener of this engine while the listeners
    are added fails with "deque mutated during iteration". Without such listeners there is
    nothing to iterate; a session factory can also call this when it is created.
    """
    if engine in _hooked_engines:
        return
    with _registry_lock:
        if engine in _hooked_engines:
            return
        event.listen(engine, "before_execute", _before_execute, retval=True)
        event.listen(engine, "after_execute", _after_execute)
        _hooked_engines.add(engine)


def _before_execute(
    conn: Connection,
    clauseelement: Any,
    multiparams: Any,
    params: Any,
    execution_options: Any,
) -> tuple[Any, Any, Any]:
    if _pending and isinstance(clauseelement, sa.Update):
        checks = _pending.get(conn)
        if checks is not None:
            table_rows = checks.rows.get(clauseelement.table)  # type: ignore[call-overload]
            if table_rows is not None:
                return _attach_compare_and_set(
                    conn, checks, table_rows, clauseelement, multiparams=multiparams, params=params
                )
    return clauseelement, multiparams, params


def _attach_compare_and_set(
    conn: Connection,
    checks: _FlushChecks,
    table_rows: dict[tuple[Any, ...], _Row],
    statement: sa.Update,
    *,
    multiparams: list[dict[str, Any]],
    params: dict[str, Any],
) -> tuple[Any, Any, Any]:
    rows = multiparams or [params]
    first = rows[0]
    guards = tuple(
        g
        for g in checks.guards[statement.table]  # type: ignore[index]
        if g.column.key in first
    )
    if not guards:
        return statement, multiparams, params  # the UPDATE leaves the guarded columns alone
    labels = guards[0].pk_labels
    try:
        if len(labels) == 1:
            label = labels[0]
            identities = [(row[label],) for row in rows]
        else:
            identities = [tuple(row[label] for label in labels) for row in rows]
    except KeyError:
        # Not an UPDATE by primary key, so not the flush's own (one a flush event sends, say),
        # yet it sets a guarded column of this table: the rows this flush expects something of
        # are checked under lock before it runs, whichever of them it touches.
        pending = [r for r in table_rows.values() if all(g.column in r for g in guards)]
        if pending:
            _lock_and_check(conn, checks, guards, pending)
        return statement, multiparams, params
    expected: list[_Row] = []
    complete = True
    single = guards[0] if len(guards) == 1 else None
    for identity in identities:
        found = table_rows.get(identity)
        if found is None or (
            single.column not in found
            if single is not None
            else any(g.column not in found for g in guards)
        ):
            complete = False
        else:
            expected.append(found)
    if not expected:
        return statement, multiparams, params
    if not complete or (len(rows) > 1 and not conn.dialect.supports_sane_multi_rowcount):
        _lock_and_check(conn, checks, guards, expected)
        return statement, multiparams, params
    cas = _cas_statement(statement, guards)
    if len(guards) == 1:
        guard = guards[0]
        name = guard.cas_param
        sent = [
            {**row, name: found[guard.column].value}
            for row, found in zip(rows, expected, strict=True)
        ]
    else:
        sent = [
            {**row, **{g.cas_param: found[g.column].value for g in guards}}
            for row, found in zip(rows, expected, strict=True)
        ]
    checks.inflight = _Inflight(cas, guards, expected)
    if multiparams:
        return cas, sent, {}
    return cas, [], sent[0]


def _cas_statement(statement: sa.Update, guards: tuple[_Guard, ...]) -> Any:
    """``statement`` with ``AND col = :expected`` per guard (``IS NOT DISTINCT FROM`` for a
    nullable column), memoized so that SQLAlchemy's compiled cache keeps hitting."""
    by_guards = _cas_statements.get(statement)
    if by_guards is None:
        by_guards = _cas_statements.setdefault(statement, {})
    found = by_guards.get(guards)
    if found is None:
        conditions = []
        for g in guards:
            expected = sa.bindparam(g.cas_param, type_=g.column.type)
            conditions.append(
                g.column.is_not_distinct_from(expected)
                if g.column.nullable
                else g.column == expected
            )
        found = by_guards[guards] = statement.where(*conditions)
    return found


def _lock_and_check(
    conn: Connection,
    checks: _FlushChecks,
    guards: tuple[_Guard, ...],
    expected: list[_Row],
) -> None:
    """The fallback: lock the rows, check they hold the expected states, let the UPDATE go."""
    changes = [
        found[g.column].change._replace(old=found[g.column].value, old_known=True)
        for found in expected
        for g in guards
    ]
    errors = _check_against_db(conn, changes, lock=True)[0]
    if errors:
        _raise(errors, checks.config)


def _after_execute(  # noqa: PLR0917 - SQLAlchemy passes the event's arguments by position
    conn: Connection,
    clauseelement: Any,
    multiparams: Any,
    params: Any,
    execution_options: Any,
    result: Any,
) -> None:
    if not _pending:
        return
    checks = _pending.get(conn)
    if checks is None:
        return
    inflight = checks.inflight
    if inflight is None or inflight.statement is not clauseelement:
        return
    checks.inflight = None
    matched = result.rowcount
    if matched == len(inflight.rows):
        return
    errors = _stale_rows(conn, inflight, matched)
    if errors:
        result.close()
        _raise(errors, checks.config)
    # every row still holds what this flush expected: not the status (e.g. the user's own
    # version_id_col); SQLAlchemy's row count check raises its StaleDataError


def _stale_rows(
    conn: Connection, inflight: _Inflight, matched: int
) -> list[IllegalTransitionError]:
    """The error path of a compare-and-set UPDATE that matched fewer rows than it was sent for:
    read what the rows hold now and say which moved."""
    guards = inflight.guards
    first = guards[0]
    keys = _ordered({found[first.column].change.identity for found in inflight.rows})
    position = {identity: i for i, identity in enumerate(keys)}
    rows = sorted(inflight.rows, key=lambda found: position[found[first.column].change.identity])
    current = _read_states(conn, first.pk_columns, [g.column for g in guards], keys, lock=False)
    stale: list[IllegalTransitionError] = []
    unsure: list[_Row] = []
    for found in rows:
        change = found[first.column].change
        now = current.get(change.identity)
        if now is None:
            stale.append(_stale(change, "the row no longer exists", found[first.column].value))
            continue
        moved = [
            (g, value)
            for g, value in zip(guards, now, strict=True)
            if g.key(value) != g.key(found[g.column].value)
        ]
        if not moved:
            continue  # still as expected: this row was updated, or stale for another reason
        if len(rows) == 1 or any(g.key(v) != g.key(found[g.column].change.new) for g, v in moved):
            g, value = next(
                ((g, v) for g, v in moved if g.key(v) != g.key(found[g.column].change.new)),
                moved[0],
            )
            stale.append(_stale(found[g.column].change, _moved(value), found[g.column].value))
        else:
            unsure.append(found)  # holds what this flush wrote: updated now, or moved there first
    missing = len(rows) - matched - len(stale)
    if missing > 0 and unsure:
        # Rows that another transaction had already moved to the state this flush was writing
        # look the same as rows this flush updated; name the first and say how many.
        found = unsure[0]
        change = found[first.column].change
        stale.append(
            _stale(
                change,
                f"{missing} of the {len(unsure)} rows of this UPDATE that now hold "
                f"{_plain(change.new)!r} had already been moved there by another transaction; "
                "reload them and decide again",
                found[first.column].value,
            )
        )
    return stale


# ORM-enabled bulk UPDATE ----------------------------------------------------------------------


class _Target(NamedTuple):
    static: bool
    value: Any  # the Python value (static) or a SQL expression (dynamic)


def _dml_values(stmt: Any) -> list[tuple[Any, Any]]:
    pairs: list[tuple[Any, Any]] = []
    ordered = getattr(stmt, "_ordered_values", None)  # SQLAlchemy 2.0 ordered_values()
    if ordered:
        pairs.extend(ordered)
    values = getattr(stmt, "_values", None)
    if values:
        pairs.extend(values.items())
    return pairs


def _is_guard_key(key: Any, guard: _Guard) -> bool:
    if isinstance(key, str):
        return key in (guard.attr_key, guard.column.name)
    element = key.__clause_element__() if hasattr(key, "__clause_element__") else key
    if element is guard.column:
        return True
    table = getattr(element, "table", None)
    return (
        isinstance(element, sa.ColumnClause)
        and isinstance(table, sa.Table)
        and table.name == guard.table.name
        and element.name == guard.column.name
    )


def _target(stmt: Any, params: Any, guard: _Guard) -> _Target | None:
    for key, value in _dml_values(stmt):
        if _is_guard_key(key, guard):
            return _resolve_value(value, params)
    if isinstance(params, Mapping):
        for name in (guard.attr_key, guard.column.name):
            if name in params:
                return _Target(True, params[name])
    return None


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


def _membership(expr: Any, guard: _Guard, keys: Collection[_Key]) -> ColumnElement[bool]:
    present = [k for k in keys if k is not None and k in guard.binds]
    parts: list[ColumnElement[bool]] = []
    if present:
        parts.append(expr.in_([guard.binds[k] for k in sorted(present, key=_sort_key)]))
    if None in keys:
        parts.append(expr.is_(None))
    if not parts:
        return sa.false()
    return parts[0] if len(parts) == 1 else sa.or_(*parts)


def _legal_predicate(guard: _Guard, col: Any, new: Any) -> ColumnElement[bool]:
    """SQL: the row may move from ``col`` to the value of expression ``new``."""
    parts: list[ColumnElement[bool]] = [col.is_not_distinct_from(new)]
    for source, targets in sorted(guard.next.items(), key=lambda kv: _sort_key(kv[0])):
        if not targets:
            continue
        at_source = col.is_(None) if source is None else col == guard.binds[source]
        parts.append(sa.and_(at_source, _membership(new, guard, targets)))
    return sa.or_(*parts)


def _do_orm_execute(orm_state: ORMExecuteState) -> Result[Any] | None:
    if not orm_state.is_update:
        return None
    session = orm_state.session
    config = _active_config(session)
    if config is None:
        return None
    mapper = orm_state.bind_mapper
    if mapper is None:
        return None
    guards = _guards(mapper)
    if not guards:
        return None
    params = orm_state.parameters
    if isinstance(params, (list, tuple)):
        return _bulk_by_pk(orm_state, config, mapper, guards, list(params))
    stmt: Any = orm_state.statement
    for guard in guards:
        target = _target(stmt, params, guard)
        if target is not None:
            stmt = _restrict(
                session,
                config=config,
                mapper=mapper,
                guard=guard,
                stmt=stmt,
                params=params,
                target=target,
            )
    orm_state.statement = stmt
    return None


def _restrict(
    session: Session,
    *,
    config: Config,
    mapper: Mapper[Any],
    guard: _Guard,
    stmt: Any,
    params: Any,
    target: _Target,
) -> Any:
    col = getattr(mapper.class_, guard.attr_key)
    if target.static:
        legal = _membership(col, guard, guard.sources_of(guard.key(target.value)))
        new_expr: Any = None
    else:
        new_expr = sa.type_coerce(target.value, guard.column.type)
        legal = _legal_predicate(guard, col, new_expr)
    blocked = sa.not_(sa.func.coalesce(legal, sa.false()))
    conn = session.connection(bind_arguments={"mapper": mapper})
    exec_params = dict(params) if isinstance(params, Mapping) else {}
    where = stmt.whereclause
    if config.bulk_update == "raise":
        extra = [new_expr.label("rdb_new")] if new_expr is not None else []
        query = sa.select(*guard.pk_columns, col, *extra).where(blocked)
        if where is not None:
            query = query.where(where)
        query = query.order_by(*guard.pk_columns).with_for_update(of=guard.table)
        rows = conn.execute(query, exec_params).all()
        if rows:
            n_pk = len(guard.pk_columns)
            first = rows[0]
            err = IllegalTransitionError(
                model=guard.model,
                pk=guard.pk_of(first[:n_pk]),
                column=guard.attr_key,
                from_state=first[n_pk],
                to_state=first[n_pk + 1] if new_expr is not None else target.value,
                via="orm-update",
                reason=f"{len(rows)} matching row(s) may not make this move; nothing was updated",
            )
            _report(err, config, blocked_rows=len(rows))
            raise err
    else:
        count_q = sa.select(sa.func.count()).select_from(guard.table).where(blocked)
        if where is not None:
            count_q = count_q.where(where)
        n_blocked = int(conn.execute(count_q, exec_params).scalar_one())
        if n_blocked:
            _count("bulk_rows_filtered", n_blocked)
            shown = "(SQL expression)" if new_expr is not None else repr(_plain(target.value))
            emit(
                config,
                logger,
                logging.WARNING,
                "Status transition blocked for %d row(s): bulk UPDATE of %s.%s "
                "to %s left them unchanged (filter mode)",
                n_blocked,
                guard.model,
                guard.attr_key,
                shown,
                event="transition_blocked",
                model=guard.model,
                column=guard.attr_key,
                to_state=None if new_expr is not None else _plain(target.value),
                via="orm-update",
                blocked_rows=n_blocked,
            )
    return stmt.where(legal)


def _bulk_by_pk(
    orm_state: ORMExecuteState,
    config: Config,
    mapper: Mapper[Any],
    guards: tuple[_Guard, ...],
    params: list[Any],
) -> Result[Any] | None:
    """ORM bulk UPDATE by primary key (a list of parameter dicts): lock and check each row."""
    rejected: set[int] = set()
    for guard in guards:
        wanted: dict[tuple[Any, ...], list[tuple[int, Any]]] = {}
        for index, row in enumerate(params):
            if not isinstance(row, Mapping):
                continue
            name = next((n for n in (guard.attr_key, guard.column.name) if n in row), None)
            if name is None or any(k not in row for k in guard.pk_attr_keys):
                continue
            identity = tuple(row[k] for k in guard.pk_attr_keys)
            wanted.setdefault(identity, []).append((index, row[name]))
        if not wanted:
            continue
        conn = orm_state.session.connection(bind_arguments={"mapper": mapper})
        current: dict[tuple[Any, ...], Any] = {}
        keys = _ordered(wanted)
        n_pk = len(guard.pk_columns)
        for chunk in _chunks(keys):
            stmt = (
                sa.select(*guard.pk_columns, guard.column)
                .where(_pk_filter(guard.pk_columns, chunk))
                .order_by(*guard.pk_columns)
                .with_for_update()
            )
            for db_row in conn.execute(stmt):
                current[tuple(db_row[:n_pk])] = db_row[n_pk]
        for identity, items in wanted.items():
            if identity not in current:
                continue  # no such row: the UPDATE changes nothing
            old = current[identity]
            for index, new in items:
                if guard.legal(guard.key(old), guard.key(new)):
                    continue
                change = _Change(guard, guard.pk_of(identity), identity, old, True, new, mapper)
                err = _illegal(change, old, "orm-update")
                if config.bulk_update == "raise":
                    _report(err, config)
                    raise err
                rejected.add(index)
                emit(
                    config,
                    logger,
                    logging.WARNING,
                    "Status transition blocked: %s(pk=%r).%s %r -> %r "
                    "(via orm-update, filter mode: parameter set skipped)",
                    guard.model,
                    change.pk,
                    guard.attr_key,
                    _plain(old),
                    _plain(new),
                    event="transition_blocked",
                    model=guard.model,
                    pk=change.pk,
                    column=guard.attr_key,
                    from_state=_plain(old),
                    to_state=_plain(new),
                    via="orm-update",
                    blocked_rows=1,
                )
    if not rejected:
        return None
    _count("bulk_rows_filtered", len(rejected))
    kept = [row for index, row in enumerate(params) if index not in rejected]
    if not kept:
        return null_result()
    orm_state.parameters = kept
    return orm_state.invoke_statement()


# --------------------------------------------------------------------------------------------
# Bypass
# --------------------------------------------------------------------------------------------


def bypass_transitions(target: Session | Connection, *, reason: str) -> None:
    """Switch the transition guards off for the rest of the current transaction, audited.

    Runs ``SET LOCAL resilient_db.bypass_transitions = 'on'`` (the trigger lets every change
    through while it is set) and, for a session, disables its flush and bulk-UPDATE guards until
    the transaction ends. ``reason`` is required and logged. On rollback or commit everything
    is back to normal. (A bypass set inside a SAVEPOINT that is rolled back ends with the
    savepoint on the database side; the session guards stay off until the transaction ends.)
    """
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("bypass_transitions() needs a reason=, which is logged for the audit")
    if isinstance(target, Session):
        conn = target.connection()
        transaction = target.get_transaction()
        target.info[_BYPASS_INFO_KEY] = transaction
    elif isinstance(target, Connection):
        conn = target
        if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            raise ValueError(
                "bypass_transitions() needs a transaction; this connection is in AUTOCOMMIT mode, "
                "where SET LOCAL would have no effect"
            )
    else:
        raise TypeError(
            "bypass_transitions() takes a Session or a Connection (for asyncio use "
            f"bypass_transitions_async), got {type(target).__name__}"
        )
    conn.exec_driver_sql(
        f"SET LOCAL {BYPASS_SETTING} = 'on'", execution_options={"no_parameters": True}
    )
    _count("bypasses")
    config = config_of(target) if isinstance(target, Session) else None
    emit(
        config if config is not None else _env_config(),
        logger,
        logging.WARNING,
        "transition guard bypassed for the current transaction: reason=%s",
        reason,
        event="transition_guard_bypassed",
        reason=reason,
    )


async def bypass_transitions_async(target: Any, *, reason: str) -> None:
    """:func:`bypass_transitions` for an ``AsyncSession`` or ``AsyncConnection``."""

    def run(sync_target: Any) -> None:
        bypass_transitions(sync_target, reason=reason)

    await target.run_sync(run)


# --------------------------------------------------------------------------------------------
# Introspection
# --------------------------------------------------------------------------------------------


def allowed_transitions(obj: object, *, column: str | None = None) -> set[Any]:
    """The states ``obj`` may move to from its current in-memory state.

    For an object that is not yet in the database, the initial states. ``column`` picks the
    guarded column when the model guards several. The attribute is read as usual; under
    ``AsyncSession`` make sure it is loaded (an expired attribute would need I/O).
    """
    guard = _one_guard(obj, column)
    state = _state_of(obj)
    if state.key is None:
        return {guard.state(k) for k in guard.initial}
    value = getattr(obj, guard.attr_key)
    return {guard.state(k) for k in guard.next.get(guard.key(value), frozenset())}


def _graph_of(model_or_rules: object, column: str | None) -> tuple[str, list[Any], Any, Any]:
    """(title, states, initial, next) for drawing, from a model or plain rules."""
    if isinstance(model_or_rules, TransitionRules):
        rules = model_or_rules
        graph = _expand(rules.declared_states, rules.transitions, key=_identity)
        return rules.column, sorted(graph, key=_sort_key), rules.initial, graph
    guard = _one_guard(model_or_rules, column)
    states = [guard.state(k) for k in sorted(guard.next, key=_sort_key)]
    nxt = {guard.state(k): {guard.state(t) for t in targets} for k, targets in guard.next.items()}
    initial = {guard.state(k) for k in guard.initial}
    return f"{guard.model}.{guard.attr_key}", states, initial, nxt


def _label(state: object) -> str:
    return "NULL" if state is None else str(_plain(state))


def _mermaid_text(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"#<>;:{}[]|\\`' or ord(ch) < 32:
            out.append(f"#{ord(ch)};")
        else:
            out.append(ch)
    return "".join(out)


def rules_to_mermaid(model: object, *, column: str | None = None) -> str:
    """A Mermaid ``stateDiagram-v2`` of the rules of ``model`` (a mapped class or rules).

    ``[*] --> s`` marks initial states and ``s --> [*]`` states with no way out. State names are
    written as labels (``state "name" as sN``) with special characters entity-escaped.
    """
    title, states, initial, nxt = _graph_of(model, column)
    ids = {s: f"s{i}" for i, s in enumerate(states)}
    lines = ["stateDiagram-v2", f"    %% {_mermaid_text(title)}"]
    lines += [f'    state "{_mermaid_text(_label(s))}" as {ids[s]}' for s in states]
    lines += [f"    [*] --> {ids[s]}" for s in states if s in initial]
    for s in states:
        targets = sorted(nxt.get(s, ()), key=_sort_key)
        lines += [f"    {ids[s]} --> {ids[t]}" for t in targets]
        if not targets:
            lines.append(f"    {ids[s]} --> [*]")
    return "\n".join(lines) + "\n"


def _dot_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\r", "\\r").replace("\n", "\\n")
    return f'"{escaped}"'


def rules_to_dot(model: object, *, column: str | None = None) -> str:
    """A Graphviz ``digraph`` of the rules of ``model`` (a mapped class or rules); a point node
    leads into the initial states. Names are written as escaped, double-quoted labels."""
    title, states, initial, nxt = _graph_of(model, column)
    ids = {s: f"n{i}" for i, s in enumerate(states)}
    lines = [
        f"digraph {_dot_string(title)} {{",
        "    rankdir=LR;",
        "    node [shape=box, style=rounded];",
        '    start [shape=point, label=""];',
    ]
    lines += [f"    {ids[s]} [label={_dot_string(_label(s))}];" for s in states]
    lines += [f"    start -> {ids[s]};" for s in states if s in initial]
    for s in states:
        lines += [f"    {ids[s]} -> {ids[t]};" for t in sorted(nxt.get(s, ()), key=_sort_key)]
    lines.append("}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Database trigger
# --------------------------------------------------------------------------------------------


def _ident(name: str) -> str:
    if "\x00" in name:
        raise TransitionRulesError(f"identifier {name!r} contains a NUL character")
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    """A PostgreSQL string literal that means ``value`` whatever standard_conforming_strings is.

    Plain ``'...'`` when there is nothing special; otherwise an escape string ``E'...'`` in which
    backslashes and control characters are written as ``\\xHH`` (so the SQL text itself contains
    neither, and survives tools that rewrite tabs or treat backslash-colon specially).
    """
    if "\x00" in value:
        raise TransitionRulesError(f"value {value!r} contains a NUL character")
    if not any(ch == "\\" or ord(ch) < 32 or ord(ch) == 127 for ch in value):
        return "'" + value.replace("'", "''") + "'"
    out = []
    for ch in value:
        if ch == "'":
            out.append("''")
        elif ch == "\\" or ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "E'" + "".join(out) + "'"


def _pg_name(*parts: str) -> str:
    """A PostgreSQL identifier from ``parts``, shortened with a hash to fit 63 bytes."""
    name = "_".join(parts)
    if len(name.encode()) <= _PG_NAME_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    budget = _PG_NAME_MAX - len(digest) - 1
    short = name.encode()[:budget].decode(errors="ignore")
    return f"{short}_{digest}"


class _TriggerNames(NamedTuple):
    table: str  # quoted, schema-qualified when the table has a schema
    function: str  # quoted, schema-qualified likewise
    function_name: str
    insert_trigger: str
    update_trigger: str


def _names(guard: _Guard) -> _TriggerNames:
    table = guard.table
    schema = f"{_ident(table.schema)}." if table.schema else ""
    function_name = _pg_name("rdb_transition", table.name, guard.column.name)
    return _TriggerNames(
        table=f"{schema}{_ident(table.name)}",
        function=f"{schema}{_ident(function_name)}",
        function_name=function_name,
        insert_trigger=_pg_name("rdb_transition", guard.column.name, "ins"),
        update_trigger=_pg_name("rdb_transition", guard.column.name, "upd"),
    )


def _stamp(guard: _Guard) -> str:
    """Version stamp: a hash of the database-level rules and of the generator version."""
    canonical = {
        "generator": _GENERATOR_VERSION,
        "model": guard.model,
        "schema": guard.table.schema,
        "table": guard.table.name,
        "column": guard.column.name,
        "pk": [c.name for c in guard.pk_columns],
        "initial": sorted(guard.initial, key=_sort_key),
        "transitions": [
            [source, sorted(targets, key=_sort_key)]
            for source, targets in sorted(guard.next.items(), key=lambda kv: _sort_key(kv[0]))
        ],
    }
    digest = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()
    return f"{_STAMP_PREFIX} v{_GENERATOR_VERSION} rules-sha256={digest}"


def _member_sql(expr: str, keys: Collection[_Key]) -> str:
    present = sorted((k for k in keys if k is not None), key=_sort_key)
    parts = []
    if present:
        parts.append(f"coalesce({expr} IN ({', '.join(_literal(k) for k in present)}), false)")
    if None in keys:
        parts.append(f"{expr} IS NULL")
    if not parts:
        return "false"
    return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"


def _function_body(guard: _Guard) -> str:
    col = _ident(guard.column.name)
    col_lit = _literal(guard.column.name)
    pk_new = ", ".join(f"{_literal(c.name)}, NEW.{_ident(c.name)}" for c in guard.pk_columns)
    pk_old = ", ".join(f"{_literal(c.name)}, OLD.{_ident(c.name)}" for c in guard.pk_columns)
    moves = [
        f"(v_from IS NOT DISTINCT FROM {'NULL' if src is None else _literal(src)}"
        f" AND {_member_sql('v_to', targets)})"
        for src, targets in sorted(guard.next.items(), key=lambda kv: _sort_key(kv[0]))
        if targets
    ]
    update_ok = "\n            OR ".join(moves) if moves else "false"
    return f"""
DECLARE
    v_from text;
    v_to text := NEW.{col}::text;
    v_pk json;
BEGIN
    IF coalesce(current_setting({_literal(BYPASS_SETTING)}, true), '') = 'on' THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'INSERT' THEN
        IF {_member_sql("v_to", guard.initial)} THEN
            RETURN NEW;
        END IF;
        v_pk := json_build_object({pk_new});
    ELSE
        v_from := OLD.{col}::text;
        IF v_from IS NOT DISTINCT FROM v_to THEN
            RETURN NEW;
        END IF;
        IF {update_ok} THEN
            RETURN NEW;
        END IF;
        v_pk := json_build_object({pk_old});
    END IF;
    RAISE EXCEPTION USING
        ERRCODE = {_literal(TRANSITION_SQLSTATE)},
        MESSAGE = format('Status transition blocked: %s.%s %s -> %s',
            TG_TABLE_NAME, {col_lit},
            CASE WHEN TG_OP = 'INSERT' THEN '(new row)'
                 ELSE coalesce(quote_literal(v_from), 'NULL') END,
            coalesce(quote_literal(v_to), 'NULL')),
        DETAIL = json_build_object(
            'resilient_db', 'transition', 'model', {_literal(guard.model)},
            'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'column', {col_lit},
            'op', TG_OP, 'from', v_from, 'to', v_to, 'pk', v_pk)::text,
        HINT = 'Allowed moves are declared in the __transitions__ of the model; '
            'for an audited repair use resilient_db bypass_transitions()';
END
"""


def _dollar_quote(body: str) -> str:
    tag = "$rdb$"
    n = 0
    while tag in body:
        n += 1
        tag = f"$rdb{n}$"
    return f"{tag}{body}{tag}"


def _install_statements(guard: _Guard) -> list[str]:
    n = _names(guard)
    col = _ident(guard.column.name)
    return [
        f"CREATE OR REPLACE FUNCTION {n.function}() RETURNS trigger LANGUAGE plpgsql\n"
        f"SET search_path = pg_catalog, pg_temp\n"
        f"AS {_dollar_quote(_function_body(guard))}",
        f"COMMENT ON FUNCTION {n.function}() IS {_literal(_stamp(guard))}",
        f"DROP TRIGGER IF EXISTS {_ident(n.insert_trigger)} ON {n.table}",
        f"CREATE TRIGGER {_ident(n.insert_trigger)} BEFORE INSERT ON {n.table}\n"
        f"FOR EACH ROW EXECUTE FUNCTION {n.function}()",
        f"DROP TRIGGER IF EXISTS {_ident(n.update_trigger)} ON {n.table}",
        f"CREATE TRIGGER {_ident(n.update_trigger)} BEFORE UPDATE ON {n.table}\n"
        f"FOR EACH ROW WHEN (OLD.{col} IS DISTINCT FROM NEW.{col})\n"
        f"EXECUTE FUNCTION {n.function}()",
    ]


def _drop_statements(guard: _Guard) -> list[str]:
    n = _names(guard)
    return [
        f"DROP TRIGGER IF EXISTS {_ident(n.insert_trigger)} ON {n.table}",
        f"DROP TRIGGER IF EXISTS {_ident(n.update_trigger)} ON {n.table}",
        f"DROP FUNCTION IF EXISTS {n.function}()",
    ]


def _script(statements: Iterable[str]) -> str:
    return "".join(f"{s};\n\n" for s in statements).rstrip("\n") + "\n"


def transition_trigger_sql(model: type[Any]) -> str:
    """Idempotent PostgreSQL DDL enforcing the rules of ``model`` in the database.

    Per guarded column: a PL/pgSQL function (``CREATE OR REPLACE``) stamped with a hash of the
    rules (``COMMENT ON FUNCTION``), a ``BEFORE INSERT`` trigger and a ``BEFORE UPDATE`` trigger
    that fires only ``WHEN (OLD.col IS DISTINCT FROM NEW.col)``. An illegal change raises SQLSTATE
    :data:`TRANSITION_SQLSTATE` with a JSON DETAIL (model, schema, table, column, from, to, pk).
    All literals and identifiers are quoted. Run it as a script (``psql``, ``op.execute``), or
    with :func:`install_transition_trigger`, which sends the statements one at a time.
    """
    return _script(s for g in _guards_of(model) for s in _install_statements(g))


def transition_trigger_drop_sql(model: type[Any]) -> str:
    """DDL removing what :func:`transition_trigger_sql` installs (for a downgrade)."""
    return _script(s for g in _guards_of(model) for s in _drop_statements(g))


_TEXT_BIND = re.compile(r"(?<![:\w\\]):(\w+)(?!:)", re.UNICODE)


def _run_statements(target: Any, statements: list[str]) -> None:
    migration_context = getattr(target, "migration_context", None)
    if migration_context is None and not isinstance(target, (Engine, Connection, Session)):
        get_context = getattr(target, "get_context", None)
        if callable(get_context):  # ``from alembic import op``: the module proxy of Operations
            migration_context = get_context()
    if migration_context is not None:  # an Alembic Operations object (``op``)
        if getattr(migration_context, "as_sql", False):
            for stmt in statements:  # offline: escape ":name" so text() sees no bind
                target.execute(sa.text(_TEXT_BIND.sub(lambda m: "\\" + m.group(0), stmt)))
            return
        target = target.get_bind()
    if isinstance(target, Engine):
        with target.begin() as conn:
            _run_statements(conn, statements)
        return
    if isinstance(target, Session):
        target = target.connection()
    if not isinstance(target, Connection):
        raise TypeError(
            "expected an Alembic op, a Connection, an Engine or a Session, got "
            f"{type(target).__name__} (for asyncio use conn.run_sync(...))"
        )
    for stmt in statements:
        target.exec_driver_sql(stmt, execution_options={"no_parameters": True})


def install_transition_trigger(bind_or_op: Any, model: type[Any]) -> None:
    """Install (or replace) the trigger of ``model``: in an Alembic migration pass ``op``;
    otherwise a ``Connection``, ``Engine`` or ``Session`` (for asyncio:
    ``await conn.run_sync(install_transition_trigger, Model)``)."""
    _run_statements(bind_or_op, [s for g in _guards_of(model) for s in _install_statements(g)])


def uninstall_transition_trigger(bind_or_op: Any, model: type[Any]) -> None:
    """Remove the trigger and function of ``model`` (the downgrade of the install)."""
    _run_statements(bind_or_op, [s for g in _guards_of(model) for s in _drop_statements(g)])


_DRIFT_QUERY = sa.text(
    """
    SELECT t.tgname::text AS name, t.tgenabled::text AS enabled, p.proname::text AS function,
           pg_catalog.obj_description(p.oid, 'pg_proc') AS stamp
    FROM pg_catalog.pg_trigger t
    JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
    WHERE t.tgrelid = pg_catalog.to_regclass(:rel) AND t.tgname IN (:ins, :upd)
    """
)
_TABLE_QUERY = sa.text("SELECT pg_catalog.to_regclass(:rel) IS NOT NULL")


def trigger_drift(connection: Connection | Session, model: type[Any]) -> str | None:
    """``None`` when the database enforces exactly the declared rules of ``model``; otherwise a
    sentence saying what differs (trigger missing or disabled, stamp from other rules)."""
    conn = connection.connection() if isinstance(connection, Session) else connection
    problems: list[str] = []
    for guard in _guards_of(model):
        n = _names(guard)
        where = f"{guard.model}.{guard.attr_key} (table {guard.table.name})"
        if not conn.execute(_TABLE_QUERY, {"rel": n.table}).scalar():
            problems.append(f"{where}: the table does not exist")
            continue
        rows = {
            r.name: r
            for r in conn.execute(
                _DRIFT_QUERY, {"rel": n.table, "ins": n.insert_trigger, "upd": n.update_trigger}
            )
        }
        expected = _stamp(guard)
        stamps: set[str | None] = set()
        for trigger in (n.insert_trigger, n.update_trigger):
            row = rows.get(trigger)
            if row is None:
                problems.append(f"{where}: trigger {trigger} is missing")
                continue
            if row.enabled == "D":
                problems.append(f"{where}: trigger {trigger} is disabled")
            if row.function != n.function_name:
                problems.append(
                    f"{where}: trigger {trigger} calls {row.function}() instead of "
                    f"{n.function_name}()"
                )
            else:
                stamps.add(row.stamp)
        for stamp in sorted(stamps - {expected}, key=str):
            problems.append(
                f"{where}: installed function stamp ({stamp or 'no stamp'}) does not match the "
                f"declared rules ({expected}); reinstall with transition_trigger_sql()"
            )
    return "; ".join(problems) if problems else None


# --------------------------------------------------------------------------------------------
# Mapping the trigger's error back
# --------------------------------------------------------------------------------------------


def _error_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop(0)
        if item is None or id(item) in seen or len(seen) > 8:
            continue
        seen.add(id(item))
        yield item
        orig = getattr(item, "orig", None)
        todo += [orig if isinstance(orig, BaseException) else None, item.__cause__]


def _sqlstate_detail(exc: BaseException) -> tuple[bool, str | None]:
    matched = False
    detail: str | None = None
    for item in _error_chain(exc):
        code = getattr(item, "sqlstate", None) or getattr(item, "pgcode", None)
        if code == TRANSITION_SQLSTATE:
            matched = True
        if detail is None:
            diag = getattr(item, "diag", None)
            text = getattr(diag, "message_detail", None) or getattr(item, "detail", None)
            if isinstance(text, str) and text:
                detail = text
    return matched, detail


def exception_from_db(
    exc: BaseException, *, log: bool = False, config: Config | None = None
) -> IllegalTransitionError | None:
    """Map the trigger's error (SQLSTATE :data:`TRANSITION_SQLSTATE`) to an
    :class:`IllegalTransitionError` with ``via="db"``; ``None`` for any other error.

    Works on the SQLAlchemy ``DBAPIError`` (or the driver error) of psycopg 3 and asyncpg.
    States are given back as declared on the model when the model is known in this process.
    With ``log=True`` the block is reported and counted like the session guards do (under
    ``config``'s switches; by default the environment's).
    """
    matched, detail = _sqlstate_detail(exc)
    if not matched:
        return None
    info: dict[str, Any] = {}
    if detail:
        try:
            parsed = json.loads(detail)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            info = parsed
    table = str(info.get("table", "?"))
    column = str(info.get("column", "?"))
    guard = _guard_for_table(info.get("model"), info.get("schema"), table, column)
    pk_obj = info.get("pk")
    pk: Any = pk_obj
    if isinstance(pk_obj, dict):
        values = tuple(pk_obj.values())
        pk = values[0] if len(values) == 1 else values
    from_key, to_key = info.get("from"), info.get("to")
    op = info.get("op")
    err = IllegalTransitionError(
        model=str(info.get("model", guard.model if guard else table)),
        pk=pk,
        column=guard.attr_key if guard else column,
        from_state=guard.state(from_key) if guard else from_key,
        to_state=guard.state(to_key) if guard else to_key,
        via="db",
        reason=(
            "new rows must start in an initial state"
            if op == "INSERT"
            else "blocked by the database trigger"
        ),
    )
    if log:
        _report(err, config)
    return err


def _guard_for_table(model: object, schema: object, table: str, column: str) -> _Guard | None:
    """The guard that installed the trigger, preferring the same model name and schema."""
    with _registry_lock:
        refs = list(_by_table.get((table, column), ()))
    candidates = [
        g
        for g in (r() for r in reversed(refs))
        if g is not None and g.table.schema in (None, schema)
    ]
    for g in candidates:
        if g.model == model:
            return g
    return candidates[0] if candidates else None
