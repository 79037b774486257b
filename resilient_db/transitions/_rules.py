"""Transition rules: the frozen declaration, its validation, and its compiled form per mapper.

:class:`TransitionRules` is plain data checked when built. When a model's mapper is configured
its rules are compiled into one :class:`Guard` per guarded column: every state under the key the
database spells it by (``col::text``), the transition graph with the wildcard applied, the
primary key. Everything else in the package works from guards. Pure: no connection, no session.
"""

from __future__ import annotations

import dataclasses
import decimal
import enum
import functools
import math
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, TypeAlias, TypeGuard, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.ext.declarative import AbstractConcreteBase
from sqlalchemy.orm import MANYTOONE, Mapper, NotExtension
from sqlalchemy.orm.state import InstanceState

from resilient_db._errors import ResilientDBError, utf8_problem
from resilient_db._internals import flush_pk_bind_name
from resilient_db._state import renew_after_fork

__all__ = [
    "ANY_STATE",
    "Guard",
    "Key",
    "State",
    "TransitionRules",
    "TransitionRulesError",
    "Undeclared",
    "allowed_from",
    "allowed_transitions",
    "compiled_guards",
    "expand",
    "guard_for_table",
    "guards_of",
    "identity_key",
    "mapper_of",
    "one_guard",
    "plain",
    "sort_key",
    "state_of",
    "transition_rules",
    "trims_scale",
    "written_by_name",
]

#: Wildcard source state: "from any declared state".
ANY_STATE = "*"

#: A status value: a string, an integer, a bool (of a Boolean column), a ``decimal.Decimal``
#: (of a ``Numeric`` column) or an ``enum.Enum`` member (``None`` means SQL NULL).
State: TypeAlias = str | int | decimal.Decimal | enum.Enum | None
Key: TypeAlias = str | None  # a state as the database spells it (``col::text``)
# the source states of a ``transitions`` mapping: a TypeVar, as a mapping's key type is
# invariant (a ``dict[str, set[str]]`` or ``dict[Status, set[Status]]`` made beforehand is a
# ``Mapping[State, ...]`` to no type checker)
_Source = TypeVar("_Source", bound=State)


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
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            # (a NaN equals nothing, itself included: no set or rule could hold it)
            raise TransitionRulesError(
                f"TransitionRules(column={column!r}): {where} contains {value!r}, which is no "
                "finite number; declare it as text, as PostgreSQL writes it ('NaN', "
                "'Infinity', '-Infinity')"
            )
        return value
    if not isinstance(value, (str, int)):
        raise TransitionRulesError(
            f"TransitionRules(column={column!r}): {where} contains {value!r} of type "
            f"{type(value).__name__}; states must be str, int or enum.Enum members (or bools, "
            "for a Boolean column; Decimals, for a Numeric one)"
        )
    if isinstance(value, str) and "\x00" in value:
        raise TransitionRulesError(
            f"TransitionRules(column={column!r}): {where} contains a state with a NUL character, "
            "which PostgreSQL text cannot store"
        )
    if isinstance(value, str) and utf8_problem(value) is not None:
        # (os.environ's spelling of a byte of another encoding: the model mapped, and the
        # install and every write of the state failed with the codec's error)
        raise TransitionRulesError(
            f"TransitionRules(column={column!r}): {where} contains {value!r}, which is no "
            "UTF-8 text (a byte of another encoding?); PostgreSQL can't be sent it"
        )
    return value


def _check_bools(groups: Iterable[tuple[str, Iterable[State]]], column: str) -> None:
    """Bools are the states of a Boolean column, which holds nothing else: bool states mixed
    with states of other types (``{"pending": {True}}``, where ``True`` is no mistyped 1) are
    refused."""
    found = [(where, s) for where, states in groups for s in states]
    first_bool = next(((w, s) for w, s in found if isinstance(s, bool)), None)
    other = next(
        (s for _, s in found if s is not None and s != ANY_STATE and not isinstance(s, bool)),
        None,
    )
    if first_bool is not None and other is not None:
        where, value = first_bool
        raise TransitionRulesError(
            f"TransitionRules(column={column!r}): {where} contains {value!r} of type bool among "
            f"states of other types ({other!r}); states must be str, int or enum.Enum members, "
            "or all bools (for a Boolean column)"
        )


