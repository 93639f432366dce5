"""dictd databases (GCIDE, FOLDOC, Jargon, Devil's Dictionary, V.E.R.A., elements): one entry, one document.

A database is `NAME.index` + `NAME.dict.dz`. Each index line is `headword TAB offset TAB length`, the
two numbers written in base 64 over `A-Za-z0-9+/`, pointing into the uncompressed .dict (dictzip is
gzip-compatible, so `gzip` reads it whole). Several headwords may point at one entry (GCIDE lists
"Banc", "Bancus" and "Bank" for one); the entry is kept once, under the headword it starts with (else
its first in the index). Headwords starting with "00" are the database's own metadata, not entries.
Ids are `SOURCE:headword` in lower case, with ":2", ":3"... for later entries of the same headword.
"""
from __future__ import annotations

import gzip
import re
import unicodedata
from pathlib import Path
from typing import Callable, Iterator

from m3jax.data.documents import Document
from m3jax.data.parsers.common import has_letters, unwrap

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUE = {c: i for i, c in enumerate(B64)}


def b64_number(digits: str) -> int:
    """A dictd index number: most significant digit first, e.g. "BA" = 64, "Gl8J" = 1728265."""
    n = 0
    for c in digits:
        n = n * 64 + _B64_VALUE[c]
    return n


def read_index(path) -> Iterator[tuple[str, int, int]]:
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) >= 3:
            yield fields[0], b64_number(fields[1]), b64_number(fields[2])


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # GCIDE has a few Windows-1252 quotes among its ASCII
        return raw.decode("cp1252", errors="replace")


def _fold(s: str) -> str:
    """Compare headwords loosely: case, accents, spaces and punctuation ignored ("Souffl'e" ~ "Soufflé")."""
    s = unicodedata.normalize("NFKD", s.lower())
    return "".join(c for c in s if c.isalnum() and not unicodedata.combining(c))


# --- GCIDE markup: {cross-references}, \Syl"la*bi*fied\ headwords followed by (pr[o^]*nun`ci*a"tion),
# [1913 Webster]-style source lines, and ASCII codes for letters ([ae] = æ, ['e] = é, [deg] = °).
_GCIDE_SOURCE_LINE = re.compile(
    r"(?m)^[ \t]*\[(?:[ \t]*\+?[ \t]*(?:\d{4}|\d\.\d|Webster|WordNet|PJC\.?|Century|Dict\.?,?|Suppl\.|sense \d|"
    r"RDH|AS|GG|RP))+[ \t]*\][ \t]*\n?")
# Both may wrap onto the next line, hence the bounded lengths rather than "up to the line's end".
_PRONUNCIATION = r"\((?=[^()]{0,80}?(?:\[[^\]\s]{1,5}\]|[\"*`]))[^(){}]{1,80}\)"  # ([a^]p"p'l)
_GCIDE_HEADWORD = re.compile(r"(?m)(^[ \t]*|,[ \t]*)([^\s,\\][^,\\\n]*?)[ \t]*\\([^\\]{1,80})\\"
                             rf"(?:[ \t]*{_PRONUNCIATION})?")
_GCIDE_SYLLABLES = re.compile(rf"\\[^\\]{{1,80}}\\(?:[ \t]*{_PRONUNCIATION})?")
_GCIDE_PRONUNCIATION_AFTER_BRACE = re.compile(rf"(?<=\}}){_PRONUNCIATION}")  # {Banked}(b[a^][ng]kt)
_GCIDE_CODE = re.compile(r"\[([^\[\]\s]{1,6})\]")
_GCIDE_NAMED = {"ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "deg": "°", "sect": "§", "eth": "ð", "thorn": "þ",
                "yogh": "ȝ", "root": "√", "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "ng": "ŋ",
                "th": "th", "aum": "ä", "imac": "i", "asl": "a", "add": "a", "udd": "u", "dsdot": "ḍ",
                "oo": "oo", "=oo": "oo", "oo^": "oo"}
_GCIDE_ACCENT = {"'": "\u0301", "`": "\u0300", '"': "\u0308", "^": "\u0302", "~": "\u0303", ",": "\u0327"}


