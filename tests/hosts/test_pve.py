"""The PVE client against a real OpenSSH sshd with a forced command.

Part one: the forced command is a tiny script answering with a chosen JSON document and exit code
(every exit code of the protocol). Part two, end to end: the real breakglass-verb behind the real
sshd and behind the lab's PVE host, against the simulated Proxmox.
"""

from __future__ import annotations

import json
import shlex
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from breakglass_tui.config import DEFAULT_COLD_PATH_POINTER
from breakglass_tui.hosts.pve import PveClient
from breakglass_tui.hosts.session import HostSession
from breakglass_tui.hosts.ssh import ConnectOptions
from breakglass_tui.hosts.types import SshTarget
from tests.hosts.sshparts import other_host_key_line, target_for
from tests.support.realparts import Sshd, free_port, new_key, public_line, start_sshd

PVE_KEY = new_key("breakglass-pve")
PVE_LOGIN = ConnectOptions(client_keys=[PVE_KEY])
BUNDLE = "20260612T101500Z-reset-1a2b3c"

# The forced command: answers SSH_ORIGINAL_COMMAND from a JSON file of {command: [code, doc]},
# echoing the exact command it was given, as the verb's own log would.
FAKE_VERB = textwrap.dedent(
    """
    import json, os, sys
    answers = json.load(open(sys.argv[1]))
    original = os.environ.get("SSH_ORIGINAL_COMMAND")
    code, doc = answers.get(original, answers["*"])
    if isinstance(doc, dict):
        doc = dict(doc, original=original, tty=os.isatty(0))
        print(json.dumps(doc))
    else:
        print(doc)
    if code:
        print("breakglass-verb: refused", file=sys.stderr)
    sys.exit(code)
    """
)


def doc(verb: str | None, code: int, **fields: object) -> dict[str, object]:
    return {
        "verb": verb,
        "vmid": 102,
        "ok": code == 0,
        "exit_code": code,
        "message": fields.pop("message", f"{verb} said {code}"),
        "state_before": "running",
        "state_after": "running",
        "bundle_id": None,
        "refused": None,
        "cold_case": False,
        **fields,
    }


@pytest.fixture(scope="module")
def answers_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fake-verb") / "answers.json"


@pytest.fixture(scope="module")
def pve_sshd(answers_file: Path) -> Iterator[Sshd]:
    script = answers_file.parent / "fake_verb.py"
    script.write_text(FAKE_VERB)
    forced = f"{sys.executable} {script} {answers_file}"
    line = f'command="{forced}",restrict {public_line(PVE_KEY)}\n'
    server = start_sshd(line)
    try:
        yield server
    finally:
        server.close()


def answer(answers_file: Path, table: dict[str, tuple[int, object]]) -> None:
    answers_file.write_text(json.dumps({"*": (70, "no answer set"), **table}))


async def test_status_is_parsed_into_a_verb_result(pve_sshd: Sshd, answers_file: Path):
    answer(answers_file, {"status": (0, doc("status", 0, message="VM 102 is running."))})
    result = await PveClient(target_for(pve_sshd), PVE_LOGIN).verb("status")
    assert result.ok and result.exit_code == 0
    assert (result.verb, result.vmid, result.state_after) == ("status", 102, "running")
    assert result.message == "VM 102 is running."
    # One exec of exactly the verb's name, without a pty.
    assert result.document["original"] == "status" and result.document["tty"] is False
    assert not result.cold_case


@pytest.mark.parametrize(
    ("verb", "code", "fields", "expected"),
    [
        ("reset", 3, {"refused": "busy"}, "busy: another mutating verb"),
        ("cycle", 4, {"refused": "budget"}, "refused by policy"),
        ("reset", 4, {"refused": "cooldown"}, "cooldown"),
        ("stop", 5, {"cold_case": True}, "the action failed"),
        ("start", 6, {}, "config on the PVE host is invalid"),
        ("forensics", 70, {}, "internal error"),
        ("status", 2, {"refused": "bad_input", "verb": None}, "refused the input"),
    ],
)
async def test_each_exit_code_gets_a_clear_message(
    pve_sshd: Sshd,
    answers_file: Path,
    verb: str,
    code: int,
    fields: dict[str, object],
    expected: str,
):
    body = doc(fields.pop("verb", verb), code, message="the verb's own sentence.", **fields)  # type: ignore[arg-type]
    answer(answers_file, {verb: (code, body)})
    result = await PveClient(target_for(pve_sshd), PVE_LOGIN).verb(verb)
    assert not result.ok and result.exit_code == code
    assert expected in result.message and "the verb's own sentence." in result.message
    assert result.refused == fields.get("refused")
    assert result.cold_case is bool(fields.get("cold_case"))


async def test_an_answer_that_is_not_json_says_so(pve_sshd: Sshd, answers_file: Path):
    answer(answers_file, {"status": (1, "bash: status: command not found")})
    result = await PveClient(target_for(pve_sshd), PVE_LOGIN).verb("status")
    assert not result.ok and result.exit_code == 1
    assert "no JSON document" in result.message and "forced command" in result.message


async def test_bundle_fetches_by_exact_id(pve_sshd: Sshd, answers_file: Path):
    files = {"manifest.json": "e30="}
    answer(
        answers_file,
        {
            f"bundle {BUNDLE}": (
                0,
                {"verb": "bundle", "ok": True, "bundle_id": BUNDLE, "manifest": {}, "files": files},
            )
        },
    )
    client = PveClient(target_for(pve_sshd), PVE_LOGIN)
    got = await client.bundle(BUNDLE)
    assert got["ok"] is True and got["files"] == files and got["original"] == f"bundle {BUNDLE}"
    refused = await client.bundle("../../etc/shadow")
    assert refused["ok"] is False and "not a bundle id" in refused["message"]


