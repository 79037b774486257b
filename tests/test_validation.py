"""Response validation (``validate=``) against a real server: Pydantic models, type adapters and
callables; on and off by ``SELF_HEALING_RESPONSE_VALIDATION``; units rolled back, never retried;
the ``[SELF-HEAL]`` line names the reason and never the payload. Also the decorator form of
``with_self_healing`` (sync and async) with the same retry and breaker semantics."""

from __future__ import annotations

import dataclasses
import enum
import functools
import gc
import inspect
import logging
import re
import sys
import types
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any, Literal, NamedTuple, NewType, Optional

import pydantic
import pytest
import pytest_asyncio
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator
from pydantic_core import PydanticCustomError
from scenarios import RAISE_CODE_FUNCTION, Base, Item
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from typing_extensions import TypeAliasType, TypedDict

import resilient_db as rdb

pytestmark = pytest.mark.usefixtures("no_backoff")

SECRET = "s3cret-payload-value"


class ItemOut(BaseModel):
    id: int
    name: str

    @field_validator("name")
    @classmethod
    def not_hidden(cls, value: str) -> str:
        if value.startswith("hidden"):
            raise ValueError("hidden items are not served")
        return value


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        conn.execute(RAISE_CODE_FUNCTION)
    yield eng
    eng.dispose()


@pytest_asyncio.fixture
async def aengine(pg_async_url: str, engine: sa.Engine) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(pg_async_url)
    yield eng
    await eng.dispose()


def count_items(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(Item)).scalar_one())


def add_item(session: Session, name: str) -> dict[str, Any]:
    item = Item(name=name)
    session.add(item)
    session.flush()
    return {"id": item.id, "name": item.name}


def test_pydantic_model_valid_result_is_returned_unchanged(engine: sa.Engine, service: str) -> None:
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    result = Session.run(add_item, "ok", validate=ItemOut)
    assert result == {"id": result["id"], "name": "ok"}
    assert isinstance(result, dict)  # checked, not converted
    assert count_items(engine) == 1


