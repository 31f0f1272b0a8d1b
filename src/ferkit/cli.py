"""The `ferkit` command: subcommands that map one to one onto the library's functions and configs."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .deprecations import RENAMES, OldNameWarning, resolve, views_from_tta
from .errors import EXIT_USAGE, FerkitError, RunError, UsageError
from .labels import SPLITS


def option_fields(config_type: type) -> list[dataclasses.Field[Any]]:
    """A dataclass's fields, those of a nested config (a field whose default is a dataclass, such as
    `TrainConfig.augment`) in its place: one --option each."""
    found: list[dataclasses.Field[Any]] = []
    for f in dataclasses.fields(config_type):
        nested = f.default_factory
        found += option_fields(nested) if isinstance(nested, type) and dataclasses.is_dataclass(nested) else [f]
    return found


def optional_text(value: str) -> str | None:
    """An option that may be unset: `none` unsets it, e.g. a preset's `--init` (a path named none: ./none)."""
    return None if value.lower() == "none" else value


OPTION_PARSERS: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str | None": optional_text}


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_type: type) -> None:
    """One --option per dataclass field (nested configs' fields included), with its help and the reference default.

    Options not given stay out of the namespace, so that a preset can fill them in.
    """
    for f in option_fields(config_type):
        flag = "--" + f.name.replace("_", "-")
        default = "none" if f.default is dataclasses.MISSING or f.default is None else f.default
        help_text = f.metadata.get("help", "")
        if "(default:" not in help_text:  # a help that says its default itself, e.g. "(default: $FERKIT_DATA)"
            help_text = f"{help_text} (default: {default})".strip()
        if f.metadata.get("repeatable"):
            parser.add_argument(flag, action="append", default=argparse.SUPPRESS, help=help_text)
        elif f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            kind = OPTION_PARSERS.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text,
                                choices=f.metadata.get("choices"))



Subcommands = argparse._SubParsersAction  # what `add_subparsers` returns, to which each command adds its parser


class OldOption(argparse.Action):
    """An option's old name (`ferkit.deprecations`): sets the new option's value and warns once; not in --help.

    Where both names are given the new one wins, as everywhere: a new option given later overwrites the value,
    and one given earlier is kept (given means its value is not its default object, which argparse puts in
    the namespace first).
    """

    def __init__(self, option_strings: Sequence[str], dest: str, kind: str = "", new_default: Any = None,
                 **kwargs: Any) -> None:
        self.kind, self.new_default = kind, new_default
        kwargs["default"] = argparse.SUPPRESS  # the new option's default (or a preset's value) stays in force
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        resolve(self.kind, option_string or self.option_strings[0])
        current = getattr(namespace, self.dest, argparse.SUPPRESS)
        if current is argparse.SUPPRESS or current is self.new_default:
            setattr(namespace, self.dest, values)


OLD_OPTION_TYPES: dict[str, Callable[[str], Any]] = {"--views": views_from_tta, "--detect-max-side": int}
"""How an old option's value becomes its new option's, by the new option's name (default: as given)."""


def add_old_options(parser: argparse.ArgumentParser, command: str) -> None:
    """The old names of `ferkit COMMAND`'s options, from the one table of old names."""
    kind = f"ferkit {command} option"
    for old, new in RENAMES[kind].items():
        dest = new.removeprefix("--").replace("-", "_")
        parser.add_argument(old, dest=dest, action=OldOption, kind=kind, new_default=parser.get_default(dest),
                            type=OLD_OPTION_TYPES.get(new, str))


def add_views_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    from .preprocessing import VIEW_COUNTS

    parser.add_argument("--views", type=int, choices=VIEW_COUNTS, help=help_text)


def given_options(config_type: type, args: argparse.Namespace) -> dict[str, Any]:
    """The options (`option_fields`) that the command line set explicitly, by name."""
    return {f.name: getattr(args, f.name) for f in option_fields(config_type) if hasattr(args, f.name)}


def cmd_data_info(args: argparse.Namespace) -> int:
    from .data import load_fer2013, summarize
    from .ferplus import vote_statistics

    data = load_fer2013(args.data, use_cache=not args.no_cache, votes=args.votes)
    summary = summarize(data)
    if any(part.votes is not None for part in data.splits.values()):
        summary.votes = vote_statistics(data)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
        return 0
    print(f"source: {summary.source} ({summary.format}{', from cache' if summary.from_cache else ''})")
    if summary.labels == "votes":
        print("per-class counts: each face's plurality of the FER+ votes (a face with none counts in the total only)")
    classes = next(iter(summary.splits.values()))["per_class"]
    header = f"{'split':<6} {'usage':<12}" + "".join(f"{name:>9}" for name in classes) + f"{'total':>9}"
    print(header)
    for split, info in summary.splits.items():
        counts = "".join(f"{n:>9}" for n in info["per_class"].values())
        print(f"{split:<6} {info['usage']:<12}{counts}{info['total']:>9}")
    dup = summary.duplicates
    print(f"converted to 48x48 grayscale: {summary.converted}")
    print(f"exact duplicates: {dup['groups']} groups, {dup['extra_copies']} extra copies; within splits "
          f"{dup['within_split_extra_copies']}; {dup['cross_split_groups']} groups span splits "
          f"{dup['cross_split_groups_by_splits']}; {dup['groups_with_conflicting_labels']} with conflicting labels")
    for note in summary.notes:
        print(f"note: {note}")
    if summary.votes is not None:
        print_vote_statistics(summary.votes)
    return 0


