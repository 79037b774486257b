"""Shared test setup.

The fixtures (``pg_server``, ``pg_database``, ``pg_url``, ``pg_async_url``, ``fault_proxy``) and
the ``server_control`` marker come from the ``resilient_db`` pytest plugin
(:mod:`resilient_db.testing._pytest_plugin`), which the package's ``pytest11`` entry point loads.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import resilient_db as rdb


def pytest_configure(config: pytest.Config) -> None:
    # running from a source tree that is not pip-installed: no entry point, load the plugin here
    if not config.pluginmanager.has_plugin("resilient_db"):
        config.pluginmanager.import_plugin("resilient_db.testing._pytest_plugin")


@pytest.fixture(autouse=True)
def _fresh_self_healing_state() -> Iterator[None]:
    """Breakers and counters are process-wide (one per service): start every test clean."""
    yield
    rdb.reset_state()
