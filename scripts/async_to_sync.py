#!/usr/bin/env python3
"""Generate the sync twins of resilient_db's async modules and tests, or check they are fresh.

    python scripts/async_to_sync.py           # regenerate every sync twin
    python scripts/async_to_sync.py --check   # exit 1 naming every stale twin (``make lint``)
    python scripts/async_to_sync.py --diff    # show what regenerating would change

The async file is the one source (as psycopg does for its sync pool with
``tools/async_to_sync.py``); the sync file is generated, starts with a "do not edit" header and
is checked up to date by ``make lint`` and by ``tests/test_async_to_sync.py``.

How the async source becomes the sync one:

* ``async def`` / ``async with`` / ``async for`` lose ``async``; ``await x`` becomes ``x``
  (``(await x).y`` becomes ``x.y``).
* Names are renamed by a table (:data:`NAMES`: ``AsyncSession`` -> ``Session``, ``asleep`` ->
  ``sleep``, ...) wherever they appear as whole words: identifiers, attributes, keywords,
  imports, strings (docstrings included) and comments, where ``await`` and ``async`` before
  ``def``/``with``/``for`` go too. Imports follow the renamed names to their sync module
  (:data:`MODULES`); imports the sync code no longer uses are dropped.
* Constructs with a sync meaning are rewritten: ``Awaitable[X]`` and ``Coroutine[.., .., X]``
  become ``X``; ``asyncio.shield(x)``, ``asyncio.create_task(x)`` and ``_to_completion(x)``
  become ``x``;
  ``asyncio.to_thread(f, *a)`` becomes ``f(*a)``; ``s.run_sync(f, *a)`` (SQLAlchemy's hop into
  its sync session) becomes ``f(s, *a)``, and so does ``_ends[type(s)](s, f, *a)`` (the same hop,
  or through the session class's own methods: :data:`RUN_SYNC_BY_CLASS`); ``x.sync_session`` /
  ``x.sync_engine`` become ``x``.
* Where the two really differ, the source says so with a marker block::

      if True:  # async only
          ...  # dropped from the sync file
      else:  # sync only
          ...  # the sync file's code, copied verbatim (dedented)

  The ``else`` branch is optional. ``if True`` costs nothing at run time (the compiler drops
  the test and the dead branch), and both branches are real code that ruff reads; mypy checks
  the async branch in the source and the sync branch in the generated file. As ruff reads the
  sync branch in the source too, it uses only names the async module defines or imports.
  Comments about a marked block go inside it; the block must not leave a suite empty.

Written by hand on the standard library's ``ast`` and ``tokenize``: unasync-style tools rename
tokens only (no blocks that differ, no rewrite of ``run_sync`` or ``Awaitable[X]``), and
psycopg's generator rebuilds the file from the tree, which needs ``ast_comments`` and black.
Here the tree only locates what changes; the edits are made in the source text, so comments and
layout survive. The result is then tidied by ruff (the project's linter and formatter, already a
test dependency): imports sorted and unused ones dropped (``ruff check --select I,F401 --fix``),
then ``ruff format``; so the generated file passes ``make lint`` as it is.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import io
import re
import shutil
import subprocess
import sys
import tokenize
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: async name -> sync name, for identifiers and whole words in strings and comments
NAMES: dict[str, str] = {
    "AsyncResilientSession": "ResilientSession",
    "AsyncEngine": "Engine",
    "AsyncConnection": "Connection",
    "AsyncSession": "Session",
    "AsyncIterator": "Iterator",
    "async_sessionmaker": "sessionmaker",
    "async_sessionmaker_kwargs": "sessionmaker_kwargs",
    "create_async_engine": "create_engine",
    "pytest_asyncio": "pytest",
    "asyncpg": "psycopg",
    "asleep": "sleep",
    "_asleep": "_sleep",
    "acall": "call",
    "acall_failed": "call_failed",
    "acall_once": "call_once",
}
#: dotted async names -> sync names
DOTTED: dict[str, str] = {"asyncio.sleep": "time.sleep"}
#: where a renamed import comes from: "module.name" or "module" -> sync module
MODULES: dict[str, str] = {
    "sqlalchemy.ext.asyncio": "sqlalchemy.orm",
    "sqlalchemy.ext.asyncio.AsyncEngine": "sqlalchemy.engine",
    "sqlalchemy.ext.asyncio.AsyncConnection": "sqlalchemy.engine",
    "sqlalchemy.ext.asyncio.create_async_engine": "sqlalchemy",
}
#: generic types whose sync form is their last argument
UNWRAP_TYPES = frozenset({"Awaitable", "Coroutine"})
#: calls whose sync form is their only argument
UNWRAP_CALLS = frozenset({"asyncio.shield", "asyncio.create_task", "_to_completion"})
#: mappings of a callable per session class that is called as ``s.run_sync`` is, with the session
#: first: ``_ends[type(s)](s, f, *a)`` (see ``_asyncio._Ends``) becomes ``f(s, *a)``
RUN_SYNC_BY_CLASS = frozenset({"_ends"})
#: attributes whose sync form is the object itself (SQLAlchemy's async proxies)
IDENTITY_ATTRS = frozenset({"sync_session", "sync_engine"})

ASYNC_ONLY = "# async only"
SYNC_ONLY = "# sync only"


@dataclass(frozen=True)
class Twin:
    source: str  # relative to the repository root
    target: str


TWINS = (
    Twin("resilient_db/_asyncio.py", "resilient_db/_session.py"),
    Twin("tests/test_commit_protocol_async.py", "tests/test_commit_protocol.py"),
    Twin("resilient_db/demo/_workload_async.py", "resilient_db/demo/_workload.py"),
)


class GenerateError(Exception):
    """The async source uses something the generator cannot turn into sync code."""


# -- text edits -----------------------------------------------------------------------------------
@dataclass
class Editor:
    """Replacements in a text, by character offsets. An edit that covers others wins over them
    (build its text with :meth:`render` to keep theirs); edits that cross are a bug."""

    text: str
    edits: list[tuple[int, int, str]] = field(default_factory=list)

    def replace(self, start: int, end: int, new: str) -> None:
        if start >= end:
            raise GenerateError("an edit must replace something")
        self.edits.append((start, end, new))

    def render(self, start: int, end: int) -> str:
        """The text from ``start`` to ``end`` with the edits inside it made."""
        inside = sorted(
            ((s, e, new) for s, e, new in self.edits if start <= s and e <= end),
            key=lambda edit: (edit[0], -edit[1]),  # outer edits first
        )
        out: list[str] = []
        pos = start
        last: tuple[int, int, str] | None = None
        for s, e, new in inside:
            if last is not None and s < last[1]:
                if e > last[1]:
                    raise GenerateError(f"crossing edits at {self.text[s:e]!r}")
                if (s, e) == last[:2] and new != last[2]:
                    raise GenerateError(f"two different edits of {self.text[s:e]!r}")
                continue  # covered by the outer edit, whose text already has it
            out.append(self.text[pos:s])
            out.append(new)
            pos = e
            last = (s, e, new)
        out.append(self.text[pos:end])
        return "".join(out)


# -- the source, located ------------------------------------------------------------------------
class Source:
    def __init__(self, text: str, name: str) -> None:
        self.text = text
        self.name = name
        self.lines = text.splitlines(keepends=True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))
        self.tree = ast.parse(text, filename=name)
        self.tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
        self.comments = {t.start[0]: t for t in self.tokens if t.type == tokenize.COMMENT}

    def offset(self, lineno: int, col_bytes: int) -> int:
        """A character offset from an AST position (line 1-based, column in UTF-8 bytes)."""
        line = self.lines[lineno - 1]
        return self.starts[lineno - 1] + len(line.encode()[:col_bytes].decode())

    def start(self, node: ast.AST) -> int:
        return self.offset(node.lineno, node.col_offset)  # type: ignore[attr-defined]

    def end(self, node: ast.AST) -> int:
        return self.offset(node.end_lineno, node.end_col_offset)  # type: ignore[attr-defined]

    def tok_offset(self, pos: tuple[int, int]) -> int:
        return self.starts[pos[0] - 1] + pos[1]

    def line_start(self, lineno: int) -> int:
        return self.starts[lineno - 1]

    def where(self, node: ast.AST) -> str:
        return f"{self.name}:{getattr(node, 'lineno', '?')}"


def dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


# -- marker blocks ------------------------------------------------------------------------------
@dataclass
class Marker:
    node: ast.If
    drop: tuple[int, int]  # character range dropped from the sync file
    keep: tuple[int, int] | None  # line range (1-based, inclusive) of the sync branch
    indent: int  # columns the sync branch is dedented by


def find_markers(src: Source) -> list[Marker]:
    markers: list[Marker] = []
    marker_lines: set[int] = set()
    for node in ast.walk(src.tree):
        if not (isinstance(node, ast.If) and _is_const(node.test, value=True)):
            continue
        comment = src.comments.get(node.lineno)
        if comment is None or comment.string != ASYNC_ONLY:
            raise GenerateError(
                f"{src.where(node)}: an `if True:` block must be marked `if True:  {ASYNC_ONLY}`"
            )
        marker_lines.add(node.lineno)
        body_end = node.body[-1].end_lineno or node.lineno
        keep = None
        indent = 0
        if node.orelse:
            else_line = _else_line(src, node)
            comment = src.comments.get(else_line)
            if comment is None or comment.string != SYNC_ONLY:
                raise GenerateError(
                    f"{src.name}:{else_line}: the else of an async-only block must be marked "
                    f"`else:  {SYNC_ONLY}`"
                )
            if node.orelse[0].lineno == else_line:
                raise GenerateError(f"{src.name}:{else_line}: start the sync branch on a new line")
            marker_lines.add(else_line)
            drop_end = src.line_start(else_line + 1)
            keep = (else_line + 1, node.orelse[-1].end_lineno or else_line)
            indent = node.orelse[0].col_offset - node.col_offset
        else:
            drop_end = src.line_start(body_end + 1)
        markers.append(Marker(node, (src.line_start(node.lineno), drop_end), keep, indent))
    for lineno, comment in src.comments.items():
        if comment.string in (ASYNC_ONLY, SYNC_ONLY) and lineno not in marker_lines:
            raise GenerateError(
                f"{src.name}:{lineno}: {comment.string!r} marks only `if True:` and its `else:`"
            )
    for outer in markers:
        for inner in markers:
            if inner is not outer and _within(inner.node, outer.node):
                raise GenerateError(f"{src.where(inner.node)}: marker blocks do not nest")
    return markers


def _is_const(node: ast.AST, *, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _within(inner: ast.AST, outer: ast.AST) -> bool:
    return any(child is inner for child in ast.walk(outer))


def _else_line(src: Source, node: ast.If) -> int:
    first = node.orelse[0].lineno
    last_body = node.body[-1].end_lineno or node.lineno
    for tok in src.tokens:
        if tok.type == tokenize.NAME and tok.string == "else" and last_body < tok.start[0] <= first:
            return tok.start[0]
    raise GenerateError(f"{src.where(node)}: the `else:` of this block was not found")


# -- the transformation -------------------------------------------------------------------------
_WORDS = re.compile(
    r"(?<![\w])("
    + "|".join(re.escape(k) for k in sorted([*NAMES, *DOTTED], key=len, reverse=True))
    + r")(?![\w])"
)
_KEYWORDS = re.compile(r"\bawait (?=[\w(`])|\basync (?=(?:def|with|for)\b)")


def rename_words(text: str) -> str:
    return _WORDS.sub(lambda m: NAMES.get(m.group(1)) or DOTTED[m.group(1)], text)


def rename_prose(text: str) -> str:
    return _KEYWORDS.sub("", rename_words(text))


def to_sync(text: str, name: str) -> str:
    """The sync version of the async source ``text`` (before ruff tidies it)."""
    src = Source(text, name)
    ed = Editor(text)
    markers = find_markers(src)
    dropped = [m.drop for m in markers]
    verbatim = [
        (src.line_start(m.keep[0]), src.line_start(m.keep[1] + 1)) for m in markers if m.keep
    ]

    def skipped(start: int, end: int) -> bool:
        return any(s <= start and end <= e for s, e in (*dropped, *verbatim))

    # 1. words: names, and words in strings, docstrings and comments
    for tok in src.tokens:
        start, end = src.tok_offset(tok.start), src.tok_offset(tok.end)
        if skipped(start, end):
            continue
        if tok.type == tokenize.NAME and tok.string in NAMES:
            ed.replace(start, end, NAMES[tok.string])
        elif tok.type in _TEXT_TOKENS:
            new = rename_prose(tok.string)
            if new != tok.string:
                ed.replace(start, end, new)

    # 2. syntax: children before parents, so a parent's rewrite renders its children's edits
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(src.tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    fstrings = [
        (src.start(n), src.end(n)) for n in ast.walk(src.tree) if isinstance(n, ast.JoinedStr)
    ]
    for node in _postorder(src.tree):
        if not hasattr(node, "lineno") or isinstance(node, (ast.expr_context, ast.JoinedStr)):
            continue
        start, end = src.start(node), src.end(node)
        if skipped(start, end):
            continue
        if any(s < start and end <= e for s, e in fstrings):
            if _rewrites(node):
                raise GenerateError(f"{src.where(node)}: async syntax inside an f-string")
            continue
        _rewrite(src, ed, node, parents)

    # 3. marker blocks: the async branch goes, the sync branch stays as written
    for m in markers:
        ed.replace(m.drop[0], m.drop[1], "")
        if m.keep is not None:
            for lineno in range(m.keep[0], m.keep[1] + 1):
                line = src.lines[lineno - 1]
                if line[: m.indent].strip() == "" and len(line) > m.indent:
                    ed.replace(src.line_start(lineno), src.line_start(lineno) + m.indent, "")
            for tok in src.tokens:
                inside = m.keep[0] <= tok.start[0] <= m.keep[1]
                if inside and tok.type == tokenize.NAME and tok.string in ("async", "await"):
                    raise GenerateError(f"{name}:{tok.start[0]}: `{tok.string}` in a sync branch")
        _require_nonempty_suite(src, m)

    result = ed.render(0, len(text))
    _require_sync(result, name)
    return result


_TEXT_TOKENS = frozenset(
    {tokenize.STRING, tokenize.COMMENT}
    | ({tokenize.FSTRING_MIDDLE} if hasattr(tokenize, "FSTRING_MIDDLE") else set())
)


def _postorder(node: ast.AST) -> Iterator[ast.AST]:
    for child in ast.iter_child_nodes(node):
        yield from _postorder(child)
    yield node


def _rewrites(node: ast.AST) -> bool:
    return isinstance(node, (ast.Await, ast.AsyncFunctionDef, ast.AsyncWith, ast.AsyncFor))


def _rewrite(src: Source, ed: Editor, node: ast.AST, parents: dict[ast.AST, ast.AST]) -> None:
    start, end = src.start(node), src.end(node)
    text = src.text
    if isinstance(node, (ast.AsyncFunctionDef, ast.AsyncWith, ast.AsyncFor)):
        match = re.match(r"async\s+", text[start:])
        if match is None:
            raise GenerateError(f"{src.where(node)}: `async` not found")
        ed.replace(start, start + match.end(), "")
    elif isinstance(node, ast.Await):
        value_start = src.start(node.value)
        ed.replace(start, value_start, "")
        _drop_parens(src, ed, node, parents)
    elif isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
        if any(gen.is_async for gen in node.generators):
            raise GenerateError(f"{src.where(node)}: async comprehensions are not supported")
    elif isinstance(node, ast.ImportFrom):
        _rewrite_import(src, ed, node)
    elif isinstance(node, ast.Subscript) and dotted(node.value) in UNWRAP_TYPES:
        inner = node.slice.elts[-1] if isinstance(node.slice, ast.Tuple) else node.slice
        ed.replace(start, end, ed.render(src.start(inner), src.end(inner)))
    elif isinstance(node, ast.Call):
        _rewrite_call(src, ed, node)
    elif isinstance(node, ast.Attribute):
        name = dotted(node)
        if name in DOTTED:
            ed.replace(start, end, DOTTED[name])
        elif node.attr in IDENTITY_ATTRS:
            ed.replace(start, end, ed.render(src.start(node.value), src.end(node.value)))


def _rewrite_call(src: Source, ed: Editor, node: ast.Call) -> None:
    start, end = src.start(node), src.end(node)
    name = dotted(node.func)
    if name in UNWRAP_CALLS:
        if len(node.args) != 1 or node.keywords:
            raise GenerateError(f"{src.where(node)}: {name}() with one argument only")
        arg = node.args[0]
        ed.replace(start, end, ed.render(src.start(arg), src.end(arg)))
        return
    if name == "asyncio.to_thread":
        fn, rest = node.args[0], _rest(src, ed, node, 1)
        ed.replace(start, end, f"{ed.render(src.start(fn), src.end(fn))}({rest})")
        return
    func = node.func
    if isinstance(func, ast.Subscript) and dotted(func.value) in RUN_SYNC_BY_CLASS:
        if len(node.args) < 2 or any(isinstance(a, ast.Starred) for a in node.args[:2]):
            raise GenerateError(f"{src.where(node)}: {dotted(func.value)}[...](session, fn, ...)")
        obj, fn = node.args[0], node.args[1]
        rest = _rest(src, ed, node, 2)
        obj_text = ed.render(src.start(obj), src.end(obj))
        args = f"{obj_text}, {rest}" if rest else obj_text
        ed.replace(start, end, f"{ed.render(src.start(fn), src.end(fn))}({args})")
        return
    if isinstance(node.func, ast.Attribute) and node.func.attr == "run_sync":
        obj, fn = node.func.value, node.args[0]
        rest = _rest(src, ed, node, 1)
        obj_text = ed.render(src.start(obj), src.end(obj))
        args = f"{obj_text}, {rest}" if rest else obj_text
        ed.replace(start, end, f"{ed.render(src.start(fn), src.end(fn))}({args})")


def _rest(src: Source, ed: Editor, node: ast.Call, first: int) -> str:
    """The call's arguments from the ``first``-th on, as written (edits applied)."""
    items: list[ast.AST] = [*node.args[first:], *node.keywords]
    if not items:
        return ""
    items.sort(key=src.start)
    return ed.render(src.start(items[0]), src.end(items[-1]))


