"""Does an exported default model say what `ferkit predict` says? (issue 31)

Exports the shipped default with `ferkit export` (its default prior, and `--prior train`), runs each graph on
1,000 FER-2013 PrivateTest crops with onnxruntime and numpy alone (no ferkit, no torch in this process), and
compares the argmax with the labels `ferkit predict --no-detect --json` prints for the same files.

    python benchmarks/export_prior_check.py --data ../shared/data/fer2013 --out docs/results/cli/export_prior.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image


def ferkit(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "ferkit", *args], check=True, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the FER-2013 image folder (test/<class>/PrivateTest_*.jpg)")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    every = sorted(Path(args.data, "test").glob("*/PrivateTest_*.jpg"))
    step = len(every) // args.count
    files = every[::step][: args.count]
    crops = np.stack([np.asarray(Image.open(p).convert("L")) for p in files])
    predicted = [r["faces"][0]["label"] for r in json.loads(ferkit("predict", "--no-detect", "--no-progress",
                                                                      "--json", *map(str, files)))]
    report: dict[str, object] = {"command": " ".join(sys.argv), "crops": len(files),
                                 "first": str(files[0].relative_to(args.data)), "step": step}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("default", []), ("train", ["--prior", "train"])):
            out = Path(tmp) / f"{name}.onnx"
            said = ferkit("export", "--output", str(out), "--check-images", "0", *extra)
            report[f"export_{name}_says"] = said.strip()
            session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            custom = session.get_modelmeta().custom_metadata_map
            classes = json.loads(custom["ferkit"])["classes"]
            labels = [classes[k] for k in session.run(None, {"input": crops[:, None]})[0].argmax(1)]
            same = sum(a == b for a, b in zip(labels, predicted, strict=True))
            report[f"export_{name}"] = {"prior_in_metadata": json.loads(custom["ferkit_export"]).get("prior"),
                                        "same_labels_as_predict": same, "agreement": round(same / len(files), 4)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
