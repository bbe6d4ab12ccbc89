"""The import graph of srp_jax (and convert/) is acyclic: imports flow one way.

Every import counts, module level and inside functions (a deferred import is still a
dependency), except those under ``if TYPE_CHECKING:``. Importing ``a.b.c`` from outside the
package ``a.b`` also runs ``a/b/__init__.py``, so that edge is added too (the root packages
``srp_jax`` / ``convert`` excepted: they are already executing when any submodule runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("srp_jax", "convert")


def _modules() -> dict[str, Path]:
    out = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                for child in node.body:
                    skip.update(id(n) for n in ast.walk(child))
    return skip


def _targets(module: str, node: ast.AST, modules: dict[str, Path]) -> list[str]:
    package = module if _is_package(module, modules) else module.rpartition(".")[0]
    found: list[str] = []
    if isinstance(node, ast.Import):
        found = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        for alias in node.names:
            candidate = f"{origin}.{alias.name}"
            found.append(candidate if candidate in modules else origin)
    return [name for name in found if name.split(".")[0] in ROOTS]


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for raw in _targets(module, node, modules):
                target = _resolve(raw, modules)
                if target is None or target == module:
                    continue
                graph[module].add(target)
                parts = target.split(".")
                for cut in range(2, len(parts)):  # intermediate packages run their __init__
                    parent = ".".join(parts[:cut])
                    if not (module == parent or module.startswith(parent + ".")):
                        graph[module].add(parent)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_import_graph_is_acyclic():
    graph = import_graph()
    assert len(graph) > 30 and graph["srp_jax.dictionary"], "the graph builder found the modules"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layering_one_way():
    """The layers the architecture doc describes: config near the bottom (it only knows the
    architecture registry), checkpoint below dictionary, torch only in convert/pt_io.py (checkpoint
files) and convert/torch_runtime.py (running a model for srp_jax/extract.py, the extract extra,
reached from the CLI only)."""
    graph = import_graph()

    def reaches(src: str, dst: str) -> bool:
        seen, todo = set(), [src]
        while todo:
            node = todo.pop()
            if node == dst:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
        return False

    allowed_under_config = {"srp_jax.errors", "srp_jax._validate", "srp_jax.compile", "srp_jax._arrays",
                            "srp_jax._native", "srp_jax._cache"}
    below_config = {m for m in graph if reaches("srp_jax.config", m)} - {"srp_jax.config"}
    assert all(m in allowed_under_config or m.startswith("srp_jax.factorizers") for m in below_config), below_config
    assert not reaches("srp_jax.checkpoint", "srp_jax.dictionary")
    assert reaches("srp_jax.dictionary", "srp_jax.checkpoint")
    for module in ("srp_jax.readout", "srp_jax.factorizers", "srp_jax.data", "srp_jax.metrics"):
        assert not reaches(module, "srp_jax.train"), module
    def imports_torch(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "torch" for a in node.names):
                return True
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "torch":
                return True
        return False

    # torch reads and writes .pt files (convert/pt_io.py) and runs a model for the extract extra
    # (convert/torch_runtime.py, handed to srp_jax/extract.py by srp_jax._lazy); nothing else
    # imports it, and nothing under srp_jax/ imports it itself
    torch_importers = sorted(m for m, p in _modules().items() if imports_torch(p))
    assert torch_importers == ["convert.pt_io", "convert.torch_runtime"], torch_importers
    importers_of_extract = sorted(m for m in graph if "srp_jax.extract" in graph[m])
    assert all(m.startswith("srp_jax.cli.") for m in importers_of_extract), importers_of_extract


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize(
    "source, module, expected",
    [
        ("from .. import factorizers as F", "srp_jax.train.step", "srp_jax.factorizers"),
        ("from ..errors import X", "srp_jax.train.step", "srp_jax.errors"),
        ("from . import kernels", "srp_jax.factorizers.topk", "srp_jax.factorizers.kernels"),
        ("from srp_jax.checkpoint import a", "convert.checkpoints", "srp_jax.checkpoint"),
    ],
)
def test_relative_imports_resolve(source, module, expected):
    modules = _modules()
    node = ast.parse(source).body[0]
    assert [_resolve(t, modules) for t in _targets(module, node, modules)] == [expected]
