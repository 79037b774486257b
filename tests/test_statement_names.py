"""The character classes the statement reader's patterns are built of hold exactly what
PostgreSQL's lexer takes for a name character (ASCII letters, digits, ``_``, ``$`` and every
non-ASCII character), with and without IGNORECASE, over every code point. They are written as
negations of ASCII characters (``[^...]``): ranges up to U+10FFFF took ``re`` a third of a second
and more to compile, at every ``import resilient_db``."""

from __future__ import annotations

import re
import string

import pytest

from resilient_db import _statements

EVERY_CHARACTER = "".join(chr(code) for code in range(0x110000))


def holds(pattern: str, flags: int) -> set[int]:
    return {m.start() for m in re.finditer(pattern, EVERY_CHARACTER, flags)}


def expected(ascii_chars: str) -> set[int]:
    return {ord(c) for c in ascii_chars} | set(range(0x80, 0x110000))


@pytest.mark.parametrize("flags", [0, re.IGNORECASE], ids=["exact", "ignorecase"])
def test_name_classes_hold_what_postgresql_reads_as_name_characters(flags: int) -> None:
    name = string.ascii_letters + string.digits + "_$"
    assert holds(_statements._NAME, flags) == expected(name)
    assert holds(_statements._NAME_OR_QUOTE, flags) == expected(name + "'")
    assert holds(_statements._TAG_START, flags) == expected(string.ascii_letters + "_")
    assert holds(_statements._TAG_CHAR, flags) == expected(name.replace("$", ""))
    signs = set(range(0x80)) - {ord(c) for c in name + " \t\n\r\f\v"}
    assert holds(_statements._SIGN, flags) == signs


def test_no_pattern_of_the_statement_reader_spells_a_range_past_ascii() -> None:
    """Each pattern compiles in well under a millisecond: none holds a range to U+10FFFF."""
    patterns = [v for v in vars(_statements).values() if isinstance(v, re.Pattern)]
    assert len(patterns) > 30
    assert [p.pattern[:60] for p in patterns if "\U0010ffff" in p.pattern] == []
