"""The row key of a move the transition trigger refused, as ``IllegalTransitionError.pk`` gives
it: in the key column's Python type, as the flush guard gives it and as ``session.get()``
takes it, whatever JSON made of it in the trigger's detail: a ``NUMERIC(10)`` key (written
``5``, a JSON integer) as a ``Decimal``, a ``float8`` key (``2.5``, read as a JSON decimal) as
a ``float``, and a key of a type without a Python type as the detail gives it. Real server,
real trigger."""

from __future__ import annotations

import decimal
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import metadata_engine, refused_by_trigger
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import resilient_db as rdb

RULES = {"transitions": {"open": {"closed"}}, "initial": {"open"}}


class Base(DeclarativeBase):
    pass


class ByNumeric(Base):
    __tablename__ = "keys_numeric"
    __transitions__ = rdb.TransitionRules(column="status", **RULES)  # type: ignore[arg-type]
    id: Mapped[decimal.Decimal] = mapped_column(
        sa.Numeric(10), primary_key=True, autoincrement=False
    )
    status: Mapped[str] = mapped_column(sa.String(20))


class ByFloat(Base):
    __tablename__ = "keys_float"
    __transitions__ = rdb.TransitionRules(column="status", **RULES)  # type: ignore[arg-type]
    id: Mapped[float] = mapped_column(sa.Double, primary_key=True, autoincrement=False)
    status: Mapped[str] = mapped_column(sa.String(20))


class Untyped(sa.types.UserDefinedType[Any]):
    """A key column whose type names no Python type (``python_type`` not implemented)."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "integer"

    @property
    def python_type(self) -> type[Any]:
        # (UserDefinedType's own answers ``object``; a type of a library that implements none
        # raises, as TypeEngine's does)
        raise NotImplementedError


class ByUntyped(Base):
    __tablename__ = "keys_untyped"
    __transitions__ = rdb.TransitionRules(column="status", **RULES)  # type: ignore[arg-type]
    id: Mapped[Any] = mapped_column(Untyped, primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20))


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    for eng in metadata_engine(pg_url, Base):
        for model in (ByNumeric, ByFloat, ByUntyped):
            rdb.install_transition_trigger(eng, model)
        yield eng


@pytest.mark.parametrize(
    ("model", "key", "expected"),
    [
        (ByNumeric, "5", decimal.Decimal(5)),
        (ByFloat, "2.5", 2.5),
        (ByUntyped, "7", 7),
    ],
    ids=["numeric", "float8", "no python type"],
)
def test_the_key_of_a_refused_move_has_the_key_columns_type(
    engine: sa.Engine, service: str, model: type[Base], key: str, expected: object
) -> None:
    table = model.__tablename__
    with engine.begin() as conn:
        conn.exec_driver_sql(f"INSERT INTO {table} VALUES ({key}, 'open')")
        conn.exec_driver_sql(f"UPDATE {table} SET status = 'closed'")
    with engine.connect() as conn:
        err = refused_by_trigger(conn, f"UPDATE {table} SET status = 'open'")
    assert (err.via, err.from_state, err.to_state) == ("db", "closed", "open")
    assert err.pk == expected
    assert type(err.pk) is type(expected)
    # and a session of a factory gives the same key, which it takes back
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        with pytest.raises(rdb.IllegalTransitionError) as info:
            session.execute(sa.text(f"UPDATE {table} SET status = 'open'"))
        assert info.value.pk == expected
        session.rollback()
        assert session.get_one(model, info.value.pk).status == "closed"
