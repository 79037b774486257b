"""Example models shipped with resilient_db.

:mod:`resilient_db.examples.tasks` is the ``tasks`` schema used by ``resilient-db demo``, the
Alembic environment in ``migrations/`` and the documentation: a task whose ``status`` moves
through declared transition rules, with a ``task_history`` row written in the same unit of work
as every change. Try ``resilient-db rules resilient_db.examples.tasks:Task``.
"""
