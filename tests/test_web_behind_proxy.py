"""An application served behind a reverse proxy's path prefix, as uvicorn's ``--root-path /api``
serves it (the proxy takes ``/api`` off each request's path; the server puts it back in the
ASGI ``path`` and gives it as ``root_path``), against the real server: a FastAPI router's and a
mounted sub-application's errors are answered as problem details, and the dashboard mounted at
``/admin/self-healing`` sets its cookie for the path the browser sees
(``/api/admin/self-healing``), sends a browser that left off the last slash there, and serves
``data.json`` to that cookie; behind a proxy that ends TLS and says so (``X-Forwarded-Proto``
from an address uvicorn trusts: 127.0.0.1 by default), the cookie is ``Secure``."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import APIRouter, FastAPI
from scenarios import served
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import resilient_db as rdb
from resilient_db.web import PROBLEM_JSON, dashboard, install_exception_handlers, token_auth
from resilient_db.web._dashboard import TOKEN_COOKIE

pytestmark = pytest.mark.usefixtures("no_backoff")

TOKEN = "proxy-prefix-token-0123"


def problem_type(answer: httpx.Response) -> str:
    assert answer.headers["content-type"] == PROBLEM_JSON, answer.text
    return f"{answer.status_code} {answer.json()['type'].rpartition(':')[2]}"


def test_an_app_behind_a_path_prefix_answers_and_serves_its_dashboard_there(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(max_retries=0, circuit_breaker=False)
    )

    def failing() -> dict[str, Any]:
        Sessions.run(lambda s: s.execute(sa.text("SELECT raise_code('40001')")))
        return {}

    router = APIRouter(prefix="/tasks")
    router.add_api_route("/failing", failing)

    def sub_route(request: Request) -> JSONResponse:
        return JSONResponse(failing())

    sub = Starlette(routes=[Route("/failing", sub_route)])
    install_exception_handlers(sub)  # a mounted application has handlers of its own
    app = FastAPI()
    app.include_router(router)
    app.mount("/v2", sub)
    app.mount("/admin/self-healing", dashboard(auth=token_auth(TOKEN)))
    install_exception_handlers(app)
    # the requests as the proxy forwards them: the prefix taken off
    with served(app, root_path="/api") as url, httpx.Client(base_url=url, timeout=30) as client:
        assert problem_type(client.get("/tasks/failing")) == "503 database-unavailable"
        assert problem_type(client.get("/v2/failing")) == "503 database-unavailable"
        # the page without its last slash: sent to the path the browser knows, token kept
        moved = client.get("/admin/self-healing", params={"token": TOKEN})
        assert moved.status_code == 307
        assert httpx.URL(moved.headers["location"]).path == "/api/admin/self-healing/"
        page = client.get("/admin/self-healing/", params={"token": TOKEN})
        assert page.status_code == 200
        cookie = page.headers["set-cookie"]
        attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert "path=/api/admin/self-healing" in attributes
        assert "secure" not in attributes  # plain http, as far as the server knows
        # the browser sends the cookie on to the page's data.json (the proxy forwards it)
        value = cookie.split(";")[0].partition("=")[2]
        data = client.get(
            "/admin/self-healing/data.json", headers={"Cookie": f"{TOKEN_COOKIE}={value}"}
        )
        assert data.status_code == 200
        assert data.json()["title"] == "Self-healing"
        # a proxy that ended TLS and says so: the cookie is Secure
        tls = client.get(
            "/admin/self-healing/",
            params={"token": TOKEN},
            headers={"X-Forwarded-Proto": "https"},
        )
        assert "secure" in {part.strip().lower() for part in tls.headers["set-cookie"].split(";")}
