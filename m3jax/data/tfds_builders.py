"""TFDS builders over the parsed corpus and knowledge base, for seqio (m3jax/data/tasks.py).

`m3_corpus` holds the pretraining corpus with the same train / held-out split as `prepare`
(`split.is_heldout` on the document id); `m3_knowledge` holds the knowledge-base documents. Both keep
the parser's document order: examples are keyed by a running index and written with shuffling
disabled, so reading back without `shuffle_files` gives the documents in order, which is what makes
the seqio packing equal to `prepare.pack`.

Nothing is downloaded by TFDS: the documents come from a `documents_fn(cache_dir)` hook, by default
`m3jax.data.fetch` + `m3jax.data.parsers` (imported lazily), and tests pass synthetic documents:

    builder = M3Corpus(data_dir=tmp, documents_fn=lambda cache_dir: docs, heldout_fraction=0.01)
    build(builder)
    tfds.builder("m3_corpus/heldout_0p01", data_dir=tmp).as_dataset(split="heldout", shuffle_files=False)
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import tensorflow_datasets as tfds

from m3jax.data.split import is_heldout

DEFAULT_HELDOUT_FRACTION = 0.01
_FEATURES = ("source", "doc_id", "title", "text")


def _fetched(kind: str) -> Callable[[object], Iterable]:
    """The default hook: fetch the packages into cache_dir and parse `kind` documents from them."""

    def documents(cache_dir):
        from m3jax.data import parsers  # lazy: reading built data needs neither module
        from m3jax.data.fetch import fetch

        return getattr(parsers, f"{kind}_documents")(fetch(cache_dir))

    return documents


def fraction_config_name(fraction: float) -> str:
    """The config name that records a held-out fraction: 0.01 -> `heldout_0p01` (no dots in names).

    Built from repr(), which round-trips floats exactly, so the name alone gives back the fraction."""
    return f"heldout_{float(fraction)!r}".replace(".", "p").replace("-", "m")


def _fraction_of(name: str) -> float | None:
    if not name.startswith("heldout_"):
        return None
    try:
        return float(name[len("heldout_"):].replace("p", ".").replace("m", "-"))
    except ValueError:
        return None


@dataclasses.dataclass
class M3CorpusConfig(tfds.core.BuilderConfig):
    """Which fraction of documents `is_heldout` puts in the `heldout` split; named after it."""

    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION

    @classmethod
    def for_fraction(cls, fraction: float) -> "M3CorpusConfig":
        is_heldout("", fraction)  # validates the range with the split's own message
        return cls(name=fraction_config_name(fraction), heldout_fraction=fraction,
                   description=f"{fraction:g} of the documents held out by a stable hash of their id")


class _DocumentsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared: Text features, in-order examples, documents from a hook instead of dl_manager."""

    VERSION = tfds.core.Version("1.0.0")
    # Nothing is downloaded, so there are no URL checksums to look up. Saying so also avoids TFDS
    # locating its checksums file through `importlib_resources`, which tfds 4.9.10 uses but does
    # not install on Python >= 3.9 (tensorflow/datasets#11212).
    url_infos = None
    _KIND = ""

    def __init__(self, *, documents_fn: Callable[[object], Iterable] | None = None, cache_dir=None, **kwargs):
        """documents_fn(cache_dir) -> iterable of Documents; called once per split, so it must give
        the documents afresh on each call. Only building uses it; reading a built dataset does not."""
        self._documents_fn = documents_fn or _fetched(self._KIND)
        self._cache_dir = cache_dir
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in _FEATURES}),
            # Keep generation order on disk and on read: packing concatenates documents in order.
            disable_shuffling=True)

    def _documents(self, keep=lambda doc: True):
        for doc in self._documents_fn(self._cache_dir):
            if keep(doc):
                yield doc

    def _generate_examples(self, documents):
        # Running index as key: with shuffling disabled the examples are stored in key order.
        for i, doc in enumerate(documents):
            yield i, {k: getattr(doc, k) for k in _FEATURES}


class M3Corpus(_DocumentsBuilder):
    """The pretraining corpus: split `train` and `heldout` exactly as `m3jax.data.prepare` splits it."""

    name = "m3_corpus"
    _KIND = "corpus"
    BUILDER_CONFIGS = [M3CorpusConfig.for_fraction(DEFAULT_HELDOUT_FRACTION)]

    def __init__(self, *, heldout_fraction: float | None = None, config=None, **kwargs):
        """heldout_fraction: shorthand for `config=M3CorpusConfig.for_fraction(heldout_fraction)`.

        A config name `heldout_<f>` not among BUILDER_CONFIGS is accepted too, so that
        `tfds.builder("m3_corpus/heldout_0p05")` (what seqio calls) reads data built with 0.05.
        """
        if heldout_fraction is not None:
            config = fraction_config_name(heldout_fraction)
        if isinstance(config, str) and config not in self.builder_configs and _fraction_of(config) is not None:
            config = M3CorpusConfig.for_fraction(_fraction_of(config))
        super().__init__(config=config, **kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager  # documents come from the hook; nothing is downloaded here
        fraction = self.builder_config.heldout_fraction
        return {
            "train": self._generate_examples(self._documents(lambda d: not is_heldout(d.doc_id, fraction))),
            "heldout": self._generate_examples(self._documents(lambda d: is_heldout(d.doc_id, fraction))),
        }


class M3Knowledge(_DocumentsBuilder):
    """The knowledge base (the documents references are cut from): one split, `train`."""

    name = "m3_knowledge"
    _KIND = "knowledge"

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(self._documents())}


def build(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
    """download_and_prepare without ever looking for a prebuilt copy on GCS; returns the builder."""
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder
