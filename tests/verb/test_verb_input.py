"""Hostile SSH_ORIGINAL_COMMAND values are refused: exit 2, one JSON document, one stderr line,
no qm call, no lock, no ledger. And an invalid config is refused with exit 6, nothing done."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from breakglass_tui.verb import breakglass_verb as bv
from tests.verb.conftest import VERB_PATH, RecordingHost, run_verb, write_config

VERBS = ("status", "forensics", "reset", "stop", "start", "cycle")
GOOD_ID = "20261128T150102Z-cycle-0a1b2c"
ACCEPTED = {*VERBS, f"bundle {GOOD_ID}"}

METACHARS = ";|&$`()<>\n\r\t \x00\\'\"*?~!#{}[]=%^,:"
# Look-alikes a human would read as the verb: Cyrillic, Greek, fullwidth, invisible characters.
LOOKALIKES = {
    "s": ["ѕ", "ｓ", "ś"],
    "t": ["т", "ｔ", "ţ"],
    "a": ["а", "ａ", "α"],
    "r": ["г", "ｒ"],
    "e": ["е", "ｅ", "ė"],
    "o": ["о", "ο", "ｏ", "0"],
    "c": ["с", "ｃ", "ϲ"],
    "y": ["у", "ｙ"],
    "l": ["ӏ", "ｌ", "1", "I"],
    "p": ["р", "ｐ"],
    "f": ["ｆ"],
    "n": ["ո", "ｎ"],
    "i": ["і", "ｉ", "ı"],
    "u": ["υ", "ｕ"],
}
INVISIBLE = ["\u200b", "\u200d", "\ufeff", "\u00a0", "\u2028", "\u0301", "\u202e"]

verb = st.sampled_from(VERBS)
junk = st.text(alphabet=METACHARS + "abc102 ", min_size=1, max_size=40)


def _case_variant(v: str, flips: list[bool]) -> str:
    return "".join(c.upper() if f else c for c, f in zip(v, flips, strict=True))


case_variants = verb.flatmap(
    lambda v: st.lists(st.booleans(), min_size=len(v), max_size=len(v)).map(
        lambda flips: _case_variant(v, flips)
    )
)


def _lookalike(v: str, i: int, pick: int) -> str:
    options = [c for c in range(len(v)) if v[c] in LOOKALIKES]
    pos = options[i % len(options)]
    subs = LOOKALIKES[v[pos]]
    return v[:pos] + subs[pick % len(subs)] + v[pos + 1 :]


lookalikes = st.builds(_lookalike, verb, st.integers(0, 20), st.integers(0, 5))
invisibles = st.builds(
    lambda v, ch, pos: v[: pos % (len(v) + 1)] + ch + v[pos % (len(v) + 1) :],
    verb,
    st.sampled_from(INVISIBLE),
    st.integers(0, 10),
)
with_args = st.builds(
    lambda v, a: f"{v} {a}",
    verb,
    st.sampled_from(["102", "103", "100", "--vmid 103", "-f", "now", "--skiplock", "all", "1"])
    | st.text(min_size=1, max_size=12),
)
other_vmids = st.builds(lambda v, n: f"qm {v} {n}", verb, st.integers(0, 10**6))
surrounded = st.builds(
    lambda v, pre, post: pre + v + post,
    verb,
    st.sampled_from(["", " ", "\t", "\n", "\r\n", "\x00", "\x0b", "\x0c"]),
    st.sampled_from(["", " ", "\t", "\n", "\r\n", "\x00", "\x0b", "\x0c"]),
).filter(lambda s: s not in ACCEPTED)
injections = st.builds(
    lambda v, j, before: (j + v) if before else (v + j), verb, junk, st.booleans()
)
very_long = st.builds(lambda v, n: v * n, verb, st.integers(2, 5000)) | st.builds(
    lambda n: "x" * n, st.integers(129, 100_000)
)
bad_bundles = st.builds(
    lambda j, before: (j + f"bundle {GOOD_ID}") if before else (f"bundle {GOOD_ID}" + j),
    junk,
    st.booleans(),
) | st.sampled_from(
    [
        "bundle",
        "bundle ",
        f"bundle  {GOOD_ID}",
        f"bundle {GOOD_ID.upper()}",
        "bundle ../../etc/passwd",
        "bundle 20261128T150102Z-cycle-0a1b2",
        "bundle 20261128T150102Z-cycle-0a1b2cd",
        "bundle 20261128T150102Z-shell-0a1b2c",
        "bundle 20261128T150102Z-cycle-0A1B2C",
        "bundle 2026112８T150102Z-cycle-0a1b2c",  # fullwidth digit: \d would take it, [0-9] not
        f"bundle {GOOD_ID}/../x",
        f"BUNDLE {GOOD_ID}",
        f"bundle\t{GOOD_ID}",
    ]
)
anything = st.text(max_size=200).filter(lambda s: s not in ACCEPTED)

HOSTILE = (
    injections
    | case_variants.filter(lambda s: s not in ACCEPTED)
    | lookalikes
    | invisibles
    | with_args
    | other_vmids
    | surrounded
    | very_long
    | bad_bundles
    | anything
)


# ------------------------------------------------------------------ the parser itself (NUL too)


def test_accepts_exactly_the_six_verbs_and_a_strict_bundle_id() -> None:
    for v in VERBS:
        assert bv.parse_command(v) == bv.Command(v)
    assert bv.parse_command(f"bundle {GOOD_ID}") == bv.Command("bundle", GOOD_ID)


@pytest.mark.parametrize("raw", [None, ""])
def test_unset_and_empty_are_refused(raw: str | None) -> None:
    with pytest.raises(bv.BadInput):
        bv.parse_command(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "status; rm -rf /",
        "status\n",
        "status\nrm -rf /",
        "status\x00",
        "\x00status",
        "status && reboot",
        "$(reboot)",
        "`reboot`",
        "status|sh",
        " status",
        "status ",
        "STATUS",
        "Status",
        "reset 103",
        "qm reset 103",
        "stаtus",  # Cyrillic а
        "status\u200b",
        "cycle --vmid 103",
        "forensics > /etc/passwd",
        "start\r",
    ],
)
def test_named_hostile_commands_are_refused(raw: str) -> None:
    with pytest.raises(bv.BadInput):
        bv.parse_command(raw)


@settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(HOSTILE)
def test_parser_refuses_thousands_of_hostile_commands(raw: str) -> None:
    with pytest.raises(bv.BadInput):
        bv.parse_command(raw)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=METACHARS, min_size=1, max_size=20), verb)
def test_nul_anywhere_is_refused(noise: str, v: str) -> None:
    """Environment variables cannot carry NUL, so this is the parser's own proof."""
    raw = v + "\x00" + noise
    with pytest.raises(bv.BadInput):
        bv.parse_command(raw)


