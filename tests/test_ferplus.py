"""FER+: its loaders on the real files, the label schemes on real rows against hand-computed targets, bad label
files refused in one line, and a FER+ model trained, evaluated and used for prediction with eight classes."""

from __future__ import annotations

import csv
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA_ROOT
from ferkit.data import DataError, load_fer2013
from ferkit.evaluate import shared_class_view
from ferkit.ferplus import vote_statistics, with_label_scheme
from ferkit.labels import EMOTIONS, FERPLUS_CLASSES
from ferkit.votes import majority_labels, plurality_labels, scheme_labels, vote_distributions

FERPLUS_ROOT = Path(os.environ.get("FERKIT_FERPLUS") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
                    / "ferplus")

# The majority protocol's class counts, from the data's README (neutral ... contempt, kept, dropped).
README_MAJORITY = {
    "train": ([8739, 7287, 3149, 3013, 2099, 119, 532, 119], 25057, 3501),
    "val": ([1182, 865, 415, 351, 287, 24, 62, 13], 3199, 380),
    "test": ([1089, 893, 396, 384, 273, 18, 83, 16], 3152, 421),
}


def require_ferplus() -> Path:
    if not (FERPLUS_ROOT / "FER2013Train" / "label.csv").is_file():
        pytest.skip(f"FER+ not found at {FERPLUS_ROOT} (set FERKIT_FERPLUS)")
    return FERPLUS_ROOT


