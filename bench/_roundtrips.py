"""Round trips counted on the wire: a loopback TCP proxy that reads the PostgreSQL protocol.

:class:`RoundTripCounter` listens on 127.0.0.1 and forwards every connection to a server,
unchanged. It parses what the client sends (untyped startup messages, then typed messages) and
what the server answers, and counts two things:

* ``waits``: client messages that wait for an answer - ``Query`` (simple protocol), ``Sync``
  (extended protocol) and ``FunctionCall``; the server answers each with one ``ReadyForQuery``.
  A COMMIT that carries a marker in the same simple-query message counts once.
* ``flights``: how often the client had to wait - a flight starts when the client sends while it
  owes nothing an answer, and ends with the ``ReadyForQuery`` that answers its last pending
  message (pipelined messages share one flight).

The bench's own helper (``resilient_db.testing.FaultProxy`` exposes no message counters). Blocking
sockets, two threads per connection; meant for a handful of units, not for load.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field
from typing import Final

import sqlalchemy as sa

_SSL_REQUEST: Final = 80877103
_GSSENC_REQUEST: Final = 80877104
_CANCEL_REQUEST: Final = 80877102
#: client messages the server answers with exactly one ReadyForQuery
_WAITS: Final = frozenset({b"Q", b"S", b"F"})
_TERMINATE: Final = b"X"
_READY: Final = b"Z"


@dataclass
class _Link:
    """One proxied connection's protocol state, shared by its two pump threads."""

    startup: bool = True  # client side: untyped messages until the StartupMessage
    single_bytes: int = 0  # one-byte answers the server owes to SSLRequest / GSSENCRequest
    outstanding: int = 0  # waiting messages sent, not yet answered by ReadyForQuery
    in_flight: bool = False
    opaque: bool = False  # encrypted: not parsed any more
    client_buf: bytearray = field(default_factory=bytearray)
    server_buf: bytearray = field(default_factory=bytearray)


class RoundTripCounter:
    """A counting proxy in front of ``upstream`` (host, port); see the module docstring."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.waits = 0
        self.flights = 0
        #: set when a connection could not be read (e.g. SSL/GSS encryption): counts incomplete
        self.opaque = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, name="bench-roundtrips", daemon=True).start()

    def url(self, url: str) -> str:
        """``url`` (a SQLAlchemy URL of the upstream server) pointed at the proxy instead."""
        return (
            sa.make_url(url)
            .set(host="127.0.0.1", port=self.port)
            .render_as_string(hide_password=False)
        )

    def counts(self) -> tuple[int, int]:
        """``(waits, flights)`` so far."""
        with self._lock:
            return self.waits, self.flights

    def close(self) -> None:
        self._closed = True
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in [self._listener, *sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    # -- plumbing ---------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self._upstream)
            except OSError:
                if self._closed:
                    return
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, server]
            link = _Link()
            for args in ((client, server, link, True), (server, client, link, False)):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, link: _Link, from_client: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                # count before forwarding: the answer can't overtake its own question
                if from_client:
                    self._from_client(link, data)
                else:
                    self._from_server(link, data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def _from_client(self, link: _Link, data: bytes) -> None:
        if link.opaque:
            return
        buf = link.client_buf
        buf += data
        pos = 0
        with self._lock:
            while True:
                if link.startup:
                    if len(buf) - pos < 8:
                        break
                    length = int.from_bytes(buf[pos : pos + 4], "big")
                    if len(buf) - pos < length:
                        break
                    code = int.from_bytes(buf[pos + 4 : pos + 8], "big")
                    if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                        link.single_bytes += 1
                    elif code != _CANCEL_REQUEST:
                        link.startup = False  # the StartupMessage: typed messages from here
                    pos += length
                    continue
                if len(buf) - pos < 5:
                    break
                kind = bytes(buf[pos : pos + 1])
                total = 1 + int.from_bytes(buf[pos + 1 : pos + 5], "big")
                if len(buf) - pos < total:
                    break
                pos += total
                if kind == _TERMINATE:
                    continue
                if not link.in_flight:
                    link.in_flight = True
                    self.flights += 1
                if kind in _WAITS:
                    link.outstanding += 1
                    self.waits += 1
        del buf[:pos]

    def _from_server(self, link: _Link, data: bytes) -> None:
        if link.opaque:
            return
        buf = link.server_buf
        buf += data
        pos = 0
        with self._lock:
            while True:
                if link.single_bytes and len(buf) > pos:
                    link.single_bytes -= 1
                    if buf[pos : pos + 1] != b"N":
                        link.opaque = self.opaque = True  # encrypted from here on
                        buf.clear()
                        return
                    pos += 1
                    continue
                if len(buf) - pos < 5:
                    break
                kind = bytes(buf[pos : pos + 1])
                total = 1 + int.from_bytes(buf[pos + 1 : pos + 5], "big")
                if len(buf) - pos < total:
                    break
                pos += total
                if kind == _READY and link.outstanding:
                    link.outstanding -= 1
                if not link.outstanding:
                    link.in_flight = False  # answered all it asked (or a Flush's answer)
        del buf[:pos]
