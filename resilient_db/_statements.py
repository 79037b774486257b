"""Where the library sees the statements of a unit, and what it concludes from them.

A statement that may write marks its connection's transaction, so the driver's COMMIT carries
a marker (see :mod:`resilient_db._commit`); one sent in autocommit commits on its own, so it is
recorded on the unit's attempt, which can then no longer be replayed (unless the server
answered it with an error and it was no ``CALL`` or ``DO`` block, which may commit inside
itself before its error: see ``COMMITS_INSIDE``). Every statement must be seen, whoever sends
it: SQLAlchemy, or your code on the raw connection (``session.connection().connection``, its
``driver_connection``, ``engine.raw_connection()``), which a unit's retry replays like
everything else. Where:

* psycopg (sync and async): the marked connection's cursor classes (``cursor_factory`` and
  ``server_cursor_factory`` become marked subclasses of what they were), whose ``execute``,
  ``executemany``, ``stream`` and ``copy`` note the statement. Every statement passes there,
  SQLAlchemy's and yours alike: the engine needs no statement listener of this protocol.
* asyncpg: the marked connection class's own methods (``execute``, ``executemany``, the
  ``fetch`` family, the ``copy`` family, ``cursor``) note what they send, and a statement
  that may write, once prepared (``prepare``), notes each of its executions. SQLAlchemy runs
  its statements as asyncpg prepared statements (and ``executemany``): they pass there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
import string
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final, TypeAlias, cast

import asyncpg
import psycopg
from psycopg import sql

from ._classify import DEFAULT_CLASSIFIER, Classifier, mark_partly_committed, unanswered_commit
from ._internals import asyncpg_statement_connection as statement_connection
from ._internals import raised_by_commit_impl
from ._state import renew_after_fork

if TYPE_CHECKING:
    from ._commit import AttemptRecord, CommitRequest

# The attempt running in this thread/task (not while it checks a lost COMMIT answer).
current_attempt: contextvars.ContextVar[AttemptRecord | None] = contextvars.ContextVar(
    "resilient_db_attempt", default=None
)

# Set while the library does its own work on an application's engine (settling a lost COMMIT
# answer, finishing a two-phase commit, pruning commit markers): a COMMIT of that work which
# loses its answer is the library's to handle, not an application's unknown outcome.
own_work: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "resilient_db_own_work", default=False
)

# The commit being made by a unit in this thread/greenlet: set around ``session.commit()``.
current_request: contextvars.ContextVar[CommitRequest | None] = contextvars.ContextVar(
    "resilient_db_commit", default=None
)


def running_attempt() -> AttemptRecord | None:
    """The attempt running in this thread or task (:data:`current_attempt`), or None: also
    where the context holds one that has ended, which a task or a thread started in it
    inherited (its work there is drop-in code's, said under its own factory's service)."""
    attempt = current_attempt.get()
    return attempt if attempt is not None and attempt.running else None


def committing_request() -> CommitRequest | None:
    """The commit a unit is making in this thread or task (:data:`current_request`), or None:
    also where the context holds one whose COMMIT step is over (``CommitRequest.ended``): a
    task or a thread started in that step (by an ``after_commit`` listener, an outbox's
    publisher, say) inherited it, and its COMMITs are drop-in code's, their lost answers
    unknown outcomes of their own, not the unit's to settle."""
    request = current_request.get()
    return None if request is None or request.ended else request


# Set while a unit's (or an operation's) next attempts run after one of its attempts met a
# 25006 that the server's answer and the login's report disagreed on, taken for a lost server
# (see ``_unit.refused_unsure_again``): set by the retry loop, only for such a unit, around its
# replays (see ``Policy._call_retrying``); a second such refusal there is the unit's own. Its
# value is where the replays run (see :func:`running_here`): an asyncio task or a thread that
# a replay starts inherits it, and its units are its own, whose first such refusal is theirs
# (see :func:`refused_unsure_here`).
refused_unsure_before: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "resilient_db_refused_unsure_before", default=None
)


def running_here() -> Any:
    """Where this code runs, for a value a task or a thread started here must not take for
    its own: this asyncio task (weakly: the reference compares equal while it lives), else
    this thread (its ident; under gevent, its greenlet's). SQLAlchemy's greenlets run in
    their task. Off every unit's success path."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop running in this thread
        task = None
    return threading.get_ident() if task is None else weakref.ref(task)


def refused_unsure_here() -> bool:
    """Whether this code runs in the replays of a unit that met an unsure refusal (see
    :data:`refused_unsure_before`): in their task or thread, not in one they started."""
    where = refused_unsure_before.get()
    return where is not None and where == running_here()


class SavedNote:
    """Whether a COMMIT of a transaction that may have written succeeded (outside a unit's own
    final COMMIT, which its ticket tells) while a drop-in block ran: an async factory's
    ``Session.begin()`` block, a sync factory's session's ``with`` (see :data:`dropin_block`).
    An interruption arriving as the block's session closes, or in its COMMIT's step once the
    server answered it, is then said to come after a saved change; after a block that wrote
    nothing it is not (there is nothing a client must not resubmit).

    A block left in another thread, task or context than it was entered in can't take its
    note out of the context it was entered in (``left``): the next block entered there
    encloses the block around it instead, not the note left behind (each new block's note held
    the one before: a chain as long as the blocks run, in a thread or task that enters blocks
    other threads or tasks leave)."""

    __slots__ = ("enclosing", "left", "saved")
    enclosing: SavedNote | None
    saved: bool
    left: bool

    def __init__(self, enclosing: SavedNote | None) -> None:
        while enclosing is not None and enclosing.left:
            enclosing = enclosing.enclosing
        self.enclosing = enclosing  # the block around it: what this one saved, that one did
        self.saved = False
        self.left = False  # its block ended in another context (see above)


# The innermost drop-in block running in this thread/task (see SavedNote).
dropin_block: contextvars.ContextVar[SavedNote | None] = contextvars.ContextVar(
    "resilient_db_dropin_block", default=None
)


def note_saved() -> None:
    """A COMMIT that may have written succeeded, not a unit's final one (drop-in code's, or a
    unit's or an operation's own code's): noted for the drop-in blocks running, the innermost
    and those around it (see :class:`SavedNote`)."""
    note = dropin_block.get()
    while note is not None and not note.saved:
        note.saved = True
        note = note.enclosing


#: the library's context variables whose values hold a unit's objects (its session, its
#: transactions and so its engine), each defaulting to None: cleared while asyncpg connects for
#: a unit (see ``_commit.connect_outside_units``), since its transport's reader keeps the
#: context it was made in for as long as the connection lives (in the pool of an engine that
#: would otherwise be freed, with the unit's session)
UNIT_CONTEXT: list[contextvars.ContextVar[Any]] = [current_attempt, current_request]


@contextlib.contextmanager
def library_work() -> Iterator[None]:
    """Around the library's own work on an application's engine (settling a lost COMMIT answer,
    finishing a two-phase commit, pruning commit markers): its statements are no unit's and its
    COMMIT no unit's (``current_attempt``, ``current_request``), and a COMMIT of it that loses
    its answer is no application's unknown outcome (``own_work``)."""
    attempt = current_attempt.set(None)
    request = current_request.set(None)
    working = own_work.set(True)
    try:
        yield
    finally:
        own_work.reset(working)
        current_request.reset(request)
        current_attempt.reset(attempt)


# Statements that can't write: the decision per SQL string, cached. Only a plain SELECT (not
# SELECT INTO, not WITH, which may hold a data-modifying CTE) whose calls are all built-ins that
# don't write counts as read-only; anything else may write and the server decides (the marker is
# inserted only by a transaction that holds an xid), unless the statement writes by its kind
# (``WRITES``: then the marker is inserted whatever the xid). A SELECT on a view whose definition
# calls a writing function is not seen: such a unit is replayed after a lost COMMIT answer.
_SAFE_CALLS: Final = frozenset(
    """
    any all in exists cast coalesce nullif greatest least count sum min max avg bool_and bool_or
    every array_agg string_agg json_agg jsonb_agg json_object_agg jsonb_object_agg
    json_build_object jsonb_build_object json_build_array jsonb_build_array row_number rank
    dense_rank percent_rank cume_dist ntile lag lead first_value last_value nth_value
    lower upper length char_length octet_length substring substr trim btrim ltrim
    rtrim concat concat_ws replace position strpos left right lpad rpad abs round floor ceil
    ceiling trunc mod power sqrt date_trunc date_part extract now current_timestamp
    current_date localtimestamp clock_timestamp age to_char to_timestamp to_date make_interval
    array array_length cardinality unnest jsonb_array_elements json_array_elements
    jsonb_each json_each jsonb_extract_path json_extract_path to_json to_jsonb row values
    on using and or not as from where select distinct case when then else end between
    like interval varchar char numeric decimal timestamp time date limit offset group
    having lateral union intersect except asc desc
    version current_schema current_schemas current_database current_user session_user
    current_setting pg_backend_pid format_type pg_get_expr pg_get_constraintdef pg_get_indexdef
    pg_table_is_visible to_regclass
    """.split()  # noqa: SIM905 - a word list reads better as words
)
# The names of _SAFE_CALLS still trusted: a database may have a function or an aggregate of its
# own under one of them (not an extension's), which may write, and a call of that name reach
# (a schema before pg_catalog on the search_path, or argument types it matches better: a
# ``lower(varchar)`` in public): the check a connection makes when it is set up asks (see
# ``_commit._CHECK_SQL``), and such names are no longer trusted in this process
# (:func:`distrust_calls`).
_trusted_calls: frozenset[str] = _SAFE_CALLS
#: the names of _SAFE_CALLS the check of a new connection asks about (see above)
SAFE_CALL_NAMES: Final = tuple(sorted(_SAFE_CALLS))


#: taken to change :data:`_trusted_calls` (the first connections of two databases, each with
#: functions of its own under built-ins' names, set up at once: each change is made whole)
_trust_lock = threading.Lock()
renew_after_fork(globals(), "_trust_lock")


def distrust_calls(names: Iterable[str]) -> None:
    """A database has functions of its own, which may write, under these built-ins' names:
    calls of them may write from now on (the verdicts made so far are made again; one being
    made meanwhile, in another thread, is not kept: see :func:`verdict_of`)."""
    global _trusted_calls
    wanted = {str(name).lower() for name in names}
    with _trust_lock:  # (two at once: neither's names trusted again by the other's update)
        untrusted = _trusted_calls & wanted
        if not untrusted:
            return
        _trusted_calls = _trusted_calls - untrusted
    forget_verdicts()


# Names as PostgreSQL's lexer reads them: an unquoted name holds ASCII letters, digits, ``_``,
# ``$`` and any non-ASCII character (``записать``, ``ésum``, even a no-break space), and only
# ASCII spaces, tabs and line breaks are whitespace. A call's name is taken whole (a run of name
# characters, so ``ésum(`` is not ``sum(``); one that starts with a digit is no built-in either.
# Each character class of names below is written as the negation of the ASCII characters it
# does not hold (``[^...]``): ``re`` compiles that in microseconds, where a range up to U+10FFFF
# took milliseconds each (tens of them under IGNORECASE): a third of a second, at least, of
# every process's ``import resilient_db``.
_NAME_ASCII = string.ascii_letters + string.digits + "_$"


