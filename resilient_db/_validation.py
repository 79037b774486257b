"""Response validation: ``validate=`` of units of work and of ``with_self_healing``.

A validator is a Pydantic model class (``model_validate``), a Pydantic ``TypeAdapter``
(``validate_python``), a type form such as ``list[Model]`` or ``Model | None`` (checked by a
``TypeAdapter`` of it), or a callable. Pydantic is recognised by those methods and imported only
for a type form, so it stays an optional dependency of the application.

The result is checked, not converted: the caller gets the unit's own return value back, the same
object with validation on or off (``SELF_HEALING_RESPONSE_VALIDATION``), so switching it off never
changes what a program receives. An invalid result is logged ``[SELF-HEAL] Response validation
failed`` with the reason (field locations and error kinds: never the values, and a key of a dict
in the result shows as ``<key>``), counted in ``health()`` (the service's
``response_validation_failures``) and raises :class:`~resilient_db.ResponseValidationError`.

Invalid results are not retried, read-only units included. PostgreSQL gives each statement (and,
under REPEATABLE READ, each transaction) a consistent snapshot, and resilient_db sends a unit to
one server, so a replay would most often read the same rows and fail again: the failure is a bug
or bad data, and retrying it would double the load and delay the error. A unit that reads with
several statements under READ COMMITTED can see two commits' worth of data; the remedy is
REPEATABLE READ for that unit (``execution_options(isolation_level=...)``), which makes its read
consistent, not a retry that makes it consistent most of the time.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable
from typing import Any, Protocol, TypeAlias, get_origin

from ._config import Config
from ._errors import ResponseValidationError
from ._observability import emit, stats_for

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


#: What ``validate=`` accepts: a Pydantic model class, a Pydantic ``TypeAdapter``, a type form
#: (``list[Model]``, ``tuple[Model, ...]``, ``Model | None``, ``Annotated[...]``: checked by a
#: ``TypeAdapter`` of it, so it needs Pydantic), or a callable of the result that returns
#: ``False`` or raises ``ValueError``, ``TypeError`` or ``AssertionError`` for an invalid one
#: (anything else it returns means valid). The reason logged for a callable is the type of what
#: it raised, not its message (which can quote the result); Pydantic's errors are listed by
#: location and kind, without their input.
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
        if get_origin(validator) is not None:
            # a type form: ``list[Model]`` is callable (``list(value)`` accepts any iterable)
            # and ``Annotated[Model, ...]`` passes ``model_validate`` through, so neither may be
            # taken for what it looks like
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
        else:
            raise TypeError(
                "validate= needs a Pydantic model class, a Pydantic TypeAdapter, a type such as "
                f"list[Model] or a callable of the result, got {type(validator).__name__}"
            )
        self._validator = validator

    def problem(self, value: Any) -> tuple[str, BaseException | None] | None:
        """None for a valid ``value``; else the reason (no values in it) and the exception."""
        validator = self._validator
        try:
            if self._kind == "model":
                validator.model_validate(value, from_attributes=True)
            elif self._kind == "adapter":
                validator.validate_python(value, from_attributes=True)
            elif validator(value) is False:
                return f"{self.name} returned False", None
        except (ValueError, TypeError, AssertionError) as exc:
            return _reason(exc, self.name, self._core_schema()), exc
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


def _new_adapter(form: Any) -> Any:
    try:
        from pydantic import TypeAdapter  # noqa: PLC0415 - optional: only type forms need it
    except ImportError as exc:
        raise ImportError(
            f"validate={form!r} is a type, which is checked with Pydantic's TypeAdapter: "
            "pip install pydantic (or pass a callable)"
        ) from exc
    return TypeAdapter(form)


#: Adapters by type form: building one costs far more than a check, and ``run(validate=...)``
#: makes its check at each call.
_cached_adapter = functools.lru_cache(maxsize=256)(_new_adapter)


def _type_adapter(form: Any) -> Any:
    """A Pydantic ``TypeAdapter`` of ``form``, cached unless the form can't be hashed (an
    ``Annotated`` with unhashable metadata)."""
    try:
        hash(form)
    except TypeError:
        return _new_adapter(form)
    return _cached_adapter(form)


def response_check(validator: ResponseValidator) -> ResponseCheck:
    """``validator`` made ready (raises ``TypeError`` for something that can't validate, and
    ``ImportError`` for a type form without Pydantic installed)."""
    return ResponseCheck(validator)


def check_response(check: ResponseCheck, value: Any, config: Config, service: str) -> Any:
    """Return ``value`` if ``check`` finds it valid; else log and raise
    :class:`~resilient_db.ResponseValidationError`."""
    found = check.problem(value)
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


def _reason(exc: BaseException, name: str, schema: Any = None) -> str:
    """What was wrong, without the values: Pydantic's errors by location and kind; for other
    exceptions only their type (a message such as ``invalid literal for int(): 'x'`` or a
    rewritten ``assert`` can quote the payload; it stays on the exception, ``__cause__``).

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
            parts = [
                f"{_location(tuple(e.get('loc', ())), schema)}: "
                f"{e.get('msg', '')} [{e.get('type', '')}]"
                for e in found[:_MAX_ERRORS]
            ]
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
