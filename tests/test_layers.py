"""The package's layers, checked on its import graph (every `import`, at module level or inside a function).

- no import cycles between vlkit's modules;
- only the CLI, the demo and the training package itself import `vlkit.train` (the benches live outside
  the package); inference (`loading`, `chat`, `evaluate`) and `export` read run folders through
  `vlkit.run_folder`;
- the model core (`modeling`, `processing`, `connectors`) imports nothing from `train`, `export`, `chat`
  or `data`.

The CLI reaches its commands by module name strings (`importlib`), which this graph does not see: that
is what keeps `vlkit --help` from importing the training stack.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vlkit"
# Module names below the package's own (the negative tests build a package of another name).
TRAIN_IMPORTERS = ("cli", "demo")
CORE = ("modeling", "processing", "connectors", "vision", "llm")
CORE_MUST_NOT_IMPORT = ("train", "export", "chat", "data", "evaluate")


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__)."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (`from a.b import c` counts a.b.c when that is a module)."""
    modules = module_files(package)
    root = package.name

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {owner(alias.name) for alias in node.names if alias.name.split(".")[0] == root}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == root:
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    imported.add(submodule if submodule in modules else owner(node.module))
        graph[name] = imported - {name, None}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def in_part(module: str, part: str) -> bool:
    return module == part or module.startswith(part + ".")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    root = next(iter(graph)).split(".")[0]
    train, train_importers = f"{root}.train", {f"{root}.{name}" for name in TRAIN_IMPORTERS}
    problems = [f"import cycle: {' <-> '.join(group)}" for group in cycles(graph)]
    for module, imported in sorted(graph.items()):
        core = any(in_part(module, f"{root}.{part}") for part in CORE)
        for target in sorted(imported):
            if in_part(target, train) and not in_part(module, train) and module not in train_importers:
                problems.append(f"{module} imports {target}: only the CLI and the demo may import {train}")
            if core and any(in_part(target, f"{root}.{part}") for part in CORE_MUST_NOT_IMPORT):
                problems.append(f"{module} imports {target}: the model core imports no train/export/chat/data/evaluate")
    return problems


def test_the_graph_sees_lazy_and_module_level_imports():
    graph = import_graph(PACKAGE)
    assert "vlkit.train.trainer" in graph["vlkit.train.run"]  # imported inside train_vlm
    assert "vlkit.run_folder" in graph["vlkit.loading"]
    assert "vlkit.modeling" in graph["vlkit.build"]


def test_vlkit_keeps_its_layers():
    assert layer_violations(import_graph(PACKAGE)) == []


@pytest.mark.parametrize(("files", "expected"), [
    ({"a.py": "import pkg.b\n", "b.py": "def f():\n    from pkg import a\n"}, "import cycle: pkg.a <-> pkg.b"),
    ({"loading.py": "def load():\n    from pkg.train.checkpoint import load_run\n", "train/__init__.py": "",
      "train/checkpoint.py": ""}, "pkg.loading imports pkg.train.checkpoint: only the CLI and the demo"),
    ({"modeling.py": "from pkg.data.collate import IGNORE_INDEX\n", "data/__init__.py": "", "data/collate.py": ""},
     "pkg.modeling imports pkg.data.collate: the model core"),
])
def test_a_broken_layer_is_reported(tmp_path, files, expected):
    package = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    problems = layer_violations(import_graph(package))
    assert any(problem.startswith(expected) for problem in problems), problems


def importers_of(package: Path, root: str) -> set[str]:
    """Modules of the package that import the top-level package `root`, lazily or not."""
    found = set()
    for name, path in module_files(package).items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            if any(imported.split(".")[0] == root for imported in names):
                found.add(name)
    return found


def test_only_the_demo_knows_the_shapes_world():
    # The library is generic: scorers and probe labels come as names and files; the demo drives the example world.
    assert importers_of(PACKAGE, "data_tools") == {"vlkit.demo"}


def long_functions(package: Path, parts: tuple[str, ...], limit: int) -> list[str]:
    """Functions longer than `limit` lines (decorators excluded) in the given subpackages."""
    found = []
    for part in parts:
        for path in sorted((package / part).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > limit:
                        found.append(f"{path.relative_to(package.parent)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_in_the_stages_is_over_60_lines(tmp_path):
    assert long_functions(PACKAGE, ("train", "clip"), 60) == []
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "long.py").write_text("def f():\n" + "    x = 1\n" * 60)
    assert long_functions(tmp_path, ("train",), 60) == [f"{tmp_path.name}/train/long.py:1 f (61 lines)"]
