"""The shape of the code: the import graph of kernels/, models/ and train/ (built from the source with ast,
every import counted, also those inside functions) has no cycle, and every import points one way:
kernels <- models <- train. Nothing imports benchmarks or tests."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "models", "train")
ALLOWED = {"kernels": {"kernels"}, "models": {"kernels", "models"}, "train": {"kernels", "models", "train"}}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (a `from X import Y` names X.Y when Y is a module)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] in PACKAGES + ("benchmarks", "tests"):
                found.add(t)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_every_kind_of_import():
    graph = _graph()
    assert "models.deepseek_v3" in graph["models.registry"]  # from .deepseek_v3 import MoELM
    assert "models.moe" in graph["models.deepseek_v3"]
    assert "models.expert_parallel" in graph["models.moe"]  # imported inside a function
    assert "models.convert.qwen2" in graph["models.convert.llava"]  # from . import qwen2
    assert "kernels" in graph["models.layers"]  # import kernels
    assert "train.engine.deepspeed_engine" in graph["train.engine.interface"]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_point_one_way():
    wrong = [
        (name, target)
        for name, targets in _graph().items()
        for target in targets
        if target.split(".")[0] not in ALLOWED[name.split(".")[0]]
    ]
    assert wrong == []


def test_no_installed_package_shares_a_name_with_ours():
    """Hugging Face's `kernels` distribution (required by transformers >= 5.25) installs a top-level `kernels`
    module; beside ours, one shadows the other and transformers fails deep inside an import. Our own
    distribution is the only one that may provide kernels/, models/ or train/."""
    import importlib.metadata as md

    ours = md.distribution("llm-from-scratch").metadata["Name"]
    foreign = {
        name: dists for name, dists in md.packages_distributions().items() if name in PACKAGES and set(dists) - {ours}
    }
    assert not foreign, (
        f"installed distributions {foreign} provide a top-level module named like one of ours; "
        "pyproject.toml holds transformers below the version that needs them: reinstall with `make install`"
    )
