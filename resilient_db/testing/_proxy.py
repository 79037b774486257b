"""A fault-injecting TCP proxy for PostgreSQL connections.

:class:`FaultProxy` listens on a loopback port and forwards every connection to a server. One
background thread runs a selector loop that owns all sockets; tests flip faults from any thread
and each call returns once the loop has applied it:

* :meth:`~FaultProxy.refuse` / :meth:`~FaultProxy.restore`: stop listening (connection refused),
  listen again on the same port;
* :meth:`~FaultProxy.cut_all`: reset every open connection (RST, both sides);
* :meth:`~FaultProxy.blackhole`: accept and read, forward nothing, until restored (held bytes are
  then delivered, like a healed network partition);
* :meth:`~FaultProxy.latency`: delay every forwarded chunk;
* :meth:`~FaultProxy.lose_commit_answer`: let a ``COMMIT`` reach the server, swallow its answer
  and reset the client: the transaction committed but the client never heard.
* :meth:`~FaultProxy.swallow_commit`: the ``COMMIT`` never reaches the server and its answer never
  comes; the client waits until :meth:`~FaultProxy.release_swallowed` (or a cut) resets it.
  :meth:`~FaultProxy.deliver_late_commits` can hand the held ``COMMIT`` to the server afterwards,
  as a network that delayed it would.

A ``COMMIT`` is a simple-query message whose last statement is ``COMMIT`` or ``END``, alone or
after others (``SELECT f(); COMMIT``), comments and quoted text skipped; or, in the extended
protocol (asyncpg, pg8000, a prepared statement), the Bind of a statement parsed from such a
text (named, or the unnamed one) up to the Sync that ends its group: its answer is everything up
to that Sync's ReadyForQuery.

The client->server direction is parsed with PostgreSQL's framing (untyped startup messages, then
typed messages) and so is the server->client direction (to find the ``ReadyForQuery`` that
answers a ``COMMIT``). SSL/GSS encryption requests answered ``N`` pass through; an encrypted
session is forwarded opaquely (its ``COMMIT`` can't be seen).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import math
import os
import queue
import re
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeVar, cast

from ._server import (
    PostgresServer,
    _check_flag,
    _check_port,
    _check_seconds,
    _is_socket_dir,
    free_port,
)

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["FaultProxy"]

log = logging.getLogger("resilient_db.testing.proxy")

_T = TypeVar("_T")

_SSL_REQUEST: Final = 80877103
_GSSENC_REQUEST: Final = 80877104
_CANCEL_REQUEST: Final = 80877102
_UNTYPED_KINDS: Final = {_SSL_REQUEST: b"ssl", _GSSENC_REQUEST: b"gss", _CANCEL_REQUEST: b"cancel"}
#: messages longer than this are streamed through instead of being buffered whole
_STREAM_THRESHOLD: Final = 64 * 1024
#: except the client's simple queries up to this length (PostgreSQL's own limit for one): a
#: query is a COMMIT by its last statement, which only the whole text tells (its tail alone may
#: sit inside a string literal or a comment), and a swallowed COMMIT must not reach the server
_QUERY_LIMIT: Final = (1 << 30) - 1
#: stop reading a side while this many bytes wait to be forwarded from it
_BACKLOG_LIMIT: Final = 4 * 1024 * 1024
_RECV_SIZE: Final = 256 * 1024
#: the loop wakes at least this often (stop flag, connect deadlines)
_MAX_WAIT: Final = 0.25
_CALL_TIMEOUT: Final = 10.0
_COMMIT_RE: Final = re.compile(r"(COMMIT|END)\b", re.IGNORECASE)
_DOLLAR_TAG_RE: Final = re.compile(r"\$(?:[^\W\d]\w*)?\$")
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
#: messages that the server answers with exactly one ReadyForQuery
_SYNC_POINTS: Final = frozenset({b"Q", b"S", b"F"})
#: the client's messages whose bodies the proxy reads: Query, Parse, Bind, Close
_CLIENT_BODIES: Final = frozenset({b"Q", b"P", b"B", b"C"})


class _Msg(NamedTuple):
    """A complete protocol message: its type byte (or a pseudo type) and, for the client's
    ``Q``, ``P``, ``B`` and ``C`` (Query, Parse, Bind, Close), its body."""

    kind: bytes
    body: bytes = b""


class _Splitter:
    """Cuts one direction of a PostgreSQL connection at message boundaries.

    :meth:`feed` returns ``(chunk, message)`` pairs; ``message`` is set when ``chunk`` ends a
    complete message. Small messages are returned whole, large ones stream through in pieces,
    but for the client's simple queries, which are always returned whole (their text is read).
    """

    def __init__(self, *, client_side: bool) -> None:
        self._buf = bytearray()
        self._untyped = client_side  # client side: untyped startup-phase messages first
        self._first = client_side
        self._stream_left = 0
        self._stream_kind = b""
        self._bodies = _CLIENT_BODIES if client_side else frozenset()
        self.opaque = False
        #: one-byte answers the server owes to SSLRequest / GSSENCRequest
        self.pending_answers = 0

    def feed(self, data: bytes) -> list[tuple[bytes, _Msg | None]]:
        if self.opaque:
            return [(data, None)]
        buf = self._buf
        buf += data
        out: list[tuple[bytes, _Msg | None]] = []
        pos, end = 0, len(buf)
        while pos < end and not self.opaque:
            if self._stream_left:
                n = min(self._stream_left, end - pos)
                self._stream_left -= n
                done = _Msg(self._stream_kind) if not self._stream_left else None
                out.append((bytes(buf[pos : pos + n]), done))
                pos += n
                continue
            if self.pending_answers:
                answer = bytes(buf[pos : pos + 1])
                if answer in (b"N", b"S", b"G"):
                    self.pending_answers -= 1
                    pos += 1
                    out.append((answer, _Msg(b"answer", answer)))
                    if answer != b"N":
                        self.opaque = True  # encrypted from here on
                    continue
                self.pending_answers = 0  # e.g. an ErrorResponse from an old server
            if self._first:
                self._first = False
                if buf[pos] == 0x16:  # a TLS ClientHello: direct SSL negotiation
                    self.opaque = True
                    break
            if self._untyped:
                if end - pos < 8:
                    break
                length = int.from_bytes(buf[pos : pos + 4], "big")
                if not 8 <= length <= 10_000:
                    self.opaque = True
                    break
                if end - pos < length:
                    break
                code = int.from_bytes(buf[pos + 4 : pos + 8], "big")
                kind = _UNTYPED_KINDS.get(code, b"startup")
                if kind == b"startup":
                    self._untyped = False
                out.append((bytes(buf[pos : pos + length]), _Msg(kind)))
                pos += length
                continue
            if end - pos < 5:
                break
            kind = bytes(buf[pos : pos + 1])
            length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
            if length < 4:
                self.opaque = True
                break
            total = 1 + length
            if end - pos >= total:
                body = bytes(buf[pos + 5 : pos + total]) if kind in self._bodies else b""
                out.append((bytes(buf[pos : pos + total]), _Msg(kind, body)))
                pos += total
            elif total > _STREAM_THRESHOLD and not (
                kind == b"Q" and self._bodies and total <= _QUERY_LIMIT
            ):
                out.append((bytes(buf[pos:end]), None))
                self._stream_left = total - (end - pos)
                self._stream_kind = kind
                pos = end
            else:
                break
        if self.opaque and pos < end:
            out.append((bytes(buf[pos:end]), None))
            pos = end
        del buf[:pos]
        return out


def _is_commit(body: bytes) -> bool:
    """Whether a simple query's last statement is ``COMMIT`` / ``END`` (ends the transaction)."""
    text = body.rstrip(b"\0").decode("utf-8", "replace")
    return _COMMIT_RE.match(_last_statement(text)) is not None