def _state_set(values: object, *, where: str, column: str) -> frozenset[State]:
    if values is None:
        # (None standing for "no moves" would be a state, SQL NULL, if put in the set)
        hint = "set() for none" if where.startswith("transitions[") else "{None} for NULL"
        raise TransitionRulesError(
            f"TransitionRules(column={column!r}): {where} must be a set of states, got None; "
            f"write {hint}"
        )
    if isinstance(values, Mapping):
        # (iterating a mapping gives its keys: what its values say would be dropped unseen)
        raise TransitionRulesError(
            f"TransitionRules(column={column!r}): {where} must be a set of states, got a "
            f"{type(values).__name__} ({values!r}), whose values would be dropped unseen; "
            "give the states as a set"
        )
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
    but missing here is an error. States are strings, integers, ``True``/``False`` (for a
    ``Boolean`` column, whose states can only be bools), finite ``decimal.Decimal`` numbers
    (for a ``Numeric`` column: ``Decimal("1.5")`` is the state PostgreSQL writes ``1.50`` in
    ``Numeric(4, 2)``) or ``enum.Enum`` members (for a SQLAlchemy ``Enum`` column); ``None``
    stands for SQL NULL and is a state only if declared.

    Instances are immutable and hashable. A model may guard several columns by setting
    ``__transitions__`` to a sequence of rules. Setting a column to the value it already holds
    is never a transition: it is let through on every path, so a self-loop
    (``{"a": {"a"}}``) is accepted and changes nothing. Empty ``transitions`` are refused: a
    status set once at insert is declared state by state (``{"filed": set()}``).
    """

    column: str
    transitions: Mapping[State, frozenset[State]] = dataclasses.field(hash=False)
    initial: frozenset[State]
    states: frozenset[State] | None

    def __init__(
        self,
        *,
        column: str,
        transitions: Mapping[_Source, Iterable[State]],
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
        if not table:
            # most likely a table that came out empty (built from configuration, say): every
            # UPDATE of the column refused, found at the first one. A status set once at insert
            # is said state by state, as deliberately as any other rule.
            example = ", ".join(f"{state!r}: set()" for state in sorted(init, key=sort_key))
            raise TransitionRulesError(
                f"TransitionRules(column={column!r}): transitions is empty, so no row could "
                "ever change state; declare the moves, or, for a status set once at insert "
                f"and never changed, say so: transitions={{{example}}}"
            )
        declared = None if states is None else _state_set(states, where="states", column=column)
        _check_bools(
            [
                ("transitions", table),
                *((f"transitions[{k!r}]", v) for k, v in table.items()),
                ("initial", init),
                ("states", declared or ()),
            ],
            column,
        )
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
        graph = expand(self.declared_states, self.transitions, key=identity_key)
        return graph.get(state, frozenset())


def identity_key(value: State) -> Any:
    """The ``key`` of :func:`expand` for a graph over the states as declared."""
    return value


def expand(
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
        if not rules:
            raise TransitionRulesError(
                f"{owner}.__transitions__ is an empty sequence: it declares no rules, so "
                f"nothing of {owner} would be guarded; give it TransitionRules, or remove it"
            )
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


_NO_KEYS: frozenset[Any] = frozenset()


class Undeclared(str):
    """Key of a value that is no state of the column type; it starts with NUL, which no real
    key contains, so it never equals one. ``why``: what the column type made of the value."""

    why: str = ""


@dataclasses.dataclass(frozen=True, eq=False)
class Guard:
    """The compiled rules of one guarded column of one mapper. States are handled by their key,
    the text the database gives for them (``col::text``), so that a name, an enum member and
    its value compare as the database does."""

    rules: TransitionRules
    model: str
    attr_key: str
    column: sa.Column[Any]
    pk_columns: tuple[sa.Column[Any], ...]
    pk_attr_keys: tuple[str, ...]
    initial: frozenset[Key]
    next: Mapping[Key, frozenset[Key]]
    states: Mapping[Key, State]  # key -> declared state (for users)
    binds: Mapping[Key, Any]  # key -> value as SQLAlchemy binds it for this column
    pk_labels: tuple[str, ...]  # how the flush's UPDATE names its primary-key parameters
    cas_param: str  # the parameter carrying the expected state in that UPDATE
    text_keys: bool  # a str value is its own key (any column type but Enum and Boolean)
    #: The model the database trigger names (its error detail and log line): the class nearest
    #: the root of the inheritance hierarchy that guards the same column by the same rules (a
    #: single-table subclass's trigger is its base's), so every class of a table installs the
    #: same trigger.
    owner: str
    #: the many-to-one relationships of the model that write the status column from the related
    #: object, each as (its attribute, the related model's attribute the column copies): a
    #: status assigned through one is judged and compare-and-set as a set column is
    related: tuple[tuple[str, str], ...] = ()
    #: the column's ``onupdate`` (a ``ColumnDefault``: a value, a Python function SQLAlchemy
    #: calls as it runs the UPDATE, or a SQL expression the server computes in it): what a
    #: flush's UPDATE of a row that does not set the status writes into it, judged and
    #: compare-and-set as a status set is
    onupdate: Any = None
    #: ``onupdate`` is a SQL expression: its value is known only once the server wrote it, so
    #: the flush's UPDATE writing it reads it back (``RETURNING``) and judges it then
    sql_onupdate: bool = False
    #: set for a column of a table that another class guards and this one guards by no rules
    #: of its own: that class (its name), whose rules judge the rows this one writes there.
    #: The session guards use such a guard as any other; the trigger and introspection of the
    #: class's declared rules (:func:`guards_of`) leave it out
    lender: str | None = None

    @functools.cached_property
    def initial_text(self) -> frozenset[str]:
        """The initial states whose key a ``str`` value of exactly that class is (empty for a
        column whose ``str`` values are not their own keys): a new row's ``str`` status in it
        starts as it should, in one membership test (every new row of a flush is judged)."""
        if not self.text_keys:
            return frozenset()
        return frozenset(k for k in self.initial if k.__class__ is str)

    @functools.cached_property
    def table(self) -> sa.Table:  # read by every guarded flush: computed once
        table = self.column.table
        assert isinstance(table, sa.Table)
        return table

    def key(self, value: object) -> Key:
        """The database spelling of ``value`` (what ``col::text`` gives)."""
        if value.__class__ is str and self.text_keys:
            return value  # the common case, without _db_key
        try:
            return _db_key(self.column.type, value)
        except (LookupError, TypeError, ValueError) as exc:
            key = Undeclared("\x00" + repr(value))
            key.why = str(exc)
            return key

    def legal(self, old: Key, new: Key) -> bool:
        return old == new or new in self.next.get(old, _NO_KEYS)

    def legal_move(self, old: object, new: object) -> bool:
        """:meth:`legal` of the keys of ``old`` and ``new`` (values as assigned or read); for
        two ``str`` states of a column whose ``str`` values are their own keys, in one call
        (every changed row of a flush passes here)."""
        if self.text_keys and old.__class__ is str and new.__class__ is str:
            return old == new or new in self.next.get(old, _NO_KEYS)
        return self.legal(self.key(old), self.key(new))

    def sources_of(self, target: Key) -> frozenset[Key]:
        """Keys that may move to ``target``, ``target`` itself included (a no-op is fine)."""
        found = {source for source, targets in self.next.items() if target in targets}
        found.add(target)
        return frozenset(found)

    def state(self, key: Key) -> Any:
        """The declared state for a key, or the database text when the key is undeclared."""
        return self.states.get(key, key)

    def pk_of(self, identity: Sequence[Any] | None) -> Any:
        if identity is None:
            return None
        values = tuple(identity)
        return values[0] if len(values) == 1 else values


def _db_key(type_: sa.types.TypeEngine[Any], value: object) -> Key:
    if value is None:
        return None
    if isinstance(type_, sa.types.TypeDecorator):
        impl: sa.types.TypeEngine[Any] = _under(type_)
        if converts(type_):
            # the column stores what the type's process_bind_param makes of the value
            return _db_key(impl, _stored_value(type_, value))
        if isinstance(impl, sa.types.TypeDecorator):
            return _db_key(impl, value)
    else:
        impl = type_
    if isinstance(impl, sa.Enum):
        db = enum_db_values(impl).get(value)  # TypeError: unhashable, no state
        if db is None:
            raise LookupError(f"{value!r} is not among the values of {impl!r}")
        return db
    if isinstance(value, enum.Enum):
        if written_by_name(type_, value):
            raise TypeError(f"{value!r} is written by its name, not its value")
        return _db_key(type_, value.value)
    if isinstance(impl, sa.Boolean):
        # what SQLAlchemy binds (True, False, also 1 and 0), as PostgreSQL writes it (bool::text)
        if isinstance(value, int) and value in (0, 1):
            return "true" if value else "false"
        raise TypeError(f"{value!r} is no value of a Boolean column")
    if isinstance(value, (float, decimal.Decimal)) and isinstance(impl, sa.Integer):
        return _integral_key(value)
    if _is_numeric(impl) and isinstance(value, (int, float, decimal.Decimal)):
        if isinstance(value, bool):
            raise TypeError(f"{value!r} is no state value")
        return _numeric_text(impl, _as_decimal(value), rounds=False)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"{value!r} is no state value")
    if isinstance(impl, (sa.CHAR, sa.NCHAR)):
        # character(n) pads with spaces, and gives them back; col::text drops them
        return str(value).rstrip(" ")
    return str(value)


def _integral_key(value: float | decimal.Decimal) -> str:
    """The key of a number given for an integer column: PostgreSQL stores ``1.0`` or
    ``Decimal("1")`` as 1, a state like ``1``; a number that is no integer it rounds, which no
    guard can tell as the database would (refused as no state)."""
    finite = value.is_finite() if isinstance(value, decimal.Decimal) else math.isfinite(value)
    if not finite or value != int(value):
        raise ValueError(
            f"{value!r} is no integer: the column holds integers (PostgreSQL would round it)"
        )
    return str(int(value))


def _is_numeric(impl: sa.types.TypeEngine[Any]) -> TypeGuard[sa.Numeric[Any]]:
    """Whether ``impl`` is PostgreSQL's ``numeric`` (not a float, a subclass in SQLAlchemy 2.0)."""
    return isinstance(impl, sa.Numeric) and not isinstance(impl, sa.Float)


def trims_scale(column: sa.Column[Any]) -> bool:
    """Whether ``column`` stores a ``numeric`` without a scale (``NUMERIC``), whose text the
    trigger compares without its trailing zeros (``trim_scale(col)::text``): PostgreSQL keeps
    each value with the decimals it was written with, ``3`` and ``3.000`` alike."""
    impl = storage_type(column.type)
    return _is_numeric(impl) and _numeric_scale(impl) is None


def _numeric_scale(impl: sa.Numeric[Any]) -> int | None:
    """The scale of a ``numeric`` column as SQLAlchemy creates it: ``NUMERIC(p, s)``; 0 for
    ``NUMERIC(p)``; None for ``NUMERIC`` (a scale without a precision is not written), which
    keeps every value with the decimals it was written with."""
    if impl.precision is None:
        return None
    return impl.scale or 0


# room for every digit of any numeric PostgreSQL stores (131072 before the point, 16383 after)
# and any exponent (none is clamped), and rounding as numeric's own (half away from zero)
_NUMERIC_CONTEXT: Final = decimal.Context(
    prec=150_000, rounding=decimal.ROUND_HALF_UP, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN
)
_NUMERIC_DIGITS: Final = 131072  # before the decimal point, at most
_NUMERIC_DECIMALS: Final = 16383  # after it, at most


