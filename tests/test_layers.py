"""The package's layers (bpp/__init__.py's docstring): every import points to the importer's own
layer or one above it, and no modules import each other in a circle. Read from the source, so a
lazy import inside a function counts as much as one at the top of a file."""
import ast
import sys
from pathlib import Path

import bpp

ROOT = Path(bpp.__file__).parent
# the layers of bpp/__init__.py's docstring, top (1) to bottom (7); a package's modules share its layer
LAYERS = {
    "bpp.errors": 1, "bpp.data": 1, "bpp.fileio": 1, "bpp.checkpoints": 1, "bpp.locks": 1, "bpp.runs": 1,
    "bpp.model_configs": 1, "bpp.modelio": 1, "bpp.embedded": 1, "bpp.model_folders": 1, "bpp.results_cache": 1,
    "bpp.space": 2, "bpp.masks": 2, "bpp.budget": 2,
    "bpp.models": 3,
    "bpp.evaluation": 4, "bpp.compaction": 4, "bpp.distributed": 4, "bpp.bias_compensation": 4, "bpp.plots": 4,
    "bpp.reconstruction": 4, "bpp.least_squares": 4,
    "bpp.search": 4, "bpp.gguf": 4,
    "bpp.methods": 5,
    "bpp.jobs": 6,
    "bpp.cli": 7, "bpp.__main__": 7,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int | None:
    while module:
        if module in LAYERS:
            return LAYERS[module]
        module = module.rpartition(".")[0]
    return None


def _imports(path: Path) -> set[str]:
    """The bpp modules ``path`` imports (relative imports resolved; ``from x import y`` counts as
    x.y when x.y is a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "bpp"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "bpp":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if _is_module(sub) else target)
    found.discard(name)
    return found


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in ROOT.rglob("*.py") if p.name != "modeling_bpp.py"}


def test_every_module_has_a_layer():
    assert [m for m in _graph() if _layer(m) is None and m != "bpp"] == []


def test_imports_point_to_the_same_layer_or_up():
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
              for m, targets in _graph().items() if m != "bpp"
              for t in targets if _layer(t) is not None and _layer(t) > _layer(m)]
    assert upward == []


def test_no_circle_of_imports():
    graph = _graph()
    graph["bpp"] = set()  # the package's lazy exports are resolved on first use, never at import time
    state: dict[str, int] = {}
    circles = []

    def visit(m, stack):
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if t not in graph:
                continue
            if state.get(t) == 1:
                circles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert circles == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a core module importing a job is reported."""
    fake = tmp_path / "bpp"
    (fake / "jobs").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "jobs" / "__init__.py").write_text("")
    (fake / "jobs" / "prune.py").write_text("from ..space import Masks\n")
    (fake / "space.py").write_text("def f():\n    from .jobs.prune import prune\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    graph = _graph()
    assert graph["bpp.space"] == {"bpp.jobs.prune"} and graph["bpp.jobs.prune"] == {"bpp.space"}
    assert _layer("bpp.jobs.prune") > _layer("bpp.space")


# --- the house: where the search lives, what crosses modules, how big a module gets ------------------

MAX_LINES = 350  # a module a reader takes in at once; split it rather than raise this


def test_the_search_is_one_subpackage():
    """Every policy, the loop, the incumbent, the objective and the config live in bpp.search."""
    search = {p.stem for p in (ROOT / "search").glob("*.py")}
    assert {"interface", "units", "allocation", "loop", "incumbent", "objective", "config", "estimators"} <= search
    stray = [p.name for p in ROOT.glob("*.py") if p.stem in {"policy", "policy_gradient", "allocation",
                                                             "allocation_loop", "incumbent"}]
    assert stray == []


def _private_imports(path: Path) -> list[str]:
    """``from bpp... import _name`` of a private name defined in another module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("bpp")):
            found += [f"{path.relative_to(ROOT)} imports {alias.name}" for alias in node.names
                      if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_no_private_name_is_imported_across_modules():
    assert [x for p in ROOT.rglob("*.py") for x in _private_imports(p)] == []


def test_only_the_search_asks_which_policy_it_holds():
    policies = {"UnitsPolicy", "AllocationPolicy", "SearchLoop"}
    asked = []
    for path in ROOT.rglob("*.py"):
        if path.relative_to(ROOT).parts[0] == "search":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} | \
                        {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
                if names & policies:
                    asked.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert asked == []


def test_no_module_is_too_long():
    """Outside the kernels and the modeling file shipped with compacted models."""
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if p.name != "modeling_bpp.py"
            and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
