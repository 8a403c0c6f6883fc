"""The deployment docs stay true to the code: the runbook names every verb and slash command the
console has, and the docs' relative links lead somewhere."""

from __future__ import annotations

import re

import pytest

from breakglass_tui.hosts.types import VERBS
from tests.chart.conftest import REPO

DOCS = ("install.md", "runbook.md", "threat-model.md")
# Written by other engineers in the same change; a link to them may land before the file does.
WRITTEN_ELSEWHERE = {"docs/pve-host.md", "docs/keys.md"}


def slash_commands() -> list[str]:
    from breakglass_tui.core.agent import HELP

    return sorted(set(re.findall(r"^\s+(/[a-z]+)", HELP, flags=re.MULTILINE)))


def test_runbook_explains_every_verb() -> None:
    runbook = (REPO / "docs" / "runbook.md").read_text()
    for verb in VERBS:
        assert f"| `{verb}` |" in runbook, f"the runbook's verb table lacks {verb}"


def test_runbook_lists_every_slash_command() -> None:
    runbook = (REPO / "docs" / "runbook.md").read_text()
    commands = slash_commands()
    assert "/probe" in commands and "/sh" in commands
    for command in commands:
        assert f"`{command}" in runbook, f"the runbook does not mention {command}"


def test_runbook_says_where_the_cold_case_goes() -> None:
    runbook = (REPO / "docs" / "runbook.md").read_text()
    assert "2026-05-30-breakglass-ssh-access-design.md" in runbook
    assert "iDRAC" in runbook


@pytest.mark.parametrize("name", DOCS)
def test_relative_links_resolve(name: str) -> None:
    path = REPO / "docs" / name
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if "://" in target:
            continue
        resolved = (path.parent / target).resolve()
        relative = resolved.relative_to(REPO).as_posix()
        if not resolved.exists() and relative not in WRITTEN_ELSEWHERE:
            missing.append(target)
    assert missing == [], f"{name} links to missing files: {missing}"
