"""FER-2013 in any of its formats -> validated uint8 arrays split into train / val / test.

Formats, detected from the path: the Kaggle challenge `fer2013.csv` (`emotion,pixels,Usage`),
the later `icml_face_data.csv` (`emotion, Usage, pixels`), the image-folder layout
`train|test/<class>/<Usage>_<id>.jpg`, and a .zip of that layout read in place. Each source is
decoded once into a uint8 cache keyed by the source's identity. Bad input raises `DataError`
naming the file and the row or image; nothing is dropped without a word.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import sys
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .labels import EMOTION_TO_ID, EMOTIONS, IMAGE_SIZE, NUM_PIXELS, SPLIT_TO_USAGE, SPLITS, USAGE_TO_SPLIT

CACHE_VERSION = 1
DEFAULT_DATA_PATH = Path("data/fer2013")
MAX_REPORTED_ERRORS = 20
SPLIT_SEED = 0
_USAGE_PREFIX = re.compile(r"^(Training|PublicTest|PrivateTest)_")
_FOLDER_ENTRY = re.compile(r"^(?P<prefix>(?:.*/)?)(?P<part>train|test)/(?P<cls>[^/]+)/(?P<name>[^/]+)$")


class DataError(ValueError):
    """A data source that cannot be loaded as FER-2013; the message names what and where."""


@dataclass
class Split:
    """One split: images (N, 48, 48) uint8, labels (N,) int64 ids, names (N,) of the source items."""

    images: np.ndarray
    labels: np.ndarray
    names: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FerData:
    """FER-2013 loaded from `source`: the three splits plus what loading had to say."""

    source: str
    format: str
    splits: dict[str, Split]
    converted: int = 0
    notes: list[str] = field(default_factory=list)
    from_cache: bool = False

    def __getitem__(self, split: str) -> Split:
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return self.splits[split]


def resolve_data_path(path: str | os.PathLike[str] | None = None) -> Path:
    """`--data` if given, else $FERKIT_DATA, else ./data/fer2013."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get("FERKIT_DATA") or DEFAULT_DATA_PATH)


def default_cache_dir() -> Path:
    return Path(os.environ.get("FERKIT_CACHE") or Path.home() / ".cache" / "ferkit")


# ---------------------------------------------------------------------------------------------
# Entry point


