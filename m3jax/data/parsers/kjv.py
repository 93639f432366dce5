"""The King James Bible of bible-kjv-text: one chapter, one document, verse numbers removed.

The package holds no plain text: `usr/lib/bible.data` is the Bible Retrieval System's "EC02" file,
a header and a table of segment offsets, each segment one Unix `compress` (LZW) stream of 64 KiB of
text. The 3-byte compress header (1f 9d, flags) is stored once, just before the first segment, and
applies to all. Decompressed, the text is one verse per line: "Ge1:1 In the beginning God ...".
"""
from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Iterator

from m3jax.data.documents import Document

MAGIC = b"EC02"
# The 66 books in order, under the abbreviations bible.data uses.
BOOKS = {
    "Ge": "Genesis", "Exo": "Exodus", "Lev": "Leviticus", "Num": "Numbers", "Deu": "Deuteronomy",
    "Josh": "Joshua", "Jdgs": "Judges", "Ruth": "Ruth", "1Sm": "1 Samuel", "2Sm": "2 Samuel",
    "1Ki": "1 Kings", "2Ki": "2 Kings", "1Chr": "1 Chronicles", "2Chr": "2 Chronicles", "Ezra": "Ezra",
    "Neh": "Nehemiah", "Est": "Esther", "Job": "Job", "Psa": "Psalms", "Prv": "Proverbs",
    "Eccl": "Ecclesiastes", "SSol": "Song of Solomon", "Isa": "Isaiah", "Jer": "Jeremiah",
    "Lam": "Lamentations", "Eze": "Ezekiel", "Dan": "Daniel", "Hos": "Hosea", "Joel": "Joel", "Amos": "Amos",
    "Obad": "Obadiah", "Jonah": "Jonah", "Mic": "Micah", "Nahum": "Nahum", "Hab": "Habakkuk",
    "Zep": "Zephaniah", "Hag": "Haggai", "Zec": "Zechariah", "Mal": "Malachi", "Mat": "Matthew",
    "Mark": "Mark", "Luke": "Luke", "John": "John", "Acts": "Acts", "Rom": "Romans", "1Cor": "1 Corinthians",
    "2Cor": "2 Corinthians", "Gal": "Galatians", "Eph": "Ephesians", "Phi": "Philippians",
    "Col": "Colossians", "1Th": "1 Thessalonians", "2Th": "2 Thessalonians", "1Tim": "1 Timothy",
    "2Tim": "2 Timothy", "Titus": "Titus", "Phmn": "Philemon", "Heb": "Hebrews", "Jas": "James",
    "1Pet": "1 Peter", "2Pet": "2 Peter", "1Jn": "1 John", "2Jn": "2 John", "3Jn": "3 John", "Jude": "Jude",
    "Rev": "Revelation",
}
_VERSE = re.compile(r"^(\d?[A-Z][A-Za-z]*?)(\d+):(\d+) (.*)$")


def unlzw(codes: bytes, flags: int) -> bytes:
    """Decode one Unix `compress` stream (without its 3-byte header; flags = the header's third byte).

    Codes are little-endian bit fields, 9 bits wide at first and one wider whenever the table fills,
    up to flags & 0x1f bits. compress reads codes in groups of eight (width bytes); a change of width
    or a CLEAR code (256, in block mode) skips the rest of the group.
    """
    max_bits, block_mode = flags & 0x1F, bool(flags & 0x80)
    table = [bytes([i]) for i in range(256)] + ([b""] if block_mode else [])
    width, pos, group_start, end = 9, 0, 0, len(codes) * 8
    out, prev = bytearray(), None

    def skip_to_group_end():
        size = width * 8
        return group_start + -(-(pos - group_start) // size) * size

    while True:
        if len(table) > (1 << width) - 1 and width < max_bits:
            pos = group_start = skip_to_group_end()
            width += 1
            continue
        if pos + width > end:
            break
        byte = pos >> 3
        code = (int.from_bytes(codes[byte:byte + 3], "little") >> (pos & 7)) & ((1 << width) - 1)
        pos += width
        if block_mode and code == 256 and prev is not None:
            pos = group_start = skip_to_group_end()
            width, prev = 9, None
            del table[257:]
            continue
        if code < len(table):
            entry = table[code]
        elif code == len(table) and prev is not None:  # the code being defined right now: prev + prev[0]
            entry = prev + prev[:1]
        else:
            raise ValueError(f"corrupt LZW stream: code {code} with {len(table)} entries")
        if prev is not None and len(table) < 1 << max_bits:
            table.append(prev + entry[:1])
        out += entry
        prev = entry
    return bytes(out)


def read_bible_data(path) -> str:
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path} is not an EC02 compressed data file")
    _, _, segments = struct.unpack(">3I", data[0x50:0x5C])
    offsets = struct.unpack(f">{segments + 1}I", data[0x5C:0x5C + 4 * (segments + 1)])
    header = data[offsets[0] - 3:offsets[0]]
    if header[:2] != b"\x1f\x9d":
        raise ValueError(f"{path}: no compress header before the first segment")
    text = b"".join(unlzw(data[a:b], header[2]) for a, b in zip(offsets, offsets[1:]))
    return text.decode("ascii")


def kjv(root, source: str = "kjv") -> Iterator[Document]:
    paths = sorted(Path(root).rglob("bible.data"))
    if not paths:
        raise FileNotFoundError(f"no bible.data under {root}")
    chapter, verses = None, []

    def document():
        book, number = chapter
        return Document(source, f"{source}:{book}:{number}", f"{book} {number}", " ".join(verses))

    for line in read_bible_data(paths[0]).splitlines():
        m = _VERSE.match(line)
        if not m:
            continue  # the title line, or a verse cut off at the end of a (test) excerpt
        abbreviation, number, _, words = m.groups()
        key = (BOOKS[abbreviation], int(number))
        if key != chapter and verses:
            yield document()
            verses = []
        chapter = key
        verses.append(words.strip())
    if verses:
        yield document()
