"""The statement judge (``resilient_db._statements.verdict_of``) checked against the server.

The judge reads SQL text with regular expressions; the server parses it. Texts are built by
hypothesis from the lexemes that make such readers go wrong (comments, nested ones too,
strings with ``''`` and backslash escapes, ``U&''`` strings, dollar quotes with lookalikes
inside, quoted names such as ``"COMMIT"``, keywords in any case, names holding keywords,
``CASE ... END``, semicolons splitting several statements, texts the server refuses) and sent
through psycopg as one simple query each, as the library sees them. The server then says
what happened, and only the unsafe direction is a failure (the judge may be conservative):

* in a transaction (whose first write, the canary's row, is rolled back afterwards): the text
  committed something inside it (the canary's row, or rows of the fixture tables, are there
  for another connection, or the transaction was prepared) => the verdict ``COMMITS``; and if
  the server then answered with an error => ``COMMITS_MIDWAY`` (an error answer proves
  nothing of what committed before it);
* in a transaction committed after the text: its COMMIT left rows or a notification => the
  verdict may write (an xid alone is a row lock's, ``SELECT ... FOR UPDATE``: only counted);
  rows or a notification without an xid before that COMMIT (a held cursor's query, a
  notification) => ``WRITES`` or ``NOTIFIES`` (the marker is written whatever the xid); the
  transaction or the session made read-only, or the role switched => ``STOPS_PREPARED`` (or
  ``NOTIFIES``, taken first on purpose); a prepared statement dropped => ``DEALLOCATES`` (or
  one of those two); the isolation level changed => ``SETS_ISOLATION``;
* in autocommit: rows or a notification => the verdict may write; rows and an error answer
  => ``COMMITS_INSIDE`` or ``COMMITS_MIDWAY`` (``PARTLY_IN_AUTOCOMMIT``).

``make test`` runs a fixed set of examples (``derandomize``). A longer run, with new random
examples each time: ``RESILIENT_DB_FUZZ_EXAMPLES=20000 pytest -o timeout=0 -s
tests/test_statement_judge_fuzz.py`` (``-s`` prints how often the judge was conservative).
"""

from __future__ import annotations

import collections
import itertools
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scenarios import assert_committed_once, create_ledger, driver_connection, ledger_rows
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db import _statements
from resilient_db._statements import (
    COMMITS,
    COMMITS_MIDWAY,
    DEALLOCATES,
    NOTIFIES,
    PARTLY_IN_AUTOCOMMIT,
    SETS_ISOLATION,
    STOPS_PREPARED,
    WRITES,
)
from resilient_db.testing import FaultProxy, PostgresServer

#: examples of the test run by ``make test``; more (and new ones each run) from the variable
EXAMPLES = int(os.environ.get("RESILIENT_DB_FUZZ_EXAMPLES", "0") or 0)

