"""The commit protocol of a unit of work: a COMMIT whose answer was lost is settled for sure.

A unit reports "done" only when its commit is proven durable *and its own*; when the commit
provably did not happen it is replayed; otherwise :class:`CommitOutcomeUnknownError`. A
transaction id alone can't prove that: xids are reissued after a crash that lost them, and a
promoted standby hands them out again. So, with the commit markers installed
(:func:`install_commit_markers`):

* A unit that may have written sends its COMMIT as one simple-query message,
  ``EXECUTE resilient_db_mark_commit('<uuid>', <always>); COMMIT``: the statement, prepared on
  each connection when it is made, inserts a marker row with the client-made id, but only when
  the transaction already holds an xid (the server's fact that it wrote), or ``always``: when
  it ran a statement that writes by its kind (``INSERT``, ``UPDATE``, ``COPY ... FROM``,
  ``DECLARE ... WITH HOLD``, ...: see ``_statements.WRITES``), whose write may hold no local
  xid (a foreign table's rows; a held cursor's query, run during COMMIT), or sent a
  notification (its xid is assigned during COMMIT). No extra round trip; the marker is data, so
  it survives a crash with the commit and replicates with it to a standby.
  Where the prepared statement can't be used (see :class:`PreparedMarker`), the message calls
  the function ``resilient_db.mark_commit('<uuid>')``, which does the same at about twice the
  server's time.
* A lost answer is settled on a new connection by ``resilient_db.claim_commit(id, wait)``, which
  inserts the same id as a *fence* (``ON CONFLICT DO NOTHING``). It waits for a transaction still
  holding the marker; if the marker is there (and is not a fence) the unit committed; if the fence
  went in, the original can no longer commit (its marker would now violate the key), so a replay
  is safe.
* Markers are pruned once :data:`RETENTION` older than the newest marker by :func:`prune`; a
  claim refuses to judge a marker :data:`CLAIM_HORIZON` older than the newest (the answer is then
  "unknown", never a guess). Both judge ages against the same data, the markers' own ids (the
  clients' times), never a server's clock: a prune judged by one server's clock and a claim by
  another's (a failover between servers whose clocks disagree, or one clock stepped back) could
  take a pruned marker for one never written, and replay a committed unit.

Units proven read-only on the client (every statement a plain ``SELECT`` without function calls)
send a plain COMMIT: nothing to verify, a replay can't write twice. A notification in a
transaction that may be read-only, where the function can write no marker, has its xid read
before COMMIT too (one round trip): a lost answer whose marker is missing is settled by the
xid, as without markers.

Without the markers, the fallback asks for the xid before COMMIT (one extra round trip) and
trusts ``pg_xact_status`` only while the server has not restarted or checkpointed in between.

The message goes out from the driver's own COMMIT (see :func:`marked_connection_class`): psycopg
connections get a subclass whose ``commit()`` sends it; asyncpg connections are made from a
subclass (``connection_class``, set in ``do_connect``) whose ``execute("COMMIT;")`` sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import logging
import operator
import os
import random
import re
import selectors
import socket
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeAlias

import asyncpg
import psycopg
from sqlalchemy import event, text
from sqlalchemy.engine import AdaptedConnection, Connection, Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from ._classify import (
    DEFAULT_CLASSIFIER,
    Classifier,
    Outcome,
    answered,
    commit_left_unanswered,
    debug_failure,
    fenced_server_of,
    host_address,
    log_quietly,
    mark_fenced,
    mark_hosts_failed,
    mark_replay_safe,
    note_read_only_source,
    read_only_by_default,
    read_only_reported,
    server_address,
    sqlstate_of,
    takes_writes_now,
    unanswered_commit,
)
from ._config import Config
from ._errors import ResilientDBError
from ._fleet import TIMELINES_KEY, fleet_timeline, follow_timelines, share_timeline
from ._internals import (
    ASYNC_CREATOR_KWARG,
    asyncpg_command_timeout,
    psycopg_error_from_result,
    psycopg_on_deallocate_all,
    psycopg_simple_query,
    psycopg_simple_query_async,
    sa_await,
)
from ._observability import LineLimit, emit, log_session, more_since, stats_for
from ._services import query_list, say_operation_database
from ._state import STATE, hooks_of, renew_after_fork
from ._statements import (
    SAFE_CALL_NAMES,
    UNIT_CONTEXT,
    StatementGuard,
    asyncpg_statement_methods,
    committing_request,
    current_attempt,
    current_request,
    distrust_calls,
    failed_transaction_commit,
    library_work,
    marked_cursor_factory,
    note_dialect_calls,
    note_saved,
    own_work,
    rolled_back_instead,
    statement_listeners,
    wrap_dialect_calls,
)
from .transitions._report import count as count_transitions
from .transitions._sql import INSTALL_LOCK_TIMEOUT, literal

if TYPE_CHECKING:
    from .transitions._install import InstallTarget

__all__ = [
    "CLAIM_HORIZON",
    "RETENTION",
    "CommitRequest",
    "CommitTicket",
    "install_commit_markers",
    "uninstall_commit_markers",
]

SCHEMA: Final = "resilient_db"
RETENTION: Final = 900.0  # seconds a marker is kept
CLAIM_HORIZON: Final = 600.0  # a claim judges markers younger than this (margin for clock steps)
PRUNE_INTERVAL: Final = 10.0  # seconds between prunes, per engine
#: markers deleted by one prune (about 5 ms of the server's time here): it runs after a unit's
#: COMMIT (a sync unit's on that unit's time, an async unit's in a task of its own), so it is
#: kept short; a prune that fills its batch leaves more
#: behind, so the next is due after PRUNE_CATCH_UP instead: an engine prunes up to ~20,000
#: markers a second while behind, more than one process writes
PRUNE_BATCH: Final = 1000
PRUNE_CATCH_UP: Final = 0.05
#: 2: mark_commit leaves read-only transactions alone, and runs as its owner for any role a
#: unit switched to (checking the login role's right to write markers itself); 3: the prune
#: runs as its owner too; 4: claim_commit runs with a fixed search_path, and the prune asks the
#: login role's right to write markers, not to delete them (which no application should hold);
#: 5: the claim and the prune judge a marker's age against the newest marker, not a server's
#: clock, and the prune waits for no synchronous standby and does nothing on a hot standby;
#: 6: a claim of a marker written before the table was made (``commit_markers_born``, see
#: _BORN_SQL) answers unknown: the markers were uninstalled and installed again while a lost
#: answer awaited its check (its marker went with the old table: its absence proves nothing),
#: where it answered fenced, and the committed unit ran again
MARKERS_VERSION: Final = 6
#: the marker insert as prepared on each connection (``PREPARE``): the function call it stands
#: in for costs the server parsing, planning and a PL/pgSQL call at every writing COMMIT
PREPARED_MARK: Final = "resilient_db_mark_commit"
#: Its second parameter is true when the transaction ran a statement that writes by its kind
#: (or sent a notification): the marker is inserted whatever the xid, since such a write may
#: hold none when the condition is evaluated (a foreign table's rows, a held cursor's query run
#: during COMMIT, a notification's xid assigned during COMMIT: see ``_statements.WRITES``).
_PREPARE_SQL: Final = (
    f"PREPARE {PREPARED_MARK}(pg_catalog.uuid, boolean) AS INSERT INTO "
    f"{SCHEMA}.commit_markers (id) SELECT $1 "
    "WHERE $2 OR pg_catalog.pg_current_xact_id_if_assigned() IS NOT NULL"
)
#: the same INSERT sent in the COMMIT message itself (``InlineMarker``); ``{marker}`` is a
#: marker id made here (:func:`marker_id`: hex digits and dashes only), ``{always}`` ``true``
#: or ``false`` (the prepared statement's second parameter)
_INLINE_MARK: Final = (
    f"INSERT INTO {SCHEMA}.commit_markers (id) SELECT '{{marker}}'::pg_catalog.uuid "
    "WHERE {always} OR pg_catalog.pg_current_xact_id_if_assigned() IS NOT NULL"
)
#: the SQL spelling of a marker statement's ``always`` (indexed by the flag)
_ALWAYS: Final = ("false", "true")
#: the function form, which decides on the server (read-only transactions, switched roles)
_FUNCTION_MARK: Final = f"SELECT {SCHEMA}.mark_commit"

#: set while install_commit_markers runs: the connections it makes are set up at their next
#: checkout, once the markers are installed (see CommitProtocol.prepare)
installing: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "resilient_db.installing_markers", default=False
)

# Keys in the pool's per-connection info.
_SEEN_KEY: Final = "resilient_db.commit_protocol"  # the connection was made under our hooks
_NO_PREPARE_KEY: Final = "resilient_db.no_prepare"  # asyncpg made without a statement cache

MARKERS: Final = "markers"
XID: Final = "xid"
UNMARKED: Final = "unmarked"  # the connection's COMMIT could not be marked: never verifiable

# -- the database side --------------------------------------------------------------------------
#: the smallest id of a marker less than ``{ms}`` milliseconds older than the newest marker in
#: the table (by the times the clients wrote into the ids; NULL while there is none). Markers
#: are data: the newest one only ever grows, on every server that has the prunes it made (a
#: prune's DELETE replicates after the marker it judged by), so a marker a prune deleted is
#: older than this for every later claim, whatever the servers' clocks say.
_NEWEST_HORIZON_SQL = """
    (SELECT (substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-0000-0000-000000000000')::uuid
     FROM (SELECT lpad(to_hex(greatest(0, ('x' || substr(replace(n.id::text, '-', ''), 1, 12))
                   ::bit(48)::bigint - {ms})), 12, '0') AS h
           FROM (SELECT id FROM {s}.commit_markers ORDER BY id DESC LIMIT 1) n) s)
"""

#: when the markers' table was made (a UUIDv7 of the server's time, in a table of its own, made
#: and dropped with it): a claim of a marker written before it finds its absence proves nothing
#: (see ``claim_commit``, version 6). Run by the installer on its search_path: its functions,
#: operator and type named with their schema (``numeric * integer`` has no exact built-in match,
#: so one planted on the path won even behind pg_catalog; a schema listed before pg_catalog
#: won for ``text || text``, ``substr`` and the rest)
_BORN_SQL = """
INSERT INTO {s}.commit_markers_born (born)
SELECT pg_catalog.format('%s-%s-7000-8000-000000000000', pg_catalog.substr(h, 1, 8),
                         pg_catalog.substr(h, 9, 4))::pg_catalog.uuid
FROM (SELECT pg_catalog.lpad(pg_catalog.to_hex((extract(epoch FROM pg_catalog.clock_timestamp())
                                                OPERATOR(pg_catalog.*) 1000)::bigint),
                             12, '0') AS h) s
WHERE NOT EXISTS (SELECT FROM {s}.commit_markers_born)
"""


# -- who owns them --------------------------------------------------------------------------------
# A role that may create schemas in the database (CREATE on it, which a migration role has too)
# can create schema resilient_db before the install, or the whole current set of objects: its
# claim_commit would answer "not committed" for a committed unit (replayed: written twice) and
# run with the rights of whoever asks (an operator's, a superuser's). The owner of the schema
# controls everything in it (it may drop any object there and make its own), so ownership is
# what is checked: the objects are built on and used only when they belong to a role that has
# the connecting (or installing) role's trust already: a superuser, the database's owner (who
# can set any session's search_path for this database), or that role itself.
#: the one trusted role that is not the same for everyone: the database's owner
_DATABASE_OWNER = (
    "(SELECT d.datdba FROM pg_catalog.pg_database d "
    "WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database())"
)
#: ``r`` (a ``pg_roles`` row) is a role the connecting or installing one has no reason to trust
_NOT_TRUSTED = (
    "NOT r.rolsuper AND r.rolname OPERATOR(pg_catalog.<>) current_user "
    f"AND r.oid OPERATOR(pg_catalog.<>) {_DATABASE_OWNER}"
)
#: Runs first in every install (after the install lock): refuses, before anything is created,
#: when the schema, or a relation or function in it, belongs to a role that is neither the
#: installing role, a superuser nor the database's owner. Without it the install went ahead:
#: ``CREATE SCHEMA IF NOT EXISTS`` kept the other role's schema, ``CREATE TABLE IF NOT EXISTS``
#: its table, and a superuser's ``CREATE OR REPLACE FUNCTION`` replaced a planted function's
#: body but not its owner (who could swap it again). Operators are named with their schema
#: and compare values of one built-in type: nothing on the installer's search_path runs here.
_REFUSE_PLANTED_SQL: Final = f"""DO $rdb$
DECLARE
    planted pg_catalog.text;
BEGIN
    SELECT pg_catalog.string_agg(pg_catalog.format('%s is owned by role %s', o.what,
               pg_catalog.quote_ident(r.rolname)), '; ' ORDER BY o.n, o.what)
      INTO planted
      FROM (SELECT 0 AS n, 'schema {SCHEMA}' AS what, ns.nspowner AS owner
              FROM pg_catalog.pg_namespace ns
             WHERE ns.nspname OPERATOR(pg_catalog.=) '{SCHEMA}'
            UNION ALL
            SELECT 1, pg_catalog.format('relation {SCHEMA}.%s', pg_catalog.quote_ident(c.relname)),
                   c.relowner
              FROM pg_catalog.pg_class c
             WHERE c.relnamespace OPERATOR(pg_catalog.=)
                   pg_catalog.to_regnamespace('{SCHEMA}')::pg_catalog.oid
            UNION ALL
            SELECT 2, pg_catalog.format('function %s', p.oid::pg_catalog.regprocedure),
                   p.proowner
              FROM pg_catalog.pg_proc p
             WHERE p.pronamespace OPERATOR(pg_catalog.=)
                   pg_catalog.to_regnamespace('{SCHEMA}')::pg_catalog.oid) o
      JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) o.owner
     WHERE {_NOT_TRUSTED};
    IF planted IS NOT NULL THEN
        RAISE EXCEPTION 'resilient_db: refusing to install the commit markers: % (not the '
            'installing role %, a superuser or the database''s owner). A role that may create '
            'schemas could have planted them: a claim_commit of its own would have committed '
            'units replayed (written twice) and run with its callers'' rights. If that role '
            'is to own the markers, install as it (SET ROLE); otherwise DROP SCHEMA {SCHEMA} '
            'CASCADE (as its owner or a superuser) and install again', planted, current_user
            USING ERRCODE = '42501';
    END IF;
END
$rdb$"""
#: Runs first in every install too: a role without CREATE on the database (an application's
#: role calling the install at startup before the owner ran it; PostgreSQL 15 gives PUBLIC none)
#: is refused with the server's own error (42501, "permission denied for database ..."), which
#: ``CREATE SCHEMA IF NOT EXISTS`` raises even where the schema exists, but naming the right it
#: lacks and who installs, rather than leaving a CREATE SCHEMA the caller never wrote to explain.
_REFUSE_NO_CREATE_SQL: Final = f"""DO $rdb$
BEGIN
    IF NOT pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE') THEN
        RAISE EXCEPTION 'permission denied for database %: role % lacks CREATE on it, which '
            'installing the commit markers needs (CREATE SCHEMA IF NOT EXISTS {SCHEMA}, even '
            'where the schema exists). Install them as the database''s owner or a superuser '
            '(resilient_db.install_commit_markers() or the Alembic step, run as that role); '
            'until then units verify a lost COMMIT answer by transaction id',
            pg_catalog.current_database(), current_user
            USING ERRCODE = '42501';
    END IF;
END
$rdb$"""
#: Runs first in an install and an uninstall: a hot standby (a read replica's URL given by
#: mistake) refuses them with the server's own SQLSTATE (25006), naming the standby and the
#: fix, where the server would say only "cannot execute CREATE SCHEMA in a read-only
#: transaction" (or DROP FUNCTION), which reads as a setting of the caller's transaction.
_REFUSE_STANDBY_SQL: Final = """DO $rdb$
BEGIN
    IF pg_catalog.pg_is_in_recovery() THEN
        RAISE EXCEPTION USING ERRCODE = '25006',
            MESSAGE = pg_catalog.format('cannot %s the commit markers in database %s on a hot '
                'standby (a read replica): nothing can be written there', '{what}',
                pg_catalog.current_database()),
            HINT = 'Run it on the primary: the markers replicate to its standbys.';
    END IF;
END
$rdb$"""
#: what the markers rely on, each named for a message: (what, catalog, owner column, lookup)
_RELIED_ON: Final = (
    (f"schema {SCHEMA}", "pg_namespace", "nspowner", f"to_regnamespace('{SCHEMA}')"),
    (
        f"table {SCHEMA}.commit_markers",
        "pg_class",
        "relowner",
        f"to_regclass('{SCHEMA}.commit_markers')",
    ),
    (
        f"function {SCHEMA}.mark_commit(uuid)",
        "pg_proc",
        "proowner",
        f"to_regprocedure('{SCHEMA}.mark_commit(pg_catalog.uuid)')",
    ),
    (
        f"function {SCHEMA}.claim_commit(uuid, integer)",
        "pg_proc",
        "proowner",
        f"to_regprocedure('{SCHEMA}.claim_commit(pg_catalog.uuid,integer)')",
    ),
    (
        f"function {SCHEMA}.prune_commit_markers(integer)",
        "pg_proc",
        "proowner",
        f"to_regprocedure('{SCHEMA}.prune_commit_markers(integer)')",
    ),
)


#: The objects the markers rely on that the calling role may not replace, with their owners
#: (``o.owner``): a relation or function that belongs to a role it is not a member of (nor, a
#: superuser, may act as), or the schema when it may not create in it (a schema a DBA made and
#: let the installing role create in is its to install into).
_NOT_REPLACEABLE_FROM: Final = (
    "(VALUES "
    + ", ".join(
        f"((SELECT x.{column} FROM pg_catalog.{catalog} x WHERE x.oid "
        f"OPERATOR(pg_catalog.=) pg_catalog.{lookup}::pg_catalog.oid), "
        + (
            f"pg_catalog.has_schema_privilege(pg_catalog.{lookup}::pg_catalog.oid, 'CREATE'))"
            if catalog == "pg_namespace"
            else "NULL::boolean)"
        )
        for _, catalog, column, lookup in _RELIED_ON
    )
    + ") AS o(owner, may_create) WHERE o.owner IS NOT NULL "
    "AND NOT COALESCE(o.may_create, pg_catalog.pg_has_role(o.owner, 'USAGE'))"
)
#: Runs after the check of planted objects: a role that may create in the database but not
#: replace the markers there (they belong to a role it is not a member of: the database's
#: owner installed them, and a migration role apart from it runs the Alembic step) is refused
#: before anything is changed, naming the owner to install as, where the server would say only
#: "permission denied for schema resilient_db" at the first CREATE in it.
_REFUSE_NOT_REPLACEABLE_SQL: Final = f"""DO $rdb$
DECLARE
    owners pg_catalog.text;
BEGIN
    SELECT pg_catalog.string_agg(DISTINCT pg_catalog.quote_ident(r.rolname), ', ')
      INTO owners
      FROM pg_catalog.pg_roles r, {_NOT_REPLACEABLE_FROM}
       AND r.oid OPERATOR(pg_catalog.=) o.owner;
    IF owners IS NOT NULL THEN
        RAISE EXCEPTION 'permission denied for schema {SCHEMA}: role % may not replace the '
            'commit markers there, which belong to role %. Install them as that role '
            '(resilient_db.install_commit_markers() or the Alembic step, run as it)',
            current_user, owners
            USING ERRCODE = '42501';
    END IF;
END
$rdb$"""


def _untrusted_sql(owner: str | None = None) -> str:
    """An array naming each object the markers rely on that belongs to a role the connecting
    one has no reason to trust (NULL: none): neither a superuser, the database's owner, the role
    logged in or in effect, nor ``owner`` (``SELF_HEALING_MARKERS_OWNER``). Objects looked up by
    oid (found by name with ``to_reg*``, as the check does); no operator or function from the
    caller's search_path."""
    also = "" if owner is None else f" AND r.rolname OPERATOR(pg_catalog.<>) {literal(owner)}"
    return (
        "(SELECT pg_catalog.array_agg(pg_catalog.format('%s is owned by role %s', o.what, "
        "pg_catalog.quote_ident(r.rolname)) ORDER BY o.n) FROM (VALUES "
        + ", ".join(
            f"({n}, '{what}', (SELECT x.{column} FROM pg_catalog.{catalog} x WHERE x.oid "
            f"OPERATOR(pg_catalog.=) pg_catalog.{lookup}::pg_catalog.oid))"
            for n, (what, catalog, column, lookup) in enumerate(_RELIED_ON)
        )
        + ") AS o(n, what, owner) JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) "
        f"o.owner WHERE {_NOT_TRUSTED} AND r.rolname OPERATOR(pg_catalog.<>) session_user{also})"
    )


def _install_statements() -> list[str]:
    s = SCHEMA
    prune_horizon = _NEWEST_HORIZON_SQL.format(s=s, ms=int(RETENTION * 1000))
    claim_horizon = _NEWEST_HORIZON_SQL.format(s=s, ms=int(CLAIM_HORIZON * 1000))
    return [
        _REFUSE_STANDBY_SQL.replace("{what}", "install"),
        _REFUSE_NO_CREATE_SQL,
        _REFUSE_PLANTED_SQL,
        _REFUSE_NOT_REPLACEABLE_SQL,
        f"CREATE SCHEMA IF NOT EXISTS {s}",
        # id: a UUIDv7 made by the client (its first 48 bits are milliseconds, so the primary
        # key is ordered by time and pruning is a range scan); fence: written by a claim.
        f"CREATE TABLE IF NOT EXISTS {s}.commit_markers ("
        " id pg_catalog.uuid PRIMARY KEY, fence boolean NOT NULL DEFAULT false)",
        f"CREATE TABLE IF NOT EXISTS {s}.commit_markers_born (born pg_catalog.uuid NOT NULL)",
        _REFUSE_SHAPE_SQL,
        _BORN_SQL.format(s=s),
        f"GRANT SELECT ON {s}.commit_markers_born TO PUBLIC",
        # SECURITY DEFINER: a unit may have switched to a role of its own (SET LOCAL ROLE, as
        # row-level-security setups do) that has no rights on the markers; the role that
        # logged in (session_user, which SET ROLE leaves alone) must have them, as for the
        # prepared INSERT, so this lends nobody a right they had not.
        f"""CREATE OR REPLACE FUNCTION {s}.mark_commit(marker pg_catalog.uuid)
RETURNS pg_catalog.void LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $rdb$
BEGIN
    -- only a transaction that wrote has an xid: read-only ones leave nothing behind. A
    -- transaction declared read-only can hold one only from writing temporary tables, which
    -- don't outlive its session: nothing to prove there, and its INSERT would be refused.
    IF pg_catalog.pg_current_xact_id_if_assigned() IS NOT NULL
       AND NOT pg_catalog.current_setting('transaction_read_only')::boolean THEN
        IF NOT pg_catalog.has_table_privilege(session_user, '{s}.commit_markers', 'INSERT') THEN
            RAISE EXCEPTION 'role % may not write commit markers', session_user
                USING ERRCODE = '42501';
        END IF;
        INSERT INTO {s}.commit_markers (id) VALUES (marker);
    END IF;
END
$rdb$""",
        # any role a unit switches to reaches the function (it checks the login role itself)
        f"GRANT USAGE ON SCHEMA {s} TO PUBLIC",
        f"GRANT EXECUTE ON FUNCTION {s}.mark_commit(pg_catalog.uuid) TO PUBLIC",
        # the first version took no wait (a fixed lock_timeout): replaced, not overloaded
        f"DROP FUNCTION IF EXISTS {s}.claim_commit(pg_catalog.uuid)",
        # search_path pinned (as for every function here): the caller's would let a role that
        # may create objects in a schema on it (public, on many databases) shadow an operator
        # the function uses (``numeric * integer`` has no exact built-in match, so a
        # user-defined one wins) and run its code with the caller's rights: an operator's
        # ``claim_commit`` made as a superuser, or the claim's answer made up
        f"""CREATE OR REPLACE FUNCTION {s}.claim_commit(marker pg_catalog.uuid, wait_ms integer)
RETURNS pg_catalog.text LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $rdb$
DECLARE
    was_fence boolean;
BEGIN
    -- how long to wait for a transaction still holding the marker (this transaction only)
    PERFORM pg_catalog.set_config('lock_timeout', wait_ms::text || 'ms', true);
    IF marker < {claim_horizon} THEN
        RETURN 'expired';  -- may have been pruned: absence would prove nothing
    END IF;
    -- waits for a transaction still holding the marker; once the fence is in, the original
    -- transaction can no longer commit (its own insert would violate the primary key)
    INSERT INTO {s}.commit_markers (id, fence) VALUES (marker, true) ON CONFLICT (id) DO NOTHING;
    IF FOUND THEN
        -- judged again now: the insert may have waited for a prune deleting the marker, by a
        -- newest marker committed after the first look (this statement sees it)
        IF marker < {claim_horizon} THEN
            RETURN 'expired';
        END IF;
        -- written before the table was made: the markers installed again while its answer
        -- awaited this check (it went with the old table), and its absence proves nothing
        IF EXISTS (SELECT 1 FROM {s}.commit_markers_born WHERE marker < born) THEN
            RETURN 'unknown';
        END IF;
        RETURN 'fenced';
    END IF;
    SELECT fence INTO was_fence FROM {s}.commit_markers WHERE id = marker;
    IF was_fence IS NULL THEN
        RETURN 'unknown';
    ELSIF was_fence THEN
        RETURN 'fenced';  -- an earlier claim fenced it (its answer was lost)
    END IF;
    RETURN 'committed';
END
$rdb$""",
        # SECURITY DEFINER: its SKIP LOCKED row locks need UPDATE on the table, and its DELETE
        # the right to delete, which the login role needs for nothing else and must not hold
        # (a role that may delete a marker can make a committed unit whose answer was lost
        # look uncommitted: replayed, written twice). It deletes only expired markers, which
        # no claim trusts any more, for a role that may write markers (checked here)
        f"""CREATE OR REPLACE FUNCTION {s}.prune_commit_markers(batch integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $rdb$
DECLARE
    pruned integer;
    horizon uuid;
BEGIN
    IF NOT pg_catalog.has_table_privilege(session_user, '{s}.commit_markers', 'INSERT') THEN
        RAISE EXCEPTION 'role % may not prune commit markers', session_user
            USING ERRCODE = '42501';
    END IF;
    IF pg_catalog.pg_is_in_recovery() THEN
        RETURN 0;  -- a hot standby (a read/write split's follower): its primary prunes
    END IF;
    -- nothing waits for a synchronous standby to confirm a prune (one that is down would hold
    -- the unit whose commit ran it): a prune lost in a failover only leaves markers behind
    PERFORM pg_catalog.set_config('synchronous_commit', 'local', true);
    horizon := {prune_horizon};
    DELETE FROM {s}.commit_markers WHERE id IN (
        SELECT id FROM {s}.commit_markers WHERE id < horizon
        ORDER BY id LIMIT batch FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS pruned = ROW_COUNT;
    RETURN pruned;
END
$rdb$""",
        f"COMMENT ON TABLE {s}.commit_markers IS '{_MARKERS_COMMENT}'",
    ]


#: whether the calling role may replace every object the markers rely on that is there (see
#: _NOT_REPLACEABLE_FROM): an install by a role that may create in the database but not
#: replace what the owner made (``GRANT ALL ON DATABASE``) would be refused
_MAY_REPLACE_SQL: Final = f"NOT EXISTS (SELECT FROM {_NOT_REPLACEABLE_FROM})"
_MARKERS_COMMENT: Final = (
    f"resilient_db commit markers, version {MARKERS_VERSION}: proof that a unit of work "
    f"committed, kept {int(RETENTION)} s"
)
#: whether schema resilient_db exists and the role may not look in it (a look by oid: one by
#: name is refused without USAGE)
_NO_USAGE_SQL = (
    f"SELECT CASE WHEN pg_catalog.to_regnamespace('{SCHEMA}') IS NULL THEN false"
    f" ELSE NOT pg_catalog.has_schema_privilege("
    f"pg_catalog.to_regnamespace('{SCHEMA}')::pg_catalog.oid, 'USAGE') END"
)

# What an install would find: the table's comment (its version), this version's functions (and
# not the first version's claim, which the install drops), whether they belong to roles the
# caller trusts (else the install runs and refuses them, naming their owner), whether the
# caller may create in the database at all (an application's role at startup may not), and
# whether it may replace what is there (see _MAY_REPLACE_SQL)
# Whether the markers' tables are the ones the protocol needs: ``commit_markers`` keyed by its
# uuid ``id`` alone (the claim's fence is an INSERT that conflicts with the original's) and with
# its boolean ``fence``, and ``commit_markers_born`` with its uuid ``born``. A table of the same
# name made or changed by hand (``CREATE TABLE IF NOT EXISTS`` leaves it as it is) would make
# every check fail, and every lost answer end unknown, silently.
_SHAPE_SQL = (
    "EXISTS (SELECT FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a"
    " ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid"
    " AND a.attnum OPERATOR(pg_catalog.=) i.indkey[0]"
    f" WHERE i.indrelid OPERATOR(pg_catalog.=) pg_catalog.to_regclass('{SCHEMA}.commit_markers')"
    " AND i.indisprimary AND i.indnkeyatts OPERATOR(pg_catalog.=) 1"
    " AND a.attname OPERATOR(pg_catalog.=) 'id'"
    " AND a.atttypid OPERATOR(pg_catalog.=) 'pg_catalog.uuid'::pg_catalog.regtype)"
    " AND EXISTS (SELECT FROM pg_catalog.pg_attribute"
    f" WHERE attrelid OPERATOR(pg_catalog.=) pg_catalog.to_regclass('{SCHEMA}.commit_markers')"
    " AND attname OPERATOR(pg_catalog.=) 'fence' AND NOT attisdropped"
    " AND atttypid OPERATOR(pg_catalog.=) 'pg_catalog.bool'::pg_catalog.regtype)"
    " AND EXISTS (SELECT FROM pg_catalog.pg_attribute WHERE attrelid OPERATOR(pg_catalog.=)"
    f" pg_catalog.to_regclass('{SCHEMA}.commit_markers_born')"
    " AND attname OPERATOR(pg_catalog.=) 'born' AND NOT attisdropped"
    " AND atttypid OPERATOR(pg_catalog.=) 'pg_catalog.uuid'::pg_catalog.regtype)"
)
#: an install refuses tables of another shape (see _SHAPE_SQL), naming them and the fix
_REFUSE_SHAPE_SQL = f"""DO $rdb$ BEGIN
    IF NOT ({_SHAPE_SQL}) THEN
        RAISE EXCEPTION USING ERRCODE = '42P16',
            -- (string constants on lines of their own are one constant: no || to resolve)
            MESSAGE = 'tables {SCHEMA}.commit_markers and {SCHEMA}.commit_markers_born exist '
                'but are not the ones commit markers need (commit_markers: id uuid PRIMARY '
                'KEY, fence boolean; commit_markers_born: born uuid): made or changed by hand',
            HINT = 'drop them (DROP SCHEMA {SCHEMA} CASCADE, while no lost COMMIT answer awaits '
                'its check) and install the commit markers again';
    END IF;
END $rdb$"""

