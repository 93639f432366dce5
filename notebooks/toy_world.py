"""A made-up little world as text, so the notebooks need no downloads: towns with facts about them.

`knowledge_documents()` gives one encyclopedia-style paragraph per town (the knowledge base that becomes
memories); `corpus_documents()` gives travel notes that mention the towns (the pretraining corpus).
The same seed gives the same world, so every notebook sees the same towns.
"""
from __future__ import annotations

import numpy as np

from m3jax.data.documents import Document

SYLLABLES = ["var", "tol", "ben", "mir", "ka", "lo", "dra", "sen", "fa", "ru", "gel", "mon", "pi", "os", "tar",
             "vel", "qui", "zan", "hol", "bri"]
PRODUCTS = ["glass bells", "blue cheese", "copper kettles", "wool blankets", "apple cider", "clay pipes",
            "silver rings", "paper lanterns", "salted fish", "oak barrels"]
TRADES = ["fishermen", "weavers", "potters", "brewers", "smiths", "bakers"]
DIRECTIONS = ["north", "south", "east", "west"]


def _name(rng, parts=2):
    return "".join(rng.choice(SYLLABLES, parts)).capitalize()


def world(seed: int = 0, towns: int = 40) -> list[dict]:
    """The facts: one dict per town."""
    rng = np.random.default_rng(seed)
    names = []
    while len(names) < towns:  # distinct town names
        n = _name(rng)
        if n not in names:
            names.append(n)
    return [{"name": n, "river": _name(rng, 1) + "a", "year": int(rng.integers(900, 1900)),
             "founder": f"{_name(rng)} {_name(rng)}", "product": str(rng.choice(PRODUCTS)),
             "trade": str(rng.choice(TRADES)), "neighbour": names[(i + 1) % towns],
             "direction": str(rng.choice(DIRECTIONS)), "people": int(rng.integers(2, 90)) * 100}
            for i, n in enumerate(names)]


def knowledge_text(t: dict) -> str:
    return (f"{t['name']} is a town on the river {t['river']}. It was founded in {t['year']} by {t['founder']}. "
            f"{t['name']} is famous for its {t['product']}, and many of its {t['people']} people are {t['trade']}. "
            f"The nearest town to the {t['direction']} is {t['neighbour']}.")


def knowledge_documents(seed: int = 0) -> list[Document]:
    return [Document("wiki", f"wiki:{t['name']}", t["name"], knowledge_text(t)) for t in world(seed)]


def corpus_documents(seed: int = 0, docs: int = 300) -> list[Document]:
    """Travel notes: each visits a few towns and says something true about each."""
    towns = world(seed)
    rng = np.random.default_rng(seed + 1)
    sentences = [
        "We reached {name} after a long day on the road.",
        "In {name} the market was full of {product}.",
        "The {trade} of {name} worked until the sun went down.",
        "An old man told us that {founder} founded {name} in {year}.",
        "From {name} we followed the river {river} for an hour.",
        "Everyone in {name} talks about their {product}.",
        "{name} has about {people} people, most of them {trade}.",
        "We left {name} and walked {direction} towards {neighbour}.",
    ]
    out = []
    for i in range(docs):
        parts = [f"Day {i + 1} of my journey."]
        for t in rng.choice(towns, int(rng.integers(2, 5)), replace=False):
            parts += [s.format(**t) for s in rng.choice(sentences, 3, replace=False)]
        parts.append("Then we rested.")
        out.append(Document("notes", f"notes:{i}", f"Day {i + 1}", " ".join(parts)))
    return out