# -- the fixture the texts run against ------------------------------------------------------------
FIXTURE = """
CREATE SCHEMA fz;
CREATE TABLE fz.t (a int NOT NULL DEFAULT 0, end_date text, commit_id text, "end" text,
                   "COMMIT" text, "a""b" text);
CREATE TABLE fz.canary (k bigint PRIMARY KEY);
CREATE FUNCTION fz.f_write(n int) RETURNS int LANGUAGE sql
    AS $$ INSERT INTO fz.t (a) VALUES (n) RETURNING a $$;
CREATE FUNCTION fz.commit_id(n int) RETURNS int LANGUAGE sql
    AS $$ INSERT INTO fz.t (a) VALUES (n) RETURNING a $$;
CREATE FUNCTION fz."end"(n int) RETURNS int LANGUAGE sql
    AS $$ INSERT INTO fz.t (a) VALUES (n) RETURNING a $$;
CREATE FUNCTION fz.f_write2(x int, y int) RETURNS int LANGUAGE sql
    AS $$ INSERT INTO fz.t (a) VALUES (x + y) RETURNING a $$;
CREATE OPERATOR fz.### (LEFTARG = int, RIGHTARG = int, FUNCTION = fz.f_write2);
CREATE FUNCTION fz.f_read(n int) RETURNS int LANGUAGE sql STABLE AS $$ SELECT n $$;
CREATE PROCEDURE fz.p_plain(n int) LANGUAGE sql AS $$ INSERT INTO fz.t (a) VALUES (n) $$;
CREATE PROCEDURE fz.p_commit(n int) LANGUAGE plpgsql
    AS $$ BEGIN INSERT INTO fz.t (a) VALUES (n); COMMIT; END $$;
CREATE PROCEDURE fz.p_fail(n int) LANGUAGE plpgsql AS $$ BEGIN
    INSERT INTO fz.t (a) VALUES (n); COMMIT;
    RAISE EXCEPTION 'after its commit' USING ERRCODE = '40001'; END $$;
"""
#: the rows of fz.t, put back after each text that committed something
RESTORE = """
DO $$ DECLARE made regclass; routine regprocedure; BEGIN
    FOR made IN SELECT oid FROM pg_class WHERE relnamespace = 'fz'::regnamespace
            AND relkind = 'r' AND relname NOT IN ('t', 'canary') LOOP
        EXECUTE format('DROP TABLE %s CASCADE', made);
    END LOOP;
    FOR routine IN SELECT oid FROM pg_proc WHERE pronamespace = 'fz'::regnamespace
            AND proname NOT IN ('f_write', 'commit_id', 'end', 'f_write2', 'f_read', 'p_plain',
                                'p_commit', 'p_fail') LOOP
        EXECUTE format('DROP ROUTINE %s', routine);
    END LOOP;
END $$;
DELETE FROM fz.canary;
DELETE FROM fz.t;
INSERT INTO fz.t (a, end_date, commit_id) VALUES (1, 'x', 'y'), (2, 'COMMIT', 'END');
"""
#: what another connection sees of the fixture (not the canary's rows: asked on their own)
FINGERPRINT = """
SELECT concat_ws(' | ',
    (SELECT string_agg(relname || ':' || relkind::text, ',' ORDER BY relname) FROM pg_class
        WHERE relnamespace = 'fz'::regnamespace AND relname <> 'canary_pkey'),
    (SELECT string_agg(proname, ',' ORDER BY proname) FROM pg_proc
        WHERE pronamespace = 'fz'::regnamespace),
    (SELECT md5(string_agg(t::text, ',' ORDER BY t::text)) FROM fz.t AS t))
"""
#: what the transaction and the session hold after a text, asked in the same transaction (a
#: transaction read-only by default is not the judge's to see: the server reports the default
#: to the client, which reads it at COMMIT)
STATE = """
SELECT current_setting('fz.probe', true) IS NOT DISTINCT FROM 'on',
    pg_current_xact_id_if_assigned() IS NOT NULL,
    current_setting('transaction_read_only') = 'on'
        AND current_setting('default_transaction_read_only') = 'off',
    current_user::text <> %s,
    current_setting('transaction_isolation') <> 'read committed'
        OR current_setting('default_transaction_isolation') <> 'read committed',
    EXISTS (SELECT FROM pg_prepared_statements WHERE name = 'fz_probe')
"""
CHANNEL = "fz_ch"
OPTIONS = "-c search_path=fz,public -c statement_timeout=5000 -c lock_timeout=2000"
_IDLE = psycopg.pq.TransactionStatus.IDLE
_INERROR = psycopg.pq.TransactionStatus.INERROR


