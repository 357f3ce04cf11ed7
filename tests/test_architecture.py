"""The module graph: no import cycle among the project's modules, counting imports inside functions."""
import ast
import glob
import os

from conftest import ROOT

MODULES = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}


def imports(module: str) -> set:
    """The project modules that ``module`` imports anywhere in its source (top level or in a function)."""
    with open(os.path.join(ROOT, f"{module}.py")) as f:
        tree = ast.parse(f.read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out & MODULES - {module}


def find_cycle(graph: dict):
    """One cycle of the graph as a list of nodes, or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
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


def test_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    graph = {m: imports(m) for m in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_layers():
    """Clients and analysis sit above the service; nothing imports the command or the generator."""
    graph = {m: imports(m) for m in MODULES}
    assert "request_generator" not in set().union(*(graph[m] for m in MODULES - {"llm_server"}))
    assert "llm_server" not in set().union(*graph.values())
    for analysis in ("analyze_results", "report", "artifact", "trial_stats", "metrics"):
        assert not graph[analysis] & {"request_generator", "service", "engine", "http_api"}, analysis