def _as_decimal(value: int | float | decimal.Decimal) -> decimal.Decimal:
    """``value`` as the number PostgreSQL makes of it in a ``numeric`` column: a float as its
    cast from ``float8`` reads it (15 significant digits)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is no finite number")
        return decimal.Decimal(f"{value:.15g}")
    return decimal.Decimal(value)


def _numeric_text(impl: sa.Numeric[Any], value: decimal.Decimal, *, rounds: bool) -> str:
    """``value`` as PostgreSQL writes it (``col::text``) once stored in a ``numeric`` column
    of ``impl``'s scale: ``1`` as ``'1.00'`` in ``NUMERIC(4, 2)``. Without a scale the column
    keeps the decimals each value was written with (``3.000`` is ``'3.000'``, and equals 3), so
    the trigger compares its text without the trailing zeros (``trim_scale``: see
    :func:`trims_scale`), and so is the value written here: ``'3'``, ``'1.5'``. A value with
    more decimals than the scale PostgreSQL rounds, which no guard can tell as the database
    would: a ValueError (``rounds``: the rounded value's text, as for a literal PostgreSQL
    reads)."""
    if not value.is_finite():
        return "NaN" if value.is_nan() else ("-Infinity" if value < 0 else "Infinity")
    scale = _numeric_scale(impl)
    try:
        if scale is not None:
            stored = value.quantize(decimal.Decimal(1).scaleb(-scale), context=_NUMERIC_CONTEXT)
            if stored != value and not rounds:
                raise ValueError(
                    f"{value} has more digits than the column's scale ({scale}) keeps "
                    f"(PostgreSQL would round it to {_plain_text(stored, scale)})"
                )
            value = stored
        elif value.adjusted() >= _NUMERIC_DIGITS or _decimals(value) > _NUMERIC_DECIMALS:
            raise ValueError(f"{value} is out of the range of PostgreSQL's numeric")
        return _plain_text(value, scale)
    except decimal.DecimalException:  # more digits than any numeric holds
        raise ValueError(f"{value} is out of the range of PostgreSQL's numeric") from None


def _decimals(value: decimal.Decimal) -> int:
    """The decimals of a finite ``value`` without its trailing zeros."""
    exponent = value.normalize(_NUMERIC_CONTEXT).as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def _plain_text(value: decimal.Decimal, scale: int | None) -> str:
    """A finite ``value`` written as ``numeric`` output writes it: no exponent, as many
    decimals as its scale (none for a negative one; without a scale, none of its trailing
    zeros, as ``trim_scale`` gives it), no negative zero."""
    if scale is not None:
        value = value.quantize(decimal.Decimal(1).scaleb(-max(scale, 0)), context=_NUMERIC_CONTEXT)
    else:
        value = value.normalize(_NUMERIC_CONTEXT)
        exponent = value.as_tuple().exponent
        if isinstance(exponent, int) and exponent > 0:  # 1E+2: no exponent in the output
            value = value.quantize(decimal.Decimal(1), context=_NUMERIC_CONTEXT)
    if value.is_zero():
        value = value.copy_abs()
    return format(value, "f")


#: The dialect a TypeDecorator's ``process_bind_param`` is given where the guards compute what
#: the column stores for a state (when the rules compile, and for a value at a flush or bulk
#: UPDATE): PostgreSQL's, without a driver.
_DIALECT: Final[sa.Dialect] = PGDialect()  # type: ignore[no-untyped-call]


def converts(type_: sa.types.TypeDecorator[Any]) -> bool:
    """Whether ``type_`` converts a value before it is stored (its own ``process_bind_param``)."""
    return _overrides(type_, "process_bind_param")


def _overrides(type_: sa.types.TypeDecorator[Any], method: str) -> bool:
    return getattr(type(type_), method) is not getattr(sa.types.TypeDecorator, method)


def _stored_value(type_: sa.types.TypeDecorator[Any], value: object) -> Any:
    """What ``type_``'s ``process_bind_param`` makes of ``value`` (its failure a ValueError,
    which makes the value no state)."""
    try:
        return type_.process_bind_param(value, _DIALECT)
    except Exception as exc:
        raise ValueError(
            f"{type(type_).__name__}.process_bind_param({value!r}) raised {exc!r}"
        ) from exc


def _under(type_: sa.types.TypeDecorator[Any]) -> sa.types.TypeEngine[Any]:
    """The type under ``type_`` on PostgreSQL (its ``load_dialect_impl``: its ``impl``)."""
    return type_.load_dialect_impl(_DIALECT)


def storage_type(type_: sa.types.TypeEngine[Any]) -> sa.types.TypeEngine[Any]:
    """The type the column stores its values by: under every ``TypeDecorator``."""
    while isinstance(type_, sa.types.TypeDecorator):
        type_ = _under(type_)
    return type_


def _converting(type_: sa.types.TypeEngine[Any]) -> bool:
    """Whether a ``TypeDecorator`` of ``type_`` (or under it) converts the values stored."""
    while isinstance(type_, sa.types.TypeDecorator):
        if converts(type_):
            return True
        type_ = _under(type_)
    return False


def _converts_in_sql(type_: sa.types.TypeEngine[Any]) -> str | None:
    """The method by which a ``TypeDecorator`` of ``type_`` (or under it) converts values in
    SQL (``bind_expression``: what is stored; ``column_expression``: what is read), or None:
    neither can be told in Python. A ``bind_processor`` of its own is as unknown."""
    while isinstance(type_, sa.types.TypeDecorator):
        for method in ("bind_expression", "column_expression", "bind_processor"):
            if _overrides(type_, method):
                return method
        type_ = _under(type_)
    return None


_ENUM_DB_VALUES: weakref.WeakKeyDictionary[sa.Enum, dict[Any, str]] = weakref.WeakKeyDictionary()


def enum_db_values(enum_type: sa.Enum) -> dict[Any, str]:
    """The database value SQLAlchemy binds for each value an ``Enum`` column takes: each
    member of its ``enum_class`` and each of its ``enums`` strings (a member's database
    spelling, its name unless ``values_callable`` says otherwise; an alias's, its canonical
    member's). Read from the public ``Enum.enums`` and ``Enum.enum_class`` as SQLAlchemy
    builds its own lookup from them (``tests/test_internals.py`` compares the two); made once
    per type."""
    found = _ENUM_DB_VALUES.get(enum_type)
    if found is not None:
        return found
    values = [str(v) for v in enum_type.enums]
    cls = enum_type.enum_class
    objects: list[Any]
    if cls is None:
        objects = list(values)
    else:
        members = list(cls.__members__.items())
        if len(members) != len(values):  # omit_aliases (the default) leaves the aliases out
            members = [(name, m) for name, m in members if m.name == name]
        objects = [m for _, m in members]
    if len(objects) != len(values):
        raise TypeError(f"cannot pair the members of {cls!r} with {enum_type!r}.enums")
    # a member (or value) listed twice: its first database value, as SQLAlchemy binds it
    found = dict(zip(reversed(objects), reversed(values), strict=True))
    found.update((v, found[o]) for v, o in zip(values, objects, strict=True))
    _ENUM_DB_VALUES[enum_type] = found
    return found


def written_by_name(type_: sa.types.TypeEngine[Any], value: enum.Enum) -> bool:
    """Whether the driver writes ``value``, a member of a plain ``enum.Enum`` (no ``str`` or
    ``int`` mixin) bound to a column that is not an ``Enum`` (and converts nothing itself),
    by its name where that is not its value as the column compares it: psycopg writes such a
    member by its name, so a ``draft = "draft"`` member is fine, a ``DRAFT = "draft"`` one or
    ``ONE = 1`` (in an integer column) never gets its value into the column."""
    if isinstance(value, (str, int)) or isinstance(type_, (sa.Enum, sa.types.TypeDecorator)):
        return False
    try:
        return _db_key(type_, value.name) != _db_key(type_, value.value)
    except (LookupError, TypeError, ValueError):
        return True


_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+", re.ASCII)


def _unstorable(impl: sa.types.TypeEngine[Any], key: Key) -> str | None:
    """Why a state of database text ``key`` can never be held by a column of type ``impl``
    (a rule about it could never apply), or None. Checked for the types whose values are
    plainly known: integers and strings of a given length."""
    if key is None:
        return None
    if isinstance(impl, sa.Integer) and not _INTEGER_TEXT.fullmatch(key):
        return "the column holds integers"
    if _is_numeric(impl):
        return _numeric_unstorable(impl, key)
    length = getattr(impl, "length", None) if isinstance(impl, sa.String) else None
    if isinstance(length, int) and len(key) > length:
        return f"it is {len(key)} characters long, the column at most {length}"
    return None


def _not_as_read(impl: sa.types.TypeEngine[Any], key: Key) -> str | None:
    """Why a state of database text ``key``, which the column can hold, is not how PostgreSQL
    writes that value (``col::text``, what the trigger compares), or None: ``"01"``, ``"+1"``
    or ``"-0"`` in an integer column is stored as 1 or 0 but read back as ``"1"`` or ``"0"``,
    so a rule about it could never apply in the database."""
    if key is not None and _is_numeric(impl):
        return _numeric_not_as_read(impl, key)
    if key is None or not isinstance(impl, sa.Integer):
        return None
    as_read = str(int(key))
    if as_read == key:
        return None
    return (
        f"the column holds integers, and PostgreSQL writes this one as {as_read!r} (col::text, "
        f"what the database trigger compares), never {key!r}; declare it as {int(key)} "
        f"(or {as_read!r})"
    )


# PostgreSQL's numeric input of a finite number: surrounding whitespace, a sign, digits with a
# point, an exponent (no underscores: PostgreSQL 16+ only)
_NUMERIC_INPUT = re.compile(
    r"[ \t\n\r\f\v]*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)[ \t\n\r\f\v]*",
    re.ASCII,
)
_NUMERIC_SPECIAL = re.compile(r"[+-]?(?:nan|inf|infinity)", re.ASCII | re.IGNORECASE)


def _numeric_input(text: str) -> decimal.Decimal | None:
    """The number PostgreSQL's numeric input reads from ``text`` (NaN and the infinities
    too), or None."""
    match = _NUMERIC_INPUT.fullmatch(text)
    if match:
        return decimal.Decimal(match.group(1))
    special = text.strip(" \t\n\r\f\v")
    return decimal.Decimal(special) if _NUMERIC_SPECIAL.fullmatch(special) else None


def _numeric_unstorable(impl: sa.Numeric[Any], key: str) -> str | None:
    """:func:`_unstorable` for a ``numeric`` column: text that is no number, a number with
    more decimals than the scale (PostgreSQL would round it), one too large for the precision
    (PostgreSQL refuses it: numeric field overflow)."""
    value = _numeric_input(key)
    if value is None:
        return "the column holds numbers"
    scale = _numeric_scale(impl)
    if value.is_nan() or (scale is None and value.is_infinite()):
        return None
    if value.is_infinite():
        return "a numeric column with a precision holds no infinity"
    if scale is not None:
        precision = impl.precision
        assert precision is not None  # (a scale only with a precision)
        limit = decimal.Decimal(1).scaleb(precision - scale)
        # (the magnitude first: a number too large to round in memory is too large anyway)
        if value.copy_abs() >= limit or abs(_rounded(impl, value)) >= limit:
            return (
                f"it is too large for the column's precision: numeric({precision}, {scale}) "
                f"holds numbers below {limit:f} in absolute value (PostgreSQL would refuse "
                "it: numeric field overflow)"
            )
        if _rounded(impl, value) != value:
            return (
                f"it has more digits than the column's scale ({scale}) keeps: PostgreSQL "
                f"would round it to {_numeric_text(impl, value, rounds=True)}"
            )
    try:
        _numeric_text(impl, value, rounds=True)
    except ValueError as exc:
        return str(exc)
    return None


def _rounded(impl: sa.Numeric[Any], value: decimal.Decimal) -> decimal.Decimal:
    return decimal.Decimal(_numeric_text(impl, value, rounds=True))


def _numeric_not_as_read(impl: sa.Numeric[Any], key: str) -> str | None:
    """:func:`_not_as_read` for a ``numeric`` column (whose value ``key`` can hold): a number
    PostgreSQL writes otherwise, ``"1"`` or ``"1.0"`` in ``NUMERIC(4, 2)`` (``'1.00'``), ``"01"``
    or ``"+1"`` anywhere."""
    value = _numeric_input(key)
    if value is None:
        return None
    as_read = _numeric_text(impl, value, rounds=True)  # (storable: see _numeric_unstorable)
    if as_read == key:
        return None
    whole, _, decimals = as_read.partition(".")
    integral = _numeric_input(as_read) is not None and decimals.strip("0") == ""
    hint = f"{whole} (or {as_read!r})" if integral else repr(as_read)
    return (
        f"the column holds numbers, and PostgreSQL writes this one as {as_read!r} (col::text, "
        f"what the database trigger compares), never {key!r}; declare it as {hint}"
    )


def _bind_value(type_: sa.types.TypeEngine[Any], state: State) -> Any:
    if _converting(type_):
        return state  # the type converts it as it is declared
    if isinstance(storage_type(type_), sa.Enum) or not isinstance(state, enum.Enum):
        return state
    return state.value


# A cache of compile(): the guards of each mapper, and an index of them by (table, column) for
# mapping the trigger's error back to the model. Derived from the mappers alone (nothing here is
# process state to reset: a mapper compiles to the same guards again).
_compiled: weakref.WeakKeyDictionary[Mapper[Any], tuple[Guard, ...]] = weakref.WeakKeyDictionary()
_by_table: dict[tuple[str, str], list[weakref.ref[Guard]]] = {}
_cache_lock = threading.Lock()
renew_after_fork(globals(), "_cache_lock")


def compiled_guards(mapper: Mapper[Any]) -> tuple[Guard, ...]:
    """The compiled guards of ``mapper`` (compiled and validated on first use)."""
    found = _compiled.get(mapper)
    if found is not None:
        # compiled without rules of its own (its own guards come first): rules set on the
        # class since (after the mappers were configured, which compiled it) are refused, as
        # those set before are, not left unseen by every write of it (looked at inline: every
        # flush of every class passes here)
        late = getattr(mapper.class_, "__transitions__", None)
        if late is not None and (not found or found[0].lender is not None):
            _refuse_rules_set_late(mapper)
        return found
    declared = getattr(mapper.class_, "__transitions__", None)
    if abstract_concrete(mapper):
        declared = None  # its concrete subclasses write the rows, each guarding its own table
    guards: tuple[Guard, ...] = ()
    if declared is not None:
        owner = mapper.class_.__name__
        _refuse_rules_set_late(mapper)
        rules = _normalize_rules(declared, owner)
        guards = tuple(_compile(mapper, r) for r in rules)
        columns = [g.column for g in guards]
        for g in guards:
            if sum(c is g.column for c in columns) > 1:
                raise TransitionRulesError(
                    f"{owner}.__transitions__ declares rules for column {g.attr_key!r} twice"
                )
        guards = tuple(
            dataclasses.replace(g, owner=_owner(mapper, g), related=_writing_relations(mapper, g))
            for g in guards
        )
    lent = _table_rules(mapper, guards)
    with _cache_lock:
        _compiled[mapper] = guards + lent
        for g in guards:
            refs = _by_table.setdefault((g.table.name, g.column.name), [])
            refs[:] = [r for r in refs if r() is not None]
            refs.append(weakref.ref(g))
    return guards + lent


def _refuse_rules_set_late(mapper: Mapper[Any]) -> None:
    """Raise if ``mapper``'s class has ``__transitions__`` that it did not have when it was
    mapped (see :func:`declared_when_mapped`)."""
    class_ = mapper.class_
    if (
        getattr(class_, "__transitions__", None) is None
        or class_ in _declared_when_mapped
        or abstract_concrete(mapper)
    ):
        return
    owner = class_.__name__
    raise TransitionRulesError(
        f"{owner}.__transitions__ was set after {owner} was mapped: the guard of bulk "
        "UPDATEs and the flush's listeners are set up as a class with rules is mapped, "
        "so rules added later would leave writes of it unjudged; declare "
        f"__transitions__ in the body of {owner} (or of a mixin or base class it "
        "inherits it from, or on the class before registry.map_imperatively())"
    )


#: The classes that had ``__transitions__`` (their own or inherited) when they were mapped
#: (see :func:`declared_when_mapped`).
_declared_when_mapped: weakref.WeakSet[type[Any]] = weakref.WeakSet()


def declared_when_mapped(class_: type[Any]) -> None:
    """Note that ``class_`` declares rules as it is mapped (SQLAlchemy's ``instrument_class``),
    when the session guards are set up for it: rules set on a class only after it was mapped
    are refused when they are compiled."""
    _declared_when_mapped.add(class_)


def abstract_concrete(mapper: Mapper[Any]) -> bool:
    """Whether ``mapper`` is an ``AbstractConcreteBase``'s: mapped to the union of its concrete
    subclasses' tables, with no table nor row of its own (SQLAlchemy writes none through it).
    The rules it declares are its subclasses' (inherited), each guarding its own table."""
    return issubclass(mapper.class_, AbstractConcreteBase) and not isinstance(
        mapper.local_table, (sa.Table, sa.Join)
    )


def _table_rules(mapper: Mapper[Any], own: tuple[Guard, ...]) -> tuple[Guard, ...]:
    """The guards ``mapper`` takes from its tables: for each column of them that other classes
    of its registry guard (classes of another hierarchy mapping the same table, or the
    ancestors of a subclass that sets ``__transitions__ = None``; not the subclasses or
    siblings in its own hierarchy, whose rules are for their own rows) and ``mapper`` maps but
    guards by no rules of its own, their rules, compiled for ``mapper``. A row of a guarded
    table is judged by the table's rules whichever class writes it; when the classes guarding
    the column disagree no one set of them is the table's, and :class:`TransitionRulesError`
    says so."""
    tables = [t for t in mapper.tables if isinstance(t, sa.Table)]
    guarded = {(g.table.schema, g.table.name, g.column.name) for g in own}
    name = mapper.class_.__name__
    lenders: dict[sa.Column[Any], list[tuple[Mapper[Any], Guard]]] = {}
    for other in mapper.registry.mappers:
        declared = getattr(other.class_, "__transitions__", None)
        if declared is None or other is mapper or abstract_concrete(other):
            continue
        if other.base_mapper is mapper.base_mapper and not mapper.isa(other):
            continue  # a class's own hierarchy: only its ancestors' rules are its rows' rules
        theirs = [t for t in other.tables if isinstance(t, sa.Table)]
        if not any(same_table(t, o) for t in tables for o in theirs):
            continue
        other_name = other.class_.__name__
        for rules in _normalize_rules(declared, other_name):
            where = f"{other_name}.__transitions__ (column {rules.column!r})"
            column = _resolve_column(other, rules.column, where)[1]
            mine = next((t for t in tables if same_table(t, column.table)), None)
            cols = () if mine is None else mine.columns
            col = next((c for c in cols if c.name == column.name), None)
            if col is None or (col.table.schema, col.table.name, col.name) in guarded:
                continue
            try:
                attr_key = mapper.get_property_by_column(col).key
            except sa.orm.exc.UnmappedColumnError:
                continue  # (not mapped here: nothing of this class writes it)
            try:
                guard = _compile(mapper, dataclasses.replace(rules, column=attr_key))
            except TransitionRulesError as exc:
                raise TransitionRulesError(
                    f"{name} declares no rules for column {col.name!r} of table "
                    f"{_table_name(col.table)}, whose rows are judged by {other_name}'s: {exc}"
                ) from None
            lenders.setdefault(col, []).append((other, guard))
    found: list[Guard] = []
    for col, candidates in lenders.items():
        candidates.sort(key=lambda c: (len(list(c[0].iterate_to_root())), c[0].class_.__name__))
        first_mapper, first = candidates[0]
        for other, guard in candidates[1:]:
            if not same_rules(first, guard):
                raise TransitionRulesError(
                    f"{name} guards column {col.name!r} of table {_table_name(col.table)} by "
                    f"no rules of its own, and {first_mapper.class_.__name__} and "
                    f"{other.class_.__name__} guard it by different rules"
                    f"{_what_differs(first, guard)}: a row {name} writes there can't be judged "
                    f"by the table's rules; declare on {name} the rules its rows follow "
                    "(an admin repair past the guard is rdb.bypass_transitions)"
                )
        lender = first_mapper.class_.__name__
        found.append(
            dataclasses.replace(
                first, owner=lender, lender=lender, related=_writing_relations(mapper, first)
            )
        )
    return tuple(found)


def lent_rules_changed(mapper: Mapper[Any]) -> list[Mapper[Any]]:
    """The configured mappers of ``mapper``'s registry, without rules of their own, that share
    a table with ``mapper`` (a class with rules configured after them): their compiled guards
    are dropped (the rules they take from the table may have changed), to be compiled again."""
    tables = [t for t in mapper.tables if isinstance(t, sa.Table)]
    found: list[Mapper[Any]] = []
    for other in mapper.registry.mappers:
        if other is mapper or not other.configured:
            continue
        if getattr(other.class_, "__transitions__", None) is not None:
            continue
        if any(same_table(t, o) for t in tables for o in other.tables if isinstance(o, sa.Table)):
            with _cache_lock:
                _compiled.pop(other, None)
            found.append(other)
    return found


def _writing_relations(mapper: Mapper[Any], guard: Guard) -> tuple[tuple[str, str], ...]:
    """:attr:`Guard.related` of ``guard`` on ``mapper``: its many-to-one relationships (not
    view-only) whose foreign key is the status column, with the related attribute each copies."""
    found: list[tuple[str, str]] = []
    for prop in mapper.relationships:
        if prop.viewonly or prop.direction is not MANYTOONE:
            continue
        for local, remote in prop.local_remote_pairs or ():
            if local is not guard.column:
                continue
            try:
                found.append((prop.key, prop.mapper.get_property_by_column(remote).key))
            except Exception:  # (the related column is not mapped: nothing copies it by name)
                continue
    return tuple(found)


def _owner(mapper: Mapper[Any], guard: Guard) -> str:
    """The model named by ``guard``'s trigger: that of the ancestor of ``mapper`` nearest the
    root which guards the same column by the same rules, else ``mapper``'s own."""
    for ancestor in reversed(list(mapper.iterate_to_root())[1:]):
        if guard.table not in ancestor.tables:
            continue
        if getattr(ancestor.class_, "__transitions__", None) is None:
            continue
        theirs = next(
            (g for g in compiled_guards(ancestor) if g.column is guard.column and not g.lender),
            None,
        )
        if theirs is not None and same_trigger(guard, theirs):
            return theirs.owner
    return guard.model


def _compile(mapper: Mapper[Any], rules: TransitionRules) -> Guard:
    model = mapper.class_.__name__
    where = f"{model}.__transitions__ (column {rules.column!r})"
    attr_key, column = _resolve_column(mapper, rules.column, where)
    type_ = column.type
    in_sql = _converts_in_sql(type_)
    if in_sql is not None:
        raise TransitionRulesError(
            f"{where}: the column's type {type_!r} converts values in SQL ({in_sql}), so the "
            "value it stores for a state can't be told here, and the guards and the database "
            "trigger could not compare states as stored; give the status a type that converts "
            "in Python (process_bind_param and process_result_value) or not at all"
        )
    # a TypeDecorator converting the states (process_bind_param): every state is keyed by the
    # text of what the column stores for it, which the trigger compares
    converting = _converting(type_)
    impl = storage_type(type_)
    if isinstance(impl, _NO_STATE_TYPES):
        raise TransitionRulesError(
            f"{where}: the column's type {type_!r} holds structured or binary values, whose "
            "text (col::text, what the database trigger compares: a JSON string 'a' is "
            "'\"a\"') is no state as declared; guard a text, integer, Boolean, Numeric or "
            "Enum column"
        )
    kind = next((k for t, k in _NO_STATE_VALUE_TYPES if isinstance(impl, t)), None)
    if kind is not None:
        raise TransitionRulesError(
            f"{where}: the column's type {type_!r} holds {kind}, which the ORM loads as objects "
            "no declared state (str, int, Decimal, bool or an enum.Enum member) equals, so "
            "the guards would refuse every write; guard a text, integer, Boolean, Numeric "
            "or Enum column"
        )

    states: dict[Key, State] = {}
    binds: dict[Key, Any] = {}
    for state in sorted(rules.declared_states, key=sort_key):
        if isinstance(state, enum.Enum) and written_by_name(type_, state):
            raise TransitionRulesError(
                f"{where}: state {state!r} is a member of the plain enum.Enum "
                f"{type(state).__name__}, but the column ({type_!r}) is not an Enum column: "
                f"the driver writes such a member by its name ({state.name!r}), not by its "
                f"value ({state.value!r}), so no rule about it would apply; map the column as "
                f"sa.Enum({type(state).__name__}), or declare the states by their values"
            )
        if (
            not converting
            and isinstance(impl, (sa.CHAR, sa.NCHAR))
            and isinstance(state, str)
            and state[-1:] == " "
        ):
            raise TransitionRulesError(
                f"{where}: state {state!r} ends in a space, but the column ({type_!r}) is "
                "character(n), whose values PostgreSQL pads with spaces and reads back "
                "(col::text) without the trailing ones; declare it without them"
            )
        try:
            key = _db_key(type_, state)
        except (LookupError, TypeError, ValueError) as exc:
            if converting:
                raise TransitionRulesError(
                    f"{where}: state {state!r} can't be stored by the column's type "
                    f"({type_!r}): {exc}"
                ) from None
            if isinstance(impl, sa.Boolean):
                raise TransitionRulesError(
                    f"{where}: state {state!r} is no value of the Boolean column ({type_!r}); "
                    "its states are True and False (and None for NULL)"
                ) from None
            if isinstance(state, bool):
                raise TransitionRulesError(
                    f"{where}: state {state!r} is a bool, but the column ({type_!r}) is not "
                    "Boolean; bool states are for a Boolean column"
                ) from None
            if _is_numeric(impl) or (
                isinstance(state, decimal.Decimal) and isinstance(impl, sa.Integer)
            ):
                raise TransitionRulesError(
                    f"{where}: state {state!r} can't be stored in the column ({type_!r}): {exc}"
                ) from None
            if isinstance(state, decimal.Decimal):
                raise TransitionRulesError(
                    f"{where}: state {state!r} is a number, but the column ({type_!r}) holds "
                    "no numbers; Decimal states are for a Numeric (or integer) column (a "
                    "migration's TransitionTrigger: give it the column's type_)"
                ) from None
            allowed = ", ".join(repr(v) for v in getattr(impl, "enums", ()))
            raise TransitionRulesError(
                f"{where}: state {state!r} has no declaration in the column type "
                f"{type_!r}"
                + (f" (declared values: {allowed})" if allowed else "")
                + _member_of_value(impl, state)
            ) from None
        if key is None and not column.nullable:
            stands = "stands for" if state is None else "is stored by the column's type as"
            raise TransitionRulesError(
                f"{where}: state {state!r} {stands} SQL NULL, but the column is NOT NULL "
                "(nullable=False): no row ever holds it, so a rule about it could never "
                "apply; take it out of the rules, or make the column nullable"
            )
        unstorable = _unstorable(impl, key)
        if unstorable:
            stored_as = f", stored as {key!r}," if converting else ""
            raise TransitionRulesError(
                f"{where}: state {state!r}{stored_as} can't be stored in the column "
                f"({type_!r}): {unstorable}"
            )
        not_as_read = _not_as_read(impl, key)
        if not_as_read:
            raise TransitionRulesError(
                f"{where}: state {state!r} is not the column's ({type_!r}) text of any value: "
                f"{not_as_read}"
            )
        if key in states and states[key] != state:
            raise TransitionRulesError(
                f"{where}: states {states[key]!r} and {state!r} are the same database value "
                f"{key!r}; declare each state once"
            )
        states[key] = state
        binds[key] = _bind_value(type_, state)
    if not converting and isinstance(impl, sa.Enum) and impl.enum_class is not None:
        for member in impl.enum_class:
            member_key = _db_key(type_, member)
            if member_key in binds:
                binds[member_key] = member
                if not isinstance(states[member_key], enum.Enum):
                    states[member_key] = member

    def key_of(state: State) -> Key:
        return _db_key(type_, state)

    graph = expand(rules.declared_states, rules.transitions, key=key_of)
    initial = frozenset(key_of(s) for s in rules.initial)
    if rules.states is not None:
        declared_keys = {key_of(s) for s in rules.states}
        for key in sorted(set(graph) - declared_keys, key=sort_key):
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
    for key in sorted(set(graph) - reached, key=sort_key):
        raise TransitionRulesError(
            f"{where}: state {states[key]!r} is neither initial nor reachable from an initial "
            f"state ({', '.join(repr(states[k]) for k in sorted(initial, key=sort_key))}); "
            "add a transition into it or list it in initial"
        )

    _check_server_default(column, initial, states, where)
    _check_onupdate(column, states, where)
    _check_version_counter(mapper, column, where)
    pk_columns, pk_attr_keys = _pk_columns(mapper, column, where)
    # The ORM's flush binds an UPDATE's primary key by the column's label (``tasks_id``) and
    # the new values as ``col.key``; the compare-and-set reads both (see
    # _attach_compare_and_set).
    pk_labels = tuple(flush_pk_bind_name(c) for c in pk_columns)
    position = next(i for i, c in enumerate(column.table.columns) if c is column)
    onupdate = _onupdate(column)
    return Guard(
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
        text_keys=not converting and not isinstance(impl, (sa.Enum, sa.Boolean, sa.CHAR, sa.NCHAR)),
        owner=model,
        onupdate=onupdate,
        sql_onupdate=onupdate is not None and onupdate.is_clause_element,
    )


#: Column types whose values no declared state can spell as ``col::text`` gives them.
_NO_STATE_TYPES: Final = (sa.JSON, sa.ARRAY, sa.LargeBinary)

#: Column types whose values the ORM holds as objects of other types than a state's (what
#: each holds, for the error): a rule's ``"2020-01-01"`` is never the loaded ``date``.
_NO_STATE_VALUE_TYPES: Final[tuple[tuple[type[Any], str], ...]] = (
    (sa.Float, "floating-point numbers (float)"),
    (sa.DateTime, "timestamps (datetime)"),
    (sa.Date, "dates (date)"),
    (sa.Time, "times of day (time)"),
    (sa.Interval, "intervals (timedelta)"),
    (sa.Uuid, "UUIDs (uuid.UUID)"),
)


def _onupdate(column: sa.Column[Any]) -> Any:
    """:attr:`Guard.onupdate` of ``column``: its ``onupdate`` when SQLAlchemy applies it to an
    UPDATE that leaves the column out (a ``ColumnDefault``: a value, a Python function or a SQL
    expression; a ``Sequence`` is none), else None."""
    onupdate = column.onupdate
    if isinstance(onupdate, sa.ColumnDefault) and (
        onupdate.is_scalar or onupdate.is_callable or onupdate.is_clause_element
    ):
        return onupdate
    return None


def _scalar_key(column: sa.Column[Any], default: Any) -> tuple[Any, Key, str] | None:
    """A literal ``default`` / ``onupdate`` of ``column``: its value, its key as the database
    stores it and why it has none (``" (...)"``, else ``""``); None when it is no literal (a
    function or SQL expression, whose value is known only when the statement runs)."""
    if not (isinstance(default, sa.ColumnDefault) and default.is_scalar):
        return None
    try:
        return default.arg, _db_key(column.type, default.arg), ""
    except (LookupError, TypeError, ValueError) as exc:
        return default.arg, None, f" ({exc})"


def _check_onupdate(column: sa.Column[Any], states: Mapping[Key, State], where: str) -> None:
    """A value as ``onupdate`` is what every UPDATE of a row that leaves the status out writes:
    it must be a state of the rules, else each such UPDATE (an edit of another column) is an
    illegal move, refused by the flush guard at the first edit. (A function or SQL expression:
    its value is known only at the UPDATE, judged then.)"""
    found = _scalar_key(column, column.onupdate)
    if found is None:
        return
    value, key, why = found
    if why or key not in states:
        declared = ", ".join(repr(states[k]) for k in sorted(states, key=sort_key))
        raise TransitionRulesError(
            f"{where}: the column's onupdate {value!r} is no state of the rules "
            f"({declared}){why}: every UPDATE of a row that leaves the status out would write "
            "it, and be refused as an illegal move; declare it as a state (and the moves into "
            "it), or change the onupdate"
        )


def _check_version_counter(mapper: Mapper[Any], column: sa.Column[Any], where: str) -> None:
    """A status column that is the mapper's ``version_id_col`` with a counter SQLAlchemy keeps
    (its ``version_id_generator``) is refused: SQLAlchemy writes the counter's value into every
    row it inserts, over the state it was given (a row would start outside its initial states,
    unchecked), and into every UPDATE of the row, whatever column it changes (each edit would
    move the status). ``version_id_generator=False`` (the application sets the status, and
    SQLAlchemy compares it in the UPDATE, as the guard's compare-and-set does) is left alone."""
    if mapper.version_id_col is not column or mapper.version_id_generator is False:
        return
    raise TransitionRulesError(
        f"{where}: the column is the mapper's version_id_col, whose counter SQLAlchemy writes "
        "into every row it inserts and every UPDATE of it: rows would start outside the "
        "initial states and move on each edit of any column; give the version a column of "
        "its own, or map it with version_id_generator=False (the application sets the status, "
        "SQLAlchemy compares it in the UPDATE)"
    )


def _check_server_default(
    column: sa.Column[Any], initial: frozenset[Key], states: Mapping[Key, State], where: str
) -> None:
    """A literal ``server_default`` (with no Python-side default, which the ORM would send
    instead) is the state of every row inserted without one: it must be an initial state."""
    # (a function or SQL expression default: its value is known only at insert, judged then)
    found = _scalar_key(column, column.default)
    if found is not None:
        value, default_key, why = found
        if why or default_key not in initial:
            allowed = ", ".join(repr(states.get(k, k)) for k in sorted(initial, key=sort_key))
            raise TransitionRulesError(
                f"{where}: the column's default {value!r} is not an initial state "
                f"({allowed}){why}: every row added without a status would start in it, and "
                "be refused; make it an initial state, or change the default"
            )
        return
    default = column.server_default
    if column.default is not None or not isinstance(default, sa.DefaultClause):
        return
    arg = default.arg
    if not isinstance(arg, str):
        return  # a SQL expression: its value is the database's (the trigger checks it)
    key = _stored_key(column.type, arg)
    if key is _UNKNOWN or key in initial:
        return  # (a literal whose stored value is not plainly known is left to the trigger)
    allowed = ", ".join(repr(states.get(k, k)) for k in sorted(initial, key=sort_key))
    raise TransitionRulesError(
        f"{where}: the column's server_default {arg!r} is not an initial state ({allowed}): "
        "every row inserted without a status would start in it; make it an initial state, "
        "or change the server_default"
    )


_UNKNOWN: Final = object()
# PostgreSQL's integer input: surrounding whitespace, a sign, digits (underscores between them
# from PostgreSQL 16 on)
_INTEGER_INPUT = re.compile(r"[ \t\n\r\f\v]*([+-]?[0-9]+(?:_[0-9]+)*)[ \t\n\r\f\v]*", re.ASCII)
# PostgreSQL's boolean input: a prefix of these words (of on and off from two letters)
_BOOLEAN_WORDS: Final = (("true", 1), ("yes", 1), ("on", 2), ("false", 1), ("no", 1), ("off", 2))


def _stored_key(type_: sa.types.TypeEngine[Any], literal: str) -> Key | object:
    """The key (``col::text``) of the value PostgreSQL stores for the text ``literal`` in a
    column of ``type_`` (``'00'`` or ``'+0'`` in an integer column is 0, ``'f'`` or ``'no'`` in
    a boolean one is false), or ``_UNKNOWN`` when that can't be told here. The literal is the
    stored value itself: a ``TypeDecorator`` does not convert it."""
    impl = storage_type(type_)
    if isinstance(impl, sa.Boolean):
        return _boolean_input(literal)
    if isinstance(impl, sa.Integer):
        match = _INTEGER_INPUT.fullmatch(literal)
        return str(int(match.group(1))) if match else _UNKNOWN
    if _is_numeric(impl):
        value = _numeric_input(literal)  # ('1' in NUMERIC(4, 2) is 1.00, '1.005' is 1.01)
        try:
            return _UNKNOWN if value is None else _numeric_text(impl, value, rounds=True)
        except ValueError:
            return _UNKNOWN
    try:
        return _db_key(impl, literal)
    except (LookupError, TypeError, ValueError):
        return _UNKNOWN


def _boolean_input(literal: str) -> Key | object:
    """What PostgreSQL's boolean input makes of ``literal``: a prefix of true, false, yes or
    no, of on or off from two letters, 1 or 0, in any case, with whitespace around."""
    word = literal.strip(" \t\n\r\f\v").lower()
    if word in ("1", "0"):
        return "true" if word == "1" else "false"
    for spelled, shortest in _BOOLEAN_WORDS:
        if len(word) >= shortest and spelled.startswith(word):
            return "true" if spelled in ("true", "yes", "on") else "false"
    return _UNKNOWN


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
            f"{where}: {mapper.class_.__name__} has no mapped column {name!r}"
            f"{_not_a_column(mapper, name)} (mapped: {known})"
        )
    key, col = found
    if not isinstance(col, sa.Column) or not isinstance(col.table, sa.Table):
        raise TransitionRulesError(
            f"{where}: {name!r} is mapped to a SQL expression, not to a table column"
        )
    return key, col


