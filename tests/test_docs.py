"""The documentation's figures: each one in docs/results.md's index is read back from the file that recorded it,
and every number in the README's results table is one of them."""

from __future__ import annotations

import csv
import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
OPERATORS = {"/": lambda a, b: a / b, "+": lambda a, b: a + b, "-": lambda a, b: a - b}


def markdown_table(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after `heading`, as lists of cells (cells hold no `|`)."""
    lines = text.split(f"\n{heading}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in block[2:]]


def index_rows() -> list[list[str]]:
    rows = markdown_table((ROOT / "docs" / "results.md").read_text(), "## Index of figures")
    assert rows and all(len(row) == 4 for row in rows), [row for row in rows if len(row) != 4]
    return rows


def parse_value(shown: str) -> tuple[float, int, bool]:
    """'**71.80%**' -> (71.8, 2, True): the number, its decimals, and whether it is a percentage."""
    match = re.search(r"(\d[\d,]*)(?:\.(\d+))?\s*(%?)", shown.replace("*", ""))
    assert match, f"no number in {shown!r}"
    decimals = match.group(2) or ""
    return float(match.group(1).replace(",", "") + (f".{decimals}" if decimals else "")), len(decimals), bool(
        match.group(3))


def json_lookup(data: Any, path: str) -> Any:
    """`a.b`, `list[field=value]` (the item whose field is value), `[key]` (a key with dots, or a list index)."""
    for part in re.findall(r"[^.\[\]]+|\[[^\]]*\]", path):
        if part.startswith("["):
            inner = part[1:-1]
            if "=" in inner:
                field, wanted = inner.split("=", 1)
                matches = [item for item in data if str(item.get(field)) == wanted]
                assert len(matches) == 1, f"{path}: {len(matches)} items with {field}={wanted}"
                data = matches[0]
            else:
                data = data[int(inner)] if isinstance(data, list) else data[inner]
        else:
            data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def csv_lookup(rows: list[dict[str, str]], key: str) -> float:
    """`column[field=value]`, `sum(column)` or `max(column)`."""
    if match := re.fullmatch(r"(sum|max)\((\w+)\)", key):
        values = [float(row[match.group(2)]) for row in rows]
        return sum(values) if match.group(1) == "sum" else max(values)
    match = re.fullmatch(r"(\w+)\[(\w+)=([^\]]+)\]", key)
    assert match, f"bad CSV key {key!r}"
    column, field, wanted = match.groups()
    found = [row[column] for row in rows if row[field] == wanted]
    assert len(found) == 1, f"{key}: {len(found)} rows"
    return float(found[0])


def recorded(file: str, key: str) -> float:
    """The figure that `key` names in docs/results/`file` (see docs/results.md's index for the syntax)."""
    path = RESULTS / file
    assert path.is_file(), f"{file} is not in docs/results"
    text = path.read_text()
    if key.startswith("re:"):
        match = re.search(key[3:], text)
        assert match, f"{file}: no match for {key}"
        return float(match.group(1).replace(",", ""))
    rows = list(csv.DictReader(text.splitlines())) if path.suffix == ".csv" else None
    data = None if rows is not None else json.loads(text)

    def term(token: str) -> float:
        if re.fullmatch(r"\d+(\.\d+)?", token):
            return float(token)
        return csv_lookup(rows, token) if rows is not None else float(json_lookup(data, token))

    tokens = re.split(r" ([/+-]) ", key)
    value = term(tokens[0])
    for operator, operand in zip(tokens[1::2], tokens[2::2], strict=True):
        value = OPERATORS[operator](value, term(operand))
    return value


def matches(shown: str, value: float) -> bool:
    number, decimals, percent = parse_value(shown)
    value = 100 * value if percent else value
    return abs(value - number) <= 0.5 * 10 ** -decimals * (1 + 1e-6) + 1e-9


@pytest.mark.parametrize("row", index_rows(), ids=lambda row: row[0])
def test_each_indexed_figure_is_what_its_file_recorded(row: list[str]) -> None:
    _, shown, file, key = row
    value = recorded(file, key.strip("`"))
    assert matches(shown, value), f"{shown} is not {value} ({file}: {key})"


def test_the_checks_catch_a_wrong_figure() -> None:
    assert matches("71.80%", 0.7180273) and matches("**1,131**", 1131.04) and matches("9.5x", 9.54)
    assert not matches("71.90%", 0.7180273) and not matches("1,130", 1131.04) and not matches("9.6x", 9.54)
    assert matches("92.8%", 371 / 400)  # a half-way value rounds either way at the printed precision
    rows = [{"epoch": "1", "val_acc": "0.5"}, {"epoch": "2", "val_acc": "0.7"}]
    assert (csv_lookup(rows, "val_acc[epoch=2]"), csv_lookup(rows, "max(val_acc)")) == (0.7, 0.7)
    assert csv_lookup(rows, "sum(epoch)") == 3
    data = {"results": [{"weights": "a", "x": {"0.95": 2}}, {"weights": "b", "x": {"0.95": 3}}]}
    assert json_lookup(data, "results[weights=b].x[0.95]") == 3 and json_lookup(data, "results.0.weights") == "a"


def readme_results_numbers() -> list[str]:
    """Every number in the body of the README's results table, outside `code` and link targets; digits that are
    part of a name (FER-2013, 640x480, FER2013Test) are not figures."""
    numbers = []
    for row in markdown_table((ROOT / "README.md").read_text(), "## Results"):
        for cell in row:
            text = re.sub(r"`[^`]*`|\]\([^)]*\)", " ", cell).replace("*", "")
            numbers += re.findall(r"(?<![\w.,-])\d+(?:,\d{3})*(?:\.\d+)?%?(?![\w.])", text)
    return numbers


def test_every_number_in_the_readme_results_table_is_indexed() -> None:
    numbers = readme_results_numbers()
    assert len(numbers) >= 12, numbers
    indexed = {row[1].replace("*", "") for row in index_rows()}
    indexed |= {re.sub(r"\s*(x|ms|s|min)$", "", value) for value in indexed}
    missing = [n for n in numbers if n not in indexed]
    assert not missing, f"README results figures missing from docs/results.md's index: {missing}"


def test_ci_runs_the_readme_test_command_and_the_readme_gives_the_fast_lane() -> None:
    tests = (ROOT / "README.md").read_text().split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    commands = [block.split("```", 1)[0].strip() for block in tests.split("```bash\n")[1:]]
    suite, fast = (command.split(" ", 1)[1] for command in commands[:2])  # past FERKIT_DATA=...
    assert suite.startswith("python -m pytest -q") and "slow" not in suite  # the whole suite
    assert fast == 'python -m pytest -q -m "not slow"'
    # CI runs the README's two commands, `make demo` and `make test`, whose recipe is the README's test command.
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "make demo" in ci and 'make test PYTEST_ARGS="--durations=15"' in ci
    recipe = (ROOT / "Makefile").read_text().split("\ntest: $(SETUP)\n", 1)[1].splitlines()[0].strip()
    assert recipe == f"FERKIT_DATA=$(DATA) {suite.replace('python', '$(PY)', 1)} $(PYTEST_ARGS)"
