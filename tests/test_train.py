"""Training on small real subsets: a step lowers the loss, a run writes its files, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import take
from ferkit.augment import AugmentConfig
from ferkit.data import FerData
from ferkit.evaluate import compute_metrics
from ferkit.inference import predict_logits, preprocess, to_tensor
from ferkit.models import create_model
from ferkit.runs import read_metrics_csv
from ferkit.train import StepContext, TrainConfig, autocast_dtype, fit, train_one_epoch
from ferkit.weights import load_model, read_meta

HISTORY_KEYS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]


def _train_mode_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    torch.manual_seed(7)  # the same dropout masks for every measurement
    model.train()
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y).item()


def test_training_steps_on_real_faces_lower_the_loss(small_data: FerData) -> None:
    train = small_data["train"]
    index = np.arange(0, 280, 4)[:64]  # 64 real faces, 9 or 10 of every class
    assert len(np.unique(train.labels[index])) == 7
    images = to_tensor(train.images[index])
    labels = torch.from_numpy(train.labels[index])
    torch.manual_seed(0)
    model = create_model("refcnn").to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    device = torch.device("cpu")
    ctx = StepContext(device, AugmentConfig(hflip=False, rotate_degrees=0), autocast_dtype(device, True), True)
    x = preprocess(train.images[index])
    before = _train_mode_loss(model, x, labels)
    generator = torch.Generator().manual_seed(0)
    stats = [train_one_epoch(model, optimizer, images, labels, ctx, 32, generator) for _ in range(4)]
    after = _train_mode_loss(model, x, labels)
    assert after < before - 0.1, (before, after)
    assert before == pytest.approx(np.log(7), abs=0.6)  # an untrained model is close to uniform
    for epoch in stats:
        assert np.isfinite(epoch["loss"]) and 0 <= epoch["acc"] <= 1 and epoch["images_per_s"] > 0
    assert stats[-1]["loss"] < stats[0]["loss"]


def test_a_run_writes_every_file(tiny_run: Path, small_data: FerData) -> None:
    files = sorted(p.name for p in tiny_run.iterdir())
    assert files == sorted(["best.safetensors", "last.safetensors", "checkpoint.pt", "metrics.csv",
                            "test_metrics.json", "curves.png", "confusion_matrix_test.png", "config.json"])
    # Atomic writes leave no temporary files behind.
    assert not [name for name in files if "tmp" in name or name.startswith(".")]
    for figure in ("curves.png", "confusion_matrix_test.png"):
        blob = (tiny_run / figure).read_bytes()
        assert blob.startswith(b"\x89PNG\r\n\x1a\n") and len(blob) > 10_000

    history = read_metrics_csv(tiny_run / "metrics.csv")
    assert [row["epoch"] for row in history] == [1.0, 2.0]
    assert list(history[0]) == [*HISTORY_KEYS, "images_per_s", "seconds"]
    for row in history:
        assert 0 < row["train_loss"] < 10 and 0 < row["val_loss"] < 10
        assert 0 <= row["train_acc"] <= 1 and 0 <= row["val_acc"] <= 1
        assert row["lr"] == pytest.approx(1e-3)
        assert row["val_acc"] * 42 == pytest.approx(round(row["val_acc"] * 42))  # a count out of 42 images

    checkpoint = torch.load(tiny_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 2 and len(checkpoint["history"]) == 2
    assert checkpoint["config"]["arch"] == "refcnn" and checkpoint["config"]["limit_train"] == 256
    assert checkpoint["best_val_acc"] == max(row["val_acc"] for row in history)

    # last.safetensors is the epoch-2 model: it reproduces the logged validation accuracy exactly.
    last, last_meta = load_model(tiny_run / "last.safetensors")
    assert last_meta.epoch == 2 and last_meta.arch == "refcnn" and last_meta.data_source == small_data.source
    val = compute_metrics(predict_logits(last, small_data["val"].images), small_data["val"].labels)
    assert val["accuracy"] == pytest.approx(history[-1]["val_acc"], abs=1e-9)
    assert val["loss"] == pytest.approx(history[-1]["val_loss"], abs=1e-4)
    for name, tensor in checkpoint["model"].items():
        torch.testing.assert_close(load_file(tiny_run / "last.safetensors")[name], tensor, rtol=0, atol=0)

    # best.safetensors is the first epoch with the best validation accuracy; the test split scores it.
    best_epoch = 1 + int(np.argmax([row["val_acc"] for row in history]))
    best, best_meta = load_model(tiny_run / "best.safetensors")
    assert best_meta.epoch == best_epoch
    assert best_meta.metrics["val_acc"] == pytest.approx(history[best_epoch - 1]["val_acc"])
    report = json.loads((tiny_run / "test_metrics.json").read_text())
    test = compute_metrics(predict_logits(best, small_data["test"].images), small_data["test"].labels)
    assert report["num_images"] == 42 and report["best_epoch"] == best_epoch
    assert report["accuracy"] == pytest.approx(test["accuracy"], abs=1e-9)
    assert report["confusion_matrix"] == test["confusion_matrix"]
    assert sum(map(sum, report["confusion_matrix"])) == 42


def _config(out: Path, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = dict(run_dir=str(out), limit_train=128, batch_size=32, eval_batch_size=64,
                                       progress=False, device="cpu")
    return TrainConfig(**{**settings, **overrides})  # type: ignore[arg-type]


def test_resume_continues_exactly_like_an_unbroken_run(tmp_path: Path, small_data: FerData) -> None:
    data = take(small_data, {"val": 21, "test": 14})
    unbroken = fit(_config(tmp_path / "unbroken", epochs=3), data)
    broken = fit(_config(tmp_path / "broken", epochs=1), data)
    assert len(read_metrics_csv(broken / "metrics.csv")) == 1
    fit(_config(broken, epochs=3, resume=True), data)
    expected = read_metrics_csv(unbroken / "metrics.csv")
    resumed = read_metrics_csv(broken / "metrics.csv")
    assert [row["epoch"] for row in resumed] == [1.0, 2.0, 3.0]
    # On the CPU the resumed run repeats the unbroken one bit for bit: same shuffles, augmentations,
    # dropout masks, optimiser and scheduler state.
    assert [{k: row[k] for k in HISTORY_KEYS} for row in resumed] == [
        {k: row[k] for k in HISTORY_KEYS} for row in expected]
    assert expected[0]["train_loss"] != expected[2]["train_loss"]  # the history is not trivially constant
    a, b = load_file(unbroken / "last.safetensors"), load_file(broken / "last.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0)
    assert read_meta(broken / "best.safetensors").epoch == read_meta(unbroken / "best.safetensors").epoch


def test_resume_refuses_another_architecture(run_copy: Path, small_data: FerData) -> None:
    with pytest.raises(ValueError, match=r"was trained as 'refcnn', not 'resnet'") as err:
        fit(_config(run_copy, arch="resnet", epochs=3, resume=True), small_data)
    assert str(run_copy / "checkpoint.pt") in str(err.value)


def test_resume_without_a_checkpoint(tmp_path: Path, small_data: FerData) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing to resume") as err:
        fit(_config(tmp_path / "empty", epochs=2, resume=True), small_data)
    assert str(tmp_path / "empty" / "checkpoint.pt") in str(err.value)
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_new_run_will_not_overwrite_an_old_one(run_copy: Path, small_data: FerData) -> None:
    before = {p.name: p.read_bytes() for p in run_copy.iterdir()}
    with pytest.raises(FileExistsError, match="--resume") as err:
        fit(_config(run_copy, epochs=1), small_data)
    assert str(run_copy) in str(err.value)
    assert {p.name: p.read_bytes() for p in run_copy.iterdir()} == before


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(
    run_copy: Path, small_data: FerData, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = torch.save

    def dying_save(obj: object, path: object, *args: object, **kwargs: object) -> None:
        real_save(obj, path, *args, **kwargs)  # type: ignore[arg-type]
        blob = Path(str(path)).read_bytes()
        Path(str(path)).write_bytes(blob[: len(blob) // 3])  # the process dies a third of the way in
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        fit(_config(run_copy, epochs=3, limit_train=256, batch_size=64, device="auto", resume=True), small_data)
    monkeypatch.undo()
    checkpoint = torch.load(run_copy / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 2 and len(checkpoint["history"]) == 2
    assert len(read_metrics_csv(run_copy / "metrics.csv")) == 2
