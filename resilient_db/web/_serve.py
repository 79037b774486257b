"""Serve an ASGI app (the dashboard) from a background thread with uvicorn, on 127.0.0.1 by
default: for ``resilient-db demo --dashboard-port`` and for tests. An application serves the
dashboard with its own server by mounting it instead."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["BackgroundServer", "serve_in_background"]


@dataclass
class BackgroundServer:
    """A running server: ``url`` (``http://host:port``), :meth:`close` stops it."""

    url: str
    port: int
    _server: Any
    _thread: threading.Thread

    def close(self, timeout: float = 5.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_in_background(
    app: Any, port: int = 0, *, host: str = "127.0.0.1", timeout: float = 10.0
) -> BackgroundServer:
    """Bind ``host:port`` now (an ``OSError`` if taken; port 0 picks a free one), then serve
    ``app`` with uvicorn from a daemon thread; returns once it accepts connections."""
    try:
        import uvicorn  # noqa: PLC0415 - the web extra
    except ImportError as exc:
        raise ImportError(
            "serving the dashboard needs uvicorn: pip install 'resilient-db[web]'"
        ) from exc
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    # loop="none": the loop asyncio's policy gives. uvicorn's default ("auto") before 0.36
    # switched the whole process's policy to uvloop's where uvloop is installed, so every later
    # asyncio.run of the application's ran on it too
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, loop="none")
    server = uvicorn.Server(config)

    def run() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()

    thread = threading.Thread(target=run, name=f"dashboard-{bound}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(timeout)
            raise OSError(f"the server on {host}:{bound} did not start")
        time.sleep(0.01)
    return BackgroundServer(f"http://{host}:{bound}", bound, server, thread)
