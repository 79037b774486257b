"""How the demo shows itself: live progress (rich on a terminal, plain lines otherwise) and the
final report (a rich table, plain text, or JSON)."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

__all__ = ["PlainView", "Progress", "RichView", "View", "make_view", "plain_report"]

_BREAKER_STYLE = {"closed": "green", "open": "bold red", "half-open": "yellow"}


@dataclass(frozen=True)
class Progress:
    """A snapshot of the running demo for the live display."""

    phase: str
    elapsed: float
    seconds: float
    units_ok: int
    units_failed: int
    retries: int
    retries_by_class: Mapping[str, int]
    gave_up: int
    breaker_state: str
    breaker_opens: int
    blocked: int
    unknown_commits: int
    verified_commits: int
    faults: Mapping[str, int]
    events: tuple[str, ...] = field(default=())


class View(Protocol):
    def start(self, title: str, snapshot: Callable[[], Progress]) -> None: ...
    def event(self, at: float | None, message: str) -> None: ...
    def tick(self) -> None: ...
    def stop(self) -> None: ...
    def report(self, report: Mapping[str, Any]) -> None: ...


def _stamp(at: float | None) -> str:
    """When an event happened: seconds into the workload, or ``setup`` before it."""
    return " setup " if at is None else f"{at:6.1f}s"


def _faults_text(faults: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(faults.items()) if n) or "none yet"


class PlainView:
    """Plain lines (for logs, pipes and ``--json``): events as they happen, progress every
    ``interval`` seconds, the report as aligned text or JSON."""

    def __init__(self, out: IO[str], *, progress: IO[str], as_json: bool, interval: float) -> None:
        self.out = out
        self.progress = progress
        self.as_json = as_json
        self.interval = interval
        self._snapshot: Callable[[], Progress] | None = None
        self._last = 0.0
        self._lock = threading.Lock()

    def _line(self, text: str) -> None:
        with self._lock:
            self.progress.write(text + "\n")
            self.progress.flush()

    def start(self, title: str, snapshot: Callable[[], Progress]) -> None:
        self._snapshot = snapshot
        self._last = time.monotonic()
        self._line(title)

    def event(self, at: float | None, message: str) -> None:
        self._line(f"[{_stamp(at)}] {message}")

    def tick(self) -> None:
        if self._snapshot is None or time.monotonic() - self._last < self.interval:
            return
        self._last = time.monotonic()
        p = self._snapshot()
        self._line(
            f"[{p.elapsed:6.1f}s] {p.phase}: units {p.units_ok} ok / {p.units_failed} failed, "
            f"retries {p.retries}, breaker {p.breaker_state} (opened {p.breaker_opens}), "
            f"blocked transitions {p.blocked}, unknown commits {p.unknown_commits}; "
            f"faults: {_faults_text(p.faults)}"
        )

    def stop(self) -> None:
        self._snapshot = None

    def report(self, report: Mapping[str, Any]) -> None:
        if self.as_json:
            self.out.write(json.dumps(report, indent=2, sort_keys=False) + "\n")
        else:
            self.out.write(plain_report(report))
        self.out.flush()


def plain_report(report: Mapping[str, Any]) -> str:
    lines = ["", "resilient-db demo report", "=" * 24]
    for label, value in _figures(report):
        lines.append(f"  {label:<34} {value}")
    lines += ["", "invariants (checked against the database)"]
    for name, check in report["invariants"].items():
        mark = "PASS" if check["passed"] else "FAIL"
        lines.append(f"  [{mark}] {name}: {check['detail']}")
    lines += ["", "RESULT: " + ("OK" if report["ok"] else "FAILED"), ""]
    return "\n".join(lines)


def _figures(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    by_via = report.get("illegal_transitions_blocked_by_via", {})
    return [
        ("server", str(report["server"])),
        *_kept(report),
        ("workload", f"{_workers(report['workers'])}, {report['seconds']:.0f} s{_seed(report)}"),
        *_driver(report),
        ("units done / failed", f"{report['units_ok']} / {report['units_failed']}"),
        ("units by kind", _pairs(report.get("units_by_kind", {}))),
        ("retries (by class)", f"{report['retries']} ({_pairs(report['retries_by_class'])})"),
        ("retries by SQLSTATE", _pairs(report.get("retries_by_sqlstate", {}))),
        ("faults injected", f"{sum(report['faults_injected'].values())}"),
        *[(f"  {k}", str(n)) for k, n in sorted(report["faults_injected"].items())],
        (
            "breaker opened / closed",
            f"{report['breaker_opens']} / {report['breaker_closes']} "
            f"({report.get('breaker_failed_probes', 0)} of the openings: a half-open probe "
            "failed while the database was still down)",
        ),
        *_fleet_figures(report),
        (
            "illegal transitions blocked",
            f"{report['illegal_transitions_blocked']} ({_pairs(by_via)})",
        ),
        ("commit outcome unknown", _unknown_commits(report)),
        ("commits verified after a lost answer", str(report.get("commits_verified", 0))),
        ("lost writes", str(report["lost_writes"])),
        ("duplicate writes", str(report["duplicate_writes"])),
        ("illegal states in db", str(report["illegal_states_in_db"])),
        ("timing", _timing(report.get("timing", {}))),
    ]


def _unknown_commits(report: Mapping[str, Any]) -> str:
    """The units whose COMMIT outcome stayed unknown, and what each was found to be when looked
    up by its key afterwards (else "commit outcome unknown 3" beside no failed unit read as
    three units in doubt)."""
    unknown = int(report["commit_outcome_unknown"])
    resolved = report.get("commit_outcome_unknown_resolved") or {}
    if not unknown or not resolved:
        return str(unknown)
    committed, not_committed = resolved.get("committed", 0), resolved.get("rolled_back", 0)
    return (
        f"{unknown} (each looked up by its key afterwards: {committed} committed, "
        f"{not_committed} not committed)"
    )


def _kept(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The database ``--keep-database`` keeps: its name (else only in a line of the setup,
    long scrolled away, or out of the live panel's recent events)."""
    if not report.get("database_kept"):
        return []
    return [("database", f"{report['database']} (kept: --keep-database)")]