_MARKERS_STATE = (
    f"SELECT pg_catalog.obj_description("
    f"pg_catalog.to_regclass('{SCHEMA}.commit_markers'), 'pg_class'),"
    f" pg_catalog.to_regprocedure('{SCHEMA}.mark_commit(pg_catalog.uuid)') IS NOT NULL"
    f" AND pg_catalog.to_regprocedure('{SCHEMA}.claim_commit(pg_catalog.uuid, integer)')"
    " IS NOT NULL"
    f" AND pg_catalog.to_regprocedure('{SCHEMA}.prune_commit_markers(integer)') IS NOT NULL"
    f" AND pg_catalog.to_regprocedure('{SCHEMA}.claim_commit(pg_catalog.uuid)') IS NULL"
    f" AND {_SHAPE_SQL},"
    " {untrusted} IS NULL,"
    " pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE'),"
    f" {_MAY_REPLACE_SQL},"
    " current_user"
)


def _uninstall_statements() -> list[str]:
    s = SCHEMA
    return [
        _REFUSE_STANDBY_SQL.replace("{what}", "uninstall"),
        f"DO $rdb$ BEGIN IF pg_catalog.to_regnamespace('{s}') IS NOT NULL THEN "
        f"REVOKE USAGE ON SCHEMA {s} FROM PUBLIC; END IF; END $rdb$",
        f"DROP FUNCTION IF EXISTS {s}.mark_commit(pg_catalog.uuid)",
        f"DROP FUNCTION IF EXISTS {s}.claim_commit(pg_catalog.uuid, integer)",
        f"DROP FUNCTION IF EXISTS {s}.claim_commit(pg_catalog.uuid)",
        f"DROP FUNCTION IF EXISTS {s}.prune_commit_markers(integer)",
        f"DROP TABLE IF EXISTS {s}.commit_markers",
        f"DROP TABLE IF EXISTS {s}.commit_markers_born",
        # the schema the install made, when nothing else is in it: a table or function of the
        # application's put there keeps it, and a WARNING names what is left (PostgreSQL's
        # detail), instead of failing the uninstall (an Alembic downgrade)
        f"""DO $rdb$
DECLARE
    v_detail pg_catalog.text;
BEGIN
    DROP SCHEMA IF EXISTS {s};
EXCEPTION
    WHEN dependent_objects_still_exist THEN
        GET STACKED DIAGNOSTICS v_detail = PG_EXCEPTION_DETAIL;
        RAISE WARNING USING
            MESSAGE = 'schema {s} is kept: it holds objects other than the commit markers',
            DETAIL = v_detail;
    WHEN insufficient_privilege THEN
        RAISE WARNING USING
            MESSAGE = 'schema {s} is kept: this role may not drop it',
            DETAIL = pg_catalog.format('It belongs to %s.', (SELECT pg_catalog.pg_get_userbyid(
                n.nspowner) FROM pg_catalog.pg_namespace n
                WHERE n.nspname OPERATOR(pg_catalog.=) '{s}'));
END
$rdb$""",
    ]


def install_commit_markers(
    bind_or_op: InstallTarget, *, lock_timeout: float | None = INSTALL_LOCK_TIMEOUT
) -> None:
    """Install what definite, round-trip-free commit verification needs (idempotent).

    ``bind_or_op``: an ``Engine``, ``Connection`` or ``Session``, or Alembic's ``op`` in a
    migration (for asyncio: ``await conn.run_sync(install_commit_markers)``). Creates schema
    ``resilient_db`` with table ``commit_markers`` and three functions. Connections made after
    this use the markers (the install's own too, and one given to it from its next checkout;
    a hot standby is refused, SQLSTATE 25006); without them units still verify lost COMMIT
    answers, by transaction id, at one extra round trip per writing unit and with more
    "unknown" outcomes.

    Given an Engine on which this version is installed already, it sends no DDL (an
    application role may call it at startup without rights to create anything); to repair an
    install by hand, pass a Connection or run the migration.

    Refuses, before creating anything (SQLSTATE 42501, naming them and their owner), when
    schema ``resilient_db`` or a relation or function in it belongs to a role that is neither
    the installing role, a superuser nor the database's owner: a role with CREATE on the
    database could have made them first (a ``claim_commit`` of its own would have committed
    units replayed and run with its callers' rights). Connections likewise use only markers
    owned by a superuser, the database's owner or the role they log in as.

    Installs started at once (the instances of a deploy) take turns on an advisory lock;
    through an Engine, one that finds the markers current once it holds the lock (another
    installed them meanwhile, or a later release's) sends nothing. ``lock_timeout`` (seconds;
    None: the session's own) bounds each wait for a lock on a table, as for
    :func:`~resilient_db.install_transition_trigger`.
    """
    from .transitions._install import installed_already, lock_timeout_ms  # noqa: PLC0415

    lock_timeout_ms(lock_timeout)  # (checked before anything is sent)

    # The install's own connections (an Engine's, whose resilient factory may be made already:
    # at import, the install run at startup) are set up at their next checkout, not now: what
    # they would find is what the install is about to change (a "not installed" warning, and a
    # pooled connection verifying by transaction id for good)
    token = installing.set(True)
    try:
        if installed_already(bind_or_op, _markers_current):
            return
        # (through an Engine, looked at again once the install lock is held: see run_statements)
        _run_statements(
            bind_or_op,
            _install_statements(),
            current=_markers_current,
            lock_timeout=lock_timeout,
            name="install_commit_markers",
        )
    finally:
        installing.reset(token)
    _set_up_again(bind_or_op)


def _set_up_again(bind_or_op: Any) -> None:
    """After an install through a Connection, a Session or Alembic's ``op``: the connection,
    set up before it (and found without markers, if a resilient factory's engine made it), is
    set up again at its next checkout, when the install is committed (see
    ``_unit.set_up_again``). An Engine's connections were not set up during the install."""
    from ._unit import set_up_again  # noqa: PLC0415 (_unit imports this module)

    if isinstance(bind_or_op, Engine):
        return
    target = bind_or_op
    if not isinstance(target, (Connection, Session)):
        get_bind = getattr(target, "get_bind", None)
        if not callable(get_bind) or getattr(
            getattr(target, "migration_context", None), "as_sql", False
        ):
            return  # (offline: no connection)
        target = get_bind()
    if isinstance(target, Session):
        target = target.connection()
    if isinstance(target, Connection):
        set_up_again(target)


def _markers_current(conn: Connection) -> bool:
    """Whether an install through ``conn``'s engine sends no DDL: this version is installed,
    owned by roles the connections would trust (the environment's
    ``SELF_HEALING_MARKERS_OWNER`` too: markers a migration role installed, used by the
    application's units, are current for its install at startup); or the caller may not create
    in the database (an application's role at startup), or may not replace trusted markers
    there (it holds CREATE on the database, not the objects), which could not install anyway: its
    connections judge what is there (markers of another owner are not used; an earlier
    release's are, with a warning this says first, naming the fix)."""
    from .transitions._report import env_config  # noqa: PLC0415 (see _run_statements)

    config = env_config()
    if conn.execute(text(_NO_USAGE_SQL)).scalar():
        # the schema is there and this role may not look in (USAGE revoked from PUBLIC and not
        # granted to it): nor could it install there. Its connections' warning names the USAGE
        # it lacks (a look by name would fail with "permission denied for schema", which read
        # as nothing installed: an install, refused for a CREATE the role need not have)
        return True
    # (a colon in the owner's name would read as a bind parameter: escaped, as text() wants)
    untrusted = _untrusted_sql(config.markers_owner).replace(":", "\\:")
    statement = text(_MARKERS_STATE.replace("{untrusted}", untrusted))
    comment, functions, trusted, may_create, may_replace, role = conn.execute(statement).one()
    if comment == _MARKERS_COMMENT and functions and (trusted or not may_create):
        return True
    found = _VERSION_IN_COMMENT.search(comment) if isinstance(comment, str) else None
    if found is not None and int(found.group(1)) > MARKERS_VERSION and functions and trusted:
        # a later release's (its migration ran: this instance is a rollback, or restarts
        # during the rollout): replaced, they would lose its fixes; refused, the instance
        # would not start. Units use them (this release's functions are there)
        emit(
            config,
            log_session,
            logging.WARNING,
            "install_commit_markers: database %s has commit markers version %s, installed by "
            "a later release (this one installs version %d): they are left as they are, and "
            "units use them",
            conn.engine.url.database,
            found.group(1),
            MARKERS_VERSION,
            event="commit_markers_newer",
            version=int(found.group(1)),
        )
        return True
    # trusted markers this role may not replace (the database owner's, and this role holds
    # only CREATE on the database): an install could not upgrade them either
    may_install = may_create and (may_replace or not trusted)
    if may_install or found is None or int(found.group(1)) >= MARKERS_VERSION:
        return False  # the install runs (and where it can't, the server says why)
    if not trusted:
        return True  # not used by the connections, whose warning names their owner
    emit(
        config,
        log_session,
        logging.WARNING,
        "install_commit_markers: database %s has commit markers version %s, installed by an "
        "earlier release (this one installs version %d), and role %s may not create in it or "
        "replace them, so they are left as they are: units use them. Run "
        "resilient_db.install_commit_markers() as the markers' owner, or the latest Alembic "
        "step, to upgrade them",
        conn.engine.url.database,
        found.group(1),
        MARKERS_VERSION,
        role,
        event="commit_markers_outdated",
        version=int(found.group(1)),
    )
    return True


def _run_statements(
    bind_or_op: Any,
    statements: list[str],
    *,
    current: Callable[[Connection], bool] | None = None,
    lock_timeout: float | None,
    name: str,
) -> None:
    # imported here: the transition guard (which this helper's module belongs to) imports this
    # module for ``note_write``
    from .transitions._install import run_statements  # noqa: PLC0415

    run_statements(bind_or_op, statements, current=current, lock_timeout=lock_timeout, name=name)


#: What a server says of its read mode now: asked on the failure path of a write refused as
#: read-only (25006), whatever the login's report says, which behind a transaction-mode pooler
#: may be stale either way (see :func:`takes_writes_asked`)
_READ_MODE_NOW_SQL: Final = """SELECT pg_catalog.pg_is_in_recovery(), s.setting, s.source
  FROM pg_catalog.pg_settings s
  WHERE s.name OPERATOR(pg_catalog.=) 'default_transaction_read_only'"""


#: The savepoints SQLAlchemy made in a transaction (its ``begin_nested()``), by the
#: transaction's root (a ``RootTransaction``: gone with it), innermost last: what a 25006 met
#: in one rolls back to before the server is asked (see :func:`takes_writes_asked`). Kept by
#: the dialect's savepoint calls (see :func:`note_savepoints`: SQLAlchemy's ``savepoint``
#: event is not told the name it makes).
_savepoints: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()


def note_savepoints(dialect: Any) -> None:
    """Have ``dialect`` (an engine's) note the savepoints it makes and ends, by name (see
    :data:`_savepoints`): its ``do_savepoint``, ``do_release_savepoint`` and
    ``do_rollback_to_savepoint`` wrapped, its public interface (SQLAlchemy's connection events
    would make every statement of the engine's connections run its event dispatch, see
    ``note_dialect_calls``). A Python call per savepoint: nothing is sent."""
    wrap_dialect_calls(dialect, "do_savepoint", _made_savepoint)
    note_dialect_calls(dialect, "do_release_savepoint", _ended_savepoint)
    note_dialect_calls(dialect, "do_rollback_to_savepoint", _ended_savepoint)


def _made_savepoint(method: Callable[..., Any], connection: Connection, name: str) -> Any:
    """``do_savepoint``: ``name`` noted once made (one the server refused was never made)."""
    done = method(connection, name)
    root = connection.get_transaction()
    if root is not None:
        with contextlib.suppress(TypeError):  # (a transaction that takes no weak reference)
            _savepoints.setdefault(root, []).append(name)
    return done


def _ended_savepoint(connection: Connection, name: str) -> None:
    """``do_release_savepoint`` / ``do_rollback_to_savepoint``: SQLAlchemy is done with
    savepoint ``name`` (released, or rolled back to and discarded), and with those made after
    it."""
    root = connection.get_transaction()
    with contextlib.suppress(TypeError):
        names = None if root is None else _savepoints.get(root)
        if names is not None and name in names:
            del names[names.index(name) :]


def innermost_savepoint(connection: Connection) -> str | None:
    """The name of the innermost savepoint SQLAlchemy made in ``connection``'s transaction
    and has not ended; None where none was seen (one made before the engine had these
    hooks)."""
    root = connection.get_transaction()
    try:
        names = None if root is None else _savepoints.get(root)
    except TypeError:
        return None
    return names[-1] if names else None


def takes_writes_asked(connection: Connection) -> bool | None:
    """Whether the server behind ``connection`` (SQLAlchemy's, whose statement was just refused
    with 25006) takes writes now, asked (see ``_classify.refused_by_a_writable_server``): its
    failed transaction rolled back first (the only thing a failed transaction allows, which
    the application's rollback then finds done), then one statement outside any transaction;
    inside a savepoint (a ``begin_nested()``, which the application may roll back to and go
    on), the savepoint rolled back to instead and the statement sent in the transaction (see
    :func:`_asked_in_savepoint`). None, leaving the login's report to judge, on a driver the
    library does not mark, or where asking failed."""
    if connection.in_nested_transaction():
        return _asked_in_savepoint(connection)
    dbapi_connection, driver = _connections_of(connection)
    if dbapi_connection is None:
        return None
    try:
        with library_work():
            if isinstance(driver, asyncpg.Connection):
                dbapi_connection.rollback()
                try:
                    row = _runner(dbapi_connection, driver)(
                        lambda d: d.fetchrow(_READ_MODE_NOW_SQL)
                    )
                finally:
                    _fail_again(dbapi_connection)
            elif isinstance(driver, (psycopg.Connection, psycopg.AsyncConnection)):
                # (in autocommit, a transaction the application began itself with a BEGIN
                # statement: the rollback ends it, and it is made failed again all the same)
                began = driver.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
                dbapi_connection.rollback()
                autocommit = dbapi_connection.autocommit
                try:
                    row = _autocommit_row(dbapi_connection, _READ_MODE_NOW_SQL)
                finally:
                    _fail_again(dbapi_connection, begin=autocommit and began)
            else:
                return None
    except Exception:  # (a connection lost meanwhile: its next use says so)
        return None
    if row is None:
        return None
    return takes_writes_now(row[0], row[1], row[2])


def _connections_of(connection: Connection) -> tuple[Any, Any]:
    """``connection``'s DBAPI connection and driver connection; (None, None) where it has
    none any more (closed or invalidated meanwhile)."""
    try:
        return connection.connection.dbapi_connection, connection.connection.driver_connection
    except Exception:
        return None, None


def _asked_in_savepoint(connection: Connection) -> bool | None:
    """:func:`takes_writes_asked` for a 25006 met inside a savepoint: the transaction must
    stay the application's, which may roll back to the savepoint and go on. So the innermost
    savepoint is rolled back to (the only thing, beside a rollback, that a failed transaction
    allows; it stays, emptied), the server asked in the transaction (what it answers is the
    server's: its recovery, and its default read mode with where that comes from, not the
    transaction's own mode), then the transaction failed again in the savepoint, as the
    refusal left it: the application's rollback to the savepoint (a ``begin_nested()`` block
    does it as the error leaves it) finds the transaction as it was when the savepoint was
    made, and a statement sent before it is refused (25P02) as before. None where the
    savepoint's name is not known (see :func:`innermost_savepoint`), on a driver the library
    does not mark, or where asking failed. (A savepoint made by a ``SAVEPOINT`` statement
    inside the innermost one SQLAlchemy made is gone with its rolling back, as a 25006 outside
    one's ends the whole transaction.)"""
    name = innermost_savepoint(connection)
    if name is None:
        return None
    savepoint = connection.dialect.identifier_preparer.quote(name)
    dbapi_connection, driver = _connections_of(connection)
    if dbapi_connection is None or not isinstance(
        driver, (asyncpg.Connection, psycopg.Connection, psycopg.AsyncConnection)
    ):
        return None
    try:
        with library_work():
            # (through the DBAPI cursor: SQLAlchemy's asyncpg adapter knows its transaction is
            # begun, psycopg that its connection is in one; in autocommit too, where the
            # application began the transaction with a BEGIN statement)
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"ROLLBACK TO SAVEPOINT {savepoint}")
                try:
                    cursor.execute(_READ_MODE_NOW_SQL)
                    row = cursor.fetchone()
                finally:
                    with contextlib.suppress(Exception):
                        cursor.execute(_FAILING_SQL)
            finally:
                cursor.close()
    except Exception:  # (a connection lost meanwhile: its next use says so)
        return None
    if row is None:
        return None
    return takes_writes_now(row[0], row[1], row[2])


#: a statement that fails wherever it is sent (see :func:`_fail_again`), saying why in the
#: server's log, with the refusal's own SQLSTATE (any error would do: one that fails to
#: parse, where plpgsql is not installed, fails the transaction all the same)
_FAILING_SQL: Final = (
    "DO $$BEGIN RAISE EXCEPTION 'resilient_db: this transaction was refused a write (25006) "
    "and stays failed until its rollback (the server was asked whether it takes writes)' "
    "USING ERRCODE = '25006'; END$$"
)


def _fail_again(dbapi_connection: Any, *, begin: bool = False) -> None:
    """Leave ``dbapi_connection`` (the application's transaction failed, rolled back by
    :func:`takes_writes_asked` to ask the server) in a failed transaction again, as PostgreSQL
    left it: a statement the application sends next before its rollback is refused (25P02,
    in_failed_sql_transaction) instead of running in a new transaction (or, in autocommit,
    committing on its own), which a commit would keep without what came before the refusal.
    Through the DBAPI cursor, which begins the transaction (SQLAlchemy's asyncpg adapter knows
    it began one); its statement's error is the point. In autocommit, nothing, unless
    ``begin``: the application had begun a transaction itself (a ``BEGIN`` statement), which
    is begun again by one."""
    if dbapi_connection.autocommit and not begin:
        return
    cursor = dbapi_connection.cursor()
    try:
        with contextlib.suppress(Exception):
            if begin:
                cursor.execute("BEGIN")
            cursor.execute(_FAILING_SQL)
    finally:
        cursor.close()


def _autocommit_row(dbapi_connection: Any, sql: str) -> Any:
    """The one row ``sql`` answers on a psycopg DBAPI connection (SQLAlchemy's adapter for the
    async one), sent outside any transaction: its autocommit set for the statement, as it was
    after (unless the connection closed meanwhile)."""
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(sql)
            return cursor.fetchone()
        finally:
            cursor.close()
    finally:
        if not dbapi_connection.closed:
            dbapi_connection.autocommit = autocommit


def _fetch_value(cursor: Any, sql: str) -> Any:
    """The first column of the one row ``sql`` answers, on a DBAPI ``cursor``."""
    cursor.execute(sql)
    return cursor.fetchone()[0]


def uninstall_commit_markers(
    bind_or_op: InstallTarget, *, lock_timeout: float | None = INSTALL_LOCK_TIMEOUT
) -> None:
    """Remove the commit markers (the downgrade of :func:`install_commit_markers`), and the
    schema ``resilient_db`` the install made when nothing else is in it (otherwise it stays,
    with a WARNING from the server naming what is left; so does one this role may not drop, a
    schema another role made for the install). ``lock_timeout``: as for the install (its
    ``DROP TABLE`` asks for an ACCESS EXCLUSIVE lock on the markers, which every writing
    unit's COMMIT then waits behind; checked by ``run_statements`` before anything is sent)."""
    _run_statements(
        bind_or_op,
        _uninstall_statements(),
        lock_timeout=lock_timeout,
        name="uninstall_commit_markers",
    )


#: The objects' identity (their oids): an engine asks who owns them (:func:`_owners_sql`) only
#: when it differs from the last set it judged. Owners' lookups cost a new backend 4-10 ms
#: (cold catalog caches): asked on every connection, they weighed on every unit of a
#: ``NullPool`` engine, and most of all where nothing is installed. The oids make a verdict
#: safe to keep: objects dropped (with the schema, by a trusted role) and made again by another
#: role are new objects, with new oids, judged anew.
_IDENTITY_SQL = (
    "pg_catalog.concat_ws(' ', "
    + ", ".join(f"pg_catalog.{lookup}::pg_catalog.oid" for _, _, _, lookup in _RELIED_ON)
    + ")"
)
# Whether the markers are usable by the role this connection is (the claim's fence and the
# prepared INSERT run with its rights): installed, and the role may call the functions and read
# and write the table. A role that may not (a grant forgotten, a role set at connect) uses the
# fallback, which the warning of a missing install names, rather than failing every COMMIT (a
# role without USAGE on the schema makes the lookups fail: the fallback too). Objects are found
# by name (``to_reg*``: NULL when missing), not by joining the catalogs: on a new backend, whose
# caches are cold, the joins cost about 2 ms more, paid by every connection a pool makes (every
# unit, with ``NullPool``). Then the server's time, and the objects' identity.
_SAFE_NAMES = "{" + ",".join(SAFE_CALL_NAMES) + "}"
# The database's own functions and aggregates (not an extension's) named as a built-in a plain
# SELECT may call and still be read-only (see _statements.distrust_calls), space-separated;
# whatever their volatility: a STABLE one may call one that writes, and an aggregate is
# IMMUTABLE to the catalog whatever its state function does. Asked once per engine, by its first
# connection (on a new backend, whose catalog caches are cold, it costs about 3 ms: every
# connection of a NullPool engine would pay it).
_SHADOWED_SQL = f"""pg_catalog.array_to_string(ARRAY(SELECT DISTINCT p.proname::text
    FROM pg_catalog.pg_proc p
    WHERE p.proname OPERATOR(pg_catalog.=) ANY ('{_SAFE_NAMES}'::pg_catalog.name[])
    AND p.pronamespace OPERATOR(pg_catalog.<>) 'pg_catalog'::pg_catalog.regnamespace
    AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
      WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
      AND d.objid OPERATOR(pg_catalog.=) p.oid AND d.deptype OPERATOR(pg_catalog.=) 'e')), ' ')"""
# On a primary, the server's timeline (see CommitProtocol._fence): that of the current WAL
# insert position, in hex (a promoted standby writes on a new timeline at once;
# pg_control_checkpoint()'s timeline_id waits for the next checkpoint, minutes after a fast
# promotion), read from memory. NULL on a standby, where pg_walfile_name() is refused (55000):
# a standby is never fenced. A role may not call one of the functions (revoked from PUBLIC: a
# hardening; a CASE does not spare the statement the server's check of EXECUTE, made when it
# starts): the check is made again without it (_CHECK_UNFENCED_SQL), once per engine.
_TIMELINE_SQL = (
    "CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL ELSE pg_catalog.substr("
    "pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8) END"
)
# The server's cluster: its system identifier (made by initdb, kept by its standbys, base
# backups and pg_rewind). pg_control_system() reads the control file from disk at each call
# (measured on a new backend: about 0.15 ms of the check's 1.2 ms, where the timeline costs
# 0.04 ms), so it is asked apart, on the same connection, only of a connection whose timeline
# is not the highest the engine has seen (see CommitProtocol._fence).
_SYSTEM_SQL = "SELECT s.system_identifier::text FROM pg_catalog.pg_control_system() s"
_CHECK_SQL = f"""SELECT COALESCE(
  pg_catalog.has_schema_privilege(pg_catalog.to_regnamespace('{SCHEMA}'), 'USAGE')
  AND pg_catalog.has_function_privilege(
    pg_catalog.to_regprocedure('{SCHEMA}.claim_commit(pg_catalog.uuid,integer)'), 'EXECUTE')
  AND pg_catalog.has_function_privilege(
    pg_catalog.to_regprocedure('{SCHEMA}.mark_commit(pg_catalog.uuid)'), 'EXECUTE')
  AND pg_catalog.has_table_privilege(
    pg_catalog.to_regclass('{SCHEMA}.commit_markers'), 'INSERT')
  AND pg_catalog.has_table_privilege(
    pg_catalog.to_regclass('{SCHEMA}.commit_markers'), 'SELECT')
  -- mark_commit and the prune ask the login role's right (a role switched to needs none): a
  -- role set at connect (SET ROLE in a connect listener) whose login role may not is not enough
  AND pg_catalog.has_table_privilege(session_user,
    pg_catalog.to_regclass('{SCHEMA}.commit_markers'), 'INSERT'), false),
  extract(epoch FROM pg_catalog.clock_timestamp())::float8,
  {_IDENTITY_SQL},
  -- whether the role may read the incarnation (see _INCARNATION), asked here so that a role
  -- that may not is never refused at a unit's COMMIT (psycopg and asyncpg both give a bool)
  pg_catalog.has_function_privilege('pg_catalog.pg_control_checkpoint()', 'EXECUTE'),
  -- "replica" (a role's or database's setting): no ordinary trigger fires on the connection,
  -- the transition trigger's and the foreign keys' among them (see _note_replication_role)
  pg_catalog.current_setting('session_replication_role'),
  {_TIMELINE_SQL}"""
#: the check without the timeline, for an engine whose role may not read it
_CHECK_UNFENCED_SQL = _CHECK_SQL.replace(_TIMELINE_SQL, "NULL::text")
#: Added to the check where the server reports ``default_transaction_read_only`` on: where
#: that comes from (the role's or the URL's settings make a write refused there the
#: application's, see ``_classify.note_read_only_source``). pg_settings builds every setting's
#: row: asked only there, not on every connection.
_READ_ONLY_SOURCE_SQL = """,
  (SELECT s.source FROM pg_catalog.pg_settings s
    WHERE s.name OPERATOR(pg_catalog.=) 'default_transaction_read_only')"""


def _check_sql(driver: Any, fenced: bool = True) -> str:
    """The check at connect for ``driver``'s connection (see ``_READ_ONLY_SOURCE_SQL``);
    without the cluster and timeline unless ``fenced``."""
    check = _CHECK_SQL if fenced else _CHECK_UNFENCED_SQL
    if read_only_reported(driver):
        return check + _READ_ONLY_SOURCE_SQL
    return check


def _note_read_only_source(driver: Any, row: Any) -> None:
    """What the check said of where ``default_transaction_read_only`` comes from, if asked."""
    if len(row) > _CHECK_COLUMNS:
        note_read_only_source(driver, row[_CHECK_COLUMNS])


#: the columns of ``_CHECK_SQL`` (where ``default_transaction_read_only`` is reported on it
#: has one more)
_CHECK_COLUMNS: Final = 6
#: the SQLSTATE classes of an error the check's cluster and timeline columns may meet where
#: the server does not give them to the role: 42 (42501, EXECUTE revoked from PUBLIC; 42883,
#: a function a server built from PostgreSQL lacks), 0A (a managed service's fork that does
#: not support reading its WAL position), 55 (a state the functions refuse) and 58, XX (the
#: control file unreadable, a fork's internal error). The check is then made again without
#: them (see CommitProtocol._timeline_unreadable); an error of another class (a lost
#: connection, a cancellation) is the check's own
_TIMELINE_REFUSALS: Final = ("42", "0A", "55", "58", "XX")


def _timeline_refused(exc: BaseException) -> str | None:
    """The SQLSTATE of ``exc`` when it is one the check's cluster and timeline columns may
    have met (:data:`_TIMELINE_REFUSALS`), else None."""
    code = sqlstate_of(exc)
    return code if code is not None and code[:2] in _TIMELINE_REFUSALS else None


#: the clusters (system identifiers) an engine keeps the highest timeline of: the oldest is
#: forgotten past this many (an engine's URL reaches one cluster, or a few over its life)
_MAX_CLUSTERS: Final = 16


# What keeps an installed set of markers from being usable by the connection's role, asked
# once per engine when the check says they are not (before its warning): each missing right
# or object named, NULL when nothing is installed (no table). Every lookup is guarded so that
# it never fails: no USAGE on the schema, say, is itself the answer.
_MISSING_SQL = """SELECT CASE
  WHEN pg_catalog.to_regnamespace('{s}') IS NULL THEN NULL
  WHEN NOT pg_catalog.has_schema_privilege(pg_catalog.to_regnamespace('{s}'), 'USAGE')
    THEN pg_catalog.format('role %s lacks USAGE on schema {s}', current_user)
  WHEN pg_catalog.to_regclass('{s}.commit_markers') IS NULL THEN NULL
  ELSE NULLIF(pg_catalog.concat_ws(', ',
    CASE WHEN pg_catalog.to_regprocedure('{s}.claim_commit(pg_catalog.uuid,integer)') IS NULL
      THEN 'function {s}.claim_commit(uuid, integer) is missing (installed by an earlier release)'
      WHEN NOT pg_catalog.has_function_privilege(
        pg_catalog.to_regprocedure('{s}.claim_commit(pg_catalog.uuid,integer)'), 'EXECUTE')
      THEN pg_catalog.format('role %s lacks EXECUTE on {s}.claim_commit(uuid, integer)',
        current_user) END,
    CASE WHEN pg_catalog.to_regprocedure('{s}.mark_commit(pg_catalog.uuid)') IS NULL
      THEN 'function {s}.mark_commit(uuid) is missing'
      WHEN NOT pg_catalog.has_function_privilege(
        pg_catalog.to_regprocedure('{s}.mark_commit(pg_catalog.uuid)'), 'EXECUTE')
      THEN pg_catalog.format('role %s lacks EXECUTE on {s}.mark_commit(uuid)', current_user)
      END,
    CASE WHEN NOT pg_catalog.has_table_privilege(
        pg_catalog.to_regclass('{s}.commit_markers'), 'INSERT')
      THEN pg_catalog.format('role %s lacks INSERT on {s}.commit_markers', current_user) END,
    CASE WHEN NOT pg_catalog.has_table_privilege(
        pg_catalog.to_regclass('{s}.commit_markers'), 'SELECT')
      THEN pg_catalog.format('role %s lacks SELECT on {s}.commit_markers', current_user) END,
    CASE WHEN session_user OPERATOR(pg_catalog.<>) current_user
      AND NOT pg_catalog.has_table_privilege(session_user,
        pg_catalog.to_regclass('{s}.commit_markers'), 'INSERT')
      THEN pg_catalog.format('login role %s lacks INSERT on {s}.commit_markers',
        session_user) END), '')
  END""".replace("{s}", SCHEMA)


