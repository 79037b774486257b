"""Factories left to the default service name on different databases, said once per pair.

A service is one circuit breaker, one retry budget and, with ``SELF_HEALING_REDIS_URL``, one set
of Redis keys. Every factory made without ``service=`` is service ``"database"``: an application
with two databases that names no service has one breaker for both, and an outage of either
fails the other's units fast. Nothing is wrong with either factory alone, so nothing is
refused; the first time a factory left to the default is on an engine whose database is not
that of another such factory, one ``[SELF-HEAL]`` WARNING names both databases and the fix.
Factories given ``service=`` are never looked at, the same name on two URLs included: a
PgBouncer URL and a direct one to one database sharing a breaker on purpose.

Looked at when a factory takes an engine (made on one, ``configure(bind=...)``, an engine its
session class routes to, the first time), never on a unit's path. ``with_self_healing`` left to
the default is service ``"database"`` as well: the work it wraps (the units and sessions of
factories, whatever their own names) is looked at when it first begins a transaction on an
engine (then one set lookup per transaction), and its databases paired as a factory's are.
"""

from __future__ import annotations

import gc
import logging
from typing import Any, Final

from ._config import mask_url
from ._observability import emit, log_breaker
from ._state import STATE

__all__ = ["DEFAULT_SERVICE", "query_list", "say_databases_sharing", "say_operation_database"]


class _DefaultService(str):
    """The type of :data:`DEFAULT_SERVICE`: told from a ``service="database"`` given by
    identity, while it is that name everywhere a ``str`` is (the signature shows
    ``service: str = 'database'``); a factory keeps a plain ``str`` of it."""

    __slots__ = ()


#: the service name of a factory made without ``service=``
DEFAULT_SERVICE: Final[str] = _DefaultService("database")

#: libpq's port where a URL names none
_PG_PORT: Final = 5432

#: a database: the places (host, port) its URL may connect to, and its name
_Database = tuple[frozenset[tuple[str, Any]], "str | None"]


def query_list(value: Any) -> list[str]:
    """The items of a URL query value (one string or a tuple of them; libpq's own spelling
    separates them by commas too)."""
    values = value if isinstance(value, tuple) else () if value is None else (value,)
    return [item.strip() for entry in values for item in str(entry).split(",")]


def _host_and_port(host: str) -> tuple[str, str | None]:
    """``host:port``, ``[v6]:port`` or a unix socket's directory, split."""
    if host.startswith("/"):
        return host, None  # a directory: case kept, no port in it
    if host.startswith("["):
        address, _, rest = host[1:].partition("]")
        return address.lower(), rest[1:] or None if rest.startswith(":") else None
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        return name.lower(), port or None
    return host.lower(), None  # a name, or an IPv6 address without brackets


def database_of(url: Any) -> _Database:
    """What identifies the database of SQLAlchemy ``url``: its host(s) and port(s), those of a
    multi-host URL's ``host=`` list included, and the database name; not the user, password or
    driver (a factory on psycopg and one on asyncpg to one database share it). A URL without
    a database name is on the user's database (libpq's default)."""
    hosts = query_list(url.query.get("host"))
    ports = query_list(url.query.get("port"))
    if not hosts:
        hosts = [url.host or ""]
    if url.port is not None and not ports:
        ports = [str(url.port)]
    places = set()
    for i, entry in enumerate(hosts):
        host, port = _host_and_port(entry)
        if port is None and ports:
            port = ports[i] if i < len(ports) else ports[-1]
        number: Any = int(port) if port is not None and port.isdigit() else port
        places.add((host, _PG_PORT if number is None else number))
    return frozenset(places), url.database or url.username


def _different(a: _Database, b: _Database) -> bool:
    """``a`` and ``b`` are two databases: other names, or no host in common (a multi-host URL
    and one to one of its hosts are the same database)."""
    return a[1] != b[1] or not a[0] & b[0]