def _ascii_class(belongs: Callable[[str], bool]) -> str:
    """The body of a character class holding the ASCII characters ``belongs`` takes."""
    return "".join(f"\\x{code:02x}" for code in range(128) if belongs(chr(code)))


def _names(ascii_chars: str = _NAME_ASCII) -> str:
    """A character class matching ``ascii_chars`` and every non-ASCII character."""
    return f"[^{_ascii_class(lambda char: char not in ascii_chars)}]"


_NAME = _names()  # a character of an unquoted name
_SPACE = "[ \t\n\r\f\v]"
# Words of the grammar that come before a ``(`` without calling anything. Only PostgreSQL's
# reserved words and those that can't name a function are in the list above (``group``,
# ``where``, ``coalesce``, ...); a word that can (``over``, ``filter``, ``join``, ``by``,
# ``ilike``, ``is``, ``nulls``, ``similar``, ``within``: a function ``filter(int)`` of yours
# may write) is taken for the grammar's only where it stands as the grammar puts it: a
# window's ``OVER (`` and an aggregate's ``FILTER (`` right after the call's ``)``; ``ORDER
# BY (``, ``GROUP BY (``, ``PARTITION BY (``; ``JOIN (`` opening a subquery. These are blanked
# before calls are looked for.
_GRAMMAR_PARENS = re.compile(
    rf"\){_SPACE}*(?:OVER|FILTER)(?={_SPACE}*\()"
    rf"|(?<!{_NAME})(?:ORDER|GROUP|PARTITION){_SPACE}+BY(?={_SPACE}*\()",
    re.IGNORECASE,
)
# ``JOIN (`` is the grammar's (a join to a parenthesised join or subquery) after a join's kind
# (``LEFT``, ``OUTER``, ...), a ``)`` or a quoted name, or a table's name or alias; a call of a
# ``join`` of yours after an operator, a ``,``, a ``(`` or a word that comes before an
# expression or a table function (``SELECT``, ``WHERE``, ``FROM``, ``JOIN``, ``LATERAL``, ...).
_JOIN_PAREN = re.compile(f"(?<!{_NAME})JOIN(?={_SPACE}*\\()", re.IGNORECASE)
_WORD_BEFORE = re.compile(f"({_NAME}+){_SPACE}*\\Z")
_JOIN_KINDS: Final = frozenset({"INNER", "OUTER", "LEFT", "RIGHT", "FULL", "CROSS", "NATURAL"})
#: words after which a name followed by "(" is a call (of an expression, or a table function)
_BEFORE_CALLS: Final = frozenset(
    """
    SELECT WHERE AND OR NOT ON THEN ELSE WHEN CASE HAVING BY RETURNING DISTINCT ALL ANY SOME
    IN BETWEEN LIKE ILIKE SIMILAR TO IS LIMIT OFFSET FETCH USING SET VALUES FROM JOIN LATERAL
    AS ESCAPE ARRAY EXISTS ROW OPERATOR DO RETURN WITH INTO TABLE ONLY FOR OF UNION INTERSECT
    EXCEPT ORDER GROUP PARTITION FILTER OVER WITHIN NULLS FIRST LAST ASC DESC COLLATE AT ZONE
    ROWS RANGE GROUPS PRECEDING FOLLOWING UNBOUNDED CURRENT AND SYMMETRIC ASYMMETRIC DEFAULT
    """.split()  # noqa: SIM905
)


def _grammar_join(match: re.Match[str]) -> str:
    """``JOIN`` blanked where it stands as the grammar's before its ``(`` (see above), as a
    ``)``: the ``(`` after it then follows no name (``OUTER (`` is no call either)."""
    before = match.string[: match.start()].rstrip(" \t\n\r\f\v")
    if before.endswith((")", '"')):
        return ") "
    word = _WORD_BEFORE.search(before)
    if word is None:  # an operator, a "," or a "(" (or nothing): a call
        return match.group(0)
    name = word.group(1)
    if name.upper() in _JOIN_KINDS:
        return ") "
    if not name.isascii() or name.upper() in _BEFORE_CALLS or name[0].isdigit():
        return match.group(0)
    return ") "  # a table's name or alias


# (a name is tried from its start only: from each of its characters, a long name, or text
# in quotes, would be read again to its end)
_CALL = re.compile(f"(?<!{_NAME})({_NAME}+){_SPACE}*\\(")
# ``pg_catalog.f(`` is the built-in ``f`` (SQLAlchemy's first statements on a new engine are
# ``select pg_catalog.version()`` and ``select current_schema()``): judged as ``f(``
_CATALOG_CALL = re.compile(
    f"(?<!{_NAME})pg_catalog{_SPACE}*\\.{_SPACE}*(?={_NAME}+{_SPACE}*\\()",
    re.IGNORECASE,
)
_QUALIFIED_CALL = re.compile(f'\\.{_SPACE}*"?{_NAME}+"?{_SPACE}*\\(|"{_SPACE}*\\(')
# (``1INTO`` is ``1 INTO`` to a server before 15: only a letter, ``_`` or ``$`` before INTO
# joins it to a name)
_INTO = re.compile(f"(?<!{_names(string.ascii_letters + '_$')})INTO(?!{_NAME})", re.IGNORECASE)
# A statement that may make transactions read-only (SET TRANSACTION READ ONLY, SET SESSION
# CHARACTERISTICS ..., SET default_transaction_read_only, BEGIN READ WRITE, ...) or switch the
# role in effect (SET [LOCAL] ROLE, SET SESSION AUTHORIZATION, RESET ROLE, set_config('role')),
# which may have no right to write markers.
_SESSION_STATE = re.compile(
    # (where a statement starts, the text's or one after a ";": its words up to the next ";")
    r"(?:\A|;)\s*(?:SET|RESET|BEGIN|START)\b[^;]*?"
    r"(?:\bREAD\s+(?:ONLY|WRITE)\b|transaction_read_only|\bROLE\b|AUTHORIZATION\b)"
    # (``session_authorization`` too; a set_config() of a name that is no plain string, which
    # may spell any: ``'ro' || 'le'``, ``E'role'``, a column)
    r"|set_config\"?\s*\(\s*"
    r"(?:'(?:role|session_authorization|(?:default_)?transaction_read_only)'|(?!'(?:[^']|'')*'\s*,))",
    re.IGNORECASE | re.DOTALL,
)
# The same in a text whose comments can't be taken out surely (see ``_judge``): a comment may
# stand where a statement starts (``/* a /* b */ */ SET ROLE x``) or between its words, so
# any of those words after a ``SET``, ``RESET``, ``BEGIN`` or ``START`` anywhere counts, and
# any ``set_config``. One taken by mistake costs the connection its prepared marker statement.
_SESSION_STATE_UNSURE = re.compile(
    f"(?<!{_NAME})(?:SET|RESET|BEGIN|START)(?!{_NAME}).*?"
    f"(?:(?<!{_NAME})(?:READ|ROLE)(?!{_NAME})|AUTHORIZATION|transaction_read_only)"
    f"|(?<!{_NAME})set_config(?!{_NAME})",
    re.IGNORECASE | re.DOTALL,
)
# Verdicts, cached per statement: a truthy one means "may write". STOPS_PREPARED: after it, the
# connection's COMMITs call the marker function instead of the prepared statement: in a
# read-only transaction its INSERT can't even start (the server refuses it before its condition
# is looked at) and a role switched to may not write markers, where the function decides on the
# server (and runs as its owner). These are statements of session state: that connection stays
# on the function. DEALLOCATES: DISCARD or DEALLOCATE may have dropped the prepared statement:
# the connection's next COMMIT prepares it again (see ``_commit._Reprepare``).
READ_ONLY: Final = 0
MAY_WRITE: Final = 1
STOPS_PREPARED: Final = 2
#: ``NOTIFY`` or ``pg_notify(...)``: the notification goes out when the transaction commits, but
#: the server assigns the transaction's xid for it only during COMMIT, after the marker's
#: condition was evaluated. A transaction that did nothing else would carry no marker, and a
#: lost answer would be replayed: the notification sent twice. Its COMMIT assigns the xid first.
NOTIFIES: Final = 3
DEALLOCATES: Final = 4
# Anywhere in the statement, not only at its head: after another statement in the same text
# (``SELECT 1; NOTIFY jobs``), in a ``DO`` block's body or a string a function ``EXECUTE``s
# (``pg_notify(`` anywhere). ``NOTIFY`` counts where a command can start: at the text's start,
# after a ``;``, at a quoted body's or string's start, after a PL/pgSQL ``BEGIN``, ``THEN``,
# ``ELSE``, ``LOOP`` or a rule's ``DO [ALSO | INSTEAD]`` (spaces and comments between: after a
# comment, or first on a line after one that holds ``--``, it is taken as one), and followed by
# a channel, so a column or a value named ``notify`` (``SELECT notify FROM t``, ``kind =
# 'notify'``) is no notification. A text that ``EXECUTE``s a command may notify whatever it
# spells: the command may be put together from pieces (``EXECUTE 'NOT' || 'IFY jobs'``,
# ``format('%s jobs', 'NOTIFY')``) or read from a table. A word taken for one by mistake (``'a;
# notify me'``) costs its transaction the xid's request at COMMIT (on a hot standby, nothing),
# nothing more. Each ``NOTIFY`` is looked at from where it stands back over the spaces before
# it (and one line): the time is linear in the text's length, whatever it holds.
# (any ``pg_notify`` as a name: a call may be spelled ``"pg_notify"(``, or with a comment before
# its ``(``; one taken by mistake costs the xid's request)
_PG_NOTIFY = re.compile(f"(?<!{_NAME})pg_notify(?!{_NAME})", re.IGNORECASE)
_NOTIFY_COMMAND = re.compile(f'(?<!{_NAME})NOTIFY(?=[\\s"$]|--|/\\*)', re.IGNORECASE)
# (not the word alone in quotes: a privilege's name, has_function_privilege(f, 'EXECUTE'))
_NAME_OR_QUOTE = _names(_NAME_ASCII + "'")
_EXECUTE = re.compile(f"(?<!{_NAME_OR_QUOTE})EXECUTE(?!{_NAME_OR_QUOTE})", re.IGNORECASE)
_COMMAND_BEFORE: Final = frozenset({"BEGIN", "THEN", "ELSE", "LOOP", "DO", "ALSO", "INSTEAD"})
_SPACES: Final = " \t\n\r\f\v"


def _notifies(statement: str) -> bool:
    """Whether ``statement`` may send a notification (see above)."""
    lowered = statement.lower()
    if 'u&"' in lowered or ("u&'" in lowered and _EXECUTE.search(statement)):
        return True  # (a name spelled with Unicode escapes may be pg_notify; a string, NOTIFY)
    if "notify" not in lowered and _EXECUTE.search(statement) is None:
        return False
    if _PG_NOTIFY.search(statement):
        return True
    if _EXECUTE.search(statement):
        # a command EXECUTEd may be put together from pieces or read from a table
        # (``EXECUTE 'NOT' || 'IFY ch'``, ``EXECUTE (SELECT cmd FROM outbox)``)
        return True
    # (a ``--`` comment ends at a line feed or a carriage return: one kind of line end)
    text = statement.replace("\r", "\n")
    return any(_command_starts_before(text, m.start()) for m in _NOTIFY_COMMAND.finditer(text))