# -- the texts -------------------------------------------------------------------------------------
#: what may stand between two words: spaces, comments (with statement words and quotes inside,
#: nested ones, ``--`` ended by a line feed or a carriage return). Hypothesis shrinks towards
#: the first.
GAPS = [
    " ",
    "\n",
    "\t",
    "  ",
    "\r\n",
    "/**/",
    " /* c */ ",
    " /* COMMIT; */ ",
    " /* a /* END; */ b */ ",
    " -- COMMIT;\n",
    " --\r",
    " -- 'x\n",
    " /* ' */ ",
    " /* $$ */ ",
    "\f",
    "",
]
STRINGS = [
    "'x'",
    "'COMMIT'",
    "'it''s; COMMIT'",
    "';END;'",
    "'a; commit; b'",
    "E'\\'; COMMIT; --'",
    "E'a\\\\'",
    "e'\\n END'",
    "'a\\b'",
    "U&'\\0041 COMMIT'",
    "$$; COMMIT; $$",
    "$a$ $$ END $$ $a$",
    "$end$x$end$",
    "'/*'",
    "'*/'",
    "'--'",
    "'\"'",
    "'$$'",
    "''",
]
COLUMNS = ["end_date", "commit_id", '"end"', '"COMMIT"', '"a""b"', "t.end_date", 't."end"']
ALIASES = ["end", "commit", '"end"', "commit_id", '"COMMIT"', "end_date", "case", "rollback"]
NUMBERS = ["1", "2", "3", "0", "-1", "10"]
#: calls of functions (and an operator) that write
WRITERS = [
    "f_write ( {n} )",
    "fz.f_write ( {n} )",
    '"f_write" ( {n} )',
    "commit_id ( {n} )",
    '"end" ( {n} )',
    "1 ### {n}",
    "1 OPERATOR ( fz.### ) {n}",
    "f_write ( n => {n} )",
    'U&"f\\005fwrite" ( {n} )',
    "( f_write ( {n} ) )",
    "ARRAY [ f_write ( {n} ) ]",
]
EXPRESSIONS = [
    "a",
    "{c}",
    "{s}",
    "{n}",
    "CASE WHEN a > {n} THEN {s} ELSE {s} END",
    "CASE {c} WHEN {s} THEN {e} END",
    "lower ( {s} )",
    "coalesce ( {c} , {e} )",
    "f_read ( {n} )",
    "( SELECT count ( * ) FROM t )",
    "{s} || {e}",
    "{w}",
    "pg_notify ( 'fz_ch' , {s} )",
]
READS = [
    "SELECT {e}",
    "SELECT {e} , {e} FROM t",
    "SELECT {e} AS {alias} FROM t WHERE {c} IS NOT NULL",
    "SELECT * FROM t WHERE {c} = {s} ORDER BY a",
    "SELECT t1.a FROM t t1 JOIN ( SELECT a FROM t ) s USING ( a )",
    "TABLE t",
    "VALUES ( {e} )",
    "SHOW search_path",
    "SELECT {e} FROM t FOR UPDATE",
    "SELECT {e} FROM t FOR NO KEY UPDATE SKIP LOCKED",
    "SELECT {e} FROM t WHERE a IN ( SELECT {e} )",
    "WITH w AS ( SELECT {e} AS x ) SELECT * FROM w",
    "SELECT count ( * ) FILTER ( WHERE a > 0 ) OVER ( ) FROM t",
    "SELECT CASE {c} WHEN {s} THEN 1 ELSE 0 END AS end_date FROM t",
    "SELECT 1 AS end , 2 AS commit",
    "SELECT {e} INTO TEMP tt2",
    "( SELECT {e} )",
    "SELECT {e} UNION SELECT {e}",
    "EXPLAIN SELECT {e}",
    "SELECT {e} FROM t , LATERAL ( SELECT {e} ) x",
]
WRITES_ = [
    "INSERT INTO t ( a , {c} ) VALUES ( {n} , {s} )",
    "INSERT INTO t ( a ) SELECT {n} RETURNING a",
    "UPDATE t SET {c} = {s} WHERE a = {n}",
    "DELETE FROM t WHERE a = {n}",
    "MERGE INTO t USING ( VALUES ( {n} ) ) AS v ( x ) ON t.a = v.x "
    "WHEN MATCHED THEN UPDATE SET end_date = {s} WHEN NOT MATCHED THEN INSERT ( a ) VALUES ( v.x )",
    "WITH w AS ( INSERT INTO t ( a ) VALUES ( {n} ) RETURNING a ) SELECT * FROM w",
    "WITH w AS ( UPDATE t SET a = a WHERE a = {n} RETURNING a ) SELECT count ( * ) FROM w",
    "SELECT * INTO t2 FROM t",
    "CREATE TABLE t3 ( x int )",
    "CREATE TEMP TABLE tt ( x int )",
    "SELECT {w}",
    "SELECT * FROM f_write ( {n} )",
    "TRUNCATE t",
    "INSERT INTO t ( a ) VALUES ( {n} ) ON CONFLICT DO NOTHING",
    "SELECT * FROM t , LATERAL f_write ( a ) x",
    "SELECT * FROM ROWS FROM ( f_write ( {n} ) )",
    "EXPLAIN ANALYZE INSERT INTO t ( a ) VALUES ( {n} )",
    "EXPLAIN ( ANALYZE ) SELECT {w}",
    "VALUES ( {w} )",
    "CALL p_plain ( {n} )",
    "CALL p_commit ( {n} )",
    "CALL p_fail ( {n} )",
    "CALL fz.p_plain ( {n} )",
    "DO {body}",
    "DO LANGUAGE plpgsql {body}",
    "DO 'BEGIN INSERT INTO fz.t (a) VALUES (6); COMMIT; END'",
    "PREPARE qw AS INSERT INTO t ( a ) VALUES ( {n} )",
    "EXECUTE qw",
    "PREPARE q AS SELECT {n}",
    "EXECUTE q",
    "DECLARE cur CURSOR WITH HOLD FOR SELECT f_write ( {n} )",
    "DECLARE cur CURSOR FOR SELECT f_write ( {n} )",
    "FETCH cur",
    "CLOSE cur",
    "CREATE OR REPLACE FUNCTION g ( ) RETURNS int LANGUAGE sql BEGIN ATOMIC "
    "SELECT CASE WHEN true THEN 1 END ; END",
    "CREATE OR REPLACE FUNCTION g ( ) RETURNS int LANGUAGE sql BEGIN ATOMIC "
    "INSERT INTO t ( a ) VALUES ( {n} ) ; SELECT 1 ; END",
    "LOCK TABLE t IN SHARE MODE",
    "NOTIFY fz_ch",
    "NOTIFY fz_ch , {s}",
    "SELECT pg_notify ( 'fz_ch' , {s} )",
    "LISTEN fz_ch",
    "SELECT pg_advisory_xact_lock ( 1 )",
    "SELECT pg_advisory_lock ( 2 )",
]
SESSION = [
    "SET work_mem = '8MB'",
    "SET LOCAL work_mem = '9MB'",
    "RESET work_mem",
    "RESET ALL",
    "SET search_path = fz , public",
    "SET TRANSACTION READ ONLY",
    "SET TRANSACTION READ WRITE",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "SET default_transaction_read_only = on",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    "SET default_transaction_isolation = 'serializable'",
    "SELECT set_config ( 'default_transaction_read_only' , 'on' , false )",
    "SELECT set_config ( 'work_mem' , '7MB' , true )",
    "SET ROLE pg_monitor",
    "SET LOCAL ROLE pg_monitor",
    "SET SESSION AUTHORIZATION pg_monitor",
    "SELECT set_config ( 'role' , 'pg_monitor' , false )",
    "SELECT set_config ( E'role' , 'pg_monitor' , false )",
    "SELECT set_config ( 'ro' || 'le' , 'pg_monitor' , false )",
    "SELECT set_config ( $$transaction_read_only$$ , 'on' , true )",
    "SELECT set_config ( 'default_transaction_isolation' , 'serializable' , false )",
    "SET transaction_read_only = on",
    "SET LOCAL transaction_read_only TO on",
    "SET SESSION ROLE pg_monitor",
    "SET role = pg_monitor",
    "SET session_authorization = 'pg_monitor'",
    "SELECT set_config ( 'session_authorization' , 'pg_monitor' , false )",
    "UPDATE pg_settings SET setting = 'on' WHERE name = 'default_transaction_read_only'",
    "RESET ROLE",
    "SET SESSION AUTHORIZATION DEFAULT",
    "DEALLOCATE q",
    "DEALLOCATE ALL",
    "DEALLOCATE PREPARE fz_probe",
    "DISCARD ALL",
    "DISCARD PLANS",
]
CONTROL = [
    "COMMIT",
    "COMMIT WORK",
    "COMMIT TRANSACTION",
    "COMMIT AND CHAIN",
    "COMMIT AND NO CHAIN",
    "END",
    "END WORK",
    "END TRANSACTION",
    "END AND CHAIN",
    "ROLLBACK",
    "ROLLBACK WORK",
    "ROLLBACK AND CHAIN",
    "ABORT",
    "ABORT AND CHAIN",
    "BEGIN",
    "BEGIN WORK",
    "BEGIN ISOLATION LEVEL SERIALIZABLE",
    "BEGIN READ ONLY",
    "START TRANSACTION",
    "START TRANSACTION READ WRITE",
    "SAVEPOINT s",
    "RELEASE SAVEPOINT s",
    "RELEASE s",
    "ROLLBACK TO SAVEPOINT s",
    "ROLLBACK TO s",
    "ROLLBACK TRANSACTION TO SAVEPOINT s",
    "ABORT WORK",
    "PREPARE TRANSACTION {gid}",
    "COMMIT PREPARED {gid}",
    "ROLLBACK PREPARED {gid}",
]
ERRORS = [
    "SELECT 1 / 0",
    "SELECT * FROM nowhere",
    "INSERT INTO t ( a ) VALUES ( 'x' )",
    "SELECT f_write ( 'x' )",
]
#: PL/pgSQL bodies of DO blocks (words joined by gaps too), and the dollar quotes around them
BODIES = [
    "BEGIN INSERT INTO fz.t ( a ) VALUES ( 5 ) ; END",
    "BEGIN INSERT INTO fz.t ( a ) VALUES ( 5 ) ; COMMIT ; END",
    "BEGIN PERFORM 1 ; END",
    "BEGIN IF true THEN PERFORM pg_notify ( 'fz_ch' , 'x' ) ; END IF ; END",
    "BEGIN EXECUTE 'INSERT INTO fz.t (a) VALUES (7)' ; END",
    "BEGIN EXECUTE 'NOT' || 'IFY fz_ch' ; END",
    "DECLARE x int ; BEGIN x := CASE WHEN true THEN 1 END ; END",
    "BEGIN RAISE EXCEPTION 'boom' ; END",
    "BEGIN INSERT INTO fz.t ( a ) VALUES ( 5 ) ; COMMIT ; RAISE EXCEPTION 'boom' ; END",
    "BEGIN PERFORM '$$' ; END",
    "BEGIN NOTIFY fz_ch ; END",
]
TAGS = ["$$", "$d$", "$end$", "$COMMIT$"]
GIDS = ["'g1'", "'COMMIT'", "'g''x'"]
#: what a text mangled into one the server refuses may have put in it
JUNK = ["'", '"', "$$", "/*", "(", ")", ";", "END", "E'\\", "--", "*/", "COMMIT"]
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$.]*\Z")
_SLOT = re.compile(r"\{(\w+)\}")
_TEMPLATE_WORD = re.compile(r"'(?:[^']|'')*'|\S+")  # (a string is one word, spaces and all)
_NAME_END = re.compile(r"[\w$]\Z")
_NAME_START = re.compile(r"[\w$]")


