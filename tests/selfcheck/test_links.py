"""The self-check against real parts, every link broken in turn.

The production shape on loopback: a real OpenBao with Kubernetes auth holding the breakglass
secret (docs/vault applied), breakglass-serve's backend loading the keys into a real ssh-agent,
a PVE host that is a real OpenSSH sshd whose key runs only the real breakglass-verb
(``command="…",restrict``) over the simulated Proxmox, a devvm that is a real sshd where the
breakglass user has a real NOPASSWD sudo rule, and the real anthropic SDK against the strict fake
Messages API with an account key. Each break is made as it happens in life, checked on the right
link (the others still OK), with the right metric, and undone.
"""

# The OpenBao fixtures are imported by name below (no shared conftest), so pytest's use of them
# as arguments reads as a redefinition to ruff.
# ruff: noqa: F811

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest
import pytest_asyncio

from breakglass_tui.core.selfcheck import LinkStatus, SelfCheck, summary
from breakglass_tui.lab.sim_pve import SimPve
from breakglass_tui.serve.backend import ServeBackend, check_once
from breakglass_tui.serve.metrics import Metrics
from breakglass_tui.serve.server import ServeState
from tests.support.fake_messages_api import FakeMessagesApi
from tests.support.openbao import (  # noqa: F401 - fixtures
    BreakglassVault,
    apply_breakglass_docs,
    breakglass_vault,
    known_hosts_line,
    openbao,
    secret_fields,
)
from tests.support.realparts import Sshd, new_key, public_line, start_sshd, wait_for_port
from tests.verb.conftest import PROXMOX_TIMINGS, VERB_PATH

pytestmark = pytest.mark.timeout(180)

API_KEY = "sk-ant-selfcheck-" + secrets.token_hex(12)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@dataclass
class Parts:
    """The real parts of the rescue path, and how to break each."""

    vault: BreakglassVault
    sim: SimPve
    pve: Sshd
    pve_line: str  # the forced-command line of the PVE key in the PVE host's authorized_keys
    devvm: Sshd
    user: str
    sudo_rule: Path
    api: FakeMessagesApi
    workdir: Path
    devvm_key: asyncssh.SSHKey
    fields: dict[str, str]  # this module's good secret


@pytest.fixture(scope="module")
def devvm_user() -> Iterator[tuple[str, Path]]:
    """The devvm's breakglass user, with a real NOPASSWD sudo rule (removed afterwards)."""
    if not shutil.which("sudo"):
        pytest.fail("sudo is missing: apt-get install sudo (scripts/setup.sh test installs it)")
    user = f"bgcheck{secrets.token_hex(3)}"
    rule = Path(f"/etc/sudoers.d/breakglass-selfcheck-{user}")
    try:
        _run("useradd", "--create-home", "--shell", "/bin/bash", "--password", "*", user)
        rule.write_text(f"{user} ALL=(root) NOPASSWD: ALL\n")
        rule.chmod(0o440)
        yield user, rule
    finally:
        rule.unlink(missing_ok=True)
        subprocess.run(["userdel", "--remove", user], capture_output=True, check=False)


@pytest_asyncio.fixture(scope="module")
async def parts(
    breakglass_vault: BreakglassVault, devvm_user: tuple[str, Path]
) -> AsyncIterator[Parts]:
    user, rule = devvm_user
    workdir = Path(tempfile.mkdtemp(prefix="bg-selfcheck-"))
    sim = SimPve.create(workdir / "pve", budget={"max_mutating_per_hour": 1000, "cooldown_s": 0})
    sim.set_faults(**PROXMOX_TIMINGS)
    sim.start_vm()
    forced = sim.root / "verb-forced.sh"  # sshd passes no environment: the wrapper carries it
    forced.write_text(
        "#!/bin/sh\n"
        f"BREAKGLASS_VERB_CONFIG={sim.verb_config_path}\n"
        "export BREAKGLASS_VERB_CONFIG\n"
        f'exec {sys.executable} {VERB_PATH} "$@"\n'
    )
    forced.chmod(0o755)
    devvm_key, pve_key = new_key("selfcheck-devvm"), new_key("selfcheck-pve")
    pve_line = f'command="{forced}",restrict {public_line(pve_key)}\n'
    pve = start_sshd(pve_line)
    devvm = start_sshd(public_line(devvm_key) + "\n", user=user)
    # sshd reads authorized_keys as the logging-in user.
    devvm.workdir.chmod(0o755)
    (devvm.workdir / "authorized_keys").chmod(0o644)
    api = await FakeMessagesApi(api_key=API_KEY).start()
    vault = breakglass_vault
    fields = secret_fields(
        devvm_key,
        pve_key,
        known_hosts_line("127.0.0.1", devvm.port, devvm.host_key),
        known_hosts_line("127.0.0.1", pve.port, pve.host_key),
    )
    vault.write_secret(fields)
    made = Parts(vault, sim, pve, pve_line, devvm, user, rule, api, workdir, devvm_key, fields)
    try:
        yield made
    finally:
        vault.write_secret(vault.fields())  # the session's good secret, for other modules
        await api.close()
        devvm.close()
        made.devvm.close()  # the one a test brought back after stopping the first
        pve.close()
        made.pve.close()
        sim.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(autouse=True)