def _command_starts_before(text: str, at: int) -> bool:
    """Whether a command may start at ``at`` in ``text`` (whose line ends are ``\\n``): after
    the text's start, a ``;``, a quote, a dollar quote or a word that opens a command, with
    only spaces between; after a comment, or on a line of its own after one that holds ``--``
    (perhaps in a string), it is taken as one."""
    i = at
    while i and text[i - 1] in _SPACES:
        i -= 1
    if not i or text[i - 1] in ";'$" or text.endswith("*/", 0, i):
        return True
    if text.find("\n", i, at) >= 0 and text.find("--", text.rfind("\n", 0, i) + 1, i) >= 0:
        return True
    start = i
    while start and (
        text[start - 1].isalnum() or text[start - 1] in "_$" or text[start - 1] >= "\x80"
    ):
        start -= 1
    word = text[start:i]
    return word[word.rfind("$") + 1 :].upper() in _COMMAND_BEFORE


# Statements of transaction control that write nothing themselves (asyncpg's savepoints, for
# one, go through ``execute``; SQLAlchemy's PostgreSQL dialect sends ``ROLLBACK PREPARED`` and
# ``BEGIN`` as statements when it rolls a prepared transaction back): judged read-only, as an
# empty statement (asyncpg's ping, ";").
_CONTROL_HEADS: Final = frozenset({"SAVEPO", "RELEAS", "ROLLBA", ""})
_BEGINS: Final = re.compile(r"\s*(?:BEGIN|START\s+TRANSACTION)(?![\w$])", re.IGNORECASE)
#: A flag over any verdict (which it makes truthy): the statement ends the transaction it runs
#: in by committing it (``COMMIT``, ``END``, ``COMMIT AND CHAIN``, ``PREPARE TRANSACTION``,
#: ``COMMIT PREPARED``), sent as statement text by the unit's own code: the work before it is
#: committed (or prepared, to be committed by whoever ends it), so the unit's attempt can't be
#: replayed after it, unless the server answered it with an error (as for a statement sent in
#: autocommit). COMMITS_MIDWAY: more statements follow it in the same text, so an error answer
#: proves nothing (the error may be theirs): the attempt can't be replayed at all.
COMMITS: Final = 8
COMMITS_MIDWAY: Final = 16
#: A flag over a ``COMMITS`` verdict: the text is a plain ``COMMIT`` alone (any case, spaces,
#: comments and a ``;`` around it; no ``AND CHAIN``, no ``WORK``, no other statement). Sent by
#: the code of a unit or an operation with a psycopg cursor's ``execute`` (``raw.execute(
#: "COMMIT")``, ``text("COMMIT")`` through SQLAlchemy) in a transaction, it goes out as the
#: connection's own ``commit()``: with the marker a unit's own COMMIT midway carries, its lost
#: answer settled by it (see ``_commit._own_plan``), as asyncpg's ``execute("COMMIT")`` is.
PLAIN_COMMIT: Final = 512
_PLAIN_COMMIT_TEXT = re.compile(f"{_SPACE}*COMMIT{_SPACE}*;?{_SPACE}*\\Z", re.IGNORECASE)
#: A flag over any verdict: a statement of the text is a ``CALL`` or a ``DO`` block, which may
#: commit inside itself: sent outside a transaction block (in autocommit), a procedure's or a
#: ``DO`` block's own ``COMMIT`` is allowed, so the server may commit part of its work and then
#: answer it with an error (a deadlock, a lock timeout after the COMMIT). Such an error answer
#: proves nothing, unlike one to a statement that commits only as a whole: the attempt of the
#: unit whose code sends it in autocommit can't be replayed, whatever the answer. In a
#: transaction they can't commit (the server refuses their transaction control there): as any
#: statement.
COMMITS_INSIDE: Final = 32
#: What a statement sent in autocommit may commit part of before its error: a ``CALL`` or a
#: ``DO`` block, or a text whose ``COMMIT`` has more statements after it (outside a transaction
#: block the text runs in one the server makes for it, which its ``COMMIT`` ends).
PARTLY_IN_AUTOCOMMIT: Final = COMMITS_INSIDE | COMMITS_MIDWAY
#: A flag over a verdict that may write: the statement writes by its kind (``INSERT``,
#: ``UPDATE``, ``DELETE``, ``MERGE``, ``TRUNCATE``, ``COPY ... FROM``, ``SELECT ... INTO``, a
#: ``WITH`` or a ``DO`` block holding one of those words, ``DECLARE ... WITH HOLD``), not only
#: through a function it calls. Such a write may leave the transaction without a local xid,
#: which the marker's condition looks for: rows of a foreign table (postgres_fdw writes them
#: on the remote server, and commits them there with the local COMMIT), or a held cursor's
#: query, which runs during COMMIT, after the condition was evaluated. A transaction that ran
#: one carries its marker whatever its xid (see ``_commit._commit_plan``). A word taken for one
#: by mistake (``WHERE kind = 'update'`` in a statement that calls a function) costs the
#: transaction a marker row, nothing more; a plain read never gets the flag.
WRITES: Final = 64
#: A flag over a verdict that may write: the statement leaves the connection's session holding
#: something a ROLLBACK keeps (a session-level advisory lock, ``pg_advisory_lock`` and its
#: ``_shared`` / ``try_`` forms; a statement ``PREPARE``d in SQL). An attempt that sent one and
#: failed does not give its connection back to the pool with it: a replay on another pooled
#: connection would wait for ever on the lock the failed attempt's idle connection holds, and
#: one on the same connection would take it twice (and release it once), or meet its own
#: ``PREPARE`` (42P05). The connection is dropped instead (see ``AttemptRecord.keeps``). A word
#: taken for one by mistake costs a failed attempt its connection, nothing more.
KEEPS_SESSION: Final = 128
_KEEPS_SESSION = re.compile(
    f"(?<!{_NAME})pg_(?:try_)?advisory_lock(?:_shared)?(?!{_NAME})"
    f"|(?:\\A|;){_SPACE}*PREPARE{_SPACE}+(?!TRANSACTION(?!{_NAME}))",
    re.IGNORECASE,
)
#: A flag over a verdict that may write: the statement may set the isolation level of the
#: transaction it runs in or of the connection's later ones (``SET TRANSACTION ISOLATION
#: LEVEL``, ``SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL``, ``BEGIN`` or ``START
#: TRANSACTION ISOLATION LEVEL``, ``SET default_transaction_isolation`` or
#: ``transaction_isolation``, ``set_config()`` of a setting the text does not name, an
#: ``UPDATE`` of ``pg_settings``): the level SQLAlchemy knows for the connection is no longer
#: sure, for as long as the connection lives (see :data:`isolation_unsure`). A word taken for
#: one by mistake (``'isolation'`` in a string) costs a lost COMMIT answer of a unit that
#: committed part of its work its proof by the level (see ``_unit.isolation_of``), nothing
#: more; ``SHOW`` only reads it.
SETS_ISOLATION: Final = 256
_SETS_ISOLATION = re.compile(
    f"isolation|set_config\"?{_SPACE}*\\({_SPACE}*(?!')|pg_settings", re.IGNORECASE
)
_SHOW_ONLY = re.compile(f"{_SPACE}*SHOW{_SPACE}[^;]*;?{_SPACE}*\\Z", re.IGNORECASE)
#: the drivers' connections on which a statement that ``SETS_ISOLATION`` was sent, each for as
#: long as it lives (a session's characteristics outlive its transactions, and the connection
#: goes back to the pool with them)
isolation_unsure: weakref.WeakSet[Any] = weakref.WeakSet()
#: the verdict of the most common writes (an ``INSERT``, ``UPDATE``, ``DELETE`` alone): the
#: noting paths set its flag themselves, without a call
_PLAIN_WRITE: Final = MAY_WRITE | WRITES
_KIND: Final = 7  # the verdict without its flags
_verdicts: dict[str, int] = {}
#: the verdicts kept, bounded in number and in the characters of their statements: a
#: generated text (an ``IN`` list of thousands of parameters, one per length, a multi-row
#: ``INSERT``) is long, and 4,096 of them kept a worker's memory growing by hundreds of MB.
#: A text longer than a quarter of the characters is judged each time, not kept (a batch of
#: 1,000 rows of 15 columns SQLAlchemy's bulk INSERT sends is some 430,000: kept, as judging
#: it takes some 60 ms)
_MAX_VERDICTS: Final = 4096
_MAX_VERDICT_CHARS: Final = 1 << 24
_verdict_chars = 0


def may_write(statement: str) -> bool:
    """False only when ``statement`` surely can't write (see above)."""
    return bool(verdict_of(statement))


def verdict_of(statement: str) -> int:
    """``statement``'s verdict (``READ_ONLY``, ``MAY_WRITE``, ``STOPS_PREPARED``,
    ``NOTIFIES`` or ``DEALLOCATES``), cached."""
    global _verdict_chars
    verdict = _verdicts.get(statement)
    if verdict is None:
        trusted = _trusted_calls
        verdict = _judge(statement)
        size = len(statement)
        if size > _MAX_VERDICT_CHARS >> 2:
            return verdict if _trusted_calls is trusted else verdict_of(statement)
        if len(_verdicts) >= _MAX_VERDICTS or _verdict_chars + size > _MAX_VERDICT_CHARS:
            forget_verdicts()
        _verdict_chars += size  # (threads racing here only make it clear sooner or later)
        _verdicts[statement] = verdict
        if _trusted_calls is not trusted:
            # another thread distrusted names while this one judged (a database's first
            # connection found functions of its own under built-ins' names): the verdict may
            # be of the trust before, and kept after that thread's forget_verdicts() it would
            # stand for good (a call that writes taken for a read). Kept first, looked at
            # after: a distrust later than this test clears it itself. Judged again (each
            # distrust takes names away: this ends)
            _verdicts.pop(statement, None)
            return verdict_of(statement)
    return verdict


def forget_verdicts() -> None:
    """Judge every statement again from now on."""
    global _verdict_chars
    _verdicts.clear()
    _verdict_chars = 0


# Comments are whitespace to PostgreSQL: ``w/**/(1)`` calls ``w``, and ``w -- x\n(1)`` too, where
# the call pattern sees no call (or, after ``-- lower``, a safe one). A statement is judged
# without them; one whose comments can't be told from the rest by a simple scan (dollar quotes,
# backslash escapes, nested or unterminated comments) may write.
# (A comment left open runs to the text's end, so that no scan goes there again from each of
# its ``/*``: a text of many ``'/*.py'`` strings is read in linear time; a ``--`` comment ends
# at a line feed or a carriage return, as PostgreSQL ends it.)
_TOKENS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|/\*.*?(?:\*/|\Z)|--[^\n\r]*", re.DOTALL)


