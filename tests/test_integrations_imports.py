"""integrations/ and examples/ build on realtime/ (and models/ through it), never on server/: the
framework adapters run the engine in-process, without the HTTP/WebRTC server."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_integrations_and_examples_never_import_server():
    files = sorted((ROOT / "integrations").glob("*.py")) + sorted((ROOT / "examples").glob("*.py"))
    assert len(files) >= 5
    offenders = {f.name: sorted(m for m in imported_modules(f) if m == "server" or m.startswith("server."))
                 for f in files}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_packages_others_import_are_marked_typed():
    """integrations/ (and the realtime/ it exposes) is a library others import: PEP 561's marker must be in
    each package and shipped as package data, or their type checkers see `Any` everywhere."""
    import tomllib

    for package in ("integrations", "realtime", "server", "models", "cli"):
        assert (ROOT / package / "py.typed").is_file(), package
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any("py.typed" in patterns for patterns in data.values()), data
