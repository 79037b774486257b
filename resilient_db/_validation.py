"""Response validation: ``validate=`` of units of work and of ``with_self_healing``.

A validator is a Pydantic model class (``model_validate``), a Pydantic ``TypeAdapter``
(``validate_python``), a type (checked by a ``TypeAdapter`` of it: a type form such as
``list[Model]`` or ``Model | None``, and any class that is not a Pydantic model: ``int``, an
enum, a ``TypedDict``, a dataclass, a ``NamedTuple``; also ``NewType``, ``Any`` and type
aliases), or a callable that is not a class. Pydantic is recognised by those methods and
imported only for a type, so it stays an optional dependency of the application. What can't
check a result is refused with ``TypeError`` when ``validate=`` is given, whether validation is on
or off: a type Pydantic can't build a schema for (an ORM class, ``list[OrmClass]``), a type
naming a class by a string (``list["TaskOut"]``: the string would be looked up here, not where
it was written) or not fully defined, and an ``async def`` callable (a check is synchronous).

The result is checked, not converted: the caller gets the unit's own return value back, the same
object with validation on or off (``SELF_HEALING_RESPONSE_VALIDATION``), so switching it off never
changes what a program receives. So a result that is an iterator (a generator, ``map()``,
``iter(...)``, a SQLAlchemy ``Result``), or that holds one in a dict, list, tuple, set or
dataclass of it (``{"ids": map(int, rows)}``), is refused with ``TypeError`` naming where, while
a check is on: it can't be checked without being consumed, and the caller would get it empty
(a copy checked in its place would not be the unit's own object). An invalid result
is logged ``[SELF-HEAL] Response validation failed`` with the reason (field locations and error
kinds: never the values, and a key of a dict in the result shows as ``<key>``), counted in
``health()`` (the service's ``response_validation_failures``) and raises
:class:`~resilient_db.ResponseValidationError`.

A check of a unit's result reads what an ORM row has not loaded yet (a deferred column, a lazy
relationship) with the unit's session. An error raised meanwhile by a statement of that session
(a lost connection, a serialization failure, the transition guard at an autoflush; a
cancellation too) is raised as itself, with its own class and retry semantics, whatever the
validator made of it: Pydantic turns an exception raised by an attribute into a
``get_attribute_error``, which made a lost connection an invalid result, never retried; and
a statement that failed left the unit's transaction aborted, unable to commit, whatever the
verdict.

Invalid results are not retried, read-only units included. PostgreSQL gives each statement (and,
under REPEATABLE READ, each transaction) a consistent snapshot, and resilient_db sends a unit to
one server, so a replay would most often read the same rows and fail again: the failure is a bug
or bad data, and retrying it would double the load and delay the error. A unit that reads with
several statements under READ COMMITTED can see two commits' worth of data; the remedy is
REPEATABLE READ for that unit (``execution_options(isolation_level=...)``), which makes its read
consistent, not a retry that makes it consistent most of the time.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import logging
import types
import typing
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, TypeAlias, get_args, get_origin

from sqlalchemy import event
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Session

from ._config import Config
from ._errors import ResponseValidationError
from ._observability import emit, stats_for

if TYPE_CHECKING:
    from sqlalchemy.engine import Result
    from sqlalchemy.orm import ORMExecuteState

__all__ = [
    "ResponseCheck",
    "ResponseValidator",
    "check_response",
    "response_check",
    "validation_on",
]

log_validation = logging.getLogger("resilient_db.validation")

#: Errors listed in a reason at most (a list of 10,000 bad rows gives a short reason).
_MAX_ERRORS = 5


class _PydanticModel(Protocol):
    """A Pydantic model class (``BaseModel`` subclass), as ``validate=`` uses it."""

    def model_validate(self, obj: Any, /, *, from_attributes: bool | None = ...) -> Any: ...


class _PydanticAdapter(Protocol):
    """A Pydantic ``TypeAdapter``, as ``validate=`` uses it."""

    def validate_python(self, obj: Any, /, *, from_attributes: bool | None = ...) -> Any: ...


#: What ``validate=`` accepts: a Pydantic model class, a Pydantic ``TypeAdapter``, a type
#: (``list[Model]``, ``tuple[Model, ...]``, ``Model | None``, ``Annotated[...]``, ``int``, an
#: enum, a ``TypedDict``, a dataclass: checked by a ``TypeAdapter`` of it, so it needs
#: Pydantic), or a (synchronous) callable of the result that returns ``False`` or raises
#: ``ValueError``, ``TypeError`` or ``AssertionError`` for an invalid one (anything else it
#: returns means valid). The reason logged for a callable is the type of what it raised, not
#: its message (which can quote the result); Pydantic's errors are listed by location and kind,
#: with Pydantic's message only where it can't quote the result (see :func:`_reason`).
ResponseValidator: TypeAlias = (
    type[_PydanticModel] | _PydanticAdapter | types.UnionType | Callable[[Any], object]
)


def validation_on(config: Config) -> bool:
    """Whether ``validate=`` checks results under ``config``."""
    return config.enabled and config.response_validation


class ResponseCheck:
    """A validator made ready for use: :meth:`problem` gives the reason a value is invalid."""

    __slots__ = ("_kind", "_validator", "name")

    def __init__(self, validator: Any) -> None:
        mapped = _mapped_class_in(validator)
        if mapped is not None:
            raise TypeError(
                f"validate={_describe(validator)}: {mapped.__qualname__} is a mapped (table) "
                "model with relationships: checking a result would build instances of it, "
                "which SQLAlchemy's backrefs attach to the unit's own objects (a SQLModel "
                "model with table=True); give a model without a table (a response model) or "
                "a callable"
            )
        if _is_type_form(validator):
            # a type: ``list[Model]`` and ``int`` are callable (``list(value)`` accepts any
            # iterable, ``int("12")`` converts), ``Annotated[Model, ...]`` passes
            # ``model_validate`` through: none of them may be taken for what it looks like
            validator = _type_adapter(validator)
            self._kind = "adapter"
            self.name: str = repr(validator)[:120]
        elif callable(getattr(validator, "model_validate", None)):
            self._kind = "model"
            self.name = getattr(validator, "__qualname__", None) or repr(validator)
        elif callable(getattr(validator, "validate_python", None)):
            self._kind = "adapter"
            self.name = repr(validator)[:120]
        elif callable(validator):
            self._kind = "callable"
            self.name = getattr(validator, "__qualname__", None) or type(validator).__name__
            if _is_async_function(validator):
                raise TypeError(
                    f"validate={self.name} is an async function: a result is checked "
                    "synchronously and a coroutine would never be awaited (every result would "
                    "pass); give a plain function (def), a Pydantic model or a type"
                )
        elif isinstance(validator, str):
            raise TypeError(
                f"validate={validator!r} is a string: give the class itself "
                f"(validate={validator}, not validate={validator!r})"
            )
        else:
            raise TypeError(
                "validate= needs a Pydantic model class, a Pydantic TypeAdapter, a type such as "
                f"list[Model] or a callable of the result, got {type(validator).__name__}"
            )
        self._validator = validator

    def problem(self, value: Any) -> tuple[str, BaseException | None] | None:
        """None for a valid ``value``; else the reason (no values in it) and the exception.
        ``TypeError`` if a callable validator returns an awaitable (closed: never awaited)."""
        validator = self._validator
        try:
            if self._kind == "model":
                validator.model_validate(value, from_attributes=True)
                return None
            if self._kind == "adapter":
                validator.validate_python(value, from_attributes=True)
                return None
            verdict = validator(value)
        except (ValueError, TypeError, AssertionError) as exc:
            return _reason(exc, self.name, self._core_schema()), exc
        if verdict is False:
            return f"{self.name} returned False", None
        if verdict is not True and verdict is not None and inspect.isawaitable(verdict):
            close = getattr(verdict, "close", None)
            if callable(close):
                close()  # no "never awaited" warning: it is refused, not forgotten
            raise TypeError(
                f"validate={self.name} returned {type(verdict).__name__}, an awaitable: a result "
                "is checked synchronously, so what it awaits would never decide; give a plain "
                "function that returns False or raises for an invalid result"
            )
        return None

    def _core_schema(self) -> Any:
        """The Pydantic core schema checked against (None for a callable, or if unknown): it
        tells a field name in an error's location from a key of the result's data."""
        if self._kind == "callable":
            return None
        attribute = "core_schema" if self._kind == "adapter" else "__pydantic_core_schema__"
        try:
            schema = getattr(self._validator, attribute, None)
        except Exception:  # a model whose schema can't be built: its locations are masked
            return None
        return schema if isinstance(schema, dict) else None


#: Modules whose objects are type forms even without a typing origin (``NewType``,
#: ``TypeAliasType``, special forms such as ``NoReturn``).
_TYPING_MODULES = frozenset({"typing", "typing_extensions"})


def _mapped_class_in(validator: Any, depth: int = 0) -> type | None:
    """A Pydantic model mapped by SQLAlchemy with relationships (SQLModel's ``table=True``
    with a ``Relationship``) that ``validator`` is or holds (``list[Team]``, ``Team | None``),
    or None. Checking a result builds instances of it from the unit's objects, and setting
    their relationships makes SQLAlchemy's backrefs move the unit's related objects onto them
    (a team's heroes taken from it, a phantom hero added). Without relationships an instance
    built is only a transient copy. (A plain ORM class has no Pydantic schema: Pydantic
    refuses it, see :func:`response_check`.)"""
    if isinstance(validator, type) and get_origin(validator) is None:
        if not callable(getattr(validator, "model_validate", None)):
            return None
        found: Any = sa_inspect(validator, raiseerr=False)
        related = getattr(found, "relationships", None)
        return validator if related is not None and len(related) > 0 else None
    if depth > 8:  # (a form nested deeper is no response type)
        return None
    for arg in get_args(validator):
        mapped = _mapped_class_in(arg, depth + 1)
        if mapped is not None:
            return mapped
    return None


def _is_type_form(validator: Any) -> bool:
    """Whether ``validator`` is a type to check with a ``TypeAdapter``: a parametrised form
    (``list[Model]``, ``Model | None``, ``Annotated[...]``, ``Literal[...]``), a class that is
    not a Pydantic model (``int``, ``list``, an enum, a ``TypedDict``, a dataclass, a
    ``NamedTuple``, ``typing.Any``, an ORM class: refused by Pydantic), or a form of
    ``typing`` without an origin (``NewType``, ``TypeAliasType``)."""
    if get_origin(validator) is not None:
        return True
    if isinstance(validator, type):
        return not callable(getattr(validator, "model_validate", None))
    return type(validator).__module__ in _TYPING_MODULES


def _is_async_function(fn: Any) -> bool:
    """Whether calling ``fn`` gives a coroutine or an async generator by its declaration: a
    coroutine or async generator function, a ``functools.partial`` of one, or an object whose
    ``__call__`` is one."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    candidates = (fn, type(fn).__call__) if callable(fn) else (fn,)
    return any(inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f) for f in candidates)