@st.composite
def cased(draw: st.DrawFn, word: str) -> str:
    """An unquoted word as the server folds it: in any case."""
    how = draw(st.sampled_from(["upper", "lower", "mixed"]))
    if how == "upper":
        return word.upper()
    if how == "lower":
        return word.lower()
    flips = draw(st.lists(st.booleans(), min_size=len(word), max_size=len(word)))
    return "".join(c.upper() if up else c.lower() for c, up in zip(word, flips, strict=True))


@st.composite
def phrase(draw: st.DrawFn, template: str, depth: int = 0) -> str:
    """``template``'s words (split at spaces, a string whole) in any case, joined by gaps,
    its slots filled."""
    out: list[str] = []
    for word in _TEMPLATE_WORD.findall(template):
        gap = draw(st.sampled_from(GAPS)) if out else ""
        slot = _SLOT.fullmatch(word)
        token = word
        if slot is not None:
            token = draw(filling(slot.group(1), depth))
        elif _WORD.match(word):
            token = draw(cased(word))
        if not gap and out and _NAME_END.search(out[-1]) and _NAME_START.match(token):
            gap = " "  # (no gap only where the words stay two)
        out += (gap, token)
    return "".join(out)


@st.composite
def filling(draw: st.DrawFn, slot: str, depth: int) -> str:
    if slot == "s":
        return draw(st.sampled_from(STRINGS))
    if slot == "c":
        return draw(st.sampled_from(COLUMNS))
    if slot == "n":
        return draw(st.sampled_from(NUMBERS))
    if slot == "alias":
        return draw(st.sampled_from(ALIASES))
    if slot == "gid":
        return draw(st.sampled_from(GIDS))
    if slot == "w":
        return draw(phrase(draw(st.sampled_from(WRITERS)), depth + 1))
    if slot == "e":
        forms = EXPRESSIONS if depth < 2 else EXPRESSIONS[:4]
        return draw(phrase(draw(st.sampled_from(forms)), depth + 1))
    assert slot == "body", slot
    tag = draw(st.sampled_from(TAGS))
    return tag + draw(phrase(draw(st.sampled_from(BODIES)), depth + 1)) + tag


