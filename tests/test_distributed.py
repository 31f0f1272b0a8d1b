"""Distributed training: `torchrun --nproc_per_node=2 -m ferkit train` on the CPU (gloo) against one process.

The runs train the reference CNN on 700 real faces (--limit-train 700 of 110 of every class) and score 210
validation and 210 test faces (30 of every class). Both take the same global batches, 32 images a step:
16 on each of two ranks against 32 in one process (see `test_ranks_split_every_batch_of_one_process`),
so they should learn about equally. Runs are deterministic on one machine; across seeds, best validation /
test accuracy after 4 epochs (chance is 0.143) measured:

    seed  autocast   one process    torchrun x2
    0     bf16       0.281 / 0.281  0.262 / 0.310   (this is the test's run, the same on every repeat)
    1     bf16       0.290 / 0.286  0.300 / 0.290
    2     bf16       0.305 / 0.276  0.310 / 0.281
    3     bf16       0.295 / 0.295  0.286 / 0.271
    0     float32    0.257 / 0.333  0.271 / 0.324   (--no-amp: CPUs without bf16 train in float32)
    1     float32    0.305 / 0.290  0.310 / 0.238

The lowest is 0.238, so both must clear 0.2 (42 of 210 right: a chance-level model does that with
probability about 1%). The two runs differ by at most 0.052; the tolerance of 0.1 is about twice that,
and a little over two standard errors of the difference of two independent accuracies on 210 images
(sqrt(2 * 0.28 * 0.72 / 210) = 0.044). About 40 s on a busy 2-core machine.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import build_subset
from ferkit.data import load_fer2013
from ferkit.evaluate import compute_metrics
from ferkit.inference import predict_logits
from ferkit.runs import read_checkpoint, read_metrics_csv
from ferkit.train import Distributed, shard_order
from ferkit.weights import load_model

EPOCHS = 4
RUN_FILES = {"best.safetensors", "last.safetensors", "checkpoint.safetensors", "metrics.csv", "test_metrics.json",
             "curves.png", "confusion_matrix_test.png", "config.json"}
# Rotation off and a learning rate below the reference's 1e-3: a few hundred faces learn within 4 epochs.
RECIPE = ["--limit-train", "700", "--rotate-degrees", "0", "--lr", "3e-4", "--eval-batch-size", "256",
          "--device", "cpu", "--no-progress"]
ABOVE_CHANCE = 0.2
TOLERANCE = 0.1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}", *args]


def _run(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _epoch_lines(stdout: str) -> list[str]:
    """The 'epoch   3/4' that opens each epoch's line."""
    return [match.group(0) for line in stdout.splitlines() if (match := re.match(r"epoch +\d+/\d+", line))]


