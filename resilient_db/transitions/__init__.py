"""The status-transition guard: rules declared once on the model, enforced on every write path.

A model declares which moves its status column may make::

    class Task(Base):
        __transitions__ = TransitionRules(
            column="status",
            transitions={"pending": {"in_progress", "cancelled"}, "in_progress": {"done"}},
            initial={"pending"},
        )

The same rules are enforced in three places:

1. **flush** (``before_flush``): every changed row is checked against the state it was loaded in,
   before anything is sent; the write is a compare-and-set carried by the flush's own UPDATE
   (``... WHERE id = :id AND status = :loaded``, as SQLAlchemy's ``version_id_col`` does), and a
   row that another transaction moved matches no row and raises :class:`StaleTransitionError`.
   New rows must start in an initial state.
2. **ORM bulk UPDATE** (``do_orm_execute``): ``update(Task).values(status=...)`` is restricted to
   the rows that may legally make the move (or raises, in ``bulk_update="raise"`` mode).
3. **the database** (:func:`transition_trigger_sql`): a generated PostgreSQL trigger blocks every
   other path (Core, raw SQL, other programs) with SQLSTATE :data:`TRANSITION_SQLSTATE`, which
   ``exception_from_db`` maps back to :class:`IllegalTransitionError`.

Rules are frozen data compiled once per mapper; nothing is kept per row beyond the flush that
writes it. The guards never do implicit lazy I/O, so they work unchanged under ``AsyncSession``.

The modules, each importing only those listed before it; ``_rules``, ``_sql``, ``_diagrams``,
``_report`` and ``_dbmap`` need no server and no session (``tests/test_transitions_pure.py``):

* ``_rules``: :class:`TransitionRules`, validation, the compiled guard per mapper, introspection
* ``_sql``: the trigger's SQL text (names, quoting, stamp); ``_diagrams``: Mermaid and Graphviz
* ``_report``: the guard's counters and its report through the one emitter
* ``_dbmap``: the trigger's SQLSTATE mapped back to :class:`IllegalTransitionError`
* ``_install``: running the statements, install / uninstall, drift detection;
  :class:`TransitionTrigger`, a trigger described without a mapped class (what a migration
  installs), compiled by ``_rules`` and registered nowhere
* ``_bypass``: when the session guards act, and the audited bypass
* ``_changes``: what the session guards share (a row's change, its errors, reads by key)
* ``_flush``: the flush guard and its compare-and-set; ``_bulk``: the ORM bulk-UPDATE guard
* ``_guards``: the session guards' listeners, wired into SQLAlchemy
"""

from __future__ import annotations

from . import _guards  # noqa: F401 - its mapper_configured listener checks rules as models map
from ._bypass import bypass_transitions, bypass_transitions_async
from ._diagrams import rules_to_dot, rules_to_mermaid
from ._install import (
    ScriptOnPreparedStatementError,
    TransitionTrigger,
    TriggerInstallRefusedError,
    install_transition_trigger,
    transition_trigger_drop_sql,
    transition_trigger_sql,
    trigger_drift,
    uninstall_transition_trigger,
)
from ._rules import (
    ANY_STATE,
    TransitionRules,
    TransitionRulesError,
    allowed_transitions,
    transition_rules,
)
from ._sql import (
    BYPASS_ROLE,
    BYPASS_SETTING,
    TRANSITION_SQLSTATE,
)

__all__ = [
    "ANY_STATE",
    "BYPASS_ROLE",
    "BYPASS_SETTING",
    "TRANSITION_SQLSTATE",
    "ScriptOnPreparedStatementError",
    "TransitionRules",
    "TransitionRulesError",
    "TransitionTrigger",
    "TriggerInstallRefusedError",
    "allowed_transitions",
    "bypass_transitions",
    "bypass_transitions_async",
    "install_transition_trigger",
    "rules_to_dot",
    "rules_to_mermaid",
    "transition_rules",
    "transition_trigger_drop_sql",
    "transition_trigger_sql",
    "trigger_drift",
    "uninstall_transition_trigger",
]