def _gcide_char(m: re.Match) -> str:
    code = m.group(1)
    if code in _GCIDE_NAMED:
        return _GCIDE_NAMED[code]
    if len(code) == 2 and code[0] in _GCIDE_ACCENT and code[1].isalpha():  # ['e] é, ["o] ö, [,c] ç
        return unicodedata.normalize("NFC", code[1] + _GCIDE_ACCENT[code[0]])
    if len(code) == 2 and code[0] in "=-.*" and code[1].isalpha():  # pronunciation key marks: the bare letter
        return code[1]
    if len(code) == 2 and code[1] == "^" and code[0].isalpha():  # breve, pronunciation only
        return code[0]
    return m.group(0)  # [R.], [Obs.], [2]: real text


def _gcide_headword(m: re.Match) -> str:
    # "Souffl'e \Souf"fl['e]\" -> "Soufflé": the syllabified form, once its marks are gone, spells the
    # headword with its accents; keep the plain headword when the two disagree.
    spelled = re.sub(r"[\"*`]", "", _GCIDE_CODE.sub(_gcide_char, m.group(3)))
    return m.group(1) + (spelled if _fold(spelled) == _fold(m.group(2)) else m.group(2))


def clean_gcide(entry: str) -> str:
    entry = _GCIDE_SOURCE_LINE.sub("", entry)
    entry = _GCIDE_HEADWORD.sub(_gcide_headword, entry)
    entry = _GCIDE_SYLLABLES.sub("", entry)
    entry = _GCIDE_PRONUNCIATION_AFTER_BRACE.sub("", entry)
    entry = _GCIDE_CODE.sub(_gcide_char, entry)
    return re.sub(r"[ \t]+,", ",", entry)  # "Apple \Ap"ple\, n." left "Apple , n."


_FOLDOC_DOMAIN = re.compile(r"<([a-z][a-z ,/-]*)>")  # <language>, <networking>: the field of a sense


def clean_foldoc(entry: str) -> str:
    return _FOLDOC_DOMAIN.sub(r"(\1)", entry)


def _document(keys: list[str], entry: str, clean) -> tuple[str, str, str] | None:
    """(key, title, text) of one entry, or None when nothing is left of it."""
    body = re.sub(r"\{([^{}]*)\}", r"\1", clean(entry))  # {cross-references} keep their words
    first, _, rest = body.lstrip().partition("\n")
    head = first.split(",")[0].strip()
    key = next((k for k in keys if _fold(k) == _fold(head)), keys[0])
    if _fold(first) == _fold(key):  # a bare headword line, repeating the index: kept once, as a prefix
        title, body = first.strip(), unwrap(rest)
        text = f"{title}: {body}"
    elif _fold(head) == _fold(key):  # "ABSURDITY, n. A statement...": the text starts with its headword
        title = head
        text = body = unwrap(body)
    else:
        title, body = key, unwrap(body)
        text = f"{key}: {body}"
    return (key, title, text) if has_letters(body) else None


def dictd(root, source: str, clean: Callable[[str], str] = lambda s: s) -> Iterator[Document]:
    """Entries of every NAME.index + NAME.dict(.dz) pair under root, in index order."""
    indexes = sorted(Path(root).rglob("*.index"))
    if not indexes:
        raise FileNotFoundError(f"no dictd .index under {root}")
    used_ids = set()
    for index in indexes:
        dz, plain = index.with_suffix(".dict.dz"), index.with_suffix(".dict")
        if dz.exists():
            with gzip.open(dz) as f:
                data = f.read()
        else:
            data = plain.read_bytes()
        spans: dict[tuple[int, int], list[str]] = {}  # entry -> its headwords, in index order
        for key, offset, length in read_index(index):
            if not (key.startswith("00-") or key.startswith("00database")):
                spans.setdefault((offset, length), []).append(key)
        for (offset, length), keys in spans.items():
            found = _document(keys, _decode(data[offset:offset + length]), clean)
            if found is None:
                continue
            key, title, text = found
            base = doc_id = f"{source}:{key.lower()}"
            n = 1
            while doc_id in used_ids:  # the second "Bank" entry is gcide:bank:2
                n += 1
                doc_id = f"{base}:{n}"
            used_ids.add(doc_id)
            yield Document(source, doc_id, title, text)


def gcide(root, source: str = "gcide") -> Iterator[Document]:
    return dictd(root, source, clean_gcide)


def foldoc(root, source: str = "foldoc") -> Iterator[Document]:
    return dictd(root, source, clean_foldoc)