def test_escape_makes_one_printable_ascii_line() -> None:
    line = bv.escape("status; rm -rf /\n\x1b]52;c;ZWNobw==\x07é" + "x" * 1000)
    assert line.isascii() and line.isprintable() and "\n" not in line
    assert "...(+" in line
    assert bv.escape(None) == "<unset>"


# ------------------------------------------------------------------ main() in-process, fast


@contextlib.contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _captured_fds(tmp: Path) -> Iterator[tuple[Path, Path]]:
    """Point fds 1 and 2 at files while main() writes to them directly."""
    out, err = tmp / "out", tmp / "err"
    saved = os.dup(1), os.dup(2)
    with open(out, "wb") as o, open(err, "wb") as e:
        os.dup2(o.fileno(), 1)
        os.dup2(e.fileno(), 2)
        try:
            yield out, err
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@pytest.mark.slow
@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(HOSTILE.filter(lambda s: "\x00" not in s))
def test_main_refuses_hostile_commands_without_touching_the_host(
    recording_host: RecordingHost, tmp_path: Path, raw: str
) -> None:
    with (
        _environ(BREAKGLASS_VERB_CONFIG=str(recording_host.config), SSH_ORIGINAL_COMMAND=raw),
        _captured_fds(tmp_path) as (out, err),
    ):
        code = bv.main()
    doc = json.loads(out.read_text())
    assert code == 2 == doc["exit_code"]
    assert doc["refused"] == "bad_input" and doc["ok"] is False and doc["verb"] is None
    assert err.read_text().count("\n") == 1
    assert recording_host.calls() == []
    assert not (recording_host.state_dir / "lock").exists()
    assert not (recording_host.state_dir / "ledger.jsonl").exists()
    assert not (recording_host.state_dir / "bundles").exists()


