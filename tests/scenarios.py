"""What the sync and async session tests share: the SQLSTATE tables, the model, the SQL."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import resilient_db as rdb

#: Codes raised through the real driver with RAISE ... USING ERRCODE, and their class.
TRANSIENT = {
    "40001": rdb.Outcome.CONFLICT,
    "40P01": rdb.Outcome.CONFLICT,
    "55P03": rdb.Outcome.CONFLICT,
    "57P03": rdb.Outcome.UNAVAILABLE,
    "53300": rdb.Outcome.UNAVAILABLE,
    "57P01": rdb.Outcome.DISCONNECT,
    "25006": rdb.Outcome.DISCONNECT,
    "08006": rdb.Outcome.DISCONNECT,
}
NOT_TRANSIENT = ["23505", "22012", "42P01", "P0001", "57014"]

#: ``SELECT raise_code('40001')`` raises exactly that SQLSTATE.
RAISE_CODE_FUNCTION = sa.text(
    "CREATE FUNCTION raise_code(code text) RETURNS void LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'raised %', code USING ERRCODE = code; END $$"
)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
