"""The selection step: the best setting of a grid by its validation score, with the evidence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Generic, List, Optional, Sequence, TypeVar

T = TypeVar("T")


class SelectionError(ValueError):
    """No setting of the grid has a score (every one failed)."""


@dataclass(frozen=True)
class Selection(Generic[T]):
    """The chosen setting and the evidence: every setting's validation score, in grid order."""

    index: int
    setting: T
    score: float
    settings: List[T]
    scores: List[Optional[float]]  # None: the setting failed (merge or scoring)

    def evidence(self) -> Dict[str, Any]:
        return {"settings": list(self.settings), "scores": list(self.scores), "index": self.index, "score": self.score}


def select(settings: Sequence[T], scores: Sequence[Optional[float]], *, prefer: Optional[Callable[[T], Any]] = None) -> Selection[T]:
    """The setting with the highest score; ties go to the FIRST setting in grid order.

    ``prefer`` (a key of a setting) breaks ties before grid order: among equal scores
    the setting with the largest ``prefer`` value wins. Settings whose score is None
    are never chosen; a grid with no score at all is a ``SelectionError``.
    """
    settings, scores = list(settings), list(scores)
    if len(settings) != len(scores):
        raise ValueError(f"{len(settings)} settings but {len(scores)} scores")
    scored = [index for index, score in enumerate(scores) if score is not None]
    if not scored:
        raise SelectionError(f"no setting of the grid has a score ({len(settings)} settings)")
    if prefer is None:
        best = max(scored, key=lambda index: (scores[index], -index))
    else:
        best = max(scored, key=lambda index: (scores[index], prefer(settings[index]), -index))
    return Selection(index=best, setting=settings[best], score=scores[best], settings=settings, scores=scores)  # type: ignore[arg-type]