def _describe(form: Any) -> str:
    """A type for a message: a class by its name, a form by its repr."""
    if isinstance(form, type) and get_origin(form) is None:
        return getattr(form, "__qualname__", None) or repr(form)
    return repr(form)


def _string_reference(form: Any) -> str | None:
    """The first class ``form`` names by a string (``list["TaskOut"]``, ``Optional["X"]``),
    if any; ``Literal`` values and ``Annotated`` metadata are not types."""
    if isinstance(form, str):
        return form
    if isinstance(form, typing.ForwardRef):
        return form.__forward_arg__
    if isinstance(form, list | tuple):  # ``Callable[[A, B], C]``'s parameters
        args: tuple[Any, ...] = tuple(form)
    else:
        origin = get_origin(form)
        if origin is None or origin is Literal:
            return None
        args = get_args(form)
        if origin is Annotated:
            args = args[:1]
    for arg in args:
        found = _string_reference(arg)
        if found is not None:
            return found
    return None


def _new_adapter(form: Any) -> Any:
    """A complete Pydantic ``TypeAdapter`` of ``form``, or ``TypeError`` naming the form."""
    reference = _string_reference(form)
    if reference is not None:
        # ``TypeAdapter`` would look the name up in this module's namespace, not the caller's:
        # not found (every result refused), or found and wrong (``"Config"`` is resilient_db's)
        raise TypeError(
            f"validate={_describe(form)} names the class {reference!r} by a string, which can't "
            "be looked up where validate= was written: give the class itself "
            f"({reference}, not {reference!r})"
        )
    try:
        from pydantic import TypeAdapter  # noqa: PLC0415 - optional: only types need it
        from pydantic.errors import (  # noqa: PLC0415
            PydanticUndefinedAnnotation,
            PydanticUserError,
        )
    except ImportError as exc:
        # Pydantic 1 imports, without a TypeAdapter ("pip install pydantic" was answered
        # "already satisfied"): named, with the release validate= needs (README, "Install")
        try:
            import pydantic  # noqa: PLC0415

            old = (
                f" (Pydantic {pydantic.VERSION} is installed: validate= needs Pydantic 2.10 "
                "or later)"
            )
        except ImportError:
            old = ""
        raise ImportError(
            f"validate={_describe(form)} is a type, which is checked with Pydantic's "
            f"TypeAdapter{old}: pip install 'pydantic>=2.10' (or pass a callable)"
        ) from exc
    try:
        adapter = TypeAdapter(form)
    except (PydanticUserError, PydanticUndefinedAnnotation, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TypeError(
            f"validate={_describe(form)}: Pydantic can't check this type ({first}). Give a "
            "Pydantic model (from_attributes=True checks ORM rows), a type made of such models, "
            "or a callable of the result"
        ) from exc
    if getattr(adapter, "pydantic_complete", True) is False:
        raise TypeError(
            f"validate={_describe(form)} is not fully defined: a class it refers to can't be "
            "resolved (a name given as a string, or a class defined later). Give the classes "
            "themselves, each defined before validate= is given"
        )
    return adapter


#: Adapters by type form: building one costs far more than a check, and ``run(validate=...)``
#: makes its check at each call. At most 256 are kept (least recently used go first).
_cached_adapter = functools.lru_cache(maxsize=256)(_new_adapter)


def _type_adapter(form: Any) -> Any:
    """A Pydantic ``TypeAdapter`` of ``form``, cached unless the form can't be hashed (an
    ``Annotated`` with unhashable metadata).

    A form is found in the cache by equality, and Pydantic's ``Field(...)`` (also
    ``FieldInfo``) compares by identity: ``Annotated[list[TaskOut], Field(min_length=1)]``
    written inline in the call is a new form at each call, its adapter built again each time
    (hundreds of microseconds) and the cache's other entries pushed out. Define such a form
    once, at module level (``NonEmpty = Annotated[...]``, then ``validate=NonEmpty``), or pass
    a ``TypeAdapter`` made once. The cache is not keyed on the form's ``repr``: two different
    classes can share one."""
    try:
        hash(form)
    except TypeError:
        return _new_adapter(form)
    return _cached_adapter(form)


def response_check(validator: ResponseValidator) -> ResponseCheck:
    """``validator`` made ready. Raises ``TypeError`` for something that can't check a result
    (not a model, adapter, type or callable; a type Pydantic can't build a schema for, such as
    an ORM class or ``list[OrmClass]``; a type naming a class by a string, or not fully
    defined; an ``async def`` callable), and ``ImportError`` for a type without Pydantic
    installed. Types are best defined once (see :func:`_type_adapter`)."""
    return ResponseCheck(validator)


def check_response(
    check: ResponseCheck,
    value: Any,
    config: Config,
    service: str,
    session: Session | None = None,
) -> Any:
    """Return ``value`` if ``check`` finds it valid; else log and raise
    :class:`~resilient_db.ResponseValidationError`. An iterator, or a result holding one (see
    :func:`_iterator_in`), is refused with ``TypeError``: checking it would consume it, and the
    caller gets the same object back.

    With the unit's ``session``, an error raised by one of its statements while the check runs
    (an ORM attribute loaded by the check: see :class:`_StatementErrors`) is raised as itself,
    whether the check passed or not."""
    if isinstance(value, (Iterator, AsyncIterator)):
        raise TypeError(
            f"the result to check with validate={check.name} is an iterator "
            f"({type(value).__name__}), which can't be checked without consuming it: the "
            "caller would get it empty. Return a list (list(...), .all()) instead"
        )
    inner = _iterator_in(value)
    if inner is not None:
        loc, kind = inner
        raise TypeError(
            f"the result to check with validate={check.name} holds an iterator ({kind}) at "
            f"{_location(loc, check._core_schema())}, which can't be checked without "
            "consuming it: the caller would get it empty. Make it a list (list(...), .all())"
        )
    found = check.problem(value) if session is None else _problem_in(session, check, value)
    if found is None:
        return value
    reason, cause = found
    stats_for(service).add("response_validation_failures")
    emit(
        config,
        log_validation,
        logging.WARNING,
        "Response validation failed: service=%s validator=%s: %s",
        service,
        check.name,
        reason,
        service=service,
        event="response_invalid",
        validator=check.name,
        reason=reason,
    )
    raise ResponseValidationError(service, check.name, reason) from cause


class _StatementErrors:
    """A ``do_orm_execute`` listener of the unit's session while its result is checked: it
    runs each statement and keeps the first error one raised. Pydantic's ``from_attributes``
    turns any exception raised by reading an attribute (a deferred column or a lazy
    relationship loaded then, an autoflush refused by the transition guard) into a
    ``get_attribute_error`` and drops the exception: kept here, it is raised as itself."""

    __slots__ = ("__weakref__", "first")  # (SQLAlchemy's event registry refers to it weakly)

    def __init__(self) -> None:
        self.first: BaseException | None = None

    def __call__(self, orm_state: ORMExecuteState) -> Result[Any]:
        try:
            return orm_state.invoke_statement()  # (autoflush included)
        except BaseException as exc:
            if self.first is None:
                self.first = exc
            raise


def _problem_in(
    session: Session, check: ResponseCheck, value: Any
) -> tuple[str, BaseException | None] | None:
    """``check.problem(value)`` with the statements of ``session`` watched meanwhile: the
    first error one raised is raised instead of the verdict, valid or not (the validator may
    have swallowed it; a failed statement also aborted the unit's transaction). Listened on
    this session only, for the check only: a ``do_orm_execute`` listener costs each statement
    of its sessions an ``ORMExecuteState``."""
    if not isinstance(session, Session):  # (a scoped_session would be listened on its class)
        return check.problem(value)
    errors = _StatementErrors()
    event.listen(session, "do_orm_execute", errors, insert=True)
    try:
        found = check.problem(value)
    finally:
        event.remove(session, "do_orm_execute", errors)
    if errors.first is not None:
        raise errors.first  # (outside an except block: its own __context__ is kept)
    return found


#: How :func:`_iterator_in` treats an object, by its class.
_LEAF, _ITERATOR, _MAPPING, _COLLECTION, _DATACLASS = range(5)
_COLLECTIONS = (list, tuple, set, frozenset, collections.deque)
_ATOMS = (str, bytes, bytearray, memoryview)
#: Kinds by class, found once per class, and the classes found to be leaves (both cleared
#: when they grow past :data:`_MAX_KINDS`).
_kinds: dict[type, int] = {}
_leaves: set[type] = set()
_MAX_KINDS = 1024


def _kind(cls: type) -> int:
    kind = _kinds.get(cls)
    if kind is None:
        if issubclass(cls, _ATOMS):
            kind = _LEAF
        elif issubclass(cls, (Iterator, AsyncIterator)):
            kind = _ITERATOR
        elif issubclass(cls, Mapping):
            kind = _MAPPING
        elif issubclass(cls, _COLLECTIONS):
            kind = _COLLECTION
        elif dataclasses.is_dataclass(cls) and sa_inspect(cls, raiseerr=False) is None:
            # (a mapped class is an ORM row even when it is a dataclass, as MappedAsDataclass
            # models are: reading its fields would run the ORM's loaders)
            kind = _DATACLASS
        else:
            kind = _LEAF  # an ORM row, a model, a scalar: not looked into
        if len(_kinds) >= _MAX_KINDS:
            _kinds.clear()
            _leaves.clear()
        _kinds[cls] = kind
        if kind == _LEAF:
            _leaves.add(cls)
    return kind


def _iterator_in(value: Any) -> tuple[tuple[Any, ...], str] | None:
    """Where ``value`` holds an iterator, and its type's name: in a dict (or other mapping),
    list, tuple, set, frozenset or deque, or a dataclass's field, at any depth (None if it
    holds none). A check would consume it and the caller would get it empty; checking a copy
    instead would hand the caller another object than the unit's (in a tuple or a frozen
    dataclass, one that can't even be put back), and would run a generator's code at the
    check instead of where the caller iterates it. Other objects (ORM rows, Pydantic models)
    are not looked into: an attribute that makes an iterator when read (a property) gives the
    caller a new one.

    The location has a mapping's keys, collections' indexes and fields' names, as Pydantic's
    locations do (shown by :func:`_location`, keys of the data masked). Each container is
    looked into once (a cycle ends there); one whose items' classes are all known leaves is
    passed over at C speed (a list of 10,000 ORM rows or scalars)."""
    kind = _kind(type(value))
    if kind == _LEAF or _only_leaves(kind, value):
        return None
    todo: list[tuple[tuple[Any, ...], Any]] = [((), value)]
    seen: set[int] = set()
    while todo:
        loc, node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        kind = _kind(type(node))
        if kind == _MAPPING:
            items: Any = node.items()
        elif kind == _COLLECTION:
            items = enumerate(node)
        elif kind == _DATACLASS:
            # the fields' stored values (no descriptor run), or, with slots, their slots
            stored = getattr(node, "__dict__", None)
            items = [
                (f.name, stored.get(f.name) if stored is not None else getattr(node, f.name, None))
                for f in dataclasses.fields(node)
            ]
        else:
            continue
        for key, item in items:
            found = _kinds.get(type(item))
            if found is None:
                found = _kind(type(item))
            if found == _LEAF or _only_leaves(found, item):
                continue
            if found == _ITERATOR:
                return (*loc, key), type(item).__name__
            todo.append(((*loc, key), item))
    return None


def _only_leaves(kind: int, node: Any) -> bool:
    """Whether ``node``, a mapping or collection, holds known leaves only (found at C speed:
    a list of rows, a dict of scalars is not looked into further)."""
    if kind == _MAPPING:
        return _leaves.issuperset(map(type, node.values()))
    if kind == _COLLECTION:
        return _leaves.issuperset(map(type, node))
    return False


#: Pydantic error types whose message may be shown: every part of their template is fixed
#: text or a context value from the validator's schema (:data:`_SCHEMA_CONTEXT`), none from the
#: checked value (checked against pydantic-core's templates: ``PydanticKnownError(type,
#: ctx).message_template``). Left out, shown as location and ``[type]`` only: types whose
#: message quotes the value or a part of it (``value_error``, ``assertion_error`` and
#: ``get_attribute_error`` carry an exception's message; ``union_tag_invalid`` the tag,
#: ``uuid_parsing``, ``date_parsing``, ``url_parsing``... a parser's error, ``timezone_offset``
#: the value's offset, ``too_short``/``too_long`` the value's length, ``mapping_type`` and
#: ``iteration_error`` an exception, ``no_such_attribute``, ``json_invalid``...) and custom
#: errors (``PydanticCustomError``: any text).
_SHOWN_MESSAGES = frozenset(
    {
        # fixed text
        "arguments_type",
        "bool_parsing",
        "bool_type",
        "bytes_type",
        "callable_type",
        "complex_str_parsing",
        "complex_type",
        "counter_type",
        "date_from_datetime_inexact",
        "date_future",
        "date_past",
        "date_type",
        "datetime_future",
        "datetime_past",
        "datetime_type",
        "decimal_parsing",
        "decimal_type",
        "default_factory_not_called",
        "deque_type",
        "dict_type",
        "ellipsis_error",
        "extra_forbidden",
        "finite_number",
        "float_parsing",
        "float_type",
        "fraction_parsing",
        "fraction_type",
        "frozen_dict_type",
        "frozen_field",
        "frozen_instance",
        "frozen_set_type",
        "int_from_float",
        "int_parsing",
        "int_parsing_size",
        "int_type",
        "invalid_key",
        "iterable_type",
        "json_type",
        "list_type",
        "missing",
        "missing_argument",
        "missing_keyword_only_argument",
        "missing_positional_only_argument",
        "missing_sentinel_error",
        "model_attributes_type",
        "multiple_argument_values",
        "none_required",
        "ordered_dict_type",
        "recursion_depth_exceeded",
        "recursion_loop",
        "set_item_not_hashable",
        "set_type",
        "string_not_ascii",
        "string_type",
        "string_unicode",
        "time_delta_type",
        "time_type",
        "timezone_aware",
        "timezone_naive",
        "tuple_type",
        "unexpected_keyword_argument",
        "unexpected_positional_argument",
        "url_type",
        "uuid_type",
        # bounds, class names, patterns and expected values of the schema
        "bytes_too_long",
        "bytes_too_short",
        "dataclass_exact_type",
        "dataclass_type",
        "decimal_max_digits",
        "decimal_max_places",
        "decimal_whole_digits",
        "enum",
        "greater_than",
        "greater_than_equal",
        "is_instance_of",
        "is_subclass_of",
        "less_than",
        "less_than_equal",
        "literal_error",
        "model_type",
        "multiple_of",
        "named_tuple_type",
        "string_pattern_mismatch",
        "string_too_long",
        "string_too_short",
        "union_tag_not_found",
        "url_scheme",
        "url_too_long",
        "uuid_version",
    }
)
#: Context keys of those types' templates: each comes from the schema, never from the value.
_SCHEMA_CONTEXT = frozenset(
    {
        "class",
        "class_name",
        "decimal_places",
        "discriminator",
        "expected",
        "expected_schemes",
        "expected_version",
        "ge",
        "gt",
        "le",
        "lt",
        "max_digits",
        "max_length",
        "min_length",
        "multiple_of",
        "pattern",
        "whole_digits",
    }
)


def _message(error: dict[str, Any]) -> str | None:
    """Pydantic's message of ``error`` if it can't quote the value (see
    :data:`_SHOWN_MESSAGES`): of an allowed type, with context from the schema only, and
    exactly Pydantic's own template for that type (a custom error reusing a type's name, or a
    later template using another context key, shows no message)."""
    kind = error.get("type")
    msg = error.get("msg")
    ctx = error.get("ctx") or {}
    if kind not in _SHOWN_MESSAGES or not isinstance(msg, str) or not isinstance(ctx, dict):
        return None
    if not set(ctx) <= _SCHEMA_CONTEXT:
        return None
    try:
        from pydantic_core import PydanticKnownError  # noqa: PLC0415 - Pydantic raised it

        own = PydanticKnownError(kind, ctx or None).message()
    except Exception:  # a type or context this pydantic-core doesn't know: no message
        return None
    return msg if own == msg else None


def _reason(exc: BaseException, name: str, schema: Any = None) -> str:
    """What was wrong, without the values: Pydantic's errors by location and kind, with
    Pydantic's message only where it can't quote the value (:func:`_message`: ``id: Input
    should be a valid integer [int_type]``, but ``email: [value_error]`` for a validator's
    own ``ValueError``); for other exceptions only their type (a message such as ``invalid
    literal for int(): 'x'`` or a rewritten ``assert`` can quote the payload; it stays on the
    exception, ``__cause__``).

    A location names fields, list indexes and union members; a key of the result's data (a
    dict-typed field's key, an extra key of a model) is shown as ``<key>`` (see
    :func:`_location`)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            found = errors(include_input=False, include_url=False)
        except TypeError:  # an ``errors`` method of another kind of exception
            found = None
        if isinstance(found, list) and found:
            parts = []
            for error in found[:_MAX_ERRORS]:
                where = _location(tuple(error.get("loc", ())), schema)
                message = _message(error)
                kind = f"[{error.get('type', '')}]"
                parts.append(f"{where}: {message} {kind}" if message else f"{where}: {kind}")
            more = len(found) - _MAX_ERRORS
            if more > 0:
                parts.append(f"and {more} more error(s)")
            return "; ".join(parts)
    return f"{name} raised {type(exc).__name__}"


#: What a location shows instead of a key of the result's data.
KEY_PLACEHOLDER = "<key>"
#: Schema steps that add nothing to a location, and where the checked schema is.
_WRAPPERS = {
    "model": "schema",
    "dataclass": "schema",
    "nullable": "schema",
    "default": "schema",
    "function-after": "schema",
    "function-before": "schema",
    "function-wrap": "schema",
    "custom-error": "schema",
    "definitions": "schema",
    "json-or-python": "python_schema",
}
_SEQUENCES = frozenset({"list", "set", "frozenset", "generator"})
_FIELDS = frozenset({"model-fields", "typed-dict", "dataclass-args"})
#: Steps through schemas between two location items, at most (a reference cycle ends there).
_MAX_STEPS = 64

_Shown: TypeAlias = tuple[object, ...]


def _location(loc: tuple[Any, ...], schema: Any) -> str:
    """``loc`` for a log line: field names, list and tuple indexes, union members and
    ``[key]`` as Pydantic gives them; a key of a dict in the result (or an extra key of a
    model) as ``<key>``, so no data of the result is logged. The items are told apart by
    following ``loc`` through the validator's core ``schema``; where the schema can't tell (no
    schema: a callable that raised a ``ValidationError``; a kind of schema not followed here),
    every item from there on is shown as ``<key>``."""
    if not loc:
        return "(root)"
    shown: _Shown
    if isinstance(schema, dict):
        try:
            shown, _ = _follow(schema, loc, _definitions(schema), 0)
        except Exception:  # a schema of an unforeseen shape: show nothing of the data
            shown = _masked(loc)
    else:
        shown = _masked(loc)
    return ".".join(str(p) for p in shown)


def _masked(loc: tuple[Any, ...]) -> _Shown:
    return tuple(KEY_PLACEHOLDER for _ in loc)


def _definitions(schema: dict[str, Any]) -> dict[str, Any]:
    """Every schema with a ``ref`` inside ``schema``, by its ref (what ``definition-ref``
    points to)."""
    found: dict[str, Any] = {}
    seen: set[int] = set()
    todo: list[Any] = [schema]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            ref = node.get("ref")
            if isinstance(ref, str) and "type" in node:
                found.setdefault(ref, node)
            todo.extend(v for v in node.values() if isinstance(v, dict | list | tuple))
        elif isinstance(node, list | tuple):
            todo.extend(v for v in node if isinstance(v, dict | list | tuple))
    return found


def _follow(
    schema: Any, loc: tuple[Any, ...], defs: dict[str, Any], steps: int
) -> tuple[_Shown, bool]:
    """``loc`` as shown, following it through ``schema``; and whether the schema accounted
    for every item (False: it was guessed, the unaccounted items masked)."""
    if not loc:
        return (), True
    while isinstance(schema, dict):
        kind = schema.get("type")
        steps += 1
        if steps > _MAX_STEPS:
            break
        if kind == "definition-ref":
            schema = defs.get(schema.get("schema_ref", ""))
        elif kind in _WRAPPERS:
            schema = schema.get(_WRAPPERS[kind])
        elif kind == "lax-or-strict":
            return _any_of(
                [schema.get("lax_schema"), schema.get("strict_schema")], loc, defs, steps
            )
        elif kind == "chain":
            return _any_of(list(schema.get("steps") or ()), loc, defs, steps)
        elif kind in _SEQUENCES or kind == "tuple":
            return _item(schema, loc, defs)
        elif kind == "dict":
            return _dict_entry(schema, loc, defs)
        elif kind in _FIELDS:
            return _field(schema, loc, defs)
        elif kind == "union":
            return _union_member(schema, loc, defs)
        elif kind == "tagged-union":
            choices = schema.get("choices") or {}
            head = loc[0]
            if isinstance(head, str | int) and head in choices:
                rest, exact = _follow(choices[head], loc[1:], defs, 0)
                return (head, *rest), exact
            break
        else:
            break  # a leaf, or a kind not followed here
    return _masked(loc), False


def _item(
    schema: dict[str, Any], loc: tuple[Any, ...], defs: dict[str, Any]
) -> tuple[_Shown, bool]:
    """An index into a list, set or tuple."""
    head = loc[0]
    if not isinstance(head, int) or isinstance(head, bool):
        return _masked(loc), False
    items = schema.get("items_schema")
    if isinstance(items, list):  # a tuple: positional item schemas, one of them variadic
        variadic = schema.get("variadic_item_index")
        if variadic is None:
            candidates = items[head : head + 1]
        else:
            candidates = items[head : head + 1] if head < variadic else items[variadic:]
        if not candidates:
            return _masked(loc), False
        rest, exact = _any_of(candidates, loc[1:], defs, 0)
    else:
        rest, exact = _follow(items, loc[1:], defs, 0)
    return (head, *rest), exact


def _dict_entry(
    schema: dict[str, Any], loc: tuple[Any, ...], defs: dict[str, Any]
) -> tuple[_Shown, bool]:
    """A dict's key (data: masked), then ``[key]`` and the key's error, or the value's."""
    if loc[1:2] == ("[key]",):
        rest, exact = _follow(schema.get("keys_schema"), loc[2:], defs, 0)
        return (KEY_PLACEHOLDER, "[key]", *rest), exact
    rest, exact = _follow(schema.get("values_schema"), loc[1:], defs, 0)
    return (KEY_PLACEHOLDER, *rest), exact


def _field(
    schema: dict[str, Any], loc: tuple[Any, ...], defs: dict[str, Any]
) -> tuple[_Shown, bool]:
    """A field of a model, TypedDict or dataclass by its name or alias; any other key is an
    extra key of the data (masked), checked by the extras schema if there is one."""
    head = loc[0]
    fields = schema.get("fields") or {}
    named = fields.items() if isinstance(fields, dict) else ((f.get("name"), f) for f in fields)
    for name, field in named:
        if head == name or head in _aliases(field.get("validation_alias")):
            rest, exact = _follow(field.get("schema"), loc[1:], defs, 0)
            return (head, *rest), exact
    extras = schema.get("extras_schema")
    if extras is None:
        return _masked(loc), True
    rest, exact = _follow(extras, loc[1:], defs, 0)
    return (KEY_PLACEHOLDER, *rest), exact


def _aliases(alias: Any) -> set[object]:
    """The first items of a field's alias paths (``"a"``, ``["a", 0]`` or a list of those)."""
    if isinstance(alias, str):
        return {alias}
    if isinstance(alias, list) and alias:
        if all(isinstance(path, list) for path in alias):
            return {path[0] for path in alias if path}
        return {alias[0]}
    return set()


def _union_member(
    schema: dict[str, Any], loc: tuple[Any, ...], defs: dict[str, Any]
) -> tuple[_Shown, bool]:
    """A union's member, named by its label (from the schema, not the data): followed in the
    members of that label, or in every member whose label isn't known here."""
    head = loc[0]
    labelled: list[Any] = []
    unknown: list[Any] = []
    for choice in schema.get("choices") or ():
        member, label = choice if isinstance(choice, tuple) else (choice, _label(choice, defs))
        if label is None:
            unknown.append(member)
        elif label == head:
            labelled.append(member)
    candidates = labelled or unknown
    if not isinstance(head, str) or not candidates:
        return _masked(loc), False
    rest, exact = _any_of(candidates, loc[1:], defs, 0)
    return (head, *rest), exact


def _label(schema: Any, defs: dict[str, Any]) -> str | None:
    """A union member's label where it is its class's name (models, dataclasses, TypedDicts);
    None where it isn't known here."""
    if isinstance(schema, dict) and schema.get("type") == "definition-ref":
        schema = defs.get(schema.get("schema_ref", ""))
    if isinstance(schema, dict) and schema.get("type") in ("model", "dataclass", "typed-dict"):
        cls = schema.get("cls")
        return getattr(cls, "__name__", None) if cls is not None else None
    return None


def _any_of(
    schemas: list[Any], loc: tuple[Any, ...], defs: dict[str, Any], steps: int
) -> tuple[_Shown, bool]:
    """``loc`` under whichever of ``schemas`` raised it: the followings that account for every
    item are preferred; an item they show differently is masked."""
    found = [_follow(s, loc, defs, steps) for s in schemas]
    exact = [shown for shown, ok in found if ok]
    pool = exact or [shown for shown, _ in found]
    if not pool:
        return _masked(loc), False
    merged = tuple(
        items[0] if all(i == items[0] for i in items) else KEY_PLACEHOLDER
        for items in zip(*pool, strict=True)
    )
    return merged, bool(exact)