def _not_a_column(mapper: Mapper[Any], name: str) -> str:
    """What ``name`` is on ``mapper`` when it is no mapped column, and the name to give."""
    if name in mapper.synonyms:
        target = mapper.synonyms[name].name
        return f": it is a synonym of {target!r}; name the column, {target!r}"
    if name in mapper.composites:
        inside = ", ".join(repr(c.name) for c in mapper.composites[name].columns)
        return f": it is a composite of columns {inside}; name the column holding the state"
    descriptor = mapper.all_orm_descriptors.get(name)
    if descriptor is not None and descriptor.extension_type is not NotExtension.NOT_EXTENSION:
        return (
            f": it is a {type(descriptor).__name__}, which the guards can't see through; "
            "name the column it reads and writes"
        )
    return ""


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
    if len(table_pk) == 1:
        return table_pk, attr_keys
    # A joined-table subclass's table may list its key columns in another order than its
    # base's (the mapper's key, by which every row's identity is read): each of its columns is
    # put at the place of the base column it stands for (mapped by one attribute, or referring
    # to it by a foreign key, as the inheritance join does)
    aligned: list[sa.Column[Any]] = []
    for base_col in mapper_pk:
        prop = mapper.get_property_by_column(base_col)
        same = [c for c in table_pk if c in getattr(prop, "columns", ())]
        if len(same) != 1:
            same = [c for c in table_pk if _refers_to(c, base_col)]
        if len(same) != 1:
            raise TransitionRulesError(
                f"{where}: the key columns of table {table.name!r} "
                f"({', '.join(c.name for c in table_pk)}) can't be told apart as the key of "
                f"{mapper.class_.__name__} ({', '.join(c.name for c in mapper_pk)}): none "
                f"is mapped by the attribute of {base_col.name!r} or refers to it by a foreign "
                "key; map each key column of the subclass's table under its base column's "
                "attribute, or guard a column of the base table"
            )
        aligned.append(same[0])
    return tuple(aligned), attr_keys


