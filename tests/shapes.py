"""Values held to their annotations key by key (TypedDicts, Literals, unions, dicts, lists), for
the tests of the typed results (test_health_types, test_web_types): every key of a result is
declared, with a value of its declared type, every required key is there; and what was seen is
recorded, so that a test can require every key of a type, and every value of a ``Literal``, to
have been met at least once."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


class Walk:
    """Checks values against annotations, recording which keys of each TypedDict and which
    values of each Literal were seen."""

    def __init__(self) -> None:
        self.keys_seen: dict[type, set[str]] = {}
        self.literals_seen: dict[tuple[Any, ...], set[Any]] = {}
        self.typeddicts: set[type] = set()

    def check(self, value: Any, annotation: Any, where: str) -> None:
        if typing.is_typeddict(annotation):
            self._typeddict(value, annotation, where)
            return
        origin = get_origin(annotation)
        if origin is Union or origin is types.UnionType:
            self._union(value, annotation, where)
        elif origin is Literal:
            # (by type too: 0 == False, 1.0 == 1)
            fits = [v for v in get_args(annotation) if type(v) is type(value) and v == value]
            assert fits, f"{where}: {value!r} is not {annotation}"
            self.literals_seen.setdefault(get_args(annotation), set()).add(value)
        elif origin is dict:
            key_type, value_type = get_args(annotation)
            assert type(value) is dict, f"{where}: {value!r} is no dict"
            for k, v in value.items():
                self.check(k, key_type, f"{where} key")
                self.check(v, value_type, f"{where}[{k!r}]")
        elif origin is list:
            (item_type,) = get_args(annotation)
            assert type(value) is list, f"{where}: {value!r} is no list"
            for i, item in enumerate(value):
                self.check(item, item_type, f"{where}[{i}]")
        elif annotation is type(None):
            assert value is None, f"{where}: {value!r} is not None"
        elif annotation is float:  # (an int is a float to a type checker)
            assert type(value) in (float, int), f"{where}: {value!r} is no float"
        else:  # bool, int, str: exactly (a bool is no count)
            assert annotation in (bool, int, str), f"{where}: unexpected type {annotation}"
            assert type(value) is annotation, f"{where}: {value!r} is no {annotation.__name__}"

    def _union(self, value: Any, annotation: Any, where: str) -> None:
        failures = []
        for member in get_args(annotation):
            trial = Walk()
            try:
                trial.check(value, member, where)
            except AssertionError as exc:
                failures.append(str(exc))
                continue
            self.check(value, member, where)  # (recorded by the member that fits)
            return
        raise AssertionError(f"{where}: {value!r} fits no member of {annotation}: {failures}")

    def _typeddict(self, value: Any, annotation: Any, where: str) -> None:
        self.typeddicts.add(annotation)
        hints = get_type_hints(annotation)
        assert type(value) is dict, f"{where}: {value!r} is no dict"
        assert set(value) <= set(hints), f"{where}: keys not declared: {set(value) - set(hints)}"
        missing = annotation.__required_keys__ - set(value)
        assert not missing, f"{where}: required keys missing: {missing}"
        self.keys_seen.setdefault(annotation, set()).update(value)
        for key, item in value.items():
            self.check(item, hints[key], f"{where}[{key!r}]")

    def unseen_keys(self, types_: Iterable[type]) -> dict[str, list[str]]:
        """The keys of each of ``types_`` never seen, by type name (only types with some)."""
        unseen = {
            t.__name__: sorted(set(get_type_hints(t)) - self.keys_seen.get(t, set()))
            for t in types_
        }
        return {name: keys for name, keys in unseen.items() if keys}

    def unseen_literals(self, types_: Iterable[type]) -> dict[tuple[Any, ...], set[Any]]:
        """The values never seen of each ``Literal`` that ``types_`` declare (in their own
        annotations, not in the TypedDicts these name)."""
        unseen: dict[tuple[Any, ...], set[Any]] = {}
        for t in types_:
            for hint in get_type_hints(t).values():
                for values in _literals(hint):
                    left = set(values) - self.literals_seen.get(values, set())
                    if left:
                        unseen[values] = left
        return unseen


def _literals(annotation: Any) -> Iterable[tuple[Any, ...]]:
    if typing.is_typeddict(annotation):
        return
    if get_origin(annotation) is Literal:
        yield get_args(annotation)
        return
    for arg in get_args(annotation):
        yield from _literals(arg)