def api_key(parts: Parts, monkeypatch: pytest.MonkeyPatch) -> None:
    """The account's key, and the fake as the API (tests/conftest.py clears both per test)."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", API_KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", parts.api.base_url)


def settings_for(parts: Parts, workdir: Path):
    return parts.vault.settings(
        workdir,
        devvm_host="127.0.0.1",
        devvm_port=parts.devvm.port,
        devvm_user=parts.user,
        pve_host="127.0.0.1",
        pve_port=parts.pve.port,
        pve_user="root",
        selfcheck_timeout_s=15.0,
    )


@pytest_asyncio.fixture(scope="module")
async def served(parts: Parts) -> AsyncIterator[tuple[ServeBackend, SelfCheck, ServeState]]:
    """breakglass-serve's backend with the keys loaded from Vault, and its self-check."""
    workdir = parts.workdir / "serve"
    workdir.mkdir()
    backend = ServeBackend(
        settings_for(parts, workdir), lab=False, scenario="healthy", state_dir=workdir / "state"
    )
    state = ServeState()
    await backend.prepare(state)
    try:
        yield backend, backend.build_selfcheck(), state
    finally:
        await backend.close()


async def run(selfcheck: SelfCheck) -> tuple[dict, str]:
    """One run: the snapshot, and the /metrics text the server would serve after it."""
    await selfcheck.run()
    snapshot = selfcheck.snapshot()
    metrics = Metrics(lambda: 0)
    metrics.update_links(snapshot)
    return snapshot, metrics.render().decode()


def status(snapshot: dict) -> dict[str, str]:
    return {link["link"]: link["status"] for link in snapshot["links"]}


def message(snapshot: dict, link: str) -> str:
    return next(item["message"] for item in snapshot["links"] if item["link"] == link)


def assert_only_broken(snapshot: dict, metrics: str, link: str) -> None:
    """``link`` is broken, every other used link is OK; the metric and the header agree."""
    expected = {name: "ok" for name in ("vault", "pve", "devvm", "api")}
    expected["serving"] = "not_used"
    expected[link] = "broken"
    assert status(snapshot) == expected, snapshot
    for name, value in expected.items():
        sample = f'breakglass_link_up{{link="{name}"}}'
        if value == "not_used":
            assert sample not in metrics
        else:
            assert f"{sample} {'0.0' if value == 'broken' else '1.0'}" in metrics
    text, ok = summary(snapshot)
    title = next(item["title"] for item in snapshot["links"] if item["link"] == link)
    assert ok is False and f"{title} BROKEN since" in text


async def assert_all_ok(selfcheck: SelfCheck) -> dict:
    snapshot, metrics = await run(selfcheck)
    assert status(snapshot) == {
        "vault": "ok",
        "pve": "ok",
        "devvm": "ok",
        "api": "ok",
        "serving": "not_used",
    }, [link["message"] for link in snapshot["links"]]
    assert snapshot["ok"] is True
    assert 'breakglass_link_up{link="pve"} 1.0' in metrics
    return snapshot


async def test_every_link_ok_and_timed(served, parts: Parts) -> None:
    _, selfcheck, _ = served
    snapshot = await assert_all_ok(selfcheck)
    for link in snapshot["links"]:
        if link["status"] == "ok":
            assert link["latency_s"] > 0 and link["last_success"] == link["checked_at"]
    assert "keys match" in message(snapshot, "vault")
    assert "status answered (protocol 2)" in message(snapshot, "pve")
    assert "sudo works without a password" in message(snapshot, "devvm")
    assert "claude-sonnet-5-5" in message(snapshot, "api")
    # Nothing was generated and no verb but status reached the PVE host.
    assert all(r.path.startswith("/v1/models/") for r in parts.api.requests)
    assert "reset" not in (parts.sim.root / "verb-forced.sh").read_text()


