"""OpenTelemetry for resilient_db (the optional ``otel`` extra: ``opentelemetry-api``).

``install_opentelemetry()`` records retries, breaker transitions, commit verifications, blocked
transitions and every other self-healing action as span events on the current span and as OTel
counters, through the public hook API. Idempotent; ``uninstall_opentelemetry()`` removes it.
"""

from __future__ import annotations

from ._otel import OpenTelemetryHook, install_opentelemetry, uninstall_opentelemetry

__all__ = ["OpenTelemetryHook", "install_opentelemetry", "uninstall_opentelemetry"]
