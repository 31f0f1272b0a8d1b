"""Loading FER-2013 in every format, the full set's counts, the val/test fallback split, the cache, bad input."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_same_data, rows_from_data, write_fer_csv
from ferkit import cli
from ferkit.data import DataError, FerData, detect_format, load_fer2013, resolve_data_path, summarize
from ferkit.faces import crop_face
from ferkit.images import load_image, to_gray
from ferkit.labels import EMOTIONS, SPLITS
from fuzzing import call_with_timeout, unblock_fifo

# The table of the data set's README, in FER-2013 id order (angry disgust fear happy sad surprise neutral).
README_COUNTS = {
    "train": (3995, 436, 4097, 7215, 4830, 3171, 4965),
    "val": (467, 56, 496, 895, 653, 415, 607),
    "test": (491, 55, 528, 879, 594, 416, 626),
}


def zip_folder(root: Path, dest: Path, prefix: str = "", extras: dict[str, bytes] | None = None) -> Path:
    """Zip `root`'s train/ and test/ as `<prefix>train/...`, with directory entries like `zip -r` writes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dest, "w") as archive:
        for path in sorted(root.rglob("*")):
            name = prefix + path.relative_to(root).as_posix()
            if path.is_dir():
                archive.writestr(name + "/", b"")
            else:
                archive.write(path, name)
        for name, blob in (extras or {}).items():
            archive.writestr(name, blob)
    return dest


def _first(root: Path, part: str, cls: str) -> Path:
    return sorted((root / part / cls).iterdir())[0]


# ---------------------------------------------------------------------------------------------
# Formats


def test_folder_loads_every_split_with_canonical_ids(tiny_root: Path) -> None:
    data = load_fer2013(tiny_root, use_cache=False)
    assert data.format == "folder"
    assert data.converted == 0 and data.notes == [] and not data.from_cache
    for split, usage, per_class in (("train", "Training", 2), ("val", "PublicTest", 2), ("test", "PrivateTest", 2)):
        part = data[split]
        assert part.images.shape == (7 * per_class, 48, 48)
        assert part.images.dtype == np.uint8
        np.testing.assert_array_equal(np.bincount(part.labels, minlength=7), [per_class] * 7)
        for name, label in zip(part.names, part.labels, strict=True):
            _, cls, file_name = name.split("/")
            assert file_name.startswith(f"{usage}_")
            assert EMOTIONS[label] == cls  # folder name -> FER-2013 id, not alphabetical order
        # The arrays are the decoded files, pixel for pixel.
        first = tiny_root / ("train" if split == "train" else "test") / part.names[0].split("/", 1)[1]
        np.testing.assert_array_equal(part.images[0], np.asarray(Image.open(first)))
    assert EMOTIONS.index("sad") == 4 and EMOTIONS.index("neutral") == 6


@pytest.mark.parametrize("fmt", ["kaggle", "icml"])
def test_csv_built_from_real_images_loads_like_the_folder(tmp_path: Path, tiny_data: FerData, fmt: str) -> None:
    name = "fer2013.csv" if fmt == "kaggle" else "icml_face_data.csv"
    path = write_fer_csv(tmp_path / name, rows_from_data(tiny_data, interleave=True), fmt)
    header = path.read_text().splitlines()[0]
    assert header == ("emotion,pixels,Usage" if fmt == "kaggle" else "emotion, Usage, pixels")
    data = load_fer2013(path)
    assert data.format == ("csv" if fmt == "kaggle" else "icml-csv")
    assert data.source == str(path)
    assert_same_data(data, tiny_data, names=False)
    # Rows are named by their line in the file (header = row 1; splits were interleaved in the file).
    assert data["train"].names[0] == "row 2" and data["val"].names[0] == "row 3" and data["test"].names[0] == "row 4"


def test_csv_with_byte_order_mark_and_crlf(tmp_path: Path, tiny_data: FerData) -> None:
    path = write_fer_csv(tmp_path / "icml_face_data.csv", rows_from_data(tiny_data), "icml")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    assert detect_format(path) == "icml-csv"
    assert_same_data(load_fer2013(path), tiny_data, names=False)