def _runs_commit(conn: _Conn, msg: _Msg, *, armed: bool) -> bool:
    """Whether the client's message ``msg`` runs a COMMIT (when a fault is ``armed``; its
    statements are noted either way): a simple query ending with one, or the Bind of a
    prepared COMMIT (then noted until the group's Sync, in ``conn.commit_bound``)."""
    kind = msg.kind
    if kind == b"Q":
        conn.statements.pop(b"", None)  # a simple query ends the unnamed statement
        return armed and _is_commit(msg.body)
    if kind == b"P":  # Parse: name, text (a message streamed through has no body: unnamed)
        name, *query = _cstrings(msg.body, 2)
        conn.statements[name] = query[0] if query else b""
    elif kind == b"C" and msg.body[:1] == b"S":  # Close of a statement
        conn.statements.pop(_cstrings(msg.body[1:], 1)[0], None)
    elif kind == b"B" and armed:  # Bind: portal, statement
        names = _cstrings(msg.body, 2)
        bound = conn.statements.get(names[1]) if len(names) == 2 else None
        if bound is not None and _is_commit(bound):
            conn.commit_bound = True
            return True
    return False


def _cstrings(body: bytes, count: int) -> list[bytes]:
    """The first ``count`` NUL-terminated strings of a message body (fewer if it has fewer)."""
    return body.split(b"\0", count)[:count]


def _is_ident_char(char: str) -> bool:
    return char.isalnum() or char in "_$"


def _last_statement(text: str) -> str:
    """The last non-empty statement of a simple-query string, stripped.

    Statements are split at ``;`` outside string literals (``'...'``, ``E'...'`` with backslash
    escapes, dollar quotes), quoted identifiers and comments (``--``, nested ``/* */``), which
    are skipped; a comment becomes a space.
    """
    statements: list[str] = []
    current: list[str] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char == ";":
            statements.append("".join(current))
            current = []
            i += 1
        elif text.startswith("--", i):
            newline = text.find("\n", i)
            i = n if newline < 0 else newline
            current.append(" ")
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            current.append(" ")
        elif char in "'\"":
            backslashes = (
                char == "'"
                and i > 0
                and text[i - 1] in "eE"
                and (i < 2 or not _is_ident_char(text[i - 2]))
            )
            j = i + 1
            while j < n:
                if backslashes and text[j] == "\\":
                    j += 2
                elif text[j] != char:
                    j += 1
                elif text.startswith(char * 2, j):
                    j += 2
                else:
                    break
            current.append(text[i : j + 1])
            i = j + 1
        elif char == "$" and (i == 0 or not _is_ident_char(text[i - 1])):
            tag = _DOLLAR_TAG_RE.match(text, i)
            if tag is None:
                current.append(char)
                i += 1
                continue
            close = text.find(tag.group(), tag.end())
            j = n if close < 0 else close + len(tag.group())
            current.append(text[i:j])
            i = j
        else:
            current.append(char)
            i += 1
    statements.append("".join(current))
    for statement in reversed(statements):
        if statement.strip():
            return statement.strip()
    return ""


