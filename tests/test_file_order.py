"""The order in which pytest-xdist workers collect the files (tests/conftest.py): the longest
first, each file whole and in its own order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import FILE_SECONDS

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent


def test_every_file_weighed_is_a_test_file() -> None:
    """A file renamed or removed is not left in the table (it would order nothing)."""
    missing = sorted(name for name in FILE_SECONDS if not (TESTS / name).is_file())
    assert missing == []


def test_workers_collect_the_longest_files_first_each_whole(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under xdist the files are ordered by their weight (unknown ones after, more tests
    first), each file's tests together and in their order; in one process pytest's order."""
    pytest.importorskip("xdist")
    longest, second = sorted(FILE_SECONDS, key=FILE_SECONDS.__getitem__, reverse=True)[:2]
    pytester.makeconftest((TESTS / "conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(
        **{
            "test_a_few": "def test_1(): pass\ndef test_2(): pass\n",
            "test_many": "def test_1(): pass\ndef test_2(): pass\ndef test_3(): pass\n",
            longest.removesuffix(".py"): "def test_z(): pass\ndef test_y(): pass\n",
            second.removesuffix(".py"): "def test_b(): pass\n",
        }
    )
    # the suite's conftest.py imports its helper modules (fleet, scenarios, ...) from tests/
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    args = ["-p", "no:cacheprovider", "-v"]
    result = pytester.runpytest_subprocess(*args, "-n", "1", "--dist", "loadfile")
    result.assert_outcomes(passed=8)
    ran = [line.split()[-1] for line in result.outlines if " PASSED " in line]
    assert ran == [
        f"{longest}::test_z",
        f"{longest}::test_y",
        f"{second}::test_b",
        "test_many.py::test_1",
        "test_many.py::test_2",
        "test_many.py::test_3",
        "test_a_few.py::test_1",
        "test_a_few.py::test_2",
    ], result.outlines
