"""FER+: the crowd votes that relabel FER-2013 (Barsoum et al., ICMI 2016), as data and as training targets.

Owns the two FER+ sources (its own folder layout `FER2013Train|Valid|Test/label.csv` + PNGs, and Kaggle's
`fer2013.csv` joined by position with Microsoft's `fer2013new.csv`), the label schemes that turn ten votes
into targets, and the vote statistics. Votes are kept raw, in FER+'s column order (the eight emotions,
then `unknown` and `NF`); every scheme starts with the paper's outlier removal (an emotion with a single
vote counts as none):

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

import csv
import io
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .data import DataError, FerData, Split, decode_face_image, open_source, raise_collected, read_regular_file
from .labels import EMOTIONS, FERPLUS_CLASSES, FERPLUS_VOTE_COLUMNS, IMAGE_SIZE, SPLITS, USAGE_TO_SPLIT

LABEL_SCHEMES: tuple[str, ...] = ("fer2013", "ferplus-majority", "ferplus-plurality", "ferplus-distribution")
"""`--labels` choices: FER-2013's own single labels, or one of FER+'s schemes over its votes."""

NUM_EMOTION_VOTES = len(FERPLUS_CLASSES)
FERPLUS_SPLIT_FOLDERS = {"train": "FER2013Train", "val": "FER2013Valid", "test": "FER2013Test"}
FERPLUS_TEST_MAJORITY_COUNTS = {"neutral": 1089, "happy": 893, "surprise": 396, "sad": 384, "angry": 273,
                                "disgust": 18, "fear": 83, "contempt": 16}
"""FER2013Test's faces per class under the majority protocol (3,152 in all): what `--record` expects on FER+."""
_PNG_NAME = re.compile(r"^fer\d{7}\.png$")


def is_ferplus_folder(path: Path) -> bool:
    return (path / FERPLUS_SPLIT_FOLDERS["train"] / "label.csv").is_file()


# ---------------------------------------------------------------------------------------------
# Schemes: raw votes (N, 10) -> labels, kept faces, targets


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
    raise ValueError(f"unknown FER+ label scheme {scheme!r}; choose one of: {', '.join(LABEL_SCHEMES[1:])}")


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


# ---------------------------------------------------------------------------------------------
# Loaders


def parse_vote_row(fields: list[str], first: int, where: str) -> np.ndarray:
    """The ten vote counts of one label row, from column `first` on; DataError naming `where` if bad."""
    counts = fields[first : first + len(FERPLUS_VOTE_COLUMNS)]
    if len(fields) != first + len(FERPLUS_VOTE_COLUMNS):
        raise DataError(f"{where}: expected {first + len(FERPLUS_VOTE_COLUMNS)} columns (name, ..., "
                        f"{', '.join(FERPLUS_VOTE_COLUMNS)}), got {len(fields)}")
    bad = next((i for i, c in enumerate(counts) if not (c.strip().isascii() and c.strip().isdigit())), None)
    if bad is not None:
        raise DataError(f"{where}: vote count for {FERPLUS_VOTE_COLUMNS[bad]} is {counts[bad]!r}, not a whole number")
    votes = np.array([int(c) for c in counts], dtype=np.int64)
    if votes.sum() == 0 or votes.sum() > 20:
        raise DataError(f"{where}: {votes.sum()} votes in all (FER+ has about 10 per face)")
    return votes


def load_ferplus_folder(root: Path) -> FerData:
    """FER+'s folder layout -> FerData with the votes and FER+'s eight classes (labels: the plurality, -1 for none).

    Each split's `label.csv` (no header) and its PNGs must match one to one: a row without its PNG and a PNG
    without a row are both errors, named with file and row.
    """
    splits = {}
    errors: list[str] = []
    converted = 0
    for split, folder_name in FERPLUS_SPLIT_FOLDERS.items():
        folder = root / folder_name
        rows, mentioned, problems = _read_label_csv(folder / "label.csv")
        errors += problems
        on_disk = {p.name for p in folder.iterdir() if _PNG_NAME.match(p.name)} if folder.is_dir() else set()
        errors += [f"{folder_name}/label.csv: row {n}: no image {name} in {folder_name}/"
                   for n, (name, _) in rows.items() if name not in on_disk]
        errors += [f"{folder_name}/{name}: an image with no row in label.csv" for name in sorted(on_disk - mentioned)]
        if errors:
            continue
        images, names, votes = [], [], []
        for name, vote in rows.values():
            try:
                image, was_converted = decode_face_image(read_regular_file(folder / name), f"{folder_name}/{name}")
            except (DataError, OSError) as err:
                errors.append(str(err))
                continue
            converted += was_converted
            images.append(image)
            names.append(f"{folder_name}/{name}")
            votes.append(vote)
        splits[split] = _votes_split(images, names, votes)
    raise_collected(root, errors)
    return FerData(source=str(root), format="ferplus", splits=splits, converted=converted, classes=FERPLUS_CLASSES,
                   labels="votes")