@st.composite
def statement(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from([READS, WRITES_, CONTROL, READS, WRITES_, CONTROL, SESSION]))
    if kind is SESSION and draw(st.sampled_from(range(4))) == 3:
        kind = ERRORS
    return draw(phrase(draw(st.sampled_from(kind))))


@st.composite
def texts(draw: st.DrawFn) -> str:
    """One text of one to four statements, as a unit's code may send it; perhaps mangled."""
    parts = draw(st.lists(statement(), min_size=1, max_size=4))
    text = draw(st.sampled_from(["", *GAPS]))
    for at, part in enumerate(parts):
        if at:
            text += draw(st.sampled_from(["", *GAPS])) + ";" + draw(st.sampled_from(GAPS))
            if draw(st.sampled_from(range(10))) == 9:
                text += ";"  # (an empty statement)
        text += part
    text += draw(st.sampled_from(["", ";", " ;", "; -- done", ";\n"]))
    if draw(st.sampled_from(range(10))) == 9:  # one the server refuses, or reads otherwise
        at = draw(st.sampled_from(range(len(text) + 1)))
        if draw(st.booleans()):
            text = text[:at]
        else:
            text = text[:at] + draw(st.sampled_from(JUNK)) + text[at:]
    return text


# -- the server's answers --------------------------------------------------------------------------
@dataclass
class Seen:
    """What the server did with a text, each way it was sent."""

    # in a transaction rolled back afterwards (its first write the canary's row)
    error: str | None = None
    committed_inside: bool = False  # the canary's row or the fixture's rows are there
    # in a transaction committed afterwards, if the text did not end it
    w_error: str | None = None
    w_ended: bool = False
    w_xid: bool = False
    w_left: bool = False  # rows there after the COMMIT
    w_notified: bool = False
    w_read_only: bool = False
    w_role: bool = False
    w_isolation: bool = False
    w_deallocated: bool = False
    # in autocommit
    a_error: str | None = None
    a_left: bool = False
    a_notified: bool = False
    notes: list[str] = field(default_factory=list)


