"""Every relative link and ``#anchor`` in README.md and docs/*.md leads somewhere: the file
exists, and the anchor is a heading of that file as GitHub makes its anchors (lower case,
punctuation dropped, spaces to hyphens, ``-1``, ``-2``... for a repeated heading)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: an inline link or image, ``[text](target)`` / ``![alt](target "title")``
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
#: a reference definition, ``[name]: target``
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?", re.M)
FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)


def _prose(text: str) -> str:
    """``text`` with its fenced code blocks blanked and its inline code spans removed (their
    brackets and hashes are code, not links or headings)."""
    kept: list[str] = []
    fence = ""
    for line in text.split("\n"):
        opening = FENCE.match(line)
        if not fence and opening:
            fence = opening[1]
            kept.append("")
        elif fence:
            if line.strip().startswith(fence[0] * len(fence)):
                fence = ""
            kept.append("")
        else:
            kept.append(re.sub(r"(`+)(?:(?!\1).)+?\1", "", line))
    return "\n".join(kept)


def anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its text (a link's text, code without its
    backticks, no emphasis marks) in lower case, what is not a letter, digit, space, hyphen or
    underscore dropped, spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (those inside code blocks are none)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    text = _read(path)
    # a code span can be a heading's text: read headings with their code, outside code blocks
    blanked = _prose(text).split("\n")
    lines = [
        raw if blank or not raw.strip() else ""
        for raw, blank in zip(text.split("\n"), blanked, strict=True)
    ]
    for title in HEADING.findall("\n".join(lines)):
        base = anchor(title)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    """The targets of a Markdown file's links and images that are not absolute URLs."""
    prose = _prose(_read(path))
    targets = [m[1] for m in LINK.finditer(prose)] + REFERENCE.findall(prose)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]


def dead_links(path: Path) -> list[str]:
    """The links of ``path`` that lead nowhere, each with what is missing."""
    dead = []
    for target in links(path):
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            dead.append(f"{target}: no file {file_part}")
        elif fragment and (linked.suffix != ".md" or fragment not in anchors(linked)):
            dead.append(f"{target}: no heading #{fragment} in {linked.name}")
    return dead


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(path: Path) -> None:
    assert dead_links(path) == []


def test_the_readme_links_every_docs_file() -> None:
    """Each docs file is reachable from the README, the entry point."""
    readme = ROOT / "README.md"
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(readme) if t[0] != "#"}
    assert len(DOCUMENTS) > 10
    assert sorted(p.name for p in DOCUMENTS[1:] if p.resolve() not in linked) == []


def test_the_check_finds_dead_links_and_anchors(tmp_path: Path) -> None:
    """The check itself: a missing file, a missing anchor and the anchor of a "heading" inside
    a code block are dead; links inside code are no links; anchors as GitHub makes them."""
    (tmp_path / "other.md").write_text("# Units of work: what gets replayed\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Web applications (FastAPI, Starlette)\n"
        "## The `validate=` option\n"
        "## Notes\n"
        "## Notes\n"
        "[ok](other.md#units-of-work-what-gets-replayed) [ok](#web-applications-fastapi-starlette)"
        " [ok](#the-validate-option) [ok](#notes-1) ![img](other.md)\n"
        "[gone](missing.md) [gone](other.md#failover) [gone](#in-code)\n"
        "`[code](nowhere.md)` [web](https://example.org/x#y) [ref]: gone.md\n"
        "```python\n"
        "# In code\n"
        "[x](nowhere.md)\n"
        "```\n",
        encoding="utf-8",
    )
    assert anchors(page) == {
        "web-applications-fastapi-starlette",
        "the-validate-option",
        "notes",
        "notes-1",
    }
    assert dead_links(page) == [
        "missing.md: no file missing.md",
        "other.md#failover: no heading #failover in other.md",
        "#in-code: no heading #in-code in page.md",
    ]
