"""Kill `ferkit train` with SIGKILL again and again, resume it each time: it must end as an unbroken run does.

A real run (3 epochs of 128 real faces, on the CPU with one thread, so that it is bit-for-bit
reproducible) is killed at moments that matter, each in a fresh process: halfway through writing
the first checkpoint, just after a checkpoint (before the weights, `metrics.csv` and `config.json`),
just before `metrics.csv`, halfway through a later checkpoint, at a seeded random time, and while
the figures are drawn at the end. The kills inside the program come from a small wrapper around
`ferkit.cli.main` that patches the writers to SIGKILL their own process, so that they hit the same
spot on every machine; the random one comes from outside. After each kill the run continues with
`--resume` (or, where no epoch had finished, starts again without it, as `ferkit` asks). At the end
its `metrics.csv` (all but the timings), `test_metrics.json`, checkpoint and best/last weights must
equal those of an unbroken run, which trains meanwhile on the other core. About a minute on a busy
2-core machine.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ferkit.runs import CHECKPOINT, TEMP_FILE, read_checkpoint, read_metrics_csv
from ferkit.weights import read_meta

RECIPE = ["--limit-train", "128", "--epochs", "3", "--batch-size", "32", "--eval-batch-size", "64",
          "--device", "cpu", "--no-progress"]
TIMINGS = {"images_per_s", "seconds"}

KILLER = '''
"""ferkit train that SIGKILLs itself at POINT, the Nth time it gets there: python killer.py POINT N ARGS..."""
import os, signal, sys
from ferkit import runs, train
from ferkit.cli import main

point, nth = sys.argv[1], int(sys.argv[2])
seen = {}

def reached(name):
    seen[name] = seen.get(name, 0) + 1
    if name == point and seen[name] == nth:
        os.kill(os.getpid(), signal.SIGKILL)

write_bytes_atomic = runs.write_bytes_atomic
def patched_write(path, blob):
    if path.name == runs.CHECKPOINT and point == "inside-checkpoint" and seen.get(point, 0) + 1 == nth:
        path.parent.mkdir(parents=True, exist_ok=True)  # the first checkpoint may be the run folder's first file
        path.with_name(f".{path.name}.tmp{os.getpid()}").write_bytes(blob[: len(blob) // 2])
    if path.name == runs.CHECKPOINT:
        reached("inside-checkpoint")
    result = write_bytes_atomic(path, blob)
    if path.name == runs.CHECKPOINT:
        reached("after-checkpoint")
    return result
runs.write_bytes_atomic = patched_write

write_metrics_csv = train.write_metrics_csv
def patched_metrics(*args, **kwargs):
    reached("before-metrics")
    return write_metrics_csv(*args, **kwargs)
train.write_metrics_csv = patched_metrics

plot_curves = train.plot_curves
def patched_plot(*args, **kwargs):
    reached("in-finish")
    return plot_curves(*args, **kwargs)
train.plot_curves = patched_plot

sys.exit(main(sys.argv[3:]))
'''

# (where the process dies, the how-manieth time it gets there there); "timed": SIGKILL from outside.
KILLS = [("inside-checkpoint", 1), ("after-checkpoint", 1), ("before-metrics", 2), ("inside-checkpoint", 1),
         ("timed", 0), ("in-finish", 1)]


def _env(base: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FERKIT_CACHE": str(base / "cache")}
    env.pop("FERKIT_DATA", None)
    return env


def _temp_files(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if TEMP_FILE.match(p.name)) if run.exists() else []


@pytest.mark.slow
def test_a_run_killed_at_many_moments_ends_as_an_unbroken_one(tmp_path: Path, small_root: Path) -> None:
    env, killer = _env(tmp_path), tmp_path / "killer.py"
    killer.write_text(KILLER)
    train = ["train", "--data", str(small_root), *RECIPE]
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    reference = subprocess.Popen([sys.executable, "-m", "ferkit", *train, "--run-dir", str(unbroken)], env=env,
                                 cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rng = random.Random(11)
    log, left = [], []
    try:
        for point, nth in [*KILLS, ("none", 0)]:
            resume = ["--resume"] if (broken / CHECKPOINT).exists() else []
            before = _temp_files(broken)
            command = [sys.executable, str(killer), point, str(nth), *train, "--run-dir", str(broken), *resume]
            started = time.perf_counter()
            proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
            delay = rng.uniform(2.0, 12.0) if point == "timed" else 300.0
            try:
                out, err = proc.communicate(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                out, err = proc.communicate()
            log.append(f"{point} {nth} {resume}: exit {proc.returncode} after {time.perf_counter() - started:.1f}s\n"
                       f"{out}{err}")
            assert "Traceback" not in err, "\n".join(log)
            if point == "none":
                assert proc.returncode == 0, "\n".join(log)
            elif point != "timed":
                assert proc.returncode == -signal.SIGKILL, "\n".join(log)
            if point != "timed":  # what a killed writer left is cleared by the next process
                assert not set(before) & set(_temp_files(broken)), (before, log[-1])
            left.append(sorted(p.name for p in broken.iterdir()))
        out, err = reference.communicate(timeout=300)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    assert reference.returncode == 0, err
    # Killed in the first checkpoint: no file claims a finished epoch. Killed just after it: the
    # checkpoint alone, from which the resumed run makes the weights, metrics.csv and config.json.
    assert len(left[0]) == 1 and TEMP_FILE.match(left[0][0]), left[0]
    assert left[1] == [CHECKPOINT], left[1]
    assert _temp_files(broken) == []

    files = sorted(p.name for p in unbroken.iterdir())
    assert sorted(p.name for p in broken.iterdir()) == files
    expected, got = read_metrics_csv(unbroken / "metrics.csv"), read_metrics_csv(broken / "metrics.csv")
    assert [{k: v for k, v in row.items() if k not in TIMINGS} for row in got] == [
        {k: v for k, v in row.items() if k not in TIMINGS} for row in expected]
    assert [row["epoch"] for row in got] == [1.0, 2.0, 3.0]
    assert json.loads((broken / "test_metrics.json").read_text()) == json.loads(
        (unbroken / "test_metrics.json").read_text())
    for name in ("best.safetensors", "last.safetensors"):
        a, b = load_file(unbroken / name), load_file(broken / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert (read_meta(broken / name).epoch, read_meta(broken / name).metrics) == (
            read_meta(unbroken / name).epoch, read_meta(unbroken / name).metrics)
    a_state, b_state = read_checkpoint(unbroken / CHECKPOINT), read_checkpoint(broken / CHECKPOINT)
    assert a_state["epoch"] == b_state["epoch"] == 3
    for part in ("model", "optimizer"):
        a_tensors, b_tensors = _tensors(a_state[part]), _tensors(b_state[part])
        assert a_tensors.keys() == b_tensors.keys() and all(torch.equal(a_tensors[k], b_tensors[k])
                                                            for k in a_tensors), part
    assert a_state["scheduler"] == b_state["scheduler"]


def _tensors(value: object, where: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested state dict, by its path."""
    if isinstance(value, torch.Tensor):
        return {where: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else []
    return {k: t for key, v in items for k, t in _tensors(v, f"{where}/{key}").items()}
