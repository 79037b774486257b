"""What a role that may create objects in a schema on another role's search_path (``public`` on
many databases) can plant there must never run inside resilient_db's own SQL: the transition
trigger (installed by an owner whose path has ``public`` on it) and the drift check (run by the
application at every startup, or by a superuser). Operators are what such a role plants: an
exact match in ``public`` wins over a built-in one that needs a coercion (``varchar = varchar``
has none built in; ``oid = regclass`` neither). Against the real server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import resilient_db as rdb
from resilient_db import _commit
from resilient_db.examples.tasks import Base, Task
from resilient_db.transitions._rules import guards_of
from resilient_db.transitions._sql import trigger_names


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    yield eng
    eng.dispose()


def plant(engine: sa.Engine, left: str, right: str, body: str) -> str:
    """``public.=(left, right)`` whose function runs ``body`` (plpgsql returning boolean)."""
    name = "rdb_planted_" + uuid.uuid4().hex[:8]
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"CREATE FUNCTION public.{name}({left}, {right}) RETURNS boolean "
                f"LANGUAGE plpgsql AS $$ BEGIN {body} END $$"
            )
        )
        conn.execute(
            sa.text(
                f"CREATE OPERATOR public.= (LEFTARG = {left}, RIGHTARG = {right}, "
                f"FUNCTION = public.{name})"
            )
        )
    return name


def test_an_equality_planted_before_the_install_does_not_switch_the_trigger_off(
    engine: sa.Engine,
) -> None:
    """``varchar = varchar`` planted in ``public`` before the owner installs the trigger, always
    "equal": the trigger's WHEN clause bound to it, the trigger never fired, and any client
    moved a row past the rules with raw SQL (the drift check saw nothing)."""
    Base.metadata.create_all(engine)
    plant(engine, "varchar", "varchar", "RETURN true;")
    rdb.install_transition_trigger(engine, Task)
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO tasks (idem_key, title, status) VALUES ('k', 'a', 'pending')")
        )
    with engine.begin() as conn, pytest.raises(sa.exc.DBAPIError) as refused:
        conn.execute(sa.text("UPDATE tasks SET status = 'completed'"))
    assert rdb.sqlstate_of(refused.value) == "RDB01"
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM tasks")).scalar_one() == "pending"
        assert rdb.trigger_drift(conn, Task) is None


def test_the_drift_check_runs_nothing_planted(engine: sa.Engine) -> None:
    """``oid = regclass`` planted in ``public``: the drift check (every startup's install, an
    operator's ``trigger_drift``) ran it with the caller's rights."""
    Base.metadata.create_all(engine)
    rdb.install_transition_trigger(engine, Task)
    plant(engine, "oid", "regclass", "RAISE EXCEPTION 'planted operator ran';")
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Task) is None
    rdb.install_transition_trigger(engine, Task)  # current: checked, nothing sent


def test_the_partitioned_table_check_runs_nothing_planted(engine: sa.Engine) -> None:
    """The install asks whether the table is partitioned (to warn) before anything else, also
    at every startup on which the trigger is current: that query compared ``pg_class.oid``
    with a ``regclass``, so ``oid = regclass`` planted in public ran with the installer's
    rights; one that raised was not seen (the question's failure is ignored), one that did
    its work and answered went unnoticed."""
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE public.rdb_planted_ran (who text)"))
        # the comparison is reached for a partitioned table's row of pg_class (any table)
        conn.execute(sa.text("CREATE TABLE public.rdb_events (at date) PARTITION BY RANGE (at)"))
    plant(
        engine,
        "oid",
        "regclass",
        "INSERT INTO public.rdb_planted_ran VALUES (current_user); RETURN $1 = $2::oid;",
    )
    rdb.install_transition_trigger(engine, Task)  # an install, then a startup's (current)
    rdb.install_transition_trigger(engine, Task)
    with engine.begin() as conn:
        rdb.install_transition_trigger(conn, Task)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM public.rdb_planted_ran")).scalar() == 0
        assert rdb.trigger_drift(conn, Task) is None


def test_the_install_runs_nothing_planted_while_it_drops_a_legacy_function(
    engine: sa.Engine,
) -> None:
    """The install drops a function of the old naming scheme if it is ours and no trigger calls
    it, comparing ``tgfoid`` (oid) with it (regprocedure): ``oid = regprocedure`` planted in
    public (next to a decoy of that name) ran with the installer's rights, an owner's that may
    grant the bypass role."""
    Base.metadata.create_all(engine)
    legacy = trigger_names(guards_of(Task)[0]).legacy_function_name
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f'CREATE FUNCTION public."{legacy}"() RETURNS trigger LANGUAGE plpgsql '
                "AS $$ BEGIN RETURN NEW; END $$"
            )
        )
        conn.execute(
            sa.text(
                f'COMMENT ON FUNCTION public."{legacy}"() IS '
                "'resilient_db transition guard decoy'"
            )
        )
    plant(engine, "oid", "regprocedure", "RAISE EXCEPTION 'planted operator ran';")
    rdb.install_transition_trigger(engine, Task)
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Task) is None
        gone = conn.execute(sa.text("SELECT pg_catalog.to_regprocedure(:f)"), {"f": legacy + "()"})
        assert gone.scalar() is None  # the decoy, stamped as ours and unused, was dropped


def test_the_cleanup_of_columns_no_longer_guarded_runs_nothing_planted(
    engine: sa.Engine,
) -> None:
    """``public.obj_description(oid, text)`` planted: an unqualified call with a string literal
    picks it over the built-in ``(oid, name)`` (the string category wins, whatever the path's
    order), so the install's cleanup of left-over triggers would run it with the installer's
    rights, and the drift check with the caller's."""
    Base.metadata.create_all(engine)
    rdb.install_transition_trigger(engine, Task)
    with engine.begin() as conn:  # a trigger of the application's: the cleanup looks at it
        conn.execute(
            sa.text(
                "CREATE FUNCTION app_touch() RETURNS trigger LANGUAGE plpgsql "
                "AS $$ BEGIN RETURN NEW; END $$"
            )
        )
        conn.execute(
            sa.text(
                "CREATE TRIGGER app_touch BEFORE UPDATE ON tasks "
                "FOR EACH ROW EXECUTE FUNCTION app_touch()"
            )
        )
        conn.execute(
            sa.text(
                "CREATE FUNCTION public.obj_description(oid, text) RETURNS text "
                "LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'planted function ran'; END $$"
            )
        )
    with engine.begin() as conn:  # a connection: installed again, cleanup included
        rdb.install_transition_trigger(conn, Task)
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Task) is None
    with engine.begin() as conn:
        rdb.uninstall_transition_trigger(conn, Task)


def test_a_collation_c_planted_on_the_path_is_not_bound_by_the_trigger(
    engine: sa.Engine,
) -> None:
    """The trigger's WHENs compare the column's text under ``pg_catalog."C"`` (bytewise): a
    collation "C" of ``public`` found first on the installer's path (``public, pg_catalog``) is
    not the one bound, and drift reads the WHEN back however the session prints the name."""
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text('CREATE COLLATION public."C" FROM pg_catalog."POSIX"'))
    with engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL search_path = public, pg_catalog"))
        rdb.install_transition_trigger(conn, Task)
        assert rdb.trigger_drift(conn, Task) is None
        bound = conn.execute(
            sa.text(
                "SELECT pg_get_triggerdef(oid) FROM pg_trigger "
                "WHERE tgrelid = 'tasks'::regclass AND tgname LIKE 'rdb_transition_%'"
            )
        ).scalars()
        assert all('COLLATE pg_catalog."C"' in d for d in bound)
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Task) is None


