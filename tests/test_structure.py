"""Package structure, checked statically (``ast`` only, no jax import): no import cycles among the modules of
``tdae_jax``, and third-party frameworks confined to their layer (docs/design.md: ``tdae_jax/models/`` is the
only package that imports diffusers / transformers; ``experiments/`` the only one that imports absl)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "tdae_jax"

# Known violations, each named with its reason; the tests fail on any other (and on a stale entry).
ALLOWED_CYCLES: frozenset = frozenset()
ALLOWED_MODEL_IMPORTS: frozenset = frozenset()
ALLOWED_ABSL_IMPORTS: frozenset = frozenset()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / PKG).rglob("*.py"))}


def imported_names(path: Path) -> list[str]:
    """Every dotted name imported anywhere in ``path`` (module level or inside functions), relative imports
    resolved; ``from a import b`` yields ``a.b`` (resolved to ``a`` later when ``b`` is not a module)."""
    is_pkg = path.name == "__init__.py"
    here = module_name(path).split(".")
    base = here if is_pkg else here[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = base[: len(base) - node.level + 1] if node.level else []
            mod = ".".join(prefix + ([node.module] if node.module else []))
            names += [f"{mod}.{a.name}" for a in node.names]
    return names


def resolve(name: str, modules) -> str | None:
    """The longest prefix of ``name`` that is a module of the package (``None``: outside it)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in modules:
            return cand
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports. ``from pkg import name`` points at ``pkg.name`` when that is a
    module, else at ``pkg`` (its ``__init__``, which re-exports ``name``); a module's implicit import of its
    parent packages is not an edge (else every ``__init__`` importing a submodule would be a cycle)."""
    modules = package_modules()
    graph = {}
    for mod, path in modules.items():
        deps = set()
        for name in imported_names(path):
            target = resolve(name, modules)
            if target is not None and target != mod:
                deps.add(target)
        graph[mod] = deps
    return graph


def find_cycles(graph) -> list[tuple[str, ...]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def cycle_path(graph, component) -> str:
    """One concrete cycle through the first module of a strongly connected ``component``: ``a -> b -> a``."""
    inside, start = set(component), component[0]
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & inside):
            if w == start:
                return " -> ".join(path + [start])
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    return " -> ".join(component)


def importers_of(roots: tuple[str, ...], dirs) -> set[str]:
    """Files (relative paths) under ``dirs`` that import any top-level package in ``roots``."""
    found = set()
    for d in dirs:
        for path in sorted((ROOT / d).rglob("*.py")):
            if any(n.split(".")[0] in roots for n in imported_names(path)):
                found.add(path.relative_to(ROOT).as_posix())
    return found


def test_graph_sees_imports():
    graph = import_graph()
    assert "tdae_jax.models.surrogate" in graph["tdae_jax.models"]  # re-export in a package __init__
    assert "tdae_jax.editors.schedulers" in graph["tdae_jax.editors.finetune"]  # from pkg import submodule
    toy = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set()}
    assert find_cycles(toy) == [("a", "b", "c")]
    assert cycle_path(toy, ("a", "b", "c")) == "a -> b -> c -> a"


def test_no_import_cycles():
    graph = import_graph()
    cycles = set(find_cycles(graph))
    new = sorted(cycles - ALLOWED_CYCLES)
    assert not new, f"import cycles among tdae_jax modules: {[cycle_path(graph, c) for c in new]}"
    assert not ALLOWED_CYCLES - cycles, f"stale ALLOWED_CYCLES entries: {sorted(ALLOWED_CYCLES - cycles)}"


def test_only_models_import_diffusers_transformers():
    found = {f for f in importers_of(("diffusers", "transformers"), (PKG,))
             if not f.startswith(f"{PKG}/models/")}
    assert found == ALLOWED_MODEL_IMPORTS, (f"diffusers/transformers imported outside {PKG}/models/: "
                                            f"{sorted(found - ALLOWED_MODEL_IMPORTS)}; stale allow-list "
                                            f"entries: {sorted(ALLOWED_MODEL_IMPORTS - found)}")


def test_only_experiments_import_absl():
    found = importers_of(("absl",), (PKG, "benchmarks"))
    assert found == ALLOWED_ABSL_IMPORTS, (f"absl imported outside experiments/: "
                                           f"{sorted(found - ALLOWED_ABSL_IMPORTS)}; stale allow-list entries: "
                                           f"{sorted(ALLOWED_ABSL_IMPORTS - found)}")