class Oracle:
    """Sends texts on a connection of their own, and looks at what they left from another."""

    def __init__(self, server: PostgresServer, database: str) -> None:
        # (nothing prepared by psycopg itself: a text's DEALLOCATE ALL would drop it)
        self.conn = psycopg.connect(
            server.conninfo(database, options=OPTIONS), prepare_threshold=None
        )
        self.watch = psycopg.connect(server.conninfo(database, options=OPTIONS), autocommit=True)
        self.notified: list[psycopg.Notify] = []
        self.conn.add_notify_handler(self.notified.append)
        self.canary = itertools.count(1)
        self.login = str(self.watch.execute("SELECT current_user").fetchall()[0][0])
        #: PREPARE TRANSACTION is taken (else it is refused: an answer too)
        self.two_phase = self.watch.execute("SHOW max_prepared_transactions").fetchall() != [("0",)]
        try:
            self.watch.execute(RESTORE)
            self.baseline = self.fingerprint()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.conn.close()
        self.watch.close()

    def fingerprint(self) -> str:
        row = self.watch.execute(FINGERPRINT).fetchone()
        assert row is not None
        return str(row[0])

    def fresh_session(self) -> None:
        conn = self.conn
        if conn.info.transaction_status != _IDLE:
            conn.rollback()
        conn.autocommit = True
        conn.execute("DISCARD ALL")
        conn.execute(f"LISTEN {CHANNEL}; PREPARE fz_probe AS SELECT 1")
        conn.autocommit = False
        self.notified.clear()

    def send(self, text: str) -> str | None:
        try:
            self.conn.execute(text)
        except psycopg.Error as exc:
            return f"{exc.sqlstate or type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        return None

    def settled(self) -> bool:
        """End what the text left behind (a transaction, a prepared one); whether rows of the
        fixture (or the canary's) changed for good. Puts them back."""
        if self.conn.info.transaction_status != _IDLE:
            self.conn.rollback()
        prepared = [
            gid
            for (gid,) in self.watch.execute(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
            )
        ]
        for gid in prepared:
            self.watch.execute(psycopg.sql.SQL("ROLLBACK PREPARED {}").format(gid))
        canary = self.watch.execute("SELECT count(*) FROM fz.canary").fetchone()
        changed = self.fingerprint() != self.baseline or bool(canary and canary[0])
        if changed:
            self.watch.execute(RESTORE)
            assert self.fingerprint() == self.baseline
        return bool(prepared) or changed

    def run(self, text: str) -> Seen:
        seen = Seen()
        conn = self.conn
        # 1. in a transaction that wrote (the canary), rolled back afterwards
        self.fresh_session()
        conn.execute("SET LOCAL fz.probe = 'on'")
        conn.execute("INSERT INTO fz.canary VALUES (%s)", (next(self.canary),))
        seen.error = self.send(text)
        seen.committed_inside = self.settled()
        # 2. in a transaction committed afterwards
        self.fresh_session()
        conn.execute("SET LOCAL fz.probe = 'on'")
        seen.w_error = self.send(text)
        if conn.info.transaction_status != _INERROR:
            row = conn.execute(STATE, (self.login,)).fetchone()
            assert row is not None
            probe, seen.w_xid, seen.w_read_only, seen.w_role, seen.w_isolation, kept = row
            seen.w_ended = not probe
            seen.w_deallocated = not kept
            if not seen.w_ended and seen.w_error is None:
                self.notified.clear()
                try:
                    conn.commit()
                except psycopg.Error as exc:
                    seen.notes.append(f"COMMIT failed: {exc.sqlstate}")
                else:
                    seen.w_notified = bool(self.notified)
        seen.w_left = self.settled()
        # 3. in autocommit
        self.fresh_session()
        conn.autocommit = True
        seen.a_error = self.send(text)
        seen.a_notified = bool(self.notified)
        seen.a_left = self.settled()
        conn.autocommit = False
        return seen


def unsafe(verdict: int, seen: Seen) -> list[str]:
    """The unsafe answers of the judge (``verdict``) to what the server did (``seen``)."""
    wrong = []
    kind = verdict & 7
    if seen.committed_inside and not verdict & COMMITS:
        wrong.append("committed inside a transaction, not judged COMMITS")
    if seen.committed_inside and seen.error and not verdict & COMMITS_MIDWAY:
        wrong.append("committed inside a transaction, then an error: not judged COMMITS_MIDWAY")
    if not seen.w_ended and seen.w_error is None:
        # (an xid alone, with no rows left, is a row lock's or a temporary table's: a replay
        # writes nothing twice; counted below)
        if (seen.w_left or seen.w_notified) and not verdict:
            wrong.append("wrote in a transaction, judged read-only")
        if (
            (seen.w_left or seen.w_notified)
            and not seen.w_xid
            and not (verdict & WRITES or kind == NOTIFIES)
        ):
            wrong.append("wrote without an xid, not judged WRITES or NOTIFIES")
    if seen.w_error is None:
        if (seen.w_read_only or seen.w_role) and kind not in (STOPS_PREPARED, NOTIFIES):
            wrong.append("made the transaction read-only or switched the role: kind not STOPS")
        if seen.w_deallocated and kind not in (DEALLOCATES, STOPS_PREPARED, NOTIFIES):
            wrong.append("dropped a prepared statement: kind not DEALLOCATES")
        if seen.w_isolation and not verdict & SETS_ISOLATION:
            wrong.append("changed the isolation level: not judged SETS_ISOLATION")
    if (seen.a_left or seen.a_notified) and not verdict:
        wrong.append("wrote in autocommit, judged read-only")
    if seen.a_left and seen.a_error and not verdict & PARTLY_IN_AUTOCOMMIT:
        wrong.append("committed part in autocommit, then an error: not PARTLY_IN_AUTOCOMMIT")
    return wrong


#: how often the judge was conservative, by kind (printed at the end of a run with ``-s``)
conservative: collections.Counter[str] = collections.Counter()


def count_conservative(verdict: int, seen: Seen) -> None:
    conservative["texts"] += 1
    if (seen.error or "").startswith("42601"):  # (a syntax error: nothing of the text ran)
        conservative["texts the server refused whole"] += 1
        if verdict & COMMITS_MIDWAY:
            conservative["refused whole, judged to commit midway (not replayed)"] += 1
    if seen.w_ended or seen.w_error is not None:
        return
    conservative["texts the server ran whole in a transaction"] += 1
    if verdict and not (seen.w_xid or seen.w_left or seen.w_notified):
        conservative["read judged may-write"] += 1
    if seen.w_xid and not (seen.w_left or seen.w_notified):
        conservative["an xid, no rows left (locks, temporary tables)"] += 1
        if not verdict:
            conservative["an xid, no rows left, judged read-only (SELECT FOR UPDATE)"] += 1
    if verdict & COMMITS and not seen.committed_inside:
        conservative["judged COMMITS, committed nothing there"] += 1


