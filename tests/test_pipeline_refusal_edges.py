"""Edges of a query libpq refuses on a psycopg connection left in pipeline mode
(``_classify.refused_in_pipeline``), on a real connection left so for real (a ``COPY`` in a
``pipeline()`` block): raised while handling a disconnect-class error answered on that sound
connection, it is that disconnect; with no earlier error, it is not transient."""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import resilient_db as rdb

_PIPELINE_OFF = 0
ADMIN_SHUTDOWN = "DO $$BEGIN RAISE EXCEPTION 'shut down' USING ERRCODE = '57P01'; END$$"


def _leave_in_pipeline_mode(raw: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.OperationalError), raw.pipeline():
        raw.execute("COPY (SELECT 1) TO STDOUT")
    assert raw.pgconn.pipeline_status != _PIPELINE_OFF
    assert not raw.closed


def _dsn(pg_url: str) -> str:
    return sa.make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)


def test_a_refusal_raised_while_handling_a_disconnect_is_the_disconnect(pg_url: str) -> None:
    with contextlib.closing(psycopg.connect(_dsn(pg_url))) as raw:
        refused: BaseException | None = None
        try:
            raw.execute(ADMIN_SHUTDOWN)
        except psycopg.errors.AdminShutdown:
            raw.rollback()
            _leave_in_pipeline_mode(raw)
            try:
                raw.rollback()  # refused by libpq, while the disconnect is handled
            except psycopg.Error as exc:
                refused = exc
        assert isinstance(refused, psycopg.OperationalError)
        assert refused.sqlstate is None
        assert isinstance(refused.__context__, psycopg.errors.AdminShutdown)
        assert rdb.classify(refused) is rdb.Outcome.DISCONNECT
        assert rdb.is_transient(refused)


def test_a_refusal_with_no_earlier_error_is_not_transient(pg_url: str) -> None:
    with contextlib.closing(psycopg.connect(_dsn(pg_url))) as raw:
        _leave_in_pipeline_mode(raw)
        with pytest.raises(psycopg.OperationalError) as refused:
            raw.rollback()
        assert refused.value.sqlstate is None
        assert rdb.classify(refused.value) is rdb.Outcome.NOT_TRANSIENT
        assert not rdb.is_transient(refused.value)
