"""The Ray engine: `ferkit predict INPUTS --engine ray --output OUT` and `predict_corpus(...)` on Ray Data.

The pipeline is Ray's batch-inference recipe. Photos are read as a dataset (`read_binary_files`, with their
paths), then a pool of actors (`map_batches` with a callable class and a fixed pool size), each holding one
`EmotionRecognizer` loaded once, turns each batch into table rows by `ferkit.batches.image_rows`, the very
function the local engine runs, so both engines write the same rows; `write_parquet` writes the parts.
Videos run one video per task (a dataset of their paths, batches of one, the same pool size): tracking and
smoothing follow a face from frame to frame, so a video is read in order by one actor, and a corpus of many
videos keeps every actor busy. Inputs must be readable at the same path on every node (a shared file system).

`OUT` is a folder of Parquet parts (`write_parquet`'s own), or a file (`.parquet`, `.csv`, `.jsonl`, `.json`):
its parts go to a folder beside it, `NAME.ray-parts/`, and are joined into the file at the end. `--resume` skips
the inputs whose rows a readable part already holds (same path, size and modification time); a part a kill
left half-written is unreadable and is removed first.

Ray is started here, quietly (no dashboard, a bounded object store, its logs under its session folder, not
on the terminal), unless an `address` (or `RAY_ADDRESS`) names a cluster to join. Nothing else in ferkit
imports Ray: the local engine never does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .errors import UsageError
from .outputs import atomic_write
from .tracking import DEFAULT_SMOOTH

if TYPE_CHECKING:
    import pyarrow as pa

    from .records import Identity, Row
    from .sources import InputItem

RAY_MISSING = "--engine ray needs Ray Data, an optional extra: pip install 'ferkit[ray]' (or 'ray[data]>=2.40')"
PART_SUFFIX = ".ray-parts"
DEFAULT_BATCH_SIZE = 16
"""Photos per actor call: enough faces for one efficient model call, small enough to spread over the pool."""
ROWS_PER_TABLE = 4096
LIGHT_TASKS: dict[str, Any] = {"ray_remote_args": {"num_cpus": 0}, "concurrency": 1}
"""Reading files and writing parts: no CPU reserved (the actors may take every CPU without starving them, which
deadlocks), and one task at a time, else Ray starts a worker process for each task it can run at once."""
ACTORS_START_S = 600
"""How long the pool may take to start (a cluster scaling up for it) before the run fails."""
OBJECT_STORE_BYTES = 256 * 1024**2
"""The object store of a Ray started here: photos in flight and rows, not the whole corpus."""


def import_ray() -> Any:
    """`ray` with Ray Data, or a UsageError saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise UsageError(RAY_MISSING) from None
    return ray


@dataclass
class CorpusReport:
    """What a Ray run did: inputs listed, skipped by --resume, done and failed; faces; where the rows are."""

    output: Path
    inputs: int = 0
    skipped: int = 0
    done: int = 0
    failed: int = 0
    faces: int = 0
    frames: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    nodes: dict[str, int] = field(default_factory=dict)  # inputs done by the actors of each Ray node
    first_rows_s: float = 0.0  # from the start until the first rows came: Ray's start, the actors' loading
    inputs_per_s: float = 0.0  # from the first rows to the last: the pool's throughput once it runs


# ---------------------------------------------------------------------------------------------
# Inside the actors


class Progress:
    """A Ray actor counting what the workers finished, for the driver's progress line and report."""

    def __init__(self) -> None:
        self.counts = {"inputs": 0, "failed": 0, "faces": 0, "frames": 0, "first": 0}
        self.warnings: list[str] = []
        self.nodes: dict[str, int] = {}
        self.times: list[float] = []  # when the first and the last rows came

    def add(self, node: str, inputs: int, failed: int, faces: int, frames: int, warnings: Sequence[str] = ()) -> None:
        self.times = [self.times[0] if self.times else time.time(), time.time()]
        self.counts["first"] = self.counts["first"] or inputs
        for key, value in (("inputs", inputs), ("failed", failed), ("faces", faces), ("frames", frames)):
            self.counts[key] += value
        self.nodes[node] = self.nodes.get(node, 0) + inputs
        self.warnings += warnings

    def read(self) -> tuple[dict[str, int], list[str], dict[str, int], list[float]]:
        return dict(self.counts), list(self.warnings), dict(self.nodes), list(self.times)


