"""The README's Python examples run as written, in order, against a real server."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


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
    namespace["engine"].dispose()  # type: ignore[attr-defined]
    # the Flask example's engines too: left to the garbage collector, their pooled connections
    # are closed whenever a collection comes, in another test (ResourceWarning, an error there)
    with namespace["flask_app"].app_context():  # type: ignore[attr-defined]
        for flask_engine in namespace["db"].engines.values():  # type: ignore[attr-defined]
            flask_engine.dispose()


#: Blocks left out of the strict type check: SQLModel's table models have no ``__table__`` for
#: mypy and Flask-SQLAlchemy's ``db.Model`` is made at run time (their own typing limits, not
#: the library's); they still run above.
UNTYPED_LAYERS = ("import sqlmodel", "from flask_sqlalchemy import")


def test_readme_examples_type_check_strictly(tmp_path: Path) -> None:
    """The examples (quickstart, the wrapper, async, the failover, FastAPI, response
    validation) pass ``mypy --strict`` as a reader copies them, in order: a unit's session is
    annotated with the session class (never the factory, whose name shadows it), a row loaded
    by key with ``get_one``."""
    from mypy import api  # noqa: PLC0415 (a test dependency, loaded for this test only)

    blocks = [b for b in python_blocks() if not any(layer in b for layer in UNTYPED_LAYERS)]
    assert len(blocks) == len(python_blocks()) - 2
    source = tmp_path / "readme_examples.py"
    source.write_text("".join(blocks), encoding="utf-8")
    out, err, status = api.run(["--strict", str(source)])
    assert status == 0, out + err


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    return text[start : text.index("\n## ", start + 1)]


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
    in the README (``Observability``, or ``Running many processes`` for the budget's)."""
    import resilient_db as rdb  # noqa: PLC0415

    rdb.with_self_healing(lambda: 1, service="documented", config=rdb.Config(retry_budget=0.2))
    report = rdb.health()
    assert report["services"]["documented"]["budget"] is not None
    text = _section("Observability") + _section("Running many processes")
    missing = sorted(k for k in _keys(report) if f"`{k}`" not in text and f'"{k}"' not in text)
    assert missing == []


def test_readme_prometheus_metrics_exist_with_their_labels() -> None:
    """Every ``resilient_db_*`` metric the README names is exported, and the list of
    Observability gives each its exact labels (none written: none exported)."""
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
    named = {m[1] for m in metric.finditer(README.read_text(encoding="utf-8"))}
    named.discard("resilient_db_bypass")  # the database role, not a metric
    assert sorted(named - set(labels)) == []
    section = _section("Observability")
    the_list = section[section.index("Metrics:\n") : section.index("- OpenTelemetry:")]
    listed = {m[1]: set(filter(None, (m[2] or "").split(","))) for m in metric.finditer(the_list)}
    assert {name: labels[name] for name in listed} == listed
