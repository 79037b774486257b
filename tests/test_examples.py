"""examples/quickstart.py runs: a killed backend and a server crash, every unit written once."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

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
