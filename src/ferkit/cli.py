"""The `ferkit` command: subcommands that map one to one onto the library's functions and configs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from .data import DataError
from .labels import EMOTIONS, SPLITS
from .weights import WeightsError


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_type: type) -> None:
    """One --option per dataclass field, with its help and the reference default.

    Options not given stay out of the namespace, so that a preset can fill them in.
    """
    for f in dataclasses.fields(config_type):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})".strip()
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)


def given_options(config_type: type, args: argparse.Namespace) -> dict[str, Any]:
    """The dataclass fields that the command line set explicitly."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_type) if hasattr(args, f.name)}


def cmd_data_info(args: argparse.Namespace) -> int:
    from .data import load_fer2013, summarize

    summary = summarize(load_fer2013(args.data, use_cache=not args.no_cache))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"source: {summary['source']} ({summary['format']}{', from cache' if summary['from_cache'] else ''})")
    header = f"{'split':<6} {'usage':<12}" + "".join(f"{name:>9}" for name in EMOTIONS) + f"{'total':>9}"
    print(header)
    for split, info in summary["splits"].items():  # type: ignore[attr-defined]
        counts = "".join(f"{n:>9}" for n in info["per_class"].values())
        print(f"{split:<6} {info['usage']:<12}{counts}{info['total']:>9}")
    dup = summary["duplicates"]
    print(f"converted to 48x48 grayscale: {summary['converted']}")
    print(f"exact duplicates: {dup['groups']} groups, {dup['extra_copies']} extra copies; within splits "  # type: ignore[index]
          f"{dup['within_split_extra_copies']}; {dup['cross_split_groups']} groups span splits "  # type: ignore[index]
          f"{dup['cross_split_groups_by_splits']}; {dup['groups_with_conflicting_labels']} with conflicting labels")  # type: ignore[index]
    for note in summary["notes"]:  # type: ignore[attr-defined]
        print(f"note: {note}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, fit

    options = given_options(TrainConfig, args)
    fit(TrainConfig.from_preset(options.pop("preset", "seed"), **options))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_weights

    report = evaluate_weights(args.weights, args.data, args.split, out=args.out, device=args.device, tta=args.tta)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['weights']} on {report['split']} ({report['num_images']} images): "
          f"accuracy {100 * report['accuracy']:.2f}%, loss {report['loss']:.4f}, macro F1 {report['macro_f1']:.4f}")
    print(f"{'class':<10}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
    for name, m in report["per_class"].items():
        print(f"{name:<10}{m['precision']:>10.3f}{m['recall']:>10.3f}{m['f1']:>10.3f}{m['support']:>9}")
    for figure in report["figures"]:
        print(f"wrote {figure}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .train import TrainConfig

    parser = argparse.ArgumentParser(prog="ferkit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    data_parser = commands.add_parser("data", help="inspect a FER-2013 source")
    data = data_parser.add_subparsers(dest="data_command", required=True)
    info = data.add_parser("info", help="per-split, per-class counts and duplicates")
    info.add_argument("--data", help="FER-2013 source (default: $FERKIT_DATA or ./data/fer2013)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--no-cache", action="store_true", help="decode the source again, ignoring the cache")
    info.set_defaults(func=cmd_data_info)

    train = commands.add_parser("train", help="train a model")
    add_dataclass_arguments(train, TrainConfig)
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("evaluate", help="score weights on a split")
    evaluate.add_argument("--weights", default="default", help="weights file, run folder or shipped model name")
    evaluate.add_argument("--data", help="FER-2013 source (default: $FERKIT_DATA or ./data/fer2013)")
    evaluate.add_argument("--split", choices=SPLITS, default="test")
    evaluate.add_argument("--out", help="folder for the figures (default: the run folder, else ./ferkit-eval)")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--tta", choices=["auto", "none", "flip", "crops"], default="auto",
                          help="test-time augmentation (auto: what the weights were selected with)")
    evaluate.add_argument("--json", action="store_true", help="print JSON")
    evaluate.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (DataError, WeightsError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"ferkit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ferkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
