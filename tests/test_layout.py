"""The package's shape: modules small enough to hold in mind, imports layered without cycles."""
import ast
import os

from tests.conftest import ROOT

PACKAGE = os.path.join(ROOT, "coconut_jax")


def _modules():
    for dirpath, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield (rel[: -len(".__init__")] if rel.endswith(".__init__") else rel), path


def _top_level_imports(path, package):
    """Modules of the package imported when `path` is imported (function-level imports, which
    run later, are left out)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("coconut_jax"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in package else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("coconut_jax"))
    return out


def test_no_module_of_the_package_passes_400_lines():
    long = {name: n for name, path in _modules() if (n := sum(1 for _ in open(path, encoding="utf-8"))) > 400}
    assert not long, long


def test_imports_form_no_cycle():
    modules = dict(_modules())
    graph = {m: {d for d in _top_level_imports(p, modules) if d in modules and d != m} for m, p in modules.items()}
    # A package imports its own submodules (a registry, re-exports): those edges point down.
    for m in graph:
        graph[m] = {d for d in graph[m] if not m.startswith(d + ".")}
    state, cycle = {}, []

    def visit(m, trail):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycle.append(trail + [m, d])
            elif d not in state:
                visit(d, trail + [m])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycle, cycle[0]
