"""The package's shape: no import circles between its modules, and the README's layout names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ferkit"
README = PACKAGE.parents[1] / "README.md"


def _modules() -> dict[str, Path]:
    return {p.stem: p for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}


def _imports(path: Path) -> set[str]:
    """ferkit modules that `path` imports anywhere in it, function-level imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("ferkit."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("ferkit."))
    return found & set(_modules())


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = {name: _imports(path) - {name} for name, path in _modules().items()}
    assert graph["inference"] <= {"labels"}, "the inference core must stay free of the rest of ferkit"
    assert "train" not in graph["evaluate"] and "evaluate" not in graph["models"]
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph) or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_readme_layout_matches_the_tree() -> None:
    text = README.read_text()
    match = re.search(r"## Layout\n\n```\n(.*?)```", text, re.S)
    assert match, "README has no layout section"
    listed = set(re.findall(r"^  (\w+)\.py\b", match.group(1), re.M))
    assert listed == set(_modules()), (set(_modules()) - listed, listed - set(_modules()))
    folders = set(re.findall(r"^  (\w+)/", match.group(1), re.M))
    assert folders == {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")}
    # A subpackage's modules are listed under it, one more level in.
    listed_in: dict[str, set[str]] = {}
    for line in match.group(1).splitlines():
        if folder := re.match(r"^  (\w+)/", line):
            current = listed_in.setdefault(folder.group(1), set())
        elif module := re.match(r"^    (\w+)\.py\b", line):
            current.add(module.group(1))
    for folder in folders:
        modules = {p.stem for p in (PACKAGE / folder).glob("*.py") if p.stem != "__init__"}
        assert listed_in[folder] == modules, (folder, modules - listed_in[folder], listed_in[folder] - modules)


@pytest.mark.parametrize("name", sorted(_modules()))
def test_every_module_says_what_it_owns(name: str) -> None:
    assert ast.get_docstring(ast.parse(_modules()[name].read_text())), f"{name}.py has no docstring"