def load_fer2013(
    path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> FerData:
    """Load FER-2013 from a CSV, an image folder or a zip of one, through the uint8 cache."""
    source = resolve_data_path(path).expanduser()
    if not source.exists():
        raise DataError(f"{source}: no such file or folder (pass --data or set FERKIT_DATA)")
    fmt = detect_format(source)
    cache_file = None
    if use_cache:
        cache_file = Path(cache_dir or default_cache_dir()) / f"fer2013-{_source_key(source)}.npz"
        if cache_file.exists():
            try:
                return _read_cache(cache_file)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
                print(f"ferkit: ignoring unreadable cache {cache_file}: {err}", file=sys.stderr)
    data = _LOADERS[fmt](source)
    _check_not_empty(data)
    if cache_file is not None:
        _write_cache(cache_file, data)
    return data


def detect_format(path: Path) -> str:
    """'folder', 'zip', 'csv' or 'icml-csv', from the path and, for CSVs, the header."""
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    if suffix == ".zip":
        return "zip"
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
        return "icml-csv" if [h.strip() for h in header] == ["emotion", "Usage", "pixels"] else "csv"
    raise DataError(f"{path}: not a FER-2013 source (expected a folder, a .zip or a .csv)")


# ---------------------------------------------------------------------------------------------
# CSV formats


def _load_csv(path: Path) -> FerData:
    items: list[tuple[str, int, np.ndarray, str]] = []
    errors: list[str] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in ("emotion", "pixels", "Usage") if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (header: {','.join(header)})")
        col = {name: header.index(name) for name in ("emotion", "pixels", "Usage")}
        for row_number, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                items.append(_parse_csv_row(row, col, row_number))
            except DataError as err:
                errors.append(str(err))
    _raise_collected(path, errors)
    data = _assemble(items, source=path, fmt=detect_format(path))
    return data


def _parse_csv_row(row: list[str], col: dict[str, int], row_number: int) -> tuple[str, int, np.ndarray, str]:
    where = f"row {row_number}"
    if len(row) <= max(col.values()):
        raise DataError(f"{where}: expected {len(col)} columns, got {len(row)}")
    label = _parse_label(row[col["emotion"]].strip(), where)
    usage = row[col["Usage"]].strip()
    if usage not in USAGE_TO_SPLIT:
        raise DataError(f"{where}: unknown Usage {usage!r} (expected Training, PublicTest or PrivateTest)")
    tokens = row[col["pixels"]].split()
    if len(tokens) != NUM_PIXELS:
        raise DataError(f"{where}: expected {NUM_PIXELS} pixels, got {len(tokens)}")
    try:
        pixels = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next(i for i, t in enumerate(tokens) if not t.isdecimal() or int(t) > 255)
        if tokens[bad].isdecimal():
            raise DataError(f"{where}: pixel {bad} is {tokens[bad]}, outside 0..255") from None
        raise DataError(f"{where}: pixel {bad} is {tokens[bad]!r}, not an integer") from None
    out_of_range = np.flatnonzero((pixels < 0) | (pixels > 255))
    if out_of_range.size:
        i = int(out_of_range[0])
        raise DataError(f"{where}: pixel {i} is {pixels[i]}, outside 0..255")
    image = pixels.astype(np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)
    return USAGE_TO_SPLIT[usage], label, image, where


def _parse_label(text: str, where: str) -> int:
    try:
        label = int(text)
    except ValueError:
        raise DataError(f"{where}: emotion {text!r} is not an integer id 0..6") from None
    if not 0 <= label < len(EMOTIONS):
        raise DataError(f"{where}: emotion {label} outside 0..6")
    return label


# ---------------------------------------------------------------------------------------------
# Image-folder layout, on disk or in a zip


@dataclass
class _ImageEntry:
    part: str  # "train" or "test": the top folder
    cls: str
    name: str
    read: object  # () -> bytes


def _load_folder(root: Path) -> FerData:
    entries = []
    for part in ("train", "test"):
        part_dir = root / part
        if not part_dir.is_dir():
            raise DataError(f"{root}: missing the {part}/ folder of the image-folder layout")
        for path in sorted(part_dir.rglob("*")):
            if path.is_dir():
                continue
            rel = path.relative_to(part_dir)
            if len(rel.parts) != 2:
                if path.name.startswith("."):
                    continue  # e.g. train/.DS_Store: not part of the layout, as in a zip
                raise DataError(f"{path}: expected {part}/<class>/<image>, not in a class folder")
            entries.append(_ImageEntry(part, rel.parts[0], rel.parts[1], path.read_bytes))
    return _decode_entries(entries, source=root, fmt="folder")


def _load_zip(path: Path) -> FerData:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise DataError(f"{path}: not a readable zip file ({err})") from None
    with archive:
        entries = list(_zip_entries(archive, path))
        return _decode_entries(entries, source=path, fmt="zip")


def _zip_entries(archive: zipfile.ZipFile, path: Path) -> Iterator[_ImageEntry]:
    matches = []
    for info in archive.infolist():
        if info.is_dir() or info.filename.startswith("__MACOSX/"):
            continue
        match = _FOLDER_ENTRY.match(info.filename)
        if match:
            matches.append((match, info))
    if not matches:
        raise DataError(f"{path}: no train/<class>/<image> entries in this zip")
    prefix = min((m["prefix"] for m, _ in matches), key=len)
    for match, info in sorted(matches, key=lambda mi: mi[1].filename):
        if match["prefix"] != prefix:
            raise DataError(f"{path}: {info.filename} lies outside {prefix or 'the top'} train/ or test/")
        name = info.filename

        def read(name: str = name) -> bytes:
            return archive.read(name)

        yield _ImageEntry(match["part"], match["cls"], match["name"], read)


def _decode_entries(entries: list[_ImageEntry], source: Path, fmt: str) -> FerData:
    skipped = [e for e in entries if e.name.startswith(".")]
    entries = [e for e in entries if not e.name.startswith(".")]
    errors = [
        f"{e.part}/{e.cls}/{e.name}: unknown class folder {e.cls!r} (expected one of {', '.join(EMOTIONS)})"
        for e in entries
        if e.cls not in EMOTION_TO_ID
    ]
    _raise_collected(source, errors)
    # Decoding 35,887 JPEGs is the slow part of a cold start; PIL releases the GIL while decoding.
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        decoded = list(pool.map(_decode_entry, entries))
    errors = [result for result in decoded if isinstance(result, str)]
    _raise_collected(source, errors)
    items: list[tuple[str, int, np.ndarray, str]] = []
    converted = 0
    unprefixed_test: list[int] = []
    for entry, result in zip(entries, decoded, strict=True):
        assert not isinstance(result, str)
        image, was_converted = result
        converted += was_converted
        split = _split_from_name(entry)
        if split is None:
            unprefixed_test.append(len(items))
            split = "test"
        items.append((split, EMOTION_TO_ID[entry.cls], image, f"{entry.part}/{entry.cls}/{entry.name}"))
    data = _assemble(items, source=source, fmt=fmt, converted=converted)
    if skipped:
        data.notes.append(f"skipped {len(skipped)} hidden file(s), e.g. {skipped[0].part}/{skipped[0].cls}/"
                          f"{skipped[0].name}")
    if unprefixed_test:
        _split_unprefixed_test(data, items, unprefixed_test)
    return data


def _decode_entry(entry: _ImageEntry) -> tuple[np.ndarray, bool] | str:
    where = f"{entry.part}/{entry.cls}/{entry.name}"
    try:
        return decode_face_image(entry.read())  # type: ignore[operator]
    except DataError as err:
        return f"{where}: {err}"
    except OSError as err:
        return f"{where}: unreadable ({err})"


def decode_face_image(blob: bytes) -> tuple[np.ndarray, bool]:
    """Image file bytes -> (48x48 uint8 grayscale array, whether it had to be converted)."""
    try:
        with Image.open(io.BytesIO(blob)) as opened:
            opened.load()
            image: Image.Image = opened
            converted = image.mode != "L" or image.size != (IMAGE_SIZE, IMAGE_SIZE)
            if image.mode != "L":
                image = image.convert("L")
            if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8).copy(), converted
    except (UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise DataError(f"not an image ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"corrupt or truncated image ({err})") from None


def _split_from_name(entry: _ImageEntry) -> str | None:
    match = _USAGE_PREFIX.match(entry.name)
    if match:
        return USAGE_TO_SPLIT[match[1]]
    return "train" if entry.part == "train" else None


def _split_unprefixed_test(data: FerData, items: list, unprefixed: list[int]) -> None:
    """Test-folder images without a Usage prefix: a stratified, seeded 50/50 val/test split."""
    rng = np.random.default_rng(SPLIT_SEED)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i in unprefixed:
        by_class[items[i][1]].append(i)
    to_val: set[int] = set()
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda i: items[i][3])
        order = rng.permutation(len(members))
        to_val.update(members[j] for j in order[: (len(members) + 1) // 2])
    relabelled = [("val", *item[1:]) if i in to_val else item for i, item in enumerate(items)]
    split_data = _assemble(relabelled, source=Path(data.source), fmt=data.format, converted=data.converted)
    data.splits = split_data.splits
    data.notes.append(
        f"{len(unprefixed)} test images have no PublicTest_/PrivateTest_ prefix: split 50/50 into val "
        f"and test, stratified by class, seed {SPLIT_SEED}"
    )


# ---------------------------------------------------------------------------------------------
# Assembly, checks, cache


def _assemble(
    items: Iterable[tuple[str, int, np.ndarray, str]], source: Path, fmt: str, converted: int = 0
) -> FerData:
    grouped: dict[str, list[tuple[int, np.ndarray, str]]] = {split: [] for split in SPLITS}
    for split, label, image, name in items:
        grouped[split].append((label, image, name))
    splits = {}
    for split, rows in grouped.items():
        images = np.stack([r[1] for r in rows]) if rows else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        labels = np.array([r[0] for r in rows], dtype=np.int64)
        names = np.array([r[2] for r in rows], dtype=str)
        splits[split] = Split(images, labels, names)
    return FerData(source=str(source), format=fmt, splits=splits, converted=converted)


def _check_not_empty(data: FerData) -> None:
    empty = [f"{s} ({SPLIT_TO_USAGE[s]})" for s in SPLITS if len(data.splits[s]) == 0]
    if empty:
        raise DataError(f"{data.source}: empty split(s): {', '.join(empty)}")


def _raise_collected(source: Path, errors: list[str]) -> None:
    if not errors:
        return
    shown = "\n  ".join(errors[:MAX_REPORTED_ERRORS])
    more = f"\n  ... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
    raise DataError(f"{source}: {len(errors)} problem(s):\n  {shown}{more}")


def _source_key(source: Path) -> str:
    """Identity of a source: its resolved path plus the size and mtime of every file in it."""
    source = source.resolve()
    digest = hashlib.sha256(f"{CACHE_VERSION}|{source}".encode())
    if source.is_dir():
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            for name in sorted(filenames):
                stat = os.stat(os.path.join(dirpath, name))
                digest.update(f"{dirpath}/{name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    else:
        stat = source.stat()
        digest.update(f"|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def _write_cache(cache_file: Path, data: FerData) -> None:
    arrays: dict[str, np.ndarray] = {}
    for split, part in data.splits.items():
        arrays[f"{split}_images"] = part.images
        arrays[f"{split}_labels"] = part.labels
        arrays[f"{split}_names"] = part.names
    meta = {"source": data.source, "format": data.format, "converted": data.converted, "notes": data.notes}
    arrays["meta"] = np.array(json.dumps(meta))
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, cache_file)
    except OSError as err:
        print(f"ferkit: could not write the data cache {cache_file}: {err}", file=sys.stderr)


def _read_cache(cache_file: Path) -> FerData:
    with np.load(cache_file, allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"]))
        splits = {s: Split(npz[f"{s}_images"], npz[f"{s}_labels"], npz[f"{s}_names"]) for s in SPLITS}
    return FerData(splits=splits, from_cache=True, **meta)


_LOADERS = {"folder": _load_folder, "zip": _load_zip, "csv": _load_csv, "icml-csv": _load_csv}


# ---------------------------------------------------------------------------------------------
# Summary and audit


def audit_duplicates(data: FerData) -> dict[str, object]:
    """Pixel-identical images within each split and across splits."""
    groups: dict[bytes, list[tuple[str, int]]] = defaultdict(list)
    for split in SPLITS:
        part = data.splits[split]
        for image, label in zip(part.images, part.labels, strict=True):
            groups[hashlib.blake2b(image.tobytes(), digest_size=16).digest()].append((split, int(label)))
    within = Counter[str]()
    cross_groups = Counter[str]()
    conflicting = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        per_split = Counter(split for split, _ in members)
        for split, n in per_split.items():
            within[split] += n - 1
        if len(per_split) > 1:
            cross_groups["+".join(s for s in SPLITS if s in per_split)] += 1
        conflicting += len({label for _, label in members}) > 1
    duplicated = [m for m in groups.values() if len(m) > 1]
    return {
        "groups": len(duplicated),
        "extra_copies": sum(len(m) - 1 for m in duplicated),
        "within_split_extra_copies": {s: within[s] for s in SPLITS},
        "cross_split_groups": sum(cross_groups.values()),
        "cross_split_groups_by_splits": dict(sorted(cross_groups.items())),
        "groups_with_conflicting_labels": conflicting,
    }


def summarize(data: FerData) -> dict[str, object]:
    """Per-split, per-class counts plus conversions, notes and the duplicate audit."""
    splits = {}
    for split in SPLITS:
        counts = np.bincount(data.splits[split].labels, minlength=len(EMOTIONS))
        splits[split] = {
            "usage": SPLIT_TO_USAGE[split],
            "total": int(counts.sum()),
            "per_class": {name: int(n) for name, n in zip(EMOTIONS, counts, strict=True)},
        }
    return {
        "source": data.source,
        "format": data.format,
        "total": sum(len(p) for p in data.splits.values()),
        "splits": splits,
        "converted": data.converted,
        "duplicates": audit_duplicates(data),
        "notes": data.notes,
        "from_cache": data.from_cache,
    }