def _votes_split(images: list[np.ndarray], names: list[str], votes: list[np.ndarray]) -> Split:
    """A Split of FER+ faces labelled by their plurality (-1 where none: data info and audits only)."""
    vote_array = np.stack(votes) if votes else np.zeros((0, len(FERPLUS_VOTE_COLUMNS)), np.int64)
    image_array = np.stack(images) if images else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    return Split(image_array, plurality_labels(vote_array), np.array(names, dtype=str), votes=vote_array)


def _read_label_csv(path: Path) -> tuple[dict[int, tuple[str, np.ndarray]], set[str], list[str]]:
    """FER+ `label.csv` rows by row number: (PNG name, votes); every image name it mentions (bad rows too);
    and the problems, each naming file and row."""
    where_file = f"{path.parent.name}/{path.name}"
    if not path.is_file():
        return {}, set(), [f"{where_file}: missing (FER+'s folder layout has one label.csv per split)"]
    rows: dict[int, tuple[str, np.ndarray]] = {}
    problems: list[str] = []
    seen: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for number, fields in enumerate(csv.reader(f), start=1):
            where = f"{where_file}: row {number}"
            if not fields:
                continue
            try:
                name = fields[0].strip()
                if not _PNG_NAME.match(name):
                    raise DataError(f"{where}: {name!r} is not a FER+ image name (ferNNNNNNN.png)")
                if name in seen:
                    raise DataError(f"{where}: {name} already listed in row {seen[name]}")
                seen[name] = number
                rows[number] = (name, parse_vote_row(fields, 2, where))
            except DataError as err:
                problems.append(str(err))
    return rows, set(seen), problems


def attach_votes(data: FerData, votes_csv: Path) -> FerData:
    """FER-2013 loaded from `fer2013.csv` (rows in file order) joined by position with FER+'s `fer2013new.csv`.

    Rows FER+ marks as not a face (an empty `Image name`) are dropped and counted in the notes; row counts and
    the Usage of every row must agree, else DataError naming the first row that differs.
    """
    if data.format not in ("csv", "icml-csv"):
        raise DataError(f"{votes_csv}: FER+ votes join fer2013.csv by row position, so --votes needs a FER-2013 "
                        f"CSV, not a {data.format} source")
    usages, names, votes = _read_votes_csv(votes_csv)
    total = sum(len(data.splits[s]) for s in SPLITS)
    if len(usages) != total:
        raise DataError(f"{votes_csv}: {len(usages)} rows, but {data.source} has {total}: the two files do not "
                        "line up (they are joined by position)")
    position = _row_positions(data)
    splits = {}
    dropped = 0
    for split in SPLITS:
        part = data.splits[split]
        rows = position[split]
        for i, row in enumerate(rows):
            if USAGE_TO_SPLIT.get(usages[row]) != split:
                raise DataError(f"{votes_csv}: row {row + 2} has Usage {usages[row]!r}, but row {row + 2} of "
                                f"{data.source} ({part.names[i]}) is {split}: the two files do not line up")
        face = np.array([bool(names[row]) for row in rows], dtype=bool)
        dropped += int((~face).sum())
        split_votes = np.stack([votes[row] for row in rows])[face] if len(rows) else np.zeros((0, 10), np.int64)
        splits[split] = Split(part.images[face], part.labels[face], part.names[face], votes=split_votes)
    notes = [*data.notes, f"joined with FER+ votes from {votes_csv}: {dropped} rows FER+ marks as not a face dropped"]
    return replace(data, splits=splits, notes=notes, source=f"{data.source}+{votes_csv}")


def _row_positions(data: FerData) -> dict[str, list[int]]:
    """Each split's rows as 0-based positions among the CSV's data rows, in file order (names are `row N`)."""
    numbered = []
    for split in SPLITS:
        for i, name in enumerate(data.splits[split].names):
            text = str(name).removeprefix("row ")
            if not text.isdigit():
                raise DataError(f"{data.source}: {name!r} is not a CSV row number, so rows cannot be joined")
            numbered.append((int(text), split, i))
    positions: dict[str, list[int]] = {split: [0] * len(data.splits[split]) for split in SPLITS}
    for rank, (_, split, i) in enumerate(sorted(numbered)):
        positions[split][i] = rank
    return positions


