"""The transition guard's counters and its report of a blocked move, through the one emitter.

The counters live in :data:`resilient_db._state.STATE` (``reset_state()`` zeroes them); every
block goes through :func:`resilient_db._observability.emit`, so the logging switches apply and
the hooks see it.
"""

from __future__ import annotations

import logging
from typing import Any

from resilient_db._config import Config, current_env_config
from resilient_db._errors import ConfigError, IllegalTransitionError, StaleTransitionError
from resilient_db._observability import TransitionCounters, emit
from resilient_db._state import STATE
from resilient_db._statements import current_attempt

from ._rules import plain

__all__ = ["count", "env_config", "logger", "report", "row_keys", "row_label", "transition_stats"]

logger = logging.getLogger("resilient_db.transitions")


def count(name: str, amount: int = 1) -> None:
    with STATE.lock:
        STATE.transition_stats[name] += amount


def transition_stats() -> TransitionCounters:
    """Counters since process start, stable names for ``health()`` and metrics.

    ``blocked_transitions``: rows whose illegal move was refused, one per row (and guarded
    column: a row moving two guarded columns illegally counts two), whatever path refused it
    (a flush, the database trigger, a bulk UPDATE that raised, or one whose filter left the
    row unchanged): the sum of the ``blocked_rows`` of every ``transition_blocked``
    event that is not stale, as OpenTelemetry's ``resilient_db.transitions.blocked`` counts
    it. ``stale_transitions``: moves refused because another transaction had moved the row
    (not among the blocked). ``bulk_rows_filtered``: of the blocked, the rows a bulk UPDATE
    left unchanged in filter mode. ``bypasses``: audited bypasses of the guard.
    ``connections_without_triggers``: new connections of a resilient factory's engine whose
    ``session_replication_role`` was ``replica`` (the role's or the database's setting): the
    transition trigger does not fire on them (the ``triggers_off`` warning, once per engine).
    """
    with STATE.lock:
        stats = dict(STATE.transition_stats)
    # the filter's rows are counted once, as filtered; they are blocked transitions too
    return {
        "blocked_transitions": stats["blocked_transitions"] + stats["bulk_rows_filtered"],
        "stale_transitions": stats["stale_transitions"],
        "bulk_rows_filtered": stats["bulk_rows_filtered"],
        "bypasses": stats["bypasses"],
        "connections_without_triggers": stats["connections_without_triggers"],
    }


def report(
    err: IllegalTransitionError,
    config: Config | None,
    *,
    blocked_rows: int = 1,
    service: str | None = None,
) -> None:
    """Count ``err`` and report it through the one emitter (hooks and the ``[SELF-HEAL]`` line,
    under ``config``'s switches; ``None``: the environment's configuration). ``blocked_rows``:
    the rows whose move ``err`` refused (a bulk UPDATE in raise mode names the first of them);
    each counts as one blocked (or stale) transition. ``service``: the service of the session
    (or engine) it happened on, named where no unit or operation runs (see
    :func:`unit_service`)."""
    stale = isinstance(err, StaleTransitionError)
    count("stale_transitions" if stale else "blocked_transitions", blocked_rows)
    cfg = config if config is not None else env_config()
    service = unit_service(service)
    emit(
        cfg,
        logger,
        logging.WARNING if stale else logging.ERROR,
        "Status transition blocked%s: %s%s.%s %s -> %r (via %s)%s",
        " (row moved by another transaction)" if stale else "",
        service_words(service),
        row_label(err.model, err.pk, cfg),
        err.column,
        "(new row)" if err.inserted else repr(plain(err.from_state)),
        plain(err.to_state),
        err.via,
        f"; {err.reason}" if err.reason else "",
        event="transition_blocked",
        unit_service=service,
        model=err.model,
        column=err.column,
        from_state=plain(err.from_state),
        to_state=plain(err.to_state),
        via=err.via,
        stale=stale,
        blocked_rows=blocked_rows,
        **row_keys(err.pk, cfg),
    )


def unit_service(otherwise: str | None = None) -> str | None:
    """The service of the unit (or operation) a block happened in; outside any, ``otherwise``
    (the service of the drop-in session or engine it happened on, where known): a field of
    its own in every ``transition_blocked`` event, the guard's events being process-wide (as
    health()'s transitions are: the dashboard keeps them in one series, service None)."""
    attempt = current_attempt.get()
    return otherwise if attempt is None else attempt.speaker[1]


def service_words(service: str | None) -> str:
    """``service=NAME `` for a block's line when it happened in a unit (or operation) of that
    service, as every other ``[SELF-HEAL]`` line names its service (outside any, the drop-in
    session's or engine's, where known; nothing when none is)."""
    return "" if service is None else f"service={service} "


def row_label(model: str, pk: object, config: Config) -> str:
    """``Model(pk=...)`` when the operator opted in to row keys in logs
    (``SELF_HEALING_LOG_ROW_KEYS``), else just ``Model``: a key can be personal data (an
    e-mail address); it stays in the exception's ``pk`` either way."""
    return f"{model}(pk={pk!r})" if config.log_row_keys else model


def row_keys(pk: object, config: Config) -> dict[str, Any]:
    """The ``pk`` field of a report, only when the operator opted in."""
    return {"pk": pk} if config.log_row_keys else {}


def env_config() -> Config:
    """The environment's configuration, for reports outside any factory's session (see
    :func:`resilient_db._config.current_env_config`)."""
    try:
        return current_env_config()
    except ConfigError:  # a bad environment must not hide the report
        return Config()