async def test_vault_sealed(served, parts: Parts) -> None:
    _, selfcheck, _ = served
    parts.vault.bao.seal()
    try:
        snapshot, metrics = await run(selfcheck)
        assert_only_broken(snapshot, metrics, "vault")
        assert "sealed" in message(snapshot, "vault").lower()
    finally:
        parts.vault.bao.unseal()
    await assert_all_ok(selfcheck)


async def test_vault_policy_removed(served, parts: Parts) -> None:
    _, selfcheck, _ = served
    parts.vault.bao.cli("policy", "delete", "breakglass-read")
    try:
        snapshot, metrics = await run(selfcheck)
        assert_only_broken(snapshot, metrics, "vault")
        assert "403" in message(snapshot, "vault") or "denied" in message(snapshot, "vault")
    finally:
        apply_breakglass_docs(parts.vault.bao)
    await assert_all_ok(selfcheck)


async def test_pve_key_removed_from_the_forced_command_file(served, parts: Parts) -> None:
    _, selfcheck, _ = served
    authorized = parts.pve.workdir / "authorized_keys"
    authorized.write_text("")  # sshd reads it at every login
    try:
        snapshot, metrics = await run(selfcheck)
        assert_only_broken(snapshot, metrics, "pve")
        assert "refused" in message(snapshot, "pve")
    finally:
        authorized.write_text(parts.pve_line)
    await assert_all_ok(selfcheck)


def _rekey(sshd: Sshd, key) -> None:
    """Give a running sshd another host key, as a reinstall does (SIGHUP: sshd re-reads it)."""
    path = sshd.workdir / "host_ed25519"
    path.unlink()
    key.write_private_key(str(path))
    path.chmod(0o600)
    os.kill(sshd.pid, signal.SIGHUP)


async def test_pve_host_key_changed(served, parts: Parts) -> None:
    _, selfcheck, _ = served
    _rekey(parts.pve, new_key("reinstalled-pve"))
    try:
        wait_for_port(parts.pve.port)
        snapshot, metrics = await run(selfcheck)
        assert_only_broken(snapshot, metrics, "pve")
        assert "host key" in message(snapshot, "pve")
    finally:
        _rekey(parts.pve, parts.pve.host_key)
        wait_for_port(parts.pve.port)
    await assert_all_ok(selfcheck)


async def test_devvm_down(served, parts: Parts) -> None:
    _, selfcheck, _ = served
    port, host_key, user = parts.devvm.port, parts.devvm.host_key, parts.user
    authorized = (parts.devvm.workdir / "authorized_keys").read_text()
    parts.devvm.close()
    try:
        snapshot, metrics = await run(selfcheck)
        assert_only_broken(snapshot, metrics, "devvm")
        assert "refused the TCP connection" in message(snapshot, "devvm")
    finally:
        parts.devvm = start_sshd(authorized, user=user, port=port, host_key=host_key)
        parts.devvm.workdir.chmod(0o755)
        (parts.devvm.workdir / "authorized_keys").chmod(0o644)
    await assert_all_ok(selfcheck)


async def test_sudo_asks_for_a_password(served, parts: Parts) -> None:
    _, selfcheck, _ = served
    parts.sudo_rule.write_text(f"{parts.user} ALL=(root) ALL\n")  # a password now
    try:
        snapshot, metrics = await run(selfcheck)
        assert_only_broken(snapshot, metrics, "devvm")
        assert "sudo asks" in message(snapshot, "devvm")
    finally:
        parts.sudo_rule.write_text(f"{parts.user} ALL=(root) NOPASSWD: ALL\n")
    await assert_all_ok(selfcheck)


async def test_api_key_refused(served, parts: Parts, monkeypatch: pytest.MonkeyPatch) -> None:
    _, selfcheck, _ = served
    revoked = "sk-ant-revoked-" + secrets.token_hex(8)
    monkeypatch.setenv("ANTHROPIC_API_KEY", revoked)
    snapshot, metrics = await run(selfcheck)
    assert_only_broken(snapshot, metrics, "api")
    assert "401" in message(snapshot, "api")
    assert revoked not in str(snapshot)  # the key itself is never repeated
    monkeypatch.setenv("ANTHROPIC_API_KEY", API_KEY)
    await assert_all_ok(selfcheck)


