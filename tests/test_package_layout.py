"""The package's shape, read from the source: no import cycle between bridges' modules (lazy
imports inside functions count), nothing private of one package used by another, and demos and
modules short enough to read."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bridges"
DEMO_LINES, MODULE_LINES = 250, 450
# over MODULE_LINES today, each being split on a branch of its own; remove a name once it is
TOO_LONG_FOR_NOW = {"bridges._fd", "bridges.problems", "bridges.petsc._ode", "bridges.petsc._solve"}


def _modules():
    """{dotted name: path} of every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name, path):
    """(module, imported name or None) for every import statement in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            yield from ((base, alias.name) for alias in node.names)


def _graph():
    """{module: the package's modules it imports} (a name imported from a package counts as its
    submodule when there is one)."""
    graph = {}
    for name, path in MODULES.items():
        targets = set()
        for module, imported in _imports(name, path):
            if imported and f"{module}.{imported}" in MODULES:
                targets.add(f"{module}.{imported}")
            elif module in MODULES:
                targets.add(module)
        graph[name] = targets - {name}
    return graph


def test_the_walk_sees_the_package():
    graph = _graph()
    assert len(graph) > 40 and "bridges.fracture._petsc" in graph
    assert "bridges.petsc" in graph["bridges.fracture._petsc"]  # a relative import, resolved
    assert "bridges.problems.brusselator" in graph["bridges.problems"]  # a lazy-free module import


def test_no_import_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"
    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # a package's __init__ imports its submodules, and they import each other, not the __init__
    assert cycles == []


def test_nothing_private_crosses_packages():
    """A module may use its own package's private modules and names, and those of the packages
    above it (bridges._core, ...); never a sibling package's (bridges.julia._runtime from
    bridges.fracture)."""
    crossings = []
    for name, path in MODULES.items():
        own = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for module, imported in _imports(name, path):
            if not module.startswith("bridges"):
                continue
            target = f"{module}.{imported}" if imported else module
            parts = target.split(".")
            private = [d for d, part in enumerate(parts)
                       if part.startswith("_") and not part.startswith("__")]
            if private:  # the first private part belongs to the package (or module) before it
                owner = ".".join(parts[:private[0]])
                if not (own + ".").startswith(owner + "."):
                    crossings.append(f"{name} imports {target}")
    assert crossings == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_demos_stay_short(name):
    lines = len(MODULES[name].read_text().splitlines())
    if name.startswith("bridges.demos."):
        assert lines <= DEMO_LINES, f"{name}: {lines} lines; a demo is at most {DEMO_LINES}"
    if name not in TOO_LONG_FOR_NOW:
        assert lines <= MODULE_LINES, f"{name}: {lines} lines; a module is at most {MODULE_LINES}"