def _refers_to(column: sa.Column[Any], target: sa.ColumnElement[Any]) -> bool:
    """Whether ``column`` refers to ``target`` by a foreign key, directly or through the key
    columns of the tables between them (a grandchild's key refers to its parent's, which
    refers to the base table's)."""
    seen: set[sa.Column[Any]] = set()
    todo = [column]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for fk in current.foreign_keys:
            referred = fk.column
            if referred is target:
                return True
            todo.append(referred)
    return False


def sort_key(key: object) -> tuple[int, str]:
    """A total order over states and keys (NULL first), for deterministic output."""
    return (0, "") if key is None else (1, str(key))


# --------------------------------------------------------------------------------------------
# Looking guards up, and introspection
# --------------------------------------------------------------------------------------------


def mapper_of(target: object) -> Mapper[Any]:
    if isinstance(target, Mapper):
        return target
    insp = sa.inspect(target, raiseerr=False)
    mapper = getattr(insp, "mapper", None)
    if not isinstance(mapper, Mapper):
        raise TypeError(f"{target!r} is not a mapped class or instance")
    return mapper


def state_of(obj: object) -> InstanceState[Any]:
    state = sa.inspect(obj, raiseerr=False)
    if not isinstance(state, InstanceState):
        raise TypeError(f"{obj!r} is not an instance of a mapped class")
    return state


