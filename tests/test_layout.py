"""The package's shape: no import circles between its modules, the README's layout names every module, and
every function is short enough to read in one screen."""

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
    assert graph["inference"] <= {"labels", "errors", "preprocessing"}, "the inference core must stay free of the " \
        "rest of ferkit"
    assert graph["preprocessing"] <= {"labels", "errors"}
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


MAX_FUNCTION_LINES = 80


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the `def` (decorators not counted) to the function's last line, docstring and comments included."""
    return (node.end_lineno or node.lineno) - node.lineno + 1


def test_no_function_is_longer_than_80_lines() -> None:
    too_long = [f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({_length(node)} lines)"
                for path in sorted(PACKAGE.rglob("*.py")) for node in _functions(ast.parse(path.read_text()))
                if _length(node) > MAX_FUNCTION_LINES]
    assert not too_long, "\n".join(too_long)


def test_the_length_measure_counts_what_it_should() -> None:
    source = '@decorator\ndef f(x):\n    """Doc."""\n\n    # a comment\n    return x\n'
    (node,) = _functions(ast.parse(source))
    assert _length(node) == 5
    nested = _functions(ast.parse("def outer():\n    def inner():\n        pass\n    return inner\n"))
    assert sorted((n.name, _length(n)) for n in nested) == [("inner", 2), ("outer", 4)]


def _vars_calls(tree: ast.AST) -> list[int]:
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "vars"]


def test_nothing_patches_objects_through_vars() -> None:
    """Per-call options are arguments of the call, not attributes patched on copies through `vars(obj)[...]`."""
    found = [f"{path.relative_to(PACKAGE)}:{line}" for path in sorted(PACKAGE.rglob("*.py"))
             for line in _vars_calls(ast.parse(path.read_text()))]
    assert not found, found
    assert _vars_calls(ast.parse("vars(view)['prior'] = p\nenvvars(x)\n")) == [1]


def _imports_ray(path: Path) -> bool:
    return any(_imports_ray_node(node) for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, (ast.Import, ast.ImportFrom)))


def test_only_the_ray_engine_imports_ray() -> None:
    """Ray is an optional extra: `ferkit.scale` alone imports it (inside its functions), never the local path.
    tests/test_scale.py runs the local engine and finds no `ray` in sys.modules."""
    importing = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if _imports_ray(p))
    assert importing == ["scale.py"], importing
    top_level = [node for node in ast.parse((PACKAGE / "scale.py").read_text()).body
                 if isinstance(node, (ast.Import, ast.ImportFrom)) and _imports_ray_node(node)]
    assert not top_level, "scale.py imports ray at module level: `import ferkit.scale` must work without it"
    assert _imports_ray_node(ast.parse("import ray.data").body[0])
    assert not _imports_ray_node(ast.parse("import rayon").body[0])


def _imports_ray_node(node: ast.stmt) -> bool:
    tree = ast.Module(body=[node], type_ignores=[])
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
    return any(name == "ray" or name.startswith("ray.") for name in names)
