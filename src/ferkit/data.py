"""FER-2013 in any of its formats -> validated uint8 arrays split into train / val / test.

Formats, detected from the path: the Kaggle challenge `fer2013.csv` (`emotion,pixels,Usage`),
the later `icml_face_data.csv` (`emotion, Usage, pixels`), the image-folder layout
`train|test/<class>/<Usage>_<id>.jpg`, a .zip of that layout read in place, and FER+'s folder layout
(`FER2013Train|Valid|Test/label.csv` and PNGs), whose faces carry the crowd's ten votes; `fer2013.csv`
also takes FER+'s `fer2013new.csv`, joined by row position (`votes=`); `ferkit.votes` turns votes into labels.
Each source is decoded once into a uint8 cache keyed by the source's identity. Bad input raises `DataError`
naming the file and the row, image or zip member; nothing is dropped without a word.

Images are decoded by `ferkit.images` and cut to 48x48 by `ferkit.faces.crop_face`, the same code
that prediction uses, so a data-set image and the same picture given to `ferkit predict` become the
same crop. Only regular files are read, opened so that a FIFO or device can never block the loader.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import re
import stat
import struct
import sys
import warnings
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import InputError
from .faces import crop_face
from .images import ImageError, NotRegularFileError, decode_image_bytes, open_regular_file, os_error_reason, to_gray
from .labels import (
    EMOTION_TO_ID,
    EMOTIONS,
    FERPLUS_CLASSES,
    FERPLUS_VOTE_COLUMNS,
    IMAGE_SIZE,
    NUM_PIXELS,
    SPLIT_TO_USAGE,
    SPLITS,
    USAGE_TO_SPLIT,
)
from .outputs import OutputPathError, atomic_write
from .votes import plurality_labels

CACHE_VERSION = 2  # 2: images decoded by ferkit.images and cropped by faces.crop_face (16-bit, RGB, EXIF)
DEFAULT_DATA_PATH = Path("data/fer2013")
MAX_REPORTED_ERRORS = 20
MAX_LINE_BYTES = 1 << 16
"""Longest CSV line read: a FER-2013 row is under 10 kB, so a longer line is not one (and is not kept)."""
MAX_MEMBER_BYTES = 1 << 26
"""Largest zip member read (64 MiB uncompressed): a face image is kilobytes; this bounds a zip bomb."""
SPLIT_SEED = 0
_USAGE_PREFIX = re.compile(r"^(Training|PublicTest|PrivateTest)_")
_FERPLUS_PNG = re.compile(r"^fer\d{7}\.png$")
FERPLUS_SPLIT_FOLDERS = {"train": "FER2013Train", "val": "FER2013Valid", "test": "FER2013Test"}
_FOLDER_ENTRY = re.compile(r"^(?P<prefix>(?:.*/)?)(?P<part>train|test)/(?P<cls>[^/]+)/(?P<name>[^/]+)$")


class DataError(InputError):
    """A data source that cannot be loaded as FER-2013; the message names what and where."""


@dataclass
class Split:
    """One split: images (N, 48, 48) uint8, labels (N,) int64 ids, names (N,) of the source items.

    FER+ sources add `votes` (N, 10): the crowd's raw counts in FER+'s column order; a FER+ label scheme
    may add `targets` (N, classes): soft targets (vote distributions) to train towards.
    """

    images: np.ndarray
    labels: np.ndarray
    names: np.ndarray
    votes: np.ndarray | None = None
    targets: np.ndarray | None = None

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
    classes: tuple[str, ...] = EMOTIONS
    labels: str = "fer2013"
    """What `Split.labels` are: FER-2013's own labels, a FER+ scheme's, or "votes" (FER+'s folder: plurality)."""
    all_faces: dict[str, Split] | None = None
    """Under a FER+ scheme: every face of each split with its votes, before the scheme dropped any (the faces
    that scores against the votes, such as plurality accuracy or KL, are computed over)."""

    @property
    def fer2013_labels_known(self) -> bool:
        return self.labels == "fer2013"

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
    votes: str | os.PathLike[str] | None = None,
) -> FerData:
    """Load FER-2013 from a CSV, an image folder or a zip of one, or FER+ from its folder layout, through the
    uint8 cache. `votes`: FER+'s `fer2013new.csv`, joined by position with a `fer2013.csv` source."""
    data = _load_source(path, cache_dir, use_cache)
    if votes is not None:
        data = attach_votes(data, Path(votes).expanduser())
    return data