def guards_of(target: object, *, lent: bool = False) -> tuple[Guard, ...]:
    """The guards of a mapped class, instance or mapper; raises if it declares no rules.
    ``lent``: with those it takes from its tables (see :func:`_table_rules`)."""
    mapper = mapper_of(target)
    guards = compiled_guards(mapper)
    if not lent:
        guards = tuple(g for g in guards if g.lender is None)
    if not guards:
        name = mapper.class_.__name__
        if abstract_concrete(mapper) and getattr(mapper.class_, "__transitions__", None):
            raise TransitionRulesError(
                f"{name} is an abstract concrete base (AbstractConcreteBase), mapped to no "
                "table of its own: its rules guard each of its concrete subclasses' tables; "
                f"name a concrete subclass of {name}"
            )
        raise TransitionRulesError(f"{name} declares no __transitions__")
    return guards


def same_rules(a: Guard, b: Guard | None) -> bool:
    """Whether ``b`` guards ``a``'s column with the same states and moves (whatever model)."""
    return b is not None and a.initial == b.initial and a.next == b.next


def same_trigger(a: Guard, b: Guard | None) -> bool:
    """Whether ``a`` and ``b`` make the same database trigger (whatever their models): the same
    table, column, states, moves and row key."""
    return (
        same_rules(a, b)
        and b is not None
        and same_table(a.table, b.table)
        and a.column.name == b.column.name
        and [c.name for c in a.pk_columns] == [c.name for c in b.pk_columns]
    )


