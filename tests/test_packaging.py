"""The wheel carries what the package needs at run time: the example schema's Alembic
environment (so ``resilient-db demo`` works from a wheel) and ``py.typed``."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_ships_the_migrations_and_the_demo_finds_them(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            str(ROOT),
            "-w",
            str(tmp_path),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
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