def _read_votes_csv(path: Path) -> tuple[list[str], list[str], list[np.ndarray]]:
    """`fer2013new.csv`: (Usage, Image name, ten votes) per row; DataError naming file and row when malformed."""
    with open_source(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        expected = ["Usage", "Image name", *FERPLUS_VOTE_COLUMNS]
        missing = [c for c in expected if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (header: {','.join(header)})")
        usage_col, name_col, first = header.index("Usage"), header.index("Image name"), header.index("neutral")
        usages, names, votes = [], [], []
        for number, fields in enumerate(reader, start=2):
            if len(fields) != len(header):
                raise DataError(f"{path}: row {number}: expected {len(header)} columns, got {len(fields)}")
            usages.append(fields[usage_col].strip())
            names.append(fields[name_col].strip())
            votes.append(parse_vote_row(fields[: first + len(FERPLUS_VOTE_COLUMNS)], first, f"{path}: row {number}")
                         if names[-1] else np.zeros(len(FERPLUS_VOTE_COLUMNS), np.int64))
    return usages, names, votes


# ---------------------------------------------------------------------------------------------
# Scoring against the votes


def class_columns(from_classes: list[str] | tuple[str, ...], to_classes: list[str] | tuple[str, ...]) -> list[int]:
    """Indices into `from_classes` of each of `to_classes`, by name (e.g. a FER+ model's logits in FER-2013 order)."""
    missing = [c for c in to_classes if c not in from_classes]
    if missing:
        raise ValueError(f"classes {', '.join(missing)} are not among {', '.join(from_classes)}")
    return [list(from_classes).index(c) for c in to_classes]


def ferplus_report(
    logits: np.ndarray, votes: np.ndarray | None, classes: list[str] | tuple[str, ...]
) -> dict[str, object]:
    """A model's (N, classes) logits scored against FER+ votes (N, 10) over the classes both share.

    For a FER+ model that is all eight; a FER-2013 model is scored over its seven (faces whose majority is
    contempt are left out). Majority accuracy is the literature's protocol; plurality accuracy, balanced
    accuracy, ECE and the confusion matrix are over the faces each scheme keeps; NLL and KL are against
    the vote distributions (outliers removed, renormalised over the shared classes).
    """
    from .evaluate import compute_metrics

    if votes is None:
        raise ValueError("no FER+ votes to score against")
    shared = [c for c in FERPLUS_CLASSES if c in classes]
    z = torch.from_numpy(np.asarray(logits, dtype=np.float32)[:, class_columns(classes, shared)])
    to_shared = np.array([shared.index(c) if c in shared else -1 for c in FERPLUS_CLASSES])

    def scored(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mapped = np.where(labels >= 0, to_shared[np.maximum(labels, 0)], -1)
        return mapped >= 0, mapped

    keep, majority = scored(majority_labels(votes))
    report = compute_metrics(z[keep], majority[keep], shared)
    plural_keep, plurality = scored(plurality_labels(votes))
    plural = compute_metrics(z[plural_keep], plurality[plural_keep], shared)
    nll, kl, faces = _distribution_fit(z, votes, shared)
    return {"classes": shared, "majority_accuracy": report["accuracy"], "majority_faces": int(keep.sum()),
            "majority_balanced_accuracy": report["balanced_accuracy"], "majority_ece": report["ece"],
            "majority_macro_f1": report["macro_f1"], "confusion_matrix": report["confusion_matrix"],
            "plurality_accuracy": plural["accuracy"], "plurality_faces": int(plural_keep.sum()),
            "distribution_nll": nll, "distribution_kl": kl, "distribution_faces": faces}


def _distribution_fit(z: torch.Tensor, votes: np.ndarray, shared: list[str]) -> tuple[float, float, int]:
    """Mean cross-entropy and KL divergence (nats) of softmax(z) from the vote distributions over `shared`."""
    targets, keep = vote_distributions(votes)
    p = targets[:, [FERPLUS_CLASSES.index(c) for c in shared]].astype(np.float64)
    total = p.sum(1)
    keep &= total > 0
    p = p[keep] / total[keep, None]
    log_q = torch.log_softmax(z[torch.from_numpy(keep)].double(), 1).numpy()
    nll = -(p * log_q).sum(1)
    entropy = -(p * np.log(p, out=np.zeros_like(p), where=p > 0)).sum(1)
    return float(nll.mean()), float((nll - entropy).mean()), int(keep.sum())


def shared_class_view(
    logits: np.ndarray, labels: np.ndarray, model_classes: list[str] | tuple[str, ...],
    label_classes: list[str] | tuple[str, ...],
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """A model scored on labels of another vocabulary (a FER-2013 model on FER+, a FER+ model on FER-2013):
    (logits over the shared classes, labels as indices into them, the shared classes in the labels' order,
    the mask of faces whose label is shared). With one vocabulary it changes nothing."""
    shared = [c for c in label_classes if c in model_classes]
    to_shared = np.array([shared.index(c) if c in shared else -1 for c in label_classes])
    labels = np.asarray(labels)
    mapped = np.where(labels >= 0, to_shared[np.maximum(labels, 0)], -1)
    keep = mapped >= 0
    return np.asarray(logits)[keep][:, class_columns(model_classes, shared)], mapped[keep], shared, keep