def test_invalid_result_rolls_the_unit_back_is_logged_without_payload_and_not_retried(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    calls: list[int] = []

    def unit(session: Session) -> dict[str, Any]:
        calls.append(1)
        out = add_item(session, f"hidden-{SECRET}")
        out["id"] = SECRET  # not an int either
        return out

    seen: list[rdb.SelfHealEvent] = []
    rdb.add_hook(seen.append)
    try:
        with (
            caplog.at_level(logging.WARNING, logger="resilient_db"),
            pytest.raises(rdb.ResponseValidationError) as info,
        ):
            Session.run(unit, validate=ItemOut)
    finally:
        rdb.remove_hook(seen.append)
    err = info.value
    assert isinstance(err, rdb.ResilientDBError)
    assert err.service == service
    assert err.validator == "ItemOut"
    assert "id: Input should be a valid integer" in err.reason
    # a field_validator's own message can quote the value: its location and kind only
    assert "name: [value_error]" in err.reason
    assert "hidden" not in err.reason
    assert SECRET not in str(err)
    assert calls == [1]  # never retried
    assert count_items(engine) == 0  # checked before COMMIT: nothing written
    lines = [
        r.getMessage() for r in caplog.records if "Response validation failed" in r.getMessage()
    ]
    assert len(lines) == 1
    assert lines[0].startswith("[SELF-HEAL] Response validation failed: service=" + service)
    assert "validator=ItemOut" in lines[0]
    assert SECRET not in caplog.text
    (event,) = [e for e in seen if e.name == "response_invalid"]
    assert event.service == service
    assert event.fields["validator"] == "ItemOut"
    assert SECRET not in repr(event)
    counters = rdb.health()["services"][service]["counters"]
    assert counters["retries"] == 0


class Shelf(BaseModel):
    """A result with a dict-typed field whose keys are data from the database."""

    model_config = ConfigDict(extra="forbid")
    id: int
    stock: dict[str, int]
    rows: list[ItemOut] = []


def shelf(session: Session, *, key_as_field: bool = False) -> dict[str, Any]:
    """A shelf built from the items table: item names become keys of ``stock``."""
    names = list(session.scalars(sa.select(Item.name).order_by(Item.id)))
    out: dict[str, Any] = {"id": 1, "stock": dict.fromkeys(names, "many")}
    out["rows"] = [{"id": "x", "name": n} for n in names]
    if key_as_field:
        out[names[0]] = 1  # an extra key, data too
    return out


def test_a_logged_location_shows_no_key_of_the_result(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Pydantic's ``loc`` names a dict's keys: keys of the result, which came from the
    database. The reason and the ``[SELF-HEAL]`` line show ``<key>`` instead; field names,
    list indexes and ``[key]`` stay."""
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    Session.run(add_item, SECRET)
    with (
        caplog.at_level(logging.WARNING, logger="resilient_db"),
        pytest.raises(rdb.ResponseValidationError) as info,
    ):
        Session.run(lambda s: shelf(s, key_as_field=True), validate=Shelf)
    reason = info.value.reason
    assert reason.split("; ") == [
        "stock.<key>: Input should be a valid integer, unable to parse string as an integer "
        "[int_parsing]",
        "rows.0.id: Input should be a valid integer, unable to parse string as an integer "
        "[int_parsing]",
        "<key>: Extra inputs are not permitted [extra_forbidden]",
    ]
    assert SECRET not in caplog.text
    (line,) = [r.getMessage() for r in caplog.records if "validation failed" in r.getMessage()]
    assert line.endswith(reason)
    # a list of them through a type form, and a dict key's own error ([key])
    with pytest.raises(rdb.ResponseValidationError) as info:
        Session.run(lambda s: [{"id": 1, "stock": {}}, shelf(s)], validate=list[Shelf])
    assert info.value.reason.startswith("1.stock.<key>: Input should be a valid integer")
    adapter = TypeAdapter(dict[int, ItemOut])
    with pytest.raises(rdb.ResponseValidationError) as info:
        Session.run(lambda s: {SECRET: {"id": 1, "name": "n"}, 7: {"id": 7}}, validate=adapter)
    assert info.value.reason.split("; ") == [
        "<key>.[key]: Input should be a valid integer, unable to parse string as an integer "
        "[int_parsing]",
        "<key>.name: Field required [missing]",
    ]
    # a callable raising Pydantic's error: no schema to tell names from keys, all masked
    with pytest.raises(rdb.ResponseValidationError) as info:
        Session.run(shelf, validate=Shelf.model_validate)
    assert info.value.reason.startswith("<key>.<key>: Input should be a valid integer")
    assert SECRET not in str(info.value)


def test_validation_failures_are_counted_in_health(engine: sa.Engine, service: str) -> None:
    """Each failed check counts once on its service, whichever form ran it; a valid result and
    a check switched off count nothing."""
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config())

    def failures() -> int:
        return int(rdb.health()["services"][service]["counters"]["response_validation_failures"])

    Session.run(add_item, "ok", validate=ItemOut)
    assert failures() == 0
    with pytest.raises(rdb.ResponseValidationError):
        Session.run(lambda s: {"id": "x"}, validate=ItemOut)
    with pytest.raises(rdb.ResponseValidationError):
        rdb.with_self_healing(lambda: None, service=service, validate=lambda v: False)
    assert failures() == 2
    off = rdb.Config(response_validation=False)
    assert rdb.with_self_healing(lambda: 1, service=service, validate=bool, config=off) == 1
    assert failures() == 2


def test_callable_returning_false_or_raising(engine: sa.Engine, service: str) -> None:
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config())

    def has_positive_id(value: dict[str, Any]) -> bool:
        return bool(value["id"] > 0)

    def refuses(value: object) -> None:
        raise ValueError("no rows may be served today")

    assert Session.run(add_item, "a", validate=has_positive_id)["name"] == "a"
    with pytest.raises(rdb.ResponseValidationError) as info:
        Session.run(lambda s: {"id": -1}, validate=has_positive_id)
    assert (
        info.value.reason
        == "test_callable_returning_false_or_raising.<locals>.has_positive_id returned False"
    )
    with pytest.raises(rdb.ResponseValidationError) as info:
        Session.run(add_item, "b", validate=refuses)
    assert info.value.reason.endswith("refuses raised ValueError")  # the message stays out
    assert str(info.value.__cause__) == "no rows may be served today"
    assert isinstance(info.value.__cause__, ValueError)
    assert count_items(engine) == 1  # "b" rolled back

    def asserts(value: object) -> None:
        assert value == "expected"

    with pytest.raises(rdb.ResponseValidationError) as info:
        Session.run(lambda s: f"other {SECRET}", validate=asserts)
    assert info.value.reason.endswith("asserts raised AssertionError")
    assert SECRET not in str(info.value)


def test_type_adapter(engine: sa.Engine, service: str) -> None:
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    Session.run(add_item, "x")
    adapter = TypeAdapter(list[ItemOut])

    def all_items(session: Session) -> list[Item]:
        return list(session.scalars(sa.select(Item)))

    rows = Session.run(all_items, validate=adapter)  # ORM rows: validated from attributes
    assert len(rows) == 1
    assert isinstance(rows[0], Item)
    with pytest.raises(rdb.ResponseValidationError) as info:
        Session.run(lambda s: [{"id": 1, "name": "n"}, {"id": "bad"}], validate=adapter)
    assert info.value.validator == "TypeAdapter(list[ItemOut])"
    assert "1.id: Input should be a valid integer" in info.value.reason
    assert "1.name: Field required [missing]" in info.value.reason


def all_items(session: Session) -> list[Item]:
    return list(session.scalars(sa.select(Item).order_by(Item.id)))


class FormCase(NamedTuple):
    form: Any  # what validate= is given
    name: str  # the start of the validator's name
    valid: Callable[[Session], Any]  # a unit returning a valid result
    invalid: Any  # an invalid result
    reason: str  # a part of the reason it is invalid


@pytest.mark.parametrize(
    "case",
    [
        FormCase(list[ItemOut], "list[ItemOut]", all_items, [{"id": "x"}], "0.id: Input should"),
        FormCase(
            tuple[ItemOut, ...],
            "tuple[ItemOut, ...]",
            lambda s: tuple(all_items(s)),
            ({"id": 1, "name": "n"}, {"id": 2}),
            "1.name: Field required",
        ),
        FormCase(ItemOut | None, "Union[ItemOut, NoneType]", lambda s: None, {"id": 1}, "name"),
        FormCase(
            Optional[ItemOut],  # noqa: UP045 - typing's spelling is a form of its own
            "Union[ItemOut, NoneType]",
            lambda s: all_items(s)[0],
            [],
            "(root): Input should be a valid dictionary",
        ),
        FormCase(list[int], "list[int]", lambda s: [s.scalar(sa.select(1))], ["x"], "0: Input"),
        FormCase(
            Annotated[list[ItemOut], Field(min_length=1)],  # Annotated passes model_validate on
            "Annotated[list[ItemOut]",
            all_items,
            [],
            "(root): [too_short]",  # its message quotes the result's length
        ),
    ],
    ids=lambda case: case.name,
)
def test_a_type_form_is_checked_with_a_type_adapter_of_it(
    engine: sa.Engine, service: str, case: FormCase
) -> None:
    """``list[ItemOut]`` is callable and ``list(value)`` accepts anything iterable: taken for a
    callable validator it checked nothing."""
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    Session.run(add_item, "x")
    Session.run(case.valid, validate=case.form)  # ORM rows: validated from attributes
    with pytest.raises(rdb.ResponseValidationError) as info:
        Session.run(lambda s: case.invalid, validate=case.form)
    assert info.value.validator.startswith(f"TypeAdapter({case.name}")
    assert case.reason in info.value.reason
    with pytest.raises(rdb.ResponseValidationError):  # the call form too
        rdb.with_self_healing(lambda: case.invalid, service=service, validate=case.form)


def test_a_type_form_without_pydantic_is_refused_where_it_is_written(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pydantic", None)  # import pydantic raises ImportError
    with pytest.raises(ImportError, match=r"validate=list\[frozenset\[bytes\]\] .*pip install"):
        rdb.with_self_healing(service=service, validate=list[frozenset[bytes]])
    # a callable needs no Pydantic
    assert rdb.with_self_healing(lambda: 1, service=service, validate=lambda v: v == 1) == 1


def test_a_type_form_with_pydantic_1_names_the_release_it_needs(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An application with Pydantic 1 installed (no ``TypeAdapter``; its models have no
    ``model_validate``, so a model of it is taken as a type) was told ``pip install pydantic``,
    which pip answers with "already satisfied": the hint names the release the README does,
    and the one installed. Without Pydantic, the same hint, without a release. (A type no other
    test checks: a TypeAdapter made before is cached, and asks no import.)"""
    pydantic_1 = types.ModuleType("pydantic")  # what Pydantic 1.10 gives: no TypeAdapter
    pydantic_1.VERSION = "1.10.13"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pydantic", pydantic_1)
    with pytest.raises(ImportError) as info:
        rdb.with_self_healing(service=service, validate=dict[str, frozenset[complex]])
    assert str(info.value) == (
        "validate=dict[str, frozenset[complex]] is a type, which is checked with Pydantic's "
        "TypeAdapter (Pydantic 1.10.13 is installed: validate= needs Pydantic 2.10 or later): "
        "pip install 'pydantic>=2.10' (or pass a callable)"
    )
    monkeypatch.setitem(sys.modules, "pydantic", None)  # import pydantic raises ImportError
    with pytest.raises(ImportError) as info:
        rdb.with_self_healing(service=service, validate=dict[str, frozenset[complex]])
    assert str(info.value) == (
        "validate=dict[str, frozenset[complex]] is a type, which is checked with Pydantic's "
        "TypeAdapter: pip install 'pydantic>=2.10' (or pass a callable)"
    )


@pytest.mark.parametrize("how", ["config", "environment"])
def test_switched_off_by_the_setting(
    engine: sa.Engine, service: str, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if how == "config":
        Session = rdb.ResilientSession(
            engine, service=service, config=rdb.Config(response_validation=False)
        )
        config: rdb.Config | None = rdb.Config(response_validation=False)
    else:
        monkeypatch.setenv("SELF_HEALING_RESPONSE_VALIDATION", "false")
        rdb.reload_config()
        Session = rdb.ResilientSession(engine, service=service)
        config = None
    try:
        invalid = Session.run(lambda s: {"id": "not-a-number"}, validate=ItemOut)
        assert invalid == {"id": "not-a-number"}
        assert rdb.with_self_healing(lambda: 5, validate=lambda v: False, config=config) == 5
        checked = rdb.with_self_healing(service=service, validate=ItemOut, config=config)
        assert checked(lambda: "nothing like an item")() == "nothing like an item"
        # back on: the same factory validates again
        if how == "environment":
            monkeypatch.setenv("SELF_HEALING_RESPONSE_VALIDATION", "true")
            rdb.reload_config()
            with pytest.raises(rdb.ResponseValidationError):
                Session.run(lambda s: {"id": "not-a-number"}, validate=ItemOut)
    finally:
        monkeypatch.delenv("SELF_HEALING_RESPONSE_VALIDATION", raising=False)
        rdb.reload_config()


def test_transactional_run_in_and_nested_units_validate(engine: sa.Engine, service: str) -> None:
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config())

    @Session.transactional(validate=ItemOut)
    def create(session: Session, name: str) -> dict[str, Any]:
        return add_item(session, name)

    assert create("t1")["name"] == "t1"
    with pytest.raises(rdb.ResponseValidationError):
        create("hidden-t2")

    with Session() as session:
        assert Session.run_in(session, add_item, "r1", validate=ItemOut)["name"] == "r1"
        with pytest.raises(rdb.ResponseValidationError):
            Session.run_in(session, add_item, "hidden-r2", validate=ItemOut)

    def outer(session: Session) -> str:
        Session.run(add_item, "n1", validate=ItemOut)  # joins, checked at once
        return "done"

    def outer_bad(session: Session) -> str:
        Session.run(add_item, "n2")
        Session.run(add_item, "hidden-n3", validate=ItemOut)
        return "never"

    assert Session.run(outer) == "done"
    with pytest.raises(rdb.ResponseValidationError):
        Session.run(outer_bad)  # the whole outer unit rolls back: n2 is gone too
    with Session() as session:
        names = set(session.scalars(sa.select(Item.name)))
    assert names == {"t1", "r1", "n1"}


def test_a_unit_keyword_named_validate_is_never_forwarded(engine: sa.Engine, service: str) -> None:
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    seen: list[dict[str, Any]] = []

    def unit(session: Session, **kwargs: Any) -> int:
        seen.append(kwargs)
        return 1

    assert Session.run(unit, validate=lambda v: v == 1, other=2) == 1
    assert seen == [{"other": 2}]


def test_a_bad_validator_is_refused_where_it_is_written(engine: sa.Engine, service: str) -> None:
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    with pytest.raises(TypeError, match="validate= needs a Pydantic model class"):
        Session.run(lambda s: 1, validate=42)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"validate='ItemOut' is a string: give the class"):
        Session.transactional(validate="ItemOut")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="validate= needs"):
        rdb.with_self_healing(service=service, validate=3.5)  # type: ignore[arg-type]


