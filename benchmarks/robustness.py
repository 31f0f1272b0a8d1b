"""Robustness of shipped models on PrivateTest under ferkit's seeded corruptions, all models in one run.

Each model is scored with its own test-time views and calibration by `ferkit.evaluate.evaluate_weights`
(the same code as `ferkit evaluate --corruptions`): clean accuracy, the mean over 9 corruptions x 5
severities, and each corruption's mean. With `--record DIR` the figures go into the metadata of a copy
of each weights file, `DIR/<model>.safetensors`, where `ferkit models` reads them once it is copied
over the shipped one (no command writes into the installed package).

    .venv/bin/python benchmarks/robustness.py --data ../shared/data/fer2013 \\
        --models ferkit-resnet-robust ferkit-resnet --output docs/results/robustness/robustness.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from ferkit.evaluate import evaluate_weights


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return " ".join(flag for flag in wanted if f" {flag}" in flags)


def score(model: str, data: str | None, record: Path | None) -> dict[str, Any]:
    started = time.perf_counter()
    report = evaluate_weights(model, data, "test", corruptions=True, record=record is not None,
                              output=str(record / f"{model}.safetensors") if record is not None else None)
    bench = report.corruptions
    assert bench is not None
    return {"model": model, "views": report.views, "clean_accuracy": bench.clean_accuracy,
            "mean_corruption_accuracy": bench.mean_corruption_accuracy, "per_corruption": bench.per_corruption,
            "per_severity": bench.per_severity, "seconds": time.perf_counter() - started}


def table(rows: list[dict[str, Any]]) -> str:
    names = list(rows[0]["per_corruption"])
    lines = ["| model | views | clean | mean corrupted | " + " | ".join(names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for row in rows:
        cells = [f"{100 * row['per_corruption'][n]:.2f}" for n in names]
        lines.append(f"| {row['model']} | {row['views']} | {100 * row['clean_accuracy']:.2f} | "
                     f"{100 * row['mean_corruption_accuracy']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="FER-2013 source (default: $FERKIT_DATA)")
    parser.add_argument("--models", nargs="+", default=["ferkit-resnet-robust", "ferkit-resnet"])
    parser.add_argument("--record", type=Path, metavar="DIR",
                        help="store the figures in the metadata of a copy of each weights file, in DIR")
    parser.add_argument("--output", type=Path, help="write the JSON here")
    args = parser.parse_args()
    print(f"cpu: {platform.machine()} {cpu_flags()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
          flush=True)
    rows = []
    for model in args.models:
        rows.append(score(model, args.data, args.record))
        print(f"{model}: clean {100 * rows[-1]['clean_accuracy']:.2f}%, mean corrupted "
              f"{100 * rows[-1]['mean_corruption_accuracy']:.2f}% ({rows[-1]['seconds']:.0f} s)", flush=True)
    print(table(rows))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"cpu": cpu_flags(), "torch": torch.__version__, "models": rows}, indent=2))


if __name__ == "__main__":
    main()