# -- the tests -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oracle(request: pytest.FixtureRequest) -> Iterator[Oracle]:
    """The texts run on ``two_phase_server`` (conftest's); where there is none (a given server
    with ``max_prepared_transactions = 0``) on the suite's own server, whose refusal of
    PREPARE TRANSACTION is an answer too: only the cases that need it taken are skipped."""
    server: PostgresServer
    try:
        server = request.getfixturevalue("two_phase_server")
    except pytest.skip.Exception:
        server = request.getfixturevalue("pg_server")
    name = f"judge_fuzz_{uuid.uuid4().hex[:10]}"
    server.create_database(name)
    try:
        server.execute(FIXTURE, database=name)
        oracle = Oracle(server, name)
        try:
            yield oracle
        finally:
            oracle.close()
    finally:
        server.drop_database(name)


def judged(oracle: Oracle, text: str) -> tuple[int, Seen, list[str]]:
    verdict = _statements.verdict_of(text)
    seen = oracle.run(text)
    return verdict, seen, unsafe(verdict, seen)


def test_the_judge_is_never_unsafe_by_the_servers_account(oracle: Oracle) -> None:
    @settings(
        max_examples=EXAMPLES or 250,
        derandomize=not EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(texts())
    def check(text: str) -> None:
        verdict, seen, wrong = judged(oracle, text)
        count_conservative(verdict, seen)
        assert not wrong, (text, verdict, wrong, seen)

    check()
    print(dict(conservative))


#: texts the judge once answered unsafely (each a shrunk counterexample of the test above), and
#: what the server does with each (so that the case keeps showing it)
ONCE_WRONG: dict[str, tuple[str, str]] = {
    # statements after a ROLLBACK run in a transaction of their own, which the end of the text
    # commits: the INSERT is committed inside the text, before the unit's COMMIT
    "rollback-then-insert": ("ROLLBACK; INSERT INTO t (a) VALUES (1)", "committed_inside"),
    "abort-then-a-writing-call": ("abort ; SELECT f_write(1)", "committed_inside"),
    # a nested comment (or a dollar sign) makes the text one whose comments can't be taken
    # out surely: the transaction made read-only behind a comment was not seen
    "read-only-after-a-nested-comment": (
        "/* a /* END; */ b */ SET TRANSACTION READ ONLY",
        "w_read_only",
    ),
    "read-only-after-a-comment-with-a-dollar": (
        "SELECT 1; /* $$ */ SET TRANSACTION READ ONLY",
        "w_read_only",
    ),
    "begin-read-only-with-a-nested-comment-between": (
        "begin read /* a /* END; */ b */ only",
        "w_read_only",
    ),
    # PREPARE TRANSACTION with a comment between its words, in such a text
    "prepare-transaction-behind-comments": (
        "PREPARE --\rTRANSACTION /* a /* END; */ b */ 'g1'; SAVEPOINT s",
        "committed_inside",
    ),
    # the prepared statements dropped by a statement that is not the text's first
    "deallocate-after-another-statement": ("SELECT 1; DEALLOCATE ALL", "w_deallocated"),
    "deallocate-behind-a-nested-comment": (
        "/* a /* END; */ b */ DEALLOCATE PREPARE fz_probe",
        "w_deallocated",
    ),
    # the role switched by a setting's name the judge did not read as one
    "session-authorization-set-as-a-setting": (
        "SET session_authorization = 'pg_monitor'",
        "w_role",
    ),
    "session-authorization-by-set-config": (
        "SELECT set_config('session_authorization', 'pg_monitor', false)",
        "w_role",
    ),
    "role-by-set-config-of-a-name-put-together": (
        "SELECT set_config('ro' || 'le', 'pg_monitor', false)",
        "w_role",
    ),
}


@pytest.mark.parametrize("case", sorted(ONCE_WRONG))
def test_the_judge_is_safe_where_it_once_was_not(oracle: Oracle, case: str) -> None:
    text, happened = ONCE_WRONG[case]
    if happened == "committed_inside" and "PREPARE" in text and not oracle.two_phase:
        pytest.skip("the server refuses PREPARE TRANSACTION (max_prepared_transactions = 0)")
    verdict, seen, wrong = judged(oracle, text)
    assert getattr(seen, happened), seen
    assert not wrong, (verdict, seen)


# -- end to end: units that send such texts --------------------------------------------------------
#: writes a ledger row for its unit (a call the judge can't read as a built-in's)
LEDGER_WRITE = (
    "CREATE FUNCTION ledger_write(u text) RETURNS text LANGUAGE sql "
    "AS $$ INSERT INTO ledger (unit) VALUES (u) RETURNING unit $$"
)


@pytest.fixture
def ledger_engine(pg_server: PostgresServer, pg_database: str) -> Iterator[sa.Engine]:
    create_ledger(pg_server, pg_database, markers=True, also=(LEDGER_WRITE,))
    engine = sa.create_engine(pg_server.url(pg_database))
    yield engine
    engine.dispose()


#: texts (sent on the driver's connection, as one simple query) that commit their INSERT
#: themselves after a ROLLBACK (see ONCE_WRONG)
COMMITTED_AFTER_A_ROLLBACK = [
    "ROLLBACK; INSERT INTO ledger (unit) VALUES ('{unit}')",
    "abort /* then */ ; SELECT ledger_write('{unit}')",
    "ROLLBACK WORK; SELECT E'\\\\', ledger_write('{unit}') -- unsure: a backslash",
]


@pytest.mark.usefixtures("no_backoff")
@pytest.mark.parametrize("text", COMMITTED_AFTER_A_ROLLBACK)
def test_a_unit_whose_text_committed_after_a_rollback_is_not_replayed(
    ledger_engine: sa.Engine, pg_server: PostgresServer, pg_database: str, service: str, text: str
) -> None:
    """Replayed after the serialization failure that follows, it wrote its row twice."""
    assert_committed_once(
        ledger_engine,
        pg_server,
        pg_database,
        service,
        lambda session, unit: driver_connection(session).execute(text.format(unit=unit)),
    )


@pytest.mark.asyncio
@pytest.mark.usefixtures("no_backoff")
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
@pytest.mark.parametrize("text", COMMITTED_AFTER_A_ROLLBACK[:2])
@pytest.mark.usefixtures("ledger_engine")
async def test_an_async_unit_whose_text_committed_after_a_rollback_is_not_replayed(
    pg_server: PostgresServer, pg_database: str, service: str, driver: str, text: str
) -> None:
    """The same on the async drivers' own connections (asyncpg's ``execute`` sends a text
    without arguments as one simple query)."""
    engine = create_async_engine(pg_server.url(pg_database, driver=driver))
    Sessions = rdb.AsyncResilientSession(engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    async def work(session: AsyncSession) -> None:
        calls.append(1)
        await session.execute(sa.text("SELECT 1"))  # (SQLAlchemy's BEGIN goes out)
        raw = (await (await session.connection()).get_raw_connection()).driver_connection
        await raw.execute(text.format(unit=unit))  # type: ignore[union-attr]
        await session.execute(sa.text("SELECT serialization_failure()"))

    try:
        with pytest.raises((sa.exc.DBAPIError, asyncpg.PostgresError, psycopg.Error)) as raised:
            await Sessions.run(work)
    finally:
        await engine.dispose()
    assert rdb.sqlstate_of(raised.value) == "40001"
    assert calls == [1], "replayed after it committed part of its work"
    assert ledger_rows(pg_server, pg_database, unit) == 1


#: texts whose write the judge must see through their comments, quotes and dollar quotes
#: (each writes the unit's row once), for a unit whose COMMIT answer is then lost
HIDDEN_IN_THE_TEXT = [
    "/* a /* COMMIT; */ b */ SELECT ledger_write('{unit}')",
    "SELECT $$; COMMIT; $$, \"ledger_write\"('{unit}')",
    "SELECT E'\\'; COMMIT; --', ledger_write/**/('{unit}')",
    "SELECT 1 AS end, CASE WHEN true THEN ledger_write('{unit}') END AS commit_id",
    "WITH w AS (INSERT INTO ledger (unit) VALUES ('{unit}') RETURNING unit) SELECT * FROM w",
    "SELECT 'a; commit' -- COMMIT;\n; SELECT ledger_write('{unit}')",
    # the held cursor's query runs during COMMIT, with no xid before it
    "DECLARE held CURSOR WITH HOLD FOR SELECT ledger_write('{unit}')",
]


@pytest.mark.usefixtures("no_backoff")
@pytest.mark.parametrize("text", HIDDEN_IN_THE_TEXT)
@pytest.mark.usefixtures("ledger_engine")
def test_a_write_in_a_hard_text_is_verified_after_a_lost_answer(
    pg_server: PostgresServer, pg_database: str, fault_proxy: FaultProxy, service: str, text: str
) -> None:
    proxied = sa.create_engine(fault_proxy.url(pg_database))
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    def work(session: Session) -> None:
        calls.append(1)
        session.execute(sa.text("SELECT 1"))  # (SQLAlchemy's BEGIN goes out)
        driver_connection(session).execute(text.format(unit=unit))

    try:
        Sessions = rdb.ResilientSession(proxied, service=service)
        Sessions.run(lambda session: session.execute(sa.text("SELECT 1")))  # connected
        fault_proxy.lose_commit_answer()
        Sessions.run(work)
        assert fault_proxy.commits_lost == 1
    finally:
        proxied.dispose()
    assert calls == [1]  # verified, not replayed
    assert ledger_rows(pg_server, pg_database, unit) == 1
