"""The console and the verb speak one protocol: the verbs, the mutating ones, the exit codes, the
bundle id and the cold-case marker are the verb module's own, imported by the hosts layer (and so
by the agent, its tool schema and its slash commands), never copied."""

from __future__ import annotations

import json
from pathlib import Path

from breakglass_tui.hosts import pve, types
from breakglass_tui.verb import breakglass_verb as verb


def test_the_hosts_layer_uses_the_verbs_own_definitions() -> None:
    assert types.VERBS is verb.VERBS
    assert types.MUTATING_VERBS is verb.MUTATING_VERBS
    assert types.BUNDLE_ID_RE is verb.BUNDLE_ID_RE
    assert pve.PROTOCOL_VERSION == verb.PROTOCOL_VERSION
    assert set(verb.MUTATING_VERBS) < set(verb.VERBS)


def test_every_exit_code_of_the_verb_has_a_meaning_for_the_operator() -> None:
    codes = {
        value
        for name, value in vars(verb).items()
        if name.startswith("EXIT_") and name != "EXIT_PREFLIGHT_FAILED"
    }
    assert codes == set(pve.EXIT_MEANINGS)


def test_a_bundle_id_the_verb_makes_is_one_the_console_fetches(tmp_path: Path) -> None:
    config = tmp_path / "verb.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    cfg = verb.load_config({verb.CONFIG_ENV: str(config)})
    for name in verb.VERBS:
        if name == "status":
            continue  # status captures nothing
        bundle_id, _ = verb.new_bundle_dir(cfg, name)
        assert types.BUNDLE_ID_RE.fullmatch(bundle_id)
        assert verb.bundle_verb(bundle_id) == name
        assert verb.BUNDLE_RE.fullmatch(f"bundle {bundle_id}")


def test_the_client_reads_the_document_the_verb_writes() -> None:
    """The verb's own document (cold case, bundle, refusal), as the client parses it."""
    run = verb.Run(None, "cycle")
    run.cold_case = True
    run.bundle_id = "20260612T101500Z-cycle-1a2b3c"
    run.state_before, run.state_after = verb.STATE_RUNNING, verb.STATE_KVM_ALIVE_D
    message = f"kvm would not die: {verb.COLD_PATH}"
    answer = json.dumps(run.document(verb.EXIT_ACTION_FAILED, message))
    result = pve.parse_answer("cycle", verb.EXIT_ACTION_FAILED, answer, "")
    assert result.cold_case is True
    assert result.ok is False and result.exit_code == verb.EXIT_ACTION_FAILED
    assert result.bundle_id == run.bundle_id
    assert result.state_after == verb.STATE_KVM_ALIVE_D
    assert verb.COLD_PATH in result.message and result.protocol_note is None

    refused = verb.Run(None, "reset").document(
        verb.EXIT_PRECONDITION, "the VM is locked (backup)", verb.REFUSED_LOCKED
    )
    result = pve.parse_answer("reset", verb.EXIT_PRECONDITION, json.dumps(refused), "")
    assert result.refused == verb.REFUSED_LOCKED and result.cold_case is False
    assert pve.EXIT_MEANINGS[verb.EXIT_PRECONDITION] in result.message


def test_the_tool_schema_and_the_slash_commands_offer_exactly_the_verbs() -> None:
    from breakglass_tui.core import slash, tools

    (pve_tool,) = [t for t in tools.definitions() if t["name"] == "pve_verb"]
    assert pve_tool["input_schema"]["properties"]["verb"]["enum"] == list(verb.VERBS)
    by_verb = {c.name[1:]: c for c in slash.COMMANDS if c.tool == "pve_verb"}
    assert set(by_verb) == set(verb.VERBS)
    for name, command in by_verb.items():
        assert command.tool_input is not None and command.tool_input("") == {"verb": name}
        assert command.mutating == (name in verb.MUTATING_VERBS)
        assert tools.is_mutating("pve_verb", {"verb": name}) == (name in verb.MUTATING_VERBS)
