"""A small FastAPI service on resilient_db: a ``tasks`` API whose routes are units of work of a
``ResilientSession``, with resilient_db's errors answered as problem details and the self-healing
dashboard mounted at ``/admin/self-healing``.

    pip install -e '.[example]'                       # in a checkout (the wheel has no examples/)
    python examples/fastapi_tasks.py                  # starts a throwaway PostgreSQL itself
    python examples/fastapi_tasks.py --url postgresql+psycopg://user:pw@127.0.0.1/app

Then (the dashboard's token is printed at start, or set ``DASHBOARD_TOKEN``)::

    curl -X POST localhost:8000/tasks -H 'content-type: application/json' -d '{"title": "write"}'
    curl -X POST localhost:8000/tasks/1/status -H 'content-type: application/json' \\
         -d '{"status": "completed"}'        # pending -> completed: 409 problem+json
    open 'http://127.0.0.1:8000/admin/self-healing/?token=...'

The schema is resilient_db's example (``resilient_db.examples.tasks``): the status column's
transition rules are enforced at flush, for bulk UPDATEs and by a database trigger. A client may
send an ``Idempotency-Key`` header when creating a task: sending it again (after a timeout, or a
``commit-outcome-unknown`` answer) returns the task made the first time instead of a second one.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import sys
import uuid
from collections.abc import Iterator
from typing import Annotated
from urllib.parse import quote

import sqlalchemy as sa
from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.examples.tasks import STATUSES, Base, Task, create_task, move_task
from resilient_db.web import dashboard, install_exception_handlers, token_auth


class TaskIn(BaseModel):
    title: str = Field(min_length=1, max_length=200)
    owner: str | None = Field(default=None, max_length=40)


class TaskOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    title: str
    status: str
    owner: str | None
    next: list[str] = []


class MoveIn(BaseModel):
    status: str = Field(max_length=20)


def out(task: Task) -> TaskOut:
    return TaskOut(
        id=task.id,
        title=task.title,
        status=task.status,
        owner=task.owner,
        next=sorted(rdb.allowed_transitions(task)),
    )


def create_app(engine: sa.Engine, *, dashboard_token: str) -> FastAPI:
    """The service: every route is one unit of work (replayed whole on a transient fault)."""
    Sessions = rdb.ResilientSession(engine, service="tasks-api")
    app = FastAPI(title="tasks")
    install_exception_handlers(app)  # 503 + Retry-After, 409, 500 commit-outcome-unknown
    app.mount(
        "/admin/self-healing",
        dashboard(auth=token_auth(dashboard_token), title="tasks API"),
    )

    @app.post("/tasks", status_code=201)
    def add_task(
        body: TaskIn, idempotency_key: Annotated[str | None, Header(max_length=80)] = None
    ) -> TaskOut:
        key = idempotency_key or str(uuid.uuid4())

        def unit(session: Session) -> TaskOut:
            made = sa.select(Task).where(Task.idem_key == key)
            task = session.scalar(made)
            if task is not None:  # sent again with the same key: the task made the first time
                return out(task)
            try:
                # in a savepoint: a duplicate key rolls back only this part, not the unit
                with session.begin_nested():
                    task = create_task(session, title=body.title, idem_key=key, owner=body.owner)
                    session.flush()
            except sa.exc.IntegrityError as exc:
                if rdb.sqlstate_of(exc) != "23505":  # unique_violation, any driver
                    raise
                # sent again while the first request was still running: the unique index
                # made this INSERT wait for it, and it committed; the task it made
                task = session.scalars(made).one()
            return out(task)

        return Sessions.run(unit, validate=TaskOut)

    @app.get("/tasks")
    def list_tasks(status: str | None = None, limit: int = 50) -> list[TaskOut]:
        def unit(session: Session) -> list[TaskOut]:
            query = sa.select(Task).order_by(Task.id).limit(min(max(limit, 1), 500))
            if status is not None:
                query = query.where(Task.status == status)
            return [out(task) for task in session.scalars(query)]

        return Sessions.run(unit)

    @app.get("/tasks/{task_id}")
    def get_task(task_id: int) -> TaskOut:
        return Sessions.run(lambda session: out(_found(session, task_id)))

    @app.post("/tasks/{task_id}/status")
    def move(task_id: int, body: MoveIn) -> TaskOut:
        if body.status not in STATUSES:
            raise HTTPException(422, f"unknown status {body.status!r}; one of {list(STATUSES)}")

        def unit(session: Session) -> TaskOut:
            task = _found(session, task_id)
            move_task(session, task, body.status, idem_key=str(uuid.uuid4()))
            session.flush()  # the transition guard checks the move here
            return out(task)

        return Sessions.run(unit, validate=TaskOut)

    @app.get("/health")
    def health() -> dict[str, object]:
        return {"healthy": rdb.health()["healthy"]}

    return app


def _found(session: Session, task_id: int) -> Task:
    task = session.get(Task, task_id)
    if task is None:
        raise HTTPException(404, f"no task {task_id}")
    return task


def prepare(engine: sa.Engine) -> None:
    """The example schema, its transition trigger and the commit markers (idempotent)."""
    Base.metadata.create_all(engine)
    rdb.install_transition_trigger(engine, Task)
    rdb.install_commit_markers(engine)


@contextlib.contextmanager
def database(url: str | None) -> Iterator[str]:
    """``url``, or a throwaway embedded PostgreSQL's (stopped and deleted afterwards)."""
    if url:
        yield url
        return
    from resilient_db.testing import EmbeddedPostgres  # noqa: PLC0415 - only without a URL

    with EmbeddedPostgres() as server:
        server.create_database("tasks")
        print(f"embedded PostgreSQL at {server.host}:{server.port}", flush=True)
        yield server.url("tasks")


def main(argv: list[str] | None = None) -> int:
    import uvicorn  # noqa: PLC0415 - the web extra

    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--url", default=os.environ.get("DATABASE_URL"), help="database URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    token = os.environ.get("DASHBOARD_TOKEN") or secrets.token_urlsafe(18)
    with database(args.url) as url:
        engine = sa.create_engine(url, pool_pre_ping=False)
        try:
            prepare(engine)
            app = create_app(engine, dashboard_token=token)
            base = f"http://{args.host}:{args.port}"
            print(f"tasks API at {base}/tasks (docs: {base}/docs)", flush=True)
            print(f"dashboard at {base}/admin/self-healing/?token={quote(token)}", flush=True)
            # (uvicorn before 0.30.3 raises the Ctrl+C it stopped on: the exit status is still 0)
            with contextlib.suppress(KeyboardInterrupt):
                uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        finally:
            engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