class _Pipe:
    """Bytes travelling one way: delayed chunks (latency), then bytes ready to send."""

    def __init__(self) -> None:
        self.delayed: collections.deque[tuple[float, bytes]] = collections.deque()
        self.ready = bytearray()
        #: how the source side ended: None (open), "fin" or "rst"; passed on once drained
        self.end: str | None = None
        self.end_due = 0.0  # monotonic time before which the end is not passed on (delay_closes)
        self.shut = False  # FIN sent to the target

    def size(self) -> int:
        return len(self.ready) + sum(len(chunk) for _, chunk in self.delayed)

    def drained(self) -> bool:
        return not self.ready and not self.delayed


class _Conn:
    """One proxied connection: a client socket and (once connected) a server socket."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.server: socket.socket | None = None
        self.connected = False
        self.connect_deadline = 0.0
        self.to_server = _Pipe()
        self.to_client = _Pipe()
        self.client_parser = _Splitter(client_side=True)
        self.server_parser = _Splitter(client_side=False)
        self.syncs_sent = 0  # messages that each get one ReadyForQuery
        self.answers_seen = 0  # ReadyForQuery messages received
        self.lose_target: int | None = None  # answers_seen value that ends the lost COMMIT answer
        #: prepared statements' texts by name (extended protocol; b"" is the unnamed one)
        self.statements: dict[bytes, bytes] = {}
        self.commit_bound = False  # a COMMIT statement was bound since the last Sync
        self.reset_when_flushed = False
        # swallow_commit: the COMMIT and everything after it are held here, never forwarded
        self.swallowed = False
        self.swallow_sync = 0  # syncs_sent value of the swallowed COMMIT
        self.held = bytearray()
        self.client_gone = False  # release_swallowed(keep_server=True) reset the client only
        self.server_gone = False  # the server closed its side while the COMMIT was held
        self.delivering = False  # deliver_late_commits() sent the held bytes
        self.client_events = 0
        self.server_events = 0
        self.closed = False


def _count(name: str, value: object) -> int:
    """``value`` if it is a whole number >= 0 (a count of COMMITs), else TypeError/ValueError."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be a whole number of COMMITs, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _seconds(name: str, value: object) -> float:
    """``value`` as seconds if it is a finite number >= 0, else TypeError/ValueError."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    try:
        seconds = float(value)
    except OverflowError:  # (an int past a float's range)
        seconds = math.inf
    if not (math.isfinite(seconds) and seconds >= 0):
        # (a whole number of hundreds of digits said by its length)
        shown = repr(value) if len(repr(value)) <= 30 else f"{len(str(value))} digits"
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {shown}")
    return seconds


def _errno_text(code: int) -> str:
    """``ECONNREFUSED: Connection refused`` for an errno."""
    return f"{errno.errorcode.get(code, code)}: {os.strerror(code)}"


def _check_upstream(upstream: object) -> PostgresServer | tuple[str, int]:
    """``upstream`` as :class:`FaultProxy` keeps it, or :class:`TypeError` / :class:`ValueError`
    saying what it takes: a mistake fails at once, not as the loop's error at the first
    connection."""
    if isinstance(upstream, PostgresServer):
        return upstream
    forms = "a PostgresServer or a (host, port) pair such as ('127.0.0.1', 5432)"
    if not isinstance(upstream, (tuple, list)) or len(upstream) != 2:
        raise TypeError(f"upstream must be {forms}, got {upstream!r}")
    host, port = upstream
    if not isinstance(host, str) or not host:
        raise TypeError(f"upstream's host must be a non-empty str ({forms}), got {host!r}")
    try:
        return host, _check_port(port)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"upstream's {exc} ({forms})") from None


def _check_listen_host(host: object) -> str:
    """``host`` if the proxy can listen there (an IPv4 address, or a name that resolves to
    one: its listening socket is IPv4), else :class:`TypeError` / :class:`ValueError` saying
    so."""
    if not isinstance(host, str) or not host:
        raise TypeError(f"host must be a non-empty str (an IPv4 address), got {host!r}")
    try:
        socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise ValueError(
            f"host must be an IPv4 address (or a name that resolves to one: the fault proxy "
            f"listens on IPv4 only), got {host!r}"
        ) from None
    return host


class FaultProxy:
    """Loopback TCP proxy in front of a PostgreSQL server, with switchable faults.

    ``upstream`` is a :class:`PostgresServer` (its current host and port are used for every new
    connection; :meth:`url` reuses its credentials) or a ``(host, port)`` pair; a host that is
    a unix socket's directory is reached through that socket; anything else (a ``"host:port"``
    string, a port given as text) raises :class:`TypeError` or :class:`ValueError` at once.
    The proxy listens on ``host`` (127.0.0.1; an IPv4 address, or a name resolving to one)
    and ``port`` (None or 0: a free one, which :attr:`port` and :meth:`url` name) as soon as it
    is created; a ``host`` or ``port`` it can't take raises :class:`TypeError` or
    :class:`ValueError` naming it, one it can't listen on :class:`OSError` naming the address;
    :meth:`close` (or leaving the ``with`` block) stops it and joins its thread.

    All fault methods are thread-safe and take effect before they return.
    """

    def __init__(
        self,
        upstream: PostgresServer | tuple[str, int],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        self._upstream = _check_upstream(upstream)
        self._host = _check_listen_host(host)
        # 0, as for a socket (and EmbeddedPostgres): a free port, the one port and url() name
        self._port = (0 if port is None else _check_port(port, free=True)) or free_port(host)
        self._connect_timeout = _check_seconds("connect_timeout", connect_timeout, zero=False)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]]
        self._calls = queue.SimpleQueue()
        self._conns: set[_Conn] = set()
        self._listener: socket.socket | None = None
        # fault state: read and written by the loop thread only
        self._refusing = False
        self._blackholed = False
        self._latency = 0.0
        self._close_delay = 0.0
        self._lose_commits = 0
        self._swallow_commits = 0
        # counters: written by the loop thread, read anywhere
        self._accepted = 0
        self._commits_lost = 0
        self._commits_swallowed = 0
        self._active = 0
        self._stopping = False
        self._closed = False
        #: the last connect to the upstream failed (loop thread only): said once per outage
        self._upstream_down = False
        try:
            self._listen()
            self._sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        except BaseException:
            self._release_sockets()
            self._sel.close()
            raise
        self._thread = threading.Thread(
            target=self._run, name=f"resilient_db-fault-proxy-{self._port}", daemon=True
        )
        self._thread.start()

    def __repr__(self) -> str:
        try:
            upstream = "{}:{}".format(*self._upstream_address())
        except RuntimeError:  # a server not started yet has no port
            upstream = f"{type(self._upstream).__name__} (not started)"
        state = "closed" if self._closed else self.mode
        return f"<FaultProxy {self._host}:{self._port} -> {upstream} {state}>"

    # ---- addressing ------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """Address the proxy listens on."""
        return self._host

    @property
    def port(self) -> int:
        """Port the proxy listens on (kept across :meth:`refuse` / :meth:`restore`)."""
        return self._port

    def url(self, database: str | None = None, *, driver: str = "psycopg") -> str:
        """SQLAlchemy URL for ``database`` through the proxy (see :meth:`PostgresServer.url`)."""
        if isinstance(self._upstream, PostgresServer):
            return self._upstream.url_at(self._host, self._port, database, driver=driver)
        drivername = f"postgresql+{driver}" if driver else "postgresql"
        return f"{drivername}://postgres@{self._host}:{self._port}/{database or 'postgres'}"

    # ---- counters --------------------------------------------------------------------------------

    @property
    def connections_accepted(self) -> int:
        """Client connections accepted since the proxy started."""
        return self._accepted

    @property
    def commits_lost(self) -> int:
        """COMMIT answers swallowed by :meth:`lose_commit_answer`."""
        return self._commits_lost

    @property
    def commits_swallowed(self) -> int:
        """COMMITs held back by :meth:`swallow_commit` (never forwarded, or only late)."""
        return self._commits_swallowed

    @property
    def active_connections(self) -> int:
        """Client connections currently open through the proxy."""
        return self._active

    @property
    def mode(self) -> str:
        """``"refuse"``, ``"blackhole"``, ``"latency"`` or ``"passthrough"`` (a snapshot)."""
        if self._refusing:
            return "refuse"
        if self._blackholed:
            return "blackhole"
        if self._latency > 0:
            return "latency"
        return "passthrough"

    # ---- faults ----------------------------------------------------------------------------------

    def restore(self) -> None:
        """Back to normal: listen again, deliver held bytes, no latency, no lost commits.

        Faults armed by :meth:`lose_commit_answer` and :meth:`swallow_commit` are disarmed; a
        connection whose COMMIT was already swallowed stays held (see :meth:`release_swallowed`).
        """

        def apply() -> None:
            self._blackholed = False
            self._latency = 0.0
            self._close_delay = 0.0
            self._lose_commits = 0
            self._swallow_commits = 0
            for conn in self._conns:
                for pipe in (conn.to_server, conn.to_client):
                    pipe.delayed = collections.deque((0.0, chunk) for _, chunk in pipe.delayed)
                    pipe.end_due = 0.0
            if self._refusing:
                self._listen()
                self._refusing = False

        self._call(apply)

    def passthrough(self) -> None:
        """Forward everything unchanged (the default); same as :meth:`restore`."""
        self.restore()

    def refuse(self, *, cut: bool = False) -> None:
        """Stop listening: new connections are refused (ECONNREFUSED) until :meth:`restore`.

        Open connections keep working (a connection pool may keep using them) unless ``cut``
        is true: then they are reset too, as by :meth:`cut_all` - a full outage.
        """
        _check_flag("cut", cut)

        def apply() -> None:
            if self._listener is not None:
                self._sel.unregister(self._listener)
                self._listener.close()
                self._listener = None
            self._refusing = True
            if cut:
                for conn in list(self._conns):
                    self._abort(conn)

        self._call(apply)

    def cut_all(self) -> int:
        """Reset (RST) every open client and server connection; return how many were cut."""

        def apply() -> int:
            conns = list(self._conns)
            for conn in conns:
                self._abort(conn)
            return len(conns)

        return self._call(apply)

    def blackhole(self) -> None:
        """Accept and read but forward nothing, either way, until :meth:`restore`."""

        def apply() -> None:
            self._blackholed = True

        self._call(apply)

    def latency(self, seconds: float) -> None:
        """Delay every chunk forwarded from now on by ``seconds`` (a finite number >= 0, each
        direction)."""
        delay = _seconds("latency", seconds)

        def apply() -> None:
            self._latency = delay

        self._call(apply)

    def delay_closes(self, seconds: float) -> None:
        """From now on, pass on a server's end of a connection (its FIN or reset) to the client
        ``seconds`` after the last bytes before it (a finite number >= 0), until :meth:`restore`.

        A server that ends a session (a terminated backend, a shutdown) sends a FATAL error
        message, then closes the socket; a client may read the two at different moments. This
        holds them apart: the client has the message and a connection that still looks open.
        What the client sends meanwhile goes to the closed server, which resets it.
        :attr:`closes_delayed` counts the connections whose end is held now.
        """
        delay = _seconds("delay", seconds)

        def apply() -> None:
            self._close_delay = delay

        self._call(apply)

    @property
    def closes_delayed(self) -> int:
        """Connections whose server has ended them, all of whose bytes the client has been
        sent, and whose end :meth:`delay_closes` holds back now."""

        def apply() -> int:
            now = time.monotonic()
            return sum(
                1
                for conn in self._conns
                if not conn.closed
                and conn.to_client.end is not None
                and conn.to_client.drained()
                and not conn.to_client.shut
                and conn.to_client.end_due > now
            )

        return self._call(apply)

    def lose_commit_answer(self, times: int = 1) -> None:
        """Lose the answer of the next ``times`` COMMITs.

        A ``COMMIT`` (or ``END``; a simple query, or a prepared statement's Bind up to its
        Sync) is forwarded; the server's whole answer up to its ReadyForQuery is discarded,
        then the client connection is reset. The server
        committed; the client sees a disconnect. Counted in :attr:`commits_lost`.
        ``times`` is a whole number >= 0.
        """
        count = _count("times", times)

        def apply() -> None:
            self._lose_commits = count

        self._call(apply)

    def swallow_commit(self, times: int = 1) -> None:
        """Swallow the next ``times`` COMMITs: they never reach the server.

        The COMMIT message is not forwarded, nor anything the client sends after it on that
        connection, and no answer comes: the client waits (its transaction stays open on the
        server) until :meth:`release_swallowed`, :meth:`cut_all` or ``refuse(cut=True)`` resets
        the connection. Answers the server still owed for earlier messages are delivered; after
        them nothing from the server reaches the client, not even the error a dying backend sends,
        and a server that goes away (crash) does not end the client's wait. Takes precedence over
        :meth:`lose_commit_answer` when both are armed. Counted in :attr:`commits_swallowed`.
        ``times`` is a whole number >= 0.
        """
        count = _count("times", times)

        def apply() -> None:
            self._swallow_commits = count

        self._call(apply)

    def release_swallowed(self, *, keep_server: bool = False) -> int:
        """Reset (RST) every client waiting on a swallowed COMMIT; return how many.

        The server side is reset as well: the backend rolls the transaction back, if it is still
        there. With ``keep_server`` it stays open instead, the transaction idle on the server
        with its COMMIT held, until :meth:`deliver_late_commits` sends it (a COMMIT that arrives
        after the client gave up) or a cut resets it.
        """
        _check_flag("keep_server", keep_server)

        def apply() -> int:
            held = [conn for conn in self._conns if conn.swallowed and not conn.client_gone]
            for conn in held:
                if keep_server and not conn.server_gone:
                    self._drop_client(conn)
                else:
                    self._abort(conn)
            return len(held)

        return self._call(apply)

    def deliver_late_commits(self) -> int:
        """Forward the held COMMITs of clients released with ``keep_server``; return how many.

        The server gets the COMMIT (and whatever the client sent after it) now; its answer is
        discarded and the server connection is reset once it has answered.
        """

        def apply() -> int:
            late = [c for c in self._conns if c.client_gone and not c.delivering]
            for conn in late:
                conn.delivering = True
                self._enqueue(conn.to_server, bytes(conn.held))
                conn.held.clear()
            return len(late)

        return self._call(apply)

    # ---- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the proxy: reset open connections, stop listening, join the thread."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake()
        self._thread.join(timeout=_CALL_TIMEOUT)
        if self._thread.is_alive():  # pragma: no cover - the loop wakes every _MAX_WAIT
            log.error("%r: loop thread did not stop", self)
        self._sel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- loop plumbing ---------------------------------------------------------------------------

    def _call(self, fn: Callable[[], _T]) -> _T:
        if threading.current_thread() is self._thread:
            return fn()
        if self._closed or not self._thread.is_alive():
            raise RuntimeError(f"fault proxy {self._host}:{self._port} is closed")
        future: Future[Any] = Future()
        self._calls.put((fn, future))
        self._wake()
        return cast(_T, future.result(timeout=_CALL_TIMEOUT))

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _on_wake(self, _mask: int) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def _upstream_address(self) -> tuple[str, int]:
        if isinstance(self._upstream, PostgresServer):
            return self._upstream.host, self._upstream.port
        return self._upstream

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind((self._host, self._port))
            except OSError as exc:  # "[Errno 98] Address already in use" did not say which
                raise OSError(
                    exc.errno,
                    f"{exc.strerror}: the fault proxy can't listen on {self._host}:{self._port}",
                ) from exc
            listener.listen(128)
            listener.setblocking(False)
            self._sel.register(listener, selectors.EVENT_READ, self._on_accept)
        except BaseException:
            listener.close()
            raise
        self._listener = listener

    def _run(self) -> None:
        try:
            while not self._stopping:
                for key, mask in self._sel.select(self._wait_time()):
                    handler: Callable[[int], None] = key.data
                    try:
                        handler(mask)
                    except Exception:  # one broken connection must not stop the proxy
                        log.exception("%r: error in the proxy loop", self)
                self._pump()
        finally:
            for conn in list(self._conns):
                self._abort(conn)
            self._release_sockets()
            while True:  # fail calls that raced with close()
                try:
                    _, future = self._calls.get_nowait()
                except queue.Empty:
                    break
                future.set_exception(
                    RuntimeError(f"fault proxy {self._host}:{self._port} is closed")
                )

    def _release_sockets(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self._wake_r)
        self._wake_r.close()
        self._wake_w.close()

    def _wait_time(self) -> float:
        wait = _MAX_WAIT
        if self._blackholed:
            return wait
        now = time.monotonic()
        for conn in self._conns:
            for pipe in (conn.to_server, conn.to_client):
                if pipe.delayed:
                    wait = min(wait, max(0.0, pipe.delayed[0][0] - now))
                if pipe.end is not None and not pipe.shut and pipe.end_due > now:
                    wait = min(wait, pipe.end_due - now)
        return wait

    # ---- connections -----------------------------------------------------------------------------

    def _on_accept(self, _mask: int) -> None:
        listener = self._listener
        for _ in range(64):
            if listener is None:
                return
            try:
                client, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: leave it in the backlog for now
                log.warning("%r: accept failed: %s", self, exc)
                return
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(client)
            self._conns.add(conn)
            self._accepted += 1
            self._active += 1
            self._set_events(conn, client, selectors.EVENT_READ)

    def _connect_upstream(self, conn: _Conn) -> None:
        try:
            host, port = self._upstream_address()
        except Exception as exc:  # e.g. the upstream server was never started
            log.warning("%r: no upstream address: %s", self, exc)
            self._abort(conn)
            return
        address: str | tuple[str, int] = (host, port)
        if _is_socket_dir(host):  # the server's unix socket, named as libpq names it
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address = os.path.join(host, f".s.PGSQL.{port}")
        else:
            server = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server.setblocking(False)
        conn.server = server
        conn.connect_deadline = time.monotonic() + self._connect_timeout
        try:
            code = server.connect_ex(address)
        except OSError as exc:  # name resolution
            code = exc.errno or errno.ECONNREFUSED
        if code == 0:
            self._upstream_reached(conn)
        elif code not in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            self._upstream_failed(conn, _errno_text(code))
            return
        self._update_events(conn)

    def _upstream_reached(self, conn: _Conn) -> None:
        conn.connected = True
        self._upstream_down = False

    def _upstream_failed(self, conn: _Conn, why: str) -> None:
        """Close ``conn``, whose upstream connect failed. Its client sees only its connection
        closed, which libpq reports as a server that "terminated abnormally": the first failure
        of an outage says what happened (a wrong port, a server stopped behind the proxy), at
        WARNING, which a failing test's report shows; the others of the outage at DEBUG."""
        try:
            upstream = "{}:{}".format(*self._upstream_address())
        except Exception:  # the server was closed meanwhile: no port any more
            upstream = type(self._upstream).__name__
        level = logging.DEBUG if self._upstream_down else logging.WARNING
        self._upstream_down = True
        log.log(
            level,
            "%r: can't reach its upstream %s (%s): it closes the connections it accepts "
            "until the upstream answers",
            self,
            upstream,
            why,
        )
        self._abort(conn)

    def _set_events(self, conn: _Conn, sock: socket.socket, events: int) -> None:
        is_client = sock is conn.client
        current = conn.client_events if is_client else conn.server_events
        if events == current:
            return
        if current == 0:
            self._sel.register(sock, events, self._handler(conn, is_client))
        elif events == 0:
            self._sel.unregister(sock)
        else:
            self._sel.modify(sock, events, self._handler(conn, is_client))
        if is_client:
            conn.client_events = events
        else:
            conn.server_events = events

    def _handler(self, conn: _Conn, is_client: bool) -> Callable[[int], None]:
        def handle(mask: int) -> None:
            if conn.closed or (conn.client_gone if is_client else conn.server_gone):
                return
            if is_client:
                self._on_client(conn, mask)
            else:
                self._on_server(conn, mask)

        return handle

    def _on_client(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._send(conn, conn.to_client, conn.client)
            if conn.closed:
                return
        if mask & selectors.EVENT_READ:
            data = self._recv(conn, conn.client, conn.to_server)
            if data:
                self._from_client(conn, data)
        self._update_events(conn)

    def _on_server(self, conn: _Conn, mask: int) -> None:
        server = conn.server
        if server is None:
            return
        if not conn.connected and mask & selectors.EVENT_WRITE:
            code = server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._upstream_failed(conn, _errno_text(code))
                return
            self._upstream_reached(conn)
        elif mask & selectors.EVENT_WRITE:
            self._send(conn, conn.to_server, server)
            if conn.closed:
                return
        if conn.connected and mask & selectors.EVENT_READ:
            data = self._recv(conn, server, conn.to_client)
            if data:
                self._from_server(conn, data)
        self._update_events(conn)

    def _recv(self, conn: _Conn, sock: socket.socket, pipe: _Pipe) -> bytes:
        """Read what's there; on EOF or error record how ``pipe``'s source ended."""
        try:
            data = sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:
            self._ended(conn, pipe, "rst")
            return b""
        if not data:
            self._ended(conn, pipe, pipe.end or "fin")
        return data

    def _ended(self, conn: _Conn, pipe: _Pipe, how: str) -> None:
        if pipe.end is None and pipe is conn.to_client and self._close_delay > 0:
            pipe.end_due = time.monotonic() + self._close_delay
        pipe.end = how

    def _from_client(self, conn: _Conn, data: bytes) -> None:
        if conn.lose_target is not None:
            return  # the client is about to be cut: nothing more reaches the server
        if conn.swallowed:
            conn.held += data
            return
        out = bytearray()
        parts = conn.client_parser.feed(data)
        for index, (chunk, msg) in enumerate(parts):
            armed = self._swallow_commits > 0 or self._lose_commits > 0
            commit = msg is not None and _runs_commit(conn, msg, armed=armed)
            if commit and self._swallow_commits > 0:
                self._swallow_commits -= 1
                self._commits_swallowed += 1
                conn.syncs_sent += 1
                conn.swallowed = True
                conn.swallow_sync = conn.syncs_sent
                for held, _ in parts[index:]:
                    conn.held += held
                break
            out += chunk
            if msg is None:
                continue
            if msg.kind in (b"ssl", b"gss"):
                conn.server_parser.pending_answers += 1
            elif msg.kind == b"startup":
                conn.syncs_sent += 1  # the server says ReadyForQuery once logged in
            elif msg.kind in _SYNC_POINTS:
                conn.syncs_sent += 1
                if msg.kind == b"S":
                    commit, conn.commit_bound = conn.commit_bound, False
                if commit and self._lose_commits > 0:
                    self._lose_commits -= 1
                    conn.lose_target = conn.syncs_sent
                    break  # forward up to the COMMIT, drop anything after it
        if conn.client_parser.opaque:
            conn.server_parser.opaque = True
        self._enqueue(conn.to_server, bytes(out))

    def _from_server(self, conn: _Conn, data: bytes) -> None:
        if conn.reset_when_flushed:
            return
        if conn.swallowed:
            self._from_server_swallowed(conn, data)
            return
        out = bytearray()
        target = conn.lose_target
        for chunk, msg in conn.server_parser.feed(data):
            if target is not None and conn.answers_seen >= target - 1:
                # this belongs to the COMMIT's answer: swallow it
                if msg is not None and msg.kind == b"Z":
                    conn.answers_seen += 1
                    if conn.answers_seen >= target:
                        self._commits_lost += 1
                        conn.reset_when_flushed = True
                        break
                continue
            out += chunk
            if msg is not None and msg.kind == b"Z":
                conn.answers_seen += 1
        if conn.server_parser.opaque:
            conn.client_parser.opaque = True
        self._enqueue(conn.to_client, bytes(out))

    def _from_server_swallowed(self, conn: _Conn, data: bytes) -> None:
        """Pass on answers owed for messages before the swallowed COMMIT; drop the rest."""
        out = bytearray()
        owed = conn.swallow_sync - 1
        for chunk, msg in conn.server_parser.feed(data):
            if conn.answers_seen < owed and not conn.client_gone:
                out += chunk
            if msg is not None and msg.kind == b"Z":
                conn.answers_seen += 1
        if conn.delivering and conn.answers_seen >= conn.swallow_sync:
            self._abort(conn)  # the late COMMIT was answered
            return
        self._enqueue(conn.to_client, bytes(out))

    def _enqueue(self, pipe: _Pipe, data: bytes) -> None:
        if not data:
            return
        if self._latency > 0 or pipe.delayed:
            pipe.delayed.append((time.monotonic() + self._latency, data))
        else:
            pipe.ready += data

    def _send(self, conn: _Conn, pipe: _Pipe, sock: socket.socket) -> None:
        while pipe.ready:
            try:
                sent = sock.send(pipe.ready)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._abort(conn)
                return
            del pipe.ready[:sent]

    def _pump(self) -> None:
        """Move due bytes, pass on ends, enforce deadlines; called after every select."""
        now = time.monotonic()
        for conn in list(self._conns):
            if conn.closed:
                continue
            if conn.server is None:
                if not self._blackholed:
                    self._connect_upstream(conn)
                if conn.closed or conn.server is None:
                    continue
            if not conn.connected:
                if now > conn.connect_deadline:
                    self._upstream_failed(conn, f"no answer within {self._connect_timeout:g} s")
                continue
            if not self._blackholed:
                for pipe, target, gone in (
                    (conn.to_server, conn.server, conn.server_gone),
                    (conn.to_client, conn.client, conn.client_gone),
                ):
                    while pipe.delayed and pipe.delayed[0][0] <= now:
                        pipe.ready += pipe.delayed.popleft()[1]
                    if gone:
                        pipe.ready.clear()
                        continue
                    self._send(conn, pipe, target)
                    if conn.closed:
                        break
                if conn.closed:
                    continue
                if conn.reset_when_flushed and conn.to_client.drained():
                    self._abort(conn)
                    continue
                if self._pass_on_ends(conn):
                    continue
            self._update_events(conn)

    def _pass_on_ends(self, conn: _Conn) -> bool:
        """Forward FIN/RST once a direction is drained; return True if the conn is gone."""
        if conn.swallowed:
            if conn.to_server.end is not None:  # the client gave up waiting
                self._abort(conn)
                return True
            if conn.to_client.end is not None and not conn.server_gone:
                if conn.client_gone:  # nobody left on either side
                    self._abort(conn)
                    return True
                self._drop_server(conn)  # e.g. a crash: the client keeps waiting
            return False
        now = time.monotonic()
        for pipe, target in ((conn.to_server, conn.server), (conn.to_client, conn.client)):
            if pipe.end is None or not pipe.drained() or pipe.shut or pipe.end_due > now:
                continue
            if pipe.end == "rst":
                self._abort(conn)
                return True
            assert target is not None
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)
            pipe.shut = True
        if conn.to_server.shut and conn.to_client.shut:
            self._close(conn, reset=False)
            return True
        return False

    def _update_events(self, conn: _Conn) -> None:
        if conn.closed:
            return
        hold = self._blackholed
        if not conn.client_gone:
            client_events = 0
            if conn.to_server.end is None and conn.to_server.size() < _BACKLOG_LIMIT:
                client_events |= selectors.EVENT_READ
            if conn.to_client.ready and not hold:
                client_events |= selectors.EVENT_WRITE
            self._set_events(conn, conn.client, client_events)
        if conn.server is None or conn.server_gone:
            return
        server_events = 0
        if not conn.connected:
            server_events = selectors.EVENT_WRITE
        else:
            if conn.to_client.end is None and conn.to_client.size() < _BACKLOG_LIMIT:
                server_events |= selectors.EVENT_READ
            if conn.to_server.ready and not hold:
                server_events |= selectors.EVENT_WRITE
        self._set_events(conn, conn.server, server_events)

    def _drop_client(self, conn: _Conn) -> None:
        """Reset the client side only; the server side stays (a held COMMIT)."""
        self._set_events(conn, conn.client, 0)
        with contextlib.suppress(OSError):
            conn.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        conn.client.close()
        conn.client_gone = True
        conn.to_client.ready.clear()
        conn.to_client.delayed.clear()
        self._active -= 1

    def _drop_server(self, conn: _Conn) -> None:
        """Close the server side only, after the server went away; the client keeps waiting."""
        if conn.server is not None:
            self._set_events(conn, conn.server, 0)
            with contextlib.suppress(OSError):
                conn.server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            conn.server.close()
        conn.server_gone = True
        conn.to_server.ready.clear()
        conn.to_server.delayed.clear()

    def _abort(self, conn: _Conn) -> None:
        """Reset both sides (RST, via SO_LINGER 0)."""
        self._close(conn, reset=True)

    def _close(self, conn: _Conn, *, reset: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        for sock, events in ((conn.client, conn.client_events), (conn.server, conn.server_events)):
            if sock is None:
                continue
            if events:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(sock)
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()
        conn.client_events = conn.server_events = 0
        self._conns.discard(conn)
        if not conn.client_gone:
            self._active -= 1
