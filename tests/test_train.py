"""Training on small real subsets: a step lowers the loss, a run writes its files, resume, refusals."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import take
from ferkit.augment import AugmentConfig
from ferkit.cli import main as cli_main
from ferkit.data import FerData
from ferkit.evaluate import compute_metrics
from ferkit.inference import predict_logits, preprocess, to_tensor
from ferkit.labels import EMOTIONS, FERPLUS_CLASSES
from ferkit.losses import Criterion
from ferkit.models import create_model
from ferkit.runs import read_checkpoint, read_metrics_csv
from ferkit.train import StepContext, TrainConfig, autocast_dtype, fit, load_initial_weights, train_one_epoch
from ferkit.weights import WeightsMeta, load_model, read_meta, save_weights

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
    stats = [train_one_epoch(model, Criterion(), optimizer, images, labels, ctx, 32, generator) for _ in range(4)]
    after = _train_mode_loss(model, x, labels)
    assert after < before - 0.1, (before, after)
    assert before == pytest.approx(np.log(7), abs=0.6)  # an untrained model is close to uniform
    for epoch in stats:
        assert np.isfinite(epoch["loss"]) and 0 <= epoch["acc"] <= 1 and epoch["images_per_s"] > 0
    assert stats[-1]["loss"] < stats[0]["loss"]


def test_a_run_writes_every_file(tiny_run: Path, small_data: FerData) -> None:
    files = sorted(p.name for p in tiny_run.iterdir())
    assert files == sorted(["best.safetensors", "last.safetensors", "checkpoint.safetensors", "metrics.csv",
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

    checkpoint = read_checkpoint(tiny_run / "checkpoint.safetensors")
    assert checkpoint["epoch"] == 2 and len(checkpoint["history"]) == 2
    assert checkpoint["config"]["arch"] == "refcnn" and checkpoint["config"]["limit_train"] == 256
    assert checkpoint["best_val_acc"] == max(row["val_acc"] for row in history)

    # last.safetensors is the epoch-2 model: it reproduces the logged validation accuracy exactly.
    last, last_meta = load_model(tiny_run / "last.safetensors")
    assert last_meta.epoch == 2 and last_meta.arch == "refcnn" and last_meta.data_source == small_data.source
    val = compute_metrics(predict_logits(last, small_data["val"].images), small_data["val"].labels)
    assert val.accuracy == pytest.approx(history[-1]["val_acc"], abs=1e-9)
    assert val.loss == pytest.approx(history[-1]["val_loss"], abs=1e-4)
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
    assert report["accuracy"] == pytest.approx(test.accuracy, abs=1e-9)
    assert report["confusion_matrix"] == test.confusion_matrix
    assert sum(map(sum, report["confusion_matrix"])) == 42


def _config(out: Path, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = dict(run_dir=str(out), limit_train=128, batch_size=32, eval_batch_size=64,
                                       progress=False, device="cpu")
    return TrainConfig(**{**settings, **overrides})  # type: ignore[arg-type]


@pytest.mark.slow
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


def test_init_starts_the_run_from_the_given_weights(tmp_path: Path, tiny_run: Path, small_data: FerData) -> None:
    start = tiny_run / "best.safetensors"
    data = take(small_data, {"val": 21, "test": 14})
    # A learning rate this small leaves the parameters where they start: at `start`'s, or at random ones.
    initialised = fit(_config(tmp_path / "init", epochs=1, lr=1e-12, init=str(start)), data)
    fresh = fit(_config(tmp_path / "fresh", epochs=1, lr=1e-12), data)
    expected = load_file(start)
    parameters = [k for k in expected if "running_" not in k and "num_batches" not in k]
    got, random = load_file(initialised / "last.safetensors"), load_file(fresh / "last.safetensors")
    for name in parameters:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)
    assert any(not torch.allclose(random[name], expected[name], atol=1e-3) for name in parameters)
    assert json.loads((initialised / "config.json").read_text())["config"]["init"] == str(start)


def test_init_must_hold_the_runs_architecture(tiny_run: Path) -> None:
    with pytest.raises(ValueError, match=r"--init no-such-weights: no such weights file"):
        TrainConfig(init="no-such-weights").validate()
    with pytest.raises(ValueError, match=r"--init .* holds a 'refcnn' model, whose parameters neither fit nor "
                       r"widen into the 'resnet' this run trains"):
        TrainConfig(arch="resnet", init=str(tiny_run)).validate()
    TrainConfig(init=str(tiny_run)).validate()


def test_init_accepts_an_architecture_that_differs_only_in_strides(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = create_model("resnet", 8)
    weights = tmp_path / "resnet.safetensors"
    save_weights(weights, source, WeightsMeta(arch="resnet", classes=list(FERPLUS_CLASSES)))
    TrainConfig(arch="resnet_hr", init=str(weights)).validate()
    with pytest.raises(ValueError, match=r"parameters neither fit nor widen into the 'vgg_small'"):
        TrainConfig(arch="vgg_small", init=str(weights)).validate()
    target = create_model("resnet_hr", 8)
    load_initial_weights(target, str(weights), torch.device("cpu"), FERPLUS_CLASSES, "resnet_hr")
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[name], tensor, rtol=0, atol=0)



def test_init_widens_a_narrower_model_of_the_same_layout(tmp_path: Path, small_data: FerData) -> None:
    torch.manual_seed(0)
    source = create_model("resnet").eval()  # FER-2013's seven classes, into FER+'s eight
    weights = tmp_path / "resnet.safetensors"
    save_weights(weights, source, WeightsMeta(arch="resnet"))
    TrainConfig(arch="resnet_wide", init=str(weights)).validate()
    wide = create_model("resnet_wide", 8)
    load_initial_weights(wide, str(weights), torch.device("cpu"), FERPLUS_CLASSES, "resnet_wide")
    faces = preprocess(small_data["train"].images[:8])
    with torch.no_grad():
        expected, got = source(faces), wide.eval()(faces)
    shared = [FERPLUS_CLASSES.index(name) for name in EMOTIONS]
    # the seven shared classes' logits, up to the widening's small noise
    torch.testing.assert_close(got[:, shared], expected, rtol=0, atol=0.05 * float(expected.abs().max()))


def test_resume_refuses_another_architecture(run_copy: Path, small_data: FerData) -> None:
    with pytest.raises(ValueError, match=r"--arch refcnn in the run, resnet now") as err:
        fit(_config(run_copy, arch="resnet", epochs=3, batch_size=64, limit_train=256, resume=True), small_data)
    assert str(run_copy / "checkpoint.safetensors") in str(err.value)


def test_resume_takes_the_runs_recipe_from_its_folder(
    run_copy: Path, small_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The run trained on --limit-train 256: `--resume --run-dir` alone continues it, with no need to repeat that.
    code, _, err = _train_cli(capsys, "--data", str(small_root), "--run-dir", str(run_copy), "--epochs", "3",
                              "--resume")
    assert code == 0, err
    assert [row["epoch"] for row in read_metrics_csv(run_copy / "metrics.csv")] == [1.0, 2.0, 3.0]
    assert json.loads((run_copy / "config.json").read_text())["config"]["limit_train"] == 256
    # An option given on the command line still wins, and is still refused where the run's state depends on it.
    code, _, err = _train_cli(capsys, "--data", str(small_root), "--run-dir", str(run_copy), "--epochs", "4",
                              "--limit-train", "128", "--resume")
    _assert_one_line_error(code, err, "--limit-train 256 in the run, 128 now")
    code, _, err = _train_cli(capsys, "--data", str(small_root), "--run-dir", str(run_copy), "--preset", "fast",
                              "--resume")
    _assert_one_line_error(code, err, "holds a run of --preset reference, not fast")


def test_resume_without_a_checkpoint(tmp_path: Path, small_data: FerData) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing to resume") as err:
        fit(_config(tmp_path / "empty", epochs=2, resume=True), small_data)
    assert str(tmp_path / "empty" / "checkpoint.safetensors") in str(err.value)
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
    import ferkit.runs

    real_write = ferkit.runs.write_bytes_atomic

    def dying_write(path: Path, blob: bytes) -> Path:
        if path.name == "checkpoint.safetensors":
            path.with_name(f".{path.name}.tmp1").write_bytes(blob[: len(blob) // 3])  # dies a third of the way in
            raise KeyboardInterrupt
        return real_write(path, blob)

    monkeypatch.setattr(ferkit.runs, "write_bytes_atomic", dying_write)
    with pytest.raises(KeyboardInterrupt):
        fit(_config(run_copy, epochs=3, limit_train=256, batch_size=64, device="auto", resume=True), small_data)
    monkeypatch.undo()
    checkpoint = read_checkpoint(run_copy / "checkpoint.safetensors")
    assert checkpoint["epoch"] == 2 and len(checkpoint["history"]) == 2
    assert len(read_metrics_csv(run_copy / "metrics.csv")) == 2


# ---------------------------------------------------------------------------------------------
# Hardening (issue 11): bad checkpoints, changed recipes, bad options, unwritable folders, kills


def _train_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`ferkit train ARGV` in this process: exit status (argparse's included), stdout, stderr."""
    try:
        code = cli_main(["train", "--no-progress", "--device", "cpu", *argv])
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and "weights_only" not in err, err
    lines = [line for line in err.splitlines() if "warning" not in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _resume_argv(run: Path, root: Path, *extra: str) -> list[str]:
    """The options `tiny_run` was trained with, then --resume and `extra`."""
    return ["--data", str(root), "--run-dir", str(run), "--epochs", "2", "--limit-train", "256",
            "--eval-batch-size", "64", "--resume", *extra]


def _tamper(run: Path, change: Any) -> Path:
    """Rewrite the run's checkpoint with `change(state)` applied to what it holds."""
    from ferkit.runs import read_checkpoint, write_checkpoint

    path = run / "checkpoint.safetensors"
    state = read_checkpoint(path)
    change(state)
    write_checkpoint(path, state)
    return path


class Exploit:
    """Unpickling this would create a file: proof that something unpickled the checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _hostile_pickle(path: Path, marker: Path) -> None:
    torch.save({"model": Exploit(marker)}, path)


CORRUPTIONS: dict[str, Any] = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "header only": lambda p: p.write_bytes(p.read_bytes()[:2000]),
    "random bytes": lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)),
    "weights file, not a checkpoint": lambda p: p.write_bytes((p.parent / "last.safetensors").read_bytes()),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_resume_from_an_unreadable_checkpoint_is_one_clear_line(
    kind: str, run_copy: Path, small_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = run_copy / "checkpoint.safetensors"
    assert path.is_file()
    CORRUPTIONS[kind](path)
    code, _, err = _train_cli(capsys, *_resume_argv(run_copy, small_root))
    _assert_one_line_error(code, err, f"ferkit: error: {path}: ")


def test_resume_from_a_pickle_never_unpickles_it(
    run_copy: Path, small_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    path = run_copy / "checkpoint.safetensors"
    _hostile_pickle(path, marker)
    code, _, err = _train_cli(capsys, *_resume_argv(run_copy, small_root))
    _assert_one_line_error(code, err, f"ferkit: error: {path}: ", "pickle")
    assert not marker.exists()


def test_a_ferkit_0_1_checkpoint_is_refused_without_unpickling(
    run_copy: Path, small_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    (run_copy / "checkpoint.safetensors").unlink()
    old = run_copy / "checkpoint.pt"
    _hostile_pickle(old, marker)
    code, _, err = _train_cli(capsys, *_resume_argv(run_copy, small_root))
    _assert_one_line_error(code, err, f"ferkit: error: {old}: ", "ferkit 0.1")
    assert not marker.exists()
    # A new run will not overwrite it either.
    code, _, err = _train_cli(capsys, *_resume_argv(run_copy, small_root)[:-1])
    _assert_one_line_error(code, err, "already holds a run")


def _shape(state: dict[str, Any]) -> None:
    name = sorted(state["model"])[-1]
    state["model"][name] = torch.zeros(*state["model"][name].shape, 2)


TAMPERINGS: dict[str, Any] = {
    "a model tensor of the wrong shape": _shape,
    "a model tensor missing": lambda s: s["model"].pop(sorted(s["model"])[0]),
    "an optimizer state of the wrong shape": lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(2)),
    "an optimizer group too many": lambda s: s["optimizer"]["param_groups"].append(s["optimizer"]["param_groups"][0]),
    "a learning rate that is text": lambda s: s["optimizer"]["param_groups"][0].update(lr="fast"),
    "a scheduler that replaces its optimizer": lambda s: s["scheduler"].update(optimizer=1),
    "history that is not a list": lambda s: s.update(history="all of it"),
    "history rows without numbers": lambda s: s["history"][0].update(val_acc="high"),
    "an epoch count unlike its history": lambda s: s.update(epoch=7),
    "no config": lambda s: s.pop("config"),
}


@pytest.mark.parametrize("kind", list(TAMPERINGS))
def test_resume_from_a_checkpoint_that_does_not_fit_is_one_clear_line(
    kind: str, run_copy: Path, small_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _tamper(run_copy, TAMPERINGS[kind])
    before = {p.name: p.read_bytes() for p in run_copy.iterdir()}
    code, _, err = _train_cli(capsys, *_resume_argv(run_copy, small_root, "--epochs", "3"))
    _assert_one_line_error(code, err, f"ferkit: error: {path}: ")
    assert {p.name: p.read_bytes() for p in run_copy.iterdir()} == before  # refused before training


def test_resume_rebuilds_metrics_csv_from_the_checkpoint(run_copy: Path, small_data: FerData) -> None:
    """A kill between the checkpoint and metrics.csv of the last epoch: resuming restores the row."""
    history = read_metrics_csv(run_copy / "metrics.csv")
    lines = (run_copy / "metrics.csv").read_text().splitlines()
    (run_copy / "metrics.csv").write_text("\n".join(lines[:2]) + "\n")  # epoch 2's row lost
    (run_copy / "test_metrics.json").unlink()  # the run had not finished
    fit(TrainConfig(run_dir=str(run_copy), epochs=2, limit_train=256, eval_batch_size=64, progress=False,
                    resume=True), small_data)
    assert read_metrics_csv(run_copy / "metrics.csv") == history
    assert (run_copy / "test_metrics.json").is_file()


@pytest.mark.parametrize(("flag", "value", "saved"), [
    ("--batch-size", "32", "64"), ("--batch-size", "128", "64"), ("--lr", "0.01", "0.001"), ("--seed", "3", "0"),
    ("--limit-train", "200", "256"), ("--optimizer", "sgd", "adam"), ("--schedule", "onecycle", "plateau"),
    ("--plateau-patience", "5", "2"), ("--ema-decay", "0.99", "0.0"), ("--arch", "resnet", "refcnn"),
])
def test_resume_refuses_a_changed_field_of_the_runs_state(
    flag: str, value: str, saved: str, run_copy: Path, small_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p.name: p.read_bytes() for p in run_copy.iterdir()}
    code, _, err = _train_cli(capsys, *_resume_argv(run_copy, small_root, "--epochs", "3", flag, value))
    _assert_one_line_error(code, err, f"{flag} {saved} in the run, {value} now")
    assert {p.name: p.read_bytes() for p in run_copy.iterdir()} == before


def test_resume_names_every_changed_field_and_allows_the_others(
    run_copy: Path, small_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _train_cli(capsys, *_resume_argv(run_copy, small_root, "--batch-size", "16", "--lr", "0.01"))
    _assert_one_line_error(code, err, "--batch-size 64 in the run, 16 now", "--lr 0.001 in the run, 0.01 now")
    code, _, err = _train_cli(capsys, *_resume_argv(run_copy, small_root, "--epochs", "1"))
    _assert_one_line_error(code, err, "--epochs 1", "2 epochs")
    # Fields that the state does not depend on may change; --epochs may grow under the plateau schedule.
    code, out, err = _train_cli(capsys, *_resume_argv(run_copy, small_root, "--epochs", "3", "--eval-batch-size",
                                                      "21", "--hflip", "--no-amp"))
    assert code == 0, err
    assert "epoch   3/3" in out


def test_resume_refuses_more_epochs_of_a_one_cycle_run(tmp_path: Path, small_root: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "onecycle"
    argv = ["--data", str(small_root), "--run-dir", str(run), "--limit-train", "64", "--batch-size", "32",
            "--eval-batch-size", "64", "--schedule", "onecycle"]
    assert _train_cli(capsys, *argv, "--epochs", "1")[0] == 0
    code, _, err = _train_cli(capsys, *argv, "--epochs", "2", "--resume")
    _assert_one_line_error(code, err, "--epochs 1 in the run, 2 now")
    code, _, err = _train_cli(capsys, *argv, "--epochs", "1", "--batch-size", "16", "--resume")
    _assert_one_line_error(code, err, "--batch-size 32 in the run, 16 now")


def test_resume_refuses_other_data(run_copy: Path, tiny_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _train_cli(capsys, *_resume_argv(run_copy, tiny_root, "--epochs", "3"))
    _assert_one_line_error(code, err, "data", "sha256")


@pytest.mark.parametrize("argv", [
    ["--labels", "bogus"], ["--views", "3"], ["--optimizer", "rmsprop"], ["--schedule", "step"],
])
def test_bad_choices_are_refused_by_the_parser(argv: list[str], tmp_path: Path, small_root: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _train_cli(capsys, "--data", str(small_root), "--run-dir", str(tmp_path / "run"), *argv)
    assert code == 2 and "Traceback" not in err, err
    assert f"argument {argv[0]}: invalid choice" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("argv", "needle"), [
    (["--batch-size", "0"], "--batch-size must be"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be"),
    (["--epochs", "0"], "--epochs must be"),
    (["--epochs", "-1"], "--epochs must be"),
    (["--limit-train", "-5"], "--limit-train must be"),
    (["--lr", "nan"], "--lr must be"),
    (["--lr", "-0.1"], "--lr must be"),
    (["--momentum", "1.5"], "--momentum must be"),
    (["--plateau-factor", "2"], "--plateau-factor must be"),
    (["--label-smoothing", "1"], "--label-smoothing must be"),
    (["--erasing", "-1"], "--erasing must be"),
    (["--ema-decay", "1"], "--ema-decay must be"),
    (["--shift-pixels", "-2"], "--shift-pixels must be"),
    (["--seed", "-1"], "--seed must be"),
    (["--arch", "nope"], "unknown architecture 'nope'"),
    (["--preset", "nope"], "unknown preset 'nope'"),
])
def test_bad_values_are_refused_before_anything_runs(argv: list[str], needle: str, tmp_path: Path,
                                                     small_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _train_cli(capsys, "--data", str(small_root), "--run-dir", str(tmp_path / "run"), *argv)
    _assert_one_line_error(code, err, needle)
    assert "ferkit: training" not in out
    assert not (tmp_path / "run").exists()


def test_validate_names_every_problem_and_checks_types() -> None:
    with pytest.raises(ValueError, match=r"--batch-size must be .*; --lr must be"):
        TrainConfig(batch_size=0, lr=0).validate()
    with pytest.raises(ValueError, match="--epochs must be a whole number"):
        TrainConfig(epochs=2.5).validate()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--hflip must be true or false"):
        TrainConfig(augment=AugmentConfig(hflip="no")).validate()  # type: ignore[arg-type]
    TrainConfig().validate()
    for name in ("reference", "fast", "accurate", "student"):
        TrainConfig.from_preset(name).validate()
    # From Python as from the CLI, a device this machine lacks is refused with the devices it has.
    with pytest.raises(ValueError, match=r"device 'gpu' is not a device ferkit runs on.*this machine has: .*cpu"):
        TrainConfig(device="gpu").validate()


RECORDED_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "docs" / "results").glob("*/config.json"))


@pytest.mark.parametrize("path", RECORDED_CONFIGS, ids=lambda p: p.parent.name)
def test_configs_recorded_before_augment_held_its_options_still_load(path: Path) -> None:
    """config.json (and checkpoints, and the weights' recipe) record one flat value per option, as they did when
    TrainConfig repeated AugmentConfig's fields: old records load, resume and record back the same values."""
    from ferkit.train import Distributed, _check_unchanged, upgrade_config

    recorded = upgrade_config(json.loads(path.read_text())["config"])
    config = TrainConfig.from_dict(recorded)
    assert config.augment.hflip == recorded["hflip"] and config.augment.erasing == recorded["erasing"]
    assert config.augment.mixup == recorded["mixup"]
    again = config.to_dict()
    assert {k: again[k] for k in recorded} == recorded
    _check_unchanged({"config": recorded, "epoch": 1}, config, Distributed(), path)  # resumable: nothing changed


def test_augmentation_flags_keep_their_names_and_fill_the_nested_config() -> None:
    from ferkit import cli

    args = cli.build_parser().parse_args(["train", "--preset", "fast", "--erasing", "0.3", "--blur", "0.2",
                                          "--mixup", "0.1", "--no-hflip", "--lr", "0.01"])
    options = cli.given_options(TrainConfig, args)
    assert options == {"preset": "fast", "erasing": 0.3, "blur": 0.2, "mixup": 0.1, "hflip": False, "lr": 0.01}
    config = TrainConfig.from_preset(options.pop("preset"), **options)
    assert config.augment == AugmentConfig(hflip=False, rotate_degrees=10.0, shift_pixels=3, erasing=0.3, blur=0.2,
                                           mixup=0.1)  # shift_pixels 3: the fast preset's
    assert config.lr == 0.01 and config.preset == "fast"
    with pytest.raises(TypeError, match="unexpected keyword argument 'blurr'"):
        TrainConfig.from_preset("fast", blurr=0.2)
    # From Python the nested form works too, flat names on top of it; dataclasses.asdict's nesting loads back.
    nested = TrainConfig.from_preset("fast", augment=AugmentConfig(blur=0.5, noise=0.1), noise=0.2)
    # A whole AugmentConfig replaces the preset's augmentation (its shift_pixels 3 too); flat names win over it.
    assert (nested.augment.blur, nested.augment.noise, nested.augment.shift_pixels) == (0.5, 0.2, 0)
    assert TrainConfig.from_dict(dataclasses.asdict(config)) == config


def test_a_file_as_run_dir_is_refused_before_training(tmp_path: Path, small_root: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for run in (blocker, blocker / "run"):
        code, out, err = _train_cli(capsys, "--data", str(small_root), "--run-dir", str(run), "--epochs", "1",
                                    "--limit-train", "32")
        _assert_one_line_error(code, err, f"ferkit: error: {run}: ", "not a folder")
        assert "epoch" not in out
    assert blocker.read_text() == "not a folder"


def _error_when_unprivileged(work: Any) -> str:
    """`work()`'s exception as 'Type: message' ('' if none), raised in a forked child that drops root.

    Root writes into read-only folders regardless of their mode, so as root the child becomes nobody.
    """
    import os

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            work()
            result = ""
        except Exception as err:
            result = f"{type(err).__name__}: {err}"
        os.write(write, result.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        result = pipe.read().decode()
    os.waitpid(pid, 0)
    return result


def test_a_read_only_run_dir_is_refused_before_training(small_data: FerData) -> None:
    import os
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="ferkit-ro-"))
    try:
        os.chmod(base, 0o755)
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        os.chmod(locked, 0o555)
        for run in (locked, locked / "run"):
            started = time.perf_counter()
            error = _error_when_unprivileged(lambda run=run: fit(_config(run, epochs=1), small_data))
            assert error.startswith("RunDirError: ") and f"{run}: cannot write in {locked}" in error, error
            assert time.perf_counter() - started < 5  # refused before the first epoch
    finally:
        os.chmod(base / "locked", 0o755)
        shutil.rmtree(base)


def test_stale_temporary_files_are_removed_and_live_ones_kept(run_copy: Path, small_data: FerData) -> None:
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [run_copy / f".checkpoint.safetensors.tmp{dead.pid}", run_copy / f".metrics.csv.tmp{dead.pid}",
                 run_copy / f".last.safetensors.tmp{dead.pid}"]
        live = run_copy / f".checkpoint.safetensors.tmp{alive.pid}"
        for path in [*stale, live]:
            path.write_bytes(b"partial")
        other = run_copy / "notes.tmp1"
        other.write_text("the user's")
        fit(_config(run_copy, epochs=2, limit_train=256, batch_size=64, resume=True), small_data)
        assert not any(path.exists() for path in stale)
        assert live.exists() and other.exists()
    finally:
        alive.kill()
        alive.wait()


def test_a_kill_in_the_first_checkpoint_write_leaves_no_half_run(
    tmp_path: Path, small_data: FerData, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    real_replace = os.replace

    def dying_replace(src: Any, dst: Any) -> None:
        if Path(dst).name.startswith("checkpoint"):
            raise KeyboardInterrupt  # killed just before the checkpoint's rename
        real_replace(src, dst)

    run = tmp_path / "run"
    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        fit(_config(run, epochs=2), small_data)
    monkeypatch.undo()
    # Nothing that looks like a finished epoch: no weights, and resume says there is nothing to resume.
    left = sorted(p.name for p in run.iterdir()) if run.exists() else []
    assert not [name for name in left if not name.startswith(".")], left
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        fit(_config(run, epochs=2, resume=True), small_data)
    fit(_config(run, epochs=2), small_data)
    assert len(read_metrics_csv(run / "metrics.csv")) == 2


def test_init_none_starts_a_preset_that_fine_tunes_at_random() -> None:
    from ferkit import cli

    def init_of(*flags: str) -> str | None:
        options = cli.given_options(TrainConfig, cli.build_parser().parse_args(["train", "--preset", "ferplus",
                                                                                *flags]))
        return TrainConfig.from_preset(options.pop("preset"), **options).init

    assert init_of() == "ferkit-resnet"
    assert init_of("--init", "none") is None and init_of("--init", "None") is None
    assert init_of("--init", "runs/other") == "runs/other"