def _uncommented(statement: str) -> str | None:
    """``statement`` with each comment replaced by a space, or None when that can't be done
    surely (see above)."""
    if "$" in statement or "\\" in statement:
        return None
    kept: list[str] = []
    pos = 0
    for match in _TOKENS.finditer(statement):
        gap = statement[pos : match.start()]
        if "/*" in gap or "--" in gap or "'" in gap or '"' in gap:
            return None  # a comment or a quote the scan did not close
        token = match.group(0)
        if token[0] in "'\"":
            kept += (gap, token)
        elif token.startswith("/*") and ("/*" in token[2:] or not _closed_comment(token)):
            return None  # nested (PostgreSQL's block comments nest, the pattern does not), or open
        else:
            kept += (gap, " ")
        pos = match.end()
    rest = statement[pos:]
    if "/*" in rest or "--" in rest or "'" in rest or '"' in rest:
        return None
    kept.append(rest)
    return "".join(kept)


def _judge(statement: str) -> int:
    if "/*" in statement or "--" in statement:
        bare = _uncommented(statement)
        if bare is None:
            verdict = _judge_bare(statement)
            kind = verdict & _KIND
            # (a comment may stand where a statement starts, or between its words: see
            # _SESSION_STATE_UNSURE; a notification is taken first, as in _judge_kind)
            if kind != NOTIFIES and _SESSION_STATE_UNSURE.search(statement):
                return verdict & ~_KIND | STOPS_PREPARED
            if kind in (READ_ONLY, MAY_WRITE) and _DEALLOCATE_WORD.search(statement):
                return verdict & ~_KIND | DEALLOCATES
            return MAY_WRITE if verdict == READ_ONLY else verdict
        statement = bare
    return _judge_bare(statement)


def _judge_bare(statement: str) -> int:
    verdict = _judge_kind(statement)
    flags = _commits(statement) if _COMMIT_HINT.search(statement) is not None else 0
    if flags == COMMITS and _PLAIN_COMMIT_TEXT.match(statement) is not None:
        flags |= PLAIN_COMMIT
    if _INSIDE_WORD.search(statement) is not None and _commits_inside(statement):
        flags |= COMMITS_INSIDE
    if _KEEPS_SESSION.search(statement) is not None:
        flags |= KEEPS_SESSION
    if _SETS_ISOLATION.search(statement) is not None and _SHOW_ONLY.match(statement) is None:
        flags |= SETS_ISOLATION
    return (verdict or MAY_WRITE) | flags if flags else verdict


# Statements that commit, found where a statement of the text starts (after its start or a
# ``;``), outside quoted text and names, dollar-quoted bodies (a DO block's ``END``) and
# comments; a SQL-standard body (``BEGIN ATOMIC ... END``) is part of its ``CREATE`` statement
# (a ``CASE`` or ``END`` after ``AS`` or ``.`` is a name there, not a keyword; a ``COMMIT``
# anywhere after ``ATOMIC`` counts, and a body whose ends can't be counted makes the text one
# the scan can't be sure of). A backslash inside a dollar-quoted body escapes nothing. A text
# the scan can't be sure of (a backslash elsewhere, which may escape a quote in an ``E''``
# string; a nested comment; a quote, comment or dollar quote left open) is looked at as it is:
# any ``COMMIT`` or ``PREPARE TRANSACTION`` in it counts, wherever it stands (a comment may
# hide the start of a statement), and an ``END`` that may be a statement of its own: one with
# only spaces and comments (or a ``;``, perhaps inside one) before it back to the text's
# start, and only spaces and comments after it up to a ``;`` or the text's end (or ``WORK``,
# ``TRANSACTION``, ``AND``), not a block's ``END IF``, ``END $$``. One found in a string costs
# the unit its replay, one missed would have the unit replayed after it committed part of its
# work (written twice). A ``--`` comment ends at a line feed or a carriage return.
# A ``ROLLBACK`` (``ABORT``) with more statements after it in the text commits too: they run in
# a transaction of their own, which the server commits at the text's end (one sent as a simple
# query), before the unit's COMMIT: taken as a COMMIT midway (a ``ROLLBACK TO`` savepoint, or
# one ``AND CHAIN``, too where the scan is unsure: a replay lost, nothing written twice).
_COMMIT_HINT = re.compile("COMMIT|END|PREPARE|ROLLBACK|ABORT", re.IGNORECASE)
_TAG_START = _names(string.ascii_letters + "_")  # a dollar quote's tag: a name without "$"
_TAG_CHAR = _names(string.ascii_letters + string.digits + "_")
_DOLLAR_QUOTE = f"(?<!{_NAME})\\$(?:{_TAG_START}{_TAG_CHAR}*)?\\$"
# (an ``E''`` string, whose backslashes escape, is read with them: its ends are sure, as
# psycopg's client-side quoting of a value with a backslash writes it; a backslash in a plain
# string escapes a quote only where ``standard_conforming_strings`` is off: unsure. A comment
# or a dollar-quoted body left open runs to the text's end: see ``_TOKENS``.)
_NOT_STATEMENT_WORDS = re.compile(
    f"(?<!{_NAME})[Ee]'(?:[^'\\\\]|\\\\.|'')*'|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\""
    f"|/\\*.*?(?:\\*/|\\Z)|--[^\n\r]*"
    f"|({_DOLLAR_QUOTE}).*?(?:\\1|\\Z)",
    re.DOTALL,
)
_OPEN_DOLLAR_QUOTE = re.compile(_DOLLAR_QUOTE)
_COMMITTING = re.compile(
    f"{_SPACE}*(?:COMMIT|END|PREPARE{_SPACE}+TRANSACTION)(?!{_NAME})", re.IGNORECASE
)
_ROLLING_BACK = re.compile(
    f"{_SPACE}*(?:ROLLBACK|ABORT)(?!{_NAME})"
    f"(?!(?:{_SPACE}+(?:WORK|TRANSACTION))?{_SPACE}+(?:TO|PREPARED)(?!{_NAME}))",
    re.IGNORECASE,
)
_ROLLBACK_WORD = re.compile(f"(?<!{_NAME})(?:ROLLBACK|ABORT)(?!{_NAME})", re.IGNORECASE)
_ATOMIC = re.compile(f"(?<!{_NAME})ATOMIC(?!{_NAME})", re.IGNORECASE)
# (a number with its dot, ``1.``, is one word; any other sign is one too, so that the word
# before a ``CASE`` or ``END`` is the one right before it: ``t.*, CASE``)
_SIGN = f"[{_ascii_class(lambda char: char not in _NAME_ASCII + _SPACES)}]"  # neither
_WORD_OR_END = re.compile(f"[0-9][0-9_]*\\.[0-9]*|{_NAME}+|{_SIGN}")
# (unsure text)
_COMMITTING_ANYWHERE = re.compile(
    f"(?<!{_NAME})(?:COMMIT|PREPARE{_SPACE}+TRANSACTION)(?!{_NAME})",
    re.IGNORECASE,
)
_END_WORD = re.compile(f"(?<!{_NAME})END(?!{_NAME})", re.IGNORECASE)
_PREPARE_WORD = re.compile(f"(?<!{_NAME})PREPARE(?!{_NAME})", re.IGNORECASE)
_TRANSACTION_WORD = re.compile(f"TRANSACTION(?!{_NAME})", re.IGNORECASE)
_END_GOES_ON = re.compile(f"(?:WORK|TRANSACTION|AND)(?!{_NAME})", re.IGNORECASE)
_COMMENT_MARK = re.compile(r"/\*|\*/")
_LINE_END = re.compile(r"[\n\r]")


def _closed_comment(token: str) -> bool:
    """Whether a block comment's token (``/*`` on) ends in ``*/``."""
    return len(token) >= 4 and token.endswith("*/")


def _commits(statement: str) -> int:
    """``COMMITS`` (with ``COMMITS_MIDWAY`` when more follows it) if a statement of
    ``statement``'s text commits the transaction, else 0 (see above)."""
    bare = _bare_text(statement)
    if bare is None:
        return _commits_unsure(statement)
    atomic = _ATOMIC.search(bare)
    split = bare.split(";") if atomic is None else _statements_of(bare)
    if split is None:
        return _commits_unsure(statement)
    parts = [part for part in split if part.strip(_SPACES)]
    for at, part in enumerate(parts):
        if _COMMITTING.match(part):
            return COMMITS | COMMITS_MIDWAY if at < len(parts) - 1 else COMMITS
        if at < len(parts) - 1 and _ROLLING_BACK.match(part):
            return COMMITS | COMMITS_MIDWAY  # (what follows is committed at the text's end)
    if atomic is not None:
        found = _COMMITTING_ANYWHERE.search(bare, atomic.end())
        if found is not None:
            return _commit_flags(bare, found.end())
    return 0


# Statements that may commit inside themselves (``COMMITS_INSIDE``): a ``CALL`` or a ``DO``
# where a statement of the text starts (after its start or a ``;``, outside quoted text,
# dollar-quoted bodies and comments). In a text the scan can't be sure of (see above), one
# where a statement may start: after the text's start, a ``;`` or a comment, or first on a line
# after one that holds ``--``. One taken by mistake costs the unit its replay after an error
# answer in autocommit; one missed, a replay after the statement committed part of its work.
_INSIDE_WORD = re.compile(f"(?<!{_NAME})(?:CALL|DO)(?!{_NAME})", re.IGNORECASE)
_INSIDE_HEAD = re.compile(f"{_SPACE}*(?:CALL|DO)(?!{_NAME})", re.IGNORECASE)


def _commits_inside(statement: str) -> bool:
    """Whether a statement of ``statement``'s text is a ``CALL`` or a ``DO`` (see above)."""
    bare = _bare_text(statement)
    if bare is None:
        text = statement.replace("\r", "\n")
        return any(_statement_starts_before(text, m.start()) for m in _INSIDE_WORD.finditer(text))
    return any(_INSIDE_HEAD.match(part) for part in bare.split(";"))


def _bare_text(statement: str) -> str | None:
    """``statement`` with each quoted name, string and dollar-quoted body a word of its own
    (`` q ``) and each comment a space; None when the scan can't be sure of its text (see
    above: an escape, a nested or open comment, an open quote or body)."""
    kept: list[str] = []
    pos = 0
    for match in _NOT_STATEMENT_WORDS.finditer(statement):
        token = match.group(0)
        if (
            (token[0] == "'" and "\\" in token)  # (not an E'' string's)
            or (token[:2] == "/*" and ("/*" in token[2:] or not _closed_comment(token)))
            or (
                match.group(1)
                and not (len(token) >= 2 * len(match.group(1)) and token.endswith(match.group(1)))
            )
        ):
            return None  # an escape, a nested or open comment or body
        # a quoted name, a string or a body stands as a word of its own (``AS "text") END``:
        # the END is no name); a comment as a space
        kept += (statement[pos : match.start()], " " if token[0] in "-/" else " q ")
        pos = match.end()
    kept.append(statement[pos:])
    bare = "".join(kept)
    if (
        "\\" in bare
        or "'" in bare
        or '"' in bare
        or "/*" in bare
        or "*/" in bare
        or "--" in bare
        or _OPEN_DOLLAR_QUOTE.search(bare)
    ):
        return None
    return bare