# -- the reason never quotes the result ------------------------------------------------------------
class Account(BaseModel):
    email: str

    @field_validator("email")
    @classmethod
    def company_address(cls, value: str) -> str:
        if not value.endswith("@corp.example"):
            raise ValueError(f"{value!r} is not a company address")  # an ordinary validator
        return value


class Card(BaseModel):
    kind: Literal["card"]
    number: str


class Transfer(BaseModel):
    kind: Literal["transfer"]
    iban: str


class Payment(BaseModel):
    method: Annotated[Card | Transfer, Field(discriminator="kind")]


class Ref(BaseModel):
    id: uuid.UUID


class Coded(BaseModel):
    code: int

    @field_validator("code")
    @classmethod
    def known(cls, value: int) -> int:
        # a custom error reusing the name of one of Pydantic's own kinds, its text the value's
        raise PydanticCustomError("missing", f"no code {SECRET}")


class Sealed:
    """An ORM-like row whose attribute fails with a message quoting the data."""

    @property
    def email(self) -> str:
        raise RuntimeError(f"cannot decrypt {SECRET}")


class ReasonCase(NamedTuple):
    validator: Any
    result: Any  # an invalid result
    reason: str  # its whole reason


@pytest.mark.parametrize(
    "case",
    [
        ReasonCase(Account, {"email": SECRET}, "email: [value_error]"),
        ReasonCase(
            Payment, {"method": {"kind": SECRET, "number": "4111"}}, "method: [union_tag_invalid]"
        ),
        ReasonCase(Ref, {"id": f"1234-{SECRET}"}, "id: [uuid_parsing]"),  # "found `s` at 6"
        ReasonCase(Account, Sealed(), "email: [get_attribute_error]"),
        ReasonCase(Coded, {"code": 1}, "code: [missing]"),
        # kinds whose message is fixed or the schema's own: shown
        ReasonCase(
            Ref, {"id": 5}, "id: UUID input should be a string, bytes or UUID object [uuid_type]"
        ),
        ReasonCase(
            Card, {"kind": SECRET, "number": "1"}, "kind: Input should be 'card' [literal_error]"
        ),
    ],
    ids=["value_error", "union_tag", "uuid_parsing", "attribute", "custom", "uuid_type", "literal"],
)
def test_the_reason_shows_pydantic_messages_only_where_they_cannot_quote_the_result(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture, case: ReasonCase
) -> None:
    """Pydantic's message quotes the value for some kinds (a field validator's own
    ``ValueError``, a discriminator's tag, a parser's complaint, an attribute's exception): for
    those the reason and the ``[SELF-HEAL]`` line give the location and the kind only."""
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    with (
        caplog.at_level(logging.WARNING, logger="resilient_db"),
        pytest.raises(rdb.ResponseValidationError) as info,
    ):
        Session.run(
            lambda s: (s.execute(sa.text("SELECT 1")), case.result)[1], validate=case.validator
        )
    reason = case.reason
    assert info.value.reason == reason
    (line,) = [r.getMessage() for r in caplog.records if "validation failed" in r.getMessage()]
    assert line.endswith(f": {reason}")
    assert SECRET not in caplog.text
    assert SECRET not in str(info.value)


