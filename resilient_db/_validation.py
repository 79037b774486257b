"""Response validation: ``validate=`` of units of work and of ``with_self_healing``.

A validator is a Pydantic model class (``model_validate``), a Pydantic ``TypeAdapter``
(``validate_python``), a type form such as ``list[Model]`` or ``Model | None`` (checked by a
``TypeAdapter`` of it), or a callable. Pydantic is recognised by those methods and imported only
for a type form, so it stays an optional dependency of the application.

The result is checked, not converted: the caller gets the unit's own return value back, the same
object with validation on or off (``SELF_HEALING_RESPONSE_VALIDATION``), so switching it off never
changes what a program receives. An invalid result is logged ``[SELF-HEAL] Response validation
failed`` with the reason (field locations and error kinds: never the values), counted in
``health()`` (the service's ``response_validation_failures``) and raises
:class:`~resilient_db.ResponseValidationError`.

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
            return _reason(exc, self.name), exc
        return None


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


def _reason(exc: BaseException, name: str) -> str:
    """What was wrong, without the values: Pydantic's errors by location and kind; for other
    exceptions only their type (a message such as ``invalid literal for int(): 'x'`` or a
    rewritten ``assert`` can quote the payload; it stays on the exception, ``__cause__``)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            found = errors(include_input=False, include_url=False)
        except TypeError:  # an ``errors`` method of another kind of exception
            found = None
        if isinstance(found, list) and found:
            parts = [
                f"{'.'.join(str(p) for p in e.get('loc', ())) or '(root)'}: "
                f"{e.get('msg', '')} [{e.get('type', '')}]"
                for e in found[:_MAX_ERRORS]
            ]
            more = len(found) - _MAX_ERRORS
            if more > 0:
                parts.append(f"and {more} more error(s)")
            return "; ".join(parts)
    return f"{name} raised {type(exc).__name__}"