def _statements_of(bare: str) -> list[str] | None:
    """The statements of ``bare`` (a text without quotes or comments), a SQL-standard body
    (``BEGIN ATOMIC ... END``, whose statements end in ``;`` and may hold ``CASE ... END``)
    kept whole in its statement; None when a body's ends don't add up."""
    parts: list[str] = []
    start = depth = 0
    previous = before = ""
    for match in _WORD_OR_END.finditer(bare):
        word = match.group(0).upper()
        if word == ";":
            if not depth:
                parts.append(bare[start : match.start()])
                start = match.end()
        elif previous in ("AS", "."):
            pass  # a name (``AS case``, ``t.end``)
        elif (word == "ATOMIC" and previous == "BEGIN") or (
            depth and word == "CASE" and _case_expression_after(previous, before)
        ):
            depth += 1
        elif depth and word == "END":
            depth -= 1
        previous, before = word, previous
    if depth:
        return None
    parts.append(bare[start:])
    return parts


# Reserved words (no column can be named by them bare) after which an expression, so a
# ``CASE`` expression, may start; ``BY`` after ``ORDER``, ``GROUP`` or ``PARTITION`` and a
# statement's ``RETURN`` are such words too. After any other word, a number, a quoted name or
# string, ``)`` or ``]``, a ``CASE`` is a bare column label (``SELECT 1 case``), whose END
# would be missed if its ``CASE`` were counted. A ``CASE`` expression taken for a label (after
# a word missing here) only closes the body early: the body's own ``END`` then reads as a
# statement that commits, which costs a unit its replay, never a write.
_NAME_START: Final = re.compile(f"{_NAME}")
_CASE_AFTER: Final = frozenset(
    """
    SELECT WHEN THEN ELSE AND OR NOT WHERE ON IN ALL ANY SOME DISTINCT SYMMETRIC ASYMMETRIC BOTH
    LEADING TRAILING PLACING FOR FROM HAVING LIMIT OFFSET RETURNING USING TO CASE LIKE ILIKE
    SIMILAR IS OVERLAPS VARIADIC
    """.split()  # noqa: SIM905 - a word list reads better as words
)


def _case_expression_after(previous: str, before: str) -> bool:
    """Whether a ``CASE`` after the words ``before`` ``previous`` (upper case, a sign as a word
    of its own) starts a ``CASE`` expression, not a bare column label."""
    if previous in _CASE_AFTER:
        return True
    if previous == "BY":
        return before in ("ORDER", "GROUP", "PARTITION")
    if previous == "RETURN":
        return before in (";", "ATOMIC")
    first = previous[:1]
    # a sign (``(``, ``,``, ``=``, ``||``'s bars) but a value's end (``)``, ``]``)
    return bool(first) and not _NAME_START.match(first) and first not in ")]"


def _commits_unsure(statement: str) -> int:
    """:func:`_commits` of a text the scan can't be sure of (see above): from the first
    committing word on, any further statement makes it ``COMMITS_MIDWAY``."""
    # (a ``--`` comment ends at a line feed or a carriage return: one kind of line end)
    statement = statement.replace("\r", "\n")
    for rollback in _ROLLBACK_WORD.finditer(statement):
        if _commit_flags(statement, rollback.end()) & COMMITS_MIDWAY:
            return COMMITS | COMMITS_MIDWAY  # (anywhere: a comment may hide where it stands)
    found = _COMMITTING_ANYWHERE.search(statement)
    first = found.end() if found else len(statement) + 1
    for prepare in _PREPARE_WORD.finditer(statement, 0, first):
        after = _after_gap(statement, prepare.end())  # (comments between its two words)
        transaction = _TRANSACTION_WORD.match(statement, after)
        if transaction is not None:
            found, first = transaction, transaction.end()
            break
    scanned = 0
    for match in _END_WORD.finditer(statement, 0, first):
        if match.start() < scanned:
            continue  # inside the comments after an earlier END
        if not _statement_starts_before(statement, match.start()):
            continue
        after = _after_gap(statement, match.end())
        scanned = after
        if after == len(statement) or statement[after] == ";":
            return _commit_flags(statement, after)
        if _END_GOES_ON.match(statement, after):
            return _commit_flags(statement, after)
    if found is None:
        return 0
    return _commit_flags(statement, first)


def _commit_flags(text: str, at: int) -> int:
    """``COMMITS``, with ``COMMITS_MIDWAY`` if a statement follows the one that commits at
    ``at`` (from ``at`` on, in ``text``: up to its ``;``)."""
    end = text.find(";", at)
    while end >= 0:
        after = _after_gap(text, end + 1)
        if after == len(text):
            return COMMITS
        if text[after] != ";":
            return COMMITS | COMMITS_MIDWAY
        end = after
    return COMMITS


def _statement_starts_before(text: str, at: int) -> bool:
    """Whether only spaces and comments may stand between ``at`` and the text's start or a
    ``;`` in ``text`` (whose line ends are ``\\n``): after a comment, or first on a line after
    one that holds ``--``, it is taken as so (the text is unsure)."""
    i = at
    while i and text[i - 1] in _SPACES:
        i -= 1
    if not i or text[i - 1] == ";" or text.endswith("*/", 0, i):
        return True
    if text.find("\n", i, at) < 0:
        return False
    return text.find("--", text.rfind("\n", 0, i) + 1, i) >= 0


def _after_gap(text: str, at: int) -> int:
    """Where the spaces and comments (nested ones too; one left open runs to the end) from
    ``at`` on in ``text`` end."""
    end = len(text)
    while at < end:
        char = text[at]
        if char in _SPACES:
            at += 1
        elif text.startswith("--", at):
            line_end = _LINE_END.search(text, at)
            at = end if line_end is None else line_end.end()
        elif text.startswith("/*", at):
            depth = 0
            for mark in _COMMENT_MARK.finditer(text, at):
                depth += 1 if mark.group(0) == "/*" else -1
                if not depth:
                    at = mark.end()
                    break
            else:
                return end
        else:
            return at
    return end


# a DISCARD or DEALLOCATE that is not the text's first statement (after a ``;``, or a quote's
# or a comment's ``;`` taken for one: the connection's next COMMIT prepares its marker again)
_DEALLOCATING = re.compile(f";{_SPACE}*(?:DISCARD|DEALLOCATE)(?!{_NAME})", re.IGNORECASE)
# (a text whose comments can't be taken out surely: anywhere)
_DEALLOCATE_WORD = re.compile(f"(?<!{_NAME})(?:DISCARD|DEALLOCATE)(?!{_NAME})", re.IGNORECASE)


def _judge_kind(statement: str) -> int:
    head = statement.lstrip().lstrip("(").lstrip()[:6].upper()
    if (
        head.rstrip(";") in _CONTROL_HEADS
        # (one that sets the read mode is judged below: see _SESSION_STATE)
        or (_BEGINS.match(statement) and not _SESSION_STATE.search(statement))
    ) and ";" not in statement.strip().rstrip(";"):
        return READ_ONLY
    # (a notification first: a text that also drops the prepared marker statement makes its
    # COMMIT's EXECUTE of it fail, before anything commits, and is replayed; the function form
    # a role switch asks for needs nothing prepared)
    if _notifies(statement):
        return NOTIFIES | _writes(head, statement)
    if head in ("DISCAR", "DEALLO") or (";" in statement and _DEALLOCATING.search(statement)):
        if _SESSION_STATE.search(statement):
            return STOPS_PREPARED | _writes(head, statement)
        return DEALLOCATES | _writes(head, statement)
    if head[:5] == "SHOW " and ";" not in statement.strip().rstrip(";"):
        return READ_ONLY
    verdict = _judge_write(head, statement)
    if verdict == READ_ONLY:
        return verdict
    if _SESSION_STATE.search(statement):
        verdict = STOPS_PREPARED
    return verdict | _writes(head, statement)


# What makes a statement one that writes by its kind (see ``WRITES``): a word that names a
# writing command anywhere (a ``WITH``'s data-modifying part, a ``DO`` block's or a second
# statement's command); ``COPY`` of a table (not of a query) ``FROM``; ``WITH HOLD``.
_WRITE_WORD = re.compile(
    f"(?<!{_NAME})(?:INSERT|UPDATE|DELETE|MERGE|TRUNCATE)(?!{_NAME})",
    re.IGNORECASE,
)
# (spaces and comments between two words, as the server reads them: the comments of a text
# that keeps them, one with a ``$`` or a backslash, see _judge)
_GAP = f"(?:{_SPACE}|/\\*.*?\\*/|--[^\n\r]*)"
_WITH_HOLD = re.compile(f"(?<!{_NAME})WITH{_GAP}+HOLD(?!{_NAME})", re.IGNORECASE | re.DOTALL)
# a COPY anywhere in the text (a comment may come before it), and whether a query follows it
_COPY = re.compile(f"(?<!{_NAME})COPY(?!{_NAME}){_GAP}*(\\(?)", re.IGNORECASE | re.DOTALL)
_FROM = re.compile(f"(?<!{_NAME})FROM(?!{_NAME})", re.IGNORECASE)


def _writes(head: str, statement: str) -> int:
    """``WRITES`` when ``statement`` (which may write; ``head`` its first six characters,
    upper case) writes by its kind, else 0."""
    if _WRITE_WORD.search(statement) or _WITH_HOLD.search(statement):
        return WRITES
    if _EXECUTE.search(statement):
        return WRITES  # (a command EXECUTEd may be any: see _notifies)
    if head == "SELECT" and _INTO.search(statement):
        return WRITES  # (SELECT ... INTO makes a table)
    if _FROM.search(statement) is None:
        return 0
    # (a COPY followed by a newline, a tab or a comment is one too; COPY (query) TO reads)
    return WRITES if any(not m.group(1) for m in _COPY.finditer(statement)) else 0


def _judge_write(head: str, statement: str) -> int:
    if head != "SELECT" or _INTO.search(statement) or ";" in statement:
        return MAY_WRITE
    if "pg_catalog" in statement:
        statement = _CATALOG_CALL.sub("", statement)
    if _QUALIFIED_CALL.search(statement):
        return MAY_WRITE  # schema.function(...) or "quoted"(...)
    if _GRAMMAR_PARENS.search(statement):
        statement = _GRAMMAR_PARENS.sub(") ", statement)
    if _JOIN_PAREN.search(statement):
        statement = _JOIN_PAREN.sub(_grammar_join, statement)
    # (a name with a letter outside ASCII is never a built-in's: PostgreSQL folds only ASCII
    # letters, where Python's lower() makes the Kelvin sign a "k")
    if any(
        not (name := m.group(1)).isascii() or name.lower() not in _trusted_calls
        for m in _CALL.finditer(statement)
    ):
        return MAY_WRITE
    if not _builtin_operators_only(statement):
        return MAY_WRITE
    return READ_ONLY