def test_every_message_shown_is_a_template_of_the_schema_only() -> None:
    """The kinds whose message is shown: each template's every placeholder is a value of the
    validator's schema (a bound, a class name, a pattern, expected values), none of the result
    (checked against the installed pydantic-core's templates)."""
    from pydantic_core import PydanticKnownError  # noqa: PLC0415

    from resilient_db import _validation  # noqa: PLC0415

    context: dict[str, Any] = dict.fromkeys(_validation._SCHEMA_CONTEXT, "x")
    context.update(gt=1, ge=1, lt=1, le=1, multiple_of=1, max_length=1, min_length=1)
    context.update(max_digits=1, decimal_places=1, whole_digits=1, expected_version=1)
    for kind in sorted(_validation._SHOWN_MESSAGES):
        try:
            template = PydanticKnownError(kind, context).message_template
        except KeyError:  # a kind a later pydantic-core added (counter_type): none raised here
            continue
        placeholders = set(re.findall(r"\{(\w+)\}", template)) - {"expected_plural"}
        assert placeholders <= _validation._SCHEMA_CONTEXT, (kind, template)
    quoting = {"value_error", "assertion_error", "get_attribute_error", "union_tag_invalid"}
    quoting |= {"uuid_parsing", "date_parsing", "too_short", "too_long", "timezone_offset"}
    assert not quoting & _validation._SHOWN_MESSAGES


# -- every kind of type is checked as a type -------------------------------------------------------
class ItemDict(TypedDict):
    id: int
    name: str


@dataclasses.dataclass
class ItemData:
    id: int
    name: str


@pydantic.dataclasses.dataclass
class ItemPydanticData:
    id: int
    name: str


class ItemPair(NamedTuple):
    id: int
    name: str


class Colour(enum.Enum):
    RED = "red"


ItemId = NewType("ItemId", int)
Names = TypeAliasType("Names", list[str])

INT_PARSING = "Input should be a valid integer, unable to parse string as an integer [int_parsing]"


class TypeCase(NamedTuple):
    form: Any
    valid: Any  # a valid result
    invalid: Any  # an invalid result
    reason: str  # a part of its reason


@pytest.mark.parametrize(
    "case",
    [
        TypeCase(int, 5, "five", f"(root): {INT_PARSING}"),
        TypeCase(str, "x", 12345, "(root): Input should be a valid string [string_type]"),
        TypeCase(list, [1], "abc", "(root): Input should be a valid list [list_type]"),
        TypeCase(dict, {"a": 1}, [("a", 1)], "(root): Input should be a valid dictionary"),
        TypeCase(ItemDict, {"id": 1, "name": "n"}, {"id": "x", "name": "n"}, f"id: {INT_PARSING}"),
        TypeCase(ItemData, ItemData(1, "n"), {"id": 1}, "name: Field required [missing]"),
        TypeCase(ItemData, {"id": 1, "name": "n"}, "abc", "(root): Input should be a dictionary"),
        TypeCase(ItemPydanticData, ItemPydanticData(id=1, name="n"), {"id": "x"}, "id: "),
        TypeCase(ItemPair, ItemPair(1, "n"), ("x", "n"), "[int_parsing]"),
        TypeCase(Colour, Colour.RED, "blue", "(root): Input should be 'red' [enum]"),
        TypeCase(Colour, "red", 1, "[enum]"),
        TypeCase(ItemId, 7, "seven", f"(root): {INT_PARSING}"),
        TypeCase(Names, ["a"], [1], "0: Input should be a valid string [string_type]"),
        TypeCase(Any, object(), None, ""),
    ],
    ids=[
        "int", "str", "list", "dict", "TypedDict", "dataclass", "dataclass-dict",
        "pydantic-dataclass", "NamedTuple", "enum", "enum-value", "NewType", "TypeAliasType", "Any",
    ],
)  # fmt: skip
def test_a_class_or_typing_form_is_checked_as_a_type_not_called(
    engine: sa.Engine, service: str, case: TypeCase
) -> None:
    """``int``, ``dict``, a TypedDict, a dataclass, a NamedTuple, an enum, ``NewType``,
    ``TypeAliasType``, ``Any``: checked by a ``TypeAdapter``, not called (``int("12")``
    converts, ``str(x)`` accepts anything, a TypedDict accepts any dict, a dataclass refuses
    its own instance)."""
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config())

    def returning(value: Any) -> Callable[[Session], Any]:
        def unit(session: Session) -> Any:
            session.execute(sa.text("SELECT 1"))
            return value

        return unit

    assert Session.run(returning(case.valid), validate=case.form) is case.valid
    if case.form is Any:
        return
    with pytest.raises(rdb.ResponseValidationError) as info:
        Session.run(returning(case.invalid), validate=case.form)
    assert info.value.validator.startswith("TypeAdapter(")
    assert case.reason in info.value.reason