def _load_source(
    path: str | os.PathLike[str] | None, cache_dir: str | os.PathLike[str] | None, use_cache: bool
) -> FerData:
    source = resolve_data_path(path).expanduser()
    try:
        os.stat(source)
    except FileNotFoundError:
        if os.path.islink(source):
            raise DataError(f"{source}: a symlink to nothing ({os.readlink(source)})") from None
        raise DataError(f"{source}: no such file or folder (pass --data or set FERKIT_DATA)") from None
    except OSError as err:
        raise DataError(f"{source}: cannot be opened ({os_error_reason(err)})") from None
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
    """'ferplus', 'folder', 'zip', 'csv' or 'icml-csv', from the path and, for CSVs, the header."""
    if path.is_dir():
        return "ferplus" if (path / FERPLUS_SPLIT_FOLDERS["train"] / "label.csv").is_file() else "folder"
    suffix = path.suffix.lower()
    if suffix == ".zip":
        return "zip"
    if suffix == ".csv":
        with open_source(path) as f:
            header = _read_header(_csv_lines(f), path)
        return "icml-csv" if header == ["emotion", "Usage", "pixels"] else "csv"
    raise DataError(f"{path}: not a FER-2013 source (expected a folder, a .zip or a .csv)")


# ---------------------------------------------------------------------------------------------
# CSV formats


def open_source(path: Path) -> BinaryIO:
    """A source file opened for reading: a FIFO, socket or device is refused (it could block forever)."""
    try:
        return open_regular_file(path)
    except OSError as err:
        raise DataError(f"{path}: {_unreadable(err)}") from None


def _unreadable(err: OSError) -> str:
    if isinstance(err, NotRegularFileError):
        return str(err)
    return f"cannot be opened ({os_error_reason(err)})"


def _csv_lines(f: BinaryIO) -> Iterator[tuple[int, str | None, str]]:
    """(line number, text without its line ending, "") or (number, None, the problem), line by line.

    Lines end in \n (an \r before it belongs to the ending). Each is decoded on its own, so a
    non-UTF-8 byte is reported at its line, and none is read beyond MAX_LINE_BYTES, so a line
    with no end in sight (a binary file, an unclosed 300 MB field) is skipped, not held in memory.
    """
    number = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        number += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            length = len(raw)
            while raw and not raw.endswith(b"\n"):
                raw = f.readline(1 << 20)
                length += len(raw)
            length -= raw.endswith(b"\n")
            yield number, None, (f"line of {length:,} bytes, over the limit of {MAX_LINE_BYTES:,} for one row "
                                 "(a FER-2013 row is under 10 kB)")
            continue
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            yield number, raw.decode("utf-8"), ""
        except UnicodeDecodeError as err:
            yield number, None, f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})"


def _split_csv_line(text: str) -> list[str]:
    """The fields of one CSV line; a record never continues on the next line (FER-2013 fields hold no newline)."""
    if "\r" in text:
        raise DataError("a carriage return (\\r) inside the line; lines must end in \\n or \\r\\n")
    try:
        return next(csv.reader([text], strict=True))
    except csv.Error as err:
        if str(err) == "unexpected end of data":
            raise DataError("unclosed quote") from None
        raise DataError(f"not a CSV line ({err})") from None


