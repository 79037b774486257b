"""The dashboard served on its own (``uvicorn.run(dashboard(...))``, no application around it):
a real uvicorn with its lifespan on, which the dashboard answers (startup, then shutdown:
uvicorn refuses to start an app that does not); a health check that is a plain function
returning an awaitable (``lambda: check()``), whose result is awaited, values JSON can't hold
shown as text; and the background server of ``resilient-db demo --dashboard-port`` given a
port that is taken: an ``OSError``, its socket closed."""

from __future__ import annotations

import datetime
import decimal
import json
import socket
import urllib.request
from typing import Any

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from scenarios import served

from resilient_db.web import dashboard, token_auth
from resilient_db.web._serve import serve_in_background

TOKEN = "served-alone-token"
CHECKED = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)


async def _health() -> dict[str, Any]:
    return {"status": "ok", "checked_at": CHECKED, "lag": decimal.Decimal("0.25")}


def _get(url: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.status, answer.read()


def test_the_dashboard_alone_under_uvicorn_with_its_lifespan(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # (a plain function returning the coroutine, not the coroutine function itself)
    app = dashboard(auth=token_auth(TOKEN), health=lambda: _health())  # noqa: PLW0108
    with served(app) as url:
        status, page = _get(url + "/")
        assert status == 200
        assert b"<html" in page.lower()
        status, body = _get(url + "/data.json")
    assert status == 200
    data = json.loads(body)
    assert data["health"] == {
        "status": "ok",
        "checked_at": str(CHECKED),
        "lag": "0.25",
    }
    errors = [r.getMessage() for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert errors == []  # (lifespan startup and shutdown answered: nothing failed)


def test_a_port_that_is_taken_is_an_oserror() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        # (an unclosed socket of its own would be a ResourceWarning: an error here)
        with pytest.raises(OSError, match=r"[Aa]ddress already in use"):
            serve_in_background(dashboard(auth=token_auth(TOKEN)), port)


@pytest.mark.parametrize(("status", "title"), [(401, "Unauthorized"), (499, "Error")])
def test_an_auth_check_raising_a_status_of_its_own(status: int, title: str) -> None:
    """An auth check raising Starlette's ``HTTPException``: answered with its status, its
    headers and its detail as a problem; a status HTTP names no phrase for (nginx's 499) is
    titled "Error"."""
    from starlette.exceptions import HTTPException  # noqa: PLC0415
    from starlette.requests import Request  # noqa: PLC0415
    from starlette.testclient import TestClient  # noqa: PLC0415

    def check(request: Request) -> bool:
        raise HTTPException(status, "planned refusal", headers={"X-Why": "planned"})

    client = TestClient(dashboard(auth=check))
    for path in ("/", "/data.json"):
        answer = client.get(path)
        assert answer.status_code == status
        assert answer.headers["x-why"] == "planned"
        assert answer.headers["content-type"].startswith("application/problem+json")
        body = answer.json()
        assert (body["status"], body["title"], body["detail"]) == (status, title, "planned refusal")
