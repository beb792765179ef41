"""Every file imports only files below it: the project's import graph (function-level imports included) has no
cycle, so the files can be read, and blanked out for a course, from the bottom up."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def project_imports():
    """{module: set of project modules it imports}. A package (kernels/, study/, course/, benchmarks/) is a node (its
    __init__) and each of its files a node of its own ("kernels.chunked"); importing "kernels.x" also runs "kernels"."""
    files = {p.stem: p for p in ROOT.glob("*.py")}
    for pkg in ("kernels", "study", "course", "benchmarks"):
        files |= {pkg if p.stem == "__init__" else f"{pkg}.{p.stem}": p for p in (ROOT / pkg).glob("*.py")}
    prefixes = lambda dotted: {".".join(dotted.split(".")[:i]) for i in range(1, dotted.count(".") + 2)}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= set().union(*(prefixes(a.name) for a in node.names))
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                deps |= set().union(*(prefixes(f"{node.module}.{a.name}") for a in node.names))
            elif isinstance(node, ast.ImportFrom):  # relative, inside kernels/: from .chunked import x
                base = ".".join(filter(None, [package, node.module]))
                deps |= {base} | {f"{base}.{a.name}" for a in node.names}
        graph[name] = (deps & set(files)) - {name}
    return graph


def import_order(graph):
    """The modules bottom-up (each after everything it imports); AssertionError naming a cycle if there is one."""
    order, state = [], {}

    def visit(name, path):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join(path + [name])
        state[name] = "open"
        for dep in sorted(graph[name]):
            visit(dep, path + [name])
        state[name] = "done"
        order.append(name)

    for name in sorted(graph):
        visit(name, [])
    return order


def test_no_import_cycles():
    graph = project_imports()
    order = import_order(graph)
    assert {"model", "checkpoint", "train", "phases", "step", "kernels.triton_delta"} <= set(order)
    assert "kernels.triton_tiles" in graph["kernels.triton_delta_bwd"] and "kernels.chunked" in graph["kernels"]
    assert order.index("model") < order.index("checkpoint") and order.index("phases") < order.index("train")
    assert order.index("train") < order.index("study.reproduce") > order.index("study.report")   # the study on top


def test_the_check_finds_a_cycle():
    graph = project_imports()
    graph["model"] = graph["model"] | {"checkpoint"}
    with pytest.raises(AssertionError, match="import cycle: .*checkpoint -> model"):
        import_order(graph)


def test_the_check_finds_a_cycle_inside_kernels():
    graph = project_imports()
    graph["kernels.triton_tiles"] = graph["kernels.triton_tiles"] | {"kernels.triton_delta"}
    with pytest.raises(AssertionError, match="import cycle: .*kernels.triton_delta -> .*kernels.triton_tiles"):
        import_order(graph)
