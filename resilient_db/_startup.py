"""The ``resilient-db`` command's signals, from the interpreter's start to the command's end.

``python -m resilient_db`` and the console script import the whole package (SQLAlchemy, the
drivers, pybreaker, redis: half a second or more) before any of the command's code runs, so
Ctrl-C in that window ended in the traceback of whatever module was importing, and SIGTERM or
SIGHUP ended the process without a word. The first thing the package imports is this module:
when the interpreter was started as the command (``python -m resilient_db``, or the
``resilient-db`` console script), it answers SIGINT, SIGTERM and SIGHUP with the
command's line (``resilient-db demo: interrupted``) and exit status 130, 143 or 129 until
:func:`hand_over`, which the command's ``main()`` calls once it handles them itself. A
program that merely imports the package is left alone.

:func:`sigterm_interrupts` is the demo's: SIGTERM and SIGHUP raised as :class:`Terminated` and
:class:`HungUp` (a ``KeyboardInterrupt``, so the demo cleans up as after Ctrl-C). Kept here,
light to import, so the command can put it in place before it imports the demo (a second or
more, during which SIGTERM ended the command without a word).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any

__all__ = [
    "ENDING_SIGNALS",
    "HungUp",
    "Terminated",
    "hand_over",
    "interrupted_line",
    "sigterm_interrupts",
]

_COMMANDS = ("demo", "check-config", "rules", "breaker")
_MODULES = ("resilient_db", "resilient_db.__main__")
#: the console script's name, as installers write it (pyproject.toml's [project.scripts]; not
#: recognised: Windows' launcher .exe, which runs a __main__.py of its own)
_SCRIPTS = ("resilient-db",)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, ``docker stop``, a cancelled CI job), raised where Ctrl-C's
    KeyboardInterrupt would be: the demo stops its workers, servers and processes, drops its
    scratch database (or keeps it, with ``--keep-database``) and exits 143."""

    status = 143
    said = "terminated"


class HungUp(Terminated):
    """SIGHUP (the terminal closed, the SSH session ended): the same cleanup, exit 129."""

    status = 129
    said = "hung up"


#: the signals that end the demo as Ctrl-C does, each with what it raises (no SIGHUP on Windows)
ENDING_SIGNALS: dict[int, type[Terminated]] = {signal.SIGTERM: Terminated}
if hasattr(signal, "SIGHUP"):
    ENDING_SIGNALS[signal.SIGHUP] = HungUp


def interrupted_line(words: Sequence[str], said: str = "interrupted") -> str:
    """What the command says when a signal ends it before it started: ``resilient-db demo:
    interrupted`` (its command named when the first word given is one)."""
    command = next((word for word in words if not word.startswith("-")), None)
    prog = f"resilient-db {command}" if command in _COMMANDS else "resilient-db"
    return f"{prog}: {said}\n"


def _command_words() -> list[str] | None:
    """The words given to the command while this interpreter, started as the command, imports
    the package, else None. The console script (its wrapper, ``from resilient_db._cli import
    main``, run as ``__main__``) by its name; ``python -m resilient_db`` by ``sys.argv[0]``,
    ``"-m"`` while runpy locates the module, and ``sys.orig_argv``."""
    if not sys.argv:
        return None
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if (
        script is not None
        and getattr(main, "__spec__", None) is None  # run as a script, not with -m
        and os.path.basename(script) in _SCRIPTS
        and os.path.basename(sys.argv[0]) in _SCRIPTS
    ):
        return sys.argv[1:]
    if sys.argv[0] != "-m":
        return None
    argv = list(getattr(sys, "orig_argv", ()))
    for at in range(1, len(argv)):
        word = argv[at]
        if word == "-m":
            name, rest = (argv[at + 1] if at + 1 < len(argv) else ""), argv[at + 2 :]
        elif word.startswith("-m"):  # -mresilient_db
            name, rest = word[2:], argv[at + 1 :]
        else:
            continue
        return rest if name in _MODULES else None
    return None


# (signal, what it was before): the command's answers in place until hand_over()
_answering: dict[int, Any] = {}


def _answer(signum: int, frame: FrameType | None) -> None:
    for answered in _answering:  # a second signal, of any kind: the exit goes on
        signal.signal(answered, signal.SIG_IGN)
    ending = ENDING_SIGNALS.get(signum)
    status, said = (ending.status, ending.said) if ending else (130, "interrupted")
    if ending is HungUp:
        silence_hung_up_terminal()
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(interrupted_line(_words, said))
        sys.stderr.flush()
    raise SystemExit(status)


_words: list[str] = []


def _install() -> None:
    global _words
    words = _command_words()
    if words is None or threading.current_thread() is not threading.main_thread():
        return
    _words = words
    # each only where it has its default: Ctrl-C ignored (a background job), SIGHUP ignored
    # (nohup), or a handler of whoever started the interpreter, stay as they are
    defaults: dict[int, Any] = {signal.SIGINT: signal.default_int_handler}
    defaults.update(dict.fromkeys(ENDING_SIGNALS, signal.SIG_DFL))
    for signum, default in defaults.items():
        if signal.getsignal(signum) is default:
            _answering[signum] = signal.signal(signum, _answer)


def hand_over() -> None:
    """The command handles its signals from here on: each of ours goes back to what it was
    (Ctrl-C raises ``KeyboardInterrupt`` again)."""
    for signum, previous in _answering.items():
        if signal.getsignal(signum) is _answer:
            signal.signal(signum, previous)
    _answering.clear()


def silence_hung_up_terminal() -> None:
    """Point standard output and error at the null device where they are a terminal that hung
    up (it refuses even an empty write): what the demo still writes on its way out (the live
    display's last refresh, the line saying why it ended) failed there and cut its cleanup
    short, its servers left to their watchdogs and its exit status 1."""
    for fd in (1, 2):
        try:
            os.write(fd, b"")
        except OSError:
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, fd)
                os.close(devnull)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` and SIGHUP into :class:`HungUp` while the demo
    runs. Left to the default (killed on the spot: only the servers' watchdogs clean up, seconds
    later, and a database kept with ``--keep-database`` is dropped) outside the main thread,
    where no handler can be set. A signal ignored when the demo starts stays ignored: ``nohup
    resilient-db demo`` keeps running when its terminal closes, as nohup is for."""

    def terminated(signum: int, frame: Any) -> None:
        for ending in ENDING_SIGNALS:  # a second one, of either kind: the cleanup goes on
            signal.signal(ending, signal.SIG_IGN)
        if signum != signal.SIGTERM:
            silence_hung_up_terminal()
        raise ENDING_SIGNALS[signum]

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        ending: signal.signal(ending, terminated)
        for ending in ENDING_SIGNALS
        if signal.getsignal(ending) is not signal.SIG_IGN
    }
    try:
        yield
    finally:
        for ending, handler in previous.items():
            signal.signal(ending, handler)


_install()
