"""Embedder interface shared by the retrievers (dense sentence encoders, lexical scorers)."""
from __future__ import annotations

import abc
from typing import Sequence

import numpy as np


class Embedder(abc.ABC):
    """Maps texts to vectors for retrieval.

    Dense embedders return a float32 array of shape (len(texts), dim) whose rows have unit L2 norm,
    so that the inner product of two rows is their cosine similarity. Sparse/lexical embedders
    set `dim = 0`.
    """

    name: str
    dim: int  # 0 for sparse/lexical embedders

    @abc.abstractmethod
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeds `texts`; dense embedders return unit-norm float32 rows of shape (n, dim)."""
