"""Response validation (``validate=``) against a real server: Pydantic models, type adapters and
callables; on and off by ``SELF_HEALING_RESPONSE_VALIDATION``; units rolled back, never retried;
the ``[SELF-HEAL]`` line names the reason and never the payload. Also the decorator form of
``with_self_healing`` (sync and async) with the same retry and breaker semantics."""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any, NamedTuple, Optional

import pytest
import pytest_asyncio
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator
from scenarios import RAISE_CODE_FUNCTION, Base, Item
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

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
    assert "name: Value error, hidden items are not served" in err.reason
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
            "(root): List should have at least 1 item",
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
    with pytest.raises(TypeError, match="validate= needs"):
        Session.transactional(validate="ItemOut")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="validate= needs"):
        rdb.with_self_healing(service=service, validate=3.5)  # type: ignore[arg-type]


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
    with pytest.raises(TypeError, match="service name"):
        rdb.with_self_healing(service="")