@pytest.mark.parametrize("prefix", ["", "fer2013/", "downloads/fer2013/"])
def test_zip_is_read_in_place(tmp_path: Path, tiny_root: Path, tiny_data: FerData, prefix: str) -> None:
    archive = zip_folder(tiny_root, tmp_path / "archive" / "fer2013.zip", prefix,
                         extras={f"__MACOSX/{prefix}train/happy/._Training_1.jpg": b"resource fork"})
    before = sorted(p.name for p in archive.parent.iterdir())
    data = load_fer2013(archive)
    assert data.format == "zip" and data.source == str(archive)
    assert_same_data(data, tiny_data)  # names included: train/<class>/<file> whatever the prefix
    assert sorted(p.name for p in archive.parent.iterdir()) == before == ["fer2013.zip"]  # nothing extracted


def test_zip_entry_outside_the_layout_prefix_is_named(tmp_path: Path, tiny_root: Path) -> None:
    stray = _first(tiny_root, "train", "happy").read_bytes()
    archive = zip_folder(tiny_root, tmp_path / "fer.zip", "fer2013/", extras={"elsewhere/train/happy/x.jpg": stray})
    with pytest.raises(DataError) as err:
        load_fer2013(archive)
    assert str(err.value) == f"{archive}: elsewhere/train/happy/x.jpg lies outside fer2013/ train/ or test/"


def test_format_detection_from_the_path(tmp_path: Path, tiny_root: Path, tiny_data: FerData) -> None:
    rows = rows_from_data(tiny_data)
    assert detect_format(tiny_root) == "folder"
    assert detect_format(zip_folder(tiny_root, tmp_path / "FER.ZIP")) == "zip"
    assert detect_format(write_fer_csv(tmp_path / "a.csv", rows, "kaggle")) == "csv"
    assert detect_format(write_fer_csv(tmp_path / "b.csv", rows, "icml")) == "icml-csv"
    # The header decides between the CSV formats, not the file name.
    assert detect_format(write_fer_csv(tmp_path / "icml_face_data.csv", rows, "kaggle")) == "csv"
    other = tmp_path / "fer2013.tar.gz"
    other.write_bytes(b"\x1f\x8b")
    with pytest.raises(DataError, match="not a FER-2013 source"):
        detect_format(other)


def test_resolve_data_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert resolve_data_path(None) == Path("data/fer2013")
    monkeypatch.setenv("FERKIT_DATA", str(tmp_path / "env"))
    assert resolve_data_path(None) == tmp_path / "env"
    assert resolve_data_path(tmp_path / "flag") == tmp_path / "flag"


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder") as err:
        load_fer2013(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)


# ---------------------------------------------------------------------------------------------
# The full shared data set