# ------------------------------------------------------------------ the real subprocess


@pytest.mark.slow
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(HOSTILE.filter(lambda s: "\x00" not in s and len(s) < 20_000))
def test_subprocess_refuses_hostile_commands(recording_host: RecordingHost, raw: str) -> None:
    result = run_verb(recording_host.config, raw)
    assert result.exit_code == 2 == result.doc["exit_code"]
    assert result.doc["refused"] == "bad_input"
    assert result.stderr.count("\n") == 1 and "refused" in result.stderr
    assert recording_host.calls() == []
    assert not (recording_host.state_dir / "lock").exists()


@pytest.mark.parametrize("raw", [None, "", "status; rm -rf /", "sh", "internal-sftp", "scp -t /"])
def test_subprocess_refuses_shell_subsystem_and_empty(
    recording_host: RecordingHost, raw: str | None
) -> None:
    """OpenSSH leaves SSH_ORIGINAL_COMMAND unset for a shell request; subsystems come as names."""
    result = run_verb(recording_host.config, raw)
    assert result.exit_code == 2
    assert result.doc["refused"] == "bad_input"
    assert recording_host.calls() == []


def test_every_refusal_is_logged_escaped_with_the_connection(
    recording_host: RecordingHost,
) -> None:
    run_verb(recording_host.config, "status; rm -rf /\n\x1b[31m")
    log = (recording_host.state_dir / "verb.log").read_text()
    assert log.count("\n") == 1 and log.isascii()
    fields = json.loads(log.split(": ", 1)[1])
    assert fields["outcome"] == "bad_input"
    assert json.loads(fields["command"]) == "status; rm -rf /\n\x1b[31m"
    assert json.loads(fields["connection"]) == "127.0.0.1 50000 127.0.0.1 22"


def test_decisions_go_to_syslog_when_the_socket_listens(
    recording_host: RecordingHost, tmp_path: Path
) -> None:
    """A real datagram socket stands in for /dev/log."""
    import socket

    sock_path = tmp_path / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(sock_path))
        s.settimeout(10)
        text = recording_host.config.read_text().replace(
            str(recording_host.root / "no-syslog"), str(sock_path)
        )
        recording_host.config.write_text(text)
        result = run_verb(recording_host.config, "reboot")
        assert result.exit_code == 2
        msg = s.recv(65536).decode()
    assert msg.startswith("<84>breakglass-verb[")  # authpriv.warning
    assert '"outcome": "bad_input"' in msg and "reboot" in msg
    assert not (recording_host.state_dir / "verb.log").exists()


# ------------------------------------------------------------------ invalid config: exit 6


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ("vmid = 102\nqm = [", "not valid TOML"),
        ("vmid = 102\nvm_id = 103\n", "vm_id"),
        ("vmid = '102'\n", "vmid"),
        ("vmid = 99\n", "vmid"),
        ("vmid = true\n", "vmid"),
        ("vmid = 102.0\n", "vmid"),
        ('qm = "usr/sbin/qm"\n', "qm"),
        ('state_dir = "var/lib/breakglass"\n', "state_dir"),
        ("qemu_run_dir = 5\n", "qemu_run_dir"),
        ("[budget]\nmax_mutating_per_hour = 0\n", "budget.max_mutating_per_hour"),
        ("[budget]\nmax_per_hour = 4\n", "budget.max_per_hour"),
        ("[budget]\ncooldown_s = -1\n", "budget.cooldown_s"),
        ('[deadlines]\nforensics_s = "20"\n', "deadlines.forensics_s"),
        ("[deadlines]\nverify_s = 0\n", "deadlines.verify_s"),
        ("[retention]\nkeep_bundles = 1.5\n", "retention.keep_bundles"),
        ('[log]\nsyslog_socket = "dev/log"\n', "log.syslog_socket"),
        ("budget = 4\n", "budget"),
    ],
)
def test_invalid_config_is_refused_naming_the_key(tmp_path: Path, body: str, names: str) -> None:
    config = write_config(tmp_path / "verb.toml", body)
    result = run_verb(config, "cycle")
    assert result.exit_code == 6 == result.doc["exit_code"]
    assert names in result.doc["message"] and "nothing done" in result.doc["message"]
    assert result.stderr.count("\n") == 1
    assert result.doc["steps"] == [] and result.doc["bundle_id"] is None