def _tally(rows: Sequence[Row]) -> tuple[int, int, int]:
    """(inputs, failed, faces) in rows: inputs by path, failed by their error row, faces by their face number."""
    return (len({row["path"] for row in rows}), sum(row.get("error") is not None for row in rows),
            sum(row.get("face") is not None for row in rows))


class RowMaker:
    """The actor: one `EmotionRecognizer`, loaded once; a batch of photos (bytes and paths) -> a table of rows."""

    def __init__(self, recognizer_options: dict[str, Any], classes: list[str], names: dict[str, str],
                 progress: str | None = None, every: int = 1, smooth: float = DEFAULT_SMOOTH) -> None:
        import ray

        from .predict import EmotionRecognizer

        self.recognizer = EmotionRecognizer(**recognizer_options)
        # The counter is found by its name: a handle passed in would make Ray warn about restarting this actor.
        self.progress = None if progress is None else ray.get_actor(progress)
        self.classes, self.names = classes, names
        self.every, self.smooth = every, smooth
        self.node = ray.get_runtime_context().get_node_id()

    def _identity(self, path: str, size: int | None = None) -> Identity:
        from .records import Identity

        try:
            info = os.stat(path)
        except OSError:
            return Identity(self.names.get(path, path), size)
        return Identity(self.names.get(path, path), info.st_size if size is None else size, info.st_mtime_ns)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        from .batches import ImageSource, image_rows
        from .records import to_table

        sources = [ImageSource(self._identity(str(path), len(data)), data=bytes(data))
                   for data, path in zip(batch["bytes"], batch["path"], strict=True)]
        rows = image_rows(self.recognizer, sources)
        self._report(rows)
        return to_table(rows, self.classes)

    def _report(self, rows: Sequence[Row], frames: int = 0, warnings: Sequence[str] = ()) -> None:
        if self.progress is not None:
            self.progress.add.remote(self.node, *_tally(rows), frames, list(warnings))


