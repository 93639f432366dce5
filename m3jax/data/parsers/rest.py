"""reStructuredText documentation (linux-doc, python-doc) -> plain text that keeps the prose and the code.

Not a reST parser: a line-based cleaner. Explicit markup blocks (`.. name:: args` with an indented
body) lose their marker: admonitions and descriptions keep their words (`.. function:: open(file)`
keeps the signature), version notes read as Sphinx prints them, and blocks that carry no prose
(toctree, index, include, raw, kernel-doc, comments, labels, substitution definitions) go whole.
Roles keep their text (`:func:`~os.open`` -> "os.open", `:ref:`Title <label>`` -> "Title"),
section adornments and table borders go, table cells keep their text.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import re
import textwrap
from pathlib import Path
from typing import Iterator

from m3jax.data.documents import Document
from m3jax.data.parsers.common import has_letters, tidy_lines

# Directives whose whole block is dropped: navigation, indexing, source includes, raw output.
_DROP_BLOCK = {"toctree", "index", "highlight", "include", "literalinclude", "raw", "image", "contents",
               "sectnum", "tabularcolumns", "sectionauthor", "moduleauthor", "testsetup", "testcleanup",
               "currentmodule", "default-domain", "audit-event", "kernel-doc", "kernel-include",
               "kernel-abi", "kernel-feat", "c:namespace", "c:namespace-push", "c:namespace-pop", "cpp:namespace"}
# Directives whose arguments are a language, a path or a switch rather than words: the body stays.
_DROP_ARGS = {"code-block", "code", "sourcecode", "doctest", "testcode", "testoutput", "parsed-literal",
              "only", "figure", "kernel-figure", "kernel-render", "cssclass", "productionlist", "module",
              "math", "ifconfig"}
_VERSION_NOTES = {"versionadded": "New in version {}.", "versionchanged": "Changed in version {}:",
                  "deprecated": "Deprecated since version {}:", "availability": "Availability: {}"}

_EXPLICIT = re.compile(r"^( *)\.\.(?: +(.*))?$")
_DIRECTIVE = re.compile(r"^([\w:.+-]+)::(?: +(.*))?$")
_FOOTNOTE = re.compile(r"^\[[^\]]+\] *(.*)$")
_OPTION = re.compile(r"^ *:[\w .-]+:(?: |$)")
_ADORNMENT = re.compile(r"^ *([!-/:-@\[-`{-~])\1{2,} *$")  # ===, ---, ~~~ under or over a title
_TABLE_BORDER = re.compile(r"^ *(?:[=-]{2,}(?: +[=-]{2,})+|\+(?:[-=:+]+\+)+) *$")
_TABLE_ROW = re.compile(r"^ *\|.*\| *$")
_FIELD = re.compile(r"^( *):([\w][\w -]*): ")  # a field list item, ":Author: Someone" -> "Author: Someone"

_ROLE = re.compile(r"(?<![\w`]):(?:[\w.+-]+:)+`([^`]+)`")
_NAMED_LINK = re.compile(r"`([^`<]+?) *<[^`>]+>`__?")
_REF_LINK = re.compile(r"`([^`]+)`__?(?!\w)")
_LITERAL = re.compile(r"``(.{1,300}?)``", re.S)
_INTERPRETED = re.compile(r"`([^`\n]+)`")
_STRONG = re.compile(r"(?<![\w*])\*\*(\S(?:[^*]*?\S)?)\*\*(?![\w*])")
_EMPHASIS = re.compile(r"(?<![\w*])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")
_FOOTNOTE_REF = re.compile(r" ?\[(?:#\w*|\d+|\*|[A-Z][\w-]*)\]_(?!\w)")
_SUBSTITUTION = re.compile(r"\|([\w-]+)\|_{0,2}")
_ESCAPE = re.compile(r"\\([*_`|])")  # reST escapes; a doubled backslash stays (C strings)


def _role(m: re.Match) -> str:
    role = m.group(0)[1:m.group(0).index("`") - 1].split(":")[-1]
    text = m.group(1)
    target = re.fullmatch(r"(.*?)\s*<([^<>]+)>", text, re.S)
    if target and target.group(1):
        text = target.group(1)  # :ref:`the title <the-label>`
    text = text.lstrip("~!")
    if role in ("pep", "rfc"):
        return f"{role.upper()} {text}"
    return text


def clean_inline(text: str) -> str:
    text = _ROLE.sub(_role, text)
    text = _NAMED_LINK.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    text = _REF_LINK.sub(r"\1", text)
    text = _INTERPRETED.sub(r"\1", text)
    text = _STRONG.sub(r"\1", text)
    text = _EMPHASIS.sub(r"\1", text)
    text = _FOOTNOTE_REF.sub("", text)
    text = _SUBSTITUTION.sub(r"\1", text)
    return _ESCAPE.sub(r"\1", text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _directive(name: str, args: str, body: list[str]) -> list[str]:
    """What stays of one directive: a heading from its arguments, then its cleaned content."""
    if name in _DROP_BLOCK:
        return []
    # Up to the first blank line: options (:maxdepth: 2, :noindex:) and the arguments' continuation
    # lines (a second signature), or, for an argument-less admonition, the first paragraph.
    blank = next((k for k, line in enumerate(body) if not line.strip()), len(body))
    lead = [line.strip() for line in body[:blank] if not _OPTION.match(line)]
    if name in _VERSION_NOTES:
        head = [_VERSION_NOTES[name].format(args)] if args else []
    elif name == "deprecated-removed" and len(args.split()) == 2:
        head = ["Deprecated since version {}, will be removed in version {}:".format(*args.split())]
    else:
        head = [args] if args and name not in _DROP_ARGS else []
    return head + lead + _blocks(textwrap.dedent("\n".join(body[blank:])).splitlines())


def _blocks(lines: list[str]) -> list[str]:
    """Resolve explicit markup blocks, recursively (directives nest)."""
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        m = _EXPLICIT.match(line)
        if not m:
            out.append(line)
            i += 1
            continue
        indent, rest = len(m.group(1)), (m.group(2) or "").strip()
        j = i + 1  # the block: what follows, indented deeper than the marker (blank lines included)
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > indent):
            j += 1
        body = lines[i + 1:j]
        directive, footnote = _DIRECTIVE.match(rest), _FOOTNOTE.match(rest)
        if directive:
            kept = _directive(directive.group(1).lower(), (directive.group(2) or "").strip(), body)
        elif footnote:
            kept = [footnote.group(1)] + _blocks(textwrap.dedent("\n".join(body)).splitlines())
        else:
            kept = []  # a comment, a label (.. _name:), a link target or a substitution definition
        out += [" " * indent + k if k else "" for k in kept] + [""]
        i = j
    return out


def _line(line: str) -> str | None:
    if _ADORNMENT.match(line) or _TABLE_BORDER.match(line) or line.strip() == "::" or line.startswith("__ "):
        return None
    if _TABLE_ROW.match(line) and line.count("|") > 2:
        return "  ".join(cell.strip() for cell in line.strip().strip("|").split("|") if cell.strip())
    line = _FIELD.sub(r"\1\2: ", line)
    if line.endswith("::"):  # "Example::" introduces a literal block; Sphinx shows "Example:"
        line = line[:-2].rstrip() + (":" if not line[:-2].endswith(" ") else "")
    return line


def clean_rest(text: str) -> str:
    lines = _blocks(text.expandtabs(8).splitlines())
    kept = [k for k in map(_line, lines) if k is not None]
    return tidy_lines(clean_inline("\n".join(kept)))


def title_of(text: str) -> str | None:
    """The first section title: a line directly above an adornment at least as long as itself."""
    lines = text.expandtabs(8).splitlines()
    for above, below in zip(lines, lines[1:]):
        if above.strip() and not _ADORNMENT.match(above) and _ADORNMENT.match(below) \
                and len(below.strip()) >= len(above.strip()):
            return " ".join(clean_inline(above).split())
    return None


def _document(source: str, doc_id: str, raw: bytes) -> Document | None:
    text = raw.decode("utf-8", errors="replace")
    cleaned = clean_rest(text)
    if not has_letters(cleaned):
        return None
    first_line = cleaned.lstrip().split("\n", 1)[0].strip()  # plain .txt pages: their first line
    title = title_of(text) or (first_line if len(first_line) <= 80 else doc_id.split(":", 1)[1])
    return Document(source, doc_id, title, cleaned)


def linux_doc(root, source: str = "linux-doc") -> Iterator[Document]:
    """Documentation/**/*.rst and *.txt (most gzipped) of the kernel's documentation package.

    Documentation/translations/ (Chinese, Japanese, Korean, Italian copies of English pages) is left
    out: the corpus is English, and those pages repeat the originals.
    """
    docs = sorted(p for p in Path(root).rglob("Documentation") if p.is_dir())
    if not docs:
        raise FileNotFoundError(f"no Documentation folder under {root}")
    for path in sorted(docs[0].rglob("*")):
        name = path.name[:-3] if path.name.endswith(".gz") else path.name
        rel = path.relative_to(docs[0])
        if not path.is_file() or not name.endswith((".rst", ".txt")) or rel.parts[0] == "translations":
            continue
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        doc = _document(source, f"{source}:{rel.with_name(name).as_posix()}", raw)
        if doc is not None:
            yield doc


def _walk_once(root: Path) -> Iterator[Path]:
    """Every file under root, following symlinked folders but entering each real folder once."""
    seen = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders.sort()
        for f in sorted(files):
            yield Path(folder, f)


def python_doc(root, source: str = "python-doc") -> Iterator[Document]:
    """The reST sources Sphinx ships in html/_sources/**/*.rst.txt.

    The package reaches one html folder by several symlinked paths (python3.11-doc/html, devhelp's
    book): each file is read once, by its real path, and identical contents once.
    """
    found = {}
    for path in _walk_once(Path(root)):
        parts = path.parts
        if path.name.endswith(".rst.txt") and "_sources" in parts:
            rel = "/".join(parts[len(parts) - parts[::-1].index("_sources"):])[:-len(".txt")]
            found.setdefault(os.path.realpath(path), rel)
    if not found:
        raise FileNotFoundError(f"no _sources/**/*.rst.txt under {root}")
    seen_ids, seen_contents = set(), set()
    for real, rel in sorted(found.items(), key=lambda item: item[1]):
        raw = Path(real).read_bytes()
        digest = hashlib.sha256(raw).digest()
        if rel in seen_ids or digest in seen_contents:
            continue
        seen_ids.add(rel)
        seen_contents.add(digest)
        doc = _document(source, f"{source}:{rel}", raw)
        if doc is not None:
            yield doc