def _shown(engine: Any) -> str:
    return mask_url(engine.url.render_as_string(hide_password=False))


def _pairs_to_say(factory: Any) -> list[tuple[Any, Any, frozenset[_Database]]]:
    """The engines of ``factory`` (one left to the default service, or an engine
    ``with_self_healing``'s work left to it began on: see :func:`say_operation_database`) and
    of other live such factories, or such work, on another database, a pair not said yet: (its
    engine, the other's, the pair)."""
    found = []
    with STATE.lock:
        mine: list[Any] = []
        others: dict[Any, None] = {}  # (an engine of several such factories looked at once)
        for engine in list(STATE.operation_engines):
            if engine is factory:
                mine.append(engine)
            else:
                others[engine] = None
        for engine, hooks in list(STATE.engine_hooks.items()):
            for other in list(hooks.factories):
                if other is factory:
                    mine.append(engine)
                elif (
                    getattr(other, "_service_defaulted", False) and other.service == DEFAULT_SERVICE
                ):
                    others[engine] = None
        for engine in mine:
            here = database_of(engine.url)
            for elsewhere in others:
                there = database_of(elsewhere.url)
                pair = frozenset((here, there))
                if _different(here, there) and pair not in STATE.databases_said:
                    found.append((engine, elsewhere, pair))
    return found


def say_operation_database(engine: Any, config: Any) -> None:
    """The work of a ``with_self_healing`` operation left to the default service (of
    configuration ``config``) began a transaction on ``engine``: the first time, said as a
    factory left to it is (see :func:`say_databases_sharing`), paired with the databases of
    such factories and of such work elsewhere."""
    if engine in STATE.operation_engines:
        return
    with STATE.lock:
        STATE.operation_engines.add(engine)
    _say_pairs(engine, "with_self_healing", config)


def say_databases_sharing(factory: Any) -> None:
    """Log the WARNING of the module for each database ``factory`` (made without ``service=``)
    is on and another factory made without it is not, once per pair of databases per process.
    Two threads making such factories at once say a pair once: it is marked under the lock."""
    if not getattr(factory, "_service_defaulted", False):
        return
    _say_pairs(factory, type(factory).__name__, factory.config)


def _say_pairs(factory: Any, made_by: str, config: Any) -> None:
    """:func:`say_databases_sharing` of ``factory`` (or of an engine of an operation's work:
    ``made_by`` is ``"with_self_healing"`` then, else the factory's class name), said under
    ``config``."""
    found = _pairs_to_say(factory)
    if not found:
        return
    # Registries hold factories weakly, but a factory and the class it makes refer to each
    # other: one nobody holds any more stays until the cyclic collector runs, and must not be
    # taken for an application's second database. Collected here, where a pair would be said
    # (rarely: once per pair, or a factory dropped while one on another database lived).
    gc.collect()
    found = _pairs_to_say(factory)
    said = []
    with STATE.lock:
        for engine, elsewhere, pair in found:
            if pair not in STATE.databases_said:
                STATE.databases_said.add(pair)
                said.append((_shown(engine), _shown(elsewhere)))
    service = str(DEFAULT_SERVICE)
    operation = made_by == "with_self_healing"
    for here, there in said:
        emit(
            config,
            log_breaker,
            logging.WARNING,
            "Databases sharing a service: %s on two databases, %s and %s, are both "
            "service=%s: one circuit breaker and one retry budget for both (one set of Redis "
            "keys when shared), so an outage of either fails the other's units fast and spends "
            'its retries. Give each database its own: service="..." on each %s, e.g. %s (said '
            "once per pair of databases)",
            "with_self_healing() without service= (or a factory made without it)"
            if operation
            else "factories made without service=",
            here,
            there,
            service,
            "operation and factory" if operation else "factory",
            'with_self_healing(fn, service="orders-db")'
            if operation
            else f'{made_by}(orders_engine, service="orders-db")',
            service=service,
            event="databases_sharing_service",
            database=here,
            other_database=there,
        )
