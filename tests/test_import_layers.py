"""The project's import graph: no cycles, and data flows one way (server -> realtime -> models).

The graph is read from the source with `ast` (nothing is imported), counting every import of a project
module: at module level, under `if TYPE_CHECKING:` and inside functions alike, because a cycle that only
a deferred import keeps from failing at start-up still ties the modules together.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "realtime", "models", "cli", "integrations")
# package -> project packages it must never import (ARCHITECTURE.md: client_web -> server -> realtime ->
# models; integrations are adapters over realtime/, beside the server, not on top of it).
FORBIDDEN = {
    "realtime": {"server", "cli", "integrations"},
    "models": {"server", "realtime", "cli", "integrations"},
    "integrations": {"server", "cli"},
    "server": {"cli", "integrations"},
}
PROJECT = {*PACKAGES, "bench", "tests", "client_web", "scripts"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))
            if "__pycache__" not in p.parts}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The project module `name` refers to: itself, or the nearest enclosing module that exists
    (`from pkg.mod import Class` names `pkg.mod.Class`, which resolves to `pkg.mod`)."""
    while name:
        if name in known or (ROOT / (name.replace(".", "/") + ".py")).exists():
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules `module` imports. Importing `pkg.sub` runs `pkg/__init__.py` first, but that is
    not counted: a package that re-exports its submodules would otherwise be in a cycle with each."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports pkg.sub; `from pkg.mod import name` imports pkg.mod.
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] not in PROJECT:
                continue
            target = _resolve(name, known)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    known = project_modules()
    return {module: imports_of(module, path, known) for module, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a closed path a -> ... -> a), or None."""
    done: set[str] = set()
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> list[str] | None:
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_stack:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in done and nxt in graph:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        on_stack.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_checker_sees_imports_and_cycles():
    """The checks below can fail: the graph has the edges we know of, and a planted cycle is found."""
    graph = import_graph()
    assert "realtime.timeline.session" in graph["server.realtime_engine"]
    assert "models.wav2lip" in graph["realtime.renderers.wav2lip"]
    assert "realtime.renderers.base" in graph["realtime.renderers.wav2lip"]  # `from pkg.mod import X`
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layering(package):
    wrong = sorted(f"{module} imports {target}" for module, targets in import_graph().items()
                   if module.split(".")[0] == package for target in targets
                   if target.split(".")[0] in FORBIDDEN[package])
    assert not wrong, wrong


def test_library_code_never_imports_bench_or_tests():
    wrong = sorted(f"{module} imports {target}" for module, targets in import_graph().items()
                   for target in targets if target.split(".")[0] in {"bench", "tests", "scripts"})
    assert not wrong, wrong


def hidden_imports(path: Path) -> list[str]:
    """Imports the graph above cannot see: a module-level `__getattr__` (names resolved lazily, the way a
    shim re-exports moved names from modules that import it back) and `importlib.import_module` /
    `__import__` of a project module by name. Both tie modules together behind the static checker's back."""
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in {"__getattr__", "__dir__"}:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} module-level {node.name}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name not in {"import_module", "__import__"} or not node.args:
            continue
        arg = node.args[0]
        # A project module named by a literal, or by anything not a literal (a table of names, as a shim
        # keeps): either way the edge is invisible to `imports_of`.
        literal = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
        if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
            literal = str(arg.values[0].value)  # f"numpy.{x}": its root is what counts
        if literal is None or literal.split(".")[0] in PROJECT:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}({ast.unparse(arg)})")
    return found


def test_the_hidden_import_checker_sees_a_shim(tmp_path):
    shim = tmp_path / "shim.py"
    shim.write_text("import importlib\n_MOVED = {'x': 'realtime.other'}\n\n"
                    "def __getattr__(name):\n    return getattr(importlib.import_module(_MOVED[name]), name)\n")
    direct = tmp_path / "direct.py"
    direct.write_text("import importlib\nmod = importlib.import_module('realtime.timeline.session')\n"
                      "third = importlib.import_module('numpy')\n")
    shim_rel, direct_rel = Path("shim.py"), Path("direct.py")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert hidden_imports(shim) == [f"{shim_rel}:4 module-level __getattr__",
                                        f"{shim_rel}:5 import_module(_MOVED[name])"]
        assert hidden_imports(direct) == [f"{direct_rel}:2 import_module('realtime.timeline.session')"]
    finally:
        ROOT = saved


# Modules allowed to import by name, and why. Each must be a root of the graph (nothing but its package's
# `__main__` imports it), so no cycle can pass through the edges it hides.
DYNAMIC_IMPORTERS = {
    "cli.main": "the front door imports its subcommand's module lazily, so `lipsync --help` stays instant",
}


def test_no_hidden_imports_in_library_code():
    """Library modules import each other with `import` statements only, so the graph above is the whole
    graph (a module `__getattr__` re-export was how realtime/avatars/avatar.py once hid a cycle)."""
    wrong = [hit for module, path in project_modules().items() if module not in DYNAMIC_IMPORTERS
             for hit in hidden_imports(path)]
    assert not wrong, wrong
    importers = sorted(f"{module} imports {target}" for module, targets in import_graph().items()
                       for target in targets if target in DYNAMIC_IMPORTERS
                       and module.rpartition(".")[2] != "__main__")  # `python -m pkg` only
    assert not importers, importers


def bench_scripts() -> set[str]:
    """bench/ modules that are scripts (run as `python bench/x.py`); the rest are the benches' harness."""
    return {f"bench.{p.stem}" for p in (ROOT / "bench").glob("*.py")
            if "__main__" in p.read_text() and p.stem != "__init__"}


def test_benches_import_the_harness_never_each_other():
    """A bench script imports bench/common.py (and the other harness modules), never another bench's script:
    a script is free to change its output and options, and a bench measures only what it names."""
    scripts = bench_scripts()
    assert {"bench.sessions", "bench.latency", "bench.soak"} <= scripts
    known = {f"bench.{p.stem}": p for p in (ROOT / "bench").glob("*.py")}
    wrong = sorted(f"{module} imports {target}" for module, path in known.items()
                   for target in imports_of(module, path, known) if target in scripts)
    assert not wrong, wrong
