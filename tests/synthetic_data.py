"""Synthetic documents for tests: pseudo-words in sentences, a corpus and a knowledge base, one planted leak."""
import collections

import numpy as np

Doc = collections.namedtuple("Doc", "source doc_id title text")


def synthetic(seed=0, corpus_docs=400, knowledge_docs=40):
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(1500)]

    def text(n):
        return " ".join(" ".join(rng.choice(words, rng.integers(5, 13))).capitalize() + "." for _ in range(n))

    knowledge = [Doc("wiki", f"wiki:{i}", f"T{i}", text(3)) for i in range(knowledge_docs)]
    corpus = [Doc("book", f"book:{i}", f"B{i}", text(12)) for i in range(corpus_docs)]
    corpus[7] = corpus[7]._replace(text=corpus[7].text + " " + knowledge[5].text)  # a leak to catch
    return corpus, knowledge