# An operator calls a function: one of the database's own (``CREATE OPERATOR ##! (...,
# FUNCTION = f)``) may write as any function may. Operators named as PostgreSQL's built-in ones
# are taken as those (its own, in pg_catalog: ``SELECT DISTINCT oprname FROM pg_operator``, and
# ``!=``, which the parser reads as ``<>``); any other name may write. (An operator of your own
# under a built-in name, on a type of your own, is not seen: see the limits of commit
# verification in docs/units-of-work.md.)
_BUILTIN_OPERATORS: Final = frozenset(
    """
    !! !~ !~* !~~ !~~* # ## #- #> #>> % & && &< &<| &> * *< *<= *<> *= *> *>= + - -> ->> -|- /
    < <-> << <<= <<| <= <> <@ <^ = > >= >> >>= >^ ? ?# ?& ?- ?-| ?| ?|| @ @-@ @> @? @@ @@@ ^
    ^@ | |&> |/ |>> || ||/ ~ ~* ~<=~ ~<~ ~= ~>=~ ~>~ ~~ ~~* != =>
    """.split()  # noqa: SIM905
)
_OPERATOR_RUN = re.compile(r"[+\-*/<>=~!@#%^&|`?]+")
# what is not an operator although it is spelled with operator characters: quoted text and
# names and dollar-quoted bodies (a quote inside one opens nothing). psycopg's parameters
# (``%(name)s``, ``%s``) and its modulo (``%%``) are left as they stand: asyncpg, and psycopg
# given no parameters, send them as they are written, where ``<%s`` names an operator ``<%``
# of yours (a ``%`` before a parameter, spaced as SQLAlchemy writes them, is the built-in one)
_NOT_OPERATORS = re.compile(
    f"({_DOLLAR_QUOTE}).*?(?:\\1|\\Z)" r"|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"",
    re.DOTALL,
)
# PostgreSQL's lexer: a name of several characters can't end in + or - unless it holds one of
# these (``x=-1`` is ``=`` and ``-``)
_ENDS_IN_SIGN_OK: Final = frozenset("~!@#%^&|`?")


def _builtin_operators_only(statement: str) -> bool:
    """Whether every operator ``statement`` uses is named as a built-in one (``=>`` too: the
    named notation of a call's arguments). A statement with a backslash is not looked at (an
    ``E'...'`` string's escaped quote would hide what follows it from the scan): it may
    write."""
    if _OPERATOR_RUN.search(statement) is None:
        return True
    if "\\" in statement:
        return False
    bare = _NOT_OPERATORS.sub(" ", statement)
    for run in _OPERATOR_RUN.findall(bare):
        rest = run
        while rest:
            name = rest
            while len(name) > 1 and name[-1] in "+-" and not _ENDS_IN_SIGN_OK & set(name):
                name = name[:-1]
            if name not in _BUILTIN_OPERATORS:
                return False
            rest = rest[len(name) :]
    return True


#: the flush guard's ``do_execute`` / ``do_executemany`` listener (``guard_execute``)
StatementGuard: TypeAlias = Callable[[Any, str, Any, Any], bool]


