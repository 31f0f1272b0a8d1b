"""The vocabulary every other module imports: emotion names, their FER-2013 ids, the image size."""

from __future__ import annotations

EMOTIONS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
"""Emotion names in FER-2013 id order (0 angry ... 6 neutral)."""

NUM_CLASSES = len(EMOTIONS)
IMAGE_SIZE = 48
NUM_PIXELS = IMAGE_SIZE * IMAGE_SIZE

EMOTION_TO_ID: dict[str, int] = {name: i for i, name in enumerate(EMOTIONS)}

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""ferkit's split names, in order."""

USAGE_TO_SPLIT: dict[str, str] = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
"""FER-2013's `Usage` values: PublicTest is the validation split, PrivateTest the reported test split."""

SPLIT_TO_USAGE: dict[str, str] = {split: usage for usage, split in USAGE_TO_SPLIT.items()}

FERPLUS_VOTE_COLUMNS: tuple[str, ...] = (
    "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF")
"""FER+'s ten vote columns, in its files' order: eight emotions, then `unknown` and `NF` (not a face)."""

FERPLUS_CLASSES: tuple[str, ...] = ("neutral", "happy", "surprise", "sad", "angry", "disgust", "fear", "contempt")
"""FER+'s eight emotions in its column order, named as ferkit names FER-2013's (contempt is FER+'s own)."""