async def test_an_unknown_verb_is_refused_before_connecting():
    # Nothing listens there: had it tried to connect, it would report the cold case instead.
    target = SshTarget("127.0.0.1", free_port(), "root", "[127.0.0.1]:1 ssh-ed25519 AAAA\n")
    result = await PveClient(target, PVE_LOGIN).verb("status; rm -rf /")
    assert not result.ok and result.exit_code == 2 and result.refused == "bad_input"
    assert not result.cold_case and "not a verb" in result.message


async def test_an_unreachable_pve_host_is_the_cold_case():
    target = SshTarget(
        "127.0.0.1", free_port(), "breakglass", "[127.0.0.1]:1 ssh-ed25519 AAAA\n", name="pve"
    )
    result = await PveClient(target, PVE_LOGIN).verb("reset")
    assert not result.ok and result.cold_case
    assert result.message.endswith(DEFAULT_COLD_PATH_POINTER)
    assert "cannot be reached" in result.message


async def test_the_cold_case_names_the_sites_own_path_when_configured():
    """BREAKGLASS_COLD_PATH_POINTER (the chart's server.coldPathPointer) replaces the neutral
    default, in the verb's answer and in Claude's system prompt."""
    from breakglass_tui.config import Settings
    from breakglass_tui.core.prompt import system_prompt

    pointer = "Cold case: knock on the PVE host's SSH port, then follow runbooks/cold.md."
    settings = Settings(cold_path_pointer=pointer)
    unreachable = SshTarget(
        "127.0.0.1", free_port(), "breakglass", "[127.0.0.1]:1 ssh-ed25519 AAAA\n", name="pve"
    )
    session = HostSession(unreachable, unreachable, client_keys=[PVE_KEY], settings=settings)
    result = await session.pve.verb("status")
    assert result.cold_case and result.message.endswith(pointer)
    assert DEFAULT_COLD_PATH_POINTER not in result.message
    assert pointer in system_prompt(102, settings.cold_path_pointer)[0]["text"]


async def test_a_wrong_pve_host_key_is_refused_and_not_the_cold_case(pve_sshd: Sshd):
    target = target_for(pve_sshd, known_hosts=other_host_key_line(pve_sshd.port))
    result = await PveClient(target, PVE_LOGIN).verb("status")
    assert not result.ok and not result.cold_case
    assert "NOT the pinned one" in result.message


# -- end to end: the real breakglass-verb against the simulated Proxmox ------------------------


@pytest.fixture
def sim(tmp_path: Path):
    from breakglass_tui.lab.sim_pve import SimPve

    simulated = SimPve.create(tmp_path / "pve", budget={"cooldown_s": 0})
    simulated.start_vm()
    try:
        yield simulated
    finally:
        simulated.cleanup()


def verb_command(sim) -> str:
    return (
        f"env BREAKGLASS_VERB_CONFIG={shlex.quote(str(sim.verb_config_path))}"
        f" {sys.executable} -m breakglass_tui.verb.breakglass_verb"
    )


async def test_end_to_end_behind_openssh_with_the_real_verb(sim):
    server = start_sshd(f'command="{verb_command(sim)}",restrict {public_line(PVE_KEY)}\n')
    try:
        client = PveClient(target_for(server), PVE_LOGIN)
        status = await client.verb("status")
        assert status.ok, status.message
        assert status.vmid == 102 and status.state_after == "running"
        reset = await client.verb("reset")
        assert reset.ok, reset.message
        assert reset.bundle_id and reset.state_after == "running"
        bundle = await client.bundle(reset.bundle_id)
        assert bundle["ok"] is True and bundle["bundle_id"] == reset.bundle_id
        assert bundle["files"]
    finally:
        server.close()


async def test_end_to_end_through_the_lab_pve_host_and_host_session(sim):
    from breakglass_tui.lab.pve_host import LabPveHost

    host_key = new_key("lab-pve-host")
    lab = LabPveHost()
    port = await lab.start(
        verb_argv=[sys.executable, "-m", "breakglass_tui.verb.breakglass_verb"],
        verb_env={"BREAKGLASS_VERB_CONFIG": str(sim.verb_config_path)},
        authorized_key=public_line(PVE_KEY),
        host_key=host_key,
    )
    pub = public_line(host_key).split()
    pve = SshTarget("127.0.0.1", port, "breakglass", f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
    devvm = SshTarget("127.0.0.1", free_port(), "root", "[127.0.0.1]:1 ssh-ed25519 AAAA\n")
    session = HostSession(devvm, pve, client_keys=[PVE_KEY])
    try:
        assert session.pve_target is pve and session.devvm_target is devvm
        status = await session.verb("status")
        assert status.ok and status.state_after == "running", status.message
        boot_before = sim.vm_state()["boot_id"]
        cycle = await session.verb("cycle")
        assert cycle.ok, cycle.message
        assert sim.vm_state()["boot_id"] > boot_before
        refused = await session.verb("shell")
        assert refused.exit_code == 2
        # The devvm side of the same session: nothing listens there.
        assert (await session.probe()).reachability.value == "refused"
        assert (await session.run("uptime")).ending.value == "failed"
    finally:
        await session.close()
        await lab.close()