def test_an_orm_class_or_a_type_pydantic_cannot_check_is_refused_where_it_is_written(
    engine: sa.Engine, service: str
) -> None:
    """The ORM class for its Pydantic schema (a likely slip): a ``TypeError`` naming the form
    when ``validate=`` is given, validation on or off; no unit runs, nothing is counted."""
    calls: list[int] = []

    def unit(session: Session) -> list[Item]:
        calls.append(1)
        return all_items(session)

    for config in (rdb.Config(), rdb.Config(response_validation=False)):
        Session = rdb.ResilientSession(engine, service=service, config=config)
        with pytest.raises(TypeError, match=r"^validate=Item: Pydantic can't check this type"):
            Session.run(unit, validate=Item)
        with pytest.raises(TypeError, match=r"^validate=list\[scenarios\.Item\]: Pydantic can't"):
            Session.run(unit, validate=list[Item])
        with pytest.raises(TypeError, match=r"^validate=Item: "):
            Session.transactional(validate=Item)
        with pytest.raises(TypeError, match=r"^validate=list\[scenarios\.Item\]: "):
            rdb.with_self_healing(list, service=service, config=config, validate=list[Item])
    assert calls == []
    failures = rdb.health()["services"].get(service, {}).get("counters", {})
    assert failures.get("response_validation_failures", 0) == 0


Config = ItemOut  # a name this module gives one of its models, and resilient_db its own class


class Pending(BaseModel):
    item: Undefined  # noqa: F821 - never defined


@pytest.mark.parametrize(
    "form",
    [list["ItemOut"], Optional["ItemOut"], dict[str, list["ItemOut"]], list["Config"]],
    ids=["list", "Optional", "nested", "a name of resilient_db's"],
)
def test_a_type_naming_a_class_by_a_string_is_refused_where_it_is_written(
    engine: sa.Engine, service: str, form: Any
) -> None:
    """``list["ItemOut"]``: the string would be looked up in resilient_db's namespace, not
    here: not found (every result refused) or found and wrong (``"Config"``)."""
    name = "Config" if "Config" in repr(form) else "ItemOut"
    refused = rf"names the class '{name}' by a string.*give the class itself \({name}, not"
    for config in (rdb.Config(), rdb.Config(response_validation=False)):
        Session = rdb.ResilientSession(engine, service=service, config=config)
        with pytest.raises(TypeError, match=refused):
            Session.run(lambda s: [], validate=form)
        with pytest.raises(TypeError, match=refused):
            Session.transactional(validate=form)
        with pytest.raises(TypeError, match=refused):
            rdb.with_self_healing(service=service, config=config, validate=form)


def test_a_type_not_fully_defined_is_refused_where_it_is_written(service: str) -> None:
    with pytest.raises(TypeError, match=r"^validate=list\[.*Pending\] is not fully defined"):
        rdb.with_self_healing(service=service, validate=list[Pending])


def test_an_iterator_result_is_refused_while_a_check_is_on(engine: sa.Engine, service: str) -> None:
    """Checking an iterator consumes it (the caller got it empty with validation on, full with
    it off): refused with ``TypeError`` while a check would run, the unit rolled back; with
    validation off the same object comes back untouched, as without ``validate=``."""

    def rows(session: Session) -> Iterator[dict[str, Any]]:
        add_item(session, "written")
        found = session.execute(sa.select(Item.id, Item.name)).all()
        # (a generator is refused whatever the check: its code would run after the commit)
        return iter([{"id": i, "name": n} for i, n in found])

    def every_id_positive(value: Any) -> bool:
        return all(row["id"] > 0 for row in value)

    refused = r"is an iterator \(list_iterator\).*without consuming it.*Return a list"
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    for validator in (list[ItemOut], every_id_positive):
        with pytest.raises(TypeError, match=refused):
            Session.run(rows, validate=validator)
    assert count_items(engine) == 0  # rolled back
    with pytest.raises(TypeError, match=r"is an iterator \(list_iterator\)"):
        rdb.with_self_healing(lambda: iter([1, 2]), service=service, validate=list[int])
    counters = rdb.health()["services"][service]["counters"]
    assert counters["response_validation_failures"] == 0  # a usage error, not a bad result
    off = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(response_validation=False)
    )
    assert [row["name"] for row in off.run(rows, validate=list[ItemOut])] == ["written"]
    plain = rdb.with_self_healing(
        lambda: iter([1, 2]), service=service, validate=list[int], config=rdb.Config(enabled=False)
    )
    assert list(plain) == [1, 2]


async def positive_id(value: Any) -> bool:
    return bool(value["id"] > 0)


class AsyncCheck:
    async def __call__(self, value: Any) -> bool:
        return False


@pytest.mark.parametrize(
    "validator",
    [positive_id, AsyncCheck(), functools.partial(positive_id)],
    ids=["async def", "async __call__", "partial"],
)
def test_an_async_validator_is_refused_where_it_is_written(
    engine: sa.Engine, service: str, validator: Any
) -> None:
    """Its coroutine was never awaited, and a coroutine is not ``False``: every result passed."""
    for config in (rdb.Config(), rdb.Config(response_validation=False)):
        Session = rdb.ResilientSession(engine, service=service, config=config)
        with pytest.raises(TypeError, match=r"is an async function: .*give a plain function"):
            Session.run(add_item, "a", validate=validator)
        with pytest.raises(TypeError, match="is an async function"):
            Session.transactional(validate=validator)
        with pytest.raises(TypeError, match="is an async function"):
            rdb.with_self_healing(lambda: {"id": -1}, service=service, validate=validator)
    assert count_items(engine) == 0


def checks_later(value: Any) -> Any:
    """Not declared async: what it returns is a coroutine all the same."""
    return positive_id(value)


def test_a_validator_returning_an_awaitable_is_an_error_not_a_pass(
    engine: sa.Engine, service: str
) -> None:
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match=r"returned coroutine, an awaitable"):
            Session.run(add_item, "a", validate=checks_later)
        gc.collect()
    assert count_items(engine) == 0  # rolled back
    assert not [w for w in caught if "never awaited" in str(w.message)]  # closed, not dropped


