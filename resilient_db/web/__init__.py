"""resilient_db for web applications (the ``web`` extra: Starlette, so FastAPI too).

* :func:`install_exception_handlers` answers resilient_db's errors with RFC 9457 problem details
  (:func:`problem_details` builds them for any framework);
* :func:`dashboard` is the ``/admin/self-healing`` page (ASGI), behind an explicit ``auth=``
  check (:func:`token_auth` is one).

::

    from resilient_db.web import dashboard, install_exception_handlers

    install_exception_handlers(app)
    app.mount("/admin/self-healing", dashboard(auth=check))

The dashboard's ``data.json`` (and :meth:`Dashboard.data`) is typed as :class:`DashboardData`,
:meth:`Recorder.snapshot` as :class:`RecorderSnapshot`: ``TypedDict`` types (plain dicts at run
time).
"""

from __future__ import annotations

try:
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError("resilient_db.web needs Starlette: pip install 'resilient-db[web]'") from exc

from ._dashboard import (
    AuthCheck,
    Dashboard,
    DashboardData,
    DashboardProcess,
    HealthProblem,
    dashboard,
    token_auth,
)
from ._handlers import install_exception_handlers, problem_response
from ._problems import PROBLEM_JSON, PROBLEM_TYPE_BASE, Problem, problem_details
from ._recorder import EventFields, RecordedEvent, Recorder, RecorderSnapshot, ServiceSeries

__all__ = [
    "PROBLEM_JSON",
    "PROBLEM_TYPE_BASE",
    "AuthCheck",
    "Dashboard",
    "DashboardData",
    "DashboardProcess",
    "EventFields",
    "HealthProblem",
    "Problem",
    "RecordedEvent",
    "Recorder",
    "RecorderSnapshot",
    "ServiceSeries",
    "dashboard",
    "install_exception_handlers",
    "problem_details",
    "problem_response",
    "token_auth",
]
