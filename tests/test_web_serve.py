"""The dashboard's background server (``resilient-db demo``'s, served from a thread of the
process it reports on) changes nothing process-wide.

uvicorn before 0.36, asked for its default loop ("auto"), sets asyncio's event loop policy to
uvloop's for the whole process when uvloop is installed: every later ``asyncio.run`` of the
application (or of the tests after it) ran on uvloop. The server is told to use the loop
asyncio's policy gives ("none") instead, whatever uvicorn release serves it."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from resilient_db.web._serve import serve_in_background


def test_serving_in_the_background_leaves_the_event_loop_policy_as_it_was() -> None:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse(type(asyncio.get_running_loop()).__module__)

    app = Starlette(routes=[Route("/", hello)])
    before = asyncio.get_event_loop_policy()
    made = before.new_event_loop()
    made.close()
    with (
        serve_in_background(app) as server,
        urllib.request.urlopen(server.url + "/", timeout=10) as answer,
    ):
        assert answer.status == 200
        # the server's loop is the one the process's policy makes
        assert answer.read().decode() == type(made).__module__
    assert asyncio.get_event_loop_policy() is before