def same_table(a: sa.Table, b: sa.Table) -> bool:
    """Whether ``a`` and ``b`` name one database table (also from two MetaData collections)."""
    return a is b or (a.schema, a.name) == (b.schema, b.name)


def table_guards(model: object, table: sa.Table) -> tuple[Guard, ...]:
    """Every guard of a column of ``table`` declared by a class of ``model``'s registry that
    maps the table: its inheritance hierarchy, and unrelated classes mapped to the same table.
    The triggers of their columns are the table's declared ones; ours of any other column are
    left over. (Classes of other registries are not looked at: a registry disposed of, as
    tests do, leaves its compiled guards behind until collected.)"""
    mapper = mapper_of(model)
    found: list[Guard] = []
    for other in mapper.registry.mappers:
        if getattr(other.class_, "__transitions__", None) is None:
            continue
        if not any(isinstance(t, sa.Table) and same_table(t, table) for t in other.tables):
            continue
        found.extend(
            g for g in compiled_guards(other) if same_table(g.table, table) and g.lender is None
        )
    return tuple(found)


def rules_elsewhere(mapper: Mapper[Any], guard: Guard, among: Iterable[Mapper[Any]]) -> list[str]:
    """The classes of ``among`` (mappers of ``mapper``'s inheritance hierarchy) whose rows live
    in ``guard``'s table but that guard its column by other rules, or by none: rows that one
    set of rules per table (the trigger's) or per statement (a bulk UPDATE's) can't tell
    apart from ``mapper``'s."""
    found: list[str] = []
    for other in among:
        if other is mapper or guard.table not in other.tables or abstract_concrete(other):
            continue  # (an abstract concrete base keeps no rows: its union reads its tables)
        theirs = next((g for g in compiled_guards(other) if g.column is guard.column), None)
        if not same_rules(guard, theirs):
            found.append(other.class_.__name__)
    return found