async def test_unknown_model(served, parts: Parts) -> None:
    backend, _, _ = served
    settings = backend.settings.model_copy(update={"model": "claude-nonesuch-9"})
    other = ServeBackend(settings, lab=False, scenario="healthy", state_dir=backend.state_dir)
    other.wiring = backend.wiring  # the same keys and targets, another model
    selfcheck = other.build_selfcheck()
    await selfcheck.run()
    api = selfcheck.links["api"]
    assert api.status is LinkStatus.BROKEN and "claude-nonesuch-9" in api.message


async def test_a_key_rotated_in_vault_is_reloaded_each_on_its_own_target(
    served, parts: Parts
) -> None:
    _, selfcheck, state = served
    before = state.child_env["BREAKGLASS_PVE_KEY_FINGERPRINT"]
    new_pve = new_key("rotated-pve")
    good = (parts.pve.workdir / "authorized_keys").read_text()
    forced = good.split(" ssh-")[0]
    data = secret_fields(
        parts.devvm_key,
        new_pve,
        known_hosts_line("127.0.0.1", parts.devvm.port, parts.devvm.host_key),
        known_hosts_line("127.0.0.1", parts.pve.port, parts.pve.host_key),
    )
    # Rotated on both sides: the PVE host takes the new key, Vault holds it.
    (parts.pve.workdir / "authorized_keys").write_text(f"{forced} {public_line(new_pve)}\n")
    parts.vault.write_secret(data)
    try:
        changes = await selfcheck.run()  # Vault sees the change and reloads
        assert "CHANGED" in selfcheck.links["vault"].message
        # The status stays OK, but the reload is recorded (what the server audits).
        assert [(c.link, c.event) for c in changes if c.event] == [("vault", "keys_reloaded")]
        after = state.child_env["BREAKGLASS_PVE_KEY_FINGERPRINT"]
        assert after == new_pve.get_fingerprint("sha256") != before
        assert state.child_env["BREAKGLASS_DEVVM_KEY_FINGERPRINT"] != after
        snapshot, _ = await run(selfcheck)  # and the new key opens the forced command
        assert status(snapshot)["pve"] == "ok", snapshot
    finally:
        (parts.pve.workdir / "authorized_keys").write_text(good)
        parts.vault.write_secret(parts.fields)
    await selfcheck.run()  # the good secret again: reloaded back
    await assert_all_ok(selfcheck)


async def test_check_once_prints_a_line_per_link_and_exits_1_naming_the_break(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = parts.workdir / "once"
    workdir.mkdir()
    settings = settings_for(parts, workdir)
    out = io.StringIO()
    assert await check_once(settings, lab=False, state_dir=workdir / "state", out=out) == 0
    lines = out.getvalue().splitlines()
    assert [line.split()[0] for line in lines[:4]] == ["OK"] * 4, lines
    assert lines[-1] == "rescue path: all links OK"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-wrong-" + secrets.token_hex(8))
    out = io.StringIO()
    assert await check_once(settings, lab=False, state_dir=workdir / "state", out=out) == 1
    text = out.getvalue()
    assert "BROKEN   Messages API" in text and text.endswith("rescue path BROKEN: api\n")
    with contextlib.suppress(FileNotFoundError):
        assert not any((workdir / "state").iterdir())  # --check writes nothing there


async def test_check_once_with_vault_sealed_at_start_names_vault(parts: Parts) -> None:
    """The keys cannot load at all: Vault is named broken, and the hosts say why they could
    not be tried (not a bare failure)."""
    workdir = parts.workdir / "sealed"
    workdir.mkdir()
    settings = settings_for(parts, workdir)
    parts.vault.bao.seal()
    try:
        out = io.StringIO()
        assert await check_once(settings, lab=False, state_dir=workdir / "state", out=out) == 1
    finally:
        parts.vault.bao.unseal()
    lines = {line[9:22].strip(): line for line in out.getvalue().splitlines()[:-1]}
    assert lines["Vault"].startswith("BROKEN") and "sealed" in lines["Vault"].lower()
    for host in ("PVE host", "devvm"):
        assert lines[host].startswith("BROKEN") and "keys are not loaded" in lines[host]
    assert lines["Messages API"].startswith("OK")
    assert out.getvalue().splitlines()[-1] == "rescue path BROKEN: vault, pve, devvm"
