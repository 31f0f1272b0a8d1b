"""Fuzzing the data loader: mutated CSVs of both formats, image folders and zips built from real FER-2013 faces.

The invariant, for every generated source: `load_fer2013` either returns exactly the rows or images the
source holds, or raises `DataError` whose message starts with the source's path and names the row,
entry or member at fault. Any other exception type fails the test, as does a silent drop (fewer rows
or images than the source holds) or a hang (each load runs under a time limit).

CSVs are judged by `fuzzing.oracle_csv`, a reading of the format's rules written without the csv
module: a CSV it finds valid must load to exactly its rows, in order, and one it finds invalid must
be refused, naming the first bad row. Folders and zips are judged by listing them independently:
a load must account for every file or member (loaded, or counted in a note as hidden or ignored).

Bounded for CI: example counts below (times FERKIT_FUZZ_SCALE, default 1), derandomized, no deadline
but a per-case time limit. Here 2,000 cases; with tests/test_fuzz_images.py, 2,750.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from PIL import Image

from conftest import ICML_HEADER, KAGGLE_HEADER, rows_from_data
from ferkit.data import DataError, FerData, load_fer2013
from ferkit.faces import crop_face
from ferkit.images import load_image
from ferkit.labels import EMOTIONS, SPLITS
from fuzzing import call_with_timeout, fuzz_settings, oracle_csv, unblock_fifo

TIME_LIMIT = 20.0  # seconds per load: a hang, not a slow machine (a load here takes milliseconds)


def load_within_limit(path: Path) -> FerData:
    """load_fer2013 under TIME_LIMIT; FIFOs in a folder get a writer if it hangs, so the process can exit."""
    fifos = [p for p in path.rglob("*") if p.is_fifo()] if path.is_dir() else []

    def unblock() -> None:
        for fifo in fifos:
            unblock_fifo(fifo)()

    return call_with_timeout(lambda: load_fer2013(path, use_cache=False), TIME_LIMIT, unblock)


# ---------------------------------------------------------------------------------------------
# CSV mutations

ODD_TOKENS = [
    "", " ", "-1", "256", "1e3", "\u0663", "\uff13", "1_0", "+5", "0x1F", "nan", '"', '""', "\x00", "\t", "\u00e9",
    "\ufeff", "9" * 30, "3.0", "Training ", " PublicTest", "privatetest", "0 0", "255", "7", "0", "00", "6",
    "PrivateTest", "Training", "Validation", "NULL", "1,2", '"3"', "\x1c", "\xa0", "\u2028", "\r",
]
INSERTS = [b'"', b"\r", b"\n", b",", b"\x00", b"\xff", b"\xef\xbb\xbf", b" ", b"\t", b"\xc3", b'""', b"\r\n"]

position = st.integers(min_value=0, max_value=10**6)
csv_op = st.one_of(
    st.tuples(st.just("flip_byte"), position, st.integers(0, 255)),
    st.tuples(st.just("flip_bit"), position, st.integers(0, 7)),
    st.tuples(st.just("truncate"), position),
    st.tuples(st.just("join"), position, st.sampled_from([b",", b"", b" "])),
    st.tuples(st.just("duplicate"), position),
    st.tuples(st.just("delete"), position),
    st.tuples(st.just("swap_columns"), st.one_of(st.none(), position), st.integers(0, 2), st.integers(0, 2)),
    st.tuples(st.just("odd_field"), position, st.integers(0, 2), st.sampled_from(ODD_TOKENS)),
    st.tuples(st.just("odd_pixel"), position, st.integers(0, 2303), st.sampled_from(ODD_TOKENS)),
    st.tuples(st.just("insert"), position, st.sampled_from(INSERTS)),
    st.tuples(st.just("blank_line"), position),
)


def _line_op(blob: bytes, op: tuple) -> bytes:
    lines = blob.split(b"\n")
    i = (op[1] or 0) % len(lines)
    kind = op[0]
    if kind == "join" and i + 1 < len(lines):
        lines[i : i + 2] = [lines[i] + op[2] + lines[i + 1]]
    elif kind == "duplicate":
        lines.insert(i, lines[i])
    elif kind == "delete":
        del lines[i]
    elif kind == "blank_line":
        lines.insert(i, b"")
    elif kind == "swap_columns":
        targets = range(len(lines)) if op[1] is None else [i]
        for t in targets:
            fields = lines[t].split(b",")
            a, b = op[2] % len(fields), op[3] % len(fields)
            fields[a], fields[b] = fields[b], fields[a]
            lines[t] = b",".join(fields)
    elif kind == "odd_field":
        fields = lines[i].split(b",")
        fields[op[2] % len(fields)] = op[3].encode()
        lines[i] = b",".join(fields)
    elif kind == "odd_pixel":
        fields = lines[i].split(b",")
        longest = max(range(len(fields)), key=lambda f: len(fields[f]))
        tokens = fields[longest].split(b" ")
        tokens[op[2] % len(tokens)] = op[3].encode()
        fields[longest] = b" ".join(tokens)
        lines[i] = b",".join(fields)
    return b"\n".join(lines)


def mutate(blob: bytes, ops: list[tuple]) -> bytes:
    for op in ops:
        kind = op[0]
        if not blob:
            return blob
        if kind == "flip_byte":
            at = op[1] % len(blob)
            blob = blob[:at] + bytes([op[2]]) + blob[at + 1 :]
        elif kind == "flip_bit":
            at = op[1] % len(blob)
            blob = blob[:at] + bytes([blob[at] ^ (1 << op[2])]) + blob[at + 1 :]
        elif kind == "truncate":
            blob = blob[: op[1] % (len(blob) + 1)]
        elif kind == "insert":
            at = op[1] % (len(blob) + 1)
            blob = blob[:at] + op[2] + blob[at:]
        else:
            blob = _line_op(blob, op)
    return blob


class Quiet(list):
    """A list whose repr stays short in Hypothesis' reports (the rows hold 16,000 pixels)."""

    def __repr__(self) -> str:
        return f"<{len(self)} items>"