def _drop_parens(src: Source, ed: Editor, node: ast.Await, parents: dict[ast.AST, ast.AST]) -> None:
    """``(await x).y`` -> ``x.y``: the parentheses were only there for ``await``."""
    parent = parents.get(node)
    grouped = (isinstance(parent, (ast.Attribute, ast.Subscript)) and parent.value is node) or (
        isinstance(parent, ast.Call) and parent.func is node
    )
    if not grouped or not isinstance(
        node.value, (ast.Call, ast.Attribute, ast.Name, ast.Subscript)
    ):
        return
    text = src.text
    before = src.start(node) - 1
    while before >= 0 and text[before] in " \t":
        before -= 1
    after = src.end(node)
    while after < len(text) and text[after] in " \t":
        after += 1
    if before >= 0 and text[before] == "(" and after < len(text) and text[after] == ")":
        ed.replace(before, before + 1, "")
        ed.replace(after, after + 1, "")


def _rewrite_import(src: Source, ed: Editor, node: ast.ImportFrom) -> None:
    module = node.module or ""
    groups: dict[str, list[str]] = {}
    changed = False
    for alias in node.names:
        new_name = NAMES.get(alias.name, alias.name)
        new_module = MODULES.get(f"{module}.{alias.name}") or MODULES.get(module, module)
        changed |= new_name != alias.name or new_module != module
        asname = NAMES.get(alias.asname, alias.asname) if alias.asname else None
        entry = new_name if asname in (None, new_name) else f"{new_name} as {asname}"
        groups.setdefault(new_module, []).append(entry)
    if not changed:
        return
    dots = "." * node.level
    lines = [f"from {dots}{mod} import {', '.join(names)}" for mod, names in groups.items()]
    ed.replace(src.start(node), src.end(node), "\n".join(lines))


