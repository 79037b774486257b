"""Commit marker ids can't be foretold from the ids a process made before.

Every application role sharing the database's markers may read them (SELECT) and write them
(INSERT): a role that could work out the id of another application's next unit could write that
marker first, and a lost COMMIT answer of that unit would then be taken for committed (or every
commit of it fail on the marker's key). The ids made here are read back from the table by
anyone granted it, so what they are made from must not be recoverable from them.
"""

from __future__ import annotations

import os
import random
import uuid

import pytest

from resilient_db._commit import marker_id

# Mersenne Twister (what ``random.Random`` is): state words x[n], outputs temper(x[n]), and
# x[n + 624] = x[n + 397] ^ twist(top bit of x[n], low 31 bits of x[n + 1])
_N, _M = 624, 397
_UPPER, _LOWER, _MATRIX_A = 0x8000_0000, 0x7FFF_FFFF, 0x9908_B0DF


def _undo_right(y: int, shift: int) -> int:
    x = y
    for _ in range(32 // shift + 1):
        x = y ^ (x >> shift)
    return x & 0xFFFF_FFFF


def _undo_left(y: int, shift: int, mask: int) -> int:
    x = y
    for _ in range(32 // shift + 1):
        x = y ^ ((x << shift) & mask)
    return x & 0xFFFF_FFFF


def _untemper(y: int) -> int:
    y = _undo_right(y, 18)
    y = _undo_left(y, 15, 0xEFC6_0000)
    y = _undo_left(y, 7, 0x9D2C_5680)
    return _undo_right(y, 11)


def _temper(y: int) -> int:
    y ^= y >> 11
    y ^= (y << 7) & 0x9D2C_5680
    y ^= (y << 15) & 0xEFC6_0000
    return (y ^ (y >> 18)) & 0xFFFF_FFFF


def _random_bits(marker: str) -> int:
    return uuid.UUID(marker).int & ((1 << 80) - 1)


def _words(marker: str) -> tuple[int, list[int]]:
    """What a marker id shows of the generator's state, were its 80 bits ``getrandbits(80)``:
    its first word exactly, and the candidates of its second (2 of its 32 bits are the
    variant's)."""
    bits = _random_bits(marker)
    first = _untemper(bits & 0xFFFF_FFFF)
    shown = (bits >> 32) & 0x3FFF_FFFF
    return first, [_untemper(shown | (top << 30)) for top in range(4)]


def _foretold(ids: list[str], j: int) -> set[int]:
    """The candidates for the first 32 random bits of id ``j`` from the ids 208 and 76 before
    it (each id takes three 32-bit outputs, so these hold the state words the twist needs)."""
    oldest, after_oldest = _words(ids[j - 208])
    _, mid = _words(ids[j - 76])
    return {
        _temper(x397 ^ (((oldest & _UPPER) | (x1 & _LOWER)) >> 1) ^ (_MATRIX_A if x1 & 1 else 0))
        for x1 in after_oldest
        for x397 in mid
    }


def test_the_predictor_would_find_ids_made_by_a_mersenne_twister() -> None:
    """The check below is sound: it foretells ids made as releases before made them."""
    bits = random.Random(os.urandom(32)).getrandbits
    made = [f"{bits(80):032x}" for _ in range(260)]
    made = [f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}" for h in made]
    hits = sum(_random_bits(made[j]) & 0xFFFF_FFFF in _foretold(made, j) for j in range(208, 260))
    assert hits == 52


def test_a_marker_id_cannot_be_foretold_from_the_ids_made_before_it() -> None:
    ids = [marker_id() for _ in range(260)]
    assert len(set(ids)) == len(ids)
    hits = sum(_random_bits(ids[j]) & 0xFFFF_FFFF in _foretold(ids, j) for j in range(208, 260))
    # (by chance: 52 tries of 16 candidates out of 2**32, about 2e-7)
    assert hits == 0, f"{hits} of 52 marker ids were foretold from the ids made before them"


def test_marker_ids_are_version_7_uuids_in_time_order() -> None:
    ids = [uuid.UUID(marker_id()) for _ in range(1000)]
    assert {u.version for u in ids} == {7}
    assert {u.variant for u in ids} == {uuid.RFC_4122}
    assert len(set(ids)) == len(ids)
    stamps = [u.int >> 80 for u in ids]
    assert stamps == sorted(stamps)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_makes_other_ids_than_its_parent() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(write, "\n".join(marker_id() for _ in range(20)).encode())
        finally:
            os._exit(0)
    os.close(write)
    mine = {marker_id() for _ in range(20)}
    with os.fdopen(read) as pipe:
        theirs = set(pipe.read().split("\n"))
    os.waitpid(pid, 0)
    assert len(theirs) == 20
    assert not mine & theirs
    assert not {_random_bits(m) for m in mine} & {_random_bits(t) for t in theirs}


def test_marker_ids_use_no_shared_module_random() -> None:
    """Seeding the ``random`` module (as tests and simulations do) does not make ids repeat."""
    state = random.getstate()
    try:
        random.seed(7)
        first = [marker_id() for _ in range(5)]
        random.seed(7)
        second = [marker_id() for _ in range(5)]
    finally:
        random.setstate(state)
    assert not set(first) & set(second)