def _driver(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What ran the units: threads on psycopg, or asyncio tasks on asyncpg (``--async``)."""
    driver = report.get("driver")
    if driver is None:
        return []
    if driver == "asyncpg":
        how = "asyncio tasks (one event loop per process), AsyncResilientSession"
    else:
        how = "worker threads, ResilientSession"
    return [("driver", f"{driver}: {how}")]


def _workers(n: int) -> str:
    return f"{n} worker" if n == 1 else f"{n} workers"


def _seed(report: Mapping[str, Any]) -> str:
    """The run's seed, as ``--seed`` takes it: the same workers' choices again."""
    return f", seed {report['seed']} (--seed {report['seed']})" if "seed" in report else ""


def _fleet_figures(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The lines of ``--processes`` / ``--ha`` runs: processes, shared breaker, retry budget,
    failover."""
    fleet = report.get("fleet")
    out: list[tuple[str, str]] = []
    if fleet:
        by = _pairs(fleet["breaker_opened_by"])
        n = fleet["processes"]
        members = "1 worker process (p1)" if n == 1 else f"{n} worker processes (p1...)"
        out.append(
            (
                "processes",
                f"{members} and p0, the fault schedule's, sharing {fleet['redis']}",
            )
        )
        out.append(
            (
                "shared breaker openings",
                f"{fleet['breaker_openings']} fleet-wide (caused by {by})",
            )
        )
        for m in fleet["members"]:
            out.append(
                (
                    f"  {m['process']} (pid {m['pid']}, {_workers(m['workers'])})",
                    f"{m['units_ok']} units, {m['retries']} retries, breaker opened "
                    f"{m['breaker_opened_here']} / followed {m['breaker_openings_seen']} "
                    f"openings, {m['breaker_rejections']} calls failed fast, budget "
                    f"{m['budget_granted']} granted / {m['budget_exhausted']} exhausted",
                )
            )
        budget = fleet["budget"]
        out.append(
            (
                "retries vs budget",
                f"{budget['outage_retries']} outage retries for {budget['first_attempts']} "
                f"units (budget {budget['ratio']:g} of recent first attempts + "
                f"{budget['floor_per_second']}/s, fleet-wide): {budget['granted']} granted, "
                f"{budget['exhausted']} units gave up at once; {budget['conflict_retries']} "
                "conflict retries (not charged)",
            )
        )
    failover = report.get("failover")
    if failover and failover.get("happened"):
        text = (
            f"primary crashed at {failover['crashed_at']:.1f} s, standby promoted "
            f"{failover.get('promoted_after', 0.0):.2f} s later ({failover['replication']} "
            "replication)"
        )
        gap = failover.get("first_write_after_crash")
        if gap is not None:
            text += (
                f"; first write on it {gap:.2f} s after the crash "
                f"({failover.get('first_write_after_promotion', 0.0):.2f} s after promotion)"
            )
        out.append(("failover", text))
        out.append(
            (
                "  writes acknowledged",
                f"{failover['writes_on_old_primary']} on the old primary, "
                f"{failover['writes_on_new_primary']} on the new one",
            )
        )
    elif failover:
        out.append(("failover", "did not happen"))
    out.extend(_redis_figures(report.get("redis_outage")))
    return out


def _redis_figures(outage: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    if not outage:
        return []
    if not outage.get("happened") or "processes" not in outage:
        return [("redis outage", f"did not happen ({outage.get('why', 'not started again')})")]
    processes = outage["processes"]
    rejoins = ", ".join(
        f"{name} {p['rejoined_after']:.2f} s" if p.get("rejoined_after") is not None else name
        for name, p in processes.items()
    )
    warned = sum(1 for p in processes.values() if p["warning_names_redis"])
    return [
        (
            "redis outage",
            f"Redis stopped at {outage['stopped_at']:.1f} s for {outage['stopped_for']:.1f} s: "
            f"{outage['units_done_during']} units written meanwhile "
            f"({_pairs(outage['units_done_during_by_process'])}), "
            f"{outage['units_failed_during']} failed",
        ),
        (
            "  processes",
            f"{warned} of {len(processes)} warned naming Redis; rejoined after its start: "
            f"{rejoins}",
        ),
    ]


def _pairs(items: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(items.items())) or "none"


def _timing(timing: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f} s" for k, v in timing.items())


class RichView:
    """A live panel on a terminal, refreshed a few times a second; the report as tables."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self._live: Any = None
        self._snapshot: Callable[[], Progress] | None = None
        self._title = ""
        self._events: deque[str] = deque(maxlen=8)
        self._ended = False

    def start(self, title: str, snapshot: Callable[[], Progress]) -> None:
        from rich.live import Live  # noqa: PLC0415 - rich is optional (the cli extra)

        self._snapshot = snapshot
        self._title = title
        self._live = Live(
            get_renderable=self._render,
            console=self.console,
            refresh_per_second=4,
            transient=False,
        )
        self._live.start()

    def event(self, at: float | None, message: str) -> None:
        line = f"[dim]{_stamp(at)}[/dim] {_escape(message)}"
        if self._ended:
            # the live panel is gone (what the cleanup says: a Redis it could not tidy): a line
            # under it, as the plain view writes it, not a panel that is never drawn again
            self.console.print(line)
            return
        self._events.append(line)

    def tick(self) -> None:
        """Nothing to do: the live display refreshes itself."""

    def stop(self) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            self._live = None
            self._ended = True

    def _render(self) -> Any:
        from rich.console import Group  # noqa: PLC0415
        from rich.panel import Panel  # noqa: PLC0415
        from rich.progress_bar import ProgressBar  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415

        if self._snapshot is None:
            return Panel("starting", title=self._title)
        p = self._snapshot()
        bar = ProgressBar(total=max(p.seconds, 0.001), completed=min(p.elapsed, p.seconds))
        stats = Table.grid(padding=(0, 2))
        stats.add_column(style="bold")
        stats.add_column()
        stats.add_column(style="bold")
        stats.add_column()
        state = p.breaker_state
        style = _BREAKER_STYLE.get(state, "white")
        classes = ", ".join(f"{k} {n}" for k, n in sorted(p.retries_by_class.items()))
        stats.add_row(
            "units done",
            f"[green]{p.units_ok}[/green]",
            "circuit breaker",
            f"[{style}]{state}[/{style}] (opened {p.breaker_opens}x)",
        )
        stats.add_row(
            "units failed",
            str(p.units_failed),
            "blocked transitions",
            f"[magenta]{p.blocked}[/magenta]",
        )
        stats.add_row(
            "retries",
            f"[yellow]{p.retries}[/yellow]" + (f" ({classes})" if classes else ""),
            "commits verified / unknown",
            f"{p.verified_commits} / {p.unknown_commits}",
        )
        stats.add_row("gave up (resumed)", str(p.gave_up), "", "")
        faults = Table.grid(padding=(0, 2))
        faults.add_column(style="cyan")
        faults.add_column(justify="right")
        for kind, n in sorted(p.faults.items()):
            if n:
                faults.add_row(kind, str(n))
        events = "\n".join(self._events) or "[dim]no events yet[/dim]"
        return Panel(
            Group(
                f"[bold]{p.phase}[/bold]  {p.elapsed:5.1f} / {p.seconds:.0f} s",
                bar,
                "",
                stats,
                "",
                Panel(faults, title="faults injected", title_align="left", border_style="cyan"),
                Panel(events, title="recent events", title_align="left", border_style="dim"),
            ),
            title=self._title,
            border_style="blue",
        )

    def report(self, report: Mapping[str, Any]) -> None:
        from rich.table import Table  # noqa: PLC0415

        figures = Table(title="resilient-db demo report", show_header=False, title_justify="left")
        figures.add_column(style="bold")
        figures.add_column()
        for label, value in _figures(report):
            figures.add_row(label, _escape(value))
        checks = Table(
            title="invariants (checked against the database)", title_justify="left", expand=False
        )
        checks.add_column("")
        checks.add_column("invariant", style="bold")
        checks.add_column("detail")
        for name, check in report["invariants"].items():
            mark = "[green]PASS[/green]" if check["passed"] else "[bold red]FAIL[/bold red]"
            checks.add_row(mark, name, _escape(check["detail"]))
        self.console.print(figures)
        self.console.print(checks)
        verdict = "[bold green]OK[/bold green]" if report["ok"] else "[bold red]FAILED[/bold red]"
        self.console.print(f"RESULT: {verdict}")


def _escape(text: str) -> str:
    from rich.markup import escape  # noqa: PLC0415

    return escape(text)


def make_view(*, out: IO[str], err: IO[str], as_json: bool, plain: bool) -> View:
    """Rich on a terminal (when rich is installed), plain lines otherwise. With ``as_json``
    progress goes to ``err`` and only the JSON report to ``out``."""
    if not as_json and not plain and out.isatty():
        try:
            from rich.console import Console  # noqa: PLC0415
        except ImportError:
            pass
        else:
            return RichView(Console(file=out))
    return PlainView(out, progress=err if as_json else out, as_json=as_json, interval=3.0)
