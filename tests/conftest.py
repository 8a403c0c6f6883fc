"""Shared fixtures: real parts started once per session and cleaned up after."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.realparts import SshAgent, start_ssh_agent


@pytest.fixture(autouse=True)
def _no_developer_config(monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> None:
    """Keep the developer's own environment out of every test: no BREAKGLASS_ settings, no agent
    socket, no Vault token, no API key leak in from the shell that ran pytest. The guest cache's
    place stays (scripts/setup.sh test filled it: the image and the saved states)."""
    for name in list(os.environ):
        if name == "BREAKGLASS_GUEST_CACHE":
            continue
        if name.startswith(("BREAKGLASS_", "VAULT_", "ANTHROPIC_")) or name == "SSH_AUTH_SOCK":
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def ssh_agent() -> Iterator[SshAgent]:
    """A real OpenSSH ssh-agent for the session."""
    agent = start_ssh_agent()
    try:
        yield agent
    finally:
        agent.close()
