"""Feature flags and numbers: the plan's ``SELF_HEALING_*`` variables, parsed strictly.

The configuration is read from an environ mapping (``os.environ`` unless one is passed) when a
factory is created, at the first ``with_self_healing`` call without ``config=``, and again for
every default-config factory and operation on :func:`reload_config`.
Every bad variable is collected and reported at once in one :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import decimal
import difflib
import functools
import math
import os
import re
import threading
import urllib.parse
import weakref
from collections.abc import Callable, Container, Mapping
from datetime import timedelta
from typing import Any, Final, Protocol

from ._errors import ConfigError, utf8_problem
from ._state import STATE

__all__ = ["Config", "load_config", "mask_url", "reload_config"]

PREFIX = "SELF_HEALING_"
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
LOG_LEVELS = ("debug", "info", "warn", "warning", "error")
BULK_UPDATE_MODES = ("filter", "raise")
REDIS_SCHEMES = ("redis", "rediss", "unix")
#: query parameters of a Redis URL that resilient_db sets itself: the client lets a URL's values
#: win over the ones it is given, so a unit could wait on Redis past SELF_HEALING_REDIS_TIMEOUT
_OWN_QUERY = frozenset(
    {"socket_timeout", "socket_connect_timeout", "retry", "retry_on_timeout", "retry_on_error"}
)
_NOT_A_URL = "<not a URL>"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,19}", re.ASCII)
_PLAIN_HOST = re.compile(r"(?:\[[0-9A-Za-z:.%]*\]|[A-Za-z0-9._~%-]*)(?::[0-9]*)?", re.ASCII)
_PLAIN_USER = re.compile(r"[A-Za-z0-9._~-]{1,64}", re.ASCII)
#: a password in the query (``password=``, ``ssl_password=``): its value runs to ``&`` or ``#``.
#: Each letter of the key also percent-encoded (``pass%77ord=``): the redis client (and
#: libpq) decode a query's keys, so that too is the password
_PASSWORD_VALUE = re.compile(
    "(" + "".join(f"(?:{c}|%{ord(c):02x}|%{ord(c.upper()):02x})" for c in "password") + "=)"
    "([^&#]*)",
    re.IGNORECASE,
)
_ENCODE = "percent-encode / ? # @ [ ] in a password (/ is %2F, ? %3F, # %23, @ %40, [ %5B, ] %5D)"
#: at most this many characters of a redis client's objection are quoted
_CLIENT_TEXT = 200
#: the largest retry budget ratio: retries may add at most this many times the first attempts
MAX_RETRY_BUDGET = 10.0


def mask_url(url: str) -> str:
    """``url`` as logs, errors, ``health()`` and ``check-config`` show it: its credentials and
    ``password=`` query values replaced by ``***``, without a fragment.

    Read from the raw text, not through a URL parser: a parser ends the host part at the first
    ``/``, ``?`` or ``#``, so one of those unencoded in a password puts the password in the path,
    query or fragment, where nothing would be masked. Everything between ``scheme://`` and the
    last ``@`` is credentials, once every ``password=`` value (up to ``&`` or ``#``) is masked:
    an ``@`` in such a value must not make its end look like the host. A user name is kept only
    when it is plainly one (a password follows it; letters, digits and ``._~-``): Redis takes a
    user name standing alone as the password. A host part that is not plainly ``host:port``
    (``redis://:password`` with no ``@host``, say) is shown as ``***`` with all that follows,
    and a value without ``scheme://`` shows nothing of itself: either may be a secret.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return _NOT_A_URL
    credentials, at, rest = _PASSWORD_VALUE.sub(r"\1***", rest).rpartition("@")
    where, question, query = rest.partition("#")[0].partition("?")
    if not _PLAIN_HOST.fullmatch(where.partition("/")[0]):
        return f"{scheme}://***"
    shown = f"{scheme}://"
    if at:
        user, colon, password = credentials.partition(":")
        plain = colon and password and _PLAIN_USER.fullmatch(user)
        shown += f"{user}:***@" if plain else "***@"
    shown += where
    if question:
        shown += "?" + "&".join(_masked_item(item) for item in query.split("&") if item)
    return shown


def _masked_item(item: str) -> str:
    # not key=value: maybe the rest of a password holding an unencoded &
    return item if "=" in item else "***"


def redis_url_problem(url: str, *, unset: str) -> str | None:
    """What is wrong with ``url`` as ``SELF_HEALING_REDIS_URL``, as one sentence showing only
    its masked form, or None. ``unset`` says how to run without Redis (an empty value is an
    error, not "no Redis": a link silently missing from the fleet is worse than a refusal)."""
    if not url:
        return f"is empty; {unset} to run without Redis"
    why = check_redis_url(url)
    if why is None:
        return None
    shown = mask_url(url)
    if shown == _NOT_A_URL:
        return f"is invalid (not shown: it may be a secret in the wrong variable): {why}"
    return f"{shown!r} is invalid: {why}"


# cached: a URL is judged by ``load_config`` and again by the Config it builds (and by each
# ``replace``), and judging it builds the redis client's pool and connection objects
@functools.lru_cache(maxsize=32)
def check_redis_url(url: str) -> str | None:
    """Why ``url`` is not a Redis URL the client accepts, or None (no connection is made).

    The texts are fixed: never a URL parser's message, which quotes the characters it failed on
    (a password's, when the password holds an unencoded ``/``, ``?`` or ``#``). With the redis
    package installed, its client then builds a connection from the URL as a link would (not
    connecting), so a URL accepted here does not fail at the first unit.
    """
    scheme, sep, _ = url.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return (
            "not a URL; give redis://[[user]:password@]host[:port][/db], rediss://... or "
            "unix:///path/to/redis.sock"
        )
    if scheme not in REDIS_SCHEMES:
        case = " (in lower case)" if scheme.lower() in REDIS_SCHEMES else ""
        return f"scheme {scheme}: is not one of {', '.join(s + '://' for s in REDIS_SCHEMES)}{case}"
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # brackets that are no IPv6 address, characters no host may have
        return f"the host is not valid (an IPv6 address is written [::1]); {_ENCODE}"
    if "@" in parts.path + parts.query + parts.fragment:
        return (
            "an @ follows a / ? or # (one of those in a password ends the host part early, "
            f"and the host would be read from the password); {_ENCODE}"
        )
    try:
        port = parts.port
    except ValueError:
        return f"the port is not a number from 1 to 65535; {_ENCODE}"
    if scheme == "unix":
        if not parts.path:
            return "unix:// needs a socket path, e.g. unix:///run/redis.sock"
    elif not parts.hostname:
        return "has no host, e.g. redis://127.0.0.1:6379/0"
    elif port == 0:
        return "the port is not a number from 1 to 65535"
    elif not _DIGITS.fullmatch(parts.path.lstrip("/") or "0"):
        return "the database (the path after the host) is not a number, e.g. redis://host:6379/0"
    if utf8_problem(url) is not None:
        # (the client takes it, and every connect fails encoding the password, say, for AUTH)
        return "it holds a character that is no UTF-8 text (a byte of another encoding?)"
    own = sorted(set(urllib.parse.parse_qs(parts.query)) & _OWN_QUERY)
    if own:
        return (
            f"it sets {', '.join(own)}, which resilient_db sets itself (the socket timeouts "
            "are SELF_HEALING_REDIS_TIMEOUT; the client makes no retries of its own): remove "
            f"{'it' if len(own) == 1 else 'them'} from the URL"
        )
    return _client_refusal(url)


def _client_refusal(url: str) -> str | None:
    """What the redis client says against ``url`` when it builds a connection from it (without
    connecting), or None; None too without the redis package (a link then says it is missing)."""
    try:
        import redis  # noqa: PLC0415 - optional dependency, needed only with a Redis URL
    except ImportError:
        return None
    # (typed as Any: redis before 5.2 leaves from_url untyped, which mypy --strict refuses in
    # an application checking this package, and a type: ignore would be unused on later ones)
    pools: Any = redis.ConnectionPool
    try:
        pool = pools.from_url(url)
        pool.connection_class(**pool.connection_kwargs)
    except Exception as exc:  # whatever the client raises while only parsing, it won't use it
        return client_problem(exc, url)
    return None


def client_problem(exc: BaseException, url: str) -> str:
    """The redis client's objection ``exc`` to ``url``, with every part of the URL's
    credentials and ``password=`` values taken out (a client may quote what it refuses)."""
    return f"the redis client does not accept it ({client_says(exc, url)})"


def client_says(exc: BaseException, url: str) -> str:
    """``exc``, raised by the redis client for ``url``, as ``Type: message`` with the URL
    shown masked and every part of its credentials and ``password=`` values replaced by
    ``***`` (a client may quote what it refuses, or what it could not reach); the message cut
    to a few hundred characters."""
    secrets: set[str] = set()
    credentials = url.partition("://")[2].rpartition("@")[0]
    values = [match[2] for match in _PASSWORD_VALUE.finditer(url)]
    parts = credentials.split(":")
    user, colon, password = credentials.partition(":")
    if colon and password and _PLAIN_USER.fullmatch(user):
        # a user name the masked URL shows: not replaced (a short one would be, in every word
        # of the message: "invalid ***sername-password pair" for user "u")
        parts = parts[1:]
    for raw in (credentials, *parts, *values):
        secrets.update((raw, urllib.parse.unquote(raw), urllib.parse.unquote_plus(raw)))
    text = str(exc).replace(url, mask_url(url))
    for secret in sorted(secrets - {""}, key=len, reverse=True):
        text = text.replace(secret, "***")
    if len(text) > _CLIENT_TEXT:
        text = text[:_CLIENT_TEXT] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_SECONDS = frozenset(
    {"initial_delay", "max_delay", "conflict_delay", "deadline", "reset_timeout", "redis_timeout"}
)


def vars_of(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


@dataclasses.dataclass(frozen=True)
class Config:
    """Effective self-healing configuration. Durations are seconds (``float`` or ``timedelta``);
    the environment gives them in milliseconds, as the plan does. Each duration is at most an
    hour (``conflict_delay`` 5 s, ``redis_timeout`` 10 s): a number of milliseconds given
    here (``reset_timeout=30000``) is a :class:`ConfigError` asking whether seconds were meant."""

    enabled: bool = True
    retry: bool = True
    max_retries: int = 3
    initial_delay: float = 1.0
    max_delay: float = 30.0
    conflict_delay: float = 0.02
    deadline: float = 60.0
    circuit_breaker: bool = True
    failure_threshold: int = 5
    reset_timeout: float = 30.0
    half_open_probes: int = 1
    status_validation: bool = True
    response_validation: bool = True
    bulk_update: str = "filter"
    logging: bool = True
    log_level: str = "info"
    log_row_keys: bool = False
    #: Redis URL sharing breakers and the retry budget between processes (None: this process
    #: alone). Not in ``repr()``: it may carry a password.
    redis_url: str | None = dataclasses.field(default=None, repr=False)
    #: socket timeout of every Redis command (failure path and background only)
    redis_timeout: float = 0.1
    #: retries may add this ratio of recent first attempts (None: no budget)
    retry_budget: float | None = None
    #: retries per second the budget allows whatever the ratio says (a small floor)
    retry_budget_floor: int = 10
    #: a role trusted to own the commit markers besides a superuser, the database's owner and
    #: the role the application logs in as: a migration role that installed them (None: none)
    markers_owner: str | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Config:
        # a keyword that is no setting is named with the one meant, as the factories' keywords
        # and the environment's names are (Python's own error said only "unexpected keyword
        # argument"); ``replace()`` comes here too
        names = [field.name for field in dataclasses.fields(cls)]
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1) or difflib.get_close_matches(
                    _snake(key), names, n=1
                )
                hint = f"; did you mean {close[0]}=?" if close else ""
                raise TypeError(f"Config got {key}=, which is no setting{hint}")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        problems: dict[str, str] = {}
        problems.update(_optional_problems(self))
        as_timedelta: set[str] = set()  # (a timedelta has its unit: no milliseconds hint)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "float":
                if isinstance(value, timedelta):
                    as_timedelta.add(field.name)
                    value = value.total_seconds()
                    object.__setattr__(self, field.name, value)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    problems[field.name] = f"must be a number of seconds, got {_given(value)}"
                elif _too_large_for_a_float(value):
                    problems[field.name] = "too large for a number of seconds"
                elif not math.isfinite(value) or value < 0:
                    problems[field.name] = f"must be a finite number >= 0, got {value!r}"
                else:
                    object.__setattr__(self, field.name, float(value) + 0.0)  # (-0.0 is 0)
            elif field.type == "int":
                least = 1 if field.name in _COUNTED_FROM_ONE else 0
                if isinstance(value, bool) or not isinstance(value, int) or value < least:
                    problems[field.name] = f"must be a whole number >= {least}, got {_given(value)}"
            elif field.type == "bool" and not isinstance(value, bool):
                problems[field.name] = f"must be True or False, got {_given(value)}"
        for name, limit in _LIMITS.items():
            value = getattr(self, name)
            if name in problems or not isinstance(value, (int, float)):
                continue
            if name in _SECONDS:
                if value > limit / 1000:
                    problems[name] = f"{value:.12g} s is over the {limit / 1000:g} s limit"
                    # value / 1000 would be within the bound: maybe milliseconds
                    if name not in as_timedelta and value / 1000 <= limit / 1000:
                        problems[name] += _milliseconds_hint(value)
            elif value > limit:
                shown = repr(value) if len(repr(value)) <= 30 else f"{len(str(value))} digits"
                problems[name] = f"too large: {shown}; at most {limit}"
        for name, why in _contradictions(vars_of(self), str).items():
            hint = ""
            if (
                name == "initial_delay"
                and name not in as_timedelta
                and self.initial_delay >= _HINTED_INITIAL_DELAY
            ):
                # the environment's default, 1000, passed as seconds: over the default cap
                hint = _milliseconds_hint(self.initial_delay)
            problems.setdefault(name, why + hint)
        if "redis_timeout" not in problems and self.redis_timeout < 0.001:
            # (after the conversion above: a timedelta(0) is no 0); the environment's least
            problems["redis_timeout"] = f"must be at least 0.001 s, got {self.redis_timeout!r}"
        if "reset_timeout" not in problems and self.reset_timeout < 0.001:
            # an opening that ends at once rejects nothing, and logs an opening per failure
            problems["reset_timeout"] = (
                f"must be at least 0.001 s, got {self.reset_timeout!r} (a circuit that never "
                "stays open: to let every call through, switch the breaker off, "
                "circuit_breaker=False)"
            )
        for name in ("log_level", "bulk_update"):  # any case, as from the environment
            value = getattr(self, name)
            if isinstance(value, str) and value != value.lower():
                object.__setattr__(self, name, value.lower())
        if self.log_level not in LOG_LEVELS:
            levels = ", ".join(LOG_LEVELS)
            problems["log_level"] = f"must be one of {levels}, got {_given(self.log_level)}"
        if self.bulk_update not in BULK_UPDATE_MODES:
            problems["bulk_update"] = (
                f"must be one of {', '.join(BULK_UPDATE_MODES)}, got {_given(self.bulk_update)}"
            )
        if problems:
            raise ConfigError(problems)

    # The plan's ``isFeatureEnabled``: a feature is on when self-healing is on and it is on.
    @property
    def retry_on(self) -> bool:
        """Retry on (``max_retries`` 0 is retry off: the same units, lines and counts)."""
        return self.enabled and self.retry and self.max_retries > 0

    @property
    def breaker_on(self) -> bool:
        return self.enabled and self.circuit_breaker

    @property
    def guard_on(self) -> bool:
        return self.enabled and self.status_validation

    @property
    def logging_on(self) -> bool:
        return self.enabled and self.logging

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied (validated like the original)."""
        return dataclasses.replace(self, **changes)

    def as_env(self, *, masked: bool = False) -> dict[str, str]:
        """The configuration as ``SELF_HEALING_*`` variables (milliseconds for durations;
        settings that are unset, such as no Redis URL, are left out). ``masked``: the Redis
        URL's password replaced by ``***``, for showing (not for another process to use)."""
        out: dict[str, str] = {}
        for spec in _SPECS:
            value = getattr(self, spec.field)
            if value is None:
                continue
            if masked and spec.kind == "url":
                value = mask_url(value)
            if spec.kind == "ms":
                # a duration under half a millisecond is no 0 (which may mean "none" or be
                # refused): the least the environment takes, 1 ms
                out[spec.env] = str(max(1, round(value * 1000)) if value > 0 else 0)
            elif spec.kind == "bool":
                out[spec.env] = "true" if value else "false"
            elif spec.kind == "ratio":
                # digits and a dot, as the variable takes them (str() gives 1e-05)
                out[spec.env] = format(decimal.Decimal(repr(value)), "f")
            else:
                out[spec.env] = str(value)
        return out


@dataclasses.dataclass(frozen=True)
class _Spec:
    env: str
    field: str
    kind: str  # "bool" | "count" | "ms" | "ratio" | "url" | "choice" | "role"
    choices: tuple[str, ...] = ()


_SPECS: tuple[_Spec, ...] = (
    _Spec("SELF_HEALING_ENABLED", "enabled", "bool"),
    _Spec("SELF_HEALING_RETRY", "retry", "bool"),
    _Spec("SELF_HEALING_MAX_RETRIES", "max_retries", "count"),
    _Spec("SELF_HEALING_INITIAL_DELAY", "initial_delay", "ms"),
    _Spec("SELF_HEALING_MAX_DELAY", "max_delay", "ms"),
    _Spec("SELF_HEALING_CONFLICT_DELAY", "conflict_delay", "ms"),
    _Spec("SELF_HEALING_DEADLINE", "deadline", "ms"),
    _Spec("SELF_HEALING_CIRCUIT_BREAKER", "circuit_breaker", "bool"),
    _Spec("SELF_HEALING_FAILURE_THRESHOLD", "failure_threshold", "count"),
    _Spec("SELF_HEALING_RESET_TIMEOUT", "reset_timeout", "ms"),
    _Spec("SELF_HEALING_HALF_OPEN_PROBES", "half_open_probes", "count"),
    _Spec("SELF_HEALING_STATUS_VALIDATION", "status_validation", "bool"),
    _Spec("SELF_HEALING_RESPONSE_VALIDATION", "response_validation", "bool"),
    _Spec("SELF_HEALING_BULK_UPDATE", "bulk_update", "choice", BULK_UPDATE_MODES),
    _Spec("SELF_HEALING_LOGGING", "logging", "bool"),
    _Spec("SELF_HEALING_LOG_LEVEL", "log_level", "choice", LOG_LEVELS),
    _Spec("SELF_HEALING_LOG_ROW_KEYS", "log_row_keys", "bool"),
    _Spec("SELF_HEALING_REDIS_URL", "redis_url", "url"),
    _Spec("SELF_HEALING_REDIS_TIMEOUT", "redis_timeout", "ms"),
    _Spec("SELF_HEALING_RETRY_BUDGET", "retry_budget", "ratio"),
    _Spec("SELF_HEALING_RETRY_BUDGET_FLOOR", "retry_budget_floor", "count"),
    _Spec("SELF_HEALING_MARKERS_OWNER", "markers_owner", "role"),
)
_BY_ENV = {spec.env: spec for spec in _SPECS}
#: every variable read, in the order ``as_env`` and ``resilient-db check-config`` list them
ENV_VARIABLES: tuple[str, ...] = tuple(_BY_ENV)
_ENV_OF = {spec.field: spec.env for spec in _SPECS}
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_TOO_BIG = 10**15
_HOUR_MS = 3_600_000
# Upper bounds: settings are configuration, and a larger value is a mistake (a delay of years
# overflows the clock, a million retries never ends). Milliseconds for "ms" settings. The
# durations' bounds are what no service plausibly wants (a unit retrying for hours holds its
# caller as long; a conflict backoff is tens of milliseconds), low enough that a number of
# milliseconds given to Config(...), which takes seconds, is over them: reset_timeout=30000 is
# refused (did you mean 30?), not taken for 8 hours.
_LIMITS: dict[str, int] = {
    "max_retries": 1_000,
    "failure_threshold": 1_000_000,
    "half_open_probes": 10_000,
    "initial_delay": _HOUR_MS,
    "max_delay": _HOUR_MS,
    # (a conflict backoff is tens of milliseconds: a bound of seconds refuses the usual numbers
    # of milliseconds given to Config, conflict_delay=20 for 20 ms, which a minute let through)
    "conflict_delay": 5_000,
    "deadline": _HOUR_MS,
    "reset_timeout": _HOUR_MS,
    "redis_timeout": 10_000,
    "retry_budget_floor": 1_000,
}
#: an initial_delay over max_delay from this many seconds on is hinted at as milliseconds
#: (the environment's default, 1000, against the default cap of 30 s)
_HINTED_INITIAL_DELAY = 100


def _milliseconds_hint(seconds: float) -> str:
    """The end of a message about a duration given to Config: maybe it was milliseconds."""
    return (
        "; Config takes seconds (the environment takes milliseconds): "
        f"did you mean {seconds / 1000:.12g}?"
    )


_RATIO = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", re.ASCII)
_SHOWN = 40


#: whole-number settings whose least value is 1 (a breaker that opens after no failure, a
#: half-open state that lets no probe through)
_COUNTED_FROM_ONE: Final = frozenset({"failure_threshold", "half_open_probes"})


def _given(value: object) -> str:
    """A bad argument of ``Config(...)`` as echoed in an error (a string as :func:`_shown`)."""
    return _shown(value) if isinstance(value, str) else repr(value)


def _shown(raw: str) -> str:
    """A bad value as echoed in an error: at most a short prefix (it may be huge or a secret
    pasted into the wrong variable), and a URL masked as :func:`mask_url` masks it (a Redis or
    database URL set in the wrong variable may carry a password)."""
    if "://" in raw:
        return repr(mask_url(raw.strip()))
    if len(raw) <= _SHOWN:
        return repr(raw)
    return f"{raw[:_SHOWN]!r}... ({len(raw)} characters)"


def _contradictions(
    values: Mapping[str, Any],
    label: Callable[[str], str],
    given: Container[str] | None = None,
) -> dict[str, str]:
    """Settings that are each fine but together make no sense. ``values`` holds every field
    (a value that is not a number is left to its own problem); ``label`` names a field in the
    messages (the field itself, or its variable); ``given``: the fields the user set (default:
    all), one of which each problem is named by."""

    def named(first: str, other: str) -> str:
        return other if given is not None and first not in given and other in given else first

    def number(name: str) -> float | None:
        value = values[name]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or _too_large_for_a_float(value):
            return None  # (its own problem)
        return float(value) if math.isfinite(value) else None

    problems: dict[str, str] = {}
    initial, cap = number("initial_delay"), number("max_delay")
    if initial is not None and cap is not None and initial > cap:
        problems[label(named("initial_delay", "max_delay"))] = (
            f"{label('initial_delay')} ({initial:g} s) is more than {label('max_delay')} "
            f"({cap:g} s): the first backoff would already exceed the cap"
        )
    retries = values["max_retries"]
    if (
        number("deadline") == 0
        and values["retry"] is True
        and values.get("enabled", True) is not False  # (switched off: nothing retries)
        and isinstance(retries, int)
        and retries > 0
    ):
        problems[label(named("deadline", "max_retries"))] = (
            f"{label('deadline')} 0 leaves no time to retry while {label('retry')} is on with "
            f"{label('max_retries')}={retries}; give a deadline or switch retry off"
        )
    return problems


_AT_LEAST_ONE = frozenset(
    {
        "SELF_HEALING_FAILURE_THRESHOLD",
        "SELF_HEALING_HALF_OPEN_PROBES",
        "SELF_HEALING_REDIS_TIMEOUT",
        "SELF_HEALING_RESET_TIMEOUT",
    }
)


def _optional_problems(config: Config) -> dict[str, str]:
    """Problems of the settings that may be unset (None): the Redis URL and the budget ratio."""
    problems: dict[str, str] = {}
    url = config.redis_url
    if url is not None:
        why = (
            redis_url_problem(url, unset="give None")
            if isinstance(url, str)
            else f"must be a string or None, got {type(url).__name__}"
        )
        if why is not None:
            problems["redis_url"] = why
    if config.markers_owner is not None:
        why = role_problem(config.markers_owner)
        if why is not None:
            problems["markers_owner"] = why
    ratio = config.retry_budget
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            problems["retry_budget"] = f"must be a ratio such as 0.2 or None, got {ratio!r}"
        elif _too_large_for_a_float(ratio):
            problems["retry_budget"] = f"must be between 0 and {MAX_RETRY_BUDGET:g}; too large"
        elif not (math.isfinite(ratio) and 0 <= ratio <= MAX_RETRY_BUDGET):
            problems["retry_budget"] = f"must be between 0 and {MAX_RETRY_BUDGET:g}, got {ratio!r}"
        else:
            object.__setattr__(config, "retry_budget", float(ratio) + 0.0)  # (-0.0 is 0)
    return problems


def _too_large_for_a_float(value: int | float) -> bool:
    """An int past what a float holds (``math.isfinite`` raises OverflowError on it)."""
    return isinstance(value, int) and value.bit_length() > 1000


#: PostgreSQL's longest name, in bytes (NAMEDATALEN - 1)
_MAX_NAME_BYTES = 63


class ConfigUsers:
    """The rule a service's one breaker and one retry budget follow when their users (the
    policies of factories and ``with_self_healing`` calls of the service) ask for different
    settings: while a user that gave a ``config=`` of the code lives, the environment's
    settings (a default factory, ``reload_config()``) don't replace its settings, and another
    ``config=`` that differs is followed (the later one) and warned about by the caller."""

    __slots__ = ("_explicit",)

    def __init__(self) -> None:
        self._explicit: weakref.WeakSet[Any] = weakref.WeakSet()  # live users with config=

    def asks(
        self,
        config: Config,
        current: Config,
        *,
        user: object,
        explicit: bool,
        same: Callable[[Config, Config], bool],
    ) -> tuple[bool, bool]:
        """``user`` asks for ``config`` (a ``config=`` of the code when ``explicit``) where
        ``current`` is followed: whether to follow it, and whether that overrides another
        live user's ``config=`` whose settings differ (``same`` compares the settings that
        matter: the breaker's, the budget's)."""
        with STATE.lock:
            held = any(u is not user for u in self._explicit)  # others' config=, alive
            if explicit:
                self._explicit.add(user)
            else:
                self._explicit.discard(user)
        if config == current or (held and not explicit):
            return False, False  # (the latter: a config= of the code decides, not the env)
        return True, held and not same(config, current)

    def hold(self, user: object) -> None:
        """``user``, about to ask with a ``config=`` of the code, holds its settings from
        now on (under ``STATE.lock``, with the lookup that found the budget or breaker it
        asks: see ``_budget.forget_unused``); :meth:`asks` decides as it would without."""
        self._explicit.add(user)

    def any_explicit(self) -> bool:
        """Whether a user that gave a ``config=`` of the code lives (asked under
        ``STATE.lock``, as :meth:`asks` records them)."""
        return len(self._explicit) > 0


def role_problem(name: object) -> str | None:
    """What is wrong with ``name`` as a PostgreSQL role name (None: nothing)."""
    if not isinstance(name, str):
        return f"must be a role name (a string) or None, got {type(name).__name__}"
    if not name:
        return "must be a role name, got an empty one"
    if utf8_problem(name) is not None:
        # (os.environ's spelling of a byte of another encoding: the codec's error said only
        # what it could not encode)
        return "is not UTF-8 text (a byte of another encoding?); give the role's name in UTF-8"
    if name != name.strip():
        # the environment's value is stripped: " admin " there names the role admin; here it
        # would name no role anyone made, and markers owned by admin would go untrusted
        return f"has spaces at its ends ({name!r}); give the role's name without them"
    if "\x00" in name:
        return "a role name can't hold a NUL character"
    if "://" in name:
        # a Redis or database URL set here by mistake (the one setting of free text): taken
        # for a role name, it was printed by check-config, password and all, and sent in SQL
        return (
            "looks like a URL, not a role name (a Redis or database URL set in the wrong "
            "variable?); give the name of the role that owns the commit markers"
        )
    if len(name.encode()) > _MAX_NAME_BYTES:
        return f"too long for a PostgreSQL role name (at most {_MAX_NAME_BYTES} bytes)"
    return None


def _parse(spec: _Spec, raw: str) -> Any:
    text = raw.strip()
    if spec.kind == "role":
        why = role_problem(text)
        if why is not None:
            raise ValueError(why)
        return text
    if spec.kind == "ratio":
        if text.startswith("-") and _RATIO.fullmatch(text[1:]):
            raise ValueError("must not be negative")
        if not _RATIO.fullmatch(text):
            raise ValueError("not a ratio; give a decimal number such as 0.2 (digits and a dot)")
        value = float(text)
        if value > MAX_RETRY_BUDGET:
            raise ValueError(f"too large; at most {MAX_RETRY_BUDGET:g}")
        return value
    if spec.kind == "bool":
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError("not a boolean; use true/false, 1/0, yes/no or on/off")
    if spec.kind in ("count", "ms"):
        unit = " of milliseconds" if spec.kind == "ms" else ""
        if text.startswith("-") and _DIGITS.fullmatch(text[1:]):
            raise ValueError(
                "must be at least 1" if spec.env in _AT_LEAST_ONE else "must not be negative"
            )
        # ASCII digits only: no sign, no "_", no other scripts' digits, no exponent
        if not _DIGITS.fullmatch(text):
            raise ValueError(f"not a whole number{unit} (digits 0-9 only)")
        digits = text.lstrip("0") or "0"  # leading zeros are no size
        number = int(digits) if len(digits) <= 15 else _TOO_BIG
        limit = _LIMITS[spec.field]
        if number > limit:
            raise ValueError(f"too large; at most {limit}{' ms' if spec.kind == 'ms' else ''}")
        if number == 0 and spec.env in _AT_LEAST_ONE:
            raise ValueError("must be at least 1")
        return number / 1000 if spec.kind == "ms" else number
    low = text.lower()
    if low not in spec.choices:
        raise ValueError(f"must be one of {', '.join(spec.choices)}")
    return low


def load_config(environ: Mapping[str, str] | None = None) -> Config:
    """Read the ``SELF_HEALING_*`` variables from ``environ`` (default ``os.environ``).

    Unset variables take the plan's defaults. Raises :class:`ConfigError` naming every bad
    variable and its value, including unknown ``SELF_HEALING_*`` names (a typo is an error);
    ``TypeError`` when ``environ`` is not a mapping of names to values (such as a string of
    ``NAME=value`` text).
    """
    if environ is not None and not isinstance(environ, Mapping):
        # (its value is not shown: it may be a line of settings with a Redis password)
        raise TypeError(
            "load_config(environ=...) takes a mapping of variable names to string values "
            f"(os.environ, or a dict such as {{'SELF_HEALING_ENABLED': 'false'}}), got "
            f"{type(environ).__name__}"
        )
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for name, raw in env.items():
        if not isinstance(name, str):
            problems[repr(name)] = f"an environment's names are strings, got {type(name).__name__}"
            continue
        if not name.upper().startswith(PREFIX):
            continue
        spec = _BY_ENV.get(name)
        if spec is None:
            if name.upper() in _BY_ENV:  # the name in other letters: set it as written here
                problems[name] = f"unknown setting; names are upper case: {name.upper()}"
                continue
            close = difflib.get_close_matches(name.upper(), list(_BY_ENV), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            problems[name] = f"unknown setting{hint}"
            continue
        if not isinstance(raw, str):
            problems[name] = (
                f"{raw!r} is invalid: environment values are strings, got {type(raw).__name__}"
            )
            continue
        if spec.kind == "url":  # it may carry a password: only its masked form is shown
            why = redis_url_problem(raw.strip(), unset="unset the variable")
            if why is None:
                values[spec.field] = raw.strip()
            else:
                problems[name] = why
            continue
        try:
            values[spec.field] = _parse(spec, raw)
        except ValueError as exc:
            problems[name] = f"{_shown(raw)} is invalid: {exc}"
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    merged = {**defaults, **values}
    for name, why in _contradictions(merged, _ENV_OF.__getitem__, given=values).items():
        problems.setdefault(name, why)
    if merged["redis_url"] is not None and _uses_redis(merged):
        # what every factory would refuse to start without: refused here, before anything is
        # applied, and with the other problems
        from ._fleet import _import_redis  # noqa: PLC0415 (it imports this module)

        try:
            _import_redis()
        except ConfigError as exc:
            problems.update(exc.problems)
    if problems:
        raise ConfigError(problems)
    return Config(**values)


def _uses_redis(values: Mapping[str, Any]) -> bool:
    """Whether factories made with these settings talk to the Redis they name: the breaker
    they share, or the retry budget (as ``Policy.apply_config`` decides)."""
    retry_on = values["enabled"] and values["retry"] and values["max_retries"] > 0
    return bool(
        values["enabled"]
        and (values["circuit_breaker"] or (retry_on and values["retry_budget"] is not None))
    )


class _Configurable(Protocol):
    policy: Any

    def _apply_config(self, config: Config) -> None: ...


def register_default_user(obj: _Configurable, *, read_at: int) -> None:
    """Remember a factory that uses the environment's configuration, for reload_config().

    ``read_at`` is ``STATE.reloads`` as it was before the factory read its configuration
    (:func:`factory_config`): a reload that applied its configuration in between did not
    reach the factory (not registered yet), which would have kept the configuration read
    before it (a kill switch, say) until the next reload. It is applied to it here, as that
    reload applies it to the others."""
    with STATE.lock:
        STATE.default_config_users.add(obj)
        if STATE.reloads == read_at:
            return  # (every factory's path: no reload meanwhile)
    if _reloading_in == threading.get_ident():
        return  # made by a reload's own thread (a listener of its): it applies its own
    with _RELOADING:  # (after a reload under way, which may or may not have seen it)
        config = STATE.env_config
        if config is not None and config != getattr(obj, "config", None):
            obj._apply_config(config)
            _apply_everywhere(config)


def reloaded_since(read_at: int) -> bool:
    """Whether a reload applied its configuration since ``STATE.reloads`` was ``read_at``
    (see :func:`register_default_user`). If so, one still under way in another thread is
    waited for first: once this returns True, every factory the reload knew has what it
    applied, and :func:`factory_config` reads that configuration."""
    if STATE.reloads == read_at:
        return False
    if _reloading_in != threading.get_ident():  # (not from a reload's own thread)
        with _RELOADING:
            pass
    return True


def env_config() -> Config:
    """The environment's configuration of ``with_self_healing`` without ``config=``: read at
    its first call in the process and kept, replaced by :func:`reload_config`. Only those
    two fill it: the other users of the environment's configuration (:func:`current_env_config`)
    read it without keeping it, so that an operation's first call reads the environment as it
    is then, not as it was when something else looked at it (a kill switch set in between
    would be missed by the operations while a factory made then takes it). Raises
    :class:`ConfigError` for an invalid environment."""
    config: Config | None = STATE.env_config
    if config is None:
        config = load_config()
        with STATE.lock:
            if STATE.env_config is None:  # (a reload meanwhile: its configuration stays)
                STATE.env_config = config
            config = STATE.env_config
    return config


def current_env_config() -> Config:
    """The environment's configuration for what has no factory of its own and is no operation
    (the web handlers, the guard's reports and ``bypass_transitions`` outside a factory's
    session, the commit markers' install): the one ``with_self_healing`` or
    :func:`reload_config` keeps, else the environment read now, not kept (see
    :func:`env_config`). Raises :class:`ConfigError` for an invalid environment."""
    config: Config | None = STATE.env_config
    return config if config is not None else load_config()


def factory_config() -> Config:
    """The configuration of a factory made without ``config=``: the environment, read now; but
    after a :func:`reload_config` given a mapping of its own, what that reload applied to the
    other factories (a factory made next to them, on their engine say, must not read
    ``os.environ`` instead: a kill switch set by the reload would not switch it off, and one
    on a shared engine would be refused for disagreeing with the others)."""
    config: Config | None = STATE.env_config
    if config is not None and STATE.env_given:
        return config
    return load_config()


def reload_config(environ: Mapping[str, str] | None = None) -> Config:
    """Re-read the environment and apply it to every factory created without ``config=``.

    Where it switches self-healing on, every pooled connection made while it was off commits
    through the commit protocol from the moment this returns, the ones in use too (a unit begun
    while it was off, a drop-in transaction): a lost answer of such a COMMIT is an unknown
    outcome, never a transient disconnect.

    Then every circuit breaker and retry budget shared through Redis follows what a live user
    of it asks for (a factory, ``with_self_healing``): one that no live user shares any more
    (its factories are gone, or the reload switched it off) leaves its Redis and runs on this
    process's own state until a factory of its service asks again, and a link to a Redis
    nothing is attached to any more is closed.

    Nothing changes if the environment is invalid: the :class:`ConfigError` is raised first;
    nor when a factory can't take the breaker it switches on (one made with the breaker off,
    with a ``breaker_storage=`` other than the one its service's breaker has by now): a
    ``ValueError`` says so first.
    """
    # (local imports in _reload: those modules import this one)
    global _reloading_in
    with _RELOADING:  # one reload at a time: the last one read is what every factory applies
        _reloading_in = threading.get_ident()
        try:
            return _reload(environ)
        finally:
            _reloading_in = None


_RELOADING = threading.Lock()
_reloading_in: int | None = None  # the thread holding _RELOADING, while one does


def _renew_reload_lock_in_child() -> None:
    """In a forked child: a reload that another thread of the parent was running when it forked
    never ends here (that thread does not exist), so its lock is replaced, else the child's
    first ``reload_config()`` would wait forever. Kept when the thread that forked holds it (a
    fork from inside a reload: it goes on here and releases it itself)."""
    global _RELOADING, _reloading_in
    if _reloading_in != threading.get_ident():
        _RELOADING = threading.Lock()
        _reloading_in = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_reload_lock_in_child)


def _reload(environ: Mapping[str, str] | None) -> Config:
    config = load_config(environ)
    with STATE.lock:
        users = list(STATE.default_config_users)
    for user in users:
        # a factory made with its breaker off whose service has since got a breaker of
        # another storage can't take one: refused before anything is applied, not half-way
        refused = user.policy.breaker_refused(config)
        if refused is not None:
            raise ValueError(f"reload_config() refused, nothing changed: {refused}")
    moved: list[tuple[tuple[Any, ...], Any]] = []
    with STATE.lock:
        old, STATE.env_config = STATE.env_config, config
        STATE.env_given = environ is not None  # (see factory_config)
        STATE.reloads += 1  # (see register_default_user)
        users = list(STATE.default_config_users)
        if old is not None and old != config:
            # with_self_healing's policies made for the environment's previous configuration
            # are not used again (it asks for the new one): they would keep its Redis in use.
            # Where the reload switches the breaker off or on again, or keeps the Redis, each
            # takes the new one instead, as a factory does, and stays: its breaker says "off"
            # in health() while off (an opening it held rejects nothing), starts over when on
            # again, and has the reload's numbers at once (in health() too, not from the
            # operation's next call on)
            # (operations add theirs under the lock too: see _wrapper._cached_policy)
            cached = STATE.wrapper_policies
            for key in [k for k, p in cached.items() if p.config == old and not k[4]]:
                policy = cached.pop(key)
                if old.breaker_on != config.breaker_on or old.redis_url == config.redis_url:
                    moved.append(((*key[:3], config, False, *key[5:]), policy))
    for user in users:
        user._apply_config(config)
    for key, policy in moved:
        policy.apply_config(config)
        with STATE.lock:
            STATE.wrapper_policies.setdefault(key, policy)
    _apply_everywhere(config)
    return config


def _apply_everywhere(config: Config) -> None:
    """What a reload does once its factories have ``config``: what is engine-wide or shared
    follows them."""
    from ._budget import forget_unused  # noqa: PLC0415
    from ._commit import switched_on_everywhere  # noqa: PLC0415
    from ._fleet import follow_users  # noqa: PLC0415
    from ._registry import live_policies  # noqa: PLC0415

    # connections made while self-healing was off, in use ones too, commit marked from here
    # on where this reload switched it on
    switched_on_everywhere()
    policies = live_policies()
    follow_users(policies)  # (first: a budget forgotten below leaves its Redis here)
    forget_unused(policies, config)


def _snake(name: str) -> str:
    """``resetTimeout`` as ``reset_timeout``, for the setting a keyword meant."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()