#: the markers' version, as their table's comment names it (see ``_MARKERS_COMMENT``): asked
#: with the owners, once per set of objects
#: what _VERSION_SQL answers when the table is gone (uninstalled since the connection looked:
#: an uninstall and install again running): nothing to say of its version
_NOT_INSTALLED = "(not installed)"
_VERSION_SQL = (
    f"SELECT CASE WHEN pg_catalog.to_regclass('{SCHEMA}.commit_markers') IS NULL THEN "
    f"'{_NOT_INSTALLED}' ELSE COALESCE(pg_catalog.obj_description("
    f"pg_catalog.to_regclass('{SCHEMA}.commit_markers'), 'pg_class'), '') END"
)
_VERSION_IN_COMMENT = re.compile(r"commit markers, version ([0-9]+)")


def _owners_sql(owner: str | None) -> str:
    """The objects the markers rely on that belong to a role the connection has no reason to
    trust (:func:`_untrusted_sql`: NULL when none), asked once per set of objects (see above)."""
    return f"SELECT {_untrusted_sql(owner)}"


#: A marker's id carries the client's time, and a claim refuses markers CLAIM_HORIZON older than
#: the newest marker, which the other clients write (they may have been pruned). A client whose
#: clock is behind the server's (taken for the other clients') by more than this is warned (once
#: per engine): its lost COMMIT answers can be verified only for CLAIM_HORIZON minus that much,
#: then end unknown. Safety does not depend on it: the prune and the claim judge by the same
#: data, the ids.
CLOCK_BEHIND_WARNING: Final = 60.0

# The fallback's evidence: the xid, and what changes when the server restarts or recovers from
# a crash (a new postmaster, or the end-of-recovery checkpoint of a reinitialised one).
# NULL where the role may not read the control file: "committed" is then never trusted. (The
# CASE does not spare such a role the server's check of its right to call the function, made
# when the statement starts: a connection whose role may not call it reads the xid alone, see
# ``_control_unreadable``.)
_INCARNATION = (
    "CASE WHEN pg_catalog.has_function_privilege('pg_catalog.pg_control_checkpoint()', "
    "'EXECUTE') THEN pg_catalog.pg_postmaster_start_time()::text || ' ' || "
    "(SELECT redo_lsn::text || ' ' || timeline_id::text FROM pg_catalog.pg_control_checkpoint()) "
    "END"
)
_XID_SQL = f"SELECT pg_catalog.pg_current_xact_id_if_assigned()::text, {_INCARNATION}"
# A transaction that may have written without a local xid (a notification, whose xid the
# server assigns during COMMIT; a foreign table's rows; a held cursor's query, run during
# COMMIT: see ``_statements.WRITES``) gets its xid now: in the query that reads it before COMMIT
# (the fallback's; a notification's where the marker function may write no marker), or first
# in a COMMIT message that calls the marker function, so that the function's condition holds.
_XID_ASSIGN_SQL = f"SELECT pg_catalog.pg_current_xact_id()::text, {_INCARNATION}"
_ASSIGN_XID = "SELECT pg_catalog.pg_current_xact_id(); "
#: the two without the incarnation, for a connection whose role may not read it
_XID_SQL_ALONE = _XID_SQL.replace(_INCARNATION, "NULL::text")
_XID_ASSIGN_SQL_ALONE = _XID_ASSIGN_SQL.replace(_INCARNATION, "NULL::text")
#: the driver connections whose role may not read the incarnation (``pg_control_checkpoint()``
#: not executable by it: a hardening), found by the check at connect (``_CHECK_SQL``) or by a
#: refusal (a unit that switched roles, see ``_xid_read_failed``): their xid reads leave it out
#: (see ``CommitTicket.xid_sql``)
_control_unreadable: weakref.WeakSet[Any] = weakref.WeakSet()
#: the identity (``_IDENTITY_SQL``) of the markers' objects each driver connection found when
#: it was set up for them: a claim that fenced a missing marker asks whether they were made
#: again since (see ``_maybe_before_table``)
_identities: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


@dataclass(slots=True, eq=False)
class Fence:
    """What a connection's check at connect found of its server (see
    ``CommitProtocol._fence``), kept in the pool's record with the connection (see
    ``EngineHooks.checkout``) and judged again at checkout under a newer fence token. Updated
    in place where it is judged again (a checkout compares ``token`` alone: slots, no dict)."""

    #: the fence token it was last judged under (None: not judged yet)
    token: object
    #: its cluster, the server's system identifier (None: nothing to judge, a standby, or an
    #: unfenced engine)
    system: str | None
    timeline: int
    server: str
    #: the cluster was taken, unasked, for the one seen on its timeline (asked before it is
    #: ever refused: see ``CommitProtocol.judge_pooled``)
    unasked: bool


#: what a connection's check at connect found of its server, per driver connection
_fences: weakref.WeakKeyDictionary[Any, Fence] = weakref.WeakKeyDictionary()
# Parameters travel as text: asyncpg has no text encoder for xid8 or uuid parameters given as str.
_XID_STATUS = (
    "SELECT {incarnation}, "
    # at or above the checking transaction's own xid (the newest one handed out): never assigned
    # since the restart that lost it. (A snapshot's xmax would not do: an open transaction's xid
    # can be above it.)
    "CASE WHEN CAST(CAST(:xid AS text) AS xid8) >= pg_catalog.pg_current_xact_id() "
    "THEN 'future' "
    "ELSE pg_catalog.pg_xact_status(CAST(CAST(:xid AS text) AS xid8)) END"
)
XID_STATUS_SQL = text(_XID_STATUS.format(incarnation=_INCARNATION))
#: the check of a ticket read without the incarnation: "committed" can't be trusted there, and
#: asking for it would be refused (42501) where the xid read was, turning "aborted" unknown too
XID_STATUS_ALONE_SQL = text(_XID_STATUS.format(incarnation="NULL::text"))
#: sent before a claim: its fence is a write, also where transactions are read-only by default
#: (``default_transaction_read_only``), which the unit it settles had overridden to write
READ_WRITE_SQL = text("SET TRANSACTION READ WRITE")
CLAIM_WAIT_MS: Final = 2000  # a claim waits this long for an original still committing
CLAIM_SQL = text(
    f"SELECT {SCHEMA}.claim_commit(CAST(CAST(:marker AS pg_catalog.text) AS pg_catalog.uuid), "
    f"{CLAIM_WAIT_MS})"
)
#: :data:`CLAIM_SQL` as asyncpg takes it (sent by asyncpg itself: see :func:`claim`)
CLAIM_SQL_ASYNCPG: Final = (
    f"SELECT {SCHEMA}.claim_commit(CAST(CAST($1 AS pg_catalog.text) AS pg_catalog.uuid), "
    f"{CLAIM_WAIT_MS})"
)
#: the time a claim is given on the server: its wait, and a second for the rest
CLAIM_TIMEOUT_MS: Final = CLAIM_WAIT_MS + 1000
#: sent before a claim: the application's statement_timeout (and PostgreSQL 17's
#: transaction_timeout, which can only be switched off inside a transaction), where shorter than
#: the claim's time, would cut the claim's wait for an original still committing and turn an
#: outcome the wait would have known into "unknown". Raised for the claim's transaction only;
#: settings a server does not have are not in ``pg_settings``, so this runs on any version.
CLAIM_TIMEOUTS_SQL = text(
    "SELECT pg_catalog.set_config(name, CASE name WHEN 'statement_timeout' "
    f"THEN '{CLAIM_TIMEOUT_MS}' ELSE '0' END, true) FROM pg_catalog.pg_settings "
    "WHERE name IN ('statement_timeout', 'transaction_timeout') "
    f"AND setting::integer BETWEEN 1 AND {CLAIM_TIMEOUT_MS - 1}"
)
#: how long the client waits for a claim's answer (asyncpg's ``command_timeout``, where
#: shorter, is raised to this for the claim): past the server's bound, so that the server's
#: answer, not the client's impatience, ends it
CLAIM_CLIENT_TIMEOUT: Final = CLAIM_TIMEOUT_MS / 1000 + 1.0


def claim(connection: Connection, ticket: CommitTicket) -> str | None:
    """``resilient_db.claim_commit`` of ``ticket``'s marker on ``connection`` (in the READ
    COMMITTED transaction begun for it); its answer. The claim is given its whole wait whatever the
    application's timeouts (:data:`CLAIM_TIMEOUTS_SQL`, and asyncpg's ``command_timeout``):
    a claim they cut short could only answer "unknown" for a COMMIT still running, whose
    outcome the wait would have known. asyncpg: sent by asyncpg itself with a timeout of its
    own (``timeout=`` overrides ``command_timeout`` for the one call; SQLAlchemy's adapter
    passes none), through SQLAlchemy's ``run_async``, in the transaction begun above.

    Besides the function's answers, ``"installed again"``: the marker may have been written to
    a markers table that was dropped since (the markers uninstalled and installed again while
    the answer awaited this check), where the function found it missing ("fenced") or judged
    it written before the new table ("unknown")."""
    connection.execute(READ_WRITE_SQL)
    connection.execute(CLAIM_TIMEOUTS_SQL)
    adapted = connection.connection.dbapi_connection
    if isinstance(connection.connection.driver_connection, asyncpg.Connection):
        marker = ticket.marker
        wait = library_wait(CLAIM_CLIENT_TIMEOUT, STALL_FLOOR)  # (as psycopg's stall cut)
        status = adapted.run_async(  # type: ignore[union-attr]
            lambda driver: driver.fetchval(CLAIM_SQL_ASYNCPG, marker, timeout=wait)
        )
    else:
        status = connection.execute(CLAIM_SQL, {"marker": ticket.marker}).scalar()
    if (
        status in ("fenced", "unknown")
        and ticket.marker
        and _maybe_before_table(connection, ticket)
    ):
        return INSTALLED_AGAIN
    return None if status is None else str(status)


#: a claim's answer for a marker that may have gone with a markers table dropped since (see
#: :func:`claim`)
INSTALLED_AGAIN: Final = "installed again"


#: seconds this host's clock may have moved against the server's between a unit's COMMIT and
#: its check (a slew by NTP: at most half a millisecond per second), besides the round trip
#: that bounds the measured difference (see :func:`_maybe_before_table`)
CLOCK_MARGIN: Final = 1.0
_SINCE_SET_UP_SQL = text(
    f"SELECT {_IDENTITY_SQL}, pg_catalog.to_regclass(:born) IS NOT NULL"
).bindparams(born=f"{SCHEMA}.commit_markers_born")
_BORN_AND_CLOCK_SQL = text(
    "SELECT extract(epoch FROM pg_catalog.clock_timestamp())::float8, "
    f"(SELECT born::text FROM {SCHEMA}.commit_markers_born LIMIT 1)"
)


def _maybe_before_table(connection: Connection, ticket: CommitTicket) -> bool:
    """Whether the COMMIT of ``ticket``'s marker, which a claim found missing and fenced, may
    have been sent before the markers' table was made (the markers uninstalled and installed
    again while its answer awaited this check: it went with the old table, and its absence
    proves nothing). Only on the rare path of a lost answer found not committed.

    The markers' objects the same as when the COMMIT's connection was set up (their oids, see
    ``_IDENTITY_SQL``; the set-up comes before any COMMIT of it): not made again since, the
    claim stands. Otherwise the claim judged by the ids alone (``marker < born``,
    ``commit_markers_born``), but a marker's id carries this host's clock and ``born`` the
    server's: with this host's clock ahead, a marker written to the old table looks younger
    than the new one, and the committed unit would be replayed. So its time is compared here
    in this host's terms: the server's clock read before this host's, which bounds how far
    ahead this host is, with :data:`CLOCK_MARGIN` for a slew since the COMMIT. No
    ``commit_markers_born`` (an install of version 5, which a warning says is outdated):
    nothing to compare, the claim stands."""
    identity, has_born = connection.execute(_SINCE_SET_UP_SQL).one()
    seen = _identities.get(ticket.driver) if ticket.driver is not None else None
    if (seen is not None and seen == identity) or not has_born:
        return False
    # (this host's clock as marker ids read it)
    server_now, born = connection.execute(_BORN_AND_CLOCK_SQL).one()
    received = time.time()
    if born is None:  # (an empty table: made by hand; the install writes its row)
        return True
    # this host's clock minus the server's, at most: the server read its clock before this
    # host's ``received``
    ahead = received - float(server_now)
    born_here = _uuid7_seconds(str(born)) + ahead
    return _uuid7_seconds(str(ticket.marker)) <= born_here + CLOCK_MARGIN


def _uuid7_seconds(value: str) -> float:
    """The Unix time (seconds) of a version 7 UUID's text: its first 48 bits, milliseconds."""
    return int(value.replace("-", "")[:12], 16) / 1000.0


# -- a check's "committed" made durable as the server promises ------------------------------------
# With synchronous replication a COMMIT is answered once a synchronous standby has the commit
# record; while it waits, the transaction is committed on the primary alone. When that wait is
# cut short (the client cancels the COMMIT, as asyncpg's ``command_timeout`` does; an operator
# cancels or terminates the waiting backend) the server keeps the commit on the primary only:
# a cancelled wait even answers the COMMIT with success and the WARNING "canceling wait for
# synchronous replication". A check that finds such a unit committed, on the primary, proves
# nothing a failover keeps: the promoted standby may never have had it. So a check that finds
# the unit committed writes WAL of its own (:data:`REPLICATED_WRITE_SQL`) where synchronous
# replication is in effect, and commits: its COMMIT record lies past the unit's, so a COMMIT
# answered plainly proves the unit's replicated as the server promises
# (``synchronous_commit``). One cut off after :data:`REPLICATION_WAIT`, or answered with a
# warning, or failed, proves nothing: the referee checks again, and ends unknown.
#: the WAL the check writes where synchronous replication is in effect (a row; none where it is
#: not: nothing to wait for). A transactional logical-decoding message: it takes an xid and
#: writes WAL, so the transaction's COMMIT waits for the synchronous standbys as a unit's does;
#: it needs no table, so it serves the fallback (no markers) too, and it works at any
#: ``wal_level``. Executable by every role unless revoked (then 42501: the outcome is unknown).
#: (A transaction that only takes an xid, ``pg_current_xact_id()``, writes a commit record
#: without waiting for anyone: the server waits only for transactions that wrote WAL.)
#: The warning of a cancelled wait must reach the check, whatever the database or role set:
#: ``client_min_messages`` at ``warning`` for the transaction (the server reports the cancelled
#: wait before it resets the transaction's settings).
#:
#: The level the check's COMMIT waits at (``synchronous_commit``, for its transaction only).
#: "Done" must hold for the level the unit ran with, which the check can't know: a unit may
#: raise its own (``SET LOCAL synchronous_commit = on`` in a session whose level is ``local``
#: or ``off``: PostgreSQL's documented way to replicate only the transactions that matter), and
#: that is not reported to the client (asking would cost every unit a statement). So wherever
#: ``synchronous_standby_names`` is set the check waits, at the session's level (the server's,
#: role's or database's, or the connect options': the check's connection shares them with the
#: unit's), raised to ``on`` where that waits for no standby (``off``, ``local``). ``on`` is
#: what "durable on the standby" must mean for a failover: the standby has flushed the WAL, and
#: a promoted standby replays everything it flushed. ``remote_apply`` is not imposed on every
#: check: a synchronous standby that never applies WAL (``pg_receivewal --synchronous``, as WAL
#: archivers run it) would never confirm it, and every check there would end unknown
#: (PostgreSQL's documentation warns of exactly that block). A session at ``remote_apply`` keeps
#: it; a unit that raised only its own transaction to ``remote_apply`` is proven durable on the
#: standby (``on``), not visible there yet.
#:
#: Its row also counts the server's WAL senders that may confirm (``pg_stat_replication``
#: lists one for every role, its ``sync_state`` only for privileged ones: an ``async`` one, a
#: logical sender of a change-data-capture tool say, can't confirm, and is left out where it
#: is shown): none while ``synchronous_standby_names`` is set means no standby can confirm
#: anything (stopped, or a promoted standby still naming the primary it replaced), which the
#: referee reports once (see ``CommitReferee``).
#: (The settings are changed in the select list, which the server evaluates only once the
#: WHERE has held.)
REPLICATED_WRITE_SQL = text(
    "SELECT pg_catalog.set_config('client_min_messages', 'warning', true) IS NOT NULL "
    "AND pg_catalog.set_config('synchronous_commit', CASE WHEN "
    "pg_catalog.current_setting('synchronous_commit') IN ('off', 'local') THEN 'on' "
    "ELSE pg_catalog.current_setting('synchronous_commit') END, true) IS NOT NULL "
    "AND pg_catalog.pg_logical_emit_message(true, 'resilient_db', CAST(:what AS text)) "
    "IS NOT NULL, (SELECT pg_catalog.count(*) FROM pg_catalog.pg_stat_replication "
    "WHERE sync_state IS DISTINCT FROM 'async'), "
    "pg_catalog.current_setting('synchronous_standby_names') "
    "WHERE pg_catalog.current_setting('synchronous_standby_names') <> ''"
)
#: seconds the first check's COMMIT may wait for the synchronous standbys before it is cut off
#: (the server bounds it with nothing: ``statement_timeout`` ends before a COMMIT's wait
#: begins); each later check of the same unit waits twice as long as the one before, up to
#: :data:`REPLICATION_WAIT_CAP`, so that a standby slower than the first wait (replay lag, a
#: slow link) still proves the unit within the deadline
REPLICATION_WAIT: Final = 2.0
REPLICATION_WAIT_CAP: Final = 30.0


def replication_wait(proofs: int) -> float:
    """How long the ``proofs``-th check (0-based) of a unit waits for the standbys."""
    return min(REPLICATION_WAIT * 2.0 ** min(proofs, 8), REPLICATION_WAIT_CAP)


#: the shortest wait a check's COMMIT is given, however little of the deadline is left (a
#: COMMIT that needs no standby is answered in milliseconds; a cut sooner than that would only
#: turn a fence the server did commit into "check again")
REPLICATION_WAIT_FLOOR: Final = 0.25


def replication_wait_within(proofs: int, left: float | None) -> float:
    """How long the ``proofs``-th check waits for the standbys when ``left`` seconds remain
    before the unit's deadline (None: no deadline): :func:`replication_wait`, cut to what is
    left (at least :data:`REPLICATION_WAIT_FLOOR`), so that the last check does not overrun
    the deadline by a whole growing wait."""
    wait = replication_wait(proofs)
    if left is None:
        return wait
    return max(min(wait, left), REPLICATION_WAIT_FLOOR)


@dataclass(frozen=True)
class PastCommit:
    """What the check's write past the unit's commit found (see :func:`wrote_past_commit`)."""

    senders: int  # the server's WAL senders (any standby connected, synchronous or not)
    standby_names: str  # its ``synchronous_standby_names``


def wrote_past_commit(connection: Connection, what: str) -> PastCommit | None:
    """In the check's transaction on ``connection``, which found a unit committed: write WAL
    (:data:`REPLICATED_WRITE_SQL`, ``what`` naming the unit) where synchronous replication is
    in effect, to be confirmed at least at ``on``; what it found where it did (the
    transaction's COMMIT must then be proven, see :func:`end_check`), None where it did not."""
    row = connection.execute(REPLICATED_WRITE_SQL, {"what": what}).first()
    if row is None or not row[0]:
        return None
    return PastCommit(int(row[1]), str(row[2]))


def end_check(connection: Connection, *, proving: bool, wait: float = REPLICATION_WAIT) -> bool:
    """COMMIT the check's transaction on ``connection``, cut off after
    :data:`REPLICATION_WAIT` (a claim's fence waits for the synchronous standbys too, and the
    server bounds that wait with nothing: ``statement_timeout`` ends before it begins).

    ``proving`` (the check wrote WAL past the unit's commit, see :func:`wrote_past_commit`):
    True only when the server answered plainly in time, the synchronous standbys having
    confirmed it; not when it was cut off, failed, or was answered with a warning (a wait
    cancelled by someone else). Otherwise True when the server answered it at all (a fence
    committed on the primary is enough: the unit can no longer commit there). False: the
    check proves nothing, check again. The connection is invalidated after a cut or an error
    (a cancel request may still be on its way to it)."""
    driver = connection.connection.driver_connection
    warnings: list[str] = []
    try:
        with warnings_into(driver, warnings), _cut_off_after(driver, wait) as cut:
            connection.commit()
        cut_off = cut()
    except Exception:
        debug_failure(log_session, "the check's COMMIT failed: the check proves nothing")
        connection.invalidate()
        return False
    if cut_off:
        connection.invalidate()
    if proving and (cut_off or warnings):
        log_quietly(
            log_session,
            logging.DEBUG,
            "the check's COMMIT was %s: not proven replicated",
            f"answered with {'; '.join(warnings)}" if warnings else "cut off",
        )
        return False
    return True


@contextlib.contextmanager
def warnings_into(driver: Any, warnings: list[str]) -> Iterator[None]:
    """The server's warnings to ``driver`` (psycopg's notices, asyncpg's log messages) while
    inside, appended to ``warnings``. asyncpg hands a log message to its listener with the
    loop's ``call_soon``, which runs it before the statement's answer wakes its waiter."""
    if isinstance(driver, asyncpg.Connection):

        def listener(_connection: Any, message: Any) -> None:
            if getattr(message, "severity_en", None) == "WARNING":
                warnings.append(commit_warning(message.sqlstate, message.message))

        driver.add_log_listener(listener)
        try:
            yield
        finally:
            driver.remove_log_listener(listener)
        return

    def handler(diagnostic: Any) -> None:
        if diagnostic.severity_nonlocalized == "WARNING":
            warnings.append(commit_warning(diagnostic.sqlstate, diagnostic.message_primary))

    driver.add_notice_handler(handler)
    try:
        yield
    finally:
        driver.remove_notice_handler(handler)


#: seconds a cancel request sent to cut a statement off is given to end it (psycopg): then the
#: connection's socket is shut down (see :class:`_Cut`), as for a server that answers nothing
CANCEL_GRACE: Final = 1.0
#: seconds the library waits for the answers of its own statements on psycopg (a check of a
#: lost COMMIT answer, before its COMMIT; a prune of expired markers; the set-up of a check's
#: connection) before it shuts the connection's socket down (see :func:`stall_cut`): a frozen
#: server (its processes stopped, a paused VM: TCP up, the kernel acknowledging, nothing
#: answering) is no longer waited for without end. The claim's own bound on the server is
#: :data:`CLAIM_TIMEOUT_MS`; the other statements take milliseconds.
STALLED_AFTER: Final = CLAIM_CLIENT_TIMEOUT
#: the shortest the library's own statements are given on a server that may be frozen, however
#: little is left of the deadline (see :func:`library_wait`): a healthy server answers them in
#: milliseconds, a loaded one in well under a second; a claim waiting for an original still
#: committing (up to :data:`CLAIM_WAIT_MS`) cut sooner answers nothing, and the check counts as
#: one that did not reach the server (the unit then ends unknown: the deadline was spent)
STALL_FLOOR: Final = 1.0
#: the shortest a connect of the library's own is given, however little is left of the deadline:
#: libpq's own minimum ``connect_timeout`` (it takes 1 as 2); a new backend's start and
#: authentication take milliseconds on a healthy server, more when it is loaded
CONNECT_FLOOR: Final = 2

#: the seconds left of the deadline of the library's own work running in this context (a check
#: of a lost COMMIT answer, the end of a two-phase unit's prepared transactions), as a function
#: (the factory's clock); None where it has none (a prune: its own fixed bounds)
_time_left: contextvars.ContextVar[Callable[[], float] | None] = contextvars.ContextVar(
    "resilient_db.library_time_left", default=None
)


@contextlib.contextmanager
def within_deadline(left: Callable[[], float]) -> Iterator[None]:
    """The library's own waits inside (its connects, its statements on a server that may be
    frozen: see :func:`library_wait`) cut to ``left()``, the seconds left of the deadline."""
    token = _time_left.set(left)
    try:
        yield
    finally:
        _time_left.reset(token)


def time_left() -> float | None:
    """The seconds left of the deadline of the library's work running in this context (see
    :func:`within_deadline`); None where it has none."""
    left = _time_left.get()
    return None if left is None else left()


def library_wait(seconds: float, floor: float) -> float:
    """How long the library waits on its own (a connect, its statements) where it would wait
    ``seconds``: cut to what is left of the deadline of the work running (see
    :func:`within_deadline`), so that a unit with a deadline ends close to it on a frozen
    server, but never below ``floor`` (what a healthy server needs to answer)."""
    left = _time_left.get()
    if left is None:
        return seconds
    return max(floor, min(seconds, left()))


class _Cut:
    """Cutting a statement of psycopg's ``driver`` off from another thread (a timer's), on a
    server that may answer nothing at all. libpq has no client-side timeout for a statement,
    and its cancel request is a new connection to the postmaster, which a frozen server never
    answers. So the cut shuts the connection's socket down (``shutdown(SHUT_RDWR)`` on a
    duplicate of its descriptor, made at the start: shutdown acts on the socket both
    descriptors share): the driver's wait ends, the statement raises ``OperationalError`` and
    the connection is dead (it must be invalidated, never pooled). With ``cancel``, a cancel
    request goes first, for a server that is alive but slow (a COMMIT waiting for a synchronous
    standby, answered once cancelled), and the socket is shut down only if the statement has
    not ended :data:`CANCEL_GRACE` later. The cancel can't hold the timer: with libpq 17 or
    later it is a non-blocking cancel connection given up after :data:`CANCEL_GRACE`; with an
    older libpq, whose cancel blocks until the server answers, it is sent from a daemon thread
    of its own (which a server frozen for good keeps waiting).

    :meth:`end` (when the statement is over) makes any later firing do nothing; once it has
    returned, :meth:`fired` says for good whether the cut began (a cancel may then still be on
    its way to the connection)."""

    def __init__(self, driver: Any, *, cancel: bool) -> None:
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._fired = False
        self._cancel: Any = None
        self._socket: socket.socket | None = None
        try:
            fd = os.dup(driver.pgconn.socket)
        except (OSError, psycopg.Error):  # a connection already lost: nothing will wait on it
            return
        try:
            self._socket = socket.socket(fileno=fd)
        except BaseException:
            os.close(fd)
            raise
        if cancel:  # made here, in the driver's thread (no I/O)
            pgconn = driver.pgconn
            safe = psycopg.capabilities.has_cancel_safe()
            with contextlib.suppress(psycopg.Error):
                self._cancel = pgconn.cancel_conn() if safe else pgconn.get_cancel()

    def fired(self) -> bool:
        return self._fired

    def fire(self) -> None:
        """(the timer's thread) Cut the statement off, unless it has ended."""
        with self._lock:
            if self._ended.is_set():
                return
            self._fired = True
            cancel, self._cancel = self._cancel, None
        if cancel is not None:
            _send_cancel(cancel)
            if self._ended.wait(CANCEL_GRACE):
                return
        with self._lock:
            if self._socket is not None:
                with contextlib.suppress(OSError):
                    self._socket.shutdown(socket.SHUT_RDWR)

    def end(self) -> None:
        with self._lock:
            self._ended.set()
            sock, self._socket = self._socket, None
            cancel, self._cancel = self._cancel, None
        if sock is not None:
            sock.close()  # (the duplicate only)
        if cancel is not None and hasattr(cancel, "finish"):
            cancel.finish()


def _send_cancel(cancel: Any) -> None:
    """Send a cancel request (libpq 17's ``PGcancelConn``, given up after
    :data:`CANCEL_GRACE`; an older libpq's ``PGcancel`` from a daemon thread: see
    :class:`_Cut`). Its failure is no error of anyone's: the cut goes on."""
    if not hasattr(cancel, "poll"):
        threading.Thread(
            target=_quietly_cancel, args=(cancel.cancel,), name="resilient_db-cancel", daemon=True
        ).start()
        return
    try:
        cancel.start()
        ends = time.monotonic() + CANCEL_GRACE
        with selectors.DefaultSelector() as selector:
            while True:
                status = cancel.poll()
                if status == psycopg.pq.PollingStatus.READING:
                    events = selectors.EVENT_READ
                elif status == psycopg.pq.PollingStatus.WRITING:
                    events = selectors.EVENT_WRITE
                else:  # sent and answered, or failed
                    return
                left = ends - time.monotonic()
                if left <= 0:
                    return
                key = selector.register(cancel.socket, events)
                selector.select(left)
                selector.unregister(key.fileobj)
    except Exception:
        debug_failure(log_session, "a cancel request could not be sent")
    finally:
        cancel.finish()


def _quietly_cancel(cancel: Callable[[], object]) -> None:
    try:
        cancel()
    except Exception:
        debug_failure(log_session, "a cancel request could not be sent")


@contextlib.contextmanager
def _cut_by_timer(driver: Any, seconds: float, *, cancel: bool) -> Iterator[Callable[[], bool]]:
    """psycopg's ``driver`` cut off (see :class:`_Cut`, ``cancel`` first or not) by a timer
    thread after ``seconds``; yields whether the cut began, known for good once outside (a cut
    already running has set it once :meth:`_Cut.end` returns)."""
    cut = _Cut(driver, cancel=cancel)
    timer = threading.Timer(seconds, cut.fire)
    timer.daemon = True
    timer.start()
    try:
        yield cut.fired
    finally:
        timer.cancel()
        cut.end()


