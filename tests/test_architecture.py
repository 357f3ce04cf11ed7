"""The module graph: the package reads one way (no import cycle, counting imports inside functions), and each
layer imports only the layers below it."""
import ast
import glob
import os

import pytest

from conftest import ROOT

DOORS = {"llm_server", "request_generator", "psi_admission", "analyze_results", "cgroup_lib"}
# what each part of the package may import, besides itself
MAY_IMPORT = {
    "llm_psi": set(),
    "llm_psi.config": set(),
    "llm_psi.cli": {"llm_psi.config"},
    "llm_psi.cgroups": {"llm_psi", "llm_psi.cli"},
    "llm_psi.analysis": {"llm_psi", "llm_psi.config", "llm_psi.cli"},
    "llm_psi.engine": {"llm_psi", "llm_psi.config", "llm_psi.cli", "llm_psi.cgroups"},
    "llm_psi.control": {"llm_psi", "llm_psi.config", "llm_psi.cli", "llm_psi.cgroups"},
    "llm_psi.service": {"llm_psi", "llm_psi.config", "llm_psi.cli", "llm_psi.cgroups", "llm_psi.analysis",
                        "llm_psi.engine", "llm_psi.control"},
    "llm_psi.load": {"llm_psi", "llm_psi.config", "llm_psi.cli", "llm_psi.cgroups", "llm_psi.analysis",
                     "llm_psi.service"},
    "llm_psi.fleet": {"llm_psi", "llm_psi.config", "llm_psi.cli", "llm_psi.cgroups", "llm_psi.analysis",
                      "llm_psi.service", "llm_psi.load"},
}


def modules() -> dict:
    """{dotted name: path} of every module of the package, the benchmarks and the root doors."""
    out = {}
    for path in glob.glob(os.path.join(ROOT, "llm_psi", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(ROOT, "bench", "**", "*.py"), recursive=True) + glob.glob(os.path.join(ROOT, "*.py")):
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def imports(path: str, known: set) -> set:
    """The project modules a file imports anywhere (top level or in a function): `from a.b import c` counts as
    a.b.c where that is a module, else a.b."""
    tree = ast.parse(open(path).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            out |= subs or {node.module}
    return {m for m in out if m in known or m.split(".")[0] in DOORS}


def part(module: str) -> str:
    """The layer a module belongs to: llm_psi.<sub> for the package's subpackages and modules."""
    return ".".join(module.split(".")[:2])


def find_cycle(graph: dict):
    """One cycle of the graph as a list of nodes, or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None
    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


GRAPH = {m: imports(p, set(modules())) - {m} for m, p in modules().items()}


def test_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle)


def test_no_cycle_between_layers():
    """Parts (subpackages) read one way too: a part's package __init__ importing its modules is no excuse."""
    parts = {}
    for m, deps in GRAPH.items():
        if m.startswith("llm_psi."):
            parts.setdefault(part(m), set()).update(part(d) for d in deps if d.startswith("llm_psi.") and part(d) != part(m))
    cycle = find_cycle(parts)
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("layer", sorted(MAY_IMPORT))
def test_layer_imports_only_what_lies_below(layer):
    """engine and control sit below service, and load above it; the analysis reads only files (it imports no
    service, engine, control or load code); cgroups, config and cli import nothing above them."""
    for m, deps in GRAPH.items():
        if part(m) != layer and m != layer:
            continue
        for d in deps:
            where = "llm_psi" if d == "llm_psi" else part(d)
            assert where == part(m) or where in MAY_IMPORT[layer], f"{m} imports {d}"


def test_nothing_imports_the_root_doors_or_the_benchmarks():
    for m, deps in GRAPH.items():
        assert not {d for d in deps if d.split(".")[0] in DOORS}, m
        if not m.startswith("bench"):
            assert not {d for d in deps if d.startswith("bench")}, m


def test_root_doors_are_thin():
    """The paper's scripts at the root only hand over to the package."""
    for name in DOORS:
        with open(os.path.join(ROOT, f"{name}.py")) as f:
            assert len(f.read().splitlines()) <= 20, name


def test_the_checker_sees_a_violation(tmp_path):
    """The layer check can fail: an engine module importing the service is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from llm_psi.service import lifecycle\n")
    deps = imports(str(bad), set(modules()))
    assert "llm_psi.service.lifecycle" in deps
    assert part("llm_psi.service.lifecycle") not in MAY_IMPORT["llm_psi.engine"]