def _require_nonempty_suite(src: Source, m: Marker) -> None:
    if m.keep is not None:
        return
    for parent in ast.walk(src.tree):
        for attr in ("body", "orelse", "finalbody"):
            suite = getattr(parent, attr, None)
            if isinstance(suite, list) and suite == [m.node]:
                raise GenerateError(f"{src.where(m.node)}: the sync side would be an empty block")


def _require_sync(text: str, name: str) -> None:
    try:
        tree = ast.parse(text, filename=name)
    except SyntaxError as exc:
        raise GenerateError(f"{name}: the generated code does not parse: {exc}") from exc
    for node in ast.walk(tree):
        if _rewrites(node):
            raise GenerateError(f"{name}:{node.lineno}: async syntax left in the sync code")  # type: ignore[attr-defined]


# -- ruff, the header, the files ----------------------------------------------------------------
def _ruff() -> list[str]:
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    found = shutil.which("ruff")
    if found is None:
        raise GenerateError("ruff is needed to tidy the generated code: pip install ruff")
    return [found]


def tidy(code: str, target: str) -> str:
    """Sort imports, drop the unused ones and format, with the project's ruff settings."""
    ruff = _ruff()
    steps = (
        ["check", "--select", "I,F401", "--fix", "--exit-zero", "--quiet", "--no-cache"],
        ["format", "--quiet", "--no-cache"],
    )
    for step in steps:
        done = subprocess.run(
            [*ruff, *step, "--stdin-filename", target, "-"],
            input=code,
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        )
        if done.returncode != 0:
            raise GenerateError(f"ruff {step[0]} failed on the code for {target}:\n{done.stderr}")
        code = done.stdout
    return code


