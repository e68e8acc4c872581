"""Every Markdown file of the repository is whole and its links lead somewhere (#24).

A file must end with a complete sentence, a complete table row or a closed
code block (``docs/reference.md`` once ended mid-sentence for 30 commits);
every code fence must be closed; every relative link must name a file or
folder that exists, and every anchor (``file.md#anchor``, ``#anchor``) a
heading of that file, slugged as GitHub does.

The rules, kept simple on purpose:

- The end: the last non-blank line closes a code fence; or it is a table row
  (starts and ends with ``|``); or, once closing ``) ] " ' * _ ` `` are taken
  off its end, it ends in ``. ! ? :``.
- Fences are lines starting (after at most 3 spaces) with 3 or more backticks
  or tildes; one is closed by a line of the same character, at least as many,
  and nothing else.
- Links are ``[text](target)``, ``![alt](target)`` and ``[label]: target``
  outside code blocks and code spans. Targets with a scheme (``https:``,
  ``mailto:``) are not checked; a path is relative to the file's folder.
- Anchors are the slugs of ATX headings (``#`` to ``######``) and the ``id``
  or ``name`` attributes of HTML tags: the heading's text without its
  Markdown (code marks, emphasis stars, link targets), lower-cased, every
  character other than a letter, digit, space, ``-`` or ``_`` dropped, spaces
  turned to ``-``; a repeated slug gets ``-1``, ``-2``...
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Folders that hold no project documentation: dot-folders (.venv, .git,
# bench/.peers, caches), build output, installed packages.
SKIPPED_FOLDERS = {"build", "dist", "node_modules", "__pycache__", "site-packages"}

FENCE_OPEN = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
INLINE_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*(<[^>]*>|[^\s)]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML_ID = re.compile(r"<[a-zA-Z][^>]*?\s(?:id|name)=[\"']([^\"']+)[\"']")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
SENTENCE_END = ".!?:"
CLOSERS = ")]\"'*_`"


def markdown_files() -> list[Path]:
    """Every ``*.md`` under the repository, outside the skipped folders."""
    found = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = sorted(
            name for name in subfolders
            if not name.startswith(".") and name not in SKIPPED_FOLDERS and not name.endswith(".egg-info")
        )  # fmt: skip
        found.extend(Path(folder) / name for name in sorted(files) if name.endswith(".md"))
    return found


FILES = markdown_files()


def outside_code(text: str) -> tuple[list[tuple[int, str]], list[int]]:
    """The lines outside code blocks, with their numbers (from 1), and the
    numbers of the lines that open a fence never closed."""
    lines: list[tuple[int, str]] = []
    unclosed: list[int] = []
    fence: tuple[str, int, int] | None = None  # (character, length, line number)
    for number, line in enumerate(text.splitlines(), 1):
        if fence is None:
            opened = FENCE_OPEN.match(line)
            if opened and not (opened.group(1)[0] == "`" and "`" in opened.group(2)):
                fence = (opened.group(1)[0], len(opened.group(1)), number)
            else:
                lines.append((number, line))
        else:
            char, length, _ = fence
            if re.fullmatch(rf" {{0,3}}{re.escape(char)}{{{length},}}[ \t]*", line):
                fence = None
    if fence is not None:
        unclosed.append(fence[2])
    return lines, unclosed


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's Markdown text (before de-duplication)."""
    text = INLINE_LINK.sub(lambda m: m.group(1), heading)
    text = CODE_SPAN.sub(lambda m: m.group(2), text)
    text = re.sub(r"<[^>]+>", "", text).replace("*", "").strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a link to a Markdown file of this text may name."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in outside_code(text)[0]:
        found.update(HTML_ID.findall(line))
        heading = HEADING.match(line)
        if heading is None:
            continue
        base = slug(heading.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def last_line_problem(text: str) -> str | None:
    """Why the file's end is not a complete sentence, row or code block; None if it is."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "the file is empty"
    last = lines[-1]
    body, unclosed = outside_code(text)
    if unclosed:
        return None  # reported by the fence test
    if not body or body[-1][1].rstrip() != last:  # the last line closes a code block
        return None
    stripped = last.strip()
    if stripped.startswith("|"):
        return None if stripped.endswith("|") and len(stripped) > 1 else f"a table row cut off: {last!r}"
    if HEADING.match(last):
        return f"the file ends with a heading: {last!r}"
    if stripped.rstrip(CLOSERS)[-1:] in tuple(SENTENCE_END):
        return None
    return f"the last line is not the end of a sentence: {last!r}"


def links(text: str) -> list[tuple[int, str]]:
    """``(line number, target)`` of every link outside code."""
    found = []
    for number, line in outside_code(text)[0]:
        plain = CODE_SPAN.sub(lambda m: "code", line)
        targets = [m.group(2) for m in INLINE_LINK.finditer(plain)]
        definition = REFERENCE_DEFINITION.match(plain)
        if definition:
            targets.append(definition.group(1))
        found.extend((number, target.strip("<>")) for target in targets)
    return found


def name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_documentation_is_found():
    names = {name(path) for path in FILES}
    assert {"README.md", "docs/reference.md", "docs/design.md"} <= names, sorted(names)
    assert not any(part.startswith(".") for n in names for part in n.split("/")), sorted(names)


@pytest.mark.parametrize("path", FILES, ids=name)
def test_every_code_fence_is_closed(path):
    _, unclosed = outside_code(path.read_text(encoding="utf-8"))
    assert not unclosed, f"{name(path)}: the code fence opened on line {unclosed[0]} is never closed"


@pytest.mark.parametrize("path", FILES, ids=name)
def test_the_file_ends_with_a_complete_sentence(path):
    problem = last_line_problem(path.read_text(encoding="utf-8"))
    assert problem is None, f"{name(path)}: {problem}"


def broken_links(path: Path) -> list[str]:
    """What is wrong with each relative link of ``path``: a missing file, an unknown anchor."""
    broken = []
    for number, target in links(path.read_text(encoding="utf-8")):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # another site: not checked here
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"line {number}: {target}: no such file")
        elif anchor and linked.suffix == ".md":
            known = anchors(linked.read_text(encoding="utf-8"))
            if anchor not in known:
                broken.append(f"line {number}: {target}: no such heading ({', '.join(sorted(known))})")
    return broken


@pytest.mark.parametrize("path", FILES, ids=name)
def test_relative_links_and_anchors_resolve(path):
    broken = broken_links(path)
    assert not broken, f"{name(path)}:\n" + "\n".join(broken)


# The checks themselves, on text made to fail them: each must be able to fail.


def test_a_cut_off_end_is_found():
    assert last_line_problem("# Title\n\nStarlette works the same way. With\n") is not None
    assert last_line_problem("Text.\n\n```python\nprint(1)\n") is None  # the fence test reports it
    assert last_line_problem("Text.\n\n## A heading\n") is not None
    assert last_line_problem("| a | b |\n|---|---|\n| 1 | 2\n") is not None
    assert last_line_problem("Done (see `x`.)\n") is None
    assert last_line_problem("- a list item that is whole.\n") is None
    assert last_line_problem("| a | b |\n|---|---|\n| 1 | 2 |\n") is None
    assert last_line_problem("Text:\n\n```sh\nmake test\n```\n") is None


def test_an_unclosed_fence_is_found():
    assert outside_code("a\n```python\nx = 1\n")[1] == [2]
    assert outside_code("a\n````\n```\n````\nb\n")[1] == []
    assert outside_code("a\n~~~\n```\n")[1] == [2]


def test_headings_slug_as_on_github():
    assert slug("Sharing models: `share_models=True`") == "sharing-models-share_modelstrue"
    assert slug('More than one machine: `backend="ray"`') == "more-than-one-machine-backendray"
    assert slug("Several models: `Model`, groups, priorities, fair queues") == (
        "several-models-model-groups-priorities-fair-queues"
    )
    assert slug("The [example](x.md) app") == "the-example-app"
    assert anchors("# A\n\n## A\n\n```\n# not a heading\n```\n\n## A\n") == {"a", "a-1", "a-2"}


def test_links_in_code_are_not_links():
    text = "See [a](a.md#b) and `[c](d.md)`.\n\n```\n[e](f.md)\n```\n\n[g]: h.md\n"
    assert links(text) == [(1, "a.md#b"), (7, "h.md")]


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## Its part\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#its-part), [ok](#page), [ok](https://example.org/x.md), "
        "[no](missing.md), [no](other.md#nothing), [no](#its-part).\n",
        encoding="utf-8",
    )
    broken = broken_links(page)
    assert [line.split(": ")[1] for line in broken] == ["missing.md", "other.md#nothing", "#its-part"], broken
