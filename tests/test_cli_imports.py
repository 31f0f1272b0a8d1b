"""The `ferkit` command answers at once: each command imports only what it needs (issue 31).

`ferkit --help` builds no command's options, `ferkit predict` on the CPU runs the shipped model's ONNX twin
without importing torch, and `ferkit models` reads the stored sizes and speeds; the times themselves are
`benchmarks/cli_latency.py`'s (docs/results/cli/).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ferkit.catalog import describe_shipped_models, measure_model, stored_catalog
from ferkit.metadata import shipped_models

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "examples" / "astronaut.jpg"


def _modules_after(argv: list[str]) -> tuple[int, set[str], str]:
    """Run `ferkit ARGV` in a fresh interpreter; its exit status, the modules it imported, and its stdout."""
    code = (f"import sys\nfrom ferkit import cli\ntry:\n    status = cli.main({argv!r})\nexcept SystemExit as end:\n"
            "    status = end.code\nprint('\\nMODULES', ' '.join(sorted(sys.modules)))\nsys.exit(status)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    out, _, modules = done.stdout.rpartition("\nMODULES ")
    return done.returncode, set(modules.split()), out


def test_help_builds_no_command() -> None:
    status, modules, out = _modules_after(["--help"])
    assert status == 0 and "predict" in out and "serve" in out
    assert not {"torch", "ferkit.train", "ferkit.data", "cv2", "ferkit.serve"} & modules


def test_a_photo_on_the_cpu_runs_without_torch() -> None:
    status, modules, out = _modules_after(["predict", "--no-progress", "--device", "cpu", "--json", str(PHOTO)])
    (record,) = json.loads(out)
    assert status == 0 and len(record["faces"]) == 1 and record["faces"][0]["label"] == "happy"
    assert "onnxruntime" in modules and "torch" not in modules and "ferkit.train" not in modules


def test_models_reads_the_stored_figures_without_torch() -> None:
    status, modules, out = _modules_after(["models", "--json"])
    rows = json.loads(out)
    assert status == 0 and "torch" not in modules
    assert {r["name"] for r in rows} == set(shipped_models())
    assert all(r["speed_source"] == "stored" and r["crops_per_s"] > 0 and r["speed_machine"] for r in rows)


@pytest.mark.slow
def test_the_stored_sizes_are_the_models() -> None:
    """What catalog.json stores for each shipped file is what its model counts now (speed aside)."""
    stored = stored_catalog()["models"]
    assert set(stored) == set(shipped_models())
    for name, path in shipped_models().items():
        measured = measure_model(path, speed_seconds=0)
        assert {k: stored[name][k] for k in ("parameters", "macs", "bytes")} == {
            k: measured[k] for k in ("parameters", "macs", "bytes")}, name
    rows = describe_shipped_models(speed_seconds=0.1)
    assert all(r["speed_source"] == "measured here" and r["crops_per_s"] > 0 for r in rows)


def test_the_numpy_confidence_step_is_the_graphs() -> None:
    """The prediction path applies a confidence step in numpy (no torch); exported graphs hold torch's: the same."""
    import numpy as np
    import torch

    from ferkit.inference import confidence_step as in_torch
    from ferkit.preprocessing import confidence_step as in_numpy

    logits = np.random.default_rng(0).normal(0, 3, (500, 7))
    logits[:5, 1] = logits[:5, 0]  # ties for the top
    knots, values = np.array([0.0, 0.3, 0.6, 1.0]), np.array([0.1, 0.25, 0.55, 0.85])
    expected = in_torch(torch.from_numpy(logits), torch.from_numpy(knots), torch.from_numpy(values)).numpy()
    np.testing.assert_allclose(in_numpy(logits, knots, values), expected, rtol=0, atol=1e-12)
