"""The generator's rule for a unit's end chosen per session class (scripts/async_to_sync.py,
``RUN_SYNC_BY_CLASS``): ``_ends[type(s)](s, f, *a)`` is ``s.run_sync(f, *a)`` or the session
class's own methods in async code, and ``f(s, *a)`` in the sync twin. No server needed."""

from __future__ import annotations

import textwrap

import pytest
from test_async_to_sync import load_generator

gen = load_generator()


def sync(source: str) -> str:
    out: str = gen.to_sync(textwrap.dedent(source), "example.py")
    return out


def test_a_units_end_by_session_class_becomes_the_plain_call() -> None:
    out = sync(
        """
        async def end(s: AsyncSession, request: Any) -> None:
            await _ends[type(s)](s, flush_and_commit, request, self._hooks.commit)
            await _ends[type(s)](s.sync_session, commit_plainly)
        """
    )
    assert out == textwrap.dedent(
        """
        def end(s: Session, request: Any) -> None:
            flush_and_commit(s, request, self._hooks.commit)
            commit_plainly(s)
        """
    )


@pytest.mark.parametrize("call", ["_ends[type(s)](s)", "_ends[type(s)](*args)"])
def test_a_units_end_needs_the_session_and_the_function(call: str) -> None:
    with pytest.raises(gen.GenerateError, match=r"_ends\[\.\.\.\]\(session, fn, \.\.\.\)"):
        gen.to_sync(f"async def f():\n    await {call}\n", "example.py")
