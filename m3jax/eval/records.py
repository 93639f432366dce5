"""The one record every benchmark is turned into: a context and the continuations to score."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    """One question. The model scores log p(continuation | context) for each choice.

    context: one text shared by all choices, or a tuple with one context per choice (Winogrande's
        partial scoring puts the choice into the context and scores the shared rest of the sentence).
    continuations: one text per choice, each starting with the space that separates it from its context.
    gold: index of the right choice.
    """
    id: str
    context: str | tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int

    def __post_init__(self):
        if len(self.continuations) < 2:
            raise ValueError(f"question {self.id} has {len(self.continuations)} choices; need at least 2")
        if not 0 <= self.gold < len(self.continuations):
            raise ValueError(f"question {self.id}: gold index {self.gold} is not among its "
                             f"{len(self.continuations)} choices")
        if isinstance(self.context, tuple) and len(self.context) != len(self.continuations):
            raise ValueError(f"question {self.id} has {len(self.context)} contexts for {len(self.continuations)} "
                             "choices")

    def contexts(self) -> tuple[str, ...]:
        """The context of each choice."""
        if isinstance(self.context, tuple):
            return self.context
        return (self.context,) * len(self.continuations)