@pytest.fixture(scope="module")
def ferplus(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return load_fer2013(require_ferplus(), cache_dir=tmp_path_factory.mktemp("cache"))


def label_rows(split_folder: str, names: list[str]) -> dict[str, list[int]]:
    """The raw vote counts of the named images, read straight from the real label.csv."""
    with open(require_ferplus() / split_folder / "label.csv", newline="") as f:
        return {row[0]: [int(v) for v in row[2:]] for row in csv.reader(f) if row and row[0] in names}


# ---------------------------------------------------------------------------------------------
# Schemes on real rows


def test_schemes_on_real_rows_match_hand_computed_targets() -> None:
    names = ["fer0000000.png", "fer0000001.png", "fer0000002.png", "fer0000003.png", "fer0000026.png",
             "fer0000459.png"]
    rows = label_rows("FER2013Train", names)
    votes = np.array([rows[n] for n in names])
    # The rows as the file has them (so a changed file fails here, not in the arithmetic below).
    assert votes.tolist() == [[4, 0, 0, 1, 3, 2, 0, 0, 0, 0], [6, 0, 1, 1, 0, 0, 0, 0, 2, 0],
                              [5, 0, 0, 3, 1, 0, 0, 0, 1, 0], [4, 0, 0, 4, 1, 0, 0, 0, 1, 0],
                              [4, 2, 4, 0, 0, 0, 0, 0, 0, 0], [1, 0, 3, 1, 0, 0, 1, 0, 4, 0]]
    # Single votes removed first: row 0 keeps 4+3+2 = 9 votes, 4 is no majority; row 1 keeps 6 of 8 (the 2
    # unknown votes count in the total); row 3 and row 4 tie at the top; row 5's top is unknown (4 of 7).
    assert majority_labels(votes).tolist() == [-1, 0, 0, -1, -1, -1]
    assert plurality_labels(votes).tolist() == [0, 0, 0, -1, -1, -1]
    targets, kept = vote_distributions(votes)
    assert kept.tolist() == [True, True, True, True, True, False]
    expected = np.zeros((6, 8))
    expected[0, [0, 4, 5]] = [4 / 9, 3 / 9, 2 / 9]
    expected[1, 0] = 1.0
    expected[2, [0, 3]] = [5 / 8, 3 / 8]
    expected[3, [0, 3]] = [0.5, 0.5]
    expected[4, [0, 1, 2]] = [0.4, 0.2, 0.4]
    np.testing.assert_allclose(targets[:5], expected[:5], atol=1e-6)
    labels, soft = scheme_labels(votes, "ferplus-distribution")
    assert labels.tolist() == [0, 0, 0, 0, 0, -1] and soft is not None


@pytest.mark.slow
def test_folder_loads_with_the_readme_counts(ferplus) -> None:  # type: ignore[no-untyped-def]
    assert ferplus.format == "ferplus" and ferplus.classes == FERPLUS_CLASSES
    assert [len(ferplus[s]) for s in ("train", "val", "test")] == [28558, 3579, 3573]
    for split, (per_class, kept, dropped) in README_MAJORITY.items():
        majority = majority_labels(ferplus[split].votes)
        assert np.bincount(majority[majority >= 0], minlength=8).tolist() == per_class
        assert ((majority >= 0).sum(), (majority < 0).sum()) == (kept, dropped)
    stats = vote_statistics(ferplus)
    assert stats["test"]["kept"]["ferplus-majority"] == 3152  # type: ignore[index]


@pytest.mark.slow
def test_label_scheme_view_trains_on_the_scheme_and_validates_on_the_majority(ferplus) -> None:  # type: ignore[no-untyped-def]
    view = with_label_scheme(ferplus, "ferplus-distribution")
    assert view.labels == "ferplus-distribution"
    assert len(view["val"]) == 3199 and len(view["test"]) == 3152
    assert view["train"].targets is not None and view["train"].targets.shape == (len(view["train"]), 8)
    np.testing.assert_allclose(view["train"].targets.sum(1), 1, atol=1e-5)
    with pytest.raises(DataError, match="no FER-2013 labels"):
        with_label_scheme(ferplus, "fer2013")


# ---------------------------------------------------------------------------------------------
# Bad label files


def tiny_ferplus(dest: Path, per_split: int = 3) -> Path:
    """A real FER+ folder of the first `per_split` images of each split, with their label.csv rows."""
    for folder in ("FER2013Train", "FER2013Valid", "FER2013Test"):
        (dest / folder).mkdir(parents=True)
        with open(require_ferplus() / folder / "label.csv", newline="") as f:
            rows = [row for row in csv.reader(f) if row][:per_split]
        with open(dest / folder / "label.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
        for row in rows:
            shutil.copy2(FERPLUS_ROOT / folder / row[0], dest / folder / row[0])
    return dest


def rewrite_first_row(root: Path, folder: str, change) -> None:  # type: ignore[no-untyped-def]
    path = root / folder / "label.csv"
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows[0] = change(rows[0])
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_tiny_folder_loads(tmp_path: Path) -> None:
    data = load_fer2013(tiny_ferplus(tmp_path / "fp"), use_cache=False)
    assert [len(data[s]) for s in ("train", "val", "test")] == [3, 3, 3]


@pytest.mark.parametrize(("change", "message"), [
    (lambda row: row[:-1], r"FER2013Train/label.csv: row 1: expected 12 columns .* got 11"),
    (lambda row: [*row[:3], "two", *row[4:]], r"FER2013Train/label.csv: row 1: vote count for happiness is 'two'"),
    (lambda row: [*row[:2], *["0"] * 10], r"FER2013Train/label.csv: row 1: 0 votes in all"),
])
def test_malformed_label_rows_are_one_line_errors(tmp_path: Path, change, message: str) -> None:  # type: ignore[no-untyped-def]
    root = tiny_ferplus(tmp_path / "fp")
    rewrite_first_row(root, "FER2013Train", change)
    with pytest.raises(DataError, match=message) as err:
        load_fer2013(root, use_cache=False)
    assert "\n" not in str(err.value)


def test_png_without_row_and_row_without_png_are_named(tmp_path: Path) -> None:
    root = tiny_ferplus(tmp_path / "fp")
    first = sorted((root / "FER2013Valid").glob("*.png"))[0]
    shutil.copy2(first, root / "FER2013Valid" / "fer9999999.png")
    (root / "FER2013Test" / sorted(p.name for p in (root / "FER2013Test").glob("*.png"))[1]).unlink()
    with pytest.raises(DataError) as err:
        load_fer2013(root, use_cache=False)
    text = str(err.value)
    assert "2 problem(s)" in text
    assert "FER2013Valid/fer9999999.png: an image with no row in label.csv" in text
    assert "FER2013Test/label.csv: row 2: no image" in text


# ---------------------------------------------------------------------------------------------
# fer2013.csv + fer2013new.csv


def write_csv_pair(dest: Path, rows: int | None = None) -> tuple[Path, Path]:
    """A fer2013.csv made of FER+'s own pixels (a zero image where FER+ has no face) beside the real
    fer2013new.csv's rows: all, or the first `rows` of each Usage, in file order. The emotion column is each
    face's FER+ plurality as a FER-2013 id (neutral where none): these tests check the join, not the labels."""
    with open(require_ferplus() / "fer2013new.csv", newline="") as f:
        new_rows = list(csv.reader(f))
    header, body = new_rows[0], new_rows[1:]
    if rows is not None:
        rank = {usage: 0 for usage in ("Training", "PublicTest", "PrivateTest")}
        chosen = []
        for row in body:
            rank[row[0]] += 1
            if rank[row[0]] <= rows:
                chosen.append(row)
        body = chosen
    folders = {"Training": "FER2013Train", "PublicTest": "FER2013Valid", "PrivateTest": "FER2013Test"}
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / "fer2013.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["emotion", "pixels", "Usage"])
        for usage, name, *counts in body:
            pixels = np.asarray(Image.open(FERPLUS_ROOT / folders[usage] / name)) if name else np.zeros((48, 48))
            top = plurality_labels(np.array([[int(c) for c in counts]]))[0]
            emotion = EMOTIONS.index(FERPLUS_CLASSES[top]) if 0 <= top < 7 else EMOTIONS.index("neutral")
            writer.writerow([emotion, " ".join(map(str, pixels.astype(int).reshape(-1))), usage])
    with open(dest / "fer2013new.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *body])
    return dest / "fer2013.csv", dest / "fer2013new.csv"


def test_csv_pair_joins_by_position_and_drops_non_faces(tmp_path: Path) -> None:
    fer_csv, new_csv = write_csv_pair(tmp_path, rows=70)
    with open(new_csv, newline="") as f:
        body = list(csv.reader(f))[1:]
    faces = [row for row in body if row[1]]
    data = load_fer2013(fer_csv, votes=new_csv, use_cache=False)
    assert len(faces) < len(body)  # the first 70 training rows hold rows FER+ dropped
    assert sum(len(data[s]) for s in ("train", "val", "test")) == len(faces)
    assert data["train"].votes.tolist() == [[int(v) for v in row[2:]] for row in faces if row[0] == "Training"]
    assert f"{len(body) - len(faces)} rows FER+ marks as not a face dropped" in " ".join(data.notes)
    stats = vote_statistics(data)["train"]
    assert 0 <= stats["fer2013_agreement"]["overall"] <= 1  # type: ignore[index]


def test_csv_pair_of_different_lengths_is_refused(tmp_path: Path) -> None:
    fer_csv, new_csv = write_csv_pair(tmp_path, rows=40)
    with open(new_csv, "a", newline="") as f:
        csv.writer(f).writerow(["Training", "fer0099999.png", 10, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    with pytest.raises(DataError, match=r"fer2013new.csv: 121 rows, but .*fer2013.csv has 120: the two files do not "
                                        r"line up"):
        load_fer2013(fer_csv, votes=new_csv, use_cache=False)


def test_csv_pair_with_other_usages_is_refused(tmp_path: Path) -> None:
    fer_csv, new_csv = write_csv_pair(tmp_path, rows=40)
    text = fer_csv.read_text().splitlines()
    text[5] = text[5].rsplit(",", 1)[0] + ",PrivateTest"
    fer_csv.write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"row 6 has Usage 'Training', but .*row 6.* is test"):
        load_fer2013(fer_csv, votes=new_csv, use_cache=False)


@pytest.mark.slow
def test_full_csv_pair_gives_the_readme_counts_plus_the_rows_that_share_a_file(tmp_path: Path) -> None:
    """fer2013new.csv names four files twice (rows 5276/6970, 5350/11819, 8425/15837 in Training and 33202/34336
    in PrivateTest), where FER+'s folder holds one file each, with the later row's votes; joined by position
    every row is its own face. The extra Training rows are a neutral (9 votes), a sad (6 of 10) and an angry
    face (4 of 7 after single votes go); the extra PrivateTest row is neutral (5 of 8), where the folder's
    copy of that file has 10 not-a-face votes."""
    fer_csv, new_csv = write_csv_pair(tmp_path)
    data = load_fer2013(fer_csv, votes=new_csv, use_cache=False)
    assert [len(data[s]) for s in ("train", "val", "test")] == [28558 + 3, 3579, 3573 + 1]
    extra = {"train": [1, 0, 0, 1, 1, 0, 0, 0], "val": [0] * 8, "test": [1, 0, 0, 0, 0, 0, 0, 0]}
    for split, (per_class, kept, _) in README_MAJORITY.items():
        majority = majority_labels(data[split].votes)
        expected = [n + e for n, e in zip(per_class, extra[split], strict=True)]
        assert np.bincount(majority[majority >= 0], minlength=8).tolist() == expected
        assert (majority >= 0).sum() == kept + sum(extra[split])


# ---------------------------------------------------------------------------------------------
# Across vocabularies


def test_shared_class_view_scores_a_fer2013_model_on_ferplus_labels() -> None:
    logits = np.arange(3 * 7, dtype=np.float32).reshape(3, 7)  # a 7-class model, FER-2013 order
    labels = np.array([7, 1, 0])  # FER+ ids: contempt (no FER-2013 counterpart), happy, neutral
    z, y, classes, keep = shared_class_view(logits, labels, EMOTIONS, FERPLUS_CLASSES)
    assert keep.tolist() == [False, True, True]
    assert classes == ["neutral", "happy", "surprise", "sad", "angry", "disgust", "fear"]
    assert y.tolist() == [1, 0]
    # neutral is FER-2013 id 6, happy 3: the model's columns reordered into FER+'s order
    assert z[0].tolist() == [13.0, 10.0, 12.0, 11.0, 7.0, 8.0, 9.0]


# ---------------------------------------------------------------------------------------------
# A FER+ model: trained on the vote distributions, evaluated, used for prediction


@pytest.fixture(scope="module")
def ferplus_run(tmp_path_factory: pytest.TempPathFactory, ferplus) -> Path:  # type: ignore[no-untyped-def]
    from ferkit.train import TrainConfig, fit

    run_dir = tmp_path_factory.mktemp("runs") / "ferplus"
    config = TrainConfig(data=str(FERPLUS_ROOT), labels="ferplus-distribution", run_dir=str(run_dir), epochs=1,
                         batch_size=64, limit_train=256, views=1, progress=False, device="cpu")
    return fit(config, data=ferplus)


@pytest.mark.slow
def test_a_distribution_run_writes_eight_class_weights_and_ferplus_test_figures(ferplus_run: Path) -> None:
    import json

    from ferkit.weights import read_meta

    meta = read_meta(ferplus_run / "best.safetensors")
    assert meta.classes == list(FERPLUS_CLASSES)
    assert meta.recipe["labels"] == "ferplus-distribution"
    assert len(meta.preprocessing.class_prior) == 8
    report = json.loads((ferplus_run / "test_metrics.json").read_text())
    assert report["num_images"] == 3152 and len(report["confusion_matrix"]) == 8
    assert report["ferplus"]["majority_faces"] == 3152 and report["ferplus"]["distribution_faces"] > 3152


@pytest.mark.slow
def test_the_ferplus_model_predicts_eight_emotions_on_a_real_face(ferplus_run: Path, ferplus) -> None:  # type: ignore[no-untyped-def]
    from ferkit.predict import EmotionRecognizer

    recognizer = EmotionRecognizer(ferplus_run / "best.safetensors", device="cpu", detect=False)
    (result,) = recognizer.predict_batch([ferplus["test"].images[0]])[0]
    assert list(result.probabilities) == list(FERPLUS_CLASSES)
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert result.label in FERPLUS_CLASSES


@pytest.mark.slow
def test_evaluate_scores_across_vocabularies(ferplus_run: Path, tmp_path: Path) -> None:
    from ferkit.evaluate import evaluate_weights

    fer2013_on_ferplus = evaluate_weights("ferkit-refcnn", str(FERPLUS_ROOT), "test", figures_dir=str(tmp_path),
                                          device="cpu")
    # FER+'s majority faces less the 16 whose majority is contempt, which a FER-2013 model cannot name
    assert fer2013_on_ferplus.ferplus is not None
    assert fer2013_on_ferplus.num_images == 3152 - 16 == fer2013_on_ferplus.ferplus.majority_faces
    assert fer2013_on_ferplus.classes == ["neutral", "happy", "surprise", "sad", "angry", "disgust", "fear"]
    ferplus_on_fer2013 = evaluate_weights(str(ferplus_run / "best.safetensors"), str(DATA_ROOT), "test",
                                          figures_dir=str(tmp_path), device="cpu")
    assert ferplus_on_fer2013.num_images == 3589 and ferplus_on_fer2013.classes == list(EMOTIONS)
    assert ferplus_on_fer2013.ferplus is None and "ferplus" not in ferplus_on_fer2013.to_dict()


@pytest.mark.slow
def test_cli_data_info_prints_the_vote_statistics(capsys: pytest.CaptureFixture[str]) -> None:
    from ferkit.cli import main

    assert main(["data", "info", "--data", str(require_ferplus())]) == 0
    out = capsys.readouterr().out
    assert "contempt" in out and "FER+ votes" in out
    assert any(line.split()[:4] == ["test", "3573", "3152", line.split()[3]] for line in out.splitlines()
               if line.startswith("test"))


# ---------------------------------------------------------------------------------------------
# The shipped FER+ model: eight emotions through predict, the CLI and the service


@pytest.mark.slow
def test_the_shipped_ferplus_model_reads_eight_emotions_everywhere(ferplus, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from PIL import Image

    from ferkit.cli import main
    from ferkit.predict import EmotionRecognizer
    from ferkit.weights import read_meta, resolve_weights

    meta = read_meta(resolve_weights("ferkit-resnet-ferplus"))
    assert meta.classes == list(FERPLUS_CLASSES) and meta.views == 1 and meta.preprocessing.calibrated
    assert meta.recipe["labels"] == "ferplus-distribution"
    faces = ferplus["test"].images[:40]
    recognizer = EmotionRecognizer("ferkit-resnet-ferplus", device="cpu", detect=False, prior="train")
    results = [faces_results[0] for faces_results in recognizer.predict_batch(list(faces))]
    assert all(list(r.probabilities) == list(FERPLUS_CLASSES) for r in results)
    # FER+'s majority says most of these 40 test faces' emotions; the model names most of them
    majority = majority_labels(ferplus["test"].votes[:40])
    named = [(FERPLUS_CLASSES[m], r.label) for m, r in zip(majority, results, strict=True) if m >= 0]
    assert sum(truth == label for truth, label in named) >= 0.6 * len(named)

    Image.fromarray(faces[0]).save(tmp_path / "face.png")
    assert main(["predict", str(tmp_path / "face.png"), "--weights", "ferkit-resnet-ferplus", "--no-detect",
                 "--json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert list(record["faces"][0]["probabilities"]) == list(FERPLUS_CLASSES)

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ferkit.serve import ServeConfig, create_app

    with TestClient(create_app(ServeConfig(), recognizer), base_url="http://localhost") as client:
        for _ in range(600):  # the model warms up first (bounded: 30 s)
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        response = client.post("/v1/predict?detect=false",
                               files=[("files", ("face.png", (tmp_path / "face.png").read_bytes(), "image/png"))])
    assert response.status_code == 200, response.text
    face = response.json()[0]["faces"][0]
    assert list(face["probabilities"]) == list(FERPLUS_CLASSES) and face["label"] in FERPLUS_CLASSES