class QuietDict(dict):
    def __repr__(self) -> str:
        return f"<{len(self)} files>"


@pytest.fixture(scope="module")
def csv_rows(tiny_data: FerData) -> list[list[str]]:
    """Seven real rows, [emotion, Usage, pixels]: 3 Training, 2 PublicTest, 2 PrivateTest, interleaved."""
    return Quiet(rows_from_data(tiny_data)[:7])


def csv_bytes(rows: list[list[str]], fmt: str, crlf: bool, bom: bool, quote_all: bool) -> bytes:
    header = KAGGLE_HEADER if fmt == "kaggle" else ICML_HEADER
    lines = [header]
    for emotion, usage, pixels in rows:
        fields = (emotion, pixels, usage) if fmt == "kaggle" else (emotion, usage, pixels)
        lines.append(",".join(f'"{f}"' if quote_all else f for f in fields))
    end = "\r\n" if crlf else "\n"
    return (b"\xef\xbb\xbf" if bom else b"") + (end.join(lines) + end).encode()


@fuzz_settings(1300)
@given(fmt=st.sampled_from(["kaggle", "icml"]), crlf=st.booleans(), bom=st.booleans(),
       quote_all=st.booleans(), ops=st.lists(csv_op, min_size=0, max_size=4))
@pytest.mark.slow
def test_mutated_csv_loads_exactly_or_names_the_row(
    tmp_path_factory: pytest.TempPathFactory, csv_rows: list[list[str]],
    fmt: str, crlf: bool, bom: bool, quote_all: bool, ops: list[tuple],
) -> None:
    blob = mutate(csv_bytes(csv_rows, fmt, crlf, bom, quote_all), ops)
    path = tmp_path_factory.mktemp("csv", numbered=True) / "fer2013.csv"
    path.write_bytes(blob)
    verdict = oracle_csv(blob)
    try:
        data = load_within_limit(path)
    except DataError as err:
        text = str(err)
        event(f"refused: {verdict.problem}")
        assert verdict.problem is not None, f"refused a valid CSV: {text}"
        assert text.startswith(f"{path}: "), text
        if verdict.bad_line is not None:
            assert re.search(rf"\brow {verdict.bad_line}\b", text), (verdict, text)
        return
    finally:
        shutil.rmtree(path.parent)
    event("loaded")
    assert verdict.problem is None, f"loaded a CSV whose line {verdict.bad_line} is bad: {verdict.problem}"
    assert data.format == verdict.format
    for split in SPLITS:
        expected = verdict.rows[split]
        part = data[split]
        assert [f"row {line}" for line, _, _ in expected] == list(part.names), split  # no row dropped or added
        assert [label for _, label, _ in expected] == part.labels.tolist(), split
        np.testing.assert_array_equal(np.stack([p for _, _, p in expected]), part.images)


# ---------------------------------------------------------------------------------------------
# Image folders and zips

