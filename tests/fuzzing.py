"""Helpers for the bad-input and fuzz tests: a call under a time limit, and an independent FER-2013 CSV oracle.

Nothing here is a test. The oracle reads a CSV's bytes by the written rules of the format, without
the csv module or ferkit's loader, so that it can tell a loader that drops or invents rows.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings

from ferkit.labels import NUM_PIXELS, USAGE_TO_SPLIT

SCALE = float(os.environ.get("FERKIT_FUZZ_SCALE", "1"))
"""Multiplies every fuzz test's example count: 1 in CI, more to explore."""


def fuzz_settings(examples: int) -> settings:
    """Hypothesis settings for a bounded, repeatable fuzz test of about `examples` cases."""
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,  # each test's per-case time limit replaces it
        derandomize=True,  # the same cases in every CI run; raise FERKIT_FUZZ_SCALE to explore more
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                               HealthCheck.data_too_large],
    )

MAX_LINE_BYTES = 1 << 16  # the loader's documented limit on one CSV line (ferkit.data.MAX_LINE_BYTES)


class Hung(AssertionError):
    """A call that did not return within its time limit."""


def call_with_timeout(fn: Callable[[], Any], seconds: float, unblock: Callable[[], None] | None = None) -> Any:
    """fn() in a daemon thread: its result or exception, or `Hung` after `seconds`.

    `unblock` runs after a timeout, to free the stuck thread (e.g. by writing to the FIFO it waits on),
    so that the test process can still exit.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as err:
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if unblock is not None:
            unblock()
        raise Hung(f"still running after {seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def unblock_fifo(path: Path) -> Callable[[], None]:
    """A function that opens the FIFO at `path` for writing and closes it: a reader blocked on it sees EOF."""

    def unblock() -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return
        os.close(fd)

    return unblock


# ---------------------------------------------------------------------------------------------
# The CSV oracle

# One CSV field: quoted ("" escapes a quote) or unquoted (any text without a comma, not starting with a quote).
_FIELD = r'(?:"(?:[^"]|"")*"|[^,"][^,]*|)'
_RECORD = re.compile(rf"{_FIELD}(?:,{_FIELD})*")
_FIELD_AT = re.compile(_FIELD)
_PIXELS = re.compile(r"[0-9 \t]*")
_DIGITS = re.compile(r"[0-9]+")


def _fields(line: str) -> list[str] | None:
    if _RECORD.fullmatch(line) is None:
        return None
    out, pos = [], 0
    while True:
        match = _FIELD_AT.match(line, pos)
        assert match is not None
        text = match.group()
        out.append(text[1:-1].replace('""', '"') if text.startswith('"') else text)
        pos = match.end()
        if pos == len(line):
            return out
        pos += 1  # the comma


@dataclass
class CsvVerdict:
    """What a FER-2013 CSV holds by the format's rules: its rows, or the first problem and its line."""

    rows: dict[str, list[tuple[int, int, np.ndarray]]] = field(default_factory=dict)  # (line, label, pixels)
    format: str = "csv"
    problem: str | None = None
    bad_line: int | None = None  # None: a problem of the whole file (header, empty split)


def oracle_csv(blob: bytes) -> CsvVerdict:
    """The rows of a FER-2013 CSV (either header), or the first reason it is not one.

    Rules: lines end in \\n (an \\r before it is part of the ending; any other \\r is an error); a UTF-8
    byte-order mark may open the file; each line is UTF-8 of at most MAX_LINE_BYTES bytes; line 1 is
    the header, naming emotion, pixels and Usage once each (names trimmed of spaces and tabs); blank
    lines are skipped; every other line has exactly the header's number of fields; emotion is ASCII
    digits with value 0..6, Usage one of Training/PublicTest/PrivateTest (both trimmed), pixels only
    digits, spaces and tabs, 2304 numbers 0..255; all three splits must hold a row.
    """
    verdict = CsvVerdict(rows={split: [] for split in ("train", "val", "test")})
    raw_lines = blob.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    header: list[str] | None = None
    for number, raw in enumerate(raw_lines, start=1):
        problem = None
        if len(raw) > MAX_LINE_BYTES:
            problem = "line too long"
        else:
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                problem = "not UTF-8"
        if number == 1:
            if problem is not None:
                return CsvVerdict(problem=f"header: {problem}")
            names = [n.strip(" \t") for n in (_fields(line) or [])] if line else []
            if "\r" in line or _fields(line) is None:
                return CsvVerdict(problem="header not a CSV line")
            if any(names.count(c) != 1 for c in ("emotion", "pixels", "Usage")):
                return CsvVerdict(problem="header lacks a column (or has one twice)")
            header = names
            verdict.format = "icml-csv" if names == ["emotion", "Usage", "pixels"] else "csv"
            continue
        assert header is not None
        if problem is None and line == "":
            continue
        if problem is None and "\r" in line:
            problem = "carriage return"
        fields = _fields(line) if problem is None else None
        if problem is None and fields is None:
            problem = "not a CSV line"
        if problem is None and fields is not None:
            problem = _row_problem(dict(zip(header, fields, strict=False)), len(fields), len(header))
            if problem is None:
                row = dict(zip(header, fields, strict=True))
                pixels = np.array(row["pixels"].split(), dtype=np.int64).astype(np.uint8).reshape(48, 48)
                verdict.rows[USAGE_TO_SPLIT[row["Usage"].strip(" \t")]].append(
                    (number, int(row["emotion"].strip(" \t")), pixels))
        if problem is not None and verdict.problem is None:
            verdict.problem, verdict.bad_line = problem, number
    if header is None:
        return CsvVerdict(problem="empty file")
    if verdict.problem is None and not all(verdict.rows.values()):
        verdict.problem = "empty split"
    return verdict


def _row_problem(row: dict[str, str], count: int, expected: int) -> str | None:
    if count != expected:
        return "field count"
    emotion = row["emotion"].strip(" \t")
    if not (_DIGITS.fullmatch(emotion) and int(emotion) <= 6):
        return "emotion"
    if row["Usage"].strip(" \t") not in USAGE_TO_SPLIT:
        return "usage"
    pixels = row["pixels"]
    if not _PIXELS.fullmatch(pixels):
        return "pixel characters"
    tokens = pixels.split()
    if len(tokens) != NUM_PIXELS or any(int(t) > 255 for t in tokens):
        return "pixel values"
    return None