#: types a role that may create in a schema plants there under built-in names: domains whose
#: CHECK runs its function with the rights of whoever casts a value to them (noting who did),
#: and a ``void`` of its own
PLANTED_TYPES = (
    "CREATE FUNCTION planted.noted(v pg_catalog.text) RETURNS boolean LANGUAGE plpgsql AS $$ "
    "BEGIN INSERT INTO public.rdb_planted_ran VALUES (current_user, v); RETURN true; END $$",
    "CREATE DOMAIN planted.uuid AS pg_catalog.uuid CHECK (planted.noted(VALUE::pg_catalog.text))",
    "CREATE DOMAIN planted.text AS pg_catalog.text CHECK (planted.noted(VALUE))",
    "CREATE TYPE planted.void AS ENUM ('planted')",
)


def test_the_commit_markers_functions_are_bound_to_the_built_in_types(
    engine: sa.Engine, pg_url: str
) -> None:
    """The markers installed with a schema listed before ``pg_catalog`` on the installer's path
    (``planted, pg_catalog``), where another role planted types named ``uuid``, ``text`` and
    ``void``: the functions were made with those types as their parameters and results
    (``mark_commit(planted.uuid)``, ``claim_commit(...) RETURNS planted.text``), so a unit's
    claim cast its marker to the planted domain and ran its CHECK with the caller's rights,
    ``mark_commit`` returned the planted ``void`` (and failed), and to a caller with the
    usual path the markers looked missing. Bound to the built-ins, and called through them:
    nothing planted runs, and the markers are found whatever the caller's path."""
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA planted"))
        conn.execute(sa.text("CREATE TABLE public.rdb_planted_ran (who text, what text)"))
        conn.execute(sa.text("GRANT INSERT ON public.rdb_planted_ran TO PUBLIC"))
        for statement in PLANTED_TYPES:
            conn.execute(sa.text(statement))
    on_path = sa.create_engine(pg_url, connect_args={"options": "-csearch_path=planted,pg_catalog"})
    try:
        rdb.install_commit_markers(on_path)
        with engine.connect() as conn:
            made = conn.execute(
                sa.text(
                    "SELECT p.oid::regprocedure::text, pg_get_function_result(p.oid) "
                    "FROM pg_proc p WHERE p.pronamespace = 'resilient_db'::regnamespace"
                )
            ).all()
        assert sorted(made) == [
            ("resilient_db.claim_commit(uuid,integer)", "text"),
            ("resilient_db.mark_commit(uuid)", "void"),
            ("resilient_db.prune_commit_markers(integer)", "integer"),
        ]
        marker = str(uuid.uuid4())
        with on_path.begin() as conn:
            assert conn.execute(_commit.CLAIM_SQL, {"marker": marker}).scalar_one() == "fenced"
        with on_path.begin() as conn:
            conn.execute(sa.text("CREATE TEMPORARY TABLE written (x int)"))
            conn.execute(sa.text("INSERT INTO written VALUES (1)"))
            conn.execute(sa.text(f"{_commit._FUNCTION_MARK}('{uuid.uuid4()}')"))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT * FROM public.rdb_planted_ran")).all() == []
            for path in ("planted, pg_catalog", "public"):
                conn.execute(sa.text(f"SET search_path = {path}"))
                state = conn.execute(sa.text(_commit._MARKERS_STATE.format(untrusted="NULL")))
                assert state.one()[1] is True, path  # every function found
    finally:
        on_path.dispose()
