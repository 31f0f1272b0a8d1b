"""The Ray engine (`ferkit.scale`): its rows are the local engine's, on a two-node Ray cluster on this machine.

One Ray start for the module's Python tests: `ray.cluster_utils.Cluster` with two nodes of one CPU each (as
Ray's own tests do), so a pool of two actors has one on each node, and every test here shows both took work.
The command line's own local Ray is started once, in a subprocess. Ray is an optional extra (`.[ray]`, in
`.[dev]`); without it the module is skipped, and `test_without_ray_the_engine_says_how_to_install_it` shows
the one line a user gets.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fer_photos import background, fer_faces, photo, read_gray, write_video
from ferkit.errors import UsageError
from ferkit.tables import read_results

KEY = ["path", "frame", "face"]
ENV = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # the command starts its own Ray


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """Nested folders of real photos (FER-2013 PrivateTest faces pasted on backgrounds, 1-2 a photo, one with
    none), a file that is not an image, and a 12-frame video of a moving face."""
    root = tmp_path_factory.mktemp("corpus") / "corpus"
    faces = [read_gray(p) for cls in ("happy", "sad", "surprise", "angry") for p in fer_faces(data_root, cls)[:3]]
    for i in range(9):
        folder = root / f"set{i % 3}" / ("deep" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        boxes = [(40 + 5 * i, 60, 150, 150), (360, 140, 170, 170)][: 1 + i % 2]
        Image.fromarray(photo(faces[i : i + len(boxes)], boxes, seed=i)).save(folder / f"p{i:02d}.jpg", quality=92)
    Image.fromarray(background(seed=99)).save(root / "empty-room.png")
    (root / "set0" / "notes.jpg").write_text("not a photo\n")
    clip = [photo([faces[0]], [(60 + 10 * i, 80, 160, 160)], width=480, height=360, seed=i) for i in range(12)]
    write_video(root / "clip.avi", clip)
    return root


@pytest.fixture(scope="module")
def options(weights: Path) -> dict[str, object]:
    return {"weights": str(weights), "device": "cpu"}


@pytest.fixture(scope="module")
def local_table(tmp_path_factory: pytest.TempPathFactory, corpus: Path, options: dict[str, object]
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The local engine's face rows and track summaries for the corpus (and a path that does not exist)."""
    from ferkit.local import predict_table
    from ferkit.predict import EmotionRecognizer
    from ferkit.sources import expand_inputs

    out = tmp_path_factory.mktemp("local")
    recognizer = EmotionRecognizer(**options)  # type: ignore[arg-type]
    predict_table(recognizer, expand_inputs([str(corpus), str(corpus / "missing.jpg")]), out / "rows.parquet",
                  summary=out / "tracks.parquet", workers=1, progress=False)
    return read_results(out / "rows.parquet"), read_results(out / "tracks.parquet")


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    """Two Ray nodes on this machine, one CPU each, small object stores; shut down when the module ends."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    store = 80 * 1024**2
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": store,
                                                          "include_dashboard": False})
    nodes.add_node(num_cpus=1, object_store_memory=store)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, log_to_driver=False, logging_level=logging.ERROR)
    try:
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


def assert_same_rows(ray_rows: pd.DataFrame, local_rows: pd.DataFrame) -> None:
    """Labels, boxes, paths and errors identical; probabilities (and every other float) within 1e-5."""
    assert list(ray_rows.columns) == list(local_rows.columns)
    key = [k for k in KEY if k in local_rows.columns] or ["path", "track"]
    a = ray_rows.sort_values(key, na_position="first").reset_index(drop=True)
    b = local_rows.sort_values(key, na_position="first").reset_index(drop=True)
    assert len(a) == len(b)
    for column in b.columns:
        if b[column].dtype == "float64":
            assert (a[column].isna() == b[column].isna()).all(), column
            assert np.allclose(a[column].fillna(0), b[column].fillna(0), rtol=0, atol=1e-5), column
        else:
            assert a[column].astype(object).equals(b[column].astype(object)), column


@pytest.mark.slow
def test_rows_equal_the_local_engines_both_nodes_take_work_and_resume_skips_what_is_done(
    cluster: object, corpus: Path, options: dict[str, object], local_table: tuple[pd.DataFrame, pd.DataFrame],
    tmp_path: Path,
) -> None:
    from ferkit.scale import PART_SUFFIX, predict_corpus

    # A table a killed run left: the rows of set1's photos already in it, and half a part beside it.
    out = tmp_path / "rows.parquet"
    done = local_table[0][local_table[0]["path"].str.contains("/set1/")]
    done.reset_index(drop=True).to_parquet(out, index=False)
    parts = tmp_path / (out.name + PART_SUFFIX)
    parts.mkdir()
    (parts / "killed-run.parquet").write_bytes(b"PAR1 half a part")
    report = predict_corpus([str(corpus), str(corpus / "missing.jpg")], out, recognizer_options=options,
                            summary=tmp_path / "tracks.parquet", concurrency=2, batch_size=2, resume=True)
    rows = read_results(out)
    assert_same_rows(rows, local_table[0])  # every input once, each with the local engine's rows
    assert_same_rows(read_results(tmp_path / "tracks.parquet"), local_table[1])
    assert rows["error"].notna().sum() == 2 and not parts.exists()  # notes.jpg, missing.jpg
    assert (report.inputs, report.skipped, report.done, report.failed) == (13, 3, 10, 2)
    assert report.frames == 12 and report.faces == rows[~rows["path"].str.contains("/set1/")]["face"].notna().sum()
    # Two actors of one CPU each on two nodes of one CPU: one actor per node, and each made rows.
    assert len(report.nodes) == 2 and all(count > 0 for count in report.nodes.values()), report.nodes
    assert sum(report.nodes.values()) == 9  # every input left but the argument that named nothing


def test_bad_outputs_are_refused_before_ray_starts(tmp_path: Path, corpus: Path, options: dict[str, object]) -> None:
    from ferkit.scale import predict_corpus, ray_command

    with pytest.raises(UsageError, match="ends in"):
        predict_corpus([str(corpus)], tmp_path / "rows.txt", recognizer_options=options)
    (tmp_path / "folder").mkdir()
    pd.DataFrame({"path": ["a.jpg"]}).to_parquet(tmp_path / "folder" / "part.parquet")
    with pytest.raises(UsageError, match="holds a results table already; --resume continues it"):
        predict_corpus([str(corpus)], tmp_path / "folder", recognizer_options=options)
    with pytest.raises(UsageError, match="--engine ray writes a table: give --output"):
        ray_command([str(corpus)], None)


@pytest.mark.slow
def test_the_command_on_a_local_ray(corpus: Path, weights: Path, local_table: tuple[pd.DataFrame, pd.DataFrame],
                                    tmp_path: Path) -> None:
    """`ferkit predict DIR --engine ray --output FOLDER` starts its own quiet local Ray; FOLDER gets Ray's parts."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "ferkit", "predict", str(corpus), str(corpus / "missing.jpg"),
                             "--engine", "ray", "--output", str(out), "--weights", str(weights), "--device", "cpu",
                             "--no-progress"], capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 1, result.stderr  # two inputs failed
    assert_same_rows(read_results(out), local_table[0])
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("ferkit: ") for line in lines), result.stderr  # nothing of Ray's
    assert "13 inputs" in result.stderr and "2 of 13 inputs failed" in result.stderr


def test_without_ray_the_engine_says_how_to_install_it(tmp_path: Path, corpus: Path) -> None:
    code = ("import sys; sys.modules['ray'] = None; from ferkit.cli import main; "
            f"sys.exit(main(['predict', {str(corpus)!r}, '--engine', 'ray', '--output', {str(tmp_path / 'o')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ferkit: error: --engine ray needs Ray Data, an optional extra: pip install 'ferkit[ray]' "
        "(or 'ray[data]>=2.40')"]
    assert not (tmp_path / "o").exists()


def test_the_local_engine_never_imports_ray(tmp_path: Path, corpus: Path) -> None:
    code = ("import sys; from ferkit.cli import main; "
            f"status = main(['predict', {str(corpus / 'set1')!r}, '--output', {str(tmp_path / 'o.parquet')!r}, "
            "'--no-progress', '--device', 'cpu']); "
            "print(status, sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert result.stdout.strip() == "0 []", result.stderr