BASE_FILES = {  # one real face per entry; every split present, three classes more than once
    "train/happy/Training_1.jpg": ("happy", "Training", 0),
    "train/sad/Training_2.jpg": ("sad", "Training", 0),
    "train/angry/Training_3.png": ("angry", "Training", 0),
    "test/fear/PublicTest_4.jpg": ("fear", "PublicTest", 0),
    "test/happy/PublicTest_5.jpg": ("happy", "PublicTest", 0),
    "test/surprise/PrivateTest_6.jpg": ("surprise", "PrivateTest", 0),
    "test/neutral/PrivateTest_7.jpg": ("neutral", "PrivateTest", 0),
}


@pytest.fixture(scope="module")
def base_files(tiny_root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of a seven-image folder made of real FER-2013 files (one a PNG)."""
    files = {}
    for rel, (cls, usage, _) in BASE_FILES.items():
        part = "train" if usage == "Training" else "test"
        source = next(p for p in sorted((tiny_root / part / cls).iterdir()) if p.name.startswith(usage))
        if rel.endswith(".png"):
            buffer = io.BytesIO()
            Image.open(source).save(buffer, "PNG")
            files[rel] = buffer.getvalue()
        else:
            files[rel] = source.read_bytes()
    return QuietDict(files)


def _convert(blob: bytes, how: str) -> bytes:
    image = Image.open(io.BytesIO(blob))
    buffer = io.BytesIO()
    if how == "I;16":
        Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257).save(buffer, "PNG")
    elif how == "big":
        image.resize((97, 131)).save(buffer, "PNG")
    else:
        image.convert(how).save(buffer, "PNG")
    return buffer.getvalue()


content_op = st.one_of(
    st.tuples(st.just("flip_byte"), position, position, st.integers(0, 255)),
    st.tuples(st.just("truncate"), position, position),
    st.tuples(st.just("random_bytes"), position, st.binary(max_size=64)),
    st.tuples(st.just("convert"), position, st.sampled_from(["RGB", "RGBA", "P", "CMYK", "LA", "I;16", "big"])),
    st.tuples(st.just("move"), position, st.sampled_from([*EMOTIONS, "joy", ".hidden"]),
              st.sampled_from(["keep", "unprefixed", "hidden", "PrivateTest_", "Training_"])),
    st.tuples(st.just("delete"), position),
)
file_op = st.one_of(
    content_op,
    st.tuples(st.just("special"), position,
              st.sampled_from(["fifo", "symlink loop", "dangling symlink", "folder", "symlink", "stray"])),
)


def _apply_file_ops(files: dict[str, bytes], ops: list[tuple]) -> tuple[dict[str, bytes], list[tuple[str, str]]]:
    """Mutate the in-memory folder; returns files and (relative path, kind) specials to create on disk."""
    files = dict(files)
    specials: list[tuple[str, str]] = []
    for op in ops:
        if not files:
            break
        names = sorted(files)
        rel = names[op[1] % len(names)]
        kind = op[0]
        if kind == "flip_byte":
            blob = files[rel]
            if not blob:  # truncated to nothing by an earlier operation
                continue
            at = op[2] % len(blob)
            files[rel] = blob[:at] + bytes([op[3]]) + blob[at + 1 :]
        elif kind == "truncate":
            files[rel] = files[rel][: op[2] % (len(files[rel]) + 1)]
        elif kind == "random_bytes":
            files[rel] = op[2]
        elif kind == "convert":
            with contextlib.suppress(OSError):  # already damaged by an earlier operation: leave it
                files[rel] = _convert(files[rel], op[2])
        elif kind == "move":
            part, _, name = rel.split("/")
            stem = name.split("_", 1)[1] if "_" in name else name
            new_name = {"keep": name, "unprefixed": stem or name, "hidden": "." + name,
                        "PrivateTest_": "PrivateTest_" + (stem or name),
                        "Training_": "Training_" + (stem or name)}[op[3]]
            files[f"{part}/{op[2]}/{new_name}"] = files.pop(rel)
        elif kind == "delete":
            del files[rel]
        elif kind == "special":
            part, cls, _ = rel.split("/")
            specials.append((f"{part}/{cls}/x_{len(specials)}.jpg" if op[2] != "stray" else f"{part}/stray.jpg",
                             op[2]))
    return files, specials


def _write_folder(root: Path, files: dict[str, bytes], specials: list[tuple[str, str]]) -> None:
    for part in ("train", "test"):
        (root / part).mkdir(parents=True, exist_ok=True)
    for rel, blob in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(blob)
    for rel, kind in specials:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            continue
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "symlink loop":
            path.symlink_to(path.name)
        elif kind == "dangling symlink":
            path.symlink_to("nowhere.jpg")
        elif kind == "folder":
            path.mkdir()
        elif kind == "symlink" and files:
            path.symlink_to(root / sorted(files)[0])
        else:  # stray, or a symlink with nothing to point at
            path.write_bytes(next(iter(files.values()), b"x"))


def _listing(root: Path) -> tuple[set[str], set[str]]:
    """Independently: (layout files the loader must load or refuse, hidden files it may skip)."""
    wanted, hidden = set(), set()
    for part in ("train", "test"):
        for cls_dir in sorted((root / part).iterdir()):
            if not cls_dir.is_dir():
                continue
            for entry in cls_dir.iterdir():
                rel = f"{part}/{cls_dir.name}/{entry.name}"
                (hidden if entry.name.startswith(".") else wanted).add(rel)
    return wanted, hidden


def _check_loaded(data: FerData, expected: set[str], where: Path | None) -> None:
    """Every expected image loaded once, nothing else; with `where`, each equal to the predict path's crop."""
    names = [str(n) for split in SPLITS for n in data[split].names]
    assert sorted(names) == sorted(expected), "silent drop or invented image"
    if where is not None:
        for split in SPLITS:
            for name, image in zip(data[split].names, data[split].images, strict=True):
                np.testing.assert_array_equal(image, crop_face(load_image(where / name)))


@pytest.mark.slow
@fuzz_settings(350)
@given(ops=st.lists(file_op, min_size=1, max_size=3))
def test_mutated_image_folder_loads_exactly_or_names_the_file(
    tmp_path_factory: pytest.TempPathFactory, base_files: dict[str, bytes], ops: list[tuple]
) -> None:
    files, specials = _apply_file_ops(base_files, ops)
    root = tmp_path_factory.mktemp("folder", numbered=True) / "fer2013"
    try:
        _write_folder(root, files, specials)
        wanted, _ = _listing(root)
        try:
            data = load_within_limit(root)
        except DataError as err:
            text = str(err)
            event("refused")
            assert text.startswith(f"{root}"), text
            assert any(name in text for name in wanted) or re.search(r"empty split|stray\.jpg", text), text
            return
        event("loaded")
        _check_loaded(data, wanted, root)
        assert all(EMOTIONS[label] == name.split("/")[1]
                   for split in SPLITS for name, label in zip(data[split].names, data[split].labels, strict=True))
    finally:
        for fifo in (p for p in root.rglob("*") if p.is_fifo()):
            fifo.unlink()
        shutil.rmtree(root.parent)


zip_op = st.one_of(
    st.tuples(st.just("flip_byte"), position, st.integers(0, 255)),
    st.tuples(st.just("flip_bit"), position, st.integers(0, 7)),
    st.tuples(st.just("truncate"), position),
    st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=8)),
)


