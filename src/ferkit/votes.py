"""FER+'s crowd votes as arrays: outlier removal and the label schemes that turn ten votes into targets.

Votes are raw counts in FER+'s column order (`labels.FERPLUS_VOTE_COLUMNS`: the eight emotions, then
`unknown` and `NF`); every scheme starts with the paper's outlier removal (an emotion with a single vote
counts as none). Class ids index `labels.FERPLUS_CLASSES`; -1 marks a face the scheme drops.
"""

from __future__ import annotations

import numpy as np

from .errors import UsageError
from .labels import FERPLUS_CLASSES

NUM_EMOTION_VOTES = len(FERPLUS_CLASSES)
SCHEMES: tuple[str, ...] = ("ferplus-majority", "ferplus-plurality", "ferplus-distribution")


def outliers_removed(votes: np.ndarray) -> np.ndarray:
    """The votes with every single vote (a count of 1) set to 0, as FER+'s code does before any scheme."""
    votes = np.asarray(votes, dtype=np.int64)
    return np.where(votes <= 1, 0, votes)


def majority_labels(votes: np.ndarray) -> np.ndarray:
    """FER+ class ids by majority (more than half of the remaining votes); -1 for a dropped face."""
    cleaned = outliers_removed(votes)
    top = cleaned.argmax(1)
    keep = (2 * cleaned.max(1) > cleaned.sum(1)) & (top < NUM_EMOTION_VOTES)
    return np.where(keep, top, -1)


def plurality_labels(votes: np.ndarray) -> np.ndarray:
    """FER+ class ids by plurality (strictly the most remaining votes); -1 for a tie, unknown/NF or no votes."""
    cleaned = outliers_removed(votes)
    top = cleaned.argmax(1)
    tied = (cleaned == cleaned.max(1, keepdims=True)).sum(1) > 1
    keep = ~tied & (top < NUM_EMOTION_VOTES) & (cleaned.max(1) > 0)
    return np.where(keep, top, -1)


def vote_distributions(votes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(targets (N, 8) float32 summing to 1, kept (N,) bool): the remaining emotion votes, renormalised."""
    cleaned = outliers_removed(votes)
    emotions = cleaned[:, :NUM_EMOTION_VOTES].astype(np.float64)
    total = emotions.sum(1)
    keep = (total > 0) & (cleaned.argmax(1) < NUM_EMOTION_VOTES)
    targets = np.divide(emotions, total[:, None], out=np.zeros_like(emotions), where=total[:, None] > 0)
    return targets.astype(np.float32), keep


def scheme_labels(votes: np.ndarray, scheme: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(labels (N,) with -1 for dropped faces, soft targets (N, 8) or None) for one FER+ scheme."""
    if scheme == "ferplus-majority":
        return majority_labels(votes), None
    if scheme == "ferplus-plurality":
        return plurality_labels(votes), None
    if scheme == "ferplus-distribution":
        targets, keep = vote_distributions(votes)
        return np.where(keep, targets.argmax(1), -1), targets
    raise UsageError(f"unknown FER+ label scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
