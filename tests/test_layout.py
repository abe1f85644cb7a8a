"""The package's layout rules, checked on its source: no import circle, no private name used
across modules, no module over 400 lines without a stated reason (docs/conventions.md)."""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "datasetdm_jax")
ROOT = "datasetdm_jax"
MAX_LINES = 400


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = ROOT + "." + os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
                out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


MODULES = _modules()
TREES = {m: ast.parse(open(p).read()) for m, p in MODULES.items()}


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, tree: ast.Module):
    """(imported module, imported names or None, node) for every import of the package, lazy ones too."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(ROOT) and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in MODULES:
                    yield sub, None, node
                else:
                    yield _resolve(node.module), alias.name, node
        elif isinstance(node, ast.ImportFrom) and node.level:
            package = module if MODULES[module].endswith("__init__.py") else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{node.module}" if node.module else package
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub, None, node) if sub in MODULES else (_resolve(base), alias.name, node)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(ROOT):
                    yield _resolve(alias.name), None, node


def _graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for m, tree in TREES.items():
        for target, _, _ in _imports(m, tree):
            if target and target != m:
                graph[m].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    cycle = find_cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_private_name_across_modules():
    bad = []
    for m, tree in TREES.items():
        aliases = {}  # local name -> package module, for `module._private` attribute use
        for target, name, node in _imports(m, tree):
            if name is not None and name.startswith("_") and target != m:
                bad.append(f"{m}: from {target} import {name}")
            if name is None and target:
                for alias in node.names:
                    aliases[(alias.asname or alias.name).split(".")[-1]] = target
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__") and aliases[node.value.id] != m):
                bad.append(f"{m}: {node.value.id}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(sorted(set(bad)))


def test_long_modules_say_why():
    long = []
    for m, path in MODULES.items():
        n = sum(1 for _ in open(path))
        doc = ast.get_docstring(TREES[m]) or ""
        if n > MAX_LINES and "Longer than" not in doc:
            long.append(f"{m}: {n} lines")
    assert not long, f"modules over {MAX_LINES} lines without 'Longer than ...: why' in their docstring:\n" + \
        "\n".join(long)
