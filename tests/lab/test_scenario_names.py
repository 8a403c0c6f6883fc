"""The scenario names have one source, breakglass_tui.lab.catalog: what stages them (the guest's
own script, the saved states, the sandbox) and what names them (the glossary) agree with it."""

from __future__ import annotations

import re
from pathlib import Path

from breakglass_tui.lab import catalog
from breakglass_tui.lab.guest import plan
from breakglass_tui.lab.sandbox import SCENARIO_UNITS

REPO = Path(__file__).resolve().parents[2]
GUEST_SCRIPT = REPO / "breakglass_tui/lab/guest/files/rootfs/usr/local/sbin/lab-scenario"


def test_what_stages_a_scenario_names_only_catalogued_ones() -> None:
    names = set(catalog.SCENARIOS)
    staged_in_guest = set(re.findall(r"^    ([a-z-]+)\)$", GUEST_SCRIPT.read_text(), re.M))
    assert staged_in_guest and staged_in_guest <= names
    assert set(plan.SAVED_SCENARIOS) <= staged_in_guest  # a saved state needs its failure staged
    assert set(catalog.SANDBOX_SCENARIOS) <= names
    assert set(SCENARIO_UNITS) <= set(catalog.SANDBOX_SCENARIOS)
    assert tuple(catalog.SCENARIOS) == catalog.GUEST_SCENARIOS


def test_the_glossary_lists_every_scenario() -> None:
    context = (REPO / "CONTEXT.md").read_text()
    entry = context[context.index("**lab**") :]
    entry = entry[: entry.index("\n\n")]
    listed = re.findall(r"`([a-z-]+)`", entry)
    assert [n for n in listed if n in catalog.SCENARIOS] == list(catalog.SCENARIOS)