@contextlib.contextmanager
def _cut_off_after(driver: Any, seconds: float) -> Iterator[Callable[[], bool]]:
    """A statement of ``driver``'s cut off after ``seconds``. asyncpg: its ``command_timeout``
    set to ``seconds`` (:func:`~._internals.asyncpg_command_timeout`): asyncpg cancels the statement
    and raises ``TimeoutError``. psycopg (sync or async): a timer thread sends the server a
    cancel request, then shuts the connection's socket down if the statement has not ended
    :data:`CANCEL_GRACE` later (see :class:`_Cut`). Yields a function telling, once outside,
    whether the timer fired at all (the cancel then may have reached the statement, even as
    its answer came)."""
    if isinstance(driver, asyncpg.Connection):
        with asyncpg_command_timeout(driver, seconds):
            yield lambda: False  # a cut is asyncpg's TimeoutError
        return
    with _cut_by_timer(driver, seconds, cancel=True) as fired:
        yield fired


@contextlib.contextmanager
def stall_cut(connection: Connection, seconds: float | None = None) -> Iterator[None]:
    """The library's own statements on ``connection`` inside the block given at most
    ``seconds`` (:data:`STALLED_AFTER` when None, cut to what is left of the deadline: see
    :func:`library_wait`) in all on psycopg (sync or async): then the connection's socket is
    shut down (see :class:`_Cut`) and the statement waiting raises ``OperationalError``, a
    lost connection (invalidated: never pooled). asyncpg: each statement at most ``seconds``
    (its ``command_timeout``, unless that is shorter: asyncpg cancels the statement and raises
    ``TimeoutError``). Nothing for other drivers."""
    with _stall_cut(connection.connection.driver_connection, seconds) as fired:
        try:
            yield
        finally:
            if fired():
                connection.invalidate()


@contextlib.contextmanager
def _stall_cut(driver: Any, seconds: float | None = None) -> Iterator[Callable[[], bool]]:
    """:func:`stall_cut` on a driver connection; yields whether the cut began (known once
    outside). ``seconds``: :data:`STALLED_AFTER` when None, cut to what is left of the
    deadline (:func:`library_wait`)."""
    if seconds is None:
        seconds = library_wait(STALLED_AFTER, STALL_FLOOR)
    if isinstance(driver, asyncpg.Connection):
        # asyncpg cancels a statement past its command_timeout and raises TimeoutError: given
        # ``seconds`` where it has none or a longer one
        with asyncpg_command_timeout(driver, seconds, keep_shorter=True):
            yield lambda: False
        return
    if not isinstance(driver, (psycopg.Connection, psycopg.AsyncConnection)):
        yield lambda: False
        return
    with _cut_by_timer(driver, seconds, cancel=False) as fired:
        yield fired


PRUNE_SQL = f"SELECT {SCHEMA}.prune_commit_markers({PRUNE_BATCH})"


class _MarkerBits:
    """The random bits of marker ids: a keyed BLAKE2b (its key 256 bits from ``os.urandom``)
    of the next 64 bits of a ``random.Random`` seeded with 256 more, both seeded anew in a
    forked child (gunicorn's workers), so that two processes never hand out the same sequence.

    The ids must be unique *and* unforeseeable: every application role sharing the database's
    markers may read them (``SELECT``) and write them (``INSERT``), and one that could work out
    the id of another application's next unit could write that marker first (the unit's lost
    COMMIT answer then taken for committed, or each of its commits refused on the marker's
    key). A Mersenne Twister's outputs alone give its state away: some 200 ids read back from
    the table foretold the next ones. The keyed hash of its outputs does not (the key never
    leaves the process), and the generator under it keeps them distinct.

    Not ``os.urandom`` per id: it releases the GIL around its system call, a thread switch when
    other threads wait for the GIL (one per writing unit showed in the 8-thread benchmarks),
    and a buffer of its bytes needs a lock. ``getrandbits`` and the hash of 8 bytes run in C
    holding the GIL (the keyed hash is copied, never updated: no lock): safe from any thread,
    some 0.5 µs per id.
    """

    def __init__(self) -> None:
        self._seed()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._seed)

    def _seed(self) -> None:
        draw = random.Random(os.urandom(32)).getrandbits
        keyed = hashlib.blake2b(key=os.urandom(32), digest_size=10)
        from_bytes = int.from_bytes

        def bits() -> int:
            """80 unforeseeable bits."""
            hashed = keyed.copy()
            hashed.update(draw(64).to_bytes(8, "little"))
            return from_bytes(hashed.digest(), "little")

        self.bits = bits


_marker_bits = _MarkerBits()
# the random part of a version-7 UUID: all but its version and variant bits, which are set
_RANDOM_PART: Final = ((1 << 80) - 1) & ~(0xF << 76) & ~(0x3 << 62)
_VERSION_7: Final = 0x7 << 76 | 0x2 << 62  # version 7, RFC 4122 variant


#: this host's time for the clock check (a test's to set)
_wall_clock: Callable[[], float] = time.time


def marker_id() -> str:
    """A time-ordered UUID (RFC 9562 version 7: 48 bits of Unix milliseconds, 74 random bits)
    as its canonical text, made without a ``UUID`` object (every writing unit's commit makes
    one).

    Written here because the standard library has it only from Python 3.14. The random part
    comes from :class:`_MarkerBits` (seeded from ``os.urandom``): two units sharing an id would
    make one's verification read the other's marker, and a role that could foresee an id could
    write its marker first.
    """
    ms = time.time_ns() // 1_000_000
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | _marker_bits.bits() & _RANDOM_PART | _VERSION_7
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# -- connecting to a multi-host URL ---------------------------------------------------------------
#: seconds a connect may take per host of a multi-host URL, where nothing else bounds it: a host
#: that accepts TCP and never answers (a frozen server, a blackholed address) is given up after
#: this long and the next one tried. psycopg: libpq's ``connect_timeout`` (per host) where the
#: URL, connect arguments and PGCONNECT_TIMEOUT set none; asyncpg: its ``timeout`` (60 s by
#: default), which asyncpg applies to the whole multi-host connect, is applied to each host
#: instead (see :func:`_connect_host_by_host`), and is this where not given.
MULTI_HOST_CONNECT_TIMEOUT: Final = 5
#: seconds a connect of the library's own (a check of a lost COMMIT answer, a prune of expired
#: markers, the end of a two-phase unit's prepared transactions) may take, for a server that
#: accepts TCP and never answers (a frozen one), cut to what is left of the deadline (not below
#: :data:`CONNECT_FLOOR`). psycopg: libpq's ``connect_timeout`` where the URL, connect arguments
#: and PGCONNECT_TIMEOUT set none (and no connection service is named); asyncpg: its
#: ``timeout`` (60 s by default) where the connect arguments set none
LIBRARY_CONNECT_TIMEOUT: Final = 5

#: asyncpg's errors after which its own multi-host connect tries the next host, and so does
#: :func:`_connect_host_by_host`; and the host's session not of the wanted kind
#: (``target_session_attrs``)
_NEXT_HOST: Final = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.TargetServerAttributeNotMatched,
)


def _multi_host(url: Any) -> bool:
    """Whether SQLAlchemy ``url`` lists several hosts (``?host=a&host=b``, or ``?host=a,b``)."""
    return len(query_list(url.query.get("host"))) > 1


def _several_hosts(cparams: dict[str, Any]) -> bool:
    """Whether an asyncpg connect's arguments list several hosts (``connect_args={"host":
    [...], "port": [...]}``, or SQLAlchemy's own from a multi-host URL)."""
    hosts = cparams.get("host")
    return isinstance(hosts, (list, tuple)) and len(hosts) > 1


def connect_outside_units(connect: Callable[..., Awaitable[Any]] | None) -> Any:
    """``connect`` (an asyncpg connect: ``asyncpg.connect`` when None) run with the library's
    context variables that hold a unit's objects cleared (:data:`UNIT_CONTEXT`).

    asyncpg's transport registers its socket's reader with the event loop for as long as the
    connection lives, and the loop keeps the context the reader was registered in: made for a
    unit, a pooled connection kept the unit's attempt, and through it the unit's session, its
    factory and its engine, which was never freed (nor the pool's connections, with their
    server backends). Cleared only while the driver connects: the pool's ``connect`` events,
    after it, see the unit as before."""
    target = asyncpg.connect if connect is None else connect

    async def connect_for_unit(*args: Any, **kwargs: Any) -> Any:
        if own_work.get() and connect in (None, _connect_host_by_host) and "timeout" not in kwargs:
            # the library's own connection (see _psycopg_do_connect): a server that accepts
            # TCP and never answers is given up after LIBRARY_CONNECT_TIMEOUT (cut to what is
            # left of the deadline), not asyncpg's 60 s. (A creator of yours is left alone.)
            kwargs["timeout"] = library_wait(LIBRARY_CONNECT_TIMEOUT, CONNECT_FLOOR)
        tokens = [(var, var.set(None)) for var in UNIT_CONTEXT]
        try:
            return await target(*args, **kwargs)
        finally:
            for var, token in reversed(tokens):
                var.reset(token)

    return connect_for_unit


async def _connect_host_by_host(
    *args: Any,
    host: list[str],
    port: list[int],
    timeout: Any = None,
    target_session_attrs: str | None = None,
    **kwargs: Any,
) -> Any:
    """``asyncpg.connect`` to a multi-host URL, one host at a time, each within ``timeout``
    (:data:`MULTI_HOST_CONNECT_TIMEOUT` where not given). asyncpg's own loop over the hosts runs
    inside one ``timeout``: a first host that accepts TCP and never answers used it up (60 s by
    default), and the connect failed without trying the next host.

    The hosts are tried in order; one that can't be reached, is starting up, or is not of the
    ``target_session_attrs`` kind is passed over, as asyncpg passes it over; another error (a
    refused password, a missing database) ends the connect, as in asyncpg. ``prefer-standby``
    tries every host for a standby first, then every host for any server."""
    per_host = MULTI_HOST_CONNECT_TIMEOUT if timeout is None else float(timeout)
    if not (
        isinstance(host, (list, tuple))
        and isinstance(port, (list, tuple))
        and len(host) == len(port)
    ):  # hosts given otherwise than by the URL (connect_args): asyncpg's own connect
        if timeout is not None:
            kwargs["timeout"] = timeout
        return await asyncpg.connect(
            *args, host=host, port=port, target_session_attrs=target_session_attrs, **kwargs
        )
    wanted = target_session_attrs or os.environ.get("PGTARGETSESSIONATTRS")
    if wanted == "prefer-standby":
        return await _prefer_standby(args, kwargs, host, port, per_host)
    failures: list[tuple[str, BaseException]] = []
    for one_host, one_port in zip(host, port, strict=True):
        try:
            return await asyncpg.connect(
                *args,
                host=one_host,
                port=one_port,
                timeout=per_host,
                target_session_attrs=target_session_attrs,
                **kwargs,
            )
        except _NEXT_HOST as exc:
            failures.append((host_address(one_host, one_port), exc))
            debug_failure(log_session, "connecting to %s:%s failed", one_host, one_port)
    raise _every_host_failed(failures)


def _every_host_failed(failures: list[tuple[str, BaseException]]) -> BaseException:
    """The error to raise when no host could be used: the last one's (as asyncpg raises it),
    marked with every host tried and how each failed (:func:`mark_hosts_failed`), which the
    unit's ``Gave up`` line and the breaker's say: its own message names the last host only."""
    assert failures  # (at least two hosts were tried)
    last = failures[-1][1]
    mark_hosts_failed(last, failures)
    return last


async def _prefer_standby(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    hosts: Sequence[str],
    ports: Sequence[int],
    per_host: float,
) -> Any:
    """``prefer-standby`` in one pass over the hosts: the first standby found, else the first
    server reached (kept open meanwhile, not connected to again: a second pass would spend
    each unreachable host's timeout twice)."""
    fallback: Any = None
    failures: list[tuple[str, BaseException]] = []
    try:
        for one_host, one_port in zip(hosts, ports, strict=True):
            try:
                conn = await asyncpg.connect(
                    *args,
                    host=one_host,
                    port=one_port,
                    timeout=per_host,
                    target_session_attrs="any",
                    **kwargs,
                )
            except _NEXT_HOST as exc:
                failures.append((host_address(one_host, one_port), exc))
                debug_failure(log_session, "connecting to %s:%s failed", one_host, one_port)
                continue
            try:
                standby = await _in_hot_standby(conn)
            except Exception as exc:  # (the query of a server before 14): the next host
                conn.terminate()
                failures.append((host_address(one_host, one_port), exc))
                continue
            if standby:
                if fallback is not None:
                    await fallback.close(timeout=per_host)
                return conn
            if fallback is None:
                fallback = conn
            else:
                await conn.close(timeout=per_host)
    except BaseException:
        if fallback is not None:
            fallback.terminate()
        raise
    if fallback is not None:
        return fallback
    raise _every_host_failed(failures)


async def _in_hot_standby(conn: Any) -> bool:
    """Whether asyncpg's ``conn`` reached a standby: what the server reported at connect
    (``in_hot_standby``, PostgreSQL 14+), else asked, as asyncpg's own check does."""
    reported = getattr(conn.get_settings(), "in_hot_standby", None)
    if reported is not None:
        return bool(reported == "on")
    return bool(await conn.fetchval("SELECT pg_catalog.pg_is_in_recovery()"))


# -- a COMMIT answered with a warning --------------------------------------------------------------
#: the server's own warnings at a COMMIT whose wait for a synchronous standby was cut short
#: (syncrep.c), quoted as they are where a warning is said
SYNC_REP_WARNINGS: Final = frozenset(
    {
        "canceling wait for synchronous replication due to user request",
        "canceling the wait for synchronous replication and terminating connection due to "
        "administrator command",
    }
)


def commit_warning(sqlstate: object, message: object) -> str:
    """A WARNING answered with a COMMIT as the library says it (``UnprovenCommit``, the
    ``[SELF-HEAL]`` lines, their events): ``SQLSTATE: text`` for the server's own synchronous
    replication warnings, the SQLSTATE alone for any other. Any other is the text of code
    that ran at the COMMIT (a deferred trigger's ``RAISE WARNING 'low balance for %',
    NEW.email``) and may quote a row's values, which no line may carry."""
    if isinstance(message, str) and message in SYNC_REP_WARNINGS:
        return f"{sqlstate}: {message}"
    return f"a WARNING with SQLSTATE {sqlstate} (its text left out: it may quote values)"


class UnprovenCommit(ResilientDBError):
    """The server answered a unit's own COMMIT with success *and* a WARNING: committed on the
    primary, but not proven as the server promises. A synchronous-replication wait cancelled
    by someone else (``pg_cancel_backend`` of the backend waiting in ``SyncRep``) answers so:
    "canceling wait for synchronous replication due to user request ... committed locally,
    but might not have been replicated", and a failover may lose the unit. Raised by the
    marked COMMIT in place of returning, so that the unit is settled as a lost answer (a
    check that must see the unit's commit confirmed by the standbys), never reported done on
    that answer alone. (Only for a COMMIT that may have written: see ``CommitTicket.wrote``.)
    The marked COMMIT notes the warning on its ticket; the unit raises this once every
    connection's COMMIT has returned (:func:`~._unit.flush_and_commit`): raised in the middle
    of SQLAlchemy's COMMITs, it would leave the unit's other connections rolled back. (A
    unit's own COMMIT midway is settled before it returns to the unit's code, see
    :func:`_settled_own_commit`: this is raised there when the check finds it not committed.)

    The client learns of the cancelled wait only from that warning: a session whose
    ``client_min_messages`` is ``error`` or above (set for the role or the database, or by the
    application) is never sent it, and its units are reported done on such an answer, as
    plain PostgreSQL clients take it. Keep ``client_min_messages`` at ``warning`` or below
    where synchronous replication matters.

    A :class:`~resilient_db.ResilientDBError`: what a caller gets when the check found the unit
    not committed and it is not run again (retrying off, or out of retries)."""

    def __init__(self, warning: str) -> None:
        super().__init__(f"the server answered the COMMIT with a warning: {warning}")
        self.warning = warning


# Which warnings count. The cancelled wait's ``ereport(WARNING, ...)`` in PostgreSQL's
# ``SyncRepWaitForLSN`` names no SQLSTATE, so it carries the generic warning code 01000, as
# every RAISE WARNING does: no code singles it out, and its text is translated (lc_messages).
# So any WARNING (by its non-localised severity) the server sends while the COMMIT message runs
# counts: a warning of another cause (a deferred trigger's RAISE WARNING) costs that unit a
# check on a new connection, which proves it, never a wrong "done". Notices below WARNING
# don't count. A session whose ``client_min_messages`` is above ``warning`` (``error``, say:
# set for the role or the database) never hears the warning: its cancelled waits can't be
# told from a plain success by the client, and such units are reported done as before.
_WARNING: Final = "WARNING"


def _psycopg_commit_warning(diagnostic: Any) -> None:
    """A psycopg connection's notice handler, added once when the connection is made
    (:meth:`CommitProtocol.prepare`). It runs inside the call that reads the server's answer,
    on the committing unit's thread (or task): a WARNING while a unit's COMMIT is out (its
    ticket sent, not answered yet) is noted on the ticket, which the marked ``commit()`` reads
    once the COMMIT returns."""
    if diagnostic.severity_nonlocalized != _WARNING:
        return
    request = committing_request()
    if request is None or not request.tickets:
        own = _own_ticket.get()  # a unit's own COMMIT midway (see _settled_own_commit)
        if own is not None and own.sent and not own.done:
            own.warned = commit_warning(diagnostic.sqlstate, diagnostic.message_primary)
        return
    ticket = request.tickets[-1]
    if ticket.sent and not ticket.done:
        ticket.warned = commit_warning(diagnostic.sqlstate, diagnostic.message_primary)
        request.warned = request.warned or ticket.wrote


#: the driver connections :func:`_listen_for_commit_warnings` added its listener to
_listening: weakref.WeakSet[Any] = weakref.WeakSet()


def _listen_for_commit_warnings(driver: Any) -> None:
    """Add the listener that notes the server's warnings on ``driver``, once per connection
    (its COMMITs read what it noted: one attribute per unit, nothing added or removed per
    unit). psycopg: :func:`_psycopg_commit_warning`. asyncpg calls a log listener later (the
    loop's ``call_soon``, still before the statement's answer wakes its waiter) and outside
    the committing task's context, but hands it the statement the warning came with: the
    connection keeps (statement, warning) in ``_rdb_warned``, and the COMMIT compares the
    statement with the message it sent (a marked message names the unit's own marker)."""
    if driver in _listening:  # (set up again after an install: see install_commit_markers)
        return
    _listening.add(driver)
    if not isinstance(driver, asyncpg.Connection):
        driver.add_notice_handler(_psycopg_commit_warning)
        return
    ref = weakref.ref(driver)

    def listener(_connection: Any, message: Any) -> None:
        owner = ref()
        if owner is not None and getattr(message, "severity_en", None) == _WARNING:
            owner._rdb_warned = (
                getattr(message, "query", None),
                commit_warning(message.sqlstate, message.message),
            )

    driver.add_log_listener(listener)


def _asyncpg_warned(connection: Any, sent: str, ticket: CommitTicket) -> None:
    """An asyncpg connection's COMMIT (``sent``) returned while its log listener had noted a
    warning: noted on ``ticket`` if the warning came with this statement (the unit reads it
    once every connection's COMMIT returned: see :func:`~._unit.flush_and_commit`)."""
    statement, warning = connection._rdb_warned
    connection._rdb_warned = None
    if ticket.wrote and statement == sent:  # (nothing to prove for a read-only one)
        ticket.warned = warning
        request = committing_request()
        if request is not None:
            request.warned = True


# -- the client side ----------------------------------------------------------------------------
@dataclass(init=False)
class CommitTicket:
    """What one connection's COMMIT carried, for settling a lost answer."""

    mode: str | None  # MARKERS, XID, UNMARKED, or None (proven read-only: nothing to verify)
    marker: str | None = None
    xid: str | None = None
    incarnation: str | None = None
    sent: bool = False  # the COMMIT message went out (before it, a failure can't have committed)
    done: bool = False  # the server answered it: committed
    #: the engine whose database the COMMIT went to, when it is not the factory's (a unit whose
    #: one connection is another engine's, through ``binds``): the outcome is settled there
    engine: Any = None
    #: the xid (and the server's incarnation) is read before COMMIT, one round trip: the
    #: fallback's evidence (XID), or a marker's second one (a notification in a transaction
    #: that may be read-only, where the marker function writes no marker: see _commit_plan)
    reads_xid: bool = False
    #: the transaction may have written without a local xid (a notification, a statement that
    #: writes by its kind: see ``_statements.WRITES``): the xid read is assigned
    assign_xid: bool = False
    #: why the check on a new connection could not answer (an error a new check would meet
    #: again: a missing right, row-level security on the markers), for the unknown outcome
    check_failed: str | None = None
    #: the last check on a new connection that could not reach the server (a transient error:
    #: checked again while the verification's retries and time last), since the last one that
    #: did, and how many did not
    check_unreached: str | None = None
    checks_unreached: int = 0
    #: a check on a new connection reached the server and answered (not final: in progress)
    check_reached: bool = False
    proofs: int = 0  # checks that wrote WAL past the unit's commit (each waits longer)
    #: the WARNING the server answered the COMMIT with (see :class:`UnprovenCommit`)
    warned: str | None = None
    #: why the last check that reached the server could not tell (its claim's or its xid's
    #: answer), for the unknown outcome
    unknown_why: str | None = None
    #: a check found no WAL sender while synchronous replication is in effect: the server's
    #: ``synchronous_standby_names`` (no standby can confirm anything)
    unserved_standby_names: str | None = None
    #: the driver's connection the COMMIT went out on (a unit spanning several connections
    #: finds the engine of its lost answer by it: see ``_unit.Split``)
    driver: Any = field(default=None, repr=False, compare=False)

    def __init__(
        self,
        mode: str | None,
        *,
        marker: str | None = None,
        driver: Any = None,
        sent: bool = False,
        done: bool = False,
        reads_xid: bool = False,
        assign_xid: bool = False,
    ) -> None:
        # what a COMMIT's plan gives; the rest is the class's defaults until a check sets it
        # (every writing unit makes one: no assignment of the other dozen fields)
        self.mode = mode
        self.marker = marker
        self.driver = driver
        if sent:
            self.sent = sent
        if done:
            self.done = done
        if reads_xid:
            self.reads_xid = reads_xid
        if assign_xid:
            self.assign_xid = assign_xid

    @property
    def xid_sql(self) -> str:
        """The query before COMMIT (see ``reads_xid``); without the incarnation where the
        connection's role was refused it (see ``_control_unreadable``)."""
        if self.driver is not None and self.driver in _control_unreadable:
            return _XID_ASSIGN_SQL_ALONE if self.assign_xid else _XID_SQL_ALONE
        return _XID_ASSIGN_SQL if self.assign_xid else _XID_SQL

    @property
    def wrote(self) -> bool:
        """Whether a lost answer must be verified rather than replayed."""
        if not self.sent or self.mode is None:
            return False
        return self.mode in (MARKERS, UNMARKED) or self.xid is not None


class CommitRequest:
    """The tickets of one unit's commit (one per connection the session commits)."""

    # Defaults are class attributes (an instance sets only what changes: every unit makes one)
    # a two-phase session's PREPAREs, (engine, xid) each, and the xids whose COMMIT PREPARED
    # SQLAlchemy went on to send, in order (noted where the dialect sends them, see hooks_for)
    two_phase: list[tuple[Engine, Any]] | None = None
    two_phase_commits: list[Any] | None = None
    #: the xids whose COMMIT PREPARED (the unit's own, SQLAlchemy's) the server answered with
    #: success and a WARNING, each with it (see ``_unit._commit_twophase``): committed on the
    #: primary, not proven replicated (see :class:`UnprovenCommit`)
    two_phase_warned: list[tuple[Any, str]] | None = None
    committing: bool = False  # flushed; COMMIT may go out from here on
    #: its COMMIT step is over (``_unit.flush_and_commit``): a task or a thread started in it
    #: (by an ``after_commit`` listener, say), whose context still holds it as
    #: ``current_request``, commits as drop-in code (see ``_statements.committing_request``)
    ended: bool = False
    transaction: Any = None  # the session's root transaction that COMMIT ends
    attempt: AttemptRecord | None = None  # the unit's attempt (it saw the connections)
    #: a COMMIT that wrote (or a two-phase COMMIT PREPARED) was answered with a WARNING
    #: (UnprovenCommit)
    warned: bool = False
    #: every COMMIT of the transaction returned, and its ``commit()`` raised after them (an
    #: ``after_commit`` or ``after_transaction_end`` listener): the unit is committed
    answered: bool = False
    #: a lost answer in a transaction spanning several connections, as settled (``_unit.Split``)
    split: Any = None
    #: a two-phase unit's prepared transactions its own look rolled back (``_unit``'s
    #: ``CommitReferee.two_phase_abandoned``), and whether, interrupted in its PREPARE step,
    #: the rest were handed to the background (``CommitReferee.two_phase_interrupted``: once)
    two_phase_ended: list[Any] | None = None
    two_phase_handed: bool = False
    #: the server refused a PREPARE of it, an error psycopg's rollback hid (``_unit``'s
    #: ``_refused_prepare``)
    prepare_refused: bool = False

    def __init__(self) -> None:
        self.tickets: list[CommitTicket] = []

    @property
    def last(self) -> CommitTicket | None:
        """The ticket of the COMMIT that failed. Without one, a COMMIT that may have gone out
        through a connection that is not marked (made by the user's own creator): unknowable."""
        if self.tickets:
            return self.tickets[-1]
        if self.committing:
            return CommitTicket(UNMARKED, sent=True)
        return None

    def may_have_written(self) -> bool:
        """Whether the unit's COMMIT, which succeeded, may have saved a change: one of its
        tickets wrote, or a connection's COMMIT went out without a ticket (one the protocol
        can't mark, a two-phase COMMIT PREPARED)."""
        return any(t.wrote for t in self.tickets) or len(self.tickets) < len(self.connections())

    def connections(self) -> list[tuple[Any, bool]]:
        """The connections (SQLAlchemy's) of the transaction this COMMIT ends, each with whether
        its COMMIT is marked, in the order the transaction began on them; empty when not known
        (a session class without the listener)."""
        attempt = self.attempt
        if attempt is None or not attempt.began:
            return []
        mine = self.transaction
        return [(conn, marked) for trans, conn, marked, _ in attempt.began if trans is mine]

    def drivers(self) -> list[tuple[Any, Any]]:
        """The connections of :meth:`connections`, each with its driver's connection (the one
        its COMMIT's ticket names, see ``CommitTicket.driver``), as the transaction began."""
        attempt = self.attempt
        if attempt is None or not attempt.began:
            return []
        mine = self.transaction
        return [(conn, driver) for trans, conn, _, driver in attempt.began if trans is mine]


class _ReplayPolicy(Protocol):
    classifier: Classifier
    retry_on: bool
    config: Config
    service: str
    breaker: Any  # the circuit breaker that admits its attempts (None: none)
    admitted_through: Any  # the one that admitted the attempt they are part of, if any
    own_commits: Any  # how its code's own COMMITs midway are settled (None: not)
    says_its_lines: bool  # False: its attempts are part of an enclosing one, which says them

    def partly_committed(self, exc: BaseException) -> None: ...

    def unknown_commit_caught(self, exc: BaseException) -> None: ...


#: in ``AttemptRecord.attached``: a new object's state that a bulk save in the attempt keyed
_BULK_KEYED: Final = object()


