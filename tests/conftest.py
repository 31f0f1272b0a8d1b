"""Shared fixtures: the real FER-2013 folder, small real subsets of it, CSV writers, an isolated cache.

The data set is found through $FERKIT_DATA, else `<repo>/../shared/data/fer2013`; tests that need it
are skipped, with the reason, where it is absent. Every test gets its own empty FERKIT_CACHE, so no
test reads or writes the user's cache unless it sets one up on purpose.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from ferkit.data import FerData, Split, load_fer2013
from ferkit.labels import EMOTIONS, SPLIT_TO_USAGE, SPLITS

if TYPE_CHECKING:
    from ferkit.predict import EmotionRecognizer

DATA_ROOT = Path(
    os.environ.get("FERKIT_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fer2013"
)
USAGES = ("Training", "PublicTest", "PrivateTest")
KAGGLE_HEADER = "emotion,pixels,Usage"
ICML_HEADER = "emotion, Usage, pixels"


def pytest_configure(config: pytest.Config) -> None:
    # The models here are tiny and the batches small: one intra-op thread avoids OpenMP threads
    # spinning against each other, which on a busy 2-core machine makes CPU training ~10x slower.
    torch.set_num_threads(int(os.environ.get("FERKIT_TEST_THREADS", "1")))


# Test time by lane: the fast lane is `-m "not slow"`; CI's one run of the whole suite prints both in its log.
_LANES: dict[str, list[float]] = {"fast": [0, 0.0], "slow": [0, 0.0]}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    lane = _LANES["slow" if "slow" in report.keywords else "fast"]
    lane[1] += report.duration
    if report.when == "teardown":
        lane[0] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if sum(count for count, _ in _LANES.values()):
        terminalreporter.write_sep("-", "test time by lane (setup, call and teardown)")
        for name, marker in (("fast", '-m "not slow"'), ("slow", "-m slow")):
            count, seconds = _LANES[name]
            terminalreporter.write_line(f"{name} lane ({marker}): {int(count)} tests, {seconds:.1f} s")


def _require_data_root() -> Path:
    if not ((DATA_ROOT / "train").is_dir() and (DATA_ROOT / "test").is_dir()):
        pytest.skip(f"FER-2013 image folder not found at {DATA_ROOT} (set FERKIT_DATA to the folder layout)")
    return DATA_ROOT


def build_subset(dest: Path, per_class: dict[str, int], source: Path | None = None) -> Path:
    """Copy `per_class[usage]` real images of every class and Usage into `dest`, same layout and names.

    Files are picked evenly across each sorted class folder, so the choice is deterministic.
    """
    source = source or _require_data_root()
    for part, usages in (("train", ("Training",)), ("test", ("PublicTest", "PrivateTest"))):
        for cls in EMOTIONS:
            names = sorted(os.listdir(source / part / cls))
            (dest / part / cls).mkdir(parents=True, exist_ok=True)
            for usage in usages:
                count = per_class.get(usage, 0)
                chosen = [n for n in names if n.startswith(f"{usage}_")]
                for name in chosen[:: max(len(chosen) // max(count, 1), 1)][:count]:
                    shutil.copy2(source / part / cls / name, dest / part / cls / name)
    return dest


def real_images(root: Path, part: str, cls: str, count: int) -> list[Path]:
    """The first `count` real image files of one class folder, sorted by name."""
    return sorted((root / part / cls).iterdir())[:count]


# ---------------------------------------------------------------------------------------------
# CSV writers


def rows_from_data(data: FerData, interleave: bool = True) -> list[list[str]]:
    """[emotion, Usage, pixels] string rows for every image of `data`.

    With `interleave`, rows of the three splits alternate, so that a loader must group them by
    Usage; within a split the order of `data` is kept.
    """
    per_split = [
        [[str(int(label)), SPLIT_TO_USAGE[split], " ".join(map(str, image.reshape(-1).tolist()))]
         for image, label in zip(data[split].images, data[split].labels, strict=True)]
        for split in SPLITS
    ]
    if not interleave:
        return [row for rows in per_split for row in rows]
    out: list[list[str]] = []
    for i in range(max(len(rows) for rows in per_split)):
        out.extend(rows[i] for rows in per_split if i < len(rows))
    return out


def write_fer_csv(path: Path, rows: Iterable[Sequence[str]], fmt: str = "kaggle", header: str | None = None) -> Path:
    """Write [emotion, Usage, pixels] rows as Kaggle `fer2013.csv` or as `icml_face_data.csv`.

    kaggle: header `emotion,pixels,Usage`, rows `3,70 80 ...,Training`.
    icml:   header `emotion, Usage, pixels` (spaces after the commas), rows `3,Training,70 80 ...`.
    """
    if fmt not in ("kaggle", "icml"):
        raise ValueError(fmt)
    lines = [header if header is not None else (KAGGLE_HEADER if fmt == "kaggle" else ICML_HEADER)]
    for emotion, usage, pixels in rows:
        lines.append(",".join((emotion, pixels, usage) if fmt == "kaggle" else (emotion, usage, pixels)))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def assert_same_data(a: FerData, b: FerData, names: bool = True) -> None:
    """Identical images, labels (and names) in every split, in the same order."""
    for split in SPLITS:
        assert len(a[split]) == len(b[split]), split
        np.testing.assert_array_equal(a[split].images, b[split].images, err_msg=split)
        np.testing.assert_array_equal(a[split].labels, b[split].labels, err_msg=split)
        assert a[split].images.dtype == np.uint8
        assert a[split].labels.dtype == np.int64
        if names:
            np.testing.assert_array_equal(a[split].names, b[split].names, err_msg=split)


def take(data: FerData, counts: dict[str, int]) -> FerData:
    """The first `counts[split]` images of each split, as a new FerData."""
    splits = {}
    for split in SPLITS:
        part = data[split]
        n = counts.get(split, len(part))
        splits[split] = Split(part.images[:n], part.labels[:n], part.names[:n])
    return FerData(source=data.source, format=data.format, splits=splits)


# ---------------------------------------------------------------------------------------------
# Fixtures


def _package_files() -> dict[str, tuple[int, int, int]]:
    import ferkit

    package = Path(ferkit.__file__).resolve().parent
    # Its data (shipped weights, the page), not its code, which a developer may be editing while tests run.
    return {str(p.relative_to(package)): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(package.rglob("*")) if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".py"}


@pytest.fixture(scope="session", autouse=True)
def package_untouched() -> Iterable[None]:
    """No command run by any test may write into the installed package (issue 18: `calibrate` rewrote a
    shipped model in place): its files are the same, inode and time included, when the session ends."""
    before = _package_files()
    yield
    after = _package_files()
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"the test session changed files of the installed ferkit package: {changed}"


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty FERKIT_CACHE per test, and no FERKIT_DATA leaking in from the shell."""
    cache = tmp_path / "ferkit-cache"
    monkeypatch.setenv("FERKIT_CACHE", str(cache))
    monkeypatch.delenv("FERKIT_DATA", raising=False)
    return cache


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real FER-2013 image folder (skips where absent)."""
    return _require_data_root()


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterable[Path]:
    """One FERKIT_CACHE for the tests that read the whole FER-2013 folder, so that its 35,887 JPEGs are decoded once
    a session, not once a test; removed at the end (about 80 MB)."""
    cache = tmp_path_factory.mktemp("data-cache")
    yield cache
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture
def full_data(data_root: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The real FER-2013 folder, read through the session's shared cache (see `data_cache`)."""
    monkeypatch.setenv("FERKIT_CACHE", str(data_cache))
    return data_root


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """42 real images: 2 of every class for each of Training, PublicTest, PrivateTest. Do not modify."""
    return build_subset(tmp_path_factory.mktemp("tiny") / "fer2013",
                        {"Training": 2, "PublicTest": 2, "PrivateTest": 2}, data_root)


