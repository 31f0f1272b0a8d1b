"""How fast the `ferkit` command answers: `ferkit --help`, a one-photo `ferkit predict`, `ferkit models`.

Each command runs as a new process, as a person types it (the console script beside this Python, else
`python -m ferkit`), 5 times after one warm-up run (which also fills the detector cache); the median
wall time of each is reported with every run's. Run it alone on the machine (`cpu-alone` here):

    python benchmarks/cli_latency.py --out docs/results/cli/cli_latency.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "examples" / "astronaut.jpg"
TARGETS = {"help": 0.5, "predict": 1.5, "models": 3.0}
"""The wall seconds each command must answer in (issue 31)."""


def ferkit_command() -> list[str]:
    script = Path(sys.executable).parent / "ferkit"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ferkit"]


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ferkit = ferkit_command()
    commands = {"help": [*ferkit, "--help"], "predict": [*ferkit, "predict", "--no-progress", str(PHOTO)],
                "models": [*ferkit, "models"]}
    report: dict[str, object] = {"python": platform.python_version(), "ferkit": " ".join(ferkit), "runs": args.runs}
    for name, argv in commands.items():
        wall(argv)  # warm-up: the OS's file cache, the detector cache
        times = [wall(argv) for _ in range(args.runs)]
        median = statistics.median(times)
        report[name] = {"command": " ".join(argv).replace(str(ROOT) + "/", ""), "median_s": round(median, 3),
                        "runs_s": [round(t, 3) for t in times], "target_s": TARGETS[name],
                        "met": median <= TARGETS[name]}
        print(f"{name:<8} median {median:.3f} s over {args.runs} runs (target {TARGETS[name]} s): "
              + " ".join(f"{t:.3f}" for t in times), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
