"""Perl's POD manuals (perl-doc: pod/*.pod) -> plain text.

Commands become plain lines (`=head1 NAME` -> "NAME", `=item B<-T>` -> "-T"); `=over`, `=back`,
`=cut`, `=encoding` and `=for` paragraphs go, and so do `=begin FORMAT ... =end FORMAT` blocks.
Formatting codes keep their text: B<>, I<>, C<>, F<>, S<> their content, L<text|target> its text,
E<gt> its character; X<> (index entries) and Z<> vanish. Codes nest, and may use doubled brackets
with spaces (C<< $a->[0] >>). Ordinary paragraphs are unwrapped; verbatim (indented) ones keep
their lines.
"""
from __future__ import annotations

import html.entities
import re
from pathlib import Path
from typing import Iterator

from m3jax.data.documents import Document
from m3jax.data.parsers.common import has_letters, tidy_lines

_OPEN = re.compile(r"([A-Z])(<+)")
_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}


def _entity(name: str) -> str:
    name = name.strip()
    if name in _POD_ESCAPES:
        return _POD_ESCAPES[name]
    if re.fullmatch(r"0x[0-9a-fA-F]+|\d+|0[0-7]+", name):
        return chr(int(name, 0) if not re.fullmatch(r"0[0-7]+", name) else int(name, 8))
    return html.entities.html5.get(name + ";", f"E<{name}>")


def _link(content: str) -> str:
    if "|" in content:
        return content.split("|", 1)[0]  # L<the text|perlfunc/open>
    if re.match(r"\w+:[^:\s]", content):
        return content  # a URL
    page, _, section = content.partition("/")
    section = section.strip('"')
    return f"{section} in {page}" if section and page else section or page


def _codes(s: str, i: int = 0, close: re.Pattern | None = None) -> tuple[str, int]:
    """Expand formatting codes from s[i:] up to the `close` delimiter; returns (text, index after it)."""
    out = []
    while i < len(s):
        if close is not None:
            m = close.match(s, i)
            if m:
                return "".join(out), m.end()
        m = _OPEN.match(s, i)
        if m:
            letter, n = m.group(1), len(m.group(2))
            if n > 1:  # C<< ... >>: the content is set off by whitespace, closed by " >>"
                start = re.compile(r"\s+").match(s, m.end())
                inner, i = _codes(s, start.end() if start else m.end(), re.compile(r"\s+" + ">" * n))
            else:
                inner, i = _codes(s, m.end(), re.compile(">"))
            out.append(_apply(letter, inner))
            continue
        out.append(s[i])
        i += 1
    return "".join(out), i


def _apply(letter: str, inner: str) -> str:
    if letter in "XZ":
        return ""
    if letter == "E":
        return _entity(inner)
    if letter == "L":
        return _link(inner)
    return inner  # B I C F S and any unknown code: the text itself


def expand_codes(text: str) -> str:
    return _codes(text)[0]


def clean_pod(text: str) -> str:
    out, skipping = [], None
    for paragraph in re.split(r"\n[ \t]*\n", text):
        if not paragraph.strip():
            continue
        if skipping:  # inside =begin FORMAT ... =end FORMAT
            if re.match(rf"=end\s+{re.escape(skipping)}\b", paragraph):
                skipping = None
            continue
        if paragraph.startswith("="):
            command, rest = re.match(r"(=\w+)\s*(.*)", paragraph, re.S).groups()
            if command == "=begin":
                skipping = rest.split()[0] if rest.split() else ""
            elif command in ("=head1", "=head2", "=head3", "=head4", "=head5", "=head6", "=item"):
                words = " ".join(expand_codes(rest).split())
                if words and words != "*" and not re.fullmatch(r"\d+\.?", words):  # bullets: no words
                    out.append(words)
            continue  # =pod =cut =over =back =encoding =for
        if paragraph[0] in " \t":
            out.append(paragraph.expandtabs(8))  # verbatim: code, kept as written
        else:
            out.append(" ".join(expand_codes(paragraph).split()))
    return tidy_lines("\n\n".join(out))


def title_of(pod: str) -> str | None:
    """The NAME section's first ordinary paragraph: "perlsec - Perl security"."""
    paragraphs = [p.strip() for p in re.split(r"\n[ \t]*\n", pod)]
    for i, paragraph in enumerate(paragraphs):
        if re.match(r"=head1\s+NAME\b", paragraph):
            after = next((p for p in paragraphs[i + 1:] if p and not p.startswith("=")), None)
            return " ".join(expand_codes(after).split()) if after else None
    return None


def perl_pod(root, source: str = "perl-doc") -> Iterator[Document]:
    paths = sorted(Path(root).rglob("*.pod"))
    if not paths:
        raise FileNotFoundError(f"no .pod files under {root}")
    for path in paths:
        raw = path.read_text(encoding="utf-8", errors="replace")
        text = clean_pod(raw)
        if has_letters(text):
            yield Document(source, f"{source}:{path.stem}", title_of(raw) or path.stem, text)