def _read_header(lines: Iterator[tuple[int, str | None, str]], path: Path) -> list[str]:
    """The first line's column names, trimmed of spaces and tabs; [] for an empty file."""
    for number, text, problem in lines:
        if text is None:
            raise DataError(f"{path}: row {number} (the header): {problem}")
        try:
            return [name.strip(" \t") for name in _split_csv_line(text)] if text else []
        except DataError as err:
            raise DataError(f"{path}: row {number} (the header): {err}") from None
    return []


def _load_csv(path: Path) -> FerData:
    items: list[tuple[str, int, np.ndarray, str]] = []
    errors: list[str] = []
    with open_source(path) as f:
        lines = _csv_lines(f)
        header = _read_header(lines, path)
        missing = [c for c in ("emotion", "pixels", "Usage") if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (header: {','.join(header)})")
        twice = [c for c in ("emotion", "pixels", "Usage") if header.count(c) > 1]
        if twice:
            raise DataError(f"{path}: column(s) {', '.join(twice)} named more than once in the header "
                            f"({','.join(header)})")
        col = {name: header.index(name) for name in ("emotion", "pixels", "Usage")}
        for row_number, text, problem in lines:
            if text == "":
                continue  # a blank line
            try:
                if text is None:
                    raise DataError(problem)
                items.append(_parse_csv_row(_split_csv_line(text), col, len(header), row_number))
            except DataError as err:
                errors.append(f"row {row_number}: {err}")
    raise_collected(path, errors)
    return _assemble(items, source=path, fmt="icml-csv" if header == ["emotion", "Usage", "pixels"] else "csv")


_NEGATIVE = re.compile(r"-[0-9]+")


def _parse_csv_row(
    row: list[str], col: dict[str, int], columns: int, row_number: int
) -> tuple[str, int, np.ndarray, str]:
    """One CSV row's (split, label, image, name); DataError (without the row: the caller adds it) if bad."""
    if len(row) != columns:
        raise DataError(f"expected {columns} columns, got {len(row)}")
    label = _parse_label(row[col["emotion"]].strip(" \t"))
    usage = row[col["Usage"]].strip(" \t")
    if usage not in USAGE_TO_SPLIT:
        raise DataError(f"unknown Usage {usage!r} (expected Training, PublicTest or PrivateTest)")
    # Only spaces and tabs separate pixels: str.split() would also split on \x1c-\x1f and Unicode spaces.
    tokens = [t for t in row[col["pixels"]].replace("\t", " ").split(" ") if t]
    if len(tokens) != NUM_PIXELS:
        raise DataError(f"expected {NUM_PIXELS} pixels, got {len(tokens)}")
    joined = "".join(tokens)
    if not (joined.isascii() and joined.isdigit()):  # ASCII digits only: no signs, "_", "٣" or "１"
        bad = next(i for i, t in enumerate(tokens) if not (t.isascii() and t.isdigit()))
        if _NEGATIVE.fullmatch(tokens[bad]):
            raise DataError(f"pixel {bad} is {tokens[bad]}, outside 0..255")
        raise DataError(f"pixel {bad} is {tokens[bad]!r}, not an integer")
    # Over three digits (leading zeros aside) is out of range; int() of 4,300+ digits would raise.
    too_long = next((i for i, t in enumerate(tokens) if len(t) > 3 and len(t.lstrip("0")) > 3), None)
    if too_long is not None:
        raise DataError(f"pixel {too_long} is {_shorten(tokens[too_long])}, outside 0..255")
    pixels = np.array(tokens, dtype=np.int64)
    out_of_range = np.flatnonzero(pixels > 255)
    if out_of_range.size:
        i = int(out_of_range[0])
        raise DataError(f"pixel {i} is {pixels[i]}, outside 0..255")
    image = pixels.astype(np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)
    return USAGE_TO_SPLIT[usage], label, image, f"row {row_number}"


def _parse_label(text: str) -> int:
    """An emotion id: ASCII digits with value 0..6 (no sign, no "3.0", no "٣")."""
    if _NEGATIVE.fullmatch(text):
        raise DataError(f"emotion {_shorten(text)} outside 0..6")
    if not (text.isascii() and text.isdigit()):
        raise DataError(f"emotion {_shorten(text)!r} is not an integer id 0..6")
    if len(text.lstrip("0")) > 1 or int(text) >= len(EMOTIONS):
        raise DataError(f"emotion {_shorten(text.lstrip('0'))} outside 0..6")
    return int(text)


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...({len(text):,} characters)"


# ---------------------------------------------------------------------------------------------
# Image-folder layout, on disk or in a zip


@dataclass
class _ImageEntry:
    part: str  # "train" or "test": the top folder
    cls: str
    name: str
    where: str  # how messages name it: train/<class>/<name> in a folder, the member's full name in a zip
    read: Callable[[], bytes]

    @property
    def layout_name(self) -> str:
        return f"{self.part}/{self.cls}/{self.name}"


@dataclass
class _Listing:
    """What a folder or zip holds: images to decode, hidden files skipped, problems found while listing."""

    entries: list[_ImageEntry] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read_regular_file(path: Path) -> bytes:
    with open_regular_file(path) as f:
        return f.read()


def _load_folder(root: Path) -> FerData:
    listing = _Listing()
    for part in ("train", "test"):
        part_dir = root / part
        if not part_dir.is_dir():
            raise DataError(f"{root}: missing the {part}/ folder of the image-folder layout")
        for cls, cls_dir, cls_kind in _list_dir(part_dir, part, listing):
            if cls_kind != "dir":
                if cls.startswith("."):
                    continue  # e.g. train/.DS_Store: not part of the layout, as in a zip
                raise DataError(f"{cls_dir}: expected {part}/<class>/<image>, not in a class folder")
            for name, path, kind in _list_dir(cls_dir, f"{part}/{cls}", listing):
                where = f"{part}/{cls}/{name}"
                if name.startswith("."):
                    listing.hidden.append(where)
                elif kind == "dir":
                    listing.problems.append(f"{where}: a folder inside a class folder (expected image files)")
                else:  # a file, or something that open_regular_file will refuse by name when it is read
                    listing.entries.append(_ImageEntry(part, cls, name, where, partial(read_regular_file, path)))
    return _decode_entries(listing, source=root, fmt="folder")


def _list_dir(folder: Path, where: str, listing: _Listing) -> Iterator[tuple[str, Path, str]]:
    """(name, path, "dir" or "other") for each entry of a folder, sorted; one that cannot be examined
    (a symlink loop, no permission) is a problem in `listing`, not a traceback."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as err:
        listing.problems.append(f"{where}: {_unreadable(err)}")
        return
    for name in names:
        path = folder / name
        try:
            kind = "dir" if stat.S_ISDIR(os.stat(path).st_mode) else "other"
        except OSError as err:
            if name.startswith(".") and err.errno in (errno.ENOENT, errno.ELOOP):
                kind = "other"  # a hidden dangling link: skipped like any hidden file
            else:
                listing.problems.append(f"{where}/{name}: {_unreadable(err)}")
                continue
        yield name, path, kind


_ZIP_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError, ValueError, struct.error,
)
"""What zipfile raises on a damaged archive or member (bad CRC, header, compression; encrypted members)."""


def _load_zip(path: Path) -> FerData:
    with open_source(path) as f:
        try:
            archive = zipfile.ZipFile(f)
        except _ZIP_ERRORS as err:
            raise DataError(f"{path}: not a readable zip file ({err})") from None
        with archive:
            return _decode_entries(_zip_listing(archive, path), source=path, fmt="zip")


def _zip_listing(archive: zipfile.ZipFile, path: Path) -> _Listing:
    listing = _Listing()
    matches = []
    others = []
    for info in archive.infolist():
        if info.is_dir() or info.filename.startswith("__MACOSX/"):
            continue
        match = _FOLDER_ENTRY.match(info.filename)
        if match:
            matches.append((match, info))
        else:
            others.append(info.filename)
    if not matches:
        raise DataError(f"{path}: no train/<class>/<image> entries in this zip")
    prefix = min((m["prefix"] for m, _ in matches), key=len)
    for name in others:  # under train/ or test/ but deeper or shallower than train/<class>/<image>
        if name.startswith((f"{prefix}train/", f"{prefix}test/")) and not name.rsplit("/", 1)[-1].startswith("."):
            listing.problems.append(f"{name}: expected {prefix}train|test/<class>/<image>, not in a class folder")
        elif not name.startswith((f"{prefix}train/", f"{prefix}test/")):
            listing.notes.append(name)
    for match, info in sorted(matches, key=lambda mi: mi[1].filename):
        if match["prefix"] != prefix:
            raise DataError(f"{path}: {info.filename} lies outside {prefix or 'the top'} train/ or test/")
        if match["name"].startswith("."):
            listing.hidden.append(f"{match['part']}/{match['cls']}/{match['name']}")
            continue
        listing.entries.append(_ImageEntry(match["part"], match["cls"], match["name"], info.filename,
                                           partial(_read_member, archive, info)))
    if listing.notes:
        ignored = listing.notes
        listing.notes = [f"ignored {len(ignored)} zip member(s) outside {prefix}train/ and {prefix}test/, "
                         f"e.g. {ignored[0]}"]
    return listing


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    if info.file_size > MAX_MEMBER_BYTES:
        raise DataError(f"{info.file_size:,} bytes uncompressed, over the limit of {MAX_MEMBER_BYTES:,} for one "
                        "image (a zip bomb?)")
    try:
        return archive.read(info)
    except _ZIP_ERRORS as err:
        raise DataError(f"unreadable zip member ({err})") from None


def _decode_entries(listing: _Listing, source: Path, fmt: str) -> FerData:
    entries = listing.entries
    errors = listing.problems + [
        f"{e.where}: unknown class folder {e.cls!r} (expected one of {', '.join(EMOTIONS)})"
        for e in entries
        if e.cls not in EMOTION_TO_ID
    ]
    raise_collected(source, errors)
    # Decoding 35,887 JPEGs is the slow part of a cold start; PIL releases the GIL while decoding.
    workers = min(8, os.cpu_count() or 1)
    # Pillow warns about damaged metadata (EXIF, ICC) and oversized images; each image ends up decoded
    # or named in a DataError, so its warnings only clutter the report. Filters are process-wide and
    # catch_warnings is not thread-safe: set once here, around all the decoding threads.
    with warnings.catch_warnings(), ThreadPoolExecutor(workers) as pool:
        warnings.simplefilter("ignore")
        decoded = list(pool.map(_decode_entry, entries))
    errors = [result for result in decoded if isinstance(result, str)]
    raise_collected(source, errors)
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
        items.append((split, EMOTION_TO_ID[entry.cls], image, entry.layout_name))
    data = _assemble(items, source=source, fmt=fmt, converted=converted)
    data.notes.extend(listing.notes)
    if listing.hidden:
        data.notes.append(f"skipped {len(listing.hidden)} hidden file(s), e.g. {listing.hidden[0]}")
    if unprefixed_test:
        _split_unprefixed_test(data, items, unprefixed_test)
    return data


def _decode_entry(entry: _ImageEntry) -> tuple[np.ndarray, bool] | str:
    """(48x48 image, converted) or the problem, naming the entry."""
    try:
        return decode_face_image(entry.read(), entry.where)
    except DataError as err:
        return str(err) if str(err).startswith(f"{entry.where}: ") else f"{entry.where}: {err}"
    except OSError as err:
        return f"{entry.where}: {_unreadable(err)}"


def decode_face_image(blob: bytes, where: str = "<image>") -> tuple[np.ndarray, bool]:
    """Image file bytes -> (48x48 uint8 grayscale array, whether it had to be converted).

    Decoded by `ferkit.images` (EXIF orientation, 16-bit scaled, palette, alpha and CMYK handled as
    at prediction) and cut by `ferkit.faces.crop_face` over the whole image. A 48x48 8-bit gray
    image, like every stock FER-2013 file, comes back pixel for pixel. `DataError` names `where`.
    """
    try:
        image, mode = decode_image_bytes(blob, where)
    except ImageError as err:
        raise DataError(str(err)) from None
    crop = crop_face(to_gray(image))
    return crop, mode != "L" or image.shape != (IMAGE_SIZE, IMAGE_SIZE)


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


def raise_collected(source: Path, errors: list[str]) -> None:
    """One problem: one line, `<source>: <where>: <what>`. Several: a count, then up to MAX_REPORTED_ERRORS."""
    if not errors:
        return
    if len(errors) == 1:
        raise DataError(f"{source}: {errors[0]}")
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
        if part.votes is not None:
            arrays[f"{split}_votes"] = part.votes
    meta = {"source": data.source, "format": data.format, "converted": data.converted, "notes": data.notes,
            "classes": list(data.classes), "labels": data.labels}
    arrays["meta"] = np.array(json.dumps(meta))
    try:
        with atomic_write(cache_file) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
    except (OSError, OutputPathError) as err:
        print(f"ferkit: could not write the data cache {cache_file}: {err}", file=sys.stderr)


def _read_cache(cache_file: Path) -> FerData:
    with np.load(cache_file, allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"]))
        splits = {s: Split(npz[f"{s}_images"], npz[f"{s}_labels"], npz[f"{s}_names"],
                           votes=npz.get(f"{s}_votes")) for s in SPLITS}
    meta["classes"] = tuple(meta.get("classes", EMOTIONS))
    return FerData(splits=splits, from_cache=True, **meta)


_LOADERS: dict[str, Callable[[Path], FerData]] = {"folder": _load_folder, "zip": _load_zip, "csv": _load_csv,
                                                  "icml-csv": _load_csv}


# ---------------------------------------------------------------------------------------------
# Summary and audit


def audit_duplicates(data: FerData) -> dict[str, Any]:
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


@dataclass
class DataSummary:
    """What `ferkit data info` reports about a source (`summarize`); `to_dict` is its `--json`."""

    source: str
    format: str
    total: int
    splits: dict[str, dict[str, Any]]  # split -> usage, total, per_class counts
    converted: int
    duplicates: dict[str, Any]  # `audit_duplicates`
    notes: list[str]
    from_cache: bool
    labels: str
    votes: dict[str, Any] | None = None
    """FER+ sources: the vote statistics (`ferkit.ferplus.vote_statistics`), which the caller adds."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; `votes` only where there are votes."""
        return {key: value for key, value in asdict(self).items() if value is not None}


def summarize(data: FerData) -> DataSummary:
    """Per-split, per-class counts plus conversions, notes and the duplicate audit."""
    splits = {}
    for split in SPLITS:
        labels = data.splits[split].labels
        counts = np.bincount(labels[labels >= 0], minlength=len(data.classes))
        splits[split] = {
            "usage": SPLIT_TO_USAGE[split],
            "total": len(labels),
            "per_class": {name: int(n) for name, n in zip(data.classes, counts, strict=True)},
        }
    return DataSummary(source=data.source, format=data.format, total=sum(len(p) for p in data.splits.values()),
                       splits=splits, converted=data.converted, duplicates=audit_duplicates(data), notes=data.notes,
                       from_cache=data.from_cache, labels=data.labels)


# ---------------------------------------------------------------------------------------------
# FER+ sources: its folder layout, and fer2013.csv joined with fer2013new.csv


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


def _load_ferplus(root: Path) -> FerData:
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
        on_disk = {p.name for p in folder.iterdir() if _FERPLUS_PNG.match(p.name)} if folder.is_dir() else set()
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
                if not _FERPLUS_PNG.match(name):
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




_LOADERS["ferplus"] = _load_ferplus