class VideoRowMaker(RowMaker):
    """The actor for videos: one video a call (a batch of one path) -> its rows; summaries to `summary_dir`."""

    def __init__(self, *args: Any, summary_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.summary_dir = summary_dir

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        import pyarrow as pa

        return pa.concat_tables([self.video_table(str(path)) for path in batch["path"]])

    def video_table(self, path: str) -> pa.Table:
        """A video's rows as the local engine makes them (`ferkit.local`): frames read in order, their faces
        classified, tracked and smoothed; a video that fails part way keeps its rows so far and adds its error."""
        import cv2
        import pyarrow as pa

        from .batches import INPUT_ERRORS, VideoRows, error_message
        from .records import error_row, to_table
        from .video import VideoReader

        identity, recognizer = self._identity(path), self.recognizer
        video = VideoRows(identity, self.classes, self.smooth)
        tables: list[pa.Table] = []
        rows: list[Row] = []
        frames, faces, failed, warnings = 0, 0, 0, []
        try:
            reader = VideoReader(path, self.every)
            for index, time_s, bgr in reader:
                found = recognizer.find_faces(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                rows += video.frame(index, time_s, recognizer.classify(found))
                frames, faces = frames + 1, faces + len(found)
                if len(rows) >= ROWS_PER_TABLE:  # rows, not frames, are kept until the video ends: a few MB an hour
                    tables.append(to_table(rows, self.classes))
                    rows = []
            problem = reader.problem()
            warnings = [f"{identity.path}: {problem}"] if problem else []
            if self.summary_dir is not None:
                _write_summary(Path(self.summary_dir), identity, video.summary(), self.classes)
        except INPUT_ERRORS as err:
            rows.append(error_row(identity, error_message(identity.path, err)))
            failed = 1
        tables.append(to_table(rows, self.classes))
        if self.progress is not None:
            self.progress.add.remote(self.node, 1, failed, faces, frames, warnings)
        return pa.concat_tables(tables)


def _write_summary(folder: Path, identity: Identity, rows: list[Row], classes: list[str]) -> None:
    """One video's track summaries as a Parquet part named by its path (a retried task writes the same file)."""
    import hashlib

    import pyarrow.parquet as pq

    from .records import to_table

    folder.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha1(str(identity.path).encode()).hexdigest()[:20] + ".parquet"
    with atomic_write(folder / name) as tmp:
        pq.write_table(to_table(rows, classes, summary=True), tmp)


# ---------------------------------------------------------------------------------------------
# The driver


def parts_folder(output: Path) -> Path:
    """Where the Parquet parts go: `output` itself for a folder, `NAME.ray-parts/` beside a file."""
    return output if is_folder_output(output) else output.with_name(output.name + PART_SUFFIX)


def is_folder_output(output: Path) -> bool:
    """A folder (existing, or a name without a table suffix) gets Ray's parts as they are; a file gets them joined."""
    return output.is_dir() or not output.suffix


def _part_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith("."))


def done_identities(folder: Path, discard: bool = True) -> set[tuple[Any, Any, Any]]:
    """(path, size, mtime) of every input whose rows a readable part in `folder` holds; unreadable parts (a kill
    left them half-written) are removed when `discard`."""
    import pyarrow.parquet as pq

    done: set[tuple[Any, Any, Any]] = set()
    for part in _part_files(folder):
        try:
            table = pq.read_table(part, columns=["path", "file_size", "file_mtime_ns"])
        except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
            if discard:
                part.unlink()
            continue
        done.update(zip(*(table.column(n).to_pylist() for n in ("path", "file_size", "file_mtime_ns")), strict=True))
    return done


def _listed(items: Sequence[InputItem]) -> list[tuple[InputItem, Identity]]:
    return [(item, item.identity()) for item in items]


def _key(identity: Identity) -> tuple[Any, Any, Any]:
    return identity.path, identity.size, identity.mtime_ns


def _quiet_ray_logs() -> None:
    """Ray Data's notes (execution started, finished, progress bars off) go to its log file only."""
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler":
            handler.setLevel(logging.ERROR)


@contextlib.contextmanager
def _stderr_to_log() -> Iterator[TextIO]:
    """The process's stderr into a log file for the block; yields the terminal's stderr, for ferkit's own lines.

    Ray's core writes its errors to file descriptor 2 whatever its log level (Ray Data 2.60's actors all
    trigger one about restarts, ray-project/ray#57733); they stay in `ferkit-ray-PID.log` in the temporary
    folder, kept only when the block fails. Exceptions still reach the caller.
    """
    log = Path(tempfile.gettempdir()) / f"ferkit-ray-{os.getpid()}.log"
    sys.stderr.flush()
    saved = os.dup(2)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    python_stderr = sys.stderr
    failed = True
    with open(log, "a") as sink:
        os.dup2(sink.fileno(), 2)
        sys.stderr = sink
        try:
            yield terminal
            failed = False
        finally:
            sys.stderr = python_stderr
            os.dup2(saved, 2)
            os.close(saved)
            terminal.close()
            if failed:
                print(f"ferkit: Ray's own messages are in {log}", file=sys.stderr)
            else:
                log.unlink()


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Ray, connected: the running one if this process has it, else `address`'s cluster (or RAY_ADDRESS's), else
    a local one started for the block (quiet: no dashboard, a bounded object store, logs not on the terminal)."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    common = {"log_to_driver": False, "logging_level": logging.ERROR, "configure_logging": True}
    if address is not None:
        ray.init(address=address, **common)
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 object_store_memory=OBJECT_STORE_BYTES, **common)
    try:
        yield ray
    finally:
        ray.shutdown()


def predict_corpus(
    inputs: Sequence[str],
    output: str | os.PathLike[str],
    *,
    recognizer_options: dict[str, Any] | None = None,
    every: int = 1,
    smooth: float = DEFAULT_SMOOTH,
    summary: str | os.PathLike[str] | None = None,
    address: str | None = None,
    concurrency: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_cpus: float = 1.0,
    resume: bool = False,
    progress: bool = False,
) -> CorpusReport:
    """Every photo and video of `inputs` (files, folders, globs) through Ray Data into the table `output`.

    `recognizer_options`: `EmotionRecognizer`'s keyword arguments, for each actor's recognizer. `address`: a Ray
    cluster to join (default: `RAY_ADDRESS`, else a local Ray started for the run). `concurrency`: actors in the
    pool (default: the CPUs Ray has, `num_cpus` each); `batch_size`: photos per actor call. `summary`: a file for
    the videos' track summaries. `resume`: skip the inputs `output` already holds (see the module).
    """
    from .predict import EmotionRecognizer
    from .sources import expand_inputs

    if every < 1:
        raise UsageError(f"--every must be at least 1, not {every}")
    if batch_size < 1 or (concurrency is not None and concurrency < 1):
        raise UsageError("--batch-size and --concurrency must be at least 1")
    output, options = Path(output), dict(recognizer_options or {})
    folder = _prepare_output(output, resume)
    classes = EmotionRecognizer(**options).classes  # bad weights or options fail here, before Ray starts
    listed = _listed(expand_inputs(inputs))
    done = done_identities(folder) if resume else set()
    todo = [(item, identity) for item, identity in listed if _key(identity) not in done]
    report = CorpusReport(output, inputs=len(listed), skipped=len(listed) - len(todo))
    start = time.monotonic()
    _write_errors(folder, [(i, identity) for i, identity in todo if i.path is None], classes)
    report.failed = report.done = sum(item.path is None for item, _ in todo)
    summary_parts = None if summary is None else _prepare_output(Path(summary), resume)
    work = [(item, identity) for item, identity in todo if item.path is not None]
    if work:
        _run(work, folder, report, options, classes, address, concurrency, batch_size, num_cpus, every, smooth,
             summary_parts, progress)
    if not is_folder_output(output):
        _join_parts(folder, output, classes)
    if summary is not None and summary_parts is not None:
        _join_parts(summary_parts, Path(summary), classes, summary=True)
    report.seconds = time.monotonic() - start
    return report


