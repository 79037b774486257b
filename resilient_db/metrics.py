"""Prometheus metrics for resilient_db (the optional ``prometheus`` extra).

``register()`` adds a collector reading :func:`resilient_db.health` at scrape time to the default
registry (or the one given); ``serve(port)`` also starts an HTTP endpoint on 127.0.0.1. The
metric names are listed in :mod:`resilient_db._metrics`.
"""

from __future__ import annotations

from ._metrics import HealthCollector, MetricsServer, register, serve

__all__ = ["HealthCollector", "MetricsServer", "register", "serve"]