class AttemptRecord:
    """What an attempt of a unit (or of a ``with_self_healing`` operation) did that a replay
    can't undo, seen by the marked connection: a COMMIT its own code sent (``session.commit()``
    inside the unit) that committed, or may have (its answer lost; see :func:`_own_commit`),
    or a statement that may write sent in autocommit (an ``AUTOCOMMIT`` engine or connection),
    unless the server answered it with an error (``handle_error`` calls :meth:`failed`) and it
    was no ``CALL`` or ``DO`` block (which may commit inside itself before its error).

    Used as a context manager around the attempt: it is :data:`current_attempt` meanwhile; an
    error leaving it after such a commit is marked so that the policy does not replay it
    (:meth:`~._retry.Policy.partly_committed`), and an attempt that committed for good counts
    as committed work of the attempt that runs it, if any (a unit of another factory inside a
    unit)."""

    # Defaults are class attributes (an instance sets only what changes: every unit makes one)
    committed: bool = False
    # transactions its code prepared with the driver's two-phase API (psycopg's
    # ``tpc_prepare``) and has not rolled back: committed by whoever ends them (see _tpc_step)
    prepared: int = 0
    running: bool = False  # inside its ``with`` (see runs_once_here)
    # the execution context of the last writing statement sent in autocommit
    autocommitting: Any = None
    # (root transaction, connection, marked, driver's connection) for each connection a session
    # began on in the attempt (see ``CommitRequest.connections``)
    began: list[tuple[Any, Any, bool, Any]] | None = None
    # the root session transactions made in the attempt by sessions that are not a unit's
    # (a drop-in session's: what a replay of a ``with_self_healing`` operation rolls back)
    created: list[Any] | None = None
    disconnected: BaseException | None = None
    """The first error of the attempt's statements that the engine's ``handle_error`` hook saw
    as a lost connection (``is_disconnect``: SQLAlchemy's judgment, or the hook's own for
    57P01, 25006, a session timeout, a driver's broken state), never a cancellation; set once,
    kept whatever error follows. The attempt fails with it when its code caught it and then
    met ``PendingRollbackError``, without asking the classifier. Not derived from
    :attr:`last_error`: a later error the code caught (on another connection, say) replaces
    that one, and a caught business error there would then leave the unit failing with
    ``PendingRollbackError`` where the lost connection is what a replay heals."""
    last_error: BaseException | None = None
    """The last error of the attempt's statements other than 25P02 (which a failed
    transaction's later statements and COMMIT meet), a lost connection or any other: the error
    that made the transaction fail, when the code caught it and went on. The attempt fails
    with it when the classifier takes it for replayable and the attempt's own error is 25P02
    or ``PendingRollbackError``. Cleared, with :attr:`conflicted`, when the attempt succeeds
    (its traceback holds the attempt's frames). Both are read by
    ``_unit.lost_with_its_connection``."""
    # the last serialization failure or deadlock (a transient error of SQLSTATE class 40) the
    # attempt's statements met, with the root transaction of the connection it was met on:
    # caught by the code (in a savepoint, say), it still asks for the whole transaction to be
    # run again, not committed (see _unit.conflict_left_behind)
    conflicted: tuple[BaseException, Any] | None = None
    # objects attached to a session in the attempt with changes made before (see
    # attached_with_changes), each with those changes' values (None: can't be put back)
    # (or, with ``_BULK_KEYED``, the state of a new object bulk-saved in it: see bulk_keyed)
    attached: list[tuple[Any, Any]] | None = None
    # driver connections whose sessions hold what a ROLLBACK keeps (``_statements.KEEPS_SESSION``:
    # a session-level advisory lock, a statement PREPAREd in SQL): dropped if the attempt fails
    kept: list[Any] | None = None
    # the errors of COMMITs of its code whose outcome is unknown (an answer lost), counted by
    # the engine's hooks, to be said once it ends unless its error says them (see
    # commit_unanswered)
    unanswered: list[BaseException] | None = None
    # a 25006 met in the attempt that the server's answer and the login's report disagreed on
    # was taken for a lost server (see _unit.refused_unsure_again): a second one is the unit's
    refused_unsure: bool = False
    enclosing: AttemptRecord | None  # the attempt running when this one began
    _token: contextvars.Token[AttemptRecord | None]

    def __init__(self, policy: _ReplayPolicy) -> None:
        self._policy = policy

    @property
    def classifier(self) -> Classifier:
        return self._policy.classifier

    @property
    def speaker(self) -> tuple[Config, str]:
        """The configuration and service of the operation running the attempt (what an
        engine-wide line about it is said under)."""
        return self._policy.config, self._policy.service

    @property
    def operation_left_to_the_default(self) -> Config | None:
        """The configuration of the operation running the attempt when it is one of
        ``with_self_healing`` left to the default service name (the databases its work begins
        transactions on are looked at: see ``_services``); else None."""
        if getattr(self._policy, "service_defaulted", False):
            return self._policy.config
        return None

    @property
    def service(self) -> str:
        """The service of the operation running the attempt."""
        return self._policy.service

    @property
    def breaker(self) -> Any:
        """The circuit breaker that let the attempt through (None: none did): its policy's, or
        for an attempt that is part of another (a policy without a breaker of its own, see
        ``Policy.without_breaker``), the one that let that through."""
        policy = self._policy
        return policy.breaker if policy.breaker is not None else policy.admitted_through

    @property
    def replayed(self) -> bool:
        """Whether a failed attempt is replayed by its operation (its policy retries): a unit
        run inside it then runs once, rather than multiply the retries."""
        return self._policy.retry_on

    @property
    def unreplayable(self) -> bool:
        return self.committed or self.autocommitting is not None or self.prepared > 0

    @property
    def settles_own_commits(self) -> bool:
        """Whether the COMMITs its code sends midway are settled as the final one's (a unit's
        attempt: see ``Policy.own_commits``)."""
        return self._policy.own_commits is not None

    def own_commit_settler(self, *, is_async: bool) -> Any:
        """The factory's ``_settle_own_commit`` (a coroutine function when ``is_async``), or
        None (the factory is gone, or it is of the other kind)."""
        own = self._policy.own_commits
        if own is None or own[0] is not is_async:
            return None
        return own[1]()

    def own_commit_unproven(self, ticket: CommitTicket) -> None:
        """An own COMMIT midway answered with a WARNING on a connection of the other kind (a
        sync session's in an async factory's unit, or the reverse), which no check of the
        factory can run from: its outcome is unknown, raised and counted by the factory's
        referee as one of its own (``CommitOutcomeUnknownError``; ``UnprovenCommit`` when the
        factory is gone)."""
        own = self._policy.own_commits
        unproven = None if own is None else own[2]()
        if unproven is None:
            raise UnprovenCommit(str(ticket.warned))
        unproven(ticket)

    def __enter__(self) -> AttemptRecord:
        self.enclosing = current_attempt.get()
        self._token = current_attempt.set(self)
        self.running = True
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        current_attempt.reset(self._token)
        # a task or a copied context made inside the attempt still holds it: not running, and
        # holding none of the attempt's transactions (a driver's timer made in the attempt,
        # such as asyncpg's statement cache's, would keep their session and engine alive)
        self.running = False
        self.began = None
        if self.last_error is not None and exc is None:
            # (an error its code caught: its traceback holds the attempt's frames, its session)
            self.last_error = self.conflicted = None
        # (unreplayable, inline: every attempt passes here)
        if not (self.committed or self.autocommitting is not None or self.prepared > 0):
            return
        if exc is not None:
            self._policy.partly_committed(exc)
        if self.unanswered is not None:
            self._say_unanswered()
        if self.enclosing is not None:
            # a replay of the enclosing unit would repeat it, whether this attempt then failed
            # or not (its error caught by the enclosing code, which goes on)
            self.enclosing.committed = True

    def commit_unanswered(self, exc: BaseException) -> None:
        """A COMMIT of the attempt's code (not a unit's final one) lost its answer, or an
        interruption cut it off: ``exc``, the driver's error (or the interruption), counted
        by the engine's hooks. Said once: by the policy's ``partly_committed`` when it is the
        error the attempt fails with (or one around it), else when the attempt ends (its code
        caught it, and returned or raised another error)."""
        if self.unanswered is None:
            self.unanswered = [exc]
        else:
            self.unanswered.append(exc)

    def _say_unanswered(self) -> None:
        """The COMMITs of unknown outcome the attempt's error did not say (see
        :meth:`commit_unanswered`): said now, or, for an attempt that is part of an enclosing
        one (whose lines are that one's), left to it (it fails with the same error, which says
        it, or its code caught it too)."""
        unanswered, self.unanswered = self.unanswered or [], None
        policy, enclosing = self._policy, self.enclosing
        for exc in unanswered:
            if not policy.says_its_lines and enclosing is not None:
                enclosing.commit_unanswered(exc)
            else:
                policy.unknown_commit_caught(exc)

    def unit_committed(self, request: CommitRequest) -> None:
        """The unit's own final COMMIT succeeded: committed work, when it wrote, for an
        enclosing attempt (looked at only when there is one). A connection whose COMMIT went
        out without a ticket (one the protocol can't mark, a two-phase COMMIT PREPARED) may
        have written."""
        if self.enclosing is not None and request.may_have_written():
            self.committed = True

    def began_on(self, transaction: Any, connection: Any) -> None:
        """A session's root ``transaction`` began on ``connection`` (``after_begin``)."""
        pooled = connection.connection
        driver = pooled.dbapi_connection  # psycopg's connection
        if isinstance(driver, AdaptedConnection):
            # or SQLAlchemy's async adapter: the driver's connection is inside, and is what
            # the statements' noting and a COMMIT's ticket name (SQLAlchemy 2.0's psycopg one
            # passes attribute reads on to it, so it must not be taken for it)
            driver = driver.driver_connection
        marked = getattr(driver, "_rdb_marked", False)
        if not marked:
            marked = _prepared_late(connection, pooled)
        entry = (transaction, connection, marked, driver)
        began = self.began
        if began is None:
            self.began = [entry]
        elif began[-1][0] is not transaction or began[-1][1] is not connection:
            began.append(entry)
        # else: heard twice (a session class listening and a base of it, see
        # install_connect_retry): one connection, recorded once
        attempt: AttemptRecord | None = self
        while attempt is not None:  # (this one, and those running it: a unit in an operation)
            config = attempt.operation_left_to_the_default
            if config is not None:  # (a set lookup once the engine is known)
                say_operation_database(connection.engine, config)
                break
            attempt = attempt.enclosing

    def keeps(self, driver: Any) -> None:
        """A statement sent on ``driver`` in the attempt leaves its session holding what a
        ROLLBACK keeps (see ``_statements.KEEPS_SESSION``)."""
        if self.kept is None:
            self.kept = [driver]
        elif all(kept is not driver for kept in self.kept):
            self.kept.append(driver)

    def created_transaction(self, transaction: Any) -> None:
        """A session made its root ``transaction`` in the attempt (``after_transaction_create``;
        not when it first got a connection: a transaction the caller began, or autobegan with
        ``add()``, gets its connection from the attempt's first statement)."""
        if self.created is None:
            self.created = [transaction]
        else:
            self.created.append(transaction)

    def attached_with_changes(self, state: Any) -> None:
        """A detached object carrying changes made before (while detached: by the caller of the
        unit or operation, from a request's body, say) was attached to a session in the attempt
        (``session.add``, a cascade). A failed attempt's rollback expires them, so a replay
        attaching the same object again would find nothing to write and report success without
        the change: their values are kept, to be put back before a replay
        (:meth:`restore_attached`). Changes of a relationship (an object, a collection) are
        not put back: the attempt is then not replayed."""
        columns = state.mapper.column_attrs
        changes: dict[str, Any] | None = {}
        for key in state.committed_state:
            if changes is None or key not in columns or key not in state.dict:
                changes = None
                break
            changes[key] = state.dict[key]
        entry = (state.obj(), changes)
        if self.attached is None:
            self.attached = [entry]
        else:
            self.attached.append(entry)

    def bulk_keyed(self, states: Iterable[Any]) -> None:
        """New objects given to ``bulk_save_objects(..., return_defaults=True)`` in the
        attempt, which SQLAlchemy gave an identity key there (``states``, their states). They
        never join the session, so the failed attempt's rollback leaves them that key, and a
        replay saving them again would take them for saved rows and send UPDATEs matching
        nothing (``StaleDataError``): the key is taken back before a replay
        (:meth:`restore_attached`), as the rollback takes it back from an object ``add()``
        made pending."""
        entries = [(state, _BULK_KEYED) for state in states]
        if self.attached is None:
            self.attached = entries
        else:
            self.attached.extend(entries)

    def restore_attached(self) -> str | None:
        """Once the failed attempt's transaction is rolled back (which expired them), set again
        on each object attached with changes in the attempt (see :meth:`attached_with_changes`)
        the values those changes had: a replay attaching it again writes them, as the first
        attempt would have; and make the new objects the attempt bulk-saved new again (see
        :meth:`bulk_keyed`). Returns why that can't be done (then the attempt is not
        replayed), or None."""
        attached, self.attached = self.attached, None
        for obj, changes in attached or ():
            if changes is _BULK_KEYED:
                if obj.session_id is None:  # (attached since: a session's rollback decides)
                    obj.key = None
                continue
            name = type(obj).__name__
            if changes is None:
                return (
                    f"an object ({name}) changed outside it (a relationship among the changes) "
                    "was attached to its session, and the failed attempt's rollback expired the "
                    "changes, which a replay can't make again"
                )
            try:
                for key, value in changes.items():
                    setattr(obj, key, value)
            except Exception as exc:
                return (
                    f"an object ({name}) changed outside it was attached to its session, and the "
                    f"failed attempt's rollback expired the changes, which could not be set again "
                    f"({type(exc).__name__})"
                )
        return None

    def autocommit(self, context: Any) -> None:
        """A statement that may write goes out in autocommit: it commits on its own."""
        if self.autocommitting is not None:
            self.committed = True  # the one before it did not fail
        self.autocommitting = context

    def failed(self, context: Any, exc: BaseException) -> None:
        """The statement of ``context`` failed: the server's error answer proves that an
        autocommit statement committed nothing (a lost answer proves nothing). Not a ``CALL``
        or a ``DO`` block's, which may commit inside itself before its error: one sent in
        autocommit marks the attempt committed at once (``_statements.COMMITS_INSIDE``)."""
        if (
            context is not None
            and context is self.autocommitting
            and answered(exc, self._policy.classifier)
        ):
            self.autocommitting = None


def _prepared_late(connection: Any, pooled: Any) -> bool:
    """Whether a connection that is not marked, beginning a unit's transaction, could be
    prepared for the commit protocol now (before the transaction sends anything): one checked
    out before its engine had a resilient factory, which never passed the factory's checkout,
    as the ``AsyncConnection`` an async factory is bound to may be (a sync ``Connection`` is
    prepared when the factory is bound to it; an async one's set-up needs SQLAlchemy's
    greenlet, which the unit's begin runs in). Idempotent; a connection the protocol can't
    mark (another driver, your own creator's) stays as it is."""
    hooks = hooks_of(connection.engine)
    if hooks is None or not hooks.config.enabled:
        return False
    hooks.commit.prepare(pooled.dbapi_connection)
    return bool(getattr(pooled.driver_connection, "_rdb_marked", False))


@contextlib.contextmanager
def _own_commit(attempt: AttemptRecord, wrote: bool = True) -> Iterator[None]:
    """Around a COMMIT sent by the code of ``attempt``: unless the server answered it with an
    error, the attempt can't be replayed. (Only a unit's own COMMITs pass here.) Nor when the
    transaction sent nothing that may write (``wrote`` False, as for a unit's own read-only
    COMMIT, which is not verified either): that COMMIT saved nothing a replay would repeat,
    whether it was answered or not (its answer lost, it is a lost connection like any other)."""
    try:
        yield
    except BaseException as exc:
        if unanswered_commit(exc, attempt.classifier, wrote) and wrote:
            attempt.committed = True
        raise
    if wrote:
        attempt.committed = True
        note_saved()  # (for an interruption after it, in a drop-in block: see SavedNote)


# Whether the transaction of a COMMIT that sent nothing judged to write has written all the
# same: a statement judged read-only may write through what it reads (a view whose definition
# calls a function that writes, a function of a built-in's name on the search path). Asked
# only before an attempt's own COMMIT of such a transaction (``_own_commit`` then leaves the
# attempt replayable only when nothing was written): a replay after that COMMIT would write
# again. Never for a unit's final COMMIT or a writing one: those pay nothing for it.
_XID_ASSIGNED_SQL: Final = "SELECT pg_catalog.pg_current_xact_id_if_assigned() IS NOT NULL"


def _psycopg_xid_assigned(connection: Any) -> bool:
    """Whether the psycopg ``connection``'s transaction (not a failed one) holds an xid (see
    above); sent outside its cursors, so that the question is not noted as a statement."""
    if connection.pgconn.transaction_status != _INTRANS:
        return False  # (a failed transaction: its COMMIT rolls back)
    return _assigned(connection, psycopg_simple_query(connection, _XID_ASSIGNED_SQL.encode()))


async def _apsycopg_xid_assigned(connection: Any) -> bool:
    if connection.pgconn.transaction_status != _INTRANS:
        return False
    results = await psycopg_simple_query_async(connection, _XID_ASSIGNED_SQL.encode())
    return _assigned(connection, results)


def _assigned(connection: Any, results: Any) -> bool:
    """The answer of :data:`_XID_ASSIGNED_SQL` on a psycopg ``connection`` (its error raised)."""
    _raise_error(connection, results)
    return bool(results[-1].get_value(0, 0) == b"t")


async def _asyncpg_xid_assigned(connection: Any, base: Any) -> bool:
    """The same for an asyncpg ``connection`` of the unmarked class ``base``, whose own method
    sends it unnoted (a failed transaction's error means it wrote nothing that COMMIT keeps)."""
    if not connection.is_in_transaction():
        return False
    # (its statement cache's timer keeps the context it was made in: not the unit's objects)
    with library_work():
        try:
            return bool(await base.fetchval(connection, _XID_ASSIGNED_SQL))
        except asyncpg.InFailedSQLTransactionError:
            return False


class _Settings(Protocol):
    config: Config
    service: str