@pytest.mark.parametrize("config", [{"response_validation": False}, {"enabled": False}], ids=str)
def test_run_and_run_in_refuse_a_bad_validator_with_validation_off_too(
    engine: sa.Engine, service: str, config: dict[str, bool]
) -> None:
    """As ``transactional`` and ``with_self_healing`` do: the error shows where it is written,
    not only in production where the setting is on."""
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config(**config))
    with pytest.raises(TypeError, match="validate= needs a Pydantic model class"):
        Session.run(lambda s: 1, validate=42)  # type: ignore[call-overload]
    with Session() as session, pytest.raises(TypeError, match="validate= needs"):
        Session.run_in(session, lambda s: 1, validate=42)  # type: ignore[call-overload]
    assert Session.run(lambda s: {"id": "x"}, validate=ItemOut) == {"id": "x"}  # not checked


def test_the_call_form_of_transactional_validates(engine: sa.Engine, service: str) -> None:
    """``Session.transactional(fn, validate=...)``, written like ``with_self_healing(fn,
    validate=...)``, dropped ``validate``."""
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    create = Session.transactional(add_item, validate=ItemOut)
    assert create("c1")["name"] == "c1"
    with pytest.raises(rdb.ResponseValidationError):
        create("hidden-c2")
    with pytest.raises(TypeError, match="validate= needs"):
        Session.transactional(add_item, validate=42)  # type: ignore[call-overload]
    with Session() as session:
        assert set(session.scalars(sa.select(Item.name))) == {"c1"}


NonEmptyItems = Annotated[list[ItemOut], Field(min_length=1)]  # defined once: cached


def row_model(id_type: type) -> type[BaseModel]:
    class Row(BaseModel):
        id: id_type  # type: ignore[valid-type]

    return Row


def test_a_type_defined_once_is_built_once_and_the_cache_is_bounded(service: str) -> None:
    from resilient_db import _validation  # noqa: PLC0415

    _validation._cached_adapter.cache_clear()
    for _ in range(3):
        rdb.with_self_healing(lambda: [{"id": 1, "name": "n"}], validate=NonEmptyItems)
    info = _validation._cached_adapter.cache_info()
    assert (info.misses, info.hits) == (1, 2)
    # written inline, Field(...) (compared by identity) makes a new form each time: each one
    # is built, and the cache keeps at most its bound
    for _ in range(info.maxsize + 10):
        _validation.response_check(Annotated[int, Field(gt=0)])
    assert _validation._cached_adapter.cache_info().currsize == info.maxsize == 256
    # two classes with one repr are two forms: never one adapter for both
    by_int, by_str = row_model(int), row_model(str)
    assert repr(list[by_int]) == repr(list[by_str])
    rdb.with_self_healing(lambda: [{"id": 1}], service=service, validate=list[by_int])
    with pytest.raises(rdb.ResponseValidationError):
        rdb.with_self_healing(lambda: [{"id": 1}], service=service, validate=list[by_str])


def test_a_nested_unit_whose_error_is_caught_keeps_what_it_wrote(
    engine: sa.Engine, service: str
) -> None:
    """A nested unit joins the outer unit's transaction, with no savepoint of its own: if the
    outer unit catches its ``ResponseValidationError`` and commits, what the nested unit wrote
    is committed. ``session.begin_nested()`` around the call discards it."""
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config())

    def outer(session: Session, name: str, savepoint: bool) -> str:
        try:
            if savepoint:
                with session.begin_nested():
                    Session.run(add_item, name, validate=ItemOut)
            else:
                Session.run(add_item, name, validate=ItemOut)
        except rdb.ResponseValidationError:
            return "fell back"
        return "checked"

    assert Session.run(outer, "hidden-kept", False) == "fell back"
    assert Session.run(outer, "hidden-discarded", True) == "fell back"
    with Session() as session:
        assert set(session.scalars(sa.select(Item.name))) == {"hidden-kept"}


@pytest.mark.asyncio
async def test_async_units_validate(aengine: AsyncEngine, engine: sa.Engine, service: str) -> None:
    Session = rdb.AsyncResilientSession(aengine, service=service, config=rdb.Config())
    calls: list[int] = []

    async def create(session: AsyncSession, name: str) -> dict[str, Any]:
        calls.append(1)
        item = Item(name=name)
        session.add(item)
        await session.flush()
        return {"id": item.id, "name": item.name}

    assert (await Session.run(create, "async-ok", validate=ItemOut))["name"] == "async-ok"
    with pytest.raises(rdb.ResponseValidationError):
        await Session.run(create, "hidden-async", validate=ItemOut)
    assert calls == [1, 1]
    assert count_items(engine) == 1

    @Session.transactional(validate=lambda v: v["id"] > 0)
    async def create_checked(session: AsyncSession, name: str) -> dict[str, Any]:
        return await create(session, name)

    assert (await create_checked("async-2"))["name"] == "async-2"


class LazyBase(DeclarativeBase):
    pass


class Owner(LazyBase):
    __tablename__ = "owners"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


class Job(LazyBase):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(sa.ForeignKey("owners.id"))
    owner: Mapped[Owner] = relationship()  # lazy: loaded when first read


class OwnerOut(BaseModel):
    name: str


class JobOut(BaseModel):
    id: int
    owner: OwnerOut


@pytest.mark.asyncio
async def test_an_async_unit_checks_an_unloaded_relationship_as_the_sync_one_does(
    aengine: AsyncEngine, engine: sa.Engine, service: str
) -> None:
    """Checking an ORM row reads its attributes: a relationship not loaded yet is loaded then.
    A sync unit loads it; an async unit's check failed with ``MissingGreenlet`` (counted as an
    invalid result) until it ran in the session's ``run_sync``."""
    LazyBase.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(Owner).values(id=1, name="owner"))
        conn.execute(sa.insert(Job).values(id=1, owner_id=1))
    options: dict[str, Any] = {"config": rdb.Config(), "expire_on_commit": False}
    Sync = rdb.ResilientSession(engine, service=service, **options)
    assert Sync.run(lambda s: s.get(Job, 1), validate=JobOut).owner.name == "owner"
    Async = rdb.AsyncResilientSession(aengine, service=service, **options)

    async def job(session: AsyncSession) -> Job | None:
        return await session.get(Job, 1)

    found = await Async.run(job, validate=JobOut)
    assert found is not None
    assert found.owner.name == "owner"  # loaded by the check, in the unit
    async with Async() as session:
        assert (await Async.run_in(session, job, validate=list[JobOut] | JobOut)) is not None
    counters = rdb.health()["services"][service]["counters"]
    assert counters["response_validation_failures"] == 0

    async def outer(session: AsyncSession) -> Job | None:
        return await Async.run(job, validate=JobOut)  # nested: joins, checked in the unit

    assert (await Async.run(outer)) is not None


