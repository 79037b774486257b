"""One process of a fleet, driven by a test through stdin/stdout (one JSON object a line).

Started by :class:`tests.fleet.Fleet` with ``SELF_HEALING_*`` in its environment, the database
URL in ``RDB_WORKER_DB_URL`` and the service name in ``RDB_WORKER_SERVICE``. Every unit of work
is ``SELECT rdb_gate()`` on a new connection (NullPool, so a fault proxy in front of the server
counts one connection per unit that reached the database). ``[SELF-HEAL]`` lines go to stderr.

Commands (``{"op": ...}``) and answers:
- ``run`` ``n``: n units one after the other -> ``{"ok": k, "open": k, "errors": {sqlstate: k}}``
  (and ``at``: the wall-clock time it ended)
- ``start`` ``n``: n units at once in threads; ``progress`` -> the same counts plus ``done``
- ``loop_start`` / ``loop_stats`` / ``loop_stop``: units back to back in a thread
- ``wait`` ``what`` (``connected``, ``disconnected``, ``open``, ``closed``), ``timeout`` ->
  ``{"ok": bool, "waited": seconds, "at": wall-clock time}``
- ``health`` -> ``rdb.health()``; ``exit``
- ``open_breaker`` (``reason``, ``seconds``) / ``close_breaker`` (``reason``) -> ``{"fleet_wide"}``
- ``try``: one unit -> ``{"outcome": "ok" | "open"}``, a refusal's ``message``, ``cause``,
  ``by_hand``
- ``wait_timeline`` ``timeline``, ``timeout``: until the link knows a cluster on that timeline
  or above (the fleet's timelines) -> ``{"ok": bool, "waited": seconds}``
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections import Counter
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

import resilient_db as rdb

SERVICE = os.environ["RDB_WORKER_SERVICE"]


class Worker:
    def __init__(self) -> None:
        engine = sa.create_engine(os.environ["RDB_WORKER_DB_URL"], poolclass=NullPool)
        self.factory = rdb.ResilientSession(engine, service=SERVICE)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.started = 0
        self.loop_counts: Counter[str] = Counter()
        self.loop_stop = threading.Event()
        self.loop_thread: threading.Thread | None = None

    def unit(self) -> str:
        try:
            self.factory.run(lambda s: s.execute(sa.text("SELECT rdb_gate()")).scalar_one())
        except rdb.CircuitOpenError:
            return "open"
        except sa.exc.DBAPIError as exc:
            return f"error:{getattr(exc.orig, 'sqlstate', None) or 'disconnect'}"
        return "ok"

    def _counted(self) -> None:
        outcome = self.unit()
        with self.lock:
            self.counts[outcome] += 1

    def breaker(self) -> dict[str, Any]:
        entry = rdb.health()["services"].get(SERVICE) or {}
        return entry.get("breaker") or {}

    def handle(self, cmd: dict[str, Any]) -> Any:
        op = cmd["op"]
        if op == "run":
            counts = Counter(self.unit() for _ in range(int(cmd["n"])))
            return {**_summary(counts), "at": time.time()}
        if op == "start":
            with self.lock:
                self.counts.clear()
                self.started = int(cmd["n"])
            for _ in range(self.started):
                threading.Thread(target=self._counted, daemon=True).start()
            return {"started": self.started}
        if op == "progress":
            with self.lock:
                return {**_summary(self.counts), "done": sum(self.counts.values())}
        if op == "loop_start":
            self.loop_stop.clear()
            self.loop_counts.clear()
            self.loop_thread = threading.Thread(target=self._loop, daemon=True)
            self.loop_thread.start()
            return {"started": True}
        if op == "loop_stats":
            with self.lock:
                return _summary(self.loop_counts)
        if op == "loop_stop":
            self.loop_stop.set()
            if self.loop_thread is not None:
                self.loop_thread.join(timeout=30)
            with self.lock:
                return _summary(self.loop_counts)
        if op == "wait":
            return self.wait(str(cmd["what"]), float(cmd.get("timeout", 10)))
        if op == "health":
            return rdb.health()
        if op == "open_breaker":
            return {
                "fleet_wide": rdb.open_breaker(
                    SERVICE, reason=cmd.get("reason"), seconds=cmd.get("seconds")
                )
            }
        if op == "close_breaker":
            return {"fleet_wide": rdb.close_breaker(SERVICE, reason=cmd.get("reason"))}
        if op == "try":
            return self.one_unit()
        if op == "wait_timeline":
            return self.wait_timeline(int(cmd["timeline"]), float(cmd.get("timeout", 10)))
        raise ValueError(f"unknown op {op!r}")

    def one_unit(self) -> dict[str, Any]:
        """One unit: its outcome, and a refusal's message, ``cause`` and ``by_hand``."""
        try:
            self.factory.run(lambda s: s.execute(sa.text("SELECT rdb_gate()")).scalar_one())
        except rdb.CircuitOpenError as exc:
            return {
                "outcome": "open",
                "message": str(exc),
                "cause": exc.cause,
                "by_hand": exc.by_hand,
            }
        return {"outcome": "ok"}

    def wait_timeline(self, timeline: int, timeout: float) -> dict[str, Any]:
        """Wait until this process's link to Redis knows a cluster on ``timeline`` or above
        (the fleet's timelines, see ``_fleet.TIMELINES_KEY``; bounded by ``timeout``)."""
        from resilient_db._fleet import links  # noqa: PLC0415 - private, this test helper only

        started = time.monotonic()
        while True:
            known = [
                seen[0]
                for link in links().values()
                for seen in getattr(link, "timelines", {}).values()
            ]
            waited = time.monotonic() - started
            done = any(t >= timeline for t in known)
            if done or waited > timeout:
                return {"ok": done, "waited": waited}
            time.sleep(0.002)

    def _loop(self) -> None:
        while not self.loop_stop.is_set():
            outcome = self.unit()
            with self.lock:
                self.loop_counts[outcome] += 1

    def wait(self, what: str, timeout: float) -> dict[str, Any]:
        started = time.monotonic()
        while True:
            breaker = self.breaker()
            shared = breaker.get("shared") or {}
            done = {
                "connected": shared.get("connected") is True,
                "disconnected": shared.get("connected") is False,
                "open": breaker.get("state") == "open",
                "closed": breaker.get("state") == "closed",
            }[what]
            waited = time.monotonic() - started
            if done or waited > timeout:
                return {"ok": done, "waited": waited, "at": time.time()}
            time.sleep(0.002)


def _summary(counts: Counter[str]) -> dict[str, Any]:
    errors = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("error:")}
    return {"ok": counts["ok"], "open": counts["open"], "errors": errors}


def main() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(process)d %(message)s"))
    logger = logging.getLogger("resilient_db")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    worker = Worker()
    # the breaker exists from the start (it connects to Redis in the background)
    rdb.health()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            break
        try:
            answer = worker.handle(cmd)
        except Exception as exc:  # report to the test, which fails with it
            answer = {"exception": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