def test_a_named_config_that_is_missing_is_invalid(tmp_path: Path) -> None:
    result = run_verb(tmp_path / "nope.toml", "status")
    assert result.exit_code == 6
    assert "does not exist" in result.doc["message"]


def test_invalid_config_does_nothing_on_the_host(recording_host: RecordingHost) -> None:
    text = recording_host.config.read_text() + "\n[budget]\ncooldown_s = 'soon'\n"
    recording_host.config.write_text(text)
    result = run_verb(recording_host.config, "reset")
    assert result.exit_code == 6 and "budget.cooldown_s" in result.doc["message"]
    assert recording_host.calls() == []
    assert not (recording_host.state_dir / "lock").exists()


def test_bad_input_wins_over_a_bad_config(tmp_path: Path) -> None:
    config = write_config(tmp_path / "verb.toml", "vmid = 1\n")
    assert run_verb(config, "status; id").exit_code == 2


def test_defaults_are_the_documented_ones() -> None:
    cfg = bv.validate_config({})
    assert (cfg.vmid, cfg.qm, cfg.qemu_run_dir, cfg.state_dir) == (
        102,
        "/usr/sbin/qm",
        "/var/run/qemu-server",
        "/var/lib/breakglass",
    )
    assert (cfg.pve_dir, cfg.cgroup_dir, cfg.pve_log_dir) == (
        "/etc/pve",
        "/sys/fs/cgroup",
        "/var/log/pve",
    )
    assert (cfg.max_mutating_per_hour, cfg.cooldown_s, cfg.max_forensics_per_hour) == (4, 300, 12)
    assert (cfg.forensics_s, cfg.probe_s, cfg.verify_s, cfg.ha_verify_s) == (20, 5, 30, 120)
    # qemu-server 9.2's stop alone may take 10 (lock) + 60 (quit) + --timeout + 10 s: the ceiling
    # for a qm task is minutes, and qm stop's own --timeout is set deliberately.
    assert (cfg.qm_action_s, cfg.qm_stop_timeout_s) == (240, 30)
    assert (cfg.keep_bundles, cfg.keep_action_bundles) == (20, 50)
    assert cfg.stop_skips_backup_lock is False
    assert cfg.syslog_socket == "/dev/log"


@pytest.mark.parametrize(
    "raw", [b"status\xff", b"\xc3\x28", b"st\xe2\x80\x8batus", b"\xed\xa0\x80"]
)
def test_bytes_that_are_not_utf8_are_refused(recording_host: RecordingHost, raw: bytes) -> None:
    """sshd passes the client's bytes through; Python sees them with surrogate escapes."""
    env = {
        b"PATH": b"/usr/bin:/bin",
        b"BREAKGLASS_VERB_CONFIG": str(recording_host.config).encode(),
        b"SSH_ORIGINAL_COMMAND": raw,
    }
    proc = subprocess.run(
        [sys.executable, str(VERB_PATH)], env=env, capture_output=True, timeout=30, check=False
    )
    assert proc.returncode == 2, proc.stderr
    assert json.loads(proc.stdout)["refused"] == "bad_input"
    assert (recording_host.state_dir / "verb.log").read_bytes().isascii()
    assert recording_host.calls() == []
