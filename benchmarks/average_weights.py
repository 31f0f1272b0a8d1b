"""Average the weights of runs fine-tuned from the same start into one model (`ferkit.weights.average_weights`).

    python benchmarks/average_weights.py --output soup.safetensors runs/ferplus/best.safetensors=0.75 \\
        runs/ferplus-40/best.safetensors=0.25

The share of each part is chosen on the validation split (evaluate the averages, pick the best); then
calibrate the average (`ferkit calibrate`) and score it, as any other weights file.
"""

from __future__ import annotations

import argparse

from ferkit.weights import average_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="+", metavar="FILE=SHARE", help="a weights file and its share")
    parser.add_argument("--output", required=True, help="the averaged weights file to write")
    args = parser.parse_args()
    parts = {}
    for part in args.parts:
        path, _, share = part.rpartition("=")
        parts[path] = float(share)
    meta = average_weights(parts, args.output)
    print(f"{args.output}: {meta.arch}, {len(meta.classes)} classes, average of "
          + ", ".join(f"{p['file']} x {p['share']:g}" for p in meta.recipe["average_of"]))


if __name__ == "__main__":
    main()