def _prepare_output(output: Path, resume: bool) -> Path:
    """The parts folder for `output`, checked; one holding parts already is continued with `resume`, else refused."""
    from .outputs import check_output_file
    from .writers import table_format

    folder = parts_folder(output)
    if folder is output:
        if output.exists() and not output.is_dir():
            raise UsageError(f"{output}: not a folder; give a folder or a file ending in a table suffix")
        if _part_files(output) and not resume:
            raise UsageError(f"{output}: holds a results table already; --resume continues it, or remove it first")
    else:
        table_format(output)
        check_output_file(output)
        if not resume:
            for part in _part_files(folder) if folder.is_dir() else []:
                part.unlink()  # our own hidden folder, left by a run that did not finish
        elif output.exists():
            _adopt(output, folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _adopt(output: Path, folder: Path) -> None:
    """A finished file to be resumed: its rows become a part again, so the joined file holds them and the new."""
    import pyarrow.parquet as pq

    from .writers import read_table

    folder.mkdir(parents=True, exist_ok=True)
    if not any(folder.glob("finished-*.parquet")):  # adopted already by a resumed run that did not finish
        pq.write_table(read_table(output), folder / f"finished-{time.time_ns()}.parquet")


def _write_errors(folder: Path, failed: Sequence[tuple[InputItem, Identity]], classes: list[str]) -> None:
    import pyarrow.parquet as pq

    from .records import error_row, to_table

    if failed:
        rows = [error_row(identity, item.error or "failed") for item, identity in failed]
        with atomic_write(folder / f"errors-{time.time_ns()}.parquet") as tmp:
            pq.write_table(to_table(rows, classes), tmp)


def _join_parts(folder: Path, output: Path, classes: list[str], summary: bool = False) -> None:
    """The parts of `folder` into the one file `output`, a part at a time, atomically; then the parts go."""
    import pyarrow.parquet as pq

    from .outputs import atomic_write
    from .records import schema, summary_schema
    from .writers import open_writer, table_format

    target = summary_schema(classes) if summary else schema(classes)
    parts = _part_files(folder) if folder.is_dir() else []
    with atomic_write(output) as tmp:
        writer = open_writer(tmp, target, table_format(output))
        try:
            if not parts:
                writer.write(target.empty_table())
            for part in parts:
                writer.write(pq.read_table(part).select(target.names).cast(target))
        finally:
            writer.close()
    for part in parts:
        part.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


def _run(work: Sequence[tuple[InputItem, Identity]], folder: Path, report: CorpusReport, options: dict[str, Any],
         classes: list[str], address: str | None, concurrency: int | None, batch_size: int, num_cpus: float,
         every: int, smooth: float, summary_parts: Path | None, progress: bool) -> None:
    """Photos, then videos, through a pool of actors into `folder`; counts into `report`."""
    start = time.time()
    with _stderr_to_log() as terminal, ray_session(address) as ray:
        _quiet_ray_logs()
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ferkit's own line below says what a user needs
        context.print_on_execution_start = False
        # The work starts when the whole pool is up: otherwise the first actor to load takes the batches of a
        # small corpus alone while the others are still loading.
        context.wait_for_min_actors_s = ACTORS_START_S
        pool = concurrency or max(1, int(ray.cluster_resources().get("CPU", 1) // num_cpus))
        counter_name = f"ferkit-progress-{os.getpid()}-{time.time_ns()}"
        counter = ray.remote(num_cpus=0)(Progress).options(name=counter_name).remote()
        # Listed paths as strings, for the read; their names in the table where the argument spelled them otherwise.
        files = {str(item.path): identity.path or "" for item, identity in work}
        names = {path: name for path, name in files.items() if path != name}
        maker_args = {"recognizer_options": options, "classes": classes, "names": names, "progress": counter_name,
                      "every": every, "smooth": smooth}
        images = [str(item.path) for item, _ in work if item.kind == "image"]
        videos = [str(item.path) for item, _ in work if item.kind == "video"]
        common = {"compute": ray.data.ActorPoolStrategy(size=pool), "num_cpus": num_cpus, "batch_format": "numpy"}
        with _progress_line(ray, counter, len(work), terminal if progress else None):
            if images:
                dataset = ray.data.read_binary_files(images, include_paths=True, num_cpus=0, concurrency=1)
                dataset.map_batches(RowMaker, batch_size=batch_size, fn_constructor_kwargs=maker_args,
                                    **common).write_parquet(str(folder), **LIGHT_TASKS)
            if videos:
                summaries = None if summary_parts is None else str(summary_parts)
                dataset = ray.data.from_items([{"path": path} for path in videos], override_num_blocks=len(videos))
                dataset.map_batches(VideoRowMaker, batch_size=1,
                                    fn_constructor_kwargs={**maker_args, "summary_dir": summaries},
                                    **{**common, "compute": ray.data.ActorPoolStrategy(size=min(pool, len(videos)))}
                                    ).write_parquet(str(folder), **LIGHT_TASKS)
        counts, report.warnings, report.nodes, times = ray.get(counter.read.remote())
    if len(times) == 2:
        report.first_rows_s = times[0] - start
        report.inputs_per_s = (counts["inputs"] - counts["first"]) / (times[1] - times[0]) if times[1] > times[0] else 0
    report.done += counts["inputs"]
    report.failed += counts["failed"]
    report.faces, report.frames = counts["faces"], counts["frames"]


@contextlib.contextmanager
def _progress_line(ray: Any, counter: Any, total: int, out: TextIO | None) -> Iterator[None]:
    """While the block runs: inputs done of `total`, faces/s and the ETA on `out` (None: none), from the actors'
    counts."""
    if out is None:
        yield
        return
    from tqdm.auto import tqdm

    stop = threading.Event()

    def poll() -> None:
        first: float | None = None  # faces/s counts from the first input done, not from Ray's start
        with tqdm(total=total, unit="input", file=out, dynamic_ncols=True, desc="ray", mininterval=0.5) as bar:
            while True:
                last = stop.wait(0.5)
                counts = ray.get(counter.read.remote())[0]
                if counts["inputs"] > bar.n:
                    first = first or time.monotonic()
                    rate = counts["faces"] / max(time.monotonic() - first, 0.5)
                    frames = f", {counts['frames']} frames" if counts["frames"] else ""
                    bar.set_postfix_str(f"{counts['faces']} faces, {rate:.1f} faces/s{frames}", refresh=False)
                    bar.update(counts["inputs"] - bar.n)
                if last:
                    return

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def ray_command(paths: Sequence[str], output: str | None, *, progress: bool | None = None, **options: Any) -> int:
    """`ferkit predict PATH... --engine ray --output OUT`: run `predict_corpus`, then say what came of it on stderr;
    1 if any input failed, else 0. `options`: `predict_corpus`'s."""
    if not output:
        raise UsageError("--engine ray writes a table: give --output FOLDER or FILE (.parquet, .csv, .jsonl, .json)")
    import_ray()  # before any work: the one line saying how to install it
    show = sys.stderr.isatty() if progress is None else progress
    report = predict_corpus(paths, output, progress=show, **options)
    for warning in report.warnings:
        print(f"ferkit: warning: {warning}", file=sys.stderr)
    skipped = f", {report.skipped} already in {output}" if report.skipped else ""
    print(f"ferkit: {report.done} of {report.inputs} inputs into {output} on Ray ({report.faces} faces, "
          f"{len(report.nodes)} node{'s' * (len(report.nodes) != 1)}, {report.seconds:.1f} s{skipped}; the first rows "
          f"after {report.first_rows_s:.1f} s, then {report.inputs_per_s:.1f} inputs/s)",
          file=sys.stderr)
    if report.failed:
        print(f"ferkit: {report.failed} of {report.inputs} input{'s' * (report.inputs != 1)} failed (their rows hold "
              "the error)", file=sys.stderr)
    return 1 if report.failed else 0
