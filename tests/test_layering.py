"""Every file imports only files below it: the project's import graph (function-level imports included) has no
cycle, so the files can be read, and blanked out for a course, from the bottom up."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def project_imports():
    """{module: set of project modules it imports}; kernels/* count as the package "kernels", study/x.py is
    "study.x"."""
    files = {p.stem: p for p in ROOT.glob("*.py")}
    files["kernels"] = ROOT / "kernels"
    files.update({f"study.{p.stem}": p for p in (ROOT / "study").glob("*.py") if p.stem != "__init__"})
    graph = {}
    for name, path in files.items():
        sources = sorted(path.glob("*.py")) if path.is_dir() else [path]
        deps = set()
        for src in sources:
            for node in ast.walk(ast.parse(src.read_text())):
                if isinstance(node, ast.Import):
                    deps |= {a.name.split(".")[0] for a in node.names} | {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:   # study.x as well
                    deps |= {node.module.split(".")[0], node.module} | {f"{node.module}.{a.name}" for a in node.names}
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
    order = import_order(project_imports())
    assert {"model", "checkpoint", "train", "phases", "step"} <= set(order)
    assert order.index("model") < order.index("checkpoint") and order.index("phases") < order.index("train")
    assert order.index("train") < order.index("study.reproduce") > order.index("study.report")   # the study on top


def test_the_check_finds_a_cycle():
    graph = project_imports()
    graph["model"] = graph["model"] | {"checkpoint"}
    with pytest.raises(AssertionError, match="import cycle: .*checkpoint -> model"):
        import_order(graph)
