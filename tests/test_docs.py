"""The reference in docs/ says what the code does: each check fails when one side changes without the other.

- docs/flags.md is generated from server/config.py's fields (`python -m server.config > docs/flags.md`);
- docs/api.md's route table lists exactly the app's routes (method and path);
- docs/events.md names every playback event type and each event's fields;
- docs/metrics.md lists exactly the metric families `GET /metrics` renders.
"""
from __future__ import annotations

import re
from pathlib import Path

from server_helpers import tiny_engine

from realtime.timeline.playback import EventType, QueueChanged, SpeechEnded, SpeechStarted
from server.app import create_app
from server.config import ServerConfig, flags_markdown
from server.ops.metrics import render_metrics
from server.state import STATE

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_flags_md_is_generated_from_the_config_fields():
    assert (DOCS / "flags.md").read_text() == flags_markdown(), \
        "docs/flags.md is stale: run `python -m server.config > docs/flags.md`"


def test_the_flags_table_has_a_row_per_field_and_a_flag_for_each_parser_option():
    import argparse

    table = flags_markdown()
    assert table.count("\n| ") == len(ServerConfig.__dataclass_fields__) + 1  # one row per field + the header
    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    for option in (o for action in parser._actions for o in action.option_strings if o.startswith("--")):
        if option != "--help":
            assert f"`{option}`" in table or f"`{option} " in table, option


def documented_routes(text: str) -> set[tuple[str, str]]:
    return {(m.group(1), m.group(2).replace("{{", "{").replace("}}", "}"))
            for m in re.finditer(r"^\| (GET|POST|DELETE|PUT|PATCH) \| `([^`]+)` \|", text, re.M)}


def test_api_md_lists_exactly_the_app_routes():
    engine = tiny_engine()
    try:
        app = create_app(ServerConfig(), engine)
        served = {(route.method, route.resource.canonical) for route in app.router.routes()
                  if route.method != "HEAD" and route.resource is not None}
    finally:
        engine.close()
    documented = documented_routes((DOCS / "api.md").read_text())
    assert documented, "no route table found in docs/api.md"
    assert served - documented == set(), f"routes missing from docs/api.md: {sorted(served - documented)}"
    assert documented - served == set(), f"docs/api.md names routes the app lacks: {sorted(documented - served)}"


def test_events_md_names_every_event_and_field():
    text = (DOCS / "events.md").read_text()
    samples = [SpeechStarted("u", 1.0), SpeechEnded("u", 0.5, False, 1.0), QueueChanged(0.0, 1.0)]
    assert {e.type for e in samples} == set(EventType)  # every type has a sample here
    for event in samples:
        fields = event.as_json()
        line = next((ln for ln in text.splitlines() if f'"type": "{fields["type"]}"' in ln), None)
        assert line is not None, f"docs/events.md does not show {fields['type']}"
        for name in fields:
            assert f'"{name}"' in line, f"docs/events.md: {fields['type']} lacks {name}"


def rendered_metrics() -> str:
    """GET /metrics of a server with the tiny engine, no live session and one closed (so the by-reason
    family is there)."""
    engine = tiny_engine()
    try:
        app = create_app(ServerConfig(), engine)
        app[STATE].sessions.closed_total["client"] = 1
        return render_metrics(app[STATE])
    finally:
        engine.close()


async def test_metrics_md_lists_exactly_the_rendered_families():
    page = rendered_metrics()  # on the running loop: the page counts its tasks
    rendered = set(re.findall(r"^# TYPE (\w+) ", page, re.M))
    documented = set(re.findall(r"^\| `(lipsync_\w+)` \|", (DOCS / "metrics.md").read_text(), re.M))
    assert rendered, "no metric families rendered"
    assert rendered - documented == set(), f"missing from docs/metrics.md: {sorted(rendered - documented)}"
    assert documented - rendered == set(), f"docs/metrics.md names unrendered families: {sorted(documented - rendered)}"


def test_no_measurement_tables_in_library_docstrings():
    """Numbers age with every run: a docstring says why and points to the bench; the tables live in
    bench/RESULTS.md."""
    import ast

    root = DOCS.parent
    found = []
    for package in ("server", "realtime", "integrations", "models", "cli"):
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            nodes = [tree, *(n for n in ast.walk(tree)
                             if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
            for node in nodes:
                doc = ast.get_docstring(node) or ""
                if re.search(r"^\s*\|[-:| ]+\|\s*$", doc, re.M):
                    found.append(f"{path.relative_to(root)}: {getattr(node, 'name', 'module')}")
    assert not found, found


def _architecture_map() -> dict[str, set[str]]:
    """ARCHITECTURE.md's map: for server/ and realtime/, the modules named under each folder heading."""
    text = (DOCS.parent / "ARCHITECTURE.md").read_text()
    block = text.split("```", 2)[1]
    found: dict[str, set[str]] = {}
    top, folder = "", ""
    for line in block.splitlines():
        head = re.match(r"^(server|realtime)/\s", line) or re.match(r"^(?:models|cli|deploy|integrations|bench)/", line)
        if head:
            top, folder = (head.group(1), "") if head.lastindex else ("", "")
        sub = re.match(r"^  ([a-z_]+)/\s", line)
        if sub and top:
            folder = sub.group(1)
        if top:
            for name in re.findall(r"\b([a-z_0-9]+)\.py\b", line):
                found.setdefault(f"{top}/{folder}".rstrip("/"), set()).add(name)
    return found


def test_the_architecture_map_names_every_module_under_its_folder():
    root = DOCS.parent
    mapped = _architecture_map()
    for top in ("server", "realtime"):
        for path in sorted((root / top).rglob("*.py")):
            if path.name in {"__init__.py", "__main__.py"}:
                continue
            folder = str(path.parent.relative_to(root))
            assert path.stem in mapped.get(folder, set()), \
                f"ARCHITECTURE.md's map does not name {path.relative_to(root)} under {folder}/"