class CommitProtocol:
    """The per-engine side of the protocol.

    It listens only where SQLAlchemy's execution path stays fast: pool ``connect`` and
    ``checkout`` (mark the connection, find out whether the markers are installed) and, for
    the flush guard, the dialect's ``do_execute`` family (see
    :func:`~resilient_db._statements.statement_listeners`; the marked driver classes note the
    statements that may write). Connection events (``begin``, ``before_cursor_execute``,
    ``commit``) would cost every statement a joined event dispatch. What the COMMIT carries is
    decided in the driver's own commit (:func:`marked_connection_class`), from the flag and the
    unit's :class:`CommitRequest`.
    """

    #: the task of an async factory's prune of this engine's markers while it runs (one at a
    #: time; see ``_unit.claim_prune`` and ``_asyncio._prune_in_task``)
    pruning: asyncio.Task[None] | None = None

    def __init__(
        self, engine: Engine, settings: _Settings, guard: StatementGuard | None = None
    ) -> None:
        # weakly: the engine's hooks are kept by a weak-keyed registry (STATE.engine_hooks),
        # whose value must not keep its key alive (a dropped engine, and the connections of
        # its pool, would never be freed)
        self._engine = weakref.ref(engine)
        self._settings = settings  # the engine's hooks: its current config and service name
        self.is_asyncpg = engine.dialect.driver == "asyncpg"
        #: the URL lists several hosts: each gets a bounded connect (MULTI_HOST_CONNECT_TIMEOUT;
        #: so does a connect whose ``connect_args`` list them, see _several_hosts)
        self.multi_host = _multi_host(engine.url)
        self._warned = False
        self._missing: str | None = None  # what installed markers lack here (_MISSING_SQL)
        # the identity (_IDENTITY_SQL) of the markers' objects last found owned by trusted
        # roles, and of those last found otherwise: only another set is asked about its owners
        self._trusted_objects: str | None = None
        self._untrusted_objects: str | None = None
        self._clock_warned = False
        self._outdated_warned = False
        self._prune_refused = False
        self._unusable_said = False  # (see markers_unusable)
        self._replica_said = False  # (see _note_replication_role)
        self._control_refused = False  # (see control_refused)
        # the highest timeline seen per cluster (system identifier), with the server it was
        # seen at and whether the fleet saw it (another process, through Redis: see
        # fleet_timeline), not this engine (see _fence)
        self._timelines: dict[str, tuple[int, str, bool]] = {}
        self._timelines_lock = threading.Lock()
        # the highest timeline of any cluster in _timelines, and a cluster seen on it: a
        # connection on that timeline is taken without asking its cluster
        self._highest: tuple[int, str] | None = None
        #: replaced whenever a cluster's highest timeline rises: a pooled connection judged
        #: under another is judged again at its checkout (see judge_pooled)
        self.fence_token = object()
        self._fenced = True
        self._fence_lines = LineLimit()  # connections refused, per server
        self._engine_name = engine.dialect.name
        self._shadow_asked = False  # (see _note_shadowed)
        self._next_prune = time.monotonic() + PRUNE_INTERVAL
        self._prune_lock = threading.Lock()
        self.prepared_marker = PreparedMarker(self._warn_prepared_lost, self._note_refused)
        self.inline_marker = InlineMarker(self._note_refused)
        # a pool that keeps no connection (NullPool: one behind an external pooler, say) would
        # pay a PREPARE per unit for one EXECUTE: its COMMITs carry the INSERT itself
        self.one_unit_per_connection = isinstance(engine.pool, NullPool)
        # such an engine's connection never sees a second unit, so a refusal of the marker
        # statement on one (see _note_refused) switches the engine's new connections to the
        # function: else every unit of a role switched out of sight would be refused anew
        self._statement_refused = False
        self.supported = verifiable(engine)
        self._unsupported_warned = False
        # the driver's connections made while self-healing was off, left as the driver made
        # them: marked when it is switched on (see switched_on), in use or not
        self._made_off: weakref.WeakSet[Any] = weakref.WeakSet()
        self._made_off_lock = threading.Lock()
        if not self.supported:
            self.warn_unsupported()
            # nothing to mark: every unit's COMMIT is UNMARKED (see CommitRequest.last). What
            # a replay can't undo is still seen: a statement in autocommit (the listener) and
            # a COMMIT of the unit's own code (the dialect's do_commit)
            for name, listener in statement_listeners(False, guard).items():
                event.listen(engine, name, listener)
            note_dialect_calls(engine.dialect, "do_commit", _unmarked_commit)
            return
        event.listen(engine, "connect", self._on_connect)
        # told of the fleet's timelines by every link of this process, made before or after
        # (see fleet_timeline)
        follow_timelines(self)
        for name, listener in statement_listeners(True, guard).items():
            event.listen(engine, name, listener)
        if self.is_asyncpg:
            event.listen(engine, "do_connect", self._asyncpg_do_connect)
        else:  # (hosts may come from connect_args too: each connect is looked at)
            event.listen(engine, "do_connect", self._psycopg_do_connect)

    def after_fork_in_child(self) -> None:
        """New locks in a forked child (a thread of the parent may have held them: a reload
        switching self-healing on, a prune)."""
        self._prune_lock = threading.Lock()
        self._timelines_lock = threading.Lock()
        self._fence_lines.after_fork_in_child()
        self._made_off_lock = threading.Lock()
        self.pruning = None  # (the parent's loop's)

    @property
    def engine(self) -> Engine:
        """The engine these hooks are installed on (alive while anything of it runs)."""
        engine = self._engine()
        if engine is None:  # (nothing of a dropped engine calls its hooks)
            raise ReferenceError("the engine of these commit hooks was garbage-collected")
        return engine

    # -- events -----------------------------------------------------------------------------------
    # With self-healing off (SELF_HEALING_ENABLED=false) both connect listeners leave the
    # connection as the driver made it: its own class, no query, nothing prepared (it is only
    # remembered, weakly). The reload that switches self-healing on marks every such connection
    # (switched_on), the ones in use too: each COMMIT from then on is marked. The engine's
    # checkout then sets a connection up for the markers (psycopg) or has the pool replace it
    # with one made marked (asyncpg, see needs_replacing) before a unit uses it.
    def _on_connect(self, dbapi_connection: Any, record: Any) -> None:
        if not self._settings.config.enabled:
            driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
            with self._made_off_lock:
                self._made_off.add(driver)
            return
        record.info[_SEEN_KEY] = True
        try:
            if self.supported and not self.is_asyncpg:  # (psycopg's set-up needs it idle)
                with library_work():  # (its COMMIT is no unit's, nor an application's)
                    end_listeners_transaction(dbapi_connection)  # (a listener before ours)
            self.prepare(dbapi_connection, record)
        except BaseException:
            # the set-up met a lost connection, or was interrupted in the middle of a statement
            # (a cancelled task, Ctrl-C): the connection is not handed on, so it is closed here.
            # SQLAlchemy before 2.0.53 leaves a connection whose ``connect`` listener raised open,
            # held by nothing (sqlalchemy#13548): its socket, and an
            # interrupted set-up's backend on the server, were left to the garbage collector.
            # (A later SQLAlchemy's own close of it finds it closed.)
            _close_abandoned(dbapi_connection)
            raise

    def _asyncpg_do_connect(
        self, dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]
    ) -> None:
        """Have asyncpg make the connection from a marked class (``connection_class``).

        ``cparams`` is SQLAlchemy's copy of the engine's, made for this connect alone: with
        self-healing off it is left as given (the URL, your ``connection_class`` and
        ``async_creator``)."""
        if not self._settings.config.enabled:
            return
        given = cparams.get("connection_class")
        creator = cparams.get(ASYNC_CREATOR_KWARG)
        # connected outside the unit's context (see connect_outside_units)
        cparams[ASYNC_CREATOR_KWARG] = connect_outside_units(
            _connect_host_by_host
            if creator is None and (self.multi_host or _several_hosts(cparams))
            else creator
        )
        if creator is not None:
            return  # (made by your async_creator: prepare adopts it at connect)
        if cparams.get("statement_cache_size") == 0:
            record.info[_NO_PREPARE_KEY] = True  # asyncpg told not to prepare (a pooler's setting)
        cparams["connection_class"] = marked_connection_class(given or asyncpg.Connection)

    def _psycopg_do_connect(
        self, dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]
    ) -> None:
        """A multi-host URL (``host=a&host=b``: ``"a,b"`` here; or ``connect_args={"host":
        "a,b"}``) whose URL, connect arguments and environment set no ``connect_timeout`` gets
        :data:`MULTI_HOST_CONNECT_TIMEOUT`:
        psycopg tries the hosts one by one, each for that long (its own default is 130 s: a
        first host that accepts TCP and never answers held every connect that long). Not where
        a connection service is named (``service=``, ``PGSERVICE``): libpq reads its
        ``connect_timeout`` from the service file, which a value given here would override, and
        only libpq knows which file that is. Likewise, the library's own connections (see
        :func:`~._statements.library_work`) get :data:`LIBRARY_CONNECT_TIMEOUT`."""
        hosts = cparams.get("host")
        if not (
            self._settings.config.enabled
            and not cargs
            and "connect_timeout" not in cparams
            and "PGCONNECT_TIMEOUT" not in os.environ
            and "service" not in cparams
            and "PGSERVICE" not in os.environ
        ):
            return
        if isinstance(hosts, str) and "," in hosts:
            cparams["connect_timeout"] = MULTI_HOST_CONNECT_TIMEOUT
        elif own_work.get():
            # the library's own connection (a check of a lost COMMIT answer, a prune, the end
            # of a two-phase unit): a server that accepts TCP and never answers (a frozen
            # one) is given up after LIBRARY_CONNECT_TIMEOUT (cut to what is left of the
            # deadline, in whole seconds as libpq takes it), not psycopg's 130 s, which would
            # hold a unit's check past its deadline. Set in the dict SQLAlchemy hands this
            # connect alone (a copy of the engine's, per connect)
            cparams["connect_timeout"] = int(library_wait(LIBRARY_CONNECT_TIMEOUT, CONNECT_FLOOR))

    def needs_replacing(self, dbapi_connection: Any, record: Any) -> bool:
        """An asyncpg connection made before this engine had a resilient factory, or while
        self-healing was off: its class can't be marked any more (or was switched to the slower
        adopted one when self-healing was switched on, see :meth:`switched_on`), so the pool
        should replace it (once; see ``checkout``)."""
        if not self.is_asyncpg or record.info.get(_SEEN_KEY):
            return False
        record.info[_SEEN_KEY] = True  # its replacement is made through do_connect: marked
        driver = dbapi_connection.driver_connection
        return not getattr(driver, "_rdb_marked", False) or driver in _switched_on

    def checked_out_while_off(self, dbapi_connection: Any) -> None:
        """A connection checked out while self-healing is off: one that no connect listener of
        this engine saw (made before the engine had a resilient factory, then pooled) is
        remembered as one made while off, so that :meth:`switched_on` marks it, in use or not
        (its unit's lost COMMIT answer is then an unknown outcome, not a transient disconnect a
        web client is told to retry). A connection marked already is left alone."""
        if not self.supported:
            return
        driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        if getattr(driver, "_rdb_marked", False):
            return
        with self._made_off_lock:
            self._made_off.add(driver)

    def switched_on(self) -> None:
        """Self-healing was switched on for this engine (a reload): every connection made
        while it was off is marked now, the ones in use included, so that no COMMIT from here
        on goes out unmarked. A unit begun while it was off, or a drop-in transaction, whose
        connection is in use now commits through the marked class: a lost answer of its COMMIT
        is an unknown outcome, never a transient disconnect (which a web client is told to
        retry: it would write twice). What such a connection sent before now was not seen, so it
        is taken to have written (until its next checkout, which sets it up for the markers:
        psycopg; or has the pool replace it: asyncpg). Idempotent; no I/O."""
        if not self.supported or not self._settings.config.enabled:
            return
        with self._made_off_lock:
            made_off = list(self._made_off)
            self._made_off.clear()
        for driver in made_off:
            try:
                _mark_switched_on(driver)
            except Exception:  # a connection whose class can't be switched: left as it is
                debug_failure(log_session, "could not mark a connection made while off")

    def prepare(self, dbapi_connection: Any, record: Any = None) -> None:
        """Mark a new connection (psycopg: its class; asyncpg: made marked in ``do_connect``),
        record on it whether the markers are installed, and prepare the marker statement on it
        where that may be done (see :class:`PreparedMarker`). Idempotent."""
        if not self.supported:
            self._look_for_shadowed(dbapi_connection)
            return
        driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        if getattr(driver, "_rdb_mode", None) is not None:
            return
        if installing.get():
            # a connection of install_commit_markers: set up at its next checkout, once the
            # markers are installed (see install_commit_markers)
            return
        if not self.is_asyncpg and driver.info.transaction_status:  # (IDLE is 0)
            # inside a transaction (a Connection in its caller's transaction, bound to an async
            # factory): the set-up's autocommit is refused there; prepared at its next checkout
            return
        if not self.is_asyncpg:
            _mark_psycopg(driver)
        elif not getattr(driver, "_rdb_marked", False):
            _adopt_asyncpg(driver)  # made by your async_creator (do_connect marks the others)
        if not getattr(driver, "_rdb_marked", False):
            self._warn_if_missing(None)  # made by your own creator: no marked COMMIT
            return
        _listen_for_commit_warnings(driver)
        mode = XID
        want_prepared = (
            self.prepared_marker.usable
            and not (record is not None and record.info.get(_NO_PREPARE_KEY))
            and not self.one_unit_per_connection
        )
        if not self.is_asyncpg and driver.prepare_threshold is None:
            want_prepared = False  # psycopg told not to prepare statements (a pooler's setting)
        form: _MarkerForm | None = None
        # the set-up's statements are the library's, not those of the unit connecting now
        outside = current_attempt.set(None)
        try:
            # a connection of the library's own (a check's) is not waited for without end on a
            # server that froze once it had connected (psycopg; see stall_cut): a lost one
            with _stall_cut(driver) if own_work.get() else contextlib.nullcontext():
                installed, prepared, reports = self._set_up_markers(
                    dbapi_connection, driver, want_prepared
                )
            if installed:
                mode = MARKERS
                if prepared:
                    form = self.prepared_marker
                elif reports and not self._statement_refused:
                    form = self.inline_marker  # the client knows the read mode: sent inline
        except Exception as exc:
            if fenced_server_of(exc) is not None:
                raise  # an old primary's (see _fence): closed by the caller, as a lost one
            if self._connection_lost(driver, exc):
                # not a missing install: the connection died under the set-up. It is not used
                # on (unverified, and dead anyway): the error goes on, the connection closed by
                # the ``connect`` listener (``_on_connect``) or invalidated by the pool (a
                # ``checkout`` listener that raised), to the unit connecting, which retries a
                # disconnect
                debug_failure(log_session, "the connection was lost checking for commit markers")
                raise
            debug_failure(log_session, "could not check for commit markers")
        finally:
            current_attempt.reset(outside)
        driver._rdb_may_write = False  # (the set-up's PREPARE was noted)
        driver._rdb_writes = False
        driver._rdb_notifies = False
        driver._rdb_mode = mode
        if form is not None:
            driver._rdb_prepared = form
            if form is self.prepared_marker and not self.is_asyncpg:
                _watch_psycopg_deallocations(driver, form)
        self._warn_if_missing(mode, driver)

    def _connection_lost(self, driver: Any, exc: BaseException) -> bool:
        """Whether the set-up's ``exc`` means the connection was lost (a disconnect to the
        classifier, or the driver's connection is now closed or broken), not that the markers
        are missing or refused."""
        if DEFAULT_CLASSIFIER.classify(exc) is Outcome.DISCONNECT:
            return True
        try:
            if self.is_asyncpg:
                return bool(driver.is_closed())
            return bool(driver.closed or driver.broken)
        except Exception:  # a connection that tells nothing: judged by the error alone
            return False

    @property
    def _where(self) -> str:
        """The engine's database as its lines name it, with the service they are said under
        (the engine's latest factory's), as other lines name theirs."""
        return f"{self.engine.url.database} (service={self._settings.service})"

    def _warn_if_missing(self, mode: str | None, driver: Any = None) -> None:
        if mode == MARKERS or self._warned:
            return
        self._warned = True
        missing = self._missing
        # (a role that may not read the server's incarnation: "committed" never trusted)
        blind = (
            ". The role may not call pg_control_checkpoint(), so whether the server restarted "
            "can't be read: a lost answer is never verified committed here, only not committed "
            "(else the outcome is unknown)"
            if driver is not None and driver in _control_unreadable
            else ""
        )
        if mode is None:
            what = (
                "connections of database %s are made by your own creator, so their COMMIT "
                "can't carry a marker: a lost COMMIT answer of a unit on them ends unknown"
            )
        elif missing:
            what = (
                "Commit markers are installed in database %s, but not usable here: "
                f"{missing.replace('%', '%%')}. A lost COMMIT answer is verified by "
                "transaction id meanwhile, at one extra round trip per writing unit and with "
                "more unknown outcomes. The application's role needs USAGE on schema "
                "resilient_db, EXECUTE on its functions and SELECT, INSERT on "
                "resilient_db.commit_markers (a missing function: run "
                "resilient_db.install_commit_markers(engine) again as the markers' owner)" + blind
            )
        else:
            what = (
                "Commit markers are not installed in database %s, or the role this "
                "application logs in as may not use them: units still work and stay correct "
                "(a lost COMMIT answer is verified by transaction id, never taken for done "
                "unproven), at one extra round trip per writing unit and with more unknown "
                "outcomes. Run resilient_db.install_commit_markers(engine) once, as "
                "the database's owner (or a superuser, or this application's role: only "
                "markers of those are used), and grant the application's role USAGE on "
                "schema resilient_db, EXECUTE on its functions and SELECT, INSERT on "
                "resilient_db.commit_markers" + blind
            )
        emit(
            self._settings.config,
            log_session,
            logging.WARNING,
            what,
            self._where,
            service=self._settings.service,
            event="commit_markers_missing",
        )

    def _trusted_install(self, row: Any, owners: Callable[[str], Any]) -> bool:
        """Whether the check's ``row`` says the markers are installed, usable by this role and
        owned by roles it trusts; ``owners(sql)`` asks the last (:func:`_owners_sql`), only
        for a set of objects (and ``SELF_HEALING_MARKERS_OWNER``) not judged yet."""
        if not row[0]:
            self._look_for_missing(owners)
            return False  # not installed, or not usable by this role: nothing to judge
        owner = self._settings.config.markers_owner
        objects = f"{row[2]} {owner}"  # a verdict holds for these objects and this setting
        if objects == self._trusted_objects:
            return True
        if objects == self._untrusted_objects:
            return False
        untrusted = owners(_owners_sql(owner))
        if not untrusted:
            self._trusted_objects = objects
            self._warn_if_outdated(owners(_VERSION_SQL))
            return True
        self._untrusted_objects = objects
        self._warn_untrusted(list(untrusted))
        return False

    def _look_for_missing(self, fetch: Callable[[str], Any]) -> None:
        """Before the warning of markers not used here (once per engine): ask what they lack
        (:data:`_MISSING_SQL`, through ``fetch(sql)``), for the warning to name it."""
        if self._warned:
            return
        try:
            self._missing = fetch(_MISSING_SQL)
        except Exception:  # the warning without it
            debug_failure(log_session, "could not tell what the commit markers lack")

    def _warn_if_outdated(self, comment: Any) -> None:
        """Say once per engine that the markers were installed by an earlier release (their
        table's comment names the version): they are used, but what the versions since fixed
        (:data:`MARKERS_VERSION`) is not fixed in that database until they are installed again."""
        if comment == _NOT_INSTALLED:
            return  # gone since the connection looked (an uninstall and install running)
        found = _VERSION_IN_COMMENT.search(comment) if isinstance(comment, str) else None
        version = int(found.group(1)) if found else 0
        if version >= MARKERS_VERSION or self._outdated_warned:
            return
        self._outdated_warned = True
        emit(
            self._settings.config,
            log_session,
            logging.WARNING,
            "Commit markers of database %s are %s, installed by an earlier release (this one "
            "installs version %d): they are used, but the fixes since are not in that database "
            "(before version 6, a check after the markers were installed again, and before "
            "version 5 one after a failover between servers whose clocks disagree, could replay "
            "a committed unit). Run resilient_db.install_commit_markers(engine) "
            "again as the markers' owner, or the latest Alembic step",
            self._where,
            f"version {version}" if version else "of an unknown version",
            MARKERS_VERSION,
            service=self._settings.service,
            event="commit_markers_outdated",
            version=version,
        )

    def _warn_untrusted(self, objects: list[str]) -> None:
        """The markers rely on ``objects`` owned by a role the connection has no reason to
        trust: they are not used, and a warning (once per engine, in place of the one of a
        missing install) says so."""
        if not self._warned:
            self._warned = True
            emit(
                self._settings.config,
                log_session,
                logging.WARNING,
                "Commit markers of database %s are not used: %s, which is neither a superuser, "
                "the database's owner nor the role this application connects as. A role that "
                "may create schemas in the database could have planted them (a claim_commit "
                "of its own would have committed units replayed, written twice, and run with "
                "this application's rights); a lost COMMIT answer is verified by transaction "
                "id instead. If they are yours, have the database's owner (or a superuser) own "
                "them, or name their owner in SELF_HEALING_MARKERS_OWNER; otherwise DROP "
                "SCHEMA %s CASCADE and run "
                "resilient_db.install_commit_markers() as the database's owner",
                self._where,
                "; ".join(objects),
                SCHEMA,
                service=self._settings.service,
                event="commit_markers_untrusted",
                objects=", ".join(objects),
            )

    def _check_clock(self, sent: float, server_time: float) -> None:
        """Warn once if this host's clock is behind the server's by more than
        :data:`CLOCK_BEHIND_WARNING` (``sent``: this host's time when the query that read the
        server's went out; the round trip only makes the client look further behind)."""
        behind = server_time - sent
        if behind <= CLOCK_BEHIND_WARNING or self._clock_warned:
            return
        self._clock_warned = True
        left = CLAIM_HORIZON - behind
        emit(
            self._settings.config,
            log_session,
            logging.WARNING,
            "This host's clock is %.0f s behind the clock of the server of database %s. Commit "
            "markers carry this host's time and a check judges their age against the newest "
            "marker, which hosts with clocks like the server's write, so %s (then it ends in "
            "CommitOutcomeUnknownError). Synchronise the clocks (NTP)",
            behind,
            self._where,
            f"a lost COMMIT answer can be verified only within {left:.0f} s of the COMMIT"
            if left > 0
            else "no lost COMMIT answer can be verified",
            service=self._settings.service,
            event="clock_behind_server",
            seconds=round(behind, 1),
        )

    def warn_unsupported(self) -> None:
        """Say once per engine, while self-healing is on, that its COMMITs can't be verified
        (at creation, or at the reload that switches it on)."""
        if self.supported or self._unsupported_warned or not self._settings.config.enabled:
            return
        self._unsupported_warned = True
        url = self.engine.url
        emit(
            self._settings.config,
            log_session,
            logging.WARNING,
            "Engine %s+%s of database %s is not PostgreSQL through psycopg 3 or asyncpg: its "
            "COMMITs can't carry a marker, so a unit whose COMMIT answer is lost ends in "
            "CommitOutcomeUnknownError, and errors are retried only where they carry a "
            "PostgreSQL SQLSTATE or SQLAlchemy saw a disconnect",
            url.get_backend_name(),
            url.get_driver_name(),
            self._where,
            service=self._settings.service,
            event="commit_verification_unavailable",
        )

    def _warn_prepared_lost(self) -> None:
        emit(
            self._settings.config,
            log_session,
            logging.WARNING,
            "The prepared commit-marker statement was missing on a connection of database %s "
            "(a transaction-mode pooler, or DISCARD ALL / DEALLOCATE sent past SQLAlchemy): that "
            "COMMIT did not run and the unit is replayed; the engine's COMMITs send the marker's "
            "INSERT in their message from now on. Behind such a pooler, turn the driver's "
            "prepared statements off (psycopg: prepare_threshold=None; asyncpg: "
            "statement_cache_size=0) and this engine won't prepare it",
            self._where,
            service=self._settings.service,
            event="commit_marker_statement_lost",
        )

    def _note_refused(self, sqlstate: str) -> None:
        if sqlstate in _MARKERS_GONE:
            emit(
                self._settings.config,
                log_session,
                logging.WARNING,
                "The commit markers are gone from database %s (SQLSTATE %s: uninstalled while "
                "the application ran?): that COMMIT did not run and the unit is replayed; the "
                "connections that meet this verify lost COMMIT answers by transaction id from "
                "now on. Run resilient_db.install_commit_markers(engine) again to use them",
                self._where,
                sqlstate,
                service=self._settings.service,
                event="commit_markers_gone",
                sqlstate=sqlstate,
            )
            return
        if self.one_unit_per_connection:
            self._statement_refused = True
        what = (
            "the role in effect may not write markers (a role the unit switched to, or a "
            "grant revoked)"
            if sqlstate == "42501"
            else "the transaction was read-only"
        )
        emit(
            self._settings.config,
            log_session,
            logging.INFO,
            "The commit-marker statement was refused on a connection of database %s "
            "(SQLSTATE %s: %s): that COMMIT did not run and the unit is replayed; the "
            "%s COMMITs call resilient_db.mark_commit() from now on",
            self._where,
            sqlstate,
            what,
            "engine's (a connection serves one unit)"
            if self.one_unit_per_connection
            else "connection's",
            service=self._settings.service,
            event="commit_marker_statement_refused",
            sqlstate=sqlstate,
        )

    def _set_up_markers(
        self, dbapi_connection: Any, driver: Any, prepare: bool
    ) -> tuple[bool, bool, bool]:
        """Whether the markers are installed, whether the marker statement was prepared (tried
        when they are and ``prepare``), and whether the server reports the read mode: a round
        trip each, outside any transaction (no BEGIN / ROLLBACK around them). The connection is
        idle here, new or just checked out."""
        if self.is_asyncpg:
            reports = hasattr(driver.get_settings(), "in_hot_standby")
            run = _runner(dbapi_connection, driver)
            fenced = self._fenced
            sent = _wall_clock()
            try:
                try:
                    row = run(lambda d: d.fetchrow(_check_sql(driver, fenced)))
                except Exception as exc:
                    refused = _timeline_refused(exc) if fenced else None
                    if refused is None:
                        raise
                    # (the cluster and timeline refused: asked again without them)
                    sent = _wall_clock()
                    row = run(lambda d: d.fetchrow(_check_sql(driver, False)))
                    self._timeline_unreadable(refused)
            except Exception:  # (no USAGE on the schema fails the lookups: say that)
                self._look_for_missing(lambda sql: run(lambda d: d.fetchval(sql)))
                raise
            self._fence(driver, row[5], lambda: run(lambda d: d.fetchval(_SYSTEM_SQL)))
            _note_read_only_source(driver, row)
            self._check_clock(sent, row[1])
            self._note_control(driver, row[3])
            self._note_replication_role(row[4])
            if not self._shadow_asked:
                self._ask_shadowed(lambda: run(lambda d: d.fetchval(f"SELECT {_SHADOWED_SQL}")))
            if not self._trusted_install(row, lambda sql: run(lambda d: d.fetchval(sql))):
                return False, False, reports
            _identities[driver] = row[2]
            prepare = prepare and reports
            done = prepare and _quietly(lambda: run(lambda d: d.execute(_PREPARE_SQL)))
            return True, done, reports
        # A server that doesn't report ``in_hot_standby`` (before PostgreSQL 14) doesn't tell
        # the client when its transactions are read-only either: no prepared statement there
        # (see ``_psycopg_read_mode``), the function decides on the server. psycopg's async
        # connection goes through SQLAlchemy's adapter (its cursor and autocommit), the sync one
        # is its own DBAPI connection.
        reports = driver.pgconn.parameter_status(b"in_hot_standby") is not None
        prepare = prepare and reports
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        cursor = dbapi_connection.cursor()
        interrupted = False
        try:
            fenced = self._fenced
            sent = _wall_clock()
            try:
                try:
                    cursor.execute(_check_sql(driver, fenced))
                except Exception as exc:
                    refused = _timeline_refused(exc) if fenced else None
                    if refused is None:
                        raise
                    # (the cluster and timeline refused: asked again without them)
                    sent = _wall_clock()
                    cursor.execute(_check_sql(driver, False))
                    self._timeline_unreadable(refused)
            except Exception:  # (no USAGE on the schema fails the lookups: say that)
                self._look_for_missing(lambda sql: _fetch_value(cursor, sql))
                raise
            row = cursor.fetchone()
            self._fence(driver, row[5], lambda: _fetch_value(cursor, _SYSTEM_SQL))
            _note_read_only_source(driver, row)
            self._check_clock(sent, row[1])
            self._note_control(driver, row[3])
            self._note_replication_role(row[4])
            if not self._shadow_asked:
                self._ask_shadowed(lambda: _fetch_value(cursor, f"SELECT {_SHADOWED_SQL}"))
            if not self._trusted_install(row, lambda sql: _fetch_value(cursor, sql)):
                return False, False, reports
            _identities[driver] = row[2]
            return True, prepare and _quietly(lambda: cursor.execute(_PREPARE_SQL)), reports
        except BaseException as exc:
            # interrupted (Ctrl-C, SystemExit) maybe with a statement in flight: the connection
            # is left as it is, to be closed by the caller, and the interruption goes on (the
            # autocommit's reset would be refused there, and its error would replace it)
            interrupted = not isinstance(exc, Exception)
            raise
        finally:
            cursor.close()
            # (a lost one refuses it: the set-up's error stands)
            if not interrupted and not dbapi_connection.closed:
                dbapi_connection.autocommit = autocommit

    def _look_for_shadowed(self, dbapi_connection: Any) -> None:
        """On an engine the protocol can't mark (psycopg2, pg8000: ``verifiable``), ask its
        first PostgreSQL connection for the database's functions under built-ins' names, as the
        marked connections' set-up does (``_SHADOWED_SQL``): its statements in autocommit are
        noted by what they may write too (see ``_statements.statement_listeners``). A failure
        leaves the names as they are (said at DEBUG); the next new connection asks again."""
        if self._engine_name != "postgresql" or self._shadow_asked:
            return
        try:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"SELECT {_SHADOWED_SQL}")
                row = cursor.fetchone()
            finally:
                cursor.close()
            dbapi_connection.rollback()  # (the driver's transaction the query began)
        except Exception:
            debug_failure(log_session, "could not look for functions under built-ins' names")
            with contextlib.suppress(Exception):
                dbapi_connection.rollback()
            return
        self._note_shadowed(row[0] if row else None)

    def _ask_shadowed(self, ask: Callable[[], Any]) -> None:
        """``ask()`` for the database's functions under built-ins' names, noted (see
        :meth:`_note_shadowed`); a failure of its own leaves the set-up going on (said at
        DEBUG; the next new connection asks again), a lost connection is the set-up's."""
        try:
            names = ask()
        except Exception as exc:
            if DEFAULT_CLASSIFIER.classify(exc) is Outcome.DISCONNECT:
                raise
            debug_failure(log_session, "could not look for functions under built-ins' names")
            return
        self._note_shadowed(names)

    def _note_shadowed(self, names: str | None) -> None:
        """The database's own functions under built-ins' names (``_SHADOWED_SQL``'s answer,
        space-separated): calls of those names may write (see
        :func:`~._statements.distrust_calls`). Asked once per engine: the connections set up
        from then on don't ask, so the names are distrusted first and the answer published
        after (the other way round, a connection set up at that moment, on another thread,
        skipped the question and judged its unit's calls of them by the trust of before)."""
        if names:
            distrust_calls(str(names).split())
        self._shadow_asked = True

    def _note_control(self, driver: Any, readable: bool) -> None:
        """Whether the role of ``driver`` may read the incarnation (``_CHECK_SQL``'s last
        column); also not once a unit of this engine was refused it (see
        :meth:`control_refused`)."""
        if not readable or self._control_refused:
            _control_unreadable.add(driver)

    def _note_replication_role(self, role: str) -> None:
        """A new connection's ``session_replication_role`` (``_CHECK_SQL``'s last column):
        under ``replica`` (set for the login role or the database: ``ALTER ROLE`` / ``ALTER
        DATABASE ... SET``, or the URL's options) no ordinary trigger fires, the transition
        trigger's among them, so raw SQL moves rows past the rules unjudged, and foreign keys
        go unchecked. Counted per connection (``health()``'s
        ``transitions.connections_without_triggers``), said once per engine."""
        if role != "replica":
            return
        count_transitions("connections_without_triggers")
        if self._replica_said:
            return
        self._replica_said = True
        emit(
            self._settings.config,
            log_session,
            logging.WARNING,
            "Database triggers do not fire on connections of database %s: their "
            "session_replication_role is replica (set for the role or the database: see "
            "pg_db_role_setting; or in the URL's options). The transition trigger does not "
            "judge status moves there: only the client's guards do (flush, ORM bulk UPDATE), "
            "and raw SQL moves rows past the rules; foreign keys are not checked either. Set "
            "it back: ALTER ROLE (or DATABASE) ... RESET session_replication_role",
            self._where,
            service=self._settings.service,
            event="triggers_off",
        )

    def _fence(self, driver: Any, timeline_hex: str | None, ask_system: Callable[[], Any]) -> None:
        """A new connection's timeline (hex; None on a standby, or where the role may not read
        it) and cluster (its system identifier, ``ask_system()``: asked only when needed): the
        highest timeline seen of each cluster is kept, and a connection to a server of the same
        cluster on a lower one is refused (see :meth:`_refuse`): an old primary back as a
        primary after a failover, which would otherwise take writes beside the new primary
        (split brain), or settle a lost COMMIT answer of the new primary by looking there. A
        standby (read-only, maybe behind) is never refused; a server of another cluster (a new
        ``initdb``) is judged against its own cluster's timelines only.

        A connection on the highest timeline the engine has seen (of any cluster) is never
        refused, so it is taken without asking its cluster (the control file read from disk,
        see ``_SYSTEM_SQL``): the common case, a connection to the server of the connections
        before it. Any other timeline (the first connection, a failover, an old primary, a
        cluster below another one) asks the cluster, once on that connection, and is judged by
        it. A server that does not give its cluster (a role refused pg_control_system(), a
        fork lacking it) leaves the engine unfenced, as a timeline refused at connect does."""
        if timeline_hex is None:
            return
        try:
            timeline = int(timeline_hex, 16)
        except (TypeError, ValueError):  # (not a WAL file's name: nothing to judge by)
            return
        server = server_address(driver) or "an unknown address"
        with self._timelines_lock:
            highest = self._highest
            if highest is not None and timeline == highest[0]:
                # (taken for the cluster seen on it, unasked: a URL's hosts may be clusters
                # on the same timeline, so its cluster is asked before it is ever refused, at
                # a checkout that would refuse it: see judge_pooled)
                _fences[driver] = Fence(self.fence_token, highest[1], timeline, server, True)
                return
        try:
            answer = ask_system()
        except Exception as exc:
            refused = _timeline_refused(exc)
            if refused is None:
                raise  # (a lost connection: the check's)
            self._timeline_unreadable(refused)
            return
        if answer is None:
            return
        system = str(answer)
        fence = Fence(None, system, timeline, server, False)
        seen = self._judge_cluster(fence)
        if seen is None:
            _fences[driver] = fence
            return
        self._refuse(server, system, timeline, seen)

    def _judge_cluster(self, fence: Fence) -> tuple[int, str, bool] | None:
        """Judge ``fence`` (see ``_fences``; its cluster asked of its server) against the
        highest timeline seen of its cluster, by this engine or by the fleet (another process
        sharing it through Redis, as this process's links last heard): None, the timeline
        noted (and ``fence`` given the current fence token), where it is not below it; else
        that highest (timeline, server, whether the fleet saw it). A timeline this engine
        sees first is shared with the fleet (by the links' threads: no round trip here)."""
        system, timeline, server = fence.system, fence.timeline, fence.server
        assert system is not None  # (judged only once its cluster is known)
        fleet = fleet_timeline(system)
        with self._timelines_lock:
            seen = self._timelines.get(system)
            if fleet is not None and (seen is None or fleet[0] > seen[0]):
                seen = self._take_fleets_locked(system, *fleet)
            if seen is not None and timeline < seen[0]:
                return seen
            if seen is None and len(self._timelines) >= _MAX_CLUSTERS:
                del self._timelines[next(iter(self._timelines))]  # (the oldest: bounded)
            if seen is None or timeline > seen[0] or seen[1] != server or seen[2]:
                self._timelines[system] = (timeline, server, False)
            if seen is not None and timeline > seen[0]:
                self.fence_token = object()  # (the pool's connections judged again)
            self._note_highest(system)
            fence.token = self.fence_token
        if timeline > 1 and (fleet is None or timeline > fleet[0]):
            share_timeline(system, timeline, server)
        return None

    def fleet_timeline(self, system: str, timeline: int, server: str) -> None:
        """The fleet saw cluster ``system`` on ``timeline`` at ``server`` (told by the link's
        thread, see ``_fleet.follow_timelines``): above the highest this engine has seen
        of a cluster it reaches, it is taken as seen here, so the pool's connections to an
        old primary of that cluster are refused at their next checkout and new ones at
        connect. A cluster this engine has not reached is looked up when it does (see
        :meth:`_judge_cluster`). In memory: no round trip."""
        with self._timelines_lock:
            seen = self._timelines.get(system)
            if seen is not None and timeline > seen[0]:
                self._take_fleets_locked(system, timeline, server)

    def _take_fleets_locked(self, system: str, timeline: int, server: str) -> tuple[int, str, bool]:
        """The fleet's ``timeline`` of cluster ``system`` (seen at ``server``), above this
        engine's, taken as the highest seen of it (under ``_timelines_lock``): the pool's
        connections judged again. Returns its entry of ``_timelines``."""
        entry = self._timelines[system] = (timeline, server, True)
        if len(self._timelines) > _MAX_CLUSTERS:
            del self._timelines[next(iter(self._timelines))]  # (the oldest: bounded)
        self.fence_token = object()
        self._note_highest(system)
        return entry

    def fence_of(self, driver: Any) -> Fence:
        """What the check at connect found of ``driver``'s server (see ``_fences``), to be
        kept with the pooled connection: nothing to judge where it found nothing."""
        fence = _fences.get(driver)
        return Fence(self.fence_token, None, 0, "", False) if fence is None else fence

    def judge_pooled(self, fence: Fence, dbapi_connection: Any) -> str | None:
        """Judge again a pooled connection (``dbapi_connection``) whose ``fence`` (see
        ``_fences``) was judged under another fence token (a cluster's highest timeline rose
        since): the connection is kept (None) unless its cluster was seen since on a higher
        timeline than its own (an old primary's connection, made before the engine saw the
        promoted standby), when the refusal is counted and said as at connect
        (:meth:`_say_refused`) and returned, for the pool to replace it. Judged in memory,
        unless the connection's cluster was taken, unasked, for the one seen on its timeline
        (see :meth:`_fence`) and would be refused: its server is asked its cluster then (a
        statement outside any transaction), and the connection judged by that one (another
        cluster on the same timeline is kept). A lost connection raises."""
        with self._timelines_lock:
            system = fence.system
            seen = None if system is None else self._timelines.get(system)
            if system is None or seen is None or fence.timeline >= seen[0]:
                fence.token = self.fence_token
                return None
        if fence.unasked:
            try:
                answer = self._ask_system(dbapi_connection)
            except Exception as exc:
                refused = _timeline_refused(exc)
                if refused is None:
                    raise  # (a lost connection: replaced by the caller)
                self._timeline_unreadable(refused)
                answer = None
            fence.unasked = False
            if answer is None:  # (nothing to judge by: kept, as at connect)
                fence.token, fence.system = self.fence_token, None
                return None
            system = fence.system = str(answer)
            seen = self._judge_cluster(fence)
            if seen is None:
                return None
        return self._say_refused(fence.server, system, fence.timeline, seen)

    def _ask_system(self, dbapi_connection: Any) -> Any:
        """The cluster (``_SYSTEM_SQL``) of the server of ``dbapi_connection``, idle (checked
        out), asked outside any transaction."""
        driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        if self.is_asyncpg:
            return _runner(dbapi_connection, driver)(lambda d: d.fetchval(_SYSTEM_SQL))
        return _autocommit_row(dbapi_connection, _SYSTEM_SQL)[0]

    def _note_highest(self, system: str) -> None:
        """Keep the highest timeline of any cluster in ``_timelines`` and a cluster seen on
        it (``system``, just judged, where it is one): under ``_timelines_lock``."""
        best = max(seen[0] for seen in self._timelines.values())
        if self._timelines[system][0] != best:
            system = next(key for key, seen in self._timelines.items() if seen[0] == best)
        self._highest = (best, system)

    def _refuse(self, server: str, system: str, timeline: int, seen: tuple[int, str, bool]) -> None:
        """Refuse the connection to ``server``, on ``timeline`` of cluster ``system`` where
        ``seen`` (timeline, server) is the highest seen: counted, said (one line per server
        every few seconds; the hooks see each), and raised as the driver's error of SQLSTATE
        08004 (the server rejected the connection): a lost connection to the classifier, so
        the unit is retried and the breaker counts it. The caller closes the connection."""
        message = self._say_refused(server, system, timeline, seen)
        error: Exception
        if self.is_asyncpg:
            error = asyncpg.exceptions.ConnectionRejectionError(message)
        else:
            error = psycopg.errors.SqlserverRejectedEstablishmentOfSqlconnection(message)
        mark_fenced(error, server)
        raise error

    def _say_refused(
        self, server: str, system: str, timeline: int, seen: tuple[int, str, bool]
    ) -> str:
        """Count and say a connection refused (see :meth:`_refuse`): the error's message."""
        config, service = self._settings.config, self._settings.service
        stats = stats_for(service)
        stats.add("stale_timeline_refusals")
        fleet = seen[2]
        if fleet:
            stats.add("stale_timeline_refusals_fleet")
        by = " by another process of the fleet (shared through Redis)" if fleet else ""
        log, unlogged = self._fence_lines.take(server)
        database = self.engine.url.database
        emit(
            config,
            log_session,
            logging.ERROR,
            "Refused a connection to an old primary: service=%s database %s at %s takes writes "
            "on timeline %d of its cluster (system identifier %s), but timeline %d of that "
            "cluster was seen at %s%s: a standby was promoted since, and this server was "
            "restarted as a primary without being demoted (split brain). Nothing is written "
            "or verified there: its units fail as if it were down (retried; the circuit "
            "breaker may open). Stop it, or rejoin it as a standby of the new primary "
            "(pg_rewind)%s%s",
            service,
            database,
            server,
            timeline,
            system,
            seen[0],
            seen[1],
            by,
            f"; if it is rightly the primary (the cluster rolled back on purpose), delete field "
            f"{system} of {TIMELINES_KEY} in Redis, then restart the application's processes"
            if fleet
            else "",
            more_since(unlogged),
            log=log,
            service=service,
            event="stale_timeline_refused",
            server=server,
            timeline=timeline,
            newest_server=seen[1],
            newest_timeline=seen[0],
            system_identifier=system,
            fleet=fleet,
            suppressed=unlogged,
        )
        return (
            f"resilient_db refused the connection to {server} (database {database}): it takes "
            f"writes on timeline {timeline} of its cluster (system identifier {system}), but "
            f"timeline {seen[0]} of that cluster was seen at {seen[1]}{by}: an old primary "
            "back as a primary after a failover"
        )

    def _timeline_unreadable(self, code: str) -> None:
        """The check at connect was refused the cluster and timeline (SQLSTATE ``code``: the
        role may not call pg_control_system(), pg_walfile_name() or pg_current_wal_lsn(), 42501,
        or the server does not give them, as a managed service's fork may not) and answered
        without them: the engine's connections are checked without them from now on, so no
        old primary is refused here; said once per engine."""
        if not self._fenced:
            return
        self._fenced = False
        emit(
            self._settings.config,
            log_session,
            logging.WARNING,
            "Database %s did not give the server's cluster and timeline at connect "
            "(pg_control_system(), pg_walfile_name(), pg_current_wal_lsn(): SQLSTATE %s%s): "
            "an old primary back as a primary after a failover is not refused here. %s",
            self._where,
            code,
            " (the role may not call them)" if code == "42501" else "",
            "GRANT EXECUTE on the three functions to the role to have it refused"
            if code == "42501"
            else "Connections are made as before, unfenced",
            service=self._settings.service,
            event="timeline_unreadable",
            sqlstate=code,
        )

    def control_refused(self, driver: Any) -> None:
        """A unit's xid read on ``driver`` was refused the incarnation (42501: the role in
        effect may not call ``pg_control_checkpoint()``, where the login role may: a unit that
        switched roles). The engine's connections read the xid alone from now on, new ones
        too: with ``NullPool`` every attempt is on a new connection, which would be refused
        anew (a verdict of "committed" is then never trusted, as for a role that may not read
        it: safe for every role)."""
        self._control_refused = True
        _control_unreadable.add(driver)

    def markers_unusable(self) -> None:
        """The marker function refused a connection's COMMIT (42501): say so once per engine
        (see ``_marker_statement_failed``)."""
        if self._unusable_said:
            return
        self._unusable_said = True
        emit(
            self._settings.config,
            log_session,
            logging.WARNING,
            "The commit markers of database %s are no longer usable here: a COMMIT's "
            "resilient_db.mark_commit() was refused (SQLSTATE 42501: the role the application "
            "logs in as may not write markers, a grant revoked or the markers installed again "
            "without its grants; or a role a unit switched to may not call the function). "
            "That COMMIT did not run and the unit is replayed; the connections that meet this "
            "verify lost COMMIT answers by transaction id from now on, at one extra round trip "
            "per writing unit and with more unknown outcomes. The application's role needs "
            "USAGE on schema resilient_db, EXECUTE on its functions and SELECT, INSERT on "
            "resilient_db.commit_markers; a role a unit switches to, USAGE on the schema and "
            "EXECUTE on resilient_db.mark_commit (the install grants both to PUBLIC)",
            self._where,
            service=self._settings.service,
            event="commit_markers_unusable",
        )

    # -- pruning ----------------------------------------------------------------------------------
    def prune_due(self) -> bool:
        return time.monotonic() >= self._next_prune

    def pruned(self) -> bool:
        """Claim this prune (one caller per interval)."""
        with self._prune_lock:
            if not self.prune_due():
                return False
            self._next_prune = time.monotonic() + PRUNE_INTERVAL
            return True

    def prune_refused(self) -> None:
        """The server refused a prune (42501): say so once per engine, since the table then
        grows for as long as the application runs."""
        if self._prune_refused:
            return
        self._prune_refused = True
        emit(
            self._settings.config,
            log_session,
            logging.WARNING,
            "Expired commit markers of database %s can't be pruned: the server refused "
            "(SQLSTATE 42501), so resilient_db.commit_markers grows. The role the application "
            "logs in as needs INSERT on it and EXECUTE on resilient_db.prune_commit_markers; "
            "a database installed by an earlier release needs "
            "resilient_db.install_commit_markers() again (or the Alembic step "
            "0008_markers_claim_search_path)",
            self._where,
            service=self._settings.service,
            event="commit_markers_prune_refused",
        )

    def prune_left(self, count: int) -> None:
        """The claimed prune deleted ``count`` markers: a full batch may have left more behind,
        so the next prune is due soon."""
        if count >= PRUNE_BATCH:
            with self._prune_lock:
                self._next_prune = min(self._next_prune, time.monotonic() + PRUNE_CATCH_UP)