def trigger_guards(model: object) -> tuple[Guard, ...]:
    """:func:`guards_of` for a trigger, which enforces one set of rules for every row of its
    table: raises when classes sharing the table (single- or joined-table inheritance) guard
    the column by other rules, which it would apply to their rows too (and the trigger of one
    would replace the other's)."""
    guards = guards_of(model)
    mapper = mapper_of(model)
    for guard in guards:
        others = rules_elsewhere(mapper, guard, mapper.base_mapper.self_and_descendants)
        if others:
            raise TransitionRulesError(
                f"{guard.model}.{guard.attr_key}: a trigger enforces one set of rules for "
                f"every row of table {guard.table.name!r}, but {', '.join(others)} "
                f"{'keeps its rows' if len(others) == 1 else 'keep their rows'} there with "
                "other rules (or none); declare the rules once, on the class that maps the "
                "table, or leave these classes to the session guards"
            )
        for other in table_guards(model, guard.table):
            if other.column.name == guard.column.name and not same_trigger(guard, other):
                raise TransitionRulesError(
                    f"{guard.model}.{guard.attr_key} and {other.model}.{other.attr_key} guard "
                    f"the same column {guard.column.name!r} of table {_table_name(guard.table)} "
                    f"by different rules{_what_differs(guard, other)}; one trigger per column "
                    "enforces one set of rules for every row of the table, so the trigger of "
                    "either would replace the other's: declare the same rules on both models"
                )
    return guards


def _table_name(table: sa.Table) -> str:
    return repr(f"{table.schema}.{table.name}" if table.schema else table.name)


def _what_differs(a: Guard, b: Guard) -> str:
    if same_rules(a, b):
        return f" (row keys {[c.name for c in a.pk_columns]} and {[c.name for c in b.pk_columns]})"
    if a.initial != b.initial:
        return " (other initial states)"
    return " (other transitions)"


def one_guard(target: object, column: str | None, *, lent: bool = False) -> Guard:
    """The guard of ``column`` (which may be omitted when the model guards one column)."""
    guards = guards_of(target, lent=lent)
    if column is None:
        if len(guards) > 1:
            names = ", ".join(repr(g.attr_key) for g in guards)
            raise TypeError(f"{guards[0].model} guards several columns ({names}); pass column=")
        return guards[0]
    for g in guards:
        if column in (g.attr_key, g.column.name):
            return g
    names = ", ".join(repr(g.attr_key) for g in guards)
    raise TransitionRulesError(
        f"{guards[0].model} declares no transitions for column {column!r}; it guards {names}"
    )


def transition_rules(model: type[Any]) -> tuple[TransitionRules, ...]:
    """The validated rules declared on ``model`` (one entry per guarded column)."""
    return tuple(g.rules for g in guards_of(model))


def allowed_transitions(obj: object, *, column: str | None = None) -> set[Any]:
    """The states ``obj`` may move to from its current in-memory state.

    For an object that is not yet in the database, the initial states. ``column`` picks the
    guarded column when the model guards several. The attribute is read as usual; under
    ``AsyncSession`` make sure it is loaded (an expired attribute would need I/O).
    """
    guard = one_guard(obj, column, lent=True)
    state = state_of(obj)
    if state.key is None:
        return {guard.state(k) for k in guard.initial}
    value = getattr(obj, guard.attr_key)
    return {guard.state(k) for k in guard.next.get(guard.key(value), frozenset())}


def allowed_from(guard: Guard, key: Key) -> str:
    """The states a row in the state of ``key`` may move to, as a reason says it."""
    nxt = guard.next.get(key, frozenset())
    allowed = ", ".join(repr(plain(guard.state(k))) for k in sorted(nxt, key=sort_key))
    return f"allowed from here: {allowed}" if allowed else "no moves are allowed from here"


def plain(state: object) -> object:
    """A state as logs and diagrams show it (an enum member by its value)."""
    return state.value if isinstance(state, enum.Enum) else state


def guard_for_table(
    model: object,
    schema: object,
    table: str,
    column: str,
    *,
    stored: Callable[[str], str] = str,
) -> Guard | None:
    """The guard that installed the trigger of ``schema.table``'s ``column``: one of a model
    mapping the table in exactly that schema first, else one of a model mapping it without a
    schema (its trigger is installed in the schema current at install); within each, the same
    model name first, then the guard compiled last. A same-named table of another schema is
    never taken: its rules (states, types) may be other ones.

    ``stored`` gives a name as the database keeps it: PostgreSQL cuts identifiers longer than
    63 bytes, so the trigger's detail may carry the cut name of a table the model names whole;
    names are compared in that form."""
    wanted_names = (stored(table), stored(column))
    with _cache_lock:
        refs = [
            ref
            for (t, c), found in _by_table.items()
            if (stored(t), stored(c)) == wanted_names
            for ref in found
        ]
    guards = [g for g in (r() for r in reversed(refs)) if g is not None]

    def stored_schema(name: object) -> object:
        return stored(name) if isinstance(name, str) else name

    for wanted in (stored_schema(schema), None):
        candidates = [g for g in guards if stored_schema(g.table.schema) == wanted]
        for g in candidates:
            if g.model == model:
                return g
        if candidates:
            return candidates[0]
    return None


def _member_of_value(impl: Any, state: object) -> str:
    """For a state that is the value of a member of an ``Enum`` column's enum class (a rule
    written ``"done"`` for ``Status.DONE = "done"``, which the column stores by its name
    ``DONE``): the member to declare instead; "" otherwise."""
    enum_class = getattr(impl, "enum_class", None)
    if not isinstance(enum_class, type) or not issubclass(enum_class, enum.Enum):
        return ""
    for member in enum_class:
        if member.value == state and not isinstance(state, bool):
            name = f"{enum_class.__name__}.{member.name}"
            return (
                f": it is the value of {name}, which the column stores by its name; "
                f"declare the member, {name}"
            )
    return ""
