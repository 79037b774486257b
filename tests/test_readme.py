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