def switched_on_everywhere() -> None:
    """After a reload: every engine's connections made while self-healing was off are marked
    where it is on now (see :meth:`CommitProtocol.switched_on`)."""
    with STATE.lock:
        engines = list(STATE.engine_hooks.values())
    for hooks in engines:
        hooks.commit.switched_on()


def _unmarked_commit(dbapi_connection: Any) -> None:
    """A COMMIT goes out on an engine without the commit protocol (its dialect's ``do_commit``,
    see :func:`~._statements.note_dialect_calls`). Outside the unit's own final COMMIT, it is
    the unit's code that commits: the attempt can't be replayed after it. (Unlike a marked
    COMMIT, its outcome is not seen: one the server refuses also counts.)"""
    attempt = current_attempt.get()
    if attempt is not None and committing_request() is None:
        attempt.committed = True


def verifiable(engine: Engine) -> bool:
    """Whether units on ``engine`` can have their commits verified: PostgreSQL through psycopg 3
    (sync or async) or asyncpg, the drivers whose connections the protocol marks."""
    dialect = engine.dialect
    return dialect.name == "postgresql" and dialect.driver in ("psycopg", "asyncpg")


def _quietly(action: Callable[[], object]) -> bool:
    """Run ``action``; False (and a debug line) if it raised."""
    try:
        action()
    except Exception:
        debug_failure(log_session, "could not prepare the commit-marker statement")
        return False
    return True


class PreparedMarker:
    """An engine's prepared marker statement (:data:`PREPARED_MARK`), used until a connection
    is found without it.

    Each connection made while the markers are installed prepares it, unless its driver was told
    not to prepare statements (psycopg ``prepare_threshold=None``, asyncpg
    ``statement_cache_size=0``: the setting for a transaction-mode pooler, where a session's
    prepared statements don't follow it to its next transaction) or its pool keeps no connection
    (``NullPool``): those send the same INSERT in the COMMIT message (:class:`InlineMarker`). A
    COMMIT whose ``EXECUTE`` finds the statement gone (SQLSTATE 26000: such a pooler not
    announced, or a ``DISCARD ALL`` sent past SQLAlchemy) did not commit, since the server stops
    a message at its first error: the error is marked safe to replay
    (:func:`~._classify.mark_replay_safe`), and the engine's COMMITs send the INSERT inline from
    then on. A ``DISCARD`` or ``DEALLOCATE`` sent through SQLAlchemy (or the client) is seen
    by the statement listener, and psycopg's own ``DEALLOCATE ALL`` by its prepare manager:
    that connection's next COMMIT prepares the statement again (:class:`_Reprepare`), and
    nothing fails.
    """

    __slots__ = ("_on_lost", "_on_refused", "usable")

    def __init__(self, on_lost: Callable[[], None], on_refused: Callable[[str], None]) -> None:
        self.usable = True
        self._on_lost = on_lost
        self._on_refused = on_refused

    def lost(self) -> None:
        if self.usable:
            self.usable = False
            self._on_lost()

    def refused(self, sqlstate: str) -> None:
        """The server refused the statement on one connection (see ``_REFUSED_MARKER``)."""
        self._on_refused(sqlstate)

    def message(self, marker: str, always: bool) -> str:
        """``EXECUTE`` of the statement; once it was found gone, the same INSERT inline.
        ``always``: the marker is inserted whatever the xid (see :data:`_PREPARE_SQL`)."""
        if self.usable:
            return f"EXECUTE {PREPARED_MARK}('{marker}', {_ALWAYS[always]}); COMMIT"
        return InlineMarker.message(marker, always)

    def dropped(self, connection: Any) -> _MarkerForm:
        """The form for ``connection`` once its statement may have been deallocated."""
        return _Reprepare(connection, self) if self.usable else self


class InlineMarker:
    """The marker statement sent in the COMMIT message itself, for a connection without the
    prepared one: where nothing may be prepared (a transaction-mode pooler's setting) or a
    connection serves one unit (``NullPool``). The same INSERT as the prepared statement, so
    it runs where that one would, and is refused where that one would be (then the connection
    calls the function); the server parses and plans it at every COMMIT, which costs less than
    the function's call (and, on a new connection, than a PREPARE and its EXECUTE)."""

    __slots__ = ("_on_refused",)
    usable = True

    def __init__(self, on_refused: Callable[[str], None]) -> None:
        self._on_refused = on_refused

    def lost(self) -> None:
        """Nothing is kept on the server: nothing to lose."""

    def refused(self, sqlstate: str) -> None:
        self._on_refused(sqlstate)

    @staticmethod
    def message(marker: str, always: bool) -> str:
        return f"{_INLINE_MARK.format(marker=marker, always=_ALWAYS[always])}; COMMIT"

    def dropped(self, connection: Any) -> _MarkerForm:
        return self  # nothing prepared


class _Reprepare:
    """The marker form of a connection whose prepared statement may be gone: psycopg dropped
    it (:func:`_watch_psycopg_deallocations`), or a ``DISCARD`` / ``DEALLOCATE`` went through
    the connection. Its next marked COMMIT sends the INSERT inline and prepares the statement
    again after the COMMIT, in the same message (``INSERT ...; COMMIT; PREPARE ...``: no round
    trip of its own). The PREPARE comes last so that nothing it meets can stop the COMMIT: a
    statement that is still there (42P05, prepared again out of sight, or a DEALLOCATE that
    failed) is an error after the COMMIT succeeded, which the commit ignores
    (:func:`_prepare_failed_after_commit`). Building that message hands the connection back to
    the engine's prepared form; a message that fails on the way takes it back here
    (:func:`_may_have_missed_prepare`)."""

    __slots__ = ("_connection", "_prepared")

    def __init__(self, connection: Any, prepared: PreparedMarker) -> None:
        self._connection = weakref.ref(connection)
        self._prepared = prepared

    def message(self, marker: str, always: bool) -> str:
        connection = self._connection()
        if connection is not None and connection._rdb_prepared is self:
            connection._rdb_prepared = self._prepared  # prepared again by this message
        inline = InlineMarker.message(marker, always)
        return f"{inline}; {_PREPARE_SQL}" if self._prepared.usable else inline

    def dropped(self, connection: Any) -> _MarkerForm:
        return self

    def lost(self) -> None:
        self._prepared.lost()

    def refused(self, sqlstate: str) -> None:
        self._prepared.refused(sqlstate)


def _may_have_missed_prepare(connection: Any, message: str) -> None:
    """A marked COMMIT message failed: if it was to prepare the statement again (see
    :class:`_Reprepare`), the PREPARE at its end may not have run, so the connection's next
    COMMIT prepares it again (at worst meeting it there: 42P05, ignored)."""
    form = connection._rdb_prepared
    if message.endswith(_PREPARE_SQL) and isinstance(form, PreparedMarker):
        connection._rdb_prepared = form.dropped(connection)


def _prepare_failed_after_commit(connection: Any, sqlstate: str | None) -> None:
    """The PREPARE after a successful COMMIT (:class:`_Reprepare`) failed: the unit is
    committed all the same. 42P05: the statement is there (the connection keeps the prepared
    form); anything else: the connection calls the function from now on."""
    if sqlstate != "42P05":
        connection._rdb_prepared = None
    log_quietly(
        log_session,
        logging.DEBUG,
        "PREPARE after a COMMIT failed (%s); the COMMIT stands",
        sqlstate,
    )


def _watch_psycopg_deallocations(connection: Any, prepared: PreparedMarker) -> None:
    """Have ``connection`` (psycopg, sync or async) prepare the marker statement again after
    psycopg drops it.

    psycopg prepares a query of its own after a few executions (``prepare_threshold``), and,
    when it has any, sends ``DEALLOCATE ALL`` after a ROLLBACK (a session closed without
    committing, an error) and after a DROP, ALTER or DISCARD ALL it runs: the marker statement
    goes with them, and the next writing unit's ``EXECUTE`` would fail (the unit replayed, the
    engine's COMMITs sent inline from then on). The moment psycopg decides so is its prepare
    manager's ``clear()`` (:func:`~._internals.psycopg_on_deallocate_all`): then the connection
    switches to :class:`_Reprepare`. Where that cannot be watched the connection is left as it
    was (a lost statement is then found at its next COMMIT, as for a pooler's).
    """
    ref = weakref.ref(connection)

    def dropped() -> None:
        owner = ref()
        if owner is not None and owner._rdb_prepared is prepared:
            owner._rdb_prepared = prepared.dropped(owner)

    psycopg_on_deallocate_all(connection, dropped)


#: A connection's marker statement: the engine's prepared one, or the inline one (set up at
#: connect), or, until its next marked COMMIT, the prepared one to prepare again (_Reprepare).
_MarkerForm: TypeAlias = "PreparedMarker | InlineMarker | _Reprepare"


#: Errors of the prepared marker statement that its function form does not meet: the role in
#: effect may not write markers (42501: a role the unit switched to past the statement
#: listener), or the transaction is read-only (25006: made so past it).
_REFUSED_MARKER: Final = frozenset({"42501", "25006"})
#: what the marker statement (any form) meets once the markers are uninstalled: no table, no
#: schema, no function
_MARKERS_GONE: Final = frozenset({"42P01", "3F000", "42883"})


def _marker_statement_failed(driver: Any, message: str, exc: BaseException) -> None:
    """The first statement of a marked COMMIT message failed, so the COMMIT after it never ran
    (the transaction is still open, failed). When that was the marker statement (prepared or
    inline) and its other form won't fail the same way, say so on the error (a replay is safe)
    and stop using it: the prepared one on the whole engine when it is gone (26000: the INSERT
    goes inline), the statement on this connection when refused (the function). Any other
    error is the unit's to report (a replay would meet it again)."""
    prepared = driver._rdb_prepared
    code = getattr(exc, "sqlstate", None)  # psycopg's and asyncpg's errors both carry it
    if code in _MARKERS_GONE and SCHEMA in str(exc):
        # the markers were uninstalled under the running application (a downgrade): this
        # connection verifies by transaction id from now on (a new one finds them missing)
        driver._rdb_prepared = None
        driver._rdb_mode = XID
        if prepared is not None:
            prepared.refused(str(code))
        mark_replay_safe(exc)
        return
    if code == "42501" and _FUNCTION_MARK in message:
        # the function refused: the login role may not write markers (its own RAISE: a grant
        # revoked, or the markers installed again without the application's grants, under the
        # running application), or the role in effect may not call it or reach its schema
        # (USAGE or EXECUTE revoked from PUBLIC, and a unit switched roles). The message's
        # statements before the COMMIT raise nothing else, so the COMMIT never ran; this
        # connection verifies by transaction id from now on (a new one's check decides anew)
        driver._rdb_prepared = None
        driver._rdb_mode = XID
        protocol = _protocol_of(driver)
        if protocol is not None:
            protocol.markers_unusable()
        mark_replay_safe(exc)
        return
    if prepared is None or _FUNCTION_MARK in message:
        return
    if code == "26000":
        prepared.lost()  # its COMMITs (and the engine's) send the statement inline from now on
    elif code in _REFUSED_MARKER:
        driver._rdb_prepared = None
        prepared.refused(str(code))
    else:
        return
    mark_replay_safe(exc)


def _xid_read_failed(driver: Any, exc: BaseException, request: CommitRequest | None = None) -> None:
    """The xid read before a COMMIT (the fallback's, or a notification's) raised ``exc`` on
    ``driver``: the COMMIT never went out. Refused (42501), it is the incarnation's
    ``pg_control_checkpoint()``, which the role in effect may not call (the rest is PUBLIC's;
    the check at connect found that the login role may: a unit switched roles): the engine's
    connections read the xid alone from now on ("committed" is then never trusted, as for a
    role the CASE was meant to spare), and the unit is replayed."""
    if getattr(exc, "sqlstate", None) == "42501":
        protocol = _protocol_of(driver, request)
        if protocol is not None:
            protocol.control_refused(driver)
        else:
            _control_unreadable.add(driver)
        mark_replay_safe(exc)


def _protocol_of(driver: Any, request: CommitRequest | None = None) -> CommitProtocol | None:
    """The commit protocol of the engine of ``driver``, the connection the committing unit's
    COMMIT (``request``, or the one in context) failed on (None outside a unit, or where the
    unit's connections are not known)."""
    if request is None:
        request = committing_request()
    if request is None:
        return None
    for connection, seen in request.drivers():
        if seen is driver:
            hooks = hooks_of(connection.engine)
            return None if hooks is None else hooks.commit
    return None


# What a connection knows of its transaction's read mode at COMMIT (``_rdb_read_mode()`` of the
# marked classes, asked only when a unit that may have written commits with markers):
# READ_WRITE: as far as the client knows, it may write (the prepared marker statement);
# MAYBE_READ_ONLY: declared read-only by the driver (``postgresql_readonly``), or read-only by
# default (``default_transaction_read_only``): the function form, which the server decides;
# STANDBY: the server is a hot standby, where no transaction writes: a plain COMMIT, nothing to
# verify. The server reports both settings to the client (PostgreSQL 14 and later), so reading
# them costs no round trip. A transaction that began before a standby's promotion stays
# read-only, and the first answer after it reports the change, so "on" is never stale for a
# transaction that could write.
READ_WRITE: Final = 0
MAYBE_READ_ONLY: Final = 1
STANDBY: Final = 2


def _psycopg_read_mode(connection: Any) -> int:
    status = connection.pgconn.parameter_status
    if status(b"in_hot_standby") == b"on":
        return STANDBY
    read_only = connection.read_only  # psycopg's BEGIN READ ONLY / READ WRITE, or None
    if read_only or (read_only is None and status(b"default_transaction_read_only") == b"on"):
        return MAYBE_READ_ONLY
    return READ_WRITE


def _asyncpg_read_mode(connection: Any) -> int:
    settings = connection.get_settings()
    if getattr(settings, "in_hot_standby", None) == "on":
        return STANDBY
    if connection._rdb_read_only:  # asyncpg sent BEGIN ... READ ONLY
        return MAYBE_READ_ONLY
    if getattr(settings, "default_transaction_read_only", None) == "on":
        return MAYBE_READ_ONLY
    return READ_WRITE


#: the ticket of every read-only COMMIT, shared: nothing in it varies (the commit sets ``sent``
#: and ``done``, already True; neither matters without a mode: see ``CommitTicket.wrote``)
_READ_ONLY: Final = CommitTicket(None, sent=True, done=True)


def _commit_plan(driver: Any) -> tuple[CommitTicket | None, str | None, AttemptRecord | None]:
    """What the unit committing on ``driver`` now wants its COMMIT to carry.

    Returns (ticket, message, attempt): a message to send instead of COMMIT when the ticket is
    a marker's; no ticket when no unit is committing (plain SQLAlchemy, or the unit's own code
    committing: then the attempt, for :func:`_own_commit`).
    """
    may_write = driver._rdb_may_write
    driver._rdb_may_write = False
    request = current_request.get()
    if request is None or request.ended:  # (ended: see CommitRequest.ended)
        attempt = current_attempt.get()
        # (a task made in an attempt inherits it: its COMMIT after the attempt is drop-in's)
        if may_write and attempt is not None and attempt.running and attempt.settles_own_commits:
            return _own_plan(driver, attempt)  # a unit's own COMMIT midway
        driver._rdb_writes = False  # (no unit: a plain COMMIT)
        return None, None, attempt
    if not may_write:  # proven read-only: nothing to verify
        request.tickets.append(_READ_ONLY)
        return _READ_ONLY, None, None
    notifies = driver._rdb_notifies
    if notifies:
        driver._rdb_notifies = False
    writes = driver._rdb_writes  # (see _statements.WRITES)
    driver._rdb_writes = False
    if driver._rdb_mode == MARKERS:
        read_mode = driver._rdb_read_mode()
        if read_mode == STANDBY:  # nothing can be written there
            request.tickets.append(_READ_ONLY)
            return _READ_ONLY, None, None
        form = driver._rdb_prepared  # the statement (prepared, or inline), or None
        if read_mode == READ_WRITE and form is not None:
            marker = marker_id()
            ticket = CommitTicket(MARKERS, marker=marker, driver=driver)
            request.tickets.append(ticket)
            return ticket, form.message(marker, writes or notifies), None
        # The function, which writes no marker in a read-only transaction: there only a
        # notification or a temporary table's rows (gone with the session a lost answer ends)
        # can be written. Elsewhere it inserts the marker once the transaction holds an xid,
        # which a write that may hold none (see _statements.WRITES) is given first, in the
        # same message. A notification where the transaction may be read-only (begun so,
        # read-only by default, after a statement that may have made it so or a role switch:
        # the client can't tell) is delivered at COMMIT with no marker there: its xid is read
        # (assigned) first, one round trip, and a lost answer whose marker is missing is
        # settled by the xid's status, as without markers (see _unit.check_commit).
        marker = marker_id()
        ticket = CommitTicket(
            MARKERS, marker=marker, driver=driver, reads_xid=notifies, assign_xid=notifies
        )
        request.tickets.append(ticket)
        message = f"{_FUNCTION_MARK}('{marker}'); COMMIT"
        return ticket, _ASSIGN_XID + message if writes and not notifies else message, None
    if (notifies or writes) and driver._rdb_read_mode() == STANDBY:
        # (nothing can be written there, and pg_current_xact_id() would be refused)
        request.tickets.append(_READ_ONLY)
        return _READ_ONLY, None, None
    ticket = CommitTicket(XID, reads_xid=True, assign_xid=notifies or writes, driver=driver)
    request.tickets.append(ticket)
    return ticket, None, None


def _own_plan(
    driver: Any, attempt: AttemptRecord
) -> tuple[CommitTicket, str | None, AttemptRecord]:
    """The plan of a COMMIT that a unit's own code sends midway (``session.commit()`` inside
    the unit) of a transaction that may have written: a ticket of its own, not the unit's
    request's, and with the markers the marker in its message, as the final COMMIT carries
    one (no round trip more). Its answer is taken as it comes unless it is answered with a
    WARNING: then it is settled as the final COMMIT's would be (see
    :func:`_settled_own_commit`). Elsewhere (no markers, a transaction that may be read-only,
    a standby, a transaction the attempt did not see begin: a session no resilient factory
    made) its ticket carries nothing a check could find (``UNMARKED``):
    such an answer ends unknown, never done. The check goes to the engine the transaction
    began on (``CommitTicket.engine``: a ``binds=`` database's, not the factory's)."""
    notifies = driver._rdb_notifies
    driver._rdb_notifies = False
    writes = driver._rdb_writes
    driver._rdb_writes = False
    engine = None
    for _transaction, connection, _marked, seen in attempt.began or ():
        if seen is driver:
            engine = connection.engine
    form = driver._rdb_prepared
    if (
        engine is not None
        and driver._rdb_mode == MARKERS
        and form is not None
        and driver._rdb_read_mode() == READ_WRITE
    ):
        marker = marker_id()
        ticket = CommitTicket(MARKERS, marker=marker, driver=driver)
        ticket.engine = engine
        return ticket, form.message(marker, writes or notifies), attempt
    return CommitTicket(UNMARKED, driver=driver), None, attempt


#: the ticket of the unit's own COMMIT midway being answered in this thread or task (see
#: :func:`_settled_own_commit`; psycopg's notice handler notes a WARNING on it)
_own_ticket: contextvars.ContextVar[CommitTicket | None] = contextvars.ContextVar(
    "resilient_db_own_commit", default=None
)


def _settled_own_commit(
    attempt: AttemptRecord, ticket: CommitTicket, send: Callable[[], Any]
) -> Any:
    """Send a unit's own COMMIT midway (``send``, its plan's message: see :func:`_own_plan`)
    on a psycopg connection (sync). Answered plainly, it is done (the attempt committed, as
    :func:`_own_commit` says). Answered with success *and a WARNING* (a cancelled wait for
    the synchronous standby: committed on the primary only), it is not taken for done: the
    unit's factory settles it on a new connection as the unit's final COMMIT's
    (``_settle_own_commit``): proven, the unit goes on; found not committed where the check
    looks, it is raised (replayed when nothing else of the attempt committed); otherwise
    ``CommitOutcomeUnknownError``. Its answer lost (the connection lost while it was out),
    it is settled the same way before the error goes on: committed, the error is the
    attempt's, which committed part of its work (partly committed, not replayed); not
    committed (the claim's fence went in) it is a lost connection, and the attempt is
    replayed when nothing else of it committed; otherwise an unknown outcome, as before."""
    committed_before = attempt.unreplayable
    token = _own_ticket.set(ticket)
    try:
        with _own_commit(attempt):
            ticket.sent = True
            result = send()
    except BaseException as exc:
        _own_ticket.reset(token)
        settle = _lost_own_answer(attempt, ticket, exc, is_async=False)
        if settle is not None:
            settle(attempt, ticket, committed_before, exc)
        raise
    _own_ticket.reset(token)
    settle = _warned_own_answer(attempt, ticket, is_async=False)
    if settle is not None:
        settle(attempt, ticket, committed_before)
    return result


async def _settled_own_commit_async(
    attempt: AttemptRecord, ticket: CommitTicket, send: Callable[[], Awaitable[Any]]
) -> Any:
    """:func:`_settled_own_commit` on an async connection (asyncpg's, psycopg's)."""
    committed_before = attempt.unreplayable
    token = _own_ticket.set(ticket)
    try:
        with _own_commit(attempt):
            ticket.sent = True
            result = await send()
    except BaseException as exc:
        _own_ticket.reset(token)
        settle = _lost_own_answer(attempt, ticket, exc, is_async=True)
        if settle is not None:
            await settle(attempt, ticket, committed_before, exc)
        raise
    _own_ticket.reset(token)
    settle = _warned_own_answer(attempt, ticket, is_async=True)
    if settle is not None:
        await settle(attempt, ticket, committed_before)
    return result


def _lost_own_answer(
    attempt: AttemptRecord, ticket: CommitTicket, exc: BaseException, *, is_async: bool
) -> Any:
    """The factory's ``_settle_own_commit`` for an own COMMIT midway that raised ``exc``, when
    ``exc`` lost its answer and the marker can tell what became of it; else None."""
    if ticket.mode == MARKERS and isinstance(exc, Exception) and commit_left_unanswered(exc):
        return attempt.own_commit_settler(is_async=is_async)
    return None


def _warned_own_answer(attempt: AttemptRecord, ticket: CommitTicket, *, is_async: bool) -> Any:
    """An own COMMIT midway answered: None when plainly (done), else the factory's
    ``_settle_own_commit`` for its answer with a WARNING; when none can settle it (a sync
    connection's COMMIT in an async factory's unit) its outcome is unknown, raised (see
    ``AttemptRecord.own_commit_unproven``)."""
    if ticket.warned is None:
        ticket.done = True
        return None
    settle = attempt.own_commit_settler(is_async=is_async)
    if settle is None:
        attempt.own_commit_unproven(ticket)  # (raises)
    return settle


def _psycopg_own_send(connection: Any, base: Any, message: str | None) -> None:
    """A psycopg connection's own COMMIT midway (see :func:`_own_plan`): its marked message,
    or a plain COMMIT."""
    if message is None:
        base.commit(connection)
        return
    with _marker_statement_errors(connection, message):
        _raise_error(connection, psycopg_simple_query(connection, message.encode()))


async def _apsycopg_own_send(connection: Any, base: Any, message: str | None) -> None:
    """:func:`_psycopg_own_send` on a ``psycopg.AsyncConnection``."""
    if message is None:
        await base.commit(connection)
        return
    with _marker_statement_errors(connection, message):
        _raise_error(connection, await psycopg_simple_query_async(connection, message.encode()))


async def _asyncpg_own_send(
    connection: Any,
    base: Any,
    query: str,
    message: str | None,
    *,
    ticket: CommitTicket,
    timeout: Any,
) -> Any:
    """An asyncpg connection's own COMMIT midway (see :func:`_own_plan`): its marked message
    (its errors as the final COMMIT's), or the COMMIT asked for; a WARNING that came with it
    noted on ``ticket``; a failed transaction's answer (ROLLBACK) raised as 25P02."""
    if message is None:
        sent = query
        status = await base.execute(connection, query, timeout=timeout)
    else:
        sent = message + ";"
        try:
            status = await base.execute(connection, sent, timeout=timeout)
        except BaseException as exc:
            if not _prepared_after_commit(connection, message, exc):
                _may_have_missed_prepare(connection, message)
                if isinstance(exc, asyncpg.PostgresError):
                    await _failed_before_commit(connection, base, message, exc)
                raise
            status = "COMMIT"
    if connection._rdb_warned is not None:
        _asyncpg_warned(connection, sent, ticket)
    rolled_back_instead(status)
    return status


def _idle_commit_plan(driver: Any) -> tuple[CommitTicket | None, None, None]:
    """What an asyncpg connection's COMMIT does outside a transaction, as psycopg's does there
    (:func:`_psycopg_commit_plan`): a plain COMMIT, with no marker. The transaction SQLAlchemy
    began was ended by a statement of the unit's own code (``COMMIT`` sent as text, which the
    statement's noting recorded on the attempt, see ``_statements.COMMITS``): this COMMIT ends
    nothing, and a marker's INSERT would run on its own, outside any transaction, holding no
    xid, so the marker would never be written (and the server's warning, "there is no
    transaction in progress", would make the unit check a commit that never was). A committing
    unit's ticket is the read-only one: nothing to verify, whatever its answer."""
    driver._rdb_may_write = False
    driver._rdb_notifies = False
    driver._rdb_writes = False
    request = committing_request()
    if request is None:
        return None, None, None
    request.tickets.append(_READ_ONLY)
    return _READ_ONLY, None, None


def prune(connection: Connection) -> int:
    """Delete expired markers, at most :data:`PRUNE_BATCH`; concurrent pruners skip each
    other's rows. Returns how many. Its DELETE is a write: where the server reports
    transactions read-only by default it begins READ WRITE, as a claim does (otherwise every
    prune fails there, 25006: expired markers are never deleted, and the error, taken for a
    server that takes no writes, replaces the engine's pooled connections). Not on a hot
    standby, which refuses READ WRITE and where the function prunes nothing."""
    # (psycopg: a server that froze is not waited for without end, its COMMIT's answer
    # included, see stall_cut: the sync factory's prune runs before the unit's run() returns)
    with stall_cut(connection), connection.begin():
        if read_only_by_default(connection.connection.driver_connection):
            connection.execute(READ_WRITE_SQL)
        return int(connection.exec_driver_sql(PRUNE_SQL).scalar() or 0)


# -- the drivers' marked COMMIT ------------------------------------------------------------------
_marked_classes: dict[tuple[type[Any], bool], type[Any]] = {}
_marked_lock = threading.Lock()
renew_after_fork(globals(), "_marked_lock")


