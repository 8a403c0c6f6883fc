"""The agent's parts stand on their own: no module of core imports the agent, and core has no
import circle (the report reads the timeline, never the agent)."""

from __future__ import annotations

import grimp

CORE = "breakglass_tui.core"


def test_no_part_imports_the_agent_and_core_has_no_import_circle() -> None:
    graph = grimp.build_graph("breakglass_tui", cache_dir=None)
    modules = sorted(m for m in graph.find_children(CORE))
    assert f"{CORE}.tools" in modules and f"{CORE}.timeline" in modules
    importers = graph.find_modules_that_directly_import(f"{CORE}.agent")
    assert {m for m in importers if m.startswith(CORE)} == set()
    for module in modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.startswith(CORE + ".") and imported != module:
                back = graph.find_shortest_chain(importer=imported, imported=module)
                assert back is None, f"import circle: {module} -> {' -> '.join(back or ())}"


def test_the_agent_module_holds_the_loop_only() -> None:
    """Issue 14's measure: what grows goes into a part (a tool, a slash command, the report),
    not back into the loop."""
    from pathlib import Path

    import breakglass_tui.core.agent as agent

    lines = Path(agent.__file__).read_text().count("\n")
    assert lines < 450, f"core/agent.py has {lines} lines: move what is not the loop into a part"