@pytest.fixture
def tiny_copy(tmp_path: Path, tiny_root: Path) -> Path:
    """A private, modifiable copy of `tiny_root`."""
    return Path(shutil.copytree(tiny_root, tmp_path / "fer2013"))


@pytest.fixture(scope="session")
def tiny_data(tiny_root: Path) -> FerData:
    return load_fer2013(tiny_root, use_cache=False)


@pytest.fixture(scope="session")
def small_root(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """364 real images: 40 Training, 6 PublicTest and 6 PrivateTest of every class. Do not modify."""
    return build_subset(tmp_path_factory.mktemp("small") / "fer2013",
                        {"Training": 40, "PublicTest": 6, "PrivateTest": 6}, data_root)


@pytest.fixture(scope="session")
def small_data(small_root: Path) -> FerData:
    """`small_root` loaded: 280 train, 42 val, 42 test real images."""
    return load_fer2013(small_root, use_cache=False)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, small_data: FerData) -> Path:
    """A finished 2-epoch run on 256 real training images. Read-only: copy it before changing it."""
    from ferkit.train import TrainConfig, fit

    out = tmp_path_factory.mktemp("runs") / "tiny"
    config = TrainConfig(run_dir=str(out), epochs=2, limit_train=256, eval_batch_size=64, progress=False)
    return fit(config, small_data)


@pytest.fixture
def run_copy(tmp_path: Path, tiny_run: Path) -> Path:
    """A private, modifiable copy of `tiny_run`."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


@pytest.fixture(scope="session")
def weights() -> Path:
    """The weights the prediction and export tests use (the shipped default; see fer_photos.model_weights)."""
    from fer_photos import model_weights

    return model_weights()


@pytest.fixture(scope="session")
def recognizer(weights: Path) -> EmotionRecognizer:
    """The shipped model with face detection, on the CPU."""
    from ferkit.predict import EmotionRecognizer

    return EmotionRecognizer(weights, device="cpu")