def print_vote_statistics(votes: dict[str, Any]) -> None:
    """FER+ votes per split: faces each scheme keeps, vote entropy, agreement with FER-2013's labels."""
    print("FER+ votes: faces each scheme keeps (single votes removed first), mean entropy of the votes in bits, "
          "and how often FER-2013's label names the FER+ majority (where FER-2013's labels are known):")
    print(f"{'split':<6}{'faces':>7}{'majority':>10}{'plurality':>11}{'distrib.':>10}{'entropy':>9}{'agree':>8}")
    for split, info in votes.items():
        kept = info["kept"]
        agree = info.get("fer2013_agreement", {}).get("overall")
        print(f"{split:<6}{info['faces']:>7}{kept['ferplus-majority']:>10}{kept['ferplus-plurality']:>11}"
              f"{kept['ferplus-distribution']:>10}{info['mean_vote_entropy_bits']:>9.3f}"
              f"{'' if agree is None else f'{100 * agree:.1f}%':>8}")
        if agree is not None:
            per = info["fer2013_agreement"]["per_fer2013_class"]
            print("       FER-2013 label = FER+ majority, per FER-2013 class: "
                  + ", ".join(f"{name} {100 * share:.1f}%" for name, share in per.items()))



def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, fit

    if "device" in args:  # a device this machine lacks stops here, saying what it has (not after loading the data)
        from .devices import pick_device

        pick_device(args.device)
    options = given_options(TrainConfig, args)
    if options.get("resume"):
        fit(TrainConfig.for_resume(**options))
    else:
        fit(TrainConfig.from_preset(options.pop("preset", "reference"), **options))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_weights

    if args.output and not args.record:
        raise UsageError("evaluate --output FILE is where --record writes the weights: add --record, or drop --output")
    report = evaluate_weights(args.weights, args.data, args.split, figures_dir=args.figures_dir, device=args.device,
                              views=args.views, prior=args.prior, corruptions=args.corruptions,
                              severities=tuple(args.severities) if args.severities else None, record=args.record,
                              output=args.output, votes=args.votes)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(f"{report.weights} on {report.split} ({report.num_images} images, {report.views} view(s), "
          f"prior {report.prior}): accuracy {100 * report.accuracy:.2f}%, balanced accuracy "
          f"{100 * report.balanced_accuracy:.2f}%, loss {report.loss:.4f}, macro F1 {report.macro_f1:.4f}")
    calibration = f"temperature {report.temperature:.3f}" + (" and map" if report.calibration_map else "")
    print(f"calibration: ECE {report.ece:.4f} with {calibration} ({report.ece_at_temperature_1:.4f} without)")
    for name, m in (report.priors or {}).items():
        print(f"prior {name:<8}{' (predict default)' if name == report.default_prior else '':<18} accuracy "
              f"{100 * m['accuracy']:.2f}%, balanced {100 * m['balanced_accuracy']:.2f}%, ECE {m['ece']:.4f}, "
              f"ECE on a uniform class mix {m['ece_uniform_mix']:.4f}")
    print(f"{'class':<10}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
    for name, c in report.per_class.items():
        print(f"{name:<10}{c['precision']:>10.3f}{c['recall']:>10.3f}{c['f1']:>10.3f}{c['support']:>9}")
    if report.corruptions is not None:
        bench = report.corruptions
        print(f"robustness: clean {100 * bench.clean_accuracy:.2f}%, mean over corruptions "
              f"{100 * bench.mean_corruption_accuracy:.2f}%")
        print(f"{'corruption':<16}{'mean':>8}" + "".join(f"{'s' + str(s):>8}" for s in bench.severities))
        for name, mean in bench.per_corruption.items():
            per = bench.per_severity[name]
            print(f"{name:<16}{100 * mean:>8.2f}" + "".join(f"{100 * per[str(s)]:>8.2f}" for s in bench.severities))
    if report.ferplus is not None:
        fp = report.ferplus
        print(f"FER+ votes, over {len(fp.classes)} classes: majority accuracy {100 * fp.majority_accuracy:.2f}% "
              f"({fp.majority_faces} faces; balanced {100 * fp.majority_balanced_accuracy:.2f}%, ECE "
              f"{fp.majority_ece:.4f}), plurality accuracy {100 * fp.plurality_accuracy:.2f}% "
              f"({fp.plurality_faces} faces), NLL {fp.distribution_nll:.4f} and KL {fp.distribution_kl:.4f} "
              f"to the vote distributions ({fp.distribution_faces} faces)")
    for figure in report.figures:
        print(f"wrote {figure}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .evaluate import calibrate_weights

    result = calibrate_weights(args.weights, args.data, args.output, device=args.device, calibration_map=args.map,
                               strength=args.strength, confidence_step=args.confidence_step)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for row in result["cross_validation"] or []:
        step = "+ confidence step" if row["confidence_step"] else ""
        print(f"cross-validated on val: {row['family']:<12} strength {row['strength']:<7g} {step:<17} "
              f"NLL {row['cv_nll']:.4f} ECE {row['cv_ece']:.4f} accuracy {100 * row['cv_accuracy']:.2f}%")
    strength = "" if result["strength"] is None else f" (strength {result['strength']:g})"
    step = " and confidence step" if result["confidence_step"] else ""
    print(f"{result['map']} map{strength}{step}, temperature {result['temperature']:.4f}, fitted on val "
          f"({result['num_images']} images): NLL {result['val_nll_before']:.4f} -> {result['val_nll_after']:.4f}, "
          f"ECE {result['val_ece_before']:.4f} -> {result['val_ece_after']:.4f}; wrote {result['output']}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .catalog import describe_shipped_models

    seconds = args.speed_seconds if args.speed_seconds is not None else 1.0 if args.speed else 0.0
    rows = describe_shipped_models(speed_seconds=seconds)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max([len(r["name"]) + 2 for r in rows] + [16])
    print(f"{'model':<{width}}{'arch':<8}{'params':>10}{'MACs':>9}{'views':>6}{'classes':>8}{'test acc':>10}"
          f"{'bal. acc':>10}{'ECE':>7}{'corr. acc':>10}{'crops/s':>9}  test set")
    for r in rows:
        def pct(key: str, row: dict[str, Any] = r) -> str:
            return "-" if row.get(key) is None else f"{100 * row[key]:.2f}"

        crops = "-" if r.get("crops_per_s") is None else f"{r['crops_per_s']:.0f}"
        ece = "-" if r.get("test_ece") is None else f"{r['test_ece']:.3f}"
        print(f"{r['name'] + ('*' if r['default'] else ''):<{width}}{r['arch']:<8}{r['parameters']:>10,}"
              f"{r['macs'] / 1e6:>8.1f}M{r['views']:>6}{len(r['classes']):>8}{pct('test_accuracy'):>10}"
              f"{pct('test_balanced_accuracy'):>10}{ece:>7}{pct('mean_corruption_accuracy'):>10}{crops:>9}"
              f"  {r['benchmark']}")
    stored = next((r["speed_machine"] for r in rows if r["speed_source"] == "stored"), None)
    speed = ("crops/s measured now, on this machine" if seconds else f"crops/s as measured once, on {stored} "
             "(--speed: measure here)" if stored else "crops/s measured here")
    print(f"Accuracies on each model's test set, from each file's metadata; {speed} (PyTorch, batches of 256).")
    default = next(r for r in rows if r["default"])
    print(f"* the default, {default['name']}: {default['default_reason']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import EmotionRecognizer
    from .predict_files import predict_command

    if (args.camera is None) == (not args.paths):
        raise UsageError("give image or video PATHs, or --camera INDEX (not both)")
    if args.engine == "ray":
        return predict_on_ray(args)
    recognizer = EmotionRecognizer(args.weights, device=args.device, detect=not args.no_detect, detector=args.detector,
                                   min_face=args.min_face, detect_max_side=args.detect_max_side or None,
                                   max_pixels=args.max_pixels or None, batch_size=args.batch_size, prior=args.prior)
    if args.camera is not None:
        from .video import run_camera

        run_camera(recognizer, args.camera, args.every, smooth=args.smooth)
        return 0
    if args.output is not None:
        if args.tracks_only:
            raise UsageError("--tracks-only is for the printed table and CSV; with --output, --summary FILE writes "
                             "the track summaries")
        return predict_to_table(args, recognizer)
    for option in ("summary", "resume", "workers"):
        if getattr(args, option) not in (None, False):
            raise UsageError(f"--{option} goes with --output FILE (a results table)")
    fmt = "json" if args.json else "csv" if args.csv else "table"
    return predict_command(recognizer, args.paths, fmt, args.every, args.annotate, False if args.no_progress else None,
                           smooth=args.smooth, timeline=args.timeline, tracks_only=args.tracks_only)


def predict_on_ray(args: argparse.Namespace) -> int:
    """`ferkit predict PATH... --engine ray --output OUT`: the Ray engine (`ferkit.scale`), which imports Ray."""
    from .scale import ray_command

    for option in ("annotate", "timeline"):
        if getattr(args, option) is not None:
            raise UsageError(f"--{option} is not done by --engine ray; leave it out, or use the local engine")
    options = {"weights": args.weights, "device": args.device, "detect": not args.no_detect, "detector": args.detector,
               "min_face": args.min_face, "detect_max_side": args.detect_max_side or None,
               "max_pixels": args.max_pixels or None, "batch_size": args.batch_size, "prior": args.prior}
    return ray_command(args.paths, args.output, progress=False if args.no_progress else None,
                       recognizer_options=options, summary=args.summary, resume=args.resume,
                       concurrency=args.workers, address=args.ray_address, every=args.every, smooth=args.smooth)


def predict_to_table(args: argparse.Namespace, recognizer: Any) -> int:
    """`ferkit predict PATH... --output FILE`: the local engine into a results table."""
    from .faces import make_detector
    from .local import predict_table, report
    from .sources import expand_inputs

    for option in ("annotate", "timeline"):
        if getattr(args, option) is not None:
            raise UsageError(f"--{option} goes with the table, --csv or --json on stdout, not --output")
    if args.tracks_only:
        raise UsageError("--tracks-only goes with the table on stdout; with --output, --summary FILE holds the tracks")
    if args.every < 1:
        raise UsageError(f"--every must be at least 1, not {args.every}")
    if args.smooth < 0:
        raise UsageError(f"--smooth must be 0 (off) or more seconds, not {args.smooth}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be at least 1, not {args.workers}")
    detector = ((lambda: make_detector(args.detector, args.min_face, args.detect_max_side or None))
                if not args.no_detect else (lambda: None))
    counts = predict_table(recognizer, expand_inputs(args.paths), args.output, summary=args.summary,
                           resume=args.resume, workers=args.workers, every=args.every, smooth=args.smooth,
                           make_detector=detector, progress=False if args.no_progress else None)
    return report(counts, recognizer.detector)


def parity_images(data: str | None, count: int) -> tuple[Any, str]:
    """`count` FER-2013 test images for export's parity check, spread over the split, and what they are.

    Without data (no --data, no $FERKIT_DATA, no ./data/fer2013), seeded synthetic crops, with a note
    saying so; data that was named but does not load is an error, as in every other command.
    """
    from .data import DataError, load_fer2013
    from .export import synthetic_crops

    try:
        test = load_fer2013(data)["test"]
    except DataError as err:
        if data is not None or os.environ.get("FERKIT_DATA"):
            raise
        print(f"ferkit: note: no FER-2013 test images ({err}); parity checked on synthetic images", file=sys.stderr)
        return synthetic_crops(count), "synthetic images (seeded noise and gradients)"
    return test.images[:: max(len(test) // count, 1)][:count], "test images"


def cmd_export(args: argparse.Namespace) -> int:
    from .export import PARITY_TOLERANCE, check_parity, check_writable, export_model, format_for, read_export_info

    if not args.output:
        raise UsageError("ferkit export needs --output FILE (.onnx or .pt)")
    format_for(args.output, args.format)
    check_writable(Path(args.output))
    # The check's images before the export, so that bad --data stops the command before anything is written.
    images, what = parity_images(args.data, args.check_images) if args.check_images > 0 else (None, "")
    out = export_model(args.weights, args.output, args.format, views=args.views, opset=args.opset, prior=args.prior)
    _, info = read_export_info(out)
    print(f"wrote {out} ({info['format']}{', opset ' + str(info['opset']) if info.get('opset') else ''}, "
          f"{info['views']} view{'s' * (info['views'] > 1)}, {info['prior']} prior, from {info['source']})")
    if images is None:
        return 0
    diff = check_parity(args.weights, out, images)
    verdict = "ok" if diff <= PARITY_TOLERANCE else "MISMATCH"
    print(f"parity with PyTorch on {len(images)} {what}: max |logit difference| {diff:.2e} "
          f"(tolerance {PARITY_TOLERANCE:.0e}): {verdict}")
    if diff > PARITY_TOLERANCE:
        raise RunError(f"{out}: its logits differ from PyTorch's by up to {diff:.2e}, over the tolerance "
                       f"{PARITY_TOLERANCE:.0e}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ServeConfig, make_recognizer, resolve_api_key, serve

    config = ServeConfig(weights=args.weights, device=args.device, detector=args.detector, min_face=args.min_face,
                         detect_max_side=args.detect_max_side or None, host=args.host, port=args.port,
                         workers=args.workers, api_key=resolve_api_key(args.api_key),
                         max_file_bytes=round(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels,
                         max_files=args.max_files, batch_window_ms=0 if args.no_batching else args.batch_window_ms,
                         max_batch=args.max_batch, max_pending=args.max_pending, timeout_s=args.timeout,
                         max_request_pixels=args.max_request_pixels, max_decode_mb=args.max_decode_mb,
                         body_timeout_s=args.body_timeout, header_timeout_s=args.header_timeout,
                         allowed_hosts=tuple(h for h in args.allowed_hosts.split(",") if h.strip()),
                         decode_timeout_s=args.decode_timeout, max_inflight_mb=args.max_inflight_mb,
                         limit_concurrency=args.limit_concurrency, max_streams_per_client=args.max_streams,
                         forwarded_allow_ips=tuple(h.strip() for h in args.forwarded_allow_ips.split(",") if h.strip()))
    problem = config.problem()
    if problem:
        raise UsageError(problem)
    # Loaded before the server starts, so that bad weights stop here with exit status 2.
    recognizer = make_recognizer(config)
    print(f"ferkit: serving {recognizer.backend.path.name} on http://{config.host}:{config.port}/ "
          f"({'API key required' if config.api_key else 'no API key'}; batching "
          f"{f'{config.batch_window_ms:g} ms, up to {config.max_batch} faces' if config.batch_window_ms else 'off'})",
          file=sys.stderr)
    serve(config, recognizer, log_level=args.log_level)
    return 0


EXIT_STATUS = ("exit status: 0 success; 1 some input failed (predict) or a parity check failed (export); 2 bad usage, "
               "bad input or a file that cannot be read or written; 70 a bug (--debug shows its traceback); 130 "
               "interrupted")


COMMAND_HELP = {
    "data": "inspect a FER-2013 source",
    "train": "train a model",
    "evaluate": "score weights on a split",
    "calibrate": "fit a calibration map on the validation split into the weights",
    "models": "the shipped models: size, speed, accuracy, calibration, robustness",
    "predict": "emotions of the faces in photos, folders, videos or a camera",
    "export": "export weights to ONNX or TorchScript",
    "serve": "the HTTP API and a web page (needs the serve extra)",
}
"""Each command's line in `ferkit --help`, known without building (or importing) the command."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """`ferkit`'s arguments: one subparser per command, each built by its own function below.

    `only`: build that command's options alone (the others are listed by name and help; "": none): each command's
    options import what it needs (training's config, the detector's defaults, the service), and a command
    should pay only for its own, so that `ferkit --help` and `ferkit predict` answer at once.
    """
    parser = argparse.ArgumentParser(prog="ferkit", description=__doc__, epilog=EXIT_STATUS)
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of any error (also: {DEBUG_ENV}=1); put it before the command")
    commands = parser.add_subparsers(dest="command", required=True)
    adders = {"data": add_data_parser, "train": add_train_parser, "evaluate": add_evaluate_parser,
              "calibrate": add_calibrate_parser, "models": add_models_parser, "predict": add_predict_parser,
              "export": add_export_parser, "serve": add_serve_parser}
    for name, add in adders.items():
        if only is None or name == only:
            add(commands)
        else:
            commands.add_parser(name, help=COMMAND_HELP[name])
    return parser


def command_of(argv: Sequence[str]) -> str | None:
    """The command an argument list names (the first argument that is not an option), if it is one of ferkit's."""
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    return first if first in COMMAND_HELP else None


def add_data_parser(commands: Subcommands) -> None:
    """`ferkit data info`."""
    data_parser = commands.add_parser("data", help=COMMAND_HELP["data"])
    data = data_parser.add_subparsers(dest="data_command", required=True)
    info = data.add_parser("info", help="per-split, per-class counts and duplicates")
    info.add_argument("--data", help="FER-2013 or FER+ source (default: $FERKIT_DATA or ./data/fer2013)")
    info.add_argument("--votes", help="FER+'s fer2013new.csv, joined by row position with a fer2013.csv --data")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--no-cache", action="store_true", help="decode the source again, ignoring the cache")
    info.set_defaults(func=cmd_data_info)


def add_train_parser(commands: Subcommands) -> None:
    """`ferkit train`: one option per `TrainConfig` field."""
    from .train import TrainConfig

    train = commands.add_parser("train", help=COMMAND_HELP["train"])
    add_dataclass_arguments(train, TrainConfig)
    add_old_options(train, "train")
    train.set_defaults(func=cmd_train)


def add_evaluate_parser(commands: Subcommands) -> None:
    """`ferkit evaluate`."""
    from .preprocessing import PRIORS

    evaluate = commands.add_parser("evaluate", help=COMMAND_HELP["evaluate"])
    evaluate.add_argument("--weights", default="default", help="weights file, run folder or shipped model name")
    evaluate.add_argument("--data", help="FER-2013 or FER+ source (default: $FERKIT_DATA or ./data/fer2013)")
    evaluate.add_argument("--votes", help="FER+'s fer2013new.csv, joined by row position with a fer2013.csv --data")
    evaluate.add_argument("--split", choices=SPLITS, default="test")
    evaluate.add_argument("--figures-dir", metavar="DIR",
                          help="write the figures (confusion matrix, reliability diagram; a run folder's curves) "
                               "into this folder (default: none)")
    evaluate.add_argument("--device", default="auto")
    add_views_argument(evaluate, "test-time views per face: 1, 2 or 10 (default: the weights' own)")
    evaluate.add_argument("--prior", choices=PRIORS, default="train",
                          help="the prior of the report, its figures and corruptions: train, as trained (default: "
                               "the test split has the training mix); uniform: FER-2013's class mix divided out "
                               "(predict's default). Accuracy, balanced accuracy and ECE are reported under both")
    evaluate.add_argument("--corruptions", action="store_true",
                          help="also score under the fixed, seeded corruptions of ferkit.corruptions (robustness)")
    evaluate.add_argument("--severities", type=int, nargs="+", choices=(1, 2, 3, 4, 5), metavar="S",
                          help="corruption severities to run (default: 1 2 3 4 5)")
    evaluate.add_argument("--record", action="store_true",
                          help="store the test figures (whole PrivateTest split only) in the weights' metadata "
                               "(shown by ferkit models)")
    evaluate.add_argument("--output", metavar="FILE", help="with --record: write the weights with the figures here "
                                                          "(default: in place; never into the installed package)")
    evaluate.add_argument("--json", action="store_true", help="print JSON")
    add_old_options(evaluate, "evaluate")
    evaluate.set_defaults(func=cmd_evaluate)


def add_calibrate_parser(commands: Subcommands) -> None:
    """`ferkit calibrate`."""
    calibrate = commands.add_parser("calibrate", help=COMMAND_HELP["calibrate"])
    calibrate.add_argument("--weights", default="default", help="weights file, run folder or shipped model name")
    calibrate.add_argument("--data", help="FER-2013 source (default: $FERKIT_DATA or ./data/fer2013)")
    calibrate.add_argument("--output", metavar="FILE", help="write the calibrated weights here (default: in place; "
                                                           "a shipped model needs one: the package is not written)")
    calibrate.add_argument("--map", default="auto", choices=("auto", "temperature", "vector", "matrix"),
                           help="temperature alone, or a vector / matrix map after it; auto (default): the one with "
                                "the lowest cross-validated ECE on the validation split")
    calibrate.add_argument("--strength", type=float, default=1e-3, metavar="L2",
                           help="vector / matrix: L2 regularisation towards the identity (default: 0.001; auto "
                                "chooses its own)")
    calibrate.add_argument("--confidence-step", default="auto", choices=("auto", "on", "off"),
                           help="after the map, recalibrate the top class's probability by centred isotonic "
                                "regression (the class ranking unchanged); auto (default): if it cross-validates "
                                "to a lower ECE")
    calibrate.add_argument("--device", default="auto")
    calibrate.add_argument("--json", action="store_true", help="print JSON")
    calibrate.set_defaults(func=cmd_calibrate)


def add_models_parser(commands: Subcommands) -> None:
    """`ferkit models`."""
    models = commands.add_parser("models", help=COMMAND_HELP["models"])
    models.add_argument("--speed", action="store_true",
                        help="measure each model's crops/s on this machine now (takes seconds: it loads PyTorch and "
                             "every model); without it, the speeds measured once and stored with ferkit")
    models.add_argument("--speed-seconds", type=float, metavar="S",
                        help="with --speed: time spent measuring each model (default: 1; 0: the stored speeds)")
    models.add_argument("--json", action="store_true", help="print JSON")
    models.set_defaults(func=cmd_models)


def add_predict_parser(commands: Subcommands) -> None:
    """`ferkit predict`."""
    from .faces import DEFAULT_DETECT_MAX_SIDE, DEFAULT_DETECTOR, DEFAULT_MIN_FACE
    from .images import DEFAULT_MAX_PIXELS
    from .preprocessing import DEFAULT_PRIOR, PRIORS
    from .tracking import DEFAULT_SMOOTH

    predict = commands.add_parser("predict", help=COMMAND_HELP["predict"],
                                  description="Exit status: 0 all inputs read, 1 some input failed, 2 usage error.")
    predict.add_argument("paths", nargs="*", metavar="PATH", help="image or video files, folders (recursive), globs")
    predict.add_argument("--weights", default="default",
                         help="weights file, run folder, shipped model name or exported .onnx (default: shipped)")
    output = predict.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="a JSON array, one object per input")
    output.add_argument("--csv", action="store_true", help="CSV, one row per face (or per input without faces)")
    output.add_argument("--output", "-o", metavar="FILE",
                        help="a results table, one row per face (per face per frame for videos); the suffix picks the "
                             "format: .parquet, .csv, .jsonl or .json. Written in parts as it goes (FILE.parts/), "
                             "merged into FILE at the end")
    predict.add_argument("--summary", metavar="FILE",
                         help="with --output: videos' track summaries into this table (same suffixes)")
    predict.add_argument("--resume", action="store_true",
                         help="with --output: continue FILE, skipping the inputs it holds (same path, size and "
                              "modification time); where FILE does not exist yet, start it")
    predict.add_argument("--workers", type=int, metavar="N",
                         help="with --output: threads that decode and find faces (default: the cores)")
    predict.add_argument("--engine", choices=("local", "ray"), default="local",
                         help="with --output: local (this machine, the default) or ray (Ray Data, on a local Ray or "
                              "the cluster of --ray-address; needs the ray extra; see docs/scale.md)")
    predict.add_argument("--ray-address", metavar="ADDR",
                         help="--engine ray: the Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    predict.add_argument("--annotate", metavar="DIR", help="write copies with boxes and labels drawn into DIR")
    predict.add_argument("--no-detect", action="store_true", help="inputs are face crops: no face detection")
    predict.add_argument("--every", type=int, default=1, metavar="N", help="videos: every Nth frame (default: 1)")
    predict.add_argument("--camera", type=int, metavar="INDEX", help="live window on this webcam (needs a display)")
    predict.add_argument("--smooth", type=float, default=DEFAULT_SMOOTH, metavar="SECONDS",
                         help="videos and cameras: average each tracked face's probabilities over this many seconds; "
                              f"the label is the smoothed one (default: {DEFAULT_SMOOTH:g}; 0: off; photos: never)")
    predict.add_argument("--timeline", metavar="PNG",
                         help="videos: draw each track's emotion probabilities over time into this PNG")
    predict.add_argument("--detector", default=DEFAULT_DETECTOR,
                         help=f"yunet (shipped), haar, a YuNet .onnx model or a Haar cascade .xml file "
                              f"(default: {DEFAULT_DETECTOR})")
    predict.add_argument("--min-face", type=int, default=DEFAULT_MIN_FACE, metavar="PX",
                         help=f"smallest face side in pixels (default: {DEFAULT_MIN_FACE})")
    predict.add_argument("--detect-max-side", type=int, default=DEFAULT_DETECT_MAX_SIDE, metavar="PX",
                         help=f"detect on images shrunk to this longer side (default: {DEFAULT_DETECT_MAX_SIDE}; "
                              "0: never)")
    predict.add_argument("--prior", choices=PRIORS,
                         help=f"uniform: FER-2013's class mix divided out, for faces whose emotions are not mixed like "
                              f"FER-2013's; train: probabilities under that mix, as trained (default: {DEFAULT_PRIOR}, "
                              "where the weights carry their class prior)")
    predict.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                         help=f"refuse image files with more pixels (default: {DEFAULT_MAX_PIXELS}; 0: no limit)")
    predict.add_argument("--tracks-only", action="store_true",
                         help="videos: only each track's summary (seen from, until, dominant emotion, shares of "
                              "time), not a row per sampled frame (table and CSV)")
    predict.add_argument("--device", default="auto",
                         help="where the model runs: auto (a GPU if there is one, else the CPU), cpu, cuda, cuda:N "
                              "or mps (default: auto)")
    predict.add_argument("--batch-size", type=int, default=512, metavar="N",
                         help="faces per model call; lower it if a GPU runs out of memory (default: 512)")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_old_options(predict, "predict")
    predict.set_defaults(func=cmd_predict)


def add_export_parser(commands: Subcommands) -> None:
    """`ferkit export`."""
    export = commands.add_parser("export", help=COMMAND_HELP["export"])
    export.add_argument("--weights", default="default", help="weights file, run folder or shipped model name")
    export.add_argument("--format", choices=["onnx", "torchscript"], help="(default: from the --output suffix)")
    export.add_argument("--output", metavar="FILE", help="the file to write (.onnx, .pt); required")
    add_views_argument(export, "test-time views built into the graph: 1, 2 or 10 (default: the weights' own)")
    export.add_argument("--prior", choices=("uniform", "train"),
                        help="the class prior of the graph's logits, stored in the file's metadata: uniform "
                             "(FER-2013's class mix divided out), or train, as trained (default: ferkit predict's, "
                             "so the graph's labels are predict's: uniform where the weights carry their class "
                             "prior)")
    export.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    export.add_argument("--data", help="FER-2013 source for the parity check (default: $FERKIT_DATA)")
    export.add_argument("--check-images", type=int, default=256, metavar="N",
                        help="compare with PyTorch on N test images (default: 256; 0: skip)")
    add_old_options(export, "export")
    export.set_defaults(func=cmd_export)


def add_serve_parser(commands: Subcommands) -> None:
    """`ferkit serve`: its defaults are `ServeConfig`'s."""
    from .serve import API_KEY_ENV, ServeConfig

    defaults = ServeConfig()
    serve = commands.add_parser("serve", help=COMMAND_HELP["serve"],
                                description="Serves POST /v1/predict, GET /v1/models, /healthz, /readyz, /metrics, "
                                            "/docs and the page at /. Exit status: 2 bad usage or weights.")
    serve.add_argument("--host", default=defaults.host, help=f"address to bind (default: {defaults.host}, this "
                                                             "machine only; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=defaults.port, help=f"(default: {defaults.port})")
    serve.add_argument("--weights", default="default",
                       help="weights file, run folder, shipped model name or exported .onnx (default: shipped)")
    serve.add_argument("--device", default="auto")
    serve.add_argument("--detector", default=defaults.detector,
                       help=f"yunet (shipped), haar, a YuNet .onnx model or a Haar cascade .xml file (default: "
                            f"{defaults.detector})")
    serve.add_argument("--min-face", type=int, default=defaults.min_face, metavar="PX",
                       help=f"smallest face side in pixels (default: {defaults.min_face})")
    serve.add_argument("--detect-max-side", type=int, default=defaults.detect_max_side, metavar="PX",
                       help=f"detect on images shrunk to this longer side (default: {defaults.detect_max_side}; "
                            "0: never)")
    serve.add_argument("--workers", type=int, default=defaults.workers, metavar="N",
                       help=f"threads that decode images and find faces (default: {defaults.workers})")
    serve.add_argument("--api-key", metavar="KEY",
                       help=f"require 'Authorization: Bearer KEY' on the API (default: ${API_KEY_ENV}, else none)")
    serve.add_argument("--max-upload-mb", type=float, default=defaults.max_file_bytes / 2**20, metavar="MB",
                       help=f"largest image file (default: {defaults.max_file_bytes / 2**20:g} MB)")
    serve.add_argument("--max-pixels", type=int, default=defaults.max_pixels, metavar="N",
                       help=f"largest image in pixels (default: {defaults.max_pixels:,})")
    serve.add_argument("--max-files", type=int, default=defaults.max_files, metavar="N",
                       help=f"images a request (default: {defaults.max_files})")
    serve.add_argument("--max-request-pixels", type=int, default=defaults.max_request_pixels, metavar="N",
                       help=f"pixels of all the images of a request, read from their headers (default: "
                            f"{defaults.max_request_pixels:,})")
    serve.add_argument("--max-decode-mb", type=float, default=defaults.max_decode_mb, metavar="MB",
                       help=f"memory that images being decoded at once may take; the next waits (default: "
                            f"{defaults.max_decode_mb:g})")
    serve.add_argument("--batch-window-ms", type=float, default=defaults.batch_window_ms, metavar="MS",
                       help=f"wait this long for other requests' faces to share a model call (default: "
                            f"{defaults.batch_window_ms:g}; 0: no batching)")
    serve.add_argument("--no-batching", action="store_true", help="each request's faces on their own (same as "
                                                                  "--batch-window-ms 0)")
    serve.add_argument("--max-batch", type=int, default=defaults.max_batch, metavar="N",
                       help=f"faces a model call (default: {defaults.max_batch})")
    serve.add_argument("--max-pending", type=int, default=defaults.max_pending, metavar="N",
                       help=f"predict requests in progress at once; more get 503 (default: {defaults.max_pending})")
    serve.add_argument("--timeout", type=float, default=defaults.timeout_s, metavar="S",
                       help=f"seconds a predict request may take once its body is in (default: {defaults.timeout_s:g})")
    serve.add_argument("--body-timeout", type=float, default=defaults.body_timeout_s, metavar="S",
                       help=f"seconds a request body may take to arrive (default: {defaults.body_timeout_s:g})")
    serve.add_argument("--header-timeout", type=float, default=defaults.header_timeout_s, metavar="S",
                       help=f"seconds request headers may take to arrive (default: {defaults.header_timeout_s:g})")
    serve.add_argument("--allowed-hosts", default="", metavar="NAMES",
                       help="without an API key, Host names answered besides localhost and --host, comma-separated "
                            "('*': any)")
    serve.add_argument("--decode-timeout", type=float, default=defaults.decode_timeout_s, metavar="S",
                       help="seconds an image may take to decode and search for faces; its worker process is then "
                            f"killed and replaced (default: {defaults.decode_timeout_s:g})")
    serve.add_argument("--max-inflight-mb", type=float, default=defaults.max_inflight_mb, metavar="MB",
                       help="memory request bodies being read and parsed may take in all; more get 503 "
                            f"(default: {defaults.max_inflight_mb:g})")
    serve.add_argument("--limit-concurrency", type=int, default=defaults.limit_concurrency, metavar="N",
                       help="open connections; past it the longest idle one is closed, or the new one gets 503 "
                            f"(default: {defaults.limit_concurrency})")
    serve.add_argument("--max-streams", type=int, default=defaults.max_streams_per_client, metavar="N",
                       help=f"webcam streams a client may hold open (default: {defaults.max_streams_per_client})")
    serve.add_argument("--forwarded-allow-ips", default="", metavar="IPS",
                       help="proxies whose X-Forwarded-For/-Proto are believed, comma-separated (default: none)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=cmd_serve)


DEBUG_ENV = "FERKIT_DEBUG"
EXIT_BUG = 70
"""An exception that is not ferkit's own (EX_SOFTWARE): a bug to report, with the traceback --debug shows."""
EXIT_INTERRUPTED = 130


def _printable(text: str) -> str:
    """`text` with control characters other than line breaks and tabs escaped, so no message can drive the terminal."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def error_message(err: BaseException) -> str:
    """An expected failure as the text after `ferkit: error: `: an OSError as `path: reason`."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return str(err) or type(err).__name__


def exit_status(err: BaseException) -> int:
    """A ferkit error's own status; an OSError (a file that cannot be read or written) is bad input: 2; Ctrl-C:
    130; anything else is a bug: 70, a ValueError from inside torch or numpy included."""
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(err, FerkitError):
        return err.exit_code
    return EXIT_USAGE if isinstance(err, OSError) else EXIT_BUG


def report(err: BaseException, debug: bool) -> int:
    """Say what failed on one line of stderr (after the traceback, with `debug`) and return the exit status."""
    status = exit_status(err)
    if debug:
        traceback.print_exception(err)
    if status == EXIT_INTERRUPTED:
        print("ferkit: interrupted", file=sys.stderr)
    elif status == EXIT_BUG:
        first_line = _printable(str(err)).partition("\n")[0]
        how = "" if debug else f"; run with --debug or {DEBUG_ENV}=1 for the traceback"
        print(f"ferkit: internal error (a bug: please report it): {type(err).__name__}: {first_line}{how}",
              file=sys.stderr)
    else:
        print(f"ferkit: error: {_printable(error_message(err))}", file=sys.stderr)
    return status


@contextlib.contextmanager
def old_names_as_lines() -> Iterator[None]:
    """Show the warnings about old names as `ferkit: warning: ...` lines; other warnings as Python shows them."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                 line: str | None = None) -> None:
            if issubclass(category, OldNameWarning):
                print(f"ferkit: warning: {message}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. ferkit's own errors (`ferkit.errors`) and OSErrors print one line and exit with their
    status (1 or 2), Ctrl-C with 130; anything else is a bug: one line that says so and exit 70. `--debug` or
    FERKIT_DEBUG=1 adds the traceback to either."""
    with old_names_as_lines():
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser(command_of(argv) or "").parse_args(argv)  # no command named: none built
        debug = args.debug or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
        try:
            return int(args.func(args))
        except BrokenPipeError:
            # The reader of our output went away (`ferkit predict ... | head`): nothing to say, and no one to say it to.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        except (Exception, KeyboardInterrupt) as err:
            return report(err, debug)


if __name__ == "__main__":
    sys.exit(main())