@fuzz_settings(350)
@given(prefix=st.sampled_from(["", "fer2013/"]), deflate=st.booleans(),
       file_ops=st.lists(content_op, max_size=2),
       ops=st.lists(zip_op, min_size=0, max_size=3))
@pytest.mark.slow
def test_mutated_zip_loads_exactly_or_names_the_member(
    tmp_path_factory: pytest.TempPathFactory, base_files: dict[str, bytes],
    prefix: str, deflate: bool, file_ops: list[tuple], ops: list[tuple],
) -> None:
    files, _ = _apply_file_ops(base_files, file_ops)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as archive:
        for rel in sorted(files):
            archive.writestr(prefix + rel, files[rel])
    blob = mutate(buffer.getvalue(), ops)
    path = tmp_path_factory.mktemp("zip", numbered=True) / "fer2013.zip"
    path.write_bytes(blob)
    try:
        try:
            data = load_within_limit(path)
        except DataError as err:
            event("refused")
            assert str(err).startswith(f"{path}: "), str(err)
            return
        event("loaded")
        # It loaded, so zipfile can list it: every member is loaded, or a note counts it as hidden or ignored.
        with zipfile.ZipFile(path) as archive:
            members = [i.filename for i in archive.infolist()
                       if not i.is_dir() and not i.filename.startswith("__MACOSX/")]
        noted = sum(int(m) for note in data.notes
                    for m in re.findall(r"(?:skipped|ignored) (\d+) (?:hidden file|zip member)", note))
        loaded = sum(len(data[split]) for split in SPLITS)
        assert loaded + noted == len(members), (members, data.notes)
        for split in SPLITS:
            for name in data[split].names:
                assert any(m.endswith(str(name)) for m in members), name
    finally:
        shutil.rmtree(path.parent)
