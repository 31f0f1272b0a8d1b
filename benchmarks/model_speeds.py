"""Measure the shipped models once and store what `ferkit models` shows: parameters, multiply-adds, crops/s.

`ferkit models` reads src/ferkit/catalog.json instead of loading PyTorch and every model each time; this
script writes it (run it alone on the machine, as `cpu-alone` does here, when a shipped model changes):

    python benchmarks/model_speeds.py --seconds 2 --out src/ferkit/catalog.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from ferkit.catalog import measure_model
from ferkit.metadata import shipped_models


def cpu_name() -> str:
    """The CPU's model name and widest vector extension (Linux), else what platform says."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name or platform.machine()} ({vector})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time spent measuring each model")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    models = {name: measure_model(path, args.seconds) for name, path in sorted(shipped_models().items())}
    for figures in models.values():
        figures["crops_per_s"] = round(figures["crops_per_s"], 1)
    threads = torch.get_num_threads()
    record = {"machine": f"{cpu_name()}, {threads} thread{'s' * (threads != 1)}, torch {torch.__version__}",
              "command": "python " + " ".join(sys.argv), "models": models}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
