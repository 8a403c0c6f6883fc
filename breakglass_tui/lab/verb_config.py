"""The lab's ``verb.toml``: the real ``breakglass-verb``'s defaults, pointed at a lab PVE host.

Both labs (simulated and real-guest) run the real verb; its own ``DEFAULT_CONFIG`` is the one
truth of what the verb expects, and a lab only says where its ``qm``, run dir and state dir are
and which tables it changes (shorter deadlines for tests, a shorter cooldown for rehearsals).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from breakglass_tui.verb.breakglass_verb import DEFAULT_CONFIG


def lab_verb_config(
    root: Path,
    *,
    vmid: int,
    qm: Path,
    qemu_run_dir: Path,
    state_dir: Path,
    layers: tuple[dict[str, Any] | None, ...] = (),
) -> str:
    """verb.toml for a lab PVE host under root: the verb's defaults with the lab's paths, then
    each of `layers` merged over them, table by table (``{"deadlines": {"forensics_s": 3}}``
    changes one deadline and keeps the others)."""
    config = copy.deepcopy(DEFAULT_CONFIG)
    config.update(
        vmid=vmid,
        qm=str(qm),
        qemu_run_dir=str(qemu_run_dir),
        state_dir=str(state_dir),
        # The lab PVE host's /etc/pve, cgroup root and /var/log/pve (qm_standin.StandinRoot).
        pve_dir=str(root / "etc-pve"),
        cgroup_dir=str(root / "cgroup"),
        pve_log_dir=str(root / "pve-log"),
        # No syslog in the lab: the verb falls back to <state_dir>/verb.log, which tests can read.
        log={"syslog_socket": str(root / "no-syslog.sock")},
    )
    for layer in layers:
        for key, value in copy.deepcopy(layer or {}).items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key].update(value)
            else:
                config[key] = value
    return to_toml(config)


def to_toml(config: dict[str, Any]) -> str:
    """Write a flat TOML document: top-level scalars, then one level of tables."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a valid TOML basic string
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to verb.toml")

    lines = [f"{k} = {value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    for table, items in config.items():
        if isinstance(items, dict):
            lines += ["", f"[{table}]"] + [f"{k} = {value(v)}" for k, v in items.items()]
    return "\n".join(lines) + "\n"