@pytest.mark.asyncio
async def test_async_call_form_of_transactional_validates_and_refuses_iterators(
    aengine: AsyncEngine, engine: sa.Engine, service: str
) -> None:
    Session = rdb.AsyncResilientSession(aengine, service=service, config=rdb.Config())

    async def create(session: AsyncSession, name: str) -> dict[str, Any]:
        item = Item(name=name)
        session.add(item)
        await session.flush()
        return {"id": item.id, "name": item.name}

    checked = Session.transactional(create, validate=ItemOut)
    assert (await checked("a1"))["name"] == "a1"
    with pytest.raises(rdb.ResponseValidationError):
        await checked("hidden-a2")
    with pytest.raises(TypeError, match="validate= needs"):
        Session.transactional(create, validate=42)  # type: ignore[call-overload]

    async def rows(session: AsyncSession) -> Iterator[str]:
        await create(session, "a3")
        return iter((await session.scalars(sa.select(Item.name))).all())

    with pytest.raises(TypeError, match=r"is an iterator \(list_iterator\).*Return a list"):
        await Session.run(rows, validate=list[str])
    assert count_items(engine) == 1  # a1 only


# -- with_self_healing: call and decorator forms ---------------------------------------------------
def test_decorator_retries_a_sync_function_like_the_call_form(
    engine: sa.Engine, service: str
) -> None:
    calls: list[int] = []

    @rdb.with_self_healing(service=service, config=rdb.Config(), validate=ItemOut)
    def create(name: str, *, fail_first: bool = True) -> dict[str, Any]:
        """Docstring kept."""
        calls.append(1)
        with Session(engine) as session, session.begin():
            if fail_first and len(calls) == 1:
                session.execute(sa.text("SELECT raise_code('40P01')"))  # a real deadlock code
            return add_item(session, name)

    assert create.__name__ == "create"
    assert create.__doc__ == "Docstring kept."
    assert create("deco")["name"] == "deco"
    assert calls == [1, 1]  # retried once after the deadlock
    assert rdb.health()["services"][service]["counters"]["recovered"] == 1
    calls.clear()
    with pytest.raises(rdb.ResponseValidationError):
        create("hidden-deco", fail_first=False)
    assert calls == [1]
    assert count_items(engine) == 2  # the operation committed itself; its result was refused


@pytest.mark.asyncio
async def test_decorator_on_an_async_function_keeps_it_a_coroutine_function(
    aengine: AsyncEngine, service: str
) -> None:
    calls: list[int] = []

    @rdb.with_self_healing(service=service, config=rdb.Config(failure_threshold=2))
    async def handler(code: str) -> int:
        calls.append(1)
        async with AsyncSession(aengine) as session:
            await session.execute(sa.text("SELECT raise_code(:c)"), {"c": code})
        return 1

    assert inspect.iscoroutinefunction(handler)
    assert list(inspect.signature(handler).parameters) == ["code"]
    with pytest.raises(sa.exc.DBAPIError):
        await handler("22012")  # division by zero: not transient, raised at once
    assert len(calls) == 1
    with pytest.raises(rdb.CircuitOpenError):
        await handler("57P03")  # unavailable: retried, the second failure opens the breaker
    assert len(calls) == 3
    with pytest.raises(rdb.CircuitOpenError) as info:
        await handler("57P03")
    assert info.value.service == service
    assert len(calls) == 3  # rejected without a call


class ItemMaker:
    """An operation as an object with an async ``__call__``: nothing declares it a coroutine
    function, but calling it gives a coroutine."""

    def __init__(self, aengine: AsyncEngine, calls: list[str]) -> None:
        self.aengine = aengine
        self.calls = calls

    async def __call__(self, name: str = "made") -> dict[str, Any]:
        self.calls.append(name)
        async with AsyncSession(self.aengine) as session, session.begin():
            if len(self.calls) == 1:  # the first attempt meets a server that is not ready
                await session.execute(sa.text("SELECT raise_code('57P03')"))
            item = Item(name=name)
            session.add(item)
            await session.flush()
            return {"id": item.id, "name": name}


@pytest.mark.asyncio
@pytest.mark.parametrize("form", ["lambda", "async __call__"])
async def test_a_callable_giving_an_awaitable_is_retried_and_validated_on_what_it_gives(
    aengine: AsyncEngine, engine: sa.Engine, service: str, form: str
) -> None:
    """The plan's ``withSelfHealing(() => repo.get(1))``: ``lambda: make()`` is no coroutine
    function, nor is an object with an async ``__call__``; the coroutine they return is the
    operation, awaited in the first attempt (never a second call for it), retried by calling
    again, validated once awaited."""
    calls: list[str] = []
    make = ItemMaker(aengine, calls)
    fn = make if form == "async __call__" else (lambda: make("made"))
    result = await rdb.with_self_healing(fn, service=service, config=rdb.Config(), validate=ItemOut)
    assert result["name"] == "made"
    assert calls == ["made", "made"]  # the refused first attempt, and one retry
    counters = rdb.health()["services"][service]["counters"]
    assert counters["attempts"] == 2
    assert counters["recovered"] == 1
    assert count_items(engine) == 1
    with pytest.raises(rdb.ResponseValidationError):  # checked on the result, not the coroutine
        await rdb.with_self_healing(
            lambda: make("hidden-made"), service=service, config=rdb.Config(), validate=ItemOut
        )
    assert calls[2:] == ["hidden-made"]  # not retried


@pytest.mark.asyncio
async def test_decorating_an_object_with_an_async_call_gives_a_coroutine_function(
    aengine: AsyncEngine, service: str
) -> None:
    calls: list[str] = []
    handler = rdb.with_self_healing(service=service, config=rdb.Config())(ItemMaker(aengine, calls))
    assert inspect.iscoroutinefunction(handler)  # what FastAPI looks at
    assert list(inspect.signature(handler).parameters) == ["name"]
    assert (await handler("deco"))["name"] == "deco"
    assert calls == ["deco", "deco"]