def marked_connection_class(base: type[Any], *, adopted: bool = False) -> type[Any]:
    """A subclass of the driver's connection class ``base`` whose COMMIT can carry a marker.

    Its commit asks :func:`_commit_plan` what the committing unit wants (nothing, outside a
    unit) and sends one message, ``EXECUTE resilient_db_mark_commit('<id>', true); COMMIT``,
    instead of COMMIT, or first reads the xid (the fallback; see ``CommitTicket.reads_xid``).
    It runs inside SQLAlchemy's ``do_commit``, so errors are wrapped and dead connections
    invalidated exactly as for a plain COMMIT:

    * psycopg: ``commit()`` (and ``transaction()``, whose outermost block psycopg commits
      itself: that COMMIT is noted as the unit's own, see :func:`_noting_block`; and the
      two-phase API's ``tpc_prepare``, ``tpc_commit``, ``tpc_rollback``, see :func:`_tpc_step`);
    * asyncpg: its transaction object commits with ``connection.execute("COMMIT;")`` (and rolls
      back with ``"ROLLBACK;"``), so ``execute`` sees those.

    ``adopted`` (asyncpg): a class that an existing connection can be switched to, for one made
    by your ``async_creator`` (asyncpg's classes have ``__slots__``, so a subclass with slots of
    its own can only be made from, through ``connection_class``; this one keeps the protocol's
    four attributes beside the connection instead, at a dictionary lookup each).

    ``tests/test_commit_markers.py`` fails if either driver stops committing this way (the
    COMMIT would then carry no ticket, and a lost answer would be replayed as a disconnect:
    ``pyproject.toml`` bounds both drivers to the releases tested).
    """
    with _marked_lock:
        cls = _marked_classes.get((base, adopted))
        if cls is not None:
            return cls
        namespace: dict[str, Any] = {
            "_rdb_marked": True,
            "__module__": __name__,
        }
        if issubclass(base, asyncpg.Connection):
            # the raw connection's statement methods note what may write (see _statements)
            namespace.update(asyncpg_statement_methods(base))
            noting_execute = namespace.pop("execute")

            async def execute(self: Any, query: str, *args: Any, timeout: Any = None) -> Any:
                if not args and len(query) <= _LONGEST_BEGIN:
                    end = _transaction_command(query)
                    if end == "BEGIN":  # asyncpg's own, spelled in capitals
                        self._rdb_read_only = "READ ONLY" in query
                    elif end == "COMMIT":
                        wrote = self._rdb_may_write
                        if not wrote and self.is_in_transaction():
                            request = current_request.get()  # (committing_request, inline)
                            if request is not None and not request.ended:
                                # a unit's COMMIT of what is proven read-only: nothing to
                                # verify (_commit_plan's first answer, inline, as psycopg's)
                                request.tickets.append(_READ_ONLY)
                                result = await base.execute(self, query, timeout=timeout)
                                self._rdb_warned = None  # (a warning: nothing to prove)
                                return result
                        ticket, message, attempt = (
                            _commit_plan(self)
                            if self.is_in_transaction()
                            else _idle_commit_plan(self)
                        )
                        if attempt is not None:  # a unit's own code commits (AttemptRecord)
                            if ticket is not None:  # midway, settled (see _own_plan)
                                return await _settled_own_commit_async(
                                    attempt,
                                    ticket,
                                    functools.partial(
                                        _asyncpg_own_send,
                                        self,
                                        base,
                                        query,
                                        message,
                                        ticket=ticket,
                                        timeout=timeout,
                                    ),
                                )
                            if not wrote:
                                wrote = await _asyncpg_xid_assigned(self, base)
                            with _own_commit(attempt, wrote):
                                status = await base.execute(self, query, timeout=timeout)
                                rolled_back_instead(status)
                                return status
                        if ticket is None and wrote:  # no unit (drop-in use): see psycopg's
                            try:
                                result = await base.execute(self, query, timeout=timeout)
                            except BaseException as exc:
                                unanswered_commit(exc, DEFAULT_CLASSIFIER, wrote=True)
                                raise
                            if result != "ROLLBACK":  # (a failed transaction's: nothing saved)
                                note_saved()  # (see psycopg's)
                            return result
                        if ticket is not None:
                            if ticket.reads_xid:
                                # (its statement cache's timer keeps the context it was made
                                # in: not the commit's request, which holds the unit's session)
                                outside = current_request.set(None)
                                try:
                                    row = await base.fetchrow(self, ticket.xid_sql)
                                except asyncpg.PostgresError as exc:  # a failed transaction
                                    committing = outside.old_value  # (the unit's request)
                                    _xid_read_failed(
                                        self,
                                        exc,
                                        committing
                                        if isinstance(committing, CommitRequest)
                                        else None,
                                    )
                                    await _end_failed_transaction(self, base)
                                    raise
                                finally:
                                    current_request.reset(outside)
                                ticket.xid, ticket.incarnation = row[0], row[1]
                                self._rdb_warned = None  # (its COMMIT is spelled as any)
                            ticket.sent = True
                            if message is None:
                                result = await base.execute(self, query, timeout=timeout)
                                if self._rdb_warned is not None:
                                    _asyncpg_warned(self, query, ticket)
                            else:
                                try:
                                    result = await base.execute(
                                        self, message + ";", timeout=timeout
                                    )
                                except BaseException as exc:
                                    if _prepared_after_commit(self, message, exc):
                                        result = "COMMIT"
                                    else:
                                        _may_have_missed_prepare(self, message)
                                        if isinstance(exc, asyncpg.PostgresError):
                                            await _failed_before_commit(self, base, message, exc)
                                        raise
                                if self._rdb_warned is not None:
                                    _asyncpg_warned(self, message + ";", ticket)
                            ticket.done = ticket.warned is None  # (see UnprovenCommit)
                            return result
                    elif end == "ROLLBACK":
                        self._rdb_may_write = False
                        self._rdb_writes = False
                    else:
                        return await noting_execute(self, query, timeout=timeout)
                    return await base.execute(self, query, timeout=timeout)
                return await noting_execute(self, query, *args, timeout=timeout)

            def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
                base.__init__(self, *args, **kwargs)
                self._rdb_may_write = False
                self._rdb_mode = None
                self._rdb_prepared = None
                self._rdb_read_only = False
                self._rdb_notifies = False
                self._rdb_writes = False
                self._rdb_warned = None

            namespace.update(execute=execute, _rdb_read_mode=_asyncpg_read_mode)
            if adopted:
                namespace.update(
                    __slots__=(),
                    _rdb_may_write=_kept_beside("may_write", False),
                    _rdb_mode=_kept_beside("mode", None),
                    _rdb_prepared=_kept_beside("prepared", None),
                    _rdb_read_only=_kept_beside("read_only", False),
                    _rdb_notifies=_kept_beside("notifies", False),
                    _rdb_writes=_kept_beside("writes", False),
                    _rdb_warned=_kept_beside("warned", None),
                )
            else:
                namespace.update(
                    __slots__=(
                        "_rdb_may_write",
                        "_rdb_mode",
                        "_rdb_prepared",
                        "_rdb_read_only",
                        "_rdb_notifies",
                        "_rdb_writes",
                        "_rdb_warned",
                    ),
                    __init__=__init__,
                )
        elif issubclass(base, psycopg.AsyncConnection):

            async def acommit(self: Any) -> None:
                wrote = self._rdb_may_write
                ticket, message, attempt = _psycopg_commit_plan(self)
                if attempt is not None:  # a unit's own code commits (see AttemptRecord)
                    if self.pgconn.transaction_status == _INERROR:
                        with _own_commit(attempt, wrote=False):
                            await base.commit(self)  # (answered ROLLBACK: see the sync one's)
                            raise failed_transaction_commit()
                    if ticket is not None:  # midway, settled (see _own_plan)
                        return await _settled_own_commit_async(  # type: ignore[no-any-return]
                            attempt,
                            ticket,
                            functools.partial(_apsycopg_own_send, self, base, message),
                        )
                    if not wrote:
                        wrote = await _apsycopg_xid_assigned(self)
                    with _own_commit(attempt, wrote):
                        return await base.commit(self)
                if ticket is not None:
                    if ticket.reads_xid:
                        try:
                            cursor = await self.execute(ticket.xid_sql)
                        except psycopg.Error as exc:
                            _xid_read_failed(self, exc)
                            raise
                        ticket.xid, ticket.incarnation = await cursor.fetchone()
                    ticket.sent = True
                elif wrote and self.pgconn.transaction_status != _INERROR:
                    # no unit (drop-in use): a lost answer is unknown, not transient (a failed
                    # transaction's COMMIT, answered ROLLBACK, saves nothing: a plain one)
                    try:
                        await base.commit(self)
                    except BaseException as exc:
                        unanswered_commit(exc, DEFAULT_CLASSIFIER, wrote=True)
                        raise
                    note_saved()  # (see the sync connection's)
                    return None
                if message is None:
                    await base.commit(self)
                else:
                    with _marker_statement_errors(self, message):
                        _raise_error(self, await psycopg_simple_query_async(self, message.encode()))
                if ticket is not None:  # (a warning noted by _psycopg_commit_warning: unproven)
                    ticket.done = ticket.warned is None or not ticket.wrote
                return None

            def atransaction(self: Any, *args: Any, **kwargs: Any) -> Any:
                return _noting_block_async(self, base.transaction(self, *args, **kwargs))

            async def atpc_prepare(self: Any) -> None:
                with _tpc_step(self, "prepare"):
                    await base.tpc_prepare(self)

            async def atpc_commit(self: Any, xid: Any = None) -> None:
                with _tpc_step(self, "commit", xid):
                    await base.tpc_commit(self, xid)

            async def atpc_rollback(self: Any, xid: Any = None) -> None:
                with _tpc_step(self, "rollback", xid):
                    await base.tpc_rollback(self, xid)

            namespace.update(
                commit=acommit,
                transaction=atransaction,
                tpc_prepare=atpc_prepare,
                tpc_commit=atpc_commit,
                tpc_rollback=atpc_rollback,
            )
        else:

            def commit(self: Any) -> None:
                wrote = self._rdb_may_write
                if not wrote and self.pgconn.transaction_status == _INTRANS:
                    request = current_request.get()  # (committing_request, inline)
                    if request is not None and not request.ended:
                        # a unit's COMMIT of what is proven read-only: nothing to verify
                        # (_commit_plan's first answer, inline: every reading unit passes here)
                        request.tickets.append(_READ_ONLY)
                        base.commit(self)
                        return None
                ticket, message, attempt = _psycopg_commit_plan(self)
                if attempt is not None:  # a unit's own code commits (see AttemptRecord)
                    if self.pgconn.transaction_status == _INERROR:
                        with _own_commit(attempt, wrote=False):
                            base.commit(self)  # (answered ROLLBACK)
                            raise failed_transaction_commit()
                    if ticket is not None:  # midway, settled (see _own_plan)
                        return _settled_own_commit(  # type: ignore[no-any-return]
                            attempt,
                            ticket,
                            functools.partial(_psycopg_own_send, self, base, message),
                        )
                    if not wrote:
                        wrote = _psycopg_xid_assigned(self)
                    with _own_commit(attempt, wrote):
                        return base.commit(self)  # type: ignore[no-any-return]
                if ticket is not None:
                    if ticket.reads_xid:
                        try:
                            cursor = self.execute(ticket.xid_sql)
                        except psycopg.Error as exc:
                            _xid_read_failed(self, exc)
                            raise
                        ticket.xid, ticket.incarnation = cursor.fetchone()
                    ticket.sent = True
                elif wrote and self.pgconn.transaction_status != _INERROR:
                    # no unit (drop-in use): a lost answer is unknown, not transient (a failed
                    # transaction's COMMIT, answered ROLLBACK, saves nothing: a plain one)
                    try:
                        base.commit(self)
                    except BaseException as exc:
                        unanswered_commit(exc, DEFAULT_CLASSIFIER, wrote=True)
                        raise
                    # committed: an interruption in the close of a drop-in block around it
                    # comes after a saved change (see SavedNote)
                    note_saved()
                    return None
                if message is None:
                    base.commit(self)
                else:
                    # (_marker_statement_errors, written out: every writing unit passes here)
                    try:
                        _raise_error(self, psycopg_simple_query(self, message.encode()))
                    except BaseException as exc:
                        _psycopg_marked_commit_failed(self, message, exc)
                        raise
                if ticket is not None:  # (a warning noted by _psycopg_commit_warning: unproven)
                    ticket.done = ticket.warned is None or not ticket.wrote
                return None

            def transaction(self: Any, *args: Any, **kwargs: Any) -> Any:
                return _noting_block(self, base.transaction(self, *args, **kwargs))

            def tpc_prepare(self: Any) -> None:
                with _tpc_step(self, "prepare"):
                    base.tpc_prepare(self)

            def tpc_commit(self: Any, xid: Any = None) -> None:
                with _tpc_step(self, "commit", xid):
                    base.tpc_commit(self, xid)

            def tpc_rollback(self: Any, xid: Any = None) -> None:
                with _tpc_step(self, "rollback", xid):
                    base.tpc_rollback(self, xid)

            namespace.update(
                commit=commit,
                transaction=transaction,
                tpc_prepare=tpc_prepare,
                tpc_commit=tpc_commit,
                tpc_rollback=tpc_rollback,
            )
        if not issubclass(base, asyncpg.Connection):
            # No rollback(): the flag of a rolled-back transaction is cleared at the next
            # checkout (``CommitProtocol.checked_out``), not by a Python frame in every pool
            # return. A transaction that follows a rollback on the same checked-out connection
            # may carry a marker it doesn't need; the marker is written only for a transaction
            # holding an xid, so such a COMMIT stays correct.
            namespace.update(
                _rdb_read_mode=_psycopg_read_mode,
                _rdb_may_write=False,
                _rdb_mode=None,
                _rdb_prepared=None,
                _rdb_notifies=False,
                _rdb_writes=False,
                **{name: _marking_factory(name) for name in _CURSOR_FACTORIES},
            )
        cls = type(f"Marked{base.__name__}", (base,), namespace)
        _marked_classes[(base, adopted)] = cls
        return cls


# The protocol's attributes of adopted asyncpg connections (see ``marked_connection_class``).
_beside: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def _kept_beside(name: str, default: Any) -> property:
    def get(self: Any) -> Any:
        state = _beside.get(self)
        return default if state is None else state.get(name, default)

    def set_(self: Any, value: Any) -> None:
        state = _beside.get(self)
        if state is None:
            state = _beside[self] = {}
        state[name] = value

    return property(get, set_)


def _runner(dbapi_connection: Any, driver: Any) -> Callable[[Callable[[Any], Any]], Any]:
    """Run ``fn(driver)``, a coroutine of an asyncio driver's connection, from the sync code
    of an async engine (inside SQLAlchemy's greenlet): through SQLAlchemy's public
    ``AdaptedConnection.run_async`` where ``dbapi_connection`` is its adapter."""
    if isinstance(dbapi_connection, AdaptedConnection):
        return dbapi_connection.run_async
    return lambda fn: sa_await(fn(driver))


def end_listeners_transaction(dbapi_connection: Any) -> None:
    """End the transaction a ``connect`` (or ``checkout``) listener of the application's left
    open on a connection: statements it ran on the DBAPI connection without autocommit (``SET
    search_path``, ``SET TIME ZONE`` through a cursor) begin one, which plain SQLAlchemy ends
    with the connection's first transaction. Committed here, as that first transaction commits
    them when it succeeds (a listener's statement that failed: rolled back), so that psycopg's
    set-up for the markers (it put such a connection off: its first unit's COMMIT carried no
    marker, an answer lost there was an unknown outcome) and a check's ``READ COMMITTED``
    (psycopg refused it: ``ProgrammingError``, a committed unit's outcome reported unknown;
    SQLAlchemy's asyncpg adapter rolled the listener's statements back for it, the connection
    pooled without them) find the connection idle. A connection without one: untouched."""
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if isinstance(driver, asyncpg.Connection):
        if driver.is_in_transaction():
            dbapi_connection.commit()
        return
    status = getattr(getattr(driver, "info", None), "transaction_status", None)
    if status == psycopg.pq.TransactionStatus.INTRANS:
        dbapi_connection.commit()
    elif status == psycopg.pq.TransactionStatus.INERROR:
        dbapi_connection.rollback()


def _close_abandoned(dbapi_connection: Any) -> None:
    """Close a new connection whose set-up raised, without waiting on the server: asyncpg's is
    terminated (it may be lost, or in the middle of an interrupted statement), psycopg's closed
    (libpq's close sends its goodbye without waiting for an answer). Never raises: the set-up's
    error is what the caller gets."""
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    try:
        if isinstance(driver, asyncpg.Connection):
            driver.terminate()
        elif isinstance(driver, psycopg.AsyncConnection):
            # (a coroutine that never waits: libpq's close)
            _runner(dbapi_connection, driver)(lambda d: d.close())
        else:
            driver.close()
    except Exception:
        debug_failure(log_session, "could not close a connection whose set-up failed")


def _adopt_asyncpg(driver: Any, *, may_have_written: bool = False) -> None:
    """Switch an asyncpg connection made by your ``async_creator`` (or made while self-healing
    was off, see :func:`_mark_switched_on`) to a marked class. ``may_have_written``: the
    connection may be inside a transaction whose statements were not seen (they are taken to
    have written: its COMMIT is marked if its answer is lost)."""
    if not isinstance(driver, asyncpg.Connection):
        return
    try:
        marked = marked_connection_class(type(driver), adopted=True)
    except TypeError:  # a class whose layout can't be switched: the connection stays unmarked
        debug_failure(log_session, "could not mark an asyncpg connection")
        return
    if may_have_written:  # (before the switch: a COMMIT made meanwhile finds it)
        _beside[driver] = {"may_write": True, "writes": True}
    try:
        driver.__class__ = marked
    except TypeError:
        _beside.pop(driver, None)
        debug_failure(log_session, "could not mark an asyncpg connection")


#: asyncpg connections switched to the adopted class when self-healing was switched on: the
#: pool replaces them at their next checkout (see ``CommitProtocol.needs_replacing``)
_switched_on: weakref.WeakSet[Any] = weakref.WeakSet()


def _mark_switched_on(driver: Any) -> None:
    """Mark ``driver``, a connection made while self-healing was off, now that it is on (see
    ``CommitProtocol.switched_on``). It may be in use (in a transaction) by another thread or
    task: the class is switched last, its state set before, so that whatever it does meanwhile
    finds one class or the other, whole; and it is taken to have written, since its statements
    so far were not seen. A connection marked already (set up at a checkout since) keeps its
    own record of what it wrote."""
    if getattr(driver, "_rdb_marked", False):
        return
    if isinstance(driver, asyncpg.Connection):
        _switched_on.add(driver)  # (before the switch: a checkout meanwhile replaces it)
        _adopt_asyncpg(driver, may_have_written=True)
        if not getattr(driver, "_rdb_marked", False):
            _switched_on.discard(driver)  # left unmarked: replaced at checkout all the same
        return
    _mark_psycopg(driver, may_have_written=True)


_IDLE: Final = int(psycopg.pq.TransactionStatus.IDLE)
_INTRANS: Final = int(psycopg.pq.TransactionStatus.INTRANS)
_INERROR: Final = int(psycopg.pq.TransactionStatus.INERROR)
_FATAL_ERROR: Final = int(psycopg.pq.ExecStatus.FATAL_ERROR)
_SQLSTATE: Final = psycopg.pq.DiagnosticField.SQLSTATE


def _psycopg_commit_plan(
    connection: Any,
) -> tuple[CommitTicket | None, str | None, AttemptRecord | None]:
    """What a psycopg connection's (sync or async) COMMIT does: (ticket, message, attempt).
    A connection that is idle or failed commits as plain psycopg does (nothing else); otherwise
    :func:`_commit_plan`."""
    status = connection.pgconn.transaction_status
    if status != _INTRANS:
        connection._rdb_may_write = False  # idle or failed: COMMIT as plain psycopg does
        connection._rdb_writes = False
        if status == _INERROR:
            if committing_request() is not None:
                raise failed_transaction_commit()
            # the code of a unit or an operation commits a failed transaction: the COMMIT goes
            # out (it ends the transaction, as a COMMIT does) and is raised as refused (see
            # failed_transaction_commit); outside any, as plain psycopg does
            return None, None, current_attempt.get()
        return None, None, None
    return _commit_plan(connection)


def _block_attempt(connection: Any) -> AttemptRecord | None:
    """The attempt of the unit whose code enters a psycopg ``transaction()`` block on
    ``connection`` now, when the block is the outermost transaction (the connection is idle):
    psycopg then sends its BEGIN and its COMMIT itself, past the marked ``commit()`` and the
    cursors, and that COMMIT is the unit's own (see :func:`_own_commit`). None otherwise (a
    savepoint inside the transaction, the unit's own COMMIT being made, no unit)."""
    if connection.pgconn.transaction_status != _IDLE or committing_request() is not None:
        return None
    return current_attempt.get()


@contextlib.contextmanager
def _noting_block(connection: Any, block: Any) -> Iterator[Any]:
    """psycopg's ``transaction()`` block (``block``, as psycopg made it) on a marked
    connection: the COMMIT at the end of an outermost one counts as the unit's own (see
    :func:`_block_attempt`). A block left by an error (psycopg's ``Rollback`` too), or made with
    ``force_rollback=True``, rolls back, as psycopg does: it commits nothing."""
    attempt = _block_attempt(connection)
    entered = block.__enter__()
    try:
        yield entered
    except BaseException as exc:
        if not block.__exit__(type(exc), exc, exc.__traceback__):
            raise
        return  # (psycopg's Rollback, swallowed by its block)
    if attempt is None or getattr(entered, "force_rollback", False):  # (commits nothing)
        block.__exit__(None, None, None)
        return
    with _own_commit(attempt):
        block.__exit__(None, None, None)


@contextlib.asynccontextmanager
async def _noting_block_async(connection: Any, block: Any) -> AsyncIterator[Any]:
    """:func:`_noting_block` of a ``psycopg.AsyncConnection``."""
    attempt = _block_attempt(connection)
    entered = await block.__aenter__()
    try:
        yield entered
    except BaseException as exc:
        if not await block.__aexit__(type(exc), exc, exc.__traceback__):
            raise
        return
    if attempt is None or getattr(entered, "force_rollback", False):
        await block.__aexit__(None, None, None)
        return
    with _own_commit(attempt):
        await block.__aexit__(None, None, None)


@contextlib.contextmanager
def _tpc_step(connection: Any, step: str, xid: Any = None) -> Iterator[None]:
    """Around a step of psycopg's own two-phase API on a marked connection (``tpc_prepare``,
    ``tpc_commit``, ``tpc_rollback``; ``xid``: the one given to the last two, for a
    transaction prepared elsewhere), which sends its ``PREPARE TRANSACTION``, ``COMMIT`` or
    ``COMMIT PREPARED`` itself, past ``commit()`` and the cursors.

    In a unit's attempt (not while the unit's own COMMIT is made): ``tpc_commit`` is the unit's
    own COMMIT (:func:`_own_commit`); so is ``tpc_prepare``, whose transaction outlives the
    attempt and is committed by whoever ends it, unless the same connection's ``tpc_rollback``
    of it is answered (then it committed nothing: the attempt's ``prepared`` count goes back).
    Outside any unit (drop-in use): a lost answer of ``tpc_prepare`` or ``tpc_commit`` is an
    unknown outcome, as one of ``commit()`` is."""
    if committing_request() is not None:
        yield
        return
    attempt = current_attempt.get()
    if step == "rollback":
        preparer = getattr(connection, "_rdb_tpc_preparer", None) if xid is None else None
        yield  # (one that fails may leave the transaction prepared: still counted)
        if preparer is not None:
            connection._rdb_tpc_preparer = None
            prepared_by = preparer()
            if prepared_by is not None:
                prepared_by.prepared -= 1
        return
    if attempt is None:
        try:
            yield
        except BaseException as exc:
            unanswered_commit(exc, DEFAULT_CLASSIFIER, wrote=True)
            raise
        return
    if step == "commit":
        if xid is None:
            connection._rdb_tpc_preparer = None
        with _own_commit(attempt):
            yield
        return
    try:
        yield
    except BaseException as exc:
        if unanswered_commit(exc, attempt.classifier, wrote=True):
            attempt.committed = True  # (it may be prepared, and no rollback of it will know)
        raise
    attempt.prepared += 1
    # (weakly: the pooled connection outlives the attempt, which holds its sessions)
    connection._rdb_tpc_preparer = weakref.ref(attempt)


@contextlib.contextmanager
def _marker_statement_errors(connection: Any, message: str) -> Iterator[None]:
    """Around a psycopg connection's marked COMMIT message: an error that left the transaction
    open and failed came from the marker statement (the COMMIT never ran)."""
    try:
        yield
    except BaseException as exc:
        _psycopg_marked_commit_failed(connection, message, exc)
        raise


def _psycopg_marked_commit_failed(connection: Any, message: str, exc: BaseException) -> None:
    """A psycopg connection's marked COMMIT message raised ``exc``."""
    _may_have_missed_prepare(connection, message)
    if isinstance(exc, psycopg.Error) and connection.pgconn.transaction_status == _INERROR:
        _marker_statement_failed(connection, message, exc)


def _psycopg_simple_query(connection: Any, message: bytes) -> None:
    """Send ``message`` (several statements, no parameters) as one simple-query message on a
    psycopg connection and wait for its results; raise the first error as psycopg would
    (:func:`~._internals.psycopg_simple_query`; the marked COMMIT writes this out)."""
    _raise_error(connection, psycopg_simple_query(connection, message))


async def _psycopg_simple_query_async(connection: Any, message: bytes) -> None:
    """:func:`_psycopg_simple_query` on a ``psycopg.AsyncConnection``."""
    _raise_error(connection, await psycopg_simple_query_async(connection, message))


def _raise_error(connection: Any, results: list[Any]) -> None:
    """Raise the error of a simple query's results, as psycopg would. The server stops at a
    statement's error (it skips the rest of the message), so an error is the last result; one
    after a successful COMMIT is the PREPARE of :class:`_Reprepare`'s message, which does not
    undo the COMMIT."""
    last = results[-1] if results else None
    if last is not None and last.status == _FATAL_ERROR:
        if len(results) > 2 and results[-2].command_status == b"COMMIT":
            code = last.error_field(_SQLSTATE)
            _prepare_failed_after_commit(connection, code.decode() if code else None)
            return
        raise psycopg_error_from_result(last, connection)


def _mark_psycopg(dbapi_connection: Any, *, may_have_written: bool = False) -> bool:
    """Make a psycopg connection's (sync or async) COMMIT markable (its class becomes a marked
    subclass).

    The connection exists already (made by psycopg's ``connect``, or by a ``do_connect`` listener
    or ``creator`` of the user's), so its class is switched rather than the class it is made
    from; the subclass only adds a ``commit()`` override, a few attributes, and its cursor
    factories, which mark whatever is assigned to them (:func:`_marking_factory`): the ones the
    connection has now move there. The class is switched last, once the marked class finds
    all it reads (a connection made while self-healing was off may be in use by another thread
    when it is switched on: see :func:`_mark_switched_on`). ``may_have_written``: its
    transaction's statements so far were not seen (taken to have written).
    """
    if getattr(dbapi_connection, "_rdb_marked", False):
        return True
    if not isinstance(dbapi_connection, (psycopg.Connection, psycopg.AsyncConnection)):
        return False
    marked = marked_connection_class(type(dbapi_connection))
    state = vars(dbapi_connection)
    for name in _CURSOR_FACTORIES:
        if name in state:  # what the marked class's property reads (see _marking_factory)
            state[f"_rdb_{name}"] = marked_cursor_factory(state[name])
    if may_have_written:
        state["_rdb_may_write"] = True
        state["_rdb_writes"] = True  # (what it ran was not seen: a marker whatever the xid)
    dbapi_connection.__class__ = marked
    for name in _CURSOR_FACTORIES:
        state.pop(name, None)  # (the class's property is what is read now)
    return True


#: a psycopg connection's attributes that make its cursors (set on the instance by psycopg, or by
#: your code: moved to the marked class's properties when the connection is marked)
_CURSOR_FACTORIES: Final = ("cursor_factory", "server_cursor_factory")


def _marking_factory(name: str) -> property:
    """The ``cursor_factory`` (or ``server_cursor_factory``) of a marked psycopg connection: a
    factory assigned to it, by psycopg or by code of yours (a ``connect`` listener, say), at
    any time, is kept as one whose cursors note their statements
    (:func:`~resilient_db._statements.marked_cursor_factory`), so every statement is seen. Read
    through ``operator.attrgetter``: psycopg reads it at every ``cursor()``, and a getter in C
    costs that no Python frame."""
    key = f"_rdb_{name}"

    def assign(connection: Any, factory: Any) -> None:
        setattr(connection, key, marked_cursor_factory(factory))

    return property(operator.attrgetter(key), assign, doc=f"psycopg's ``{name}``, marked")


def _prepared_after_commit(connection: Any, message: str, exc: BaseException) -> bool:
    """An asyncpg connection's marked COMMIT message raised ``exc``: True when that was the
    PREPARE after its COMMIT (:class:`_Reprepare`) meeting the statement there (42P05, which
    nothing before it raises), so the COMMIT stands. asyncpg raises a message's first error
    without the results before it: another error there is taken as the COMMIT's."""
    if (
        getattr(exc, "sqlstate", None) == "42P05"
        and message.endswith(_PREPARE_SQL)
        and not connection.is_in_transaction()
    ):
        _prepare_failed_after_commit(connection, "42P05")
        return True
    return False


async def _failed_before_commit(
    connection: Any, base: type[Any], message: str, exc: BaseException
) -> None:
    """The server answered an asyncpg connection's marked COMMIT message with an error. If the
    marker statement failed, the COMMIT after it never ran: note why, and end the transaction
    (:func:`_end_failed_transaction`)."""
    if connection.is_in_transaction():
        _marker_statement_failed(connection, message, exc)
        await _end_failed_transaction(connection, base)


async def _end_failed_transaction(connection: Any, base: type[Any]) -> None:
    """ROLLBACK an asyncpg connection's transaction whose COMMIT never ran (a statement the
    COMMIT message sends first failed): SQLAlchemy's asyncpg adapter has already let go of its
    transaction object, so nothing else would, and the pool would hand the connection out
    still in that transaction (the next ``BEGIN`` refused)."""
    if not connection.is_in_transaction():
        return
    try:
        await base.execute(connection, "ROLLBACK;")
    except Exception:  # the connection broke: SQLAlchemy invalidates it for the error
        debug_failure(log_session, "ROLLBACK of a transaction whose COMMIT failed failed")


#: asyncpg's longest BEGIN: ``BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY DEFERRABLE;``
_LONGEST_BEGIN: Final = 64


#: asyncpg's own transaction statements, as its ``Transaction`` spells them
_ASYNCPG_COMMANDS: Final = {"BEGIN;": "BEGIN", "COMMIT;": "COMMIT", "ROLLBACK;": "ROLLBACK"}


def _transaction_command(query: str) -> str | None:
    """ "BEGIN", "COMMIT" or "ROLLBACK" for asyncpg's own transaction statements, else None."""
    found = _ASYNCPG_COMMANDS.get(query)  # as asyncpg spells them: every unit's two
    if found is not None:
        return found
    word = query.strip().rstrip(";").strip().upper()
    if word in ("COMMIT", "END"):
        return "COMMIT"
    if word in ("ROLLBACK", "ABORT"):
        return "ROLLBACK"
    if word.startswith("BEGIN") and ";" not in word and not word[5:6].strip():
        return "BEGIN"  # (not "BEGIN; INSERT ...": a text of statements, noted as any)
    return None