def header(twin: Twin) -> str:
    return (
        "# WARNING: this file is generated by scripts/async_to_sync.py from\n"
        f"# {twin.source}. DO NOT EDIT: change that file and run\n"
        "# `python scripts/async_to_sync.py` (`make lint` fails while this one is stale).\n"
    )


def generate(twin: Twin) -> str:
    source = (ROOT / twin.source).read_text(encoding="utf-8")
    return tidy(header(twin) + to_sync(source, twin.source), twin.target)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if a sync twin is stale")
    mode.add_argument("--diff", action="store_true", help="print what regenerating would change")
    args = parser.parse_args(argv)
    stale: list[Twin] = []
    for twin in TWINS:
        try:
            new = generate(twin)
        except GenerateError as exc:
            print(f"async_to_sync: {exc}", file=sys.stderr)
            return 2
        path = ROOT / twin.target
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        if new == old:
            continue
        stale.append(twin)
        if args.diff:
            sys.stdout.writelines(
                difflib.unified_diff(
                    old.splitlines(keepends=True),
                    new.splitlines(keepends=True),
                    twin.target,
                    f"{twin.target} (generated from {twin.source})",
                )
            )
        elif not args.check:
            path.write_text(new, encoding="utf-8")
            print(f"generated {twin.target} from {twin.source}")
    if args.check and stale:
        for twin in stale:
            print(
                f"{twin.target} is stale: it is generated from {twin.source}, which changed "
                "(or the generated file was edited by hand)",
                file=sys.stderr,
            )
        print(
            "regenerate with: python scripts/async_to_sync.py "
            "(python scripts/async_to_sync.py --diff shows the difference)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