def test_decorator_needs_a_service_name() -> None:
    """As a factory does: not a str is a TypeError, an empty name a ValueError."""
    with pytest.raises(ValueError, match="with_self_healing needs a service name"):
        rdb.with_self_healing(service="")
    with pytest.raises(TypeError, match="with_self_healing needs a service name"):
        rdb.with_self_healing(service=None)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_async_iterators_are_refused_as_iterators(
    aengine: AsyncEngine, engine: sa.Engine, service: str
) -> None:
    """An async unit's ``AsyncResult`` (``session.stream``), ``AsyncScalarResult`` or async
    generator passed the iterator refusal (it looked for sync iterators only): a ``list[...]``
    check failed it as an invalid response (counted, logged), a callable one returned it, dead
    once the unit's session closed. Refused with ``TypeError`` now, as a sync ``Result`` is."""
    Session = rdb.AsyncResilientSession(aengine, service=service, config=rdb.Config())

    async def streamed(session: AsyncSession) -> Any:
        return await session.stream_scalars(sa.select(sa.literal(1)))

    async def generated(session: AsyncSession) -> Any:
        async def rows() -> AsyncIterator[int]:
            yield 1

        return rows()

    async def in_a_dict(session: AsyncSession) -> Any:
        return {"rows": await session.stream(sa.select(sa.literal(1)))}

    for unit, refusal in (
        # (refused as any async unit's streamed result is, validated or not)
        (streamed, r"returned AsyncScalarResult, whose rows come from a server-side cursor"),
        # (refused as any async unit's async generator is, validated or not)
        (generated, r"returned an async generator \(.*rows\).*return a list"),
    ):
        for validator in (list[int], lambda value: True):
            with pytest.raises(TypeError, match=refusal):
                await Session.run(unit, validate=validator)
    with pytest.raises(TypeError, match=r"holds an iterator \(AsyncResult\) at "):
        await Session.run(in_a_dict, validate=dict[str, Any])
    counters = rdb.health()["services"][service]["counters"]
    assert counters["response_validation_failures"] == 0  # a usage error, not a bad result


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int


class Dog(BaseModel):
    kind: Literal["dog"]
    bark: bool


class TaggedPet(BaseModel):
    pet: Annotated[Cat | Dog, Field(discriminator="kind")]


class AnyPet(BaseModel):
    pet: Cat | Dog


class TreeNode(BaseModel):
    value: int
    children: list[TreeNode] = []


class ByAlias(BaseModel):
    item_id: int = Field(alias="itemId")


class ByChoices(BaseModel):
    item_id: int = Field(validation_alias=pydantic.AliasChoices("itemId", "id"))


class WithExtras(BaseModel):
    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, int] = Field(init=False)
    name: str


class Pairs(BaseModel):
    pair: tuple[int, str]
    many: tuple[int, ...] = ()


@pytest.mark.parametrize(
    ("model", "result", "reason"),
    [
        (
            TaggedPet,
            {"pet": {"kind": "cat", "lives": SECRET}},
            "pet.cat.lives: Input should be a valid integer, unable to parse string as an "
            "integer [int_parsing]",
        ),
        (TaggedPet, {"pet": {"kind": SECRET, "lives": 1}}, "pet: [union_tag_invalid]"),
        (
            AnyPet,
            {"pet": {"kind": "cat", "lives": SECRET}},
            "pet.Cat.lives: Input should be a valid integer, unable to parse string as an "
            "integer [int_parsing]; pet.Dog.kind: Input should be 'dog' [literal_error]; "
            "pet.Dog.bark: Field required [missing]",
        ),
        (
            TreeNode,
            {"value": 1, "children": [{"value": 2, "children": [{"value": SECRET}]}]},
            "children.0.children.0.value: Input should be a valid integer, unable to parse "
            "string as an integer [int_parsing]",
        ),
        (
            ByAlias,
            {"itemId": SECRET},
            "itemId: Input should be a valid integer, unable to parse string as an integer "
            "[int_parsing]",
        ),
        (
            ByChoices,
            {"id": SECRET},
            "id: Input should be a valid integer, unable to parse string as an integer "
            "[int_parsing]",
        ),
        (
            WithExtras,
            {"name": "n", SECRET: "x"},
            "<key>: Input should be a valid integer, unable to parse string as an integer "
            "[int_parsing]",
        ),
        (
            Pairs,
            {"pair": [1, SECRET, 3], "many": [1, SECRET]},
            "pair: [too_long]; many.1: Input should be a valid integer, unable to parse string "
            "as an integer [int_parsing]",
        ),
    ],
    ids=[
        "discriminated union",
        "unknown tag",
        "union",
        "recursive model",
        "alias",
        "alias choices",
        "extra key",
        "tuples",
    ],
)
def test_a_logged_location_through_unions_references_aliases_extras_and_tuples(
    engine: sa.Engine,
    service: str,
    caplog: pytest.LogCaptureFixture,
    *,
    model: type[BaseModel],
    result: dict[str, Any],
    reason: str,
) -> None:
    """The location follows the model's schema through a union (its member's tag or class
    name), a recursive model, a field's alias (the name the result uses), a tuple's items;
    an extra key of the result is ``<key>``. No value of the result is shown."""
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    with (
        caplog.at_level(logging.WARNING, logger="resilient_db"),
        pytest.raises(rdb.ResponseValidationError) as info,
    ):
        Session.run(lambda s: result, validate=model)
    assert info.value.reason == reason
    (line,) = [r.getMessage() for r in caplog.records if "validation failed" in r.getMessage()]
    assert line.endswith(reason)
    assert SECRET not in caplog.text


def test_a_reason_lists_the_first_errors_and_counts_the_rest(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A result with many invalid rows: the reason (and the line) lists the first errors by
    location and counts the others, however many (the line stays short)."""
    Session = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    rows = [{"id": SECRET, "name": "n"} for _ in range(40)]
    with (
        caplog.at_level(logging.WARNING, logger="resilient_db"),
        pytest.raises(rdb.ResponseValidationError) as info,
    ):
        Session.run(lambda s: rows, validate=list[ItemOut])
    parts = info.value.reason.split("; ")
    shown = len(parts) - 1
    assert parts[-1] == f"and {40 - shown} more error(s)"
    assert parts[:shown] == [
        f"{n}.id: Input should be a valid integer, unable to parse string as an integer "
        "[int_parsing]"
        for n in range(shown)
    ]
    (line,) = [r.getMessage() for r in caplog.records if "validation failed" in r.getMessage()]
    assert line.endswith(info.value.reason)
    assert SECRET not in caplog.text