@pytest.mark.slow
def test_full_data_info_matches_the_readme(
    data_root: Path, isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["data", "info", "--data", str(data_root), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "folder" and summary["from_cache"] is False
    assert summary["total"] == 35887
    totals = {"train": ("Training", 28709), "val": ("PublicTest", 3589), "test": ("PrivateTest", 3589)}
    for split, (usage, total) in totals.items():
        info = summary["splits"][split]
        assert info["usage"] == usage
        assert info["total"] == total
        assert info["per_class"] == dict(zip(EMOTIONS, README_COUNTS[split], strict=True))
    assert summary["converted"] == 0 and summary["notes"] == []
    duplicates = summary["duplicates"]
    assert duplicates["groups"] == 1516
    assert duplicates["extra_copies"] == 1853
    assert duplicates["cross_split_groups"] >= 531  # README: 531 groups span Training and a test split
    by_splits = duplicates["cross_split_groups_by_splits"]
    assert sum(n for key, n in by_splits.items() if key.startswith("train+")) == 531
    # The second call reads the cache the first one wrote, and reports the same numbers.
    assert cli.main(["data", "info", "--data", str(data_root), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["from_cache"] is True
    assert {k: v for k, v in again.items() if k != "from_cache"} == {
        k: v for k, v in summary.items() if k != "from_cache"}
    shutil.rmtree(isolated_env)  # 80 MB of decoded pixels: do not leave them in pytest's kept tmp folders


# ---------------------------------------------------------------------------------------------
# Test folder without Usage prefixes


def _strip_test_prefixes(root: Path) -> list[str]:
    renamed = []
    for path in sorted((root / "test").rglob("*.jpg")):
        new = path.with_name(path.name.split("_", 1)[1])
        path.rename(new)
        renamed.append(f"test/{path.parent.name}/{new.name}")
    return renamed


def test_unprefixed_test_images_get_a_stratified_seeded_split(tmp_path: Path, tiny_root: Path) -> None:
    roots = [Path(shutil.copytree(tiny_root, tmp_path / name)) for name in ("one", "two")]
    for root in roots:
        renamed = _strip_test_prefixes(root)
        (root / "test" / "angry" / renamed[0].split("/")[-1]).unlink()  # angry: an odd count, 3
    first, second = (load_fer2013(root, use_cache=False) for root in roots)
    third = load_fer2013(roots[0], use_cache=False)
    for other in (second, third):  # the same split at another path and on a second load
        for split in SPLITS:
            np.testing.assert_array_equal(first[split].names, other[split].names)
    assert len(first["train"]) == 14 and all(n.split("/")[-1].startswith("Training_") for n in first["train"].names)
    val, test = set(first["val"].names), set(first["test"].names)
    assert not val & test
    assert len(val | test) == 27
    assert not any("PublicTest" in n or "PrivateTest" in n for n in val | test)
    val_counts = np.bincount(first["val"].labels, minlength=7)
    test_counts = np.bincount(first["test"].labels, minlength=7)
    np.testing.assert_array_equal(val_counts + test_counts, [3, 4, 4, 4, 4, 4, 4])
    assert np.abs(val_counts - test_counts).max() <= 1
    assert val_counts[0] + test_counts[0] == 3 and abs(int(val_counts[0]) - int(test_counts[0])) == 1
    assert len(first.notes) == 1
    note = first.notes[0]
    assert "27 test images" in note and "PublicTest_/PrivateTest_" in note and "50/50" in note
    assert "stratified" in note
    assert summarize(first).notes == first.notes


# ---------------------------------------------------------------------------------------------
# Cache


def _cache_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("fer2013-*.npz")) if cache.exists() else []


def test_cache_round_trip_and_invalidation(tiny_copy: Path, isolated_env: Path) -> None:
    first = load_fer2013(tiny_copy)
    assert not first.from_cache
    assert len(_cache_files(isolated_env)) == 1  # written to $FERKIT_CACHE
    second = load_fer2013(tiny_copy)
    assert second.from_cache
    assert (second.source, second.format, second.converted, second.notes) == (
        first.source, first.format, first.converted, first.notes)
    assert_same_data(second, first)

    # Touching a file (new mtime, same bytes) invalidates the cache.
    victim = sorted((tiny_copy / "train" / "fear").iterdir())[0]
    stat = victim.stat()
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    touched = load_fer2013(tiny_copy)
    assert not touched.from_cache
    assert_same_data(touched, first)
    assert load_fer2013(tiny_copy).from_cache

    # Replacing a file's content with another real face changes what is loaded.
    donor = sorted((tiny_copy / "train" / "happy").iterdir())[0]
    shutil.copyfile(donor, victim)
    modified = load_fer2013(tiny_copy)
    assert not modified.from_cache
    index = list(modified["train"].names).index(f"train/fear/{victim.name}")
    np.testing.assert_array_equal(modified["train"].images[index], np.asarray(Image.open(donor)))
    assert not np.array_equal(modified["train"].images[index], first["train"].images[index])


def test_cache_of_a_csv_is_invalidated_by_editing_it(tmp_path: Path, tiny_data: FerData) -> None:
    rows = rows_from_data(tiny_data)
    path = write_fer_csv(tmp_path / "fer2013.csv", rows, "kaggle")
    assert not load_fer2013(path).from_cache
    assert load_fer2013(path).from_cache
    rows[0][0] = str((int(rows[0][0]) + 1) % 7)
    write_fer_csv(path, rows, "kaggle")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
    edited = load_fer2013(path)
    assert not edited.from_cache
    assert edited["train"].labels[0] == (tiny_data["train"].labels[0] + 1) % 7


def test_use_cache_false_writes_nothing(tiny_root: Path, isolated_env: Path, tmp_path: Path) -> None:
    load_fer2013(tiny_root, use_cache=False)
    assert _cache_files(isolated_env) == []
    explicit = tmp_path / "explicit"
    load_fer2013(tiny_root, cache_dir=explicit)
    assert len(_cache_files(explicit)) == 1 and _cache_files(isolated_env) == []


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_cache_is_ignored_and_rewritten(
    tiny_root: Path, isolated_env: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    first = load_fer2013(tiny_root)
    (cache_file,) = _cache_files(isolated_env)
    blob = cache_file.read_bytes()
    cache_file.write_bytes(b"not a cache" if damage == "garbage" else blob[: len(blob) // 2])
    again = load_fer2013(tiny_root)
    assert not again.from_cache
    assert_same_data(again, first)
    assert "ignoring unreadable cache" in capsys.readouterr().err
    assert load_fer2013(tiny_root).from_cache


# ---------------------------------------------------------------------------------------------
# Bad input: every problem names the file and the row or image


@pytest.fixture
def tiny_rows(tiny_data: FerData) -> list[list[str]]:
    """[emotion, Usage, pixels] rows of the 42 tiny-subset images, splits interleaved."""
    return rows_from_data(tiny_data)


ROW = 5  # the corrupted row's index in the list; its line in the file is ROW + 2 (after the header)


def set_pixel(index: int, value: str) -> Callable[[list[str]], None]:
    def edit(row: list[str]) -> None:
        tokens = row[2].split()
        tokens[index] = value
        row[2] = " ".join(tokens)
    return edit


def pixel_count(count: int) -> Callable[[list[str]], None]:
    def edit(row: list[str]) -> None:
        tokens = row[2].split()
        row[2] = " ".join((tokens + ["7"] * count)[:count])
    return edit


def set_field(column: int, value: str) -> Callable[[list[str]], None]:
    def edit(row: list[str]) -> None:
        row[column] = value
    return edit


BAD_ROWS = {
    "pixels short": (pixel_count(2303), "expected 2304 pixels, got 2303"),
    "pixels long": (pixel_count(2305), "expected 2304 pixels, got 2305"),
    "pixels empty": (pixel_count(0), "expected 2304 pixels, got 0"),
    "pixel float": (set_pixel(10, "12.5"), "pixel 10 is '12.5', not an integer"),
    "pixel word": (set_pixel(0, "abc"), "pixel 0 is 'abc', not an integer"),
    "pixel 256": (set_pixel(3, "256"), "pixel 3 is 256, outside 0..255"),
    "pixel -1": (set_pixel(2303, "-1"), "pixel 2303 is -1, outside 0..255"),
    "pixel huge": (set_pixel(7, "9" * 25), f"pixel 7 is {'9' * 25}, outside 0..255"),
    "label 7": (set_field(0, "7"), "emotion 7 outside 0..6"),
    "label -1": (set_field(0, "-1"), "emotion -1 outside 0..6"),
    "label name": (set_field(0, "happy"), "emotion 'happy' is not an integer id 0..6"),
    "label float": (set_field(0, "3.0"), "emotion '3.0' is not an integer id 0..6"),
    "label empty": (set_field(0, ""), "emotion '' is not an integer id 0..6"),
    "unknown usage": (set_field(1, "Validation"),
                      "unknown Usage 'Validation' (expected Training, PublicTest or PrivateTest)"),
    "pixel sign": (set_pixel(4, "+5"), "pixel 4 is '+5', not an integer"),
    "pixel underscore": (set_pixel(5, "1_0"), "pixel 5 is '1_0', not an integer"),
    "pixel arabic digit": (set_pixel(6, "\u0663"), "pixel 6 is '\u0663', not an integer"),
    "pixel separator": (set_pixel(8, "1\x1c2"), "pixel 8 is '1\\x1c2', not an integer"),
    "label sign": (set_field(0, "+3"), "emotion '+3' is not an integer id 0..6"),
    "label arabic digit": (set_field(0, "\u0663"), "emotion '\u0663' is not an integer id 0..6"),
    "label 5000 digits": (set_field(0, "9" * 5000), f"emotion {'9' * 40}...(5,000 characters) outside 0..6"),
    "pixel 5000 digits": (set_pixel(1, "9" * 5000), f"pixel 1 is {'9' * 40}...(5,000 characters), outside 0..255"),
}


@pytest.mark.parametrize("fmt", ["kaggle", "icml"])
@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_csv_row_names_file_and_row(tmp_path: Path, tiny_rows: list[list[str]], fmt: str, case: str) -> None:
    corrupt, message = BAD_ROWS[case]
    corrupt(tiny_rows[ROW])
    path = write_fer_csv(tmp_path / "fer2013.csv", tiny_rows, fmt)
    with pytest.raises(DataError) as err:
        load_fer2013(path)
    assert str(err.value) == f"{path}: row {ROW + 2}: {message}"  # one line: the file, the row, the problem


def test_short_row_and_several_problems_are_all_reported(tmp_path: Path, tiny_rows: list[list[str]]) -> None:
    tiny_rows[3][0] = "9"
    tiny_rows[20][1] = "Test"
    path = write_fer_csv(tmp_path / "fer2013.csv", tiny_rows, "kaggle")
    path.write_text(path.read_text() + "3,Training\n")  # a row with two columns, line 44
    with pytest.raises(DataError) as err:
        load_fer2013(path)
    text = str(err.value)
    assert text.startswith(f"{path}: 3 problem(s):")
    assert "row 5: emotion 9 outside 0..6" in text
    assert "row 22: unknown Usage 'Test'" in text
    assert "row 44: expected 3 columns, got 2" in text


@pytest.mark.parametrize(("header", "missing"), [
    ("emotion,Usage", "pixels"),
    ("emotion, pixels", "Usage"),
    ("label,pixels,Usage", "emotion"),
    ("pixels", "emotion, Usage"),
])
def test_missing_columns(tmp_path: Path, tiny_rows: list[list[str]], header: str, missing: str) -> None:
    path = write_fer_csv(tmp_path / "fer2013.csv", tiny_rows, "kaggle", header=header)
    with pytest.raises(DataError) as err:
        load_fer2013(path)
    assert str(err.value).startswith(f"{path}: missing column(s) {missing}")


@pytest.mark.parametrize("usage", ["PrivateTest", "Training"])
def test_empty_split_in_a_csv(tmp_path: Path, tiny_rows: list[list[str]], usage: str) -> None:
    path = write_fer_csv(tmp_path / "fer2013.csv", [r for r in tiny_rows if r[1] != usage], "icml")
    split = {"PrivateTest": "test", "Training": "train"}[usage]
    with pytest.raises(DataError) as err:
        load_fer2013(path)
    assert str(err.value) == f"{path}: empty split(s): {split} ({usage})"


def test_empty_split_in_a_folder(tiny_copy: Path) -> None:
    for path in (tiny_copy / "test").rglob("PublicTest_*.jpg"):
        path.unlink()
    with pytest.raises(DataError) as err:
        load_fer2013(tiny_copy)
    assert str(err.value) == f"{tiny_copy}: empty split(s): val (PublicTest)"


def test_text_file_named_jpg(tiny_copy: Path) -> None:
    (tiny_copy / "train" / "happy" / "Training_99999999.jpg").write_text("not a face\n")
    with pytest.raises(DataError) as err:
        load_fer2013(tiny_copy)
    assert str(err.value).startswith(f"{tiny_copy}: train/happy/Training_99999999.jpg: not an image")


def test_truncated_jpeg(tiny_copy: Path) -> None:
    victim = _first(tiny_copy, "test", "sad")
    blob = victim.read_bytes()
    victim.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError) as err:
        load_fer2013(tiny_copy)
    assert str(tiny_copy) in str(err.value)
    assert f"test/sad/{victim.name}: corrupt or truncated image" in str(err.value)


def test_unknown_class_folder(tiny_copy: Path) -> None:
    (tiny_copy / "train" / "joy").mkdir()
    shutil.copy(_first(tiny_copy, "train", "happy"), tiny_copy / "train" / "joy" / "Training_1.jpg")
    with pytest.raises(DataError) as err:
        load_fer2013(tiny_copy)
    assert str(tiny_copy) in str(err.value)
    assert "train/joy/Training_1.jpg: unknown class folder 'joy'" in str(err.value)


def test_image_outside_a_class_folder(tiny_copy: Path) -> None:
    stray = tiny_copy / "train" / "Training_1.jpg"
    shutil.copy(_first(tiny_copy, "train", "happy"), stray)
    with pytest.raises(DataError) as err:
        load_fer2013(tiny_copy)
    assert str(err.value) == f"{stray}: expected train/<class>/<image>, not in a class folder"


def test_missing_test_folder(tiny_copy: Path) -> None:
    shutil.rmtree(tiny_copy / "test")
    with pytest.raises(DataError, match="missing the test/ folder") as err:
        load_fer2013(tiny_copy)
    assert str(tiny_copy) in str(err.value)


def test_hidden_files_are_skipped_with_a_note(tiny_copy: Path, tiny_data: FerData) -> None:
    (tiny_copy / "train" / "happy" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tiny_copy / "train" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # Finder writes one in every folder
    data = load_fer2013(tiny_copy)
    assert_same_data(data, tiny_data)
    assert data.notes == ["skipped 1 hidden file(s), e.g. train/happy/.DS_Store"]


def test_not_a_zip(tmp_path: Path) -> None:
    fake = tmp_path / "fer2013.zip"
    fake.write_text("emotion,pixels,Usage\n")
    with pytest.raises(DataError) as err:
        load_fer2013(fake)
    assert str(err.value).startswith(f"{fake}: not a readable zip file")


def test_zip_without_the_layout(tmp_path: Path, tiny_root: Path) -> None:
    archive = tmp_path / "faces.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(_first(tiny_root, "train", "happy"), "happy/Training_1.jpg")
    with pytest.raises(DataError) as err:
        load_fer2013(archive)
    assert str(err.value) == f"{archive}: no train/<class>/<image> entries in this zip"


def test_bad_image_inside_a_zip_is_named(tmp_path: Path, tiny_root: Path) -> None:
    archive = zip_folder(tiny_root, tmp_path / "fer.zip", "fer2013/",
                         extras={"fer2013/test/fear/PrivateTest_1.jpg": b"\xff\xd8\xff\xe0 cut short"})
    with pytest.raises(DataError) as err:
        load_fer2013(archive)
    assert str(archive) in str(err.value) and "test/fear/PrivateTest_1.jpg: " in str(err.value)


def test_rgb_96px_png_is_converted_and_counted(tiny_copy: Path, tiny_data: FerData) -> None:
    source = _first(tiny_copy, "train", "surprise")
    face = np.asarray(Image.open(source))
    big = Image.fromarray(face).resize((96, 96), Image.Resampling.BICUBIC).convert("RGB")
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    target = source.with_suffix(".png")
    target.write_bytes(buffer.getvalue())
    source.unlink()
    data = load_fer2013(tiny_copy)
    assert data.converted == 1
    assert summarize(data).converted == 1
    index = list(data["train"].names).index(f"train/surprise/{target.name}")
    image = data["train"].images[index]
    assert image.shape == (48, 48) and image.dtype == np.uint8
    assert data["train"].labels[index] == EMOTIONS.index("surprise")
    # Back at 48x48 it is the same face: within a few grey levels on average, nothing like another face.
    original = tiny_data["train"].images[list(tiny_data["train"].names).index(f"train/surprise/{source.name}")]
    assert np.abs(image.astype(int) - original).mean() < 4
    assert np.abs(image.astype(int) - tiny_data["train"].images[0]).mean() > 10


# ---------------------------------------------------------------------------------------------
# Hostile input (issue 11): each case gives one line naming the file and the row or entry, never a
# traceback, a silent drop or a hang


def _joined_rows_csv(tmp_path: Path, tiny_rows: list[list[str]]) -> tuple[Path, str]:
    """Two rows joined by a comma: 6 fields where the header has 3 (the loader used to take the first 3)."""
    path = write_fer_csv(tmp_path / "joined.csv", tiny_rows, "kaggle")
    lines = path.read_text().splitlines()
    lines[ROW + 1 : ROW + 3] = [lines[ROW + 1] + "," + lines[ROW + 2]]
    path.write_text("\n".join(lines) + "\n")
    return path, f"row {ROW + 2}: expected 3 columns, got 6"


def _big_field_csv(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "big.csv"
    path.write_text("emotion,pixels,Usage\n" + "0," + "1 " * 70000 + ",Training\n")
    return path, "row 2: line of 140,011 bytes, over the limit of 65,536"


def _unclosed_quote_csv(tmp_path: Path, tiny_rows: list[list[str]]) -> tuple[Path, str]:
    """A quote opened in one row and never closed: the csv module swallowed the rest of the file."""
    tiny_rows[ROW][2] = '"' + tiny_rows[ROW][2]
    return write_fer_csv(tmp_path / "quote.csv", tiny_rows, "icml"), f"row {ROW + 2}: unclosed quote"


def _non_utf8_csv(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "bad.csv"
    path.write_bytes(b"emotion,pixels,Usage\n\xff\n")
    return path, "row 2: not UTF-8 text (byte 0xff at offset 0)"


def _symlink_loop(folder: Path) -> tuple[Path, str]:
    (folder / "train" / "happy" / "loop.jpg").symlink_to("loop.jpg")
    return folder, "train/happy/loop.jpg: cannot be opened (Too many levels of symbolic links)"


def _fifo(folder: Path) -> tuple[Path, str]:
    os.mkfifo(folder / "train" / "happy" / "Training_0.jpg")
    return folder, "train/happy/Training_0.jpg: not a regular file (a FIFO)"


def _bad_crc_zip(tmp_path: Path, folder: Path) -> tuple[Path, str]:
    """A stored member with one byte changed in its data: the zip reads, the member fails its CRC."""
    victim = _first(folder, "train", "fear")
    archive = zip_folder(folder, tmp_path / "fer.zip", "fer2013/")
    blob = bytearray(archive.read_bytes())
    data_at = blob.index(victim.read_bytes())
    blob[data_at + 300] ^= 0x55
    archive.write_bytes(bytes(blob))
    return archive, f"fer2013/train/fear/{victim.name}: unreadable zip member (Bad CRC-32"


def _hostile_case(case: str, tmp_path: Path, tiny_root: Path, tiny_rows: list[list[str]]) -> tuple[Path, str]:
    """The source for one numbered case of issue 11 and the text its error must hold."""
    if case == "big field":
        return _big_field_csv(tmp_path)
    if case == "unclosed quote":
        return _unclosed_quote_csv(tmp_path, tiny_rows)
    if case == "joined rows":
        return _joined_rows_csv(tmp_path, tiny_rows)
    if case == "non-utf8":
        return _non_utf8_csv(tmp_path)
    folder = Path(shutil.copytree(tiny_root, tmp_path / "fer2013"))
    if case == "symlink loop":
        return _symlink_loop(folder)
    if case == "fifo":
        return _fifo(folder)
    assert case == "bad crc", case
    return _bad_crc_zip(tmp_path, folder)


HOSTILE = ["big field", "unclosed quote", "joined rows", "non-utf8", "symlink loop", "fifo", "bad crc"]


def _load_within(path: Path, seconds: float = 30) -> FerData:
    fifos = [p for p in path.rglob("*") if p.is_fifo()] if path.is_dir() else []
    unblockers = [unblock_fifo(p) for p in fifos]
    return call_with_timeout(lambda: load_fer2013(path, use_cache=False), seconds,
                             unblock=lambda: [u() for u in unblockers] and None)


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_source_gives_one_line_naming_file_and_place(
    case: str, tmp_path: Path, tiny_root: Path, tiny_rows: list[list[str]]
) -> None:
    path, expected = _hostile_case(case, tmp_path, tiny_root, tiny_rows)
    with pytest.raises(DataError) as err:
        _load_within(path)
    text = str(err.value)
    assert "\n" not in text, text
    assert text.startswith(f"{path}: "), text
    assert expected in text, text


@pytest.mark.slow
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_source_on_the_command_line(
    case: str, tmp_path: Path, tiny_root: Path, tiny_rows: list[list[str]]
) -> None:
    path, expected = _hostile_case(case, tmp_path, tiny_root, tiny_rows)
    try:
        done = subprocess.run([sys.executable, "-m", "ferkit", "data", "info", "--data", str(path), "--no-cache"],
                              capture_output=True, text=True, timeout=60)
    finally:
        for fifo in (p for p in tmp_path.rglob("*") if p.is_fifo()):
            unblock_fifo(fifo)()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ferkit: error: {path}: ") and expected in lines[0], lines


def test_joined_rows_are_not_loaded_as_one(tmp_path: Path, tiny_rows: list[list[str]]) -> None:
    # Before: 41 of 42 rows loaded, exit 0, nothing said.
    path, _ = _joined_rows_csv(tmp_path, tiny_rows)
    with pytest.raises(DataError, match=f"row {ROW + 2}: expected 3 columns, got 6"):
        load_fer2013(path)


def test_unclosed_quote_swallows_no_rows(tmp_path: Path, tiny_rows: list[list[str]]) -> None:
    # A quote left open at the end of a row must not pull the next rows into one field, whatever follows.
    tiny_rows[ROW][2] = '"' + tiny_rows[ROW][2]
    tiny_rows[ROW + 3][2] = tiny_rows[ROW + 3][2] + '"'
    path = write_fer_csv(tmp_path / "quote.csv", tiny_rows, "icml")
    with pytest.raises(DataError) as err:
        load_fer2013(path)
    text = str(err.value)
    assert f"row {ROW + 2}: unclosed quote" in text
    assert f"row {ROW + 5}: " in text  # the closing quote's row is a problem of its own, not part of row 7


def test_quoted_fields_are_read(tmp_path: Path, tiny_rows: list[list[str]], tiny_data: FerData) -> None:
    path = tmp_path / "quoted.csv"
    path.write_text("emotion,pixels,Usage\n" + "".join(f'"{e}","{p}","{u}"\n' for e, u, p in tiny_rows))
    assert_same_data(load_fer2013(path), tiny_data, names=False)


def _sixteen_bit_png(path: Path, face: np.ndarray) -> np.ndarray:
    """Save a 48x48 face as a 16-bit grayscale PNG (each level v as 257 v, full range); returns the 16-bit array."""
    wide = face.astype(np.uint16) * 257
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode == "I;16"
    return wide


def test_16_bit_png_is_scaled_not_clipped(tiny_copy: Path, tiny_data: FerData) -> None:
    # Before: clipped by PIL's convert("L"), 99.6% of the pixels became 255.
    source = _first(tiny_copy, "train", "angry")
    face = np.asarray(Image.open(source))
    _sixteen_bit_png(source.with_suffix(".png"), face)
    source.unlink()
    data = load_fer2013(tiny_copy, use_cache=False)
    index = list(data["train"].names).index(f"train/angry/{source.with_suffix('.png').name}")
    np.testing.assert_array_equal(data["train"].images[index], face)
    assert data.converted == 1
    np.testing.assert_array_equal(load_image(source.with_suffix(".png")), face)  # the predict path agrees


@pytest.mark.parametrize("mode", ["I;16", "RGB", "RGBA", "LA", "P", "CMYK", "1", "exif-rotated"])
def test_data_set_images_decode_like_predict_does(tiny_copy: Path, mode: str) -> None:
    """One decoding path: a data-set image is the predict path's gray image, cropped by `crop_face`."""
    source = _first(tiny_copy, "train", "sad")
    face = Image.open(source)
    target = source.with_name("Training_odd.png" if mode != "CMYK" and mode != "exif-rotated" else "Training_odd.jpg")
    if mode == "I;16":
        _sixteen_bit_png(target, np.asarray(face))
    elif mode == "exif-rotated":
        exif = Image.Exif()
        exif[0x0112] = 6
        face.resize((64, 96)).transpose(Image.Transpose.ROTATE_90).save(target, exif=exif.tobytes())
    else:
        face.resize((96, 96)).convert(mode).save(target)
    data = load_fer2013(tiny_copy, use_cache=False)
    index = list(data["train"].names).index(f"train/sad/{target.name}")
    np.testing.assert_array_equal(data["train"].images[index], crop_face(to_gray(load_image(target))))
    if mode not in ("exif-rotated", "1"):  # "1" is dithered black and white: the same face, not the same levels
        assert np.abs(data["train"].images[index].astype(int) - np.asarray(face)).mean() < 6


def test_fifo_and_socket_in_a_folder_do_not_hang(tiny_copy: Path) -> None:
    os.mkfifo(tiny_copy / "test" / "sad" / "PrivateTest_0.jpg")
    with pytest.raises(DataError) as err:
        _load_within(tiny_copy)
    assert "test/sad/PrivateTest_0.jpg: not a regular file (a FIFO)" in str(err.value)


def test_fifo_named_csv_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "fer2013.csv"
    os.mkfifo(fifo)
    with pytest.raises(DataError) as err:
        call_with_timeout(lambda: load_fer2013(fifo, use_cache=False), 30, unblock=unblock_fifo(fifo))
    assert str(err.value) == f"{fifo}: not a regular file (a FIFO)"


def test_symlink_loop_as_the_source(tmp_path: Path) -> None:
    loop = tmp_path / "fer2013.csv"
    loop.symlink_to(loop.name)
    with pytest.raises(DataError) as err:
        load_fer2013(loop)
    assert str(err.value).startswith(f"{loop}: ") and "symbolic link" in str(err.value)


def test_symlinks_to_real_images_are_followed(tiny_copy: Path, tiny_root: Path, tiny_data: FerData) -> None:
    victim = _first(tiny_copy, "train", "happy")
    victim.unlink()
    victim.symlink_to(_first(tiny_root, "train", "happy"))
    assert_same_data(load_fer2013(tiny_copy, use_cache=False), tiny_data)


def test_folder_inside_a_class_folder_is_named(tiny_copy: Path) -> None:
    (tiny_copy / "train" / "happy" / "more").symlink_to(tiny_copy / "train")  # a loop, were it followed
    with pytest.raises(DataError) as err:
        _load_within(tiny_copy)
    assert "train/happy/more: a folder inside a class folder (expected image files)" in str(err.value)
