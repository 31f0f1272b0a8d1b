"""FER+: the crowd votes that relabel FER-2013 (Barsoum et al., ICMI 2016), as training targets and as a benchmark.

Owns a data set's view under a `--labels` scheme and the vote statistics. `ferkit.data` loads FER+'s
sources, `ferkit.votes` holds the schemes' arithmetic and `ferkit.evaluate` scores models against the
votes. Every scheme starts with the paper's outlier removal (an emotion with a single vote counts as none):

- majority: the emotion holding more than half of the remaining votes; otherwise, or when `unknown`/`NF`
  holds it, the face is dropped. FER+'s test protocol: 3,152 of the 3,573 FER2013Test faces.
- plurality: the emotion with strictly the most remaining votes; dropped on a tie for the top or when
  `unknown`/`NF` has the most.
- distribution: the remaining emotion votes over their sum, a soft target for cross-entropy; dropped
  when no emotion vote remains or `unknown`/`NF` has the most (as FER+'s code drops them).

Validation and test splits always keep the majority protocol's faces and labels (model selection and the
reported figure use the literature's metric); only the training split follows the chosen scheme.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .data import DataError, FerData, Split
from .labels import EMOTIONS, FERPLUS_CLASSES, SPLITS
from .votes import SCHEMES, majority_labels, plurality_labels, scheme_labels, vote_distributions

LABEL_SCHEMES: tuple[str, ...] = ("fer2013", *SCHEMES)
"""`--labels` choices: FER-2013's own single labels, or one of FER+'s schemes over its votes."""

FERPLUS_TEST_MAJORITY_COUNTS = {"neutral": 1089, "happy": 893, "surprise": 396, "sad": 384, "angry": 273,
                                "disgust": 18, "fear": 83, "contempt": 16}
"""FER2013Test's faces per class under the majority protocol (3,152 in all): what `--record` expects on FER+."""


def with_label_scheme(data: FerData, scheme: str) -> FerData:
    """`data` (FerData) as a training run sees it under `--labels scheme`.

    `fer2013` needs FER-2013's labels (refused on FER+'s folder, which has none). A FER+ scheme needs the
    votes: the training split keeps the faces the scheme keeps, with its labels (and soft targets for the
    distribution); validation and test keep the majority protocol's faces and labels. Returns a new FerData.
    """
    has_votes = all(data.splits[s].votes is not None for s in SPLITS)
    if scheme == "fer2013":
        if data.classes != EMOTIONS:
            raise DataError(f"{data.source}: FER+ data has no FER-2013 labels; pass --labels with a FER+ scheme "
                            f"({', '.join(LABEL_SCHEMES[1:])})")
        return data
    if not has_votes:
        raise DataError(f"{data.source}: --labels {scheme} needs FER+ votes (FER+'s folder layout, or "
                        "fer2013.csv with --votes fer2013new.csv)")
    splits = {}
    for split in SPLITS:
        part = data.splits[split]
        assert part.votes is not None
        labels, targets = scheme_labels(part.votes, scheme if split == "train" else "ferplus-majority")
        keep = labels >= 0
        splits[split] = Split(part.images[keep], labels[keep], part.names[keep], votes=part.votes[keep],
                              targets=targets[keep] if targets is not None else None)
    notes = [*data.notes, f"labels: {scheme} for training, ferplus-majority for validation and test"]
    return replace(data, splits=splits, classes=FERPLUS_CLASSES, notes=notes, labels=scheme, all_faces=data.splits)


# ---------------------------------------------------------------------------------------------
# Statistics for `ferkit data info`


def vote_statistics(data: FerData) -> dict[str, object]:
    """Per split: faces, faces kept by each scheme, mean vote entropy (bits), the majority's class counts and,
    where FER-2013's own labels are known, how often they agree with the FER+ majority (overall, per class)."""
    stats: dict[str, object] = {}
    for split in SPLITS:
        part = data.splits[split]
        if part.votes is None:
            continue
        majority = majority_labels(part.votes)
        kept = majority >= 0
        entry: dict[str, object] = {
            "faces": len(part.votes),
            "kept": {"ferplus-majority": int(kept.sum()),
                     "ferplus-plurality": int((plurality_labels(part.votes) >= 0).sum()),
                     "ferplus-distribution": int(vote_distributions(part.votes)[1].sum())},
            "mean_vote_entropy_bits": float(_entropy_bits(part.votes).mean()),
            "majority_per_class": {name: int((majority == k).sum()) for k, name in enumerate(FERPLUS_CLASSES)},
        }
        if data.fer2013_labels_known:
            entry["fer2013_agreement"] = _agreement(part.labels[kept], majority[kept])
        stats[split] = entry
    return stats


def _entropy_bits(votes: np.ndarray) -> np.ndarray:
    """Entropy of each face's raw vote shares over all ten columns, in bits."""
    counts = np.asarray(votes, dtype=np.float64)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    logs = np.log2(shares, out=np.zeros_like(shares), where=shares > 0)
    return -(shares * logs).sum(1)


def _agreement(fer2013_labels: np.ndarray, majority: np.ndarray) -> dict[str, object]:
    """Share of majority-kept faces whose FER-2013 label names the FER+ majority's emotion, per FER-2013 class."""
    as_fer2013 = to_fer2013_ids(majority)
    per_class = {}
    for k, name in enumerate(EMOTIONS):
        mine = fer2013_labels == k
        per_class[name] = float((as_fer2013[mine] == k).mean()) if mine.any() else float("nan")
    return {"overall": float((as_fer2013 == fer2013_labels).mean()) if len(majority) else float("nan"),
            "per_fer2013_class": per_class}


FERPLUS_TO_FER2013 = np.array([EMOTIONS.index(name) if name in EMOTIONS else -1 for name in FERPLUS_CLASSES])
"""FER+ class id -> FER-2013 id by name (contempt, which FER-2013 lacks: -1)."""


def to_fer2013_ids(ferplus_ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ferplus_ids)
    return np.where(ids >= 0, FERPLUS_TO_FER2013[np.maximum(ids, 0)], -1)