def statement_listeners(
    sees_statements: bool, guard: StatementGuard | None
) -> dict[str, Callable[..., Any]]:
    """The dialect's ``do_execute`` family listeners of an engine (perhaps none).

    ``sees_statements``: the engine's driver connections note every statement themselves
    (the marked psycopg cursors and asyncpg classes): the engine needs a listener only for
    the flush guard (``guard``), which may send a flush's UPDATE with its compare-and-set
    itself (then True ends SQLAlchemy's chain; else False: the dialect executes the statement
    as usual).

    Otherwise (engines without the commit protocol, where it sees statements in autocommit)
    the listener also notes each of SQLAlchemy's statements: one call per statement, which
    returns at once for a SELECT (the verdict is cached by statement). The DBAPI cursor there
    may be SQLAlchemy's adapter, so the connection is reached through SQLAlchemy's public
    ``driver_connection``.
    """
    if sees_statements:
        if guard is None:
            return {}
        checked = guard

        def guard_updates(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
            if context.isupdate:
                return checked(cursor, statement, parameters, context)
            return False

        return {"do_execute": guard_updates, "do_executemany": guard_updates}

    verdicts = _verdicts

    def do_execute(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        verdict = verdicts.get(statement)
        if verdict is None:
            verdict = verdict_of(statement)
        if verdict:
            pooled = context.root_connection.connection
            driver = pooled.driver_connection
            if getattr(driver, "_rdb_marked", False):
                driver._rdb_may_write = True
                if verdict != MAY_WRITE:
                    _special_statement(verdict, driver)
            # SQLAlchemy's adapter (asyncpg), psycopg2's or pg8000's connection; a driver
            # without the attribute (sqlite3 before Python 3.12) is taken as transactional
            if getattr(pooled.dbapi_connection, "autocommit", False):
                attempt = current_attempt.get()
                if attempt is not None:
                    attempt.autocommit(context)
                    if verdict & PARTLY_IN_AUTOCOMMIT:  # (its error: marked by handle_error)
                        attempt.committed = True
            elif verdict & COMMITS:
                attempt = _committing(verdict)
                if attempt is not None:
                    attempt.autocommit(context)
        if guard is not None and context.isupdate:
            return guard(cursor, statement, parameters, context)
        return False

    def do_execute_no_params(cursor: Any, statement: str, context: Any) -> bool:
        return do_execute(cursor, statement, None, context)

    return {
        "do_execute": do_execute,
        "do_executemany": do_execute,
        "do_execute_no_params": do_execute_no_params,
    }


def _special_statement(verdict: int, driver: Any) -> None:
    """What a STOPS_PREPARED, NOTIFIES or DEALLOCATES statement, or one that ``WRITES``,
    ``KEEPS_SESSION`` or ``SETS_ISOLATION``, changes on a marked connection (the COMMITS
    flags are the noting paths' to act on)."""
    if verdict & WRITES:
        driver._rdb_writes = True  # read (and cleared) by the unit's COMMIT
    if verdict & KEEPS_SESSION:
        attempt = current_attempt.get()
        if attempt is not None:  # (dropped if the attempt fails: see KEEPS_SESSION)
            attempt.keeps(driver)
    if verdict & SETS_ISOLATION:
        isolation_unsure.add(driver)
    kind = verdict & _KIND
    if kind == STOPS_PREPARED:
        driver._rdb_prepared = None  # its COMMITs call the function from now on
    elif kind == NOTIFIES:
        driver._rdb_notifies = True  # read (and cleared) by the unit's COMMIT
    elif kind == DEALLOCATES:
        form = driver._rdb_prepared
        if form is not None:  # (the function needs nothing prepared)
            driver._rdb_prepared = form.dropped(driver)  # its next COMMIT prepares it again


def note_write(context: Any) -> None:
    """Mark the transaction of an execution context as one that may write (either driver):
    for a ``do_execute`` listener that sends a writing statement itself, which ends the chain
    before this protocol's own listener sees it."""
    driver = context.root_connection.connection.driver_connection
    if getattr(driver, "_rdb_marked", False):
        driver._rdb_may_write = True
        driver._rdb_writes = True  # (an UPDATE)


# -- psycopg: marked cursors ----------------------------------------------------------------------
_PSYCOPG_CURSORS: Final = (psycopg.Cursor, psycopg.AsyncCursor)
_cursor_classes: dict[type[Any], type[Any]] = {}
_cursor_lock = threading.Lock()
renew_after_fork(globals(), "_cursor_lock")


def note_dialect_calls(dialect: Any, name: str, note: Callable[..., None]) -> None:
    """Have ``note`` called with the arguments of every call of ``dialect.<name>``, just before
    it (the method is wrapped on this dialect instance, once per name: the engine's own).

    For what SQLAlchemy also offers as connection events (``commit``, ``prepare_twophase``,
    ``commit_twophase``): any connection event on an engine makes each of its Connections join
    the engine's event dispatch and run its hooks at every statement, begin and commit
    (measured: +285 Python lines, about 5 % of the client's time, per write unit). A dialect's
    methods are its public interface; code that replaces one should do so before the factory
    is created.
    """

    def noted(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        note(*args, **kwargs)
        return method(*args, **kwargs)

    wrap_dialect_calls(dialect, name, noted)


def wrap_dialect_calls(dialect: Any, name: str, around: Callable[..., Any]) -> None:
    """Have every call of ``dialect.<name>`` made as ``around(method, *args, **kwargs)``, where
    ``method`` is the dialect's own (wrapped on this dialect instance, once per name: a second
    factory on the engine finds it done): for what must see the call's outcome, not only its
    arguments."""
    wrapped: set[str] = dialect.__dict__.setdefault("_rdb_noted_calls", set())
    if name in wrapped:
        return
    method = getattr(dialect, name)

    def around_method(*args: Any, **kwargs: Any) -> Any:
        return around(method, *args, **kwargs)

    setattr(dialect, name, around_method)
    wrapped.add(name)


def marked_cursor_factory(factory: Any) -> Any:
    """``factory`` (a psycopg cursor class, or a function that makes cursors), making cursors
    that note their statements."""
    if getattr(factory, "_rdb_notes", False):
        return factory
    if isinstance(factory, type) and issubclass(factory, _PSYCOPG_CURSORS):
        return marked_cursor_class(factory)

    def make(*args: Any, **kwargs: Any) -> Any:
        cursor = factory(*args, **kwargs)
        if isinstance(cursor, _PSYCOPG_CURSORS) and not getattr(cursor, "_rdb_notes", False):
            cursor.__class__ = marked_cursor_class(type(cursor))  # same layout: no slots added
        return cursor

    make._rdb_notes = True  # type: ignore[attr-defined]
    return make


def marked_cursor_class(base: type[Any]) -> type[Any]:
    """A subclass of psycopg's cursor class ``base`` whose statement methods note what they
    send (``execute``, ``executemany``: awaited on an async cursor; ``stream``, ``copy``: the
    statement goes out when the result is used, so one in autocommit is taken as committed)."""
    with _cursor_lock:
        cls = _cursor_classes.get(base)
        if cls is not None:
            return cls
        sent_now = _noting_async if issubclass(base, psycopg.AsyncCursor) else _noting
        namespace: dict[str, Any] = {"__slots__": (), "__module__": __name__, "_rdb_notes": True}
        server = issubclass(base, _SERVER_CURSORS)
        for name in ("execute", "executemany"):
            # (a plain COMMIT as the connection's commit(): a client cursor's execute only)
            plain = name == "execute" and not server
            namespace[name] = sent_now(getattr(base, name), commits_plainly=plain)
        if server:
            namespace["execute"] = _holding(namespace["execute"])
        for name in ("stream", "copy"):
            if hasattr(base, name):
                namespace[name] = _noting(getattr(base, name))
        cls = type(f"Marked{base.__name__}", (base,), namespace)
        _cursor_classes[base] = cls
        return cls


_SERVER_CURSORS: Final = (psycopg.ServerCursor, psycopg.AsyncServerCursor)


def _holding(noted: Callable[..., Any]) -> Callable[..., Any]:
    """A server cursor's ``execute`` (``noted``, sync or async: its result is returned as it
    is): psycopg sends the ``DECLARE`` itself, so a cursor made ``withhold=True`` is seen here.
    Its query, unless fetched in full before, runs during COMMIT (see ``WRITES``)."""

    def execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        if self.withhold and _query_verdict(query, self):
            self.connection._rdb_writes = True
        return noted(self, query, *args, **kwargs)

    return execute


def _noting(method: Callable[..., Any], *, commits_plainly: bool = False) -> Callable[..., Any]:
    """``method`` of a marked psycopg cursor, noting what it sends; ``commits_plainly``: a
    plain ``COMMIT`` of a unit's or an operation's code goes out as the connection's own
    ``commit()`` (see :func:`_commits_as_connection`)."""
    verdicts = _verdicts

    def noted(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        verdict = verdicts.get(query) if type(query) is str else None
        if verdict is None:
            verdict = _query_verdict(query, self)
        if verdict:
            attempt = _psycopg_noted(self.connection, verdict)
            if attempt is not None:
                send = lambda: method(self, query, *args, **kwargs)  # noqa: E731
                if verdict & COMMITS:
                    if commits_plainly and _commits_as_connection(self, attempt, verdict, args):
                        self.connection.commit()  # (the marked one: see PLAIN_COMMIT)
                        return self
                    if _failed_commit(self, attempt, query):
                        send = _refused_after(send)
                return _autocommitted(attempt, self, send, verdict)
        return method(self, query, *args, **kwargs)

    return noted


def _noting_async(
    method: Callable[..., Any], *, commits_plainly: bool = False
) -> Callable[..., Any]:
    """:func:`_noting` for an async cursor's ``method``: the same steps, its sends awaited.
    A copy, not a shared helper: the verdict's lookup runs for every statement of every unit
    (one more Python call there), and the rest, for a statement that commits on its own, is
    already the shared functions it calls (:func:`_psycopg_noted`, :func:`_commits_as_connection`,
    :func:`_failed_commit`, :func:`_autocommit_failed`) between the awaits."""
    verdicts = _verdicts

    async def noted(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        verdict = verdicts.get(query) if type(query) is str else None
        if verdict is None:
            verdict = _query_verdict(query, self)
        if verdict:
            attempt = _psycopg_noted(self.connection, verdict)
            if attempt is not None:
                send = lambda: method(self, query, *args, **kwargs)  # noqa: E731
                if verdict & COMMITS:
                    if commits_plainly and _commits_as_connection(self, attempt, verdict, args):
                        await self.connection.commit()  # (the marked one: see PLAIN_COMMIT)
                        return self
                    if _failed_commit(self, attempt, query):
                        send = _refused_after_async(send)
                return await _autocommitted_async(attempt, self, send, verdict)
        return await method(self, query, *args, **kwargs)

    return noted


def _commits_as_connection(
    cursor: Any, attempt: AttemptRecord, verdict: int, args: tuple[Any, ...]
) -> bool:
    """Whether a statement that commits (``COMMITS``), sent with a psycopg cursor's
    ``execute(query, *args)`` for ``attempt``, goes out as the connection's own ``commit()``
    instead (see ``PLAIN_COMMIT``): a plain ``COMMIT`` of a unit's or an operation's code (not
    drop-in code's outside them, which keeps psycopg's behaviour), without parameters (psycopg
    refuses parameters a ``COMMIT`` has no place for), on a connection not in autocommit (one
    in autocommit sends its statements as they come, ``BEGIN`` and ``COMMIT`` included). Its
    ``commit()`` carries the marker of a unit's own COMMIT midway, as asyncpg's ``execute(
    "COMMIT")`` does; in a failed transaction it is refused (25P02), as the statement is (see
    :func:`_failed_commit`); on an idle connection it sends nothing (psycopg would begin a
    transaction to commit it at once). The cursor is returned as it was: no result of its own
    (``statusmessage`` is not ``COMMIT``)."""
    return (
        verdict & PLAIN_COMMIT != 0
        and not (args and args[0])
        and _own(attempt)
        and not cursor.connection.autocommit
    )


# -- a COMMIT statement of a failed transaction -------------------------------------------------
def failed_transaction_commit() -> psycopg.errors.InFailedSqlTransaction:
    """A COMMIT, inside a unit or a ``with_self_healing`` operation (the unit's final one, or
    one of its code's own: ``session.commit()`` midway, a drop-in block's, a ``COMMIT`` sent as
    a statement), of a transaction that failed: the code caught a database error and went on.
    The server answers ROLLBACK (psycopg takes that for done), and the unit would be reported
    done with that transaction's writes lost; raised instead (25P02). A unit's final COMMIT
    raises it before anything is sent (the unit rolls back); its code's own after the COMMIT
    ended the transaction (drop-in code's session hands its connection back without a ROLLBACK
    after a COMMIT that raised)."""
    return psycopg.errors.InFailedSqlTransaction(
        "the transaction had failed (the code caught a database error and went on), so its "
        "COMMIT rolls everything back: current transaction is aborted"
    )


def rolled_back_instead(status: Any) -> None:
    """An asyncpg COMMIT of a unit's or an operation's own code answered with ``status`` (its
    command tag): a transaction that had failed (the code caught a database error and went
    on) is answered ROLLBACK, without an error, and its writes are gone; raised as psycopg's
    is (25P02, :func:`failed_transaction_commit`), rather than let the unit go on to report
    done. The transaction is ended (rolled back) by then (``COMMIT AND CHAIN``: a new one
    begun)."""
    if status == "ROLLBACK":
        raise asyncpg.InFailedSQLTransactionError(
            "the transaction had failed (the code caught a database error and went on), so "
            "its COMMIT rolled everything back: current transaction is aborted"
        )


_INERROR: Final = int(psycopg.pq.TransactionStatus.INERROR)


def _failed_commit(cursor: Any, attempt: AttemptRecord, query: Any) -> bool:
    """Whether a text that commits (``COMMITS``), sent on a psycopg ``cursor`` by the code of
    ``attempt`` (not drop-in code outside any unit or operation, which keeps psycopg's
    behaviour), ends a failed transaction: the server will answer its COMMIT with ROLLBACK (see
    :func:`failed_transaction_commit`). Only a COMMIT statement pays for the question. A text
    whose first statement is not the COMMIT is refused by the server in a failed transaction
    (25P02), unless it is a ROLLBACK (``ROLLBACK TO SAVEPOINT``: the transaction goes on
    sound): that COMMIT is the server's to answer."""
    if not _own(attempt):
        return False
    if cursor.connection.pgconn.transaction_status != _INERROR:
        return False
    if isinstance(query, bytes):
        query = query.decode("utf-8", "replace")
    elif isinstance(query, sql.Composable):
        try:
            query = query.as_string(cursor)
        except Exception:
            return False
    if not isinstance(query, str):
        return False
    bare = _uncommented(query) if "/*" in query or "--" in query else query
    return _COMMITTING.match((query if bare is None else bare).lstrip(_SPACES + ";")) is not None


def _refused_after(send: Callable[[], Any]) -> Callable[[], Any]:
    """``send`` (a COMMIT of a failed transaction, see :func:`_failed_commit`), then 25P02: the
    COMMIT still goes out, so that it ends the transaction as a COMMIT does."""

    def refused() -> Any:
        send()
        raise failed_transaction_commit()

    return refused


def _refused_after_async(send: Callable[[], Any]) -> Callable[[], Any]:
    async def refused() -> Any:
        await send()
        raise failed_transaction_commit()

    return refused


def _own(attempt: AttemptRecord) -> bool:
    """Whether ``attempt``, what a statement that commits is sent for, is a unit's or an
    operation's (not drop-in code's outside them: see :func:`_committing`)."""
    return attempt is not _NO_ATTEMPT and attempt is not _PARTLY_COMMITTING


def _query_verdict(query: Any, context: Any) -> int:
    """The verdict of a query as psycopg takes it: a string, bytes or a ``psycopg.sql``
    composition (anything else may write)."""
    if isinstance(query, str):
        return verdict_of(query)
    if isinstance(query, bytes):
        return verdict_of(query.decode("utf-8", "replace"))
    if isinstance(query, sql.Composable):
        try:
            return verdict_of(query.as_string(context))
        except Exception:
            return MAY_WRITE
    return MAY_WRITE


def _psycopg_noted(connection: Any, verdict: int) -> AttemptRecord | None:
    """Note a statement that may write on ``connection``; the unit's attempt when it goes out
    in autocommit, or commits the transaction (see ``COMMITS``)."""
    connection._rdb_may_write = True
    if verdict == _PLAIN_WRITE:
        connection._rdb_writes = True
    elif verdict != MAY_WRITE:
        _special_statement(verdict, connection)
        if not connection.autocommit:
            return _committing(verdict) if verdict & COMMITS else None
        if verdict & PARTLY_IN_AUTOCOMMIT:
            return _committing_inside()
    if connection.autocommit:
        return current_attempt.get()
    return None


def _committing(verdict: int) -> AttemptRecord | None:
    """A statement that commits the transaction (``COMMITS``) goes out in one: the attempt of the
    unit whose code sends it, which can't be replayed after it unless the server refuses it (as
    for one sent in autocommit), or none. Not while the unit's own COMMIT is made (a two-phase
    unit's ``PREPARE TRANSACTION`` and ``COMMIT PREPARED``, sent as statements, are its commit,
    not part of its work). Text that goes on after its COMMIT makes the attempt unreplayable at
    once (``COMMITS_MIDWAY``): an error answer proves nothing of what went before it. Outside
    any attempt (drop-in use, the driver's own connection): :data:`_NO_ATTEMPT`, so that its
    lost answer is still marked an unknown outcome (see :func:`_autocommit_failed`), or for a
    ``COMMITS_MIDWAY`` text :data:`_PARTLY_COMMITTING`, so that any error of it is marked as
    that of work partly committed."""
    if committing_request() is not None:
        return None
    attempt = current_attempt.get()
    if attempt is None:
        return _PARTLY_COMMITTING if verdict & COMMITS_MIDWAY else _NO_ATTEMPT
    if verdict & COMMITS_MIDWAY:
        attempt.committed = True
        return None
    return attempt


def _committing_inside() -> AttemptRecord:
    """A statement that may commit part of its work before its error goes out in autocommit
    (``PARTLY_IN_AUTOCOMMIT``: a ``CALL``, a ``DO`` block, a ``COMMIT`` midway): the attempt
    of the unit whose code sends it can't be replayed after it, whatever the server answers
    (an error may come after a COMMIT inside it), so it is marked committed now (its error is
    then raised as that of an attempt that committed part of its work). Outside any attempt
    (drop-in use, the driver's own connection): :data:`_PARTLY_COMMITTING`, so that its error
    is marked so (``is_transient`` False: a caller told to retry would write the committed
    part again)."""
    attempt = current_attempt.get()
    if attempt is None:
        return _PARTLY_COMMITTING
    attempt.committed = True
    return attempt


class _NoAttempt:
    """What a COMMIT sent as a statement outside any attempt is sent for: nothing to record,
    only its lost answer to mark an unknown outcome (as ``session.commit()``'s is), never a
    transient error a client would be told to retry."""

    classifier = DEFAULT_CLASSIFIER

    def autocommit(self, context: Any) -> None:
        pass

    def failed(self, context: Any, exc: BaseException) -> None:
        pass


class _PartlyCommitting(_NoAttempt):
    """What a statement that may commit part of its work before it fails (see
    :func:`_committing_inside`) is sent for outside any attempt: its error, whatever it is, is
    marked as that of work partly committed."""

    def failed(self, context: Any, exc: BaseException) -> None:
        mark_partly_committed(exc)


#: (typed as attempts: they answer the calls the noting paths make of one)
_NO_ATTEMPT: Final = cast("AttemptRecord", _NoAttempt())
_PARTLY_COMMITTING: Final = cast("AttemptRecord", _PartlyCommitting())


def _autocommitted(
    attempt: AttemptRecord, token: object, send: Callable[[], Any], verdict: int
) -> Any:
    """Send a statement that commits on its own: ``attempt`` can't be replayed after it, unless
    the server answers it with an error. One that commits the transaction (``COMMITS``: a
    COMMIT sent as a statement) whose answer is lost is an unknown outcome, as a lost answer
    of ``session.commit()`` is: never a transient error."""
    attempt.autocommit(token)
    try:
        return send()
    except Exception as exc:
        _autocommit_failed(attempt, token, exc, verdict)
        raise


async def _autocommitted_async(
    attempt: AttemptRecord, token: object, send: Callable[[], Any], verdict: int
) -> Any:
    attempt.autocommit(token)
    try:
        return await send()
    except Exception as exc:
        _autocommit_failed(attempt, token, exc, verdict)
        raise


def _autocommit_failed(attempt: AttemptRecord, token: object, exc: Exception, verdict: int) -> None:
    attempt.failed(token, exc)
    if verdict & COMMITS:
        unanswered_commit(exc, attempt.classifier, wrote=True)


# -- self-healing off: a lost COMMIT answer, on the error path only -------------------------------
def sqlalchemy_commit_failed(exc: BaseException) -> bool:
    """Whether ``exc``, a driver's error that SQLAlchemy's ``handle_error`` sees with no
    statement, was raised by the COMMIT a ``Connection`` sent through its dialect (a session's
    ``commit()``, an ``engine.begin()`` block's, ``Connection.commit()``)."""
    return raised_by_commit_impl(exc)


def lost_commit_while_off(ctx: Any, classifier: Classifier) -> None:
    """Self-healing off (``SELF_HEALING_ENABLED=false``: a factory is a plain
    ``sessionmaker``) on an engine of a resilient factory: a COMMIT whose answer was lost (no
    answer from the server, or a disconnect code of ``classifier``) may have committed, so its
    error is marked an unknown outcome (``is_transient`` False, the web layer's 500
    ``commit-outcome-unknown``), as with self-healing on, where a 503 had a client write twice.
    Nothing else: no check of what became of it, no retry, no line, no counter; called by
    ``handle_error`` only, so nothing runs when no error does. Whether the transaction wrote
    is not known with self-healing off (nothing watches its statements): any such COMMIT
    counts."""
    statement = ctx.statement
    if statement is None:
        if not sqlalchemy_commit_failed(ctx.original_exception):
            return
    elif not (isinstance(statement, str) and verdict_of(statement) & COMMITS):
        return  # (text("COMMIT"), exec_driver_sql("COMMIT"), a COMMIT PREPARED: as a COMMIT)
    unanswered_commit(ctx.original_exception, classifier, wrote=True)


# -- asyncpg: the raw connection's methods --------------------------------------------------------
#: asyncpg's methods that send a query of yours now (``execute`` is the marked class's own; it
#: hands the statements that are not asyncpg's transaction commands to one of these)
_ASYNCPG_SENDING: Final = (
    "execute",
    "executemany",
    "fetch",
    "fetchrow",
    "fetchval",
    "fetchmany",
    "copy_from_query",
)
_ASYNCPG_WRITING: Final = ("copy_to_table", "copy_records_to_table")  # (a table, not a query)


def asyncpg_statement_methods(base: type[Any]) -> dict[str, Callable[..., Any]]:
    """The overrides of a marked asyncpg connection class (``base`` its driver class) that note
    the statements sent on the raw connection; ``execute`` is for the class to call.

    SQLAlchemy's own statements pass here too: it calls ``executemany``, and ``prepare`` for
    a statement it has not prepared on the connection before. A statement that may write,
    once prepared, notes each of its executions (:func:`_noting_statement_class`), in
    whichever transaction it runs; a ``cursor()`` is noted when it is made (it runs in the
    transaction it is made in).
    """
    methods: dict[str, Callable[..., Any]] = {}
    prepare = base.prepare
    for name in _ASYNCPG_SENDING:
        tag = _tagged_by_statement(prepare, name) if name in _ASYNCPG_UNTAGGED else None
        methods[name] = _asyncpg_noting(getattr(base, name), answers=name == "execute", tag=tag)
    for name in _ASYNCPG_WRITING:
        methods[name] = _asyncpg_noting(getattr(base, name), writes=True)

    async def prepared(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        statement = await prepare(self, query, *args, **kwargs)
        verdict = _query_verdict(query, None)
        if verdict:
            statement.__class__ = _noting_statement_class(type(statement), verdict)
        return statement

    cursor = base.cursor

    def cursor_of(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        _asyncpg_noted(self, _query_verdict(query, None), lazy=True)
        return cursor(self, query, *args, **kwargs)

    methods.update(prepare=prepared, cursor=cursor_of)
    return methods


#: asyncpg's methods that return rows, not the command tag that tells a COMMIT of a failed
#: transaction (answered ROLLBACK, see :func:`rolled_back_instead`)
_ASYNCPG_UNTAGGED: Final = ("fetch", "fetchrow", "fetchval", "fetchmany")


def _tagged_by_statement(prepare: Callable[..., Any], name: str) -> Callable[..., Any]:
    """How asyncpg's ``name`` (one of :data:`_ASYNCPG_UNTAGGED`) sends a COMMIT of a unit's or
    an operation's own code so that its answer is read: through a statement prepared for it
    (``prepare``, the driver class's own), whose ``get_statusmsg()`` is the command tag, then
    its method of that name. One round trip more (the prepare), for such a COMMIT only: the
    connection's own method returns no tag, and a COMMIT of a failed transaction, answered
    ROLLBACK, was taken for done, the unit going on to report done with its writes lost."""

    async def send(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        timeout = kwargs.pop("timeout", None)
        record_class = kwargs.pop("record_class", None)
        statement = await prepare(self, query, timeout=timeout, record_class=record_class)
        if name != "fetchmany":
            result = await getattr(statement, name)(*args, timeout=timeout, **kwargs)
            rolled_back_instead(statement.get_statusmsg())
            return result
        # (a statement's fetchmany keeps no tag: each set of arguments executed by fetch)
        rows: list[Any] = []
        for arguments in args[0] if args else kwargs.get("args", ()):
            rows.extend(await statement.fetch(*arguments, timeout=timeout))
            rolled_back_instead(statement.get_statusmsg())
        return rows

    return send


def _asyncpg_noting(
    method: Callable[..., Any],
    *,
    writes: bool = False,
    answers: bool = False,
    tag: Callable[..., Any] | None = None,
) -> Callable[..., Any]:
    """``method`` of the raw asyncpg connection, noting what it sends; ``answers``: it returns
    the statement's command tag (``execute``), which tells a COMMIT of a failed transaction
    (see :func:`rolled_back_instead`); ``tag``: how a COMMIT is sent to read that tag when
    ``method`` returns rows (see :func:`_tagged_by_statement`)."""

    async def noted(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        verdict = MAY_WRITE | WRITES if writes else _query_verdict(query, None)
        attempt = _asyncpg_noted(self, verdict) if verdict else None
        if attempt is None:
            return await method(self, query, *args, **kwargs)
        token = object()
        send = lambda: method(self, query, *args, **kwargs)  # noqa: E731
        if answers and verdict & COMMITS and _own(attempt):

            async def send_checked() -> Any:
                status = await method(self, query, *args, **kwargs)
                rolled_back_instead(status)  # (the last statement's tag: the COMMIT's)
                return status

            send = send_checked
        elif tag is not None and verdict & COMMITS and _own(attempt):
            send = lambda: tag(self, query, *args, **kwargs)  # noqa: E731
        return await _autocommitted_async(attempt, token, send, verdict)

    return noted


#: an asyncpg prepared statement's methods that execute it
_STATEMENT_SENDING: Final = ("fetch", "fetchrow", "fetchval", "fetchmany", "executemany")
_statement_classes: dict[tuple[type[Any], int], type[Any]] = {}


def _noting_statement_class(base: type[Any], verdict: int) -> type[Any]:
    """A subclass of asyncpg's prepared statement class ``base`` for a statement of
    ``verdict`` (one that may write): each execution is noted on the statement's connection.
    No slots of its own, so a statement asyncpg made switches to it."""
    with _cursor_lock:
        cls = _statement_classes.get((base, verdict))
        if cls is not None:
            return cls
        namespace: dict[str, Any] = {"__slots__": (), "__module__": __name__}
        for name in _STATEMENT_SENDING:
            namespace[name] = _statement_noting(getattr(base, name), verdict)
        cursor = base.cursor

        def cursor_of(self: Any, *args: Any, **kwargs: Any) -> Any:
            _asyncpg_noted(statement_connection(self), verdict, lazy=True)
            return cursor(self, *args, **kwargs)

        namespace["cursor"] = cursor_of
        cls = type(f"Noting{base.__name__}", (base,), namespace)
        _statement_classes[(base, verdict)] = cls
        return cls


def _statement_noting(method: Callable[..., Any], verdict: int) -> Callable[..., Any]:
    async def noted(self: Any, *args: Any, **kwargs: Any) -> Any:
        attempt = _asyncpg_noted(statement_connection(self), verdict)
        if attempt is None:
            return await method(self, *args, **kwargs)
        token = object()
        send = lambda: method(self, *args, **kwargs)  # noqa: E731
        if verdict & COMMITS and _own(attempt):

            async def send_checked() -> Any:
                result = await method(self, *args, **kwargs)
                rolled_back_instead(self.get_statusmsg())  # (SQLAlchemy's COMMIT statement)
                return result

            send = send_checked
        return await _autocommitted_async(attempt, token, send, verdict)

    return noted


def _asyncpg_noted(connection: Any, verdict: int, *, lazy: bool = False) -> AttemptRecord | None:
    """Note a statement that may write on a marked asyncpg ``connection``; the unit's attempt
    when it goes out in autocommit (outside a transaction), or commits the transaction (see
    ``COMMITS``). ``lazy``: the statement runs later (a cursor); one in autocommit is taken as
    committed."""
    if not verdict:
        return None
    connection._rdb_may_write = True
    if verdict == _PLAIN_WRITE:
        connection._rdb_writes = True
    elif verdict != MAY_WRITE:
        _special_statement(verdict, connection)
    if not connection.is_in_transaction():
        partly = verdict & PARTLY_IN_AUTOCOMMIT
        attempt = _committing_inside() if partly else current_attempt.get()
    elif verdict & COMMITS:
        attempt = _committing(verdict)
    else:
        return None
    if attempt is None:
        return None
    if lazy:
        attempt.autocommit(object())
        return None
    return attempt
