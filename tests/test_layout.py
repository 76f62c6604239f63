"""The package's layout keeps its rules: layers import downward, no cycles, no private imports.

Every import in every module of ``pyro_structsel`` (at the top or inside a
function, relative or absolute) is read with :mod:`ast`. Imports under
``if TYPE_CHECKING:`` are for type checkers only and never run, so they are
not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pyro_structsel"

#: The layers, lowest first: a module imports only from its own layer or a lower one.
LAYERS = ("util", "model", "datasets", "infer", "evidence", "hyper", "report", "selection",
          "top")
#: Modules directly in the package and the layer each is on.
TOP_LEVEL = {"datasets": "datasets", "cli": "top", "__main__": "top", "__init__": "top"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "top"
    if len(parts) == 2 and not (PACKAGE / parts[1]).is_dir():
        return TOP_LEVEL[parts[1]]
    return parts[1]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:``."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        found.append(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)
    return found


def imports(module: str) -> list[tuple[str, list[str], int]]:
    """``(imported module, names taken from it, line)`` for each import of ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names
                    if alias.name.split(".")[0] == "pyro_structsel"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "pyro_structsel":
                target = node.module
            else:
                continue
            names = [alias.name for alias in node.names]
            submodules = [f"{target}.{name}" for name in names if f"{target}.{name}" in MODULES]
            if submodules:  # ``from . import module``: an import of that module
                out += [(sub, [], node.lineno) for sub in submodules]
                names = [n for n in names if f"{target}.{n}" not in MODULES]
            if names or not submodules:
                out.append((target, names, node.lineno))
    return out


GRAPH = {module: imports(module) for module in MODULES}


def test_the_package_has_its_subpackages():
    for sub in LAYERS:
        if sub not in ("datasets", "top"):
            assert (PACKAGE / sub / "__init__.py").exists(), sub
    loose = sorted(m for m in MODULES if m.count(".") == 1 and layer(m) == "top"
                   and m.split(".")[1] not in TOP_LEVEL)
    assert not loose, f"modules outside the layers: {loose}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layers_import_downward(module):
    mine = LAYERS.index(layer(module))
    upward = [(target, line) for target, _, line in GRAPH[module]
              if target in MODULES and LAYERS.index(layer(target)) > mine]
    assert not upward, (f"{module} (layer {layer(module)!r}) imports from higher layers: "
                        f"{upward}")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_is_imported_across_modules(module):
    private = [(target, name, line) for target, names, line in GRAPH[module]
               for name in names if name.startswith("_") and target != module]
    assert not private, f"{module} imports private names: {private}"


def test_no_import_cycle_between_modules():
    # packages re-export their modules' names: an __init__ is a face, not a module of its own,
    # so an import of a package counts as an import of the package only when it is __init__
    edges = {m: {t for t, _, _ in GRAPH[m] if t in MODULES and t != m} for m in MODULES}
    faces = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if nxt in faces and node.startswith(nxt + "."):
                continue  # a module importing its own package's face: the face imports it
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"


def test_modules_below_the_top_do_not_import_package_faces_of_higher_layers():
    """``from pyro_structsel import X`` inside the package would run every layer first."""
    offenders = [(m, line) for m in MODULES if layer(m) != "top"
                 for target, _, line in GRAPH[m] if target == "pyro_structsel"]
    assert not offenders, offenders