RECORDER = '''
import hashlib, json, os, pathlib, sys
import torch, torch.distributed as dist
from ferkit import train
from ferkit.cli import main

plateau_losses, built = [], {}
Plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
plateau_step = Plateau.step
def step(self, metrics, *args, **kwargs):
    plateau_losses.append(float(metrics))
    return plateau_step(self, metrics, *args, **kwargs)
Plateau.step = step

build_optimizer = train.build_optimizer
def recording_build_optimizer(config, model):
    built["model"], built["optimizer"] = model, build_optimizer(config, model)
    return built["optimizer"]
train.build_optimizer = recording_build_optimizer

# Each rank writes its own file. Gathering the states with all_gather_object, a collective fit()
# itself never makes, once ended in an abort at exit after a finished run ("terminate called
# without an active exception"), a known way for gloo to fail when work outlives the interpreter.
destroy = dist.destroy_process_group
def report_and_destroy(*args, **kwargs):
    weights = torch.cat([p.detach().flatten() for p in built["model"].parameters()]).numpy().tobytes()
    state = {"plateau_losses": plateau_losses, "lr": built["optimizer"].param_groups[0]["lr"],
             "weights": hashlib.sha256(weights).hexdigest()}
    out = pathlib.Path(os.environ["RANK_STATES"]) / f"{dist.get_rank()}.json"
    out.write_text(json.dumps(state))
    return destroy(*args, **kwargs)
dist.destroy_process_group = report_and_destroy
sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict[str, Any]:
    """One process for 4 epochs, and under torchrun 2 epochs then --resume to 4, side by side."""
    base = tmp_path_factory.mktemp("ddp")
    root = build_subset(base / "fer2013", {"Training": 110, "PublicTest": 30, "PrivateTest": 30}, data_root)
    cwd = base / "cwd"  # an empty working folder: nothing may land here
    cwd.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FERKIT_CACHE": str(base / "cache")}
    env.pop("FERKIT_DATA", None)
    train = ["-m", "ferkit", "train", "--data", str(root), *RECIPE]
    single_dir, ddp_dir = base / "single", base / "ddp"

    single = subprocess.Popen([sys.executable, *train, "--run-dir", str(single_dir), "--epochs", str(EPOCHS),
                               "--batch-size", "32"], env=env, cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        first = _run(_torchrun(*train, "--run-dir", str(ddp_dir), "--epochs", "2", "--batch-size", "16"), env, cwd)
        after_first = {"files": sorted(p.name for p in ddp_dir.iterdir()),
                       "metrics": read_metrics_csv(ddp_dir / "metrics.csv"),
                       "test": json.loads((ddp_dir / "test_metrics.json").read_text())}
        # The resumed run goes through the same CLI, wrapped to report each rank's state at the end.
        recorder = base / "record_ranks.py"
        recorder.write_text(RECORDER)
        rank_states = base / "rank_states"
        rank_states.mkdir()
        resumed = _run(_torchrun(str(recorder), *train[2:], "--run-dir", str(ddp_dir), "--epochs", str(EPOCHS),
                                 "--batch-size", "16", "--resume"), {**env, "RANK_STATES": str(rank_states)}, cwd)
        single_out, single_err = single.communicate(timeout=300)
    finally:
        if single.poll() is None:
            single.kill()
            single.wait()
    assert single.returncode == 0, single_err
    return {"root": root, "cache": base / "cache", "cwd": cwd, "single": single_dir, "ddp": ddp_dir,
            "single_stdout": single_out, "first": first, "after_first": after_first, "resumed": resumed,
            "rank_states": [json.loads((rank_states / f"{rank}.json").read_text()) for rank in range(2)]}


@pytest.mark.slow
def test_only_rank_0_writes_files_and_prints(runs: dict[str, Any]) -> None:
    first, resumed = runs["first"].stdout, runs["resumed"].stdout
    assert first.count("ferkit: training") == 1
    assert "on cpu x2 (" in first and ", 700 images, epochs 1..2 -> " in first
    assert _epoch_lines(first) == ["epoch   1/2", "epoch   2/2"]  # once per epoch, not once per rank
    assert first.count("ferkit: best epoch") == 1
    assert runs["after_first"]["files"] == sorted(RUN_FILES)  # no second copy, no temporary file
    assert [row["epoch"] for row in runs["after_first"]["metrics"]] == [1.0, 2.0]

    assert resumed.count("ferkit: training") == 1 and ", epochs 3..4 -> " in resumed
    assert _epoch_lines(resumed) == ["epoch   3/4", "epoch   4/4"]
    assert sorted(p.name for p in runs["ddp"].iterdir()) == sorted(RUN_FILES)
    assert sorted(p.name for p in runs["single"].iterdir()) == sorted(RUN_FILES)
    assert list(runs["cwd"].iterdir()) == []  # no rank wrote anything in its working folder
    assert _epoch_lines(runs["single_stdout"]) == [f"epoch   {e}/{EPOCHS}" for e in range(1, EPOCHS + 1)]
    assert "on cpu x1 (" in runs["single_stdout"]


@pytest.mark.slow
def test_resume_under_torchrun_continues_from_the_saved_epoch(runs: dict[str, Any]) -> None:
    history = read_metrics_csv(runs["ddp"] / "metrics.csv")
    assert [row["epoch"] for row in history] == [1.0, 2.0, 3.0, 4.0]
    assert history[:2] == runs["after_first"]["metrics"]  # the first two epochs were kept, not redone
    assert history[3]["train_loss"] < history[0]["train_loss"]
    checkpoint = read_checkpoint(runs["ddp"] / "checkpoint.safetensors")
    assert checkpoint["epoch"] == EPOCHS and len(checkpoint["history"]) == EPOCHS
    assert checkpoint["config"]["resume"] and checkpoint["config"]["batch_size"] == 16
    # The saved state dict is the plain model's: no "module." prefix from DistributedDataParallel.
    assert not any(name.startswith("module.") for name in checkpoint["model"])
    assert checkpoint["best_val_acc"] == max(row["val_acc"] for row in history)


@pytest.mark.slow
def test_torchrun_weights_load_and_score_what_training_reported(runs: dict[str, Any]) -> None:
    data = load_fer2013(runs["root"], cache_dir=runs["cache"])
    for run in ("ddp", "single"):
        model, meta = load_model(runs[run] / "best.safetensors")
        assert meta.arch == "refcnn" and 1 <= meta.epoch <= EPOCHS
        report = json.loads((runs[run] / "test_metrics.json").read_text())
        assert report["best_epoch"] == meta.epoch and report["num_images"] == 210
        test = compute_metrics(predict_logits(model, data["test"].images), data["test"].labels)
        assert test.accuracy == report["accuracy"]
        last, _ = load_model(runs[run] / "last.safetensors")
        val = compute_metrics(predict_logits(last, data["val"].images), data["val"].labels)
        assert val.accuracy == read_metrics_csv(runs[run] / "metrics.csv")[-1]["val_acc"]


@pytest.mark.slow
def test_torchrun_learns_as_well_as_one_process(runs: dict[str, Any]) -> None:
    scores = {}
    for run in ("single", "ddp"):
        history = read_metrics_csv(runs[run] / "metrics.csv")
        test = json.loads((runs[run] / "test_metrics.json").read_text())["accuracy"]
        scores[run] = (max(row["val_acc"] for row in history), test)
        assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.1, (run, history)
    (val_single, test_single), (val_ddp, test_ddp) = scores["single"], scores["ddp"]
    assert min(val_single, val_ddp, test_single, test_ddp) >= ABOVE_CHANCE, scores
    assert abs(val_single - val_ddp) <= TOLERANCE, scores
    assert abs(test_single - test_ddp) <= TOLERANCE, scores


@pytest.mark.slow
def test_every_rank_ends_with_the_same_weights_and_schedule(runs: dict[str, Any]) -> None:
    """Each rank's BatchNorm statistics end an epoch on its own last batch, so each rank scores the
    validation split a little differently; the plateau schedule must still decide alike on all ranks,
    or their learning rates and then their weights drift apart."""
    rank0, rank1 = runs["rank_states"]
    assert len(rank0["plateau_losses"]) == 2  # the resumed epochs 3 and 4
    assert rank0 == rank1


# ---------------------------------------------------------------------------------------------
# Sharding


@pytest.mark.parametrize(("length", "world_size"), [(12, 2), (13, 2), (10, 3), (5, 4), (3, 4), (700, 2)])
def test_shard_order_splits_a_shuffle_into_equal_disjoint_shards(length: int, world_size: int) -> None:
    order = torch.randperm(length, generator=torch.Generator().manual_seed(length))
    shards = [shard_order(order, Distributed(rank, world_size, rank)) for rank in range(world_size)]
    per_rank = -(-length // world_size)
    assert all(len(shard) == per_rank for shard in shards)  # every rank takes the same number of steps
    taken = torch.cat(shards)
    assert set(taken.tolist()) == set(order.tolist())  # together they cover the whole shuffle
    padding = per_rank * world_size - length
    assert len(taken) - len(set(taken.tolist())) == padding  # and repeat only the padding
    # The padding wraps around to the start of the shuffle: rank r takes positions r, r + W, ...
    padded = torch.cat([order, order[:padding]])
    for rank, shard in enumerate(shards):
        assert torch.equal(shard, padded[rank::world_size])
    assert torch.equal(shard_order(order, Distributed()), order)


def test_ranks_split_every_batch_of_one_process() -> None:
    """With a per-rank batch of b, step k of all ranks together is step k of one process with batch W * b."""
    order = torch.randperm(700, generator=torch.Generator().manual_seed(0))
    shards = [shard_order(order, Distributed(rank, 2, rank)) for rank in range(2)]
    for k in range(-(-350 // 16)):
        together = torch.cat([shard[16 * k : 16 * (k + 1)] for shard in shards])
        assert sorted(together.tolist()) == sorted(order[32 * k : 32 * (k + 1)].tolist())
